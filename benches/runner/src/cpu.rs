//! W2: a CPU-bound function (`fib`, recursive) natively, under `wasmtime
//! serve` reusing its instance (without epochs, with its epoch checks, and
//! with fuel too: the upstream host's cost of the same code), under Shoal with
//! epochs only (`--fuel off`), under Shoal's default (a function without
//! `fuel_per_request` runs on the engine without fuel instrumentation), and
//! with fuel metered (`--fuel every-request`): what metering costs on pure
//! computation. Then metering truth: on fib(32),
//! how much of the process's CPU the usage records carry, and where the
//! rest went.

use anyhow::Context as _;
use serde_json::json;

use crate::peers::{FunctionDef, Peer, Server, Tools, http_get, turns};
use crate::report::{Section, Spread, verdict};
use crate::{Args, wrk};

/// The rows, in the order of the table (and of each round's turns).
const NATIVE: &str = "native";
const WASMTIME: &str = "wasmtime serve (no epochs)";
const WASMTIME_EPOCHS: &str = "wasmtime serve (epoch checks)";
const EPOCHS: &str = "shoal (epochs only)";
const DEFAULT: &str = "shoal (default: no fuel limit)";
const WASMTIME_FUEL: &str = "wasmtime serve (fuel and epoch checks)";
const FUEL: &str = "shoal (fuel metered)";

/// fib(27): about a millisecond of native work per request.
const N: u32 = 27;

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    eprintln!("W2: CPU-bound fib({N}) ({} runs x {} s, 1 connection)", args.runs, args.duration);
    let fib = || FunctionDef {
        name: "fib",
        wasm: tools.guest("fib"),
        route: "/fib",
        probe: "/fib?n=1",
        limits: "max_concurrency = 100\nidle_timeout_s = 3600",
        grants: "",
    };
    let mut section = Section::new(
        "w2",
        &format!("CPU-bound: recursive fib({N}) per request, 1 connection"),
        &["peer", "µs per request (median, min–max)", "vs native"],
    );
    let wasm = tools.guest("fib");
    let probe = "/fib?n=1";
    // Every server is up for the whole workload and they take turns
    // ([`turns`]): the targets are ratios between these rows.
    let servers: [(&str, &dyn Fn() -> anyhow::Result<Server>); 7] = [
        (NATIVE, &|| Server::start(tools, Peer::Native)),
        (WASMTIME, &|| Server::wasmtime_serve(tools, &wasm, probe, &[])),
        // A timeout is what makes `wasmtime serve` compile epoch checks in.
        (WASMTIME_EPOCHS, &|| Server::wasmtime_serve(tools, &wasm, probe, &["-Wtimeout=600s"])),
        (EPOCHS, &|| Server::shoal(tools, &[fib()], &["--fuel", "off"])),
        (DEFAULT, &|| Server::shoal(tools, &[fib()], &[])),
        // Fuel for the instance's whole life: it serves every request.
        (WASMTIME_FUEL, &|| {
            Server::wasmtime_serve(tools, &wasm, probe, &["-Wtimeout=600s", "-Wfuel=1000000000000000000"])
        }),
        (FUEL, &|| Server::shoal(tools, &[fib()], &["--fuel", "every-request"])),
    ];
    let mut running = Vec::new();
    for (label, start) in servers {
        running.push((label, start().with_context(|| format!("starting {label}"))?));
    }
    let mut latencies: Vec<Vec<f64>> = running.iter().map(|_| Vec::new()).collect();
    for (_, i) in turns(args.runs, running.len()) {
        let (label, server) = &running[i];
        let sample = wrk::run(&server.url(&format!("/fib?n={N}")), 1, args.duration)?;
        anyhow::ensure!(sample.errors == 0, "{label}: {} failed requests", sample.errors);
        // One connection: the mean time per request is 1 / throughput.
        latencies[i].push(1e6 / sample.requests_per_second);
    }
    drop(running);
    let mut medians = Vec::new();
    for ((label, _), latencies) in servers.iter().zip(latencies) {
        let spread = Spread::of(latencies);
        eprintln!("  {label:<44} {:.1} µs/request", spread.median);
        medians.push((*label, spread));
    }
    let median = |label: &str| medians.iter().find(|(l, _)| *l == label).map_or(f64::NAN, |(_, s)| s.median);
    let native = median(NATIVE);
    for (label, spread) in &medians {
        section.row(vec![label.to_string(), spread.show(1), format!("{:.2}×", spread.median / native)]);
    }
    let (epochs, default, fuel) = (median(EPOCHS), median(DEFAULT), median(FUEL));
    let (upstream, upstream_epochs, upstream_fuel) = (median(WASMTIME), median(WASMTIME_EPOCHS), median(WASMTIME_FUEL));
    let cost = fuel / epochs - 1.0;
    let default_cost = default / epochs - 1.0;
    let over_upstream = epochs / upstream - 1.0;
    section.note(format!(
        "epoch interruption: Shoal with epochs only runs {:+.1}% against the same module under `wasmtime serve` \
         without epochs (target ≤ 10%: {}); `wasmtime serve` with its own epoch checks (`-W timeout`) runs \
         {:+.1}% against it, so the checks compiled into the guest are that much, and Shoal's ticks and yields \
         {:+.1}% over them",
        over_upstream * 100.0,
        verdict(over_upstream <= 0.10),
        (upstream_epochs / upstream - 1.0) * 100.0,
        (epochs / upstream_epochs - 1.0) * 100.0,
    ));
    section.note(format!(
        "fuel metering adds {:.1}% to a CPU-bound request over epochs alone (`wasmtime serve` with fuel and \
         epoch checks: {:+.1}% against its epochs alone; Shoal's fuel-metered row runs {:+.1}% against it); wasm \
         (guest built with opt-level \"s\") runs at {:.2}× native time with epochs only (target ≤ 1.3×: {})",
        cost * 100.0,
        (upstream_fuel / upstream_epochs - 1.0) * 100.0,
        (fuel / upstream_fuel - 1.0) * 100.0,
        epochs / native,
        verdict(epochs / native <= 1.3)
    ));
    section.note(format!(
        "a function without fuel_per_request (the default) runs {:+.1}% against epochs alone \
         (target ≤ 5%: {})",
        default_cost * 100.0,
        verdict(default_cost <= 0.05)
    ));
    let truth = metering_truth(tools, args, fib())?;
    section.note(truth.note());
    section.data = json!({
        "n": N,
        "peers": medians.iter().map(|(label, spread)| json!({ "peer": label, "us_per_request": spread }))
            .collect::<Vec<_>>(),
        "fuel_cost": cost,
        "default_cost": default_cost,
        "epochs_over_wasmtime_serve": over_upstream,
        "metering_truth": truth.json(),
    });
    Ok(section)
}

