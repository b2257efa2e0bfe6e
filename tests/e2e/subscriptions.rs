//! Products, subscriptions and per-subscriber connection limits through the real gateway: keys
//! from the environment, a keys file and a stored SHA-256; header and query keys (stripped
//! before forwarding); 401s that never reach the backend; product policies between global and
//! API ones; 429 at a subscription's max_connections, exact under a race; no key in any log.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::*;

const ALICE_PRIMARY: &str = "alice-primary-key-5d1f0c2e9b";
const ALICE_SECONDARY: &str = "alice-secondary-key-77a3e41c";
const RACER_KEY: &str = "racer-key-from-file-4b8e90d2";
const SAM_KEY: &str = "sam-silver-key-from-file-1c3d";
const UNKNOWN_KEY: &str = "not-a-key-of-anyone-9f8e7d6c";
const ALL_KEYS: [&str; 5] = [
    ALICE_PRIMARY,
    ALICE_SECONDARY,
    RACER_KEY,
    SAM_KEY,
    UNKNOWN_KEY,
];

fn set_header(table: &str, name: &str, value: &str) -> String {
    format!(
        "[[{table}]]\nplugin = \"set-header\"\nconfig = {{ name = \"{name}\", value = \"{value}\", exists_action = \"append\" }}\n"
    )
}

/// `chat` is in the protected product `gold` (alice: env + SHA-256 keys, max 3; racer: keys
/// file, max 10); `news` in `silver` (sam); `lobby` in the open product `free`, with its own
/// key names. Policies at global, gold and chat scope each append to `X-Order`.
fn start(backend: &RawBackend) -> Gateway {
    let dir = TempDir::new("subscriptions");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    std::fs::write(
        dir.path().join("keys.toml"),
        format!("[racer]\nprimary = \"{RACER_KEY}\"\n\n[sam]\nsecondary = \"{SAM_KEY}\"\n"),
    )
    .unwrap();
    chmod(&dir.path().join("keys.toml"), 0o600);
    let b = backend.url();
    let manifest = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\
         {}\
         [[products]]\nname = \"gold\"\ndisplay_name = \"Gold\"\n\
         {}\
         [[products.subscriptions]]\nname = \"alice\"\nmax_connections = 3\nprimary_key_env = \"TG_TEST_ALICE_PRIMARY\"\nsecondary_key_sha256 = \"{}\"\n\
         [[products.subscriptions]]\nname = \"racer\"\nmax_connections = 10\n\
         [[products]]\nname = \"silver\"\n\
         [[products.subscriptions]]\nname = \"sam\"\n\
         [[products]]\nname = \"free\"\nsubscription_required = false\n\
         {}{}\
         {}\
         {}",
        gateway_section("plugin_dir = \"plugins\"\nsubscription_keys_file = \"keys.toml\""),
        set_header("policies", "X-Order", "global"),
        set_header("products.policies", "X-Order", "product:{product.name}"),
        sha256_hex(ALICE_SECONDARY),
        api_section("chat", "chat", &b, "products = [\"gold\"]"),
        set_header("apis.on_handshake", "X-Order", "api:{subscription.name}"),
        api_section("news", "news", &b, "products = [\"silver\"]"),
        api_section(
            "lobby",
            "lobby",
            &b,
            "products = [\"free\", \"gold\"]\nsubscription_key_header = \"X-Key\"\nsubscription_key_query = \"key\""
        ),
    );
    Gateway::start_with_env(dir, &manifest, &[("TG_TEST_ALICE_PRIMARY", ALICE_PRIMARY)])
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn no_key_in_logs(gw: &Gateway) {
    let out = gw.output();
    for k in ALL_KEYS {
        assert!(!out.contains(k), "key {k} appears in the log:\n{out}");
    }
}

/// A handshake the gateway refuses: the whole response (it closes the connection after it).
async fn refused(addr: std::net::SocketAddr, path: &str, extra: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {TEST_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut all = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut all))
        .await
        .expect("the gateway closes after a refusal")
        .unwrap();
    (status_of(&all), all)
}

