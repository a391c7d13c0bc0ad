//! `containerd-shim-shoal-v1`: the containerd runtime v2 shim for Shoal.
//!
//! containerd starts one shim per container (`<shim> start`) and talks
//! ttrpc to whatever address it prints. This shim never serves a task
//! itself: `start` makes sure the node's one Shoal host (`shoal node`) is
//! running for this containerd and namespace, starting it when it is not,
//! and prints that host's socket. Every wasm container of the namespace is
//! then served by the one host process; this binary exits at once.
//!
//! `delete` is what containerd runs when it lets go of a shim connection:
//! after a task's or a pod sandbox's end (containerd 2.x runs it after
//! every `ShutdownSandbox`), and when a host died. It only unmounts a
//! rootfs the host left mounted and reports the task as killed; the node
//! host and its other pods are never touched.
//!
//! Settings come from the environment containerd passes on:
//! `SHOAL_BIN` (the `shoal` binary; default: next to this one),
//! `SHOAL_RUN_DIR` (sockets, locks, host logs; default `/run/shoal`),
//! `SHOAL_STATE_DIR` (compiled code cache and usage ledger; default
//! `/var/lib/shoal`).

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use containerd_shim::asynchronous::{Shim, publisher::RemotePublisher, run};
use containerd_shim::error::{Error, Result};
use containerd_shim::protos::bootstrap_api::{BootstrapParams, BootstrapResult};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::shim::shim::DeleteResponse;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::{Config, Flags, StartOpts};

/// How long `start` waits for a freshly started host to listen.
const HOST_START_TIMEOUT: Duration = Duration::from_secs(20);

/// containerd's exit status for a task that was killed (128 + SIGKILL).
const KILLED: u32 = 137;

struct ShoalShim {
    bundle: PathBuf,
}

/// The task service this binary would serve if containerd ever ran it as
/// a server. It does not: `start` hands out the node host's address.
/// Every call answers "not implemented" (the trait's defaults).
struct NotServed;

impl Task for NotServed {}

#[async_trait]
impl Shim for ShoalShim {
    type T = NotServed;

    async fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // Nothing runs under this process, so there is nothing to reap, and
        // `start`/`delete` write their answers on stdout: no logger there.
        config.no_sub_reaper = true;
        config.no_setup_logger = true;
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        ShoalShim { bundle }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String> {
        start(&opts.address, &opts.namespace, &opts.ttrpc_address, &self.bundle)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse> {
        // containerd is done with this container or pod (or the host that
        // served it died): what may be left behind is a rootfs mount. The
        // host serves every other pod on; it is not stopped here.
        let rootfs = self.bundle.join("rootfs");
        if let Some(rootfs) = rootfs.to_str()
            && rootfs_is_mounted(rootfs)
            && let Err(err) = containerd_shim::mount::umount_recursive(Some(rootfs), libc::MNT_DETACH)
        {
            eprintln!("containerd-shim-shoal-v1: cannot unmount {rootfs}: {err}");
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let mut exited_at = Timestamp::new();
        exited_at.seconds = now.as_secs() as i64;
        exited_at.nanos = now.subsec_nanos() as i32;
        Ok(DeleteResponse { exit_status: KILLED, exited_at: Some(exited_at).into(), ..Default::default() })
    }

    async fn wait(&mut self) {}

    async fn create_task_service(&self, _publisher: RemotePublisher) -> Self::T {
        NotServed
    }
}

/// Make sure the node host runs, record its address in the bundle and
/// return it.
fn start(address: &str, namespace: &str, ttrpc_address: &str, bundle: &std::path::Path) -> Result<String> {
    let node = NodeHost::for_containerd(address, namespace);
    node.ensure_running(address, namespace, ttrpc_address)?;
    let address = format!("unix://{}", node.socket.display());
    // containerd reads the address back from the bundle when it restarts
    // and reconnects to running tasks.
    std::fs::write(bundle.join("address"), &address)
        .map_err(|err| Error::Other(format!("cannot write the address file in {}: {err}", bundle.display())))?;
    Ok(address)
}

fn rootfs_is_mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|mounts| mounts.lines().any(|line| line.split(' ').nth(4) == Some(path)))
}

