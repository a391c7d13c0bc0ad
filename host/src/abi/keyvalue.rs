//! `wasi:keyvalue/store` and `wasi:keyvalue/atomics`, and their async form
//! for WASI 0.3 guests (`shoal:runtime/keyvalue-async`), checked against
//! the function's `keyvalue` grants (`bucket:key` or `bucket:prefix*`).
//!
//! Both forms make the same checks ([`AbiState::check_key`]) and list keys
//! the same way ([`list_page`]). The async form checks while the store is
//! the calling request's and waits for the backend outside it, so the
//! instance's other requests run meanwhile.

use std::sync::Arc;

use wasmtime::component::{Accessor, Resource};

use super::bindings::shoal::runtime::types;
use super::bindings::wasi::keyvalue::{atomics, store};
use super::concurrent_bindings::shoal::runtime::keyvalue_async;
use super::{Abi, AbiCtxView, AbiState, BucketHandle, Caller, KvError, LIST_PAGE, Refusal, ShoalError, trap};
use crate::backends::{BackendError, KeyValue};
use crate::manifest::KeyGrant;

use store::Error;

/// Most keys gathered for one listing (all pages together).
const LIST_CAP: usize = 100_000;

impl From<Refusal> for KvError {
    fn from(refusal: Refusal) -> KvError {
        match refusal {
            Refusal::Denied(_) => Error::AccessDenied.into(),
            Refusal::Limited(message) => Error::Other(message).into(),
        }
    }
}

fn backend(err: BackendError) -> KvError {
    Error::Other(err.to_string()).into()
}

impl AbiState {
    /// Admit a call on `key` of bucket `bucket` (as the guest names it) and
    /// check the key's size and grant; the bucket's name in the backend.
    fn check_key(&self, capability: &'static str, bucket: &str, key: &str) -> Result<String, Refusal> {
        self.admit(capability)?;
        let limit = self.caps.limits.kv_max_key_bytes;
        self.check_size(capability, "key", key.len(), "kv_max_key_bytes", limit)?;
        if !self.caps.grants.allows_key(bucket, key) {
            return Err(self.deny(capability, format!("key {key:?} of bucket {bucket:?}")));
        }
        Ok(self.caps.tenant.scope(bucket))
    }

    /// The grants of `bucket` (those `list-keys` may list).
    fn bucket_grants(&self, bucket: &str) -> Vec<KeyGrant> {
        self.caps.grants.keyvalue.iter().filter(|grant| grant.bucket == bucket).cloned().collect()
    }
}

/// The page of `bucket`'s keys (its name in the backend: `scoped`) from
/// `cursor` that `grants` cover, and the next page's cursor.
async fn list_page(
    kv: &dyn KeyValue,
    grants: Vec<KeyGrant>,
    scoped: &str,
    cursor: Option<u64>,
) -> Result<(Vec<String>, Option<u64>), BackendError> {
    let mut keys = Vec::new();
    for grant in grants {
        if grant.prefix {
            keys.extend(kv.keys_with_prefix(scoped, &grant.key, LIST_CAP).await?);
        } else if kv.exists(scoped, &grant.key).await? {
            keys.push(grant.key.clone());
        }
    }
    keys.sort();
    keys.dedup();
    let start = cursor.unwrap_or(0) as usize;
    let page: Vec<String> = keys.iter().skip(start).take(LIST_PAGE).cloned().collect();
    let next = start + page.len();
    Ok((page, (next < keys.len()).then_some(next as u64)))
}

impl AbiCtxView<'_> {
    /// The bucket behind a handle, as the guest named it and as the
    /// backend stores it; a handle that is not in the table traps.
    fn bucket_of(&self, bucket: &Resource<BucketHandle>) -> Result<(String, String), KvError> {
        let handle = self.table.get(bucket).map_err(trap)?;
        Ok((handle.name.clone(), handle.scoped.clone()))
    }

    /// [`AbiState::check_key`] for the bucket behind a handle.
    fn check_key(
        &self,
        capability: &'static str,
        bucket: &Resource<BucketHandle>,
        key: &str,
    ) -> Result<String, KvError> {
        let (name, _) = self.bucket_of(bucket)?;
        Ok(self.state.check_key(capability, &name, key)?)
    }
}

