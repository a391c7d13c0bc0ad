//! One request through one function: acquire an instance, call its handler
//! under the function's limits, meter it, answer.
//!
//! The call owns the instance from start to end: the response head is
//! returned as soon as the guest sets it, while the guest may still be
//! writing the body. When the call ends, it writes the [`UsageRecord`] to
//! the ledger and returns the instance to its pool ([`Recorder::finish`]).
//! It runs to that end whatever becomes of the request's own task: polled
//! by that task while it waits for the response, in a task of its own
//! after that ([`CallTask`]); the response body's end is held back until
//! the record is written (see [`GatedBody`]), so a client that has read a
//! whole response knows its usage record is already written. The records
//! of HTTP calls that end together are written together, with one
//! `write(2)` ([`Batch`]).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tracing::Instrument as _;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;

use crate::abi::bindings::exports::shoal::runtime::events::Message;
use crate::backends::Delivery;
use crate::engine::{LimitedPriority, behind_the_queue};
use crate::instance::{InstanceError, ResponseResult};
use crate::metering::{CallStats, Ledger, RECORD_LINE_BYTES, UsageRecord};
use crate::metrics::Metrics;
use crate::outcome::Outcome;
use crate::pool::{AcquireError, FunctionPool, Lease};
use crate::request::{
    BoxError, REQUEST_ID_HEADER, RequestMeta, ShoalBody, TRACEPARENT_HEADER, TraceContext, text_response,
};
use crate::spans::{LazySpan, SpanFields};

/// What a request's span says. It is made only when something logs inside
/// the request ([`crate::spans`]): `request{tenant function request_id
/// parent_id trace_id span_id}`, as `tracing::info_span!` would make it.
struct RequestFields {
    pool: Arc<FunctionPool>,
    id: Arc<str>,
    parent_id: Option<Arc<str>>,
    trace: TraceContext,
}

/// The request span's callsite, as `tracing::info_span!` would declare it.
static REQUEST_SPAN: tracing_core::callsite::DefaultCallsite =
    tracing_core::callsite::DefaultCallsite::new(&REQUEST_SPAN_METADATA);
static REQUEST_SPAN_METADATA: tracing::Metadata<'static> = tracing_core::metadata! {
    name: "request",
    target: module_path!(),
    level: tracing::Level::INFO,
    fields: &["tenant", "function", "request_id", "parent_id", "trace_id", "span_id"],
    callsite: &REQUEST_SPAN,
    kind: tracing_core::metadata::Kind::SPAN,
};

impl SpanFields for RequestFields {
    fn callsite(&self) -> &'static tracing_core::callsite::DefaultCallsite {
        &REQUEST_SPAN
    }

    fn make(&self, parent: Option<tracing::Id>, dispatch: &tracing::Dispatch) -> tracing::Span {
        let function = self.pool.function();
        let (tenant, name) = (&function.spec().tenant, function.name());
        let (trace_id, span_id) = (self.trace.trace_id(), self.trace.span_id());
        let parent_id = self.parent_id.as_deref().unwrap_or("-");
        let fields = REQUEST_SPAN_METADATA.fields();
        let mut field = fields.iter();
        let mut next = || field.next().expect("invariant: the request span has six fields");
        // `FieldSet::value_set` is what tracing's own macros call to make a
        // span's values (it is hidden from tracing-core's docs, not private).
        let values: [(&tracing::field::Field, Option<&dyn tracing::Value>); 6] = [
            (&next(), Some(&tracing::field::display(tenant))),
            (&next(), Some(&tracing::field::display(name))),
            (&next(), Some(&tracing::field::display(&self.id))),
            (&next(), Some(&parent_id)),
            (&next(), Some(&tracing::field::display(&trace_id))),
            (&next(), Some(&tracing::field::display(&span_id))),
        ];
        tracing::Span::child_of_with(parent, &REQUEST_SPAN_METADATA, &fields.value_set(&values), dispatch)
    }
}

/// Runs requests and records their usage.
pub struct Dispatcher {
    recorder: Recorder,
    metrics: Arc<Metrics>,
    limited_priority: LimitedPriority,
}

/// Where the end of every call goes: the ledger (if any) and the metrics.
#[derive(Clone)]
struct Recorder {
    ledger: Option<Arc<Ledger>>,
    metrics: Arc<Metrics>,
    /// The HTTP calls that ended since their batch's first one, whose
    /// records are written together ([`Recorder::join`]).
    batch: Arc<Mutex<Option<Batch>>>,
    /// HTTP calls under way (each counted by its [`Underway`]): a shared
    /// instance's call that ends with none other under way has no one to
    /// wait for, and its batch is written at once ([`group_closes`]).
    underway: Arc<AtomicUsize>,
}

/// One HTTP call counted in [`Recorder::underway`] until it is dropped.
struct Underway(Arc<AtomicUsize>);

impl Drop for Underway {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Calls that ended close together, their records not written yet: one
/// `write(2)` for them all, then their responses end. Under load the
/// calls ending in one pass over a worker's queue share it; the write is
/// then a fraction of each, and so is waking a client that sleeps between
/// responses (the responses leave together, and a client woken by the
/// first finds the others there; W1 in the Benchmarks chapter). A call that
/// ends alone waits only for its task's next poll (a call sharing an
/// instance, for its worker's next look for I/O: [`group_closes`], and
/// not at all when no other HTTP call is under way, [`Recorder::underway`]).
///
/// A call's instance goes back to its pool when its record joins the
/// batch, not when it is written: the next request in the same pass then
/// reuses the instance whose memory is in the cache, rather than taking
/// another (≈10% of W1's CPU at c=64). Nothing waits on an instance's
/// return for a record: what a client is told waits for the write, and a
/// host that stops lets each batch's first call write it (even a task
/// dropped mid-wait does, [`FlushOnDrop`]).
struct Batch {
    /// Their ledger lines, in the order the calls ended.
    lines: Vec<u8>,
    /// Where each call's line ends in `lines`, and its response's end,
    /// told whether the line was written.
    ends: Vec<(usize, oneshot::Sender<bool>)>,
}

/// What [`Recorder::join`] made of a call's end.
struct Joined<'a> {
    /// The call's wall time, as recorded.
    wall_us: u64,
    /// Whether it needed a new instance.
    cold: bool,
    /// For the call that began the batch: the duty to write it, once
    /// [`group_closes`] returns.
    flush: Option<FlushOnDrop<'a>>,
}

