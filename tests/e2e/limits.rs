//! Limits: connection caps (503), slowloris (handshake_timeout), header size (431), idle
//! timeout, frame size (1009), protocol violations (1002).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn manifest(backend: &str, gw_limits: &str, api_extra: &str) -> String {
    format!(
        "{}{}",
        gateway_section(&format!("[gateway.limits]\n{gw_limits}")),
        api_section("echo", "echo", backend, api_extra)
    )
}

#[tokio::test]
async fn over_max_connections_gets_503_and_a_close_frees_the_slot() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(
        &backend.url(),
        "max_connections = 3",
        "[apis.limits]\nmax_connections = 2",
    ));
    let addr = gw.ws.unwrap();
    let (_, mut a) = ws_connect(addr, "/echo", "").await;
    let (_, _b) = ws_connect(addr, "/echo", "").await;
    let (head, _) = raw_handshake(addr, "/echo", "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    assert_eq!(header(&head, "retry-after").as_deref(), Some("1"));
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    a.close(1000, "").await.unwrap();
    a.read_until_close().await.unwrap();
    // The slot comes back as soon as the relay has ended.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (head, _c) = raw_handshake(addr, "/echo", "").await;
        if status_of(&head) == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {head}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.wait_record("handshake", |r| r["status"] == 503).await;
}

#[tokio::test]
async fn slowloris_is_cut_at_handshake_timeout_while_others_connect() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&backend.url(), "handshake_timeout = \"1s\"", ""));
    let addr = gw.ws.unwrap();
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let drip = async {
        let mut buf = [0u8; 512];
        loop {
            // One header byte every 200 ms: never finishes in time.
            if slow.write_all(b"X").await.is_err() {
                return;
            }
            match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {} // e.g. a 408 before the close
                Err(_) => {}
            }
            if started.elapsed() > Duration::from_secs(10) {
                panic!("slow client was never cut off");
            }
        }
    };
    // Another client connects and relays while the slow one is still dripping.
    let other = async {
        let (_, mut ws) = ws_connect(addr, "/echo", "").await;
        ws.send(true, 1, b"fine").await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, b"fine");
    };
    tokio::join!(drip, other);
    let cut_after = started.elapsed();
    assert!(
        cut_after >= Duration::from_millis(900),
        "cut too early: {cut_after:?}"
    );
    // Cut by the handshake timeout (the drip panics if nothing cuts it within 10 s).
    let r = gw.wait_record("handshake_timeout", |_| true).await;
    assert!(
        r["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{r}"
    );
}

#[tokio::test]
async fn oversized_handshake_head_gets_431() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&backend.url(), "max_header_bytes = 8192", ""));
    let big = format!("X-Big: {}\r\n", "a".repeat(10_000));
    let (head, _) = raw_handshake(gw.ws.unwrap(), "/echo", &big).await;
    assert_eq!(status_of(&head), 431, "{head}");
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn idle_connections_get_1001_on_both_sides() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&manifest(&backend.url(), "idle_timeout = \"2s\"", ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    // Activity every 200 ms keeps it open for longer than the idle timeout (a stall of ten
    // times that on a loaded machine would be needed to fail this part)...
    let opened = Instant::now();
    while opened.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ws.send(true, 1, b"still here").await.unwrap();
    }
    let started = Instant::now();
    let f = tokio::time::timeout(Duration::from_secs(15), ws.read_until_close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.close_code(), Some(1001));
    // ...and only silence closes it.
    assert!(started.elapsed() >= Duration::from_millis(1800));
    let mut backend_close = None;
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        if f.opcode == 8 {
            backend_close = f.close_code();
            break;
        }
    }
    assert_eq!(backend_close, Some(1001));
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "idle_timeout");
}

#[tokio::test]
async fn oversized_frame_gets_1009_and_never_reaches_backend() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&manifest(
        &backend.url(),
        "",
        "[apis.limits]\nmax_frame_size = 1000",
    ));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 2, &[7u8; 1000]).await.unwrap();
    ws.send(true, 2, &[8u8; 1001]).await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1009));
    let mut got = Vec::new();
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
        let close = f.opcode == 8;
        got.push(f);
        if close {
            break;
        }
    }
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].payload.len(), 1000);
    assert_eq!(got[1].opcode, 8);
    assert!(got.iter().all(|f| f.payload.len() != 1001));
}

