//! Shared fixtures: guests built once, hosts on loopback, small clients.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use shoal::engine::EngineOptions;
use shoal::host::HostConfig;
use shoal::logs::{MemorySink, OwnedLine};
use shoal::manifest::{FunctionSpec, Limits, Route};
use shoal::registry::{DeployItem, DeployReport};
use shoal::server::RunningHost;

/// The repository's `functions/` folder.
pub fn functions_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../functions")
}

/// The path of a built guest, building all guests once per test process.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = functions_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = std::process::Command::new(cargo)
            .current_dir(&dir)
            .args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"])
            .arg(dir.join("target"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the guests in functions/ failed");
    });
    // Libraries' files use `_` for `-`; binaries keep the crate name.
    let release = functions_dir().join("target/wasm32-wasip2/release");
    let path = [name.replace('-', "_"), name.to_string()]
        .into_iter()
        .map(|stem| release.join(format!("{stem}.wasm")))
        .find(|path| path.is_file());
    path.unwrap_or_else(|| panic!("no guest {name} in {}", release.display()))
}

/// A spec for guest `wasm` deployed as `name` on `route`.
pub fn spec(name: &str, wasm: &str, route: &str) -> FunctionSpec {
    FunctionSpec {
        name: shoal::manifest::FunctionName::new(name).expect("valid name"),
        version: None,
        wasm: guest(wasm),
        routes: vec![Route::parse(route).expect("valid route")],
        weight: 100,
        limits: Limits::default(),
        grants: Default::default(),
        tenant: Default::default(),
        pod: None,
        env: Default::default(),
    }
}

/// A deploy item read from the spec's wasm.
pub fn item(spec: FunctionSpec) -> DeployItem {
    let wasm = std::fs::read(&spec.wasm).expect("guest readable");
    DeployItem { spec, wasm: wasm.into() }
}

/// A host on a free loopback port, with guest output captured.
pub struct TestHost {
    /// The host, serving.
    pub running: RunningHost,
    /// Every guest log line it wrote.
    pub logs: Arc<MemorySink>,
    /// An HTTP client for its listener.
    pub client: reqwest::Client,
    /// Its state directory, kept as long as the host.
    pub state: Option<tempfile::TempDir>,
}

/// The folder of the build profile the running test or benchmark was
/// built in (`target/debug`, `target/release`): cargo puts the test
/// executables in its `deps/`, and the workspace's binaries beside it.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the executable's folder");
    deps.parent().map(Path::to_path_buf).expect("cargo's profile folder above deps/")
}

/// A compile cache shared by all tests of this process (keeps them fast).
fn shared_cache() -> PathBuf {
    let dir = profile_dir().join("../tmp/shoal-test-cache");
    std::fs::create_dir_all(&dir).expect("cache dir");
    dir
}

impl TestHost {
    /// A host with no state directory.
    pub async fn start() -> TestHost {
        TestHost::start_with(None).await
    }

    /// A host persisting into a fresh state directory.
    pub async fn start_persistent() -> TestHost {
        let state = tempfile::tempdir().expect("tempdir");
        let mut host = TestHost::start_with(Some(state.path().to_path_buf())).await;
        host.state = Some(state);
        host
    }

    /// A host with `state_dir` (or none).
    pub async fn start_with(state_dir: Option<PathBuf>) -> TestHost {
        TestHost::start_full(state_dir, |_| {}).await
    }

    /// A host without state, its config adjusted by `configure`.
    pub async fn start_configured(configure: impl FnOnce(&mut HostConfig)) -> TestHost {
        TestHost::start_full(None, configure).await
    }

    /// A host with `state_dir`, its config adjusted by `configure` first.
    pub async fn start_full(state_dir: Option<PathBuf>, configure: impl FnOnce(&mut HostConfig)) -> TestHost {
        let logs = Arc::new(MemorySink::default());
        let config = HostConfig {
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            admin_socket: state_dir.as_ref().map(|dir| dir.join("admin.sock")),
            state_dir,
            engine: EngineOptions {
                fuel: shoal::engine::FuelMetering::default(),
                max_instances: 64,
                max_instances_per_function: None,
                max_instances_per_tenant: None,
                cache_dir: Some(shared_cache()),
                keep_resident_bytes: 0,
                // Off, so instance counts and hooks stay deterministic; tiering up has
                // its own tests (`tier_up`).
                tier_up: false,
                ..EngineOptions::default()
            },
            log_sink: logs.clone(),
            drain_timeout: Duration::from_secs(10),
            ..HostConfig::new()
        };
        let mut config = config;
        configure(&mut config);
        let running = RunningHost::start(config).await.expect("host starts");
        TestHost { running, logs, client: reqwest::Client::new(), state: None }
    }

