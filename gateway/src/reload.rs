//! Live reload: on SIGHUP, or when the manifest, the subscription keys file or a file in
//! `plugin_dir` changes, the gateway re-reads the manifest, loads every plugin, runs every
//! load-time check and swaps the new served state in as a whole ([`Current::swap_in`]). New handshakes use it; established
//! connections keep what they started with. A reload that fails any check is refused as a
//! whole, every error is logged, and the previous state keeps serving. Changes that cannot be
//! applied to running listeners (addresses, certificates, the admin listener) refuse the
//! reload with "needs a restart".
//!
//! Changes are found by polling a fingerprint (name, size, modification time) of the manifest
//! and of `plugin_dir` rather than with an inotify watcher: a file being copied in keeps
//! changing size, and a reload starts only once two readings in a row agree, so a half-written
//! plugin is never loaded. Polling also works the same on every filesystem (network mounts,
//! container volumes), where change notifications are unreliable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::manifest::{self, Config};
use crate::metrics::Metrics;
use crate::served::{Current, Served};

/// How often the manifest and `plugin_dir` are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Why a reload was refused (the previous state keeps serving).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct Refused(pub Vec<String>);

/// Listener-level settings a running process cannot change.
fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    if old.gateway.listen != new.gateway.listen {
        v.push(format!(
            "gateway.listen changed ({:?} -> {:?}): needs a restart",
            old.gateway.listen, new.gateway.listen
        ));
    }
    let tls = |c: &Config| {
        c.gateway
            .tls
            .as_ref()
            .map(|t| (t.listen, t.cert.clone(), t.key.clone()))
    };
    if tls(old) != tls(new) {
        v.push("gateway.tls changed (listener, certificate or key): needs a restart".into());
    }
    if old.cluster != new.cluster {
        v.push("cluster changed: needs a restart".into());
    }
    // The admin listener's Host names and token are read when it starts, like its address.
    if old.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen) {
        v.push("admin.listen changed: needs a restart".into());
    } else if old.admin != new.admin {
        v.push("admin.allowed_hosts or the admin token changed: needs a restart".into());
    }
    v
}

/// What a reload needs of the running gateway, and nothing more.
#[derive(Clone)]
pub struct Reloader {
    /// The served state a reload replaces.
    pub current: Arc<Current>,
    /// The manifest the process started with: listener settings cannot change without a
    /// restart.
    pub started_with: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Ends the watcher; also handed to the subscriptions of a new state.
    pub shutdown: CancellationToken,
}

impl Reloader {
    /// Reads the manifest at `path` and, if every check passes, makes it the served state.
    /// Blocking: plugins are compiled and their `configure` runs; call it off the async
    /// workers (`spawn_blocking`).
    pub fn reload(&self, path: &Path) -> Result<usize, Refused> {
        let config = manifest::load(path)
            .map_err(|e| Refused(e.0.iter().map(|m| m.to_string()).collect()))?;
        let restart = restart_needed(&self.started_with, &config);
        if !restart.is_empty() {
            return Err(Refused(restart));
        }
        let current = self.current.get();
        let served = Served::build(config, Some(&current), &self.metrics, &self.shutdown)
            .map_err(|e| Refused(e.iter().map(|m| m.to_string()).collect()))?;
        let apis = served.routes.apis().len();
        self.current.swap_in(served);
        Ok(apis)
    }
}

/// Runs [`Reloader::reload`] off the async workers and logs the outcome.
pub async fn reload_and_log(r: Reloader, path: PathBuf, trigger: &'static str) {
    let started = std::time::Instant::now();
    let metrics = r.metrics.clone();
    let outcome = tokio::task::spawn_blocking(move || r.reload(&path)).await;
    let applied = matches!(outcome, Ok(Ok(_)));
    metrics.reload(trigger, if applied { "applied" } else { "rejected" });
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Ok(Ok(apis)) => {
            tracing::info!(event = "reload", outcome = "applied", trigger, apis, duration_ms = ms,
                "configuration reloaded; new handshakes use it, established connections are untouched");
        }
        Ok(Err(Refused(errors))) => {
            for e in &errors {
                tracing::error!(event = "reload_error", trigger, error = %e, "reload check failed");
            }
            tracing::error!(
                event = "reload",
                outcome = "rejected",
                trigger,
                errors = errors.len(),
                duration_ms = ms,
                "reload rejected as a whole; the previous configuration keeps serving"
            );
        }
        Err(e) => {
            tracing::error!(event = "reload", outcome = "rejected", trigger, error = %e,
                "reload failed; the previous configuration keeps serving");
        }
    }
}