#[tokio::test]
async fn keys_in_header_or_query_open_the_api_and_never_reach_the_backend() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend);
    let addr = gw.ws.unwrap();

    // Primary key in the default header.
    let (_, mut ws) = ws_connect(
        addr,
        "/chat",
        &format!("Ocp-Apim-Subscription-Key: {ALICE_PRIMARY}\r\n"),
    )
    .await;
    ws.send(true, 1, b"hi").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
    let seen = backend.last_head();
    assert!(
        headers_all(&seen, "ocp-apim-subscription-key").is_empty(),
        "{seen}"
    );
    // Global, then the subscription's product, then the API; the gateway's context values
    // (product.name, subscription.name) are visible to policies.
    assert_eq!(
        headers_all(&seen, "x-order"),
        vec!["global", "product:gold", "api:alice"],
        "{seen}"
    );
    ws.close(1000, "").await.unwrap();
    ws.read_until_close().await.unwrap();

    // Secondary key in the default query parameter; the other parameters pass untouched.
    let (_, mut ws) = ws_connect(
        addr,
        &format!("/chat/room?x=1&subscription-key={ALICE_SECONDARY}&y=a%20b"),
        "",
    )
    .await;
    ws.send(true, 1, b"q").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"q");
    let seen = backend.last_head();
    assert!(seen.starts_with("GET /room?x=1&y=a%20b HTTP/1.1"), "{seen}");
    let rec = gw
        .wait_record("handshake", |r| {
            r["status"] == 101 && r["path"] == "/chat/room"
        })
        .await;
    assert_eq!(rec["product"], "gold", "{rec}");
    assert_eq!(rec["subscription"], "alice", "{rec}");

    // Missing, unknown, and another product's key: 401, backend never contacted.
    let before = backend.connections.load(Ordering::SeqCst);
    let (status, resp) = refused(addr, "/chat", "").await;
    assert_eq!(status, 401, "{resp}");
    assert!(resp.contains("missing subscription key"), "{resp}");
    for (path, extra) in [
        (
            "/chat".to_owned(),
            format!("Ocp-Apim-Subscription-Key: {UNKNOWN_KEY}\r\n"),
        ),
        (
            format!("/chat?subscription-key={UNKNOWN_KEY}"),
            String::new(),
        ),
        (
            "/chat".to_owned(),
            format!("Ocp-Apim-Subscription-Key: {SAM_KEY}\r\n"),
        ),
        // The key file's primary of racer is a gold key, but a header wins over the query.
        (
            format!("/chat?subscription-key={RACER_KEY}"),
            format!("Ocp-Apim-Subscription-Key: {SAM_KEY}\r\n"),
        ),
    ] {
        let (status, resp) = refused(addr, &path, &extra).await;
        assert_eq!(status, 401, "{path} {extra}: {resp}");
        assert!(resp.contains("invalid subscription key"), "{resp}");
    }
    assert_eq!(backend.connections.load(Ordering::SeqCst), before);
    // The log says why, by subscription name.
    gw.wait_record("handshake", |r| {
        r["status"] == 401
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("`sam`") && s.contains("does not publish API `chat`"))
    })
    .await;

    // sam's key (secondary, from the keys file) opens sam's own product's API.
    let (_, _news) = ws_connect(
        addr,
        "/news",
        &format!("Ocp-Apim-Subscription-Key: {SAM_KEY}\r\n"),
    )
    .await;

    // An open product needs no key, and a keyless handshake comes in through it: gold's
    // policy does not run, though lobby is in gold too. The API's own key names apply.
    let (_, _lobby) = ws_connect(addr, "/lobby?key", "").await;
    let seen = backend.last_head();
    assert_eq!(headers_all(&seen, "x-order"), vec!["global"], "{seen}");
    // With a gold key, the same API comes in through gold and runs gold's policy.
    let (_, _lobby_gold) = ws_connect(addr, "/lobby", &format!("X-Key: {RACER_KEY}\r\n")).await;
    let seen = backend.last_head();
    assert_eq!(
        headers_all(&seen, "x-order"),
        vec!["global", "product:gold"],
        "{seen}"
    );
    assert!(headers_all(&seen, "x-key").is_empty(), "{seen}");
    // A key sent to an open product's API is still checked.
    let (head, _) = raw_handshake(addr, "/lobby", &format!("X-Key: {UNKNOWN_KEY}\r\n")).await;
    assert_eq!(status_of(&head), 401, "{head}");

    // Metrics carry product and subscription; never a key.
    let m = scrape(gw.admin.unwrap()).await;
    let h = |api: &str, product: &str, sub: &str, status: &str| {
        sample(
            &m,
            "tollgate_handshakes_total",
            &[
                ("api", api),
                ("product", product),
                ("subscription", sub),
                ("status", status),
            ],
        )
    };
    assert_eq!(h("chat", "gold", "alice", "101"), Some(2.0));
    assert_eq!(h("chat", "", "", "401"), Some(5.0));
    assert_eq!(h("news", "silver", "sam", "101"), Some(1.0));
    assert_eq!(h("lobby", "free", "", "101"), Some(1.0));
    assert_eq!(h("lobby", "gold", "racer", "101"), Some(1.0));
    let text = http_get(gw.admin.unwrap(), "/metrics").await.2;
    for k in ALL_KEYS {
        assert!(!text.contains(k));
    }
    no_key_in_logs(&gw);
}

