//! `shoal:runtime/invoke`: call another deployed function.
//!
//! The ABI checks the call (grant, nesting depth, body size) and names the
//! nested request; running it is the [`Invoker`]'s job, which the host
//! implements with the same dispatcher as an HTTP request — the callee's
//! own pool, limits and grants — so the callee is metered as its own
//! request, whose id is the caller's id plus `/n` and whose record names
//! the caller as parent. Nesting is bounded by [`MAX_INVOKE_DEPTH`], so a
//! cycle of invokes ends with a `limited` error instead of a hang.

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt as _;

use super::bindings::shoal::runtime::{invoke, types};
use super::{AbiView, MAX_INVOKE_DEPTH, ShoalError};
use crate::manifest::TenantName;
use crate::request::{RequestMeta, ShoalBody};

/// Runs the function a guest invokes. The ABI owns this interface; the
/// host implements it and hands it to [`super::Services::set_invoker`].
#[async_trait::async_trait]
pub trait Invoker: Send + Sync {
    /// Called once a guest's `invoke.call` has passed its checks: serve
    /// `request` with a version of `function` — the function that tenant
    /// `tenant` knows by that name, never another tenant's — as the nested
    /// request `meta`
    /// and return the response, whole or streaming (a failure of the
    /// callee is an error *response*, as an HTTP client would see it).
    /// `Err` only when there is no such function or no host to run it.
    async fn invoke(
        &self,
        tenant: &TenantName,
        function: &str,
        request: http::Request<Bytes>,
        meta: RequestMeta,
    ) -> Result<Response<ShoalBody>, InvokeError>;
}

/// Why an invoke could not reach its function.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// No function of that name is deployed in the caller's tenant.
    #[error("no function named {0:?} is deployed in this namespace")]
    NotFound(String),
    /// The host cannot run calls (it is shutting down).
    #[error("{0}")]
    Unavailable(String),
}

impl invoke::Host for AbiView<'_> {
    async fn call(&mut self, function: String, request: types::Request) -> Result<types::Response, ShoalError> {
        let state = &mut *self.state;
        state.admit("invoke.call")?;
        if !state.caps.grants.invoke.contains(&function) {
            return Err(state.deny("invoke.call", format!("invoking function {function:?}")).into());
        }
        if state.depth + 1 > MAX_INVOKE_DEPTH {
            let what = format!("nesting past the invoke depth limit of {MAX_INVOKE_DEPTH}");
            return Err(state.limited("invoke.call", what).into());
        }
        let limit = state.caps.limits.message_max_bytes;
        state.check_size("invoke.call", "request body", request.body.len(), "message_max_bytes", limit)?;
        let Some(invoker) = state.services.invoker().cloned() else {
            return Err(types::Error::Backend("this host cannot invoke functions".to_string()).into());
        };

        let path = if request.path.starts_with('/') { request.path } else { format!("/{}", request.path) };
        let mut builder =
            http::Request::builder().method(request.method.as_str()).uri(format!("http://localhost{path}"));
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_slice());
        }
        let http_request = builder
            .body(Bytes::from(request.body))
            .map_err(|err| types::Error::Denied(format!("invalid request: {err}")))?;

        state.invokes += 1;
        let parent = state.request_id().unwrap_or_else(|| "-".into());
        let meta = RequestMeta {
            id: format!("{parent}/{}", state.invokes).into(),
            parent_id: Some(parent),
            depth: state.depth + 1,
            // The callee is a span of the caller's trace.
            trace: state.trace().child(),
        };
        let response =
            invoker.invoke(&state.caps.tenant, &function, http_request, meta).await.map_err(|err| match err {
                InvokeError::NotFound(_) => types::Error::NotFound(err.to_string()),
                InvokeError::Unavailable(_) => types::Error::Backend(err.to_string()),
            })?;
        let (parts, body) = response.into_parts();
        let body = match collect_limited(body, limit).await {
            Ok(body) => body,
            Err(err) => {
                let what = format!("response body of {function:?}: {err} (message_max_bytes = {limit})");
                return Err(self.state.limited("invoke.call", what).into());
            }
        };
        let headers =
            parts.headers.iter().map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec())).collect();
        Ok(types::Response { status: parts.status.as_u16(), headers, body })
    }
}

/// Read a response body whole, refusing more than `limit` bytes.
async fn collect_limited(mut body: ShoalBody, limit: usize) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| err.to_string())?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err("too large".to_string());
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}
