//! Stopping everything, and handing the containers to the next host (and
//! taking them back).

use super::*;
use crate::handover::HandoverError;

impl TaskHost {
    /// Stop every container (host shutdown): functions drain and run `destroy`.
    pub(crate) async fn stop_all(self: &Arc<Self>) {
        let containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        let stops = containers.into_iter().filter(|c| c.state().is_live()).map(|container| {
            let tasks = self.clone();
            async move { tasks.terminate(container, SIGTERM).await }
        });
        futures_util::future::join_all(stops).await;
    }

    /// Why this host cannot hand its containers over now, if it cannot: a
    /// running program or an exec (their wasm state cannot move).
    pub(crate) fn refuse_hand_over(&self) -> Option<String> {
        for container in self.lock().values() {
            if matches!(container.kind, Kind::Command { .. }) && container.state().is_live() {
                return Some(format!(
                    "container {} runs a wasi:cli program, whose state cannot move to another process; \
                     upgrade once it has ended",
                    container.id
                ));
            }
            if let Some(exec) = container.lock_execs().keys().next() {
                return Some(format!(
                    "container {} has exec {exec} (kubectl exec); upgrade once containerd has removed it",
                    container.id
                ));
            }
        }
        None
    }

    /// End every running program and exec now (as SIGKILL would, 137),
    /// saying `why` in its container's log; how many there were.
    pub(crate) async fn end_programs(&self, why: &str) -> usize {
        let containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        let mut ended = 0;
        for container in containers {
            let execs: Vec<Arc<Exec>> =
                container.lock_execs().values().filter(|exec| exec.state() == ExecState::Running).cloned().collect();
            for exec in execs {
                self.tell(&container, &format!("exec {}: {why}", exec.id));
                self.exec_kill(&container, &exec, SIGKILL).await;
                ended += 1;
            }
            if matches!(container.kind, Kind::Command { .. }) && container.state().is_live() {
                self.tell(&container, why);
                self.kill_now(&container).await;
                ended += 1;
            }
        }
        ended
    }

    /// Whether a function is still draining after a stop signal (its exit
    /// is yet to be reported).
    pub(crate) fn stopping(&self) -> bool {
        self.lock().values().any(|container| container.state().is_live() && *container.stop.borrow())
    }

