//! An instance that serves several requests at once: a WASI 0.3 HTTP
//! handler is an async export, and one instance may run many of its calls
//! interleaved, as `wasmtime serve` and Spin do (`instance_concurrency`).
//!
//! The instance's store is owned by one driver task, which runs its event
//! loop (`run_concurrent`) and starts each request handed to it as a guest
//! task of its own. What is per request stays per request although the
//! calls interleave on one store:
//!
//! - **Context.** A call hook sees every entry into the guest and looks up
//!   the guest task it belongs to (the root of its async call stack). When
//!   that changes, the store is switched to the other request's context:
//!   its request id and trace (logs, invoke, records), its invoke depth and
//!   counter, its deadline (the epoch callback enforces the current task's)
//!   and its fuel (each request has its own `fuel_per_request`; the store's
//!   fuel is the running task's).
//! - **CPU time.** Each poll of the event loop is measured on the thread's
//!   CPU clock. Within it, the monotonic clock (cheap: no system call) is
//!   read at each switch and each return from the guest: what runs between
//!   an entry into a task and the next switch or return (guest code and
//!   the host calls it makes) is that request's segment, and the poll's CPU
//!   time is divided between the segments in proportion; the event loop's
//!   own part (wasmtime's scheduling, the body streams' plumbing) is split
//!   evenly between the requests in flight then. The records of a poll's
//!   requests add up to what the poll used.
//! - **Wall time** is each request's own; **memory** is the instance's (a
//!   record's peak memory is the instance's linear memory when the request
//!   ended, which never shrinks), and `memory_mb` bounds the instance.
//!
//! What requests sharing an instance also share is its fate: a request
//! that traps, runs out of fuel, passes its timeout in guest code or grows
//! memory past the limit ends the instance, and the requests in it at that
//! moment fail with it (their records say so, naming the request that
//! failed). A function that needs each request isolated keeps
//! `instance_concurrency = 1`.

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot, watch};
use wasmtime::component::{Accessor, GuestTaskId, Resource, TypedFunc};
use wasmtime::{AsContextMut, CallHook, StoreContextMut};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p3::bindings::http::types::ErrorCode as P3ErrorCode;

use super::{
    Declined, Instance, InstanceError, ResponseResult, UNLIMITED_FUEL, describe, explain_limit, p2_error_code,
    with_scheme_and_authority,
};
use crate::abi::bindings::exports::shoal::runtime::events;
use crate::guest::GuestState;
use crate::limits::{CpuQuota, classify, thread_cpu_time};
use crate::metering::CallStats;
use crate::outcome::Outcome;
use crate::request::{RequestMeta, TraceContext};

/// `wasi:http/handler@0.3`'s `handle`.
type HandleFunc = TypedFunc<
    (Resource<wasmtime_wasi_http::p3::Request>,),
    (Result<Resource<wasmtime_wasi_http::p3::Response>, P3ErrorCode>,),
>;
/// `shoal:runtime/events`' `handle`.
type EventsFunc = TypedFunc<(events::Message,), (Result<(), String>,)>;

/// A request body as the driver takes it (one type for every trigger).
pub(crate) type SharedBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, wasmtime_wasi_http::Error>;

/// What a request or message handed to a shared instance ended with.
type Reply<R> = oneshot::Sender<(CallStats, Result<R, InstanceError>)>;

/// One piece of work for the driver.
enum Job {
    Http {
        request: hyper::Request<SharedBody>,
        meta: RequestMeta,
        respond: Box<dyn FnOnce(ResponseResult) + Send + Sync>,
        reply: Reply<()>,
        seq: u64,
    },
    Message {
        message: events::Message,
        meta: RequestMeta,
        reply: Reply<Result<(), Declined>>,
        seq: u64,
    },
}

/// Why a shared instance ended with requests in it.
#[derive(Debug)]
struct Failure {
    /// The job whose guest code was running when it failed, if known.
    culprit: Option<u64>,
    error: InstanceError,
    /// What each job in flight had used by then.
    used: HashMap<u64, CallStats>,
}

