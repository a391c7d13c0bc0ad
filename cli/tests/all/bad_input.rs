//! Bad input gets a clear error naming what and where; the host keeps
//! running and nothing already deployed is lost.

use std::path::Path;

use crate::support::{HostProcess, guest, manifest_entry, shoal_bin, write_manifest};

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Deploy a one-function manifest whose wasm is `wasm`; return stderr.
fn deploy_wasm(host: &HostProcess, dir: &Path, name: &str, wasm: &Path) -> String {
    let manifest = write_manifest(dir, &format!("[[function]]\nname = \"{name}\"\nwasm = \"{}\"\n", wasm.display()));
    let output = host.cli(&["deploy", manifest.to_str().unwrap()]);
    assert!(!output.status.success(), "deploy of {name} should fail");
    stderr_of(&output)
}

#[tokio::test]
async fn each_bad_input_is_refused_with_a_clear_error_and_the_host_keeps_serving() {
    let state = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = write_manifest(state.path(), &manifest_entry("hello", "hello", "/hello"));
    let host = HostProcess::spawn(state.path(), Some(&good));

    // A manifest that does not exist.
    let missing = host.cli(&["deploy", "/no/such/shoal.toml"]);
    assert!(stderr_of(&missing).contains("/no/such/shoal.toml: cannot read manifest"), "{}", stderr_of(&missing));

    // An invalid manifest: the file, the line and the field.
    let typo = write_manifest(dir.path(), "[[function]]\nname = \"x\"\nwsam = \"x.wasm\"\n");
    let err = stderr_of(&host.cli(&["deploy", typo.to_str().unwrap()]));
    assert!(err.contains("shoal.toml") && err.contains("line 3") && err.contains("unknown field `wsam`"), "{err}");

    // A wasm file that does not exist.
    let err = deploy_wasm(&host, dir.path(), "ghost", Path::new("/no/such.wasm"));
    assert!(err.contains("function \"ghost\": cannot read its wasm /no/such.wasm"), "{err}");

    // Bytes that are not wasm.
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asn not wasm at all").unwrap();
    let err = deploy_wasm(&host, dir.path(), "garbage", &garbage);
    assert!(err.contains("function \"garbage\": invalid wasm"), "{err}");

    // A truncated component: right header, broken body.
    let truncated = dir.path().join("truncated.wasm");
    let bytes = std::fs::read(guest("hello")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = deploy_wasm(&host, dir.path(), "truncated", &truncated);
    assert!(err.contains("function \"truncated\": invalid wasm"), "{err}");

    // A core module where a component is needed.
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, wat::parse_str("(module (func (export \"_start\")))").unwrap()).unwrap();
    let err = deploy_wasm(&host, dir.path(), "core", &core);
    assert!(err.contains("core wasm module, not a component") && err.contains("wasm32-wasip2"), "{err}");

    // A component without the HTTP handler export.
    let err = deploy_wasm(&host, dir.path(), "command", &guest("cli-hello"));
    assert!(err.contains("function \"command\"") && err.contains("wasi:http/incoming-handler"), "{err}");

    // Unknown functions.
    let err = stderr_of(&host.cli(&["undeploy", "nope"]));
    assert!(err.contains("no function named \"nope\""), "{err}");
    let invoke = host.cli(&["invoke", "nope"]);
    assert!(!invoke.status.success() && invoke.stdout.is_empty());
    assert!(stderr_of(&invoke).contains("no function named \"nope\""), "{}", stderr_of(&invoke));

    // Through all of that, the host kept serving what it had, and only that.
    let body = reqwest::get(host.url("/hello")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "hello, world\n");
    let ls = host.cli(&["ls", "--json"]);
    let functions: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    let names: Vec<&str> = functions.as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hello"]);
}

#[tokio::test]
async fn serve_with_an_invalid_manifest_exits_with_the_error_before_serving() {
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), "[[function]]\nname = \"Bad Name\"\nwasm = \"x.wasm\"\n");
    let output = std::process::Command::new(shoal_bin())
        .arg("--state-dir")
        .arg(state.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains("shoal.toml") && err.contains("invalid name \"Bad Name\""), "{err}");
}

