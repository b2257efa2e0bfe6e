//! Shared harness for the end-to-end tests: starts the real `tollgate` binary on a manifest
//! written by the test, real backends on loopback, and real clients. The raw helpers speak
//! RFC 6455 byte for byte so tests can see exactly which frames cross the gateway.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use sha1::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod oidc;
pub mod plugins;
pub mod redis;
pub mod tls;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("tollgate-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `tollgate run` process with its captured (JSON) log lines.
pub struct Gateway {
    pub child: Child,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub dir: TempDir,
}

impl Gateway {
    /// Writes `manifest` (a complete TOML document; use port 0 for listeners) and starts the
    /// gateway on it, returning once every listener is bound.
    pub fn start(manifest: &str) -> Gateway {
        let dir = TempDir::new("gw");
        Self::start_in(dir, manifest)
    }

    pub fn start_in(dir: TempDir, manifest: &str) -> Gateway {
        Self::start_with_env(dir, manifest, &[])
    }

    /// Like [`Gateway::start_in`], with extra environment variables for the process (they
    /// win over the harness's own `RUST_LOG` and `XDG_CACHE_HOME`).
    pub fn start_with_env(dir: TempDir, manifest: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_with(dir, manifest, env, |_| {})
    }

    /// Like [`Gateway::start_with_env`], with `adjust` applied to the process's command before
    /// it starts (e.g. a resource limit set in `pre_exec`).
    pub fn start_with(
        dir: TempDir,
        manifest: &str,
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Gateway {
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, manifest).unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["run", "--manifest"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("XDG_CACHE_HOME", test_cache())
            // Last, so a test can override the two above.
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        adjust(&mut command);
        let mut child = command.spawn().expect("start tollgate");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(line.clone());
                    logs.lock().unwrap().push(line);
                }
            });
        }
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(format!("stderr: {line}"));
                }
            });
        }
        let wants_wss = manifest.contains("[gateway.tls]");
        let wants_ws = manifest
            .lines()
            .take_while(|l| {
                !l.trim_start().starts_with("[gateway.") && !l.trim_start().starts_with("[[")
            })
            .any(|l| l.trim_start().starts_with("listen"));
        let wants_admin = manifest.contains("[admin]");
        let (mut ws, mut wss, mut admin) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while (wants_ws && ws.is_none())
            || (wants_wss && wss.is_none())
            || (wants_admin && admin.is_none())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "gateway did not start; log:\n{}",
                        logs.lock().unwrap().join("\n")
                    );
                }
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["event"] == "listening" {
                let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
                match v["scheme"].as_str().unwrap() {
                    "ws" => ws = Some(addr),
                    "wss" => wss = Some(addr),
                    _ => admin = Some(addr),
                }
            }
        }
        Gateway {
            child,
            ws,
            wss,
            admin,
            logs,
            dir,
        }
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.ws.unwrap(), path)
    }

    /// Everything the gateway has logged so far, one line per record.
    pub fn output(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Parsed JSON log records, optionally only those with `event == event`.
    pub fn records(&self, event: &str) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    /// The error text of the first `policy_error` record of API `api` (waits for it).
    pub async fn policy_error(&self, api: &str) -> String {
        let rec = self.wait_record("policy_error", |r| r["api"] == api).await;
        rec["error"].as_str().unwrap_or_default().to_owned()
    }

    /// Waits until a record matching `pred` appears.
    pub async fn wait_record(
        &self,
        event: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.records(event).into_iter().find(|v| pred(v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "no `{event}` record as expected; log:\n{}",
                    self.logs.lock().unwrap().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// CPU time the gateway process has used (user + system), from /proc.
    pub fn cpu_time(&self) -> Duration {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces): utime is the 12th, stime 13th.
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        // Clock ticks are 100 per second on every Linux this runs on.
        Duration::from_millis((f[11] + f[12]) * 10)
    }

    pub fn rss_kb(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One compiled-plugin cache for every gateway the tests start (inside the workspace's target
/// directory, so nothing outside it is written), so each plugin is compiled once per run.
/// Connections that echo through the gateway without pause while a test does something else
/// to it (a fault, a reload): each sends a numbered message every 5 ms and checks the echo.
pub struct Echoers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    echoed: Arc<Vec<std::sync::atomic::AtomicU64>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Echoers {
    /// `n` connections to `path`, each already relaying when this returns.
    pub async fn start(addr: SocketAddr, path: &str, n: usize) -> Echoers {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let echoed: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let mut tasks = Vec::new();
        for i in 0..n {
            let (stop, echoed) = (stop.clone(), echoed.clone());
            let (_, mut ws) = ws_connect(addr, path, "").await;
            tasks.push(tokio::spawn(async move {
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("{i}:{k}");
                    ws.send(true, 1, msg.as_bytes()).await.expect("echo send");
                    let f = ws.read_frame().await.expect("echo read");
                    assert_eq!(f.payload, msg.as_bytes());
                    k += 1;
                    echoed[i].fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                ws.close(1000, "").await.unwrap();
            }));
        }
        let e = Echoers {
            stop,
            echoed,
            tasks,
        };
        e.wait_all_moved_since(&vec![0; n], "every echo connection relaying")
            .await;
        e
    }

    /// Messages echoed so far, per connection.
    pub fn counts(&self) -> Vec<u64> {
        self.echoed
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }

    /// Waits until every connection has echoed more than at `then`.
    pub async fn wait_all_moved_since(&self, then: &[u64], what: &str) {
        wait_until(what, || {
            self.counts().iter().zip(then).all(|(now, then)| now > then)
        })
        .await;
    }

    /// Checks that every connection still relays, then closes them all; any echo that failed
    /// along the way fails the test here.
    pub async fn still_relaying_then_stop(self) {
        let then = self.counts();
        self.wait_all_moved_since(&then, "every echo connection relaying after the faults")
            .await;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("an echo connection failed");
        }
    }
}

/// Waits for the gateway process to exit by itself, up to `within`.
pub async fn exit_status(gw: &mut Gateway, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gateway still running after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Held by the tests that need thousands of descriptors in this process (the reconnect storm,
/// the 2,000-connection leak check): every area shares one test binary, and two of them at
/// once could run out under a low `nofile` limit.
pub async fn descriptor_hungry() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Polls `done` every 10 ms until it holds, failing after a generous 30 s: tests wait for the
/// event they need (a count, a state), never for a fixed time that a loaded machine could miss.
pub async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn test_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("test-cache")
}

/// Writes `text` as `m.toml` in `dir` and runs `tollgate check` on it: (exit code, stderr,
/// manifest path).
pub fn tollgate_check(dir: &Path, text: &str) -> (i32, String, String) {
    tollgate_check_env(dir, text, &[], &[])
}

/// [`tollgate_check`] with environment variables `set` and `unset` (the subscription keys a
/// manifest reads from the environment).
pub fn tollgate_check_env(
    dir: &Path,
    text: &str,
    set: &[(&str, &str)],
    unset: &[&str],
) -> (i32, String, String) {
    let path = dir.join("m.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--manifest"])
        .arg(&path)
        .env("XDG_CACHE_HOME", test_cache())
        .envs(set.iter().copied());
    for name in unset {
        cmd.env_remove(name);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

/// `tollgate plugin inspect FILE`: (exit code, stdout, stderr).
pub fn inspect(file: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["plugin", "inspect"])
        .arg(file)
        .env("XDG_CACHE_HOME", test_cache())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `[gateway]` section for a plain listener on an ephemeral port.
/// A subscription key's SHA-256 as the manifest takes it (`*_key_sha256`): lower-case hex.
pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn gateway_section(extra: &str) -> String {
    format!("[gateway]\nname = \"test\"\nlisten = \"127.0.0.1:0\"\n{extra}\n")
}

pub fn api_section(name: &str, suffix: &str, backend: &str, extra: &str) -> String {
    format!("[[apis]]\nname = \"{name}\"\nurl_suffix = \"{suffix}\"\nbackend = \"{backend}\"\n{extra}\n")
}

// ------------------------------------------------------------------------------------------
// Raw WebSocket pieces.

pub fn accept_for(key: &str) -> String {
    let mut h = sha1::Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Reads an HTTP head (up to the blank line). Returns the head text and any bytes after it.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "eof in head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Header value from a head text, case-insensitive.
pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

pub fn headers_all(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
        .collect()
}

pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A frame as seen on the wire (payload unmasked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or(&[])).into_owned()
    }
}

pub fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    v.push((if fin { 0x80 } else { 0 }) | (rsv << 4) | opcode);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => v.push(m | n as u8),
        n if n < 65536 => {
            v.push(m | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(m | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            v.extend_from_slice(&k);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => v.extend_from_slice(payload),
    }
    v
}

pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// One side of a raw WebSocket: reads frames (with carry-over bytes) and writes frames.
pub struct RawWs<S> {
    pub io: S,
    pub buf: Vec<u8>,
    /// Client side masks what it sends.
    pub mask: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawWs<S> {
    pub fn new(io: S, carry: Vec<u8>, mask: bool) -> Self {
        RawWs {
            io,
            buf: carry,
            mask,
        }
    }

    async fn fill(&mut self, n: usize) -> std::io::Result<()> {
        let mut chunk = vec![0u8; 64 * 1024];
        while self.buf.len() < n {
            let r = self.io.read(&mut chunk).await?;
            if r == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "eof",
                ));
            }
            self.buf.extend_from_slice(&chunk[..r]);
        }
        Ok(())
    }

    pub async fn read_frame(&mut self) -> std::io::Result<Frame> {
        self.fill(2).await?;
        let b0 = self.buf[0];
        let b1 = self.buf[1];
        let masked = b1 & 0x80 != 0;
        let (len, mut hlen) = match b1 & 0x7f {
            126 => {
                self.fill(4).await?;
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                self.fill(10).await?;
                let mut a = [0u8; 8];
                a.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(a) as usize, 10)
            }
            n => (n as usize, 2),
        };
        let key = if masked {
            self.fill(hlen + 4).await?;
            let k = [
                self.buf[hlen],
                self.buf[hlen + 1],
                self.buf[hlen + 2],
                self.buf[hlen + 3],
            ];
            hlen += 4;
            Some(k)
        } else {
            None
        };
        self.fill(hlen + len).await?;
        let mut payload: Vec<u8> = self.buf[hlen..hlen + len].to_vec();
        self.buf.drain(..hlen + len);
        if let Some(k) = key {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= k[i % 4];
            }
        }
        Ok(Frame {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 7,
            opcode: b0 & 0xf,
            masked,
            payload,
        })
    }

    /// Reads frames until a close; returns it.
    pub async fn read_until_close(&mut self) -> std::io::Result<Frame> {
        loop {
            let f = self.read_frame().await?;
            if f.opcode == 8 {
                return Ok(f);
            }
        }
    }

    pub async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mask = if self.mask { Some(rand_mask()) } else { None };
        let f = encode_frame(fin, 0, opcode, payload, mask);
        self.io.write_all(&f).await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await
    }

    pub async fn close(&mut self, code: u16, reason: &str) -> std::io::Result<()> {
        self.send(true, 8, &close_payload(code, reason)).await
    }

    /// True if the peer closed the TCP connection (EOF or reset) within `within`.
    pub async fn expect_eof(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

pub fn rand_mask() -> [u8; 4] {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    n.to_le_bytes()
}

pub const TEST_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends a raw handshake request. `extra` is extra header lines, each ending in \r\n.
pub async fn raw_handshake(
    addr: SocketAddr,
    path: &str,
    extra: &str,
) -> (String, RawWs<TcpStream>) {
    let s = TcpStream::connect(addr).await.unwrap();
    handshake_on(s, &addr.to_string(), path, extra).await
}

/// [`raw_handshake`] over a stream the caller opened (e.g. TLS): the response head, and the
/// client side of the WebSocket with whatever arrived behind the head.
pub async fn handshake_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    host: &str,
    path: &str,
    extra: &str,
) -> (String, RawWs<S>) {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {TEST_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    let (head, carry) = read_head(&mut s).await.unwrap();
    (head, RawWs::new(s, carry, true))
}

/// Serves one WebSocket connection as a compliant echo server (tungstenite, default limits,
/// what `examples/echo-backend` does): text and binary come back, pings are answered, and
/// protocol errors end the connection the way tungstenite ends them.
pub async fn tungstenite_echo<S: AsyncRead + AsyncWrite + Unpin>(stream: S) {
    tungstenite_echo_as(stream, OnBadText::Drop).await
}

/// How an echo backend reacts to a text message that is not UTF-8 (RFC 6455 8.1 allows both:
/// fail the connection with 1007, or drop it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBadText {
    /// tungstenite's own behaviour: the TCP connection is dropped.
    Drop,
    /// A close 1007 is sent first, then the connection is closed.
    Close1007,
}

/// [`tungstenite_echo`], reacting to invalid UTF-8 as `on_bad_text` says.
pub async fn tungstenite_echo_as<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    on_bad_text: OnBadText,
) {
    use futures_util::{SinkExt, StreamExt};
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    loop {
        match ws.next().await {
            Some(Ok(m)) => {
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    return;
                }
            }
            Some(Err(tokio_tungstenite::tungstenite::Error::Utf8(_)))
                if on_bad_text == OnBadText::Close1007 =>
            {
                // Written raw: tungstenite's own state may refuse to send after a read error.
                let io = ws.get_mut();
                let _ = io.write_all(&[0x88, 0x02, 0x03, 0xef]).await;
                let _ = io.flush().await;
                let _ = io.shutdown().await;
                return;
            }
            _ => return,
        }
    }
}

