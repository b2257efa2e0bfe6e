//! The admin listener. Bind it to localhost or a private network; it answers only the Host
//! names it is known by, and can require a token.
//!
//! - `GET /healthz`: 200 while the process is up and its event loop answers (liveness).
//! - `GET /readyz`: 200 once the manifest is loaded, every plugin is loaded and checked, and
//!   every listener is bound, and while not draining; 503 otherwise (a load balancer takes the
//!   gateway out of rotation during shutdown).
//! - `GET /metrics`: Prometheus metrics ([`crate::metrics`]).
//! - `GET /apis`: the served APIs as JSON (see [`apis_json`]).
//! - `GET /console`: the web test console ([`crate::console`]); `/console/probe` repeats a
//!   handshake for it.
//!
//! Every request is checked by [`Guard::admit`] before it is routed:
//! - its `Host` (and an absolute-form target's authority) must be one of the listener's names:
//!   `localhost`, `127.0.0.1`, `[::1]`, the address the connection reached, or a name in
//!   `admin.allowed_hosts`, with or without the listener's port; else 421. A web page that
//!   rebinds its own DNS name to this address still sends its own name, so it can neither read
//!   `/apis` nor make the gateway probe for it. A missing, repeated or malformed Host is 400.
//! - with `admin.token_env` / `admin.token_sha256`, every path but `/healthz`, `/readyz` and
//!   the console's static page needs `Authorization: Bearer TOKEN` (digests compared in
//!   constant time); else 401 with `WWW-Authenticate: Bearer`.
//! - `/console/probe` makes a real handshake, so it also refuses (403) a browser request
//!   another site started (`Sec-Fetch-Site` other than `same-origin`/`none`, or a foreign
//!   `Origin`): without a token, a page elsewhere could otherwise fire probes through the
//!   user's browser.
//!
//! The listener itself is bounded: at most [`MAX_CONNECTIONS`] connections at once (the next
//! is closed at once), [`HEADER_READ_TIMEOUT`] to send a request head, at most
//! [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] in it (over it: 431).

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::manifest::{AdminConfig, KeyDigest, Scheme};
use crate::metrics::Metrics;
use crate::served::Current;
pub use tollgate_edge::host::HostName;

/// Admin connections served at once; one more is closed as soon as it is accepted. Scrapers,
/// probes and a few console tabs need a handful; the cap keeps a flood from holding memory
/// and tasks.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a request head (also the longest a kept-alive connection may
/// idle before its next request).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) accepted; over it: 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header fields in a request head; over it: 431.
pub const MAX_HEADERS: usize = 64;

/// The token of an `Authorization: Bearer TOKEN` value (the scheme is case-insensitive).
pub fn bearer_token(value: &[u8]) -> Option<&str> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim_start();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

/// Paths served without the admin token: the health checks (load balancers and orchestrators
/// probe them without credentials) and the console's static page (it holds no data, and a
/// browser cannot attach a header to a page it navigates to; the page asks for the token and
/// sends it on its own requests).
fn token_exempt(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/console" | "/console/")
}

/// Why a request was refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Host missing, repeated or malformed: 400.
    BadHost,
    /// A Host this listener is not known by: 421.
    UnknownHost,
    /// Token required and missing or wrong: 401.
    Unauthorized,
    /// `/console/probe` asked for by another site's page: 403.
    CrossSite,
}

impl Refusal {
    fn response(self) -> Response<Full<Bytes>> {
        let (status, body) = match self {
            Refusal::BadHost => (
                StatusCode::BAD_REQUEST,
                "bad request: exactly one valid Host header is needed\n",
            ),
            Refusal::UnknownHost => (
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected request: this admin listener does not answer to that host name (see admin.allowed_hosts)\n",
            ),
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized: send the admin token as Authorization: Bearer TOKEN\n",
            ),
            Refusal::CrossSite => (
                StatusCode::FORBIDDEN,
                "forbidden: the probe only answers the console's own page\n",
            ),
        };
        let mut r = text(status, body);
        if self == Refusal::Unauthorized {
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"tollgate-admin\""),
            );
        }
        r
    }
}

