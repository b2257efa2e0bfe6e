//! The sandbox: a plugin that tries to read a file, open a socket, read an environment
//! variable or tell the time gets an error (or a zero clock) inside the sandbox unless its
//! attachment grants it, and nothing on the host is touched. The probe plugin reports what it
//! got in the 101 header `x-probe`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::*;

fn probe_api(name: &str, backend: &str, mode: &str, arg: &str, grants: &str) -> String {
    api_section(
        name,
        name,
        backend,
        &format!(
            "[[apis.on_handshake]]\nplugin = \"faulty\"\n{grants}\nconfig = {{ mode = \"{mode}\", arg = {} }}\n",
            serde_json::to_string(arg).unwrap()
        ),
    )
}

#[tokio::test]
async fn files_sockets_environment_and_clock_are_denied_unless_granted() {
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    // A listener the plugin is pointed at: it must never see a connection.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let bait_addr = bait.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));

    let dir = TempDir::new("sandbox");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/allowed.txt"), "twelve bytes").unwrap();
    let outside = dir.path().join("outside.txt");
    std::fs::write(&outside, "host secret").unwrap();
    let outside = outside.display().to_string();
    let path_var = std::env::var("PATH").unwrap();

    let apis = [
        probe_api("file", &b, "read-file", &outside, ""),
        probe_api("file-rel", &b, "read-file", "data/allowed.txt", ""),
        probe_api("socket", &b, "socket", &bait_addr, ""),
        probe_api("env", &b, "env", "PATH", ""),
        probe_api("clock", &b, "clock", "", ""),
        probe_api(
            "granted-file",
            &b,
            "read-file",
            "data/allowed.txt",
            "grants = { read_dirs = [\"data\"] }",
        ),
        probe_api(
            "escape",
            &b,
            "read-file",
            "data/../outside.txt",
            "grants = { read_dirs = [\"data\"] }",
        ),
        probe_api(
            "granted-env",
            &b,
            "env",
            "PATH",
            "grants = { env = [\"PATH\"] }",
        ),
        probe_api(
            "granted-clock",
            &b,
            "clock",
            "",
            "grants = { clock = true }",
        ),
    ]
    .concat();
    let gw = Gateway::start_in(
        dir,
        &format!("{}{apis}", gateway_section("plugin_dir = \"plugins\"")),
    );
    let probe = |api: &'static str| {
        let addr = gw.ws.unwrap();
        async move {
            let (head, _ws) = ws_connect(addr, &format!("/{api}"), "").await;
            header(&head, "x-probe").unwrap_or_else(|| panic!("{api}: no x-probe in {head}"))
        }
    };

    for api in ["file", "file-rel", "socket", "env", "escape"] {
        let got = probe(api).await;
        eprintln!("PROBE {api}: {got}");
        assert!(got.starts_with("error:"), "{api}: {got}");
    }
    assert_eq!(
        probe("clock").await,
        "ok: 0",
        "an ungranted clock reads zero"
    );
    assert_eq!(probe("granted-file").await, "ok: 12 bytes");
    assert_eq!(probe("granted-env").await, format!("ok: {path_var}"));
    let secs: u64 = probe("granted-clock")
        .await
        .trim_start_matches("ok: ")
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(secs.abs_diff(now) < 60, "granted clock {secs} vs {now}");

    while bait.accept().is_ok() {
        accepted.fetch_add(1, Ordering::SeqCst);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the plugin reached a host socket"
    );
}

/// Isolation by instance strategy: with fresh instances (the default) no handshake sees what
/// an earlier one left in the plugin's globals; a pooled attachment reuses its warm instance
/// (the count goes up) and replaces it after `pool_max_uses` handshakes.
#[tokio::test]
async fn fresh_instances_share_nothing_and_pooled_ones_are_reused_then_recycled() {
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    let dir = TempDir::new("instances");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let apis = [
        probe_api("fresh", &b, "count", "", ""),
        probe_api(
            "pooled",
            &b,
            "count",
            "",
            "instances = \"pooled\"\npool_max_uses = 3",
        ),
    ]
    .concat();
    let gw = Gateway::start_in(
        dir,
        &format!("{}{apis}", gateway_section("plugin_dir = \"plugins\"")),
    );
    let addr = gw.ws.unwrap();
    let mut seen = std::collections::HashMap::new();
    for api in ["fresh", "pooled"] {
        let mut v = Vec::new();
        // One after another: a handshake finishes (and its instance is back in the pool)
        // before the next starts, so the order is deterministic.
        for _ in 0..5 {
            let (head, _ws) = ws_connect(addr, &format!("/{api}"), "").await;
            v.push(header(&head, "x-probe").unwrap_or_else(|| panic!("{api}: {head}")));
        }
        seen.insert(api, v);
    }
    assert_eq!(seen["fresh"], vec!["ok: 1"; 5]);
    assert_eq!(
        seen["pooled"],
        vec!["ok: 1", "ok: 2", "ok: 3", "ok: 1", "ok: 2"]
    );
}

