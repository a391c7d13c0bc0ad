//! W3: key-value get and set through the Runtime ABI on the embedded
//! backend (redb), timed by the guest's own clock around N calls; then
//! durable increments from 1 and from 64 concurrent clients (wrk), whose
//! writes share commits.

use serde_json::json;

use crate::peers::{FunctionDef, Server, Tools, http_get};
use crate::report::{Section, Spread};
use crate::{Args, wrk};

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    eprintln!("W3: key-value through the ABI (embedded backend)");
    let kv = FunctionDef {
        name: "kv",
        wasm: tools.guest("kv"),
        route: "/kv",
        probe: "/kv/keys",
        // The store is measured, not the per-function rate limit: at
        // 64 writers (and at 2,000 gets a request) the calls reach its
        // default of 100,000 a second.
        limits: "max_concurrency = 100\nidle_timeout_s = 3600\ntimeout_ms = 60000\nabi_calls_per_second = 10000000",
        grants: "keyvalue = [\"default:bench/*\"]",
    };
    let server = Server::shoal(tools, &[kv], &[])?;
    let mut section = Section::new(
        "w3",
        "key-value through the Runtime ABI, embedded backend (redb on local disk)",
        &["operation", "calls per request", "figure (median, min–max)"],
    );
    let mut data = Vec::new();
    // A set is one durable commit (fsync) each, so fewer of them.
    for (op, n) in [("get", 2000u32), ("set", 200)] {
        let mut per_call = Vec::new();
        for _ in 0..args.runs.max(3) {
            let path = format!("/kv/bench?op={op}&n={n}&key=bench/k");
            let (status, body) = http_get(server.port(), &path)
                .ok_or_else(|| anyhow::anyhow!("no answer from {path}; host log:\n{}", server.log_text()))?;
            anyhow::ensure!(status == 200, "{path} answered {status}: {body}");
            let ns: f64 = body
                .split_whitespace()
                .find_map(|word| word.strip_prefix("ns_per_op="))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("unexpected reply {body:?}"))?;
            per_call.push(ns / 1000.0);
        }
        let spread = Spread::of(per_call);
        eprintln!("  {op}: {:.2} µs per call", spread.median);
        section.row(vec![format!("{op}: µs per call"), n.to_string(), spread.show(2)]);
        data.push(json!({ "op": op, "calls": n, "us_per_call": spread }));
    }
    // Concurrent writers: each request sets a key 100 times in a loop
    // (every set acknowledged only once committed), from 1 and from 64
    // clients at once; writes waiting together share one commit. Then the
    // same through whole HTTP requests, one increment each.
    const SETS: u32 = 100;
    let mut rates = Vec::new();
    for connections in [1u32, 64] {
        let mut per_second = Vec::new();
        for _ in 0..args.runs {
            let url = server.url(&format!("/kv/bench?op=set&n={SETS}&key=bench/c{connections}"));
            let sample = wrk::run(&url, connections, args.duration)?;
            anyhow::ensure!(sample.errors == 0, "{connections} writers: {} failed requests", sample.errors);
            per_second.push(sample.requests_per_second * f64::from(SETS));
        }
        let spread = Spread::of(per_second);
        eprintln!("  sets from {connections} concurrent guests: {:.0}/s", spread.median);
        section.row(vec![
            format!("set from {connections} concurrent requests: acknowledged per second"),
            SETS.to_string(),
            spread.show(0),
        ]);
        data.push(json!({ "op": "set", "clients": connections, "calls": SETS, "per_second": spread }));
        rates.push(spread.median);
    }
    let mut increments = Vec::new();
    for connections in [1u32, 64] {
        let mut per_second = Vec::new();
        for _ in 0..args.runs {
            let sample = wrk::run(&server.url("/kv/incr?key=bench/concurrent"), connections, args.duration)?;
            anyhow::ensure!(sample.errors == 0, "{connections} clients: {} failed increments", sample.errors);
            per_second.push(sample.requests_per_second);
        }
        let spread = Spread::of(per_second);
        section.row(vec![
            format!("increment per HTTP request, {connections} concurrent clients: acknowledged per second"),
            "1".to_string(),
            spread.show(0),
        ]);
        data.push(json!({ "op": "increment", "clients": connections, "per_second": spread }));
        increments.push(spread.median);
    }
    let gain = rates[1] / rates[0];
    section.note(
        "every set is acknowledged only once redb has committed it durably; writes waiting at the same \
         moment share one commit (one fsync); gets read a committed snapshot"
            .to_string(),
    );
    section.note(format!(
        "64 concurrent writers: {gain:.1}× the acknowledged sets per second of one (target ≥ 10×: {}); \
         through whole HTTP requests (one increment each, the server on one core) {:.1}×, bounded by \
         the request's CPU rather than by commits",
        crate::report::verdict(gain >= 10.0),
        increments[1] / increments[0]
    ));
    section.data = json!(data);
    Ok(section)
}
