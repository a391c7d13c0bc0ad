//! The host side of the Runtime ABI: every import a function makes goes
//! through here and is checked against the function's [`Grants`] first.
//!
//! Deny by default: a call outside the grants returns the interface's error
//! value (`access-denied`, `denied(..)`, ...), never a trap, and is logged
//! with the function, the capability and the request id, and counted in
//! `shoal_abi_denied_total`. Sizes (keys, values, messages) and rates (ABI
//! calls and publishes per second, per function) are bounded the same way
//! (`shoal_abi_limited_total`). The caller's identity is the function the
//! instance belongs to — fixed when the instance is created — never
//! anything the guest says.
//!
//! The ABI owns its interfaces and depends on nothing above it:
//! - the host traits are implemented on an [`AbiCtxView`], the slice of a
//!   store's data that the ABI may touch (its [`AbiState`] and the resource
//!   table), which any store type offers through [`AbiView`];
//! - what it needs from the layers above — running another function for
//!   `invoke` — is the [`Invoker`] trait, which the host implements and
//!   hands over with [`Services::set_invoker`];
//! - outbound HTTP is checked by [`OutboundHttp`], the `wasi:http` hooks a
//!   store installs.
//!
//! Errors cross into the guest through bindgen's `trappable_error_type`:
//! an implementation returns [`KvError`], [`ConfigError`] or
//! [`ShoalError`], built from a WIT error value (the guest sees it) or from
//! a host failure with [`trap`] (the call traps).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use governor::{DefaultDirectRateLimiter, Quota};
use wasmtime::component::{HasData, Linker, ResourceTable};
use wasmtime_wasi::TrappableError;

use crate::backends::secrets::SecretStore;
use crate::backends::{Broker, KeyValue};
use crate::logs::InstanceLog;
use crate::manifest::{FunctionSpec, Grants, Limits, TenantName};
use crate::metrics::Metrics;
use crate::resilience::{Breakers, Policies};

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../abi/wit",
        world: "shoal:runtime/function",
        imports: { default: async | trappable },
        exports: { default: async },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::KvError,
            "wasi:config/store.error" => super::ConfigError,
            "shoal:runtime/types.error" => super::ShoalError,
        },
        with: {
            "wasi:keyvalue/store.bucket": super::BucketHandle,
        },
    });
}

/// The imports only WASI 0.3 guests (on engines with the component
/// model's concurrency) can call.
pub(crate) mod concurrent_bindings {
    wasmtime::component::bindgen!({
        path: "../abi/wit",
        world: "shoal:runtime/concurrent-imports",
        imports: { default: async | store | trappable },
        trappable_error_type: {
            "shoal:runtime/types.error" => super::ShoalError,
        },
        with: {
            "shoal:runtime/types": super::bindings::shoal::runtime::types,
        },
    });
}

mod config;
mod invoke;
mod keyvalue;
mod outbound;
mod pubsub;
mod secrets;
mod types;

pub use invoke::{INVOKE_PORT, InvokeError, Invoker};
pub use outbound::{Egress, OutboundHttp, node_addresses, special_kind};

/// The error of `wasi:keyvalue` calls: a WIT `error` value, or a trap.
pub type KvError = TrappableError<bindings::wasi::keyvalue::store::Error>;

/// The error of `wasi:config/store` calls: a WIT `error` value, or a trap.
pub type ConfigError = TrappableError<bindings::wasi::config::store::Error>;

/// The error of Shoal's own interfaces: a WIT `error` value, or a trap.
pub type ShoalError = TrappableError<bindings::shoal::runtime::types::Error>;

/// A host failure that must trap the guest's call (a bad resource handle,
/// say): never used for refusals, which are error values.
pub fn trap<T>(err: impl Into<wasmtime::Error>) -> TrappableError<T> {
    TrappableError::trap(err)
}

/// How deep `invoke` calls may nest (a cycle of invokes ends here).
pub const MAX_INVOKE_DEPTH: u32 = 8;

/// Keys returned by one `list-keys` page.
pub const LIST_PAGE: usize = 100;

/// An open key-value bucket, as the guest holds it.
pub struct BucketHandle {
    /// The name the guest opened.
    name: String,
    /// The name in the backend: scoped to the function's tenant.
    scoped: String,
}

