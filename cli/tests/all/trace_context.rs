//! W3C trace context: a client's `traceparent` is kept (or a trace is
//! started), and its trace id travels into usage records, log lines,
//! nested calls and outbound HTTP.

use std::collections::BTreeSet;

use crate::support::{Reply, TestHost, spec};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent() -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
}

#[tokio::test]
async fn a_clients_trace_reaches_the_records_and_log_lines_of_the_request_and_its_nested_calls() {
    let host = TestHost::start_persistent().await;
    let mut invoker = spec("invoker", "invoker", "/invoker");
    invoker.grants.invoke = BTreeSet::from(["lifecycle".to_string()]);
    host.deploy(vec![invoker, spec("lifecycle", "lifecycle", "/lc")]).await;
    let request = host
        .client
        .get(host.url("/invoker/call?fn=lifecycle"))
        .header("x-request-id", "traced-1")
        .header("traceparent", client_traceparent());
    let reply = Reply::read(request.send().await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let parent = records.iter().find(|r| r.request_id == "traced-1").unwrap();
    let child = records.iter().find(|r| r.request_id == "traced-1/1").unwrap();
    assert_eq!(parent.trace_id.as_deref(), Some(CLIENT_TRACE), "the caller's record");
    assert_eq!(child.trace_id.as_deref(), Some(CLIENT_TRACE), "the nested call's record");

    let lines = host.lines_of("lifecycle");
    let line = lines.iter().find(|line| line.text == "lifecycle: request 1").unwrap();
    assert_eq!(line.request_id.as_deref(), Some("traced-1/1"));
    assert_eq!(line.trace_id.as_deref(), Some(CLIENT_TRACE), "the callee's log line names the trace");
}

#[tokio::test]
async fn a_request_without_a_valid_traceparent_starts_a_trace_of_its_own() {
    let host = TestHost::start_persistent().await;
    host.deploy(vec![spec("hello", "hello", "/hello")]).await;
    let plain = host.client.get(host.url("/hello")).header("x-request-id", "plain");
    assert_eq!(plain.send().await.unwrap().status(), 200);
    // Uppercase hex is not a traceparent: the host starts a new trace.
    let bad = host
        .client
        .get(host.url("/hello"))
        .header("x-request-id", "bad")
        .header("traceparent", format!("00-{}-{CLIENT_SPAN}-01", CLIENT_TRACE.to_uppercase()));
    assert_eq!(bad.send().await.unwrap().status(), 200);

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let trace_of = |id: &str| records.iter().find(|r| r.request_id == id).unwrap().trace_id.clone().unwrap();
    let (plain, bad) = (trace_of("plain"), trace_of("bad"));
    for trace in [&plain, &bad] {
        assert_eq!(trace.len(), 32, "{trace}");
        assert!(trace.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{trace}");
        assert_ne!(&**trace, "0".repeat(32));
    }
    assert_ne!(plain, bad, "each request starts its own trace");
    assert_ne!(bad.to_uppercase(), CLIENT_TRACE.to_uppercase(), "an invalid traceparent is not kept");
}

#[tokio::test]
async fn outbound_http_carries_the_trace_to_the_server_called() {
    // A server that answers with the traceparent it was sent.
    let addr = crate::support::upstream(|request| {
        let seen = request.headers().get("traceparent").map(|value| value.to_str().unwrap_or("?").to_string());
        seen.unwrap_or_else(|| "none".to_string())
    })
    .await;
    let host = TestHost::start().await;
    let mut fetch = spec("fetch", "fetch", "/fetch");
    fetch.grants.outbound_http = BTreeSet::from([addr.to_string()]);
    host.deploy(vec![fetch]).await;

    let request = host
        .client
        .get(host.url(&format!("/fetch?url=http://{addr}/traced")))
        .header("traceparent", client_traceparent());
    let reply = Reply::read(request.send().await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let fields: Vec<&str> = reply.body.split('-').collect();
    assert_eq!(fields.len(), 4, "the server called got a traceparent: {}", reply.body);
    assert_eq!(fields[1], CLIENT_TRACE, "of the client's trace");
    assert_ne!(fields[2], CLIENT_SPAN, "from a span of the host's, not the client's");
}

#[tokio::test]
async fn the_hosts_log_lines_sit_in_their_requests_span_and_a_nested_calls_in_its_callers() {
    use crate::support::{HostProcess, manifest_entry, write_manifest};
    // Without span directives the host makes a request's span only when
    // something logs inside it; with one (`EnvFilter`) it makes each at
    // once. The lines must read the same either way.
    for rust_log in ["info", "info,[request{function=hello}]=debug"] {
        let state = tempfile::tempdir().unwrap();
        let grants = "[function.grants]\ninvoke = [\"panic\"]\n";
        let body = format!(
            "{}{grants}{}{}",
            manifest_entry("invoker", "invoker", "/invoker"),
            manifest_entry("panic", "panic", "/panic"),
            manifest_entry("hello", "hello", "/hello")
        );
        let manifest = write_manifest(state.path(), &body);
        let mut host = HostProcess::spawn_with_env(state.path(), Some(&manifest), &[("RUST_LOG", rust_log)]);
        let client = reqwest::Client::new();
        let call = client
            .get(host.url("/invoker/call?fn=panic"))
            .header("x-request-id", "traced-log")
            .header("traceparent", client_traceparent());
        call.send().await.unwrap();
        let hello = client.get(host.url("/hello")).header("x-request-id", "hello-log").send().await.unwrap();
        assert_eq!(hello.status(), 200);
        assert!(host.terminate().success());
        let log = host.log();

        let caller = format!(
            "request{{tenant=default function=invoker request_id=traced-log parent_id=\"-\" trace_id={CLIENT_TRACE} span_id="
        );
        let callee = format!(
            "}}:request{{tenant=default function=panic request_id=traced-log/1 parent_id=\"traced-log\" \
             trace_id={CLIENT_TRACE} span_id="
        );
        let in_callee = |line: &&str| line.contains(&caller) && line.contains(&callee);
        let failed = log.lines().filter(in_callee).find(|line| line.contains("shoal::dispatch: request failed"));
        assert!(failed.is_some_and(|line| line.contains(" WARN ")), "RUST_LOG={rust_log}: {log}");
        let guest = log.lines().filter(in_callee).find(|line| line.contains("shoal::guest: panic requested by"));
        assert!(guest.is_some(), "RUST_LOG={rust_log}: the guest's own line: {log}");

        // The span directive turns on what is logged inside hello's span.
        let served = log.lines().find(|line| line.contains("request served"));
        if rust_log == "info" {
            assert!(served.is_none(), "{log}");
        } else {
            let line = served.unwrap_or_else(|| panic!("RUST_LOG={rust_log}: no `request served`: {log}"));
            assert!(
                line.contains("request{tenant=default function=hello request_id=hello-log parent_id=\"-\""),
                "{line}"
            );
        }
    }
}
