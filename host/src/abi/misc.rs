//! `wasi:config/store`, `shoal:runtime/secrets` and `shoal:runtime/pubsub`.

use super::bindings::shoal::runtime::{pubsub, secrets, types};
use super::bindings::wasi::config::store as config;
use super::{AbiView, ConfigError, Refusal, ShoalError};
use crate::backends::BackendError;

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

impl types::Host for AbiView<'_> {
    fn convert_error(&mut self, err: ShoalError) -> wasmtime::Result<types::Error> {
        err.downcast()
    }
}

impl config::Host for AbiView<'_> {
    async fn get(&mut self, key: String) -> Result<Option<String>, ConfigError> {
        self.state.admit("config.get")?;
        match self.state.caps.grants.config.get(&key) {
            Some(value) => Ok(Some(value.clone())),
            None => Err(self.state.deny("config.get", format!("config key {key:?}")).into()),
        }
    }

    async fn get_all(&mut self) -> Result<Vec<(String, String)>, ConfigError> {
        self.state.admit("config.get-all")?;
        Ok(self.state.caps.grants.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn convert_error(&mut self, err: ConfigError) -> wasmtime::Result<config::Error> {
        err.downcast()
    }
}

impl secrets::Host for AbiView<'_> {
    async fn get(&mut self, name: String) -> Result<Vec<u8>, ShoalError> {
        self.state.admit("secrets.get")?;
        if !self.state.caps.grants.secrets.contains(&name) {
            return Err(self.state.deny("secrets.get", format!("secret {name:?}")).into());
        }
        match self.state.services.secrets.get(&name) {
            Some(secret) => Ok(secret),
            None => Err(types::Error::NotFound(format!("the host has no secret {name:?}")).into()),
        }
    }
}

impl pubsub::Host for AbiView<'_> {
    async fn publish(&mut self, topic: String, message: Vec<u8>) -> Result<(), ShoalError> {
        let state = &*self.state;
        state.admit("pubsub.publish")?;
        if !state.caps.grants.publish.contains(&topic) {
            return Err(state.deny("pubsub.publish", format!("publishing to topic {topic:?}")).into());
        }
        let limit = state.caps.limits.message_max_bytes;
        state.check_size("pubsub.publish", "message", message.len(), "message_max_bytes", limit)?;
        state.admit_publish()?;
        match state.services.broker.publish(&topic, message).await {
            Ok(_id) => Ok(()),
            Err(BackendError::Full(message)) => Err(state.limited("pubsub.publish", message).into()),
            Err(err) => Err(types::Error::Backend(err.to_string()).into()),
        }
    }
}
