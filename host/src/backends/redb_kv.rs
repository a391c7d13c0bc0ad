//! Key-value in one redb file: one table per bucket. Writes are group
//! committed: one writer thread takes every write waiting at the moment,
//! applies them in order in one transaction and commits it durably
//! (redb's default `Durability::Immediate`, one fsync), then answers each.
//! So an acknowledged write survives `kill -9` and power loss, as with a
//! transaction per write, while concurrent writers share the fsync
//! (benchmark W3). Each tenant's bytes are counted in table
//! `meta/tenant-bytes`, in the same transaction as the writes that change
//! them.
//!
//! A write is checked (its value, the tenant's quota) before it changes
//! anything, so a refused write leaves the batch it shares untouched; a
//! storage failure fails the whole batch, and nothing of it is committed.
//! redb has no group commit of its own (one write transaction at a time,
//! each committed by its owner), hence the writer thread here.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{BackendError, KeyValue, entry_bytes, kv_number, over_quota, tenant_of};

/// Bytes held per tenant.
const TENANT_BYTES: TableDefinition<&str, u64> = TableDefinition::new("meta/tenant-bytes");

/// Writes waiting for the writer. Each waiting write is a guest call
/// awaiting it (one per instance at most), so this bounds nothing a guest
/// could not already hold; past it, writers wait their turn.
const QUEUE: usize = 1024;
/// At most this many writes share one commit...
const BATCH_WRITES: usize = 512;
/// ...and at most this many bytes of values (at least one write).
const BATCH_BYTES: usize = 16 << 20;

/// The embedded key-value store.
#[derive(Clone)]
pub struct RedbKeyValue {
    store: Arc<Store>,
    writer: Arc<Writer>,
}

/// The database and what reopening it needs (shared with the writer thread).
struct Store {
    path: std::path::PathBuf,
    /// The open database; `None` only while it is being reopened.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// Set when a write failed on I/O (a full disk): redb then refuses
    /// everything until the database is opened again, which the next call
    /// does first.
    poisoned: AtomicBool,
    /// Set by [`KeyValue::close`]: the file is another process's now.
    closed: AtomicBool,
    /// The most bytes one tenant may hold (`None`: no limit).
    quota: Option<u64>,
    /// Transactions committed by the writer (each holding one or more writes).
    commits: AtomicU64,
}

/// The writer thread and the way to it; the last handle's drop closes the
/// queue and waits for the thread, so the database is closed (and its file
/// lock gone) once the last [`RedbKeyValue`] is.
struct Writer {
    queue: Option<mpsc::Sender<WriteOp>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One write waiting for its commit.
struct WriteOp {
    bucket: String,
    key: String,
    change: Change,
    /// The tenant's quota for this write (`None`: never refused for size).
    quota: Option<u64>,
    /// The result: an increment's new value, else 0.
    reply: oneshot::Sender<Result<u64, BackendError>>,
}

/// What a write does to its entry.
enum Change {
    Set(Vec<u8>),
    Delete,
    Increment(u64),
}

impl WriteOp {
    fn value_bytes(&self) -> usize {
        match &self.change {
            Change::Set(value) => value.len(),
            Change::Delete | Change::Increment(_) => 0,
        }
    }
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
        let store = Arc::new(Store {
            path: path.to_path_buf(),
            db: std::sync::RwLock::new(Some(Arc::new(db))),
            poisoned: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            quota,
            commits: AtomicU64::new(0),
        });
        let (queue, writes) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("shoal-kv-writer".into())
            .spawn({
                let store = store.clone();
                move || store.write_loop(writes)
            })
            .map_err(|err| BackendError::Failed(format!("cannot start the key-value writer: {err}")))?;
        Ok(RedbKeyValue { store, writer: Arc::new(Writer { queue: Some(queue), thread: Some(thread) }) })
    }

