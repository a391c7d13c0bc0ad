//! containerd's Sandbox API (`containerd.runtime.sandbox.v1.Sandbox`),
//! served by the node host for every pod of a runtime configured with
//! `sandboxer = "shim"` (containerd 2.x).
//!
//! With it a Shoal pod has no pause container. containerd's CRI makes the
//! pod's network namespace and runs CNI, then calls, on the node host's
//! one socket (containerd runs `containerd-shim-shoal-v1 start` once per
//! pod and is told that socket):
//!
//! - `CreateSandbox` (the CRI's `PodSandboxConfig`, the namespace path)
//!   and `StartSandbox`: the host records the pod and holds its network
//!   namespace; the pod's app containers then come through the task API
//!   on the same socket and find it by the sandbox id their spec names;
//! - `SandboxStatus` and `Platform` (often: kept cheap), `WaitSandbox` (a
//!   call held until the pod stops), `SandboxMetrics` (the pod's
//!   containers' usage, from Shoal's metering);
//! - `StopSandbox` (after the CRI stopped the containers), then
//!   `ShutdownSandbox`: the host lets go of the pod. The host itself never
//!   exits for one pod: it serves the whole node.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message as _, MessageField};
use containerd_shim_protos::sandbox_api::{
    CreateSandboxRequest, CreateSandboxResponse, PingRequest, PingResponse, PlatformRequest, PlatformResponse,
    SandboxMetricsRequest, SandboxMetricsResponse, SandboxStatusRequest, SandboxStatusResponse, ShutdownSandboxRequest,
    ShutdownSandboxResponse, StartSandboxRequest, StartSandboxResponse, StopSandboxRequest, StopSandboxResponse,
    WaitSandboxRequest, WaitSandboxResponse,
};
use containerd_shim_protos::sandbox_async::Sandbox;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::asynchronous::Service;
use k8s_cri::v1::PodSandboxConfig;
use prost::Message as _;
use tokio::sync::watch;

use super::{Reply, SIGKILL, TaskHost, timestamp};
use crate::error::{Code, NodeError};
use crate::handover::{Descriptors, HandoverError, SavedSandbox};
use crate::netns;

/// The `Any` type containerd's CRI wraps the pod's config in.
const POD_SANDBOX_CONFIG: &str = "runtime.v1.PodSandboxConfig";

/// The CRI's names for a pod's two states (`runtime.v1.PodSandboxState`).
const READY: &str = "SANDBOX_READY";
const NOT_READY: &str = "SANDBOX_NOTREADY";

/// Where a pod is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodState {
    /// Created, not started yet.
    Created,
    /// Started: its containers may run.
    Ready,
    /// Stopped (`StopSandbox`), with the status `WaitSandbox` reports.
    Stopped { status: u32, at: SystemTime },
}

/// A pod whose sandbox the node host owns.
pub(super) struct PodSandbox {
    id: String,
    /// What containerd asked for (a hand-over replays it).
    request: CreateSandboxRequest,
    /// The pod's Kubernetes namespace (its tenant), name and uid.
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
    /// Its network namespace, held open while it runs; `None` for a pod on
    /// the node's network (`hostNetwork`), and once it has stopped.
    netns: Mutex<Option<Arc<OwnedFd>>>,
    created_at: SystemTime,
    state: watch::Sender<PodState>,
}

impl PodSandbox {
    fn state(&self) -> PodState {
        *self.state.borrow()
    }

