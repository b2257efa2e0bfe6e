//! `rate-limit-by-key` and the host's `counters` (issue 19): a limit by key held exactly across
//! three gateway processes sharing a real `redis-server`, with a `Retry-After` right to the
//! second; the same limit in one gateway without `[cluster]`; what each `on_store_failure`
//! mode does to it while Redis is away.

use std::time::{Duration, Instant};

use crate::support::redis::RedisServer;
use crate::support::*;

const KEY: &str = "rate-test-subscription-key-0123456789";

/// The value of header `name` in a response head.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A gateway whose API `chat` lets subscription `acme` in at most `calls` times per 10 s,
/// counted by `rate-limit-by-key` under `{subscription.name}`; clustered on `redis` when given.
fn limited_gateway(backend: &str, calls: u32, cluster: Option<(&RedisServer, &str)>) -> Gateway {
    let cluster = cluster.map_or(String::new(), |(redis, extra)| {
        format!(
            "[cluster]\nstore = \"{}\"\nlease_ttl = \"3s\"\nstore_timeout = \"500ms\"\n{extra}\n",
            redis.url()
        )
    });
    let text = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n{cluster}\
         [[products]]\nname = \"gold\"\n\
         [[products.subscriptions]]\nname = \"acme\"\nprimary_key_env = \"TG_RATE_KEY\"\n\
         {}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section(
            "chat",
            "chat",
            backend,
            &format!(
                "products = [\"gold\"]\n[[apis.on_handshake]]\nplugin = \"rate-limit-by-key\"\n\
                 config = {{ calls = {calls}, renewal_period = \"10s\", counter_key = \"{{subscription.name}}\", \
                 remaining_calls_header_name = \"x-ratelimit-remaining\" }}\n"
            )
        ),
    );
    let dir = TempDir::new("rate");
    plugins::install(&dir.path().join("plugins"), &["rate_limit_by_key.wasm"]);
    Gateway::start_with_env(dir, &text, &[("TG_RATE_KEY", KEY)])
}

async fn open(addr: std::net::SocketAddr) -> (String, RawWs<tokio::net::TcpStream>) {
    raw_handshake(
        addr,
        "/chat",
        &format!("Ocp-Apim-Subscription-Key: {KEY}\r\n"),
    )
    .await
}

/// `rate-limit-by-key` at 30 per 10 s on three gateway processes sharing one Redis: 100
/// handshakes racing over the three get exactly 30 101s and 70 429s, each with a `Retry-After`
/// of whole seconds. That figure is right to the second: a handshake a little before it has
/// passed is still refused, one a little after it is admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_by_key_holds_exactly_across_three_gateways() {
    let redis = RedisServer::start();
    let backend = RawBackend::start(echo_frames()).await;
    let gws = [
        limited_gateway(&backend.url(), 30, Some((&redis, ""))),
        limited_gateway(&backend.url(), 30, Some((&redis, ""))),
        limited_gateway(&backend.url(), 30, Some((&redis, ""))),
    ];
    let addrs: Vec<_> = gws.iter().map(|g| g.ws.unwrap()).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let addr = addrs[i % 3];
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let (head, _ws) = open(addr).await;
            (head, sent, Instant::now())
        }));
    }
    let mut admitted = 0;
    let mut first_admitted = None;
    let mut refusals = Vec::new();
    for t in tasks {
        let (head, sent, at) = t.await.unwrap();
        match status_of(&head) {
            101 => {
                admitted += 1;
                first_admitted = Some(first_admitted.map_or(at, |f: Instant| f.min(at)));
            }
            429 => {
                let after: u64 = header(&head, "retry-after")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("a 429 without a Retry-After: {head}"));
                assert_eq!(header(&head, "x-ratelimit-remaining"), Some("0"), "{head}");
                refusals.push((after, sent, at));
            }
            other => panic!("unexpected {other}: {head}"),
        }
    }
    assert_eq!(
        (admitted, refusals.len()),
        (30, 70),
        "exactly the limit across three gateways"
    );
    let burst = started.elapsed();
    assert!(
        burst < Duration::from_secs(9),
        "the burst took {burst:?}: the test needs it inside the window"
    );
    // The first unit counted (before the first 101 came back) counts until its bucket's end
    // plus 10 s, at most 10.167 s later; a refusal sent after it waits at most that, rounded
    // up to whole seconds.
    let first = first_admitted.unwrap();
    for (after, sent, _) in &refusals {
        assert!(
            *after >= 1
                && *sent + Duration::from_secs(*after) <= first + Duration::from_millis(11_167),
            "Retry-After {after}, sent {:?} after the start, first 101 at {:?}",
            sent.duration_since(started),
            first.duration_since(started)
        );
    }

    // What operators see: each gateway's increments, who counted them, the store's round trips.
    let mut metrics = String::new();
    for g in &gws {
        metrics.push_str(&http_get(g.admin.unwrap(), "/metrics").await.2);
    }
    for series in [
        "tollgate_counter_increments_total{plugin=\"rate-limit-by-key\",outcome=\"allowed\",counted_by=\"fleet\"}",
        "tollgate_counter_increments_total{plugin=\"rate-limit-by-key\",outcome=\"refused\",counted_by=\"fleet\"}",
        "tollgate_store_call_duration_seconds_count{call=\"increment\"}",
        "tollgate_store_call_duration_seconds_count{call=\"heartbeat\"}",
        "tollgate_store_fallback 0",
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }

    // Right to the second: the last refusal's Retry-After R means the slot frees in (R-1, R] s.
    let (after, _, at) = *refusals.iter().max_by_key(|(_, _, at)| *at).unwrap();
    let margin = Duration::from_millis(300);
    tokio::time::sleep_until((at + Duration::from_secs(after - 1) - margin).into()).await;
    let (head, _) = open(addrs[0]).await;
    assert_eq!(status_of(&head), 429, "admitted before Retry-After: {head}");
    tokio::time::sleep_until((at + Duration::from_secs(after) + margin).into()).await;
    let (head, _ws) = open(addrs[1]).await;
    assert_eq!(status_of(&head), 101, "refused after Retry-After: {head}");
}

