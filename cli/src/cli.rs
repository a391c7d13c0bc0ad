//! The `shoal` command line: `serve` runs a host; `deploy`, `undeploy`,
//! `ls`, `invoke`, `usage` and `breakers` talk to a running host's admin socket.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::image::{ImageCommand, image_build, image_push, write_image};
use crate::scaffold::Language;
use report::{breakers, list, usage};
use shoal::admin::Client;
use shoal::engine::{EngineOptions, FuelMetering, LimitedPriority};
use shoal::host::{Backend, FrontDoor, HostConfig};
use shoal::logs::TracingSink;
use shoal::manifest::{FunctionSpec, Manifest};
use shoal::metering::{LedgerPolicy, UsageGrouping, UsageQuery};
use shoal::registry::DeployItem;
use shoal::server::RunningHost;
use shoal::signals::StopSignals;

/// Shoal: many sandboxed WebAssembly functions in one host process.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about, long_about = None)]
struct Cli {
    /// The host's admin socket [default: <state-dir>/admin.sock].
    #[arg(long, global = true, env = "SHOAL_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,

    /// Where the host keeps functions, compiled code and the usage ledger
    /// [default: $XDG_STATE_HOME/shoal or ~/.local/state/shoal].
    #[arg(long, global = true, env = "SHOAL_STATE_DIR")]
    state_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host, deploying the functions of a manifest (a shoal.toml, or
    /// a folder holding one) on top of those it already had.
    Serve {
        /// shoal.toml, or a folder with one.
        manifest: Option<PathBuf>,
        /// Address of the HTTP trigger.
        #[arg(long, default_value = "127.0.0.1:8080", env = "SHOAL_LISTEN")]
        listen: SocketAddr,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        backends: BackendArgs,
        /// A folder with one file per secret (also read: SHOAL_SECRET_<NAME>).
        #[arg(long, env = "SHOAL_SECRETS_DIR")]
        secrets_dir: Option<PathBuf>,
        /// Another host (its HTTP listener, host:port) on which a function
        /// that is not deployed here is invoked; repeat for several.
        /// Needs --peer-token-file.
        #[arg(long = "peer", env = "SHOAL_PEERS", value_delimiter = ',', requires = "peer_token_file")]
        peers: Vec<String>,
        /// A file holding the secret this host and its peers share: sent
        /// with the invokes this host makes, and required of the invokes
        /// it serves by name (without it, it serves none).
        #[arg(long, env = "SHOAL_PEER_TOKEN_FILE")]
        peer_token_file: Option<PathBuf>,
    },
    /// Serve containerd as the node's wasm runtime (started by
    /// containerd-shim-shoal-v1; rarely run by hand). With --upgrade, hand
    /// running node hosts over to the `shoal` binary now installed.
    Node {
        /// The ttrpc socket containerd connects to (with --upgrade: the
        /// host to upgrade; default every host in --run-dir).
        #[arg(long, required_unless_present = "upgrade")]
        socket: Option<PathBuf>,
        /// Hand every pod of the running node host over to a new host
        /// process started from the binary installed where the running one
        /// was started from, without containerd seeing a task exit; print
        /// the progress and exit.
        #[arg(long)]
        upgrade: bool,
        /// With --upgrade: a wasi:cli program or `kubectl exec` still running
        /// (its state cannot move to another process) refuses the upgrade,
        /// unless this says how long they may take to end; past it they are
        /// ended (exit 137, a line in their container's log), e.g. 60s.
        #[arg(long, requires = "upgrade", value_parser = humantime::parse_duration)]
        end_programs_after: Option<Duration>,
        /// Where containerd-shim-shoal-v1 keeps node host sockets (for --upgrade).
        #[arg(long, env = "SHOAL_RUN_DIR", default_value = "/run/shoal")]
        run_dir: PathBuf,
        /// The hand-over socket inherited from the host being upgraded
        /// (set by that host).
        #[arg(long, hide = true)]
        adopt_fd: Option<i32>,
        /// The containerd namespace served.
        #[arg(long, default_value = "k8s.io")]
        namespace: String,
        /// containerd's gRPC socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        containerd: PathBuf,
        /// containerd's ttrpc socket (task events) [default: <containerd>.ttrpc].
        #[arg(long)]
        ttrpc_address: Option<String>,
        /// The largest wasm file read out of a container's image, in MiB.
        #[arg(long, default_value_t = shoal_node::DEFAULT_MAX_WASM_BYTES >> 20, value_parser = clap::value_parser!(u64).range(1..=4096))]
        max_wasm_mb: u64,
        /// The node policy: what pods may grant themselves, per namespace
        /// (the built-in policy while the file does not exist).
        #[arg(long, env = "SHOAL_POLICY", default_value = shoal_node::DEFAULT_POLICY_PATH)]
        policy: PathBuf,
        /// Serve the host's /healthz, /readyz and /metrics on this address
        /// [default: nowhere]. /metrics names every tenant's functions:
        /// choose an address only the node's monitoring reaches.
        #[arg(long, env = "SHOAL_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        backends: BackendArgs,
    },
    /// Write a new function project (source, shoal.toml, the Runtime ABI's
    /// WIT) ready to build and serve.
    New {
        /// The function's name (lowercase letters, digits, '-').
        name: String,
        /// The language of the project.
        #[arg(long, value_enum, default_value = "rust")]
        lang: Language,
        /// Where to write it [default: ./<name>]; must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build and push wasm-in-OCI images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Deploy (or update) the functions of a manifest on a running host.
    Deploy {
        /// shoal.toml, or a folder with one.
        manifest: PathBuf,
    },
    /// Remove a function from a running host (its instances run `destroy`).
    Undeploy {
        /// The function's name.
        name: String,
    },
    /// List deployed functions, their versions and instances.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Call a function through the admin API and print its response body.
    Invoke {
        /// The function's name.
        name: String,
        /// Path (and query) of the request the function sees.
        #[arg(long, default_value = "/")]
        path: String,
        /// Request body.
        #[arg(long, short = 'd', conflicts_with = "data_file")]
        data: Option<String>,
        /// Read the request body from a file.
        #[arg(long)]
        data_file: Option<PathBuf>,
        /// Also print the status and headers (to stderr).
        #[arg(long, short = 'i')]
        include: bool,
    },
    /// Print usage totals per function from the host's ledger.
    Usage {
        /// Only this function.
        #[arg(long)]
        function: Option<String>,
        /// Only this tenant (a pod's namespace).
        #[arg(long)]
        tenant: Option<String>,
        /// One total per function, or per tenant (what an operator bills).
        #[arg(long, value_enum, default_value = "function")]
        by: UsageBy,
        /// Only requests since this time: RFC 3339 (2026-11-23T10:00:00Z) or an age (90s, 15m, 2h, 1d).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the circuit breakers of the host's functions and backends:
    /// each target endpoint's state, recent failures and short-circuited
    /// calls.
    Breakers {
        /// Only the breakers of this function.
        #[arg(long)]
        function: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where a host keeps key-value state and carries messages.
#[derive(Debug, clap::Args)]
struct BackendArgs {
    /// Keep key-value state in Redis (shared by hosts) instead of the
    /// embedded store: redis://host:port.
    #[arg(long, env = "SHOAL_KV_REDIS")]
    kv_redis: Option<String>,
    /// Carry pubsub messages through Redis streams (shared by hosts)
    /// instead of the in-process broker: redis://host:port.
    #[arg(long, env = "SHOAL_PUBSUB_REDIS")]
    pubsub_redis: Option<String>,
}

impl BackendArgs {
    /// The key-value and pubsub backends.
    fn backends(self) -> (Backend, Backend) {
        let backend = |url: Option<String>| url.map_or(Backend::Embedded, |url| Backend::Redis { url });
        (backend(self.kv_redis), backend(self.pubsub_redis))
    }
}

/// Options of every command that runs a host (`serve`, `node`).
#[derive(Debug, clap::Args)]
struct HostArgs {
    /// Which functions meter fuel: those that set fuel_per_request
    /// (`limited`: the others run faster, without fuel instrumentation),
    /// every function (`every-request`), or none (`off`: fuel_per_request
    /// is refused).
    #[arg(long, value_enum, default_value_t = FuelArg::Limited)]
    fuel: FuelArg,
    /// The same as --fuel off.
    #[arg(long, conflicts_with = "fuel")]
    no_fuel: bool,
    /// Instances alive at once, across all functions.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    max_instances: u32,
    /// Instances one function may hold at once, whatever its
    /// max_concurrency [default: a quarter of --max-instances].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_instances_per_function: Option<u32>,
    /// Instances one tenant (a pod's namespace) may keep busy at once,
    /// across all its functions [default: half of --max-instances].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_instances_per_tenant: Option<u32>,
    /// KiB of linear memory a freed instance slot keeps resident for the
    /// next instance of the same code (0: none). Makes a fresh instance per
    /// request cheaper (JavaScript functions) at the cost of idle RSS: up
    /// to this much per warm slot. Refused while swap is on: a page
    /// swapped out of a freed slot would not be reset for the next
    /// instance, of any tenant.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1 << 22))]
    keep_resident_kib: u64,
    /// Compile never-seen wasm with Cranelift before serving it. By default
    /// it is served at once from Winch's quickly compiled (slower) code,
    /// replaced by Cranelift's when that is ready (functions without fuel).
    #[arg(long)]
    no_tier_up: bool,
    /// How calls of functions with a CPU limit (cpu_millis, a pod's
    /// resources.limits.cpu) compete with the others: `idle` (their own
    /// threads at idle priority: they never delay other functions, and get
    /// only CPU left over) or `normal` (the same threads as every call).
    #[arg(long, value_enum, env = "SHOAL_CPU_LIMITED_PRIORITY", default_value_t = LimitedPriorityArg::Idle)]
    cpu_limited_priority: LimitedPriorityArg,
    /// Seconds that shutdown, undeploy, updates and SIGTERM of a container
    /// wait for requests to finish and destroy() to run.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    /// Log format on stderr. Which lines: `RUST_LOG` (default
    /// `info,cranelift=warn,wasmtime=warn`; `target=level` lists, or
    /// tracing's span and field directives).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// HTTP connections open at once, all listeners; past it new ones are closed.
    #[arg(long, default_value_t = FrontDoor::default().max_connections as u32, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Milliseconds a client has to send a request head (also the keep-alive idle timeout).
    #[arg(long, default_value_t = FrontDoor::default().header_read_timeout.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_ms: u64,
    /// Seconds of usage records per ledger file (the ledger rotates).
    #[arg(long, default_value_t = LedgerPolicy::default().partition.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    ledger_partition_secs: u64,
    /// MiB of key-value keys and values one tenant (namespace) may keep; 0: no limit.
    #[arg(long, default_value_t = shoal::host::DEFAULT_KV_BYTES_PER_TENANT >> 20)]
    kv_max_mb_per_tenant: u64,
    /// Days ledger files are kept.
    #[arg(long, default_value_t = LedgerPolicy::default().retention.as_secs() / 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    ledger_retention_days: u64,
}

/// `--cpu-limited-priority`: see [`LimitedPriority`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LimitedPriorityArg {
    Idle,
    Normal,
}

/// `--fuel`: see [`FuelMetering`].
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FuelArg {
    Off,
    Limited,
    EveryRequest,
}

/// What [`HostArgs`] set, once logging is started.
struct HostSettings {
    engine: EngineOptions,
    kv_bytes_per_tenant: Option<u64>,
    drain_timeout: Duration,
    front_door: FrontDoor,
    ledger: LedgerPolicy,
}

impl HostArgs {
    /// The engine's settings.
    fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            fuel: if self.no_fuel {
                FuelMetering::Off
            } else {
                match self.fuel {
                    FuelArg::Off => FuelMetering::Off,
                    FuelArg::Limited => FuelMetering::Limited,
                    FuelArg::EveryRequest => FuelMetering::EveryRequest,
                }
            },
            max_instances: self.max_instances,
            max_instances_per_function: self.max_instances_per_function,
            max_instances_per_tenant: self.max_instances_per_tenant,
            cache_dir: None,
            keep_resident_bytes: usize::try_from(self.keep_resident_kib.saturating_mul(1024)).unwrap_or(usize::MAX),
            tier_up: !self.no_tier_up,
            limited_priority: match self.cpu_limited_priority {
                LimitedPriorityArg::Idle => LimitedPriority::Idle,
                LimitedPriorityArg::Normal => LimitedPriority::Normal,
            },
        }
    }

    /// Start logging; return the settings for the host.
    fn apply(&self) -> HostSettings {
        init_tracing(self.log_format);
        HostSettings {
            engine: self.engine_options(),
            kv_bytes_per_tenant: (self.kv_max_mb_per_tenant > 0)
                .then(|| self.kv_max_mb_per_tenant.saturating_mul(1 << 20)),
            drain_timeout: Duration::from_secs(self.drain_timeout),
            front_door: FrontDoor {
                max_connections: self.max_connections as usize,
                header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
                ..FrontDoor::default()
            },
            ledger: LedgerPolicy {
                partition: Duration::from_secs(self.ledger_partition_secs),
                retention: Duration::from_secs(self.ledger_retention_days.saturating_mul(86_400)),
            },
        }
    }
}

pub(crate) fn parse_pair(text: &str) -> anyhow::Result<(String, String)> {
    text.split_once('=')
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| anyhow::anyhow!("{text:?}: write KEY=VALUE"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Run the CLI; errors are printed as `shoal: error: ...` with their causes.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("shoal: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        // The reader of our output went away (`shoal ls | head -1`): what
        // it wanted it has; that is not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shoal: error: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

/// `err` and its causes, as `{:#}` writes them, less a cause whose text
/// its error already ends with (an error that says `what: {source}` and
/// also keeps the source, so `Error::source` finds it).
fn report(err: &anyhow::Error) -> String {
    shoal::error_chain(err.as_ref())
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let state_dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    let admin_socket = cli.admin_socket.clone().unwrap_or_else(|| state_dir.join("admin.sock"));
    let client = Client::new(&admin_socket);
    match cli.command {
        Command::Serve { manifest, listen, host, backends, secrets_dir, peers, peer_token_file } => {
            shoal::server::private_files();
            let peers = peer_token_file.map(|file| read_peers(peers, &file)).transpose()?;
            let (keyvalue, pubsub) = backends.backends();
            let HostSettings { engine, kv_bytes_per_tenant, drain_timeout, front_door, ledger } = host.apply();
            let config = HostConfig {
                listen: Some(listen),
                admin_socket: Some(admin_socket),
                state_dir: Some(state_dir),
                engine,
                log_sink: Arc::new(TracingSink),
                drain_timeout,
                keyvalue,
                pubsub,
                secrets_dir,
                persist_functions: true,
                front_door,
                ledger,
                kv_bytes_per_tenant,
                peers,
            };
            serve(manifest.as_deref(), config).await
        }
        Command::Node { upgrade: true, socket, run_dir, end_programs_after, .. } => {
            let request = shoal_node::UpgradeRequest { end_programs_after };
            // Sockets found in the run directory may be left by hosts that
            // ended; one named by --socket must answer.
            let (sockets, skip_stale) = match socket {
                Some(socket) => (vec![socket], false),
                None => (shoal_node::node_sockets(&run_dir)?, true),
            };
            if sockets.is_empty() {
                anyhow::bail!("no node host runs here: {} holds no host sockets (see --run-dir)", run_dir.display());
            }
            let mut failed = 0;
            for socket in &sockets {
                if let Err(err) = shoal_node::upgrade(socket, request, skip_stale).await {
                    eprintln!("error: {err:#}");
                    failed += 1;
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} node hosts were not upgraded (each serves on as it was)", sockets.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Node {
            socket,
            namespace,
            containerd,
            ttrpc_address,
            max_wasm_mb,
            policy,
            metrics_listen,
            host,
            backends,
            adopt_fd,
            ..
        } => {
            let socket = socket.context("--socket is required")?;
            let HostSettings { engine, kv_bytes_per_tenant, drain_timeout, front_door, ledger } = host.apply();
            let (keyvalue, pubsub) = backends.backends();
            let ttrpc_address = ttrpc_address.unwrap_or_else(|| format!("{}.ttrpc", containerd.display()));
            let config = shoal_node::NodeConfig {
                socket,
                namespace,
                containerd,
                ttrpc_address,
                state_dir: cli.state_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/shoal/node")),
                engine,
                drain_timeout,
                max_wasm_bytes: max_wasm_mb << 20,
                metrics_listen,
                front_door,
                ledger,
                policy,
                keyvalue,
                pubsub,
                kv_bytes_per_tenant,
            };
            shoal_node::run(config, adopt_fd).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Image(ImageCommand::Build { wasm, tag, output, labels, env, artifact }) => {
            image_build(wasm, tag, output, labels, env, artifact)
        }
        Command::Image(ImageCommand::Push { layout, to, insecure }) => image_push(&layout, to, insecure).await,
        Command::Image(ImageCommand::Convert { layout, tag, output }) => {
            let (image, was) = shoal_images::Image::convert(&layout, tag.as_deref())?;
            eprintln!("{}: {was} image, listed for linux/amd64 and linux/arm64", layout.display());
            write_image(&image, &output)
        }
        Command::Image(ImageCommand::Installer { tag, output, bin_dir, busybox }) => {
            let bin_dir = match bin_dir {
                Some(dir) => dir,
                None => std::env::current_exe()
                    .context("cannot find this binary's folder: give --bin-dir")?
                    .parent()
                    .map(Path::to_path_buf)
                    .context("cannot find this binary's folder: give --bin-dir")?,
            };
            let spec = shoal_images::InstallerSpec { reference: tag, bin_dir, busybox };
            write_image(&shoal_images::Image::installer(&spec)?, &output)
        }
        Command::New { name, lang, dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let project = crate::scaffold::new_project(&name, lang, &dir)?;
            println!("created {name} ({}) in {}", lang.label(), project.dir.display());
            println!("  cd {}", project.dir.display());
            println!("  {}", project.build);
            println!("  shoal serve .        # then: curl http://127.0.0.1:8080/{name}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Deploy { manifest } => deploy(&client, &manifest).await,
        Command::Undeploy { name } => {
            let info = client.undeploy(&name).await?;
            writeln!(std::io::stdout(), "undeployed {} ({} version(s))", info.name, info.versions.len())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { json } => list(&client, json).await,
        Command::Invoke { name, path, data, data_file, include } => {
            let body = match (data, data_file) {
                (Some(data), _) => data.into_bytes(),
                (None, Some(file)) => {
                    std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?
                }
                (None, None) => Vec::new(),
            };
            invoke(&client, &name, &path, body, include).await
        }
        Command::Usage { function, tenant, by, since, json } => {
            let query = UsageQuery {
                function,
                tenant,
                since_unix_ms: since.as_deref().map(parse_since).transpose()?,
                by: match by {
                    UsageBy::Function => UsageGrouping::Function,
                    UsageBy::Tenant => UsageGrouping::Tenant,
                },
            };
            usage(&client, &query, json).await
        }
        Command::Breakers { function, json } => breakers(&client, function.as_deref(), json).await,
    }
}

/// `shoal deploy`: send a manifest's functions to the running host.
async fn deploy(client: &Client, manifest: &Path) -> anyhow::Result<ExitCode> {
    let items = load_manifest(manifest)?;
    let reports = client.deploy(items.into_iter().map(|item| (item.spec, item.wasm.to_vec())).collect()).await?;
    let mut out = std::io::stdout().lock();
    for report in reports {
        writeln!(out, "deployed {} version {} ({})", report.function, report.version, report.source)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `shoal invoke`: call a function through the admin API; its body goes to
/// stdout, and the exit code says whether it answered 2xx.
async fn invoke(client: &Client, name: &str, path: &str, body: Vec<u8>, include: bool) -> anyhow::Result<ExitCode> {
    let response = client.invoke(name, path, body).await?;
    // Function responses carry a request id; the admin API's own
    // errors (unknown function...) do not.
    if !response.headers.contains_key(shoal::request::REQUEST_ID_HEADER) {
        let message = serde_json::from_slice::<serde_json::Value>(&response.body)
            .ok()
            .and_then(|value| value.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&response.body).into_owned());
        anyhow::bail!("{message}");
    }
    if include {
        eprintln!("{}", response.status);
        for (name, value) in &response.headers {
            eprintln!("{name}: {}", value.to_str().unwrap_or("<binary>"));
        }
    }
    std::io::stdout().write_all(&response.body)?;
    Ok(if response.status.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// What `shoal usage` totals are per.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum UsageBy {
    Function,
    Tenant,
}

/// The peers of `shoal serve`, with the token read from `file` (at least
/// 16 bytes, its surrounding whitespace ignored).
fn read_peers(addrs: Vec<String>, file: &Path) -> anyhow::Result<shoal::abi::Peers> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read the peer token {}", file.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        anyhow::bail!("the peer token in {} is {} bytes: use at least 16 (a random one)", file.display(), token.len());
    }
    for addr in &addrs {
        if addr.rsplit_once(':').and_then(|(_, port)| port.parse::<u16>().ok()).is_none() {
            anyhow::bail!("--peer {addr:?} is not host:port");
        }
    }
    Ok(shoal::abi::Peers { addrs, token: token.into() })
}

async fn serve(manifest: Option<&Path>, config: HostConfig) -> anyhow::Result<ExitCode> {
    // Check the manifest before anything starts: a typo fails fast.
    let items = manifest.map(load_manifest).transpose()?;
    let mut signals = StopSignals::install().context("cannot install the SIGTERM/SIGINT handlers")?;
    let listen = config.listen.map(|addr| addr.to_string()).unwrap_or_default();
    // Ready (for `/readyz`) only once the manifest's functions are served.
    let running = match items {
        Some(items) => RunningHost::start_with(config, items)
            .await
            .context("cannot start the host with the manifest's functions")?,
        None => RunningHost::start(config).await.context("cannot start the host")?,
    };
    let addr = running.http_addr().map(|addr| addr.to_string()).unwrap_or_default();
    let functions = running.host().registry().list().await;
    println!("shoal: serving {} function(s) on http://{addr} (requested {listen})", functions.len());
    for function in &functions {
        for route in &function.routes {
            let (host, path) = match route.find('/') {
                Some(0) | None => (None, route.as_str()),
                Some(at) => (Some(&route[..at]), &route[at..]),
            };
            match host {
                Some(host) => println!("  {:<20} curl -H 'Host: {host}' http://{addr}{path}", function.name),
                None => println!("  {:<20} curl http://{addr}{path}", function.name),
            }
        }
    }
    println!("  {:<20} curl http://{addr}/metrics", "metrics");
    if let Some(socket) = running.admin_socket() {
        println!("  {:<20} shoal --admin-socket {} ls", "admin", socket.display());
    }
    println!("shoal: stop with Ctrl-C (SIGINT) or SIGTERM");

    let signal = signals.recv().await;
    tracing::info!("{signal}: draining");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Parse, validate and read the wasm of every function of a manifest.
pub(crate) fn load_manifest(path: &Path) -> anyhow::Result<Vec<DeployItem>> {
    let specs: Vec<FunctionSpec> = Manifest::load(path)?.resolve()?;
    specs
        .into_iter()
        .map(|spec| {
            let wasm = std::fs::read(&spec.wasm).with_context(|| {
                format!("function {:?}: cannot read its wasm {}", spec.name.as_str(), spec.wasm.display())
            })?;
            Ok(DeployItem { spec, wasm: wasm.into() })
        })
        .collect()
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("shoal");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/shoal"),
        None => PathBuf::from("/var/lib/shoal"),
    }
}

fn parse_since(text: &str) -> anyhow::Result<u64> {
    let at = match humantime::parse_duration(text) {
        Ok(age) => SystemTime::now().checked_sub(age).unwrap_or(UNIX_EPOCH),
        Err(_) => humantime::parse_rfc3339_weak(text)
            .map_err(|_| anyhow::anyhow!("--since {text:?}: expected an age (15m, 2h) or an RFC 3339 time"))?,
    };
    Ok(at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64)
}

/// The host's log filter when `RUST_LOG` is unset.
const DEFAULT_LOG_FILTER: &str = "info,cranelift=warn,wasmtime=warn";

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let directives = std::env::var("RUST_LOG").ok().filter(|value| !value.trim().is_empty());
    let directives = directives.as_deref().unwrap_or(DEFAULT_LOG_FILTER);
    // A filter by target and level (all `RUST_LOG` usually says) decides
    // once per call site. `EnvFilter`, needed only for its span and field
    // directives (`[span{field=value}]=level`), also takes a lock and a map
    // lookup at each span's creation, entry and exit, which is three times
    // per request at least; so it is used only when the directives need it.
    type Filter = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let default = || DEFAULT_LOG_FILTER.parse::<tracing_subscriber::filter::Targets>().unwrap_or_default();
    let (filter, per_span): (Filter, bool) = match directives.parse::<tracing_subscriber::filter::Targets>() {
        Ok(targets) => (targets.boxed(), false),
        Err(_) => match tracing_subscriber::EnvFilter::try_new(directives) {
            Ok(env) => (env.boxed(), true),
            Err(err) => {
                eprintln!("shoal: RUST_LOG={directives:?} is not a log filter ({err}); using {DEFAULT_LOG_FILTER:?}");
                (default().boxed(), false)
            }
        },
    };
    let ansi = std::io::stderr().is_terminal();
    let text = (format == LogFormat::Text && ansi)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(true));
    let plain = (format == LogFormat::Text && !ansi).then(|| {
        tracing_subscriber::fmt::layer().fmt_fields(OneWriteFields).with_writer(std::io::stderr).with_ansi(false)
    });
    let json = (format == LogFormat::Json)
        .then(|| tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_ansi(ansi));
    let subscriber = tracing_subscriber::registry().with(filter).with(text).with(plain).with(json);
    // Each request's span is made only if something logs inside it
    // (`shoal::spans`), except under `EnvFilter`: its span directives
    // decide what is on inside a span by seeing it entered, so there every
    // span is made at once.
    let _ = if per_span { subscriber.try_init() } else { shoal::spans::LazySpans::new(subscriber).try_init() };
}

/// The text log's fields, as `DefaultFields` writes them, but reaching
/// their destination in one write. The fmt layer formats each new span's
/// fields into an empty `String`, which then grows by doubling field by
/// field: five reallocations for every request's span, and the only
/// reallocations a W1 request made. Formatted first into a buffer the
/// thread keeps, they are copied into that `String` at its final size.
/// Not used on a terminal: a `Writer` of one's own cannot carry ANSI
/// styling (tracing-subscriber keeps that setter to itself).
struct OneWriteFields;

impl<'writer> tracing_subscriber::fmt::FormatFields<'writer> for OneWriteFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'writer>,
        fields: R,
    ) -> std::fmt::Result {
        use tracing_subscriber::fmt::format::{DefaultFields, Writer};
        /// A buffer grown past this by a long field is not kept.
        const KEPT_BYTES: usize = 16 << 10;
        thread_local! {
            static BUFFER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        BUFFER.with(|buffer| {
            // In use already (a field's formatting logged): write directly.
            let Ok(mut buffer) = buffer.try_borrow_mut() else {
                return DefaultFields::new().format_fields(writer, fields);
            };
            buffer.clear();
            let formatted = DefaultFields::new().format_fields(Writer::new(&mut *buffer), fields);
            let written = formatted.and_then(|()| writer.write_str(&buffer));
            if buffer.capacity() > KEPT_BYTES {
                *buffer = String::new();
            }
            written
        })
    }
}

mod report;
#[cfg(test)]
mod tests;
