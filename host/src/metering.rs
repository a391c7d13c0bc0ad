//! Per-request usage records and the durable ledger they are billed from.
//!
//! Every request that reached a function produces one [`UsageRecord`]. The
//! [`Ledger`] appends it as one JSON line with a single `write(2)` on a file
//! opened `O_APPEND` (the lines of calls that ended together share it),
//! *before* the response's end reaches the client: once a client has seen
//! a request complete, its record is in the kernel and survives `kill -9`
//! of the host. A background task `fsync`s the ledger
//! every [`SYNC_INTERVAL`] (and on shutdown) for power loss; an `fsync` per
//! request would cost more than the requests themselves.
//!
//! The ledger is a folder of time partitions (`usage-<start>.jsonl`, one an
//! hour by default): a record goes to the partition of the moment it is
//! written, so the records of requests that started at or after `t` are all
//! in the partitions from `t`'s on, and a summary `--since t` opens only
//! those. When a partition is left, it is `fsync`ed first; partitions older
//! than the retention are deleted. A host that ran before partitions
//! existed left one `usage.jsonl` beside the folder: it is read as the
//! oldest partition.
//!
//! Billing follows Lambda's unit: wall time is rounded up to whole
//! milliseconds (`billed_ms`), and memory-time is the peak linear memory
//! times `billed_ms`. A function with no requests accrues nothing, whatever
//! it has deployed: idle instances are not billed and scale to zero.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::outcome::Outcome;

/// A write of ledger lines that failed after `landed` of their bytes.
#[derive(Debug)]
pub struct PartialWrite {
    /// How many of the lines' bytes are in the ledger.
    pub landed: usize,
    /// Why the rest is not.
    pub error: std::io::Error,
}

/// The longest ledger line read back (a record is a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 64 << 10;

/// What a ledger line is given to start with: a typical record is 350–450
/// bytes of JSON (a longer one grows its line).
pub(crate) const RECORD_LINE_BYTES: usize = 512;

/// How often the ledger is flushed to disk.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// What one guest call cost, as the instance measured it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallStats {
    /// Wall-clock time of the call.
    pub wall: Duration,
    /// CPU time spent polling the call (guest code plus host calls it made).
    pub cpu: Duration,
    /// Fuel consumed, when fuel is metered.
    pub fuel: Option<u64>,
    /// Peak linear memory during the call, in bytes.
    pub peak_memory: u64,
    /// Time the call waited because its function was over its CPU share.
    pub throttled: Duration,
}

/// What one request used: the unit of billing. Its text borrows what the
/// host already holds when a record is made for the ledger (`'a`), so
/// writing one allocates only its line; records read back own theirs
/// (`UsageRecord<'static>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord<'a> {
    /// The request's id (the `x-request-id` the client saw).
    pub request_id: Cow<'a, str>,
    /// The calling request, for nested calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<Cow<'a, str>>,
    /// The W3C trace it belongs to (32 hex digits): the client's
    /// `traceparent`'s, or one the host started; nested calls share it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<Cow<'a, str>>,
    /// The tenant the function belongs to (the pod's namespace).
    #[serde(default = "default_record_tenant")]
    pub tenant: Cow<'a, str>,
    /// The function.
    pub function: Cow<'a, str>,
    /// The version that served it.
    pub version: Cow<'a, str>,
    /// When the request reached the function, in ms since the Unix epoch.
    pub start_unix_ms: u64,
    /// Wall time of the handler call, in µs.
    pub wall_us: u64,
    /// CPU time of the handler call, in µs.
    pub cpu_us: u64,
    /// Fuel consumed (when the host meters fuel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    /// Peak linear memory during the request, in bytes.
    pub peak_memory_bytes: u64,
    /// Time it waited for CPU, its function being over `cpu_millis`, in µs
    /// (part of its wall time; billed, as the request held its instance).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub throttled_us: u64,
    /// Wall time rounded up to whole milliseconds.
    pub billed_ms: u64,
    /// `peak_memory_bytes × billed_ms`.
    pub memory_byte_ms: u64,
    /// Whether the request needed a new instance.
    pub cold: bool,
    /// Time to instantiate and run `start` for a cold request, in µs (not billed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_us: Option<u64>,
    /// How it ended.
    pub outcome: Outcome,
    /// The HTTP status the client got.
    pub status: u16,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// The tenant of records written before tenants existed.
