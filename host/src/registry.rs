//! Deployed functions: their versions, traffic weights and routes, kept on
//! disk so a restarted host serves the same functions.
//!
//! Changes (deploy, undeploy) are applied atomically: everything in a
//! deploy is compiled and instantiated on trial first, outside any lock (a
//! slow compile or `start` of one tenant's function delays no one else's
//! deploy or undeploy); then, under one async mutex, the new state is
//! checked again, written to disk, and only then is the route table
//! swapped.
//! Requests read the table through a short `RwLock` read of an `Arc`, so no
//! lock is held across a request, and a request that already picked a
//! version finishes on it while new requests go to the new one; the old
//! version's pool drains in the background and runs `destroy` on its
//! instances.
//!
//! On disk (under the state directory): `registry.json` (the specs) and
//! `wasm/<sha256>.wasm` (the modules), both written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::engine::{CompileSource, sha256_hex, write_atomically};
use crate::function::Loader;
use crate::instance::Instance;
use crate::logs::LogSink;
use crate::manifest::{FunctionSpec, Limits, ManifestCause, ManifestError, Route, TenantName, check_versions};
use crate::metrics::Metrics;
use crate::pool::{FunctionPool, PoolStats};

/// One version to deploy: its spec and its wasm.
#[derive(Clone)]
pub struct DeployItem {
    /// The validated spec.
    pub spec: FunctionSpec,
    /// The wasm bytes.
    pub wasm: Arc<[u8]>,
}

/// What a deploy did for one version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployReport {
    /// The function.
    pub function: String,
    /// The version.
    pub version: String,
    /// The wasm's sha256.
    pub digest: String,
    /// `compiled`, `cache` (compiled code reused from disk) or `unchanged`
    /// (already deployed as is; warm instances kept).
    pub source: String,
}

/// A deployed function as `shoal ls` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionInfo {
    /// The name.
    pub name: String,
    /// Its routes.
    pub routes: Vec<String>,
    /// Its versions with their weights and instance counts.
    pub versions: Vec<VersionInfo>,
}

/// One deployed version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version label.
    pub version: String,
    /// The wasm's sha256.
    pub digest: String,
    /// Traffic weight.
    pub weight: u32,
    /// Whether it exports lifecycle hooks.
    pub lifecycle: bool,
    /// Instance counters.
    pub stats: PoolStats,
    /// Whose code new instances get: `optimized` (Cranelift), `metered`
    /// (Cranelift, with fuel) or `baseline` (Winch, until Cranelift's is
    /// ready).
    #[serde(default)]
    pub code: String,
    /// Its limits.
    pub limits: Limits,
}

#[derive(Clone)]
struct Deployed {
    versions: Vec<Arc<FunctionPool>>,
}

impl Deployed {
    fn routes(&self) -> &[Route] {
        self.versions.first().map_or(&[], |pool| &pool.function().spec().routes)
    }
}

/// Where requests for one function go: its versions and their weights.
pub struct Target {
    name: String,
    versions: Vec<(Arc<FunctionPool>, u64)>,
    total_weight: u64,
}

impl Target {
    fn new(name: &str, deployed: &Deployed) -> Target {
        let mut total_weight = 0;
        let versions = deployed
            .versions
            .iter()
            .filter(|pool| pool.function().spec().weight > 0)
            .map(|pool| {
                total_weight += u64::from(pool.function().spec().weight);
                (pool.clone(), total_weight)
            })
            .collect();
        Target { name: name.to_string(), versions, total_weight }
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Choose a version, at random in proportion to the weights.
    pub fn pools(&self) -> impl Iterator<Item = &Arc<FunctionPool>> {
        self.versions.iter().map(|(pool, _)| pool)
    }

    /// A version, picked by weight.
    pub fn pick(&self) -> &Arc<FunctionPool> {
        let ticket = rand::random_range(0..self.total_weight.max(1));
        let index = self.versions.partition_point(|(_, upto)| *upto <= ticket);
        &self.versions[index.min(self.versions.len() - 1)].0
    }
}

/// Routes resolved to values: the one place where Shoal's routing rules
/// live. Routes naming the request's host are tried first (as virtual
/// hosts; the request's port is ignored, names compare case-insensitively),
/// then host-less ones; within each, the longest prefix wins, and prefixes
/// match whole path segments (`/hello` serves `/hello/x`, not `/helloworld`).
struct RouteMap<T> {
    /// Routes naming a host: by host, then by prefix.
    by_host: HashMap<String, HashMap<String, T>>,
    /// Routes for any host, by prefix.
    any_host: HashMap<String, T>,
}

impl<T> Default for RouteMap<T> {
    fn default() -> Self {
        RouteMap { by_host: HashMap::new(), any_host: HashMap::new() }
    }
}

impl<T> RouteMap<T> {
    fn insert(&mut self, route: &Route, value: T) {
        let routes = match &route.host {
            Some(host) => self.by_host.entry(host.clone()).or_default(),
            None => &mut self.any_host,
        };
        routes.insert(route.prefix.clone(), value);
    }

