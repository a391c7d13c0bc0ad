//! Prometheus metrics, served at `/metrics`.
//!
//! All series are labelled by `function`; errors also by `kind` (the
//! [`Outcome`] name); `shoal_tenant_*` add them up per tenant. Counters add up what the usage records say, so
//! `/metrics` and `shoal usage` agree.

use prometheus::{
    CounterVec, Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::metering::UsageRecord;
use crate::outcome::Outcome;

/// The host's metric families.
pub struct Metrics {
    registry: Registry,
    /// The host's breakers, once watched (their series go with their
    /// function).
    breakers: std::sync::OnceLock<std::sync::Arc<crate::resilience::Breakers>>,
    requests: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    cold_starts: IntCounterVec,
    instances: IntGaugeVec,
    fuel: IntCounterVec,
    cpu_seconds: CounterVec,
    memory_byte_seconds: CounterVec,
    ledger_errors: IntCounter,
    ledger_writes: IntCounter,
    instances_reclaimed: IntCounter,
    abi_denied: IntCounterVec,
    abi_limited: IntCounterVec,
    deliveries: IntCounterVec,
    log_dropped: IntCounterVec,
    connections_open: IntGauge,
    connections_closed: IntCounterVec,
    cpu_throttled_seconds: CounterVec,
    tenant_requests: IntCounterVec,
    tenant_cpu_seconds: CounterVec,
    tenant_billed_seconds: CounterVec,
    /// CPU the process used that no usage record carries (see `render`).
    host_cpu_seconds: prometheus::Counter,
    /// CPU every usage record so far carried, in µs (kept apart from
    /// `cpu_seconds`, whose series go when their function does).
    attributed_cpu_us: std::sync::atomic::AtomicU64,
    /// The series every request of a function adds to, by tenant and
    /// function: looked up once per request instead of once per series
    /// (each `with_label_values` hashes its labels and takes a lock).
    /// By function, then tenant. Read by every request; written at a
    /// function's first.
    series: std::sync::RwLock<SeriesByFunction>,
}

type SeriesByFunction =
    std::collections::HashMap<String, std::collections::HashMap<String, std::sync::Arc<RequestSeries>>>;

/// The series one function's requests add to (handles into the vectors).
/// Those a request may not touch are made at the first that does, as
/// before: `/metrics` shows no cold-start, fuel or throttling series for a
/// function that had none.
struct RequestSeries {
    requests: prometheus::IntCounter,
    duration: prometheus::Histogram,
    cold_starts: std::sync::OnceLock<prometheus::IntCounter>,
    fuel: std::sync::OnceLock<prometheus::IntCounter>,
    cpu_seconds: prometheus::Counter,
    memory_byte_seconds: prometheus::Counter,
    cpu_throttled_seconds: std::sync::OnceLock<prometheus::Counter>,
    tenant_requests: prometheus::IntCounter,
    tenant_cpu_seconds: prometheus::Counter,
    tenant_billed_seconds: prometheus::Counter,
}

impl Metrics {
    /// Register every family in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let function = &["function"];
        let requests =
            IntCounterVec::new(Opts::new("shoal_requests_total", "Requests that reached a function"), function)
                .expect("invariant: static metric definition");
        let errors = IntCounterVec::new(
            Opts::new("shoal_request_errors_total", "Requests that did not end ok, by kind"),
            &["function", "kind"],
        )
        .expect("invariant: static metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new("shoal_request_duration_seconds", "Handler wall time").buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            function,
        )
        .expect("invariant: static metric definition");
        let cold_starts =
            IntCounterVec::new(Opts::new("shoal_cold_starts_total", "Requests that needed a new instance"), function)
                .expect("invariant: static metric definition");
        let instances = IntGaugeVec::new(Opts::new("shoal_instances", "Live instances"), &["function", "version"])
            .expect("invariant: static metric definition");
        let fuel = IntCounterVec::new(Opts::new("shoal_fuel_consumed_total", "Fuel consumed by requests"), function)
            .expect("invariant: static metric definition");
        let cpu_seconds = CounterVec::new(Opts::new("shoal_cpu_seconds_total", "CPU time of requests"), function)
            .expect("invariant: static metric definition");
        let memory_byte_seconds = CounterVec::new(
            Opts::new("shoal_memory_byte_seconds_total", "Peak memory × billed time of requests, in byte-seconds"),
            function,
        )
        .expect("invariant: static metric definition");
        let ledger_errors =
            IntCounter::new("shoal_ledger_write_errors_total", "Usage records that could not be written")
                .expect("invariant: static metric definition");
        let ledger_writes = IntCounter::new(
            "shoal_ledger_writes_total",
            "Writes of usage records to the ledger (the records of calls that end together share one)",
        )
        .expect("invariant: static metric definition");
        let instances_reclaimed = IntCounter::new(
            "shoal_instances_reclaimed_total",
            "Idle instances destroyed early because every instance slot of the engine was taken",
        )
        .expect("invariant: static metric definition");
        let abi_denied = IntCounterVec::new(
            Opts::new("shoal_abi_denied_total", "Runtime ABI calls refused for lack of a grant"),
            &["function", "capability"],
        )
        .expect("invariant: static metric definition");
        let abi_limited = IntCounterVec::new(
            Opts::new("shoal_abi_limited_total", "Runtime ABI calls refused by a size or rate limit"),
            &["function", "capability"],
        )
        .expect("invariant: static metric definition");
        let deliveries = IntCounterVec::new(
            Opts::new("shoal_messages_delivered_total", "Message deliveries to subscribers, by result"),
            &["function", "topic", "result"],
        )
        .expect("invariant: static metric definition");
        let log_dropped = IntCounterVec::new(
            Opts::new(
                "shoal_log_dropped_lines_total",
                "Guest output lines dropped: over log_bytes_per_second, or not taken in time by a container's log reader",
            ),
            function,
        )
        .expect("invariant: static metric definition");
        let connections_open = IntGauge::new("shoal_connections_open", "HTTP connections open, all listeners")
            .expect("invariant: static metric definition");
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "shoal_connections_closed_total",
                "HTTP connections closed by the front door's limits, by reason",
            ),
            &["reason"],
        )
        .expect("invariant: static metric definition");
        let cpu_throttled_seconds = CounterVec::new(
            Opts::new(
                "shoal_cpu_throttled_seconds_total",
                "Time requests waited because their function was over its cpu_millis share",
            ),
            function,
        )
        .expect("invariant: static metric definition");
        // Per-tenant totals: what an operator bills a namespace for. They
        // outlive the tenant's functions (a tenant's bill does not vanish
        // when its pods are deleted), one series per tenant.
        let tenant = &["tenant"];
        let tenant_requests = IntCounterVec::new(
            Opts::new("shoal_tenant_requests_total", "Requests served for a tenant's functions"),
            tenant,
        )
        .expect("invariant: static metric definition");
        let tenant_cpu_seconds =
            CounterVec::new(Opts::new("shoal_tenant_cpu_seconds_total", "CPU time of a tenant's requests"), tenant)
                .expect("invariant: static metric definition");
        let tenant_billed_seconds = CounterVec::new(
            Opts::new("shoal_tenant_billed_seconds_total", "Billed wall time of a tenant's requests"),
            tenant,
        )
        .expect("invariant: static metric definition");
        let host_cpu_seconds = prometheus::Counter::new(
            "shoal_host_cpu_seconds_total",
            "CPU time of the host process not carried by any usage record (the process's CPU minus every request's)",
        )
        .expect("invariant: static metric definition");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(host_cpu_seconds.clone()),
            Box::new(cpu_throttled_seconds.clone()),
            Box::new(tenant_requests.clone()),
            Box::new(tenant_cpu_seconds.clone()),
            Box::new(tenant_billed_seconds.clone()),
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(cold_starts.clone()),
            Box::new(instances.clone()),
            Box::new(fuel.clone()),
            Box::new(cpu_seconds.clone()),
            Box::new(memory_byte_seconds.clone()),
            Box::new(ledger_errors.clone()),
            Box::new(ledger_writes.clone()),
            Box::new(instances_reclaimed.clone()),
            Box::new(abi_denied.clone()),
            Box::new(abi_limited.clone()),
            Box::new(deliveries.clone()),
            Box::new(log_dropped.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_closed.clone()),
        ] {
            registry.register(collector).expect("invariant: metric names are unique");
        }
        Metrics {
            registry,
            breakers: std::sync::OnceLock::new(),
            requests,
            errors,
            duration,
            cold_starts,
            instances,
            fuel,
            cpu_seconds,
            memory_byte_seconds,
            ledger_errors,
            ledger_writes,
            instances_reclaimed,
            abi_denied,
            abi_limited,
            deliveries,
            log_dropped,
            connections_open,
            connections_closed,
            cpu_throttled_seconds,
            tenant_requests,
            tenant_cpu_seconds,
            tenant_billed_seconds,
            host_cpu_seconds,
            attributed_cpu_us: std::sync::atomic::AtomicU64::new(0),
            series: std::sync::RwLock::default(),
        }
    }

    /// A connection opened (+1) or ended (-1).
    pub fn connection_open(&self, delta: i64) {
        self.connections_open.add(delta);
    }

    /// The front door closed a connection (`reason`: `max_connections`,
    /// `header_timeout`).
    pub fn connection_closed(&self, reason: &str) {
        self.connections_closed.with_label_values(&[reason]).inc();
    }

    /// Count guest output lines dropped: over the function's log budget,
    /// or by a container's output FIFO that was full.
    pub fn log_dropped(&self, function: &str, lines: u64) {
        self.log_dropped.with_label_values(&[function]).inc_by(lines);
    }

    /// Count a call refused for lack of a grant.
    pub fn abi_denied(&self, function: &str, capability: &str) {
        self.abi_denied.with_label_values(&[function, capability]).inc();
    }

    /// Count a call refused by a size or rate limit.
    pub fn abi_limited(&self, function: &str, capability: &str) {
        self.abi_limited.with_label_values(&[function, capability]).inc();
    }

    /// Count a message delivery (`result`: `acked`, `retried` or `dropped`).
    pub fn delivery(&self, function: &str, topic: &str, result: &str) {
        self.deliveries.with_label_values(&[function, topic, result]).inc();
    }

    /// Count one request from its usage record.
    pub fn observe(&self, record: &UsageRecord<'_>) {
        let series = self.series_of(&record.tenant, &record.function);
        let function = [&*record.function];
        series.requests.inc();
        if record.outcome != Outcome::Ok {
            self.errors.with_label_values(&[&*record.function, record.outcome.as_str()]).inc();
        }
        series.duration.observe(record.wall_us as f64 / 1e6);
        if record.cold {
            series.cold_starts.get_or_init(|| self.cold_starts.with_label_values(&function)).inc();
        }
        if let Some(fuel) = record.fuel {
            series.fuel.get_or_init(|| self.fuel.with_label_values(&function)).inc_by(fuel);
        }
        series.cpu_seconds.inc_by(record.cpu_us as f64 / 1e6);
        self.attributed_cpu_us.fetch_add(record.cpu_us, std::sync::atomic::Ordering::Relaxed);
        series.memory_byte_seconds.inc_by(record.memory_byte_ms as f64 / 1e3);
        if record.throttled_us > 0 {
            let throttled =
                series.cpu_throttled_seconds.get_or_init(|| self.cpu_throttled_seconds.with_label_values(&function));
            throttled.inc_by(record.throttled_us as f64 / 1e6);
        }
        series.tenant_requests.inc();
        series.tenant_cpu_seconds.inc_by(record.cpu_us as f64 / 1e6);
        series.tenant_billed_seconds.inc_by(record.billed_ms as f64 / 1e3);
    }

    /// The series of `function`'s requests (made at its first request, and
    /// again after [`Metrics::forget_function`]).
    fn series_of(&self, tenant: &str, function: &str) -> std::sync::Arc<RequestSeries> {
        let found = |series: &SeriesByFunction| series.get(function)?.get(tenant).cloned();
        if let Some(found) = found(&self.series.read().unwrap_or_else(std::sync::PoisonError::into_inner)) {
            return found;
        }
        let mut series = self.series.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another request may have made them meanwhile.
        if let Some(found) = found(&series) {
            return found;
        }
        let labels = [function];
        let tenant_labels = [tenant];
        let made = std::sync::Arc::new(RequestSeries {
            requests: self.requests.with_label_values(&labels),
            duration: self.duration.with_label_values(&labels),
            cold_starts: std::sync::OnceLock::new(),
            fuel: std::sync::OnceLock::new(),
            cpu_seconds: self.cpu_seconds.with_label_values(&labels),
            memory_byte_seconds: self.memory_byte_seconds.with_label_values(&labels),
            cpu_throttled_seconds: std::sync::OnceLock::new(),
            tenant_requests: self.tenant_requests.with_label_values(&tenant_labels),
            tenant_cpu_seconds: self.tenant_cpu_seconds.with_label_values(&tenant_labels),
            tenant_billed_seconds: self.tenant_billed_seconds.with_label_values(&tenant_labels),
        });
        series.entry(function.to_string()).or_default().insert(tenant.to_string(), made.clone());
        made
    }

    /// CPU seconds metered for `function` so far.
    pub fn cpu_seconds(&self, function: &str) -> f64 {
        self.cpu_seconds.with_label_values(&[function]).get()
    }

    /// Count a request refused before reaching an instance (overload).
    pub fn observe_refused(&self, function: &str, outcome: Outcome) {
        self.requests.with_label_values(&[function]).inc();
        self.errors.with_label_values(&[function, outcome.as_str()]).inc();
    }

    /// Set a function version's live instance count.
    pub fn set_instances(&self, function: &str, version: &str, live: usize) {
        self.instances.with_label_values(&[function, version]).set(live as i64);
    }

    /// Forget a function version's instance gauge (after it is gone).
    pub fn forget_instances(&self, function: &str, version: &str) {
        let _ = self.instances.remove_label_values(&[function, version]);
    }

    /// Remove every series of `function` (it was undeployed or its container
    /// deleted): a host that runs for months keeps no series of what is
    /// gone. Its usage stays in the ledger.
    pub fn forget_function(&self, function: &str) {
        // First: a request after this makes its series again.
        self.series.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(function);
        if let Some(breakers) = self.breakers.get() {
            breakers.forget(function);
        }
        forget(&self.requests, function);
        forget(&self.errors, function);
        forget(&self.duration, function);
        forget(&self.cold_starts, function);
        forget(&self.instances, function);
        forget(&self.fuel, function);
        forget(&self.cpu_seconds, function);
        forget(&self.memory_byte_seconds, function);
        forget(&self.abi_denied, function);
        forget(&self.abi_limited, function);
        forget(&self.deliveries, function);
        forget(&self.log_dropped, function);
        forget(&self.cpu_throttled_seconds, function);
        // And again: a request that raced with this kept no handle to the
        // series just removed.
        self.series.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(function);
    }

    /// Count an idle instance reclaimed for its slot.
    pub fn instance_reclaimed(&self) {
        self.instances_reclaimed.inc();
    }

    /// Count a usage record that could not be written.
    pub fn ledger_error(&self) {
        self.ledger_errors.inc();
    }

    /// Count a write to the ledger (of one record or several).
    pub fn ledger_written(&self) {
        self.ledger_writes.inc();
    }

    /// Report `breakers` (their state, retries and short-circuited calls)
    /// with the other metrics. Called once, when a host's services are
    /// built.
    pub fn watch_breakers(&self, breakers: std::sync::Arc<crate::resilience::Breakers>) {
        if self.breakers.set(breakers.clone()).is_ok() {
            let _ = self.registry.register(Box::new(BreakerCollector::new(breakers)));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.update_host_cpu();
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

impl Metrics {
    /// Bring `shoal_host_cpu_seconds_total` up to the process's CPU time
    /// minus what the usage records carry, so that the two add up to the
    /// process's CPU. A request's CPU lands in its record when it ends, so
    /// while CPU-bound requests run the difference runs ahead of the host's
    /// own share; the counter never goes back (counters only rise), and
    /// the sum is exact again once those requests have ended and their
    /// share has been outgrown.
    fn update_host_cpu(&self) {
        let process = process_cpu_seconds();
        let attributed = self.attributed_cpu_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6;
        let behind = (process - attributed) - self.host_cpu_seconds.get();
        if behind > 0.0 {
            self.host_cpu_seconds.inc_by(behind);
        }
    }
}

/// CPU time (user + system) of the whole process so far.
pub fn process_cpu_seconds() -> f64 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_PROCESS_CPUTIME_ID).map_or(0.0, |time| std::time::Duration::from(time).as_secs_f64())
}

