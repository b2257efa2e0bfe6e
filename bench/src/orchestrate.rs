//! Starts the backend, the proxies and the load client as pinned processes, runs every
//! scenario against every target (alternating the order between rounds), and prints a Markdown
//! report with each proxy's own CPU time per round trip and per handshake.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::fleet;
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
    /// Handshakes held in flight at the backend for the pending-memory scenario (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub pending_handshakes: usize,
    /// Comma-separated subset of:
    /// direct,tcp-relay,tollgate,tollgate-baseline,tollgate-msglimits,tollgate-msgpolicy,
    /// tollgate-limits,tollgate-fleet,
    /// tollgate-policies,tollgate-pooled,tollgate-policies-nocache,tollgate-pooled-nocache,
    /// tollgate-py,tollgate-js,nginx,haproxy,haproxy-jwt
    /// (tollgate-limits and tollgate-fleet: see --fleet; naming one here asks for them too).
    /// tollgate-msglimits is `tollgate` with message rates in both directions far above what
    /// the load sends: what checking them costs per message. tollgate-msgpolicy is `tollgate`
    /// with a pooled pass-through message policy on both directions (tests/plugins/message-test
    /// with `pass = true`: every message held whole, judged by a wasm call, forwarded as it
    /// came); it needs `cargo build --release --target wasm32-wasip2 -p message-test`.
    /// haproxy-jwt (HAProxy's jwt_verify, RS256, + X-User from `sub`) and the -nocache
    /// targets (jwt-validate + set-header with signature_cache_entries = 0) are measured in
    /// the handshake scenario only: their relay is that of haproxy / tollgate-policies /
    /// tollgate-pooled.
    #[arg(long)]
    pub only: Option<String>,
    /// Path of the tollgate binary (default: target/release/tollgate next to this binary).
    #[arg(long)]
    pub tollgate: Option<PathBuf>,
    /// A second tollgate binary (e.g. built from an older commit), run as target
    /// `tollgate-baseline` with the same manifest as `tollgate`, alternating with it in every
    /// round: the way to measure a change's cost side by side on a noisy machine.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Directory holding jwt_validate.wasm and set_header.wasm for `tollgate-policies`
    /// (default: target/wasm32-wasip2/release, as built by
    /// `cargo build --release --target wasm32-wasip2 -p jwt-validate -p set-header`).
    #[arg(long)]
    pub plugins: Option<PathBuf>,
    /// Directory holding origin_check.wasm (Python, componentize-py) and tenant_route.wasm
    /// (JavaScript, componentize-js) for `tollgate-py` / `tollgate-js` (default:
    /// target/wasm-plugins, where `./scripts/test` builds them).
    #[arg(long)]
    pub lang_plugins: Option<PathBuf>,
    /// Only the handshake scenario (and the chain timings): the throughput columns stay empty.
    #[arg(long)]
    pub handshakes_only: bool,
    /// Adds `tollgate-limits` (a subscription with `max_connections = 100000`, counted in the
    /// process) and `tollgate-fleet` (the same counted in a Redis store: `[cluster]`, with a
    /// `redis-server` this tool starts on CPU 0; skipped when redis-server is not installed),
    /// reports the Redis calls per handshake and the fleet/limits ratio. Every target of such
    /// a run sends the subscription key. Off by default: the default run does not change.
    #[arg(long)]
    pub fleet: bool,
    /// The redis-server binary for `tollgate-fleet` (default: redis-server in /usr/bin and
    /// the like; redis-cli is taken from beside it or from there).
    #[arg(long)]
    pub redis_server: Option<PathBuf>,
    /// CPU the redis-server of `tollgate-fleet` is pinned to. 0 (default) keeps it off the
    /// proxy's CPU, but it then takes CPU time from the load client, so the fleet target runs
    /// at a lower handshake rate than the others; 1 (the proxy's CPU; its CPU time is still
    /// not counted as the proxy's) is a diagnostic for that effect.
    #[arg(long, default_value_t = 0)]
    pub redis_cpu: u32,
}

impl Default for RunArgs {
    fn default() -> Self {
        RunArgs {
            duration: 5.0,
            rounds: 2,
            connections: 50,
            window: 16,
            idle_connections: 8000,
            pending_handshakes: 1000,
            only: None,
            tollgate: None,
            baseline: None,
            plugins: None,
            lang_plugins: None,
            handshakes_only: false,
            fleet: false,
            redis_server: None,
            redis_cpu: 0,
        }
    }
}

/// A process we started; killed (by pid, only ours) on drop.
pub(crate) struct Proc {
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

impl Proc {
    pub(crate) fn spawn(cmd: &mut Command) -> anyhow::Result<Proc> {
        Ok(Proc {
            child: cmd.spawn()?,
            _dir: None,
        })
    }

    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }
}

pub(crate) struct TempDir(PathBuf);
impl TempDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Target {
    name: &'static str,
    addr: String,
    proc: Option<Proc>,
    /// Request headers the load client sends on every handshake (`Name: value`).
    headers: Vec<String>,
}

/// What `tollgate-policies` needs that the other targets do not: an RS256 key pair made for
/// this run, its public half as an inline JWKS for jwt-validate, and a token signed with it.
pub struct Jwt {
    jwks: String,
    token: String,
    n: Vec<u8>,
    e: Vec<u8>,
    /// The public key as PEM (SubjectPublicKeyInfo), for HAProxy's `jwt_verify`.
    public_pem: String,
}

