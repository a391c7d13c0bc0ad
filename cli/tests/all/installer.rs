//! k8s/: the node installer on sample containerd configs, and every
//! manifest through `kubectl apply --dry-run=client`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

fn install(config: &Path, source: &Path, bin: &Path) -> std::process::Output {
    Command::new("sh")
        .arg(k8s_dir().join("installer/install.sh"))
        .env("SHOAL_CONTAINERD_CONFIG", config)
        .env("SHOAL_SOURCE_DIR", source)
        .env("SHOAL_BIN_DIR", bin)
        .env("SHOAL_RESTART", "no")
        // No node hosts to hand over (never the machine's own).
        .env("SHOAL_RUN_DIR", config.with_file_name("no-run-dir"))
        .env("SHOAL_POLICY", config.with_file_name("installed-policy.toml"))
        .env_remove("NODE_NAME")
        .output()
        .unwrap()
}

fn runtime<'a>(config: &'a toml::Table, plugin: &str) -> &'a toml::Table {
    config["plugins"][plugin]["containerd"]["runtimes"]["shoal"].as_table().expect("the shoal runtime table")
}

#[test]
fn the_installer_adds_the_shoal_runtime_to_containerd_1_and_2_configs_once() {
    for (sample, plugin) in
        [("containerd-1.6.toml", "io.containerd.grpc.v1.cri"), ("containerd-2.0.toml", "io.containerd.cri.v1.runtime")]
    {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::copy(k8s_dir().join("installer/testdata").join(sample), &config).unwrap();
        let output = install(&config, dir.path(), &dir.path().join("bin"));
        assert!(output.status.success(), "{sample}: {}", String::from_utf8_lossy(&output.stderr));
        let text = std::fs::read_to_string(&config).unwrap();
        let parsed: toml::Table = toml::from_str(&text).unwrap_or_else(|err| panic!("{sample}: {err}\n{text}"));
        let shoal = runtime(&parsed, plugin);
        assert_eq!(shoal["runtime_type"].as_str(), Some("io.containerd.shoal.v1"), "{sample}");
        assert_eq!(shoal["pod_annotations"][0].as_str(), Some("shoal.dev/*"), "{sample}");
        let runc = &parsed["plugins"][plugin]["containerd"]["runtimes"]["runc"];
        assert_eq!(runc["runtime_type"].as_str(), Some("io.containerd.runc.v2"), "{sample}: runc untouched");

        let again = install(&config, dir.path(), &dir.path().join("bin"));
        assert!(again.status.success());
        assert_eq!(std::fs::read_to_string(&config).unwrap(), text, "{sample}: a second run changes nothing");
        assert!(String::from_utf8_lossy(&again.stdout).contains("already has the shoal runtime"));
    }
}

#[test]
fn the_installer_puts_the_node_policy_in_place_and_replaces_it_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "version = 2\n").unwrap();
    let source = dir.path().join("src");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::copy(k8s_dir().join("policy.toml"), source.join("policy.toml")).unwrap();
    let installed = dir.path().join("installed-policy.toml");
    let output = install(&config, &source, &dir.path().join("bin"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(k8s_dir().join("policy.toml")).unwrap());
    std::fs::write(source.join("policy.toml"), "[[rule]]\nnamespaces = [\"*\"]\n").unwrap();
    assert!(install(&config, &source, &dir.path().join("bin")).status.success());
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), "[[rule]]\nnamespaces = [\"*\"]\n");
}

#[test]
fn containerd_itself_accepts_the_installed_version_2_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::copy(k8s_dir().join("installer/testdata/containerd-1.6.toml"), &config).unwrap();
    assert!(install(&config, dir.path(), &dir.path().join("bin")).status.success());
    let dump = Command::new("containerd").arg("--config").arg(&config).args(["config", "dump"]).output().unwrap();
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let merged: toml::Table = toml::from_str(&String::from_utf8_lossy(&dump.stdout)).unwrap();
    let shoal = runtime(&merged, "io.containerd.grpc.v1.cri");
    assert_eq!(shoal["runtime_type"].as_str(), Some("io.containerd.shoal.v1"));
}