/// What [`Recorder::finish`] made of a call's end.
struct Finished {
    /// The call's wall time, as recorded.
    wall_us: u64,
    /// Whether it needed a new instance.
    cold: bool,
    /// Whether its record is in the ledger (or there is none).
    written: bool,
}

/// How one call ended, for its usage record.
struct CallEnd<'a> {
    request_id: &'a str,
    parent_id: Option<&'a str>,
    trace: TraceContext,
    started: SystemTime,
    stats: CallStats,
    outcome: Outcome,
    /// The HTTP status the client got (0 for a message).
    status: u16,
    /// Whether the instance may serve again.
    healthy: bool,
}

impl Recorder {
    /// Count a call under way until the guard is dropped.
    fn underway(&self) -> Underway {
        self.underway.fetch_add(1, Ordering::AcqRel);
        Underway(self.underway.clone())
    }

    /// Whether any HTTP call is under way.
    fn any_underway(&self) -> bool {
        self.underway.load(Ordering::Acquire) > 0
    }

    /// Finish a call: write its usage record, then give the instance back
    /// to its pool (the lease drops here). The record comes first, so that
    /// whoever waits for the call's end finds it written.
    fn finish(&self, mut lease: Lease, end: CallEnd<'_>) -> Finished {
        let trace_id = end.trace.trace_id();
        let record = usage_record(&lease, &end, &trace_id);
        let written = self.write(&record);
        let finished = Finished { wall_us: record.wall_us, cold: record.cold, written };
        lease.set_healthy(end.healthy);
        drop(lease);
        finished
    }

    /// Finish an HTTP call in a group: its record joins the [`Batch`] of
    /// calls ending now and `done` (its response's end) waits with it, and
    /// the call that began the batch writes it once the tasks queued
    /// behind it have run ([`FlushOnDrop`]). The metrics count the call,
    /// and its instance goes back to its pool, at once. Without a ledger
    /// there is nothing to wait for: the call finishes as
    /// [`Recorder::finish`] does.
    fn join(&self, mut lease: Lease, end: CallEnd<'_>, done: oneshot::Sender<bool>) -> Joined<'_> {
        let Some(ledger_dir) = self.ledger.as_ref().map(|ledger| ledger.dir()) else {
            let finished = self.finish(lease, end);
            let _ = done.send(finished.written);
            return Joined { wall_us: finished.wall_us, cold: finished.cold, flush: None };
        };
        let trace_id = end.trace.trace_id();
        let record = usage_record(&lease, &end, &trace_id);
        // Taken on before anything else can fail (a panic included), and
        // declared before the lock so that unwinding releases the lock
        // first: a batch opened is always written.
        let mut flush = None;
        let mut batch = lock(&self.batch);
        if batch.is_none() {
            flush = Some(FlushOnDrop(self));
        }
        let open =
            batch.get_or_insert_with(|| Batch { lines: Vec::with_capacity(4 * RECORD_LINE_BYTES), ends: Vec::new() });
        let unrecorded = match Ledger::encode(&record, &mut open.lines) {
            Ok(()) => {
                open.ends.push((open.lines.len(), done));
                None
            }
            Err(err) => Some((done, err)),
        };
        drop(batch);
        self.metrics.observe(&record);
        let joined = Joined { wall_us: record.wall_us, cold: record.cold, flush };
        drop(record);
        lease.set_healthy(end.healthy);
        drop(lease);
        if let Some((done, err)) = unrecorded {
            self.metrics.ledger_error();
            tracing::error!(error = %err, dir = %ledger_dir.display(), "cannot write usage record");
            let _ = done.send(false);
        }
        joined
    }

    /// Write the open [`Batch`] (if any) with one `write(2)`, then tell its
    /// responses whether their records are written: after a write that
    /// failed part-way, the calls whose lines landed whole are on the bill
    /// and complete; the others' responses are cut off.
    fn flush(&self) {
        let Some(ledger) = &self.ledger else { return };
        let Some(batch) = lock(&self.batch).take() else { return };
        if batch.ends.is_empty() {
            return;
        }
        let landed = match ledger.append_lines(batch.lines) {
            Ok(()) => {
                self.metrics.ledger_written();
                usize::MAX
            }
            Err(partial) => {
                tracing::error!(
                    error = %partial.error, dir = %ledger.dir().display(), records = batch.ends.len(),
                    "cannot write usage records"
                );
                partial.landed
            }
        };
        for (line_end, done) in batch.ends {
            let written = line_end <= landed;
            if !written {
                self.metrics.ledger_error();
            }
            let _ = done.send(written);
        }
    }

    /// Write `record`; whether it is in the ledger (or there is none).
    fn write(&self, record: &UsageRecord<'_>) -> bool {
        let mut written = true;
        if let Some(ledger) = &self.ledger
            && let Err(err) = ledger.append(record).inspect(|()| self.metrics.ledger_written())
        {
            self.metrics.ledger_error();
            tracing::error!(error = %err, dir = %ledger.dir().display(), "cannot write usage record");
            written = false;
        }
        self.metrics.observe(record);
        written
    }

    /// `Err` with why while the ledger cannot take records: a request
    /// whose record could not be kept is not served.
    fn writable(&self) -> Result<(), Arc<std::io::Error>> {
        match &self.ledger {
            Some(ledger) => ledger.writable(),
            None => Ok(()),
        }
    }
}

/// The usage record of the call `lease` served, as `end` says.
fn usage_record<'a>(lease: &'a Lease, end: &'a CallEnd<'a>, trace_id: &'a str) -> UsageRecord<'a> {
    let function = lease.function();
    UsageRecord::new(
        end.request_id,
        end.parent_id,
        function.spec().tenant.as_str(),
        function.name(),
        function.version(),
        end.started,
        &end.stats,
        lease.cold,
        lease.init,
        end.outcome,
        end.status,
    )
    .in_trace(trace_id)
}

/// Held by the call that began a [`Batch`] while it waits for the group
/// to close ([`group_closes`]): dropped, it flushes the batch, also when the task is dropped
/// there (a runtime shutting down), so no call in it waits for good.
struct FlushOnDrop<'a>(&'a Recorder);

