//! Key sets the host fetches for policies (`tollgate:policy/key-sets`): a JWKS, named directly
//! or through an OpenID Connect discovery document, fetched over HTTPS by the gateway (plugins
//! have no network) and kept fresh.
//!
//! - **Load**: a policy registers a set in `configure`; the set is fetched then, unless this
//!   process already holds a good copy of the same source and options (a reload while the
//!   provider is down still loads). No copy and a failed fetch fail the load.
//! - **Refresh**: [`KeySets::refresh_due`] (called every second by the gateway's refresher)
//!   refetches a set every `refresh` (or its `Cache-Control: max-age`, bounded below by
//!   `min_refresh`); a failure keeps the last good keys, is logged and counted, and is
//!   retried every `min_refresh`.
//! - **Unknown kid**: a token naming a `kid` the set does not hold triggers a refetch at once,
//!   unless the last such refetch was less than `min_refresh` ago; every handshake that needs
//!   it waits for the same fetch (one fetch in flight per set, never one per token).
//!
//! Sets are shared by every attachment that registers the same source with the same options,
//! and live as long as a served state holds them.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::watch;
use tollgate_verify::jwks;

use crate::metrics::KeySetMetrics;

/// Default time between two refreshes of a set.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(3600);
/// Default least time between two fetches of a set.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(60);
/// Longest refresh period accepted (a week): a set is refetched at least this often.
pub const MAX_REFRESH: Duration = Duration::from_secs(7 * 24 * 3600);
/// One whole fetch (discovery document and JWKS, connects included) must finish within this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest discovery or JWKS document read; a provider's is a few KiB.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Most key sets one attachment may register.
pub const MAX_SETS_PER_ATTACHMENT: usize = 8;

/// Where a set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An OpenID Connect discovery document; its `jwks_uri` is fetched.
    OpenidConfiguration(Uri),
    /// A JWKS document.
    Jwks(Uri),
}

impl Source {
    fn uri(&self) -> &Uri {
        match self {
            Source::OpenidConfiguration(u) | Source::Jwks(u) => u,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Source::OpenidConfiguration(_) => "openid-configuration",
            Source::Jwks(_) => "jwks",
        }
    }
}

