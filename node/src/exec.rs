//! `kubectl exec` and `ctr task exec`: a process started in a running
//! container. There are no processes in a Shoal pod, so an exec is one of:
//!
//! - a `wasi:cli` program from the container's rootfs (`args[0]`, e.g.
//!   `/tools/report.wasm`), run in the pod's context: its environment (the
//!   exec's), its rootfs read-only at `/` and its volumes, its function's
//!   memory limit, with stdin, stdout and stderr on the exec's FIFOs and
//!   its exit code returned;
//! - `shoal invoke [PATH]`: a GET of `PATH` (default `/`) on the pod's own
//!   HTTP function, from inside; the body goes to stdout, and a status of
//!   400 or more to stderr with exit code 1.
//!
//! A terminal (`kubectl exec -t`) is refused: nothing here reads one.

use std::os::fd::{AsFd as _, OwnedFd};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use containerd_shim_protos::api::ExecProcessRequest;
use tokio::sync::watch;
use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream};

use crate::error::{Code, NodeError};
use crate::stdio::{fifo_path, wait_for_reader};

/// How much output a program may have written but not yet drained to its
/// FIFO before its writes wait (per stream).
const PIPE_BUDGET: usize = 64 * 1024;

/// What an exec runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExecCommand {
    /// `shoal invoke [PATH]`.
    Invoke { path: String },
    /// A wasm program of the rootfs, with its `argv` and environment.
    Program { args: Vec<String>, env: Vec<(String, String)> },
}

/// Where an exec is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExecState {
    Created,
    Running,
    Stopped { status: u32, at: SystemTime },
}

/// One exec of a container.
pub(crate) struct Exec {
    pub id: String,
    pub command: ExecCommand,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub state: watch::Sender<ExecState>,
    pub runner: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// How it ended, as first seen: kept while its output is taken, so a
    /// kill meanwhile changes neither its status nor its time.
    pub ended: OnceLock<(u32, SystemTime)>,
}

impl Exec {
    /// Read containerd's request: the OCI process spec (JSON) in `spec`.
    pub(crate) fn parse(request: &ExecProcessRequest) -> Result<Exec, NodeError> {
        if request.terminal {
            return Err(NodeError::Unimplemented("a terminal (tty) is not supported: run exec without -t".to_string()));
        }
        if request.exec_id.is_empty() {
            return Err(NodeError::InvalidArgument("an exec needs an id".to_string()));
        }
        let spec = request.spec.as_ref().map(|any| any.value.as_slice()).unwrap_or_default();
        let process: oci_spec::runtime::Process = serde_json::from_slice(spec).map_err(|err| NodeError::Encoding {
            code: Code::INVALID_ARGUMENT,
            what: "the exec's process spec is not OCI JSON".to_string(),
            source: err.into(),
        })?;
        let args = process.args().clone().unwrap_or_default();
        let env = process
            .env()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|pair| pair.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        Ok(Exec {
            id: request.exec_id.clone(),
            command: command_of(args, env)?,
            stdin: request.stdin.clone(),
            stdout: request.stdout.clone(),
            stderr: request.stderr.clone(),
            state: watch::Sender::new(ExecState::Created),
            runner: Mutex::new(None),
            ended: OnceLock::new(),
        })
    }

    pub(crate) fn state(&self) -> ExecState {
        *self.state.borrow()
    }

    /// Note that it ended with `status` now, unless an end was noted
    /// before; the end noted.
    pub(crate) fn end(&self, status: u32) -> (u32, SystemTime) {
        *self.ended.get_or_init(|| (status, SystemTime::now()))
    }

    /// Record its end (the one noted first, else `status` now) for all to
    /// see; `false` if it had ended already.
    pub(crate) fn finish(&self, status: u32) -> bool {
        let (status, at) = self.end(status);
        self.state.send_if_modified(|state| {
            if matches!(state, ExecState::Stopped { .. }) {
                return false;
            }
            *state = ExecState::Stopped { status, at };
            true
        })
    }