impl Drop for FlushOnDrop<'_> {
    fn drop(&mut self) {
        self.0.flush();
    }
}

/// Return when the group a call just opened is to be written: for a call
/// in an instance of its own, once the tasks queued behind it have run;
/// for one sharing an instance (WASI 0.3), once its worker thread has run
/// out of tasks to run and looks for I/O. Calls sharing an instance end
/// one at a time, each in a poll of the instance's driver, and each call's
/// task, woken then, runs at once (tokio's LIFO slot) before the driver's
/// next poll: behind the queue, a group of those found no other call to
/// join (1.17 `write(2)`s a request at c=16 with `perf stat`'s system call
/// tracepoints, as many as ungrouped). Waiting for the worker's I/O poll,
/// the calls of one pass over the sockets share a write (0.19 a request);
/// a call that ends alone waits for one `epoll_wait` that returns at once
/// (none at all when no other call is under way in `recorder`: no one
/// could join). A call in an instance of its own always waits: the
/// requests whose tasks are queued behind it, not under way yet, end in
/// the turns it waits for, and that wait is a self-wake, no system call.
async fn group_closes(shared_instance: bool, recorder: &Recorder) {
    if shared_instance {
        if recorder.any_underway() {
            tokio::task::yield_now().await;
        }
    } else {
        behind_the_queue().await;
    }
}

impl Dispatcher {
    /// A dispatcher writing usage to `ledger` (if any) and `metrics`.
    pub fn new(ledger: Option<Arc<Ledger>>, metrics: Arc<Metrics>, limited_priority: LimitedPriority) -> Dispatcher {
        let recorder = Recorder { ledger, metrics: metrics.clone(), batch: Arc::default(), underway: Arc::default() };
        Dispatcher { recorder, metrics, limited_priority }
    }

    /// Write the records of calls that ended and are waiting for their
    /// group's write (a host stopping calls this before its last `fsync`).
    pub fn flush_records(&self) {
        self.recorder.flush();
    }

    /// Where the calls of `pool`'s function run.
    fn runtime_for(&self, pool: &FunctionPool) -> tokio::runtime::Handle {
        self.runtime(pool.function().cpu_quota().is_some())
    }

    /// Whether the calls of `pool`'s function run on other threads than
    /// the one that dispatches them ([`Dispatcher::runtime`]).
    fn runs_apart(&self, pool: &FunctionPool) -> bool {
        self.apart(pool.function().cpu_quota().is_some())
    }

    /// Whether wasm with (`cpu_limited`) or without a CPU share runs on
    /// the idle-priority threads.
    fn apart(&self, cpu_limited: bool) -> bool {
        cpu_limited && matches!(self.limited_priority, LimitedPriority::Idle)
    }

    /// Where wasm with (`cpu_limited`) or without a CPU share runs: the
    /// former, at idle priority, on the threads kept for those
    /// ([`crate::limits::limited_calls`]); the latter where it was called.
    pub fn runtime(&self, cpu_limited: bool) -> tokio::runtime::Handle {
        if self.apart(cpu_limited) { crate::limits::limited_calls().clone() } else { tokio::runtime::Handle::current() }
    }

