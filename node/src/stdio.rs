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
