//! A failing callee is cut off instead of dragging its callers down: its
//! circuit breaker opens, callers fail at once with an error value naming
//! it, a probe goes through after the cool-down, and a healthy callee
//! closes the breaker again; calls safe to repeat are retried.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::{TestHost, spec};

/// `invoker` allowed to call `api` (its breakers open after 4 failures
/// in a row, for 500 ms), and `api` running `guest` under a 100 ms
/// timeout.
fn functions(guest: &str) -> Vec<shoal::manifest::FunctionSpec> {
    let mut invoker = spec("invoker", "invoker", "/invoker");
    invoker.grants.invoke = BTreeSet::from(["api".to_string()]);
    invoker.limits.timeout = Duration::from_secs(5);
    invoker.limits.breaker_failures = std::num::NonZeroU32::new(4).unwrap();
    invoker.limits.breaker_cooldown = Duration::from_millis(500);
    let mut api = spec("api", guest, "/api");
    api.limits.timeout = Duration::from_millis(100);
    vec![invoker, api]
}

fn breaker_line(metrics: &str) -> Option<&str> {
    metrics.lines().find(|line| line.starts_with(r#"shoal_breaker_state{function="invoker",target="api@local"}"#))
}

#[tokio::test]
async fn a_timing_out_callee_opens_its_breaker_callers_fail_fast_and_it_closes_once_the_callee_answers() {
    let host = TestHost::start_persistent().await;
    host.deploy(functions("endless")).await;

    // A GET is safe to repeat: the first call is tried three times.
    let first = host.client.get(host.url("/invoker/call?fn=api")).header("x-request-id", "top-1");
    let first = crate::support::Reply::read(first.send().await.unwrap()).await;
    assert_eq!(first.status, 504, "the callee's timeout, relayed: {}", first.body);
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let attempts: Vec<&str> = records.iter().filter(|r| r.function == "api").map(|r| &*r.request_id).collect();
    assert_eq!(attempts, ["top-1/1", "top-1/2", "top-1/3"], "one call and two retries");

    // Failures in a row open the breaker (4, as the caller set).
    let mut opened = false;
    for _ in 0..5 {
        let reply = host.get("/invoker/call?fn=api").await;
        if reply.body.contains("circuit breaker of api@local is open") {
            opened = true;
            break;
        }
    }
    assert!(opened, "the breaker opened");
    let metrics = host.get("/metrics").await.body;
    assert_eq!(breaker_line(&metrics), Some(r#"shoal_breaker_state{function="invoker",target="api@local"} 2"#));

    // While open, no call waits for the callee's 100 ms timeout.
    for _ in 0..5 {
        let started = Instant::now();
        let reply = host.get("/invoker/call?fn=api").await;
        let took = started.elapsed();
        assert_eq!(reply.status, 502, "{}", reply.body);
        assert!(reply.body.contains("circuit breaker of api@local is open (retrying in"), "{}", reply.body);
        assert!(took < Duration::from_millis(100), "a short-circuited call took {took:?}");
    }
    // After the cool-down, one probe reaches the (still failing) callee and
    // opens the breaker again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let probe = host.get("/invoker/call?fn=api").await;
    assert!(probe.body.contains("api@local answered 504; the circuit breaker of api@local is open"), "{}", probe.body);
    let after = host.get("/invoker/call?fn=api").await;
    assert!(after.body.contains("circuit breaker of api@local is open"), "{}", after.body);
    let metrics = host.get("/metrics").await.body;
    let short = metrics
        .lines()
        .find(|line| line.starts_with(r#"shoal_breaker_short_circuited_total{function="invoker",target="api@local"}"#))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<u64>().ok());
    assert!(short.is_some_and(|short| short >= 5), "{metrics}");

    // The callee is fixed; after the cool-down a probe reaches it and the
    // breaker closes.
    host.deploy(functions("hello")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reply = host.get("/invoker/call?fn=api").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "hello, world\n"));
    let metrics = host.get("/metrics").await.body;
    assert_eq!(breaker_line(&metrics), Some(r#"shoal_breaker_state{function="invoker",target="api@local"} 0"#));

    let views = host.running.host().services().breakers.views();
    let view = views.iter().find(|view| view.target == "api@local").expect("the breaker is listed");
    assert_eq!((&*view.function, view.state), ("invoker", shoal::resilience::BreakerState::Closed));
    assert!(view.retries >= 2, "{view:?}");
}

#[tokio::test]
async fn a_function_with_call_retries_0_makes_one_attempt() {
    let host = TestHost::start_persistent().await;
    let mut specs = functions("endless");
    specs[0].limits.call_retries = 0;
    host.deploy(specs).await;
    let reply = host.client.get(host.url("/invoker/call?fn=api")).header("x-request-id", "top-2");
    let reply = crate::support::Reply::read(reply.send().await.unwrap()).await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let attempts = records.iter().filter(|r| r.function == "api").count();
    assert_eq!(attempts, 1, "call_retries = 0: one attempt");
}

#[tokio::test]
async fn an_undeployed_callers_breakers_leave_the_metrics() {
    let host = TestHost::start().await;
    host.deploy(functions("endless")).await;
    host.get("/invoker/call?fn=api").await;
    assert!(breaker_line(&host.get("/metrics").await.body).is_some());
    host.running.host().registry().undeploy("invoker").await.unwrap();
    assert!(breaker_line(&host.get("/metrics").await.body).is_none());
}

#[tokio::test]
async fn outbound_http_to_a_server_that_is_down_is_cut_off_and_tried_again_after_the_cool_down() {
    let host = TestHost::start().await;
    let port = crate::cluster::free_port();
    let authority = format!("127.0.0.1:{port}");
    let mut fetch = spec("fetch", "fetch", "/fetch");
    fetch.grants.outbound_http = BTreeSet::from([authority.clone()]);
    fetch.limits.breaker_failures = std::num::NonZeroU32::new(3).unwrap();
    fetch.limits.breaker_cooldown = Duration::from_millis(500);
    host.deploy(vec![fetch]).await;
    let path = format!("/fetch?url=http://{authority}/data");

    let refused = host.get(&path).await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    for _ in 0..2 {
        host.get(&path).await;
    }
    let metrics = host.get("/metrics").await.body;
    let open = format!(r#"shoal_breaker_state{{function="fetch",target="{authority}"}} 2"#);
    assert!(metrics.lines().any(|line| line == open), "{open} in\n{metrics}");
    let short = host.get(&path).await;
    assert_eq!(short.status, 502);
    assert_ne!(short.body, refused.body, "refused at once by the breaker, not by the server");

    // The server comes up; after the cool-down the probe reaches it.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    crate::support::upstream_on(listener, |_| "up".to_string());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let reply = host.get(&path).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "up"));
    let metrics = host.get("/metrics").await.body;
    assert!(metrics.lines().any(|line| line == open.replace("} 2", "} 0")), "{metrics}");
}

#[tokio::test]
async fn a_retry_storm_on_a_failing_callee_stays_within_the_retry_budget() {
    let host = TestHost::start_persistent().await;
    let mut specs = functions("panic");
    // Retries as many as the host allows, and a breaker that hardly holds
    // anything back (no run of failures opens it; when its failure ratio
    // does, a probe may go 1 ms later): the budget holds the storm back.
    specs[0].limits.call_retries = 10;
    // Ten retries' back-offs alone may add up to 6.55 s (50 ms doubling
    // to 1 s, each a random time up to that), and a call the budget lets
    // retry may make them all: the caller's timeout is not what is tested.
    specs[0].limits.timeout = Duration::from_secs(30);
    specs[0].limits.breaker_failures = std::num::NonZeroU32::new(100_000).unwrap();
    specs[0].limits.breaker_cooldown = Duration::from_millis(1);
    host.deploy(specs).await;
    // The budget earns its tokens per second from here on: the first call
    // drains the bank, and the time until the last call counts.
    let started = Instant::now();
    // The first call spends the 10 banked tokens: 1 + 10 attempts.
    let first = host.client.get(host.url("/invoker/call?fn=api")).header("x-request-id", "storm-0");
    let first = crate::support::Reply::read(first.send().await.unwrap()).await;
    assert!(matches!(first.status, 500 | 502), "{} {}", first.status, first.body);
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let first_attempts = records.iter().filter(|r| r.parent_id.as_deref() == Some("storm-0")).count();
    assert_eq!(first_attempts, 11, "the call and its 10 retries");
    let calls = 30;
    for _ in 0..calls {
        let reply = host.get("/invoker/call?fn=api").await;
        // The callee's trap relayed, or the breaker's error value.
        assert!(matches!(reply.status, 500 | 502), "{} {}", reply.status, reply.body);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let attempts = (records.iter().filter(|r| r.function == "api").count() - first_attempts) as f64;
    // Without a budget: 30 × 11 = 330 more attempts. With it: one per call,
    // a retry per fifth of a token each call brings, and 2 per second.
    let allowed = f64::from(calls) + 0.2 * f64::from(calls) + 2.0 * elapsed + 1.0;
    assert!(attempts <= allowed, "{attempts} attempts in {elapsed:.1}s, at most {allowed:.0} allowed");
    let metrics = host.get("/metrics").await.body;
    let exhausted = metrics
        .lines()
        .find(|line| line.starts_with(r#"shoal_retry_budget_exhausted_total{function="invoker"}"#))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<u64>().ok());
    assert!(exhausted.is_some_and(|n| n > 0), "{metrics}");
}

/// A host whose functions invoke functions of `peers` (and which serves
/// theirs by name), with the shared token `token`.
async fn peer_host(peers: Vec<String>, token: &str) -> TestHost {
    let peers = shoal::abi::Peers { addrs: peers, token: token.into() };
    TestHost::start_full(Some(tempfile::tempdir().unwrap().keep()), move |config| config.peers = Some(peers)).await
}

#[tokio::test]
async fn without_kubernetes_a_function_invokes_a_function_of_a_peer_host_which_serves_only_its_peers() {
    const TOKEN: &str = "a-shared-secret-of-some-length";
    // Host B serves `api` and an invoker that loops; host A has neither.
    let b = peer_host(Vec::new(), TOKEN).await;
    let mut looping = spec("invoker", "invoker", "/invoker");
    looping.grants.invoke = BTreeSet::from(["invoker".to_string()]);
    b.deploy(vec![spec("api", "hello", "/api"), looping]).await;
    let b_addr = b.running.http_addr().unwrap().to_string();
    let a = peer_host(vec![b_addr.clone()], TOKEN).await;
    let mut caller = spec("caller", "invoker", "/caller");
    caller.grants.invoke = BTreeSet::from(["api".to_string(), "invoker".to_string()]);
    a.deploy(vec![caller.clone()]).await;

    let reply = a.client.get(a.url("/caller/call?fn=api")).header("x-request-id", "top-9");
    let reply = crate::support::Reply::read(reply.send().await.unwrap()).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "hello, world\n"));
    let records = b.running.host().ledger().unwrap().records(None).unwrap();
    let served = records.iter().find(|r| r.function == "api").expect("B's usage record of the call");
    assert_eq!((&*served.request_id, served.parent_id.as_deref()), ("top-9/1", Some("top-9")));

    // A cycle that crosses hosts still ends at the depth limit: B serves
    // depths 1 to 8.
    let reply = a.get("/caller/call?fn=invoker&path=/loop").await;
    assert_eq!(reply.status, 508, "{}", reply.body);
    let loops = b.running.host().ledger().unwrap().records(None).unwrap();
    assert_eq!(loops.iter().filter(|r| r.function == "invoker").count(), 8);

    // Without the token, no one reaches a function by name.
    let stranger = a
        .client
        .get(format!("http://{b_addr}/"))
        .header("x-shoal-invoke-function", "api")
        .header("x-shoal-peer-token", "a-guess-of-the-same-length!!!!")
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status(), 403);
    let c = peer_host(vec![b_addr], "another-secret-of-some-length").await;
    c.deploy(vec![caller]).await;
    let refused = c.get("/caller/call?fn=api").await;
    assert_eq!(refused.status, 403, "B refuses a host with another token: {}", refused.body);
}