    /// Deploy `specs`, panicking on a refusal.
    pub async fn deploy(&self, specs: Vec<FunctionSpec>) -> Vec<DeployReport> {
        self.try_deploy(specs).await.expect("deploy succeeds")
    }

    /// Deploy `specs`; the registry's answer.
    pub async fn try_deploy(&self, specs: Vec<FunctionSpec>) -> Result<Vec<DeployReport>, shoal::Error> {
        self.running.host().registry().deploy(specs.into_iter().map(item).collect()).await
    }

    /// The URL of `path` on its listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.http_addr().expect("a test host listens"))
    }

    /// GET `path` and read the whole answer.
    pub async fn get(&self, path: &str) -> Reply {
        let response = self.client.get(self.url(path)).send().await.expect("request reaches the host");
        Reply::read(response).await
    }

    /// Live instances of every version of `function`.
    pub async fn live_instances(&self, function: &str) -> usize {
        let functions = self.running.host().registry().list().await;
        functions.iter().filter(|f| f.name == function).flat_map(|f| f.versions.iter()).map(|v| v.stats.live).sum()
    }

    /// Lines `function` wrote, in order.
    pub fn lines_of(&self, function: &str) -> Vec<OwnedLine> {
        self.logs.lines().into_iter().filter(|line| line.function == function).collect()
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body, as text.
    pub body: String,
}

impl Reply {
    /// Read `response` whole.
    pub async fn read(response: reqwest::Response) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.expect("body readable");
        Reply { status, headers, body }
    }

    /// Header `name`, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-shoal-error` header: which limit or failure.
    pub fn error_kind(&self) -> Option<&str> {
        self.header("x-shoal-error")
    }
}

/// Poll `condition` until it holds or `timeout` passes.
/// A real HTTP/1.1 server on loopback whose every answer is the body
/// `answer` makes of the request; its address.
pub async fn upstream(
    answer: impl Fn(&hyper::Request<hyper::body::Incoming>) -> String + Clone + Send + Sync + 'static,
) -> std::net::SocketAddr {
    upstream_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(), answer)
}

/// [`upstream`] on `listener`.
pub fn upstream_on(
    listener: tokio::net::TcpListener,
    answer: impl Fn(&hyper::Request<hyper::body::Incoming>) -> String + Clone + Send + Sync + 'static,
) -> std::net::SocketAddr {
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let body = answer(&request);
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Check `condition` until it holds (true) or `timeout` passes (false).
pub async fn eventually<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `shoal serve` process (the real binary).
pub struct HostProcess {
    /// The `shoal serve` process.
    pub child: std::process::Child,
    /// Its listener's address.
    pub addr: String,
    /// Its state directory.
    pub state_dir: PathBuf,
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

/// The `shoal` binary, built beside the tests (`cargo test --workspace`
/// builds every binary of the workspace with the tests).
pub fn shoal_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = profile_dir().join("shoal");
        assert!(
            bin.is_file(),
            "{} is missing: build it first (`cargo build -p shoal-cli`; `make test` does)",
            bin.display()
        );
        bin.display().to_string()
    })
}

/// Write a manifest with `body` into `dir` and return its path.
pub fn write_manifest(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("shoal.toml");
    std::fs::write(&path, body).expect("manifest written");
    path
}

/// A `[[function]]` entry for guest `wasm` deployed as `name` on `route`.
pub fn manifest_entry(name: &str, wasm: &str, route: &str) -> String {
    format!("[[function]]\nname = \"{name}\"\nwasm = \"{}\"\nroutes = [\"{route}\"]\n", guest(wasm).display())
}

impl HostProcess {
    /// Start `shoal serve [manifest]` on a free port with `state_dir`, and
    /// wait until it prints its address.
    pub fn spawn(state_dir: &Path, manifest: Option<&Path>) -> HostProcess {
        HostProcess::spawn_with_env(state_dir, manifest, &[])
    }

    /// [`HostProcess::spawn`] with extra environment variables.
    pub fn spawn_with_env(state_dir: &Path, manifest: Option<&Path>, env: &[(&str, &str)]) -> HostProcess {
        HostProcess::launch(state_dir, manifest, env, &[], None, None)
    }

    /// [`HostProcess::spawn`] with extra options for `shoal serve`.
    pub fn spawn_with_args(state_dir: &Path, manifest: Option<&Path>, args: &[&str]) -> HostProcess {
        HostProcess::launch(state_dir, manifest, &[], args, None, None)
    }

