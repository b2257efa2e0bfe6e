//! Starts the backend, the proxies and the load client as pinned processes, runs every
//! scenario against every target (alternating the order between rounds), and prints a Markdown
//! report with each proxy's own CPU time per round trip and per handshake.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::proc;

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Rounds per scenario; targets alternate within each round and the order rotates.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Concurrent connections for the throughput and handshake scenarios.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Messages in flight per connection.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Idle connections for the memory scenario (0 skips it).
    #[arg(long, default_value_t = 8000)]
    pub idle_connections: usize,
    /// Comma-separated subset of: direct,tcp-relay,tollgate,nginx,haproxy.
    #[arg(long)]
    pub only: Option<String>,
    /// Path of the tollgate binary (default: target/release/tollgate next to this binary).
    #[arg(long)]
    pub tollgate: Option<PathBuf>,
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs {
            duration: 5.0,
            rounds: 2,
            connections: 50,
            window: 16,
            idle_connections: 8000,
            only: None,
            tollgate: None,
        }
    }
}

/// A process we started; killed (by pid, only ours) on drop.
struct Proc {
    child: Child,
    _dir: Option<TempDir>,
}

impl Drop for Proc {
    /// SIGTERM first, so a master process (nginx) takes its workers down with it; SIGKILL if it
    /// has not exited within 3 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Target {
    name: &'static str,
    addr: String,
    proc: Option<Proc>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pinned(cpu: u32, program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu.to_string()).arg(program);
    c
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("nothing listening on port {port}")
}

