//! Fixtures for the Kubernetes path: a real containerd (2.3.4 from
//! `target/tools`, or Debian's 1.6.20) with a private root, state and
//! socket, the CRI plugin, a CNI bridge and the `shoal` runtime; a real OCI registry (`docker-registry`) on
//! loopback; a CRI client; and a way into a pod's network namespace.
//!
//! Traffic goes only to 127.0.0.0/8 or, from inside a pod's namespace, to
//! that pod's own addresses.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

use crate::support::{guest, shoal_bin};

mod config;
mod pod;
mod refused;

use config::{config_v1_6, config_v2_3, moved_node_config};
pub use pod::{Pod, PodOptions};
pub use refused::PodRefused;

/// The runtime handler the tests' containerd knows Shoal by.
pub const HANDLER: &str = "shoal";

/// Tests on one machine-wide resource (network namespaces, bridges) run
/// one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// The shim binary, built next to `shoal` by `make test`
/// (`cargo build --workspace --bins`).
pub fn shim_bin() -> PathBuf {
    let shim = Path::new(shoal_bin()).with_file_name("containerd-shim-shoal-v1");
    assert!(
        shim.is_file(),
        "{} is missing: build it first (`cargo build -p containerd-shim-shoal`; `make test` does)",
        shim.display()
    );
    shim
}

/// A wasm guest built for wasm32-wasip1 (a classic command module).
pub fn guest_p1(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = crate::support::functions_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .current_dir(&dir)
            .args(["build", "--release", "--target", "wasm32-wasip1", "-p", "cli-hello", "--target-dir"])
            .arg(dir.join("target"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building cli-hello for wasm32-wasip1 failed");
    });
    let path = crate::support::functions_dir().join(format!("target/wasm32-wasip1/release/{name}.wasm"));
    assert!(path.is_file(), "no wasip1 guest {}", path.display());
    path
}

/// `shoal image build` through the real CLI.
pub fn build_image(wasm: &Path, tag: &str, out: &Path, extra: &[&str]) {
    let output = Command::new(shoal_bin())
        .args(["image", "build"])
        .arg(wasm)
        .args(["--tag", tag, "--output"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(output.status.success(), "shoal image build: {}", String::from_utf8_lossy(&output.stderr));
}

/// A `docker-registry` on a free loopback port.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// A `docker-registry` on a free loopback port.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is installed (make test-deps)");
        wait_for(&format!("registry on {addr}"), Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Registry { child, addr, _dir: dir }
    }

    /// Build `wasm` into an image named `<registry>/<name>` and push it
    /// with `shoal image push`.
    pub fn push(&self, wasm: &Path, name: &str, extra: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let tag = format!("{}/{name}", self.addr);
        let out = dir.path().join("image.tar");
        build_image(wasm, &tag, &out, extra);
        let output = Command::new(shoal_bin()).args(["image", "push", "--insecure"]).arg(&out).output().unwrap();
        assert!(output.status.success(), "shoal image push: {}", String::from_utf8_lossy(&output.stderr));
        tag
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which containerd a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// containerd 2.3.4, the long-term-support line every supported
    /// Kubernetes runs on (installed into `target/tools` by `make test`).
    V2,
    /// Debian's containerd 1.6.20: the check that older nodes keep working.
    V1_6,
}

/// How the CRI of a containerd 2.x runs Shoal's pod sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sandboxer {
    /// containerd's Sandbox API served by the node host: no pause
    /// container (`sandboxer = "shim"`, what the installer sets on 2.x).
    Shim,
    /// The CRI's own controller, which runs a pause container through the
    /// task API (`"podsandbox"`, containerd's default; the only one on 1.x).
    PodSandbox,
}

/// containerd 2.3.4's binaries (containerd, ctr, the runc shim, crictl),
/// as `make containerd2` installs them.
pub fn containerd2_bin_dir() -> PathBuf {
    let dir = crate::support::functions_dir().join("../target/tools/containerd-2.3.4/bin");
    assert!(
        dir.join("containerd").is_file(),
        "{} has no containerd 2.3.4: install it first (`make containerd2`; `make test` does)",
        dir.display()
    );
    dir
}

/// What a test's containerd is.
#[derive(Debug, Clone)]
pub struct ContainerdOptions<'a> {
    /// Which containerd release to run.
    pub release: Release,
    /// On 2.x, how Shoal's pod sandboxes run (1.6 has only the pause container).
    pub sandboxer: Sandboxer,
    /// More environment for containerd (and so the shim and Shoal host).
    pub env: &'a [(&'a str, &'a str)],
    /// A node's own containerd 2.x config (as `containerd config default`
    /// writes it, plus whatever was installed), run as it is but for its
    /// node paths, moved into the test's folder: root, state, sockets, CNI,
    /// the pause image and registries. `sandboxer` is then the config's.
    pub node_config: Option<&'a str>,
}

