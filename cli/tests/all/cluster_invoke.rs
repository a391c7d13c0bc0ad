//! Invoke across nodes: two node hosts (two containerds, each with its
//! own CNI bridge and subnet), a DNS server standing in for the cluster's
//! answering Service names with pod addresses. A function on node A
//! invokes its namespace's `api` on node B; a dead endpoint is cut off
//! while the live one serves; a cycle across nodes ends at the depth
//! limit; another namespace's Service is never asked.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use shoal_testing::dns::DnsServer;

use crate::cluster::{Containerd, Cri, Pod, PodOptions, Registry, SERIAL, get_in_netns};
use crate::support::guest;

const POLICY: &str = r#"
[[rule]]
namespaces = ["team-*"]
invoke = ["api", "invoker"]
"#;

struct Node {
    containerd: Containerd,
    cri: Cri,
}

impl Node {
    async fn start(registry: &Registry, images: &[&str]) -> Node {
        let containerd = Containerd::start(Some(registry));
        std::fs::write(containerd.policy_file(), POLICY).unwrap();
        let mut cri = containerd.cri().await;
        for image in images {
            cri.pull(image).await;
        }
        Node { containerd, cri }
    }

    async fn pod(&mut self, namespace: &str, name: &str, container: &str, image: &str, dns: Option<Ipv4Addr>) -> Pod {
        self.pod_with_env(namespace, name, container, image, dns, &[]).await
    }

    async fn pod_with_env(
        &mut self,
        namespace: &str,
        name: &str,
        container: &str,
        image: &str,
        dns: Option<Ipv4Addr>,
        env: &[(&str, &str)],
    ) -> Pod {
        let grants = [("shoal.dev/grants.invoke", "api,invoker")];
        let server = dns.map(|ip| ip.to_string());
        let servers: Vec<&str> = server.iter().map(String::as_str).collect();
        // As the kubelet writes them for a pod of `namespace`.
        let search = [format!("{namespace}.svc.cluster.local"), "svc.cluster.local".into(), "cluster.local".into()];
        let searches: Vec<&str> = if dns.is_some() { search.iter().map(String::as_str).collect() } else { Vec::new() };
        let options = PodOptions {
            namespace,
            container,
            annotations: if container == "api" { &[] } else { &grants },
            dns_servers: &servers,
            dns_searches: &searches,
            env,
            ..PodOptions::new(name, image)
        };
        match self.cri.try_run_pod(&self.containerd.log_dir, options).await {
            Ok(pod) => pod,
            Err(err) => panic!("{namespace}/{name}: {err}\n{}", self.containerd.host_log()),
        }
    }

    /// The node host's state directory.
    fn host_dir(&self) -> std::path::PathBuf {
        let state = self.containerd.dir.path().join("shoal-state");
        std::fs::read_dir(&state).unwrap().next().unwrap().unwrap().path()
    }

    /// The node host's admin socket.
    fn admin_socket(&self) -> std::path::PathBuf {
        self.host_dir().join("admin.sock")
    }

    /// The usage records in the node host's ledger, read from its files.
    fn records(&self) -> Vec<shoal::metering::UsageRecord<'static>> {
        shoal::metering::Ledger::read_dir(&self.host_dir().join("usage"), None).unwrap()
    }

    fn admin(&self) -> shoal::admin::Client {
        shoal::admin::Client::new(self.admin_socket())
    }

    /// Requests the node's usage ledger holds for namespace `namespace`'s
    /// containers named `container`.
    async fn requests_of(&self, namespace: &str, container: &str) -> u64 {
        let usage = self.admin().usage(&shoal::metering::UsageQuery::default()).await.unwrap();
        let prefix = format!("{container}-");
        usage
            .iter()
            .filter(|summary| summary.tenant == namespace && summary.function.starts_with(&prefix))
            .map(|summary| summary.requests)
            .sum()
    }
}

fn get(pod: &Pod, path: &str) -> (u16, String) {
    get_in_netns(&pod.netns, "127.0.0.1:8080", path).unwrap_or_else(|err| panic!("GET {path}: {err}"))
}

