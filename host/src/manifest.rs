//! `shoal.toml`: the functions to deploy, their routes, versions and limits.
//!
//! Parsing happens in two stages, as in ripgrep's config: [`Manifest::parse`]
//! reads the TOML into raw structs (unknown fields are errors, so a typo in
//! a limit is never silently ignored), then [`Manifest::resolve`] checks
//! every value and fills in defaults, producing [`FunctionSpec`]s that the
//! registry can deploy as they are.
//!
//! A [`FunctionSpec`] is valid by construction, whichever path made it: its
//! name is a [`FunctionName`], the limits that must never be zero are
//! `NonZero` numbers, and deserializing one (the admin API's deploy body,
//! the registry's file) runs the same [`FunctionSpec::check`] as the
//! manifest does. The registry checks once more what it is handed, so a
//! spec built in code is held to the same rules.
//!
//! ```
//! let toml = r#"
//!     [[function]]
//!     name = "hello"
//!     wasm = "hello.wasm"
//!     routes = ["/hello"]
//!     [function.limits]
//!     timeout_ms = 500
//! "#;
//! let manifest = shoal::manifest::Manifest::parse(toml, "shoal.toml".as_ref()).unwrap();
//! let specs = manifest.resolve().unwrap();
//! assert_eq!(specs[0].limits.timeout.as_millis(), 500);
//! assert_eq!(specs[0].limits.max_concurrency.get(), 100);
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod grants;
mod limits;
mod names;
mod spec;
#[cfg(test)]
mod tests;

pub use grants::*;
pub use limits::*;
pub use names::*;
pub use spec::*;

/// Paths the host answers itself; no function route may claim them.
pub const RESERVED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// A manifest that failed to parse or validate, with the file and the field.
/// Its [`std::error::Error::source`] is the [`ManifestCause`].
#[derive(Debug)]
pub struct ManifestError {
    /// The manifest file (or `<deploy>` for specs handed to the registry).
    pub file: String,
    /// What is wrong, naming the function and field (boxed: a `Result`
    /// carrying it stays small).
    pub cause: Box<ManifestCause>,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.cause)
    }
}

// By hand: the source is the cause itself, not its box, so that
// `downcast_ref::<ManifestCause>()` finds it.
impl std::error::Error for ManifestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.cause)
    }
}

