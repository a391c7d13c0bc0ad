//! The instances of one function version: created on demand, reused warm,
//! destroyed when idle, drained when the version is replaced.
//!
//! Lifecycle of an instance:
//! `acquire` (no idle instance: instantiate + `start`) → serve → `release`
//! (back to the idle list, most recent first) → … → idle past
//! `idle_timeout` (or drain, or shutdown): `destroy` → dropped, its memory
//! slot decommitted. An instance whose call failed is dropped at once,
//! without `destroy`. An instance that has served the function's
//! `max_requests_per_instance` is retired like an idle one: `destroy`, then
//! dropped.
//!
//! Concurrency is bounded by a semaphore of `max_concurrency` permits
//! (never more than the engine's per-function instance share, so one
//! function cannot hold every slot of the engine), then by the tenant's
//! busy-instance allowance (shared by all its functions), and a new
//! instance needs one of the engine's slots: when none is free, the least
//! recently used idle instance of any function gives its slot up (see
//! [`crate::engine::InstanceSlots`]). A
//! request waits for all of them at most `queue_timeout`, then gets
//! [`AcquireError::Overloaded`] (503 with `Retry-After`): the wait queue is
//! bounded by time, never unbounded. No lock is held across a guest call.
//!
//! Instances of a function whose requests may share an instance
//! (`instance_concurrency` > 1: a WASI 0.3 HTTP handler) are driven by a
//! task of their own ([`SharedInstance`]) and leased to up to that many
//! requests at once: a request joins the busiest instance with room, and a
//! new one is made only when every live one is full. Such an instance is
//! idle when no request is in it; it retires (after its last request) when
//! it has served `max_requests_per_instance`, when its code was replaced,
//! or when a request of it failed, and then takes no new request.
//!
//! A paused pool (a container paused through containerd) takes no new
//! request: requests wait for it to resume, within the same
//! `queue_timeout`, then get [`AcquireError::Paused`]. Requests already
//! served run to their end.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::abi::bindings::exports::shoal::runtime::events;
use crate::engine::IdleInstances;
use crate::function::CompiledFunction;
use crate::instance::{Declined, Instance, InstanceError, ResponseResult, SharedInstance};
use crate::metering::CallStats;
use crate::metrics::Metrics;
use crate::request::RequestMeta;

/// Instances of one function version.
pub struct FunctionPool {
    function: CompiledFunction,
    /// Requests served at once: `max_concurrency`, within the engine's
    /// per-function instance share.
    concurrency: usize,
    idle: Mutex<Vec<Instance>>,
    /// Requests one instance serves at once (its `instance_concurrency`).
    per_instance: usize,
    /// The instances requests share (when `per_instance` > 1).
    shared: Mutex<Vec<Shared>>,
    /// Held while a shared instance is made: a burst of requests waits for
    /// the instance being made instead of making one each.
    making: tokio::sync::Mutex<()>,
    slots: Arc<Semaphore>,
    /// The busy-instance allowance of the function's tenant.
    tenant: Arc<Semaphore>,
    live: AtomicUsize,
    busy: AtomicUsize,
    draining: AtomicBool,
    discarded: AtomicBool,
    /// Linear memory of the last instance released (an estimate for busy ones).
    last_memory: std::sync::atomic::AtomicU64,
    changed: Notify,
    /// Told when an instance is made (the idle reaper sleeps while no
    /// pool has one).
    made: Arc<Notify>,
    metrics: Arc<Metrics>,
    /// Whether new requests must wait (see the module docs).
    paused: tokio::sync::watch::Sender<bool>,
}

/// A shared instance and its requests.
struct Shared {
    instance: Arc<SharedInstance>,
    /// Requests in it now.
    in_flight: usize,
    /// Requests it has served.
    served: u32,
    /// When its last request ended (or it was made).
    last_used: Instant,
    /// Takes no new request; stops when the last one in it ends.
    retiring: bool,
    /// The code it was made of (replaced code retires it).
    code: Arc<crate::function::Code>,
}

/// A request counted busy from the moment it has its permits until it
/// holds a lease (whose drop counts it back): dropped before that — an
/// error, or the request's future dropped while it waits — it counts
/// itself back, so `drain` never waits for a request that is gone.
struct BusyClaim<'a> {
    pool: &'a FunctionPool,
    held: bool,
}

