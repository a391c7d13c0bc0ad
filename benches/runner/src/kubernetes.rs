//! W7: the Kubernetes path. Runs the `kubernetes` benchmark of the
//! `shoal-cli` crate (a real containerd, registry and CNI bridge, as in the
//! integration tests) on containerd 2.3.4 with the Sandbox API and on
//! containerd 1.6.20 with its pause container, and turns its JSON into
//! the table.

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

/// The containerds W7 runs on: what the bench binary is told, and the
/// table's column.
const CONTAINERDS: [(&str, &str); 2] =
    [("2.3", "containerd 2.3.4, Sandbox API"), ("1.6", "containerd 1.6.20, pause container")];

/// One containerd's run: the pods' records and the figures drawn from them.
struct Run {
    pods: Vec<Value>,
    rows: Vec<(String, String)>,
    first_pod_ms: f64,
    later_p50_ms: f64,
    per_pod_kib: f64,
}

/// Run the bench binary on containerd `which`; its pods' records. With
/// `idle_timeout_s`, each pod gets that idle timeout and its record the
/// host's RSS once its instance has scaled to zero.
fn pods_of(tools: &Tools, args: &Args, which: &str, idle_timeout_s: Option<u64>) -> anyhow::Result<Vec<Value>> {
    let out = std::env::temp_dir().join(format!("shoal-bench-w7-{}-{which}.json", std::process::id()));
    let mut command = Command::new("cargo");
    command
        .current_dir(&tools.root)
        .args(["bench", "-p", "shoal-cli", "--bench", "kubernetes"])
        .env("SHOAL_BENCH_OUT", &out)
        .env("SHOAL_BENCH_PODS", args.pods.to_string())
        .env("SHOAL_BENCH_CONTAINERD", which);
    if let Some(idle) = idle_timeout_s {
        command.env("SHOAL_BENCH_IDLE_TIMEOUT_S", idle.to_string());
    }
    crate::peers::run(&mut command)?;
    let result: Value =
        serde_json::from_slice(&std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?)?;
    let _ = std::fs::remove_file(&out);
    Ok(result["pods"].as_array().cloned().unwrap_or_default())
}

/// What a pod's host memory is made of: pods given a 1 s idle timeout,
/// the host's RSS read with each pod's instance alive and again once it
/// scaled to zero. The slope of the second is a pod without its
/// instance; the mean difference, one instance of `hello`.
fn memory_split(tools: &Tools, args: &Args) -> anyhow::Result<(f64, f64)> {
    eprintln!("W7: what a pod's memory is made of (containerd 2.3, pods scaled to zero after 1 s)");
    let pods = pods_of(tools, args, "2.3", Some(1))?;
    anyhow::ensure!(pods.len() >= 3, "W7 needs at least 3 pods, got {}", pods.len());
    let figure = |pod: &Value, key: &str| pod[key].as_f64().unwrap_or(0.0);
    let idle_per_pod = (figure(&pods[pods.len() - 1], "host_rss_idle_kib") - figure(&pods[0], "host_rss_idle_kib"))
        / (pods.len() - 1) as f64;
    let later = &pods[1..];
    let instance = later.iter().map(|pod| figure(pod, "host_rss_kib") - figure(pod, "host_rss_idle_kib")).sum::<f64>()
        / later.len() as f64;
    Ok((idle_per_pod, instance))
}

