//! W4: cold starts, timed from the runner (on CPU 1) against a host on
//! CPU 0:
//!
//! - (a) deploy of a never-seen wasm (a fresh variant: compiled now) through
//!   the admin API, to its first HTTP response — served from Winch's code
//!   while Cranelift compiles in the background (each sample waits for the
//!   previous one's optimized code, so compiles do not overlap), and the
//!   same with `--no-tier-up` (Cranelift before the first response), on a
//!   second host;
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
    let hello = || FunctionDef {
        name: "hello",
        wasm: tools.guest("hello"),
        route: "/hello",
        probe: "/hello",
        limits: "idle_timeout_s = 3600",
        grants: "",
    };
    let server = Server::shoal(tools, &[hello()], &[])?;
    let state = server.state_dir().expect("a Shoal server has a state dir");
    let admin = Admin::new(server.admin_socket().expect("admin socket"), state)?;
    let wasm = std::fs::read(tools.guest("hello"))?;
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();

    let mut timings: Vec<(&str, &str, Vec<f64>)> = Vec::new();
    let time_deploys = |server: &Server, admin: &Admin, label: &'static str, fresh: bool| -> anyhow::Result<Vec<f64>> {
        let mut ms = Vec::new();
        for i in 0..samples {
            let name = format!("{}-{i}", label.replace(['(', ')', '\''], ""));
            let wasm = if fresh { variant(&wasm, &format!("{run_id}-{label}-{i}")) } else { wasm.clone() };
            let started = Instant::now();
            admin.deploy(&[Deploy { name: name.clone(), wasm: &wasm, limits: json!({}) }])?;
            first_response(server, &format!("/{name}"))?;
            ms.push(started.elapsed().as_secs_f64() * 1e3);
            // The background compile ends before the next sample starts.
            let deadline = Instant::now() + Duration::from_secs(60);
            while admin.code(&name)? == "baseline" {
                anyhow::ensure!(Instant::now() < deadline, "{name}: Cranelift's code never arrived");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(ms)
    };
    let tiered = time_deploys(&server, &admin, "(a)", true)?;
    timings.push(("(a)", "deploy of a never-seen wasm → first response (Winch's code; Cranelift's later)", tiered));
    let compile_ms = compile_times(&server.log_text());
    {
        let direct_server = Server::shoal(tools, &[hello()], &["--no-tier-up"])?;
        let direct_admin = Admin::new(
            direct_server.admin_socket().expect("admin socket"),
            direct_server.state_dir().expect("a Shoal server has a state dir"),
        )?;
        let direct = time_deploys(&direct_server, &direct_admin, "(a')", true)?;
        timings.push(("(a')", "the same with --no-tier-up (Cranelift before the first response)", direct));
    }
    let cached = time_deploys(&server, &admin, "(b)", false)?;
    timings.push(("(b)", "deploy of an already-compiled wasm → first response", cached));

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
    let zero_p50 = percentile(&timings[3].2, 50.0);
    section.note(format!("(c) p50 {zero_p50:.2} ms (target ≤ 1 ms: {})", verdict(zero_p50 <= 1.0)));
    let first_p50 = percentile(&timings[0].2, 50.0);
    section.note(format!("(a) p50 {first_p50:.2} ms (target ≤ 20 ms: {})", verdict(first_p50 <= 20.0)));
    let (winch, cranelift) = (percentile(&compile_ms.0, 50.0), percentile(&compile_ms.1, 50.0));
    section.note(format!(
        "compile of one variant in the host (p50 of {} and {}): Winch {winch:.1} ms, Cranelift {cranelift:.1} ms",
        compile_ms.0.len(),
        compile_ms.1.len()
    ));
    section.data = json!({ "cases": data, "winch_compile_ms_p50": winch, "cranelift_compile_ms_p50": cranelift });
    Ok(section)
}

/// The Winch and Cranelift compile times the host logged (`compile_ms=`
/// of its "baseline code compiled" and "optimized code in place" lines).
fn compile_times(log: &str) -> (Vec<f64>, Vec<f64>) {
    let value = |line: &str| -> Option<f64> {
        line.split_whitespace().find_map(|field| field.strip_prefix("compile_ms="))?.parse().ok()
    };
    let of = |what: &str| log.lines().filter(|line| line.contains(what)).filter_map(value).collect();
    (of("baseline code compiled"), of("optimized code in place"))
}
