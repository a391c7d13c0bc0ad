//! A running Shoal host: engine, registry, ledger, metrics, and the tasks
//! that serve HTTP, the admin API, idle reclaim and ledger syncing.
//!
//! [`Host::start`] builds everything, restores the persisted functions,
//! binds the listeners and returns a [`RunningHost`]. Its
//! [`RunningHost::shutdown`] is the graceful path (SIGTERM): stop
//! accepting, let requests finish, run `destroy` on every instance, sync
//! the ledger.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Error;
use crate::abi::Services;
use crate::backends::broker::LocalBroker;
use crate::backends::redb_kv::RedbKeyValue;
use crate::backends::redis::Redis;
use crate::backends::secrets::SecretStore;
use crate::backends::{Broker, KeyValue};
use crate::dispatch::Dispatcher;
use crate::engine::{EngineOptions, WasmEngine};
use crate::function::Runtime;
use crate::logs::{LogSink, TracingSink};
use crate::metering::{Ledger, SYNC_INTERVAL};
use crate::metrics::Metrics;
use crate::registry::Registry;

/// How often idle instances are looked for.
const REAP_INTERVAL: Duration = Duration::from_millis(100);

/// Everything a host needs to start.
#[derive(Clone)]
pub struct HostConfig {
    /// Where the HTTP trigger listens (port 0: any free port).
    pub listen: SocketAddr,
    /// The admin API's Unix socket; `None`: no admin API.
    pub admin_socket: Option<PathBuf>,
    /// Where functions, compiled code and the ledger are kept; `None`:
    /// nothing persists (tests, throwaway hosts).
    pub state_dir: Option<PathBuf>,
    /// Engine settings (the cache dir defaults to `<state_dir>/cache`).
    pub engine: EngineOptions,
    /// Where guests' output lines go.
    pub log_sink: Arc<dyn LogSink>,
    /// How long undeploy, updates and shutdown wait for requests to finish.
    pub drain_timeout: Duration,
    /// The key-value backend of the Runtime ABI.
    pub keyvalue: Backend,
    /// The pubsub backend of the Runtime ABI.
    pub pubsub: Backend,
    /// A folder of secrets (one file per secret); the environment
    /// (`SHOAL_SECRET_<NAME>`) is consulted too.
    pub secrets_dir: Option<PathBuf>,
    /// Whether deployed functions are kept in the state directory and
    /// restored at start. The node host says no: containerd owns its
    /// containers, and a restarted host must not revive them.
    pub persist_functions: bool,
}

/// Where a Runtime ABI service keeps its data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Backend {
    /// In the host: redb in the state directory for key-value, the
    /// in-process broker for pubsub.
    #[default]
    Embedded,
    /// A Redis server, shared by every host pointed at it.
    Redis {
        /// `redis://host:port`.
        url: String,
    },
}

impl HostConfig {
    /// Defaults: `127.0.0.1:8080`, no admin socket, no state.
    pub fn new() -> HostConfig {
        HostConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_socket: None,
            state_dir: None,
            engine: EngineOptions::default(),
            log_sink: Arc::new(TracingSink),
            drain_timeout: Duration::from_secs(30),
            keyvalue: Backend::Embedded,
            pubsub: Backend::Embedded,
            secrets_dir: None,
            persist_functions: true,
        }
    }
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig::new()
    }
}

/// The shared state of a host.
pub struct Host {
    registry: Registry,
    dispatcher: Dispatcher,
    metrics: Arc<Metrics>,
    ledger: Option<Arc<Ledger>>,
    ready: AtomicBool,
    /// Holds the embedded key-value file of a host without a state directory.
    _scratch: Option<tempfile::TempDir>,
}

