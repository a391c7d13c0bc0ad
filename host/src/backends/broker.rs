//! The in-process broker: a bounded queue per (topic, subscriber group).
//!
//! Publishing copies the message into the queue of every group subscribed
//! to the topic (a topic nobody subscribes to accepts and drops it). A
//! delivery leaves the queue when handed out; a `nack` puts it back after a
//! back-off, with `attempt` counted up, so delivery is at least once while
//! the host runs. A full queue — by count or by bytes — refuses publishes
//! (the publisher gets an error value) instead of growing host memory, and
//! so does a tenant whose queues together hold its byte budget (one tenant
//! with many topics and subscribers must not take the host's memory).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{BackendError, Broker, Delivery, QueueBudgets, Subscription};

/// Messages a group may have waiting before publishes to its topic fail.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;

/// Payload bytes a group may have waiting before publishes to its topic
/// fail (with `message_max_bytes` of 256 KiB, the count alone would let
/// one queue hold 2.5 GB).
pub const DEFAULT_QUEUE_BYTES: usize = 64 << 20;

/// Payload bytes one tenant's queues may hold together.
pub const DEFAULT_TENANT_QUEUE_BYTES: usize = 256 << 20;

/// First redelivery delay; doubles per attempt up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest redelivery delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The delay before redelivery attempt `attempt + 1`.
pub fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF.saturating_mul(1 << attempt.min(16).saturating_sub(1)).min(MAX_BACKOFF)
}

struct GroupQueue {
    queue: Mutex<Waiting>,
    ready: Notify,
    /// Its tenant's count of waiting bytes, shared by all its queues.
    tenant: Arc<TenantBytes>,
}

/// The payload bytes waiting in one tenant's queues.
#[derive(Default)]
struct TenantBytes(std::sync::atomic::AtomicUsize);

/// A group's waiting deliveries and their payload bytes.
#[derive(Default)]
struct Waiting {
    deliveries: VecDeque<Delivery>,
    bytes: usize,
}

impl GroupQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, delivery: Delivery) {
        let mut waiting = self.lock();
        waiting.bytes += delivery.payload.len();
        self.tenant.0.fetch_add(delivery.payload.len(), std::sync::atomic::Ordering::AcqRel);
        waiting.deliveries.push_back(delivery);
        drop(waiting);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<Delivery> {
        let mut waiting = self.lock();
        let delivery = waiting.deliveries.pop_front()?;
        waiting.bytes -= delivery.payload.len();
        self.tenant.0.fetch_sub(delivery.payload.len(), std::sync::atomic::Ordering::AcqRel);
        Some(delivery)
    }

    /// (messages, payload bytes) waiting.
    fn size(&self) -> (usize, usize) {
        let waiting = self.lock();
        (waiting.deliveries.len(), waiting.bytes)
    }
}

/// Topics and their subscriber groups, in memory.
pub struct LocalBroker {
    topics: Mutex<HashMap<String, HashMap<String, Arc<GroupQueue>>>>,
    capacity: usize,
    byte_capacity: usize,
    /// Each tenant's waiting bytes, and how many it may have.
    tenants: Mutex<HashMap<String, Arc<TenantBytes>>>,
    budgets: Arc<QueueBudgets>,
}