/// Parses a source URL: `https` only, with a host, no credentials (they would end up in logs
/// and `/apis`).
pub fn parse_url(url: &str) -> Result<Uri, String> {
    // What a message may show of a URL that does not parse: up to its query, cut short.
    let shown = || {
        let head = url.split(['?', '#']).next().unwrap_or("");
        head.chars()
            .take(200)
            .collect::<String>()
            .escape_debug()
            .to_string()
    };
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("`{}` is not a URL", shown()))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "`{}`: only https URLs are fetched (keys over plain http could be swapped in transit)",
            shown()
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("`{}` has no host", shown()));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{}`: credentials in the URL are not supported",
            label_of(&uri)
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("`{}` has no host", shown()));
    }
    Ok(uri)
}

/// A URL as logs, metrics and `/apis` show it: scheme, host and path; never the query.
fn label_of(uri: &Uri) -> String {
    let host = uri.authority().map(|a| a.as_str()).unwrap_or("");
    let host = host.rsplit('@').next().unwrap_or(host);
    format!("https://{host}{}", uri.path())
}

/// How a set is fetched and refreshed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub refresh: Duration,
    pub min_refresh: Duration,
    /// Certificates trusted besides the system's roots.
    pub ca: Vec<CertificateDer<'static>>,
}

impl Options {
    /// From the WIT's numbers (0: the default), bounded: `min_refresh` at least a second and
    /// at most `refresh`, `refresh` at most [`MAX_REFRESH`].
    pub fn new(
        refresh_secs: u64,
        min_refresh_secs: u64,
        ca_pem: Option<&str>,
    ) -> Result<Options, String> {
        let secs = |s: u64, default: Duration| {
            if s == 0 {
                default
            } else {
                Duration::from_secs(s)
            }
        };
        let refresh = secs(refresh_secs, DEFAULT_REFRESH).min(MAX_REFRESH);
        let min_refresh = secs(min_refresh_secs, DEFAULT_MIN_REFRESH).min(refresh);
        let ca = match ca_pem {
            None => Vec::new(),
            Some(pem) => {
                use rustls_pki_types::pem::PemObject;
                let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("CA certificates: not PEM: {e}"))?;
                if certs.is_empty() {
                    return Err("CA certificates: no `-----BEGIN CERTIFICATE-----` block".into());
                }
                certs
            }
        };
        Ok(Options {
            refresh,
            min_refresh,
            ca,
        })
    }
}

/// What started a fetch (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Load,
    Refresh,
    UnknownKid,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Load => "load",
            Trigger::Refresh => "refresh",
            Trigger::UnknownKid => "unknown_kid",
        }
    }
}

/// Every key set of the process, for sharing between attachments and reloads and for the
/// refresher. Holds them weakly: a set lives as long as a served state's attachment does.
#[derive(Default)]
pub struct KeySets {
    sets: Mutex<Vec<Weak<KeySet>>>,
    metrics: Option<KeySetMetrics>,
}

impl KeySets {
    pub fn new(metrics: Option<KeySetMetrics>) -> KeySets {
        KeySets {
            sets: Mutex::new(Vec::new()),
            metrics,
        }
    }

    /// The set for `source` and `options`: one already held with a good copy of its keys, or
    /// a new one fetched now. The error is worded for the operator.
    pub async fn register(&self, source: Source, options: Options) -> Result<Arc<KeySet>, String> {
        let existing = self
            .live()
            .into_iter()
            .find(|s| s.source == source && s.options == options);
        let set = match existing {
            Some(s) if s.has_keys() => {
                // A reload is how an operator reacts to a key the provider withdrew: the held
                // copy serves the load (which never waits on the provider), and a refresh starts
                // now unless the keys are fresh.
                if s.older_than(s.options.min_refresh) {
                    s.start_fetch(Trigger::Refresh);
                }
                return Ok(s);
            }
            Some(s) => s,
            None => {
                let set = Arc::new(KeySet::new(source, options, self.metrics.as_ref())?);
                if let Ok(mut sets) = self.sets.lock() {
                    sets.push(Arc::downgrade(&set));
                }
                set
            }
        };
        set.fetch_shared(Trigger::Load).await;
        if set.has_keys() {
            Ok(set)
        } else {
            let why = set
                .status()
                .last_error
                .unwrap_or_else(|| "the fetch did not finish".into());
            Err(format!(
                "fetching key set {}: {why} (no earlier copy of it is held)",
                set.label
            ))
        }
    }

    /// The sets some served state still holds.
    pub fn live(&self) -> Vec<Arc<KeySet>> {
        let Ok(mut sets) = self.sets.lock() else {
            return Vec::new();
        };
        sets.retain(|w| w.strong_count() > 0);
        sets.iter().filter_map(Weak::upgrade).collect()
    }
}

/// One fetched key set.
pub struct KeySet {
    source: Source,
    options: Options,
    /// The source URL without its query, for logs, metrics and `/apis`.
    label: String,
    tls: Arc<ClientConfig>,
    state: Mutex<State>,
    metrics: Option<KeySetMetrics>,
}

#[derive(Default)]
struct State {
    keys: Arc<jwks::KeySet>,
    /// The JWKS URL the last successful fetch read (the discovery document's `jwks_uri`).
    jwks_url: Option<String>,
    /// When the keys were last fetched successfully.
    fetched_at: Option<SystemTime>,
    /// When the last refetch for an unknown kid started (they are rate limited).
    last_kid_refetch: Option<Instant>,
    /// When the next refresh is due.
    next_refresh: Option<Instant>,
    last_error: Option<String>,
    /// The fetch in progress: its receiver turns `true` when it is done.
    in_flight: Option<watch::Receiver<bool>>,
    fetches: u64,
    failures: u64,
}

/// What `/apis` shows of a set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub source: String,
    pub kind: &'static str,
    pub jwks_url: Option<String>,
    pub keys: usize,
    pub kids: Vec<String>,
    /// Seconds since the keys were fetched (none: never).
    pub age_seconds: Option<u64>,
    /// Unix seconds of that fetch.
    pub fetched_at: Option<u64>,
    pub refresh_seconds: u64,
    pub min_refresh_seconds: u64,
    pub fetches: u64,
    pub failures: u64,
    /// Why the last fetch failed, when it did (the keys in use are then the last good ones).
    pub last_error: Option<String>,
}

/// How one key of a set was checked, for the caller to count and charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Valid,
    Invalid,
    NoKey,
}

impl KeySet {
    fn new(
        source: Source,
        options: Options,
        metrics: Option<&KeySetMetrics>,
    ) -> Result<KeySet, String> {
        let tls = tls_config(&options.ca)?;
        let label = label_of(source.uri());
        Ok(KeySet {
            metrics: metrics.cloned(),
            label,
            source,
            options,
            tls,
            state: Mutex::new(State::default()),
        })
    }

    fn has_keys(&self) -> bool {
        self.state
            .lock()
            .map(|s| !s.keys.keys.is_empty())
            .unwrap_or(false)
    }

    /// The keys in use now.
    pub fn keys(&self) -> Arc<jwks::KeySet> {
        self.state
            .lock()
            .map(|s| s.keys.clone())
            .unwrap_or_default()
    }

    fn due(&self, now: Instant) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.in_flight.is_none() && s.next_refresh.is_none_or(|at| now >= at))
    }

    /// Starts a refresh (without waiting for it) when one is due. The gateway's refresher calls
    /// this for the sets the served state uses, so a set only old connections still hold is
    /// not polled.
    pub fn refresh_if_due(self: &Arc<Self>) {
        if self.due(Instant::now()) {
            self.start_fetch(Trigger::Refresh);
        }
    }

    fn older_than(&self, age: Duration) -> bool {
        self.state.lock().is_ok_and(|s| {
            s.fetched_at
                .is_none_or(|t| t.elapsed().map_or(true, |e| e >= age))
        })
    }

    /// Refetches because a token named a kid the set does not hold: at once, unless the last
    /// refetch for an unknown kid started less than `min_refresh` ago (then `false`, nothing
    /// fetched); joins a fetch already in flight. Returns once the fetch is done.
    pub async fn refetch_for_unknown_kid(self: &Arc<Self>) -> bool {
        // Deciding and starting happen under one lock, so two handshakes cannot both pass the
        // rate limit.
        let done = {
            let Ok(mut st) = self.state.lock() else {
                return false;
            };
            if let Some(rx) = &st.in_flight {
                rx.clone()
            } else if st
                .last_kid_refetch
                .is_some_and(|t| t.elapsed() < self.options.min_refresh)
            {
                return false;
            } else {
                st.last_kid_refetch = Some(Instant::now());
                self.spawn_fetch(&mut st, Trigger::UnknownKid)
            }
        };
        wait(done).await;
        true
    }

    /// Starts a fetch, or joins the one in flight, and waits for it.
    async fn fetch_shared(self: &Arc<Self>, trigger: Trigger) {
        wait(self.start_fetch(trigger)).await;
    }

    /// Starts a fetch in its own task (so a handshake that stops waiting does not cancel it),
    /// unless one is in flight; either way, the receiver turns `true` when it is done.
    fn start_fetch(self: &Arc<Self>, trigger: Trigger) -> watch::Receiver<bool> {
        let Ok(mut st) = self.state.lock() else {
            return watch::channel(true).1;
        };
        match &st.in_flight {
            Some(rx) => rx.clone(),
            None => self.spawn_fetch(&mut st, trigger),
        }
    }

    /// The fetch task, marked in flight in `st` (whose lock the caller holds).
    fn spawn_fetch(self: &Arc<Self>, st: &mut State, trigger: Trigger) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        st.in_flight = Some(rx.clone());
        let me = self.clone();
        tokio::spawn(async move {
            // Whatever ends the task (a panic, the runtime shutting down), the set is not left
            // marked in flight for ever.
            let guard = InFlight(&me, tx);
            let result = match tokio::time::timeout(FETCH_TIMEOUT, me.fetch()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
            };
            me.finish(trigger, result);
            drop(guard);
        });
        rx
    }

    /// Records a fetch's outcome: new keys, or the error (keeping the last good keys).
    fn finish(&self, trigger: Trigger, result: Result<Fetched, String>) {
        let now = Instant::now();
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        st.in_flight = None;
        st.fetches += 1;
        match result {
            Ok(f) => {
                let next = f.max_age.map_or(self.options.refresh, |a| {
                    a.clamp(self.options.min_refresh, self.options.refresh)
                });
                let changed = st.keys.keys != f.keys.keys;
                if !f.keys.skipped.is_empty() && changed {
                    tracing::info!(event = "key_set_keys_skipped", key_set = %self.label,
                        skipped = ?f.keys.skipped, "keys of the fetched JWKS the gateway cannot use were left out");
                }
                let kids: Vec<_> = f
                    .keys
                    .keys
                    .iter()
                    .filter_map(|k| k.kid.as_deref())
                    .collect();
                tracing::info!(event = "key_set_fetched", key_set = %self.label, trigger = trigger.label(),
                    keys = f.keys.keys.len(), kids = %kids.join(","), changed, next_refresh_s = next.as_secs(), "key set fetched");
                if let Some(m) = &self.metrics {
                    m.fetched(&self.label, trigger.label(), true);
                    m.succeeded(&self.label, f.keys.keys.len());
                }
                st.keys = Arc::new(f.keys);
                st.jwks_url = Some(f.jwks_url);
                st.fetched_at = Some(SystemTime::now());
                st.last_error = None;
                st.next_refresh = Some(now + next);
            }
            Err(e) => {
                st.failures += 1;
                let held = !st.keys.keys.is_empty();
                let age = st
                    .fetched_at
                    .and_then(|t| t.elapsed().ok())
                    .map(|d| d.as_secs());
                tracing::warn!(event = "key_set_fetch_failed", key_set = %self.label, trigger = trigger.label(),
                    error = %e, keeping_last_good = held, age_s = ?age,
                    "key set fetch failed{}", if held { "; the last good keys stay in use" } else { "" });
                if let Some(m) = &self.metrics {
                    m.fetched(&self.label, trigger.label(), false);
                }
                st.last_error = Some(e);
                st.next_refresh = Some(now + self.options.min_refresh);
            }
        }
    }

    pub fn status(&self) -> Status {
        let st = self.state.lock();
        let (keys, kids, jwks_url, fetched_at, fetches, failures, last_error) = match &st {
            Ok(s) => (
                s.keys.keys.len(),
                s.keys.keys.iter().filter_map(|k| k.kid.clone()).collect(),
                s.jwks_url.clone(),
                s.fetched_at,
                s.fetches,
                s.failures,
                s.last_error.clone(),
            ),
            Err(_) => (0, Vec::new(), None, None, 0, 0, None),
        };
        Status {
            source: self.label.clone(),
            kind: self.source.kind(),
            jwks_url,
            keys,
            kids,
            age_seconds: fetched_at
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs()),
            fetched_at: fetched_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            refresh_seconds: self.options.refresh.as_secs(),
            min_refresh_seconds: self.options.min_refresh.as_secs(),
            fetches,
            failures,
            last_error,
        }
    }

    /// One fetch: the discovery document first when the source is one, then the JWKS.
    async fn fetch(&self) -> Result<Fetched, String> {
        let jwks_uri = match &self.source {
            Source::Jwks(u) => u.clone(),
            Source::OpenidConfiguration(u) => {
                let (doc, _) = get(u, &self.tls).await?;
                let v: serde_json::Value = serde_json::from_slice(&doc)
                    .map_err(|_| format!("{}: the discovery document is not JSON", label_of(u)))?;
                let jwks = v.get("jwks_uri").and_then(|j| j.as_str()).ok_or_else(|| {
                    format!("{}: the discovery document has no `jwks_uri`", label_of(u))
                })?;
                parse_url(jwks).map_err(|e| format!("{}: its jwks_uri {e}", label_of(u)))?
            }
        };
        let (doc, max_age) = get(&jwks_uri, &self.tls).await?;
        let keys = jwks::parse(&doc).map_err(|e| format!("{}: {e}", label_of(&jwks_uri)))?;
        Ok(Fetched {
            keys,
            jwks_url: label_of(&jwks_uri),
            max_age,
        })
    }

    /// Checks `signature` against the keys that fit `alg` and `kid` (keys with that very kid
    /// first), at most `max` of them, each through `check` (which counts, charges and caches).
    /// Also says whether the set holds a key with that very kid (a token without one: yes),
    /// which is what decides whether a refetch could help.
    pub fn check(
        &self,
        alg: tollgate_verify::Algorithm,
        kid: Option<&str>,
        max: usize,
        mut check: impl FnMut(&tollgate_verify::Key) -> Result<bool, String>,
    ) -> Result<(Checked, bool), String> {
        let keys = self.keys();
        let exact = |k: &jwks::Jwk| kid.is_some() && k.kid.as_deref() == kid;
        let holds_kid = kid.is_none() || keys.keys.iter().any(exact);
        let mut fitting: Vec<&jwks::Jwk> = keys.keys.iter().filter(|k| k.fits(alg, kid)).collect();
        fitting.sort_by_key(|k| !exact(k));
        let mut any = false;
        for k in fitting.into_iter().take(max) {
            any = true;
            if check(&k.key)? {
                return Ok((Checked::Valid, holds_kid));
            }
        }
        let outcome = if any {
            Checked::Invalid
        } else {
            Checked::NoKey
        };
        Ok((outcome, holds_kid))
    }
}

/// Waits until a fetch is done (an error means its task is gone: done too).
async fn wait(mut done: watch::Receiver<bool>) {
    let _ = done.wait_for(|d| *d).await;
}

/// Clears a set's in-flight mark and wakes its waiters when the fetch task ends, however.
struct InFlight<'a>(&'a KeySet, watch::Sender<bool>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.in_flight = None;
        }
        let _ = self.1.send(true);
    }
}

impl Drop for KeySet {
    /// A set no state holds any more leaves the metrics, so a stale age never alerts.
    fn drop(&mut self) {
        if let Some(m) = &self.metrics {
            m.forget(&self.label);
        }
    }
}

struct Fetched {
    keys: jwks::KeySet,
    jwks_url: String,
    max_age: Option<Duration>,
}

fn tls_config(ca: &[CertificateDer<'static>]) -> Result<Arc<ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::backend::native_roots() {
        let _ = roots.add(c.clone());
    }
    for c in ca {
        roots
            .add(c.clone())
            .map_err(|e| format!("CA certificates: {e}"))?;
    }
    let config = ClientConfig::builder_with_provider(crate::backend::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `max-age` of a `Cache-Control` value (`no-cache`/`no-store`: zero, refetch as soon as
/// allowed).
fn max_age(value: &str) -> Option<Duration> {
    let mut age = None;
    for d in value.split(',').map(str::trim) {
        let lower = d.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(n) = lower.strip_prefix("max-age=") {
            age = n
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    age
}

/// One HTTPS GET: the body (at most [`MAX_DOCUMENT_BYTES`]) of a 200 answer and its
/// `Cache-Control` max-age. Redirects are not followed (a provider's documents are at the URLs
/// it publishes). Written on hyper's client connection rather than with a full HTTP client
/// crate: it needs no pooling, proxies or redirects, and hyper and rustls are linked already.
async fn get(uri: &Uri, tls: &Arc<ClientConfig>) -> Result<(Bytes, Option<Duration>), String> {
    let at = label_of(uri);
    let authority = uri.authority().ok_or_else(|| format!("{at}: no host"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(443);
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("{at}: cannot resolve {host}: {e}"))?;
    let mut tcp = None;
    let mut last = String::from("no address");
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    let tcp = tcp.ok_or_else(|| format!("{at}: cannot connect ({last})"))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("{at}: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{at}: TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{at}: {e}"))?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let request = http::Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("tollgate/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{at}: {e}"))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{at}: {e}"))?;
        let status = response.status();
        if status != http::StatusCode::OK {
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(|l| {
                    let head = l.split(['?', '#']).next().unwrap_or("");
                    let head: String = head.chars().take(200).collect();
                    format!(
                        " (redirects are not followed; it points to {})",
                        head.escape_debug()
                    )
                })
                .unwrap_or_default();
            return Err(format!("{at}: HTTP {status}{location}"));
        }
        let max_age = response
            .headers()
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(max_age);
        let body = Limited::new(response.into_body(), MAX_DOCUMENT_BYTES)
            .collect()
            .await
            .map_err(|e| format!("{at}: reading the body: {e}"))?
            .to_bytes();
        // `sender` is dropped here, which lets the connection close.
        Ok((body, max_age))
    };
    let drive = async move {
        let _ = conn.await;
    };
    let (result, ()) = tokio::join!(exchange, drive);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_without_credentials_and_labels_drop_the_query() {
        assert!(parse_url("http://idp/jwks")
            .unwrap_err()
            .contains("only https"));
        assert!(parse_url("https://u:p@idp/jwks")
            .unwrap_err()
            .contains("credentials"));
        assert!(parse_url("not a url").is_err());
        let u = parse_url("https://idp.example:8443/keys?secret=1").unwrap();
        assert_eq!(label_of(&u), "https://idp.example:8443/keys");
    }

    #[test]
    fn options_default_and_bound() {
        let o = Options::new(0, 0, None).unwrap();
        assert_eq!(
            (o.refresh, o.min_refresh),
            (DEFAULT_REFRESH, DEFAULT_MIN_REFRESH)
        );
        let o = Options::new(30, 120, None).unwrap();
        assert_eq!(
            o.min_refresh,
            Duration::from_secs(30),
            "never above refresh"
        );
        let o = Options::new(u64::MAX, 1, None).unwrap();
        assert_eq!(o.refresh, MAX_REFRESH);
        assert!(Options::new(0, 0, Some("nothing"))
            .unwrap_err()
            .contains("no `-----BEGIN"));
    }

    #[test]
    fn cache_control_max_age() {
        assert_eq!(
            max_age("public, max-age=300"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("Max-Age=\"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("public"), None);
    }
}
