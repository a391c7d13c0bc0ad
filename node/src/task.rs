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

mod container;
mod execs;
mod handover;
mod resources;
mod sandbox;
mod service;

use container::*;
pub(crate) use service::services;

pub(crate) use sandbox::SandboxService;
use sandbox::Sandboxes;

use crate::NodeConfig;
use crate::command::{self, Program};
use crate::container::{Bundle, KubernetesSettings, Netns, function_name};
use crate::containerd::ContainerRecord;
use crate::error::{Code, NodeError, task_failed};
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

/// What serves containerd's task and sandbox APIs for the node: its
/// containers and pod sandboxes, and what they run on.
pub(crate) struct TaskHost {
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

type Reply<T> = ttrpc::Result<T>;

fn timestamp(at: SystemTime) -> MessageField<Timestamp> {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let mut stamp = Timestamp::new();
    stamp.seconds = since.as_secs() as i64;
    stamp.nanos = since.subsec_nanos() as i32;
    MessageField::some(stamp)
}

impl TaskHost {
    /// A task host with no containers yet.
    pub(crate) fn new(
        host: Arc<Host>,
        sinks: Arc<ContainerSinks>,
        publisher: RemotePublisher,
        config: &NodeConfig,
    ) -> Arc<TaskHost> {
        Arc::new(TaskHost {
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
        self.containers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Room for one more program (a container's own, or an exec's) of
    /// `tenant`, within what the node policy lets its namespace run at
    /// once; held until the program ends.
    fn admit_program(&self, tenant: &str) -> Result<ProgramPermit, NodeError> {
        let name = TenantName::new(tenant).map_err(|err| NodeError::Host {
            code: Code::INTERNAL,
            what: format!("tenant {tenant:?}"),
            source: err.into(),
        })?;
        let allowed = self.policy.current()?.limits_for(&name).programs;
        let mut counts = self.programs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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
    pub(crate) fn forget_kept_wasm(&self) {
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
}

impl TaskHost {
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
                std::fs::create_dir_all(&mount_target).map_err(|source| NodeError::Io {
                    code: Code::INTERNAL,
                    what: format!("cannot create {}", mount_target.display()),
                    source,
                })?;
                for (fs_type, source, options) in &mounts {
                    containerd_shim::mount::mount_rootfs(Some(fs_type), Some(source), options, &mount_target).map_err(
                        |err| NodeError::Os {
                            code: Code::INTERNAL,
                            what: format!("cannot mount the rootfs ({fs_type})"),
                            source: err.into(),
                        },
                    )?;
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
        let sandbox_id = bundle.sandbox_id();
        let (kind, code_bytes) = if bundle.is_sandbox() {
            let netns = match inherited {
                Some(netns) => Some(netns),
                None => self.open_netns(&bundle.netns())?,
            };
            if let Some(namespace) = bundle.pod_namespace() {
                tenant = namespace;
            }
            (Kind::Sandbox { netns, namespace: bundle.pod_namespace() }, 0)
        } else {
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
                    // Outbound calls and invokes of other nodes leave
                    // from the pod's network namespace (so its
                    // NetworkPolicy applies to them) and use its DNS.
                    let calls_out = !spec.grants.outbound_http.is_empty() || !spec.grants.invoke.is_empty();
                    let egress = match (&netns, calls_out) {
                        (Some(netns), true) => {
                            let resolv_conf = match bundle.resolv_conf()? {
                                Some(text) => Some(text),
                                // A pod whose sandbox this host owns: its DNS is ours to say.
                                None => sandbox_id.as_deref().and_then(|pod| self.sandboxes.resolv_conf(pod)),
                            };
                            Some(Egress::in_netns(netns, &function, resolv_conf.as_deref()).map_err(|source| {
                                NodeError::Io {
                                    code: Code::INTERNAL,
                                    what: "cannot start the pod's egress".to_string(),
                                    source,
                                }
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
        };
        let output = Arc::new(match output {
            Some(output) => output,
            None => ContainerOutput::open_when_read(&request.stdout, &request.stderr).await?,
        });
        self.sinks.attach(&function, output.clone());
        let container = Container::new(request, function, rootfs, (kind, code_bytes), Some(output), TaskState::Created);
        Ok(Arc::new(container.with(sandbox_id, tenant, kept)))
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
        spec.tenant = TenantName::new(&namespace).map_err(|err| NodeError::Host {
            code: Code::INVALID_ARGUMENT,
            what: "the container's namespace".to_string(),
            source: err.into(),
        })?;
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
        spec.check().map_err(|err| NodeError::Host {
            code: Code::INVALID_ARGUMENT,
            what: format!("container {id}"),
            source: err.into(),
        })?;
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
        let rootfs_empty = std::fs::read_dir(bundle.rootfs()).map_or(true, |mut dir| dir.next().is_none());
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
                let tasks = self.clone();
                let running = container.clone();
                // A program with a CPU share computes where every such call does.
                let runtime = self.host.dispatcher().runtime(cpu_quota.is_some());
                let handle = runtime.spawn(async move {
                    tasks.run_command(running, permit).await;
                });
                *container.runner.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
            }
        }
        container.state.send_replace(TaskState::Running);
        let event = TaskStart { container_id: container.id.clone(), pid: self.pid, ..Default::default() };
        self.publish(topics::TASK_START_EVENT_TOPIC, Box::new(event)).await;
        Ok(self.pid)
    }

    /// Serve an HTTP function's pod listener.
    fn serve(&self, container: &Container, listener: std::net::TcpListener) -> Result<(), NodeError> {
        let kept = listener.try_clone().map_err(|source| NodeError::Io {
            code: Code::INTERNAL,
            what: "cannot duplicate the listener".to_string(),
            source,
        })?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| NodeError::Io {
            code: Code::INTERNAL,
            what: "cannot serve the listener".to_string(),
            source,
        })?;
        let serve = serve_routed(
            listener,
            self.host.clone(),
            Routing::Function(Arc::from(container.function.as_str())),
            container.stop.subscribe(),
        );
        *container.listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(OwnedFd::from(kept));
        *container.runner.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokio::spawn(serve));
        Ok(())
    }

    /// Run a program container to its end (it counts among its tenant's
    /// programs, by `permit`, until then).
    async fn run_command(self: Arc<Self>, container: Arc<Container>, permit: ProgramPermit) {
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
        container.end(code as u32);
        drop(permit);
        tracing::info!(container = %container.id, status = code, "its program ended");
        self.exit(&container, code as u32, true).await;
    }

    /// Record the exit, close the output, tell containerd. The end told is
    /// the first one noted ([`Container::end`]), else `status` now.
    ///
    /// With `wait_for_output`, the end is told only once containerd's
    /// reader has taken what is in its FIFOs: the client deletes the task
    /// as soon as it hears of the end (by Wait or the exit event), closing
    /// its readers. A SIGKILL does not wait (it cuts a wait short).
    async fn exit(&self, container: &Container, status: u32, wait_for_output: bool) {
        let (status, at) = container.end(status);
        let output = container.output.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if let Some(output) = output.filter(|_| wait_for_output && container.state().is_live()) {
            // An end told meanwhile (a SIGKILL's) cuts the wait short.
            let mut state = container.state.subscribe();
            let left = tokio::select! {
                left = output.drained() => left,
                _ = state.wait_for(|state| !state.is_live()) => 0,
            };
            if left > 0 {
                tracing::warn!(
                    container = %container.id,
                    unread_bytes = left,
                    "the container's output reader stopped taking its output before its end: what it left is lost"
                );
            }
        }
        if !container.stop_with(status, at) {
            return;
        }
        // Its execs end with it.
        let execs: Vec<Arc<Exec>> = container.lock_execs().values().cloned().collect();
        for exec in execs {
            exec.stop_runner();
            if exec.finish(signalled(SIGKILL)) {
                self.exec_exited(container, &exec).await;
            }
        }
        // Close its output: containerd's CRI waits for the FIFOs' end
        // before it deletes the task (kubectl logs ends there too).
        self.sinks.detach(&container.function);
        container.output.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
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
                container.stop_runner();
                signalled(signal)
            }
        };
        self.exit(&container, status, true).await;
    }

    /// SIGKILL: everything stops now, `destroy` does not run.
    async fn kill_now(&self, container: &Container) {
        container.stop_runner();
        if matches!(container.kind, Kind::Service { .. }) {
            let _ = self.host.registry().kill(&container.function).await;
        }
        self.exit(container, signalled(SIGKILL), false).await;
    }

    async fn kill(self: &Arc<Self>, container: Arc<Container>, signal: u32) -> Result<(), NodeError> {
        match container.state() {
            TaskState::Stopped { .. } => Ok(()),
            TaskState::Created => {
                if matches!(container.kind, Kind::Service { .. }) {
                    let _ = self.host.registry().kill(&container.function).await;
                }
                self.exit(&container, signalled(signal), false).await;
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
                        let tasks = self.clone();
                        tokio::spawn(async move { tasks.terminate(container, signal).await });
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
