//! Each limit, breached: the client gets a clear status and body naming
//! the limit and the function, and the instance is discarded.

use std::time::{Duration, Instant};

use crate::support::{HostProcess, TestHost, manifest_entry, spec, write_manifest};

#[tokio::test]
async fn a_request_past_its_timeout_gets_504_naming_the_limit() {
    let host = TestHost::start().await;
    let mut spin = spec("endless", "endless", "/endless");
    spin.limits.timeout = Duration::from_millis(200);
    host.deploy(vec![spin]).await;

    let started = Instant::now();
    let reply = host.get("/endless").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error_kind(), Some("timeout"));
    assert!(reply.body.contains("\"endless\"") && reply.body.contains("timeout of 200 ms"), "{}", reply.body);
    assert!(started.elapsed() < Duration::from_secs(5), "the loop was cut off");
    assert_eq!(host.live_instances("endless").await, 0, "the interrupted instance is discarded");
}

#[tokio::test]
async fn a_guest_blocked_in_a_host_call_is_cut_off_at_its_timeout() {
    let host = TestHost::start().await;
    let mut slow = spec("slow", "slow", "/slow");
    slow.limits.timeout = Duration::from_millis(200);
    host.deploy(vec![slow]).await;
    let reply = host.get("/slow?ms=10000").await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.error_kind(), Some("timeout"));
}

#[tokio::test]
async fn a_request_that_burns_its_fuel_gets_503_naming_the_limit() {
    let host = TestHost::start().await;
    let mut fib = spec("fib", "fib", "/fib");
    fib.limits.fuel_per_request = std::num::NonZeroU64::new(5_000_000);
    host.deploy(vec![fib]).await;

    let small = host.get("/fib?n=10").await;
    assert_eq!((small.status, small.body.as_str()), (200, "fib(10) = 55\n"));
    let big = host.get("/fib?n=40").await;
    assert_eq!(big.status, 503);
    assert_eq!(big.error_kind(), Some("fuel_exhausted"));
    assert!(big.body.contains("fuel_per_request of 5000000"), "{}", big.body);
    // The next request runs on a fresh instance and succeeds.
    assert_eq!(host.get("/fib?n=10").await.status, 200);
}

#[tokio::test]
async fn a_guest_growing_past_its_memory_limit_gets_503_naming_the_limit() {
    let host = TestHost::start().await;
    let mut bomb = spec("membomb", "membomb", "/bomb");
    bomb.limits.memory_bytes = 16 << 20;
    host.deploy(vec![bomb]).await;
    let reply = host.get("/bomb").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_kind(), Some("memory_limit"));
    assert!(reply.body.contains("memory_mb = 16"), "{}", reply.body);
    assert_eq!(host.live_instances("membomb").await, 0);
}

#[tokio::test]
async fn a_panicking_handler_gets_500_and_its_instance_is_discarded() {
    let host = TestHost::start().await;
    host.deploy(vec![spec("panic", "panic", "/panic")]).await;
    let reply = host.get("/panic").await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.error_kind(), Some("trap"));
    assert!(reply.body.contains("\"panic\""), "{}", reply.body);
    assert_eq!(host.live_instances("panic").await, 0);
    let stderr: Vec<String> = host.lines_of("panic").into_iter().map(|line| line.text).collect();
    assert!(stderr.iter().any(|line| line.contains("panic requested by /panic")), "{stderr:?}");
}

#[tokio::test]
async fn a_guest_that_exits_gets_500_naming_the_exit_not_a_backtrace() {
    // The 500 and the host's log line carry the cause, not only the first
    // line of wasmtime's "error while executing at wasm backtrace:".
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), &manifest_entry("panic", "panic", "/panic"));
    let host = HostProcess::spawn(state.path(), Some(&manifest));
    let reply = reqwest::get(host.url("/panic/exit?code=3")).await.unwrap();
    assert_eq!(reply.status(), 500);
    let body = reply.text().await.unwrap();
    assert!(body.contains("exit status"), "the body names the exit: {body}");
    assert!(!body.contains("wasm backtrace"), "{body}");
    let found = crate::support::eventually(std::time::Duration::from_secs(5), || async {
        host.log().lines().any(|line| line.contains("request failed") && line.contains("exit status"))
    })
    .await;
    assert!(found, "the log line names the exit:\n{}", host.log());
    // The host serves on: a new instance takes the next request.
    let reply = reqwest::get(host.url("/panic")).await.unwrap();
    assert_eq!(reply.status(), 500);
    assert!(reply.text().await.unwrap().contains("panic"), "a fresh instance ran");
}

