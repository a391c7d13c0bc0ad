//! `shoal:runtime/invoke`: call another deployed function.
//!
//! The callee runs through the same dispatcher as an HTTP request — its own
//! pool, limits and grants — and is metered as its own request, whose id is
//! the caller's id plus `/n` and whose record names the caller as parent.
//! Nesting is bounded by [`MAX_INVOKE_DEPTH`], so a cycle of invokes ends
//! with a `limited` error instead of a hang.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};

use super::MAX_INVOKE_DEPTH;
use super::bindings::shoal::runtime::{invoke, types};
use super::misc::shoal_error;
use crate::dispatch::{RequestMeta, ShoalBody};
use crate::instance::GuestState;

impl invoke::Host for GuestState {
    async fn call(
        &mut self,
        function: String,
        request: types::Request,
    ) -> wasmtime::Result<Result<types::Response, types::Error>> {
        if let Err(refused) = self.admit("invoke.call") {
            return Ok(Err(shoal_error(refused)));
        }
        if !self.abi.caps.grants.invoke.contains(&function) {
            return Ok(Err(shoal_error(self.deny("invoke.call", format!("invoking function {function:?}")))));
        }
        if self.abi.depth + 1 > MAX_INVOKE_DEPTH {
            let what = format!("nesting past the invoke depth limit of {MAX_INVOKE_DEPTH}");
            return Ok(Err(shoal_error(self.limited("invoke.call", what))));
        }
        let limit = self.abi.caps.limits.message_max_bytes;
        if let Err(refused) =
            self.check_size("invoke.call", "request body", request.body.len(), "message_max_bytes", limit)
        {
            return Ok(Err(shoal_error(refused)));
        }
        let Some(host) = self.abi.services.host() else {
            return Ok(Err(types::Error::Backend("the host is shutting down".to_string())));
        };
        let Some(target) = host.registry().by_name(&function) else {
            return Ok(Err(types::Error::NotFound(format!("no function named {function:?} is deployed"))));
        };

        let path = if request.path.starts_with('/') { request.path } else { format!("/{}", request.path) };
        let mut builder =
            http::Request::builder().method(request.method.as_str()).uri(format!("http://localhost{path}"));
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_slice());
        }
        let body = Full::new(Bytes::from(request.body))
            .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} });
        let http_request = match builder.body(body) {
            Ok(http_request) => http_request,
            Err(err) => return Ok(Err(types::Error::Denied(format!("invalid request: {err}")))),
        };

        self.abi.invokes += 1;
        let parent = self.log.request_id().unwrap_or_else(|| "-".into());
        let meta = RequestMeta {
            id: format!("{parent}/{}", self.abi.invokes).into(),
            parent_id: Some(parent),
            depth: self.abi.depth + 1,
        };
        let response = host.dispatcher().dispatch_with(target.pick().clone(), http_request, meta).await;
        let (parts, body) = response.into_parts();
        let body = match collect_limited(body, limit).await {
            Ok(body) => body,
            Err(err) => {
                let what = format!("response body of {function:?}: {err} (message_max_bytes = {limit})");
                return Ok(Err(shoal_error(self.limited("invoke.call", what))));
            }
        };
        let headers =
            parts.headers.iter().map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec())).collect();
        Ok(Ok(types::Response { status: parts.status.as_u16(), headers, body }))
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
