//! WebSocket passthrough through the real gateway binary: frames, fragments, close codes,
//! header forwarding, and how backend failures reach the client.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn manifest(backend: &str, extra_api: &str) -> String {
    format!(
        "{}{}",
        gateway_section(""),
        api_section("echo", "echo", backend, extra_api)
    )
}

#[tokio::test]
async fn echo_sizes_and_types_through_gateway() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    for (op, len) in [
        (1u8, 0usize),
        (1, 5),
        (2, 125),
        (2, 126),
        (2, 65535),
        (2, 65536),
        (1, 200_000),
    ] {
        let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        ws.send(true, op, &payload).await.unwrap();
        let f = ws.read_frame().await.unwrap();
        assert_eq!((f.fin, f.opcode, f.masked), (true, op, false), "len {len}");
        assert_eq!(f.payload.len(), len);
        assert_eq!(f.payload, payload, "payload of len {len}");
    }
    ws.close(1000, "done").await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1000));
    assert_eq!(f.close_reason(), "done");
    let rec = gw
        .wait_record("connection_closed", |v| v["api"] == "echo")
        .await;
    assert_eq!(rec["closed_by"], "client");
    assert_eq!(rec["close_code"], 1000);
    assert_eq!(rec["client_messages"], 7);
    assert_eq!(rec["backend_messages"], 7);
    let hs = gw.wait_record("handshake", |v| v["status"] == 101).await;
    assert_eq!(hs["operation"], "onHandshake");
    assert_eq!(hs["api"], "echo");
}

#[tokio::test]
async fn fragments_stay_fragments_and_ping_between_them() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(false, 1, b"Hel").await.unwrap();
    ws.send(true, 9, b"ping!").await.unwrap();
    ws.send(false, 0, b"lo, ").await.unwrap();
    ws.send(true, 0, b"world").await.unwrap();
    ws.send(false, 2, &[1, 2]).await.unwrap();
    ws.send(true, 0, &[3]).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..6 {
        let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        got.push((f.fin, f.opcode, f.masked, f.payload));
    }
    assert_eq!(
        got,
        vec![
            (false, 1, true, b"Hel".to_vec()),
            (true, 9, true, b"ping!".to_vec()),
            (false, 0, true, b"lo, ".to_vec()),
            (true, 0, true, b"world".to_vec()),
            (false, 2, true, vec![1, 2]),
            (true, 0, true, vec![3]),
        ]
    );
}

#[tokio::test]
async fn backend_fragments_and_rsv_bits_reach_client_verbatim() {
    // RSV bits are only valid with an agreed extension: the client offers permessage-deflate
    // and the backend accepts it (the frames below are not really compressed: the gateway
    // does not look inside them).
    let handler: Handler = Arc::new(|_h, mut ws| {
        Box::pin(async move {
            let _ = ws.send_raw(&encode_frame(false, 4, 1, b"ab", None)).await;
            let _ = ws.send_raw(&encode_frame(true, 0, 10, b"pong", None)).await;
            let _ = ws.send_raw(&encode_frame(true, 0, 0, b"cd", None)).await;
            let _ = ws.read_until_close().await;
        })
    });
    let backend = RawBackend::start(handler).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (head, mut ws) = ws_connect(
        gw.ws.unwrap(),
        "/echo",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    )
    .await;
    assert_eq!(
        header(&head, "sec-websocket-extensions").as_deref(),
        Some("permessage-deflate")
    );
    let a = ws.read_frame().await.unwrap();
    let b = ws.read_frame().await.unwrap();
    let c = ws.read_frame().await.unwrap();
    assert_eq!(
        (a.fin, a.rsv, a.opcode, a.payload.as_slice()),
        (false, 4, 1, &b"ab"[..])
    );
    assert_eq!(
        (b.fin, b.opcode, b.payload.as_slice()),
        (true, 10, &b"pong"[..])
    );
    assert_eq!(
        (c.fin, c.opcode, c.payload.as_slice()),
        (true, 0, &b"cd"[..])
    );
}

