//! The handshake pipeline: [`handshake`] runs one client's opening handshake top to bottom,
//! one phase per step, and records it:
//!
//! 1. [`route`]: which API serves this path (404 if none; 400 for a path unsafe to normalise).
//! 2. [`validate_upgrade`]: is this a well-formed RFC 6455 opening handshake (400 / 426).
//! 3. [`subscribe`]: for an API published through products, the subscription key: which
//!    subscription and product the handshake comes in through (401 if none may).
//! 4. [`admit`]: is there room under the subscription's (429), the global and the per-API
//!    (503) connection limits.
//! 5. [`backend_request`]: the request the backend will get (end-to-end headers forwarded,
//!    hop-by-hop ones and the subscription key dropped, `X-Forwarded-*` added).
//! 6. The onHandshake policy chain ([`crate::policy::chain::run`]) acts on that request; its
//!    outcome becomes the client's answer through [`policy_outcome`].
//! 7. [`Connector::handshake`](crate::backend::Connector::handshake): the backend handshake
//!    (502 / 504 / the backend's own status).
//! 8. [`switching_protocols`]: the 101 to the client, only after the backend's 101.
//! 9. The `handshake` record and metrics, whatever the outcome.
//!
//! Each phase returns what it learnt as its own type ([`Routed`], [`Upgrade`], [`Subscribed`]),
//! so a later phase cannot run on something an earlier one did not establish. The accepted
//! connection comes back to the caller ([`Accepted`]), which hands both sockets to the
//! [`relay`](crate::relay).

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, Upgraded};
use crate::logging::loggable;
use crate::manifest::{MessageRates, Scheme};
use crate::metrics::Metrics;
use crate::policy::TlsInfo;
use crate::routes::{Api, LimitReached, Permit, Routes};
use crate::served::Served;
use crate::subscriptions::{Keys, Subscription};
use crate::wskey;

/// What the connection knew before its request arrived.
pub struct Conn {
    /// Numbers the connection's records (`conn`), so handshake and close can be joined.
    pub id: u64,
    pub client_addr: SocketAddr,
    /// The listener the client came in on.
    pub scheme: Scheme,
    /// TLS facts of a wss client connection, gathered only when some API has policies.
    pub tls: Option<Arc<TlsInfo>>,
    /// When the whole handshake must be over (`handshake_timeout + backend_timeout` after
    /// accept): a handshake dropped at or after it timed out, it was not abandoned.
    pub deadline: tokio::time::Instant,
}

/// The gateway's shared pieces one handshake uses; nothing else of the gateway is reachable.
pub struct Env {
    /// The state this handshake is served from, whatever a reload does meanwhile.
    pub served: Arc<Served>,
    /// Connections holding a slot, gateway-wide.
    pub active: Arc<AtomicUsize>,
    pub metrics: Arc<Metrics>,
    /// The gateway's shutdown token: ends the relay of a connection admitted without a key.
    pub shutdown: CancellationToken,
    /// The fleet's shared limits (`[cluster]`), when clustered.
    pub fleet: Option<Arc<crate::cluster::Fleet>>,
    /// The web console's watches (its own connections' message events).
    pub watches: Arc<crate::watch::Watches>,
}

/// A handshake that got its 101: what the connection task needs to start the relay.
pub struct Accepted {
    pub backend: Upgraded,
    /// The named backend a policy picked, if any (for the close record).
    pub picked_backend: Option<String>,
    pub permit: Permit,
    pub api: Arc<Api>,
    /// The backend request's path and query, for the close record.
    pub target: String,
    /// The product the handshake came in through (for the close record).
    pub product: Option<String>,
    /// That product's message rates (client's messages, backend's), from the same
    /// configuration the handshake was served by, not a later reload's.
    pub product_messages: [MessageRates; 2],
    /// Ends the relay: the shutdown token, or the subscription key's (revoked by a reload).
    pub end: CancellationToken,
    /// The digest of the subscription key it was admitted with.
    pub key_digest: Option<crate::manifest::KeyDigest>,
    /// A policy's `close-at`, on the monotonic clock.
    pub policy_deadline: Option<Instant>,
    /// The handshake's context values, for the API's message policies (empty when it has
    /// none).
    pub context: Vec<(String, String)>,
    /// The web console's watch, when the console opened this connection.
    pub watch: Option<Arc<crate::watch::Watch>>,
}

