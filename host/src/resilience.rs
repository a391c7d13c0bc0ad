//! Resilience for the calls a function makes beyond itself — `invoke`,
//! outbound HTTP and the Redis backend: a timeout per attempt, retries with
//! exponential back-off and full jitter (only for calls safe to repeat,
//! and never past a retry budget), and a circuit breaker per target
//! endpoint.
//!
//! A [`Breaker`] is *closed* while its endpoint answers; a run of
//! consecutive failures, or a failure ratio over its last calls, *opens*
//! it for a cool-down, during which calls fail at once without waiting;
//! after the cool-down it is *half-open*: one probe call goes through, and
//! its result closes the breaker or opens it again. With several endpoints
//! (the pods behind a Service), callers skip the ones whose breaker is open
//! (outlier ejection) while the others serve.
//!
//! The [`RetryBudget`] (after Finagle's) keeps retries a bounded share of
//! the calls: each first attempt deposits a fraction of a token, each retry
//! takes a whole one, and a small floor refills with time — so a failing
//! dependency cannot turn every call into `1 + retries` calls.
//!
//! Hand-written rather than taken from a crate: the crates that offer
//! breakers (`failsafe`, `tower`'s layers) keep their state private, while
//! Shoal shows every breaker in `/metrics`, `shoal breakers` and a log line
//! per state change with the trace id of the call that changed it, and
//! bounds their number per function (a guest picks its targets).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How calls to one kind of target are protected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// How long one attempt may take (connect, send and the head of the
    /// answer).
    pub timeout: Duration,
    /// Extra attempts for a call that is safe to repeat (0: none).
    pub retries: u32,
    /// The first back-off; each retry doubles it, up to `backoff_max`,
    /// and sleeps a random time up to it (full jitter).
    pub backoff: Duration,
    /// The longest back-off.
    pub backoff_max: Duration,
    /// When a target's breaker opens, and for how long.
    pub breaker: BreakerPolicy,
}

/// When a circuit breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerPolicy {
    /// Open after this many failures in a row.
    pub consecutive_failures: u32,
    /// Open when at least this percentage of the last `window` calls
    /// failed (once `window` calls were made).
    pub failure_percent: u8,
    /// How many of the latest calls the ratio looks at.
    pub window: u32,
    /// How long an open breaker refuses calls before it lets a probe
    /// through.
    pub cooldown: Duration,
}

impl Policy {
    /// The defaults for `invoke`: 10 s per attempt, 2 retries from 50 ms
    /// up to 1 s, a breaker that opens after 5 failures in a row or half
    /// of the last 20 calls, for 5 s.
    pub const INVOKE: Policy = Policy {
        timeout: Duration::from_secs(10),
        retries: 2,
        backoff: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        breaker: BreakerPolicy::DEFAULT,
    };

    /// The defaults for outbound HTTP: 30 s to connect, retries only of
    /// connections that were refused (nothing was sent), the same breaker.
    pub const OUTBOUND_HTTP: Policy = Policy { timeout: Duration::from_secs(30), ..Policy::INVOKE };

    /// The defaults for the Redis backend: the client's own 2 s per
    /// command, one retry of a read, the same breaker.
    pub const BACKEND: Policy = Policy { timeout: Duration::from_secs(2), retries: 1, ..Policy::INVOKE };