/// Name, size and modification time of each file a reload reads.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// What the files looked like before the gateway read them: the watcher compares with this,
/// so a change made while they were being read (a start or a reload compiling plugins takes
/// seconds) is seen as a change and reloaded, not taken for what was loaded.
pub struct Baseline {
    manifest: PathBuf,
    files: Fingerprint,
}

impl Baseline {
    /// Taken before the manifest is read at start.
    pub fn before_reading(manifest: &Path) -> Baseline {
        Baseline {
            manifest: manifest.to_owned(),
            files: fingerprint(manifest, (None, None)),
        }
    }

    /// Adds the keys file and plugin directory the manifest named, before they are read.
    pub fn with_files_of(mut self, config: &Config) -> Baseline {
        let mut rest = fingerprint(
            &self.manifest,
            (
                config.gateway.plugin_dir.clone(),
                config.gateway.subscription_keys_file.clone(),
            ),
        );
        // The manifest's own entry stays the one from before it was read.
        rest.remove(0);
        self.files.extend(rest);
        self
    }
}

/// Name, size and modification time of the manifest, the subscription keys file and every
/// `*.wasm` in `plugin_dir`.
fn fingerprint(
    manifest: &Path,
    (plugin_dir, keys_file): (Option<PathBuf>, Option<PathBuf>),
) -> Fingerprint {
    let entry = |p: &Path| {
        let m = std::fs::metadata(p).ok();
        (
            p.to_owned(),
            m.as_ref().map_or(0, |m| m.len()),
            m.and_then(|m| m.modified().ok()),
        )
    };
    let mut v = vec![entry(manifest)];
    v.extend(keys_file.as_deref().map(entry));
    if let Some(dir) = plugin_dir {
        if let Ok(files) = crate::policy::plugin_files(&dir) {
            v.extend(files.iter().map(|p| entry(p)));
        }
    }
    v
}

