//! `shoal-bench --soak` (`make soak`): a mixed load held for minutes, then
//! an overload, with the host's memory and descriptors watched throughout
//! and every answer checked against what the host kept. Not part of the
//! test suite (it takes most of a quarter hour); results go to
//! `bench-results/soak.{md,json}`.
//!
//! Phases, all against one `shoal serve` on CPU 0 (the runner on CPU 1):
//! 1. **capacity**: closed load (64 connections, each sending as soon as
//!    it is answered) over the mix: the answers per second it sustains.
//! 2. **soak**: open load at 80% of that rate for `--soak-minutes`, with a
//!    new version of `hello` deployed every minute; per minute: requests,
//!    p50/p99, errors, host RSS and open descriptors.
//! 3. **overload**: open load at 10× capacity over 3,000 connections for
//!    `--overload-seconds`: what is shed, how, and what is served.
//! 4. **recovery**: the soak's rate again: how soon answers are normal.
//!
//! Then the books: every answer that reached a function has exactly one
//! usage record (matched by request id), and the key-value counter the
//! mix increments equals the increments acknowledged.

mod load;

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::Args;
use crate::admin::{Admin, Deploy, variant};
use crate::peers::{FunctionDef, Server, Tools, http_get, memory_kib};
use crate::report::{percentile, verdict};
use load::{Answer, Kind, PhaseResult, Sample, Shape};

/// Limits of every soak function: an operator's choice for a
/// latency-sensitive service (a request waits at most 100 ms for a slot).
const LIMITS: &str = "max_concurrency = 32\nqueue_timeout_ms = 100\nidle_timeout_s = 600";
/// Connections of the capacity, soak and recovery phases.
const CONNECTIONS: usize = 64;
/// Connections of the overload phase (the host's own cap is 4,096).
const OVERLOAD_CONNECTIONS: usize = 3000;
/// The soak runs at this share of the measured capacity.
const SOAK_SHARE: f64 = 0.8;
/// The overload offers this multiple of the capacity.
const OVERLOAD_FACTOR: f64 = 10.0;
/// A new version of `hello` is deployed this often during the soak.
const DEPLOY_EVERY: Duration = Duration::from_secs(60);

