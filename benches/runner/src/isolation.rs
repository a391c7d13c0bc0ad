//! W6: isolation. `hello`'s latency under wrk alone, then while two
//! connections keep a CPU-bound function (fib(38), about a second of guest
//! work each) busy on the same host, then while they keep the same function
//! busy under a CPU limit of 100m (`cpu_millis = 100`, as a pod's
//! `resources.limits.cpu`). The host has CPU 0 to itself; the hog clients
//! and wrk run on CPU 1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde_json::json;

use crate::peers::{FunctionDef, Server, Tools, http_get};
use crate::report::{Section, Spread, verdict};
use crate::{Args, wrk};

const HOGS: usize = 2;

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    eprintln!("W6: isolation ({} runs x {} s)", args.runs, args.duration);
    let functions = [
        FunctionDef {
            name: "hello",
            wasm: tools.guest("hello"),
            route: "/hello",
            probe: "/hello",
            limits: "max_concurrency = 1000\nidle_timeout_s = 3600",
            grants: "",
        },
        FunctionDef {
            name: "fib",
            wasm: tools.guest("fib"),
            route: "/fib",
            probe: "/fib?n=1",
            limits: "max_concurrency = 10\nidle_timeout_s = 3600\ntimeout_ms = 60000",
            grants: "",
        },
        FunctionDef {
            name: "fib-limited",
            wasm: tools.guest("fib"),
            route: "/fib-limited",
            probe: "/fib-limited?n=1",
            limits: "max_concurrency = 10\nidle_timeout_s = 3600\ntimeout_ms = 60000\ncpu_millis = 100",
            grants: "",
        },
    ];
    let server = Server::shoal(tools, &functions, &[])?;
    let mut section = Section::new(
        "w6",
        &format!("isolation: `hello` alone and beside {HOGS} busy CPU-bound requests, same host"),
        &["conns", "case", "req/s", "p50 µs", "p99 µs (median, min–max)"],
    );
    let mut data = Vec::new();
    for connections in [1u32, 16] {
        let alone = measure(&server, args, connections)?;
        let (beside, hog_done) = beside_hogs(&server, args, connections, "/fib?n=38")?;
        let (limited, limited_done) = beside_hogs(&server, args, connections, "/fib-limited?n=35")?;
        for (case, (rps, p50, p99)) in
            [("alone", &alone), ("beside the hogs", &beside), ("beside the hogs at 100m CPU", &limited)]
        {
            section.row(vec![
                connections.to_string(),
                case.to_string(),
                format!("{:.0}", rps.median),
                format!("{:.0}", p50.median),
                p99.show(0),
            ]);
        }
        let ratio = beside.2.median / alone.2.median;
        let limited_ratio = limited.2.median / alone.2.median;
        section.note(format!(
            "c={connections}: p99 beside the hogs / alone = {ratio:.2}× (target ≤ 2×: {}); {hog_done} hog \
             requests completed meanwhile; beside hogs limited to 100m: {limited_ratio:.2}× (target ≤ 2×: {}), \
             {limited_done} completed",
            verdict(ratio <= 2.0),
            verdict(limited_ratio <= 2.0)
        ));
        data.push(json!({
            "connections": connections,
            "alone": { "requests_per_second": alone.0, "p50_us": alone.1, "p99_us": alone.2 },
            "beside_hogs": { "requests_per_second": beside.0, "p50_us": beside.1, "p99_us": beside.2 },
            "beside_limited_hogs": { "requests_per_second": limited.0, "p50_us": limited.1, "p99_us": limited.2 },
            "p99_ratio": ratio, "hog_requests": hog_done,
            "limited_p99_ratio": limited_ratio, "limited_hog_requests": limited_done,
        }));
    }
    section.data = json!(data);
    Ok(section)
}

/// `hello` measured while `HOGS` connections keep requesting `hog_path`;
/// the hog requests that completed meanwhile.
fn beside_hogs(
    server: &Server,
    args: &Args,
    connections: u32,
    hog_path: &'static str,
) -> anyhow::Result<((Spread, Spread, Spread), u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let hog_requests = Arc::new(AtomicU64::new(0));
    let port = server.port();
    let hogs: Vec<_> = (0..HOGS)
        .map(|_| {
            let (stop, done) = (stop.clone(), hog_requests.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if matches!(http_get(port, hog_path), Some((200, _))) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Let the hogs get going before measuring.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let beside = measure(server, args, connections);
    stop.store(true, Ordering::Relaxed);
    for hog in hogs {
        let _ = hog.join();
    }
    Ok((beside?, hog_requests.load(Ordering::Relaxed)))
}

fn measure(server: &Server, args: &Args, connections: u32) -> anyhow::Result<(Spread, Spread, Spread)> {
    let mut samples = Vec::new();
    for _ in 0..args.runs {
        samples.push(wrk::run(&server.url("/hello"), connections, args.duration)?);
    }
    let spread = |f: fn(&wrk::Sample) -> f64| Spread::of(samples.iter().map(f).collect());
    Ok((spread(|s| s.requests_per_second), spread(|s| s.p50_us), spread(|s| s.p99_us)))
}
