//! One usage record per request, with the numbers billing needs.

use shoal::limits::Outcome;

use crate::support::{TestHost, spec};

#[tokio::test]
async fn each_request_gets_a_usage_record_with_time_cpu_fuel_and_memory() {
    let host = TestHost::start_persistent().await;
    let mut spin = spec("spin", "spin", "/spin");
    spin.limits.timeout = std::time::Duration::from_millis(100);
    host.deploy(vec![spec("fib", "fib", "/fib"), spin]).await;
    let first = host.get("/fib?n=27").await;
    let second = host.get("/fib?n=5").await;
    host.get("/spin").await;

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    assert_eq!(records.len(), 3);
    let (a, b, c) = (&records[0], &records[1], &records[2]);
    assert_eq!(a.request_id, first.header("x-request-id").unwrap());
    assert_eq!(b.request_id, second.header("x-request-id").unwrap());
    assert_eq!((a.function.as_str(), a.cold, a.outcome, a.status), ("fib", true, Outcome::Ok, 200));
    assert!(a.init_us.is_some());
    assert_eq!((b.cold, b.init_us), (false, None), "the second request reused the instance");
    assert!(a.fuel.unwrap() > 10 * b.fuel.unwrap(), "fib(27) burns far more fuel than fib(5)");
    assert!(a.cpu_us > 0 && a.cpu_us <= a.wall_us + 1000, "cpu {} µs, wall {} µs", a.cpu_us, a.wall_us);
    assert!(a.peak_memory_bytes >= 64 * 1024, "at least one wasm page");
    assert_eq!(a.billed_ms, a.wall_us.div_ceil(1000));
    assert_eq!(a.memory_byte_ms, a.peak_memory_bytes * a.billed_ms);
    assert_eq!((c.function.as_str(), c.outcome, c.status), ("spin", Outcome::Timeout, 504));
    assert!(c.billed_ms >= 100);

    let totals = host.running.host().ledger().unwrap().summarize(Some("fib"), None).unwrap();
    assert_eq!((totals[0].requests, totals[0].cold_starts, totals[0].errors), (2, 1, 0));
}