impl Default for ContainerdOptions<'_> {
    fn default() -> Self {
        ContainerdOptions { release: Release::V2, sandboxer: Sandboxer::Shim, env: &[], node_config: None }
    }
}

/// A containerd of the test's own.
pub struct Containerd {
    /// Its private root, state, config and logs (removed with it).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// Its socket.
    pub address: PathBuf,
    /// Where the shim keeps node host sockets and logs.
    pub run_dir: PathBuf,
    /// Where CRI container logs go.
    pub log_dir: PathBuf,
    /// The release it runs.
    pub release: Release,
    /// Who owns pod sandboxes.
    pub sandboxer: Sandboxer,
    /// Where its binaries are (`None`: on the PATH, Debian's 1.6).
    bin_dir: Option<PathBuf>,
    bridge: String,
    /// The second and third octets of its bridge's subnet, `10.x.y.0/24`.
    subnet: (u8, u8),
    /// More environment for containerd (and so the shim and Shoal host).
    env: Vec<(String, String)>,
}

impl Containerd {
    /// Start containerd 2.3.4 with the Sandbox API; `registry` is reachable
    /// over plain HTTP, and its `shoal-test/pause:1` image is the pause image.
    pub fn start(registry: Option<&Registry>) -> Containerd {
        Containerd::start_with(registry, ContainerdOptions::default())
    }

    /// Start containerd 2.3.4 with `env` added to its environment, which
    /// the shim and the Shoal host it starts inherit.
    pub fn start_with_env(registry: Option<&Registry>, env: &[(&str, &str)]) -> Containerd {
        Containerd::start_with(registry, ContainerdOptions { env, ..Default::default() })
    }

    /// Start the containerd `options` describe.
    pub fn start_with(registry: Option<&Registry>, options: ContainerdOptions<'_>) -> Containerd {
        let dir = tempfile::Builder::new().prefix("shoal-ctd").tempdir().unwrap();
        let net = NEXT_NET.fetch_add(1, Ordering::SeqCst) + std::process::id() % 50 * 4;
        let bridge = format!("shoalt{}", net % 1000);
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(shim_bin(), bin.join("containerd-shim-shoal-v1")).unwrap();
        let cni = dir.path().join("cni");
        std::fs::create_dir_all(&cni).unwrap();
        let octets = ((200 + net / 250 % 50) as u8, (net % 250) as u8);
        let subnet = format!("10.{}.{}.0/24", octets.0, octets.1);
        std::fs::write(
            cni.join("10-shoal-test.conflist"),
            format!(
                r#"{{"cniVersion":"0.4.0","name":"shoal-test","plugins":[{{"type":"bridge","bridge":"{bridge}","isGateway":true,"isDefaultGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{subnet}"}}]],"dataDir":"{}"}}}}]}}"#,
                dir.path().join("ipam").display()
            ),
        )
        .unwrap();
        let address = dir.path().join("containerd.sock");
        let pause = registry.map_or_else(|| "none".into(), |r| format!("{}/shoal-test/pause:1", r.addr));
        let config = match (options.release, options.node_config) {
            (Release::V2, Some(node)) => moved_node_config(node, dir.path(), &address, &pause, &cni, registry),
            (Release::V2, None) => config_v2_3(dir.path(), &address, &pause, &cni, registry, options.sandboxer),
            (Release::V1_6, _) => config_v1_6(dir.path(), &address, &pause, &cni, registry),
        };
        if let Some(registry) = registry {
            registry.push(&guest("hello"), "shoal-test/pause:1", &[]);
        }
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let run_dir = dir.path().join("shoal-run");
        let log_dir = dir.path().join("pod-logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let env = options.env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let bin_dir = (options.release == Release::V2).then(containerd2_bin_dir);
        let sandboxer = if options.release == Release::V2 { options.sandboxer } else { Sandboxer::PodSandbox };
        let mut containerd = Containerd {
            child: None,
            address,
            run_dir,
            log_dir,
            release: options.release,
            sandboxer,
            bin_dir,
            bridge,
            subnet: octets,
            dir,
            env,
        };
        containerd.launch();
        containerd
    }

    /// The path of one of this containerd's programs (`containerd`, `ctr`,
    /// `crictl`, `containerd-shim-runc-v2`).
    pub fn program(&self, name: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    fn launch(&mut self) {
        // Its own runc shim (2.x) before Debian's, Shoal's shim first.
        let release_bin = self.bin_dir.as_ref().map(|dir| format!("{}:", dir.display())).unwrap_or_default();
        let path = format!(
            "{}:{release_bin}/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.dir.path().join("bin").display()
        );
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("containerd.log")).unwrap();
        let _ = std::fs::remove_file(&self.address);
        let child = Command::new(self.program("containerd"))
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .env("PATH", path)
            .env("SHOAL_BIN", shoal_bin())
            .env("SHOAL_RUN_DIR", &self.run_dir)
            .env("SHOAL_STATE_DIR", self.dir.path().join("shoal-state"))
            // The built-in policy until a test writes this file.
            .env("SHOAL_POLICY", self.policy_file())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info,cranelift=warn,wasmtime=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd is installed (make test-deps)");
        self.child = Some(child);
        let address = self.address.clone();
        wait_for("containerd's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&address).is_ok()
        });
    }