    /// Serve `request` (from a trigger) with a version from `pool`. Its
    /// trace is the one its `traceparent` names (a new one without), and
    /// its span Shoal's own.
    pub async fn dispatch<B>(
        &self,
        pool: Arc<FunctionPool>,
        request: hyper::Request<B>,
        request_id: Arc<str>,
    ) -> Response<ShoalBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let meta = RequestMeta::root_of(request.headers(), request_id);
        self.dispatch_with(pool, request, meta).await
    }

    /// Serve `request` with a version from `pool`, as the request `meta`
    /// (a nested call names its parent and depth).
    ///
    /// Not an `async fn`: one would keep its own copy of `request` and
    /// `meta` beside [`Dispatcher::dispatch_inner`]'s, in every request's
    /// future (which hyper moves whole).
    pub fn dispatch_with<B>(
        &self,
        pool: Arc<FunctionPool>,
        request: hyper::Request<B>,
        meta: RequestMeta,
    ) -> impl Future<Output = Response<ShoalBody>> + Send + '_
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        use futures_util::FutureExt as _;
        let span = LazySpan::new(RequestFields {
            pool: pool.clone(),
            id: meta.id.clone(),
            parent_id: meta.parent_id.clone(),
            trace: meta.trace,
        });
        let request_id = meta.id.clone();
        crate::spans::in_span(span, self.dispatch_inner(pool, request, meta)).map(move |mut response| {
            if let Ok(value) = HeaderValue::from_str(&request_id) {
                // A name from a static string is not copied (`insert` with a
                // `&str` copies a name it does not know into a new buffer).
                response.headers_mut().insert(HeaderName::from_static(REQUEST_ID_HEADER), value);
            }
            response
        })
    }

    /// Deliver a message to a subscriber function. `Ok` when its handler
    /// accepted the message; otherwise the outcome and why, and the message
    /// should be delivered again.
    pub async fn deliver(&self, pool: Arc<FunctionPool>, delivery: &Delivery) -> Result<(), (Outcome, String)> {
        let request_id: Arc<str> = Arc::from(format!("msg-{}-{}", delivery.id, delivery.attempt));
        // Each delivery is a trace of its own (messages do not carry one yet).
        let trace = TraceContext::start();
        let function = pool.function().name().to_string();
        let span = tracing::info_span!(
            "message",
            tenant = %pool.function().spec().tenant,
            function = %function,
            request_id = %request_id,
            trace_id = %trace.trace_id(),
            messaging.destination.name = %delivery.topic
        );
        if let Err(why) = self.recorder.writable() {
            self.metrics.observe_refused(&function, Outcome::LedgerUnavailable);
            return Err((Outcome::LedgerUnavailable, format!("the usage ledger cannot be written: {why}")));
        }
        let lease = match pool.acquire(&self.runtime_for(&pool)).instrument(span.clone()).await {
            Ok(lease) => lease,
            Err(AcquireError::Overloaded { .. }) => {
                self.metrics.observe_refused(&function, Outcome::Overloaded);
                return Err((Outcome::Overloaded, "no concurrency slot".to_string()));
            }
            Err(AcquireError::Paused { .. }) => {
                self.metrics.observe_refused(&function, Outcome::Overloaded);
                return Err((Outcome::Overloaded, "the function is paused".to_string()));
            }
            Err(AcquireError::Start(error)) => {
                self.record_start_failure(&pool, &RequestMeta::root(request_id, trace), &error, 0);
                return Err((error.outcome, error.message));
            }
        };
        let message = Message {
            topic: delivery.topic.clone(),
            id: delivery.id.clone(),
            attempt: delivery.attempt,
            payload: delivery.payload.clone(),
        };
        let recorder = self.recorder.clone();
        // Its own task: the call finishes (and the instance goes back to its
        // pool) even if whoever waits for it goes away.
        let task = self.runtime_for(&pool).spawn(
            async move {
                let mut lease = lease;
                let started = SystemTime::now();
                let meta = RequestMeta::root(request_id.clone(), trace);
                let (stats, result) = lease.deliver(message, &meta).await;
                let (outcome, verdict) = match &result {
                    Ok(Ok(())) => (Outcome::Ok, Ok(())),
                    Ok(Err(declined)) => (Outcome::Declined, Err((Outcome::Declined, declined.reason.clone()))),
                    Err(error) => (error.outcome, Err((error.outcome, error.message.clone()))),
                };
                let end = CallEnd {
                    request_id: &request_id,
                    parent_id: None,
                    trace,
                    started,
                    stats,
                    outcome,
                    status: 0,
                    healthy: result.is_ok(),
                };
                let written = recorder.finish(lease, end).written;
                // Handled but not recorded: deliver it again later, so that
                // what was done is always on the bill.
                let verdict = match verdict {
                    Ok(()) if !written => {
                        Err((Outcome::LedgerUnavailable, "its usage record could not be written".to_string()))
                    }
                    verdict => verdict,
                };
                if let Err((outcome, reason)) = &verdict {
                    tracing::warn!(error.type = %outcome, error = %reason, "message not handled");
                }
                verdict
            }
            .instrument(span),
        );
        task.await.unwrap_or_else(|err| Err((Outcome::HostError, format!("delivery task failed: {err}"))))
    }

    async fn dispatch_inner<B>(
        &self,
        pool: Arc<FunctionPool>,
        request: hyper::Request<B>,
        meta: RequestMeta,
    ) -> Response<ShoalBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let function = pool.function().name();
        // The guest sees Shoal's span as its caller.
        let mut request = request;
        request.headers_mut().insert(HeaderName::from_static(TRACEPARENT_HEADER), meta.trace.header_value());
        let body_limit = pool.function().spec().limits.max_request_bytes;
        let too_large =
            || format!("function {function:?} takes request bodies of at most max_request_bytes = {body_limit}");
        // A declared length over the limit is refused before any instance.
        if declared_length(&request).is_some_and(|length| length > body_limit) {
            self.metrics.observe_refused(function, Outcome::RequestTooLarge);
            return error_response(Outcome::RequestTooLarge, &too_large());
        }
        // Any other body is counted as the guest reads it, and cut off past
        // the limit; the client then gets 413, not what the guest made of it.
        let (head_tx, mut head_rx) = oneshot::channel::<ResponseResult>();
        let exchange = Arc::new(Exchange {
            head: Mutex::new(Some(head_tx)),
            status: AtomicU16::new(0),
            cut_off: AtomicBool::new(false),
            refused_too_large: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        });
        let request =
            request.map(|body| CappedBody { inner: body, seen: 0, limit: body_limit, exchange: exchange.clone() });
        if let Err(why) = self.recorder.writable() {
            self.metrics.observe_refused(function, Outcome::LedgerUnavailable);
            tracing::error!(error = %why, "refused: the usage ledger cannot be written");
            let why = format!("cannot serve {function:?}: its usage record could not be kept ({why})");
            return retry_later(Outcome::LedgerUnavailable, &why, Duration::from_secs(1));
        }
        // Counted from here: a request waiting for an instance may end in
        // time to join the group of the call whose instance it takes.
        let underway = self.recorder.underway();
        let lease = match pool.acquire(&self.runtime_for(&pool)).await {
            Ok(lease) => lease,
            Err(AcquireError::Overloaded { retry_after }) => {
                self.metrics.observe_refused(function, Outcome::Overloaded);
                tracing::warn!("overloaded: no concurrency slot within queue_timeout");
                let why = format!(
                    "function {function:?} is serving all the {} requests it may serve at once \
                     (max_concurrency = {}, within the host's per-function instance share); retry later",
                    pool.concurrency(),
                    pool.function().spec().limits.max_concurrency
                );
                return retry_later(Outcome::Overloaded, &why, retry_after);
            }
            Err(AcquireError::Paused { retry_after }) => {
                self.metrics.observe_refused(function, Outcome::Overloaded);
                let why = format!(
                    "function {function:?} is paused and stayed paused for its queue_timeout of {} ms; retry later",
                    pool.function().spec().limits.queue_timeout.as_millis()
                );
                return retry_later(Outcome::Overloaded, &why, retry_after);
            }
            Err(AcquireError::Start(error)) => {
                let status = error.outcome.status().as_u16();
                self.record_start_failure(&pool, &meta, &error, status);
                return error_response(
                    error.outcome,
                    &format!("function {function:?} could not start an instance: {}", error.message),
                );
            }
        };

        let respond = {
            let exchange = exchange.clone();
            move |result: ResponseResult| {
                // A response made after the body was cut off answers half a
                // request: the client gets 413 instead.
                let result = if exchange.cut_off.load(Ordering::Acquire) {
                    exchange.refused_too_large.store(true, Ordering::Release);
                    Err(ErrorCode::HttpRequestBodySize(Some(body_limit)))
                } else {
                    result
                };
                match &result {
                    Ok(response) => exchange.status.store(response.status().as_u16(), Ordering::Release),
                    Err(ErrorCode::HttpRequestBodySize(_)) => {
                        exchange.status.store(Outcome::RequestTooLarge.status().as_u16(), Ordering::Release);
                    }
                    Err(_) => {}
                }
                if let Some(tx) = lock(&exchange.head).take() {
                    let _ = tx.send(result);
                }
            }
        };
        let (done_tx, done_rx) = oneshot::channel::<bool>();
        let recorder = self.recorder.clone();
        let started = SystemTime::now();
        let serving = exchange.clone();
        let call = Box::pin(crate::spans::in_pending_span(async move {
            let exchange = ReleaseHeadOnDrop(exchange);
            let mut lease = lease;
            let (stats, result) = lease.handle(request, &meta, respond).await;
            exchange.ended.store(true, Ordering::Release);
            // Handler returned without calling `response-outparam.set`:
            // drop the sender so the waiting side sees it.
            let unanswered = lock(&exchange.head).take().is_some();
            let cut = exchange.refused_too_large.load(Ordering::Acquire)
                || (unanswered && exchange.cut_off.load(Ordering::Acquire));
            let outcome = match &result {
                _ if cut => Outcome::RequestTooLarge,
                Ok(()) if unanswered => Outcome::NoResponse,
                Ok(()) => Outcome::Ok,
                Err(error) => error.outcome,
            };
            let status = match exchange.status.load(Ordering::Acquire) {
                0 => outcome.status().as_u16(),
                status => status,
            };
            let end = CallEnd {
                request_id: &meta.id,
                parent_id: meta.parent_id.as_deref(),
                trace: meta.trace,
                started,
                stats,
                outcome,
                status,
                healthy: result.is_ok(),
            };
            // Records are written in groups on the host's own threads,
            // and not while a CPU-bound call has a turn (the group's first
            // call would wait behind its slice). Calls with a CPU share,
            // and calls on the idle-priority threads (those functions'
            // own, and what they invoke), write their own: a group opened
            // there would wait for an idle CPU.
            let grouped = lease.function().cpu_quota().is_none()
                && !crate::limits::on_idle_priority_thread()
                && !lease.function().engine.turn_taken();
            let (wall_us, cold) = if grouped {
                let shared = lease.is_shared();
                drop(underway);
                let joined = recorder.join(lease, end, done_tx);
                if let Some(flush) = joined.flush {
                    group_closes(shared, &recorder).await;
                    drop(flush);
                }
                (joined.wall_us, joined.cold)
            } else {
                let finished = recorder.finish(lease, end);
                let _ = done_tx.send(finished.written);
                (finished.wall_us, finished.cold)
            };
            match &result {
                Ok(()) => tracing::debug!(wall_us, cold, "request served"),
                Err(error) => tracing::warn!(error.type = %error.outcome, error = %error.message, "request failed"),
            }
            match result {
                _ if cut => Err((outcome, format!("request body is over max_request_bytes = {body_limit}"))),
                result => result.map_err(|error| (outcome, error.message)),
            }
        }));
        let mut call = CallTask::new(call, self.runtime_for(&pool), !self.runs_apart(&pool));

        // The response's head, and for a small body its rest and record
        // too ([`GatedBody::settle`]), polled with the call: once each
        // time this task is (a call that wakes itself counts on that).
        let mut answer = std::pin::pin!(async {
            // No head: the call ended without one (`None`), or with an error.
            let response = (&mut head_rx).await.map_err(|_| None)?.map_err(Some)?;
            let (parts, body) = response.into_parts();
            let mut body = GatedBody::new(body, done_rx);
            body.settle(SETTLE_WAIT, SETTLE_BYTES, &serving.ended).await;
            Ok::<_, Option<ErrorCode>>(Response::from_parts(parts, body.boxed_unsync()))
        });
        let answer = std::future::poll_fn(|cx| {
            call.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await;
        match answer {
            // A call still under way (a body still streaming) goes on in
            // a task of its own.
            Ok(response) => {
                call.detach();
                response
            }
            Err(Some(ErrorCode::HttpRequestBodySize(_))) => error_response(Outcome::RequestTooLarge, &too_large()),
            Err(Some(code)) => {
                error_response(Outcome::Trap, &format!("function {function:?} answered with an error: {code:?}"))
            }
            Err(None) => match call.finish().await {
                Ok(Err((Outcome::RequestTooLarge, _))) => error_response(Outcome::RequestTooLarge, &too_large()),
                Ok(Err((outcome, message))) => error_response(outcome, &format!("function {function:?} {message}")),
                Ok(Ok(())) => error_response(
                    Outcome::NoResponse,
                    &format!("function {function:?} returned without setting a response"),
                ),
                Err(failed) => error_response(Outcome::HostError, &format!("request task failed: {failed}")),
            },
        }
    }

    /// Record a request that failed because no instance could start: it
    /// counts as a cold request that used nothing.
    fn record_start_failure(&self, pool: &FunctionPool, meta: &RequestMeta, error: &InstanceError, status: u16) {
        let trace_id = meta.trace.trace_id();
        let function = pool.function();
        let record = UsageRecord::new(
            &meta.id,
            meta.parent_id.as_deref(),
            function.spec().tenant.as_str(),
            function.name(),
            function.version(),
            SystemTime::now(),
            &CallStats::default(),
            true,
            None,
            error.outcome,
            status,
        )
        .in_trace(&trace_id);
        self.recorder.write(&record);
    }
}