#[tokio::test]
async fn after_a_client_violation_the_backends_answers_arrive_first_and_a_silent_backend_costs_a_second(
) {
    // A backend that answers the client's valid message only after a while, and then says
    // nothing more (it never answers the gateway's close).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handler: Handler = Arc::new(move |_h, mut ws| {
        let tx = tx.clone();
        Box::pin(async move {
            let first = ws.read_frame().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = ws
                .send_raw(&encode_frame(true, 0, 1, &first.payload, None))
                .await;
            while let Ok(f) = ws.read_frame().await {
                let _ = tx.send(f);
            }
        })
    });
    let backend = RawBackend::start(handler).await;
    let gw = Gateway::start(&manifest(&backend.url(), "", ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 1, b"answer me").await.unwrap();
    ws.send_raw(&encode_frame(true, 0, 1, b"not masked", None))
        .await
        .unwrap();
    let started = Instant::now();
    // The answer to the valid message still arrives, then the gateway's own 1002.
    let answer = ws.read_frame().await.unwrap();
    assert_eq!(
        (answer.opcode, answer.payload.as_slice()),
        (1, &b"answer me"[..])
    );
    let close = ws.read_frame().await.unwrap();
    assert_eq!(close.close_code(), Some(1002));
    let waited = started.elapsed();
    // At least the 1 s the backend had to answer, and not the 5 s grace of an ordinary close
    // (the upper bound leaves a 4 s margin for a loaded machine).
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_millis(4900),
        "the client's close should come after the 1 s the backend had to answer: {waited:?}"
    );
    // The backend got the protocol error's close, never the unmasked frame.
    let got = tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.close_code(), Some(1002), "{got:?}");
    assert!(ws.expect_eof(Duration::from_secs(3)).await);
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "client_violation");
}

#[tokio::test]
async fn unmasked_client_frame_gets_1002() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&manifest(&backend.url(), "", ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send_raw(&encode_frame(true, 0, 1, b"not masked", None))
        .await
        .unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1002));
    let first = tokio::time::timeout(Duration::from_secs(3), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first.opcode, 8,
        "the unmasked frame must not be forwarded: {first:?}"
    );
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "client_violation");
}

/// With `idle_timeout` off, an idle connection costs nothing: the relay's timer sleeps until a
/// deadline far away instead of firing again and again (a leak check with a wide margin: a
/// timer that spins burns a whole core, an idle gateway a few milliseconds).
#[tokio::test]
async fn an_idle_connection_without_idle_timeout_costs_no_cpu() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(
        &backend.url(),
        "",
        "[apis.limits]\nidle_timeout = \"0s\"",
    ));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 1, b"hi").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
    let before = gw.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = gw.cpu_time() - before;
    assert!(
        used < Duration::from_millis(500),
        "an idle connection cost {used:?} of CPU in 2 s"
    );
    // Still relaying after the idle time.
    ws.send(true, 1, b"still there").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"still there");
}

/// A client violation found in the middle of a frame the backend has partly seen (invalid
/// UTF-8 late in a long text frame) leaves no frame boundary for a close towards the backend:
/// the client gets 1007 and the backend's socket is closed as soon as that is written, without
/// a close frame and without waiting out the grace.
#[tokio::test]
async fn a_client_violation_mid_frame_disconnects_the_backend_at_once() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (head, carry) = read_head(&mut s).await.unwrap();
        let key = header(&head, "sec-websocket-key").unwrap_or_default();
        let answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_for(&key)
        );
        s.write_all(answer.as_bytes()).await.unwrap();
        // Everything that arrives until the socket ends.
        let mut got = carry;
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(got);
    });
    let gw = Gateway::start(&manifest(&format!("ws://{addr}/"), "", ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    // A 100,000-byte text frame: valid ASCII first, which the backend receives...
    let mask = rand_mask();
    let mut payload = vec![b'a'; 100_000];
    payload[99_000] = 0xff;
    let frame = encode_frame(true, 0, 1, &payload, Some(mask));
    ws.send_raw(&frame[..50_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...then the rest, with the invalid byte.
    let t = Instant::now();
    ws.send_raw(&frame[50_000..]).await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(10), ws.read_until_close())
        .await
        .expect("no close for the client")
        .unwrap();
    assert_eq!(f.close_code(), Some(1007));
    let received = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the backend socket was left open")
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "the backend was disconnected after {:?}: the grace was waited out",
        t.elapsed()
    );
    // A prefix of the client's frame, byte for byte (masking kept): part of the frame, none
    // of the invalid byte, and nothing inserted (no close frame in the middle of a frame).
    assert!(
        received.len() >= 50_000 && received.len() < 14 + 99_000,
        "{}",
        received.len()
    );
    assert!(
        received == frame[..received.len()],
        "the backend got something else than a prefix of the client's frame"
    );
}
