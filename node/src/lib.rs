//! The node host: one Shoal host serving every wasm container that
//! containerd runs with `runtime_type = "io.containerd.shoal.v1"`.
//!
//! `containerd-shim-shoal-v1 start` (the `shim/` crate) starts `shoal node`
//! once per containerd namespace and hands containerd this host's ttrpc
//! socket for every container. containerd then speaks the shim task API
//! (`containerd.task.v2.Task`, also served as `v3`) here:
//!
//! - the pod sandbox ("pause") container runs nothing: the host opens the
//!   pod's network namespace and holds it;
//! - an HTTP function (a component exporting `wasi:http/incoming-handler`)
//!   is deployed into the host's registry and gets its own listener inside
//!   the pod's network namespace;
//! - a command (a `wasi:cli/run` component, or a classic `wasm32-wasip1`
//!   module with `_start`) runs once; its exit code is the task's.
//!
//! Guest output goes to the container's own stdio FIFOs, so the CRI log
//! file (`kubectl logs`) holds it. Stats come from Shoal's metering.
//!
//! `shoal node --upgrade` hands every pod over to a new host process
//! started from the (newly installed) binary without containerd seeing a
//! task exit: see [`handover`].

mod command;
mod container;
mod containerd;
mod control;
mod error;
mod exec;
mod handover;
mod netns;
mod policy;
mod relay;
mod rootfs;
mod stdio;
mod task;
mod wasm_store;

use std::ffi::OsString;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_shim_protos::ttrpc::asynchronous::Server;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use control::{same_user, upgrade_request};
use handover::{Descriptors, Link, Said, SavedConnection, Snapshot};
use relay::Relays;
use shoal::Error;
use shoal::engine::EngineOptions;
use shoal::host::{Backend, FrontDoor, HostConfig};
use shoal::metering::LedgerPolicy;
use shoal::server::RunningHost;
use shoal::signals::StopSignals;

pub use container::{ANNOTATION_PREFIX, KubernetesSettings};
pub use control::{UpgradeRequest, upgrade};
pub use error::NodeError;
pub use policy::{DEFAULT_POLICY_PATH, Policy, PolicyError};
pub use rootfs::DEFAULT_MAX_WASM_BYTES;

/// How long a new host may take to start and say hello.
const HELLO_WAIT: Duration = Duration::from_secs(30);
/// How long containerd's calls under way may take to finish once its
/// connections are held.
const SETTLE_WAIT: Duration = Duration::from_secs(10);
/// How long the new host may take to rebuild every container.
const VERDICT_WAIT: Duration = Duration::from_secs(300);

/// What `shoal node` needs to know.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The ttrpc socket containerd connects to.
    pub socket: PathBuf,
    /// The containerd namespace served (events are published in it).
    pub namespace: String,
    /// containerd's gRPC socket (container labels, image content).
    pub containerd: PathBuf,
    /// containerd's ttrpc socket, where task events are published.
    pub ttrpc_address: String,
    /// Compiled code cache, key-value store and usage ledger.
    pub state_dir: PathBuf,
    /// Engine settings.
    pub engine: EngineOptions,
    /// How long SIGTERM waits for a function's requests and `destroy`.
    pub drain_timeout: Duration,
    /// The largest wasm file read out of a container's rootfs.
    pub max_wasm_bytes: u64,
    /// The limits of every pod's HTTP listener.
    pub front_door: FrontDoor,
    /// How the usage ledger is partitioned and kept.
    pub ledger: LedgerPolicy,
    /// The node policy file (what pods may grant themselves).
    pub policy: PathBuf,
    /// Where key-value state is kept (every tenant's, scoped by name).
    pub keyvalue: Backend,
    /// What carries messages.
    pub pubsub: Backend,
    /// The most key-value bytes one tenant (namespace) may keep.
    pub kv_bytes_per_tenant: Option<u64>,
    /// Where the host's `/healthz`, `/readyz` and `/metrics` listen, if
    /// anywhere (they name every tenant's functions).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// The socket `shoal node --upgrade` talks to, beside the ttrpc socket.
pub fn control_socket(socket: &Path) -> PathBuf {
    socket.with_extension("upgrade")
}

