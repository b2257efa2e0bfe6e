//! Live reload: a changed manifest or plugin directory (or SIGHUP) is checked as a whole and
//! swapped in for new handshakes; established connections are untouched; a reload that fails
//! any check is refused, every error logged, and the previous configuration keeps serving.

use std::time::{Duration, Instant};

use crate::support::*;

fn manifest(backend: &str, generation: u32, extra_api: bool, listen: &str) -> String {
    let mut m = format!(
        "[gateway]\nname = \"test\"\nlisten = \"{listen}\"\nplugin_dir = \"plugins\"\n{}",
        api_section(
            "a",
            "a",
            backend,
            &format!(
                "[[apis.on_handshake]]\nplugin = \"set-header\"\nconfig = {{ name = \"X-Gen\", value = \"{generation}\", exists_action = \"override\" }}\n"
            )
        )
    );
    if extra_api {
        m.push_str(&api_section("b", "b", backend, ""));
    }
    m
}

/// The next `reload` record after the first `seen` ones.
async fn next_reload(gw: &Gateway, seen: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = gw.records("reload");
        if r.len() > seen {
            return r[seen].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no reload record; log:\n{}",
            gw.logs.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn changes_apply_to_new_handshakes_and_bad_ones_are_refused_as_a_whole() {
    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    // Built first: building takes a while, and the steps below must land at once.
    let declares = plugins::declaring().join("declares-set-body.wasm");
    let dir = TempDir::new("reload");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let gw = Gateway::start_in(dir, &manifest(&b, 1, false, "127.0.0.1:0"));
    let addr = gw.ws.unwrap();
    let path = gw.dir.path().join("tollgate.toml");
    let gen_seen = |head: &str| header(head, "x-gen");

    // An established connection, before any reload.
    let (_, mut old) = ws_connect(addr, "/a", "").await;
    assert_eq!(gen_seen(&backend.last_head()).as_deref(), Some("1"));

    // 1. The manifest changes on disk: new config for `a`, a new API `b`.
    std::fs::write(&path, manifest(&b, 2, true, "127.0.0.1:0")).unwrap();
    let r = next_reload(&gw, 0).await;
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(r["trigger"], "file_change", "{r}");
    let (_, _a) = ws_connect(addr, "/a", "").await;
    assert_eq!(gen_seen(&backend.last_head()).as_deref(), Some("2"));
    let (_, _b) = ws_connect(addr, "/b", "").await;
    // The connection made before the reload still relays both ways.
    old.send(true, 1, b"still here").await.unwrap();
    assert_eq!(old.read_frame().await.unwrap().payload, b"still here");

    // 2. A broken manifest: refused with its file, line and key; the last good one serves.
    std::fs::write(
        &path,
        manifest(&b, 3, true, "127.0.0.1:0").replace("url_suffix = \"b\"", "url_suffix = 7"),
    )
    .unwrap();
    let r = next_reload(&gw, 1).await;
    assert_eq!(r["outcome"], "rejected", "{r}");
    assert!(gw.records("reload_error").iter().any(|e| {
        let m = e["error"].as_str().unwrap_or("");
        m.contains("tollgate.toml") && m.contains("url_suffix")
    }));
    let (_, _b) = ws_connect(addr, "/b", "").await;
    assert_eq!(gen_seen(&backend.last_head()), None, "b has no policy");
    let (_, _a) = ws_connect(addr, "/a", "").await;
    assert_eq!(gen_seen(&backend.last_head()).as_deref(), Some("2"));

    // 3. A corrupt plugin lands in plugin_dir (with a good manifest): refused, file named.
    std::fs::write(&path, manifest(&b, 4, true, "127.0.0.1:0")).unwrap();
    std::fs::write(
        gw.dir.path().join("plugins/corrupt.wasm"),
        b"\0asm not really",
    )
    .unwrap();
    let r = next_reload(&gw, 2).await;
    assert_eq!(r["outcome"], "rejected", "{r}");
    assert!(gw
        .records("reload_error")
        .iter()
        .any(|e| e["error"].as_str().unwrap_or("").contains("corrupt.wasm")));
    let (_, _a) = ws_connect(addr, "/a", "").await;
    assert_eq!(gen_seen(&backend.last_head()).as_deref(), Some("2"));

    // 3b. The corrupt file replaced by a plugin that declares a capability onHandshake does
    // not support, attached to `a`: refused, naming plugin and capability.
    std::fs::remove_file(gw.dir.path().join("plugins/corrupt.wasm")).unwrap();
    std::fs::copy(
        &declares,
        gw.dir.path().join("plugins/declares-set-body.wasm"),
    )
    .unwrap();
    std::fs::write(
        &path,
        manifest(&b, 4, true, "127.0.0.1:0")
            + "[[apis.on_handshake]]\nplugin = \"declares-set-body\"\n",
    )
    .unwrap();
    let r = next_reload(&gw, 3).await;
    assert_eq!(r["outcome"], "rejected", "{r}");
    assert!(gw.records("reload_error").iter().any(|e| {
        let m = e["error"].as_str().unwrap_or("");
        m.contains("declares-set-body") && m.contains("set-body")
    }));
    let (_, _a) = ws_connect(addr, "/a", "").await;
    assert_eq!(gen_seen(&backend.last_head()).as_deref(), Some("2"));

    // 4. That attachment dropped (the plugin may stay in the directory): generation 4 applies.
    std::fs::write(&path, manifest(&b, 4, true, "127.0.0.1:0")).unwrap();
    let r = next_reload(&gw, 4).await;
    assert_eq!(r["outcome"], "applied", "{r}");
    let (_, _a) = ws_connect(addr, "/a", "").await;
    assert_eq!(gen_seen(&backend.last_head()).as_deref(), Some("4"));

    // 5. A new listen address cannot be applied live: refused, "needs a restart".
    std::fs::write(&path, manifest(&b, 5, true, "127.0.0.1:1")).unwrap();
    let r = next_reload(&gw, 5).await;
    assert_eq!(r["outcome"], "rejected", "{r}");
    assert!(gw.records("reload_error").iter().any(|e| {
        let m = e["error"].as_str().unwrap_or("");
        m.contains("gateway.listen") && m.contains("needs a restart")
    }));
    let (_, _a) = ws_connect(addr, "/a", "").await;
    assert_eq!(gen_seen(&backend.last_head()).as_deref(), Some("4"));

    // 6. SIGHUP reloads on demand.
    std::fs::write(&path, manifest(&b, 4, true, "127.0.0.1:0")).unwrap();
    let r = next_reload(&gw, 6).await;
    assert_eq!(r["outcome"], "applied", "{r}");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let r = next_reload(&gw, 7).await;
    assert_eq!(r["trigger"], "sighup", "{r}");
    assert_eq!(r["outcome"], "applied", "{r}");

    // Through all of it, the first connection never noticed.
    old.send(true, 1, b"end").await.unwrap();
    assert_eq!(old.read_frame().await.unwrap().payload, b"end");
}

/// While 200 connections echo without pause, the manifest is edited 20 times and a plugin is
/// added, replaced and removed: no established connection drops or loses a message, every
/// handshake made meanwhile succeeds, and each change is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_drop_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let backend = RawBackend::start(echo_frames()).await;
    let b = backend.url();
    let dir = TempDir::new("reload-soak");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let gw = Gateway::start_in(dir, &manifest(&b, 0, true, "127.0.0.1:0"));
    let addr = gw.ws.unwrap();
    let path = gw.dir.path().join("tollgate.toml");
    let plugin_dir = gw.dir.path().join("plugins");

    let stop = Arc::new(AtomicBool::new(false));
    // Echoes per connection, to show each one relayed before the first reload and after the
    // last (a count that is merely > 0 would not).
    let echoed: Arc<Vec<AtomicU64>> = Arc::new((0..200).map(|_| AtomicU64::new(0)).collect());
    let mut conns = Vec::new();
    for i in 0..200 {
        let (_, mut ws) = ws_connect(addr, if i % 2 == 0 { "/a" } else { "/b" }, "").await;
        let (stop, echoed) = (stop.clone(), echoed.clone());
        conns.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("{i}:{n}");
                ws.send(true, 1, msg.as_bytes())
                    .await
                    .map_err(|e| format!("{i}: send {e}"))?;
                let f = tokio::time::timeout(Duration::from_secs(10), ws.read_frame())
                    .await
                    .map_err(|_| format!("{i}: no echo within 10 s"))?
                    .map_err(|e| format!("{i}: read {e}"))?;
                if f.payload != msg.as_bytes() {
                    return Err(format!("{i}: sent {msg}, got {:?}", f.payload));
                }
                n += 1;
                echoed[i].fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<u64, String>(n)
        }));
    }
    // Handshakes keep coming while reloads happen; every one must succeed.
    let handshakes = Arc::new(AtomicU64::new(0));
    let handshaker = {
        let (stop, handshakes) = (stop.clone(), handshakes.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (head, _) = raw_handshake(addr, "/a", "").await;
                if status_of(&head) != 101 {
                    return Err(format!("handshake during reloads failed: {head}"));
                }
                handshakes.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<(), String>(())
        })
    };
    let snapshot =
        |c: &[AtomicU64]| -> Vec<u64> { c.iter().map(|n| n.load(Ordering::Relaxed)).collect() };
    wait_until("every connection echoing before the first reload", || {
        echoed.iter().all(|n| n.load(Ordering::Relaxed) > 0)
    })
    .await;
    let handshakes_before = handshakes.load(Ordering::Relaxed);

    let mut seen = 0;
    let applied = |r: serde_json::Value| {
        assert_eq!(r["outcome"], "applied", "{r}");
    };
    // 20 manifest edits.
    for generation in 1..=20 {
        std::fs::write(&path, manifest(&b, generation, true, "127.0.0.1:0")).unwrap();
        applied(next_reload(&gw, seen).await);
        seen += 1;
        let (_, _ws) = ws_connect(addr, "/a", "").await;
        assert_eq!(
            header(&backend.last_head(), "x-gen").as_deref(),
            Some(generation.to_string().as_str())
        );
    }
    // A plugin added, replaced (same file, new content), removed.
    let extra = plugin_dir.join("jwt_validate.wasm");
    std::fs::copy(plugins::built().join("jwt_validate.wasm"), &extra).unwrap();
    applied(next_reload(&gw, seen).await);
    seen += 1;
    std::fs::copy(plugins::built().join("tenant_check.wasm"), &extra).unwrap();
    applied(next_reload(&gw, seen).await);
    seen += 1;
    std::fs::remove_file(&extra).unwrap();
    applied(next_reload(&gw, seen).await);

    // Handshakes were made while the reloads happened (each one was checked to be a 101)...
    assert!(
        handshakes.load(Ordering::Relaxed) > handshakes_before,
        "no handshake overlapped the reloads"
    );
    // ...and every one of the 200 connections relays after the last reload too.
    let after_last = snapshot(&echoed);
    wait_until("every connection echoing after the last reload", || {
        echoed
            .iter()
            .zip(&after_last)
            .all(|(n, then)| n.load(Ordering::Relaxed) > *then)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    handshaker.await.unwrap().unwrap();
    for (i, c) in conns.into_iter().enumerate() {
        let n = c.await.unwrap().unwrap();
        assert!(n > after_last[i], "connection {i}");
    }
}

/// Gateway limits follow a reload: a shorter `handshake_timeout` applies to the next client
/// that sends nothing.
#[tokio::test]
async fn gateway_limits_apply_after_a_reload() {
    let backend = RawBackend::start(echo_frames()).await;
    let text = |timeout: &str| {
        format!(
            "{}{}",
            gateway_section(&format!(
                "[gateway.limits]\nhandshake_timeout = \"{timeout}\""
            )),
            api_section("a", "a", &backend.url(), "")
        )
    };
    let gw = Gateway::start(&text("60s"));
    let addr = gw.ws.unwrap();
    std::fs::write(gw.dir.path().join("tollgate.toml"), text("1s")).unwrap();
    gw.signal("HUP");
    let r = next_reload(&gw, 0).await;
    assert_eq!(r["outcome"], "applied", "{r}");

    use tokio::io::AsyncReadExt;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf))
        .await
        .expect("a client that sends nothing is dropped after the reloaded handshake_timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // Dropped by the reloaded 1 s, not the 60 s the gateway started with (the timeout above
    // already rules that out; this names the cause).
    let r = gw.wait_record("handshake_timeout", |_| true).await;
    assert!(started.elapsed() >= Duration::from_millis(900), "{r}");
}