/// A live instance serving requests at once, driven by its own task.
pub(crate) struct SharedInstance {
    jobs: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    meter: Arc<Meter>,
    failed: watch::Receiver<Option<Arc<Failure>>>,
    /// Set when it may not take more work (failed, or a request of it
    /// outlived its timeout while blocked in the host); shared with the
    /// driver, which then drops the instance without `destroy`.
    broken: Arc<AtomicBool>,
    /// Linear memory when its last request ended.
    memory: AtomicU64,
    timeout: Duration,
    next_seq: AtomicU64,
}

impl SharedInstance {
    /// Hand `instance` (instantiated, `start` run) to a driver task on
    /// `runtime`. `exited` runs when the driver ends, with the instance
    /// when it ended cleanly (for its `destroy`), or `None` when it failed.
    pub(crate) fn drive(
        instance: Instance,
        runtime: &tokio::runtime::Handle,
        exited: impl FnOnce(Option<Instance>) + Send + 'static,
    ) -> Result<Arc<SharedInstance>, InstanceError> {
        let mut instance = instance;
        let funcs = Funcs::find(&mut instance)?;
        let meter = Arc::new(Meter::default());
        let hook_meter = meter.clone();
        let mut settled = None;
        instance.store.call_hook(move |store, hook| switch_on_entry(&hook_meter, &mut settled, store, hook));
        let (jobs, receiver) = mpsc::unbounded_channel();
        let (fail, failed) = watch::channel(None);
        let broken = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(SharedInstance {
            jobs: Mutex::new(Some(jobs)),
            meter: meter.clone(),
            failed,
            broken: broken.clone(),
            memory: AtomicU64::new(instance.memory_bytes()),
            timeout: instance.function.spec().limits.timeout,
            next_seq: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&shared);
        runtime.spawn(async move {
            // Run `exited` even if the driver panics: the pool counts the
            // instance gone.
            let mut exit = OnExit(Some(exited));
            let ended = run(instance, funcs, receiver, meter, weak).await;
            let instance = match ended {
                // Its state can no longer be trusted: no `destroy`.
                Ok(_) if broken.load(Ordering::Acquire) => None,
                Ok(instance) => Some(instance),
                Err(failure) => {
                    let _ = fail.send(Some(Arc::new(failure)));
                    None
                }
            };
            if let Some(exited) = exit.0.take() {
                exited(instance);
            }
        });
        Ok(shared)
    }

    /// Whether it may take more work.
    pub(crate) fn is_healthy(&self) -> bool {
        !self.broken.load(Ordering::Acquire) && self.failed.borrow().is_none()
    }

    /// Linear memory when its last request ended.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory.load(Ordering::Relaxed)
    }

    /// Take no more work: the driver ends once the work in flight has.
    pub(crate) fn close(&self) {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    /// Serve one HTTP request in this instance (see [`Instance::handle`]).
    ///
    /// Not an `async fn`: one would hold `request` twice more (as given,
    /// and boxed) beside the job's, in every request's call future.
    pub(crate) fn handle<B>(
        &self,
        request: hyper::Request<B>,
        meta: &RequestMeta,
        respond: impl FnOnce(ResponseResult) + Send + Sync + 'static,
    ) -> impl Future<Output = (CallStats, Result<(), InstanceError>)> + Send + '_
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        use http_body_util::BodyExt;
        let request = request.map(|body| body.map_err(Into::into).boxed_unsync());
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let job = Job::Http { request, meta: meta.clone(), respond: Box::new(respond), reply, seq };
        self.submit(job, seq, answer)
    }