/// What the `handshake` record says about a handshake, filled in as the phases learn it.
#[derive(Default)]
struct Record {
    api: Option<Arc<Api>>,
    /// The normalised path, once routing got that far.
    path: Option<String>,
    product: Option<String>,
    subscription: Option<String>,
    /// The named backend a policy picked, if any.
    picked_backend: Option<String>,
    /// Time spent in the policy chain (fresh instances, guest code, host calls): logged so an
    /// operator can tell a slow policy from a slow backend.
    policies_ms: f64,
}

/// Runs one client's opening handshake and records it: the response for the client, and the
/// accepted connection when that response is the 101.
pub async fn handshake(
    env: Env,
    conn: &Conn,
    mut req: Request<()>,
) -> (Response<Bytes>, Option<Accepted>) {
    let started = Instant::now();
    // If the client goes away before its answer, the connection task drops this future mid-phase: the guard
    // then logs `handshake_abandoned` and counts it, so the handshake leaves a trace.
    let mut abandoned = AbandonGuard {
        deadline: conn.deadline,
        metrics: env.metrics.clone(),
        conn: conn.id,
        client_addr: conn.client_addr,
        scheme: conn.scheme,
        uri: req.uri().clone(),
        started,
        answered: false,
    };
    let mut rec = Record::default();
    // Phase 0: the console's watch token (a subprotocol of its own) comes out before anything
    // reads the request, so no policy or backend sees it.
    let crate::watch::Taken { watch, echo } = env.watches.take_from(req.headers_mut());
    let result: Result<_, Reject> = async {
        let served = &env.served;
        let routed = route(&served.routes, conn.scheme, &req)?;
        rec.api = Some(routed.api.clone());
        rec.path = Some(routed.path.clone());
        let api = routed.api.clone();
        let upgrade = validate_upgrade(&req)?;
        let subscribed = subscribe(&served.keys, &api, &req, routed.query.as_deref())?;
        rec.product = subscribed.product.clone();
        rec.subscription = subscribed.subscription.as_ref().map(|s| s.name.clone());
        let mut permit = admit(
            &env.active,
            served.config.gateway.limits.max_connections,
            &api,
            subscribed.subscription.as_ref(),
        )
        .map_err(|(r, full)| {
            env.metrics.limit_hit(&api.config.name, full.into());
            r
        })?;
        if let Some(fleet) = &env.fleet {
            if let Some(slot) = admit_in_fleet(fleet, &api, subscribed.subscription.as_ref())
                .await
                .map_err(|(r, full)| {
                    if let Some(full) = full {
                        env.metrics.limit_hit(&api.config.name, full.into());
                    }
                    r
                })?
            {
                permit.hold(slot);
            }
        }
        let trusted_proxy = served
            .config
            .gateway
            .trusted_proxies
            .trusts(conn.client_addr.ip());
        let mut breq = backend_request(conn, trusted_proxy, &routed, &subscribed, &req);
        // The context the API's message policies see: the gateway's values, and what the
        // onHandshake chain set (kept only for an API that has message policies).
        let mut context = Vec::new();
        let effects = if api.chain.is_empty() {
            if !api.messages.is_empty() {
                context = gateway_context(&subscribed);
            }
            crate::policy::chain::Effects::default()
        } else {
            let view = policy_request(
                conn,
                &served.config.gateway.trusted_proxies,
                &routed,
                &subscribed,
                &req,
            );
            let t = Instant::now();
            let has_backend = |name: &str| api.backends.contains_key(name);
            let (outcome, last) = crate::policy::chain::run_keeping_request(
                &api.chain,
                view,
                &mut breq.headers,
                &mut breq.target,
                &has_backend,
            )
            .await;
            rec.policies_ms = t.elapsed().as_secs_f64() * 1000.0;
            if let (false, Some(last)) = (api.messages.is_empty(), last) {
                context = last.context;
            }
            policy_outcome(outcome)?
        };
        // A policy may have picked one of the API's named backends (the chain checked the name).
        let connector = match effects.backend.as_deref().map(|n| api.backends.get(n)) {
            None => &api.connector,
            Some(Some(named)) => {
                retarget(&mut breq, &routed, named.url());
                named
            }
            Some(None) => {
                return Err(Reject::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "a policy picked a backend the API does not have",
                ))
            }
        };
        // Cloned only when a policy picked one (the record names it on any outcome).
        rec.picked_backend.clone_from(&effects.backend);
        // A message policy judges payloads as sent: an extension (permessage-deflate) would
        // hand it compressed bytes, so an API with message policies offers the backend none.
        let extensions: &[String] = if api.messages.is_empty() {
            &upgrade.extensions
        } else {
            breq.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
            &[]
        };
        let upgraded = connector
            .handshake(&breq.target, breq.headers, &upgrade.protocols, extensions)
            .await
            .map_err(|e| {
                env.metrics.backend_error(&api.config.name, e.kind());
                backend_reject(e)
            })?;
        match effects.backend.as_deref() {
            None => {
                api.metrics.upgrades_default.inc();
            }
            Some(name) => env.metrics.backend_upgraded(&api.config.name, name),
        }
        let mut resp = switching_protocols(&upgrade, &upgraded, effects.response_headers);
        if let Some(p) = echo {
            resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        let accepted = Accepted {
            picked_backend: effects.backend,
            backend: upgraded,
            permit,
            api,
            target: breq.target,
            product_messages: subscribed
                .product
                .as_deref()
                .and_then(|n| served.config.products.iter().find(|p| p.name == n))
                .map(|p| [p.client_messages, p.backend_messages])
                .unwrap_or_default(),
            product: subscribed.product,
            end: subscribed.key_token.unwrap_or_else(|| env.shutdown.clone()),
            key_digest: subscribed.key_digest,
            policy_deadline: effects.close_at.map(deadline),
            context,
            watch,
        };
        Ok((resp, accepted))
    }
    .await;
    abandoned.answered = true;
    let status = match &result {
        Ok(_) => StatusCode::SWITCHING_PROTOCOLS,
        Err(r) => r.status,
    };
    record(
        &env,
        conn,
        &req,
        &rec,
        started,
        status,
        result.as_ref().err(),
    );
    match result {
        Ok((resp, accepted)) => (resp, Some(accepted)),
        Err(r) => (r.into_response(), None),
    }
}

