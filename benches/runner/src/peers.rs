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
    /// `wasmtime serve` reusing each instance for every request: the
    /// upstream host's floor for this guest (hyper and wasmtime-wasi-http
    /// with nothing metered, recorded or logged per request).
    WasmtimeServeReuse,
    /// `shoal serve` with `hello` deployed (instances reused, metered).
    Shoal,
    /// The same with fuel metering off (`--no-fuel`; epochs still bound time).
    ShoalNoFuel,
    /// `shoal serve` with `functions/hello-js` (componentize-js; a fresh
    /// instance per request, as StarlingMonkey needs).
    ShoalJs,
    /// `shoal serve` with `functions/hello-py` (componentize-py).
    ShoalPython,
    /// `shoal serve` with `functions/hello-go` (stock Go + wit-bindgen).
    ShoalGo,
    /// `shoal serve` with `functions/hello-p3` (a WASI 0.3 component,
    /// `wasip3` bindings; on the concurrent engine).
    ShoalP3,
    /// `wasmtime serve` with `functions/hello-p3-plain` (WASI 0.3, no
    /// Shoal imports) and its defaults for 0.3: each instance reused for
    /// 128 requests, 16 at once.
    WasmtimeServeP3,
    /// `shoal serve` with `functions/hello-p3-plain` and its defaults
    /// (16 requests at once per instance), fuel metered.
    ShoalP3Plain,
}

impl Peer {
    /// The name in the results.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Native => "native-hyper",
            Peer::WasmtimeServe => "wasmtime-serve",
            Peer::WasmtimeServeReuse => "wasmtime-serve-reuse",
            Peer::Shoal => "shoal",
            Peer::ShoalNoFuel => "shoal-no-fuel",
            Peer::ShoalJs => "shoal-js",
            Peer::ShoalPython => "shoal-python",
            Peer::ShoalGo => "shoal-go",
            Peer::ShoalP3 => "shoal-wasi-0.3",
            Peer::WasmtimeServeP3 => "wasmtime-serve-0.3",
            Peer::ShoalP3Plain => "shoal-0.3-plain",
        }
    }
}

/// Built binaries and facts about the machine.
pub struct Tools {
    /// The repository.
    pub root: PathBuf,
    native: PathBuf,
    wasmtime: PathBuf,
    /// The release `shoal` binary.
    pub shoal: PathBuf,
    hello_wasm: PathBuf,
    /// One line about the machine, for the report.
    pub machine: String,
}

pub fn run(command: &mut Command) -> anyhow::Result<()> {
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
    /// A guest of `functions/` built for wasm32-wasip2 (release).
    pub fn guest(&self, name: &str) -> PathBuf {
        self.root.join(format!("functions/target/wasm32-wasip2/release/{name}.wasm"))
    }

    /// Install what is missing and build every peer (`wasmtime serve`
    /// only when `with_wasmtime`: it takes many minutes to build once; the
    /// JavaScript, Python and Go functions only when `with_languages`).
    pub fn prepare(root: &Path, with_wasmtime: bool, with_languages: bool) -> anyhow::Result<Tools> {
        if !have("wrk") || !have("taskset") {
            run(Command::new("apt-get").arg("update"))?;
            run(Command::new("apt-get").args(["install", "-y", "wrk", "util-linux"]))?;
        }
        let tools_dir = root.join("benches/.tools");
        let wasmtime = tools_dir.join("bin/wasmtime");
        let installed = Command::new(&wasmtime).arg("--version").output().ok();
        let current = installed.is_some_and(|out| String::from_utf8_lossy(&out.stdout).contains(WASMTIME_CLI_VERSION));
        if with_wasmtime && !current {
            eprintln!("installing wasmtime-cli {WASMTIME_CLI_VERSION} from crates.io (several minutes, once)");
            run(Command::new("cargo")
                .args(["install", "wasmtime-cli", "--version", WASMTIME_CLI_VERSION, "--locked", "--root"])
                .arg(&tools_dir))?;
        }
        run(Command::new("cargo").current_dir(root).args(["build", "--release", "--bin", "shoal"]))?;
        if with_languages {
            // W1's JavaScript, Python and Go rows (their toolchains install when missing).
            run(Command::new("make").current_dir(root).arg("lang-functions"))?;
        }
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
    state: Option<TempDir>,
    log: PathBuf,
}

/// A scratch folder removed on drop (no extra dependency for this).
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new empty folder under the system's temp dir.
    pub fn new(label: &str) -> anyhow::Result<TempDir> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("shoal-bench-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One `[[function]]` of a manifest the runner writes.
pub struct FunctionDef<'a> {
    pub name: &'a str,
    pub wasm: PathBuf,
    pub route: &'a str,
    /// A path that answers 200 once the function is deployed.
    pub probe: &'a str,
    /// Extra TOML lines after `[function.limits]`.
    pub limits: &'a str,
    /// Extra TOML lines after `[function.grants]`.
    pub grants: &'a str,
}

impl FunctionDef<'_> {
    fn toml(&self) -> String {
        format!(
            "[[function]]\nname = \"{}\"\nwasm = \"{}\"\nroutes = [\"{}\"]\n[function.limits]\n{}\n[function.grants]\n{}\n",
            self.name,
            self.wasm.display(),
            self.route,
            self.limits,
            self.grants
        )
    }
}

