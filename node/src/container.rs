//! What a container is, read from its OCI bundle: the pod sandbox, an HTTP
//! function or a command; its wasm, network namespace, port, grants and
//! limits.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{Code, NodeError};
use shoal::manifest::{FileGrant, FunctionSpec, Manifest, PodIdentity, VolumeKind};

/// Labels and annotations under this prefix carry grants and limits.
pub const ANNOTATION_PREFIX: &str = "shoal.dev/";

/// The CRI's annotations (containerd 1.6 and later).
const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";

/// The environment variable naming an HTTP function's port.
pub(crate) const PORT_ENV: &str = "SHOAL_HTTP_PORT";
const DEFAULT_PORT: u16 = 8080;

/// Where a container's network namespace comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Netns {
    /// An existing namespace (the pod's, made by the CRI and its CNI).
    Path(PathBuf),
    /// The spec asks for a namespace of its own without naming one
    /// (`ctr run` without `--net-host`): the host makes a fresh one.
    New,
    /// No network namespace in the spec: the node's own network.
    Node,
}

/// A container as its bundle describes it.
#[derive(Debug, Clone)]
pub(crate) struct Bundle {
    /// The bundle directory.
    pub path: PathBuf,
    /// `config.json`.
    pub spec: Spec,
}

/// Grants and limits from Kubernetes: the container's labels (containerd
/// copies the image's labels into them), then the spec's annotations (pod
/// annotations, then container annotations, as the CRI passes them), then
/// the memory limit from `resources.limits.memory`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// `shoal.dev/...` keys and values, later sources overriding earlier.
    pub values: BTreeMap<String, String>,
    /// The container's memory limit in bytes.
    pub memory_limit: Option<u64>,
    /// The container's CPU limit in thousandths of a core.
    pub cpu_limit: Option<u32>,
}

impl Bundle {
    /// Read `<bundle>/config.json`.
    pub(crate) fn load(path: &Path) -> Result<Bundle, NodeError> {
        let config = path.join("config.json");
        let spec = Spec::load(&config).map_err(|err| NodeError::Encoding {
            code: Code::INVALID_ARGUMENT,
            what: format!("cannot read the OCI spec {}", config.display()),
            source: err.into(),
        })?;
        Ok(Bundle { path: path.to_path_buf(), spec })
    }

    /// The annotations of the spec.
    pub(crate) fn annotations(&self) -> BTreeMap<String, String> {
        self.spec.annotations().clone().unwrap_or_default().into_iter().collect()
    }

    /// Whether this is a pod's sandbox ("pause") container, as the CRI
    /// says; every other container is an app container of a pod, or a
    /// plain container.
    pub(crate) fn is_sandbox(&self) -> bool {
        self.annotations().get(CONTAINER_TYPE).is_some_and(|kind| kind == "sandbox")
    }

    /// The pod sandbox this app container belongs to, when the CRI made it
    /// (`None` for a sandbox itself and for a plain container).
    pub(crate) fn sandbox_id(&self) -> Option<String> {
        if self.is_sandbox() {
            return None;
        }
        self.annotations().get(SANDBOX_ID).cloned()
    }

    /// The Kubernetes container name, if the CRI made this container.
    pub(crate) fn container_name(&self) -> Option<String> {
        self.annotations().get(CONTAINER_NAME).cloned()
    }

    /// The pod's Kubernetes namespace, if the CRI says.
    pub(crate) fn pod_namespace(&self) -> Option<String> {
        self.annotations().get(SANDBOX_NAMESPACE).cloned()
    }

    /// The pod and container this container is, when the CRI made it.
    pub(crate) fn pod_identity(&self) -> Option<PodIdentity> {
        let annotations = self.annotations();
        Some(PodIdentity {
            pod: annotations.get(SANDBOX_NAME)?.clone(),
            uid: annotations.get(SANDBOX_UID).cloned(),
            container: annotations.get(CONTAINER_NAME)?.clone(),
        })
    }