/// The handshake's metrics and its `handshake` log record.
fn record<B>(
    env: &Env,
    conn: &Conn,
    req: &Request<B>,
    rec: &Record,
    started: Instant,
    status: StatusCode,
    rejected: Option<&Reject>,
) {
    let api_name = rec.api.as_ref().map_or("", |a| a.config.name.as_str());
    let log_values = env.served.config.gateway.log_query_values;
    let backend = loggable(
        rec.api
            .as_ref()
            .map_or("", |a| a.backend_url(rec.picked_backend.as_deref())),
        log_values,
    );
    let elapsed = started.elapsed();
    let duration_ms = elapsed.as_secs_f64() * 1000.0;
    let product = rec.product.as_deref().unwrap_or("");
    let subscription = rec.subscription.as_deref().unwrap_or("");
    // The normalised path once routing got that far, else the path as the client wrote it (a
    // refused path is worth seeing as it was sent).
    let path = rec.path.as_deref().unwrap_or(req.uri().path());
    env.metrics
        .handshake(api_name, product, subscription, status.as_u16());
    if let Some(api) = &rec.api {
        api.metrics
            .handshake_duration
            .observe(elapsed.as_secs_f64());
    }
    let (conn_id, client, scheme, policies_ms) = (
        conn.id,
        &conn.client_addr,
        conn.scheme.as_str(),
        rec.policies_ms,
    );
    // The record's `target` is documented as `tollgate::server` (README, "Logs"), where it was
    // written before the pipeline got its own module: kept, so log queries keep working.
    match rejected {
        None => tracing::info!(
            target: "tollgate::server",
            event = "handshake",
            conn = conn_id,
            api = api_name,
            product,
            subscription,
            operation = "onHandshake",
            status = 101u16,
            client = %client,
            scheme,
            path,
            backend = %backend,
            duration_ms,
            policies_ms,
            "handshake accepted"
        ),
        Some(r) => tracing::info!(
            target: "tollgate::server",
            event = "handshake",
            conn = conn_id,
            api = api_name,
            product,
            subscription,
            operation = "onHandshake",
            status = r.status.as_u16(),
            client = %client,
            scheme,
            path,
            backend = %backend,
            duration_ms,
            policies_ms,
            reason = %r.reason,
            "handshake rejected"
        ),
    }
}

