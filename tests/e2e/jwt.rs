//! jwt-validate and set-header through the real gateway, with tokens made here: RS256, ES256,
//! HS256 and EdDSA keys generated per run, published as an inline JWKS, a PEM block and a
//! JWKS file.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Keys {
    rsa: rsa::RsaPrivateKey,
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
    secret: Vec<u8>,
}

impl Keys {
    fn new() -> Keys {
        let rng = SystemRandom::new();
        let ec = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Keys {
            rsa: rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap(),
            ec: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, ec.as_ref(), &rng)
                .unwrap(),
            ed: Ed25519KeyPair::from_pkcs8(ed.as_ref()).unwrap(),
            secret: b"the HS256 secret, long enough for a test".to_vec(),
        }
    }

    fn rsa_pem(&self) -> String {
        self.rsa
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    fn jwks(&self) -> String {
        let p = self.ec.public_key().as_ref();
        let rsa = self.rsa.to_public_key();
        serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "rsa1", "n": b64(&rsa.n().to_bytes_be()), "e": b64(&rsa.e().to_bytes_be())},
            {"kty": "EC", "crv": "P-256", "kid": "ec1", "x": b64(&p[1..33]), "y": b64(&p[33..])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed1", "x": b64(self.ed.public_key().as_ref())},
            {"kty": "oct", "kid": "hs1", "k": b64(&self.secret)},
        ]})
        .to_string()
    }

    /// A compact JWS over `claims`, signed with the key of `alg`.
    fn sign(&self, alg: &str, kid: &str, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": alg, "kid": kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = match alg {
            "RS256" => rsa::pkcs1v15::SigningKey::<rsa::sha2::Sha256>::new(self.rsa.clone())
                .sign(input.as_bytes())
                .to_vec(),
            "ES256" => self
                .ec
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            "EdDSA" => self.ed.sign(input.as_bytes()).as_ref().to_vec(),
            "HS256" => hs256(&self.secret, input.as_bytes()),
            other => panic!("no signer for {other}"),
        };
        format!("{input}.{}", b64(&sig))
    }
}

fn hs256(secret: &[u8], input: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::sign(&k, input).as_ref().to_vec()
}

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "sub": sub,
        "iss": "https://issuer.test",
        "aud": "chat",
        "exp": now() + 600,
        "nbf": now() - 5,
    })
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// jwt-validate with the given key source, then set-header X-User from the subject.
fn attachments(keys_line: &str, extra: &str) -> String {
    format!(
        r#"[[apis.on_handshake]]
plugin = "jwt-validate"
{extra}
[apis.on_handshake.config]
algorithms = ["RS256", "ES256", "HS256", "EdDSA"]
issuers = ["https://issuer.test"]
audiences = ["chat"]
clock_skew_seconds = 30
query_parameter_name = "access_token"
{keys_line}

[[apis.on_handshake]]
plugin = "set-header"
config = {{ name = "X-User", value = "{{jwt.sub}}", exists_action = "override" }}
"#
    )
}

fn manifest(backend: &str, att: &str) -> String {
    format!(
        "{}{}{att}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("chat", "chat", backend, "")
    )
}