/// What the admin listener checks on every request: the names it answers to and its token.
pub struct Guard {
    /// Names with `port: None` match with or without [`Guard::port`].
    names: Vec<HostName>,
    /// The listener's bound port.
    port: u16,
    token: Option<KeyDigest>,
}

impl Guard {
    /// `bound`: the address the listener is bound to (its real port when the manifest said 0).
    pub fn new(config: &AdminConfig, bound: SocketAddr) -> Guard {
        let mut names = vec![
            HostName::ip(Ipv4Addr::LOCALHOST.into()),
            HostName::ip(Ipv6Addr::LOCALHOST.into()),
            HostName::localhost(),
        ];
        if !bound.ip().is_unspecified() {
            names.push(HostName::ip(bound.ip()));
        }
        names.extend(config.allowed_hosts.iter().cloned());
        Guard {
            names,
            port: bound.port(),
            token: config.token,
        }
    }

    /// Whether `host` names this listener. `local`: the address the connection reached; on a
    /// listener bound to 0.0.0.0 or [::] that is how a client on the network names it (an IP
    /// literal, which no other site's page can send as its own name).
    fn knows(&self, host: &HostName, local: IpAddr) -> bool {
        let port_ok = |entry: Option<u16>| match (entry, host.port()) {
            (Some(e), Some(h)) => e == h,
            (Some(_), None) => false,
            (None, None) => true,
            (None, Some(h)) => h == self.port,
        };
        let mut local_names = vec![HostName::ip(local)];
        if let IpAddr::V6(v6) = local {
            if let Some(v4) = v6.to_ipv4_mapped() {
                local_names.push(HostName::ip(v4.into()));
            }
        }
        self.names
            .iter()
            .chain(&local_names)
            .any(|n| n.name() == host.name() && port_ok(n.port()))
    }

    /// Admits `req` (which reached the listener at `local`) or says why not.
    pub fn admit<B>(&self, req: &Request<B>, local: IpAddr) -> Result<(), Refusal> {
        let mut hosts = req.headers().get_all(http::header::HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (Some(h), None) => h,
            _ => return Err(Refusal::BadHost),
        };
        let host = host
            .to_str()
            .ok()
            .and_then(|h| HostName::parse(h).ok())
            .ok_or(Refusal::BadHost)?;
        if !self.knows(&host, local) {
            return Err(Refusal::UnknownHost);
        }
        // An absolute-form target (`GET http://name/apis`) names the host the client meant.
        if let Some(a) = req.uri().authority() {
            let target = HostName::parse(a.as_str()).map_err(|_| Refusal::BadHost)?;
            if !self.knows(&target, local) {
                return Err(Refusal::UnknownHost);
            }
        }
        let path = req.uri().path();
        if !token_exempt(path) {
            self.check_token(req.headers())?;
        }
        if matches!(
            path,
            "/console/probe" | "/console/watch" | "/console/events"
        ) && !self.same_site(req.headers(), local)
        {
            return Err(Refusal::CrossSite);
        }
        Ok(())
    }

    fn check_token(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        let Some(want) = &self.token else {
            return Ok(());
        };
        let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
        let presented = match (all.next(), all.next()) {
            (Some(v), None) => bearer_token(v.as_bytes()),
            _ => None,
        };
        let Some(token) = presented else {
            return Err(Refusal::Unauthorized);
        };
        if bool::from(crate::manifest::key_digest(token).ct_eq(want)) {
            Ok(())
        } else {
            Err(Refusal::Unauthorized)
        }
    }

    /// A browser marks requests other sites' pages make (`Sec-Fetch-Site`, and `Origin` on
    /// cross-origin ones); other clients send neither.
    fn same_site(&self, headers: &HeaderMap, local: IpAddr) -> bool {
        let site_ok = headers
            .get("sec-fetch-site")
            .is_none_or(|v| matches!(v.as_bytes(), b"same-origin" | b"none"));
        let origin_ok = headers.get(http::header::ORIGIN).is_none_or(|o| {
            o.to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://").or(o.strip_prefix("https://")))
                .and_then(|h| HostName::parse(h).ok())
                .is_some_and(|h| self.knows(&h, local))
        });
        site_ok && origin_ok
    }
}

