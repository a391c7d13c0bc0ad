//! What every layer says about a request: its body type, its identity and
//! the headers the host adds. This module imports nothing of the crate, so
//! the ABI, the dispatcher, the triggers and the admin API can all share it
//! without depending on one another.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;

/// Errors inside response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the host sends.
pub type ShoalBody = UnsyncBoxBody<Bytes, BoxError>;

/// The header carrying the request id, generated or propagated.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The header naming the failure kind on error responses made by the host.
pub const ERROR_KIND_HEADER: &str = "x-shoal-error";

/// The header of a nested call sent to another host: how deep it is
/// (the callee's `invoke`s go one deeper, so a cycle across nodes still
/// ends at the depth limit).
pub const INVOKE_DEPTH_HEADER: &str = "x-shoal-invoke-depth";

/// The header of a nested call sent to another host: the calling
/// request's id (the callee's usage record names it as parent).
pub const PARENT_ID_HEADER: &str = "x-shoal-parent-id";

/// The header of a call another host's function made with `invoke` to
/// this host (a peer, `shoal serve --peer`): the function it calls by
/// name, served only with [`PEER_TOKEN_HEADER`].
pub const INVOKE_FUNCTION_HEADER: &str = "x-shoal-invoke-function";

/// With [`INVOKE_FUNCTION_HEADER`]: the tenant whose function it is.
pub const INVOKE_TENANT_HEADER: &str = "x-shoal-invoke-tenant";

/// With [`INVOKE_FUNCTION_HEADER`]: the secret peers share.
pub const PEER_TOKEN_HEADER: &str = "x-shoal-peer-token";

/// The W3C Trace Context header: the trace a request belongs to and the
/// span that sent it.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// Who a request is: its id, its trace, and for a nested call, its parent
/// and depth.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// The request id (`x-request-id`; nested calls: `<parent>/<n>`).
    pub id: Arc<str>,
    /// The calling request, for nested calls.
    pub parent_id: Option<Arc<str>>,
    /// 0 for a request from a trigger; one more per nested call.
    pub depth: u32,
    /// The trace it belongs to, and Shoal's span for serving it.
    pub trace: TraceContext,
}

impl RequestMeta {
    /// A request that came from a trigger (no parent).
    pub fn root(id: Arc<str>, trace: TraceContext) -> RequestMeta {
        RequestMeta { id, parent_id: None, depth: 0, trace }
    }

    /// A request from a trigger, named `id`, in the trace its
    /// `traceparent` header names (Shoal's span a child of the caller's),
    /// or in a new trace without a valid one.
    pub fn root_of(headers: &http::HeaderMap, id: Arc<str>) -> RequestMeta {
        let trace = headers
            .get(TRACEPARENT_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(TraceContext::parse)
            .map_or_else(TraceContext::start, |caller| caller.child());
        RequestMeta::root(id, trace)
    }
}

/// A W3C Trace Context (`traceparent`, version 00): a 16-byte trace id,
/// the 8-byte id of the current span, and the trace flags. Shoal keeps the
/// trace id a client sent (or starts a trace), gives each request it
/// serves a span of its own, and passes the context on to `invoke` and
/// outbound HTTP. Hand-written: the format is one line of hex, and the
/// OpenTelemetry crates would bring an SDK for it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

impl TraceContext {
    /// Read a `traceparent` value; `None` when it is not one (the
    /// specification says to start a new trace then). Versions past 00
    /// are read by their first four fields, as the specification asks.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let mut fields = value.trim().split('-');
        let version = decode::<1>(fields.next()?)?;
        let trace_id = decode::<16>(fields.next()?)?;
        let span_id = decode::<8>(fields.next()?)?;
        let flags = decode::<1>(fields.next()?)?;
        let rest = fields.next();
        let valid_version = match version[0] {
            0x00 => rest.is_none(),
            0xff => false,
            _ => true,
        };
        (valid_version && trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceContext {
            trace_id,
            span_id,
            flags: flags[0],
        })
    }

    /// A new trace (random ids), sampled.
    pub fn start() -> TraceContext {
        TraceContext { trace_id: nonzero_random(), span_id: nonzero_random(), flags: 0x01 }
    }

