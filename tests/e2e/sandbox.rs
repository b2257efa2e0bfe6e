//! The sandbox: a plugin that tries to read a file, open a socket, read an environment
//! variable or tell the time gets an error (or a zero clock) inside the sandbox unless its
//! attachment grants it, and nothing on the host is touched. The probe plugin reports what it
//! got in the 101 header `x-probe`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use support::*;

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
