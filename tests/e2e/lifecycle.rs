//! Connection lifecycle: one side vanishing, SIGTERM draining, no descriptor leaks under load,
//! and bounded memory for a huge streamed message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
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
    // Every timer that could also end the connection is far beyond the deadline below, so the
    // close can only come from noticing the drop (no wall-clock bound that a loaded machine
    // could miss).
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section("[gateway.limits]\nidle_timeout = \"10m\""),
        api_section("echo", "echo", &backend.url(), "")
    ));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 1, b"last words").await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(15), ws.read_until_close())
        .await
        .expect("the backend's drop was not noticed")
        .unwrap();
    assert_eq!(f.close_code(), Some(1011));
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
async fn sigterm_sends_1001_to_both_sides_refuses_new_connections_and_exits_once_answered() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let mut gw = Gateway::start(&manifest(&backend.url(), "drain_timeout = \"60s\""));
    let addr = gw.ws.unwrap();
    let (_, mut a) = ws_connect(addr, "/echo", "").await;
    let (_, mut b) = ws_connect(addr, "/echo", "").await;
    let t = Instant::now();
    gw.signal("TERM");
    for ws in [&mut a, &mut b] {
        let f = tokio::time::timeout(Duration::from_secs(10), ws.read_until_close())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(f.close_code(), Some(1001));
    }
    // Draining, and waiting for the two answers: the listener is already closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting while draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "exited before its connections answered"
    );
    let draining = gw.wait_record("draining", |_| true).await;
    assert_eq!(draining["connections"], 2);
    assert_eq!(draining["drain_timeout_ms"], 60_000);
    for ws in [&mut a, &mut b] {
        ws.close(1001, "").await.unwrap();
    }
    let mut backend_codes = Vec::new();
    while backend_codes.len() < 2 {
        let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        if f.opcode == 8 {
            backend_codes.push(f.close_code());
        }
    }
    assert_eq!(backend_codes, vec![Some(1001), Some(1001)]);
    // Every connection answered: it exits without waiting for drain_timeout (60 s).
    let status = exit_status(&mut gw, Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(60));
    assert!(gw.records("drain_timeout").is_empty());
    for r in gw.records("connection_closed") {
        assert_eq!(r["closed_by"], "gateway_shutdown", "{r}");
    }
}

