//! W2: a CPU-bound function (`fib`, recursive) natively, under Shoal with
//! epochs only (`--no-fuel`), and under Shoal with fuel metering: what
//! metering costs on pure computation.

use serde_json::json;

use crate::peers::{FunctionDef, Peer, Server, Tools};
use crate::report::{Section, Spread, verdict};
use crate::{Args, wrk};

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
    let mut medians = Vec::new();
    for (label, server) in [
        ("native", Server::start(tools, Peer::Native)?),
        ("shoal (epochs only)", Server::shoal(tools, &[fib()], &["--no-fuel"])?),
        ("shoal (fuel)", Server::shoal(tools, &[fib()], &[])?),
    ] {
        let mut latencies = Vec::new();
        for _ in 0..args.runs {
            let sample = wrk::run(&server.url(&format!("/fib?n={N}")), 1, args.duration)?;
            anyhow::ensure!(sample.errors == 0, "{label}: {} failed requests", sample.errors);
            // One connection: the mean time per request is 1 / throughput.
            latencies.push(1e6 / sample.requests_per_second);
        }
        let spread = Spread::of(latencies);
        eprintln!("  {label:<20} {:.1} µs/request", spread.median);
        medians.push((label, spread));
        drop(server);
    }
    let native = medians[0].1.median;
    for (label, spread) in &medians {
        section.row(vec![label.to_string(), spread.show(1), format!("{:.2}×", spread.median / native)]);
    }
    let (epochs, fuel) = (medians[1].1.median, medians[2].1.median);
    let cost = fuel / epochs - 1.0;
    section.note(format!(
        "fuel metering adds {:.1}% to a CPU-bound request over epochs alone; wasm (guest built with \
         opt-level \"s\") runs at {:.2}× native time with epochs only",
        cost * 100.0,
        epochs / native
    ));
    section.note(format!(
        "the ≤ 5% metering target is stated for W1 throughput (see W1); on pure computation: {}",
        verdict(cost <= 0.05)
    ));
    section.data = json!({
        "n": N,
        "peers": medians.iter().map(|(label, spread)| json!({ "peer": label, "us_per_request": spread }))
            .collect::<Vec<_>>(),
        "fuel_cost": cost,
    });
    Ok(section)
}
