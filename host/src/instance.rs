//! One live instance of a function: its own [`Store`], its handler, its
//! optional lifecycle hooks, and every guest call made under the function's
//! limits and metered.
//!
//! Every call into the guest — `start`, `handle`, `destroy` — goes through
//! the same steps: open a metering window (memory peak, fuel budget, wall
//! deadline), run the call with its CPU time measured on whichever thread
//! polls it, and close the window into [`CallStats`]. A failed call yields an
//! [`InstanceError`] whose [`Outcome`] names the limit or the failure, and
//! the caller must then drop the instance: its state can no longer be
//! trusted.

use std::future::Future;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use wasmtime::component::Accessor;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::Proxy;
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p3::bindings::Service;

use crate::Error;
use crate::abi::bindings::exports::shoal::runtime::{events, lifecycle};
use crate::engine::{ClockHold, EPOCH_TICK, Slot};
use crate::function::{Code, CompiledFunction, HttpHandler};
use crate::guest::GuestState;
use crate::limits::{CallCpu, CpuQuota, CpuTimed, DeadlineExceeded, classify};
use crate::logs::InstanceLog;
use crate::metering::CallStats;
use crate::outcome::Outcome;
use crate::request::RequestMeta;

mod shared;

pub(crate) use shared::SharedInstance;

/// Fuel given to calls without a fuel limit on an engine that meters fuel
/// ([`crate::engine::FuelMetering::EveryRequest`]): effectively unbounded,
/// but still metered.
const UNLIMITED_FUEL: u64 = i64::MAX as u64;

/// The answer to `response-outparam.set` (WASI 0.2) or of `handle`
/// (WASI 0.3), handed to the HTTP side.
pub type ResponseResult = Result<hyper::Response<ResponseBody>, ErrorCode>;

pin_project_lite::pin_project! {
    /// A guest's response body. (Its variants' fields say what they are:
    /// pin_project_lite takes no doc comments on them.)
    #[allow(missing_docs)]
    #[project = ResponseBodyProj]
    pub enum ResponseBody {
        /// Written through WASI 0.2's `outgoing-body`.
        P2 { #[pin] body: HyperOutgoingBody },
        /// A WASI 0.3 body's frames, moved out of its instance's event loop
        /// by [`answer_p3`] (the channel's end is the body's end).
        P3 { frames: tokio::sync::mpsc::Receiver<P3Frame>, ended: bool },
    }
}

/// One frame of a WASI 0.3 response body, or why it failed.
type P3Frame = Result<hyper::body::Frame<Bytes>, wasmtime_wasi_http::Error>;

/// How many frames of a WASI 0.3 body wait for its client beyond the one
/// [`answer_p3`] holds (each at most the outgoing chunk size Shoal's `wasi:http`
/// hooks set, 64 KiB).
const P3_FRAMES_AHEAD: usize = 1;

/// Hand a WASI 0.3 response's head to the HTTP side (`respond`), then
/// move its body's frames, as the guest writes them, out of its instance's
/// event loop (where this runs, in the request's call) to the response,
/// and return at the body's end, on its failure, or once the client is
/// gone.
///
/// Why the call pumps its body rather than the connection reading it
/// straight from the instance: the call then ends when the guest has
/// written the whole body, in the event loop's turn that wrote it, and a
/// small body, its end and the call's record reach the connection's task
/// together. Read by the connection, each step (the body, its end, the
/// call's end) took a turn of that task and one of the instance's.
/// A client that reads slowly still holds the guest back: at most
/// [`P3_FRAMES_AHEAD`] frames and the one in hand wait for it.
pub(crate) async fn answer_p3(
    response: hyper::Response<UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>>,
    respond: impl FnOnce(ResponseResult),
) {
    use http_body_util::BodyExt;
    let (head, mut body) = response.into_parts();
    let (frames, receiver) = tokio::sync::mpsc::channel(P3_FRAMES_AHEAD);
    respond(Ok(hyper::Response::from_parts(head, ResponseBody::P3 { frames: receiver, ended: false })));
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = frames.closed() => return,
        };
        let Some(frame) = frame else { return };
        let failed = frame.is_err();
        if frames.send(frame).await.is_err() || failed {
            return;
        }
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.project() {
            ResponseBodyProj::P2 { body } => body.poll_frame(cx).map(|frame| frame.map(|f| f.map_err(Into::into))),
            ResponseBodyProj::P3 { frames, ended } => {
                if *ended {
                    return std::task::Poll::Ready(None);
                }
                let frame = std::task::ready!(frames.poll_recv(cx));
                *ended = frame.is_none();
                std::task::Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::P2 { body } => body.is_end_stream(),
            ResponseBody::P3 { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ResponseBody::P2 { body } => body.size_hint(),
            // Its length is in its head, if the guest gave one.
            ResponseBody::P3 { ended: true, .. } => hyper::body::SizeHint::with_exact(0),
            ResponseBody::P3 { .. } => hyper::body::SizeHint::default(),
        }
    }
}

/// A loaded HTTP export.
enum Handler {
    P2(Proxy),
    P3(Arc<Service>),
}

/// A guest call that failed, and why.
#[derive(Debug, Clone)]
pub struct InstanceError {
    /// Which limit or failure.
    pub outcome: Outcome,
    /// A human-readable account (trap message, the limit's value...).
    pub message: String,
}

/// A message the function's `events.handle` turned down, with the reason
/// it gave (the guest's `result<_, string>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Declined {
    /// What the guest said.
    pub reason: String,
}