/// Warns when the admin listener is reachable from other hosts without a token (`tollgate
/// check` prints it; `tollgate run` logs it at start).
pub fn warn_if_exposed(config: &crate::manifest::Config) {
    if let Some(a) = &config.admin {
        if !a.listen.ip().is_loopback() && a.token.is_none() {
            tracing::warn!(
                event = "admin_exposed",
                addr = %a.listen,
                "admin listener on a non-loopback address without a token: anyone who can reach it reads /apis and /metrics and can use /console/probe; set admin.token_env or admin.token_sha256, or listen on 127.0.0.1"
            );
        }
    }
}

/// What the admin listener reads of the running gateway: a narrow view, never the gateway
/// itself, so nothing here can start, stop or reconfigure it.
#[derive(Clone)]
pub struct View {
    /// The served state (`/apis` follows reloads).
    pub current: Arc<Current>,
    pub metrics: Arc<Metrics>,
    /// Serving: `/readyz` answers 200.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// The client listeners' addresses, once bound (`/apis`, the console's probe).
    pub listeners: Arc<std::sync::OnceLock<Vec<(Scheme, SocketAddr)>>>,
    /// The fleet (`[cluster]`): its counts, as last read, go into `/apis`.
    pub fleet: Option<Arc<crate::cluster::Fleet>>,
    /// The web console's watches (`/console/watch`, `/console/events`).
    pub watches: Arc<crate::watch::Watches>,
}

/// Serves until the process exits, or until `handed_over` (a binary upgrade: the new process
/// accepts on the same socket from then on).
pub async fn serve(
    listener: TcpListener,
    config: AdminConfig,
    gw: View,
    handed_over: tokio_util::sync::CancellationToken,
) {
    let bound = listener.local_addr().unwrap_or(config.listen);
    let guard = Arc::new(Guard::new(&config, bound));
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    // Serves until the process exits, drain included: `/readyz` answers 503 while draining
    // instead of refusing connections.
    loop {
        let accepted = tokio::select! {
            _ = handed_over.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, _) = match accepted {
            Ok(a) => a,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Over the cap: dropped here, which closes it.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let local = tcp.local_addr().map_or(bound.ip(), |a| a.ip());
        let gw = gw.clone();
        let guard = guard.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let gw = gw.clone();
                let guard = guard.clone();
                async move {
                    Ok::<_, Infallible>(match guard.admit(&req, local) {
                        Ok(()) => route(&gw, &req).await,
                        Err(r) => r.response(),
                    })
                }
            });
            let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
            drop(slot);
        });
    }
}