    /// Describe every container for the next host, adding the descriptors
    /// it needs (network namespaces, pod listeners, output FIFOs) to `fds`.
    /// Sandboxes come first. Called with containerd's connections held, so
    /// nothing changes the containers meanwhile.
    pub(crate) fn save(
        &self,
        fds: &mut Descriptors,
    ) -> Result<(Vec<SavedSandbox>, Vec<SavedContainer>), HandoverError> {
        let sandboxes = self.sandboxes.save(fds)?;
        let mut containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        containers.sort_by_key(|container| !matches!(container.kind, Kind::Sandbox { .. }));
        let mut saved = Vec::with_capacity(containers.len());
        for container in containers {
            let state = match container.state() {
                TaskState::Created => SavedState::Created,
                TaskState::Running => SavedState::Running,
                TaskState::Paused => SavedState::Paused,
                TaskState::Stopped { status, at } => SavedState::Stopped { status, at },
            };
            let netns = match &container.kind {
                Kind::Sandbox { netns, .. } | Kind::Service { netns, .. } => netns.as_deref(),
                _ => None,
            };
            let netns = match (netns, state) {
                (Some(netns), state) if !matches!(state, SavedState::Stopped { .. }) => {
                    Some(fds.add_copy(netns, format!("the network namespace of {}", container.id))?)
                }
                _ => None,
            };
            let listener = match &*container.listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
                Some(listener) if container.state().is_live() => {
                    Some(fds.add_copy(listener, format!("the listener of {}", container.id))?)
                }
                _ => None,
            };
            let mut output = [None, None];
            let fifos = container.output.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
            if let (Some(fifos), false) = (fifos, matches!(state, SavedState::Stopped { .. })) {
                let (stdout, stderr) = fifos.descriptors().map_err(|source| HandoverError::Duplicate {
                    what: format!("the output of {}", container.id),
                    source,
                })?;
                output = [stdout.map(|fd| fds.add(fd)), stderr.map(|fd| fds.add(fd))];
            }
            saved.push(SavedContainer {
                request: container
                    .request
                    .write_to_bytes()
                    .map_err(|source| HandoverError::Encode { what: container.id.clone(), source })?,
                function: container.function.clone(),
                rootfs: container.rootfs.clone(),
                state,
                netns,
                listener,
                output,
                spec: container.kept.as_ref().map(|kept| kept.spec.clone()),
                digest: container.kept.as_ref().map(|kept| kept.digest.clone()),
            });
        }
        Ok((sandboxes, saved))
    }

    /// Stop serving every pod listener (the listeners stay open, their
    /// connections queue) and let the requests under way finish.
    pub(crate) async fn stop_serving(&self) {
        let containers: Vec<Arc<Container>> = self.lock().values().cloned().collect();
        for container in containers {
            if let Some(runner) = container.take_runner() {
                container.stop.send_replace(true);
                let _ = runner.await;
            }
        }
    }

    /// Take over the containers another host process saved: each is built
    /// again from containerd's request (its function deployed, its rootfs
    /// left mounted), keeps its network namespace, and a running function
    /// serves the listener it had. containerd is not told anything: for it
    /// nothing happened.
    pub(crate) async fn adopt(
        self: &Arc<Self>,
        (sandboxes, saved): (Vec<SavedSandbox>, Vec<SavedContainer>),
        fds: &mut Descriptors,
    ) -> Result<(), NodeError> {
        self.sandboxes.adopt(sandboxes, fds)?;
        for saved in saved {
            let request = CreateTaskRequest::parse_from_bytes(&saved.request).map_err(|err| NodeError::Encoding {
                code: Code::INTERNAL,
                what: "a saved container's request".to_string(),
                source: err.into(),
            })?;
            let id = request.id.clone();
            // One container that cannot be taken over ends alone (containerd
            // is told it exited); every other pod serves on.
            let container = match self.adopt_one(&request, saved, fds).await {
                Ok(container) => container,
                Err(err) => {
                    tracing::error!(container = %id, error = %err, "cannot take the container over: it ends");
                    let at = SystemTime::now();
                    let ended = Arc::new(Container::new(
                        &request,
                        String::new(),
                        None,
                        (Kind::Ended, 0),
                        None,
                        TaskState::Stopped { status: ADOPTION_FAILED, at },
                    ));
                    self.publish_exit(&ended, &id, ADOPTION_FAILED, at).await;
                    ended
                }
            };
            self.lock().insert(id, container);
        }
        Ok(())
    }

    /// Build one container another host process saved: its function from
    /// the spec and wasm it was created with, its namespace, listener and
    /// output as they were handed over.
    pub(super) async fn adopt_one(
        self: &Arc<Self>,
        request: &CreateTaskRequest,
        saved: SavedContainer,
        fds: &mut Descriptors,
    ) -> Result<Arc<Container>, NodeError> {
        let mut take = |index: Option<usize>| fds.take_some(index).map_err(|err| NodeError::Handover(err.into()));
        let (netns, listener) = (take(saved.netns)?, take(saved.listener)?);
        let output = ContainerOutput::from_descriptors(take(saved.output[0])?, take(saved.output[1])?);
        let id = &request.id;
        if let SavedState::Stopped { status, at } = saved.state {
            return Ok(Arc::new(Container::new(
                request,
                saved.function.clone(),
                saved.rootfs.clone(),
                (Kind::Ended, 0),
                None,
                TaskState::Stopped { status, at },
            )));
        }
        let bundle = PathBuf::from(&request.bundle);
        let function = match (saved.spec, saved.digest) {
            (Some(spec), Some(digest)) => Some(Kept { spec, digest }),
            _ => None,
        };
        let inherited = Inherited { netns: netns.map(Arc::new), output: Some(output), function };
        let container = self
            .prepare(request, &bundle, saved.rootfs.clone(), inherited)
            .await
            .map_err(|err| err.context(format_args!("container {id}")))?;
        if matches!(saved.state, SavedState::Running | SavedState::Paused) {
            match (&container.kind, listener) {
                (Kind::Service { .. }, Some(listener)) => {
                    self.serve(&container, std::net::TcpListener::from(listener))?;
                }
                (Kind::Sandbox { .. }, _) => {}
                _ => {
                    return Err(NodeError::Internal(format!(
                        "container {id} was running, and cannot be taken over running"
                    )));
                }
            }
            let paused = saved.state == SavedState::Paused;
            if paused && matches!(container.kind, Kind::Service { .. }) {
                self.host.registry().set_paused(&container.function, true).map_err(|err| NodeError::Host {
                    code: Code::INTERNAL,
                    what: format!("pausing {id}"),
                    source: err.into(),
                })?;
            }
            container.state.send_replace(if paused { TaskState::Paused } else { TaskState::Running });
        }
        Ok(container)
    }
}
