//! `plugins/check-header` through the real gateway: API Management's check-header on the
//! WebSocket onHandshake. A handshake with the header (and, when values are listed, one of
//! them) is relayed; any other gets the attachment's own status and message, is logged with
//! the header's name but never its value, and never reaches the backend.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::support::*;

/// The API key check most tests use: `X-Api-Key` must be `k1` or `k2`.
const KEY: &str = "{ name = \"X-Api-Key\", failed_check_httpcode = 401, failed_check_error_message = \"Missing or invalid API key\", values = [\"k1\", \"k2\"] }";

fn attach(config: &str) -> String {
    format!("[[apis.on_handshake]]\nplugin = \"check-header\"\nconfig = {config}\n")
}

/// A manifest with one API per `(name, check-header config)`, each served at `/<name>`.
fn manifest(backend: &str, apis: &[(&str, &str)]) -> String {
    let mut text = gateway_section("plugin_dir = \"plugins\"");
    for (name, config) in apis {
        text.push_str(&api_section(name, name, backend, &attach(config)));
    }
    text
}

fn start(backend: &RawBackend, apis: &[(&str, &str)]) -> Gateway {
    let dir = TempDir::new("check-header");
    plugins::install(&dir.path().join("plugins"), &["check_header.wasm"]);
    Gateway::start_in(dir, &manifest(&backend.url(), apis))
}

/// Everything the client received for a refused handshake: head and body.
async fn answer(addr: std::net::SocketAddr, path: &str, extra: &str) -> String {
    let (head, mut ws) = raw_handshake(addr, path, extra).await;
    let mut rest = ws.buf.clone();
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.io.read_to_end(&mut rest)).await;
    format!("{head}{}", String::from_utf8_lossy(&rest))
}

/// A handshake with the header and a listed value is relayed (the header's name in any case,
/// the header repeated, or a comma-separated list holding a listed value), frames flow both
/// ways and the backend gets the header; the same gateway refuses a value that is not listed,
/// so it is the check that let them through.
#[tokio::test]
async fn a_listed_value_opens_the_connection_and_frames_flow() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend, &[("chat", KEY)]);
    let addr = gw.ws.unwrap();
    let (head, mut ws) = ws_connect(addr, "/chat", "X-API-KEY: k2\r\n").await;
    assert_eq!(status_of(&head), 101, "{head}");
    ws.send(true, 1, b"hello").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hello");
    assert_eq!(headers_all(&backend.last_head(), "x-api-key"), vec!["k2"]);
    for extra in [
        "x-api-key: nope\r\nx-api-key: k1\r\n",
        "x-api-key: nope, k1\r\n",
    ] {
        let (head, mut ws) = ws_connect(addr, "/chat", extra).await;
        ws.send(true, 2, b"\x01\x02").await.unwrap();
        assert_eq!(
            ws.read_frame().await.unwrap().payload,
            b"\x01\x02",
            "{head}"
        );
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 3);

    let got = answer(addr, "/chat", "x-api-key: k3\r\n").await;
    assert_eq!(status_of(&got), 401, "{got}");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 3);
}

/// Without the header the client gets exactly the configured status and message (text/plain),
/// the backend is never contacted, the handshake record names the plugin, and the policy log
/// names the header and the failed check. A presence-only check (no `values`) with another
/// status lets any value through.
#[tokio::test]
async fn a_missing_header_gets_the_configured_status_and_message_and_never_reaches_the_backend() {
    let backend = RawBackend::start(echo_frames()).await;
    let presence = "{ name = \"X-Team\", failed_check_httpcode = 403, failed_check_error_message = \"Say which team you are on\" }";
    let gw = start(&backend, &[("chat", KEY), ("team", presence)]);
    let addr = gw.ws.unwrap();

    let got = answer(addr, "/chat", "X-Other: k1\r\n").await;
    assert_eq!(status_of(&got), 401, "{got}");
    assert!(
        header(&got, "content-type")
            .unwrap_or_default()
            .starts_with("text/plain"),
        "{got}"
    );
    assert!(got.ends_with("\r\n\r\nMissing or invalid API key"), "{got}");
    let hs = gw
        .wait_record("handshake", |r| r["api"] == "chat" && r["status"] == 401)
        .await;
    assert!(
        hs["reason"]
            .as_str()
            .unwrap_or("")
            .contains("rejected by policy `check-header`"),
        "{hs}"
    );
    gw.wait_record("policy_log", |r| {
        r["plugin"] == "check-header" && r["message"] == "header `X-Api-Key` is absent"
    })
    .await;

    let got = answer(addr, "/team", "").await;
    assert_eq!(status_of(&got), 403, "{got}");
    assert!(got.ends_with("\r\n\r\nSay which team you are on"), "{got}");
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        0,
        "a refused handshake reached the backend"
    );

    let (head, mut ws) = ws_connect(addr, "/team", "x-team: anything at all\r\n").await;
    assert_eq!(status_of(&head), 101, "{head}");
    ws.send(true, 1, b"in").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"in");
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
}

