//! Routing, request ids, health endpoints and metrics.

use crate::support::{TestHost, spec};

#[tokio::test]
async fn routes_match_by_longest_prefix_and_by_host() {
    let host = TestHost::start().await;
    let mut api = spec("api", "lifecycle", "api.example/");
    api.routes.push(shoal::manifest::Route::parse("/hello/deeper").unwrap());
    host.deploy(vec![spec("hello", "hello", "/hello"), api]).await;

    assert_eq!(host.get("/hello/x").await.body, "hello, world\n");
    assert!(host.get("/hello/deeper/x").await.body.starts_with('{'), "the longer prefix wins");
    assert_eq!(host.get("/helloworld").await.status, 404, "prefixes match whole segments");
    let by_host = host.client.get(host.url("/hello")).header("host", "API.example:9999").send().await.unwrap();
    assert!(by_host.text().await.unwrap().starts_with('{'), "a host route beats a path-only route");
    let missing = host.get("/nothing").await;
    assert_eq!((missing.status, missing.error_kind()), (404, Some("no_route")));
}

#[tokio::test]
async fn every_response_carries_a_request_id_generated_or_propagated() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("hello", "hello", "/hello")]).await;
    let generated = host.get("/hello").await;
    let id = generated.header("x-request-id").unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let propagated = host.client.get(host.url("/hello")).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(propagated.headers()["x-request-id"], "abc-123");
    let overlong = "x".repeat(500);
    let replaced = host.client.get(host.url("/hello")).header("x-request-id", &overlong).send().await.unwrap();
    assert_ne!(replaced.headers()["x-request-id"], overlong.as_str());
}

#[tokio::test]
async fn health_and_readiness_answer_ok() {
    let host = TestHost::start().await;
    assert_eq!(host.get("/healthz").await.status, 200);
    assert_eq!(host.get("/readyz").await.status, 200);
}

#[tokio::test]
async fn metrics_count_requests_errors_by_kind_cold_starts_and_instances_per_function() {
    let host = TestHost::start().await;
    let mut spin = spec("spin", "spin", "/spin");
    spin.limits.timeout = std::time::Duration::from_millis(100);
    host.deploy(vec![spec("hello", "hello", "/hello"), spin]).await;
    for _ in 0..3 {
        host.get("/hello").await;
    }
    host.get("/spin").await;
    let metrics = host.get("/metrics").await.body;
    for expected in [
        r#"shoal_requests_total{function="hello"} 3"#,
        r#"shoal_requests_total{function="spin"} 1"#,
        r#"shoal_request_errors_total{function="spin",kind="timeout"} 1"#,
        r#"shoal_cold_starts_total{function="hello"} 1"#,
        r#"shoal_request_duration_seconds_count{function="hello"} 3"#,
    ] {
        assert!(metrics.contains(expected), "missing {expected} in\n{metrics}");
    }
    let instances = metrics.lines().find(|l| l.starts_with(r#"shoal_instances{function="hello""#)).unwrap();
    assert!(instances.ends_with(" 1"), "{instances}");
    for family in ["shoal_fuel_consumed_total", "shoal_cpu_seconds_total", "shoal_memory_gb_seconds_total"] {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{family}{{function=\"hello\"}}"))).unwrap();
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > 0.0, "{line}");
    }
}

#[tokio::test]
async fn readyz_says_ready_only_once_the_manifests_functions_answer() {
    // A load balancer probes the port from the moment it opens; every
    // "ready" it sees must mean the functions are there to serve.
    let state = tempfile::tempdir().unwrap();
    let manifest =
        crate::support::write_manifest(state.path(), &crate::support::manifest_entry("hello", "hello", "/hello"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = std::process::Command::new(crate::support::shoal_bin())
        .arg("--state-dir")
        .arg(state.path())
        .args(["serve", "--listen", &addr])
        .arg(&manifest)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (mut not_ready, mut ready) = (0, false);
    while std::time::Instant::now() < deadline {
        match client.get(format!("http://{addr}/readyz")).send().await {
            Ok(reply) if reply.status() == 200 => {
                let hello = client.get(format!("http://{addr}/hello")).send().await.unwrap();
                assert_eq!(hello.status(), 200, "ready, but /hello answered {}", hello.status());
                ready = true;
                break;
            }
            Ok(reply) => {
                assert_eq!(reply.status(), 503);
                not_ready += 1;
            }
            Err(_) => {} // not listening yet
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(ready, "never ready within 60 s ({not_ready} not-ready answers)");
}
