//! How a relayed connection ends, cause by cause (README "Relay" and "Decisions": close codes
//! the gateway sends): what close code each side gets, and the `closed_by` of the
//! `connection_closed` record. One backend whose behaviour is chosen by the request path, so
//! every cause runs through the same gateway.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;

/// What the backend side of each connection received, by the path it was opened with.
type Received = Arc<Mutex<Vec<(String, Frame)>>>;

/// A backend that misbehaves as its path says: `/echo` echoes, `/close` sends close 4001,
/// `/drop` drops the TCP connection after the first frame (a close included, unanswered), `/masked` sends a masked frame,
/// `/big` a frame over the limit, `/bad-text` invalid UTF-8. Everything it receives is recorded.
async fn scripted_backend(received: Received) -> RawBackend {
    let handler: Handler = Arc::new(move |head: String, mut ws| {
        let received = received.clone();
        let path = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        Box::pin(async move {
            let record = |f: &Frame| received.lock().unwrap().push((path.clone(), f.clone()));
            let trouble: Option<Vec<u8>> = match path.as_str() {
                "/close" => Some(encode_frame(true, 0, 8, &close_payload(4001, "bye"), None)),
                "/masked" => Some(encode_frame(true, 0, 1, b"masked", Some([1, 2, 3, 4]))),
                "/big" => Some(encode_frame(true, 0, 2, &[0u8; 2000], None)),
                "/bad-text" => Some(encode_frame(true, 0, 1, &[b'o', 0xff], None)),
                _ => None,
            };
            if let Some(bytes) = trouble {
                let _ = ws.send_raw(&bytes).await;
            }
            while let Ok(f) = ws.read_frame().await {
                record(&f);
                if path == "/drop" {
                    return;
                }
                if f.opcode == 8 {
                    if path != "/close" {
                        let _ = ws
                            .send_raw(&encode_frame(true, 0, 8, &f.payload, None))
                            .await;
                    }
                    return;
                }
                if path == "/echo" {
                    let _ = ws
                        .send_raw(&encode_frame(f.fin, 0, f.opcode, &f.payload, None))
                        .await;
                }
            }
        })
    });
    RawBackend::start(handler).await
}

