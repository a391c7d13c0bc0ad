//! WASI 0.3 functions (`wasi:http/handler@0.3.0`, built with the upstream
//! `wasip3` bindings) served beside WASI 0.2 ones: the same Runtime ABI and
//! capability checks, the same limits and usage records; and WASI 0.3
//! programs (`wasi:cli/run@0.3.0`) as containers.

use std::collections::BTreeSet;
use std::num::NonZeroU64;
use std::time::Duration;

use shoal::manifest::{FunctionSpec, KeyGrant};
use shoal::outcome::Outcome;

use crate::pubsub::{inbox_receives, subscriber};
use crate::support::{TestHost, spec};

/// `functions/hello-p3` at `/p3`, granted what it uses (or nothing).
fn p3(name: &str, granted: bool) -> FunctionSpec {
    let mut function = spec(name, "hello-p3", &format!("/{name}"));
    if granted {
        function.grants.keyvalue = vec![KeyGrant::parse("default:hits").unwrap()];
        function.grants.publish = BTreeSet::from(["orders".to_string()]);
        function.grants.invoke = BTreeSet::from(["hello".to_string()]);
        function.grants.config = [("greeting".to_string(), "ahoy from 0.3".to_string())].into();
    }
    function
}

#[tokio::test]
async fn a_wasi_0_3_function_answers_beside_a_0_2_one_and_reaches_the_runtime_abi() {
    let host = TestHost::start_persistent().await;
    let reports = host
        .deploy(vec![p3("p3", true), p3("bare", false), spec("hello", "hello", "/hello"), subscriber("orders")])
        .await;
    assert_eq!(reports.len(), 4, "{reports:?}");

    assert_eq!(host.get("/p3?name=ann").await.body, "hello, ann\n");
    assert_eq!(host.get("/hello").await.status, 200, "the 0.2 function serves as before");
    for expected in ["1\n", "2\n"] {
        let count = host.client.post(host.url("/p3/count")).send().await.unwrap();
        assert_eq!(crate::support::Reply::read(count).await.body, expected);
    }
    assert_eq!(host.get("/p3/greeting").await.body, "ahoy from 0.3\n");
    let published = host.client.post(host.url("/p3/publish?msg=from-p3")).send().await.unwrap();
    assert_eq!(crate::support::Reply::read(published).await.status, 202);
    assert!(inbox_receives(&host, "from-p3").await, "the message reached the subscriber");
    let invoked = host.get("/p3/invoke?fn=hello").await;
    assert_eq!((invoked.status, invoked.body.as_str()), (200, "hello, world\n"), "{}", invoked.body);

    // Without grants, each call is refused with the ABI's error value.
    let count = host.client.post(host.url("/bare/count")).send().await.unwrap();
    let count = crate::support::Reply::read(count).await;
    assert_eq!(count.status, 403, "{}", count.body);
    let invoked = host.get("/bare/invoke?fn=hello").await;
    assert_eq!(invoked.status, 403, "{}", invoked.body);
    assert!(invoked.body.contains("not granted"), "{}", invoked.body);

    // Each request has its own usage record.
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let served = records.iter().filter(|record| record.function == "p3" && record.outcome == Outcome::Ok).count();
    assert_eq!(served, 6, "hello, 2 counts, greeting, publish, invoke: {records:#?}");
}

#[tokio::test]
async fn a_wasi_0_3_function_is_held_to_its_timeout_and_fuel_and_the_instance_is_replaced() {
    let host = TestHost::start_persistent().await;
    let mut slow = p3("slow", false);
    slow.limits.timeout = Duration::from_millis(300);
    let mut fueled = p3("fueled", false);
    fueled.limits.fuel_per_request = NonZeroU64::new(5_000_000);
    host.deploy(vec![slow, fueled]).await;

    let timed_out = host.get("/slow/spin/100000000000").await;
    assert_eq!(timed_out.status, 504, "{}", timed_out.body);
    assert!(timed_out.body.contains("timeout of 300 ms"), "{}", timed_out.body);
    let slept = host.get("/slow/sleep/2000").await;
    assert_eq!(slept.status, 504, "a guest waiting on a clock is cut off too: {}", slept.body);
    assert_eq!(host.get("/slow?name=again").await.body, "hello, again\n", "a fresh instance serves on");

    let small = host.get("/fueled/spin/1000").await;
    assert_eq!(small.status, 200, "{}", small.body);
    let burnt = host.get("/fueled/spin/100000000").await;
    assert_ne!(burnt.status, 200, "{}", burnt.body);
    assert!(burnt.body.contains("fuel_per_request of 5000000"), "{}", burnt.body);
    assert_eq!(host.get("/fueled?name=x").await.body, "hello, x\n");

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let fueled: Vec<_> = records.iter().filter(|record| record.function == "fueled").collect();
    assert_eq!(fueled.len(), 3, "{fueled:#?}");
    assert!(fueled.iter().all(|record| record.fuel.is_some_and(|fuel| fuel > 0)), "{fueled:#?}");
    assert_eq!(fueled[1].outcome, Outcome::FuelExhausted, "{fueled:#?}");
    assert!(fueled[1].fuel.unwrap() >= 5_000_000, "{fueled:#?}");
    let slow: Vec<_> = records.iter().filter(|record| record.function == "slow").collect();
    assert_eq!(slow.iter().filter(|record| record.outcome == Outcome::Timeout).count(), 2, "{slow:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasi_0_3_program_runs_as_a_container_with_its_arguments_environment_output_and_exit_status() {
    use crate::cluster::{Containerd, SERIAL};
    use crate::kubernetes::{RUNTIME, import, text};
    let _serial = SERIAL.lock().await;
    let containerd = Containerd::start(None);
    let wasm = crate::support::guest("cli-hello-p3");
    import(&containerd, &wasm, "localhost/shoal-test/cli-hello-p3:1", &["-e", "GREETING_NAME=p3"]);
    let run = |name: &str, extra: &[&str]| {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.extend(["localhost/shoal-test/cli-hello-p3:1", name, "/cli_hello_p3.wasm", "one", "two"]);
        containerd.ctr("default", &args)
    };
    let output = run("p3-ok", &[]);
    let out = text(&output);
    assert!(output.status.success(), "ctr run failed: {out}\n{}", containerd.host_log());
    assert!(out.contains(r#"hello from a wasi:cli@0.3 command, args ["one", "two"]"#), "{out}");
    assert!(out.contains("hello, p3"), "the image's environment, through wasi:cli@0.3: {out}");
    assert!(out.contains("cli-hello-p3: done"), "{out}");

    // `run` returning an error is exit status 1.
    let output = run("p3-fail", &["--env", "FAIL=1"]);
    let out = text(&output);
    assert_eq!(output.status.code(), Some(1), "{out}\n{}", containerd.host_log());
    assert!(out.contains("failing, as FAIL asks"), "{out}");
}
