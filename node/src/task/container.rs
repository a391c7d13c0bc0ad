//! A container's state machine: what it is (its kind), where it is
//! (created, running, paused, stopped) and what it holds.

use super::*;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskState {
    Created,
    Running,
    /// Running, but taking no new requests (they wait for Resume).
    Paused,
    Stopped {
        status: u32,
        at: SystemTime,
    },
}

/// An exec's life is a task's, less pausing.
impl From<ExecState> for TaskState {
    fn from(state: ExecState) -> TaskState {
        match state {
            ExecState::Created => TaskState::Created,
            ExecState::Running => TaskState::Running,
            ExecState::Stopped { status, at } => TaskState::Stopped { status, at },
        }
    }
}

impl TaskState {
    /// Started and not yet stopped (paused or not).
    pub(super) fn is_live(self) -> bool {
        matches!(self, TaskState::Running | TaskState::Paused)
    }
}

pub(super) enum Kind {
    /// Holds the pod's network namespace open.
    Sandbox { netns: Option<Arc<OwnedFd>>, namespace: Option<String> },
    /// An HTTP function listening in its pod.
    Service { netns: Option<Arc<OwnedFd>>, port: u16 },
    /// A container that had stopped before this host took it over: only
    /// its exit status is left to report.
    Ended,
    /// A program that runs once.
    Command {
        program: Program,
        args: Vec<String>,
        env: Vec<(String, String)>,
        rootfs: PathBuf,
        memory_limit: u64,
        /// Its CPU share (`cpu_millis`), shared with its execs.
        cpu_quota: Option<Arc<CpuQuota>>,
        log_budget: Arc<LogBudget>,
    },
}

/// What a container brings from the host process it was handed over from.
#[derive(Default)]
pub(super) struct Inherited {
    /// Its network namespace.
    pub(super) netns: Option<Arc<OwnedFd>>,
    /// Its stdout and stderr FIFOs, as opened there.
    pub(super) output: Option<ContainerOutput>,
    /// An HTTP function's spec as resolved at its creation, and its wasm's
    /// digest: served as it was, whatever its image, annotations or the
    /// node policy say now.
    pub(super) function: Option<Kept>,
}

/// One running program of a tenant, counted until it is dropped.
pub(super) struct ProgramPermit {
    pub(super) counts: Arc<Mutex<HashMap<String, usize>>>,
    pub(super) tenant: String,
}

impl Drop for ProgramPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(running) = counts.get_mut(&self.tenant) {
            *running = running.saturating_sub(1);
            if *running == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

/// What an HTTP function container was created with, for the next host.
#[derive(Clone)]
pub(crate) struct Kept {
    pub(crate) spec: FunctionSpec,
    pub(crate) digest: String,
}

pub(super) struct Container {
    pub(super) id: String,
    /// What containerd asked for (a hand-over replays it).
    pub(super) request: CreateTaskRequest,
    pub(super) bundle: PathBuf,
    pub(super) function: String,
    /// The pod sandbox it belongs to, when the CRI made it.
    pub(super) sandbox: Option<String>,
    /// Whose it is: its pod's namespace.
    pub(super) tenant: String,
    pub(super) stdin: String,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) rootfs: Option<PathBuf>,
    pub(super) code_bytes: u64,
    pub(super) kind: Kind,
    pub(super) state: watch::Sender<TaskState>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) runner: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Its stdout and stderr FIFOs (also in the node's sinks while it
    /// runs), closed when it exits: the CRI reads them to their end before
    /// it deletes the task, so holding them past the exit would hang
    /// StopContainer.
    pub(super) output: Mutex<Option<Arc<ContainerOutput>>>,
    /// A second descriptor of its pod listener (a running HTTP function),
    /// kept so the listener outlives its serving loop in a hand-over.
    pub(super) listener: Mutex<Option<OwnedFd>>,
    /// How it ended, as first seen: kept while its output is taken, so a
    /// kill meanwhile changes neither its status nor its time.
    pub(super) ended: OnceLock<(u32, SystemTime)>,
    /// Its execs (`kubectl exec`), by exec id.
    pub(super) execs: Mutex<HashMap<String, Arc<Exec>>>,
    /// An HTTP function's resolved spec and wasm digest (kept in the node's
    /// wasm store while the container exists).
    pub(super) kept: Option<Kept>,
}

impl Container {
    /// The container `request` asked for, serving as `kind`, in `state`.
    pub(super) fn new(
        request: &CreateTaskRequest,
        function: String,
        rootfs: Option<PathBuf>,
        (kind, code_bytes): (Kind, u64),
        output: Option<Arc<ContainerOutput>>,
        state: TaskState,
    ) -> Container {
        Container {
            id: request.id.clone(),
            request: request.clone(),
            bundle: PathBuf::from(&request.bundle),
            function,
            sandbox: None,
            tenant: String::new(),
            stdin: request.stdin.clone(),
            stdout: request.stdout.clone(),
            stderr: request.stderr.clone(),
            rootfs,
            code_bytes,
            kind,
            state: watch::Sender::new(state),
            stop: watch::Sender::new(false),
            runner: Mutex::new(None),
            output: Mutex::new(output),
            listener: Mutex::new(None),
            ended: OnceLock::new(),
            execs: Mutex::new(HashMap::new()),
            kept: None,
        }
    }

