//! Outbound HTTP (`wasi:http/outgoing-handler`): only to the authorities
//! (`host:port`) in the function's `outbound_http` grant. A store installs
//! [`OutboundHttp`] as its `wasi:http` hooks.

use std::future::Future;
use std::sync::Arc;

use wasmtime_wasi_http::WasiHttpHooks;

use super::{FunctionCaps, Services, log_denial};
use crate::logs::InstanceLog;

/// The `wasi:http` hooks of one instance: checks each outgoing request
/// against the grant before sending it.
pub struct OutboundHttp {
    caps: Arc<FunctionCaps>,
    services: Arc<Services>,
    log: Arc<InstanceLog>,
}

impl OutboundHttp {
    /// The hooks of an instance of the function `caps` describes.
    pub fn new(caps: Arc<FunctionCaps>, services: Arc<Services>, log: Arc<InstanceLog>) -> OutboundHttp {
        OutboundHttp { caps, services, log }
    }
}

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<wasmtime_wasi_http::WasiBody>,
                Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundHttp {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> SendFuture {
        let authority = request.uri().authority().map(|authority| {
            let port =
                authority.port_u16().unwrap_or(if request.uri().scheme_str() == Some("https") { 443 } else { 80 });
            format!("{}:{port}", authority.host())
        });
        let allowed = authority.as_ref().is_some_and(|authority| self.caps.grants.outbound_http.contains(authority));
        if !allowed {
            let target = authority.unwrap_or_else(|| "<no authority>".to_string());
            let request_id = self.log.request_id();
            let what = format!("outbound HTTP to {target}");
            log_denial(&self.caps, &self.services, request_id.as_deref(), "http.outgoing", &what);
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt as _;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(|body| body.boxed_unsync()), Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}