impl Server {
    /// Start `peer` serving `hello` and wait until `/hello` answers 200.
    pub fn start(tools: &Tools, peer: Peer) -> anyhow::Result<Server> {
        let hello = FunctionDef {
            name: "hello",
            wasm: tools.hello_wasm.clone(),
            route: "/hello",
            probe: "/hello",
            limits: "max_concurrency = 1000\nidle_timeout_s = 3600",
            grants: "",
        };
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let mut command = Command::new("taskset");
        command.args(["-c", "0"]);
        match peer {
            Peer::Native => {
                command.arg(&tools.native).arg(&addr);
            }
            Peer::WasmtimeServe => {
                // `-Scli`: Rust's std imports wasi:cli (environment, stdio).
                command.arg(&tools.wasmtime).args(["serve", "-Scli", "--addr", &addr]).arg(&tools.hello_wasm);
            }
            // One instance serves request after request (wasip2 calls do
            // not overlap, so concurrent requests get more of them).
            Peer::WasmtimeServeReuse => return Server::wasmtime_serve(tools, &tools.hello_wasm, "/hello", &[]),
            // Fuel metered for the request (hello sets no fuel limit, so
            // by default it would run without): W1 measures the host with
            // every meter on.
            Peer::Shoal => return Server::shoal(tools, &[hello], &["--fuel", "every-request"]),
            Peer::ShoalNoFuel => return Server::shoal(tools, &[hello], &["--fuel", "off"]),
            Peer::ShoalJs => {
                let js = FunctionDef {
                    wasm: tools.root.join("functions/target/lang/hello-js.wasm"),
                    limits: "max_concurrency = 1000\nidle_timeout_s = 3600\nmax_requests_per_instance = 1",
                    ..hello
                };
                return Server::shoal(tools, &[js], &[]);
            }
            Peer::ShoalPython => {
                let python = FunctionDef { wasm: tools.root.join("functions/target/lang/hello-py.wasm"), ..hello };
                return Server::shoal(tools, &[python], &[]);
            }
            Peer::ShoalGo => {
                let go = FunctionDef { wasm: tools.root.join("functions/target/lang/hello-go.wasm"), ..hello };
                return Server::shoal(tools, &[go], &[]);
            }
            Peer::ShoalP3 => {
                let p3 = FunctionDef { wasm: tools.guest("hello_p3"), ..hello };
                return Server::shoal(tools, &[p3], &["--fuel", "every-request"]);
            }
            Peer::WasmtimeServeP3 => {
                command
                    .arg(&tools.wasmtime)
                    .args(["serve", "-Scli", "-Sp3", "-Wcomponent-model-async", "--addr", &addr])
                    .arg(tools.guest("hello_p3_plain"));
            }
            Peer::ShoalP3Plain => {
                let p3 = FunctionDef { wasm: tools.guest("hello_p3_plain"), ..hello };
                return Server::shoal(tools, &[p3], &["--fuel", "every-request"]);
            }
        }
        Server::spawn(command, port, None, peer.name(), "/hello")
    }

    /// `wasmtime serve` (pinned to CPU 0) reusing one instance for every
    /// request, serving `wasm` with the extra `flags`; waits until `probe`
    /// answers 200.
    pub fn wasmtime_serve(tools: &Tools, wasm: &Path, probe: &str, flags: &[&str]) -> anyhow::Result<Server> {
        let port = free_port()?;
        let mut command = Command::new("taskset");
        command
            .args(["-c", "0"])
            .arg(&tools.wasmtime)
            .args(["serve", "-Scli", "--max-instance-reuse-count", "1000000000"])
            .args(flags)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .arg(wasm);
        Server::spawn(command, port, None, Peer::WasmtimeServeReuse.name(), probe)
    }

