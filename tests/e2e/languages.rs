//! Policies written in other languages than Rust, built from source in the test run and
//! loaded through the same checks: the Python example (`examples/origin-check-py`, built with
//! componentize-py) and the JavaScript one (`examples/tenant-route-js`, built with
//! componentize-js) allow and refuse handshakes through the real gateway; the Python message
//! policy (`examples/type-filter-py`) drops or refuses messages by their JSON `type`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;

fn origin_check(extra: &str) -> String {
    format!(
        r#"[[apis.on_handshake]]
plugin = "origin-check"
instances = "pooled"
{extra}
[apis.on_handshake.config]
allowed_origins = ["https://app.example"]
"#
    )
}

fn install_python(dir: &std::path::Path) {
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        plugins::python_origin_check(),
        plugins.join("origin_check.wasm"),
    )
    .unwrap();
}

#[tokio::test]
async fn python_origin_check_allows_listed_origins_and_refuses_the_rest() {
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("python");
    install_python(dir.path());
    let gw = Gateway::start_in(
        dir,
        &format!(
            "{}{}",
            gateway_section("plugin_dir = \"plugins\""),
            api_section("chat", "chat", &backend.url(), &origin_check(""))
        ),
    );
    let addr = gw.ws.unwrap();

    // Allowed (case-insensitively): 101, and frames flow.
    let (_, mut ws) = ws_connect(addr, "/chat", "Origin: https://APP.example\r\n").await;
    ws.send(true, 1, b"hi").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
    let reached = backend.connections.load(Ordering::SeqCst);

    // Another site, and no Origin at all: 403 from the policy, backend never contacted.
    for (what, extra) in [
        ("other origin", "Origin: https://evil.example\r\n"),
        ("no origin", ""),
    ] {
        let (head, _) = raw_handshake(addr, "/chat", extra).await;
        assert_eq!(status_of(&head), 403, "{what}: {head}");
        assert_eq!(
            header(&head, "content-type").as_deref(),
            Some("text/plain"),
            "{what}: {head}"
        );
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), reached);
    // The policy says why, under its own name.
    gw.wait_record("policy_log", |r| {
        r["plugin"] == "origin-check"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("'https://evil.example' is not allowed"))
    })
    .await;
    gw.wait_record("policy_log", |r| {
        r["plugin"] == "origin-check"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("no Origin header"))
    })
    .await;
}

#[test]
fn python_policy_config_errors_and_inspect() {
    let dir = TempDir::new("python-check");
    install_python(dir.path());
    let text = format!(
        "{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("chat", "chat", "ws://127.0.0.1:9/", &origin_check("")).replace(
            "allowed_origins = [\"https://app.example\"]",
            "allowed_origins = [\"app.example\"]"
        )
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("origin-check") && err.contains("`app.example` is not an origin"),
        "{err}"
    );

    let (code, out, err) = inspect(&dir.path().join("plugins").join("origin_check.wasm"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("plugin:       origin-check 0.1.0"), "{out}");
    // An interpreter-based component imports more of WASI than a Rust one; all of it is
    // served deny-by-default.
    assert!(out.contains("wasi:filesystem/preopens"), "{out}");
    assert!(out.contains("wasi:sockets/"), "{out}");
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

const SECRET: &[u8] = b"the tenant-route test's HS256 secret";

fn hs256_token(claims: serde_json::Value) -> String {
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#),
        b64(claims.to_string().as_bytes())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET);
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(sig.as_ref()))
}

fn claims(extra: serde_json::Value) -> serde_json::Value {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let mut c =
        serde_json::json!({"sub": "ann", "iss": "https://issuer.test", "aud": "chat", "exp": exp});
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    c
}

