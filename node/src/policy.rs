//! The node policy: what the operator lets a pod's annotations (and its
//! image's labels) grant, per Kubernetes namespace.
//!
//! A pod names its grants itself (`shoal.dev/grants.*`), so on its own a
//! grant proves nothing. The policy file — put in place by the installer,
//! e.g. `/etc/shoal/policy.toml`, shipped as `k8s/policy.toml` and as a
//! ConfigMap — bounds them: its rules are tried in order and the first
//! whose `namespaces` matches the pod's namespace decides; a grant outside
//! that rule fails CreateContainer with a message naming the annotation,
//! the entry and the rule. Every resource a grant names is the tenant's
//! own whatever the rule says (buckets, topics and invoke targets are
//! resolved inside the pod's namespace): the policy chooses *which* of its
//! own resources and which outbound hosts a pod may ask for.
//!
//! Without a file the built-in policy applies: key-value, pubsub and invoke
//! inside the pod's namespace, its own mounted secrets, and no outbound
//! HTTP. The file is read again whenever it changes; a file that does not
//! parse refuses every container (naming the file and the error) until it
//! is fixed, rather than falling back to something the operator did not
//! write; a file that is deleted leaves the last one read in force (and
//! says so in the log).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Deserialize;

use crate::error::{Code, NodeError};
use shoal::manifest::{GrantError, Grants, KeyGrant, Limits, TenantName};

/// The default place of the policy file.
pub const DEFAULT_POLICY_PATH: &str = "/etc/shoal/policy.toml";

/// The largest policy file read.
const MAX_POLICY_BYTES: u64 = 1 << 20;

/// A policy file that cannot be read, or is not a valid policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file cannot be opened.
    #[error("cannot open {file}: {source}")]
    Open {
        /// The policy file.
        file: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file cannot be read.
    #[error("cannot read {file}: {source}")]
    Read {
        /// The policy file.
        file: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than a policy may be.
    #[error("{file} is over {} bytes", MAX_POLICY_BYTES)]
    TooLarge {
        /// The policy file.
        file: String,
    },
    /// The text is not TOML, or not the policy's fields.
    #[error("{file}: invalid policy: {}", .source.to_string().trim_end())]
    Syntax {
        /// The policy file.
        file: String,
        /// What the parser said.
        #[source]
        source: toml::de::Error,
    },
    /// A rule that matches no namespace.
    #[error("{file}: rule {rule}: `namespaces` is empty: the rule would match nothing")]
    NoNamespaces {
        /// The policy file.
        file: String,
        /// The rule's number (from 1).
        rule: usize,
    },
    /// A rule's `keyvalue` pattern is malformed.
    #[error("{file}: rule {rule}: {}", .source.to_string().replace("grants.keyvalue", "keyvalue"))]
    KeyValue {
        /// The policy file.
        file: String,
        /// The rule's number (from 1).
        rule: usize,
        /// What is wrong with the pattern (as a grant, which it is written as).
        #[source]
        source: GrantError,
    },
    /// A rule's `outbound_http` entry is not `host:port`.
    #[error("{file}: rule {rule}: outbound_http entry {entry:?} must be host:port (port may be *)")]
    OutboundHttp {
        /// The policy file.
        file: String,
        /// The rule's number (from 1).
        rule: usize,
        /// The entry.
        entry: String,
    },
}

/// A policy file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyText {
    #[serde(default, rename = "rule")]
    rules: Vec<Rule>,
}

/// One rule: the namespaces it is for and what a pod there may ask for.
/// Patterns take `*` for any run of characters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Rule {
    /// Namespace patterns (`team-*`, `*`).
    pub namespaces: Vec<String>,
    /// `bucket:key` patterns: the bucket a pattern (`*` for any), the key
    /// exact or a prefix ending in `*`.
    #[serde(default)]
    pub keyvalue: Vec<String>,
    /// Topic patterns a pod may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic patterns a pod may subscribe to.
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Function (container) name patterns a pod may invoke.
    #[serde(default)]
    pub invoke: Vec<String>,
    /// `host:port` patterns a pod may call out to. Loopback, link-local
    /// and the node's own addresses are reachable only through an entry
    /// that names the address itself (no pattern covers them).
    #[serde(default)]
    pub outbound_http: Vec<String>,
    /// What a pod of these namespaces may set for itself, and what the
    /// namespace's pods may hold together ([`TenantLimits`]).
    #[serde(default)]
    pub limits: TenantLimits,
}