    /// Deliver one message in this instance (see [`Instance::deliver`]).
    pub(crate) async fn deliver(
        &self,
        message: events::Message,
        meta: &RequestMeta,
    ) -> (CallStats, Result<Result<(), Declined>, InstanceError>) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let job = Job::Message { message, meta: meta.clone(), reply, seq };
        self.submit(job, seq, answer).await
    }

    async fn submit<R>(
        &self,
        job: Job,
        seq: u64,
        answer: oneshot::Receiver<(CallStats, Result<R, InstanceError>)>,
    ) -> (CallStats, Result<R, InstanceError>) {
        let started = Instant::now();
        let sent = match &*self.jobs.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(jobs) => jobs.send(job).is_ok(),
            None => false,
        };
        if !sent {
            return (CallStats::default(), Err(self.lost(seq, started).await.1));
        }
        // A backstop past the timeout, for a request whose guest task waits
        // in the host (epochs only interrupt guest code): it is answered,
        // and the instance, whose task may never end, takes no more work.
        match tokio::time::timeout(self.timeout + Duration::from_millis(20), answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => {
                let (stats, error) = self.lost(seq, started).await;
                (stats, Err(error))
            }
            Err(_) => {
                self.broken.store(true, Ordering::Release);
                let mut stats = self.meter.used(seq, None).unwrap_or_default();
                stats.wall = started.elapsed();
                (stats, Err(InstanceError { outcome: Outcome::Timeout, message: "timed out".to_string() }))
            }
        }
    }

    /// The account of a job the driver dropped: the instance failed.
    async fn lost(&self, seq: u64, started: Instant) -> (CallStats, InstanceError) {
        let mut failed = self.failed.clone();
        // The driver publishes the failure just after it drops its jobs.
        let failure = tokio::time::timeout(Duration::from_secs(1), failed.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(Result::ok)
            .and_then(|failure| failure.clone());
        let Some(failure) = failure else {
            let error = InstanceError {
                outcome: Outcome::HostError,
                message: "its shared instance stopped before serving it".to_string(),
            };
            return (CallStats { wall: started.elapsed(), ..CallStats::default() }, error);
        };
        let mut stats = failure.used.get(&seq).copied().unwrap_or_default();
        stats.wall = started.elapsed();
        let error = if failure.culprit == Some(seq) {
            failure.error.clone()
        } else {
            InstanceError {
                outcome: Outcome::Trap,
                message: format!(
                    "the instance it shared with other requests failed ({}: {})",
                    failure.error.outcome, failure.error.message
                ),
            }
        };
        (stats, error)
    }
}

/// Calls its function with `None` when dropped unless taken first.
struct OnExit<F: FnOnce(Option<Instance>)>(Option<F>);

impl<F: FnOnce(Option<Instance>)> Drop for OnExit<F> {
    fn drop(&mut self) {
        if let Some(exited) = self.0.take() {
            exited(None);
        }
    }
}

/// The exports a shared instance calls.
struct Funcs {
    handle: Option<HandleFunc>,
    events: Option<EventsFunc>,
}

impl Funcs {
    fn find(instance: &mut Instance) -> Result<Funcs, InstanceError> {
        let component = instance.code.pre.component().clone();
        let engine = instance.store.engine().clone();
        let names: Vec<String> =
            component.component_type().exports(&engine).map(|(name, _)| name.to_string()).collect();
        let wasm = instance.wasm;
        let mut typed = |prefix: &str| {
            let interface = names.iter().find(|name| name.starts_with(prefix))?;
            let interface = wasm.get_export_index(&mut instance.store, None, interface)?;
            let func = wasm.get_export_index(&mut instance.store, Some(&interface), "handle")?;
            Some(func)
        };
        let (handle, events) = (typed("wasi:http/handler@0.3."), typed("shoal:runtime/events@"));
        let lookup_failed = |err: wasmtime::Error| InstanceError {
            outcome: Outcome::HostError,
            message: format!("cannot call its exports concurrently: {}", describe(&err)),
        };
        Ok(Funcs {
            handle: handle
                .map(|func| wasm.get_typed_func(&mut instance.store, func))
                .transpose()
                .map_err(lookup_failed)?,
            events: events
                .map(|func| wasm.get_typed_func(&mut instance.store, func))
                .transpose()
                .map_err(lookup_failed)?,
        })
    }
}

