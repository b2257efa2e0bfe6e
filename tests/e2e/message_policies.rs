//! Message policies (`[[apis.on_message]]`): a component of the `message-policy` world judges
//! every whole data message of the directions it watches. Forwarded messages keep their
//! original fragments; replaced ones go as one frame (masked afresh towards the backend);
//! dropped ones vanish; control frames pass at once; a policy's close gives its code to the
//! sender and 1001 to the other side; a failing policy closes its own connection with 1011.
//!
//! The policy is `tests/plugins/message-test`: each text message says what to do with it.

use std::time::Duration;

use crate::support::*;

/// A close frame's payload: code 1000, no reason.
const NORMAL_CLOSE: [u8; 2] = 1000u16.to_be_bytes();

const ALICE_KEY: &str = "alice-message-policy-key-8c1d2e77";

/// A gateway with API `echo` in front of `backend`, whose messages `message-test` judges
/// (`attachment` holds extra keys of the attachment, `extra` of the API).
fn start(backend: &str, attachment: &str, extra: &str) -> Gateway {
    let dir = TempDir::new("message-policies");
    plugins::install(
        &dir.path().join("plugins"),
        &["message_test.wasm", "set_header.wasm"],
    );
    let manifest = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[products]]\nname = \"gold\"\nsubscription_required = false\n\
         [[products.subscriptions]]\nname = \"alice\"\nprimary_key_sha256 = \"{}\"\n\n{}\
         [[apis.on_message]]\nplugin = \"message-test\"\n{attachment}\n",
        gateway_section("plugin_dir = \"plugins\""),
        sha256_hex(ALICE_KEY),
        api_section(
            "echo",
            "echo",
            backend,
            &format!("products = [\"gold\"]\n{extra}")
        ),
    );
    Gateway::start_in(dir, &manifest)
}

/// Masked client frames, concatenated: what a client sends in one write.
fn client_frames(frames: &[(bool, u8, &[u8])]) -> Vec<u8> {
    frames
        .iter()
        .flat_map(|(fin, op, p)| encode_frame(*fin, 0, *op, p, Some(rand_mask())))
        .collect()
}

/// The frames the backend received, until its close (or 3 s of silence).
async fn received(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Frame>) -> Vec<Frame> {
    let mut got = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        let close = f.opcode == 8;
        got.push(f);
        if close {
            break;
        }
    }
    got
}

/// `tollgate_policy_calls_total` of `message-test` on API `echo` with `outcome`.
async fn calls(gw: &Gateway, outcome: &str) -> Option<f64> {
    sample(
        &scrape(gw.admin.unwrap()).await,
        "tollgate_policy_calls_total",
        &[
            ("api", "echo"),
            ("plugin", "message-test"),
            ("scope", "message"),
            ("outcome", outcome),
        ],
    )
}

/// What the backend sees: a forwarded message with the fragments it was sent in, the ping sent
/// between them at once (not held behind the message being judged), a replacement as one
/// frame, nothing of a dropped message, binary untouched. The same with a warm instance per
/// call (`pooled`) and a fresh one (the default).
#[tokio::test]
async fn messages_are_forwarded_whole_replaced_or_dropped_and_pings_pass_at_once() {
    for instances in ["instances = \"pooled\"", ""] {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let backend = RawBackend::start(record_frames(tx)).await;
        let gw = start(&backend.url(), instances, "");
        let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
        let sent: Vec<(bool, u8, &[u8])> = vec![
            (false, 1, b"hel"),
            (true, 9, b"ping"),
            (false, 0, b"lo "),
            (true, 0, b"there"),
            (true, 1, b"upper:quiet"),
            (true, 1, b"drop this one"),
            (true, 2, &[0, 1, 2, 255]),
            (true, 8, &NORMAL_CLOSE),
        ];
        ws.send_raw(&client_frames(&sent)).await.unwrap();
        let got = received(&mut rx).await;
        let seen: Vec<(bool, u8, &[u8])> = got
            .iter()
            .map(|f| (f.fin, f.opcode, f.payload.as_slice()))
            .collect();
        let want: Vec<(bool, u8, &[u8])> = vec![
            (true, 9, b"ping"),
            (false, 1, b"hel"),
            (false, 0, b"lo "),
            (true, 0, b"there"),
            (true, 1, b"UPPER:QUIET"),
            (true, 2, &[0, 1, 2, 255]),
            (true, 8, &NORMAL_CLOSE),
        ];
        assert_eq!(seen, want, "{instances}: {got:?}");
        assert!(got.iter().all(|f| f.masked), "{got:?}");
        let f = ws.read_until_close().await.unwrap();
        assert_eq!(f.close_code(), Some(1000));
        assert_eq!(calls(&gw, "forward").await, Some(2.0), "{instances}");
        assert_eq!(calls(&gw, "replace").await, Some(1.0), "{instances}");
        assert_eq!(calls(&gw, "drop").await, Some(1.0), "{instances}");
        // Decisions only: no handshake outcome series for a message policy.
        assert_eq!(calls(&gw, "allow").await, None, "{instances}");
    }
}

