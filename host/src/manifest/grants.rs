//! What a function may reach: files, key-value buckets, topics, functions,
//! config, secrets and outbound hosts.

use super::*;

/// A grant that is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// A `grants.files` entry is not `host:guest[:ro|:rw]`.
    #[error("grants.files entry {entry:?}: write \"host-dir:/guest/path\" or \"host-dir:/guest/path:ro\"")]
    FileEntry {
        /// The entry as written.
        entry: String,
    },
    /// A file grant's guest path is relative or climbs with `..`.
    #[error("grants.files: the guest path {guest:?} must be absolute, without `..`")]
    GuestPath {
        /// The guest path.
        guest: String,
    },
    /// A file grant's host path is relative.
    #[error("grants.files: the host path {} must be absolute", host.display())]
    HostPath {
        /// The host path.
        host: PathBuf,
    },
    /// A `grants.keyvalue` entry is not `bucket:pattern`.
    #[error("grants.keyvalue entry {entry:?}: write \"bucket:key\" or \"bucket:prefix*\"")]
    KeyEntry {
        /// The entry as written.
        entry: String,
    },
    /// A `grants.keyvalue` entry with nothing before the `:`.
    #[error("grants.keyvalue entry {entry:?} names no bucket")]
    KeyNoBucket {
        /// The entry as written.
        entry: String,
    },
    /// A `grants.keyvalue` pattern with a `*` before its end.
    #[error("grants.keyvalue entry {entry:?}: `*` may only end the pattern")]
    KeyStar {
        /// The entry as written.
        entry: String,
    },
    /// A key grant (built in code or deserialized) that no entry parses to.
    #[error("grants.keyvalue entry {grant:?}: write \"bucket:key\" or \"bucket:prefix*\"")]
    MalformedKeyGrant {
        /// The grant.
        grant: KeyGrant,
    },
    /// A bucket name with a `/` (which tells tenants apart).
    #[error("grants.keyvalue: bucket {bucket:?} may not contain `/`")]
    BucketSlash {
        /// The bucket.
        bucket: String,
    },
    /// An empty, over-long or whitespace-holding name.
    #[error("grants.{field}: invalid entry {entry:?}")]
    InvalidEntry {
        /// The grant, as the manifest names it.
        field: &'static str,
        /// The entry.
        entry: String,
    },
    /// A topic name with a `/` (which tells tenants apart).
    #[error("grants.{field}: topic {topic:?} may not contain `/`")]
    TopicSlash {
        /// `publish` or `subscribe`.
        field: &'static str,
        /// The topic.
        topic: String,
    },
    /// An invoke target that is no valid function name.
    #[error("grants.invoke: {0}")]
    Invoke(#[source] NameError),
    /// An outbound authority that is not `host:port`.
    #[error("grants.outbound_http: {authority:?} must be host:port")]
    OutboundHttp {
        /// The authority as written.
        authority: String,
    },
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
    pub fn parse(text: &str, base: &Path) -> Result<FileGrant, GrantError> {
        let usage = || GrantError::FileEntry { entry: text.to_string() };
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
    pub fn check(&self) -> Result<(), GrantError> {
        let guest = Path::new(&self.guest);
        let plain = guest.is_absolute()
            && guest
                .components()
                .all(|part| matches!(part, std::path::Component::RootDir | std::path::Component::Normal(_)));
        if !plain {
            return Err(GrantError::GuestPath { guest: self.guest.clone() });
        }
        if !self.host.is_absolute() {
            return Err(GrantError::HostPath { host: self.host.clone() });
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
    pub fn parse(text: &str) -> Result<KeyGrant, GrantError> {
        let entry = || text.to_string();
        let (bucket, pattern) = text.split_once(':').ok_or_else(|| GrantError::KeyEntry { entry: entry() })?;
        if bucket.is_empty() {
            return Err(GrantError::KeyNoBucket { entry: entry() });
        }
        let (key, prefix) = match pattern.strip_suffix('*') {
            Some(prefix) => (prefix, true),
            None => (pattern, false),
        };
        if key.contains('*') {
            return Err(GrantError::KeyStar { entry: entry() });
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
    pub fn check(&self) -> Result<(), GrantError> {
        let names = |field: &'static str, values: &BTreeSet<String>| -> Result<(), GrantError> {
            match values
                .iter()
                .find(|value| value.is_empty() || value.len() > 255 || value.contains(char::is_whitespace))
            {
                Some(value) => Err(GrantError::InvalidEntry { field, entry: value.clone() }),
                None => Ok(()),
            }
        };
        names("publish", &self.publish)?;
        names("subscribe", &self.subscribe)?;
        // Tenants' topics and buckets are told apart by `/`
        // (`TenantName::scope`): no name of a tenant's own may contain one.
        for (field, topics) in [("publish", &self.publish), ("subscribe", &self.subscribe)] {
            if let Some(topic) = topics.iter().find(|topic| topic.contains('/')) {
                return Err(GrantError::TopicSlash { field, topic: topic.clone() });
            }
        }
        names("secrets", &self.secrets)?;
        names("invoke", &self.invoke)?;
        for name in &self.invoke {
            validate_name(name).map_err(GrantError::Invoke)?;
        }
        names("outbound_http", &self.outbound_http)?;
        for authority in &self.outbound_http {
            let valid =
                authority.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(GrantError::OutboundHttp { authority: authority.clone() });
            }
        }
        for grant in &self.keyvalue {
            if grant.bucket.is_empty() || grant.key.contains('*') || grant.bucket.contains(':') {
                return Err(GrantError::MalformedKeyGrant { grant: grant.clone() });
            }
            if grant.bucket.contains('/') {
                return Err(GrantError::BucketSlash { bucket: grant.bucket.clone() });
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
