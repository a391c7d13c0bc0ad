//! Redis as the shared backend for key-value and pubsub, so several hosts
//! see the same state and messages.
//!
//! Key-value: `shoal:kv:{bucket}:{key}` string keys; counters are decimal
//! strings (`INCRBY`), as in the embedded store. Each tenant's bytes are
//! counted at `shoal:kv-bytes:{tenant}`, changed by the same Lua script as
//! the write, so count and data never disagree. Pubsub: one stream per
//! topic (`shoal:topic:{topic}`) and one consumer group per subscribing
//! function. A publish first trims what every group has acknowledged, then
//! is refused when the stream holds [`STREAM_MAX_LEN`] entries or when its
//! tenant's undelivered payload bytes (`shoal:topic-bytes:{tenant}`, kept
//! by the same script) would pass the tenant's budget. A message is acknowledged
//! (`XACK`) only after its handler succeeds; a message not acknowledged —
//! nacked, or held by a host that died — is claimed again (`XAUTOCLAIM`)
//! once it has been idle for the back-off, so delivery is at least once
//! across hosts and host crashes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimOptions, StreamAutoClaimReply, StreamReadOptions, StreamReadReply};

use super::broker::backoff;
use super::{BackendError, Broker, Delivery, KeyValue, QueueBudgets, Subscription, over_quota, tenant_of};

/// The most entries a stream holds; publishes beyond are refused.
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
    /// Each tenant's budget of undelivered message bytes.
    queue_budgets: Arc<QueueBudgets>,
}

/// Write an entry and count its tenant's bytes, or refuse (returning -1)
/// when the tenant would grow past the quota (`ARGV[3]`, 0: none).
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

/// `INCRBY` an entry and count its tenant's bytes, or undo it and refuse
/// (returning `{0, 0}`) when the tenant would grow past the quota (`ARGV[3]`,
/// 0: none); `{1, value}` when done. KEYS: the entry, the tenant's count.
/// ARGV: delta, key length, quota.
static INCREMENT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
        local keylen = tonumber(ARGV[2])
        local quota = tonumber(ARGV[3])
        local existed = redis.call('EXISTS', KEYS[1]) == 1
        local before = 0
        if existed then before = redis.call('STRLEN', KEYS[1]) + keylen end
        local value = redis.call('INCRBY', KEYS[1], ARGV[1])
        local after = redis.call('STRLEN', KEYS[1]) + keylen
        local held = tonumber(redis.call('GET', KEYS[2]) or '0')
        local next = math.max(0, held - before + after)
        if quota > 0 and after > before and next > quota then
            if existed then redis.call('DECRBY', KEYS[1], ARGV[1]) else redis.call('DEL', KEYS[1]) end
            return {0, 0}
        end
        redis.call('SET', KEYS[2], next)
        return {1, value}
        ",
    )
});