/// Where the node host of one containerd namespace lives.
struct NodeHost {
    socket: PathBuf,
    lock: PathBuf,
    log: PathBuf,
    state_dir: PathBuf,
}

impl NodeHost {
    fn for_containerd(address: &str, namespace: &str) -> NodeHost {
        let run_dir = env_path("SHOAL_RUN_DIR", "/run/shoal");
        let state_root = env_path("SHOAL_STATE_DIR", "/var/lib/shoal");
        // One host per (containerd, namespace). The name must be stable
        // across builds of this binary and short enough for a socket path,
        // so it carries a fixed hash of the containerd address.
        let name = format!("{namespace}-{:016x}", fnv1a(address.as_bytes()));
        NodeHost {
            socket: run_dir.join(format!("{name}.sock")),
            lock: run_dir.join(format!("{name}.lock")),
            log: run_dir.join(format!("{name}.log")),
            state_dir: state_root.join(name),
        }
    }

    fn is_serving(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    /// Start `shoal node` unless one already serves the socket. Concurrent
    /// starts (a burst of pods) take a lock so only one host is started.
    fn ensure_running(&self, address: &str, namespace: &str, ttrpc_address: &str) -> Result<()> {
        if self.is_serving() {
            return Ok(());
        }
        if let Some(dir) = self.socket.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|err| Error::Other(format!("cannot create {}: {err}", dir.display())))?;
        }
        // The lock and the host's log are root's alone (the log names every
        // tenant's functions and requests).
        let lock = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&self.lock)
            .map_err(|err| Error::Other(format!("cannot create {}: {err}", self.lock.display())))?;
        let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, err)| Error::Other(format!("cannot lock {}: {err}", self.lock.display())))?;
        if self.is_serving() {
            return Ok(());
        }
        let shoal = shoal_binary()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.log)
            .map_err(|err| Error::Other(format!("cannot open {}: {err}", self.log.display())))?;
        // (A log an older shim made kept the umask's mode.)
        log.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|err| Error::Other(format!("cannot make {} root's alone: {err}", self.log.display())))?;
        let log_err = log.try_clone().map_err(|err| Error::Other(err.to_string()))?;
        let mut command = Command::new(&shoal);
        command
            .arg("node")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace)
            .arg("--containerd")
            .arg(address)
            .arg("--ttrpc-address")
            .arg(ttrpc_address)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .current_dir("/")
            .stdin(Stdio::null())
            // containerd reads this process's output until EOF: the host
            // must not inherit it.
            .stdout(log)
            .stderr(log_err);
        // SAFETY: setsid is async-signal-safe and touches no memory of the
        // parent; the host gets its own session, so it outlives this shim
        // and is not signalled with containerd's process group.
        unsafe {
            command.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
        }
        let mut child = command
            .spawn()
            .map_err(|err| Error::Other(format!("cannot start the Shoal host {}: {err}", shoal.display())))?;
        let deadline = Instant::now() + HOST_START_TIMEOUT;
        while Instant::now() < deadline {
            if self.is_serving() {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Other(format!(
                    "the Shoal host exited during start ({status}); its log is {}",
                    self.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = child.kill();
        Err(Error::Other(format!(
            "the Shoal host did not listen on {} within {:?}; its log is {}",
            self.socket.display(),
            HOST_START_TIMEOUT,
            self.log.display()
        )))
    }
}

/// The task API version the node host serves to containerd 2.x
/// (`containerd.task.v3.Task`, and the Sandbox API beside it).
const TASK_API_VERSION: i32 = 3;

/// The largest bootstrap message read from containerd.
const MAX_BOOTSTRAP_BYTES: u64 = 1 << 20;

/// containerd 2.x's bootstrap parameters for this `start`, if it sent
/// them (1.x sends nothing, or a runtime options `Any`).
fn bootstrap_params(flags: &containerd_shim::Flags) -> Option<BootstrapParams> {
    use containerd_shim::protos::protobuf::Message as _;
    use std::io::{IsTerminal as _, Read as _};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return None;
    }
    let mut input = Vec::new();
    stdin.lock().take(MAX_BOOTSTRAP_BYTES).read_to_end(&mut input).ok()?;
    let params = BootstrapParams::parse_from_bytes(&input).ok()?;
    (params.instance_id == flags.id && params.namespace == flags.namespace).then_some(params)
}

/// The bootstrap result naming the node host's socket (`unix://...`).
fn bootstrap_result(address: &str) -> std::result::Result<Vec<u8>, containerd_shim::protos::protobuf::Error> {
    use containerd_shim::protos::protobuf::Message as _;
    let result = BootstrapResult {
        version: TASK_API_VERSION,
        address: address.to_string(),
        protocol: "ttrpc".to_string(),
        ..Default::default()
    };
    result.write_to_bytes()
}

fn shoal_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SHOAL_BIN") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().map_err(|err| Error::Other(format!("cannot find this binary: {err}")))?;
    let beside = me.with_file_name("shoal");
    if beside.exists() {
        return Ok(beside);
    }
    Err(Error::Other(format!("cannot find the `shoal` binary: not at {} and SHOAL_BIN is not set", beside.display())))
}

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name).filter(|value| !value.is_empty()).map_or_else(|| default.into(), PathBuf::from)
}

