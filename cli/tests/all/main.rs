//! Shoal's integration tests: one binary (as in wasmtime's `tests/all`),
//! one module per user-visible behaviour, real guests from `functions/`.

// Test code may unwrap: a panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

use shoal_testing::{cluster, support};

mod exec;
mod faults;

mod bad_input;
mod cluster_invoke;
mod grants;
mod hooks;
mod http_trigger;
mod installer;
mod invoke;
mod isolation;
mod keyvalue;
mod kubelet;
mod kubernetes;
mod languages;
mod layering;
mod ledger;
mod limits;
mod metering;
mod multi_tenant;
mod node_boundary;
mod persistence;
mod pubsub;
mod redis_backend;
mod resilience;
mod scale_to_zero;
mod tenancy;
mod tier_up;
mod trace_context;
mod upgrade;
mod versions;
mod wasi_p3;