pub fn run(tools: &Tools, args: &Args) -> anyhow::Result<()> {
    let functions = soak_functions(tools);
    let server = Server::shoal(tools, &functions, &[])?;
    let state = server.state_dir().expect("a Shoal server has a state dir").to_path_buf();
    let admin = Admin::with_template(server.admin_socket().expect("admin socket"), &state, Some("hello"))?;
    let hello_wasm = std::fs::read(tools.guest("hello"))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let port = server.port();
    let mut phases: Vec<(&str, PhaseResult)> = Vec::new();

    eprintln!("soak: warming up (5 s), then measuring capacity (20 s, closed load, {CONNECTIONS} connections)");
    let shape = |rate, connections, seconds| Shape { rate, connections, duration: Duration::from_secs(seconds) };
    let warmup = runtime.block_on(load::run_phase(port, shape(None, CONNECTIONS, 5), 0));
    let capacity_run = runtime.block_on(load::run_phase(port, shape(None, CONNECTIONS, 20), warmup.next_n));
    let capacity = served(&capacity_run.samples) as f64 / capacity_run.elapsed.as_secs_f64();
    anyhow::ensure!(capacity > 0.0, "nothing was served while measuring capacity; host log:\n{}", server.log_text());
    eprintln!("soak: capacity {capacity:.0} answers/s");
    let mut next_n = capacity_run.next_n;
    phases.push(("warm-up", warmup));
    phases.push(("capacity", capacity_run));

    let soak_rate = capacity * SOAK_SHARE;
    let soak_seconds = args.soak_minutes * 60;
    eprintln!("soak: {soak_rate:.0} req/s for {} min, a deploy every minute", args.soak_minutes);
    let watch = Watch::start(server.pid(), Duration::from_secs(10));
    let stop_deploys = Arc::new(AtomicBool::new(false));
    let deploys = {
        let stop = stop_deploys.clone();
        let port = server.port();
        std::thread::spawn(move || deploy_loop(&admin, &hello_wasm, port, &stop))
    };
    let soak = runtime.block_on(load::run_phase(port, shape(Some(soak_rate), CONNECTIONS, soak_seconds), next_n));
    stop_deploys.store(true, Ordering::Relaxed);
    let deploys = deploys.join().map_err(|_| anyhow::anyhow!("the deploy thread panicked"))?;
    let soak_memory = watch.stop();
    next_n = soak.next_n;
    phases.push(("soak", soak));

    let overload_rate = capacity * OVERLOAD_FACTOR;
    eprintln!(
        "soak: overload, {overload_rate:.0} req/s over {OVERLOAD_CONNECTIONS} connections for {} s",
        args.overload_seconds
    );
    let before_overload = memory_kib(server.pid())?.0;
    let watch = Watch::start(server.pid(), Duration::from_secs(1));
    let overload = runtime.block_on(load::run_phase(
        port,
        shape(Some(overload_rate), OVERLOAD_CONNECTIONS, args.overload_seconds),
        next_n,
    ));
    let overload_memory = watch.stop();
    next_n = overload.next_n;
    phases.push(("overload", overload));
    eprintln!("soak: recovery, {soak_rate:.0} req/s for 10 s");
    let recovery = runtime.block_on(load::run_phase(port, shape(Some(soak_rate), CONNECTIONS, 10), next_n));
    phases.push(("recovery", recovery));

    // The books: let the subscriber catch up, then read the counter and the ledger.
    let acknowledged_publishes = phases
        .iter()
        .flat_map(|(_, phase)| &phase.samples)
        .filter(|s| s.kind == Kind::Publish && matches!(s.answer, Answer::Response { status: 202, .. }))
        .count() as u64;
    let deliveries = wait_for_deliveries(port, acknowledged_publishes)?;
    let counter = read_number(port, "/kv/get?key=counter/soak")?.context("the soak counter is missing")?;
    let ledger = read_ledger(&state.join("usage"))?;
    let rss_at_end = memory_kib(server.pid())?.0;
    drop(server);

    let report = Report::build(ReportInput {
        capacity,
        soak_rate,
        overload_rate,
        phases: &phases,
        soak_memory: &soak_memory,
        overload_memory: &overload_memory,
        before_overload_kib: before_overload,
        rss_at_end_kib: rss_at_end,
        deploys: &deploys,
        counter,
        acknowledged_publishes,
        deliveries,
        ledger: &ledger,
    });
    let out = tools.root.join(&args.out);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("soak.json"), serde_json::to_vec_pretty(&report.data)?)?;
    std::fs::write(out.join("soak.md"), &report.markdown)?;
    eprint!("{}", report.markdown);
    eprintln!("results: {}/soak.md and soak.json", out.display());
    Ok(())
}

fn soak_functions(tools: &Tools) -> Vec<FunctionDef<'static>> {
    let def = |name: &'static str, guest: &str, route: &'static str, probe: &'static str, grants: &'static str| {
        FunctionDef { name, wasm: tools.guest(guest), route, probe, limits: LIMITS, grants }
    };
    vec![
        def("hello", "hello", "/hello", "/hello", ""),
        def("invoker", "invoker", "/invoker", "/invoker/call?fn=hello", "invoke = [\"hello\"]"),
        // `inbox:deliveries`: the runner reads the subscriber's count through it.
        def("kv", "kv", "/kv", "/kv/keys", "keyvalue = [\"default:counter/*\", \"inbox:deliveries\"]"),
        def("publisher", "publisher", "/pub", "/pub", "publish = [\"orders\"]"),
        def("subscriber", "subscriber", "/inbox", "/inbox", "subscribe = [\"orders\"]\nkeyvalue = [\"inbox:*\"]"),
        def("panic", "panic", "/panic", "/panic", ""),
    ]
}

/// Answers with the status their function gives when all is well.
fn served(samples: &[Sample]) -> usize {
    samples.iter().filter(|s| is_expected(s)).count()
}

fn is_expected(sample: &Sample) -> bool {
    match sample.answer {
        Answer::Response { status, shoal_error, .. } => {
            status == sample.kind.expected_status() && (sample.kind != Kind::Trap || shoal_error == Some("trap"))
        }
        Answer::Failed(_) => false,
    }
}

