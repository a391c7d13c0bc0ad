//! Per-function limits, their defaults and the host's maxima.

use super::*;

/// A limit out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A limit that must be above zero is zero.
    #[error("limits.{field} must be greater than 0")]
    Zero {
        /// The limit, as the manifest names it.
        field: &'static str,
    },
    /// An optional limit is zero; leaving it out means no limit.
    #[error("limits.{field} must be greater than 0 (omit it for no limit)")]
    ZeroNotOmitted {
        /// The limit, as the manifest names it.
        field: &'static str,
    },
    /// A limit is above what this host allows.
    #[error("limits.{field} = {value} is over the host's maximum of {maximum}")]
    OverMaximum {
        /// The limit, as the manifest names it.
        field: &'static str,
        /// The value asked for, in the manifest's unit.
        value: String,
        /// The host's maximum, with its unit.
        maximum: String,
    },
}

impl LimitError {
    /// `memory_mb` above [`MAX_MEMORY_BYTES`].
    pub(super) fn memory_over_maximum(mb: u64) -> LimitError {
        LimitError::OverMaximum {
            field: "memory_mb",
            value: mb.to_string(),
            maximum: format!("{} MiB", MAX_MEMORY_BYTES >> 20),
        }
    }
}

/// Per-function resource limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) one request may burn; `None`: unlimited.
    #[serde(default, deserialize_with = "non_zero_field::fuel_per_request")]
    pub fuel_per_request: Option<NonZeroU64>,
    /// Wall-clock time one request may take.
    #[serde(with = "humantime_serde_ms")]
    pub timeout: Duration,
    /// Linear memory one instance may hold, in bytes.
    pub memory_bytes: u64,
    /// Requests served at once; the rest wait up to `queue_timeout`.
    #[serde(deserialize_with = "non_zero_field::max_concurrency")]
    pub max_concurrency: NonZeroU32,
    /// How long a request waits for a free slot before a 503.
    #[serde(with = "humantime_serde_ms")]
    pub queue_timeout: Duration,
    /// An instance idle this long is destroyed (scale to zero).
    #[serde(with = "humantime_serde_ms")]
    pub idle_timeout: Duration,
    /// Time limit for the `start` hook.
    #[serde(with = "humantime_serde_ms")]
    pub start_timeout: Duration,
    /// Time limit for the `destroy` hook.
    #[serde(with = "humantime_serde_ms")]
    pub destroy_timeout: Duration,
    /// Largest HTTP request body, in bytes; past it the client gets 413
    /// (at once when the length is declared, else when the body passes it).
    #[serde(default = "defaults::max_request_bytes")]
    pub max_request_bytes: u64,
    /// Longest key-value key.
    #[serde(default = "defaults::kv_max_key_bytes")]
    pub kv_max_key_bytes: usize,
    /// Largest key-value value.
    #[serde(default = "defaults::kv_max_value_bytes")]
    pub kv_max_value_bytes: usize,
    /// Largest published message (and invoke request/response body).
    #[serde(default = "defaults::message_max_bytes")]
    pub message_max_bytes: usize,
    /// Runtime ABI calls per second, across the function's instances.
    #[serde(default = "defaults::abi_calls_per_second", deserialize_with = "non_zero_field::abi_calls_per_second")]
    pub abi_calls_per_second: NonZeroU32,
    /// Messages published per second, across the function's instances.
    #[serde(default = "defaults::publish_per_second", deserialize_with = "non_zero_field::publish_per_second")]
    pub publish_per_second: NonZeroU32,
    /// Bytes of stdout and stderr per second, across the function's
    /// instances; lines past it are dropped and counted.
    #[serde(default = "defaults::log_bytes_per_second", deserialize_with = "non_zero_field::log_bytes_per_second")]
    pub log_bytes_per_second: NonZeroU32,
    /// CPU time per second of wall time, in thousandths of a core, across
    /// the function's instances (Kubernetes' `resources.limits.cpu`);
    /// `None`: no limit. Past it, the function's calls wait for the next
    /// 100 ms period instead of running.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "non_zero_field::cpu_millis")]
    pub cpu_millis: Option<NonZeroU32>,
    /// Requests (and messages) one instance serves before it is retired:
    /// its `destroy` runs and the next request gets a fresh instance.
    /// `None`: no limit. For guests whose runtime keeps each request's
    /// state in the instance, e.g. JavaScript built with componentize-js
    /// (StarlingMonkey answers one request per instance), set 1.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_zero_field::max_requests_per_instance"
    )]
    pub max_requests_per_instance: Option<NonZeroU32>,
    /// Requests one instance serves at the same time. Only a WASI 0.3 HTTP
    /// handler (an async export) can take more than one; `None`: 16 for
    /// those (as `wasmtime serve`), 1 for everything else.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_zero_field::instance_concurrency"
    )]
    pub instance_concurrency: Option<NonZeroU32>,
    /// How long one attempt of an `invoke` of a function on another node
    /// may take (a local callee is bounded by its own `timeout`).
    #[serde(default = "defaults::invoke_timeout", with = "humantime_serde_ms")]
    pub invoke_timeout: Duration,
    /// Retries of an `invoke` that is safe to repeat (an idempotent method
    /// or an `Idempotency-Key`), or that never reached an endpoint.
    #[serde(default = "defaults::call_retries")]
    pub call_retries: u32,
    /// Failures in a row that open the circuit breaker of a target of the
    /// function's invokes and outbound HTTP.
    #[serde(default = "defaults::breaker_failures", deserialize_with = "non_zero_field::breaker_failures")]
    pub breaker_failures: NonZeroU32,
    /// How long an open breaker refuses calls before a probe goes through.
    #[serde(default = "defaults::breaker_cooldown", with = "humantime_serde_ms")]
    pub breaker_cooldown: Duration,
}

