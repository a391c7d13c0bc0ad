//! How a request (or message, or hook) ended: the one classification
//! that usage records, metrics, error responses and the CLI share.
//! [`crate::limits::classify`] names the outcome of a failed guest call.

use serde::{Deserialize, Serialize};

/// How a request ended, as recorded in usage records and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The guest produced a response.
    Ok,
    /// The request ran past `timeout_ms`.
    Timeout,
    /// The request burned its `fuel_per_request`.
    FuelExhausted,
    /// The guest tried to grow its memory past `memory_mb`.
    MemoryLimit,
    /// The guest trapped (panic, `unreachable`, out-of-bounds access...).
    Trap,
    /// A new instance's `start` hook failed, trapped or timed out.
    StartFailed,
    /// The handler returned without setting a response.
    NoResponse,
    /// No concurrency slot (or instance slot) freed up in time.
    Overloaded,
    /// The host failed (a bug, or a resource it could not get).
    HostError,
    /// A subscriber's handler returned an error for a message (it will be
    /// delivered again).
    Declined,
    /// The request body was over the function's `max_request_bytes`.
    RequestTooLarge,
    /// The usage ledger cannot be written (a full disk, say): the request
    /// was refused, since its record could not be kept.
    LedgerUnavailable,
}

impl Outcome {
    /// A short, stable name (also the `kind` label in metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Timeout => "timeout",
            Outcome::FuelExhausted => "fuel_exhausted",
            Outcome::MemoryLimit => "memory_limit",
            Outcome::Trap => "trap",
            Outcome::StartFailed => "start_failed",
            Outcome::NoResponse => "no_response",
            Outcome::Overloaded => "overloaded",
            Outcome::HostError => "host_error",
            Outcome::Declined => "declined",
            Outcome::RequestTooLarge => "request_too_large",
            Outcome::LedgerUnavailable => "ledger_unavailable",
        }
    }

    /// The HTTP status a client gets for this outcome (when the guest
    /// produced no response of its own).
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Outcome::Ok => StatusCode::OK,
            Outcome::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Outcome::FuelExhausted
            | Outcome::MemoryLimit
            | Outcome::Overloaded
            | Outcome::StartFailed
            | Outcome::LedgerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::Trap | Outcome::NoResponse | Outcome::HostError | Outcome::Declined => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Outcome::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