fn default_tenant() -> String {
    crate::manifest::TenantName::DEFAULT.to_string()
}

/// The same, for a record.
fn default_record_tenant() -> Cow<'static, str> {
    Cow::Owned(default_tenant())
}

impl<'a> UsageRecord<'a> {
    /// Build a record from the stats of a handler call.
    #[allow(clippy::too_many_arguments, reason = "a plain constructor of a flat record")]
    pub fn new(
        request_id: &'a str,
        parent_id: Option<&'a str>,
        tenant: &'a str,
        function: &'a str,
        version: &'a str,
        started: SystemTime,
        stats: &CallStats,
        cold: bool,
        init: Option<Duration>,
        outcome: Outcome,
        status: u16,
    ) -> UsageRecord<'a> {
        let billed_ms = (stats.wall.as_micros() as u64).div_ceil(1000);
        UsageRecord {
            request_id: request_id.into(),
            parent_id: parent_id.map(Cow::Borrowed),
            trace_id: None,
            tenant: tenant.into(),
            function: function.into(),
            version: version.into(),
            start_unix_ms: started.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64,
            wall_us: stats.wall.as_micros() as u64,
            cpu_us: stats.cpu.as_micros() as u64,
            fuel: stats.fuel,
            peak_memory_bytes: stats.peak_memory,
            throttled_us: stats.throttled.as_micros() as u64,
            billed_ms,
            memory_byte_ms: stats.peak_memory.saturating_mul(billed_ms),
            cold,
            init_us: init.map(|d| d.as_micros() as u64),
            outcome,
            status,
        }
    }

    /// The same record, part of the trace `trace_id` names.
    pub fn in_trace(self, trace_id: &'a str) -> UsageRecord<'a> {
        UsageRecord { trace_id: Some(trace_id.into()), ..self }
    }
}

/// How a ledger cuts time into partitions and how long it keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerPolicy {
    /// The span of one partition file.
    pub partition: Duration,
    /// Partitions that ended longer ago than this are deleted.
    pub retention: Duration,
}

impl Default for LedgerPolicy {
    fn default() -> Self {
        LedgerPolicy { partition: Duration::from_secs(3600), retention: Duration::from_secs(90 * 24 * 3600) }
    }
}

/// The clock a ledger partitions by (a test can bring its own).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The append-only, time-partitioned record of usage.
pub struct Ledger {
    dir: PathBuf,
    policy: LedgerPolicy,
    clock: Clock,
    current: Mutex<Partition>,
    dirty: AtomicBool,
    /// Told when a record makes a clean ledger dirty (the syncer waits on it).
    became_dirty: tokio::sync::Notify,
    /// Why the last append failed, while the ledger cannot be written.
    failing: Mutex<Option<(std::time::Instant, Arc<std::io::Error>)>>,
}

/// The partition being written.
struct Partition {
    /// Its start, in seconds since the Unix epoch.
    start: u64,
    file: File,
    /// A failed write may have left part of a line: the next one starts
    /// on a fresh line (readers skip the fragment).
    torn: bool,
}

/// How often a failing ledger is tried again.
const LEDGER_RETRY: Duration = Duration::from_millis(250);

impl Ledger {
    /// Open (or create) the ledger in folder `dir`, partitioned by the
    /// system clock.
    pub fn open(dir: &Path, policy: LedgerPolicy) -> std::io::Result<Ledger> {
        Ledger::open_with_clock(dir, policy, Arc::new(SystemTime::now))
    }

