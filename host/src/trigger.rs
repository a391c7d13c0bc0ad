//! What makes functions run: HTTP requests (and, later, messages).

pub mod http;