fn gateway(backend: &RawBackend, att: &str, setup: impl FnOnce(&TempDir)) -> Gateway {
    let dir = TempDir::new("jwt");
    plugins::install(
        &dir.path().join("plugins"),
        &["jwt_validate.wasm", "set_header.wasm"],
    );
    setup(&dir);
    Gateway::start_in(dir, &manifest(&backend.url(), att))
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

#[tokio::test]
async fn valid_tokens_pass_and_every_bad_one_gets_401_without_reaching_the_backend() {
    let k = Keys::new();
    let backend = RawBackend::start(echo_frames()).await;
    let gw = gateway(
        &backend,
        &attachments(&format!("jwks = {}", toml_str(&k.jwks())), ""),
        |_| {},
    );
    let addr = gw.ws.unwrap();

    // Valid, one per algorithm: 101, and the backend sees X-User made from the claim.
    for (alg, kid) in [
        ("RS256", "rsa1"),
        ("ES256", "ec1"),
        ("HS256", "hs1"),
        ("EdDSA", "ed1"),
    ] {
        let sub = format!("user-{alg}");
        let token = k.sign(alg, kid, &claims(&sub));
        let (_, mut ws) = ws_connect(addr, "/chat", &bearer(&token)).await;
        ws.send(true, 1, b"hi").await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
        let seen = backend.last_head();
        assert_eq!(headers_all(&seen, "x-user"), vec![sub], "{alg}: {seen}");
        // The header token is the backend's to see too (only a query token is removed).
        assert_eq!(
            headers_all(&seen, "authorization"),
            vec![format!("Bearer {token}")],
            "{alg}: {seen}"
        );
    }

    // Token in the query: accepted, and not forwarded.
    let t = k.sign("ES256", "ec1", &claims("query-user"));
    let (_, _ws) = ws_connect(addr, &format!("/chat?room=7&access_token={t}"), "").await;
    let seen = backend.last_head();
    let request_line = seen.lines().next().unwrap();
    assert!(request_line.contains("room=7"), "{request_line}");
    assert!(
        !seen.contains("access_token") && !seen.contains(&t),
        "{seen}"
    );
    assert_eq!(headers_all(&seen, "x-user"), vec!["query-user"]);

    let reached = backend.connections.load(Ordering::SeqCst);
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims("mallory");
        f(&mut c);
        c
    };
    let good = k.sign("RS256", "rsa1", &claims("ann"));
    let (h, rest) = good.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let tampered = format!(
        "{h}.{}.{sig}",
        b64(with(&|c| c["sub"] = "root".into()).to_string().as_bytes())
    );
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("ann").to_string().as_bytes())
    );
    // Algorithm confusion: HS256 with the RSA public key (as published) as the HMAC secret.
    let confusion_input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","kid":"rsa1","typ":"JWT"}"#),
        b64(claims("ann").to_string().as_bytes())
    );
    let confused = format!(
        "{confusion_input}.{}",
        b64(&hs256(k.rsa_pem().as_bytes(), confusion_input.as_bytes()))
    );
    // Each refusal for its own reason (logged by the policy): any 401 would not do, since a
    // token refused for the wrong reason means a check did not run.
    let cases: Vec<(&str, String, &str)> = vec![
        ("missing", String::new(), "no token in the request"),
        (
            "expired",
            bearer(&k.sign("RS256", "rsa1", &with(&|c| c["exp"] = (now() - 120).into()))),
            "token expired",
        ),
        (
            "not yet valid",
            bearer(&k.sign("ES256", "ec1", &with(&|c| c["nbf"] = (now() + 120).into()))),
            "token not yet valid (nbf)",
        ),
        (
            "wrong issuer",
            bearer(&k.sign(
                "RS256",
                "rsa1",
                &with(&|c| c["iss"] = "https://evil.test".into()),
            )),
            "issuer \"https://evil.test\" is not accepted",
        ),
        (
            "wrong audience",
            bearer(&k.sign("EdDSA", "ed1", &with(&|c| c["aud"] = "billing".into()))),
            "audience [\"billing\"] is not accepted",
        ),
        ("alg none", bearer(&unsigned), "unsigned token (alg none)"),
        (
            "HS256 with the RSA public key",
            bearer(&confused),
            "no HS256 key with kid \"rsa1\"",
        ),
        (
            "tampered payload",
            bearer(&tampered),
            "signature does not verify",
        ),
        (
            "unknown kid",
            bearer(&k.sign("RS256", "rsa-rotated-away", &claims("ann"))),
            "no RS256 key with kid \"rsa-rotated-away\"",
        ),
        (
            "not a JWT",
            bearer("definitely.not.a-token"),
            "header is not base64url",
        ),
    ];
    for (what, extra, why) in cases {
        let logged = gw.records("policy_log").len();
        let (head, _) = raw_handshake(addr, "/chat", &extra).await;
        assert_eq!(status_of(&head), 401, "{what}: {head}");
        assert_eq!(
            header(&head, "www-authenticate").as_deref(),
            Some("Bearer error=\"invalid_token\""),
            "{what}: {head}"
        );
        let want = format!("token refused: {why}");
        wait_until(what, || gw.records("policy_log").len() > logged).await;
        let r = &gw.records("policy_log")[logged];
        assert_eq!(r["plugin"], "jwt-validate", "{what}: {r}");
        assert_eq!(r["message"], want.as_str(), "{what}: {r}");
    }
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        reached,
        "a refused handshake reached the backend"
    );
    // Why is logged with the plugin's name; the token itself never is.
    gw.wait_record("policy_log", |r| {
        r["plugin"] == "jwt-validate"
            && r["message"]
                .as_str()
                .unwrap_or("")
                .contains("token expired")
    })
    .await;
    // The handshake record says how long the policy chain took, for accepted and rejected ones.
    for status in [101, 401] {
        gw.wait_record("handshake", |r| {
            r["status"] == status && r["policies_ms"].as_f64().is_some_and(|ms| ms > 0.0)
        })
        .await;
    }
    let all = gw.output();
    assert!(
        !all.contains(sig),
        "a token's signature appeared in the log"
    );
}