    /// Bytes of keys and values `tenant` holds (counted since this store
    /// began counting).
    pub fn tenant_bytes(&self, tenant: &str) -> Result<u64, BackendError> {
        let txn = self.store.database()?.begin_read().map_err(BackendError::failed)?;
        match txn.open_table(TENANT_BYTES) {
            Ok(table) => Ok(table.get(tenant).map_err(BackendError::failed)?.map_or(0, |v| v.value())),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(err) => Err(BackendError::failed(err)),
        }
    }

    /// Write transactions committed so far (each holds one or more writes).
    pub fn commits(&self) -> u64 {
        self.store.commits.load(Ordering::Relaxed)
    }

    /// Queue a write and wait until it is committed (or refused).
    async fn write(&self, bucket: &str, key: &str, change: Change, quota: Option<u64>) -> Result<u64, BackendError> {
        let (reply, answer) = oneshot::channel();
        let op = WriteOp { bucket: bucket.to_string(), key: key.to_string(), change, quota, reply };
        let queue = self.writer.queue.as_ref().expect("invariant: the queue closes only when the last handle drops");
        queue.send(op).await.map_err(|_| BackendError::Failed("the key-value writer has stopped".to_string()))?;
        answer.await.map_err(|_| BackendError::Failed("the key-value writer stopped before committing".to_string()))?
    }

    /// Run blocking redb reads off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let store = self.store.clone();
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

/// Drop the database once no call holds it (within 2 s), which releases
/// its file lock; else give it back.
fn close_when_unused(mut db: Arc<Database>) -> Result<(), Arc<Database>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match Arc::try_unwrap(db) {
            Ok(db) => {
                drop(db);
                return Ok(());
            }
            Err(shared) if std::time::Instant::now() < deadline => {
                db = shared;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(shared) => return Err(shared),
        }
    }
}