/// A live instance of one function version.
pub struct Instance {
    store: Store<GuestState>,
    /// The component instance in the store.
    wasm: wasmtime::component::Instance,
    handler: Option<Handler>,
    hooks: Option<lifecycle::Guest>,
    events: Option<events::Guest>,
    function: CompiledFunction,
    /// The code it was made of (kept alive while it lives).
    code: Arc<Code>,
    started: bool,
    /// When the instance last finished a request (or was created).
    pub(crate) last_used: Instant,
    /// Requests and messages it has served (for `max_requests_per_instance`).
    pub(crate) served: u32,
    /// Its instance slot: last, so it frees after the store's.
    _slot: Slot,
}

impl Instance {
    /// Instantiate once on trial, run nothing, and drop the instance: a
    /// function that cannot instantiate is refused at deploy time, naming
    /// it, never at its first request.
    pub async fn trial(function: &CompiledFunction) -> Result<(), Error> {
        let failed = |reason: String| Error::InstantiateFailed { function: function.name().to_string(), reason };
        let timeout = function.spec().limits.start_timeout;
        let slot = function.engine.slots().acquire(tokio::time::Instant::now() + timeout).await.ok_or_else(|| {
            failed(format!("no instance slot of the engine became free within its start_timeout of {timeout:?}"))
        })?;
        Instance::instantiate(function, slot).await.map(drop).map_err(|err| failed(err.message))
    }

