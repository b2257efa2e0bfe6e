//! What `tollgate:policy@0.2.0` promises, through the real gateway: a policy's "could not
//! decide" error becomes the attachment's `failure_status` (the message is logged, never sent),
//! `close-at` ends the connection with 1008 when it comes, the request is read on demand and
//! only with the capability each read needs, and a plugin built against 0.1 is refused with its
//! version named.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::support::*;

/// A gateway with one API per `(name, faulty config)`, each through the `faulty` plugin.
fn faulty_gateway(backend: &RawBackend, apis: &[(&str, &str)]) -> Gateway {
    let mut text = gateway_section("plugin_dir = \"plugins\"");
    for (name, config) in apis {
        text.push_str(&api_section(
            name,
            name,
            &backend.url(),
            &format!(
                "[[apis.on_handshake]]\nplugin = \"faulty\"\nfailure_status = 503\nconfig = {config}\n"
            ),
        ));
    }
    let dir = TempDir::new("wit-v2");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    Gateway::start_in(dir, &text)
}

/// Everything the client received for a refused handshake: head and body.
async fn answer(addr: std::net::SocketAddr, path: &str) -> String {
    let (head, mut ws) = raw_handshake(addr, path, "").await;
    let mut rest = ws.buf.clone();
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.io.read_to_end(&mut rest)).await;
    format!("{head}{}", String::from_utf8_lossy(&rest))
}

#[tokio::test]
async fn a_policy_that_cannot_decide_gets_failure_status_and_its_error_is_only_logged() {
    use std::sync::atomic::Ordering;
    let backend = RawBackend::start(echo_frames()).await;
    let gw = faulty_gateway(
        &backend,
        &[(
            "err",
            "{ mode = \"error\", arg = \"db password is hunter2\" }",
        )],
    );
    let got = answer(gw.ws.unwrap(), "/err").await;
    assert_eq!(status_of(&got), 503, "{got}");
    assert!(
        !got.contains("hunter2"),
        "the policy's error reached the client: {got}"
    );
    let rec = gw.wait_record("policy_error", |r| r["api"] == "err").await;
    assert_eq!(rec["plugin"], "faulty", "{rec}");
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("could not decide: db password is hunter2"),
        "{rec}"
    );
    let hs = gw
        .wait_record("handshake", |r| r["api"] == "err" && r["status"] == 503)
        .await;
    assert!(
        hs["reason"]
            .as_str()
            .unwrap()
            .contains("policy `faulty` failed"),
        "{hs}"
    );
    assert_eq!(backend.connections.load(Ordering::SeqCst), 0);
}