/// A plain-ws [`tungstenite_echo`] backend on loopback.
pub async fn ws_echo_backend() -> SocketAddr {
    ws_echo_backend_as(OnBadText::Drop).await
}

/// A plain-ws [`tungstenite_echo_as`] backend on loopback.
pub async fn ws_echo_backend_as(on_bad_text: OnBadText) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(tungstenite_echo_as(s, on_bad_text));
        }
    });
    addr
}

/// Like [`raw_handshake`] but asserts the 101 and its accept value.
pub async fn ws_connect(addr: SocketAddr, path: &str, extra: &str) -> (String, RawWs<TcpStream>) {
    let (head, ws) = raw_handshake(addr, path, extra).await;
    assert_eq!(status_of(&head), 101, "handshake failed:\n{head}");
    assert_eq!(
        header(&head, "sec-websocket-accept").as_deref(),
        Some(accept_for(TEST_KEY).as_str())
    );
    (head, ws)
}

// ------------------------------------------------------------------------------------------
// Backends.

/// What a raw backend saw of one connection.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub heads: Vec<String>,
}

pub type Handler = Arc<
    dyn Fn(String, RawWs<TcpStream>) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync,
>;

/// A raw WebSocket backend: completes the handshake (choosing the first offered subprotocol),
/// records the request head, then runs `handler` with the socket.
pub struct RawBackend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl RawBackend {
    pub async fn start(handler: Handler) -> RawBackend {
        Self::start_with(handler, None).await
    }

