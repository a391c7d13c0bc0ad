//! State through `wasi:keyvalue`, on the embedded store: grants by bucket
//! and prefix, size limits, and durability across restarts and `kill -9`.

use shoal::manifest::KeyGrant;

use crate::support::{HostProcess, TestHost, spec, write_manifest};

pub(crate) fn kv_spec(grants: &[&str]) -> shoal::manifest::FunctionSpec {
    let mut kv = spec("kv", "kv", "/kv");
    kv.grants.keyvalue = grants.iter().map(|g| KeyGrant::parse(g).unwrap()).collect();
    kv
}

/// The behaviour every key-value backend must show, on a host whose
/// function `kv` is granted `default:counter/*` and `default:data/*`.
pub(crate) async fn key_value_behaves(host: &TestHost) {
    assert_eq!(host.get("/kv/incr?key=counter/a").await.body, "counter/a=1\n");
    assert_eq!(host.get("/kv/incr?key=counter/a&by=41").await.body, "counter/a=42\n");
    let put = host.client.put(host.url("/kv/set?key=data/x")).body("hello").send().await.unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(host.get("/kv/get?key=data/x").await.body, "hello");
    assert_eq!(host.get("/kv/get?key=data/none").await.status, 404);
    let keys = host.get("/kv/keys").await.body;
    assert_eq!(keys, "counter/a\ndata/x");
    assert_eq!(host.get("/kv/del?key=data/x").await.status, 200);
    assert_eq!(host.get("/kv/get?key=data/x").await.status, 404);
    // Outside the grants: an error value, shown by the guest as 403.
    let denied = host.get("/kv/get?key=other/x").await;
    assert_eq!((denied.status, denied.body.as_str()), (403, "Error::AccessDenied\n"));
    assert_eq!(host.get("/kv/keys?bucket=private").await.status, 403);
    // Incrementing a non-number is an error value too.
    host.client.put(host.url("/kv/set?key=data/text")).body("abc").send().await.unwrap();
    let not_a_number = host.get("/kv/incr?key=data/text").await;
    assert_eq!(not_a_number.status, 422, "{}", not_a_number.body);
}

#[tokio::test]
async fn the_embedded_store_serves_granted_keys_and_refuses_others() {
    let host = TestHost::start().await;
    host.deploy(vec![kv_spec(&["default:counter/*", "default:data/*"])]).await;
    key_value_behaves(&host).await;
}

#[tokio::test]
async fn oversized_keys_and_values_get_error_values_not_host_memory() {
    let host = TestHost::start().await;
    let mut kv = kv_spec(&["default:*"]);
    kv.limits.kv_max_key_bytes = 16;
    kv.limits.kv_max_value_bytes = 1024;
    host.deploy(vec![kv]).await;
    let long_key = host.get(&format!("/kv/incr?key={}", "k".repeat(17))).await;
    assert_eq!(long_key.status, 422);
    assert!(long_key.body.contains("kv_max_key_bytes = 16"), "{}", long_key.body);
    let big = host.client.put(host.url("/kv/set?key=big")).body(vec![b'x'; 1025]).send().await.unwrap();
    assert_eq!(big.status(), 422);
    assert!(big.text().await.unwrap().contains("kv_max_value_bytes = 1024"));
    let metrics = host.get("/metrics").await.body;
    assert!(metrics.contains(r#"shoal_abi_limited_total{capability="keyvalue.set",function="kv"} 1"#), "{metrics}");
}

#[tokio::test]
async fn a_flood_of_abi_calls_meets_the_rate_limit() {
    let host = TestHost::start().await;
    let mut kv = kv_spec(&["default:*"]);
    kv.limits.abi_calls_per_second = std::num::NonZeroU32::new(5).unwrap();
    host.deploy(vec![kv]).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(host.get("/kv/incr?key=n").await.status);
    }
    assert!(statuses.contains(&200) && statuses.contains(&422), "{statuses:?}");
}

#[tokio::test]
async fn state_survives_a_host_restart() {
    let host = TestHost::start_persistent().await;
    let state = host.state.as_ref().unwrap().path().to_path_buf();
    host.deploy(vec![kv_spec(&["default:*"])]).await;
    assert_eq!(host.get("/kv/incr?key=n&by=7").await.body, "n=7\n");
    let TestHost { running, state: guard, .. } = host;
    running.shutdown().await;
    let again = TestHost::start_with(Some(state)).await;
    assert_eq!(again.get("/kv/incr?key=n").await.body, "n=8\n");
    drop(guard);
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9_of_the_host() {
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        state.path(),
        &format!(
            "[[function]]\nname = \"kv\"\nwasm = \"{}\"\nroutes = [\"/kv\"]\n[function.grants]\nkeyvalue = [\"default:*\"]\n",
            crate::support::guest("kv").display()
        ),
    );
    let mut host = HostProcess::spawn(state.path(), Some(&manifest));
    let client = reqwest::Client::new();
    for i in 1..=25 {
        let body = client.get(host.url("/kv/incr?key=n")).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, format!("n={i}\n"));
    }
    host.kill9();
    let host = HostProcess::spawn(state.path(), None);
    let body = reqwest::get(host.url("/kv/get?key=n")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "25");
}
