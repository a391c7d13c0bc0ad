//! After `idle_timeout` without requests a function has zero instances;
//! the next request starts one again, as a cold start.

use std::time::Duration;

use crate::support::{TestHost, eventually, spec};

#[tokio::test]
async fn an_idle_function_scales_to_zero_runs_destroy_and_starts_cold_again() {
    let host = TestHost::start_persistent().await;
    let mut lifecycle = spec("lifecycle", "lifecycle", "/lc");
    lifecycle.limits.idle_timeout = Duration::from_secs(1);
    host.deploy(vec![lifecycle]).await;

    assert_eq!(host.get("/lc").await.body, r#"{"started":true,"served":1}"#);
    assert_eq!(host.live_instances("lifecycle").await, 1);

    let scaled = eventually(Duration::from_secs(5), || async { host.live_instances("lifecycle").await == 0 }).await;
    assert!(scaled, "instance still alive long after idle_timeout");
    let texts: Vec<String> = host.lines_of("lifecycle").into_iter().map(|l| l.text).collect();
    assert_eq!(texts.last().map(String::as_str), Some("lifecycle: destroy after 1 requests"));

    // A new instance: its own counter starts over.
    assert_eq!(host.get("/lc").await.body, r#"{"started":true,"served":1}"#);
    let ledger = host.running.host().ledger().unwrap();
    let records = shoal::metering::Ledger::read(ledger.path()).unwrap();
    let cold: Vec<bool> = records.iter().map(|r| r.cold).collect();
    assert_eq!(cold, [true, true], "both requests needed a new instance");
}

#[tokio::test]
async fn a_function_with_zero_instances_accrues_no_usage() {
    let host = TestHost::start_persistent().await;
    let mut hello = spec("hello", "hello", "/hello");
    hello.limits.idle_timeout = Duration::from_secs(1);
    host.deploy(vec![hello]).await;
    host.get("/hello").await;
    assert!(eventually(Duration::from_secs(5), || async { host.live_instances("hello").await == 0 }).await);

    let ledger = host.running.host().ledger().unwrap();
    let before = ledger.summarize(Some("hello"), None).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = ledger.summarize(Some("hello"), None).unwrap();
    assert_eq!(before, after);
    assert_eq!(after[0].requests, 1);
}

#[tokio::test]
async fn a_busy_function_is_not_reclaimed_while_requests_keep_it_warm() {
    let host = TestHost::start().await;
    let mut lifecycle = spec("lifecycle", "lifecycle", "/lc");
    lifecycle.limits.idle_timeout = Duration::from_secs(1);
    host.deploy(vec![lifecycle]).await;
    for served in 1..=6 {
        let reply = host.get("/lc").await;
        assert_eq!(reply.body, format!(r#"{{"started":true,"served":{served}}}"#));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
