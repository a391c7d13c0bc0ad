//! Spans made only when something needs them.
//!
//! Every log line written while a request is served carries that request's
//! span (`request{tenant=… function=… request_id=… …}`). tracing-subscriber
//! formats a span's fields into text when the span is made, whether or not
//! anything then logs inside it, and it has no setting to defer that. Made
//! for each request, the span cost ≈3 µs of CPU per WASI 0.2 hello of ≈30
//! (W1 in an A/B pair, the span left out against kept); almost all requests
//! log nothing at the default level.
//!
//! So a [`LazySpan`] holds what its span would say, and makes the span the
//! first time anything inside it needs one: an event that will be written,
//! a new span whose parent is the current one, or a look at the current span
//! (`Span::current`). From then on it is entered on every poll, just like
//! `tracing::Instrumented`; log lines, nested spans and filters see exactly
//! what they would see had the span been made up front. A request that logs
//! nothing never makes its span.
//!
//! Two parts make this work:
//! - [`InSpan`] wraps a future and, while polling it, makes its `LazySpan`
//!   the thread's *pending* span (a thread-local; nested `InSpan`s stack);
//! - [`LazySpans`] wraps the process's subscriber and, before it passes on
//!   an event, a new contextual span or a `current_span` query, makes and
//!   enters the thread's pending span.
//!
//! Without `LazySpans` in front of the subscriber (a library user's own
//! subscriber, or the `EnvFilter` the CLI uses for span directives, which
//! must see each request's span entered to decide what inside it is on),
//! a `LazySpan` makes its span at once.
//!
//! Limits: `LazySpans` must not wrap a subscriber with per-layer filters
//! (`Layer::with_filter`). Making a span between an event's `enabled` and
//! its `event` runs the filters for the span, and per-layer filters keep
//! their verdict on the event in a thread-local that this overwrites. The
//! CLI's filter is global. And a lazy span polled on a thread whose default
//! subscriber is not the `LazySpans` it was created under is never made
//! (only scoped subscribers, `tracing::subscriber::with_default`, do that).

use std::any::TypeId;
use std::cell::Cell;
use std::future::Future;
use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tracing::level_filters::{LevelFilter, STATIC_MAX_LEVEL};
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Span, Subscriber};
use tracing_core::callsite::{Callsite as _, DefaultCallsite};

/// What a lazily made span says: made on demand through `dispatch`, as a
/// child of `parent` (or a root without one).
pub trait SpanFields: Send + Sync + 'static {
    /// The span's callsite: registered as the lazy span is created (outside
    /// any subscriber's callback), and asked whether the span is on before
    /// it is made.
    fn callsite(&self) -> &'static DefaultCallsite;
    /// Make the span, which is on. It must not be contextual (its parent
    /// is given).
    fn make(&self, parent: Option<Id>, dispatch: &Dispatch) -> Span;
}

/// A span made only when something inside it needs it (see the module docs).
pub struct LazySpan<F: SpanFields> {
    fields: F,
    parent: Parent,
    dispatch: Dispatch,
    made: OnceLock<Span>,
}

/// Where a lazy span sits: inside another lazy span (a nested request),
/// or inside whatever span was current when it was created.
enum Parent {
    Lazy(Arc<dyn Pending>),
    Span(Span),
}

/// A lazy span as the thread-local and the subscriber see it.
trait Pending: Send + Sync {
    /// Its span, made now if it was not yet.
    fn span(&self) -> &Span;
    /// Its span if it was made.
    fn made(&self) -> Option<&Span>;
}

impl<F: SpanFields> Pending for LazySpan<F> {
    fn span(&self) -> &Span {
        self.made.get_or_init(|| {
            // What `tracing::span!` asks before it makes a span.
            let callsite = self.fields.callsite();
            let metadata = callsite.metadata();
            let level = *metadata.level();
            let off = STATIC_MAX_LEVEL < level || LevelFilter::current() < level || callsite.interest().is_never();
            if off || !self.dispatch.enabled(metadata) {
                return Span::none();
            }
            let parent = match &self.parent {
                Parent::Lazy(parent) => parent.span().id(),
                Parent::Span(span) => span.id(),
            };
            self.fields.make(parent, &self.dispatch)
        })
    }