/// Bounds of one rule's namespaces: the most each pod may set
/// (`shoal.dev/limits.*`, `resources.limits`), and the most the
/// namespace's pods may hold at once. A field a rule does not set takes
/// its default (`TenantLimits::DEFAULTS`), which keeps one namespace from
/// taking the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// The longest `timeout_ms` a pod may set.
    pub timeout_ms: Option<u64>,
    /// The longest `queue_timeout_ms`.
    pub queue_timeout_ms: Option<u64>,
    /// The longest `start_timeout_ms`.
    pub start_timeout_ms: Option<u64>,
    /// The longest `destroy_timeout_ms`.
    pub destroy_timeout_ms: Option<u64>,
    /// The longest `idle_timeout_s`.
    pub idle_timeout_s: Option<u64>,
    /// The most `memory_mb` (per instance).
    pub memory_mb: Option<u64>,
    /// The most `max_concurrency` (requests at once, per function).
    pub max_concurrency: Option<u32>,
    /// The most `cpu_millis`.
    pub cpu_millis: Option<u32>,
    /// The longest `invoke_timeout_ms`.
    pub invoke_timeout_ms: Option<u64>,
    /// The most `call_retries`: what one call may turn into on its
    /// callees.
    pub call_retries: Option<u32>,
    /// wasi:cli programs and `kubectl exec`s the namespace runs at once.
    pub programs: Option<u32>,
    /// Instances the namespace's functions keep busy at once, together
    /// (unset: the host's `--max-instances-per-tenant`).
    pub instances: Option<u32>,
    /// Payload bytes of messages published by the namespace's functions
    /// and not yet delivered to every subscriber, across its topics
    /// (unset: 256 MiB).
    pub queued_bytes: Option<u64>,
}

impl TenantLimits {
    /// The bounds a rule gets for what it does not say.
    pub const DEFAULTS: TenantLimits = TenantLimits {
        timeout_ms: Some(5 * 60 * 1000),
        queue_timeout_ms: Some(60 * 1000),
        start_timeout_ms: Some(60 * 1000),
        destroy_timeout_ms: Some(30 * 1000),
        idle_timeout_s: Some(3600),
        memory_mb: Some(1024),
        max_concurrency: Some(500),
        cpu_millis: None,
        invoke_timeout_ms: Some(60 * 1000),
        call_retries: Some(3),
        programs: Some(16),
        instances: None,
        queued_bytes: None,
    };

    /// These bounds, each one not set taken from `defaults`.
    fn or(&self, defaults: &TenantLimits) -> TenantLimits {
        TenantLimits {
            timeout_ms: self.timeout_ms.or(defaults.timeout_ms),
            queue_timeout_ms: self.queue_timeout_ms.or(defaults.queue_timeout_ms),
            start_timeout_ms: self.start_timeout_ms.or(defaults.start_timeout_ms),
            destroy_timeout_ms: self.destroy_timeout_ms.or(defaults.destroy_timeout_ms),
            idle_timeout_s: self.idle_timeout_s.or(defaults.idle_timeout_s),
            memory_mb: self.memory_mb.or(defaults.memory_mb),
            max_concurrency: self.max_concurrency.or(defaults.max_concurrency),
            cpu_millis: self.cpu_millis.or(defaults.cpu_millis),
            invoke_timeout_ms: self.invoke_timeout_ms.or(defaults.invoke_timeout_ms),
            call_retries: self.call_retries.or(defaults.call_retries),
            programs: self.programs.or(defaults.programs),
            instances: self.instances.or(defaults.instances),
            queued_bytes: self.queued_bytes.or(defaults.queued_bytes),
        }
    }

