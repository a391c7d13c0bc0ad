//! Fixtures for Shoal's integration tests and benchmarks: guests from
//! `functions/` built once, hosts on loopback, the `shoal` binary, and
//! the real servers of the Kubernetes path (containerd, a registry, a
//! CRI client, pods' network namespaces).

// Fixture code may unwrap: a panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

pub mod cluster;
pub mod dns;
pub mod layout;
pub mod support;
