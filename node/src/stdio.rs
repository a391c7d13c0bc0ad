//! Each container's guest output, written to the stdio FIFOs containerd
//! gave it (the CRI copies them into the log file `kubectl logs` reads).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::{Code, NodeError};
use crate::exec::Sender;
use shoal::logs::{GuestLine, LogSink, Stream, TracingSink};

/// A container's stdout and stderr FIFOs.
pub(crate) struct ContainerOutput {
    stdout: Option<Mutex<File>>,
    stderr: Option<Mutex<File>>,
}

impl ContainerOutput {
    /// Open the FIFOs (an empty path: that stream is discarded).
    ///
    /// They are opened read-write and non-blocking: read-write so a write
    /// never fails with EPIPE while containerd restarts and reopens its
    /// end, non-blocking so a reader that stopped reading can only cost
    /// lines, never a host thread.
    pub(crate) fn open(stdout: &str, stderr: &str) -> Result<ContainerOutput, NodeError> {
        Ok(ContainerOutput { stdout: open_fifo(stdout)?.map(Mutex::new), stderr: open_fifo(stderr)?.map(Mutex::new) })
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
        let file = |fd: Option<OwnedFd>| fd.map(|fd| Mutex::new(File::from(fd)));
        ContainerOutput { stdout: file(stdout), stderr: file(stderr) }
    }

    /// Second descriptors of the FIFOs (for a hand-over).
    pub(crate) fn descriptors(&self) -> std::io::Result<(Option<OwnedFd>, Option<OwnedFd>)> {
        let dup = |file: &Option<Mutex<File>>| -> std::io::Result<Option<OwnedFd>> {
            match file {
                Some(file) => {
                    let file = file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    Ok(Some(OwnedFd::from(file.try_clone()?)))
                }
                None => Ok(None),
            }
        };
        Ok((dup(&self.stdout)?, dup(&self.stderr)?))
    }

    fn write(&self, stream: Stream, text: &str) {
        let file = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        let Some(file) = file else { return };
        let mut file = file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        if let Err(err) = file.write_all(&line) {
            tracing::debug!(error = %err, "container output line dropped");
        }
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
}

impl ContainerSinks {
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
            Some(output) => output.write(line.stream, line.text),
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

pub(crate) fn fifo_path(path: &str) -> Option<&str> {
    let path = path.strip_prefix("file://").unwrap_or(path);
    (!path.is_empty()).then_some(path)
}