/// A fresh instance's memory is as new even where the host kept the slot's pages mapped
/// between instances (the pooling allocator's `keep_resident` with `PAGEMAP_SCAN`, where the
/// kernel has it) and where it released them: each call finds a 3 MiB static, spanning both,
/// all zero, then dirties every page of it. Handshakes one after another (the same slot, reused
/// warm) and 16 at once (several slots). A pooled instance shows the dirt, so the probe sees it.
#[tokio::test]
async fn fresh_instances_find_memory_an_earlier_call_dirtied_as_new() {
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    let dir = TempDir::new("scribble");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let apis = [
        probe_api("fresh", &b, "scribble", "", ""),
        probe_api("pooled", &b, "scribble", "", "instances = \"pooled\""),
    ]
    .concat();
    let gw = Gateway::start_in(
        dir,
        &format!("{}{apis}", gateway_section("plugin_dir = \"plugins\"")),
    );
    let addr = gw.ws.unwrap();
    let probe = |api: &'static str| async move {
        let (head, _ws) = ws_connect(addr, &format!("/{api}"), "").await;
        header(&head, "x-probe").unwrap_or_else(|| panic!("{api}: {head}"))
    };
    for _ in 0..6 {
        assert_eq!(probe("fresh").await, "ok: clean");
    }
    for round in 0..3 {
        let all = futures_util::future::join_all((0..16).map(|_| probe("fresh"))).await;
        assert_eq!(all, vec!["ok: clean"; 16], "round {round}");
    }
    assert_eq!(probe("pooled").await, "ok: clean");
    let second = probe("pooled").await;
    assert!(second.contains("769 dirty pages"), "{second}");
    // Which reset this run exercised: the start says (PAGEMAP_SCAN needs Linux 6.7+).
    let resets = gw.records("policy_memory_reset");
    let method = resets.first().map(|r| r["method"].clone());
    assert!(
        matches!(
            method.as_ref().and_then(|m| m.as_str()),
            Some("pagemap_scan" | "madvise")
        ),
        "{}",
        gw.output()
    );
    eprintln!("policy memory reset: {}", method.unwrap_or_default());
}

/// A pooled instance that trapped, ran out of CPU time or hit its memory limit is dropped, never
/// put back: the next handshake gets a fresh one (its count starts again at 1).
#[tokio::test]
async fn a_pooled_instance_that_failed_is_replaced() {
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    let dir = TempDir::new("pool-fail");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let failures = ["trap", "loop", "alloc"];
    let apis: String = failures
        .iter()
        .map(|f| {
            probe_api(
                f,
                &b,
                "fail-second",
                f,
                "instances = \"pooled\"\nfailure_status = 503\nmemory_limit_bytes = 16777216",
            )
        })
        .collect();
    let gw = Gateway::start_in(
        dir,
        &format!("{}{apis}", gateway_section("plugin_dir = \"plugins\"")),
    );
    let addr = gw.ws.unwrap();
    for f in failures {
        let mut got = Vec::new();
        for _ in 0..4 {
            let (head, _ws) = raw_handshake(addr, &format!("/{f}"), "").await;
            got.push(match status_of(&head) {
                101 => header(&head, "x-probe").unwrap_or_else(|| panic!("{f}: {head}")),
                s => s.to_string(),
            });
        }
        // Reused after a failure, the third would say "ok: 3".
        assert_eq!(got, vec!["ok: 1", "503", "ok: 1", "503"], "{f}");
    }
}

#[test]
fn instance_strategy_errors_name_the_key() {
    let dir = TempDir::new("instances-check");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    for (line, key, words) in [
        (
            "instances = \"shared\"",
            "instances",
            "is not an instance strategy",
        ),
        (
            "pool_max_uses = 5",
            "pool_max_uses",
            "only applies with instances = \"pooled\"",
        ),
        (
            "instances = \"pooled\"\npool_max_uses = 0",
            "pool_max_uses",
            "must be at least 1",
        ),
    ] {
        let text = format!(
            "{}{}",
            gateway_section("plugin_dir = \"plugins\""),
            probe_api("a", "ws://127.0.0.1:9/", "count", "", line)
        );
        let (code, err, _) = tollgate_check(dir.path(), &text);
        assert_eq!(code, 1, "{line}: {err}");
        assert!(err.contains(key) && err.contains(words), "{line}: {err}");
    }
}

