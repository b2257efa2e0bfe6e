//! Products' subscriptions as served: finding the subscription a presented key belongs to, and
//! counting each subscription's live connections against its `max_connections`.
//!
//! Keys are never held in plain text: the manifest stage hashes every key it reads (SHA-256),
//! and a presented key is hashed before it is looked up. The lookup index uses the first 8 bytes
//! of the digest only to find candidates; the full 32 bytes are then compared in constant time
//! (`subtle`), against every candidate, without stopping early. Response timing can therefore
//! depend only on the digest of what the client sent, never on how much of a real key it
//! guessed right.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::gauge::Gauge;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::frame::{Direction, SharedRate};
use crate::manifest::{key_digest, Config, KeyDigest, RateSpec};
use crate::metrics::Metrics;
use tollgate_edge::rate::MessageRate;

/// One subscription to one product.
pub struct Subscription {
    pub name: String,
    pub product: String,
    pub max_connections: Option<usize>,
    /// Connections admitted under this subscription; shared with the subscription of the same
    /// product and name that a reload puts in its place, so the limit counts older connections.
    pub active: Arc<AtomicUsize>,
    /// `tollgate_subscription_connections_active`.
    pub gauge: Gauge,
    /// The message buckets its connections share (`per = "subscription"`); kept across reloads
    /// like `active`.
    pub message_rates: Arc<SharedRates>,
}

/// Whose limit a set of shared buckets serves: an API's (the subscription's connections to
/// it) or a product's (its connections to any of the product's APIs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateScope {
    Api,
    Product,
}

/// A subscription's shared message buckets, by scope, name and direction. Made at the first
/// connection that needs them; a reload that changes the rate starts them afresh (the
/// connections already open keep the buckets they started with).
#[derive(Default)]
pub struct SharedRates {
    by_scope: Mutex<HashMap<RateKey, (RateSpec, SharedRate)>>,
}

/// Whose buckets: scope, its name, direction.
type RateKey = (RateScope, String, Direction);

impl SharedRates {
    /// The buckets for the messages of `scope` `name` in direction `dir` under `spec`; new
    /// ones are shared with the `fleet` when there is one (`[cluster]`), under `subscription`
    /// (the subscription's name in the store).
    fn get(
        &self,
        scope: RateScope,
        name: &str,
        dir: Direction,
        spec: RateSpec,
        fleet: Option<(&crate::cluster::Fleet, &str)>,
    ) -> SharedRate {
        let mut map = self.by_scope.lock().unwrap_or_else(|e| e.into_inner());
        let key = (scope, name.to_owned(), dir);
        match map.get(&key) {
            Some((held, rate)) if *held == spec => rate.clone(),
            _ => {
                let rate: SharedRate = match fleet {
                    Some((fleet, subscription)) => {
                        let scope = match scope {
                            RateScope::Api => "api",
                            RateScope::Product => "product",
                        };
                        let dir = match dir {
                            Direction::ClientToBackend => "client",
                            Direction::BackendToClient => "backend",
                        };
                        let thing = crate::cluster::message_rate_thing(
                            subscription,
                            scope,
                            name,
                            dir,
                            &spec,
                        );
                        fleet.shared_rate(thing, spec)
                    }
                    None => Arc::new(Mutex::new(MessageRate::new(
                        &spec,
                        std::time::Instant::now(),
                    ))),
                };
                map.insert(key, (spec, rate.clone()));
                rate
            }
        }
    }
}

/// One key of one subscription, with the token that ends the connections it opened.
struct KeyEntry {
    digest: KeyDigest,
    sub: Arc<Subscription>,
    /// Cancelled when a reload drops this key (or its subscription): every connection admitted
    /// with it is then closed. A child of the gateway's shutdown token, so a relay waits on one
    /// token for both (and tells them apart by whether shutdown is cancelled).
    token: CancellationToken,
}

/// Every subscription of the served manifest, indexed by key digest.
#[derive(Default)]
pub struct Keys {
    index: HashMap<[u8; 8], Vec<KeyEntry>>,
    all: Vec<Arc<Subscription>>,
}

