//! Redis as the shared backend for key-value and pubsub, so several hosts
//! see the same state and messages.
//!
//! Key-value: `shoal:kv:{bucket}:{key}` string keys; counters are decimal
//! strings (`INCRBY`), as in the embedded store. Each tenant's bytes are
//! counted at `shoal:kv-bytes:{tenant}`, changed by the same Lua script as
//! the write, so count and data never disagree. Pubsub: one stream per
//! topic (`shoal:topic:{topic}`, capped near [`STREAM_MAX_LEN`] entries) and
//! one consumer group per subscribing function. A message is acknowledged
//! (`XACK`) only after its handler succeeds; a message not acknowledged —
//! nacked, or held by a host that died — is claimed again (`XAUTOCLAIM`)
//! once it has been idle for the back-off, so delivery is at least once
//! across hosts and host crashes.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply};

use super::broker::backoff;
use super::{BackendError, Broker, Delivery, KeyValue, Subscription, over_quota, tenant_of};

/// Streams are trimmed to about this many entries.
pub const STREAM_MAX_LEN: usize = 100_000;

/// How long one blocking read waits before checking for redeliveries.
const READ_BLOCK: Duration = Duration::from_millis(500);

/// How long connecting to Redis may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long one command may wait for its answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A Redis server, as key-value store and broker.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    conn: ConnectionManager,
    consumer: String,
    /// The most bytes one tenant may hold (`None`: no limit).
    quota: Option<u64>,
}

/// Write an entry and count its tenant's bytes, or refuse (returning -1)
/// when the tenant would grow past the quota (ARGV[3], 0: none).
/// KEYS: the entry, the tenant's count. ARGV: value, key length, quota,
/// `set` or `del`.
static WRITE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
        local keylen = tonumber(ARGV[2])
        local quota = tonumber(ARGV[3])
        local before = 0
        if redis.call('EXISTS', KEYS[1]) == 1 then before = redis.call('STRLEN', KEYS[1]) + keylen end
        local after = 0
        if ARGV[4] == 'set' then after = string.len(ARGV[1]) + keylen end
        local held = tonumber(redis.call('GET', KEYS[2]) or '0')
        local next = held - before + after
        if next < 0 then next = 0 end
        if quota > 0 and after > before and next > quota then return -1 end
        if ARGV[4] == 'set' then redis.call('SET', KEYS[1], ARGV[1]) else redis.call('DEL', KEYS[1]) end
        redis.call('SET', KEYS[2], next)
        return next
        ",
    )
});

/// `INCRBY` an entry and count its tenant's bytes (increments are never
/// refused). KEYS: the entry, the tenant's count. ARGV: delta, key length.
static INCREMENT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
        local keylen = tonumber(ARGV[2])
        local before = 0
        if redis.call('EXISTS', KEYS[1]) == 1 then before = redis.call('STRLEN', KEYS[1]) + keylen end
        local value = redis.call('INCRBY', KEYS[1], ARGV[1])
        local after = redis.call('STRLEN', KEYS[1]) + keylen
        local held = tonumber(redis.call('GET', KEYS[2]) or '0')
        redis.call('SET', KEYS[2], math.max(0, held - before + after))
        return value
        ",
    )
});

fn failed(err: redis::RedisError) -> BackendError {
    BackendError::Failed(format!("redis: {err}"))
}

impl Redis {
    /// Connect to `url` (e.g. `redis://127.0.0.1:6379`).
    pub async fn connect(url: &str) -> Result<Redis, BackendError> {
        let client =
            redis::Client::open(url).map_err(|err| BackendError::Failed(format!("redis url {url:?}: {err}")))?;
        // Fail fast while Redis is away (a call gets an error value within
        // about a second, not after the default minute of retries); the
        // manager reconnects in the background once it is back.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(250));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|err| BackendError::Failed(format!("cannot connect to redis at {url}: {err}")))?;
        Ok(Redis { client, conn, consumer: format!("host-{}", uuid::Uuid::new_v4()), quota: None })
    }

    /// Hold each tenant to `quota` bytes of keys and values.
    pub fn with_kv_quota(mut self, quota: Option<u64>) -> Redis {
        self.quota = quota;
        self
    }