#[tokio::test]
async fn a_subscription_at_max_connections_gets_429_until_one_closes() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend);
    let addr = gw.ws.unwrap();
    let key = format!("Ocp-Apim-Subscription-Key: {ALICE_PRIMARY}\r\n");
    let (_, mut first) = ws_connect(addr, "/chat", &key).await;
    // The secondary key is the same subscription: it shares the 3 slots.
    let (_, _second) = ws_connect(
        addr,
        &format!("/chat?subscription-key={ALICE_SECONDARY}"),
        "",
    )
    .await;
    let (_, _third) = ws_connect(addr, "/chat", &key).await;
    let before = backend.connections.load(Ordering::SeqCst);
    let (head, _) = raw_handshake(addr, "/chat", &key).await;
    assert_eq!(status_of(&head), 429, "{head}");
    assert_eq!(header(&head, "retry-after").as_deref(), Some("5"), "{head}");
    assert_eq!(backend.connections.load(Ordering::SeqCst), before);
    // Another subscription of the same product is not affected.
    let (_, _racer) = ws_connect(
        addr,
        "/chat",
        &format!("Ocp-Apim-Subscription-Key: {RACER_KEY}\r\n"),
    )
    .await;

    let m = scrape(gw.admin.unwrap()).await;
    let active = |sub: &str| {
        sample(
            &m,
            "tollgate_subscription_connections_active",
            &[("product", "gold"), ("subscription", sub)],
        )
    };
    assert_eq!(active("alice"), Some(3.0));
    assert_eq!(active("racer"), Some(1.0));

    first.close(1000, "").await.unwrap();
    first.read_until_close().await.unwrap();
    // The slot comes back when the relay ends (right after the close handshake).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (head, _c) = raw_handshake(addr, "/chat", &key).await;
        if status_of(&head) == 101 {
            break;
        }
        assert_eq!(status_of(&head), 429, "{head}");
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.wait_record("handshake", |r| {
        r["status"] == 429 && r["subscription"] == "alice"
    })
    .await;
    no_key_in_logs(&gw);
}

#[tokio::test]
async fn fifty_racing_handshakes_for_ten_slots_yield_exactly_ten() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend);
    let addr = gw.ws.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn(async move {
                raw_handshake(
                    addr,
                    "/chat",
                    &format!("Ocp-Apim-Subscription-Key: {RACER_KEY}\r\n"),
                )
                .await
            })
        })
        .collect();
    let mut held = Vec::new();
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (head, ws) = t.await.unwrap();
        match status_of(&head) {
            101 => {
                ok += 1;
                held.push(ws);
            }
            429 => limited += 1,
            other => panic!("unexpected status {other}: {head}"),
        }
    }
    assert_eq!((ok, limited), (10, 40));
    assert_eq!(backend.connections.load(Ordering::SeqCst), 10);
    let m = scrape(gw.admin.unwrap()).await;
    assert_eq!(
        sample(
            &m,
            "tollgate_limits_hit_total",
            &[("api", "chat"), ("limit", "subscription_max_connections")]
        ),
        Some(40.0)
    );
    no_key_in_logs(&gw);
}

