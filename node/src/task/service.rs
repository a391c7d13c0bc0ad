//! The ttrpc face of the node: `containerd.task.v2.Task`.

use super::*;

/// The ttrpc face of a [`TaskHost`].
pub(super) struct TaskService {
    tasks: Arc<TaskHost>,
}

impl TaskService {
    /// Serve `node`.
    pub(super) fn new(tasks: Arc<TaskHost>) -> TaskService {
        TaskService { tasks }
    }
}

/// The task service under the names containerd 1.x (`v2`) and 2.x (`v3`)
/// call it by (the messages are the same), and the Sandbox API.
pub(crate) fn services(tasks: &Arc<TaskHost>) -> Vec<(String, Service)> {
    let service = Arc::new(TaskService::new(tasks.clone()));
    let mut services: Vec<(String, Service)> =
        containerd_shim_protos::shim_async::create_task(service.clone()).into_iter().collect();
    let v2: Vec<(String, Service)> = containerd_shim_protos::shim_async::create_task(service)
        .into_iter()
        .map(|(name, methods)| (name.replace("containerd.task.v3.", "containerd.task.v2."), methods))
        .collect();
    services.extend(v2);
    services.extend(SandboxService::new(tasks.clone()).service());
    services
}

#[async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, request: CreateTaskRequest) -> Reply<CreateTaskResponse> {
        let id = request.id.clone();
        let began = Instant::now();
        match self.tasks.create(request).await {
            Ok(pid) => {
                tracing::info!(container = %id, took_us = began.elapsed().as_micros() as u64, "created");
                Ok(CreateTaskResponse { pid, ..Default::default() })
            }
            Err(err) => {
                tracing::warn!(container = %id, error = %err, code = ?err.code(), "create failed");
                Err(err.for_container(&id))
            }
        }
    }

    async fn start(&self, _ctx: &TtrpcContext, request: StartRequest) -> Reply<StartResponse> {
        let container = self.tasks.get(&request.id)?;
        if !request.exec_id.is_empty() {
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            let pid = self.tasks.exec_start(container, exec).await.map_err(|err| err.for_container(&request.id))?;
            return Ok(StartResponse { pid, ..Default::default() });
        }
        match self.tasks.start(container).await {
            Ok(pid) => Ok(StartResponse { pid, ..Default::default() }),
            Err(err) => Err(err.for_container(&request.id)),
        }
    }

    async fn state(&self, _ctx: &TtrpcContext, request: StateRequest) -> Reply<StateResponse> {
        let container = self.tasks.get(&request.id)?;
        // The task's own state, or one of its execs'.
        let (state, [stdin, stdout, stderr]) = if request.exec_id.is_empty() {
            (container.state(), [&container.stdin, &container.stdout, &container.stderr].map(String::clone))
        } else {
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            (TaskState::from(exec.state()), [&exec.stdin, &exec.stdout, &exec.stderr].map(String::clone))
        };
        let mut response = StateResponse {
            id: container.id.clone(),
            exec_id: request.exec_id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: self.tasks.pid,
            stdin,
            stdout,
            stderr,
            ..Default::default()
        };
        let status = match state {
            TaskState::Created => Status::CREATED,
            TaskState::Running => Status::RUNNING,
            TaskState::Paused => Status::PAUSED,
            TaskState::Stopped { status, at } => {
                response.exit_status = status;
                response.exited_at = timestamp(at);
                Status::STOPPED
            }
        };
        response.status = status.into();
        Ok(response)
    }

    async fn kill(&self, _ctx: &TtrpcContext, request: KillRequest) -> Reply<Empty> {
        let container = self.tasks.get(&request.id)?;
        if !request.exec_id.is_empty() {
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            self.tasks.exec_kill(&container, &exec, request.signal).await;
            return Ok(Empty::new());
        }
        self.tasks.kill(container, request.signal).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, request: WaitRequest) -> Reply<WaitResponse> {
        let container = self.tasks.get(&request.id)?;
        if !request.exec_id.is_empty() {
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            let mut state = exec.state.subscribe();
            let stopped =
                state.wait_for(|state| matches!(state, ExecState::Stopped { .. })).await.map(|state| *state).map_err(
                    |_| NodeError::Internal("the exec's state is gone".to_string()).for_container(&request.id),
                )?;
            let ExecState::Stopped { status, at } = stopped else { unreachable!("waited for Stopped") };
            return Ok(WaitResponse { exit_status: status, exited_at: timestamp(at), ..Default::default() });
        }
        let mut state = container.state.subscribe();
        let stopped =
            state.wait_for(|state| matches!(state, TaskState::Stopped { .. })).await.map(|state| *state).map_err(
                |_| NodeError::Internal("the container's state is gone".to_string()).for_container(&request.id),
            )?;
        let TaskState::Stopped { status, at } = stopped else { unreachable!("waited for Stopped") };
        Ok(WaitResponse { exit_status: status, exited_at: timestamp(at), ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, request: DeleteRequest) -> Reply<DeleteResponse> {
        if !request.exec_id.is_empty() {
            let container = self.tasks.get(&request.id)?;
            let exec = container.exec(&request.exec_id).map_err(|err| err.for_container(&request.id))?;
            let (status, at) = match exec.state() {
                ExecState::Running => {
                    return Err(NodeError::FailedPrecondition(format!("exec {} is running: kill it first", exec.id))
                        .for_container(&request.id));
                }
                ExecState::Created => (0, SystemTime::now()),
                ExecState::Stopped { status, at } => (status, at),
            };
            container.lock_execs().remove(&exec.id);
            return Ok(DeleteResponse {
                pid: self.tasks.pid,
                exit_status: status,
                exited_at: timestamp(at),
                ..Default::default()
            });
        }
        self.tasks.delete(&request.id).await.map_err(|err| err.for_container(&request.id))
    }

    async fn pids(&self, _ctx: &TtrpcContext, request: PidsRequest) -> Reply<PidsResponse> {
        // containerd asks this of a pod sandbox too when it reconnects.
        if !self.tasks.sandboxes.contains(&request.id) {
            self.tasks.get(&request.id)?;
        }
        let process = ProcessInfo { pid: self.tasks.pid, ..Default::default() };
        Ok(PidsResponse { processes: vec![process], ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, request: ConnectRequest) -> Reply<ConnectResponse> {
        // containerd connects to a pod sandbox's shim with the task API
        // when it restarts, then asks the Sandbox API.
        if !self.tasks.sandboxes.contains(&request.id) {
            self.tasks.get(&request.id)?;
        }
        Ok(ConnectResponse {
            shim_pid: self.tasks.pid,
            task_pid: self.tasks.pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _request: ShutdownRequest) -> Reply<Empty> {
        // The host serves the whole node: one container's shim going away
        // does not stop it. `shoal node` ends on SIGTERM.
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, request: CloseIORequest) -> Reply<Empty> {
        // Functions do not read stdin; an exec's program sees its input
        // end when containerd closes its end of the FIFO.
        self.tasks.get(&request.id)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, request: ExecProcessRequest) -> Reply<Empty> {
        let container = self.tasks.get(&request.id)?;
        self.tasks.exec_add(&container, &request).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, request: ResizePtyRequest) -> Reply<Empty> {
        self.tasks.get(&request.id)?;
        Err(NodeError::Unimplemented("there is no terminal to resize: execs run without one".to_string())
            .for_container(&request.id))
    }

    async fn pause(&self, _ctx: &TtrpcContext, request: PauseRequest) -> Reply<Empty> {
        let container = self.tasks.get(&request.id)?;
        self.tasks.pause(&container).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, request: ResumeRequest) -> Reply<Empty> {
        let container = self.tasks.get(&request.id)?;
        self.tasks.resume(&container).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, request: UpdateTaskRequest) -> Reply<Empty> {
        let container = self.tasks.get(&request.id)?;
        let resources = request.resources.as_ref().map_or(b"{}".as_slice(), |any| any.value.as_slice());
        self.tasks.update(&container, resources).await.map_err(|err| err.for_container(&request.id))?;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, request: CheckpointTaskRequest) -> Reply<Empty> {
        self.tasks.get(&request.id)?;
        Err(NodeError::Unimplemented(
            "checkpointing is not supported: a function's state lives in its key-value store, not in its instances"
                .to_string(),
        )
        .for_container(&request.id))
    }

    async fn stats(&self, _ctx: &TtrpcContext, request: StatsRequest) -> Reply<StatsResponse> {
        let container = self.tasks.get(&request.id)?;
        let metrics = self.tasks.stats(&container);
        // containerd resolves the type by its bare proto name (typeurl),
        // without the type.googleapis.com/ prefix `Any::pack` would add.
        let mut stats = Any::new();
        stats.type_url = "io.containerd.cgroups.v2.Metrics".to_string();
        stats.value = metrics.write_to_bytes().map_err(|err| {
            NodeError::Encoding {
                code: Code::INTERNAL,
                what: "cannot encode the stats".to_string(),
                source: err.into(),
            }
            .for_container(&request.id)
        })?;
        Ok(StatsResponse { stats: MessageField::some(stats), ..Default::default() })
    }
}
