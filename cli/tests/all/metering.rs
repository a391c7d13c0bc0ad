//! One usage record per request, with the numbers billing needs.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use shoal::outcome::Outcome;

use crate::support::{TestHost, eventually, spec};

#[tokio::test]
async fn each_request_gets_a_usage_record_with_time_cpu_fuel_and_memory() {
    let host = TestHost::start_persistent().await;
    let mut spin = spec("endless", "endless", "/endless");
    spin.limits.timeout = Duration::from_millis(100);
    // A fuel limit: the function runs on the engine that meters fuel.
    let mut fib = spec("fib", "fib", "/fib");
    fib.limits.fuel_per_request = std::num::NonZeroU64::new(u64::MAX / 4);
    host.deploy(vec![fib, spin]).await;
    let first = host.get("/fib?n=27").await;
    let second = host.get("/fib?n=5").await;
    host.get("/endless").await;

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    assert_eq!(records.len(), 3);
    let (a, b, c) = (&records[0], &records[1], &records[2]);
    assert_eq!(a.request_id, first.header("x-request-id").unwrap());
    assert_eq!(b.request_id, second.header("x-request-id").unwrap());
    assert_eq!((&*a.function, a.cold, a.outcome, a.status), ("fib", true, Outcome::Ok, 200));
    assert!(a.init_us.is_some());
    assert_eq!((b.cold, b.init_us), (false, None), "the second request reused the instance");
    assert!(a.fuel.unwrap() > 10 * b.fuel.unwrap(), "fib(27) burns far more fuel than fib(5)");
    assert!(a.cpu_us > 0 && a.cpu_us <= a.wall_us + 1000, "cpu {} µs, wall {} µs", a.cpu_us, a.wall_us);
    assert!(a.peak_memory_bytes >= 64 * 1024, "at least one wasm page");
    assert_eq!(a.billed_ms, a.wall_us.div_ceil(1000));
    assert_eq!(a.memory_byte_ms, a.peak_memory_bytes * a.billed_ms);
    assert_eq!((&*c.function, c.outcome, c.status), ("endless", Outcome::Timeout, 504));
    assert!(c.billed_ms >= 100);

    let totals = host.running.host().ledger().unwrap().summarize(Some("fib"), None).unwrap();
    assert_eq!((totals[0].requests, totals[0].cold_starts, totals[0].errors), (2, 1, 0));
}

/// The sum of a metric family's samples in a /metrics text.
fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(family) && line[family.len()..].starts_with([' ', '{']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds of a process, from /proc (10 ms ticks).
fn process_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<f64> =
        stat.rsplit_once(')').unwrap().1.split_whitespace().map(|field| field.parse().unwrap_or(0.0)).collect();
    // utime and stime (fields 14 and 15 of the line), at 100 ticks a second.
    (fields[11] + fields[12]) / 100.0
}

#[tokio::test]
async fn the_requests_cpu_and_the_hosts_own_add_up_to_the_process_cpu() {
    let state = tempfile::tempdir().unwrap();
    let manifest = crate::support::write_manifest(state.path(), &crate::support::manifest_entry("fib", "fib", "/fib"));
    let host = crate::support::HostProcess::spawn(state.path(), Some(&manifest));
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let answer = client.get(host.url("/fib?n=30")).send().await.unwrap();
        assert_eq!(answer.status(), 200);
    }
    let scrape = || async { client.get(host.url("/metrics")).send().await.unwrap().text().await.unwrap() };
    let first = scrape().await;
    let process = process_cpu(host.child.id());
    let (requests, own) =
        (metric_sum(&first, "shoal_cpu_seconds_total"), metric_sum(&first, "shoal_host_cpu_seconds_total"));
    assert!(requests > 0.05 && own > 0.0, "requests {requests} s, host {own} s:\n{first}");
    // Read at the scrape and just after it: the same CPU within /proc's
    // 10 ms ticks and the scrape's own work.
    let sum = requests + own;
    assert!(
        (sum - process).abs() <= 0.03 + 0.02 * process,
        "records {requests} + host {own} = {sum} s, process {process} s"
    );
    let second = scrape().await;
    assert!(metric_sum(&second, "shoal_host_cpu_seconds_total") >= own, "a counter never goes back");
}

