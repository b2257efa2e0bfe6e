//! Message rates (`[[apis.message_limits]]`): per connection and direction, no wasm involved.
//! `close` ends the connection (1008 to the sender, 1001 to the other side); `drop` cuts whole
//! messages out of the stream, fragments included, while control frames pass.
//!
//! Every message of a test that must be judged within one burst is written in one write, and
//! the rates are 1 per second or less, so a slow machine cannot refill a bucket in between.
//! Where a burst is spread over several connections (and so over several writes), it is a
//! byte burst refilled at 1 byte per second: a message of 6 bytes would need 6 s to come back.

use std::time::Duration;

use crate::support::*;

/// A close frame's payload: code 1000, no reason.
const NORMAL_CLOSE: [u8; 2] = 1000u16.to_be_bytes();

fn manifest(backend: &str, limits: &str) -> String {
    format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        gateway_section(""),
        api_section("echo", "echo", backend, limits)
    )
}

/// Masked client frames, concatenated: what a client sends in one write.
fn client_frames(frames: &[(bool, u8, &[u8])]) -> Vec<u8> {
    frames
        .iter()
        .flat_map(|(fin, op, p)| encode_frame(*fin, 0, *op, p, Some([1, 2, 3, 4])))
        .collect()
}

/// A gateway whose API `echo` has `limits`, in front of a backend that records every frame it
/// gets, and a client connected to it.
struct Recorded {
    gw: Gateway,
    _backend: RawBackend,
    rx: tokio::sync::mpsc::UnboundedReceiver<Frame>,
    ws: RawWs<tokio::net::TcpStream>,
}

async fn recorded(limits: &str) -> Recorded {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let gw = Gateway::start(&manifest(&backend.url(), limits));
    let (_, ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    Recorded {
        gw,
        _backend: backend,
        rx,
        ws,
    }
}

/// `tollgate_messages_dropped_total` of API `echo`'s client messages over `limit`.
async fn dropped(gw: &Gateway, limit: &str) -> Option<f64> {
    sample(
        &scrape(gw.admin.unwrap()).await,
        "tollgate_messages_dropped_total",
        &[
            ("api", "echo"),
            ("direction", "client_to_backend"),
            ("limit", limit),
        ],
    )
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

#[tokio::test]
async fn a_client_over_its_message_rate_gets_1008_and_the_backend_1001() {
    let Recorded {
        gw,
        _backend,
        mut rx,
        mut ws,
    } = recorded("[[apis.message_limits]]\nmax_messages_per_second = 1\nburst_messages = 3\n")
        .await;
    let four: Vec<(bool, u8, &[u8])> = vec![
        (true, 1, b"one"),
        (true, 1, b"two"),
        (true, 1, b"three"),
        (true, 1, b"four"),
    ];
    ws.send_raw(&client_frames(&four)).await.unwrap();
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1008), "{f:?}");
    assert_eq!(
        f.close_reason(),
        "message rate exceeds max_messages_per_second"
    );
    let got = received(&mut rx).await;
    let payloads: Vec<&[u8]> = got.iter().map(|f| f.payload.as_slice()).collect();
    assert_eq!(
        payloads[..3],
        [b"one" as &[u8], b"two", b"three"],
        "{got:?}"
    );
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[3].close_code(), Some(1001), "{got:?}");
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "client_violation", "{rec}");
    let m = scrape(gw.admin.unwrap()).await;
    assert_eq!(
        sample(
            &m,
            "tollgate_limits_hit_total",
            &[("api", "echo"), ("limit", "max_messages_per_second")]
        ),
        Some(1.0)
    );
}