    /// `response`: when set, answer every handshake with this raw HTTP response instead of a
    /// 101, then report any bytes that arrive afterwards through `seen`.
    pub async fn start_with(handler: Handler, response: Option<String>) -> RawBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (seen2, conns2) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                conns2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = seen2.clone();
                let handler = handler.clone();
                let response = response.clone();
                tokio::spawn(async move {
                    let Ok((head, carry)) = read_head(&mut s).await else {
                        return;
                    };
                    seen.lock().unwrap().heads.push(head.clone());
                    if let Some(resp) = response {
                        let _ = s.write_all(resp.as_bytes()).await;
                        let ws = RawWs::new(s, carry, false);
                        handler(head, ws).await;
                        return;
                    }
                    let key = header(&head, "sec-websocket-key").unwrap_or_default();
                    let mut resp = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                        accept_for(&key)
                    );
                    if let Some(p) = header(&head, "sec-websocket-protocol") {
                        let first = p.split(',').next().unwrap().trim().to_owned();
                        resp.push_str(&format!("Sec-WebSocket-Protocol: {first}\r\n"));
                    }
                    if let Some(e) = header(&head, "sec-websocket-extensions") {
                        if e.contains("permessage-deflate") {
                            resp.push_str("Sec-WebSocket-Extensions: permessage-deflate\r\n");
                        }
                    }
                    resp.push_str("\r\n");
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    handler(head, RawWs::new(s, carry, false)).await;
                });
            }
        });
        RawBackend {
            addr,
            seen,
            connections,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub fn last_head(&self) -> String {
        self.seen
            .lock()
            .unwrap()
            .heads
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

/// Echoes every frame back as it came (same fin/opcode/payload, unmasked), answers a close with
/// the same close, and returns.
pub fn echo_frames() -> Handler {
    Arc::new(|_head, mut ws| {
        Box::pin(async move {
            loop {
                let Ok(f) = ws.read_frame().await else { return };
                let out = encode_frame(f.fin, f.rsv, f.opcode, &f.payload, None);
                if ws.send_raw(&out).await.is_err() {
                    return;
                }
                if f.opcode == 8 {
                    return;
                }
            }
        })
    })
}

/// Sends every received frame into a channel (for tests that check what arrived).
pub fn record_frames(tx: tokio::sync::mpsc::UnboundedSender<Frame>) -> Handler {
    Arc::new(move |_head, mut ws| {
        let tx = tx.clone();
        Box::pin(async move {
            while let Ok(f) = ws.read_frame().await {
                let close = f.opcode == 8;
                let _ = tx.send(f.clone());
                if close {
                    let _ = ws
                        .send_raw(&encode_frame(true, 0, 8, &f.payload, None))
                        .await;
                    return;
                }
            }
        })
    })
}

// ------------------------------------------------------------------------------------------
// Admin listener.

/// A plain HTTP/1.1 GET (one request per connection): status, head and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("admin answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&all).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status_of(head), head.to_owned(), body.to_owned())
}

/// `/metrics`, parsed with a Prometheus text-format parser.
pub async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (status, head, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{head}\n{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the sample `name` whose labels are exactly `labels`; None if there is none.
pub fn sample(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| {
            s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => h.last().map_or(0.0, |b| b.count),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}