fn prefix(d: &KeyDigest) -> [u8; 8] {
    let mut p = [0u8; 8];
    p.copy_from_slice(&d[..8]);
    p
}

impl Keys {
    /// Builds the index; `previous` is the state a reload replaces (its connection counts carry
    /// over to the subscriptions that keep their product and name, and the revocation tokens to
    /// the keys that stay with the same subscription). `root`: the gateway's shutdown token.
    pub fn build(
        config: &Config,
        previous: Option<&Keys>,
        metrics: &Metrics,
        root: &CancellationToken,
    ) -> Keys {
        let mut keys = Keys::default();
        for p in &config.products {
            for s in &p.subscriptions {
                let before = previous.and_then(|k| {
                    k.all
                        .iter()
                        .find(|o| o.product == p.name && o.name == s.name)
                });
                let sub = Arc::new(Subscription {
                    name: s.name.clone(),
                    product: p.name.clone(),
                    max_connections: s.max_connections,
                    gauge: metrics.subscription_active(&p.name, &s.name),
                    active: before.map(|o| o.active.clone()).unwrap_or_default(),
                    message_rates: before.map(|o| o.message_rates.clone()).unwrap_or_default(),
                });
                for k in &s.keys {
                    let token = previous
                        .and_then(|prev| prev.entry(k))
                        .filter(|e| e.sub.product == p.name && e.sub.name == s.name)
                        .map(|e| e.token.clone())
                        .unwrap_or_else(|| root.child_token());
                    keys.index.entry(prefix(k)).or_default().push(KeyEntry {
                        digest: *k,
                        sub: sub.clone(),
                        token,
                    });
                }
                keys.all.push(sub);
            }
        }
        keys
    }

    /// The subscription `presented` is a key of, if any, and the key's revocation token.
    pub fn find(&self, presented: &str) -> Option<(&Arc<Subscription>, &CancellationToken)> {
        self.by_digest(&key_digest(presented))
    }

    /// [`Keys::find`] by the key's digest.
    pub fn by_digest(&self, d: &KeyDigest) -> Option<(&Arc<Subscription>, &CancellationToken)> {
        self.entry(d).map(|e| (&e.sub, &e.token))
    }

    fn entry(&self, d: &KeyDigest) -> Option<&KeyEntry> {
        let candidates = self.index.get(&prefix(d))?;
        let mut found = None;
        for e in candidates {
            if bool::from(e.digest.ct_eq(d)) {
                found = Some(e);
            }
        }
        found
    }

    /// Ends the connections of every key of `previous` that this state no longer has (a key
    /// removed or rotated away, a subscription deleted or moved to another product). Called
    /// once this state is serving; returns how many keys were revoked.
    pub fn revoke_missing(&self, previous: &Keys) -> usize {
        let mut revoked = 0;
        for e in previous.index.values().flatten() {
            let kept = self.entry(&e.digest).is_some_and(|n| n.token == e.token);
            if !kept && !e.token.is_cancelled() {
                tracing::info!(event = "subscription_key_revoked", product = %e.sub.product,
                    subscription = %e.sub.name,
                    "a subscription key is gone after the reload; its connections are closed");
                e.token.cancel();
                revoked += 1;
            }
        }
        revoked
    }

    pub fn all(&self) -> &[Arc<Subscription>] {
        &self.all
    }
}

impl Subscription {
    /// The buckets its connections share for the messages of `scope` `name` (an API or a
    /// product) in direction `dir` under `spec`: across the `fleet` when there is one.
    pub fn message_rate(
        &self,
        scope: RateScope,
        name: &str,
        dir: Direction,
        spec: RateSpec,
        fleet: Option<&crate::cluster::Fleet>,
    ) -> SharedRate {
        let thing = fleet.map(|_| crate::cluster::subscription_thing(&self.product, &self.name));
        self.message_rates
            .get(scope, name, dir, spec, fleet.zip(thing.as_deref()))
    }

    /// Takes one of this subscription's connection slots, if it has one free. Exact under
    /// concurrency: the count never goes above `max_connections`, not even for a moment.
    pub fn try_take(&self) -> bool {
        let max = self.max_connections.unwrap_or(usize::MAX);
        let ok = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if ok {
            self.gauge.inc();
        }
        ok
    }