/// Over the limit with `drop`: whole messages vanish, fragments and all, while the pings sent
/// between their fragments still pass; the messages that pass keep their fragmentation; the
/// connection goes on, and a token that came back lets the next message through.
#[tokio::test]
async fn drop_cuts_whole_messages_out_and_keeps_control_frames() {
    let Recorded {
        gw,
        _backend,
        mut rx,
        mut ws,
    } = recorded("[[apis.message_limits]]\nmax_messages_per_second = 1\nburst_messages = 2\naction = \"drop\"\n").await;
    let burst: Vec<(bool, u8, &[u8])> = vec![
        (true, 1, b"a"),
        (false, 1, b"b1"),
        (true, 9, b"ping-b"),
        (true, 0, b"b2"),
        // Over the limit from here: dropped, but not the ping inside.
        (false, 2, b"c1"),
        (true, 9, b"ping-c"),
        (false, 0, b"c2"),
        (true, 0, b"c3"),
        (true, 1, b"d"),
    ];
    ws.send_raw(&client_frames(&burst)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.send(true, 1, b"e").await.unwrap();
    ws.send(true, 8, &NORMAL_CLOSE).await.unwrap();
    let got = received(&mut rx).await;
    let seen: Vec<(bool, u8, &[u8])> = got
        .iter()
        .map(|f| (f.fin, f.opcode, f.payload.as_slice()))
        .collect();
    let want: Vec<(bool, u8, &[u8])> = vec![
        (true, 1, b"a"),
        (false, 1, b"b1"),
        (true, 9, b"ping-b"),
        (true, 0, b"b2"),
        (true, 9, b"ping-c"),
        (true, 1, b"e"),
        (true, 8, &NORMAL_CLOSE),
    ];
    assert_eq!(seen, want, "{got:?}");
    assert_eq!(dropped(&gw, "max_messages_per_second").await, Some(2.0));
}

/// Bytes per second, dropping: a message is judged whole at its first frame against a bucket
/// of 1,000 bytes; one that does not fit is dropped, a smaller one after it still passes.
#[tokio::test]
async fn a_byte_rate_drops_the_message_that_does_not_fit() {
    let Recorded {
        gw: _gw,
        _backend,
        mut rx,
        mut ws,
    } = recorded("[[apis.message_limits]]\nmax_bytes_per_second = 1\nburst_bytes = 1000\naction = \"drop\"\n").await;
    let (six, six_again, four) = ([6u8; 600], [7u8; 600], [4u8; 400]);
    let frames: Vec<(bool, u8, &[u8])> = vec![
        (true, 2, &six),
        (true, 2, &six_again),
        (true, 2, &four),
        (true, 8, &NORMAL_CLOSE),
    ];
    ws.send_raw(&client_frames(&frames)).await.unwrap();
    let got = received(&mut rx).await;
    let sizes: Vec<(u8, usize)> = got.iter().map(|f| (f.opcode, f.payload.len())).collect();
    assert_eq!(sizes, [(2, 600), (2, 400), (8, 2)], "{got:?}");
    assert_eq!(got[1].payload, four);
}

/// The backend's direction: a backend over its rate gets 1008, the client 1001, after the
/// messages that were within it.
#[tokio::test]
async fn a_backend_over_its_message_rate_gets_1008_and_the_client_1001() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u16>();
    // Echoes data frames; reports the close it gets.
    let handler: Handler = std::sync::Arc::new(move |_head, mut ws| {
        let tx = tx.clone();
        Box::pin(async move {
            while let Ok(f) = ws.read_frame().await {
                if f.opcode == 8 {
                    let _ = tx.send(f.close_code().unwrap_or(0));
                    let _ = ws
                        .send_raw(&encode_frame(true, 0, 8, &f.payload, None))
                        .await;
                    return;
                }
                let out = encode_frame(f.fin, f.rsv, f.opcode, &f.payload, None);
                if ws.send_raw(&out).await.is_err() {
                    return;
                }
            }
        })
    });
    let backend = RawBackend::start(handler).await;
    let gw = Gateway::start(&manifest(
        &backend.url(),
        "[[apis.message_limits]]\ndirection = \"backend\"\nmax_messages_per_second = 1\nburst_messages = 2\n",
    ));
    let (_, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let three: Vec<(bool, u8, &[u8])> = vec![(true, 1, b"x"), (true, 1, b"y"), (true, 1, b"z")];
    // The client itself is not limited: all three reach the backend, whose third echo is over.
    ws.send_raw(&client_frames(&three)).await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"x");
    assert_eq!(ws.read_frame().await.unwrap().payload, b"y");
    let f = ws.read_until_close().await.unwrap();
    assert_eq!(f.close_code(), Some(1001), "{f:?}");
    let backend_got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert_eq!(backend_got, Some(1008));
    let rec = gw.wait_record("connection_closed", |_| true).await;
    assert_eq!(rec["closed_by"], "backend_violation", "{rec}");
}

/// The next frame's payload as text (None after 5 s of silence).
async fn next_text(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Frame>) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .ok()
        .flatten()
        .map(|f| String::from_utf8_lossy(&f.payload).into_owned())
}

const ALICE_KEY: &str = "alice-message-rate-key-3f9a01c2";
const BOB_KEY: &str = "bob-message-rate-key-77d2e4b90";

