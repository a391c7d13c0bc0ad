//! The node boundary: what an image, a pod's volume or an exec can reach
//! of the node that runs it. Images here are written by the test as an
//! attacker would: a layer holding device nodes, a FIFO and a tty.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use shoal_testing::layout::{Entry, architecture, write_image};

use crate::cluster::{Containerd, SERIAL};
use crate::support::guest;

const RUNTIME: &str = "io.containerd.shoal.v1";

fn text(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// An OCI image layout tarball named `reference` whose one layer holds
/// `wasm` at `/program.wasm`, a regular `/plain.txt` and `specials`, for
/// Linux on this machine's architecture (as any image author can write it).
fn hostile_image(wasm: &Path, reference: &str, specials: &[(&str, Entry<'_>)], out: &Path) {
    let wasm = std::fs::read(wasm).unwrap();
    let mut entries = vec![("program.wasm", Entry::File(&wasm)), ("plain.txt", Entry::File(b"ok!\n"))];
    entries.extend(specials.iter().copied());
    let config =
        json!({ "architecture": architecture(), "os": "linux", "config": { "Entrypoint": ["/program.wasm"] } });
    write_image(reference, &entries, config, None, out);
}

/// What a program made to read every special file of its image sees.
fn read_specials(containerd: &Containerd, id: &str, image: &str, paths: &[&str]) -> String {
    let read = format!("READ_FILES={}", paths.join(","));
    let began = Instant::now();
    let mut child = containerd
        .ctr_command("default")
        .args(["run", "--rm", "--runtime", RUNTIME, "--env", &read, image, id, "/program.wasm"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // No open may block: a FIFO without a writer would hold the program
    // (and a host thread) for good.
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = containerd.ctr("default", &["task", "kill", "-s", "SIGKILL", id]);
            panic!("the program blocked for 30 s reading {paths:?}\n{}", containerd.host_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    let out = text(&output);
    assert!(output.status.success(), "the program ran to its end: {out}\n{}", containerd.host_log());
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn device_nodes_and_fifos_in_an_image_cannot_be_opened_by_its_program() {
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    let dir = tempfile::tempdir().unwrap();
    let specials = [
        ("random", Entry::CharDevice(1, 8)),
        ("kmsg", Entry::CharDevice(1, 11)),
        ("tty", Entry::CharDevice(5, 0)),
        ("disk", Entry::BlockDevice(7, 0)),
        ("fifo", Entry::Fifo),
    ];
    let paths: Vec<&str> = ["/plain.txt", "/random", "/kmsg", "/tty", "/disk", "/fifo"].into();
    // The same program as a component (std's WASI 0.2 files) and a
    // classic module (WASI 0.1, adapted); and a WASI 0.3 program opening
    // through `wasi:filesystem@0.3.0`, whose refusal reads `access`.
    let programs = [
        (guest("cli-hello"), "p2", "Permission denied"),
        (crate::cluster::guest_p1("cli-hello"), "p1", "Permission denied"),
        (guest("cli-hello-p3"), "p3", "ErrorCode::Access"),
    ];
    for (wasm, tag, refused) in programs {
        let tar = dir.path().join(format!("hostile-{tag}.tar"));
        let image = format!("localhost/shoal-test/hostile-{tag}:1");
        hostile_image(&wasm, &image, &specials, &tar);
        let imported = containerd.ctr("default", &["images", "import", tar.to_str().unwrap()]);
        assert!(imported.status.success(), "ctr images import: {}", text(&imported));
        let out = read_specials(&containerd, &format!("hostile-{tag}"), &image, &paths);
        assert!(
            out.contains("/plain.txt: read 4 bytes"),
            "{tag}: a regular file of the image reads: {out}\n{}",
            containerd.host_log()
        );
        for special in &paths[1..] {
            assert!(
                out.contains(&format!("{special}: cannot open: {refused}")),
                "{tag}: {special} is refused without being opened: {out}\n{}",
                containerd.host_log()
            );
        }
    }
    // The host serves on: the rootfs is mounted nodev,nosuid.
    let output =
        containerd.ctr("default", &["run", "--rm", "--runtime", RUNTIME, "localhost/shoal-test/hostile-p2:1", "after"]);
    assert!(output.status.success(), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_program_runs_on_a_rootfs_mounted_nodev_and_nosuid() {
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    let dir = tempfile::tempdir().unwrap();
    let tar = dir.path().join("hostile.tar");
    let image = "localhost/shoal-test/hostile-mount:1";
    hostile_image(&guest("cli-hello"), image, &[("random", Entry::CharDevice(1, 8))], &tar);
    let imported = containerd.ctr("default", &["images", "import", tar.to_str().unwrap()]);
    assert!(imported.status.success(), "ctr images import: {}", text(&imported));
    let run = containerd.ctr(
        "default",
        &["run", "-d", "--runtime", RUNTIME, "--env", "SPIN_MS=30000", image, "mounted", "/program.wasm"],
    );
    assert!(run.status.success(), "{}", text(&run));
    let host = containerd.node_hosts()[0];
    let mountinfo = std::fs::read_to_string(format!("/proc/{host}/mountinfo")).unwrap();
    let rootfs = mountinfo
        .lines()
        .find(|line| line.split(' ').nth(4).is_some_and(|target| target.contains("/mounted/rootfs")))
        .unwrap_or_else(|| panic!("the container's rootfs is mounted: {mountinfo}"));
    let options: Vec<&str> = rootfs.split(' ').nth(5).unwrap().split(',').collect();
    assert!(options.contains(&"nodev") && options.contains(&"nosuid"), "{rootfs}");
    let _ = containerd.ctr("default", &["task", "kill", "-s", "SIGKILL", "mounted"]);
    let _ = containerd.ctr("default", &["task", "rm", "-f", "mounted"]);
    let _ = containerd.ctr("default", &["containers", "rm", "mounted"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_functions_volume_holding_a_fifo_or_a_device_is_refused_not_opened() {
    use shoal::manifest::{FileGrant, VolumeKind};

    let volume = tempfile::tempdir().unwrap();
    std::fs::write(volume.path().join("plain.txt"), "ok!\n").unwrap();
    nix::unistd::mkfifo(&volume.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    nix::sys::stat::mknod(
        &volume.path().join("random"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        nix::sys::stat::makedev(1, 8),
    )
    .unwrap();
    let host = crate::support::TestHost::start().await;
    let mut spec = crate::support::spec("settings", "settings", "/settings");
    spec.grants.files = vec![FileGrant {
        host: volume.path().to_path_buf(),
        guest: "/vol".into(),
        read_only: true,
        kind: VolumeKind::Directory,
    }];
    host.deploy(vec![spec]).await;

    let reply = host.get("/settings/file?path=/vol/plain.txt").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok!\n"), "a regular file of the volume reads");
    for special in ["/vol/fifo", "/vol/random"] {
        // From a thread of its own, bounded: an open that blocks (a FIFO
        // with no writer) would never answer, and may hold host threads.
        let addr = host.running.http_addr().unwrap();
        let path = format!("/settings/file?path={special}");
        let reply = std::thread::spawn(move || -> std::io::Result<String> {
            use std::io::{Read as _, Write as _};
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(stream, "GET {path} HTTP/1.1\r\nHost: shoal\r\nConnection: close\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .join()
        .unwrap();
        let refused =
            reply.as_ref().is_ok_and(|reply| reply.starts_with("HTTP/1.1 500") && reply.contains("Permission denied"));
        if !refused {
            // A blocked open would hold the host's shutdown too: leave it.
            std::mem::forget(host);
            panic!("{special} is refused without being opened, at once: {reply:?}");
        }
    }
}

/// Every file and socket under `dir`, with its mode.
fn modes(dir: &Path, found: &mut Vec<(std::path::PathBuf, u32)>) {
    use std::os::unix::fs::MetadataExt as _;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        found.push((path.clone(), meta.mode()));
        if meta.is_dir() {
            modes(&path, found);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_hosts_sockets_state_and_bills_are_roots_alone() {
    let _serial = SERIAL.lock().await;
    let (_registry, containerd, mut cri, image) =
        crate::cluster::cri_node(&guest("kv"), "shoal-test/kv:1", &["--label", "shoal.dev/grants.keyvalue=default:*"])
            .await;
    let pod = cri.run_pod(&containerd.log_dir, "modes", &image, &[], 0).await;
    let (status, body) = crate::cluster::get_in_netns(&pod.netns, "127.0.0.1:8080", "/kv/incr?key=k").unwrap();
    assert_eq!(status, 200, "{body}");
    // Its sockets (task API, upgrade, admin), its key-value store, its
    // usage ledger and registry: none readable or writable by others.
    let mut found = Vec::new();
    modes(&containerd.run_dir, &mut found);
    modes(&containerd.dir.path().join("shoal-state"), &mut found);
    let names: Vec<String> = found.iter().map(|(path, _)| path.display().to_string()).collect();
    for wanted in [".sock", ".upgrade", "admin.sock", "kv.redb", "usage-"] {
        assert!(names.iter().any(|name| name.contains(wanted)), "no {wanted} among {names:#?}");
    }
    let open: Vec<String> = found
        .iter()
        .filter(|(path, mode)| mode & 0o077 != 0 && !path.ends_with("shoal-state") && !path.ends_with("shoal-run"))
        .map(|(path, mode)| format!("{} {:o}", path.display(), mode & 0o7777))
        .collect();
    assert!(open.is_empty(), "open to others: {open:#?}");

    // And another user cannot connect to the task socket.
    let socket = found.iter().find(|(path, _)| path.extension().is_some_and(|e| e == "sock")).unwrap().0.clone();
    let tried = std::process::Command::new("python3")
        .args(["-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"])
        .arg(&socket)
        .uid(65534)
        .output()
        .unwrap();
    assert!(!tried.status.success(), "nobody connected to {}", socket.display());
    assert!(String::from_utf8_lossy(&tried.stderr).contains("Permission denied"), "{}", text(&tried));
    cri.remove_pod(&pod).await;
}