impl store::Host for AbiCtxView<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<BucketHandle>, KvError> {
        self.state.admit("keyvalue.open")?;
        if !self.state.caps.grants.opens_bucket(&identifier) {
            return Err(self.state.deny("keyvalue.open", format!("bucket {identifier:?}")).into());
        }
        let scoped = self.state.caps.tenant.scope(&identifier);
        self.table.push(BucketHandle { name: identifier, scoped }).map_err(trap)
    }

    fn convert_error(&mut self, err: KvError) -> wasmtime::Result<Error> {
        err.downcast()
    }
}

impl store::HostBucket for AbiCtxView<'_> {
    async fn get(&mut self, bucket: Resource<BucketHandle>, key: String) -> Result<Option<Vec<u8>>, KvError> {
        let name = self.check_key("keyvalue.get", &bucket, &key)?;
        self.state.services.kv.get(&name, &key).await.map_err(backend)
    }

    async fn set(&mut self, bucket: Resource<BucketHandle>, key: String, value: Vec<u8>) -> Result<(), KvError> {
        let name = self.check_key("keyvalue.set", &bucket, &key)?;
        let limit = self.state.caps.limits.kv_max_value_bytes;
        self.state.check_size("keyvalue.set", "value", value.len(), "kv_max_value_bytes", limit)?;
        match self.state.services.kv.set(&name, &key, value).await {
            Err(BackendError::Full(message)) => Err(self.state.limited("keyvalue.set", message).into()),
            done => done.map_err(backend),
        }
    }

    async fn delete(&mut self, bucket: Resource<BucketHandle>, key: String) -> Result<(), KvError> {
        let name = self.check_key("keyvalue.delete", &bucket, &key)?;
        self.state.services.kv.delete(&name, &key).await.map_err(backend)
    }

    async fn exists(&mut self, bucket: Resource<BucketHandle>, key: String) -> Result<bool, KvError> {
        let name = self.check_key("keyvalue.exists", &bucket, &key)?;
        self.state.services.kv.exists(&name, &key).await.map_err(backend)
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<BucketHandle>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, KvError> {
        let (name, scoped) = self.bucket_of(&bucket)?;
        self.state.admit("keyvalue.list-keys")?;
        // Only keys the grants cover are listed.
        let grants = self.state.bucket_grants(&name);
        let (keys, cursor) = list_page(&*self.state.services.kv, grants, &scoped, cursor).await.map_err(backend)?;
        Ok(store::KeyResponse { keys, cursor })
    }

    async fn drop(&mut self, bucket: Resource<BucketHandle>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for AbiCtxView<'_> {
    async fn increment(&mut self, bucket: Resource<BucketHandle>, key: String, delta: u64) -> Result<u64, KvError> {
        let name = self.check_key("keyvalue.increment", &bucket, &key)?;
        match self.state.services.kv.increment(&name, &key, delta).await {
            Err(BackendError::Full(message)) => Err(self.state.limited("keyvalue.increment", message).into()),
            done => done.map_err(backend),
        }
    }
}

impl keyvalue_async::Host for AbiCtxView<'_> {}

/// An async key-value call that passed its checks: the backend, the
/// bucket's name there, and the request that made it.
struct KvCall {
    kv: Arc<dyn KeyValue>,
    scoped: String,
    caller: Caller,
    capability: &'static str,
}

impl KvCall {
    /// Check a call on `key` of `bucket` against the calling request's
    /// function (the store is that request's while this runs).
    fn checked(state: &AbiState, capability: &'static str, bucket: &str, key: &str) -> Result<KvCall, ShoalError> {
        let scoped = state.check_key(capability, bucket, key)?;
        Ok(KvCall::on(state, capability, scoped))
    }

    /// A call of the calling request's function on the bucket the backend
    /// knows as `scoped`, once its checks passed.
    fn on(state: &AbiState, capability: &'static str, scoped: String) -> KvCall {
        KvCall { kv: state.services.kv.clone(), scoped, caller: state.caller(), capability }
    }

    /// The backend's failure as the guest sees it: a full store is a
    /// limit (logged and counted as one), anything else a backend error.
    fn failed(&self, err: BackendError) -> ShoalError {
        match err {
            BackendError::Full(message) => self.caller.limited(self.capability, message).into(),
            err => types::Error::Backend(err.to_string()).into(),
        }
    }
}

impl<T: Send> keyvalue_async::HostWithStore<T> for Abi {
    async fn get(accessor: &Accessor<T, Self>, bucket: String, key: String) -> Result<Option<Vec<u8>>, ShoalError> {
        let call = accessor.with(|mut access| KvCall::checked(access.get().state, "keyvalue.get", &bucket, &key))?;
        call.kv.get(&call.scoped, &key).await.map_err(|err| call.failed(err))
    }

    async fn set(accessor: &Accessor<T, Self>, bucket: String, key: String, value: Vec<u8>) -> Result<(), ShoalError> {
        let call = accessor.with(|mut access| {
            let state = access.get().state;
            let call = KvCall::checked(state, "keyvalue.set", &bucket, &key)?;
            let limit = state.caps.limits.kv_max_value_bytes;
            state.check_size("keyvalue.set", "value", value.len(), "kv_max_value_bytes", limit)?;
            Ok::<_, ShoalError>(call)
        })?;
        call.kv.set(&call.scoped, &key, value).await.map_err(|err| call.failed(err))
    }

    async fn delete(accessor: &Accessor<T, Self>, bucket: String, key: String) -> Result<(), ShoalError> {
        let call = accessor.with(|mut access| KvCall::checked(access.get().state, "keyvalue.delete", &bucket, &key))?;
        call.kv.delete(&call.scoped, &key).await.map_err(|err| call.failed(err))
    }

    async fn exists(accessor: &Accessor<T, Self>, bucket: String, key: String) -> Result<bool, ShoalError> {
        let call = accessor.with(|mut access| KvCall::checked(access.get().state, "keyvalue.exists", &bucket, &key))?;
        call.kv.exists(&call.scoped, &key).await.map_err(|err| call.failed(err))
    }

    async fn increment(
        accessor: &Accessor<T, Self>,
        bucket: String,
        key: String,
        delta: u64,
    ) -> Result<u64, ShoalError> {
        let call =
            accessor.with(|mut access| KvCall::checked(access.get().state, "keyvalue.increment", &bucket, &key))?;
        call.kv.increment(&call.scoped, &key, delta).await.map_err(|err| call.failed(err))
    }

    async fn list_keys(
        accessor: &Accessor<T, Self>,
        bucket: String,
        cursor: Option<u64>,
    ) -> Result<keyvalue_async::KeyPage, ShoalError> {
        let (call, grants) = accessor.with(|mut access| {
            let state = access.get().state;
            state.admit("keyvalue.list-keys")?;
            // As `open` of the sync form: the bucket must be granted.
            if !state.caps.grants.opens_bucket(&bucket) {
                return Err(ShoalError::from(state.deny("keyvalue.list-keys", format!("bucket {bucket:?}"))));
            }
            let call = KvCall::on(state, "keyvalue.list-keys", state.caps.tenant.scope(&bucket));
            Ok((call, state.bucket_grants(&bucket)))
        })?;
        let (keys, cursor) =
            list_page(&*call.kv, grants, &call.scoped, cursor).await.map_err(|err| call.failed(err))?;
        Ok(keyvalue_async::KeyPage { keys, cursor })
    }
}