#[tokio::test]
async fn the_cli_invokes_lists_and_reports_usage() {
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), &manifest_entry("hello", "hello", "/hello"));
    let host = HostProcess::spawn(state.path(), Some(&manifest));
    let invoke = host.cli(&["invoke", "hello", "--path", "/hello?name=cli"]);
    assert!(invoke.status.success(), "{}", stderr_of(&invoke));
    assert_eq!(String::from_utf8_lossy(&invoke.stdout), "hello, cli\n");
    let ls = String::from_utf8_lossy(&host.cli(&["ls"]).stdout).into_owned();
    assert!(ls.lines().any(|l| l.starts_with("hello") && l.ends_with("/hello")), "{ls}");
    assert!(ls.lines().next().is_some_and(|header| header.contains(" CODE ")), "{ls}");
    let hello = ls.lines().find(|l| l.starts_with("hello")).unwrap_or_default();
    assert!(hello.contains(" baseline ") || hello.contains(" optimized "), "whose code it runs: {ls}");
    let usage =
        String::from_utf8_lossy(&host.cli(&["usage", "--function", "hello", "--since", "1h"]).stdout).into_owned();
    let row = usage.lines().find(|l| l.starts_with("default ")).unwrap_or_else(|| panic!("{usage}"));
    assert_eq!(row.split_whitespace().take(3).collect::<Vec<_>>(), ["default", "hello", "1"], "one request: {row}");
    let none =
        String::from_utf8_lossy(&host.cli(&["usage", "--since", "2000-01-01T00:00:00Z", "--function", "x"]).stdout)
            .into_owned();
    assert_eq!(none.lines().count(), 1, "only the header: {none}");
}

#[tokio::test]
async fn the_cli_stops_quietly_when_its_reader_goes_away() {
    // `shoal ls | head -1`: the reader closes the pipe; what it wanted it
    // has, so the CLI ends without a panic and without an error.
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), &manifest_entry("hello", "hello", "/hello"));
    let host = HostProcess::spawn(state.path(), Some(&manifest));
    for args in [&["ls"][..], &["usage"], &["ls", "--json"]] {
        let mut child = std::process::Command::new(shoal_bin())
            .arg("--state-dir")
            .arg(&host.state_dir)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let output = child.wait_with_output().unwrap();
        let stderr = stderr_of(&output);
        assert!(!stderr.contains("panicked"), "shoal {args:?} panicked: {stderr}");
        assert!(output.status.success(), "shoal {args:?}: {:?} {stderr}", output.status);
    }
}

#[tokio::test]
async fn sigterm_drains_runs_destroy_and_exits_zero() {
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), &manifest_entry("lifecycle", "lifecycle", "/lc"));
    let mut host = HostProcess::spawn(state.path(), Some(&manifest));
    reqwest::get(host.url("/lc")).await.unwrap().text().await.unwrap();
    let status = host.terminate();
    assert!(status.success(), "{status:?}");
    let log = host.log();
    assert!(log.contains("lifecycle: destroy after 1 requests"), "{log}");
    assert!(!host.state_dir.join("admin.sock").exists(), "the admin socket is removed");
}

#[tokio::test]
async fn each_denied_call_is_logged_with_function_capability_and_request_id() {
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), &manifest_entry("intruder", "intruder", "/intruder"));
    let host = HostProcess::spawn(state.path(), Some(&manifest));
    let response =
        reqwest::Client::new().get(host.url("/intruder")).header("x-request-id", "intrusion-1").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let log = host.log();
    for capability in ["keyvalue.open", "pubsub.publish", "invoke.call", "config.get", "secrets.get", "http.outgoing"] {
        let line = log
            .lines()
            .find(|line| line.contains("denied:") && line.contains(&format!("capability=\"{capability}\"")))
            .unwrap_or_else(|| panic!("no denial logged for {capability} in\n{log}"));
        assert!(line.contains("function=\"intruder\"") && line.contains("request_id=\"intrusion-1\""), "{line}");
    }
}