/// What a request running in a shared instance has used, and its context.
struct Task {
    seq: u64,
    /// CPU time of its finished polls' segments.
    cpu: Duration,
    /// Monotonic time of its segments in the poll under way.
    poll_ns: u64,
    /// [`MeterState::shared_per_task_ns`] when it began.
    shared_from_ns: u64,
    fuel_given: Option<u64>,
    fuel_left: u64,
    throttled: Duration,
    deadline: Instant,
    request: (Arc<str>, TraceContext),
    depth: u32,
    invokes: Arc<std::sync::atomic::AtomicU32>,
}

/// The per-request meters of one shared instance (see the module docs).
#[derive(Default)]
pub(crate) struct Meter {
    state: Mutex<MeterState>,
    /// How many times `state` was locked ([`Meter::lock`]): while it has
    /// not changed, nothing in `state` has.
    locks: AtomicU64,
}

#[derive(Default)]
struct MeterState {
    tasks: HashMap<GuestTaskId, Task>,
    /// Jobs whose guest task has ended and whose id a newer task got
    /// (wasmtime reuses the slots of its task table), by job: their jobs
    /// are still under way (the response still streaming), and their
    /// records still to be made.
    gone: HashMap<u64, Task>,
    /// The task whose context (fuel, deadline, request) the store holds.
    context: Option<GuestTaskId>,
    /// The task charged for the time since `mark` (none: the event loop).
    running: Option<GuestTaskId>,
    /// The monotonic clock at the last charge, during a poll.
    mark: Option<Instant>,
    /// When the poll under way began, and its thread CPU clock then.
    poll_began: Option<(Instant, Duration)>,
    /// The tasks with segments in the poll under way.
    touched: Vec<GuestTaskId>,
    /// The event loop's own time in the poll under way.
    loop_ns: u64,
    /// The event loop's CPU time per request in flight, summed.
    shared_per_task_ns: u64,
    /// The event loop has ended: calls (`destroy`) are the instance's own.
    ended: bool,
}

impl MeterState {
    /// Charge the time since the mark to the running task's segment, or
    /// to the event loop's.
    fn charge(&mut self, now: Instant) {
        let Some(mark) = self.mark.replace(now) else { return };
        let used = nanos(now.saturating_duration_since(mark));
        match self.running.and_then(|task| self.tasks.get_mut(&task)) {
            Some(task) => {
                if task.poll_ns == 0 {
                    self.touched.extend(self.running);
                }
                task.poll_ns += used;
            }
            None => self.loop_ns += used,
        }
    }

    /// A poll of the event loop begins.
    fn begin_poll(&mut self, now: Instant, cpu: Duration) {
        self.mark = Some(now);
        self.poll_began = Some((now, cpu));
        self.running = None;
    }

    /// The poll ends: its thread CPU time is divided between the segments
    /// of its tasks in proportion to their monotonic time, and the event
    /// loop's part evenly between the requests in flight. Returns the
    /// poll's CPU time.
    fn end_poll(&mut self, now: Instant, cpu: Duration) -> Duration {
        self.charge(now);
        self.mark = None;
        let Some((began, cpu_began)) = self.poll_began.take() else { return Duration::ZERO };
        let used = cpu.saturating_sub(cpu_began);
        let wall = nanos(now.saturating_duration_since(began)).max(1);
        let scale = |part: u64| {
            Duration::from_nanos(
                u64::try_from(u128::from(nanos(used)) * u128::from(part) / u128::from(wall)).unwrap_or(u64::MAX),
            )
        };
        // Drained, not taken: the list keeps its room for the next poll
        // (taken, it was allocated anew in every poll).
        for id in self.touched.drain(..) {
            if let Some(task) = self.tasks.get_mut(&id) {
                task.cpu += scale(task.poll_ns);
                task.poll_ns = 0;
            }
        }
        if let Some(share) = nanos(scale(self.loop_ns)).checked_div(self.tasks.len() as u64) {
            self.shared_per_task_ns = self.shared_per_task_ns.saturating_add(share);
        }
        self.loop_ns = 0;
        used
    }

    fn task_of(&self, seq: u64) -> Option<&Task> {
        self.tasks.values().find(|task| task.seq == seq).or_else(|| self.gone.get(&seq))
    }

