//! What operators watch: `/metrics` (parsed as Prometheus text), the admin endpoints, and the
//! documented fields of the handshake and connection log records.

use std::time::Duration;

use crate::support::*;

/// Two APIs with policies behind one global policy that is skipped on WebSocket APIs, plus an
/// API whose backend is down.
fn observed_manifest(backend: &str, down: &str) -> String {
    format!(
        r#"{}
[admin]
listen = "127.0.0.1:0"

[[policies]]
plugin = "declares-set-body"

{}
[[apis.on_handshake]]
plugin = "set-header"
config = {{ name = "X-Seen", value = "yes" }}

{}
[[apis.on_handshake]]
plugin = "jwt-validate"
[apis.on_handshake.config]
algorithms = ["HS256"]
jwks = '{{"keys": [{{"kty": "oct", "kid": "k", "k": "dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IG9mIGVub3VnaCBsZW5ndGg"}}]}}'

{}"#,
        gateway_section("plugin_dir = \"plugins\""),
        api_section(
            "open",
            "open",
            backend,
            "[apis.limits]\nmax_connections = 2"
        ),
        api_section("locked", "locked", backend, ""),
        api_section("down", "down", down, ""),
    )
}

fn start_observed(backend: &RawBackend, down: &str) -> Gateway {
    let dir = TempDir::new("metrics");
    let plugin_dir = dir.path().join("plugins");
    plugins::install(&plugin_dir, &["set_header.wasm", "jwt_validate.wasm"]);
    std::fs::copy(
        plugins::declaring_one("set-body").join("declares-set-body.wasm"),
        plugin_dir.join("declares-set-body.wasm"),
    )
    .unwrap();
    Gateway::start_in(dir, &observed_manifest(&backend.url(), down))
}

/// Bytes of a masked client frame / an unmasked server frame with `len` payload bytes.
fn wire(len: usize, masked: bool) -> f64 {
    let head = if len < 126 { 2 } else { 4 };
    (head + len + if masked { 4 } else { 0 }) as f64
}

