//! `tollgate-bench soak`: mixed traffic against one gateway for a long time, to show that
//! nothing grows with time (issue 15, item 4). Throughput figures belong to `run`; this reports
//! the gateway's resident memory, open descriptors, threads and runtime tasks every interval,
//! next to what the traffic did, and ends with the growth between the first sample after the
//! warm-up and the last, and the RSS trend over all samples.
//!
//! The traffic, all through one API with jwt-validate (RS256, a fresh key pair per run) and
//! set-header on its onHandshake:
//! - **relays**: long-lived connections, each echoing 1 KiB messages (binary and ASCII JSON
//!   text alternately) every 20-100 ms, closing properly after 5-60 s and reconnecting;
//! - **handshakes**: a steady rate of short connections (handshake with policies, one echo,
//!   close); one in ten has no token and must be refused with 401;
//! - **reloads**: the manifest is rewritten every `reload_every` seconds, switching set-header
//!   between fresh and pooled instances, so each reload swaps the served state under load.
//!
//! Unexpected answers (a refusal of a valid token, a wrong echo, a connection ended without a
//! close) are counted as errors and make the command fail at the end.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::orchestrate::{self, Jwt, Proc};
use crate::{proc, wire};

#[derive(clap::Args, Clone)]
pub struct SoakArgs {
    /// Total time, in seconds (the record in BENCHMARKS.md is 1800).
    #[arg(long, default_value_t = 1800.0)]
    pub duration: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60.0)]
    pub interval: f64,
    /// Seconds of traffic before the first sample: plugins compiled, instance pools and
    /// buffers warm, and a few reloads done (the first ones, to pooled instances, add a pool:
    /// about 8 MiB in the first minute).
    #[arg(long, default_value_t = 120.0)]
    pub warmup: f64,
    /// Long-lived relayed connections kept open (each reconnects after 5-60 s).
    #[arg(long, default_value_t = 200)]
    pub relays: usize,
    /// Short connections per second (handshake with policies, one echo, close).
    #[arg(long, default_value_t = 50.0)]
    pub handshake_rate: f64,
    /// Seconds between manifest rewrites (each one a reload).
    #[arg(long, default_value_t = 20.0)]
    pub reload_every: f64,
    /// Path of the tollgate binary (default: target/release/tollgate next to this binary).
    #[arg(long)]
    pub tollgate: Option<PathBuf>,
    /// Directory holding jwt_validate.wasm and set_header.wasm (default:
    /// target/wasm32-wasip2/release).
    #[arg(long)]
    pub plugins: Option<PathBuf>,
}

/// What the traffic did, counted by the load tasks.
#[derive(Default)]
struct Counts {
    handshakes_ok: AtomicU64,
    refused_as_expected: AtomicU64,
    messages: AtomicU64,
    relay_sessions: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn error(&self, what: &str, e: impl std::fmt::Display) {
        // The first few say what went wrong; the count says how often.
        if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
            eprintln!("  soak error ({what}): {e}");
        }
    }
}

/// One sample of the gateway process.
struct Sample {
    at: Duration,
    rss_kb: u64,
    fds: usize,
    threads: u64,
    tasks: i64,
    active: i64,
    reloads: u64,
}