    pub(crate) fn take_runner(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.runner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// Stop its runner, unless its program has ended (the runner is then
    /// telling that end; an end told meanwhile cuts its wait short).
    pub(crate) fn stop_runner(&self) {
        if self.ended.get().is_none()
            && let Some(runner) = self.take_runner()
        {
            runner.abort();
        }
    }
}

fn command_of(args: Vec<String>, env: Vec<(String, String)>) -> Result<ExecCommand, NodeError> {
    let Some(program) = args.first() else {
        return Err(NodeError::InvalidArgument("the exec names no program".to_string()));
    };
    let name = Path::new(program).file_name().and_then(|name| name.to_str()).unwrap_or("");
    if name == "shoal" {
        return match args.get(1).map(String::as_str) {
            Some("invoke") if args.len() <= 3 => {
                let path = args.get(2).cloned().unwrap_or_else(|| "/".to_string());
                let path = if path.starts_with('/') { path } else { format!("/{path}") };
                Ok(ExecCommand::Invoke { path })
            }
            _ => Err(NodeError::InvalidArgument(format!(
                "in a Shoal pod, `shoal` runs only `shoal invoke [PATH]` (got {:?})",
                args[1..].join(" ")
            ))),
        };
    }
    if !program.ends_with(".wasm") {
        return Err(NodeError::InvalidArgument(format!(
            "{program:?} is not a wasm program: a Shoal pod has no processes, only `wasi:cli` programs of its \
             rootfs (a path ending in .wasm) and `shoal invoke [PATH]`"
        )));
    }
    Ok(ExecCommand::Program { args, env })
}

/// An exec's streams, opened on its FIFOs (`None`: not asked for).
pub(crate) struct ExecStdio {
    pub stdin: Option<tokio::net::unix::pipe::Receiver>,
    pub stdout: Option<Sender>,
    pub stderr: Option<Sender>,
    /// A second handle on stderr, for the host's own word on how the exec
    /// ended (the program's handle goes with the program).
    pub notes: Option<Sender>,
}

impl ExecStdio {
    /// Open the FIFOs containerd made for the exec, without waiting for
    /// the client's side. Output FIFOs are opened read-write (a reader
    /// that goes away never makes a write fail mid-program). Stdin is
    /// opened non-blocking: the kernel reports nothing on it until a
    /// writer has connected (so no early end of input), then data, then
    /// its end when the client closes it. A client that never connects
    /// (`ctr` with nothing on its stdin never opens it) leaves a program
    /// that reads stdin waiting, as a process would.
    ///
    /// An output FIFO is first waited for (up to [`crate::stdio::READER_WAIT`]) until its
    /// reader has it open: containerd's CRI opens the readers of an
    /// ExecSync's FIFOs while it starts the exec, and a fast exec that
    /// closed its end before a reader opened would leave that reader
    /// waiting for a writer for ever (and the output in the pipe lost).
    pub(crate) async fn open(exec: &Exec) -> Result<ExecStdio, NodeError> {
        // Each probe stays open until the real writer is: a reader whose
        // last writer closes sees the end of its output.
        let mut probes = Vec::new();
        for path in [&exec.stdout, &exec.stderr].into_iter().filter_map(|path| fifo_path(path)) {
            probes.extend(wait_for_reader(path).await);
        }
        let stdin = match fifo_path(&exec.stdin) {
            None => None,
            Some(path) => Some(tokio::net::unix::pipe::OpenOptions::new().open_receiver(path).map_err(|source| {
                NodeError::Io { code: Code::INTERNAL, what: format!("cannot open the exec's stdin {path}"), source }
            })?),
        };
        let stdio = ExecStdio {
            stdin,
            stdout: output(&exec.stdout)?,
            stderr: output(&exec.stderr)?,
            notes: output(&exec.stderr)?,
        };
        drop(probes);
        Ok(stdio)
    }

    /// Second descriptors of the output FIFOs, to see when their reader
    /// has taken everything ([`crate::stdio::drained`]).
    pub(crate) fn outputs(&self) -> Vec<OwnedFd> {
        [&self.stdout, &self.stderr]
            .into_iter()
            .flatten()
            .filter_map(|sender| sender.as_fd().try_clone_to_owned().ok())
            .collect()
    }

    /// The streams as a WASI program's (output that is not asked for is
    /// discarded).
    pub(crate) fn into_wasi(self) -> (Option<AsyncStdinStream>, AsyncStdoutStream, AsyncStdoutStream, Option<Sender>) {
        let stream = |sender: Option<Sender>| match sender {
            Some(sender) => AsyncStdoutStream::new(PIPE_BUDGET, sender),
            None => AsyncStdoutStream::new(PIPE_BUDGET, tokio::io::sink()),
        };
        (self.stdin.map(AsyncStdinStream::new), stream(self.stdout), stream(self.stderr), self.notes)
    }
}

/// A FIFO's writing end.
pub(crate) type Sender = tokio::net::unix::pipe::Sender;

fn output(path: &str) -> Result<Option<Sender>, NodeError> {
    let Some(path) = fifo_path(path) else { return Ok(None) };
    tokio::net::unix::pipe::OpenOptions::new().read_write(true).open_sender(path).map(Some).map_err(|source| {
        NodeError::Io { code: Code::INTERNAL, what: format!("cannot open the exec's output {path}"), source }
    })
}

/// Write `bytes` to `sender`, if there is one (a failed write is only
/// logged: the exec's status says how it ended).
pub(crate) async fn write(sender: &mut Option<Sender>, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt as _;
    if let Some(sender) = sender
        && let Err(err) = sender.write_all(bytes).await
    {
        tracing::debug!(error = %err, "exec output lost");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(std::string::ToString::to_string).collect()
    }

    #[test]
    fn a_terminal_is_refused_naming_it() {
        let request = ExecProcessRequest { exec_id: "e1".into(), terminal: true, ..Default::default() };
        let err = Exec::parse(&request).err().expect("refused").to_string();
        assert!(err.contains("terminal (tty) is not supported"), "{err}");
    }

    #[test]
    fn shoal_invoke_takes_a_path_and_defaults_to_the_root() {
        assert_eq!(
            command_of(args(&["shoal", "invoke", "/hello?name=x"]), vec![]).unwrap(),
            ExecCommand::Invoke { path: "/hello?name=x".into() }
        );
        assert_eq!(
            command_of(args(&["/usr/bin/shoal", "invoke"]), vec![]).unwrap(),
            ExecCommand::Invoke { path: "/".into() }
        );
        assert_eq!(
            command_of(args(&["shoal", "invoke", "x"]), vec![]).unwrap(),
            ExecCommand::Invoke { path: "/x".into() }
        );
    }

    #[test]
    fn anything_but_a_wasm_program_or_shoal_invoke_is_refused_with_the_reason() {
        for (words, expect) in [
            (&["sh", "-c", "ls"][..], "not a wasm program"),
            (&["shoal", "deploy", "x"][..], "runs only `shoal invoke"),
            (&["shoal", "invoke", "/a", "/b"][..], "runs only `shoal invoke"),
            (&[][..], "names no program"),
        ] {
            let err = command_of(args(words), vec![]).unwrap_err().to_string();
            assert!(err.contains(expect), "{words:?}: {err}");
        }
        assert!(matches!(command_of(args(&["/tools/report.wasm", "--all"]), vec![]), Ok(ExecCommand::Program { .. })));
    }
}