#[tokio::test]
async fn metrics_count_a_scripted_session_exactly() {
    let backend = RawBackend::start(echo_frames()).await;
    // A port nothing listens on.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        format!("ws://{a}")
    };
    let gw = start_observed(&backend, &down);
    let addr = gw.ws.unwrap();
    let admin = gw.admin.unwrap();

    // Two connections, at the API's max_connections = 2; a third is refused with 503.
    let (_, mut a) = ws_connect(addr, "/open", "").await;
    let (_, mut b) = ws_connect(addr, "/open", "").await;
    let (head, _) = raw_handshake(addr, "/open", "").await;
    assert_eq!(status_of(&head), 503, "{head}");

    // Live counters show while the connections are open. The gauge counts relayed
    // connections: a relay starts just after its client got the 101, so a scrape may come a
    // moment before the second one is counted; it must show 2 within a second.
    let api = |k: &'static str| vec![("api", "open"), ("direction", k)];
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let live = scrape(admin).await;
        let active = sample(&live, "tollgate_connections_active", &[("api", "open")]);
        if active == Some(2.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "active: {active:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (mut c2b_bytes, mut b2c_bytes) = (0.0, 0.0);
    for ws in [&mut a, &mut b] {
        for (opcode, payload) in [
            (1u8, &b"hello"[..]),
            (2, &[0u8, 1, 2][..]),
            (1, &[b'x'; 200][..]),
        ] {
            ws.send(true, opcode, payload).await.unwrap();
            assert_eq!(ws.read_frame().await.unwrap().payload, payload);
            c2b_bytes += wire(payload.len(), true);
            b2c_bytes += wire(payload.len(), false);
        }
        ws.close(1000, "done").await.unwrap();
        let f = ws.read_until_close().await.unwrap();
        assert_eq!(f.close_code(), Some(1000));
        c2b_bytes += wire(6, true);
        b2c_bytes += wire(6, false);
    }
    // Rejected handshakes: by a policy, by routing, by a dead backend.
    for (path, status) in [("/locked", 401), ("/nowhere", 404), ("/down", 502)] {
        let (head, _) = raw_handshake(addr, path, "").await;
        assert_eq!(status_of(&head), status, "{path}: {head}");
    }
    // Both relays have ended (their records are written after the counters).
    wait_until("both close records", || {
        gw.records("connection_closed").len() >= 2
    })
    .await;
    assert_eq!(gw.records("connection_closed").len(), 2, "{}", gw.output());

    let m = scrape(admin).await;
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&m, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{m:#?}"))
    };
    let h = "tollgate_handshakes_total";
    assert_eq!(
        get(
            h,
            &[
                ("api", "open"),
                ("product", ""),
                ("subscription", ""),
                ("status", "101")
            ]
        ),
        2.0
    );
    assert_eq!(
        get(
            h,
            &[
                ("api", "open"),
                ("product", ""),
                ("subscription", ""),
                ("status", "503")
            ]
        ),
        1.0
    );
    assert_eq!(
        get(
            h,
            &[
                ("api", "locked"),
                ("product", ""),
                ("subscription", ""),
                ("status", "401")
            ]
        ),
        1.0
    );
    assert_eq!(
        get(
            h,
            &[
                ("api", ""),
                ("product", ""),
                ("subscription", ""),
                ("status", "404")
            ]
        ),
        1.0
    );
    assert_eq!(
        get(
            h,
            &[
                ("api", "down"),
                ("product", ""),
                ("subscription", ""),
                ("status", "502")
            ]
        ),
        1.0
    );
    assert_eq!(
        m.samples.iter().filter(|s| s.metric == h).count(),
        5,
        "no other handshake series"
    );
    assert_eq!(
        get(
            "tollgate_handshake_duration_seconds_count",
            &[("api", "open")]
        ),
        3.0
    );
    assert_eq!(get("tollgate_connections_active", &[("api", "open")]), 0.0);
    assert_eq!(
        get(
            "tollgate_connection_duration_seconds_count",
            &[("api", "open")]
        ),
        2.0
    );
    for (dir, bytes) in [
        ("client_to_backend", c2b_bytes),
        ("backend_to_client", b2c_bytes),
    ] {
        let l = |t: &'static str| {
            let mut v = api(dir);
            v.push(("type", t));
            v
        };
        assert_eq!(get("tollgate_frames_total", &l("text")), 4.0, "{dir}");
        assert_eq!(get("tollgate_frames_total", &l("binary")), 2.0, "{dir}");
        assert_eq!(get("tollgate_frames_total", &l("close")), 2.0, "{dir}");
        assert_eq!(get("tollgate_frames_total", &l("ping")), 0.0, "{dir}");
        assert_eq!(get("tollgate_messages_total", &l("text")), 4.0, "{dir}");
        assert_eq!(get("tollgate_messages_total", &l("binary")), 2.0, "{dir}");
        assert_eq!(
            get("tollgate_relayed_bytes_total", &api(dir)),
            bytes,
            "{dir}"
        );
    }
    assert_eq!(
        get(
            "tollgate_connections_closed_total",
            &[("api", "open"), ("closed_by", "client"), ("code", "1000")]
        ),
        2.0
    );
    assert_eq!(
        get(
            "tollgate_backend_handshake_errors_total",
            &[("api", "down"), ("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        get(
            "tollgate_limits_hit_total",
            &[("api", "open"), ("limit", "api_max_connections")]
        ),
        1.0
    );
    let calls = "tollgate_policy_calls_total";
    let p = |api: &'static str, plugin: &'static str, outcome: &'static str| {
        vec![
            ("api", api),
            ("plugin", plugin),
            ("scope", "api"),
            ("outcome", outcome),
        ]
    };
    assert_eq!(get(calls, &p("open", "set-header", "allow")), 2.0);
    assert_eq!(get(calls, &p("open", "set-header", "reject")), 0.0);
    assert_eq!(get(calls, &p("locked", "jwt-validate", "reject")), 1.0);
    assert_eq!(get(calls, &p("locked", "jwt-validate", "allow")), 0.0);
    assert_eq!(get(calls, &p("locked", "jwt-validate", "error")), 0.0);
    assert_eq!(
        get(
            "tollgate_policy_duration_seconds_count",
            &[("api", "open"), ("plugin", "set-header"), ("scope", "api")]
        ),
        2.0
    );
    // The global policy is skipped on every handshake that reaches the chain.
    let skips = |api: &'static str| {
        get(
            "tollgate_policy_skips_total",
            &[
                ("api", api),
                ("plugin", "declares-set-body"),
                ("scope", "global"),
            ],
        )
    };
    assert_eq!(skips("open"), 2.0);
    assert_eq!(skips("locked"), 1.0);
    assert_eq!(skips("down"), 1.0);

    // A reload is counted with its trigger and outcome.
    gw.signal("HUP");
    gw.wait_record("reload", |r| r["outcome"] == "applied")
        .await;
    let m = scrape(admin).await;
    assert_eq!(
        sample(
            &m,
            "tollgate_reloads_total",
            &[("trigger", "sighup"), ("outcome", "applied")]
        ),
        Some(1.0)
    );
    // Counters survive the reload.
    assert_eq!(
        sample(
            &m,
            h,
            &[
                ("api", "open"),
                ("product", ""),
                ("subscription", ""),
                ("status", "101")
            ]
        ),
        Some(2.0)
    );
}

