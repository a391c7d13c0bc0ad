//! `shoal:runtime/pubsub`: publishing to a topic of the function's tenant.

use super::bindings::shoal::runtime::{pubsub, types};
use super::{AbiCtxView, ShoalError};
use crate::backends::BackendError;

impl pubsub::Host for AbiCtxView<'_> {
    async fn publish(&mut self, topic: String, message: Vec<u8>) -> Result<(), ShoalError> {
        let state = &*self.state;
        state.admit("pubsub.publish")?;
        if !state.caps.grants.publish.contains(&topic) {
            return Err(state.deny("pubsub.publish", format!("publishing to topic {topic:?}")).into());
        }
        let limit = state.caps.limits.message_max_bytes;
        state.check_size("pubsub.publish", "message", message.len(), "message_max_bytes", limit)?;
        state.admit_publish()?;
        match state.services.broker.publish(&state.caps.tenant.scope(&topic), message).await {
            Ok(_id) => Ok(()),
            Err(BackendError::Full(message)) => Err(state.limited("pubsub.publish", message).into()),
            Err(err) => Err(types::Error::Backend(err.to_string()).into()),
        }
    }
}