/// Reloads on SIGHUP and on settled changes of the manifest or `plugin_dir`, until shutdown.
///
/// `hup`: the SIGHUP stream, installed by the caller before the listeners are bound (a SIGHUP
/// that arrived before any handler would end the process); `None` reloads on file changes
/// only.
pub async fn watch(gw: Reloader, baseline: Baseline, mut hup: Option<tokio::signal::unix::Signal>) {
    let manifest = baseline.manifest;
    // The plugin directory and keys file of the manifest as it is now (they may move with a
    // reload).
    let dir = |gw: &Reloader| {
        let s = gw.current.get();
        (
            s.config.gateway.plugin_dir.clone(),
            s.config.gateway.subscription_keys_file.clone(),
        )
    };
    let mut applied = baseline.files;
    let mut last = applied.clone();
    // Reloads, each compared afterwards with the files as they were before it read them.
    let reload = |trigger: &'static str| {
        let (gw, manifest) = (gw.clone(), manifest.clone());
        async move {
            let before_dirs = dir(&gw);
            let before = fingerprint(&manifest, before_dirs.clone());
            reload_and_log(gw.clone(), manifest.clone(), trigger).await;
            // A reload that moved the plugin directory or keys file watches the new ones.
            if dir(&gw) == before_dirs {
                before
            } else {
                fingerprint(&manifest, dir(&gw))
            }
        }
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hup_recv = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = hup_recv => {
                applied = reload("sighup").await;
                last = applied.clone();
            }
            _ = tick.tick() => {
                let now = fingerprint(&manifest, dir(&gw));
                // Changed since the last reload, and the same as half a second ago: settled.
                if now != applied && now == last {
                    applied = reload("file_change").await;
                    last = applied.clone();
                } else {
                    last = now;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(admin: &str) -> Config {
        let text = format!(
            "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:9090\"\n{admin}"
        );
        crate::manifest::parse(Path::new("/tmp/m.toml"), &text).unwrap()
    }

    /// The baseline is what the files were before the gateway read them: unchanged files
    /// compare equal (no reload); a manifest rewritten, or a plugin added, after that moment
    /// compares different, so the watcher reloads it instead of taking it for what was loaded.
    #[test]
    fn a_change_made_while_starting_is_not_taken_for_what_was_loaded() {
        let dir = std::env::temp_dir().join(format!("tollgate-baseline-{}", std::process::id()));
        let plugins = dir.join("plugins");
        std::fs::create_dir_all(&plugins).unwrap();
        std::fs::write(plugins.join("a.wasm"), b"a").unwrap();
        let manifest = dir.join("m.toml");
        let text = "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nplugin_dir = \"plugins\"\n";
        std::fs::write(&manifest, text).unwrap();
        let config = crate::manifest::load(&manifest).unwrap();
        let dirs = || (config.gateway.plugin_dir.clone(), None);

        let unchanged = Baseline::before_reading(&manifest).with_files_of(&config);
        assert_eq!(unchanged.files, fingerprint(&manifest, dirs()));
        assert_eq!(unchanged.files.len(), 2, "{:?}", unchanged.files);

        let early = Baseline::before_reading(&manifest);
        std::fs::write(
            &manifest,
            format!("{text}# edited while the gateway starts\n"),
        )
        .unwrap();
        let early = early.with_files_of(&config);
        assert_ne!(early.files, fingerprint(&manifest, dirs()));

        let early = Baseline::before_reading(&manifest).with_files_of(&config);
        std::fs::write(plugins.join("b.wasm"), b"b").unwrap();
        assert_ne!(early.files, fingerprint(&manifest, dirs()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn admin_hosts_and_token_need_a_restart() {
        let sha = |c: char| format!("token_sha256 = \"{}\"\n", c.to_string().repeat(64));
        let base = config("");
        assert!(restart_needed(&base, &config("")).is_empty());
        for changed in [
            config("allowed_hosts = [\"admin.internal\"]\n"),
            config(&sha('a')),
        ] {
            let r = restart_needed(&base, &changed);
            assert!(r.len() == 1 && r[0].contains("needs a restart"), "{r:?}");
        }
        assert!(!restart_needed(&config(&sha('a')), &config(&sha('b'))).is_empty());
    }

    /// The listeners' addresses and the TLS certificate and key are bound at start: any change
    /// is refused, one message per listener, and nothing else is.
    #[test]
    fn listeners_and_tls_need_a_restart() {
        // The manifest checks that the certificate and key files exist and hold PEM of the
        // right kind (their DER is only parsed when a listener is built).
        let dir = std::env::temp_dir().join(format!("tollgate-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (f, kind) in [
            ("a.pem", "CERTIFICATE"),
            ("b.pem", "CERTIFICATE"),
            ("a.key", "PRIVATE KEY"),
            ("b.key", "PRIVATE KEY"),
        ] {
            let pem = format!("-----BEGIN {kind}-----\nAAAA\n-----END {kind}-----\n");
            std::fs::write(dir.join(f), pem).unwrap();
        }
        let manifest = dir.join("m.toml");
        let m = |listen: &str, tls: &str, admin: &str| {
            let text = format!(
                "[gateway]\nname = \"g\"\nlisten = \"{listen}\"\n{tls}\n[admin]\nlisten = \"{admin}\"\n"
            );
            crate::manifest::parse(&manifest, &text).unwrap()
        };
        let tls = |listen: &str, cert: &str, key: &str| {
            format!("[gateway.tls]\nlisten = \"{listen}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n")
        };
        let base_tls = tls("127.0.0.1:8443", "a.pem", "a.key");
        let base = m("127.0.0.1:8080", &base_tls, "127.0.0.1:9090");
        assert!(
            restart_needed(&base, &m("127.0.0.1:8080", &base_tls, "127.0.0.1:9090")).is_empty()
        );
        for (changed, what) in [
            (
                m("127.0.0.1:8081", &base_tls, "127.0.0.1:9090"),
                "gateway.listen",
            ),
            (
                m(
                    "127.0.0.1:8080",
                    &tls("127.0.0.1:8444", "a.pem", "a.key"),
                    "127.0.0.1:9090",
                ),
                "gateway.tls",
            ),
            (
                m(
                    "127.0.0.1:8080",
                    &tls("127.0.0.1:8443", "b.pem", "a.key"),
                    "127.0.0.1:9090",
                ),
                "gateway.tls",
            ),
            (
                m(
                    "127.0.0.1:8080",
                    &tls("127.0.0.1:8443", "a.pem", "b.key"),
                    "127.0.0.1:9090",
                ),
                "gateway.tls",
            ),
            (m("127.0.0.1:8080", "", "127.0.0.1:9090"), "gateway.tls"),
            (
                m("127.0.0.1:8080", &base_tls, "127.0.0.1:9091"),
                "admin.listen",
            ),
        ] {
            let r = restart_needed(&base, &changed);
            assert_eq!(r.len(), 1, "{what}: {r:?}");
            assert!(
                r[0].starts_with(what) && r[0].ends_with("needs a restart"),
                "{r:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
