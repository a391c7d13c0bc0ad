//! Publish and subscribe through the Runtime ABI: delivery at least once,
//! grants on both ends, and publish storms bounded.

use std::collections::BTreeSet;
use std::time::Duration;

use shoal::manifest::{FunctionSpec, KeyGrant};

use crate::support::{TestHost, eventually, spec};

pub(crate) fn publisher(topic: &str) -> FunctionSpec {
    let mut publisher = spec("publisher", "publisher", "/pub");
    publisher.grants.publish = BTreeSet::from([topic.to_string()]);
    publisher
}

pub(crate) fn subscriber(topic: &str) -> FunctionSpec {
    let mut subscriber = spec("subscriber", "subscriber", "/inbox");
    subscriber.grants.subscribe = BTreeSet::from([topic.to_string()]);
    subscriber.grants.keyvalue = vec![KeyGrant::parse("inbox:*").unwrap()];
    subscriber
}

pub(crate) async fn publish(host: &TestHost, topic: &str, body: &str) -> crate::support::Reply {
    let response =
        host.client.post(host.url(&format!("/pub/publish?topic={topic}"))).body(body.to_string()).send().await.unwrap();
    crate::support::Reply::read(response).await
}

/// Wait (up to 20 s) until the subscriber's inbox holds a message whose
/// payload is `payload`.
pub(crate) async fn inbox_receives(host: &TestHost, payload: &str) -> bool {
    let suffix = format!("={payload}");
    eventually(Duration::from_secs(20), || async {
        host.get("/inbox").await.body.lines().any(|line| line.ends_with(&suffix))
    })
    .await
}

/// Publish `payload` until the publisher's call succeeds (up to 15 s):
/// whether it did.
pub(crate) async fn publish_succeeds(host: &TestHost, topic: &str, payload: &str) -> bool {
    eventually(Duration::from_secs(15), || async { publish(host, topic, payload).await.status == 202 }).await
}

/// Wait until the subscriber's inbox shows `want` (a line of `GET /inbox`).
pub(crate) async fn inbox_shows(host: &TestHost, want: &str) -> bool {
    eventually(Duration::from_secs(10), || async { host.get("/inbox").await.body.lines().any(|line| line == want) })
        .await
}

#[tokio::test]
async fn a_published_message_reaches_the_subscriber() {
    let host = TestHost::start().await;
    host.deploy(vec![publisher("orders"), subscriber("orders")]).await;
    let reply = publish(&host, "orders", "order-1").await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert!(
        eventually(Duration::from_secs(10), || async {
            host.get("/inbox").await.body.lines().any(|line| line.ends_with("=order-1"))
        })
        .await,
        "{}",
        host.get("/inbox").await.body
    );
    let lines = host.lines_of("subscriber");
    let delivery = lines.iter().find(|line| line.text.contains("attempt 1 on orders")).unwrap();
    assert!(delivery.request_id.as_deref().is_some_and(|id| id.starts_with("msg-")), "{delivery:?}");
}

#[tokio::test]
async fn a_message_the_handler_refuses_is_delivered_again() {
    let host = TestHost::start().await;
    host.deploy(vec![publisher("orders"), subscriber("orders")]).await;
    assert_eq!(publish(&host, "orders", "fail-once please").await.status, 202);
    assert!(inbox_shows(&host, "deliveries=2").await, "{}", host.get("/inbox").await.body);
    let body = host.get("/inbox").await.body;
    assert!(body.lines().any(|line| line.ends_with("=fail-once please")), "{body}");
    let texts: Vec<String> = host.lines_of("subscriber").into_iter().map(|line| line.text).collect();
    assert!(texts.iter().any(|t| t.contains("attempt 2")), "{texts:?}");
    let metrics = host.get("/metrics").await.body;
    assert!(
        metrics.contains(r#"shoal_messages_delivered_total{function="subscriber",result="retried",topic="orders"} 1"#)
    );
}

#[tokio::test]
async fn publishing_or_subscribing_needs_a_grant() {
    let host = TestHost::start().await;
    // The publisher may publish to `orders` only; the subscriber listens to `audit` only.
    host.deploy(vec![publisher("orders"), subscriber("audit")]).await;
    let denied = publish(&host, "audit", "x").await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(denied.body.starts_with("published 0, then Error::Denied"), "{}", denied.body);
    assert_eq!(publish(&host, "orders", "not for audit").await.status, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host.get("/inbox").await.body, "deliveries=0\n", "nothing arrives on a topic it does not subscribe to");
}

#[tokio::test]
async fn a_publish_storm_meets_the_publish_rate_limit() {
    let host = TestHost::start().await;
    let mut storm = publisher("orders");
    storm.limits.publish_per_second = std::num::NonZeroU32::new(10).unwrap();
    host.deploy(vec![storm]).await;
    let reply = host.client.post(host.url("/pub/publish?topic=orders&count=1000")).body("x").send().await.unwrap();
    assert_eq!(reply.status(), 429);
    let body = reply.text().await.unwrap();
    assert!(body.contains("then Error::Limited") && body.contains("publish_per_second = 10"), "{body}");
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let host = TestHost::start().await;
    let mut small = publisher("orders");
    small.limits.message_max_bytes = 100;
    host.deploy(vec![small]).await;
    let reply = publish(&host, "orders", &"x".repeat(101)).await;
    assert_eq!(reply.status, 429);
    assert!(reply.body.contains("message_max_bytes = 100"), "{}", reply.body);
}

#[tokio::test]
async fn a_function_without_an_http_handler_can_subscribe_but_cannot_take_routes() {
    let host = TestHost::start().await;
    let mut audit = spec("audit", "audit", "/audit");
    audit.grants.subscribe = BTreeSet::from(["orders".to_string()]);
    let refused = host.try_deploy(vec![audit.clone()]).await;
    assert!(matches!(refused, Err(shoal::Error::MissingHandler { .. })), "{refused:?}");

    audit.routes.clear();
    host.deploy(vec![audit, publisher("orders")]).await;
    assert_eq!(publish(&host, "orders", "order-7").await.status, 202);
    let logged = eventually(Duration::from_secs(10), || async {
        host.lines_of("audit").iter().any(|line| line.text == "audit: orders order-7")
    })
    .await;
    assert!(logged, "{:?}", host.lines_of("audit"));
}
