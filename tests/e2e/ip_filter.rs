//! ip-filter through the real gateway: allow and forbid lists of IPv4 and IPv6 addresses and
//! CIDR networks, judged on the socket's peer, or, behind a trusted proxy, on the client its
//! `X-Forwarded-For` names; a client's own `X-Forwarded-For` gets it nowhere.

use std::sync::atomic::Ordering;

use crate::support::*;

/// One API per `(name, config)`, each behind ip-filter; `trusted`: `[gateway] trusted_proxies`.
fn start(backend: &RawBackend, trusted: &str, apis: &[(&str, &str)]) -> Gateway {
    let mut text = gateway_section(&format!(
        "plugin_dir = \"plugins\"\ntrusted_proxies = [{trusted}]"
    ));
    for (name, config) in apis {
        text.push_str(&api_section(
            name,
            name,
            &backend.url(),
            &format!("[[apis.on_handshake]]\nplugin = \"ip-filter\"\nconfig = {config}\n"),
        ));
    }
    let dir = TempDir::new("ip-filter");
    plugins::install(&dir.path().join("plugins"), &["ip_filter.wasm"]);
    Gateway::start_in(dir, &text)
}

async fn status(gw: &Gateway, path: &str, xff: Option<&str>) -> u16 {
    let extra = xff.map_or(String::new(), |x| format!("X-Forwarded-For: {x}\r\n"));
    let (head, _) = raw_handshake(gw.ws.unwrap(), path, &extra).await;
    status_of(&head)
}

/// A handshake whose `X-Forwarded-For` line carries a byte that is not ASCII (as a proxy
/// appending to a client's own line sends it).
async fn status_raw_xff(gw: &Gateway, path: &str, line: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.ws.unwrap())
        .await
        .unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {TEST_KEY}\r\nSec-WebSocket-Version: 13\r\nX-Forwarded-For: "
    )
    .into_bytes();
    req.extend_from_slice(line);
    req.extend_from_slice(b"\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut head = vec![0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    status_of(&String::from_utf8_lossy(&head[..n]))
}

#[tokio::test]
async fn without_a_trusted_proxy_the_socket_peer_is_judged() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(
        &backend,
        "",
        &[
            (
                "local",
                "{ action = \"allow\", addresses = [\"127.0.0.0/8\"] }",
            ),
            (
                "office",
                "{ action = \"allow\", addresses = [\"10.0.0.0/8\", \"2001:db8::/32\"] }",
            ),
            (
                "nolocal",
                "{ action = \"forbid\", ranges = [{ from = \"127.0.0.1\", to = \"127.0.0.9\" }] }",
            ),
        ],
    );
    let (head, mut ws) = ws_connect(gw.ws.unwrap(), "/local", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    ws.send(true, 1, b"in").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"in");
    assert_eq!(status(&gw, "/office", None).await, 403);
    // A client claiming to be in the office is still the peer it is.
    assert_eq!(status(&gw, "/office", Some("10.1.2.3")).await, 403);
    assert_eq!(status(&gw, "/office", Some("2001:db8::5")).await, 403);
    assert_eq!(status(&gw, "/nolocal", None).await, 403);
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "a refused handshake reached the backend"
    );
    let rec = gw
        .wait_record("handshake", |r| r["api"] == "office" && r["status"] == 403)
        .await;
    assert!(
        rec["reason"].as_str().unwrap().contains("ip-filter"),
        "{rec}"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_judged_ipv4_and_ipv6() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(
        &backend,
        "\"127.0.0.1\"",
        &[
            (
                "office",
                "{ action = \"allow\", addresses = [\"192.0.2.10\", \"2001:db8::/32\"] }",
            ),
            (
                "blocked",
                "{ action = \"forbid\", addresses = [\"198.51.100.0/24\", \"2001:db8:bad::/48\"] }",
            ),
        ],
    );
    assert_eq!(status(&gw, "/office", Some("192.0.2.10")).await, 101);
    assert_eq!(status(&gw, "/office", Some("2001:db8::5")).await, 101);
    assert_eq!(status(&gw, "/office", Some("192.0.2.11")).await, 403);
    assert_eq!(status(&gw, "/office", Some("2001:db9::5")).await, 403);
    // The chain is read from the right: a client cannot prepend its way in.
    assert_eq!(
        status(&gw, "/office", Some("192.0.2.10, 203.0.113.9")).await,
        403
    );
    // Without a forwarded address, the trusted proxy itself is the client.
    assert_eq!(status(&gw, "/office", None).await, 403);
    // Ports and brackets, as some proxies write entries.
    assert_eq!(status(&gw, "/office", Some("192.0.2.10:5678")).await, 101);
    assert_eq!(status(&gw, "/office", Some("[2001:db8::5]:443")).await, 101);
    // An entry that is not an address where the walk reads it: unknown, refused by either
    // list, never taken for the trusted proxy (which the blocked API would let through).
    assert_eq!(status(&gw, "/blocked", Some("unknown")).await, 403);
    assert_eq!(status(&gw, "/office", Some("unknown")).await, 403);
    assert_eq!(status(&gw, "/blocked", Some("198.51.100.7")).await, 403);
    assert_eq!(status(&gw, "/blocked", Some("2001:db8:bad::1")).await, 403);
    assert_eq!(status(&gw, "/blocked", Some("203.0.113.1")).await, 101);
    assert_eq!(status(&gw, "/blocked", Some("2001:db8:900d::1")).await, 101);
    // The blocked client hides behind a byte that is not ASCII: still not let through.
    assert_eq!(
        status_raw_xff(&gw, "/blocked", b"\xff, 198.51.100.7").await,
        403,
        "a forbidden client got through behind a non-ASCII entry"
    );
    assert_eq!(
        status_raw_xff(&gw, "/blocked", b"\xff").await,
        403,
        "an unreadable chain was taken for the trusted proxy"
    );
}

#[test]
fn a_bad_address_list_fails_the_check_naming_the_entry() {
    let dir = TempDir::new("ip-filter-bad");
    plugins::install(&dir.path().join("plugins"), &["ip_filter.wasm"]);
    let text = format!(
        "{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section(
            "chat",
            "chat",
            "ws://127.0.0.1:1/",
            "[[apis.on_handshake]]\nplugin = \"ip-filter\"\nconfig = { action = \"allow\", addresses = [\"10.0.0.0/33\"] }\n"
        )
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("plugin `ip-filter` refused its config") && err.contains("10.0.0.0/33"),
        "{err}"
    );
}
