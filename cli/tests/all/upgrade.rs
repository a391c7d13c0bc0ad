//! Upgrading the node host in place (`shoal node --upgrade`): every pod
//! moves to the new host without a failed request or a task exit, a failed
//! new host hands the pods back, and programs that cannot move get a
//! deadline.

use std::time::Duration;

use crate::cluster::{Containerd, SERIAL, get_in_netns};
use crate::kubernetes::{CONTAINER_EXITED, CONTAINER_RUNNING, RUNTIME, import, text};
use crate::support::guest;

/// A bounded loop of requests to `pods` (one at a time, a new connection
/// each, as a load balancer's probes would) until `stop`: how many were
/// served, and what every failed one got.
fn load(
    pods: Vec<(std::path::PathBuf, &str)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u32, Vec<String>) {
    let (mut served, mut failed) = (0u32, Vec::new());
    while !stop.load(std::sync::atomic::Ordering::Relaxed) && served < 100_000 {
        for (netns, path) in &pods {
            match get_in_netns(netns, "127.0.0.1:8080", path) {
                Ok((200, _)) => served += 1,
                other => failed.push(format!("{other:?}")),
            }
        }
    }
    (served, failed)
}

/// `shoal node --upgrade` with `binary` installed where the host was
/// started from.
fn upgrade(containerd: &Containerd, installed: &std::path::Path, binary: &[u8]) -> std::process::Output {
    // As an installer does: a new file renamed over the old one.
    let staged = installed.with_extension("new");
    std::fs::write(&staged, binary).unwrap();
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, installed).unwrap();
    std::process::Command::new(crate::support::shoal_bin())
        .args(["node", "--upgrade", "--run-dir"])
        .arg(&containerd.run_dir)
        .output()
        .unwrap()
}