fn measure(tools: &Tools, args: &Args, which: &str) -> anyhow::Result<Run> {
    eprintln!("W7: Kubernetes path through containerd {which}'s CRI ({} pods, one after another)", args.pods);
    let pods = pods_of(tools, args, which, None)?;
    anyhow::ensure!(pods.len() >= 3, "W7 needs at least 3 pods, got {}", pods.len());
    let figure = |pod: &Value, key: &str| pod[key].as_f64().unwrap_or(0.0);
    let later: Vec<&Value> = pods.iter().skip(1).collect();
    let first_response: Vec<f64> = later.iter().map(|p| figure(p, "first_response_ms")).collect();
    let cri: Vec<f64> = later.iter().map(|p| figure(p, "cri_ms")).collect();
    let p50_of = |key: &str| percentile(&later.iter().map(|p| figure(p, key)).collect::<Vec<_>>(), 50.0);
    // The node host's part (its Task Create; its Sandbox API calls), by phase.
    let host_p50 =
        |key: &str| percentile(&later.iter().map(|p| p["host"][key].as_f64().unwrap_or(0.0)).collect::<Vec<_>>(), 50.0);
    // What each pod after the first added to a figure, on average.
    let per_pod = |of: &dyn Fn(&Value) -> f64| (of(&pods[pods.len() - 1]) - of(&pods[0])) / (pods.len() - 1) as f64;
    let rss_first = figure(&pods[0], "host_rss_kib");
    let rss_last = figure(&pods[pods.len() - 1], "host_rss_kib");
    let per_pod_kib = per_pod(&|pod| figure(pod, "host_rss_kib"));
    let containerd_per_pod_kib = per_pod(&|pod| figure(pod, "containerd_rss_kib"));
    let memory = |key: &str| per_pod(&|pod| pod["host_memory"][key].as_f64().unwrap_or(0.0));
    let shims = pods.iter().map(|p| figure(p, "shim_processes")).fold(0.0, f64::max);
    let later_p50_ms = percentile(&first_response, 50.0);
    let first_pod_ms = figure(&pods[0], "first_response_ms");
    let rows = vec![
        ("first pod (starts the node's host): to first response, ms".to_string(), format!("{first_pod_ms:.1}")),
        (
            "later pods: CRI calls, p50 / p99 ms".to_string(),
            format!("{:.1} / {:.1}", percentile(&cri, 50.0), percentile(&cri, 99.0)),
        ),
        (
            "later pods: RunPodSandbox / CreateContainer / StartContainer, p50 ms".to_string(),
            format!(
                "{:.1} / {:.1} / {:.1}",
                p50_of("run_pod_sandbox_ms"),
                p50_of("create_container_ms"),
                p50_of("start_container_ms")
            ),
        ),
        (
            "later pods: the host's CreateSandbox / StartSandbox (Sandbox API), p50 ms".to_string(),
            format!("{:.2} / {:.2}", host_p50("sandbox_create_ms"), host_p50("sandbox_start_ms")),
        ),
        (
            "later pods: StartContainer's Task Create in the host (rootfs mount / labels over gRPC / wasm read / \
             deploy / whole), p50 ms"
                .to_string(),
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
            "later pods: to first HTTP response, p50 / p99 ms".to_string(),
            format!("{later_p50_ms:.1} / {:.1}", percentile(&first_response, 99.0)),
        ),
        (
            "host RSS with 1 pod / all pods, MiB".to_string(),
            format!("{:.1} / {:.1}", rss_first / 1024.0, rss_last / 1024.0),
        ),
        ("host memory per extra pod, KiB".to_string(), format!("{per_pod_kib:.0}")),
        ("containerd memory per extra pod, KiB (for scale)".to_string(), format!("{containerd_per_pod_kib:.0}")),
        ("shim processes left running (max seen)".to_string(), format!("{shims:.0}")),
        (
            "of the host's memory per extra pod: malloc's main heap / anonymous in wasmtime's reservations / \
          other anonymous (thread stacks, malloc's arenas) / file, KiB; threads"
                .to_string(),
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0}; {:+.1}",
                memory("heap_kib"),
                memory("reserved_kib"),
                memory("other_anon_kib"),
                memory("file_kib"),
                memory("threads")
            ),
        ),
    ];
    Ok(Run { pods, rows, first_pod_ms, later_p50_ms, per_pod_kib })
}

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<Section> {
    let mut runs = Vec::new();
    for (which, _) in CONTAINERDS {
        runs.push(measure(tools, args, which)?);
    }
    let mut header = vec!["figure"];
    header.extend(CONTAINERDS.iter().map(|(_, column)| *column));
    let mut section = Section::new(
        "w7",
        &format!("Kubernetes path: CRI RunPodSandbox + CreateContainer + StartContainer, {} pods", runs[0].pods.len()),
        &header,
    );
    for (at, (label, _)) in runs[0].rows.iter().enumerate() {
        let mut row = vec![label.clone()];
        row.extend(runs.iter().map(|run| run.rows[at].1.clone()));
        section.row(row);
    }
    let (idle_per_pod, instance) = memory_split(tools, args)?;
    let mut split = vec![
        "of which: a pod once its instance scaled to zero / its live `hello` instance, KiB (2.3.4; pods with \
         idle_timeout_s = 1)"
            .to_string(),
        format!("{idle_per_pod:.0} / {instance:.0}"),
    ];
    split.resize(header.len(), "—".to_string());
    section.row(split);
    let primary = &runs[0];
    section.note(format!(
        "containerd 2.3.4 with the Sandbox API: later pods' p50 to first response {:.1} ms (target ≤ 30 ms: {}), \
         host memory per extra pod {:.0} KiB (target ≤ 256 KiB: {}), first pod {:.1} ms (target ≤ 150 ms: {}); \
         containerd 1.6.20 with its pause container, for comparison: p50 {:.1} ms",
        primary.later_p50_ms,
        verdict(primary.later_p50_ms <= 30.0),
        primary.per_pod_kib,
        verdict(primary.per_pod_kib <= 256.0),
        primary.first_pod_ms,
        verdict(primary.first_pod_ms <= 150.0),
        runs[1].later_p50_ms,
    ));
    section.data = json!({
        "containerd_2_3": { "pods": primary.pods, "later_first_response_p50_ms": primary.later_p50_ms,
                            "host_kib_per_extra_pod": primary.per_pod_kib, "first_pod_ms": primary.first_pod_ms },
        "memory_split_2_3": { "pod_without_instance_kib": idle_per_pod, "instance_kib": instance },
        "containerd_1_6": { "pods": runs[1].pods, "later_first_response_p50_ms": runs[1].later_p50_ms,
                            "host_kib_per_extra_pod": runs[1].per_pod_kib, "first_pod_ms": runs[1].first_pod_ms },
    });
    Ok(section)
}
