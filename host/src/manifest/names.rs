//! The names a manifest gives: functions, tenants and versions.

use super::*;

/// A function, tenant or version name that breaks its rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not a valid function name.
    #[error("invalid name {name:?}: use 1-63 lowercase letters, digits and '-', starting with a letter")]
    Function {
        /// The name given.
        name: String,
    },
    /// Not a valid tenant (namespace) name.
    #[error("invalid tenant {name:?}: use 1-63 lowercase letters, digits and '-' (a namespace name)")]
    Tenant {
        /// The name given.
        name: String,
    },
    /// Not a valid version label.
    #[error("invalid version {version:?}: use 1-64 of [A-Za-z0-9._-]")]
    Version {
        /// The label given.
        version: String,
    },
}

/// A function's name: lowercase letters, digits and `-`, 1 to 63 long,
/// starting with a letter (so it is also a valid DNS label and metric
/// label). A value of this type is always valid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FunctionName(String);

impl FunctionName {
    /// Check `name` and wrap it.
    pub fn new(name: &str) -> Result<FunctionName, NameError> {
        validate_name(name)?;
        Ok(FunctionName(name.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for FunctionName {
    type Error = NameError;

    fn try_from(name: String) -> Result<FunctionName, NameError> {
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
    pub fn new(name: &str) -> Result<TenantName, NameError> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if ok { Ok(TenantName(name.to_string())) } else { Err(NameError::Tenant { name: name.to_string() }) }
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
    type Error = NameError;

    fn try_from(name: String) -> Result<TenantName, NameError> {
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

/// Check a function name: lowercase letters, digits and `-`, 1 to 63 long,
/// starting with a letter (so it is also a valid DNS label and metric label).
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok { Ok(()) } else { Err(NameError::Function { name: name.to_string() }) }
}

pub(super) fn validate_version(version: &str) -> Result<(), NameError> {
    let ok = !version.is_empty()
        && version.len() <= 64
        && version.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok { Ok(()) } else { Err(NameError::Version { version: version.to_string() }) }
}
