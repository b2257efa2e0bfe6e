//! Limits that hold across a fleet of gateways, kept in Redis (issue 19, first step: the
//! store; the manifest's `[cluster]` and the handshake admission use it next).
//!
//! The model, chosen so that none of the failure modes users of other gateways complain about
//! (drifting counters, a round trip per request, slots leaked by a dead replica) can happen:
//!
//! - **Slots**: each limited thing (a subscription, an API) has one hash, field = gateway id,
//!   value = the connections that gateway holds. Acquiring a slot is one Lua script: it sums
//!   the fields of gateways whose lease is alive (dropping the others' fields as it goes) and
//!   increments this gateway's field if the sum is under the limit. Releasing decrements it.
//!   One round trip per admitted handshake and one per close; nothing per frame.
//! - **Leases**: one hash of gateway id -> expiry (Redis's own clock, so gateway clocks do not
//!   matter). [`Store::heartbeat`] renews this gateway's lease: one call per interval, whatever
//!   the number of connections. A gateway that dies stops renewing, and its slots stop counting
//!   after at most `lease_ttl`.
//! - **The heartbeat writes this gateway's counts** in the same call. So after Redis restarts
//!   empty (or a lease ran out while this gateway was stalled) the counts are right again within
//!   one interval, and so is a count an acquire changed after its caller gave up waiting (a
//!   timed-out acquire may still be applied; it is treated as refused, and the store counts one
//!   slot too many until the next heartbeat: the safe side). Until this gateway's lease is back,
//!   an acquire is refused with [`StoreError::NotRegistered`] and the caller heartbeats first.
//! - **Hash tags**: every key is `tollgate:{<namespace>}:...`, so every key a script touches is
//!   in one Redis Cluster slot and the scripts run unchanged on Redis Cluster.
//!
//! Every call is bounded by `store_timeout`: the caller decides what an unavailable store means
//! (`on_store_failure`); a handshake never waits on Redis longer than that.
//!
//! Local counts are kept on the safe side of Redis's: raised before an acquire and lowered only
//! after a refusal or a completed release, so the counts a heartbeat writes back never
//! understate what this gateway holds. A count that fell to zero is kept until a heartbeat has
//! written it, so a slot the store holds too many is given back too.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

/// Why a store call did not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("store: {0}")]
    Redis(String),
    /// This gateway's lease is missing (Redis restarted, or the lease ran out): heartbeat, then
    /// try again.
    #[error("this gateway is not registered in the store (its lease is missing)")]
    NotRegistered,
}

/// What an acquire found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// A slot is this gateway's; `held` is the fleet's count with it.
    Admitted { held: u64 },
    /// The limit is reached across the fleet.
    Full { held: u64 },
}

/// KEYS[1] slots, KEYS[2] leases; ARGV[1] gateway, ARGV[2] limit.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if mine < now then return {-1, 0} end
local total = 0
local f = redis.call('HGETALL', KEYS[1])
for i = 1, #f, 2 do
  local exp = tonumber(redis.call('HGET', KEYS[2], f[i]) or '0')
  if exp < now then
    redis.call('HDEL', KEYS[1], f[i])
  else
    total = total + tonumber(f[i + 1])
  end
end
if total >= tonumber(ARGV[2]) then return {0, total} end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return {1, total + 1}
",
    )
});

/// KEYS[1] slots; ARGV[1] gateway.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
",
    )
});

/// KEYS[1] leases, KEYS[2..] slot hashes this gateway holds or held; ARGV[1] gateway, ARGV[2]
/// lease ttl (ms), ARGV[3..] this gateway's count in each, which replaces the store's. Returns
/// 1 when the lease was missing (the counts were registered again).
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HSET', KEYS[1], ARGV[1], now + tonumber(ARGV[2]))
local l = redis.call('HGETALL', KEYS[1])
for i = 1, #l, 2 do
  if tonumber(l[i + 1]) < now then redis.call('HDEL', KEYS[1], l[i]) end
end
for i = 2, #KEYS do
  local c = tonumber(ARGV[i + 1])
  if c > 0 then redis.call('HSET', KEYS[i], ARGV[1], c) else redis.call('HDEL', KEYS[i], ARGV[1]) end
end
if mine >= now then return 0 end
return 1
",
    )
});

/// Where and how a gateway keeps its fleet-wide counts.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// This gateway's id in the fleet (unique per process).
    pub gateway_id: String,
    /// Key prefix's hash tag: gateways sharing it share limits.
    pub namespace: String,
    /// A gateway that stops renewing its lease loses its slots after this.
    pub lease_ttl: Duration,
    /// Longest any call may take.
    pub timeout: Duration,
}

/// A gateway's connection to the fleet's store.
pub struct Store {
    conn: ConnectionManager,
    config: StoreConfig,
    leases: String,
    /// This gateway's count per slot key, on the safe side (see the module docs).
    held: Mutex<HashMap<String, u64>>,
}