    /// Instantiate without running `start`, in `slot`.
    async fn instantiate(function: &CompiledFunction, slot: Slot) -> Result<Instance, InstanceError> {
        let inner = &function.inner;
        let spec = &inner.spec;
        let log = InstanceLog::new(
            Arc::from(spec.name.as_str()),
            Arc::from(spec.version.as_deref().unwrap_or("")),
            inner.log_sink.clone(),
            inner.log_budget.clone(),
        );
        let state = GuestState::new(
            inner.caps.clone(),
            inner.services.clone(),
            log,
            spec.limits.memory_bytes,
            Instant::now() + spec.limits.start_timeout,
        )
        .map_err(|err| InstanceError { outcome: Outcome::StartFailed, message: format!("{err:#}") })?;
        let mut state = state;
        state.cpu_quota = inner.cpu.clone();
        let code = function.code();
        let mut store = Store::new(code.pre.engine(), state);
        store.limiter(|state| &mut state.memory);
        let busy = function.engine.busy_flag();
        let turns = function.engine.turns();
        store.epoch_deadline_callback(move |mut context| {
            let state = context.data_mut();
            // A call that has computed for a whole tick is CPU-bound: speed
            // the clock up so it shares its thread in short slices. Its CPU
            // time, not the ticks it saw: a short call on a crowded thread
            // waits a tick or more for its turn (after a yield, or for the
            // client to take its response), and counting those ticks kept
            // W1's hello requests on the fast clock most of the time.
            let cpu_bound = state.call_cpu.so_far() >= EPOCH_TICK;
            if cpu_bound {
                busy.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let now = Instant::now();
            if now >= state.deadline {
                Err(wasmtime::Error::new(DeadlineExceeded))
            } else if let Some(until) =
                state.cpu_quota.as_ref().and_then(|quota| quota.throttle(now, Some(state.deadline)))
            {
                // Over its CPU share: wait for the next period (never past
                // the deadline, which the next tick then enforces).
                state.throttled += until.saturating_duration_since(now);
                Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::time::sleep_until(until.into()))))
            } else if cpu_bound && !crate::limits::on_idle_priority_thread() {
                // Hand the thread back to the scheduler, so a guest that
                // computes for long never starves its neighbours: the
                // requests that arrived go first, then the next CPU-bound
                // call's slice (see `Turns`). Not inside the slice's floor,
                // so that they do not starve it either.
                let seat = state.call_cpu.seat();
                if seat.in_floor(now) {
                    Ok(UpdateDeadline::Continue(1))
                } else {
                    Ok(UpdateDeadline::YieldCustom(1, Box::pin(turns.next_slice(seat))))
                }
            } else if cpu_bound {
                // On an idle-priority thread the kernel already gives way
                // to every other thread; the yield shares this one between
                // the CPU-limited calls (tokio's yield_now: the I/O driver
                // is polled before the task runs again).
                Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
            } else if state.call_cpu.one_call() {
                // A short call runs on: yielding it would put it behind
                // everything queued, for nothing (arrivals advance the
                // epoch too, for the CPU-bound calls' sake). It yields at
                // the first tick after a tick of its own CPU time.
                Ok(UpdateDeadline::Continue(1))
            } else {
                // An instantiation (its initializers), or a shared
                // instance's event loop, whose CPU is counted per poll:
                // yield at every tick, as tokio's yield_now (the I/O
                // driver is polled before the task runs again).
                Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
            }
        });
        store.set_epoch_deadline(1);
        if function.meters_fuel() {
            store.set_fuel(UNLIMITED_FUEL).map_err(host_error)?;
        }

        // Instantiation runs the guest's initializers: the clock must tick.
        let clock = function.engine.hold_clock();
        let instance = tokio::time::timeout(spec.limits.start_timeout, code.pre.instantiate_async(&mut store))
            .await
            .map_err(|_| InstanceError {
                outcome: Outcome::StartFailed,
                message: format!("instantiation took longer than {:?}", spec.limits.start_timeout),
            })?
            .map_err(|err| {
                let outcome = classify(&err, &store.data().memory, false);
                let outcome = if outcome == Outcome::Trap { Outcome::StartFailed } else { outcome };
                InstanceError { outcome, message: format!("instantiation failed: {}", describe(&err)) }
            })?;
        drop(clock);
        let handler = match &code.handler {
            Some(HttpHandler::P2(indices)) => {
                Some(Handler::P2(indices.load(&mut store, &instance).map_err(host_error)?))
            }
            Some(HttpHandler::P3(indices)) => {
                Some(Handler::P3(Arc::new(indices.load(&mut store, &instance).map_err(host_error)?)))
            }
            None => None,
        };
        let hooks = match &code.lifecycle {
            Some(indices) => Some(indices.load(&mut store, &instance).map_err(host_error)?),
            None => None,
        };
        let events = match &code.events {
            Some(indices) => Some(indices.load(&mut store, &instance).map_err(host_error)?),
            None => None,
        };
        Ok(Instance {
            store,
            wasm: instance,
            handler,
            hooks,
            events,
            function: function.clone(),
            code,
            started: false,
            last_used: Instant::now(),
            served: 0,
            _slot: slot,
        })
    }

    /// Whether it was made of its version's code of now (not of code that
    /// optimized code has replaced since).
    pub fn runs_current_code(&self) -> bool {
        self.function.is_current(&self.code)
    }

    /// The code it was made of.
    pub(crate) fn code_arc(&self) -> Arc<Code> {
        self.code.clone()
    }

    /// Instantiate in `slot` and run the `start` hook (if exported).
    pub async fn create(function: &CompiledFunction, slot: Slot) -> Result<(Instance, CallStats), InstanceError> {
        let mut instance = Instance::instantiate(function, slot).await?;
        let stats = instance.start().await?;
        Ok((instance, stats))
    }

    async fn start(&mut self) -> Result<CallStats, InstanceError> {
        let Some(hooks) = &self.hooks else {
            self.started = true;
            return Ok(CallStats::default());
        };
        let timeout = self.function.spec().limits.start_timeout;
        let window = Window::open(&mut self.store, timeout, None, self.function.meters_fuel());
        let meters = self.meters();
        let call = hooks.call_start(&mut self.store);
        let (cpu, result) = run_metered(meters, timeout, call).await;
        let (stats, result) = window.close(&mut self.store, cpu, result);
        let start_error = |message: String| InstanceError { outcome: Outcome::StartFailed, message };
        match result {
            Ok(Ok(())) => {
                self.started = true;
                Ok(stats)
            }
            Ok(Err(message)) => Err(start_error(format!("start hook returned an error: {message}"))),
            Err(error) if error.outcome == Outcome::Timeout => {
                Err(start_error(format!("start hook ran past its start_timeout of {timeout:?}")))
            }
            Err(error) => Err(start_error(format!("start hook failed ({}): {}", error.outcome, error.message))),
        }
    }

    /// The clock hold, CPU probe and CPU share for a call about to start.
    fn meters(&self) -> Meters {
        Meters::of(&self.function, &self.store)
    }

    /// Serve one HTTP request. `respond` receives the response head (and the
    /// body stream) as soon as the guest sets it; the call may go on writing
    /// the body after that.
    pub async fn handle<B>(
        &mut self,
        request: hyper::Request<B>,
        meta: &RequestMeta,
        respond: impl FnOnce(ResponseResult) + Send + Sync + 'static,
    ) -> (CallStats, Result<(), InstanceError>)
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        if let Some(Handler::P3(service)) = &self.handler {
            let service = service.clone();
            return self.handle_p3(service, request, meta, respond).await;
        }
        let proxy = match &self.handler {
            Some(Handler::P2(proxy)) => proxy,
            Some(Handler::P3(_)) | None => {
                let error = InstanceError {
                    outcome: Outcome::NoResponse,
                    message: "has no HTTP handler (it only receives messages)".to_string(),
                };
                return (CallStats::default(), Err(error));
            }
        };
        let limits = &self.function.inner.spec.limits;
        self.store.data_mut().begin_request(meta);
        let resources = {
            let mut http = self.store.data_mut().http();
            let respond = move |result: Result<hyper::Response<HyperOutgoingBody>, ErrorCode>| {
                respond(result.map(|response| response.map(|body| ResponseBody::P2 { body })));
            };
            http.new_incoming_request(Scheme::Http, request)
                .and_then(|req| Ok((req, http.new_response_outparam_from_callback(respond)?)))
        };
        let (req, out) = match resources {
            Ok(resources) => resources,
            Err(err) => {
                self.store.data_mut().end_request();
                return (
                    CallStats::default(),
                    Err(InstanceError { outcome: Outcome::HostError, message: format!("{err:#}") }),
                );
            }
        };
        let (window, meters) = Window::for_request(&mut self.store, &self.function);
        let call = proxy.wasi_http_incoming_handler().call_handle(&mut self.store, req, out);
        let (cpu, result) = run_metered(meters, limits.timeout, call).await;
        self.end_request(window, cpu, result)
    }

    /// Serve one HTTP request through a WASI 0.3 `handle` export: one
    /// request at a time in this instance, so its limits and its usage
    /// record are its own, as for WASI 0.2. The call lasts until the
    /// guest has written the whole response body ([`answer_p3`]).
    async fn handle_p3<B>(
        &mut self,
        service: Arc<Service>,
        request: hyper::Request<B>,
        meta: &RequestMeta,
        respond: impl FnOnce(ResponseResult) + Send + Sync + 'static,
    ) -> (CallStats, Result<(), InstanceError>)
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let limits = &self.function.inner.spec.limits;
        self.store.data_mut().begin_request(meta);
        let (window, meters) = Window::for_request(&mut self.store, &self.function);
        let request = with_scheme_and_authority(request);
        let call = self.store.run_concurrent(async move |accessor: &Accessor<GuestState>| -> wasmtime::Result<()> {
            let (request, sent) = accessor.with(|mut access| {
                let hooks = access.get().http().hooks;
                let (request, sent) = wasmtime_wasi_http::p3::Request::from_http(hooks, request);
                let sent: std::pin::Pin<Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>> =
                    Box::pin(sent);
                (request, sent)
            });
            match service.handle(accessor, request).await? {
                Err(code) => {
                    respond(Err(p2_error_code(&code)));
                    Ok(())
                }
                Ok(response) => {
                    let response = accessor.with(|mut access| response.into_http(&mut access, sent))?;
                    // Until the guest has written the whole body (or the
                    // client is gone).
                    answer_p3(response, respond).await;
                    Ok(())
                }
            }
        });
        let call = async move { call.await.and_then(|result| result) };
        let (cpu, result) = run_metered(meters, limits.timeout, call).await;
        self.end_request(window, cpu, result)
    }

    /// Deliver one message to the function's `events.handle` export.
    /// `Ok(Err(declined))`: the guest declined it.
    pub async fn deliver(
        &mut self,
        message: events::Message,
        meta: &RequestMeta,
    ) -> (CallStats, Result<Result<(), Declined>, InstanceError>) {
        let Some(events) = &self.events else {
            let error = InstanceError {
                outcome: Outcome::HostError,
                message: "the function does not export shoal:runtime/events".to_string(),
            };
            return (CallStats::default(), Err(error));
        };
        let limits = &self.function.inner.spec.limits;
        self.store.data_mut().begin_request(meta);
        let (window, meters) = Window::for_request(&mut self.store, &self.function);
        let call = events.call_handle(&mut self.store, &message);
        let (cpu, result) = run_metered(meters, limits.timeout, call).await;
        let (stats, result) = self.end_request(window, cpu, result);
        (stats, result.map(|handled| handled.map_err(|reason| Declined { reason })))
    }

    /// Close a request's (or message's) window: its stats, the end of the
    /// request in the store, and the limit behind a failure named.
    fn end_request<R>(
        &mut self,
        window: Window,
        cpu: Duration,
        result: Option<wasmtime::Result<R>>,
    ) -> (CallStats, Result<R, InstanceError>) {
        let (stats, result) = window.close(&mut self.store, cpu, result);
        self.store.data_mut().end_request();
        (stats, self.explain(result))
    }

    /// Name the limit behind a failed call in the error's message.
    fn explain<R>(&mut self, result: Result<R, InstanceError>) -> Result<R, InstanceError> {
        let limits = &self.function.inner.spec.limits;
        let result = result.map_err(|error| explain_limit(limits, error));
        self.last_used = Instant::now();
        result
    }

    /// Run the `destroy` hook (if exported and `start` succeeded), then drop
    /// the instance.
    pub async fn destroy(mut self) -> Result<CallStats, InstanceError> {
        let Some(hooks) = self.hooks.take().filter(|_| self.started) else {
            return Ok(CallStats::default());
        };
        let timeout = self.function.spec().limits.destroy_timeout;
        let window = Window::open(&mut self.store, timeout, None, self.function.meters_fuel());
        let meters = self.meters();
        let call = hooks.call_destroy(&mut self.store);
        let (cpu, result) = run_metered(meters, timeout, call).await;
        let (stats, result) = window.close(&mut self.store, cpu, result);
        result.map(|()| stats).map_err(|error| InstanceError {
            message: format!("destroy hook failed ({}): {}", error.outcome, error.message),
            ..error
        })
    }

    /// Linear memory held now, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.store.data().memory.current()
    }
}