impl Drop for GroupQueue {
    fn drop(&mut self) {
        // A queue that goes (its subscription ended) takes its bytes along.
        let bytes = self.lock().bytes;
        self.tenant.0.fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

impl LocalBroker {
    /// A broker whose group queues hold at most `capacity` messages and
    /// [`DEFAULT_QUEUE_BYTES`] of payload.
    pub fn new(capacity: usize) -> LocalBroker {
        LocalBroker::with_limits(capacity, DEFAULT_QUEUE_BYTES)
    }

    /// A broker whose group queues hold at most `capacity` messages and
    /// `byte_capacity` bytes of payload.
    pub fn with_limits(capacity: usize, byte_capacity: usize) -> LocalBroker {
        LocalBroker::with_budgets(capacity, byte_capacity, Arc::default())
    }

    /// ...and each tenant's queues together at most its budget of payload
    /// bytes.
    pub fn with_budgets(capacity: usize, byte_capacity: usize, budgets: Arc<QueueBudgets>) -> LocalBroker {
        LocalBroker {
            topics: Mutex::new(HashMap::new()),
            capacity,
            byte_capacity,
            tenants: Mutex::new(HashMap::new()),
            budgets,
        }
    }

    /// The waiting-bytes count of the tenant of `topic`.
    fn tenant_of(&self, topic: &str) -> Arc<TenantBytes> {
        let mut tenants = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.entry(super::tenant_of(topic).to_string()).or_default().clone()
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Arc<GroupQueue>>>> {
        self.topics.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for LocalBroker {
    fn default() -> Self {
        LocalBroker::new(DEFAULT_QUEUE_CAPACITY)
    }
}

#[async_trait]
impl Broker for LocalBroker {
    async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<String, BackendError> {
        let id = uuid::Uuid::new_v4().to_string();
        let groups: Vec<Arc<GroupQueue>> =
            self.topics().get(topic).map(|groups| groups.values().cloned().collect()).unwrap_or_default();
        for group in &groups {
            let (count, bytes) = group.size();
            if count >= self.capacity {
                return Err(BackendError::Full(format!(
                    "topic {topic:?} has {} undelivered messages for a subscriber; try again later",
                    self.capacity
                )));
            }
            if bytes + payload.len() > self.byte_capacity {
                return Err(BackendError::Full(format!(
                    "topic {topic:?} has {bytes} bytes undelivered for a subscriber (at most {}); try again later",
                    self.byte_capacity
                )));
            }
        }
        if !groups.is_empty() {
            let tenant = self.tenant_of(topic);
            let waiting = tenant.0.load(std::sync::atomic::Ordering::Acquire);
            let name = super::tenant_of(topic);
            let budget = self.budgets.of(name);
            if waiting + payload.len() * groups.len() > budget {
                return Err(BackendError::Full(format!(
                    "tenant {name:?} has {waiting} bytes of messages undelivered across its topics (at most \
                     {budget}); its subscribers are behind"
                )));
            }
        }
        for group in groups {
            group.push(Delivery { id: id.clone(), topic: topic.to_string(), payload: payload.clone(), attempt: 1 });
        }
        Ok(id)
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>, BackendError> {
        let tenant = self.tenant_of(topic);
        let queue = self
            .topics()
            .entry(topic.to_string())
            .or_default()
            .entry(group.to_string())
            .or_insert_with(|| {
                Arc::new(GroupQueue { queue: Mutex::default(), ready: Notify::new(), tenant: tenant.clone() })
            })
            .clone();
        Ok(Box::new(LocalSubscription { queue }))
    }

    async fn unsubscribe(&self, topic: &str, group: &str) {
        if let Some(groups) = self.topics().get_mut(topic) {
            groups.remove(group);
        }
    }
}

struct LocalSubscription {
    queue: Arc<GroupQueue>,
}

#[async_trait]
impl Subscription for LocalSubscription {
    async fn next(&mut self) -> Result<Delivery, BackendError> {
        loop {
            let notified = self.queue.ready.notified();
            if let Some(delivery) = self.queue.pop() {
                return Ok(delivery);
            }
            notified.await;
        }
    }

    async fn ack(&mut self, _delivery: &Delivery) -> Result<(), BackendError> {
        Ok(())
    }

    async fn nack(&mut self, delivery: &Delivery) -> Result<(), BackendError> {
        let queue = self.queue.clone();
        let mut again = delivery.clone();
        again.attempt += 1;
        let delay = backoff(delivery.attempt);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.push(again);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_group_gets_each_message_and_a_nack_redelivers_it() {
        let broker = LocalBroker::new(10);
        let mut a = broker.subscribe("t", "a").await.unwrap();
        let mut b = broker.subscribe("t", "b").await.unwrap();
        let id = broker.publish("t", b"m".to_vec()).await.unwrap();
        let first = a.next().await.unwrap();
        assert_eq!((first.id.as_str(), first.attempt), (id.as_str(), 1));
        assert_eq!(b.next().await.unwrap().payload, b"m");
        a.nack(&first).await.unwrap();
        let again = a.next().await.unwrap();
        assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 2));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_publishes() {
        let broker = LocalBroker::new(2);
        let _sub = broker.subscribe("t", "g").await.unwrap();
        broker.publish("t", vec![1]).await.unwrap();
        broker.publish("t", vec![2]).await.unwrap();
        assert!(matches!(broker.publish("t", vec![3]).await, Err(BackendError::Full(_))));
        // Nobody subscribes to `u`: accepted and dropped.
        broker.publish("u", vec![1]).await.unwrap();
    }

    #[tokio::test]
    async fn a_queue_full_of_bytes_refuses_publishes_until_it_drains() {
        let broker = LocalBroker::with_limits(100, 1000);
        let mut sub = broker.subscribe("t", "g").await.unwrap();
        broker.publish("t", vec![0; 600]).await.unwrap();
        let refused = broker.publish("t", vec![0; 600]).await;
        assert!(matches!(&refused, Err(BackendError::Full(message)) if message.contains("600 bytes")), "{refused:?}");
        assert_eq!(sub.next().await.unwrap().payload.len(), 600);
        broker.publish("t", vec![0; 600]).await.unwrap();
    }

    #[tokio::test]
    async fn a_tenants_queues_together_hold_its_byte_budget_and_no_more() {
        let broker = LocalBroker::with_budgets(1000, 1 << 20, Arc::new(QueueBudgets::new(3000)));
        // Tenant a's many topics and subscribers, each queue well within
        // its own budget, together reach the tenant's.
        let mut subs = Vec::new();
        for n in 0..3 {
            subs.push(broker.subscribe(&format!("a/t{n}"), "g").await.unwrap());
        }
        let _b = broker.subscribe("b/t", "g").await.unwrap();
        for n in 0..3 {
            broker.publish(&format!("a/t{n}"), vec![0; 900]).await.unwrap();
        }
        let refused = broker.publish("a/t0", vec![0; 900]).await;
        assert!(
            matches!(&refused, Err(BackendError::Full(message)) if message.contains("tenant \"a\" has 2700 bytes")),
            "{refused:?}"
        );
        broker.publish("b/t", vec![0; 900]).await.expect("tenant b's budget is its own");
        assert_eq!(subs[1].next().await.unwrap().payload.len(), 900);
        broker.publish("a/t0", vec![0; 900]).await.expect("a delivery made room");
        // A subscription that goes takes its queue's bytes with it.
        broker.unsubscribe("a/t2", "g").await;
        drop(subs.pop());
        broker.publish("a/t1", vec![0; 900]).await.expect("the dropped queue's bytes were freed");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
