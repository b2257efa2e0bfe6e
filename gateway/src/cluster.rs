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
//!   One round trip per admitted handshake; closes are given back in batches (one call per
//!   few milliseconds, whatever the number of closes in them); nothing per frame.
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

pub use tollgate_manifest::OnStoreFailure;

use crate::frame::SharedRate;
use crate::manifest::RateSpec;
use crate::metrics::{FleetMetrics, StoreCall, StoreFailure};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tollgate_edge::rate::FleetShare;

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
    /// This gateway has left the fleet (it is stopping): nothing registers it again.
    #[error("this gateway has left the fleet")]
    Left,
}

/// What an acquire found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// A slot of each thing is this gateway's; `held` is the fleet's count of the first with it.
    Admitted {
        held: u64,
    },
    /// The limit of one thing (`index` in the list asked for) is reached across the fleet;
    /// nothing was taken.
    Full {
        held: u64,
    },
    FullAt {
        index: usize,
        held: u64,
    },
}

/// KEYS[1] leases, KEYS[2..] the slot hashes of the things to take a slot of; ARGV[1] gateway,
/// ARGV[2..] their limits. All or none: {1, 0, held of the first} or {0, the full thing's
/// 1-based index, its held}; {-1, 0, 0} when this gateway's lease is missing.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if mine < now then return {-1, 0, 0} end
local first = 0
for k = 2, #KEYS do
  local total = 0
  local f = redis.call('HGETALL', KEYS[k])
  for i = 1, #f, 2 do
    local exp = tonumber(redis.call('HGET', KEYS[1], f[i]) or '0')
    if exp < now then
      redis.call('HDEL', KEYS[k], f[i])
    else
      total = total + tonumber(f[i + 1])
    end
  end
  if total >= tonumber(ARGV[k]) then return {0, k - 1, total} end
  if k == 2 then first = total end
end
for k = 2, #KEYS do redis.call('HINCRBY', KEYS[k], ARGV[1], 1) end
return {1, 0, first + 1}
",
    )
});

/// KEYS: the slot hashes to give slots back to; ARGV[1] gateway, ARGV[2..] how many of each.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for k = 1, #KEYS do
  local n = redis.call('HINCRBY', KEYS[k], ARGV[1], -tonumber(ARGV[k + 1]))
  if n <= 0 then redis.call('HDEL', KEYS[k], ARGV[1]) end
end
return #KEYS
",
    )
});

/// KEYS[1] leases, KEYS[2..] slot hashes; ARGV[1] gateway: this gateway leaves the fleet (its
/// lease and its counts go at once, not after `lease_ttl`).
static LEAVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('HDEL', KEYS[1], ARGV[1])
for k = 2, #KEYS do redis.call('HDEL', KEYS[k], ARGV[1]) end
return #KEYS - 1
",
    )
});

/// How long the releaser gathers closes before giving their slots back in one call. Late is
/// the safe side: the store counts a closed connection's slot for this long.
const RELEASE_BATCH: Duration = Duration::from_millis(5);

/// KEYS[1] leases, KEYS[2..] slot hashes this gateway holds or held; ARGV[1] gateway, ARGV[2]
/// lease ttl (ms), ARGV[3..] this gateway's count in each, which replaces the store's. Returns
/// {1 when the lease was missing (the counts were registered again), the live gateways}.
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
local live = redis.call('HLEN', KEYS[1])
if mine >= now then return {0, live} end
return {1, live}
",
    )
});

/// KEYS[1] a counter's hash (field = bucket index, value = units); ARGV limit, window (ms),
/// bucket (ms), amount. The same steps as [`crate::sliding_window::Window::apply`], on Redis's clock:
/// returns {1 allowed / 0 refused, count, reset after (ms), retry after (ms)}.
static INCREMENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local res = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local f = redis.call('HGETALL', KEYS[1])
local live = {}
local total = 0
local newest = now
for i = 1, #f, 2 do
  local exp = (tonumber(f[i]) + 1) * res + window
  if exp > now then
    local n = tonumber(f[i + 1])
    total = total + n
    live[#live + 1] = {exp, n}
    if exp > newest then newest = exp end
  else
    redis.call('HDEL', KEYS[1], f[i])
  end
end
if total + amount <= limit then
  if amount > 0 then
    local b = math.floor(now / res)
    redis.call('HINCRBY', KEYS[1], string.format('%d', b), amount)
    local exp = (b + 1) * res + window
    if exp > newest then newest = exp end
    redis.call('PEXPIRE', KEYS[1], newest - now)
  end
  return {1, total + amount, newest - now, 0}
end
table.sort(live, function(a, b) return a[1] < b[1] end)
local need = total + amount - limit
local wait = 0
for _, e in ipairs(live) do
  need = need - e[2]
  if need <= 0 then
    wait = e[1] - now
    break
  end
end
return {0, total, newest - now, wait}
",
    )
});

/// KEYS[1] leases, KEYS[2..] slot hashes: the fleet's count of each (fields of gateways whose
/// lease is alive). Reads only.
static COUNTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for k = 2, #KEYS do
  local total = 0
  local f = redis.call('HGETALL', KEYS[k])
  for i = 1, #f, 2 do
    local exp = tonumber(redis.call('HGET', KEYS[1], f[i]) or '0')
    if exp >= now then total = total + tonumber(f[i + 1]) end
  end
  out[k - 1] = total
end
return out
",
    )
});