    /// [`Ledger::open`] with `clock` deciding which partition a record goes to.
    pub fn open_with_clock(dir: &Path, policy: LedgerPolicy, clock: Clock) -> std::io::Result<Ledger> {
        if policy.partition.as_secs() == 0 {
            return Err(std::io::Error::other("a ledger partition must span at least a second"));
        }
        std::fs::create_dir_all(dir)?;
        let start = partition_start(clock(), policy.partition);
        let file = open_partition(&partition_path(dir, start))?;
        let ledger = Ledger {
            dir: dir.to_path_buf(),
            policy,
            clock,
            current: Mutex::new(Partition { start, file, torn: false }),
            dirty: AtomicBool::new(false),
            became_dirty: tokio::sync::Notify::new(),
            failing: Mutex::new(None),
        };
        ledger.expire(start)?;
        Ok(ledger)
    }

    /// The folder of partitions.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The partition file being written now.
    pub fn current_path(&self) -> PathBuf {
        partition_path(&self.dir, self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).start)
    }

    /// Append one record (one `write(2)`), to the partition of now. A
    /// failure (a full disk, say) is remembered until an append succeeds
    /// again: see [`Ledger::writable`].
    pub fn append(&self, record: &UsageRecord<'_>) -> std::io::Result<()> {
        // Room for a whole record and its newline from the start: growing
        // the line as serde writes it reallocated it two or three times.
        let mut line = Vec::with_capacity(RECORD_LINE_BYTES);
        Ledger::encode(record, &mut line)?;
        self.append_lines(line).map_err(|partial| partial.error)
    }

    /// Add `record`'s ledger line (its JSON and a newline) to the end of
    /// `lines`; on an error `lines` is left as it was.
    pub fn encode(record: &UsageRecord<'_>, lines: &mut Vec<u8>) -> std::io::Result<()> {
        let before = lines.len();
        if let Err(err) = serde_json::to_writer(&mut *lines, record) {
            lines.truncate(before);
            return Err(std::io::Error::other(err));
        }
        lines.push(b'\n');
        Ok(())
    }

    /// Append whole lines made by [`Ledger::encode`] (one record or
    /// several) with one `write(2)`, to the partition of now. A failure is
    /// remembered as [`Ledger::append`]'s is, and says how many of the
    /// bytes landed: a write that fails part-way leaves the lines before
    /// that point whole in the ledger (they are read back and billed), and
    /// part of one (skipped).
    pub fn append_lines(&self, lines: Vec<u8>) -> Result<(), PartialWrite> {
        let result = self.append_line(lines);
        let mut failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(()) => {
                *failing = None;
                Ok(())
            }
            Err((landed, err)) => {
                // Kept for `writable`; the caller gets it too (same kind and text).
                let err = Arc::new(err);
                *failing = Some((std::time::Instant::now(), err.clone()));
                Err(PartialWrite { landed, error: std::io::Error::new(err.kind(), err) })
            }
        }
    }

    /// Write `line` (one line or several) to the partition of now; on an
    /// error, also how many of its bytes landed.
    fn append_line(&self, mut line: Vec<u8>) -> Result<(), (usize, std::io::Error)> {
        let start = partition_start((self.clock)(), self.policy.partition);
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if start > current.start {
            // Leave the old partition durable, then move on.
            current.file.sync_data().map_err(|err| (0, err))?;
            let file = open_partition(&partition_path(&self.dir, start)).map_err(|err| (0, err))?;
            *current = Partition { start, file, torn: false };
            drop(current);
            if let Err(err) = self.expire(start) {
                tracing::warn!(error = %err, dir = %self.dir.display(), "cannot delete expired ledger partitions");
            }
            current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let fresh_line = usize::from(current.torn);
        if current.torn {
            line.insert(0, b'\n');
        }
        // `write_all`, counting: the caller of a write that fails part-way
        // learns which of its lines landed whole.
        let mut written = 0;
        let result = loop {
            if written == line.len() {
                break Ok(());
            }
            match (&current.file).write(&line[written..]) {
                Ok(0) => break Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => break Err(err),
            }
        };
        match result {
            Ok(()) => {
                current.torn = false;
                if !self.dirty.swap(true, Ordering::AcqRel) {
                    self.became_dirty.notify_one();
                }
                Ok(())
            }
            Err(err) => {
                current.torn = true;
                Err((written.saturating_sub(fresh_line), err))
            }
        }
    }

    /// Whether a record can be written now: `Err` with why while the last
    /// append failed. Every [`LEDGER_RETRY`] the ledger is tried again
    /// with an empty line (which readers skip), so service resumes by
    /// itself once the disk has room.
    pub fn writable(&self) -> Result<(), Arc<std::io::Error>> {
        let mut failing = self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((since, why)) = failing.as_ref() else { return Ok(()) };
        if since.elapsed() < LEDGER_RETRY {
            return Err(why.clone());
        }
        match self.append_line(b"\n".to_vec()) {
            Ok(()) => {
                *failing = None;
                Ok(())
            }
            Err((_, err)) => {
                let err = Arc::new(err);
                *failing = Some((std::time::Instant::now(), err.clone()));
                Err(err)
            }
        }
    }

    /// Wait until something has been appended since the last sync (a
    /// record appended before the wait began counts).
    pub async fn appended(&self) {
        loop {
            let notified = self.became_dirty.notified();
            if self.dirty.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// `fsync` if anything was appended since the last sync.
    pub fn sync(&self) -> std::io::Result<()> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            let file = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).file.try_clone()?;
            file.sync_data()?;
        }
        Ok(())
    }

    /// Delete the partitions that ended before `now - retention`.
    fn expire(&self, now: u64) -> std::io::Result<()> {
        let horizon = now.saturating_sub(self.policy.retention.as_secs());
        for (start, path) in partitions(&self.dir)? {
            if start + self.policy.partition.as_secs() <= horizon {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Every record of the ledger in `dir` whose request started at or
    /// after `since_unix_ms` (all, for `None`), oldest partition first;
    /// only the partitions that can hold them are read.
    pub fn read_dir(dir: &Path, since_unix_ms: Option<u64>) -> std::io::Result<Vec<UsageRecord<'static>>> {
        let since_secs = since_unix_ms.map_or(0, |ms| ms / 1000);
        // What a host wrote before the ledger had partitions: its time span
        // is unknown without reading it, so it is always read.
        let mut records = Ledger::read(&legacy_path(dir))?;
        let found = partitions(dir)?;
        for (at, (_, path)) in found.iter().enumerate() {
            // A partition ends where the next one starts.
            let end = found.get(at + 1).map_or(u64::MAX, |(next, _)| *next);
            if end <= since_secs {
                continue;
            }
            records.extend(Ledger::read(path)?);
        }
        if let Some(since) = since_unix_ms {
            records.retain(|record| record.start_unix_ms >= since);
        }
        Ok(records)
    }

    /// Every record of this ledger (see [`Ledger::read_dir`]).
    pub fn records(&self, since_unix_ms: Option<u64>) -> std::io::Result<Vec<UsageRecord<'static>>> {
        Ledger::read_dir(&self.dir, since_unix_ms)
    }

    /// Every readable record of one partition file, oldest first
    /// (skipping torn or foreign lines).
    pub fn read(path: &Path) -> std::io::Result<Vec<UsageRecord<'static>>> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let mut records = Vec::new();
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            // A line is read only up to the size of a record: a corrupt or
            // foreign file cannot make the reader hold a huge line.
            let read = (&mut reader).take(MAX_RECORD_BYTES + 1).read_until(b'\n', &mut line)?;
            if read == 0 {
                break;
            }
            if line.last() != Some(&b'\n') && read as u64 > MAX_RECORD_BYTES {
                reader.skip_until(b'\n')?;
                continue;
            }
            if let Ok(record) =
                serde_json::from_slice::<UsageRecord<'static>>(line.strip_suffix(b"\n").unwrap_or(&line))
            {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Totals per function over the records matching `function` and `since`.
    pub fn summarize(&self, function: Option<&str>, since_unix_ms: Option<u64>) -> std::io::Result<Vec<UsageSummary>> {
        let query = UsageQuery { function: function.map(str::to_string), since_unix_ms, ..UsageQuery::default() };
        self.summarize_query(&query)
    }

    /// Totals per function (or per tenant) over the records `query` selects.
    pub fn summarize_query(&self, query: &UsageQuery) -> std::io::Result<Vec<UsageSummary>> {
        let mut totals: BTreeMap<(String, String), UsageSummary> = BTreeMap::new();
        for record in self.records(query.since_unix_ms)? {
            if query.function.as_ref().is_some_and(|f| *f != record.function)
                || query.tenant.as_ref().is_some_and(|t| *t != record.tenant)
            {
                continue;
            }
            let function = match query.by {
                UsageGrouping::Function => record.function.to_string(),
                UsageGrouping::Tenant => "*".to_string(),
            };
            totals
                .entry((record.tenant.to_string(), function.clone()))
                .or_insert_with(|| UsageSummary {
                    tenant: record.tenant.to_string(),
                    function,
                    ..UsageSummary::default()
                })
                .add(&record);
        }
        Ok(totals.into_values().collect())
    }
}

/// Open a partition file for appending; a torn last line, left by a crash
/// in the middle of a write, is fenced off with a newline so later records
/// stay readable (readers skip it).
fn open_partition(path: &Path) -> std::io::Result<File> {
    let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            file.write_all(b"\n")?;
        }
    }
    Ok(file)
}

