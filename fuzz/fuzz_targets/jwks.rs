//! jwt-validate's key parsing, natively: a JWKS (JSON) or PEM text of arbitrary content
//! through `jwks_keys`, `pem_keys` and the whole `prepare` of a config holding it; and the
//! host's own reading of a fetched JWKS (`tollgate_verify::jwks::parse`, what the gateway does
//! with a document an identity provider sent).
//!
//! Input: byte 0 picks the mode (even: JWKS, odd: PEM), the rest is UTF-8 text.
//!
//! Invariants: never panics; every key accepted decodes to a key the host can use (what a
//! handshake will ask of it), and the prepared config survives the JSON round trip the plugin
//! makes between `configure` and each handshake.
#![no_main]

use jwt_validate::config::{jwks_keys, pem_keys, prepare, Family, Prepared, PreparedKey};
use libfuzzer_sys::fuzz_target;

fn algorithm(f: Family) -> &'static str {
    match f {
        Family::Rsa => "RS256",
        Family::P256 => "ES256",
        Family::P384 => "ES384",
        Family::Ed25519 => "EdDSA",
        Family::Hmac => "HS256",
    }
}

fn check_keys(keys: &[PreparedKey]) {
    for k in keys {
        assert!(
            k.key().is_ok(),
            "accepted a key that does not decode: {k:?}"
        );
    }
}

/// A fetched JWKS: never a panic; what is kept is usable, bounded, and never a shared secret.
fn check_fetched(doc: &[u8]) {
    use tollgate_verify::jwks::{parse, Family, MAX_KEYS};
    let Ok(set) = parse(doc) else {
        return;
    };
    assert!(!set.keys.is_empty() && set.keys.len() <= MAX_KEYS);
    for k in &set.keys {
        assert_ne!(k.family, Family::Hmac, "a shared secret taken from a fetched JWKS");
        let probe = match k.family {
            Family::Rsa => tollgate_verify::Algorithm::Rs256,
            Family::P256 => tollgate_verify::Algorithm::Es256,
            Family::P384 => tollgate_verify::Algorithm::Es384,
            _ => tollgate_verify::Algorithm::EdDsa,
        };
        assert!(tollgate_verify::verify(probe, &k.key, b"", b"").is_ok(), "{k:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check_fetched(rest);
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (keys, source) = if mode % 2 == 0 {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
            return;
        };
        (jwks_keys(&v), serde_json::json!({ "jwks": text }))
    } else {
        (pem_keys(text), serde_json::json!({ "pem": text }))
    };
    let Ok(keys) = keys else {
        return;
    };
    check_keys(&keys);
    let mut algorithms: Vec<&str> = keys.iter().map(|k| algorithm(k.family)).collect();
    algorithms.sort_unstable();
    algorithms.dedup();
    if algorithms.is_empty() {
        return;
    }
    let mut cfg = source;
    cfg["algorithms"] = serde_json::json!(algorithms);
    let p = match prepare(&cfg.to_string()) {
        Ok(p) => p,
        Err(e) => panic!("keys accepted by the parser, refused by prepare: {e}"),
    };
    assert_eq!(p.keys.len(), keys.len());
    check_keys(&p.keys);
    let json = serde_json::to_string(&p).expect("a prepared config serialises");
    let back: Prepared = serde_json::from_str(&json).expect("and reads back");
    assert_eq!(serde_json::to_string(&back).ok(), Some(json));
});
