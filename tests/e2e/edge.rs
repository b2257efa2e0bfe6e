//! The edge, probed from outside as an attacker would (issue "Edge hardening"): paths that try
//! to climb out of an API, repeated credential headers, what error bodies and logs give away,
//! forged forwarding headers, revoked keys, and sockets that never finish a handshake. Every
//! refusal is checked to have left the backend untouched.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` (a complete raw HTTP head) and reads the answer: a 101's head, or a
/// refusal whole (the gateway closes after a refusal).
async fn exchange(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let (head, mut rest) = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s))
        .await
        .expect("the gateway answers")
        .unwrap_or_default();
    let status = status_of(&head);
    if status != 101 {
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("the gateway closes after a refusal")
            .unwrap();
    }
    (status, format!("{head}{}", String::from_utf8_lossy(&rest)))
}

/// A handshake request for `path` with `extra` header lines; `host`: the Host line, if any.
fn request(path: &str, host: Option<&str>, extra: &str) -> String {
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {TEST_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn body_of(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Two APIs, `chat` -> `/ws` and `chat/admin` -> `/ws/admin`, on two backends so the test
/// sees which one a path reached.
async fn two_apis() -> (Gateway, RawBackend, RawBackend) {
    let chat = RawBackend::start(echo_frames()).await;
    let admin = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&format!(
        "{}{}{}",
        gateway_section(""),
        api_section("chat", "chat", &format!("ws://{}/ws", chat.addr), ""),
        api_section(
            "chat-admin",
            "chat/admin",
            &format!("ws://{}/ws/admin", admin.addr),
            ""
        ),
    ));
    (gw, chat, admin)
}

fn contacted(b: &RawBackend) -> usize {
    b.connections.load(Ordering::SeqCst)
}

#[tokio::test]
async fn paths_are_normalised_before_routing_and_never_climb_out_of_an_api() {
    let (gw, chat, admin) = two_apis().await;
    let addr = gw.ws.unwrap();
    let host = addr.to_string();
    // Normalised, routed and forwarded normalised.
    for (path, backend_path) in [
        ("/chat/./room//1", "/ws/room/1"),
        ("/chat/a/../room", "/ws/room"),
        ("/chat/%72oom/%7Eann", "/ws/room/~ann"),
        ("/chat/a/%2e%2E/b", "/ws/b"),
        ("//chat//admin/x", "/ws/admin/x"),
    ] {
        let (head, _ws) = ws_connect(addr, path, "").await;
        assert_eq!(status_of(&head), 101, "{path}: {head}");
        let b = if backend_path.starts_with("/ws/admin") {
            &admin
        } else {
            &chat
        };
        let seen = b.last_head();
        assert_eq!(
            seen.lines().next().unwrap(),
            format!("GET {backend_path} HTTP/1.1"),
            "{path}"
        );
    }
    let before = (contacted(&chat), contacted(&admin));
    // Refused: climbing out of the API it would end up in (with or without encoding), above
    // the root, encoded separators, NUL, malformed encodings.
    for path in [
        "/chat/x/../admin",
        "/chat/x/%2e%2e/admin",
        "/chat/admin/../../chat",
        "/chat/../chat/admin",
        "/chat/../../etc/passwd",
        "/chat/%2e%2e/%2e%2e/etc",
        "/chat/..%2fadmin",
        "/chat/..%2Fadmin",
        "/chat/a%5c..%5cadmin",
        "/chat/a%00",
        "/chat/%zz",
        "/..",
        "/chat/x/..;/admin",
    ] {
        let (status, resp) = exchange(addr, &request(path, Some(&host), "")).await;
        assert_eq!(status, 400, "{path}: {resp}");
        assert_eq!(body_of(&resp), "Bad Request\n", "{path}");
        let rec = gw
            .wait_record("handshake", |r| r["path"] == path && r["status"] == 400)
            .await;
        assert!(
            rec["reason"].as_str().unwrap().starts_with("refused path"),
            "{rec}"
        );
    }
    assert_eq!(
        (contacted(&chat), contacted(&admin)),
        before,
        "no refused path reached a backend"
    );
}

#[tokio::test]
async fn repeated_credential_headers_and_a_missing_host_are_refused() {
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("edge-headers");
    let gw = Gateway::start_with_env(
        dir,
        &format!(
            "{}[[products]]\nname = \"gold\"\n[[products.subscriptions]]\nname = \"ann\"\nprimary_key_env = \"TG_EDGE_KEY\"\n{}",
            gateway_section(""),
            api_section("echo", "echo", &backend.url(), "products = [\"gold\"]"),
        ),
        &[("TG_EDGE_KEY", "edge-test-key-0123456789")],
    );
    let addr = gw.ws.unwrap();
    let host = addr.to_string();
    let key = "Ocp-Apim-Subscription-Key: edge-test-key-0123456789\r\n";
    // The baseline request is accepted.
    let (status, _) = exchange(addr, &request("/echo", Some(&host), key)).await;
    assert_eq!(status, 101);
    let before = contacted(&backend);
    for (what, extra) in [
        ("host", format!("{key}Host: evil.example\r\n")),
        (
            "authorization",
            format!("{key}Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"),
        ),
        (
            "sec-websocket-key",
            format!("{key}Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"),
        ),
        (
            "sec-websocket-version",
            format!("{key}Sec-WebSocket-Version: 13\r\n"),
        ),
        (
            "origin",
            format!("{key}Origin: https://a.example\r\nOrigin: https://b.example\r\n"),
        ),
        ("ocp-apim-subscription-key", format!("{key}{key}")),
    ] {
        let (status, resp) = exchange(addr, &request("/echo", Some(&host), &extra)).await;
        assert_eq!(status, 400, "{what}: {resp}");
        let rec = gw
            .wait_record("handshake", |r| {
                r["status"] == 400 && r["reason"].as_str().is_some_and(|m| m.contains(what))
            })
            .await;
        assert!(
            rec["reason"].as_str().unwrap().contains("repeated"),
            "{rec}"
        );
    }
    // The key twice in the query is as ambiguous as twice in a header.
    let (status, _) = exchange(
        addr,
        &request(
            "/echo?subscription-key=edge-test-key-0123456789&subscription-key=x",
            Some(&host),
            "",
        ),
    )
    .await;
    assert_eq!(status, 400);
    // A handshake has no body: bytes sent as one must not reach the relay as frames.
    for body in ["Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n"] {
        let (status, resp) = exchange(
            addr,
            &request("/echo", Some(&host), &format!("{key}{body}")),
        )
        .await;
        assert_eq!(status, 400, "{body}: {resp}");
    }
    let (status, resp) = exchange(addr, &request("/echo", None, key)).await;
    assert_eq!(status, 400, "{resp}");
    gw.wait_record("handshake", |r| {
        r["status"] == 400
            && r["reason"]
                .as_str()
                .is_some_and(|m| m.contains("missing `Host`"))
    })
    .await;
    assert_eq!(
        contacted(&backend),
        before,
        "no refused handshake reached the backend"
    );
}

/// A port nobody listens on (bound, then closed) and the address of a backend that accepts TCP
/// but never answers the handshake.
async fn unreachable_backends() -> (u16, std::net::SocketAddr) {
    let refused_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    (refused_port, silent_addr)
}

#[tokio::test]
async fn clients_get_generic_errors_and_the_log_gets_the_details() {
    let (refused_port, silent_addr) = unreachable_backends().await;
    let gw = Gateway::start(&format!(
        "{}[gateway.limits]\nbackend_timeout = \"1s\"\n{}{}",
        gateway_section(""),
        api_section(
            "down",
            "down",
            &format!("ws://127.0.0.1:{refused_port}/"),
            ""
        ),
        api_section("slow", "slow", &format!("ws://{silent_addr}/"), ""),
    ));
    let addr = gw.ws.unwrap();
    let host = addr.to_string();
    let (status, resp) = exchange(addr, &request("/down", Some(&host), "")).await;
    assert_eq!(status, 502);
    assert_eq!(body_of(&resp), "Bad Gateway\n", "{resp}");
    assert!(!resp.contains("127.0.0.1") && !resp.to_lowercase().contains("refused"));
    let rec = gw
        .wait_record("handshake", |r| r["api"] == "down" && r["status"] == 502)
        .await;
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("127.0.0.1:{refused_port}")) && reason.contains("refused"),
        "the detail is in the log: {rec}"
    );
    let (status, resp) = exchange(addr, &request("/slow", Some(&host), "")).await;
    assert_eq!(status, 504);
    assert_eq!(body_of(&resp), "Gateway Timeout\n", "{resp}");
    // Not found says nothing about which paths exist.
    let (status, resp) = exchange(addr, &request("/nope", Some(&host), "")).await;
    assert_eq!(status, 404);
    assert_eq!(body_of(&resp), "Not Found\n");
}

