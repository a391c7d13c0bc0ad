//! The shim task API (`containerd.task.v2.Task`) served by the node host
//! for every container of its containerd namespace.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, KillRequest, PidsRequest, PidsResponse, ProcessInfo, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics as CgroupMetrics};
use containerd_shim_protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskIO, TaskStart};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message as _, MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::asynchronous::Service;
use tokio::sync::watch;

use super::NodeConfig;
use super::command::{self, Program};
use super::container::{Bundle, KubernetesSettings, Netns, Role, function_name};
use super::containerd::ContainerRecord;
use super::error::{NodeError, task_failed};
use super::policy::PolicyFile;
use super::stdio::{ContainerOutput, ContainerSinks};
use super::{netns, rootfs};
use crate::abi::Egress;
use crate::host::Host;
use crate::logs::{GuestLine, InstanceLog, LogBudget, LogSink, Stream};
use crate::manifest::TenantName;
use crate::registry::DeployItem;
use crate::trigger::http::{Routing, serve_routed};

/// `128 + signal`, the status of a task ended by a signal.
fn signalled(signal: u32) -> u32 {
    128 + signal
}
const SIGINT: u32 = 2;
const SIGQUIT: u32 = 3;
const SIGKILL: u32 = 9;
const SIGTERM: u32 = 15;

/// The node's containers and what serves them.
pub struct Node {
    host: Arc<Host>,
    sinks: Arc<ContainerSinks>,
    publisher: RemotePublisher,
    namespace: String,
    containerd: PathBuf,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    pid: u32,
    /// The largest wasm read out of a container's rootfs.
    max_wasm_bytes: u64,
    /// What a pod's annotations may grant.
    policy: PolicyFile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    Created,
    Running,
    Stopped { status: u32, at: SystemTime },
}

enum Kind {
    /// Holds the pod's network namespace open.
    Sandbox { netns: Option<Arc<OwnedFd>>, namespace: Option<String> },
    /// An HTTP function listening in its pod.
    Service { netns: Option<Arc<OwnedFd>>, port: u16 },
    /// A program that runs once.
    Command {
        program: Program,
        args: Vec<String>,
        env: Vec<(String, String)>,
        rootfs: PathBuf,
        memory_limit: u64,
        log_budget: Arc<LogBudget>,
    },
}

struct Container {
    id: String,
    bundle: PathBuf,
    function: String,
    stdin: String,
    stdout: String,
    stderr: String,
    rootfs: Option<PathBuf>,
    code_bytes: u64,
    kind: Kind,
    state: watch::Sender<TaskState>,
    stop: watch::Sender<bool>,
    runner: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Container {
    fn state(&self) -> TaskState {
        *self.state.borrow()
    }

    fn take_runner(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.runner.lock().unwrap_or_else(|poison| poison.into_inner()).take()
    }
}

type Reply<T> = ttrpc::Result<T>;

fn timestamp(at: SystemTime) -> MessageField<Timestamp> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut stamp = Timestamp::new();
    stamp.seconds = since.as_secs() as i64;
    stamp.nanos = since.subsec_nanos() as i32;
    MessageField::some(stamp)
}