/// Sockets are refused outright: with TCP merely "allowed, every address denied", creating a
/// socket opens a real descriptor in the gateway, and a pooled instance that keeps its sockets
/// keeps those descriptors (8 per handshake here, 160 over this test when TCP is allowed) until
/// the gateway runs out. UDP sockets and name lookups are refused too.
#[tokio::test]
async fn sockets_are_refused_without_opening_a_descriptor() {
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    let dir = TempDir::new("sockets");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let pooled = "instances = \"pooled\"\npool_max_uses = 1000";
    let apis = [
        probe_api("sockets", &b, "sockets", "8", pooled),
        probe_api("udp", &b, "udp", "", ""),
        probe_api("lookup", &b, "lookup", "", ""),
    ]
    .concat();
    let gw = Gateway::start_in(
        dir,
        &format!("{}{apis}", gateway_section("plugin_dir = \"plugins\"")),
    );
    let addr = gw.ws.unwrap();
    let probe = |api: &'static str| async move {
        let (head, ws) = ws_connect(addr, &format!("/{api}"), "").await;
        drop(ws);
        header(&head, "x-probe").unwrap_or_else(|| panic!("{api}: no x-probe in {head}"))
    };
    let mut got = vec![probe("udp").await, probe("lookup").await];
    // The first call makes the pooled instance; measure from there.
    got.push(probe("sockets").await);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = gw.open_fds();
    for _ in 0..20 {
        got.push(probe("sockets").await);
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let after = gw.open_fds();
    assert!(
        after <= before + 6,
        "descriptors grew from {before} to {after} over 20 handshakes; probes: {got:?}"
    );
    for g in &got {
        assert!(g.starts_with("error:"), "{got:?}");
    }
}