#[tokio::test]
async fn query_values_stay_out_of_the_logs_unless_the_manifest_opts_out() {
    let backend = RawBackend::start(echo_frames()).await;
    for opt_out in [false, true] {
        let extra = if opt_out {
            "log_query_values = true"
        } else {
            ""
        };
        let gw = Gateway::start(&format!(
            "{}{}",
            gateway_section(extra),
            api_section(
                "echo",
                "echo",
                &format!("ws://{}/ws?tenant=t-secret-1", backend.addr),
                ""
            ),
        ));
        let (head, mut ws) = ws_connect(
            gw.ws.unwrap(),
            "/echo/room?access_token=eyJhbGciOi.s3cret-token.sig&room=42",
            "",
        )
        .await;
        assert_eq!(status_of(&head), 101);
        assert!(
            backend.last_head().starts_with(
                "GET /ws/room?tenant=t-secret-1&access_token=eyJhbGciOi.s3cret-token.sig&room=42 "
            ),
            "the backend gets the query as sent: {}",
            backend.last_head()
        );
        ws.close(1000, "bye").await.unwrap();
        let rec = gw.wait_record("connection_closed", |_| true).await;
        let out = gw.output();
        if opt_out {
            assert!(
                out.contains("s3cret-token"),
                "log_query_values = true keeps values"
            );
            gw.wait_record("log_query_values", |r| r["level"] == "WARN")
                .await;
        } else {
            assert_eq!(
                rec["backend_target"],
                "/ws/room?tenant=REDACTED&access_token=REDACTED&room=REDACTED",
                "{rec}"
            );
            assert!(
                !out.contains("s3cret-token") && !out.contains("t-secret-1"),
                "{out}"
            );
        }
    }
}