/// Whether the host refused the request before any function ran it
/// (such a request has no usage record).
fn refused_by_host(sample: &Sample) -> bool {
    matches!(sample.answer, Answer::Response { shoal_error: Some("overloaded"), .. })
}

/// What a sample's answer was, as a label for the error table.
fn label(sample: &Sample) -> String {
    match sample.answer {
        Answer::Response { status, shoal_error: Some(kind), .. } => format!("{status} {kind}"),
        Answer::Response { status, shoal_error: None, .. } => format!("{status}"),
        Answer::Failed(what) => format!("no answer: {what}"),
    }
}

/// One deploy of a new `hello` version during the soak.
#[derive(Debug, serde::Serialize)]
struct DeployRun {
    at_s: f64,
    ms: f64,
    error: Option<String>,
}

fn deploy_loop(admin: &Admin, wasm: &[u8], port: u16, stop: &AtomicBool) -> Vec<DeployRun> {
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut next = started + DEPLOY_EVERY;
    let mut version = 0;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        next += DEPLOY_EVERY;
        version += 1;
        let fresh = variant(wasm, &format!("soak-{}-{version}", std::process::id()));
        let at = Instant::now();
        let result = admin.deploy(&[Deploy { name: "hello".into(), wasm: &fresh, limits: json!({}) }]).and_then(|()| {
            match http_get(port, "/hello") {
                Some((200, _)) => Ok(()),
                other => anyhow::bail!("after the deploy /hello answered {other:?}"),
            }
        });
        runs.push(DeployRun {
            at_s: at.duration_since(started).as_secs_f64(),
            ms: at.elapsed().as_secs_f64() * 1e3,
            error: result.err().map(|err| format!("{err:#}")),
        });
    }
    runs
}

/// The host's resident memory and open descriptors, sampled on a thread.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Usage>>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Usage {
    at_s: f64,
    rss_kib: u64,
    fds: usize,
}

impl Watch {
    fn start(pid: u32, every: Duration) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut next = started;
            loop {
                if Instant::now() >= next {
                    let rss_kib = memory_kib(pid).map(|(rss, _)| rss).unwrap_or(0);
                    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0);
                    samples.push(Usage { at_s: started.elapsed().as_secs_f64(), rss_kib, fds });
                    next += every;
                }
                if flag.load(Ordering::Relaxed) {
                    return samples;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Watch { stop, thread }
    }

    fn stop(self) -> Vec<Usage> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A number a function answers with at `path` (a kv value), `None` on 404.
fn read_number(port: u16, path: &str) -> anyhow::Result<Option<u64>> {
    match http_get(port, path) {
        Some((200, body)) => Ok(Some(body.trim().parse().with_context(|| format!("{path} answered {body:?}"))?)),
        Some((404, _)) => Ok(None),
        other => anyhow::bail!("{path} answered {other:?}"),
    }
}

/// Wait (up to a minute) until the subscriber has counted at least
/// `published` deliveries; returns its count.
fn wait_for_deliveries(port: u16, published: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = read_number(port, "/kv/get?bucket=inbox&key=deliveries")?.unwrap_or(0);
        if seen >= published || Instant::now() >= deadline {
            return Ok(seen);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Usage records of the soak's own requests (`soak-<n>`, not nested).
struct Ledger {
    /// Records per request number.
    records: BTreeMap<u64, u32>,
    /// Every line read, all kinds.
    lines: u64,
}

#[derive(serde::Deserialize)]
struct RecordId<'a> {
    #[serde(borrow)]
    request_id: &'a str,
    #[serde(default)]
    parent_id: Option<&'a str>,
}

fn read_ledger(dir: &std::path::Path) -> anyhow::Result<Ledger> {
    let mut ledger = Ledger { records: BTreeMap::new(), lines: 0 };
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_none_or(|ext| ext != "jsonl") {
            continue;
        }
        let file = std::io::BufReader::new(std::fs::File::open(&path)?);
        for line in file.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            ledger.lines += 1;
            let Ok(record) = serde_json::from_str::<RecordId>(&line) else { continue };
            if record.parent_id.is_some() {
                continue;
            }
            if let Some(n) = record.request_id.strip_prefix("soak-").and_then(|n| n.parse().ok()) {
                *ledger.records.entry(n).or_insert(0) += 1;
            }
        }
    }
    Ok(ledger)
}