    /// The back-off before retry number `retry` (1 for the first retry): a
    /// random time up to `backoff · 2^(retry-1)`, capped at `backoff_max`.
    pub fn backoff_before(&self, retry: u32) -> Duration {
        let ceiling = self.backoff.saturating_mul(1u32 << retry.saturating_sub(1).min(16)).min(self.backoff_max);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// A function's policies for the calls it makes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policies {
    /// For `invoke`.
    pub invoke: Policy,
    /// For outbound HTTP.
    pub outbound_http: Policy,
}

impl Default for Policies {
    fn default() -> Self {
        Policies { invoke: Policy::INVOKE, outbound_http: Policy::OUTBOUND_HTTP }
    }
}

impl Policies {
    /// The defaults with a function's own settings: the remote invoke
    /// timeout, the retries and the breakers' threshold and cool-down.
    pub fn with(invoke_timeout: Duration, retries: u32, breaker_failures: u32, breaker_cooldown: Duration) -> Policies {
        let breaker = BreakerPolicy {
            consecutive_failures: breaker_failures,
            cooldown: breaker_cooldown,
            ..BreakerPolicy::DEFAULT
        };
        Policies {
            invoke: Policy { timeout: invoke_timeout, retries, breaker, ..Policy::INVOKE },
            outbound_http: Policy { breaker, ..Policy::OUTBOUND_HTTP },
        }
    }
}

impl BreakerPolicy {
    /// 5 failures in a row, or 50% of the last 20 calls, open the breaker
    /// for 5 s.
    pub const DEFAULT: BreakerPolicy =
        BreakerPolicy { consecutive_failures: 5, failure_percent: 50, window: 20, cooldown: Duration::from_secs(5) };
}

/// What a breaker lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// One probe call goes through; the others fail at once.
    HalfOpen,
    /// Calls fail at once until the cool-down ends.
    Open,
}

impl BreakerState {
    /// The value of `shoal_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half-open",
            BreakerState::Open => "open",
        })
    }
}

