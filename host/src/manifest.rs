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

/// Paths the host answers itself; no function route may claim them.
pub const RESERVED_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// A manifest that failed to parse or validate, with the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ManifestError {
    /// The manifest file (or `<request>` when sent over the admin API).
    pub file: String,
    /// What is wrong, naming the function and field.
    pub message: String,
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
}

/// A function's name: lowercase letters, digits and `-`, 1 to 63 long,
/// starting with a letter (so it is also a valid DNS label and metric
/// label). A value of this type is always valid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FunctionName(String);

impl FunctionName {
    /// Check `name` and wrap it.
    pub fn new(name: &str) -> Result<FunctionName, String> {
        validate_name(name)?;
        Ok(FunctionName(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FunctionName {
    type Error = String;

    fn try_from(name: String) -> Result<FunctionName, String> {
        validate_name(&name)?;
        Ok(FunctionName(name))
    }
}

impl From<FunctionName> for String {
    fn from(name: FunctionName) -> String {
        name.0
    }
}

impl std::ops::Deref for FunctionName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for FunctionName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for FunctionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for FunctionName {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for FunctionName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// One deployable version of a function, validated and with defaults filled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SpecFields")]
pub struct FunctionSpec {
    /// The function's name.
    pub name: FunctionName,
    /// The version label; `None` until the wasm is read, then defaults to the
    /// first 12 hex digits of the wasm's sha256.
    pub version: Option<String>,
    /// Where the wasm is, as given (resolved against the manifest's folder).
    pub wasm: PathBuf,
    /// HTTP routes: `/prefix` or `host/prefix`.
    pub routes: Vec<Route>,
    /// Share of the function's traffic this version gets, relative to the
    /// weights of the function's other versions.
    pub weight: u32,
    /// Resource limits.
    pub limits: Limits,
    /// What the function may touch through the Runtime ABI.
    #[serde(default)]
    pub grants: Grants,
    /// Whose function this is: every resource it names (buckets, topics,
    /// invoke targets) is resolved inside this tenant.
    #[serde(default)]
    pub tenant: TenantName,
    /// The pod and container it runs for, when Kubernetes made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodIdentity>,
    /// The function's environment (`wasi:cli/environment`), also readable
    /// through `wasi:config`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

/// A [`FunctionSpec`] as it arrives, before [`FunctionSpec::check`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFields {
    name: FunctionName,
    version: Option<String>,
    wasm: PathBuf,
    routes: Vec<Route>,
    weight: u32,
    limits: Limits,
    #[serde(default)]
    grants: Grants,
    #[serde(default)]
    tenant: TenantName,
    #[serde(default)]
    pod: Option<PodIdentity>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

impl TryFrom<SpecFields> for FunctionSpec {
    type Error = String;

    fn try_from(fields: SpecFields) -> Result<FunctionSpec, String> {
        let SpecFields { name, version, wasm, routes, weight, limits, grants, tenant, pod, env } = fields;
        let spec = FunctionSpec { name, version, wasm, routes, weight, limits, grants, tenant, pod, env };
        spec.check().map_err(|message| format!("function {:?}: {message}", spec.name.as_str()))?;
        Ok(spec)
    }
}

impl FunctionSpec {
    /// Check what the types alone cannot: the version label, routes (well
    /// formed, none reserved), limits in range and grants well formed.
    /// Every path into the registry runs this.
    pub fn check(&self) -> Result<(), String> {
        if let Some(version) = &self.version {
            validate_version(version)?;
        }
        for route in &self.routes {
            let text = route.to_string();
            if Route::parse(&text).as_ref() != Ok(route) {
                return Err(format!("route {text:?} is not in normal form (a path prefix starting with `/`)"));
            }
            if RESERVED_PATHS.contains(&route.prefix.as_str()) {
                return Err(format!("route {text:?} is reserved for the host"));
            }
        }
        self.limits.check()?;
        self.grants.check()?;
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(format!("env: invalid variable {name:?}"));
            }
        }
        Ok(())
    }

    /// The name other functions of its tenant call it by (`invoke`): the
    /// Kubernetes container name when a pod made it, else its own name.
    pub fn service_name(&self) -> &str {
        self.pod.as_ref().map_or(self.name.as_str(), |pod| pod.container.as_str())
    }
}

/// A tenant: in Kubernetes the pod's namespace, else the manifest's
/// `tenant` (default `default`). A Kubernetes namespace name (a DNS label:
/// 1-63 lowercase letters, digits and `-`, starting and ending with a
/// letter or digit); a value of this type is always valid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantName(String);

impl TenantName {
    /// The tenant of functions that name none.
    pub const DEFAULT: &'static str = "default";

    /// Check `name` and wrap it.
    pub fn new(name: &str) -> Result<TenantName, String> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if ok {
            Ok(TenantName(name.to_string()))
        } else {
            Err(format!("invalid tenant {name:?}: use 1-63 lowercase letters, digits and '-' (a namespace name)"))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name a backend stores a tenant's bucket or topic `name` under:
    /// `name` itself for the default tenant (so a single-tenant host keeps
    /// its state), `tenant/name` for every other. Bucket and topic names
    /// never contain `/` ([`Grants::check`]) and tenant names never do, so
    /// two tenants never share a scoped name.
    pub fn scope(&self, name: &str) -> String {
        if self.0 == Self::DEFAULT { name.to_string() } else { format!("{}/{name}", self.0) }
    }

    /// The name a tenant knows `scoped` by (the inverse of [`Self::scope`]).
    pub fn unscope<'a>(&self, scoped: &'a str) -> &'a str {
        if self.0 == Self::DEFAULT {
            return scoped;
        }
        scoped.strip_prefix(self.0.as_str()).and_then(|rest| rest.strip_prefix('/')).unwrap_or(scoped)
    }
}

impl Default for TenantName {
    fn default() -> Self {
        TenantName(Self::DEFAULT.to_string())
    }
}

impl TryFrom<String> for TenantName {
    type Error = String;

    fn try_from(name: String) -> Result<TenantName, String> {
        TenantName::new(&name)
    }
}

impl From<TenantName> for String {
    fn from(name: TenantName) -> String {
        name.0
    }
}

impl std::fmt::Display for TenantName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The pod and container a function runs for, as the CRI names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentity {
    /// The pod's name.
    pub pod: String,
    /// The pod's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The container's name in the pod spec (the name `invoke` finds it by).
    pub container: String,
}

/// A host directory the function sees at `guest` (`wasi:filesystem`),
/// confined to it: nothing above or beside it is reachable, symlinks
/// included.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the function sees it (absolute).
    pub guest: String,
    /// Whether the function may only read it.
    pub read_only: bool,
    /// What kind of volume it is (Kubernetes mounts); `secret` volumes
    /// also serve `shoal:runtime/secrets`.
    #[serde(default)]
    pub kind: VolumeKind,
}

/// Where a [`FileGrant`] comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeKind {
    /// A folder named in the manifest, or a mount of no known kind.
    #[default]
    Directory,
    /// A Kubernetes Secret volume.
    Secret,
    /// A Kubernetes ConfigMap volume.
    ConfigMap,
    /// A Kubernetes projected volume.
    Projected,
    /// A Kubernetes emptyDir volume.
    EmptyDir,
}

impl FileGrant {
    /// Parse `host:guest[:ro|:rw]` (read-write unless `:ro`), a relative
    /// host path taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<FileGrant, String> {
        let usage =
            || format!("grants.files entry {text:?}: write \"host-dir:/guest/path\" or \"host-dir:/guest/path:ro\"");
        let mut parts = text.split(':');
        let (Some(host), Some(guest)) = (parts.next(), parts.next()) else { return Err(usage()) };
        let read_only = match parts.next() {
            None | Some("rw") => false,
            Some("ro") => true,
            Some(_) => return Err(usage()),
        };
        if parts.next().is_some() || host.is_empty() {
            return Err(usage());
        }
        let host = Path::new(host);
        let host = if host.is_absolute() { host.to_path_buf() } else { base.join(host) };
        let grant = FileGrant { host, guest: guest.to_string(), read_only, kind: VolumeKind::Directory };
        grant.check()?;
        Ok(grant)
    }