    /// Looked up on every request, so without allocating: the maps are
    /// keyed by host and by prefix apart, each found by a borrowed `&str`,
    /// and a host is lowercased into a new string only when it has
    /// uppercase letters.
    fn lookup(&self, host: Option<&str>, path: &str) -> Option<&T> {
        if !self.by_host.is_empty()
            && let Some(host) = host
        {
            let name = host.rsplit_once(':').map_or(host, |(name, _port)| name);
            let name: std::borrow::Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                name.to_ascii_lowercase().into()
            } else {
                name.into()
            };
            if let Some(value) = self.by_host.get(name.as_ref()).and_then(|routes| longest_prefix(routes, path)) {
                return Some(value);
            }
        }
        longest_prefix(&self.any_host, path)
    }
}

/// The value of the longest prefix of `path` in `routes`, cutting whole
/// segments off its end (`/a/b`, then `/a`, then `/`).
fn longest_prefix<'a, T>(routes: &'a HashMap<String, T>, path: &str) -> Option<&'a T> {
    let mut prefix = path;
    loop {
        if prefix.is_empty() {
            return routes.get("/");
        }
        if let Some(value) = routes.get(prefix) {
            return Some(value);
        }
        prefix = &prefix[..prefix.rfind('/').unwrap_or(0)];
    }
}

/// Routes and names resolved to targets; immutable, swapped whole.
#[derive(Default)]
struct RouteTable {
    routes: RouteMap<Arc<Target>>,
    by_name: HashMap<String, Arc<Target>>,
    /// (tenant, name it is invoked by) → the functions answering to it
    /// (several pods of one Deployment on a node share a container name).
    by_service: HashMap<(TenantName, String), Vec<Arc<Target>>>,
}

impl RouteTable {
    fn build(functions: &BTreeMap<String, Deployed>) -> RouteTable {
        let mut table = RouteTable::default();
        for (name, deployed) in functions {
            let target = Arc::new(Target::new(name, deployed));
            for route in deployed.routes() {
                table.routes.insert(route, target.clone());
            }
            if let Some(pool) = deployed.versions.first() {
                let spec = pool.function().spec();
                let key = (spec.tenant.clone(), spec.service_name().to_string());
                table.by_service.entry(key).or_default().push(target.clone());
            }
            table.by_name.insert(name.clone(), target);
        }
        table
    }

    fn lookup(&self, host: Option<&str>, path: &str) -> Option<Arc<Target>> {
        self.routes.lookup(host, path).cloned()
    }
}

#[derive(Serialize, Deserialize)]
struct PersistedRegistry {
    functions: Vec<PersistedVersion>,
}

#[derive(Clone, Serialize, Deserialize)]
struct PersistedVersion {
    spec: FunctionSpec,
    digest: String,
}

