//! Native unit tests through the SDK's harness: `host::verify` answers with the gateway's own
//! verification code, `testing::request()` builds handshakes.

use super::*;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tollgate_sdk::testing::{request, take_logs};
use tollgate_sdk::QueryChange;

const NOW: u64 = 1_800_000_000;

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn unsigned(header: &str, claims: &str) -> String {
    format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()))
}

struct Keys {
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
    secret: Vec<u8>,
}

fn keys() -> Keys {
    let rng = SystemRandom::new();
    let ec_doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let ed_doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Keys {
        ec: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, ec_doc.as_ref(), &rng)
            .unwrap(),
        ed: Ed25519KeyPair::from_pkcs8(ed_doc.as_ref()).unwrap(),
        secret: b"a shared secret of decent length!".to_vec(),
    }
}

impl Keys {
    fn jwks(&self) -> String {
        let p = self.ec.public_key().as_ref();
        serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec1", "x": b64(&p[1..33]), "y": b64(&p[33..])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed1", "x": b64(self.ed.public_key().as_ref())},
            {"kty": "oct", "kid": "hs1", "k": b64(&self.secret)},
        ]})
        .to_string()
    }

    fn sign(&self, alg: &str, kid: &str, claims: &str) -> String {
        let input = unsigned(
            &format!(r#"{{"alg":"{alg}","kid":"{kid}","typ":"JWT"}}"#),
            claims,
        );
        let sig = match alg {
            "ES256" => self
                .ec
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            "EdDSA" => self.ed.sign(input.as_bytes()).as_ref().to_vec(),
            _ => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.secret);
                ring::hmac::sign(&k, input.as_bytes()).as_ref().to_vec()
            }
        };
        format!("{input}.{}", b64(&sig))
    }
}

fn prepared(keys: &Keys, extra: serde_json::Value) -> Prepared {
    let mut cfg = serde_json::json!({
        "algorithms": ["ES256", "EdDSA", "HS256"],
        "issuers": ["https://issuer.test"],
        "audiences": ["chat"],
        "clock_skew_seconds": 30,
        "query_parameter_name": "access_token",
        "jwks": keys.jwks(),
    });
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let json = <JwtValidate as Policy>::configure(&cfg.to_string()).unwrap();
    serde_json::from_str(&json).unwrap()
}

fn good_claims() -> String {
    format!(
        r#"{{"sub":"ann","iss":"https://issuer.test","aud":["chat","other"],"exp":{},"nbf":{},"scope":"chat read"}}"#,
        NOW + 600,
        NOW - 10
    )
}

fn bearer(token: &str) -> tollgate_sdk::Request<'static> {
    request()
        .header("Authorization", &format!("Bearer {token}"))
        .received_at(NOW)
        .build()
}

fn status(d: &Decision) -> u16 {
    match d {
        Decision::Reject(r) => r.status,
        Decision::Proceed(_) => 101,
    }
}

#[test]
fn valid_tokens_of_each_algorithm_proceed_with_claims_in_context() {
    let k = keys();
    let p = prepared(&k, serde_json::json!({}));
    for (alg, kid) in [("ES256", "ec1"), ("EdDSA", "ed1"), ("HS256", "hs1")] {
        let d = decide(&p, &bearer(&k.sign(alg, kid, &good_claims())));
        let Decision::Proceed(pr) = d else {
            panic!("{alg}: rejected: {:?}", take_logs())
        };
        assert!(pr
            .context
            .iter()
            .any(|c| c.name == "jwt.sub" && c.value == "ann"));
        assert!(pr
            .context
            .iter()
            .any(|c| c.name == "jwt.aud" && c.value == "chat,other"));
    }
}