#[tokio::test]
async fn a_function_without_a_fuel_limit_runs_without_fuel_and_its_cpu_is_still_metered() {
    let host = TestHost::start_persistent().await;
    let mut limited = spec("limited", "fib", "/limited");
    limited.limits.fuel_per_request = std::num::NonZeroU64::new(u64::MAX / 4);
    host.deploy(vec![spec("fib", "fib", "/fib"), limited]).await;
    assert_eq!(host.get("/fib?n=27").await.status, 200);
    assert_eq!(host.get("/limited?n=27").await.status, 200);

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let (free, metered) = (&records[0], &records[1]);
    assert_eq!(free.function, "fib");
    assert_eq!(free.fuel, None, "no fuel instrumentation, so no fuel in the record: {free:?}");
    assert!(free.cpu_us > 0 && free.cpu_us <= free.wall_us + 1000, "{free:?}");
    assert!(metered.fuel.unwrap() > 1_000_000, "the limited function meters fuel: {metered:?}");
    let metrics = host.get("/metrics").await.body;
    assert!(!metrics.contains("shoal_fuel_consumed_total{function=\"fib\"}"), "{metrics}");
    assert!(metrics.contains("shoal_fuel_consumed_total{function=\"limited\"}"), "{metrics}");
}

#[tokio::test]
async fn with_fuel_metered_for_every_request_a_function_without_a_limit_carries_fuel() {
    let host = TestHost::start_configured(|config| {
        config.engine.fuel = shoal::engine::FuelMetering::EveryRequest;
    })
    .await;
    host.deploy(vec![spec("fib", "fib", "/fib")]).await;
    let reply = host.get("/fib?n=20").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let metrics = host.get("/metrics").await.body;
    let fuel = metrics
        .lines()
        .find(|line| line.starts_with("shoal_fuel_consumed_total{function=\"fib\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(!fuel.ends_with(" 0"), "{fuel}");
}

/// Send GET `path` over HTTP/2 and cancel it after `after`, as a client
/// giving up does: its stream is reset, and the host drops its part of it.
async fn cancel_after(host: &TestHost, path: &str, after: Duration) {
    let addr = host.running.http_addr().expect("a test host listens");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://test{path}")).body(Empty::<Bytes>::new()).unwrap();
    let answer = tokio::time::timeout(after, sender.send_request(request)).await;
    assert!(answer.is_err(), "{path} was answered within {after:?}, before its client gave up");
    drop(sender);
    let _ = tokio::time::timeout(Duration::from_secs(1), connection).await;
}

#[tokio::test]
async fn a_request_whose_client_gives_up_still_runs_to_its_end_and_is_billed() {
    let host = TestHost::start_persistent().await;
    let mut endless = spec("endless", "endless", "/endless");
    endless.limits.timeout = Duration::from_millis(300);
    // A WASI 0.3 function: its requests share an instance.
    host.deploy(vec![spec("slow", "slow", "/slow"), spec("shared", "hello-p3", "/shared"), endless]).await;

    for path in ["/slow?ms=400", "/shared/sleep/400", "/endless"] {
        cancel_after(&host, path, Duration::from_millis(100)).await;
    }
    let ledger = host.running.host().ledger().unwrap();
    let all_billed = eventually(Duration::from_secs(5), || async { ledger.records(None).unwrap().len() == 3 }).await;
    let records = ledger.records(None).unwrap();
    assert!(all_billed, "three calls, three records: {records:?}");
    for record in &records {
        let expected = match &*record.function {
            "endless" => (Outcome::Timeout, 504),
            _ => (Outcome::Ok, 200),
        };
        assert_eq!((record.outcome, record.status), expected, "{record:?}");
        assert!(record.wall_us >= 300_000, "it ran past its client's 100 ms: {record:?}");
    }
    // Each call gave its instance back, fit to serve again.
    let again = host.get("/slow?ms=1").await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(ledger.records(None).unwrap().last().map(|record| record.cold), Some(false), "the instance was reused");
}
