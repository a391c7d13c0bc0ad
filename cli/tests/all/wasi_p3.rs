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
    assert_eq!(host.get("/p3/keys").await.body, "hits\n", "list-keys shows the granted key");
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
    assert!(count.body.contains("not granted key \"hits\" of bucket \"default\""), "{}", count.body);
    let keys = host.get("/bare/keys").await;
    assert_eq!(keys.status, 403, "{}", keys.body);
    let published = host.client.post(host.url("/bare/publish?msg=x")).send().await.unwrap();
    let published = crate::support::Reply::read(published).await;
    assert_eq!(published.status, 403, "{}", published.body);
    let invoked = host.get("/bare/invoke?fn=hello").await;
    assert_eq!(invoked.status, 403, "{}", invoked.body);
    assert!(invoked.body.contains("not granted"), "{}", invoked.body);

    // Each request has its own usage record.
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let served = records.iter().filter(|record| record.function == "p3" && record.outcome == Outcome::Ok).count();
    assert_eq!(served, 7, "hello, 2 counts, keys, greeting, publish, invoke: {records:#?}");
}

#[tokio::test]
async fn a_wasi_0_3_function_reads_a_granted_secret_through_the_async_call_and_is_denied_others() {
    let (_secrets, host) = crate::grants::host_with_secrets().await;
    let mut function = p3("p3", false);
    function.grants.secrets = BTreeSet::from(["api-token".to_string(), "missing".to_string()]);
    host.deploy(vec![function]).await;

    let granted = host.get("/p3/secret?name=api-token").await;
    assert_eq!((granted.status, granted.body.as_str()), (200, "secret api-token has 5 bytes\n"));
    let other = host.get("/p3/secret?name=root-token").await;
    assert_eq!(other.status, 403, "{}", other.body);
    assert!(other.body.contains("not granted secret \"root-token\""), "{}", other.body);
    let missing = host.get("/p3/secret?name=missing").await;
    assert_eq!(missing.status, 404, "granted but not held: {}", missing.body);
}

#[tokio::test]
async fn a_key_value_call_from_a_wasi_0_3_request_lets_the_other_requests_of_its_instance_run_while_redis_waits() {
    let redis = crate::support::RedisServer::start().await;
    let host = crate::redis_backend::host_on(&redis).await;
    host.deploy(vec![p3("p3", true)]).await;
    let redis_cli = |args: &[&str]| {
        let output = std::process::Command::new("redis-cli").args(["-u", &redis.url]).args(args).output().unwrap();
        assert!(output.status.success(), "redis-cli {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let count = || async {
        let response = host.client.post(host.url("/p3/count")).header("x-request-id", "counting").send().await;
        let reply = crate::support::Reply::read(response.unwrap()).await;
        (reply, std::time::Instant::now())
    };
    assert_eq!(count().await.0.body, "1\n", "warm: the instance exists and Redis answers");

    // Redis holds every write for 600 ms: the increment waits on it, and a
    // request to the same instance made meanwhile is answered first.
    assert_eq!(redis_cli(&["CLIENT", "PAUSE", "600", "WRITE"]), "OK");
    let greeted = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reply = get_as(&host, "/p3?name=meanwhile", "meanwhile".into()).await;
        (reply, std::time::Instant::now())
    };
    let ((counted, count_done), (greeted, greet_done)) = tokio::join!(count(), greeted);
    assert_eq!((counted.status, counted.body.as_str()), (200, "2\n"), "{}", counted.body);
    assert_eq!(greeted.body, "hello, meanwhile\n");
    // Answered while Redis still held the write (not as it let go: a
    // greeting held behind the call would arrive with it).
    let ahead = count_done.saturating_duration_since(greet_done);
    assert!(ahead >= Duration::from_millis(250), "the greeting waited for the increment ({ahead:?} ahead of it)");
    assert_eq!(host.live_instances("p3").await, 1, "both in one instance");
    assert_eq!(redis_cli(&["GET", "shoal:kv:default:hits"]), "2", "{:?}", redis.keys());
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

/// GET `path` with the client's request id `id`.
async fn get_as(host: &TestHost, path: &str, id: String) -> crate::support::Reply {
    let response = host.client.get(host.url(path)).header("x-request-id", id).send().await.unwrap();
    crate::support::Reply::read(response).await
}

#[tokio::test]
async fn requests_to_a_wasi_0_3_function_share_one_instance_and_each_keeps_its_own_record() {
    let host = TestHost::start_persistent().await;
    let mut shared = p3("shared", true);
    // Metered, so that each record has its own fuel.
    shared.limits.fuel_per_request = NonZeroU64::new(50_000_000_000);
    host.deploy(vec![shared, spec("hello", "hello", "/hello")]).await;

    // Six requests wait on a clock while one computes and one invokes:
    // all in one instance (instance_concurrency is 16 by default).
    let sleepers = (0..6).map(|n| get_as(&host, "/shared/sleep/600", format!("sleep-{n}")));
    let busy = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::join!(
            get_as(&host, "/shared/spin/100000000", "spin".into()),
            get_as(&host, "/shared/invoke?fn=hello", "invoke".into())
        )
    };
    let (slept, (spun, invoked)) = tokio::join!(futures_util::future::join_all(sleepers), busy);
    for reply in &slept {
        assert_eq!((reply.status, reply.body.as_str()), (200, "slept 600 ms\n"), "{}", reply.body);
    }
    assert_eq!(spun.status, 200, "{}", spun.body);
    assert_eq!((invoked.status, invoked.body.as_str()), (200, "hello, world\n"), "{}", invoked.body);
    assert_eq!(host.live_instances("shared").await, 1, "eight requests at once, one instance");

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let of = |id: &str| {
        records.iter().find(|record| record.request_id == id).unwrap_or_else(|| panic!("{id}: {records:#?}"))
    };
    let spin = of("spin");
    let spin_fuel = spin.fuel.unwrap();
    for n in 0..6 {
        let sleep = of(&format!("sleep-{n}"));
        assert_eq!((sleep.outcome, sleep.status), (Outcome::Ok, 200), "{sleep:#?}");
        assert!(sleep.wall_us >= 600_000, "{sleep:#?}");
        // The computing request's fuel and CPU are its own, not spread
        // over the requests it overlapped.
        let fuel = sleep.fuel.unwrap();
        assert!(fuel > 0 && fuel * 100 < spin_fuel, "sleep {fuel} against spin {spin_fuel}: {records:#?}");
        assert!(sleep.cpu_us * 5 < spin.cpu_us, "{sleep:#?}\n{spin:#?}");
    }
    // The invoke ran with its own request's context: the callee's record
    // names it as the parent, and carries its trace.
    let callee = of("invoke/1");
    assert_eq!(callee.function, "hello");
    assert_eq!(callee.parent_id.as_deref(), Some("invoke"), "{callee:#?}");
    assert_eq!(callee.trace_id, of("invoke").trace_id, "{callee:#?}");
}