/// The deployed functions of a host.
pub struct Registry {
    loader: Loader,
    metrics: Arc<Metrics>,
    log_sink: Arc<dyn LogSink>,
    state_dir: Option<PathBuf>,
    drain_timeout: Duration,
    functions: tokio::sync::Mutex<BTreeMap<String, Deployed>>,
    table: RwLock<Arc<RouteTable>>,
    /// Persisted versions that failed to load at startup: kept on disk (so
    /// nothing deployed is lost) until a deploy of the same name replaces
    /// them or they are undeployed.
    unrestored: std::sync::Mutex<Vec<PersistedVersion>>,
    /// Bumped on every change of the deployed set (the event trigger watches it).
    generation: tokio::sync::watch::Sender<u64>,
    /// The generation whose subscriptions the event trigger has attached.
    applied: tokio::sync::watch::Sender<u64>,
    /// Whether an event trigger follows this registry (then deploys wait
    /// for it, so a message published right after a deploy is not missed).
    trigger_attached: std::sync::atomic::AtomicBool,
    /// Wakes the idle reaper when the deployed set changes or a pool makes
    /// an instance (see [`Registry::reaper_woken`]).
    reaper: Arc<tokio::sync::Notify>,
}

impl Registry {
    /// An empty registry; `state_dir` (if any) is where it persists.
    pub fn new(
        loader: Loader,
        metrics: Arc<Metrics>,
        log_sink: Arc<dyn LogSink>,
        state_dir: Option<PathBuf>,
        drain_timeout: Duration,
    ) -> Result<Registry, Error> {
        if let Some(dir) = &state_dir {
            std::fs::create_dir_all(dir.join("wasm")).map_err(Error::io(dir.join("wasm")))?;
        }
        Ok(Registry {
            loader,
            metrics,
            log_sink,
            state_dir,
            drain_timeout,
            functions: tokio::sync::Mutex::new(BTreeMap::new()),
            table: RwLock::new(Arc::new(RouteTable::default())),
            unrestored: std::sync::Mutex::new(Vec::new()),
            generation: tokio::sync::watch::channel(0).0,
            applied: tokio::sync::watch::channel(0).0,
            trigger_attached: std::sync::atomic::AtomicBool::new(false),
            reaper: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Wait until a deploy (or undeploy) changes the functions, or a pool
    /// makes an instance: the idle reaper plans around the `idle_timeout`s
    /// of the functions with instances, and sleeps while none has any (a
    /// change before the wait began is not lost).
    pub async fn reaper_woken(&self) {
        self.reaper.notified().await;
    }

    /// Redeploy what the state directory holds. A function that no longer
    /// loads is reported and skipped; the others are served.
    pub async fn restore(&self) -> Result<Vec<DeployReport>, Error> {
        let Some(dir) = &self.state_dir else { return Ok(Vec::new()) };
        let path = dir.join("registry.json");
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(Error::io(&path)(err)),
        };
        let persisted: PersistedRegistry =
            serde_json::from_slice(&text).map_err(|err| anyhow::anyhow!("{} is corrupt: {err}", path.display()))?;
        let mut by_name: BTreeMap<String, Vec<PersistedVersion>> = BTreeMap::new();
        for version in persisted.functions {
            by_name.entry(version.spec.name.to_string()).or_default().push(version);
        }
        let mut reports = Vec::new();
        for (name, versions) in by_name {
            let mut items = Vec::new();
            for version in &versions {
                let blob = dir.join("wasm").join(format!("{}.wasm", version.digest));
                match std::fs::read(&blob) {
                    Ok(wasm) => items.push(DeployItem { spec: version.spec.clone(), wasm: wasm.into() }),
                    Err(err) => {
                        tracing::error!(function = %name, path = %blob.display(), error = %err,
                            "cannot restore function: its wasm is unreadable");
                        break;
                    }
                }
            }
            let result = if items.len() == versions.len() {
                self.deploy_versions(items, Deploying::Restored).await
            } else {
                Err(Error::Internal(anyhow::anyhow!("wasm missing")))
            };
            match result {
                Ok(mut report) => reports.append(&mut report),
                Err(err) => {
                    tracing::error!(function = %name, error = %err,
                        "cannot restore function; it stays on disk and can be redeployed");
                    self.lock_unrestored().extend(versions);
                }
            }
        }
        Ok(reports)
    }

    /// Deploy versions. For each function named, its set of versions
    /// becomes exactly the versions given: a version already deployed
    /// unchanged keeps its warm instances; versions no longer listed drain.
    /// All or nothing: on error, nothing changed.
    pub async fn deploy(&self, items: Vec<DeployItem>) -> Result<Vec<DeployReport>, Error> {
        self.deploy_versions(items, Deploying::New).await
    }

    /// Deploy versions another host process was serving (a node host's
    /// hand-over): as [`Registry::deploy`], but with no trial instance —
    /// each was tried when it was first deployed, and a `start` failing
    /// now (a backend down for a moment) must not end a running pod.
    pub async fn adopt(&self, items: Vec<DeployItem>) -> Result<Vec<DeployReport>, Error> {
        self.deploy_versions(items, Deploying::Adopted).await
    }

    async fn deploy_versions(&self, items: Vec<DeployItem>, how: Deploying) -> Result<Vec<DeployReport>, Error> {
        let persist = how == Deploying::New;
        let mut specs: Vec<FunctionSpec> = items.iter().map(|item| item.spec.clone()).collect();
        // The same checks as the manifest's, whoever built the spec.
        for spec in &specs {
            spec.check_named().map_err(refused)?;
        }
        check_versions(&specs).map_err(refused)?;
        let digests: Vec<String> = items.iter().map(|item| sha256_hex(&item.wasm)).collect();
        for (spec, digest) in specs.iter_mut().zip(&digests) {
            let version = spec.version.clone().unwrap_or_else(|| default_version(digest, &spec.limits));
            spec.version = Some(version);
        }

        // Compile and instantiate on trial outside the registry's lock: a
        // function whose compile or `start` takes its whole budget holds
        // no other tenant's create, stop or resize. What is deployed
        // unchanged is reused, as it was when the deploy began.
        let before = self.functions.lock().await.clone();
        check_owners(&before, &specs)?;
        let mut prepared: Vec<Option<(Arc<FunctionPool>, &'static str)>> = Vec::with_capacity(items.len());
        let mut blobs = Vec::new();
        for ((item, spec), digest) in items.iter().zip(&specs).zip(&digests) {
            if existing_pool(&before, spec, digest).is_some() {
                prepared.push(None);
                continue;
            }
            let (compiled, source) =
                self.loader.prepare(spec.clone(), item.wasm.clone(), digest.clone(), self.log_sink.clone()).await?;
            // Instantiate once on trial: a function that cannot is refused
            // here, naming it, never at its first request.
            if how != Deploying::Adopted {
                Instance::trial(&compiled).await?;
            }
            let source = match source {
                CompileSource::Compiled => "compiled",
                CompileSource::Cache => "cache",
                CompileSource::Baseline => "baseline",
            };
            blobs.push((digest.clone(), item.wasm.clone()));
            prepared.push(Some((FunctionPool::new(compiled, self.metrics.clone(), self.reaper.clone()), source)));
        }
        if prepared.iter().flatten().any(|(_, source)| *source != "cache") {
            // Off the request threads: trimming walks every arena.
            tokio::task::spawn_blocking(crate::engine::release_freed_memory);
        }

        let mut functions = self.functions.lock().await;
        // Checked again: another deploy may have changed owners meanwhile.
        check_owners(&functions, &specs)?;
        let mut next = functions.clone();
        let mut reports = Vec::new();
        let mut new_versions: BTreeMap<String, Vec<Arc<FunctionPool>>> = BTreeMap::new();
        for (((item, spec), digest), prepared) in items.iter().zip(&specs).zip(digests).zip(prepared) {
            let (pool, source) = match (existing_pool(&functions, spec, &digest), prepared) {
                (Some(pool), _) => (pool.clone(), "unchanged"),
                (None, Some(prepared)) => prepared,
                // Deployed as is when the deploy began, and gone since (a
                // concurrent undeploy): compiled now, under the lock (rare).
                (None, None) => {
                    let (compiled, _) = self
                        .loader
                        .prepare(spec.clone(), item.wasm.clone(), digest.clone(), self.log_sink.clone())
                        .await?;
                    if how != Deploying::Adopted {
                        Instance::trial(&compiled).await?;
                    }
                    blobs.push((digest.clone(), item.wasm.clone()));
                    (FunctionPool::new(compiled, self.metrics.clone(), self.reaper.clone()), "compiled")
                }
            };
            new_versions.entry(spec.name.to_string()).or_default().push(pool);
            let version = spec.version.clone().unwrap_or_default();
            reports.push(DeployReport { function: spec.name.to_string(), version, digest, source: source.to_string() });
        }
        for (name, versions) in new_versions {
            next.insert(name, Deployed { versions });
        }
        check_routes(&next)?;
        if persist {
            self.lock_unrestored().retain(|version| !next.contains_key(version.spec.name.as_str()));
            self.persist(&next, &blobs)?;
        }

        let retired = retired_pools(&functions, &next);
        *functions = next;
        let generation = self.swap_table(&functions);
        drop(functions);
        self.wait_applied(generation).await;
        for pool in retired {
            let timeout = self.drain_timeout;
            let metrics = self.metrics.clone();
            tokio::spawn(async move {
                pool.drain(timeout).await;
                metrics.forget_instances(pool.function().name(), pool.function().version());
            });
        }
        Ok(reports)
    }

    /// Remove a function. Waits (up to the drain timeout) for its instances
    /// to finish their requests and run `destroy`.
    pub async fn undeploy(&self, name: &str) -> Result<FunctionInfo, Error> {
        let mut functions = self.functions.lock().await;
        let Some(deployed) = functions.get(name).cloned() else {
            let had = {
                let mut unrestored = self.lock_unrestored();
                let before = unrestored.len();
                unrestored.retain(|version| version.spec.name != name);
                before != unrestored.len()
            };
            if had {
                self.persist(&functions, &[])?;
                return Ok(FunctionInfo { name: name.to_string(), routes: Vec::new(), versions: Vec::new() });
            }
            return Err(Error::UnknownFunction { name: name.to_string() });
        };
        let mut next = functions.clone();
        next.remove(name);
        self.persist(&next, &[])?;
        *functions = next;
        let generation = self.swap_table(&functions);
        drop(functions);
        self.wait_applied(generation).await;
        let info = info(name, &deployed);
        for pool in &deployed.versions {
            pool.drain(self.drain_timeout).await;
        }
        self.metrics.forget_function(name);
        Ok(info)
    }

    /// Remove a function at once (a container killed with SIGKILL): no
    /// draining, no `destroy`.
    pub async fn kill(&self, name: &str) -> Result<(), Error> {
        let mut functions = self.functions.lock().await;
        let Some(deployed) = functions.remove(name) else {
            return Err(Error::UnknownFunction { name: name.to_string() });
        };
        self.persist(&functions, &[])?;
        self.swap_table(&functions);
        drop(functions);
        for pool in &deployed.versions {
            pool.discard();
        }
        self.metrics.forget_function(name);
        Ok(())
    }

    /// Pause (or resume) every version of a function: new requests wait
    /// (see [`FunctionPool::set_paused`]). A version deployed later starts
    /// unpaused.
    pub fn set_paused(&self, name: &str, paused: bool) -> Result<(), Error> {
        let target = self.by_name(name).ok_or_else(|| Error::UnknownFunction { name: name.to_string() })?;
        for pool in target.pools() {
            pool.set_paused(paused);
        }
        Ok(())
    }

    /// Every deployed function.
    pub async fn list(&self) -> Vec<FunctionInfo> {
        let functions = self.functions.lock().await;
        functions.iter().map(|(name, deployed)| info(name, deployed)).collect()
    }

    /// The target serving `path` on `host`, if any.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<Arc<Target>> {
        self.current_table().lookup(host, path)
    }

    /// The engine functions are compiled with.
    pub fn engine(&self) -> &crate::engine::WasmEngine {
        self.loader.engine()
    }

    /// The target for a function by name.
    pub fn by_name(&self, name: &str) -> Option<Arc<Target>> {
        self.current_table().by_name.get(name).cloned()
    }

    /// The function tenant `tenant` calls `name` (`invoke`): one of the
    /// tenant's functions answering to that name (a pod's container name,
    /// or a function's own name), never another tenant's. Several answer
    /// when several pods of one Deployment run here: one is picked at
    /// random.
    pub fn by_service(&self, tenant: &TenantName, name: &str) -> Option<Arc<Target>> {
        let table = self.current_table();
        if let Some(targets) = table.by_service.get(&(tenant.clone(), name.to_string()))
            && !targets.is_empty()
        {
            return Some(targets[rand::random_range(0..targets.len())].clone());
        }
        let target = table.by_name.get(name)?;
        let owner = &target.versions.first()?.0.function().spec().tenant;
        (owner == tenant).then(|| target.clone())
    }

    /// Every pool (for the idle reaper).
    pub fn pools(&self) -> Vec<Arc<FunctionPool>> {
        let table = self.current_table();
        table.by_name.values().flat_map(|target| target.versions.iter().map(|(pool, _)| pool.clone())).collect()
    }

    /// Drain every function (host shutdown): requests finish, `destroy`
    /// runs. Nothing is removed from disk.
    pub async fn drain_all(&self, timeout: Duration) {
        let functions = self.functions.lock().await;
        let drains = functions.values().flat_map(|deployed| deployed.versions.iter()).map(|pool| pool.drain(timeout));
        futures_util::future::join_all(drains).await;
    }

    fn lock_unrestored(&self) -> std::sync::MutexGuard<'_, Vec<PersistedVersion>> {
        self.unrestored.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current_table(&self) -> Arc<RouteTable> {
        self.table.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn swap_table(&self, functions: &BTreeMap<String, Deployed>) -> u64 {
        let table = Arc::new(RouteTable::build(functions));
        *self.table.write().unwrap_or_else(std::sync::PoisonError::into_inner) = table;
        self.generation.send_modify(|generation| *generation += 1);
        // After the swap: the reaper plans with the new functions.
        self.reaper.notify_one();
        *self.generation.borrow()
    }

    /// A receiver that changes whenever functions are deployed or removed;
    /// the caller becomes the event trigger that [`Registry::mark_applied`]
    /// reports to.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.trigger_attached.store(true, std::sync::atomic::Ordering::Release);
        self.generation.subscribe()
    }

    /// The event trigger has attached the subscriptions of `generation`.
    pub fn mark_applied(&self, generation: u64) {
        self.applied.send_modify(|applied| *applied = (*applied).max(generation));
    }

    /// Wait (bounded) until the event trigger caught up with `generation`.
    async fn wait_applied(&self, generation: u64) {
        if !self.trigger_attached.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut applied = self.applied.subscribe();
        let caught_up = applied.wait_for(|applied| *applied >= generation);
        if tokio::time::timeout(Duration::from_secs(5), caught_up).await.is_err() {
            tracing::warn!(generation, "the event trigger is slow to attach subscriptions");
        }
    }

    /// `(function, topic)` for every subscription of the deployed
    /// functions: their `subscribe` grants, when some version exports
    /// `shoal:runtime/events`; the topic as the broker knows it (scoped to
    /// the function's tenant).
    pub fn subscriptions(&self) -> Vec<(String, String)> {
        let table = self.current_table();
        let mut subscriptions = Vec::new();
        for (name, target) in &table.by_name {
            let Some((pool, _)) = target.versions.iter().find(|(pool, _)| pool.function().has_events()) else {
                continue;
            };
            let spec = pool.function().spec();
            for topic in &spec.grants.subscribe {
                subscriptions.push((name.clone(), spec.tenant.scope(topic)));
            }
        }
        subscriptions.sort();
        subscriptions
    }

    fn persist(&self, functions: &BTreeMap<String, Deployed>, blobs: &[(String, Arc<[u8]>)]) -> Result<(), Error> {
        let Some(dir) = &self.state_dir else { return Ok(()) };
        for (digest, wasm) in blobs {
            let path = dir.join("wasm").join(format!("{digest}.wasm"));
            if !path.exists() {
                write_atomically(&path, wasm).map_err(Error::io(&path))?;
            }
        }
        let persisted = PersistedRegistry {
            functions: functions
                .values()
                .flat_map(|deployed| deployed.versions.iter())
                .map(|pool| PersistedVersion {
                    spec: pool.function().spec().clone(),
                    digest: pool.function().digest().to_string(),
                })
                .chain(self.lock_unrestored().iter().cloned())
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&persisted).map_err(anyhow::Error::from)?;
        let path = dir.join("registry.json");
        write_atomically(&path, &json).map_err(Error::io(&path))
    }
}

/// The default version label: the wasm's digest and the limits, hashed, so
/// changing either makes a new version.
fn default_version(digest: &str, limits: &Limits) -> String {
    let limits = serde_json::to_string(limits).unwrap_or_default();
    sha256_hex(format!("{digest}\n{limits}").as_bytes())[..12].to_string()
}

fn check_routes(functions: &BTreeMap<String, Deployed>) -> Result<(), Error> {
    let mut owners: HashMap<&Route, &str> = HashMap::new();
    for (name, deployed) in functions {
        for route in deployed.routes() {
            if let Some(owner) = owners.insert(route, name) {
                return Err(Error::RouteConflict {
                    route: route.to_string(),
                    function: name.clone(),
                    owner: owner.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Where the versions of a deploy come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deploying {
    /// Asked for now: tried, then kept on disk.
    New,
    /// Read back from disk at start: tried, not written again.
    Restored,
    /// Taken over from another host process: neither tried nor written.
    Adopted,
}

/// A refusal of a deploy, in the manifest's terms.
fn refused(cause: impl Into<ManifestCause>) -> ManifestError {
    ManifestError { file: "<deploy>".into(), cause: Box::new(cause.into()) }
}

/// A function belongs to one tenant: no deploy hands another tenant's
/// function (its name, its routes) to a new owner.
fn check_owners(functions: &BTreeMap<String, Deployed>, specs: &[FunctionSpec]) -> Result<(), Error> {
    for spec in specs {
        if let Some(deployed) = functions.get(spec.name.as_str())
            && let Some(owner) = deployed.versions.first().map(|pool| pool.function().spec().tenant.clone())
            && owner != spec.tenant
        {
            return Err(refused(ManifestCause::OtherTenants {
                function: spec.name.to_string(),
                owner: owner.to_string(),
                tenant: spec.tenant.to_string(),
            })
            .into());
        }
    }
    Ok(())
}

/// The pool already serving `spec` with the wasm of `digest`, if any.
fn existing_pool<'a>(
    functions: &'a BTreeMap<String, Deployed>,
    spec: &FunctionSpec,
    digest: &str,
) -> Option<&'a Arc<FunctionPool>> {
    functions
        .get(spec.name.as_str())?
        .versions
        .iter()
        .find(|pool| pool.function().spec() == spec && pool.function().digest() == digest)
}

fn retired_pools(before: &BTreeMap<String, Deployed>, after: &BTreeMap<String, Deployed>) -> Vec<Arc<FunctionPool>> {
    before
        .iter()
        .flat_map(|(name, deployed)| deployed.versions.iter().map(move |pool| (name, pool)))
        .filter(|(name, pool)| {
            !after.get(*name).is_some_and(|deployed| deployed.versions.iter().any(|kept| Arc::ptr_eq(kept, pool)))
        })
        .map(|(_, pool)| pool.clone())
        .collect()
}

fn info(name: &str, deployed: &Deployed) -> FunctionInfo {
    FunctionInfo {
        name: name.to_string(),
        routes: deployed.routes().iter().map(Route::to_string).collect(),
        versions: deployed
            .versions
            .iter()
            .map(|pool| {
                let function = pool.function();
                VersionInfo {
                    version: function.version().to_string(),
                    digest: function.digest().to_string(),
                    weight: function.spec().weight,
                    lifecycle: function.has_lifecycle(),
                    stats: pool.stats(),
                    code: function.tier().as_str().to_string(),
                    limits: function.spec().limits.clone(),
                }
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;
