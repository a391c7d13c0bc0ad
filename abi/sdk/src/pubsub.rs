//! Publishing messages to topics granted by `grants.publish`.
//!
//! ```no_run
//! shoal_sdk::pubsub::publish("orders", br#"{"id":42}"#)?;
//! # Ok::<(), shoal_sdk::Error>(())
//! ```

use crate::Error;

/// Queue `message` on `topic` for its subscribers (delivered at least once).
pub fn publish(topic: &str, message: &[u8]) -> Result<(), Error> {
    crate::imports::shoal::runtime::pubsub::publish(topic, message)
}
