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
//! A paused pool (a container paused through containerd) takes no new
//! request: requests wait for it to resume, within the same
//! `queue_timeout`, then get [`AcquireError::Paused`]. Requests already
//! served run to their end.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::engine::IdleInstances;
use crate::function::CompiledFunction;
use crate::instance::{Instance, InstanceError};
use crate::metrics::Metrics;

/// Instances of one function version.
pub struct FunctionPool {
    function: CompiledFunction,
    /// Requests served at once: `max_concurrency`, within the engine's
    /// per-function instance share.
    concurrency: usize,
    idle: Mutex<Vec<Instance>>,
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
    metrics: Arc<Metrics>,
    /// Whether new requests must wait (see the module docs).
    paused: tokio::sync::watch::Sender<bool>,
}

/// An instance checked out of its pool for one request. Dropping the lease
/// gives the instance back: to the idle list if the call left it healthy
/// ([`Lease::set_healthy`]), otherwise it is dropped without `destroy`. So
/// a call that panics, or a task that is aborted, can never leak a busy
/// slot, and never hands a half-used instance to the next request.
pub struct Lease {
    pool: Arc<FunctionPool>,
    instance: Option<Instance>,
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
    /// The leased instance.
    pub fn instance(&mut self) -> &mut Instance {
        self.instance.as_mut().expect("invariant: a lease holds its instance until it is dropped")
    }

    /// The function version the instance belongs to.
    pub fn function(&self) -> &CompiledFunction {
        &self.pool.function
    }

    /// Whether the instance may serve again when the lease is dropped
    /// (a lease starts out unhealthy: only a call that ended cleanly says so).
    pub fn set_healthy(&mut self, healthy: bool) {
        self.healthy = healthy;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            self.pool.release(instance, self.healthy);
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
    /// An empty pool (zero instances) for `function`.
    pub fn new(function: CompiledFunction, metrics: Arc<Metrics>) -> Arc<FunctionPool> {
        // A function's concurrency is its own limit, within its share of
        // the engine's instance slots.
        let permits = function.spec().limits.max_concurrency.get().min(function.engine.instance_share()) as usize;
        let tenant = function.engine.slots().tenant(function.spec().tenant.as_str());
        let pool = Arc::new(FunctionPool {
            concurrency: permits,
            tenant,
            function,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(permits)),
            live: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            discarded: AtomicBool::new(false),
            last_memory: std::sync::atomic::AtomicU64::new(0),
            changed: Notify::new(),
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
        PoolStats {
            live: self.live.load(Ordering::Acquire),
            idle: self.lock_idle().len(),
            busy: self.busy.load(Ordering::Acquire),
        }
    }

    /// Linear memory held by this pool's instances: exact for idle ones,
    /// the last released instance's size for each busy one.
    pub fn resident_bytes(&self) -> u64 {
        let idle: u64 = self.lock_idle().iter().map(Instance::memory_bytes).sum();
        idle + self.busy.load(Ordering::Acquire) as u64 * self.last_memory.load(Ordering::Relaxed)
    }

    /// Take an idle instance, or create one, within the concurrency limit.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, AcquireError> {
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
        self.busy.fetch_add(1, Ordering::AcqRel);
        loop {
            let Some(instance) = self.lock_idle().pop() else { break };
            if instance.runs_current_code() {
                return Ok(self.lease(instance, false, None, permits));
            }
            // Made of baseline code that optimized code has replaced.
            self.destroy_later(instance);
        }
        let Some(slot) = self.function.engine.slots().acquire(deadline).await else {
            self.busy.fetch_sub(1, Ordering::AcqRel);
            self.changed.notify_waiters();
            return Err(AcquireError::Overloaded { retry_after });
        };
        let started = Instant::now();
        match Instance::create(&self.function, slot).await {
            Ok((instance, _stats)) => {
                self.add_live(1);
                Ok(self.lease(instance, true, Some(started.elapsed()), permits))
            }
            Err(error) => {
                self.busy.fetch_sub(1, Ordering::AcqRel);
                self.changed.notify_waiters();
                tracing::warn!(function = self.function.name(), error = %error.message, "instance failed to start");
                Err(AcquireError::Start(error))
            }
        }
    }

    fn lease(
        self: &Arc<Self>,
        instance: Instance,
        cold: bool,
        init: Option<Duration>,
        (permit, tenant): (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) -> Lease {
        Lease {
            pool: self.clone(),
            instance: Some(instance),
            cold,
            init,
            healthy: false,
            _permit: permit,
            _tenant: tenant,
        }
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
        self.lock_idle().first().map(|instance| instance.last_used + idle_timeout)
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
        let count = expired.len();
        for instance in expired {
            self.destroy_later(instance);
        }
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
        self.changed.notify_waiters();
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
            self.live.fetch_add(delta as usize, Ordering::AcqRel) + delta as usize
        } else {
            self.live.fetch_sub(delta.unsigned_abs(), Ordering::AcqRel) - delta.unsigned_abs()
        };
        self.metrics.set_instances(self.function.name(), self.function.version(), live);
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl IdleInstances for FunctionPool {
    fn oldest_idle(&self) -> Option<Instant> {
        // Release order: the first is the least recently used.
        self.lock_idle().first().map(|instance| instance.last_used)
    }

    fn reclaim_oldest(self: Arc<Self>) -> bool {
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