#[test]
fn the_installer_puts_both_binaries_in_place_and_refuses_a_config_without_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("src");
    std::fs::create_dir_all(&source).unwrap();
    for bin in ["shoal", "containerd-shim-shoal-v1"] {
        std::fs::write(source.join(bin), format!("#!/bin/sh\necho {bin}\n")).unwrap();
    }
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "version = 2\n").unwrap();
    let bin = dir.path().join("bin");
    let output = install(&config, &source, &bin);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for name in ["shoal", "containerd-shim-shoal-v1"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(bin.join(name)).unwrap().permissions());
        assert_eq!(mode & 0o755, 0o755, "{name} is executable");
    }

    std::fs::write(&config, "[plugins]\n").unwrap();
    let output = install(&config, &source, &bin);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no 'version = 2', 'version = 3' or 'version = 4' line"));
}

#[tokio::test]
async fn the_installer_image_runs_under_runc_and_installs_shoal_into_the_nodes_root() {
    let _serial = crate::cluster::SERIAL.lock().await;
    let work = tempfile::tempdir().unwrap();
    // Stand-ins for the two binaries (the release ones are ≈60 MB and the
    // debug ones ≈1 GB): the image copies whatever it holds.
    let bins = work.path().join("bins");
    std::fs::create_dir_all(&bins).unwrap();
    for bin in ["shoal", "containerd-shim-shoal-v1"] {
        std::fs::write(bins.join(bin), format!("#!/bin/sh\necho {bin}\n")).unwrap();
    }
    let tar = work.path().join("installer.oci.tar");
    let tag = "localhost/shoal-test/installer:1";
    let built = Command::new(crate::support::shoal_bin())
        .args(["image", "installer", "--tag", tag, "--bin-dir"])
        .arg(&bins)
        .arg("-o")
        .arg(&tar)
        .output()
        .unwrap();
    assert!(built.status.success(), "shoal image installer: {}", String::from_utf8_lossy(&built.stderr));

    let containerd = crate::cluster::Containerd::start(None);
    let imported = containerd.ctr("default", &["images", "import", tar.to_str().unwrap()]);
    assert!(imported.status.success(), "ctr images import: {}", String::from_utf8_lossy(&imported.stderr));
    // The node's / as the DaemonSet mounts it, with a containerd 1.x config.
    let node = work.path().join("node");
    std::fs::create_dir_all(node.join("etc/containerd")).unwrap();
    std::fs::write(node.join("etc/containerd/config.toml"), "version = 2\n").unwrap();
    let mount = format!("type=bind,src={},dst=/host,options=rbind:rw", node.display());
    let ran = containerd.ctr(
        "default",
        &[
            "run",
            "--rm",
            "--mount",
            &mount,
            "--env",
            "SHOAL_HOST_ROOT=/host",
            "--env",
            "SHOAL_RESTART=no",
            tag,
            "installer-1",
        ],
    );
    let said = format!("{}{}", String::from_utf8_lossy(&ran.stdout), String::from_utf8_lossy(&ran.stderr));
    assert!(ran.status.success() && said.contains("shoal-install: done"), "the installer under runc: {said}");
    for bin in ["shoal", "containerd-shim-shoal-v1"] {
        let installed = node.join("usr/local/bin").join(bin);
        assert_eq!(std::fs::read(&installed).unwrap(), std::fs::read(bins.join(bin)).unwrap(), "{bin}");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&installed).unwrap().permissions());
        assert_eq!(mode & 0o755, 0o755, "{bin} is executable");
    }
    let config: toml::Table =
        toml::from_str(&std::fs::read_to_string(node.join("etc/containerd/config.toml")).unwrap()).unwrap();
    assert_eq!(runtime(&config, "io.containerd.grpc.v1.cri")["runtime_type"].as_str(), Some("io.containerd.shoal.v1"));
}

