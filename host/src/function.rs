//! Turning a deployed spec and its wasm into something ready to instantiate.
//!
//! [`Loader`] holds the engine and the process's [`Linker`]s (WASI 0.2,
//! `wasi:http` and the Runtime ABI), built once per wasmtime engine: one
//! for functions without fuel, one for those that meter it, one for
//! Winch's baseline code; and two more (WASI 0.3 and `wasi:http@0.3` on
//! top) for WASI 0.3 components, on engines with the component model's
//! concurrency, built when the first such component comes.
//!
//! **Tiering up.** Cranelift takes ≈80 ms of one core for a small Rust
//! component; Winch a third of that. A function without fuel whose wasm
//! has never been compiled is served from Winch's code, and Cranelift
//! compiles it in the background (one compile at a time); when that is
//! done the version's [`Code`] is swapped: new instances come from the
//! optimized code, and instances of the baseline code are retired (with
//! `destroy`) as their requests end. Cranelift's code goes to the cache,
//! so the next deploy of the same wasm loads it directly. [`Loader::prepare`] checks the wasm,
//! compiles it (or loads it from the cache), links it into an
//! [`InstancePre`] and finds the HTTP handler and the optional lifecycle
//! hooks. (The trial instantiation that completes the checks of a deploy
//! is [`crate::instance::Instance::trial`], one layer up.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime_wasi_http::p2::bindings::ProxyIndices;
use wasmtime_wasi_http::p3::bindings::ServiceIndices;

use crate::Error;
use crate::abi::bindings::exports::shoal::runtime::events::GuestIndices as EventsIndices;
use crate::abi::bindings::exports::shoal::runtime::lifecycle::GuestIndices as LifecycleIndices;
use crate::abi::{FunctionCaps, Services};
use crate::engine::{CompileSource, Flavor, WasmEngine};
use crate::guest::GuestState;
use crate::logs::{LogBudget, LogSink};
use crate::manifest::FunctionSpec;

/// The engine and linkers shared by every function of a host.
#[derive(Clone)]
pub struct Loader {
    engine: WasmEngine,
    /// For the fuel-free engine, for the one that meters fuel, for
    /// Winch's (if the host tiers up), and for the two concurrent engines
    /// (built on first use); by [`Tier`].
    linkers: Arc<[std::sync::OnceLock<Option<Linker<GuestState>>>; 5]>,
    services: Arc<Services>,
    /// Background compiles to optimized code: one at a time.
    optimizing: Arc<tokio::sync::Semaphore>,
    /// The code of every digest and tier in use, shared by every function
    /// and version of the same wasm (held weakly: it goes with its last
    /// user).
    shared: Arc<Mutex<SharedCode>>,
}

/// Linked code by (wasm digest, tier).
#[derive(Default)]
struct SharedCode {
    codes: HashMap<(String, Tier), Weak<Code>>,
    /// Inserts since dead entries were last dropped.
    inserts: usize,
}

impl SharedCode {
    fn get(&self, digest: &str, tier: Tier) -> Option<Arc<Code>> {
        self.codes.get(&(digest.to_string(), tier)).and_then(Weak::upgrade)
    }

    /// Share `code`, or the code another deploy shared first.
    fn share(&mut self, digest: &str, code: Code) -> Arc<Code> {
        let key = (digest.to_string(), code.tier);
        if let Some(existing) = self.codes.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        self.inserts += 1;
        if self.inserts >= 256 {
            self.codes.retain(|_, code| code.strong_count() > 0);
            self.inserts = 0;
        }
        let code = Arc::new(code);
        self.codes.insert(key, Arc::downgrade(&code));
        code
    }
}

/// Which compiler's code, for which engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Cranelift's, without fuel.
    Optimized,
    /// Cranelift's, metering fuel.
    Metered,
    /// Winch's quick code, until Cranelift's is ready.
    Baseline,
    /// Cranelift's, without fuel, for a WASI 0.3 component.
    Concurrent,
    /// Cranelift's, metering fuel, for a WASI 0.3 component.
    ConcurrentMetered,
}

impl Tier {
    /// Its name in `shoal ls` and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Optimized => "optimized",
            Tier::Metered => "metered",
            Tier::Baseline => "baseline",
            Tier::Concurrent => "optimized, concurrent",
            Tier::ConcurrentMetered => "metered, concurrent",
        }
    }

    /// The engine its code is for (the baseline one aside).
    fn flavor(self) -> Flavor {
        Flavor {
            fuel: matches!(self, Tier::Metered | Tier::ConcurrentMetered),
            concurrent: matches!(self, Tier::Concurrent | Tier::ConcurrentMetered),
        }
    }
}

