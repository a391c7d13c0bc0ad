//! The message trigger: delivers published messages to subscribing
//! functions, at least once.
//!
//! One delivery loop runs per (function, topic) subscription — a function
//! subscribes by being granted `subscribe` to the topic and exporting
//! `shoal:runtime/events`. The loops follow the registry: deploying or
//! undeploying a function starts or stops its loops. Each message is handed
//! to a version of the function picked by weight, under the function's
//! limits, and metered like a request. A deploy returns only once the
//! subscriptions it creates are attached, so a message published right
//! after it is not missed. A handler that returns an error,
//! traps or breaches a limit leaves the message unacknowledged, and the
//! broker delivers it again after a back-off; after [`MAX_ATTEMPTS`] the
//! message is dropped with an error log, so one poison message cannot
//! block a topic forever.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backends::{Broker, Subscription};
use crate::host::Host;

/// Deliveries of one message before it is dropped.
pub const MAX_ATTEMPTS: u32 = 20;

/// Keep the delivery loops in step with the deployed functions until
/// `shutdown` turns true.
/// `changes` comes from [`crate::registry::Registry::changes`].
pub async fn serve(
    host: Arc<Host>,
    broker: Arc<dyn Broker>,
    mut changes: watch::Receiver<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut loops: HashMap<(String, String), JoinHandle<()>> = HashMap::new();
    loop {
        let generation = *changes.borrow_and_update();
        let wanted = host.registry().subscriptions();
        loops.retain(|key, task| {
            let keep = wanted.contains(key) && !task.is_finished();
            if !keep {
                task.abort();
                let (broker, (function, topic)) = (broker.clone(), key.clone());
                if !wanted.contains(key) {
                    tokio::spawn(async move { broker.unsubscribe(&topic, &function).await });
                }
            }
            keep
        });
        for key in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = loops.entry(key) {
                let (function, topic) = slot.key().clone();
                // Subscribe before reporting the generation applied: a
                // message published once `deploy` returns is not missed.
                match broker.subscribe(&topic, &function).await {
                    Ok(subscription) => {
                        tracing::info!(function, topic, "subscribed");
                        slot.insert(tokio::spawn(deliver_loop(host.clone(), subscription, function, topic)));
                    }
                    Err(err) => {
                        tracing::error!(function, topic, error = %err, "cannot subscribe; retrying on the next change");
                    }
                }
            }
        }
        host.registry().mark_applied(generation);
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { break },
            _ = shutdown.changed() => break,
        }
    }
    for task in loops.into_values() {
        task.abort();
    }
}

async fn deliver_loop(host: Arc<Host>, mut subscription: Box<dyn Subscription>, function: String, topic: String) {
    loop {
        let delivery = match subscription.next().await {
            Ok(delivery) => delivery,
            Err(err) => {
                tracing::warn!(function, topic, error = %err, "broker read failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(target) = host.registry().by_name(&function) else { return };
        let metrics = host.metrics();
        let pool = target.pick().clone();
        // The guest knows the topic by its own tenant's name for it.
        let mut seen = delivery.clone();
        seen.topic = pool.function().spec().tenant.unscope(&delivery.topic).to_string();
        match host.dispatcher().deliver(pool, &seen).await {
            Ok(()) => {
                metrics.delivery(&function, &topic, "acked");
                if let Err(err) = subscription.ack(&delivery).await {
                    tracing::warn!(function, topic, error = %err, "ack failed; the message may come again");
                }
            }
            Err(_) if delivery.attempt >= MAX_ATTEMPTS => {
                metrics.delivery(&function, &topic, "dropped");
                tracing::error!(function, topic, message_id = %delivery.id, attempts = delivery.attempt,
                    "message dropped after repeated failures");
                let _ = subscription.ack(&delivery).await;
            }
            Err(_) => {
                metrics.delivery(&function, &topic, "retried");
                if let Err(err) = subscription.nack(&delivery).await {
                    tracing::warn!(function, topic, error = %err, "nack failed");
                }
            }
        }
    }
}