/// Both directions, and what a policy knows of the connection: the client's `whoami` is
/// replaced by the connection as the policy saw it (API, product, subscription, and the context
/// as the API's onHandshake chain left it); the backend's echo of it is judged too, and comes
/// to the client unmasked.
#[tokio::test]
async fn both_directions_are_judged_and_a_policy_sees_the_connection() {
    let backend = ws_echo_backend().await;
    let gw = start(
        &format!("ws://{backend}/"),
        "",
        "[[apis.on_handshake]]\nplugin = \"set-header\"\nconfig = { name = \"x-seen\", value = \"1\" }\n",
    );
    let key = format!("Ocp-Apim-Subscription-Key: {ALICE_KEY}\r\n");
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", &key).await;
    ws.send(true, 1, b"whoami").await.unwrap();
    let f = ws.read_frame().await.unwrap();
    let text = String::from_utf8(f.payload.clone()).unwrap();
    assert!(!f.masked);
    for line in [
        "api=echo",
        "product=gold",
        "subscription=alice",
        "direction=client",
        "product.name=gold",
        "subscription.name=alice",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in {text}");
    }
    // The echo came back through the backend's direction, which forwarded it unchanged.
    ws.send(true, 1, b"upper:echo").await.unwrap();
    let f = ws.read_frame().await.unwrap();
    // Replaced on the way in (UPPER:ECHO), and again on the way out: the backend's echo
    // `UPPER:ECHO` starts with neither command, so it is forwarded as it is.
    assert_eq!(f.payload, b"UPPER:ECHO");
    assert_eq!(calls(&gw, "replace").await, Some(2.0));
}

/// `direction = "backend"`: the client's messages are not judged (a `drop` goes through), the
/// backend's are (its echo of `drop...` is dropped on the way back).
#[tokio::test]
async fn direction_picks_whose_messages_are_judged() {
    let backend = ws_echo_backend().await;
    let gw = start(&format!("ws://{backend}/"), "direction = \"backend\"", "");
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 1, b"drop on the way back").await.unwrap();
    ws.send(true, 1, b"upper:kept").await.unwrap();
    let f = ws.read_frame().await.unwrap();
    assert_eq!(f.payload, b"UPPER:KEPT");
    assert_eq!(calls(&gw, "drop").await, Some(1.0));
}

/// A policy's close: the sender gets the policy's code and reason, the other side 1001; the
/// close record says `message_policy`.
#[tokio::test]
async fn a_policys_close_goes_to_the_sender_and_1001_to_the_other_side() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = start(&backend.url(), "instances = \"pooled\"", "");
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 1, b"fine").await.unwrap();
    ws.send(true, 1, b"close:4003:not in this room")
        .await
        .unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(4003), "{f:?}");
    assert_eq!(f.close_reason(), "not in this room");
    let got = received(&mut rx).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].payload, b"fine");
    assert_eq!(got[1].close_code(), Some(1001), "{got:?}");
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "message_policy", "{rec}");
    assert_eq!(calls(&gw, "close").await, Some(1.0));

    // The sender's own close right behind the message (one write): it is not forwarded, the
    // policy's word is, so the backend still gets its 1001 at once, not a dropped socket after
    // the close grace (5 s).
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let both: Vec<(bool, u8, &[u8])> = vec![(true, 1, b"close:4004:bye"), (true, 8, &NORMAL_CLOSE)];
    let started = std::time::Instant::now();
    ws.send_raw(&client_frames(&both)).await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(4004), "{f:?}");
    let got = received(&mut rx).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].close_code(), Some(1001), "{got:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// A policy that traps, runs out of CPU time, answers with an error, replaces text with bytes