/// 64-bit FNV-1a. Hand-written (five lines) because the socket name must
/// not change between Rust releases, which rules out std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let flags = containerd_shim::parse(&args[1..]);
    // `-v` answers before the crate's `run`, which insists on a socket first.
    if let Ok(flags) = &flags
        && flags.version
    {
        println!(
            "containerd-shim-shoal-v1:\n  Runtime: io.containerd.shoal.v1\n  Version: {}",
            env!("CARGO_PKG_VERSION")
        );
        std::process::exit(0);
    }
    // `start` answers containerd 2.x (which sends its bootstrap parameters
    // on stdin) with a bootstrap result of task API version 3: the pod's
    // containers then reach the node host on the pod's connection, without
    // a `start` and a `delete` of this binary each. containerd 1.x sends
    // none and reads only the bare address (the crate's `run` would answer
    // it with JSON).
    if let Ok(flags) = &flags
        && flags.action == "start"
    {
        let bootstrap = bootstrap_params(flags);
        let ttrpc_address = match &bootstrap {
            Some(params) if !params.containerd_ttrpc_address.is_empty() => params.containerd_ttrpc_address.clone(),
            _ => std::env::var("TTRPC_ADDRESS").unwrap_or_else(|_| format!("{}.ttrpc", flags.address)),
        };
        let bundle = std::env::current_dir().unwrap_or_default();
        match start(&flags.address, &flags.namespace, &ttrpc_address, &bundle) {
            Ok(address) => {
                let reply = match bootstrap {
                    Some(_) => bootstrap_result(&address),
                    None => Ok(address.into_bytes()),
                };
                match reply {
                    Ok(reply) => {
                        use std::io::Write as _;
                        let mut stdout = std::io::stdout().lock();
                        let written = stdout.write_all(&reply).and_then(|()| stdout.flush());
                        std::process::exit(if written.is_ok() { 0 } else { 1 });
                    }
                    Err(err) => {
                        eprintln!("containerd-shim-shoal-v1: cannot encode the bootstrap result: {err}");
                        std::process::exit(1);
                    }
                }
            }
            Err(err) => {
                eprintln!("containerd-shim-shoal-v1: {err}");
                std::process::exit(1);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    match runtime {
        Ok(runtime) => runtime.block_on(run::<ShoalShim>("io.containerd.shoal.v1", None)),
        Err(err) => {
            eprintln!("containerd-shim-shoal-v1: cannot start: {err}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_containerd_namespace_gets_its_own_stable_socket() {
        let a = NodeHost::for_containerd("/run/containerd/containerd.sock", "k8s.io");
        let b = NodeHost::for_containerd("/run/containerd/containerd.sock", "default");
        let c = NodeHost::for_containerd("/tmp/other/containerd.sock", "k8s.io");
        assert_ne!(a.socket, b.socket);
        assert_ne!(a.socket, c.socket);
        // The FNV-1a test vector: the name must never change between builds.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert!(a.socket.as_os_str().len() < 100, "socket path fits sun_path");
    }
}