/// KEYS: fleet buckets of subscriptions' message rates (`per = "subscription"`, see
/// [`Fleet::settle_message_rates`]); ARGV[1] this gateway, ARGV[2] for how long (ms) this
/// gateway counts as present without settling again; then per key eight numbers: message rate
/// and burst, byte rate and burst (0 and 0: not limited), the messages and bytes this gateway
/// charged since its last report, and those it was asked for (charged or refused).
///
/// Each bucket is refilled by the time passed on Redis's clock and charged (into debt, at most
/// one burst deep). The gateway is marked present until its deadline (`p:<id>`) with its demand
/// (`dm:<id>`, `db:<id>`); gateways past their deadline are forgotten. The answer per key:
/// {message tokens, byte tokens, this gateway's share of the message demand and of the byte
/// demand (1 / present gateways when nobody asked), present gateways}, numbers as strings
/// (Lua numbers in a reply are truncated to integers). A bucket lives until it would have
/// paid back a full debt and refilled (at most a day); then a fresh one is the same thing.
static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local fresh = tonumber(ARGV[2])
local out = {}
for k = 1, #KEYS do
  local a = 2 + (k - 1) * 8
  local mr, mb = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local br, bb = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local mu, bu = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  local md, bd = tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  local h = redis.call('HMGET', KEYS[k], 'm', 'b', 't')
  local dt = 0
  if h[3] then dt = math.max(0, now - tonumber(h[3])) / 1000 end
  local m = math.max(-mb, math.min(mb, (tonumber(h[1]) or mb) + dt * mr) - mu)
  local b = math.max(-bb, math.min(bb, (tonumber(h[2]) or bb) + dt * br) - bu)
  redis.call('HSET', KEYS[k], 'p:' .. me, now + fresh, 'dm:' .. me, md, 'db:' .. me, bd)
  local f = redis.call('HGETALL', KEYS[k])
  local v = {}
  for i = 1, #f, 2 do v[f[i]] = f[i + 1] end
  local n, sm, sb = 0, 0, 0
  for name, until_ms in pairs(v) do
    if string.sub(name, 1, 2) == 'p:' then
      local id = string.sub(name, 3)
      if tonumber(until_ms) < now then
        redis.call('HDEL', KEYS[k], name, 'dm:' .. id, 'db:' .. id)
      else
        n = n + 1
        sm = sm + (tonumber(v['dm:' .. id]) or 0)
        sb = sb + (tonumber(v['db:' .. id]) or 0)
      end
    end
  end
  local wm, wb = 1 / n, 1 / n
  if sm > 0 then wm = md / sm end
  if sb > 0 then wb = bd / sb end
  redis.call('HSET', KEYS[k], 'm', tostring(m), 'b', tostring(b), 't', now)
  local full = 0
  if mr > 0 then full = math.max(full, 2 * mb / mr) end
  if br > 0 then full = math.max(full, 2 * bb / br) end
  redis.call('PEXPIRE', KEYS[k], string.format('%d', math.min(math.ceil(full * 1000) + fresh, 86400000)))
  out[k] = {tostring(m), tostring(b), tostring(wm), tostring(wb), n}
end
return out
",
    )
});

/// The store's name of a subscription's connection slots. The product's length first: names
/// may hold `/`, and `a/b` + `c` must not be the same thing as `a` + `b/c`.
pub fn subscription_thing(product: &str, name: &str) -> String {
    format!("sub:{}:{product}/{name}", product.len())
}

/// The store's name of an API's connection slots.
pub fn api_thing(name: &str) -> String {
    format!("api:{name}")
}

/// Things counted per `counts` call at most (a script's keys).
const COUNTS_PER_CALL: usize = 256;
/// Buckets settled per call at most (six arguments each).
const SETTLES_PER_CALL: usize = 128;

/// What this gateway tells the store about one fleet bucket of message rates.
pub struct RateReport<'a> {
    /// The bucket's name in the store ([`message_rate_thing`]).
    pub thing: &'a str,
    pub spec: &'a RateSpec,
    pub report: tollgate_edge::rate::Report,
}

/// The store's name of a subscription's message bucket: whose (the subscription's thing),
/// which limit (an API's or a product's, by name), which direction, and the limit itself, so a
/// reload that changes a rate starts a fresh bucket, as it does in process.
pub fn message_rate_thing(
    subscription: &str,
    scope: &str,
    name: &str,
    direction: &str,
    spec: &RateSpec,
) -> String {
    let rate = |r: Option<tollgate_edge::rate::Rate>| {
        r.map_or(String::from("-"), |r| {
            format!("{}/{}", r.per_second, r.burst)
        })
    };
    format!(
        "msg:{subscription}:{scope}:{}:{name}:{direction}:{}:{}:{}",
        name.len(),
        rate(spec.messages),
        rate(spec.bytes),
        spec.action.as_str()
    )
}

/// Where and how a gateway keeps its fleet-wide counts.
#[derive(Clone)]
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
impl std::fmt::Debug for StoreConfig {
    /// The URL may hold a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &"(redacted)")
            .field("gateway_id", &self.gateway_id)
            .field("namespace", &self.namespace)
            .field("lease_ttl", &self.lease_ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

pub struct Store {
    conn: ConnectionManager,
    config: StoreConfig,
    leases: String,
    /// This gateway's count per slot key, on the safe side (see the module docs).
    held: Mutex<HashMap<String, u64>>,
    /// Acquires hold it shared from raising their local count to their script's answer; a
    /// heartbeat holds it alone from reading the counts to writing them. Otherwise an acquire
    /// could raise its count after the heartbeat read it and reach Redis before the heartbeat,
    /// which would then write one slot too few (the unsafe side).
    counting: tokio::sync::RwLock<()>,
    /// The lease was missing at the last registration: the store's script cache is likely
    /// empty too (loaded by the next heartbeat, off the handshake path).
    scripts_missing: AtomicBool,
    /// Set by [`Store::leave`]: no later heartbeat or acquire registers this gateway again
    /// (its slots would then count for `lease_ttl` after it exited).
    left: AtomicBool,
    metrics: FleetMetrics,
}

/// Lowers the local counts an acquire raised unless it was admitted, however it ends (a
/// refusal, an error, or its future dropped: the client went away mid-handshake).
struct Pending<'a> {
    store: &'a Store,
    keys: &'a [String],
    admitted: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.admitted {
            for k in self.keys {
                self.store.adjust(k, false);
            }
        }
    }
}