/// The call of one request, run to its end whatever becomes of the
/// request's own task.
///
/// A call is polled by the task that dispatched it (the connection's, for
/// HTTP) for as long as that task waits for the response: until its head,
/// and while [`GatedBody::settle`] waits for a small body and its record.
/// Most calls end within that, and need no task of their own: a task per
/// request costs a spawn, a wake-up and a scheduling (for a WASI 0.3
/// request, a third task beside its connection's and its instance's
/// driver, where `wasmtime serve` has two). A call still under way then,
/// or when the dispatching task is dropped (its client gone), moves to a
/// task of its own: it still ends under its limits (its timeout is a timer
/// inside it, which only a polled task observes), returns its instance and
/// writes its record. Calls that run on other threads (CPU-limited ones
/// on the idle-priority threads) are spawned there from the start.
struct CallTask<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    state: CallState<F>,
}

enum CallState<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    Here {
        call: Pin<Box<F>>,
        runtime: tokio::runtime::Handle,
        wake: Arc<CallWake>,
        waker: std::task::Waker,
    },
    Spawned(tokio::task::JoinHandle<F::Output>),
    /// Ended here: its output (or why it panicked), until taken.
    Ended(Option<Result<F::Output, String>>),
}

impl<F: Future + Send + 'static> CallTask<F>
where
    F::Output: Send + 'static,
{
    /// `call`, to be polled here (`here`) or at once in a task on `runtime`.
    fn new(call: Pin<Box<F>>, runtime: tokio::runtime::Handle, here: bool) -> Self {
        if !here {
            return CallTask { state: CallState::Spawned(runtime.spawn(call)) };
        }
        let wake = Arc::new(CallWake { woken: AtomicBool::new(true), task: futures_util::task::AtomicWaker::new() });
        let waker = std::task::Waker::from(wake.clone());
        CallTask { state: CallState::Here { call, runtime, wake, waker } }
    }

    /// Poll the call if it runs here and was woken since it was last
    /// polled: it ends here, or waits to be woken, which wakes `cx`.
    fn drive(&mut self, cx: &mut Context<'_>) {
        let CallState::Here { call, wake, waker, .. } = &mut self.state else { return };
        wake.task.register(cx.waker());
        // Polled only when woken, as a task of its own would be, and at
        // most once in each poll of the dispatching task (the caller's
        // part): a call that waits for the tasks queued behind it
        // ([`behind_the_queue`], a group's first record) wakes itself and
        // counts on its next poll coming after theirs.
        if !wake.woken.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut call_cx = Context::from_waker(waker);
        // A panic in the call is the call's failure, as it would be in a
        // task of its own, not its dispatcher's (for HTTP, the connection's).
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call.as_mut().poll(&mut call_cx)));
        let ended = match polled {
            Ok(Poll::Pending) => return,
            Ok(Poll::Ready(output)) => Ok(output),
            Err(panic) => Err(panic_message(panic.as_ref())),
        };
        self.state = CallState::Ended(Some(ended));
    }

    /// Move a call still under way here to a task of its own.
    fn detach(&mut self) {
        if let CallState::Here { .. } = self.state {
            let CallState::Here { call, runtime, .. } = std::mem::replace(&mut self.state, CallState::Ended(None))
            else {
                unreachable!("matched just above")
            };
            self.state = CallState::Spawned(runtime.spawn(call));
        }
    }

    /// Wait for the call's end: its output, or why it failed (a panic).
    async fn finish(&mut self) -> Result<F::Output, String> {
        // The call was just polled, in this poll of the task: it is polled
        // again in the next (see [`CallTask::drive`]).
        if matches!(self.state, CallState::Here { .. }) {
            behind_the_queue().await;
        }
        std::future::poll_fn(|cx| {
            self.drive(cx);
            match &mut self.state {
                CallState::Here { .. } => Poll::Pending,
                CallState::Spawned(task) => Pin::new(task).poll(cx).map_err(|err| err.to_string()),
                CallState::Ended(output) => {
                    Poll::Ready(output.take().unwrap_or_else(|| Err("its output was taken".to_string())))
                }
            }
        })
        .await
    }
}