    /// Meter job `seq` as guest task `id`. A task of an earlier job that
    /// had this id has ended: its entry moves aside, keeping what it used
    /// (`fuel_now`: the store's fuel, when it held that task's).
    fn start(&mut self, id: GuestTaskId, task: Task, fuel_now: Option<u64>) {
        if let Some(mut old) = self.tasks.remove(&id) {
            if self.context == Some(id) {
                old.fuel_left = fuel_now.unwrap_or(old.fuel_left);
                self.context = None;
            }
            if self.running == Some(id) {
                self.running = None;
            }
            old.cpu += Duration::from_nanos(std::mem::take(&mut old.poll_ns));
            self.touched.retain(|touched| *touched != id);
            self.gone.insert(old.seq, old);
        }
        // A task already forgotten can still be in context: its guest code
        // ran on after its job ended (an epoch yield between the body's end
        // and the task's exit). Its id, freed, comes back for this job; left
        // in context, the new task's first entry would look like no switch
        // and run with the store as that code left it (unlimited fuel).
        if self.context == Some(id) {
            self.context = None;
        }
        if self.running == Some(id) {
            self.running = None;
        }
        self.tasks.insert(id, task);
    }

    fn stats(&self, task: &Task, fuel_now: Option<u64>) -> CallStats {
        let shared = Duration::from_nanos(self.shared_per_task_ns.saturating_sub(task.shared_from_ns));
        let left = fuel_now.unwrap_or(task.fuel_left);
        CallStats {
            wall: Duration::ZERO,
            // The poll under way (not yet measured) by its monotonic time.
            cpu: task.cpu + Duration::from_nanos(task.poll_ns) + shared,
            fuel: task.fuel_given.map(|given| given.saturating_sub(left)),
            peak_memory: 0,
            throttled: task.throttled,
        }
    }
}

impl Meter {
    fn lock(&self) -> MutexGuard<'_, MeterState> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Counted under the lock: a load and a store do.
        self.locks.store(self.locks.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        state
    }

    /// The count of [`Meter::lock`]s so far.
    fn locks(&self) -> u64 {
        self.locks.load(Ordering::Relaxed)
    }

    /// Stop metering job `seq` (task `task`): its requester is gone.
    fn forget(&self, task: GuestTaskId, seq: u64) {
        let mut state = self.lock();
        state.gone.remove(&seq);
        if state.tasks.get(&task).is_some_and(|entry| entry.seq == seq) {
            state.tasks.remove(&task);
            if state.context == Some(task) {
                state.context = None;
            }
            if state.running == Some(task) {
                state.running = None;
            }
        }
    }