    /// Stop containerd (SIGTERM) and start it again with the same state.
    pub fn restart(&mut self) {
        self.stop_daemon();
        self.launch();
    }

    fn stop_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The address of its bridge (the pods' gateway, on the host), which
    /// the bridge gets with its first pod.
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::new(10, self.subnet.0, self.subnet.1, 1)
    }

    /// The node policy the Shoal host reads (absent at first).
    pub fn policy_file(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    /// `ctr` against this containerd.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        self.ctr_command(namespace).args(args).output().unwrap()
    }

    /// A `ctr` command against this containerd, in `namespace`.
    pub fn ctr_command(&self, namespace: &str) -> Command {
        let mut command = Command::new(self.program("ctr"));
        command.arg("--address").arg(&self.address).args(["--namespace", namespace]);
        command
    }

    /// `crictl` (the kubelet's CRI client, 1.36) against this containerd's CRI.
    pub fn crictl(&self, args: &[&str]) -> Output {
        let endpoint = format!("unix://{}", self.address.display());
        Command::new(containerd2_bin_dir().join("crictl"))
            .args(["--runtime-endpoint", &endpoint, "--image-endpoint", &endpoint, "--timeout", "60s"])
            .args(args)
            .output()
            .unwrap()
    }

    /// containerd's own pid (while it runs).
    #[allow(dead_code, reason = "used by the W7 benchmark (host/benches/kubernetes.rs)")]
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|child| child.id() as i32)
    }

    /// The pids of the Shoal node hosts this containerd's shims started.
    pub fn node_hosts(&self) -> Vec<i32> {
        let needle = self.run_dir.display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            if args.iter().any(|a| a == "node") && args.iter().any(|a| a.contains(&needle)) {
                pids.push(pid);
            }
        }
        pids
    }

    /// How many processes run this containerd's shim binary right now.
    pub fn shim_processes(&self) -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().parse::<i32>().is_ok())
            .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
            .filter(|cmdline| String::from_utf8_lossy(cmdline).contains("containerd-shim-shoal-v1"))
            .count()
    }

    /// The node host's log (to explain a failure).
    pub fn host_log(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.run_dir) {
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
                }
            }
        }
        text
    }

    /// containerd's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// A CRI client (what the kubelet uses).
    pub async fn cri(&self) -> Cri {
        let channel = containerd_client::connect(&self.address).await.expect("CRI socket");
        Cri { runtime: RuntimeServiceClient::new(channel.clone()), images: ImageServiceClient::new(channel) }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Pods first (the CRI frees their namespaces and addresses), then
        // containerd, then the hosts it started.
        if self.child.is_some() {
            let address = self.address.clone();
            let cleanup = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    let Ok(channel) = containerd_client::connect(&address).await else { return };
                    let mut cri = RuntimeServiceClient::new(channel);
                    if let Ok(pods) = cri.list_pod_sandbox(ListPodSandboxRequest::default()).await {
                        for pod in pods.into_inner().items {
                            let id = pod.id.clone();
                            let _ = cri.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id.clone() }).await;
                            let _ = cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id }).await;
                        }
                    }
                });
            });
            let _ = cleanup.join();
        }
        self.stop_daemon();
        for pid in self.node_hosts() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        // Leftover rootfs mounts of killed hosts, then the bridge.
        let root = self.dir.path().display().to_string();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut targets: Vec<&str> =
                mounts.lines().filter_map(|line| line.split(' ').nth(4)).filter(|t| t.starts_with(&root)).collect();
            targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
            for target in targets {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).stderr(Stdio::null()).status();
    }
}

