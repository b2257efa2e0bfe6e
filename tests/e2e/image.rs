//! The container image (issue 20; docs/deploy.md, "The container image"): `scripts/image`
//! builds it from the `Containerfile` once per test process (a `FROM scratch` image with a
//! static musl `tollgate`, the first-party plugins, Debian's CA bundle and uid 65532), then these
//! tests look inside it and run it.
//!
//! Every podman command goes through `scripts/image podman ...`, which adds the options this
//! kind of machine needs (root inside a VM, no systemd, no CAP_SYS_RESOURCE; the script says
//! why for each): the OCI runtime `runc` (`--runtime runc`), the `cgroupfs` cgroup manager,
//! events written to a file, and no default ulimits (a containers.conf with
//! `default_ulimits = []`: podman's default nofile/nproc limits cannot be set here). Containers
//! run with `--network host`, so the gateway in the container and the backends and clients of
//! the test meet on the host's loopback.
//!
//! One test builds a plugins image too (`scripts/image plugins DIR`, deploy/plugins/Containerfile)
//! and mounts it with `--mount type=image`, podman's counterpart of a Kubernetes `image` volume
//! (deploy/overlays/plugins-image-volume).
//!
//! The tests are skipped, with a message naming why on the test's stderr (not captured, so it
//! shows in a plain `cargo test`), only where podman cannot run containers at all: podman
//! missing, or a trivial run of the built image (`tollgate --version`) failing in podman or the
//! OCI runtime before the image's own binary starts. Set `TOLLGATE_REQUIRE_PODMAN=1` to make
//! that a failure. A failing build, a broken image or a gateway that misbehaves in the
//! container always fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::support::tls::{wss_echo_backend, TestCa};
use crate::support::*;

/// What `scripts/image` builds by default (and what deploy/kubernetes runs).
const IMAGE: &str = "localhost/tollgate:dev";
/// Issue 20's size target.
const MAX_IMAGE_BYTES: u64 = 40 * 1000 * 1000;
const UID: u32 = 65532;
/// Where the image keeps the first-party plugins.
const PLUGIN_DIR: &str = "/usr/lib/tollgate/plugins";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where `scripts/image` builds the stripped plugins it puts in the image (its `image`
/// profile, in $CARGO_TARGET_DIR or target/).
fn image_plugin_builds() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(p) if p.is_absolute() => p,
        Some(p) => repo().join(p),
        None => repo().join("target"),
    };
    target.join("wasm32-wasip2").join("image")
}

fn script() -> PathBuf {
    repo().join("scripts").join("image")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `scripts/image podman ARGS`: podman with the project's options (module doc).
fn podman_blocking(args: &[String]) -> Output {
    Command::new(script())
        .arg("podman")
        .args(args)
        .output()
        .expect("run scripts/image podman")
}

/// [`podman_blocking`] off the test's runtime thread, so the backends and clients of the test
/// keep running meanwhile (a drain needs them to answer).
async fn podman(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || podman_blocking(&args))
        .await
        .expect("podman thread")
}

/// [`podman`], asserting success; its stdout.
async fn podman_ok(args: &[&str]) -> String {
    let out = podman(args).await;
    assert!(
        out.status.success(),
        "podman {args:?} failed ({}):\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The package names under plugins/: the first-party plugins the image must carry.
fn first_party_plugins() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("plugins")).expect("read plugins/") {
        let manifest = entry.expect("plugins/ entry").path().join("Cargo.toml");
        let Ok(toml) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let name = toml
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or_else(|| panic!("no package name in {}", manifest.display()));
        names.push(name.to_owned());
    }
    names.sort();
    assert!(names.len() >= 6, "first-party plugins: {names:?}");
    names
}

enum Built {
    Ready,
    Skip(String),
}

