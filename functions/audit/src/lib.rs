//! A function that only receives messages: no HTTP handler, no routes.

use shoal_sdk::events::{Message, Subscriber};

struct Audit;

impl Subscriber for Audit {
    fn on_message(message: Message) -> Result<(), String> {
        println!("audit: {} {}", message.topic, String::from_utf8_lossy(&message.payload));
        Ok(())
    }
}

shoal_sdk::export_subscriber!(Audit);
