//! The Redis backend, against a real `redis-server`: the same key-value
//! behaviour as the embedded store, and state and messages shared by hosts.

use shoal::host::Backend;

use crate::keyvalue::{key_value_behaves, kv_spec};
use crate::pubsub::{inbox_shows, publish, publisher, subscriber};
use crate::support::{RedisServer, TestHost};

async fn host_on(redis: &RedisServer) -> TestHost {
    let url = redis.url.clone();
    TestHost::start_configured(move |config| {
        config.keyvalue = Backend::Redis { url: url.clone() };
        config.pubsub = Backend::Redis { url };
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