    fn netns(&self) -> Option<Arc<OwnedFd>> {
        self.netns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// The node's pods whose sandboxes it owns, by sandbox id.
#[derive(Default)]
pub(super) struct Sandboxes {
    pods: Mutex<HashMap<String, Arc<PodSandbox>>>,
}

impl Sandboxes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PodSandbox>>> {
        self.pods.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, id: &str) -> Result<Arc<PodSandbox>, NodeError> {
        self.lock().get(id).cloned().ok_or_else(|| NodeError::NotFound(format!("pod sandbox {id} not found")))
    }

    /// Whether `id` is a pod sandbox of this host.
    pub(super) fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// The network namespace of pod `id` for a container joining it:
    /// `None` when there is no such pod, `Some(Ok(None))` for a pod on the
    /// node's network, an error when the pod has stopped.
    pub(super) fn netns(&self, id: &str) -> Option<Result<Option<Arc<OwnedFd>>, NodeError>> {
        let pod = self.lock().get(id)?.clone();
        Some(match pod.state() {
            PodState::Stopped { .. } => {
                Err(NodeError::FailedPrecondition(format!("pod sandbox {id} has stopped: no container can join it")))
            }
            _ => Ok(pod.netns()),
        })
    }

    /// The Kubernetes namespace of pod `id`.
    pub(super) fn namespace(&self, id: &str) -> Option<String> {
        self.lock().get(id)?.namespace.clone()
    }

    /// The `/etc/resolv.conf` of pod `id` (a sandbox controller owns it:
    /// the CRI writes none for a pod it does not run), from the DNS the
    /// kubelet set in its config; `None` without one (the node's applies).
    pub(super) fn resolv_conf(&self, id: &str) -> Option<Vec<u8>> {
        let pod = self.lock().get(id)?.clone();
        let dns = pod_config(&pod.request).ok().flatten()?.dns_config?;
        Some(resolv_conf(&dns))
    }

    /// Describe every pod for the next host, adding their namespaces to `fds`.
    pub(super) fn save(&self, fds: &mut Descriptors) -> Result<Vec<SavedSandbox>, HandoverError> {
        let pods: Vec<Arc<PodSandbox>> = self.lock().values().cloned().collect();
        let mut saved = Vec::with_capacity(pods.len());
        for pod in pods {
            let netns = match pod.netns() {
                Some(netns) => Some(fds.add_copy(&netns, format!("the network namespace of pod {}", pod.id))?),
                None => None,
            };
            let (started, stopped) = match pod.state() {
                PodState::Created => (false, None),
                PodState::Ready => (true, None),
                PodState::Stopped { status, at } => (true, Some((status, at))),
            };
            saved.push(SavedSandbox {
                request: pod
                    .request
                    .write_to_bytes()
                    .map_err(|source| HandoverError::Encode { what: format!("pod {}", pod.id), source })?,
                created_at: pod.created_at,
                started,
                stopped,
                netns,
            });
        }
        Ok(saved)
    }

    /// Take over the pods another host process saved (before their
    /// containers, which find their namespaces here).
    pub(super) fn adopt(&self, saved: Vec<SavedSandbox>, fds: &mut Descriptors) -> Result<(), NodeError> {
        for saved in saved {
            let request =
                CreateSandboxRequest::parse_from_bytes(&saved.request).map_err(|err| NodeError::Encoding {
                    code: Code::INTERNAL,
                    what: "a saved pod's request".to_string(),
                    source: err.into(),
                })?;
            let netns = fds.take_some(saved.netns).map_err(|err| NodeError::Handover(err.into()))?.map(Arc::new);
            let state = match (saved.started, saved.stopped) {
                (_, Some((status, at))) => PodState::Stopped { status, at },
                (true, None) => PodState::Ready,
                (false, None) => PodState::Created,
            };
            let pod = PodSandbox::new(request, netns, saved.created_at, state)?;
            self.lock().insert(pod.id.clone(), Arc::new(pod));
        }
        Ok(())
    }
}

impl PodSandbox {
    /// The pod `request` describes: its config decoded, its namespace
    /// `netns` (already open).
    fn new(
        request: CreateSandboxRequest,
        netns: Option<Arc<OwnedFd>>,
        created_at: SystemTime,
        state: PodState,
    ) -> Result<PodSandbox, NodeError> {
        let config = pod_config(&request)?;
        let metadata = config.as_ref().and_then(|config| config.metadata.as_ref());
        let text = |value: &str| (!value.is_empty()).then(|| value.to_string());
        Ok(PodSandbox {
            id: request.sandbox_id.clone(),
            namespace: metadata.and_then(|m| text(&m.namespace)),
            name: metadata.and_then(|m| text(&m.name)),
            uid: metadata.and_then(|m| text(&m.uid)),
            request,
            netns: Mutex::new(netns),
            created_at,
            state: watch::Sender::new(state),
        })
    }
}

/// The CRI's `PodSandboxConfig` carried in `options`, when it is there.
fn pod_config(request: &CreateSandboxRequest) -> Result<Option<PodSandboxConfig>, NodeError> {
    let Some(options) = request.options.as_ref() else { return Ok(None) };
    // containerd's typeurl writes the bare name; others prefix a host.
    if options.type_url.rsplit('/').next() != Some(POD_SANDBOX_CONFIG) {
        return Ok(None);
    }
    PodSandboxConfig::decode(options.value.as_slice()).map(Some).map_err(|err| NodeError::Encoding {
        code: Code::INVALID_ARGUMENT,
        what: format!("pod sandbox {}: its options are not a CRI PodSandboxConfig", request.sandbox_id),
        source: err.into(),
    })
}

/// A `resolv.conf` saying what the kubelet's DNS config says (the format
/// containerd's own sandbox controller writes for a pause container).
fn resolv_conf(dns: &k8s_cri::v1::DnsConfig) -> Vec<u8> {
    let mut text = String::new();
    if !dns.searches.is_empty() {
        text.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for server in &dns.servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    text.into_bytes()
}

/// The platform containers of a pod run as, in Go's names (what containerd
/// generates their specs for): wasm runs on any, so the node's own.
fn platform_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

impl TaskHost {
    async fn create_sandbox(&self, request: CreateSandboxRequest) -> Result<(), NodeError> {
        let id = request.sandbox_id.clone();
        if id.is_empty() {
            return Err(NodeError::InvalidArgument("CreateSandbox names no sandbox id".to_string()));
        }
        if self.sandboxes.contains(&id) || self.lock().contains_key(&id) {
            return Err(NodeError::AlreadyExists(format!("pod sandbox {id} already exists")));
        }
        // The CRI made the namespace and ran CNI in it; holding it open
        // keeps it ours even if its bind mount goes first.
        let netns = match request.netns_path.as_str() {
            "" => None,
            path => Some(Arc::new(netns::open(std::path::Path::new(path))?)),
        };
        let pod = PodSandbox::new(request, netns, SystemTime::now(), PodState::Created)?;
        let mut pods = self.sandboxes.lock();
        if pods.contains_key(&id) {
            return Err(NodeError::AlreadyExists(format!("pod sandbox {id} already exists")));
        }
        pods.insert(id, Arc::new(pod));
        Ok(())
    }

    fn start_sandbox(&self, id: &str) -> Result<SystemTime, NodeError> {
        let pod = self.sandboxes.get(id)?;
        let mut refused = None;
        pod.state.send_if_modified(|state| match state {
            PodState::Created => {
                *state = PodState::Ready;
                true
            }
            PodState::Ready => false,
            PodState::Stopped { .. } => {
                refused = Some(NodeError::FailedPrecondition(format!("pod sandbox {id} has stopped")));
                false
            }
        });
        match refused {
            Some(err) => Err(err),
            None => Ok(pod.created_at),
        }
    }

    /// Stop pod `id`: whatever of it still runs is killed (the CRI stops
    /// its containers first, each within its grace period), its network
    /// namespace is let go, and `WaitSandbox` returns.
    async fn stop_sandbox(self: &Arc<Self>, id: &str) -> Result<(), NodeError> {
        let pod = self.sandboxes.get(id)?;
        let live: Vec<_> = self
            .lock()
            .values()
            .filter(|container| container.sandbox.as_deref() == Some(id) && container.state().is_live())
            .cloned()
            .collect();
        for container in live {
            tracing::info!(sandbox = %id, container = %container.id, "the pod stops: killing what still runs");
            self.kill(container, SIGKILL).await?;
        }
        pod.state.send_if_modified(|state| {
            if matches!(state, PodState::Stopped { .. }) {
                return false;
            }
            *state = PodState::Stopped { status: 0, at: SystemTime::now() };
            true
        });
        pod.netns.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        Ok(())
    }

    /// The usage of pod `id`: its containers' CPU and memory summed, from
    /// Shoal's metering (the host's threads are in no pod's cgroup).
    fn sandbox_metrics(&self, id: &str) -> Result<SandboxMetricsResponse, NodeError> {
        use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics};
        let pod = self.sandboxes.get(id)?;
        let containers: Vec<_> =
            self.lock().values().filter(|container| container.sandbox.as_deref() == Some(&pod.id)).cloned().collect();
        let (mut cpu, mut memory) = (CPUStat::new(), MemoryStat::new());
        for container in containers {
            let stats = self.stats(&container);
            if let Some(stat) = stats.cpu.as_ref() {
                cpu.usage_usec += stat.usage_usec;
                cpu.user_usec += stat.user_usec;
                cpu.nr_throttled += stat.nr_throttled;
                cpu.throttled_usec += stat.throttled_usec;
            }
            if let Some(stat) = stats.memory.as_ref() {
                memory.usage += stat.usage;
                memory.usage_limit += stat.usage_limit;
                memory.anon += stat.anon;
            }
        }
        let mut metrics = Metrics::new();
        metrics.cpu = MessageField::some(cpu);
        metrics.memory = MessageField::some(memory);
        let mut data = Any::new();
        // containerd resolves the type by its bare name (typeurl).
        data.type_url = "io.containerd.cgroups.v2.Metrics".to_string();
        data.value = metrics.write_to_bytes().map_err(|err| NodeError::Encoding {
            code: Code::INTERNAL,
            what: "cannot encode the pod's metrics".to_string(),
            source: err.into(),
        })?;
        let mut response = SandboxMetricsResponse::new();
        let metric = response.metrics.mut_or_insert_default();
        metric.timestamp = timestamp(SystemTime::now());
        metric.id = id.to_string();
        metric.data = MessageField::some(data);
        Ok(response)
    }

    fn sandbox_status(&self, id: &str, verbose: bool) -> Result<SandboxStatusResponse, NodeError> {
        let pod = self.sandboxes.get(id)?;
        let mut response = SandboxStatusResponse {
            sandbox_id: pod.id.clone(),
            pid: self.pid,
            created_at: timestamp(pod.created_at),
            ..Default::default()
        };
        response.state = match pod.state() {
            PodState::Ready => READY,
            PodState::Created => NOT_READY,
            PodState::Stopped { at, .. } => {
                response.exited_at = timestamp(at);
                NOT_READY
            }
        }
        .to_string();
        if verbose {
            response.info.insert("info".to_string(), self.sandbox_info(&pod).to_string());
        }
        Ok(response)
    }

    /// What `crictl inspectp` shows of a pod. containerd's CRI reads
    /// `info` as its own `SandboxInfo` JSON and keeps only the fields that
    /// has: the pod's config, the host's pid, and a `runtimeSpec` naming
    /// the namespace its containers join, with Shoal's own facts as its
    /// annotations.
    fn sandbox_info(&self, pod: &PodSandbox) -> serde_json::Value {
        let containers: Vec<String> = self
            .lock()
            .values()
            .filter(|container| container.sandbox.as_deref() == Some(&pod.id))
            .map(|container| format!("{}={}", container.id, container.function))
            .collect();
        let netns_path = (!pod.request.netns_path.is_empty()).then_some(pod.request.netns_path.as_str());
        let namespaces: Vec<serde_json::Value> =
            netns_path.map(|path| serde_json::json!({ "type": "network", "path": path })).into_iter().collect();
        let status = match pod.state() {
            PodState::Ready => "running",
            PodState::Created => "created",
            PodState::Stopped { .. } => "stopped",
        };
        serde_json::json!({
            "pid": self.pid,
            "processStatus": status,
            "netNamespaceClosed": pod.netns().is_none() && netns_path.is_some(),
            "runtimeType": "io.containerd.shoal.v1",
            "config": pod_config(&pod.request).ok().flatten(),
            "runtimeSpec": {
                "ociVersion": "1.2.0",
                "linux": { "namespaces": namespaces },
                "annotations": {
                    "dev.shoal.sandboxer": "shim",
                    "dev.shoal.host-pid": self.pid.to_string(),
                    "dev.shoal.namespace": pod.namespace.clone().unwrap_or_default(),
                    "dev.shoal.pod": pod.name.clone().unwrap_or_default(),
                    "dev.shoal.pod-uid": pod.uid.clone().unwrap_or_default(),
                    "dev.shoal.containers": containers.join(","),
                },
            },
        })
    }
}

/// The ttrpc face of a [`TaskHost`]'s pod sandboxes.
pub(crate) struct SandboxService {
    tasks: Arc<TaskHost>,
}

impl SandboxService {
    /// Serve `node`'s sandboxes.
    pub(crate) fn new(tasks: Arc<TaskHost>) -> SandboxService {
        SandboxService { tasks }
    }