#[tokio::test]
async fn close_codes_and_reasons_pass_both_ways() {
    // Backend-initiated close.
    let handler: Handler = Arc::new(|_h, mut ws| {
        Box::pin(async move {
            let _ = ws.close(4001, "backend says bye").await;
            let _ = ws.read_until_close().await;
        })
    });
    let backend = RawBackend::start(handler).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(
        (f.close_code(), f.close_reason().as_str()),
        (Some(4001), "backend says bye")
    );
    ws.close(4001, "").await.unwrap();
    assert!(ws.expect_eof(Duration::from_secs(5)).await);
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "backend");
    assert_eq!(rec["close_code"], 4001);

    // Client-initiated close reaches the backend with its code.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.close(3999, "client reason").await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (f.close_code(), f.close_reason().as_str()),
        (Some(3999), "client reason")
    );
    let back = ws.read_until_close().await.unwrap();
    assert_eq!(back.close_code(), Some(3999));
}

#[tokio::test]
async fn tungstenite_client_roundtrip_and_subprotocol() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        gw.ws_url("/echo"),
    )
    .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "chat.v2, chat.v1".parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "chat.v2"
    );
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2])).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2])
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn end_to_end_headers_forwarded_hop_by_hop_not() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&format!("ws://{}/base", backend.addr), ""));
    let (head, _ws) = ws_connect(
        gw.ws.unwrap(),
        "/echo/room/42?user=ann&x=1",
        "Origin: https://app.example\r\nCookie: session=abc\r\nAuthorization: Bearer t0k\r\nX-Custom: yes\r\nKeep-Alive: timeout=5\r\nX-Hop: drop-me\r\nConnection: Upgrade, X-Hop\r\nSec-WebSocket-Protocol: p1\r\nX-Forwarded-For: 10.9.8.7\r\nProxy-Authorization: Basic secret\r\nTE: trailers\r\nTrailer: X-Checksum\r\nProxy-Connection: keep-alive\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n",
    )
    .await;
    assert_eq!(
        header(&head, "sec-websocket-protocol").as_deref(),
        Some("p1")
    );
    let seen = backend.last_head();
    let request_line = seen.lines().next().unwrap();
    assert_eq!(request_line, "GET /base/room/42?user=ann&x=1 HTTP/1.1");
    assert_eq!(
        header(&seen, "origin").as_deref(),
        Some("https://app.example")
    );
    assert_eq!(header(&seen, "cookie").as_deref(), Some("session=abc"));
    assert_eq!(
        header(&seen, "authorization").as_deref(),
        Some("Bearer t0k")
    );
    assert_eq!(header(&seen, "x-custom").as_deref(), Some("yes"));
    // The client is no trusted proxy: its own X-Forwarded-For is replaced, not extended.
    assert_eq!(
        header(&seen, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(header(&seen, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        header(&seen, "x-forwarded-host"),
        Some(gw.ws.unwrap().to_string())
    );
    assert_eq!(header(&seen, "host"), Some(backend.addr.to_string()));
    assert_eq!(
        header(&seen, "sec-websocket-protocol").as_deref(),
        Some("p1")
    );
    assert_eq!(header(&seen, "keep-alive"), None);
    assert_eq!(header(&seen, "x-hop"), None);
    assert_eq!(header(&seen, "proxy-authorization"), None);
    assert_eq!(header(&seen, "proxy-connection"), None);
    assert_eq!(header(&seen, "te"), None);
    assert_eq!(header(&seen, "trailer"), None);
    // The client's own X-Forwarded-Proto/-Host were replaced (one value each, the gateway's).
    assert_eq!(headers_all(&seen, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        headers_all(&seen, "x-forwarded-host"),
        vec![gw.ws.unwrap().to_string()]
    );
    // The backend gets its own key, not the client's.
    assert_ne!(
        header(&seen, "sec-websocket-key").as_deref(),
        Some(TEST_KEY)
    );
}

#[tokio::test]
async fn routing_is_by_whole_path_segments() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (head, _) = raw_handshake(gw.ws.unwrap(), "/echoes", "").await;
    assert_eq!(status_of(&head), 404, "{head}");
    let (head, _) = raw_handshake(gw.ws.unwrap(), "/other", "").await;
    assert_eq!(status_of(&head), 404);
    ws_connect(gw.ws.unwrap(), "/echo/", "").await;
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn bad_upgrades_get_400_or_426() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let addr = gw.ws.unwrap();
    let cases = [
        ("GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("POST /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n", 400),
        ("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
        ("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", 400),
        ("GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n", 426),
    ];
    for (req, want) in cases {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let (head, _) = read_head(&mut s).await.unwrap();
        assert_eq!(status_of(&head), want, "for request:\n{req}\ngot:\n{head}");
        if want == 426 {
            assert_eq!(
                header(&head, "sec-websocket-version").as_deref(),
                Some("13")
            );
        }
    }
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    // The log line may trail the response by a moment: wait for it.
    let rec = gw.wait_record("handshake", |r| r["status"] == 426).await;
    assert!(rec["reason"].as_str().unwrap().contains("Version"), "{rec}");
}

/// Backend refuses / answers 403 / answers 200: the client gets 502 / 403 / 502, and what the
/// client sends afterwards never reaches the backend (no tunnel on a failed upgrade).
#[tokio::test]
async fn failed_backend_upgrades_never_open_a_tunnel() {
    // Refused: a port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let gw = Gateway::start(&manifest(&format!("ws://{dead}/"), ""));
    let (head, _) = raw_handshake(gw.ws.unwrap(), "/echo", "").await;
    assert_eq!(status_of(&head), 502, "{head}");
    let rec = gw.wait_record("handshake", |v| v["status"] == 502).await;
    assert!(
        rec["reason"].as_str().unwrap().contains("cannot connect"),
        "{rec}"
    );

    for (resp, want) in [
        ("HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nforbidden", 403u16),
        ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 502),
        ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: wrong\r\n\r\n", 502),
    ] {
        // The backend reports how many bytes reached it after its answer, once the gateway
        // has closed its connection.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let handler: Handler = Arc::new(move |_h, mut ws| {
            let tx = tx.clone();
            Box::pin(async move {
                let mut buf = [0u8; 1024];
                let mut got = ws.buf.len();
                loop {
                    use tokio::io::AsyncReadExt;
                    match ws.io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                }
                let _ = tx.send(got);
            })
        });
        let backend = RawBackend::start_with(handler, Some(resp.to_owned())).await;
        let gw = Gateway::start(&manifest(&backend.url(), ""));
        let (head, mut ws) = raw_handshake(gw.ws.unwrap(), "/echo", "").await;
        assert_eq!(status_of(&head), want, "backend answered {resp:?}; client got:\n{head}");
        if want == 403 {
            // The backend's own body reaches the client.
            let mut body = ws.buf.clone();
            let mut chunk = [0u8; 256];
            while !body.ends_with(b"forbidden") {
                use tokio::io::AsyncReadExt;
                match tokio::time::timeout(Duration::from_secs(5), ws.io.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                    _ => panic!("403 body not received: {:?}", String::from_utf8_lossy(&body)),
                }
            }
        }
        // Try to smuggle a frame and a second request through (the gateway may already have
        // closed the socket, so a failed send is fine: what matters is what arrives).
        let _ = ws.send(true, 1, b"smuggled").await;
        let _ = ws.send_raw(b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n").await;
        // The gateway closes both connections: the client's after the answer...
        assert!(ws.expect_eof(Duration::from_secs(10)).await, "client connection left open ({resp:?})");
        // ...and the backend's, which received nothing after its answer.
        let after = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("backend connection left open ({resp:?})"));
        assert_eq!(after, Some(0), "bytes reached the backend after a failed upgrade ({resp:?})");
        assert_eq!(backend.connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn backend_too_slow_gets_504() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // Accepts and never answers.
    let hold = tokio::spawn(async move {
        let mut socks = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            socks.push(s);
        }
    });
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section("[gateway.limits]\nbackend_timeout = \"500ms\""),
        api_section("echo", "echo", &format!("ws://{addr}/"), "")
    ));
    let t = std::time::Instant::now();
    let (head, _) = raw_handshake(gw.ws.unwrap(), "/echo", "").await;
    assert_eq!(status_of(&head), 504, "{head}");
    assert!(t.elapsed() < Duration::from_secs(5));
    hold.abort();
}

