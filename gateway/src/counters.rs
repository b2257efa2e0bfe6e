//! Rate counters by key, behind `tollgate:policy/counters` (issue 19): "at most `limit` units
//! in any `window`", kept in this process, or across the fleet in Redis when the manifest has
//! `[cluster]` (the same algorithm in a Lua script, [`crate::cluster::Store::increment`]).
//!
//! The algorithm is a sliding window over [`BUCKETS`] buckets per window, as API Management's
//! `rate-limit-by-key` promises a sliding window (`renewal-period`): a unit counted at time `t`
//! goes into the bucket holding `t` and counts until that bucket's end plus the window, so it
//! counts for at least the window and at most one bucket (a 60th of the window) longer. Hence:
//! - never more than `limit` units in any window (no burst of twice the limit at a boundary,
//!   as a fixed window allows), and a burst of `limit` at once is allowed, as users expect;
//! - memory is bounded per key (at most `BUCKETS + 1` buckets), unlike a log of every call;
//! - a refusal knows exactly when `amount` fits again (`retry_after_ms`), so `Retry-After` is
//!   right to the second;
//! - a refused call counts nothing: a client that keeps retrying is not locked out for longer.
//!
//! (A GCRA would need one number per key, but it spreads the limit evenly over the window: 30 per
//! 10 s would admit one handshake every 333 ms after a burst, which is not what an operator who
//! wrote "30 calls per 10 s" reads.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::cluster::{Fallback, Fleet};
pub use crate::sliding_window::{Counted, Rate, Window, MAX_LIMIT, MAX_WINDOW_SECONDS};

/// Longest key a plugin may count under.
pub const MAX_KEY_BYTES: usize = 512;
/// Keys this process keeps at most (local counting, and the fallback when the store is away):
/// keys come from what clients send (an address, a token's subject), so they must be bounded.
/// At most ~1.7 KiB each (61 buckets, the key, the map's own), ~110 MiB in all at worst. When
/// full, a new key takes the place of a held one (see `local`).
pub const MAX_LOCAL_KEYS: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CounterError {
    #[error("{0}")]
    Invalid(String),
    #[error("the fleet's store is unavailable (on_store_failure = \"closed\")")]
    StoreUnavailable,
}

/// The counters of this process.
#[derive(Default)]
struct Local {
    windows: HashMap<String, (Rate, Window)>,
    /// When spent windows were last swept out (at most once a second when full).
    swept_at: Option<Instant>,
    /// Live windows dropped to make room for new keys.
    evicted: u64,
}

/// Who counted: the fleet's store, this process, or nobody (the store is away and
/// `on_store_failure = "open"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountedBy {
    Fleet,
    Local,
    /// The store is away: this gateway's share of the limit, counted here.
    LocalShare,
    Unlimited,
}

impl CountedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            CountedBy::Fleet => "fleet",
            CountedBy::Local => "local",
            CountedBy::LocalShare => "local_share",
            CountedBy::Unlimited => "unlimited",
        }
    }
}

/// The process's counters: one for its whole life (reloads keep the counts), shared by every
/// plugin; a plugin's keys are its own (the plugin's name is part of every key).
pub struct Counters {
    local: Mutex<Local>,
    metrics: crate::metrics::FleetMetrics,
    fleet: OnceLock<Arc<Fleet>>,
    /// Local windows measure time from here (monotonic).
    epoch: Instant,
}

impl Default for Counters {
    fn default() -> Self {
        Counters::new(Default::default())
    }
}

impl Counters {
    /// Counts its increments in `metrics` (`tollgate_counter_increments_total`).
    pub fn new(metrics: crate::metrics::FleetMetrics) -> Counters {
        Counters {
            local: Mutex::default(),
            metrics,
            fleet: OnceLock::new(),
            epoch: Instant::now(),
        }
    }

    /// Counts across the fleet from now on (`[cluster]`); set once, at start.
    pub fn use_fleet(&self, fleet: Arc<Fleet>) {
        let _ = self.fleet.set(fleet);
    }

    /// The key a plugin's counter is kept under: the plugin's name (length-prefixed, so no two
    /// plugins' keys can meet) and the window (one key counted with two windows is two
    /// counters: their buckets differ).
    fn full_key(plugin: &str, rate: &Rate, key: &str) -> String {
        format!(
            "{}:{plugin}:{}:{key}",
            plugin.len(),
            rate.window_ms() / 1000
        )
    }