    /// The first of `limits` over these bounds: (the `shoal.dev/limits.`
    /// field, its value, the bound).
    fn over(&self, limits: &Limits) -> Option<(&'static str, u64, u64)> {
        let millis = |duration: std::time::Duration| duration.as_millis().try_into().unwrap_or(u64::MAX);
        let checks: [(&'static str, u64, Option<u64>); 10] = [
            ("timeout_ms", millis(limits.timeout), self.timeout_ms),
            ("queue_timeout_ms", millis(limits.queue_timeout), self.queue_timeout_ms),
            ("start_timeout_ms", millis(limits.start_timeout), self.start_timeout_ms),
            ("destroy_timeout_ms", millis(limits.destroy_timeout), self.destroy_timeout_ms),
            ("idle_timeout_s", limits.idle_timeout.as_secs(), self.idle_timeout_s),
            ("memory_mb", limits.memory_bytes >> 20, self.memory_mb),
            ("max_concurrency", u64::from(limits.max_concurrency.get()), self.max_concurrency.map(u64::from)),
            (
                "cpu_millis",
                limits.cpu_millis.map_or(u64::MAX, |millis| u64::from(millis.get())),
                self.cpu_millis.map(u64::from),
            ),
            ("invoke_timeout_ms", millis(limits.invoke_timeout), self.invoke_timeout_ms),
            ("call_retries", u64::from(limits.call_retries), self.call_retries.map(u64::from)),
        ];
        checks
            .into_iter()
            .find_map(|(field, value, bound)| bound.filter(|bound| value > *bound).map(|bound| (field, value, bound)))
    }
}

/// The policy in force.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    /// Where it came from, for messages.
    source: String,
}

impl Policy {
    /// The built-in policy: any of a pod's own buckets, topics and
    /// functions; no outbound HTTP.
    pub fn builtin() -> Policy {
        let any = vec!["*".to_string()];
        Policy {
            rules: vec![Rule {
                namespaces: any.clone(),
                keyvalue: vec!["*:*".to_string()],
                publish: any.clone(),
                subscribe: any.clone(),
                invoke: any,
                outbound_http: Vec::new(),
                limits: TenantLimits::default(),
            }],
            source: "the built-in policy".to_string(),
        }
    }

