//! `examples/fleet`, for real: its `run.sh` (with this build's `tollgate`, the example echo
//! backend and free loopback ports, nothing rebuilt) starts redis-server, the echo backend,
//! three gateways on copies of the example's manifest and HAProxy in front. Through HAProxy the
//! example's `try.py` and six racing WebSockets with the subscription's key each get exactly
//! `max_connections = 3` x 101 and 3 x 429, answered by all three gateways and counted in
//! Redis under the three gateway ids; SIGTERM to `run.sh` stops every process it started.
//! Needs Debian's `haproxy` and `redis-server` (scripts/test installs both) and `python3`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::support::*;

const KEY: &str = "fleet-example-test-key-0123456789";
/// The example manifest's subscription: its key name in Redis and its limit.
const SLOTS: &str = "tollgate:{tollgate}:slots:sub:4:demo/acme";
const LEASES: &str = "tollgate:{tollgate}:leases";
const LIMIT: usize = 3;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The command in `var` (default `default`) if it runs, else a failure naming the package.
fn require(var: &str, default: &str, package: &str) -> String {
    let bin = std::env::var(var).unwrap_or_else(|_| default.into());
    let runs = Command::new(&bin)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        runs,
        "`{bin}` is not installed: install Debian's {package} package (scripts/test does; or set {var})"
    );
    bin
}

/// The example echo backend, built once per test process into its own target directory (the
/// outer `cargo test` holds the workspace's).
fn echo_backend() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = repo().join("target").join("fleet-example");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(repo())
            .args(["build", "-p", "echo-backend", "--target-dir"])
            .arg(&target)
            .output()
            .unwrap_or_else(|e| panic!("cannot run cargo to build echo-backend: {e}"));
        assert!(
            out.status.success(),
            "building echo-backend failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("debug").join("echo-backend")
    })
}

/// `n` distinct free loopback ports (all held until every one is picked).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

fn alive(pid: u32) -> bool {
    // Gone, or a zombie waiting for its parent: not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with(|c| c != 'Z')))
        .unwrap_or(false)
}