/// `per = "subscription"`: alice's two connections share one bucket of 18 bytes (three messages
/// of 6), so the fourth message between them is dropped whichever connection sends it (five
/// browser tabs do not get five times the limit); bob's connection has a bucket of its own.
#[tokio::test]
async fn a_subscriptions_connections_share_one_rate() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let manifest = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[products]]\nname = \"gold\"\n\
         [[products.subscriptions]]\nname = \"alice\"\nprimary_key_sha256 = \"{}\"\n\
         [[products.subscriptions]]\nname = \"bob\"\nprimary_key_sha256 = \"{}\"\n\n{}",
        gateway_section(""),
        sha256_hex(ALICE_KEY),
        sha256_hex(BOB_KEY),
        api_section(
            "echo",
            "echo",
            &backend.url(),
            "products = [\"gold\"]\n\
             [[apis.message_limits]]\nper = \"subscription\"\nmax_bytes_per_second = 1\nburst_bytes = 18\naction = \"drop\"\n"
        )
    );
    let gw = Gateway::start(&manifest);
    let addr = gw.ws.unwrap();
    let key = |k: &str| format!("Ocp-Apim-Subscription-Key: {k}\r\n");
    let (_, mut tab1) = ws_connect(addr, "/echo", &key(ALICE_KEY)).await;
    let (_, mut tab2) = ws_connect(addr, "/echo", &key(ALICE_KEY)).await;
    let (_, mut bob) = ws_connect(addr, "/echo", &key(BOB_KEY)).await;
    // One connection after the other, each waited for, so the order is known.
    let two: Vec<(bool, u8, &[u8])> = vec![(true, 1, b"tab1-a"), (true, 1, b"tab1-b")];
    tab1.send_raw(&client_frames(&two)).await.unwrap();
    assert_eq!(next_text(&mut rx).await.as_deref(), Some("tab1-a"));
    assert_eq!(next_text(&mut rx).await.as_deref(), Some("tab1-b"));
    let two: Vec<(bool, u8, &[u8])> = vec![(true, 1, b"tab2-a"), (true, 1, b"tab2-b")];
    tab2.send_raw(&client_frames(&two)).await.unwrap();
    assert_eq!(next_text(&mut rx).await.as_deref(), Some("tab2-a"));
    let three: Vec<(bool, u8, &[u8])> = vec![
        (true, 1, b"bob-a"),
        (true, 1, b"bob-b"),
        (true, 1, b"bob-c"),
    ];
    bob.send_raw(&client_frames(&three)).await.unwrap();
    // tab2-b never comes: bob's three are all that follow.
    for want in ["bob-a", "bob-b", "bob-c"] {
        assert_eq!(next_text(&mut rx).await.as_deref(), Some(want));
    }
    tab2.send(true, 8, &NORMAL_CLOSE).await.unwrap();
    let closing = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert_eq!(closing.ok().flatten().map(|f| f.opcode), Some(8));
    assert_eq!(dropped(&gw, "max_bytes_per_second").await, Some(1.0));
}

/// `[[products.message_limits]]` with `per = "subscription"`: alice's connections to two APIs of
/// the product draw from one allowance of 18 bytes (three messages of 6); each API alone has
/// no limit.
#[tokio::test]
async fn a_products_limit_spans_its_apis() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let b = backend.url();
    let manifest = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[products]]\nname = \"gold\"\n\
         [[products.subscriptions]]\nname = \"alice\"\nprimary_key_sha256 = \"{}\"\n\
         [[products.message_limits]]\nper = \"subscription\"\nmax_bytes_per_second = 1\nburst_bytes = 18\naction = \"drop\"\n\n{}{}",
        gateway_section(""),
        sha256_hex(ALICE_KEY),
        api_section("chat", "chat", &b, "products = [\"gold\"]\n"),
        api_section("news", "news", &b, "products = [\"gold\"]\n"),
    );
    let gw = Gateway::start(&manifest);
    let addr = gw.ws.unwrap();
    let key = format!("Ocp-Apim-Subscription-Key: {ALICE_KEY}\r\n");
    let (_, mut chat) = ws_connect(addr, "/chat", &key).await;
    let (_, mut news) = ws_connect(addr, "/news", &key).await;
    let two: Vec<(bool, u8, &[u8])> = vec![(true, 1, b"chat-a"), (true, 1, b"chat-b")];
    chat.send_raw(&client_frames(&two)).await.unwrap();
    assert_eq!(next_text(&mut rx).await.as_deref(), Some("chat-a"));
    assert_eq!(next_text(&mut rx).await.as_deref(), Some("chat-b"));
    let two: Vec<(bool, u8, &[u8])> = vec![(true, 1, b"news-a"), (true, 1, b"news-b")];
    news.send_raw(&client_frames(&two)).await.unwrap();
    assert_eq!(next_text(&mut rx).await.as_deref(), Some("news-a"));
    // news-b is over the product's allowance: the close is what comes next.
    news.send(true, 8, &NORMAL_CLOSE).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
    assert_eq!(next.ok().flatten().map(|f| f.opcode), Some(8));
    let m = scrape(gw.admin.unwrap()).await;
    let dropped = |api| {
        sample(
            &m,
            "tollgate_messages_dropped_total",
            &[
                ("api", api),
                ("direction", "client_to_backend"),
                ("limit", "max_bytes_per_second"),
            ],
        )
    };
    assert_eq!((dropped("chat"), dropped("news")), (None, Some(1.0)));
}