    /// The pod's `/etc/resolv.conf` as the CRI mounts it (read up to 64
    /// KiB), if the container has one.
    pub(crate) fn resolv_conf(&self) -> Result<Option<Vec<u8>>, NodeError> {
        use std::io::Read as _;
        const MAX_BYTES: u64 = 64 << 10;
        let mounts = self.spec.mounts().clone().unwrap_or_default();
        let Some(source) = mounts
            .iter()
            .find(|mount| mount.destination() == Path::new("/etc/resolv.conf"))
            .and_then(|mount| mount.source().clone())
        else {
            return Ok(None);
        };
        let unreadable = |err: std::io::Error| NodeError::Io {
            code: Code::INTERNAL,
            what: format!("cannot read the pod's resolv.conf {}", source.display()),
            source: err,
        };
        let file = std::fs::File::open(&source).map_err(unreadable)?;
        let mut text = Vec::new();
        file.take(MAX_BYTES).read_to_end(&mut text).map_err(unreadable)?;
        Ok(Some(text))
    }

    /// The container's volumes, as `wasi:filesystem` grants: every bind
    /// mount of a directory (ConfigMap, Secret, projected, emptyDir and
    /// hostPath volumes, as the kubelet mounts them), at its path in the
    /// container and read-only where the mount is. The runtime's own mounts
    /// (`/proc`, `/sys`, `/dev`, the `/etc` files the CRI writes) and
    /// single-file mounts are not filesystems a function is given.
    pub(crate) fn volumes(&self) -> Vec<FileGrant> {
        let mounts = self.spec.mounts().clone().unwrap_or_default();
        let mut grants = Vec::new();
        for mount in mounts {
            let options = mount.options().clone().unwrap_or_default();
            let bind = mount.typ().as_deref() == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind");
            let Some(source) = mount.source().clone() else { continue };
            let guest = mount.destination().display().to_string();
            let runtime_owned =
                ["/proc", "/sys", "/dev"].iter().any(|root| guest == *root || guest.starts_with(&format!("{root}/")))
                    || ["/etc/hosts", "/etc/hostname", "/etc/resolv.conf"].contains(&guest.as_str());
            if !bind || runtime_owned || !source.is_absolute() || !source.is_dir() {
                continue;
            }
            let kind = volume_kind(&source);
            let read_only = options.iter().any(|o| o == "ro");
            let grant = FileGrant { host: source, guest, read_only, kind };
            if grant.check().is_ok() {
                grants.push(grant);
            }
        }
        grants
    }

    /// The rootfs directory (`root.path`, relative to the bundle).
    pub(crate) fn rootfs(&self) -> PathBuf {
        let root = self.spec.root().as_ref().map_or_else(|| "rootfs".into(), |root| root.path().clone());
        if root.is_absolute() { root } else { self.path.join(root) }
    }

    /// The process's arguments (`args[0]` is the wasm's path in the rootfs).
    pub(crate) fn args(&self) -> Vec<String> {
        self.spec.process().as_ref().and_then(|process| process.args().clone()).unwrap_or_default()
    }

    /// The process's environment as `(name, value)` pairs.
    pub(crate) fn env(&self) -> Vec<(String, String)> {
        let env = self.spec.process().as_ref().and_then(|process| process.env().clone()).unwrap_or_default();
        env.iter()
            .filter_map(|entry| entry.split_once('=').map(|(name, value)| (name.to_string(), value.to_string())))
            .collect()
    }

    /// The HTTP port: `SHOAL_HTTP_PORT` from the environment, else 8080.
    pub(crate) fn port(&self) -> Result<u16, NodeError> {
        match self.env().into_iter().find(|(name, _)| name == PORT_ENV) {
            None => Ok(DEFAULT_PORT),
            Some((_, value)) => value.parse::<u16>().ok().filter(|port| *port != 0).ok_or_else(|| {
                NodeError::InvalidArgument(format!("{PORT_ENV}={value:?} is not a port number (1-65535)"))
            }),
        }
    }