#[tokio::test]
async fn a_function_flooding_its_output_is_held_to_its_log_budget() {
    let host = TestHost::start().await;
    let mut noisy = spec("panic", "panic", "/panic");
    noisy.limits.log_bytes_per_second = std::num::NonZeroU32::new(2_000).unwrap();
    host.deploy(vec![noisy]).await;
    let reply = host.get("/panic/flood?lines=20000").await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "wrote 20000 lines\n"));
    let flood = |host: &TestHost| host.lines_of("panic").iter().filter(|l| l.text.starts_with("flood line")).count();
    let passed = flood(&host);
    // A burst of one line's cap (16 KiB), then 2 000 bytes a second.
    assert!(passed < 5_000, "{passed} of 20000 lines got through a 2 kB/s budget");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(host.get("/panic/flood?lines=1").await.status, 200);
    let lines: Vec<String> = host.lines_of("panic").into_iter().map(|line| line.text).collect();
    let dropped = 20_000 - passed;
    // Every dropped line is reported once, in a host line just before the
    // next line that fits (the next request's line, at the latest).
    let reported: usize = lines
        .iter()
        .filter_map(|line| line.strip_prefix("shoal: dropped "))
        .map(|rest| rest.split(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(reported, dropped);
    for pair in lines.windows(2).filter(|pair| pair[0].starts_with("shoal: dropped ")) {
        assert!(pair[0].ends_with("line(s) of output over log_bytes_per_second = 2000"), "{}", pair[0]);
        assert!(pair[1].starts_with("flood line "), "a report comes before a line that fits: {pair:?}");
    }
    assert_eq!(lines[lines.len() - 1], "flood line 0");
    let metrics = host.get("/metrics").await.body;
    let counted = format!("shoal_log_dropped_lines_total{{function=\"panic\"}} {dropped}");
    assert!(metrics.contains(&counted), "{counted} in:\n{metrics}");
}

#[tokio::test]
async fn requests_past_max_concurrency_wait_briefly_then_get_503_with_retry_after() {
    let host = TestHost::start().await;
    let mut slow = spec("slow", "slow", "/slow");
    slow.limits.max_concurrency = std::num::NonZeroU32::MIN;
    slow.limits.queue_timeout = Duration::from_millis(100);
    host.deploy(vec![slow]).await;

    let busy = tokio::spawn({
        let client = host.client.clone();
        let url = host.url("/slow?ms=1500");
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    });
    // Let the first request take the only slot.
    let deadline = Instant::now() + Duration::from_secs(5);
    while host.running.host().registry().list().await[0].versions[0].stats.busy == 0 {
        assert!(Instant::now() < deadline, "first request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = host.get("/slow?ms=1").await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error_kind(), Some("overloaded"));
    assert!(refused.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    assert!(refused.body.contains("max_concurrency = 1"), "{}", refused.body);
    assert_eq!(busy.await.unwrap(), 200, "the request holding the slot completes");
}

#[tokio::test]
async fn a_queued_request_is_served_when_a_slot_frees_within_queue_timeout() {
    let host = TestHost::start().await;
    let mut slow = spec("slow", "slow", "/slow");
    slow.limits.max_concurrency = std::num::NonZeroU32::MIN;
    slow.limits.queue_timeout = Duration::from_secs(10);
    host.deploy(vec![slow]).await;
    let (a, b) = tokio::join!(host.get("/slow?ms=200"), host.get("/slow?ms=200"));
    assert_eq!((a.status, b.status), (200, 200));
}

#[tokio::test]
async fn a_start_hook_past_its_start_timeout_is_cut_off_with_503() {
    let host = TestHost::start().await;
    let mut slow_start = spec("slow-start", "slow-start", "/ss");
    slow_start.limits.start_timeout = Duration::from_millis(200);
    host.deploy(vec![slow_start]).await;
    let reply = host.get("/ss").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.error_kind(), Some("start_failed"));
    assert!(reply.body.contains("start_timeout"), "{}", reply.body);
    assert_eq!(host.live_instances("slow-start").await, 0);
}

#[tokio::test]
async fn a_destroy_hook_past_its_destroy_timeout_is_cut_off_and_the_host_goes_on() {
    let host = TestHost::start().await;
    let mut slow_destroy = spec("slow-destroy", "slow-destroy", "/sd");
    slow_destroy.limits.destroy_timeout = Duration::from_millis(200);
    host.deploy(vec![slow_destroy, spec("hello", "hello", "/hello")]).await;
    assert_eq!(host.get("/sd").await.status, 200);
    let started = Instant::now();
    host.running.host().registry().undeploy("slow-destroy").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "undeploy waited {:?}", started.elapsed());
    let lines: Vec<String> = host.lines_of("slow-destroy").into_iter().map(|l| l.text).collect();
    assert_eq!(lines, ["slow-destroy: start", "slow-destroy: destroy begins"]);
    assert_eq!(host.get("/hello").await.status, 200);
}

#[tokio::test]
async fn a_request_body_over_max_request_bytes_gets_413_and_the_function_never_acts_on_it() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = TestHost::start().await;
    let mut kv = crate::keyvalue::kv_spec(&["default:data/*"]);
    kv.limits.max_request_bytes = 1000;
    host.deploy(vec![kv]).await;

    // A declared length over the limit: refused before any instance.
    let reply = host.client.put(host.url("/kv/set?key=data/declared")).body(vec![b'x'; 5000]).send().await.unwrap();
    assert_eq!(reply.status(), 413);
    assert_eq!(reply.headers()["x-shoal-error"], "request_too_large");
    assert!(reply.text().await.unwrap().contains("max_request_bytes = 1000"));

    // A streamed body (chunked, no length): cut off as it passes the limit.
    let mut stream = tokio::net::TcpStream::connect(host.running.http_addr().unwrap()).await.unwrap();
    let mut request =
        b"PUT /kv/set?key=data/streamed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..6 {
        request.extend_from_slice(format!("{:x}\r\n{}\r\n", 300, "y".repeat(300)).as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("max_request_bytes = 1000"), "{response}");

    // Neither reached the store; a body within the limit does.
    assert_eq!(host.get("/kv/get?key=data/declared").await.status, 404);
    assert_eq!(host.get("/kv/get?key=data/streamed").await.status, 404);
    let put = host.client.put(host.url("/kv/set?key=data/small")).body("fits").send().await.unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(host.get("/kv/get?key=data/small").await.body, "fits");
    let metrics = host.get("/metrics").await.body;
    assert!(metrics.contains("shoal_request_errors_total{function=\"kv\",kind=\"request_too_large\"} 2"), "{metrics}");
}

#[tokio::test]
async fn a_function_over_its_cpu_share_waits_and_its_throttling_is_reported() {
    // On the shared threads: at idle priority the guest would also wait for
    // the CPU while other tests keep it busy, which is not throttling.
    let state = tempfile::tempdir().unwrap();
    let mut host = TestHost::start_full(Some(state.path().to_path_buf()), |config| {
        config.engine.limited_priority = shoal::engine::LimitedPriority::Normal;
    })
    .await;
    host.state = Some(state);
    let mut spin = spec("endless", "endless", "/endless");
    spin.limits.timeout = Duration::from_millis(1500);
    spin.limits.cpu_millis = std::num::NonZeroU32::new(100);
    host.deploy(vec![spin]).await;

    let reply = host.get("/endless").await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let record = records.iter().find(|r| r.function == "endless").expect("a usage record");
    // 100m of a core for 1.5 s is 150 ms of CPU; what it computed past its
    // share it spent waiting.
    assert!(record.cpu_us < 400_000, "at most about its share of CPU: {record:?}");
    assert!(record.throttled_us > 1_000_000, "most of its time waiting: {record:?}");
    let metrics = host.get("/metrics").await.body;
    let throttled: f64 = metrics
        .lines()
        .find(|line| line.starts_with("shoal_cpu_throttled_seconds_total{function=\"endless\"}"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(throttled > 1.0, "{metrics}");
}

#[tokio::test]
async fn one_function_holding_all_its_concurrency_leaves_instances_for_the_others() {
    // 8 instance slots: no function may hold more than 2 of them.
    let host = TestHost::start_configured(|config| config.engine.max_instances = 8).await;
    let mut slow = spec("slow", "slow", "/slow");
    slow.limits.max_concurrency = std::num::NonZeroU32::new(8).unwrap();
    slow.limits.queue_timeout = Duration::from_secs(10);
    host.deploy(vec![slow, spec("hello", "hello", "/hello")]).await;

    let mut hogs = Vec::new();
    for _ in 0..8 {
        let client = host.client.clone();
        let url = host.url("/slow?ms=1500");
        hogs.push(tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host.live_instances("slow").await, 2, "its share of the engine, not its max_concurrency");
    let hello = host.get("/hello").await;
    assert_eq!(hello.status, 200, "another function still gets an instance: {}", hello.body);
    for hog in hogs {
        assert_eq!(hog.await.unwrap().unwrap(), 200, "the rest of the hog's requests waited their turn");
    }
}

#[tokio::test]
async fn idle_instances_of_other_functions_are_reclaimed_oldest_first_when_every_slot_is_taken() {
    // 4 instance slots; five functions, called one after another, each
    // keep an idle instance: the fifth needs a slot the first one holds.
    let host = TestHost::start_configured(|config| config.engine.max_instances = 4).await;
    let names = ["one", "two", "three", "four", "five"];
    host.deploy(names.iter().map(|name| spec(name, "hello", &format!("/{name}"))).collect()).await;
    for name in &names[..4] {
        assert_eq!(host.get(&format!("/{name}")).await.status, 200);
    }
    let fifth = host.get("/five").await;
    assert_eq!(fifth.status, 200, "an idle instance of another function gives its slot up: {}", fifth.body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(host.live_instances("one").await, 0, "the least recently used idle instance was reclaimed");
    for name in &names[1..] {
        assert_eq!(host.live_instances(name).await, 1, "{name} keeps its warm instance");
    }
    let metrics = host.get("/metrics").await.body;
    assert!(metrics.lines().any(|line| line == "shoal_instances_reclaimed_total 1"), "{metrics}");
    // The reclaimed function still answers: it takes a slot back in turn.
    assert_eq!(host.get("/one").await.status, 200);
}

#[tokio::test]
async fn one_tenant_busy_in_many_functions_leaves_instances_for_another_tenant() {
    // 8 instance slots: a function may hold 2 of them, a tenant 4.
    let host = TestHost::start_configured(|config| config.engine.max_instances = 8).await;
    let tenant = |name: &str| shoal::manifest::TenantName::new(name).unwrap();
    let mut specs = Vec::new();
    for index in 0..4 {
        let mut slow = spec(&format!("slow{index}"), "slow", &format!("/slow{index}"));
        slow.tenant = tenant("greedy");
        slow.limits.max_concurrency = std::num::NonZeroU32::new(2).unwrap();
        slow.limits.queue_timeout = Duration::from_secs(20);
        specs.push(slow);
    }
    let mut hello = spec("hello", "hello", "/hello");
    hello.tenant = tenant("modest");
    specs.push(hello);
    host.deploy(specs).await;

    let mut hogs = Vec::new();
    for index in 0..4 {
        for _ in 0..2 {
            let client = host.client.clone();
            let url = host.url(&format!("/slow{index}?ms=1500"));
            hogs.push(tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) }));
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut greedy_live = 0;
    for index in 0..4 {
        greedy_live += host.live_instances(&format!("slow{index}")).await;
    }
    assert_eq!(greedy_live, 4, "the tenant holds its share of the engine, not every slot");
    let hello = host.get("/hello").await;
    assert_eq!(hello.status, 200, "another tenant still gets an instance: {}", hello.body);
    for hog in hogs {
        assert_eq!(hog.await.unwrap().unwrap(), 200, "the tenant's other requests waited their turn");
    }
}

/// Threads of this process named `name`: (scheduling policy, ns on a CPU).
fn threads_named(name: &str) -> Vec<(u32, u64)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // The fields after the command's closing parenthesis start with
        // the 3rd; the policy is the 41st (proc(5)).
        let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
        let policy = fields.get(41 - 3).and_then(|v| v.parse::<u32>().ok()).unwrap_or(u32::MAX);
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let on_cpu = schedstat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        found.push((policy, on_cpu));
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cpu_limited_function_computes_on_threads_of_idle_priority_that_give_way_to_every_other() {
    const SCHED_IDLE: u32 = 5;
    let host = TestHost::start().await;
    let mut spin = spec("endless", "endless", "/endless");
    spin.limits.timeout = Duration::from_millis(1000);
    spin.limits.cpu_millis = std::num::NonZeroU32::new(500);
    host.deploy(vec![spin, spec("hello", "hello", "/hello")]).await;
    let before: u64 = threads_named("shoal-limited").iter().map(|(_, on_cpu)| on_cpu).sum();

    let (spun, hello) = tokio::join!(host.get("/endless"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        host.get("/hello").await
    });
    assert_eq!(spun.status, 504, "{}", spun.body);
    assert_eq!(hello.status, 200, "{}", hello.body);
    let threads = threads_named("shoal-limited");
    assert!(!threads.is_empty(), "the CPU-limited call ran on its own threads");
    assert!(threads.iter().all(|(policy, _)| *policy == SCHED_IDLE), "all at idle priority: {threads:?}");
    let after: u64 = threads.iter().map(|(_, on_cpu)| on_cpu).sum();
    // However little CPU it got (other tests may keep the CPUs busy, and
    // idle priority yields to them), the guest computed there, not on the
    // threads serving everyone else.
    let guest_ns = (host.running.host().metrics().cpu_seconds("endless") * 1e9) as u64;
    assert!(guest_ns > 0, "the spinning guest computed");
    assert!(after - before >= guest_ns * 9 / 10, "its CPU ({guest_ns} ns) was spent on them: {before} → {after} ns");
}
