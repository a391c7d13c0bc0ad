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
outbound_http = ["10.*:*", "*.test:*", "127.0.0.1:{loopback_port}"]
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

/// Pods of namespaces team-a and team-b whose annotations name the same
/// bucket, topic and invoke target: each sees only its own. Returns the
/// pods, for the caller to remove.
async fn namespaces_share_nothing(registry: &Registry, containerd: &Containerd, cri: &mut Cri, kv: &str) -> Vec<Pod> {
    std::fs::write(containerd.policy_file(), policy(9)).unwrap();
    let publisher = push_and_pull(registry, cri, "publisher").await;
    let subscriber = push_and_pull(registry, cri, "subscriber").await;
    let invoker = push_and_pull(registry, cri, "invoker").await;
    let hello = push_and_pull(registry, cri, "hello").await;
    let settings = push_and_pull(registry, cri, "settings").await;

    let kv_grant = [("shoal.dev/grants.keyvalue", "default:*")];
    let sub_grants = [("shoal.dev/grants.subscribe", "orders"), ("shoal.dev/grants.keyvalue", "inbox:*")];
    let invoke_grant = [("shoal.dev/grants.invoke", "api")];
    let mut pods = Vec::new();
    for ns in ["team-a", "team-b"] {
        pods.push(pod(cri, containerd, ns, "kv", "kv", kv, &kv_grant).await);
        pods.push(pod(cri, containerd, ns, "subscriber", "subscriber", &subscriber, &sub_grants).await);
        pods.push(pod(cri, containerd, ns, "invoker", "invoker", &invoker, &invoke_grant).await);
        let api_image = if ns == "team-a" { &hello } else { &settings };
        pods.push(pod(cri, containerd, ns, "api", "api", api_image, &[]).await);
    }
    let publish_grant = [("shoal.dev/grants.publish", "orders")];
    pods.push(pod(cri, containerd, "team-a", "publisher", "publisher", &publisher, &publish_grant).await);
    let [kv_a, inbox_a, invoker_a, _, kv_b, inbox_b, invoker_b, _, publisher_a] = &pods[..] else { unreachable!() };

    // The same bucket and key: two counters.
    assert_eq!(get(kv_a, "/incr?key=hits").1, "hits=1\n");
    assert_eq!(get(kv_a, "/incr?key=hits").1, "hits=2\n");
    assert_eq!(get(kv_b, "/incr?key=hits").1, "hits=1\n", "team-b never sees team-a's counter");

    // The same topic: team-a's message reaches team-a's subscriber only.
    assert_eq!(get(publisher_a, "/publish?topic=orders").0, 202);
    until(Duration::from_secs(10), || get(inbox_a, "/").1.contains("deliveries=1"), || get(inbox_a, "/").1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(inbox_b, "/").1, "deliveries=0\n", "team-b's subscriber hears nothing of team-a's topic");

    // The same function name: each namespace's own `api`.
    let (status, body) = get(invoker_a, "/call?fn=api&path=/");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("hello"), "team-a's api is hello: {body}");
    let (_, body) = get(invoker_b, "/call?fn=api&path=/");
    assert!(body.contains("api-token has"), "team-b's api is settings: {body}");
    pods
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_of_two_namespaces_share_nothing_and_the_policy_bounds_their_grants() {
    let _serial = SERIAL.lock().await;
    let (registry, containerd, mut cri, kv) = cri_node(&guest("kv"), "shoal-test/kv:1", &[]).await;
    let pods = namespaces_share_nothing(&registry, &containerd, &mut cri, &kv).await;
    let kv_grant = [("shoal.dev/grants.keyvalue", "default:*")];

    // Asking beyond the policy fails creation, naming the annotation and the rule.
    // (pod, namespace, the annotation it asks with, what the refusal says)
    type Refusal<'a> = (&'a str, &'a str, (&'a str, &'a str), &'a [&'a str]);
    let refusals: [Refusal; 4] = [
        (
            "greedy",
            "team-a",
            ("shoal.dev/grants.keyvalue", "*:*"),
            &["shoal.dev/grants.keyvalue entry \"*:*\"", "rule 1 of", "policy.toml"],
        ),
        (
            "metadata",
            "team-a",
            ("shoal.dev/grants.outbound_http", "169.254.169.254:80"),
            &["link-local addresses are reachable only through a policy entry naming"],
        ),
        ("kv", "other", kv_grant[0], &["no rule of", "matches the namespace"]),
        ("files", "team-a", ("shoal.dev/grants.files", "/:/host"), &["a pod's files are its volumes"]),
    ];
    for (name, namespace, annotation, reasons) in refusals {
        let annotations = [annotation];
        let options = PodOptions { namespace, annotations: &annotations, ..PodOptions::new(name, &kv) };
        let err = cri.try_run_pod(&containerd.log_dir, options).await.unwrap_err();
        for reason in reasons {
            assert!(err.contains(reason), "{namespace}/{name}: {reason:?} in {err}");
        }
    }

    // The host served everyone else throughout; usage is per namespace.
    assert_eq!(get(&pods[0], "/incr?key=hits").1, "hits=3\n");
    assert_eq!(containerd.node_hosts().len(), 1);
    let usage = std::process::Command::new(crate::support::shoal_bin())
        .args(["usage", "--by", "tenant", "--admin-socket"])
        .arg(admin_socket(&containerd))
        .output()
        .unwrap();
    let usage = String::from_utf8_lossy(&usage.stdout).into_owned();
    assert!(usage.lines().any(|line| line.starts_with("team-a ")), "{usage}");
    assert!(usage.lines().any(|line| line.starts_with("team-b ")), "{usage}");

    for pod in &pods {
        cri.remove_pod(pod).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_of_two_namespaces_share_nothing_on_redis_either() {
    let _serial = SERIAL.lock().await;
    let redis = crate::support::RedisServer::start().await;
    let registry = Registry::start();
    let kv = registry.push(&guest("kv"), "shoal-test/kv:1", &[]);
    let env = [("SHOAL_KV_REDIS", redis.url.as_str()), ("SHOAL_PUBSUB_REDIS", redis.url.as_str())];
    let containerd = Containerd::start_with_env(Some(&registry), &env);
    let mut cri = containerd.cri().await;
    cri.pull(&kv).await;
    let pods = namespaces_share_nothing(&registry, &containerd, &mut cri, &kv).await;
    let keys = redis.keys();
    for key in ["shoal:kv:team-a/default:hits", "shoal:kv:team-b/default:hits", "shoal:topic:team-a/orders"] {
        assert!(keys.iter().any(|stored| stored == key), "{key} in Redis: {keys:?}");
    }
    for pod in &pods {
        cri.remove_pod(pod).await;
    }
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

/// A DNS server inside `netns` on UDP port 53 that answers every A query
/// with `answer` (and AAAA queries with no address), for `lifetime`.
/// Hand-written: a test needs one record type, and a DNS server crate is
/// far more than that.
fn dns_in(netns: &Path, answer: std::net::Ipv4Addr, lifetime: Duration) -> std::thread::JoinHandle<Vec<String>> {
    let netns = std::fs::File::open(netns).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 53)).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        ready_tx.send(()).unwrap();
        let mut asked = Vec::new();
        let deadline = std::time::Instant::now() + lifetime;
        let mut query = [0u8; 512];
        while std::time::Instant::now() < deadline {
            let Ok((len, from)) = socket.recv_from(&mut query) else { continue };
            // Header (12 bytes), then the question: labels, type, class.
            let mut at = 12;
            let mut labels = Vec::new();
            while at < len && query[at] != 0 {
                let size = query[at] as usize;
                labels.push(String::from_utf8_lossy(&query[at + 1..at + 1 + size]).into_owned());
                at += 1 + size;
            }
            let question_end = at + 5;
            let qtype = u16::from_be_bytes([query[at + 1], query[at + 2]]);
            asked.push(format!("{} {qtype}", labels.join(".")));
            let a_record = qtype == 1;
            let mut reply = query[..question_end].to_vec();
            reply[2] = 0x81; // a response, recursion desired
            reply[3] = 0x80; // recursion available, no error
            reply[6..8].copy_from_slice(&u16::from(a_record).to_be_bytes());
            reply[8..12].fill(0);
            if a_record {
                reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                reply.extend_from_slice(&answer.octets());
            }
            let _ = socket.send_to(&reply, from);
        }
        asked
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("DNS server bound");
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
    // Neither pod has called out yet: neither has an egress thread.
    let egress_threads = || containerd.node_hosts().iter().map(|&host| threads_named(host, "egress-")).sum::<usize>();
    assert_eq!(egress_threads(), 0, "an egress thread starts at a pod's first call out, not with the pod");
    let echo = peer_echo_in(&pod.netns, 9090);
    let (status, body) = get(&fetcher, &format!("/fetch?url=http://{}:9090/who", pod.ip));
    assert_eq!(status, 200, "{body}\n{}", containerd.host_log());
    assert_eq!(egress_threads(), 1, "the fetcher's, started by its call");
    assert_eq!(body, format!("peer={}", fetcher.ip), "the connection comes from the pod's address");
    assert_eq!(echo.join().unwrap().unwrap(), fetcher.ip);
    // A name is resolved with the pod's own resolv.conf, from its network:
    // the pod's DNS server (here: one inside another pod) answers it.
    let pod_ip: std::net::Ipv4Addr = pod.ip.parse().unwrap();
    let dns = dns_in(&pod.netns, pod_ip, Duration::from_secs(4));
    let named = PodOptions {
        namespace: "team-a",
        annotations: &[("shoal.dev/grants.outbound_http", "who.svc.test:9091")],
        dns_servers: &[pod.ip.as_str()],
        ..PodOptions::new("named", &fetch)
    };
    let named = cri.try_run_pod(&containerd.log_dir, named).await.unwrap_or_else(|err| panic!("{err}"));
    let echo = peer_echo_in(&pod.netns, 9091);
    let (status, body) = get(&named, "/fetch?url=http://who.svc.test:9091/who");
    assert_eq!(status, 200, "{body}\n{}", containerd.host_log());
    assert_eq!(body, format!("peer={}", named.ip));
    assert_eq!(echo.join().unwrap().unwrap(), named.ip);
    let asked = dns.join().unwrap();
    assert!(asked.iter().any(|question| question == "who.svc.test 1"), "{asked:?}");
    cri.remove_pod(&named).await;

    // The node's loopback is not the pod's: with nothing listening in the
    // pod, the call fails and the node's listener on that port hears
    // nothing; with a listener inside the pod's own namespace on the same
    // address, the call reaches that one.
    node_listener.set_nonblocking(true).unwrap();
    let (status, body) = get(&fetcher, &format!("/fetch?url=http://127.0.0.1:{node_port}/"));
    assert_eq!(status, 502, "{body}");
    let echo = peer_echo_in(&fetcher.netns, node_port);
    let (status, body) = get(&fetcher, &format!("/fetch?url=http://127.0.0.1:{node_port}/"));
    assert_eq!((status, body.as_str()), (200, "peer=127.0.0.1"), "the pod's own listener answers");
    echo.join().unwrap().unwrap();
    assert!(node_listener.accept().is_err(), "the node's own listener was reached");

    cri.remove_pod(&fetcher).await;
    cri.remove_pod(&pod).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_policy_bounds_the_limits_a_pod_sets_and_what_its_namespace_holds_at_once() {
    let _serial = SERIAL.lock().await;
    let (registry, containerd, mut cri, slow) = cri_node(&guest("slow"), "shoal-test/slow:1", &[]).await;
    let rule = "[[rule]]\nnamespaces = [\"team-*\"]\n[rule.limits]\nmemory_mb = 64\ninstances = 1\n";
    std::fs::write(containerd.policy_file(), rule).unwrap();

    // A limit over the rule's bound, or over the node's default for what
    // the rule leaves unset, fails creation naming both.
    let refusals: [(&str, (&str, &str), &[&str]); 2] = [
        (
            "big",
            ("shoal.dev/limits.memory_mb", "128"),
            &["shoal.dev/limits.memory_mb = 128 is over the 64 that rule 1 of", "policy.toml", "team-a"],
        ),
        (
            "long",
            ("shoal.dev/limits.timeout_ms", "600000"),
            &["shoal.dev/limits.timeout_ms = 600000 is over the 300000", "the node's default", "limits.timeout_ms"],
        ),
    ];
    for (name, annotation, reasons) in refusals {
        let annotations = [annotation];
        let options = PodOptions { namespace: "team-a", annotations: &annotations, ..PodOptions::new(name, &slow) };
        let err = cri.try_run_pod(&containerd.log_dir, options).await.unwrap_err();
        for reason in reasons {
            assert!(err.contains(reason), "{reason:?} in {err}");
        }
    }

    // team-a's functions keep one instance busy at once, together: while
    // one request of its `first` sleeps, its `second` answers 503 once its
    // queue time is up. team-b (the same rule) has its own one.
    let short_queue = [("shoal.dev/limits.queue_timeout_ms", "300")];
    let first = pod(&mut cri, &containerd, "team-a", "first", "first", &slow, &short_queue).await;
    let second = pod(&mut cri, &containerd, "team-a", "second", "second", &slow, &short_queue).await;
    let other = pod(&mut cri, &containerd, "team-b", "other", "other", &slow, &short_queue).await;
    assert_eq!(get(&second, "/?ms=1").0, 200);
    let netns = first.netns.clone();
    let sleeping = std::thread::spawn(move || get_in_netns(&netns, "127.0.0.1:8080", "/?ms=3000"));
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = get(&second, "/?ms=1");
    assert_eq!(status, 503, "{body}");
    assert_eq!(get(&other, "/?ms=1").0, 200, "another namespace is served meanwhile");
    assert_eq!(sleeping.join().unwrap().unwrap().0, 200);
    assert_eq!(get(&second, "/?ms=1").0, 200, "once it is free the namespace is served again");

    for pod in [&first, &second, &other] {
        cri.remove_pod(pod).await;
    }
    drop(registry);
}

/// How many threads of process `pid` have a name starting with `prefix`.
fn threads_named(pid: i32, prefix: &str) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter(|task| std::fs::read_to_string(task.path().join("comm")).is_ok_and(|name| name.starts_with(prefix)))
        .count()
}
