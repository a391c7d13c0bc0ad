//! Outbound HTTP (`wasi:http/outgoing-handler`): only to the authorities
//! (`host:port`) in the function's `outbound_http` grant, only to
//! addresses that are not the node's own, and — for a pod's function —
//! from inside the pod's network namespace. A store installs
//! [`OutboundHttp`] as its `wasi:http` hooks.
//!
//! The sender is Shoal's own rather than `wasmtime-wasi-http`'s default:
//! that one resolves the name and connects in one step, from the host's
//! network namespace, with no way to see or refuse the address it picked.
//! Here the name is resolved first, every address is checked, and the
//! connection is made by an [`Egress`] — a thread inside the pod's
//! namespace — so the pod's address, NetworkPolicy and the CNI's egress
//! rules apply to a function's traffic as to a container's.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use super::{FunctionCaps, Services, log_denial};
use crate::logs::InstanceLog;
use crate::request::TRACEPARENT_HEADER;
use crate::resilience::is_failure_status;

/// How long a connection may take when the guest sets no timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

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

    fn deny(&self, what: &str) -> HttpError {
        let request_id = self.log.request_id();
        log_denial(&self.caps, &self.services, request_id.as_deref(), "http.outgoing", what);
        HttpError::HttpRequestDenied
    }
}

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                http::Response<WasiBody>,
                Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let tls = request.uri().scheme_str() == Some("https");
        let target = request.uri().authority().map(|authority| {
            let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
            let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
            (format!("{}:{port}", authority.host()), host, port)
        });
        // The receiver is called within this request's trace (unless the
        // guest names a span of its own).
        let mut request = request;
        if !request.headers().contains_key(TRACEPARENT_HEADER)
            && let Some(trace) = self.log.trace()
        {
            request.headers_mut().insert(TRACEPARENT_HEADER, trace.child().header_value());
        }
        let Some((authority, host, port)) = target else {
            return Box::new(std::future::ready(Err(self.deny("outbound HTTP to <no authority>"))));
        };
        if !self.caps.grants.outbound_http.contains(&authority) {
            return Box::new(std::future::ready(Err(self.deny(&format!("outbound HTTP to {authority}")))));
        }
        let egress = self.services.egress(&self.caps.name);
        let connect_timeout = options.and_then(|o| o.connect_timeout).unwrap_or(CONNECT_TIMEOUT);
        let first_byte_timeout = options.and_then(|o| o.first_byte_timeout);
        let (caps, services, log) = (self.caps.clone(), self.services.clone(), self.log.clone());
        Box::new(async move {
            let addrs = resolve(egress.as_ref(), &host, port).await?;
            // A name must not lead to the node itself (or anything only
            // the node should reach); a literal address was granted as
            // such (and, in a pod, allowed by the operator's policy by
            // name), so it stands.
            let literal = host.parse::<IpAddr>().is_ok();
            let node_addresses = node_addresses();
            let usable: Vec<SocketAddr> = addrs
                .iter()
                .copied()
                .filter(|addr| literal || special_kind(addr.ip(), &node_addresses).is_none())
                .collect();
            if usable.is_empty() {
                let kinds: Vec<String> = addrs
                    .iter()
                    .map(|addr| format!("{} ({})", addr.ip(), special_kind(addr.ip(), &node_addresses).unwrap_or("?")))
                    .collect();
                let what = format!("outbound HTTP to {authority}, which resolves only to {}", kinds.join(", "));
                let request_id = log.request_id();
                log_denial(&caps, &services, request_id.as_deref(), "http.outgoing", &what);
                return Err(HttpError::HttpRequestDenied);
            }
            // One address after another (its breaker permitting) until one
            // connects: nothing was sent to the ones that did not, so
            // trying the next is always safe.
            let policy = caps.resilience.outbound_http;
            let trace_id = log.trace().map(|trace| trace.trace_id());
            let deadline = tokio::time::Instant::now() + connect_timeout;
            let mut refused = Vec::new();
            let mut last_error = None;
            for addr in usable {
                let target = if literal { authority.clone() } else { format!("{authority}@{addr}") };
                let breaker = services.breakers.get(&caps.name, &target, &policy.breaker);
                let attempt = match breaker.try_call(trace_id.as_deref()) {
                    Ok(attempt) => attempt,
                    Err(short) => {
                        refused.push(short.to_string());
                        continue;
                    }
                };
                if last_error.is_some() {
                    breaker.count_retry();
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match connect(egress.as_ref(), &[addr], left).await {
                    Ok(stream) => {
                        let sent = send(stream, request, tls.then_some(host), first_byte_timeout).await;
                        match &sent {
                            Ok((response, _)) if is_failure_status(response.status().as_u16()) => attempt.failed(),
                            Ok(_) => attempt.succeeded(),
                            Err(_) => attempt.failed(),
                        }
                        return sent;
                    }
                    Err(err) => {
                        attempt.failed();
                        last_error = Some(err);
                    }
                }
            }
            match last_error {
                Some(err) => Err(err),
                None => {
                    let request_id = log.request_id();
                    tracing::warn!(
                        function = &*caps.name,
                        request_id = request_id.as_deref().unwrap_or("-"),
                        "outbound HTTP to {authority} not sent: {}",
                        refused.join("; ")
                    );
                    Err(HttpError::DestinationUnavailable)
                }
            }
        })
    }

    /// A WASI 0.3 body leaves the guest in frames of at most this much
    /// (wasmtime-wasi-http's default is 1 MiB): a response's frames wait
    /// for its client in [`crate::instance::answer_p3`], a few at
    /// a time, so this bounds what a slow client holds on the host.
    fn p3_outgoing_body_chunk_size(&mut self) -> usize {
        P3_BODY_CHUNK
    }
}

