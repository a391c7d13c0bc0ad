//! `shoal:runtime/invoke`: call another deployed function.
//!
//! The ABI checks the call (grant, nesting depth, body size) and names the
//! nested request; running it is the [`Invoker`]'s job, which the host
//! implements with the same dispatcher as an HTTP request — the callee's
//! own pool, limits and grants — so the callee is metered as its own
//! request, whose id is the caller's id plus `/n` and whose record names
//! the caller as parent. Nesting is bounded by [`MAX_INVOKE_DEPTH`], so a
//! cycle of invokes ends with a `limited` error instead of a hang.
//!
//! A function deployed on this host is called in-process. Otherwise —
//! or while the local one's circuit breaker is open — the call goes to
//! the pods of the Kubernetes Service of that name in the caller's own
//! namespace (`<name>.<namespace>.svc.<cluster domain>`, resolved with the
//! pod's DNS from the pod's network namespace), over HTTP to their
//! listener on the Service's port named `http` (its SRV record) or
//! [`INVOKE_PORT`], carrying the request id, trace, parent and
//! depth. A host outside Kubernetes asks its peers instead (`shoal serve
//! --peer`: the function by name, with the token the peers share). Each
//! endpoint has a circuit breaker; a call safe to repeat
//! (see [`is_idempotent`]) is retried on another endpoint within the
//! caller's retry budget; every failure reaches the guest as an error
//! value naming the target.

use std::net::SocketAddr;

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt as _;

use wasmtime::component::Accessor;

use super::bindings::shoal::runtime::{invoke, types};
use super::concurrent_bindings::shoal::runtime::invoke_async;
use super::outbound::{Egress, ExchangeError};
use super::{Abi, AbiCtxView, AbiState, Caller, MAX_INVOKE_DEPTH, Peers, ShoalError};
use crate::error::error_chain;
use crate::manifest::TenantName;
use crate::request::{
    INVOKE_DEPTH_HEADER, INVOKE_FUNCTION_HEADER, INVOKE_TENANT_HEADER, PARENT_ID_HEADER, PEER_TOKEN_HEADER,
    REQUEST_ID_HEADER, RequestMeta, ShoalBody, TRACEPARENT_HEADER,
};
use crate::resilience::{Policy, is_failure_status, is_idempotent};

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

    /// Whether a function of that name runs here for `tenant`.
    fn serves(&self, tenant: &TenantName, function: &str) -> bool;
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

impl invoke::Host for AbiCtxView<'_> {
    async fn call(&mut self, function: String, request: types::Request) -> Result<types::Response, ShoalError> {
        let (call, caller) = Call::checked(self.state, function, request)?;
        call.run(&caller).await.map_err(Failure::into_error)
    }
}

impl invoke_async::Host for AbiCtxView<'_> {}

impl<T: Send> invoke_async::HostWithStore<T> for Abi {
    /// The call is checked and its caller taken while the store is the
    /// calling request's; the call then runs outside the store, so the
    /// instance's other requests go on meanwhile.
    async fn call(
        accessor: &Accessor<T, Self>,
        function: String,
        request: types::Request,
    ) -> Result<types::Response, ShoalError> {
        let (call, caller) = accessor.with(|mut access| Call::checked(access.get().state, function, request))?;
        call.run(&caller).await.map_err(Failure::into_error)
    }
}

impl Failure {
    fn into_error(self) -> ShoalError {
        match self {
            Failure::Refused(refusal) => refusal.into(),
            Failure::Error(err) => err.into(),
        }
    }
}

/// Where a call to a function can go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// A version deployed on this host (in-process).
    Local,
    /// A pod of the function's Service on another node.
    Remote(SocketAddr),
    /// A peer host (`shoal serve --peer`), asked for the function by name.
    Peer(SocketAddr),
}

/// Why an attempt did not answer.
enum AttemptError {
    /// No connection was made: nothing was sent, so another endpoint may
    /// be tried whether or not the call is safe to repeat.
    NotSent(String),
    /// The call may have reached the callee.
    Failed(String),
    /// The answer is over `message_max_bytes`.
    TooLarge,
}

/// How a call ended without a response.
enum Failure {
    Refused(super::Refusal),
    Error(types::Error),
}

/// One guest `invoke.call`, tried on the function's endpoints under the
/// caller's invoke policy: local first; else (or once the local one is
/// failing) the pods of the Service of that name in the caller's
/// namespace, each behind its own circuit breaker.
struct Call {
    function: String,
    method: http::Method,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
    invoker: std::sync::Arc<dyn Invoker>,
    policy: Policy,
    limit: usize,
}