#[tokio::test]
async fn keys_from_pem_and_from_a_granted_jwks_file() {
    let k = Keys::new();
    let backend = RawBackend::start(echo_frames()).await;
    let pem_att = attachments(&format!("pem = {}", toml_str(&k.rsa_pem())), "").replace(
        "algorithms = [\"RS256\", \"ES256\", \"HS256\", \"EdDSA\"]",
        "algorithms = [\"RS256\"]",
    );
    let gw = gateway(&backend, &pem_att, |_| {});
    let t = k.sign("RS256", "any", &claims("pem-user"));
    let (_, _ws) = ws_connect(gw.ws.unwrap(), "/chat", &bearer(&t)).await;
    assert_eq!(
        headers_all(&backend.last_head(), "x-user"),
        vec!["pem-user"]
    );
    let (head, _) = raw_handshake(
        gw.ws.unwrap(),
        "/chat",
        &bearer(&k.sign("ES256", "ec1", &claims("x"))),
    )
    .await;
    assert_eq!(status_of(&head), 401, "no EC key configured: {head}");
    drop(gw);

    let file_att = attachments(
        "jwks_file = \"keys/jwks.json\"",
        "grants = { read_dirs = [\"keys\"] }",
    );
    let jwks = k.jwks();
    let gw = gateway(&backend, &file_att, |dir| {
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        std::fs::write(dir.path().join("keys/jwks.json"), &jwks).unwrap();
    });
    let t = k.sign("EdDSA", "ed1", &claims("file-user"));
    let (_, _ws) = ws_connect(gw.ws.unwrap(), "/chat", &bearer(&t)).await;
    assert_eq!(
        headers_all(&backend.last_head(), "x-user"),
        vec!["file-user"]
    );
}

#[test]
fn jwks_file_without_a_grant_and_bad_config_fail_the_check_with_the_plugins_message() {
    let dir = TempDir::new("jwt-check");
    plugins::install(
        &dir.path().join("plugins"),
        &["jwt_validate.wasm", "set_header.wasm"],
    );
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/jwks.json"), r#"{"keys": []}"#).unwrap();
    let (code, err, _) = tollgate_check(
        dir.path(),
        &manifest(
            "ws://127.0.0.1:1/",
            &attachments("jwks_file = \"keys/jwks.json\"", ""),
        ),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("plugin `jwt-validate` refused its config")
            && err.contains("cannot read jwks_file `keys/jwks.json`")
            && err.contains("read_dirs"),
        "{err}"
    );
    let (code, err, _) = tollgate_check(
        dir.path(),
        &manifest(
            "ws://127.0.0.1:1/",
            "[[apis.on_handshake]]\nplugin = \"jwt-validate\"\nconfig = { algorithms = [\"none\"], jwks = '{\"keys\": []}' }\n",
        ),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("\"none\" can never be allowed"), "{err}");
}

