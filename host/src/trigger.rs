//! What makes functions run: HTTP requests (and, later, messages).

pub mod events;
pub mod http;
