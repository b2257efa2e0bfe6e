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
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use subtle::ConstantTimeEq;

use crate::manifest::{key_digest, Config, KeyDigest};
use crate::metrics::Metrics;

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
}

/// Every subscription of the served manifest, indexed by key digest.
#[derive(Default)]
pub struct Keys {
    index: HashMap<[u8; 8], Vec<(KeyDigest, Arc<Subscription>)>>,
    all: Vec<Arc<Subscription>>,
}

fn prefix(d: &KeyDigest) -> [u8; 8] {
    let mut p = [0u8; 8];
    p.copy_from_slice(&d[..8]);
    p
}

impl Keys {
    /// Builds the index; `previous` is the state a reload replaces (its connection counts carry
    /// over to the subscriptions that keep their product and name).
    pub fn build(config: &Config, previous: Option<&Keys>, metrics: &Metrics) -> Keys {
        let mut keys = Keys::default();
        for p in &config.products {
            for s in &p.subscriptions {
                let active = previous
                    .and_then(|k| {
                        k.all
                            .iter()
                            .find(|o| o.product == p.name && o.name == s.name)
                    })
                    .map(|o| o.active.clone())
                    .unwrap_or_default();
                let sub = Arc::new(Subscription {
                    name: s.name.clone(),
                    product: p.name.clone(),
                    max_connections: s.max_connections,
                    gauge: metrics.subscription_active(&p.name, &s.name),
                    active,
                });
                for k in &s.keys {
                    keys.index
                        .entry(prefix(k))
                        .or_default()
                        .push((*k, sub.clone()));
                }
                keys.all.push(sub);
            }
        }
        keys
    }

    /// The subscription `presented` is a key of, if any.
    pub fn find(&self, presented: &str) -> Option<&Arc<Subscription>> {
        let d = key_digest(presented);
        let candidates = self.index.get(&prefix(&d))?;
        let mut found = None;
        for (k, sub) in candidates {
            if bool::from(k.ct_eq(&d)) {
                found = Some(sub);
            }
        }
        found
    }

    pub fn all(&self) -> &[Arc<Subscription>] {
        &self.all
    }
}

impl Subscription {
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
        let k = Keys::build(&config(), None, &m);
        assert_eq!(k.find("aaaaaaaaaaaaaaaaaaaaaaaa").unwrap().name, "alice");
        assert_eq!(k.find("bbbbbbbbbbbbbbbbbbbbbbbb").unwrap().product, "gold");
        assert!(k.find("aaaaaaaaaaaaaaaaaaaaaaab").is_none());
        assert!(k.find("").is_none());
    }

    #[test]
    fn slots_are_exact_and_carry_over_a_reload() {
        let m = Metrics::new();
        let c = config();
        let k = Keys::build(&c, None, &m);
        let alice = k.find("aaaaaaaaaaaaaaaaaaaaaaaa").unwrap().clone();
        assert!(alice.try_take());
        assert!(alice.try_take());
        assert!(!alice.try_take());
        let k2 = Keys::build(&c, Some(&k), &m);
        let again = k2.find("aaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
        assert!(
            !again.try_take(),
            "the reload must keep counting the 2 live connections"
        );
        alice.give_back();
        assert!(again.try_take());
    }
}
