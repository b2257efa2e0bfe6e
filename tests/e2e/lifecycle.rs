//! Connection lifecycle: one side vanishing, SIGTERM draining, no descriptor leaks under load,
//! and bounded memory for a huge streamed message.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn manifest(backend: &str, gw_limits: &str) -> String {
    format!(
        "{}{}",
        gateway_section(&format!("[gateway.limits]\n{gw_limits}")),
        api_section("echo", "echo", backend, "")
    )
}

#[tokio::test]
async fn backend_dying_closes_client_promptly() {
    let handler: Handler = Arc::new(|_h, mut ws| {
        Box::pin(async move {
            // One message, then the backend process "dies": socket dropped, no close frame.
            let _ = ws.read_frame().await;
        })
    });
    let backend = RawBackend::start(handler).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 1, b"last words").await.unwrap();
    let t = Instant::now();
    let f = tokio::time::timeout(Duration::from_secs(3), ws.read_until_close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.close_code(), Some(1011));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        ws.expect_eof(Duration::from_secs(3)).await,
        "client socket left open"
    );
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "backend_dropped");
}

#[tokio::test]
async fn client_vanishing_closes_backend() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Option<u16>, bool)>();
    let handler: Handler = Arc::new(move |_h, mut ws| {
        let tx = tx.clone();
        Box::pin(async move {
            let f = ws.read_until_close().await.ok();
            let eof = ws.expect_eof(Duration::from_secs(3)).await;
            let _ = tx.send((f.and_then(|f| f.close_code()), eof));
        })
    });
    let backend = RawBackend::start(handler).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let (_, ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    drop(ws);
    let (code, eof) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code, Some(1001));
    assert!(eof, "backend socket left half-open");
}

#[tokio::test]
async fn sigterm_sends_1001_to_both_sides_and_exits_within_drain_timeout() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let mut gw = Gateway::start(&manifest(&backend.url(), "drain_timeout = \"3s\""));
    let addr = gw.ws.unwrap();
    let (_, mut a) = ws_connect(addr, "/echo", "").await;
    let (_, mut b) = ws_connect(addr, "/echo", "").await;
    let t = Instant::now();
    gw.signal("TERM");
    for ws in [&mut a, &mut b] {
        let f = tokio::time::timeout(Duration::from_secs(3), ws.read_until_close())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.close_code(), Some(1001));
        ws.close(1001, "").await.unwrap();
    }
    let mut backend_codes = Vec::new();
    while backend_codes.len() < 2 {
        let f = tokio::time::timeout(Duration::from_secs(3), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if f.opcode == 8 {
            backend_codes.push(f.close_code());
        }
    }
    assert_eq!(backend_codes, vec![Some(1001), Some(1001)]);
    // Exits by itself, well within drain_timeout.
    let status = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "gateway still running after drain_timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
    // New connections are refused once draining started.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn no_descriptor_leak_after_2000_concurrent_echoing_connections() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&backend.url(), ""));
    let addr = gw.ws.unwrap();
    let baseline = gw.open_fds();
    let mut tasks = Vec::new();
    for i in 0..2000 {
        tasks.push(tokio::spawn(async move {
            let (_, mut ws) = ws_connect(addr, "/echo", "").await;
            for j in 0..100 {
                let msg = format!("conn {i} msg {j}");
                ws.send(true, 1, msg.as_bytes()).await.unwrap();
                let f = ws.read_frame().await.unwrap();
                assert_eq!(f.payload, msg.as_bytes());
            }
            ws.close(1000, "").await.unwrap();
            ws.read_until_close().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fds = gw.open_fds();
        if fds <= baseline + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "descriptors leaked: {fds} open, baseline {baseline}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(closed["closed_by"], "client");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.records("connection_closed").len() < 2000 {
        assert!(
            Instant::now() < deadline,
            "only {} close records",
            gw.records("connection_closed").len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A 256 MiB message streams through while the gateway's RSS grows by less than 64 MiB.
#[tokio::test]
async fn huge_message_streams_in_bounded_memory() {
    const SIZE: u64 = 256 * 1024 * 1024;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let handler: Handler = Arc::new(move |_h, ws| {
        let tx = tx.clone();
        Box::pin(async move {
            // Count payload bytes without holding them.
            let RawWs { mut io, buf, .. } = ws;
            let mut total = buf.len() as u64;
            let mut chunk = vec![0u8; 256 * 1024];
            while total < SIZE + 14 {
                match io.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            let _ = tx.send(total);
        })
    });
    let backend = RawBackend::start(handler).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section("[gateway.limits]\nmax_frame_size = 1073741824"),
        api_section("echo", "echo", &backend.url(), "")
    ));
    let (_, ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let before = gw.rss_kb();
    let RawWs { mut io, .. } = ws;
    let key = [9u8, 8, 7, 6];
    let mut header = vec![0x82u8, 0x80 | 127];
    header.extend_from_slice(&SIZE.to_be_bytes());
    header.extend_from_slice(&key);
    io.write_all(&header).await.unwrap();
    let chunk: Vec<u8> = (0..1024 * 1024).map(|i| (i as u8) ^ key[i % 4]).collect();
    let mut peak = before;
    for i in 0..(SIZE / chunk.len() as u64) {
        io.write_all(&chunk).await.unwrap();
        if i % 16 == 0 {
            peak = peak.max(gw.rss_kb());
        }
    }
    let total = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap()
        .unwrap();
    peak = peak.max(gw.rss_kb());
    assert_eq!(total, SIZE + 14, "backend did not receive the whole frame");
    let growth_mb = (peak.saturating_sub(before)) as f64 / 1024.0;
    assert!(growth_mb < 64.0, "gateway RSS grew by {growth_mb:.1} MiB");
}
