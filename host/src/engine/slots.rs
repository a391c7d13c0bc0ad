//! The engine's instance slots, shared by every function, tenant and
//! program of the process.
//!
//! wasmtime's pooling allocator has a fixed number of slots; an instance
//! that cannot get one fails to start. Two rules keep one tenant from
//! taking them from the others:
//!
//! - **Idle instances give way.** Every live instance holds a [`Slot`].
//!   When none is free, the least recently used idle instance of any
//!   function is destroyed (its `destroy` hook runs, as when it idles out)
//!   and its slot goes to the instance that needed one. Without this, warm
//!   instances of functions called once kept their slots until their
//!   `idle_timeout`, and every other function's cold start failed.
//! - **A tenant's busy instances are capped** ([`InstanceSlots::tenant`]):
//!   however many functions a tenant (a pod's namespace) deploys, it serves
//!   at most its share of requests at once, so the rest of the slots stay
//!   for the other tenants. (Each function is also held to its own share,
//!   see [`crate::engine::EngineOptions::max_instances_per_function`].)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// An instance slot, held for as long as its instance lives (declare it
/// after the store it guards, so that it frees after the store's slot).
pub type Slot = OwnedSemaphorePermit;

/// How often a request waiting for a slot looks again for an idle
/// instance to reclaim (instances go idle without freeing a slot).
const RECHECK: Duration = Duration::from_millis(10);

/// What holds idle instances that may be reclaimed (a function's pool).
pub trait IdleInstances: Send + Sync {
    /// When its least recently used idle instance was last used, if any.
    fn oldest_idle(&self) -> Option<Instant>;
    /// Destroy that instance; its slot frees once it is dropped. False if
    /// it had none idle any more.
    fn reclaim_oldest(self: Arc<Self>) -> bool;
}

/// The slots, the tenants' shares, and who may give slots back.
pub struct InstanceSlots {
    free: Arc<Semaphore>,
    total: usize,
    per_tenant: usize,
    /// Each tenant's busy-instance allowance, shared by its pools (held
    /// weakly here: a tenant with no pool left has no entry for long), and
    /// its size.
    tenants: Mutex<HashMap<String, (Weak<Semaphore>, usize)>>,
    /// Tenants whose allowance is not `per_tenant` (the node policy's
    /// `limits.instances`).
    shares: Mutex<HashMap<String, usize>>,
    holders: Mutex<Vec<Weak<dyn IdleInstances>>>,
    reclaimed: AtomicU64,
}

impl InstanceSlots {
    /// `total` slots; a tenant may keep `per_tenant` instances busy.
    pub fn new(total: u32, per_tenant: u32) -> InstanceSlots {
        InstanceSlots {
            free: Arc::new(Semaphore::new(total as usize)),
            total: total as usize,
            per_tenant: per_tenant as usize,
            tenants: Mutex::new(HashMap::new()),
            shares: Mutex::new(HashMap::new()),
            holders: Mutex::new(Vec::new()),
            reclaimed: AtomicU64::new(0),
        }
    }

    /// The most instances one tenant may keep busy at once.
    pub fn per_tenant(&self) -> usize {
        self.per_tenant
    }

    /// Slots free right now.
    pub fn available(&self) -> usize {
        self.free.available_permits()
    }

    /// Idle instances reclaimed so far to free a slot.
    pub fn reclaimed(&self) -> u64 {
        self.reclaimed.load(Ordering::Relaxed)
    }

    /// The busy-instance allowance of `tenant` (one per tenant, shared by
    /// every pool of its functions).
    pub fn tenant(&self, tenant: &str) -> Arc<Semaphore> {
        let mut tenants = lock(&self.tenants);
        if let Some(shared) = tenants.get(tenant).and_then(|(allowance, _)| allowance.upgrade()) {
            return shared;
        }
        tenants.retain(|_, (allowance, _)| allowance.strong_count() > 0);
        let size = self.share_of(tenant);
        let allowance = Arc::new(Semaphore::new(size));
        tenants.insert(tenant.to_string(), (Arc::downgrade(&allowance), size));
        allowance
    }

    /// The most instances `tenant` may keep busy at once.
    pub fn share_of(&self, tenant: &str) -> usize {
        lock(&self.shares).get(tenant).copied().unwrap_or(self.per_tenant)
    }

    /// Let `tenant` keep `share` instances busy at once (`None`: the
    /// default share again), never more than the engine has. A live
    /// allowance grows at once; it shrinks as busy instances finish.
    pub fn set_tenant_share(&self, tenant: &str, share: Option<u32>) {
        let size = share.map_or(self.per_tenant, |share| (share as usize).min(self.total));
        {
            let mut shares = lock(&self.shares);
            match share {
                Some(_) => shares.insert(tenant.to_string(), size),
                None => shares.remove(tenant),
            };
        }
        let mut tenants = lock(&self.tenants);
        let Some((weak, old)) = tenants.get_mut(tenant) else { return };
        let Some(allowance) = weak.upgrade() else { return };
        if size > *old {
            allowance.add_permits(size - *old);
        } else if size < *old {
            // Busy instances keep theirs; the allowance shrinks as they
            // finish (forgotten permits never come back).
            let mut owed = *old - size;
            owed -= allowance.forget_permits(owed);
            if owed > 0 {
                let allowance = allowance.clone();
                tokio::spawn(async move {
                    if let Ok(permits) = allowance.acquire_many(owed as u32).await {
                        permits.forget();
                    }
                });
            }
        }
        *old = size;
    }

