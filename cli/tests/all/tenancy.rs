//! Tenants on one host: the same bucket, topic and function name mean a
//! different thing in each tenant, on the embedded store and on Redis; a
//! function's environment and files are its own; usage adds up per tenant;
//! outbound names never lead to the node itself.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use shoal::manifest::{FileGrant, FunctionSpec, KeyGrant, PodIdentity, TenantName, VolumeKind};
use shoal::metering::{UsageGrouping, UsageQuery};

use crate::support::{RedisServer, TestHost, eventually, spec};

fn in_tenant(mut spec: FunctionSpec, tenant: &str) -> FunctionSpec {
    spec.tenant = TenantName::new(tenant).unwrap();
    spec
}

/// As a pod's container named `container` would be deployed.
fn as_container(mut spec: FunctionSpec, container: &str) -> FunctionSpec {
    spec.pod = Some(PodIdentity { pod: format!("{container}-pod"), uid: None, container: container.to_string() });
    spec
}

/// Functions of tenants `a` and `b` that name the same bucket (`default`),
/// topic (`orders`) and invoke target (`api`).
fn two_tenants() -> Vec<FunctionSpec> {
    let mut specs = Vec::new();
    for tenant in ["a", "b"] {
        let mut kv = spec(&format!("kv-{tenant}"), "kv", &format!("/{tenant}/kv"));
        kv.grants.keyvalue = vec![KeyGrant::parse("default:*").unwrap()];
        specs.push(in_tenant(kv, tenant));
        let mut publisher = spec(&format!("publisher-{tenant}"), "publisher", &format!("/{tenant}/pub"));
        publisher.grants.publish = BTreeSet::from(["orders".to_string()]);
        specs.push(in_tenant(publisher, tenant));
        let mut subscriber = spec(&format!("subscriber-{tenant}"), "subscriber", &format!("/{tenant}/inbox"));
        subscriber.grants.subscribe = BTreeSet::from(["orders".to_string()]);
        subscriber.grants.keyvalue = vec![KeyGrant::parse("inbox:*").unwrap()];
        specs.push(in_tenant(subscriber, tenant));
        let mut invoker = spec(&format!("invoker-{tenant}"), "invoker", &format!("/{tenant}/invoker"));
        invoker.grants.invoke = BTreeSet::from(["api".to_string(), "hello-b".to_string()]);
        specs.push(in_tenant(invoker, tenant));
    }
    // `api` is `hello` in tenant a and `settings` in tenant b.
    specs.push(in_tenant(as_container(spec("hello-a", "hello", "/a/api"), "api"), "a"));
    specs.push(in_tenant(as_container(spec("hello-b", "settings", "/b/api"), "api"), "b"));
    specs
}

async fn tenants_are_isolated(host: &TestHost) {
    host.deploy(two_tenants()).await;

    // Key-value: the same bucket and key, two values.
    assert_eq!(host.get("/a/kv/incr?key=hits").await.body, "hits=1\n");
    assert_eq!(host.get("/a/kv/incr?key=hits").await.body, "hits=2\n");
    assert_eq!(host.get("/b/kv/incr?key=hits").await.body, "hits=1\n", "b never sees a's counter");
    assert_eq!(host.get("/b/kv/keys").await.body, "hits");

    // Pubsub: a's message reaches a's subscriber only.
    let published = host.client.post(host.url("/a/pub/publish?topic=orders")).body("for-a").send().await.unwrap();
    assert_eq!(published.status(), 202);
    let a_got = eventually(Duration::from_secs(10), || async {
        host.get("/a/inbox").await.body.lines().any(|line| line.ends_with("=for-a"))
    })
    .await;
    assert!(a_got, "{}", host.get("/a/inbox").await.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host.get("/b/inbox").await.body, "deliveries=0\n", "b's subscriber never hears a's topic");

    // Invoke: `api` is each tenant's own; another tenant's function is not
    // found, even by its exact name.
    let from_a = host.get("/a/invoker/call?fn=api&path=/").await;
    assert_eq!(from_a.status, 200, "{}", from_a.body);
    assert!(from_a.body.contains("hello"), "a's api is hello: {}", from_a.body);
    let from_b = host.get("/b/invoker/call?fn=api&path=/").await;
    assert!(from_b.body.contains("api-token has"), "b's api is settings: {}", from_b.body);
    let across = host.get("/a/invoker/call?fn=hello-b&path=/").await;
    assert_eq!(across.status, 404, "{}", across.body);
    assert!(across.body.contains("in this namespace"), "{}", across.body);
}

#[tokio::test]
async fn tenants_share_no_buckets_topics_or_function_names() {
    let host = TestHost::start().await;
    tenants_are_isolated(&host).await;
}

#[tokio::test]
async fn tenants_share_nothing_on_redis_either() {
    let redis = RedisServer::start().await;
    let host = crate::redis_backend::host_on(&redis).await;
    tenants_are_isolated(&host).await;
    // The tenant is in the stored names themselves.
    let keys = redis.keys();
    for key in ["shoal:kv:a/default:hits", "shoal:kv:b/default:hits", "shoal:topic:a/orders"] {
        assert!(keys.iter().any(|stored| stored == key), "{key} in Redis: {keys:?}");
    }
}

