//! Remembers signatures the host has already found valid, so a client that reconnects with the
//! same token (the common case for WebSocket clients: one token, many reconnects) does not pay
//! for the same RSA or ECDSA check again. Envoy's JWT filter keeps a similar cache.
//!
//! Only successes are remembered, keyed by SHA-256 over the algorithm, the key, the message
//! and the signature: a hit means "this exact check passed before", which stays true, since a
//! signature check is a pure function of those inputs. Expiry and every claim are still checked
//! by the policy on each handshake; a key that is rotated away changes the key bytes and so
//! never hits an old entry.
//!
//! Written by hand rather than with a cache crate because all it needs is a bounded set: two
//! generations of at most `capacity / 2` entries each; when the current one fills up it becomes
//! the previous one and the oldest generation is dropped (an approximation of LRU: an entry hit
//! in the previous generation is promoted).

use std::collections::HashSet;
use std::sync::Mutex;

pub use crate::metrics::SignatureCacheCounters as CacheCounters;

/// Default number of remembered signatures (about 100 bytes each); defined with the manifest,
/// which applies it when `gateway.signature_cache_entries` is not set.
pub const DEFAULT_ENTRIES: usize = tollgate_manifest::DEFAULT_SIGNATURE_CACHE_ENTRIES;

type Digest = [u8; 32];

pub struct VerifyCache {
    generations: Mutex<(HashSet<Digest>, HashSet<Digest>)>,
    per_generation: usize,
    counters: CacheCounters,
}

impl VerifyCache {
    /// `capacity` 0 disables the cache (and nothing is counted).
    pub fn new(capacity: usize, counters: CacheCounters) -> VerifyCache {
        VerifyCache {
            generations: Mutex::new((HashSet::new(), HashSet::new())),
            per_generation: capacity / 2,
            counters,
        }
    }

    /// The number of entries it was made for.
    pub fn capacity(&self) -> usize {
        self.per_generation * 2
    }

    /// The result of `check()` for these inputs: from the cache when the same check passed
    /// before, else by running it (and remembering a pass).
    pub fn verify(
        &self,
        alg: tollgate_verify::Algorithm,
        key: &tollgate_verify::Key,
        message: &[u8],
        signature: &[u8],
        check: impl FnOnce() -> Result<bool, String>,
    ) -> Result<bool, String> {
        if self.per_generation == 0 {
            return check();
        }
        let digest = digest(alg, key, message, signature);
        if self.lookup(&digest) {
            self.counters.hits.inc();
            return Ok(true);
        }
        self.counters.misses.inc();
        let result = check();
        if let Ok(true) = result {
            self.insert(digest);
        }
        result
    }

    fn lookup(&self, d: &Digest) -> bool {
        let Ok(mut g) = self.generations.lock() else {
            return false;
        };
        if g.0.contains(d) {
            return true;
        }
        if g.1.remove(d) {
            drop(g);
            self.insert(*d);
            return true;
        }
        false
    }

    fn insert(&self, d: Digest) {
        let Ok(mut g) = self.generations.lock() else {
            return;
        };
        if g.0.len() >= self.per_generation {
            let full = std::mem::take(&mut g.0);
            g.1 = full;
        }
        g.0.insert(d);
    }

    /// (hits, misses) since start.
    pub fn stats(&self) -> (u64, u64) {
        (self.counters.hits.get(), self.counters.misses.get())
    }
}

/// Length-prefixed fields, so no two different inputs hash the same byte string.
fn digest(
    alg: tollgate_verify::Algorithm,
    key: &tollgate_verify::Key,
    message: &[u8],
    signature: &[u8],
) -> Digest {
    use tollgate_verify::Key;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut field = |tag: &[u8], bytes: &[u8]| {
        ctx.update(tag);
        ctx.update(&(bytes.len() as u64).to_le_bytes());
        ctx.update(bytes);
    };
    field(b"alg", format!("{alg:?}").as_bytes());
    match key {
        Key::Spki(d) => field(b"spki", d),
        Key::Rsa { n, e } => {
            field(b"rsa-n", n);
            field(b"rsa-e", e);
        }
        Key::Raw(r) => field(b"raw", r),
        Key::Secret(s) => field(b"secret", s),
    }
    field(b"msg", message);
    field(b"sig", signature);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_verify::{Algorithm, Key};

    fn call(c: &VerifyCache, key: &[u8], msg: &[u8], sig: &[u8], answer: bool) -> (bool, bool) {
        let mut ran = false;
        let r = c
            .verify(
                Algorithm::Hs256,
                &Key::Secret(key.to_vec()),
                msg,
                sig,
                || {
                    ran = true;
                    Ok(answer)
                },
            )
            .unwrap();
        (r, ran)
    }

    #[test]
    fn a_pass_is_remembered_for_exactly_the_same_inputs() {
        let c = VerifyCache::new(100, CacheCounters::default());
        assert_eq!(call(&c, b"k", b"m", b"s", true), (true, true));
        assert_eq!(call(&c, b"k", b"m", b"s", false), (true, false), "hit");
        // Any input different: checked again, and the check's answer stands.
        assert_eq!(call(&c, b"k2", b"m", b"s", false), (false, true));
        assert_eq!(call(&c, b"k", b"m2", b"s", false), (false, true));
        assert_eq!(call(&c, b"k", b"m", b"s2", false), (false, true));
        // Field boundaries are part of the digest.
        assert_eq!(call(&c, b"km", b"", b"s", false), (false, true));
        assert_eq!(c.stats(), (1, 5));
    }

    #[test]
    fn failures_are_never_remembered() {
        let c = VerifyCache::new(100, CacheCounters::default());
        assert_eq!(call(&c, b"k", b"m", b"bad", false), (false, true));
        assert_eq!(call(&c, b"k", b"m", b"bad", false), (false, true));
    }

    #[test]
    fn bounded_and_disabled() {
        let c = VerifyCache::new(4, CacheCounters::default());
        for i in 0..10u8 {
            call(&c, b"k", &[i], b"s", true);
        }
        let g = c.generations.lock().unwrap();
        assert!(g.0.len() + g.1.len() <= 4);
        drop(g);
        // The newest is still there; the oldest is gone.
        assert_eq!(call(&c, b"k", &[9], b"s", false), (true, false));
        assert_eq!(call(&c, b"k", &[0], b"s", false), (false, true));

        let off = VerifyCache::new(0, CacheCounters::default());
        call(&off, b"k", b"m", b"s", true);
        assert_eq!(call(&off, b"k", b"m", b"s", false), (false, true));
    }
}
