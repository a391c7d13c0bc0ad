//! Every capability, granted and not: a denied call is an error value the
//! guest handles, counted in `/metrics`; the guest and the host go on.

use std::collections::BTreeSet;

use shoal::manifest::KeyGrant;

use crate::support::{TestHost, spec};

#[tokio::test]
async fn a_function_trying_everything_ungranted_gets_error_values_and_keeps_running() {
    let host = TestHost::start().await;
    let mut intruder = spec("intruder", "intruder", "/intruder");
    // It may touch `default:mine/*` and nothing else.
    intruder.grants.keyvalue = vec![KeyGrant::parse("default:mine/*").unwrap()];
    host.deploy(vec![intruder, spec("hello", "hello", "/hello")]).await;

    let reply = host.get("/intruder").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let lines: Vec<&str> = reply.body.lines().collect();
    assert_eq!(lines.len(), 7, "{}", reply.body);
    for line in &lines {
        assert!(line.contains(": refused ("), "{line}");
    }
    assert!(reply.body.contains("kv.open: refused (Error::AccessDenied)"), "{}", reply.body);
    assert!(reply.body.contains("kv.get: refused (Error::AccessDenied)"), "{}", reply.body);
    assert!(
        reply.body.contains(r#"Denied("function \"intruder\" is not granted publishing to topic \"payments\"")"#),
        "{}",
        reply.body
    );
    assert!(reply.body.contains(r#"not granted invoking function \"hello\""#), "{}", reply.body);
    assert!(
        reply.body.contains(r#"Upstream("function \"intruder\" is not granted config key \"db-password\"")"#),
        "{}",
        reply.body
    );
    assert!(reply.body.contains(r#"not granted secret \"api-token\""#), "{}", reply.body);
    assert!(reply.body.contains("http.outgoing: refused (ErrorCode::HttpRequestDenied)"), "{}", reply.body);

    let metrics = host.get("/metrics").await.body;
    for capability in
        ["keyvalue.open", "keyvalue.get", "pubsub.publish", "invoke.call", "config.get", "secrets.get", "http.outgoing"]
    {
        let series = format!(r#"shoal_abi_denied_total{{capability="{capability}",function="intruder"}} 1"#);
        assert!(metrics.contains(&series), "missing {series}");
    }
    // The same instance served the request to the end, and serves again.
    assert_eq!(host.get("/intruder").await.status, 200);
    assert_eq!(host.get("/hello").await.status, 200);
}

/// A host whose secret store holds `api-token` (`t0k3n`) and
/// `root-token`; the folder lives as long as the first value.
pub(crate) async fn host_with_secrets() -> (tempfile::TempDir, TestHost) {
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("api-token"), b"t0k3n").unwrap();
    std::fs::write(secrets.path().join("root-token"), b"nope").unwrap();
    let host = TestHost::start_configured(|config| config.secrets_dir = Some(secrets.path().into())).await;
    (secrets, host)
}

#[tokio::test]
async fn granted_config_and_secrets_are_readable_and_others_are_denied() {
    let (_secrets, host) = host_with_secrets().await;
    let mut settings = spec("settings", "settings", "/settings");
    settings.grants.config.insert("greeting".into(), "ahoy".into());
    settings.grants.secrets = BTreeSet::from(["api-token".to_string(), "missing".to_string()]);
    host.deploy(vec![settings]).await;

    assert_eq!(host.get("/settings").await.body, "ahoy; api-token has 5 bytes\n");
    assert_eq!(host.get("/settings/secret?name=api-token").await.body, "t0k3n");
    let denied = host.get("/settings/secret?name=root-token").await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(denied.body.contains(r#"not granted secret \"root-token\""#), "{}", denied.body);
    let missing = host.get("/settings/secret?name=missing").await;
    assert_eq!(missing.status, 404, "granted but absent: {}", missing.body);
    assert_eq!(host.get("/settings/config?key=greeting").await.body, "ahoy");
    let denied = host.get("/settings/config?key=db-password").await;
    assert_eq!(denied.status, 403);
    assert!(denied.body.contains(r#"not granted config key \"db-password\""#), "{}", denied.body);
}

#[tokio::test]
async fn outbound_http_reaches_granted_authorities_only() {
    // A real HTTP server on loopback.
    let addr = crate::support::upstream(|request| format!("upstream saw {}", request.uri().path())).await;
    let host = TestHost::start().await;
    let mut fetch = spec("fetch", "fetch", "/fetch");
    fetch.grants.outbound_http = BTreeSet::from([addr.to_string()]);
    host.deploy(vec![fetch]).await;

    let allowed = host.get(&format!("/fetch?url=http://{addr}/data")).await;
    assert_eq!((allowed.status, allowed.body.as_str()), (200, "upstream saw /data"));
    let other_port = host.get("/fetch?url=http://127.0.0.1:9/data").await;
    assert_eq!(other_port.status, 502);
    assert!(other_port.body.contains("HttpRequestDenied"), "{}", other_port.body);
}

#[tokio::test]
async fn secrets_can_come_from_the_hosts_environment() {
    use crate::support::{HostProcess, guest, write_manifest};
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(
        state.path(),
        &format!(
            "[[function]]\nname = \"settings\"\nwasm = \"{}\"\nroutes = [\"/settings\"]\n\
             [function.grants]\nsecrets = [\"api-token\"]\n",
            guest("settings").display()
        ),
    );
    let host = HostProcess::spawn_with_env(state.path(), Some(&manifest), &[("SHOAL_SECRET_API_TOKEN", "from-env")]);
    let body = reqwest::get(host.url("/settings/secret?name=api-token")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "from-env");
}
