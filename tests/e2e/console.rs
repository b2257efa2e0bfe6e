//! The test consoles: the web page at `/console` driven in headless Chromium.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

#[tokio::test]
async fn web_console_connects_sends_sees_the_echo_disconnects_and_shows_a_refusal() {
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("console");
    plugins::install(&dir.path().join("plugins"), &["jwt_validate.wasm"]);
    let text = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("echo", "echo", &backend.url(), ""),
        api_section(
            "locked",
            "locked",
            &backend.url(),
            "[[apis.on_handshake]]\nplugin = \"jwt-validate\"\n[apis.on_handshake.config]\nalgorithms = [\"HS256\"]\nquery_parameter_name = \"access_token\"\njwks = '{\"keys\": [{\"kty\": \"oct\", \"kid\": \"k\", \"k\": \"dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IG9mIGVub3VnaCBsZW5ndGg\"}]}'\n"
        )
    );
    let gw = Gateway::start_in(dir, &text);
    let admin = gw.admin.unwrap();

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let artifacts = root.join("target").join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("web-console.png");
    let _ = std::fs::remove_file(&shot);
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} not found: install Debian's `chromium` package (scripts/test does, as root) or set CHROMIUM"
    );
    let script = root.join("tests").join("console").join("web-console.cjs");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(format!("http://{admin}"))
            .arg(&shot)
            .env(
                "NODE_PATH",
                root.join("target").join("js").join("node_modules"),
            )
            .env("CHROMIUM", chromium)
            .output()
            .expect("run node (scripts/test installs playwright-core into target/js)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.output()
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        r["received"]
            .as_str()
            .unwrap()
            .ends_with("\u{2190} hello from chromium"),
        "{r}"
    );
    assert!(
        r["receivedBinary"]
            .as_str()
            .unwrap()
            .ends_with("[binary 3 B] 01 ff 7e"),
        "{r}"
    );
    assert_eq!(r["closed"], "closed (1000 console disconnect)", "{r}");
    assert_eq!(r["refused"], "handshake refused: 401", "{r}");
    assert!(
        r["refusedLog"].as_str().unwrap().contains("HTTP 401"),
        "{r}"
    );
    assert!(artifacts.join("web-console.png").exists());

    // The browser's session went through the gateway like any client's.
    let ok = gw
        .wait_record("handshake", |h| h["api"] == "echo" && h["status"] == 101)
        .await;
    let closed = gw
        .wait_record("connection_closed", |c| c["conn"] == ok["conn"])
        .await;
    assert_eq!(closed["close_code"], 1000);
    assert_eq!(closed["client_messages"], 2);
    assert_eq!(
        backend.last_head().lines().next().unwrap_or_default(),
        "GET /?room=1 HTTP/1.1"
    );
}