    /// The guest path is absolute and plain; the host path absolute.
    pub fn check(&self) -> Result<(), String> {
        let guest = Path::new(&self.guest);
        let plain = guest.is_absolute()
            && guest
                .components()
                .all(|part| matches!(part, std::path::Component::RootDir | std::path::Component::Normal(_)));
        if !plain {
            return Err(format!("grants.files: the guest path {:?} must be absolute, without `..`", self.guest));
        }
        if !self.host.is_absolute() {
            return Err(format!("grants.files: the host path {} must be absolute", self.host.display()));
        }
        Ok(())
    }
}

/// Capabilities granted to a function. Everything not listed is denied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// Key-value access: bucket and key pattern.
    pub keyvalue: Vec<KeyGrant>,
    /// Topics it may publish to.
    pub publish: BTreeSet<String>,
    /// Topics whose messages it receives.
    pub subscribe: BTreeSet<String>,
    /// Functions it may invoke.
    pub invoke: BTreeSet<String>,
    /// Configuration values it is given (and may read).
    pub config: BTreeMap<String, String>,
    /// Secrets it may read.
    pub secrets: BTreeSet<String>,
    /// Outbound HTTP authorities (`host:port`) it may call.
    pub outbound_http: BTreeSet<String>,
    /// Host directories it sees through `wasi:filesystem`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileGrant>,
}

/// `bucket:pattern`: a pattern ending in `*` grants every key with that
/// prefix; any other pattern grants exactly that key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyGrant {
    /// The bucket.
    pub bucket: String,
    /// The key, or the prefix when `prefix` is set.
    pub key: String,
    /// Whether `key` is a prefix.
    pub prefix: bool,
}

impl KeyGrant {
    /// Parse `bucket:pattern`.
    pub fn parse(text: &str) -> Result<KeyGrant, String> {
        let (bucket, pattern) = text
            .split_once(':')
            .ok_or_else(|| format!("grants.keyvalue entry {text:?}: write \"bucket:key\" or \"bucket:prefix*\""))?;
        if bucket.is_empty() {
            return Err(format!("grants.keyvalue entry {text:?} names no bucket"));
        }
        let (key, prefix) = match pattern.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (pattern, false),
        };
        if key.contains('*') {
            return Err(format!("grants.keyvalue entry {text:?}: `*` may only end the pattern"));
        }
        Ok(KeyGrant { bucket: bucket.to_string(), key: key.to_string(), prefix })
    }

    /// Whether this grant covers `key` in `bucket`.
    pub fn allows(&self, bucket: &str, key: &str) -> bool {
        self.bucket == bucket && if self.prefix { key.starts_with(&self.key) } else { key == self.key }
    }
}

