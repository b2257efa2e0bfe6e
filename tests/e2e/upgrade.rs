//! Upgrading the binary (SIGUSR2, `tollgate::upgrade`): the running gateway starts a new
//! process of its binary and hands it its listening sockets; a client trying to connect at any
//! moment is answered, by one process or the other; its plain connections go on in the new
//! process (`tollgate::handover`) without a close or a lost byte. A new process that cannot
//! load leaves the old one serving, and the old one says why.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

fn signal(pid: u32, sig: i32) {
    // SAFETY: a plain kill(2) of a process this test started (or that one started for it).
    let r = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(r, 0, "kill {pid}");
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Stops a process the test did not start itself (the new gateway) when the test ends, however
/// it ends.
struct StopOnDrop(u32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if running(self.0) {
            // SAFETY: a plain kill(2) of the gateway process this test's upgrade started.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

fn manifest(backend: &str) -> String {
    format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        gateway_section("[gateway.limits]\ndrain_timeout = \"2s\""),
        api_section("echo", "echo", backend, "")
    )
}

/// Handshakes one after the other until `stop`: each one's status line and when it was made.
fn handshake_loop(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, String)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while !stop.load(Ordering::Acquire) {
            let at = Instant::now();
            let (head, ws) =
                tokio::time::timeout(Duration::from_secs(5), raw_handshake(addr, "/echo", ""))
                    .await
                    .expect("a handshake was not answered within 5 s");
            drop(ws);
            seen.push((at, head.lines().next().unwrap_or_default().to_owned()));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    })
}

