//! Where guests' stdout and stderr go.
//!
//! Each instance's stdio is line-buffered and every complete line is handed
//! to the function's [`LogSink`] together with the function, version, stream
//! and the id of the request being served, so a log line can always be traced
//! to the request that wrote it. The default sink, [`TracingSink`], emits a
//! `tracing` event per line; the Kubernetes path gives each container a sink
//! that writes to its stdio FIFOs.
//!
//! Output is bounded per function: a [`LogBudget`] (the function's
//! `log_bytes_per_second`, shared by its instances) drops the lines past
//! it, counts them, and reports how many with one line of the host's own
//! before the next line that fits — so a guest writing in a loop costs the
//! node a bounded amount of log, not its disk.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::{DefaultDirectRateLimiter, Quota};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::request::TraceContext;

/// A guest line longer than this is split, so a guest that never writes a
/// newline cannot grow host memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Which of the guest's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The guest's stdout.
    Stdout,
    /// The guest's stderr.
    Stderr,
}

impl Stream {
    /// `"stdout"` or `"stderr"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One line a guest wrote.
#[derive(Debug, Clone, Copy)]
pub struct GuestLine<'a> {
    /// The function that wrote it.
    pub function: &'a str,
    /// Its version.
    pub version: &'a str,
    /// stdout or stderr.
    pub stream: Stream,
    /// The request being served, or `None` in `start`/`destroy`.
    pub request_id: Option<&'a str>,
    /// The trace of that request.
    pub trace: Option<TraceContext>,
    /// The text, without the newline (lossily decoded as UTF-8).
    pub text: &'a str,
}

/// Receives guests' output lines.
pub trait LogSink: Send + Sync {
    /// Called once per complete line (and for a trailing partial line when
    /// the instance is dropped).
    fn line(&self, line: GuestLine<'_>);
}

/// Emits each guest line as a `tracing` event on target `shoal::guest`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingSink;

impl LogSink for TracingSink {
    fn line(&self, line: GuestLine<'_>) {
        tracing::info!(
            target: "shoal::guest",
            function = line.function,
            version = line.version,
            stream = line.stream.as_str(),
            request_id = line.request_id.unwrap_or("-"),
            trace_id = line.trace.map(|trace| trace.trace_id()).as_deref().unwrap_or("-"),
            "{}",
            line.text
        );
    }
}

/// The most bytes a "dropped N lines" report takes (the longest count
/// and budget), charged to the budget with the line it precedes.
const REPORT_BYTES: usize = 96;

/// How much output a function's instances may write, together: bytes per
/// second, with a burst of one second's worth (at least one whole line).
pub struct LogBudget {
    limiter: DefaultDirectRateLimiter,
    bytes_per_second: NonZeroU32,
    /// Lines dropped since the last one that was written.
    unreported: AtomicU64,
    /// Told how many lines were dropped, as they are (for metrics).
    on_drop: Box<dyn Fn(u64) + Send + Sync>,
}

impl LogBudget {
    /// A budget of `bytes_per_second`; `on_drop` hears of every dropped line.
    pub fn new(bytes_per_second: NonZeroU32, on_drop: Box<dyn Fn(u64) + Send + Sync>) -> Arc<LogBudget> {
        let burst = bytes_per_second.max(NonZeroU32::new(MAX_LINE_BYTES as u32 + 1).expect("invariant: not zero"));
        let quota = Quota::per_second(bytes_per_second).allow_burst(burst);
        Arc::new(LogBudget {
            limiter: DefaultDirectRateLimiter::direct(quota),
            bytes_per_second,
            unreported: AtomicU64::new(0),
            on_drop,
        })
    }