impl std::fmt::Display for KeyGrant {
    /// As written: `bucket:key` or `bucket:prefix*`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}{}", self.bucket, self.key, if self.prefix { "*" } else { "" })
    }
}

impl Grants {
    /// Check every entry: names non-empty, without whitespace and at most
    /// 255 bytes; invoke targets valid function names; outbound authorities
    /// `host:port`; key grants well formed.
    pub fn check(&self) -> Result<(), String> {
        let names = |field: &str, values: &BTreeSet<String>| -> Result<(), String> {
            match values
                .iter()
                .find(|value| value.is_empty() || value.len() > 255 || value.contains(char::is_whitespace))
            {
                Some(value) => Err(format!("grants.{field}: invalid entry {value:?}")),
                None => Ok(()),
            }
        };
        names("publish", &self.publish)?;
        names("subscribe", &self.subscribe)?;
        // Tenants' topics and buckets are told apart by `/`
        // (`TenantName::scope`): no name of a tenant's own may contain one.
        for (field, topics) in [("publish", &self.publish), ("subscribe", &self.subscribe)] {
            if let Some(topic) = topics.iter().find(|topic| topic.contains('/')) {
                return Err(format!("grants.{field}: topic {topic:?} may not contain `/`"));
            }
        }
        names("secrets", &self.secrets)?;
        names("invoke", &self.invoke)?;
        for name in &self.invoke {
            validate_name(name).map_err(|err| format!("grants.invoke: {err}"))?;
        }
        names("outbound_http", &self.outbound_http)?;
        for authority in &self.outbound_http {
            let valid =
                authority.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(format!("grants.outbound_http: {authority:?} must be host:port"));
            }
        }
        for grant in &self.keyvalue {
            if grant.bucket.is_empty() || grant.key.contains('*') || grant.bucket.contains(':') {
                return Err(format!("grants.keyvalue entry {grant:?}: write \"bucket:key\" or \"bucket:prefix*\""));
            }
            if grant.bucket.contains('/') {
                return Err(format!("grants.keyvalue: bucket {:?} may not contain `/`", grant.bucket));
            }
        }
        for grant in &self.files {
            grant.check()?;
        }
        Ok(())
    }

    /// Whether any grant names `bucket`.
    pub fn opens_bucket(&self, bucket: &str) -> bool {
        self.keyvalue.iter().any(|grant| grant.bucket == bucket)
    }

    /// Whether `key` in `bucket` is granted.
    pub fn allows_key(&self, bucket: &str, key: &str) -> bool {
        self.keyvalue.iter().any(|grant| grant.allows(bucket, key))
    }
}

/// Where HTTP requests for a function come from: an optional `Host` and a
/// path prefix (matched by the registry on `/` boundaries: `/hello` serves
/// `/hello/x`, not `/hellothere`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Route {
    /// Match only requests for this host (case-insensitive, port ignored).
    pub host: Option<String>,
    /// Path prefix, starting with `/`.
    pub prefix: String,
}

impl Route {
    /// Parse `"/prefix"` or `"host/prefix"`.
    pub fn parse(text: &str) -> Result<Route, String> {
        let (host, prefix) = match text.find('/') {
            Some(0) => (None, text),
            Some(at) => (Some(text[..at].to_ascii_lowercase()), &text[at..]),
            None => return Err(format!("route {text:?} has no path; write \"/{text}\" or \"{text}/\"")),
        };
        if prefix.contains(['?', '#', ' ']) {
            return Err(format!("route {text:?}: a route is a path prefix, without query or spaces"));
        }
        let prefix = if prefix.len() > 1 { prefix.trim_end_matches('/') } else { prefix };
        let prefix = if prefix.is_empty() { "/" } else { prefix };
        Ok(Route { host, prefix: prefix.to_string() })
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Some(host) => write!(f, "{host}{}", self.prefix),
            None => f.write_str(&self.prefix),
        }
    }
}

