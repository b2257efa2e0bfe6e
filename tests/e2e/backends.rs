//! Named backends and set-backend-service through the real gateway: jwt-validate puts the
//! token's `region` claim into the context, set-backend-service picks the API's backend of that
//! name, and the handshake (path, query, Host) goes there; a name the manifest does not list is
//! refused without contacting any backend; no pick goes to the API's own `backend`.

use std::sync::atomic::Ordering;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::support::*;

const SECRET: &[u8] = b"a test secret of a decent length!!";

/// An HS256 token for subject `sub` with `extra` claims.
fn token(sub: &str, extra: serde_json::Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut claims = serde_json::json!({"sub": sub, "aud": "chat", "exp": now + 600});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","kid":"k","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(sig.as_ref()))
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}\r\n")
}

#[tokio::test]
async fn a_policy_picks_a_named_backend_from_a_claim_and_only_those_the_manifest_lists() {
    let main = RawBackend::start(echo_frames()).await;
    let eu = RawBackend::start(echo_frames()).await;
    let us = RawBackend::start(echo_frames()).await;
    let jwks = serde_json::json!({"keys": [{"kty": "oct", "kid": "k", "k": URL_SAFE_NO_PAD.encode(SECRET)}]});
    let text = format!(
        "{}{}",
        gateway_section("plugin_dir = \"plugins\"\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
        api_section(
            "chat",
            "chat",
            &main.url(),
            &format!(
                "backends = {{ eu = \"ws://{}/eu-side\", us = \"{}\" }}\n\
                 [[apis.on_handshake]]\nplugin = \"jwt-validate\"\n\
                 [apis.on_handshake.config]\nalgorithms = [\"HS256\"]\naudiences = [\"chat\"]\njwks = {}\n\
                 [[apis.on_handshake]]\nplugin = \"set-backend-service\"\n\
                 config = {{ backend_id = \"{{jwt.region}}\" }}\n",
                eu.addr,
                us.url(),
                serde_json::to_string(&jwks.to_string()).unwrap()
            )
        )
    );
    let dir = TempDir::new("backends");
    plugins::install(
        &dir.path().join("plugins"),
        &["jwt_validate.wasm", "set_backend_service.wasm"],
    );
    let gw = Gateway::start_in(dir, &text);
    let addr = gw.ws.unwrap();

    // region eu: the eu backend gets it, under its own path, with the client's query.
    let t = token("ann", serde_json::json!({"region": "eu"}));
    let (head, mut ws) = ws_connect(addr, "/chat/room?x=1", &bearer(&t)).await;
    assert_eq!(status_of(&head), 101, "{head}");
    ws.send(true, 1, b"to eu").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"to eu");
    assert_eq!(eu.connections.load(Ordering::SeqCst), 1);
    let seen = eu.last_head();
    assert!(seen.starts_with("GET /eu-side/room?x=1 HTTP/1.1"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains(&format!("host: {}", eu.addr)),
        "{seen}"
    );
    let rec = gw.wait_record("handshake", |r| r["status"] == 101).await;
    assert_eq!(rec["backend"], format!("ws://{}/eu-side", eu.addr), "{rec}");

    // region us: the us backend.
    let t = token("bob", serde_json::json!({"region": "us"}));
    let (head, _ws2) = ws_connect(addr, "/chat", &bearer(&t)).await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(us.connections.load(Ordering::SeqCst), 1);

    // No region: nothing picked, the API's own backend.
    let t = token("cy", serde_json::json!({}));
    let (head, _ws3) = ws_connect(addr, "/chat", &bearer(&t)).await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(main.connections.load(Ordering::SeqCst), 1);

    // A name the manifest does not list: refused, no backend contacted.
    let t = token("eve", serde_json::json!({"region": "mars"}));
    let (head, _) = raw_handshake(addr, "/chat", &bearer(&t)).await;
    assert_eq!(status_of(&head), 500, "{head}");
    let err = gw
        .wait_record("policy_error", |r| r["plugin"] == "set-backend-service")
        .await;
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("picked backend `mars`, which this API does not have"),
        "{err}"
    );
    let total = main.connections.load(Ordering::SeqCst)
        + eu.connections.load(Ordering::SeqCst)
        + us.connections.load(Ordering::SeqCst);
    assert_eq!(total, 3, "the refused handshake reached a backend");

    // Metrics count the upgrades by backend.
    let s = scrape(gw.admin.unwrap()).await;
    for (backend, n) in [("eu", 1.0), ("us", 1.0), ("default", 1.0)] {
        assert_eq!(
            sample(
                &s,
                "tollgate_backend_upgrades_total",
                &[("api", "chat"), ("backend", backend)]
            ),
            Some(n),
            "{backend}"
        );
    }

    // The close record names the backend the connection went to.
    ws.close(1000, "").await.unwrap();
    let closed = gw
        .wait_record("connection_closed", |r| {
            r["backend"] == format!("ws://{}/eu-side", eu.addr)
        })
        .await;
    assert_eq!(closed["api"], "chat");
}

#[test]
fn a_backend_name_or_url_the_manifest_cannot_use_fails_the_check() {
    let dir = TempDir::new("backends-bad");
    let text = format!(
        "{}{}",
        gateway_section(""),
        api_section(
            "chat",
            "chat",
            "ws://127.0.0.1:1/",
            "backends = { eu = \"http://x/\" }"
        )
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("apis[0].backends.eu"), "{err}");
}
