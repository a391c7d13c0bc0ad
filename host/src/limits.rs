//! Enforcing a function's limits on one instance, and naming the limit a
//! request breached.
//!
//! - **Memory**: [`MemoryMeter`] is the store's `ResourceLimiter`; it refuses
//!   growth past `memory_bytes` and records the peak for metering.
//! - **Wall-clock time**: the store's epoch deadline callback (see
//!   [`crate::instance`]) checks the request's deadline on every epoch tick
//!   and traps with [`DeadlineExceeded`]; a guest blocked in a host call is
//!   cut off by an async timeout instead.
//! - **Fuel**: wasmtime traps with `Trap::OutOfFuel`.
//! - **Concurrency**: a semaphore in [`crate::pool`].
//! - **CPU**: [`CpuQuota`], charged with the CPU time of every poll of a
//!   call and checked on every epoch tick: past its share in a period, a
//!   call waits for the next one.
//!
//! [`classify`] turns the error of a failed call into the outcome a
//! user sees, using typed causes (`downcast_ref`) rather than message text.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, Trap};

mod cpu_clock;
pub(crate) use cpu_clock::thread_cpu_time;

use crate::engine::Seat;
use crate::outcome::Outcome;

/// The period of CPU quotas (as CFS's default).
pub const CPU_PERIOD: Duration = Duration::from_millis(100);

/// The threads on which calls of functions with a CPU share run when
/// [`crate::engine::LimitedPriority::Idle`]: their own, at the kernel's
/// idle priority (`SCHED_IDLE`). A guest yields only at epoch ticks (every
/// 250 µs); a request for another function arriving meanwhile would wait
/// for the tick on a shared thread, while a thread of idle priority is
/// preempted by the kernel as soon as any other thread of the node wants
/// the CPU. The share itself is still [`CpuQuota`]'s to enforce; the
/// priority decides who goes first. Built on first use (hosts without CPU
/// limits never start these threads), shared by every host of the process.
pub fn limited_calls() -> &'static tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("shoal-limited")
                .on_thread_start(|| {
                    // Lowering one's own priority needs no privilege; on
                    // failure the thread keeps the normal priority, which
                    // is only slower to give way.
                    match crate::engine::set_own_scheduling(libc::SCHED_IDLE, 0) {
                        Ok(()) => IDLE_PRIORITY.set(true),
                        Err(err) => tracing::warn!(error = %err, "cannot lower a CPU-limited thread's priority"),
                    }
                })
                .enable_all()
                .build()
                .expect("invariant: a tokio runtime can be built (threads and an epoll instance)")
        })
        .handle()
}