struct ReportInput<'a> {
    capacity: f64,
    soak_rate: f64,
    overload_rate: f64,
    phases: &'a [(&'a str, PhaseResult)],
    soak_memory: &'a [Usage],
    overload_memory: &'a [Usage],
    before_overload_kib: u64,
    rss_at_end_kib: u64,
    deploys: &'a [DeployRun],
    counter: u64,
    acknowledged_publishes: u64,
    deliveries: u64,
    ledger: &'a Ledger,
}

struct Report {
    markdown: String,
    data: Value,
}

fn ms(us: f64) -> f64 {
    us / 1e3
}

fn latencies(samples: &[&Sample]) -> Vec<f64> {
    samples.iter().map(|s| f64::from(s.latency_us)).collect()
}

impl Report {
    fn build(input: ReportInput) -> Report {
        let phase =
            |name: &str| &input.phases.iter().find(|(label, _)| *label == name).expect("invariant: every phase ran").1;
        let all: Vec<&Sample> = input.phases.iter().flat_map(|(_, p)| &p.samples).collect();
        let mut md = String::new();
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default();
        md.push_str(&format!(
            "## Soak and overload ({date})\n\nA mix of requests per hundred: {}; functions limited to \
             `{}`. Capacity (closed load, {CONNECTIONS} connections): **{:.0} answers/s**.\n\n",
            load::MIX.iter().map(|(kind, share)| format!("{share} {kind:?}")).collect::<Vec<_>>().join(", "),
            LIMITS.replace('\n', "`, `"),
            input.capacity
        ));

        // Soak, minute by minute.
        let soak = phase("soak");
        md.push_str(&format!(
            "### Soak: {:.0} req/s ({:.0}% of capacity) for {} min, a new `hello` version every minute\n\n",
            input.soak_rate,
            SOAK_SHARE * 100.0,
            soak.elapsed.as_secs() / 60
        ));
        md.push_str("| minute | requests | p50 ms | p99 ms | unexpected | host RSS MiB | open fds |\n|---|---:|---:|---:|---:|---:|---:|\n");
        let mut minutes = Vec::new();
        let minute_count = soak.elapsed.as_secs().div_ceil(60).max(1);
        for minute in 0..minute_count {
            let in_minute: Vec<&Sample> =
                soak.samples.iter().filter(|s| u64::from(s.at_ms) / 60_000 == minute).collect();
            let lat = latencies(&in_minute);
            let unexpected = in_minute.iter().filter(|s| !is_expected(s)).count();
            let usage = input.soak_memory.iter().rev().find(|u| u.at_s <= (minute + 1) as f64 * 60.0 + 1.0);
            let (rss, fds) = usage.map_or((0, 0), |u| (u.rss_kib, u.fds));
            md.push_str(&format!(
                "| {} | {} | {:.2} | {:.2} | {unexpected} | {:.1} | {fds} |\n",
                minute + 1,
                in_minute.len(),
                ms(percentile(&lat, 50.0)),
                ms(percentile(&lat, 99.0)),
                rss as f64 / 1024.0
            ));
            minutes.push(json!({
                "minute": minute + 1, "requests": in_minute.len(), "p50_ms": ms(percentile(&lat, 50.0)),
                "p99_ms": ms(percentile(&lat, 99.0)), "unexpected": unexpected, "rss_kib": rss, "fds": fds,
            }));
        }
        let soak_unexpected: Vec<&Sample> = soak.samples.iter().filter(|s| !is_expected(s)).collect();
        let after_first = input.soak_memory.iter().find(|u| u.at_s >= 60.0).or(input.soak_memory.first());
        let last = input.soak_memory.last();
        let rss_drift = match (after_first, last) {
            (Some(first), Some(last)) if first.rss_kib > 0 => {
                (last.rss_kib as f64 - first.rss_kib as f64) / first.rss_kib as f64
            }
            _ => 0.0,
        };
        let fd_drift = match (after_first, last) {
            (Some(first), Some(last)) => last.fds as i64 - first.fds as i64,
            _ => 0,
        };
        md.push('\n');
        md.push_str(&format!(
            "- {} requests ({} sent late: no free connection), {} unexpected answers (target 0: {}){}\n",
            soak.samples.len(),
            soak.unsent,
            soak_unexpected.len(),
            verdict(soak_unexpected.is_empty() && soak.unsent == 0),
            error_table(&soak_unexpected)
        ));
        md.push_str(&format!(
            "- host RSS drift after the first minute: {:+.1}% (target ≤ 5%: {}); open descriptors {fd_drift:+}\n",
            rss_drift * 100.0,
            verdict(rss_drift <= 0.05)
        ));
        let failed_deploys = input.deploys.iter().filter(|d| d.error.is_some()).count();
        let deploy_ms: Vec<f64> = input.deploys.iter().map(|d| d.ms).collect();
        md.push_str(&format!(
            "- {} deploys of a new `hello` version (compiled each time) under load, {failed_deploys} failed; \
             deploy → first answer p50 {:.0} ms\n",
            input.deploys.len(),
            percentile(&deploy_ms, 50.0)
        ));
        for deploy in input.deploys.iter().filter(|d| d.error.is_some()) {
            md.push_str(&format!("  - at {:.0} s: {}\n", deploy.at_s, deploy.error.as_deref().unwrap_or("")));
        }

        // Overload and recovery.
        let overload = phase("overload");
        let recovery = phase("recovery");
        let (o_served, o_shed, o_failed): (Vec<&Sample>, Vec<&Sample>, Vec<&Sample>) = {
            let served = overload.samples.iter().filter(|s| is_expected(s)).collect();
            let shed = overload
                .samples
                .iter()
                .filter(|s| matches!(s.answer, Answer::Response { status: 503 | 429, .. }))
                .collect();
            let failed = overload.samples.iter().filter(|s| matches!(s.answer, Answer::Failed(_))).collect();
            (served, shed, failed)
        };
        let shed_with_retry =
            o_shed.iter().filter(|s| matches!(s.answer, Answer::Response { retry_after: true, .. })).count();
        let served_lat = latencies(&o_served);
        let soak_all: Vec<&Sample> = soak.samples.iter().collect();
        let soak_p99 = percentile(&latencies(&soak_all), 99.0);
        let peak_rss = input.overload_memory.iter().map(|u| u.rss_kib).max().unwrap_or(0);
        let seconds = overload.elapsed.as_secs_f64();
        md.push_str(&format!(
            "\n### Overload: {:.0} req/s due ({OVERLOAD_FACTOR}× capacity) over {OVERLOAD_CONNECTIONS} connections for {:.0} s\n\n",
            input.overload_rate, seconds
        ));
        md.push_str("| figure | value |\n|---|---:|\n");
        let rows = [
            ("requests due / sent", format!("{} / {}", overload.offered, overload.samples.len())),
            ("due while every connection waited (not sent)", format!("{}", overload.unsent)),
            ("served as usual, per second", format!("{:.0}", o_served.len() as f64 / seconds)),
            ("shed (503/429), per second", format!("{:.0}", o_shed.len() as f64 / seconds)),
            ("shed answers with Retry-After", format!("{shed_with_retry} of {}", o_shed.len())),
            ("no answer (connection closed, timeout)", format!("{}", o_failed.len())),
            ("other answers", format!("{}", overload.samples.len() - o_served.len() - o_shed.len() - o_failed.len())),
            (
                "served p50 / p99 ms",
                format!("{:.1} / {:.1}", ms(percentile(&served_lat, 50.0)), ms(percentile(&served_lat, 99.0))),
            ),
            (
                "host RSS before / peak MiB",
                format!("{:.1} / {:.1}", input.before_overload_kib as f64 / 1024.0, peak_rss as f64 / 1024.0),
            ),
        ];
        for (name, value) in &rows {
            md.push_str(&format!("| {name} | {value} |\n"));
        }
        // Requests answer at once; published messages are work the host
        // took on, whose backlog drains at the subscriber's pace: reported
        // apart.
        let (requests, publishes): (Vec<Sample>, Vec<Sample>) =
            recovery.samples.iter().partition(|sample| sample.kind != Kind::Publish);
        let recovered_after = recovery_time(&requests, soak_p99);
        let publishes_after = recovery_time(&publishes, soak_p99);
        let show = |time: Option<Duration>| {
            time.map_or("not within 10 s".to_string(), |t| format!("{:.1} s", t.as_secs_f64()))
        };
        md.push_str(&format!(
            "\n- back at {:.0} req/s after the overload: requests answered normally (expected status, p99 within \
             2× the soak's {:.1} ms, per 100 ms) after {} (target ≤ 1 s: {}); publishes accepted again after {} \
             (the subscriber's backlog drains first)\n",
            input.soak_rate,
            ms(soak_p99),
            show(recovered_after),
            verdict(recovered_after.is_some_and(|t| t <= Duration::from_secs(1))),
            show(publishes_after),
        ));
        md.push_str(&format!(
            "- shed and failed answers by kind:{}\n",
            error_table(&o_shed.iter().chain(&o_failed).copied().collect::<Vec<_>>())
        ));

        // The books.
        let acknowledged_increments = all
            .iter()
            .filter(|s| s.kind == Kind::KvIncr && matches!(s.answer, Answer::Response { status: 200, .. }))
            .count() as u64;
        let unanswered_increments =
            all.iter().filter(|s| s.kind == Kind::KvIncr && matches!(s.answer, Answer::Failed(_))).count() as u64;
        let mut missing = 0u64;
        let mut duplicated = 0u64;
        let mut unexpected_records = 0u64;
        let mut recorded_answers = 0u64;
        for sample in &all {
            let records = input.ledger.records.get(&sample.n).copied().unwrap_or(0);
            match (&sample.answer, refused_by_host(sample)) {
                (Answer::Response { .. }, false) => {
                    recorded_answers += 1;
                    if records == 0 {
                        missing += 1;
                    } else if records > 1 {
                        duplicated += 1;
                    }
                }
                (Answer::Response { .. }, true) => unexpected_records += u64::from(records),
                // No answer: the host may or may not have run it.
                (Answer::Failed(_), _) => {}
            }
        }
        let books_ok = missing == 0 && duplicated == 0 && unexpected_records == 0;
        // Every increment answered 200 saw its own new value: the highest
        // can never exceed what the store holds at the end.
        let highest_seen = all.iter().filter_map(|s| s.counter).max().unwrap_or(0);
        let counter_ok = input.counter >= acknowledged_increments
            && input.counter <= acknowledged_increments + unanswered_increments
            && highest_seen <= input.counter;
        md.push_str(&format!(
            "\n### The books ({} requests in all phases)\n\n\
             - usage records: {recorded_answers} answers that reached a function, {missing} without a record, \
             {duplicated} with more than one, {unexpected_records} records for requests the host refused \
             ({} ledger lines in all, nested calls and messages included): {}\n\
             - key-value counter {} after {acknowledged_increments} acknowledged increments \
             ({unanswered_increments} unanswered; the highest value a client was told: {highest_seen}): {}\n\
             - messages: {} publishes acknowledged, {} deliveries counted by the subscriber (at least once: {})\n",
            all.len(),
            input.ledger.lines,
            verdict(books_ok),
            input.counter,
            verdict(counter_ok),
            input.acknowledged_publishes,
            input.deliveries,
            verdict(input.deliveries >= input.acknowledged_publishes),
        ));
        md.push_str(&format!("- host RSS at the end: {:.1} MiB\n", input.rss_at_end_kib as f64 / 1024.0));

        let data = json!({
            "date": date,
            "mix": load::MIX.iter().map(|(kind, share)| json!({ "kind": kind, "share": share })).collect::<Vec<_>>(),
            "limits": LIMITS,
            "capacity_per_s": input.capacity,
            "soak": {
                "rate_per_s": input.soak_rate, "requests": soak.samples.len(), "unsent": soak.unsent,
                "unexpected": soak_unexpected.len(), "minutes": minutes, "usage": input.soak_memory,
                "rss_drift": rss_drift, "fd_drift": fd_drift, "deploys": input.deploys,
            },
            "overload": {
                "rate_per_s": input.overload_rate, "due": overload.offered, "sent": overload.samples.len(),
                "unsent": overload.unsent, "served": o_served.len(), "shed": o_shed.len(),
                "shed_with_retry_after": shed_with_retry, "failed": o_failed.len(),
                "served_p50_ms": ms(percentile(&served_lat, 50.0)), "served_p99_ms": ms(percentile(&served_lat, 99.0)),
                "rss_before_kib": input.before_overload_kib, "rss_peak_kib": peak_rss, "usage": input.overload_memory,
                "recovered_after_s": recovered_after.map(|t| t.as_secs_f64()),
                "publishes_recovered_after_s": publishes_after.map(|t| t.as_secs_f64()),
            },
            "books": {
                "answers_reaching_a_function": recorded_answers, "missing_records": missing,
                "duplicated_records": duplicated, "records_for_refused": unexpected_records,
                "ledger_lines": input.ledger.lines, "counter": input.counter,
                "acknowledged_increments": acknowledged_increments, "unanswered_increments": unanswered_increments,
                "highest_value_seen": highest_seen,
                "acknowledged_publishes": input.acknowledged_publishes, "deliveries": input.deliveries,
            },
        });
        Report { markdown: md, data }
    }
}

