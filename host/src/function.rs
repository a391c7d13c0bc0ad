//! Turning a deployed spec and its wasm into something ready to instantiate.
//!
//! [`Runtime`] holds the engine and the process's [`Linker`]s (WASI 0.2,
//! `wasi:http` and the Runtime ABI), built once per wasmtime engine: one
//! for functions without fuel, one for those that meter it. [`Runtime::prepare`] checks the wasm,
//! compiles it (or loads it from the cache), links it into an
//! [`InstancePre`] and finds the HTTP handler and the optional lifecycle
//! hooks. (The trial instantiation that completes the checks of a deploy
//! is [`crate::instance::Instance::trial`], one layer up.)

use std::sync::Arc;

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime_wasi_http::p2::bindings::ProxyIndices;

use crate::Error;
use crate::abi::bindings::exports::shoal::runtime::events::GuestIndices as EventsIndices;
use crate::abi::bindings::exports::shoal::runtime::lifecycle::GuestIndices as LifecycleIndices;
use crate::abi::{FunctionCaps, Services};
use crate::engine::{CompileSource, WasmEngine};
use crate::guest::GuestState;
use crate::logs::{LogBudget, LogSink};
use crate::manifest::FunctionSpec;

/// The engine and linkers shared by every function of a host.
#[derive(Clone)]
pub struct Runtime {
    engine: WasmEngine,
    /// For the fuel-free engine, and for the one that meters fuel.
    linkers: Arc<[Linker<GuestState>; 2]>,
    services: Arc<Services>,
}

impl Runtime {
    /// Link WASI 0.2, `wasi:http` and the Runtime ABI once for all functions.
    pub fn new(engine: WasmEngine, services: Arc<Services>) -> anyhow::Result<Runtime> {
        let link = |fuel: bool| -> anyhow::Result<Linker<GuestState>> {
            let mut linker = Linker::new(engine.engine(fuel));
            wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
            wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
            crate::abi::add_to_linker(&mut linker)?;
            Ok(linker)
        };
        let linkers = Arc::new([link(false)?, link(true)?]);
        Ok(Runtime { engine, linkers, services })
    }

    /// The backends functions reach.
    pub fn services(&self) -> &Arc<Services> {
        &self.services
    }

    /// The engine.
    pub fn engine(&self) -> &WasmEngine {
        &self.engine
    }

    /// Validate, compile (or load from cache) and link one version of a
    /// function. `spec.version` must be set.
    pub async fn prepare(
        &self,
        spec: FunctionSpec,
        wasm: Arc<[u8]>,
        digest: String,
        log_sink: Arc<dyn LogSink>,
    ) -> Result<(CompiledFunction, CompileSource), Error> {
        let function = spec.name.to_string();
        if spec.limits.fuel_per_request.is_some() && !self.engine.fuel_enabled() {
            return Err(Error::LimitUnsupported {
                function,
                reason: "limits.fuel_per_request is set but this host runs with fuel metering off (--no-fuel)"
                    .to_string(),
            });
        }
        if !wasmparser::Parser::is_component(&wasm) {
            if wasmparser::Parser::is_core_wasm(&wasm) {
                return Err(Error::NotAComponent { function });
            }
            return Err(Error::InvalidWasm {
                function,
                reason: "not a WebAssembly binary (bad magic number or version)".to_string(),
            });
        }

        // Compiling takes milliseconds to seconds of CPU: keep it off the
        // threads that serve requests.
        let fuel = self.engine.meters_fuel(spec.limits.fuel_per_request.is_some());
        let engine = self.engine.clone();
        let (component, source) = {
            let digest = digest.clone();
            let wasm = wasm.clone();
            tokio::task::spawn_blocking(move || engine.load(&wasm, &digest, fuel))
                .await
                .map_err(|err| anyhow::anyhow!("compile task failed: {err}"))?
                .map_err(|err| Error::InvalidWasm { function: function.clone(), reason: format!("{err:#}") })?
        };

        let pre = self.linkers[usize::from(fuel)]
            .instantiate_pre(&component)
            .map_err(|err| Error::Link { function: function.clone(), reason: format!("{err:#}") })?;
        let handler = ProxyIndices::new(&pre).ok();
        let lifecycle = LifecycleIndices::new(&pre).ok();
        let events = EventsIndices::new(&pre).ok();
        // A function serves HTTP, receives messages, or both.
        if handler.is_none() && (events.is_none() || !spec.routes.is_empty()) {
            return Err(Error::MissingHandler { function });
        }
        let caps = FunctionCaps::new(&spec);
        let log_budget = {
            let (metrics, name) = (self.services.metrics.clone(), spec.name.to_string());
            LogBudget::new(spec.limits.log_bytes_per_second, Box::new(move |lines| metrics.log_dropped(&name, lines)))
        };

        let spec_cpu = spec.limits.cpu_millis.map(crate::limits::CpuQuota::new);
        let compiled = CompiledFunction {
            inner: Arc::new(CompiledInner {
                spec,
                digest,
                component,
                pre,
                handler,
                lifecycle,
                events,
                log_sink,
                log_budget,
                caps,
                services: self.services.clone(),
                cpu: spec_cpu,
                fuel,
            }),
            engine: self.engine.clone(),
        };
        Ok((compiled, source))
    }
}