    fn made(&self) -> Option<&Span> {
        self.made.get()
    }
}

impl<F: SpanFields> LazySpan<F> {
    /// A span saying `fields`, inside the thread's pending lazy span if
    /// there is one and it was not entered (else inside the current span).
    /// Made at once unless the current subscriber is a [`LazySpans`].
    pub fn new(fields: F) -> Arc<Self> {
        // Here, outside any subscriber's callback: registering a callsite
        // from inside one (when the span is made) could find no subscriber
        // to ask, and cache "never" for good.
        fields.callsite().interest();
        let dispatch = tracing::dispatcher::get_default(Dispatch::clone);
        let lazy = dispatch.downcast_ref::<Marker>().is_some();
        let parent = match unentered_pending() {
            Some(pending) => Parent::Lazy(pending),
            None => Parent::Span(Span::current()),
        };
        let span = Arc::new(LazySpan { fields, parent, dispatch, made: OnceLock::new() });
        if !lazy {
            span.span();
        }
        span
    }
}

/// Marks a dispatch whose subscriber is a [`LazySpans`] (found through
/// `downcast_raw`, whatever it wraps).
struct Marker;

/// The thread's pending lazy span, and whether it was entered during the
/// poll under way (so the poll's end exits it).
struct Slot {
    span: Cell<Option<Arc<dyn Pending>>>,
    entered: Cell<bool>,
}

thread_local! {
    static PENDING: Slot = const { Slot { span: Cell::new(None), entered: Cell::new(false) } };
}

/// The thread's pending span if it was not entered yet. Once it was, the
/// current span says where things are (it may be one opened inside it).
fn unentered_pending() -> Option<Arc<dyn Pending>> {
    let pending = PENDING.try_with(|pending| {
        if pending.entered.get() {
            return None;
        }
        let span = pending.span.take();
        let copy = span.clone();
        pending.span.set(span);
        copy
    });
    pending.ok().flatten()
}

/// Make and enter the thread's pending span, if it was not entered yet.
fn enter_pending() {
    // A thread being torn down has no pending span to enter.
    let _ = PENDING.try_with(|pending| {
        if pending.entered.get() {
            return;
        }
        let span = pending.span.take();
        let Some(lazy) = span.clone() else { return };
        pending.span.set(span);
        // Marked entered first: whatever logs while the span is made does
        // not recurse (it logs outside the span). Should making it panic,
        // the poll's end finds nothing made, so nothing to exit.
        pending.entered.set(true);
        lazy.span().with_subscriber(|(id, dispatch)| dispatch.enter(id));
    });
}

pin_project_lite::pin_project! {
    /// A future polled (and dropped) inside a [`LazySpan`].
    pub struct InSpan<T> {
        span: Option<Arc<dyn Pending>>,
        // Dropped by hand inside the span (`PinnedDrop`).
        #[pin]
        inner: ManuallyDrop<T>,
    }

    impl<T> PinnedDrop for InSpan<T> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            inside(this.span, || {
                // SAFETY: `inner` is pinned and dropped here in place, once:
                // this is `InSpan`'s drop, and nothing reads it afterwards.
                unsafe { ManuallyDrop::drop(this.inner.get_unchecked_mut()) }
            });
        }
    }
}

/// Poll `future` inside `span`.
pub fn in_span<F: SpanFields, T: Future>(span: Arc<LazySpan<F>>, future: T) -> InSpan<T> {
    InSpan { span: Some(span), inner: ManuallyDrop::new(future) }
}

/// Poll `future` inside the thread's pending lazy span, if there is one
/// and it was not entered (for a task spawned while one is polled); else
/// inside the current span, as `tracing::Instrument::in_current_span` does.
pub fn in_pending_span<T: Future>(future: T) -> InSpan<T> {
    let span = unentered_pending().unwrap_or_else(|| Arc::new(Current(Span::current())));
    InSpan { span: Some(span), inner: ManuallyDrop::new(future) }
}

/// A span that was made already, polled like a lazy one.
struct Current(Span);

