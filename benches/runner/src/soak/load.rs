//! The soak's load generator: many keep-alive HTTP/1.1 connections on one
//! tokio thread (the runner's CPU), each request given an id
//! (`x-request-id: soak-<n>`) that the host writes into its usage record,
//! so every answer can be matched with the ledger afterwards.
//!
//! Two shapes of load: *closed* (each connection sends its next request
//! as soon as the last one is answered: what the host can do, used to
//! measure capacity) and *open* (requests are due at a fixed rate whatever
//! the host does, as real clients send them; a request due while every
//! connection is busy and the small send queue is full is counted as
//! `unsent`, never silently dropped from the figures).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::{Mutex, mpsc};

/// What a request of the mix does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    /// `GET /hello`: the guest answers at once.
    Hello,
    /// `GET /invoker/call?fn=hello`: a nested call through the Runtime ABI.
    Invoke,
    /// `GET /kv/incr?key=counter/soak`: a durable key-value increment.
    KvIncr,
    /// `POST /pub/publish?topic=orders`: a message the subscriber receives.
    Publish,
    /// `GET /panic`: the guest traps (a 500 is its expected answer).
    Trap,
}

/// The mix, in requests per hundred: mostly plain requests, a steady
/// share of state, messages and nested calls, and a trap now and then.
/// Messages are 5 in a hundred: a subscriber takes one message at a time
/// (each two durable writes here), and at 10 in a hundred its queue
/// filled at 80% of capacity (publishes were then refused, 429).
pub const MIX: [(Kind, u64); 5] =
    [(Kind::Hello, 63), (Kind::Invoke, 15), (Kind::KvIncr, 15), (Kind::Publish, 5), (Kind::Trap, 2)];

impl Kind {
    /// The kind of request number `n`: the mix's shares, interleaved
    /// (37 is coprime with 100, so every hundred requests hold the shares
    /// exactly while the kinds alternate).
    pub fn of(n: u64) -> Kind {
        let mut slot = (n * 37) % 100;
        for (kind, share) in MIX {
            if slot < share {
                return kind;
            }
            slot -= share;
        }
        Kind::Hello
    }

    fn request(self, n: u64) -> Request<Full<Bytes>> {
        let (method, path, body) = match self {
            Kind::Hello => ("GET", "/hello?name=soak".to_string(), Bytes::new()),
            Kind::Invoke => ("GET", "/invoker/call?fn=hello&path=/hello".to_string(), Bytes::new()),
            Kind::KvIncr => ("GET", "/kv/incr?key=counter/soak".to_string(), Bytes::new()),
            Kind::Publish => ("POST", "/pub/publish?topic=orders".to_string(), Bytes::from(format!("order-{n}"))),
            Kind::Trap => ("GET", "/panic".to_string(), Bytes::new()),
        };
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "soak")
            .header("x-request-id", request_id(n))
            .body(Full::new(body))
            .expect("invariant: a request built from constants is valid")
    }

    /// The status the function answers with when all is well.
    pub fn expected_status(self) -> u16 {
        match self {
            Kind::Publish => 202,
            Kind::Trap => 500,
            _ => 200,
        }
    }
}

/// The id request `n` carries (and its usage record holds).
pub fn request_id(n: u64) -> String {
    format!("soak-{n}")
}

/// How one request ended.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// A whole response: its status, `x-shoal-error` (interned) and
    /// whether it said when to retry (`Retry-After`).
    Response { status: u16, shoal_error: Option<&'static str>, retry_after: bool },
    /// No response: what failed (connect, send, read, client timeout).
    Failed(&'static str),
}

/// One request of a phase.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Its number (its id is `soak-<n>`).
    pub n: u64,
    /// When it was sent, in ms since the phase began.
    pub at_ms: u32,
    /// From sending to the last byte of the response, µs.
    pub latency_us: u32,
    pub kind: Kind,
    pub answer: Answer,
    /// For a key-value increment answered 200: the counter's new value.
    pub counter: Option<u64>,
}

