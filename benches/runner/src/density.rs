//! W5: density. N distinct functions deployed on one host (generated
//! variants of `hello`): host memory idle, then after one request to each
//! and scale to zero; bytes per function against the host with only the
//! template function deployed.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::Args;
use crate::admin::{Admin, Deploy, variant};
use crate::peers::{FunctionDef, Server, Tools, http_get, memory_kib};
use crate::report::{Section, verdict};

/// Functions per deploy request.
const BATCH: usize = 250;

struct Row {
    functions: usize,
    binaries: usize,
    deploy_s: f64,
    base: (u64, u64),
    idle: (u64, u64),
    after: (u64, u64),
}

fn settle(pid: u32) -> anyhow::Result<(u64, u64)> {
    std::thread::sleep(Duration::from_secs(2));
    memory_kib(pid)
}

fn measure(tools: &Tools, functions: usize, binaries: usize) -> anyhow::Result<Row> {
    let hello = FunctionDef {
        name: "hello",
        wasm: tools.guest("hello"),
        route: "/hello",
        probe: "/hello",
        limits: "idle_timeout_s = 1",
        grants: "",
    };
    let server = Server::shoal(tools, &[hello], &["--max-instances", "2000"])?;
    let state = server.state_dir().expect("a Shoal server has a state dir");
    let admin = Admin::new(server.admin_socket().expect("admin socket"), state)?;
    let base = settle(server.pid())?;

    let wasm = std::fs::read(tools.guest("hello"))?;
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let variants: Vec<Vec<u8>> = (0..binaries).map(|i| variant(&wasm, &format!("{run_id}-{i}"))).collect();
    let started = Instant::now();
    for first in (0..functions).step_by(BATCH) {
        let batch: Vec<Deploy> = (first..(first + BATCH).min(functions))
            .map(|i| Deploy {
                name: format!("f{i}"),
                wasm: &variants[i % binaries],
                limits: json!({ "idle_timeout": 1000 }),
            })
            .collect();
        admin.deploy(&batch)?;
        eprint!("\r  deployed {}/{functions}", first + batch.len());
    }
    let deploy_s = started.elapsed().as_secs_f64();
    eprintln!(" in {deploy_s:.1} s");
    // Measured once Cranelift's code has replaced Winch's everywhere (the
    // steady state).
    let deadline = Instant::now() + Duration::from_secs(600);
    while admin.baseline_versions()? > 0 {
        anyhow::ensure!(Instant::now() < deadline, "Winch's code still served 10 minutes after the deploys");
        std::thread::sleep(Duration::from_millis(200));
    }
    let idle = settle(server.pid())?;

    for i in 0..functions {
        let path = format!("/f{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http_get(server.port(), &path) {
                Some((200, _)) => break,
                // Every pool slot busy or idle-but-not-yet-reaped: wait.
                Some((503, _)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                other => anyhow::bail!("{path}: {other:?}; host log:\n{}", server.log_text()),
            }
        }
        if i % 100 == 99 {
            eprint!("\r  requested {}/{functions}", i + 1);
        }
    }
    eprintln!();
    let deadline = Instant::now() + Duration::from_secs(120);
    while admin.total_live()? > 0 {
        anyhow::ensure!(Instant::now() < deadline, "instances still live 2 minutes after the last request");
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = settle(server.pid())?;
    Ok(Row { functions, binaries, deploy_s, base, idle, after })
}

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    eprintln!("W5: density {:?} functions", args.density);
    let mut section = Section::new(
        "w5",
        "density: distinct functions on one host (variants of `hello`)",
        &[
            "functions",
            "distinct wasm",
            "deploy s",
            "RSS base MiB",
            "RSS idle MiB",
            "KB/function idle (RSS / PSS)",
            "RSS after 1 req each + scale to zero MiB",
            "KB/function after (RSS / PSS)",
        ],
    );
    let mut data = Vec::new();
    for &functions in &args.density {
        let binaries = functions.min(args.distinct_wasm);
        eprintln!("  {functions} functions from {binaries} distinct binaries");
        let row = measure(tools, functions, binaries)?;
        let per = |now: u64, base: u64| now.saturating_sub(base) as f64 * 1024.0 / 1000.0 / row.functions as f64;
        let idle_per = (per(row.idle.0, row.base.0), per(row.idle.1, row.base.1));
        let after_per = (per(row.after.0, row.base.0), per(row.after.1, row.base.1));
        section.row(vec![
            row.functions.to_string(),
            row.binaries.to_string(),
            format!("{:.1}", row.deploy_s),
            format!("{:.1}", row.base.0 as f64 / 1024.0),
            format!("{:.1}", row.idle.0 as f64 / 1024.0),
            format!("{:.1} / {:.1}", idle_per.0, idle_per.1),
            format!("{:.1}", row.after.0 as f64 / 1024.0),
            format!("{:.1} / {:.1}", after_per.0, after_per.1),
        ]);
        section.note(format!(
            "{} functions: {:.1} KB per idle deployed function (target ≤ 100 KB: {})",
            row.functions,
            idle_per.0,
            verdict(idle_per.0 <= 100.0)
        ));
        data.push(json!({
            "functions": row.functions, "distinct_wasm": row.binaries, "deploy_seconds": row.deploy_s,
            "base_kib": { "rss": row.base.0, "pss": row.base.1 },
            "idle_kib": { "rss": row.idle.0, "pss": row.idle.1 },
            "after_scale_to_zero_kib": { "rss": row.after.0, "pss": row.after.1 },
            "idle_kb_per_function": { "rss": idle_per.0, "pss": idle_per.1 },
            "after_kb_per_function": { "rss": after_per.0, "pss": after_per.1 },
        }));
    }
    section.data = json!(data);
    Ok(section)
}