/// `: 120 × 503 overloaded (Hello), …` for the table's notes ("" if none).
fn error_table(samples: &[&Sample]) -> String {
    let mut counts: BTreeMap<(String, Kind), u64> = BTreeMap::new();
    for sample in samples {
        *counts.entry((label(sample), sample.kind)).or_insert(0) += 1;
    }
    counts.iter().map(|((label, kind), count)| format!(" {count} × {label} ({kind:?});")).collect::<String>()
}

/// How long after the recovery phase began its answers became normal for
/// good: the end of the last 100 ms window holding an unexpected answer
/// or a p99 over twice `soak_p99_us`. `None`: still not normal at the end.
fn recovery_time(samples: &[Sample], soak_p99_us: f64) -> Option<Duration> {
    let windows = samples.iter().map(|s| s.at_ms / 100).max()? + 1;
    let mut last_bad: Option<u32> = None;
    for window in 0..windows {
        let inside: Vec<&Sample> = samples.iter().filter(|s| s.at_ms / 100 == window).collect();
        let bad = inside.iter().any(|s| !is_expected(s))
            || percentile(&latencies(&inside), 99.0) > 2.0 * soak_p99_us.max(1000.0);
        if bad {
            last_bad = Some(window);
        }
    }
    match last_bad {
        None => Some(Duration::ZERO),
        Some(window) if window + 1 == windows => None,
        Some(window) => Some(Duration::from_millis(u64::from(window + 1) * 100)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u64, at_ms: u32, latency_us: u32, status: u16) -> Sample {
        Sample {
            n,
            at_ms,
            latency_us,
            kind: Kind::Hello,
            answer: Answer::Response { status, shoal_error: None, retry_after: false },
            counter: None,
        }
    }

    #[test]
    fn recovery_is_the_end_of_the_last_bad_window() {
        let mut samples: Vec<Sample> = (0..30).map(|i| sample(i, i as u32 * 10, 500, 200)).collect();
        samples[12] = sample(12, 120, 500, 503);
        assert_eq!(recovery_time(&samples, 1000.0), Some(Duration::from_millis(200)));
    }

    #[test]
    fn a_run_normal_from_the_start_recovered_at_once_and_one_never_normal_did_not() {
        let good: Vec<Sample> = (0..10).map(|i| sample(i, i as u32 * 10, 500, 200)).collect();
        assert_eq!(recovery_time(&good, 1000.0), Some(Duration::ZERO));
        let slow: Vec<Sample> = (0..10).map(|i| sample(i, i as u32 * 10, 50_000, 200)).collect();
        assert_eq!(recovery_time(&slow, 1000.0), None);
    }

    #[test]
    fn a_trap_is_expected_only_from_the_trapping_function() {
        let trap = |kind| Sample {
            kind,
            answer: Answer::Response { status: 500, shoal_error: Some("trap"), retry_after: false },
            ..sample(0, 0, 1, 500)
        };
        assert!(is_expected(&trap(Kind::Trap)));
        assert!(!is_expected(&trap(Kind::Hello)));
    }
}