/// The shape of one phase.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Requests per second due (open), or `None` for closed load.
    pub rate: Option<f64>,
    pub connections: usize,
    pub duration: Duration,
}

/// What a phase produced.
pub struct PhaseResult {
    pub samples: Vec<Sample>,
    /// Requests due (open load) or sent (closed load).
    pub offered: u64,
    /// Requests due while every connection was busy (open load only).
    pub unsent: u64,
    /// The next request number (the one after the last used).
    pub next_n: u64,
    /// The phase's actual length.
    pub elapsed: Duration,
}

/// How long one request may take before the client gives up on it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Due requests waiting for a free connection (open load).
const SEND_QUEUE: usize = 64;

/// Run one phase against `127.0.0.1:port`, numbering requests from `first_n`.
pub async fn run_phase(port: u16, shape: Shape, first_n: u64) -> PhaseResult {
    let started = Instant::now();
    let end = started + shape.duration;
    let numbers = Arc::new(AtomicU64::new(first_n));
    let (tickets, pacer) = match shape.rate {
        Some(rate) => {
            let (send, receive) = mpsc::channel::<u64>(SEND_QUEUE);
            let pacer = tokio::spawn(pace(send, rate, started, end, numbers.clone()));
            (Some(Arc::new(Mutex::new(receive))), Some(pacer))
        }
        None => (None, None),
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..shape.connections {
        let source = match &tickets {
            Some(tickets) => Source::Open(tickets.clone()),
            None => Source::Closed { numbers: numbers.clone(), end },
        };
        workers.spawn(connection(port, source, started));
    }
    drop(tickets);
    let mut samples = Vec::new();
    while let Some(done) = workers.join_next().await {
        if let Ok(mut mine) = done {
            samples.append(&mut mine);
        }
    }
    let (offered, unsent) = match pacer {
        Some(pacer) => pacer.await.unwrap_or((0, 0)),
        None => (samples.len() as u64, 0),
    };
    samples.sort_by_key(|sample| sample.n);
    PhaseResult { samples, offered, unsent, next_n: numbers.load(Ordering::Relaxed), elapsed: started.elapsed() }
}

enum Source {
    Open(Arc<Mutex<mpsc::Receiver<u64>>>),
    Closed { numbers: Arc<AtomicU64>, end: Instant },
}

impl Source {
    async fn next(&self) -> Option<u64> {
        match self {
            Source::Open(tickets) => tickets.lock().await.recv().await,
            Source::Closed { numbers, end } => (Instant::now() < *end).then(|| numbers.fetch_add(1, Ordering::Relaxed)),
        }
    }
}

/// Issue request numbers at `rate` per second until `end`; returns how
/// many were due and how many found no free connection. Wakes every
/// millisecond and issues what is due by then (tokio's timers have
/// millisecond resolution).
async fn pace(
    send: mpsc::Sender<u64>,
    rate: f64,
    started: Instant,
    end: Instant,
    numbers: Arc<AtomicU64>,
) -> (u64, u64) {
    let (mut due, mut unsent) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while Instant::now() < end {
        tick.tick().await;
        let should = (started.elapsed().as_secs_f64() * rate) as u64;
        while due < should {
            due += 1;
            let n = numbers.fetch_add(1, Ordering::Relaxed);
            if send.try_send(n).is_err() {
                unsent += 1;
            }
        }
    }
    (due, unsent)
}

/// One client connection: takes request numbers from `source` until it
/// runs dry, reconnecting after a failure.
async fn connection(port: u16, source: Source, phase_start: Instant) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    while let Some(n) = source.next().await {
        let kind = Kind::of(n);
        let sent = Instant::now();
        let at_ms = sent.duration_since(phase_start).as_millis() as u32;
        let (answer, counter) = match tokio::time::timeout(CLIENT_TIMEOUT, send(port, &mut sender, kind, n)).await {
            Ok(Ok(Reply { status, shoal_error, retry_after, body })) => {
                let counter = (kind == Kind::KvIncr && status == 200).then(|| parse_counter(&body)).flatten();
                (Answer::Response { status, shoal_error, retry_after }, counter)
            }
            Ok(Err(what)) => {
                sender = None;
                (Answer::Failed(what), None)
            }
            Err(_) => {
                sender = None;
                (Answer::Failed("client timeout"), None)
            }
        };
        let latency_us = sent.elapsed().as_micros().min(u32::MAX as u128) as u32;
        samples.push(Sample { n, at_ms, latency_us, kind, answer, counter });
        if matches!(answer, Answer::Failed(_)) {
            // Do not spin on a host that refuses connections.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    samples
}

struct Reply {
    status: u16,
    shoal_error: Option<&'static str>,
    retry_after: bool,
    body: Bytes,
}

async fn send(
    port: u16,
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    kind: Kind,
    n: u64,
) -> Result<Reply, &'static str> {
    if sender.as_ref().is_none_or(|ready| ready.is_closed()) {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|_| "connect")?;
        let _ = stream.set_nodelay(true);
        let (ready, driver) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|_| "handshake")?;
        tokio::spawn(driver);
        *sender = Some(ready);
    }
    let ready = sender.as_mut().expect("invariant: connected above");
    ready.ready().await.map_err(|_| "connection closed")?;
    let response = ready.send_request(kind.request(n)).await.map_err(|_| "send or read head")?;
    let status = response.status().as_u16();
    let shoal_error = response.headers().get("x-shoal-error").and_then(|value| value.to_str().ok()).map(intern);
    let retry_after = response.headers().contains_key("retry-after");
    let body = response.into_body().collect().await.map_err(|_| "read body")?.to_bytes();
    Ok(Reply { status, shoal_error, retry_after, body })
}

