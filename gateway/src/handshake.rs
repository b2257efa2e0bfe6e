//! The handshake pipeline. Each phase of a client's opening handshake is one function, and one
//! [`HandshakeCtx`] carries what the phases learn from one to the next:
//!
//! 1. [`route`]: which API serves this path (404 if none).
//! 2. [`validate_upgrade`]: is this a well-formed RFC 6455 opening handshake (400 / 426).
//! 3. [`subscribe`]: for an API published through products, the subscription key: which
//!    subscription and product the handshake comes in through (401 if none may).
//! 4. [`admit`]: is there room under the subscription's (429), the global and the per-API
//!    (503) connection limits.
//! 5. [`backend_request`]: the request the backend will get (end-to-end headers forwarded,
//!    hop-by-hop ones and the subscription key dropped, `X-Forwarded-*` added). The
//!    onHandshake policy chain ([`crate::policy::chain::run`]) then acts on this request.
//! 6. [`Connector::handshake`](crate::backend::Connector::handshake): the backend handshake
//!    (502 / 504 / the backend's own status).
//! 7. [`switching_protocols`]: the 101 to the client, only after the backend's 101.
//!
//! Then the connection task hands both sockets to the [`relay`](crate::relay).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::backend::{BackendError, Upgraded};
use crate::routes::{Api, LimitReached, Permit, Routes};
use crate::subscriptions::{Keys, Subscription};
use crate::wskey;