/// Frames cross verbatim: the backend receives the client's bytes exactly as sent, each
/// frame's masking key included (the gateway unmasks only a copy, to check text).
#[tokio::test]
async fn client_frames_reach_the_backend_byte_for_byte_with_their_masking_keys() {
    let frames = [
        encode_frame(
            true,
            0,
            1,
            "héllo".as_bytes(),
            Some([0xde, 0xad, 0xbe, 0xef]),
        ),
        encode_frame(false, 0, 2, &[7u8; 300], Some([1, 2, 3, 4])),
        encode_frame(true, 0, 9, b"ping", Some([0x80, 0x80, 0x80, 0x80])),
        encode_frame(true, 0, 0, b"end", Some([9, 8, 7, 6])),
    ]
    .concat();
    let want = frames.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let handler: Handler = Arc::new(move |_h, mut ws| {
        let tx = tx.clone();
        Box::pin(async move {
            use tokio::io::AsyncReadExt;
            let mut got = ws.buf.clone();
            let mut chunk = [0u8; 1024];
            while got.len() < want {
                match ws.io.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = tx.send(got);
        })
    });
    let backend = RawBackend::start(handler).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send_raw(&frames).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, frames);
}

/// A backend that answers its handshake with anything but a valid 101 to what was offered:
/// 1xx and 2xx become 502; 3xx-5xx reach the client with their body and only Content-Type,
/// WWW-Authenticate, Retry-After and Location; a 101 with a subprotocol or extension the
/// client did not offer is a 502. Every answer closes the connection (README, "Backend
/// handshake").
#[tokio::test]
async fn backend_answers_reach_the_client_as_documented() {
    struct Case {
        what: &'static str,
        offer: &'static str,
        answer: &'static str,
        status: u16,
        kept: &'static [(&'static str, &'static str)],
        body: &'static str,
    }
    let switching = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n";
    let cases = [
        // Interim answers are skipped; the final one decides.
        Case {
            what: "100 Continue, then nothing",
            offer: "",
            answer: "HTTP/1.1 100 Continue\r\n\r\n",
            status: 504,
            kept: &[],
            body: "",
        },
        Case {
            what: "103 Early Hints, then 403",
            offer: "",
            answer: "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
            status: 403,
            kept: &[],
            body: "",
        },
        Case {
            what: "204",
            offer: "",
            answer: "HTTP/1.1 204 No Content\r\nX-Internal: 1\r\n\r\n",
            status: 502,
            kept: &[],
            body: "",
        },
        Case {
            what: "200 with a page",
            offer: "",
            answer: "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-Internal: 1\r\nContent-Length: 25\r\n\r\n<h1>backend's page</h1>\r\n",
            status: 502,
            kept: &[],
            body: "",
        },
        Case {
            what: "302 with Location",
            offer: "",
            answer: "HTTP/1.1 302 Found\r\nLocation: wss://other.example/ws\r\nSet-Cookie: s=1\r\nX-Internal: 1\r\nContent-Length: 0\r\n\r\n",
            status: 302,
            kept: &[("location", "wss://other.example/ws")],
            body: "",
        },
        Case {
            what: "401 with WWW-Authenticate",
            offer: "",
            answer: "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"api\"\r\nContent-Type: application/json\r\nX-Internal: 1\r\nContent-Length: 17\r\n\r\n{\"error\":\"login\"}",
            status: 401,
            kept: &[
                ("www-authenticate", "Bearer realm=\"api\""),
                ("content-type", "application/json"),
            ],
            body: "{\"error\":\"login\"}",
        },
        Case {
            what: "503 with Retry-After",
            offer: "",
            answer: "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\nContent-Type: text/plain\r\nServer: backend/1.0\r\nContent-Length: 4\r\n\r\nbusy",
            status: 503,
            kept: &[("retry-after", "30"), ("content-type", "text/plain")],
            body: "busy",
        },
        Case {
            what: "101 choosing a subprotocol that was not offered",
            offer: "Sec-WebSocket-Protocol: p1\r\n",
            answer: "Sec-WebSocket-Protocol: p2\r\n\r\n",
            status: 502,
            kept: &[],
            body: "",
        },
        Case {
            what: "101 with a subprotocol when none was offered",
            offer: "",
            answer: "Sec-WebSocket-Protocol: p1\r\n\r\n",
            status: 502,
            kept: &[],
            body: "",
        },
        Case {
            what: "101 with an extension that was not offered",
            offer: "",
            answer: "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            status: 502,
            kept: &[],
            body: "",
        },
    ];
    for c in cases {
        // A backend that answers with `c.answer` (a 101's head completed with the right
        // accept value for the gateway's key), then waits for the gateway to close.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
        let answer = c.answer;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let (head, _) = read_head(&mut s).await.unwrap();
            let text = if answer.starts_with("HTTP/") {
                answer.to_owned()
            } else {
                let key = header(&head, "sec-websocket-key").unwrap_or_default();
                switching.replace("{accept}", &accept_for(&key)) + answer
            };
            s.write_all(text.as_bytes()).await.unwrap();
            use tokio::io::AsyncReadExt;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
            let _ = tx.send(rest.len());
        });
        // A short backend_timeout for the backend that never gives a final answer.
        let gw = Gateway::start(&format!(
            "{}{}",
            gateway_section("[gateway.limits]\nbackend_timeout = \"1s\""),
            api_section("echo", "echo", &format!("ws://{addr}/"), "")
        ));
        let (head, mut ws) = raw_handshake(gw.ws.unwrap(), "/echo", c.offer).await;
        let what = c.what;
        assert_eq!(status_of(&head), c.status, "{what}:\n{head}");
        assert_eq!(
            header(&head, "connection").as_deref(),
            Some("close"),
            "{what}:\n{head}"
        );
        for (name, value) in c.kept {
            assert_eq!(
                header(&head, name).as_deref(),
                Some(*value),
                "{what}:\n{head}"
            );
        }
        for dropped in [
            "x-internal",
            "set-cookie",
            "server",
            "sec-websocket-protocol",
            "sec-websocket-extensions",
            "upgrade",
        ] {
            assert_eq!(
                header(&head, dropped),
                None,
                "{what}: {dropped} passed on:\n{head}"
            );
        }
        let mut body = ws.buf.clone();
        {
            use tokio::io::AsyncReadExt;
            let _ =
                tokio::time::timeout(Duration::from_secs(10), ws.io.read_to_end(&mut body)).await;
        }
        let body = String::from_utf8_lossy(&body);
        if c.body.is_empty() {
            // The gateway's own answer: nothing of a 2xx backend's page or headers.
            assert!(!body.contains("backend's page"), "{what}: {body}");
            assert_ne!(
                header(&head, "content-type").as_deref(),
                Some("text/html"),
                "{what}"
            );
        } else {
            assert_eq!(body, c.body, "{what}");
        }
        assert!(
            ws.expect_eof(Duration::from_secs(10)).await,
            "{what}: client left open"
        );
        // The backend's connection is closed too, with nothing sent after its answer.
        let after = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: backend connection left open"));
        assert_eq!(after, Some(0), "{what}");
        let r = gw
            .wait_record("handshake", |r| r["status"] == c.status)
            .await;
        assert_eq!(r["api"], "echo", "{what}: {r}");
    }
}