/// See [`OutboundHttp::p3_outgoing_body_chunk_size`].
const P3_BODY_CHUNK: usize = 64 << 10;

/// Cloud metadata services that are neither loopback nor link-local:
/// AWS's IPv6 one, Alibaba Cloud's, Azure's wire server.
const METADATA_SERVICES: [IpAddr; 3] = [
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
    IpAddr::V4(std::net::Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V4(std::net::Ipv4Addr::new(168, 63, 129, 16)),
];

/// The IPv4 address an IPv6 one stands for, in every form that reaches an
/// IPv4 host: mapped (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`,
/// deprecated but still routed by some stacks) and NAT64's well-known
/// prefix (`64:ff9b::a.b.c.d`).
fn embedded_ipv4(v6: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = v6.segments();
    let low = std::net::Ipv4Addr::new(
        (segments[6] >> 8) as u8,
        segments[6] as u8,
        (segments[7] >> 8) as u8,
        segments[7] as u8,
    );
    let compatible = segments[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
    let nat64 = segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (compatible || nat64).then_some(low)
}

/// Why an address is off limits unless granted by its literal value:
/// unspecified, loopback, link-local, a cloud metadata service, or one of
/// `node` (the node's own addresses), in any IPv6 form of an IPv4 one.
/// `None` for an ordinary address.
pub fn special_kind(ip: IpAddr, node: &[IpAddr]) -> Option<&'static str> {
    if METADATA_SERVICES.contains(&ip) {
        return Some("a cloud metadata service");
    }
    let ip = match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        _ if METADATA_SERVICES.contains(&ip) => Some("a cloud metadata service"),
        _ if ip.is_unspecified() => Some("unspecified"),
        _ if ip.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        _ if node.contains(&ip) => Some("the node's own"),
        _ => None,
    }
}

/// The addresses of the node's interfaces (the host process's network
/// namespace).
pub fn node_addresses() -> Vec<IpAddr> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    interfaces
        .filter_map(|interface| interface.address)
        .filter_map(|address| {
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Run `work` where the function's connections are made: in its pod's
/// network namespace, or here.
async fn in_egress<T: Send + 'static>(
    egress: Option<&Arc<Egress>>,
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, HttpError> {
    match egress {
        None => Ok(work.await),
        Some(egress) => egress
            .handle()?
            .spawn(work)
            .await
            .map_err(|err| HttpError::Connect(std::io::Error::other(format!("egress thread failed: {err}")))),
    }
}

/// Resolve `host` where `egress` makes its connections (the pod's DNS).
pub(super) async fn resolve(egress: Option<&Arc<Egress>>, host: &str, port: u16) -> Result<Vec<SocketAddr>, HttpError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    if let Some(resolver) = egress.and_then(|egress| egress.resolver()) {
        let name = host.to_string();
        let found = in_egress(egress, async move {
            resolver.lookup_ip(name.as_str()).await.map(|ips| ips.iter().collect::<Vec<IpAddr>>())
        })
        .await?;
        let ips = found.map_err(|err| HttpError::Connect(std::io::Error::other(format!("resolving {host}: {err}"))))?;
        if ips.is_empty() {
            return Err(HttpError::Connect(std::io::Error::other(format!("{host} has no address"))));
        }
        return Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect());
    }
    let name = format!("{host}:{port}");
    let found = in_egress(egress, async move {
        tokio::net::lookup_host(name).await.map(std::iter::Iterator::collect::<Vec<SocketAddr>>)
    })
    .await?;
    let addrs = found.map_err(HttpError::Connect)?;
    if addrs.is_empty() {
        return Err(HttpError::Connect(std::io::Error::other(format!("{host} has no address"))));
    }
    Ok(addrs)
}

