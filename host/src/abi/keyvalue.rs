//! `wasi:keyvalue/store` and `wasi:keyvalue/atomics`, checked against the
//! function's `keyvalue` grants (`bucket:key` or `bucket:prefix*`).

use wasmtime::component::Resource;

use super::bindings::wasi::keyvalue::{atomics, store};
use super::{BucketHandle, LIST_PAGE, Refusal};
use crate::backends::BackendError;
use crate::instance::GuestState;

use store::Error;

/// Most keys gathered for one listing (all pages together).
const LIST_CAP: usize = 100_000;

fn refusal(refusal: Refusal) -> Error {
    match refusal {
        Refusal::Denied(_) => Error::AccessDenied,
        Refusal::Limited(message) => Error::Other(message),
    }
}

fn backend(err: BackendError) -> Error {
    Error::Other(err.to_string())
}

impl GuestState {
    fn bucket_of(&self, bucket: &Resource<BucketHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(bucket)?.name.clone())
    }

    /// Admit the call and check the key's size and grant.
    fn check_key(&self, capability: &'static str, bucket: &str, key: &str) -> Result<(), Error> {
        self.admit(capability).map_err(refusal)?;
        let limit = self.abi.caps.limits.kv_max_key_bytes;
        self.check_size(capability, "key", key.len(), "kv_max_key_bytes", limit).map_err(refusal)?;
        if !self.abi.caps.grants.allows_key(bucket, key) {
            return Err(refusal(self.deny(capability, format!("key {key:?} of bucket {bucket:?}"))));
        }
        Ok(())
    }
}

impl store::Host for GuestState {
    async fn open(&mut self, identifier: String) -> wasmtime::Result<Result<Resource<BucketHandle>, Error>> {
        if let Err(refused) = self.admit("keyvalue.open") {
            return Ok(Err(refusal(refused)));
        }
        if !self.abi.caps.grants.opens_bucket(&identifier) {
            return Ok(Err(refusal(self.deny("keyvalue.open", format!("bucket {identifier:?}")))));
        }
        Ok(Ok(self.table.push(BucketHandle { name: identifier })?))
    }
}

impl store::HostBucket for GuestState {
    async fn get(
        &mut self,
        bucket: Resource<BucketHandle>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, Error>> {
        let name = self.bucket_of(&bucket)?;
        if let Err(err) = self.check_key("keyvalue.get", &name, &key) {
            return Ok(Err(err));
        }
        Ok(self.abi.services.kv.get(&name, &key).await.map_err(backend))
    }

    async fn set(
        &mut self,
        bucket: Resource<BucketHandle>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), Error>> {
        let name = self.bucket_of(&bucket)?;
        if let Err(err) = self.check_key("keyvalue.set", &name, &key) {
            return Ok(Err(err));
        }
        let limit = self.abi.caps.limits.kv_max_value_bytes;
        if let Err(refused) = self.check_size("keyvalue.set", "value", value.len(), "kv_max_value_bytes", limit) {
            return Ok(Err(refusal(refused)));
        }
        Ok(self.abi.services.kv.set(&name, &key, value).await.map_err(backend))
    }

    async fn delete(&mut self, bucket: Resource<BucketHandle>, key: String) -> wasmtime::Result<Result<(), Error>> {
        let name = self.bucket_of(&bucket)?;
        if let Err(err) = self.check_key("keyvalue.delete", &name, &key) {
            return Ok(Err(err));
        }
        Ok(self.abi.services.kv.delete(&name, &key).await.map_err(backend))
    }

    async fn exists(&mut self, bucket: Resource<BucketHandle>, key: String) -> wasmtime::Result<Result<bool, Error>> {
        let name = self.bucket_of(&bucket)?;
        if let Err(err) = self.check_key("keyvalue.exists", &name, &key) {
            return Ok(Err(err));
        }
        Ok(self.abi.services.kv.exists(&name, &key).await.map_err(backend))
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<BucketHandle>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<Result<store::KeyResponse, Error>> {
        let name = self.bucket_of(&bucket)?;
        if let Err(refused) = self.admit("keyvalue.list-keys") {
            return Ok(Err(refusal(refused)));
        }
        // Only keys the grants cover are listed.
        let grants: Vec<_> = self.abi.caps.grants.keyvalue.iter().filter(|g| g.bucket == name).cloned().collect();
        let mut keys = Vec::new();
        for grant in grants {
            let found = if grant.prefix {
                self.abi.services.kv.keys_with_prefix(&name, &grant.key, LIST_CAP).await
            } else {
                match self.abi.services.kv.exists(&name, &grant.key).await {
                    Ok(true) => Ok(vec![grant.key.clone()]),
                    Ok(false) => Ok(Vec::new()),
                    Err(err) => Err(err),
                }
            };
            match found {
                Ok(found) => keys.extend(found),
                Err(err) => return Ok(Err(backend(err))),
            }
        }
        keys.sort();
        keys.dedup();
        let start = cursor.unwrap_or(0) as usize;
        let page: Vec<String> = keys.iter().skip(start).take(LIST_PAGE).cloned().collect();
        let next = start + page.len();
        let cursor = (next < keys.len()).then_some(next as u64);
        Ok(Ok(store::KeyResponse { keys: page, cursor }))
    }

    async fn drop(&mut self, bucket: Resource<BucketHandle>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for GuestState {
    async fn increment(
        &mut self,
        bucket: Resource<BucketHandle>,
        key: String,
        delta: u64,
    ) -> wasmtime::Result<Result<u64, Error>> {
        let name = self.bucket_of(&bucket)?;
        if let Err(err) = self.check_key("keyvalue.increment", &name, &key) {
            return Ok(Err(err));
        }
        Ok(self.abi.services.kv.increment(&name, &key, delta).await.map_err(backend))
    }
}