/// The kubelet's starting point: a registry holding `wasm` as image
/// `name` (built with `extra` options), a containerd using it, a CRI
/// client, and the image pulled. Returns the image's full name last.
pub async fn cri_node(wasm: &Path, name: &str, extra: &[&str]) -> (Registry, Containerd, Cri, String) {
    cri_node_with(ContainerdOptions::default(), wasm, name, extra).await
}

/// [`cri_node`] on the containerd `options` describe.
pub async fn cri_node_with(
    options: ContainerdOptions<'_>,
    wasm: &Path,
    name: &str,
    extra: &[&str],
) -> (Registry, Containerd, Cri, String) {
    let registry = Registry::start();
    let image = registry.push(wasm, name, extra);
    let containerd = Containerd::start_with(Some(&registry), options);
    let mut cri = containerd.cri().await;
    cri.pull(&image).await;
    (registry, containerd, cri, image)
}

/// The CRI's two services.
pub struct Cri {
    /// The CRI runtime service.
    pub runtime: RuntimeServiceClient<Channel>,
    /// The CRI image service.
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Pull `image` through the CRI, as the kubelet does.
    pub async fn pull(&mut self, image: &str) {
        let request = PullImageRequest {
            image: Some(ImageSpec { image: image.into(), ..Default::default() }),
            ..Default::default()
        };
        self.images.pull_image(request).await.unwrap_or_else(|status| panic!("PullImage {image}: {status}"));
    }

    /// RunPodSandbox with the `shoal` handler, CreateContainer, StartContainer.
    pub async fn run_pod(
        &mut self,
        log_dir: &Path,
        name: &str,
        image: &str,
        annotations: &[(&str, &str)],
        memory_limit: i64,
    ) -> Pod {
        let options = PodOptions { annotations, memory_limit, ..PodOptions::new(name, image) };
        self.try_run_pod(log_dir, options).await.unwrap_or_else(|status| panic!("{status}"))
    }