/// One version of a function, compiled and linked, ready to instantiate.
#[derive(Clone)]
pub struct CompiledFunction {
    pub(crate) inner: Arc<CompiledInner>,
    pub(crate) engine: WasmEngine,
}

pub(crate) struct CompiledInner {
    pub(crate) spec: FunctionSpec,
    pub(crate) digest: String,
    #[allow(dead_code, reason = "kept alive with the pre-instance; useful for introspection")]
    pub(crate) component: Component,
    pub(crate) pre: InstancePre<GuestState>,
    pub(crate) handler: Option<ProxyIndices>,
    pub(crate) lifecycle: Option<LifecycleIndices>,
    pub(crate) events: Option<EventsIndices>,
    pub(crate) log_sink: Arc<dyn LogSink>,
    /// The output budget all instances of this version share.
    pub(crate) log_budget: Arc<LogBudget>,
    pub(crate) caps: Arc<FunctionCaps>,
    pub(crate) services: Arc<Services>,
    /// The CPU share all instances of this version share, if limited.
    pub(crate) cpu: Option<Arc<crate::limits::CpuQuota>>,
    /// Whether it runs on the engine that meters fuel.
    pub(crate) fuel: bool,
}

impl CompiledFunction {
    /// The version's CPU quota, if it has a CPU limit.
    pub fn cpu_quota(&self) -> Option<&Arc<crate::limits::CpuQuota>> {
        self.inner.cpu.as_ref()
    }

    /// Whether its requests meter fuel (it runs on the engine with fuel
    /// instrumentation).
    pub fn meters_fuel(&self) -> bool {
        self.inner.fuel
    }

    /// The wasmtime engine its code was compiled for.
    pub fn wasmtime_engine(&self) -> &wasmtime::Engine {
        self.engine.engine(self.inner.fuel)
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.inner.spec.name
    }

    /// The version label.
    pub fn version(&self) -> &str {
        self.inner.spec.version.as_deref().unwrap_or("")
    }

    /// The spec it was deployed with.
    pub fn spec(&self) -> &FunctionSpec {
        &self.inner.spec
    }

    /// The wasm's sha256.
    pub fn digest(&self) -> &str {
        &self.inner.digest
    }

    /// Whether the component exports `shoal:runtime/lifecycle`.
    pub fn has_lifecycle(&self) -> bool {
        self.inner.lifecycle.is_some()
    }

    /// Whether the component exports `shoal:runtime/events` (receives messages).
    pub fn has_events(&self) -> bool {
        self.inner.events.is_some()
    }
}
