//! A Shoal host's shared state: engine, registry, dispatcher, ledger,
//! metrics and the Runtime ABI's backends, built by [`Host::build`].
//!
//! This is state only. The tasks that make a host serve — the HTTP
//! trigger, the admin API, the event trigger, idle reclaim, ledger syncing
//! — depend on [`Host`] and are started by [`crate::server`], so nothing
//! here depends on them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Error;
use crate::abi::{InvokeError, Invoker, Peers, Services};
use crate::backends::broker::{DEFAULT_QUEUE_BYTES, DEFAULT_QUEUE_CAPACITY, LocalBroker};
use crate::backends::guarded::Guarded;
use crate::backends::redb_kv::RedbKeyValue;
use crate::backends::redis::Redis;
use crate::backends::secrets::SecretStore;
use crate::backends::{Broker, KeyValue, QueueBudgets};
use crate::dispatch::Dispatcher;
use crate::engine::{EngineOptions, WasmEngine};
use crate::function::Loader;
use crate::logs::{LogSink, TracingSink};
use crate::manifest::TenantName;
use crate::metering::{Ledger, LedgerPolicy};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::request::{RequestMeta, ShoalBody};
use crate::resilience::{Breakers, Policy};

/// Everything a host needs to start.
#[derive(Clone)]
pub struct HostConfig {
    /// Where the HTTP trigger (routes, `/healthz`, `/readyz`, `/metrics`)
    /// listens (port 0: any free port); `None`: nowhere (a node host,
    /// whose functions listen in their pods).
    pub listen: Option<SocketAddr>,
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
    /// What every HTTP listener of the host bounds before a function sees
    /// a request.
    pub front_door: FrontDoor,
    /// How the usage ledger (`<state_dir>/usage/`) is partitioned and kept.
    pub ledger: LedgerPolicy,
    /// The most bytes of keys and values one tenant may keep (`None`: no
    /// limit).
    pub kv_bytes_per_tenant: Option<u64>,
    /// Other hosts whose functions this host's functions invoke, and
    /// which serve theirs (`shoal serve --peer`, `--peer-token-file`).
    pub peers: Option<Peers>,
}

/// Key-value bytes a tenant may keep unless the host is told otherwise.
pub const DEFAULT_KV_BYTES_PER_TENANT: u64 = 1 << 30;

/// The limits of the HTTP front door, enforced on every connection of every
/// listener of the host (the node's pods' listeners included) before any
/// function sees a request. Each has a metric: `shoal_connections_open`
/// and `shoal_connections_closed_total{reason}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontDoor {
    /// Time a client has to send a whole request head, from the moment the
    /// host waits for one: on a new connection, and on an idle keep-alive
    /// connection between requests (so it is also the idle timeout).
    pub header_read_timeout: Duration,
    /// Connections open at once, across all listeners; one past it is
    /// accepted and closed at once.
    pub max_connections: usize,
    /// Largest request head (request line and headers), in bytes; past it
    /// the client gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in one request; past it the client gets 431.
    pub max_headers: usize,
}

impl Default for FrontDoor {
    fn default() -> Self {
        FrontDoor {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_header_bytes: 64 << 10,
            max_headers: 100,
        }
    }
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
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            admin_socket: None,
            state_dir: None,
            engine: EngineOptions::default(),
            log_sink: Arc::new(TracingSink),
            drain_timeout: Duration::from_secs(30),
            keyvalue: Backend::Embedded,
            pubsub: Backend::Embedded,
            secrets_dir: None,
            persist_functions: true,
            front_door: FrontDoor::default(),
            ledger: LedgerPolicy::default(),
            kv_bytes_per_tenant: Some(DEFAULT_KV_BYTES_PER_TENANT),
            peers: None,
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
    services: Arc<Services>,
    front_door: FrontDoor,
    connection_slots: Arc<Semaphore>,
    ready: AtomicBool,
    queue_budgets: Arc<QueueBudgets>,
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

    /// The metrics (clone the `Arc` for what outlives a borrow of the host).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The usage ledger, when the host has a state directory.
    pub fn ledger(&self) -> Option<&Arc<Ledger>> {
        self.ledger.as_ref()
    }

    /// The Runtime ABI's backends.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// Each tenant's budget of undelivered message bytes (the broker's).
    pub fn queue_budgets(&self) -> &Arc<QueueBudgets> {
        &self.queue_budgets
    }

    /// The limits every HTTP listener enforces.
    pub fn front_door(&self) -> &FrontDoor {
        &self.front_door
    }