    /// Counts `amount` under `plugin`'s `key` if it fits under `rate`.
    pub async fn increment(
        &self,
        plugin: &str,
        key: &str,
        rate: Rate,
        amount: u64,
    ) -> Result<(Counted, CountedBy), CounterError> {
        let result = self.count(plugin, key, rate, amount).await;
        let (outcome, by) = match &result {
            Ok((c, by)) => (if c.allowed { "allowed" } else { "refused" }, by.as_str()),
            Err(CounterError::StoreUnavailable) => ("error", "fleet"),
            Err(_) => ("error", "local"),
        };
        self.metrics.counted(plugin, outcome, by);
        result
    }

    async fn count(
        &self,
        plugin: &str,
        key: &str,
        rate: Rate,
        amount: u64,
    ) -> Result<(Counted, CountedBy), CounterError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(CounterError::Invalid(format!(
                "a key of {} bytes is longer than {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        if amount > rate.limit() {
            return Err(CounterError::Invalid(format!(
                "an amount of {amount} can never fit under a limit of {}",
                rate.limit()
            )));
        }
        let full = Self::full_key(plugin, &rate, key);
        let Some(fleet) = self.fleet.get() else {
            return self
                .local(full, rate, amount)
                .map(|c| (c, CountedBy::Local));
        };
        match fleet.increment(&full, &rate, amount).await {
            Ok(c) => Ok((c, CountedBy::Fleet)),
            Err(Fallback::Open) => Ok((Counted::unlimited(), CountedBy::Unlimited)),
            Err(Fallback::Closed) => Err(CounterError::StoreUnavailable),
            Err(Fallback::Local { live }) => self
                .local(full, rate.share(live, amount), amount)
                .map(|c| (c, CountedBy::LocalShare)),
        }
    }

    fn local(&self, key: String, rate: Rate, amount: u64) -> Result<Counted, CounterError> {
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut local = self
            .local
            .lock()
            .map_err(|_| CounterError::Invalid("counters unavailable".into()))?;
        let local = &mut *local;
        if let Some((kept, window)) = local.windows.get_mut(&key) {
            // The share of a limit changes with the live gateways: the latest applies.
            *kept = rate;
            return Ok(window.apply(&rate, now_ms, amount));
        }
        let mut window = Window::default();
        let counted = window.apply(&rate, now_ms, amount);
        // A read, or a refusal, of a key not held leaves nothing behind.
        if !counted.allowed || amount == 0 {
            return Ok(counted);
        }
        if local.windows.len() >= MAX_LOCAL_KEYS {
            let due = local
                .swept_at
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due {
                local.swept_at = Some(Instant::now());
                local.windows.retain(|_, (r, w)| !w.is_spent(r, now_ms));
            }
            // Still full (someone is minting keys: addresses of an IPv6 prefix, header values):
            // a held key is dropped, whichever the map's random order gives first, rather than
            // every new key refused. The dropped key loses its count (its next calls start
            // afresh), a bounded cost; refusing would let one client lock every new key out
            // for up to a window.
            while local.windows.len() >= MAX_LOCAL_KEYS {
                let Some(victim) = local.windows.keys().next().cloned() else {
                    break;
                };
                local.windows.remove(&victim);
                local.evicted = local.evicted.saturating_add(1);
            }
        }
        local.windows.insert(key, (rate, window));
        Ok(counted)
    }

    /// Keys held in this process (for tests and `/metrics`).
    pub fn local_keys(&self) -> usize {
        self.local.lock().map(|l| l.windows.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(limit: u64, secs: u32) -> Rate {
        Rate::new(limit, secs).unwrap()
    }

    #[test]
    fn a_burst_of_the_limit_passes_and_no_more() {
        let r = rate(30, 10);
        let mut w = Window::default();
        let t0 = 1_000_000;
        let allowed = (0..100).filter(|i| w.apply(&r, t0 + i, 1).allowed).count();
        assert_eq!(allowed, 30);
        let refused = w.apply(&r, t0 + 100, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.count, 30);
        // Everything sits in the bucket [t0 / 166 * 166, +166): it counts until its end + 10 s.
        let end = (t0 / 166 + 1) * 166 + 10_000;
        assert_eq!(refused.retry_after_ms, end - (t0 + 100));
        assert_eq!(refused.reset_after_ms, end - (t0 + 100));
        // One millisecond before, still refused; at the moment, all 30 fit again.
        assert!(!w.apply(&r, end - 1, 1).allowed);
        assert!(w.apply(&r, end, 30).allowed);
    }

    #[test]
    fn never_more_than_the_limit_in_any_window() {
        // 10 per 1 s, a call every 7 ms for 5 s: any 1 s span holds at most 10 admitted.
        let r = rate(10, 1);
        let mut w = Window::default();
        let admitted: Vec<u64> = (0..700u64)
            .map(|i| i * 7)
            .filter(|t| w.apply(&r, *t, 1).allowed)
            .collect();
        for (i, t) in admitted.iter().enumerate() {
            let within = admitted[i..].iter().take_while(|u| **u < t + 1000).count();
            assert!(within <= 10, "{within} admitted within 1 s of {t}");
        }
        // And the limit is used: about 10 per second (each unit counts up to one bucket
        // longer than the window).
        assert!(admitted.len() >= 45, "{}", admitted.len());
    }

    #[test]
    fn retry_after_is_when_the_oldest_needed_units_expire() {
        let r = rate(3, 60); // buckets of 1 s
        let mut w = Window::default();
        assert!(w.apply(&r, 0, 1).allowed);
        assert!(w.apply(&r, 5_000, 1).allowed);
        assert!(w.apply(&r, 9_000, 1).allowed);
        let c = w.apply(&r, 10_000, 2);
        assert!(!c.allowed);
        // Two units must go: the ones of 0 s (counts until 61 s) and of 5 s (until 66 s).
        assert_eq!(c.retry_after_ms, 66_000 - 10_000);
        assert_eq!(c.reset_after_ms, 70_000 - 10_000);
        assert!(!w.apply(&r, 65_999, 2).allowed);
        let later = w.apply(&r, 66_000, 2);
        assert!(later.allowed);
        assert_eq!(later.count, 3);
    }

    #[test]
    fn a_refusal_counts_nothing_and_amount_zero_only_reads() {
        let r = rate(2, 1);
        let mut w = Window::default();
        assert!(w.apply(&r, 0, 2).allowed);
        for t in 1..50 {
            assert!(!w.apply(&r, t, 1).allowed);
        }
        let read = w.apply(&r, 50, 0);
        assert!(read.allowed);
        assert_eq!(read.count, 2);
        assert_eq!(w.apply(&r, 1016, 0).count, 0);
    }

    #[test]
    fn bad_rates_and_amounts_are_refused() {
        assert!(Rate::new(0, 1).is_err());
        assert!(Rate::new(1, 0).is_err());
        assert!(Rate::new(1, MAX_WINDOW_SECONDS + 1).is_err());
        assert!(Rate::new(MAX_LIMIT + 1, 1).is_err());
        assert_eq!(rate(10, 1).share(3, 1).limit(), 4);
        assert_eq!(rate(10, 1).share(0, 1).limit(), 10);
        assert_eq!(rate(10, 1).share(4, 4).limit(), 4);
    }

    #[tokio::test]
    async fn plugins_and_windows_count_apart() {
        let c = Counters::default();
        let r = rate(1, 10);
        assert!(c.increment("a", "k", r, 1).await.unwrap().0.allowed);
        assert!(!c.increment("a", "k", r, 1).await.unwrap().0.allowed);
        // Another plugin, or another window: another counter.
        assert!(c.increment("b", "k", r, 1).await.unwrap().0.allowed);
        assert!(
            c.increment("a", "k", rate(1, 20), 1)
                .await
                .unwrap()
                .0
                .allowed
        );
        // "1:a:10:x" cannot be reached from another plugin name.
        assert!(c.increment("a:10", "k", r, 1).await.unwrap().0.allowed);
        let long = "x".repeat(MAX_KEY_BYTES + 1);
        assert!(c.increment("a", &long, r, 1).await.is_err());
        assert!(c.increment("a", "k", r, 2).await.is_err());
        assert_eq!(
            c.increment("a", "k", r, 1).await.unwrap().1,
            CountedBy::Local
        );
    }

    #[tokio::test]
    async fn local_keys_are_bounded() {
        let c = Counters::default();
        let r = rate(1, 60);
        for i in 0..MAX_LOCAL_KEYS {
            c.increment("p", &i.to_string(), r, 1).await.unwrap();
        }
        // Full: a new key still counts, and takes a held key's place.
        assert!(c.increment("p", "one more", r, 1).await.unwrap().0.allowed);
        assert!(!c.increment("p", "one more", r, 1).await.unwrap().0.allowed);
        assert_eq!(c.local_keys(), MAX_LOCAL_KEYS);
        assert_eq!(c.local.lock().unwrap().evicted, 1);
        // Reads and refusals of keys not held take no room.
        assert!(c.increment("p", "read", r, 0).await.unwrap().0.allowed);
        assert_eq!(c.local.lock().unwrap().evicted, 1);
    }
}
