//! The guest side of Shoal: write a function's HTTP handler, lifecycle
//! hooks and message handler, and reach the host's capabilities — state,
//! configuration, secrets, pubsub, other functions, outbound HTTP — through
//! small calls. Every call is checked against what the manifest granted;
//! a refusal is an ordinary `Err` value, never a crash.
//!
//! A Shoal HTTP function is a WASI 0.2 component that exports the standard
//! `wasi:http/incoming-handler`, so the same `.wasm` runs under
//! `wasmtime serve` too. It may also export `shoal:runtime/lifecycle`
//! (`start` runs once per instance before its first request, `destroy` before
//! the instance is dropped) and `shoal:runtime/events` (message delivery).
//!
//! A complete function: it counts visits in key-value state, greets with a
//! configured greeting, publishes an event per visit, and logs each event
//! it receives back.
//!
//! ```no_run
//! use shoal_sdk::events::{Message, Subscriber};
//! use shoal_sdk::http::{Handler, Request, Response};
//!
//! struct Greeter;
//!
//! impl Handler for Greeter {
//!     fn handle(request: Request) -> Response {
//!         let name = request.query_param("name").unwrap_or("world");
//!         let greeting = shoal_sdk::config::get("greeting").ok().flatten().unwrap_or_else(|| "hello".into());
//!         let visits = match shoal_sdk::kv::open("default").and_then(|b| b.increment("greeter/visits", 1)) {
//!             Ok(visits) => visits,
//!             Err(err) => return Response::text(503, format!("state unavailable: {err}\n")),
//!         };
//!         if let Err(err) = shoal_sdk::pubsub::publish("visits", name.as_bytes()) {
//!             eprintln!("not published: {err}");
//!         }
//!         Response::text(200, format!("{greeting}, {name} (visit {visits})\n"))
//!     }
//! }
//!
//! impl Subscriber for Greeter {
//!     fn on_message(message: Message) -> Result<(), String> {
//!         println!("visit by {}", String::from_utf8_lossy(&message.payload));
//!         Ok(())
//!     }
//! }
//!
//! impl shoal_sdk::Lifecycle for Greeter {
//!     fn start() -> Result<(), String> {
//!         println!("instance starting");
//!         Ok(())
//!     }
//!     fn destroy() {
//!         println!("instance going away");
//!     }
//! }
//!
//! shoal_sdk::export_http!(Greeter);
//! shoal_sdk::export_subscriber!(Greeter);
//! shoal_sdk::export_lifecycle!(Greeter);
//! ```
//!
//! with, in `shoal.toml`:
//!
//! ```toml
//! [[function]]
//! name = "greeter"
//! wasm = "greeter.wasm"
//! routes = ["/greet"]
//! [function.grants]
//! keyvalue = ["default:greeter/*"]
//! config = { greeting = "ahoy" }
//! publish = ["visits"]
//! subscribe = ["visits"]
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`.

pub mod config;
pub mod events;
pub mod http;
pub mod invoke;
pub mod kv;
pub mod pubsub;
pub mod secrets;

/// Raw WASI 0.2 bindings (`wasi:http`, `wasi:io`, `wasi:clocks`, ...), for
/// what the small helpers here do not cover.
pub use wasip2 as wasi;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "hooks",
        pub_export_macro: true,
        export_macro_name: "__export_hooks",
        default_bindings_module: "shoal_sdk::bindings",
    });
}

#[doc(hidden)]
pub mod imports {
    wit_bindgen::generate!({
        path: "../wit",
        world: "imports",
        generate_all,
    });
}

#[doc(hidden)]
pub mod subscriber_bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "subscriber",
        pub_export_macro: true,
        export_macro_name: "__export_subscriber",
        default_bindings_module: "shoal_sdk::subscriber_bindings",
    });
}

/// Why a Runtime ABI call was refused or failed (Shoal's own interfaces).
pub use imports::shoal::runtime::types::Error;

/// The optional `shoal:runtime/lifecycle` hooks.
///
/// `start` runs once per instance, before its first request; an `Err` stops
/// the instance from serving and the host answers 503 naming your message.
/// `destroy` runs once before an instance that started is dropped.
pub use bindings::exports::shoal::runtime::lifecycle::Guest as Lifecycle;

/// Export a type's [`Lifecycle`] hooks from this component.
#[macro_export]
macro_rules! export_lifecycle {
    ($ty:ident) => {
        $crate::bindings::__export_hooks!($ty with_types_in $crate::bindings);
    };
}