#[tokio::test]
async fn forwarding_headers_are_replaced_unless_the_peer_is_a_trusted_proxy() {
    let backend = RawBackend::start(echo_frames()).await;
    let forged = "X-Forwarded-For: 10.9.9.9\r\nForwarded: for=10.9.9.9\r\nX-Real-IP: 10.9.9.9\r\n";
    for trusted in [false, true] {
        let extra = if trusted {
            "trusted_proxies = [\"127.0.0.0/8\"]"
        } else {
            "trusted_proxies = [\"192.0.2.0/24\"]"
        };
        let gw = Gateway::start(&format!(
            "{}{}",
            gateway_section(extra),
            api_section("echo", "echo", &backend.url(), ""),
        ));
        let (head, _ws) = ws_connect(gw.ws.unwrap(), "/echo", forged).await;
        assert_eq!(status_of(&head), 101);
        let seen = backend.last_head();
        let h = |n: &str| headers_all(&seen, n);
        if trusted {
            assert_eq!(h("x-forwarded-for"), ["10.9.9.9, 127.0.0.1"], "{seen}");
            assert_eq!(
                h("forwarded"),
                ["for=10.9.9.9, for=127.0.0.1;proto=http"],
                "{seen}"
            );
            assert_eq!(h("x-real-ip"), ["10.9.9.9"], "{seen}");
        } else {
            assert_eq!(h("x-forwarded-for"), ["127.0.0.1"], "{seen}");
            assert_eq!(h("forwarded"), ["for=127.0.0.1;proto=http"], "{seen}");
            assert_eq!(h("x-real-ip"), ["127.0.0.1"], "{seen}");
        }
    }
}

