//! State: `wasi:keyvalue` buckets, as granted by the manifest's
//! `grants.keyvalue` (`"bucket:key"` or `"bucket:prefix*"`).
//!
//! ```no_run
//! let bucket = shoal_sdk::kv::open("default")?;
//! let visits = bucket.increment("hello/visits", 1)?;
//! bucket.set("hello/last", b"now")?;
//! # Ok::<(), shoal_sdk::kv::Error>(())
//! ```

use crate::imports::wasi::keyvalue::{atomics, store};

/// Why a key-value call failed: `AccessDenied` (not granted), `NoSuchStore`,
/// or `Other` (a size or rate limit, a backend failure), described.
pub use store::Error;

/// An open bucket.
pub struct Bucket(store::Bucket);

/// Open the bucket `name`.
pub fn open(name: &str) -> Result<Bucket, Error> {
    store::open(name).map(Bucket)
}

impl Bucket {
    /// The value at `key`.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.0.get(key)
    }

    /// Store `value` at `key` (durable once this returns).
    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), Error> {
        self.0.set(key, value)
    }

    /// Remove `key`.
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        self.0.delete(key)
    }

    /// Whether `key` has a value.
    pub fn exists(&self, key: &str) -> Result<bool, Error> {
        self.0.exists(key)
    }

    /// Every key this function may see in the bucket.
    pub fn keys(&self) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.0.list_keys(cursor)?;
            keys.extend(page.keys);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Add `delta` to the decimal counter at `key`; the new value.
    pub fn increment(&self, key: &str, delta: u64) -> Result<u64, Error> {
        atomics::increment(&self.0, key, delta)
    }
}
