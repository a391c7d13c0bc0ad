//! W3: key-value get and set through the Runtime ABI on the embedded
//! backend (redb), timed by the guest's own clock around N calls.

use serde_json::json;

use crate::Args;
use crate::peers::{FunctionDef, Server, Tools, http_get};
use crate::report::{Section, Spread};

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    eprintln!("W3: key-value through the ABI (embedded backend)");
    let kv = FunctionDef {
        name: "kv",
        wasm: tools.guest("kv"),
        route: "/kv",
        probe: "/kv/keys",
        limits: "max_concurrency = 10\nidle_timeout_s = 3600\ntimeout_ms = 60000",
        grants: "keyvalue = [\"default:bench/*\"]",
    };
    let server = Server::shoal(tools, &[kv], &[])?;
    let mut section = Section::new(
        "w3",
        "key-value through the Runtime ABI, embedded backend (redb on local disk)",
        &["operation", "calls per request", "µs per call (median, min–max)"],
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
        section.row(vec![op.to_string(), n.to_string(), spread.show(2)]);
        data.push(json!({ "op": op, "calls": n, "us_per_call": spread }));
    }
    section.note(
        "every set is acknowledged only once redb has committed it durably (one fsync per write); \
         gets read a committed snapshot"
            .to_string(),
    );
    section.data = json!(data);
    Ok(section)
}