/// Collects the frames a backend connection receives.
fn recording_backend() -> (Handler, tokio::sync::mpsc::UnboundedReceiver<Frame>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    (record_frames(tx), rx)
}

#[tokio::test]
async fn a_key_revoked_by_a_reload_ends_its_connections_and_only_those() {
    let (handler, mut backend_frames) = recording_backend();
    let backend = RawBackend::start(handler).await;
    let dir = TempDir::new("edge-revoke");
    let keys = |ann: &str| {
        format!("[ann]\nprimary = \"{ann}\"\n\n[bob]\nprimary = \"bob-key-0123456789abcdef\"\n")
    };
    std::fs::write(
        dir.path().join("keys.toml"),
        keys("ann-key-0123456789abcdef"),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("keys.toml"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    let gw = Gateway::start_in(
        dir,
        &format!(
            "{}[[products]]\nname = \"gold\"\n[[products.subscriptions]]\nname = \"ann\"\n[[products.subscriptions]]\nname = \"bob\"\n{}",
            gateway_section("subscription_keys_file = \"keys.toml\""),
            api_section("echo", "echo", &backend.url(), "products = [\"gold\"]"),
        ),
    );
    let addr = gw.ws.unwrap();
    let (head, mut ann) = ws_connect(
        addr,
        "/echo",
        "Ocp-Apim-Subscription-Key: ann-key-0123456789abcdef\r\n",
    )
    .await;
    assert_eq!(status_of(&head), 101);
    let (head, mut bob) =
        ws_connect(addr, "/echo?subscription-key=bob-key-0123456789abcdef", "").await;
    assert_eq!(status_of(&head), 101);
    // ann's key is rotated away; bob's stays.
    std::fs::write(
        gw.dir.path().join("keys.toml"),
        keys("ann-new-key-0123456789abcdef"),
    )
    .unwrap();
    gw.signal("HUP");
    let close = tokio::time::timeout(Duration::from_secs(10), ann.read_until_close())
        .await
        .expect("ann's connection is closed after the reload")
        .unwrap();
    assert_eq!(close.close_code(), Some(1008));
    assert_eq!(close.close_reason(), "subscription revoked");
    // The backend side of ann's connection got 1001.
    let to_backend = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let f = backend_frames.recv().await.unwrap();
            if f.opcode == 8 {
                return f;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(to_backend.close_code(), Some(1001));
    let rec = gw
        .wait_record("connection_closed", |r| r["subscription"] == "ann")
        .await;
    assert_eq!(rec["closed_by"], "subscription_revoked", "{rec}");
    gw.wait_record("subscription_key_revoked", |r| r["subscription"] == "ann")
        .await;
    // bob's connection is untouched.
    bob.send(true, 1, b"still here").await.unwrap();
    assert!(gw
        .records("connection_closed")
        .iter()
        .all(|r| r["subscription"] != "bob"));
}

#[tokio::test]
async fn max_connection_lifetime_ends_a_busy_connection() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&format!(
        "{}{}[apis.limits]\nmax_connection_lifetime = \"1500ms\"\n",
        gateway_section(""),
        api_section("echo", "echo", &backend.url(), ""),
    ));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let started = Instant::now();
    // Busy: a message every 200 ms, so the idle timeout never applies.
    let close = loop {
        ws.send(true, 1, b"tick").await.unwrap();
        let f = tokio::time::timeout(Duration::from_secs(5), ws.read_frame())
            .await
            .expect("an answer")
            .unwrap();
        if f.opcode == 8 {
            break f;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(close.close_code(), Some(1001));
    assert!(started.elapsed() >= Duration::from_millis(1400));
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "max_connection_lifetime", "{rec}");
}

#[tokio::test]
async fn sockets_that_never_finish_a_handshake_are_bounded() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[gateway.limits]\nmax_pending_handshakes = 3\n{}",
        gateway_section(""),
        api_section("echo", "echo", &backend.url(), ""),
    ));
    let addr = gw.ws.unwrap();
    // Three silent sockets take every pending slot.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The fourth is closed at once, without an answer.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s
        .write_all(request("/echo", Some(&addr.to_string()), "").as_bytes())
        .await;
    let mut buf = Vec::new();
    let got = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(
        matches!(got, Ok(Ok(0)) | Ok(Err(_))),
        "closed without an answer: {:?}",
        String::from_utf8_lossy(&buf)
    );
    let scrape = scrape(gw.admin.unwrap()).await;
    assert!(
        sample(
            &scrape,
            "tollgate_limits_hit_total",
            &[("api", ""), ("limit", "max_pending_handshakes")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    // Once they go, handshakes are served again.
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = exchange(addr, &request("/echo", Some(&addr.to_string()), "")).await;
        if status == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_wss_client_gets_handshake_timeout_once_not_once_for_tls_and_again_for_http() {
    use crate::support::tls::*;
    let ca = TestCa::new("edge CA");
    let dir = TempDir::new("edge-wss");
    let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "gw");
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start_in(
        dir,
        &format!(
            "[gateway]\nname = \"t\"\n[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n[gateway.limits]\nhandshake_timeout = \"1500ms\"\nbackend_timeout = \"1s\"\n{}",
            cert.display(),
            key.display(),
            api_section("echo", "echo", &backend.url(), ""),
        ),
    );
    let addr = gw.wss.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca));
    // A prompt client is served.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (head, _ws) = handshake_on(tls, "localhost", "/echo", "").await;
    assert_eq!(status_of(&head), 101);
    // A slow one: TLS after 1 s, the request head 1 s after that. Each step is within
    // handshake_timeout on its own; together they are not.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _ = tls
        .write_all(request("/echo", Some("localhost"), "").as_bytes())
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut buf)).await;
    let answer = String::from_utf8_lossy(&buf);
    assert!(
        !answer.starts_with("HTTP/1.1 101"),
        "served after {:?}: {answer}",
        started.elapsed()
    );
    assert_eq!(
        contacted(&backend),
        1,
        "only the prompt client reached the backend"
    );
}