/// A backend that accepts and then neither reads nor answers: a closing connection waits out
/// the gateway's close grace, which keeps a drain going long enough to watch it.
fn silent() -> Handler {
    std::sync::Arc::new(|_head, ws| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(ws);
        })
    })
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_the_served_apis() {
    let backend = RawBackend::start(silent()).await;
    let dir = TempDir::new("admin");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let text = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        gateway_section("plugin_dir = \"plugins\"\n[gateway.limits]\ndrain_timeout = \"20s\""),
        api_section(
            "echo",
            "echo",
            &backend.url(),
            "[[apis.on_handshake]]\nplugin = \"set-header\"\ninstances = \"pooled\"\nconfig = { name = \"X-Api-Key\", value = \"s3cret-value\" }\n"
        )
    );
    let gw = Gateway::start_in(dir, &text);
    let admin = gw.admin.unwrap();
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    // The admin listener binds before the client listeners are serving: ready follows shortly.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/readyz").await.0 != 200 {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(http_get(admin, "/nothing-here").await.0, 404);

    let (_, _ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    let (status, head, body) = http_get(admin, "/apis").await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        header(&head, "content-type").as_deref(),
        Some("application/json")
    );
    assert!(
        !body.contains("s3cret-value"),
        "policy config must not be listed: {body}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["gateway"], "test");
    assert_eq!(v["listeners"][0]["scheme"], "ws");
    assert_eq!(v["listeners"][0]["addr"], gw.ws.unwrap().to_string());
    let api = &v["apis"][0];
    assert_eq!(api["name"], "echo");
    assert_eq!(api["path"], "/echo");
    assert_eq!(api["schemes"], serde_json::json!(["ws"]));
    assert_eq!(api["backend"], backend.url());
    assert_eq!(api["active_connections"], 1);
    assert_eq!(api["policies"][0]["plugin"], "set-header");
    assert_eq!(api["policies"][0]["scope"], "api");
    assert_eq!(api["policies"][0]["instances"], "pooled");

    // Draining: not ready (so a load balancer stops sending), still alive.
    gw.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http_get(admin, "/readyz").await.0 != 503 {
        assert!(
            std::time::Instant::now() < deadline,
            "readyz still 200 while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.wait_record("draining", |r| r["connections"] == 1).await;
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
}

/// The README documents the `handshake` and `connection_closed` records field by field; the
/// real records carry exactly those fields (the ones marked *(rejections only)* only on a
/// rejection).
#[tokio::test]
async fn handshake_and_close_records_carry_the_documented_fields() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    // (name, documented type, rejections only)
    let documented = |record: &str| -> Vec<(String, String, bool)> {
        let heading = format!("#### `{record}` record");
        let start = readme
            .find(&heading)
            .unwrap_or_else(|| panic!("README has no `{heading}` section"));
        readme[start..]
            .lines()
            .skip(1)
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| {
                let name = l.strip_prefix("| `")?.split('`').next()?;
                let ty = l.split('|').nth(2)?.trim();
                Some((
                    name.to_owned(),
                    ty.to_owned(),
                    l.contains("*(rejections only)*"),
                ))
            })
            .collect()
    };
    let handshake_fields = documented("handshake");
    let close_fields = documented("connection_closed");
    assert!(handshake_fields.len() >= 10 && close_fields.len() >= 10);

    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        gateway_section(""),
        api_section("echo", "echo", &backend.url(), "")
    ));
    let addr = gw.ws.unwrap();
    let (_, mut ws) = ws_connect(addr, "/echo?room=1", "").await;
    ws.send(true, 1, b"hi").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
    ws.close(1000, "bye").await.unwrap();
    ws.read_until_close().await.unwrap();
    let (head, _) = raw_handshake(addr, "/nowhere", "").await;
    assert_eq!(status_of(&head), 404);

    let ok = gw.wait_record("handshake", |r| r["status"] == 101).await;
    let rejected = gw.wait_record("handshake", |r| r["status"] == 404).await;
    let closed = gw.wait_record("connection_closed", |_| true).await;
    let keys =
        |r: &serde_json::Value| -> Vec<String> { r.as_object().unwrap().keys().cloned().collect() };
    let check =
        |what: &str, r: &serde_json::Value, fields: &[(String, String, bool)], rejection: bool| {
            let want: Vec<&(String, String, bool)> = fields
                .iter()
                .filter(|(_, _, only_rejections)| rejection || !only_rejections)
                .collect();
            let mut have = keys(r);
            have.sort();
            let mut want_sorted: Vec<String> = want.iter().map(|(f, _, _)| f.clone()).collect();
            want_sorted.sort();
            assert_eq!(have, want_sorted, "{what}: record {r}");
            // Each field has the documented JSON type.
            for (f, ty, _) in want {
                let v = &r[f.as_str()];
                let fits = match ty.as_str() {
                    "string" => v.is_string(),
                    "number" => v.is_number(),
                    other => panic!("README documents `{f}` with an unknown type {other:?}"),
                };
                assert!(fits, "{what}: `{f}` should be a {ty}: {r}");
            }
            // RFC 3339 in UTC, within a few minutes of now (the test's own clock).
            let ts = r["timestamp"].as_str().unwrap();
            let secs = rfc3339_utc_seconds(ts).unwrap_or_else(|| panic!("{what}: timestamp {ts}"));
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            assert!(
                (now - secs).abs() < 300,
                "{what}: timestamp {ts} is not now"
            );
            assert_eq!(r["level"], "INFO", "{what}");
            assert_eq!(r["target"], "tollgate::server", "{what}");
            let client: std::net::SocketAddr = r["client"].as_str().unwrap().parse().unwrap();
            assert!(
                client.ip().is_loopback() && client.port() != 0,
                "{what}: {r}"
            );
            let ms = r["duration_ms"].as_f64().unwrap();
            assert!((0.0..60_000.0).contains(&ms), "{what}: duration_ms {ms}");
        };
    check("101 handshake", &ok, &handshake_fields, false);
    check("rejected handshake", &rejected, &handshake_fields, true);
    check("connection_closed", &closed, &close_fields, false);
    let expect = |r: &serde_json::Value, pairs: &[(&str, serde_json::Value)]| {
        for (k, v) in pairs {
            assert_eq!(&r[*k], v, "`{k}` in {r}");
        }
    };
    use serde_json::json;
    // The records of one connection share its `conn` number, and its client address.
    assert_eq!(ok["conn"], closed["conn"]);
    assert_eq!(ok["client"], closed["client"]);
    assert_ne!(ok["conn"], rejected["conn"]);
    expect(
        &ok,
        &[
            ("message", json!("handshake accepted")),
            ("event", json!("handshake")),
            ("api", json!("echo")),
            ("product", json!("")),
            ("subscription", json!("")),
            ("operation", json!("onHandshake")),
            ("status", json!(101)),
            ("scheme", json!("ws")),
            ("path", json!("/echo")),
            ("backend", json!(backend.url())),
            ("policies_ms", json!(0.0)),
        ],
    );
    expect(
        &rejected,
        &[
            ("message", json!("handshake rejected")),
            ("api", json!("")),
            ("status", json!(404)),
            ("path", json!("/nowhere")),
            ("backend", json!("")),
            ("reason", json!("no API serves path /nowhere")),
        ],
    );
    // "hi" and a close "bye" each way: masked 8 + 11 bytes from the client, 4 + 7 back.
    expect(
        &closed,
        &[
            ("message", json!("connection closed")),
            ("event", json!("connection_closed")),
            ("api", json!("echo")),
            ("backend", json!(backend.url())),
            ("backend_target", json!("/?room=REDACTED")),
            ("closed_by", json!("client")),
            ("close_code", json!(1000)),
            ("close_reason", json!("bye")),
            ("client_frames", json!(2)),
            ("client_messages", json!(1)),
            ("client_bytes", json!(19)),
            ("backend_frames", json!(2)),
            ("backend_messages", json!(1)),
            ("backend_bytes", json!(11)),
        ],
    );
}