/// How a component answers HTTP requests.
pub(crate) enum HttpHandler {
    /// `wasi:http/incoming-handler@0.2`: one request per call.
    P2(ProxyIndices),
    /// `wasi:http/handler@0.3`: an async export, on a concurrent engine.
    P3(ServiceIndices),
}

/// Whether a component imports or exports a WASI 0.3 interface (any
/// `wasi:…@0.3.x`), so it needs the component model's concurrency. Only
/// the top-level names are read; nothing is compiled.
pub fn uses_wasi_0_3(wasm: &[u8]) -> Result<bool, wasmparser::BinaryReaderError> {
    let is_0_3 = |name: &str| name.starts_with("wasi:") && name.contains("@0.3.");
    let mut depth = 0u32;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload? {
            wasmparser::Payload::ModuleSection { .. } | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) if depth == 0 => break,
            wasmparser::Payload::End(_) => depth -= 1,
            wasmparser::Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    if is_0_3(import?.name.name) {
                        return Ok(true);
                    }
                }
            }
            wasmparser::Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    if is_0_3(export?.name.name) {
                        return Ok(true);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

impl Loader {
    /// Link WASI 0.2, `wasi:http` and the Runtime ABI once for all functions.
    pub fn new(engine: WasmEngine, services: Arc<Services>) -> anyhow::Result<Loader> {
        let linkers: Arc<[std::sync::OnceLock<Option<Linker<GuestState>>>; 5]> = Arc::default();
        let eager = [
            (Tier::Optimized, Some(engine.engine(false))),
            (Tier::Metered, Some(engine.engine(true))),
            (Tier::Baseline, engine.baseline()),
        ];
        for (tier, engine) in eager {
            let _ = linkers[tier as usize].set(engine.map(|engine| link(engine, false)).transpose()?);
        }
        Ok(Loader {
            engine,
            linkers,
            services,
            optimizing: Arc::new(tokio::sync::Semaphore::new(1)),
            shared: Arc::default(),
        })
    }

    fn lock_shared(&self) -> std::sync::MutexGuard<'_, SharedCode> {
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The linker of `tier`'s engine (the concurrent ones' on first use).
    fn linker(&self, tier: Tier) -> anyhow::Result<&Linker<GuestState>> {
        let slot = &self.linkers[tier as usize];
        if let Some(linker) = slot.get() {
            return linker.as_ref().ok_or_else(|| anyhow::anyhow!("this host has no {} code", tier.as_str()));
        }
        let built = link(self.engine.engine_for(tier.flavor())?, true)?;
        Ok(slot.get_or_init(|| Some(built)).as_ref().expect("invariant: set just now"))
    }

    /// Link `component` (compiled for `tier`'s engine) and find its exports.
    fn link(&self, component: Component, tier: Tier, function: &str) -> Result<Code, Error> {
        let failed = |source: anyhow::Error| Error::Link { function: function.to_string(), source };
        let linker = self.linker(tier).map_err(failed)?;
        let pre = linker.instantiate_pre(&component).map_err(|err| failed(err.into()))?;
        let handler = match tier.flavor().concurrent {
            false => ProxyIndices::new(&pre).ok().map(HttpHandler::P2),
            true => ServiceIndices::new(&pre).ok().map(HttpHandler::P3),
        };
        let lifecycle = LifecycleIndices::new(&pre).ok();
        let events = EventsIndices::new(&pre).ok();
        Ok(Code { pre, handler, lifecycle, events, tier })
    }

    /// Compile `function`'s wasm with Cranelift in the background and swap
    /// its code when done (see the module docs).
    fn tier_up(&self, function: &CompiledFunction, wasm: Arc<[u8]>) {
        let (runtime, target) = (self.clone(), Arc::downgrade(&function.inner));
        let (name, digest) = (function.name().to_string(), function.digest().to_string());
        tokio::spawn(async move {
            let Ok(_turn) = runtime.optimizing.clone().acquire_owned().await else { return };
            // Undeployed while waiting for its turn: nothing to do.
            let Some(inner) = target.upgrade() else { return };
            // Another function of the same wasm tiered up first: share its code.
            if let Some(code) = runtime.lock_shared().get(&digest, Tier::Optimized) {
                *inner.code.write().unwrap_or_else(std::sync::PoisonError::into_inner) = code;
                tracing::info!(function = %name, "optimized code in place (shared)");
                return;
            }
            drop(inner);
            let started = std::time::Instant::now();
            let engine = runtime.engine.clone();
            let digest_key = digest.clone();
            let flavor = Flavor { fuel: false, concurrent: false };
            let compiled = tokio::task::spawn_blocking(move || engine.load(&wasm, &digest, flavor)).await;
            let compile_ms = started.elapsed().as_millis() as u64;
            let Some(inner) = target.upgrade() else { return };
            let component = match compiled {
                Ok(Ok((component, _))) => component,
                Ok(Err(err)) => {
                    tracing::warn!(function = %name, error = %format!("{err:#}"), "Cranelift cannot compile what Winch did; the baseline code keeps serving");
                    return;
                }
                Err(err) => {
                    tracing::warn!(function = %name, error = %err, "the optimizing compile failed; the baseline code keeps serving");
                    return;
                }
            };
            match runtime.link(component, Tier::Optimized, &name) {
                Ok(code) => {
                    let code = runtime.lock_shared().share(&digest_key, code);
                    *inner.code.write().unwrap_or_else(std::sync::PoisonError::into_inner) = code;
                    tracing::info!(function = %name, compile_ms, "optimized code in place");
                }
                Err(err) => tracing::warn!(function = %name, error = %err, "cannot link the optimized code"),
            }
            tokio::task::spawn_blocking(crate::engine::release_freed_memory);
        });
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
                source: anyhow::anyhow!("not a WebAssembly binary (bad magic number or version)"),
            });
        }

        // Compiling takes milliseconds to seconds of CPU: keep it off the
        // threads that serve requests.
        let fuel = self.engine.meters_fuel(spec.limits.fuel_per_request.is_some());
        let concurrent = uses_wasi_0_3(&wasm)
            .map_err(|err| Error::InvalidWasm { function: function.clone(), source: err.into() })?;
        let tier = match (concurrent, fuel) {
            (false, false) => Tier::Optimized,
            (false, true) => Tier::Metered,
            (true, false) => Tier::Concurrent,
            (true, true) => Tier::ConcurrentMetered,
        };
        let shared = {
            let shared = self.lock_shared();
            // The baseline code of wasm still tiering up is shared too; the
            // tier-up of this function then finds Cranelift's in the map.
            shared
                .get(&digest, tier)
                .or_else(|| (tier == Tier::Optimized).then(|| shared.get(&digest, Tier::Baseline)).flatten())
        };
        let (code, source) = match shared {
            Some(code) if code.tier == Tier::Baseline => (code, CompileSource::Baseline),
            Some(code) => (code, CompileSource::Cache),
            None => {
                let (code, source) = self.compile(&function, &wasm, &digest, tier).await?;
                (self.lock_shared().share(&digest, code), source)
            }
        };
        // A function serves HTTP, receives messages, or both.
        if code.handler.is_none() && (code.events.is_none() || !spec.routes.is_empty()) {
            return Err(Error::MissingHandler { function });
        }
        let instance_concurrency = match (&code.handler, spec.limits.instance_concurrency) {
            (Some(HttpHandler::P3(_)), asked) => {
                asked.map_or(crate::manifest::DEFAULT_INSTANCE_CONCURRENCY, std::num::NonZeroU32::get)
            }
            (_, Some(asked)) if asked.get() > 1 => {
                return Err(Error::LimitUnsupported {
                    function,
                    reason: format!(
                        "instance_concurrency = {asked} needs a WASI 0.3 HTTP handler (wasi:http/handler@0.3), \
                         whose calls are async and can share an instance; this component's handler takes one \
                         request per instance at a time (leave instance_concurrency out, or set 1)"
                    ),
                });
            }
            _ => 1,
        };
        let tier = code.tier;
        let caps = FunctionCaps::new(&spec);
        let log_budget = {
            let (metrics, name) = (self.services.metrics.clone(), spec.name.to_string());
            LogBudget::new(spec.limits.log_bytes_per_second, Box::new(move |lines| metrics.log_dropped(&name, lines)))
        };

        let spec_cpu = spec.limits.cpu_millis.map(crate::limits::CpuQuota::new);
        let (has_lifecycle, has_events) = (code.lifecycle.is_some(), code.events.is_some());
        let compiled = CompiledFunction {
            inner: Arc::new(CompiledInner {
                spec,
                digest,
                code: std::sync::RwLock::new(code),
                has_lifecycle,
                has_events,
                log_sink,
                log_budget,
                caps,
                services: self.services.clone(),
                cpu: spec_cpu,
                fuel,
                instance_concurrency,
            }),
            engine: self.engine.clone(),
        };
        if tier == Tier::Baseline {
            self.tier_up(&compiled, wasm);
        }
        Ok((compiled, source))
    }

    /// Load `wasm` from the cache or compile it (with Winch first when it
    /// tiers up), and link it.
    async fn compile(
        &self,
        function: &str,
        wasm: &Arc<[u8]>,
        digest: &str,
        tier: Tier,
    ) -> Result<(Code, CompileSource), Error> {
        let flavor = tier.flavor();
        let engine = self.engine.clone();
        let (component, tier, source) = {
            let digest = digest.to_string();
            let wasm = wasm.clone();
            let name = function.to_string();
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                if let Some(component) = engine.cached(&digest, flavor) {
                    return Ok((component, tier, CompileSource::Cache));
                }
                if tier == Tier::Optimized {
                    let started = std::time::Instant::now();
                    match engine.compile_baseline(&wasm) {
                        Ok(Some(component)) => {
                            let compile_ms = started.elapsed().as_millis() as u64;
                            tracing::info!(function = %name, compile_ms, "baseline code compiled");
                            return Ok((component, Tier::Baseline, CompileSource::Baseline));
                        }
                        Ok(None) => {}
                        // Winch lacks some wasm features Cranelift has.
                        Err(err) => tracing::info!(function = %name, error = %format!("{err:#}"), "Winch cannot compile it; compiling with Cranelift now"),
                    }
                }
                Ok((engine.compile(&wasm, &digest, flavor)?, tier, CompileSource::Compiled))
            })
            .await
            .map_err(|err| anyhow::anyhow!("compile task failed: {err}"))?
            .map_err(|err| Error::InvalidWasm { function: function.to_string(), source: err })?
        };
        Ok((self.link(component, tier, function)?, source))
    }
}

