//! Receiving messages: a function granted `subscribe` to topics implements
//! [`Subscriber`] and exports it with [`crate::export_subscriber!`].
//! Returning `Err` (or trapping) means "not handled": the message comes
//! again later, with `attempt` counted up.
//!
//! ```no_run
//! struct Audit;
//!
//! impl shoal_sdk::events::Subscriber for Audit {
//!     fn on_message(message: shoal_sdk::events::Message) -> Result<(), String> {
//!         println!("{} #{}: {} bytes", message.topic, message.attempt, message.payload.len());
//!         Ok(())
//!     }
//! }
//!
//! shoal_sdk::export_subscriber!(Audit);
//! ```

/// One delivery of a message.
pub use crate::subscriber_bindings::exports::shoal::runtime::events::Message;

/// A message handler.
pub trait Subscriber {
    /// Handle one delivery; `Err` asks for redelivery.
    fn on_message(message: Message) -> Result<(), String>;
}

#[doc(hidden)]
pub fn __dispatch<S: Subscriber>(message: Message) -> Result<(), String> {
    S::on_message(message)
}

/// Export a type's [`Subscriber`] as this component's `shoal:runtime/events`.
#[macro_export]
macro_rules! export_subscriber {
    ($ty:ident) => {
        const _: () = {
            struct __ShoalEvents;
            impl $crate::subscriber_bindings::exports::shoal::runtime::events::Guest for __ShoalEvents {
                fn handle(message: $crate::events::Message) -> Result<(), String> {
                    $crate::events::__dispatch::<$ty>(message)
                }
            }
    $crate::subscriber_bindings::__export_subscriber!(__ShoalEvents with_types_in $crate::subscriber_bindings);
        };
    };
}
