//! Many tenants on one node host, through the real CRI: pods of two
//! namespaces naming the same bucket, topic and function share nothing;
//! the operator's policy bounds what annotations may grant; a pod's env,
//! volumes and secrets reach its function; outbound calls leave from the
//! pod's own network namespace.

use std::io::{Read as _, Write as _};
use std::os::fd::AsFd as _;
use std::path::Path;
use std::time::Duration;

use crate::cluster::{Containerd, Cri, Pod, PodOptions, Registry, SERIAL, cri_node, get_in_netns, until};
use crate::support::guest;

/// The policy of these tests: `team-*` namespaces may use their own
/// `default` and `inbox` buckets, the `orders` topic and their `api`
/// function, and call out to other pods and to one loopback port.
fn policy(loopback_port: u16) -> String {
    format!(
        r#"
[[rule]]
namespaces = ["team-*"]
keyvalue = ["default:*", "inbox:*"]
publish = ["orders"]
subscribe = ["orders"]
invoke = ["api"]
outbound_http = ["10.*:*", "127.0.0.1:{loopback_port}"]
"#
    )
}

async fn push_and_pull(registry: &Registry, cri: &mut Cri, guest_name: &str) -> String {
    let image = registry.push(&guest(guest_name), &format!("shoal-test/{guest_name}:1"), &[]);
    cri.pull(&image).await;
    image
}

async fn pod(
    cri: &mut Cri,
    containerd: &Containerd,
    namespace: &str,
    name: &str,
    container: &str,
    image: &str,
    annotations: &[(&str, &str)],
) -> Pod {
    let options = PodOptions { namespace, container, annotations, ..PodOptions::new(name, image) };
    match cri.try_run_pod(&containerd.log_dir, options).await {
        Ok(pod) => pod,
        Err(err) => panic!("{namespace}/{name}: {err}\n{}", containerd.host_log()),
    }
}

