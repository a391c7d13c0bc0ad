//! The host side of the Runtime ABI: every import a function makes goes
//! through here and is checked against the function's [`Grants`] first.
//!
//! Deny by default: a call outside the grants returns the interface's error
//! value (`access-denied`, `denied(..)`, ...), never a trap, and is logged
//! with the function, the capability and the request id, and counted in
//! `shoal_abi_denied_total`. Sizes (keys, values, messages) and rates (ABI
//! calls and publishes per second, per function) are bounded the same way
//! (`shoal_abi_limited_total`). The caller's identity is the function the
//! instance belongs to — fixed when the instance is created — never
//! anything the guest says.

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock, Weak};

use governor::{DefaultDirectRateLimiter, Quota};
use wasmtime::component::Linker;

use crate::backends::secrets::SecretStore;
use crate::backends::{Broker, KeyValue};
use crate::host::Host;
use crate::instance::GuestState;
use crate::manifest::{FunctionSpec, Grants, Limits};
use crate::metrics::Metrics;

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../abi/wit",
        world: "shoal:runtime/function",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "wasi:keyvalue/store.bucket": super::BucketHandle,
        },
    });
}

mod invoke;
mod keyvalue;
mod misc;

/// How deep `invoke` calls may nest (a cycle of invokes ends here).
pub const MAX_INVOKE_DEPTH: u32 = 8;

/// Keys returned by one `list-keys` page.
pub const LIST_PAGE: usize = 100;

/// An open key-value bucket, as the guest holds it.
pub struct BucketHandle {
    name: String,
}

/// What the ABI reaches, shared by every function of a host.
pub struct Services {
    pub(crate) kv: Arc<dyn KeyValue>,
    /// The broker (the event trigger subscribes through it).
    pub broker: Arc<dyn Broker>,
    pub(crate) secrets: SecretStore,
    pub(crate) metrics: Arc<Metrics>,
    host: OnceLock<Weak<Host>>,
}

impl Services {
    /// Backends and metrics for the ABI.
    pub fn new(
        kv: Arc<dyn KeyValue>,
        broker: Arc<dyn Broker>,
        secrets: SecretStore,
        metrics: Arc<Metrics>,
    ) -> Arc<Services> {
        Arc::new(Services { kv, broker, secrets, metrics, host: OnceLock::new() })
    }

    /// Tell the services which host they serve (for `invoke`).
    pub(crate) fn attach(&self, host: &Arc<Host>) {
        let _ = self.host.set(Arc::downgrade(host));
    }

    pub(crate) fn host(&self) -> Option<Arc<Host>> {
        self.host.get().and_then(Weak::upgrade)
    }
}

/// A function version's grants and rate limiters, shared by its instances.
pub struct FunctionCaps {
    pub(crate) name: Arc<str>,
    pub(crate) grants: Grants,
    pub(crate) limits: Limits,
    calls: DefaultDirectRateLimiter,
    publishes: DefaultDirectRateLimiter,
}

impl FunctionCaps {
    /// The capabilities of `spec`.
    pub fn new(spec: &FunctionSpec) -> Arc<FunctionCaps> {
        let per_second = |n: u32| Quota::per_second(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
        Arc::new(FunctionCaps {
            name: Arc::from(spec.name.as_str()),
            grants: spec.grants.clone(),
            limits: spec.limits.clone(),
            calls: DefaultDirectRateLimiter::direct(per_second(spec.limits.abi_calls_per_second)),
            publishes: DefaultDirectRateLimiter::direct(per_second(spec.limits.publish_per_second)),
        })
    }
}

/// The ABI state of one instance.
pub struct AbiState {
    pub(crate) caps: Arc<FunctionCaps>,
    pub(crate) services: Arc<Services>,
    /// Nesting depth of the request being served (0: from a trigger).
    pub(crate) depth: u32,
    /// Nested calls made during the current request (names child ids).
    pub(crate) invokes: u32,
}

/// Why a checked call may not proceed.
pub(crate) enum Refusal {
    /// Not granted.
    Denied(String),
    /// Over a size or rate limit.
    Limited(String),
}

impl GuestState {
    /// Count the call against the function's ABI rate.
    pub(crate) fn admit(&self, capability: &'static str) -> Result<(), Refusal> {
        if self.abi.caps.calls.check().is_err() {
            return Err(self.limited(
                capability,
                format!("over abi_calls_per_second = {}", self.abi.caps.limits.abi_calls_per_second),
            ));
        }
        Ok(())
    }

    /// Count the publish against the function's publish rate.
    pub(crate) fn admit_publish(&self) -> Result<(), Refusal> {
        if self.abi.caps.publishes.check().is_err() {
            return Err(self.limited(
                "pubsub.publish",
                format!("over publish_per_second = {}", self.abi.caps.limits.publish_per_second),
            ));
        }
        Ok(())
    }

    /// Log and count a denial; the message for the guest.
    pub(crate) fn deny(&self, capability: &'static str, what: String) -> Refusal {
        let function = &*self.abi.caps.name;
        tracing::warn!(
            function,
            capability,
            request_id = self.log.request_id().as_deref().unwrap_or("-"),
            "denied: {what}"
        );
        self.abi.services.metrics.abi_denied(function, capability);
        Refusal::Denied(format!("function {function:?} is not granted {what}"))
    }

    /// Log and count a size or rate limit; the message for the guest.
    pub(crate) fn limited(&self, capability: &'static str, what: String) -> Refusal {
        let function = &*self.abi.caps.name;
        tracing::warn!(
            function,
            capability,
            request_id = self.log.request_id().as_deref().unwrap_or("-"),
            "limited: {what}"
        );
        self.abi.services.metrics.abi_limited(function, capability);
        Refusal::Limited(format!("{capability}: {what}"))
    }

    /// Refuse `bytes` longer than `limit` (field named `field`).
    pub(crate) fn check_size(
        &self,
        capability: &'static str,
        what: &str,
        bytes: usize,
        field: &str,
        limit: usize,
    ) -> Result<(), Refusal> {
        if bytes > limit {
            return Err(self.limited(capability, format!("{what} of {bytes} bytes is over {field} = {limit}")));
        }
        Ok(())
    }
}

/// Add the Runtime ABI imports to the host's linker.
pub fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    bindings::wasi::keyvalue::store::add_to_linker::<_, HasSelf<GuestState>>(linker, |state| state)?;
    bindings::wasi::keyvalue::atomics::add_to_linker::<_, HasSelf<GuestState>>(linker, |state| state)?;
    bindings::wasi::config::store::add_to_linker::<_, HasSelf<GuestState>>(linker, |state| state)?;
    bindings::shoal::runtime::pubsub::add_to_linker::<_, HasSelf<GuestState>>(linker, |state| state)?;
    bindings::shoal::runtime::invoke::add_to_linker::<_, HasSelf<GuestState>>(linker, |state| state)?;
    bindings::shoal::runtime::secrets::add_to_linker::<_, HasSelf<GuestState>>(linker, |state| state)?;
    bindings::shoal::runtime::types::add_to_linker::<_, HasSelf<GuestState>>(linker, |state| state)?;
    Ok(())
}