fn signal(pid: u32, sig: i32) {
    // Never pid 0 (or what wraps to a negative pid): that would signal a whole process group.
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: a signal to a process this test started (run.sh) or that run.sh started and
    // printed the pid of.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// A running `examples/fleet/run.sh`; dropped, it and everything it printed the pid of are
/// stopped (SIGTERM to run.sh, then SIGKILL by pid for whatever is left).
struct Fleet {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    pids: Vec<u32>,
    port: u16,
    admins: Vec<u16>,
    redis: u16,
}

impl Fleet {
    fn start() -> Fleet {
        let haproxy = require("HAPROXY", "haproxy", "haproxy");
        let redis_server = require("REDIS_SERVER", "redis-server", "redis-server");
        let p = free_ports(9);
        let (port, gws, admins, redis, backend) = (p[0], &p[1..4], &p[4..7], p[7], p[8]);
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut child = Command::new("bash")
            .arg(repo().join("examples/fleet/run.sh"))
            .env("TOLLGATE_BIN", BIN)
            .env("ECHO_BACKEND_BIN", echo_backend())
            .env("HAPROXY", haproxy)
            .env("REDIS_SERVER", redis_server)
            .env("FLEET_PORT", port.to_string())
            .env("FLEET_GATEWAY_PORTS", list(gws))
            .env("FLEET_ADMIN_PORTS", list(admins))
            .env("FLEET_REDIS_PORT", redis.to_string())
            .env("FLEET_BACKEND_PORT", backend.to_string())
            .env("FLEET_KEY", KEY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run bash examples/fleet/run.sh: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for (stream, tag) in [
            (
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                "",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
                "stderr: ",
            ),
        ] {
            let Some(stream) = stream else { continue };
            let (lines, tx) = (lines.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(format!("{tag}{line}"));
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let mut fleet = Fleet {
            child,
            lines,
            pids: Vec::new(),
            port,
            admins: admins.to_vec(),
            redis,
        };
        // run.sh waits for each process to be ready, then prints their pids.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(pids) = line.strip_prefix("pids: ") {
                        fleet.pids = pids.split(' ').filter_map(|p| p.parse().ok()).collect();
                        assert_eq!(fleet.pids.len(), 6, "{}", fleet.output());
                        return fleet;
                    }
                }
                Err(_) => panic!(
                    "run.sh did not report a ready fleet (exited, or not within 90 s):\n{}",
                    fleet.output()
                ),
            }
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn haproxy(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn admin(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admins[i]))
    }

    /// SIGTERM to run.sh: it exits within 30 s, saying so, and leaves nothing running.
    async fn stop(mut self) {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(
                Instant::now() < deadline,
                "run.sh still running 30 s after SIGTERM:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Its last lines may still be in the pipe.
        wait_until("run.sh's last line", || {
            self.output().contains("fleet stopped")
        })
        .await;
        let left: Vec<_> = self.pids.iter().copied().filter(|p| alive(*p)).collect();
        assert!(
            left.is_empty(),
            "still running after run.sh stopped: {left:?}\n{}",
            self.output()
        );
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in &self.pids {
            if alive(*pid) {
                signal(*pid, libc::SIGKILL);
            }
        }
    }
}

/// Each gateway's handshakes on API echo answered so far, by status.
async fn answered(fleet: &Fleet) -> Vec<HashMap<String, f64>> {
    let mut all = Vec::new();
    for i in 0..3 {
        let s = scrape(fleet.admin(i)).await;
        let mut by_status = HashMap::new();
        for m in s.samples.iter().filter(|m| {
            m.metric == "tollgate_handshakes_total" && m.labels.get("api") == Some("echo")
        }) {
            // prometheus-client declares `# TYPE tollgate_handshakes counter`: the `_total`
            // samples parse as untyped.
            if let prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) =
                m.value
            {
                let status = m.labels.get("status").unwrap_or("?").to_owned();
                *by_status.entry(status).or_insert(0.0) += v;
            }
        }
        all.push(by_status);
    }
    all
}

async fn hgetall(fleet: &Fleet, key: &str) -> HashMap<String, i64> {
    let url = format!("redis://127.0.0.1:{}", fleet.redis);
    let client = ::redis::Client::open(url.as_str()).expect("a redis URL");
    let mut con = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("redis answers within 5 s")
    .expect("connect to the fleet's redis");
    ::redis::cmd("HGETALL")
        .arg(key)
        .query_async(&mut con)
        .await
        .expect("HGETALL")
}

/// The subscription's slots Redis counts now, over every gateway.
async fn slots_held(fleet: &Fleet) -> i64 {
    hgetall(fleet, SLOTS).await.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_example_holds_its_subscription_limit_across_three_gateways_behind_haproxy() {
    let fleet = Fleet::start();

    // 1. The README's "try it": try.py, six connections one after another.
    let mut try_py = Command::new("python3")
        .arg(repo().join("examples/fleet/try.py"))
        .env("FLEET_PORT", fleet.port.to_string())
        .env(
            "FLEET_ADMIN_PORTS",
            fleet
                .admins
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(" "),
        )
        .env("FLEET_KEY", KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 examples/fleet/try.py: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while try_py.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = try_py.kill();
            let _ = try_py.wait();
            panic!("try.py still running after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = try_py.wait_with_output().expect("try.py's output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("summary: 3 x 101, 3 x 429"),
        "try.py:\n{text}\n{}\nfleet:\n{}",
        String::from_utf8_lossy(&out.stderr),
        fleet.output()
    );
    for gw in ["fleet-1", "fleet-2", "fleet-3"] {
        assert!(
            text.contains(&format!("from {gw}")),
            "round robin: every gateway answers one of six; try.py:\n{text}"
        );
    }
    // try.py closed its connections: Redis gives the slots back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while slots_held(&fleet).await != 0 {
        assert!(
            Instant::now() < deadline,
            "try.py's slots still held in Redis after it closed its connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 2. Six WebSockets racing through HAProxy: exactly the limit gets in.
    let before = answered(&fleet).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let addr = fleet.haproxy();
        tasks.push(tokio::spawn(async move {
            let (head, ws) = tokio::time::timeout(
                Duration::from_secs(10),
                raw_handshake(
                    addr,
                    "/echo",
                    &format!("Ocp-Apim-Subscription-Key: {KEY}\r\n"),
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("handshake {i} through HAProxy: no answer within 10 s"));
            (head, ws)
        }));
    }
    let (mut held, mut refused) = (Vec::new(), Vec::new());
    for t in tasks {
        let (head, ws) = t.await.expect("a handshake task");
        match status_of(&head) {
            101 => held.push(ws),
            429 => refused.push(head),
            _ => panic!("neither 101 nor 429:\n{head}\nfleet:\n{}", fleet.output()),
        }
    }
    assert_eq!(
        (held.len(), refused.len()),
        (LIMIT, 6 - LIMIT),
        "max_connections = 3 across the fleet"
    );
    for head in &refused {
        assert_eq!(header(head, "retry-after").as_deref(), Some("5"), "{head}");
    }
    for (i, ws) in held.iter_mut().enumerate() {
        let msg = format!("hello {i}");
        ws.send(true, 1, msg.as_bytes()).await.expect("send");
        let f = tokio::time::timeout(Duration::from_secs(10), ws.read_frame())
            .await
            .expect("an echo within 10 s")
            .expect("read the echo");
        assert_eq!(
            f.payload,
            msg.as_bytes(),
            "echoed through HAProxy and a gateway"
        );
    }

    // HAProxy spread them: every gateway answered some (round robin: two each); each gateway's
    // /apis counts only its own, together the limit.
    let after = answered(&fleet).await;
    let per_gateway: Vec<f64> = (0..3)
        .map(|g| after[g].values().sum::<f64>() - before[g].values().sum::<f64>())
        .collect();
    assert_eq!(per_gateway.iter().sum::<f64>(), 6.0, "{per_gateway:?}");
    assert!(
        per_gateway.iter().all(|n| *n >= 1.0),
        "every gateway answered some: {per_gateway:?}"
    );
    let mut local = 0;
    for i in 0..3 {
        let (status, _, body) = http_get(fleet.admin(i), "/apis").await;
        assert_eq!(status, 200, "{body}");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("/apis is JSON");
        assert_eq!(doc["gateway"], format!("fleet-{}", i + 1));
        local += doc["products"][0]["subscriptions"][0]["active_connections"]
            .as_u64()
            .unwrap_or_else(|| panic!("no subscription count in /apis: {doc}"));
    }
    assert_eq!(
        local, LIMIT as u64,
        "the gateways' own counts add up to the limit"
    );

    // Redis, as the README shows it: one lease per gateway id, the slots they hold.
    let leases = hgetall(&fleet, LEASES).await;
    let mut ids: Vec<_> = leases
        .keys()
        .map(|k| k.split('~').next().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["fleet-1", "fleet-2", "fleet-3"], "{leases:?}");
    assert_eq!(slots_held(&fleet).await, LIMIT as i64);

    for mut ws in held {
        let _ = ws.close(1000, "").await;
    }
    fleet.stop().await;
}