    /// What job `seq` has used so far (its fuel as saved at its last switch
    /// unless `fuel_now`, the store's, is given for the task in context).
    fn used(&self, seq: u64, fuel_now: Option<u64>) -> Option<CallStats> {
        let state = self.lock();
        state.task_of(seq).map(|task| state.stats(task, fuel_now))
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The call hook of a shared instance's store: on each entry into the
/// guest, switch the store to the entered task's request if it is another
/// one, charging CPU time as it goes; on each return from the guest, charge
/// the task and hand the clock to the event loop.
///
/// `settled`: the task found running in its own context at the last entry,
/// and the meter's lock count then. While no one has locked the meter
/// since, running and context are still that task, and an entry of the
/// same task (a return from a host call that let no other task in, the
/// most frequent entry) needs no lock.
fn switch_on_entry(
    meter: &Meter,
    settled: &mut Option<(GuestTaskId, u64)>,
    mut store: StoreContextMut<'_, GuestState>,
    hook: CallHook,
) -> wasmtime::Result<()> {
    match hook {
        CallHook::CallingHost => Ok(()),
        CallHook::ReturningFromWasm => {
            let mut state = meter.lock();
            if state.mark.is_some() {
                state.charge(Instant::now());
            }
            state.running = None;
            Ok(())
        }
        CallHook::CallingWasm | CallHook::ReturningFromHost => {
            // (Unchanged since settled, so not ended either: the event
            // loop runs, and the call stack can be asked.)
            let mut found = None;
            if let Some((task, locks)) = *settled
                && locks == meter.locks()
            {
                let root = store.async_call_stack()?.last();
                if root == Some(task) {
                    return Ok(());
                }
                found = Some(root);
            }
            let mut state = meter.lock();
            if state.ended {
                return Ok(());
            }
            let root = match found {
                Some(root) => root,
                None => store.async_call_stack()?.last(),
            };
            if state.running != root || state.context != root {
                if state.mark.is_some() {
                    state.charge(Instant::now());
                }
                state.running = root;
                if state.context != root {
                    switch_context(&mut store, &mut state, root);
                }
            }
            // (A task no longer metered is never in context: each of its
            // entries takes the lock.)
            *settled = root.filter(|_| state.context == root).map(|root| (root, meter.locks()));
            Ok(())
        }
    }
}

/// Save the store's per-request state into the task in context and load
/// `to`'s.
fn switch_context(store: &mut StoreContextMut<'_, GuestState>, state: &mut MeterState, to: Option<GuestTaskId>) {
    let fuel = store.get_fuel().ok();
    let data = store.data_mut();
    let throttled = std::mem::take(&mut data.throttled);
    let (_, invokes) = data.abi_context();
    if let Some(task) = state.context.and_then(|from| state.tasks.get_mut(&from)) {
        task.fuel_left = fuel.unwrap_or(task.fuel_left);
        task.throttled += throttled;
        task.invokes = invokes;
    }
    // Only a task being metered is "in context": a forgotten one's code
    // runs outside any request (below), and its id may come back for a
    // new job, whose first entry must then switch.
    state.context = to.filter(|to| state.tasks.contains_key(to));
    match to.and_then(|to| state.tasks.get(&to)) {
        Some(task) => {
            data.deadline = task.deadline;
            data.log.set_request(Some(task.request.clone()));
            data.set_abi_context(task.depth, task.invokes.clone());
            if fuel.is_some() {
                let _ = store.set_fuel(task.fuel_left);
            }
        }
        None => {
            // Guest code outside any request's task (none is expected):
            // bounded by the instance's own hooks' timeout, unmetered.
            data.deadline = Instant::now() + Duration::from_secs(5);
            data.log.set_request(None);
            data.set_abi_context(0, Arc::default());
            if fuel.is_some() {
                let _ = store.set_fuel(UNLIMITED_FUEL);
            }
        }
    }
}

/// Run the instance's event loop until its job channel closes and its
/// work is done (`Ok`, the instance back for `destroy`) or it fails.
async fn run(
    mut instance: Instance,
    funcs: Funcs,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    meter: Arc<Meter>,
    shared: std::sync::Weak<SharedInstance>,
) -> Result<Instance, Failure> {
    let function = instance.function.clone();
    let limits = function.spec().limits.clone();
    let fuel_enabled = function.meters_fuel();
    let funcs = &funcs;
    let meter_in = meter.clone();
    let quota = function.inner.cpu.clone();
    let clock = function.engine.hold_clock();
    let probe = instance.store.data().call_cpu.clone();
    let shared_in = shared.clone();
    let event_loop = instance.store.run_concurrent(async move |accessor: &Accessor<GuestState>| {
        let mut running: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send + '_>>> = FuturesUnordered::new();
        loop {
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => running.push(Box::pin(serve(accessor, funcs, job, &meter_in, &limits, fuel_enabled, &shared_in))),
                    None => break,
                },
                Some(()) = running.next(), if !running.is_empty() => {}
            }
        }
        while running.next().await.is_some() {}
    });
    let polled = Polled { inner: event_loop, meter: meter.clone(), quota, probe };
    let result = polled.await;
    drop(clock);
    match result {
        Ok(()) => {
            // Its destroy hook runs as an ordinary call.
            meter.lock().ended = true;
            Ok(instance)
        }
        Err(err) => {
            let state = meter.lock();
            let culprit = state.context.and_then(|task| state.tasks.get(&task)).map(|task| task.seq);
            let deadline_passed = Instant::now() >= instance.store.data().deadline;
            let outcome = classify(&err, &instance.store.data().memory, deadline_passed);
            let error = explain_limit(&function.spec().limits, InstanceError { outcome, message: describe(&err) });
            let fuel_now = instance.store.get_fuel().ok();
            let used = state
                .tasks
                .iter()
                .map(|(id, task)| {
                    let fuel = (state.context == Some(*id)).then_some(fuel_now).flatten();
                    (task.seq, state.stats(task, fuel))
                })
                .chain(state.gone.values().map(|task| (task.seq, state.stats(task, None))))
                .collect();
            drop(state);
            if let Some(shared) = shared.upgrade() {
                shared.broken.store(true, Ordering::Release);
            }
            tracing::warn!(
                function = function.name(),
                error.type = %error.outcome,
                error = %error.message,
                "a shared instance failed; the requests it was serving fail with it"
            );
            Err(Failure { culprit, error, used })
        }
    }
}