/// `close-at` one second after the handshake: the connection relays until then, and then the
/// client gets close 1008 and the record says `policy_deadline`. A `close-at` that is not in
/// the future fails the handshake instead.
#[tokio::test]
async fn close_at_ends_the_connection_with_1008_when_it_comes() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = faulty_gateway(
        &backend,
        &[
            ("soon", "{ mode = \"close-in\", arg = \"2\" }"),
            ("past", "{ mode = \"close-in\", arg = \"0\" }"),
            (
                "never",
                "{ mode = \"close-at\", arg = \"18446744073709551615\" }",
            ),
        ],
    );
    let addr = gw.ws.unwrap();
    let opened = Instant::now();
    let (head, mut ws) = ws_connect(addr, "/soon", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    ws.send(true, 1, b"still open").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"still open");
    let close = tokio::time::timeout(Duration::from_secs(10), ws.read_frame())
        .await
        .expect("no close within 10 s of a 2 s deadline")
        .unwrap();
    assert_eq!(close.close_code(), Some(1008), "{close:?}");
    // Whole seconds: the deadline is at least one second after the handshake was received.
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    let rec = gw
        .wait_record("connection_closed", |r| r["api"] == "soon")
        .await;
    assert_eq!(rec["closed_by"], "policy_deadline", "{rec}");
    assert_eq!(rec["close_code"], 1008, "{rec}");

    // A deadline at the end of time (a token that "never expires") is no deadline: the
    // connection opens and relays (it once overflowed the clock arithmetic after the backend's
    // 101).
    let (head, mut forever) = ws_connect(addr, "/never", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    forever.send(true, 1, b"still here").await.unwrap();
    assert_eq!(forever.read_frame().await.unwrap().payload, b"still here");

    let (head, _) = raw_handshake(addr, "/past", "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    let err = gw.policy_error("past").await;
    assert!(
        err.contains("is not after the handshake's received-at"),
        "{err}"
    );
}

/// Reads of the request are bounded per call: a policy reading its headers a million times is
/// stopped by the 4 MiB read budget (the call fails, the handshake gets `failure_status`), while
/// ten reads pass.
#[tokio::test]
async fn a_call_that_reads_the_request_without_end_is_stopped() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = faulty_gateway(
        &backend,
        &[
            ("greedy", "{ mode = \"read-loop\", arg = \"1000000\" }"),
            ("modest", "{ mode = \"read-loop\", arg = \"10\" }"),
            ("tiny", "{ mode = \"tiny-loop\", arg = \"1000000\" }"),
            ("few", "{ mode = \"tiny-loop\", arg = \"1000\" }"),
        ],
    );
    let addr = gw.ws.unwrap();
    let big = format!("X-Big: {}\r\n", "b".repeat(4000));
    let (head, _) = raw_handshake(addr, "/greedy", &big).await;
    assert_eq!(status_of(&head), 503, "{head}");
    let err = gw.policy_error("greedy").await;
    assert!(err.contains("read more than 4194304 bytes"), "{err}");
    let (head, _ws) = ws_connect(addr, "/modest", &big).await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert!(
        headers_all(&head, "x-probe")[0].starts_with("read "),
        "{head}"
    );
    // Reads that return nothing cost a flat fee each: a million of them are stopped too.
    let (head, _) = raw_handshake(addr, "/tiny", "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    let err = gw.policy_error("tiny").await;
    assert!(err.contains("read more than 4194304 bytes"), "{err}");
    let (head, _ws2) = ws_connect(addr, "/few", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
}

/// Reading the request needs `read-request`: a plugin that declared only
/// `modify-response-headers` and `use-context` is refused when it reads the path, with the
/// capability named, while the same plugin that declared `read-request` reads it.
#[tokio::test]
async fn reading_the_request_needs_read_request() {
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("read-request");
    let plugins_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins_dir).unwrap();
    for c in ["use-context", "read-request"] {
        let f = format!("declares-{c}.wasm");
        std::fs::copy(plugins::declaring_one(c).join(&f), plugins_dir.join(&f)).unwrap();
    }
    let mut text = gateway_section("plugin_dir = \"plugins\"");
    for c in ["use-context", "read-request"] {
        text.push_str(&api_section(
            c,
            c,
            &backend.url(),
            &format!(
                "[[apis.on_handshake]]\nplugin = \"declares-{c}\"\nfailure_status = 503\nconfig = {{ read_path = true }}\n"
            ),
        ));
    }
    let gw = Gateway::start_in(dir, &text);
    let addr = gw.ws.unwrap();
    let (head, _) = raw_handshake(addr, "/use-context", "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    let err = gw.policy_error("use-context").await;
    assert!(
        err.contains("read the request's path without declaring the capability `read-request`"),
        "{err}"
    );
    let (head, _ws) = ws_connect(addr, "/read-request/x", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(
        headers_all(&head, "x-path"),
        vec!["/read-request/x"],
        "{head}"
    );
}

#[test]
fn a_plugin_built_against_wit_0_1_is_refused_naming_its_version() {
    let dir = TempDir::new("wit-0.1");
    plugins::install(
        &dir.path().join("plugins"),
        &["set_header.wasm", "wit_0_1_policy.wasm"],
    );
    let text = format!(
        "{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section(
            "echo",
            "echo",
            "ws://127.0.0.1:1/",
            "[[apis.on_handshake]]\nplugin = \"set-header\"\nconfig = { name = \"x-a\", value = \"v\" }\n"
        )
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("wit_0_1_policy.wasm: built against tollgate:policy@0.1.0; this gateway runs policies built against tollgate:policy@0.2.0"),
        "{err}"
    );
}

/// The ten-line policy of `docs/writing-policies.md` is `examples/require-param`, word for
/// word, and it works through the gateway: built from source by the suite, attached with a
/// config, it refuses a handshake without the parameter (400, its own message) and lets one
/// with it through.
#[tokio::test]
async fn the_ten_line_policy_of_the_docs_builds_and_runs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/writing-policies.md")).unwrap();
    let lib = std::fs::read_to_string(root.join("examples/require-param/src/lib.rs")).unwrap();
    let block = doc
        .split_once("<!-- examples/require-param/src/lib.rs -->\n```rust\n")
        .and_then(|(_, rest)| rest.split_once("```\n"))
        .map(|(code, _)| code)
        .expect("the doc shows examples/require-param/src/lib.rs");
    assert_eq!(
        block, lib,
        "docs/writing-policies.md and the example drifted apart"
    );
    let code_lines = lib.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        code_lines <= 20,
        "the smallest policy grew to {code_lines} lines"
    );

    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("require-param");
    plugins::install(&dir.path().join("plugins"), &["require_param.wasm"]);
    let text = format!(
        "{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section(
            "chat",
            "chat",
            &backend.url(),
            "[[apis.on_handshake]]\nplugin = \"require-param\"\nconfig = { param = \"room\" }\n"
        )
    );
    let gw = Gateway::start_in(dir, &text);
    let addr = gw.ws.unwrap();
    let got = answer(addr, "/chat").await;
    assert_eq!(status_of(&got), 400, "{got}");
    assert!(got.ends_with("room required"), "{got}");
    let (head, mut ws) = ws_connect(addr, "/chat?room=7", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    ws.send(true, 1, b"hi").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
}