/// A client that never answers the gateway's 1001 is given 5 s (README, "Shutdown"), then
/// dropped; the gateway exits without waiting for a longer drain_timeout.
#[tokio::test]
async fn a_client_that_never_answers_the_shutdown_close_is_dropped_after_5_s() {
    let backend = RawBackend::start(echo_frames()).await;
    let mut gw = Gateway::start(&manifest(&backend.url(), "drain_timeout = \"60s\""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let t = Instant::now();
    gw.signal("TERM");
    let f = tokio::time::timeout(Duration::from_secs(10), ws.read_until_close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.close_code(), Some(1001));
    // No answer: the socket is closed by the gateway once the grace is over.
    assert!(
        ws.expect_eof(Duration::from_secs(30)).await,
        "never dropped"
    );
    let status = exit_status(&mut gw, Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(5),
        "dropped after {took:?}, before the grace ended"
    );
    assert!(
        took < Duration::from_secs(60),
        "waited for drain_timeout: {took:?}"
    );
    assert!(gw.records("drain_timeout").is_empty());
    let r = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(r["closed_by"], "gateway_shutdown");
}

/// Once the gateway has sent its own close to the backend (here: shutdown), nothing more from
/// the client reaches the backend (RFC 6455 5.5.1: no data frame after a close): a message the
/// client sends before it answers the 1001 is dropped, and the backend sees its close last.
/// And a closing handshake that completes ends the connection at once, not after the grace.
#[tokio::test]
async fn after_the_gateways_close_nothing_more_reaches_the_backend() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Frame>>();
    let handler: Handler = Arc::new(move |_h, mut ws| {
        let tx = tx.clone();
        Box::pin(async move {
            while let Ok(f) = ws.read_frame().await {
                let close = f.opcode == 8;
                let _ = tx.send(Some(f.clone()));
                if close {
                    // Answer the gateway's close after a moment, as a backend finishing up.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = ws
                        .send_raw(&encode_frame(true, 0, 8, &f.payload, None))
                        .await;
                }
            }
            let _ = tx.send(None);
        })
    });
    let backend = RawBackend::start(handler).await;
    let mut gw = Gateway::start(&manifest(&backend.url(), "drain_timeout = \"60s\""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.send(true, 1, b"before").await.unwrap();
    let first = rx.recv().await.unwrap().unwrap();
    assert_eq!(first.payload, b"before");
    gw.signal("TERM");
    let f = tokio::time::timeout(Duration::from_secs(15), ws.read_until_close())
        .await
        .expect("no close for the client")
        .unwrap();
    assert_eq!(f.close_code(), Some(1001));
    // Too late: the backend already has the gateway's close.
    ws.send(true, 1, b"after the close").await.unwrap();
    let t = Instant::now();
    ws.close(1001, "").await.unwrap();
    assert!(ws.expect_eof(Duration::from_secs(30)).await);
    // The backend's reply came after 300 ms; the connection ended then, not at the 5 s grace.
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "ended after {:?}: waited out the grace",
        t.elapsed()
    );
    let mut after = Vec::new();
    while let Some(Some(f)) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("backend socket left open")
    {
        after.push(f);
    }
    assert_eq!(after.len(), 1, "the backend got {after:?}");
    assert_eq!(after[0].close_code(), Some(1001));
    let status = exit_status(&mut gw, Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
}

/// A shutdown that comes while a closing handshake is under way sends nothing after a close
/// (RFC 6455 5.5.1): the backend, which already has the client's close and has not answered,
/// sees that one close and then the end of the socket, never a second close; the client, still
/// owed its reply, gets 1001.
#[tokio::test]
async fn a_shutdown_during_a_closing_handshake_sends_no_second_close() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Frame>>();
    let handler: Handler = Arc::new(move |_h, mut ws| {
        let tx = tx.clone();
        Box::pin(async move {
            // Reads everything and answers nothing; `None` marks the end of the socket.
            while let Ok(f) = ws.read_frame().await {
                let _ = tx.send(Some(f));
            }
            let _ = tx.send(None);
        })
    });
    let backend = RawBackend::start(handler).await;
    let mut gw = Gateway::start(&manifest(&backend.url(), "drain_timeout = \"60s\""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    ws.close(1000, "bye").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the client's close never reached the backend")
        .unwrap()
        .expect("backend socket closed before the client's close");
    assert_eq!(first.close_code(), Some(1000));
    gw.signal("TERM");
    let f = tokio::time::timeout(Duration::from_secs(15), ws.read_until_close())
        .await
        .expect("no close for the client")
        .unwrap();
    assert_eq!(f.close_code(), Some(1001));
    let next = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the backend socket was never closed");
    assert!(
        matches!(next, Some(None)),
        "after the client's close the backend got {next:?}"
    );
    let status = exit_status(&mut gw, Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
}

/// With connections that will not answer, drain_timeout bounds the whole shutdown and says so.
#[tokio::test]
async fn drain_timeout_bounds_shutdown_and_is_logged() {
    let backend = RawBackend::start(echo_frames()).await;
    let mut gw = Gateway::start(&manifest(&backend.url(), "drain_timeout = \"1s\""));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let t = Instant::now();
    gw.signal("TERM");
    let f = tokio::time::timeout(Duration::from_secs(10), ws.read_until_close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.close_code(), Some(1001));
    let status = exit_status(&mut gw, Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(1), "exited after {took:?}");
    // Logged only when the timeout, not the connection's own 5 s grace, ended the drain.
    let r = gw.wait_record("drain_timeout", |_| true).await;
    assert_eq!(r["connections"], 1);
    assert_eq!(r["level"], "WARN");
}

#[tokio::test]
async fn no_descriptor_leak_after_2000_concurrent_echoing_connections() {
    let _alone = descriptor_hungry().await;
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

/// The gateway raises its soft descriptor limit to the hard one at start: a container's usual
/// 1,024 would cap it near 500 connections (two descriptors each) whatever `max_connections`
/// says. Started with 256 soft / 4,096 hard, it runs with 4,096 and warns that the default
/// `max_connections` (10,000) needs more.
#[tokio::test]
async fn the_soft_descriptor_limit_is_raised_to_the_hard_one_at_start() {
    use std::os::unix::process::CommandExt;
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start_with(
        TempDir::new("nofile"),
        &manifest(&backend.url(), ""),
        &[],
        |cmd| {
            // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let l = libc::rlimit {
                        rlim_cur: 256,
                        rlim_max: 4096,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3..5], ["4096", "4096"], "{line}");
    let rec = &gw.records("nofile")[0];
    assert_eq!(rec["soft_before"], 256, "{rec}");
    assert_eq!(rec["soft"], 4096, "{rec}");
    assert_eq!(rec["level"], "WARN", "{rec}");
    let (status, _ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
}