/// The example custom policy (examples/tenant-check), run with its own example manifest.
#[tokio::test]
async fn example_tenant_check_policy_keeps_clients_in_their_own_tenant() {
    let backend = RawBackend::start(echo_frames()).await;
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/tenant-check/tollgate.toml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"")
        .replace("ws://127.0.0.1:9000/", &backend.url());
    let dir = TempDir::new("tenant");
    plugins::install(
        &dir.path().join("plugins"),
        &["jwt_validate.wasm", "tenant_check.wasm"],
    );
    let gw = Gateway::start_in(dir, &text);
    let secret = b"tenant-demo-secret-change-me-0123456789";
    let token = |tenant: &str| {
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"HS256","kid":"demo"}"#),
            b64(serde_json::json!({"sub": "ann", "aud": "chat", "tenant": tenant, "exp": now() + 60})
                .to_string()
                .as_bytes())
        );
        format!("{input}.{}", b64(&hs256(secret, input.as_bytes())))
    };
    let (_, _ws) = ws_connect(
        gw.ws.unwrap(),
        &format!("/chat/acme/lobby?access_token={}", token("acme")),
        "",
    )
    .await;
    assert_eq!(headers_all(&backend.last_head(), "x-tenant"), vec!["acme"]);
    let reached = backend.connections.load(Ordering::SeqCst);
    let (head, _) = raw_handshake(
        gw.ws.unwrap(),
        &format!("/chat/globex/lobby?access_token={}", token("acme")),
        "",
    )
    .await;
    assert_eq!(status_of(&head), 403, "{head}");
    assert_eq!(backend.connections.load(Ordering::SeqCst), reached);
}

/// A JWK for an RSA public key, without `kid`.
fn rsa_jwk(n: &[u8], e: &[u8]) -> serde_json::Value {
    serde_json::json!({"kty": "RSA", "n": b64(n), "e": b64(e)})
}

/// A well-formed RSA public key that verifies nothing `k` signed: its modulus with a few
/// middle bits changed (still 2048 bits and odd), one variant per `i`.
fn decoy_jwk(k: &Keys, i: u8) -> serde_json::Value {
    let pk = k.rsa.to_public_key();
    let mut n = pk.n().to_bytes_be();
    n[100] ^= i;
    rsa_jwk(&n, &pk.e().to_bytes_be())
}

/// An RS256 token without `kid` in its header.
fn rs256_without_kid(k: &Keys, claims: &serde_json::Value) -> String {
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"RS256","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let sig = rsa::pkcs1v15::SigningKey::<rsa::sha2::Sha256>::new(k.rsa.clone())
        .sign(input.as_bytes())
        .to_vec();
    format!("{input}.{}", b64(&sig))
}

/// jwt-validate (RS256, issuer and audience set) for an API, with the given JWKS.
fn rs256_api(name: &str, backend: &str, jwks: &serde_json::Value) -> String {
    api_section(
        name,
        name,
        backend,
        &format!(
            "[[apis.on_handshake]]\nplugin = \"jwt-validate\"\n[apis.on_handshake.config]\nalgorithms = [\"RS256\"]\nissuers = [\"https://issuer.test\"]\naudiences = [\"chat\"]\njwks = {}\n",
            toml_str(&jwks.to_string())
        ),
    )
}

#[tokio::test]
async fn a_token_without_kid_is_tried_against_at_most_four_keys() {
    let k = Keys::new();
    let backend = RawBackend::start(echo_frames()).await;
    let pk = k.rsa.to_public_key();
    let real = rsa_jwk(&pk.n().to_bytes_be(), &pk.e().to_bytes_be());
    let decoys: Vec<_> = (1..=4).map(|i| decoy_jwk(&k, i)).collect();
    let fifth =
        serde_json::json!({"keys": [&decoys[0], &decoys[1], &decoys[2], &decoys[3], &real]});
    let fourth =
        serde_json::json!({"keys": [&decoys[0], &decoys[1], &decoys[2], &real, &decoys[3]]});
    let dir = TempDir::new("jwt-kid");
    plugins::install(&dir.path().join("plugins"), &["jwt_validate.wasm"]);
    let gw = Gateway::start_in(
        dir,
        &format!(
            "{}{}{}",
            gateway_section("plugin_dir = \"plugins\""),
            rs256_api("fifth", &backend.url(), &fifth),
            rs256_api("fourth", &backend.url(), &fourth),
        ),
    );
    let addr = gw.ws.unwrap();
    let token = bearer(&rs256_without_kid(&k, &claims("ann")));
    let (head, _) = raw_handshake(addr, "/fifth", &token).await;
    assert_eq!(status_of(&head), 401, "the fifth key was tried: {head}");
    let (head, _) = raw_handshake(addr, "/fourth", &token).await;
    assert_eq!(status_of(&head), 101, "{head}");
    gw.wait_record("policy_log", |r| {
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("first 4 of 5 RS256 keys")
    })
    .await;
    // Five keys of one family: said at load.
    gw.wait_record("policy_log", |r| {
        r["level"] == "WARN"
            && r["message"]
                .as_str()
                .unwrap_or("")
                .contains("5 Rsa keys: a token is checked against at most 4")
    })
    .await;
}