    /// Whether a line of `bytes` may be written now: `Some(n)` yes, after
    /// reporting the `n` lines dropped before it; `None`: drop it.
    fn admit(&self, bytes: usize) -> Option<u64> {
        // The report of dropped lines that goes before this line is output
        // too, and paid for from the same budget: otherwise a flood would
        // turn into a flood of reports.
        let report = if self.unreported.load(Ordering::Acquire) > 0 { REPORT_BYTES } else { 0 };
        let cost = NonZeroU32::new(bytes.saturating_add(1 + report).min(u32::MAX as usize) as u32)
            .expect("invariant: at least 1");
        match self.limiter.check_n(cost) {
            Ok(Ok(())) => Some(self.unreported.swap(0, Ordering::AcqRel)),
            // Over the budget now (or a line longer than the burst, which
            // cannot happen: lines are split at MAX_LINE_BYTES).
            Ok(Err(_)) | Err(_) => {
                self.unreported.fetch_add(1, Ordering::AcqRel);
                (self.on_drop)(1);
                None
            }
        }
    }
}

/// One instance's logging context: whose output this is and which request
/// it is serving right now.
pub struct InstanceLog {
    function: Arc<str>,
    version: Arc<str>,
    sink: Arc<dyn LogSink>,
    budget: Arc<LogBudget>,
    request: Mutex<Option<(Arc<str>, TraceContext)>>,
}

impl InstanceLog {
    /// A context for one instance of `function`/`version`, whose output
    /// counts against `budget` (shared by the function's instances).
    pub fn new(
        function: Arc<str>,
        version: Arc<str>,
        sink: Arc<dyn LogSink>,
        budget: Arc<LogBudget>,
    ) -> Arc<InstanceLog> {
        Arc::new(InstanceLog { function, version, sink, budget, request: Mutex::new(None) })
    }

    /// The function whose instance this is.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// Tag the following lines with a request's id and trace (or with none).
    pub fn set_request(&self, request: Option<(Arc<str>, TraceContext)>) {
        *self.request.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = request;
    }

    /// The request being served, if any.
    pub fn request_id(&self) -> Option<Arc<str>> {
        self.current().map(|(id, _)| id)
    }

    /// The trace of the request being served, if any.
    pub fn trace(&self) -> Option<TraceContext> {
        self.current().map(|(_, trace)| trace)
    }

