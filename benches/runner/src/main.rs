//! `shoal-bench`: builds the peers, runs each workload against each of them
//! in one run on this machine, and writes `bench-results/latest.{json,md}`.
//!
//! Servers run pinned to CPU 0; the runner itself and the load generator
//! (`wrk`) run on CPU 1, so load and server never compete for a core. Every
//! figure comes from this run: ratios compare peers measured minutes apart
//! on the same machine, and load figures are the median of several runs
//! with the minimum and maximum beside them. Nothing here fails on a slow
//! result: the suite reports, it does not judge.

mod admin;
mod cold;
mod cpu;
mod density;
mod hello;
mod idle;
mod isolation;
mod keyvalue;
mod kubernetes;
mod peers;
mod profile;
mod report;
mod soak;
mod wrk;

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use clap::Parser;

/// Run Shoal's benchmark suite (W1–W8) and write the results table.
#[derive(Debug, Parser)]
#[command(name = "shoal-bench", version, about)]
pub struct Args {
    /// Workloads to run (w1..w8).
    #[arg(long, value_delimiter = ',', default_value = "w1,w2,w3,w4,w5,w6,w7,w8")]
    only: Vec<String>,
    /// Seconds per load run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Load runs per cell (median, min and max are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrency levels for W1.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<u32>,
    /// Samples per cold-start case (W4).
    #[arg(long, default_value_t = 30)]
    cold_samples: usize,
    /// Function counts for W5.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    density: Vec<usize>,
    /// At most this many distinct wasm binaries in W5 (each is compiled,
    /// ~0.1 s each; beyond it functions share binaries round-robin).
    #[arg(long, default_value_t = 1000)]
    distinct_wasm: usize,
    /// Pods started one after another in W7.
    #[arg(long, default_value_t = 10)]
    pods: usize,
    /// Where results go (relative to the repository).
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Run the soak and overload instead of the workloads (`make soak`):
    /// writes soak.{md,json} beside the results.
    #[arg(long)]
    soak: bool,
    /// Minutes of mixed load at 80% of capacity (with --soak).
    #[arg(long, default_value_t = 10)]
    soak_minutes: u64,
    /// Seconds of load at 10× capacity (with --soak).
    #[arg(long, default_value_t = 30)]
    overload_seconds: u64,
}

type Workload = fn(&peers::Tools, &Args) -> anyhow::Result<report::Section>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let workloads: [(&str, Workload); 8] = [
        ("w1", hello::run),
        ("w2", cpu::run),
        ("w3", keyvalue::run),
        ("w4", cold::run),
        ("w5", density::run),
        ("w6", isolation::run),
        ("w7", kubernetes::run),
        ("w8", idle::run),
    ];
    for wanted in &args.only {
        anyhow::ensure!(workloads.iter().any(|(id, _)| id == wanted), "unknown workload {wanted:?} (w1..w8)");
    }
    let root = repo_root()?;
    if args.soak {
        anyhow::ensure!(args.soak_minutes > 0, "--soak-minutes must be at least 1");
        let tools = peers::Tools::prepare(&root, false, false).context("preparing the peers")?;
        pin_to_cpu1()?;
        return soak::run(&tools, &args);
    }
    // W1 and W2 compare with `wasmtime serve`; only W1 has other languages.
    let with_wasmtime = args.only.iter().any(|w| w == "w1" || w == "w2");
    let with_languages = args.only.iter().any(|w| w == "w1");
    let tools = peers::Tools::prepare(&root, with_wasmtime, with_languages).context("preparing the peers")?;
    if args.only.iter().any(|w| w == "w7") {
        kubernetes::build(&tools).context("building the Kubernetes benchmark")?;
    }
    pin_to_cpu1()?;
    let mut report = report::Report::new(&tools.machine);
    for (id, workload) in workloads {
        if args.only.iter().any(|w| w == id) {
            report.add(workload(&tools, &args).with_context(|| format!("workload {id}"))?);
            // Keep what was measured so far even if a later workload fails.
            report.write(&root.join(&args.out))?;
        }
    }
    let out = root.join(&args.out);
    report.write(&out)?;
    eprintln!("results: {}/latest.md and latest.json", out.display());
    Ok(())
}

/// Move the runner (every thread) to CPU 1: the servers get CPU 0.
fn pin_to_cpu1() -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "taskset could not pin the runner to CPU 1");
    Ok(())
}

fn repo_root() -> anyhow::Result<PathBuf> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = here.join("../..").canonicalize()?;
    anyhow::ensure!(root.join("host").is_dir(), "cannot find the repository root from {}", here.display());
    Ok(root)
}