    /// `shoal serve` (pinned to CPU 0) with `functions` deployed from a
    /// manifest, in a fresh state directory; waits until the first
    /// function's route answers 200 (or, with no functions, `/healthz`).
    pub fn shoal(tools: &Tools, functions: &[FunctionDef], args: &[&str]) -> anyhow::Result<Server> {
        let port = free_port()?;
        let state = TempDir::new("shoal")?;
        let manifest = state.0.join("shoal.toml");
        std::fs::write(&manifest, functions.iter().map(FunctionDef::toml).collect::<String>())?;
        let mut command = Command::new("taskset");
        command
            .args(["-c", "0"])
            .arg(&tools.shoal)
            .arg("--state-dir")
            .arg(&state.0)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(args);
        if !functions.is_empty() {
            command.arg(&manifest);
        }
        let probe = functions.first().map_or("/healthz", |f| f.probe);
        Server::spawn(command, port, Some(state), "shoal", probe)
    }

    fn spawn(
        mut command: Command,
        port: u16,
        state: Option<TempDir>,
        name: &str,
        probe: &str,
    ) -> anyhow::Result<Server> {
        let log = std::env::temp_dir().join(format!("shoal-bench-{name}-{port}.log"));
        command.stdout(Stdio::null()).stderr(std::fs::File::create(&log)?);
        let child = command.spawn().with_context(|| format!("spawning {command:?}"))?;
        let server = Server { child, port, state, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(port, probe).map(|(status, _)| status) != Some(200) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{name} did not answer {probe} on port {port} within 60 s; its stderr:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// The server's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A Shoal server's admin socket.
    pub fn admin_socket(&self) -> Option<PathBuf> {
        self.state.as_ref().map(|state| state.0.join("admin.sock"))
    }

    /// A Shoal server's state directory.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state.as_ref().map(|state| state.0.as_path())
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `wrk` on `path` with `connections` for `seconds`; its sample and the
    /// server's CPU per completed request over it, in µs.
    pub fn load(&self, path: &str, connections: u32, seconds: u64) -> anyhow::Result<(crate::wrk::Sample, f64)> {
        let before = self.cpu_seconds()?;
        let sample = crate::wrk::run(&self.url(path), connections, seconds)?;
        let cpu_us = (self.cpu_seconds()? - before) * 1e6 / sample.requests.max(1) as f64;
        Ok((sample, cpu_us))
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

/// The order in which `servers` servers, all up at once, take their
/// `runs` turns: `(run, server)`, each round loading every server once and
/// starting one server later than the round before. This machine's speed
/// drifts by tens of percent within minutes, so rows compared with each
/// other are measured in the same minutes, and no server always follows
/// the same one. An idle server costs the loaded one nothing measurable
/// (W8: an idle Shoal host uses 0.01 ms of CPU a second; the other peers
/// have no timers).
pub fn turns(runs: usize, servers: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..runs).flat_map(move |run| (0..servers).map(move |turn| (run, (turn + run) % servers)))
}

/// One HTTP/1.1 GET to 127.0.0.1:`port` (a fresh connection); the status
/// and body, or `None` when nothing answered. Hand-written on std: the
/// probes time first responses in microseconds, and a client library's
/// connection pool or runtime would be part of what is timed.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = stream.set_nodelay(true);
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let status = reply.split(' ').nth(1)?.parse().ok()?;
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let chunked = head.lines().any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Some((status, if chunked { dechunk(body) } else { body.to_string() }))
}

/// The data of a chunked HTTP/1.1 body (a guest that sets no length
/// answers in chunks). The host's tests have the same few lines: this
/// workspace does not link their crate.
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

/// Resident and proportional set size of a process, in KiB
/// (`/proc/<pid>/smaps_rollup`).
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| {
        text.lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("Rss:"), field("Pss:")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_round_loads_every_server_once_starting_one_later() {
        let order: Vec<_> = turns(3, 3).collect();
        assert_eq!(order, [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 0), (2, 2), (2, 0), (2, 1)]);
        assert_eq!(turns(2, 1).collect::<Vec<_>>(), [(0, 0), (1, 0)]);
        assert_eq!(turns(0, 4).count(), 0);
    }

    #[test]
    fn a_chunked_body_is_read_whole() {
        assert_eq!(dechunk("6\r\n222201\r\n0\r\n\r\n"), "222201");
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
