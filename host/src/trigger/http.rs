//! The HTTP trigger: one listener for all functions.
//!
//! A request is routed by host and path prefix to a function (a version is
//! picked by weight), given a request id (the client's `x-request-id` if it
//! sent a sane one, else a new UUID), and dispatched. The host answers
//! `/healthz`, `/readyz` and `/metrics` itself.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::abi::MAX_INVOKE_DEPTH;
use crate::host::Host;
use crate::manifest::TenantName;
use crate::registry::Target;
use crate::request::{
    INVOKE_DEPTH_HEADER, INVOKE_FUNCTION_HEADER, INVOKE_TENANT_HEADER, PARENT_ID_HEADER, PEER_TOKEN_HEADER,
    REQUEST_ID_HEADER, RequestMeta, ShoalBody, text_response,
};

/// Which functions a listener serves.
#[derive(Debug, Clone)]
pub enum Routing {
    /// Every deployed function, by host and path (`shoal serve`).
    Table,
    /// One function gets every request (a container's own port).
    Function(Arc<str>),
}

/// Accept connections until `shutdown` turns true, then let open
/// connections finish their requests.
pub async fn serve(listener: TcpListener, host: Arc<Host>, shutdown: watch::Receiver<bool>) {
    serve_routed(listener, host, Routing::Table, shutdown).await;
}

