//! The admin API: deploy, undeploy, list, invoke and usage, over a Unix
//! socket (HTTP/1.1 + JSON), and the client the `shoal` CLI uses.
//!
//! | method | path | does |
//! |---|---|---|
//! | `GET` | `/v1/functions` | list functions ([`FunctionInfo`]) |
//! | `POST` | `/v1/functions` | deploy ([`DeployRequest`] → [`DeployReport`]s) |
//! | `DELETE` | `/v1/functions/{name}` | undeploy |
//! | `POST` | `/v1/functions/{name}/invoke?path=/p` | call the function with the request body |
//! | `GET` | `/v1/usage?function=f&tenant=t&by=function\|tenant&since_unix_ms=t` | usage totals ([`UsageSummary`]) |
//!
//! Errors are `{"error": "..."}` with the status of [`Error::status`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::Error;
use crate::host::Host;
use crate::manifest::FunctionSpec;
use crate::metering::{UsageGrouping, UsageQuery, UsageSummary};
use crate::registry::{DeployItem, DeployReport, FunctionInfo};
use crate::request::{ShoalBody, full_body};

/// Largest admin request body (a deploy carries wasm, base64-encoded).
pub const MAX_ADMIN_BODY: usize = 256 << 20;

/// A deploy: specs and their wasm.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeployRequest {
    /// The versions to deploy.
    pub functions: Vec<DeployFunction>,
}

/// One version in a [`DeployRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub struct DeployFunction {
    /// The validated spec.
    pub spec: FunctionSpec,
    /// The wasm, base64.
    pub wasm_base64: String,
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

/// Serve the admin API on `listener` until `shutdown` turns true.
pub async fn serve(listener: UnixListener, host: Arc<Host>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // Only this host's own user administers it (the socket is
                // created for that user alone; the peer is checked too).
                let me = nix::unistd::geteuid().as_raw();
                match stream.peer_cred() {
                    Ok(peer) if peer.uid() == me => {}
                    Ok(peer) => {
                        tracing::warn!(uid = peer.uid(), "refused an admin connection of another user");
                        continue;
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "refused an admin connection: cannot tell who it is");
                        continue;
                    }
                }
                let host = host.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let host = host.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&host, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = shutdown.changed() => break,
        }
    }
}

async fn handle(host: &Host, request: Request<Incoming>) -> Response<ShoalBody> {
    match route(host, request).await {
        Ok(response) => response,
        Err(error) => json_response(error.status(), &ErrorBody { error: error.to_string() }),
    }
}

async fn route(host: &Host, request: Request<Incoming>) -> Result<Response<ShoalBody>, Error> {
    let path = request.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method().clone(), segments.as_slice()) {
        (Method::GET, ["v1", "functions"]) => Ok(json_response(StatusCode::OK, &host.registry().list().await)),
        (Method::POST, ["v1", "functions"]) => {
            let body = read_body(request).await?;
            let deploy: DeployRequest =
                serde_json::from_slice(&body).map_err(|err| Error::BadRequest(format!("deploy body: {err}")))?;
            let mut items = Vec::with_capacity(deploy.functions.len());
            for function in deploy.functions {
                let wasm = base64::engine::general_purpose::STANDARD.decode(function.wasm_base64.as_bytes()).map_err(
                    |err| Error::BadRequest(format!("function {:?}: wasm_base64: {err}", function.spec.name.as_str())),
                )?;
                items.push(DeployItem { spec: function.spec, wasm: wasm.into() });
            }
            let reports = host.registry().deploy(items).await?;
            for report in &reports {
                tracing::info!(function = %report.function, version = %report.version, source = %report.source, "deployed");
            }
            Ok(json_response(StatusCode::OK, &reports))
        }
        (Method::DELETE, ["v1", "functions", name]) => {
            let info = host.registry().undeploy(name).await?;
            tracing::info!(function = %name, "undeployed");
            Ok(json_response(StatusCode::OK, &info))
        }
        (Method::POST, ["v1", "functions", name, "invoke"]) => {
            let target =
                host.registry().by_name(name).ok_or_else(|| Error::UnknownFunction { name: name.to_string() })?;
            let inner_path = query_param(request.uri().query(), "path").unwrap_or_else(|| "/".to_string());
            let request_id = crate::trigger::http::request_id(&request);
            let (parts, body) = request.into_parts();
            let mut forwarded = Request::builder().method(Method::POST).uri(format!(
                "http://localhost{}",
                if inner_path.starts_with('/') { inner_path } else { format!("/{inner_path}") }
            ));
            for (name, value) in &parts.headers {
                if name != http::header::HOST
                    && name != http::header::CONTENT_LENGTH
                    && name != http::header::TRANSFER_ENCODING
                {
                    forwarded = forwarded.header(name, value);
                }
            }
            let forwarded = forwarded.body(body).map_err(|err| Error::BadRequest(format!("invoke path: {err}")))?;
            Ok(host.dispatcher().dispatch(target.pick().clone(), forwarded, request_id).await)
        }
        (Method::GET, ["v1", "breakers"]) => Ok(json_response(StatusCode::OK, &host.services().breakers.views())),
        (Method::GET, ["v1", "usage"]) => {
            let query = request.uri().query();
            let since = match query_param(query, "since_unix_ms") {
                Some(text) => {
                    Some(text.parse::<u64>().map_err(|_| Error::BadRequest(format!("since_unix_ms {text:?}")))?)
                }
                None => None,
            };
            let by = match query_param(query, "by").as_deref() {
                None | Some("function") => UsageGrouping::Function,
                Some("tenant") => UsageGrouping::Tenant,
                Some(other) => {
                    return Err(Error::BadRequest(format!("by={other:?}: group usage by `function` or `tenant`")));
                }
            };
            let usage = UsageQuery {
                function: query_param(query, "function"),
                tenant: query_param(query, "tenant"),
                since_unix_ms: since,
                by,
            };
            let summaries = match host.ledger() {
                Some(ledger) => ledger.summarize_query(&usage).map_err(Error::io(ledger.dir()))?,
                None => Vec::new(),
            };
            Ok(json_response(StatusCode::OK, &summaries))
        }
        _ => Err(Error::BadRequest(format!("no admin endpoint {} {path}", request.method()))),
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Error> {
    let limited = http_body_util::Limited::new(request.into_body(), MAX_ADMIN_BODY);
    limited
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|err| Error::BadRequest(format!("reading body: {err}")))
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| percent_decode(value))
}

