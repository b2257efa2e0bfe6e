//! Policies written in other languages than Rust, built from source in the test run and
//! loaded through the same checks: the Python example (`examples/origin-check-py`, built
//! with componentize-py) allows and refuses handshakes through the real gateway.

mod support;

use std::sync::atomic::Ordering;

use support::*;

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