/// Every `gateway.limits` value follows a reload, for what starts after it; a connection
/// established before keeps the limits it started with (README, "Live reload").
#[tokio::test]
async fn every_gateway_limit_follows_a_reload_and_established_connections_keep_theirs() {
    let backend = RawBackend::start(echo_frames()).await;
    // A backend that accepts and never answers, for backend_timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let text = |limits: &str| {
        format!(
            "{}{}{}",
            gateway_section(&format!("[gateway.limits]\n{limits}")),
            api_section("echo", "echo", &backend.url(), ""),
            api_section("silent", "silent", &format!("ws://{silent_addr}/"), "")
        )
    };
    let before = "max_connections = 100\nbackend_timeout = \"30s\"\nidle_timeout = \"10m\"\ndrain_timeout = \"60s\"\nmax_frame_size = 65536\nmax_message_size = 1048576\nmax_header_bytes = 65536\nmax_pending_handshakes = 4096\n";
    let after = "max_connections = 2\nbackend_timeout = \"1s\"\nidle_timeout = \"1s\"\ndrain_timeout = \"1s\"\nmax_frame_size = 1024\nmax_message_size = 4096\nmax_header_bytes = 8192\nmax_pending_handshakes = 1\n";
    let mut gw = Gateway::start(&text(before));
    let addr = gw.ws.unwrap();
    let big_header = format!("X-Big: {}\r\n", "a".repeat(10_000));
    let (head, _) = raw_handshake(addr, "/echo", &big_header).await;
    assert_eq!(status_of(&head), 101, "before the reload: {head}");
    // Established under the first limits.
    let (_, mut old) = ws_connect(addr, "/echo", "").await;

    std::fs::write(gw.dir.path().join("tollgate.toml"), text(after)).unwrap();
    gw.signal("HUP");
    let r = next_reload(&gw, 0).await;
    assert_eq!(r["outcome"], "applied", "{r}");

    // max_header_bytes: new handshakes only.
    let (head, _) = raw_handshake(addr, "/echo", &big_header).await;
    assert_eq!(status_of(&head), 431, "{head}");
    // max_connections: `old` and one more.
    let (_, mut new) = ws_connect(addr, "/echo", "").await;
    let (head, _) = raw_handshake(addr, "/echo", "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    // max_frame_size: 2 KiB is too much for the new connection, not for the old one.
    let two_k = vec![b'x'; 2048];
    new.send(true, 2, &two_k).await.unwrap();
    assert_eq!(
        new.read_until_close().await.unwrap().close_code(),
        Some(1009)
    );
    old.send(true, 2, &two_k).await.unwrap();
    assert_eq!(old.read_frame().await.unwrap().payload, two_k);
    // max_message_size: five 1 KiB fragments are too much for a new connection only.
    let five_fragments = || {
        let k = vec![b'y'; 1024];
        (0..5u8)
            .flat_map(|i| {
                encode_frame(i == 4, 0, if i == 0 { 2 } else { 0 }, &k, Some(rand_mask()))
            })
            .collect::<Vec<u8>>()
    };
    // (The slot `new` held is back once its relay has ended.)
    let mut fresh = upgraded_once_a_slot_is_free(addr).await;
    fresh.send_raw(&five_fragments()).await.unwrap();
    assert_eq!(
        fresh.read_until_close().await.unwrap().close_code(),
        Some(1009)
    );
    old.send_raw(&five_fragments()).await.unwrap();
    for _ in 0..5 {
        assert_eq!(old.read_frame().await.unwrap().payload.len(), 1024);
    }
    // idle_timeout: a new connection left idle is closed; the old one, idle as long, is not.
    let mut idle = upgraded_once_a_slot_is_free(addr).await;
    let f = tokio::time::timeout(Duration::from_secs(15), idle.read_until_close())
        .await
        .expect("the new idle_timeout did not apply")
        .unwrap();
    assert_eq!(f.close_code(), Some(1001));
    old.send(true, 1, b"still here").await.unwrap();
    assert_eq!(old.read_frame().await.unwrap().payload, b"still here");
    // backend_timeout: 1 s now, not 30 s.
    wait_until("the idle connection's slot", || {
        // The first connection, `new`, `fresh` and `idle` have ended; `old` is the only one.
        gw.records("connection_closed").len() >= 4
    })
    .await;
    let started = Instant::now();
    let (head, _) =
        tokio::time::timeout(Duration::from_secs(20), raw_handshake(addr, "/silent", ""))
            .await
            .expect("the new backend_timeout did not apply");
    assert_eq!(status_of(&head), 504, "{head}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // max_pending_handshakes: one socket that sends nothing fills it; the next is closed at once.
    let _pending = tokio::net::TcpStream::connect(addr).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            // Answered: the pending socket was not accepted yet; try again.
            _ => {
                assert!(
                    Instant::now() < deadline,
                    "sockets over max_pending_handshakes are answered"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // drain_timeout: 1 s now; `old` never answers the shutdown's 1001.
    gw.signal("TERM");
    let d = gw.wait_record("draining", |_| true).await;
    assert_eq!(d["drain_timeout_ms"], 1000, "{d}");
    assert_eq!(
        old.read_until_close().await.unwrap().close_code(),
        Some(1001)
    );
    gw.wait_record("drain_timeout", |_| true).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while gw.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `/echo` connection as soon as `max_connections` has a slot again (a relay that just ended
/// gives its slot back when its task finishes).
async fn upgraded_once_a_slot_is_free(addr: std::net::SocketAddr) -> RawWs<tokio::net::TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (head, ws) = raw_handshake(addr, "/echo", "").await;
        if status_of(&head) == 101 {
            return ws;
        }
        assert!(Instant::now() < deadline, "no slot came free: {head}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reload drops the warm instances of the pools it replaces at once: a connection admitted
/// before it keeps the old API (and its chain) alive, and used to keep that chain's idle
/// instances in the engine's slots until it closed, reload after reload.
#[tokio::test]
async fn a_reload_drops_the_warm_instances_of_the_state_it_replaces() {
    let backend = RawBackend::start(echo_frames()).await;
    let text = |generation: u32| {
        format!(
            "[gateway]\nname = \"test\"\nlisten = \"127.0.0.1:0\"\nplugin_dir = \"plugins\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
            api_section(
                "a",
                "a",
                &backend.url(),
                &format!(
                    "[[apis.on_handshake]]\nplugin = \"set-header\"\ninstances = \"pooled\"\n\
                     config = {{ name = \"X-Gen\", value = \"{generation}\" }}\n"
                )
            )
        )
    };
    let dir = TempDir::new("reload-pools");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let gw = Gateway::start_in(dir, &text(1));
    let (addr, admin) = (gw.ws.unwrap(), gw.admin.unwrap());
    let idle = || async move {
        let s = scrape(admin).await;
        sample(
            &s,
            "tollgate_policy_instances_idle",
            &[("api", "a"), ("plugin", "set-header"), ("scope", "api")],
        )
    };
    // One connection held open across the reload pins the old state.
    let (head, mut held) = ws_connect(addr, "/a", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(
        idle().await,
        Some(1.0),
        "one warm instance after a handshake"
    );

    std::fs::write(gw.dir.path().join("tollgate.toml"), text(2)).unwrap();
    let r = next_reload(&gw, 0).await;
    assert_eq!(r["outcome"], "applied", "{r}");
    assert_eq!(
        idle().await,
        Some(0.0),
        "the replaced pool kept its instance"
    );
    let (head, _ws) = ws_connect(addr, "/a", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(header(&backend.last_head(), "x-gen").as_deref(), Some("2"));
    assert_eq!(idle().await, Some(1.0), "only the new pool's instance");
    // The connection from before the reload is untouched.
    held.send(true, 1, b"still here").await.unwrap();
    assert_eq!(held.read_frame().await.unwrap().payload, b"still here");
}