impl<'a> BusyClaim<'a> {
    fn new(pool: &'a FunctionPool) -> BusyClaim<'a> {
        pool.busy.fetch_add(1, Ordering::AcqRel);
        BusyClaim { pool, held: true }
    }

    /// A lease took the count over.
    fn keep(mut self) {
        self.held = false;
    }
}

impl Drop for BusyClaim<'_> {
    fn drop(&mut self) {
        if self.held {
            self.pool.busy.fetch_sub(1, Ordering::AcqRel);
            self.pool.changed.notify_waiters();
        }
    }
}

/// What a lease holds.
enum Held {
    /// An instance of its own.
    Own(Option<Instance>),
    /// A place in a shared instance.
    Shared(Arc<SharedInstance>),
}

/// An instance checked out of its pool for one request. Dropping the lease
/// gives the instance back: to the idle list if the call left it healthy
/// ([`Lease::set_healthy`]), otherwise it is dropped without `destroy`. So
/// a call that panics, or a task that is aborted, can never leak a busy
/// slot, and never hands a half-used instance to the next request. (A
/// lease of a shared instance gives its place back; an unhealthy one
/// retires the instance.)
pub struct Lease {
    pool: Arc<FunctionPool>,
    held: Held,
    /// Whether it was created for this request.
    pub cold: bool,
    /// Time spent instantiating and running `start` (cold leases only).
    pub init: Option<Duration>,
    healthy: bool,
    // Dropped after `drop` has returned the instance: the slot frees last.
    _permit: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
}

impl Lease {
    /// Serve one HTTP request in the leased instance (see
    /// [`Instance::handle`]).
    ///
    /// Not an `async fn`: one would hold `request` once more, in every
    /// request's call future.
    pub fn handle<B>(
        &mut self,
        request: hyper::Request<B>,
        meta: &RequestMeta,
        respond: impl FnOnce(ResponseResult) + Send + Sync + 'static,
    ) -> impl Future<Output = (CallStats, Result<(), InstanceError>)> + Send
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        use futures_util::future::Either;
        match &mut self.held {
            Held::Own(instance) => {
                let instance = instance.as_mut().expect("invariant: a lease holds its instance until it is dropped");
                // Boxed: a call into wasm is a future of kilobytes, and
                // without the box every future awaiting this one (the
                // request's call, for a shared instance too) would be as
                // large, and copied whole each time it is moved (into its
                // box, for one).
                Either::Left(Box::pin(instance.handle(request, meta, respond)))
            }
            Held::Shared(shared) => Either::Right(shared.handle(request, meta, respond)),
        }
    }

    /// Deliver one message to the leased instance (see
    /// [`Instance::deliver`]).
    pub async fn deliver(
        &mut self,
        message: events::Message,
        meta: &RequestMeta,
    ) -> (CallStats, Result<Result<(), Declined>, InstanceError>) {
        match &mut self.held {
            Held::Own(instance) => {
                let instance = instance.as_mut().expect("invariant: a lease holds its instance until it is dropped");
                instance.deliver(message, meta).await
            }
            Held::Shared(shared) => shared.deliver(message, meta).await,
        }
    }

    /// The function version the instance belongs to.
    pub fn function(&self) -> &CompiledFunction {
        &self.pool.function
    }

    /// Whether the instance is shared with other requests (WASI 0.3).
    pub fn is_shared(&self) -> bool {
        matches!(self.held, Held::Shared(_))
    }

    /// Whether the instance may serve again when the lease is dropped
    /// (a lease starts out unhealthy: only a call that ended cleanly says so).
    pub fn set_healthy(&mut self, healthy: bool) {
        self.healthy = healthy;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        match &mut self.held {
            Held::Own(instance) => {
                if let Some(instance) = instance.take() {
                    self.pool.release(instance, self.healthy);
                }
            }
            Held::Shared(shared) => {
                let shared = shared.clone();
                self.pool.release_shared(&shared, self.healthy);
            }
        }
    }
}

/// Why no instance could be had.
#[derive(Debug, Clone)]
pub enum AcquireError {
    /// Every concurrency slot stayed busy for `queue_timeout`.
    Overloaded {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// The function stayed paused for `queue_timeout`.
    Paused {
        /// Suggested wait before retrying.
        retry_after: Duration,
    },
    /// A new instance failed to instantiate or start.
    Start(InstanceError),
}

/// A snapshot of a pool's counters.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct PoolStats {
    /// Instances alive (idle or busy).
    pub live: usize,
    /// Instances waiting for work.
    pub idle: usize,
    /// Requests being served.
    pub busy: usize,
}

