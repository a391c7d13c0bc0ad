//! Pause and resume, resources (UpdateContainerResources) and stats.

use super::*;

impl TaskHost {
    /// Pause: a function takes no new requests (they wait, within its
    /// `queue_timeout`), those under way finish.
    pub(super) async fn pause(&self, container: &Container) -> Result<(), NodeError> {
        match (container.state(), &container.kind) {
            (TaskState::Paused, _) => return Ok(()),
            (TaskState::Running, Kind::Service { .. }) => {
                self.host.registry().set_paused(&container.function, true).map_err(|err| NodeError::Host {
                    code: Code::INTERNAL,
                    what: "pausing".to_string(),
                    source: err.into(),
                })?;
            }
            (TaskState::Running, Kind::Sandbox { .. }) => {}
            (TaskState::Running, Kind::Command { .. }) => {
                return Err(NodeError::Unimplemented(
                    "pausing a running wasi:cli program is not supported (HTTP functions can be paused)".to_string(),
                ));
            }
            (state, _) => return Err(NodeError::FailedPrecondition(format!("it is not running ({state:?})"))),
        }
        container.state.send_replace(TaskState::Paused);
        let event = TaskPaused { container_id: container.id.clone(), ..Default::default() };
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event)).await;
        Ok(())
    }

    /// Resume: the requests that waited are served.
    pub(super) async fn resume(&self, container: &Container) -> Result<(), NodeError> {
        match container.state() {
            TaskState::Running => return Ok(()),
            TaskState::Paused => {}
            state => return Err(NodeError::FailedPrecondition(format!("it is not paused ({state:?})"))),
        }
        if matches!(container.kind, Kind::Service { .. }) {
            self.host.registry().set_paused(&container.function, false).map_err(|err| NodeError::Host {
                code: Code::INTERNAL,
                what: "resuming".to_string(),
                source: err.into(),
            })?;
        }
        container.state.send_replace(TaskState::Running);
        let event = TaskResumed { container_id: container.id.clone(), ..Default::default() };
        self.publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event)).await;
        Ok(())
    }

    /// Update (in-place resize): the function's memory and CPU budgets
    /// become what `resources` (the OCI `LinuxResources` containerd
    /// sends) says, computed as at creation (annotations capped by the
    /// limits). The function is deployed again with its new limits: the
    /// version serving now drains while the new one takes the requests, so
    /// nothing is refused and the container never restarts.
    pub(super) async fn update(&self, container: &Container, resources: &[u8]) -> Result<(), NodeError> {
        let resources: oci_spec::runtime::LinuxResources =
            serde_json::from_slice(resources).map_err(|err| NodeError::Encoding {
                code: Code::INVALID_ARGUMENT,
                what: "the resources are not OCI LinuxResources JSON".to_string(),
                source: err.into(),
            })?;
        let memory_limit = resources
            .memory()
            .as_ref()
            .and_then(oci_spec::runtime::LinuxMemory::limit)
            .and_then(|limit| u64::try_from(limit).ok())
            .filter(|limit| *limit > 0);
        let cpu_limit = resources.cpu().as_ref().and_then(|cpu| {
            let (quota, period) = (cpu.quota()?, cpu.period()?);
            (quota > 0 && period > 0)
                .then(|| (quota as u128 * 1000 / u128::from(period)).clamp(1, u128::from(u32::MAX)) as u32)
        });
        if !container.state().is_live() && container.state() != TaskState::Created {
            return Err(NodeError::FailedPrecondition("it has stopped".to_string()));
        }
        let Kind::Service { .. } = container.kind else {
            // A sandbox runs nothing; a program's limits are fixed when it starts.
            return match container.kind {
                Kind::Sandbox { .. } => Ok(()),
                _ => Err(NodeError::Unimplemented(
                    "changing a running wasi:cli program's resources is not supported (HTTP functions can be resized)"
                        .to_string(),
                )),
            };
        };
        let bundle = Bundle::load(&container.bundle)?;
        if bundle.is_sandbox() {
            return Err(NodeError::Internal("an HTTP function's bundle names no app container".to_string()));
        }
        let sandbox_id = bundle.sandbox_id();
        let record =
            crate::containerd::container(&self.containerd, &self.namespace, &container.id).await.unwrap_or_default();
        let (entry, file, wasm) = self.wasm_of(&bundle, &record).await?;
        let running = self.host.registry().by_name(&container.function);
        let digest = shoal::engine::sha256_hex(&wasm);
        if running
            .as_ref()
            .and_then(|target| target.pools().next())
            .is_some_and(|pool| pool.function().digest() != digest)
        {
            return Err(NodeError::FailedPrecondition(format!(
                "the container's wasm ({entry}) changed since it was created; recreate the container instead"
            )));
        }
        let spec = self.app_spec(
            &container.id,
            &container.function,
            &bundle,
            &record,
            sandbox_id.as_deref(),
            &file,
            (memory_limit, cpu_limit),
        )?;
        let paused = container.state() == TaskState::Paused;
        self.host
            .registry()
            .deploy(vec![DeployItem { spec, wasm: wasm.into() }])
            .await
            .map_err(|source| NodeError::Deploy { entry, source })?;
        if paused {
            // The new version waits as the old one did.
            let _ = self.host.registry().set_paused(&container.function, true);
        }
        tracing::info!(container = %container.id, memory_limit, cpu_limit, "resources updated");
        Ok(())
    }

    /// What a container's wasm may use: the linear memory it may hold and
    /// its CPU share — a program's own, or its function's (`memory_mb`,
    /// `cpu_millis`; no memory limit once the function is gone). An exec
    /// shares both, as a process shares its container's cgroup.
    pub(super) fn limits(&self, container: &Container) -> (Option<u64>, Option<Arc<CpuQuota>>) {
        match &container.kind {
            Kind::Command { memory_limit, cpu_quota, .. } => (Some(*memory_limit), cpu_quota.clone()),
            _ => {
                let target = self.host.registry().by_name(&container.function);
                let function = target.as_ref().and_then(|target| target.pools().next().map(|pool| pool.function()));
                (
                    function.map(|function| function.spec().limits.memory_bytes),
                    function.and_then(|function| function.cpu_quota().cloned()),
                )
            }
        }
    }

    pub(super) fn stats(&self, container: &Container) -> CgroupMetrics {
        let registry = self.host.registry();
        let cpu_usec = (self.host.metrics().cpu_seconds(&container.function) * 1e6) as u64;
        let resident: u64 = registry
            .by_name(&container.function)
            .map_or(0, |target| target.pools().map(|pool| pool.resident_bytes()).sum());
        let limit = self.limits(container).0.unwrap_or(0);
        // Throttling, as a CFS-limited cgroup reports it, from the quota
        // every version of the function keeps.
        let (throttled, throttled_periods) = registry
            .by_name(&container.function)
            .map(|target| {
                target
                    .pools()
                    .filter_map(|pool| pool.function().cpu_quota().map(|quota| quota.throttled()))
                    .fold((std::time::Duration::ZERO, 0), |(time, periods), (t, p)| (time + t, periods + p))
            })
            .unwrap_or_default();
        let mut metrics = CgroupMetrics::new();
        metrics.cpu = MessageField::some(CPUStat {
            usage_usec: cpu_usec,
            user_usec: cpu_usec,
            nr_throttled: throttled_periods,
            throttled_usec: throttled.as_micros() as u64,
            ..Default::default()
        });
        metrics.memory = MessageField::some(MemoryStat {
            usage: container.code_bytes + resident,
            usage_limit: limit,
            anon: resident,
            ..Default::default()
        });
        metrics
    }
}