    /// Parse a policy file's text; `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<Policy, PolicyError> {
        let file = || source.to_string();
        let parsed: PolicyText =
            toml::from_str(text).map_err(|err| PolicyError::Syntax { file: file(), source: err })?;
        for (index, rule) in parsed.rules.iter().enumerate() {
            let number = index + 1;
            if rule.namespaces.is_empty() {
                return Err(PolicyError::NoNamespaces { file: file(), rule: number });
            }
            for pattern in &rule.keyvalue {
                KeyGrant::parse(pattern).map_err(|err| PolicyError::KeyValue {
                    file: file(),
                    rule: number,
                    source: err,
                })?;
            }
            for entry in &rule.outbound_http {
                let valid = entry
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && (port == "*" || port.parse::<u16>().is_ok()));
                if !valid {
                    return Err(PolicyError::OutboundHttp { file: file(), rule: number, entry: entry.clone() });
                }
            }
        }
        Ok(Policy { rules: parsed.rules, source: source.to_string() })
    }

    /// The rule for `namespace`, with its number (from 1).
    fn rule_for(&self, namespace: &str) -> Option<(usize, &Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.namespaces.iter().any(|pattern| glob(pattern, namespace)))
            .map(|(index, rule)| (index + 1, rule))
    }

    /// The bounds for `tenant`'s pods: its rule's, defaults for the rest
    /// (a namespace no rule matches gets the defaults).
    pub fn limits_for(&self, tenant: &TenantName) -> TenantLimits {
        match self.rule_for(tenant.as_str()) {
            Some((_, rule)) => rule.limits.or(&TenantLimits::DEFAULTS),
            None => TenantLimits::DEFAULTS,
        }
    }

    /// Check the limits a pod of `tenant` set for itself against its
    /// rule's bounds: an INVALID_ARGUMENT naming the field, the value, the
    /// bound and where it comes from.
    pub fn check_limits(&self, tenant: &TenantName, limits: &Limits) -> Result<(), NodeError> {
        let Some((field, value, bound)) = self.limits_for(tenant).over(limits) else { return Ok(()) };
        let namespace = tenant.as_str();
        let whose = match self.rule_for(namespace) {
            Some((number, rule)) if rule.limits.over(limits).is_some() => {
                format!("rule {number} of {} (namespaces {:?})", self.source, rule.namespaces)
            }
            _ => format!("the node's default for namespaces (set `limits.{field}` in a rule of {})", self.source),
        };
        let value = if field == "cpu_millis" && value == u64::MAX { "no limit".to_string() } else { value.to_string() };
        Err(NodeError::InvalidArgument(format!(
            "shoal.dev/limits.{field} = {value} is over the {bound} that {whose} allows for namespace {namespace:?}"
        )))
    }

    /// Check `grants` asked for by a pod of `tenant`: `Ok` when the rule
    /// for its namespace covers every entry, else an INVALID_ARGUMENT
    /// naming the annotation, the entry and the rule.
    pub fn check(&self, tenant: &TenantName, grants: &Grants) -> Result<(), NodeError> {
        let namespace = tenant.as_str();
        let refuse = |capability: &str, entry: &str, why: String| {
            NodeError::InvalidArgument(format!(
                "shoal.dev/grants.{capability} entry {entry:?} is not allowed for namespace {namespace:?}: {why}"
            ))
        };
        let Some((number, rule)) = self.rule_for(namespace) else {
            let first = first_grant(grants);
            return match first {
                None => Ok(()),
                Some((capability, entry)) => Err(refuse(
                    capability,
                    &entry,
                    format!("no rule of {} matches the namespace, so it may be granted nothing", self.source),
                )),
            };
        };
        let rule_name = format!("rule {number} of {} (namespaces {:?})", self.source, rule.namespaces);
        let allows = |capability: &str, patterns: &[String]| format!("{rule_name} allows {capability} {patterns:?}");
        for grant in &grants.keyvalue {
            if !rule.keyvalue.iter().any(|pattern| covers_key(pattern, grant)) {
                return Err(refuse("keyvalue", &grant.to_string(), allows("keyvalue", &rule.keyvalue)));
            }
        }
        for (capability, asked, patterns) in [
            ("publish", &grants.publish, &rule.publish),
            ("subscribe", &grants.subscribe, &rule.subscribe),
            ("invoke", &grants.invoke, &rule.invoke),
        ] {
            if let Some(entry) = asked.iter().find(|entry| !patterns.iter().any(|pattern| glob(pattern, entry))) {
                return Err(refuse(capability, entry, allows(capability, patterns)));
            }
        }
        for entry in &grants.outbound_http {
            if !rule.outbound_http.iter().any(|pattern| covers_authority(pattern, entry)) {
                let why = match special_address(entry) {
                    Some(kind) => format!(
                        "{kind} addresses are reachable only through a policy entry naming {entry:?} itself; {}",
                        allows("outbound_http", &rule.outbound_http)
                    ),
                    None => allows("outbound_http", &rule.outbound_http),
                };
                return Err(refuse("outbound_http", entry, why));
            }
        }
        Ok(())
    }
}

/// The first grant of any kind (for a namespace no rule matches).
fn first_grant(grants: &Grants) -> Option<(&'static str, String)> {
    if let Some(grant) = grants.keyvalue.first() {
        return Some(("keyvalue", grant.to_string()));
    }
    for (capability, set) in [
        ("publish", &grants.publish),
        ("subscribe", &grants.subscribe),
        ("invoke", &grants.invoke),
        ("outbound_http", &grants.outbound_http),
    ] {
        if let Some(entry) = set.first() {
            return Some((capability, entry.clone()));
        }
    }
    None
}

/// Whether policy pattern `pattern` (`bucket-glob:key` or
/// `bucket-glob:prefix*`) covers the grant `grant`: every key the grant
/// reaches, the pattern reaches too.
fn covers_key(pattern: &str, grant: &KeyGrant) -> bool {
    let Ok(allowed) = KeyGrant::parse(pattern) else { return false };
    if !glob(&allowed.bucket, &grant.bucket) {
        return false;
    }
    match (allowed.prefix, grant.prefix) {
        (true, _) => grant.key.starts_with(&allowed.key),
        (false, false) => grant.key == allowed.key,
        (false, true) => false,
    }
}