impl Store {
    /// The open database (reopening it first if an I/O error poisoned it).
    fn database(&self) -> Result<Arc<Database>, BackendError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(BackendError::Failed(
                "the key-value store is closed: this host handed it over to a new host process".to_string(),
            ));
        }
        if self.poisoned.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let slot = self.db.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.clone().ok_or_else(|| BackendError::Failed("the key-value store is being reopened".to_string()))
    }

    /// After a failed call: if redb now refuses every transaction for a
    /// previous I/O error, mark the store for reopening (and try now).
    fn check_poisoned(&self, db: &Database) {
        let refused = matches!(db.begin_write(), Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)));
        if refused {
            self.poisoned.store(true, Ordering::Release);
        }
    }

    /// Close the database and open it again (redb's way out of a previous
    /// I/O error). Waits briefly for calls still holding the old handle.
    fn reopen(&self) -> Result<(), BackendError> {
        let mut slot = self.db.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        if let Some(old) = slot.take()
            && let Err(old) = close_when_unused(old)
        {
            *slot = Some(old);
            return Err(BackendError::Failed(
                "the key-value store needs reopening after an I/O error and is still in use".to_string(),
            ));
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

    /// The writer thread: take what is waiting (up to a batch), commit it
    /// as one transaction, answer each write; until the queue closes.
    fn write_loop(&self, mut writes: mpsc::Receiver<WriteOp>) {
        let mut held: Option<WriteOp> = None;
        loop {
            let Some(first) = held.take().or_else(|| writes.blocking_recv()) else { return };
            let mut bytes = first.value_bytes();
            let mut batch = vec![first];
            while batch.len() < BATCH_WRITES {
                match writes.try_recv() {
                    Ok(op) if bytes + op.value_bytes() > BATCH_BYTES => {
                        held = Some(op);
                        break;
                    }
                    Ok(op) => {
                        bytes += op.value_bytes();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
        }
    }

    /// Apply `batch` in order in one transaction and commit it; answer
    /// each write with its own result once the commit is durable.
    fn commit_batch(&self, batch: Vec<WriteOp>) {
        let db = match self.database() {
            Ok(db) => db,
            Err(err) => return answer_all(batch, &err),
        };
        let txn = match db.begin_write() {
            Ok(txn) => txn,
            Err(err) => {
                let err = BackendError::failed(err);
                self.check_poisoned(&db);
                return answer_all(batch, &err);
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        for op in &batch {
            let result = apply(&txn, op);
            if let Err(BackendError::Failed(why)) = &result {
                // The transaction may hold part of this write: drop it all.
                let err = BackendError::Failed(why.clone());
                drop(txn);
                self.check_poisoned(&db);
                return answer_all(batch, &err);
            }
            results.push(result);
        }
        if let Err(err) = txn.commit() {
            let err = BackendError::failed(err);
            self.check_poisoned(&db);
            return answer_all(batch, &err);
        }
        self.commits.fetch_add(1, Ordering::Relaxed);
        for (op, result) in batch.into_iter().zip(results) {
            // A writer that gave up waiting is no reason to stop.
            let _ = op.reply.send(result);
        }
    }
}

fn answer_all(batch: Vec<WriteOp>, err: &BackendError) {
    for op in batch {
        let _ = op.reply.send(Err(err.clone()));
    }
}

/// Apply one write inside `txn`: check it first (the value, the tenant's
/// quota), change nothing if it is refused ([`BackendError::Invalid`],
/// [`BackendError::Full`]); [`BackendError::Failed`] means storage failed,
/// possibly halfway. Returns an increment's new value, else 0.
fn apply(txn: &redb::WriteTransaction, op: &WriteOp) -> Result<u64, BackendError> {
    let name = table(&op.bucket);
    let key = op.key.as_str();
    let mut table = txn.open_table(TableDefinition::<&str, &[u8]>::new(&name)).map_err(BackendError::failed)?;
    let (before, current) = match table.get(key).map_err(BackendError::failed)? {
        Some(value) => {
            let value = value.value();
            let number = matches!(op.change, Change::Increment(_)).then(|| kv_number(value));
            (Some(entry_bytes(key, value.len())), number)
        }
        None => (None, None),
    };
    // The new value (`None`: removed) and what the write returns.
    let (after, result): (Option<std::borrow::Cow<[u8]>>, u64) = match &op.change {
        Change::Set(value) => (Some(value.as_slice().into()), 0),
        Change::Delete => (None, 0),
        Change::Increment(delta) => {
            let current = current.transpose()?.unwrap_or(0);
            let next = current
                .checked_add(*delta)
                .ok_or_else(|| BackendError::Invalid("increment overflows a u64".to_string()))?;
            (Some(next.to_string().into_bytes().into()), next)
        }
    };
    let (before, after_bytes) = (before.unwrap_or(0), after.as_ref().map_or(0, |value| entry_bytes(key, value.len())));
    if before != after_bytes {
        let mut bytes = txn.open_table(TENANT_BYTES).map_err(BackendError::failed)?;
        let tenant = tenant_of(&op.bucket);
        let held = bytes.get(tenant).map_err(BackendError::failed)?.map_or(0, |v| v.value());
        let next = (held + after_bytes).saturating_sub(before);
        if let Some(quota) = op.quota
            && after_bytes > before
            && next > quota
        {
            return Err(over_quota(tenant, quota));
        }
        bytes.insert(tenant, next).map_err(BackendError::failed)?;
    }
    match after {
        Some(value) => table.insert(key, value.as_ref()).map(drop),
        None => table.remove(key).map(drop),
    }
    .map_err(BackendError::failed)?;
    Ok(result)
}

#[async_trait]
impl KeyValue for RedbKeyValue {
    fn close(&self) -> Result<(), BackendError> {
        self.store.closed.store(true, Ordering::Release);
        let mut slot = self.store.db.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        match slot.take().map(close_when_unused) {
            None | Some(Ok(())) => Ok(()),
            Some(Err(db)) => {
                *slot = Some(db);
                Err(BackendError::Failed("the key-value store is still in use after 2 s".to_string()))
            }
        }
    }

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
        self.write(bucket, key, Change::Set(value), self.store.quota).await.map(drop)
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), BackendError> {
        self.write(bucket, key, Change::Delete, None).await.map(drop)
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
        // Writes apply one after another in the writer: the
        // read-modify-write is atomic. Counted against the quota like a set:
        // increments of new keys are writes too.
        self.write(bucket, key, Change::Increment(delta), self.store.quota).await
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

    #[tokio::test]
    async fn increments_count_against_the_quota_and_new_keys_past_it_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kv = RedbKeyValue::open(&dir.path().join("kv.redb"), Some(40)).unwrap();
        // Counters of fresh keys: each a key and a few digits.
        let mut made = 0;
        for n in 0..100 {
            match kv.increment("a/b", &format!("counter-{n:04}"), 1).await {
                Ok(1) => made += 1,
                Ok(other) => panic!("a fresh counter is 1, not {other}"),
                Err(err) => {
                    assert!(matches!(err, BackendError::Full(_)), "{err:?}");
                    break;
                }
            }
        }
        assert_eq!(made, 3, "3 counters of 13 bytes fit in 40");
        assert!(kv.tenant_bytes("a").unwrap() <= 40);
        assert_eq!(kv.get("a/b", "counter-0003").await.unwrap(), None, "the refused increment left nothing");
        assert_eq!(kv.increment("a/b", "counter-0000", 1).await.unwrap(), 2, "one that stays as long is fine");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_commits_and_lose_no_increment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        let kv = RedbKeyValue::open(&path, None).unwrap();
        let mut writers = tokio::task::JoinSet::new();
        for _ in 0..64 {
            let kv = kv.clone();
            writers.spawn(async move {
                for _ in 0..20 {
                    kv.increment("b", "n", 1).await.unwrap();
                }
            });
        }
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
        assert_eq!(kv.get("b", "n").await.unwrap().as_deref(), Some(&b"1280"[..]));
        let commits = kv.commits();
        assert!(commits < 640, "1280 increments from 64 writers took {commits} commits: no sharing");
        drop(kv);
        let reopened = RedbKeyValue::open(&path, None).unwrap();
        assert_eq!(reopened.get("b", "n").await.unwrap().as_deref(), Some(&b"1280"[..]), "every increment is durable");
    }

    #[tokio::test]
    async fn a_refused_write_leaves_the_rest_of_its_batch_committed() {
        let dir = tempfile::tempdir().unwrap();
        let kv = RedbKeyValue::open(&dir.path().join("kv.redb"), Some(100)).unwrap();
        kv.set("a/b", "text", b"hi".to_vec()).await.unwrap(); // 6 bytes
        let mut answers = Vec::new();
        let mut op = |key: &str, change, quota| {
            let (reply, answer) = oneshot::channel();
            answers.push(answer);
            WriteOp { bucket: "a/b".to_string(), key: key.to_string(), change, quota, reply }
        };
        let batch = vec![
            op("k1", Change::Set(vec![0; 60]), Some(100)), // 62: fits (68 held)
            op("k2", Change::Set(vec![0; 60]), Some(100)), // would be 130: refused
            op("text", Change::Increment(1), None),        // not a number: refused
            op("n", Change::Increment(5), None),           // fits
            op("k1", Change::Delete, None),
        ];
        kv.store.commit_batch(batch);
        let results: Vec<_> = answers.into_iter().map(|mut answer| answer.try_recv().unwrap()).collect();
        assert!(matches!(results[0], Ok(0)), "{:?}", results[0]);
        assert!(matches!(results[1], Err(BackendError::Full(_))), "{:?}", results[1]);
        assert!(matches!(results[2], Err(BackendError::Invalid(_))), "{:?}", results[2]);
        assert!(matches!(results[3], Ok(5)), "{:?}", results[3]);
        assert!(results[4].is_ok());
        assert_eq!(kv.get("a/b", "k2").await.unwrap(), None, "the refused write left nothing");
        assert_eq!(kv.get("a/b", "k1").await.unwrap(), None, "a later write in the batch saw the earlier one");
        assert_eq!(kv.get("a/b", "text").await.unwrap().as_deref(), Some(&b"hi"[..]));
        assert_eq!(kv.get("a/b", "n").await.unwrap().as_deref(), Some(&b"5"[..]));
        assert_eq!(kv.tenant_bytes("a").unwrap(), 6 + 2, "the count follows the committed writes only");
    }
}