    /// The network namespace the spec asks for.
    pub(crate) fn netns(&self) -> Netns {
        let namespaces = self.spec.linux().as_ref().and_then(|linux| linux.namespaces().clone()).unwrap_or_default();
        match namespaces.iter().find(|ns| ns.typ() == LinuxNamespaceType::Network) {
            None => Netns::Node,
            Some(ns) => match ns.path() {
                Some(path) if !path.as_os_str().is_empty() => Netns::Path(path.clone()),
                _ => Netns::New,
            },
        }
    }

    /// The CPU limit from `linux.resources.cpu` (`quota / period`, as the
    /// kubelet writes `resources.limits.cpu`), in thousandths of a core.
    pub(crate) fn cpu_limit_millis(&self) -> Option<u32> {
        let cpu = self.spec.linux().as_ref()?.resources().as_ref()?.cpu().as_ref()?.clone();
        let (quota, period) = (cpu.quota()?, cpu.period()?);
        if quota <= 0 || period == 0 {
            return None;
        }
        let millis = (quota as u128 * 1000 / u128::from(period)).clamp(1, u128::from(u32::MAX));
        Some(millis as u32)
    }

    /// The memory limit from `linux.resources.memory.limit`.
    pub(crate) fn memory_limit(&self) -> Option<u64> {
        let limit = self.spec.linux().as_ref()?.resources().as_ref()?.memory().as_ref()?.limit()?;
        u64::try_from(limit).ok().filter(|limit| *limit > 0)
    }

    /// The entrypoint (`args[0]`) as the container names it, refusing
    /// paths that climb out of the rootfs with `..` (reading it resolves it
    /// inside the rootfs: [`crate::rootfs::read_inside`]).
    pub(crate) fn entrypoint(&self) -> Result<String, NodeError> {
        let args = self.args();
        let Some(entry) = args.first().filter(|entry| !entry.is_empty()) else {
            return Err(NodeError::InvalidArgument(
                "the container names no entrypoint (process.args is empty): set the image's \
                 Entrypoint to the .wasm file"
                    .to_string(),
            ));
        };
        if Path::new(entry).components().any(|part| matches!(part, Component::ParentDir | Component::Prefix(_))) {
            return Err(NodeError::InvalidArgument(format!("the entrypoint {entry:?} leaves the container's rootfs")));
        }
        Ok(entry.clone())
    }
}

