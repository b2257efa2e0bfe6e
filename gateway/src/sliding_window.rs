//! The sliding window the gateway's rate counters count with (`crate::counters` in the
//! process, the Redis script in `crate::cluster` across the fleet): the types and the steps
//! both follow. See `crate::counters` for why this algorithm.

use std::collections::VecDeque;

/// Buckets per window: the window's resolution (a unit counts up to a 60th of the window
/// longer than the window).
pub const BUCKETS: u64 = 60;
/// Longest window: a week.
pub const MAX_WINDOW_SECONDS: u32 = 7 * 24 * 3600;
/// Largest limit (counts stay exact in Redis's Lua, whose numbers are doubles).
pub const MAX_LIMIT: u64 = 1_000_000_000_000;

/// "At most `limit` units in any `window`".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    limit: u64,
    window_ms: u64,
}

impl Rate {
    /// `limit` 1..=[`MAX_LIMIT`], `window_seconds` 1..=[`MAX_WINDOW_SECONDS`].
    pub fn new(limit: u64, window_seconds: u32) -> Result<Rate, String> {
        if limit == 0 || limit > MAX_LIMIT {
            return Err(format!("limit {limit} is not within 1..={MAX_LIMIT}"));
        }
        if window_seconds == 0 || window_seconds > MAX_WINDOW_SECONDS {
            return Err(format!(
                "window of {window_seconds} s is not within 1..={MAX_WINDOW_SECONDS} s"
            ));
        }
        Ok(Rate {
            limit,
            window_ms: u64::from(window_seconds) * 1000,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// One bucket's length: a 60th of the window (a window of 1 s: 16 ms buckets).
    pub fn bucket_ms(&self) -> u64 {
        (self.window_ms / BUCKETS).max(1)
    }

    /// This rate with the limit shared among `gateways` (rounded up, and never below
    /// `at_least`, the amount one call counts, or nothing would ever fit): a gateway's part
    /// while the fleet's store is away.
    pub fn share(&self, gateways: u64, at_least: u64) -> Rate {
        Rate {
            limit: self.limit.div_ceil(gateways.max(1)).max(at_least),
            window_ms: self.window_ms,
        }
    }
}

/// What one increment found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// The amount fitted under the limit and was counted; when false nothing was counted.
    pub allowed: bool,
    /// Units the window holds now (this call's included when it was allowed).
    pub count: u64,
    /// When refused: milliseconds until the amount fits. 0 when allowed.
    pub retry_after_ms: u64,
    /// Milliseconds until the window holds nothing.
    pub reset_after_ms: u64,
}

impl Counted {
    /// What "no limit applied" answers (`on_store_failure = "open"`).
    pub fn unlimited() -> Counted {
        Counted {
            allowed: true,
            count: 0,
            retry_after_ms: 0,
            reset_after_ms: 0,
        }
    }
}

/// One key's window: (bucket index, units) oldest first; a bucket is `now_ms / bucket_ms`.
#[derive(Debug, Default, Clone)]
pub struct Window {
    buckets: VecDeque<(u64, u64)>,
}

impl Window {
    /// The bucket's last moment of counting: its end plus the window.
    fn expiry(rate: &Rate, bucket: u64) -> u64 {
        bucket
            .saturating_add(1)
            .saturating_mul(rate.bucket_ms())
            .saturating_add(rate.window_ms)
    }

    /// Counts `amount` at `now_ms` if it fits under the rate's limit (the same steps as the
    /// Redis script in `cluster.rs`). `amount` 0 only reads. `now_ms` must not go backwards.
    pub fn apply(&mut self, rate: &Rate, now_ms: u64, amount: u64) -> Counted {
        while let Some(&(b, _)) = self.buckets.front() {
            if Self::expiry(rate, b) <= now_ms {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
        let total: u64 = self.buckets.iter().map(|(_, n)| *n).sum();
        let newest = |w: &Window| {
            w.buckets
                .back()
                .map_or(0, |(b, _)| Self::expiry(rate, *b).saturating_sub(now_ms))
        };
        if total.saturating_add(amount) <= rate.limit {
            if amount > 0 {
                let current = now_ms / rate.bucket_ms();
                match self.buckets.back_mut() {
                    Some((b, n)) if *b >= current => *n = n.saturating_add(amount),
                    _ => self.buckets.push_back((current, amount)),
                }
            }
            return Counted {
                allowed: true,
                count: total.saturating_add(amount),
                retry_after_ms: 0,
                reset_after_ms: newest(self),
            };
        }
        // Refused: the amount fits once enough of the oldest buckets have expired.
        let mut need = total.saturating_add(amount).saturating_sub(rate.limit);
        let mut retry = 0;
        for (b, n) in &self.buckets {
            need = need.saturating_sub(*n);
            if need == 0 {
                retry = Self::expiry(rate, *b).saturating_sub(now_ms);
                break;
            }
        }
        Counted {
            allowed: false,
            count: total,
            retry_after_ms: retry,
            reset_after_ms: newest(self),
        }
    }

    /// Nothing counts any more at `now_ms`.
    pub fn is_spent(&self, rate: &Rate, now_ms: u64) -> bool {
        self.buckets
            .back()
            .is_none_or(|(b, _)| Self::expiry(rate, *b) <= now_ms)
    }
}
