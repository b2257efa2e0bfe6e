//! Upgrading the binary (SIGUSR2, `tollgate::upgrade`): the running gateway starts a new
//! process of its binary and hands it its listening sockets; a client trying to connect at any
//! moment is answered, by one process or the other. A new process that cannot load leaves the
//! old one serving, and the old one says why.

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

/// SIGUSR2 during a stream of handshakes: the new process takes the sockets (ws and admin),
/// every handshake before, during and after gets its 101, the old process drains (its open
/// connection gets 1001) and exits, and the new one answers `/readyz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_hands_the_listening_sockets_over_without_refusing_a_handshake() {
    let backend = RawBackend::start(echo_frames()).await;
    let mut gw = Gateway::start(&manifest(&backend.url()));
    let (addr, admin) = (gw.ws.unwrap(), gw.admin.unwrap());
    let old_pid = gw.child.id();
    let (_, mut open) = ws_connect(addr, "/echo", "").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(admin, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = handshake_loop(addr, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(old_pid, libc::SIGUSR2);
    gw.wait_record("upgrade_started", |_| true).await;
    // A second SIGUSR2 during the upgrade is ignored, not queued.
    signal(old_pid, libc::SIGUSR2);
    let up = gw.wait_record("upgrade", |_| true).await;
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
    // The old process drains: its connection is closed with 1001, then it exits.
    let close = open.read_until_close().await.unwrap();
    assert_eq!(close.close_code(), Some(1001), "{close:?}");
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
    assert_eq!(gw.records("upgrade").len(), 1, "one upgrade only");
    assert!(running(new_pid));
    signal(new_pid, libc::SIGTERM);
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(gw.admin.unwrap(), "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