#[tokio::test]
async fn a_function_cannot_take_over_another_tenants_function() {
    let host = TestHost::start().await;
    host.deploy(vec![in_tenant(spec("hello", "hello", "/hello"), "a")]).await;
    let err = host.try_deploy(vec![in_tenant(spec("hello", "hello", "/hello"), "b")]).await.unwrap_err().to_string();
    assert!(err.contains("belongs to tenant \"a\""), "{err}");
    assert_eq!(host.get("/hello").await.status, 200, "a's function still serves");
}

#[tokio::test]
async fn a_function_sees_its_own_environment_and_files_and_nothing_of_the_hosts() {
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("app.conf"), "mode=test\n").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", config.path().join("escape")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("db-password"), "hunter2").unwrap();

    let host = TestHost::start().await;
    let mut settings = spec("settings", "settings", "/s");
    settings.env = BTreeMap::from([("GREETING".to_string(), "hej".to_string())]);
    let grant = |dir: &std::path::Path, guest: &str, read_only: bool, kind: VolumeKind| FileGrant {
        host: dir.to_path_buf(),
        guest: guest.to_string(),
        read_only,
        kind,
    };
    settings.grants.files = vec![
        grant(config.path(), "/config", true, VolumeKind::ConfigMap),
        grant(data.path(), "/data", false, VolumeKind::EmptyDir),
        grant(secrets.path(), "/secrets", true, VolumeKind::Secret),
    ];
    // As a pod's function: its secrets are its Secret volumes.
    let settings = as_container(settings, "settings");
    host.deploy(vec![settings]).await;

    assert_eq!(host.get("/s/env?name=GREETING").await.body, "hej");
    assert_eq!(host.get("/s/env?name=PATH").await.status, 404, "the host's environment is not the function's");
    assert_eq!(host.get("/s/config?key=GREETING").await.body, "hej", "env is readable through wasi:config");
    assert_eq!(host.get("/s/file?path=/config/app.conf").await.body, "mode=test\n");
    for outside in ["/etc/hostname", "/config/../etc/hostname", "/config/escape", "/"] {
        let reply = host.get(&format!("/s/file?path={outside}")).await;
        assert_eq!(reply.status, 500, "{outside} must not be readable: {}", reply.body);
    }
    let read_only = host.get("/s/write?path=/config/new").await;
    assert_eq!(read_only.status, 500, "{}", read_only.body);
    assert!(!config.path().join("new").exists());
    assert_eq!(host.get("/s/write?path=/data/out&bytes=5").await.status, 200);
    assert_eq!(std::fs::read(data.path().join("out")).unwrap(), b"xxxxx");
    assert_eq!(host.get("/s/secret?name=db-password").await.body, "hunter2");
    assert_eq!(host.get("/s/secret?name=api-token").await.status, 404, "only the pod's own Secret volumes");
    assert_eq!(host.get("/s/secret?name=../secrets/db-password").await.status, 404);
}

#[tokio::test]
async fn usage_adds_up_per_tenant_in_the_ledger_and_metrics() {
    let host = TestHost::start_persistent().await;
    host.deploy(vec![
        in_tenant(spec("hello-a", "hello", "/a"), "team-a"),
        in_tenant(spec("hello-a2", "hello", "/a2"), "team-a"),
        in_tenant(spec("hello-b", "hello", "/b"), "team-b"),
    ])
    .await;
    for path in ["/a", "/a", "/a2", "/b"] {
        assert_eq!(host.get(path).await.status, 200);
    }
    let ledger = host.running.host().ledger().unwrap();
    let query = UsageQuery { by: UsageGrouping::Tenant, ..UsageQuery::default() };
    let totals: Vec<(String, u64)> =
        ledger.summarize_query(&query).unwrap().into_iter().map(|s| (s.tenant, s.requests)).collect();
    assert_eq!(totals, [("team-a".to_string(), 3), ("team-b".to_string(), 1)]);
    let metrics = host.get("/metrics").await.body;
    assert!(metrics.contains("shoal_tenant_requests_total{tenant=\"team-a\"} 3"), "{metrics}");
    assert!(metrics.contains("shoal_tenant_requests_total{tenant=\"team-b\"} 1"), "{metrics}");
}

#[tokio::test]
async fn an_outbound_name_that_leads_to_the_node_itself_is_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let host = TestHost::start().await;
    let mut fetch = spec("fetch", "fetch", "/fetch");
    fetch.grants.outbound_http = BTreeSet::from([format!("localhost:{port}")]);
    host.deploy(vec![fetch]).await;
    let reply = host.get(&format!("/fetch?url=http://localhost:{port}/")).await;
    assert_eq!(reply.status, 502);
    assert!(reply.body.contains("HttpRequestDenied"), "{}", reply.body);
    let metrics = host.get("/metrics").await.body;
    assert!(metrics.contains("shoal_abi_denied_total{capability=\"http.outgoing\",function=\"fetch\"} 1"), "{metrics}");
}