impl FunctionPool {
    /// An empty pool (zero instances) for `function`; `made` is told each
    /// time it makes an instance.
    pub fn new(function: CompiledFunction, metrics: Arc<Metrics>, made: Arc<Notify>) -> Arc<FunctionPool> {
        // A function's concurrency is its own limit, within its share of
        // the engine's instance slots.
        let permits = function.spec().limits.max_concurrency.get().min(function.engine.instance_share()) as usize;
        let per_instance = function.instance_concurrency() as usize;
        let tenant = function.engine.slots().tenant(function.spec().tenant.as_str());
        let pool = Arc::new(FunctionPool {
            concurrency: permits,
            tenant,
            function,
            idle: Mutex::new(Vec::new()),
            per_instance,
            shared: Mutex::new(Vec::new()),
            making: tokio::sync::Mutex::new(()),
            slots: Arc::new(Semaphore::new(permits)),
            live: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            discarded: AtomicBool::new(false),
            last_memory: std::sync::atomic::AtomicU64::new(0),
            changed: Notify::new(),
            made,
            metrics,
            paused: tokio::sync::watch::Sender::new(false),
        });
        let holder: std::sync::Weak<dyn IdleInstances> = Arc::downgrade(&pool) as _;
        pool.function.engine.slots().register(holder);
        pool
    }

    /// Stop taking new requests (they wait, up to `queue_timeout`), or
    /// take them again.
    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    /// Whether the pool is paused.
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// How many requests it serves at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The function version this pool runs.
    pub fn function(&self) -> &CompiledFunction {
        &self.function
    }

    /// Counters right now.
    pub fn stats(&self) -> PoolStats {
        let shared_idle = self.lock_shared().iter().filter(|shared| shared.in_flight == 0).count();
        PoolStats {
            live: self.live.load(Ordering::Acquire),
            idle: self.lock_idle().len() + shared_idle,
            busy: self.busy.load(Ordering::Acquire),
        }
    }

    /// Linear memory held by this pool's instances: exact for idle ones,
    /// the last released instance's size for each busy one (a shared
    /// instance's when its last request ended).
    pub fn resident_bytes(&self) -> u64 {
        if self.per_instance > 1 {
            return self.lock_shared().iter().map(|shared| shared.instance.memory_bytes()).sum();
        }
        let idle: u64 = self.lock_idle().iter().map(Instance::memory_bytes).sum();
        idle + self.busy.load(Ordering::Acquire) as u64 * self.last_memory.load(Ordering::Relaxed)
    }

    /// Take an idle instance, or create one, within the concurrency limit.
    /// A shared instance made now is driven on `runtime`.
    pub async fn acquire(self: &Arc<Self>, runtime: &tokio::runtime::Handle) -> Result<Lease, AcquireError> {
        let limits = &self.function.spec().limits;
        // The whole wait, for a resume and then for a slot, is bounded.
        let deadline = tokio::time::Instant::now() + limits.queue_timeout;
        let retry_after = limits.queue_timeout.max(Duration::from_secs(1));
        if self.is_paused() {
            let mut resumed = self.paused.subscribe();
            let resume = async move { resumed.wait_for(|paused| !*paused).await.map(drop) };
            if !matches!(tokio::time::timeout_at(deadline, resume).await, Ok(Ok(()))) {
                return Err(AcquireError::Paused { retry_after });
            }
        }
        // Timed out, or the semaphore was closed (cannot happen: it never is).
        let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await else {
            return Err(AcquireError::Overloaded { retry_after });
        };
        let Ok(Ok(tenant)) = tokio::time::timeout_at(deadline, self.tenant.clone().acquire_owned()).await else {
            return Err(AcquireError::Overloaded { retry_after });
        };
        let permits = (permit, tenant);
        let claim = BusyClaim::new(self);
        if self.per_instance > 1 {
            return self.acquire_shared(runtime, deadline, retry_after, permits, claim).await;
        }
        loop {
            let Some(instance) = self.lock_idle().pop() else { break };
            if instance.runs_current_code() {
                claim.keep();
                return Ok(self.lease(Held::Own(Some(instance)), false, None, permits));
            }
            // Made of baseline code that optimized code has replaced.
            self.destroy_later(instance);
        }
        let Some(slot) = self.function.engine.slots().acquire(deadline).await else {
            return Err(AcquireError::Overloaded { retry_after });
        };
        let started = Instant::now();
        // Boxed: making an instance is a future of kilobytes, and inline it
        // would make every request's future as large (copied whole each
        // time hyper moves it), for the few requests that make one.
        match Box::pin(Instance::create(&self.function, slot)).await {
            Ok((instance, _stats)) => {
                self.add_live(1);
                claim.keep();
                Ok(self.lease(Held::Own(Some(instance)), true, Some(started.elapsed()), permits))
            }
            Err(error) => {
                tracing::warn!(function = self.function.name(), error = %error.message, "instance failed to start");
                Err(AcquireError::Start(error))
            }
        }
    }

