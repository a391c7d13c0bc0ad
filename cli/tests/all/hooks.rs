//! `start` runs once per instance before its first request; `destroy` runs
//! before the instance is dropped.

use crate::support::{TestHost, spec};

fn texts(host: &TestHost) -> Vec<String> {
    host.lines_of("lifecycle").into_iter().map(|line| line.text).collect()
}

#[tokio::test]
async fn start_runs_once_before_the_first_request_and_the_instance_is_reused() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("lifecycle", "lifecycle", "/lc")]).await;
    assert!(texts(&host).is_empty(), "no instance (and no start) before the first request");

    let first = host.get("/lc").await;
    let second = host.get("/lc").await;
    assert_eq!(first.body, r#"{"started":true,"served":1}"#);
    assert_eq!(second.body, r#"{"started":true,"served":2}"#, "the warm instance served the second request");
    assert_eq!(texts(&host), ["lifecycle: start", "lifecycle: request 1", "lifecycle: request 2"]);
}

#[tokio::test]
async fn an_instance_is_retired_with_destroy_after_max_requests_per_instance() {
    let host = TestHost::start().await;
    let mut lifecycle = spec("lifecycle", "lifecycle", "/lc");
    lifecycle.limits.max_requests_per_instance = std::num::NonZeroU32::new(2);
    host.deploy(vec![lifecycle]).await;

    let mut bodies = Vec::new();
    for _ in 0..5 {
        bodies.push(host.get("/lc").await.body);
    }
    let counts: Vec<&str> = bodies.iter().map(|body| body.split("\"served\":").nth(1).unwrap_or(body)).collect();
    assert_eq!(counts, ["1}", "2}", "1}", "2}", "1}"], "each instance serves two requests, then a fresh one starts");
    // The retired instances ran destroy (in the background, after their second response).
    let retired = crate::support::eventually(std::time::Duration::from_secs(5), || async {
        texts(&host).iter().filter(|line| *line == "lifecycle: destroy after 2 requests").count() == 2
    })
    .await;
    assert!(retired, "{:?}", texts(&host));
    assert_eq!(texts(&host).iter().filter(|line| *line == "lifecycle: start").count(), 3);
    assert_eq!(host.live_instances("lifecycle").await, 1, "the third instance stays warm");
}

#[tokio::test]
async fn a_fresh_instance_starts_pristine_when_freed_slots_keep_their_memory_resident() {
    // Slots keep 8 MiB resident: the next instance's memory is restored in
    // place from the image instead of being handed back to the kernel.
    let host = TestHost::start_configured(|config| config.engine.keep_resident_bytes = 8 << 20).await;
    let mut lifecycle = spec("lifecycle", "lifecycle", "/lc");
    lifecycle.limits.max_requests_per_instance = std::num::NonZeroU32::new(1);
    host.deploy(vec![lifecycle]).await;
    for _ in 0..20 {
        let reply = host.get("/lc").await;
        assert_eq!(reply.body, r#"{"started":true,"served":1}"#, "no state survives into the next instance");
    }
}

#[tokio::test]
async fn destroy_runs_when_the_function_is_undeployed() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("lifecycle", "lifecycle", "/lc")]).await;
    host.get("/lc").await;
    host.running.host().registry().undeploy("lifecycle").await.unwrap();
    assert_eq!(texts(&host), ["lifecycle: start", "lifecycle: request 1", "lifecycle: destroy after 1 requests"]);
    assert_eq!(host.get("/lc").await.status, 404);
    // A host that runs for months keeps no metric series of what is gone.
    let metrics = host.get("/metrics").await.body;
    assert!(!metrics.contains("function=\"lifecycle\""), "{metrics}");
}

#[tokio::test]
async fn destroy_runs_on_host_shutdown() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("lifecycle", "lifecycle", "/lc")]).await;
    host.get("/lc").await;
    host.get("/lc").await;
    let logs = host.logs.clone();
    host.running.shutdown().await;
    let lines: Vec<String> = logs.lines().into_iter().map(|line| line.text).collect();
    assert_eq!(lines.last().map(String::as_str), Some("lifecycle: destroy after 2 requests"));
}

#[tokio::test]
async fn start_and_request_lines_carry_the_request_id_and_destroy_lines_none() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("lifecycle", "lifecycle", "/lc")]).await;
    let reply = host.client.get(host.url("/lc")).header("x-request-id", "trace-me-42").send().await.unwrap();
    assert_eq!(reply.headers()["x-request-id"], "trace-me-42");
    host.running.host().registry().undeploy("lifecycle").await.unwrap();
    let lines = host.lines_of("lifecycle");
    let request_line = lines.iter().find(|line| line.text == "lifecycle: request 1").unwrap();
    assert_eq!(request_line.request_id.as_deref(), Some("trace-me-42"));
    let destroy_line = lines.iter().find(|line| line.text.starts_with("lifecycle: destroy")).unwrap();
    assert_eq!(destroy_line.request_id, None);
}

#[tokio::test]
async fn a_trap_in_start_answers_503_naming_the_hook_and_other_functions_keep_serving() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("trap-start", "trap-start", "/trap"), spec("hello", "hello", "/hello")]).await;
    let reply = host.get("/trap").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_kind(), Some("start_failed"));
    assert!(reply.body.contains("trap-start") && reply.body.contains("start hook"), "{}", reply.body);
    assert_eq!(host.live_instances("trap-start").await, 0, "a failed instance is not kept");
    assert_eq!(host.get("/hello").await.body, "hello, world\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_a_slot_keeps_resident_carries_nothing_from_one_tenants_instance_to_anothers() {
    use shoal::manifest::TenantName;
    // Few slots, each keeping 64 MiB resident: the instances of the two
    // tenants' functions take turns on the same slots and pages.
    let host = TestHost::start_configured(|config| {
        config.engine.keep_resident_bytes = 64 << 20;
        config.engine.max_instances = 2;
        config.engine.max_instances_per_function = Some(2);
        config.engine.max_instances_per_tenant = Some(2);
    })
    .await;
    let mut writer = spec("marker-a", "marker", "/a");
    writer.tenant = TenantName::new("a").unwrap();
    writer.limits.max_requests_per_instance = std::num::NonZeroU32::new(1);
    let mut looker = spec("marker-b", "marker", "/b");
    looker.tenant = TenantName::new("b").unwrap();
    looker.limits.max_requests_per_instance = std::num::NonZeroU32::new(1);
    host.deploy(vec![writer, looker]).await;
    for round in 0..10 {
        let wrote = host.get("/a/write?mb=16&tag=tenant-a").await;
        assert!(wrote.body.starts_with("wrote 16 MiB"), "{}", wrote.body);
        let looked = host.get("/b/look?mb=16").await;
        assert_eq!(looked.body, "clean\n", "round {round}: tenant b's fresh memory held tenant a's data");
        let again = host.get("/a/look?mb=16").await;
        assert_eq!(again.body, "clean\n", "round {round}: a fresh instance of a saw its predecessor's data");
    }
}