/// [`serve`] with a choice of routing. Connections live in a `JoinSet`
/// owned by this future, so aborting it (a container killed with
/// SIGKILL) ends every open connection at once.
///
/// Every connection is held to the host's [`FrontDoor`](crate::host::FrontDoor): one over
/// `max_connections` is closed at once; a client that does not send a whole
/// request head within `header_read_timeout` (on a new connection or an
/// idle keep-alive one) is disconnected; heads over `max_header_bytes` or
/// `max_headers` get 431.
pub async fn serve_routed(
    listener: TcpListener,
    host: Arc<Host>,
    routing: Routing,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let front = host.front_door().clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // `half_close`: while a request is served, hyper does not read ahead
    // to learn whether the client closed its side. Every such read first
    // gave hyper's read buffer room for another request, and the buffer
    // was still shared with the head being served, so each request cost a
    // fresh 8 KiB buffer (and glibc a consolidation of its free lists);
    // ≈2% of W1's CPU at c=16 and ≈4% of the WASI 0.3 hello's. A client
    // that goes away is seen when its answer is written, and its call was
    // never cancelled by it anyway (it runs to its end and usage record,
    // in a task of its own once its client's connection is gone).
    builder
        .http1()
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(front.header_read_timeout)
        .max_buf_size(front.max_header_bytes.max(MIN_HEADER_BUFFER))
        .max_headers(front.max_headers);
    builder.http2().max_header_list_size(u32::try_from(front.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let Some(slot) = host.connection_slot() else {
                    // Accept and close: the client learns at once, and the
                    // host holds no descriptor for it.
                    host.metrics().connection_closed("max_connections");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                host.registry().engine().watch_arrivals(&stream);
                // Set once the connection's first request reaches us.
                let first_request = Arc::new(tokio::sync::Notify::new());
                let service = {
                    let (host, routing, first_request) = (host.clone(), routing.clone(), first_request.clone());
                    hyper::service::service_fn(move |request| {
                        let host = host.clone();
                        let routing = routing.clone();
                        first_request.notify_one();
                        async move {
                            let response = match &routing {
                                Routing::Table => handle(&host, request).await,
                                Routing::Function(name) => handle_function(&host, name, request).await,
                            };
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    })
                };
                let (host, builder, mut stopping) = (host.clone(), builder.clone(), shutdown.clone());
                let timeout = front.header_read_timeout;
                connections.spawn(async move {
                    let _slot = slot;
                    let metrics = host.metrics();
                    metrics.connection_open(1);
                    // The protocol is told by the first bytes; a client that
                    // sends none (or half of HTTP/2's preface) is bounded
                    // here, before hyper's own header timeout applies.
                    if wait_for_request_start(&stream, timeout).await {
                        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        tokio::pin!(connection);
                        let ended = tokio::select! {
                            ended = connection.as_mut() => ended,
                            _ = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                                // The host stops: this connection ends after
                                // the request under way. One whose first
                                // request has arrived but is not read yet
                                // gets it served: closing it unread would
                                // reset it.
                                tokio::select! {
                                    ended = connection.as_mut() => ended,
                                    _ = first_request.notified() => {
                                        connection.as_mut().graceful_shutdown();
                                        connection.await
                                    }
                                }
                            }
                        };
                        if let Err(err) = ended {
                            let timed_out = err.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout);
                            if timed_out {
                                metrics.connection_closed("header_timeout");
                            }
                            tracing::debug!(error = %err, "connection ended with an error");
                        }
                    } else {
                        metrics.connection_closed("header_timeout");
                    }
                    metrics.connection_open(-1);
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// hyper's smallest read buffer.
const MIN_HEADER_BUFFER: usize = 8192;

/// HTTP/2's connection preface (prior knowledge, h2c).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Wait (up to `timeout`) until the client has sent enough to tell its
/// protocol: a first byte that is not HTTP/2's preface, or the whole
/// preface. `false`: it did not, or it closed.
async fn wait_for_request_start(stream: &tokio::net::TcpStream, timeout: std::time::Duration) -> bool {
    let probe = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let Ok(read) = stream.peek(&mut buf).await else { return false };
            if read == 0 {
                return false;
            }
            if read == buf.len() || buf[..read] != H2_PREFACE[..read] {
                return true;
            }
            // A prefix of the preface: more is on its way (or never comes).
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(timeout, probe).await.unwrap_or(false)
}

async fn handle_function(host: &Host, name: &str, request: Request<Incoming>) -> Response<ShoalBody> {
    let Some(target) = host.registry().by_name(name) else {
        return text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("shoal: {name} is not running\n"),
            Some("no_route"),
        );
    };
    serve_request(host, &target, request).await
}

/// Serve `request` with a version of `target`, as [`request_meta`] says.
///
/// Not an `async fn`: one would keep its own copy of `request` beside the
/// dispatch's (a few hundred bytes more in every request's future, which
/// hyper moves whole).
fn serve_request<'a>(
    host: &'a Host,
    target: &Target,
    request: Request<Incoming>,
) -> impl Future<Output = Response<ShoalBody>> + Send + 'a {
    let meta = request_meta(&request);
    host.dispatcher().dispatch_with(target.pick().clone(), request, meta)
}

async fn handle(host: &Host, request: Request<Incoming>) -> Response<ShoalBody> {
    let path = request.uri().path();
    match path {
        "/healthz" => return text_response(StatusCode::OK, "ok\n".into(), None),
        "/readyz" => {
            return if host.is_ready() {
                text_response(StatusCode::OK, "ready\n".into(), None)
            } else {
                text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into(), None)
            };
        }
        "/metrics" => {
            let mut response = text_response(StatusCode::OK, host.metrics().render(), None);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            return response;
        }
        _ => {}
    }
    if request.headers().contains_key(INVOKE_FUNCTION_HEADER) {
        // Boxed: a peer's call is rare, and its future, inline, would make
        // every request's larger.
        return Box::pin(handle_peer_invoke(host, request)).await;
    }
    let request_host =
        request.uri().host().or_else(|| request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()));
    let Some(target) = host.registry().route(request_host, path) else {
        if !host.is_ready() {
            // The listener is up before the functions it is started with
            // are deployed (and while it drains): a 404 would tell a
            // client that nothing will serve the path.
            let mut response = text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("shoal: no function serves {path} now: the host is not ready (starting, or stopping)\n"),
                Some("not_ready"),
            );
            response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            return response;
        }
        return text_response(StatusCode::NOT_FOUND, format!("shoal: no function serves {path}\n"), Some("no_route"));
    };
    serve_request(host, &target, request).await
}