/// `counter/soak=42` → 42.
fn parse_counter(body: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(body).ok()?;
    text.trim().rsplit_once('=')?.1.parse().ok()
}

/// A `&'static str` for an `x-shoal-error` value: the host sends a few
/// distinct kinds; past 64 distinct values, the rest are "other".
fn intern(value: &str) -> &'static str {
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|poison| poison.into_inner());
    if let Some(known) = seen.iter().find(|known| **known == value) {
        return known;
    }
    if seen.len() >= 64 {
        return "other";
    }
    let leaked: &'static str = Box::leak(value.to_string().into_boxed_str());
    seen.push(leaked);
    leaked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hundred_requests_hold_the_mix_exactly() {
        for start in [0u64, 100, 12_300] {
            let mut counts = std::collections::BTreeMap::new();
            for n in start..start + 100 {
                *counts.entry(Kind::of(n)).or_insert(0u64) += 1;
            }
            for (kind, share) in MIX {
                assert_eq!(counts.get(&kind).copied().unwrap_or(0), share, "{kind:?} from {start}");
            }
        }
    }

    #[test]
    fn kinds_alternate_rather_than_come_in_runs() {
        let longest_run = (1..200u64)
            .scan((Kind::of(0), 1usize), |(last, run), n| {
                let kind = Kind::of(n);
                *run = if kind == *last { *run + 1 } else { 1 };
                *last = kind;
                Some(*run)
            })
            .max()
            .unwrap();
        assert!(longest_run <= 3, "runs of one kind up to {longest_run} long");
    }

    #[test]
    fn a_counter_is_read_from_the_kv_functions_answer() {
        assert_eq!(parse_counter(b"counter/soak=42\n"), Some(42));
        assert_eq!(parse_counter(b"refused\n"), None);
    }

    #[test]
    fn interned_error_kinds_are_shared() {
        let a = intern("overloaded");
        let b = intern(&String::from("overloaded"));
        assert!(std::ptr::eq(a, b));
    }
}