#[tokio::test]
async fn a_request_that_runs_out_of_fuel_in_a_shared_instance_takes_that_instance_down_not_the_function() {
    let host = TestHost::start_persistent().await;
    let mut fueled = p3("fueled", false);
    fueled.limits.fuel_per_request = NonZeroU64::new(5_000_000);
    host.deploy(vec![fueled]).await;

    let sleepers = (0..3).map(|n| get_as(&host, "/fueled/sleep/1500", format!("bystander-{n}")));
    let burn = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        get_as(&host, "/fueled/spin/100000000", "burn".into()).await
    };
    let (bystanders, burnt) = tokio::join!(futures_util::future::join_all(sleepers), burn);
    assert_eq!(burnt.status, Outcome::FuelExhausted.status().as_u16(), "{}", burnt.body);
    assert!(burnt.body.contains("fuel_per_request of 5000000"), "{}", burnt.body);
    for reply in &bystanders {
        assert_eq!(reply.status, Outcome::Trap.status().as_u16(), "{}", reply.body);
        assert!(reply.body.contains("instance it shared with other requests failed (fuel_exhausted"), "{}", reply.body);
    }
    assert_eq!(host.get("/fueled?name=after").await.body, "hello, after\n", "a fresh instance serves on");

    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let of = |id: &str| {
        records.iter().find(|record| record.request_id == id).unwrap_or_else(|| panic!("{id}: {records:#?}"))
    };
    assert_eq!(of("burn").outcome, Outcome::FuelExhausted);
    assert!(of("burn").fuel.unwrap() >= 5_000_000, "{:#?}", of("burn"));
    for n in 0..3 {
        let bystander = of(&format!("bystander-{n}"));
        assert_eq!(bystander.outcome, Outcome::Trap, "{bystander:#?}");
        assert!(bystander.fuel.unwrap() < 5_000_000, "its own fuel, not the failed request's: {bystander:#?}");
    }
}