/// Waits until the gateway's admin listener says it serves.
async fn serving(admin: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(admin, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connections each running [`numbered_echoes`], and how far each has got.
struct NumberedEchoes {
    stop: Arc<AtomicBool>,
    counts: Vec<Arc<std::sync::atomic::AtomicU64>>,
    tasks: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
}

impl NumberedEchoes {
    /// `n` connections to `/echo`, each echoing by the time this returns.
    async fn start(addr: std::net::SocketAddr, n: usize, upper: bool) -> NumberedEchoes {
        let stop = Arc::new(AtomicBool::new(false));
        let mut counts = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..n {
            let (_, ws) = ws_connect(addr, "/echo", "").await;
            let echoed = Arc::new(std::sync::atomic::AtomicU64::new(0));
            counts.push(echoed.clone());
            tasks.push(tokio::spawn(numbered_echoes(
                i,
                ws,
                stop.clone(),
                echoed,
                upper,
            )));
        }
        let e = NumberedEchoes {
            stop,
            counts,
            tasks,
        };
        e.wait_moved(&vec![0; n], "every connection echoing").await;
        e
    }

    async fn wait_moved(&self, then: &[u64], what: &str) {
        wait_until(what, || {
            self.counts
                .iter()
                .zip(then)
                .all(|(c, t)| c.load(Ordering::Relaxed) > *t)
        })
        .await;
    }

    /// Waits until every connection has echoed again, then stops them all (each closes with
    /// 1000); any connection that failed fails the test here. Returns the messages echoed.
    async fn moving_then_stop(self, what: &str) -> u64 {
        let then: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        self.wait_moved(&then, what).await;
        self.stop.store(true, Ordering::Release);
        let mut total = 0;
        for t in self.tasks {
            total += t.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        }
        total
    }
}

/// SIGUSR2 during a stream of handshakes: the new process takes the sockets (ws and admin),
/// every handshake before, during and after gets its 101, the old process hands its open
/// connection over (it goes on echoing through the new process) and exits, and the new one
/// answers `/readyz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_hands_the_listening_sockets_over_without_refusing_a_handshake() {
    let backend = RawBackend::start(echo_frames()).await;
    let mut gw = Gateway::start(&manifest(&backend.url()));
    let (addr, admin) = (gw.ws.unwrap(), gw.admin.unwrap());
    let old_pid = gw.child.id();
    let (_, mut open) = ws_connect(addr, "/echo", "").await;
    // A connection stalled in the middle of a frame cannot pause at a frame boundary: it is
    // drained with 1012 once the pause has waited long enough, and keeps the old process
    // draining meanwhile.
    let (_, mut stalled) = ws_connect(addr, "/echo", "").await;
    let frame = encode_frame(true, 0, 2, &[7; 100], Some(rand_mask()));
    stalled.send_raw(&frame[..50]).await.unwrap();
    serving(admin).await;
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = handshake_loop(addr, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(old_pid, libc::SIGUSR2);
    gw.wait_record("upgrade_started", |_| true).await;
    let up = gw.wait_record("upgrade", |_| true).await;
    // A second SIGUSR2 while the old process drains is ignored, not queued.
    signal(old_pid, libc::SIGUSR2);
    assert_eq!(up["old_pid"], old_pid, "{up}");
    let new_pid = u32::try_from(up["new_pid"].as_u64().unwrap()).unwrap();
    let _stop_new = StopOnDrop(new_pid);
    assert_ne!(new_pid, old_pid);
    gw.wait_record("upgrade_ignored", |_| true).await;
    let listeners = up["listeners"].as_str().unwrap_or_default().to_owned();
    assert!(
        listeners.contains("ws") && listeners.contains("admin"),
        "{up}"
    );
    // The stalled connection is drained once its pause took too long: 1012, service restart.
    let close = stalled.read_until_close().await.unwrap();
    assert_eq!(close.close_code(), Some(1012), "{close:?}");
    // The old process hands its connection over, then exits; the connection goes on.
    let complete = gw.wait_record("upgrade_complete", |_| true).await;
    assert!(complete["handed_over"].as_u64() >= Some(1), "{complete}");
    assert!(complete["drained"].as_u64() >= Some(1), "{complete}");
    open.send(true, 1, b"still here").await.unwrap();
    let echo = open.read_frame().await.unwrap();
    assert_eq!(echo.payload, b"still here", "{echo:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let exited_at = loop {
        if gw.child.try_wait().unwrap().is_some() {
            break Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "the old process is still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Release);
    let seen = handshakes.await.unwrap();
    let refused: Vec<&String> = seen
        .iter()
        .map(|(_, s)| s)
        .filter(|s| !s.starts_with("HTTP/1.1 101"))
        .collect();
    assert!(
        refused.is_empty(),
        "not every handshake got 101: {refused:?}"
    );
    let after = seen.iter().filter(|(at, _)| *at > exited_at).count();
    assert!(
        seen.len() >= 20 && after >= 5,
        "{} handshakes, {after} after the old process exited",
        seen.len()
    );
    eprintln!(
        "{} handshakes through the upgrade, all 101; {after} after the old process exited",
        seen.len()
    );
    // The new process serves the admin listener too, ready.
    let (status, _, _) = http_get(admin, "/readyz").await;
    assert_eq!(status, 200);
    let ready = gw
        .wait_record("upgrade_ready", |r| r["old_pid"] == old_pid)
        .await;
    assert_eq!(ready["pid"], new_pid, "{ready}");
    // In this order: the new process accepts, then the old one hands over, then drains.
    let order: Vec<String> = gw
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["event"].as_str().map(str::to_owned))
        .filter(|e| ["upgrade_ready", "upgrade", "draining"].contains(&e.as_str()))
        .collect();
    assert_eq!(order, ["upgrade_ready", "upgrade", "draining"], "{order:?}");
    // The handed-over connection ends with the new process, as any of its own would.
    signal(new_pid, libc::SIGTERM);
    let close = open.read_until_close().await.unwrap();
    assert_eq!(close.close_code(), Some(1001), "{close:?}");
    assert_eq!(gw.records("upgrade").len(), 1, "one upgrade only");
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(new_pid) {
        assert!(Instant::now() < deadline, "the new process did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A new process that cannot load its manifest says so to the old one, which logs why, keeps
/// serving, and counts the failed upgrade.
#[tokio::test]
async fn a_new_process_that_cannot_load_leaves_the_old_one_serving() {
    let backend = RawBackend::start(echo_frames()).await;
    let gw = Gateway::start(&manifest(&backend.url()));
    let pid = gw.child.id();
    // Serving (an upgrade is refused while the gateway starts).
    serving(gw.admin.unwrap()).await;
    std::fs::write(
        gw.dir.path().join("tollgate.toml"),
        "[gateway]\nname = \"test\"\nlisten = 8080\n",
    )
    .unwrap();
    signal(pid, libc::SIGUSR2);
    let failed = gw.wait_record("upgrade_failed", |_| true).await;
    let error = failed["error"].as_str().unwrap_or_default();
    // The failed process was stopped and reaped by the old one.
    let failed_pid: u32 = error
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {error}"));
    assert!(
        !std::path::Path::new(&format!("/proc/{failed_pid}")).exists(),
        "the failed new process was not reaped"
    );
    assert!(
        error.contains("failed") && error.contains("tollgate.toml:3") && error.contains("listen"),
        "{failed}"
    );
    let (head, _ws) = raw_handshake(gw.ws.unwrap(), "/echo", "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        sample(
            &scrape(gw.admin.unwrap()).await,
            "tollgate_upgrades_total",
            &[("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert!(gw.records("upgrade").is_empty());
}

/// One connection of [`plain_connections_go_on_through_an_upgrade`]: a numbered message every
/// 20 ms, each echoed whole and in order before the next. Messages take three shapes, so a
/// pause can fall anywhere: one frame; a text message in two fragments with a two-byte
/// character split between them; one frame written in two parts 3 ms apart (the gateway reads
/// the rest of a frame in flight before it pauses).
async fn numbered_echoes(
    i: usize,
    mut ws: RawWs<tokio::net::TcpStream>,
    stop: Arc<AtomicBool>,
    echoed: Arc<std::sync::atomic::AtomicU64>,
    upper: bool,
) -> Result<u64, String> {
    let mut k = 0u64;
    while !stop.load(Ordering::Acquire) {
        // With `upper`, message-test (a message policy) replaces each message with its upper
        // case: what comes back shows the policy judged it, before and after the upgrade.
        let body = format!("{i}:{k}:\u{e9}t\u{e9}");
        let (msg, want) = if upper {
            (
                format!("upper:{body}"),
                format!("UPPER:{}", body.to_uppercase()),
            )
        } else {
            (body.clone(), body)
        };
        let bytes = msg.as_bytes();
        let sent = match k % 3 {
            0 => ws.send(true, 1, bytes).await,
            1 => {
                // Split inside the first "é" (its two bytes go in different frames).
                let cut = msg.find('\u{e9}').unwrap_or(0) + 1;
                match ws.send(false, 1, &bytes[..cut]).await {
                    Ok(()) => ws.send(true, 0, &bytes[cut..]).await,
                    e => e,
                }
            }
            _ => {
                let frame = encode_frame(true, 0, 1, bytes, Some(rand_mask()));
                let half = frame.len() / 2;
                match ws.send_raw(&frame[..half]).await {
                    Ok(()) => {
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        ws.send_raw(&frame[half..]).await
                    }
                    e => e,
                }
            }
        };
        sent.map_err(|e| format!("connection {i}, message {k}: send: {e}"))?;
        let mut got = Vec::new();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(10), ws.read_frame())
                .await
                .map_err(|_| format!("connection {i}, message {k}: no echo within 10 s"))?
                .map_err(|e| format!("connection {i}, message {k}: read: {e}"))?;
            if f.opcode == 8 {
                return Err(format!(
                    "connection {i}, message {k}: closed ({:?} {})",
                    f.close_code(),
                    f.close_reason()
                ));
            }
            got.extend_from_slice(&f.payload);
            if f.fin {
                break;
            }
        }
        if got != want.as_bytes() {
            return Err(format!(
                "connection {i}: sent {msg:?}, got {:?} back (lost, repeated or reordered)",
                String::from_utf8_lossy(&got)
            ));
        }
        k += 1;
        echoed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ws.close(1000, "done")
        .await
        .map_err(|e| format!("connection {i}: close: {e}"))?;
    let close = ws
        .read_until_close()
        .await
        .map_err(|e| format!("connection {i}: close reply: {e}"))?;
    if close.close_code() != Some(1000) {
        return Err(format!("connection {i}: close reply {close:?}"));
    }
    Ok(k)
}

/// The test: 1,000 plain connections echoing every 20 ms through an upgrade to a new
/// process of the same binary: none is closed, no message is lost, repeated or reordered,
/// handshakes during the upgrade all get 101, and the old process exits once it holds
/// nothing. Both processes say what became of the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_connections_go_on_through_an_upgrade() {
    const N: usize = 1000;
    let _fds = descriptor_hungry().await;
    let backend = RawBackend::start(echo_frames()).await;
    // A long drain: a connection the old process failed to hand over would be drained with
    // 1001 (and fail the test) instead of being cut at the drain's end.
    let manifest = format!(
        "{}[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        gateway_section("[gateway.limits]\ndrain_timeout = \"30s\""),
        api_section("echo", "echo", &backend.url(), "")
    );
    let mut gw = Gateway::start(&manifest);
    let (addr, admin) = (gw.ws.unwrap(), gw.admin.unwrap());
    let old_pid = gw.child.id();
    serving(admin).await;
    let echoes = NumberedEchoes::start(addr, N, false).await;
    let handshakes = handshake_loop(addr, echoes.stop.clone());
    signal(old_pid, libc::SIGUSR2);
    let up = gw.wait_record("upgrade", |_| true).await;
    let new_pid = u32::try_from(up["new_pid"].as_u64().unwrap()).unwrap();
    let _stop_new = StopOnDrop(new_pid);
    assert_eq!(up["connections_handed_over"], true, "{up}");
    // The old process exits by itself once it has handed everything over.
    let status = exit_status(&mut gw, Duration::from_secs(30)).await;
    assert!(status.success(), "old process: {status}");
    let complete = gw.wait_record("upgrade_complete", |_| true).await;
    let resumed = gw.wait_record("upgrade_resumed", |_| true).await;
    // Every connection goes on in the new process.
    let total = echoes
        .moving_then_stop("every connection echoing through the new process")
        .await;
    let seen = handshakes.await.unwrap();
    let refused: Vec<&String> = seen
        .iter()
        .map(|(_, s)| s)
        .filter(|s| !s.starts_with("HTTP/1.1 101"))
        .collect();
    assert!(
        refused.is_empty(),
        "not every handshake got 101: {refused:?}"
    );
    let handed = complete["handed_over"].as_u64().unwrap_or(0);
    assert!(handed >= N as u64, "{complete}");
    assert_eq!(complete["failed"], 0, "{complete}");
    assert_eq!(complete["resumed"], handed, "{complete}");
    assert_eq!(resumed["resumed"], handed, "{resumed}");
    assert_eq!(resumed["closed"], 0, "{resumed}");
    eprintln!(
        "{N} connections through the upgrade: {total} messages echoed in order, none lost; \
         {handed} handed over, {} drained; {} handshakes meanwhile, all 101",
        complete["drained"],
        seen.len()
    );
    assert_eq!(
        sample(
            &scrape(admin).await,
            "tollgate_upgrade_connections_total",
            &[("path", "resumed")]
        ),
        Some(handed as f64)
    );
    signal(new_pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(new_pid) {
        assert!(Instant::now() < deadline, "the new process did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// wss connections cannot go to the new process (their TLS session is this process's; kernel
/// TLS, which could carry it, is not used yet): each is closed with 1012 (service restart) at
/// a random moment within `upgrade_close_window`, not all at once, so their clients come back
/// spread out. The `upgrade` record says so, and whether this kernel offers kernel TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_connections_are_closed_with_1012_spread_over_the_window() {
    use crate::support::tls::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    const N: usize = 12;
    let ca = TestCa::new("Upgrade CA");
    let leaf = ca.leaf(&["localhost"]);
    let dir = TempDir::new("upgrade-wss");
    let (cert, key) = leaf.write(dir.path(), "gw");
    let backend = RawBackend::start(echo_frames()).await;
    let manifest = format!(
        "[gateway]\nname = \"t\"\n[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [gateway.limits]\ndrain_timeout = \"10s\"\nupgrade_close_window = \"3s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        cert.display(),
        key.display(),
        api_section("echo", "echo", &backend.url(), "schemes = [\"wss\"]")
    );
    let mut gw = Gateway::start_in(dir, &manifest);
    let (addr, admin) = (gw.wss.unwrap(), gw.admin.unwrap());
    serving(admin).await;
    let mut clients = Vec::new();
    for _ in 0..N {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(client_config(&ca))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let (mut ws, _) =
            tokio_tungstenite::client_async(format!("wss://localhost:{}/echo", addr.port()), tls)
                .await
                .unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        clients.push(ws);
    }
    let old_pid = gw.child.id();
    let signalled = Instant::now();
    signal(old_pid, libc::SIGUSR2);
    let mut closes = Vec::new();
    for mut ws in clients {
        closes.push(tokio::spawn(async move {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => {
                        return (Instant::now(), frame.map(|f| u16::from(f.code)));
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("ended without a close: {other:?}"),
                }
            }
        }));
    }
    let up = gw.wait_record("upgrade", |_| true).await;
    // The drain (and the window) starts right after this record.
    let drain_seen = Instant::now();
    let new_pid = u32::try_from(up["new_pid"].as_u64().unwrap()).unwrap();
    let _stop_new = StopOnDrop(new_pid);
    assert_eq!(up["wss"], "drained_1012", "{up}");
    assert_eq!(up["close_window_ms"], 3000, "{up}");
    let mut at = Vec::new();
    for c in closes {
        let (when, code) = c.await.unwrap();
        assert_eq!(code, Some(1012), "closed with {code:?}");
        // Within the 3 s window of the drain (a second of slack for a loaded machine).
        let into = when.saturating_duration_since(drain_seen);
        assert!(
            into < Duration::from_secs(4),
            "closed {into:?} into the drain"
        );
        at.push(when - signalled);
    }
    at.sort();
    let (first, last) = (at[0], at[N - 1]);
    // Spread over the window, not all at once.
    assert!(
        last - first >= Duration::from_millis(500),
        "closes not spread: {at:?}"
    );
    eprintln!(
        "{N} wss connections closed with 1012 from {first:?} to {last:?} after SIGUSR2 (kernel TLS offered by this kernel: {})",
        up["kernel_tls"]
    );
    let complete = gw.wait_record("upgrade_complete", |_| true).await;
    assert_eq!(complete["handed_over"], 0, "{complete}");
    assert!(complete["drained"].as_u64() >= Some(N as u64), "{complete}");
    let status = exit_status(&mut gw, Duration::from_secs(15)).await;
    assert!(status.success(), "old process: {status}");
    signal(new_pid, libc::SIGTERM);
}

/// `tollgate upgrade`: finds the gateway by `gateway.pid_file`, signals it and returns once the
/// new process serves (its pid is in the file), or at once with status 1 when the gateway did
/// not upgrade (the failed or ignored upgrade rewrites the file with the same pid). Under
/// systemd (`NOTIFY_SOCKET`), each serving process says `READY=1` with its own `MAINPID`, so the
/// manager follows the new process; the old one does not say `STOPPING=1` after a handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tollgate_upgrade_follows_the_pid_file_and_tells_systemd() {
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("upgrade-cli");
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let pid_file = dir.path().join("tollgate.pid");
    let manifest = format!(
        "[gateway]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\npid_file = \"tollgate.pid\"\n\
         [gateway.limits]\ndrain_timeout = \"2s\"\n\n{}",
        api_section("echo", "echo", &backend.url(), "")
    );
    let manifest_path = dir.path().join("tollgate.toml");
    let notify_env = notify_path.display().to_string();
    let mut gw = Gateway::start_with_env(dir, &manifest, &[("NOTIFY_SOCKET", &notify_env)]);
    let old_pid = gw.child.id();
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY from the gateway");
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        said.contains("READY=1") && said.contains(&format!("MAINPID={old_pid}")),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        old_pid.to_string()
    );
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("upgrade")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let manifest_arg = manifest_path.display().to_string();
    let (code, stdout, stderr) = cli(&["--manifest", &manifest_arg]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let new_pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _stop_new = StopOnDrop(new_pid);
    assert_ne!(new_pid, old_pid);
    assert!(
        stdout.contains(&format!("{old_pid} -> {new_pid}")),
        "{stdout}"
    );
    let n = notify.recv(&mut buf).expect("READY from the new process");
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        said.contains("READY=1") && said.contains(&format!("MAINPID={new_pid}")),
        "{said}"
    );
    // The old process exits without STOPPING=1 and leaves the new pid in the file.
    let status = exit_status(&mut gw, Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
    notify
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    if let Ok(n) = notify.recv(&mut buf) {
        panic!(
            "unexpected notification: {}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        new_pid.to_string()
    );
    // A manifest the next binary cannot load: the upgrade fails, the CLI says so at once.
    std::fs::write(&manifest_path, "[gateway]\nname = \"t\"\nlisten = 8080\n").unwrap();
    let started = Instant::now();
    let pid_arg = pid_file.display().to_string();
    let (code, stdout, stderr) = cli(&["--pid-file", &pid_arg]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("did not upgrade"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the failure was only found by the timeout"
    );
    // A pid file that names no tollgate process (a stale one, the pid reused), or no process
    // id at all (-1 would signal every process): nothing is signalled.
    let stale = TempDir::new("upgrade-stale");
    let stale_file = stale.path().join("stale.pid");
    for content in [
        std::process::id().to_string(),
        "4294967295".into(),
        "0".into(),
    ] {
        std::fs::write(&stale_file, &content).unwrap();
        let (code, _, stderr) = cli(&["--pid-file", &stale_file.display().to_string()]);
        assert_eq!(code, Some(1), "{content}: {stderr}");
        assert!(
            stderr.contains("not a running tollgate") || stderr.contains("no pid in it"),
            "{content}: {stderr}"
        );
    }
    // The manifest itself does not load: the CLI says so and signals nothing.
    let (code, _, stderr) = cli(&["--manifest", &manifest_arg]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(running(new_pid));
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        new_pid.to_string()
    );
    signal(new_pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(new_pid) {
        assert!(Instant::now() < deadline, "the new process did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stopped for good: the pid file is gone.
    assert!(!pid_file.exists());
}

/// A fleet (`[cluster]`): connections holding fleet slots go to the new process too, which
/// takes their slots under its own gateway id as the old process gives its back (it leaves
/// the fleet when it exits). The subscription's limit holds throughout: at its 10 connections,
/// all handed over and still echoing, an 11th handshake is refused after the upgrade, and a
/// close lets exactly one in. Then the new process is upgraded in turn: the same again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_connections_go_on_and_keep_their_slots() {
    use crate::cluster::{fleet_gateway, open};
    use crate::support::redis::RedisServer;
    let redis = RedisServer::start();
    let backend = RawBackend::start(echo_frames()).await;
    let mut gw = fleet_gateway(&redis, &backend.url(), "");
    let old_pid = gw.child.id();
    serving(gw.admin.unwrap()).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let (status, ws) = open(&gw).await;
        assert_eq!(status, 101);
        held.push(ws);
    }
    assert_eq!(open(&gw).await.0, 429, "the limit before the upgrade");
    signal(old_pid, libc::SIGUSR2);
    let up = gw.wait_record("upgrade", |_| true).await;
    let new_pid = u32::try_from(up["new_pid"].as_u64().unwrap()).unwrap();
    let _stop_new = StopOnDrop(new_pid);
    let status = exit_status(&mut gw, Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
    let complete = gw.wait_record("upgrade_complete", |_| true).await;
    assert_eq!(complete["handed_over"], 10, "{complete}");
    // The old process has left the fleet (every slot of its own given back).
    gw.wait_record("store_left", |r| r["gateway"].as_str().is_some())
        .await;
    for (i, ws) in held.iter_mut().enumerate() {
        let msg = format!("still {i}");
        ws.send(true, 1, msg.as_bytes()).await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, msg.as_bytes());
    }
    // The 10 slots are the new process's now: an 11th handshake is refused.
    assert_eq!(open(&gw).await.0, 429, "the limit after the upgrade");
    held.pop().unwrap().close(1000, "").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, ws) = open(&gw).await;
        if status == 101 {
            held.push(ws);
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(open(&gw).await.0, 429, "exactly one came in");

    // A second upgrade, of the new process: the connections it took over (and their slots,
    // which it adopted) go on to a third process the same way.
    signal(new_pid, libc::SIGUSR2);
    let up = gw.wait_record("upgrade", |r| r["old_pid"] == new_pid).await;
    let third = u32::try_from(up["new_pid"].as_u64().unwrap()).unwrap();
    let _stop_third = StopOnDrop(third);
    let complete = gw
        .wait_record("upgrade_complete", |r| r["old_pid"] == new_pid)
        .await;
    assert_eq!(complete["handed_over"], 10, "{complete}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while running(new_pid) {
        assert!(Instant::now() < deadline, "the second process did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, ws) in held.iter_mut().enumerate() {
        let msg = format!("twice {i}");
        ws.send(true, 1, msg.as_bytes()).await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, msg.as_bytes());
    }
    assert_eq!(open(&gw).await.0, 429, "the limit after a second upgrade");
    signal(third, libc::SIGTERM);
}

/// Connections through an API with a message policy go on too: each pauses at a message
/// boundary (a message held or being judged is finished first), and the new process judges
/// what follows with the API's policy: every reply, before, during and after the upgrade, is
/// the policy's replacement, fragmented messages and messages split across writes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_message_policies_go_on_through_an_upgrade() {
    const N: usize = 50;
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("upgrade-messages");
    plugins::install(&dir.path().join("plugins"), &["message_test.wasm"]);
    let manifest = format!(
        "{}[gateway.limits]\ndrain_timeout = \"30s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}\
         [[apis.on_message]]\nplugin = \"message-test\"\n",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("echo", "echo", &backend.url(), "")
    );
    let mut gw = Gateway::start_in(dir, &manifest);
    let (addr, admin) = (gw.ws.unwrap(), gw.admin.unwrap());
    let old_pid = gw.child.id();
    serving(admin).await;
    let echoes = NumberedEchoes::start(addr, N, true).await;
    // One more connection is in the middle of a message when the upgrade comes: the gateway
    // holds its first fragment; the pause waits for the rest, the old process judges it, then
    // hands the connection over.
    let (_, mut held) = ws_connect(addr, "/echo", "").await;
    held.send(false, 1, b"upper:half").await.unwrap();
    signal(old_pid, libc::SIGUSR2);
    let up = gw.wait_record("upgrade", |_| true).await;
    let new_pid = u32::try_from(up["new_pid"].as_u64().unwrap()).unwrap();
    let _stop_new = StopOnDrop(new_pid);
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.send(true, 0, b" way").await.unwrap();
    let reply = held.read_frame().await.unwrap();
    assert_eq!(reply.payload, b"UPPER:HALF WAY", "{reply:?}");
    let status = exit_status(&mut gw, Duration::from_secs(30)).await;
    assert!(status.success(), "old process: {status}");
    let complete = gw.wait_record("upgrade_complete", |_| true).await;
    assert_eq!(complete["handed_over"], N + 1, "{complete}");
    // Judged by the new process now.
    held.send(true, 1, b"upper:after").await.unwrap();
    let reply = held.read_frame().await.unwrap();
    assert_eq!(reply.payload, b"UPPER:AFTER", "{reply:?}");
    assert_eq!(complete["drained"], 0, "{complete}");
    let total = echoes
        .moving_then_stop("every connection judged and echoed by the new process")
        .await;
    eprintln!("{N} connections with a message policy through the upgrade: {total} messages judged and echoed in order");
    signal(new_pid, libc::SIGTERM);
}

/// A connection whose API the new manifest no longer has is taken over and closed by the new
/// process with 1001 to both sides (it was at a frame boundary), and said so; the other
/// connections go on. (The old process may reload the changed manifest first: established
/// connections keep their API through a reload, so the outcome is the same.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_api_is_gone_is_closed_by_the_new_process() {
    let backend = RawBackend::start(echo_frames()).await;
    let both = format!(
        "{}{}",
        manifest(&backend.url()),
        api_section("gone", "gone", &backend.url(), "")
    );
    let mut gw = Gateway::start(&both);
    serving(gw.admin.unwrap()).await;
    let addr = gw.ws.unwrap();
    let (_, mut kept) = ws_connect(addr, "/echo", "").await;
    let (_, mut gone) = ws_connect(addr, "/gone", "").await;
    gone.send(true, 1, b"before").await.unwrap();
    assert_eq!(gone.read_frame().await.unwrap().payload, b"before");
    std::fs::write(
        gw.dir.path().join("tollgate.toml"),
        manifest(&backend.url()),
    )
    .unwrap();
    signal(gw.child.id(), libc::SIGUSR2);
    let up = gw.wait_record("upgrade", |_| true).await;
    let new_pid = u32::try_from(up["new_pid"].as_u64().unwrap()).unwrap();
    let _stop_new = StopOnDrop(new_pid);
    let close = gone.read_until_close().await.unwrap();
    assert_eq!(close.close_code(), Some(1001), "{close:?}");
    assert_eq!(close.close_reason(), "API not served after the upgrade");
    let failed = gw
        .wait_record("connection_resume_failed", |r| r["api"] == "gone")
        .await;
    assert_eq!(failed["old_pid"], gw.child.id(), "{failed}");
    let resumed = gw.wait_record("upgrade_resumed", |_| true).await;
    assert_eq!(
        (resumed["resumed"].as_u64(), resumed["closed"].as_u64()),
        (Some(1), Some(1)),
        "{resumed}"
    );
    kept.send(true, 1, b"after").await.unwrap();
    assert_eq!(kept.read_frame().await.unwrap().payload, b"after");
    let status = exit_status(&mut gw, Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
    signal(new_pid, libc::SIGTERM);
}
