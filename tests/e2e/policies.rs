//! onHandshake policies through the real gateway: plugins built from source for
//! wasm32-wasip2, loaded from plugin_dir, changing the backend request.

mod support;

use support::*;

fn manifest(backend: &str, attachments: &str) -> String {
    format!(
        "{}{}{attachments}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("echo", "echo", backend, "")
    )
}

fn set_header(name: &str, value: &str, action: &str) -> String {
    format!(
        "[[apis.on_handshake]]\nplugin = \"set-header\"\nconfig = {{ name = \"{name}\", value = \"{value}\", exists_action = \"{action}\" }}\n"
    )
}

fn start(backend: &RawBackend, attachments: &str) -> Gateway {
    let dir = TempDir::new("policies");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    Gateway::start_in(dir, &manifest(&backend.url(), attachments))
}

#[tokio::test]
async fn set_header_exists_actions_reach_the_backend() {
    let backend = RawBackend::start(echo_frames()).await;
    let attachments = [
        set_header("X-Override", "gw", "override"),
        set_header("X-Skip", "gw", "skip"),
        set_header("X-Skip-Absent", "gw", "skip"),
        set_header("X-Append", "gw", "append"),
        set_header("X-Delete", "", "delete"),
    ]
    .concat();
    let gw = start(&backend, &attachments);
    let (_, mut ws) = ws_connect(
        gw.ws.unwrap(),
        "/echo",
        "X-Override: client\r\nX-Skip: client\r\nX-Append: client\r\nX-Delete: client\r\n",
    )
    .await;
    ws.send(true, 1, b"hi").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
    let seen = backend.last_head();
    assert_eq!(headers_all(&seen, "x-override"), vec!["gw"]);
    assert_eq!(headers_all(&seen, "x-skip"), vec!["client"]);
    assert_eq!(headers_all(&seen, "x-skip-absent"), vec!["gw"]);
    assert_eq!(headers_all(&seen, "x-append"), vec!["client", "gw"]);
    assert!(headers_all(&seen, "x-delete").is_empty(), "{seen}");
}

#[tokio::test]
async fn changing_a_protected_header_fails_the_handshake_visibly() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend, &set_header("Host", "evil.example", "override"));
    let (head, _) = raw_handshake(gw.ws.unwrap(), "/echo", "").await;
    assert_eq!(status_of(&head), 500, "{head}");
    let rec = gw.wait_record("policy_error", |_| true).await;
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("protected header `host`"),
        "{rec}"
    );
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

fn check(dir: &TempDir, manifest_text: &str) -> (i32, String) {
    let (code, err, _) = tollgate_check(dir.path(), manifest_text);
    (code, err)
}

#[test]
fn bad_plugin_config_fails_with_the_plugins_own_message() {
    let dir = TempDir::new("badcfg");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let (code, err) = check(
        &dir,
        &manifest("ws://127.0.0.1:1/", &set_header("X-A", "v", "sometimes")),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("plugin `set-header` refused its config") && err.contains("sometimes"),
        "{err}"
    );
}

#[test]
fn unknown_plugin_is_named() {
    let dir = TempDir::new("unknown");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let (code, err) = check(
        &dir,
        &manifest(
            "ws://127.0.0.1:1/",
            "[[apis.on_handshake]]\nplugin = \"jwt-validate\"\n",
        ),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("plugin `jwt-validate` (attached at API `echo` onHandshake) was not found"),
        "{err}"
    );
}

#[test]
fn plugin_importing_an_interface_we_do_not_offer_is_refused_with_the_import_named() {
    let dir = TempDir::new("foreign");
    plugins::install(
        &dir.path().join("plugins"),
        &["set_header.wasm", "foreign_import.wasm"],
    );
    let (code, err) = check(
        &dir,
        &manifest("ws://127.0.0.1:1/", &set_header("X-A", "v", "override")),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("foreign_import.wasm: imports `test:foreign/net`, which the handshake scope does not offer"),
        "{err}"
    );
}