/// Remove the series of `vec` whose `function` label is `function`,
/// whatever its other labels. (prometheus has no partial-match removal:
/// the label sets are read back from what the vector collects.)
fn forget<T: prometheus::core::MetricVecBuilder>(vec: &prometheus::core::MetricVec<T>, function: &str) {
    use prometheus::core::Collector as _;
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels = metric.get_label();
            if !labels.iter().any(|label| label.name() == "function" && label.value() == function) {
                continue;
            }
            let values: std::collections::HashMap<&str, &str> =
                labels.iter().map(|label| (label.name(), label.value())).collect();
            let _ = vec.remove(&values);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The circuit breakers and retry budgets of a host's functions, read
/// when `/metrics` is scraped: `shoal_breaker_state{function,target}` (0
/// closed, 1 half-open, 2 open), `shoal_breaker_retries_total` and
/// `shoal_breaker_short_circuited_total` per target, and
/// `shoal_retry_budget_exhausted_total` per function.
struct BreakerCollector {
    breakers: std::sync::Arc<crate::resilience::Breakers>,
    descs: Vec<prometheus::core::Desc>,
}

impl BreakerCollector {
    const STATE: (&str, &str) =
        ("shoal_breaker_state", "Circuit breaker of a function's target endpoint: 0 closed, 1 half-open, 2 open");
    const RETRIES: (&str, &str) = ("shoal_breaker_retries_total", "Calls to a target endpoint that were retries");
    const SHORT: (&str, &str) =
        ("shoal_breaker_short_circuited_total", "Calls refused at once because the target's breaker was open");
    const BUDGET: (&str, &str) =
        ("shoal_retry_budget_exhausted_total", "Retries not made because the function's retry budget was spent");

    fn new(breakers: std::sync::Arc<crate::resilience::Breakers>) -> BreakerCollector {
        let labels = |names: &[&str]| names.iter().map(std::string::ToString::to_string).collect::<Vec<_>>();
        let desc = |(name, help): (&str, &str), variable: Vec<String>| {
            prometheus::core::Desc::new(name.to_string(), help.to_string(), variable, Default::default())
                .expect("invariant: static metric definition")
        };
        let descs = vec![
            desc(Self::STATE, labels(&["function", "target"])),
            desc(Self::RETRIES, labels(&["function", "target"])),
            desc(Self::SHORT, labels(&["function", "target"])),
            desc(Self::BUDGET, labels(&["function"])),
        ];
        BreakerCollector { breakers, descs }
    }
}

impl prometheus::core::Collector for BreakerCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let pair = &["function", "target"];
        let state = IntGaugeVec::new(Opts::new(Self::STATE.0, Self::STATE.1), pair);
        let retries = IntCounterVec::new(Opts::new(Self::RETRIES.0, Self::RETRIES.1), pair);
        let short = IntCounterVec::new(Opts::new(Self::SHORT.0, Self::SHORT.1), pair);
        let budget = IntCounterVec::new(Opts::new(Self::BUDGET.0, Self::BUDGET.1), &["function"]);
        let (Ok(state), Ok(retries), Ok(short), Ok(budget)) = (state, retries, short, budget) else {
            return Vec::new();
        };
        for view in self.breakers.views() {
            let labels = [view.function.as_str(), view.target.as_str()];
            state.with_label_values(&labels).set(view.state.gauge());
            retries.with_label_values(&labels).inc_by(view.retries);
            short.with_label_values(&labels).inc_by(view.short_circuited);
        }
        for (function, refused) in self.breakers.budget_refusals() {
            budget.with_label_values(&[function.as_str()]).inc_by(refused);
        }
        [state.collect(), retries.collect(), short.collect(), budget.collect()].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_function_leaves_no_series_and_others_keep_theirs() {
        let metrics = Metrics::new();
        for function in ["gone", "kept"] {
            metrics.observe_refused(function, Outcome::Overloaded);
            metrics.abi_denied(function, "keyvalue.get");
            metrics.delivery(function, "orders", "acked");
            metrics.set_instances(function, "v1", 2);
        }
        metrics.forget_function("gone");
        let text = metrics.render();
        assert!(!text.contains("\"gone\""), "{text}");
        for family in ["shoal_requests_total", "shoal_request_errors_total", "shoal_abi_denied_total"] {
            assert!(text.lines().any(|l| l.starts_with(family) && l.contains("function=\"kept\"")), "{family}: {text}");
        }
        assert!(text.contains("shoal_messages_delivered_total{function=\"kept\""), "{text}");
    }

    fn served(function: &str, cold: bool) -> UsageRecord<'_> {
        let stats = crate::metering::CallStats {
            wall: std::time::Duration::from_millis(3),
            cpu: std::time::Duration::from_millis(2),
            fuel: Some(500),
            ..Default::default()
        };
        let started = std::time::SystemTime::now();
        UsageRecord::new("r", None, "team-a", function, "v1", started, &stats, cold, None, Outcome::Ok, 200)
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn a_function_counted_again_after_it_was_forgotten_starts_its_series_from_zero() {
        let metrics = Metrics::new();
        metrics.observe(&served("hello", true));
        metrics.observe(&served("hello", false));
        let text = metrics.render();
        assert_eq!(value(&text, "shoal_requests_total{function=\"hello\"}"), Some(2.0), "{text}");
        assert_eq!(value(&text, "shoal_cold_starts_total{function=\"hello\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "shoal_fuel_consumed_total{function=\"hello\"}"), Some(1000.0), "{text}");
        assert!(!text.contains("shoal_cpu_throttled_seconds_total{function"), "never throttled: {text}");
        metrics.forget_function("hello");
        assert!(!metrics.render().contains("\"hello\""));
        metrics.observe(&served("hello", false));
        let text = metrics.render();
        assert_eq!(value(&text, "shoal_requests_total{function=\"hello\"}"), Some(1.0), "{text}");
        assert_eq!(value(&text, "shoal_fuel_consumed_total{function=\"hello\"}"), Some(500.0), "{text}");
        assert!(!text.contains("shoal_cold_starts_total{function"), "no cold start since: {text}");
        assert_eq!(value(&text, "shoal_tenant_requests_total{tenant=\"team-a\"}"), Some(3.0), "{text}");
    }
}