/// Builds the image once per test process (every test of this module waits for the first
/// build), then probes it. `None`: skipped, and the reason was written to stderr.
async fn image(test: &str) -> Option<()> {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    let built = tokio::task::spawn_blocking(|| BUILT.get_or_init(build_and_probe))
        .await
        .expect("image build thread");
    match built {
        Ok(Built::Ready) => Some(()),
        Err(failure) => panic!("{failure}"),
        Ok(Built::Skip(why)) => {
            let message = format!("podman cannot run containers here: {why}");
            if std::env::var_os("TOLLGATE_REQUIRE_PODMAN").is_some_and(|v| v == "1") {
                panic!("{message} (and TOLLGATE_REQUIRE_PODMAN=1)");
            }
            // Straight to the process's stderr, in one write: libtest captures `eprintln!` and
            // would show it only for a failing test, which would make the skip silent.
            let line = format!(
                "\nSKIPPED image::{test}: {message}\n(set TOLLGATE_REQUIRE_PODMAN=1 to fail instead)\n"
            );
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            None
        }
    }
}

fn build_and_probe() -> Result<Built, String> {
    if let Err(e) = Command::new("podman").arg("--version").output() {
        return Ok(Built::Skip(format!(
            "`podman` does not run ({e}): install Debian's podman and runc packages (scripts/test does)"
        )));
    }
    let started = Instant::now();
    let out = Command::new(script())
        .output()
        .map_err(|e| format!("cannot run scripts/image: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/image failed ({}):\n{}\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        ));
    }
    let stdout = text(&out.stdout);
    eprintln!("scripts/image took {:?}:\n{stdout}", started.elapsed());
    if !stdout.contains(&format!("image: {IMAGE}")) || !stdout.contains("size: ") {
        return Err(format!(
            "scripts/image does not print the image's name and size:\n{stdout}"
        ));
    }
    // The probe: the entrypoint with `--version` instead of the default command.
    let args: Vec<String> = ["run", "--rm", "--network", "none", IMAGE, "--version"]
        .map(String::from)
        .to_vec();
    let probe = podman_blocking(&args);
    let (stdout, stderr) = (text(&probe.stdout), text(&probe.stderr));
    let host = Command::new(BIN)
        .arg("--version")
        .output()
        .map_err(|e| format!("{BIN} --version: {e}"))?;
    if probe.status.success() {
        return if stdout == text(&host.stdout) {
            Ok(Built::Ready)
        } else {
            Err(format!(
                "`tollgate --version` in the image printed {stdout:?}, the test's tollgate {:?}",
                text(&host.stdout)
            ))
        };
    }
    // podman's own exit codes: 125 (podman failed), 126 (the container could not be started).
    // Anything else is the image's binary running and failing, or 127: the entrypoint is not
    // in the image. Neither is the machine's fault; nor is a start failure that names the
    // entrypoint (not executable, wrong format).
    let podman_failed = matches!(probe.status.code(), Some(125 | 126));
    let names_the_binary =
        stderr.contains("/usr/bin/tollgate") || stderr.contains("exec format error");
    if podman_failed && !names_the_binary {
        Ok(Built::Skip(format!(
            "`podman run --rm {IMAGE} --version` failed ({}): {}",
            probe.status,
            stderr.trim()
        )))
    } else {
        Err(format!(
            "`podman run --rm {IMAGE} --version` failed ({}):\n{stdout}{stderr}",
            probe.status
        ))
    }
}

/// A container started by a test, removed (`podman rm -f`) when dropped, whatever happened.
struct Container {
    name: String,
}

impl Container {
    fn name() -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        format!(
            "tollgate-e2e-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        )
    }

    /// `podman run -d --network host` of the image with `extra` options (mounts) and its
    /// default command, `tollgate run --manifest /etc/tollgate/tollgate.toml`.
    async fn start(extra: &[&str]) -> Container {
        let c = Container {
            name: Container::name(),
        };
        let mut args = vec!["run", "-d", "--name", &c.name, "--network", "host"];
        args.extend_from_slice(extra);
        args.push(IMAGE);
        podman_ok(&args).await;
        c
    }

    async fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]).await;
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    async fn records(&self, event: &str) -> Vec<serde_json::Value> {
        self.logs()
            .await
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == event)
            .collect()
    }

    async fn state(&self) -> String {
        podman_ok(&["inspect", "--format", "{{.State.Status}}", &self.name])
            .await
            .trim()
            .to_owned()
    }

    /// Waits (up to 60 s: the first start compiles every plugin) for `n` `listening` records,
    /// failing at once, with the logs, if the container stops.
    async fn wait_listening(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.records("listening").await.len() >= n {
                return;
            }
            let state = self.state().await;
            assert!(
                state == "running" || state == "created",
                "the container is {state} before listening; its logs:\n{}",
                self.logs().await
            );
            assert!(
                Instant::now() < deadline,
                "the gateway in the container did not listen within 60 s; its logs:\n{}",
                self.logs().await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman_blocking(&["rm", "-f", "-t", "0", &self.name].map(String::from));
    }
}