    /// One connection slot, if any is free (see [`FrontDoor::max_connections`]).
    pub fn connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.connection_slots.clone().try_acquire_owned().ok()
    }

    /// Whether persisted functions are restored and listeners are up.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Say whether the host is ready (the server does, once it serves, and
    /// takes it back when it begins to stop).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Build the state of a host from `config`: engine, backends (a Redis
    /// backend is connected here), registry (empty; see
    /// [`Registry::restore`]) and ledger. Nothing listens yet.
    pub async fn build(config: &HostConfig) -> Result<Arc<Host>, Error> {
        let mut engine_options = config.engine.clone();
        if let Some(dir) = &config.state_dir {
            std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
            if engine_options.cache_dir.is_none() {
                engine_options.cache_dir = Some(dir.join("cache"));
            }
        }
        let engine = WasmEngine::new(&engine_options)?;
        let metrics = Arc::new(Metrics::new());
        let queue_budgets = Arc::new(QueueBudgets::default());
        let (services, scratch) = build_services(config, metrics.clone(), queue_budgets.clone()).await?;
        if let Some(peers) = &config.peers {
            services.set_peers(peers.clone());
        }
        let loader = Loader::new(engine, services.clone())?;
        let ledger = match &config.state_dir {
            Some(dir) => {
                let path = dir.join("usage");
                Some(Arc::new(Ledger::open(&path, config.ledger).map_err(Error::io(&path))?))
            }
            None => None,
        };
        let registry = Registry::new(
            loader,
            metrics.clone(),
            config.log_sink.clone(),
            config.state_dir.clone().filter(|_| config.persist_functions),
            config.drain_timeout,
        )?;
        let host = Arc::new(Host {
            registry,
            dispatcher: Dispatcher::new(ledger.clone(), metrics.clone(), config.engine.limited_priority),
            metrics,
            ledger,
            services: services.clone(),
            front_door: config.front_door.clone(),
            connection_slots: Arc::new(Semaphore::new(config.front_door.max_connections)),
            ready: AtomicBool::new(false),
            queue_budgets,
            _scratch: scratch,
        });
        // The host runs what its functions invoke; a weak reference, so the
        // services (which the host owns) do not keep it alive.
        services.set_invoker(Arc::new(HostInvoker(Arc::downgrade(&host))));
        Ok(host)
    }
}

/// `invoke` from the ABI: the callee runs through the same dispatcher as
/// an HTTP request, with a version picked by weight.
struct HostInvoker(Weak<Host>);

#[async_trait::async_trait]
impl Invoker for HostInvoker {
    async fn invoke(
        &self,
        tenant: &TenantName,
        function: &str,
        request: http::Request<Bytes>,
        meta: RequestMeta,
    ) -> Result<Response<ShoalBody>, InvokeError> {
        let Some(host) = self.0.upgrade() else {
            return Err(InvokeError::Unavailable("the host is shutting down".to_string()));
        };
        let Some(target) = host.registry.by_service(tenant, function) else {
            return Err(InvokeError::NotFound(function.to_string()));
        };
        let request = request.map(|body| {
            http_body_util::Full::new(body)
                .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} })
        });
        Ok(host.dispatcher.dispatch_with(target.pick().clone(), request, meta).await)
    }

    fn serves(&self, tenant: &TenantName, function: &str) -> bool {
        self.0.upgrade().is_some_and(|host| host.registry.by_service(tenant, function).is_some())
    }
}

async fn build_services(
    config: &HostConfig,
    metrics: Arc<Metrics>,
    queue_budgets: Arc<QueueBudgets>,
) -> Result<(Arc<Services>, Option<tempfile::TempDir>), Error> {
    let mut scratch = None;
    let breakers = Arc::new(Breakers::new());
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
            let kv = RedbKeyValue::open(&dir.join("kv.redb"), config.kv_bytes_per_tenant)
                .map_err(|err| Error::Internal(err.into()))?;
            Arc::new(kv)
        }
        Backend::Redis { url } => {
            let redis = Redis::connect(url)
                .await
                .map_err(|err| Error::Internal(err.into()))?
                .with_kv_quota(config.kv_bytes_per_tenant);
            let target = redis.target();
            Arc::new(Guarded::new(redis, &target, &breakers, Policy::BACKEND))
        }
    };
    let broker: Arc<dyn Broker> = match &config.pubsub {
        Backend::Embedded => {
            Arc::new(LocalBroker::with_budgets(DEFAULT_QUEUE_CAPACITY, DEFAULT_QUEUE_BYTES, queue_budgets))
        }
        Backend::Redis { url } => {
            let redis =
                Redis::connect(url).await.map_err(|err| Error::Internal(err.into()))?.with_queue_budgets(queue_budgets);
            let target = redis.target();
            Arc::new(Guarded::new(redis, &target, &breakers, Policy::BACKEND))
        }
    };
    let secrets = SecretStore::new(config.secrets_dir.clone());
    Ok((Services::new(kv, broker, secrets, metrics, breakers), scratch))
}
