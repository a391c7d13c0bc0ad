//! The containerd configurations the tests run: one per release, each
//! with the Shoal runtime, CNI and the test's registry.

use std::path::{Path, PathBuf};

use super::*;

/// Where a test's containerd finds its registry: a `hosts.toml` per
/// registry under `certs.d` (plain HTTP to the loopback registry).
pub(super) fn registry_hosts(dir: &Path, registry: Option<&Registry>) -> PathBuf {
    let certs = dir.join("certs.d");
    if let Some(registry) = registry {
        let host = certs.join(&registry.addr);
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(
            host.join("hosts.toml"),
            format!(
                "server = \"http://{addr}\"\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n  skip_verify = true\n",
                addr = registry.addr
            ),
        )
        .unwrap();
    }
    certs
}

/// `node`, a node's containerd 2.x config in containerd's own format
/// (single-quoted TOML strings), with every node path moved into `dir`.
pub(super) fn moved_node_config(
    node: &str,
    dir: &Path,
    address: &Path,
    pause: &str,
    cni: &Path,
    registry: Option<&Registry>,
) -> String {
    let certs = registry_hosts(dir, registry);
    let quoted = |path: &Path| format!("'{}'", path.display());
    let moves = [
        ("root = '/var/lib/containerd'", format!("root = {}", quoted(&dir.join("root")))),
        ("state = '/run/containerd'", format!("state = {}", quoted(&dir.join("state")))),
        ("address = '/run/containerd/containerd.sock'", format!("address = {}", quoted(address))),
        ("address = '/run/containerd/containerd.sock.ttrpc'", format!("address = '{}.ttrpc'", address.display())),
        ("path = '/opt/containerd'", format!("path = {}", quoted(&dir.join("root/opt")))),
        ("socket_path = '/var/run/nri/nri.sock'", format!("socket_path = {}", quoted(&dir.join("nri.sock")))),
        ("bin_dirs = ['/opt/cni/bin']", "bin_dirs = ['/usr/lib/cni']".to_string()),
        ("conf_dir = '/etc/cni/net.d'", format!("conf_dir = {}", quoted(cni))),
        ("sandbox = 'registry.k8s.io/pause:3.10.2'", format!("sandbox = '{pause}'")),
        ("config_path = ''", format!("config_path = {}", quoted(&certs))),
    ];
    let mut config = node.to_string();
    for (from, to) in moves {
        assert!(config.contains(from), "the node's config has no {from:?}: is it containerd 2.3's own?");
        config = config.replace(from, &to);
    }
    config
}

/// A containerd 2.3 config (version 4, containerd 2.3's own) for a test:
/// private root, state and sockets, the CRI with a CNI bridge, registries
/// by `hosts.toml`, and the `shoal` runtime with `sandboxer`.
pub(super) fn config_v2_3(
    dir: &Path,
    address: &Path,
    pause: &str,
    cni: &Path,
    registry: Option<&Registry>,
    sandboxer: Sandboxer,
) -> String {
    let certs = registry_hosts(dir, registry);
    let sandboxer = match sandboxer {
        Sandboxer::Shim => "shim",
        Sandboxer::PodSandbox => "podsandbox",
    };
    format!(
        r#"version = 4
root = "{root}"
state = "{state}"
[plugins.'io.containerd.server.v1.grpc']
  address = "{address}"
[plugins.'io.containerd.server.v1.ttrpc']
  address = "{address}.ttrpc"
[plugins.'io.containerd.server.v1.debug']
  address = ""
[plugins.'io.containerd.internal.v1.opt']
  path = "{root}/opt"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.transfer.v1.local']
  config_path = "{certs}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{certs}"
[plugins.'io.containerd.cri.v1.runtime']
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.shoal]
      runtime_type = "io.containerd.shoal.v1"
      sandboxer = "{sandboxer}"
      pod_annotations = ["shoal.dev/*"]
      container_annotations = ["shoal.dev/*"]
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        address = address.display(),
        certs = certs.display(),
        cni = cni.display(),
    )
}

/// A containerd 1.6 config (version 2) for a test.
pub(super) fn config_v1_6(dir: &Path, address: &Path, pause: &str, cni: &Path, registry: Option<&Registry>) -> String {
    let mut config = format!(
        r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{address}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.shoal]
      runtime_type = "io.containerd.shoal.v1"
      pod_annotations = ["shoal.dev/*"]
      container_annotations = ["shoal.dev/*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        address = address.display(),
        cni = cni.display(),
    );
    if let Some(registry) = registry {
        config.push_str(&format!(
            "  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{addr}\"]\n    endpoint = [\"http://{addr}\"]\n",
            addr = registry.addr
        ));
    }
    config
}
