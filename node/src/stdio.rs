//! Each container's guest output, written to the stdio FIFOs containerd
//! gave it (the CRI copies them into the log file `kubectl logs` reads).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Code, NodeError};
use crate::exec::Sender;
use shoal::logs::{GuestLine, LogSink, Stream, TracingSink};
use shoal::metrics::Metrics;

/// A container's stdout and stderr FIFOs.
pub(crate) struct ContainerOutput {
    stdout: Option<Mutex<Fifo>>,
    stderr: Option<Mutex<Fifo>>,
}

/// One output FIFO, and what its reader left behind.
struct Fifo {
    file: File,
    /// Lines dropped since the last one written: the FIFO was full (its
    /// reader, containerd, was not taking them in time).
    dropped: u64,
    /// A line was cut off part way by a full FIFO: the next write ends it.
    torn: bool,
    /// When the host's log last said lines were being dropped here.
    warned: Option<Instant>,
}

impl Fifo {
    fn new(file: File) -> Fifo {
        Fifo { file, dropped: 0, torn: false, warned: None }
    }
}

/// How often the host's log says, per FIFO, that its lines are dropped.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(60);

impl ContainerOutput {
    /// Open the FIFOs (an empty path: that stream is discarded).
    ///
    /// They are opened read-write and non-blocking: read-write so a write
    /// never fails with EPIPE while containerd restarts and reopens its
    /// end, non-blocking so a reader that stopped reading can only cost
    /// lines, never a host thread.
    pub(crate) fn open(stdout: &str, stderr: &str) -> Result<ContainerOutput, NodeError> {
        let fifo = |path: &str| -> Result<Option<Mutex<Fifo>>, NodeError> {
            Ok(open_fifo(path)?.map(|file| Mutex::new(Fifo::new(file))))
        };
        Ok(ContainerOutput { stdout: fifo(stdout)?, stderr: fifo(stderr)? })
    }

    /// Open the FIFOs once their readers have them open (each waited for
    /// up to [`READER_WAIT`]). The host's own read-write open counts as a
    /// reader: a program that ends before the client's reader had opened
    /// its FIFO would otherwise close the last end, and the kernel would
    /// drop what it wrote. (containerd's runc shim opens output FIFOs
    /// write-only and blocking, so its create waits for the readers too.)
    pub(crate) async fn open_when_read(stdout: &str, stderr: &str) -> Result<ContainerOutput, NodeError> {
        // Each probe stays open until the host's own end is.
        let mut probes = Vec::new();
        for path in [stdout, stderr].into_iter().filter_map(fifo_path) {
            probes.extend(wait_for_reader(path).await);
        }
        let output = ContainerOutput::open(stdout, stderr);
        drop(probes);
        output
    }

    /// The FIFOs as another host process had them open (a hand-over: they
    /// are passed, not opened again, so containerd's reading end never
    /// sees every writer gone, which would end the container's log).
    pub(crate) fn from_descriptors(stdout: Option<OwnedFd>, stderr: Option<OwnedFd>) -> ContainerOutput {
        let file = |fd: Option<OwnedFd>| fd.map(|fd| Mutex::new(Fifo::new(File::from(fd))));
        ContainerOutput { stdout: file(stdout), stderr: file(stderr) }
    }

    /// Second descriptors of the FIFOs (for a hand-over).
    pub(crate) fn descriptors(&self) -> std::io::Result<(Option<OwnedFd>, Option<OwnedFd>)> {
        let dup = |fifo: &Option<Mutex<Fifo>>| -> std::io::Result<Option<OwnedFd>> {
            match fifo {
                Some(fifo) => {
                    let fifo = fifo.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    Ok(Some(OwnedFd::from(fifo.file.try_clone()?)))
                }
                None => Ok(None),
            }
        };
        Ok((dup(&self.stdout)?, dup(&self.stderr)?))
    }

    /// Wait until containerd's reader has taken what was written to the
    /// FIFOs ([`drained`]); the bytes it left.
    pub(crate) async fn drained(&self) -> usize {
        let fifos: Vec<OwnedFd> = match self.descriptors() {
            Ok((stdout, stderr)) => stdout.into_iter().chain(stderr).collect(),
            Err(_) => return 0,
        };
        drained(&fifos, DRAIN_STALL, DRAIN_MOST).await
    }