thread_local! {
    /// Whether this thread runs at idle priority ([`limited_calls`]).
    static IDLE_PRIORITY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is one of [`limited_calls`]' idle-priority
/// threads: the kernel preempts a guest computing there whenever another
/// thread wants the CPU, so it needs no [`Turns`](crate::engine::Turns).
pub fn on_idle_priority_thread() -> bool {
    IDLE_PRIORITY.get()
}

/// A function's share of CPU time, as CFS bandwidth control gives a
/// cgroup: `millis` thousandths of a core, i.e. `CPU_PERIOD × millis /
/// 1000` of CPU time per period, shared by all its instances. CPU is
/// charged after the fact (each poll of a call adds what it used), so a
/// period may be overdrawn by up to one epoch tick per running instance;
/// the debt is carried into the next periods, so over time the share
/// holds exactly. A call that finds the current period spent waits (its
/// epoch callback sleeps) until the period ends: the time waited is the
/// throttled time.
#[derive(Debug)]
pub struct CpuQuota {
    millis: u32,
    per_period: Duration,
    window: std::sync::Mutex<QuotaWindow>,
    throttled_ns: AtomicU64,
    throttled_periods: AtomicU64,
}

#[derive(Debug)]
struct QuotaWindow {
    start: Instant,
    used: Duration,
    /// Whether some call already waited in this period.
    throttled: bool,
}

impl CpuQuota {
    /// A quota of `millis` thousandths of a core.
    pub fn new(millis: NonZeroU32) -> Arc<CpuQuota> {
        let per_period = CPU_PERIOD * millis.get() / 1000;
        Arc::new(CpuQuota {
            millis: millis.get(),
            per_period,
            window: std::sync::Mutex::new(QuotaWindow {
                start: Instant::now(),
                used: Duration::ZERO,
                throttled: false,
            }),
            throttled_ns: AtomicU64::new(0),
            throttled_periods: AtomicU64::new(0),
        })
    }

    /// The quota in thousandths of a core.
    pub fn millis(&self) -> u32 {
        self.millis
    }

    fn window(&self, now: Instant) -> std::sync::MutexGuard<'_, QuotaWindow> {
        let mut window = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(window.start);
        if elapsed >= CPU_PERIOD {
            let periods = (elapsed.as_nanos() / CPU_PERIOD.as_nanos()) as u32;
            window.start += CPU_PERIOD * periods;
            window.used = window.used.saturating_sub(self.per_period * periods);
            window.throttled = false;
        }
        window
    }

    /// Charge `cpu` of CPU time, used just now.
    pub fn charge(&self, cpu: Duration) {
        self.window(Instant::now()).used += cpu;
    }

    /// When a call may run again, if the share of the current period is
    /// spent: the end of the period (or of the debt, when it is overdrawn
    /// by more than a period).
    pub fn wait_until(&self, now: Instant) -> Option<Instant> {
        let mut window = self.window(now);
        if window.used < self.per_period {
            return None;
        }
        if !window.throttled {
            window.throttled = true;
            self.throttled_periods.fetch_add(1, Ordering::Relaxed);
        }
        let debt_periods = (window.used.as_nanos() / self.per_period.as_nanos().max(1)) as u32;
        Some(window.start + CPU_PERIOD * debt_periods.max(1))
    }

    /// When a call over the share must wait until (the period's end, never
    /// past `cap`), that wait counted as throttled time; `None`: it may
    /// run on.
    pub fn throttle(&self, now: Instant, cap: Option<Instant>) -> Option<Instant> {
        let until = self.wait_until(now)?;
        let until = cap.map_or(until, |cap| until.min(cap));
        self.add_throttled(until.saturating_duration_since(now));
        Some(until)
    }

    /// Count `waited` as throttled time.
    pub fn add_throttled(&self, waited: Duration) {
        self.throttled_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Throttled time so far, and the periods in which a call waited.
    pub fn throttled(&self) -> (Duration, u64) {
        (
            Duration::from_nanos(self.throttled_ns.load(Ordering::Relaxed)),
            self.throttled_periods.load(Ordering::Relaxed),
        )
    }
}

/// Tables may hold at most this many elements.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Counts an instance's linear memory against its limit.
#[derive(Debug)]
pub struct MemoryMeter {
    limit: u64,
    current: u64,
    peak: u64,
    refused: Option<u64>,
}

impl MemoryMeter {
    /// A meter allowing `limit` bytes of linear memory in total.
    pub fn new(limit: u64) -> MemoryMeter {
        MemoryMeter { limit, current: 0, peak: 0, refused: None }
    }

    /// Start a new metering window (one request): the peak restarts from
    /// the memory the instance holds now.
    pub fn reset_window(&mut self) {
        self.peak = self.current;
        self.refused = None;
    }

    /// Bytes of linear memory held now.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// Largest total since the window started.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// The size a refused growth asked for, if growth was refused.
    pub fn refused(&self) -> Option<u64> {
        self.refused
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

impl ResourceLimiter for MemoryMeter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        let after = self.current - current as u64 + desired as u64;
        if after > self.limit {
            self.refused = Some(after);
            return Ok(false);
        }
        self.current = after;
        self.peak = self.peak.max(after);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The typed cause raised from the epoch callback when a request (or hook)
/// runs past its deadline.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("deadline exceeded")]
pub struct DeadlineExceeded;

/// Name the limit or failure behind `error`, raised by a guest call on a
/// store whose memory meter is `memory` and whose deadline passed iff
/// `deadline_passed`.
pub fn classify(error: &wasmtime::Error, memory: &MemoryMeter, deadline_passed: bool) -> Outcome {
    // Every instance slot of the engine's pool is taken.
    if error.chain().any(|cause| cause.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some()) {
        return Outcome::Overloaded;
    }
    if error.chain().any(|cause| cause.downcast_ref::<DeadlineExceeded>().is_some()) || deadline_passed {
        return Outcome::Timeout;
    }
    if let Some(trap) = error.downcast_ref::<Trap>() {
        if *trap == Trap::OutOfFuel {
            return Outcome::FuelExhausted;
        }
        // A refused memory.grow surfaces as the guest's own abort (Rust's
        // allocation-failure handler) or as a failed allocation trap.
        if memory.refused().is_some() {
            return Outcome::MemoryLimit;
        }
        return Outcome::Trap;
    }
    if memory.refused().is_some() {
        return Outcome::MemoryLimit;
    }
    Outcome::Trap
}

/// The CPU time of the guest call under way on an instance, readable
/// from inside the call (its epoch callback) while [`CpuTimed`] measures
/// it: what earlier polls used plus what the current one has so far. It
/// also keeps the call's place among the engine's CPU-bound turns.
#[derive(Debug)]
pub struct CallCpu {
    /// CPU time of the call's finished polls, in nanoseconds.
    polls_ns: AtomicU64,
    /// The polling thread's CPU clock when the current poll began;
    /// [`CallCpu::NOT_POLLED`] between polls (and outside measured calls,
    /// such as an instantiation).
    poll_began_ns: AtomicU64,
    /// Whether the poll under way is one of a single guest call's (under
    /// [`CpuTimed`]), not an instantiation's or a shared event loop's.
    one_call: AtomicBool,
    seat: Arc<Seat>,
}

impl Default for CallCpu {
    fn default() -> CallCpu {
        CallCpu {
            polls_ns: AtomicU64::new(0),
            poll_began_ns: AtomicU64::new(CallCpu::NOT_POLLED),
            one_call: AtomicBool::new(false),
            seat: Arc::default(),
        }
    }
}

impl CallCpu {
    /// A poll of the call ended (see [`Seat::poll_ended`]).
    fn poll_ended(&self) {
        self.seat.poll_ended();
    }

    /// The call's place among the engine's [`Turns`](crate::engine::Turns).
    pub(crate) fn seat(&self) -> Arc<Seat> {
        self.seat.clone()
    }

    /// A new call on the instance: nothing of an abandoned one's turn stays.
    pub(crate) fn reset_turn(&self) {
        self.seat.reset();
    }
}

impl CallCpu {
    const NOT_POLLED: u64 = u64::MAX;

    /// The call's CPU time so far: its finished polls, plus the current
    /// poll's when asked on the thread polling it (the epoch callback runs
    /// there).
    pub fn so_far(&self) -> Duration {
        let polls = self.polls_ns.load(Ordering::Relaxed);
        let current = match self.poll_began_ns.load(Ordering::Relaxed) {
            CallCpu::NOT_POLLED => 0,
            began => duration_ns(thread_cpu_time()).saturating_sub(began),
        };
        Duration::from_nanos(polls.saturating_add(current))
    }

    /// Whether the guest code running now is a single call's, measured
    /// from its start: a short one may run on at a tick. Code measured per
    /// poll (a shared instance's event loop: several requests, each
    /// resuming) or not at all (an instantiation) yields at every tick.
    pub fn one_call(&self) -> bool {
        self.one_call.load(Ordering::Relaxed)
    }

    /// A poll of a call that lasts for ever (a shared instance's event
    /// loop) begins, at thread CPU time `now`: "so far" is this poll's.
    pub(crate) fn begin_poll(&self, now: Duration) {
        self.polls_ns.store(0, Ordering::Relaxed);
        self.poll_began_ns.store(duration_ns(now), Ordering::Relaxed);
    }

    /// The poll begun with [`CallCpu::begin_poll`] has ended.
    pub(crate) fn end_poll(&self) {
        self.poll_began_ns.store(CallCpu::NOT_POLLED, Ordering::Relaxed);
        self.poll_ended();
    }
}

fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

pin_project_lite::pin_project! {
    /// Adds up the thread CPU time spent in each poll of `inner`: with
    /// async calls, the guest runs inside `poll`, on whichever worker thread
    /// polls it, so this is the guest's CPU time (plus its host calls).
    /// Each poll's time is also charged to `quota`, when there is one.
    pub struct CpuTimed<F> {
        #[pin]
        inner: F,
        cpu: Duration,
        quota: Option<Arc<CpuQuota>>,
        probe: Option<Arc<CallCpu>>,
    }
}

impl<F> CpuTimed<F> {
    /// Measure `inner`, charging `quota`.
    pub fn new(inner: F, quota: Option<Arc<CpuQuota>>) -> CpuTimed<F> {
        CpuTimed { inner, cpu: Duration::ZERO, quota, probe: None }
    }

    /// The same, keeping `probe` up to date as the call goes (it starts
    /// again from zero).
    pub fn with_probe(inner: F, quota: Option<Arc<CpuQuota>>, probe: Arc<CallCpu>) -> CpuTimed<F> {
        probe.polls_ns.store(0, Ordering::Relaxed);
        CpuTimed { inner, cpu: Duration::ZERO, quota, probe: Some(probe) }
    }

    /// The CPU time of the polls so far.
    pub fn cpu(&self) -> Duration {
        self.cpu
    }
}

impl<F: std::future::Future> std::future::Future for CpuTimed<F> {
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.project();
        let before = thread_cpu_time();
        if let Some(probe) = this.probe {
            probe.poll_began_ns.store(duration_ns(before), Ordering::Relaxed);
            probe.one_call.store(true, Ordering::Relaxed);
        }
        let poll = this.inner.poll(cx);
        let used = thread_cpu_time().saturating_sub(before);
        *this.cpu += used;
        if let Some(probe) = this.probe {
            probe.polls_ns.store(duration_ns(*this.cpu), Ordering::Relaxed);
            probe.poll_began_ns.store(CallCpu::NOT_POLLED, Ordering::Relaxed);
            probe.one_call.store(false, Ordering::Relaxed);
            probe.poll_ended();
        }
        if let Some(quota) = this.quota {
            quota.charge(used);
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spin until this thread has used `cpu` more CPU time.
    fn compute(cpu: Duration) {
        let start = thread_cpu_time();
        while thread_cpu_time().saturating_sub(start) < cpu {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_calls_cpu_so_far_counts_its_polls_and_the_one_under_way_but_not_the_waits_between() {
        let probe = Arc::new(CallCpu::default());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut polls = 0;
        let call = {
            let (probe, seen) = (probe.clone(), seen.clone());
            std::future::poll_fn(move |_| {
                polls += 1;
                compute(Duration::from_millis(20));
                seen.lock().unwrap().push(probe.so_far());
                if polls == 2 { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
            })
        };
        let mut timed = std::pin::pin!(CpuTimed::with_probe(call, None, probe.clone()));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(timed.as_mut().poll(&mut cx).is_pending());
        // Waiting between polls (here sleeping) is not the call's CPU.
        std::thread::sleep(Duration::from_millis(60));
        let between = probe.so_far();
        assert!(timed.as_mut().poll(&mut cx).is_ready());
        let seen = seen.lock().unwrap().clone();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        assert!((20.0..40.0).contains(&ms(seen[0])), "inside the first poll: {seen:?}");
        assert!((20.0..40.0).contains(&ms(between)), "between the polls: {between:?}");
        assert!((40.0..80.0).contains(&ms(seen[1])), "inside the second poll: {seen:?}");
        assert!(ms(timed.cpu()) >= 40.0, "{:?}", timed.cpu());
        // A new call starts again from zero.
        let again = CpuTimed::with_probe(std::future::ready(()), None, probe.clone());
        assert!(probe.so_far() < Duration::from_millis(1), "{:?}", probe.so_far());
        drop(again);
    }

    #[test]
    fn a_cpu_quota_waits_out_a_spent_period_and_carries_debt() {
        let quota = CpuQuota::new(NonZeroU32::new(100).unwrap()); // 10 ms per 100 ms
        let now = Instant::now();
        assert_eq!(quota.wait_until(now), None);
        quota.charge(Duration::from_millis(9));
        assert_eq!(quota.wait_until(now), None, "under the share");
        quota.charge(Duration::from_millis(2));
        let until = quota.wait_until(now).expect("spent");
        assert!(until > now && until <= now + CPU_PERIOD, "waits for the period's end");
        // Overdrawn by three periods' worth: waits three periods.
        quota.charge(Duration::from_millis(20));
        let until = quota.wait_until(now).unwrap();
        assert!(until > now + 2 * CPU_PERIOD && until <= now + 3 * CPU_PERIOD + Duration::from_millis(1));
        assert_eq!(quota.throttled().1, 1, "one throttled period so far");
        quota.add_throttled(Duration::from_millis(5));
        assert_eq!(quota.throttled().0, Duration::from_millis(5));
    }

    #[test]
    fn memory_meter_refuses_growth_past_the_limit_and_tracks_the_peak() {
        let mut meter = MemoryMeter::new(10 << 20);
        assert!(meter.memory_growing(0, 2 << 20, None).unwrap());
        assert!(meter.memory_growing(2 << 20, 8 << 20, None).unwrap());
        assert!(!meter.memory_growing(8 << 20, 11 << 20, None).unwrap());
        assert_eq!(meter.refused(), Some(11 << 20));
        assert_eq!(meter.peak(), 8 << 20);
        meter.reset_window();
        assert_eq!((meter.peak(), meter.refused()), (8 << 20, None));
    }

    #[test]
    fn errors_are_classified_by_their_typed_cause() {
        let meter = MemoryMeter::new(1);
        let fuel = wasmtime::Error::from(Trap::OutOfFuel);
        assert_eq!(classify(&fuel, &meter, false), Outcome::FuelExhausted);
        let deadline = wasmtime::Error::new(DeadlineExceeded).context("while handling");
        assert_eq!(classify(&deadline, &meter, false), Outcome::Timeout);
        let trap = wasmtime::Error::from(Trap::UnreachableCodeReached);
        assert_eq!(classify(&trap, &meter, false), Outcome::Trap);
        let mut refused = MemoryMeter::new(1);
        assert!(!refused.memory_growing(0, 2, None).unwrap());
        assert_eq!(classify(&trap, &refused, false), Outcome::MemoryLimit);
    }
}