pub fn run(a: SoakArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let backend_port = orchestrate::free_port()?;
    let _backend = Proc::spawn(
        std::process::Command::new(&me)
            .args(["backend", "--listen", &format!("127.0.0.1:{backend_port}")])
            .stdout(Stdio::null()),
    )?;
    orchestrate::wait_port(backend_port, 20)?;
    let jwt = Jwt::new()?;
    let port = orchestrate::free_port()?;
    let admin = orchestrate::free_port()?;
    let run_args = orchestrate::RunArgs {
        plugins: a.plugins.clone(),
        ..Default::default()
    };
    let (dir, manifest) =
        orchestrate::tollgate_dir("tollgate-policies", port, backend_port, &run_args, &jwt)?;
    let fresh =
        std::fs::read_to_string(&manifest)? + &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    // The same manifest with set-header pooled: each rewrite switches between the two.
    let pooled = fresh.replacen(
        "plugin = \"set-header\"\n",
        "plugin = \"set-header\"\ninstances = \"pooled\"\n",
        1,
    );
    anyhow::ensure!(
        pooled != fresh,
        "the bench manifest has no set-header entry"
    );
    std::fs::write(&manifest, &fresh)?;
    let bin = match &a.tollgate {
        Some(p) => p.clone(),
        None => me.parent().context("exe dir")?.join("tollgate"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p tollgate`",
        bin.display()
    );
    let log = std::fs::File::create(dir.path().join("gateway.log"))?;
    let gateway = Proc::spawn(
        std::process::Command::new(&bin)
            .args(["run", "--manifest"])
            .arg(&manifest)
            .env("RUST_LOG", "warn")
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .stdout(log),
    )?;
    orchestrate::wait_port(port, 600).context("the gateway did not start")?;
    let pid = gateway.id();
    let addr = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin}");
    eprintln!(
        "tollgate-bench soak: {} s, {} relays, {} handshakes/s, a reload every {} s, a sample every {} s",
        a.duration, a.relays, a.handshake_rate, a.reload_every, a.interval
    );

    let counts = Arc::new(Counts::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(a.warmup + a.duration);
    let auth = format!("Authorization: Bearer {}\r\n", jwt.token());
    let mut samples: Vec<Sample> = Vec::new();
    rt.block_on(async {
        let mut load = tokio::task::JoinSet::new();
        for i in 0..a.relays {
            load.spawn(relay(i, addr.clone(), auth.clone(), counts.clone(), end));
        }
        load.spawn(handshakes(
            addr.clone(),
            auth.clone(),
            a.handshake_rate,
            counts.clone(),
            end,
        ));
        load.spawn(reloads(
            manifest.clone(),
            [fresh, pooled],
            a.reload_every,
            end,
        ));
        tokio::time::sleep(Duration::from_secs_f64(a.warmup)).await;
        println!("| minute | RSS (MiB) | fds | threads | runtime tasks | connections | handshakes | refused (401, expected) | messages | relay sessions | reloads applied | errors |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        let mut next = Instant::now();
        while Instant::now() + Duration::from_secs(1) < end {
            let s = sample(pid, &admin, started.elapsed()).await?;
            println!(
                "| {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.at.as_secs_f64() / 60.0,
                s.rss_kb as f64 / 1024.0,
                s.fds,
                s.threads,
                s.tasks,
                s.active,
                counts.handshakes_ok.load(Ordering::Relaxed),
                counts.refused_as_expected.load(Ordering::Relaxed),
                counts.messages.load(Ordering::Relaxed),
                counts.relay_sessions.load(Ordering::Relaxed),
                s.reloads,
                counts.errors.load(Ordering::Relaxed),
            );
            samples.push(s);
            next += Duration::from_secs_f64(a.interval);
            tokio::time::sleep_until(next.min(end).into()).await;
        }
        while let Some(r) = load.join_next().await {
            r??;
        }
        // Everything closed: what is left is the idle gateway.
        let mut idle = sample(pid, &admin, started.elapsed()).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while idle.active > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            idle = sample(pid, &admin, started.elapsed()).await?;
        }
        println!(
            "\nafter the traffic stopped: {:.1} MiB, {} fds, {} threads, {} runtime tasks, {} connections",
            idle.rss_kb as f64 / 1024.0,
            idle.fds,
            idle.threads,
            idle.tasks,
            idle.active
        );
        anyhow::Ok(())
    })?;
    drop(gateway);
    let (first, last) = match (samples.first(), samples.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => anyhow::bail!("no sample taken: the run was shorter than one interval"),
    };
    println!(
        "\ngrowth from the first sample to the last ({:.0} min): RSS {:+.1} MiB ({:+.1} %), fds {:+}, threads {:+}, runtime tasks {:+}",
        (last.at - first.at).as_secs_f64() / 60.0,
        (last.rss_kb as f64 - first.rss_kb as f64) / 1024.0,
        (last.rss_kb as f64 / first.rss_kb.max(1) as f64 - 1.0) * 100.0,
        last.fds as i64 - first.fds as i64,
        last.threads as i64 - first.threads as i64,
        last.tasks - first.tasks,
    );
    println!(
        "RSS trend (least squares over every sample): {:+.1} KiB per minute",
        slope(&samples)
    );
    let errors = counts.errors.load(Ordering::Relaxed);
    anyhow::ensure!(errors == 0, "{errors} unexpected answers (see above)");
    anyhow::ensure!(
        last.reloads > first.reloads,
        "no reload was applied during the run"
    );
    Ok(())
}

/// Least-squares slope of RSS over time, in KiB per minute: a leak shows as a steady positive
/// trend, whatever the noise of single samples.
fn slope(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let xs: Vec<f64> = samples.iter().map(|s| s.at.as_secs_f64() / 60.0).collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.rss_kb as f64).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if var == 0.0 {
        0.0
    } else {
        cov / var
    }
}

async fn sample(pid: u32, admin: &str, at: Duration) -> anyhow::Result<Sample> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("the gateway is gone")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let metrics = scrape(admin).await?;
    let sum = |name: &str, filter: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok(Sample {
        at,
        rss_kb: proc::rss_kb(pid),
        fds,
        threads,
        tasks: sum("tollgate_runtime_tasks ", "") as i64,
        active: sum("tollgate_connections_active{", "") as i64,
        reloads: sum("tollgate_reloads_total{", "outcome=\"applied\"") as u64,
    })
}

/// GET /metrics from the admin listener (HTTP/1.0: the answer ends with the connection).
async fn scrape(admin: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut body))
        .await
        .context("/metrics did not answer")??;
    let text = String::from_utf8_lossy(&body).into_owned();
    anyhow::ensure!(text.starts_with("HTTP/1.0 200"), "/metrics: {text:.200}");
    Ok(text)
}

/// A small deterministic generator per task (xorshift): delays, lifetimes and masking keys
/// need spread, not quality.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_be_bytes()
    }
}

/// A client connection: frames in, with bytes read past each one kept.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn open(addr: &str, auth: &str) -> anyhow::Result<Client> {
        let (s, buf) = wire::connect(addr, "/echo", auth).await?;
        Ok(Client { s, buf })
    }

    /// The next frame's opcode and (unmasked) payload.
    async fn read(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((h, len, mask, op)) = wire::frame_at(&self.buf) {
                anyhow::ensure!(mask.is_none(), "a masked frame from the gateway");
                let payload = self.buf[h..h + len].to_vec();
                self.buf.drain(..h + len);
                return Ok((op, payload));
            }
            let n = tokio::time::timeout(Duration::from_secs(30), self.s.read(&mut chunk))
                .await
                .context("nothing for 30 s")??;
            anyhow::ensure!(n > 0, "connection ended without a close");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn echo(&mut self, rng: &mut Rng, op: u8, payload: &[u8]) -> anyhow::Result<()> {
        self.s
            .write_all(&wire::encode(op, payload, Some(rng.mask())))
            .await?;
        let (got_op, got) = self.read().await?;
        anyhow::ensure!(
            got_op == op && got == payload,
            "echo differs (opcode {got_op}, {} bytes)",
            got.len()
        );
        Ok(())
    }

    /// Our close, the peer's close, then the socket.
    async fn close(mut self, rng: &mut Rng) -> anyhow::Result<()> {
        self.s
            .write_all(&wire::encode(8, &1000u16.to_be_bytes(), Some(rng.mask())))
            .await?;
        let (op, payload) = self.read().await?;
        anyhow::ensure!(
            op == 8 && payload.get(..2) == Some(&1000u16.to_be_bytes()[..]),
            "close answered with opcode {op}, payload {payload:?}"
        );
        Ok(())
    }
}

fn payloads() -> [(u8, Vec<u8>); 2] {
    let binary: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    let mut json = br#"{"type":"tick","seq":12345,"items":["#.to_vec();
    while json.len() < 1000 {
        json.extend_from_slice(br#"{"id":1,"v":"abcdef"},"#);
    }
    json.extend_from_slice(br#"{"id":0}]}"#);
    [(2, binary), (1, json)]
}

async fn relay(
    i: usize,
    addr: String,
    auth: String,
    counts: Arc<Counts>,
    end: Instant,
) -> anyhow::Result<()> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let payloads = payloads();
    // Spread the first connections over a second rather than all at once.
    tokio::time::sleep(Duration::from_millis(rng.between(0, 1000))).await;
    while Instant::now() < end {
        let session = Instant::now() + Duration::from_secs(rng.between(5, 60));
        let r: anyhow::Result<()> = async {
            let mut c = Client::open(&addr, &auth).await?;
            let mut n = 0usize;
            while Instant::now() < session.min(end) {
                let (op, p) = &payloads[n % 2];
                c.echo(&mut rng, *op, p).await?;
                counts.messages.fetch_add(1, Ordering::Relaxed);
                n += 1;
                tokio::time::sleep(Duration::from_millis(rng.between(20, 100))).await;
            }
            c.close(&mut rng).await
        }
        .await;
        match r {
            Ok(()) => {
                counts.relay_sessions.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counts.error("relay", format!("{e:#}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    Ok(())
}

async fn handshakes(
    addr: String,
    auth: String,
    rate: f64,
    counts: Arc<Counts>,
    end: Instant,
) -> anyhow::Result<()> {
    if rate <= 0.0 {
        return Ok(());
    }
    let every = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    while Instant::now() < end {
        tick.tick().await;
        n += 1;
        let (addr, auth, counts) = (addr.clone(), auth.clone(), counts.clone());
        let mut rng = Rng(n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        running.spawn(async move {
            if n.is_multiple_of(10) {
                // No token: jwt-validate refuses with 401 before the backend is contacted.
                match refused(&addr).await {
                    Ok(()) => counts.refused_as_expected.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        counts.error("refusal", format!("{e:#}"));
                        0
                    }
                };
                return;
            }
            let r: anyhow::Result<()> = async {
                let mut c = Client::open(&addr, &auth).await?;
                c.echo(&mut rng, 1, br#"{"hello":"soak"}"#).await?;
                c.close(&mut rng).await
            }
            .await;
            match r {
                Ok(()) => counts.handshakes_ok.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    counts.error("handshake", format!("{e:#}"));
                    0
                }
            };
        });
        // Reap what finished so the set stays small.
        while let Some(r) = running.try_join_next() {
            r?;
        }
    }
    while let Some(r) = running.join_next().await {
        r?;
    }
    Ok(())
}

async fn refused(addr: &str) -> anyhow::Result<()> {
    let mut s = wire::send_request(addr, "/echo", "").await?;
    let (head, _) = wire::read_head(&mut s).await?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 401"),
        "expected 401, got {:.80}",
        head
    );
    Ok(())
}

async fn reloads(
    manifest: PathBuf,
    texts: [String; 2],
    every: f64,
    end: Instant,
) -> anyhow::Result<()> {
    if every <= 0.0 {
        return Ok(());
    }
    let mut n = 0;
    loop {
        let next = Instant::now() + Duration::from_secs_f64(every);
        if next >= end {
            return Ok(());
        }
        tokio::time::sleep_until(next.into()).await;
        n += 1;
        // Write a new file and rename it over the manifest, as editors and config management
        // do: the gateway never reads half a file.
        let tmp = manifest.with_extension("toml.new");
        std::fs::write(&tmp, &texts[n % 2])?;
        std::fs::rename(&tmp, &manifest)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(min: f64, rss_kb: u64) -> Sample {
        Sample {
            at: Duration::from_secs_f64(min * 60.0),
            rss_kb,
            fds: 0,
            threads: 0,
            tasks: 0,
            active: 0,
            reloads: 0,
        }
    }

    #[test]
    fn the_trend_is_the_least_squares_slope() {
        let flat = [at(1.0, 100), at(2.0, 104), at(3.0, 96), at(4.0, 100)];
        assert!(slope(&flat).abs() < 1.0, "{}", slope(&flat));
        let leak = [at(1.0, 100), at(2.0, 110), at(3.0, 120), at(4.0, 130)];
        assert!((slope(&leak) - 10.0).abs() < 1e-9, "{}", slope(&leak));
        assert_eq!(slope(&[at(1.0, 5)]), 0.0);
    }
}