impl KubernetesSettings {
    /// Merge `shoal.dev/...` keys from each source in order.
    pub fn collect<'a>(
        sources: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
        memory_limit: Option<u64>,
    ) -> KubernetesSettings {
        let mut values = BTreeMap::new();
        for source in sources {
            for (key, value) in source {
                if let Some(key) = key.strip_prefix(ANNOTATION_PREFIX) {
                    values.insert(key.to_string(), value.clone());
                }
            }
        }
        KubernetesSettings { values, memory_limit, cpu_limit: None }
    }

    /// The function spec for `name`: `limits.<field>` (integers),
    /// `grants.<list>` (comma-separated), `config.<key>` (a config value)
    /// are checked by the same rules as `shoal.toml`; the memory limit caps
    /// `limits.memory_mb`.
    pub fn function_spec(&self, name: &str, wasm: &Path, source: &str) -> Result<FunctionSpec, NodeError> {
        let invalid = NodeError::InvalidArgument;
        let mut limits = toml::Table::new();
        let mut grants = toml::Table::new();
        let mut config = toml::Table::new();
        for (key, value) in &self.values {
            let unknown = || {
                invalid(format!(
                    "unknown setting {ANNOTATION_PREFIX}{key}: use {ANNOTATION_PREFIX}limits.<field>, \
                     {ANNOTATION_PREFIX}grants.<capability> or {ANNOTATION_PREFIX}config.<key>"
                ))
            };
            let (group, field) = key.split_once('.').ok_or_else(unknown)?;
            match group {
                "limits" => {
                    let number = value.trim().parse::<i64>().map_err(|_| {
                        invalid(format!("{ANNOTATION_PREFIX}{key}={value:?}: limits are whole numbers"))
                    })?;
                    limits.insert(field.to_string(), toml::Value::Integer(number));
                }
                "grants" if field == "files" => {
                    return Err(invalid(format!(
                        "{ANNOTATION_PREFIX}{key}: a pod's files are its volumes (volumeMounts), not a grant"
                    )));
                }
                "grants" if field == "secrets" => {
                    return Err(invalid(format!(
                        "{ANNOTATION_PREFIX}{key}: a pod reads the Secret volumes it mounts, and only those"
                    )));
                }
                "grants" => {
                    let entries = value
                        .split(',')
                        .map(str::trim)
                        .filter(|entry| !entry.is_empty())
                        .map(|entry| toml::Value::String(entry.to_string()))
                        .collect();
                    grants.insert(field.to_string(), toml::Value::Array(entries));
                }
                "config" => {
                    config.insert(field.to_string(), toml::Value::String(value.clone()));
                }
                _ => return Err(unknown()),
            }
        }
        if let Some(bytes) = self.memory_limit {
            let cap = bytes.div_ceil(1024 * 1024).max(1) as i64;
            let asked = limits.get("memory_mb").and_then(toml::Value::as_integer);
            limits.insert("memory_mb".into(), toml::Value::Integer(asked.map_or(cap, |asked| asked.min(cap))));
        }
        if let Some(millis) = self.cpu_limit {
            let asked = limits.get("cpu_millis").and_then(toml::Value::as_integer);
            let cap = i64::from(millis);
            limits.insert("cpu_millis".into(), toml::Value::Integer(asked.map_or(cap, |asked| asked.min(cap))));
        }
        if !config.is_empty() {
            grants.insert("config".into(), toml::Value::Table(config));
        }
        let mut function = toml::Table::new();
        function.insert("name".into(), toml::Value::String(name.to_string()));
        function.insert("wasm".into(), toml::Value::String(wasm.display().to_string()));
        function.insert("limits".into(), toml::Value::Table(limits));
        function.insert("grants".into(), toml::Value::Table(grants));
        let mut document = toml::Table::new();
        document.insert("function".into(), toml::Value::Array(vec![toml::Value::Table(function)]));
        let text = toml::to_string(&document).map_err(|err| invalid(err.to_string()))?;
        // The manifest's own errors name the setting; the file is made up.
        let manifest = Manifest::parse(&text, Path::new(source)).map_err(|err| NodeError::Manifest(err.cause))?;
        let mut specs = manifest.resolve().map_err(|err| NodeError::Manifest(err.cause))?;
        Ok(specs.remove(0))
    }
}

/// The kind of a kubelet volume, from where the kubelet keeps it
/// (`/var/lib/kubelet/pods/<uid>/volumes/kubernetes.io~secret/<name>`).
fn volume_kind(source: &Path) -> VolumeKind {
    let text = source.to_string_lossy();
    if text.contains("/kubernetes.io~secret/") {
        VolumeKind::Secret
    } else if text.contains("/kubernetes.io~configmap/") {
        VolumeKind::ConfigMap
    } else if text.contains("/kubernetes.io~projected/") {
        VolumeKind::Projected
    } else if text.contains("/kubernetes.io~empty-dir/") {
        VolumeKind::EmptyDir
    } else {
        VolumeKind::Directory
    }
}

