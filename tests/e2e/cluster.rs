//! The fleet's store (`tollgate::cluster`) against a real `redis-server`: a limit held exactly
//! across three gateways' stores under racing acquires, the slots of a gateway that stopped
//! renewing its lease freed after `lease_ttl`, counts restored by the heartbeat after Redis
//! restarts empty, and every call bounded by `store_timeout` when Redis hangs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::cluster::{Acquired, Store, StoreConfig, StoreError};

use crate::support::redis::RedisServer;
use crate::support::*;

async fn store(redis: &RedisServer, id: &str, lease_ttl: Duration) -> Arc<Store> {
    Arc::new(
        Store::connect(StoreConfig {
            url: redis.url(),
            gateway_id: id.into(),
            namespace: "test".into(),
            lease_ttl,
            timeout: Duration::from_secs(1),
        })
        .await
        .unwrap(),
    )
}

/// How many of `n` acquires of `thing` (limit `limit`), racing, spread over `stores`, were
/// admitted.
async fn race(stores: &[Arc<Store>], thing: &str, limit: u64, n: usize) -> usize {
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = stores[i % stores.len()].clone();
        let thing = thing.to_owned();
        tasks.push(tokio::spawn(async move { s.acquire(&thing, limit).await }));
    }
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Acquired::Admitted { held } => {
                assert!(held <= limit, "{held}");
                admitted += 1;
            }
            Acquired::Full { held } | Acquired::FullAt { held, .. } => assert_eq!(held, limit),
        }
    }
    admitted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_hold_a_limit_exactly_under_racing_acquires() {
    let redis = RedisServer::start();
    let ttl = Duration::from_secs(30);
    let stores = [
        store(&redis, "a", ttl).await,
        store(&redis, "b", ttl).await,
        store(&redis, "c", ttl).await,
    ];
    assert_eq!(race(&stores, "sub:gold/acme", 10, 60).await, 10);
    let here: u64 = stores.iter().map(|s| s.held_here("sub:gold/acme")).sum();
    assert_eq!(
        here, 10,
        "every gateway's local count adds up to the fleet's"
    );
    // Another thing has its own limit.
    assert_eq!(race(&stores, "api:chat", 3, 9).await, 3);
    // One closes anywhere: exactly one more gets in.
    let holder = stores
        .iter()
        .find(|s| s.held_here("sub:gold/acme") > 0)
        .unwrap();
    holder.release("sub:gold/acme").await.unwrap();
    assert_eq!(race(&stores, "sub:gold/acme", 10, 15).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_stops_renewing_its_lease_loses_its_slots_after_lease_ttl() {
    let redis = RedisServer::start();
    let ttl = Duration::from_secs(1);
    let dead = store(&redis, "dead", ttl).await;
    let alive = store(&redis, "alive", ttl).await;
    assert_eq!(race(std::slice::from_ref(&dead), "sub:p/s", 4, 4).await, 4);
    assert_eq!(race(std::slice::from_ref(&alive), "sub:p/s", 4, 1).await, 0);
    // `dead` stops heartbeating (as a killed process would); `alive` keeps renewing.
    let died = Instant::now();
    drop(dead);
    let mut freed = 0;
    while freed < 4 {
        assert!(
            died.elapsed() < ttl + Duration::from_secs(1),
            "slots of a dead gateway still held after {:?}",
            died.elapsed()
        );
        alive.heartbeat().await.unwrap();
        freed += race(std::slice::from_ref(&alive), "sub:p/s", 4, 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(alive.held_here("sub:p/s"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_empty_the_heartbeat_restores_the_live_counts() {
    let mut redis = RedisServer::start();
    let ttl = Duration::from_secs(30);
    let a = store(&redis, "a", ttl).await;
    let b = store(&redis, "b", ttl).await;
    let c = store(&redis, "c", ttl).await;
    assert_eq!(race(std::slice::from_ref(&a), "api:chat", 6, 3).await, 3);
    assert_eq!(race(std::slice::from_ref(&b), "api:chat", 6, 2).await, 2);
    redis.restart();
    // The next interval: each gateway renews its lease, finds it gone, and writes its counts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = a.heartbeat().await.is_ok() & b.heartbeat().await.is_ok();
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "the store did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `c` registers again on its own (its acquire finds its lease missing), once its
    // connection is back (the first call after the restart may fail: the caller's
    // on_store_failure decides then).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.acquire("api:chat", 6).await {
            Ok(a) => {
                assert_eq!(a, Acquired::Admitted { held: 6 });
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(race(std::slice::from_ref(&c), "api:chat", 6, 2).await, 0);
    a.release("api:chat").await.unwrap();
    assert_eq!(race(&[b.clone(), c.clone()], "api:chat", 6, 3).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_hangs_every_call_ends_within_store_timeout() {
    let redis = RedisServer::start();
    let s = store(&redis, "a", Duration::from_secs(30)).await;
    assert_eq!(race(std::slice::from_ref(&s), "api:x", 5, 1).await, 1);
    redis.freeze(true);
    let started = Instant::now();
    let r = s.acquire("api:x", 5).await;
    let took = started.elapsed();
    assert!(matches!(r, Err(StoreError::Timeout(_))), "{r:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(s.held_here("api:x"), 1, "a failed acquire holds nothing");
    // An acquire whose caller stops waiting (the client went away mid-handshake) holds nothing
    // either, or every heartbeat would write the phantom slot back.
    let dropped = tokio::time::timeout(Duration::from_millis(50), s.acquire("api:x", 5)).await;
    assert!(dropped.is_err());
    assert_eq!(s.held_here("api:x"), 1, "a cancelled acquire holds nothing");
    redis.freeze(false);
    // The acquire that timed out may have been applied once Redis woke up; the next heartbeat
    // writes the gateway's own count (1) over it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.heartbeat().await.is_err() {
        assert!(Instant::now() < deadline, "the store did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.acquire("api:x", 5).await.unwrap(),
        Acquired::Admitted { held: 2 }
    );
}

// ------------------------------------------------------------------------------------------
// Whole gateways sharing one Redis (`[cluster]`).

const KEY: &str = "fleet-test-subscription-key-0123456789";

/// A gateway of the fleet: subscription `acme` of product `gold` may hold 10 connections,
/// counted across every gateway on `redis`.
pub(crate) fn fleet_gateway(redis: &RedisServer, backend: &str, cluster_extra: &str) -> Gateway {
    fleet_gateway_with(
        redis,
        backend,
        "",
        &format!("lease_ttl = \"2s\"\n{cluster_extra}"),
    )
}

/// [`fleet_gateway`] with `gateway_extra` in `[gateway]` and `cluster` in `[cluster]`.
fn fleet_gateway_with(
    redis: &RedisServer,
    backend: &str,
    gateway_extra: &str,
    cluster: &str,
) -> Gateway {
    let text = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n[cluster]\nstore = \"{}\"\nstore_timeout = \"500ms\"\n{cluster}\n\
         [[products]]\nname = \"gold\"\n\
         [[products.subscriptions]]\nname = \"acme\"\nmax_connections = 10\nprimary_key_env = \"TG_FLEET_KEY\"\n\
         {}",
        gateway_section(gateway_extra),
        redis.url(),
        api_section("chat", "chat", backend, "products = [\"gold\"]"),
    );
    Gateway::start_with_env(TempDir::new("fleet"), &text, &[("TG_FLEET_KEY", KEY)])
}

pub(crate) async fn open(gw: &Gateway) -> (u16, RawWs<tokio::net::TcpStream>) {
    let (head, ws) = raw_handshake(
        gw.ws.unwrap(),
        "/chat",
        &format!("Ocp-Apim-Subscription-Key: {KEY}\r\n"),
    )
    .await;
    (status_of(&head), ws)
}

/// Three gateway processes, one Redis: 60 handshakes racing over the three get exactly the
/// subscription's 10 slots (the rest 429); a close on any gateway lets exactly one more in;
/// `kill -9` of a gateway frees the slots it held within `lease_ttl` (2 s) plus a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateway_processes_share_a_subscription_limit_and_survive_a_kill_9() {
    let redis = RedisServer::start();
    let backend = RawBackend::start(echo_frames()).await;
    let gws = [
        fleet_gateway(&redis, &backend.url(), "on_store_failure = \"closed\""),
        fleet_gateway(&redis, &backend.url(), "on_store_failure = \"closed\""),
        fleet_gateway(&redis, &backend.url(), "on_store_failure = \"closed\""),
    ];
    let ids: std::collections::HashSet<String> = gws
        .iter()
        .map(|g| {
            let rec = &g.records("cluster")[0];
            rec["gateway_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 3, "each process has its own id: {ids:?}");
    let addrs: Vec<_> = gws.iter().map(|g| g.ws.unwrap()).collect();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let addr = addrs[i % 3];
        tasks.push(tokio::spawn(async move {
            let (head, ws) = raw_handshake(
                addr,
                "/chat",
                &format!("Ocp-Apim-Subscription-Key: {KEY}\r\n"),
            )
            .await;
            (i % 3, status_of(&head), ws)
        }));
    }
    let mut held = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (gw, status, ws) = t.await.unwrap();
        match status {
            101 => held.push((gw, ws)),
            429 => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        (held.len(), refused),
        (10, 50),
        "exactly the limit, across three gateways"
    );
    // `/apis` of any gateway shows the fleet's count (read once per heartbeat interval).
    let (acme, fleet) = fleet_view(&gws[1], 10).await;
    assert_eq!(
        acme["active_connections"],
        held.iter().filter(|(g, _)| *g == 1).count()
    );
    assert_eq!(fleet["live_gateways"], 3, "{fleet}");
    assert_eq!(fleet["store_available"], true, "{fleet}");

    // A close on any gateway: exactly one more gets in.
    let (_, mut ws) = held.pop().unwrap();
    ws.close(1000, "bye").await.unwrap();
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, ws) = open(&gws[held.len() % 3]).await;
        if status == 101 {
            held.push((held.len() % 3, ws));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for g in &gws {
        assert_eq!(open(g).await.0, 429, "the fleet is at its limit again");
    }

    // kill -9 the gateway holding the most; its slots come back within lease_ttl + 1 s.
    let victim = (0..3)
        .max_by_key(|g| held.iter().filter(|(h, _)| h == g).count())
        .unwrap();
    let lost = held.iter().filter(|(h, _)| *h == victim).count();
    assert!(lost > 0);
    let gws = Vec::from(gws);
    let killed = Instant::now();
    gws[victim].signal("KILL");
    let survivors: Vec<&Gateway> = gws
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, g)| g)
        .collect();
    let mut regained = 0;
    let mut keep = Vec::new();
    while regained < lost {
        assert!(
            killed.elapsed()
                < Duration::from_secs(2) + Duration::from_secs(1) + Duration::from_millis(500),
            "{regained} of {lost} slots back after {:?}",
            killed.elapsed()
        );
        let (status, ws) = open(survivors[regained % 2]).await;
        if status == 101 {
            regained += 1;
            keep.push(ws);
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(open(survivors[0]).await.0, 429, "and not one more");
}

/// A gateway that stops leaves the fleet: the slots of the connections it still held when
/// `drain_timeout` ran out come back at once, not after `lease_ttl` (30 s here). And closes
/// are given back in batches: ten at once cost at most five calls, not ten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_gives_its_slots_back_at_once_and_closes_go_back_in_batches() {
    let redis = RedisServer::start();
    let backend = RawBackend::start(echo_frames()).await;
    let limits = "[gateway.limits]\ndrain_timeout = \"1s\"";
    let mut leaving = fleet_gateway_with(&redis, &backend.url(), limits, "lease_ttl = \"30s\"");
    let staying = fleet_gateway_with(&redis, &backend.url(), limits, "lease_ttl = \"30s\"");
    // Held without answering the drain's 1001: they are still open when the process exits.
    let mut held = Vec::new();
    for _ in 0..10 {
        let (status, ws) = open(&leaving).await;
        assert_eq!(status, 101);
        held.push(ws);
    }
    assert_eq!(open(&staying).await.0, 429, "the fleet is at its limit");
    leaving.signal("TERM");
    assert!(exit_status(&mut leaving, Duration::from_secs(10))
        .await
        .success());
    let mut fresh = Vec::new();
    for i in 0..10 {
        let (status, ws) = open(&staying).await;
        assert_eq!(status, 101, "handshake {i} after the other gateway left");
        fresh.push(ws);
    }
    assert_eq!(open(&staying).await.0, 429, "and not one more");
    assert_eq!(
        leaving.records("store_left").len(),
        1,
        "{}",
        leaving.output()
    );
    drop(held);

    // Closes are given back in batches: ten closes at once take far fewer than ten calls.
    let admin = staying.admin.unwrap();
    let releases = |m: &prometheus_parse::Scrape| {
        sample(
            m,
            "tollgate_store_call_duration_seconds_count",
            &[("call", "release")],
        )
        .unwrap_or(0.0)
    };
    let before = releases(&scrape(admin).await);
    drop(fresh);
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = scrape(admin).await;
        if sample(&m, "tollgate_fleet_slots_held", &[]) == Some(0.0) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connections' slots never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let calls = releases(&m) - before;
    assert!(
        (1.0..=5.0).contains(&calls),
        "{calls} release calls for 10 closes"
    );
    for i in 0..10 {
        assert_eq!(
            open(&staying).await.0,
            101,
            "handshake {i} after the closes"
        );
    }
}

/// Subscription `acme` in `/apis` once its fleet-wide count is `want` (waiting up to 5 s for
/// the next read), and the `/apis` fleet section.
async fn fleet_view(gw: &Gateway, want: u64) -> (serde_json::Value, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, body) = http_get(gw.admin.unwrap(), "/apis").await;
        let apis: serde_json::Value = serde_json::from_str(&body).unwrap();
        let acme = apis["products"][0]["subscriptions"][0].clone();
        assert_eq!(acme["name"], "acme", "{apis}");
        if acme["fleet_active_connections"] == want {
            return (acme, apis["fleet"].clone());
        }
        assert!(
            Instant::now() < deadline,
            "the fleet's count never read {want}: {apis}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Redis restarts empty while two gateways hold 5 connections: within a heartbeat interval
/// each has written its counts back, so `/apis` reads 5 across the fleet again and the limit
/// (10) admits exactly 5 more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_the_fleet_counts_the_live_connections_again() {
    let mut redis = RedisServer::start();
    let backend = RawBackend::start(echo_frames()).await;
    let gws = [
        fleet_gateway(&redis, &backend.url(), "on_store_failure = \"closed\""),
        fleet_gateway(&redis, &backend.url(), "on_store_failure = \"closed\""),
    ];
    let mut held = Vec::new();
    for i in 0..5 {
        let (status, ws) = open(&gws[i % 2]).await;
        assert_eq!(status, 101);
        held.push(ws);
    }
    fleet_view(&gws[0], 5).await;
    redis.restart();
    // Empty now; the heartbeats (every 667 ms) write 3 + 2 back. A read of the counts has
    // been tried since the restart (once per interval, each within 500 ms) before they are
    // checked, so what `/apis` shows comes from the restarted store.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (acme, _) = fleet_view(&gws[0], 5).await;
    assert_eq!(acme["active_connections"], 3);
    let mut admitted = 0;
    for i in 0..8 {
        let (status, ws) = open(&gws[i % 2]).await;
        match status {
            101 => {
                admitted += 1;
                held.push(ws);
            }
            429 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        admitted, 5,
        "the limit counts the connections held before the restart"
    );
}

/// Redis stopped: a gateway with `on_store_failure = "closed"` answers 503 and one with
/// `"open"` admits, each within `store_timeout` (500 ms) plus scheduling; both log
/// `store_unavailable` once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_each_failure_mode_does_what_it_says_within_store_timeout() {
    let mut redis = RedisServer::start();
    let backend = RawBackend::start(echo_frames()).await;
    let closed = fleet_gateway(&redis, &backend.url(), "on_store_failure = \"closed\"");
    let opened = fleet_gateway(&redis, &backend.url(), "on_store_failure = \"open\"");
    assert_eq!(open(&closed).await.0, 101);
    redis.stop();
    for (gw, want) in [(&closed, 503), (&opened, 101)] {
        let started = Instant::now();
        let (status, _ws) = open(gw).await;
        assert_eq!(status, want);
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        gw.wait_record("store_unavailable", |_| true).await;
    }
}
