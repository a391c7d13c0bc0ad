//! Execs (`kubectl exec`): a wasi:cli program in the container's rootfs,
//! or an HTTP request to its function.

use super::*;

impl TaskHost {
    /// Add an exec (`kubectl exec`): checked now, started by Start.
    pub(super) async fn exec_add(&self, container: &Container, request: &ExecProcessRequest) -> Result<(), NodeError> {
        if !container.state().is_live() {
            return Err(NodeError::FailedPrecondition("it is not running".to_string()));
        }
        let exec = Exec::parse(request)?;
        match (&container.kind, &exec.command) {
            (Kind::Sandbox { .. }, _) => {
                return Err(NodeError::FailedPrecondition("a pod's sandbox runs nothing to exec into".to_string()));
            }
            (Kind::Command { .. }, ExecCommand::Invoke { .. }) => {
                return Err(NodeError::InvalidArgument(
                    "`shoal invoke` calls the pod's HTTP function; this container runs a program".to_string(),
                ));
            }
            _ => {}
        }
        {
            let mut execs = container.lock_execs();
            if execs.contains_key(&exec.id) {
                return Err(NodeError::AlreadyExists(format!("exec {} already exists", exec.id)));
            }
            execs.insert(exec.id.clone(), Arc::new(exec));
        }
        let event = TaskExecAdded {
            container_id: container.id.clone(),
            exec_id: request.exec_id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event)).await;
        Ok(())
    }

    /// Start an exec: it runs on its own task until it ends or is killed.
    pub(super) async fn exec_start(
        self: &Arc<Self>,
        container: Arc<Container>,
        exec: Arc<Exec>,
    ) -> Result<u32, NodeError> {
        if exec.state() != ExecState::Created {
            return Err(NodeError::FailedPrecondition(format!("exec {} was already started", exec.id)));
        }
        // A program counts among its namespace's programs; `shoal invoke`
        // is a request like any.
        let permit = match exec.command {
            ExecCommand::Program { .. } => Some(self.admit_program(&container.tenant)?),
            ExecCommand::Invoke { .. } => None,
        };
        let stdio = ExecStdio::open(&exec).await?;
        exec.state.send_replace(ExecState::Running);
        let tasks = self.clone();
        let (running, started) = (container.clone(), exec.clone());
        // It shares its container's CPU share, and so its threads.
        let runtime = self.host.dispatcher().runtime(self.limits(&container).1.is_some());
        let outputs = stdio.outputs();
        let runner = runtime.spawn(async move {
            let status = tasks.run_exec(&running, &started, stdio).await;
            started.end(status);
            drop(permit);
            // Its output reaches the client before its end is told (the
            // client closes its readers once it hears of it); a kill
            // meanwhile cuts the wait short, not the status.
            let mut state = started.state.subscribe();
            let left = tokio::select! {
                left = crate::stdio::drained(&outputs, crate::stdio::DRAIN_STALL, crate::stdio::DRAIN_MOST) => left,
                // An end told meanwhile (a kill's) cuts the wait short.
                _ = state.wait_for(|state| matches!(state, ExecState::Stopped { .. })) => 0,
            };
            if left > 0 {
                tracing::warn!(
                    container = %running.id,
                    exec = %started.id,
                    unread_bytes = left,
                    "the exec's output reader stopped taking its output before its end: what it left is lost"
                );
            }
            drop(outputs);
            if started.finish(status) {
                tasks.exec_exited(&running, &started).await;
            }
        });
        *exec.runner.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(runner);
        let event = TaskExecStarted {
            container_id: container.id.clone(),
            exec_id: exec.id.clone(),
            pid: self.pid,
            ..Default::default()
        };
        self.publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event)).await;
        Ok(self.pid)
    }

    /// Run an exec to its end; its exit status.
    pub(super) async fn run_exec(&self, container: &Container, exec: &Exec, stdio: ExecStdio) -> u32 {
        match &exec.command {
            ExecCommand::Invoke { path } => self.exec_invoke(container, exec, path, stdio).await,
            ExecCommand::Program { args, env } => {
                let (stdin, stdout, stderr, mut notes) = stdio.into_wasi();
                // The bundle is read once: where the program is, its / and its volumes.
                let (rootfs, volumes) = match Bundle::load(&container.bundle) {
                    Ok(bundle) => (bundle.rootfs(), bundle.volumes()),
                    Err(err) => {
                        let why = format!("shoal: {}: the container's bundle: {err}\n", args[0]);
                        crate::exec::write(&mut notes, why.as_bytes()).await;
                        return 127;
                    }
                };
                let program = match self.exec_program(rootfs.clone(), &args[0]).await {
                    Ok(program) => program,
                    Err((status, why)) => {
                        crate::exec::write(&mut notes, format!("shoal: {}: {why}\n", args[0]).as_bytes()).await;
                        return status;
                    }
                };
                let (memory_limit, cpu_quota) = self.limits(container);
                let invocation = command::Invocation {
                    args,
                    env,
                    rootfs: Some(&rootfs),
                    volumes: &volumes,
                    memory_limit,
                    cpu_quota,
                    stdio: command::Stdio::Pipes { stdin, stdout, stderr },
                    tenant: &container.tenant,
                };
                let engine = self.host.registry().engine().clone();
                let (code, trap) = command::run(&engine, &program, invocation).await;
                if let Some(trap) = trap {
                    crate::exec::write(&mut notes, format!("shoal: the program trapped: {trap}\n").as_bytes()).await;
                }
                code as u32
            }
        }
    }

    /// The program an exec names, read inside `rootfs` and compiled; or the status to exit with (127 missing, 126 not a
    /// program) and why.
    pub(super) async fn exec_program(&self, rootfs: PathBuf, path: &str) -> Result<Program, (u32, String)> {
        let (path, max_bytes) = (path.to_string(), self.max_wasm_bytes);
        let engine = self.host.registry().engine().clone();
        let compiled = tokio::task::spawn_blocking(move || {
            let wasm = rootfs::read_inside(&rootfs, &path, max_bytes).map_err(|err| (127, err.to_string()))?;
            if !command::is_program(&wasm) {
                return Err((
                    126,
                    "not a wasi:cli program (an HTTP function is called with `shoal invoke`)".to_string(),
                ));
            }
            command::compile(&engine, &wasm).map_err(|err| (126, err.to_string()))
        })
        .await;
        compiled.unwrap_or_else(|err| Err((126, format!("compiling the program failed: {err}"))))
    }

    /// `shoal invoke PATH` inside the pod: a GET on its own function.
    pub(super) async fn exec_invoke(&self, container: &Container, exec: &Exec, path: &str, stdio: ExecStdio) -> u32 {
        use http_body_util::BodyExt as _;
        let ExecStdio { mut stdout, mut notes, .. } = stdio;
        let Some(target) = self.host.registry().by_name(&container.function) else {
            crate::exec::write(&mut notes, b"shoal invoke: the pod's function is not running\n").await;
            return 1;
        };
        let request = http::Request::builder()
            .method(http::Method::GET)
            .uri(format!("http://localhost{path}"))
            .header(http::header::HOST, "localhost")
            .body(
                http_body_util::Empty::<bytes::Bytes>::new()
                    .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} }),
            );
        let request = match request {
            Ok(request) => request,
            Err(err) => {
                crate::exec::write(&mut notes, format!("shoal invoke: bad path {path:?}: {err}\n").as_bytes()).await;
                return 2;
            }
        };
        let request_id: Arc<str> = Arc::from(format!("exec-{}", exec.id));
        let response = self.host.dispatcher().dispatch(target.pick().clone(), request, request_id).await;
        let status = response.status();
        let mut body = response.into_body();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        crate::exec::write(&mut stdout, &data).await;
                    }
                }
                Err(err) => {
                    crate::exec::write(&mut notes, format!("shoal invoke: the body broke off: {err}\n").as_bytes())
                        .await;
                    return 1;
                }
            }
        }
        if status.as_u16() >= 400 {
            crate::exec::write(&mut notes, format!("shoal invoke: {path} answered {status}\n").as_bytes()).await;
            return 1;
        }
        0
    }

    /// Tell containerd an exec ended.
    pub(super) async fn exec_exited(&self, container: &Container, exec: &Exec) {
        let ExecState::Stopped { status, at } = exec.state() else { return };
        self.publish_exit(container, &exec.id, status, at).await;
    }

    /// Tell containerd that process `id` of `container` (the task itself,
    /// or one of its execs) exited with `status` at `at`.
    pub(super) async fn publish_exit(&self, container: &Container, id: &str, status: u32, at: SystemTime) {
        let event = TaskExit {
            container_id: container.id.clone(),
            id: id.to_string(),
            pid: self.pid,
            exit_status: status,
            exited_at: timestamp(at),
            ..Default::default()
        };
        self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event)).await;
    }

    /// Kill an exec: it stops at once, with `128 + signal`.
    pub(super) async fn exec_kill(&self, container: &Container, exec: &Exec, signal: u32) {
        exec.stop_runner();
        if exec.finish(signalled(signal)) {
            self.exec_exited(container, exec).await;
        }
    }
}