/// POST `body` to the admin API's deploy endpoint as it is (no CLI in
/// between, as any other client could); the status and the response text.
fn admin_deploy_raw(socket: &Path, body: &[u8]) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let head = format!(
        "POST /v1/functions HTTP/1.1\r\nHost: shoal\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    (status, response)
}

#[tokio::test]
async fn the_admin_api_refuses_what_the_manifest_would_refuse() {
    use base64::Engine as _;
    let state = tempfile::tempdir().unwrap();
    let good = write_manifest(state.path(), &manifest_entry("hello", "hello", "/hello"));
    let host = HostProcess::spawn(state.path(), Some(&good));
    let socket = state.path().join("admin.sock");

    let text = manifest_entry("other", "hello", "/other");
    let spec = shoal::manifest::Manifest::parse(&text, Path::new("shoal.toml")).unwrap().resolve().unwrap().remove(0);
    let wasm = base64::engine::general_purpose::STANDARD.encode(std::fs::read(guest("hello")).unwrap());
    let deploy_with = |field: &[&str], value: serde_json::Value| {
        let mut spec = serde_json::to_value(&spec).unwrap();
        let mut slot = &mut spec;
        for key in field {
            slot = &mut slot[*key];
        }
        *slot = value;
        let body = serde_json::json!({ "functions": [{ "spec": spec, "wasm_base64": wasm }] });
        admin_deploy_raw(&socket, &serde_json::to_vec(&body).unwrap())
    };

    let (status, response) = deploy_with(&["limits", "max_concurrency"], 0.into());
    assert_eq!(status, 422, "{response}");
    assert!(response.contains("limits.max_concurrency must be greater than 0"), "{response}");

    let (status, response) = deploy_with(&["weight"], 0.into());
    assert_eq!(status, 422, "{response}");
    assert!(response.contains("weight 0"), "a lone version of weight 0 could serve nothing: {response}");

    let (status, response) = deploy_with(&["name"], "Not_A_Name".into());
    assert_eq!(status, 422, "{response}");
    assert!(response.contains("invalid name \\\"Not_A_Name\\\""), "{response}");

    // Nothing was deployed, and the host serves on.
    let listed = String::from_utf8_lossy(&host.cli(&["ls"]).stdout).into_owned();
    assert!(!listed.contains("other"), "{listed}");
    let reply = reqwest::get(host.url("/hello")).await.unwrap();
    assert_eq!(reply.status(), 200);
}

#[tokio::test]
async fn a_guest_refused_in_a_loop_costs_a_bounded_log_and_every_refusal_is_counted() {
    let state = tempfile::tempdir().unwrap();
    let manifest = write_manifest(state.path(), &manifest_entry("intruder", "intruder", "/intruder"));
    let host = HostProcess::spawn(state.path(), Some(&manifest));
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    for _ in 0..40 {
        assert_eq!(client.get(host.url("/intruder")).send().await.unwrap().status(), 200);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let metrics = client.get(host.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let counted: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("shoal_abi_denied_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let per_request = counted / 40.0;
    assert!(per_request >= 6.0, "every refusal is counted: {counted} for 40 requests\n{metrics}");
    let logged = host.log().lines().filter(|line| line.contains("denied:") || line.contains("limited:")).count();
    // 20 lines a second (and as many at once), however many refusals.
    let allowed = 20.0 + 20.0 * (elapsed + 1.0);
    assert!((logged as f64) <= allowed, "{logged} refusal lines in {elapsed:.2} s (at most {allowed})");
    assert!((logged as f64) < counted, "some lines were suppressed: {logged} of {counted}");
    // Once the budget is back, the next line says how many it left out.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(client.get(host.url("/intruder")).send().await.unwrap().status(), 200);
    let reported = host.log().lines().any(|line| {
        line.split("suppressed=")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
            .is_some_and(|suppressed| suppressed > 0)
    });
    assert!(reported, "a logged line says how many were suppressed before it:\n{}", host.log());
}