/// Serve containerd until SIGTERM or SIGINT; then drain every function
/// (requests finish, `destroy` runs) and exit. With `adopt_fd`, take the
/// node over from the host process that started this one.
pub async fn run(config: NodeConfig, adopt_fd: Option<RawFd>) -> Result<(), Error> {
    // Sockets, key-value store and ledger: root's alone (containerd is root).
    shoal::server::private_files();
    let mut signals = StopSignals::install().map_err(|err| anyhow::anyhow!("cannot install signal handlers: {err}"))?;
    // An upgrade starts the file this binary was started from, which the
    // installer has replaced by then.
    let exe = std::env::current_exe().map_err(|err| anyhow::anyhow!("cannot find this binary: {err}"))?;
    let (mut old_host, mut carried) = (None, None);
    if let Some(fd) = adopt_fd {
        let (link, snapshot) = take_over(fd, &config).await?;
        old_host = Some(link);
        carried = Some(snapshot);
    }
    loop {
        let opened = Session::open(&config, carried.take()).await;
        if let Some(mut link) = old_host.take() {
            let said = match &opened {
                Ok(_) => Said::Serving { pid: std::process::id() },
                Err(err) => Said::Failed { error: format!("{err:#}") },
            };
            let _ = tokio::task::spawn_blocking(move || link.say(&said)).await;
        }
        let mut session = opened?;
        loop {
            match session.next(&mut signals).await {
                Next::Stop(signal) => {
                    tracing::info!("{signal}: draining every function");
                    session.stop(&config).await;
                    return Ok(());
                }
                Next::Upgrade(control, request) => match session.hand_over(control, request, &exe).await {
                    Outcome::Upgraded => return Ok(()),
                    Outcome::Refused(same) => session = *same,
                    Outcome::TakeBack(snapshot) => {
                        carried = Some(snapshot);
                        break;
                    }
                },
            }
        }
    }
}

/// The new host's side: say hello, then wait for the old host's snapshot.
async fn take_over(fd: RawFd, config: &NodeConfig) -> Result<(Link, (Snapshot, Descriptors)), Error> {
    // SAFETY: the old host passed this descriptor to this process alone
    // (`--adopt-fd`), and nothing else here uses it.
    let mut link = unsafe { Link::inherited(fd) }
        .map_err(|err| anyhow::anyhow!("--adopt-fd {fd} is not the hand-over socket: {err}"))?;
    let wait = config.drain_timeout + Duration::from_secs(60);
    let received = tokio::task::spawn_blocking(move || {
        link.say(&Said::Hello { pid: std::process::id(), version: env!("CARGO_PKG_VERSION").to_string() })?;
        link.set_timeout(Some(wait))?;
        let snapshot = link.recv_snapshot()?;
        Ok::<_, std::io::Error>((link, snapshot))
    })
    .await
    .map_err(anyhow::Error::from)?
    .map_err(|err| anyhow::anyhow!("the old host's hand-over broke off: {err}"))?;
    let (snapshot, _) = &received.1;
    tracing::info!(
        containers = snapshot.containers.len(),
        connections = snapshot.connections.len(),
        "taking the node over from the old host"
    );
    Ok(received)
}

/// Why a session stopped serving.
enum Next {
    Stop(&'static str),
    Upgrade(UnixStream, UpgradeRequest),
}

/// How a hand-over ended.
enum Outcome {
    /// The new host serves everything; this process exits.
    Upgraded,
    /// Nothing was handed over; this session serves on.
    Refused(Box<Session>),
    /// The new host failed after this one let go: take everything back.
    TakeBack((Snapshot, Descriptors)),
}

/// The accept loop of containerd's socket, which gives the listener back
/// when stopped.
struct Accepting {
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<UnixListener>>,
}

impl Accepting {
    fn start(listener: UnixListener, relays: Arc<Relays>) -> Accepting {
        let stop = watch::Sender::new(false);
        let mut stopped = stop.subscribe();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => {
                            // The socket is root's alone (umask 077); the
                            // peer is checked too, so a socket handed to
                            // another user never serves it.
                            if let Err(why) = same_user(&socket) {
                                tracing::warn!("refused a connection to the task socket: {why}");
                                continue;
                            }
                            if let Err(err) = relays.relay(socket, None).await {
                                tracing::warn!(error = %err, "cannot serve a containerd connection");
                            }
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "accept on the task socket failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    },
                    changed = stopped.changed() => {
                        if changed.is_err() || *stopped.borrow() {
                            break;
                        }
                    }
                }
            }
            listener
        });
        Accepting { stop, task: Some(task) }
    }

    async fn stop(&mut self) -> Result<UnixListener, Error> {
        self.stop.send_replace(true);
        let task =
            self.task.take().ok_or_else(|| anyhow::anyhow!("the task socket's accept loop was stopped before"))?;
        task.await.map_err(|err| anyhow::anyhow!("the task socket's accept loop failed: {err}").into())
    }
}

