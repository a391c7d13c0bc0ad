//! The shim binary as containerd runs it. (Building this test also makes
//! `cargo test` build the binary itself, which the host's Kubernetes tests
//! hand to a real containerd.)

use std::process::Command;

use containerd_shim::protos::protobuf::Message as _;
use containerd_shim::protos::shim::shim::DeleteResponse;

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-shoal-v1");

#[test]
fn version_names_the_runtime_and_exits_zero() {
    let output = Command::new(SHIM).arg("-v").output().expect("the shim runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "status {:?}; stderr: {}", output.status, String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("io.containerd.shoal.v1"), "{stdout}");
}

#[test]
fn delete_after_the_host_died_reports_the_task_killed() {
    // containerd runs `delete` when a task's host is unreachable; the shim
    // answers on stdout with a DeleteResponse saying the task was killed.
    let bundle = tempfile::tempdir().expect("a temporary bundle");
    let output = Command::new(SHIM)
        .args(["-namespace", "shim-test", "-id", "gone", "-address", "/nonexistent/containerd.sock", "-bundle"])
        .arg(bundle.path())
        .arg("delete")
        .current_dir(bundle.path())
        .output()
        .expect("the shim runs");
    assert!(output.status.success(), "status {:?}; stderr: {}", output.status, String::from_utf8_lossy(&output.stderr));
    let response = DeleteResponse::parse_from_bytes(&output.stdout).expect("a DeleteResponse on stdout");
    assert_eq!(response.exit_status, 137, "128 + SIGKILL");
    assert!(response.exited_at.seconds > 0, "the exit time is set");
}
