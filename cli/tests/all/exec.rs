//! Execs (`ctr task exec`, the CRI's ExecSync as `kubectl exec` and probes
//! use it): a program of the rootfs or a request to the pod's function,
//! within the container's limits.

use std::time::Duration;

use crate::cluster::{Containerd, SERIAL, cri_node, until};
use crate::kubernetes::{RUNTIME, last_word_then_wait, numbered_lines, text};
use crate::support::guest;

#[tokio::test(flavor = "multi_thread")]
async fn ctr_task_exec_runs_a_program_of_the_rootfs_and_shoal_invoke_in_the_containers_context() {
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    // A rootfs with an HTTP function as its entrypoint and a program beside it.
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(guest("hello"), root.path().join("app.wasm")).unwrap();
    std::fs::create_dir(root.path().join("tools")).unwrap();
    std::fs::copy(guest("cli-hello"), root.path().join("tools/cli-hello.wasm")).unwrap();
    std::fs::copy(guest("cli-hello-p3"), root.path().join("tools/cli-hello-p3.wasm")).unwrap();
    let rootfs = root.path().to_str().unwrap();
    let run = containerd.ctr(
        "default",
        &["run", "-d", "--runtime", RUNTIME, "--env", "GREETING_NAME=exec", "--rootfs", rootfs, "execd", "/app.wasm"],
    );
    assert!(run.status.success(), "ctr run -d: {}\n{}", text(&run), containerd.host_log());
    let exec = |id: &str, args: &[&str]| {
        let mut all = vec!["task", "exec", "--exec-id", id, "execd"];
        all.extend_from_slice(args);
        containerd.ctr("default", &all)
    };

    // `shoal invoke` calls the container's own function from inside.
    let invoke = exec("invoke", &["shoal", "invoke", "/hello?name=exec"]);
    assert!(invoke.status.success(), "{}\n{}", text(&invoke), containerd.host_log());
    assert_eq!(String::from_utf8_lossy(&invoke.stdout), "hello, exec\n");

    // A wasi:cli program of the rootfs, with the container's environment.
    let program = exec("program", &["/tools/cli-hello.wasm", "one"]);
    let out = text(&program);
    assert!(program.status.success(), "{out}\n{}", containerd.host_log());
    assert!(out.contains(r#"args ["one"]"#), "{out}");
    assert!(out.contains("hello, exec"), "the container's environment: {out}");
    assert!(out.contains(r#"root holds ["app.wasm", "tools"]"#), "the rootfs is its /: {out}");
    assert!(String::from_utf8_lossy(&program.stderr).contains("cli-hello: done"), "stderr on its own: {out}");
    // A WASI 0.3 program (`wasi:cli/run@0.3`) the same way.
    let p3 = exec("program-p3", &["/tools/cli-hello-p3.wasm", "three"]);
    let out = text(&p3);
    assert!(p3.status.success(), "{out}\n{}", containerd.host_log());
    assert!(out.contains(r#"hello from a wasi:cli@0.3 command, args ["three"]"#), "{out}");
    assert!(out.contains("hello, exec"), "the container's environment: {out}");

    // All of an exec's output reaches ctr, even when ctr takes it after
    // the program ended (ctr closes its readers once it hears the end; see
    // `ctr_run_gets_all_of_a_programs_output_even_when_it_takes_it_late`).
    let lines = 6_000;
    let mut late = containerd
        .ctr_command("default")
        .args(["task", "exec", "--exec-id", "late", "execd", "/tools/cli-hello.wasm", "--lines", &lines.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    last_word_then_wait(&mut late).await;
    let late = late.wait_with_output().unwrap();
    assert!(late.status.success(), "{}\n{}", text(&late), containerd.host_log());
    assert_eq!(
        numbered_lines(&String::from_utf8_lossy(&late.stdout)),
        lines,
        "every line the exec printed reaches ctr\n{}",
        containerd.host_log()
    );

    // What cannot run says why, with a shell's exit codes.
    let missing = exec("missing", &["/tools/missing.wasm"]);
    assert_eq!(missing.status.code(), Some(127), "{}", text(&missing));
    assert!(text(&missing).contains("/tools/missing.wasm"), "{}", text(&missing));
    let function = exec("function", &["/app.wasm"]);
    assert_eq!(function.status.code(), Some(126), "{}", text(&function));
    assert!(text(&function).contains("not a wasi:cli program"), "{}", text(&function));
    let shell = exec("shell", &["sh", "-c", "ls"]);
    assert!(!shell.status.success());
    assert!(text(&shell).contains("is not a wasm program"), "{}", text(&shell));

    // The container serves on after its execs.
    let again = exec("again", &["shoal", "invoke", "/hello"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), "hello, world\n", "{}", text(&again));
    let _ = containerd.ctr("default", &["task", "kill", "-s", "SIGKILL", "execd"]);
    until(
        Duration::from_secs(10),
        || {
            text(&containerd.ctr("default", &["task", "ls"])).contains("STOPPED")
                || !text(&containerd.ctr("default", &["task", "ls"])).contains("execd")
        },
        || text(&containerd.ctr("default", &["task", "ls"])),
    )
    .await;
    let _ = containerd.ctr("default", &["task", "rm", "execd"]);
    let _ = containerd.ctr("default", &["containers", "rm", "execd"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_sync_through_the_cri_answers_from_the_pods_function() {
    let _serial = SERIAL.lock().await;
    let (_registry, containerd, mut cri, image) = cri_node(&guest("hello"), "shoal-test/hello:1", &[]).await;
    let pod = cri.run_pod(&containerd.log_dir, "execsync", &image, &[], 0).await;
    let exec = |cmd: &[&str]| k8s_cri::v1::ExecSyncRequest {
        container_id: pod.container_id.clone(),
        cmd: cmd.iter().map(std::string::ToString::to_string).collect(),
        timeout: 20,
    };
    // Bounded: an ExecSync that never returns fails the test (once, it
    // hung with containerd waiting to open the exec's output FIFO).
    let bounded = Duration::from_secs(60);
    let reply = tokio::time::timeout(bounded, cri.runtime.exec_sync(exec(&["shoal", "invoke", "/hello?name=kubectl"])))
        .await
        .expect("ExecSync answers within a minute")
        .unwrap()
        .into_inner();
    assert_eq!(
        (reply.exit_code, String::from_utf8_lossy(&reply.stdout).as_ref()),
        (0, "hello, kubectl\n"),
        "stderr: {}",
        String::from_utf8_lossy(&reply.stderr)
    );
    // The function is no program: exit code 126 and the reason.
    let reply = tokio::time::timeout(bounded, cri.runtime.exec_sync(exec(&["/hello.wasm"])))
        .await
        .expect("ExecSync answers within a minute")
        .unwrap()
        .into_inner();
    assert_eq!(reply.exit_code, 126, "{reply:?}");
    assert!(String::from_utf8_lossy(&reply.stderr).contains("not a wasi:cli program"), "{reply:?}");
    // Something that is no wasm at all is refused at once, naming why.
    let refused = tokio::time::timeout(bounded, cri.runtime.exec_sync(exec(&["sh", "-c", "true"])))
        .await
        .expect("ExecSync answers within a minute")
        .unwrap_err();
    assert!(refused.message().contains("is not a wasm program"), "{refused}");
    cri.remove_pod(&pod).await;
}

#[tokio::test]
async fn an_exec_computes_within_its_containers_cpu_limit_and_the_throttling_shows_in_its_stats() {
    let _serial = SERIAL.lock().await;
    // On the shared threads, as in a_pods_cpu_limit_holds_…
    let containerd = Containerd::start_with_env(None, &[("SHOAL_CPU_LIMITED_PRIORITY", "normal")]);
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(guest("hello"), root.path().join("app.wasm")).unwrap();
    std::fs::copy(guest("cli-hello"), root.path().join("spin.wasm")).unwrap();
    let rootfs = root.path().to_str().unwrap();
    // A tenth of a core, as `resources.limits.cpu: 100m` gives.
    let run = containerd.ctr(
        "default",
        &[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--cpus",
            "0.1",
            "--env",
            "SPIN_MS=1500",
            "--rootfs",
            rootfs,
            "capped",
            "/app.wasm",
        ],
    );
    assert!(run.status.success(), "ctr run -d: {}\n{}", text(&run), containerd.host_log());
    // The program (with the container's environment) computes for 1.5 s
    // of wall time: at 100m it may use about 150 ms of CPU and spends the
    // rest waiting for its share.
    let exec = containerd.ctr("default", &["task", "exec", "--exec-id", "spin", "capped", "/spin.wasm"]);
    assert!(exec.status.success(), "{}\n{}", text(&exec), containerd.host_log());
    assert!(text(&exec).contains("spun 1500 ms"), "{}", text(&exec));
    let metrics = containerd.ctr("default", &["task", "metrics", "--format", "json", "capped"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
    let field = |name: &str| -> u64 {
        let at = metrics.find(&format!("\"{name}\":")).unwrap_or_else(|| panic!("no {name} in {metrics}"));
        let digits: String =
            metrics[at + name.len() + 3..].trim_start().chars().take_while(char::is_ascii_digit).collect();
        digits.parse().unwrap_or_else(|_| panic!("{name} in {metrics}"))
    };
    assert!(field("throttled_usec") > 800_000, "most of the exec's time was spent waiting: {metrics}");
    assert!(field("nr_throttled") > 5, "{metrics}");
    let _ = containerd.ctr("default", &["task", "kill", "-s", "SIGKILL", "capped"]);
    until(
        Duration::from_secs(10),
        || !text(&containerd.ctr("default", &["task", "ls"])).contains("RUNNING"),
        || text(&containerd.ctr("default", &["task", "ls"])),
    )
    .await;
    let _ = containerd.ctr("default", &["task", "rm", "capped"]);
    let _ = containerd.ctr("default", &["containers", "rm", "capped"]);
}