/// What the phases learn about one handshake; also the source of its log record.
pub struct HandshakeCtx {
    pub started: Instant,
    pub client_addr: SocketAddr,
    /// `ws` or `wss`: the listener the client came in on.
    pub scheme: crate::manifest::Scheme,
    /// TLS facts of a wss client connection, gathered only when some API has policies.
    pub tls: Option<Arc<crate::policy::TlsInfo>>,
    pub api: Option<Arc<Api>>,
    /// The normalised request path (see [`route`]): what is routed, what policies see and what
    /// the backend path is built from.
    pub path: String,
    /// Path after the API's url_suffix.
    pub remainder: String,
    pub query: Option<String>,
    pub client_key: String,
    pub protocols: Vec<String>,
    pub extensions: Vec<String>,
    /// The product the handshake comes in through (see [`subscribe`]).
    pub product: Option<String>,
    pub subscription: Option<Arc<Subscription>>,
    /// Lower-case name of the subscription-key header, not forwarded anywhere, when the API is
    /// published through products.
    pub key_header: Option<String>,
    /// The peer is one of `[gateway] trusted_proxies`: its forwarding headers are extended.
    pub trusted_proxy: bool,
    /// The key the subscription was found by, ended when a reload revokes it.
    pub key_token: Option<tokio_util::sync::CancellationToken>,
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
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = self.body.unwrap_or_else(|| {
            Bytes::from(format!(
                "{}\n",
                self.status.canonical_reason().unwrap_or("Error")
            ))
        });
        let mut resp = Response::new(Full::new(body));
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
pub fn route<B>(routes: &Routes, ctx: &mut HandshakeCtx, req: &Request<B>) -> Result<(), Reject> {
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
    let allowed = api.config.schemes.serves(ctx.scheme);
    if !allowed {
        return Err(Reject::new(
            StatusCode::NOT_FOUND,
            format!("API {} is not served over {}", api.config.name, ctx.scheme),
        ));
    }
    ctx.remainder = rest.to_owned();
    ctx.query = req.uri().query().map(str::to_owned);
    ctx.api = Some(api.clone());
    ctx.path = norm.path;
    Ok(())
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
pub fn validate_upgrade<B>(ctx: &mut HandshakeCtx, req: &Request<B>) -> Result<(), Reject> {
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
    ctx.client_key = key.to_owned();
    ctx.protocols = header_tokens(h, &header::SEC_WEBSOCKET_PROTOCOL)
        .map(str::to_owned)
        .collect();
    ctx.extensions = header_tokens(h, &header::SEC_WEBSOCKET_EXTENSIONS)
        .filter_map(|e| e.split(';').next())
        .map(|e| e.trim().to_owned())
        .collect();
    Ok(())
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
    ctx: &mut HandshakeCtx,
    api: &Api,
    req: &Request<B>,
) -> Result<(), Reject> {
    if api.config.products.is_empty() {
        return Ok(());
    }
    let loc = &api.config.subscription_key;
    ctx.key_header = Some(loc.header.clone());
    let bad = |why: String| Reject::new(StatusCode::BAD_REQUEST, why);
    // Two keys could each be read by someone different (the gateway, a policy, the backend).
    if let Ok(name) = HeaderName::from_bytes(loc.header.as_bytes()) {
        tollgate_edge::headers::at_most_once(req.headers(), &name)
            .map_err(|e| bad(e.to_string()))?;
    }
    let taken = tollgate_edge::query::take_param(ctx.query.as_deref(), &loc.query)
        .map_err(|e| bad(e.to_string()))?;
    let from_query = taken.value;
    ctx.query = taken.rest;
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
                ctx.product = Some(p.clone());
                Ok(())
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
    match keys.find(&key) {
        Some((sub, token)) if api.config.products.contains(&sub.product) => {
            ctx.product = Some(sub.product.clone());
            ctx.subscription = Some(sub.clone());
            ctx.key_token = Some(token.clone());
            Ok(())
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
    Permit::acquire(global, global_max, api, subscription).map_err(|full| {
        let (status, retry) = match full {
            LimitReached::Subscription => (StatusCode::TOO_MANY_REQUESTS, SUBSCRIPTION_RETRY_AFTER),
            LimitReached::Api | LimitReached::Gateway => (StatusCode::SERVICE_UNAVAILABLE, "1"),
        };
        let mut r = Reject::new(status, full.reason());
        r.headers
            .push((header::RETRY_AFTER, HeaderValue::from_static(retry)));
        (r, full)
    })
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

/// Phase 4: builds the backend request. End-to-end headers (Origin, Cookie, Authorization,
/// Sec-WebSocket-Protocol/-Extensions, custom ones) are forwarded; hop-by-hop ones, including
/// any the client named in `Connection`, are not.
pub fn backend_request<B>(ctx: &HandshakeCtx, api: &Api, req: &Request<B>) -> BackendRequest {
    let src = req.headers();
    let named_hop: Vec<String> = header_tokens(src, &header::CONNECTION)
        .map(|t| t.to_ascii_lowercase())
        .collect();
    let mut headers = HeaderMap::with_capacity(src.len() + 6);
    for (name, value) in src {
        let n = name.as_str();
        if not_forwarded(n)
            || named_hop.iter().any(|h| h == n)
            || ctx.key_header.as_deref() == Some(n)
        {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    let url = api.connector.url();
    if let Ok(v) = HeaderValue::from_str(&url.host_header()) {
        headers.insert(header::HOST, v);
    }
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
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
    let proto = ctx.scheme.http();
    let f = tollgate_edge::forwarded::forwarding(
        ctx.client_addr.ip(),
        proto,
        ctx.trusted_proxy,
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
        target: url.request_target(&ctx.remainder, ctx.query.as_deref()),
        headers,
    }
}

/// The request as policies see it (the `request` resource of `wit/policy.wit`).
pub fn policy_request<B>(
    ctx: &HandshakeCtx,
    api: &Api,
    req: &Request<B>,
) -> crate::policy::Request {
    // The query as forwarded (without the subscription key).
    let query = ctx
        .query
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let mut headers = req.headers().clone();
    if let Some(k) = ctx.key_header.as_deref() {
        headers.remove(k);
    }
    crate::policy::Request {
        method: req.method().clone(),
        path: ctx.path.clone(),
        query,
        headers,
        client: ctx.client_addr,
        tls: ctx.tls.clone(),
        api: Arc::from(api.config.name.as_str()),
        product: ctx.product.clone(),
        // What the gateway knows before any policy runs.
        context: ctx
            .product
            .iter()
            .map(|p| ("product.name".to_owned(), p.clone()))
            .chain(
                ctx.subscription
                    .iter()
                    .map(|s| ("subscription.name".to_owned(), s.name.clone())),
            )
            .collect(),
        received_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    }
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
pub fn tls_facts(conn: &rustls::ServerConnection) -> crate::policy::TlsInfo {
    crate::policy::TlsInfo {
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

/// Phase 6: the client's 101, carrying the backend's chosen subprotocol and extensions and its
/// other end-to-end headers (e.g. Set-Cookie).
pub fn switching_protocols(
    ctx: &HandshakeCtx,
    backend: &Upgraded,
    extra: Vec<(HeaderName, HeaderValue)>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
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
    if let Ok(v) = HeaderValue::from_str(&wskey::accept_for(&ctx.client_key)) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}