/// What the ABI reaches, shared by every function of a host.
pub struct Services {
    pub(crate) kv: Arc<dyn KeyValue>,
    /// The broker (the event trigger subscribes through it).
    pub broker: Arc<dyn Broker>,
    pub(crate) secrets: SecretStore,
    pub(crate) metrics: Arc<Metrics>,
    invoker: OnceLock<Arc<dyn Invoker>>,
    /// Where each pod's function connects from (its pod's network
    /// namespace), by function name; functions not here connect from the
    /// host's.
    egress: std::sync::RwLock<std::collections::HashMap<String, Arc<Egress>>>,
    /// The circuit breakers and retry budgets of every function's calls.
    pub breakers: Arc<Breakers>,
    /// Other hosts whose functions this host's functions invoke (`shoal
    /// serve --peer`), and the token they share.
    peers: OnceLock<Peers>,
}

/// Hosts that serve each other's invokes without Kubernetes (`shoal serve
/// --peer`): a function not deployed here is called on them, by name,
/// with the token they share (a peer serves a call by name only with it).
#[derive(Clone)]
pub struct Peers {
    /// The peers' HTTP listeners, `host:port`.
    pub addrs: Vec<String>,
    /// The secret every peer was given.
    pub token: Arc<str>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("addrs", &self.addrs).field("token", &"<redacted>").finish()
    }
}

impl Peers {
    /// Whether `offered` is the shared token. Compared in constant time
    /// (for equal lengths), so a caller cannot learn it byte by byte from
    /// how long a refusal takes; hand-written, as it is four lines.
    pub fn accepts(&self, offered: &[u8]) -> bool {
        let token = self.token.as_bytes();
        token.len() == offered.len() && token.iter().zip(offered).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
    }
}

impl Services {
    /// Let go of the key-value store for good (a node host handing over
    /// to the next process: an embedded store allows one at a time).
    pub fn close_keyvalue(&self) -> Result<(), crate::backends::BackendError> {
        self.kv.close()
    }

    /// Backends, metrics and the breakers of every call beyond a
    /// function, for the ABI. `invoke` answers "unavailable"
    /// until [`Services::set_invoker`] is called.
    pub fn new(
        kv: Arc<dyn KeyValue>,
        broker: Arc<dyn Broker>,
        secrets: SecretStore,
        metrics: Arc<Metrics>,
        breakers: Arc<Breakers>,
    ) -> Arc<Services> {
        metrics.watch_breakers(breakers.clone());
        Arc::new(Services {
            kv,
            broker,
            secrets,
            metrics,
            invoker: OnceLock::new(),
            egress: Default::default(),
            breakers,
            peers: OnceLock::new(),
        })
    }

    /// Make `function`'s outbound connections through `egress` (its pod's
    /// network namespace), or from the host again with `None`.
    pub fn set_egress(&self, function: &str, egress: Option<Arc<Egress>>) {
        let mut map = self.egress.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        match egress {
            Some(egress) => map.insert(function.to_string(), egress),
            None => map.remove(function),
        };
    }

    /// Set the host's peers (once, when it is built).
    pub fn set_peers(&self, peers: Peers) {
        let _ = self.peers.set(peers);
    }

    /// The host's peers, if it has any.
    pub fn peers(&self) -> Option<&Peers> {
        self.peers.get()
    }

    fn egress(&self, function: &str) -> Option<Arc<Egress>> {
        self.egress.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(function).cloned()
    }

    /// Name who runs the functions that `invoke` calls. Called once, by
    /// the host that owns these services, when it is built; later calls
    /// are ignored.
    pub fn set_invoker(&self, invoker: Arc<dyn Invoker>) {
        let _ = self.invoker.set(invoker);
    }

    fn invoker(&self) -> Option<&Arc<dyn Invoker>> {
        self.invoker.get()
    }
}

/// Refusal log lines (denied or limited calls) per second per function,
/// past which lines are suppressed and counted (every refusal is still
/// counted in the metrics): a guest refused in a loop costs the node a
/// bounded amount of log.
pub const REFUSAL_LOG_LINES_PER_SECOND: u32 = 20;

/// A function version's grants and rate limiters, shared by its instances.
pub struct FunctionCaps {
    pub(crate) name: Arc<str>,
    pub(crate) tenant: TenantName,
    pub(crate) grants: Grants,
    pub(crate) env: std::collections::BTreeMap<String, String>,
    /// Whether secrets come from the pod's Secret volumes (a function a
    /// pod made) rather than the host's secret store.
    pub(crate) pod_secrets: bool,
    pub(crate) limits: Limits,
    /// Timeouts, retries and breakers of its calls beyond itself.
    pub(crate) resilience: Policies,
    calls: DefaultDirectRateLimiter,
    publishes: DefaultDirectRateLimiter,
    refusal_log: DefaultDirectRateLimiter,
    /// Refusal lines suppressed since the last one logged.
    suppressed: std::sync::atomic::AtomicU64,
}