/// Deserializing the `NonZero` limits with an error that names the field
/// (serde's own says only "expected a nonzero u32").
mod non_zero_field {
    use std::num::{NonZeroU32, NonZeroU64};

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};

    use super::LimitError;

    fn non_zero<'de, D: Deserializer<'de>>(deserializer: D, field: &'static str) -> Result<NonZeroU32, D::Error> {
        let value = u32::deserialize(deserializer)?;
        NonZeroU32::new(value).ok_or_else(|| D::Error::custom(LimitError::Zero { field }))
    }

    pub(super) fn max_concurrency<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "max_concurrency")
    }

    pub(super) fn abi_calls_per_second<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "abi_calls_per_second")
    }

    pub(super) fn publish_per_second<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "publish_per_second")
    }

    pub(super) fn log_bytes_per_second<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "log_bytes_per_second")
    }

    pub(super) fn breaker_failures<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "breaker_failures")
    }

    /// An optional count that, when given, is not zero (omitting it is
    /// how to say "no limit").
    fn optional<'de, D: Deserializer<'de>>(
        deserializer: D,
        field: &'static str,
    ) -> Result<Option<NonZeroU32>, D::Error> {
        match Option::<u32>::deserialize(deserializer)? {
            None => Ok(None),
            Some(value) => {
                NonZeroU32::new(value).map(Some).ok_or_else(|| D::Error::custom(LimitError::ZeroNotOmitted { field }))
            }
        }
    }

    pub(super) fn cpu_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<NonZeroU32>, D::Error> {
        optional(deserializer, "cpu_millis")
    }

    pub(super) fn max_requests_per_instance<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<NonZeroU32>, D::Error> {
        optional(deserializer, "max_requests_per_instance")
    }

    pub(super) fn instance_concurrency<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<NonZeroU32>, D::Error> {
        optional(deserializer, "instance_concurrency")
    }

    pub(super) fn fuel_per_request<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<NonZeroU64>, D::Error> {
        match Option::<u64>::deserialize(deserializer)? {
            None => Ok(None),
            Some(fuel) => NonZeroU64::new(fuel)
                .map(Some)
                .ok_or_else(|| D::Error::custom(LimitError::ZeroNotOmitted { field: "fuel_per_request" })),
        }
    }
}

mod defaults {
    use std::num::NonZeroU32;
    use std::time::Duration;

    pub(super) fn invoke_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn call_retries() -> u32 {
        2
    }
    pub(super) fn breaker_failures() -> NonZeroU32 {
        NonZeroU32::new(5).expect("invariant: not zero")
    }
    pub(super) fn breaker_cooldown() -> Duration {
        Duration::from_secs(5)
    }

    pub(super) fn max_request_bytes() -> u64 {
        10 << 20
    }
    pub(super) fn kv_max_key_bytes() -> usize {
        1024
    }
    pub(super) fn kv_max_value_bytes() -> usize {
        1 << 20
    }
    pub(super) fn message_max_bytes() -> usize {
        256 << 10
    }
    pub(super) fn abi_calls_per_second() -> NonZeroU32 {
        NonZeroU32::new(100_000).expect("invariant: not zero")
    }
    pub(super) fn publish_per_second() -> NonZeroU32 {
        NonZeroU32::new(1_000).expect("invariant: not zero")
    }
    pub(super) fn log_bytes_per_second() -> NonZeroU32 {
        NonZeroU32::new(256 << 10).expect("invariant: not zero")
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_request: None,
            timeout: Duration::from_secs(10),
            memory_bytes: 64 << 20,
            max_concurrency: NonZeroU32::new(100).expect("invariant: not zero"),
            queue_timeout: Duration::from_millis(1000),
            idle_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(5),
            destroy_timeout: Duration::from_secs(2),
            max_request_bytes: defaults::max_request_bytes(),
            kv_max_key_bytes: defaults::kv_max_key_bytes(),
            kv_max_value_bytes: defaults::kv_max_value_bytes(),
            message_max_bytes: defaults::message_max_bytes(),
            abi_calls_per_second: defaults::abi_calls_per_second(),
            publish_per_second: defaults::publish_per_second(),
            log_bytes_per_second: defaults::log_bytes_per_second(),
            cpu_millis: None,
            max_requests_per_instance: None,
            instance_concurrency: None,
            invoke_timeout: defaults::invoke_timeout(),
            call_retries: defaults::call_retries(),
            breaker_failures: defaults::breaker_failures(),
            breaker_cooldown: defaults::breaker_cooldown(),
        }
    }
}

