//! `shoal-bench`: builds the peers, runs each workload against each of them
//! in one run on this machine, and writes `bench-results/latest.{json,md}`.
//!
//! Servers run pinned to CPU 0 and the load generator (`wrk`) to CPU 1, so
//! they do not compete for a core. Every figure is the median of several
//! runs, with the minimum and maximum beside it; ratios compare peers
//! measured in the same run. Nothing here fails on a slow result: the suite
//! reports, it does not judge.

mod peers;
mod report;
mod wrk;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

/// Run the benchmark suite.
#[derive(Debug, Parser)]
#[command(name = "shoal-bench", version, about)]
struct Args {
    /// Seconds per load run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Load runs per cell (median, min and max are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrency levels for W1.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<u32>,
    /// Where results go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = repo_root()?;
    let tools = peers::Tools::prepare(&root).context("preparing the peers")?;
    let mut report = report::Report::new(&tools.machine);
    eprintln!("W1: hello-world HTTP ({} runs x {} s per cell)", args.runs, args.duration);
    for peer in [peers::Peer::Native, peers::Peer::WasmtimeServe, peers::Peer::Shoal] {
        let server = peers::Server::start(&tools, peer).with_context(|| format!("starting {}", peer.name()))?;
        for &connections in &args.concurrency {
            let mut samples = Vec::new();
            for run in 0..args.runs {
                let cpu_before = server.cpu_seconds()?;
                let sample = wrk::run(&server.url("/hello"), connections, args.duration)?;
                let cpu = server.cpu_seconds()? - cpu_before;
                let cpu_us_per_request = cpu * 1e6 / sample.requests.max(1) as f64;
                eprintln!(
                    "  {:<14} c={:<3} run {}: {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  {:>6.1} CPU-µs/req",
                    peer.name(),
                    connections,
                    run + 1,
                    sample.requests_per_second,
                    sample.p50_us,
                    sample.p99_us,
                    cpu_us_per_request
                );
                samples.push(report::W1Sample { sample, cpu_us_per_request });
            }
            report.add_w1(peer.name(), connections, &samples);
        }
        drop(server);
    }
    let out = root.join(&args.out);
    report.write(&out)?;
    eprintln!("results: {}/latest.md and latest.json", out.display());
    Ok(())
}

fn repo_root() -> anyhow::Result<PathBuf> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = here.join("../..").canonicalize()?;
    anyhow::ensure!(root.join("host").is_dir(), "cannot find the repository root from {}", here.display());
    Ok(root)
}