impl<F: Future + Send + 'static> Drop for CallTask<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        self.detach();
    }
}

/// How a call polled by its dispatching task is woken: it notes that the
/// call is to be polled again, and wakes that task.
struct CallWake {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for CallWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// What a panic said, as tokio's `JoinError` shows it.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let said = panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    match said {
        Some(message) => format!("the call panicked with message {message:?}"),
        None => "the call panicked".to_string(),
    }
}

/// How long a response's head waits for the rest of a small body and its
/// record (see [`GatedBody::settle`]), and how much of the body it holds.
const SETTLE_WAIT: Duration = Duration::from_millis(2);
const SETTLE_BYTES: usize = 64 << 10;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A refusal the client may retry: [`error_response`] with `Retry-After`
/// (whole seconds, at least one).
fn retry_later(outcome: Outcome, why: &str, retry_after: Duration) -> Response<ShoalBody> {
    let mut response = error_response(outcome, why);
    let seconds = retry_after.as_secs().max(1).to_string();
    response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_str(&seconds).expect("invariant: digits"));
    response
}

/// A plain-text response made by the host, naming what failed.
pub fn error_response(outcome: Outcome, message: &str) -> Response<ShoalBody> {
    text_response(outcome.status(), format!("shoal: {message}\n"), Some(outcome.as_str()))
}

