//! `wasi:config/store`, `shoal:runtime/secrets` and `shoal:runtime/pubsub`.

use super::Refusal;
use super::bindings::shoal::runtime::{pubsub, secrets, types};
use super::bindings::wasi::config::store as config;
use crate::backends::BackendError;
use crate::instance::GuestState;

/// The error value of Shoal's own interfaces for a refusal.
pub(crate) fn shoal_error(refusal: Refusal) -> types::Error {
    match refusal {
        Refusal::Denied(message) => types::Error::Denied(message),
        Refusal::Limited(message) => types::Error::Limited(message),
    }
}

fn config_error(refusal: Refusal) -> config::Error {
    match refusal {
        Refusal::Denied(message) | Refusal::Limited(message) => config::Error::Upstream(message),
    }
}

impl types::Host for GuestState {}

impl config::Host for GuestState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<String>, config::Error>> {
        if let Err(refused) = self.admit("config.get") {
            return Ok(Err(config_error(refused)));
        }
        match self.abi.caps.grants.config.get(&key) {
            Some(value) => Ok(Ok(Some(value.clone()))),
            None => Ok(Err(config_error(self.deny("config.get", format!("config key {key:?}"))))),
        }
    }

    async fn get_all(&mut self) -> wasmtime::Result<Result<Vec<(String, String)>, config::Error>> {
        if let Err(refused) = self.admit("config.get-all") {
            return Ok(Err(config_error(refused)));
        }
        Ok(Ok(self.abi.caps.grants.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()))
    }
}

impl secrets::Host for GuestState {
    async fn get(&mut self, name: String) -> wasmtime::Result<Result<Vec<u8>, types::Error>> {
        if let Err(refused) = self.admit("secrets.get") {
            return Ok(Err(shoal_error(refused)));
        }
        if !self.abi.caps.grants.secrets.contains(&name) {
            return Ok(Err(shoal_error(self.deny("secrets.get", format!("secret {name:?}")))));
        }
        match self.abi.services.secrets.get(&name) {
            Some(secret) => Ok(Ok(secret)),
            None => Ok(Err(types::Error::NotFound(format!("the host has no secret {name:?}")))),
        }
    }
}

impl pubsub::Host for GuestState {
    async fn publish(&mut self, topic: String, message: Vec<u8>) -> wasmtime::Result<Result<(), types::Error>> {
        if let Err(refused) = self.admit("pubsub.publish") {
            return Ok(Err(shoal_error(refused)));
        }
        if !self.abi.caps.grants.publish.contains(&topic) {
            return Ok(Err(shoal_error(self.deny("pubsub.publish", format!("publishing to topic {topic:?}")))));
        }
        let limit = self.abi.caps.limits.message_max_bytes;
        if let Err(refused) = self.check_size("pubsub.publish", "message", message.len(), "message_max_bytes", limit) {
            return Ok(Err(shoal_error(refused)));
        }
        if let Err(refused) = self.admit_publish() {
            return Ok(Err(shoal_error(refused)));
        }
        match self.abi.services.broker.publish(&topic, message).await {
            Ok(_id) => Ok(Ok(())),
            Err(BackendError::Full(message)) => Ok(Err(shoal_error(self.limited("pubsub.publish", message)))),
            Err(err) => Ok(Err(types::Error::Backend(err.to_string()))),
        }
    }
}