/// The linker for functions on `engine`: WASI 0.2 (Shoal's files in place
/// of wasi:filesystem's), `wasi:http` 0.2 and the Runtime ABI; with
/// `concurrent`, WASI 0.3's cli, clocks, filesystem (its opens checked as
/// 0.2's: regular files and directories only, [`crate::files`]), random
/// and sockets, `wasi:http@0.3` and the ABI's async calls too (Rust's
/// standard library still imports WASI 0.2 from a 0.3 component).
fn link(engine: &wasmtime::Engine, concurrent: bool) -> anyhow::Result<Linker<GuestState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    crate::files::add_to_linker(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    crate::abi::add_to_linker(&mut linker)?;
    if concurrent {
        wasmtime_wasi::p3::cli::add_to_linker(&mut linker)?;
        wasmtime_wasi::p3::clocks::add_to_linker(&mut linker)?;
        crate::files::add_p3_to_linker(&mut linker)?;
        wasmtime_wasi::p3::random::add_to_linker(&mut linker)?;
        wasmtime_wasi::p3::sockets::add_to_linker(&mut linker)?;
        wasmtime_wasi_http::p3::add_to_linker(&mut linker)?;
        crate::abi::add_concurrent_to_linker(&mut linker)?;
    }
    Ok(linker)
}