/// Per-function resource limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) one request may burn; `None`: unlimited.
    #[serde(default, deserialize_with = "non_zero_field::fuel_per_request")]
    pub fuel_per_request: Option<NonZeroU64>,
    /// Wall-clock time one request may take.
    #[serde(with = "humantime_serde_ms")]
    pub timeout: Duration,
    /// Linear memory one instance may hold, in bytes.
    pub memory_bytes: u64,
    /// Requests served at once; the rest wait up to `queue_timeout`.
    #[serde(deserialize_with = "non_zero_field::max_concurrency")]
    pub max_concurrency: NonZeroU32,
    /// How long a request waits for a free slot before a 503.
    #[serde(with = "humantime_serde_ms")]
    pub queue_timeout: Duration,
    /// An instance idle this long is destroyed (scale to zero).
    #[serde(with = "humantime_serde_ms")]
    pub idle_timeout: Duration,
    /// Time limit for the `start` hook.
    #[serde(with = "humantime_serde_ms")]
    pub start_timeout: Duration,
    /// Time limit for the `destroy` hook.
    #[serde(with = "humantime_serde_ms")]
    pub destroy_timeout: Duration,
    /// Largest HTTP request body, in bytes; past it the client gets 413
    /// (at once when the length is declared, else when the body passes it).
    #[serde(default = "defaults::max_request_bytes")]
    pub max_request_bytes: u64,
    /// Longest key-value key.
    #[serde(default = "defaults::kv_max_key_bytes")]
    pub kv_max_key_bytes: usize,
    /// Largest key-value value.
    #[serde(default = "defaults::kv_max_value_bytes")]
    pub kv_max_value_bytes: usize,
    /// Largest published message (and invoke request/response body).
    #[serde(default = "defaults::message_max_bytes")]
    pub message_max_bytes: usize,
    /// Runtime ABI calls per second, across the function's instances.
    #[serde(default = "defaults::abi_calls_per_second", deserialize_with = "non_zero_field::abi_calls_per_second")]
    pub abi_calls_per_second: NonZeroU32,
    /// Messages published per second, across the function's instances.
    #[serde(default = "defaults::publish_per_second", deserialize_with = "non_zero_field::publish_per_second")]
    pub publish_per_second: NonZeroU32,
    /// Bytes of stdout and stderr per second, across the function's
    /// instances; lines past it are dropped and counted.
    #[serde(default = "defaults::log_bytes_per_second", deserialize_with = "non_zero_field::log_bytes_per_second")]
    pub log_bytes_per_second: NonZeroU32,
    /// CPU time per second of wall time, in thousandths of a core, across
    /// the function's instances (Kubernetes' `resources.limits.cpu`);
    /// `None`: no limit. Past it, the function's calls wait for the next
    /// 100 ms period instead of running.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "non_zero_field::cpu_millis")]
    pub cpu_millis: Option<NonZeroU32>,
    /// Requests (and messages) one instance serves before it is retired:
    /// its `destroy` runs and the next request gets a fresh instance.
    /// `None`: no limit. For guests whose runtime keeps each request's
    /// state in the instance, e.g. JavaScript built with componentize-js
    /// (StarlingMonkey answers one request per instance), set 1.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "non_zero_field::max_requests_per_instance"
    )]
    pub max_requests_per_instance: Option<NonZeroU32>,
}

/// Deserializing the `NonZero` limits with an error that names the field
/// (serde's own says only "expected a nonzero u32").
mod non_zero_field {
    use std::num::{NonZeroU32, NonZeroU64};

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};

    fn non_zero<'de, D: Deserializer<'de>>(deserializer: D, field: &str) -> Result<NonZeroU32, D::Error> {
        let value = u32::deserialize(deserializer)?;
        NonZeroU32::new(value).ok_or_else(|| D::Error::custom(format!("limits.{field} must be greater than 0")))
    }

    pub fn max_concurrency<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "max_concurrency")
    }

    pub fn abi_calls_per_second<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "abi_calls_per_second")
    }

    pub fn publish_per_second<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "publish_per_second")
    }

    pub fn log_bytes_per_second<'de, D: Deserializer<'de>>(deserializer: D) -> Result<NonZeroU32, D::Error> {
        non_zero(deserializer, "log_bytes_per_second")
    }

    pub fn cpu_millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<NonZeroU32>, D::Error> {
        match Option::<u32>::deserialize(deserializer)? {
            None => Ok(None),
            Some(millis) => NonZeroU32::new(millis)
                .map(Some)
                .ok_or_else(|| D::Error::custom("limits.cpu_millis must be greater than 0 (omit it for no limit)")),
        }
    }

    pub fn max_requests_per_instance<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<NonZeroU32>, D::Error> {
        match Option::<u32>::deserialize(deserializer)? {
            None => Ok(None),
            Some(count) => NonZeroU32::new(count).map(Some).ok_or_else(|| {
                D::Error::custom("limits.max_requests_per_instance must be greater than 0 (omit it for no limit)")
            }),
        }
    }

    pub fn fuel_per_request<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<NonZeroU64>, D::Error> {
        match Option::<u64>::deserialize(deserializer)? {
            None => Ok(None),
            Some(fuel) => NonZeroU64::new(fuel).map(Some).ok_or_else(|| {
                D::Error::custom("limits.fuel_per_request must be greater than 0 (omit it for no limit)")
            }),
        }
    }
}

mod defaults {
    use std::num::NonZeroU32;

    pub fn max_request_bytes() -> u64 {
        10 << 20
    }
    pub fn kv_max_key_bytes() -> usize {
        1024
    }
    pub fn kv_max_value_bytes() -> usize {
        1 << 20
    }
    pub fn message_max_bytes() -> usize {
        256 << 10
    }
    pub fn abi_calls_per_second() -> NonZeroU32 {
        NonZeroU32::new(100_000).expect("invariant: not zero")
    }
    pub fn publish_per_second() -> NonZeroU32 {
        NonZeroU32::new(1_000).expect("invariant: not zero")
    }
    pub fn log_bytes_per_second() -> NonZeroU32 {
        NonZeroU32::new(256 << 10).expect("invariant: not zero")
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel_per_request: None,
            timeout: Duration::from_secs(10),
            memory_bytes: 64 << 20,
            max_concurrency: NonZeroU32::new(100).expect("invariant: not zero"),
            queue_timeout: Duration::from_millis(1000),
            idle_timeout: Duration::from_secs(30),
            start_timeout: Duration::from_secs(5),
            destroy_timeout: Duration::from_secs(2),
            max_request_bytes: defaults::max_request_bytes(),
            kv_max_key_bytes: defaults::kv_max_key_bytes(),
            kv_max_value_bytes: defaults::kv_max_value_bytes(),
            message_max_bytes: defaults::message_max_bytes(),
            abi_calls_per_second: defaults::abi_calls_per_second(),
            publish_per_second: defaults::publish_per_second(),
            log_bytes_per_second: defaults::log_bytes_per_second(),
            cpu_millis: None,
            max_requests_per_instance: None,
        }
    }
}