/// A value that is not listed (or only a prefix of one, or on every line something else) is
/// refused like an absent header; what the client sent never appears in the gateway's log,
/// only the header's name and which check failed.
#[tokio::test]
async fn a_value_not_listed_is_refused_and_never_logged() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend, &[("chat", KEY)]);
    let addr = gw.ws.unwrap();
    for extra in [
        "X-Api-Key: hunter2-secret\r\n",
        "X-Api-Key: k\r\n",
        "X-Api-Key: k1k2\r\n",
        "X-Api-Key: hunter2-secret\r\nX-Api-Key: hunter3-secret\r\n",
        "X-Api-Key: hunter2-secret, hunter3-secret\r\n",
    ] {
        let got = answer(addr, "/chat", extra).await;
        assert_eq!(status_of(&got), 401, "{extra}: {got}");
        assert!(got.ends_with("Missing or invalid API key"), "{got}");
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);
    gw.wait_record("policy_log", |r| {
        r["plugin"] == "check-header"
            && r["message"] == "header `X-Api-Key` (2 lines) has none of the 2 allowed values"
    })
    .await;
    wait_until("five refusals logged", || {
        gw.records("handshake")
            .iter()
            .filter(|r| r["status"] == 401)
            .count()
            == 5
    })
    .await;
    let log = gw.output();
    assert!(
        !log.contains("hunter2") && !log.contains("hunter3"),
        "a header value reached the log:\n{log}"
    );
}

/// `ignore_case = true` matches a value whatever its (ASCII) case; the default, and `false`,
/// match only the value exactly as listed.
#[tokio::test]
async fn ignore_case_decides_whether_the_values_case_matters() {
    let backend = RawBackend::start(echo_frames()).await;
    let tier = |ignore_case: &str| {
        format!(
            "{{ name = \"X-Tier\", failed_check_httpcode = 403, failed_check_error_message = \"gold only\", {ignore_case}values = [\"Gold\"] }}"
        )
    };
    let (default, strict, loose) = (
        tier(""),
        tier("ignore_case = false, "),
        tier("ignore_case = true, "),
    );
    let gw = start(
        &backend,
        &[
            ("default", &default),
            ("strict", &strict),
            ("loose", &loose),
        ],
    );
    let addr = gw.ws.unwrap();
    for api in ["default", "strict", "loose"] {
        let (head, _ws) = ws_connect(addr, &format!("/{api}"), "x-tier: Gold\r\n").await;
        assert_eq!(status_of(&head), 101, "{api}: {head}");
    }
    for api in ["default", "strict"] {
        for v in ["GOLD", "gold"] {
            let got = answer(addr, &format!("/{api}"), &format!("x-tier: {v}\r\n")).await;
            assert_eq!(status_of(&got), 403, "{api} {v}: {got}");
            assert!(got.ends_with("gold only"), "{got}");
        }
    }
    for v in ["GOLD", "gold", "gOlD"] {
        let (head, mut ws) = ws_connect(addr, "/loose", &format!("x-tier: {v}\r\n")).await;
        assert_eq!(status_of(&head), 101, "{v}: {head}");
        ws.send(true, 1, v.as_bytes()).await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, v.as_bytes());
    }
    let got = answer(addr, "/loose", "x-tier: silver\r\n").await;
    assert_eq!(status_of(&got), 403, "{got}");
    gw.wait_record("policy_log", |r| {
        r["message"] == "header `X-Tier` (1 line) has none of the 1 allowed value (ignoring case)"
    })
    .await;
}

/// A config the plugin cannot honour stops `tollgate check` with the plugin's own message; the
/// same manifest with a good config passes.
#[test]
fn a_bad_config_fails_tollgate_check_with_the_plugins_message() {
    let dir = TempDir::new("check-header-badcfg");
    plugins::install(&dir.path().join("plugins"), &["check_header.wasm"]);
    let backend = "ws://127.0.0.1:1/";
    let (code, err, _) = tollgate_check(dir.path(), &manifest(backend, &[("chat", KEY)]));
    assert_eq!(code, 0, "{err}");
    let cases = [
        (
            KEY.replace("401", "200"),
            "failed_check_httpcode must be between 400 and 599, got 200",
        ),
        (
            KEY.replace("X-Api-Key", "X Api Key"),
            "name \"X Api Key\" is not a valid header name",
        ),
        (KEY.replace("X-Api-Key", ""), "name must not be empty"),
        (
            KEY.replace("values", "value"),
            "unknown field `value`, expected one of",
        ),
        (
            "{ name = \"X-Api-Key\", failed_check_httpcode = 401 }".to_owned(),
            "missing field `failed_check_error_message`",
        ),
        (
            KEY.replace("\"k2\"", "\"\""),
            "values[1] can never match: it is empty",
        ),
    ];
    for (config, want) in cases {
        let (code, err, _) = tollgate_check(dir.path(), &manifest(backend, &[("chat", &config)]));
        assert_eq!(code, 1, "{config}: {err}");
        assert!(
            err.contains("plugin `check-header` refused its config") && err.contains(want),
            "{config}: wanted {want:?} in:\n{err}"
        );
    }
}