    fn current(&self) -> Option<(Arc<str>, TraceContext)> {
        self.request.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// A stdout or stderr for the guest's WASI context.
    pub fn output(self: &Arc<Self>, stream: Stream) -> GuestOutput {
        GuestOutput { shared: Arc::new(OutputShared { log: self.clone(), stream, pending: Mutex::new(Vec::new()) }) }
    }

    fn emit(&self, stream: Stream, bytes: &[u8]) {
        let Some(dropped) = self.budget.admit(bytes.len()) else { return };
        let current = self.current();
        let (request_id, trace) = (current.as_ref().map(|(id, _)| &**id), current.as_ref().map(|(_, trace)| *trace));
        if dropped > 0 {
            let report = format!(
                "shoal: dropped {dropped} line(s) of output over log_bytes_per_second = {}",
                self.budget.bytes_per_second
            );
            self.sink.line(GuestLine {
                function: &self.function,
                version: &self.version,
                stream,
                request_id,
                trace,
                text: &report,
            });
        }
        let text = String::from_utf8_lossy(bytes);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        self.sink.line(GuestLine { function: &self.function, version: &self.version, stream, request_id, trace, text });
    }
}

struct OutputShared {
    log: Arc<InstanceLog>,
    stream: Stream,
    pending: Mutex<Vec<u8>>,
}

impl OutputShared {
    fn write(&self, mut bytes: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            if pending.is_empty() {
                self.log.emit(self.stream, &bytes[..newline]);
            } else {
                pending.extend_from_slice(&bytes[..newline]);
                self.log.emit(self.stream, &pending);
                pending.clear();
            }
            bytes = &bytes[newline + 1..];
        }
        pending.extend_from_slice(bytes);
        while pending.len() >= MAX_LINE_BYTES {
            let rest = pending.split_off(MAX_LINE_BYTES);
            self.log.emit(self.stream, &pending);
            *pending = rest;
        }
    }
}

impl Drop for OutputShared {
    fn drop(&mut self) {
        let pending = std::mem::take(self.pending.get_mut().unwrap_or_else(|poison| poison.into_inner()));
        if !pending.is_empty() {
            self.log.emit(self.stream, &pending);
        }
    }
}

/// A guest's stdout or stderr, feeding its [`InstanceLog`].
#[derive(Clone)]
pub struct GuestOutput {
    shared: Arc<OutputShared>,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.shared.write(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.shared.write(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Keeps every line in memory; for tests and `shoal invoke`-style tools.
#[derive(Default)]
pub struct MemorySink {
    lines: Mutex<Vec<OwnedLine>>,
}

/// A [`GuestLine`] that owns its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedLine {
    /// The function that wrote it.
    pub function: String,
    /// stdout or stderr.
    pub stream: Stream,
    /// The request it belongs to, if any.
    pub request_id: Option<String>,
    /// That request's trace id.
    pub trace_id: Option<String>,
    /// The text.
    pub text: String,
}

impl MemorySink {
    /// All lines so far.
    pub fn lines(&self) -> Vec<OwnedLine> {
        self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl LogSink for MemorySink {
    fn line(&self, line: GuestLine<'_>) {
        self.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(OwnedLine {
            function: line.function.to_string(),
            stream: line.stream,
            request_id: line.request_id.map(str::to_string),
            trace_id: line.trace.map(|trace| trace.trace_id().to_string()),
            text: line.text.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ample() -> Arc<LogBudget> {
        LogBudget::new(NonZeroU32::new(1 << 30).unwrap(), Box::new(|_| {}))
    }

    #[test]
    fn lines_past_the_budget_are_dropped_counted_and_reported_before_the_next() {
        let sink = Arc::new(MemorySink::default());
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        // 20 000 bytes a second; the burst is one line of MAX_LINE_BYTES.
        let budget = LogBudget::new(
            NonZeroU32::new(20_000).unwrap(),
            Box::new(move |n| {
                counter.fetch_add(n, Ordering::Relaxed);
            }),
        );
        let log = InstanceLog::new("f".into(), "1".into(), sink.clone(), budget);
        let out = log.output(Stream::Stdout);
        for _ in 0..10_000 {
            out.shared.write(b"0123456789012345678901234567890123456789\n");
        }
        let flood = |lines: &[OwnedLine]| lines.iter().filter(|line| !line.text.starts_with("shoal:")).count();
        let written = flood(&sink.lines());
        assert!(written < 1_000, "{written} of 10000 lines got through a 20 kB/s budget");
        assert_eq!(dropped.load(Ordering::Relaxed), 10_000 - written as u64);
        std::thread::sleep(std::time::Duration::from_millis(100)); // 2 000 bytes of budget come back
        out.shared.write(b"after the flood\n");
        let lines = sink.lines();
        // Every dropped line is reported, once, before a line that fits.
        let reported: u64 = lines
            .iter()
            .filter_map(|line| line.text.strip_prefix("shoal: dropped "))
            .map(|rest| rest.split(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(reported, 10_000 - written as u64);
        let report = &lines[lines.len() - 2].text;
        assert!(report.starts_with("shoal: dropped "), "{report}");
        assert!(report.contains("line(s) of output over log_bytes_per_second = 20000"), "{report}");
        assert_eq!(lines[lines.len() - 1].text, "after the flood");
    }

    #[test]
    fn output_is_split_into_lines_tagged_with_the_request() {
        let sink = Arc::new(MemorySink::default());
        let log = InstanceLog::new("f".into(), "1".into(), sink.clone(), ample());
        let out = log.output(Stream::Stdout);
        let trace = TraceContext::start();
        log.set_request(Some(("req-1".into(), trace)));
        out.shared.write(b"hel");
        out.shared.write(b"lo\nwor");
        log.set_request(None);
        out.shared.write(b"ld\n");
        let lines = sink.lines();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].text.as_str(), lines[0].request_id.as_deref()), ("hello", Some("req-1")));
        assert_eq!(lines[0].trace_id, Some(trace.trace_id().to_string()), "the line names its request's trace");
        assert_eq!(
            (lines[1].text.as_str(), lines[1].request_id.as_deref(), lines[1].trace_id.as_deref()),
            ("world", None, None)
        );
    }

    #[test]
    fn a_line_without_newline_is_split_at_the_cap_and_flushed_on_drop() {
        let sink = Arc::new(MemorySink::default());
        let log = InstanceLog::new("f".into(), "1".into(), sink.clone(), ample());
        let out = log.output(Stream::Stderr);
        out.shared.write(&vec![b'x'; MAX_LINE_BYTES + 10]);
        assert_eq!(sink.lines().len(), 1);
        drop(out);
        let lines = sink.lines();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].text.len(), 10);
    }
}
