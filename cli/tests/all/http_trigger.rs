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
    let mut spin = spec("endless", "endless", "/endless");
    spin.limits.timeout = std::time::Duration::from_millis(100);
    // A fuel limit, so that its requests meter fuel.
    let mut hello = spec("hello", "hello", "/hello");
    hello.limits.fuel_per_request = std::num::NonZeroU64::new(1 << 40);
    host.deploy(vec![hello, spin]).await;
    for _ in 0..3 {
        host.get("/hello").await;
    }
    host.get("/endless").await;
    let metrics = host.get("/metrics").await.body;
    for expected in [
        r#"shoal_requests_total{function="hello"} 3"#,
        r#"shoal_requests_total{function="endless"} 1"#,
        r#"shoal_request_errors_total{function="endless",kind="timeout"} 1"#,
        r#"shoal_cold_starts_total{function="hello"} 1"#,
        r#"shoal_request_duration_seconds_count{function="hello"} 3"#,
    ] {
        assert!(metrics.contains(expected), "missing {expected} in\n{metrics}");
    }
    let instances = metrics.lines().find(|l| l.starts_with(r#"shoal_instances{function="hello""#)).unwrap();
    assert!(instances.ends_with(" 1"), "{instances}");
    for family in ["shoal_fuel_consumed_total", "shoal_cpu_seconds_total", "shoal_memory_byte_seconds_total"] {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{family}{{function=\"hello\"}}"))).unwrap();
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(value > 0.0, "{line}");
    }
    // Prometheus' own linter finds nothing to say about them.
    use std::io::Write as _;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (make test-deps)");
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let findings = format!("{}{}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));
    assert!(checked.status.success() && findings.trim().is_empty(), "promtool check metrics: {findings}");
}

#[tokio::test]
async fn readyz_says_ready_only_once_the_manifests_functions_answer() {
    // A load balancer probes the port from the moment it opens; every
    // "ready" it sees must mean the functions are there to serve.
    let state = tempfile::tempdir().unwrap();
    let manifest =
        crate::support::write_manifest(state.path(), &crate::support::manifest_entry("hello", "hello", "/hello"));
    let host = crate::support::HostProcess::spawn_without_waiting(state.path(), Some(&manifest), &[]);
    let addr = &host.addr;
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
    assert!(ready, "never ready within 60 s ({not_ready} not-ready answers)");
}

/// Read until the server closes the connection (or 10 s pass); what it sent.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt as _;
    let mut received = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut received)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&received).into_owned()),
        Err(_) => None, // still open
    }
}

