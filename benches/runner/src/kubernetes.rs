//! W7: the Kubernetes path. Runs the host crate's `kubernetes` benchmark
//! (a real containerd, registry and CNI bridge, as in the integration
//! tests) and turns its JSON into the table.

use std::process::Command;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::Args;
use crate::peers::Tools;
use crate::report::{Section, percentile, verdict};

/// Compile the benchmark (and the shim beside `shoal`) before anything is
/// measured.
pub fn build(tools: &Tools) -> anyhow::Result<()> {
    crate::peers::run(Command::new("cargo").current_dir(&tools.root).args([
        "build",
        "--release",
        "--workspace",
        "--bins",
    ]))?;
    crate::peers::run(Command::new("cargo").current_dir(&tools.root).args([
        "bench",
        "-p",
        "shoal-cli",
        "--bench",
        "kubernetes",
        "--no-run",
    ]))
}

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    eprintln!("W7: Kubernetes path through containerd's CRI ({} pods, one after another)", args.pods);
    let out = std::env::temp_dir().join(format!("shoal-bench-w7-{}.json", std::process::id()));
    crate::peers::run(
        Command::new("cargo")
            .current_dir(&tools.root)
            .args(["bench", "-p", "shoal-cli", "--bench", "kubernetes"])
            .env("SHOAL_BENCH_OUT", &out)
            .env("SHOAL_BENCH_PODS", args.pods.to_string()),
    )?;
    let result: Value =
        serde_json::from_slice(&std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?)?;
    let _ = std::fs::remove_file(&out);
    let pods = result["pods"].as_array().cloned().unwrap_or_default();
    anyhow::ensure!(pods.len() >= 3, "W7 needs at least 3 pods, got {}", pods.len());
    let figure = |pod: &Value, key: &str| pod[key].as_f64().unwrap_or(0.0);
    let later: Vec<&Value> = pods.iter().skip(1).collect();
    let first_response: Vec<f64> = later.iter().map(|p| figure(p, "first_response_ms")).collect();
    let cri: Vec<f64> = later.iter().map(|p| figure(p, "cri_ms")).collect();
    let p50_of = |key: &str| percentile(&later.iter().map(|p| figure(p, key)).collect::<Vec<_>>(), 50.0);
    // The node host's part of StartContainer (its Task Create), by phase.
    let host_p50 =
        |key: &str| percentile(&later.iter().map(|p| p["host"][key].as_f64().unwrap_or(0.0)).collect::<Vec<_>>(), 50.0);
    let rss_first = figure(&pods[0], "host_rss_kib");
    let rss_last = figure(&pods[pods.len() - 1], "host_rss_kib");
    let per_pod_kib = (rss_last - rss_first) / (pods.len() - 1) as f64;
    let containerd_per_pod_kib = (figure(&pods[pods.len() - 1], "containerd_rss_kib")
        - figure(&pods[0], "containerd_rss_kib"))
        / (pods.len() - 1) as f64;
    let shims = pods.iter().map(|p| figure(p, "shim_processes")).fold(0.0, f64::max);

    let mut section = Section::new(
        "w7",
        &format!("Kubernetes path: CRI RunPodSandbox + CreateContainer + StartContainer, {} pods", pods.len()),
        &["figure", "value"],
    );
    let p50 = percentile(&first_response, 50.0);
    let rows = [
        (
            "first pod (starts the node's host): to first response, ms",
            format!("{:.1}", figure(&pods[0], "first_response_ms")),
        ),
        (
            "later pods: CRI calls, p50 / p99 ms",
            format!("{:.1} / {:.1}", percentile(&cri, 50.0), percentile(&cri, 99.0)),
        ),
        (
            "later pods: RunPodSandbox / CreateContainer / StartContainer, p50 ms",
            format!(
                "{:.1} / {:.1} / {:.1}",
                p50_of("run_pod_sandbox_ms"),
                p50_of("create_container_ms"),
                p50_of("start_container_ms")
            ),
        ),
        (
            "later pods: StartContainer's Task Create in the host (rootfs mount / labels over gRPC / wasm read / \
             deploy / whole), p50 ms",
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1} / {:.1}",
                host_p50("mount_ms"),
                host_p50("labels_ms"),
                host_p50("read_ms"),
                host_p50("deploy_ms"),
                host_p50("task_create_ms")
            ),
        ),
        (
            "later pods: to first HTTP response, p50 / p99 ms",
            format!("{p50:.1} / {:.1}", percentile(&first_response, 99.0)),
        ),
        ("host RSS with 1 pod / all pods, MiB", format!("{:.1} / {:.1}", rss_first / 1024.0, rss_last / 1024.0)),
        ("host memory per extra pod, KiB", format!("{per_pod_kib:.0}")),
        ("containerd memory per extra pod, KiB (for scale)", format!("{containerd_per_pod_kib:.0}")),
        ("shim processes left running (max seen)", format!("{shims:.0}")),
    ];
    for (label, value) in rows {
        section.row(vec![label.to_string(), value]);
    }
    section.note(format!(
        "p50 to first response {p50:.1} ms (target ≤ 100 ms: {}; round 2: ≤ 50 ms: {}); StartContainer minus \
         the host's Task Create ({:.1} ms) is the shim binary's start, containerd's own work and Start; \
         {per_pod_kib:.0} KiB per extra pod (target ≤ 1 MiB: {})",
        verdict(p50 <= 100.0),
        verdict(p50 <= 50.0),
        p50_of("start_container_ms") - host_p50("task_create_ms"),
        verdict(per_pod_kib <= 1024.0)
    ));
    section.data = json!({
        "pods": pods,
        "later_first_response_p50_ms": p50,
        "host_kib_per_extra_pod": per_pod_kib,
        "containerd_kib_per_extra_pod": containerd_per_pod_kib,
    });
    Ok(section)
}
