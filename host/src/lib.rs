//! Shoal's host: many sandboxed WebAssembly functions in one process, each
//! bounded by fuel, memory, time and concurrency limits, scaled to zero when
//! idle, and metered per request.
//!
//! ```no_run
//! # async fn run() -> Result<(), shoal::Error> {
//! use shoal::host::{Host, HostConfig};
//! use shoal::manifest::Manifest;
//! use shoal::registry::DeployItem;
//!
//! let running = Host::start(HostConfig::new()).await?;
//! let specs = Manifest::load("functions/shoal.toml".as_ref())?.resolve()?;
//! let items = specs
//!     .into_iter()
//!     .map(|spec| {
//!         let wasm = std::fs::read(&spec.wasm).expect("wasm exists");
//!         DeployItem { spec, wasm: wasm.into() }
//!     })
//!     .collect();
//! running.host().registry().deploy(items).await?;
//! println!("curl http://{}/hello", running.http_addr());
//! running.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! The modules follow a request: [`trigger::http`] routes it through the
//! [`registry`] to a function's [`pool`], which hands out an
//! [`instance`](instance::Instance) (built by [`function`] on the one
//! [`engine`]); [`dispatch`] runs it under its [`limits`], and [`metering`]
//! and [`metrics`] record what it used. [`admin`] is the control API that
//! the `shoal` CLI talks to. [`node`] serves containerd's shim task API
//! for every wasm container of a node from this one host, and [`image`]
//! builds and pushes the images those containers come from.

pub mod abi;
pub mod admin;
pub mod backends;
pub mod cli;
pub mod dispatch;
pub mod engine;
mod error;
pub mod function;
pub mod host;
pub mod image;
pub mod instance;
pub mod limits;
pub mod logs;
pub mod manifest;
pub mod metering;
pub mod metrics;
pub mod node;
pub mod pool;
pub mod registry;
pub mod signals;
pub mod trigger;

pub use error::Error;