/// A function name for a container: its Kubernetes name (or id), made a
/// valid name, plus a short hash of the id so two pods never collide.
pub(crate) fn function_name(container_id: &str, container_name: Option<&str>) -> String {
    let base = container_name.unwrap_or(container_id);
    let mut name: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).take(48).collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name.insert_str(0, "c-");
    }
    let digest = shoal::engine::sha256_hex(container_id.as_bytes());
    format!("{}-{}", name.trim_end_matches('-'), &digest[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)], memory_limit: Option<u64>) -> KubernetesSettings {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        KubernetesSettings::collect([&map], memory_limit)
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            /// Whatever a pod's annotations (or an image's labels) say, the
            /// result is a spec that passes every check, or an
            /// INVALID_ARGUMENT — never a panic, never a spec the registry
            /// would refuse.
            #[test]
            fn fuzz_annotations_give_a_valid_spec_or_an_invalid_argument(
                entries in prop::collection::btree_map(
                    prop_oneof![
                        3 => "shoal\\.dev/(limits|grants|config)\\.[a-z_]{1,20}",
                        1 => "shoal\\.dev/.{0,20}",
                        1 => "[a-z./]{0,20}",
                    ],
                    prop_oneof![3 => "[0-9]{1,12}", 2 => "[a-z0-9:*/.,-]{0,30}", 1 => ".{0,30}"],
                    0..6,
                ),
                memory_limit in prop::option::of(0u64..(1 << 34)),
            ) {
                let settings = KubernetesSettings::collect([&entries], memory_limit);
                match settings.function_spec("f", Path::new("/f.wasm"), "pod annotations") {
                    Ok(spec) => prop_assert!(spec.check().is_ok(), "{:?}", spec),
                    Err(err) => prop_assert!(err.code() == Code::INVALID_ARGUMENT, "{:?}", err),
                }
            }
        }
    }

    #[test]
    fn annotations_become_grants_and_limits() {
        let settings = settings(
            &[
                ("shoal.dev/limits.timeout_ms", "250"),
                ("shoal.dev/grants.keyvalue", "counters:hits, counters:day-*"),
                ("shoal.dev/grants.publish", "orders"),
                ("shoal.dev/config.greeting", "hej"),
                ("app.kubernetes.io/name", "ignored"),
            ],
            Some(64 * 1024 * 1024),
        );
        let spec = settings.function_spec("hello-1", Path::new("/hello.wasm"), "pod annotations").unwrap();
        assert_eq!(spec.limits.timeout.as_millis(), 250);
        assert_eq!(spec.grants.keyvalue.len(), 2);
        assert!(spec.grants.publish.contains("orders"));
        assert_eq!(spec.grants.config.get("greeting").map(String::as_str), Some("hej"));
        assert_eq!(spec.limits.memory_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn the_memory_limit_caps_a_larger_annotation() {
        let settings = settings(&[("shoal.dev/limits.memory_mb", "512")], Some(100 * 1024 * 1024));
        let spec = settings.function_spec("f", Path::new("/f.wasm"), "pod").unwrap();
        assert_eq!(spec.limits.memory_bytes, 100 * 1024 * 1024);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let err = settings(&[("shoal.dev/limits.timeout_ms", "soon")], None)
            .function_spec("f", Path::new("/f.wasm"), "pod")
            .unwrap_err();
        assert!(matches!(err, NodeError::InvalidArgument(_)), "a bad annotation is an invalid argument: {err:?}");
        let err = err.to_string();
        assert!(err.contains("shoal.dev/limits.timeout_ms"), "{err}");
        let err = settings(&[("shoal.dev/grant.keyvalue", "x:y")], None)
            .function_spec("f", Path::new("/f.wasm"), "pod")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown setting shoal.dev/grant.keyvalue"), "{err}");
        let err = settings(&[("shoal.dev/limits.timeout_msx", "5")], None)
            .function_spec("f", Path::new("/f.wasm"), "pod annotations")
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout_msx"), "{err}");
    }

    #[test]
    fn function_names_are_valid_and_distinct_per_container() {
        let a = function_name("3f1e5a9c0d", Some("web"));
        let b = function_name("77aa00bb11", Some("web"));
        assert_ne!(a, b);
        assert!(a.starts_with("web-"));
        assert!(shoal::manifest::validate_name(&a).is_ok(), "{a}");
        let c = function_name(&"9".repeat(64), None);
        assert!(shoal::manifest::validate_name(&c).is_ok(), "{c}");
    }
}