/// An absolute-form request target (RFC 9112 section 3.2.2) is served when its authority is
/// the `Host` (any case, routed by its path), and refused when they disagree (the refusal
/// table): routing and `X-Forwarded-Host` must not tell different stories.
#[tokio::test]
async fn an_absolute_form_target_that_names_the_host_is_served() {
    let (gw, chat, _admin) = two_apis().await;
    let addr = gw.ws.unwrap();
    let host = addr.to_string();
    let target = format!("http://{}/chat/room", host.to_uppercase());
    let (status, resp) = exchange(addr, &request(&target, Some(&host), "")).await;
    assert_eq!(status, 101, "{resp}");
    assert!(
        chat.last_head().starts_with("GET /ws/room HTTP/1.1"),
        "{}",
        chat.last_head()
    );
}

#[tokio::test]
async fn the_accept_loop_survives_running_out_of_descriptors() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[gateway.limits]\nmax_pending_handshakes = 10000\n{}",
        gateway_section(""),
        api_section("echo", "echo", &backend.url(), ""),
    ));
    let addr = gw.ws.unwrap();
    // Leave the gateway a few descriptors above what it uses now.
    let limit = gw.open_fds() + 8;
    let st = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &gw.pid().to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success());
    // Silent sockets use up the rest; the kernel keeps accepting into the backlog, the
    // gateway's accept(2) fails with EMFILE.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    gw.wait_record("accept_error", |_| true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        gw.records("accept_error").len(),
        1,
        "one line per episode, not one per failed accept"
    );
    drop(silent);
    // Served again once descriptors are free.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = exchange(addr, &request("/echo", Some(&addr.to_string()), "")).await;
        if status == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.wait_record("accept_recovered", |r| r["failures"].as_u64() >= Some(1))
        .await;
}