/// `cpu_time` bounds the time a call spends running, not waiting: a plugin spinning in a loop
/// is stopped by its 30 ms long before its 10 s deadline, with a `policy_error` that says CPU
/// time, while a plugin that sleeps 200 ms on a host pollable passes on 20 ms of CPU time.
#[tokio::test]
async fn cpu_time_bounds_running_not_waiting() {
    use std::time::{Duration, Instant};
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    let dir = TempDir::new("cpu-time");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let budget = "cpu_time = \"30ms\"\ntimeout = \"10s\"\nfailure_status = 503";
    let apis = [
        probe_api("spin", &b, "loop", "", budget),
        probe_api(
            "nap",
            &b,
            "sleep",
            "200",
            "cpu_time = \"20ms\"\ntimeout = \"2s\"",
        ),
    ]
    .concat();
    let gw = Gateway::start_in(
        dir,
        &format!("{}{apis}", gateway_section("plugin_dir = \"plugins\"")),
    );
    let addr = gw.ws.unwrap();

    let t = Instant::now();
    let (head, _) = raw_handshake(addr, "/spin", "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let err = gw.policy_error("spin").await;
    assert!(err.contains("ran out of CPU time"), "{err}");

    let t = Instant::now();
    let (head, _ws) = ws_connect(addr, "/nap", "").await;
    assert_eq!(
        header(&head, "x-probe").as_deref(),
        Some("ok: slept"),
        "{head}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
}

/// Every call has a wall-clock deadline besides its CPU time: a plugin sleeping on a host
/// pollable uses no CPU time, and used to hold its handshake until the handshake timeout (10 s). With
/// `timeout = "300ms"` (or the 1 s default) the handshake fails with `failure_status` and a
/// `policy_error` record saying so, the backend is never contacted, and a pooled instance that
/// timed out is not reused.
#[tokio::test]
async fn a_call_that_outlives_its_deadline_fails_the_handshake() {
    use std::time::{Duration, Instant};
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    let dir = TempDir::new("deadline");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let apis = [
        probe_api(
            "sleepy",
            &b,
            "sleep",
            "5000",
            "timeout = \"300ms\"\nfailure_status = 503",
        ),
        probe_api("default", &b, "sleep", "5000", "failure_status = 504"),
        probe_api(
            "pooled",
            &b,
            "sleep-first",
            "5000",
            "timeout = \"300ms\"\nfailure_status = 503\ninstances = \"pooled\"",
        ),
        probe_api("quick", &b, "sleep", "20", "timeout = \"300ms\""),
    ]
    .concat();
    let gw = Gateway::start_in(
        dir,
        &format!("{}{apis}", gateway_section("plugin_dir = \"plugins\"")),
    );
    let addr = gw.ws.unwrap();
    let timed = |path: &'static str| async move {
        let t = Instant::now();
        let (head, _) = raw_handshake(addr, path, "").await;
        (status_of(&head), t.elapsed(), head)
    };

    let (status, took, head) = timed("/sleepy").await;
    assert_eq!(status, 503, "{head}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let (status, took, head) = timed("/default").await;
    assert_eq!(status, 504, "{head}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "default deadline: {took:?}"
    );
    // The pooled plugin sleeps only in an instance's first call: if the timed-out instance
    // went back to the pool, the second handshake would get it and pass.
    for round in 0..2 {
        let (status, took, head) = timed("/pooled").await;
        assert_eq!(status, 503, "round {round}: {head}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    let (head, _ws) = ws_connect(addr, "/quick", "").await;
    assert_eq!(header(&head, "x-probe").as_deref(), Some("ok: slept"));

    for (api, after) in [("sleepy", "300ms"), ("default", "1s"), ("pooled", "300ms")] {
        let rec = gw.wait_record("policy_error", |r| r["api"] == api).await;
        assert_eq!(rec["plugin"], "faulty", "{rec}");
        let err = rec["error"].as_str().unwrap();
        assert!(err.contains(&format!("timed out after {after}")), "{rec}");
    }
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "only the quick handshake may reach the backend"
    );
}

/// Host calls are metered: the time `signatures.verify` takes counts against the call's
/// `cpu_time`, so a plugin calling it in a loop on a large message runs out of budget instead
/// of costing the gateway unmetered CPU;
/// a message above 64 KiB gets an error instead of being hashed; `log` keeps at most 16
/// records of at most 1 KiB per call, and says once that it dropped the rest.
#[tokio::test]
async fn host_calls_are_charged_and_bounded() {
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    let dir = TempDir::new("host-calls");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let apis = [
        probe_api(
            "verify-spam",
            &b,
            "verify",
            "100000:60000",
            "failure_status = 503\ncpu_time = \"20ms\"\ntimeout = \"10s\"",
        ),
        probe_api("verify-few", &b, "verify", "3:100", ""),
        probe_api("verify-big", &b, "verify", "1:70000", ""),
        probe_api("log-spam", &b, "log", "100", ""),
    ]
    .concat();
    let gw = Gateway::start_in(
        dir,
        &format!("{}{apis}", gateway_section("plugin_dir = \"plugins\"")),
    );
    let addr = gw.ws.unwrap();

    let (head, _) = raw_handshake(addr, "/verify-spam", "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    let rec = gw
        .wait_record("policy_error", |r| r["api"] == "verify-spam")
        .await;
    assert!(
        rec["error"]
            .as_str()
            .unwrap()
            .contains("ran out of CPU time"),
        "{rec}"
    );

    let probe = |api: &'static str| async move {
        let (head, _ws) = ws_connect(addr, &format!("/{api}"), "").await;
        header(&head, "x-probe").unwrap_or_else(|| panic!("{api}: no x-probe in {head}"))
    };
    assert_eq!(probe("verify-few").await, "ok: 3 calls, last false");
    let big = probe("verify-big").await;
    assert!(
        big.starts_with("error: message of 70000 bytes is larger"),
        "{big}"
    );
    assert_eq!(probe("log-spam").await, "ok: logged 100");
    let note = gw
        .wait_record("policy_log", |r| r["suppressed"] == true)
        .await;
    assert_eq!(note["plugin"], "faulty", "{note}");
    let logged: Vec<_> = gw
        .records("policy_log")
        .into_iter()
        .filter(|r| r["plugin"] == "faulty" && r["suppressed"].is_null())
        .collect();
    assert_eq!(logged.len(), 16, "{logged:?}");
    for r in &logged {
        let m = r["message"].as_str().unwrap();
        assert!(m.len() <= 1100 && m.ends_with("bytes cut]"), "{m}");
    }
    assert_eq!(gw.records("policy_log").len(), 17);
}

/// A handshake cut off by the gateway's overall deadline (`handshake_timeout +
/// backend_timeout`), here by a policy allowed to run longer than that, is logged and counted
/// as a `handshake_timeout`, not as a client that went away (`handshake_abandoned`).
#[tokio::test]
async fn a_handshake_cut_off_by_the_overall_deadline_is_a_timeout_not_an_abandon() {
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("overall-deadline");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let text = format!(
        "{}{}",
        gateway_section(
            "plugin_dir = \"plugins\"\n[gateway.limits]\nhandshake_timeout = \"1s\"\nbackend_timeout = \"1s\""
        ),
        probe_api("slow", &backend.url(), "sleep", "8000", "timeout = \"20s\"")
    );
    let gw = Gateway::start_in(dir, &text);
    {
        // The gateway closes the connection without an answer: read until it does.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(gw.ws.unwrap())
            .await
            .unwrap();
        s.write_all(
            format!(
                "GET /slow HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: {TEST_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got)).await;
        assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    }
    gw.wait_record("handshake_timeout", |_| true).await;
    // Give a wrong `handshake_abandoned` the time to show up.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        gw.records("handshake_abandoned").is_empty(),
        "a timeout was logged as the client going away: {:?}",
        gw.records("handshake_abandoned")
    );
}
