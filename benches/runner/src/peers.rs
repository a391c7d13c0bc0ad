//! The servers compared: a native hyper server (the ceiling), `wasmtime
//! serve` 48 (what a user would pick instead), and Shoal — all serving the
//! same `functions/hello` component where wasm is involved.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// The wasmtime-cli version `wasmtime serve` comes from (Shoal's wasmtime).
pub const WASMTIME_CLI_VERSION: &str = "48.0.8";

/// A server under test.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    /// `benches/native-hello` (hyper, no wasm).
    Native,
    /// `wasmtime serve hello.wasm` (a new instance per request).
    WasmtimeServe,
    /// `shoal serve` with `hello` deployed (instances reused, metered).
    Shoal,
}

impl Peer {
    /// The name in the results.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Native => "native-hyper",
            Peer::WasmtimeServe => "wasmtime-serve",
            Peer::Shoal => "shoal",
        }
    }
}

/// Built binaries and facts about the machine.
pub struct Tools {
    root: PathBuf,
    native: PathBuf,
    wasmtime: PathBuf,
    shoal: PathBuf,
    hello_wasm: PathBuf,
    /// One line about the machine, for the report.
    pub machine: String,
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {command:?}");
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    anyhow::ensure!(status.success(), "{command:?} failed with {status}");
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Tools {
    /// Install what is missing and build every peer.
    pub fn prepare(root: &Path) -> anyhow::Result<Tools> {
        if !have("wrk") || !have("taskset") {
            run(Command::new("apt-get").arg("update"))?;
            run(Command::new("apt-get").args(["install", "-y", "wrk", "util-linux"]))?;
        }
        let tools_dir = root.join("benches/.tools");
        let wasmtime = tools_dir.join("bin/wasmtime");
        let installed = Command::new(&wasmtime).arg("--version").output().ok();
        let current = installed.is_some_and(|out| String::from_utf8_lossy(&out.stdout).contains(WASMTIME_CLI_VERSION));
        if !current {
            eprintln!("installing wasmtime-cli {WASMTIME_CLI_VERSION} from crates.io (several minutes, once)");
            run(Command::new("cargo")
                .args(["install", "wasmtime-cli", "--version", WASMTIME_CLI_VERSION, "--locked", "--root"])
                .arg(&tools_dir))?;
        }
        run(Command::new("cargo").current_dir(root).args(["build", "--release", "--bin", "shoal"]))?;
        run(Command::new("cargo").current_dir(root.join("functions")).args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
        ]))?;
        run(Command::new("cargo").current_dir(root.join("benches")).args([
            "build",
            "--release",
            "-p",
            "native-hello",
        ]))?;
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".to_string());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        Ok(Tools {
            root: root.to_path_buf(),
            native: root.join("benches/target/release/native-hello"),
            wasmtime,
            shoal: root.join("target/release/shoal"),
            hello_wasm: root.join("functions/target/wasm32-wasip2/release/hello.wasm"),
            machine: format!("{cores} cores, {cpu}"),
        })
    }
}

/// A running server pinned to CPU 0; stopped on drop.
pub struct Server {
    child: Child,
    port: u16,
    _state: Option<TempDir>,
}

/// A scratch folder removed on drop (no extra dependency for this).
pub struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    /// Start `peer` and wait until `/hello` answers 200.
    pub fn start(tools: &Tools, peer: Peer) -> anyhow::Result<Server> {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let log = std::env::temp_dir().join(format!("shoal-bench-{}-{port}.log", peer.name()));
        let mut command = Command::new("taskset");
        command.args(["-c", "0"]).stdout(Stdio::null()).stderr(std::fs::File::create(&log)?);
        let mut state = None;
        match peer {
            Peer::Native => {
                command.arg(&tools.native).arg(&addr);
            }
            Peer::WasmtimeServe => {
                // `-Scli`: Rust's std imports wasi:cli (environment, stdio).
                command.arg(&tools.wasmtime).args(["serve", "-Scli", "--addr", &addr]).arg(&tools.hello_wasm);
            }
            Peer::Shoal => {
                let dir = std::env::temp_dir().join(format!("shoal-bench-{port}"));
                std::fs::create_dir_all(&dir)?;
                let manifest = dir.join("shoal.toml");
                std::fs::write(
                    &manifest,
                    format!(
                        "[[function]]\nname = \"hello\"\nwasm = \"{}\"\nroutes = [\"/hello\"]\n\
                         [function.limits]\nmax_concurrency = 1000\nidle_timeout_s = 3600\n",
                        tools.hello_wasm.display()
                    ),
                )?;
                command
                    .arg(&tools.shoal)
                    .arg("--state-dir")
                    .arg(&dir)
                    .args(["serve", "--listen", &addr])
                    .arg(&manifest);
                command.current_dir(&tools.root);
                state = Some(TempDir(dir));
            }
        }
        let child = command.spawn().with_context(|| format!("spawning {command:?}"))?;
        let server = Server { child, port, _state: state };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !server.answers() {
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not answer on {addr} within 60 s; its stderr:\n{stderr}",
                peer.name()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        if stream.write_all(b"GET /hello HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").is_err() {
            return false;
        }
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        reply.starts_with("HTTP/1.1 200")
    }

    /// CPU time (user + system) the server process has used, in seconds.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the parenthesised command name; utime and stime are
        // the 14th and 15th fields of the line, in clock ticks.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let per_second = Command::new("getconf").arg("CLK_TCK").output()?;
        let per_second: f64 = String::from_utf8_lossy(&per_second.stdout).trim().parse().unwrap_or(100.0);
        Ok(ticks / per_second)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