impl Pending for Current {
    fn span(&self) -> &Span {
        &self.0
    }
    fn made(&self) -> Option<&Span> {
        Some(&self.0)
    }
}

impl<T: Future> Future for InSpan<T> {
    type Output = T::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T::Output> {
        let this = self.project();
        // SAFETY: a pinned projection of the `ManuallyDrop`'s content, which
        // is never moved out of it (only dropped in place, in `PinnedDrop`).
        let inner = unsafe { this.inner.map_unchecked_mut(|inner| &mut **inner) };
        inside(this.span, || inner.poll(cx))
    }
}

/// Run `work` with `slot`'s span as the thread's pending one, entered for
/// all of it if it was made already; then exit it if it was entered, and
/// give the thread back the pending span it had before.
fn inside<R>(slot: &mut Option<Arc<dyn Pending>>, work: impl FnOnce() -> R) -> R {
    // A thread being torn down has no pending span: the work runs as is.
    if PENDING.try_with(|_| ()).is_err() {
        return work();
    }
    let Some(span) = slot.take() else { return work() };
    let entered = span.made().is_some_and(|made| {
        made.with_subscriber(|(id, dispatch)| dispatch.enter(id));
        true
    });
    let previous = PENDING.with(|pending| (pending.span.replace(Some(span)), pending.entered.replace(entered)));
    // Put back even if `work` panics.
    let _restore = Restore { slot, previous: Some(previous) };
    work()
}

/// Ends [`inside`]: exits the span if it was entered, gives the thread back
/// its previous pending span, and the span back to its slot.
struct Restore<'a> {
    slot: &'a mut Option<Arc<dyn Pending>>,
    previous: Option<(Option<Arc<dyn Pending>>, bool)>,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let Some((span, entered)) = self.previous.take() else { return };
        let ours = PENDING.try_with(|pending| (pending.span.replace(span), pending.entered.replace(entered)));
        if let Ok((Some(ours), was_entered)) = ours {
            if was_entered && let Some(made) = ours.made() {
                made.with_subscriber(|(id, dispatch)| dispatch.exit(id));
            }
            *self.slot = Some(ours);
        }
    }
}

/// A subscriber that makes the thread's pending [`LazySpan`] before
/// anything needs it, and otherwise passes everything to the one it wraps.
pub struct LazySpans<S> {
    inner: S,
    marker: Marker,
}

impl<S: Subscriber> LazySpans<S> {
    /// Wrap `inner`.
    pub fn new(inner: S) -> Self {
        LazySpans { inner, marker: Marker }
    }
}

