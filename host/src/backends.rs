//! What the Runtime ABI reaches: key-value stores, the message broker and
//! secrets. Functions never see these directly; [`crate::abi`] checks every
//! call against the caller's grants before it gets here.
//!
//! Embedded defaults need no server: key-value in one redb file (every
//! acknowledged write is committed durably), an in-process broker, secrets
//! from a folder or the environment. [`redis`] backs key-value and pubsub
//! with a Redis server so several hosts share state and messages.

pub mod broker;
pub mod guarded;
pub mod redb_kv;
pub mod redis;
pub mod secrets;

use async_trait::async_trait;

/// A backend failure, described.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The stored value cannot be used as asked (e.g. incrementing text).
    #[error("{0}")]
    Invalid(String),
    /// Too much: a queue or store is full.
    #[error("{0}")]
    Full(String),
    /// The backend failed.
    #[error("{0}")]
    Failed(String),
}

impl BackendError {
    pub(crate) fn failed(err: impl std::fmt::Display) -> BackendError {
        BackendError::Failed(err.to_string())
    }
}

/// Buckets of byte values by string key. Every backend keeps, per tenant
/// (the part of a bucket's name before `/`), the bytes of its keys and
/// values, and refuses a write that would take a tenant past the quota it
/// was opened with ([`BackendError::Full`]); deletes and increments are
/// never refused.
#[async_trait]
pub trait KeyValue: Send + Sync {
    /// The value at `key`.
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, BackendError>;
    /// Store `value` at `key`; durable once this returns.
    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<(), BackendError>;
    /// Remove `key`.
    async fn delete(&self, bucket: &str, key: &str) -> Result<(), BackendError>;
    /// Whether `key` has a value.
    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, BackendError>;
    /// Keys starting with `prefix`, sorted, at most `limit`.
    async fn keys_with_prefix(&self, bucket: &str, prefix: &str, limit: usize) -> Result<Vec<String>, BackendError>;
    /// Add `delta` to the decimal number at `key` (absent: 0), atomically;
    /// the new value.
    async fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, BackendError>;
    /// Let go of the store for good (another process takes it over: an
    /// embedded store allows one process at a time). Later calls fail.
    fn close(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A message as delivered to a subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Unique id of the message (the same on redelivery).
    pub id: String,
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// 1 on first delivery.
    pub attempt: u32,
}

/// Topics with at-least-once delivery to named subscriber groups (one group
/// per subscribing function).
#[async_trait]
pub trait Broker: Send + Sync {
    /// Accept `payload` on `topic`; returns the message id.
    async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<String, BackendError>;
    /// Start (or resume) the group `group`'s subscription to `topic`.
    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>, BackendError>;
    /// Forget group `group` on `topic` (the function no longer subscribes).
    async fn unsubscribe(&self, topic: &str, group: &str);
}

/// One group's stream of deliveries.
#[async_trait]
pub trait Subscription: Send {
    /// The next message to handle (waits).
    async fn next(&mut self) -> Result<Delivery, BackendError>;
    /// The message was handled: never deliver it again.
    async fn ack(&mut self, delivery: &Delivery) -> Result<(), BackendError>;
    /// The message was not handled: deliver it again later.
    async fn nack(&mut self, delivery: &Delivery) -> Result<(), BackendError>;
}

/// Each tenant's budget of undelivered message bytes, across its topics:
/// one default, and the figure the node policy sets for the tenants of its
/// rules (`limits.queued_bytes`). Shared by the broker and whoever applies
/// the policy.
#[derive(Debug)]
pub struct QueueBudgets {
    default: usize,
    set: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl QueueBudgets {
    /// Every tenant may hold `default` bytes undelivered.
    pub fn new(default: usize) -> QueueBudgets {
        QueueBudgets { default, set: std::sync::Mutex::default() }
    }

    /// The budget of `tenant`.
    pub fn of(&self, tenant: &str) -> usize {
        self.lock().get(tenant).copied().unwrap_or(self.default)
    }

    /// Give `tenant` a budget of its own (`None`: the default again).
    pub fn set(&self, tenant: &str, bytes: Option<usize>) {
        let mut set = self.lock();
        match bytes {
            Some(bytes) => set.insert(tenant.to_string(), bytes),
            None => set.remove(tenant),
        };
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, usize>> {
        self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for QueueBudgets {
    fn default() -> Self {
        QueueBudgets::new(broker::DEFAULT_TENANT_QUEUE_BYTES)
    }
}

/// The tenant a backend bucket name belongs to: what comes before its `/`
/// (see [`crate::manifest::TenantName::scope`]), or the default tenant.
pub(crate) fn tenant_of(bucket: &str) -> &str {
    bucket.split_once('/').map_or(crate::manifest::TenantName::DEFAULT, |(tenant, _)| tenant)
}

/// The bytes an entry counts against its tenant's quota.
pub(crate) fn entry_bytes(key: &str, value_len: usize) -> u64 {
    (key.len() + value_len) as u64
}

/// The refusal of a write that would take `tenant` past `quota` bytes.
pub(crate) fn over_quota(tenant: &str, quota: u64) -> BackendError {
    BackendError::Full(format!(
        "namespace {tenant:?} would hold more than its key-value quota of {quota} bytes (keys and values)"
    ))
}

/// Check key-value inputs common to every backend.
pub(crate) fn kv_number(value: &[u8]) -> Result<u64, BackendError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or_else(|| BackendError::Invalid("the value at this key is not a decimal number".to_string()))
}