    /// Let `holder`'s idle instances be reclaimed when slots run out.
    pub fn register(&self, holder: Weak<dyn IdleInstances>) {
        let mut holders = lock(&self.holders);
        holders.retain(|held| held.strong_count() > 0);
        holders.push(holder);
    }

    /// A free slot, reclaiming the least recently used idle instance when
    /// there is none; waits until `deadline` for one, then `None`.
    pub async fn acquire(&self, deadline: tokio::time::Instant) -> Option<Slot> {
        let mut reclaiming = false;
        loop {
            if let Ok(slot) = self.free.clone().try_acquire_owned() {
                return Some(slot);
            }
            // One reclaim per waiter: its slot comes back once the
            // instance's destroy hook has run, which may take a while.
            if !reclaiming {
                reclaiming = self.reclaim_least_recently_used();
            }
            let look_again = (tokio::time::Instant::now() + RECHECK).min(deadline);
            match tokio::time::timeout_at(look_again, self.free.clone().acquire_owned()).await {
                Ok(Ok(slot)) => return Some(slot),
                // The semaphore is never closed.
                Ok(Err(_)) => return None,
                Err(_) if look_again >= deadline => return None,
                Err(_) => {}
            }
        }
    }

    /// Destroy the idle instance, of any function, used longest ago.
    fn reclaim_least_recently_used(&self) -> bool {
        // Snapshot the holders: reclaiming spawns work that may register
        // new ones.
        let holders: Vec<Arc<dyn IdleInstances>> = lock(&self.holders).iter().filter_map(Weak::upgrade).collect();
        let mut candidates: Vec<(Instant, Arc<dyn IdleInstances>)> =
            holders.into_iter().filter_map(|holder| holder.oldest_idle().map(|at| (at, holder))).collect();
        candidates.sort_by_key(|(at, _)| *at);
        // Another request may take an instance between the look and the
        // reclaim: try the next oldest then.
        for (_, holder) in candidates {
            if holder.reclaim_oldest() {
                self.reclaimed.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Holder {
        idle: Mutex<Vec<(Instant, Slot)>>,
    }

    impl IdleInstances for Holder {
        fn oldest_idle(&self) -> Option<Instant> {
            lock(&self.idle).first().map(|(at, _)| *at)
        }

        fn reclaim_oldest(self: Arc<Self>) -> bool {
            let mut idle = lock(&self.idle);
            if idle.is_empty() {
                return false;
            }
            drop(idle.remove(0));
            true
        }
    }

    #[tokio::test]
    async fn a_full_engine_reclaims_the_least_recently_used_idle_instance_of_any_holder() {
        let slots = InstanceSlots::new(3, 3);
        let soon = || tokio::time::Instant::now() + Duration::from_millis(200);
        let start = Instant::now();
        let (older, newer) =
            (Arc::new(Holder { idle: Mutex::new(Vec::new()) }), Arc::new(Holder { idle: Mutex::new(Vec::new()) }));
        slots.register(Arc::downgrade(&older) as Weak<dyn IdleInstances>);
        slots.register(Arc::downgrade(&newer) as Weak<dyn IdleInstances>);
        for (holder, used) in [(&newer, 2), (&older, 1), (&newer, 3)] {
            let slot = slots.acquire(soon()).await.unwrap();
            lock(&holder.idle).push((start + Duration::from_secs(used), slot));
        }
        assert_eq!(slots.available(), 0);

        let _fourth = slots.acquire(soon()).await.expect("an idle instance gives its slot");
        assert!(lock(&older.idle).is_empty(), "the least recently used one went");
        assert_eq!(lock(&newer.idle).len(), 2);
        assert_eq!(slots.reclaimed(), 1);

        // Everything busy, nothing idle: a waiter gets nothing by its deadline.
        let busy: Vec<Slot> = std::mem::take(&mut *lock(&newer.idle)).into_iter().map(|(_, slot)| slot).collect();
        assert!(slots.acquire(soon()).await.is_none());
        drop(busy);
        assert!(slots.acquire(soon()).await.is_some(), "a slot freed by its instance is taken");
    }

    #[test]
    fn a_tenant_has_one_allowance_shared_by_its_functions_and_forgotten_with_them() {
        let slots = InstanceSlots::new(8, 4);
        let first = slots.tenant("a");
        let second = slots.tenant("a");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.available_permits(), 4);
        assert!(!Arc::ptr_eq(&first, &slots.tenant("b")));
        drop((first, second));
        let _c = slots.tenant("c");
        assert!(!lock(&slots.tenants).contains_key("a"), "a tenant without pools is forgotten");
    }

    #[tokio::test]
    async fn a_tenants_own_share_applies_to_its_allowance_now_and_later() {
        let slots = InstanceSlots::new(8, 4);
        slots.set_tenant_share("a", Some(2));
        let a = slots.tenant("a");
        assert_eq!(a.available_permits(), 2, "a new allowance takes the tenant's share");
        assert_eq!(slots.tenant("b").available_permits(), 4, "others keep the default");

        slots.set_tenant_share("a", Some(6));
        assert_eq!(a.available_permits(), 6, "a live allowance grows at once");
        let busy = a.clone().try_acquire_many_owned(5).unwrap();
        slots.set_tenant_share("a", Some(3));
        assert_eq!(a.available_permits(), 0, "one idle permit forgotten, two owed by the busy ones");
        drop(busy);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(a.available_permits(), 3, "once they finish the tenant has its new share");

        slots.set_tenant_share("a", Some(100));
        assert_eq!(a.available_permits(), 8, "never more than the engine's slots");
        slots.set_tenant_share("a", None);
        assert_eq!(slots.share_of("a"), 4);
    }
}