/// Every way the gateway refuses a handshake, as a client sees it: the status (and the headers
/// that go with it), `Connection: close` and the socket closed after the answer, a generic body
/// (the subscription messages are the deliberate exception), and no backend contacted unless the
/// refusal is about the backend.
#[tokio::test]
async fn every_refusal_answers_with_its_status_closes_and_leaves_the_backend_alone() {
    let backend = RawBackend::start(echo_frames()).await;
    let (refused_port, silent_addr) = unreachable_backends().await;
    let key = "refusal-test-key-0123456789";
    let gw = Gateway::start_with_env(
        TempDir::new("edge-refusals"),
        &format!(
            "{}[gateway.limits]\nbackend_timeout = \"1s\"\nmax_connections = 3\n\
             [[products]]\nname = \"gold\"\n[[products.subscriptions]]\nname = \"ann\"\nmax_connections = 1\nprimary_key_env = \"TG_REFUSAL_KEY\"\n\
             {}{}[apis.limits]\nmax_connections = 1\n{}{}{}",
            gateway_section(""),
            api_section("open", "open", &backend.url(), ""),
            api_section("one", "one", &backend.url(), ""),
            api_section("keyed", "keyed", &backend.url(), "products = [\"gold\"]"),
            api_section("down", "down", &format!("ws://127.0.0.1:{refused_port}/"), ""),
            api_section("slow", "slow", &format!("ws://{silent_addr}/"), ""),
        ),
        &[("TG_REFUSAL_KEY", key)],
    );
    let addr = gw.ws.unwrap();
    let host = addr.to_string();
    // Hold the API `one`'s single slot and ann's single slot.
    let (h1, _one) = ws_connect(addr, "/one", "").await;
    let (h2, _ann) = ws_connect(
        addr,
        "/keyed",
        &format!("Ocp-Apim-Subscription-Key: {key}\r\n"),
    )
    .await;
    assert_eq!((status_of(&h1), status_of(&h2)), (101, 101));
    let held = contacted(&backend);
    let big = format!("X-Big: {}\r\n", "a".repeat(20_000));
    let key_header = format!("Ocp-Apim-Subscription-Key: {key}\r\n");
    // (what, request, status, a header it must carry, whether the backend may be contacted)
    type Refusal<'a> = (&'a str, String, u16, Option<(&'a str, &'a str)>, bool);
    let cases: Vec<Refusal> = vec![
        (
            "no API",
            request("/nowhere", Some(&host), ""),
            404,
            None,
            false,
        ),
        (
            "path climbs out",
            request("/open/../one", Some(&host), ""),
            400,
            None,
            false,
        ),
        (
            "repeated Host",
            request("/open", Some(&host), "Host: b\r\n"),
            400,
            None,
            false,
        ),
        (
            "not an upgrade",
            format!("GET /open HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            400,
            None,
            false,
        ),
        (
            "absolute-form target naming another host",
            request("http://elsewhere.example/open", Some(&host), ""),
            400,
            None,
            false,
        ),
        (
            "wrong version",
            request("/open", Some(&host), "").replace("Version: 13", "Version: 8"),
            426,
            Some(("sec-websocket-version", "13")),
            false,
        ),
        (
            "POST",
            request("/open", Some(&host), "").replace("GET ", "POST "),
            400,
            None,
            false,
        ),
        (
            "head too large",
            request("/open", Some(&host), &big),
            431,
            None,
            false,
        ),
        (
            "no key",
            request("/keyed", Some(&host), ""),
            401,
            None,
            false,
        ),
        (
            "unknown key",
            request(
                "/keyed",
                Some(&host),
                "Ocp-Apim-Subscription-Key: nope-nope-nope-nope\r\n",
            ),
            401,
            None,
            false,
        ),
        (
            "subscription full",
            request("/keyed", Some(&host), &key_header),
            429,
            Some(("retry-after", "5")),
            false,
        ),
        (
            "API full",
            request("/one", Some(&host), ""),
            503,
            Some(("retry-after", "1")),
            false,
        ),
        (
            "backend down",
            request("/down", Some(&host), ""),
            502,
            None,
            true,
        ),
        (
            "backend silent",
            request("/slow", Some(&host), ""),
            504,
            None,
            true,
        ),
    ];
    for (what, req, status, must, backend_ok) in cases {
        let before = contacted(&backend);
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(req.as_bytes()).await;
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
            .await
            .unwrap_or_else(|_| panic!("{what}: the gateway must close after refusing"))
            .unwrap_or_default();
        let resp = String::from_utf8_lossy(&all).into_owned();
        assert_eq!(status_of(&resp), status, "{what}: {resp}");
        assert_eq!(
            header(&resp, "connection")
                .map(|v| v.to_ascii_lowercase())
                .as_deref(),
            Some("close"),
            "{what}: {resp}"
        );
        if let Some((name, value)) = must {
            assert_eq!(
                header(&resp, name).as_deref(),
                Some(value),
                "{what}: {resp}"
            );
        }
        let body = body_of(&resp);
        if status == 401 {
            assert!(body.starts_with("Access denied due to"), "{what}: {body}");
        } else if status != 431 {
            let generic = format!(
                "{}\n",
                http::StatusCode::from_u16(status)
                    .unwrap()
                    .canonical_reason()
                    .unwrap()
            );
            assert_eq!(body, generic, "{what}");
        }
        if !backend_ok {
            assert_eq!(
                contacted(&backend),
                before,
                "{what}: the backend was contacted"
            );
        }
    }
    // The gateway-wide limit: 3 slots, two held; a third connection takes the last one.
    let (h3, _third) = ws_connect(addr, "/open", "").await;
    assert_eq!(status_of(&h3), 101);
    let (status, resp) = exchange(addr, &request("/open", Some(&host), "")).await;
    assert_eq!(status, 503, "gateway full: {resp}");
    assert_eq!(header(&resp, "retry-after").as_deref(), Some("1"));
    assert_eq!(
        contacted(&backend),
        held + 1,
        "only the admitted third reached the backend"
    );
}