    /// Counts a connection admitted elsewhere (handed over by a binary upgrade), whatever
    /// the limit.
    pub fn adopt(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
    }

    /// Gives a slot back.
    pub fn give_back(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

/// Logs a warning when the keys file can be read by users other than its owner: it holds
/// every subscriber's keys in plain text. A warning, not an error, because the file may be
/// protected another way (a directory only the gateway can enter, a secrets mount); it is
/// repeated at every load so it is not lost.
pub fn warn_if_readable_by_others(path: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(event = "keys_file_permissions", path = %path.display(),
                    mode = %format!("{mode:03o}"),
                    "the subscription keys file can be read by other users: `chmod 600` it");
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        std::env::set_var("TOLLGATE_TEST_SUB_KEY_A", "aaaaaaaaaaaaaaaaaaaaaaaa");
        crate::manifest::parse(
            std::path::Path::new("/tmp/m.toml"),
            &format!(
                "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\n\
                 [[products]]\nname = \"gold\"\n\
                 [[products.subscriptions]]\nname = \"alice\"\nmax_connections = 2\nprimary_key_env = \"TOLLGATE_TEST_SUB_KEY_A\"\nsecondary_key_sha256 = \"{}\"\n\
                 [[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"gold\"]\n",
                key_digest("bbbbbbbbbbbbbbbbbbbbbbbb")
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        )
        .unwrap()
    }

    #[test]
    fn primary_and_secondary_find_the_subscription_and_others_do_not() {
        let m = Metrics::new();
        let k = Keys::build(&config(), None, &m, &CancellationToken::new());
        assert_eq!(k.find("aaaaaaaaaaaaaaaaaaaaaaaa").unwrap().0.name, "alice");
        assert_eq!(
            k.find("bbbbbbbbbbbbbbbbbbbbbbbb").unwrap().0.product,
            "gold"
        );
        assert!(k.find("aaaaaaaaaaaaaaaaaaaaaaab").is_none());
        assert!(k.find("").is_none());
    }

    #[test]
    fn a_reload_revokes_exactly_the_keys_it_drops() {
        let m = Metrics::new();
        let root = CancellationToken::new();
        let k = Keys::build(&config(), None, &m, &root);
        let primary = k.find("aaaaaaaaaaaaaaaaaaaaaaaa").unwrap().1.clone();
        let secondary = k.find("bbbbbbbbbbbbbbbbbbbbbbbb").unwrap().1.clone();
        // The secondary key is rotated: same subscription, another digest.
        let mut rotated = config();
        rotated.products[0].subscriptions[0].keys[1] = key_digest("cccccccccccccccccccccccc");
        let k2 = Keys::build(&rotated, Some(&k), &m, &root);
        assert_eq!(k2.revoke_missing(&k), 1);
        assert!(
            secondary.is_cancelled(),
            "the rotated-away key's connections end"
        );
        assert!(!primary.is_cancelled(), "the kept key's connections stay");
        assert!(!k2
            .find("cccccccccccccccccccccccc")
            .unwrap()
            .1
            .is_cancelled());
        // Shutdown reaches every key's connections through the same token.
        root.cancel();
        assert!(primary.is_cancelled());
    }

    #[test]
    fn slots_are_exact_and_carry_over_a_reload() {
        let m = Metrics::new();
        let c = config();
        let root = CancellationToken::new();
        let k = Keys::build(&c, None, &m, &root);
        let alice = k.find("aaaaaaaaaaaaaaaaaaaaaaaa").unwrap().0.clone();
        assert!(alice.try_take());
        assert!(alice.try_take());
        assert!(!alice.try_take());
        let k2 = Keys::build(&c, Some(&k), &m, &root);
        assert_eq!(k2.revoke_missing(&k), 0, "same keys: nothing revoked");
        let again = k2.find("aaaaaaaaaaaaaaaaaaaaaaaa").unwrap().0;
        assert!(
            !again.try_take(),
            "the reload must keep counting the 2 live connections"
        );
        alice.give_back();
        assert!(again.try_take());
    }
}
