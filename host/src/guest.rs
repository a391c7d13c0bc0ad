//! The data of an instance's [`Store`](wasmtime::Store): what the guest's
//! imports reach (WASI, `wasi:http`, the Runtime ABI) and what the host
//! keeps per instance to bound and meter it (memory meter, deadline, epoch
//! ticks, output).
//!
//! Each interface sees only its own slice of it, through a view
//! (`WasiView`, `WasiHttpView`, [`AbiView`]); the linker of
//! [`crate::function::Loader`] is built over this type.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::abi::{AbiCtxView, AbiState, AbiView, FunctionCaps, OutboundHttp, Services};
use crate::limits::{CallCpu, CpuQuota, MemoryMeter};
use crate::logs::{InstanceLog, Stream};
use crate::request::RequestMeta;

/// The data of an instance's store.
pub struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: OutboundHttp,
    abi: AbiState,
    pub(crate) memory: MemoryMeter,
    /// When the current call must end.
    pub(crate) deadline: Instant,
    /// The CPU time of the call under way, as it goes.
    pub(crate) call_cpu: Arc<CallCpu>,
    /// The function's CPU share, if limited.
    pub(crate) cpu_quota: Option<Arc<CpuQuota>>,
    /// Time the current call waited for CPU (its function over its share).
    pub(crate) throttled: std::time::Duration,
    pub(crate) log: Arc<InstanceLog>,
}

impl GuestState {
    /// The state of a new instance: its output goes to `log`, its ABI calls
    /// are checked against `caps`, and it may grow its memory to
    /// `memory_bytes`; its first call must end by `deadline`.
    ///
    /// The guest's environment is the function's `env` and nothing of the
    /// host's; its filesystem is its `files` grants, each preopened at its
    /// guest path (`wasi:filesystem` resolves every path inside the
    /// directory, symlinks included, through cap-std), read-only where the
    /// grant is. Fails when a granted directory cannot be opened.
    pub fn new(
        caps: Arc<FunctionCaps>,
        services: Arc<Services>,
        log: Arc<InstanceLog>,
        memory_bytes: u64,
        deadline: Instant,
    ) -> anyhow::Result<GuestState> {
        let mut builder = WasiCtx::builder();
        builder
            .stdout(log.output(Stream::Stdout))
            .stderr(log.output(Stream::Stderr))
            .args(&[log.function()])
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (name, value) in &caps.env {
            builder.env(name, value);
        }
        for grant in &caps.grants.files {
            let perms = if grant.read_only { FsPerms::ReadOnly } else { FsPerms::ReadWrite };
            builder
                .preopened_dir(&grant.host, &grant.guest, perms)
                .map_err(|err| anyhow::anyhow!("cannot open {} for {}: {err:#}", grant.host.display(), grant.guest))?;
        }
        let wasi = builder.build();
        Ok(GuestState {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            outbound: OutboundHttp::new(caps.clone(), services.clone(), log.clone()),
            abi: AbiState::new(caps, services, log.clone()),
            memory: MemoryMeter::new(memory_bytes),
            deadline,
            call_cpu: Arc::new(CallCpu::default()),
            cpu_quota: None,
            throttled: std::time::Duration::ZERO,
            log,
        })
    }

    /// Tag the instance's output and ABI calls with the request it now
    /// serves (its id, trace and nesting depth).
    pub fn begin_request(&mut self, request: &RequestMeta) {
        self.log.set_request(Some((request.id.clone(), request.trace)));
        self.abi.begin_request(request.depth);
    }

    /// The request is over: output is no longer tagged with it.
    pub fn end_request(&mut self) {
        self.log.set_request(None);
    }

    /// The ABI's per-request state: nesting depth and invokes made.
    pub(crate) fn abi_context(&self) -> (u32, Arc<std::sync::atomic::AtomicU32>) {
        self.abi.context()
    }

    /// Load another request's ABI state (a shared instance switching tasks).
    pub(crate) fn set_abi_context(&mut self, depth: u32, invokes: Arc<std::sync::atomic::AtomicU32>) {
        self.abi.set_context(depth, invokes);
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

impl AbiView for GuestState {
    fn abi(&mut self) -> AbiCtxView<'_> {
        AbiCtxView { state: &mut self.abi, table: &mut self.table }
    }
}