    /// The service under the name containerd calls it by.
    pub(crate) fn service(self) -> Vec<(String, Service)> {
        containerd_shim_protos::sandbox_async::create_sandbox(Arc::new(self)).into_iter().collect()
    }
}

fn failed(id: &str, err: NodeError) -> containerd_shim_protos::ttrpc::Error {
    err.for_container(id)
}

#[async_trait]
impl Sandbox for SandboxService {
    async fn create_sandbox(&self, _ctx: &TtrpcContext, request: CreateSandboxRequest) -> Reply<CreateSandboxResponse> {
        let id = request.sandbox_id.clone();
        let began = std::time::Instant::now();
        self.tasks.create_sandbox(request).await.map_err(|err| {
            tracing::warn!(sandbox = %id, error = %err, "create sandbox failed");
            failed(&id, err)
        })?;
        let (namespace, pod) =
            self.tasks.sandboxes.get(&id).map(|pod| (pod.namespace.clone(), pod.name.clone())).unwrap_or_default();
        let took_us = began.elapsed().as_micros() as u64;
        tracing::info!(sandbox = %id, ?namespace, ?pod, took_us, "pod sandbox created");
        Ok(CreateSandboxResponse::new())
    }

    async fn start_sandbox(&self, _ctx: &TtrpcContext, request: StartSandboxRequest) -> Reply<StartSandboxResponse> {
        let began = std::time::Instant::now();
        let created_at =
            self.tasks.start_sandbox(&request.sandbox_id).map_err(|err| failed(&request.sandbox_id, err))?;
        let took_us = began.elapsed().as_micros() as u64;
        tracing::info!(sandbox = %request.sandbox_id, took_us, "pod sandbox started");
        Ok(StartSandboxResponse { pid: self.tasks.pid, created_at: timestamp(created_at), ..Default::default() })
    }