/// A call refused by an open (or probing) breaker.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the circuit breaker of {target} is {state} (retrying in {})", humantime::format_duration(*.retry_in))]
pub struct ShortCircuited {
    /// The endpoint.
    pub target: Arc<str>,
    /// Open, or half-open with its probe under way.
    pub state: BreakerState,
    /// When the next probe may go (rounded to milliseconds).
    pub retry_in: Duration,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Health {
    phase: Phase,
    consecutive_failures: u32,
    /// The latest calls, `true` for a failure (at most `window`).
    window: VecDeque<bool>,
    window_failures: u32,
    last_used: Instant,
}

/// The circuit breaker of one target endpoint, as seen by one function.
#[derive(Debug)]
pub struct Breaker {
    scope: Arc<str>,
    target: Arc<str>,
    policy: BreakerPolicy,
    health: Mutex<Health>,
    short_circuited: AtomicU64,
    retries: AtomicU64,
}

impl Breaker {
    fn new(scope: Arc<str>, target: Arc<str>, policy: BreakerPolicy) -> Breaker {
        Breaker {
            scope,
            target,
            policy,
            health: Mutex::new(Health {
                phase: Phase::Closed,
                consecutive_failures: 0,
                window: VecDeque::new(),
                window_failures: 0,
                last_used: Instant::now(),
            }),
            short_circuited: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    /// The endpoint this breaker guards.
    pub fn target(&self) -> &Arc<str> {
        &self.target
    }

    fn lock(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state now (an open breaker past its cool-down reads half-open).
    pub fn state(&self) -> BreakerState {
        match self.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if Instant::now() < until => BreakerState::Open,
            Phase::Open { .. } | Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call would be let through now (without taking the probe).
    pub fn admits(&self) -> bool {
        match self.lock().phase {
            Phase::Closed => true,
            Phase::Open { until } => Instant::now() >= until,
            Phase::HalfOpen { probing } => !probing,
        }
    }

    /// Let a call through, or refuse it at once. `trace_id` names the
    /// call's trace in the log line of a state change.
    pub fn try_call(self: &Arc<Self>, trace_id: Option<&str>) -> Result<Attempt, ShortCircuited> {
        let now = Instant::now();
        let mut health = self.lock();
        health.last_used = now;
        let probe = match health.phase {
            Phase::Closed => false,
            Phase::Open { until } if now < until => {
                drop(health);
                return Err(self.refuse(BreakerState::Open, until.saturating_duration_since(now)));
            }
            Phase::Open { .. } => {
                health.phase = Phase::HalfOpen { probing: true };
                self.changed(BreakerState::Open, BreakerState::HalfOpen, trace_id);
                true
            }
            Phase::HalfOpen { probing: true } => {
                drop(health);
                return Err(self.refuse(BreakerState::HalfOpen, Duration::ZERO));
            }
            Phase::HalfOpen { probing: false } => {
                health.phase = Phase::HalfOpen { probing: true };
                true
            }
        };
        Ok(Attempt { breaker: self.clone(), probe, trace_id: trace_id.map(Arc::from), done: false })
    }

    fn refuse(&self, state: BreakerState, retry_in: Duration) -> ShortCircuited {
        self.short_circuited.fetch_add(1, Ordering::Relaxed);
        let retry_in = Duration::from_millis(retry_in.as_millis().try_into().unwrap_or(u64::MAX));
        ShortCircuited { target: self.target.clone(), state, retry_in }
    }

    /// Count a retry of a call to this target.
    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn finish(&self, failed: bool, probe: bool, trace_id: Option<&str>) {
        let mut health = self.lock();
        let window = self.policy.window.max(1) as usize;
        health.window.push_back(failed);
        if failed {
            health.window_failures += 1;
        }
        while health.window.len() > window {
            if health.window.pop_front() == Some(true) {
                health.window_failures -= 1;
            }
        }
        health.consecutive_failures = if failed { health.consecutive_failures + 1 } else { 0 };
        let ratio_tripped = health.window.len() >= window
            && u64::from(health.window_failures) * 100 >= u64::from(self.policy.failure_percent) * window as u64;
        let tripped = health.consecutive_failures >= self.policy.consecutive_failures.max(1) || ratio_tripped;
        let before = match health.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        let after = match (&health.phase, failed) {
            // A probe decides; the other calls that were already under
            // way when the breaker opened do not.
            (Phase::HalfOpen { .. }, _) if probe => {
                if failed {
                    BreakerState::Open
                } else {
                    BreakerState::Closed
                }
            }
            (Phase::Closed, true) if tripped => BreakerState::Open,
            _ => before,
        };
        if after != before {
            health.phase = match after {
                BreakerState::Open => Phase::Open { until: Instant::now() + self.policy.cooldown },
                BreakerState::HalfOpen => Phase::HalfOpen { probing: false },
                BreakerState::Closed => {
                    health.window.clear();
                    health.window_failures = 0;
                    health.consecutive_failures = 0;
                    Phase::Closed
                }
            };
            drop(health);
            self.changed(before, after, trace_id);
        }
    }

    fn release_probe(&self) {
        let mut health = self.lock();
        if let Phase::HalfOpen { probing: true } = health.phase {
            health.phase = Phase::HalfOpen { probing: false };
        }
    }

    fn changed(&self, from: BreakerState, to: BreakerState, trace_id: Option<&str>) {
        tracing::warn!(
            function = %self.scope,
            target = %self.target,
            from = %from,
            to = %to,
            trace_id = trace_id.unwrap_or("-"),
            "circuit breaker {to}"
        );
    }

    fn view(&self) -> BreakerView {
        let state = self.state();
        let health = self.lock();
        let retry_in = match health.phase {
            Phase::Open { until } => until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        };
        BreakerView {
            function: self.scope.to_string(),
            target: self.target.to_string(),
            state,
            consecutive_failures: health.consecutive_failures,
            recent_failures: health.window_failures,
            recent_calls: health.window.len() as u32,
            retry_in_ms: retry_in.as_millis().try_into().unwrap_or(u64::MAX),
            short_circuited: self.short_circuited.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

/// One call let through a breaker; say how it went with
/// [`Attempt::succeeded`] or [`Attempt::failed`]. Dropped without either
/// (the caller went away), it counts for nothing, and a probe lets the
/// next call probe.
#[derive(Debug)]
pub struct Attempt {
    breaker: Arc<Breaker>,
    probe: bool,
    trace_id: Option<Arc<str>>,
    done: bool,
}

impl Attempt {
    /// The endpoint answered.
    pub fn succeeded(mut self) {
        self.done = true;
        self.breaker.finish(false, self.probe, self.trace_id.as_deref());
    }

    /// The endpoint failed (no connection, a timeout, a server error).
    pub fn failed(mut self) {
        self.done = true;
        self.breaker.finish(true, self.probe, self.trace_id.as_deref());
    }

    /// The breaker this attempt went through.
    pub fn breaker(&self) -> &Arc<Breaker> {
        &self.breaker
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.release_probe();
        }
    }
}

/// A breaker as `shoal breakers` and the admin API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerView {
    /// Whose calls it guards (`namespace/function`, or `backend`).
    pub function: String,
    /// The endpoint.
    pub target: String,
    /// Its state now.
    pub state: BreakerState,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Failures among the latest calls.
    pub recent_failures: u32,
    /// How many latest calls the ratio has seen.
    pub recent_calls: u32,
    /// For an open breaker, milliseconds until a probe may go.
    pub retry_in_ms: u64,
    /// Calls refused at once since the breaker was made.
    pub short_circuited: u64,
    /// Retries of calls to this target.
    pub retries: u64,
}

/// A share of calls that may be retried: each first attempt deposits
/// `ratio` of a token, each retry takes one, and `floor_per_second` tokens
/// come back with time; at most `cap` are kept.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    floor_per_second: f64,
    cap: f64,
    tokens: Mutex<(f64, Instant)>,
    refused: AtomicU64,
}

impl RetryBudget {
    /// Retries up to 20% of calls, plus 2 per second, at most 10 banked.
    pub fn new() -> RetryBudget {
        RetryBudget::with(0.2, 2.0, 10.0)
    }

    /// A budget of `ratio` of the calls plus `floor_per_second`, at most
    /// `cap` banked.
    pub fn with(ratio: f64, floor_per_second: f64, cap: f64) -> RetryBudget {
        RetryBudget {
            ratio,
            floor_per_second,
            cap,
            tokens: Mutex::new((cap, Instant::now())),
            refused: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (f64, Instant)> {
        self.tokens.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A first attempt was made.
    pub fn deposit(&self) {
        let mut tokens = self.lock();
        tokens.0 = (tokens.0 + self.ratio).min(self.cap);
    }

    /// Take the token for one retry; `false` when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        let mut tokens = self.lock();
        let now = Instant::now();
        let refill = now.saturating_duration_since(tokens.1).as_secs_f64() * self.floor_per_second;
        *tokens = ((tokens.0 + refill).min(self.cap), now);
        if tokens.0 >= 1.0 {
            tokens.0 -= 1.0;
            true
        } else {
            drop(tokens);
            self.refused.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Retries the budget refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new()
    }
}

/// The most targets one function keeps a breaker for: past it, the least
/// recently used closed breaker is forgotten (an open one only when every
/// one is open).
pub const MAX_TARGETS_PER_FUNCTION: usize = 64;

/// One function's breakers, by target.
type Targets = HashMap<Arc<str>, Arc<Breaker>>;

/// Every breaker and retry budget of a host, by function and target.
#[derive(Debug, Default)]
pub struct Breakers {
    breakers: Mutex<HashMap<Arc<str>, Targets>>,
    budgets: Mutex<HashMap<Arc<str>, Arc<RetryBudget>>>,
}

impl Breakers {
    /// No breakers yet.
    pub fn new() -> Breakers {
        Breakers::default()
    }

    /// The breaker of `target` for `scope`'s calls, made with `policy` if
    /// there is none yet (a function redeployed with another policy gets
    /// it for targets it has not called since).
    pub fn get(&self, scope: &str, target: &str, policy: &BreakerPolicy) -> Arc<Breaker> {
        let mut all = self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let targets = all.entry(Arc::from(scope)).or_default();
        if let Some(breaker) = targets.get(target) {
            return breaker.clone();
        }
        if targets.len() >= MAX_TARGETS_PER_FUNCTION {
            let victim = targets
                .iter()
                .min_by_key(|(_, breaker)| {
                    let health = breaker.lock();
                    (!matches!(health.phase, Phase::Closed), health.last_used)
                })
                .map(|(target, _)| target.clone());
            if let Some(victim) = victim {
                targets.remove(&victim);
            }
        }
        let breaker = Arc::new(Breaker::new(Arc::from(scope), Arc::from(target), *policy));
        targets.insert(breaker.target.clone(), breaker.clone());
        breaker
    }

    /// The retry budget of `scope`'s calls.
    pub fn budget(&self, scope: &str) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        budgets.entry(Arc::from(scope)).or_default().clone()
    }

    /// Forget `scope`'s breakers and budget (its function is gone).
    pub fn forget(&self, scope: &str) {
        self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(scope);
        self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(scope);
    }

    /// Every breaker, by function then target.
    pub fn views(&self) -> Vec<BreakerView> {
        let all: Vec<Arc<Breaker>> = {
            let all = self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            all.values().flat_map(|targets| targets.values().cloned()).collect()
        };
        let mut views: Vec<BreakerView> = all.iter().map(|breaker| breaker.view()).collect();
        views.sort_by(|a, b| (&a.function, &a.target).cmp(&(&b.function, &b.target)));
        views
    }

    /// Retries refused by the budget of each function.
    pub fn budget_refusals(&self) -> Vec<(String, u64)> {
        let budgets = self.budgets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut refusals: Vec<(String, u64)> =
            budgets.iter().map(|(scope, budget)| (scope.to_string(), budget.refused())).collect();
        refusals.sort();
        refusals
    }
}

/// Whether an HTTP status says its endpoint is failing (a trap or an
/// internal error, a bad gateway, no capacity, a timeout) rather than
/// answering: what counts against a circuit breaker.
pub fn is_failure_status(status: u16) -> bool {
    matches!(status, 500 | 502 | 503 | 504)
}

/// Whether an HTTP request may be sent again without asking its sender:
/// an idempotent method (RFC 9110: GET, HEAD, OPTIONS, TRACE, PUT, DELETE)
/// or an `Idempotency-Key` header (the caller says repeating it is safe).
pub fn is_idempotent(method: &http::Method, headers: &http::HeaderMap) -> bool {
    method.is_idempotent() || headers.contains_key("idempotency-key")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(consecutive_failures: u32, cooldown_ms: u64) -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures,
            failure_percent: 50,
            window: 20,
            cooldown: Duration::from_millis(cooldown_ms),
        }
    }

    #[test]
    fn a_breaker_opens_after_failures_in_a_row_refuses_at_once_then_lets_one_probe_through() {
        let breakers = Breakers::new();
        let breaker = breakers.get("a/caller", "10.0.0.1:8080", &policy(3, 50));
        for _ in 0..2 {
            breaker.try_call(None).expect("closed").failed();
        }
        breaker.try_call(None).expect("closed").succeeded();
        for _ in 0..2 {
            breaker.try_call(None).expect("closed").failed();
        }
        assert_eq!(breaker.state(), BreakerState::Closed, "a success resets the run");
        breaker.try_call(None).expect("closed").failed();
        assert_eq!(breaker.state(), BreakerState::Open);
        let refused = breaker.try_call(Some("trace")).expect_err("open");
        assert_eq!(refused.state, BreakerState::Open);
        assert!(refused.retry_in <= Duration::from_millis(50));
        assert!(refused.to_string().contains("10.0.0.1:8080 is open"), "{refused}");

        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let probe = breaker.try_call(None).expect("the probe");
        assert_eq!(breaker.try_call(None).expect_err("one probe at a time").state, BreakerState::HalfOpen);
        probe.failed();
        assert_eq!(breaker.state(), BreakerState::Open, "a failed probe opens it again");

        std::thread::sleep(Duration::from_millis(60));
        breaker.try_call(None).expect("the probe").succeeded();
        assert_eq!(breaker.state(), BreakerState::Closed, "a good probe closes it");
        let view = &breakers.views()[0];
        assert_eq!((view.short_circuited, view.consecutive_failures), (2, 0));
    }

    #[test]
    fn a_failure_ratio_over_the_window_opens_a_breaker_without_a_run() {
        let breaker = Breakers::new().get("f", "t", &BreakerPolicy { window: 10, ..policy(100, 1000) });
        for call in 0..10 {
            let attempt = breaker.try_call(None).expect("closed");
            if call % 2 == 1 { attempt.failed() } else { attempt.succeeded() }
        }
        assert_eq!(breaker.state(), BreakerState::Open, "5 of the last 10 failed");
    }

    #[test]
    fn a_probe_dropped_unanswered_lets_the_next_call_probe() {
        let breaker = Breakers::new().get("f", "t", &policy(1, 1));
        breaker.try_call(None).expect("closed").failed();
        std::thread::sleep(Duration::from_millis(5));
        drop(breaker.try_call(None).expect("the probe"));
        breaker.try_call(None).expect("a new probe").succeeded();
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn a_function_keeps_a_bounded_number_of_breakers_dropping_idle_closed_ones_first() {
        let breakers = Breakers::new();
        let open = breakers.get("f", "open", &policy(1, 60_000));
        open.try_call(None).expect("closed").failed();
        for n in 0..MAX_TARGETS_PER_FUNCTION * 2 {
            breakers.get("f", &format!("10.0.0.{n}:80"), &BreakerPolicy::DEFAULT);
        }
        let views = breakers.views();
        assert_eq!(views.len(), MAX_TARGETS_PER_FUNCTION);
        assert!(views.iter().any(|view| view.target == "open" && view.state == BreakerState::Open));
        breakers.forget("f");
        assert!(breakers.views().is_empty());
    }

    #[test]
    fn the_retry_budget_allows_a_share_of_calls_and_a_floor() {
        let budget = RetryBudget::with(0.2, 0.0, 10.0);
        let mut granted = 0;
        for _ in 0..100 {
            budget.deposit();
            if budget.try_withdraw() {
                granted += 1;
            }
        }
        // The 10 banked tokens plus 20% of 100 calls.
        assert!((28..=30).contains(&granted), "{granted}");
        assert!(budget.refused() >= 70);
        let floor = RetryBudget::with(0.0, 1000.0, 10.0);
        for _ in 0..10 {
            assert!(floor.try_withdraw());
        }
        std::thread::sleep(Duration::from_millis(5));
        assert!(floor.try_withdraw(), "the floor refills with time");
    }

    #[test]
    fn back_off_grows_to_its_cap_with_jitter() {
        let policy =
            Policy { backoff: Duration::from_millis(100), backoff_max: Duration::from_millis(300), ..Policy::INVOKE };
        for _ in 0..100 {
            assert!(policy.backoff_before(1) <= Duration::from_millis(100));
            assert!(policy.backoff_before(2) <= Duration::from_millis(200));
            assert!(policy.backoff_before(10) <= Duration::from_millis(300));
        }
        let spread: std::collections::HashSet<Duration> = (0..20).map(|_| policy.backoff_before(3)).collect();
        assert!(spread.len() > 10, "jittered: {spread:?}");
    }

    #[test]
    fn idempotent_requests_are_told_by_method_or_idempotency_key() {
        let mut headers = http::HeaderMap::new();
        assert!(is_idempotent(&http::Method::GET, &headers));
        assert!(is_idempotent(&http::Method::PUT, &headers));
        assert!(!is_idempotent(&http::Method::POST, &headers));
        headers.insert("idempotency-key", http::HeaderValue::from_static("order-7"));
        assert!(is_idempotent(&http::Method::POST, &headers));
    }
}
