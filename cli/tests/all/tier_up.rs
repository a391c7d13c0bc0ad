//! Never-seen wasm is served at once from Winch's code, and Cranelift's
//! code replaces it when ready.

use std::time::Duration;

use crate::support::{TestHost, spec};

/// A host that tiers up, with a cache of its own (so every wasm is new).
async fn tiering_host(cache: &std::path::Path) -> TestHost {
    let cache = cache.to_path_buf();
    TestHost::start_configured(move |config| {
        config.engine.tier_up = true;
        config.engine.cache_dir = Some(cache);
    })
    .await
}

async fn code_of(host: &TestHost, function: &str) -> String {
    let functions = host.running.host().registry().list().await;
    let found = functions.iter().find(|f| f.name == function).expect("deployed");
    found.versions[0].code.clone()
}

fn texts(host: &TestHost) -> Vec<String> {
    host.lines_of("lifecycle").into_iter().map(|line| line.text).collect()
}

#[tokio::test]
async fn never_seen_wasm_is_served_from_baseline_code_then_optimized_code_with_baseline_instances_retired() {
    let cache = tempfile::tempdir().unwrap();
    let host = tiering_host(cache.path()).await;
    let report = host.deploy(vec![spec("lifecycle", "lifecycle", "/lc")]).await;
    assert_eq!(report[0].source, "baseline", "compiled by Winch, not waiting for Cranelift");
    let first = host.get("/lc").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let served_by_baseline = code_of(&host, "lifecycle").await == "baseline";

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while code_of(&host, "lifecycle").await != "optimized" {
        assert!(std::time::Instant::now() < deadline, "Cranelift's code never replaced Winch's");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cached = std::fs::read_dir(cache.path()).unwrap().filter_map(Result::ok).count();
    assert_eq!(cached, 1, "Cranelift's code is in the cache for the next deploy");

    for _ in 0..3 {
        assert_eq!(host.get("/lc").await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(host.live_instances("lifecycle").await, 1, "one instance, of the optimized code");
    let lines = texts(&host);
    let starts = lines.iter().filter(|line| *line == "lifecycle: start").count();
    let destroys = lines.iter().filter(|line| line.starts_with("lifecycle: destroy")).count();
    assert_eq!(starts, destroys + 1, "every baseline instance was retired with destroy: {lines:?}");
    if served_by_baseline {
        assert_eq!((starts, destroys), (2, 1), "{lines:?}");
        assert_eq!(lines.last().map(String::as_str), Some("lifecycle: request 3"), "{lines:?}");
    }
}

#[tokio::test]
async fn limits_hold_on_baseline_code_and_fuel_limited_functions_compile_with_cranelift_at_once() {
    let cache = tempfile::tempdir().unwrap();
    let host = tiering_host(cache.path()).await;
    let mut spin = spec("endless", "endless", "/endless");
    spin.limits.timeout = Duration::from_millis(100);
    let mut fib = spec("fib", "fib", "/fib");
    fib.limits.fuel_per_request = std::num::NonZeroU64::new(5_000_000);
    let report = host.deploy(vec![spin, fib]).await;
    assert_eq!(report[0].source, "baseline");
    assert_eq!(report[1].source, "compiled", "fuel is metered by Cranelift's code only");
    assert_eq!(code_of(&host, "fib").await, "metered");

    let spun = host.get("/endless").await;
    assert_eq!(spun.status, 504, "the wall-clock limit cuts Winch's code off too: {}", spun.body);
    let burnt = host.get("/fib?n=35").await;
    assert_eq!(burnt.status, 503, "{}", burnt.body);
    assert_eq!(burnt.error_kind(), Some("fuel_exhausted"));
}
