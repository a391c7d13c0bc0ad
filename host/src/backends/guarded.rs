//! A shared backend behind a circuit breaker: while Redis fails, calls
//! fail at once with an error value naming the breaker, instead of each
//! waiting for the client's timeout; reads are retried once (within the
//! host's retry budget), writes never (a write that timed out may have
//! been applied).

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;

use super::{BackendError, Broker, KeyValue, Subscription};
use crate::resilience::{Breaker, Breakers, Policy, RetryBudget};

/// The scope of the backends' breakers in metrics and `shoal breakers`.
pub const BACKEND_SCOPE: &str = "backend";

/// `inner` (key-value or broker) guarded by the breaker of `target`.
pub struct Guarded<T> {
    inner: T,
    breaker: Arc<Breaker>,
    budget: Arc<RetryBudget>,
    policy: Policy,
}

impl<T> Guarded<T> {
    /// Guard `inner`, which reaches `target` (e.g. `redis 127.0.0.1:6379`;
    /// no credentials), with a breaker from `breakers` under `policy`.
    pub fn new(inner: T, target: &str, breakers: &Breakers, policy: Policy) -> Guarded<T> {
        Guarded {
            inner,
            breaker: breakers.get(BACKEND_SCOPE, target, &policy.breaker),
            budget: breakers.budget(BACKEND_SCOPE),
            policy,
        }
    }

    /// Run `op` through the breaker; retry a failure when `repeatable`.
    async fn call<R, F, Fut>(&self, repeatable: bool, mut op: F) -> Result<R, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<R, BackendError>>,
    {
        self.budget.deposit();
        let mut retries = 0;
        loop {
            let attempt = self.breaker.try_call(None).map_err(|short| BackendError::Failed(short.to_string()))?;
            match op().await {
                Err(err @ BackendError::Failed(_)) => {
                    attempt.failed();
                    if !(repeatable && retries < self.policy.retries && self.budget.try_withdraw()) {
                        return Err(err);
                    }
                    retries += 1;
                    self.breaker.count_retry();
                    tokio::time::sleep(self.policy.backoff_before(retries)).await;
                }
                // The backend answered (perhaps with a refusal).
                answered => {
                    attempt.succeeded();
                    return answered;
                }
            }
        }
    }
}

#[async_trait]
impl<T: KeyValue> KeyValue for Guarded<T> {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        self.call(true, || self.inner.get(bucket, key)).await
    }

    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        // The value is moved into the one attempt a write gets.
        let mut value = Some(value);
        self.call(false, || self.inner.set(bucket, key, value.take().unwrap_or_default())).await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), BackendError> {
        self.call(false, || self.inner.delete(bucket, key)).await
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, BackendError> {
        self.call(true, || self.inner.exists(bucket, key)).await
    }

    async fn keys_with_prefix(&self, bucket: &str, prefix: &str, limit: usize) -> Result<Vec<String>, BackendError> {
        self.call(true, || self.inner.keys_with_prefix(bucket, prefix, limit)).await
    }

    async fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, BackendError> {
        self.call(false, || self.inner.increment(bucket, key, delta)).await
    }

    fn close(&self) -> Result<(), BackendError> {
        self.inner.close()
    }
}

#[async_trait]
impl<T: Broker> Broker for Guarded<T> {
    async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<String, BackendError> {
        let mut payload = Some(payload);
        self.call(false, || self.inner.publish(topic, payload.take().unwrap_or_default())).await
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>, BackendError> {
        // Subscriptions keep their own back-off while the backend is away.
        self.inner.subscribe(topic, group).await
    }

    async fn unsubscribe(&self, topic: &str, group: &str) {
        self.inner.unsubscribe(topic, group).await;
    }
}