/// Two distinct free loopback ports (the container shares the host's network).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    (
        a.local_addr().expect("address").port(),
        b.local_addr().expect("address").port(),
    )
}

/// examples/quickstart/tollgate.toml with its three addresses replaced: the gateway and admin
/// listeners on `ws` and `admin`, the backend at `backend`. Everything else, `plugin_dir =
/// "plugins"` (next to the manifest: /etc/tollgate/plugins, the image's links to its
/// first-party plugins) and the set-header policy included, is the quickstart's.
fn quickstart_manifest(ws: u16, admin: u16, backend: std::net::SocketAddr) -> String {
    let path = repo().join("examples/quickstart/tollgate.toml");
    let mut m = std::fs::read_to_string(&path).expect("read the quickstart manifest");
    for (from, to) in [
        (
            "listen = \"127.0.0.1:8080\"",
            format!("listen = \"127.0.0.1:{ws}\""),
        ),
        (
            "listen = \"127.0.0.1:9090\"",
            format!("listen = \"127.0.0.1:{admin}\""),
        ),
        ("\"ws://127.0.0.1:9000/\"", format!("\"ws://{backend}/\"")),
    ] {
        assert!(m.contains(from), "{} no longer has {from}", path.display());
        m = m.replace(from, &to);
    }
    for expected in ["plugin_dir = \"plugins\"", "plugin = \"set-header\""] {
        assert!(
            m.contains(expected),
            "{} no longer has {expected}",
            path.display()
        );
    }
    m
}

/// A backend that echoes every data frame and reports the close code it receives.
fn echo_reporting_close(tx: tokio::sync::mpsc::UnboundedSender<Option<u16>>) -> Handler {
    Arc::new(move |_head, mut ws| {
        let tx = tx.clone();
        Box::pin(async move {
            while let Ok(f) = ws.read_frame().await {
                let _ = ws
                    .send_raw(&encode_frame(f.fin, f.rsv, f.opcode, &f.payload, None))
                    .await;
                if f.opcode == 8 {
                    let _ = tx.send(f.close_code());
                    return;
                }
            }
        })
    })
}