/// fib(32): tens of milliseconds per request, many epoch slices each.
const TRUTH_N: u32 = 32;

/// Where a CPU-bound run's CPU went, as shares of the process's CPU.
struct Truth {
    process_seconds: f64,
    /// Carried by usage records (`shoal_cpu_seconds_total`).
    records: f64,
    /// `shoal_host_cpu_seconds_total`.
    host: f64,
    /// By thread name: the epoch clock, the runtime's workers, the rest.
    threads: Vec<(String, f64)>,
}

impl Truth {
    fn note(&self) -> String {
        let threads: Vec<String> =
            self.threads.iter().map(|(name, share)| format!("{name} {:.1}%", share * 100.0)).collect();
        format!(
            "metering truth, fib({TRUTH_N}) on 1 connection, {:.1} s of process CPU: usage records carry {:.1}% \
             (target ≥ 97%: {}), `shoal_host_cpu_seconds_total` {:.1}%, together {:.1}% (target 100 ± 2%: {}); \
             by thread: {}",
            self.process_seconds,
            self.records * 100.0,
            verdict(self.records >= 0.97),
            self.host * 100.0,
            (self.records + self.host) * 100.0,
            verdict((self.records + self.host - 1.0).abs() <= 0.02),
            threads.join(", ")
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "n": TRUTH_N, "process_cpu_seconds": self.process_seconds, "records_share": self.records,
            "host_share": self.host,
            "threads": self.threads.iter().map(|(name, share)| json!({ "thread": name, "share": share }))
                .collect::<Vec<_>>(),
        })
    }
}

fn metering_truth(tools: &Tools, args: &Args, fib: FunctionDef) -> anyhow::Result<Truth> {
    eprintln!("W2: metering truth on fib({TRUTH_N}), {} s", args.duration * args.runs as u64);
    let server = Server::shoal(tools, &[fib], &[])?;
    // Warm: the instance exists, the compile is done.
    wrk::run(&server.url(&format!("/fib?n={TRUTH_N}")), 1, 1)?;
    let scrape = || -> anyhow::Result<(f64, f64)> {
        let (_, text) = http_get(server.port(), "/metrics").context("scraping /metrics")?;
        Ok((metric_sum(&text, "shoal_cpu_seconds_total"), metric_sum(&text, "shoal_host_cpu_seconds_total")))
    };
    let (threads_before, process_before) = (threads_by_name(server.pid())?, server.cpu_seconds()?);
    let (records_before, host_before) = scrape()?;
    wrk::run(&server.url(&format!("/fib?n={TRUTH_N}")), 1, args.duration * args.runs as u64)?;
    let (records_after, host_after) = scrape()?;
    // (/proc/<pid>/stat counts threads that ended too, in 10 ms ticks.)
    let (threads_after, process) = (threads_by_name(server.pid())?, server.cpu_seconds()? - process_before);
    let mut threads: Vec<(String, f64)> = threads_after
        .iter()
        .map(|(name, after)| (name.clone(), after - threads_before.get(name).copied().unwrap_or(0.0)))
        .collect();
    anyhow::ensure!(process > 0.0, "the server used no CPU");
    threads.retain(|(_, seconds)| *seconds / process >= 0.001);
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (_, seconds) in &mut threads {
        *seconds /= process;
    }
    Ok(Truth {
        process_seconds: process,
        records: (records_after - records_before) / process,
        host: (host_after - host_before) / process,
        threads,
    })
}

/// The sum of a metric family's samples in a /metrics text.
fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(family) && line[family.len()..].starts_with([' ', '{']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds per thread name of `pid` (from each thread's schedstat, in
/// nanoseconds).
fn threads_by_name(pid: u32) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let mut seconds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path();
        let (Ok(name), Ok(stat)) =
            (std::fs::read_to_string(path.join("comm")), std::fs::read_to_string(path.join("schedstat")))
        else {
            continue;
        };
        let ns: f64 = stat.split_whitespace().next().and_then(|ns| ns.parse().ok()).unwrap_or(0.0);
        *seconds.entry(name.trim().to_string()).or_insert(0.0) += ns / 1e9;
    }
    Ok(seconds)
}
