//! The Kubernetes path on a real containerd: `ctr run` with the Shoal
//! runtime, the kubelet's CRI calls, many pods in one host, containerd
//! restarts and host crashes.

use std::time::Duration;

use crate::cluster::{
    Containerd, ContainerdOptions, Release, SERIAL, Sandboxer, build_image, cri_node, cri_node_with, get_in_netns,
    guest_p1, until,
};
use crate::support::guest;

pub(crate) const RUNTIME: &str = "io.containerd.shoal.v1";
/// CRI container states.
pub(crate) const CONTAINER_RUNNING: i32 = 1;
pub(crate) const CONTAINER_EXITED: i32 = 2;

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).unwrap().to_string();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
}

pub(crate) fn text(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

pub(crate) fn import(containerd: &Containerd, wasm: &std::path::Path, tag: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("image.tar");
    build_image(wasm, tag, &tar, extra);
    let output = containerd.ctr("default", &["images", "import", tar.to_str().unwrap()]);
    assert!(output.status.success(), "ctr images import: {}", text(&output));
}

/// A CNCF wasm artifact image (the wasm is the layer) is not unpacked:
/// containerd 2.x creates its container with no snapshot, and the host
/// reads the wasm from containerd's content store. containerd 1.6's CRI
/// and `ctr run` cannot get that far (they insist on unpacking), so the
/// container is created through containerd's API the way 2.x does.
#[tokio::test(flavor = "multi_thread")]
async fn a_cncf_wasm_artifact_image_runs_from_containerds_content_store() {
    use containerd_client::services::v1::container::Runtime;
    use containerd_client::services::v1::{
        Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest, StartRequest,
        WaitRequest,
    };
    use containerd_client::tonic::Request;
    use containerd_client::with_namespace;

    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("artifact.tar");
    let image = "localhost/shoal-test/cli-hello-artifact:1";
    build_image(&guest("cli-hello"), image, &tar, &["--artifact"]);
    let imported = containerd.ctr("default", &["images", "import", "--no-unpack", tar.to_str().unwrap()]);
    assert!(imported.status.success(), "ctr images import: {}", text(&imported));

    let client = containerd_client::Client::from_path(&containerd.address).await.unwrap();
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": { "args": ["cli-hello", "from-artifact"], "env": ["GREETING_NAME=artifact"],
                     "cwd": "/", "user": { "uid": 0, "gid": 0 } },
        "root": { "path": "rootfs" },
        "linux": { "namespaces": [{ "type": "network" }] },
    });
    let container = Container {
        id: "artifact-1".into(),
        image: image.into(),
        runtime: Some(Runtime { name: RUNTIME.into(), options: None }),
        spec: Some(prost_types::Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
            value: serde_json::to_vec(&spec).unwrap(),
        }),
        ..Default::default()
    };
    let request = with_namespace!(CreateContainerRequest { container: Some(container) }, "default");
    client.containers().create(request).await.unwrap();
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    std::fs::write(&stdout, "").unwrap();
    std::fs::write(&stderr, "").unwrap();
    let request = with_namespace!(
        CreateTaskRequest {
            container_id: "artifact-1".into(),
            stdout: stdout.display().to_string(),
            stderr: stderr.display().to_string(),
            ..Default::default()
        },
        "default"
    );
    if let Err(status) = client.tasks().create(request).await {
        panic!("creating the task: {}\n{}", status.message(), containerd.host_log());
    }
    let request = with_namespace!(StartRequest { container_id: "artifact-1".into(), ..Default::default() }, "default");
    client.tasks().start(request).await.unwrap();
    let request = with_namespace!(WaitRequest { container_id: "artifact-1".into(), ..Default::default() }, "default");
    let status = client.tasks().wait(request).await.unwrap().into_inner();
    let out = std::fs::read_to_string(&stdout).unwrap();
    assert_eq!(status.exit_status, 0, "the program exits 0: {out}\n{}", containerd.host_log());
    assert!(out.contains(r#"hello from a wasi:cli command, args ["from-artifact"]"#), "{out}");
    assert!(out.contains("hello, artifact"), "{out}");
    assert!(std::fs::read_to_string(&stderr).unwrap().contains("cli-hello: done"));

    let request = with_namespace!(DeleteTaskRequest { container_id: "artifact-1".into() }, "default");
    client.tasks().delete(request).await.unwrap();
    let request = with_namespace!(DeleteContainerRequest { id: "artifact-1".into() }, "default");
    client.containers().delete(request).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_run_runs_a_wasm_image_and_reports_its_output_and_exit_code() {
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);

    // A wasi:cli component built into an image by `shoal image build`.
    import(&containerd, &guest("cli-hello"), "localhost/shoal-test/cli-hello:1", &["-e", "GREETING_NAME=containerd"]);
    let output = containerd.ctr(
        "default",
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "localhost/shoal-test/cli-hello:1",
            "hello-p2",
            "/cli-hello.wasm",
            "one",
            "two",
        ],
    );
    let out = text(&output);
    assert!(output.status.success(), "ctr run failed: {out}\n{}", containerd.host_log());
    assert!(out.contains(r#"hello from a wasi:cli command, args ["one", "two"]"#), "{out}");
    assert!(out.contains("hello, containerd"), "the image's environment reaches the program: {out}");
    assert!(out.contains("cli-hello.wasm"), "the rootfs is the program's /: {out}");
    assert!(out.contains("cli-hello: done"), "stderr reaches ctr too: {out}");

    // A classic wasm32-wasip1 command module; its exit code is the task's.
    import(&containerd, &guest_p1("cli-hello"), "localhost/shoal-test/cli-hello-p1:1", &[]);
    let output = containerd.ctr(
        "default",
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--env",
            "EXIT_CODE=3",
            "localhost/shoal-test/cli-hello-p1:1",
            "hello-p1",
        ],
    );
    let out = text(&output);
    assert_eq!(output.status.code(), Some(3), "the module's exit code is ctr's: {out}\n{}", containerd.host_log());
    assert!(out.contains("hello from a wasi:cli command, args []"), "{out}");

    // containerd heard the task's life in order.
    let mut events =
        containerd.ctr_command("default").args(["events"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let output = containerd
        .ctr("default", &["run", "--rm", "--runtime", RUNTIME, "localhost/shoal-test/cli-hello:1", "watched"]);
    assert!(output.status.success(), "{}", text(&output));
    std::thread::sleep(Duration::from_millis(300));
    let _ = events.kill();
    let mut seen = String::new();
    std::io::Read::read_to_string(events.stdout.as_mut().unwrap(), &mut seen).unwrap();
    let _ = events.wait();
    let topics: Vec<&str> = seen
        .lines()
        .filter(|line| line.contains("watched"))
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with("/tasks/")))
        .collect();
    assert_eq!(topics, ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], "{seen}");

    // Both containers were served by one host, which is still up; no shim
    // process stayed behind.
    assert_eq!(containerd.node_hosts().len(), 1, "one Shoal host per containerd namespace");
    assert_eq!(containerd.shim_processes(), 0, "shims exit after `start`");
}