/// Logs a handshake whose client went away before the gateway answered it (the connection
/// task then drops the handshake's future, wherever it was: policies, the backend handshake). The path is
/// logged without its query, which may hold a key or token.
struct AbandonGuard {
    /// The handshake's overall deadline: dropped at or after it, the handshake timed out (the
    /// connection task logs `handshake_timeout`); the client did not go away.
    deadline: tokio::time::Instant,
    metrics: Arc<Metrics>,
    conn: u64,
    client_addr: SocketAddr,
    scheme: Scheme,
    /// A clone shares the request's buffer: nothing is copied on a handshake that completes.
    uri: http::Uri,
    started: Instant,
    answered: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if self.answered || tokio::time::Instant::now() >= self.deadline {
            return;
        }
        self.metrics.handshake_abandoned();
        tracing::info!(
            target: "tollgate::server",
            event = "handshake_abandoned",
            conn = self.conn,
            client = %self.client_addr,
            scheme = self.scheme.as_str(),
            path = %self.uri.path(),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "the client went away before its handshake was answered"
        );
    }
}

/// `close-at` (seconds since the Unix epoch) as a point on the monotonic clock.
fn deadline(unix_seconds: u64) -> Instant {
    let now = Instant::now();
    let far = now + Duration::from_secs(86400 * 365);
    // The chain caps close-at at ten years ahead; checked anyway, as `UNIX_EPOCH + d` panics
    // on overflow.
    let Some(at) = std::time::UNIX_EPOCH.checked_add(Duration::from_secs(unix_seconds)) else {
        return far;
    };
    match at.duration_since(std::time::SystemTime::now()) {
        Ok(left) => now.checked_add(left).unwrap_or(far),
        Err(_) => now,
    }
}

/// Phase 1's findings.
pub struct Routed {
    pub api: Arc<Api>,
    /// The normalised request path: what is routed, what policies see and what the backend
    /// path is built from.
    pub path: String,
    /// Path after the API's url_suffix.
    pub remainder: String,
    /// The query as the client sent it.
    pub query: Option<String>,
}

/// Phase 2's findings.
pub struct Upgrade {
    pub client_key: String,
    pub protocols: Vec<String>,
    pub extensions: Vec<String>,
}

/// Phase 3's findings.
#[derive(Default)]
pub struct Subscribed {
    /// The product the handshake comes in through.
    pub product: Option<String>,
    pub subscription: Option<Arc<Subscription>>,
    /// Lower-case name of the subscription-key header, not forwarded anywhere, when the API is
    /// published through products.
    pub key_header: Option<String>,
    /// The key the subscription was found by, ended when a reload revokes it.
    pub key_token: Option<CancellationToken>,
    /// That key's digest (a binary upgrade hands it over to find the key again).
    pub key_digest: Option<crate::manifest::KeyDigest>,
    /// The query without the subscription key parameter: what the backend and policies see.
    pub query: Option<String>,
}

/// A refused handshake: the status the client gets and the reason that is logged.
///
/// The client sees the status's generic reason phrase (`Bad Gateway`, `Not Found`) unless a
/// body is set on purpose (a policy's own rejection, the subscription messages): the logged
/// reason may name backend addresses, OS errors or policy internals, which are nobody's
/// business outside.
#[derive(Debug)]
pub struct Reject {
    pub status: StatusCode,
    pub reason: String,
    /// Extra response headers (a Vec keeps the error type small on the happy path).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Bytes>,
}