/// Publish to a stream, held to its tenant's budget of undelivered bytes.
///
/// First trims, from the stream's start, up to `ARGV[4]` entries that no
/// group needs any more (every group has acknowledged them; a stream with
/// no group delivers nothing more), and takes their bytes off the tenant's
/// count. Then refuses with `{0, held}` when the payload would take the
/// tenant's count past its budget (`ARGV[2]`, 0: none), or with `{-1, length}`
/// when the stream holds `ARGV[3]` entries; else appends and counts it:
/// `{1, id}`. Nothing undelivered is ever trimmed (`MAXLEN` would drop
/// messages no subscriber has seen). KEYS: the stream, the tenant's count.
/// ARGV: payload, budget, most entries, trim batch.
static PUBLISH: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
        local function parse(id)
            local ms, seq = string.match(id, '^(%d+)-(%d+)$')
            return tonumber(ms), tonumber(seq)
        end
        -- Is `a` (inclusive when `ai`) a lower bound than `b`?
        local function lower(a, ai, b, bi)
            local ams, aseq = parse(a)
            local bms, bseq = parse(b)
            if ams ~= bms then return ams < bms end
            if aseq ~= bseq then return aseq < bseq end
            return bi and not ai
        end
        if redis.call('EXISTS', KEYS[1]) == 1 then
            -- The entries every group is done with: up to (and with) its
            -- last delivered entry when nothing is pending, else those
            -- before its oldest pending one.
            local bound, inclusive = '+', true
            local first = true
            for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
                local info = {}
                for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
                local id, incl = info['last-delivered-id'], true
                if tonumber(info['pending']) > 0 then
                    id = redis.call('XPENDING', KEYS[1], info['name'])[2]
                    incl = false
                end
                if first or lower(id, incl, bound, inclusive) then bound, inclusive = id, incl end
                first = false
            end
            local upto = bound
            if not inclusive then upto = '(' .. bound end
            local done = redis.call('XRANGE', KEYS[1], '-', upto, 'COUNT', tonumber(ARGV[4]))
            if #done > 0 then
                local freed, ids = 0, {}
                for _, entry in ipairs(done) do
                    local fields = entry[2]
                    for i = 1, #fields, 2 do
                        if fields[i] == 'p' then freed = freed + string.len(fields[i + 1]) end
                    end
                    ids[#ids + 1] = entry[1]
                end
                redis.call('XDEL', KEYS[1], unpack(ids))
                local held = tonumber(redis.call('GET', KEYS[2]) or '0')
                redis.call('SET', KEYS[2], math.max(0, held - freed))
            end
        end
        local held = tonumber(redis.call('GET', KEYS[2]) or '0')
        local budget = tonumber(ARGV[2])
        if budget > 0 and held + string.len(ARGV[1]) > budget then return {0, tostring(held)} end
        local length = redis.call('XLEN', KEYS[1])
        if length >= tonumber(ARGV[3]) then return {-1, tostring(length)} end
        local id = redis.call('XADD', KEYS[1], '*', 'p', ARGV[1])
        redis.call('SET', KEYS[2], held + string.len(ARGV[1]))
        return {1, id}
        ",
    )
});

/// Entries a publish trims at most (the script runs alone on the server).
const TRIM_BATCH: usize = 256;

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
        Ok(Redis {
            client,
            conn,
            consumer: format!("host-{}", uuid::Uuid::new_v4()),
            quota: None,
            queue_budgets: Arc::default(),
        })
    }

    /// The server's address, for breakers and logs (no credentials).
    pub fn target(&self) -> String {
        format!("redis {}", self.client.get_connection_info().addr())
    }

    /// Hold each tenant to `quota` bytes of keys and values.
    pub fn with_kv_quota(mut self, quota: Option<u64>) -> Redis {
        self.quota = quota;
        self
    }

    /// Hold each tenant's undelivered messages to `budgets`.
    pub fn with_queue_budgets(mut self, budgets: Arc<QueueBudgets>) -> Redis {
        self.queue_budgets = budgets;
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
        let value: Result<(i64, i64), _> = INCREMENT
            .key(Self::key(bucket, key))
            .key(Self::tenant_bytes_key(bucket))
            .arg(delta)
            .arg(key.len())
            .arg(self.quota.unwrap_or(0))
            .invoke_async(&mut self.conn.clone())
            .await;
        match value {
            Ok((1, value)) => Ok(value as u64),
            Ok(_) => Err(over_quota(tenant_of(bucket), self.quota.unwrap_or(0))),
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
        let tenant = tenant_of(topic);
        let budget = self.queue_budgets.of(tenant);
        let (status, said): (i64, String) = PUBLISH
            .key(Self::stream(topic))
            .key(format!("shoal:topic-bytes:{tenant}"))
            .arg(payload)
            .arg(budget)
            .arg(STREAM_MAX_LEN)
            .arg(TRIM_BATCH)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(failed)?;
        match status {
            1 => Ok(said),
            0 => Err(BackendError::Full(format!(
                "tenant {tenant:?} has {said} bytes of messages undelivered across its topics (at most {budget}); \
                 its subscribers are behind"
            ))),
            _ => Err(BackendError::Full(format!(
                "topic {topic:?} holds {said} messages not yet delivered to every subscriber (at most {STREAM_MAX_LEN})"
            ))),
        }
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