/// The start of the partition holding `at`, in seconds since the epoch.
fn partition_start(at: SystemTime, span: Duration) -> u64 {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    secs - secs % span.as_secs().max(1)
}

/// `usage-<UTC start, RFC 3339>.jsonl`: names sort by time.
fn partition_path(dir: &Path, start: u64) -> PathBuf {
    let at = UNIX_EPOCH + Duration::from_secs(start);
    dir.join(format!("usage-{}.jsonl", humantime::format_rfc3339_seconds(at)))
}

/// The file a host wrote before the ledger had partitions.
fn legacy_path(dir: &Path) -> PathBuf {
    dir.parent().unwrap_or(dir).join("usage.jsonl")
}

/// The partitions in `dir`, oldest first: (start, path). Other files are
/// not the ledger's and are left alone.
fn partitions(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(stamp) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix("usage-")?.strip_suffix(".jsonl"))
        else {
            continue;
        };
        if let Ok(at) = humantime::parse_rfc3339(stamp) {
            found.push((at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(), path));
        }
    }
    found.sort();
    Ok(found)
}

/// Which records to add up, and how to group them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageQuery {
    /// Only this function.
    pub function: Option<String>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only requests that started at or after this time.
    pub since_unix_ms: Option<u64>,
    /// One total per function, or per tenant.
    pub by: UsageGrouping,
}