/// One version of a function, compiled and linked, ready to instantiate.
#[derive(Clone)]
pub struct CompiledFunction {
    pub(crate) inner: Arc<CompiledInner>,
    pub(crate) engine: WasmEngine,
}

/// A version's compiled and linked code: what its instances are made of.
/// (The pre-instance holds the component and the engine it was compiled
/// for; stores must come from that engine.)
pub(crate) struct Code {
    pub(crate) pre: InstancePre<GuestState>,
    pub(crate) handler: Option<HttpHandler>,
    pub(crate) lifecycle: Option<LifecycleIndices>,
    pub(crate) events: Option<EventsIndices>,
    pub(crate) tier: Tier,
}

pub(crate) struct CompiledInner {
    pub(crate) spec: FunctionSpec,
    pub(crate) digest: String,
    /// Swapped once, from Winch's code to Cranelift's (see the module docs).
    pub(crate) code: std::sync::RwLock<Arc<Code>>,
    has_lifecycle: bool,
    has_events: bool,
    pub(crate) log_sink: Arc<dyn LogSink>,
    /// The output budget all instances of this version share.
    pub(crate) log_budget: Arc<LogBudget>,
    pub(crate) caps: Arc<FunctionCaps>,
    pub(crate) services: Arc<Services>,
    /// The CPU share all instances of this version share, if limited.
    pub(crate) cpu: Option<Arc<crate::limits::CpuQuota>>,
    /// Whether it runs on the engine that meters fuel.
    pub(crate) fuel: bool,
    /// Requests one instance serves at once.
    instance_concurrency: u32,
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

    /// Requests one of its instances serves at once: its
    /// `instance_concurrency` (16 when a WASI 0.3 HTTP handler leaves it
    /// out), 1 for every other function.
    pub fn instance_concurrency(&self) -> u32 {
        self.inner.instance_concurrency
    }

    /// Its code now (new instances are made of it).
    pub(crate) fn code(&self) -> Arc<Code> {
        self.inner.code.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether `code` is its code now (not code replaced since). Called on
    /// every acquire and release: compares under the read lock, no clone.
    pub(crate) fn is_current(&self, code: &Arc<Code>) -> bool {
        Arc::ptr_eq(code, &self.inner.code.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Which compiler's code new instances get.
    pub fn tier(&self) -> Tier {
        self.code().tier
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
        self.inner.has_lifecycle
    }

    /// Whether the component exports `shoal:runtime/events` (receives messages).
    pub fn has_events(&self) -> bool {
        self.inner.has_events
    }
}