#[test]
fn each_bad_token_is_refused_with_the_configured_status_and_logged() {
    let k = keys();
    let p = prepared(&k, serde_json::json!({"failed_validation_status": 403}));
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c: serde_json::Value = serde_json::from_str(&good_claims()).unwrap();
        f(&mut c);
        c.to_string()
    };
    let good = k.sign("ES256", "ec1", &good_claims());
    let (h, rest) = good.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let tampered = format!(
        "{h}.{}.{sig}",
        b64(claims(&|c| c["sub"] = "root".into()).as_bytes())
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            k.sign("ES256", "ec1", &claims(&|c| c["exp"] = (NOW - 31).into())),
            "token expired",
        ),
        (
            "not yet valid",
            k.sign("ES256", "ec1", &claims(&|c| c["nbf"] = (NOW + 31).into())),
            "token not yet valid (nbf)",
        ),
        (
            "no exp",
            k.sign(
                "ES256",
                "ec1",
                &claims(&|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
            "token has no exp",
        ),
        (
            "wrong issuer",
            k.sign(
                "ES256",
                "ec1",
                &claims(&|c| c["iss"] = "https://evil.test".into()),
            ),
            "issuer \"https://evil.test\" is not accepted",
        ),
        (
            "wrong audience",
            k.sign("ES256", "ec1", &claims(&|c| c["aud"] = "billing".into())),
            "audience [\"billing\"] is not accepted",
        ),
        (
            "alg none",
            format!("{}.", unsigned(r#"{"alg":"none"}"#, &good_claims())),
            "unsigned token (alg none)",
        ),
        (
            "unknown kid",
            k.sign("ES256", "nope", &good_claims()),
            "no ES256 key with kid \"nope\"",
        ),
        ("tampered", tampered, "signature does not verify"),
        (
            "garbage",
            "a.b".into(),
            "not a compact JWS (three dot-separated parts)",
        ),
    ];
    // Each for its own reason: a token refused for another one means a check did not run.
    for (what, token, why) in cases {
        let d = decide(&p, &bearer(&token));
        assert_eq!(status(&d), 403, "{what}");
        let logs = take_logs();
        let refused: Vec<&str> = logs
            .iter()
            .filter_map(|(_, m)| m.strip_prefix("token refused: "))
            .collect();
        assert_eq!(refused, vec![why], "{what}: {logs:?}");
    }
    assert_eq!(
        status(&decide(&p, &request().received_at(NOW).build())),
        403
    );
}

#[test]
fn skew_is_honoured_and_required_claims_checked() {
    let k = keys();
    let p = prepared(
        &k,
        serde_json::json!({"required_claims": [{"name": "scope", "match": "all", "values": ["chat", "read"], "separator": " "}]}),
    );
    let mut c: serde_json::Value = serde_json::from_str(&good_claims()).unwrap();
    c["exp"] = (NOW - 29).into();
    assert_eq!(
        status(&decide(
            &p,
            &bearer(&k.sign("ES256", "ec1", &c.to_string()))
        )),
        101
    );
    c["scope"] = "chat".into();
    assert_eq!(
        status(&decide(
            &p,
            &bearer(&k.sign("ES256", "ec1", &c.to_string()))
        )),
        401
    );
}

#[test]
fn query_token_is_used_and_removed() {
    let k = keys();
    let p = prepared(&k, serde_json::json!({}));
    let t = k.sign("EdDSA", "ed1", &good_claims());
    let r = request().query("access_token", &t).received_at(NOW).build();
    let Decision::Proceed(pr) = decide(&p, &r) else {
        panic!("rejected")
    };
    assert!(matches!(&pr.query_changes[..], [QueryChange::Remove(n)] if n == "access_token"));
}

#[test]
fn algorithm_confusion_and_bad_config_are_refused() {
    let k = keys();
    // HS256 "signed" with the EC public key bytes as the secret, claiming the EC key's kid.
    let p = prepared(&k, serde_json::json!({}));
    let input = unsigned(r#"{"alg":"HS256","kid":"ec1"}"#, &good_claims());
    let hk = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.ec.public_key().as_ref());
    let forged = format!(
        "{input}.{}",
        b64(ring::hmac::sign(&hk, input.as_bytes()).as_ref())
    );
    assert_eq!(status(&decide(&p, &bearer(&forged))), 401);

    let bad =
        |cfg: serde_json::Value| <JwtValidate as Policy>::configure(&cfg.to_string()).unwrap_err();
    assert!(
        bad(serde_json::json!({"algorithms": ["none"], "jwks": k.jwks()}))
            .contains("\"none\" can never be allowed")
    );
    assert!(
        bad(serde_json::json!({"algorithms": ["RS256"], "jwks": k.jwks()}))
            .contains("no configured key")
    );
    assert!(bad(serde_json::json!({"algorithms": ["ES256"]})).contains("no keys"));
    assert!(bad(serde_json::json!({"jwks": "{not json"})).contains("jwks is not valid JSON"));
    assert!(bad(serde_json::json!({"jwks": k.jwks(), "colour": 1})).contains("colour"));
    let short_rsa =
        serde_json::json!({"keys": [{"kty": "RSA", "n": b64(&[0xff; 128]), "e": "AQAB"}]});
    assert!(
        bad(serde_json::json!({"algorithms": ["RS256"], "jwks": short_rsa.to_string()}))
            .contains("not usable")
    );
    assert!(bad(
        serde_json::json!({"pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"})
    )
    .contains("pem"));
}

/// An HS256 token signed with `secret`, with `kid` in its header when given.
fn hs256_token(secret: &[u8], kid: Option<&str>) -> String {
    let header = match kid {
        Some(k) => format!(r#"{{"alg":"HS256","kid":"{k}"}}"#),
        None => r#"{"alg":"HS256"}"#.to_owned(),
    };
    let input = unsigned(&header, &good_claims());
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!(
        "{input}.{}",
        b64(ring::hmac::sign(&k, input.as_bytes()).as_ref())
    )
}

#[test]
fn a_token_is_tried_against_at_most_four_keys_kid_matches_first() {
    let secrets: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("shared secret number {i} of five, long").into_bytes())
        .collect();
    let jwks = |with_kids: bool| {
        let keys: Vec<_> = secrets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if with_kids {
                    serde_json::json!({"kty": "oct", "kid": format!("k{i}"), "k": b64(s)})
                } else {
                    serde_json::json!({"kty": "oct", "k": b64(s)})
                }
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    };
    let cfg = |with_kids: bool| {
        let json = <JwtValidate as Policy>::configure(
            &serde_json::json!({
                "algorithms": ["HS256"],
                "issuers": ["https://issuer.test"],
                "jwks": jwks(with_kids),
            })
            .to_string(),
        )
        .unwrap();
        serde_json::from_str::<Prepared>(&json).unwrap()
    };
    let p = cfg(true);
    // Five keys of one family: configure says a token only gets four tries.
    assert!(
        take_logs()
            .iter()
            .any(|(l, m)| *l == Level::Warn && m.contains("at most 4")),
        "no warning about the key cap"
    );
    // No kid: the first four keys are tried, the fifth never is.
    for (i, secret) in secrets.iter().enumerate().take(4) {
        let t = hs256_token(secret, None);
        assert_eq!(status(&decide(&p, &bearer(&t))), 101, "key {i}");
    }
    let t = hs256_token(&secrets[4], None);
    assert_eq!(status(&decide(&p, &bearer(&t))), 401);
    assert!(
        take_logs()
            .iter()
            .any(|(_, m)| m.contains("first 4 of 5 HS256 keys")),
        "the refusal does not say why"
    );
    // With its kid, the fifth key is found.
    let t = hs256_token(&secrets[4], Some("k4"));
    assert_eq!(status(&decide(&p, &bearer(&t))), 101);
    // A JWKS without kids: a token naming a kid still gets four tries only.
    let p = cfg(false);
    let t = hs256_token(&secrets[4], Some("k4"));
    assert_eq!(status(&decide(&p, &bearer(&t))), 401);
    let t = hs256_token(&secrets[3], Some("k3"));
    assert_eq!(status(&decide(&p, &bearer(&t))), 101);
}

#[test]
fn no_issuers_and_no_audiences_is_accepted_with_a_warning() {
    let k = keys();
    take_logs();
    let ok = <JwtValidate as Policy>::configure(
        &serde_json::json!({"algorithms": ["ES256"], "jwks": k.jwks()}).to_string(),
    );
    assert!(ok.is_ok(), "{ok:?}");
    let logs = take_logs();
    assert!(
        logs.iter()
            .any(|(l, m)| *l == Level::Warn && m.contains("neither issuers nor audiences")),
        "{logs:?}"
    );
    for extra in [
        serde_json::json!({"audiences": ["chat"]}),
        serde_json::json!({"issuers": ["https://issuer.test"]}),
    ] {
        let mut cfg = serde_json::json!({"algorithms": ["ES256"], "jwks": k.jwks()});
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        <JwtValidate as Policy>::configure(&cfg.to_string()).unwrap();
        assert!(take_logs().is_empty(), "{extra}");
    }
}

#[test]
fn close_at_expiry_sets_the_connection_deadline_to_exp_plus_skew() {
    let k = keys();
    let token = k.sign("ES256", "ec1", &good_claims());
    let d = decide(&prepared(&k, serde_json::json!({})), &bearer(&token));
    assert_eq!(
        d.proceeding().expect("proceeds").close_at,
        None,
        "off by default"
    );
    let p = prepared(
        &k,
        serde_json::json!({"close_at_expiry": true, "clock_skew_seconds": 5}),
    );
    let d = decide(&p, &bearer(&token));
    assert_eq!(
        d.proceeding().expect("proceeds").close_at,
        Some(NOW + 600 + 5)
    );
    // A token without exp (allowed by require_expiration_time = false) sets no deadline.
    let p = prepared(
        &k,
        serde_json::json!({"close_at_expiry": true, "require_expiration_time": false}),
    );
    let claims = format!(
        r#"{{"sub":"ann","iss":"https://issuer.test","aud":"chat","nbf":{}}}"#,
        NOW - 10
    );
    let d = decide(&p, &bearer(&k.sign("ES256", "ec1", &claims)));
    assert_eq!(d.proceeding().expect("proceeds").close_at, None);
}

#[test]
fn close_at_expiry_refuses_a_token_in_its_last_second_and_survives_huge_exp() {
    let k = keys();
    let p = prepared(
        &k,
        serde_json::json!({"close_at_expiry": true, "clock_skew_seconds": 0}),
    );
    let at_now = format!(
        r#"{{"sub":"ann","iss":"https://issuer.test","aud":"chat","exp":{NOW},"nbf":{}}}"#,
        NOW - 10
    );
    let d = decide(&p, &bearer(&k.sign("ES256", "ec1", &at_now)));
    assert_eq!(
        status(&d),
        401,
        "valid for no time left: refused as expired, not a 500"
    );
    // Java's Long.MAX_VALUE "never expires": a deadline far out, no overflow.
    let forever =
        r#"{"sub":"ann","iss":"https://issuer.test","aud":"chat","exp":9223372036854775807}"#;
    let d = decide(&p, &bearer(&k.sign("ES256", "ec1", forever)));
    assert!(d
        .proceeding()
        .expect("proceeds")
        .close_at
        .is_some_and(|at| at > NOW));
}

/// Keys fetched by the gateway (`jwks_url`): natively, the SDK serves the documents
/// `serve_key_set` registered, and serving another one is the provider's rotation.
#[test]
fn fetched_keys_verify_tokens_and_follow_the_providers_rotation() {
    let k = keys();
    let url = "https://idp.test/jwks";
    let ed = |kid: &str| {
        serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(k.ed.public_key().as_ref())},
        ]})
        .to_string()
    };
    tollgate_sdk::testing::serve_key_set(url, &ed("ed1"));
    let cfg = serde_json::json!({
        "algorithms": ["EdDSA"],
        "audiences": ["chat"],
        "jwks_url": url,
        "jwks_refresh": "15m",
        "jwks_min_refresh": 30,
    });
    let json = <JwtValidate as Policy>::configure(&cfg.to_string()).unwrap();
    let p: Prepared = serde_json::from_str(&json).unwrap();
    assert_eq!(p.keys.len(), 0, "no static keys");
    assert_eq!(p.key_sets.len(), 1);
    let token = k.sign("EdDSA", "ed1", &good_claims());
    assert_eq!(
        status(&decide(&p, &bearer(&token))),
        101,
        "{:?}",
        take_logs()
    );
    // Another kid: no key.
    let other = k.sign("EdDSA", "ed2", &good_claims());
    assert_eq!(status(&decide(&p, &bearer(&other))), 401);
    assert!(take_logs()
        .iter()
        .any(|(_, l)| l.contains("no EdDSA key with kid \"ed2\"")));
    // The provider rotates to the same key under kid ed2.
    tollgate_sdk::testing::serve_key_set(url, &ed("ed2"));
    assert_eq!(status(&decide(&p, &bearer(&other))), 101);
    assert_eq!(status(&decide(&p, &bearer(&token))), 401);
}

#[test]
fn fetched_key_config_errors_name_the_key() {
    let refuse =
        |cfg: serde_json::Value| <JwtValidate as Policy>::configure(&cfg.to_string()).unwrap_err();
    let e =
        refuse(serde_json::json!({"jwks_url": "https://a/j", "openid_config_url": "https://a/o"}));
    assert!(e.contains("not both"), "{e}");
    let e = refuse(serde_json::json!({"jwks": {"keys": []}, "jwks_refresh": "1h"}));
    assert!(
        e.contains("jwks_refresh applies to fetched keys only"),
        "{e}"
    );
    let e = refuse(serde_json::json!({"jwks_url": "https://a/j", "jwks_refresh": "soon"}));
    assert!(e.contains("`soon` is not a duration"), "{e}");
    let e = refuse(
        serde_json::json!({"jwks_url": "https://a/j", "jwks_refresh": "1m", "jwks_min_refresh": "5m"}),
    );
    assert!(e.contains("jwks_min_refresh must not be longer"), "{e}");
    let e = refuse(serde_json::json!({"jwks_url": "https://nothing.test/jwks"}));
    assert!(
        e.starts_with("jwt-validate: jwks_url: fetching key set"),
        "{e}"
    );
}