/// What is wrong with a manifest (or a set of specs to deploy).
#[derive(Debug, thiserror::Error)]
pub enum ManifestCause {
    /// The file cannot be read.
    #[error("cannot read manifest: {0}")]
    Read(#[source] std::io::Error),
    /// The text is not TOML, or not the manifest's fields.
    #[error("invalid manifest: {}", .0.to_string().trim_end())]
    Syntax(#[source] toml::de::Error),
    /// There is nothing to deploy.
    #[error("no [[function]] entries")]
    NoFunctions,
    /// The manifest's `tenant` is not a valid tenant name.
    #[error("tenant: {0}")]
    Tenant(#[source] NameError),
    /// One function's entry is invalid.
    #[error(transparent)]
    Function(#[from] InvalidFunction),
    /// The entries of a function do not make a valid set of versions.
    #[error(transparent)]
    Versions(#[from] VersionsError),
    /// A deployed function of another tenant has the name.
    #[error("function {function:?} belongs to tenant {owner:?}; tenant {tenant:?} cannot replace it")]
    OtherTenants {
        /// The function.
        function: String,
        /// The tenant it belongs to.
        owner: String,
        /// The tenant deploying it.
        tenant: String,
    },
}

impl ManifestError {
    fn new(file: &Path, cause: impl Into<ManifestCause>) -> ManifestError {
        ManifestError { file: file.display().to_string(), cause: Box::new(cause.into()) }
    }
}

/// A parsed, not yet validated `shoal.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The tenant every function of this manifest belongs to (default:
    /// [`TenantName::DEFAULT`]).
    tenant: Option<String>,
    #[serde(default, rename = "function")]
    functions: Vec<RawFunction>,
    #[serde(skip)]
    file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    name: String,
    wasm: PathBuf,
    version: Option<String>,
    #[serde(default)]
    routes: Vec<String>,
    weight: Option<u32>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    grants: RawGrants,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrants {
    #[serde(default)]
    keyvalue: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    invoke: Vec<String>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    outbound_http: Vec<String>,
    #[serde(default)]
    files: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    fuel_per_request: Option<u64>,
    timeout_ms: Option<u64>,
    memory_mb: Option<u64>,
    max_concurrency: Option<u32>,
    queue_timeout_ms: Option<u64>,
    idle_timeout_s: Option<u64>,
    start_timeout_ms: Option<u64>,
    destroy_timeout_ms: Option<u64>,
    kv_max_key_bytes: Option<usize>,
    kv_max_value_bytes: Option<usize>,
    message_max_bytes: Option<usize>,
    abi_calls_per_second: Option<u32>,
    publish_per_second: Option<u32>,
    log_bytes_per_second: Option<u32>,
    max_request_bytes: Option<u64>,
    cpu_millis: Option<u32>,
    max_requests_per_instance: Option<u32>,
    instance_concurrency: Option<u32>,
    invoke_timeout_ms: Option<u64>,
    call_retries: Option<u32>,
    breaker_failures: Option<u32>,
    breaker_cooldown_ms: Option<u64>,
}

impl Manifest {
    /// Read and parse a manifest file, or `shoal.toml` inside a folder.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let file = if path.is_dir() { path.join("shoal.toml") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|err| ManifestError::new(&file, ManifestCause::Read(err)))?;
        Manifest::parse(&text, &file)
    }

    /// Parse manifest text; `file` names it in errors and anchors relative
    /// `wasm` paths.
    pub fn parse(text: &str, file: &Path) -> Result<Manifest, ManifestError> {
        let mut manifest: Manifest =
            toml::from_str(text).map_err(|err| ManifestError::new(file, ManifestCause::Syntax(err)))?;
        manifest.file = file.to_path_buf();
        Ok(manifest)
    }

    /// Validate every function and fill in defaults.
    pub fn resolve(&self) -> Result<Vec<FunctionSpec>, ManifestError> {
        let error = |cause: ManifestCause| ManifestError::new(&self.file, cause);
        if self.functions.is_empty() {
            return Err(error(ManifestCause::NoFunctions));
        }
        let base = self.file.parent().unwrap_or(Path::new("."));
        let tenant = match &self.tenant {
            Some(tenant) => TenantName::new(tenant).map_err(|err| error(ManifestCause::Tenant(err)))?,
            None => TenantName::default(),
        };
        let mut specs = Vec::with_capacity(self.functions.len());
        for raw in &self.functions {
            let spec = raw
                .resolve(base, &tenant)
                .map_err(|source| error(InvalidFunction { function: raw.name.clone(), source }.into()))?;
            specs.push(spec);
        }
        check_versions(&specs).map_err(|err| error(err.into()))?;
        Ok(specs)
    }
}

impl RawFunction {
    fn resolve(&self, base: &Path, tenant: &TenantName) -> Result<FunctionSpec, SpecError> {
        let name = FunctionName::new(&self.name)?;
        let routes = self.routes.iter().map(|text| Route::parse(text)).collect::<Result<Vec<_>, _>>()?;
        let wasm = if self.wasm.is_absolute() { self.wasm.clone() } else { base.join(&self.wasm) };
        let spec = FunctionSpec {
            name,
            version: self.version.clone(),
            wasm,
            routes,
            weight: self.weight.unwrap_or(100),
            limits: self.limits.resolve()?,
            grants: self.grants.resolve(base)?,
            tenant: tenant.clone(),
            pod: None,
            env: self.env.clone(),
        };
        spec.check()?;
        Ok(spec)
    }
}

impl RawGrants {
    fn resolve(&self, base: &Path) -> Result<Grants, GrantError> {
        let set = |values: &[String]| values.iter().cloned().collect::<BTreeSet<String>>();
        // Checked with the rest of the spec, by `FunctionSpec::check`.
        Ok(Grants {
            keyvalue: self.keyvalue.iter().map(|text| KeyGrant::parse(text)).collect::<Result<_, _>>()?,
            publish: set(&self.publish),
            subscribe: set(&self.subscribe),
            invoke: set(&self.invoke),
            config: self.config.clone(),
            secrets: set(&self.secrets),
            outbound_http: set(&self.outbound_http),
            files: self.files.iter().map(|text| FileGrant::parse(text, base)).collect::<Result<_, _>>()?,
        })
    }
}

impl RawLimits {
    fn resolve(&self) -> Result<Limits, LimitError> {
        let defaults = Limits::default();
        let ms = |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let memory_bytes = match self.memory_mb {
            Some(mb) if mb > MAX_MEMORY_BYTES >> 20 => {
                return Err(LimitError::memory_over_maximum(mb));
            }
            Some(mb) => mb << 20,
            None => defaults.memory_bytes,
        };
        // Checked with the rest of the spec, by `FunctionSpec::check`.
        Ok(Limits {
            fuel_per_request: match self.fuel_per_request {
                Some(0) => return Err(LimitError::ZeroNotOmitted { field: "fuel_per_request" }),
                fuel => fuel.and_then(NonZeroU64::new),
            },
            timeout: ms(self.timeout_ms, defaults.timeout),
            memory_bytes,
            max_concurrency: non_zero(self.max_concurrency, "max_concurrency", defaults.max_concurrency)?,
            queue_timeout: ms(self.queue_timeout_ms, defaults.queue_timeout),
            idle_timeout: self.idle_timeout_s.map_or(defaults.idle_timeout, Duration::from_secs),
            start_timeout: ms(self.start_timeout_ms, defaults.start_timeout),
            destroy_timeout: ms(self.destroy_timeout_ms, defaults.destroy_timeout),
            max_request_bytes: self.max_request_bytes.unwrap_or(defaults.max_request_bytes),
            kv_max_key_bytes: self.kv_max_key_bytes.unwrap_or(defaults.kv_max_key_bytes),
            kv_max_value_bytes: self.kv_max_value_bytes.unwrap_or(defaults.kv_max_value_bytes),
            message_max_bytes: self.message_max_bytes.unwrap_or(defaults.message_max_bytes),
            abi_calls_per_second: non_zero(
                self.abi_calls_per_second,
                "abi_calls_per_second",
                defaults.abi_calls_per_second,
            )?,
            publish_per_second: non_zero(self.publish_per_second, "publish_per_second", defaults.publish_per_second)?,
            log_bytes_per_second: non_zero(
                self.log_bytes_per_second,
                "log_bytes_per_second",
                defaults.log_bytes_per_second,
            )?,
            cpu_millis: match self.cpu_millis {
                Some(0) => return Err(LimitError::ZeroNotOmitted { field: "cpu_millis" }),
                millis => millis.and_then(NonZeroU32::new),
            },
            max_requests_per_instance: match self.max_requests_per_instance {
                Some(0) => return Err(LimitError::ZeroNotOmitted { field: "max_requests_per_instance" }),
                count => count.and_then(NonZeroU32::new),
            },
            instance_concurrency: match self.instance_concurrency {
                Some(0) => return Err(LimitError::ZeroNotOmitted { field: "instance_concurrency" }),
                count => count.and_then(NonZeroU32::new),
            },
            invoke_timeout: ms(self.invoke_timeout_ms, defaults.invoke_timeout),
            call_retries: self.call_retries.unwrap_or(defaults.call_retries),
            breaker_failures: non_zero(self.breaker_failures, "breaker_failures", defaults.breaker_failures)?,
            breaker_cooldown: ms(self.breaker_cooldown_ms, defaults.breaker_cooldown),
        })
    }
}

fn non_zero(value: Option<u32>, field: &'static str, default: NonZeroU32) -> Result<NonZeroU32, LimitError> {
    match value {
        Some(value) => NonZeroU32::new(value).ok_or(LimitError::Zero { field }),
        None => Ok(default),
    }
}