    async fn platform(&self, _ctx: &TtrpcContext, request: PlatformRequest) -> Reply<PlatformResponse> {
        self.tasks.sandboxes.get(&request.sandbox_id).map_err(|err| failed(&request.sandbox_id, err))?;
        let mut response = PlatformResponse::new();
        let platform = response.platform.mut_or_insert_default();
        platform.os = "linux".to_string();
        platform.architecture = platform_architecture().to_string();
        Ok(response)
    }

    async fn stop_sandbox(&self, _ctx: &TtrpcContext, request: StopSandboxRequest) -> Reply<StopSandboxResponse> {
        self.tasks.stop_sandbox(&request.sandbox_id).await.map_err(|err| failed(&request.sandbox_id, err))?;
        tracing::info!(sandbox = %request.sandbox_id, "pod sandbox stopped");
        Ok(StopSandboxResponse::new())
    }

    async fn wait_sandbox(&self, _ctx: &TtrpcContext, request: WaitSandboxRequest) -> Reply<WaitSandboxResponse> {
        let pod = self.tasks.sandboxes.get(&request.sandbox_id).map_err(|err| failed(&request.sandbox_id, err))?;
        let mut state = pod.state.subscribe();
        let stopped = state.wait_for(|state| matches!(state, PodState::Stopped { .. })).await.map(|state| *state);
        match stopped {
            Ok(PodState::Stopped { status, at }) => {
                Ok(WaitSandboxResponse { exit_status: status, exited_at: timestamp(at), ..Default::default() })
            }
            _ => Err(failed(&request.sandbox_id, NodeError::Internal("the pod's state is gone".to_string()))),
        }
    }

