//! A restarted host serves the same functions, without compiling again.

use crate::support::{HostProcess, TestHost, manifest_entry, spec, write_manifest};

#[tokio::test]
async fn a_restarted_host_serves_the_same_functions_from_its_state_dir() {
    let host = TestHost::start_persistent().await;
    let state = host.state.as_ref().unwrap().path().to_path_buf();
    let mut v = spec("lifecycle", "lifecycle", "/lc");
    v.version = Some("v7".into());
    host.deploy(vec![spec("hello", "hello", "/hello"), v]).await;
    let TestHost { running, state: state_guard, .. } = host;
    running.shutdown().await;

    let restarted = TestHost::start_with(Some(state.clone())).await;
    assert_eq!(restarted.get("/hello?name=again").await.body, "hello, again\n");
    let functions = restarted.running.host().registry().list().await;
    let names: Vec<(&str, &str)> = functions.iter().map(|f| (f.name.as_str(), &*f.versions[0].version)).collect();
    assert!(names.contains(&("lifecycle", "v7")), "{names:?}");
    drop(state_guard);
}

#[tokio::test]
async fn deploying_already_compiled_wasm_loads_it_from_the_cache() {
    // Two hosts, one cache: the second host finds the first one's code.
    let cache = tempfile::tempdir().unwrap();
    let options = shoal::engine::EngineOptions {
        fuel: shoal::engine::FuelMetering::default(),
        max_instances: 8,
        max_instances_per_function: None,
        max_instances_per_tenant: None,
        cache_dir: Some(cache.path().into()),
        keep_resident_bytes: 0,
        // Cranelift's code reaches the cache at deploy, not later in the
        // background.
        tier_up: false,
        ..shoal::engine::EngineOptions::default()
    };
    let config = shoal::host::HostConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        engine: options,
        ..shoal::host::HostConfig::new()
    };
    let first = shoal::server::RunningHost::start(config.clone()).await.unwrap();
    let report =
        first.host().registry().deploy(vec![crate::support::item(spec("hello", "hello", "/h"))]).await.unwrap();
    assert_eq!(report[0].source, "compiled");
    let again = first.host().registry().deploy(vec![crate::support::item(spec("hello", "hello", "/h"))]).await.unwrap();
    assert_eq!(again[0].source, "unchanged", "same wasm and limits: nothing to do");
    first.shutdown().await;

    let second = shoal::server::RunningHost::start(config).await.unwrap();
    let report = second.host().registry().deploy(vec![crate::support::item(spec("hi", "hello", "/h"))]).await.unwrap();
    assert_eq!(report[0].source, "cache");
    second.shutdown().await;
}

#[tokio::test]
async fn functions_deployed_with_the_cli_survive_a_kill_9_of_the_host() {
    let state = tempfile::tempdir().unwrap();
    let mut host = HostProcess::spawn(state.path(), None);
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(dir.path(), &manifest_entry("hello", "hello", "/hello"));
    let out = host.cli(&["deploy", manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    host.kill9();

    let host = HostProcess::spawn(state.path(), None);
    let body = reqwest::get(host.url("/hello")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "hello, world\n");
}

#[tokio::test]
async fn a_function_that_no_longer_loads_is_kept_on_disk_while_the_others_serve() {
    let host = TestHost::start_persistent().await;
    let state = host.state.as_ref().unwrap().path().to_path_buf();
    let reports = host.deploy(vec![spec("hello", "hello", "/hello"), spec("lifecycle", "lifecycle", "/lc")]).await;
    let TestHost { running, state: state_guard, .. } = host;
    running.shutdown().await;
    // Damage the stored wasm of one function.
    let digest = &reports.iter().find(|r| r.function == "lifecycle").unwrap().digest;
    std::fs::write(state.join("wasm").join(format!("{digest}.wasm")), b"damaged").unwrap();

    let restarted = TestHost::start_with(Some(state.clone())).await;
    assert_eq!(restarted.get("/hello").await.status, 200);
    assert_eq!(restarted.get("/lc").await.status, 404);
    // Another deploy does not drop the damaged function from disk.
    restarted.deploy(vec![spec("other", "hello", "/other")]).await;
    let registry = std::fs::read_to_string(state.join("registry.json")).unwrap();
    assert!(registry.contains("\"lifecycle\""), "{registry}");
    // Undeploying it removes it for good.
    restarted.running.host().registry().undeploy("lifecycle").await.unwrap();
    let registry = std::fs::read_to_string(state.join("registry.json")).unwrap();
    assert!(!registry.contains("\"lifecycle\""), "{registry}");
    drop(state_guard);
}

#[tokio::test]
async fn functions_of_the_same_wasm_share_one_compiled_code() {
    // No cache directory: a second "cache" can only be the shared code.
    let host = TestHost::start_configured(|config| config.engine.cache_dir = None).await;
    let report = host
        .deploy(vec![spec("one", "hello", "/one"), spec("two", "hello", "/two"), spec("three", "lifecycle", "/three")])
        .await;
    let sources: Vec<&str> = report.iter().map(|r| r.source.as_str()).collect();
    assert_eq!(sources, ["compiled", "cache", "compiled"], "one compile per distinct wasm");
    for path in ["/one", "/two", "/three"] {
        assert_eq!(host.get(path).await.status, 200, "{path}");
    }
    // Undeployed and deployed again: the code went with its last user.
    host.running.host().registry().undeploy("one").await.unwrap();
    host.running.host().registry().undeploy("two").await.unwrap();
    let again = host.deploy(vec![spec("four", "hello", "/four")]).await;
    assert_eq!(again[0].source, "compiled", "no function held the code any more");
}