#[tokio::test]
async fn instance_concurrency_above_one_is_refused_for_a_function_that_cannot_share_an_instance() {
    let host = TestHost::start_persistent().await;
    let mut hello = spec("hello", "hello", "/hello");
    hello.limits.instance_concurrency = std::num::NonZeroU32::new(4);
    let err = host.try_deploy(vec![hello]).await.unwrap_err().to_string();
    assert!(err.contains("instance_concurrency = 4 needs a WASI 0.3 HTTP handler"), "{err}");

    // One request per instance, for a 0.3 function that asks for it.
    let mut alone = p3("alone", false);
    alone.limits.instance_concurrency = std::num::NonZeroU32::new(1);
    host.deploy(vec![alone]).await;
    let replies = futures_util::future::join_all((0..3).map(|_| host.get("/alone/sleep/300"))).await;
    assert!(replies.iter().all(|reply| reply.status == 200), "{replies:?}");
    assert_eq!(host.live_instances("alone").await, 3, "each request had an instance of its own");
}

#[tokio::test]
async fn a_shared_instance_scales_to_zero_when_idle_and_drains_its_requests_on_undeploy() {
    let host = TestHost::start_persistent().await;
    let mut idle = p3("idle", false);
    idle.limits.idle_timeout = Duration::from_secs(1);
    host.deploy(vec![idle]).await;
    let replies = futures_util::future::join_all((0..4).map(|_| host.get("/idle/sleep/200"))).await;
    assert!(replies.iter().all(|reply| reply.status == 200), "{replies:?}");
    assert_eq!(host.live_instances("idle").await, 1);
    let scaled =
        crate::support::eventually(Duration::from_secs(5), || async { host.live_instances("idle").await == 0 });
    assert!(scaled.await, "the shared instance outlived its idle_timeout");

    // Undeployed while three requests are in its instance: they finish.
    let in_flight = futures_util::future::join_all((0..3).map(|_| host.get("/idle/sleep/700")));
    let undeploy = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        host.running.host().registry().undeploy("idle").await.unwrap();
    };
    let (replies, ()) = tokio::join!(in_flight, undeploy);
    for reply in &replies {
        assert_eq!((reply.status, reply.body.as_str()), (200, "slept 700 ms\n"), "{}", reply.body);
    }
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let cold: Vec<bool> = records.iter().filter(|record| record.function == "idle").map(|record| record.cold).collect();
    assert_eq!(cold.iter().filter(|cold| **cold).count(), 2, "one cold start per instance: {cold:?}");
}

#[tokio::test]
async fn a_shared_instance_drains_its_requests_when_a_new_version_replaces_it_and_when_the_host_stops() {
    let host = TestHost::start_persistent().await;
    host.deploy(vec![p3("swap", false)]).await;

    // A new version deployed while three requests are in the instance:
    // they finish there, on the version they started on.
    let in_flight = futures_util::future::join_all((0..3).map(|_| host.get("/swap/sleep/700")));
    let replace = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let mut next = p3("swap", false);
        next.version = Some("2".into());
        host.deploy(vec![next]).await;
    };
    let (replies, ()) = tokio::join!(in_flight, replace);
    for reply in &replies {
        assert_eq!((reply.status, reply.body.as_str()), (200, "slept 700 ms\n"), "{}", reply.body);
    }
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let versions: Vec<&str> =
        records.iter().filter(|record| record.function == "swap").map(|record| &*record.version).collect();
    assert_eq!(versions.len(), 3, "{versions:?}");
    assert!(versions.iter().all(|version| *version != "2"), "the requests in flight moved: {versions:?}");

    // The host stops (what SIGTERM does) while three requests are in the
    // new version's instance: they finish before it exits.
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            let request = host.client.get(host.url("/swap/sleep/700")).send();
            tokio::spawn(async move {
                let response = request.await.expect("request reaches the host");
                (response.status().as_u16(), response.text().await.unwrap_or_default())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(250)).await;
    host.running.shutdown().await;
    for request in in_flight {
        let (status, body) = request.await.unwrap();
        assert_eq!((status, body.as_str()), (200, "slept 700 ms\n"), "{body}");
    }
}

#[tokio::test]
async fn an_invoke_from_a_wasi_0_3_request_lets_the_other_requests_of_its_instance_run_while_it_waits() {
    let host = TestHost::start_persistent().await;
    let mut caller = p3("caller", false);
    caller.grants.invoke = BTreeSet::from(["slow".to_string()]);
    host.deploy(vec![caller, spec("slow", "slow", "/slow")]).await;
    assert_eq!(host.get("/caller?name=warm").await.status, 200);

    // The callee sleeps 100 ms (its default); a request to the caller's
    // instance made meanwhile is answered before the invoke returns.
    let invoked = async {
        let reply = get_as(&host, "/caller/invoke?fn=slow", "waiting".into()).await;
        (reply, std::time::Instant::now())
    };
    let greeted = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let reply = get_as(&host, "/caller?name=meanwhile", "meanwhile".into()).await;
        (reply, std::time::Instant::now())
    };
    let ((invoked, invoke_done), (greeted, greet_done)) = tokio::join!(invoked, greeted);
    assert_eq!((invoked.status, invoked.body.as_str()), (200, "slept 100 ms \n"), "{}", invoked.body);
    assert_eq!(greeted.body, "hello, meanwhile\n");
    // Answered while the callee slept (not as it returned: a greeting held
    // behind the call would arrive with it).
    let ahead = invoke_done.saturating_duration_since(greet_done);
    assert!(ahead >= Duration::from_millis(30), "the greeting waited for the invoke ({ahead:?} ahead of it)");
    assert_eq!(host.live_instances("caller").await, 1, "both in one instance");
    let records = host.running.host().ledger().unwrap().records(None).unwrap();
    let callee = records.iter().find(|record| record.request_id == "waiting/1").expect("the callee's record");
    assert_eq!(callee.parent_id.as_deref(), Some("waiting"), "{callee:#?}");
}

