//! `shoal:runtime/pubsub`, and its async form for WASI 0.3 guests
//! (`pubsub-async`): publishing to a topic of the function's tenant.

use std::sync::Arc;

use wasmtime::component::Accessor;

use super::bindings::shoal::runtime::{pubsub, types};
use super::concurrent_bindings::shoal::runtime::pubsub_async;
use super::{Abi, AbiCtxView, AbiState, Caller, ShoalError};
use crate::backends::{BackendError, Broker};

/// A publish that passed its checks: the broker, the topic's name there,
/// and the request that made it.
struct Publish {
    broker: Arc<dyn Broker>,
    scoped: String,
    caller: Caller,
}

impl Publish {
    /// Check a publish of `message` on `topic` against the function's
    /// grants, its message size and its publish rate.
    fn checked(state: &AbiState, topic: &str, message: &[u8]) -> Result<Publish, ShoalError> {
        state.admit("pubsub.publish")?;
        if !state.caps.grants.publish.contains(topic) {
            return Err(state.deny("pubsub.publish", format!("publishing to topic {topic:?}")).into());
        }
        let limit = state.caps.limits.message_max_bytes;
        state.check_size("pubsub.publish", "message", message.len(), "message_max_bytes", limit)?;
        state.admit_publish()?;
        Ok(Publish {
            broker: state.services.broker.clone(),
            scoped: state.caps.tenant.scope(topic),
            caller: state.caller(),
        })
    }

    /// Hand the message to the broker (Ok once it accepted it).
    async fn send(self, message: Vec<u8>) -> Result<(), ShoalError> {
        match self.broker.publish(&self.scoped, message).await {
            Ok(_id) => Ok(()),
            Err(BackendError::Full(message)) => Err(self.caller.limited("pubsub.publish", message).into()),
            Err(err) => Err(types::Error::Backend(err.to_string()).into()),
        }
    }
}

impl pubsub::Host for AbiCtxView<'_> {
    async fn publish(&mut self, topic: String, message: Vec<u8>) -> Result<(), ShoalError> {
        Publish::checked(self.state, &topic, &message)?.send(message).await
    }
}

impl pubsub_async::Host for AbiCtxView<'_> {}

impl<T: Send> pubsub_async::HostWithStore<T> for Abi {
    /// Checked while the store is the calling request's; the broker is
    /// waited for outside it.
    async fn publish(accessor: &Accessor<T, Self>, topic: String, message: Vec<u8>) -> Result<(), ShoalError> {
        let publish = accessor.with(|mut access| Publish::checked(access.get().state, &topic, &message))?;
        publish.send(message).await
    }
}