#[tokio::test]
async fn failed_signature_checks_are_counted_by_plugin_algorithm_and_result() {
    let k = Keys::new();
    let backend = RawBackend::start(echo_frames()).await;
    let pk = k.rsa.to_public_key();
    let jwks = serde_json::json!({"keys": [rsa_jwk(&pk.n().to_bytes_be(), &pk.e().to_bytes_be())]});
    let dir = TempDir::new("jwt-metrics");
    plugins::install(&dir.path().join("plugins"), &["jwt_validate.wasm"]);
    let gw = Gateway::start_in(
        dir,
        &format!(
            "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
            gateway_section("plugin_dir = \"plugins\""),
            rs256_api("chat", &backend.url(), &jwks),
        ),
    );
    let (addr, admin) = (gw.ws.unwrap(), gw.admin.unwrap());
    let series = |result: &'static str| {
        [
            ("plugin", "jwt-validate"),
            ("algorithm", "RS256"),
            ("result", result),
        ]
    };
    const NAME: &str = "tollgate_signature_verifications_total";
    // The key probes jwt-validate makes while loading are not handshakes: nothing counted.
    let m = scrape(admin).await;
    assert_eq!(sample(&m, NAME, &series("invalid")), None);

    // A token whose signature was made over other claims.
    let good = rs256_without_kid(&k, &claims("ann"));
    let (h, rest) = good.split_once('.').unwrap();
    let sig = rest.split_once('.').unwrap().1;
    let forged = format!("{h}.{}.{sig}", b64(claims("root").to_string().as_bytes()));
    let (head, _) = raw_handshake(addr, "/chat", &bearer(&forged)).await;
    assert_eq!(status_of(&head), 401, "{head}");
    let m = scrape(admin).await;
    assert_eq!(sample(&m, NAME, &series("invalid")), Some(1.0));
    assert_eq!(sample(&m, NAME, &series("valid")), None);

    let (head, _) = raw_handshake(addr, "/chat", &bearer(&good)).await;
    assert_eq!(status_of(&head), 101, "{head}");
    let m = scrape(admin).await;
    assert_eq!(sample(&m, NAME, &series("valid")), Some(1.0));
    assert_eq!(sample(&m, NAME, &series("invalid")), Some(1.0));
}

#[tokio::test]
async fn jwt_validate_without_issuers_or_audiences_warns_at_check_and_at_load() {
    let k = Keys::new();
    let dir = TempDir::new("jwt-open");
    plugins::install(&dir.path().join("plugins"), &["jwt_validate.wasm"]);
    let pk = k.rsa.to_public_key();
    let jwks = serde_json::json!({"keys": [rsa_jwk(&pk.n().to_bytes_be(), &pk.e().to_bytes_be())]});
    let scoped = format!(
        "{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        rs256_api("chat", "ws://127.0.0.1:9/", &jwks)
    );
    let warning = "neither issuers nor audiences is set";
    let (code, err, _) = tollgate_check(dir.path(), &scoped);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains(warning), "{err}");
    let open = scoped
        .replace("issuers = [\"https://issuer.test\"]\n", "")
        .replace("audiences = [\"chat\"]\n", "");
    let (code, err, _) = tollgate_check(dir.path(), &open);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.lines()
            .any(|l| l.contains("WARN") && l.contains(warning) && l.contains("jwt-validate")),
        "{err}"
    );
    let gw = Gateway::start_in(dir, &open);
    gw.wait_record("policy_log", |r| {
        r["level"] == "WARN"
            && r["plugin"] == "jwt-validate"
            && r["message"].as_str().unwrap_or("").contains(warning)
    })
    .await;
}

