//! Shoal's host: many sandboxed WebAssembly functions in one process, each
//! bounded by fuel, memory, time and concurrency limits, scaled to zero when
//! idle, and metered per request.
//!
//! ```no_run
//! # async fn run() -> Result<(), shoal::Error> {
//! use shoal::host::HostConfig;
//! use shoal::manifest::Manifest;
//! use shoal::registry::DeployItem;
//! use shoal::server::RunningHost;
//!
//! let running = RunningHost::start(HostConfig::new()).await?;
//! let specs = Manifest::load("functions/shoal.toml".as_ref())?.resolve()?;
//! let items = specs
//!     .into_iter()
//!     .map(|spec| {
//!         let wasm = std::fs::read(&spec.wasm).expect("wasm exists");
//!         DeployItem { spec, wasm: wasm.into() }
//!     })
//!     .collect();
//! running.host().registry().deploy(items).await?;
//! println!("curl http://{}/hello", running.http_addr().expect("it listens"));
//! running.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! The modules are layered, and each depends only on modules below it
//! (a test, `layering`, keeps it so). From the top:
//!
//! - [`server`] (a host that serves: listeners and background tasks)
//!   starts things (the `shoal` binary and the node host, `shoal-node`,
//!   are crates above this one);
//! - [`admin`] (the control API the CLI talks to) and the [`trigger`]s
//!   (HTTP, messages) turn the outside world into calls on the [`host`];
//! - [`host`] is the shared state: [`registry`] of deployed functions, the
//!   [`dispatch`]er that runs a request through a function's [`pool`] and
//!   writes what it used through [`metrics`] and [`metering`];
//! - an [`instance`] of a [`function`] runs one call under its [`limits`],
//!   with its store's [`guest`] state, which reaches infrastructure only
//!   through the [`abi`] (capability checks) over the [`backends`];
//! - at the bottom: the [`engine`]s and their instance slots, [`files`]
//!   (`wasi:filesystem` limited to ordinary files), the [`manifest`] types,
//!   [`logs`], [`signals`] and the shared [`request`] types.

pub mod abi;
pub mod admin;
pub mod backends;
pub mod dispatch;
pub mod engine;
mod error;
pub mod files;
pub mod function;
pub mod guest;
pub mod host;
pub mod instance;
pub mod limits;
pub mod logs;
pub mod manifest;
pub mod metering;
pub mod metrics;
pub mod outcome;
pub mod pool;
pub mod registry;
pub mod request;
pub mod resilience;
pub mod server;
pub mod signals;
pub mod spans;
pub mod trigger;

pub use error::{Error, error_chain};
