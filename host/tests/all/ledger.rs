//! The usage ledger keeps every completed request across `kill -9`.

use shoal::limits::Outcome;
use shoal::metering::Ledger;

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

    let records = Ledger::read(&state.path().join("usage.jsonl")).unwrap();
    let recorded: Vec<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
    for id in &ids {
        assert!(recorded.contains(&id.as_str()), "request {id} missing from the ledger after kill -9");
    }
    assert!(records.iter().all(|r| r.outcome == Outcome::Ok));
    assert_eq!(records.iter().filter(|r| r.function == "fib").count(), 20);
}