impl Node {
    /// A node with no containers yet.
    pub fn new(
        host: Arc<Host>,
        sinks: Arc<ContainerSinks>,
        publisher: RemotePublisher,
        config: &NodeConfig,
    ) -> Arc<Node> {
        Arc::new(Node {
            host,
            sinks,
            publisher,
            namespace: config.namespace.clone(),
            containerd: config.containerd.clone(),
            containers: Mutex::new(HashMap::new()),
            pid: std::process::id(),
            max_wasm_bytes: config.max_wasm_bytes,
            policy: PolicyFile::new(&config.policy),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, NodeError> {
        self.lock().get(id).cloned().ok_or_else(|| NodeError::NotFound(format!("container {id} not found")))
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(err) =
            self.publisher.publish(ttrpc::context::Context::default(), topic, &self.namespace, event).await
        {
            tracing::warn!(topic, error = %err, "cannot publish a task event");
        }
    }

    /// Write a line of the host's own to a container's stderr (why it
    /// failed), so it reaches the container's log like a process's would.
    fn tell(&self, container: &Container, text: &str) {
        self.sinks.line(GuestLine {
            function: &container.function,
            version: "-",
            stream: Stream::Stderr,
            request_id: None,
            text: &format!("shoal: {text}"),
        });
    }

    /// Stop every container (host shutdown): functions drain and run `destroy`.
    pub async fn stop_all(self: &Arc<Self>) {
        let containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        let stops = containers.into_iter().filter(|c| c.state() == TaskState::Running).map(|container| {
            let node = self.clone();
            async move { node.terminate(container, SIGTERM).await }
        });
        futures_util::future::join_all(stops).await;
    }

    async fn create(self: &Arc<Self>, request: CreateTaskRequest) -> Result<u32, NodeError> {
        if self.lock().contains_key(&request.id) {
            return Err(NodeError::AlreadyExists(format!("container {} already exists", request.id)));
        }
        if request.terminal {
            return Err(NodeError::Unimplemented(
                "a terminal (tty) is not supported: run the container without -t".to_string(),
            ));
        }
        let bundle_path = PathBuf::from(&request.bundle);
        let rootfs = if request.rootfs.is_empty() {
            None
        } else {
            let target = bundle_path.join("rootfs");
            let mounts: Vec<_> =
                request.rootfs.iter().map(|m| (m.type_.clone(), m.source.clone(), m.options.clone())).collect();
            let mount_target = target.clone();
            tokio::task::spawn_blocking(move || -> Result<(), NodeError> {
                std::fs::create_dir_all(&mount_target)
                    .map_err(|err| NodeError::Internal(format!("cannot create {}: {err}", mount_target.display())))?;
                for (fs_type, source, options) in &mounts {
                    containerd_shim::mount::mount_rootfs(Some(fs_type), Some(source), options, &mount_target)
                        .map_err(|err| NodeError::Internal(format!("cannot mount the rootfs ({fs_type}): {err}")))?;
                }
                Ok(())
            })
            .await
            .map_err(task_failed("mounting the rootfs"))??;
            Some(target)
        };
        match self.prepare(&request, &bundle_path, rootfs.clone()).await {
            Ok(container) => {
                let pid = self.pid;
                self.lock().insert(request.id.clone(), container);
                let event = TaskCreate {
                    container_id: request.id.clone(),
                    bundle: request.bundle.clone(),
                    rootfs: request.rootfs.clone(),
                    io: MessageField::some(TaskIO {
                        stdin: request.stdin.clone(),
                        stdout: request.stdout.clone(),
                        stderr: request.stderr.clone(),
                        terminal: request.terminal,
                        ..Default::default()
                    }),
                    pid,
                    ..Default::default()
                };
                self.publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event)).await;
                Ok(pid)
            }
            Err(err) => {
                if let Some(rootfs) = rootfs {
                    unmount(rootfs).await;
                }
                Err(err)
            }
        }
    }

    async fn prepare(
        self: &Arc<Self>,
        request: &CreateTaskRequest,
        bundle_path: &std::path::Path,
        rootfs: Option<PathBuf>,
    ) -> Result<Arc<Container>, NodeError> {
        let id = request.id.clone();
        let bundle = Bundle::load(bundle_path)?;
        let function = function_name(&id, bundle.container_name().as_deref());
        let (kind, code_bytes) = match bundle.role() {
            Role::Sandbox => {
                (Kind::Sandbox { netns: self.open_netns(&bundle.netns())?, namespace: bundle.pod_namespace() }, 0)
            }
            Role::App { sandbox_id } => {
                let record = match super::containerd::container(&self.containerd, &self.namespace, &id).await {
                    Ok(record) => record,
                    Err(err) => {
                        tracing::warn!(container = %id, error = %err, "no image labels; using annotations only");
                        Default::default()
                    }
                };
                let labels = &record.labels;
                let (entry, file, wasm) = self.wasm_of(&bundle, &record).await?;
                let mut settings = KubernetesSettings::collect([labels, &bundle.annotations()], bundle.memory_limit());
                settings.cpu_limit = bundle.cpu_limit_millis();
                let mut spec =
                    settings.function_spec(&function, &file, &format!("container {id} labels/annotations"))?;
                // Whose it is: the pod's namespace (what containerd's CRI
                // says of the container, else of its sandbox), or, for a
                // container no pod made, containerd's namespace.
                let namespace = bundle
                    .pod_namespace()
                    .or_else(|| sandbox_id.as_deref().and_then(|sandbox| self.sandbox_namespace(sandbox)))
                    .unwrap_or_else(|| self.namespace.clone());
                spec.tenant = TenantName::new(&namespace)
                    .map_err(|err| NodeError::InvalidArgument(format!("the container's namespace: {err}")))?;
                self.policy.current()?.check(&spec.tenant, &spec.grants)?;
                spec.pod = bundle.pod_identity();
                spec.env = bundle.env().into_iter().collect();
                spec.grants.files = bundle.volumes();
                spec.check().map_err(|err| NodeError::InvalidArgument(format!("container {id}: {err}")))?;
                let code_bytes = wasm.len() as u64;
                let engine = self.host.registry().engine().clone();
                let probe = wasm.clone();
                let program = tokio::task::spawn_blocking(move || {
                    command::is_program(&engine, &probe).then(|| command::compile(&engine, &probe))
                })
                .await
                .map_err(task_failed("compiling the program"))?;
                match program {
                    Some(program) => {
                        let program = program.map_err(|err| err.context(&entry))?;
                        let (metrics, name) = (self.host.metrics().clone(), function.clone());
                        let log_budget = LogBudget::new(
                            spec.limits.log_bytes_per_second,
                            Box::new(move |lines| metrics.log_dropped(&name, lines)),
                        );
                        let kind = Kind::Command {
                            program,
                            args: bundle.args(),
                            env: bundle.env(),
                            rootfs: bundle.rootfs(),
                            memory_limit: spec.limits.memory_bytes,
                            log_budget,
                        };
                        (kind, code_bytes)
                    }
                    None => {
                        let port = bundle.port()?;
                        let netns = match sandbox_id.as_deref().and_then(|sandbox| self.sandbox_netns(sandbox)) {
                            Some(netns) => netns,
                            None => self.open_netns(&bundle.netns())?,
                        };
                        // Outbound calls leave from the pod's network
                        // namespace, so its NetworkPolicy applies to them.
                        let egress = match (&netns, spec.grants.outbound_http.is_empty()) {
                            (Some(netns), false) => {
                                let resolv_conf = bundle.resolv_conf()?;
                                Some(Egress::in_netns(netns, &function, resolv_conf.as_deref()).map_err(|err| {
                                    NodeError::Internal(format!("cannot start the pod's egress: {err}"))
                                })?)
                            }
                            _ => None,
                        };
                        let services = self.host.services().clone();
                        services.set_egress(&function, egress);
                        let item = DeployItem { spec, wasm: wasm.into() };
                        if let Err(source) = self.host.registry().deploy(vec![item]).await {
                            services.set_egress(&function, None);
                            return Err(NodeError::Deploy { entry: entry.clone(), source });
                        }
                        (Kind::Service { netns, port }, code_bytes)
                    }
                }
            }
        };
        let output = ContainerOutput::open(&request.stdout, &request.stderr)?;
        self.sinks.attach(&function, Arc::new(output));
        Ok(Arc::new(Container {
            id,
            bundle: bundle_path.to_path_buf(),
            function,
            stdin: request.stdin.clone(),
            stdout: request.stdout.clone(),
            stderr: request.stderr.clone(),
            rootfs,
            code_bytes,
            kind,
            state: watch::Sender::new(TaskState::Created),
            stop: watch::Sender::new(false),
            runner: Mutex::new(None),
        }))
    }

    /// The container's wasm: the entrypoint in its rootfs or, when the
    /// rootfs is empty (a CNCF wasm artifact image, which containerd does
    /// not unpack), the image's wasm layer from the content store. Returns
    /// what to call it in messages, a path for the spec, and the bytes.
    async fn wasm_of(
        &self,
        bundle: &Bundle,
        record: &ContainerRecord,
    ) -> Result<(String, PathBuf, Vec<u8>), NodeError> {
        let from_rootfs = match bundle.entrypoint() {
            Ok(entry) => {
                let (root, max_bytes, path) = (bundle.rootfs(), self.max_wasm_bytes, entry.clone());
                let read = tokio::task::spawn_blocking(move || rootfs::read_inside(&root, &path, max_bytes))
                    .await
                    .map_err(task_failed("reading the entrypoint"))?;
                match read {
                    Ok(wasm) => return Ok((entry.clone(), bundle.rootfs().join(entry.trim_start_matches('/')), wasm)),
                    Err(err) => err.context(format_args!("the entrypoint {entry}")),
                }
            }
            Err(err) => err,
        };
        let rootfs_empty = std::fs::read_dir(bundle.rootfs()).map(|mut dir| dir.next().is_none()).unwrap_or(true);
        if record.image.is_empty() || !rootfs_empty {
            return Err(from_rootfs);
        }
        let (digest, wasm) = super::containerd::artifact_wasm(&self.containerd, &self.namespace, &record.image)
            .await
            .map_err(|err| err.context("the rootfs is empty and the image is not a wasm artifact"))?;
        let name = format!("{}@{digest}", record.image);
        Ok((name.clone(), PathBuf::from(name), wasm))
    }

    fn open_netns(&self, netns: &Netns) -> Result<Option<Arc<OwnedFd>>, NodeError> {
        match netns {
            Netns::Path(path) => netns::open(path).map(|fd| Some(Arc::new(fd))),
            Netns::New => netns::create().map(|fd| Some(Arc::new(fd))),
            Netns::Node => Ok(None),
        }
    }

    /// The Kubernetes namespace of sandbox `id`, as the CRI told it.
    fn sandbox_namespace(&self, id: &str) -> Option<String> {
        match &self.lock().get(id)?.kind {
            Kind::Sandbox { namespace, .. } => namespace.clone(),
            _ => None,
        }
    }

    /// The network namespace held by sandbox `id`. (The CRI points an app
    /// container at `/proc/<sandbox pid>/ns/net`, which for a sandbox
    /// served by this host is the host's own: the sandbox is asked instead.)
    fn sandbox_netns(&self, id: &str) -> Option<Option<Arc<OwnedFd>>> {
        let containers = self.lock();
        match &containers.get(id)?.kind {
            Kind::Sandbox { netns, .. } => Some(netns.clone()),
            _ => None,
        }
    }

    async fn start(self: &Arc<Self>, container: Arc<Container>) -> Result<u32, NodeError> {
        if container.state() != TaskState::Created {
            return Err(NodeError::FailedPrecondition("it was already started".to_string()));
        }
        match &container.kind {
            Kind::Sandbox { .. } => {}
            Kind::Service { netns, port } => {
                let addr = std::net::SocketAddr::from(([0, 0, 0, 0], *port));
                let listener = netns::bind(netns.as_deref(), addr)?;
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|err| NodeError::Internal(format!("cannot serve the listener: {err}")))?;
                let serve = serve_routed(
                    listener,
                    self.host.clone(),
                    Routing::Function(Arc::from(container.function.as_str())),
                    container.stop.subscribe(),
                );
                *container.runner.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::spawn(serve));
            }
            Kind::Command { .. } => {
                let node = self.clone();
                let running = container.clone();
                let handle = tokio::spawn(async move { node.run_command(running).await });
                *container.runner.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
            }
        }
        container.state.send_replace(TaskState::Running);
        let event = TaskStart { container_id: container.id.clone(), pid: self.pid, ..Default::default() };
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event)).await;
        Ok(self.pid)
    }

    async fn run_command(self: Arc<Self>, container: Arc<Container>) {
        let Kind::Command { program, args, env, rootfs, memory_limit, log_budget } = &container.kind else { return };
        let engine = self.host.registry().engine().clone();
        let log = InstanceLog::new(
            Arc::from(container.function.as_str()),
            Arc::from("-"),
            self.sinks.clone(),
            log_budget.clone(),
        );
        let invocation =
            command::Invocation { args, env, rootfs: Some(rootfs.as_path()), memory_limit: Some(*memory_limit), log };
        let (code, trap) = command::run(&engine, program, invocation).await;
        if let Some(trap) = trap {
            self.tell(&container, &format!("the program trapped: {trap}"));
        }
        self.exit(&container, code as u32).await;
    }

    /// Record the exit, close the output, tell containerd.
    async fn exit(&self, container: &Container, status: u32) {
        let at = SystemTime::now();
        let changed = container.state.send_if_modified(|state| {
            if matches!(state, TaskState::Stopped { .. }) {
                return false;
            }
            *state = TaskState::Stopped { status, at };
            true
        });
        if !changed {
            return;
        }
        self.sinks.detach(&container.function);
        let event = TaskExit {
            container_id: container.id.clone(),
            id: container.id.clone(),
            pid: self.pid,
            exit_status: status,
            exited_at: timestamp(at),
            ..Default::default()
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event)).await;
    }

    /// SIGTERM and friends: a function stops taking connections, finishes
    /// its requests and runs `destroy`, then exits 0.
    async fn terminate(self: &Arc<Self>, container: Arc<Container>, signal: u32) {
        let status = match &container.kind {
            Kind::Sandbox { .. } => 0,
            Kind::Service { .. } => {
                container.stop.send_replace(true);
                if let Some(runner) = container.take_runner() {
                    let _ = runner.await;
                }
                if let Err(err) = self.host.registry().undeploy(&container.function).await {
                    tracing::warn!(container = %container.id, error = %err, "undeploy failed");
                }
                0
            }
            Kind::Command { .. } => {
                if let Some(runner) = container.take_runner() {
                    runner.abort();
                }
                signalled(signal)
            }
        };
        self.exit(&container, status).await;
    }

    /// SIGKILL: everything stops now, `destroy` does not run.
    async fn kill_now(&self, container: &Container) {
        if let Some(runner) = container.take_runner() {
            runner.abort();
        }
        if matches!(container.kind, Kind::Service { .. }) {
            let _ = self.host.registry().kill(&container.function).await;
        }
        self.exit(container, signalled(SIGKILL)).await;
    }

    async fn kill(self: &Arc<Self>, container: Arc<Container>, signal: u32) -> Result<(), NodeError> {
        match container.state() {
            TaskState::Stopped { .. } => Ok(()),
            TaskState::Created => {
                if matches!(container.kind, Kind::Service { .. }) {
                    let _ = self.host.registry().kill(&container.function).await;
                }
                self.exit(&container, signalled(signal)).await;
                Ok(())
            }
            TaskState::Running => {
                match signal {
                    SIGKILL => self.kill_now(&container).await,
                    SIGTERM | SIGINT | SIGQUIT => {
                        // Kill answers at once; the drain runs on (Wait and
                        // the exit event report its end).
                        let node = self.clone();
                        tokio::spawn(async move { node.terminate(container, signal).await });
                    }
                    other => tracing::debug!(container = %container.id, signal = other, "signal ignored"),
                }
                Ok(())
            }
        }
    }

    async fn delete(&self, id: &str) -> Result<DeleteResponse, NodeError> {
        let container = self.get(id)?;
        let (status, at) = match container.state() {
            TaskState::Running => {
                return Err(NodeError::FailedPrecondition(format!("container {id} is running: kill it first")));
            }
            TaskState::Created => {
                if matches!(container.kind, Kind::Service { .. }) {
                    let _ = self.host.registry().kill(&container.function).await;
                }
                (0, SystemTime::now())
            }
            TaskState::Stopped { status, at } => (status, at),
        };
        self.lock().remove(id);
        self.sinks.detach(&container.function);
        // Its series go with it (Stats may have touched them since it stopped).
        self.host.metrics().forget_function(&container.function);
        self.host.services().set_egress(&container.function, None);
        if let Some(rootfs) = container.rootfs.clone() {
            unmount(rootfs).await;
        }
        let event = TaskDelete {
            container_id: id.to_string(),
            id: id.to_string(),
            pid: self.pid,
            exit_status: status,
            exited_at: timestamp(at),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event)).await;
        Ok(DeleteResponse { pid: self.pid, exit_status: status, exited_at: timestamp(at), ..Default::default() })
    }

    fn stats(&self, container: &Container) -> CgroupMetrics {
        let registry = self.host.registry();
        let cpu_usec = (self.host.metrics().cpu_seconds(&container.function) * 1e6) as u64;
        let resident: u64 = registry
            .by_name(&container.function)
            .map(|target| target.pools().map(|pool| pool.resident_bytes()).sum())
            .unwrap_or(0);
        let limit = match &container.kind {
            Kind::Command { memory_limit, .. } => *memory_limit,
            _ => registry
                .by_name(&container.function)
                .and_then(|target| target.pools().next().map(|pool| pool.function().spec().limits.memory_bytes))
                .unwrap_or(0),
        };
        // Throttling, as a CFS-limited cgroup reports it, from the quota
        // every version of the function keeps.
        let (throttled, throttled_periods) = registry
            .by_name(&container.function)
            .map(|target| {
                target
                    .pools()
                    .filter_map(|pool| pool.function().cpu_quota().map(|quota| quota.throttled()))
                    .fold((std::time::Duration::ZERO, 0), |(time, periods), (t, p)| (time + t, periods + p))
            })
            .unwrap_or_default();
        let mut metrics = CgroupMetrics::new();
        metrics.cpu = MessageField::some(CPUStat {
            usage_usec: cpu_usec,
            user_usec: cpu_usec,
            nr_throttled: throttled_periods,
            throttled_usec: throttled.as_micros() as u64,
            ..Default::default()
        });
        metrics.memory = MessageField::some(MemoryStat {
            usage: container.code_bytes + resident,
            usage_limit: limit,
            anon: resident,
            ..Default::default()
        });
        metrics
    }
}