/// The console's watch answers: never cached (a token, a connection's events).
fn json_response(v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

async fn route<B>(gw: &View, req: &Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(
        path,
        "/console"
            | "/console/"
            | "/console/probe"
            | "/console/watch"
            | "/console/events"
            | "/apis"
            | "/metrics"
            | "/healthz"
            | "/readyz"
    );
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    if path == "/console" || path == "/console/" {
        let mut r = Response::new(Full::new(Bytes::from_static(
            include_str!("console.html").as_bytes(),
        )));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/html; charset=utf-8"),
        );
        return r;
    }
    if path == "/console/probe" {
        let origin = req
            .headers()
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        let listeners = gw.listeners.get().map(Vec::as_slice).unwrap_or_default();
        let answer =
            crate::console::probe(listeners, req.uri().query().unwrap_or(""), origin).await;
        let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    // The console's watch of its next connection: a token it offers as a subprotocol
    // (`tollgate-console.<token>`), then the events of that connection's messages.
    if path == "/console/watch" {
        // A HEAD would make (and push out) a watch that nobody reads.
        if req.method() != Method::GET {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("GET"));
            return r;
        }
        let token = gw.watches.issue();
        return json_response(serde_json::json!({
            "watch": token,
            "protocol": format!("{}{token}", crate::watch::WATCH_PROTOCOL_PREFIX),
        }));
    }
    if path == "/console/events" {
        let (mut watch, mut after) = (String::new(), 0u64);
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match &*k {
                "watch" => watch = v.into_owned(),
                "after" => after = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        return match gw.watches.events(&watch, after) {
            Some(events) => json_response(events),
            None => text(
                StatusCode::NOT_FOUND,
                "no such watch (expired or never issued)\n",
            ),
        };
    }
    if path == "/apis" {
        let mut r = Response::new(Full::new(Bytes::from(apis_json(gw).to_string())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    if path == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(gw.metrics.encode())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        return r;
    }
    match path {
        "/readyz" if gw.ready.load(Ordering::SeqCst) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::OK, "ok\n"),
    }
}

/// The served APIs, from the state new handshakes use now (so it follows reloads): names,
/// paths, schemes, backend, products, limits, live connection counts and the policy chain
/// (plugin, version, scope, instance strategy), and the products with their subscriptions'
/// names, limits and live counts. Policy *configs* and subscription keys are left out.
pub fn apis_json(gw: &View) -> serde_json::Value {
    use serde_json::json;
    let served = gw.current.get();
    let listeners: Vec<_> = gw
        .listeners
        .get()
        .map(|b| {
            b.iter()
                .map(|(scheme, addr)| json!({"scheme": scheme.as_str(), "addr": addr.to_string()}))
                .collect()
        })
        .unwrap_or_default();
    let mut apis: Vec<_> = served
        .routes
        .apis()
        .iter()
        .map(|a| {
            let c = &a.config;
            let mut schemes = Vec::new();
            if c.schemes.ws {
                schemes.push("ws");
            }
            if c.schemes.wss {
                schemes.push("wss");
            }
            let policies: Vec<_> = a
                .chain
                .iter()
                .map(|s| {
                    json!({
                        "plugin": s.plugin.name,
                        "version": s.plugin.version,
                        "scope": match &s.scope {
                            crate::policy::capabilities::Scope::Global => "global".to_owned(),
                            crate::policy::capabilities::Scope::Product(p) => format!("product:{p}"),
                            crate::policy::capabilities::Scope::Api(_) => "api".to_owned(),
                        },
                        "instances": if s.pool.is_some() { "pooled" } else { "fresh" },
                        "skipped": s.skip,
                        // Keys fetched for it (key-sets): source, key ids, age, last error.
                        "key_sets": s.key_sets.iter().map(|k| k.status()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "name": c.name,
                "display_name": c.display_name,
                "url_suffix": c.url_suffix,
                "path": format!("/{}", c.url_suffix),
                "schemes": schemes,
                "backend": c.backend.original,
                // The named backends a policy may pick (set-backend-service), by name.
                "backends": c.backends.iter().map(|(n, b)| (n.clone(), json!(b.original))).collect::<serde_json::Map<_, _>>(),
                "products": c.products,
                // Where a subscription key goes, for APIs in products (the console shows it).
                "subscription_key": (!c.products.is_empty()).then(|| json!({
                    "header": c.subscription_key.header,
                    "query": c.subscription_key.query,
                    "required": a.open_product.is_none(),
                })),
                "max_connections": c.max_connections,
                "active_connections": a.active.load(Ordering::Relaxed),
                // Clustered: every gateway's connections, as last read from the store.
                "fleet_active_connections": gw.fleet.as_ref().and_then(|f| f.fleet_count(&crate::cluster::api_thing(&c.name))),
                "policies": policies,
            })
        })
        .collect();
    apis.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
    // Subscriptions by name with their live counts; never a key or a digest.
    let products: Vec<_> = served
        .config
        .products
        .iter()
        .map(|p| {
            let subscriptions: Vec<_> = served
                .keys
                .all()
                .iter()
                .filter(|s| s.product == p.name)
                .map(|s| {
                    json!({
                        "name": s.name,
                        "max_connections": s.max_connections,
                        "active_connections": s.active.load(Ordering::Relaxed),
                        "fleet_active_connections": gw.fleet.as_ref().and_then(|f| f.fleet_count(&crate::cluster::subscription_thing(&s.product, &s.name))),
                    })
                })
                .collect();
            json!({
                "name": p.name,
                "display_name": p.display_name,
                "subscription_required": p.subscription_required,
                "apis": served
                    .config
                    .apis
                    .iter()
                    .filter(|a| a.products.contains(&p.name))
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>(),
                "policies": p.policies.iter().map(|a| a.plugin.as_str()).collect::<Vec<_>>(),
                "subscriptions": subscriptions,
            })
        })
        .collect();
    json!({
        "gateway": served.config.gateway.name,
        "listeners": listeners,
        "apis": apis,
        "products": products,
        // Clustered: this gateway's id, the live gateways, whether the store answers, and
        // when the fleet-wide counts above were read (once per heartbeat interval).
        "fleet": gw.fleet.as_ref().map(|f| f.status()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(listen: &str, allowed: &[&str], token: Option<&str>) -> Guard {
        let config = AdminConfig {
            listen: listen.parse().unwrap(),
            allowed_hosts: allowed
                .iter()
                .map(|h| HostName::parse(h).unwrap())
                .collect(),
            token: token.map(crate::manifest::key_digest),
        };
        let bound = SocketAddr::new(config.listen.ip(), 9090);
        Guard::new(&config, bound)
    }

    fn req(path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn loopback_names_own_address_and_allowed_hosts_are_known_with_or_without_the_port() {
        let g = guard(
            "127.0.0.1:0",
            &["admin.internal", "proxy.example:8443"],
            None,
        );
        for ok in [
            "localhost",
            "localhost:9090",
            "127.0.0.1",
            "127.0.0.1:9090",
            "[::1]",
            "[::1]:9090",
            "ADMIN.internal:9090",
            "proxy.example:8443",
        ] {
            assert_eq!(g.admit(&req("/apis", &[("host", ok)]), LO), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9090",
            "localhost:9091",
            "admin.internal:80",
            "proxy.example",
            "10.0.0.5:9090",
        ] {
            assert_eq!(
                g.admit(&req("/apis", &[("host", bad)]), LO),
                Err(Refusal::UnknownHost),
                "{bad}"
            );
        }
        // Missing, repeated, malformed.
        assert_eq!(g.admit(&req("/apis", &[]), LO), Err(Refusal::BadHost));
        assert_eq!(
            g.admit(
                &req("/apis", &[("host", "localhost"), ("host", "localhost")]),
                LO
            ),
            Err(Refusal::BadHost)
        );
        assert_eq!(
            g.admit(&req("/apis", &[("host", "local host")]), LO),
            Err(Refusal::BadHost)
        );
        // An absolute-form target must name the listener too.
        assert_eq!(
            g.admit(
                &req("http://evil.example/apis", &[("host", "localhost")]),
                LO
            ),
            Err(Refusal::UnknownHost)
        );
    }

    #[test]
    fn on_a_wildcard_listener_the_address_the_connection_reached_is_known() {
        let g = guard("0.0.0.0:0", &[], None);
        let local: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(
            g.admit(&req("/apis", &[("host", "10.0.0.5:9090")]), local),
            Ok(())
        );
        assert_eq!(
            g.admit(&req("/apis", &[("host", "10.0.0.6:9090")]), local),
            Err(Refusal::UnknownHost)
        );
        assert_eq!(
            g.admit(&req("/apis", &[("host", "0.0.0.0:9090")]), local),
            Err(Refusal::UnknownHost)
        );
        // An IPv4 client on a dual-stack socket.
        let mapped: IpAddr = "::ffff:10.0.0.5".parse().unwrap();
        assert_eq!(
            g.admit(&req("/apis", &[("host", "10.0.0.5")]), mapped),
            Ok(())
        );
    }

    /// `/readyz` answers 503 until `run` has bound every listener and started serving. Plugins
    /// load in `Gateway::build`, before the admin listener is bound, so the window is too short
    /// to catch from outside the process: the state is checked here instead.
    #[tokio::test]
    async fn readyz_is_503_until_the_gateway_serves_and_healthz_is_200_throughout() {
        let text = "[gateway]\nname = \"t\"\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://127.0.0.1:9/\"\n";
        let config = crate::manifest::parse(std::path::Path::new("t.toml"), text).unwrap();
        let metrics = Arc::new(Metrics::new());
        let served = crate::served::Served::build(
            config,
            None,
            &metrics,
            &tokio_util::sync::CancellationToken::new(),
        )
        .unwrap_or_else(|_| panic!("the test manifest builds"));
        let gw = View {
            current: Arc::new(Current::new(served)),
            metrics,
            ready: Default::default(),
            listeners: Default::default(),
            fleet: None,
            watches: Default::default(),
        };
        let get = |path: &str| req(path, &[("host", "localhost")]);
        assert_eq!(route(&gw, &get("/readyz")).await.status(), 503);
        assert_eq!(route(&gw, &get("/healthz")).await.status(), 200);
        gw.ready.store(true, Ordering::SeqCst);
        assert_eq!(route(&gw, &get("/readyz")).await.status(), 200);
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_value() {
        assert_eq!(bearer_token(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"bearer   abc "), Some("abc"));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer a b"), None);
        assert_eq!(bearer_token(b"Bearer \xff"), None);
    }

    #[test]
    fn with_a_token_everything_but_the_health_checks_and_the_page_needs_it() {
        let token = "0123456789abcdef-admin";
        let g = guard("127.0.0.1:0", &[], Some(token));
        let host = ("host", "127.0.0.1:9090");
        let good = format!("Bearer {token}");
        for open in ["/healthz", "/readyz", "/console"] {
            assert_eq!(g.admit(&req(open, &[host]), LO), Ok(()), "{open}");
        }
        for closed in ["/apis", "/metrics", "/console/probe", "/nothing"] {
            assert_eq!(
                g.admit(&req(closed, &[host]), LO),
                Err(Refusal::Unauthorized),
                "{closed}"
            );
            assert_eq!(
                g.admit(
                    &req(
                        closed,
                        &[host, ("authorization", "Bearer 0123456789abcdef-admiN")]
                    ),
                    LO
                ),
                Err(Refusal::Unauthorized),
                "{closed}"
            );
            assert_eq!(
                g.admit(&req(closed, &[host, ("authorization", &good)]), LO),
                Ok(()),
                "{closed}"
            );
            // Two Authorization headers: refused, whichever is right.
            assert_eq!(
                g.admit(
                    &req(
                        closed,
                        &[
                            host,
                            ("authorization", &good),
                            ("authorization", "Bearer x")
                        ]
                    ),
                    LO
                ),
                Err(Refusal::Unauthorized)
            );
        }
        // The Host is checked first: a wrong name with the right token is still misdirected.
        assert_eq!(
            g.admit(
                &req(
                    "/apis",
                    &[("host", "evil.example"), ("authorization", &good)]
                ),
                LO
            ),
            Err(Refusal::UnknownHost)
        );
    }

    #[test]
    fn the_probe_refuses_requests_other_sites_start() {
        let g = guard("127.0.0.1:0", &[], None);
        let host = ("host", "127.0.0.1:9090");
        let probe = |extra: &[(&str, &str)]| {
            let mut h = vec![host];
            h.extend_from_slice(extra);
            g.admit(&req("/console/probe?target=/x", &h), LO)
        };
        assert_eq!(probe(&[]), Ok(()));
        assert_eq!(probe(&[("sec-fetch-site", "same-origin")]), Ok(()));
        assert_eq!(probe(&[("origin", "http://127.0.0.1:9090")]), Ok(()));
        assert_eq!(
            probe(&[("sec-fetch-site", "cross-site")]),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            probe(&[("sec-fetch-site", "same-site")]),
            Err(Refusal::CrossSite)
        );
        assert_eq!(
            probe(&[("origin", "https://evil.example")]),
            Err(Refusal::CrossSite)
        );
        assert_eq!(probe(&[("origin", "null")]), Err(Refusal::CrossSite));
        // Other paths only read, which another site's page cannot do anyway.
        assert_eq!(
            g.admit(&req("/apis", &[host, ("sec-fetch-site", "cross-site")]), LO),
            Ok(())
        );
    }
}