/// What a usage total is per.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UsageGrouping {
    /// One total per function (and its tenant).
    #[default]
    Function,
    /// One total per tenant (`function` is `*`): what an operator bills.
    Tenant,
}

/// A function's (or a tenant's) usage added up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageSummary {
    /// The tenant.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// The function (`*` in a per-tenant total).
    pub function: String,
    /// Requests served (any outcome).
    pub requests: u64,
    /// Requests that did not end `ok`.
    pub errors: u64,
    /// Requests that needed a new instance.
    pub cold_starts: u64,
    /// Sum of billed milliseconds.
    pub billed_ms: u64,
    /// Sum of CPU time, µs.
    pub cpu_us: u64,
    /// Sum of fuel.
    pub fuel: u64,
    /// Sum of memory-time, in GB-seconds (10^9 bytes × s).
    pub gb_seconds: f64,
}

impl UsageSummary {
    fn add(&mut self, record: &UsageRecord<'_>) {
        self.requests += 1;
        self.errors += u64::from(record.outcome != Outcome::Ok);
        self.cold_starts += u64::from(record.cold);
        self.billed_ms += record.billed_ms;
        self.cpu_us += record.cpu_us;
        self.fuel += record.fuel.unwrap_or(0);
        self.gb_seconds += record.memory_byte_ms as f64 / 1e9 / 1e3;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(function: &str, start_unix_ms: u64, outcome: Outcome) -> UsageRecord<'_> {
        let stats = CallStats {
            wall: Duration::from_micros(1500),
            cpu: Duration::from_micros(700),
            throttled: Duration::ZERO,
            fuel: Some(1000),
            peak_memory: 2 << 20,
        };
        let mut record =
            UsageRecord::new("r", None, "default", function, "1", UNIX_EPOCH, &stats, false, None, outcome, 200);
        record.start_unix_ms = start_unix_ms;
        record
    }