/// A call a peer host's function made with `invoke` (`shoal serve
/// --peer`): served by function name within the tenant it names, only
/// with the token the peers share — without it, no caller reaches a
/// function by name, past the routes.
async fn handle_peer_invoke(host: &Host, request: Request<Incoming>) -> Response<ShoalBody> {
    let header = |name: &str| request.headers().get(name);
    let token_ok = match (host.services().peers(), header(PEER_TOKEN_HEADER)) {
        (Some(peers), Some(offered)) => peers.accepts(offered.as_bytes()),
        _ => false,
    };
    if !token_ok {
        return text_response(
            StatusCode::FORBIDDEN,
            "shoal: a call by function name needs this host's peer token\n".into(),
            Some("peer_token"),
        );
    }
    let name = header(INVOKE_FUNCTION_HEADER).and_then(|value| value.to_str().ok()).unwrap_or("");
    let tenant = header(INVOKE_TENANT_HEADER).and_then(|value| value.to_str().ok()).unwrap_or(TenantName::DEFAULT);
    let target = TenantName::new(tenant).ok().and_then(|tenant| host.registry().by_service(&tenant, name));
    let Some(target) = target else {
        return text_response(
            StatusCode::NOT_FOUND,
            format!("shoal: no function named {name:?} is deployed in namespace {tenant:?} here\n"),
            Some("no_route"),
        );
    };
    serve_request(host, &target, request).await
}

/// Who a request is: its id ([`request_id`]), its trace (the caller's
/// `traceparent`, or a new trace) and, for a call another host's
/// function made with `invoke`, its parent and depth. The depth is the
/// caller's word, which can only bring its own call nearer to the limit.
pub fn request_meta<B>(request: &Request<B>) -> RequestMeta {
    let header = |name: &str| request.headers().get(name).and_then(|value| value.to_str().ok());
    let mut meta = RequestMeta::root_of(request.headers(), request_id(request));
    if let Some(depth) = header(INVOKE_DEPTH_HEADER).and_then(|depth| depth.parse::<u32>().ok()) {
        meta.depth = depth.min(MAX_INVOKE_DEPTH);
        meta.parent_id = header(PARENT_ID_HEADER).filter(|id| is_sane_id(id)).map(Arc::from);
    }
    meta
}

/// Short printable ASCII: what a request id may be.
fn is_sane_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// The client's `x-request-id` if it is short printable ASCII, else a new UUID.
pub fn request_id<B>(request: &Request<B>) -> Arc<str> {
    request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| is_sane_id(id))
        .map_or_else(new_request_id, Arc::from)
}

/// A random (version 4) UUID from the thread's userspace generator:
/// `Uuid::new_v4` asks the kernel (`getrandom(2)`) for every id, which
/// showed as ≈1.2% of a W1 profile. Written into a buffer on the stack,
/// so the id's one allocation is its `Arc`.
fn new_request_id() -> Arc<str> {
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    Arc::from(&*uuid.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_without_an_id_gets_a_fresh_version_4_uuid_and_a_valid_one_keeps_its_own() {
        let bare = || Request::builder().body(()).expect("request");
        let (first, second) = (request_id(&bare()), request_id(&bare()));
        assert_ne!(first, second);
        for id in [&first, &second] {
            let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version(), Some(uuid::Version::Random), "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
        let given = Request::builder().header(REQUEST_ID_HEADER, "order-42").body(()).expect("request");
        assert_eq!(&*request_id(&given), "order-42");
        let unprintable = Request::builder().header(REQUEST_ID_HEADER, "a b").body(()).expect("request");
        assert_ne!(&*request_id(&unprintable), "a b");
    }
}
