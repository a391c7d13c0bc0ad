//! What a kubelet sees of a Shoal pod on containerd 2.3.4: the CRI driven
//! with crictl 1.36 (the kubelet's own CRI client) with the fields the
//! kubelet sets — a pod cgroup parent, a log directory, DNS, namespace
//! options; a container log path; probes as ExecSync; StopContainer with a
//! grace period; container and pod stats; ContainerStatus' reason, exit
//! code and finish time.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::{Containerd, HANDLER, Registry, SERIAL, get_in_netns, until};
use crate::support::guest;

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// crictl, failing the test with its output (and the host's log) when it fails.
fn crictl(containerd: &Containerd, args: &[&str]) -> String {
    let output = containerd.crictl(args);
    assert!(
        output.status.success(),
        "crictl {}: {}\ncontainerd:\n{}\nhost:\n{}",
        args.join(" "),
        text(&output),
        tail(&containerd.log()),
        tail(&containerd.host_log())
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// The pod cgroup the kubelet makes (cgroupfs driver) before RunPodSandbox,
/// in every cgroup v1 hierarchy containerd reads stats from.
struct PodCgroup {
    parent: String,
    dirs: Vec<PathBuf>,
}

impl PodCgroup {
    fn create(uid: &str) -> PodCgroup {
        let parent = format!("/kubepods-shoal-test/besteffort/pod{uid}");
        let mut dirs = Vec::new();
        for controller in ["cpu", "cpuacct", "memory", "pids", "blkio", "cpuset", "devices", "freezer"] {
            let root = Path::new("/sys/fs/cgroup").join(controller);
            if root.is_dir() {
                let dir = root.join(parent.trim_start_matches('/'));
                std::fs::create_dir_all(&dir).unwrap();
                dirs.push(dir);
            }
        }
        PodCgroup { parent, dirs }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            // The pod's own, then the two made above it (empty by then).
            for path in [dir.as_path(), dir.parent().unwrap(), dir.parent().unwrap().parent().unwrap()] {
                let _ = std::fs::remove_dir(path);
            }
        }
    }
}

/// A pod config as the kubelet writes it for a pod with one container.
fn pod_config(name: &str, uid: &str, cgroup: &PodCgroup, log_directory: &Path) -> Value {
    json!({
        "metadata": { "name": name, "namespace": "shop", "uid": uid, "attempt": 0 },
        "hostname": name,
        "log_directory": log_directory,
        "dns_config": { "servers": ["10.96.0.10"], "searches": ["shop.svc.cluster.local", "svc.cluster.local"], "options": ["ndots:5"] },
        "labels": { "app": name, "io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.uid": uid },
        "annotations": { "kubernetes.io/config.source": "api" },
        "linux": {
            "cgroup_parent": cgroup.parent,
            "security_context": { "namespace_options": { "network": 0, "pid": 1, "ipc": 0 } },
        },
    })
}

/// A container config as the kubelet writes it.
fn container_config(image: &str, name: &str) -> Value {
    json!({
        "metadata": { "name": name, "attempt": 0 },
        "image": { "image": image },
        "log_path": format!("{name}/0.log"),
        "envs": [{ "key": "SHOAL_HTTP_PORT", "value": "8080" }],
        "labels": { "io.kubernetes.container.name": name },
        "linux": {
            "resources": { "cpu_period": 100000, "cpu_quota": 50000, "cpu_shares": 512, "memory_limit_in_bytes": 67108864, "oom_score_adj": 1000 },
            "security_context": { "namespace_options": { "network": 0, "pid": 1, "ipc": 0 } },
        },
        "termination_message_path": "/dev/termination-log",
    })
}

fn write_json(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubelet_runs_probes_reads_logs_and_stats_and_stops_a_shoal_pod_within_its_grace_period() {
    let _serial = SERIAL.lock().await;
    let registry = Registry::start();
    let image = registry.push(&guest("lifecycle"), "shoal-test/lifecycle:1", &["--env", "SHOAL_HTTP_PORT=8080"]);
    let debug_image = registry.push(&guest("cli-hello"), "shoal-test/debug:1", &["--env", "GREETING_NAME=debugger"]);
    let containerd = Containerd::start(Some(&registry));
    let work = tempfile::tempdir().unwrap();
    // The CRI pulls the image and unpacks it (containerd 2.3 unpacks only
    // layers whose config names a Linux platform).
    crictl(&containerd, &["pull", &image]);
    crictl(&containerd, &["pull", &debug_image]);

    let uid = "6f0c1b2e-0000-4000-8000-000000000001";
    let cgroup = PodCgroup::create(uid);
    let log_directory = containerd.log_dir.join("shop_web_uid1");
    std::fs::create_dir_all(&log_directory).unwrap();
    let pod_json = write_json(work.path(), "pod.json", &pod_config("web", uid, &cgroup, &log_directory));
    let container_json = write_json(work.path(), "container.json", &container_config(&image, "web"));

    let began = Instant::now();
    let pod = crictl(&containerd, &["runp", "--runtime", HANDLER, &pod_json]);
    let container = crictl(&containerd, &["create", &pod, &container_json, &pod_json]);
    crictl(&containerd, &["start", &container]);
    let started_in = began.elapsed();

    // The pod has no pause container: containerd holds one container for
    // it, the app's, and the host owns the sandbox (containerd's Sandbox API).
    let containers = containerd.ctr("k8s.io", &["containers", "ls", "-q"]);
    assert_eq!(String::from_utf8_lossy(&containers.stdout).trim(), container, "{}", text(&containers));
    let inspect = json_of(&crictl(&containerd, &["inspectp", "-o", "json", &pod]));
    assert_eq!(inspect["status"]["state"], "SANDBOX_READY", "{inspect:#}");
    let annotations = &inspect["info"]["runtimeSpec"]["annotations"];
    assert_eq!(annotations["dev.shoal.sandboxer"], "shim", "{inspect:#}");
    assert_eq!(annotations["dev.shoal.namespace"], "shop", "{inspect:#}");
    let ip = inspect["status"]["network"]["ip"].as_str().unwrap_or_default().to_string();
    assert!(!ip.is_empty(), "the CNI gave the pod an address: {inspect:#}");
    let netns = PathBuf::from(inspect["info"]["runtimeSpec"]["linux"]["namespaces"][0]["path"].as_str().unwrap());

    // It serves on its address; a probe is an ExecSync of `shoal invoke`.
    let (status, body) = get_in_netns(&netns, &format!("{ip}:8080"), "/").unwrap();
    assert_eq!(status, 200, "{body}");
    let probe = crictl(&containerd, &["exec", "--sync", "--timeout", "5", &container, "shoal", "invoke", "/"]);
    assert!(probe.contains(r#""started":true"#), "the probe's output is the function's answer: {probe}");

    // kubectl debug: another container in the running pod (an ephemeral
    // container is a CreateContainer like any), here a wasi:cli program.
    let debug_json = write_json(work.path(), "debug.json", &container_config(&debug_image, "debugger"));
    let debugger = crictl(&containerd, &["create", &pod, &debug_json, &pod_json]);
    crictl(&containerd, &["start", &debugger]);
    until(
        Duration::from_secs(10),
        || {
            containerd
                .crictl(&["inspect", "-o", "json", &debugger])
                .stdout
                .windows(16)
                .any(|w| w == b"CONTAINER_EXITED")
        },
        || text(&containerd.crictl(&["inspect", &debugger])),
    )
    .await;
    let said = crictl(&containerd, &["logs", &debugger]);
    assert!(said.contains("hello, debugger"), "the debug program ran in the pod: {said}");
    crictl(&containerd, &["rm", &debugger]);

    // kubectl logs: the container's log file, through the CRI.
    let log_file = log_directory.join("web/0.log");
    until(
        Duration::from_secs(10),
        || std::fs::read_to_string(&log_file).is_ok_and(|t| t.contains("lifecycle: start")),
        || std::fs::read_to_string(&log_file).unwrap_or_default(),
    )
    .await;
    let logs = containerd.crictl(&["logs", &container]);
    assert!(text(&logs).contains("lifecycle: start"), "{}", text(&logs));

    // kubectl attach: the CRI streams the container's output as it is
    // written (it copies it from the container's FIFOs itself).
    let mut attach = std::process::Command::new(crate::cluster::containerd2_bin_dir().join("crictl"))
        .args(["--runtime-endpoint", &format!("unix://{}", containerd.address.display()), "attach", &container])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let (status, _) = get_in_netns(&netns, &format!("{ip}:8080"), "/?attached").unwrap();
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(1000));
    let _ = attach.kill(); // crictl ignores SIGTERM while attached
    let attached = attach.wait_with_output().unwrap();
    let attached = String::from_utf8_lossy(&attached.stdout);
    assert!(attached.contains("lifecycle: request"), "kubectl attach shows what the function writes: {attached:?}");

    // Log rotation: the kubelet renames the file and asks the CRI to reopen it.
    let rotated = log_file.with_extension("log.20261205-000000");
    std::fs::rename(&log_file, &rotated).unwrap();
    let mut cri = containerd.cri().await;
    cri.runtime
        .reopen_container_log(k8s_cri::v1::ReopenContainerLogRequest { container_id: container.clone() })
        .await
        .unwrap();
    let (status, _) = get_in_netns(&netns, &format!("{ip}:8080"), "/?rotated").unwrap();
    assert_eq!(status, 200);
    until(
        Duration::from_secs(10),
        || std::fs::read_to_string(&log_file).is_ok_and(|t| t.contains("lifecycle: request")),
        || format!("new log: {:?}", std::fs::read_to_string(&log_file)),
    )
    .await;

    // kubectl top: container stats, and pod stats, from Shoal's metering.
    let stats = json_of(&crictl(&containerd, &["stats", "-o", "json", "--id", &container]));
    let cpu = stats["stats"][0]["cpu"]["usageCoreNanoSeconds"]["value"].as_str().unwrap_or("0").parse::<u64>().unwrap();
    let memory =
        stats["stats"][0]["memory"]["workingSetBytes"]["value"].as_str().unwrap_or("0").parse::<u64>().unwrap();
    assert!(cpu > 0 && memory > 0, "{stats:#}");
    let pod_stats = json_of(&crictl(&containerd, &["statsp", "-o", "json", "--id", &pod]));
    let entry = &pod_stats["stats"][0];
    assert_eq!(entry["attributes"]["id"], pod.as_str(), "{pod_stats:#}");
    let in_pod = &entry["linux"]["containers"][0];
    assert_eq!(in_pod["attributes"]["id"], container.as_str(), "{pod_stats:#}");
    assert!(in_pod["cpu"]["usageCoreNanoSeconds"]["value"].as_str().is_some_and(|v| v != "0"), "{pod_stats:#}");

    // The pod's own metrics through containerd's sandbox controller
    // (SandboxMetrics): its containers' usage, from Shoal's metering.
    {
        use containerd_client::services::v1::sandbox::ControllerMetricsRequest;
        use containerd_client::tonic::Request;
        use containerd_shim_protos::cgroups_v2::metrics::Metrics as CgroupMetrics;
        use containerd_shim_protos::protobuf::Message as _;
        let client = containerd_client::Client::from_path(&containerd.address).await.unwrap();
        let request = containerd_client::with_namespace!(
            ControllerMetricsRequest { sandbox_id: pod.clone(), sandboxer: "shim".into() },
            "k8s.io"
        );
        let metric = client.sandbox_controller().metrics(request).await.unwrap().into_inner().metrics.unwrap();
        let data = metric.data.unwrap();
        assert_eq!(data.type_url, "io.containerd.cgroups.v2.Metrics");
        let metrics = CgroupMetrics::parse_from_bytes(&data.value).unwrap();
        assert!(metrics.cpu.usage_usec > 0, "{metrics:?}");
        assert!(metrics.memory.usage > 0 && metrics.memory.usage_limit == 64 << 20, "{metrics:?}");
    }

    // StopContainer with a grace period: SIGTERM drains, destroy() runs,
    // exit 0, well within the grace period.
    let stopping = Instant::now();
    crictl(&containerd, &["stop", "--timeout", "10", &container]);
    let stopped_in = stopping.elapsed();
    assert!(stopped_in < Duration::from_secs(5), "StopContainer took {stopped_in:?}");
    let status = json_of(&crictl(&containerd, &["inspect", "-o", "json", &container]));
    assert_eq!(status["status"]["state"], "CONTAINER_EXITED", "{status:#}");
    assert_eq!(status["status"]["exitCode"], 0, "{status:#}");
    assert_eq!(status["status"]["reason"], "Completed", "{status:#}");
    assert!(status["status"]["finishedAt"].as_str().is_some_and(|at| !at.starts_with("1970")), "{status:#}");
    let logs = std::fs::read_to_string(&log_file).unwrap();
    assert!(logs.contains("lifecycle: destroy after"), "destroy() ran: {logs}");

    // Remove and tear down, as the kubelet does.
    crictl(&containerd, &["rm", &container]);
    crictl(&containerd, &["stopp", &pod]);
    crictl(&containerd, &["rmp", &pod]);
    assert_eq!(crictl(&containerd, &["pods", "-q"]), "", "no pods left");
    assert!(!netns.exists(), "the pod's network namespace is gone");
    eprintln!("pod started in {started_in:?}, stopped in {stopped_in:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_still_draining_when_its_grace_period_ends_is_killed_with_137() {
    let _serial = SERIAL.lock().await;
    let registry = Registry::start();
    let image = registry.push(&guest("slow"), "shoal-test/slow:1", &["--label", "shoal.dev/limits.timeout_ms=20000"]);
    let containerd = Containerd::start(Some(&registry));
    let work = tempfile::tempdir().unwrap();
    crictl(&containerd, &["pull", &image]);
    let uid = "6f0c1b2e-0000-4000-8000-000000000002";
    let cgroup = PodCgroup::create(uid);
    let log_directory = containerd.log_dir.join("shop_slow_uid2");
    std::fs::create_dir_all(&log_directory).unwrap();
    let pod_json = write_json(work.path(), "pod.json", &pod_config("slow", uid, &cgroup, &log_directory));
    let container_json = write_json(work.path(), "container.json", &container_config(&image, "slow"));
    let pod = crictl(&containerd, &["runp", "--runtime", HANDLER, &pod_json]);
    let container = crictl(&containerd, &["create", &pod, &container_json, &pod_json]);
    crictl(&containerd, &["start", &container]);
    let inspect = json_of(&crictl(&containerd, &["inspectp", "-o", "json", &pod]));
    let netns = PathBuf::from(inspect["info"]["runtimeSpec"]["linux"]["namespaces"][0]["path"].as_str().unwrap());

    // A request that takes 15 s is under way when the pod is stopped with a
    // grace period of 2 s: SIGTERM waits for it, SIGKILL ends it.
    let request = std::thread::spawn(move || get_in_netns(&netns, "127.0.0.1:8080", "/?ms=15000"));
    std::thread::sleep(Duration::from_millis(500));
    let stopping = Instant::now();
    crictl(&containerd, &["stop", "--timeout", "2", &container]);
    let took = stopping.elapsed();
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(8), "StopContainer took {took:?}");
    let status = json_of(&crictl(&containerd, &["inspect", "-o", "json", &container]));
    assert_eq!(status["status"]["state"], "CONTAINER_EXITED", "{status:#}");
    assert_eq!(status["status"]["exitCode"], 137, "{status:#}");
    assert!(request.join().unwrap().is_err() || took < Duration::from_secs(15), "the request was cut off");
    crictl(&containerd, &["rm", &container]);
    crictl(&containerd, &["stopp", &pod]);
    crictl(&containerd, &["rmp", &pod]);
}
