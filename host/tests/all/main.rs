//! Shoal's integration tests: one binary (as in wasmtime's `tests/all`),
//! one module per user-visible behaviour, real guests from `functions/`.

// Test code may unwrap: a panic is how a test reports failure.
#![allow(clippy::unwrap_used)]

mod support;

mod bad_input;
mod hooks;
mod http_trigger;
mod isolation;
mod ledger;
mod limits;
mod metering;
mod persistence;
mod scale_to_zero;
mod versions;