async fn unmount(rootfs: PathBuf) {
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(path) = rootfs.to_str()
            && let Err(err) = containerd_shim::mount::umount_recursive(Some(path), libc::MNT_DETACH)
        {
            tracing::warn!(rootfs = path, error = %err, "cannot unmount a container's rootfs");
        }
    })
    .await;
}

/// The ttrpc face of a [`Node`].
pub struct TaskService {
    node: Arc<Node>,
}

impl TaskService {
    /// Serve `node`.
    pub fn new(node: Arc<Node>) -> TaskService {
        TaskService { node }
    }
}

/// The task service under the names containerd 1.x (`v2`) and 2.x (`v3`)
/// call it by; the messages are the same.
pub fn services(service: Arc<TaskService>) -> Vec<(String, Service)> {
    let mut services: Vec<(String, Service)> =
        containerd_shim_protos::shim_async::create_task(service.clone()).into_iter().collect();
    let v2: Vec<(String, Service)> = containerd_shim_protos::shim_async::create_task(service)
        .into_iter()
        .map(|(name, methods)| (name.replace("containerd.task.v3.", "containerd.task.v2."), methods))
        .collect();
    services.extend(v2);
    services
}

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, request: CreateTaskRequest) -> Reply<CreateTaskResponse> {
        let id = request.id.clone();
        match self.node.create(request).await {
            Ok(pid) => {
                tracing::info!(container = %id, "created");
                Ok(CreateTaskResponse { pid, ..Default::default() })
            }
            Err(err) => {
                tracing::warn!(container = %id, error = %err, code = ?err.code(), "create failed");
                Err(err.for_container(&id))
            }
        }
    }

    async fn start(&self, _ctx: &TtrpcContext, request: StartRequest) -> Reply<StartResponse> {
        let container = self.node.get(&request.id)?;
        match self.node.start(container).await {
            Ok(pid) => Ok(StartResponse { pid, ..Default::default() }),
            Err(err) => Err(err.for_container(&request.id)),
        }
    }

    async fn state(&self, _ctx: &TtrpcContext, request: StateRequest) -> Reply<StateResponse> {
        let container = self.node.get(&request.id)?;
        let mut response = StateResponse {
            id: container.id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: self.node.pid,
            stdin: container.stdin.clone(),
            stdout: container.stdout.clone(),
            stderr: container.stderr.clone(),
            ..Default::default()
        };
        let state = match container.state() {
            TaskState::Created => Status::CREATED,
            TaskState::Running => Status::RUNNING,
            TaskState::Stopped { status, at } => {
                response.exit_status = status;
                response.exited_at = timestamp(at);
                Status::STOPPED
            }
        };
        response.status = state.into();
        Ok(response)
    }

    async fn kill(&self, _ctx: &TtrpcContext, request: KillRequest) -> Reply<Empty> {
        let container = self.node.get(&request.id)?;
        self.node.kill(container, request.signal).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, request: WaitRequest) -> Reply<WaitResponse> {
        let container = self.node.get(&request.id)?;
        let mut state = container.state.subscribe();
        let stopped =
            state.wait_for(|state| matches!(state, TaskState::Stopped { .. })).await.map(|state| *state).map_err(
                |_| NodeError::Internal("the container's state is gone".to_string()).for_container(&request.id),
            )?;
        let TaskState::Stopped { status, at } = stopped else { unreachable!("waited for Stopped") };
        Ok(WaitResponse { exit_status: status, exited_at: timestamp(at), ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, request: DeleteRequest) -> Reply<DeleteResponse> {
        if !request.exec_id.is_empty() {
            return Err(NodeError::NotFound(format!("exec {} not found", request.exec_id)).into());
        }
        self.node.delete(&request.id).await.map_err(|err| err.for_container(&request.id))
    }

    async fn pids(&self, _ctx: &TtrpcContext, request: PidsRequest) -> Reply<PidsResponse> {
        self.node.get(&request.id)?;
        let process = ProcessInfo { pid: self.node.pid, ..Default::default() };
        Ok(PidsResponse { processes: vec![process], ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, request: ConnectRequest) -> Reply<ConnectResponse> {
        self.node.get(&request.id)?;
        Ok(ConnectResponse {
            shim_pid: self.node.pid,
            task_pid: self.node.pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _request: ShutdownRequest) -> Reply<Empty> {
        // The host serves the whole node: one container's shim going away
        // does not stop it. `shoal node` ends on SIGTERM.
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, request: CloseIORequest) -> Reply<Empty> {
        // Functions do not read stdin; closing it changes nothing.
        self.node.get(&request.id)?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, request: StatsRequest) -> Reply<StatsResponse> {
        let container = self.node.get(&request.id)?;
        let metrics = self.node.stats(&container);
        // containerd resolves the type by its bare proto name (typeurl),
        // without the type.googleapis.com/ prefix `Any::pack` would add.
        let mut stats = Any::new();
        stats.type_url = "io.containerd.cgroups.v2.Metrics".to_string();
        stats.value = metrics
            .write_to_bytes()
            .map_err(|err| NodeError::Internal(format!("cannot encode the stats: {err}")).for_container(&request.id))?;
        Ok(StatsResponse { stats: MessageField::some(stats), ..Default::default() })
    }
}