/// Lines printed with `--lines N` by `cli-hello`, as `ctr` passed them on.
pub(crate) fn numbered_lines(out: &str) -> usize {
    out.lines().filter(|line| line.starts_with("line ")).count()
}

/// `ctr` closes its readers of a task's FIFOs as soon as it deletes the
/// task, which it does once it hears the task ended: a program's output
/// must all be in its hands by then. Here `ctr` takes it late: the test
/// reads none of its stdout until the program has ended, so `ctr`'s own
/// stdout pipe fills, and what the program wrote past that waits in the
/// container's FIFO.
#[tokio::test(flavor = "multi_thread")]
async fn ctr_run_gets_all_of_a_programs_output_even_when_it_takes_it_late() {
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    import(&containerd, &guest("cli-hello"), "localhost/shoal-test/cli-hello:1", &[]);
    // ≈106 KB: more than ctr's stdout pipe holds (64 KiB), less than it
    // and the FIFO do (128 KiB: a full FIFO drops lines).
    let lines = 6_000;
    let mut child = containerd
        .ctr_command("default")
        .args(["run", "--rm", "--runtime", RUNTIME, "localhost/shoal-test/cli-hello:1", "late-reader"])
        .args(["/cli-hello.wasm", "--lines", &lines.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = last_word_then_wait(&mut child).await;
    let output = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}{stderr}\n{}", containerd.host_log());
    let tail: String = out.chars().rev().take(200).collect::<Vec<_>>().into_iter().rev().collect();
    assert_eq!(
        numbered_lines(&out),
        lines,
        "every line the program printed reaches ctr; its output ends with {tail:?}\n{}",
        containerd.host_log()
    );
}

/// Read `ctr`'s stderr (not its stdout) until `cli-hello` says it is done,
/// its last word before it ends; then wait half a second, in which `ctr`
/// hears of the end and deletes the process. What `ctr` wrote to stderr.
pub(crate) async fn last_word_then_wait(child: &mut std::process::Child) -> String {
    let stderr = child.stderr.take().unwrap();
    let reading = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let mut text = String::new();
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            text.push_str(&line);
            text.push('\n');
            if line.contains("cli-hello: done") {
                break;
            }
        }
        text
    });
    // A program that never says it is done leaves ctr waiting on its
    // full stdout for good: bounded, and ctr killed.
    let text = match tokio::time::timeout(Duration::from_secs(60), reading).await {
        Ok(text) => text.unwrap(),
        Err(_) => {
            let _ = child.kill();
            panic!("the program did not say it was done within 60 s");
        }
    };
    assert!(text.contains("cli-hello: done"), "the program ran to its end: {text}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    text
}