/// One host serving the node: its functions, containers and sockets.
struct Session {
    running: RunningHost,
    tasks: Arc<task::TaskHost>,
    relays: Arc<Relays>,
    server: Server,
    accepting: Accepting,
    control: UnixListener,
}

fn host_config(config: &NodeConfig, sinks: &Arc<stdio::ContainerSinks>) -> Result<HostConfig, Error> {
    Ok(HostConfig {
        // Functions listen in their pods. The host's own /healthz,
        // /readyz and /metrics (every tenant's function names) are served
        // only where the operator says (--metrics-listen).
        listen: config.metrics_listen,
        admin_socket: Some(config.state_dir.join("admin.sock")),
        state_dir: Some(config.state_dir.clone()),
        engine: config.engine.clone(),
        log_sink: sinks.clone(),
        drain_timeout: config.drain_timeout,
        persist_functions: false,
        front_door: config.front_door.clone(),
        ledger: config.ledger,
        keyvalue: config.keyvalue.clone(),
        pubsub: config.pubsub.clone(),
        kv_bytes_per_tenant: config.kv_bytes_per_tenant,
        peers: None,
        ..HostConfig::new()
    })
}

/// Bind a Unix socket at `path`, removing a stale file first.
fn bind_socket(path: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|err| anyhow::anyhow!("cannot listen on {}: {err}", path.display()).into())
}

fn unix_listener(fd: OwnedFd) -> Result<UnixListener, Error> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(anyhow::Error::from)?;
    Ok(UnixListener::from_std(listener).map_err(anyhow::Error::from)?)
}

impl Session {
    /// Start a host; serve containerd's socket, new or `carried` over from
    /// a host process before this one with everything it served.
    async fn open(config: &NodeConfig, carried: Option<(Snapshot, Descriptors)>) -> Result<Session, Error> {
        let sinks = Arc::new(stdio::ContainerSinks::default());
        let running = RunningHost::start(host_config(config, &sinks)?).await?;
        sinks.count_drops_in(running.host().metrics().clone());
        let publisher =
            match containerd_shim::asynchronous::publisher::RemotePublisher::new(&config.ttrpc_address).await {
                Ok(publisher) => publisher,
                Err(err) => {
                    let host = running.host().clone();
                    running.shutdown().await;
                    let _ = host.services().close_keyvalue();
                    return Err(anyhow::anyhow!(
                        "cannot reach containerd's event service at {}: {err}",
                        config.ttrpc_address
                    )
                    .into());
                }
            };
        let tasks = task::TaskHost::new(running.host().clone(), sinks, publisher, config);
        if carried.is_none() {
            tasks.forget_kept_wasm();
        }
        match Session::serve(config, &tasks, carried).await {
            Ok((relays, server, accepting, control)) => {
                tracing::info!(
                    socket = %config.socket.display(),
                    namespace = %config.namespace,
                    pid = std::process::id(),
                    "node host serving containerd"
                );
                Ok(Session { running, tasks, relays, server, accepting, control })
            }
            Err(err) => {
                // Let go of everything (the old host may take it back).
                tasks.stop_serving().await;
                let host = running.host().clone();
                running.shutdown().await;
                let _ = host.services().close_keyvalue();
                Err(err)
            }
        }
    }