/// that are not UTF-8 or closes with a code a gateway may not send closes its own connection
/// (1011 to both sides) with a `policy_error` record; another connection of the same API,
/// served by the same pool, goes on.
#[tokio::test]
async fn a_failing_policy_closes_only_its_own_connection_with_1011() {
    let backend = ws_echo_backend().await;
    let gw = start(
        &format!("ws://{backend}/"),
        "instances = \"pooled\"\ncpu_time = \"20ms\"",
        "",
    );
    let addr = gw.ws.unwrap();
    let (_, mut other) = ws_connect(addr, "/echo", "").await;
    for (ask, error) in [
        (&b"trap"[..], "trapped in on-message"),
        (b"spin", "ran out of CPU time"),
        (b"error", "could not decide: asked to fail"),
        (b"bad-utf8", "not UTF-8"),
        (b"close:1005:x", "code 1005"),
    ] {
        let (_, mut ws) = ws_connect(addr, "/echo", "").await;
        ws.send(true, 1, ask).await.unwrap();
        let f = ws.read_until_close().await.unwrap();
        assert_eq!(f.close_code(), Some(1011), "{ask:?}: {f:?}");
        assert_eq!(f.close_reason(), "message policy failed");
        let rec = gw
            .wait_record("policy_error", |r| {
                r["error"].as_str().is_some_and(|e| e.contains(error))
            })
            .await;
        assert_eq!(rec["plugin"], "message-test", "{rec}");
        assert_eq!(rec["scope"], "message", "{rec}");
        other.send(true, 1, b"still here").await.unwrap();
        assert_eq!(other.read_frame().await.unwrap().payload, b"still here");
    }
    assert_eq!(calls(&gw, "error").await, Some(5.0));
    let closed = gw.records("connection_closed");
    assert_eq!(
        closed
            .iter()
            .filter(|r| r["closed_by"] == "message_policy_error")
            .count(),
        5,
        "{closed:?}"
    );
}

/// A message larger than `max_inspected_message_size` is never held: the sender gets 1009
/// before any of it goes on, and the limit is counted.
#[tokio::test]
async fn a_message_too_large_to_inspect_is_closed_1009() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = start(
        &backend.url(),
        "",
        "[apis.limits]\nmax_inspected_message_size = 1000\n",
    );
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 2, &[7u8; 1000]).await.unwrap();
    let parts: Vec<(bool, u8, &[u8])> = vec![(false, 2, &[1u8; 600]), (true, 0, &[2u8; 600])];
    ws.send_raw(&client_frames(&parts)).await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1009), "{f:?}");
    assert_eq!(
        f.close_reason(),
        "message exceeds max_inspected_message_size"
    );
    let got = received(&mut rx).await;
    assert_eq!(got[0].payload.len(), 1000, "{got:?}");
    assert!(got[1..].iter().all(|f| f.opcode == 8), "{got:?}");
    let m = scrape(gw.admin.unwrap()).await;
    assert_eq!(
        sample(
            &m,
            "tollgate_limits_hit_total",
            &[("api", "echo"), ("limit", "max_inspected_message_size")]
        ),
        Some(1.0)
    );

    // Behind the message that is too large, in the same write, a frame that breaks the
    // protocol (unmasked): the sender is closed for the first thing wrong, 1009, not 1002.
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let mut bytes = client_frames(&[(true, 2, &[3u8; 1500])]);
    bytes.extend(encode_frame(true, 0, 1, b"unmasked", None));
    ws.send_raw(&bytes).await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1009), "{f:?}");
}

/// A policy reads payloads as sent: an API with message policies offers the backend no
/// extension (permessage-deflate would hand the policy compressed bytes).
#[tokio::test]
async fn no_extension_is_offered_to_the_backend() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend.url(), "", "");
    let (head, mut ws) = ws_connect(
        gw.ws.unwrap(),
        "/echo",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(header(&head, "sec-websocket-extensions"), None, "{head}");
    ws.send(true, 1, b"plain").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"plain");
    let seen = backend.last_head();
    assert!(
        headers_all(&seen, "sec-websocket-extensions").is_empty(),
        "{seen}"
    );
}

/// Attached in the wrong scope, either kind of policy stops the start with a message saying
/// where it belongs.
#[tokio::test]
async fn a_policy_attached_in_the_other_scope_is_refused_at_start() {
    let dir = TempDir::new("message-scope");
    plugins::install(
        &dir.path().join("plugins"),
        &["message_test.wasm", "set_header.wasm"],
    );
    let manifest = format!(
        "{}{}[[apis.on_handshake]]\nplugin = \"message-test\"\n\
         [[apis.on_message]]\nplugin = \"set-header\"\nconfig = {{ name = \"a\", value = \"b\" }}\n",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("echo", "echo", "ws://127.0.0.1:9/", ""),
    );
    let (code, err, _) = tollgate_check(dir.path(), &manifest);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("`message-test` (attached at API `echo` onHandshake) is a message policy"),
        "{err}"
    );
    assert!(
        err.contains("`set-header` is a handshake policy") && err.contains("[[apis.on_handshake]]"),
        "{err}"
    );
}

