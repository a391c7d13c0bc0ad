//! The shim task API (`containerd.task.v2.Task`) served by the node host
//! for every container of its containerd namespace.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse,
    ProcessInfo, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest, StartResponse, StateRequest,
    StateResponse, StatsRequest, StatsResponse, Status, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics as CgroupMetrics};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message as _, MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::asynchronous::Service;
use tokio::sync::watch;

mod sandbox;

pub use sandbox::SandboxService;
use sandbox::Sandboxes;

use crate::NodeConfig;
use crate::command::{self, Program};
use crate::container::{Bundle, KubernetesSettings, Netns, Role, function_name};
use crate::containerd::ContainerRecord;
use crate::error::{NodeError, task_failed};
use crate::exec::{Exec, ExecCommand, ExecState, ExecStdio};
use crate::handover::{Descriptors, SavedContainer, SavedSandbox, SavedState};
use crate::policy::PolicyFile;
use crate::stdio::{ContainerOutput, ContainerSinks};
use crate::wasm_store::WasmStore;
use crate::{netns, rootfs};
use shoal::abi::Egress;
use shoal::host::Host;
use shoal::limits::CpuQuota;
use shoal::logs::{GuestLine, InstanceLog, LogBudget, LogSink, Stream};
use shoal::manifest::{FunctionSpec, TenantName};
use shoal::registry::DeployItem;
use shoal::trigger::http::{Routing, serve_routed};

/// `128 + signal`, the status of a task ended by a signal.
fn signalled(signal: u32) -> u32 {
    128 + signal
}
const SIGINT: u32 = 2;
const SIGQUIT: u32 = 3;
const SIGKILL: u32 = 9;
const SIGTERM: u32 = 15;
/// The exit status of a container a host could not take over (as a task
/// whose process could not be found: 255).
const ADOPTION_FAILED: u32 = 255;

/// The node's containers and what serves them.
pub struct Node {
    host: Arc<Host>,
    sinks: Arc<ContainerSinks>,
    publisher: RemotePublisher,
    namespace: String,
    containerd: PathBuf,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// The pods whose sandboxes this host owns (containerd's Sandbox API).
    sandboxes: Sandboxes,
    /// The wasm every HTTP function container was created with.
    wasm: WasmStore,
    /// Programs and program execs running, by tenant.
    programs: Arc<Mutex<HashMap<String, usize>>>,
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
    /// Running, but taking no new requests (they wait for Resume).
    Paused,
    Stopped {
        status: u32,
        at: SystemTime,
    },
}

/// An exec's life is a task's, less pausing.
impl From<ExecState> for TaskState {
    fn from(state: ExecState) -> TaskState {
        match state {
            ExecState::Created => TaskState::Created,
            ExecState::Running => TaskState::Running,
            ExecState::Stopped { status, at } => TaskState::Stopped { status, at },
        }
    }
}

impl TaskState {
    /// Started and not yet stopped (paused or not).
    fn is_live(self) -> bool {
        matches!(self, TaskState::Running | TaskState::Paused)
    }
}

enum Kind {
    /// Holds the pod's network namespace open.
    Sandbox { netns: Option<Arc<OwnedFd>>, namespace: Option<String> },
    /// An HTTP function listening in its pod.
    Service { netns: Option<Arc<OwnedFd>>, port: u16 },
    /// A container that had stopped before this host took it over: only
    /// its exit status is left to report.
    Ended,
    /// A program that runs once.
    Command {
        program: Program,
        args: Vec<String>,
        env: Vec<(String, String)>,
        rootfs: PathBuf,
        memory_limit: u64,
        /// Its CPU share (`cpu_millis`), shared with its execs.
        cpu_quota: Option<Arc<CpuQuota>>,
        log_budget: Arc<LogBudget>,
    },
}

/// What a container brings from the host process it was handed over from.
#[derive(Default)]
struct Inherited {
    /// Its network namespace.
    netns: Option<Arc<OwnedFd>>,
    /// Its stdout and stderr FIFOs, as opened there.
    output: Option<ContainerOutput>,
    /// An HTTP function's spec as resolved at its creation, and its wasm's
    /// digest: served as it was, whatever its image, annotations or the
    /// node policy say now.
    function: Option<Kept>,
}

/// One running program of a tenant, counted until it is dropped.
struct ProgramPermit {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    tenant: String,
}

