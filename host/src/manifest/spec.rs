//! A validated function spec: what the registry deploys.

use super::*;

/// Why a function spec is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Its name or version label.
    #[error(transparent)]
    Name(#[from] NameError),
    /// One of its routes.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// One of its limits.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// One of its grants.
    #[error(transparent)]
    Grant(#[from] GrantError),
    /// An environment variable the process environment cannot hold.
    #[error("env: invalid variable {name:?}")]
    Env {
        /// The variable's name.
        name: String,
    },
}

/// A function whose spec is invalid, by name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("function {function:?}: {source}")]
pub struct InvalidFunction {
    /// The function's name, as given.
    pub function: String,
    /// What is wrong.
    #[source]
    pub source: SpecError,
}

/// A route that is malformed or not the function's to take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No `/` at all.
    #[error("route {route:?} has no path; write \"/{route}\" or \"{route}/\"")]
    NoPath {
        /// The route as written.
        route: String,
    },
    /// A query, fragment or space in it.
    #[error("route {route:?}: a route is a path prefix, without query or spaces")]
    NotAPrefix {
        /// The route as written.
        route: String,
    },
    /// A route built in code (or deserialized) that parsing would change.
    #[error("route {route:?} is not in normal form (a path prefix starting with `/`)")]
    NotNormal {
        /// The route.
        route: String,
    },
    /// One of [`RESERVED_PATHS`].
    #[error("route {route:?} is reserved for the host")]
    Reserved {
        /// The route.
        route: String,
    },
}

/// Entries of one function that do not make a valid set of versions.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionsError {
    /// Its versions belong to different tenants.
    #[error("versions of function {function:?} name different tenants")]
    DifferentTenants {
        /// The function.
        function: String,
    },
    /// Every version has weight 0.
    #[error("function {function:?}: {} weight 0, so no request could reach it", all_have(*.versions))]
    NoWeight {
        /// The function.
        function: String,
        /// How many versions it has.
        versions: usize,
    },
    /// It is listed more than once, not every time with a version.
    #[error("function {function:?} is listed {versions} times: each entry needs its own `version`")]
    NoVersion {
        /// The function.
        function: String,
        /// How many entries it has.
        versions: usize,
    },
    /// Two entries give the same version.
    #[error("function {function:?} lists version {version:?} twice")]
    DuplicateVersion {
        /// The function.
        function: String,
        /// The version.
        version: String,
    },
    /// Its versions declare different routes.
    #[error("versions of function {function:?} declare different routes")]
    DifferentRoutes {
        /// The function.
        function: String,
    },
}

/// The subject of [`VersionsError::NoWeight`]'s message.
fn all_have(versions: usize) -> &'static str {
    if versions == 1 { "its only version has" } else { "all versions have" }
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
    type Error = InvalidFunction;

    fn try_from(fields: SpecFields) -> Result<FunctionSpec, InvalidFunction> {
        let SpecFields { name, version, wasm, routes, weight, limits, grants, tenant, pod, env } = fields;
        let spec = FunctionSpec { name, version, wasm, routes, weight, limits, grants, tenant, pod, env };
        spec.check_named()?;
        Ok(spec)
    }
}

impl FunctionSpec {
    /// Check what the types alone cannot: the version label, routes (well
    /// formed, none reserved), limits in range and grants well formed.
    /// Every path into the registry runs this.
    pub fn check(&self) -> Result<(), SpecError> {
        if let Some(version) = &self.version {
            validate_version(version)?;
        }
        for route in &self.routes {
            let text = route.to_string();
            if Route::parse(&text).as_ref() != Ok(route) {
                return Err(RouteError::NotNormal { route: text }.into());
            }
            if RESERVED_PATHS.contains(&route.prefix.as_str()) {
                return Err(RouteError::Reserved { route: text }.into());
            }
        }
        self.limits.check()?;
        self.grants.check()?;
        for (name, value) in &self.env {
            if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
                return Err(SpecError::Env { name: name.clone() });
            }
        }
        Ok(())
    }

    /// [`FunctionSpec::check`], the error naming the function.
    pub fn check_named(&self) -> Result<(), InvalidFunction> {
        self.check().map_err(|source| InvalidFunction { function: self.name.to_string(), source })
    }

    /// The name other functions of its tenant call it by (`invoke`): the
    /// Kubernetes container name when a pod made it, else its own name.
    pub fn service_name(&self) -> &str {
        self.pod.as_ref().map_or(self.name.as_str(), |pod| pod.container.as_str())
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
    pub fn parse(text: &str) -> Result<Route, RouteError> {
        let (host, prefix) = match text.find('/') {
            Some(0) => (None, text),
            Some(at) => (Some(text[..at].to_ascii_lowercase()), &text[at..]),
            None => return Err(RouteError::NoPath { route: text.to_string() }),
        };
        if prefix.contains(['?', '#', ' ']) {
            return Err(RouteError::NotAPrefix { route: text.to_string() });
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

/// Entries sharing a name are versions of one function: they must carry
/// distinct explicit versions and declare the same routes.
pub fn check_versions(specs: &[FunctionSpec]) -> Result<(), VersionsError> {
    let mut by_name: BTreeMap<&str, Vec<&FunctionSpec>> = BTreeMap::new();
    for spec in specs {
        by_name.entry(spec.name.as_str()).or_default().push(spec);
    }
    for (name, versions) in by_name {
        let function = || name.to_string();
        if versions.iter().any(|spec| spec.tenant != versions[0].tenant) {
            return Err(VersionsError::DifferentTenants { function: function() });
        }
        if versions.iter().all(|spec| spec.weight == 0) {
            return Err(VersionsError::NoWeight { function: function(), versions: versions.len() });
        }
        if versions.len() == 1 {
            continue;
        }
        let mut seen = BTreeSet::new();
        for spec in &versions {
            let Some(version) = &spec.version else {
                return Err(VersionsError::NoVersion { function: function(), versions: versions.len() });
            };
            if !seen.insert(version) {
                return Err(VersionsError::DuplicateVersion { function: function(), version: version.clone() });
            }
            if spec.routes != versions[0].routes {
                return Err(VersionsError::DifferentRoutes { function: function() });
            }
        }
    }
    Ok(())
}