impl Reject {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Self {
        Reject {
            status,
            reason: reason.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    /// The HTTP response. The connection is closed after it: a gateway that refused an upgrade
    /// has no reason to keep reading from that client.
    pub fn into_response(self) -> Response<Bytes> {
        let body = self.body.unwrap_or_else(|| {
            Bytes::from(format!(
                "{}\n",
                self.status.canonical_reason().unwrap_or("Error")
            ))
        });
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        for (k, v) in self.headers {
            resp.headers_mut().append(k, v);
        }
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        if !resp.headers().contains_key(header::CONTENT_TYPE) {
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        resp
    }
}

/// Phase 1: finds the API. The path is normalised first (`tollgate_edge::path`): routing,
/// policies and the backend see only the normalised path, and a path that is unsafe to
/// normalise, or whose `..` segments climb out of the API it ends up in, is refused (400). The
/// listener's scheme must be one the API is served on.
pub fn route<B>(routes: &Routes, scheme: Scheme, req: &Request<B>) -> Result<Routed, Reject> {
    let bad = |why: String| Reject::new(StatusCode::BAD_REQUEST, why);
    let norm = tollgate_edge::path::normalise(req.uri().path())
        .map_err(|e| bad(format!("refused path: {e}")))?;
    let path = norm.path.as_str();
    let Some((api, rest)) = routes.find(path) else {
        return Err(Reject::new(
            StatusCode::NOT_FOUND,
            format!("no API serves path {path}"),
        ));
    };
    if norm.climbs_out_of(&api.config.url_suffix) {
        return Err(bad(format!(
            "refused path: its `..` segments climb out of API `{}`",
            api.config.name
        )));
    }
    if !api.config.schemes.serves(scheme) {
        return Err(Reject::new(
            StatusCode::NOT_FOUND,
            format!("API {} is not served over {scheme}", api.config.name),
        ));
    }
    Ok(Routed {
        api: api.clone(),
        remainder: rest.to_owned(),
        query: req.uri().query().map(str::to_owned),
        path: norm.path,
    })
}

fn header_tokens<'a>(h: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Phase 2: RFC 6455 section 4.2.1. A wrong version gets 426 with the version we speak.
pub fn validate_upgrade<B>(req: &Request<B>) -> Result<Upgrade, Reject> {
    let bad = |why: &str| Err(Reject::new(StatusCode::BAD_REQUEST, why.to_owned()));
    if req.method() != Method::GET {
        return bad("a WebSocket handshake must be a GET request");
    }
    if req.version() != http::Version::HTTP_11 {
        return bad("a WebSocket handshake must use HTTP/1.1");
    }
    let h = req.headers();
    if let Err(e) = tollgate_edge::headers::check(h) {
        return bad(&e.to_string());
    }
    // An absolute-form target names the authority itself (RFC 9112 section 3.2.2); one that
    // disagrees with Host would let routing and X-Forwarded-Host tell different stories.
    if let Some(authority) = req.uri().authority() {
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
        if host.is_none_or(|host| !host.trim().eq_ignore_ascii_case(authority.as_str())) {
            return bad("the request target's authority does not match `Host`");
        }
    }
    if !header_tokens(h, &header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket")) {
        return bad("missing `Upgrade: websocket`");
    }
    if !header_tokens(h, &header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade")) {
        return bad("missing `Connection: upgrade`");
    }
    let version = h
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok());
    if version.map(str::trim) != Some("13") {
        let mut r = Reject::new(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version (this gateway speaks 13)",
        );
        r.headers.push((
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        ));
        return Err(r);
    }
    let keys: Vec<_> = h.get_all(header::SEC_WEBSOCKET_KEY).iter().collect();
    let key = match keys.as_slice() {
        [k] => k.to_str().unwrap_or("").trim(),
        _ => return bad("exactly one Sec-WebSocket-Key is required"),
    };
    if !wskey::is_valid_key(key) {
        return bad("Sec-WebSocket-Key must be base64 of 16 bytes");
    }
    Ok(Upgrade {
        client_key: key.to_owned(),
        protocols: header_tokens(h, &header::SEC_WEBSOCKET_PROTOCOL)
            .map(str::to_owned)
            .collect(),
        extensions: header_tokens(h, &header::SEC_WEBSOCKET_EXTENSIONS)
            .filter_map(|e| e.split(';').next())
            .map(|e| e.trim().to_owned())
            .collect(),
    })
}

/// What a client without a key is told (APIM's wording).
pub const MISSING_KEY: &str = "Access denied due to missing subscription key. Make sure to include the subscription key when making requests to this API.";
/// What a client with a key that does not open this API is told (APIM's wording). The same
/// for an unknown key and for another product's key, so a client cannot probe which keys exist.
pub const INVALID_KEY: &str = "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.";

/// Seconds a subscriber at its `max_connections` is told to wait. Connections are long-lived, so
/// hammering every second would only add load; a few seconds is a polite default.
pub const SUBSCRIPTION_RETRY_AFTER: &str = "5";

/// Phase 3: the subscription. For an API published through products, the key comes from the
/// API's header, else its query parameter; both are removed from what the backend and the
/// policies see. A key is always checked when sent; with no key (or an empty one), the
/// handshake comes in through the API's open product, if it has one, and is refused (401)
/// otherwise.
pub fn subscribe<B>(
    keys: &Keys,
    api: &Api,
    req: &Request<B>,
    query: Option<&str>,
) -> Result<Subscribed, Reject> {
    if api.config.products.is_empty() {
        return Ok(Subscribed {
            query: query.map(str::to_owned),
            ..Subscribed::default()
        });
    }
    let loc = &api.config.subscription_key;
    let mut found = Subscribed {
        key_header: Some(loc.header.clone()),
        ..Subscribed::default()
    };
    let bad = |why: String| Reject::new(StatusCode::BAD_REQUEST, why);
    // Two keys could each be read by someone different (the gateway, a policy, the backend).
    if let Ok(name) = HeaderName::from_bytes(loc.header.as_bytes()) {
        tollgate_edge::headers::at_most_once(req.headers(), &name)
            .map_err(|e| bad(e.to_string()))?;
    }
    let taken =
        tollgate_edge::query::take_param(query, &loc.query).map_err(|e| bad(e.to_string()))?;
    let from_query = taken.value;
    found.query = taken.rest;
    // An empty header or parameter counts as no key. A header that is not text cannot hold a
    // key we issued; it is kept as an (invalid) key rather than ignored.
    let from_header = req
        .headers()
        .get(loc.header.as_str())
        .map(|v| v.to_str().unwrap_or("\u{fffd}").trim().to_owned());
    let presented = from_header
        .filter(|k| !k.is_empty())
        .or(from_query.filter(|k| !k.is_empty()));
    let deny = |reason: String, body: &'static str| {
        let mut r = Reject::new(StatusCode::UNAUTHORIZED, reason);
        r.body = Some(Bytes::from(format!("{body}\n")));
        r
    };
    let Some(key) = presented else {
        return match &api.open_product {
            Some(p) => {
                found.product = Some(p.clone());
                Ok(found)
            }
            None => Err(deny(
                format!(
                    "missing subscription key (header {}, query parameter {})",
                    loc.header, loc.query
                ),
                MISSING_KEY,
            )),
        };
    };
    let digest = crate::manifest::key_digest(&key);
    match keys.by_digest(&digest) {
        Some((sub, token)) if api.config.products.contains(&sub.product) => {
            found.product = Some(sub.product.clone());
            found.subscription = Some(sub.clone());
            found.key_token = Some(token.clone());
            found.key_digest = Some(digest);
            Ok(found)
        }
        // Logged by subscription name, never by key.
        Some((sub, _)) => Err(deny(
            format!(
                "subscription `{}` is for product `{}`, which does not publish API `{}`",
                sub.name, sub.product, api.config.name
            ),
            INVALID_KEY,
        )),
        None => Err(deny("unknown subscription key".into(), INVALID_KEY)),
    }
}

/// Phase 4: a connection slot, or 429 (subscription) / 503 (API, gateway).
pub fn admit(
    global: &Arc<std::sync::atomic::AtomicUsize>,
    global_max: usize,
    api: &Arc<Api>,
    subscription: Option<&Arc<Subscription>>,
) -> Result<Permit, (Reject, LimitReached)> {
    Permit::acquire(global, global_max, api, subscription)
        .map_err(|full| (limit_reject(full), full))
}

/// The answer to a handshake a limit refused.
fn limit_reject(full: LimitReached) -> Reject {
    let (status, retry) = match full {
        LimitReached::Subscription => (StatusCode::TOO_MANY_REQUESTS, SUBSCRIPTION_RETRY_AFTER),
        LimitReached::Api | LimitReached::Gateway => (StatusCode::SERVICE_UNAVAILABLE, "1"),
    };
    let mut r = Reject::new(status, full.reason());
    r.headers
        .push((header::RETRY_AFTER, HeaderValue::from_static(retry)));
    r
}

/// Phase 4, clustered: the subscription's and the API's `max_connections` counted across every
/// gateway sharing the store, in one round trip bounded by `store_timeout` (after the local
/// slot, so a gateway never asks the store for what it would refuse anyway). Nothing to ask
/// when neither has a limit.
async fn admit_in_fleet(
    fleet: &Arc<crate::cluster::Fleet>,
    api: &Arc<Api>,
    subscription: Option<&Arc<Subscription>>,
) -> Result<Option<crate::cluster::FleetSlot>, (Reject, Option<LimitReached>)> {
    use crate::cluster::{Refusal, Want};
    let mut wants = Vec::with_capacity(2);
    let mut limits = Vec::with_capacity(2);
    if let Some(s) = subscription {
        if let Some(max) = s.max_connections {
            wants.push(Want {
                thing: crate::cluster::subscription_thing(&s.product, &s.name),
                limit: u64::try_from(max).unwrap_or(u64::MAX),
                here: &s.active,
            });
            limits.push(LimitReached::Subscription);
        }
    }
    if let Some(max) = api.config.max_connections {
        wants.push(Want {
            thing: crate::cluster::api_thing(&api.config.name),
            limit: u64::try_from(max).unwrap_or(u64::MAX),
            here: &api.active,
        });
        limits.push(LimitReached::Api);
    }
    match fleet.admit(&wants).await {
        Ok(slot) => Ok(slot),
        Err(Refusal::Full { index }) => {
            let full = limits.get(index).copied().unwrap_or(LimitReached::Api);
            Err((limit_reject(full), Some(full)))
        }
        Err(Refusal::StoreUnavailable) => {
            let mut r = Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the fleet's store is unavailable (on_store_failure = \"closed\")",
            );
            r.headers
                .push((header::RETRY_AFTER, HeaderValue::from_static("1")));
            Err((r, None))
        }
    }
}