fn ip(pod: &Pod) -> Ipv4Addr {
    pod.ip.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_invokes_its_namespaces_function_on_another_node_and_a_dead_endpoint_is_cut_off() {
    let _serial = SERIAL.lock().await;
    let registry = Registry::start();
    let invoker = registry.push(&guest("invoker"), "shoal-test/invoker:1", &[]);
    let hello = registry.push(&guest("hello"), "shoal-test/hello:1", &[]);
    let settings = registry.push(&guest("settings"), "shoal-test/settings:1", &[]);
    let mut node_a = Node::start(&registry, &[&invoker]).await;
    let mut node_b = Node::start(&registry, &[&invoker, &hello, &settings]).await;

    // Node B: team-a's api (twice) and invoker, team-b's api.
    let api_1 = node_b.pod("team-a", "api-1", "api", &hello, None).await;
    let api_2 = node_b.pod("team-a", "api-2", "api", &hello, None).await;
    let looping = node_b.pod("team-b", "loop", "invoker", &invoker, None).await;
    let other_api = node_b.pod("team-b", "api", "api", &settings, None).await;

    // Node A: team-a's caller (container `web`: nothing named api or
    // invoker runs on node A), whose DNS is the test's, on the gateway
    // of node A's bridge.
    let gateway = node_a.containerd.gateway();
    let caller = node_a.pod("team-a", "caller", "web", &invoker, Some(gateway)).await;
    let caller_b = node_a.pod("team-b", "caller", "web", &invoker, Some(gateway)).await;
    let dns = DnsServer::start(SocketAddr::from((gateway, 53))).expect("the DNS server binds the bridge's gateway");
    dns.set("api.team-a.svc.cluster.local", &[ip(&api_1)]);
    // team-a's Service names its port `http` (an SRV record); team-b's
    // does not (the listener's default, 8080, then).
    dns.set_http_port("api.team-a.svc.cluster.local", 8080);
    dns.set("api.team-b.svc.cluster.local", &[ip(&other_api)]);
    dns.set("invoker.team-b.svc.cluster.local", &[ip(&looping)]);

    // The call crosses nodes: team-a's api answers, with its own record on
    // node B.
    let (status, body) = get(&caller, "/call?fn=api&path=/");
    assert_eq!((status, body.as_str()), (200, "hello, world\n"), "{}", node_a.containerd.host_log());
    assert!(dns.queries() > 0);
    assert_eq!(node_b.requests_of("team-a", "api").await, 1, "the callee's usage record on node B");
    assert_eq!(node_a.requests_of("team-a", "web").await, 1);
    // The callee's record is the caller's child: its id, parent and trace.
    let a_records = node_a.records();
    let call = a_records.iter().find(|r| r.tenant == "team-a" && r.function.starts_with("web-")).unwrap();
    let b_records = node_b.records();
    let served = b_records.iter().find(|r| r.tenant == "team-a" && r.function.starts_with("api-")).unwrap();
    assert_eq!(served.parent_id.as_deref(), Some(&*call.request_id));
    assert_eq!(served.request_id, format!("{}/1", call.request_id));
    assert!(served.trace_id.is_some() && served.trace_id == call.trace_id, "{served:?} / {call:?}");

    // Never another namespace's: with no Service api in team-a, the call
    // is not-found, though team-b has one.
    dns.set("api.team-a.svc.cluster.local", &[]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = get(&caller, "/call?fn=api&path=/");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("api.team-a.svc.cluster.local. has no endpoint"), "{body}");
    let (status, body) = get(&caller_b, "/call?fn=api&path=/");
    assert_eq!(status, 200, "team-b's caller reaches team-b's api: {body}");
    assert!(body.contains("api-token"), "team-b's api is the settings guest: {body}");

    // Two endpoints, one of which stopped listening: every call succeeds
    // through the other, and the dead one's breaker opens.
    let dead = ip(&api_2);
    node_b.cri.remove_pod(&api_2).await;
    dns.set("api.team-a.svc.cluster.local", &[dead, ip(&api_1)]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for call in 0..12 {
        let (status, body) = get(&caller, "/call?fn=api&path=/");
        assert_eq!((status, body.as_str()), (200, "hello, world\n"), "call {call}");
    }
    let breakers = node_a.admin().breakers().await.unwrap();
    let dead_target = format!("api@{dead}:8080");
    let view = breakers.iter().find(|view| view.target == dead_target).unwrap_or_else(|| panic!("{breakers:?}"));
    assert_eq!(view.state, shoal::resilience::BreakerState::Open, "{view:?}");
    let live = breakers.iter().find(|view| view.target == format!("api@{}:8080", ip(&api_1))).unwrap();
    assert_eq!(live.state, shoal::resilience::BreakerState::Closed);
    // As an operator sees them.
    let socket = node_a.admin_socket();
    let shown = std::process::Command::new(crate::support::shoal_bin())
        .args(["breakers", "--admin-socket"])
        .arg(&socket)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let row = table.lines().find(|line| line.contains(&dead_target)).unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" open "), "{table}");

    // A Service whose port named `http` is not 8080: its SRV record says
    // which port the pods listen on.
    let api_3 = node_b.pod_with_env("team-a", "api-3", "api", &hello, None, &[("SHOAL_HTTP_PORT", "9090")]).await;
    dns.set("api.team-a.svc.cluster.local", &[ip(&api_3)]);
    dns.set_http_port("api.team-a.svc.cluster.local", 9090);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = get(&caller, "/call?fn=api&path=/");
    assert_eq!((status, body.as_str()), (200, "hello, world\n"), "through the Service's named port");
    node_b.cri.remove_pod(&api_3).await;

    // A cycle across nodes: team-b's caller on A invokes `invoker` on B,
    // which invokes itself; the depth travels with the call, so node B
    // serves depths 1 to 8 and the refusal comes back as 508.
    let (status, body) = get(&caller_b, "/call?fn=invoker&path=/loop");
    assert_eq!(status, 508, "{body}");
    assert!(body.contains("invoke depth limit of 8"), "{body}");
    assert_eq!(node_b.requests_of("team-b", "invoker").await, 8, "depths 1 to 8 on node B");

    for pod in [&caller, &caller_b] {
        node_a.cri.remove_pod(pod).await;
    }
    for pod in [&api_1, &looping, &other_api] {
        node_b.cri.remove_pod(pod).await;
    }
}
