//! Calling another function: its own limits, grants and usage record, and
//! a bounded depth.

use std::collections::BTreeSet;

use shoal::outcome::Outcome;

use crate::support::{TestHost, spec};

fn invoker(grants: &[&str]) -> shoal::manifest::FunctionSpec {
    let mut invoker = spec("invoker", "invoker", "/invoker");
    invoker.grants.invoke = grants.iter().map(std::string::ToString::to_string).collect::<BTreeSet<_>>();
    invoker
}

#[tokio::test]
async fn an_invoked_function_answers_and_is_metered_as_a_child_request() {
    let host = TestHost::start_persistent().await;
    host.deploy(vec![invoker(&["hello"]), spec("hello", "hello", "/hello")]).await;
    let reply = host.client.get(host.url("/invoker/call?fn=hello&path=/nested")).header("x-request-id", "top-1");
    let reply = crate::support::Reply::read(reply.send().await.unwrap()).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "hello, world\n"));

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let child = records.iter().find(|r| r.function == "hello").unwrap();
    assert_eq!(child.parent_id.as_deref(), Some("top-1"));
    assert_eq!(child.request_id, "top-1/1");
    let parent = records.iter().find(|r| r.function == "invoker").unwrap();
    assert_eq!((&*parent.request_id, parent.parent_id.as_deref()), ("top-1", None));
}

#[tokio::test]
async fn the_callee_runs_under_its_own_limits() {
    let host = TestHost::start().await;
    let mut spin = spec("endless", "endless", "/endless");
    spin.limits.timeout = std::time::Duration::from_millis(100);
    let mut caller = invoker(&["endless"]);
    caller.limits.timeout = std::time::Duration::from_secs(5);
    host.deploy(vec![caller, spin]).await;
    let reply = host.get("/invoker/call?fn=endless").await;
    assert_eq!(reply.status, 504, "the callee's timeout, relayed: {}", reply.body);
    assert!(reply.body.contains("timeout of 100 ms"), "{}", reply.body);
}

#[tokio::test]
async fn invoking_an_ungranted_or_unknown_function_is_an_error_value() {
    let host = TestHost::start().await;
    host.deploy(vec![invoker(&["ghost"]), spec("hello", "hello", "/hello")]).await;
    let denied = host.get("/invoker/call?fn=hello").await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    let missing = host.get("/invoker/call?fn=ghost").await;
    assert_eq!(missing.status, 404, "{}", missing.body);
}

#[tokio::test]
async fn a_cycle_of_invokes_ends_at_the_depth_limit_instead_of_hanging() {
    let host = TestHost::start_persistent().await;
    host.deploy(vec![invoker(&["invoker"])]).await;
    let reply = host.get("/invoker/loop").await;
    assert_eq!(reply.status, 508, "{}", reply.body);
    assert!(reply.body.contains("invoke depth limit of 8"), "{}", reply.body);
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    assert_eq!(records.len(), 9, "the request and 8 nested calls");
    assert!(records.iter().all(|r| r.outcome == Outcome::Ok));
}

#[tokio::test]
async fn the_request_id_travels_into_the_callees_log_lines() {
    let host = TestHost::start().await;
    host.deploy(vec![invoker(&["lifecycle"]), spec("lifecycle", "lifecycle", "/lc")]).await;
    let reply = host.client.get(host.url("/invoker/call?fn=lifecycle")).header("x-request-id", "trace-7");
    assert_eq!(reply.send().await.unwrap().status(), 200);
    let lines = host.lines_of("lifecycle");
    let request_line = lines.iter().find(|line| line.text == "lifecycle: request 1").unwrap();
    assert_eq!(request_line.request_id.as_deref(), Some("trace-7/1"));
}
