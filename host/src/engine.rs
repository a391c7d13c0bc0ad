//! The [`wasmtime::Engine`]s of a host process (one without fuel
//! instrumentation, one with), their shared epoch clock and instance
//! slots, and the on-disk cache of compiled components.
//!
//! The engine uses the pooling instance allocator (instances come from
//! pre-reserved slots, so instantiation costs microseconds), copy-on-write
//! memory images, and epoch interruption: a background thread advances the
//! epoch, and each store's deadline callback uses it to enforce wall-clock
//! limits and to yield a busy guest back to the scheduler. The clock ticks
//! every [`RELAXED_EPOCH_TICK`] while only short calls run (no call has
//! computed for a whole [`EPOCH_TICK`] of its CPU time in the last
//! [`STEADY_FOR`]): each tick wakes the clock thread, which preempts the
//! worker thread, and a tick that finds no long call does nothing for
//! anyone. Once a call is found computing that long, the clock ticks every
//! [`EPOCH_TICK`], and every [`BUSY_EPOCH_TICK`] for a while when more
//! guest calls are in flight than the runtime has worker threads:
//! CPU-bound guests then share a thread in short slices, while a busy
//! guest with a thread to itself keeps the slower clock (at 250 µs the
//! ticks were 4% of a core). It runs only while some guest code may run (a
//! [`ClockHold`] is held around every guest call and instantiation) and
//! for [`IDLE_BEFORE_SLEEP`] after: an idle host's clock thread sleeps,
//! so an idle node costs no CPU for it (benchmark W8). The clock thread runs at real-time
//! priority when the host may give it (an ordinary thread waking beside a
//! computing guest waits for the guest's kernel slice, ≈3 ms), and while
//! a CPU-bound call computes it also wakes when a request arrives on an
//! HTTP connection (see [`WasmEngine::watch_arrivals`]).
//!
//! Fuel instrumentation is a compile-time setting of a wasmtime engine and
//! costs a CPU-bound guest about a third of its speed (benchmark W2), so
//! there are two engines: a fuel-free one for functions without
//! `fuel_per_request` (their CPU time is still metered, from the thread's
//! CPU clock), and one that meters fuel, for functions with a fuel limit
//! (for every function with [`FuelMetering::EveryRequest`]; for none with
//! [`FuelMetering::Off`]). Both share the epoch clock and the instance
//! slots.
//!
//! A third engine compiles with Winch, wasmtime's baseline compiler (a
//! few times faster to compile, slower code): never-seen wasm of a function
//! without fuel is served from Winch's code at once, while Cranelift
//! compiles it in the background (see [`crate::function`]); unless
//! [`EngineOptions::tier_up`] is off. Winch compiles only a component's
//! wasm functions: the trampolines between the host and the guest (one per
//! imported function, resource drop and function the host may call — 204
//! of them in `hello`) are Cranelift's. They took about half of Winch's
//! compile of `hello` (`perf record` of `wasmtime compile -C
//! compiler=winch`), so this engine compiles them without Cranelift's
//! optimizations (`cranelift_opt_level(None)`: 34.5 → 29.7 ms, one
//! thread); they run only until Cranelift's code replaces Winch's.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::manifest::MAX_MEMORY_BYTES;

mod slots;
pub use slots::{IdleInstances, InstanceSlots, Slot};

/// How often the epoch advances while a guest call has computed for a
/// whole tick lately; also how much CPU time makes a call CPU-bound.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// How often it advances while only short calls run: how late, at most, a
/// call that starts computing on that clock is first found doing so (its
/// timeout and CPU share are checked then, and from then on every
/// [`EPOCH_TICK`]). At 1 ms, the ticks' wake-ups of the clock thread took
/// 3–9 server CPU-µs of each WASI 0.3 `hello` request at 16 connections
/// (benchmark W1, A/B by hand against a 20 ms tick).
pub const RELAXED_EPOCH_TICK: Duration = Duration::from_millis(5);
/// How long the clock keeps [`EPOCH_TICK`] after the last tick that found
/// a CPU-bound call.
pub const STEADY_FOR: Duration = Duration::from_millis(100);
/// How often it advances while guests run past ticks: the slice a
/// CPU-bound guest gets before it yields to the other requests on its
/// thread (benchmark W6), unless its floor is longer
/// ([`SLICE_FLOOR_SHARE`]).
pub const BUSY_EPOCH_TICK: Duration = Duration::from_micros(250);
/// The least time between two ticks that an arrival brought early
/// ([`Doorbell`]): a client sending a stream of small segments cannot make
/// CPU-bound guests yield more often than this.
const MIN_RING_GAP: Duration = Duration::from_micros(25);
/// A CPU-bound call's slice lasts at least this fraction of the time it
/// waited behind the queue for it (up to [`MOST_SLICE_FLOOR`]), whatever
/// arrives or ticks meanwhile: short requests go ahead of a CPU-bound
/// call, but leave it about 1/(1 + this) of the thread, not nothing, and
/// they wait for it about 1/this longer than they wait for each other
/// (until a round of the queue is 16 × [`MOST_SLICE_FLOOR`] long). The
/// ticks still check its timeout and CPU share inside the floor.
///
/// Why: arrivals ended a slice at once (see [`Doorbell`]), and a slice
/// waited one or two rounds of the queue. With 63 connections sending a
/// Go `hello`, its collections (20–25 ms of CPU) got slices of a few
/// microseconds between rounds of about 3 ms (0.2–0.5% of the thread),
/// and took seconds of wall time (up to 10); some passed their 10 s
/// timeout.
const SLICE_FLOOR_SHARE: u32 = 16;
/// The longest slice floor: what a request arriving in it waits at most
/// (then the guest's next epoch check).
const MOST_SLICE_FLOOR: Duration = Duration::from_millis(5);
/// How many fast ticks follow the last tick that found a long guest call.
const BUSY_TICKS: u32 = 400;
/// How long the clock runs on with no guest call before it sleeps: a host
/// between two requests keeps its clock (stopping and waking it for every
/// request cost more than the ticks), an idle one stops it.
const IDLE_BEFORE_SLEEP: Duration = Duration::from_millis(100);