fn get(pod: &Pod, path: &str) -> (u16, String) {
    get_in_netns(&pod.netns, "127.0.0.1:8080", path).unwrap_or_else(|err| panic!("GET {path}: {err}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_of_two_namespaces_share_nothing_and_the_policy_bounds_their_grants() {
    let _serial = SERIAL.lock().await;
    let (registry, containerd, mut cri, kv) = cri_node(&guest("kv"), "shoal-test/kv:1", &[]).await;
    std::fs::write(containerd.policy_file(), policy(9)).unwrap();
    let publisher = push_and_pull(&registry, &mut cri, "publisher").await;
    let subscriber = push_and_pull(&registry, &mut cri, "subscriber").await;
    let invoker = push_and_pull(&registry, &mut cri, "invoker").await;
    let hello = push_and_pull(&registry, &mut cri, "hello").await;
    let settings = push_and_pull(&registry, &mut cri, "settings").await;

    let kv_grant = [("shoal.dev/grants.keyvalue", "default:*")];
    let sub_grants = [("shoal.dev/grants.subscribe", "orders"), ("shoal.dev/grants.keyvalue", "inbox:*")];
    let invoke_grant = [("shoal.dev/grants.invoke", "api")];
    let mut pods = Vec::new();
    for ns in ["team-a", "team-b"] {
        let kv_pod = pod(&mut cri, &containerd, ns, "kv", "kv", &kv, &kv_grant).await;
        let sub_pod = pod(&mut cri, &containerd, ns, "subscriber", "subscriber", &subscriber, &sub_grants).await;
        let invoker_pod = pod(&mut cri, &containerd, ns, "invoker", "invoker", &invoker, &invoke_grant).await;
        let api_image = if ns == "team-a" { &hello } else { &settings };
        let api_pod = pod(&mut cri, &containerd, ns, "api", "api", api_image, &[]).await;
        pods.push((kv_pod, sub_pod, invoker_pod, api_pod));
    }
    let publisher_a = pod(
        &mut cri,
        &containerd,
        "team-a",
        "publisher",
        "publisher",
        &publisher,
        &[("shoal.dev/grants.publish", "orders")],
    )
    .await;
    let (a, b) = (&pods[0], &pods[1]);

    // The same bucket and key: two counters.
    assert_eq!(get(&a.0, "/incr?key=hits").1, "hits=1\n");
    assert_eq!(get(&a.0, "/incr?key=hits").1, "hits=2\n");
    assert_eq!(get(&b.0, "/incr?key=hits").1, "hits=1\n", "team-b never sees team-a's counter");

    // The same topic: team-a's message reaches team-a's subscriber only.
    assert_eq!(get(&publisher_a, "/publish?topic=orders").0, 202);
    let inbox_a = a.1.clone();
    until(Duration::from_secs(10), || get(&inbox_a, "/").1.contains("deliveries=1"), || get(&inbox_a, "/").1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&b.1, "/").1, "deliveries=0\n", "team-b's subscriber hears nothing of team-a's topic");

    // The same function name: each namespace's own `api`.
    let (status, body) = get(&a.2, "/call?fn=api&path=/");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello"), "team-a's api is hello: {body}");
    let (_, body) = get(&b.2, "/call?fn=api&path=/");
    assert!(body.contains("api-token has"), "team-b's api is settings: {body}");

    // Asking beyond the policy fails creation, naming the annotation and the rule.
    let greedy = PodOptions {
        namespace: "team-a",
        annotations: &[("shoal.dev/grants.keyvalue", "*:*")],
        ..PodOptions::new("greedy", &kv)
    };
    let err = cri.try_run_pod(&containerd.log_dir, greedy).await.unwrap_err();
    assert!(err.contains("shoal.dev/grants.keyvalue entry \"*:*\""), "{err}");
    assert!(err.contains("rule 1 of") && err.contains("policy.toml"), "{err}");
    let metadata = PodOptions {
        namespace: "team-a",
        annotations: &[("shoal.dev/grants.outbound_http", "169.254.169.254:80")],
        ..PodOptions::new("metadata", &kv)
    };
    let err = cri.try_run_pod(&containerd.log_dir, metadata).await.unwrap_err();
    assert!(err.contains("link-local addresses are reachable only through a policy entry naming"), "{err}");
    let elsewhere = PodOptions { namespace: "other", annotations: &kv_grant, ..PodOptions::new("kv", &kv) };
    let err = cri.try_run_pod(&containerd.log_dir, elsewhere).await.unwrap_err();
    assert!(err.contains("no rule of") && err.contains("matches the namespace"), "{err}");
    let self_granted = PodOptions {
        namespace: "team-a",
        annotations: &[("shoal.dev/grants.files", "/:/host")],
        ..PodOptions::new("files", &kv)
    };
    let err = cri.try_run_pod(&containerd.log_dir, self_granted).await.unwrap_err();
    assert!(err.contains("a pod's files are its volumes"), "{err}");

    // The host served everyone else throughout; usage is per namespace.
    assert_eq!(get(&a.0, "/incr?key=hits").1, "hits=3\n");
    assert_eq!(containerd.node_hosts().len(), 1);
    let usage = std::process::Command::new(crate::support::shoal_bin())
        .args(["usage", "--by", "tenant", "--admin-socket"])
        .arg(admin_socket(&containerd))
        .output()
        .unwrap();
    let usage = String::from_utf8_lossy(&usage.stdout).into_owned();
    assert!(usage.lines().any(|line| line.starts_with("team-a ")), "{usage}");
    assert!(usage.lines().any(|line| line.starts_with("team-b ")), "{usage}");

    for (kv, sub, invoker, api) in &pods {
        for pod in [kv, sub, invoker, api] {
            cri.remove_pod(pod).await;
        }
    }
    cri.remove_pod(&publisher_a).await;
}

/// The node host's admin socket (under the shim's state directory).
fn admin_socket(containerd: &Containerd) -> std::path::PathBuf {
    let state = containerd.dir.path().join("shoal-state");
    let host = std::fs::read_dir(&state).unwrap().next().unwrap().unwrap().path();
    host.join("admin.sock")
}

/// A one-connection HTTP server inside `netns` on `0.0.0.0:port`: answers
/// with the address the connection came from.
fn peer_echo_in(netns: &Path, port: u16) -> std::thread::JoinHandle<std::io::Result<String>> {
    let netns = std::fs::File::open(netns).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
        ready_tx.send(()).unwrap();
        let (mut stream, peer) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request)?;
        let body = format!("peer={}", peer.ip());
        write!(stream, "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())?;
        Ok(peer.ip().to_string())
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("listener bound");
    handle
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pods_env_volumes_and_secrets_reach_its_function_and_it_calls_out_from_its_own_network() {
    let _serial = SERIAL.lock().await;
    let (registry, containerd, mut cri, settings) = cri_node(&guest("settings"), "shoal-test/settings:1", &[]).await;
    // A listener on the node's own loopback: the pod must not reach it.
    let node_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let node_port = node_listener.local_addr().unwrap().port();
    std::fs::write(containerd.policy_file(), policy(node_port)).unwrap();
    let fetch = push_and_pull(&registry, &mut cri, "fetch").await;

    // Volumes laid out as the kubelet lays them out.
    let kubelet = tempfile::tempdir().unwrap();
    let volumes = kubelet.path().join("pods/uid-1/volumes");
    let config = volumes.join("kubernetes.io~configmap/app-config");
    let secret = volumes.join("kubernetes.io~secret/db");
    let scratch = volumes.join("kubernetes.io~empty-dir/scratch");
    for dir in [&config, &secret, &scratch] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(config.join("app.conf"), "mode=pod\n").unwrap();
    std::fs::write(secret.join("db-password"), "hunter2").unwrap();
    // An emptyDir with `sizeLimit: 64Ki`, as a memory-backed one is mounted.
    nix::mount::mount(Some("tmpfs"), &scratch, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=64k")).unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(&scratch);

    let mounts = [
        (config.clone(), "/etc/app", true),
        (secret.clone(), "/var/run/db", true),
        (scratch.clone(), "/scratch", false),
    ];
    let options = PodOptions {
        namespace: "team-a",
        env: &[("GREETING", "hej")],
        mounts: &mounts,
        ..PodOptions::new("settings", &settings)
    };
    let pod = cri.try_run_pod(&containerd.log_dir, options).await.unwrap_or_else(|err| panic!("{err}"));

    assert_eq!(get(&pod, "/env?name=GREETING").1, "hej", "the pod spec's env is the function's");
    assert_eq!(get(&pod, "/config?key=GREETING").1, "hej", "and readable through wasi:config");
    assert_eq!(get(&pod, "/env?name=SHOAL_BIN").0, 404, "nothing of the host's environment");
    assert_eq!(get(&pod, "/file?path=/etc/app/app.conf").1, "mode=pod\n", "a ConfigMap volume is a directory");
    assert_eq!(get(&pod, "/file?path=/etc/hostname").0, 500, "a path outside every volume is not there");
    assert_eq!(get(&pod, "/file?path=/etc/app/../../etc/passwd").0, 500);
    let (status, body) = get(&pod, "/write?path=/etc/app/new");
    assert_eq!(status, 500, "a read-only volume refuses writes: {body}");
    assert!(!config.join("new").exists());
    assert_eq!(get(&pod, "/write?path=/scratch/small&bytes=1000").0, 200);
    let (status, body) = get(&pod, "/write?path=/scratch/big&bytes=200000");
    assert_eq!(status, 500, "an emptyDir past its size limit is an error value: {body}");
    assert!(body.contains("cannot write"), "{body}");
    assert_eq!(get(&pod, "/secret?name=db-password").1, "hunter2", "secrets are the pod's Secret volumes");
    assert_eq!(get(&pod, "/secret?name=api-token").0, 404);

    // Outbound: from the pod's own network namespace, with its own address.
    let outbound = format!("{}:9090, 127.0.0.1:{node_port}", pod.ip);
    let fetcher = PodOptions {
        namespace: "team-a",
        annotations: &[("shoal.dev/grants.outbound_http", outbound.as_str())],
        ..PodOptions::new("fetcher", &fetch)
    };
    let fetcher = cri.try_run_pod(&containerd.log_dir, fetcher).await.unwrap_or_else(|err| panic!("{err}"));
    let echo = peer_echo_in(&pod.netns, 9090);
    let (status, body) = get(&fetcher, &format!("/fetch?url=http://{}:9090/who", pod.ip));
    assert_eq!(status, 200, "{body}\n{}", containerd.host_log());
    assert_eq!(body, format!("peer={}", fetcher.ip), "the connection comes from the pod's address");
    assert_eq!(echo.join().unwrap().unwrap(), fetcher.ip);
    // The node's loopback is not the pod's: the listener there hears nothing.
    node_listener.set_nonblocking(true).unwrap();
    let (status, body) = get(&fetcher, &format!("/fetch?url=http://127.0.0.1:{node_port}/"));
    assert_eq!(status, 502, "{body}");
    assert!(node_listener.accept().is_err(), "the node's own listener was reached");

    cri.remove_pod(&fetcher).await;
    cri.remove_pod(&pod).await;
}
