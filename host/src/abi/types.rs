//! The Runtime ABI's shared types (`shoal:runtime/types`): how a refusal
//! becomes the error value a guest sees.

use super::bindings::shoal::runtime::types;
use super::bindings::wasi::config::store as config;
use super::{AbiCtxView, ConfigError, Refusal, ShoalError};

impl From<Refusal> for ShoalError {
    fn from(refusal: Refusal) -> ShoalError {
        match refusal {
            Refusal::Denied(message) => types::Error::Denied(message).into(),
            Refusal::Limited(message) => types::Error::Limited(message).into(),
        }
    }
}

impl From<Refusal> for ConfigError {
    fn from(refusal: Refusal) -> ConfigError {
        match refusal {
            Refusal::Denied(message) | Refusal::Limited(message) => config::Error::Upstream(message).into(),
        }
    }
}

impl types::Host for AbiCtxView<'_> {
    fn convert_error(&mut self, err: ShoalError) -> wasmtime::Result<types::Error> {
        err.downcast()
    }
}