impl Store {
    /// Connects and registers this gateway (its first heartbeat).
    pub async fn connect(config: StoreConfig) -> Result<Store, StoreError> {
        let store = Store::new(config)?;
        store.heartbeat().await?;
        Ok(store)
    }

    /// A store that connects on first use (and reconnects after); inside a tokio runtime.
    /// The gateway id gets a random suffix for this process: a restarted gateway with the
    /// same id (a pod name, or `host:1` in a container) must not count the slots its previous
    /// life left behind as its own; those stop counting when the old lease runs out.
    pub fn new(mut config: StoreConfig) -> Result<Store, StoreError> {
        config.gateway_id = format!("{}~{:08x}", config.gateway_id, rand::random::<u32>());
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
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| StoreError::Redis(e.to_string()))?;
        Ok(Store {
            conn,
            leases: format!("tollgate:{{{}}}:leases", config.namespace),
            config,
            held: Mutex::new(HashMap::new()),
            counting: tokio::sync::RwLock::new(()),
            scripts_missing: AtomicBool::new(false),
            left: AtomicBool::new(false),
            metrics: FleetMetrics::default(),
        })
    }

    /// Counts this store's calls in `metrics` (`tollgate_store_*`).
    pub fn set_metrics(&mut self, metrics: FleetMetrics) {
        self.metrics = metrics;
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn slots(&self, thing: &str) -> String {
        format!("tollgate:{{{}}}:slots:{thing}", self.config.namespace)
    }

    /// Counts one more of each thing as this gateway's, without asking the store (it does not
    /// answer): the next heartbeat writes the counts, this one included.
    pub fn hold_locally(&self, things: &[String]) {
        for t in things {
            self.adjust(&self.slots(t), true);
        }
    }

    /// This gateway's count for `thing`, as it knows it.
    pub fn held_here(&self, thing: &str) -> u64 {
        let key = self.slots(thing);
        self.held
            .lock()
            .map(|h| h.get(&key).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Raises this gateway's count of `key` by one (`up`), or lowers it by one (never below
    /// zero).
    fn adjust(&self, key: &str, up: bool) {
        self.adjust_by(key, if up { 1 } else { -1 });
    }

    fn adjust_by(&self, key: &str, by: i64) {
        let Ok(mut h) = self.held.lock() else { return };
        // Looked up before a key is allocated: the key is there on every handshake but a
        // thing's first.
        let n = match h.get_mut(key) {
            Some(n) => n,
            None if by > 0 => h.entry(key.to_owned()).or_insert(0),
            None => return,
        };
        let before = *n;
        *n = if by > 0 {
            n.saturating_add(by.unsigned_abs())
        } else {
            n.saturating_sub(by.unsigned_abs())
        };
        if *n > before {
            self.metrics.slots_by(true, *n - before);
        } else if *n < before {
            self.metrics.slots_by(false, before - *n);
        }
    }

    /// Takes a slot of `thing` if the fleet holds fewer than `limit`. One round trip (two when
    /// this gateway must register again first).
    pub async fn acquire(&self, thing: &str, limit: u64) -> Result<Acquired, StoreError> {
        self.acquire_all(&[(thing, limit)]).await.map(|a| match a {
            Acquired::FullAt { held, .. } => Acquired::Full { held },
            other => other,
        })
    }

    /// Takes a slot of every thing, each under its limit, or of none (one round trip), within
    /// `store_timeout` in all: registering again first (after a Redis restart) takes two round
    /// trips, and both fit in the one bound.
    pub async fn acquire_all(&self, things: &[(&str, u64)]) -> Result<Acquired, StoreError> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let keys: Vec<String> = things.iter().map(|(t, _)| self.slots(t)).collect();
        let limits: Vec<u64> = things.iter().map(|(_, l)| *l).collect();
        // The wait for a heartbeat in progress counts against the same bound.
        let Ok(_counting) = tokio::time::timeout_at(deadline, self.counting.read()).await else {
            self.metrics.call(StoreCall::Acquire, self.config.timeout);
            self.metrics
                .failed(StoreCall::Acquire, StoreFailure::Timeout);
            return Err(StoreError::Timeout(self.config.timeout));
        };
        if self.left.load(Ordering::Acquire) {
            return Err(StoreError::Left);
        }
        for k in &keys {
            self.adjust(k, true);
        }
        let mut pending = Pending {
            store: self,
            keys: &keys,
            admitted: false,
        };
        let result = match self.acquire_once(&keys, &limits, deadline).await {
            // Registering again writes this gateway's counts, which hold this acquire's own
            // pending slots: left out, or the acquire would count itself.
            Err(StoreError::NotRegistered) => match self.heartbeat_without(&keys, deadline).await {
                Ok(_) => self.acquire_once(&keys, &limits, deadline).await,
                Err(e) => Err(e),
            },
            other => other,
        };
        pending.admitted = matches!(result, Ok(Acquired::Admitted { .. }));
        result
    }

    async fn acquire_once(
        &self,
        keys: &[String],
        limits: &[u64],
        deadline: tokio::time::Instant,
    ) -> Result<Acquired, StoreError> {
        let mut conn = self.conn.clone();
        let mut call = ACQUIRE.key(&self.leases);
        call.arg(&self.config.gateway_id);
        for (k, l) in keys.iter().zip(limits) {
            call.key(k).arg(*l);
        }
        let (code, index, held): (i64, i64, i64) = self
            .bounded_until(StoreCall::Acquire, deadline, call.invoke_async(&mut conn))
            .await?;
        let held = u64::try_from(held).unwrap_or(0);
        match code {
            1 => Ok(Acquired::Admitted { held }),
            0 => Ok(Acquired::FullAt {
                index: usize::try_from(index - 1).unwrap_or(0),
                held,
            }),
            _ => {
                self.metrics
                    .failed(StoreCall::Acquire, StoreFailure::NotRegistered);
                Err(StoreError::NotRegistered)
            }
        }
    }

    /// Gives back a slot of `thing`.
    pub async fn release(&self, thing: &str) -> Result<(), StoreError> {
        self.release_all(&[thing]).await
    }

    /// Gives back a slot of each thing (one round trip).
    pub async fn release_all(&self, things: &[&str]) -> Result<(), StoreError> {
        let counts: Vec<(&str, u64)> = things.iter().map(|t| (*t, 1)).collect();
        self.release_counts(&counts).await
    }

    /// Gives back `n` slots of each `(thing, n)` (one round trip, whatever the counts).
    pub async fn release_counts(&self, counts: &[(&str, u64)]) -> Result<(), StoreError> {
        let keys: Vec<String> = counts.iter().map(|(t, _)| self.slots(t)).collect();
        let mut conn = self.conn.clone();
        let mut call = RELEASE.prepare_invoke();
        for k in &keys {
            call.key(k);
        }
        call.arg(&self.config.gateway_id);
        for (_, n) in counts {
            call.arg(*n);
        }
        let result: Result<i64, _> = self
            .bounded(StoreCall::Release, call.invoke_async(&mut conn))
            .await;
        // Lowered after the store's count, never before (see the module docs); lowered even
        // when the call failed, since the connections are gone either way: the next heartbeat
        // writes the right count.
        for (k, (_, n)) in keys.iter().zip(counts) {
            self.adjust_by(k, -i64::try_from(*n).unwrap_or(i64::MAX));
        }
        result.map(|_| ())
    }

    /// Leaves the fleet: this gateway's lease and every count of its go now (one round trip),
    /// so a gateway that stops gives its slots back at once instead of after `lease_ttl`.
    pub async fn leave(&self) -> Result<(), StoreError> {
        let _alone = self.counting.write().await;
        self.left.store(true, Ordering::Release);
        let keys: Vec<String> = self
            .held
            .lock()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default();
        let mut conn = self.conn.clone();
        let mut call = LEAVE.key(&self.leases);
        call.arg(&self.config.gateway_id);
        for k in &keys {
            call.key(k);
        }
        let _: i64 = self
            .bounded(StoreCall::Leave, call.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    /// Counts `amount` under the counter `key` if it fits under `rate`, across the fleet (one
    /// round trip; see [`crate::counters`] for the algorithm). In Redis the key is a SHA-256 of
    /// `key`: a fixed size whatever clients send, and no `{`/`}` of theirs can move it out of
    /// the namespace's hash tag (the client is a single-node one: every key on one shard).
    pub async fn increment(
        &self,
        key: &str,
        rate: &crate::sliding_window::Rate,
        amount: u64,
    ) -> Result<crate::sliding_window::Counted, StoreError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("tollgate:{{{}}}:rate:{hex}", self.config.namespace);
        let mut conn = self.conn.clone();
        let mut call = INCREMENT.key(key);
        call.arg(rate.limit())
            .arg(rate.window_ms())
            .arg(rate.bucket_ms())
            .arg(amount);
        let (allowed, count, reset, retry): (i64, i64, i64, i64) = self
            .bounded(StoreCall::Increment, call.invoke_async(&mut conn))
            .await?;
        let ms = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(crate::sliding_window::Counted {
            allowed: allowed == 1,
            count: ms(count),
            retry_after_ms: ms(retry),
            reset_after_ms: ms(reset),
        })
    }

    /// Reports what this gateway charged to fleet buckets of message rates, and was asked
    /// for, and reads its share of them: one call for at most [`SETTLES_PER_CALL`] buckets,
    /// bounded by `deadline`. `present`: how long this gateway counts as present without
    /// settling again.
    pub async fn settle_rates(
        &self,
        reports: &[RateReport<'_>],
        present: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<FleetShare>, StoreError> {
        if self.left.load(Ordering::Acquire) {
            return Err(StoreError::Left);
        }
        let rate =
            |r: Option<tollgate_edge::rate::Rate>| r.map_or((0, 0), |r| (r.per_second, r.burst));
        let mut conn = self.conn.clone();
        let mut call = SETTLE.prepare_invoke();
        call.arg(&self.config.gateway_id)
            .arg(u64::try_from(present.as_millis()).unwrap_or(u64::MAX));
        for r in reports.iter().take(SETTLES_PER_CALL) {
            let (mr, mb) = rate(r.spec.messages);
            let (br, bb) = rate(r.spec.bytes);
            call.key(format!(
                "tollgate:{{{}}}:{}",
                self.config.namespace, r.thing
            ))
            .arg(mr)
            .arg(mb)
            .arg(br)
            .arg(bb)
            .arg(r.report.charged.0)
            .arg(r.report.charged.1)
            .arg(r.report.demanded.0)
            .arg(r.report.demanded.1);
        }
        let settled: Vec<(String, String, String, String, i64)> = self
            .bounded_until(StoreCall::Settle, deadline, call.invoke_async(&mut conn))
            .await?;
        let asked = reports.len().min(SETTLES_PER_CALL);
        if settled.len() != asked {
            return Err(StoreError::Redis(format!(
                "settle answered {} buckets of {asked}",
                settled.len()
            )));
        }
        let number = |s: &str| {
            s.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .unwrap_or(0.0)
        };
        Ok(settled
            .into_iter()
            .map(|(m, b, wm, wb, n)| FleetShare {
                tokens: (number(&m), number(&b)),
                weights: (number(&wm), number(&wb)),
                gateways: u64::try_from(n).unwrap_or(1).max(1),
            })
            .collect())
    }

    /// The fleet's count of each thing (one call per 256 things; reads only).
    pub async fn counts(&self, things: &[String]) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::with_capacity(things.len());
        for chunk in things.chunks(COUNTS_PER_CALL) {
            let mut conn = self.conn.clone();
            let mut call = COUNTS.key(&self.leases);
            for t in chunk {
                call.key(self.slots(t));
            }
            let counts: Vec<i64> = self
                .bounded(StoreCall::Counts, call.invoke_async(&mut conn))
                .await?;
            out.extend(counts.into_iter().map(|c| u64::try_from(c).unwrap_or(0)));
        }
        Ok(out)
    }

    /// Renews this gateway's lease and writes its counts (one call, whatever the number of
    /// connections); returns how many gateways hold a live lease.
    pub async fn heartbeat(&self) -> Result<u64, StoreError> {
        let live = {
            let _alone = self.counting.write().await;
            let deadline = tokio::time::Instant::now() + self.config.timeout;
            self.heartbeat_without(&[], deadline).await?
        };
        // Outside the lock, which acquires wait on: a first start or a store that restarted
        // empty has an empty script cache too. Loaded now, so the next handshakes do not each
        // pay NOSCRIPT and a reload.
        if self.scripts_missing.swap(false, Ordering::AcqRel) {
            self.load_scripts().await;
        }
        Ok(live)
    }

    /// [`Store::heartbeat`], counting one slot less of each of `pending` (slot keys).
    async fn heartbeat_without(
        &self,
        pending: &[String],
        deadline: tokio::time::Instant,
    ) -> Result<u64, StoreError> {
        if self.left.load(Ordering::Acquire) {
            return Err(StoreError::Left);
        }
        let held: Vec<(String, u64)> = self
            .held
            .lock()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        let mine = u64::from(pending.contains(k));
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
        let (rewritten, live): (i64, i64) = self
            .bounded_until(StoreCall::Heartbeat, deadline, call.invoke_async(&mut conn))
            .await?;
        // A count is forgotten only once a heartbeat has written it as zero and it is still
        // zero: a key whose release raced this heartbeat (which then wrote the old count) is
        // kept until a heartbeat writes its zero.
        if let Ok(mut h) = self.held.lock() {
            h.retain(|k, n| *n > 0 || !held.iter().any(|(w, c)| w == k && *c == 0));
        }
        if rewritten == 1 && held.iter().any(|(_, n)| *n > 0) {
            tracing::info!(event = "store_registered", gateway = %self.config.gateway_id,
                keys = held.len(), "registered again in the store (its lease was missing) with its live counts");
        }
        if rewritten == 1 {
            self.scripts_missing.store(true, Ordering::Release);
        }
        Ok(u64::try_from(live).unwrap_or(0))
    }
}

impl Store {
    /// Loads every script into the store's cache (`SCRIPT LOAD`), best effort: a script that
    /// is not there is loaded by the call that needs it anyway.
    async fn load_scripts(&self) {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        for script in [
            &ACQUIRE, &RELEASE, &HEARTBEAT, &INCREMENT, &COUNTS, &LEAVE, &SETTLE,
        ] {
            let mut conn = self.conn.clone();
            let invocation = script.prepare_invoke();
            let load = invocation.load_async(&mut conn);
            if tokio::time::timeout_at(deadline, load).await.is_err() {
                return;
            }
        }
    }

    /// `f` within `timeout`, its error in our terms, timed and counted as `call`.
    async fn bounded<T>(
        &self,
        call: StoreCall,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        self.bounded_until(call, deadline, f).await
    }

    /// [`Store::bounded`] with a deadline that several calls share: one timer per call.
    async fn bounded_until<T>(
        &self,
        call: StoreCall,
        deadline: tokio::time::Instant,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let timeout = self.config.timeout;
        let started = std::time::Instant::now();
        // A deadline already past: the call is not sent at all (a timeout polls its future once
        // first, which would send it, and the store would count what the caller gave up on).
        let result = if tokio::time::Instant::now() >= deadline {
            Err(StoreError::Timeout(timeout))
        } else {
            match tokio::time::timeout_at(deadline, f).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout(timeout)),
                Ok(Err(e)) => Err(StoreError::Redis(e.to_string())),
                Err(_) => Err(StoreError::Timeout(timeout)),
            }
        };
        self.metrics.call(call, started.elapsed());
        match &result {
            Err(StoreError::Timeout(_)) => self.metrics.failed(call, StoreFailure::Timeout),
            Err(_) => self.metrics.failed(call, StoreFailure::Error),
            Ok(_) => {}
        }
        result
    }
}

/// The gateway's side of the fleet: its store, what a store failure means, and how many
/// gateways were alive at the last heartbeat (for `on_store_failure = "local"`).
pub struct Fleet {
    store: Store,
    on_failure: OnStoreFailure,
    live: AtomicU64,
    /// The store did not answer the last call: logged once per episode.
    failing: AtomicBool,
    /// The fleet's counts of the limited things, as last read (for `/apis`), and when.
    counts: Mutex<(HashMap<String, u64>, Option<std::time::SystemTime>)>,
    /// Closed connections' slots, for the releaser task ([`Fleet::releaser`]).
    releases: tokio::sync::mpsc::UnboundedSender<Vec<String>>,
    /// Subscriptions' message buckets shared with the fleet, while connections hold them.
    rates: Mutex<Vec<TrackedRate>>,
    /// `cluster.message_sync_interval`.
    sync_interval: Duration,
}

/// A subscription's message buckets that this gateway settles with the fleet's store.
struct TrackedRate {
    thing: String,
    spec: RateSpec,
    /// Held by the subscription (until a reload changes the rate) and by its connections.
    rate: std::sync::Weak<std::sync::Mutex<tollgate_edge::rate::MessageRate>>,
}

/// A poisoned lock only means a connection's task panicked mid-check: the numbers are still
/// numbers.
fn rate_lock(
    rate: &std::sync::Mutex<tollgate_edge::rate::MessageRate>,
) -> std::sync::MutexGuard<'_, tollgate_edge::rate::MessageRate> {
    rate.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection's slots in the fleet's store; given back (by the fleet's releaser task, in a
/// batch) when dropped, so every way a connection ends frees them.
pub struct FleetSlot {
    fleet: Arc<Fleet>,
    things: Vec<String>,
}

impl FleetSlot {
    /// The things it holds a slot of (a binary upgrade hands them over with the connection).
    pub fn things(&self) -> &[String] {
        &self.things
    }
}

impl Drop for FleetSlot {
    fn drop(&mut self) {
        // Fails only once the releaser is gone (the runtime is stopping): the lease then runs
        // out, or the gateway has left the fleet already.
        let _ = self.fleet.releases.send(std::mem::take(&mut self.things));
    }
}

/// A limited thing a handshake needs a slot of.
pub struct Want<'a> {
    /// `sub:<product>/<name>` or `api:<name>`.
    pub thing: String,
    pub limit: u64,
    /// This gateway's own count of it, this handshake included (for the local fallback).
    pub here: &'a std::sync::atomic::AtomicUsize,
}

/// Why the fleet refused a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The limit of `wants[index]` is reached across the fleet (or, in the local fallback,
    /// this gateway's share of it).
    Full { index: usize },
    /// The store did not answer and `on_store_failure = "closed"`.
    StoreUnavailable,
}

