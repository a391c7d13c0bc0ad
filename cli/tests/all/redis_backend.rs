//! The Redis backend, against a real `redis-server`: the same key-value
//! behaviour as the embedded store, and state and messages shared by hosts.

use shoal::host::{Backend, HostConfig};

use crate::keyvalue::{key_value_behaves, kv_spec};
use crate::pubsub::{inbox_receives, inbox_shows, publish, publish_succeeds, publisher, subscriber};
use crate::support::{RedisServer, TestHost};

/// A host with key-value and pubsub on `redis`.
pub(crate) async fn host_on(redis: &RedisServer) -> TestHost {
    host_on_configured(redis, |_| {}).await
}

/// [`host_on`], its config further adjusted by `configure`.
pub(crate) async fn host_on_configured(redis: &RedisServer, configure: impl FnOnce(&mut HostConfig)) -> TestHost {
    let url = redis.url.clone();
    TestHost::start_configured(move |config| {
        config.keyvalue = Backend::Redis { url: url.clone() };
        config.pubsub = Backend::Redis { url };
        configure(config);
    })
    .await
}

#[tokio::test]
async fn key_value_on_redis_behaves_like_the_embedded_store() {
    let redis = RedisServer::start().await;
    let host = host_on(&redis).await;
    host.deploy(vec![kv_spec(&["default:counter/*", "default:data/*"])]).await;
    key_value_behaves(&host).await;
}

#[tokio::test]
async fn two_hosts_share_state_through_redis() {
    let redis = RedisServer::start().await;
    let (a, b) = (host_on(&redis).await, host_on(&redis).await);
    a.deploy(vec![kv_spec(&["default:*"])]).await;
    b.deploy(vec![kv_spec(&["default:*"])]).await;
    assert_eq!(a.get("/kv/incr?key=shared").await.body, "shared=1\n");
    assert_eq!(b.get("/kv/incr?key=shared").await.body, "shared=2\n");
    assert_eq!(a.get("/kv/get?key=shared").await.body, "2");
}

#[tokio::test]
async fn a_message_published_on_one_host_reaches_a_subscriber_on_another() {
    let redis = RedisServer::start().await;
    let (a, b) = (host_on(&redis).await, host_on(&redis).await);
    b.deploy(vec![subscriber("orders")]).await;
    a.deploy(vec![publisher("orders")]).await;
    assert_eq!(publish(&a, "orders", "cross-host").await.status, 202);
    assert!(inbox_shows(&b, "deliveries=1").await, "{}", b.get("/inbox").await.body);
    assert!(b.get("/inbox").await.body.lines().any(|line| line.ends_with("=cross-host")));
}

#[tokio::test]
async fn redis_redelivers_a_message_the_handler_refused() {
    let redis = RedisServer::start().await;
    let host = host_on(&redis).await;
    host.deploy(vec![publisher("orders"), subscriber("orders")]).await;
    assert_eq!(publish(&host, "orders", "fail-once").await.status, 202);
    assert!(inbox_shows(&host, "deliveries=2").await, "{}", host.get("/inbox").await.body);
    assert!(host.get("/inbox").await.body.lines().any(|line| line.ends_with("=fail-once")));
}

#[tokio::test]
async fn pubsub_and_key_value_resume_after_redis_restarts_and_nothing_acknowledged_is_lost() {
    let mut redis = RedisServer::start_persistent().await;
    let host = host_on(&redis).await;
    host.deploy(vec![publisher("orders"), subscriber("orders")]).await;
    assert_eq!(publish(&host, "orders", "before").await.status, 202);
    assert!(inbox_shows(&host, "deliveries=1").await, "{}", host.get("/inbox").await.body);

    redis.stop();
    // Meanwhile calls fail with an error value, promptly: no hang.
    let started = std::time::Instant::now();
    let refused = publish(&host, "orders", "during").await;
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert!(started.elapsed() < std::time::Duration::from_secs(8), "the publish hung {:?}", started.elapsed());

    redis.start_again().await;
    assert!(publish_succeeds(&host, "orders", "after").await, "publishing works again once Redis is back");
    // The subscriber reads on (it was cut off mid-read), and what was
    // acknowledged before the restart is still there.
    let delivered = inbox_receives(&host, "after").await;
    let inbox = host.get("/inbox").await.body;
    assert!(delivered, "the subscriber got nothing after the restart: {inbox}");
    assert!(inbox.lines().any(|line| line.ends_with("=before")), "{inbox}");
    assert!(inbox.lines().any(|line| line.ends_with("=after")), "{inbox}");
}