/// Hand the memory a compile freed back to the kernel. Cranelift's
/// working memory is freed when a compile ends, but glibc keeps it in its
/// (per-thread) arenas: with 300 distinct functions deployed, trimming
/// after the deploy took the host's anonymous memory from 72.8 to
/// 64.3 MB (≈28 KB per function). Called after a deploy that compiled; a
/// no-op elsewhere than glibc.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own
    // arenas; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Which functions run with fuel metered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FuelMetering {
    /// None: `fuel_per_request` is refused at deploy.
    Off,
    /// Functions with a `fuel_per_request` limit; the others run without
    /// fuel instrumentation (their records carry no fuel).
    #[default]
    Limited,
    /// Every function (records always carry fuel, at fuel's cost in speed).
    EveryRequest,
}

/// Knobs for the engine, from the host's command line.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Which functions meter fuel (and whether `fuel_per_request` is allowed).
    pub fuel: FuelMetering,
    /// Instances alive at once across all functions (pool slots).
    pub max_instances: u32,
    /// Instances one function version may hold at once, whatever its
    /// `max_concurrency` says; `None`: a quarter of `max_instances`, so no
    /// function (no pod) can take every slot from the others.
    pub max_instances_per_function: Option<u32>,
    /// Instances one tenant (a pod's namespace) may keep busy at once,
    /// across all its functions; `None`: half of `max_instances`, and never
    /// less than one function's share.
    pub max_instances_per_tenant: Option<u32>,
    /// Where compiled code is cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Linear memory a freed instance slot keeps resident (its touched
    /// pages restored in place, found with Linux's PAGEMAP_SCAN) for the
    /// next instance of the same code; 0: every page goes back to the
    /// kernel. Trades idle RSS (up to this much per warm slot) for cheaper
    /// instantiation, which functions with a fresh instance per request
    /// (`max_requests_per_instance = 1`, e.g. JavaScript) pay on every
    /// request.
    pub keep_resident_bytes: usize,
    /// Serve never-seen wasm from Winch's quickly compiled code first, and
    /// switch to Cranelift's when it is ready (functions without fuel).
    pub tier_up: bool,
    /// How calls of functions with a CPU share (`cpu_millis`) compete for
    /// the CPU with everyone else's.
    pub limited_priority: LimitedPriority,
}

/// Where the calls of a function with a CPU share run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LimitedPriority {
    /// On threads of their own at idle priority: they never delay another
    /// function's request (the kernel preempts them at once), and when the
    /// CPU is busy with other work they get only what is left — their share
    /// is a cap, never a guarantee.
    #[default]
    Idle,
    /// On the threads every call runs on: a request arriving while a
    /// CPU-limited guest computes waits for its next epoch tick (up to
    /// 250 µs), and under load each gets its turn.
    Normal,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            fuel: FuelMetering::default(),
            max_instances: 1000,
            max_instances_per_function: None,
            max_instances_per_tenant: None,
            cache_dir: None,
            keep_resident_bytes: 0,
            tier_up: true,
            limited_priority: LimitedPriority::default(),
        }
    }
}

/// The process's engines plus what goes with them.
#[derive(Clone)]
pub struct WasmEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    /// Without fuel instrumentation.
    plain: Engine,
    /// With it (absent when fuel is off).
    metered: Option<Engine>,
    /// Winch's quick code, without fuel (absent without tier-up).
    baseline: Option<Engine>,
    fuel: FuelMetering,
    instance_share: u32,
    slots: InstanceSlots,
    cache_dir: Option<PathBuf>,
    /// The plain and the metered engine's compatibility hashes.
    compat_hash: [String; 2],
    clock: Arc<EpochClock>,
    /// The engines' settings, for the concurrent engines built later.
    config: Config,
    /// Engines with the component model's concurrency on, for WASI 0.3
    /// components; built when the first one is deployed (its pooling
    /// allocator reserves address space, and concurrency costs WASI 0.2
    /// guests 4-15% per request: they never run on these).
    concurrent: OnceLock<Result<ConcurrentEngines, ConcurrentEnginesFailed>>,
}

/// The engines for WASI 0.3 components could not be built (kept, so every
/// later deploy of such a component is told the same). What wasmtime said
/// is its [`std::error::Error::source`].
#[derive(Debug, Clone)]
struct ConcurrentEnginesFailed {
    cause: Arc<anyhow::Error>,
}

impl std::fmt::Display for ConcurrentEnginesFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot build the engine for WASI 0.3 components")
    }
}

// By hand: thiserror's `#[source]` needs a `std::error::Error`, which
// `anyhow::Error` only dereferences to.
impl std::error::Error for ConcurrentEnginesFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        let cause: &(dyn std::error::Error + Send + Sync + 'static) = self.cause.as_ref().as_ref();
        Some(cause)
    }
}

/// The engines WASI 0.3 components run on.
struct ConcurrentEngines {
    plain: Engine,
    metered: Option<Engine>,
    compat_hash: [String; 2],
}

/// Which engine a component is compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flavor {
    /// With fuel metering (if fuel is not off).
    pub fuel: bool,
    /// With the component model's concurrency (WASI 0.3 components).
    pub concurrent: bool,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.clock.stop.store(true, Ordering::Relaxed);
        self.clock.ticker.unpark();
    }
}

/// What the epoch clock thread and the guest calls share.
struct EpochClock {
    /// Set when the engine is dropped: the thread ends.
    stop: AtomicBool,
    /// Raised by a store's epoch callback when a call has computed for a
    /// whole tick: the clock ticks faster for a while.
    busy: Arc<AtomicBool>,
    /// Guest calls (and instantiations) running now; the clock sleeps
    /// while there are none.
    in_flight: AtomicUsize,
    /// The threads guest calls are polled on: with no more calls than
    /// these in flight, none waits for a thread, and slices can be long.
    workers: usize,
    /// The clock thread, woken when the first call starts.
    ticker: std::thread::Thread,
    /// Ticks so far (the engine's epoch).
    ticks: std::sync::atomic::AtomicU64,
    /// The engines for WASI 0.3 components, once built.
    concurrent: OnceLock<Vec<wasmtime::EngineWeak>>,
    /// Rings when a request arrives on a watched connection (absent if
    /// the kernel would not give an epoll instance).
    doorbell: Option<Doorbell>,
    /// CPU-bound calls' turns on the worker threads.
    turns: Turns,
}

