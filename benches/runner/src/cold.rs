//! W4: cold starts, timed from the runner (on CPU 1) against a host on
//! CPU 0:
//!
//! - (a) deploy of a never-seen wasm (a fresh variant: compiled now) through
//!   the admin API, to its first HTTP response;
//! - (b) deploy of a wasm the host has compiled before (its code cache), to
//!   the first response;
//! - (c) the first request to a deployed function that has scaled to zero.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::Args;
use crate::admin::{Admin, Deploy, variant};
use crate::peers::{FunctionDef, Server, Tools, http_get};
use crate::report::{Section, percentile, verdict};

fn first_response(server: &Server, path: &str) -> anyhow::Result<()> {
    match http_get(server.port(), path) {
        Some((200, _)) => Ok(()),
        other => anyhow::bail!("{path}: expected 200, got {other:?}; host log:\n{}", server.log_text()),
    }
}

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    let samples = args.cold_samples;
    eprintln!("W4: cold start ({samples} samples each)");
    let hello = FunctionDef {
        name: "hello",
        wasm: tools.guest("hello"),
        route: "/hello",
        probe: "/hello",
        limits: "idle_timeout_s = 3600",
        grants: "",
    };
    let server = Server::shoal(tools, &[hello], &[])?;
    let state = server.state_dir().expect("a Shoal server has a state dir");
    let admin = Admin::new(server.admin_socket().expect("admin socket"), state)?;
    let wasm = std::fs::read(tools.guest("hello"))?;
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();

    let mut timings: Vec<(&str, &str, Vec<f64>)> = Vec::new();
    let mut time_deploys = |label: &'static str, what: &'static str, fresh: bool| -> anyhow::Result<()> {
        let mut ms = Vec::new();
        for i in 0..samples {
            let name = format!("{}-{i}", label.replace(['(', ')'], ""));
            let wasm = if fresh { variant(&wasm, &format!("{run_id}-{i}")) } else { wasm.clone() };
            let started = Instant::now();
            admin.deploy(&[Deploy { name: name.clone(), wasm: &wasm, limits: json!({}) }])?;
            first_response(&server, &format!("/{name}"))?;
            ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        timings.push((label, what, ms));
        Ok(())
    };
    time_deploys("(a)", "deploy of a never-seen wasm → first response", true)?;
    time_deploys("(b)", "deploy of an already-compiled wasm → first response", false)?;

    // (c): one function with a short idle timeout; wait for zero instances
    // before each timed request.
    admin.deploy(&[Deploy { name: "zero".into(), wasm: &wasm, limits: json!({ "idle_timeout": 300 }) }])?;
    let mut ms = Vec::new();
    for _ in 0..samples {
        first_response(&server, "/zero")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin.live_instances("zero")? > 0 {
            anyhow::ensure!(Instant::now() < deadline, "zero did not scale to zero within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let started = Instant::now();
        first_response(&server, "/zero")?;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    timings.push(("(c)", "first request to a function scaled to zero", ms));

    // The same probe against a warm instance, for scale.
    let mut warm = Vec::new();
    for _ in 0..samples {
        let started = Instant::now();
        first_response(&server, "/hello")?;
        warm.push(started.elapsed().as_secs_f64() * 1e3);
    }
    timings.push(("warm", "request to a warm instance (same probe, for scale)", warm));

    let mut section = Section::new(
        "w4",
        &format!("cold start, {samples} samples each (new TCP connection per probe)"),
        &["case", "what", "p50 ms", "p99 ms", "min ms", "max ms"],
    );
    let mut data = Vec::new();
    for (label, what, ms) in &timings {
        let (p50, p99) = (percentile(ms, 50.0), percentile(ms, 99.0));
        let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ms.iter().copied().fold(0.0, f64::max);
        section.row(vec![
            label.to_string(),
            what.to_string(),
            format!("{p50:.2}"),
            format!("{p99:.2}"),
            format!("{min:.2}"),
            format!("{max:.2}"),
        ]);
        data.push(json!({ "case": label, "what": what, "p50_ms": p50, "p99_ms": p99, "min_ms": min, "max_ms": max }));
    }
    let zero_p50 = percentile(&timings[2].2, 50.0);
    section.note(format!("(c) p50 {zero_p50:.2} ms (target ≤ 1 ms: {})", verdict(zero_p50 <= 1.0)));
    section.data = json!(data);
    Ok(section)
}
