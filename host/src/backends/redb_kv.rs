//! Key-value in one redb file: one table per bucket, each write its own
//! durable transaction (redb's default `Durability::Immediate`), so an
//! acknowledged write survives `kill -9` and power loss. Each tenant's
//! bytes are counted in table `meta/tenant-bytes`, in the same transaction
//! as the write that changes them.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};

use super::{BackendError, KeyValue, entry_bytes, kv_number, over_quota, tenant_of};

/// Bytes held per tenant.
const TENANT_BYTES: TableDefinition<&str, u64> = TableDefinition::new("meta/tenant-bytes");

/// The embedded key-value store.
#[derive(Clone)]
pub struct RedbKeyValue {
    path: std::path::PathBuf,
    /// The open database; `None` only while it is being reopened.
    db: Arc<std::sync::RwLock<Option<Arc<Database>>>>,
    /// Set when a write failed on I/O (a full disk): redb then refuses
    /// everything until the database is opened again, which the next call
    /// does first.
    poisoned: Arc<std::sync::atomic::AtomicBool>,
    /// The most bytes one tenant may hold (`None`: no limit).
    quota: Option<u64>,
}

fn table(bucket: &str) -> String {
    format!("kv/{bucket}")
}

impl RedbKeyValue {
    /// Open (or create) the store at `path`; each tenant may hold at most
    /// `quota` bytes of keys and values.
    pub fn open(path: &Path, quota: Option<u64>) -> Result<RedbKeyValue, BackendError> {
        let db = Database::create(path)
            .map_err(|err| BackendError::Failed(format!("cannot open key-value store {}: {err}", path.display())))?;
        Ok(RedbKeyValue {
            path: path.to_path_buf(),
            db: Arc::new(std::sync::RwLock::new(Some(Arc::new(db)))),
            poisoned: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            quota,
        })
    }

    /// The open database (reopening it first if an I/O error poisoned it).
    fn database(&self) -> Result<Arc<Database>, BackendError> {
        use std::sync::atomic::Ordering;
        if self.poisoned.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let slot = self.db.read().unwrap_or_else(|poison| poison.into_inner());
        slot.clone().ok_or_else(|| BackendError::Failed("the key-value store is being reopened".to_string()))
    }

    /// After a failed call: if redb now refuses every transaction for a
    /// previous I/O error, mark the store for reopening (and try now).
    fn check_poisoned(&self, db: &Database) {
        use std::sync::atomic::Ordering;
        let refused = matches!(db.begin_write(), Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)));
        if refused {
            self.poisoned.store(true, Ordering::Release);
        }
    }

    /// Close the database and open it again (redb's way out of a previous
    /// I/O error). Waits briefly for calls still holding the old handle.
    fn reopen(&self) -> Result<(), BackendError> {
        use std::sync::atomic::Ordering;
        let mut slot = self.db.write().unwrap_or_else(|poison| poison.into_inner());
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(old) = slot.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            let mut old = old;
            // The file lock goes with the last handle.
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(shared) if std::time::Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(shared) => {
                        *slot = Some(shared);
                        return Err(BackendError::Failed(
                            "the key-value store needs reopening after an I/O error and is still in use".to_string(),
                        ));
                    }
                }
            }
        }
        match Database::create(&self.path) {
            Ok(db) => {
                *slot = Some(Arc::new(db));
                self.poisoned.store(false, Ordering::Release);
                tracing::info!(path = %self.path.display(), "key-value store reopened after an I/O error");
                Ok(())
            }
            Err(err) => Err(BackendError::Failed(format!(
                "cannot reopen key-value store {} after an I/O error: {err}",
                self.path.display()
            ))),
        }
    }

    /// Bytes of keys and values `tenant` holds (counted since this store
    /// began counting).
    pub fn tenant_bytes(&self, tenant: &str) -> Result<u64, BackendError> {
        let txn = self.database()?.begin_read().map_err(BackendError::failed)?;
        match txn.open_table(TENANT_BYTES) {
            Ok(table) => Ok(table.get(tenant).map_err(BackendError::failed)?.map_or(0, |v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(err) => Err(BackendError::failed(err)),
        }
    }

    /// Run blocking redb work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let db = store.database()?;
            let result = work(&db);
            if matches!(result, Err(BackendError::Failed(_))) {
                store.check_poisoned(&db);
            }
            result
        })
        .await
        .map_err(BackendError::failed)?
    }

    /// One durable write transaction on `bucket`: `work` changes the
    /// entry at `key` and returns its new size (`None`: removed), and the
    /// tenant's byte count changes by the difference — refused when it
    /// would grow past `quota` (`None`: never refused).
    fn write<T>(
        db: &Database,
        bucket: &str,
        key: &str,
        quota: Option<u64>,
        work: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(T, Option<usize>), BackendError>,
    ) -> Result<T, BackendError> {
        let name = table(bucket);
        let tenant = tenant_of(bucket);
        let txn = db.begin_write().map_err(BackendError::failed)?;
        let result = {
            let mut table = txn.open_table(TableDefinition::<&str, &[u8]>::new(&name)).map_err(BackendError::failed)?;
            let before = table.get(key).map_err(BackendError::failed)?.map(|v| entry_bytes(key, v.value().len()));
            let (result, after) = work(&mut table)?;
            let (before, after) = (before.unwrap_or(0), after.map_or(0, |len| entry_bytes(key, len)));
            if before != after {
                let mut bytes = txn.open_table(TENANT_BYTES).map_err(BackendError::failed)?;
                let held = bytes.get(tenant).map_err(BackendError::failed)?.map_or(0, |v| v.value());
                let next = (held + after).saturating_sub(before);
                if let Some(quota) = quota
                    && after > before
                    && next > quota
                {
                    // Dropping the transaction undoes the write.
                    return Err(over_quota(tenant, quota));
                }
                bytes.insert(tenant, next).map_err(BackendError::failed)?;
            }
            result
        };
        txn.commit().map_err(BackendError::failed)?;
        Ok(result)
    }

    fn read<T>(
        db: &Database,
        bucket: &str,
        work: impl FnOnce(&redb::ReadOnlyTable<&str, &[u8]>) -> Result<T, BackendError>,
        missing: T,
    ) -> Result<T, BackendError> {
        let name = table(bucket);
        let txn = db.begin_read().map_err(BackendError::failed)?;
        match txn.open_table(TableDefinition::<&str, &[u8]>::new(&name)) {
            Ok(table) => work(&table),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(missing),
            Err(err) => Err(BackendError::failed(err)),
        }
    }
}