/// Turns for CPU-bound guest calls: at most one per worker thread
/// computes at a time, and a slice ends only once the I/O driver has run.
///
/// Why: a call that computed a whole tick yields at each epoch tick
/// (tokio's `yield_now`, which lets the I/O driver in only when the run
/// queue is empty). With two such calls on one thread, both slices ran
/// between two polls of the driver, so a request arriving meanwhile waited
/// up to two slices before it was even read (benchmark W6). Taking turns,
/// the next CPU-bound call starts only after the yielding one has been
/// through the driver's poll, which puts the arrived requests ahead of
/// it. Short calls never take a turn.
#[derive(Debug, Clone)]
pub struct Turns {
    permits: Arc<Semaphore>,
    threads: usize,
    computing: Arc<Computing>,
}

/// How many CPU-bound calls are inside a slice now, for the clock thread:
/// it waits on arrivals only then, and naps otherwise.
///
/// Why: an arrival wakes the clock thread, which preempts the worker
/// thread (it runs at real-time priority). While the CPU-bound calls are
/// between slices the worker is serving requests, and there is no slice
/// to end: beside W6's hogs at 16 connections the clock thread woke 33k
/// times a second, ≈14% of the CPU (`perf sched timehist`), mostly for
/// such arrivals.
///
/// The nap is a condition variable's, not the thread's park: every call
/// that starts on an idle engine unparks the clock thread (see
/// [`WasmEngine::hold_clock`]), which would wake a napping clock thread
/// for nothing (W6's `hello` alone at 16 connections lost 40% of its
/// throughput to such wakes).
#[derive(Debug, Default)]
struct Computing {
    count: AtomicUsize,
    /// The clock thread naps until a slice begins.
    napping: AtomicBool,
    /// An arrival ended a slice early since a slice last ended.
    rang: AtomicBool,
    nap: Mutex<()>,
    slice_began: std::sync::Condvar,
    /// No arrival ends a slice before this time (nanoseconds since
    /// [`clock_base`]; see [`SLICE_FLOOR_SHARE`]).
    no_ring_before: AtomicU64,
}

/// The instant [`Computing::no_ring_before`] counts from.
fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// A CPU-bound call inside its slice (counted while alive).
#[derive(Debug)]
struct InSlice(Arc<Computing>);

impl InSlice {
    /// A slice begins; no arrival ends it before `floor_ends`.
    fn begin(computing: &Arc<Computing>, floor_ends: Instant) -> InSlice {
        let nanos = floor_ends.saturating_duration_since(clock_base()).as_nanos();
        computing.no_ring_before.fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::SeqCst);
        computing.count.fetch_add(1, Ordering::SeqCst);
        // Pairs with `nap`: either it sees the count, or this sees it
        // napping and wakes it (taking the lock, which `nap` holds from
        // its check of the count until it waits).
        if computing.napping.load(Ordering::SeqCst) {
            let _waiting = computing.nap.lock().unwrap_or_else(PoisonError::into_inner);
            computing.slice_began.notify_one();
        }
        InSlice(computing.clone())
    }
}

impl Drop for InSlice {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            // No slice left whose floor holds arrivals back (a slice that
            // begins meanwhile keeps its floor anyway: its epoch callback
            // computes on inside it).
            self.0.no_ring_before.store(0, Ordering::SeqCst);
        }
    }
}

/// A guest call's place among [`Turns`] (one per store, kept by its
/// [`CallCpu`](crate::limits::CallCpu)).
#[derive(Debug, Default)]
pub struct Seat {
    state: Mutex<SeatState>,
}

#[derive(Debug, Default)]
struct SeatState {
    /// Held while the call computes a slice.
    permit: Option<OwnedSemaphorePermit>,
    /// Present while it computes one (not between two).
    in_slice: Option<InSlice>,
    /// Between a slice's end (the epoch callback) and the next one: the
    /// permit is kept until the I/O driver has been polled.
    handing_over: bool,
    /// The slice under way runs on at least until then (see
    /// [`SLICE_FLOOR_SHARE`]).
    floor_ends: Option<Instant>,
}

impl Seat {
    fn state(&self) -> std::sync::MutexGuard<'_, SeatState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A poll of the call ended: a call that stopped computing (it
    /// returned, or waits on the host) gives its turn back; one between
    /// two slices keeps it until the next begins.
    pub fn poll_ended(&self) {
        let mut state = self.state();
        if !state.handing_over {
            state.permit = None;
            state.in_slice = None;
        }
    }

    /// Whether the slice under way is inside its floor at `now`: the
    /// call computes on (see [`SLICE_FLOOR_SHARE`]).
    pub fn in_floor(&self, now: Instant) -> bool {
        let state = self.state();
        state.in_slice.is_some() && state.floor_ends.is_some_and(|ends| now < ends)
    }

    /// A new call: nothing of an abandoned one's turn stays.
    pub fn reset(&self) {
        *self.state() = SeatState::default();
    }
}

impl Turns {
    /// `threads` calls compute at once (one per worker thread).
    pub fn new(threads: usize) -> Turns {
        let threads = threads.max(1);
        Turns { permits: Arc::new(Semaphore::new(threads)), threads, computing: Arc::default() }
    }

    /// Whether a CPU-bound call is inside a slice now.
    pub fn computing(&self) -> bool {
        self.computing.count.load(Ordering::SeqCst) > 0
    }

    /// On the clock thread: how long an arrival must wait before it ends
    /// the slices under way (see [`SLICE_FLOOR_SHARE`]).
    fn floor_left(&self) -> Duration {
        let until = clock_base() + Duration::from_nanos(self.computing.no_ring_before.load(Ordering::SeqCst));
        until.saturating_duration_since(Instant::now())
    }

    /// On the clock thread: an arrival ends the slices under way.
    fn ring(&self) {
        self.computing.rang.store(true, Ordering::SeqCst);
    }

    /// On the clock thread: sleep up to `most`, or until a CPU-bound call
    /// begins a slice.
    fn nap(&self, most: Duration) {
        let computing = &self.computing;
        let waiting = computing.nap.lock().unwrap_or_else(PoisonError::into_inner);
        computing.napping.store(true, Ordering::SeqCst);
        if !self.computing() {
            let _ = computing.slice_began.wait_timeout(waiting, most);
        }
        computing.napping.store(false, Ordering::SeqCst);
    }

    /// Whether a CPU-bound call has a turn now (computes, or is between
    /// two slices).
    pub fn taken(&self) -> bool {
        self.permits.available_permits() < self.threads
    }