/// The request's declared body length, if it declared one.
fn declared_length<B>(request: &hyper::Request<B>) -> Option<u64> {
    request.headers().get(http::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// What a request's serving side and its call share: one allocation for
/// them all (they were four `Arc`s per request).
struct Exchange {
    /// Where the response's head goes, until the guest sets it.
    head: Mutex<Option<oneshot::Sender<ResponseResult>>>,
    /// The status the guest answered with (0: none yet).
    status: AtomicU16,
    /// Set by [`CappedBody`] when the request body passed the limit.
    cut_off: AtomicBool,
    /// Set when the guest answered after the body was cut off: the client
    /// got 413 instead.
    refused_too_large: AtomicBool,
    /// Set when the guest's call has returned: its record is written, or
    /// is being written with its group's, next.
    ended: AtomicBool,
}

/// The call's hold on its [`Exchange`]: however the call ends (a
/// panic too), the response's sender goes with it, so the client is not
/// left waiting by what still shares the exchange (the request body and
/// the response callback, which the guest's store may keep).
struct ReleaseHeadOnDrop(Arc<Exchange>);

impl std::ops::Deref for ReleaseHeadOnDrop {
    type Target = Exchange;

    fn deref(&self) -> &Exchange {
        &self.0
    }
}

impl Drop for ReleaseHeadOnDrop {
    fn drop(&mut self) {
        lock(&self.0.head).take();
    }
}

pin_project_lite::pin_project! {
    /// A request body that ends in an error once more than `limit` bytes
    /// came through (and says so in its [`Exchange`]): the host never reads more
    /// of a body than the function takes.
    pub(crate) struct CappedBody<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: u64,
        exchange: Arc<Exchange>,
    }
}

impl<B> Body for CappedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if this.exchange.cut_off.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.limit {
                        this.exchange.cut_off.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::HttpRequestBodySize(Some(
                            *this.limit,
                        )))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.exchange.cut_off.load(Ordering::Acquire) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body whose end waits for the usage record to be written.
    /// (`held`: frames taken while settling, in order; `written`: the
    /// record's fate when known while settling. pin_project_lite takes no
    /// doc comments on fields.)
    pub struct GatedBody<B> {
        #[pin]
        inner: B,
        #[pin]
        done: oneshot::Receiver<bool>,
        finished: bool,
        ended: bool,
        held: std::collections::VecDeque<Result<Frame<Bytes>, BoxError>>,
        written: Option<bool>,
    }
}

impl<B> GatedBody<B> {
    fn new(inner: B, done: oneshot::Receiver<bool>) -> GatedBody<B> {
        GatedBody { inner, done, finished: false, ended: false, held: std::collections::VecDeque::new(), written: None }
    }
}