/// The request head is read without an HTTP server library (issue 21): what such a library did
/// for the gateway is held here. A head over `max_header_bytes` gets 431 and one httparse will
/// not take 400, each with the generic body and `Connection: close`, logged as
/// `request_refused` with a fixed reason (nothing the client sent); the 431 arrives intact and
/// the connection ends cleanly even while the client is still sending its head (the gateway
/// reads and discards the rest instead of resetting the connection under its answer); the
/// answer to HEAD has no body; a head dribbled a byte at a time is still a handshake.
#[tokio::test]
async fn request_heads_are_refused_cleanly_and_a_dribbled_one_is_served() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[gateway.limits]\nmax_header_bytes = 8192\n{}",
        gateway_section(""),
        api_section("open", "open", &backend.url(), ""),
    ));
    let addr = gw.ws.unwrap();
    let host = addr.to_string();

    // 200 KB of header lines, written while the answer is read.
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let line = format!("X-Filler: {}\r\n", "f".repeat(990));
    let big = request("/open", Some(&host), &line.repeat(200));
    let (answered_tx, answered) = tokio::sync::oneshot::channel::<()>();
    let more_line = line.clone();
    let writer = tokio::spawn(async move {
        let first = wr.write_all(big.as_bytes()).await;
        // A client still sending after the answer came (its head was not over yet): the
        // gateway reads and discards it for a moment instead of resetting the connection.
        let _ = answered.await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let more = wr.write_all(more_line.as_bytes()).await;
        (first, more)
    });
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut all))
        .await
        .expect("the gateway closes after a 431");
    let _ = answered_tx.send(());
    let resp = String::from_utf8_lossy(&all).into_owned();
    assert!(read.is_ok(), "{read:?}: {resp}");
    let (first, more) = writer.await.unwrap();
    assert!(
        first.is_ok() && more.is_ok(),
        "the connection was reset while the client was sending: {first:?} {more:?}"
    );
    assert_eq!(status_of(&resp), 431, "{resp}");
    assert_eq!(
        header(&resp, "connection").as_deref(),
        Some("close"),
        "{resp}"
    );
    assert_eq!(
        body_of(&resp),
        "Request Header Fields Too Large\n",
        "{resp}"
    );
    let rec = gw
        .wait_record("request_refused", |r| r["status"] == 431)
        .await;
    let hits = sample(
        &scrape(gw.admin.unwrap()).await,
        "tollgate_limits_hit_total",
        &[("api", ""), ("limit", "max_header_bytes")],
    );
    assert_eq!(hits, Some(1.0), "a 431 is counted");
    assert_eq!(
        rec["reason"], "request head larger than 8192 bytes",
        "{rec}"
    );

    // A header name with a space: 400, and the reason names the rule, not the input.
    let (status, resp) = exchange(
        addr,
        &request("/open", Some(&host), "Bad Secret-Name: v\r\n"),
    )
    .await;
    assert_eq!(status, 400, "{resp}");
    assert_eq!(body_of(&resp), "Bad Request\n", "{resp}");
    assert_eq!(
        header(&resp, "connection").as_deref(),
        Some("close"),
        "{resp}"
    );
    let rec = gw
        .wait_record("request_refused", |r| r["status"] == 400)
        .await;
    assert_eq!(
        rec["reason"], "malformed request head: invalid header name",
        "{rec}"
    );
    assert!(!rec.to_string().contains("Secret"), "{rec}");

    // HEAD: refused (not a GET), with the length of the body it does not carry.
    let (status, resp) = exchange(
        addr,
        &request("/open", Some(&host), "").replacen("GET ", "HEAD ", 1),
    )
    .await;
    assert_eq!(status, 400, "{resp}");
    assert_eq!(body_of(&resp), "", "{resp}");
    assert_eq!(
        header(&resp, "content-length").as_deref(),
        Some("12"),
        "{resp}"
    );

    // A byte at a time, 2 ms apart: a handshake, and the connection echoes.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for b in request("/open", Some(&host), "").bytes() {
        s.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (head, carry) = read_head(&mut s).await.unwrap();
    assert_eq!(status_of(&head), 101, "{head}");
    assert!(
        header(&head, "date").is_some_and(|d| d.ends_with(" GMT")),
        "{head}"
    );
    let mut ws = RawWs::new(s, carry, true);
    ws.send(true, 1, b"dribbled").await.unwrap();
    let f = ws.read_frame().await.unwrap();
    assert_eq!(f.payload, b"dribbled");
}