/// The host remembers valid signatures (README, "signature cache"): a token seen before is a
/// cache hit, a bad signature is never remembered, expiry is still checked on a hit, and
/// `signature_cache_entries = 0` turns the cache off.
#[tokio::test]
async fn the_signature_cache_remembers_only_valid_signatures_and_never_skips_expiry() {
    const HITS: &str = "tollgate_signature_cache_hits_total";
    const MISSES: &str = "tollgate_signature_cache_misses_total";
    let k = Keys::new();
    let pk = k.rsa.to_public_key();
    let jwks = serde_json::json!({"keys": [rsa_jwk(&pk.n().to_bytes_be(), &pk.e().to_bytes_be())]});
    for entries in ["", "signature_cache_entries = 0\n"] {
        let on = entries.is_empty();
        let backend = RawBackend::start(echo_frames()).await;
        let dir = TempDir::new("jwt-cache");
        plugins::install(&dir.path().join("plugins"), &["jwt_validate.wasm"]);
        let gw = Gateway::start_in(
            dir,
            &format!(
                "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
                gateway_section(&format!("plugin_dir = \"plugins\"\n{entries}")),
                rs256_api("chat", &backend.url(), &jwks).replace(
                    "audiences = [\"chat\"]\n",
                    "audiences = [\"chat\"]\nclock_skew_seconds = 0\n"
                ),
            ),
        );
        let (addr, admin) = (gw.ws.unwrap(), gw.admin.unwrap());
        let total = || async move {
            let m = scrape(admin).await;
            (
                sample(&m, HITS, &[]).unwrap_or(0.0) as u64,
                sample(&m, MISSES, &[]).unwrap_or(0.0) as u64,
            )
        };
        // The key probes jwt-validate makes while loading go through the cache too.
        let at_load = total().await;
        let counts = || async move {
            let (h, m) = total().await;
            (h - at_load.0, m - at_load.1)
        };
        // Expires in a few seconds.
        let exp = now() + 4;
        let token = rs256_without_kid(&k, &{
            let mut c = claims("ann");
            c["exp"] = exp.into();
            c
        });
        for _ in 0..2 {
            let (head, _) = raw_handshake(addr, "/chat", &bearer(&token)).await;
            assert_eq!(status_of(&head), 101, "{head}");
        }
        // The second one was answered from the cache.
        assert_eq!(
            counts().await,
            if on { (1, 1) } else { (0, 0) },
            "cache on: {on}"
        );
        // A forged signature is checked every time (never remembered).
        let (h, rest) = token.split_once('.').unwrap();
        let sig = rest.split_once('.').unwrap().1;
        let forged = format!("{h}.{}.{sig}", b64(claims("root").to_string().as_bytes()));
        for _ in 0..2 {
            let (head, _) = raw_handshake(addr, "/chat", &bearer(&forged)).await;
            assert_eq!(status_of(&head), 401, "{head}");
        }
        assert_eq!(
            counts().await,
            if on { (1, 3) } else { (0, 0) },
            "cache on: {on}"
        );
        // Once the token has expired, its remembered signature does not let it in.
        while now() <= exp {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let logged = gw.records("policy_log").len();
        let (head, _) = raw_handshake(addr, "/chat", &bearer(&token)).await;
        assert_eq!(status_of(&head), 401, "{head}");
        assert_eq!(
            counts().await,
            if on { (2, 3) } else { (0, 0) },
            "cache on: {on}"
        );
        wait_until("the refusal's reason", || {
            gw.records("policy_log").len() > logged
        })
        .await;
        assert_eq!(
            gw.records("policy_log")[logged]["message"],
            "token refused: token expired"
        );
    }
}