    /// What a CPU-bound call awaits when its slice ends: the thread goes
    /// back to the runtime (its I/O driver first), then the call hands its
    /// turn to the next CPU-bound call in line and queues for one.
    pub fn next_slice(&self, seat: Arc<Seat>) -> impl Future<Output = ()> + Send + 'static {
        {
            let mut state = seat.state();
            state.handing_over = true;
            state.in_slice = None;
        }
        let arrivals = self.computing.rang.swap(false, Ordering::SeqCst);
        let permits = self.permits.clone();
        let computing = self.computing.clone();
        async move {
            // How long it waits behind others (not for a turn: the other
            // CPU-bound calls' slices are not what the floor makes up for).
            let queued = Instant::now();
            // To the runtime: it polls its I/O driver before this task runs
            // again, which queues the requests that arrived.
            tokio::task::yield_now().await;
            let mut waited = queued.elapsed();
            let held = seat.state().permit.take();
            drop(held);
            // The semaphore is never closed.
            let permit = permits.acquire_owned().await.ok();
            let queued = Instant::now();
            // Then behind those requests, and the guest calls they start.
            // Not by a second `yield_now`: tokio wakes the tasks it
            // deferred into its LIFO slot, which runs before the run queue
            // (as does a task woken by the call that handed its turn over),
            // so this slice ran before the request the poll had just queued
            // (traced beside W6's hogs: the request read only once the
            // whole slice had run).
            behind_the_queue().await;
            if arrivals {
                // Requests are arriving (one ended this slice): those that
                // came while the worker served the last ones are read and
                // served too before the slice resumes. Once: a stream of
                // them holds a CPU-bound call back by two rounds at most.
                tokio::task::yield_now().await;
                behind_the_queue().await;
            }
            waited += queued.elapsed();
            let now = Instant::now();
            let floor_ends = now + (waited / SLICE_FLOOR_SHARE).min(MOST_SLICE_FLOOR);
            let mut state = seat.state();
            state.permit = permit;
            state.in_slice = Some(InSlice::begin(&computing, floor_ends));
            state.floor_ends = Some(floor_ends);
            state.handing_over = false;
        }
    }
}

/// Return once the tasks queued on this worker thread before this one
/// have had their turn: ready on its second poll. On its first it wakes
/// its own task, which tokio then puts at the back of the worker's run
/// queue (a task woken while it is being polled is rescheduled as a
/// yield), not in its LIFO slot. No tokio API says "behind the tasks
/// queued now"; this is the self-wake that tokio's own `yield_now` did
/// before it deferred wakes (`yield_now` now also waits for the worker to
/// poll for I/O first, an `epoll_wait` more for a task alone).
pub(crate) fn behind_the_queue() -> BackOfTheQueue {
    BackOfTheQueue(false)
}

/// See [`behind_the_queue`].
pub(crate) struct BackOfTheQueue(bool);