/// kubectl's client-side dry run needs an API server's discovery
/// documents (which kinds exist, which are namespaced) and a 404 for the
/// objects it looks up. There is no kube-apiserver on this machine, so a
/// loopback server answers exactly that; kubectl does the parsing and
/// mapping for real. (Schema validation needs the server's OpenAPI, hence
/// --validate=false.)
async fn discovery_server() -> String {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let resource = |name: &str, kind: &str, namespaced: bool| {
        serde_json::json!({"name": name, "singularName": kind.to_lowercase(), "namespaced": namespaced, "kind": kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
    };
    let group = |name: &str| {
        serde_json::json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}],
            "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}})
    };
    let list = |gv: &str, resources: Vec<serde_json::Value>| serde_json::json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources});
    let documents: std::collections::HashMap<&str, serde_json::Value> = [
        (
            "/api",
            serde_json::json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}]}),
        ),
        (
            "/apis",
            serde_json::json!({"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [group("apps"), group("node.k8s.io"), group("rbac.authorization.k8s.io")]}),
        ),
        (
            "/api/v1",
            list(
                "v1",
                vec![
                    resource("services", "Service", true),
                    resource("serviceaccounts", "ServiceAccount", true),
                    resource("nodes", "Node", false),
                ],
            ),
        ),
        (
            "/apis/apps/v1",
            list(
                "apps/v1",
                vec![resource("deployments", "Deployment", true), resource("daemonsets", "DaemonSet", true)],
            ),
        ),
        ("/apis/node.k8s.io/v1", list("node.k8s.io/v1", vec![resource("runtimeclasses", "RuntimeClass", false)])),
        (
            "/apis/rbac.authorization.k8s.io/v1",
            list(
                "rbac.authorization.k8s.io/v1",
                vec![
                    resource("clusterroles", "ClusterRole", false),
                    resource("clusterrolebindings", "ClusterRoleBinding", false),
                ],
            ),
        ),
    ]
    .into_iter()
    .collect();
    let documents = std::sync::Arc::new(documents);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let documents = documents.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let documents = documents.clone();
                    async move {
                        let (status, body) = match documents.get(request.uri().path()) {
                            Some(document) => (200, document.to_string()),
                            None => (
                                404,
                                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404})
                                .to_string(),
                            ),
                        };
                        let response = http::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(bytes::Bytes::from(body)))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn every_manifest_passes_kubectl_apply_dry_run() {
    let server = discovery_server().await;
    let home = tempfile::tempdir().unwrap();
    let mut manifests = Vec::new();
    for dir in [k8s_dir(), k8s_dir().join("example"), k8s_dir().join("installer")] {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().extension().is_some_and(|ext| ext == "yaml") {
                manifests.push(entry.path());
            }
        }
    }
    assert!(manifests.len() >= 3, "RuntimeClass, example and installer manifests");
    for manifest in manifests {
        let output = tokio::process::Command::new("kubectl")
            .args(["apply", "--dry-run=client", "--validate=false", "--server", &server, "-f"])
            .arg(&manifest)
            .env("HOME", home.path())
            .env_remove("KUBECONFIG")
            .output()
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{}: {}{}", manifest.display(), out, String::from_utf8_lossy(&output.stderr));
        assert!(out.contains("(dry run)"), "{}: {out}", manifest.display());
    }
    // The example really asks for the Shoal runtime.
    let example = std::fs::read_to_string(k8s_dir().join("example/hello.yaml")).unwrap();
    assert!(example.contains("runtimeClassName: shoal"));
}