impl Limits {
    /// Check what the types alone cannot: durations and sizes above zero,
    /// memory within what the engine reserves per slot.
    pub fn check(&self) -> Result<(), String> {
        let durations = [
            ("timeout_ms", self.timeout),
            ("idle_timeout_s", self.idle_timeout),
            ("start_timeout_ms", self.start_timeout),
            ("destroy_timeout_ms", self.destroy_timeout),
        ];
        if let Some((field, _)) = durations.iter().find(|(_, value)| value.is_zero()) {
            return Err(format!("limits.{field} must be greater than 0"));
        }
        // Every time a function (or a pod, through its annotations) sets is
        // bounded: a `start` or a queue that may wait for ever holds what it
        // holds for ever.
        let bounded = [
            ("timeout_ms", self.timeout, MAX_TIMEOUT),
            ("queue_timeout_ms", self.queue_timeout, MAX_HOOK_OR_QUEUE_TIMEOUT),
            ("start_timeout_ms", self.start_timeout, MAX_HOOK_OR_QUEUE_TIMEOUT),
            ("destroy_timeout_ms", self.destroy_timeout, MAX_HOOK_OR_QUEUE_TIMEOUT),
            ("idle_timeout_s", self.idle_timeout, MAX_IDLE_TIMEOUT),
        ];
        if let Some((field, value, max)) = bounded.iter().find(|(_, value, max)| value > max) {
            return Err(format!(
                "limits.{field} = {} is over the host's maximum of {}",
                humantime::format_duration(*value),
                humantime::format_duration(*max)
            ));
        }
        if self.memory_bytes == 0 {
            return Err("limits.memory_mb must be greater than 0".to_string());
        }
        if self.memory_bytes > MAX_MEMORY_BYTES {
            return Err(format!(
                "limits.memory_mb = {} is over the host's maximum of {} MiB",
                self.memory_bytes >> 20,
                MAX_MEMORY_BYTES >> 20
            ));
        }
        if self.max_request_bytes == 0 {
            return Err("limits.max_request_bytes must be greater than 0".to_string());
        }
        let sizes = [
            ("kv_max_key_bytes", self.kv_max_key_bytes),
            ("kv_max_value_bytes", self.kv_max_value_bytes),
            ("message_max_bytes", self.message_max_bytes),
        ];
        if let Some((field, _)) = sizes.iter().find(|(_, value)| *value == 0) {
            return Err(format!("limits.{field} must be greater than 0"));
        }
        Ok(())
    }
}

/// Largest linear memory a function may ask for; the engine's pool reserves
/// address space for this much per memory slot.
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// Longest `timeout_ms` (a request's wall time): 15 minutes, as Lambda's.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Longest `start_timeout_ms`, `destroy_timeout_ms` and `queue_timeout_ms`.
pub const MAX_HOOK_OR_QUEUE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Longest `idle_timeout_s`: a day.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Durations are kept in the registry file as whole milliseconds.
mod humantime_serde_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(value.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

impl Manifest {
    /// Read and parse a manifest file, or `shoal.toml` inside a folder.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let file = if path.is_dir() { path.join("shoal.toml") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|err| ManifestError {
            file: file.display().to_string(),
            message: format!("cannot read manifest: {err}"),
        })?;
        Manifest::parse(&text, &file)
    }

    /// Parse manifest text; `file` names it in errors and anchors relative
    /// `wasm` paths.
    pub fn parse(text: &str, file: &Path) -> Result<Manifest, ManifestError> {
        let mut manifest: Manifest = toml::from_str(text).map_err(|err| ManifestError {
            file: file.display().to_string(),
            message: format!("invalid manifest: {}", err.to_string().trim_end()),
        })?;
        manifest.file = file.to_path_buf();
        Ok(manifest)
    }

    /// Validate every function and fill in defaults.
    pub fn resolve(&self) -> Result<Vec<FunctionSpec>, ManifestError> {
        let error = |message: String| ManifestError { file: self.file.display().to_string(), message };
        if self.functions.is_empty() {
            return Err(error("no [[function]] entries".to_string()));
        }
        let base = self.file.parent().unwrap_or(Path::new("."));
        let tenant = match &self.tenant {
            Some(tenant) => TenantName::new(tenant).map_err(|err| error(format!("tenant: {err}")))?,
            None => TenantName::default(),
        };
        let mut specs = Vec::with_capacity(self.functions.len());
        for raw in &self.functions {
            let spec =
                raw.resolve(base, &tenant).map_err(|message| error(format!("function {:?}: {message}", raw.name)))?;
            specs.push(spec);
        }
        check_versions(&specs).map_err(error)?;
        Ok(specs)
    }
}

