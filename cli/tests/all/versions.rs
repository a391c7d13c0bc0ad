//! Updating a function's version under load, and weighted traffic splits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{TestHost, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_update_under_steady_load_fails_no_request() {
    let host = TestHost::start().await;
    // v1 takes 100 ms per request, so requests are in flight during the update.
    host.deploy(vec![spec("svc", "slow", "/svc")]).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..6 {
        let client = host.client.clone();
        let url = host.url("/svc?ms=100&name=v2");
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut bodies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let response = client.get(&url).send().await.expect("connection never fails");
                let status = response.status().as_u16();
                bodies.push((status, response.text().await.expect("body completes")));
            }
            bodies
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    host.deploy(vec![spec("svc", "hello", "/svc")]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);

    let mut answers = Vec::new();
    for client in clients {
        answers.extend(client.await.unwrap());
    }
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    let old = answers.iter().filter(|(_, body)| body.starts_with("slept 100 ms")).count();
    let new = answers.iter().filter(|(_, body)| body == "hello, v2\n").count();
    assert_eq!(old + new, answers.len(), "every answer came from one of the two versions");
    assert!(old > 0 && new > 0, "old {old}, new {new}");
    // After the update, only the new version answers.
    assert_eq!(host.get("/svc?ms=100&name=v2").await.body, "hello, v2\n");
    let versions = host.running.host().registry().list().await[0].versions.len();
    assert_eq!(versions, 1);
}

#[tokio::test]
async fn a_weighted_route_splits_traffic_within_tolerance() {
    let host = TestHost::start().await;
    let mut stable = spec("svc", "hello", "/svc");
    stable.version = Some("stable".into());
    stable.weight = 90;
    let mut canary = spec("svc", "lifecycle", "/svc");
    canary.version = Some("canary".into());
    canary.weight = 10;
    host.deploy(vec![stable, canary]).await;

    let total = 1000;
    let mut to_canary = 0;
    for _ in 0..total {
        let reply = host.get("/svc").await;
        assert_eq!(reply.status, 200);
        if reply.body.starts_with('{') {
            to_canary += 1;
        }
    }
    let share = to_canary as f64 / total as f64;
    // Binomial(1000, 0.1): sd ≈ 0.0095; ±0.035 is beyond 3.5 sd.
    assert!((0.065..=0.135).contains(&share), "canary got {share:.3} of traffic");
}

#[tokio::test]
async fn a_failed_deploy_changes_nothing() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("svc", "hello", "/svc")]).await;
    let mut good = spec("svc", "lifecycle", "/svc");
    good.version = Some("2".into());
    let mut bad = spec("other", "hello", "/other");
    bad.wasm = crate::support::guest("cli-hello"); // no HTTP handler
    let result = host.try_deploy(vec![good, bad]).await;
    assert!(matches!(result, Err(shoal::Error::MissingHandler { ref function }) if function == "other"), "{result:?}");
    assert_eq!(host.get("/svc").await.body, "hello, world\n");
    assert_eq!(host.get("/other").await.status, 404);
}

#[tokio::test]
async fn two_functions_cannot_claim_the_same_route() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("a", "hello", "/x")]).await;
    let result = host.try_deploy(vec![spec("b", "hello", "/x")]).await;
    assert!(
        matches!(&result, Err(shoal::Error::RouteConflict { route, owner, .. }) if route == "/x" && owner == "a"),
        "{result:?}"
    );
}