/// Serve one job as a guest task of the instance.
#[allow(clippy::too_many_arguments)]
async fn serve(
    accessor: &Accessor<GuestState>,
    funcs: &Funcs,
    job: Job,
    meter: &Meter,
    limits: &crate::manifest::Limits,
    fuel_enabled: bool,
    shared: &std::sync::Weak<SharedInstance>,
) {
    let started = Instant::now();
    let fuel_given = fuel_enabled.then(|| limits.fuel_per_request.map_or(UNLIMITED_FUEL, NonZeroU64::get));
    let task_of = |task: GuestTaskId, seq: u64, meta: &RequestMeta, fuel_now: Option<u64>| {
        let mut state = meter.lock();
        let shared_from_ns = state.shared_per_task_ns;
        state.start(
            task,
            Task {
                seq,
                cpu: Duration::ZERO,
                poll_ns: 0,
                shared_from_ns,
                fuel_given,
                fuel_left: fuel_given.unwrap_or(UNLIMITED_FUEL),
                throttled: Duration::ZERO,
                deadline: started + limits.timeout,
                request: (meta.id.clone(), meta.trace),
                depth: meta.depth,
                invokes: Arc::default(),
            },
            fuel_now,
        );
    };
    match job {
        Job::Http { request, meta, respond, mut reply, seq } => {
            let Some(handle) = funcs.handle else {
                let error = InstanceError { outcome: Outcome::NoResponse, message: "has no HTTP handler".to_string() };
                let _ = reply.send((CallStats::default(), Err(error)));
                return;
            };
            let request = with_scheme_and_authority(request);
            let started_call = accessor.with(|mut access| -> wasmtime::Result<_> {
                let hooks = access.get().http().hooks;
                let (request, sent) = wasmtime_wasi_http::p3::Request::from_http(hooks, request);
                let sent: Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>> = Box::pin(sent);
                let request = access.get().http().table.push(request)?;
                let call = handle.start_call_concurrent(&mut access, (request,))?;
                let task = call.task();
                task_of(task, seq, &meta, access.as_context_mut().get_fuel().ok());
                Ok((call, sent, task))
            });
            let (call, sent, task) = match started_call {
                Ok(started) => started,
                Err(err) => {
                    let error = InstanceError { outcome: Outcome::HostError, message: describe(&err) };
                    let _ = reply.send((CallStats::default(), Err(error)));
                    return;
                }
            };
            let work = async {
                match handle.finish_call_concurrent(accessor, call).await?.0 {
                    Err(code) => {
                        respond(Err(p2_error_code(&code)));
                        Ok(())
                    }
                    Ok(response) => {
                        let response = accessor.with(|mut access| -> wasmtime::Result<_> {
                            let response = access.get().http().table.delete(response)?;
                            response.into_http(&mut access, sent)
                        })?;
                        super::answer_p3(response, respond).await;
                        Ok(())
                    }
                }
            };
            // A request answered by the backstop is not waited for: its
            // task may never end, and the instance must still stop.
            let result = tokio::select! {
                result = work => result,
                () = reply.closed() => return meter.forget(task, seq),
            };
            finish(accessor, meter, limits, task, seq, started, result, reply, shared);
        }
        Job::Message { message, meta, mut reply, seq } => {
            let Some(events) = funcs.events else {
                let error = InstanceError {
                    outcome: Outcome::HostError,
                    message: "the function does not export shoal:runtime/events".to_string(),
                };
                let _ = reply.send((CallStats::default(), Err(error)));
                return;
            };
            let started_call = accessor.with(|mut access| -> wasmtime::Result<_> {
                let call = events.start_call_concurrent(&mut access, (message,))?;
                let task = call.task();
                task_of(task, seq, &meta, access.as_context_mut().get_fuel().ok());
                Ok((call, task))
            });
            let (call, task) = match started_call {
                Ok(started) => started,
                Err(err) => {
                    let error = InstanceError { outcome: Outcome::HostError, message: describe(&err) };
                    let _ = reply.send((CallStats::default(), Err(error)));
                    return;
                }
            };
            let work = events.finish_call_concurrent(accessor, call);
            let result = tokio::select! {
                result = work => result.map(|(handled,)| handled.map_err(|reason| Declined { reason })),
                () = reply.closed() => return meter.forget(task, seq),
            };
            finish(accessor, meter, limits, task, seq, started, result, reply, shared);
        }
    }
}