#[tokio::test]
async fn tollgate_check_reports_subscription_problems_without_showing_keys() {
    let dir = TempDir::new("subscriptions-check");
    std::fs::write(
        dir.path().join("keys.toml"),
        format!("[racer]\nprimary = \"short\"\n[ghost]\nprimary = \"{RACER_KEY}\"\n"),
    )
    .unwrap();
    let text = format!(
        "{}[[products]]\nname = \"gold\"\n\
         [[products.subscriptions]]\nname = \"racer\"\n\
         [[products.subscriptions]]\nname = \"alice\"\nprimary_key_env = \"TG_TEST_NOT_SET_ANYWHERE\"\n\
         {}",
        gateway_section("subscription_keys_file = \"keys.toml\""),
        api_section("chat", "chat", "ws://127.0.0.1:9/", "products = [\"gold\"]"),
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("keys.toml:2:") && err.contains("at least 16 characters"),
        "{err}"
    );
    assert!(err.contains("no subscription is named `ghost`"), "{err}");
    assert!(
        err.contains("products[0].subscriptions[1].primary_key_env")
            && err.contains("TG_TEST_NOT_SET_ANYWHERE"),
        "{err}"
    );
    assert!(
        !err.contains(RACER_KEY) && !err.contains("short\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_keys_file_other_users_can_read_is_warned_about_at_every_load() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend);
    // Mode 0600 (as `start` writes it): nothing to say.
    assert!(gw.records("keys_file_permissions").is_empty());
    chmod(&gw.dir.path().join("keys.toml"), 0o644);
    gw.signal("HUP");
    let rec = gw.wait_record("keys_file_permissions", |_| true).await;
    assert_eq!(rec["level"], "WARN", "{rec}");
    assert_eq!(rec["mode"], "644", "{rec}");
    assert!(
        rec["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("keys.toml")),
        "{rec}"
    );
    no_key_in_logs(&gw);
}

#[tokio::test]
async fn a_key_rotated_in_the_keys_file_applies_live_and_ends_the_old_keys_connections() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = start(&backend);
    let addr = gw.ws.unwrap();
    // racer holds a connection under the old key.
    let (_, mut old) = ws_connect(
        addr,
        "/chat",
        &format!("Ocp-Apim-Subscription-Key: {RACER_KEY}\r\n"),
    )
    .await;
    let rotated = "racer-rotated-key-0a9b8c7d6e";
    std::fs::write(
        gw.dir.path().join("keys.toml"),
        format!("[racer]\nprimary = \"{rotated}\"\n\n[sam]\nsecondary = \"{SAM_KEY}\"\n"),
    )
    .unwrap();
    gw.wait_record("reload", |r| r["outcome"] == "applied")
        .await;
    let (status, _) = refused(
        addr,
        "/chat",
        &format!("Ocp-Apim-Subscription-Key: {RACER_KEY}\r\n"),
    )
    .await;
    assert_eq!(status, 401, "the old key stops working");
    let (_, _new) = ws_connect(
        addr,
        "/chat",
        &format!("Ocp-Apim-Subscription-Key: {rotated}\r\n"),
    )
    .await;
    // The connection opened with the rotated-away key is ended (the key is revoked), and its
    // slot is given back.
    let close = tokio::time::timeout(Duration::from_secs(10), old.read_until_close())
        .await
        .expect("the old key's connection is closed")
        .unwrap();
    assert_eq!(close.close_code(), Some(1008));
    gw.wait_record("connection_closed", |r| {
        r["subscription"] == "racer" && r["closed_by"] == "subscription_revoked"
    })
    .await;
    let apis: serde_json::Value =
        serde_json::from_str(&http_get(gw.admin.unwrap(), "/apis").await.2).unwrap();
    let gold = apis["products"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "gold")
        .unwrap();
    let racer = gold["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "racer")
        .unwrap();
    assert_eq!(racer["active_connections"], 1, "{apis}");
    assert_eq!(gold["apis"], serde_json::json!(["chat", "lobby"]), "{apis}");
    let api = |name: &str| {
        apis["apis"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        api("chat")["subscription_key"],
        serde_json::json!({"header": "ocp-apim-subscription-key", "query": "subscription-key", "required": true})
    );
    assert_eq!(api("lobby")["subscription_key"]["required"], false);
    let text = apis.to_string();
    assert!(!text.contains(rotated) && !text.contains(&sha256_hex(rotated)));
    no_key_in_logs(&gw);
    assert!(!gw.output().contains(rotated));
}

/// The README's worked example (manifest and keys file) passes `tollgate check`.
#[test]
fn the_readme_example_passes_tollgate_check() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("### Products and subscriptions")
        .nth(1)
        .expect("README has a Products and subscriptions section");
    let mut blocks = section
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap());
    let (manifest, keys) = (blocks.next().unwrap(), blocks.next().unwrap());
    let dir = TempDir::new("readme-subscriptions");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    std::fs::write(dir.path().join("keys.toml"), keys).unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, manifest).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--manifest"])
        .arg(&path)
        .env("XDG_CACHE_HOME", test_cache())
        .env("ACME_PRIMARY_KEY", "acme-primary-key-from-the-environment")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