/// Whether `pattern` (`host-glob:port` or `host-glob:*`) covers the
/// authority `entry`. A special address (loopback, link-local) is covered
/// only by a pattern naming it exactly.
fn covers_authority(pattern: &str, entry: &str) -> bool {
    if special_address(entry).is_some() {
        return pattern == entry;
    }
    let (Some((host_pattern, port_pattern)), Some((host, port))) = (pattern.rsplit_once(':'), entry.rsplit_once(':'))
    else {
        return false;
    };
    glob(host_pattern, host) && (port_pattern == "*" || port_pattern == port)
}

/// What is special about an authority's host, if it is a literal address
/// (or `localhost`) that no pattern may cover: loopback or link-local.
fn special_address(authority: &str) -> Option<&'static str> {
    let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return Some("loopback");
    }
    host.parse::<IpAddr>().ok().and_then(|ip| shoal::abi::special_kind(ip, &shoal::abi::node_addresses()))
}

/// `*`-only glob match. Hand-written: a glob crate's character classes and
/// path rules are more than a namespace or topic pattern needs, and this
/// is a dozen lines.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The policy file, read again when it changes.
pub(crate) struct PolicyFile {
    path: PathBuf,
    cached: Mutex<Option<(FileStamp, Loaded)>>,
    /// The last policy the file held (kept when the file goes away).
    last_file: Mutex<Option<Arc<Policy>>>,
}

/// A policy as last read: in force, or why the file was refused.
type Loaded = Result<Arc<Policy>, Arc<PolicyError>>;

/// What tells a changed file from the one read before.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileStamp {
    Missing,
    Seen { modified: Option<SystemTime>, len: u64, inode: u64 },
}

impl PolicyFile {
    /// The policy at `path` (the built-in policy while there is no file).
    pub(crate) fn new(path: &Path) -> PolicyFile {
        PolicyFile { path: path.to_path_buf(), cached: Mutex::new(None), last_file: Mutex::new(None) }
    }