async fn connect(
    egress: Option<&Arc<Egress>>,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<tokio::net::TcpStream, HttpError> {
    let addrs = addrs.to_vec();
    let attempt = async move {
        let mut last = None;
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
    };
    match tokio::time::timeout(timeout, in_egress(egress, attempt)).await {
        Ok(connected) => connected?.map_err(HttpError::Connect),
        Err(_) => Err(HttpError::ConnectionTimeout),
    }
}

/// Send `request` over `stream` (TLS to `tls_name` when set) with HTTP/1.1;
/// the response, and the connection's own future for the caller to drive.
async fn send(
    stream: tokio::net::TcpStream,
    mut request: http::Request<WasiBody>,
    tls_name: Option<String>,
    first_byte_timeout: Option<Duration>,
) -> wasmtime_wasi_http::Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>)> {
    use hyper_util::rt::TokioIo;
    type Io = Box<dyn IoStream>;
    let io: Io = match tls_name {
        None => Box::new(stream),
        Some(name) => {
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
            let server_name = match name.parse::<IpAddr>() {
                Ok(ip) => rustls::pki_types::ServerName::from(ip),
                Err(_) => {
                    rustls::pki_types::ServerName::try_from(name).map_err(|_| HttpError::HttpRequestUriInvalid)?
                }
            };
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            Box::new(connector.connect(server_name, stream).await.map_err(HttpError::Tls)?)
        }
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    // The request line carries only the path: the authority is the Host
    // header's business (as to any origin server).
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    *request.uri_mut() = http::Uri::try_from(path).map_err(|_| HttpError::HttpRequestUriInvalid)?;
    let mut connection = Box::pin(connection);
    let response = {
        let sending = sender.send_request(request);
        let sending = async move {
            match first_byte_timeout {
                Some(limit) => {
                    tokio::time::timeout(limit, sending).await.map_err(|_| HttpError::ConnectionReadTimeout)?
                }
                None => sending.await,
            }
            .map_err(HttpError::from)
        };
        tokio::pin!(sending);
        // Drive the connection while waiting for the head of the response.
        // A connection may end (the server closes it) just as the response
        // is handed over: then the response is still there to take.
        tokio::select! {
            biased;
            response = &mut sending => (response?, Some(connection)),
            done = &mut connection => {
                done?;
                (sending.await?, None)
            }
        }
    };
    let (response, connection) = response;
    let response = response.map(|body| body.map_err(HttpError::from).boxed_unsync());
    let connection = async move {
        match connection {
            Some(connection) => connection.await.map_err(HttpError::from),
            None => Ok(()),
        }
    };
    Ok((response, Box::new(connection)))
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> IoStream for T {}

/// Where a pod's function makes its connections: a thread inside the
/// pod's network namespace running a small tokio runtime. A socket belongs
/// for life to the namespace it was created in, so connecting (and
/// resolving) there is enough; the connection is then used from the host's
/// ordinary runtime. Names are resolved with the pod's own `resolv.conf`
/// (its cluster DNS and search domains), never the node's `/etc/hosts`.
///
/// The thread starts, and the resolver is built, when the function first
/// connects or resolves, not with the pod: most pods never call out, and
/// a node of them then runs no thread per pod (in a probe program of 40
/// egresses, release build, a thread cost ≈ 40 KiB and a resolver ≈ 46
/// KiB; W7's per-pod figure did not move outside its noise). The thread
/// ends when the `Egress` is dropped.
pub struct Egress {
    /// The pod's network namespace.
    netns: OwnedFd,
    /// Names the thread (`egress-<name>`).
    name: String,
    /// The pod's DNS, from its `resolv.conf` (none: the system's resolver,
    /// from inside the namespace).
    dns: Option<(hickory_resolver::config::ResolverConfig, hickory_resolver::config::ResolverOpts)>,
    resolver: std::sync::OnceLock<hickory_resolver::TokioResolver>,
    /// The search domains of the pod's `resolv.conf`, without the final
    /// dot (Kubernetes writes `<namespace>.svc.<cluster domain>` first).
    search: Vec<String>,
    /// The thread's runtime and what stops it, once started; or why it
    /// could not start (kept: every later call fails the same way).
    thread: std::sync::OnceLock<Result<EgressThread, String>>,
}

/// A running egress thread: its runtime, and the sender whose drop ends it.
struct EgressThread {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Egress {
    /// The egress of the namespace `netns` (an open `/proc/…/ns/net` or
    /// `/var/run/netns/…`); `name` names its thread. `resolv_conf` is the
    /// pod's `/etc/resolv.conf` (without one, names are resolved by the
    /// system's resolver, from inside the namespace); a `resolv.conf`
    /// that does not parse is refused here.
    pub fn in_netns(netns: &OwnedFd, name: &str, resolv_conf: Option<&[u8]>) -> std::io::Result<Arc<Egress>> {
        let mut search = Vec::new();
        let dns = match resolv_conf {
            None => None,
            Some(text) => {
                let (config, mut options) = hickory_resolver::system_conf::parse_resolv_conf(text)
                    .map_err(|err| std::io::Error::other(format!("the pod's resolv.conf: {err}")))?;
                search = config.search().iter().map(|name| name.to_ascii().trim_end_matches('.').to_string()).collect();
                options.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
                Some((config, options))
            }
        };
        Ok(Arc::new(Egress {
            netns: netns.try_clone()?,
            name: name.to_string(),
            dns,
            resolver: std::sync::OnceLock::new(),
            search,
            thread: std::sync::OnceLock::new(),
        }))
    }

    /// The runtime of the egress thread, started now if it is not yet.
    fn handle(&self) -> Result<&tokio::runtime::Handle, HttpError> {
        let thread = self.thread.get_or_init(|| self.start().map_err(|err| format!("{err}")));
        match thread {
            Ok(thread) => Ok(&thread.handle),
            Err(why) => Err(HttpError::Connect(std::io::Error::other(format!(
                "the egress thread of {} cannot run in its pod's network namespace: {why}",
                self.name
            )))),
        }
    }

    /// Start the thread: it enters the namespace, then runs its runtime
    /// until the `Egress` is dropped.
    fn start(&self) -> std::io::Result<EgressThread> {
        let netns = self.netns.try_clone()?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new().name(format!("egress-{}", self.name)).spawn(move || {
            let started = nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
                .and_then(|()| tokio::runtime::Builder::new_current_thread().enable_all().build());
            match started {
                Ok(runtime) => {
                    let _ = ready_tx.send(Ok(runtime.handle().clone()));
                    // Parked here, the runtime drives its connections'
                    // I/O until the egress is dropped.
                    let _ = runtime.block_on(stop_rx);
                }
                Err(err) => {
                    let _ = ready_tx.send(Err(err));
                }
            }
        })?;
        let handle = ready_rx.recv().map_err(|_| std::io::Error::other("the egress thread ended at start"))??;
        Ok(EgressThread { handle, _stop: stop_tx })
    }

    /// The resolver of the pod's DNS, built now if it is not yet; `None`
    /// when the pod has no `resolv.conf`.
    fn resolver(&self) -> Option<hickory_resolver::TokioResolver> {
        let (config, options) = self.dns.as_ref()?;
        let resolver = self.resolver.get_or_init(|| {
            let provider = hickory_resolver::name_server::TokioConnectionProvider::default();
            hickory_resolver::Resolver::builder_with_config(config.clone(), provider)
                .with_options(options.clone())
                .build()
        });
        Some(resolver.clone())
    }

    /// The domain of namespace `namespace`'s Services, as the pod's
    /// `resolv.conf` names it (`<namespace>.svc.<cluster domain>`); `None`
    /// when the pod's DNS is not Kubernetes' (no such search domain).
    pub fn service_domain(&self, namespace: &str) -> Option<&str> {
        let prefix = format!("{namespace}.svc.");
        self.search.iter().map(String::as_str).find(|domain| domain.starts_with(&prefix) && domain.len() > prefix.len())
    }
}

/// The port of the first SRV record of `name` (e.g. `_http._tcp.api.a.svc
/// .cluster.local.`, the named port of a Service), asked of the pod's
/// DNS; `None` when there is none or the pod has no resolver of its own.
pub(super) async fn srv_port(egress: &Arc<Egress>, name: &str) -> Option<u16> {
    let resolver = egress.resolver()?;
    let name = name.to_string();
    let found = in_egress(Some(egress), async move {
        resolver
            .srv_lookup(name.as_str())
            .await
            .ok()
            .and_then(|srv| srv.iter().next().map(hickory_resolver::proto::rr::rdata::SRV::port))
    })
    .await;
    found.ok().flatten()
}

/// Send a whole `request` to `addr` over a new HTTP/1.1 connection made
/// from `egress`, and read the answer's head and up to `max_body` bytes
/// of its body. For `invoke` across nodes, whose bodies are bounded and
/// whole on both sides.
pub(super) async fn exchange(
    egress: Option<&Arc<Egress>>,
    addr: SocketAddr,
    request: http::Request<http_body_util::Full<bytes::Bytes>>,
    connect_timeout: Duration,
    max_body: usize,
) -> Result<(http::response::Parts, Vec<u8>), ExchangeError> {
    use hyper_util::rt::TokioIo;
    let stream = connect(egress, &[addr], connect_timeout).await.map_err(ExchangeError::Connect)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(ExchangeError::Exchange)?;
    let connection = tokio::spawn(connection);
    let response = sender.send_request(request).await.map_err(ExchangeError::Exchange)?;
    let (parts, mut body) = response.into_parts();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ExchangeError::Exchange)?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > max_body {
                connection.abort();
                return Err(ExchangeError::TooLarge);
            }
            bytes.extend_from_slice(&data);
        }
    }
    drop(sender);
    connection.abort();
    Ok((parts, bytes))
}