/// `per = "subscription"` on a fleet: alice's connections through two gateway processes sharing
/// one Redis draw from one rate (5 messages per second, a burst of 5), not one each. Both send
/// 20 messages per second for 3 s: the backend gets about 5 + 5 per second of the 120 between
/// them (each gateway on its own would pass that many: twice as many in all), some through
/// each, and each gateway settles with Redis about once per `message_sync_interval` (100 ms by
/// default), not once per message. After a quiet second, a burst on both gateways at once gets
/// the fleet's burst between them, not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriptions_rate_holds_across_a_fleet() {
    let redis = crate::support::redis::RedisServer::start();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(record_frames(tx)).await;
    let manifest = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [cluster]\nstore = \"{}\"\nlease_ttl = \"3s\"\nstore_timeout = \"500ms\"\n\n\
         [[products]]\nname = \"gold\"\n\
         [[products.subscriptions]]\nname = \"alice\"\nprimary_key_sha256 = \"{}\"\n\n{}",
        gateway_section(""),
        redis.url(),
        sha256_hex(ALICE_KEY),
        api_section(
            "echo",
            "echo",
            &backend.url(),
            "products = [\"gold\"]\n\
             [[apis.message_limits]]\nper = \"subscription\"\nmax_messages_per_second = 5\nburst_messages = 5\naction = \"drop\"\n"
        )
    );
    let gws = [Gateway::start(&manifest), Gateway::start(&manifest)];
    let key = format!("Ocp-Apim-Subscription-Key: {ALICE_KEY}\r\n");
    let mut tabs = Vec::new();
    for gw in &gws {
        tabs.push(ws_connect(gw.ws.unwrap(), "/echo", &key).await.1);
    }
    let started = std::time::Instant::now();
    const EACH: usize = 60;
    for i in 0..EACH {
        for (t, ws) in tabs.iter_mut().enumerate() {
            let text = format!("{t}-{i}");
            ws.send_raw(&client_frames(&[(true, 1, text.as_bytes())]))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sending = started.elapsed().as_secs_f64();
    let running = started.elapsed().as_secs_f64();
    for gw in &gws {
        let m = scrape(gw.admin.unwrap()).await;
        let settles = sample(
            &m,
            "tollgate_store_call_duration_seconds",
            &[("call", "settle")],
        )
        .unwrap_or(0.0);
        assert!(
            settles >= 5.0 && settles <= running / 0.1 + 5.0 && settles < EACH as f64,
            "{settles} settle calls in {running:.1} s for {EACH} messages"
        );
    }
    // What was admitted has arrived within a second.
    let mut got = [0usize; 2];
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        if f.opcode == 1 {
            got[usize::from(f.payload[0] == b'1')] += 1;
        }
    }
    let total = got[0] + got[1];
    eprintln!("admitted {got:?} of {} in {sending:.1} s", 2 * EACH);
    // The fleet's burst and rate, plus what the gateways may admit before they first settle
    // and in about one interval after: far below the 2 x (5 + 5 per second) of two gateways
    // counting alone.
    let most = 5.0 + 5.0 * sending + 5.0;
    assert!(
        (total as f64) <= most,
        "{total} messages admitted in {sending:.1} s through two gateways (at most {most:.0}): {got:?}"
    );
    assert!(
        total >= 12 && got.iter().all(|&n| n >= 3),
        "the rate is shared, not starved: {got:?} in {sending:.1} s"
    );
    // Quiet long enough for the fleet's bucket to fill again (5 at 5 per second), then both
    // tabs send 6 at once: the fleet's burst is shared, not had by each gateway.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (t, ws) in tabs.iter_mut().enumerate() {
        let burst: Vec<String> = (0..6).map(|i| format!("{t}-burst-{i}")).collect();
        let frames: Vec<(bool, u8, &[u8])> =
            burst.iter().map(|m| (true, 1u8, m.as_bytes())).collect();
        ws.send_raw(&client_frames(&frames)).await.unwrap();
    }
    let mut burst = [0usize; 2];
    while let Ok(Some(f)) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
        if f.opcode == 1 {
            burst[usize::from(f.payload[0] == b'1')] += 1;
        }
    }
    eprintln!("burst after quiet: admitted {burst:?} of 12");
    let both = burst[0] + burst[1];
    assert!(
        (2..=6).contains(&both),
        "after a quiet second both gateways got {burst:?} of a fleet burst of 5"
    );
}