/// One metering window over a guest call.
struct Window {
    start: Instant,
    fuel_given: Option<u64>,
}

impl Window {
    /// The window of one request or message (its timeout and fuel limit),
    /// and the meters of its call.
    fn for_request(store: &mut Store<GuestState>, function: &CompiledFunction) -> (Window, Meters) {
        let limits = &function.inner.spec.limits;
        let window =
            Window::open(store, limits.timeout, limits.fuel_per_request.map(NonZeroU64::get), function.meters_fuel());
        (window, Meters::of(function, store))
    }

    fn open(store: &mut Store<GuestState>, timeout: Duration, fuel: Option<u64>, fuel_enabled: bool) -> Window {
        let start = Instant::now();
        let data = store.data_mut();
        data.memory.reset_window();
        data.call_cpu.reset_turn();
        data.deadline = start + timeout;
        data.throttled = Duration::ZERO;
        store.set_epoch_deadline(1);
        let fuel_given = fuel_enabled.then(|| fuel.unwrap_or(UNLIMITED_FUEL));
        if let Some(fuel) = fuel_given {
            // Cannot fail: fuel is enabled on this engine.
            let _ = store.set_fuel(fuel);
        }
        Window { start, fuel_given }
    }

    fn close<R>(
        self,
        store: &mut Store<GuestState>,
        cpu: Duration,
        result: Option<wasmtime::Result<R>>,
    ) -> (CallStats, Result<R, InstanceError>) {
        let wall = self.start.elapsed();
        let fuel = self.fuel_given.map(|given| given.saturating_sub(store.get_fuel().unwrap_or(0)));
        let data = store.data();
        let stats = CallStats { wall, cpu, fuel, peak_memory: data.memory.peak(), throttled: data.throttled };
        let result = match result {
            Some(Ok(value)) => Ok(value),
            Some(Err(err)) => {
                let deadline_passed = Instant::now() >= data.deadline;
                let outcome = classify(&err, &data.memory, deadline_passed);
                Err(InstanceError { outcome, message: describe(&err) })
            }
            // Cut off by the async timeout: the guest was blocked in a host
            // call (sleeping, waiting on I/O) when its time ran out.
            None => Err(InstanceError { outcome: Outcome::Timeout, message: "timed out".to_string() }),
        };
        (stats, result)
    }
}

