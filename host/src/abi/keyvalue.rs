//! `wasi:keyvalue/store` and `wasi:keyvalue/atomics`, checked against the
//! function's `keyvalue` grants (`bucket:key` or `bucket:prefix*`).

use wasmtime::component::Resource;

use super::bindings::wasi::keyvalue::{atomics, store};
use super::{AbiCtxView, BucketHandle, KvError, LIST_PAGE, Refusal, trap};
use crate::backends::BackendError;

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

impl AbiCtxView<'_> {
    /// The bucket behind a handle, as the guest named it and as the
    /// backend stores it; a handle that is not in the table traps.
    fn bucket_of(&self, bucket: &Resource<BucketHandle>) -> Result<(String, String), KvError> {
        let handle = self.table.get(bucket).map_err(trap)?;
        Ok((handle.name.clone(), handle.scoped.clone()))
    }

    /// Admit the call and check the key's size and grant; the bucket's
    /// name in the backend.
    fn check_key(
        &self,
        capability: &'static str,
        bucket: &Resource<BucketHandle>,
        key: &str,
    ) -> Result<String, KvError> {
        let (name, scoped) = self.bucket_of(bucket)?;
        let state = &*self.state;
        state.admit(capability)?;
        let limit = state.caps.limits.kv_max_key_bytes;
        state.check_size(capability, "key", key.len(), "kv_max_key_bytes", limit)?;
        if !state.caps.grants.allows_key(&name, key) {
            return Err(state.deny(capability, format!("key {key:?} of bucket {name:?}")).into());
        }
        Ok(scoped)
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
        let grants: Vec<_> = self.state.caps.grants.keyvalue.iter().filter(|g| g.bucket == name).cloned().collect();
        let kv = &self.state.services.kv;
        let mut keys = Vec::new();
        for grant in grants {
            if grant.prefix {
                keys.extend(kv.keys_with_prefix(&scoped, &grant.key, LIST_CAP).await.map_err(backend)?);
            } else if kv.exists(&scoped, &grant.key).await.map_err(backend)? {
                keys.push(grant.key.clone());
            }
        }
        keys.sort();
        keys.dedup();
        let start = cursor.unwrap_or(0) as usize;
        let page: Vec<String> = keys.iter().skip(start).take(LIST_PAGE).cloned().collect();
        let next = start + page.len();
        let cursor = (next < keys.len()).then_some(next as u64);
        Ok(store::KeyResponse { keys: page, cursor })
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