    async fn serve(
        config: &NodeConfig,
        tasks: &Arc<task::TaskHost>,
        carried: Option<(Snapshot, Descriptors)>,
    ) -> Result<(Arc<Relays>, Server, Accepting, UnixListener), Error> {
        let (relays, incoming) = Relays::new();
        let mut server = Server::new().add_listener(incoming);
        for (name, methods) in task::services(tasks) {
            server = server.register_service([(name, methods)].into_iter().collect());
        }
        server.start().await.map_err(|err| anyhow::anyhow!("cannot start the ttrpc server: {err}"))?;
        let (listener, control) = match carried {
            None => (bind_socket(&config.socket)?, bind_socket(&control_socket(&config.socket))?),
            Some((snapshot, fds)) => {
                let mut fds = fds;
                tasks
                    .adopt((snapshot.sandboxes, snapshot.containers), &mut fds)
                    .await
                    .map_err(|err| anyhow::anyhow!("cannot take the containers over: {err}"))?;
                let listener = unix_listener(fds.take(snapshot.task_listener).map_err(anyhow::Error::from)?)?;
                let control = unix_listener(fds.take(snapshot.control_listener).map_err(anyhow::Error::from)?)?;
                for SavedConnection { socket, replay, partial } in snapshot.connections {
                    let socket = fds.take(socket).map_err(anyhow::Error::from)?;
                    let socket = std::os::unix::net::UnixStream::from(socket);
                    socket.set_nonblocking(true).map_err(anyhow::Error::from)?;
                    let socket = UnixStream::from_std(socket).map_err(anyhow::Error::from)?;
                    relays
                        .relay(socket, Some((replay, partial)))
                        .await
                        .map_err(|err| anyhow::anyhow!("cannot relay a containerd connection: {err}"))?;
                }
                (listener, control)
            }
        };
        let accepting = Accepting::start(listener, relays.clone());
        Ok((relays, server, accepting, control))
    }