/// What a guest call on an instance is measured and limited with,
/// taken before the call borrows the instance's store.
struct Meters {
    /// Keeps the epoch clock running during the call.
    clock: ClockHold,
    /// The call's CPU time as it goes, for the epoch callback.
    probe: Arc<CallCpu>,
    /// The function's CPU share, if limited.
    quota: Option<Arc<CpuQuota>>,
}

impl Meters {
    fn of(function: &CompiledFunction, store: &Store<GuestState>) -> Meters {
        Meters {
            clock: function.engine.hold_clock(),
            probe: store.data().call_cpu.clone(),
            quota: function.inner.cpu.clone(),
        }
    }
}

/// Run `call` with a wall-clock limit (a little past `timeout`, as a
/// backstop for guests blocked in host calls, which epochs cannot
/// interrupt), measuring CPU time, with the epoch clock held running
/// throughout. `None`: the limit cut the call off.
async fn run_metered<R>(
    meters: Meters,
    timeout: Duration,
    call: impl Future<Output = wasmtime::Result<R>>,
) -> (Duration, Option<wasmtime::Result<R>>) {
    let Meters { clock: _clock, probe, quota } = meters;
    let mut timed = std::pin::pin!(CpuTimed::with_probe(call, quota, probe));
    let result = tokio::time::timeout(timeout + Duration::from_millis(20), timed.as_mut()).await.ok();
    (timed.cpu(), result)
}