/// A job's end: its task's meters read and removed, its reply sent.
#[allow(clippy::too_many_arguments)]
fn finish<R>(
    accessor: &Accessor<GuestState>,
    meter: &Meter,
    limits: &crate::manifest::Limits,
    task: GuestTaskId,
    seq: u64,
    started: Instant,
    result: wasmtime::Result<R>,
    reply: Reply<R>,
    shared: &std::sync::Weak<SharedInstance>,
) {
    let (fuel_now, memory, result) = accessor.with(|mut access| {
        let store = access.as_context_mut();
        let data = store.data();
        // A failed call: the limit behind it, as for an instance of its own.
        let result = result.map_err(|err| {
            let outcome = classify(&err, &data.memory, Instant::now() >= started + limits.timeout);
            explain_limit(limits, InstanceError { outcome, message: describe(&err) })
        });
        (store.get_fuel().ok(), data.memory.current(), result)
    });
    let stats = {
        let state = meter.lock();
        let fuel_now = fuel_now.filter(|_| state.context == Some(task));
        match state.tasks.get(&task).filter(|entry| entry.seq == seq) {
            Some(entry) => Some(state.stats(entry, fuel_now)),
            None => state.gone.get(&seq).map(|entry| state.stats(entry, None)),
        }
    };
    meter.forget(task, seq);
    let stats = stats.unwrap_or_default();
    if let Some(shared) = shared.upgrade() {
        shared.memory.store(memory, Ordering::Relaxed);
    }
    if let Some(shared) = shared.upgrade().filter(|_| result.is_err()) {
        // Its instance can no longer be trusted.
        shared.broken.store(true, Ordering::Release);
    }
    let stats = CallStats { wall: started.elapsed(), peak_memory: memory, ..stats };
    let _ = reply.send((stats, result));
}

pin_project_lite::pin_project! {
    /// The event loop's future, its polls measured: each poll's CPU time is
    /// charged to the function's CPU share, and the meter's clock is set
    /// going for the poll (what no task takes is shared).
    struct Polled<F> {
        #[pin]
        inner: F,
        meter: Arc<Meter>,
        quota: Option<Arc<CpuQuota>>,
        probe: Arc<crate::limits::CallCpu>,
    }
}

impl<F: Future> Future for Polled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let before = thread_cpu_time();
        this.meter.lock().begin_poll(Instant::now(), before);
        this.probe.begin_poll(before);
        let poll = this.inner.poll(cx);
        let used = this.meter.lock().end_poll(Instant::now(), thread_cpu_time());
        this.probe.end_poll();
        if let Some(quota) = this.quota {
            quota.charge(used);
        }
        poll
    }
}