/// Start containerd 2.3.4 on `config` (a node's config, its node paths
/// moved under `scratch` so the test owns them); its CRI's view of the
/// config, as `crictl info` shows it.
fn crictl_info_of(config: &str, scratch: &Path) -> serde_json::Value {
    let bin = crate::cluster::containerd2_bin_dir();
    let socket = scratch.join("containerd.sock");
    let moved = config
        .replace("'/var/lib/containerd'", &format!("'{}'", scratch.join("root").display()))
        .replace("'/run/containerd'", &format!("'{}'", scratch.join("state").display()))
        .replace("'/run/containerd/containerd.sock'", &format!("'{}'", socket.display()))
        .replace("'/run/containerd/containerd.sock.ttrpc'", &format!("'{}.ttrpc'", socket.display()))
        .replace("'/opt/containerd'", &format!("'{}'", scratch.join("opt").display()))
        .replace("'/var/run/nri/nri.sock'", &format!("'{}'", scratch.join("nri.sock").display()));
    let path = scratch.join("config.toml");
    std::fs::write(&path, moved).unwrap();
    let log = std::fs::File::create(scratch.join("containerd.log")).unwrap();
    let mut child = Command::new(bin.join("containerd")).arg("--config").arg(&path).stderr(log).spawn().unwrap();
    let endpoint = format!("unix://{}", socket.display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let info = loop {
        let output = Command::new(bin.join("crictl"))
            .args(["--runtime-endpoint", &endpoint, "--timeout", "5s", "info"])
            .output()
            .unwrap();
        if output.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "containerd 2.3.4 did not serve the installed config: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                std::fs::read_to_string(scratch.join("containerd.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
    let _ = child.wait();
    info
}

#[test]
fn the_installer_adds_shoal_to_containerd_2_3s_own_default_config_as_a_drop_in_with_the_sandbox_api() {
    let bin = crate::cluster::containerd2_bin_dir();
    let node = tempfile::tempdir().unwrap();
    let etc = node.path().join("etc/containerd");
    std::fs::create_dir_all(&etc).unwrap();
    let default = Command::new(bin.join("containerd")).args(["config", "default"]).output().unwrap();
    assert!(default.status.success());
    let config = etc.join("config.toml");
    std::fs::write(&config, &default.stdout).unwrap();
    let operators = std::fs::read(&config).unwrap();
    let output = install_on_node(node.path(), &bin);
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{said}");
    assert_eq!(std::fs::read(&config).unwrap(), operators, "the operator's config is not edited: {said}");
    let dropin = std::fs::read_to_string(etc.join("conf.d/shoal.toml")).unwrap();
    assert!(said.contains("conf.d/shoal.toml") && said.contains("sandboxer shim"), "{said}");

    // containerd 2.3.4 itself, on the default config and the drop-in it
    // imports (node paths moved under the test's own folder).
    let scratch = tempfile::tempdir().unwrap();
    let imports = format!("'{}/*.toml'", etc.join("conf.d").display());
    let config_text = String::from_utf8(operators).unwrap().replace("'/etc/containerd/conf.d/*.toml'", &imports);
    let info = crictl_info_of(&config_text, scratch.path());
    let runtimes = &info["config"]["containerd"]["runtimes"];
    assert_eq!(runtimes["shoal"]["runtimeType"], "io.containerd.shoal.v1", "{dropin}\n{:#}", info["config"]);
    assert_eq!(runtimes["shoal"]["sandboxer"], "shim", "{:#}", runtimes["shoal"]);
    assert_eq!(runtimes["shoal"]["PodAnnotations"][0], "shoal.dev/*", "{:#}", runtimes["shoal"]);
    assert_eq!(runtimes["runc"]["runtimeType"], "io.containerd.runc.v2", "runc is untouched");

    // A second run rewrites its own drop-in and nothing else.
    let again = install_on_node(node.path(), &bin);
    assert!(again.status.success());
    assert_eq!(std::fs::read_to_string(etc.join("conf.d/shoal.toml")).unwrap(), dropin);
}

#[test]
fn the_installer_creates_a_containerd_2_config_from_containerds_own_default_when_the_node_has_none() {
    let bin = crate::cluster::containerd2_bin_dir();
    let node = tempfile::tempdir().unwrap();
    let output = install_on_node(node.path(), &bin);
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{said}");
    let config = std::fs::read_to_string(node.path().join("etc/containerd/config.toml")).unwrap();
    assert!(config.starts_with("version = 4"), "containerd 2.3's own default config: {config}");
    let dropin = std::fs::read_to_string(node.path().join("etc/containerd/conf.d/shoal.toml")).unwrap();
    assert!(dropin.contains("sandboxer = \"shim\""), "{dropin}");
}

#[test]
fn the_installer_appends_to_a_version_4_config_that_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "version = 4\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n  runtime_type = 'io.containerd.runc.v2'\n",
    )
    .unwrap();
    let output = install(&config, dir.path(), &dir.path().join("bin"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let parsed: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let shoal = runtime(&parsed, "io.containerd.cri.v1.runtime");
    assert_eq!(shoal["sandboxer"].as_str(), Some("shim"));
    assert_eq!(shoal["runtime_type"].as_str(), Some("io.containerd.shoal.v1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_containerd_2_3_node_serves_shoal_pods_from_its_own_default_config_once_installed() {
    let _serial = crate::cluster::SERIAL.lock().await;
    let bin = crate::cluster::containerd2_bin_dir();
    let node = tempfile::tempdir().unwrap();
    let etc = node.path().join("etc/containerd");
    std::fs::create_dir_all(&etc).unwrap();
    let default = Command::new(bin.join("containerd")).args(["config", "default"]).output().unwrap();
    std::fs::write(etc.join("config.toml"), &default.stdout).unwrap();
    let output = install_on_node(node.path(), &bin);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    // The node's config as installed, its drop-in folder where the test
    // put the node's /etc; its other node paths moved by the fixture.
    let imports = format!("'{}/*.toml'", etc.join("conf.d").display());
    let config =
        std::fs::read_to_string(etc.join("config.toml")).unwrap().replace("'/etc/containerd/conf.d/*.toml'", &imports);
    let registry = crate::cluster::Registry::start();
    let image = registry.push(&crate::support::guest("hello"), "shoal-test/hello:1", &[]);
    let options = crate::cluster::ContainerdOptions { node_config: Some(&config), ..Default::default() };
    let containerd = crate::cluster::Containerd::start_with(Some(&registry), options);
    let mut cri = containerd.cri().await;
    cri.pull(&image).await;
    let pod = cri.run_pod(&containerd.log_dir, "installed", &image, &[], 0).await;
    let (status, body) = crate::cluster::get_in_netns(&pod.netns, "127.0.0.1:8080", "/hello").unwrap();
    assert_eq!((status, body.as_str()), (200, "hello, world\n"));
    // No pause container: the host owns the pod's sandbox.
    let containers = containerd.ctr("k8s.io", &["containers", "ls", "-q"]);
    assert_eq!(String::from_utf8_lossy(&containers.stdout).trim(), pod.container_id);
    cri.remove_pod(&pod).await;
}

/// Run the installer on the fake node root `node` (its containerd config
/// under `etc/containerd`) with the containerd of `bin`, restarting nothing.
fn install_on_node(node: &std::path::Path, bin: &std::path::Path) -> std::process::Output {
    Command::new("sh")
        .arg(k8s_dir().join("installer/install.sh"))
        .env("SHOAL_HOST_ROOT", node)
        .env("SHOAL_CONTAINERD", bin.join("containerd"))
        .env("SHOAL_SOURCE_DIR", node)
        .env("SHOAL_RESTART", "no")
        .env("SHOAL_POLICY", node.join("policy.toml"))
        // (The installer DaemonSet sets it; a test's node has none.)
        .env_remove("NODE_NAME")
        .output()
        .unwrap()
}
