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
    let records = ledger.records(None).unwrap();
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

/// Resident memory of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test]
async fn memory_of_a_function_scaled_to_zero_goes_back_to_the_os() {
    use crate::support::{HostProcess, write_manifest};
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        state.path(),
        &format!(
            "[[function]]\nname = \"hoard\"\nwasm = \"{}\"\nroutes = [\"/hoard\"]\n\
             [function.limits]\nmemory_mb = 256\nidle_timeout_s = 1\n",
            crate::support::guest("hoard").display()
        ),
    );
    let host = HostProcess::spawn(state.path(), Some(&manifest));
    let pid = host.child.id();
    // Served from Cranelift's code (a Winch instance would be retired as
    // soon as that arrives, not by scaling to zero).
    let code = || {
        let out = host.cli(&["ls", "--json"]);
        let listed = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        listed[0]["versions"][0]["code"].as_str().map(str::to_string)
    };
    let optimized = eventually(Duration::from_secs(60), || async { code().as_deref() == Some("optimized") }).await;
    assert!(optimized, "Cranelift's code never arrived: {:?}", code());
    let body = reqwest::get(host.url("/hoard?mb=128")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "holding 128 MiB\n");
    let holding = rss_bytes(pid);

    let ls = || {
        let out = host.cli(&["ls", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()[0]["versions"][0]["stats"]["live"].as_u64()
    };
    assert_eq!(ls(), Some(1));
    let scaled = eventually(Duration::from_secs(10), || async { ls() == Some(0) }).await;
    assert!(scaled, "hoard never scaled to zero");
    let released = eventually(Duration::from_secs(5), || async { rss_bytes(pid) + (96 << 20) < holding }).await;
    assert!(released, "RSS {} MiB while holding, {} MiB after scale to zero", holding >> 20, rss_bytes(pid) >> 20);
}