impl FunctionCaps {
    /// The capabilities of `spec`.
    pub fn new(spec: &FunctionSpec) -> Arc<FunctionCaps> {
        let per_second = |n: NonZeroU32| Quota::per_second(n);
        Arc::new(FunctionCaps {
            name: Arc::from(spec.name.as_str()),
            tenant: spec.tenant.clone(),
            grants: spec.grants.clone(),
            env: spec.env.clone(),
            pod_secrets: spec.pod.is_some(),
            limits: spec.limits.clone(),
            resilience: Policies::with(
                spec.limits.invoke_timeout,
                spec.limits.call_retries,
                spec.limits.breaker_failures.get(),
                spec.limits.breaker_cooldown,
            ),
            calls: DefaultDirectRateLimiter::direct(per_second(spec.limits.abi_calls_per_second)),
            publishes: DefaultDirectRateLimiter::direct(per_second(spec.limits.publish_per_second)),
            refusal_log: DefaultDirectRateLimiter::direct(per_second(
                NonZeroU32::new(REFUSAL_LOG_LINES_PER_SECOND).expect("invariant: not zero"),
            )),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Whether a refusal may be logged now: `Some(n)` with the lines
    /// suppressed before it, or `None` (suppressed and counted).
    fn may_log_refusal(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        if self.refusal_log.check().is_ok() {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// The ABI state of one instance.
pub struct AbiState {
    caps: Arc<FunctionCaps>,
    services: Arc<Services>,
    log: Arc<InstanceLog>,
    /// Nesting depth of the request being served (0: from a trigger).
    depth: u32,
    /// Nested calls made during the current request (names child ids):
    /// shared with its invokes under way, which may outlive a switch of
    /// the store to another request (a WASI 0.3 instance's).
    invokes: Arc<AtomicU32>,
}

impl AbiState {
    /// The state of a new instance of the function `caps` describes, whose
    /// output (and current request id) is `log`.
    pub fn new(caps: Arc<FunctionCaps>, services: Arc<Services>, log: Arc<InstanceLog>) -> AbiState {
        AbiState { caps, services, log, depth: 0, invokes: Arc::default() }
    }

    /// A new request begins, at nesting depth `depth`.
    pub fn begin_request(&mut self, depth: u32) {
        self.depth = depth;
        if Arc::strong_count(&self.invokes) == 1 {
            self.invokes.store(0, Ordering::Relaxed);
        } else {
            // An invoke of the last request still holds its counter.
            self.invokes = Arc::default();
        }
    }

    /// The request's nesting depth and the count of its invokes.
    pub(crate) fn context(&self) -> (u32, Arc<AtomicU32>) {
        (self.depth, self.invokes.clone())
    }

    /// Load a request's nesting depth and invoke count.
    pub(crate) fn set_context(&mut self, depth: u32, invokes: Arc<AtomicU32>) {
        self.depth = depth;
        self.invokes = invokes;
    }

    /// The request being served, as an invoke under way needs it whatever
    /// the store serves meanwhile.
    fn caller(&self) -> Caller {
        Caller {
            caps: self.caps.clone(),
            services: self.services.clone(),
            request_id: self.request_id(),
            trace: self.trace(),
            depth: self.depth,
            invokes: self.invokes.clone(),
        }
    }

    fn request_id(&self) -> Option<Arc<str>> {
        self.log.request_id()
    }

    /// The trace of the request being served (a new one outside a request,
    /// e.g. in `start`).
    fn trace(&self) -> crate::request::TraceContext {
        self.log.trace().unwrap_or_else(crate::request::TraceContext::start)
    }

    /// Count the call against the function's ABI rate.
    fn admit(&self, capability: &'static str) -> Result<(), Refusal> {
        if self.caps.calls.check().is_err() {
            return Err(self.limited(
                capability,
                format!("over abi_calls_per_second = {}", self.caps.limits.abi_calls_per_second),
            ));
        }
        Ok(())
    }

    /// Count the publish against the function's publish rate.
    fn admit_publish(&self) -> Result<(), Refusal> {
        if self.caps.publishes.check().is_err() {
            return Err(self.limited(
                "pubsub.publish",
                format!("over publish_per_second = {}", self.caps.limits.publish_per_second),
            ));
        }
        Ok(())
    }

    /// Log and count a denial; the message for the guest.
    fn deny(&self, capability: &'static str, what: String) -> Refusal {
        log_denial(&self.caps, &self.services, self.request_id().as_deref(), capability, &what);
        Refusal::Denied(format!("function {:?} is not granted {what}", &*self.caps.name))
    }

    /// Log and count a size or rate limit; the message for the guest.
    fn limited(&self, capability: &'static str, what: String) -> Refusal {
        log_limited(&self.caps, &self.services, self.request_id().as_deref(), capability, &what);
        Refusal::Limited(format!("{capability}: {what}"))
    }

    /// Refuse `bytes` longer than `limit` (field named `field`).
    fn check_size(
        &self,
        capability: &'static str,
        what: &str,
        bytes: usize,
        field: &str,
        limit: usize,
    ) -> Result<(), Refusal> {
        if bytes > limit {
            return Err(self.limited(capability, format!("{what} of {bytes} bytes is over {field} = {limit}")));
        }
        Ok(())
    }
}

/// What a call made for a request needs of it, taken when the call
/// starts: the function's capabilities and services, the request's id,
/// trace and depth, and the count of its invokes.
pub(crate) struct Caller {
    caps: Arc<FunctionCaps>,
    services: Arc<Services>,
    request_id: Option<Arc<str>>,
    trace: crate::request::TraceContext,
    depth: u32,
    invokes: Arc<AtomicU32>,
}

impl Caller {
    /// Log and count a size or rate limit; the message for the guest.
    fn limited(&self, capability: &'static str, what: String) -> Refusal {
        log_limited(&self.caps, &self.services, self.request_id.as_deref(), capability, &what);
        Refusal::Limited(format!("{capability}: {what}"))
    }
}

/// The log line and the count of one call over a size or rate limit.
fn log_limited(caps: &FunctionCaps, services: &Services, request_id: Option<&str>, capability: &str, what: &str) {
    let function = &*caps.name;
    if let Some(suppressed) = caps.may_log_refusal() {
        let (tenant, request_id) = (caps.tenant.as_str(), request_id.unwrap_or("-"));
        tracing::warn!(tenant, function, capability, request_id, suppressed, "limited: {what}");
    }
    services.metrics.abi_limited(function, capability);
}

/// The log line and the count of one denied call.
fn log_denial(caps: &FunctionCaps, services: &Services, request_id: Option<&str>, capability: &str, what: &str) {
    let function = &*caps.name;
    if let Some(suppressed) = caps.may_log_refusal() {
        let (tenant, request_id) = (caps.tenant.as_str(), request_id.unwrap_or("-"));
        tracing::warn!(tenant, function, capability, request_id, suppressed, "denied: {what}");
    }
    services.metrics.abi_denied(function, capability);
}

/// What the ABI's host traits see of a store: the instance's ABI state and
/// the resource table (where open buckets live).
pub struct AbiCtxView<'a> {
    /// The instance's ABI state.
    pub state: &'a mut AbiState,
    /// The store's resource table.
    pub table: &'a mut ResourceTable,
}

/// A store's data that offers the Runtime ABI.
pub trait AbiView {
    /// The ABI's view of this store.
    fn abi(&mut self) -> AbiCtxView<'_>;
}

/// Selects [`AbiCtxView`] as the data the ABI's bindings work on.
struct Abi;

impl HasData for Abi {
    type Data<'a> = AbiCtxView<'a>;
}

/// Why a checked call may not proceed.
pub(crate) enum Refusal {
    /// Not granted.
    Denied(String),
    /// Over a size or rate limit.
    Limited(String),
}

/// Add the Runtime ABI imports to a linker whose stores offer the ABI.
pub fn add_to_linker<T: AbiView + Send + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use bindings::shoal::runtime::{invoke, pubsub, secrets, types};
    use bindings::wasi::config::store as config;
    use bindings::wasi::keyvalue::{atomics, store};
    store::add_to_linker::<T, Abi>(linker, T::abi)?;
    atomics::add_to_linker::<T, Abi>(linker, T::abi)?;
    config::add_to_linker::<T, Abi>(linker, T::abi)?;
    pubsub::add_to_linker::<T, Abi>(linker, T::abi)?;
    invoke::add_to_linker::<T, Abi>(linker, T::abi)?;
    secrets::add_to_linker::<T, Abi>(linker, T::abi)?;
    types::add_to_linker::<T, Abi>(linker, T::abi)?;
    Ok(())
}

/// Add the imports only WASI 0.3 guests call (the async forms of
/// key-value, publish, secrets and invoke) to a linker of an engine with
/// the component model's concurrency.
pub fn add_concurrent_to_linker<T: AbiView + Send + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use concurrent_bindings::shoal::runtime::{invoke_async, keyvalue_async, pubsub_async, secrets_async};
    keyvalue_async::add_to_linker::<T, Abi>(linker, T::abi)?;
    pubsub_async::add_to_linker::<T, Abi>(linker, T::abi)?;
    secrets_async::add_to_linker::<T, Abi>(linker, T::abi)?;
    invoke_async::add_to_linker::<T, Abi>(linker, T::abi)
}