    /// Wait for a stop signal or an upgrade request.
    async fn next(&mut self, signals: &mut StopSignals) -> Next {
        loop {
            tokio::select! {
                signal = signals.recv() => return Next::Stop(signal),
                accepted = self.control.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    match upgrade_request(stream).await {
                        Ok((stream, request)) => return Next::Upgrade(stream, request),
                        Err(why) => tracing::warn!("refused a control request: {why}"),
                    }
                }
            }
        }
    }

    /// Stop for good: containerd's connections close, every function
    /// drains.
    async fn stop(mut self, config: &NodeConfig) {
        let _ = self.server.shutdown().await;
        let _ = self.accepting.stop().await;
        self.tasks.stop_all().await;
        self.running.shutdown().await;
        let _ = std::fs::remove_file(&config.socket);
        let _ = std::fs::remove_file(control_socket(&config.socket));
    }

    /// Hand everything to a host process started from `exe`, telling
    /// `control` how it goes.
    async fn hand_over(mut self, mut control: UnixStream, request: UpgradeRequest, exe: &Path) -> Outcome {
        if let (Some(why), Some(after)) = (self.tasks.refuse_hand_over(), request.end_programs_after) {
            tell(&mut control, &format!("waiting up to {after:?} for programs and execs to end: {why}")).await;
            let deadline = Instant::now() + after;
            while self.tasks.refuse_hand_over().is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let ended = self.tasks.end_programs("ended by the node host's upgrade (its deadline passed)").await;
            if ended > 0 {
                tell(&mut control, &format!("ended {ended} programs and execs still running at the deadline")).await;
                // containerd removes the ended execs once it has their exits.
                let removed = Instant::now() + SETTLE_WAIT;
                while self.tasks.refuse_hand_over().is_some() && Instant::now() < removed {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if let Some(why) = self.tasks.refuse_hand_over() {
            tell(&mut control, &format!("error: cannot upgrade now: {why}")).await;
            return Outcome::Refused(Box::new(self));
        }
        let (mut link, mut child) = match start_new_host(exe) {
            Ok(started) => started,
            Err(err) => {
                tell(&mut control, &format!("error: cannot start {}: {err}", exe.display())).await;
                return Outcome::Refused(Box::new(self));
            }
        };
        tell(&mut control, &format!("started {} as pid {}", exe.display(), child.id())).await;
        let hello = blocking(move || {
            link.set_timeout(Some(HELLO_WAIT))?;
            let said = link.hear()?;
            Ok((link, said))
        })
        .await;
        let mut link = match hello {
            Ok((link, Said::Hello { pid, version })) => {
                tell(&mut control, &format!("new host pid {pid} (shoal {version}) is up; holding containerd's calls"))
                    .await;
                link
            }
            Ok((_, said)) => {
                end_child(child).await;
                tell(&mut control, &format!("error: the new host said {said:?} instead of hello")).await;
                return Outcome::Refused(Box::new(self));
            }
            Err(err) => {
                let why = match exit_status(&mut child).await {
                    Some(status) => format!("it exited ({status}) before saying hello"),
                    None => format!("it did not say hello ({err})"),
                };
                end_child(child).await;
                tell(
                    &mut control,
                    &format!("error: the new host did not start: {why}; its output is in this host's log"),
                )
                .await;
                return Outcome::Refused(Box::new(self));
            }
        };

        // Hold containerd's requests at a frame boundary and let the calls
        // under way finish (a `Wait` is carried over instead).
        let listener = match self.accepting.stop().await {
            Ok(listener) => listener,
            Err(err) => {
                end_child(child).await;
                tell(&mut control, &format!("error: {err:#}")).await;
                return Outcome::Refused(Box::new(self));
            }
        };
        self.relays.hold();
        let settle = Instant::now();
        let mut fds = Descriptors::default();
        let settled = loop {
            if self.relays.busy() == 0 && !self.tasks.stopping() {
                break match self.tasks.refuse_hand_over() {
                    Some(why) => Err(NotNow::Busy(why)),
                    None => self.tasks.save(&mut fds).map_err(NotNow::from),
                };
            }
            if settle.elapsed() > SETTLE_WAIT {
                break Err(NotNow::Unsettled(SETTLE_WAIT));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (sandboxes, containers) = match settled {
            Ok(saved) => saved,
            Err(why) => {
                self.relays.resume();
                self.accepting = Accepting::start(listener, self.relays.clone());
                end_child(child).await;
                tell(&mut control, &format!("error: cannot upgrade now: {why}")).await;
                return Outcome::Refused(Box::new(self));
            }
        };
        tracing::info!(took_ms = settle.elapsed().as_millis() as u64, "containerd's calls held for the hand-over");

        // From here on this host lets go; a failure takes everything back.
        let Session { running, tasks, relays, server, accepting: _, control: control_listener } = self;
        let connections = relays.detach().await;
        let task_listener = listener.into_std().map(|l| fds.add(OwnedFd::from(l)));
        let control_listener = control_listener.into_std().map(|l| fds.add(OwnedFd::from(l)));
        let connections: Vec<SavedConnection> = connections
            .into_iter()
            .map(|c| SavedConnection { socket: fds.add(c.socket), replay: c.replay, partial: c.partial })
            .collect();
        let (Ok(task_listener), Ok(control_listener)) = (task_listener, control_listener) else {
            // Without its listeners this host cannot go on either; the
            // snapshot it would take back would lack them too.
            tracing::error!("cannot take the listeners out of the event loop; stopping");
            std::process::exit(1);
        };
        let snapshot = Snapshot { sandboxes, containers, connections, task_listener, control_listener };
        tasks.stop_serving().await;
        let host = running.host().clone();
        running.shutdown().await;
        if let Err(err) = host.services().close_keyvalue() {
            tracing::error!(error = %err, "cannot close the key-value store for the new host");
        }
        drop(server);
        drop(tasks);
        tell(
            &mut control,
            &format!(
                "old host drained; handing over {} pod sandboxes, {} containers, {} containerd connections and {} \
                 waiting calls",
                snapshot.sandboxes.len(),
                snapshot.containers.len(),
                snapshot.connections.len(),
                snapshot.connections.iter().map(|c| c.replay.len()).sum::<usize>()
            ),
        )
        .await;
        let verdict = blocking(move || {
            link.send_snapshot(&snapshot, &fds)?;
            link.set_timeout(Some(VERDICT_WAIT))?;
            let said = link.hear();
            Ok((snapshot, fds, said))
        })
        .await;
        let (snapshot, fds, why) = match verdict {
            Ok((_, _, Ok(Said::Serving { pid }))) => {
                tell(&mut control, &format!("upgraded: pid {} handed the node to pid {pid}", std::process::id())).await;
                tracing::info!(new_pid = pid, "the new host serves the node; exiting");
                return Outcome::Upgraded;
            }
            Ok((snapshot, fds, Ok(Said::Failed { error }))) => (snapshot, fds, error),
            Ok((snapshot, fds, Ok(said))) => (snapshot, fds, format!("it answered {said:?}")),
            Ok((snapshot, fds, Err(err))) => (snapshot, fds, format!("it went silent ({err})")),
            Err(err) => {
                tracing::error!(error = %err, "the hand-over broke off before the snapshot was sent; stopping");
                std::process::exit(1);
            }
        };
        end_child(child).await;
        tracing::error!(why = %why, "the new host failed; taking the node back");
        tell(&mut control, &format!("error: the new host failed: {why}; the old host serves on")).await;
        Outcome::TakeBack((snapshot, fds))
    }
}

/// Why the node cannot be handed over now (told to `shoal node --upgrade`).
#[derive(Debug, thiserror::Error)]
enum NotNow {
    /// Something runs whose state cannot move (a program, an exec).
    #[error("{0}")]
    Busy(String),
    /// The containers could not be described for the next host.
    #[error(transparent)]
    Save(#[from] handover::HandoverError),
    /// containerd's calls under way did not finish in time.
    #[error("containerd's calls under way did not finish within {0:?}; try again")]
    Unsettled(Duration),
}

/// Run blocking hand-over I/O off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(std::io::Error::other)?
}

/// Write a progress line to `shoal node --upgrade` (and the log).
async fn tell(control: &mut UnixStream, line: &str) {
    tracing::info!("upgrade: {line}");
    let _ = control.write_all(format!("{line}\n").as_bytes()).await;
}

/// The new host's exit status, if it ends within a second.
async fn exit_status(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    for _ in 0..100 {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Kill the new host (if it still runs) and reap it: once it is gone, its
/// hold on the state directory is too.
async fn end_child(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

/// Start `exe` as the next host: this process's own arguments, plus the
/// descriptor of the hand-over link. It gets its own session (it outlives
/// this process) and this process's output (the host log).
fn start_new_host(exe: &Path) -> std::io::Result<(Link, std::process::Child)> {
    use std::os::unix::process::CommandExt as _;
    let (link, theirs) = Link::pair()?;
    let fd = theirs.as_raw_fd();
    let mut command = std::process::Command::new(exe);
    command.args(without_adopt_fd(std::env::args_os().skip(1))).arg("--adopt-fd").arg(fd.to_string());
    command.stdin(std::process::Stdio::null());
    // SAFETY: setsid and fcntl are async-signal-safe and touch no memory of
    // the parent; the descriptor is open (owned by `theirs` until spawn
    // returns).
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    drop(theirs);
    Ok((link, child))
}

/// Arguments less a previous `--adopt-fd N` (a host that was itself
/// started by an upgrade).
fn without_adopt_fd(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut kept = Vec::new();
    let mut skip_next = false;
    for arg in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        match arg.to_str() {
            Some("--adopt-fd") => skip_next = true,
            Some(text) if text.starts_with("--adopt-fd=") => {}
            _ => kept.push(arg),
        }
    }
    kept
}

/// The node hosts' sockets in `run_dir` (what `containerd-shim-shoal-v1`
/// starts them with).
pub fn node_sockets(run_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(anyhow::anyhow!("cannot list {}: {err}", run_dir.display()).into()),
    };
    let mut sockets: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "upgrade"))
        .map(|path| path.with_extension("sock"))
        .collect();
    sockets.sort();
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_host_gets_the_old_hosts_arguments_without_its_adopt_fd() {
        let args = ["node", "--socket", "/run/s.sock", "--adopt-fd", "7", "--adopt-fd=9", "--fuel", "off"];
        let kept = without_adopt_fd(args.iter().map(OsString::from));
        assert_eq!(kept, ["node", "--socket", "/run/s.sock", "--fuel", "off"].map(OsString::from));
        assert_eq!(
            control_socket(Path::new("/run/shoal/k8s.io-0123.sock")),
            Path::new("/run/shoal/k8s.io-0123.upgrade")
        );
    }
}