    mod fuzz {
        use std::io::Write as _;

        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Garbage lines between records (a foreign writer, a torn
            /// write, a disk that lost a block) never hide a whole record,
            /// never add one, and never make the reader fail.
            #[test]
            fn fuzz_the_ledger_reader_returns_every_whole_record_and_skips_the_rest(
                garbage in prop::collection::vec(prop::collection::vec(any::<u8>().prop_filter("a line", |b| *b != b'\n'), 0..120), 0..8),
                functions in prop::collection::vec("[a-z]{1,8}", 0..8),
                torn_tail in any::<bool>(),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("usage.jsonl");
                let mut file = std::fs::File::create(&path).unwrap();
                let records: Vec<UsageRecord> =
                    functions.iter().enumerate().map(|(at, f)| record(f, at as u64, Outcome::Ok)).collect();
                for at in 0..garbage.len().max(records.len()) {
                    if let Some(line) = garbage.get(at) {
                        file.write_all(line).unwrap();
                        file.write_all(b"\n").unwrap();
                    }
                    if let Some(record) = records.get(at) {
                        file.write_all(&serde_json::to_vec(record).unwrap()).unwrap();
                        file.write_all(b"\n").unwrap();
                    }
                }
                if garbage.len() % 3 == 2 {
                    // A line far longer than any record, in the middle.
                    file.write_all(&vec![b'x'; (MAX_RECORD_BYTES * 3) as usize]).unwrap();
                    file.write_all(b"\n").unwrap();
                    file.write_all(&serde_json::to_vec(&record("after-long", 7, Outcome::Ok)).unwrap()).unwrap();
                    file.write_all(b"\n").unwrap();
                }
                if torn_tail {
                    let whole = serde_json::to_vec(&record("torn", 99, Outcome::Ok)).unwrap();
                    file.write_all(&whole[..whole.len() / 2]).unwrap();
                }
                drop(file);
                let mut expected = records.clone();
                if garbage.len() % 3 == 2 {
                    expected.push(record("after-long", 7, Outcome::Ok));
                }
                prop_assert_eq!(Ledger::read(&path).unwrap(), expected);
            }
        }
    }

    #[test]
    fn wall_time_is_billed_in_whole_milliseconds_times_peak_memory() {
        let record = record("f", 0, Outcome::Ok);
        assert_eq!(record.billed_ms, 2);
        assert_eq!(record.memory_byte_ms, 2 * (2 << 20));
    }

    /// A clock the test moves by hand, from `start` seconds.
    fn manual_clock(start: u64) -> (Clock, Arc<std::sync::atomic::AtomicU64>) {
        let now = Arc::new(std::sync::atomic::AtomicU64::new(start));
        let read = now.clone();
        (Arc::new(move || UNIX_EPOCH + Duration::from_secs(read.load(Ordering::Relaxed))), now)
    }

    const HOUR: u64 = 3600;

