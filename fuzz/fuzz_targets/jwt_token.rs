//! jwt-validate's token handling, natively: a compact JWS of arbitrary content through
//! `validate` (base64url and JSON decoding, header checks, key selection, signature, claims)
//! and `decide` (token from the header or the query).
//!
//! Input: byte 0 picks the mode, the rest is UTF-8 text.
//! - 0: the text is the token, as is;
//! - 1: the text is `HEADER-JSON\nCLAIMS-JSON`, encoded and signed with HS256 and the
//!   configured secret (so the claims checks are reached);
//! - 2: as 1, signed with another secret;
//! - 3: the text is an `Authorization` header value, 4: an `access_token` query value.
//!
//! Invariants: never panics; a token over the size cap, or signed with the wrong secret, is
//! refused; an accepted token's claims meet every configured check (issuer, audience, exp and
//! nbf with the skew, required claims); a refusal carries the configured status and message.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jwt_validate::config::{prepare, Prepared};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate_sdk::testing::request;
use tollgate_sdk::Decision;

const NOW: u64 = 1_700_000_000;
const SECRET: &[u8] = b"a shared secret of decent length!";

/// The config, prepared once per fuzzing thread (a `Prepared` decodes its keys lazily into a
/// `OnceCell`, so it is not `Sync`; one leaked copy per thread stands in for a static).
fn prepared() -> &'static Prepared {
    thread_local! {
        static P: &'static Prepared = Box::leak(Box::new(make_prepared()));
    }
    P.with(|p| *p)
}

fn make_prepared() -> Prepared {
    {
        let cfg = serde_json::json!({
            "algorithms": ["HS256", "HS384"],
            "issuers": ["https://issuer.test"],
            "audiences": ["chat"],
            "clock_skew_seconds": 30,
            "query_parameter_name": "access_token",
            "failed_validation_status": 401,
            "failed_validation_message": "no entry",
            "required_claims": [{"name": "scope", "values": ["chat"], "separator": " "}],
            "jwks": {"keys": [{"kty": "oct", "kid": "hs1", "k": URL_SAFE_NO_PAD.encode(SECRET)}]},
        });
        match prepare(&cfg.to_string()) {
            Ok(p) => p,
            Err(e) => panic!("the fuzz target's own config is refused: {e}"),
        }
    }
}

fn hs256(secret: &[u8], header: &str, claims: &str) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// What an accepted token's claims must satisfy under [`prepared`]'s config.
fn claims_meet_the_config(c: &serde_json::Map<String, Value>) -> bool {
    let num = |k: &str| c.get(k).and_then(Value::as_f64);
    let exp_ok = num("exp").is_some_and(|exp| (NOW as f64) <= exp + 30.0);
    let nbf_ok = c.get("nbf").is_none() || num("nbf").is_some_and(|nbf| nbf <= (NOW + 30) as f64);
    let iss_ok = c.get("iss").and_then(Value::as_str) == Some("https://issuer.test");
    let aud_ok = match c.get("aud") {
        Some(Value::String(s)) => s == "chat",
        Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some("chat")),
        _ => false,
    };
    let scope_ok = match c.get("scope") {
        Some(Value::String(s)) => s.split(' ').any(|x| x == "chat"),
        Some(Value::Array(a)) => a.iter().any(|x| {
            x.as_str()
                .is_some_and(|s| s.split(' ').any(|x| x == "chat"))
        }),
        _ => false,
    };
    exp_ok && nbf_ok && iss_ok && aud_ok && scope_ok
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let p = prepared();
    match mode % 5 {
        0 | 1 | 2 => {
            let token = match mode % 5 {
                0 => text.to_owned(),
                m => {
                    let (h, c) = text.split_once('\n').unwrap_or((text, "{}"));
                    let secret: &[u8] = if m == 1 {
                        SECRET
                    } else {
                        b"another secret entirely"
                    };
                    hs256(secret, h, c)
                }
            };
            let r = jwt_validate::validate(p, &token, NOW);
            if token.len() > jwt_validate::MAX_TOKEN_BYTES || mode % 5 == 2 {
                assert!(r.is_err(), "accepted an oversized or wrongly signed token");
            }
            if let Ok(claims) = r {
                assert!(claims_meet_the_config(&claims), "accepted {claims:?}");
                for pair in jwt_validate::context(&p.prefix, &claims) {
                    assert!(pair.name.starts_with("jwt."));
                }
            }
        }
        m => {
            let r = if m == 3 {
                request().header("authorization", text)
            } else {
                request().query("access_token", text)
            };
            match jwt_validate::decide(p, &r.received_at(NOW).build()) {
                Decision::Reject(r) => {
                    assert_eq!(r.status, 401);
                    assert_eq!(r.body, b"no entry");
                }
                Decision::Proceed(_) => {}
            }
            let _ = tollgate_sdk::testing::take_logs();
        }
    }
});