/// Why [`exchange`] got no whole answer.
#[derive(Debug, thiserror::Error)]
pub(super) enum ExchangeError {
    /// No connection was made: nothing was sent.
    #[error("connecting: {0}")]
    Connect(#[source] HttpError),
    /// The connection failed while the request or answer was under way.
    #[error("{0}")]
    Exchange(#[source] hyper::Error),
    /// The answer's body is over the limit.
    #[error("the response body is too large")]
    TooLarge,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_addresses_are_named() {
        let node: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap()];
        let kind = |text: &str| special_kind(text.parse().unwrap(), &node);
        assert_eq!(kind("127.0.0.1"), Some("loopback"));
        assert_eq!(kind("::1"), Some("loopback"));
        assert_eq!(kind("::ffff:127.0.0.1"), Some("loopback"));
        assert_eq!(kind("169.254.169.254"), Some("link-local"));
        assert_eq!(kind("fe80::1"), Some("link-local"));
        assert_eq!(kind("0.0.0.0"), Some("unspecified"));
        assert_eq!(kind("10.1.2.3"), Some("the node's own"));
        assert_eq!(kind("10.1.2.4"), None);
        assert_eq!(kind("93.184.216.34"), None);
        // Metadata services off the link-local range, and IPv4 in IPv6.
        for metadata in ["fd00:ec2::254", "100.100.100.200", "168.63.129.16", "::ffff:168.63.129.16"] {
            assert_eq!(kind(metadata), Some("a cloud metadata service"), "{metadata}");
        }
        for (hidden, what) in [
            ("::127.0.0.1", "loopback"),
            ("::169.254.169.254", "link-local"),
            ("64:ff9b::127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b::10.1.2.3", "the node's own"),
        ] {
            assert_eq!(kind(hidden), Some(what), "{hidden}");
        }
        assert_eq!(kind("64:ff9b::5db8:d822"), None, "NAT64 of an ordinary address");
        assert_eq!(kind("2001:db8::1"), None);
    }
}
