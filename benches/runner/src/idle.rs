//! W8: what an idle node costs. `shoal serve` with ten functions deployed
//! and no traffic, measured as CPU time per second of wall time (from
//! `/proc/<pid>/stat`): first with the functions never called, then after
//! each served one request and scaled back to zero. The baseline, in the
//! same run, is the native hyper server idling. Scale-from-zero is checked
//! on the way (its latency is W4(c)).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::Args;
use crate::admin::Admin;
use crate::peers::{FunctionDef, Peer, Server, Tools, http_get};
use crate::report::{Section, verdict};

/// Functions deployed on the idle host.
const FUNCTIONS: usize = 10;
/// The target: an idle host uses less CPU than this per second.
const TARGET_MS_PER_S: f64 = 1.0;

/// CPU milliseconds the server uses per second over `window`, idle, and
/// how often its threads were woken per second. Read from each thread's
/// `schedstat` (nanoseconds on CPU, times scheduled): `/proc/<pid>/stat`
/// counts in 10 ms ticks, too coarse for a figure under a millisecond.
/// Threads that come or go during the window are not counted (an idle
/// host starts none).
fn idle_cpu(server: &Server, window: Duration) -> anyhow::Result<(f64, f64)> {
    let before = thread_times(server.pid())?;
    let started = Instant::now();
    std::thread::sleep(window);
    let after = thread_times(server.pid())?;
    let seconds = started.elapsed().as_secs_f64();
    let (mut ns, mut wakes) = (0u64, 0u64);
    for (tid, (ns_after, wakes_after)) in &after {
        if let Some((ns_before, wakes_before)) = before.get(tid) {
            ns += ns_after.saturating_sub(*ns_before);
            wakes += wakes_after.saturating_sub(*wakes_before);
        }
    }
    Ok((ns as f64 / 1e6 / seconds, wakes as f64 / seconds))
}

/// Per thread of `pid`: (ns on CPU, times scheduled).
fn thread_times(pid: u32) -> anyhow::Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let mut times = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else { continue };
        let fields: Vec<u64> = text.split_whitespace().filter_map(|field| field.parse().ok()).collect();
        if let [ns, _waiting, slices] = fields[..] {
            times.insert(entry.file_name().to_string_lossy().into_owned(), (ns, slices));
        }
    }
    Ok(times)
}

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    let window = Duration::from_secs((args.duration * 4).max(10));
    eprintln!("W8: idle host, {FUNCTIONS} functions, {} s per window", window.as_secs());
    let names: Vec<String> = (0..FUNCTIONS).map(|i| format!("idle{i}")).collect();
    let routes: Vec<String> = names.iter().map(|name| format!("/{name}")).collect();
    let functions: Vec<FunctionDef> = names
        .iter()
        .zip(&routes)
        .map(|(name, route)| FunctionDef {
            name,
            wasm: tools.guest("hello"),
            route,
            probe: route,
            limits: "idle_timeout_s = 1",
            grants: "",
        })
        .collect();

    let native = Server::start(tools, Peer::Native)?;
    std::thread::sleep(Duration::from_secs(1));
    let (native_ms, native_wakes) = idle_cpu(&native, window)?;
    drop(native);

    // Starting probes the first function once; wait for it to scale down.
    let shoal = Server::shoal(tools, &functions, &[])?;
    let admin = Admin::new(
        shoal.admin_socket().expect("a Shoal server has an admin socket"),
        shoal.state_dir().expect("state"),
    )?;
    wait_for_zero(&admin)?;
    let (deployed_ms, deployed_wakes) = idle_cpu(&shoal, window)?;

    for route in &routes {
        match http_get(shoal.port(), route) {
            Some((200, _)) => {}
            other => anyhow::bail!("{route}: expected 200, got {other:?}; host log:\n{}", shoal.log_text()),
        }
    }
    wait_for_zero(&admin)?;
    let (scaled_ms, scaled_wakes) = idle_cpu(&shoal, window)?;
    // Back from zero: the first request after the idle window is served.
    match http_get(shoal.port(), &routes[0]) {
        Some((200, _)) => {}
        other => anyhow::bail!("scale from zero after idling: expected 200, got {other:?}"),
    }

    let mut section = Section::new(
        "w8",
        &format!("idle node: {FUNCTIONS} functions deployed, no traffic"),
        &["server", "state", "CPU ms per second", "wakeups per second"],
    );
    section.row(vec![
        "native-hyper".into(),
        "listening".into(),
        format!("{native_ms:.3}"),
        format!("{native_wakes:.1}"),
    ]);
    section.row(vec![
        "shoal".into(),
        "deployed, never called".into(),
        format!("{deployed_ms:.3}"),
        format!("{deployed_wakes:.1}"),
    ]);
    section.row(vec![
        "shoal".into(),
        "after a request each, scaled to zero".into(),
        format!("{scaled_ms:.3}"),
        format!("{scaled_wakes:.1}"),
    ]);
    let worst = deployed_ms.max(scaled_ms);
    section.note(format!(
        "an idle Shoal host uses {worst:.3} ms of CPU per second (target < {TARGET_MS_PER_S} ms: {}); \
         measured over {} s windows from each thread's schedstat",
        verdict(worst < TARGET_MS_PER_S),
        window.as_secs()
    ));
    section.data = json!({
        "functions": FUNCTIONS,
        "window_s": window.as_secs(),
        "native_ms_per_s": native_ms,
        "native_wakes_per_s": native_wakes,
        "shoal_deployed_ms_per_s": deployed_ms,
        "shoal_deployed_wakes_per_s": deployed_wakes,
        "shoal_scaled_to_zero_ms_per_s": scaled_ms,
        "shoal_scaled_to_zero_wakes_per_s": scaled_wakes,
    });
    Ok(section)
}

fn wait_for_zero(admin: &Admin) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin.total_live()? > 0 {
        anyhow::ensure!(Instant::now() < deadline, "instances did not scale to zero within 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