impl Store {
    /// Connects and registers this gateway (its first heartbeat).
    pub async fn connect(config: StoreConfig) -> Result<Store, StoreError> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| StoreError::Redis(format!("{e}")))?;
        // Reconnects back off quickly and give up soon: every call is bounded by `timeout`
        // anyway, and a reconnect that waits would hold calls beyond it.
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let conn = bounded(
            config.timeout,
            ConnectionManager::new_with_config(client, manager),
        )
        .await?;
        let store = Store {
            conn,
            leases: format!("tollgate:{{{}}}:leases", config.namespace),
            config,
            held: Mutex::new(HashMap::new()),
        };
        store.heartbeat().await?;
        Ok(store)
    }

    fn slots(&self, thing: &str) -> String {
        format!("tollgate:{{{}}}:slots:{thing}", self.config.namespace)
    }

    /// This gateway's count for `thing`, as it knows it.
    pub fn held_here(&self, thing: &str) -> u64 {
        let key = self.slots(thing);
        self.held
            .lock()
            .map(|h| h.get(&key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn adjust(&self, key: &str, up: bool) {
        if let Ok(mut h) = self.held.lock() {
            let n = h.entry(key.to_owned()).or_insert(0);
            *n = if up {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            };
        }
    }

    /// Takes a slot of `thing` if the fleet holds fewer than `limit`. One round trip (two when
    /// this gateway must register again first).
    pub async fn acquire(&self, thing: &str, limit: u64) -> Result<Acquired, StoreError> {
        let key = self.slots(thing);
        self.adjust(&key, true);
        let result = match self.acquire_once(&key, limit).await {
            // Registering again writes this gateway's counts, which hold this acquire's own
            // pending slot: left out, or the acquire would count itself.
            Err(StoreError::NotRegistered) => match self.heartbeat_without(Some(&key)).await {
                Ok(()) => self.acquire_once(&key, limit).await,
                Err(e) => Err(e),
            },
            other => other,
        };
        if !matches!(result, Ok(Acquired::Admitted { .. })) {
            self.adjust(&key, false);
        }
        result
    }

    async fn acquire_once(&self, key: &str, limit: u64) -> Result<Acquired, StoreError> {
        let mut conn = self.conn.clone();
        let mut call = ACQUIRE.key(key);
        call.key(&self.leases)
            .arg(&self.config.gateway_id)
            .arg(limit);
        let (code, held): (i64, i64) =
            bounded(self.config.timeout, call.invoke_async(&mut conn)).await?;
        let held = u64::try_from(held).unwrap_or(0);
        match code {
            1 => Ok(Acquired::Admitted { held }),
            0 => Ok(Acquired::Full { held }),
            _ => Err(StoreError::NotRegistered),
        }
    }

    /// Gives back a slot of `thing`.
    pub async fn release(&self, thing: &str) -> Result<(), StoreError> {
        let key = self.slots(thing);
        let mut conn = self.conn.clone();
        let mut call = RELEASE.key(&key);
        call.arg(&self.config.gateway_id);
        let result: Result<i64, _> =
            bounded(self.config.timeout, call.invoke_async(&mut conn)).await;
        // Lowered after the store's count, never before (see the module docs); lowered even
        // when the call failed, since the connection is gone either way: the next heartbeat
        // after a restart writes the right count.
        self.adjust(&key, false);
        result.map(|_| ())
    }

    /// Renews this gateway's lease; when it was missing, writes this gateway's counts back.
    /// One call, whatever the number of connections.
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        self.heartbeat_without(None).await
    }

    /// [`Store::heartbeat`], counting one slot less of `pending` (a slot key).
    async fn heartbeat_without(&self, pending: Option<&str>) -> Result<(), StoreError> {
        let held: Vec<(String, u64)> = self
            .held
            .lock()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        let mine = if Some(k.as_str()) == pending { 1 } else { 0 };
                        (k.clone(), v.saturating_sub(mine))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut conn = self.conn.clone();
        let mut call = HEARTBEAT.key(&self.leases);
        call.arg(&self.config.gateway_id)
            .arg(u64::try_from(self.config.lease_ttl.as_millis()).unwrap_or(u64::MAX));
        for (k, n) in &held {
            call.key(k).arg(*n);
        }
        let rewritten: i64 = bounded(self.config.timeout, call.invoke_async(&mut conn)).await?;
        // Zeros written: forgotten, unless an acquire raised them meanwhile.
        if let Ok(mut h) = self.held.lock() {
            h.retain(|_, n| *n > 0);
        }
        if rewritten == 1 && !held.is_empty() {
            tracing::info!(event = "store_registered", gateway = %self.config.gateway_id,
                keys = held.len(), "registered again in the store (its lease was missing) with its live counts");
        }
        Ok(())
    }
}

/// `f` within `timeout`, its error in our terms.
async fn bounded<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout(timeout)),
        Ok(Err(e)) => Err(StoreError::Redis(e.to_string())),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}
