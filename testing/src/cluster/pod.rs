//! What a test pod is, and what starting one gives.

use std::path::PathBuf;
use std::time::Duration;

/// What a test pod is: one container in a namespace.
pub struct PodOptions<'a> {
    /// The pod's namespace (its tenant).
    pub namespace: &'a str,
    /// The pod's name.
    pub name: &'a str,
    /// The container's name (what `invoke` finds it by).
    pub container: &'a str,
    /// The image of its one container.
    pub image: &'a str,
    /// The pod's annotations (`shoal.dev/...`).
    pub annotations: &'a [(&'a str, &'a str)],
    /// The container's memory limit in bytes (0: none).
    pub memory_limit: i64,
    /// (host path, container path, read-only), as the kubelet mounts volumes.
    pub mounts: &'a [(PathBuf, &'a str, bool)],
    /// The container's environment.
    pub env: &'a [(&'a str, &'a str)],
    /// The pod's DNS servers (its resolv.conf), when not the node's.
    pub dns_servers: &'a [&'a str],
    /// The pod's DNS search domains (with `dns_servers`), as the kubelet
    /// writes them: `<namespace>.svc.<cluster domain>` first.
    pub dns_searches: &'a [&'a str],
    /// `resources.limits.cpu` in thousandths of a core (0: none).
    pub cpu_millis: i64,
    /// The pod spec's `command` (empty: the image's entrypoint).
    pub command: &'a [&'a str],
}

impl<'a> PodOptions<'a> {
    /// Pod `name` in namespace `default`, container `web` running `image`.
    pub fn new(name: &'a str, image: &'a str) -> PodOptions<'a> {
        PodOptions {
            namespace: "default",
            name,
            container: "web",
            image,
            annotations: &[],
            memory_limit: 0,
            mounts: &[],
            env: &[],
            dns_servers: &[],
            dns_searches: &[],
            cpu_millis: 0,
            command: &[],
        }
    }
}

/// A pod started through the CRI.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The pod sandbox's id.
    pub sandbox_id: String,
    /// Its container's id.
    pub container_id: String,
    /// The pod's network namespace.
    pub netns: PathBuf,
    /// The pod's IP address.
    pub ip: String,
    /// The container's log file.
    pub log_file: PathBuf,
    /// How long RunPodSandbox, CreateContainer and StartContainer took.
    #[allow(dead_code, reason = "read by the W7 benchmark (host/benches/kubernetes.rs)")]
    pub call_times: [Duration; 3],
}