    /// A place in the busiest shared instance with room, or in a new one.
    async fn acquire_shared(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        deadline: tokio::time::Instant,
        retry_after: Duration,
        permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
        claim: BusyClaim<'_>,
    ) -> Result<Lease, AcquireError> {
        // Instances are made one at a time. While waiting for the turn, a
        // place that frees in a live instance is taken instead (the pool
        // says when a request leaves one).
        let mut permits = permits;
        let _making = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            permits = match self.join_shared(permits) {
                Ok(lease) => {
                    claim.keep();
                    return Ok(lease);
                }
                Err(permits) => permits,
            };
            tokio::select! {
                making = self.making.lock() => break making,
                () = &mut changed => {}
                () = tokio::time::sleep_until(deadline) => return Err(AcquireError::Overloaded { retry_after }),
            }
        };
        // Another instance may have been made meanwhile.
        let permits = match self.join_shared(permits) {
            Ok(lease) => {
                claim.keep();
                return Ok(lease);
            }
            Err(permits) => permits,
        };
        let Some(slot) = self.function.engine.slots().acquire(deadline).await else {
            return Err(AcquireError::Overloaded { retry_after });
        };
        let started = Instant::now();
        // Boxed, as in [`FunctionPool::acquire`].
        let created = match Box::pin(Instance::create(&self.function, slot)).await {
            Ok((instance, _stats)) => {
                let code = instance.code_arc();
                let pool = self.clone();
                SharedInstance::drive(instance, runtime, move |ended| pool.shared_ended(ended))
                    .map(|shared| (shared, code))
            }
            Err(error) => Err(error),
        };
        match created {
            Ok((instance, code)) => {
                self.add_live(1);
                self.lock_shared().push(Shared {
                    instance: instance.clone(),
                    in_flight: 1,
                    served: 0,
                    last_used: Instant::now(),
                    retiring: false,
                    code,
                });
                claim.keep();
                Ok(self.lease(Held::Shared(instance), true, Some(started.elapsed()), permits))
            }
            Err(error) => {
                tracing::warn!(function = self.function.name(), error = %error.message, "instance failed to start");
                Err(AcquireError::Start(error))
            }
        }
    }

    /// A place in the busiest live shared instance with room, if any
    /// (else the permits back).
    fn join_shared(
        self: &Arc<Self>,
        permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) -> Result<Lease, (OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let mut list = self.lock_shared();
        for shared in list.iter_mut() {
            if !shared.instance.is_healthy() || !self.function.is_current(&shared.code) {
                shared.retiring = true;
            }
        }
        let roomy = list
            .iter_mut()
            .filter(|shared| !shared.retiring && shared.in_flight < self.per_instance)
            .max_by_key(|shared| shared.in_flight)
            .map(|shared| {
                shared.in_flight += 1;
                shared.instance.clone()
            });
        let stopped = self.stop_retired(&mut list);
        drop(list);
        self.stop_all(stopped);
        match roomy {
            Some(instance) => Ok(self.lease(Held::Shared(instance), false, None, permits)),
            None => Err(permits),
        }
    }

    /// A request left a shared instance.
    fn release_shared(self: &Arc<Self>, instance: &Arc<SharedInstance>, healthy: bool) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
        let most = self.function.spec().limits.max_requests_per_instance;
        let stopped = {
            let mut list = self.lock_shared();
            if let Some(shared) = list.iter_mut().find(|shared| Arc::ptr_eq(&shared.instance, instance)) {
                shared.in_flight = shared.in_flight.saturating_sub(1);
                shared.served = shared.served.saturating_add(1);
                shared.last_used = Instant::now();
                let worn = most.is_some_and(|most| shared.served >= most.get());
                if !healthy || !instance.is_healthy() || worn || self.draining.load(Ordering::Acquire) {
                    shared.retiring = true;
                }
            }
            self.stop_retired(&mut list)
        };
        self.stop_all(stopped);
        self.changed.notify_waiters();
    }

    /// Take the retired (or failed) shared instances no request is in out
    /// of `list`.
    fn stop_retired(&self, list: &mut Vec<Shared>) -> Vec<Arc<SharedInstance>> {
        let mut stopped = Vec::new();
        list.retain(|shared| {
            let done = (shared.retiring || !shared.instance.is_healthy()) && shared.in_flight == 0;
            if done {
                stopped.push(shared.instance.clone());
            }
            !done
        });
        stopped
    }

    /// Close shared instances: each driver ends and its instance is
    /// destroyed (or dropped, when it failed or the pool discards).
    fn stop_all(&self, stopped: Vec<Arc<SharedInstance>>) {
        for shared in stopped {
            shared.close();
        }
    }

    /// A shared instance's driver ended: `destroy` it, when it ended
    /// cleanly and the pool is not discarding, then count it gone.
    fn shared_ended(self: Arc<Self>, ended: Option<Instance>) {
        match ended {
            Some(instance) if !self.discarded.load(Ordering::Acquire) => self.destroy_later(instance),
            _ => {
                self.add_live(-1);
                self.changed.notify_waiters();
            }
        }
    }

    fn lease(
        self: &Arc<Self>,
        held: Held,
        cold: bool,
        init: Option<Duration>,
        (permit, tenant): (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) -> Lease {
        Lease { pool: self.clone(), held, cold, init, healthy: false, _permit: permit, _tenant: tenant }
    }

    /// Return an instance after a request (when its [`Lease`] drops). A
    /// `healthy` instance goes back to the idle list (or is destroyed if
    /// the pool drains or it has served `max_requests_per_instance`); an
    /// unhealthy one is dropped without `destroy`.
    fn release(self: &Arc<Self>, mut instance: Instance, healthy: bool) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
        self.last_memory.store(instance.memory_bytes(), Ordering::Relaxed);
        instance.served = instance.served.saturating_add(1);
        let retired =
            self.function.spec().limits.max_requests_per_instance.is_some_and(|most| instance.served >= most.get())
                || !instance.runs_current_code();
        if !healthy || self.discarded.load(Ordering::Acquire) {
            drop(instance);
            self.add_live(-1);
        } else if retired || self.draining.load(Ordering::Acquire) {
            self.destroy_later(instance);
        } else {
            self.lock_idle().push(instance);
        }
        self.changed.notify_waiters();
    }

    /// When the longest-idle instance passes its `idle_timeout`, if any.
    pub fn next_expiry(&self) -> Option<Instant> {
        let idle_timeout = self.function.spec().limits.idle_timeout;
        let shared =
            self.lock_shared().iter().filter(|shared| shared.in_flight == 0).map(|shared| shared.last_used).min();
        let own = self.lock_idle().first().map(|instance| instance.last_used);
        own.into_iter().chain(shared).min().map(|last_used| last_used + idle_timeout)
    }

    /// Whether it has any instance (idle or busy, being destroyed or not).
    pub fn has_instances(&self) -> bool {
        self.live.load(Ordering::Acquire) > 0
    }

    /// How long its instances may stay idle.
    pub fn idle_timeout(&self) -> Duration {
        self.function.spec().limits.idle_timeout
    }

    /// Destroy instances idle longer than the function's `idle_timeout`;
    /// returns how many.
    pub fn reap_idle(self: &Arc<Self>, now: Instant) -> usize {
        let idle_timeout = self.function.spec().limits.idle_timeout;
        let expired: Vec<Instance> = {
            let mut idle = self.lock_idle();
            // Oldest first: the list is in release order.
            let keep_from = idle
                .iter()
                .position(|instance| now.duration_since(instance.last_used) < idle_timeout)
                .unwrap_or(idle.len());
            idle.drain(..keep_from).collect()
        };
        let mut count = expired.len();
        for instance in expired {
            self.destroy_later(instance);
        }
        let stopped = {
            let mut list = self.lock_shared();
            for shared in list.iter_mut() {
                if shared.in_flight == 0 && now.duration_since(shared.last_used) >= idle_timeout {
                    shared.retiring = true;
                }
            }
            self.stop_retired(&mut list)
        };
        count += stopped.len();
        self.stop_all(stopped);
        count
    }

    /// Stop reusing instances: destroy the idle ones now and the busy ones
    /// as they finish, and wait (up to `timeout`) until none is left.
    /// Returns whether the pool emptied in time.
    pub async fn drain(self: &Arc<Self>, timeout: Duration) -> bool {
        self.draining.store(true, Ordering::Release);
        let idle: Vec<Instance> = std::mem::take(&mut *self.lock_idle());
        for instance in idle {
            self.destroy_later(instance);
        }
        self.retire_shared();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if self.live.load(Ordering::Acquire) == 0 && self.busy.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Stop at once (SIGKILL): idle instances are dropped without
    /// `destroy`, and so are busy ones when their request ends.
    pub fn discard(&self) {
        self.discarded.store(true, Ordering::Release);
        self.draining.store(true, Ordering::Release);
        let idle: Vec<Instance> = std::mem::take(&mut *self.lock_idle());
        self.add_live(-(idle.len() as isize));
        drop(idle);
        self.retire_shared();
        self.changed.notify_waiters();
    }

    /// Retire every shared instance: the idle ones stop now, the others
    /// after their last request.
    fn retire_shared(&self) {
        let stopped = {
            let mut list = self.lock_shared();
            for shared in list.iter_mut() {
                shared.retiring = true;
            }
            self.stop_retired(&mut list)
        };
        self.stop_all(stopped);
    }

    fn destroy_later(self: &Arc<Self>, instance: Instance) {
        let pool = self.clone();
        tokio::spawn(async move {
            if let Err(error) = instance.destroy().await {
                tracing::warn!(function = pool.function.name(), error = %error.message, "destroy hook failed");
            }
            pool.add_live(-1);
            pool.changed.notify_waiters();
        });
    }

    fn add_live(&self, delta: isize) {
        let live = if delta >= 0 {
            let live = self.live.fetch_add(delta as usize, Ordering::AcqRel) + delta as usize;
            if delta > 0 {
                // Made (and counted, which the reaper reads when woken): it
                // times the instance's idleness from now on.
                self.made.notify_one();
            }
            live
        } else {
            self.live.fetch_sub(delta.unsigned_abs(), Ordering::AcqRel) - delta.unsigned_abs()
        };
        self.metrics.set_instances(self.function.name(), self.function.version(), live);
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_shared(&self) -> std::sync::MutexGuard<'_, Vec<Shared>> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl IdleInstances for FunctionPool {
    fn oldest_idle(&self) -> Option<Instant> {
        // Release order: the first is the least recently used.
        let own = self.lock_idle().first().map(|instance| instance.last_used);
        let shared =
            self.lock_shared().iter().filter(|shared| shared.in_flight == 0).map(|shared| shared.last_used).min();
        own.into_iter().chain(shared).min()
    }

    fn reclaim_oldest(self: Arc<Self>) -> bool {
        if self.per_instance > 1 {
            let stopped = {
                let mut list = self.lock_shared();
                let oldest =
                    list.iter_mut().filter(|shared| shared.in_flight == 0).min_by_key(|shared| shared.last_used);
                let Some(oldest) = oldest else { return false };
                oldest.retiring = true;
                self.stop_retired(&mut list)
            };
            tracing::info!(function = self.function.name(), "idle instance reclaimed: every instance slot was taken");
            self.metrics.instance_reclaimed();
            self.stop_all(stopped);
            return true;
        }
        let oldest = {
            let mut idle = self.lock_idle();
            if idle.is_empty() { None } else { Some(idle.remove(0)) }
        };
        let Some(instance) = oldest else { return false };
        tracing::info!(function = self.function.name(), "idle instance reclaimed: every instance slot was taken");
        self.metrics.instance_reclaimed();
        self.destroy_later(instance);
        true
    }
}