impl<B> GatedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Before the head is sent, wait up to `within` for the body to end
    /// (holding up to `most` bytes of it) and its record to be written.
    /// A small response then leaves in one write — head, body and end —
    /// instead of its head first: a WASI 0.3 guest returns its response
    /// before its own task writes the body, and the end of every body
    /// waits for the record. A body still streaming after `within` goes on
    /// as it comes.
    ///
    /// `ended`: whether the call has returned (its record then comes next,
    /// written by the call with its group's).
    async fn settle(&mut self, within: Duration, most: usize, ended: &AtomicBool) {
        let mut held_bytes = 0;
        // Most bodies are complete at once: no timer for those.
        let waker = std::task::Waker::noop();
        if self.settle_step(&mut Context::from_waker(waker), &mut held_bytes, most).is_ready() {
            return;
        }
        // The rest is waited for without a timer while it is sure to come
        // soon, since a timer due before the runtime's next one wakes its
        // I/O driver: a write to its eventfd, and one more `epoll_wait`
        // (two of the five system calls of a WASI 0.3 request at c = 1).
        // Sure to come soon: once the body is complete and the call over,
        // its record, from the call once its group closes ([`group_closes`];
        // a slow write, such as the `fsync` of a partition left behind,
        // holds the head with the end it would hold anyway). And what the
        // tasks queued on this worker bring: a WASI 0.3 guest writes its
        // body, then returns, in its instance's driver task, woken with
        // this one, in a turn or two of it. So this task looks again
        // behind the tasks queued ([`behind_the_queue`]) for as long as
        // each look found more of the body or the call's end, within
        // `within`; a look that found nothing new sets the timer for the
        // rest of `within` (a guest still running after its body ended:
        // its head and body go then, the end when its record is written).
        let deadline = tokio::time::Instant::now() + within;
        let mut last_look = None;
        let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
        std::future::poll_fn(|cx| {
            if self.settle_step(cx, &mut held_bytes, most).is_ready() {
                return Poll::Ready(());
            }
            let ended = ended.load(Ordering::Acquire);
            if self.finished && ended {
                // `settle_step` polled the record's channel: its send wakes
                // this task (a timer set before is not needed any more).
                timer.set(None);
                return Poll::Pending;
            }
            if timer.is_none() {
                let seen = (held_bytes, self.finished, ended);
                if last_look != Some(seen) && tokio::time::Instant::now() < deadline {
                    last_look = Some(seen);
                    // Rescheduled behind the tasks queued now, as in `behind_the_queue`.
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                timer.set(Some(tokio::time::sleep_until(deadline)));
            }
            timer.as_mut().as_pin_mut().expect("invariant: set just above").poll(cx)
        })
        .await;
    }

    /// One look at [`GatedBody::settle`]'s progress: `Ready` once the body
    /// ended and its record is written, or it held more than `most` bytes
    /// (counted in `held_bytes`), or it failed.
    fn settle_step(&mut self, cx: &mut Context<'_>, held_bytes: &mut usize, most: usize) -> Poll<()> {
        while !self.finished {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(None) => self.finished = true,
                Poll::Ready(Some(Ok(frame))) => {
                    *held_bytes += frame.data_ref().map_or(0, Bytes::len);
                    self.held.push_back(Ok(frame));
                    if *held_bytes > most {
                        return Poll::Ready(());
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    self.held.push_back(Err(err.into()));
                    return Poll::Ready(());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        match Pin::new(&mut self.done).poll(cx) {
            Poll::Ready(written) => {
                self.written = Some(written.unwrap_or(false));
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<B> Body for GatedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(frame) = this.held.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if !*this.finished {
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(None) => *this.finished = true,
                Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame.map_err(Into::into))),
                Poll::Pending => return Poll::Pending,
            }
        }
        // The guest's body is complete; end it once the record is written.
        // A record that could not be written fails the body, and so does a
        // call gone without saying (a panic: every path that writes a
        // record says whether it did): the client never sees a complete
        // response that is not on the bill.
        if *this.ended {
            return Poll::Ready(None);
        }
        let written = match this.written.take() {
            Some(written) => written,
            None => std::task::ready!(this.done.poll(cx)).unwrap_or(false),
        };
        *this.ended = true;
        Poll::Ready((!written).then(|| Err(BoxError::from("the request's usage record could not be written"))))
    }

    fn is_end_stream(&self) -> bool {
        // Settled: the last held frame ends it (hyper then writes the end
        // with it).
        self.held.is_empty() && self.finished && self.written == Some(true)
    }

    fn size_hint(&self) -> SizeHint {
        // What settling took out of the inner body is still to come.
        let held: u64 =
            self.held.iter().filter_map(|frame| frame.as_ref().ok()?.data_ref()).map(|data| data.len() as u64).sum();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(held));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response body fed frame by frame through a channel, as a WASI 0.3
    /// guest's body reaches the host from its instance's task.
    struct Fed(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            self.0.poll_recv(cx).map(|data| data.map(|data| Ok(Frame::data(data))))
        }
    }

    fn fed() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, GatedBody<Fed>, oneshot::Sender<bool>) {
        let (frames, rx) = tokio::sync::mpsc::unbounded_channel();
        let (done, done_rx) = oneshot::channel();
        (frames, GatedBody::new(Fed(rx), done_rx), done)
    }

    fn held_text(body: &GatedBody<Fed>) -> String {
        let held = body.held.iter().map(|frame| frame.as_ref().unwrap().data_ref().unwrap().clone());
        String::from_utf8(held.flat_map(|data| data.to_vec()).collect()).unwrap()
    }

    /// `settle` in a task of its own on a one-thread runtime, as a
    /// connection's task runs it; the body back once it returns, with
    /// how long it took.
    async fn settled(
        mut body: GatedBody<Fed>,
        within: Duration,
        most: usize,
        ended: Arc<AtomicBool>,
    ) -> (GatedBody<Fed>, Duration) {
        let began = tokio::time::Instant::now();
        let settling = tokio::spawn(async move {
            body.settle(within, most, &ended).await;
            body
        });
        let body = tokio::time::timeout(Duration::from_secs(10), settling)
            .await
            .expect("the wait for the rest of the body ends")
            .unwrap();
        (body, began.elapsed())
    }

    /// The size of the future `make` returns (`make` is never called).
    fn future_size<A, F: Future>(_make: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// hyper moves each request's future whole into its connection's slot,
    /// so what only a few requests do is boxed, and a layer that only
    /// passes the request on keeps no copy of it (Benchmarks chapter,
    /// "Every request's future is 3.0 KB").
    #[test]
    fn a_requests_future_holds_neither_the_making_of_an_instance_nor_a_second_copy_of_the_request() {
        use crate::engine::Slot;
        use crate::function::CompiledFunction;
        use crate::instance::Instance;
        type Runtime = tokio::runtime::Handle;
        let create =
            future_size(|(function, slot): (&'static CompiledFunction, Slot)| Instance::create(function, slot));
        let acquire =
            future_size(|(pool, runtime): (&'static Arc<FunctionPool>, &'static Runtime)| pool.acquire(runtime));
        assert!(
            acquire < create / 2,
            "acquire's future is {acquire} bytes, making an instance {create}: is it inline?"
        );
        type Request = hyper::Request<hyper::body::Incoming>;
        let inner = future_size(|(dispatcher, pool, request, meta): (&'static Dispatcher, _, Request, _)| {
            dispatcher.dispatch_inner(pool, request, meta)
        });
        let with = future_size(|(dispatcher, pool, request, meta): (&'static Dispatcher, _, Request, _)| {
            dispatcher.dispatch_with(pool, request, meta)
        });
        let request = std::mem::size_of::<Request>();
        assert!(
            with < inner + request,
            "dispatch_with's future is {with} bytes, dispatch_inner's {inner}: does it keep its own {request}-byte request?"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_body_written_over_a_few_turns_of_another_task_leaves_whole_with_its_record() {
        let (frames, body, done) = fed();
        let ended = Arc::new(AtomicBool::new(false));
        let call = {
            let ended = ended.clone();
            // Each frame in a turn of its own, then the call's end a turn
            // later, then its record, later than `within`: once the call
            // has ended, only its record is to come, and the head waits
            // for it.
            tokio::spawn(async move {
                for part in ["hello, ", "wor", "ld\n"] {
                    frames.send(Bytes::from_static(part.as_bytes())).unwrap();
                    tokio::task::yield_now().await;
                }
                drop(frames);
                tokio::task::yield_now().await;
                ended.store(true, Ordering::Release);
                tokio::time::sleep(Duration::from_millis(500)).await;
                done.send(true).unwrap();
            })
        };
        let (body, _) = settled(body, Duration::from_millis(200), SETTLE_BYTES, ended).await;
        assert_eq!(held_text(&body), "hello, world\n");
        assert!(body.finished, "the body's end is held too");
        assert_eq!(body.written, Some(true), "the record's fate is known: the end leaves with the head");
        call.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_body_that_stops_coming_leaves_what_it_has_once_the_wait_is_over() {
        let (frames, body, _done) = fed();
        frames.send(Bytes::from_static(b"first part\n")).unwrap();
        // The rest never comes (the guest waits for something else).
        let within = Duration::from_millis(20);
        let (body, took) = settled(body, within, SETTLE_BYTES, Arc::default()).await;
        assert!(took >= within, "it waited its `within`: {took:?}");
        assert_eq!(held_text(&body), "first part\n");
        assert!(!body.finished);
        assert_eq!(body.written, None);
        drop(frames);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_body_that_keeps_coming_leaves_once_its_wait_is_over_or_it_held_enough() {
        // A byte a turn, for good: each look finds more of it.
        let (frames, body, _done) = fed();
        let stream = tokio::spawn(async move {
            while frames.send(Bytes::from_static(b"x")).is_ok() {
                tokio::task::yield_now().await;
            }
        });
        let within = Duration::from_millis(20);
        let (mut body, took) = settled(body, within, 64 << 20, Arc::default()).await;
        assert!(took >= within, "it waited its `within`: {took:?}");
        let held = held_text(&body).len();
        assert!(held < 64 << 20, "it stopped at its `within`, not at `most`: {held} bytes");
        assert!(!body.finished);
        body.held.clear();
        let most = 256;
        let (body, _) = settled(body, Duration::from_secs(3600), most, Arc::default()).await;
        assert_eq!(held_text(&body).len(), most + 1, "it stopped once it held more than `most`");
        drop(body);
        stream.await.unwrap();
    }
}