/// What an operation the store could not answer falls back to (`on_store_failure`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// No limit applies.
    Open,
    /// Refuse.
    Closed,
    /// This gateway's share of the limit: the limit over the `live` gateways of the last
    /// heartbeat, rounded up.
    Local { live: u64 },
}

impl Fleet {
    /// Inside a tokio runtime.
    pub fn new(
        config: StoreConfig,
        on_failure: OnStoreFailure,
        sync_interval: Duration,
        metrics: FleetMetrics,
    ) -> Result<Arc<Fleet>, StoreError> {
        let mut store = Store::new(config)?;
        store.set_metrics(metrics);
        let (releases, closed) = tokio::sync::mpsc::unbounded_channel();
        let fleet = Arc::new(Fleet {
            store,
            on_failure,
            live: AtomicU64::new(1),
            failing: AtomicBool::new(false),
            counts: Mutex::default(),
            releases,
            rates: Mutex::default(),
            sync_interval,
        });
        tokio::spawn(Fleet::releaser(Arc::downgrade(&fleet), closed));
        Ok(fleet)
    }

    /// Gives closed connections' slots back: gathers them for [`RELEASE_BATCH`], then one call
    /// for the lot (a count per thing), so a close costs no round trip, task or timer of its
    /// own. Ends when the fleet is dropped.
    async fn releaser(
        fleet: std::sync::Weak<Fleet>,
        mut closed: tokio::sync::mpsc::UnboundedReceiver<Vec<String>>,
    ) {
        let mut batch: HashMap<String, u64> = HashMap::new();
        let mut buf = Vec::new();
        while let Some(first) = closed.recv().await {
            tokio::time::sleep(RELEASE_BATCH).await;
            buf.push(first);
            while let Ok(more) = closed.try_recv() {
                buf.push(more);
            }
            for thing in buf.drain(..).flatten() {
                *batch.entry(thing).or_insert(0) += 1;
            }
            let Some(fleet) = fleet.upgrade() else { return };
            let counts: Vec<(&str, u64)> = batch.iter().map(|(t, n)| (t.as_str(), *n)).collect();
            if let Err(e) = fleet.store.release_counts(&counts).await {
                // The heartbeat writes this gateway's counts again.
                fleet.note_failure(&e);
            }
            batch.clear();
        }
    }