/// Seconds since the Unix epoch of an RFC 3339 timestamp in UTC (`YYYY-MM-DDTHH:MM:SS[.f]Z`);
/// `None` for anything else, an offset other than `Z` included.
fn rfc3339_utc_seconds(ts: &str) -> Option<i64> {
    let b = ts.as_bytes();
    let (date, rest) = ts.split_once('T')?;
    let time = rest.strip_suffix('Z')?;
    let num = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok())?
    };
    let d: Vec<&str> = date.split('-').collect();
    let (whole, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<&str> = whole.split(':').collect();
    if b.len() < 20 || d.len() != 3 || t.len() != 3 || num(frac).is_none() {
        return None;
    }
    let (y, m, day) = (num(d[0])?, num(d[1])?, num(d[2])?);
    let (h, min, s) = (num(t[0])?, num(t[1])?, num(t[2])?);
    if d[0].len() != 4
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || h > 23
        || min > 59
        || s > 60
    {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3_600 + min * 60 + s)
}

/// At start, one `api_served` record per API this gateway serves (name, url_suffix, backend
/// with query values redacted) and one `api_not_served` per API whose `gateways` list leaves
/// it out; `listening` names each bound listener.
#[tokio::test]
async fn start_records_name_each_api_served_or_not_and_each_listener() {
    let gw = Gateway::start(&format!(
        "{}{}{}",
        gateway_section(""),
        api_section(
            "chat",
            "chat/v1",
            "ws://127.0.0.1:9/socket?token=s3cret",
            ""
        ),
        api_section(
            "elsewhere",
            "else",
            "ws://127.0.0.1:9/",
            "gateways = [\"other\"]"
        )
    ));
    let served = gw.wait_record("api_served", |_| true).await;
    assert_eq!(served["api"], "chat");
    assert_eq!(served["url_suffix"], "chat/v1");
    assert_eq!(served["backend"], "ws://127.0.0.1:9/socket?token=REDACTED");
    assert_eq!(gw.records("api_served").len(), 1);
    let not = gw.wait_record("api_not_served", |_| true).await;
    assert_eq!(not["api"], "elsewhere");
    assert_eq!(not["gateway"], "test");
    let listening = gw.wait_record("listening", |r| r["scheme"] == "ws").await;
    assert_eq!(listening["addr"], gw.ws.unwrap().to_string());
    assert!(!gw.output().contains("s3cret"), "{}", gw.output());
}