/// The binary a process runs.
fn exe_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap().display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_hands_every_pod_to_a_new_host_without_a_failed_request_or_a_task_exit() {
    let _serial = SERIAL.lock().await;
    let bin = tempfile::tempdir().unwrap();
    let installed = bin.path().join("shoal");
    let real = std::fs::read(crate::support::shoal_bin()).unwrap();
    std::fs::write(&installed, &real).unwrap();
    std::fs::set_permissions(&installed, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let registry = crate::cluster::Registry::start();
    let image = registry.push(&guest("hello"), "shoal-test/hello:1", &[]);
    let lifecycle = registry.push(&guest("lifecycle"), "shoal-test/lifecycle:1", &["--env", "SHOAL_HTTP_PORT=8080"]);
    let containerd = Containerd::start_with_env(Some(&registry), &[("SHOAL_BIN", installed.to_str().unwrap())]);
    let mut cri = containerd.cri().await;
    cri.pull(&image).await;
    cri.pull(&lifecycle).await;
    // A hello pod, and one whose function logs its start and destroy hooks.
    let pods = [
        cri.run_pod(&containerd.log_dir, "old-a", &image, &[], 0).await,
        cri.run_pod(&containerd.log_dir, "old-b", &lifecycle, &[], 0).await,
    ];
    let paths = ["/hello", "/"];
    let old = containerd.node_hosts();
    assert_eq!(old.len(), 1);
    let events_file = containerd.dir.path().join("events.txt");
    let mut events = containerd
        .ctr_command("default")
        .arg("events")
        .stdout(std::fs::File::create(&events_file).unwrap())
        .spawn()
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, netns) = (stop.clone(), pods.iter().map(|pod| pod.netns.clone()).zip(paths).collect());
        std::thread::spawn(move || load(netns, stop))
    };
    std::thread::sleep(Duration::from_millis(300));

    // A binary that does not start: refused before anything is let go.
    let output = upgrade(&containerd, &installed, b"#!/bin/sh\necho broken build >&2\nexit 3\n");
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("the new host did not start: it exited (exit status: 3)"), "{}", text(&output));
    assert_eq!(containerd.node_hosts(), old, "the old host serves on");

    // What the pods were created with changes under them: the node policy
    // is left unparseable, then tightened below what a pod was granted,
    // and a pod's artifact image is pushed again as garbage (and pulled).
    // A take-back serves every pod as it was created, whatever they say now.
    let artifact = registry.push(&guest("hello"), "shoal-test/hello-artifact:1", &["--artifact"]);
    cri.pull(&artifact).await;
    let options = crate::cluster::PodOptions {
        command: &["hello.wasm"],
        annotations: &[("shoal.dev/grants.keyvalue", "default:*")],
        ..crate::cluster::PodOptions::new("old-c", &artifact)
    };
    let granted = cri.try_run_pod(&containerd.log_dir, options).await.unwrap_or_else(|err| panic!("{err}"));
    std::fs::write(containerd.policy_file(), "[[rule]\nnot toml at all\n").unwrap();

    // A binary that starts, then cannot open the state the old host let
    // go of: the old host takes every pod back.
    let failing = format!(
        "#!/bin/bash\nargs=(); next=0\nfor a in \"$@\"; do\n  if [ $next = 1 ]; then args+=(/dev/null/state); next=0; continue; fi\n  [ \"$a\" = --state-dir ] && next=1\n  args+=(\"$a\")\ndone\nexec {} \"${{args[@]}}\"\n",
        crate::support::shoal_bin()
    );
    let output = upgrade(&containerd, &installed, failing.as_bytes());
    assert!(!output.status.success(), "{}", text(&output));
    let said = text(&output);
    assert!(said.contains("the new host failed") && said.contains("/dev/null/state"), "{said}");
    assert_eq!(containerd.node_hosts(), old, "the old host took the pods back");
    std::thread::sleep(Duration::from_millis(300));

    // Once more, with the policy granting nothing and the artifact garbage.
    std::fs::write(containerd.policy_file(), "[[rule]]\nnamespaces = [\"*\"]\n").unwrap();
    let garbage = containerd.dir.path().join("garbage.tar");
    shoal_testing::layout::write_artifact(&artifact, b"\0asm, or so it says", &garbage);
    let pushed = std::process::Command::new(crate::support::shoal_bin())
        .args(["image", "push", "--insecure"])
        .arg(&garbage)
        .output()
        .unwrap();
    assert!(pushed.status.success(), "{}", text(&pushed));
    cri.pull(&artifact).await;
    let output = upgrade(&containerd, &installed, failing.as_bytes());
    assert!(!output.status.success(), "{}", text(&output));
    assert_eq!(containerd.node_hosts(), old, "the old host took the pods back again:\n{}", containerd.host_log());
    let (status, body) = get_in_netns(&granted.netns, "127.0.0.1:8080", "/hello").unwrap();
    assert_eq!((status, body.as_str()), (200, "hello, world\n"), "the artifact pod serves what it was created with");
    assert_eq!(cri.container_state(&granted.container_id).await.0, CONTAINER_RUNNING);

    // The installer puts the real new binary in place: every pod moves to it.
    let source = tempfile::tempdir().unwrap();
    std::fs::write(source.path().join("shoal"), &real).unwrap();
    std::fs::copy(crate::cluster::shim_bin(), source.path().join("containerd-shim-shoal-v1")).unwrap();
    let output = std::process::Command::new("sh")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/installer/install.sh"))
        .env("SHOAL_SOURCE_DIR", source.path())
        .env("SHOAL_BIN_DIR", bin.path())
        .env("SHOAL_CONTAINERD_CONFIG", source.path().join("config.toml"))
        .env("SHOAL_POLICY", source.path().join("policy.toml"))
        .env("SHOAL_RESTART", "no")
        .env("SHOAL_RUN_DIR", &containerd.run_dir)
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}\n{}", text(&output), containerd.host_log());
    assert!(text(&output).contains("upgraded: pid"), "{}", text(&output));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (served, failed) = load.join().unwrap();
    assert!(failed.is_empty(), "{} of {served} requests failed across the upgrades: {failed:?}", failed.len());
    assert!(served > 20, "the load ran throughout: {served} requests");

    let new = containerd.node_hosts();
    assert_eq!(new.len(), 1, "one host: {new:?}");
    assert_ne!(new, old, "a new host process");
    assert_eq!(exe_of(new[0]), installed.display().to_string(), "running the newly installed file");
    for (pod, path) in pods.iter().chain([&granted]).zip(paths.into_iter().chain(["/hello"])) {
        let (status, body) = get_in_netns(&pod.netns, "127.0.0.1:8080", path).unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(cri.container_state(&pod.container_id).await.0, CONTAINER_RUNNING);
    }
    // Each host that let the function go ran its destroy hook, each that
    // took it ran start — and the pod's log (`kubectl logs`) has them all:
    // the hosts after the first write to the same container output.
    // (Tiering up may add a pair of its own: the baseline code's instance
    // retired for the optimized code's.)
    let log = std::fs::read_to_string(&pods[1].log_file).unwrap();
    let (starts, destroys) = (log.matches("lifecycle: start").count(), log.matches("lifecycle: destroy").count());
    assert!(destroys >= 2, "the old host drained it at the take-back and at the upgrade:\n{log}");
    assert_eq!(starts, destroys + 1, "every instance but the new host's was destroyed:\n{log}");
    let last_hook = log.lines().rfind(|line| line.contains("lifecycle: start") || line.contains("lifecycle: destroy"));
    assert!(last_hook.is_some_and(|line| line.contains("start")), "the new host's instance started last:\n{log}");
    let tasks = text(&containerd.ctr("k8s.io", &["tasks", "ls"]));
    assert!(tasks.contains(&new[0].to_string()) && !tasks.contains(&old[0].to_string()), "{tasks}");
    let _ = events.kill();
    let _ = events.wait();
    let seen = std::fs::read_to_string(&events_file).unwrap();
    assert!(!seen.contains("/tasks/exit"), "containerd saw a task exit:\n{seen}");

    // The new host serves the task API: containerd's `Wait`, carried over,
    // ends when the pod stops.
    cri.runtime
        .stop_container(k8s_cri::v1::StopContainerRequest { container_id: pods[0].container_id.clone(), timeout: 10 })
        .await
        .unwrap();
    assert_eq!(cri.container_state(&pods[0].container_id).await, (CONTAINER_EXITED, 0));
    for pod in pods.iter().chain([&granted]) {
        cri.remove_pod(pod).await;
    }
    let again = cri.run_pod(&containerd.log_dir, "after", &image, &[], 0).await;
    assert_eq!(get_in_netns(&again.netns, "127.0.0.1:8080", "/hello").unwrap().0, 200);
    assert_eq!(containerd.node_hosts(), new, "new pods go to the new host");

    // A paused pod stays paused across an upgrade and resumes in the next host.
    let paused = containerd.ctr("k8s.io", &["tasks", "pause", &again.container_id]);
    assert!(paused.status.success(), "{}", text(&paused));
    let output = upgrade(&containerd, &installed, &real);
    assert!(output.status.success(), "{}\n{}", text(&output), containerd.host_log());
    let tasks = text(&containerd.ctr("k8s.io", &["tasks", "ls"]));
    let line = tasks.lines().find(|line| line.starts_with(&again.container_id)).unwrap_or_else(|| panic!("{tasks}"));
    assert!(line.contains("PAUSED"), "{tasks}");
    let resumed = containerd.ctr("k8s.io", &["tasks", "resume", &again.container_id]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_eq!(get_in_netns(&again.netns, "127.0.0.1:8080", "/hello").unwrap().0, 200);
    cri.remove_pod(&again).await;
}