    /// Leaves the fleet as the gateway stops (see [`Store::leave`]); a store that does not
    /// answer is left to the lease's expiry.
    pub async fn leave(&self) {
        match self.store.leave().await {
            Ok(()) => tracing::info!(event = "store_left", gateway = %self.store.config.gateway_id,
                "left the fleet: this gateway's lease and slots are given back"),
            Err(e) => tracing::warn!(event = "store_leave_failed", error = %e,
                "could not leave the fleet; this gateway's slots stop counting when its lease runs out"),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn note_failure(&self, e: &StoreError) {
        if !self.failing.swap(true, Ordering::AcqRel) {
            self.store.metrics.fallback(true);
            tracing::warn!(event = "store_unavailable", error = %e, on_store_failure = self.on_failure.as_str(),
                "the fleet's store does not answer; limits follow on_store_failure until it does");
        }
    }

    fn note_success(&self) {
        if self.failing.swap(false, Ordering::AcqRel) {
            self.store.metrics.fallback(false);
            tracing::info!(event = "store_available", "the fleet's store answers again");
        }
    }

    /// The slots of a connection a binary upgrade handed over (the previous process held them
    /// under its own gateway id and gives them back as it hands over): taken whatever the
    /// limits, since the connection was admitted already, in the background (a store round
    /// trip must not lengthen the connection's pause). If the store does not answer, they are
    /// counted here all the same, and the next heartbeat writes them. Inside a tokio runtime.
    pub fn adopt(self: &Arc<Self>, things: Vec<String>) -> FleetSlot {
        let fleet = self.clone();
        let taking = things.clone();
        tokio::spawn(async move {
            let unlimited: Vec<(&str, u64)> =
                taking.iter().map(|t| (t.as_str(), u64::MAX)).collect();
            match fleet.store.acquire_all(&unlimited).await {
                Ok(_) => fleet.note_success(),
                Err(StoreError::Left) => {}
                Err(e) => {
                    fleet.note_failure(&e);
                    fleet.store.hold_locally(&taking);
                }
            }
        });
        FleetSlot {
            fleet: self.clone(),
            things,
        }
    }

    /// A slot of every wanted thing across the fleet (one round trip, bounded by
    /// `store_timeout`), or why not. No wants: nothing to ask.
    pub async fn admit(self: &Arc<Self>, wants: &[Want<'_>]) -> Result<Option<FleetSlot>, Refusal> {
        if wants.is_empty() {
            return Ok(None);
        }
        let things: Vec<(&str, u64)> = wants.iter().map(|w| (w.thing.as_str(), w.limit)).collect();
        // Bounded by `store_timeout` in all, registering again included.
        match self.store.acquire_all(&things).await {
            // Stopping: a handshake still in admission is not admitted.
            Err(StoreError::Left) => Err(Refusal::StoreUnavailable),
            Ok(Acquired::Admitted { .. }) => {
                self.note_success();
                Ok(Some(FleetSlot {
                    fleet: self.clone(),
                    things: wants.iter().map(|w| w.thing.clone()).collect(),
                }))
            }
            Ok(Acquired::FullAt { index, .. }) => {
                self.note_success();
                Err(Refusal::Full { index })
            }
            Ok(Acquired::Full { .. }) => {
                self.note_success();
                Err(Refusal::Full { index: 0 })
            }
            Err(e) => match self.fallback(&e) {
                Fallback::Open => Ok(None),
                Fallback::Closed => Err(Refusal::StoreUnavailable),
                // This gateway's share: the limit over the gateways alive at the last
                // heartbeat, rounded up.
                Fallback::Local { live } => match wants.iter().position(|w| {
                    let share = w.limit.div_ceil(live);
                    u64::try_from(w.here.load(Ordering::Acquire)).unwrap_or(u64::MAX) > share
                }) {
                    Some(index) => Err(Refusal::Full { index }),
                    None => Ok(None),
                },
            },
        }
    }

    /// What a failed store call falls back to, logged once per episode.
    fn fallback(&self, e: &StoreError) -> Fallback {
        self.note_failure(e);
        match self.on_failure {
            OnStoreFailure::Open => Fallback::Open,
            OnStoreFailure::Closed => Fallback::Closed,
            OnStoreFailure::Local => Fallback::Local {
                live: self.live.load(Ordering::Acquire).max(1),
            },
        }
    }

    /// A counter's increment across the fleet (bounded by `store_timeout`), or what to do
    /// instead when the store does not answer.
    pub async fn increment(
        &self,
        key: &str,
        rate: &crate::sliding_window::Rate,
        amount: u64,
    ) -> Result<crate::sliding_window::Counted, Fallback> {
        match self.store.increment(key, rate, amount).await {
            Ok(c) => {
                self.note_success();
                Ok(c)
            }
            Err(e) => Err(self.fallback(&e)),
        }
    }

    /// Reads the fleet's counts of `things` (for `/apis`: an admin request never waits on, nor
    /// costs, a store call). After a failed read the counts are unknown (`/apis` shows null)
    /// rather than stale; the time of the last good read stays.
    pub async fn refresh_counts(&self, things: Vec<String>) {
        let read = self.store.counts(&things).await;
        if let Ok(mut c) = self.counts.lock() {
            match read {
                Ok(counts) => {
                    *c = (
                        things.into_iter().zip(counts).collect(),
                        Some(std::time::SystemTime::now()),
                    )
                }
                Err(_) => c.0.clear(),
            }
        }
    }

    /// The fleet's count of `thing` at the last read, if it was read.
    pub fn fleet_count(&self, thing: &str) -> Option<u64> {
        self.counts.lock().ok()?.0.get(thing).copied()
    }

    /// The buckets of the fleet bucket `thing` on this gateway: the ones already tracked, if
    /// connections still hold them (a reload that went from a rate to another and back must
    /// not give this gateway two shares), else new ones under `spec`. New ones start as this
    /// gateway's share of the limit (the limit over the gateways alive at the last heartbeat)
    /// and are settled with the store every `message_sync_interval` from then on.
    pub fn shared_rate(&self, thing: String, spec: RateSpec) -> SharedRate {
        let Ok(mut rates) = self.rates.lock() else {
            return Arc::new(std::sync::Mutex::new(
                tollgate_edge::rate::MessageRate::new(&spec, std::time::Instant::now()),
            ));
        };
        rates.retain(|r| r.rate.strong_count() > 0);
        if let Some(held) = rates
            .iter()
            .find(|r| r.thing == thing)
            .and_then(|r| r.rate.upgrade())
        {
            return held;
        }
        let now = std::time::Instant::now();
        let mut bucket = tollgate_edge::rate::MessageRate::new(&spec, now);
        bucket.share(&spec, self.live.load(Ordering::Acquire).max(1), now);
        let rate: SharedRate = Arc::new(std::sync::Mutex::new(bucket));
        rates.push(TrackedRate {
            thing,
            spec,
            rate: Arc::downgrade(&rate),
        });
        rate
    }

    /// Settles the subscriptions' message buckets with the store, every
    /// `message_sync_interval`, until the gateway leaves the fleet (docs/fleet.md, "Message
    /// rates").
    ///
    /// Each gateway judges every message on its own buckets (no message waits on the store)
    /// and, once per interval, reports for each bucket its connections draw from what it
    /// charged and what it was asked for, and takes its share of the fleet bucket
    /// ([`tollgate_edge::rate::MessageRate::settle`]): the rate by demand, so the fleet admits
    /// the rate on average; the tokens at least equally, so a quiet connection can still send
    /// while the subscription is under its limit. One call per 128 such buckets per interval,
    /// each answer applied as it comes. When the store does not answer, each bucket is this
    /// gateway's share of the limit over the gateways alive at the last heartbeat
    /// (`on_store_failure` `local` and `closed`: a message is never refused for the store's
    /// sake), or the whole limit (`open`).
    pub async fn settle_message_rates(self: Arc<Self>) {
        let every = self.sync_interval;
        // Present until it has missed two settles.
        let present = every * 3;
        loop {
            tokio::time::sleep(every).await;
            // The buckets connections draw from (the subscription holds one reference), and
            // any with charges still to report.
            let held: Vec<(String, RateSpec, SharedRate)> = match self.rates.lock() {
                Ok(mut rates) => {
                    rates.retain(|r| r.rate.strong_count() > 0);
                    rates
                        .iter()
                        .filter_map(|r| {
                            r.rate.upgrade().map(|rate| (r.thing.clone(), r.spec, rate))
                        })
                        .collect()
                }
                Err(_) => return,
            };
            let mut held: Vec<(String, RateSpec, SharedRate, tollgate_edge::rate::Report)> = held
                .into_iter()
                .filter_map(|(thing, spec, rate)| {
                    let connections = Arc::strong_count(&rate) > 2;
                    let report = rate_lock(&rate).report();
                    (connections || report != Default::default())
                        .then_some((thing, spec, rate, report))
                })
                .collect();
            // Settling takes at most the interval (or store_timeout, when longer).
            let deadline = tokio::time::Instant::now() + every.max(self.store.config.timeout);
            while !held.is_empty() {
                let rest = held.split_off(held.len().min(SETTLES_PER_CALL));
                let chunk = std::mem::replace(&mut held, rest);
                let reports: Vec<RateReport<'_>> = chunk
                    .iter()
                    .map(|(thing, spec, _, report)| RateReport {
                        thing,
                        spec,
                        report: *report,
                    })
                    .collect();
                let answer = self.store.settle_rates(&reports, present, deadline).await;
                let now = std::time::Instant::now();
                match answer {
                    Ok(shares) => {
                        self.note_success();
                        for ((_, spec, rate, _), share) in chunk.iter().zip(shares) {
                            rate_lock(rate).settle(spec, &share, now, rand::random::<f64>());
                        }
                    }
                    Err(StoreError::Left) => return,
                    Err(e) => {
                        let gateways = match self.fallback(&e) {
                            Fallback::Open => 1,
                            Fallback::Local { live } => live,
                            Fallback::Closed => self.live.load(Ordering::Acquire).max(1),
                        };
                        for (_, spec, rate, _) in &chunk {
                            rate_lock(rate).share(spec, gateways, now);
                        }
                    }
                }
            }
        }
    }

    /// How often heartbeats (and the reads for `/apis`) run.
    pub fn interval(&self) -> Duration {
        self.store.config.lease_ttl / 3
    }

    /// What `/apis` says about the fleet: never the store's URL.
    pub fn status(&self) -> serde_json::Value {
        let read_at = self.counts.lock().ok().and_then(|c| c.1).and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        });
        serde_json::json!({
            "gateway_id": self.store.config.gateway_id,
            "namespace": self.store.config.namespace,
            "live_gateways": self.live.load(Ordering::Acquire),
            "store_available": !self.failing.load(Ordering::Acquire),
            "on_store_failure": self.on_failure.as_str(),
            "counts_read_at": read_at,
        })
    }

    /// Renews this gateway's lease every third of `lease_ttl`.
    ///
    /// They go on through the drain (a lease that ran out while connections drain would let
    /// other gateways admit past the limit) and end when the gateway leaves the fleet.
    pub async fn heartbeats(self: Arc<Self>) {
        let every = self.store.config.lease_ttl / 3;
        loop {
            match self.store.heartbeat().await {
                Ok(live) => {
                    self.live.store(live.max(1), Ordering::Release);
                    self.store.metrics.live_gateways(live);
                    self.note_success();
                }
                Err(StoreError::Left) => return,
                Err(e) => self.note_failure(&e),
            }
            tokio::time::sleep(every).await;
        }
    }
}