impl RawFunction {
    fn resolve(&self, base: &Path, tenant: &TenantName) -> Result<FunctionSpec, String> {
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
    fn resolve(&self, base: &Path) -> Result<Grants, String> {
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
    fn resolve(&self) -> Result<Limits, String> {
        let defaults = Limits::default();
        let ms = |value: Option<u64>, default: Duration| value.map_or(default, Duration::from_millis);
        let memory_bytes = match self.memory_mb {
            Some(mb) if mb > MAX_MEMORY_BYTES >> 20 => {
                return Err(format!(
                    "limits.memory_mb = {mb} is over the host's maximum of {} MiB",
                    MAX_MEMORY_BYTES >> 20
                ));
            }
            Some(mb) => mb << 20,
            None => defaults.memory_bytes,
        };
        // Checked with the rest of the spec, by `FunctionSpec::check`.
        Ok(Limits {
            fuel_per_request: match self.fuel_per_request {
                Some(0) => return Err("limits.fuel_per_request must be greater than 0 (omit it for no limit)".into()),
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
                Some(0) => return Err("limits.cpu_millis must be greater than 0 (omit it for no limit)".into()),
                millis => millis.and_then(NonZeroU32::new),
            },
            max_requests_per_instance: match self.max_requests_per_instance {
                Some(0) => {
                    return Err("limits.max_requests_per_instance must be greater than 0 (omit it for no limit)".into());
                }
                count => count.and_then(NonZeroU32::new),
            },
        })
    }
}

fn non_zero(value: Option<u32>, field: &str, default: NonZeroU32) -> Result<NonZeroU32, String> {
    match value {
        Some(value) => NonZeroU32::new(value).ok_or_else(|| format!("limits.{field} must be greater than 0")),
        None => Ok(default),
    }
}

/// Check a function name: lowercase letters, digits and `-`, 1 to 63 long,
/// starting with a letter (so it is also a valid DNS label and metric label).
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid name {name:?}: use 1-63 lowercase letters, digits and '-', starting with a letter"))
    }
}

fn validate_version(version: &str) -> Result<(), String> {
    let ok = !version.is_empty()
        && version.len() <= 64
        && version.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok { Ok(()) } else { Err(format!("invalid version {version:?}: use 1-64 of [A-Za-z0-9._-]")) }
}