impl<S: Subscriber> Subscriber for LazySpans<S> {
    fn on_register_dispatch(&self, subscriber: &Dispatch) {
        self.inner.on_register_dispatch(subscriber);
    }

    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.inner.max_level_hint()
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        if span.is_contextual() {
            enter_pending();
        }
        self.inner.new_span(span)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        self.inner.record(span, values);
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.inner.record_follows_from(span, follows);
    }

    fn event_enabled(&self, event: &Event<'_>) -> bool {
        self.inner.event_enabled(event)
    }

    fn event(&self, event: &Event<'_>) {
        if event.is_contextual() {
            enter_pending();
        }
        self.inner.event(event);
    }

    fn enter(&self, span: &Id) {
        self.inner.enter(span);
    }

    fn exit(&self, span: &Id) {
        self.inner.exit(span);
    }

    fn clone_span(&self, id: &Id) -> Id {
        self.inner.clone_span(id)
    }

    #[allow(deprecated)]
    fn drop_span(&self, id: Id) {
        self.inner.drop_span(id);
    }

    fn try_close(&self, id: Id) -> bool {
        self.inner.try_close(id)
    }

    fn current_span(&self) -> tracing_core::span::Current {
        enter_pending();
        self.inner.current_span()
    }

    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            return Some(self as *const Self as *const ());
        }
        if id == TypeId::of::<Marker>() {
            return Some(&self.marker as *const Marker as *const ());
        }
        // SAFETY: passed on unchanged; the wrapped subscriber answers for
        // the pointer it returns for `id`, and lives as long as `self`.
        unsafe { self.inner.downcast_raw(id) }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::{Context, SubscriberExt as _};
    use tracing_subscriber::registry::LookupSpan;

    use super::*;

    /// Spans made, and for each event its message and the names of the
    /// spans it sits in (outermost first).
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<(usize, Vec<String>)>>);

    impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Seen {
        fn on_new_span(&self, _: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            self.0.lock().unwrap().0 += 1;
        }
        fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
            let scope = ctx.event_scope(event).into_iter().flat_map(tracing_subscriber::registry::Scope::from_root);
            let names: Vec<&str> = scope.map(|span| span.name()).collect();
            self.0.lock().unwrap().1.push(format!("{} in {}", event.metadata().name(), names.join(":")));
        }
    }

    /// A span named `outer` or `inner`, with no fields.
    struct Named(&'static str);

    use tracing_core::metadata::Kind;
    static OUTER_SITE: DefaultCallsite = DefaultCallsite::new(&OUTER);
    static OUTER: Metadata<'static> = tracing_core::metadata! {
        name: "outer", target: module_path!(), level: tracing::Level::INFO,
        fields: &[], callsite: &OUTER_SITE, kind: Kind::SPAN,
    };
    static INNER_SITE: DefaultCallsite = DefaultCallsite::new(&INNER);
    static INNER: Metadata<'static> = tracing_core::metadata! {
        name: "inner", target: module_path!(), level: tracing::Level::INFO,
        fields: &[], callsite: &INNER_SITE, kind: Kind::SPAN,
    };

    impl Named {
        fn site(&self) -> (&'static DefaultCallsite, &'static Metadata<'static>) {
            if self.0 == "outer" { (&OUTER_SITE, &OUTER) } else { (&INNER_SITE, &INNER) }
        }
    }

    impl SpanFields for Named {
        fn callsite(&self) -> &'static DefaultCallsite {
            self.site().0
        }

        fn make(&self, parent: Option<Id>, dispatch: &Dispatch) -> Span {
            let metadata = self.site().1;
            let values: [(&tracing::field::Field, Option<&dyn tracing::Value>); 0] = [];
            Span::child_of_with(parent, metadata, &metadata.fields().value_set(&values), dispatch)
        }
    }

    /// A future that never ends and logs as it is dropped.
    struct LogsOnDrop;

    impl Future for LogsOnDrop {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<()> {
            Poll::Pending
        }
    }

    impl Drop for LogsOnDrop {
        fn drop(&mut self) {
            tracing::info!(name: "dropped", "");
        }
    }

    /// Poll `future` to its end on this thread.
    fn run<T>(future: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
    }

    #[test]
    fn a_lazy_span_is_made_only_when_something_logs_inside_it_and_then_holds_what_follows() {
        let seen = Seen::default();
        let subscriber = LazySpans::new(tracing_subscriber::registry().with(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            run(in_span(LazySpan::new(Named("outer")), async {}));
            assert_eq!(seen.0.lock().unwrap().0, 0, "nothing logged: no span made");

            run(in_span(LazySpan::new(Named("outer")), async {
                let quiet = LazySpan::new(Named("inner"));
                in_span(quiet, tokio::task::yield_now()).await;
                assert_eq!(seen.0.lock().unwrap().0, 0, "still nothing logged");
                tracing::info!(name: "first", "");
                tokio::task::yield_now().await;
                tracing::info!(name: "after a yield", "");
                let nested = LazySpan::new(Named("inner"));
                in_span(nested, async { tracing::info!(name: "nested", "") }).await;
                let current = Span::current();
                in_pending_span(async { tracing::info!(name: "spawned", "") }).await;
                // What a future does as it is dropped happens inside its span.
                drop(in_span(LazySpan::new(Named("inner")), LogsOnDrop));
                assert_eq!(current.metadata().map(Metadata::name), Some("outer"));
            }));
            tracing::info!(name: "outside", "");
        });
        let seen = seen.0.lock().unwrap();
        assert_eq!(seen.0, 3, "the outer span and the inner ones that logged, no more");
        let expected = [
            "first in outer",
            "after a yield in outer",
            "nested in outer:inner",
            "spawned in outer",
            "dropped in outer:inner",
            "outside in ",
        ];
        assert_eq!(seen.1, expected);
    }
}