#[async_trait]
impl KeyValue for RedbKeyValue {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            Self::read(
                db,
                &bucket,
                |table| Ok(table.get(key.as_str()).map_err(BackendError::failed)?.map(|v| v.value().to_vec())),
                None,
            )
        })
        .await
    }

    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        let quota = self.quota;
        self.blocking(move |db| {
            Self::write(db, &bucket, &key, quota, |table| {
                table.insert(key.as_str(), value.as_slice()).map_err(BackendError::failed)?;
                Ok(((), Some(value.len())))
            })
        })
        .await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), BackendError> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            Self::write(db, &bucket, &key, None, |table| {
                table.remove(key.as_str()).map_err(BackendError::failed)?;
                Ok(((), None))
            })
        })
        .await
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, BackendError> {
        Ok(self.get(bucket, key).await?.is_some())
    }

    async fn keys_with_prefix(&self, bucket: &str, prefix: &str, limit: usize) -> Result<Vec<String>, BackendError> {
        let (bucket, prefix) = (bucket.to_string(), prefix.to_string());
        self.blocking(move |db| {
            Self::read(
                db,
                &bucket,
                |table| {
                    let mut keys = Vec::new();
                    for entry in table.range(prefix.as_str()..).map_err(BackendError::failed)? {
                        let (key, _) = entry.map_err(BackendError::failed)?;
                        let key = key.value();
                        if !key.starts_with(prefix.as_str()) || keys.len() >= limit {
                            break;
                        }
                        keys.push(key.to_string());
                    }
                    Ok(keys)
                },
                Vec::new(),
            )
        })
        .await
    }

    async fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, BackendError> {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            // One write transaction at a time: the read-modify-write is atomic.
            Self::write(db, &bucket, &key, None, |table| {
                let current = match table.get(key.as_str()).map_err(BackendError::failed)? {
                    Some(value) => kv_number(value.value())?,
                    None => 0,
                };
                let next = current
                    .checked_add(delta)
                    .ok_or_else(|| BackendError::Invalid("increment overflows a u64".to_string()))?;
                let text = next.to_string();
                table.insert(key.as_str(), text.as_bytes()).map_err(BackendError::failed)?;
                Ok((next, Some(text.len())))
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_counters_and_prefix_listing_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        {
            let kv = RedbKeyValue::open(&path, None).unwrap();
            kv.set("b", "a/1", b"one".to_vec()).await.unwrap();
            kv.set("b", "a/2", b"two".to_vec()).await.unwrap();
            kv.set("b", "b/1", b"x".to_vec()).await.unwrap();
            assert_eq!(kv.increment("b", "n", 5).await.unwrap(), 5);
            assert_eq!(kv.increment("b", "n", 2).await.unwrap(), 7);
            assert!(matches!(kv.increment("b", "a/1", 1).await, Err(BackendError::Invalid(_))));
        }
        let kv = RedbKeyValue::open(&path, None).unwrap();
        assert_eq!(kv.get("b", "a/1").await.unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(kv.get("b", "n").await.unwrap().as_deref(), Some(&b"7"[..]));
        assert_eq!(kv.keys_with_prefix("b", "a/", 10).await.unwrap(), ["a/1", "a/2"]);
        assert_eq!(kv.get("nobucket", "k").await.unwrap(), None);
        kv.delete("b", "a/1").await.unwrap();
        assert!(!kv.exists("b", "a/1").await.unwrap());
    }

    #[tokio::test]
    async fn a_tenant_is_held_to_its_quota_and_frees_room_by_deleting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        let kv = RedbKeyValue::open(&path, Some(100)).unwrap();
        kv.set("a/b", "k1", vec![0; 60]).await.unwrap(); // 62 bytes
        assert_eq!(kv.tenant_bytes("a").unwrap(), 62);
        let err = kv.set("a/b", "k2", vec![0; 60]).await.unwrap_err();
        assert!(matches!(err, BackendError::Full(_)), "{err:?}");
        assert!(err.to_string().contains("\"a\"") && err.to_string().contains("100 bytes"), "{err}");
        assert_eq!(kv.get("a/b", "k2").await.unwrap(), None, "the refused write left nothing");
        kv.set("b/b", "k2", vec![0; 60]).await.unwrap(); // another tenant's room is its own
        kv.set("a/b", "k1", vec![0; 10]).await.unwrap(); // shrinking is always allowed
        kv.set("a/b", "k2", vec![0; 60]).await.unwrap();
        assert_eq!(kv.tenant_bytes("a").unwrap(), 12 + 62);
        kv.delete("a/b", "k1").await.unwrap();
        assert_eq!(kv.tenant_bytes("a").unwrap(), 62);
        drop(kv);
        assert_eq!(
            RedbKeyValue::open(&path, Some(100)).unwrap().tenant_bytes("a").unwrap(),
            62,
            "the count is durable"
        );
    }
}