/// A client that sends frames before its 101 (allowed to try; RFC 6455 says to wait): what it
/// sent while the gateway waited on the backend is neither lost nor taken for the client going
/// away, and reaches the backend, in order, after the backend's 101.
#[tokio::test]
async fn frames_sent_before_the_101_reach_the_backend_after_it() {
    use tokio::net::TcpListener;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (head, mut carry) = read_head(&mut s).await.unwrap();
        let key = header(&head, "sec-websocket-key").unwrap();
        // The 101 comes late: the client's frames arrive at the gateway meanwhile.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_for(&key)
        );
        s.write_all(answer.as_bytes()).await.unwrap();
        let want = 2 * (2 + 4 + 5);
        while carry.len() < want {
            let mut b = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => carry.extend_from_slice(&b[..n]),
                _ => break,
            }
        }
        let _ = tx.send(carry);
    });
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section(""),
        api_section("late", "late", &format!("ws://{backend_addr}/"), ""),
    ));
    let addr = gw.ws.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request("/late", Some(&addr.to_string()), "").as_bytes())
        .await
        .unwrap();
    // Two masked text frames, "early" and "later", 100 ms and 200 ms into the backend's wait.
    let frame = |text: &[u8]| {
        let mask = [1u8, 2, 3, 4];
        let mut f = vec![0x81, 0x80 | text.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    };
    let mut sent = Vec::new();
    for text in [&b"early"[..], b"later"] {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let f = frame(text);
        s.write_all(&f).await.unwrap();
        sent.extend_from_slice(&f);
    }
    let (head, _) = read_head(&mut s).await.unwrap();
    assert_eq!(status_of(&head), 101, "{head}");
    let got = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("the backend heard the frames")
        .unwrap();
    assert_eq!(got, sent, "the frames sent before the 101, as sent");
    assert!(gw.records("handshake_abandoned").is_empty());
}