/// A wasi:cli program running (its state cannot move) refuses an upgrade,
/// unless the operator gives it a deadline: then it is ended (137) when
/// the deadline passes, and the upgrade goes on.
#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_with_a_deadline_ends_the_programs_still_running_and_goes_on() {
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    import(&containerd, &guest("cli-hello"), "localhost/shoal-test/cli-hello:1", &["-e", "SPIN_MS=120000"]);
    let run = containerd.ctr(
        "default",
        &["run", "-d", "--runtime", RUNTIME, "localhost/shoal-test/cli-hello:1", "long", "/cli-hello.wasm"],
    );
    assert!(run.status.success(), "{}", text(&run));
    let old = containerd.node_hosts();
    let upgrade = |extra: &[&str]| {
        std::process::Command::new(crate::support::shoal_bin())
            .args(["node", "--upgrade", "--run-dir"])
            .arg(&containerd.run_dir)
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = upgrade(&[]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("container long runs a wasi:cli program"), "{}", text(&refused));
    assert_eq!(containerd.node_hosts(), old, "the old host serves on");

    let began = std::time::Instant::now();
    let upgraded = upgrade(&["--end-programs-after", "1s"]);
    let said = text(&upgraded);
    assert!(upgraded.status.success(), "{said}\n{}", containerd.host_log());
    assert!(said.contains("waiting up to 1s for programs and execs to end"), "{said}");
    assert!(said.contains("ended 1 programs and execs still running at the deadline"), "{said}");
    assert!(began.elapsed() >= Duration::from_secs(1), "the program had its deadline");
    assert_ne!(containerd.node_hosts(), old, "a new host serves the node");
    let tasks = text(&containerd.ctr("default", &["task", "ls"]));
    let line = tasks.lines().find(|line| line.starts_with("long")).unwrap_or_else(|| panic!("{tasks}"));
    assert!(line.contains("STOPPED"), "{tasks}");
    // (`ctr task rm` of containerd 2.x says the task's exit status.)
    let removed = text(&containerd.ctr("default", &["task", "rm", "long"]));
    assert!(removed.contains("task long exit with non-zero exit code 137"), "ended as by SIGKILL: {removed}");
    let _ = containerd.ctr("default", &["containers", "rm", "long"]);
}
