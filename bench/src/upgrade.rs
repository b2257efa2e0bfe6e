//! `tollgate-bench upgrade`: a binary upgrade (SIGUSR2) under connections (issue 23's target).
//!
//! One gateway (release build) relays `connections` idle connections and `echoing` ones that
//! each send a 64-byte message every 20 ms and wait for its echo. The bench sends SIGUSR2 and
//! reads the gateway's own records (both processes write to the same log):
//! - **total upgrade time**: from `upgrade_started` to the old process's `upgrade_complete`;
//! - **pause per connection**: from the old process's `draining` (when every relay is asked to
//!   pause) to that connection's `connection_resumed` in the new process: an upper bound on
//!   how long its bytes waited; p50, p99 and max;
//! - the echoing connections' longest round trip during the upgrade, against before it;
//! - then every connection is checked: each idle one sends a message and must get its echo
//!   through the new process (`lost` counts those that do not).

use std::io::{BufRead, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::orchestrate::{self, Proc};
use crate::wire;

#[derive(clap::Args, Clone)]
pub struct UpgradeArgs {
    /// Idle connections held through the upgrade (the target: 10,000; each costs the
    /// gateway two descriptors, so the hard `nofile` limit must allow twice this and more).
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Connections echoing a message every 20 ms through the upgrade.
    #[arg(long, default_value_t = 100)]
    pub echoing: usize,
    /// Path of the tollgate binary (default: target/release/tollgate next to this binary).
    #[arg(long)]
    pub tollgate: Option<std::path::PathBuf>,
}

/// A record's time of day in seconds (the log's RFC 3339 UTC timestamps; the run is short).
fn seconds(record: &serde_json::Value) -> Option<f64> {
    let ts = record["timestamp"].as_str()?;
    let time = ts.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn records(log: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::File::open(log)
        .map(|f| {
            std::io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| serde_json::from_str(&l).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sends one masked binary message and reads its echo (the bench backend echoes unmasked).
async fn round_trip(s: &mut TcpStream, carry: &mut Vec<u8>, payload: &[u8]) -> anyhow::Result<()> {
    s.write_all(&wire::encode(2, payload, Some([1, 2, 3, 4])))
        .await?;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((h, len, _, opcode)) = wire::frame_at(carry) {
            anyhow::ensure!(opcode == 2, "got opcode {opcode} instead of the echo");
            anyhow::ensure!(&carry[h..h + len] == payload, "wrong echo");
            carry.drain(..h + len);
            return Ok(());
        }
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed");
        carry.extend_from_slice(&chunk[..n]);
    }
}

pub fn run(a: UpgradeArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let backend_port = orchestrate::free_port()?;
    let _backend = Proc::spawn(
        std::process::Command::new(&me)
            .args(["backend", "--listen", &format!("127.0.0.1:{backend_port}")])
            .stdout(Stdio::null()),
    )?;
    orchestrate::wait_port(backend_port, 20)?;
    let bin = match &a.tollgate {
        Some(p) => p.clone(),
        None => me.parent().context("exe dir")?.join("tollgate"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p tollgate`",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("tollgate-bench-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = orchestrate::free_port()?;
    let manifest = dir.join("tollgate.toml");
    let total = a.connections + a.echoing;
    std::fs::write(
        &manifest,
        format!(
            "[gateway]\nname = \"bench-upgrade\"\nlisten = \"127.0.0.1:{port}\"\n\n\
             [gateway.limits]\nmax_connections = {}\nmax_pending_handshakes = 4096\n\
             drain_timeout = \"120s\"\n\n\
             [[apis]]\nname = \"echo\"\nurl_suffix = \"echo\"\nbackend = \"ws://127.0.0.1:{backend_port}/\"\n",
            total + 1000
        ),
    )?;
    let log_path = dir.join("gateway.log");
    let gateway = Proc::spawn(
        std::process::Command::new(&bin)
            .args(["run", "--manifest"])
            .arg(&manifest)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log_path)?),
    )?;
    orchestrate::wait_port(port, 60).context("the gateway did not start")?;
    let addr = format!("127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        eprintln!(
            "tollgate-bench upgrade: {} idle + {} echoing connections",
            a.connections, a.echoing
        );
        let mut idle = Vec::with_capacity(a.connections);
        for _ in 0..a.connections {
            idle.push(wire::connect(&addr, "/echo", "").await?);
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Instant::now();
        let mut echoers = tokio::task::JoinSet::new();
        for _ in 0..a.echoing {
            let (mut s, mut carry) = wire::connect(&addr, "/echo", "").await?;
            let stop = stop.clone();
            echoers.spawn(async move {
                // (when sent, round trip), for the whole run.
                let mut trips = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let at = started.elapsed();
                    round_trip(&mut s, &mut carry, &[7u8; 64]).await?;
                    trips.push((at, started.elapsed() - at));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                anyhow::Ok(trips)
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let signalled = started.elapsed();
        let signal = std::process::Command::new("kill")
            .args(["-USR2", &gateway.id().to_string()])
            .status()?;
        anyhow::ensure!(signal.success(), "cannot signal the gateway");
        // Until the old process has handed everything over and said so.
        let deadline = Instant::now() + Duration::from_secs(300);
        let complete = loop {
            if let Some(c) = records(&log_path)
                .into_iter()
                .find(|r| r["event"] == "upgrade_complete")
            {
                break c;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no upgrade_complete within 300 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let done = started.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut before = Vec::new();
        let mut during = Vec::new();
        while let Some(t) = echoers.join_next().await {
            let trips = t??;
            let worst = |from: Duration, to: Duration| {
                trips
                    .iter()
                    .filter(|(at, _)| *at >= from && *at <= to)
                    .map(|(_, rtt)| rtt.as_secs_f64() * 1000.0)
                    .fold(0.0, f64::max)
            };
            before.push(worst(Duration::ZERO, signalled));
            during.push(worst(signalled, done));
        }
        // Every idle connection still relays, through the new process.
        let mut lost = 0usize;
        for (s, carry) in idle.iter_mut() {
            if tokio::time::timeout(Duration::from_secs(5), round_trip(s, carry, b"still here"))
                .await
                .map_or(true, |r| r.is_err())
            {
                lost += 1;
            }
        }
        anyhow::Ok((complete, before, during, lost))
    });
    let recs = records(&log_path);
    let new_pid = recs
        .iter()
        .find(|r| r["event"] == "upgrade")
        .and_then(|r| r["new_pid"].as_u64());
    // The new process is not the bench's child: stopped here by its pid.
    if let Some(pid) = new_pid {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let (complete, mut before, mut during, lost) = result?;
    let at = |event: &str| recs.iter().find(|r| r["event"] == event).and_then(seconds);
    let upgrade_started = at("upgrade_started").context("no upgrade_started record")?;
    let draining = at("draining").context("no draining record")?;
    let finished = seconds(&complete).context("upgrade_complete without a time")?;
    let mut pauses: Vec<f64> = recs
        .iter()
        .filter(|r| r["event"] == "connection_resumed")
        .filter_map(seconds)
        .map(|t| (t - draining) * 1000.0)
        .collect();
    pauses.sort_by(f64::total_cmp);
    before.sort_by(f64::total_cmp);
    during.sort_by(f64::total_cmp);
    let mut out = std::io::stdout().lock();
    writeln!(out, "| connections | handed over | drained | failed | lost | upgrade total (ms) | pause p50 (ms) | pause p99 (ms) | pause max (ms) | echo worst round trip before, p50/max (ms) | during, p50/max (ms) |")?;
    writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
    writeln!(
        out,
        "| {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} / {:.1} | {:.1} / {:.1} |",
        total,
        complete["handed_over"],
        complete["drained"],
        complete["failed"],
        lost,
        (finished - upgrade_started) * 1000.0,
        percentile(&pauses, 0.5),
        percentile(&pauses, 0.99),
        pauses.last().copied().unwrap_or(f64::NAN),
        percentile(&before, 0.5),
        before.last().copied().unwrap_or(f64::NAN),
        percentile(&during, 0.5),
        during.last().copied().unwrap_or(f64::NAN),
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    anyhow::ensure!(lost == 0, "{lost} connections lost in the upgrade");
    Ok(())
}
