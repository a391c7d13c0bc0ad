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

/// Who a request is: its id, and for a nested call, its parent and depth.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// The request id (`x-request-id`; nested calls: `<parent>/<n>`).
    pub id: Arc<str>,
    /// The calling request, for nested calls.
    pub parent_id: Option<Arc<str>>,
    /// 0 for a request from a trigger; one more per nested call.
    pub depth: u32,
}

impl RequestMeta {
    /// A request that came from a trigger (no parent).
    pub fn root(id: Arc<str>) -> RequestMeta {
        RequestMeta { id, parent_id: None, depth: 0 }
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