    fn tenant_bytes_key(bucket: &str) -> String {
        format!("shoal:kv-bytes:{}", tenant_of(bucket))
    }

    async fn write(&self, bucket: &str, key: &str, value: Option<Vec<u8>>) -> Result<(), BackendError> {
        let op = if value.is_some() { "set" } else { "del" };
        let held: i64 = WRITE
            .key(Self::key(bucket, key))
            .key(Self::tenant_bytes_key(bucket))
            .arg(value.unwrap_or_default())
            .arg(key.len())
            .arg(self.quota.unwrap_or(0))
            .arg(op)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(failed)?;
        if held < 0 {
            return Err(over_quota(tenant_of(bucket), self.quota.unwrap_or(0)));
        }
        Ok(())
    }

    fn key(bucket: &str, key: &str) -> String {
        format!("shoal:kv:{bucket}:{key}")
    }

    fn stream(topic: &str) -> String {
        format!("shoal:topic:{topic}")
    }
}

/// Escape Redis glob characters so a prefix matches literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[async_trait]
impl KeyValue for Redis {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, BackendError> {
        self.conn.clone().get(Self::key(bucket, key)).await.map_err(failed)
    }

    async fn set(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<(), BackendError> {
        self.write(bucket, key, Some(value)).await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), BackendError> {
        self.write(bucket, key, None).await
    }

    async fn exists(&self, bucket: &str, key: &str) -> Result<bool, BackendError> {
        self.conn.clone().exists(Self::key(bucket, key)).await.map_err(failed)
    }

    async fn keys_with_prefix(&self, bucket: &str, prefix: &str, limit: usize) -> Result<Vec<String>, BackendError> {
        let namespace = Self::key(bucket, "");
        let pattern = format!("{}*", glob_escape(&Self::key(bucket, prefix)));
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(failed)?;
            keys.extend(batch.into_iter().filter_map(|key| key.strip_prefix(&namespace).map(str::to_string)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.truncate(limit);
        Ok(keys)
    }

    async fn increment(&self, bucket: &str, key: &str, delta: u64) -> Result<u64, BackendError> {
        let delta = i64::try_from(delta).map_err(|_| BackendError::Invalid("increment delta too large".into()))?;
        let value: Result<i64, _> = INCREMENT
            .key(Self::key(bucket, key))
            .key(Self::tenant_bytes_key(bucket))
            .arg(delta)
            .arg(key.len())
            .invoke_async(&mut self.conn.clone())
            .await;
        match value {
            Ok(value) => Ok(value as u64),
            Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) => {
                Err(BackendError::Invalid("the value at this key is not a decimal number".to_string()))
            }
            Err(err) => Err(failed(err)),
        }
    }
}

#[async_trait]
impl Broker for Redis {
    async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<String, BackendError> {
        let id: String = self
            .conn
            .clone()
            .xadd_maxlen(
                Self::stream(topic),
                redis::streams::StreamMaxlen::Approx(STREAM_MAX_LEN),
                "*",
                &[("p", payload)],
            )
            .await
            .map_err(failed)?;
        Ok(id)
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>, BackendError> {
        let stream = Self::stream(topic);
        let created: Result<(), redis::RedisError> =
            self.conn.clone().xgroup_create_mkstream(&stream, group, "$").await;
        if let Err(err) = created
            && err.code() != Some("BUSYGROUP")
        {
            return Err(failed(err));
        }
        // Blocking reads get a connection of their own, whose response
        // timeout outlasts the block: a read the client gave up on would
        // still hand the message to this consumer on the server.
        let mut subscription = RedisSubscription {
            client: self.client.clone(),
            conn: None,
            stream,
            topic: topic.to_string(),
            group: group.to_string(),
            consumer: self.consumer.clone(),
            attempts: HashMap::new(),
        };
        subscription.connection().await?;
        Ok(Box::new(subscription))
    }

    async fn unsubscribe(&self, topic: &str, group: &str) {
        let _: Result<(), _> = self.conn.clone().xgroup_destroy(Self::stream(topic), group).await;
    }
}

/// One subscriber's reading of a stream. It owns its connection (reads
/// block), and gets a new one after any connection failure: a Redis
/// restart costs the subscriber an error or two, then it reads on. A group
/// that Redis lost (a restart without persistence) is created again, from
/// the stream's start, so what was published since is delivered.
struct RedisSubscription {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    stream: String,
    topic: String,
    group: String,
    consumer: String,
    attempts: HashMap<String, u32>,
}

impl RedisSubscription {
    async fn connection(&mut self) -> Result<MultiplexedConnection, BackendError> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(READ_BLOCK + RESPONSE_TIMEOUT));
        let conn = self.client.get_multiplexed_async_connection_with_config(&config).await.map_err(failed)?;
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// The error for the broker's caller, forgetting a connection that
    /// failed and recreating a group that is gone.
    async fn recover(&mut self, err: redis::RedisError) -> BackendError {
        if err.code() == Some("NOGROUP") {
            if let Ok(mut conn) = self.connection().await {
                let created: Result<(), redis::RedisError> =
                    conn.xgroup_create_mkstream(&self.stream, &self.group, "0").await;
                if let Err(err) = created
                    && err.code() != Some("BUSYGROUP")
                {
                    return failed(err);
                }
                tracing::warn!(topic = %self.topic, group = %self.group, "redis lost the consumer group; created it again");
            }
            return failed(err);
        }
        if err.is_io_error()
            || err.is_connection_dropped()
            || err.is_connection_refusal()
            || err.is_timeout()
            || err.is_unrecoverable_error()
        {
            self.conn = None;
        }
        failed(err)
    }

    fn delivery(&self, entry: &redis::streams::StreamId, attempt: u32) -> Delivery {
        let payload: Vec<u8> = entry.get("p").unwrap_or_default();
        Delivery { id: entry.id.clone(), topic: self.topic.clone(), payload, attempt }
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next(&mut self) -> Result<Delivery, BackendError> {
        loop {
            // Messages left unacknowledged (nacked here, or held by a host
            // that died) come back once idle for the back-off.
            let min_idle = backoff(1).as_millis() as usize;
            let mut conn = self.connection().await?;
            let claimed: Result<StreamAutoClaimReply, _> = conn
                .xautoclaim_options(
                    &self.stream,
                    &self.group,
                    &self.consumer,
                    min_idle,
                    "0-0",
                    StreamAutoClaimOptions::default().count(1),
                )
                .await;
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(err) => return Err(self.recover(err).await),
            };
            if let Some(entry) = claimed.claimed.first() {
                let attempt = self.attempts.get(&entry.id).copied().unwrap_or(1) + 1;
                let ready = entry
                    .milliseconds_elapsed_from_delivery
                    .is_none_or(|idle| idle as u128 >= backoff(attempt - 1).as_millis());
                if ready {
                    self.attempts.insert(entry.id.clone(), attempt);
                    return Ok(self.delivery(entry, attempt));
                }
            }
            let options = StreamReadOptions::default()
                .group(&self.group, &self.consumer)
                .count(1)
                .block(READ_BLOCK.as_millis() as usize);
            let read: Result<Option<StreamReadReply>, _> = conn.xread_options(&[&self.stream], &[">"], &options).await;
            let read = match read {
                Ok(read) => read,
                Err(err) => return Err(self.recover(err).await),
            };
            if let Some(entry) = read.as_ref().and_then(|reply| reply.keys.first()).and_then(|key| key.ids.first()) {
                return Ok(self.delivery(entry, 1));
            }
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), BackendError> {
        self.attempts.remove(&delivery.id);
        let mut conn = self.connection().await?;
        let acked: Result<i64, _> = conn.xack(&self.stream, &self.group, &[&delivery.id]).await;
        match acked {
            Ok(_) => Ok(()),
            Err(err) => Err(self.recover(err).await),
        }
    }

    async fn nack(&mut self, delivery: &Delivery) -> Result<(), BackendError> {
        // Left pending: XAUTOCLAIM hands it out again after the back-off.
        self.attempts.insert(delivery.id.clone(), delivery.attempt);
        Ok(())
    }
}