    /// The policy in force now.
    pub(crate) fn current(&self) -> Result<Arc<Policy>, NodeError> {
        use std::os::unix::fs::MetadataExt as _;
        let stamp = match std::fs::metadata(&self.path) {
            Ok(meta) => FileStamp::Seen { modified: meta.modified().ok(), len: meta.len(), inode: meta.ino() },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => FileStamp::Missing,
            Err(source) => {
                return Err(NodeError::Io {
                    code: Code::INTERNAL,
                    what: format!("cannot read the node policy {}", self.path.display()),
                    source,
                });
            }
        };
        let mut cached = self.cached.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, policy)) = cached.as_ref()
            && *seen == stamp
        {
            return policy.clone().map_err(NodeError::Policy);
        }
        let mut last_file = self.last_file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let policy = match (&stamp, last_file.as_ref()) {
            // A policy file that goes away leaves the last one read in
            // force: a deleted file must not widen what pods may grant.
            (FileStamp::Missing, Some(last)) => {
                tracing::error!(
                    policy = %self.path.display(),
                    "the node policy file is gone: the last one read stays in force until a new one is written"
                );
                Ok(last.clone())
            }
            (FileStamp::Missing, None) => {
                tracing::info!(policy = %self.path.display(), "no node policy file: the built-in policy applies");
                Ok(Arc::new(Policy::builtin()))
            }
            (FileStamp::Seen { .. }, _) => {
                let read = self.read().map(Arc::new).map_err(Arc::new);
                match &read {
                    Ok(policy) => {
                        tracing::info!(policy = %self.path.display(), "node policy loaded");
                        *last_file = Some(policy.clone());
                    }
                    Err(err) => tracing::error!(policy = %self.path.display(), error = %err, "node policy refused"),
                }
                read
            }
        };
        *cached = Some((stamp, policy.clone()));
        policy.map_err(NodeError::Policy)
    }

    fn read(&self) -> Result<Policy, PolicyError> {
        use std::io::Read as _;
        let source = self.path.display().to_string();
        let file =
            std::fs::File::open(&self.path).map_err(|err| PolicyError::Open { file: source.clone(), source: err })?;
        let mut text = String::new();
        file.take(MAX_POLICY_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|err| PolicyError::Read { file: source.clone(), source: err })?;
        if text.len() as u64 > MAX_POLICY_BYTES {
            return Err(PolicyError::TooLarge { file: source });
        }
        Policy::parse(&text, &source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(keyvalue: &[&str], publish: &[&str], outbound: &[&str]) -> Grants {
        Grants {
            keyvalue: keyvalue.iter().map(|text| KeyGrant::parse(text).unwrap()).collect(),
            publish: publish.iter().map(std::string::ToString::to_string).collect(),
            outbound_http: outbound.iter().map(std::string::ToString::to_string).collect(),
            ..Grants::default()
        }
    }

    fn tenant(name: &str) -> TenantName {
        TenantName::new(name).unwrap()
    }

    #[test]
    fn the_shipped_example_policy_parses_and_means_what_it_says() {
        let policy = Policy::parse(include_str!("../../k8s/policy.toml"), "k8s/policy.toml").unwrap();
        let stripe = grants(&["ledger:*"], &["payments.done"], &["api.stripe.com:443"]);
        assert!(policy.check(&tenant("payments"), &stripe).is_ok());
        assert!(policy.check(&tenant("shop"), &stripe).is_err(), "no egress for everyone else");
        assert!(policy.check(&tenant("shop"), &grants(&["*:*"], &["orders"], &[])).is_ok());
        assert!(policy.check(&tenant("kube-system"), &grants(&["a:b"], &[], &[])).is_err());
    }

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob("*", ""));
        assert!(glob("team-*", "team-a"));
        assert!(!glob("team-*", "teams"));
        assert!(glob("*.example.com", "api.example.com"));
        assert!(!glob("*.example.com", "example.com"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXcYb"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exact2"));
    }

    #[test]
    fn the_builtin_policy_allows_own_resources_and_no_outbound() {
        let policy = Policy::builtin();
        assert!(policy.check(&tenant("a"), &grants(&["*:*", "counters:hits"], &["orders"], &[])).is_ok());
        let err = policy.check(&tenant("a"), &grants(&[], &[], &["example.com:80"])).unwrap_err().to_string();
        assert!(err.contains("shoal.dev/grants.outbound_http entry \"example.com:80\""), "{err}");
        assert!(err.contains("the built-in policy"), "{err}");
    }

    #[test]
    fn a_rule_bounds_what_its_namespaces_may_ask_for_and_says_which_rule_refused() {
        let text = r#"
            [[rule]]
            namespaces = ["team-*"]
            keyvalue = ["orders:*", "cache:session-*"]
            publish = ["orders"]
            outbound_http = ["*.example.com:443", "10.0.0.7:*"]
        "#;
        let policy = Policy::parse(text, "/etc/shoal/policy.toml").unwrap();
        let team = tenant("team-a");
        assert!(policy.check(&team, &grants(&["orders:*", "cache:session-1"], &["orders"], &[])).is_ok());
        assert!(policy.check(&team, &grants(&[], &[], &["api.example.com:443", "10.0.0.7:8080"])).is_ok());
        let err = policy.check(&team, &grants(&["*:*"], &[], &[])).unwrap_err();
        assert!(matches!(err, NodeError::InvalidArgument(_)));
        let err = err.to_string();
        assert!(err.contains("shoal.dev/grants.keyvalue entry \"*:*\""), "{err}");
        assert!(err.contains("rule 1 of /etc/shoal/policy.toml"), "{err}");
        assert!(policy.check(&team, &grants(&["cache:*"], &[], &[])).is_err(), "a wider prefix is beyond it");
        assert!(policy.check(&team, &grants(&[], &["payments"], &[])).is_err());
        assert!(policy.check(&team, &grants(&[], &[], &["api.example.com:80"])).is_err());
        // No rule for the namespace: nothing may be granted, but a pod
        // asking for nothing runs.
        let err = policy.check(&tenant("other"), &grants(&["orders:x"], &[], &[])).unwrap_err().to_string();
        assert!(err.contains("no rule"), "{err}");
        assert!(policy.check(&tenant("other"), &Grants::default()).is_ok());
    }

    #[test]
    fn loopback_and_link_local_need_an_entry_naming_them() {
        let policy = Policy::parse("[[rule]]\nnamespaces = [\"*\"]\noutbound_http = [\"*:*\"]\n", "p").unwrap();
        let a = tenant("a");
        assert!(policy.check(&a, &grants(&[], &[], &["example.com:80"])).is_ok());
        for special in ["169.254.169.254:80", "127.0.0.1:8080", "localhost:80", "[::1]:80", "[fe80::1]:80"] {
            let err = policy.check(&a, &grants(&[], &[], &[special])).unwrap_err().to_string();
            assert!(err.contains("reachable only through a policy entry naming"), "{special}: {err}");
        }
        let named =
            Policy::parse("[[rule]]\nnamespaces = [\"*\"]\noutbound_http = [\"169.254.169.254:80\"]\n", "p").unwrap();
        assert!(named.check(&a, &grants(&[], &[], &["169.254.169.254:80"])).is_ok());
    }

    #[test]
    fn a_broken_policy_file_refuses_until_it_is_fixed_and_changes_are_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let file = PolicyFile::new(&path);
        assert!(file.current().unwrap().check(&tenant("a"), &grants(&["x:y"], &[], &[])).is_ok(), "built-in");
        std::fs::write(&path, "[[rule]]\nnamespaces = [\"a\"]\nkeyvalue = [\"x:*\"]\nbogus = 1\n").unwrap();
        let err = file.current().unwrap_err().to_string();
        assert!(err.contains("policy.toml") && err.contains("bogus"), "{err}");
        std::fs::write(&path, "[[rule]]\nnamespaces = [\"a\"]\nkeyvalue = [\"x:*\"]\n").unwrap();
        let policy = file.current().unwrap();
        assert!(policy.check(&tenant("a"), &grants(&["x:y"], &[], &[])).is_ok());
        assert!(policy.check(&tenant("a"), &grants(&["z:y"], &[], &[])).is_err());
    }

    #[test]
    fn a_deleted_policy_file_leaves_the_last_one_in_force_not_the_permissive_built_in_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        let file = PolicyFile::new(&path);
        std::fs::write(&path, "[[rule]]\nnamespaces = [\"a\"]\nkeyvalue = [\"x:*\"]\n").unwrap();
        assert!(file.current().unwrap().check(&tenant("a"), &grants(&["z:y"], &[], &[])).is_err());
        std::fs::remove_file(&path).unwrap();
        let kept = file.current().unwrap();
        assert!(kept.check(&tenant("a"), &grants(&["z:y"], &[], &[])).is_err(), "still the file's rule");
        assert!(kept.check(&tenant("b"), &grants(&["x:y"], &[], &[])).is_err(), "no rule for b, as before");
        std::fs::write(&path, "[[rule]]\nnamespaces = [\"*\"]\nkeyvalue = [\"*:*\"]\n").unwrap();
        assert!(file.current().unwrap().check(&tenant("b"), &grants(&["x:y"], &[], &[])).is_ok(), "a new file");
    }

    #[test]
    fn a_pods_call_retries_and_invoke_timeout_are_bounded_by_its_rule_or_the_nodes_default() {
        let policy = Policy::parse(
            "[[rule]]\nnamespaces = [\"calm\"]\n[rule.limits]\ncall_retries = 0\ninvoke_timeout_ms = 1000\n",
            "/etc/shoal/policy.toml",
        )
        .unwrap();
        let limits = |retries: u32, timeout_ms: u64| Limits {
            call_retries: retries,
            invoke_timeout: std::time::Duration::from_millis(timeout_ms),
            ..Limits::default()
        };
        let err = policy.check_limits(&tenant("calm"), &limits(1, 1000)).unwrap_err().to_string();
        assert!(err.contains("shoal.dev/limits.call_retries = 1 is over the 0 that rule 1"), "{err}");
        let err = policy.check_limits(&tenant("calm"), &limits(0, 2000)).unwrap_err().to_string();
        assert!(err.contains("shoal.dev/limits.invoke_timeout_ms = 2000 is over the 1000"), "{err}");
        assert!(policy.check_limits(&tenant("calm"), &limits(0, 1000)).is_ok());
        // The node's defaults for the rest: 3 retries, 60 s.
        assert!(policy.check_limits(&tenant("other"), &limits(3, 60_000)).is_ok());
        let err = policy.check_limits(&tenant("other"), &limits(4, 1000)).unwrap_err().to_string();
        assert!(err.contains("call_retries = 4 is over the 3 that the node's default"), "{err}");
    }
}
