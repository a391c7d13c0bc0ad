//! The node host: one Shoal host serving every wasm container that
//! containerd runs with `runtime_type = "io.containerd.shoal.v1"`.
//!
//! `containerd-shim-shoal-v1 start` (the `shim/` crate) starts `shoal node`
//! once per containerd namespace and hands containerd this host's ttrpc
//! socket for every container. containerd then speaks the shim task API
//! (`containerd.task.v2.Task`, also served as `v3`) here:
//!
//! - the pod sandbox ("pause") container runs nothing: the host opens the
//!   pod's network namespace and holds it;
//! - an HTTP function (a component exporting `wasi:http/incoming-handler`)
//!   is deployed into the host's registry and gets its own listener inside
//!   the pod's network namespace;
//! - a command (a `wasi:cli/run` component, or a classic `wasm32-wasip1`
//!   module with `_start`) runs once; its exit code is the task's.
//!
//! Guest output goes to the container's own stdio FIFOs, so the CRI log
//! file (`kubectl logs`) holds it. Stats come from Shoal's metering.

mod command;
mod container;
mod containerd;
mod error;
mod exec;
mod netns;
mod policy;
mod rootfs;
mod stdio;
mod task;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::ttrpc::asynchronous::Server;

use crate::Error;
use crate::engine::EngineOptions;
use crate::host::{Backend, FrontDoor, HostConfig};
use crate::metering::LedgerPolicy;
use crate::server::RunningHost;
use crate::signals::StopSignals;

pub use container::{ANNOTATION_PREFIX, KubernetesSettings};
pub use error::NodeError;
pub use policy::{DEFAULT_POLICY_PATH, Policy};
pub use rootfs::DEFAULT_MAX_WASM_BYTES;

/// What `shoal node` needs to know.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The ttrpc socket containerd connects to.
    pub socket: PathBuf,
    /// The containerd namespace served (events are published in it).
    pub namespace: String,
    /// containerd's gRPC socket (container labels, image content).
    pub containerd: PathBuf,
    /// containerd's ttrpc socket, where task events are published.
    pub ttrpc_address: String,
    /// Compiled code cache, key-value store and usage ledger.
    pub state_dir: PathBuf,
    /// Engine settings.
    pub engine: EngineOptions,
    /// How long SIGTERM waits for a function's requests and `destroy`.
    pub drain_timeout: Duration,
    /// The largest wasm file read out of a container's rootfs.
    pub max_wasm_bytes: u64,
    /// The limits of every pod's HTTP listener.
    pub front_door: FrontDoor,
    /// How the usage ledger is partitioned and kept.
    pub ledger: LedgerPolicy,
    /// The node policy file (what pods may grant themselves).
    pub policy: PathBuf,
    /// Where key-value state is kept (every tenant's, scoped by name).
    pub keyvalue: Backend,
    /// What carries messages.
    pub pubsub: Backend,
    /// The most key-value bytes one tenant (namespace) may keep.
    pub kv_bytes_per_tenant: Option<u64>,
}

/// Serve containerd until SIGTERM or SIGINT; then drain every function
/// (requests finish, `destroy` runs) and exit.
pub async fn run(config: NodeConfig) -> Result<(), Error> {
    let mut signals = StopSignals::install().map_err(|err| anyhow::anyhow!("cannot install signal handlers: {err}"))?;
    let sinks = Arc::new(stdio::ContainerSinks::default());
    let host_config = HostConfig {
        // The node's own listener only answers /healthz, /readyz and
        // /metrics; functions listen in their pods.
        listen: "127.0.0.1:0".parse().map_err(anyhow::Error::from)?,
        admin_socket: Some(config.state_dir.join("admin.sock")),
        state_dir: Some(config.state_dir.clone()),
        engine: config.engine.clone(),
        log_sink: sinks.clone(),
        drain_timeout: config.drain_timeout,
        persist_functions: false,
        front_door: config.front_door.clone(),
        ledger: config.ledger,
        keyvalue: config.keyvalue.clone(),
        pubsub: config.pubsub.clone(),
        kv_bytes_per_tenant: config.kv_bytes_per_tenant,
        ..HostConfig::new()
    };
    let running = RunningHost::start(host_config).await?;
    let publisher = containerd_shim::asynchronous::publisher::RemotePublisher::new(&config.ttrpc_address)
        .await
        .map_err(|err| anyhow::anyhow!("cannot reach containerd's event service at {}: {err}", config.ttrpc_address))?;
    let node = task::Node::new(running.host().clone(), sinks, publisher, &config);
    let service = Arc::new(task::TaskService::new(node.clone()));

    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    }
    let _ = std::fs::remove_file(&config.socket);
    let mut server = Server::new()
        .bind(&format!("unix://{}", config.socket.display()))
        .map_err(|err| anyhow::anyhow!("cannot listen on {}: {err}", config.socket.display()))?;
    for (name, methods) in task::services(service) {
        server = server.register_service([(name, methods)].into_iter().collect());
    }
    server.start().await.map_err(|err| anyhow::anyhow!("cannot serve ttrpc on {}: {err}", config.socket.display()))?;
    tracing::info!(socket = %config.socket.display(), namespace = %config.namespace, pid = std::process::id(), "node host serving containerd");

    let signal = signals.recv().await;
    tracing::info!("{signal}: draining every function");
    let _ = server.shutdown().await;
    node.stop_all().await;
    running.shutdown().await;
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}