/// The image as built: small, non-root, the entrypoint and mount points the docs promise, and
/// exactly the files it should hold (the static binary, every first-party plugin, Debian's CA
/// bundle, passwd and group), nothing else.
#[tokio::test]
async fn image_is_small_non_root_and_holds_exactly_what_it_promises() {
    if image("image_is_small_non_root_and_holds_exactly_what_it_promises")
        .await
        .is_none()
    {
        return;
    }
    let size: u64 = podman_ok(&["image", "inspect", "--format", "{{.Size}}", IMAGE])
        .await
        .trim()
        .parse()
        .expect("image size");
    assert!(
        size < MAX_IMAGE_BYTES,
        "the image is {size} bytes, over {MAX_IMAGE_BYTES}"
    );

    let config: serde_json::Value = serde_json::from_str(
        &podman_ok(&["image", "inspect", "--format", "{{json .Config}}", IMAGE]).await,
    )
    .expect("image config JSON");
    assert_eq!(config["User"], "65532:65532", "{config:#}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/bin/tollgate"])
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--manifest", "/etc/tollgate/tollgate.toml"])
    );
    assert_eq!(config["StopSignal"], "SIGTERM", "{config:#}");
    for port in ["8080/tcp", "8443/tcp", "9090/tcp"] {
        assert!(
            config["ExposedPorts"].get(port).is_some(),
            "{port} not exposed: {config:#}"
        );
    }
    let env: Vec<&str> = config["Env"]
        .as_array()
        .expect("Env")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    for var in [
        "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
        "XDG_CACHE_HOME=/var/cache/tollgate",
    ] {
        assert!(env.contains(&var), "{var} not in {env:?}");
    }
    let labels = &config["Labels"];
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .is_some_and(|s| s.starts_with("https://")),
        "{labels:#}"
    );

    // The file system, from `podman export` of a container that never runs.
    let dir = TempDir::new("image-export");
    let c = Container {
        name: Container::name(),
    };
    podman_ok(&["create", "--name", &c.name, IMAGE]).await;
    let tar = dir.path().join("rootfs.tar");
    podman_ok(&["export", "-o", tar.to_str().expect("path"), &c.name]).await;
    let listing = Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(&tar)
        .output()
        .expect("run tar");
    assert!(listing.status.success(), "{}", text(&listing.stderr));
    let listing = text(&listing.stdout);
    // "mode owner/group size date time path [-> target]"
    let entry = |path: &str| -> Option<(String, String)> {
        listing.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[5].trim_end_matches('/') == path)
                .then(|| (f[0].to_owned(), f[1].to_owned()))
        })
    };
    let mut expected_files = vec![
        "usr/bin/tollgate".to_owned(),
        "etc/ssl/certs/ca-certificates.crt".to_owned(),
        "etc/passwd".to_owned(),
        "etc/group".to_owned(),
    ];
    for plugin in first_party_plugins() {
        let file = format!("{}.wasm", plugin.replace('-', "_"));
        expected_files.push(format!("{}/{file}", &PLUGIN_DIR[1..]));
        expected_files.push(format!("etc/tollgate/plugins/{file}"));
        assert!(
            listing.contains(&format!(
                "etc/tollgate/plugins/{file} -> {PLUGIN_DIR}/{file}"
            )),
            "/etc/tollgate/plugins/{file} is not a link to {PLUGIN_DIR}/{file}:\n{listing}"
        );
    }
    expected_files.sort();
    // podman adds empty mount points for the files it bind-mounts at run time; they are not
    // the image's.
    let runtime = [
        "etc/hosts",
        "etc/resolv.conf",
        "etc/hostname",
        "run/.containerenv",
    ];
    let mut files: Vec<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().nth(5).map(str::to_owned))
        .filter(|p| !runtime.contains(&p.as_str()))
        .collect();
    files.sort();
    assert_eq!(files, expected_files, "files in the image:\n{listing}");
    let (mode, owner) = entry("usr/bin/tollgate").expect("tollgate in the image");
    assert_eq!((mode.as_str(), owner.as_str()), ("-rwxr-xr-x", "0/0"));
    let (mode, owner) = entry("var/cache/tollgate").expect("the plugin cache directory");
    assert_eq!(
        (mode.as_str(), owner.as_str()),
        ("drwx------", "65532/65532"),
        "the compiled-plugin cache must be the gateway user's alone"
    );
    let (_, owner) = entry("etc/tollgate").expect("/etc/tollgate");
    assert_eq!(
        owner, "0/0",
        "the gateway's user must not own its configuration"
    );

    let extract = |path: &str| {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(&tar)
            .arg(path)
            .output()
            .expect("run tar");
        assert!(out.status.success(), "{path}: {}", text(&out.stderr));
        out.stdout
    };
    assert_eq!(
        extract("etc/ssl/certs/ca-certificates.crt"),
        std::fs::read("/etc/ssl/certs/ca-certificates.crt").expect("Debian's CA bundle"),
        "the image's CA bundle is not Debian's"
    );
    let passwd = text(&extract("etc/passwd"));
    assert!(
        passwd.contains("tollgate:x:65532:65532:"),
        "/etc/passwd:\n{passwd}"
    );
    let group = text(&extract("etc/group"));
    assert!(group.contains("tollgate:x:65532:"), "/etc/group:\n{group}");
    // Static: no program interpreter (PT_INTERP, the dynamic loader) among the ELF program
    // headers, or it could not start FROM scratch.
    let elf = extract("usr/bin/tollgate");
    assert_eq!(&elf[..5], b"\x7fELF\x02", "not a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    let types: Vec<u32> = (0..phnum)
        .map(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"))
        })
        .collect();
    const PT_LOAD: u32 = 1;
    const PT_INTERP: u32 = 3;
    assert!(types.contains(&PT_LOAD), "program headers: {types:?}");
    assert!(
        !types.contains(&PT_INTERP),
        "/usr/bin/tollgate needs a dynamic loader: program headers {types:?}"
    );
}

