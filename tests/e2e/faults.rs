//! Faulting policies (infinite loop, unbounded allocation, trap, deep recursion, huge result,
//! a result of 100,000 empty entries):
//! each handshake gets its error status within the CPU budget, while 100 other connections keep
//! echoing without a single error.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

const MODES: &[&str] = &["loop", "alloc", "trap", "recursion", "huge", "many"];

#[tokio::test]
async fn faulting_policies_fail_only_their_handshake() {
    let backend = RawBackend::start(echo_frames()).await;
    let mut manifest = format!(
        "{}{}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("echo", "echo", &backend.url(), "")
    );
    for mode in MODES {
        manifest.push_str(&api_section(mode, mode, &backend.url(), &format!(
            "[[apis.on_handshake]]\nplugin = \"faulty\"\nfailure_status = 503\nmemory_limit_bytes = 16777216\nconfig = {{ mode = \"{mode}\" }}\n"
        )));
    }
    let dir = TempDir::new("faults");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let gw = Gateway::start_in(dir, &manifest);
    let addr = gw.ws.unwrap();

    // 100 connections echoing continuously while the faults happen.
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let mut echoers = Vec::new();
    for i in 0..100 {
        let (stop, echoed, started) = (stop.clone(), echoed.clone(), started.clone());
        echoers.push(tokio::spawn(async move {
            let (_, mut ws) = ws_connect(addr, "/echo", "").await;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("{i}:{n}");
                ws.send(true, 1, msg.as_bytes())
                    .await
                    .expect("echo connection broke");
                let f = ws.read_frame().await.expect("echo connection broke");
                assert_eq!(f.payload, msg.as_bytes());
                if n == 0 {
                    started.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                echoed.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ws.close(1000, "").await.unwrap();
        }));
    }
    // Every echo connection is relaying before the faults start.
    wait_until("100 echoing connections", || {
        started.load(Ordering::Relaxed) == 100
    })
    .await;

    for round in 0..2 {
        for mode in MODES {
            // The budgets (CPU time, memory, the call's deadline) end every fault: without them the
            // loop would never answer. No wall-clock bound here, which a loaded machine
            // could miss; the timeout only keeps a hang from stalling the suite.
            let (head, _) = tokio::time::timeout(
                Duration::from_secs(30),
                raw_handshake(addr, &format!("/{mode}"), ""),
            )
            .await
            .unwrap_or_else(|_| panic!("mode {mode} round {round}: no answer"));
            assert_eq!(status_of(&head), 503, "mode {mode} round {round}:\n{head}");
        }
    }
    // Still relaying after the faults.
    let before = echoed.load(Ordering::Relaxed);
    wait_until("echo traffic after the faults", || {
        echoed.load(Ordering::Relaxed) >= before + 100
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for e in echoers {
        e.await
            .expect("an echo connection failed while policies faulted");
    }
    // The faulting handshakes never reached the backend: only the 100 echo connections did.
    assert_eq!(backend.connections.load(Ordering::SeqCst), 100);
    for mode in MODES {
        let rec = gw
            .wait_record("handshake", |r| r["api"] == *mode && r["status"] == 503)
            .await;
        assert!(
            rec["reason"]
                .as_str()
                .unwrap()
                .contains("policy `faulty` failed"),
            "{rec}"
        );
    }
    let errors = gw.records("policy_error");
    assert!(
        errors
            .iter()
            .any(|r| r["error"].as_str().unwrap().contains("decision of")),
        "huge result not named"
    );
    // Empty entries count too: 100,000 of them are over the entry limit.
    assert!(
        errors
            .iter()
            .any(|r| r["api"] == "many" && r["error"].as_str().unwrap().contains("100000 entries")),
        "many empty entries not refused: {errors:?}"
    );
}