/// `error` with the limit behind it named in its message.
fn explain_limit(limits: &crate::manifest::Limits, mut error: InstanceError) -> InstanceError {
    error.message = match error.outcome {
        Outcome::Timeout => format!("ran past its timeout of {} ms", limits.timeout.as_millis()),
        Outcome::FuelExhausted => {
            format!(
                "used up its fuel_per_request of {}",
                limits.fuel_per_request.map_or(UNLIMITED_FUEL, NonZeroU64::get)
            )
        }
        Outcome::MemoryLimit => format!("tried to grow its memory past memory_mb = {}", limits.memory_bytes >> 20),
        _ => error.message,
    };
    error
}

/// `request` with an absolute URI (`http`, and the authority of its `Host`
/// header when it names one), as WASI 0.3 requests carry them; the header
/// itself is one a guest may not see in 0.3.
fn with_scheme_and_authority<B>(request: hyper::Request<B>) -> hyper::Request<B> {
    let (mut parts, body) = request.into_parts();
    let authority = parts
        .headers
        .get(hyper::header::HOST)
        .and_then(|host| host.to_str().ok())
        .and_then(|host| host.parse::<hyper::http::uri::Authority>().ok());
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(hyper::http::uri::Scheme::HTTP);
    uri.authority = Some(authority.unwrap_or_else(|| hyper::http::uri::Authority::from_static("localhost")));
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(hyper::http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = hyper::Uri::from_parts(uri).unwrap_or_default();
    hyper::Request::from_parts(parts, body)
}

/// A WASI 0.3 error code as the 0.2 one the HTTP side knows (the body size
/// one keeps its meaning: 413).
fn p2_error_code(code: &wasmtime_wasi_http::p3::bindings::http::types::ErrorCode) -> ErrorCode {
    use wasmtime_wasi_http::p3::bindings::http::types::ErrorCode as P3;
    match code {
        P3::HttpRequestBodySize(size) => ErrorCode::HttpRequestBodySize(*size),
        other => ErrorCode::InternalError(Some(format!("{other:?}"))),
    }
}

fn host_error(err: impl std::fmt::Display) -> InstanceError {
    InstanceError { outcome: Outcome::HostError, message: err.to_string() }
}

/// An account of a guest call's error: the trap, or the error with its
/// whole cause chain (a guest's `exit(3)`, a host resource limit...), but
/// without the wasm backtrace that wasmtime attaches as context.
fn describe(err: &wasmtime::Error) -> String {
    if let Some(trap) = err.downcast_ref::<wasmtime::Trap>() {
        return trap.to_string();
    }
    let causes: Vec<String> = err
        .chain()
        .map(std::string::ToString::to_string)
        // wasmtime's backtrace context; its frames are for debugging, not
        // for the account of what went wrong.
        .filter(|text| !text.is_empty() && !text.starts_with("error while executing at wasm backtrace"))
        .collect();
    if causes.is_empty() { "the guest call failed".to_string() } else { causes.join(": ") }
}