    /// A span of the same trace, for work this span causes.
    pub fn child(&self) -> TraceContext {
        TraceContext { span_id: nonzero_random(), ..*self }
    }

    /// The trace id, in lowercase hex (32 digits).
    pub fn trace_id(&self) -> HexDigits<32> {
        HexDigits::of(&self.trace_id)
    }

    /// The span id, in lowercase hex (16 digits).
    pub fn span_id(&self) -> HexDigits<16> {
        HexDigits::of(&self.span_id)
    }

    /// The `traceparent` value naming this span.
    pub fn header(&self) -> String {
        String::from(self.traceparent().as_str())
    }

    /// The `traceparent` header naming this span, made without a `String`
    /// in between (the dispatcher sets it on every request).
    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::from_str(self.traceparent().as_str())
            .expect("invariant: a traceparent is hex digits and dashes, all valid in a header")
    }

    /// `00-<trace id>-<span id>-<flags>`, on the stack.
    fn traceparent(&self) -> HexDigits<55> {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        out[3..35].copy_from_slice(&self.trace_id().0);
        out[36..52].copy_from_slice(&self.span_id().0);
        out[53..].copy_from_slice(&HexDigits::<2>::of(&[self.flags]).0);
        HexDigits(out)
    }
}

/// ASCII text of a fixed length held on the stack: lowercase hex digits
/// of an id, or a `traceparent` made of them. Ids are written several
/// times per request (the log context, the `traceparent` header, the usage
/// record), and a `String` for each was a heap allocation each.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HexDigits<const D: usize>([u8; D]);

impl<const D: usize> HexDigits<D> {
    /// The hex digits of `bytes` (`D` is `2 × N`, checked when compiled).
    fn of<const N: usize>(bytes: &[u8; N]) -> HexDigits<D> {
        const { assert!(D == 2 * N, "two hex digits per byte") };
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; D];
        for (i, byte) in bytes.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(byte >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(byte & 0x0f)];
        }
        HexDigits(out)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only `of` and `traceparent` make these, from ASCII alone.
        std::str::from_utf8(&self.0).expect("invariant: hex digits and dashes are ASCII")
    }
}

impl<const D: usize> std::ops::Deref for HexDigits<D> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<const D: usize> std::fmt::Display for HexDigits<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<const D: usize> std::fmt::Debug for HexDigits<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const D: usize> PartialEq<&str> for HexDigits<D> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.traceparent().as_str())
    }
}

/// `N` bytes from exactly `2N` lowercase hex digits (the specification
/// refuses uppercase).
fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Random bytes, never all zero (an all-zero id is invalid).
fn nonzero_random<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

/// A plain-text response; `error_kind` (if any) goes in [`ERROR_KIND_HEADER`].
pub fn text_response(status: StatusCode, text: String, error_kind: Option<&str>) -> Response<ShoalBody> {
    let mut response = Response::new(full_body(text));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if let Some(kind) = error_kind.and_then(|kind| HeaderValue::from_str(kind).ok()) {
        response.headers_mut().insert(ERROR_KIND_HEADER, kind);
    }
    response
}

/// A body holding `bytes`.
pub fn full_body(bytes: impl Into<Bytes>) -> ShoalBody {
    http_body_util::Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_and_written_back_the_same() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trace = TraceContext::parse(value).unwrap();
        assert_eq!(trace.header(), value);
        assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace.span_id(), "00f067aa0ba902b7");
        assert_eq!(trace.header_value(), value);
        assert_eq!(format!("{trace:?}"), value);
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let trace = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        let child = trace.child();
        assert_eq!(child.trace_id(), trace.trace_id());
        assert_ne!(child.span_id(), trace.span_id());
        assert!(child.header().ends_with("-00"), "flags are kept: {}", child.header());
    }

    #[test]
    fn values_that_are_not_a_traceparent_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may add fields; the first four still count.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
    }

    #[test]
    fn a_started_trace_is_valid_and_new_each_time() {
        let (a, b) = (TraceContext::start(), TraceContext::start());
        assert_ne!(a.trace_id(), b.trace_id());
        assert_eq!(TraceContext::parse(&a.header()), Some(a));
    }
}