/// The first-party `redact-fields`: the backend sees the card number masked and the password
/// removed from the client's JSON, a message without them byte for byte as sent (its fragments
/// too), and non-JSON closed with 1007 when `on_invalid = "close"`.
#[tokio::test]
async fn redact_fields_masks_and_removes_before_the_backend_sees_them() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let dir = TempDir::new("redact");
    plugins::install(&dir.path().join("plugins"), &["redact_fields.wasm"]);
    let attach = |fields: &str, action: &str| {
        format!(
            "[[apis.on_message]]\nplugin = \"redact-fields\"\ndirection = \"client\"\ninstances = \"pooled\"\n\
             config = {{ fields = [{fields}], action = \"{action}\", on_invalid = \"close\" }}\n"
        )
    };
    let gw = Gateway::start_in(
        dir,
        &format!(
            "{}{}{}{}",
            gateway_section("plugin_dir = \"plugins\""),
            api_section("echo", "echo", &backend.url(), ""),
            attach("\"/card/number\"", "mask"),
            attach("\"/password\"", "remove"),
        ),
    );
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let parts: Vec<(bool, u8, &[u8])> = vec![
        (
            true,
            1,
            br#"{"card":{"number":"4111111111111111","exp":"12/30"},"password":"hunter2","n":1}"#,
        ),
        (false, 1, br#"{"type":"#),
        (true, 0, br#""hello"}"#),
        (true, 1, b"not json"),
    ];
    ws.send_raw(&client_frames(&parts)).await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1007), "{f:?}");
    assert_eq!(f.close_reason(), "message is not JSON");
    let got = received(&mut rx).await;
    let first: serde_json::Value = serde_json::from_slice(&got[0].payload).unwrap();
    assert_eq!(
        first,
        serde_json::json!({"card": {"number": "***", "exp": "12/30"}, "n": 1}),
        "{got:?}"
    );
    let rest: Vec<(bool, u8, &[u8])> = got[1..]
        .iter()
        .map(|f| (f.fin, f.opcode, f.payload.as_slice()))
        .collect();
    assert_eq!(
        rest[..2],
        [
            (false, 1, br#"{"type":"# as &[u8]),
            (true, 0, br#""hello"}"#)
        ],
        "{got:?}"
    );
    assert_eq!(got[3].close_code(), Some(1001), "{got:?}");
    assert!(!String::from_utf8_lossy(&got[0].payload).contains("4111"));
}

/// The first-party `json-schema-validate` (draft 2020-12): a message that matches reaches the
/// backend; one that does not closes the connection with 1007 to its sender, naming where it
/// failed, and the backend gets 1001 and never sees it.
#[tokio::test]
async fn json_schema_validate_closes_1007_on_a_message_that_does_not_match() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let dir = TempDir::new("schema");
    plugins::install(&dir.path().join("plugins"), &["json_schema_validate.wasm"]);
    let gw = Gateway::start_in(
        dir,
        &format!(
            "{}{}[[apis.on_message]]\nplugin = \"json-schema-validate\"\ndirection = \"client\"\ninstances = \"pooled\"\n\
             [apis.on_message.config]\nschema = {{ type = \"object\", required = [\"type\"], properties = {{ type = {{ enum = [\"chat\", \"typing\"] }} }} }}\n",
            gateway_section("plugin_dir = \"plugins\""),
            api_section("echo", "echo", &backend.url(), ""),
        ),
    );
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 1, br#"{"type":"chat","text":"hi"}"#)
        .await
        .unwrap();
    ws.send(true, 1, br#"{"type":"admin"}"#).await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1007), "{f:?}");
    assert_eq!(
        f.close_reason(),
        "message does not match the schema at /type"
    );
    let got = received(&mut rx).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].payload, br#"{"type":"chat","text":"hi"}"#);
    assert_eq!(got[1].close_code(), Some(1001), "{got:?}");
}

/// A reload that takes the message policy away: a connection admitted before it keeps the
/// policies it came in with (its messages are still judged, by the instance the old state
/// kept), a new connection relays without them.
#[tokio::test]
async fn a_connection_keeps_its_message_policies_across_a_reload() {
    let backend = ws_echo_backend().await;
    let gw = start(&format!("ws://{backend}/"), "instances = \"pooled\"", "");
    let addr = gw.ws.unwrap();
    let (_, mut before) = ws_connect(addr, "/echo", "").await;
    before.send(true, 1, b"upper:one").await.unwrap();
    assert_eq!(before.read_frame().await.unwrap().payload, b"UPPER:ONE");
    // The same manifest without its [[apis.on_message]].
    let path = gw.dir.path().join("tollgate.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cut = text.find("[[apis.on_message]]").unwrap();
    std::fs::write(&path, &text[..cut]).unwrap();
    gw.signal("HUP");
    gw.wait_record("reload", |r| r["outcome"] == "applied")
        .await;
    for n in 0..3 {
        before.send(true, 1, b"upper:two").await.unwrap();
        assert_eq!(
            before.read_frame().await.unwrap().payload,
            b"UPPER:TWO",
            "{n}"
        );
    }
    let (_, mut after) = ws_connect(addr, "/echo", "").await;
    after.send(true, 1, b"upper:three").await.unwrap();
    assert_eq!(after.read_frame().await.unwrap().payload, b"upper:three");
}