    async fn sandbox_status(&self, _ctx: &TtrpcContext, request: SandboxStatusRequest) -> Reply<SandboxStatusResponse> {
        self.tasks.sandbox_status(&request.sandbox_id, request.verbose).map_err(|err| failed(&request.sandbox_id, err))
    }

    async fn ping_sandbox(&self, _ctx: &TtrpcContext, request: PingRequest) -> Reply<PingResponse> {
        self.tasks.sandboxes.get(&request.sandbox_id).map_err(|err| failed(&request.sandbox_id, err))?;
        Ok(PingResponse::new())
    }

    async fn shutdown_sandbox(
        &self,
        _ctx: &TtrpcContext,
        request: ShutdownSandboxRequest,
    ) -> Reply<ShutdownSandboxResponse> {
        let id = &request.sandbox_id;
        if self.tasks.sandboxes.contains(id) {
            self.tasks.stop_sandbox(id).await.map_err(|err| failed(id, err))?;
            self.tasks.sandboxes.lock().remove(id);
            tracing::info!(sandbox = %id, "pod sandbox shut down");
        }
        // Already gone is done: the host serves on for the other pods.
        Ok(ShutdownSandboxResponse::new())
    }

    async fn sandbox_metrics(
        &self,
        _ctx: &TtrpcContext,
        request: SandboxMetricsRequest,
    ) -> Reply<SandboxMetricsResponse> {
        self.tasks.sandbox_metrics(&request.sandbox_id).map_err(|err| failed(&request.sandbox_id, err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_resolv_conf_says_what_its_dns_config_says() {
        let dns = k8s_cri::v1::DnsConfig {
            servers: vec!["10.96.0.10".into(), "10.96.0.11".into()],
            searches: vec!["shop.svc.cluster.local".into(), "svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            String::from_utf8(resolv_conf(&dns)).unwrap(),
            "search shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver 10.96.0.11\n\
             options ndots:5\n"
        );
    }

    #[test]
    fn a_pods_config_is_read_from_the_cris_options_and_anything_else_is_no_config() {
        let config = PodSandboxConfig {
            metadata: Some(k8s_cri::v1::PodSandboxMetadata {
                name: "web".into(),
                uid: "u-1".into(),
                namespace: "shop".into(),
                attempt: 0,
            }),
            ..Default::default()
        };
        let mut request = CreateSandboxRequest { sandbox_id: "pod-1".into(), ..Default::default() };
        let mut options = Any::new();
        options.type_url = POD_SANDBOX_CONFIG.to_string();
        options.value = config.encode_to_vec();
        request.options = MessageField::some(options);
        let pod = PodSandbox::new(request.clone(), None, SystemTime::UNIX_EPOCH, PodState::Created).unwrap();
        assert_eq!(
            (pod.namespace.as_deref(), pod.name.as_deref(), pod.uid.as_deref()),
            (Some("shop"), Some("web"), Some("u-1"))
        );

        request.options.as_mut().unwrap().value = b"\xff\xff not protobuf".to_vec();
        let err = PodSandbox::new(request.clone(), None, SystemTime::UNIX_EPOCH, PodState::Created).err().unwrap();
        assert!(err.to_string().contains("not a CRI PodSandboxConfig"), "{err}");

        request.options.as_mut().unwrap().type_url = "something.else".into();
        let pod = PodSandbox::new(request, None, SystemTime::UNIX_EPOCH, PodState::Created).unwrap();
        assert_eq!(pod.namespace, None, "another runtime's options say nothing of the pod");
    }
}