fn tempdir(tag: &str) -> anyhow::Result<TempDir> {
    let p = std::env::temp_dir().join(format!("tollgate-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p)?;
    Ok(TempDir(p))
}

fn which(name: &str) -> Option<PathBuf> {
    [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ]
    .iter()
    .map(|d| Path::new(d).join(name))
    .find(|p| p.exists())
}

fn start_target(
    name: &'static str,
    backend_port: u16,
    args: &RunArgs,
) -> anyhow::Result<Option<Target>> {
    let me = std::env::current_exe()?;
    let port = free_port()?;
    let quiet = || Stdio::null();
    let proc = match name {
        "direct" => {
            return Ok(Some(Target {
                name,
                addr: format!("127.0.0.1:{backend_port}"),
                proc: None,
            }));
        }
        "tcp-relay" => {
            let child = pinned(1, &me)
                .args([
                    "tcp-relay",
                    "--listen",
                    &format!("127.0.0.1:{port}"),
                    "--upstream",
                    &format!("127.0.0.1:{backend_port}"),
                ])
                .stdout(quiet())
                .spawn()?;
            Proc { child, _dir: None }
        }
        "tollgate" => {
            let bin = match &args.tollgate {
                Some(p) => p.clone(),
                None => me.parent().context("exe dir")?.join("tollgate"),
            };
            anyhow::ensure!(
                bin.exists(),
                "{} not found: build it with `cargo build --release -p tollgate`",
                bin.display()
            );
            let dir = tempdir("tollgate")?;
            let manifest = dir.0.join("tollgate.toml");
            std::fs::write(
                &manifest,
                format!(
                    "[gateway]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n[gateway.limits]\nmax_connections = 20000\n\
                     [[apis]]\nname = \"echo\"\nurl_suffix = \"echo\"\nbackend = \"ws://127.0.0.1:{backend_port}/\"\n"
                ),
            )?;
            let child = pinned(1, &bin)
                .args(["run", "--manifest"])
                .arg(&manifest)
                .env("RUST_LOG", "warn")
                .stdout(quiet())
                .spawn()?;
            Proc {
                child,
                _dir: Some(dir),
            }
        }
        "nginx" => {
            let Some(bin) = which("nginx") else {
                return Ok(None);
            };
            let dir = tempdir("nginx")?;
            let d = dir.0.display();
            let conf = dir.0.join("nginx.conf");
            std::fs::write(
                &conf,
                format!(
                    "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nworker_rlimit_nofile 20000;\n\
                     events {{ worker_connections 20000; }}\n\
                     http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
                      fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
                      upstream be {{ server 127.0.0.1:{backend_port}; }}\n\
                      server {{\n  listen 127.0.0.1:{port};\n  location / {{\n   proxy_pass http://be;\n   proxy_http_version 1.1;\n\
                        proxy_set_header Upgrade $http_upgrade;\n   proxy_set_header Connection \"upgrade\";\n\
                        proxy_read_timeout 3600s;\n   proxy_send_timeout 3600s;\n   proxy_buffering off;\n  }}\n }}\n}}\n"
                ),
            )?;
            let child = pinned(1, &bin)
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(&dir.0)
                .stderr(quiet())
                .spawn()?;
            Proc {
                child,
                _dir: Some(dir),
            }
        }
        "haproxy" => {
            let Some(bin) = which("haproxy") else {
                return Ok(None);
            };
            let dir = tempdir("haproxy")?;
            let conf = dir.0.join("haproxy.cfg");
            std::fs::write(
                &conf,
                format!(
                    "global\n  nbthread 1\n  maxconn 9500\n\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  timeout tunnel 1h\n\
                     frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
                     backend be\n  server s1 127.0.0.1:{backend_port}\n"
                ),
            )?;
            let child = pinned(1, &bin)
                .arg("-f")
                .arg(&conf)
                .arg("-db")
                .stderr(quiet())
                .stdout(quiet())
                .spawn()?;
            Proc {
                child,
                _dir: Some(dir),
            }
        }
        _ => anyhow::bail!("unknown target {name}"),
    };
    wait_port(port).with_context(|| format!("{name} did not start"))?;
    Ok(Some(Target {
        name,
        addr: format!("127.0.0.1:{port}"),
        proc: Some(proc),
    }))
}

#[derive(Default, Clone)]
struct Cell {
    ops: u64,
    secs: f64,
    cpu: f64,
    p50: Vec<f64>,
    p99: Vec<f64>,
    errors: u64,
}

impl Cell {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }
    fn cpu_us_per_op(&self) -> Option<f64> {
        (self.cpu > 0.0 && self.ops > 0).then(|| self.cpu * 1e6 / self.ops as f64)
    }
    fn median(v: &[f64]) -> f64 {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    }
}

fn load(
    me: &Path,
    scenario: &str,
    addr: &str,
    extra: &[String],
) -> anyhow::Result<serde_json::Value> {
    let out = pinned(0, me)
        .args(["load", "--scenario", scenario, "--addr", addr])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "load client failed for {addr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("no result from load client")?;
    Ok(serde_json::from_str(line)?)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let all = ["direct", "tcp-relay", "tollgate", "nginx", "haproxy"];
    let wanted: Vec<&'static str> = match &args.only {
        Some(list) => all
            .iter()
            .copied()
            .filter(|t| list.split(',').any(|x| x.trim() == *t))
            .collect(),
        None => all.to_vec(),
    };
    let backend_port = free_port()?;
    let _backend = Proc {
        child: pinned(0, &me)
            .args(["backend", "--listen", &format!("127.0.0.1:{backend_port}")])
            .stdout(Stdio::null())
            .spawn()?,
        _dir: None,
    };
    wait_port(backend_port)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!("tollgate-bench: {cores} CPUs; proxies on CPU 1, load client and backend on CPU 0");

    // Memory per idle connection first, on freshly started proxies.
    let mut memory: Vec<(&str, Option<f64>)> = Vec::new();
    if args.idle_connections > 0 {
        for name in &wanted {
            if *name == "direct" {
                continue;
            }
            let Some(t) = start_target(name, backend_port, &args)? else {
                continue;
            };
            let pid = t.proc.as_ref().map(|p| p.child.id()).context("pid")?;
            std::thread::sleep(Duration::from_millis(300));
            let before = proc::rss_kb(pid);
            let mut child = pinned(0, &me)
                .args([
                    "load",
                    "--scenario",
                    "idle",
                    "--addr",
                    &t.addr,
                    "--connections",
                    &args.idle_connections.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
            let parts: Vec<&str> = line.split_whitespace().collect();
            let opened: u64 = parts.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            std::thread::sleep(Duration::from_secs(2));
            let after = proc::rss_kb(pid);
            if let Some(mut stdin) = child.stdin.take() {
                let _ = writeln!(stdin, "done");
            }
            let _ = child.wait();
            let per = (opened > 0)
                .then(|| (after.saturating_sub(before)) as f64 * 1024.0 / opened as f64 / 1000.0);
            eprintln!("  memory {name}: {opened} idle connections, RSS {before} -> {after} KiB");
            memory.push((name, per));
        }
    }

    let mut targets = Vec::new();
    for name in &wanted {
        match start_target(name, backend_port, &args)? {
            Some(t) => targets.push(t),
            None => eprintln!("  {name}: not installed, skipped"),
        }
    }
    let scenarios: Vec<(&str, &str, Vec<String>)> = vec![
        ("64 B", "throughput", vec!["--size".into(), "64".into()]),
        (
            "16 KiB",
            "throughput",
            vec!["--size".into(), "16384".into()],
        ),
        ("handshake", "handshakes", vec![]),
    ];
    let mut results: Vec<Vec<Cell>> = vec![vec![Cell::default(); scenarios.len()]; targets.len()];
    for (si, (label, scenario, extra)) in scenarios.iter().enumerate() {
        for round in 0..args.rounds {
            for k in 0..targets.len() {
                let ti = (k + round) % targets.len();
                let t = &targets[ti];
                let mut extra = extra.clone();
                extra.extend([
                    "--duration".into(),
                    args.duration.to_string(),
                    "--connections".into(),
                    args.connections.to_string(),
                    "--window".into(),
                    args.window.to_string(),
                ]);
                let pid = t.proc.as_ref().map(|p| p.child.id());
                let cpu0 = pid.map(proc::cpu_seconds).unwrap_or(0.0);
                let r = load(&me, scenario, &t.addr, &extra)?;
                let cpu1 = pid.map(proc::cpu_seconds).unwrap_or(0.0);
                let c = &mut results[ti][si];
                c.ops += r["ops"].as_u64().unwrap_or(0);
                c.secs += r["secs"].as_f64().unwrap_or(0.0);
                c.cpu += cpu1 - cpu0;
                c.p50.push(r["p50_us"].as_f64().unwrap_or(0.0));
                c.p99.push(r["p99_us"].as_f64().unwrap_or(0.0));
                c.errors += r["errors"].as_u64().unwrap_or(0);
                eprintln!(
                    "  {label:>9} round {round} {:>9}: {:>9.0}/s, proxy CPU {:.2}s",
                    t.name,
                    r["ops"].as_f64().unwrap_or(0.0) / r["secs"].as_f64().unwrap_or(1.0),
                    cpu1 - cpu0
                );
            }
        }
    }

    println!("\n| target | 64 B msg/s | 64 B p50 / p99 us | CPU per 64 B round trip | 16 KiB msg/s | 16 KiB p50 / p99 us | CPU per 16 KiB round trip | handshakes/s | handshake p50 / p99 us | CPU per handshake | RSS per idle connection |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (ti, t) in targets.iter().enumerate() {
        let cells = &results[ti];
        let cpu = |c: &Cell| {
            c.cpu_us_per_op()
                .map_or("-".to_owned(), |v| format!("{v:.1} us"))
        };
        let lat = |c: &Cell| format!("{:.0} / {:.0}", Cell::median(&c.p50), Cell::median(&c.p99));
        let mem = memory
            .iter()
            .find(|(n, _)| *n == t.name)
            .and_then(|(_, m)| *m)
            .map_or("-".to_owned(), |m| format!("{m:.1} KB"));
        let errs: u64 = cells.iter().map(|c| c.errors).sum();
        println!(
            "| {}{} | {:.0} | {} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {} |",
            t.name,
            if errs > 0 {
                format!(" ({errs} errors)")
            } else {
                String::new()
            },
            cells[0].rate(),
            lat(&cells[0]),
            cpu(&cells[0]),
            cells[1].rate(),
            lat(&cells[1]),
            cpu(&cells[1]),
            cells[2].rate(),
            lat(&cells[2]),
            cpu(&cells[2]),
            mem
        );
    }
    println!(
        "\n{} s per measurement, {} rounds, {} connections, window {}, {} idle connections; KB = 1000 bytes.",
        args.duration, args.rounds, args.connections, args.window, args.idle_connections
    );
    Ok(())
}
