//! The usage ledger keeps every completed request across `kill -9`.

use shoal::metering::Ledger;
use shoal::outcome::Outcome;

use crate::support::{HostProcess, manifest_entry, write_manifest};

#[tokio::test]
async fn completed_requests_are_in_the_ledger_after_kill_9_of_the_host() {
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        state.path(),
        &format!("{}{}", manifest_entry("hello", "hello", "/hello"), manifest_entry("fib", "fib", "/fib")),
    );
    let mut host = HostProcess::spawn(state.path(), Some(&manifest));
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..40 {
        let path = if i % 2 == 0 { "/hello" } else { "/fib?n=15" };
        let response = client.get(host.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        ids.push(response.headers()["x-request-id"].to_str().unwrap().to_string());
        response.bytes().await.unwrap();
    }
    host.kill9();

    let records = Ledger::read_dir(&state.path().join("usage"), None).unwrap();
    let recorded: Vec<&str> = records.iter().map(|r| &*r.request_id).collect();
    for id in &ids {
        assert!(recorded.contains(&id.as_str()), "request {id} missing from the ledger after kill -9");
    }
    assert!(records.iter().all(|r| r.outcome == Outcome::Ok));
    assert_eq!(records.iter().filter(|r| r.function == "fib").count(), 20);
}

#[tokio::test]
async fn records_survive_kill_9_across_ledger_rotations_each_exactly_once() {
    // One-second ledger files under a steady load: rotations happen while
    // requests complete; then kill -9. Every answered request's record is
    // in exactly one file, and `usage --since` reads the recent ones.
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), &manifest_entry("hello", "hello", "/hello"));
    let mut host = HostProcess::spawn_with_args(state.path(), Some(&manifest), &["--ledger-partition-secs", "1"]);
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(2500) && ids.len() < 50_000 {
        let response = client.get(host.url("/hello")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        ids.push(response.headers()["x-request-id"].to_str().unwrap().to_string());
        response.bytes().await.unwrap();
    }
    let since = format!("{}ms", 1200);
    let recent = host.cli(&["usage", "--function", "hello", "--since", &since, "--json"]);
    assert!(recent.status.success(), "{}", String::from_utf8_lossy(&recent.stderr));
    host.kill9();

    let dir = state.path().join("usage");
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert!(files >= 2, "the ledger rotated ({files} files in {})", dir.display());
    let records = Ledger::read_dir(&dir, None).unwrap();
    let mut seen = std::collections::HashMap::new();
    for record in &records {
        *seen.entry(&*record.request_id).or_insert(0) += 1;
    }
    for id in &ids {
        assert_eq!(seen.get(id.as_str()), Some(&1), "request {id}: records {:?}", seen.get(id.as_str()));
    }
    assert_eq!(records.len(), ids.len(), "no record of a request nobody made");
    let summaries: serde_json::Value = serde_json::from_slice(&recent.stdout).unwrap();
    let recent_requests = summaries[0]["requests"].as_u64().unwrap_or(0) as usize;
    assert!(
        recent_requests > 0 && recent_requests < ids.len(),
        "--since 1200ms counts only the recent requests: {recent_requests} of {}",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_concurrent_requests_are_written_together_and_each_survives_kill_9() {
    records_of_concurrent_requests_share_writes("hello", "/hello").await;
}

#[tokio::test]
async fn records_of_concurrent_requests_to_a_shared_wasi_0_3_instance_are_written_together() {
    // The calls of a WASI 0.3 function share an instance and end one at a
    // time in its driver's polls; their records still share writes.
    records_of_concurrent_requests_share_writes("hello-p3", "/p3").await;
}

/// 32 clients at once to `guest` at `route`: the records of calls that
/// end together share a write, and still every response a client read
/// whole has its record, once, after kill -9.
async fn records_of_concurrent_requests_share_writes(guest: &str, route: &str) {
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), &manifest_entry("hello", guest, route));
    let mut host = HostProcess::spawn(state.path(), Some(&manifest));
    let client = reqwest::Client::new();
    let clients = (0..32).map(|_| {
        let (client, url) = (client.clone(), host.url(route));
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..60 {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                let id = response.headers()["x-request-id"].to_str().unwrap().to_string();
                assert_eq!(response.text().await.unwrap(), "hello, world\n");
                ids.push(id);
            }
            ids
        })
    });
    let mut ids = Vec::new();
    for client in clients.collect::<Vec<_>>() {
        ids.extend(client.await.unwrap());
    }
    let metrics = client.get(host.url("/metrics")).send().await.unwrap().text().await.unwrap();
    host.kill9();

    let records = Ledger::read_dir(&state.path().join("usage"), None).unwrap();
    let mut seen = std::collections::HashMap::new();
    for record in &records {
        *seen.entry(&*record.request_id).or_insert(0) += 1;
    }
    for id in &ids {
        assert_eq!(seen.get(id.as_str()), Some(&1), "request {id}: records {:?}", seen.get(id.as_str()));
    }
    assert_eq!(records.len(), ids.len(), "no record of a request nobody made");
    let writes: usize = metrics
        .lines()
        .find_map(|line| line.strip_prefix("shoal_ledger_writes_total "))
        .unwrap_or_else(|| panic!("no shoal_ledger_writes_total in {metrics}"))
        .parse()
        .unwrap();
    assert!(
        writes > 0 && writes < ids.len(),
        "{} records in {writes} writes: records of calls ending together share one",
        ids.len()
    );
}