async fn each_namespace_is_held_to_its_key_value_quota(host: &TestHost) {
    let mut specs = Vec::new();
    for tenant in ["a", "b"] {
        let mut kv = spec(&format!("kv-{tenant}"), "kv", &format!("/{tenant}/kv"));
        kv.grants.keyvalue = vec![KeyGrant::parse("default:*").unwrap()];
        specs.push(in_tenant(kv, tenant));
    }
    host.deploy(specs).await;
    let put = |path: &str, bytes: usize| {
        let request = host.client.put(host.url(path)).body(vec![b'x'; bytes]);
        async move { crate::support::Reply::read(request.send().await.unwrap()).await }
    };
    assert_eq!(put("/a/kv/set?key=one", 3000).await.status, 200);
    let refused = put("/a/kv/set?key=two", 3000).await;
    assert_eq!(refused.status, 422, "an error value, not a trap: {}", refused.body);
    assert!(refused.body.contains("quota of 4096 bytes"), "{}", refused.body);
    assert_eq!(host.get("/a/kv/get?key=two").await.status, 404, "nothing of the refused write was kept");
    assert_eq!(put("/b/kv/set?key=two", 3000).await.status, 200, "b's room is its own");
    assert_eq!(host.get("/a/kv/del?key=one").await.status, 200);
    assert_eq!(put("/a/kv/set?key=two", 3000).await.status, 200, "deleting made room");
    let metrics = host.get("/metrics").await.body;
    assert!(metrics.contains("shoal_abi_limited_total{capability=\"keyvalue.set\",function=\"kv-a\"} 1"), "{metrics}");

    // Increments are writes too: counters of fresh keys fill the quota and
    // then are refused, while one that stays as long goes on.
    let mut counters = 0;
    let refused = loop {
        let reply = host.get(&format!("/a/kv/incr?key=counter-{counters:06}")).await;
        if reply.status != 200 {
            break reply;
        }
        counters += 1;
        assert!(counters < 200, "1096 bytes of room hold far fewer counters of 15 bytes");
    };
    assert_eq!(refused.status, 422, "an error value: {}", refused.body);
    assert!(refused.body.contains("quota of 4096 bytes"), "{}", refused.body);
    assert!(counters > 10, "the room left was used: {counters} counters");
    assert_eq!(host.get(&format!("/a/kv/get?key=counter-{counters:06}")).await.status, 404, "nothing kept");
    assert_eq!(host.get("/a/kv/incr?key=counter-000000").await.status, 200, "1 -> 2 grows nothing");
}

#[tokio::test]
async fn each_namespace_is_held_to_its_key_value_quota_on_the_embedded_store() {
    let host = TestHost::start_configured(|config| config.kv_bytes_per_tenant = Some(4096)).await;
    each_namespace_is_held_to_its_key_value_quota(&host).await;
}

#[tokio::test]
async fn each_namespace_is_held_to_its_key_value_quota_on_redis() {
    let redis = RedisServer::start().await;
    let host = crate::redis_backend::host_on_configured(&redis, |config| config.kv_bytes_per_tenant = Some(4096)).await;
    each_namespace_is_held_to_its_key_value_quota(&host).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_slow_compile_holds_no_other_tenants_deploy() {
    // A compile cache of its own: tenant a's compile happens here whatever
    // ran before, and tenant b's function is in it (what b does below needs
    // the registry, not the compiler, which both would share).
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_path_buf();
    let host = TestHost::start_configured(move |config| config.engine.cache_dir = Some(dir)).await;
    host.deploy(vec![in_tenant(spec("hello", "hello", "/hello"), "b")]).await;
    host.running.host().registry().undeploy("hello").await.unwrap();
    // Tenant a deploys a 19 MB Python component with fuel metering, which
    // only Cranelift compiles: seconds of work for the registry.
    let mut slow = in_tenant(spec("big", "hello", "/big"), "a");
    slow.wasm = crate::languages::lang_guest("hello-py");
    slow.limits.fuel_per_request = std::num::NonZeroU64::new(10_000_000_000);
    let shared = host.running.host().clone();
    let began = Instant::now();
    let slow_deploy = tokio::spawn({
        let item = crate::support::item(slow);
        async move { shared.registry().deploy(vec![item]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile tenant b deploys, lists and undeploys as if alone.
    let quick = Instant::now();
    host.deploy(vec![in_tenant(spec("hello", "hello", "/hello"), "b")]).await;
    assert_eq!(host.get("/hello").await.status, 200);
    let listed = host.running.host().registry().list().await;
    assert!(listed.iter().any(|f| f.name == "hello"));
    host.running.host().registry().undeploy("hello").await.unwrap();
    let took = quick.elapsed();
    assert!(!slow_deploy.is_finished(), "tenant a's compile ({:?} so far) outlasts tenant b's work", began.elapsed());
    let deployed = slow_deploy.await.unwrap().expect("tenant a's deploy completes");
    let slow_took = began.elapsed();
    assert_eq!(deployed[0].source, "compiled");
    assert!(took * 2 < slow_took, "tenant b took {took:?} beside tenant a's compile of {slow_took:?}");
    assert_eq!(host.get("/big?name=ann").await.body, "hello, ann\n");
}
