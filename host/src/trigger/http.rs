//! The HTTP trigger: one listener for all functions.
//!
//! A request is routed by host and path prefix to a function (a version is
//! picked by weight), given a request id (the client's `x-request-id` if it
//! sent a sane one, else a new UUID), and dispatched. The host answers
//! `/healthz`, `/readyz` and `/metrics` itself.

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::host::Host;
use crate::request::{REQUEST_ID_HEADER, ShoalBody, text_response};

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
    serve_routed(listener, host, Routing::Table, shutdown).await
}

/// [`serve`] with a choice of routing. Connections live in a `JoinSet`
/// owned by this future, so aborting it (a container killed with
/// SIGKILL) ends every open connection at once.
pub async fn serve_routed(
    listener: TcpListener,
    host: Arc<Host>,
    routing: Routing,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
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
                let _ = stream.set_nodelay(true);
                let host = host.clone();
                let routing = routing.clone();
                let service = hyper::service::service_fn(move |request| {
                    let host = host.clone();
                    let routing = routing.clone();
                    async move {
                        let response = match &routing {
                            Routing::Table => handle(&host, request).await,
                            Routing::Function(name) => handle_function(&host, name, request).await,
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let connection = graceful.watch(connection.into_owned());
                connections.spawn(async move {
                    if let Err(err) = connection.await {
                        tracing::debug!(error = %err, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
}

async fn handle_function(host: &Host, name: &str, request: Request<Incoming>) -> Response<ShoalBody> {
    let Some(target) = host.registry().by_name(name) else {
        return text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("shoal: {name} is not running\n"),
            Some("no_route"),
        );
    };
    let request_id = request_id(&request);
    host.dispatcher().dispatch(target.pick().clone(), request, request_id).await
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
    let request_host =
        request.uri().host().or_else(|| request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()));
    let Some(target) = host.registry().route(request_host, path) else {
        return text_response(StatusCode::NOT_FOUND, format!("shoal: no function serves {path}\n"), Some("no_route"));
    };
    let request_id = request_id(&request);
    host.dispatcher().dispatch(target.pick().clone(), request, request_id).await
}

/// The client's `x-request-id` if it is short printable ASCII, else a new UUID.
pub fn request_id<B>(request: &Request<B>) -> Arc<str> {
    request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(Arc::from)
        .unwrap_or_else(|| Arc::from(uuid::Uuid::new_v4().to_string()))
}