/// The close code the backend side of `path` received, waiting for it.
async fn backend_close(received: &Received, path: &str) -> Option<u16> {
    for _ in 0..250 {
        if let Some((_, f)) = received
            .lock()
            .unwrap()
            .iter()
            .find(|(p, f)| p == path && f.opcode == 8)
        {
            return f.close_code();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn each_way_a_connection_ends_gets_its_close_codes_and_record() {
    let received: Received = Arc::default();
    let backend = scripted_backend(received.clone()).await;
    let gw = Gateway::start(&format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n{}[apis.limits]\nmax_frame_size = 1000\nmax_message_size = 1500\n",
        gateway_section(""),
        api_section("s", "s", &backend.url(), ""),
    ));
    let addr = gw.ws.unwrap();
    // (path, what the client does, close code the client gets (None: none expected),
    //  close code the backend gets, closed_by)
    struct Cause {
        path: &'static str,
        client: &'static str,
        to_client: Option<u16>,
        to_backend: Option<u16>,
        closed_by: &'static str,
    }
    let causes = [
        Cause {
            path: "/echo",
            client: "close 1000",
            to_client: Some(1000),
            to_backend: Some(1000),
            closed_by: "client",
        },
        // The backend takes the client's close and goes without answering: the client still
        // gets its close answered (its own code, as RFC 6455 asks of the backend).
        Cause {
            path: "/drop",
            client: "close 4002",
            to_client: Some(4002),
            to_backend: Some(4002),
            closed_by: "client",
        },
        Cause {
            path: "/close",
            client: "wait",
            to_client: Some(4001),
            to_backend: None,
            closed_by: "backend",
        },
        Cause {
            path: "/echo",
            client: "drop",
            to_client: None,
            to_backend: Some(1001),
            closed_by: "client_dropped",
        },
        Cause {
            path: "/drop",
            client: "send",
            to_client: Some(1011),
            to_backend: None,
            closed_by: "backend_dropped",
        },
        Cause {
            path: "/masked",
            client: "wait",
            to_client: Some(1011),
            to_backend: Some(1002),
            closed_by: "backend_violation",
        },
        Cause {
            path: "/big",
            client: "wait",
            to_client: Some(1009),
            to_backend: Some(1009),
            closed_by: "backend_violation",
        },
        Cause {
            path: "/bad-text",
            client: "wait",
            to_client: Some(1007),
            to_backend: Some(1007),
            closed_by: "backend_violation",
        },
        Cause {
            path: "/echo",
            client: "unmasked",
            to_client: Some(1002),
            to_backend: Some(1002),
            closed_by: "client_violation",
        },
        Cause {
            path: "/echo",
            client: "too long message",
            to_client: Some(1009),
            to_backend: Some(1009),
            closed_by: "client_violation",
        },
        Cause {
            path: "/echo",
            client: "bad text",
            to_client: Some(1007),
            to_backend: Some(1007),
            closed_by: "client_violation",
        },
    ];
    for (n, c) in causes.iter().enumerate() {
        let conn = n as u64 + 1;
        received.lock().unwrap().clear();
        let (head, mut ws) = ws_connect(addr, &format!("/s{}", c.path), "").await;
        assert_eq!(status_of(&head), 101);
        match c.client {
            "close 1000" => ws.close(1000, "done").await.unwrap(),
            "close 4002" => ws.close(4002, "done").await.unwrap(),
            "drop" => {
                ws.send(true, 1, b"hi").await.unwrap();
                let _ = ws.read_frame().await;
                drop(ws);
                let rec = gw
                    .wait_record("connection_closed", |r| r["conn"] == conn)
                    .await;
                assert_eq!(rec["closed_by"], c.closed_by, "{}: {rec}", c.client);
                assert_eq!(backend_close(&received, c.path).await, c.to_backend);
                continue;
            }
            "send" => ws.send(true, 1, b"hi").await.unwrap(),
            "unmasked" => ws
                .send_raw(&encode_frame(true, 0, 1, b"x", None))
                .await
                .unwrap(),
            "too long message" => {
                ws.send(false, 2, &[1u8; 1000]).await.unwrap();
                ws.send(true, 0, &[2u8; 1000]).await.unwrap();
            }
            "bad text" => ws.send(true, 1, &[0xce, 0xff]).await.unwrap(),
            _ => {}
        }
        let close = tokio::time::timeout(Duration::from_secs(10), ws.read_until_close())
            .await
            .unwrap_or_else(|_| panic!("{} / {}: no close", c.path, c.client))
            .ok();
        if let Some(code) = close.as_ref().and_then(|f| f.close_code()) {
            // Answer the close, as a client does, so the connection ends without a grace wait.
            let _ = ws.close(code, "").await;
        }
        assert_eq!(
            close.and_then(|f| f.close_code()),
            c.to_client,
            "{} / {}",
            c.path,
            c.client
        );
        if c.to_backend.is_some() {
            assert_eq!(
                backend_close(&received, c.path).await,
                c.to_backend,
                "{} / {}: the backend's close",
                c.path,
                c.client
            );
        }
        let rec = gw
            .wait_record("connection_closed", |r| r["conn"] == conn)
            .await;
        assert_eq!(
            rec["closed_by"], c.closed_by,
            "{} / {}: {rec}",
            c.path, c.client
        );
    }
    // The size limits are counted by the limit that was exceeded: the backend's oversized
    // frame once, the client's oversized message once, nothing for the other violations.
    let metrics = scrape(gw.admin.unwrap()).await;
    let mut limits: Vec<(String, f64)> = metrics
        .samples
        .iter()
        .filter(|m| m.metric == "tollgate_limits_hit_total")
        .map(|m| {
            let v = match m.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            (m.labels.get("limit").unwrap_or("").to_owned(), v)
        })
        .collect();
    limits.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        limits,
        vec![
            ("max_frame_size".to_owned(), 1.0),
            ("max_message_size".to_owned(), 1.0)
        ],
        "{limits:?}"
    );
}

#[tokio::test]
async fn shutdown_closes_both_sides_with_1001_and_says_so() {
    let received: Received = Arc::default();
    let backend = scripted_backend(received.clone()).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section(""),
        api_section("s", "s", &backend.url(), ""),
    ));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/s/echo", "").await;
    ws.send(true, 1, b"hi").await.unwrap();
    let _ = ws.read_frame().await.unwrap();
    gw.signal("TERM");
    let close = tokio::time::timeout(Duration::from_secs(10), ws.read_until_close())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(close.close_code(), Some(1001));
    ws.close(1001, "").await.ok();
    assert_eq!(backend_close(&received, "/echo").await, Some(1001));
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "gateway_shutdown", "{rec}");
}