impl Jwt {
    /// The token signed with this run's key (subject `bench-user`, valid for a day).
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The run's token with another subject in its payload and the original signature: what
    /// every target that verifies the token must refuse (401).
    pub(crate) fn forged(&self) -> anyhow::Result<String> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts = self.token.split('.');
        let (Some(header), Some(claims), Some(sig)) = (parts.next(), parts.next(), parts.next())
        else {
            anyhow::bail!("token");
        };
        let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(claims)?)?;
        claims["sub"] = "intruder".into();
        Ok(format!(
            "{header}.{}.{sig}",
            b64.encode(claims.to_string().as_bytes())
        ))
    }

    pub(crate) fn new() -> anyhow::Result<Jwt> {
        use base64::Engine;
        use rsa::pkcs8::EncodePublicKey;
        use rsa::signature::{SignatureEncoding, Signer};
        use rsa::traits::PublicKeyParts;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)?;
        let public = key.to_public_key();
        let public_pem = public.to_public_key_pem(rsa::pkcs8::LineEnding::LF)?;
        let jwks = serde_json::json!({"keys": [{"kty": "RSA", "kid": "bench", "alg": "RS256",
            "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())}]})
        .to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let header = serde_json::json!({"alg": "RS256", "kid": "bench", "typ": "JWT"});
        // `tenant` is read by the JavaScript tenant-route of `tollgate-js`.
        let claims = serde_json::json!({"sub": "bench-user", "iss": "https://issuer.bench",
            "aud": "echo", "exp": now + 86_400, "nbf": now - 60, "tenant": "acme"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = rsa::pkcs1v15::SigningKey::<rsa::sha2::Sha256>::new(key).sign(input.as_bytes());
        Ok(Jwt {
            jwks,
            token: format!("{input}.{}", b64(&sig.to_vec())),
            n: public.n().to_bytes_be(),
            e: public.e().to_bytes_be(),
            public_pem,
        })
    }

    /// p50/p99 of the host's native RS256 check of this token (what `signatures.verify` costs
    /// a policy before any wasm is involved), in microseconds.
    fn native_verify(&self, n: usize) -> anyhow::Result<(f64, f64)> {
        use base64::Engine;
        let (input, sig) = self.token.rsplit_once('.').context("token")?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig)?;
        let key = tollgate_verify::Key::Rsa {
            n: self.n.clone(),
            e: self.e.clone(),
        };
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let ok = tollgate_verify::verify(
                tollgate_verify::Algorithm::Rs256,
                &key,
                input.as_bytes(),
                &sig,
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            v.push(t.elapsed().as_secs_f64() * 1e6);
            anyhow::ensure!(ok, "the bench token does not verify");
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Ok((v[v.len() / 2], v[(v.len() - 1) * 99 / 100]))
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pinned(cpu: u32, program: &Path) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c").arg(cpu.to_string()).arg(program);
    c
}

/// Waits for a listener. A Tollgate target compiles its plugins on first start (an 18 MB
/// Python component takes well over a minute on the one CPU it is pinned to), hence `secs`.
pub(crate) fn wait_port(port: u16, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
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

pub(crate) fn which(name: &str) -> Option<PathBuf> {
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
    jwt: &Jwt,
    cache: &Path,
    redis: Option<&fleet::Redis>,
) -> anyhow::Result<Option<Target>> {
    let me = std::env::current_exe()?;
    let port = free_port()?;
    let quiet = || Stdio::null();
    // Every target gets the same request, token and Origin included, so that only the policies
    // differ between the tollgate targets (a bigger request costs every party more); in a
    // fleet run, the subscription key too.
    let mut headers = vec![
        format!("Authorization: Bearer {}", jwt.token),
        format!("Origin: {BENCH_ORIGIN}"),
    ];
    if fleet::wanted(args) {
        headers.push(fleet::key_header());
    }
    let proc = match name {
        "direct" => {
            return Ok(Some(Target {
                name,
                addr: format!("127.0.0.1:{backend_port}"),
                proc: None,
                headers,
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
        "tollgate"
        | "tollgate-baseline"
        | "tollgate-msglimits"
        | "tollgate-msgpolicy"
        | "tollgate-limits"
        | "tollgate-fleet"
        | "tollgate-policies"
        | "tollgate-pooled"
        | "tollgate-policies-nocache"
        | "tollgate-pooled-nocache"
        | "tollgate-py"
        | "tollgate-js" => {
            if let Some(file) = lang_plugin(name) {
                let p = lang_dir(args)?.join(file);
                if !p.exists() {
                    eprintln!(
                        "  {name}: {} not found (./scripts/test builds it); skipped",
                        p.display()
                    );
                    return Ok(None);
                }
            }
            let bin = match (name, &args.tollgate, &args.baseline) {
                ("tollgate-baseline", _, Some(p)) => p.clone(),
                ("tollgate-baseline", _, None) => return Ok(None),
                (_, Some(p), _) => p.clone(),
                _ => me.parent().context("exe dir")?.join("tollgate"),
            };
            anyhow::ensure!(
                bin.exists(),
                "{} not found: build it with `cargo build --release -p tollgate`",
                bin.display()
            );
            let (dir, manifest) = tollgate_dir(name, port, backend_port, args, jwt)?;
            if name == "tollgate-fleet" {
                let Some(redis) = redis else {
                    eprintln!("  {name}: redis-server (and redis-cli) not found; skipped");
                    return Ok(None);
                };
                // A fresh store for a fresh gateway (see `Redis::flush`).
                redis.flush()?;
                let text = std::fs::read_to_string(&manifest)?;
                std::fs::write(&manifest, fleet::cluster_manifest(&text, &redis.url()))?;
            }
            let child = pinned(1, &bin)
                .args(["run", "--manifest"])
                .arg(&manifest)
                .env("RUST_LOG", "warn")
                .env("XDG_CACHE_HOME", cache)
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
        "haproxy" | "haproxy-jwt" => {
            let Some(bin) = which("haproxy") else {
                return Ok(None);
            };
            let dir = tempdir(name)?;
            let conf = dir.0.join("haproxy.cfg");
            let jwt_rules = if name == "haproxy-jwt" {
                let pem = dir.0.join("pub.pem");
                std::fs::write(&pem, &jwt.public_pem)?;
                haproxy_jwt_rules(&pem)
            } else {
                String::new()
            };
            std::fs::write(
                &conf,
                format!(
                    "global\n  nbthread 1\n  maxconn 9500\n\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  timeout tunnel 1h\n\
                     frontend fe\n  bind 127.0.0.1:{port}\n{jwt_rules}  default_backend be\n\
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
    let secs = if name.starts_with("tollgate") {
        600
    } else {
        20
    };
    wait_port(port, secs).with_context(|| format!("{name} did not start"))?;
    let addr = format!("127.0.0.1:{port}");
    if verifies_token(name) {
        check_verifies(&addr, jwt).with_context(|| format!("{name} does not verify the token"))?;
    }
    Ok(Some(Target {
        name,
        addr,
        proc: Some(proc),
        headers,
    }))
}

/// The frontend rules of `haproxy-jwt` (HAProxy 2.6's converters): the bearer token's
/// signature checked with RS256 against the run's public key (`pem`) on every request, 401
/// unless `jwt_verify` answers 1 (it answers 0 or a negative error code otherwise), then
/// `X-User` from the `sub` claim. The algorithm is pinned to RS256, as `algorithms` pins it
/// for jwt-validate: an HS256 token would otherwise be checked with the path as its secret.
/// Claims (iss, aud, exp, nbf) are not checked: HAProxy's converter does not, and the issue's
/// anchor (106 us vs 98 us) is this configuration.
fn haproxy_jwt_rules(pem: &Path) -> String {
    format!(
        "  http-request set-var(txn.bearer) http_auth_bearer\n\
         \x20 http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')\n\
         \x20 http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }} {{ var(txn.bearer),jwt_verify(txn.alg,\"{}\") -m int 1 }}\n\
         \x20 http-request set-header X-User %[var(txn.bearer),jwt_payload_query('$.sub')]\n",
        pem.display()
    )
}

/// Targets whose policies verify the run's token: checked at start-up (`check_verifies`).
fn verifies_token(name: &str) -> bool {
    matches!(
        name,
        "haproxy-jwt"
            | "tollgate-policies"
            | "tollgate-pooled"
            | "tollgate-policies-nocache"
            | "tollgate-pooled-nocache"
    )
}

/// Targets measured in the handshake scenario alone: their relay is their sibling's
/// (`haproxy`, `tollgate-policies`, `tollgate-pooled`); only the handshake differs. Keeps the
/// default run short (about 10 s per target instead of a minute).
fn handshake_only(name: &str) -> bool {
    name == "haproxy-jwt" || name.ends_with("-nocache")
}

/// The status line a target answers to a handshake with `headers` (`Name: value` each).
fn status_line(addr: &str, headers: &[String]) -> anyhow::Result<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "GET /echo HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nOrigin: {BENCH_ORIGIN}\r\n",
        crate::wire::KEY
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "closed before a status line");
        head.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    Ok(head.lines().next().unwrap_or_default().to_owned())
}

/// The run's token is let through (101), a forged one (payload changed, signature kept) and
/// none at all are refused with 401: the target really checks the signature.
fn check_verifies(addr: &str, jwt: &Jwt) -> anyhow::Result<()> {
    for (what, headers, want) in [
        (
            "the run's token",
            vec![format!("Authorization: Bearer {}", jwt.token)],
            "HTTP/1.1 101",
        ),
        (
            "a forged token",
            vec![format!("Authorization: Bearer {}", jwt.forged()?)],
            "HTTP/1.1 401",
        ),
        ("no token", vec![], "HTTP/1.1 401"),
    ] {
        let got = status_line(addr, &headers)?;
        anyhow::ensure!(
            got.starts_with(want),
            "{what}: expected {want}, got {got:?}"
        );
    }
    Ok(())
}

/// Origin header every target gets (the Python origin check allows it).
const BENCH_ORIGIN: &str = "https://app.example.com";

/// The Python or JavaScript plugin file a target needs, if any.
fn lang_plugin(name: &str) -> Option<&'static str> {
    match name {
        "tollgate-py" => Some("origin_check.wasm"),
        "tollgate-js" => Some("tenant_route.wasm"),
        _ => None,
    }
}

/// The `target/` directory this binary was built into.
fn target_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("exe dir")?
        .to_owned())
}

/// Where the first-party Rust plugins are.
fn rust_dir(args: &RunArgs) -> anyhow::Result<PathBuf> {
    match &args.plugins {
        Some(p) => Ok(p.clone()),
        None => Ok(target_dir()?.join("wasm32-wasip2").join("release")),
    }
}

/// Where the Python and JavaScript example plugins are.
fn lang_dir(args: &RunArgs) -> anyhow::Result<PathBuf> {
    match &args.lang_plugins {
        Some(p) => Ok(p.clone()),
        None => Ok(target_dir()?.join("wasm-plugins")),
    }
}

/// Writes the manifest (and, with policies, the plugin directory) of a Tollgate target: one
/// API, `echo`; `tollgate-policies` adds jwt-validate (RS256, inline JWKS) and set-header
/// (`X-User` from the token's `sub`) on its onHandshake, each in a fresh instance per
/// handshake; `tollgate-pooled` is the same with `instances = "pooled"`; their `-nocache`
/// variants add `signature_cache_entries = 0`. `tollgate-limits` and
/// `tollgate-fleet` have no policy but the API in a product whose subscription has a
/// `max_connections` (`[cluster]` is added by `start_target`). `tollgate-py` has
/// the Python origin-check alone; `tollgate-js` has jwt-validate then the JavaScript
/// tenant-route (tenant claim + default region); both pooled, the strategy their READMEs
/// recommend for interpreter-based plugins.
pub(crate) fn tollgate_dir(
    name: &str,
    port: u16,
    backend_port: u16,
    args: &RunArgs,
    jwt: &Jwt,
) -> anyhow::Result<(TempDir, PathBuf)> {
    let dir = tempdir(name)?;
    let manifest = dir.0.join("tollgate.toml");
    let (products, api_products) = if fleet::has_subscription(name) {
        (fleet::products_section(), fleet::API_PRODUCTS)
    } else {
        (String::new(), "")
    };
    // `-nocache`: every handshake verifies its signature, as HAProxy's `jwt_verify` does.
    let cache_entries = if name.ends_with("-nocache") {
        "signature_cache_entries = 0\n"
    } else {
        ""
    };
    let mut text = format!(
        "[gateway]\n{cache_entries}name = \"bench\"\nlisten = \"127.0.0.1:{port}\"\nplugin_dir = \"plugins\"\n\
         [gateway.limits]\nmax_connections = 20000\n{products}\
         [[apis]]\nname = \"echo\"\nurl_suffix = \"echo\"\nbackend = \"ws://127.0.0.1:{backend_port}/\"\n{api_products}"
    );
    let plugins = dir.0.join("plugins");
    std::fs::create_dir_all(&plugins)?;
    // `-fresh` variants of the Python/JavaScript targets exist only for the chain timings.
    let base = name.trim_end_matches("-fresh").trim_end_matches("-nocache");
    let instances = if base == "tollgate-policies" || name.ends_with("-fresh") {
        ""
    } else {
        "instances = \"pooled\"\n"
    };
    let jwt_validate = format!(
        "[[apis.on_handshake]]\nplugin = \"jwt-validate\"\n{instances}\
         [apis.on_handshake.config]\nalgorithms = [\"RS256\"]\nissuers = [\"https://issuer.bench\"]\n\
         audiences = [\"echo\"]\njwks = {}\n",
        serde_json::to_string(&jwt.jwks)?
    );
    let rust = |files: &[&str]| -> anyhow::Result<()> {
        let from = rust_dir(args)?;
        for f in files {
            std::fs::copy(from.join(f), plugins.join(f)).with_context(|| {
                format!(
                    "{} not found: build it with `cargo build --release --target wasm32-wasip2 -p jwt-validate -p set-header -p message-test`",
                    from.join(f).display()
                )
            })?;
        }
        Ok(())
    };
    match (base, lang_plugin(base)) {
        ("tollgate" | "tollgate-baseline" | "tollgate-limits" | "tollgate-fleet", _) => {}
        ("tollgate-msglimits", _) => text.push_str(
            "[[apis.message_limits]]\ndirection = \"both\"\nmax_messages_per_second = 100000000\n\
             max_bytes_per_second = 100000000000\n",
        ),
        ("tollgate-msgpolicy", _) => {
            rust(&["message_test.wasm"])?;
            text.push_str(
                "[[apis.on_message]]\nplugin = \"message-test\"\ninstances = \"pooled\"\n\
                 config = { pass = true }\n",
            );
        }
        ("tollgate-py", Some(file)) => {
            std::fs::copy(lang_dir(args)?.join(file), plugins.join(file))?;
            text.push_str(&format!(
                "[[apis.on_handshake]]\nplugin = \"origin-check\"\n{instances}\
                 [apis.on_handshake.config]\nallowed_origins = [\"{BENCH_ORIGIN}\"]\n"
            ));
        }
        ("tollgate-js", Some(file)) => {
            std::fs::copy(lang_dir(args)?.join(file), plugins.join(file))?;
            rust(&["jwt_validate.wasm"])?;
            text.push_str(&jwt_validate);
            text.push_str(&format!(
                "[[apis.on_handshake]]\nplugin = \"tenant-route\"\n{instances}\
                 [apis.on_handshake.config]\nregions = [\"eu\", \"us\"]\ndefault_region = \"eu\"\n"
            ));
        }
        _ => {
            rust(&["jwt_validate.wasm", "set_header.wasm"])?;
            text.push_str(&jwt_validate);
            text.push_str(&format!(
                "[[apis.on_handshake]]\nplugin = \"set-header\"\n{instances}\
                 config = {{ name = \"X-User\", value = \"{{jwt.sub}}\", exists_action = \"override\" }}\n"
            ));
        }
    }
    std::fs::write(&manifest, text)?;
    Ok((dir, manifest))
}

/// The policy chain's own time, from the `chain` sub-command pinned where the proxies run:
/// fresh instances, then pooled ones, then the native signature check alone; then, when
/// `tollgate-py` / `tollgate-js` are wanted, their chains pooled and fresh.
fn chain_timings(
    me: &Path,
    args: &RunArgs,
    jwt: &Jwt,
    cache: &Path,
    wanted: &[&str],
) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let mut v = Vec::new();
    let mut runs: Vec<(&str, String)> = Vec::new();
    if wanted.contains(&"tollgate-policies") {
        for (name, label) in [
            ("tollgate-policies", "Rust, fresh"),
            ("tollgate-pooled", "Rust, pooled"),
            (
                "tollgate-policies-nocache",
                "Rust, fresh, signature cache off",
            ),
            (
                "tollgate-pooled-nocache",
                "Rust, pooled, signature cache off",
            ),
        ] {
            runs.push((name, label.to_owned()));
        }
    }
    for (target, fresh, lang) in [
        ("tollgate-py", "tollgate-py-fresh", "Python"),
        ("tollgate-js", "tollgate-js-fresh", "JavaScript"),
    ] {
        let built = lang_plugin(target)
            .is_some_and(|f| lang_dir(args).map(|d| d.join(f).exists()).unwrap_or(false));
        if wanted.contains(&target) && built {
            runs.push((target, format!("{lang}, pooled")));
            runs.push((fresh, format!("{lang}, fresh")));
        }
    }
    for (name, label) in runs {
        let (_dir, manifest) = tollgate_dir(name, 0, 1, args, jwt)?;
        // An interpreter started per handshake costs milliseconds: fewer iterations.
        let iterations = if name.ends_with("-fresh") {
            2_000
        } else {
            20_000
        };
        let out = pinned(1, me)
            .arg("chain")
            .arg("--manifest")
            .arg(&manifest)
            .arg("--iterations")
            .arg(iterations.to_string())
            .arg("--header")
            .arg(format!("Authorization: Bearer {}", jwt.token))
            .arg("--header")
            .arg(format!("Origin: {BENCH_ORIGIN}"))
            .env("XDG_CACHE_HOME", cache)
            .stderr(Stdio::inherit())
            .output()?;
        anyhow::ensure!(out.status.success(), "chain measurement failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let j: serde_json::Value = serde_json::from_str(line)?;
            v.push((
                format!("{label}: {}", j["what"].as_str().unwrap_or("")),
                j["p50_us"].as_f64().unwrap_or(0.0),
                j["p99_us"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    if wanted.contains(&"tollgate-policies") {
        let (p50, p99) = jwt.native_verify(20_000)?;
        v.push(("native RS256 verify alone (no wasm)".into(), p50, p99));
    }
    Ok(v)
}

#[derive(Default, Clone)]
struct Cell {
    ops: u64,
    secs: f64,
    cpu: f64,
    p50: Vec<f64>,
    p99: Vec<f64>,
    errors: u64,
    /// Per round: operations and the proxy's CPU seconds.
    rounds: Vec<(u64, f64)>,
}

impl Cell {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }
    fn cpu_us_per_op(&self) -> Option<f64> {
        (self.cpu > 0.0 && self.ops > 0).then(|| self.cpu * 1e6 / self.ops as f64)
    }
    /// CPU microseconds per operation, round by round.
    fn per_round(&self) -> Vec<f64> {
        self.rounds
            .iter()
            .map(|(ops, cpu)| {
                if *ops > 0 {
                    cpu * 1e6 / *ops as f64
                } else {
                    0.0
                }
            })
            .collect()
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
    t: &Target,
    extra: &[String],
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = pinned(0, me);
    cmd.args(["load", "--scenario", scenario, "--addr", &t.addr]);
    for h in &t.headers {
        cmd.arg("--header").arg(h);
    }
    let out = cmd.args(extra).stderr(Stdio::inherit()).output()?;
    anyhow::ensure!(out.status.success(), "load client failed for {}", t.name);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("no result from load client")?;
    Ok(serde_json::from_str(line)?)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let mut all = vec![
        "direct",
        "tcp-relay",
        "tollgate",
        "tollgate-baseline",
        "tollgate-msglimits",
        "tollgate-msgpolicy",
        "tollgate-policies",
        "tollgate-pooled",
        "tollgate-policies-nocache",
        "tollgate-pooled-nocache",
        "tollgate-py",
        "tollgate-js",
        "nginx",
        "haproxy",
        "haproxy-jwt",
    ];
    if fleet::wanted(&args) {
        all.splice(4..4, fleet::TARGETS);
    }
    let wanted: Vec<&'static str> = match &args.only {
        Some(list) => all
            .iter()
            .copied()
            .filter(|t| list.split(',').any(|x| x.trim() == *t))
            .collect(),
        None => all.clone(),
    };
    // The fleet target's store: started once, emptied before each start of the target.
    let redis = if wanted.contains(&"tollgate-fleet") {
        match fleet::Redis::find(&args) {
            Some((server, cli)) => {
                let r = fleet::Redis::start(&server, &cli, args.redis_cpu)?;
                eprintln!(
                    "tollgate-bench: {} on CPU {} at {}, pid {}",
                    server.display(),
                    args.redis_cpu,
                    r.url(),
                    r.pid()
                );
                Some(r)
            }
            None => None,
        }
    } else {
        None
    };
    let backend_port = free_port()?;
    let _backend = Proc {
        child: pinned(0, &me)
            .args(["backend", "--listen", &format!("127.0.0.1:{backend_port}")])
            .stdout(Stdio::null())
            .spawn()?,
        _dir: None,
    };
    wait_port(backend_port, 20)?;
    let jwt = Jwt::new()?;
    // One compiled-plugin cache for the run: the first start compiles, later starts load.
    let cache = tempdir("cache")?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    eprintln!("tollgate-bench: {cores} CPUs; proxies on CPU 1, load client and backend on CPU 0");

    // Memory first, on freshly started proxies: per idle relayed connection, and per handshake
    // held in flight at the backend (past every policy, waiting for the backend's 101).
    let mut memory: Vec<(&str, Option<f64>)> = Vec::new();
    let mut pending: Vec<(&str, Option<f64>)> = Vec::new();
    for name in &wanted {
        if *name == "direct" || handshake_only(name) {
            continue;
        }
        for (scenario, count, path, out) in [
            ("idle", args.idle_connections, "/echo", &mut memory),
            (
                "pending",
                args.pending_handshakes,
                "/echo/stall",
                &mut pending,
            ),
        ] {
            if count == 0 {
                continue;
            }
            let Some(t) = start_target(name, backend_port, &args, &jwt, &cache.0, redis.as_ref())?
            else {
                continue;
            };
            let per = held_rss(&me, &t, scenario, count, path)?;
            out.push((name, per));
        }
    }

    let mut targets = Vec::new();
    for name in &wanted {
        match start_target(name, backend_port, &args, &jwt, &cache.0, redis.as_ref())? {
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
        // Text is validated as UTF-8 by the gateway (not by the other proxies): its cost is
        // this column against the binary one.
        (
            "16 KiB text",
            "throughput",
            vec![
                "--size".into(),
                "16384".into(),
                "--opcode".into(),
                "text".into(),
            ],
        ),
        (
            "16 KiB JSON",
            "throughput",
            vec![
                "--size".into(),
                "16384".into(),
                "--opcode".into(),
                "json".into(),
            ],
        ),
    ];
    let mut results: Vec<Vec<Cell>> = vec![vec![Cell::default(); scenarios.len()]; targets.len()];
    let mut tally = fleet::Tally::default();
    for (si, (label, scenario, extra)) in scenarios.iter().enumerate() {
        if args.handshakes_only && *scenario == "throughput" {
            continue;
        }
        for round in 0..args.rounds {
            for k in 0..targets.len() {
                let ti = (k + round) % targets.len();
                let t = &targets[ti];
                if *scenario == "throughput" && handshake_only(t.name) {
                    continue;
                }
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
                // What Redis does during the fleet target's handshakes (fleet.rs).
                let counted = match &redis {
                    Some(redis) if t.name == "tollgate-fleet" && *scenario == "handshakes" => {
                        Some((redis, redis.commandstats()?, proc::cpu_seconds(redis.pid())))
                    }
                    _ => None,
                };
                let cpu0 = pid.map(proc::cpu_seconds).unwrap_or(0.0);
                let r = load(&me, scenario, t, &extra)?;
                let cpu1 = pid.map(proc::cpu_seconds).unwrap_or(0.0);
                if let Some((redis, before, rcpu0)) = counted {
                    let (after, settled) = redis.settled()?;
                    tally.stats.add(&after.since(&before));
                    tally.unsettled_rounds += u64::from(!settled);
                    tally.redis_cpu += proc::cpu_seconds(redis.pid()) - rcpu0;
                    tally.handshakes += r["ops"].as_u64().unwrap_or(0);
                }
                let c = &mut results[ti][si];
                c.rounds.push((r["ops"].as_u64().unwrap_or(0), cpu1 - cpu0));
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

    println!("\n| target | 64 B msg/s | 64 B p50 / p99 us | CPU per 64 B round trip | 16 KiB msg/s | 16 KiB p50 / p99 us | CPU per 16 KiB round trip | CPU per 16 KiB text round trip | CPU per 16 KiB JSON round trip | handshakes/s | handshake p50 / p99 us | CPU per handshake | RSS per idle connection | RSS per 1,000 pending handshakes |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
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
        let pend = pending
            .iter()
            .find(|(n, _)| *n == t.name)
            .and_then(|(_, m)| *m)
            .map_or("-".to_owned(), |m| format!("{:.0} KB", m * 1000.0));
        let errs: u64 = cells.iter().map(|c| c.errors).sum();
        println!(
            "| {}{} | {:.0} | {} | {} | {:.0} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
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
            cpu(&cells[3]),
            cpu(&cells[4]),
            cells[2].rate(),
            lat(&cells[2]),
            cpu(&cells[2]),
            mem,
            pend
        );
    }
    let handshakes = scenarios
        .iter()
        .position(|(_, scenario, _)| *scenario == "handshakes")
        .unwrap_or(0);
    jwt_report(&targets, &results, handshakes);
    if targets.iter().any(|t| fleet::has_subscription(t.name)) {
        fleet_report(&targets, &results, handshakes, &tally, args.redis_cpu);
    }
    if ["tollgate-policies", "tollgate-py", "tollgate-js"]
        .iter()
        .any(|t| wanted.contains(t))
    {
        let timings = chain_timings(&me, &args, &jwt, &cache.0, &wanted)?;
        println!("\nPolicy chain's own time per handshake (in process, CPU 1). Rust: jwt-validate RS256 + set-header; Python: origin-check; JavaScript: jwt-validate + tenant-route:\n");
        println!("| measurement | p50 us | p99 us |\n|---|---|---|");
        for (what, p50, p99) in timings {
            println!("| {what} | {p50:.1} | {p99:.1} |");
        }
    }
    println!(
        "\n{} s per measurement, {} rounds, {} connections, window {}, {} idle connections, {} pending handshakes; KB = 1000 bytes.",
        args.duration, args.rounds, args.connections, args.window, args.idle_connections, args.pending_handshakes
    );
    Ok(())
}

/// `a`'s CPU per operation over `b`'s: over the run, round by round (the two ran within
/// seconds of each other), and the median of those (steadier than the totals on a busy
/// machine).
fn cpu_ratio(a: &Cell, b: &Cell) -> Option<String> {
    let (x, y) = (a.cpu_us_per_op()?, b.cpu_us_per_op()?);
    let each: Vec<f64> = a
        .per_round()
        .iter()
        .zip(b.per_round())
        .map(|(a, b)| a / b)
        .collect();
    let shown: Vec<String> = each.iter().map(|r| format!("{r:.2}")).collect();
    Some(format!(
        "{:.2}x (rounds: {}; median {:.2}x)",
        x / y,
        shown.join(", "),
        Cell::median(&each)
    ))
}

/// Tollgate's JWT handshakes against HAProxy's native `jwt_verify` (issue 21), when
/// `haproxy-jwt` was measured (`si`: the handshake scenario's index): every pair of the two
/// that ran, side by side.
fn jwt_report(targets: &[Target], results: &[Vec<Cell>], si: usize) {
    let cell = |name: &str| {
        targets
            .iter()
            .position(|t| t.name == name)
            .map(|i| &results[i][si])
            .filter(|c| c.cpu_us_per_op().is_some())
    };
    if cell("haproxy-jwt").is_none() {
        return;
    }
    let pairs = [
        (
            "tollgate jwt (no cache) / haproxy-jwt, pooled",
            "tollgate-pooled-nocache",
            "haproxy-jwt",
        ),
        (
            "tollgate jwt (no cache) / haproxy-jwt, fresh",
            "tollgate-policies-nocache",
            "haproxy-jwt",
        ),
        (
            "tollgate jwt (cache on) / haproxy-jwt, pooled",
            "tollgate-pooled",
            "haproxy-jwt",
        ),
        (
            "tollgate jwt (cache on) / haproxy-jwt, fresh",
            "tollgate-policies",
            "haproxy-jwt",
        ),
        ("haproxy-jwt / haproxy", "haproxy-jwt", "haproxy"),
    ];
    println!("\nJWT handshakes against HAProxy 2.6's jwt_verify (issue 21): RS256 check of every token and X-User from `sub` (haproxy-jwt), Tollgate's jwt-validate + set-header with the signature cache off (-nocache) or on; CPU per handshake:\n");
    println!("| ratio | CPU per handshake | ratio over the run (per round; median) |");
    println!("|---|---|---|");
    for (label, a, b) in pairs {
        let (Some(ca), Some(cb)) = (cell(a), cell(b)) else {
            continue;
        };
        let us = |c: &Cell| c.cpu_us_per_op().unwrap_or(0.0);
        println!(
            "| {label} | {:.1} us / {:.1} us | {} |",
            us(ca),
            us(cb),
            cpu_ratio(ca, cb).unwrap_or_else(|| "-".to_owned())
        );
    }
}

/// The fleet targets' handshakes side by side (`si`: the handshake scenario's index): CPU per
/// handshake, latency, the fleet/limits ratio per round and over the run, and what Redis did.
fn fleet_report(
    targets: &[Target],
    results: &[Vec<Cell>],
    si: usize,
    tally: &fleet::Tally,
    redis_cpu: u32,
) {
    let cell = |name: &str| {
        targets
            .iter()
            .position(|t| t.name == name)
            .map(|i| &results[i][si])
    };
    let limits = cell("tollgate-limits");
    println!("\nFleet limits (issue 19): handshakes with a subscription limit counted in the process (tollgate-limits) and in Redis (tollgate-fleet, `[cluster]`, store_timeout {} ms); proxy CPU 1, Redis CPU {}:\n", fleet::STORE_TIMEOUT_MS, redis_cpu);
    println!("| target | handshakes/s | handshake p50 / p99 us | CPU per handshake | per round | CPU vs tollgate-limits | p99 minus tollgate-limits' |");
    println!("|---|---|---|---|---|---|---|");
    for name in ["tollgate", "tollgate-limits", "tollgate-fleet"] {
        let Some(c) = cell(name) else { continue };
        if c.rounds.is_empty() {
            continue;
        }
        let rounds: Vec<String> = c.per_round().iter().map(|v| format!("{v:.1}")).collect();
        let (ratio, p99) = match limits.filter(|l| !l.rounds.is_empty()) {
            Some(l) => {
                let r = cpu_ratio(c, l).unwrap_or_else(|| "-".to_owned());
                let d = Cell::median(&c.p99) - Cell::median(&l.p99);
                (r, format!("{d:+.0} us"))
            }
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "| {name}{} | {:.0} | {:.0} / {:.0} | {} | {} us | {ratio} | {p99} |",
            if c.errors > 0 {
                format!(" ({} errors)", c.errors)
            } else {
                String::new()
            },
            c.rate(),
            Cell::median(&c.p50),
            Cell::median(&c.p99),
            c.cpu_us_per_op()
                .map_or("-".to_owned(), |v| format!("{v:.1} us")),
            rounds.join(" / "),
        );
    }
    if tally.handshakes == 0 {
        return;
    }
    let s = &tally.stats;
    let per = |n: u64| n as f64 / tally.handshakes as f64;
    println!(
        "\nRedis during tollgate-fleet's handshake rounds ({} handshakes; `INFO commandstats`, the scripts told apart by the commands they run):\n",
        tally.handshakes
    );
    println!("| what | total | per handshake |\n|---|---|---|");
    println!(
        "| script calls (EVALSHA {} + EVAL/SCRIPT LOAD {}), heartbeats included | {} | {:.3} |",
        s.evalsha(),
        s.eval(),
        s.script_calls(),
        per(s.script_calls())
    );
    println!(
        "| of which first-use retries (EVALSHA answered NOSCRIPT, SCRIPT LOAD) | {} | {:.3} |",
        s.noscript_retries(),
        per(s.noscript_retries())
    );
    println!(
        "| acquire (at the handshake) | {} | {:.3} |",
        s.acquires(),
        per(s.acquires())
    );
    println!(
        "| release (closes given back in batches, one call per few ms) | {} | {:.3} |",
        s.releases(),
        per(s.releases())
    );
    println!(
        "| every slot given back after each round | {} | - |",
        if tally.unsettled_rounds == 0 {
            "yes".to_owned()
        } else {
            format!("NO: {} rounds left slots held", tally.unsettled_rounds)
        }
    );
    println!(
        "| heartbeat (every lease_ttl / 3) | {} | - |",
        s.heartbeats()
    );
    println!(
        "| redis-server CPU | {:.2} s | {:.1} us |",
        tally.redis_cpu,
        tally.redis_cpu * 1e6 / tally.handshakes as f64
    );
    if !s.consistent() {
        println!("\nThe split above does not add up (script calls != acquires + releases + heartbeats): another script ran during the rounds, so read only the total.");
    }
}

/// Opens `count` connections of `scenario` (`idle`: relayed WebSockets; `pending`: handshakes
/// the backend never answers) against a freshly started target and returns the growth of the
/// proxy's RSS per connection, in KB.
fn held_rss(
    me: &Path,
    t: &Target,
    scenario: &str,
    count: usize,
    path: &str,
) -> anyhow::Result<Option<f64>> {
    let pid = t.proc.as_ref().map(|p| p.child.id()).context("pid")?;
    std::thread::sleep(Duration::from_millis(300));
    let before = proc::rss_kb(pid);
    let mut cmd = pinned(0, me);
    cmd.args([
        "load",
        "--scenario",
        scenario,
        "--addr",
        &t.addr,
        "--path",
        path,
    ])
    .args(["--connections", &count.to_string()]);
    for h in &t.headers {
        cmd.arg("--header").arg(h);
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    let opened: u64 = parts.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    let failed: u64 = parts.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(2));
    let after = proc::rss_kb(pid);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin, "done");
    }
    let _ = child.wait();
    eprintln!(
        "  memory {} {scenario}: {opened} held ({failed} failed), RSS {before} -> {after} KiB",
        t.name
    );
    Ok((opened > 0).then(|| after.saturating_sub(before) as f64 * 1024.0 / opened as f64 / 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// `haproxy-jwt` lets the run's token through with `X-User` set from its `sub` (replacing
    /// one the client sent) and refuses a forged token or none with 401 (`start_target` fails
    /// otherwise). Skipped when HAProxy is not installed.
    #[test]
    fn haproxy_jwt_verifies_the_token_and_sets_x_user() {
        if which("haproxy").is_none() {
            eprintln!("haproxy not installed; skipped");
            return;
        }
        // A backend that answers 101 and hands over every request head it got.
        let backend = TcpListener::bind("127.0.0.1:0").unwrap();
        let backend_port = backend.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for s in backend.incoming() {
                let Ok(mut s) = s else { return };
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                        crate::wire::ACCEPT
                    )
                    .as_bytes(),
                );
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
            }
        });
        let jwt = Jwt::new().unwrap();
        let t = start_target(
            "haproxy-jwt",
            backend_port,
            &RunArgs::default(),
            &jwt,
            Path::new("/nonexistent"),
            None,
        )
        .unwrap()
        .expect("haproxy-jwt started");
        let x_user = |head: &str| -> Vec<String> {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .filter(|(n, _)| n.eq_ignore_ascii_case("x-user"))
                .map(|(_, v)| v.trim().to_owned())
                .collect()
        };
        // Of start_target's three checks, only the valid token reached the backend.
        let head = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(x_user(&head), ["bench-user"], "{head}");
        let status = status_line(
            &t.addr,
            &[
                format!("Authorization: Bearer {}", jwt.token()),
                "X-User: admin".to_owned(),
            ],
        )
        .unwrap();
        assert!(status.starts_with("HTTP/1.1 101"), "{status}");
        let head = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(x_user(&head), ["bench-user"], "{head}");
        assert!(
            rx.try_recv().is_err(),
            "a refused handshake reached the backend"
        );
    }
}