/// The quickstart in the container: its manifest mounted at /etc/tollgate/tollgate.toml, the
/// bundled plugins loaded, the gateway running as uid 65532, an echo round trip through it with
/// the set-header policy applied; then SIGTERM while a client is connected: close 1001 to both
/// sides, exit code 0, and the drain in `podman logs`.
#[tokio::test]
async fn quickstart_runs_in_the_container_and_drains_on_sigterm() {
    if image("quickstart_runs_in_the_container_and_drains_on_sigterm")
        .await
        .is_none()
    {
        return;
    }
    let (tx, mut backend_closes) = tokio::sync::mpsc::unbounded_channel();
    let backend = RawBackend::start(echo_reporting_close(tx)).await;
    let (ws, admin) = free_ports();
    let dir = TempDir::new("image-quickstart");
    let manifest = dir.path().join("tollgate.toml");
    std::fs::write(&manifest, quickstart_manifest(ws, admin, backend.addr))
        .expect("write the manifest");
    let mount = format!("{}:/etc/tollgate/tollgate.toml:ro", manifest.display());
    let c = Container::start(&["-v", &mount]).await;
    c.wait_listening(2).await;

    // Every first-party plugin loaded from the image (plugin_dir = "plugins": the links in
    // /etc/tollgate/plugins to /usr/lib/tollgate/plugins).
    let mut loaded: Vec<String> = c
        .records("plugin_loaded")
        .await
        .iter()
        .filter_map(|r| r["plugin"].as_str().map(str::to_owned))
        .collect();
    loaded.sort();
    assert_eq!(loaded, first_party_plugins(), "{}", c.logs().await);

    // Not root: the container's process, seen from the host.
    let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &c.name]).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
        .expect("the container's process in /proc");
    for field in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .expect("Uid/Gid lines")
            .split_whitespace()
            .map(|n| n.parse().expect("an id"))
            .collect();
        assert_eq!(ids, vec![UID; 4], "{field} of the gateway's process");
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", pid.trim())).expect("comm");
    assert_eq!(comm.trim(), "tollgate");

    let admin_addr = format!("127.0.0.1:{admin}").parse().expect("address");
    let (status, _, body) = http_get(admin_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    let (_, mut client) = ws_connect(
        format!("127.0.0.1:{ws}").parse().expect("address"),
        "/echo",
        "X-Gateway: spoofed\r\n",
    )
    .await;
    client
        .send(true, 1, b"through the container")
        .await
        .expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(10), client.read_frame())
        .await
        .expect("the echo within 10 s")
        .expect("a frame");
    assert_eq!(
        (echoed.opcode, echoed.payload.as_slice()),
        (1, &b"through the container"[..])
    );
    let head = backend.last_head().to_ascii_lowercase();
    assert!(
        head.contains("x-gateway: tollgate") && !head.contains("spoofed"),
        "the set-header policy did not run; the backend saw:\n{head}"
    );

    // SIGTERM with the client connected: the drain.
    let t = Instant::now();
    podman_ok(&["kill", "--signal", "TERM", &c.name]).await;
    let close = tokio::time::timeout(Duration::from_secs(10), client.read_until_close())
        .await
        .expect("a close from the draining gateway within 10 s")
        .expect("a close frame");
    assert_eq!(close.close_code(), Some(1001), "{close:?}");
    client.close(1001, "").await.expect("answer the close");
    let backend_close = tokio::time::timeout(Duration::from_secs(10), backend_closes.recv())
        .await
        .expect("the backend's close within 10 s");
    assert_eq!(backend_close, Some(Some(1001)));
    // Both sides answered: it exits without waiting for drain_timeout (30 s by default).
    let code = podman_ok(&["wait", &c.name]).await;
    assert_eq!(code.trim(), "0", "exit code; logs:\n{}", c.logs().await);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the drain took {:?}",
        t.elapsed()
    );
    let draining = c.records("draining").await;
    assert_eq!(draining.len(), 1, "{}", c.logs().await);
    assert_eq!(draining[0]["connections"], 1);
    assert!(c.records("drain_timeout").await.is_empty());
    let closed = c.records("connection_closed").await;
    assert!(
        closed.iter().any(|r| r["closed_by"] == "gateway_shutdown"),
        "{}",
        c.logs().await
    );
}