#[tokio::test]
async fn a_shared_instance_whose_request_waits_past_its_timeout_is_replaced_and_let_go() {
    let host = TestHost::start_persistent().await;
    let mut stuck = p3("stuck", false);
    stuck.limits.timeout = Duration::from_millis(300);
    host.deploy(vec![stuck]).await;

    // Waiting on a clock for ten minutes: the guest is in the host, where
    // epochs cannot interrupt it; the request is answered at its timeout.
    let waited = host.get("/stuck/sleep/600000").await;
    assert_eq!(waited.status, 504, "{}", waited.body);
    assert_eq!(host.get("/stuck?name=next").await.body, "hello, next\n", "a fresh instance serves");
    // The old instance, its task still waiting, is not kept for it.
    let let_go =
        crate::support::eventually(Duration::from_secs(5), || async { host.live_instances("stuck").await == 1 });
    assert!(let_go.await, "{} instances live", host.live_instances("stuck").await);
}

#[tokio::test]
async fn a_wasi_0_3_response_with_its_content_length_arrives_whole_on_a_kept_alive_connection() {
    let host = TestHost::start_persistent().await;
    host.deploy(vec![p3("sized", false)]).await;
    // One client, so each request after the first reuses the connection:
    // a body that came short of its length would leave it out of step.
    for name in ["a", "bb", "ccc"] {
        let reply = host.get(&format!("/sized/sized?name={name}")).await;
        assert_eq!((reply.status, reply.body.as_str()), (200, format!("hello, {name}\n").as_str()));
        let length = reply.headers.get("content-length").and_then(|value| value.to_str().ok());
        assert_eq!(length, Some((8 + name.len()).to_string().as_str()), "{:?}", reply.headers);
    }
}

#[tokio::test]
async fn a_wasi_0_3_body_streamed_to_a_slow_client_arrives_whole_and_its_call_lasts_until_the_guest_has_written_it() {
    let host = TestHost::start_persistent().await;
    host.deploy(vec![p3("big", false)]).await;
    let ledger = host.running.host().ledger().unwrap();
    let billed = |id: &str| ledger.records(None).unwrap().into_iter().find(|record| record.request_id == id);

    // 32 MiB: far more than the frames the host holds for a client and
    // the loopback socket's buffers together. The client stops reading
    // after its first chunk; the guest, held back, is still writing.
    let url = host.url("/big/stream/32768");
    let mut slow = host.client.get(url.clone()).header("x-request-id", "slow").send().await.unwrap();
    assert_eq!(slow.status(), 200);
    let mut body = slow.chunk().await.unwrap().expect("a first chunk").to_vec();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(billed("slow").is_none(), "the call ended while its client read nothing: the host buffered the body");
    while let Some(chunk) = slow.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(body.len(), 32 << 20);
    for (n, piece) in body.chunks(16 << 10).enumerate() {
        let letter = b'a' + (n % 26) as u8;
        assert!(piece.iter().all(|byte| *byte == letter), "write {n} torn or out of order");
    }
    // Its end came after its record, which covers the client's pause.
    let record = billed("slow").expect("billed before its body's end reached the client");
    assert_eq!((record.outcome, record.status), (Outcome::Ok, 200), "{record:?}");
    assert!(record.wall_us >= 500_000, "{record:?}");

    // A client gone part-way: the guest's writes fail, its call ends, and
    // it is billed; the instance serves the next request.
    let mut gone = host.client.get(url).header("x-request-id", "gone").send().await.unwrap();
    assert!(gone.chunk().await.unwrap().is_some());
    drop(gone);
    let ended = crate::support::eventually(Duration::from_secs(5), || async { billed("gone").is_some() });
    assert!(ended.await, "a call whose client left mid-body never ended");
    assert_eq!(host.get("/big?name=next").await.body, "hello, next\n");
}