impl Call {
    /// A call of `function` with `request`, checked against the caller's
    /// grants, depth and sizes, and the caller as the call needs it.
    fn checked(state: &AbiState, function: String, request: types::Request) -> Result<(Call, Caller), ShoalError> {
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
        let method = http::Method::from_bytes(request.method.as_bytes())
            .map_err(|err| types::Error::Denied(format!("invalid request: method {:?}: {err}", request.method)))?;
        let mut headers = http::HeaderMap::new();
        for (name, value) in &request.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|err| types::Error::Denied(format!("invalid request: header name {name:?}: {err}")))?;
            let value = http::HeaderValue::from_bytes(value)
                .map_err(|err| types::Error::Denied(format!("invalid request: header {name}: {err}")))?;
            headers.append(name, value);
        }
        let call = Call {
            function,
            method,
            path,
            headers,
            body: Bytes::from(request.body),
            invoker,
            policy: state.caps.resilience.invoke,
            limit,
        };
        Ok((call, state.caller()))
    }

    async fn run(self, state: &Caller) -> Result<types::Response, Failure> {
        let caps = state.caps.clone();
        let breakers = state.services.breakers.clone();
        let budget = breakers.budget(&caps.name);
        budget.deposit();
        let idempotent = is_idempotent(&self.method, &self.headers);
        let trace_id = state.trace.trace_id();
        let local = self.invoker.serves(&caps.tenant, &self.function);
        let egress = state.services.egress(&caps.name);
        // The pods of the Service: resolved once, when first needed.
        let mut remote: Option<Result<Vec<Endpoint>, NoEndpoint>> = None;
        let mut tried: Vec<Endpoint> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let mut retries = 0;
        let breaker_of =
            |endpoint: Endpoint| breakers.get(&caps.name, &target_name(&self.function, endpoint), &self.policy.breaker);
        let local_breaker = local.then(|| breaker_of(Endpoint::Local));
        let failed = |errors: &[String]| {
            Failure::Error(types::Error::Backend(format!("invoking {:?}: {}", self.function, errors.join("; "))))
        };
        loop {
            let mut candidates = Vec::new();
            if local {
                candidates.push(Endpoint::Local);
            }
            let local_usable = local_breaker.as_ref().is_some_and(|breaker| breaker.admits());
            if !local_usable || tried.contains(&Endpoint::Local) {
                if remote.is_none() {
                    let peers = state.services.peers().cloned();
                    remote = Some(self.discover(egress.as_ref(), peers.as_ref(), caps.tenant.as_str()).await);
                }
                if let Some(Ok(endpoints)) = &remote {
                    candidates.extend(endpoints.iter().copied());
                }
            }
            if candidates.is_empty() {
                return Err(Failure::Error(match remote {
                    Some(Err(why)) => types::Error::NotFound(format!(
                        "no function named {:?} is deployed in this namespace here, and {}",
                        self.function,
                        error_chain(&why)
                    )),
                    _ => types::Error::NotFound(InvokeError::NotFound(self.function.clone()).to_string()),
                }));
            }
            // Untried endpoints first (in their order: local, then the
            // Service's pods as DNS gave them), skipping open breakers.
            candidates.sort_by_key(|endpoint| tried.contains(endpoint));
            let mut attempt = None;
            let mut refusals = Vec::new();
            for endpoint in candidates {
                let breaker = match (endpoint, &local_breaker) {
                    (Endpoint::Local, Some(breaker)) => breaker.clone(),
                    _ => breaker_of(endpoint),
                };
                match breaker.try_call(Some(trace_id.as_str())) {
                    Ok(admitted) => {
                        attempt = Some((endpoint, admitted));
                        break;
                    }
                    Err(refused) => refusals.push(refused.to_string()),
                }
            }
            let Some((endpoint, admitted)) = attempt else {
                errors.extend(refusals);
                return Err(failed(&errors));
            };
            tried.push(endpoint);
            let breaker = admitted.breaker().clone();
            let count = state.invokes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let parent = state.request_id.clone().unwrap_or_else(|| "-".into());
            let meta = RequestMeta {
                id: format!("{parent}/{count}").into(),
                parent_id: Some(parent),
                depth: state.depth + 1,
                // The callee is a span of the caller's trace.
                trace: state.trace.child(),
            };
            let result = match endpoint {
                Endpoint::Local => self.local(&caps.tenant, meta).await,
                Endpoint::Remote(addr) => self.remote(egress.as_ref(), addr, None, meta).await,
                Endpoint::Peer(addr) => {
                    let peers = state.services.peers().cloned();
                    let peer = peers.as_ref().map(|peers| (peers, caps.tenant.as_str()));
                    self.remote(None, addr, peer, meta).await
                }
            };
            let (retryable, why) = match result {
                Ok(response) if !is_failure_status(response.status) => {
                    admitted.succeeded();
                    return Ok(response);
                }
                Ok(response) => {
                    admitted.failed();
                    if !(idempotent && retries < self.policy.retries && budget.try_withdraw()) {
                        return Ok(response);
                    }
                    let why = format!("{} answered {}", target_name(&self.function, endpoint), response.status);
                    (true, why)
                }
                Err(AttemptError::TooLarge) => {
                    admitted.succeeded();
                    let what =
                        format!("response body of {:?}: too large (message_max_bytes = {})", self.function, self.limit);
                    return Err(Failure::Refused(state.limited("invoke.call", what)));
                }
                Err(AttemptError::NotSent(why)) => {
                    admitted.failed();
                    (retries < self.policy.retries && budget.try_withdraw(), why)
                }
                Err(AttemptError::Failed(why)) => {
                    admitted.failed();
                    (idempotent && retries < self.policy.retries && budget.try_withdraw(), why)
                }
            };
            errors.push(why);
            if !retryable {
                return Err(failed(&errors));
            }
            retries += 1;
            breaker.count_retry();
            tokio::time::sleep(self.policy.backoff_before(retries)).await;
        }
    }

    /// The request as the callee gets it.
    fn request(&self, meta: Option<&RequestMeta>, authority: &str) -> http::Request<Bytes> {
        let mut request = http::Request::new(self.body.clone());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = http::Uri::try_from(format!("http://{authority}{}", self.path))
            .unwrap_or_else(|_| http::Uri::from_static("http://localhost/"));
        *request.headers_mut() = self.headers.clone();
        if let Some(meta) = meta {
            // Who the call is, set by the host: the guest's own values of
            // these headers would let a cycle across nodes start again at
            // depth 0.
            let headers = request.headers_mut();
            for (name, value) in [
                (REQUEST_ID_HEADER, meta.id.to_string()),
                (TRACEPARENT_HEADER, meta.trace.header()),
                (INVOKE_DEPTH_HEADER, meta.depth.to_string()),
                (PARENT_ID_HEADER, meta.parent_id.as_deref().unwrap_or("-").to_string()),
            ] {
                if let Ok(value) = http::HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            }
            if let Ok(host) = http::HeaderValue::from_str(authority) {
                headers.insert(http::header::HOST, host);
            }
        }
        request
    }

    async fn local(&self, tenant: &TenantName, meta: RequestMeta) -> Result<types::Response, AttemptError> {
        // The callee's own timeout bounds it (its limits are its own).
        let response = self
            .invoker
            .invoke(tenant, &self.function, self.request(None, "localhost"), meta)
            .await
            .map_err(|err| AttemptError::NotSent(err.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = collect_limited(body, self.limit).await.map_err(|err| match err {
            Collect::TooLarge => AttemptError::TooLarge,
            Collect::Failed(why) => AttemptError::Failed(why),
        })?;
        Ok(types::Response { status: parts.status.as_u16(), headers: header_pairs(&parts.headers), body })
    }

    async fn remote(
        &self,
        egress: Option<&std::sync::Arc<Egress>>,
        addr: SocketAddr,
        peer: Option<(&Peers, &str)>,
        meta: RequestMeta,
    ) -> Result<types::Response, AttemptError> {
        let authority = format!("{}:{}", self.function, addr.port());
        let mut request = self.request(Some(&meta), &authority);
        if let Some((peers, tenant)) = peer {
            // A peer serves a call by name only with the shared token.
            for (name, value) in [
                (INVOKE_FUNCTION_HEADER, self.function.as_str()),
                (INVOKE_TENANT_HEADER, tenant),
                (PEER_TOKEN_HEADER, &peers.token),
            ] {
                if let Ok(value) = http::HeaderValue::from_str(value) {
                    request.headers_mut().insert(name, value);
                }
            }
        }
        let request = request.map(http_body_util::Full::new);
        let target = target_name(&self.function, Endpoint::Remote(addr));
        let exchange = super::outbound::exchange(egress, addr, request, self.policy.timeout, self.limit);
        match tokio::time::timeout(self.policy.timeout, exchange).await {
            Err(_) => Err(AttemptError::Failed(format!(
                "{target} did not answer within {}",
                humantime::format_duration(self.policy.timeout)
            ))),
            Ok(Err(ExchangeError::TooLarge)) => Err(AttemptError::TooLarge),
            Ok(Err(err @ ExchangeError::Connect(_))) => {
                Err(AttemptError::NotSent(format!("{target}: {}", error_chain(&err))))
            }
            Ok(Err(err)) => Err(AttemptError::Failed(format!("{target}: {}", error_chain(&err)))),
            Ok(Ok((parts, body))) => {
                Ok(types::Response { status: parts.status.as_u16(), headers: header_pairs(&parts.headers), body })
            }
        }
    }

    /// The addresses of the pods of the Service named like the function,
    /// in the caller's namespace, from the pod's DNS (never another
    /// namespace's: the name is asked for fully qualified).
    async fn discover(
        &self,
        egress: Option<&std::sync::Arc<Egress>>,
        peers: Option<&Peers>,
        namespace: &str,
    ) -> Result<Vec<Endpoint>, NoEndpoint> {
        let Some(egress) = egress else {
            return match peers {
                Some(peers) => peer_endpoints(peers).await,
                None => Err(NoEndpoint::NoPeers),
            };
        };
        let Some(domain) = egress.service_domain(namespace) else {
            return Err(NoEndpoint::NoServiceDomain(namespace.to_string()));
        };
        if !is_dns_label(&self.function) {
            return Err(NoEndpoint::NotALabel(self.function.clone()));
        }
        let name = format!("{}.{domain}.", self.function);
        // The Service's port named `http` (its SRV record), else the
        // listener's default.
        let port = super::outbound::srv_port(egress, &format!("_http._tcp.{name}")).await.unwrap_or(INVOKE_PORT);
        let addrs = super::outbound::resolve(Some(egress), &name, port)
            .await
            .map_err(|source| NoEndpoint::Unresolved { name: name.clone(), source })?;
        // As for outbound HTTP: a name never leads to the node itself,
        // loopback, link-local or a metadata service (an ExternalName
        // Service could say anything).
        let node = super::outbound::node_addresses();
        let (usable, special): (Vec<SocketAddr>, Vec<SocketAddr>) =
            addrs.into_iter().partition(|addr| super::outbound::special_kind(addr.ip(), &node).is_none());
        if usable.is_empty() {
            let kinds: Vec<String> = special
                .iter()
                .map(|addr| {
                    format!("{} ({})", addr.ip(), super::outbound::special_kind(addr.ip(), &node).unwrap_or("?"))
                })
                .collect();
            return Err(NoEndpoint::OnlySpecial { name, kinds: kinds.join(", ") });
        }
        Ok(usable.into_iter().map(Endpoint::Remote).collect())
    }
}

/// The addresses of the host's peers, each an endpoint (a name may stand
/// for several).
async fn peer_endpoints(peers: &Peers) -> Result<Vec<Endpoint>, NoEndpoint> {
    let mut endpoints = Vec::new();
    let mut failures = Vec::new();
    for peer in &peers.addrs {
        match tokio::net::lookup_host(peer.as_str()).await {
            Ok(addrs) => endpoints.extend(addrs.map(Endpoint::Peer)),
            Err(err) => failures.push(format!("{peer}: {err}")),
        }
    }
    if endpoints.is_empty() {
        return Err(NoEndpoint::PeersUnresolved(failures.join("; ")));
    }
    Ok(endpoints)
}

/// Why no other node was asked for a function.
#[derive(Debug, thiserror::Error)]
enum NoEndpoint {
    #[error("this host runs outside a pod and has no peers (shoal serve --peer), so no other host is asked")]
    NoPeers,
    #[error("no peer host could be resolved ({0})")]
    PeersUnresolved(String),
    #[error("the pod's resolv.conf names no Service domain of namespace {0:?}")]
    NoServiceDomain(String),
    #[error("{0:?} cannot name a Service")]
    NotALabel(String),
    #[error("the Service {name} has no endpoint")]
    Unresolved {
        name: String,
        #[source]
        source: wasmtime_wasi_http::Error,
    },
    #[error("the Service {name} resolves only to {kinds}")]
    OnlySpecial { name: String, kinds: String },
}

/// The port of a function's listener in its pod (`SHOAL_HTTP_PORT`'s
/// default), used when the Service names no port `http` (no SRV record).
pub const INVOKE_PORT: u16 = 8080;

/// How a target is named in breakers, metrics and errors.
fn target_name(function: &str, endpoint: Endpoint) -> String {
    match endpoint {
        Endpoint::Local => format!("{function}@local"),
        Endpoint::Remote(addr) | Endpoint::Peer(addr) => format!("{function}@{addr}"),
    }
}

/// An RFC 1123 label: what a Kubernetes Service may be called.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn header_pairs(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers.iter().map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec())).collect()
}

enum Collect {
    TooLarge,
    Failed(String),
}

/// Read a response body whole, refusing more than `limit` bytes.
async fn collect_limited(mut body: ShoalBody, limit: usize) -> Result<Vec<u8>, Collect> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|err| Collect::Failed(err.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(Collect::TooLarge);
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}
