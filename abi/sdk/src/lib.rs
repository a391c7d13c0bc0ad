//! The guest side of Shoal: write a function's HTTP handler and lifecycle hooks.
//!
//! A Shoal HTTP function is a WASI 0.2 component that exports the standard
//! `wasi:http/incoming-handler`, so the same `.wasm` runs under
//! `wasmtime serve` too. It may also export `shoal:runtime/lifecycle`
//! (`start` runs once per instance before its first request, `destroy` before
//! the instance is dropped).
//!
//! ```no_run
//! use shoal_sdk::http::{Request, Response};
//!
//! struct Hello;
//!
//! impl shoal_sdk::http::Handler for Hello {
//!     fn handle(request: Request) -> Response {
//!         Response::text(200, format!("hello from {}\n", request.path()))
//!     }
//! }
//!
//! impl shoal_sdk::Lifecycle for Hello {
//!     fn start() -> Result<(), String> {
//!         println!("instance starting");
//!         Ok(())
//!     }
//!     fn destroy() {
//!         println!("instance going away");
//!     }
//! }
//!
//! shoal_sdk::export_http!(Hello);
//! shoal_sdk::export_lifecycle!(Hello);
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