/// A wss backend is verified against the CA bundle at the image's SSL_CERT_FILE path: with a
/// test CA mounted there (over Debian's bundle), a backend it signed is trusted with no
/// `ca_file` in the manifest.
#[tokio::test]
async fn wss_backends_are_verified_against_the_bundle_at_ssl_cert_file() {
    if image("wss_backends_are_verified_against_the_bundle_at_ssl_cert_file")
        .await
        .is_none()
    {
        return;
    }
    let ca = TestCa::new("image test CA");
    let backend = wss_echo_backend(&ca.leaf(&["127.0.0.1"])).await;
    let dir = TempDir::new("image-wss");
    let bundle = ca.write(dir.path(), "ca.pem");
    let (ws, _) = free_ports();
    let manifest = dir.path().join("tollgate.toml");
    std::fs::write(
        &manifest,
        format!(
            "[gateway]\nname = \"wss\"\nlisten = \"127.0.0.1:{ws}\"\n\n{}",
            api_section("secure", "secure", &format!("wss://{backend}/"), "")
        ),
    )
    .expect("write the manifest");
    let mounts = [
        format!("{}:/etc/tollgate/tollgate.toml:ro", manifest.display()),
        format!("{}:/etc/ssl/certs/ca-certificates.crt:ro", bundle.display()),
    ];
    let c = Container::start(&["-v", &mounts[0], "-v", &mounts[1]]).await;
    c.wait_listening(1).await;
    let (head, mut client) = raw_handshake(
        format!("127.0.0.1:{ws}").parse().expect("address"),
        "/secure",
        "",
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}\nlogs:\n{}", c.logs().await);
    client.send(true, 1, b"over wss").await.expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(10), client.read_frame())
        .await
        .expect("the echo within 10 s")
        .expect("a frame");
    assert_eq!(echoed.payload, b"over wss");
}

/// A plugins image built by `scripts/image plugins DIR` under a name of this test process's
/// own, removed (`podman rmi -f`) when dropped (after the containers using it).
struct PluginsImage {
    name: String,
}

impl PluginsImage {
    async fn build(dir: &Path) -> PluginsImage {
        let image = PluginsImage {
            name: format!("localhost/tollgate-plugins:e2e-{}", std::process::id()),
        };
        let (name, dir) = (image.name.clone(), dir.to_owned());
        let out = tokio::task::spawn_blocking(move || {
            Command::new(script())
                .args(["plugins"])
                .arg(&dir)
                .env("TOLLGATE_PLUGINS_IMAGE", &name)
                .output()
                .expect("run scripts/image plugins")
        })
        .await
        .expect("scripts/image plugins thread");
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/image plugins failed ({}):\n{stdout}{}",
            out.status,
            text(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("image: {}", image.name)) && stdout.contains("size: "),
            "scripts/image plugins does not print the image's name and size:\n{stdout}"
        );
        image
    }
}