/// Without `[cluster]` the gateway counts itself: 3 per 10 s admits 3 of 10, the 101s saying
/// how many calls are left (2, 1, 0).
#[tokio::test]
async fn without_a_cluster_the_gateway_counts_in_process() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = limited_gateway(&backend.url(), 3, None);
    let addr = gw.ws.unwrap();
    let mut remaining = Vec::new();
    let mut refused = 0;
    for _ in 0..10 {
        let (head, _ws) = open(addr).await;
        match status_of(&head) {
            101 => remaining.push(header(&head, "x-ratelimit-remaining").map(str::to_owned)),
            429 => refused += 1,
            other => panic!("unexpected {other}: {head}"),
        }
    }
    let want: Vec<Option<String>> = ["2", "1", "0"]
        .iter()
        .map(|s| Some(s.to_string()))
        .collect();
    assert_eq!((remaining, refused), (want, 7));
}

/// Redis stopped mid-run: with `on_store_failure = "closed"` the policy cannot count and
/// refuses with 503 (and a warning says why); with `"local"` each gateway counts its share of
/// the limit itself (6 per 10 s over the 2 gateways alive at the last heartbeat: 3 each); both
/// answer within `store_timeout` plus scheduling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_the_failure_mode_decides() {
    let mut redis = RedisServer::start();
    let backend = RawBackend::start(echo_frames()).await;
    let closed = limited_gateway(
        &backend.url(),
        6,
        Some((&redis, "on_store_failure = \"closed\"")),
    );
    let local = limited_gateway(
        &backend.url(),
        6,
        Some((&redis, "on_store_failure = \"local\"")),
    );
    // Both have heartbeaten at least once: each sees two live gateways.
    assert_eq!(status_of(&open(closed.ws.unwrap()).await.0), 101);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    redis.stop();
    let started = Instant::now();
    let (head, _) = open(closed.ws.unwrap()).await;
    assert_eq!(status_of(&head), 503, "{head}");
    assert_eq!(header(&head, "retry-after"), Some("1"), "{head}");
    assert!(started.elapsed() < Duration::from_millis(1500));
    let warned = closed
        .wait_record("policy_log", |r| r["plugin"] == "rate-limit-by-key")
        .await;
    assert!(
        warned["message"]
            .as_str()
            .unwrap()
            .contains("the fleet's store is unavailable"),
        "{warned}"
    );
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (head, _ws) = open(local.ws.unwrap()).await;
        assert!(started.elapsed() < Duration::from_millis(1500));
        statuses.push(status_of(&head));
    }
    assert_eq!(
        statuses,
        [101, 101, 101, 429, 429],
        "a share of 6 over 2 gateways"
    );
    let (_, _, metrics) = http_get(local.admin.unwrap(), "/metrics").await;
    for series in [
        "tollgate_store_fallback 1",
        "tollgate_counter_increments_total{plugin=\"rate-limit-by-key\",outcome=\"allowed\",counted_by=\"local_share\"} 3",
        "tollgate_store_errors_total{call=\"increment\",error=\"error\"}",
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
}