    /// The same container, as part of pod sandbox `sandbox`, serving the
    /// function `kept` (if an HTTP function).
    pub(super) fn with(mut self, sandbox: Option<String>, tenant: String, kept: Option<Kept>) -> Container {
        self.sandbox = sandbox;
        self.tenant = tenant;
        self.kept = kept;
        self
    }

    pub(super) fn state(&self) -> TaskState {
        *self.state.borrow()
    }

    /// Note that it ended with `status` now, unless an end was noted
    /// before; the end noted.
    pub(super) fn end(&self, status: u32) -> (u32, SystemTime) {
        *self.ended.get_or_init(|| (status, SystemTime::now()))
    }

    /// End it with `status` at `at`, unless it has ended already (a
    /// container ends once: its first status is the one containerd gets).
    /// True when this call ended it.
    pub(super) fn stop_with(&self, status: u32, at: SystemTime) -> bool {
        self.state.send_if_modified(|state| {
            if matches!(state, TaskState::Stopped { .. }) {
                return false;
            }
            *state = TaskState::Stopped { status, at };
            true
        })
    }

    pub(super) fn lock_execs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Exec>>> {
        self.execs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn exec(&self, exec_id: &str) -> Result<Arc<Exec>, NodeError> {
        self.lock_execs().get(exec_id).cloned().ok_or_else(|| NodeError::NotFound(format!("exec {exec_id} not found")))
    }

    pub(super) fn take_runner(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.runner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }

    /// Stop its program's runner, unless the program has ended: the runner
    /// is then telling that end (waiting for its output's reader, then
    /// telling containerd), which an abort could cut off half told. It is
    /// left to finish; an end told meanwhile cuts its wait short.
    pub(super) fn stop_runner(&self) {
        if self.ended.get().is_none()
            && let Some(runner) = self.take_runner()
        {
            runner.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(id: &str, state: TaskState) -> Container {
        let request = CreateTaskRequest { id: id.to_string(), bundle: format!("/run/{id}"), ..Default::default() };
        Container::new(&request, "f".to_string(), None, (Kind::Ended, 0), None, state)
    }

    #[test]
    fn only_running_and_paused_containers_are_live() {
        let at = SystemTime::UNIX_EPOCH;
        let live = [TaskState::Created, TaskState::Running, TaskState::Paused, TaskState::Stopped { status: 0, at }]
            .map(TaskState::is_live);
        assert_eq!(live, [false, true, true, false]);
        assert_eq!(TaskState::from(ExecState::Stopped { status: 3, at }), TaskState::Stopped { status: 3, at });
        assert_eq!(TaskState::from(ExecState::Running), TaskState::Running);
    }

    #[test]
    fn a_container_ends_once_and_keeps_its_first_status() {
        let container = ended("c", TaskState::Running);
        let mut watcher = container.state.subscribe();
        let first = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(5);
        assert!(container.stop_with(137, first), "the first end is recorded");
        assert!(watcher.has_changed().unwrap(), "waiters see it");
        watcher.mark_unchanged();
        assert!(!container.stop_with(0, SystemTime::now()), "a later end is not");
        assert!(!watcher.has_changed().unwrap(), "and wakes no one");
        assert_eq!(container.state(), TaskState::Stopped { status: 137, at: first });
    }

    #[test]
    fn a_container_made_stopped_cannot_end_again() {
        let at = SystemTime::UNIX_EPOCH;
        let container = ended("taken-back", TaskState::Stopped { status: ADOPTION_FAILED, at });
        assert!(!container.stop_with(0, SystemTime::now()));
        assert_eq!(container.state(), TaskState::Stopped { status: 255, at });
    }

    #[test]
    fn an_unknown_exec_is_not_found_by_its_id() {
        let container = ended("c", TaskState::Running);
        let err = container.exec("probe-1").err().expect("no such exec");
        assert!(matches!(&err, NodeError::NotFound(text) if text == "exec probe-1 not found"), "{err:?}");
    }

    #[test]
    fn a_program_permit_gives_its_place_back_and_forgets_an_idle_tenant() {
        let counts = Arc::new(Mutex::new(HashMap::from([("a".to_string(), 2)])));
        let permit = |tenant: &str| ProgramPermit { counts: counts.clone(), tenant: tenant.to_string() };
        drop(permit("a"));
        assert_eq!(counts.lock().unwrap().get("a"), Some(&1));
        drop(permit("a"));
        assert!(!counts.lock().unwrap().contains_key("a"), "a tenant running nothing has no entry");
        drop(permit("b"));
        assert!(counts.lock().unwrap().is_empty(), "a permit of a tenant not counted changes nothing");
    }
}