impl Limits {
    /// Check what the types alone cannot: durations and sizes above zero,
    /// memory within what the engine reserves per slot.
    pub fn check(&self) -> Result<(), LimitError> {
        let durations = [
            ("timeout_ms", self.timeout),
            ("idle_timeout_s", self.idle_timeout),
            ("start_timeout_ms", self.start_timeout),
            ("destroy_timeout_ms", self.destroy_timeout),
            ("invoke_timeout_ms", self.invoke_timeout),
            ("breaker_cooldown_ms", self.breaker_cooldown),
        ];
        if let Some(&(field, _)) = durations.iter().find(|(_, value)| value.is_zero()) {
            return Err(LimitError::Zero { field });
        }
        // Every time a function (or a pod, through its annotations) sets is
        // bounded: a `start` or a queue that may wait for ever holds what it
        // holds for ever.
        let bounded = [
            ("timeout_ms", self.timeout, MAX_TIMEOUT),
            ("queue_timeout_ms", self.queue_timeout, MAX_HOOK_OR_QUEUE_TIMEOUT),
            ("start_timeout_ms", self.start_timeout, MAX_HOOK_OR_QUEUE_TIMEOUT),
            ("destroy_timeout_ms", self.destroy_timeout, MAX_HOOK_OR_QUEUE_TIMEOUT),
            ("idle_timeout_s", self.idle_timeout, MAX_IDLE_TIMEOUT),
            ("invoke_timeout_ms", self.invoke_timeout, MAX_TIMEOUT),
            ("breaker_cooldown_ms", self.breaker_cooldown, MAX_HOOK_OR_QUEUE_TIMEOUT),
        ];
        if let Some(&(field, value, max)) = bounded.iter().find(|(_, value, max)| value > max) {
            return Err(LimitError::OverMaximum {
                field,
                value: humantime::format_duration(value).to_string(),
                maximum: humantime::format_duration(max).to_string(),
            });
        }
        if self.memory_bytes == 0 {
            return Err(LimitError::Zero { field: "memory_mb" });
        }
        if self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(LimitError::memory_over_maximum(self.memory_bytes >> 20));
        }
        if let Some(count) = self.instance_concurrency.filter(|count| count.get() > MAX_INSTANCE_CONCURRENCY) {
            return Err(LimitError::OverMaximum {
                field: "instance_concurrency",
                value: count.to_string(),
                maximum: MAX_INSTANCE_CONCURRENCY.to_string(),
            });
        }
        if self.call_retries > MAX_CALL_RETRIES {
            return Err(LimitError::OverMaximum {
                field: "call_retries",
                value: self.call_retries.to_string(),
                maximum: MAX_CALL_RETRIES.to_string(),
            });
        }
        if self.max_request_bytes == 0 {
            return Err(LimitError::Zero { field: "max_request_bytes" });
        }
        let sizes = [
            ("kv_max_key_bytes", self.kv_max_key_bytes),
            ("kv_max_value_bytes", self.kv_max_value_bytes),
            ("message_max_bytes", self.message_max_bytes),
        ];
        if let Some(&(field, _)) = sizes.iter().find(|(_, value)| *value == 0) {
            return Err(LimitError::Zero { field });
        }
        Ok(())
    }
}

/// Largest linear memory a function may ask for; the engine's pool reserves
/// address space for this much per memory slot.
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// Longest `timeout_ms` (a request's wall time): 15 minutes, as Lambda's.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Longest `start_timeout_ms`, `destroy_timeout_ms` and `queue_timeout_ms`.
pub const MAX_HOOK_OR_QUEUE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Most `call_retries`: a call is tried at most 11 times.
pub const MAX_CALL_RETRIES: u32 = 10;
/// Most `instance_concurrency`: requests sharing one instance share its
/// memory, its CPU share and its fate (see the pool's module docs).
pub const MAX_INSTANCE_CONCURRENCY: u32 = 1024;
/// Default `instance_concurrency` of a WASI 0.3 HTTP function, as
/// `wasmtime serve`'s.
pub const DEFAULT_INSTANCE_CONCURRENCY: u32 = 16;
/// Longest `idle_timeout_s`: a day.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Durations are kept in the registry file as whole milliseconds.
mod humantime_serde_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_millis() as u64)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}