    /// Write one line to `stream`'s FIFO. Returns how many lines were
    /// dropped now (0 or 1): a full FIFO drops the line rather than hold a
    /// host thread; the next line that fits is preceded by a line saying
    /// how many went missing.
    fn write(&self, function: &str, stream: Stream, text: &str) -> u64 {
        let fifo = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let Some(fifo) = fifo else { return 0 };
        let mut fifo = fifo.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut bytes = Vec::with_capacity(text.len() + 1);
        if fifo.torn {
            bytes.push(b'\n');
        }
        if fifo.dropped > 0 {
            bytes.extend_from_slice(
                format!(
                    "shoal: dropped {} line(s) of output: the container's log reader did not take them in time\n",
                    fifo.dropped
                )
                .as_bytes(),
            );
        }
        // Where the line begins: what comes before it ends a cut line and
        // reports the dropped ones.
        let line_at = bytes.len();
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        // One write(2) for all of it: a write of up to PIPE_BUF bytes to a
        // FIFO goes whole or not at all; a longer line can be cut off by a
        // full FIFO, and the next write then ends it.
        let mut written = 0;
        let failure = loop {
            match fifo.file.write(&bytes[written..]) {
                Ok(0) => break Some(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Ok(n) => {
                    written += n;
                    if written == bytes.len() {
                        break None;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => break Some(err),
            }
        };
        let Some(err) = failure else {
            fifo.dropped = 0;
            fifo.torn = false;
            return 0;
        };
        // The line counts as dropped; what went out stays out, and what was
        // cut off part way is ended by the next write (a report cut off is
        // made again, with the lines it counted; a write that stopped right
        // after the report left no line open).
        if written > 0 {
            fifo.torn = written != line_at;
        }
        if written >= line_at {
            fifo.dropped = 0;
        }
        fifo.dropped += 1;
        let now = Instant::now();
        if fifo.warned.is_none_or(|warned| now.duration_since(warned) >= DROP_WARNING_EVERY) {
            fifo.warned = Some(now);
            tracing::warn!(
                function,
                stream = stream.as_str(),
                error = %err,
                "a container's output is being dropped: its log reader is not taking it in time"
            );
        }
        1
    }
}

fn open_fifo(path: &str) -> Result<Option<File>, NodeError> {
    if path.is_empty() {
        return Ok(None);
    }
    let path = path.strip_prefix("file://").unwrap_or(path);
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK).open(Path::new(path)).map(Some).map_err(
        |source| NodeError::Io {
            code: if source.kind() == std::io::ErrorKind::NotFound { Code::NOT_FOUND } else { Code::INTERNAL },
            what: format!("cannot open the container's output {path}"),
            source,
        },
    )
}

/// The host's log sink on a node: lines of a container's function go to
/// that container's FIFOs; anything else goes to the host's own log.
#[derive(Default)]
pub(crate) struct ContainerSinks {
    outputs: Mutex<HashMap<String, Arc<ContainerOutput>>>,
    /// Where dropped lines are counted, once the host runs.
    metrics: OnceLock<Arc<Metrics>>,
}

impl ContainerSinks {
    /// Count the lines a full FIFO drops in `metrics`
    /// (`shoal_log_dropped_lines_total`).
    pub(crate) fn count_drops_in(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// Route `function`'s lines to `output`.
    pub(crate) fn attach(&self, function: &str, output: Arc<ContainerOutput>) {
        self.lock().insert(function.to_string(), output);
    }

    /// Stop routing `function`'s lines; closing its FIFOs once the last
    /// reference goes (containerd then sees the end of the output).
    pub(crate) fn detach(&self, function: &str) {
        self.lock().remove(function);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ContainerOutput>>> {
        self.outputs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl LogSink for ContainerSinks {
    fn line(&self, line: GuestLine<'_>) {
        let output = self.lock().get(line.function).cloned();
        match output {
            Some(output) => {
                let dropped = output.write(line.function, line.stream, line.text);
                if let Some(metrics) = self.metrics.get().filter(|_| dropped > 0) {
                    metrics.log_dropped(line.function, dropped);
                }
            }
            None => TracingSink.line(line),
        }
    }
}

/// How long a container's or exec's start waits for the reader of each
/// output FIFO.
pub(crate) const READER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Wait until FIFO `path` has a reader (a write-only, non-blocking open
/// succeeds only then), at most [`READER_WAIT`]: that open, to hold until
/// the container's or exec's own writer is open. A client that opens the
/// FIFO later, or never, is served as before (`None`).
pub(crate) async fn wait_for_reader(path: &str) -> Option<Sender> {
    let deadline = tokio::time::Instant::now() + READER_WAIT;
    loop {
        match tokio::net::unix::pipe::OpenOptions::new().open_sender(path) {
            Ok(probe) => return Some(probe),
            Err(err) if err.raw_os_error() == Some(libc::ENXIO) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(_) => return None,
        }
    }
}

/// How long a process's end waits, at most, for the reader of its output
/// FIFOs to take what is still in them.
pub(crate) const DRAIN_MOST: Duration = Duration::from_secs(10);
/// A reader that took nothing for this long is taken to be gone (a
/// detached `ctr run -d`): the end waits no longer for it.
pub(crate) const DRAIN_STALL: Duration = Duration::from_secs(2);
/// How often the wait looks. (Polled: a pipe tells its writer when there
/// is room, not when it is empty.)
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// Wait until the readers of `fifos` (descriptors of output FIFOs or
/// pipes) have taken everything written to them, at most `most`, or until
/// they took nothing for `stall`. Returns how many bytes were left unread
/// (0: all taken).
///
/// A process's end is told only after this: containerd's client (`ctr
/// run --rm`, `ctr task exec`, nerdctl), once it hears of the end, closes
/// its FIFO readers as it deletes the process, so what it had not read by
/// then would be lost. A short program ends within a millisecond of its
/// last write, often before the client's copy has read it.
pub(crate) async fn drained(fifos: &[OwnedFd], stall: Duration, most: Duration) -> usize {
    // Anything else (a log file a `file://` URI names) is not waited for:
    // it answers FIONREAD with what lies past its offset, which no one is
    // waiting to read.
    let fifos: Vec<BorrowedFd<'_>> = fifos.iter().map(|fd| fd.as_fd()).filter(|&fd| is_fifo(fd)).collect();
    let began = Instant::now();
    let (mut least, mut took_at) = (usize::MAX, began);
    loop {
        let left: usize = fifos.iter().map(|&fd| unread(fd)).sum();
        if left == 0 {
            return 0;
        }
        let now = Instant::now();
        if left < least {
            (least, took_at) = (left, now);
        }
        if now.duration_since(took_at) >= stall || now.duration_since(began) >= most {
            return left;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Whether `fd` is a FIFO or pipe.
fn is_fifo(fd: BorrowedFd<'_>) -> bool {
    use nix::sys::stat::SFlag;
    nix::sys::stat::fstat(fd)
        .is_ok_and(|stat| SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO)
}

/// Bytes written to the FIFO or pipe `fd` that no reader has taken yet
/// (either end answers; 0 when it cannot be asked).
fn unread(fd: BorrowedFd<'_>) -> usize {
    let mut count: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, which we own, for a descriptor that
    // is valid for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut count) } < 0 {
        return 0;
    }
    usize::try_from(count).unwrap_or(0)
}

pub(crate) fn fifo_path(path: &str) -> Option<&str> {
    let path = path.strip_prefix("file://").unwrap_or(path);
    (!path.is_empty()).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn read_all(reader: &mut File) -> String {
        let mut text = Vec::new();
        let mut buffer = [0; 4096];
        loop {
            match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buffer[..n]),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(err) => panic!("reading the FIFO: {err}"),
            }
        }
        String::from_utf8(text).unwrap()
    }

    /// A FIFO named `name` with a reader that does not read until asked
    /// (containerd falling behind), and the container's output on it as
    /// its `stream` (the other stream discarded).
    fn fifo_behind_its_reader(name: &str, stream: Stream) -> (tempfile::TempDir, File, ContainerOutput) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let reader = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&path).unwrap();
        let path = path.to_str().unwrap();
        let output = match stream {
            Stream::Stdout => ContainerOutput::open(path, ""),
            Stream::Stderr => ContainerOutput::open("", path),
        };
        (dir, reader, output.unwrap())
    }

    #[test]
    fn lines_a_full_fifo_drops_are_counted_and_reported_before_the_next_line() {
        let (_dir, mut reader, output) = fifo_behind_its_reader("stdout", Stream::Stdout);
        let line = "x".repeat(999);
        let mut written = 0;
        while output.write("f", Stream::Stdout, &line) == 0 {
            written += 1;
            assert!(written < 10_000, "the FIFO never filled");
        }
        for _ in 0..9 {
            assert_eq!(output.write("f", Stream::Stdout, &line), 1, "a full FIFO drops the line");
        }
        // A stream with no FIFO drops nothing.
        assert_eq!(output.write("f", Stream::Stderr, "elsewhere"), 0);
        let first = read_all(&mut reader);
        let lines: Vec<&str> = first.lines().collect();
        assert_eq!(lines.len(), written, "every line that fitted is whole");
        assert!(lines.iter().all(|got| *got == line), "no line was cut");
        assert_eq!(output.write("f", Stream::Stdout, "after"), 0);
        let next = read_all(&mut reader);
        assert_eq!(
            next,
            "shoal: dropped 10 line(s) of output: the container's log reader did not take them in time\nafter\n"
        );
        // Once reported, the count starts again.
        assert_eq!(output.write("f", Stream::Stdout, "again"), 0);
        assert_eq!(read_all(&mut reader), "again\n");
    }

    #[test]
    fn a_long_line_a_full_fifo_cuts_is_ended_before_the_report() {
        let (_dir, mut reader, output) = fifo_behind_its_reader("stderr", Stream::Stderr);
        // Linux's FIFO holds 16 pages, a short write in a page of its own:
        // 14 lines leave room for part of a line longer than PIPE_BUF.
        let short = "y".repeat(4_000);
        for _ in 0..14 {
            assert_eq!(output.write("f", Stream::Stderr, &short), 0);
        }
        let long = "z".repeat(16_000);
        assert_eq!(output.write("f", Stream::Stderr, &long), 1, "the long line did not fit");
        let first = read_all(&mut reader);
        assert_eq!(output.write("f", Stream::Stderr, "after"), 0);
        let text = first + &read_all(&mut reader);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 17, "14 lines, the cut one, the report and the next");
        assert!(lines[..14].iter().all(|got| *got == short));
        let cut = lines[14];
        assert!(
            !cut.is_empty() && cut.len() < long.len() && cut.bytes().all(|b| b == b'z'),
            "the cut line is ended: {} bytes",
            cut.len()
        );
        assert_eq!(
            &lines[15..],
            ["shoal: dropped 1 line(s) of output: the container's log reader did not take them in time", "after"]
        );
    }

    #[tokio::test]
    async fn an_end_waits_until_the_reader_took_the_output_or_stopped_taking_it() {
        let (dir, mut reader, output) = fifo_behind_its_reader("stdout", Stream::Stdout);
        for line in 0..100 {
            assert_eq!(output.write("f", Stream::Stdout, &format!("line {line}")), 0);
        }
        // The reader takes it all after 300 ms: the wait ends then, not before.
        let began = Instant::now();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let text = read_all(&mut reader);
            (reader, text)
        });
        assert_eq!(output.drained().await, 0, "all of it was taken");
        assert!(began.elapsed() >= Duration::from_millis(300), "it waited for the reader: {:?}", began.elapsed());
        let (_reader, text) = late.join().unwrap();
        assert_eq!(text.lines().count(), 100);

        // A reader that takes nothing is given up on once it took nothing
        // for the stall time; what it left is told.
        assert_eq!(output.write("f", Stream::Stdout, "unread"), 0);
        let (stdout, _) = output.descriptors().unwrap();
        let began = Instant::now();
        let left = drained(&[stdout.unwrap()], Duration::from_millis(200), Duration::from_secs(5)).await;
        assert_eq!(left, "unread\n".len());
        let waited = began.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(5), "{waited:?}");
        // A stream with no FIFO has nothing to wait for, nor has a log
        // file (a `file://` URI) holding text past one descriptor's offset.
        assert_eq!(ContainerOutput::open("", "").unwrap().drained().await, 0);
        let log = dir.path().join("container.log");
        std::fs::write(&log, "").unwrap();
        let log = log.to_str().unwrap();
        let file = ContainerOutput::open(log, log).unwrap();
        assert_eq!(file.write("f", Stream::Stdout, "a line for the log file"), 0);
        let began = Instant::now();
        assert_eq!(file.drained().await, 0);
        assert!(began.elapsed() < Duration::from_millis(100), "{:?}", began.elapsed());
    }
}