/// Entries sharing a name are versions of one function: they must carry
/// distinct explicit versions and declare the same routes.
pub fn check_versions(specs: &[FunctionSpec]) -> Result<(), String> {
    let mut by_name: BTreeMap<&str, Vec<&FunctionSpec>> = BTreeMap::new();
    for spec in specs {
        by_name.entry(spec.name.as_str()).or_default().push(spec);
    }
    for (name, versions) in by_name {
        if versions.iter().any(|spec| spec.tenant != versions[0].tenant) {
            return Err(format!("versions of function {name:?} name different tenants"));
        }
        if versions.iter().all(|spec| spec.weight == 0) {
            let which = if versions.len() == 1 { "its only version has" } else { "all versions have" };
            return Err(format!("function {name:?}: {which} weight 0, so no request could reach it"));
        }
        if versions.len() == 1 {
            continue;
        }
        let mut seen = BTreeSet::new();
        for spec in &versions {
            let Some(version) = &spec.version else {
                return Err(format!(
                    "function {name:?} is listed {} times: each entry needs its own `version`",
                    versions.len()
                ));
            };
            if !seen.insert(version) {
                return Err(format!("function {name:?} lists version {version:?} twice"));
            }
            if spec.routes != versions[0].routes {
                return Err(format!("versions of function {name:?} declare different routes"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(text: &str) -> Result<Vec<FunctionSpec>, ManifestError> {
        Manifest::parse(text, Path::new("/m/shoal.toml"))?.resolve()
    }

    #[test]
    fn every_time_a_function_sets_is_bounded_by_the_hosts_maximum() {
        let entry =
            |limit: &str| format!("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.limits]\n{limit}\n");
        for (limit, says) in [
            ("start_timeout_ms = 300001", "limits.start_timeout_ms = 5m 1ms is over the host's maximum of 5m"),
            ("destroy_timeout_ms = 86400000", "limits.destroy_timeout_ms = 1day is over the host's maximum of 5m"),
            ("queue_timeout_ms = 600000", "limits.queue_timeout_ms = 10m is over the host's maximum of 5m"),
            ("timeout_ms = 3600000", "limits.timeout_ms = 1h is over the host's maximum of 15m"),
            ("idle_timeout_s = 90000", "limits.idle_timeout_s = 1day 1h is over the host's maximum of 1day"),
        ] {
            let err = resolve(&entry(limit)).unwrap_err().to_string();
            assert!(err.contains(says), "{limit}: {err}");
        }
        assert!(resolve(&entry("start_timeout_ms = 300000\ntimeout_ms = 900000\nidle_timeout_s = 86400")).is_ok());
    }

    #[test]
    fn a_manifest_names_its_tenant_env_and_files() {
        let specs = resolve(
            "tenant = \"team-a\"\n[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n\
             [function.env]\nGREETING = \"hej\"\n\
             [function.grants]\nfiles = [\"./data:/data:ro\", \"/var/x:/x\"]\n",
        )
        .unwrap();
        assert_eq!(specs[0].tenant.as_str(), "team-a");
        assert_eq!(specs[0].env.get("GREETING").map(String::as_str), Some("hej"));
        let files = &specs[0].grants.files;
        assert_eq!(
            (files[0].host.as_path(), files[0].guest.as_str(), files[0].read_only),
            (Path::new("/m/./data"), "/data", true)
        );
        assert_eq!(
            (files[1].host.as_path(), files[1].guest.as_str(), files[1].read_only),
            (Path::new("/var/x"), "/x", false)
        );
        assert_eq!(resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n").unwrap()[0].tenant.as_str(), "default");

        for (bad, why) in [
            ("tenant = \"Team_A\"\n", "invalid tenant"),
            ("[function.grants]\nfiles = [\"./d:data\"]\n", "must be absolute"),
            ("[function.grants]\nfiles = [\"./d:/a/../b\"]\n", "without `..`"),
            ("[function.grants]\nfiles = [\"./d:/d:rx\"]\n", "grants.files entry"),
            ("[function.grants]\nkeyvalue = [\"a/b:k\"]\n", "may not contain `/`"),
            ("[function.grants]\npublish = [\"x/y\"]\n", "may not contain `/`"),
        ] {
            let text = if bad.starts_with("tenant") {
                format!("{bad}[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n")
            } else {
                format!("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n{bad}")
            };
            let err = resolve(&text).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn tenants_scope_names_apart() {
        let default = TenantName::default();
        let a = TenantName::new("a").unwrap();
        assert_eq!(default.scope("orders"), "orders", "the default tenant keeps its names");
        assert_eq!(a.scope("orders"), "a/orders");
        assert_eq!(a.unscope("a/orders"), "orders");
        assert_eq!(default.unscope("orders"), "orders");
        assert!(TenantName::new("-a").is_err() && TenantName::new("a-").is_err() && TenantName::new("").is_err());
    }

    #[test]
    fn relative_wasm_paths_resolve_against_the_manifest_folder() {
        let specs = resolve("[[function]]\nname = \"a\"\nwasm = \"x/a.wasm\"\n").unwrap();
        assert_eq!(specs[0].wasm, Path::new("/m/x/a.wasm"));
        assert_eq!(specs[0].limits, Limits::default());
    }

    #[test]
    fn unknown_limit_fields_are_rejected_with_the_field_name() {
        let err =
            resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.limits]\ntimeout = 5\n").unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
        assert!(err.to_string().starts_with("/m/shoal.toml"), "{err}");
    }

    #[test]
    fn invalid_names_and_zero_limits_name_the_function_and_field() {
        let err = resolve("[[function]]\nname = \"Bad_Name\"\nwasm = \"a.wasm\"\n").unwrap_err();
        assert!(err.message.contains("Bad_Name"), "{err}");
        let err = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.limits]\nmax_concurrency = 0\n")
            .unwrap_err();
        assert!(err.message.contains("function \"a\"") && err.message.contains("max_concurrency"), "{err}");
    }

    #[test]
    fn reserved_paths_cannot_be_routes() {
        let err = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\nroutes = [\"/metrics\"]\n").unwrap_err();
        assert!(err.message.contains("reserved"), "{err}");
    }

    #[test]
    fn two_entries_of_one_function_need_versions() {
        let text = "[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[[function]]\nname = \"a\"\nwasm = \"b.wasm\"\n";
        let err = resolve(text).unwrap_err();
        assert!(err.message.contains("own `version`"), "{err}");
        let text = "[[function]]\nname = \"a\"\nversion = \"1\"\nweight = 90\nwasm = \"a.wasm\"\n\
                    [[function]]\nname = \"a\"\nversion = \"2\"\nweight = 10\nwasm = \"b.wasm\"\n";
        assert_eq!(resolve(text).unwrap().len(), 2);
    }

    #[test]
    fn grants_resolve_and_check_keys_by_bucket_and_pattern() {
        let text = "[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.grants]\n\
                    keyvalue = [\"default:hello/*\", \"cache:exact\"]\noutbound_http = [\"127.0.0.1:9000\"]\n\
                    config = { greeting = \"hi\" }\n";
        let grants = resolve(text).unwrap().remove(0).grants;
        assert!(grants.allows_key("default", "hello/x"));
        assert!(!grants.allows_key("default", "other"));
        assert!(grants.allows_key("cache", "exact") && !grants.allows_key("cache", "exact2"));
        assert!(grants.opens_bucket("cache") && !grants.opens_bucket("secret"));
        assert_eq!(grants.config["greeting"], "hi");
        let err =
            resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.grants]\nkeyvalue = [\"nobucket\"]\n")
                .unwrap_err();
        assert!(err.message.contains("grants.keyvalue"), "{err}");
        let err =
            resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\n[function.grants]\noutbound_http = [\"x\"]\n")
                .unwrap_err();
        assert!(err.message.contains("host:port"), "{err}");
    }

    #[test]
    fn a_function_whose_only_version_has_weight_zero_is_refused() {
        let err = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\nweight = 0\n").unwrap_err();
        assert!(err.message.contains("weight 0"), "{err}");
    }

    #[test]
    fn a_spec_from_json_gets_the_manifests_checks() {
        let spec = resolve("[[function]]\nname = \"a\"\nwasm = \"a.wasm\"\nroutes = [\"/a\"]\n").unwrap().remove(0);
        let json = serde_json::to_value(&spec).unwrap();
        let back: FunctionSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, spec, "a valid spec survives the round trip");

        let with = |path: &[&str], value: serde_json::Value| {
            let mut json = json.clone();
            let mut slot = &mut json;
            for key in path {
                slot = &mut slot[*key];
            }
            *slot = value;
            serde_json::from_value::<FunctionSpec>(json).unwrap_err().to_string()
        };
        let zero = with(&["limits", "max_concurrency"], 0.into());
        assert!(zero.contains("limits.max_concurrency must be greater than 0"), "{zero}");
        assert!(with(&["limits", "fuel_per_request"], 0.into()).contains("limits.fuel_per_request"));
        assert!(with(&["limits", "timeout"], 0.into()).contains("limits.timeout_ms must be greater than 0"));
        assert!(with(&["limits", "memory_bytes"], (8u64 << 30).into()).contains("over the host's maximum"));
        assert!(with(&["name"], "Bad_Name".into()).contains("invalid name"));
        assert!(with(&["version"], "a b".into()).contains("invalid version"));
        let reserved = serde_json::json!([{ "host": null, "prefix": "/metrics" }]);
        assert!(with(&["routes"], reserved).contains("reserved"));
        let grant = serde_json::json!({ "outbound_http": ["nohost"], "keyvalue": [], "publish": [], "subscribe": [],
            "invoke": [], "config": {}, "secrets": [] });
        assert!(with(&["grants"], grant).contains("host:port"));
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn fuzz_any_text_is_a_manifest_or_an_error_naming_the_file(text in ".{0,400}") {
                match Manifest::parse(&text, Path::new("/m/shoal.toml")).and_then(|m| m.resolve()) {
                    Ok(specs) => prop_assert!(!specs.is_empty()),
                    Err(err) => prop_assert!(err.to_string().starts_with("/m/shoal.toml: "), "{}", err),
                }
            }

            /// Whatever a manifest says, `resolve` accepts it exactly when
            /// every value is valid (checked here by plain rules), and what
            /// it accepts survives the JSON round trip of the admin API and
            /// the registry file unchanged.
            #[test]
            fn fuzz_resolve_accepts_exactly_the_valid_values(
                name in prop_oneof![4 => "[a-z][a-z0-9-]{0,20}", 1 => "[a-zA-Z0-9_-]{0,70}"],
                version in prop_oneof![
                    2 => Just(None),
                    2 => "[a-zA-Z0-9._-]{1,10}".prop_map(Some),
                    1 => "[a-zA-Z0-9._ -]{0,70}".prop_map(Some),
                ],
                route in prop::sample::select(vec![
                    "/a", "/", "/a/b/", "h.example/x", "/a", "/", "/a/b/", "h.example/x", "nohost", "/metrics", "/a?b",
                ]),
                weight in prop::option::of(0u32..3),
                limits in prop::collection::btree_map(
                    prop::sample::select(vec![
                        "timeout_ms", "memory_mb", "max_concurrency", "queue_timeout_ms", "idle_timeout_s",
                        "fuel_per_request", "kv_max_key_bytes", "publish_per_second", "max_request_bytes",
                        "log_bytes_per_second", "max_requests_per_instance",
                    ]),
                    prop::sample::select(vec![1u64, 5000, 4096, 1, 5000, 0, 4097, 1 << 40]),
                    0..5,
                ),
                outbound in prop::sample::select(vec![
                    "127.0.0.1:9000", "127.0.0.1:9000", "127.0.0.1:9000", "127.0.0.1:9000", "host", "h:99999", ":80", "a b:1",
                ]),
            ) {
                let mut text = format!("[[function]]\nname = {name:?}\nwasm = \"a.wasm\"\nroutes = [{route:?}]\n");
                if let Some(version) = &version {
                    text.push_str(&format!("version = {version:?}\n"));
                }
                if let Some(weight) = weight {
                    text.push_str(&format!("weight = {weight}\n"));
                }
                text.push_str(&format!("[function.grants]\noutbound_http = [{outbound:?}]\n[function.limits]\n"));
                for (field, value) in &limits {
                    text.push_str(&format!("{field} = {value}\n"));
                }

                let name_ok = !name.is_empty() && name.len() <= 63 && name.starts_with(|c: char| c.is_ascii_lowercase())
                    && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                let version_ok = version.as_ref().is_none_or(|v| {
                    !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
                });
                let route_ok = ["/a", "/", "/a/b/", "h.example/x"].contains(&route);
                let outbound_ok = outbound == "127.0.0.1:9000";
                // (How often each kind of case comes up, for a run with --nocapture.)
                let _ = (name_ok, version_ok, route_ok, outbound_ok);
                let limit_ok = |field: &str, value: u64| match field {
                    "queue_timeout_ms" => value <= 300_000,
                    "timeout_ms" => (1..=900_000).contains(&value),
                    "idle_timeout_s" => (1..=86_400).contains(&value),
                    "memory_mb" => (1..=4096).contains(&value),
                    "max_concurrency" | "publish_per_second" | "log_bytes_per_second" | "max_requests_per_instance" => {
                        (1..=u64::from(u32::MAX)).contains(&value)
                    }
                    _ => value > 0,
                };
                let limits_ok = limits.iter().all(|(field, value)| limit_ok(field, *value));
                let weight_ok = weight != Some(0);
                let valid = name_ok && version_ok && route_ok && outbound_ok && limits_ok && weight_ok;

                let resolved = Manifest::parse(&text, Path::new("/m/shoal.toml")).and_then(|m| m.resolve());
                prop_assert_eq!(resolved.is_ok(), valid, "{}\n{:?}", text, resolved);
                if let Ok(specs) = resolved {
                    let json = serde_json::to_string(&specs[0]).unwrap();
                    let back: FunctionSpec = serde_json::from_str(&json).unwrap();
                    prop_assert_eq!(&back, &specs[0]);
                }
            }
        }
    }

    #[test]
    fn routes_parse_into_host_and_prefix() {
        let route = Route::parse("api.example.com/v1/").unwrap();
        assert_eq!((route.host.as_deref(), route.prefix.as_str()), (Some("api.example.com"), "/v1"));
        assert_eq!(Route::parse("/").unwrap().prefix, "/");
        assert!(Route::parse("nohost").is_err());
        assert!(Route::parse("/a?b").is_err());
    }
}