#[tokio::test]
async fn a_subscriber_whose_group_redis_lost_gets_what_is_published_after() {
    // A Redis without persistence comes back empty: the stream and its
    // consumer group are gone. The subscriber creates the group again and
    // receives what is published from then on.
    let mut redis = RedisServer::start().await;
    let host = host_on(&redis).await;
    host.deploy(vec![publisher("orders"), subscriber("orders")]).await;
    assert_eq!(publish(&host, "orders", "first").await.status, 202);
    assert!(inbox_shows(&host, "deliveries=1").await, "{}", host.get("/inbox").await.body);
    redis.stop();
    redis.start_again().await;
    assert!(publish_succeeds(&host, "orders", "second").await, "publishing works again once Redis is back");
    let delivered = inbox_receives(&host, "second").await;
    assert!(delivered, "nothing delivered after the group was lost: {}", host.get("/inbox").await.body);
}

#[tokio::test]
async fn a_tenants_undelivered_messages_on_redis_are_held_to_its_budget_and_freed_once_acknowledged() {
    let redis = RedisServer::start().await;
    let host = host_on(&redis).await;
    host.running.host().queue_budgets().set("default", Some(3000));
    host.deploy(vec![publisher("orders"), subscriber("orders")]).await;
    let redis_cli = |args: &[&str]| {
        let output = std::process::Command::new("redis-cli").args(["-u", &redis.url]).args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    // A second subscriber group that reads nothing (a subscriber whose
    // host is down): what it has not acknowledged counts.
    assert_eq!(redis_cli(&["XGROUP", "CREATE", "shoal:topic:orders", "away", "$", "MKSTREAM"]), "OK");
    let payload = "x".repeat(900);
    for n in 0..3 {
        assert_eq!(publish(&host, "orders", &format!("{n}{payload}")).await.status, 202);
    }
    let refused = publish(&host, "orders", &format!("3{payload}")).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.body.contains("has 2703 bytes of messages undelivered across its topics (at most 3000)"),
        "{}",
        refused.body
    );
    assert_eq!(redis_cli(&["GET", "shoal:topic-bytes:default"]), "2703");
    // The live subscriber got all three meanwhile; nothing was dropped.
    assert!(inbox_shows(&host, "deliveries=3").await, "{}", host.get("/inbox").await.body);
    assert_eq!(redis_cli(&["XLEN", "shoal:topic:orders"]), "3");

    // Once the other group is gone, the next publish trims what every
    // remaining group acknowledged and the tenant has its budget again.
    assert_eq!(redis_cli(&["XGROUP", "DESTROY", "shoal:topic:orders", "away"]), "1");
    let acknowledged = crate::support::eventually(std::time::Duration::from_secs(10), || async {
        redis_cli(&["XINFO", "GROUPS", "shoal:topic:orders"]).contains("pending\n0\n")
    })
    .await;
    assert!(acknowledged, "{}", redis_cli(&["XINFO", "GROUPS", "shoal:topic:orders"]));
    assert_eq!(publish(&host, "orders", &format!("4{payload}")).await.status, 202);
    assert_eq!(redis_cli(&["GET", "shoal:topic-bytes:default"]), "901");
    assert!(inbox_receives(&host, &format!("4{payload}")).await, "{}", host.get("/inbox").await.body);
}

#[tokio::test]
async fn while_redis_is_down_its_breaker_opens_calls_fail_at_once_and_it_closes_once_redis_is_back() {
    let mut redis = RedisServer::start_persistent().await;
    let host = host_on(&redis).await;
    host.deploy(vec![kv_spec(&["default:*"])]).await;
    assert_eq!(host.get("/kv/incr?key=hits").await.body, "hits=1\n");
    let port = redis.url.rsplit(':').next().unwrap().trim_end_matches('/').to_string();
    let target = format!("redis 127.0.0.1:{port}");

    redis.stop();
    // Failures in a row (a read is tried twice) open the breaker.
    let mut opened = None;
    for _ in 0..10 {
        let reply = host.get("/kv/get?key=hits").await;
        assert_eq!(reply.status, 422, "an error value, not a trap: {}", reply.body);
        if reply.body.contains(&format!("the circuit breaker of {target} is open")) {
            opened = Some(reply.body);
            break;
        }
    }
    assert!(opened.is_some(), "the breaker of {target} opened");
    // While it is open, a call does not wait for Redis's timeouts.
    let started = std::time::Instant::now();
    let reply = host.get("/kv/incr?key=hits").await;
    assert!(reply.body.contains("is open"), "{}", reply.body);
    assert!(started.elapsed() < std::time::Duration::from_millis(500), "took {:?}", started.elapsed());
    let metrics = host.get("/metrics").await.body;
    let line = format!(r#"shoal_breaker_state{{function="backend",target="{target}"}} 2"#);
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");

    // Redis is back: after the cool-down a probe closes the breaker, and
    // the count went on from where it was.
    redis.start_again().await;
    let mut value = String::new();
    for _ in 0..100 {
        value = host.get("/kv/incr?key=hits").await.body;
        if value == "hits=2\n" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(value, "hits=2\n");
    let views = host.running.host().services().breakers.views();
    let view = views.iter().find(|view| view.target == target).expect("listed");
    assert_eq!(view.state, shoal::resilience::BreakerState::Closed);
}