impl Host {
    /// The deployed functions.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The request runner.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The usage ledger, when the host has a state directory.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_deref()
    }

    /// Whether persisted functions are restored and listeners are up.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Build a host and start serving.
    pub async fn start(config: HostConfig) -> Result<RunningHost, Error> {
        let mut engine_options = config.engine.clone();
        if let Some(dir) = &config.state_dir {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
            if engine_options.cache_dir.is_none() {
                engine_options.cache_dir = Some(dir.join("cache"));
            }
        }
        let engine = WasmEngine::new(&engine_options)?;
        let metrics = Arc::new(Metrics::new());
        let (services, scratch) = build_services(&config, metrics.clone()).await?;
        let runtime = Runtime::new(engine, services.clone())?;
        let ledger = match &config.state_dir {
            Some(dir) => {
                let path = dir.join("usage.jsonl");
                Some(Arc::new(Ledger::open(&path).map_err(Error::io(&path))?))
            }
            None => None,
        };
        let registry = Registry::new(
            runtime,
            metrics.clone(),
            config.log_sink.clone(),
            config.state_dir.clone().filter(|_| config.persist_functions),
            config.drain_timeout,
        )?;
        let host = Arc::new(Host {
            registry,
            dispatcher: Dispatcher::new(ledger.clone(), metrics.clone()),
            metrics,
            ledger,
            ready: AtomicBool::new(false),
            _scratch: scratch,
        });
        services.attach(&host);

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|err| anyhow::anyhow!("cannot listen on {}: {err}", config.listen))?;
        let http_addr = listener.local_addr().map_err(anyhow::Error::from)?;
        let admin_listener = match &config.admin_socket {
            Some(path) => Some(bind_unix(path)?),
            None => None,
        };

        let restored = host.registry.restore().await?;
        if !restored.is_empty() {
            tracing::info!(versions = restored.len(), "restored deployed functions");
        }

        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(crate::trigger::http::serve(listener, host.clone(), shutdown_rx.clone()));
        if let Some(listener) = admin_listener {
            tasks.spawn(crate::admin::serve(listener, host.clone(), shutdown_rx.clone()));
        }
        tasks.spawn(reap_idle(host.clone(), shutdown_rx.clone()));
        // Registered here, not in the task: a deploy right after `start`
        // already waits for its subscriptions.
        let changes = host.registry.changes();
        tasks.spawn(crate::trigger::events::serve(host.clone(), services.broker.clone(), changes, shutdown_rx.clone()));
        if host.ledger.is_some() {
            tasks.spawn(sync_ledger(host.clone(), shutdown_rx.clone()));
        }
        host.ready.store(true, Ordering::Release);
        Ok(RunningHost {
            host,
            http_addr,
            admin_socket: config.admin_socket,
            shutdown_tx,
            tasks,
            drain_timeout: config.drain_timeout,
        })
    }
}

async fn build_services(
    config: &HostConfig,
    metrics: Arc<Metrics>,
) -> Result<(Arc<Services>, Option<tempfile::TempDir>), Error> {
    let mut scratch = None;
    let kv: Arc<dyn KeyValue> = match &config.keyvalue {
        Backend::Embedded => {
            let dir = match &config.state_dir {
                Some(dir) => dir.clone(),
                None => {
                    let dir = tempfile::tempdir().map_err(anyhow::Error::from)?;
                    let path = dir.path().to_path_buf();
                    scratch = Some(dir);
                    path
                }
            };
            Arc::new(RedbKeyValue::open(&dir.join("kv.redb")).map_err(|err| Error::Internal(err.into()))?)
        }
        Backend::Redis { url } => Arc::new(Redis::connect(url).await.map_err(|err| Error::Internal(err.into()))?),
    };
    let broker: Arc<dyn Broker> = match &config.pubsub {
        Backend::Embedded => Arc::new(LocalBroker::default()),
        Backend::Redis { url } => Arc::new(Redis::connect(url).await.map_err(|err| Error::Internal(err.into()))?),
    };
    let secrets = SecretStore::new(config.secrets_dir.clone());
    Ok((Services::new(kv, broker, secrets, metrics), scratch))
}

fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    }
    // A socket file left by a host that died is stale; one that answers
    // belongs to a live host, which we must not steal from.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::Internal(anyhow::anyhow!(
                "another Shoal host is already serving the admin socket {}",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    tokio::net::UnixListener::bind(path)
        .map_err(|err| Error::Internal(anyhow::anyhow!("cannot bind admin socket {}: {err}", path.display())))
}

async fn reap_idle(host: Arc<Host>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        for pool in host.registry.pools() {
            let reaped = pool.reap_idle(now);
            if reaped > 0 {
                tracing::debug!(function = pool.function().name(), reaped, "scaled down idle instances");
            }
        }
    }
}

async fn sync_ledger(host: Arc<Host>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Some(ledger) = host.ledger.clone() {
            let result = tokio::task::spawn_blocking(move || ledger.sync()).await;
            if let Ok(Err(err)) = result {
                tracing::error!(error = %err, "cannot sync the usage ledger");
            }
        }
    }
}

/// A host that is serving.
pub struct RunningHost {
    host: Arc<Host>,
    http_addr: SocketAddr,
    admin_socket: Option<PathBuf>,
    shutdown_tx: watch::Sender<bool>,
    tasks: JoinSet<()>,
    drain_timeout: Duration,
}

impl RunningHost {
    /// The shared host state.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// The address the HTTP trigger is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The admin socket, if any.
    pub fn admin_socket(&self) -> Option<&std::path::Path> {
        self.admin_socket.as_deref()
    }

    /// Graceful stop: refuse new connections, let requests finish, run
    /// `destroy` on every instance, sync the ledger.
    pub async fn shutdown(mut self) {
        self.host.ready.store(false, Ordering::Release);
        let _ = self.shutdown_tx.send(true);
        let drain_timeout = self.drain_timeout;
        // Listeners stop at once; open connections finish within the drain time.
        let _ = tokio::time::timeout(drain_timeout, async { while self.tasks.join_next().await.is_some() {} }).await;
        self.tasks.abort_all();
        self.host.registry.drain_all(drain_timeout).await;
        if let Some(ledger) = &self.host.ledger
            && let Err(err) = ledger.sync()
        {
            tracing::error!(error = %err, "cannot sync the usage ledger");
        }
        if let Some(path) = &self.admin_socket {
            let _ = std::fs::remove_file(path);
        }
    }
}