    /// [`HostProcess::spawn`] on one CPU alone (`taskset`; the first this
    /// process may use), as a node that gives the host one CPU: its
    /// runtime then has one worker thread.
    pub fn spawn_on_one_cpu(state_dir: &Path, manifest: Option<&Path>) -> HostProcess {
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("this process's CPUs");
        let cpu = (0..nix::sched::CpuSet::count())
            .find(|&cpu| allowed.is_set(cpu).unwrap_or(false))
            .expect("a CPU this process may use");
        HostProcess::launch(state_dir, manifest, &[], &[], Some(cpu), None)
    }

    /// `shoal serve [args] [manifest]` on a free port chosen here,
    /// returned at once: before it listens, deploys or is ready (for what
    /// clients see while it starts).
    pub fn spawn_without_waiting(state_dir: &Path, manifest: Option<&Path>, args: &[&str]) -> HostProcess {
        HostProcess::launch(state_dir, manifest, &[], args, None, Some(crate::cluster::free_port()))
    }

    /// Start `shoal serve`: on `port` and returned at once, or on a port
    /// of its own and returned once it says it serves.
    fn launch(
        state_dir: &Path,
        manifest: Option<&Path>,
        env: &[(&str, &str)],
        args: &[&str],
        cpu: Option<usize>,
        port: Option<u16>,
    ) -> HostProcess {
        use std::io::BufRead as _;
        let mut command = match cpu {
            // taskset execs the host: the child is the host itself.
            Some(cpu) => {
                let mut taskset = std::process::Command::new("taskset");
                taskset.arg("--cpu-list").arg(cpu.to_string()).arg(shoal_bin());
                taskset
            }
            None => std::process::Command::new(shoal_bin()),
        };
        command.envs(env.iter().copied());
        let listen = format!("127.0.0.1:{}", port.unwrap_or(0));
        command.arg("--state-dir").arg(state_dir).arg("serve").args(["--listen", &listen]).args(args);
        if let Some(manifest) = manifest {
            command.arg(manifest);
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(state_dir.join("host.log")).expect("log file"))
            .spawn()
            .expect("shoal serve starts");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let addr = match port {
            Some(_) => listen,
            // It prints its address once it serves.
            None => {
                let mut line = String::new();
                loop {
                    line.clear();
                    let read = stdout.read_line(&mut line).expect("stdout readable");
                    assert!(read > 0, "shoal serve exited before serving: {:?}", child.wait());
                    if let Some(rest) = line.split("on http://").nth(1) {
                        break rest.split_whitespace().next().expect("address").to_string();
                    }
                }
            }
        };
        HostProcess { child, addr, state_dir: state_dir.to_path_buf(), _stdout: stdout }
    }

    /// The URL of `path` on its listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the host wrote to stderr (its log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("host.log")).unwrap_or_default()
    }

    /// Run a `shoal` CLI command against this host's admin socket.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(shoal_bin())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .output()
            .expect("shoal runs")
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::SIGTERM)
            .expect("signal");
        self.child.wait().expect("reaped")
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real `redis-server` on a free loopback port, stopped on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    /// Its `redis://` URL.
    pub url: String,
    port: u16,
    persistent: bool,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Every key the server holds (`redis-cli --scan`).
    pub fn keys(&self) -> Vec<String> {
        let output = std::process::Command::new("redis-cli").args(["-u", &self.url, "--scan"]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect()
    }

    /// A server that keeps nothing on disk.
    pub async fn start() -> RedisServer {
        RedisServer::launch(false).await
    }

    /// A server that writes every command to its append-only file before
    /// answering (`appendfsync always`), so what it acknowledged survives
    /// a restart.
    pub async fn start_persistent() -> RedisServer {
        RedisServer::launch(true).await
    }

    async fn launch(persistent: bool) -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut server = RedisServer {
            child: None,
            url: format!("redis://127.0.0.1:{port}"),
            port,
            persistent,
            dir: tempfile::tempdir().unwrap(),
        };
        server.start_again().await;
        server
    }

    /// Stop the server (SIGTERM: it finishes writing what it has).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// Start it again on the same port and folder.
    pub async fn start_again(&mut self) {
        let persistence: &[&str] =
            if self.persistent { &["--appendonly", "yes", "--appendfsync", "always"] } else { &["--appendonly", "no"] };
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(persistence)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (the README's test command installs it)");
        self.child = Some(child);
        let port = self.port;
        let ready = eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        assert!(ready, "redis-server did not come up on port {port}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