/// A program's end waits for its output's reader, up to 2 s of it taking
/// nothing (`ctr run -d` reads nothing once it returns, and this program
/// prints its last lines 300 ms after it starts); a kill in that wait
/// ends the wait, and the program's own exit status is the one told.
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_while_a_programs_output_waits_for_a_reader_keeps_the_programs_exit_status() {
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    import(&containerd, &guest("cli-hello"), "localhost/shoal-test/cli-hello:1", &[]);
    let image = "localhost/shoal-test/cli-hello:1";
    let run = containerd.ctr(
        "default",
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--env",
            "SPIN_MS=300",
            "--env",
            "EXIT_CODE=3",
            image,
            "unread",
            "/cli-hello.wasm",
        ],
    );
    assert!(run.status.success(), "{}\n{}", text(&run), containerd.host_log());
    until(
        Duration::from_secs(20),
        || {
            containerd
                .host_log()
                .lines()
                .any(|line| line.contains("container=unread") && line.contains("program ended"))
        },
        || containerd.host_log(),
    )
    .await;
    let kill = containerd.ctr("default", &["task", "kill", "-s", "SIGKILL", "unread"]);
    assert!(kill.status.success(), "{}", text(&kill));
    until(
        Duration::from_secs(20),
        || {
            text(&containerd.ctr("default", &["task", "ls"]))
                .lines()
                .any(|l| l.contains("unread") && l.contains("STOPPED"))
        },
        || text(&containerd.ctr("default", &["task", "ls"])),
    )
    .await;
    // `ctr task rm` says a task's exit status when it is not 0 (a WASI 0.2
    // program's exit is a success or a failure: EXIT_CODE=3 is 1).
    let removed = containerd.ctr("default", &["task", "rm", "unread"]);
    assert!(
        text(&removed).contains("exit with non-zero exit code 1\""),
        "the program's own status, not the kill's 137: {}\n{}",
        text(&removed),
        containerd.host_log()
    );
    let _ = containerd.ctr("default", &["containers", "rm", "unread"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn ctr_run_of_an_image_whose_wasm_is_missing_fails_with_a_clear_error() {
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    import(&containerd, &guest("cli-hello"), "localhost/shoal-test/cli-hello:1", &[]);
    let output = containerd.ctr(
        "default",
        &["run", "--rm", "--runtime", RUNTIME, "localhost/shoal-test/cli-hello:1", "wrong", "/nothing-here.wasm"],
    );
    let out = text(&output);
    assert!(!output.status.success());
    assert!(out.contains("/nothing-here.wasm"), "the error names the missing entrypoint: {out}");
    // The host answers NOT_FOUND, which containerd carries to its client as
    // such, not as an invalid argument.
    let created = containerd.ctr(
        "default",
        &[
            "containers",
            "create",
            "--runtime",
            RUNTIME,
            "localhost/shoal-test/cli-hello:1",
            "coded",
            "/nothing-here.wasm",
        ],
    );
    assert!(created.status.success(), "{}", text(&created));
    use containerd_client::tonic::Request;
    let client = containerd_client::Client::from_path(&containerd.address).await.unwrap();
    let request = containerd_client::with_namespace!(
        containerd_client::services::v1::snapshots::MountsRequest {
            snapshotter: "overlayfs".into(),
            key: "coded".into()
        },
        "default"
    );
    let rootfs = client.snapshots().mounts(request).await.unwrap().into_inner().mounts;
    let request = containerd_client::with_namespace!(
        containerd_client::services::v1::CreateTaskRequest {
            container_id: "coded".into(),
            rootfs,
            ..Default::default()
        },
        "default"
    );
    let refused = client.tasks().create(request).await.expect_err("no task of a missing entrypoint");
    assert_eq!(refused.code(), containerd_client::tonic::Code::NotFound, "containerd sees NOT_FOUND: {refused}");
    assert!(refused.message().contains("/nothing-here.wasm"), "{refused}");
    let _ = containerd.ctr("default", &["containers", "rm", "coded"]);
    // The host that refused it keeps serving.
    let output =
        containerd.ctr("default", &["run", "--rm", "--runtime", RUNTIME, "localhost/shoal-test/cli-hello:1", "right"]);
    assert!(output.status.success(), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_runs_through_the_cri_like_a_container() {
    let _serial = SERIAL.lock().await;
    let (_registry, containerd, mut cri, image) = cri_node(
        &guest("lifecycle"),
        "shoal-test/lifecycle:1",
        &["--label", "shoal.dev/limits.timeout_ms=3000", "--env", "SHOAL_HTTP_PORT=8080"],
    )
    .await;
    let pod = cri
        .run_pod(&containerd.log_dir, "lifecycle", &image, &[("shoal.dev/limits.max_concurrency", "4")], 64 << 20)
        .await;

    // The function answers on the pod's own addresses, inside its namespace.
    let (status, body) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""started":true"#), "start() ran before the first request: {body}");
    assert!(!pod.ip.is_empty(), "the CNI gave the pod an address");
    let (status, _) = get_in_netns(&pod.netns, &format!("{}:8080", pod.ip), "/").unwrap();
    assert_eq!(status, 200);

    // Its output is in the container's log file, as `kubectl logs` reads it.
    let log = pod.log_file.clone();
    until(
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("lifecycle: request 2")),
        || std::fs::read_to_string(&log).unwrap_or_default(),
    )
    .await;
    let lines = std::fs::read_to_string(&log).unwrap();
    assert!(lines.contains("stdout F lifecycle: start"), "CRI log format with the guest's line: {lines}");

    // Stats come from Shoal's metering.
    let stats = cri
        .runtime
        .container_stats(k8s_cri::v1::ContainerStatsRequest { container_id: pod.container_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    let cpu = stats.cpu.and_then(|cpu| cpu.usage_core_nano_seconds).map_or(0, |v| v.value);
    let memory = stats.memory.and_then(|m| m.working_set_bytes).map_or(0, |v| v.value);
    assert!(cpu > 0, "CPU from the ledger's counters");
    assert!(memory > 0, "memory from the function's code and instances");

    // StopContainer: SIGTERM drains, destroy() runs, exit code 0.
    cri.runtime
        .stop_container(k8s_cri::v1::StopContainerRequest { container_id: pod.container_id.clone(), timeout: 10 })
        .await
        .unwrap();
    let (state, exit_code) = cri.container_state(&pod.container_id).await;
    assert_eq!((state, exit_code), (CONTAINER_EXITED, 0));
    until(
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("lifecycle: destroy after 2 requests")),
        || std::fs::read_to_string(&log).unwrap_or_default(),
    )
    .await;
    assert!(get_in_netns(&pod.netns, "127.0.0.1:8080", "/").is_err(), "the listener is closed");

    // RemovePodSandbox cleans up: no containers, no namespace, host idle.
    cri.runtime
        .remove_container(k8s_cri::v1::RemoveContainerRequest { container_id: pod.container_id.clone() })
        .await
        .unwrap();
    cri.remove_pod(&pod).await;
    let containers = cri.runtime.list_containers(k8s_cri::v1::ListContainersRequest::default()).await.unwrap();
    assert!(containers.into_inner().containers.is_empty());
    assert!(!pod.netns.exists(), "the pod's network namespace is gone");
    let listed = containerd.ctr("k8s.io", &["tasks", "ls", "-q"]);
    assert!(String::from_utf8_lossy(&listed.stdout).trim().is_empty(), "no tasks left: {}", text(&listed));
}

/// The core of the CRI lifecycle on the containerd `options` describe: a
/// pod runs and serves on its address, ExecSync answers from its function,
/// its log and stats come through, containerd restarts under it, and
/// StopContainer drains it (exit 0) and removal leaves nothing behind.
async fn core_lifecycle(options: ContainerdOptions<'_>) {
    let (_registry, mut containerd, mut cri, image) =
        cri_node_with(options, &guest("lifecycle"), "shoal-test/lifecycle:1", &["--env", "SHOAL_HTTP_PORT=8080"]).await;
    let pod = cri.run_pod(&containerd.log_dir, "core", &image, &[], 64 << 20).await;
    let (status, body) = get_in_netns(&pod.netns, &format!("{}:8080", pod.ip), "/").unwrap();
    assert_eq!(status, 200, "{body}");
    let reply = cri
        .runtime
        .exec_sync(k8s_cri::v1::ExecSyncRequest {
            container_id: pod.container_id.clone(),
            cmd: ["shoal", "invoke", "/"].map(String::from).to_vec(),
            timeout: 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.exit_code, 0, "{reply:?}");
    assert!(String::from_utf8_lossy(&reply.stdout).contains(r#""started":true"#), "{reply:?}");
    let log = pod.log_file.clone();
    until(
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("stdout F lifecycle: start")),
        || std::fs::read_to_string(&log).unwrap_or_default(),
    )
    .await;
    let stats = cri
        .runtime
        .container_stats(k8s_cri::v1::ContainerStatsRequest { container_id: pod.container_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert!(stats.cpu.and_then(|cpu| cpu.usage_core_nano_seconds).is_some_and(|v| v.value > 0));

    containerd.restart();
    let mut cri = containerd.cri().await;
    cri.wait_ready().await;
    assert_eq!(cri.container_state(&pod.container_id).await.0, CONTAINER_RUNNING, "reconnected after the restart");
    let (status, _) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/").unwrap();
    assert_eq!(status, 200, "still serving");

    cri.runtime
        .stop_container(k8s_cri::v1::StopContainerRequest { container_id: pod.container_id.clone(), timeout: 10 })
        .await
        .unwrap();
    assert_eq!(cri.container_state(&pod.container_id).await, (CONTAINER_EXITED, 0));
    cri.runtime
        .remove_container(k8s_cri::v1::RemoveContainerRequest { container_id: pod.container_id.clone() })
        .await
        .unwrap();
    cri.remove_pod(&pod).await;
    let listed = containerd.ctr("k8s.io", &["tasks", "ls", "-q"]);
    assert!(String::from_utf8_lossy(&listed.stdout).trim().is_empty(), "no tasks left: {}", text(&listed));
    assert!(!pod.netns.exists(), "the pod's network namespace is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_core_cri_lifecycle_works_on_containerd_1_6() {
    let _serial = SERIAL.lock().await;
    core_lifecycle(ContainerdOptions { release: Release::V1_6, ..Default::default() }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_core_cri_lifecycle_works_on_containerd_2_with_pause_containers_too() {
    let _serial = SERIAL.lock().await;
    core_lifecycle(ContainerdOptions { sandboxer: Sandboxer::PodSandbox, ..Default::default() }).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_core_cri_lifecycle_works_on_containerd_2_with_the_sandbox_api() {
    let _serial = SERIAL.lock().await;
    core_lifecycle(ContainerdOptions::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_pods_are_served_by_one_host_process() {
    let _serial = SERIAL.lock().await;
    let (_registry, containerd, mut cri, image) = cri_node(&guest("hello"), "shoal-test/hello:1", &[]).await;

    let mut starts = tokio::task::JoinSet::new();
    for n in 0..20 {
        let mut cri = containerd.cri().await;
        let image = image.clone();
        let log_dir = containerd.log_dir.clone();
        starts.spawn(async move { cri.run_pod(&log_dir, &format!("hello-{n}"), &image, &[], 0).await });
    }
    let mut pods = Vec::new();
    while let Some(pod) = starts.join_next().await {
        pods.push(pod.unwrap());
    }
    for pod in &pods {
        let (status, body) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/hello").unwrap();
        assert_eq!(status, 200, "{}: {body}", pod.sandbox_id);
    }
    assert_eq!(containerd.node_hosts().len(), 1, "every pod in one Shoal host");
    assert_eq!(containerd.shim_processes(), 0, "no process per pod");
    for pod in &pods {
        cri.remove_pod(pod).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_keep_serving_while_containerd_restarts() {
    let _serial = SERIAL.lock().await;
    let (_registry, mut containerd, mut cri, image) = cri_node(&guest("hello"), "shoal-test/hello:1", &[]).await;
    let pod = cri.run_pod(&containerd.log_dir, "steady", &image, &[], 0).await;
    let host = containerd.node_hosts();

    // A client keeps calling the pod (one request at a time, bounded)
    // while containerd stops and starts again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, netns) = (stop.clone(), pod.netns.clone());
        std::thread::spawn(move || {
            let (mut served, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && served < 100_000 {
                match get_in_netns(&netns, "127.0.0.1:8080", "/hello") {
                    Ok((200, _)) => served += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (served, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    containerd.restart();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = load.join().unwrap();
    assert!(failed.is_empty(), "{} of {} requests failed across the restart: {failed:?}", failed.len(), served);
    assert!(served > 10, "the load ran throughout: {served} requests");
    let mut cri = containerd.cri().await;
    cri.wait_ready().await;
    let (state, _) = cri.container_state(&pod.container_id).await;
    assert_eq!(state, CONTAINER_RUNNING, "containerd reconnected to the running task");
    assert_eq!(containerd.node_hosts(), host, "the same host process");

    // And it can still stop it.
    cri.runtime
        .stop_container(k8s_cri::v1::StopContainerRequest { container_id: pod.container_id.clone(), timeout: 10 })
        .await
        .unwrap();
    assert_eq!(cri.container_state(&pod.container_id).await, (CONTAINER_EXITED, 0));
    cri.remove_pod(&pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_host_is_seen_by_containerd_and_the_next_pod_brings_a_new_one() {
    let _serial = SERIAL.lock().await;
    let (_registry, containerd, mut cri, image) = cri_node(&guest("hello"), "shoal-test/hello:1", &[]).await;
    let pod = cri.run_pod(&containerd.log_dir, "doomed", &image, &[], 0).await;
    let hosts = containerd.node_hosts();
    assert_eq!(hosts.len(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(hosts[0]), nix::sys::signal::SIGKILL).unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (state, _) = cri.container_state(&pod.container_id).await;
        if state == CONTAINER_EXITED {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "containerd did not see the task exit\n{}", containerd.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cri.remove_pod(&pod).await;

    let again = cri.run_pod(&containerd.log_dir, "reborn", &image, &[], 0).await;
    let (status, _) = get_in_netns(&again.netns, "127.0.0.1:8080", "/hello").unwrap();
    assert_eq!(status, 200);
    let now = containerd.node_hosts();
    assert_eq!(now.len(), 1);
    assert_ne!(now, hosts, "a fresh host");
    cri.remove_pod(&again).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_cpu_limit_holds_its_function_to_its_share_and_its_stats_show_the_throttling() {
    use containerd_client::services::v1::MetricsRequest;
    use containerd_client::tonic::Request;
    use containerd_client::with_namespace;
    use containerd_shim_protos::cgroups_v2::metrics::Metrics as CgroupMetrics;
    use containerd_shim_protos::protobuf::Message as _;

    let _serial = SERIAL.lock().await;
    // Calls on the shared threads: at idle priority the spinner would also
    // wait for the CPU while other tests keep it busy, which is not
    // throttling (that priority has its own test, limits::a_cpu_limited_…).
    let registry = crate::cluster::Registry::start();
    let image =
        registry.push(&guest("endless"), "shoal-test/endless:1", &["--label", "shoal.dev/limits.timeout_ms=1500"]);
    let containerd = Containerd::start_with_env(Some(&registry), &[("SHOAL_CPU_LIMITED_PRIORITY", "normal")]);
    let mut cri = containerd.cri().await;
    cri.pull(&image).await;
    let options = crate::cluster::PodOptions { cpu_millis: 100, ..crate::cluster::PodOptions::new("spinner", &image) };
    let pod = cri.try_run_pod(&containerd.log_dir, options).await.unwrap_or_else(|err| panic!("{err}"));
    let (status, _) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/").unwrap();
    assert_eq!(status, 504, "the spinning request ran to its timeout");

    let client = containerd_client::Client::from_path(&containerd.address).await.unwrap();
    let request = with_namespace!(MetricsRequest { filters: vec![format!("id=={}", pod.container_id)] }, "k8s.io");
    let metrics = client.tasks().metrics(request).await.unwrap().into_inner().metrics;
    let data = metrics.first().and_then(|metric| metric.data.as_ref()).expect("the task's metrics");
    let stats = CgroupMetrics::parse_from_bytes(&data.value).unwrap();
    let cpu = stats.cpu.as_ref().unwrap();
    // 100m for 1.5 s: about 150 ms of CPU; the rest of the time it waited.
    assert!(cpu.usage_usec > 0 && cpu.usage_usec < 400_000, "{cpu:?}");
    assert!(cpu.throttled_usec > 1_000_000 && cpu.nr_throttled > 5, "{cpu:?}");
    cri.remove_pod(&pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_entrypoints_fail_creation_clearly_and_the_host_serves_on_unharmed() {
    let _serial = SERIAL.lock().await;
    let (_registry, containerd, mut cri, image) = cri_node(&guest("hello"), "shoal-test/hello:1", &[]).await;
    let pod = cri.run_pod(&containerd.log_dir, "bystander", &image, &[], 0).await;
    let host = containerd.node_hosts()[0];
    let before = rss_kib(host);

    let roots = tempfile::tempdir().unwrap();
    type Make<'a> = &'a dyn Fn(&std::path::Path);
    let cases: [(&str, Make, &str); 6] = [
        ("dev-zero", &|entry| std::os::unix::fs::symlink("/dev/zero", entry).unwrap(), "is not in the image's rootfs"),
        (
            "urandom",
            &|entry| std::os::unix::fs::symlink("../../../../dev/urandom", entry).unwrap(),
            "is not in the image's rootfs",
        ),
        (
            "host-file",
            &|entry| std::os::unix::fs::symlink("/etc/hostname", entry).unwrap(),
            "is not in the image's rootfs",
        ),
        (
            "fifo",
            &|entry| nix::unistd::mkfifo(entry, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap(),
            "is a FIFO",
        ),
        ("directory", &|entry| std::fs::create_dir(entry).unwrap(), "is a directory"),
        (
            "oversized",
            // Sparse: 300 MiB that take no disk, over the 256 MiB cap.
            &|entry| std::fs::File::create(entry).unwrap().set_len(300 << 20).unwrap(),
            "over the cap of 268435456 bytes",
        ),
    ];
    for (name, make, reason) in cases {
        let root = roots.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        make(&root.join("app.wasm"));
        let started = std::time::Instant::now();
        let output = containerd.ctr(
            "k8s.io",
            &["run", "--rm", "--runtime", RUNTIME, "--rootfs", root.to_str().unwrap(), name, "/app.wasm"],
        );
        let out = text(&output);
        assert!(!output.status.success(), "{name}: {out}");
        assert!(out.contains("/app.wasm") && out.contains(reason), "{name}: the error names the path and why: {out}");
        assert!(started.elapsed() < Duration::from_secs(5), "{name}: refused at once");
        let _ = containerd.ctr("k8s.io", &["containers", "rm", name]);
    }

    assert_eq!(containerd.node_hosts(), [host], "the same host process throughout");
    let after = rss_kib(host);
    assert!(after < before + 8 * 1024, "host RSS grew from {before} KiB to {after} KiB");
    let (status, _) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/hello").unwrap();
    assert_eq!(status, 200, "the pod beside them keeps answering");
    cri.remove_pod(&pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_flooding_its_output_grows_its_log_by_its_budget_only() {
    let _serial = SERIAL.lock().await;
    let (_registry, containerd, mut cri, image) = cri_node(&guest("panic"), "shoal-test/panic:1", &[]).await;
    let budget = [("shoal.dev/limits.log_bytes_per_second", "4096")];
    let pod = cri.run_pod(&containerd.log_dir, "noisy", &image, &budget, 0).await;
    let host = containerd.node_hosts()[0];
    let before = rss_kib(host);
    let started = std::time::Instant::now();
    // 200,000 lines, about 3.5 MB of output.
    for _ in 0..4 {
        let (status, body) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/flood?lines=50000").unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = std::fs::read_to_string(&pod.log_file).unwrap();
    let flood_bytes: usize =
        log.lines().filter_map(|line| line.split_once(" stdout F ")).map(|(_, text)| text.len() + 1).sum();
    // A burst of one 16 KiB line's worth, then 4 KiB a second.
    let allowed = 16_384.0 + 4_096.0 * (seconds + 1.0);
    let flood_lines = log.lines().filter(|line| line.contains("flood line")).count();
    let reports: Vec<&str> = log.lines().filter(|line| line.contains("shoal: dropped")).collect();
    assert!(
        (flood_bytes as f64) <= allowed,
        "{flood_bytes} bytes of output ({flood_lines} flood lines) in {seconds:.1} s (budget {allowed:.0}); {reports:?}"
    );
    assert!(log.contains("shoal: dropped "), "the drops are reported in the log");
    let after = rss_kib(host);
    assert!(after < before + 8 * 1024, "host RSS grew from {before} KiB to {after} KiB");
    cri.remove_pod(&pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_pod_holds_its_requests_until_resumed_and_a_resize_applies_without_a_restart() {
    use containerd_client::services::v1::{GetRequest, MetricsRequest, PauseTaskRequest, ResumeTaskRequest};
    use containerd_client::tonic::Request;
    use containerd_client::with_namespace;
    use containerd_shim_protos::cgroups_v2::metrics::Metrics as CgroupMetrics;
    use containerd_shim_protos::protobuf::Message as _;

    let _serial = SERIAL.lock().await;
    let (_registry, containerd, mut cri, image) = cri_node(&guest("hello"), "shoal-test/hello:1", &[]).await;
    let pod = cri
        .run_pod(&containerd.log_dir, "resizable", &image, &[("shoal.dev/limits.queue_timeout_ms", "2000")], 64 << 20)
        .await;
    assert_eq!(get_in_netns(&pod.netns, "127.0.0.1:8080", "/hello").unwrap().0, 200);

    let client = containerd_client::Client::from_path(&containerd.address).await.unwrap();
    let tasks = client.tasks();
    let id = pod.container_id.clone();
    let status = |mut tasks: containerd_client::services::v1::tasks_client::TasksClient<_>, id: String| async move {
        let request = with_namespace!(GetRequest { container_id: id, exec_id: String::new() }, "k8s.io");
        tasks.get(request).await.unwrap().into_inner().process.unwrap().status
    };
    let memory_limit = |mut tasks: containerd_client::services::v1::tasks_client::TasksClient<_>, id: String| async move {
        let request = with_namespace!(MetricsRequest { filters: vec![format!("id=={id}")] }, "k8s.io");
        let metrics = tasks.metrics(request).await.unwrap().into_inner().metrics;
        let data = metrics.first().and_then(|metric| metric.data.as_ref()).expect("the task's metrics").clone();
        CgroupMetrics::parse_from_bytes(&data.value).unwrap().memory.usage_limit
    };

    // Paused: a request waits; on Resume it is served.
    let pause = with_namespace!(PauseTaskRequest { container_id: id.clone() }, "k8s.io");
    tasks.clone().pause(pause).await.unwrap();
    assert_eq!(status(tasks.clone(), id.clone()).await, 4, "containerd sees the task PAUSED");
    let netns = pod.netns.clone();
    let waiting = std::thread::spawn(move || get_in_netns(&netns, "127.0.0.1:8080", "/hello"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!waiting.is_finished(), "a request to a paused pod waits");
    let resume = with_namespace!(ResumeTaskRequest { container_id: id.clone() }, "k8s.io");
    tasks.clone().resume(resume).await.unwrap();
    let (code, body) = waiting.join().unwrap().unwrap();
    assert_eq!((code, body.as_str()), (200, "hello, world\n"), "served once resumed");
    assert_eq!(status(tasks.clone(), id.clone()).await, 2, "RUNNING again");

    // Paused past the queue timeout: 503, naming the pause.
    let pause = with_namespace!(PauseTaskRequest { container_id: id.clone() }, "k8s.io");
    tasks.clone().pause(pause).await.unwrap();
    let (code, body) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/hello").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("is paused") && body.contains("queue_timeout of 2000 ms"), "{body}");
    let resume = with_namespace!(ResumeTaskRequest { container_id: id.clone() }, "k8s.io");
    tasks.clone().resume(resume).await.unwrap();

    // In-place resize through the CRI: the new memory budget holds, the
    // task never restarted, the pod answers throughout.
    assert_eq!(memory_limit(tasks.clone(), id.clone()).await, 64 << 20);
    let resources = k8s_cri::v1::LinuxContainerResources {
        memory_limit_in_bytes: 128 << 20,
        cpu_period: 100_000,
        cpu_quota: 50_000,
        ..Default::default()
    };
    cri.runtime
        .update_container_resources(k8s_cri::v1::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(resources),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|status| panic!("UpdateContainerResources: {status}\n{}", containerd.host_log()));
    assert_eq!(memory_limit(tasks.clone(), id.clone()).await, 128 << 20, "the new memory budget");
    assert_eq!(status(tasks.clone(), id.clone()).await, 2, "still the same running task");
    assert_eq!(get_in_netns(&pod.netns, "127.0.0.1:8080", "/hello").unwrap().0, 200);
    cri.remove_pod(&pod).await;
}

/// Every kind of wasm image through containerd 2.3's CRI (pulled from a
/// registry, as a kubelet does): the CNCF wasm artifact layout runs from
/// the content store; an image other tools list only for `wasi/wasm`
/// cannot be pulled at all (the CRI pulls the node's platform), and runs
/// once `shoal image convert` has listed it for Linux. (Shoal's own
/// images are what every other test runs.)
#[tokio::test(flavor = "multi_thread")]
async fn wasm_artifacts_and_converted_images_of_other_tools_run_through_the_cri() {
    use shoal_testing::layout::{Entry, write_image};

    let _serial = SERIAL.lock().await;
    let registry = crate::cluster::Registry::start();
    let containerd = Containerd::start(Some(&registry));
    let mut cri = containerd.cri().await;

    let artifact = registry.push(&guest("hello"), "shoal-test/hello-artifact:1", &["--artifact"]);
    cri.pull(&artifact).await;
    // An artifact's config names no entrypoint, and the CRI wants a
    // command: any names it (the host reads the image's wasm layer).
    let options = crate::cluster::PodOptions {
        command: &["hello.wasm"],
        ..crate::cluster::PodOptions::new("artifact", &artifact)
    };
    let pod = cri.try_run_pod(&containerd.log_dir, options).await.unwrap_or_else(|err| panic!("{err}"));
    let (status, body) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/hello").unwrap();
    assert_eq!((status, body.as_str()), (200, "hello, world\n"), "{}", containerd.host_log());
    cri.remove_pod(&pod).await;

    // As `docker buildx --platform wasi/wasm` writes it.
    let dir = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(guest("hello")).unwrap();
    let foreign = dir.path().join("buildx.tar");
    let config = serde_json::json!({
        "os": "wasi", "architecture": "wasm",
        "config": { "Entrypoint": ["/hello.wasm"], "Env": ["SHOAL_HTTP_PORT=8080"] },
    });
    let platform = serde_json::json!({ "os": "wasi", "architecture": "wasm" });
    let name = format!("{}/shoal-test/hello-wasi:1", registry.addr);
    write_image(&name, &[("hello.wasm", Entry::File(&wasm))], config, Some(platform), &foreign);
    let shoal = |args: &[&str]| {
        let output = std::process::Command::new(crate::support::shoal_bin()).args(args).output().unwrap();
        assert!(output.status.success(), "shoal {}: {}", args.join(" "), text(&output));
        text(&output)
    };
    shoal(&["image", "push", "--insecure", foreign.to_str().unwrap()]);
    let refused = cri
        .images
        .pull_image(k8s_cri::v1::PullImageRequest {
            image: Some(k8s_cri::v1::ImageSpec { image: name.clone(), ..Default::default() }),
            ..Default::default()
        })
        .await
        .expect_err("the CRI pulls only the node's platform");
    assert!(refused.message().contains("no match for platform"), "{refused}");

    let converted = dir.path().join("converted.tar");
    let tag = format!("{}/shoal-test/hello-wasi:2", registry.addr);
    let said =
        shoal(&["image", "convert", foreign.to_str().unwrap(), "--tag", &tag, "-o", converted.to_str().unwrap()]);
    assert!(said.contains("wasi/wasm image, listed for linux/amd64 and linux/arm64"), "{said}");
    shoal(&["image", "push", "--insecure", converted.to_str().unwrap()]);
    cri.pull(&tag).await;
    let pod = cri.run_pod(&containerd.log_dir, "converted", &tag, &[], 0).await;
    let (status, body) = get_in_netns(&pod.netns, "127.0.0.1:8080", "/hello").unwrap();
    assert_eq!((status, body.as_str()), (200, "hello, world\n"), "{}", containerd.host_log());
    cri.remove_pod(&pod).await;
}