#[tokio::test]
async fn clients_that_stall_before_a_whole_request_head_are_disconnected() {
    use tokio::io::AsyncWriteExt as _;
    let host = TestHost::start_configured(|config| {
        config.front_door.header_read_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    host.deploy(vec![spec("hello", "hello", "/hello")]).await;
    let addr = host.running.http_addr().unwrap();

    // Half a request head; nothing at all; half of HTTP/2's preface.
    let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2").await.unwrap();
    // A keep-alive connection that served one request, then idles.
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();

    for (name, stream) in [("half", &mut half), ("silent", &mut silent), ("preface", &mut preface)] {
        let sent = read_until_closed(stream).await;
        assert!(sent.is_some(), "the {name} connection is still open");
    }
    let sent = read_until_closed(&mut idle).await.expect("the idle keep-alive connection is closed");
    assert!(sent.starts_with("HTTP/1.1 200") && sent.contains("hello, world"), "{sent}");

    let metrics = host.get("/metrics").await.body;
    let closed = metrics
        .lines()
        .find_map(|line| line.strip_prefix("shoal_connections_closed_total{reason=\"header_timeout\"} "))
        .and_then(|count| count.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(closed >= 3, "three stalled heads counted: {metrics}");
    assert_eq!(host.get("/hello").await.status, 200, "the host serves on");
}

#[tokio::test]
async fn a_client_that_closes_its_sending_side_after_its_request_still_gets_the_answer() {
    use tokio::io::AsyncWriteExt as _;
    let host = TestHost::start().await;
    host.deploy(vec![spec("slow", "slow", "/slow")]).await;
    let addr = host.running.http_addr().unwrap();
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client.write_all(b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    // Done sending (a half-close), long before the function answers.
    client.shutdown().await.unwrap();
    let answer = read_until_closed(&mut client).await.expect("the connection closes after the answer");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("slept 300 ms"), "{answer:?}");
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once_and_others_still_serve() {
    let host = TestHost::start_configured(|config| config.front_door.max_connections = 3).await;
    host.deploy(vec![spec("hello", "hello", "/hello")]).await;
    let addr = host.running.http_addr().unwrap();
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| tokio::net::TcpStream::connect(addr))).await;
    let mut held: Vec<_> = held.into_iter().map(Result::unwrap).collect();
    // Every slot is taken: the next connection is accepted and closed.
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let sent = read_until_closed(&mut extra).await;
    assert_eq!(sent.as_deref(), Some(""), "closed at once, without an answer");
    // A held connection serves; one given back makes room for a new one.
    {
        use tokio::io::AsyncWriteExt as _;
        let first = &mut held[0];
        first.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let sent = read_until_closed(first).await.unwrap();
        assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
    }
    held.remove(0);
    let ok = crate::support::eventually(std::time::Duration::from_secs(5), || async {
        reqwest::get(host.url("/hello")).await.is_ok_and(|reply| reply.status() == 200)
    })
    .await;
    assert!(ok, "a freed slot serves a new client");
    drop(held);
    let refused = crate::support::eventually(std::time::Duration::from_secs(5), || async {
        let metrics = reqwest::get(host.url("/metrics")).await;
        match metrics {
            Ok(reply) => {
                reply.text().await.unwrap().contains("shoal_connections_closed_total{reason=\"max_connections\"} 1")
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(refused, "the refused connection is counted");
}

#[tokio::test]
async fn a_request_head_over_the_limit_gets_431() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("hello", "hello", "/hello")]).await;
    let big = "x".repeat(100 << 10);
    let reply = host.client.get(host.url("/hello")).header("x-big", big).send().await.unwrap();
    assert_eq!(reply.status(), 431);
    let many = (0..150).fold(host.client.get(host.url("/hello")), |request, n| request.header(format!("x-h{n}"), "v"));
    assert_eq!(many.send().await.unwrap().status(), 431);
    assert_eq!(host.get("/hello").await.status, 200);
}

#[tokio::test]
async fn a_route_asked_for_while_the_host_is_starting_is_refused_for_now_not_as_missing() {
    // `shoal serve` listens before its manifest's functions are deployed
    // (here a Go function compiled by Cranelift first: a second or more).
    // A client in that window is told to come back, not that no function
    // serves the path.
    let state = tempfile::tempdir().unwrap();
    let manifest = crate::support::write_manifest(
        state.path(),
        &format!(
            "[[function]]\nname = \"go\"\nwasm = \"{}\"\nroutes = [\"/hello\"]\n",
            crate::languages::lang_guest("hello-go").display()
        ),
    );
    let host = crate::support::HostProcess::spawn_without_waiting(state.path(), Some(&manifest), &["--no-tier-up"]);
    let client = reqwest::Client::new();
    let url = host.url("/hello");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut not_ready = 0;
    let served = loop {
        assert!(std::time::Instant::now() < deadline, "served within 60 s ({not_ready} refusals): {}", host.log());
        let Ok(reply) = client.get(&url).send().await else {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        let (status, kind) = (reply.status().as_u16(), reply.headers().get("x-shoal-error").cloned());
        let retry = reply.headers().get("retry-after").cloned();
        let body = reply.text().await.unwrap();
        if status == 200 {
            break body;
        }
        assert_eq!(
            (status, kind.as_ref().and_then(|k| k.to_str().ok()), retry.as_ref().and_then(|r| r.to_str().ok())),
            (503, Some("not_ready"), Some("1")),
            "{body}"
        );
        assert!(body.contains("no function serves /hello now: the host is not ready"), "{body}");
        not_ready += 1;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert!(not_ready > 0, "the window before the deploy was seen");
    assert!(served.starts_with("hello"), "{served}");
}