/// jwt-validate (Rust) puts the token's `tenant` claim into the context; tenant-route (JS)
/// turns it and the `region` query parameter into the backend's routing header.
#[tokio::test]
async fn js_tenant_route_derives_the_backend_header_from_a_claim_and_the_query() {
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("js");
    let plugin_dir = dir.path().join("plugins");
    plugins::install(&plugin_dir, &["jwt_validate.wasm"]);
    std::fs::copy(
        plugins::js_tenant_route(),
        plugin_dir.join("tenant_route.wasm"),
    )
    .unwrap();
    let jwks =
        serde_json::json!({"keys": [{"kty": "oct", "kid": "k1", "k": b64(SECRET)}]}).to_string();
    let policies = format!(
        r#"[[apis.on_handshake]]
plugin = "jwt-validate"
[apis.on_handshake.config]
algorithms = ["HS256"]
issuers = ["https://issuer.test"]
audiences = ["chat"]
jwks = {}

[[apis.on_handshake]]
plugin = "tenant-route"
instances = "pooled"
[apis.on_handshake.config]
regions = ["eu", "us"]
"#,
        serde_json::to_string(&jwks).unwrap()
    );
    let gw = Gateway::start_in(
        dir,
        &format!(
            "{}{}",
            gateway_section("plugin_dir = \"plugins\""),
            api_section("chat", "chat", &backend.url(), &policies)
        ),
    );
    let addr = gw.ws.unwrap();
    let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");
    let acme = bearer(&hs256_token(claims(serde_json::json!({"tenant": "acme"}))));

    let (_, mut ws) = ws_connect(addr, "/chat?region=us&room=1", &acme).await;
    ws.send(true, 1, b"hi").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
    let seen = backend.last_head();
    assert_eq!(
        header(&seen, "x-tenant-route").as_deref(),
        Some("acme.us"),
        "{seen}"
    );
    let request_line = seen.lines().next().unwrap_or_default();
    assert!(
        request_line.contains("room=1") && !request_line.contains("region"),
        "{request_line}"
    );

    let reached = backend.connections.load(Ordering::SeqCst);
    let no_tenant = bearer(&hs256_token(claims(serde_json::json!({}))));
    for (what, path, extra, status) in [
        ("unknown region", "/chat?region=mars", acme.as_str(), 400),
        ("no region and no default", "/chat", acme.as_str(), 400),
        (
            "no tenant claim",
            "/chat?region=eu",
            no_tenant.as_str(),
            403,
        ),
        (
            "no token: jwt-validate refuses first",
            "/chat?region=eu",
            "",
            401,
        ),
    ] {
        let (head, _) = raw_handshake(addr, path, extra).await;
        assert_eq!(status_of(&head), status, "{what}: {head}");
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), reached);
    gw.wait_record("policy_log", |r| {
        r["plugin"] == "tenant-route"
            && r["message"]
                .as_str()
                .is_some_and(|m| m.contains("region \"mars\" refused"))
    })
    .await;
}

#[test]
fn js_policy_imports_no_wasi_and_its_config_errors_stop_the_check() {
    let dir = TempDir::new("js-check");
    let plugin_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let file = plugin_dir.join("tenant_route.wasm");
    std::fs::copy(plugins::js_tenant_route(), &file).unwrap();
    let (code, out, err) = inspect(&file);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("plugin:       tenant-route 0.1.0"), "{out}");
    assert!(
        !out.contains("wasi:"),
        "a pure JS component imports no WASI: {out}"
    );

    let text = format!(
        "{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section(
            "chat",
            "chat",
            "ws://127.0.0.1:9/",
            "[[apis.on_handshake]]\nplugin = \"tenant-route\"\nconfig = { regions = [\"eu\"], default_region = \"us\" }\n"
        )
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("tenant-route") && err.contains("default_region: `us` is not one of regions"),
        "{err}"
    );
}

/// The Python message policy (`examples/type-filter-py`): the backend gets the client's JSON
/// messages of an allowed `type` and nothing else (dropped, counted); with `action = "close"`
/// the sender of a forbidden one gets 1008 naming its type.
#[tokio::test]
async fn python_message_policy_filters_message_types() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    for action in ["drop", "close"] {
        let dir = TempDir::new("python-messages");
        let plugins = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::copy(
            plugins::python_type_filter(),
            plugins.join("type_filter.wasm"),
        )
        .unwrap();
        let gw = Gateway::start_in(
            dir,
            &format!(
                "{}{}[[apis.on_message]]\nplugin = \"type-filter\"\ndirection = \"client\"\ninstances = \"pooled\"\n\
                 config = {{ allowed_types = [\"chat\"], action = \"{action}\" }}\n",
                gateway_section("plugin_dir = \"plugins\""),
                api_section("chat", "chat", &backend.url(), ""),
            ),
        );
        let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/chat", "").await;
        ws.send(true, 1, br#"{"type":"chat","text":"hi"}"#)
            .await
            .unwrap();
        ws.send(true, 1, br#"{"type":"admin","cmd":"shutdown"}"#)
            .await
            .unwrap();
        ws.send(true, 1, br#"{"type":"chat","text":"again"}"#)
            .await
            .unwrap();
        ws.send(true, 8, &1000u16.to_be_bytes()).await.unwrap();
        let f = ws.read_until_close().await.unwrap();
        let mut got = Vec::new();
        while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
            let close = f.opcode == 8;
            got.push(f);
            if close {
                break;
            }
        }
        let texts: Vec<String> = got
            .iter()
            .filter(|f| f.opcode == 1)
            .map(|f| String::from_utf8_lossy(&f.payload).into_owned())
            .collect();
        match action {
            "drop" => {
                assert_eq!(f.close_code(), Some(1000), "{f:?}");
                assert_eq!(
                    texts,
                    [
                        r#"{"type":"chat","text":"hi"}"#,
                        r#"{"type":"chat","text":"again"}"#
                    ]
                );
            }
            _ => {
                assert_eq!(f.close_code(), Some(1008), "{f:?}");
                assert_eq!(f.close_reason(), "message type admin not allowed");
                assert_eq!(texts, [r#"{"type":"chat","text":"hi"}"#]);
                assert_eq!(
                    got.last().and_then(Frame::close_code),
                    Some(1001),
                    "{got:?}"
                );
            }
        }
    }
}