impl Future for BackOfTheQueue {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Give the calling thread (the clock's) the CPU as soon as it wakes:
/// real-time priority 1 (SCHED_FIFO), above every ordinary thread.
///
/// Why: a tick is due while a CPU-bound guest holds the CPU, and an
/// ordinary thread that wakes does not preempt it — Linux lets the
/// running thread finish its slice (≈3 ms here), so ticks meant for every
/// 250 µs came every 3–4 ms (measured with `strace -T` on the thread
/// beside two CPU-bound guests on one CPU). The thread runs for a few
/// microseconds per tick and then sleeps (an arrival brings a tick early
/// at most once per [`MIN_RING_GAP`]), so it cannot hog the CPU.
/// Needs CAP_SYS_NICE; without it the clock runs as an ordinary thread
/// (and says so).
fn run_before_guests() {
    if let Err(err) = set_own_scheduling(libc::SCHED_FIFO, 1) {
        tracing::info!(
            error = %err,
            "the epoch clock runs at ordinary priority: beside CPU-bound guests its ticks come late"
        );
    }
}

/// Set the calling thread's scheduling `policy` and `priority` (what
/// `sched_setscheduler(2)` takes; nix has no wrapper for it).
pub(crate) fn set_own_scheduling(policy: libc::c_int, priority: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: sched_setscheduler reads `param`, a valid sched_param, and
    // changes only the calling thread's (pid 0) scheduling policy.
    match unsafe { libc::sched_setscheduler(0, policy, &param) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The HTTP trigger's connections, watched by the clock thread (a second
/// epoll set beside tokio's, edge-triggered: one event per arrival).
///
/// Why: while a CPU-bound guest computes on a worker thread, that thread
/// polls tokio's I/O driver only when the guest yields, so a request that
/// arrives waits for what is left of the guest's slice before it is even
/// read (benchmark W6). While a CPU-bound call is inside a slice
/// ([`Turns::computing`]), the clock thread waits on this set as well as
/// on its tick: an arrival advances the epoch at once (once the slice's
/// floor has passed: [`SLICE_FLOOR_SHARE`]), the guest yields at its next
/// check, and the request is read. Otherwise the set is not
/// looked at: a host serving short requests pays one `epoll_ctl` per
/// connection.
///
struct Doorbell {
    epoll: Epoll,
}

impl Doorbell {
    fn new() -> Option<Doorbell> {
        match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
            Ok(epoll) => Some(Doorbell { epoll }),
            Err(err) => {
                tracing::warn!(error = %err, "no epoll set for arrivals: CPU-bound guests yield to new requests only at their ticks");
                None
            }
        }
    }

    /// Ring when data arrives on `connection`.
    fn watch(&self, connection: &impl AsFd) -> nix::Result<()> {
        self.epoll.add(connection, EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, 0))
    }

    /// Wait up to `timeout` for an arrival on a watched connection.
    fn rang_within(&self, timeout: Duration) -> bool {
        let mut ready = [PollFd::new(self.epoll.0.as_fd(), PollFlags::POLLIN)];
        let rang = matches!(ppoll(&mut ready, Some(TimeSpec::from_duration(timeout)), None), Ok(count) if count > 0);
        if rang {
            // Empty the set's ready list (it stays readable until then).
            let mut events = [EpollEvent::empty(); 64];
            while let Ok(count) = self.epoll.wait(&mut events, EpollTimeout::ZERO) {
                if count < events.len() {
                    break;
                }
            }
        }
        rang
    }
}

/// Keeps the epoch clock ticking while held: taken around every stretch of
/// time in which guest code may run (see [`WasmEngine::hold_clock`]).
#[must_use = "the clock ticks only while the hold is alive"]
pub struct ClockHold {
    clock: Arc<EpochClock>,
}

impl Drop for ClockHold {
    fn drop(&mut self) {
        self.clock.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a component came from on [`WasmEngine::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompileSource {
    /// Compiled now (and written to the cache if there is one).
    Compiled,
    /// Loaded from the on-disk cache.
    Cache,
    /// Compiled now by Winch; Cranelift's code replaces it when ready.
    Baseline,
}

/// The top of each async stack zeroed by `memset` when it goes back to the
/// pool (what a call uses); the rest is decommitted.
const STACK_KEEP_RESIDENT: usize = 64 << 10;

/// Why a freed slot may not keep its memory resident on this machine, if
/// it may not: `swaps` is `/proc/swaps`. A slot that keeps its memory is
/// reset in place by asking the kernel which pages were written
/// (PAGEMAP_SCAN); a page swapped out meanwhile is not reported, so it
/// would keep one instance's data for the next — of any tenant.
fn keep_resident_refused(swaps: &str) -> Option<String> {
    let devices: Vec<&str> = swaps.lines().skip(1).filter_map(|line| line.split_whitespace().next()).collect();
    (!devices.is_empty()).then(|| {
        format!(
            "swap is on ({}): a page swapped out of a freed slot would not be reset, and the next instance \
             (of any tenant) could read it; turn swap off or drop the option",
            devices.join(", ")
        )
    })
}

impl WasmEngine {
    /// Build the engine and start its epoch clock.
    pub fn new(options: &EngineOptions) -> anyhow::Result<WasmEngine> {
        if options.keep_resident_bytes > 0 {
            let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
            if let Some(why) = keep_resident_refused(&swaps) {
                anyhow::bail!("--keep-resident-kib is refused: {why}");
            }
        }
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(options.max_instances)
            .total_core_instances(options.max_instances * 4)
            .total_memories(options.max_instances * 2)
            .total_tables(options.max_instances * 4)
            .total_stacks(options.max_instances)
            .max_memory_size(MAX_MEMORY_BYTES as usize)
            // By default freed pages go back to the OS at once: an idle
            // function costs nothing.
            .linear_memory_keep_resident(options.keep_resident_bytes)
            .pagemap_scan(if options.keep_resident_bytes > 0 { wasmtime::Enabled::Auto } else { wasmtime::Enabled::No })
            .table_keep_resident(options.keep_resident_bytes)
            // Stacks pass from one guest (one tenant) to the next: zeroed in
            // between, the hot top by memset, the rest handed back.
            .async_stack_keep_resident(STACK_KEEP_RESIDENT)
            .max_unused_warm_slots(options.max_instances.min(100));

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            // No guest uses the component model's async ABI (wasi:http 0.2
            // and the Runtime ABI are synchronous to the guest); without it
            // every host call skips wasmtime's task bookkeeping
            // (`host_task_create`, scope ids), which sat near the top of a
            // `perf` profile of `hello`.
            .concurrency_support(false)
            .memory_init_cow(true)
            .async_stack_zeroing(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        // Each engine has a pool of every slot: the instance slots shared
        // by both ([`InstanceSlots`]) keep the total within `max_instances`.
        let base = config.clone();
        let plain = Engine::new(config.clone().consume_fuel(false))?;
        let metered = match options.fuel {
            FuelMetering::Off => None,
            FuelMetering::Limited | FuelMetering::EveryRequest => Some(Engine::new(config.consume_fuel(true))?),
        };
        let baseline = match options.tier_up {
            false => None,
            true => Some(Engine::new(
                config
                    .consume_fuel(false)
                    .strategy(wasmtime::Strategy::Winch)
                    .cranelift_opt_level(wasmtime::OptLevel::None),
            )?),
        };
        let compat_hash = [&plain, metered.as_ref().unwrap_or(&plain)].map(|engine| {
            let mut hasher = HashToSha256(Sha256::new());
            engine.precompile_compatibility_hash().hash(&mut hasher);
            hex(&hasher.0.finalize()[..8])
        });

        let busy = Arc::new(AtomicBool::new(false));
        let weak = (plain.weak(), [&metered, &baseline].map(|engine| engine.as_ref().map(Engine::weak)));
        // The thread learns its shared state through a channel: the state
        // holds the thread's own handle (to wake it), known only once it
        // is spawned.
        let (send_clock, receive_clock) = std::sync::mpsc::sync_channel::<Arc<EpochClock>>(1);
        let ticker = std::thread::Builder::new().name("shoal-epoch".into()).spawn(move || {
            let Ok(clock) = receive_clock.recv() else { return };
            run_before_guests();
            let mut fast_ticks = 0;
            let mut last_ring: Option<Instant> = None;
            // An arrival that a slice's floor held back past a tick: it
            // ends the slice once the floor has passed (its edge is gone).
            let mut held_arrival = false;
            // When the last tick found a CPU-bound call.
            let mut last_busy: Option<Instant> = None;
            // Start asleep: nothing runs yet.
            let mut idle_for = IDLE_BEFORE_SLEEP;
            let mut tick = RELAXED_EPOCH_TICK;
            while !clock.stop.load(Ordering::Relaxed) {
                if clock.in_flight.load(Ordering::Acquire) > 0 {
                    idle_for = Duration::ZERO;
                } else if idle_for >= IDLE_BEFORE_SLEEP {
                    // Nothing has run wasm for a while: sleep until a call
                    // starts. An `unpark` that came first makes this return
                    // at once, so no start is missed. No tick is owed
                    // meanwhile: a call's first deadline is one tick after
                    // the clock resumes.
                    fast_ticks = 0;
                    last_busy = None;
                    std::thread::park();
                    idle_for = Duration::ZERO;
                    continue;
                } else {
                    idle_for += tick;
                }
                // Slices matter only when guest calls outnumber the threads
                // that poll them (someone is waiting for a thread).
                let crowded = clock.in_flight.load(Ordering::Relaxed) > clock.workers;
                if clock.busy.swap(false, Ordering::Relaxed) {
                    last_busy = Some(Instant::now());
                    if crowded {
                        fast_ticks = BUSY_TICKS;
                    }
                }
                let steady = last_busy.is_some_and(|at| at.elapsed() < STEADY_FOR);
                tick = match (fast_ticks > 0, steady) {
                    (true, _) => BUSY_EPOCH_TICK,
                    (false, true) => EPOCH_TICK,
                    (false, false) => RELAXED_EPOCH_TICK,
                };
                fast_ticks = fast_ticks.saturating_sub(1);
                match &clock.doorbell {
                    // An arrival ends the tick early while a CPU-bound call
                    // is inside a slice (it is what the request would wait
                    // for); between slices the clock naps.
                    Some(doorbell) => {
                        let due = Instant::now() + tick;
                        while let Some(left) = due.checked_duration_since(Instant::now()).filter(|left| !left.is_zero())
                        {
                            if !clock.turns.computing() {
                                // Between slices the worker serves what
                                // arrived.
                                held_arrival = false;
                                clock.turns.nap(left);
                            } else if (held_arrival || doorbell.rang_within(left)) && clock.turns.computing() {
                                // At most one early tick per gap, whatever
                                // clients send (each ends every CPU-bound
                                // guest's slice), and none before the
                                // slices' floor.
                                let gap_left = last_ring
                                    .map(|at| at + MIN_RING_GAP)
                                    .and_then(|gap_ends| gap_ends.checked_duration_since(Instant::now()))
                                    .unwrap_or_default();
                                let early = gap_left.max(clock.turns.floor_left());
                                // Never past the tick (deadlines are checked
                                // at every tick): a floor that ends later
                                // holds the arrival over to a later pass.
                                let until_tick = due.saturating_duration_since(Instant::now());
                                held_arrival = early > until_tick;
                                let early = early.min(until_tick);
                                if !early.is_zero() {
                                    std::thread::sleep(early);
                                }
                                last_ring = Some(Instant::now());
                                clock.turns.ring();
                                // The next arrival's edge may have been
                                // taken with this one's: short ticks
                                // bound its wait.
                                fast_ticks = BUSY_TICKS;
                                break;
                            }
                        }
                    }
                    None => std::thread::sleep(tick),
                }
                match weak.0.upgrade() {
                    Some(engine) => {
                        engine.increment_epoch();
                        for other in weak.1.iter().flatten().filter_map(wasmtime::EngineWeak::upgrade) {
                            other.increment_epoch();
                        }
                        for other in
                            clock.concurrent.get().into_iter().flatten().filter_map(wasmtime::EngineWeak::upgrade)
                        {
                            other.increment_epoch();
                        }
                        clock.ticks.fetch_add(1, Ordering::Relaxed);
                    }
                    None => break,
                }
            }
        })?;
        // tokio's default worker count (the CPUs this process may use).
        let workers = std::thread::available_parallelism().map_or(1, usize::from);
        let clock = Arc::new(EpochClock {
            stop: AtomicBool::new(false),
            busy,
            in_flight: AtomicUsize::new(0),
            workers,
            ticker: ticker.thread().clone(),
            ticks: std::sync::atomic::AtomicU64::new(0),
            concurrent: OnceLock::new(),
            doorbell: Doorbell::new(),
            turns: Turns::new(workers),
        });
        send_clock.send(clock.clone()).expect("invariant: the clock thread waits for its state");

        if let Some(dir) = &options.cache_dir {
            std::fs::create_dir_all(dir)
                .map_err(|err| anyhow::anyhow!("cannot create cache dir {}: {err}", dir.display()))?;
        }
        let max_instances = options.max_instances.max(1);
        let instance_share = options.max_instances_per_function.unwrap_or(max_instances / 4).clamp(1, max_instances);
        let tenant_share =
            options.max_instances_per_tenant.unwrap_or(max_instances / 2).clamp(instance_share, max_instances);
        Ok(WasmEngine {
            inner: Arc::new(EngineInner {
                plain,
                metered,
                baseline,
                fuel: options.fuel,
                instance_share,
                slots: InstanceSlots::new(max_instances, tenant_share),
                cache_dir: options.cache_dir.clone(),
                compat_hash,
                clock,
                config: base,
                concurrent: OnceLock::new(),
            }),
        })
    }

    /// The wasmtime engine for code that meters fuel (`fuel`, if fuel is
    /// not off) or not. Programs (wasi:cli) never do.
    pub fn engine(&self, fuel: bool) -> &Engine {
        match &self.inner.metered {
            Some(metered) if fuel => metered,
            _ => &self.inner.plain,
        }
    }

    /// The wasmtime engine for code of `flavor` (the concurrent ones are
    /// built on first use).
    pub fn engine_for(&self, flavor: Flavor) -> anyhow::Result<&Engine> {
        if !flavor.concurrent {
            return Ok(self.engine(flavor.fuel));
        }
        let engines = self.concurrent()?;
        Ok(match &engines.metered {
            Some(metered) if flavor.fuel => metered,
            _ => &engines.plain,
        })
    }

    fn concurrent(&self) -> anyhow::Result<&ConcurrentEngines> {
        let built = self.inner.concurrent.get_or_init(|| {
            let build = || -> anyhow::Result<ConcurrentEngines> {
                let mut config = self.inner.config.clone();
                config.concurrency_support(true);
                let plain = Engine::new(config.clone().consume_fuel(false))?;
                let metered =
                    self.inner.metered.is_some().then(|| Engine::new(config.consume_fuel(true))).transpose()?;
                let compat_hash = [&plain, metered.as_ref().unwrap_or(&plain)].map(|engine| {
                    let mut hasher = HashToSha256(Sha256::new());
                    engine.precompile_compatibility_hash().hash(&mut hasher);
                    hex(&hasher.0.finalize()[..8])
                });
                let weak = std::iter::once(&plain).chain(metered.as_ref()).map(Engine::weak).collect();
                let _ = self.inner.clock.concurrent.set(weak);
                Ok(ConcurrentEngines { plain, metered, compat_hash })
            };
            build().map_err(|err| ConcurrentEnginesFailed { cause: Arc::new(err) })
        });
        built.as_ref().map_err(|failed| anyhow::Error::new(failed.clone()))
    }

    /// The engine Winch's code runs on, if the host tiers up.
    pub fn baseline(&self) -> Option<&Engine> {
        self.inner.baseline.as_ref()
    }

    /// Compile with Winch (never cached: Cranelift's code replaces it).
    pub fn compile_baseline(&self, wasm: &[u8]) -> anyhow::Result<Option<Component>> {
        match &self.inner.baseline {
            Some(engine) => Ok(Some(Component::new(engine, wasm)?)),
            None => Ok(None),
        }
    }

    /// Whether a function runs with fuel metered: it has a fuel limit
    /// (`limited`), or fuel is metered for every request.
    pub fn meters_fuel(&self, limited: bool) -> bool {
        match self.inner.fuel {
            FuelMetering::Off => false,
            FuelMetering::Limited => limited,
            FuelMetering::EveryRequest => true,
        }
    }

    /// The flag a store's epoch callback raises when a guest call has
    /// computed for a whole tick: the clock then ticks faster for a while.
    pub fn busy_flag(&self) -> Arc<AtomicBool> {
        self.inner.clock.busy.clone()
    }

    /// Requests arriving on `connection` interrupt CPU-bound guests at
    /// once (at most every [`MIN_RING_GAP`], and not inside a slice's
    /// floor) while one of them is inside a slice (see [`Doorbell`]). The kernel forgets the connection when it
    /// closes.
    pub fn watch_arrivals(&self, connection: &impl AsFd) {
        if let Some(doorbell) = &self.inner.clock.doorbell
            && let Err(err) = doorbell.watch(connection)
        {
            tracing::debug!(error = %err, "cannot watch a connection for arrivals");
        }
    }

    /// The turns CPU-bound guest calls take on the worker threads.
    pub fn turns(&self) -> Turns {
        self.inner.clock.turns.clone()
    }

    /// Whether a CPU-bound guest call has a turn on a worker thread now
    /// (computes, or waits between two slices).
    pub fn turn_taken(&self) -> bool {
        self.inner.clock.turns.taken()
    }

    /// Keep the epoch clock running until the hold is dropped. Every guest
    /// call and instantiation runs under one: epochs only interrupt running
    /// wasm, so with no hold alive the clock thread sleeps.
    pub fn hold_clock(&self) -> ClockHold {
        let clock = &self.inner.clock;
        if clock.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            clock.ticker.unpark();
        }
        ClockHold { clock: clock.clone() }
    }

    /// How often the epoch clock has ticked since the engine was built.
    pub fn ticks(&self) -> u64 {
        self.inner.clock.ticks.load(Ordering::Relaxed)
    }

    /// The most instances one function version may hold at once.
    pub fn instance_share(&self) -> u32 {
        self.inner.instance_share
    }

    /// The instance slots every function, tenant and program shares.
    pub fn slots(&self) -> &InstanceSlots {
        &self.inner.slots
    }

    /// Whether functions may set a fuel limit (fuel is not off).
    pub fn fuel_enabled(&self) -> bool {
        self.inner.metered.is_some()
    }

    /// Compile `wasm` (whose sha256 is `digest`) for the engine that
    /// meters `fuel` or not, or load it from the cache.
    ///
    /// The cache key is the wasm's digest plus the engine's compatibility
    /// hash, so a different wasmtime or engine setting never loads stale code.
    pub fn load(&self, wasm: &[u8], digest: &str, flavor: Flavor) -> anyhow::Result<(Component, CompileSource)> {
        if let Some(component) = self.cached(digest, flavor) {
            return Ok((component, CompileSource::Cache));
        }
        self.compile(wasm, digest, flavor).map(|component| (component, CompileSource::Compiled))
    }

    /// The compiled code of `digest` from the on-disk cache, if there.
    pub fn cached(&self, digest: &str, flavor: Flavor) -> Option<Component> {
        let engine = self.engine_for(flavor).ok()?;
        let cached = self.cache_path(digest, flavor);
        if let Some(path) = &cached
            && path.is_file()
        {
            // SAFETY: the file was written by `Component::serialize` of this
            // same engine configuration (its name carries the engine's
            // compatibility hash) into a directory owned by the host, and is
            // renamed into place only once complete. wasmtime still checks
            // the header and refuses a mismatched artifact.
            match unsafe { Component::deserialize_file(engine, path) } {
                Ok(component) => return Some(component),
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "discarding unusable cache entry");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        None
    }

    /// Compile `wasm` with Cranelift (and write it to the cache if there is one).
    pub fn compile(&self, wasm: &[u8], digest: &str, flavor: Flavor) -> anyhow::Result<Component> {
        let engine = self.engine_for(flavor)?;
        let cached = self.cache_path(digest, flavor);
        let component = Component::new(engine, wasm).map_err(anyhow::Error::from)?;
        if let Some(path) = cached {
            match write_atomically(&path, &component.serialize()?) {
                // Serve the code from the cache file's mapping rather than
                // from the heap: pages a function never runs stay on disk
                // (in the page cache), so an idle function costs little
                // memory (benchmark W5).
                // SAFETY: as above; the file was just written by this engine.
                Ok(()) => match unsafe { Component::deserialize_file(engine, &path) } {
                    Ok(mapped) => return Ok(mapped),
                    Err(err) => tracing::warn!(path = %path.display(), error = %err, "cannot map compile cache entry"),
                },
                Err(err) => tracing::warn!(path = %path.display(), error = %err, "cannot write compile cache entry"),
            }
        }
        Ok(component)
    }

    fn cache_path(&self, digest: &str, flavor: Flavor) -> Option<PathBuf> {
        let dir = self.inner.cache_dir.as_ref()?;
        let hashes = match flavor.concurrent {
            false => &self.inner.compat_hash,
            true => &self.concurrent().ok()?.compat_hash,
        };
        let compat = &hashes[usize::from(flavor.fuel && self.inner.metered.is_some())];
        Some(dir.join(format!("{digest}-{compat}.cwasm")))
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Write `bytes` to `path` so that readers see either nothing or all of it
/// (a uniquely named temporary file, synced, then renamed over `path`).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|err| err.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Feeds `Hash` output into sha256: `precompile_compatibility_hash` only
/// offers `Hash`, and std's hashers are not stable across builds.
struct HashToSha256(Sha256);

impl Hasher for HashToSha256 {
    fn finish(&self) -> u64 {
        // Only the sha256 state is used; `finish` is never consulted.
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeping_freed_memory_resident_is_refused_while_swap_is_on() {
        let off = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n";
        assert_eq!(keep_resident_refused(off), None);
        let on = format!("{off}/swapfile                               file\t\t1048572\t\t0\t\t-2\n");
        let why = keep_resident_refused(&on).expect("refused");
        assert!(why.contains("swap is on (/swapfile)") && why.contains("any tenant"), "{why}");
    }

    #[tokio::test]
    async fn cpu_bound_calls_take_turns_and_give_them_back_when_they_stop_computing() {
        let turns = Turns::new(1);
        let (a, b) = (Arc::new(Seat::default()), Arc::new(Seat::default()));
        // a's first slice: the turn is free.
        turns.next_slice(a.clone()).await;
        assert!(turns.taken() && turns.computing());
        // b's slice waits while a computes.
        let b_slice = tokio::spawn(turns.next_slice(b.clone()));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!b_slice.is_finished(), "two CPU-bound calls computed at once on one thread");
        // a's slice ends: the turn goes to b, and a waits behind it.
        let a_next = tokio::spawn(turns.next_slice(a.clone()));
        tokio::time::timeout(Duration::from_secs(10), b_slice).await.expect("b got its turn").unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!a_next.is_finished(), "a took the turn back before b's slice");
        // b stops computing (its call returned, or it waits on the host):
        // its turn goes back, and a has it.
        b.poll_ended();
        tokio::time::timeout(Duration::from_secs(10), a_next).await.expect("a got its turn back").unwrap();
        // A call between two slices keeps its turn when its poll ends; one
        // that stopped computing gives it back.
        let handing_over = turns.next_slice(a.clone());
        a.poll_ended();
        assert!(turns.taken(), "the turn left a call between two slices");
        assert!(!turns.computing(), "a call between two slices counted as inside one");
        handing_over.await;
        assert!(turns.computing());
        a.poll_ended();
        assert!(!turns.taken(), "a call that stopped computing kept its turn");
        assert!(!turns.computing());
    }

    #[test]
    fn a_slice_that_waited_behind_the_queue_has_a_floor_of_a_sixteenth_of_its_wait_up_to_5_ms() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let turns = Turns::new(1);
        let seat = Arc::new(Seat::default());
        // `tasks` requests of 4 ms each queued on the thread: the slice
        // begins after them.
        let slice_after = |tasks: u32| {
            runtime.block_on(async {
                for _ in 0..tasks {
                    tokio::spawn(async { std::thread::sleep(Duration::from_millis(4)) });
                }
                let waiting = Instant::now();
                turns.next_slice(seat.clone()).await;
                (waiting.elapsed(), turns.floor_left())
            })
        };
        let (waited, floor) = slice_after(8);
        assert!(waited >= Duration::from_millis(32), "{waited:?}");
        assert!(seat.in_floor(Instant::now()), "inside its floor after waiting {waited:?}");
        assert!(floor > Duration::from_millis(1) && floor <= waited / SLICE_FLOOR_SHARE, "{floor:?} after {waited:?}");
        // It stops computing: no floor holds arrivals back any more.
        seat.poll_ended();
        assert!(!seat.in_floor(Instant::now()) && turns.floor_left().is_zero());
        // A long wait: the floor stops at 5 ms.
        let (waited, floor) = slice_after(30);
        assert!(waited >= Duration::from_millis(120), "{waited:?}");
        assert!(floor > Duration::from_millis(4) && floor <= MOST_SLICE_FLOOR, "{floor:?} after {waited:?}");
        seat.poll_ended();
        // A slice that waited for nothing has next to no floor.
        let (_, floor) = slice_after(0);
        assert!(floor < Duration::from_millis(1), "{floor:?}");
    }

    #[test]
    fn the_clock_naps_between_slices_until_a_slice_begins() {
        let turns = Turns::new(1);
        let napper = turns.clone();
        let nap = std::thread::spawn(move || {
            let started = Instant::now();
            napper.nap(Duration::from_secs(60));
            started.elapsed()
        });
        // Once it naps, a CPU-bound call begins a slice.
        while !turns.computing.napping.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let seat = Arc::new(Seat::default());
        runtime.block_on(turns.next_slice(seat.clone()));
        let napped = nap.join().unwrap();
        assert!(napped < Duration::from_secs(30), "the clock napped through a slice's start ({napped:?})");
    }

    #[test]
    fn the_doorbell_rings_once_for_each_arrival_on_a_watched_connection() {
        use std::io::Write;
        let doorbell = Doorbell::new().expect("an epoll set");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        doorbell.watch(&server).unwrap();
        assert!(!doorbell.rang_within(Duration::from_millis(20)), "nothing arrived yet");
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(doorbell.rang_within(Duration::from_secs(10)), "a request arrived");
        // The request is still unread: it does not ring again.
        assert!(!doorbell.rang_within(Duration::from_millis(20)), "rang twice for one arrival");
        client.write_all(b"GET /next HTTP/1.1\r\n\r\n").unwrap();
        assert!(doorbell.rang_within(Duration::from_secs(10)), "the next request arrived");
        // A connection the doorbell does not watch never rings it.
        let mut other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _unwatched = listener.accept().unwrap();
        other.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(!doorbell.rang_within(Duration::from_millis(50)), "an unwatched connection rang");
    }

    #[test]
    fn the_epoch_clock_ticks_only_while_a_call_holds_it() {
        let engine = WasmEngine::new(&EngineOptions { max_instances: 4, ..EngineOptions::default() }).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(engine.ticks(), 0, "an idle engine's clock must not tick");

        let hold = engine.hold_clock();
        std::thread::sleep(Duration::from_millis(30));
        let running = engine.ticks();
        assert!(running >= 3, "a held clock ticks at least every 5 ms; saw {running} ticks in 30 ms");

        drop(hold);
        // The clock runs on for up to 100 ms, then sleeps.
        std::thread::sleep(Duration::from_millis(250));
        let stopped = engine.ticks();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(engine.ticks(), stopped, "the clock stops once no call holds it");

        // Two holds at once; the clock goes on until the last one ends.
        let (first, second) = (engine.hold_clock(), engine.hold_clock());
        drop(first);
        let before = engine.ticks();
        std::thread::sleep(Duration::from_millis(30));
        assert!(engine.ticks() > before, "one hold left keeps the clock running");
        drop(second);
    }
}