/// The client's 101 carries the backend's end-to-end headers (cookies, its own `X-` headers)
/// but none of its hop-by-hop ones, none of the forwarding headers the gateway sets itself, and
/// not its `Date` or `Server`: the 101 is the gateway's answer (README, "Backend handshake").
#[tokio::test]
async fn the_backends_101_headers_reach_the_client_end_to_end_only() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (head, _) = read_head(&mut s).await.unwrap();
        let key = header(&head, "sec-websocket-key").unwrap_or_default();
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\n\
             Sec-WebSocket-Accept: {}\r\nSet-Cookie: s=1\r\nX-Backend: kept\r\nX-Hop: dropped\r\n\
             Keep-Alive: timeout=5\r\nX-Forwarded-For: 10.1.2.3\r\nServer: backend/1.0\r\n\
             Date: Mon, 01 Jan 2001 00:00:00 GMT\r\n\r\n",
            accept_for(&key)
        );
        s.write_all(answer.as_bytes()).await.unwrap();
        let mut sink = [0u8; 1024];
        while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    let gw = Gateway::start(&manifest(&format!("ws://{addr}/"), ""));
    let (head, _ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    assert_eq!(
        header(&head, "set-cookie").as_deref(),
        Some("s=1"),
        "{head}"
    );
    assert_eq!(
        header(&head, "x-backend").as_deref(),
        Some("kept"),
        "{head}"
    );
    for dropped in ["x-hop", "keep-alive", "x-forwarded-for", "server"] {
        assert_eq!(header(&head, dropped), None, "{dropped} passed on:\n{head}");
    }
    let dates = headers_all(&head, "date");
    assert!(
        dates.len() <= 1 && !dates.iter().any(|d| d.contains("2001")),
        "the backend's Date passed on:\n{head}"
    );
    assert_eq!(headers_all(&head, "connection"), vec!["Upgrade"], "{head}");
}