impl Drop for PluginsImage {
    fn drop(&mut self) {
        let _ = podman_blocking(&["rmi", "-f", &self.name].map(String::from));
    }
}

/// A plugins image holding set_header.wasm only (the build the gateway's image holds), mounted
/// with `--mount type=image` over the plugin directory, replaces it: the gateway loads exactly
/// set-header, from the mount, and a handshake through it reaches the backend with the header
/// the manifest's set-header attachment sets. Both ways docs/deploy.md gives: over
/// /usr/lib/tollgate/plugins with the Kubernetes manifest's `plugin_dir` (what the overlays
/// do), and over /etc/tollgate/plugins with `plugin_dir = "plugins"` (the image's links there
/// hidden).
#[tokio::test]
async fn a_plugins_image_mounted_as_an_image_volume_replaces_the_plugin_dir() {
    if image("a_plugins_image_mounted_as_an_image_volume_replaces_the_plugin_dir")
        .await
        .is_none()
    {
        return;
    }
    let dir = TempDir::new("image-plugins");
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).expect("create the plugins directory");
    std::fs::copy(
        image_plugin_builds().join("set_header.wasm"),
        plugins.join("set_header.wasm"),
    )
    .expect("copy set_header.wasm (scripts/image builds it)");
    let plugins_image = PluginsImage::build(&plugins).await;

    for (target, plugin_dir) in [
        (PLUGIN_DIR, PLUGIN_DIR),
        ("/etc/tollgate/plugins", "plugins"),
    ] {
        let backend = RawBackend::start(echo_frames()).await;
        let (ws, _) = free_ports();
        let manifest = dir.path().join("tollgate.toml");
        std::fs::write(
            &manifest,
            format!(
                "[gateway]\nname = \"plugins-image\"\nlisten = \"127.0.0.1:{ws}\"\nplugin_dir = \"{plugin_dir}\"\n\n{}\
                 [[apis.on_handshake]]\nplugin = \"set-header\"\n\
                 config = {{ name = \"X-Plugins-From\", value = \"image volume\" }}\n",
                api_section("echo", "echo", &backend.url(), "")
            ),
        )
        .expect("write the manifest");
        let mounts = [
            format!("{}:/etc/tollgate/tollgate.toml:ro", manifest.display()),
            format!(
                "type=image,source={},destination={target}",
                plugins_image.name
            ),
        ];
        let c = Container::start(&["-v", &mounts[0], "--mount", &mounts[1]]).await;
        c.wait_listening(1).await;

        let loaded: Vec<(String, String)> = c
            .records("plugin_loaded")
            .await
            .iter()
            .map(|r| {
                (
                    r["plugin"].as_str().unwrap_or_default().to_owned(),
                    r["path"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            loaded,
            [("set-header".to_owned(), format!("{target}/set_header.wasm"))],
            "the plugins image should replace {target}; logs:\n{}",
            c.logs().await
        );
        let (head, mut client) = raw_handshake(
            format!("127.0.0.1:{ws}").parse().expect("address"),
            "/echo",
            "",
        )
        .await;
        assert_eq!(status_of(&head), 101, "{head}\nlogs:\n{}", c.logs().await);
        client.send(true, 1, b"through").await.expect("send");
        let echoed = tokio::time::timeout(Duration::from_secs(10), client.read_frame())
            .await
            .expect("the echo within 10 s")
            .expect("a frame");
        assert_eq!(echoed.payload, b"through");
        let seen = backend.last_head().to_ascii_lowercase();
        assert!(
            seen.contains("x-plugins-from: image volume"),
            "set-header from the plugins image did not run; the backend saw:\n{seen}"
        );
    }
}