    #[test]
    fn a_torn_last_line_is_skipped_and_later_records_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let (clock, _) = manual_clock(1_000 * HOUR);
        let path = {
            let ledger = Ledger::open_with_clock(dir.path(), LedgerPolicy::default(), clock.clone()).unwrap();
            ledger.append(&record("a", 1, Outcome::Ok)).unwrap();
            ledger.current_path()
        };
        // A crash in the middle of a write leaves half a line.
        OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"request_id\":\"tor").unwrap();
        let ledger = Ledger::open_with_clock(dir.path(), LedgerPolicy::default(), clock).unwrap();
        ledger.append(&record("b", 2, Outcome::Trap)).unwrap();
        let records = ledger.records(None).unwrap();
        assert_eq!(records.iter().map(|r| &*r.function).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn summaries_filter_by_function_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("usage"), LedgerPolicy::default()).unwrap();
        for (function, at, outcome) in [("a", 10, Outcome::Ok), ("a", 20, Outcome::Timeout), ("b", 30, Outcome::Ok)] {
            ledger.append(&record(function, at, outcome)).unwrap();
        }
        let all = ledger.summarize(None, None).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].requests, all[0].errors, all[0].fuel), (2, 1, 2000));
        let recent_a = ledger.summarize(Some("a"), Some(15)).unwrap();
        assert_eq!(recent_a.len(), 1);
        assert_eq!(recent_a[0].requests, 1);
    }

    #[test]
    fn records_go_to_the_partition_of_their_time_and_since_opens_only_the_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_000 * HOUR;
        let (clock, now) = manual_clock(t0 + 10);
        let ledger = Ledger::open_with_clock(dir.path(), LedgerPolicy::default(), clock).unwrap();
        for hour in 0..3 {
            now.store(t0 + hour * HOUR + 10, Ordering::Relaxed);
            ledger.append(&record(&format!("f{hour}"), (t0 + hour * HOUR) * 1000, Outcome::Ok)).unwrap();
        }
        assert_eq!(partitions(dir.path()).unwrap().len(), 3, "one partition an hour");
        let all: Vec<String> = ledger.records(None).unwrap().into_iter().map(|r| r.function.into_owned()).collect();
        assert_eq!(all, ["f0", "f1", "f2"]);
        // The first hour's partition cannot even be opened any more: a
        // read since the second hour must not touch it.
        let (_, first) = partitions(dir.path()).unwrap().remove(0);
        std::fs::remove_file(&first).unwrap();
        std::fs::create_dir(&first).unwrap();
        let since: Vec<String> =
            ledger.records(Some((t0 + HOUR) * 1000)).unwrap().into_iter().map(|r| r.function.into_owned()).collect();
        assert_eq!(since, ["f1", "f2"]);
        assert!(ledger.records(None).is_err(), "reading everything does open the first partition");
    }

    #[test]
    fn partitions_past_the_retention_are_deleted_when_the_ledger_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_000 * HOUR;
        let (clock, now) = manual_clock(t0);
        let policy = LedgerPolicy { partition: Duration::from_secs(HOUR), retention: Duration::from_secs(2 * HOUR) };
        let ledger = Ledger::open_with_clock(dir.path(), policy, clock).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not the ledger's").unwrap();
        for hour in 0..4 {
            now.store(t0 + hour * HOUR, Ordering::Relaxed);
            ledger.append(&record(&format!("f{hour}"), (t0 + hour * HOUR) * 1000, Outcome::Ok)).unwrap();
        }
        let kept: Vec<u64> =
            partitions(dir.path()).unwrap().into_iter().map(|(start, _)| (start - t0) / HOUR).collect();
        assert_eq!(kept, [1, 2, 3], "the partition that ended 2 h before the newest began is gone");
        assert!(dir.path().join("notes.txt").exists());
    }

    #[test]
    fn a_ledger_from_before_partitions_is_read_as_the_oldest() {
        let state = tempfile::tempdir().unwrap();
        let legacy = state.path().join("usage.jsonl");
        std::fs::write(&legacy, [serde_json::to_vec(&record("old", 1, Outcome::Ok)).unwrap(), b"\n".to_vec()].concat())
            .unwrap();
        let ledger = Ledger::open(&state.path().join("usage"), LedgerPolicy::default()).unwrap();
        ledger.append(&record("new", 2, Outcome::Ok)).unwrap();
        let all: Vec<String> = ledger.records(None).unwrap().into_iter().map(|r| r.function.into_owned()).collect();
        assert_eq!(all, ["old", "new"]);
        // A summary since a moment finds the old file's records from then on too.
        let since: Vec<String> =
            ledger.records(Some(1)).unwrap().into_iter().map(|r| r.function.into_owned()).collect();
        assert_eq!(since, ["old", "new"]);
        let later: Vec<String> =
            ledger.records(Some(2)).unwrap().into_iter().map(|r| r.function.into_owned()).collect();
        assert_eq!(later, ["new"]);
    }
}