/// The handshake's own headers and the forwarding ones, which the gateway sets itself on the
/// backend request (besides the hop-by-hop ones, which no proxy passes on).
const SET_BY_GATEWAY: &[&str] = &[
    "host",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-accept",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
];

/// Headers a client's request or a backend's 101 does not pass on as they are.
fn not_forwarded(lower: &str) -> bool {
    tollgate_edge::headers::HOP_BY_HOP.contains(&lower) || SET_BY_GATEWAY.contains(&lower)
}

/// The request the backend gets.
pub struct BackendRequest {
    /// Path and query.
    pub target: String,
    pub headers: HeaderMap,
}

/// Phase 5: builds the backend request. End-to-end headers (Origin, Cookie, Authorization,
/// Sec-WebSocket-Protocol/-Extensions, custom ones) are forwarded; hop-by-hop ones, including
/// any the client named in `Connection`, are not.
pub fn backend_request<B>(
    conn: &Conn,
    trusted_proxy: bool,
    routed: &Routed,
    subscribed: &Subscribed,
    req: &Request<B>,
) -> BackendRequest {
    let api = &routed.api;
    let src = req.headers();
    let named_hop: Vec<String> = header_tokens(src, &header::CONNECTION)
        .map(|t| t.to_ascii_lowercase())
        .collect();
    let mut headers = HeaderMap::with_capacity(src.len() + 6);
    for (name, value) in src {
        let n = name.as_str();
        if not_forwarded(n)
            || named_hop.iter().any(|h| h == n)
            || subscribed.key_header.as_deref() == Some(n)
        {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    let url = api.connector.url();
    crate::backend::opening_headers(url, &mut headers);
    // A client's own forwarding headers are passed on only from a trusted proxy, extended;
    // from anyone else they are replaced by the address the gateway saw.
    let joined = |name: &str| {
        let all: Vec<&str> = src
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!all.is_empty()).then(|| all.join(", "))
    };
    let (xff, fwd, real) = (
        joined("x-forwarded-for"),
        joined("forwarded"),
        joined("x-real-ip"),
    );
    let proto = conn.scheme.http();
    let f = tollgate_edge::forwarded::forwarding(
        conn.client_addr.ip(),
        proto,
        trusted_proxy,
        &tollgate_edge::forwarded::Sent {
            x_forwarded_for: xff.as_deref(),
            forwarded: fwd.as_deref(),
            x_real_ip: real.as_deref(),
        },
    );
    for (name, value) in [
        ("x-forwarded-for", f.x_forwarded_for),
        ("forwarded", f.forwarded),
        ("x-real-ip", f.x_real_ip),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Some(host) = src.get(header::HOST) {
        headers.insert("x-forwarded-host", host.clone());
    }
    BackendRequest {
        target: url.request_target(&routed.remainder, subscribed.query.as_deref()),
        headers,
    }
}

/// Points the backend request at a named backend a policy picked: its Host and its path (the
/// API's `remainder` under the named backend's path), keeping the query as the policies left
/// it. Backends of an API with named backends carry no query of their own (the manifest
/// refuses it), so the query part is the client's alone.
fn retarget(breq: &mut BackendRequest, routed: &Routed, url: &crate::manifest::BackendUrl) {
    let query = breq.target.split_once('?').map(|(_, q)| q.to_owned());
    breq.target = url.request_target(&routed.remainder, query.as_deref());
    crate::backend::opening_headers(url, &mut breq.headers);
}

/// The request as policies see it (the `request` resource of `wit/policy.wit`).
pub fn policy_request<B>(
    conn: &Conn,
    trusted_proxies: &tollgate_edge::forwarded::TrustedProxies,
    routed: &Routed,
    subscribed: &Subscribed,
    req: &Request<B>,
) -> crate::policy::Request {
    // The query as forwarded (without the subscription key).
    let query = subscribed
        .query
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let mut headers = req.headers().clone();
    if let Some(k) = subscribed.key_header.as_deref() {
        headers.remove(k);
    }
    crate::policy::Request {
        method: req.method().clone(),
        path: routed.path.clone(),
        query,
        headers,
        client: conn.client_addr,
        client_ip: {
            // Raw bytes: a line with a byte that is not visible ASCII must not vanish (the walk
            // would then stop at the trusted proxy itself).
            let xff: Vec<&[u8]> = req
                .headers()
                .get_all("x-forwarded-for")
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            tollgate_edge::forwarded::client_ip(conn.client_addr.ip(), trusted_proxies, &xff)
        },
        tls: conn.tls.clone(),
        api: Arc::from(routed.api.config.name.as_str()),
        product: subscribed.product.clone(),
        context: gateway_context(subscribed),
        received_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
}

/// What the gateway knows before any policy runs: `product.name`, `subscription.name`.
fn gateway_context(subscribed: &Subscribed) -> Vec<(String, String)> {
    subscribed
        .product
        .iter()
        .map(|p| ("product.name".to_owned(), p.clone()))
        .chain(
            subscribed
                .subscription
                .iter()
                .map(|s| ("subscription.name".to_owned(), s.name.clone())),
        )
        .collect()
}

/// The policy chain's outcome as the client's answer: a policy's own refusal as it made it, a
/// failed policy as its attachment's `failure_status` with a generic body (the error is in the
/// `policy_error` record the chain logged).
pub fn policy_outcome(
    outcome: crate::policy::chain::Outcome,
) -> Result<crate::policy::chain::Effects, Reject> {
    use crate::policy::chain::Outcome;
    match outcome {
        Outcome::Proceed(effects) => Ok(effects),
        Outcome::Reject(r) => {
            let mut rej = Reject::new(r.status, format!("rejected by policy `{}`", r.plugin));
            rej.headers = r.headers;
            rej.body = Some(r.body);
            Err(rej)
        }
        Outcome::Failed(f) => Err(Reject::new(
            f.status,
            format!("policy `{}` failed", f.plugin),
        )),
    }
}

/// What a policy learns about a wss client's TLS session.
pub fn tls_facts(conn: &rustls::ServerConnection) -> TlsInfo {
    TlsInfo {
        version: conn
            .protocol_version()
            .and_then(|v| v.as_str())
            .unwrap_or("unknown")
            .replace("TLSv1_", "TLSv1."),
        cipher_suite: conn
            .negotiated_cipher_suite()
            .and_then(|c| c.suite().as_str())
            .unwrap_or("unknown")
            .to_owned(),
        server_name: conn.server_name().map(str::to_owned),
    }
}

/// Turns a failed backend handshake into the client's answer.
pub fn backend_reject(e: BackendError) -> Reject {
    let status = e.client_status();
    let reason = e.to_string();
    match e {
        BackendError::Rejected {
            status: s,
            headers,
            body,
        } if s.as_u16() >= 300 => {
            let mut r = Reject::new(status, reason);
            // Pass on what tells the client how to proceed; nothing that configures the
            // connection itself.
            for name in [
                header::CONTENT_TYPE,
                header::WWW_AUTHENTICATE,
                header::RETRY_AFTER,
                header::LOCATION,
            ] {
                for v in headers.get_all(&name) {
                    r.headers.push((name.clone(), v.clone()));
                }
            }
            r.body = Some(body);
            r
        }
        _ => Reject::new(status, reason),
    }
}

/// Phase 8: the client's 101, carrying the backend's chosen subprotocol and extensions and its
/// other end-to-end headers (e.g. Set-Cookie).
pub fn switching_protocols(
    upgrade: &Upgrade,
    backend: &Upgraded,
    extra: Vec<(HeaderName, HeaderValue)>,
) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::new());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    // Headers the backend's Connection nominates are hop-by-hop too (RFC 9110 section 7.6.1).
    let named_hop: Vec<String> = header_tokens(&backend.headers, &header::CONNECTION)
        .map(|t| t.to_ascii_lowercase())
        .collect();
    let h = resp.headers_mut();
    for (name, value) in &backend.headers {
        let n = name.as_str();
        if not_forwarded(n) || n == "date" || n == "server" || named_hop.iter().any(|t| t == n) {
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    for (k, v) in extra {
        h.append(k, v);
    }
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&wskey::accept_for(&upgrade.client_key)) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}