/// Decode `%XX` escapes (and `+` as space), as form-encoded query values use.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i + 1..i + 3) {
            Some(&[hi, lo]) if bytes[i] == b'%' => hex_value(hi).zip(hex_value(lo)).map(|(hi, lo)| hi << 4 | lo),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, byte) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: u8) -> Option<u8> {
    (digit as char).to_digit(16).map(|value| value as u8)
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<ShoalBody> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}").into_bytes());
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

/// Talks to a running host's admin socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A raw answer from the admin API.
#[derive(Debug)]
pub struct ClientResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Client {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client { socket: socket.into() }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Send one request.
    pub async fn send(&self, method: Method, path: &str, body: Vec<u8>) -> anyhow::Result<ClientResponse> {
        let stream = UnixStream::connect(&self.socket).await.map_err(|err| {
            anyhow::anyhow!(
                "cannot reach the Shoal host at {}: {err} (is `shoal serve` running? pass --admin-socket or set SHOAL_ADMIN_SOCKET)",
                self.socket.display()
            )
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "shoal")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(ClientResponse { status: parts.status, headers: parts.headers, body })
    }

    /// Send a request and decode a JSON answer, turning an error answer
    /// into an error carrying the host's message.
    pub async fn call<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<T> {
        let response = self.send(method, path, body).await?;
        if !response.status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&response.body)
                .map_or_else(|_| String::from_utf8_lossy(&response.body).into_owned(), |body| body.error);
            anyhow::bail!("{message}");
        }
        Ok(serde_json::from_slice(&response.body)?)
    }

    /// Deploy versions.
    pub async fn deploy(&self, functions: Vec<(FunctionSpec, Vec<u8>)>) -> anyhow::Result<Vec<DeployReport>> {
        let request = DeployRequest {
            functions: functions
                .into_iter()
                .map(|(spec, wasm)| DeployFunction {
                    spec,
                    wasm_base64: base64::engine::general_purpose::STANDARD.encode(wasm),
                })
                .collect(),
        };
        self.call(Method::POST, "/v1/functions", serde_json::to_vec(&request)?).await
    }

    /// List functions.
    pub async fn list(&self) -> anyhow::Result<Vec<FunctionInfo>> {
        self.call(Method::GET, "/v1/functions", Vec::new()).await
    }

    /// Undeploy a function.
    pub async fn undeploy(&self, name: &str) -> anyhow::Result<FunctionInfo> {
        self.call(Method::DELETE, &format!("/v1/functions/{name}"), Vec::new()).await
    }

    /// Every circuit breaker of the host's functions and backends.
    pub async fn breakers(&self) -> anyhow::Result<Vec<crate::resilience::BreakerView>> {
        self.call(Method::GET, "/v1/breakers", Vec::new()).await
    }

    /// Usage totals.
    pub async fn usage(&self, query: &UsageQuery) -> anyhow::Result<Vec<UsageSummary>> {
        let mut path = "/v1/usage?".to_string();
        if let Some(function) = &query.function {
            path.push_str(&format!("function={}&", percent_encode(function)));
        }
        if let Some(tenant) = &query.tenant {
            path.push_str(&format!("tenant={}&", percent_encode(tenant)));
        }
        if query.by == UsageGrouping::Tenant {
            path.push_str("by=tenant&");
        }
        if let Some(since) = query.since_unix_ms {
            path.push_str(&format!("since_unix_ms={since}"));
        }
        self.call(Method::GET, &path, Vec::new()).await
    }

    /// Invoke a function with `body` at `path`.
    pub async fn invoke(&self, name: &str, path: &str, body: Vec<u8>) -> anyhow::Result<ClientResponse> {
        let encoded = percent_encode(path);
        self.send(Method::POST, &format!("/v1/functions/{name}/invoke?path={encoded}"), body).await
    }
}

/// `text` as a query value: unreserved bytes and `/` as they are, the
/// rest `%XX`.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"/-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(query_param(Some("path=%2Fa%3Fb%3D1&x=y"), "path").as_deref(), Some("/a?b=1"));
        assert_eq!(query_param(Some("a=1"), "path"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%é%4"), "%é%4");
    }
}