impl Drop for ProgramPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|poison| poison.into_inner());
        if let Some(running) = counts.get_mut(&self.tenant) {
            *running = running.saturating_sub(1);
            if *running == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

/// What an HTTP function container was created with, for the next host.
#[derive(Clone)]
pub(crate) struct Kept {
    pub(crate) spec: FunctionSpec,
    pub(crate) digest: String,
}

struct Container {
    id: String,
    /// What containerd asked for (a hand-over replays it).
    request: CreateTaskRequest,
    bundle: PathBuf,
    function: String,
    /// The pod sandbox it belongs to, when the CRI made it.
    sandbox: Option<String>,
    /// Whose it is: its pod's namespace.
    tenant: String,
    stdin: String,
    stdout: String,
    stderr: String,
    rootfs: Option<PathBuf>,
    code_bytes: u64,
    kind: Kind,
    state: watch::Sender<TaskState>,
    stop: watch::Sender<bool>,
    runner: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Its stdout and stderr FIFOs (also in the node's sinks while it
    /// runs), closed when it exits: the CRI reads them to their end before
    /// it deletes the task, so holding them past the exit would hang
    /// StopContainer.
    output: Mutex<Option<Arc<ContainerOutput>>>,
    /// A second descriptor of its pod listener (a running HTTP function),
    /// kept so the listener outlives its serving loop in a hand-over.
    listener: Mutex<Option<OwnedFd>>,
    /// Its execs (`kubectl exec`), by exec id.
    execs: Mutex<HashMap<String, Arc<Exec>>>,
    /// An HTTP function's resolved spec and wasm digest (kept in the node's
    /// wasm store while the container exists).
    kept: Option<Kept>,
}

impl Container {
    /// The container `request` asked for, serving as `kind`, in `state`.
    fn new(
        request: &CreateTaskRequest,
        function: String,
        rootfs: Option<PathBuf>,
        (kind, code_bytes): (Kind, u64),
        output: Option<Arc<ContainerOutput>>,
        state: TaskState,
    ) -> Container {
        Container {
            id: request.id.clone(),
            request: request.clone(),
            bundle: PathBuf::from(&request.bundle),
            function,
            sandbox: None,
            tenant: String::new(),
            stdin: request.stdin.clone(),
            stdout: request.stdout.clone(),
            stderr: request.stderr.clone(),
            rootfs,
            code_bytes,
            kind,
            state: watch::Sender::new(state),
            stop: watch::Sender::new(false),
            runner: Mutex::new(None),
            output: Mutex::new(output),
            listener: Mutex::new(None),
            execs: Mutex::new(HashMap::new()),
            kept: None,
        }
    }

    /// The same container, as part of pod sandbox `sandbox`, serving the
    /// function `kept` (if an HTTP function).
    fn with(mut self, sandbox: Option<String>, tenant: String, kept: Option<Kept>) -> Container {
        self.sandbox = sandbox;
        self.tenant = tenant;
        self.kept = kept;
        self
    }

    fn state(&self) -> TaskState {
        *self.state.borrow()
    }

    fn lock_execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Exec>>> {
        self.execs.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    fn exec(&self, exec_id: &str) -> Result<Arc<Exec>, NodeError> {
        self.lock_execs().get(exec_id).cloned().ok_or_else(|| NodeError::NotFound(format!("exec {exec_id} not found")))
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
            sandboxes: Sandboxes::default(),
            wasm: WasmStore::new(&config.state_dir.join("container-wasm")),
            programs: Arc::default(),
            pid: std::process::id(),
            max_wasm_bytes: config.max_wasm_bytes,
            policy: PolicyFile::new(&config.policy),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Room for one more program (a container's own, or an exec's) of
    /// `tenant`, within what the node policy lets its namespace run at
    /// once; held until the program ends.
    fn admit_program(&self, tenant: &str) -> Result<ProgramPermit, NodeError> {
        let name = TenantName::new(tenant).map_err(|err| NodeError::Internal(format!("tenant {tenant:?}: {err}")))?;
        let allowed = self.policy.current()?.limits_for(&name).programs;
        let mut counts = self.programs.lock().unwrap_or_else(|poison| poison.into_inner());
        let running = counts.entry(tenant.to_string()).or_default();
        if let Some(allowed) = allowed
            && *running >= allowed as usize
        {
            return Err(NodeError::FailedPrecondition(format!(
                "namespace {tenant:?} runs {running} wasi:cli programs and execs at once, the most the node policy \
                 allows it (`limits.programs`); try again when one has ended"
            )));
        }
        *running += 1;
        Ok(ProgramPermit { counts: self.programs.clone(), tenant: tenant.to_string() })
    }

    /// A host starting afresh: no container uses any wasm kept before.
    pub fn forget_kept_wasm(&self) {
        self.wasm.clear();
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
            trace: None,
            text: &format!("shoal: {text}"),
        });
    }

    /// Stop every container (host shutdown): functions drain and run `destroy`.
    pub async fn stop_all(self: &Arc<Self>) {
        let containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        let stops = containers.into_iter().filter(|c| c.state().is_live()).map(|container| {
            let node = self.clone();
            async move { node.terminate(container, SIGTERM).await }
        });
        futures_util::future::join_all(stops).await;
    }

    /// Why this host cannot hand its containers over now, if it cannot: a
    /// running program or an exec (their wasm state cannot move).
    pub fn refuse_hand_over(&self) -> Option<String> {
        for container in self.lock().values() {
            if matches!(container.kind, Kind::Command { .. }) && container.state().is_live() {
                return Some(format!(
                    "container {} runs a wasi:cli program, whose state cannot move to another process; \
                     upgrade once it has ended",
                    container.id
                ));
            }
            if let Some(exec) = container.lock_execs().keys().next() {
                return Some(format!(
                    "container {} has exec {exec} (kubectl exec); upgrade once containerd has removed it",
                    container.id
                ));
            }
        }
        None
    }

    /// End every running program and exec now (as SIGKILL would, 137),
    /// saying `why` in its container's log; how many there were.
    pub async fn end_programs(&self, why: &str) -> usize {
        let containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        let mut ended = 0;
        for container in containers {
            let execs: Vec<Arc<Exec>> =
                container.lock_execs().values().filter(|exec| exec.state() == ExecState::Running).cloned().collect();
            for exec in execs {
                self.tell(&container, &format!("exec {}: {why}", exec.id));
                self.exec_kill(&container, &exec, SIGKILL).await;
                ended += 1;
            }
            if matches!(container.kind, Kind::Command { .. }) && container.state().is_live() {
                self.tell(&container, why);
                self.kill_now(&container).await;
                ended += 1;
            }
        }
        ended
    }

    /// Whether a function is still draining after a stop signal (its exit
    /// is yet to be reported).
    pub fn stopping(&self) -> bool {
        self.lock().values().any(|container| container.state().is_live() && *container.stop.borrow())
    }

    /// Describe every container for the next host, adding the descriptors
    /// it needs (network namespaces, pod listeners, output FIFOs) to `fds`.
    /// Sandboxes come first. Called with containerd's connections held, so
    /// nothing changes the containers meanwhile.
    pub fn save(&self, fds: &mut Descriptors) -> Result<(Vec<SavedSandbox>, Vec<SavedContainer>), String> {
        let sandboxes = self.sandboxes.save(fds)?;
        let mut containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        containers.sort_by_key(|container| !matches!(container.kind, Kind::Sandbox { .. }));
        let mut saved = Vec::with_capacity(containers.len());
        for container in containers {
            let state = match container.state() {
                TaskState::Created => SavedState::Created,
                TaskState::Running => SavedState::Running,
                TaskState::Paused => SavedState::Paused,
                TaskState::Stopped { status, at } => SavedState::Stopped { status, at },
            };
            let netns = match &container.kind {
                Kind::Sandbox { netns, .. } | Kind::Service { netns, .. } => netns.as_deref(),
                _ => None,
            };
            let netns = match (netns, state) {
                (Some(netns), state) if !matches!(state, SavedState::Stopped { .. }) => {
                    Some(fds.add_copy(netns, &format!("the network namespace of {}", container.id))?)
                }
                _ => None,
            };
            let listener = match &*container.listener.lock().unwrap_or_else(|p| p.into_inner()) {
                Some(listener) if container.state().is_live() => {
                    Some(fds.add_copy(listener, &format!("the listener of {}", container.id))?)
                }
                _ => None,
            };
            let mut output = [None, None];
            let fifos = container.output.lock().unwrap_or_else(|poison| poison.into_inner()).clone();
            if let (Some(fifos), false) = (fifos, matches!(state, SavedState::Stopped { .. })) {
                let (stdout, stderr) = fifos
                    .descriptors()
                    .map_err(|err| format!("cannot duplicate the output of {}: {err}", container.id))?;
                output = [stdout.map(|fd| fds.add(fd)), stderr.map(|fd| fds.add(fd))];
            }
            saved.push(SavedContainer {
                request: container
                    .request
                    .write_to_bytes()
                    .map_err(|err| format!("cannot encode the request of {}: {err}", container.id))?,
                function: container.function.clone(),
                rootfs: container.rootfs.clone(),
                state,
                netns,
                listener,
                output,
                spec: container.kept.as_ref().map(|kept| kept.spec.clone()),
                digest: container.kept.as_ref().map(|kept| kept.digest.clone()),
            });
        }
        Ok((sandboxes, saved))
    }

    /// Stop serving every pod listener (the listeners stay open, their
    /// connections queue) and let the requests under way finish.
    pub async fn stop_serving(&self) {
        let containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        for container in containers {
            if let Some(runner) = container.take_runner() {
                container.stop.send_replace(true);
                let _ = runner.await;
            }
        }
    }

    /// Take over the containers another host process saved: each is built
    /// again from containerd's request (its function deployed, its rootfs
    /// left mounted), keeps its network namespace, and a running function
    /// serves the listener it had. containerd is not told anything: for it
    /// nothing happened.
    pub async fn adopt(
        self: &Arc<Self>,
        (sandboxes, saved): (Vec<SavedSandbox>, Vec<SavedContainer>),
        fds: &mut Descriptors,
    ) -> Result<(), NodeError> {
        self.sandboxes.adopt(sandboxes, fds)?;
        for saved in saved {
            let request = CreateTaskRequest::parse_from_bytes(&saved.request)
                .map_err(|err| NodeError::Internal(format!("a saved container's request: {err}")))?;
            let id = request.id.clone();
            // One container that cannot be taken over ends alone (containerd
            // is told it exited); every other pod serves on.
            let container = match self.adopt_one(&request, saved, fds).await {
                Ok(container) => container,
                Err(err) => {
                    tracing::error!(container = %id, error = %err, "cannot take the container over: it ends");
                    let at = SystemTime::now();
                    let ended = Arc::new(Container::new(
                        &request,
                        String::new(),
                        None,
                        (Kind::Ended, 0),
                        None,
                        TaskState::Stopped { status: ADOPTION_FAILED, at },
                    ));
                    self.publish_exit(&ended, &id, ADOPTION_FAILED, at).await;
                    ended
                }
            };
            self.lock().insert(id, container);
        }
        Ok(())
    }

    /// Build one container another host process saved: its function from
    /// the spec and wasm it was created with, its namespace, listener and
    /// output as they were handed over.
    async fn adopt_one(
        self: &Arc<Self>,
        request: &CreateTaskRequest,
        saved: SavedContainer,
        fds: &mut Descriptors,
    ) -> Result<Arc<Container>, NodeError> {
        let mut take = |index: Option<usize>| fds.take_some(index).map_err(NodeError::Internal);
        let (netns, listener) = (take(saved.netns)?, take(saved.listener)?);
        let output = ContainerOutput::from_descriptors(take(saved.output[0])?, take(saved.output[1])?);
        let id = &request.id;
        if let SavedState::Stopped { status, at } = saved.state {
            return Ok(Arc::new(Container::new(
                request,
                saved.function.clone(),
                saved.rootfs.clone(),
                (Kind::Ended, 0),
                None,
                TaskState::Stopped { status, at },
            )));
        }
        let bundle = PathBuf::from(&request.bundle);
        let function = match (saved.spec, saved.digest) {
            (Some(spec), Some(digest)) => Some(Kept { spec, digest }),
            _ => None,
        };
        let inherited = Inherited { netns: netns.map(Arc::new), output: Some(output), function };
        let container = self
            .prepare(request, &bundle, saved.rootfs.clone(), inherited)
            .await
            .map_err(|err| err.context(format_args!("container {id}")))?;
        if matches!(saved.state, SavedState::Running | SavedState::Paused) {
            match (&container.kind, listener) {
                (Kind::Service { .. }, Some(listener)) => {
                    self.serve(&container, std::net::TcpListener::from(listener))?
                }
                (Kind::Sandbox { .. }, _) => {}
                _ => {
                    return Err(NodeError::Internal(format!(
                        "container {id} was running, and cannot be taken over running"
                    )));
                }
            }
            let paused = saved.state == SavedState::Paused;
            if paused && matches!(container.kind, Kind::Service { .. }) {
                self.host
                    .registry()
                    .set_paused(&container.function, true)
                    .map_err(|err| NodeError::Internal(format!("pausing {id}: {err}")))?;
            }
            container.state.send_replace(if paused { TaskState::Paused } else { TaskState::Running });
        }
        Ok(container)
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
        let began = Instant::now();
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
                // What an image holds is the image author's: no device
                // opens as one, no set-id bit counts.
                rootfs::harden(&mount_target).inspect_err(|_| {
                    if let Some(path) = mount_target.to_str() {
                        let _ = containerd_shim::mount::umount_recursive(Some(path), libc::MNT_DETACH);
                    }
                })
            })
            .await
            .map_err(task_failed("mounting the rootfs"))??;
            Some(target)
        };
        let mounted = began.elapsed();
        match self.prepare(&request, &bundle_path, rootfs.clone(), Inherited::default()).await {
            Ok(container) => {
                // Where a pod start's time goes (benchmark W7 reads these).
                tracing::info!(
                    container = %request.id,
                    mount_us = mounted.as_micros() as u64,
                    prepare_us = (began.elapsed() - mounted).as_micros() as u64,
                    "create timings"
                );
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

    /// Build a container (deploying its function, compiling its program),
    /// with what it `inherited` from the host it came from.
    async fn prepare(
        self: &Arc<Self>,
        request: &CreateTaskRequest,
        bundle_path: &std::path::Path,
        rootfs: Option<PathBuf>,
        inherited: Inherited,
    ) -> Result<Arc<Container>, NodeError> {
        let Inherited { netns: inherited, output, function: adopted } = inherited;
        let mut kept = None;
        let mut tenant = self.namespace.clone();
        let id = request.id.clone();
        let bundle = Bundle::load(bundle_path)?;
        let function = function_name(&id, bundle.container_name().as_deref());
        let sandbox = match bundle.role() {
            Role::App { sandbox_id } => sandbox_id,
            Role::Sandbox => None,
        };
        let (kind, code_bytes) = match bundle.role() {
            Role::Sandbox => {
                let netns = match inherited {
                    Some(netns) => Some(netns),
                    None => self.open_netns(&bundle.netns())?,
                };
                if let Some(namespace) = bundle.pod_namespace() {
                    tenant = namespace;
                }
                (Kind::Sandbox { netns, namespace: bundle.pod_namespace() }, 0)
            }
            Role::App { sandbox_id } => {
                let asked = Instant::now();
                let (entry, spec, wasm, labels_us) = match &adopted {
                    // Taken over: what it was created with, never what its
                    // image or the policy say now.
                    Some(Kept { spec, digest }) => {
                        let wasm = self.wasm.read(digest, self.max_wasm_bytes)?;
                        (format!("{} (sha256:{digest})", spec.wasm.display()), spec.clone(), wasm, 0)
                    }
                    None => {
                        let record = match crate::containerd::container(&self.containerd, &self.namespace, &id).await {
                            Ok(record) => record,
                            Err(err) => {
                                tracing::warn!(container = %id, error = %err, "no image labels; using annotations only");
                                Default::default()
                            }
                        };
                        let labels_us = asked.elapsed().as_micros() as u64;
                        let (entry, file, wasm) = self.wasm_of(&bundle, &record).await?;
                        let resources = (bundle.memory_limit(), bundle.cpu_limit_millis());
                        let spec =
                            self.app_spec(&id, &function, &bundle, &record, sandbox_id.as_deref(), &file, resources)?;
                        (entry, spec, wasm, labels_us)
                    }
                };
                let read_us = (asked.elapsed().as_micros() as u64).saturating_sub(labels_us);
                tenant = spec.tenant.as_str().to_string();
                let code_bytes = wasm.len() as u64;
                let engine = self.host.registry().engine().clone();
                let probe = wasm.clone();
                let function_only = adopted.is_some();
                let program = tokio::task::spawn_blocking(move || {
                    (!function_only && command::is_program(&probe)).then(|| command::compile(&engine, &probe))
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
                            cpu_quota: spec.limits.cpu_millis.map(CpuQuota::new),
                            log_budget,
                        };
                        (kind, code_bytes)
                    }
                    None => {
                        let port = bundle.port()?;
                        let pod_netns = match sandbox_id.as_deref() {
                            Some(sandbox) => self.sandbox_netns(sandbox)?,
                            None => None,
                        };
                        let netns = match pod_netns {
                            Some(netns) => netns,
                            None if inherited.is_some() => inherited,
                            None => self.open_netns(&bundle.netns())?,
                        };
                        // Outbound calls leave from the pod's network
                        // namespace, so its NetworkPolicy applies to them.
                        let egress = match (&netns, spec.grants.outbound_http.is_empty()) {
                            (Some(netns), false) => {
                                let resolv_conf = match bundle.resolv_conf()? {
                                    Some(text) => Some(text),
                                    // A pod whose sandbox this host owns: its DNS is ours to say.
                                    None => sandbox_id.as_deref().and_then(|pod| self.sandboxes.resolv_conf(pod)),
                                };
                                Some(Egress::in_netns(netns, &function, resolv_conf.as_deref()).map_err(|err| {
                                    NodeError::Internal(format!("cannot start the pod's egress: {err}"))
                                })?)
                            }
                            _ => None,
                        };
                        let services = self.host.services().clone();
                        services.set_egress(&function, egress);
                        let item = DeployItem { spec: spec.clone(), wasm: wasm.clone().into() };
                        let deploying = Instant::now();
                        let deployed = match &adopted {
                            Some(_) => self.host.registry().adopt(vec![item]).await,
                            None => self.host.registry().deploy(vec![item]).await,
                        };
                        let digest = match deployed {
                            Ok(reports) => reports.into_iter().next().map(|report| report.digest).unwrap_or_default(),
                            Err(source) => {
                                services.set_egress(&function, None);
                                return Err(NodeError::Deploy { entry: entry.clone(), source });
                            }
                        };
                        // Kept for whichever host serves it next.
                        let kept_now = match &adopted {
                            Some(_) => {
                                self.wasm.count(&digest);
                                Ok(())
                            }
                            None => self.wasm.keep(&digest, &wasm),
                        };
                        if let Err(err) = kept_now {
                            let _ = self.host.registry().kill(&function).await;
                            services.set_egress(&function, None);
                            return Err(err);
                        }
                        kept = Some(Kept { spec, digest });
                        tracing::info!(
                            container = %id,
                            labels_us,
                            read_us,
                            deploy_us = deploying.elapsed().as_micros() as u64,
                            "app timings"
                        );
                        (Kind::Service { netns, port }, code_bytes)
                    }
                }
            }
        };
        let output = Arc::new(match output {
            Some(output) => output,
            None => ContainerOutput::open(&request.stdout, &request.stderr)?,
        });
        self.sinks.attach(&function, output.clone());
        let container = Container::new(request, function, rootfs, (kind, code_bytes), Some(output), TaskState::Created);
        Ok(Arc::new(container.with(sandbox, tenant, kept)))
    }

    /// The function spec of an app container: its image labels, then its
    /// annotations, capped by its `resources` (memory bytes, CPU
    /// thousandths), checked against the node policy; its tenant, pod,
    /// environment and volumes from the bundle.
    #[allow(clippy::too_many_arguments, reason = "the parts of one container, each from its own source")]
    fn app_spec(
        &self,
        id: &str,
        function: &str,
        bundle: &Bundle,
        record: &ContainerRecord,
        sandbox_id: Option<&str>,
        file: &std::path::Path,
        (memory_limit, cpu_limit): (Option<u64>, Option<u32>),
    ) -> Result<shoal::manifest::FunctionSpec, NodeError> {
        let mut settings = KubernetesSettings::collect([&record.labels, &bundle.annotations()], memory_limit);
        settings.cpu_limit = cpu_limit;
        let mut spec = settings.function_spec(function, file, &format!("container {id} labels/annotations"))?;
        // Whose it is: the pod's namespace (what containerd's CRI says of
        // the container, else of its sandbox), or, for a container no pod
        // made, containerd's namespace.
        let namespace = bundle
            .pod_namespace()
            .or_else(|| sandbox_id.and_then(|sandbox| self.sandbox_namespace(sandbox)))
            .unwrap_or_else(|| self.namespace.clone());
        spec.tenant = TenantName::new(&namespace)
            .map_err(|err| NodeError::InvalidArgument(format!("the container's namespace: {err}")))?;
        let policy = self.policy.current()?;
        policy.check(&spec.tenant, &spec.grants)?;
        policy.check_limits(&spec.tenant, &spec.limits)?;
        // What the namespace's functions hold together, as its rule says
        // now (a changed rule applies from the namespace's next container).
        let bounds = policy.limits_for(&spec.tenant);
        self.host.registry().engine().slots().set_tenant_share(spec.tenant.as_str(), bounds.instances);
        let queued = bounds.queued_bytes.map(|bytes| usize::try_from(bytes).unwrap_or(usize::MAX));
        self.host.queue_budgets().set(spec.tenant.as_str(), queued);
        spec.pod = bundle.pod_identity();
        spec.env = bundle.env().into_iter().collect();
        spec.grants.files = bundle.volumes();
        spec.check().map_err(|err| NodeError::InvalidArgument(format!("container {id}: {err}")))?;
        Ok(spec)
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
        let (digest, wasm) =
            crate::containerd::artifact_wasm(&self.containerd, &self.namespace, &record.image, self.max_wasm_bytes)
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
        if self.sandboxes.contains(id) {
            return self.sandboxes.namespace(id);
        }
        match &self.lock().get(id)?.kind {
            Kind::Sandbox { namespace, .. } => namespace.clone(),
            _ => None,
        }
    }

    /// The network namespace held by sandbox `id`. (The CRI points an app
    /// container at `/proc/<sandbox pid>/ns/net`, which for a sandbox
    /// served by this host is the host's own: the sandbox is asked instead.)
    fn sandbox_netns(&self, id: &str) -> Result<Option<Option<Arc<OwnedFd>>>, NodeError> {
        if let Some(netns) = self.sandboxes.netns(id) {
            return netns.map(Some);
        }
        let containers = self.lock();
        Ok(match containers.get(id).map(|container| &container.kind) {
            Some(Kind::Sandbox { netns, .. }) => Some(netns.clone()),
            _ => None,
        })
    }

    async fn start(self: &Arc<Self>, container: Arc<Container>) -> Result<u32, NodeError> {
        if container.state() != TaskState::Created {
            return Err(NodeError::FailedPrecondition("it was already started".to_string()));
        }
        match &container.kind {
            Kind::Sandbox { .. } | Kind::Ended => {}
            Kind::Service { netns, port } => {
                let addr = std::net::SocketAddr::from(([0, 0, 0, 0], *port));
                let listener = netns::bind(netns.as_deref(), addr)?;
                self.serve(&container, listener)?;
            }
            Kind::Command { cpu_quota, .. } => {
                let permit = self.admit_program(&container.tenant)?;
                let node = self.clone();
                let running = container.clone();
                // A program with a CPU share computes where every such call does.
                let runtime = self.host.dispatcher().runtime(cpu_quota.is_some());
                let handle = runtime.spawn(async move {
                    let _running = permit;
                    node.run_command(running).await
                });
                *container.runner.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
            }
        }
        container.state.send_replace(TaskState::Running);
        let event = TaskStart { container_id: container.id.clone(), pid: self.pid, ..Default::default() };
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event)).await;
        Ok(self.pid)
    }

    /// Serve an HTTP function's pod listener.
    fn serve(&self, container: &Container, listener: std::net::TcpListener) -> Result<(), NodeError> {
        let kept =
            listener.try_clone().map_err(|err| NodeError::Internal(format!("cannot duplicate the listener: {err}")))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|err| NodeError::Internal(format!("cannot serve the listener: {err}")))?;
        let serve = serve_routed(
            listener,
            self.host.clone(),
            Routing::Function(Arc::from(container.function.as_str())),
            container.stop.subscribe(),
        );
        *container.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(OwnedFd::from(kept));
        *container.runner.lock().unwrap_or_else(|p| p.into_inner()) = Some(tokio::spawn(serve));
        Ok(())
    }

    async fn run_command(self: Arc<Self>, container: Arc<Container>) {
        let Kind::Command { program, args, env, rootfs, memory_limit, cpu_quota, log_budget } = &container.kind else {
            return;
        };
        let engine = self.host.registry().engine().clone();
        let log = InstanceLog::new(
            Arc::from(container.function.as_str()),
            Arc::from("-"),
            self.sinks.clone(),
            log_budget.clone(),
        );
        let invocation = command::Invocation {
            args,
            env,
            rootfs: Some(rootfs.as_path()),
            volumes: &[],
            memory_limit: Some(*memory_limit),
            cpu_quota: cpu_quota.clone(),
            stdio: command::Stdio::Log(log),
            tenant: &container.tenant,
        };
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
        // Its execs end with it.
        let execs: Vec<Arc<Exec>> = container.lock_execs().values().cloned().collect();
        for exec in execs {
            if let Some(runner) = exec.take_runner() {
                runner.abort();
            }
            if exec.finish(signalled(SIGKILL)) {
                self.exec_exited(container, &exec).await;
            }
        }
        // Close its output: containerd's CRI waits for the FIFOs' end
        // before it deletes the task (kubectl logs ends there too).
        self.sinks.detach(&container.function);
        container.output.lock().unwrap_or_else(|poison| poison.into_inner()).take();
        self.publish_exit(container, &container.id, status, at).await;
    }

    /// SIGTERM and friends: a function stops taking connections, finishes
    /// its requests and runs `destroy`, then exits 0.
    async fn terminate(self: &Arc<Self>, container: Arc<Container>, signal: u32) {
        let status = match &container.kind {
            Kind::Sandbox { .. } | Kind::Ended => 0,
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
            TaskState::Running | TaskState::Paused => {
                if container.state() == TaskState::Paused && matches!(container.kind, Kind::Service { .. }) {
                    // Requests waiting for the resume are served (SIGTERM
                    // drains them) or end with the function (SIGKILL).
                    let _ = self.host.registry().set_paused(&container.function, false);
                }
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
            TaskState::Running | TaskState::Paused => {
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
        if let Some(kept) = &container.kept {
            self.wasm.release(&kept.digest);
        }
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

    /// Add an exec (`kubectl exec`): checked now, started by Start.
    async fn exec_add(&self, container: &Container, request: &ExecProcessRequest) -> Result<(), NodeError> {
        if !container.state().is_live() {
            return Err(NodeError::FailedPrecondition("it is not running".to_string()));
        }
        let exec = Exec::parse(request)?;
        match (&container.kind, &exec.command) {
            (Kind::Sandbox { .. }, _) => {
                return Err(NodeError::FailedPrecondition("a pod's sandbox runs nothing to exec into".to_string()));
            }
            (Kind::Command { .. }, ExecCommand::Invoke { .. }) => {
                return Err(NodeError::InvalidArgument(
                    "`shoal invoke` calls the pod's HTTP function; this container runs a program".to_string(),
                ));
            }
            _ => {}
        }
        {
            let mut execs = container.lock_execs();
            if execs.contains_key(&exec.id) {
                return Err(NodeError::AlreadyExists(format!("exec {} already exists", exec.id)));
            }
            execs.insert(exec.id.clone(), Arc::new(exec));
        }
        let event = TaskExecAdded {
            container_id: container.id.clone(),
            exec_id: request.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event)).await;
        Ok(())
    }

    /// Start an exec: it runs on its own task until it ends or is killed.
    async fn exec_start(self: &Arc<Self>, container: Arc<Container>, exec: Arc<Exec>) -> Result<u32, NodeError> {
        if exec.state() != ExecState::Created {
            return Err(NodeError::FailedPrecondition(format!("exec {} was already started", exec.id)));
        }
        // A program counts among its namespace's programs; `shoal invoke`
        // is a request like any.
        let permit = match exec.command {
            ExecCommand::Program { .. } => Some(self.admit_program(&container.tenant)?),
            ExecCommand::Invoke { .. } => None,
        };
        let stdio = ExecStdio::open(&exec)?;
        exec.state.send_replace(ExecState::Running);
        let node = self.clone();
        let (running, started) = (container.clone(), exec.clone());
        // It shares its container's CPU share, and so its threads.
        let runtime = self.host.dispatcher().runtime(self.limits(&container).1.is_some());
        let runner = runtime.spawn(async move {
            let _running = permit;
            let status = node.run_exec(&running, &started, stdio).await;
            if started.finish(status) {
                node.exec_exited(&running, &started).await;
            }
        });
        *exec.runner.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(runner);
        let event = TaskExecStarted {
            container_id: container.id.clone(),
            exec_id: exec.id.clone(),
            pid: self.pid,
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event)).await;
        Ok(self.pid)
    }

    /// Run an exec to its end; its exit status.
    async fn run_exec(&self, container: &Container, exec: &Exec, stdio: ExecStdio) -> u32 {
        match &exec.command {
            ExecCommand::Invoke { path } => self.exec_invoke(container, exec, path, stdio).await,
            ExecCommand::Program { args, env } => {
                let (stdin, stdout, stderr, mut notes) = stdio.into_wasi();
                // The bundle is read once: where the program is, its / and its volumes.
                let (rootfs, volumes) = match Bundle::load(&container.bundle) {
                    Ok(bundle) => (bundle.rootfs(), bundle.volumes()),
                    Err(err) => {
                        let why = format!("shoal: {}: the container's bundle: {err}\n", args[0]);
                        crate::exec::write(&mut notes, why.as_bytes()).await;
                        return 127;
                    }
                };
                let program = match self.exec_program(rootfs.clone(), &args[0]).await {
                    Ok(program) => program,
                    Err((status, why)) => {
                        crate::exec::write(&mut notes, format!("shoal: {}: {why}\n", args[0]).as_bytes()).await;
                        return status;
                    }
                };
                let (memory_limit, cpu_quota) = self.limits(container);
                let invocation = command::Invocation {
                    args,
                    env,
                    rootfs: Some(&rootfs),
                    volumes: &volumes,
                    memory_limit,
                    cpu_quota,
                    stdio: command::Stdio::Pipes { stdin, stdout, stderr },
                    tenant: &container.tenant,
                };
                let engine = self.host.registry().engine().clone();
                let (code, trap) = command::run(&engine, &program, invocation).await;
                if let Some(trap) = trap {
                    crate::exec::write(&mut notes, format!("shoal: the program trapped: {trap}\n").as_bytes()).await;
                }
                code as u32
            }
        }
    }

    /// The program an exec names, read inside `rootfs` and compiled; or the status to exit with (127 missing, 126 not a
    /// program) and why.
    async fn exec_program(&self, rootfs: PathBuf, path: &str) -> Result<Program, (u32, String)> {
        let (path, max_bytes) = (path.to_string(), self.max_wasm_bytes);
        let engine = self.host.registry().engine().clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let wasm = rootfs::read_inside(&rootfs, &path, max_bytes).map_err(|err| (127, err.to_string()))?;
            if !command::is_program(&wasm) {
                return Err((
                    126,
                    "not a wasi:cli program (an HTTP function is called with `shoal invoke`)".to_string(),
                ));
            }
            command::compile(&engine, &wasm).map_err(|err| (126, err.to_string()))
        })
        .await;
        compiled.unwrap_or_else(|err| Err((126, format!("compiling the program failed: {err}"))))
    }

    /// `shoal invoke PATH` inside the pod: a GET on its own function.
    async fn exec_invoke(&self, container: &Container, exec: &Exec, path: &str, stdio: ExecStdio) -> u32 {
        use http_body_util::BodyExt as _;
        let ExecStdio { mut stdout, mut notes, .. } = stdio;
        let Some(target) = self.host.registry().by_name(&container.function) else {
            crate::exec::write(&mut notes, b"shoal invoke: the pod's function is not running\n").await;
            return 1;
        };
        let request = http::Request::builder()
            .method(http::Method::GET)
            .uri(format!("http://localhost{path}"))
            .header(http::header::HOST, "localhost")
            .body(
                http_body_util::Empty::<bytes::Bytes>::new()
                    .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} }),
            );
        let request = match request {
            Ok(request) => request,
            Err(err) => {
                crate::exec::write(&mut notes, format!("shoal invoke: bad path {path:?}: {err}\n").as_bytes()).await;
                return 2;
            }
        };
        let request_id: Arc<str> = Arc::from(format!("exec-{}", exec.id));
        let response = self.host.dispatcher().dispatch(target.pick().clone(), request, request_id).await;
        let status = response.status();
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        crate::exec::write(&mut stdout, &data).await;
                    }
                }
                Err(err) => {
                    crate::exec::write(&mut notes, format!("shoal invoke: the body broke off: {err}\n").as_bytes())
                        .await;
                    return 1;
                }
            }
        }
        if status.as_u16() >= 400 {
            crate::exec::write(&mut notes, format!("shoal invoke: {path} answered {status}\n").as_bytes()).await;
            return 1;
        }
        0
    }

    /// Tell containerd an exec ended.
    async fn exec_exited(&self, container: &Container, exec: &Exec) {
        let ExecState::Stopped { status, at } = exec.state() else { return };
        self.publish_exit(container, &exec.id, status, at).await;
    }

    /// Tell containerd that process `id` of `container` (the task itself,
    /// or one of its execs) exited with `status` at `at`.
    async fn publish_exit(&self, container: &Container, id: &str, status: u32, at: SystemTime) {
        let event = TaskExit {
            container_id: container.id.clone(),
            id: id.to_string(),
            pid: self.pid,
            exit_status: status,
            exited_at: timestamp(at),
            ..Default::default()
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event)).await;
    }

    /// Kill an exec: it stops at once, with `128 + signal`.
    async fn exec_kill(&self, container: &Container, exec: &Exec, signal: u32) {
        if let Some(runner) = exec.take_runner() {
            runner.abort();
        }
        if exec.finish(signalled(signal)) {
            self.exec_exited(container, exec).await;
        }
    }

    /// Pause: a function takes no new requests (they wait, within its
    /// `queue_timeout`), those under way finish.
    async fn pause(&self, container: &Container) -> Result<(), NodeError> {
        match (container.state(), &container.kind) {
            (TaskState::Paused, _) => return Ok(()),
            (TaskState::Running, Kind::Service { .. }) => {
                self.host
                    .registry()
                    .set_paused(&container.function, true)
                    .map_err(|err| NodeError::Internal(format!("pausing: {err}")))?;
            }
            (TaskState::Running, Kind::Sandbox { .. }) => {}
            (TaskState::Running, Kind::Command { .. }) => {
                return Err(NodeError::Unimplemented(
                    "pausing a running wasi:cli program is not supported (HTTP functions can be paused)".to_string(),
                ));
            }
            (state, _) => return Err(NodeError::FailedPrecondition(format!("it is not running ({state:?})"))),
        }
        container.state.send_replace(TaskState::Paused);
        let event = TaskPaused { container_id: container.id.clone(), ..Default::default() };
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event)).await;
        Ok(())
    }

    /// Resume: the requests that waited are served.
    async fn resume(&self, container: &Container) -> Result<(), NodeError> {
        match container.state() {
            TaskState::Running => return Ok(()),
            TaskState::Paused => {}
            state => return Err(NodeError::FailedPrecondition(format!("it is not paused ({state:?})"))),
        }
        if matches!(container.kind, Kind::Service { .. }) {
            self.host
                .registry()
                .set_paused(&container.function, false)
                .map_err(|err| NodeError::Internal(format!("resuming: {err}")))?;
        }
        container.state.send_replace(TaskState::Running);
        let event = TaskResumed { container_id: container.id.clone(), ..Default::default() };
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event)).await;
        Ok(())
    }

    /// Update (in-place resize): the function's memory and CPU budgets
    /// become what `resources` (the OCI `LinuxResources` containerd
    /// sends) says, computed as at creation (annotations capped by the
    /// limits). The function is deployed again with its new limits: the
    /// version serving now drains while the new one takes the requests, so
    /// nothing is refused and the container never restarts.
    async fn update(&self, container: &Container, resources: &[u8]) -> Result<(), NodeError> {
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources).map_err(|err| {
            NodeError::InvalidArgument(format!("the resources are not OCI LinuxResources JSON: {err}"))
        })?;
        let memory_limit = resources
            .memory()
            .as_ref()
            .and_then(|memory| memory.limit())
            .and_then(|limit| u64::try_from(limit).ok())
            .filter(|limit| *limit > 0);
        let cpu_limit = resources.cpu().as_ref().and_then(|cpu| {
            let (quota, period) = (cpu.quota()?, cpu.period()?);
            (quota > 0 && period > 0)
                .then(|| (quota as u128 * 1000 / u128::from(period)).clamp(1, u128::from(u32::MAX)) as u32)
        });
        if !container.state().is_live() && container.state() != TaskState::Created {
            return Err(NodeError::FailedPrecondition("it has stopped".to_string()));
        }
        let Kind::Service { .. } = container.kind else {
            // A sandbox runs nothing; a program's limits are fixed when it starts.
            return match container.kind {
                Kind::Sandbox { .. } => Ok(()),
                _ => Err(NodeError::Unimplemented(
                    "changing a running wasi:cli program's resources is not supported (HTTP functions can be resized)"
                        .to_string(),
                )),
            };
        };
        let bundle = Bundle::load(&container.bundle)?;
        let Role::App { sandbox_id } = bundle.role() else {
            return Err(NodeError::Internal("an HTTP function's bundle names no app container".to_string()));
        };
        let record =
            crate::containerd::container(&self.containerd, &self.namespace, &container.id).await.unwrap_or_default();
        let (entry, file, wasm) = self.wasm_of(&bundle, &record).await?;
        let running = self.host.registry().by_name(&container.function);
        let digest = shoal::engine::sha256_hex(&wasm);
        if running
            .as_ref()
            .and_then(|target| target.pools().next())
            .is_some_and(|pool| pool.function().digest() != digest)
        {
            return Err(NodeError::FailedPrecondition(format!(
                "the container's wasm ({entry}) changed since it was created; recreate the container instead"
            )));
        }
        let spec = self.app_spec(
            &container.id,
            &container.function,
            &bundle,
            &record,
            sandbox_id.as_deref(),
            &file,
            (memory_limit, cpu_limit),
        )?;
        let paused = container.state() == TaskState::Paused;
        self.host
            .registry()
            .deploy(vec![DeployItem { spec, wasm: wasm.into() }])
            .await
            .map_err(|source| NodeError::Deploy { entry, source })?;
        if paused {
            // The new version waits as the old one did.
            let _ = self.host.registry().set_paused(&container.function, true);
        }
        tracing::info!(container = %container.id, memory_limit, cpu_limit, "resources updated");
        Ok(())
    }

    /// What a container's wasm may use: the linear memory it may hold and
    /// its CPU share — a program's own, or its function's (`memory_mb`,
    /// `cpu_millis`; no memory limit once the function is gone). An exec
    /// shares both, as a process shares its container's cgroup.
    fn limits(&self, container: &Container) -> (Option<u64>, Option<Arc<CpuQuota>>) {
        match &container.kind {
            Kind::Command { memory_limit, cpu_quota, .. } => (Some(*memory_limit), cpu_quota.clone()),
            _ => {
                let target = self.host.registry().by_name(&container.function);
                let function = target.as_ref().and_then(|target| target.pools().next().map(|pool| pool.function()));
                (
                    function.map(|function| function.spec().limits.memory_bytes),
                    function.and_then(|function| function.cpu_quota().cloned()),
                )
            }
        }
    }

    fn stats(&self, container: &Container) -> CgroupMetrics {
        let registry = self.host.registry();
        let cpu_usec = (self.host.metrics().cpu_seconds(&container.function) * 1e6) as u64;
        let resident: u64 = registry
            .by_name(&container.function)
            .map(|target| target.pools().map(|pool| pool.resident_bytes()).sum())
            .unwrap_or(0);
        let limit = self.limits(container).0.unwrap_or(0);
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
/// call it by (the messages are the same), and the Sandbox API.
pub fn services(node: &Arc<Node>) -> Vec<(String, Service)> {
    let service = Arc::new(TaskService::new(node.clone()));
    let mut services: Vec<(String, Service)> =
        containerd_shim_protos::shim_async::create_task(service.clone()).into_iter().collect();
    let v2: Vec<(String, Service)> = containerd_shim_protos::shim_async::create_task(service)
        .into_iter()
        .map(|(name, methods)| (name.replace("containerd.task.v3.", "containerd.task.v2."), methods))
        .collect();
    services.extend(v2);
    services.extend(SandboxService::new(node.clone()).service());
    services
}

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, request: CreateTaskRequest) -> Reply<CreateTaskResponse> {
        let id = request.id.clone();
        let began = Instant::now();
        match self.node.create(request).await {
            Ok(pid) => {
                tracing::info!(container = %id, took_us = began.elapsed().as_micros() as u64, "created");
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
        if !request.exec_id.is_empty() {
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            let pid = self.node.exec_start(container, exec).await.map_err(|err| err.for_container(&request.id))?;
            return Ok(StartResponse { pid, ..Default::default() });
        }
        match self.node.start(container).await {
            Ok(pid) => Ok(StartResponse { pid, ..Default::default() }),
            Err(err) => Err(err.for_container(&request.id)),
        }
    }

    async fn state(&self, _ctx: &TtrpcContext, request: StateRequest) -> Reply<StateResponse> {
        let container = self.node.get(&request.id)?;
        // The task's own state, or one of its execs'.
        let (state, [stdin, stdout, stderr]) = if request.exec_id.is_empty() {
            (container.state(), [&container.stdin, &container.stdout, &container.stderr].map(String::clone))
        } else {
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            (TaskState::from(exec.state()), [&exec.stdin, &exec.stdout, &exec.stderr].map(String::clone))
        };
        let mut response = StateResponse {
            id: container.id.clone(),
            exec_id: request.exec_id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: self.node.pid,
            stdin,
            stdout,
            stderr,
            ..Default::default()
        };
        let status = match state {
            TaskState::Created => Status::CREATED,
            TaskState::Running => Status::RUNNING,
            TaskState::Paused => Status::PAUSED,
            TaskState::Stopped { status, at } => {
                response.exit_status = status;
                response.exited_at = timestamp(at);
                Status::STOPPED
            }
        };
        response.status = status.into();
        Ok(response)
    }

    async fn kill(&self, _ctx: &TtrpcContext, request: KillRequest) -> Reply<Empty> {
        let container = self.node.get(&request.id)?;
        if !request.exec_id.is_empty() {
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            self.node.exec_kill(&container, &exec, request.signal).await;
            return Ok(Empty::new());
        }
        self.node.kill(container, request.signal).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, request: WaitRequest) -> Reply<WaitResponse> {
        let container = self.node.get(&request.id)?;
        if !request.exec_id.is_empty() {
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            let mut state = exec.state.subscribe();
            let stopped =
                state.wait_for(|state| matches!(state, ExecState::Stopped { .. })).await.map(|state| *state).map_err(
                    |_| NodeError::Internal("the exec's state is gone".to_string()).for_container(&request.id),
                )?;
            let ExecState::Stopped { status, at } = stopped else { unreachable!("waited for Stopped") };
            return Ok(WaitResponse { exit_status: status, exited_at: timestamp(at), ..Default::default() });
        }
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
            let container = self.node.get(&request.id)?;
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            let (status, at) = match exec.state() {
                ExecState::Running => {
                    return Err(NodeError::FailedPrecondition(format!("exec {} is running: kill it first", exec.id))
                        .for_container(&request.id));
                }
                ExecState::Created => (0, SystemTime::now()),
                ExecState::Stopped { status, at } => (status, at),
            };
            container.lock_execs().remove(&exec.id);
            return Ok(DeleteResponse {
                pid: self.node.pid,
                exit_status: status,
                exited_at: timestamp(at),
                ..Default::default()
            });
        }
        self.node.delete(&request.id).await.map_err(|err| err.for_container(&request.id))
    }

    async fn pids(&self, _ctx: &TtrpcContext, request: PidsRequest) -> Reply<PidsResponse> {
        // containerd asks this of a pod sandbox too when it reconnects.
        if !self.node.sandboxes.contains(&request.id) {
            self.node.get(&request.id)?;
        }
        let process = ProcessInfo { pid: self.node.pid, ..Default::default() };
        Ok(PidsResponse { processes: vec![process], ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, request: ConnectRequest) -> Reply<ConnectResponse> {
        // containerd connects to a pod sandbox's shim with the task API
        // when it restarts, then asks the Sandbox API.
        if !self.node.sandboxes.contains(&request.id) {
            self.node.get(&request.id)?;
        }
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
        // Functions do not read stdin; an exec's program sees its input
        // end when containerd closes its end of the FIFO.
        self.node.get(&request.id)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, request: ExecProcessRequest) -> Reply<Empty> {
        let container = self.node.get(&request.id)?;
        self.node.exec_add(&container, &request).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, request: ResizePtyRequest) -> Reply<Empty> {
        self.node.get(&request.id)?;
        Err(NodeError::Unimplemented("there is no terminal to resize: execs run without one".to_string())
            .for_container(&request.id))
    }

    async fn pause(&self, _ctx: &TtrpcContext, request: PauseRequest) -> Reply<Empty> {
        let container = self.node.get(&request.id)?;
        self.node.pause(&container).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, request: ResumeRequest) -> Reply<Empty> {
        let container = self.node.get(&request.id)?;
        self.node.resume(&container).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, request: UpdateTaskRequest) -> Reply<Empty> {
        let container = self.node.get(&request.id)?;
        let resources = request.resources.as_ref().map(|any| any.value.as_slice()).unwrap_or(b"{}");
        self.node.update(&container, resources).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, request: CheckpointTaskRequest) -> Reply<Empty> {
        self.node.get(&request.id)?;
        Err(NodeError::Unimplemented(
            "checkpointing is not supported: a function's state lives in its key-value store, not in its instances"
                .to_string(),
        )
        .for_container(&request.id))
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