    /// Run a pod as `options` say; a refused call is its status.
    pub async fn try_run_pod(&mut self, log_dir: &Path, options: PodOptions<'_>) -> Result<Pod, PodRefused> {
        let PodOptions {
            namespace,
            name,
            container: container_name,
            image,
            annotations,
            memory_limit,
            mounts,
            env,
            dns_servers,
            dns_searches,
            cpu_millis,
            command,
        } = options;
        let log_directory = log_dir.join(format!("{namespace}-{name}"));
        std::fs::create_dir_all(&log_directory).unwrap();
        let annotations: HashMap<String, String> =
            annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{namespace}-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            dns_config: (!dns_servers.is_empty()).then(|| DnsConfig {
                servers: dns_servers.iter().map(std::string::ToString::to_string).collect(),
                searches: dns_searches.iter().map(std::string::ToString::to_string).collect(),
                ..Default::default()
            }),
            log_directory: log_directory.display().to_string(),
            annotations: annotations.clone(),
            linux: Some(LinuxPodSandboxConfig::default()),
            ..Default::default()
        };
        let began = Instant::now();
        let sandbox = self
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: HANDLER.into() })
            .await
            .map_err(PodRefused::by("RunPodSandbox"))?
            .into_inner()
            .pod_sandbox_id;
        let container_config = ContainerConfig {
            metadata: Some(ContainerMetadata { name: container_name.into(), attempt: 0 }),
            image: Some(ImageSpec { image: image.into(), ..Default::default() }),
            log_path: "web.log".into(),
            command: command.iter().map(std::string::ToString::to_string).collect(),
            annotations,
            envs: env.iter().map(|(key, value)| KeyValue { key: key.to_string(), value: value.to_string() }).collect(),
            mounts: mounts
                .iter()
                .map(|(host, container, readonly)| Mount {
                    host_path: host.display().to_string(),
                    container_path: container.to_string(),
                    readonly: *readonly,
                    ..Default::default()
                })
                .collect(),
            linux: Some(LinuxContainerConfig {
                resources: Some(LinuxContainerResources {
                    memory_limit_in_bytes: memory_limit,
                    // As the kubelet writes a CPU limit: a CFS quota per 100 ms.
                    cpu_period: if cpu_millis > 0 { 100_000 } else { 0 },
                    cpu_quota: cpu_millis * 100,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox_time = began.elapsed();
        let container = self
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(container_config),
                sandbox_config: Some(config.clone()),
            })
            .await;
        let container = match container {
            Ok(created) => created.into_inner().container_id,
            Err(status) => {
                // Leave nothing behind for the next test.
                let _ = self.runtime.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: sandbox.clone() }).await;
                let _ =
                    self.runtime.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: sandbox.clone() }).await;
                return Err(PodRefused::by("CreateContainer")(status));
            }
        };
        let create_time = began.elapsed() - sandbox_time;
        self.runtime
            .start_container(StartContainerRequest { container_id: container.clone() })
            .await
            .map_err(PodRefused::by("StartContainer"))?;
        let call_times = [sandbox_time, create_time, began.elapsed() - sandbox_time - create_time];
        let status = self
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest { pod_sandbox_id: sandbox.clone(), verbose: true })
            .await
            .unwrap()
            .into_inner();
        let ip = status.status.as_ref().and_then(|s| s.network.as_ref()).map(|n| n.ip.clone()).unwrap_or_default();
        let info: serde_json::Value = serde_json::from_str(status.info.get("info").expect("verbose info")).unwrap();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|namespaces| namespaces.iter().find(|ns| ns["type"] == "network"))
            .and_then(|ns| ns["path"].as_str())
            .map_or_else(|| panic!("the sandbox has a network namespace: {info}"), PathBuf::from);
        Ok(Pod {
            sandbox_id: sandbox,
            container_id: container,
            netns,
            ip,
            log_file: log_directory.join("web.log"),
            call_times,
        })
    }

    /// Wait until the CRI plugin has finished initializing (after a
    /// containerd restart it answers "not initialized" for a moment).
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.runtime.status(StatusRequest::default()).await.is_err() {
            assert!(Instant::now() < deadline, "the CRI did not come back after a restart");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The container's CRI state and exit code.
    pub async fn container_state(&mut self, id: &str) -> (i32, i32) {
        let status = self
            .runtime
            .container_status(ContainerStatusRequest { container_id: id.into(), verbose: false })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        (status.state, status.exit_code)
    }

    /// Stop and remove the pod and its container, as the kubelet does.
    pub async fn remove_pod(&mut self, pod: &Pod) {
        self.runtime.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: pod.sandbox_id.clone() }).await.unwrap();
        self.runtime
            .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: pod.sandbox_id.clone() })
            .await
            .unwrap();
    }
}

/// An HTTP/1.1 GET sent from inside `netns` (a pod's network namespace)
/// to `addr` there; returns the status code and body.
pub fn get_in_netns(netns: &Path, addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let netns = std::fs::File::open(netns)?;
    let addr = addr.to_string();
    let path = path.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let mut stream = std::net::TcpStream::connect(&addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n")?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = head.lines().any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
        Ok((status, if chunked { dechunk(body) } else { body.to_string() }))
    })
    .join()
    .expect("netns thread")
}

/// The data of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut data = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        data.push_str(&rest[..size]);
        body = rest[size..].strip_prefix("\r\n").unwrap_or(&rest[size..]);
    }
    data
}

/// A free TCP port on the loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Wait (polling) until `ready`, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} not ready within {timeout:?}");
}

/// Poll `check` until it holds (or fail after `timeout`, with `explain`).
pub async fn until(timeout: Duration, mut check: impl FnMut() -> bool, explain: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not met within {timeout:?}: {}", explain());
}
