//! The gateway process: builds the served state from a validated [`Config`], binds the
//! listeners, runs one task per client connection (handshake, then relay), and drains on
//! shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::{self, Connector};
use crate::handshake::{self, HandshakeCtx, Reject};
use crate::manifest::{Config, ListenerTls, Scheme};
use crate::metrics::{Limit, Metrics};
use crate::relay::{self, RelayParams};
use crate::routes::{Api, Permit, Routes};
use crate::stream::Stream;

/// Everything that stops a validated manifest from becoming a running gateway (certificate
/// files that do not parse, listeners that cannot bind...).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{file}: {message}")]
    Tls { file: String, message: String },
    #[error("API `{api}`: {message}")]
    Api { api: String, message: String },
    #[error("{0}")]
    Plugin(String),
    /// Already in the manifest's `file:line:column: key` form (an attachment's plugin).
    #[error("{0}")]
    Located(String),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
}

/// What handshakes are served from: the manifest, its APIs and their policy chains (with the
/// plugins they hold). A reload builds a new one completely, checks and all, and swaps it in
/// at once; a handshake takes the current one when it starts, and an established connection
/// keeps the `Api` (and so the plugins) it was admitted with.
pub struct Served {
    pub config: Config,
    pub routes: Routes,
    /// Some API runs policies (so TLS facts are worth gathering).
    routes_have_policies: bool,
    /// The policy host the chains run in, when any policy is attached.
    host: Option<Arc<crate::policy::PolicyHost>>,
    /// Products' subscriptions, by key digest.
    pub keys: crate::subscriptions::Keys,
}

/// The running gateway's shared state.
pub struct Gateway {
    /// The manifest the process started with: listeners and admin (changing those needs a
    /// restart). Everything else, limits included, is read from [`Gateway::served`].
    pub config: Config,
    served: arc_swap::ArcSwap<Served>,
    tls_acceptor: Option<TlsAcceptor>,
    /// Connections holding a slot (handshakes past admission, and relays).
    pub active: Arc<AtomicUsize>,
    /// Accepted sockets whose handshake has not finished (TLS and HTTP), bounded by
    /// `max_pending_handshakes`: a flood of sockets that never get to admission cannot take
    /// unbounded tasks and memory.
    pending: Arc<AtomicUsize>,
    /// Cancelled to shut the gateway down (SIGTERM/SIGINT). [`Gateway::run`] then stops
    /// accepting, logs `draining` with the connections live at that moment, and only then
    /// cancels `shutdown`: a relay woken by `shutdown` may be gone a moment later, so the count
    /// must be read before.
    pub stop: CancellationToken,
    /// Cancelled by [`Gateway::run`] once the drain starts: every relay sends its 1001s, the
    /// accept loops and the reload watcher end.
    pub shutdown: CancellationToken,
    pub ready: AtomicBool,
    tracker: TaskTracker,
    /// The peak of `tracker`'s connection tasks since memory was last given back.
    bursts: Arc<crate::memory::Bursts>,
    /// Counters and histograms for `/metrics`; one set for the process's life.
    pub metrics: Arc<Metrics>,
    /// The client listeners' bound addresses (`ws`/`wss`), once bound (for `/apis`).
    pub bound: std::sync::OnceLock<Vec<(Scheme, SocketAddr)>>,
    /// Numbers client connections, so a connection's handshake and close records can be
    /// joined (`conn` field).
    next_conn: std::sync::atomic::AtomicU64,
}

impl Served {
    /// Loads the plugins and builds every API (backend connector, policy chain). Collects
    /// every error. `previous`: the state being replaced by a reload, whose per-API connection
    /// counts carry over.
    pub fn build(
        config: Config,
        previous: Option<&Served>,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> Result<Served, Vec<StartError>> {
        let mut errors = Vec::new();
        let has_policies = !config.policies.is_empty()
            || config.products.iter().any(|p| !p.policies.is_empty())
            || config.apis.iter().any(|a| !a.on_handshake.is_empty());
        let mut plugins = std::collections::HashMap::new();
        let mut host = None;
        // One wasm engine for the process's life: a reload with the same host settings reuses
        // it (each engine reserves its own pooling-allocator address space, and engines of
        // older states live as long as connections admitted under them).
        let reuse = previous
            .filter(|p| {
                p.config.gateway.plugin_cache_dir == config.gateway.plugin_cache_dir
                    && p.config.gateway.signature_cache_entries
                        == config.gateway.signature_cache_entries
            })
            .and_then(|p| p.host.clone());
        if let (true, Some(dir)) = (has_policies, &config.gateway.plugin_dir) {
            let made = match reuse {
                Some(h) => Ok(h),
                None => crate::policy::PolicyHost::new(config.gateway.plugin_cache_dir.clone())
                    .map(|mut h| {
                        h.set_signature_cache(config.gateway.signature_cache_entries);
                        h.set_metrics(metrics);
                        Arc::new(h)
                    }),
            };
            match made {
                Ok(h) => {
                    let (loaded, errs) = h.load_dir(dir);
                    errors.extend(errs.into_iter().map(
                        |e| match &config.gateway.plugin_dir_location {
                            Some(at) => StartError::Located(format!("{at}: {e}")),
                            None => StartError::Plugin(e.to_string()),
                        },
                    ));
                    for p in loaded {
                        tracing::info!(event = "plugin_loaded", plugin = %p.name, version = %p.version,
                            capabilities = ?p.capabilities.iter().map(|c| c.name()).collect::<Vec<_>>(), path = %p.path.display(),
                            from_cache = p.from_cache, compile_ms = p.compile_time.as_millis() as u64,
                            "plugin loaded");
                        plugins.insert(p.name.clone(), Arc::new(p));
                    }
                    host = Some(h);
                }
                Err(e) => errors.push(StartError::Plugin(e)),
            }
        }
        let mut apis = Vec::new();
        for a in &config.apis {
            let chain = match &host {
                Some(h) => match crate::policy::chain::build(h, &plugins, &config, a, metrics) {
                    Ok(c) => c,
                    Err(errs) => {
                        errors.extend(errs.into_iter().map(StartError::Located));
                        continue;
                    }
                },
                None => Vec::new(),
            };
            let tls = if a.backend.tls {
                if a.insecure_skip_verify {
                    tracing::warn!(
                        event = "insecure_skip_verify",
                        api = %a.name,
                        backend = %loggable(&a.backend.original, config.gateway.log_query_values),
                        "insecure_skip_verify is set: the backend's certificate is NOT verified; anyone on the path can impersonate it"
                    );
                }
                match backend::client_tls_config(a.ca_file.as_deref(), a.insecure_skip_verify) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        errors.push(StartError::Api {
                            api: a.name.clone(),
                            message: e.to_string(),
                        });
                        continue;
                    }
                }
            } else {
                None
            };
            match Connector::new(
                a.backend.clone(),
                tls,
                config.gateway.limits.backend_timeout,
            ) {
                Ok(connector) => apis.push(Arc::new(Api {
                    config: a.clone(),
                    connector,
                    // Same API as before a reload: keep counting its connections.
                    active: previous
                        .and_then(|p| p.routes.apis().iter().find(|o| o.config.name == a.name))
                        .map(|o| o.active.clone())
                        .unwrap_or_default(),
                    chain,
                    open_product: a
                        .products
                        .iter()
                        .find(|p| {
                            config
                                .products
                                .iter()
                                .any(|c| &c.name == *p && !c.subscription_required)
                        })
                        .cloned(),
                    metrics: metrics.api(&a.name),
                })),
                Err(message) => errors.push(StartError::Api {
                    api: a.name.clone(),
                    message,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let routes_have_policies = apis.iter().any(|a| !a.chain.is_empty());
        let keys = crate::subscriptions::Keys::build(
            &config,
            previous.map(|p| &p.keys),
            metrics,
            shutdown,
        );
        if let Some(path) = &config.gateway.subscription_keys_file {
            crate::subscriptions::warn_if_readable_by_others(path);
        }
        Ok(Served {
            config,
            routes_have_policies,
            routes: Routes::new(apis),
            host,
            keys,
        })
    }
}

impl Gateway {
    /// Builds the served state. Collects every error (for `tollgate check`).
    pub fn build(config: Config) -> Result<Arc<Gateway>, Vec<StartError>> {
        crate::admin::warn_if_exposed(&config);
        let mut errors = Vec::new();
        let tls_acceptor = match &config.gateway.tls {
            Some(t) => match server_tls(t) {
                Ok(a) => Some(a),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
            None => None,
        };
        // Opt-outs of safe defaults are said at every start (and by `tollgate check`).
        let g = &config.gateway;
        if g.log_query_values {
            tracing::warn!(event = "log_query_values", "log_query_values = true: query values (tokens, keys) are written to the logs as sent");
        }
        if !g.trusted_proxies.is_empty() {
            tracing::info!(event = "trusted_proxies", proxies = ?g.trusted_proxies,
                "forwarding headers from these peers are extended; from anyone else they are replaced");
        }
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let served = match Served::build(config.clone(), None, &metrics, &shutdown) {
            Ok(s) if errors.is_empty() => s,
            Ok(_) => return Err(errors),
            Err(e) => {
                errors.extend(e);
                return Err(errors);
            }
        };
        Ok(Arc::new(Gateway {
            config,
            served: arc_swap::ArcSwap::from_pointee(served),
            tls_acceptor,
            active: Arc::new(AtomicUsize::new(0)),
            pending: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
            shutdown,
            ready: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            bursts: Default::default(),
            metrics,
            bound: std::sync::OnceLock::new(),
            next_conn: std::sync::atomic::AtomicU64::new(1),
        }))
    }

    /// The state new handshakes are served from.
    pub fn served(&self) -> Arc<Served> {
        self.served.load_full()
    }

    /// Makes `s` the state new handshakes are served from (see [`crate::reload`]), then ends the
    /// connections of subscription keys it no longer has.
    pub(crate) fn swap_in(&self, s: Served) {
        let new = Arc::new(s);
        let old = self.served.swap(new.clone());
        new.keys.revoke_missing(&old.keys);
    }

    /// Binds every listener, then serves until [`Gateway::shutdown`] is cancelled, then drains:
    /// live connections get close 1001 on both sides and up to `drain_timeout` to finish.
    pub async fn run(self: Arc<Self>) -> Result<(), StartError> {
        let mut listeners = Vec::new();
        let backlog = client_backlog(self.config.gateway.limits.max_pending_handshakes);
        if let Some(addr) = self.config.gateway.listen {
            listeners.push((bind(addr, backlog, "ws listener")?, Scheme::Ws));
        }
        if let Some(t) = &self.config.gateway.tls {
            listeners.push((bind(t.listen, backlog, "wss listener")?, Scheme::Wss));
        }
        let admin = match &self.config.admin {
            // The admin listener serves at most 64 connections at once.
            Some(a) => Some(bind(a.listen, 128, "admin listener")?),
            None => None,
        };
        let mut bound = Vec::new();
        for (l, scheme) in &listeners {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(event = "listening", scheme = scheme.as_str(), addr = %addr, "listening");
                bound.push((*scheme, addr));
            }
        }
        let _ = self.bound.set(bound);
        if let Some(a) = admin {
            if let Ok(addr) = a.local_addr() {
                tracing::info!(event = "listening", scheme = "admin", addr = %addr, "admin listening");
            }
            tokio::spawn(crate::admin::serve(a, self.clone()));
        }
        for api in self.served().routes.apis() {
            tracing::info!(
                event = "api_served",
                api = %api.config.name,
                url_suffix = %api.config.url_suffix,
                backend = %loggable(&api.config.backend.original, self.config.gateway.log_query_values),
                "serving API"
            );
        }
        for name in &self.config.unserved_apis {
            tracing::info!(event = "api_not_served", api = %name, gateway = %self.config.gateway.name,
                "API not served: its `gateways` list does not name this gateway");
        }
        let mut accepts = Vec::new();
        for (l, scheme) in listeners {
            accepts.push(tokio::spawn(self.clone().accept_loop(l, scheme)));
        }
        tokio::spawn(crate::memory::trim_after_bursts(
            self.bursts.clone(),
            self.tracker.clone(),
            self.shutdown.clone(),
        ));
        self.ready.store(true, Ordering::SeqCst);
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.shutdown.cancelled() => {}
        }

        self.ready.store(false, Ordering::SeqCst);
        // Limits follow reloads: the drain uses the current state's.
        let drain = self.served().config.gateway.limits.drain_timeout;
        tracing::info!(
            event = "draining",
            connections = self.active.load(Ordering::SeqCst),
            drain_timeout_ms = drain.as_millis() as u64,
            "shutting down: no new connections; closing live ones with 1001"
        );
        self.shutdown.cancel();
        for a in accepts {
            let _ = a.await;
        }
        self.tracker.close();
        if tokio::time::timeout(drain, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                event = "drain_timeout",
                connections = self.active.load(Ordering::SeqCst),
                "drain_timeout reached with connections still open; exiting anyway"
            );
        }
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, scheme: Scheme) {
        // accept(2) fails mostly for want of file descriptors (EMFILE/ENFILE) or memory. The
        // loop keeps serving: it backs off (doubling up to a second) instead of spinning,
        // logs once when the trouble starts and once when it is over, and counts each failure.
        const BACKOFF_MIN: Duration = Duration::from_millis(10);
        const BACKOFF_MAX: Duration = Duration::from_secs(1);
        let mut backoff = BACKOFF_MIN;
        let mut failing: Option<(Instant, u64)> = None;
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((tcp, addr)) => {
                    if let Some((since, failures)) = failing.take() {
                        tracing::info!(
                            event = "accept_recovered",
                            scheme = scheme.as_str(),
                            failures,
                            after_ms = since.elapsed().as_millis() as u64,
                            "accepting connections again"
                        );
                    }
                    backoff = BACKOFF_MIN;
                    let max = self
                        .served
                        .load()
                        .config
                        .gateway
                        .limits
                        .max_pending_handshakes;
                    if self.pending.fetch_add(1, Ordering::AcqRel) >= max {
                        self.pending.fetch_sub(1, Ordering::AcqRel);
                        self.metrics.limit_hit("", Limit::MaxPendingHandshakes);
                        tracing::debug!(client = %addr, "max_pending_handshakes reached; connection closed");
                        drop(tcp);
                        continue;
                    }
                    let pending = PendingSlot(self.pending.clone());
                    let gw = self.clone();
                    self.tracker
                        .spawn(async move { gw.connection(tcp, addr, scheme, pending).await });
                    self.bursts.saw(self.tracker.len());
                }
                Err(e) => {
                    self.metrics.accept_error();
                    match &mut failing {
                        Some((_, n)) => *n += 1,
                        None => {
                            tracing::warn!(event = "accept_error", scheme = scheme.as_str(), error = %e,
                                "accept failed (out of file descriptors?); backing off and retrying");
                            failing = Some((Instant::now(), 1));
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// One client connection: TLS (for wss), the HTTP handshake, then the relay.
    ///
    /// The handshake half is boxed: its state (hyper's connection, TLS accept) is several KB
    /// and only needed for a moment, while the task lives as long as the connection. Boxing it
    /// keeps the long-lived task as small as the relay needs (memory per idle connection).
    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        client_addr: SocketAddr,
        scheme: Scheme,
        pending: PendingSlot,
    ) {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let accepted = Box::pin(
            self.clone()
                .accept_handshake(tcp, client_addr, scheme, conn),
        )
        .await;
        drop(pending);
        if let Some(a) = accepted {
            self.relay(a).await;
        }
    }

    /// TLS (for wss) and the HTTP exchange; returns the accepted upgrade, if any.
    async fn accept_handshake(
        self: Arc<Self>,
        tcp: TcpStream,
        client_addr: SocketAddr,
        scheme: Scheme,
        conn: u64,
    ) -> Option<Accepted> {
        let _ = tcp.set_nodelay(true);
        // The current state's limits (they follow reloads); copied, as the connection outlives
        // any one state.
        let limits = self.served.load().config.gateway.limits.clone();
        // The whole life before the 101 is bounded from the moment of accept: the client has
        // `handshake_timeout` for its TLS handshake and request head together, and everything
        // up to the 101 (policies, backend handshake) ends within `backend_timeout` after that.
        let accepted_at = tokio::time::Instant::now();
        let head_deadline = accepted_at + limits.handshake_timeout;
        let overall_deadline = head_deadline + limits.backend_timeout;
        let mut tls_facts = None;
        let stream = match (&self.tls_acceptor, scheme) {
            (Some(acceptor), Scheme::Wss) => {
                match tokio::time::timeout_at(head_deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        if self.served.load().routes_have_policies {
                            tls_facts = Some(Arc::new(handshake::tls_facts(s.get_ref().1)));
                        }
                        Stream::ServerTls(Box::new(s))
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(client = %client_addr, error = %e, "client TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        self.metrics.limit_hit("", Limit::HandshakeTimeout);
                        tracing::debug!(client = %client_addr, "client TLS handshake timed out");
                        return None;
                    }
                }
            }
            _ => Stream::Tcp(tcp),
        };

        let slot: Arc<Mutex<Option<Accepted>>> = Arc::new(Mutex::new(None));
        let svc = {
            let gw = self.clone();
            let slot = slot.clone();
            service_fn(move |req| {
                let gw = gw.clone();
                let slot = slot.clone();
                let tls = tls_facts.clone();
                async move {
                    Ok::<_, Infallible>(
                        gw.handshake(req, client_addr, scheme, conn, tls, slot)
                            .await,
                    )
                }
            })
        };
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            // What is left of handshake_timeout after TLS (hyper wants a non-zero duration).
            .header_read_timeout(
                head_deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(Duration::from_millis(1)),
            )
            .max_buf_size(limits.max_header_bytes)
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        // The whole handshake, backend included, is bounded: no client holds a task forever.
        match tokio::time::timeout_at(overall_deadline, http).await {
            Ok(Ok(())) => {}
            // The request head did not arrive within handshake_timeout (a slow client, or one
            // that sent nothing): the same limit as the overall deadline, counted and logged
            // the same way.
            Ok(Err(e)) if e.is_timeout() => {
                self.metrics.limit_hit("", Limit::HandshakeTimeout);
                tracing::info!(event = "handshake_timeout", conn, client = %client_addr, "request head not received within handshake_timeout; connection closed");
            }
            Ok(Err(e)) => {
                tracing::debug!(client = %client_addr, error = %e, "client HTTP connection error");
            }
            Err(_) => {
                self.metrics.limit_hit("", Limit::HandshakeTimeout);
                tracing::info!(event = "handshake_timeout", conn, client = %client_addr, "handshake timed out; connection closed");
            }
        }
        let accepted = slot.lock().ok().and_then(|mut s| s.take());
        accepted
    }

    /// Runs the handshake pipeline for one request and logs its record.
    async fn handshake(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        client_addr: SocketAddr,
        scheme: Scheme,
        conn: u64,
        tls: Option<Arc<crate::policy::TlsInfo>>,
        slot: Arc<Mutex<Option<Accepted>>>,
    ) -> http::Response<Full<Bytes>> {
        // This handshake is served from the state current now, whatever a reload does meanwhile.
        let served = self.served();
        let mut ctx = HandshakeCtx {
            started: Instant::now(),
            client_addr,
            scheme,
            tls,
            api: None,
            path: String::new(),
            remainder: String::new(),
            query: None,
            client_key: String::new(),
            protocols: Vec::new(),
            extensions: Vec::new(),
            product: None,
            subscription: None,
            key_header: None,
            trusted_proxy: served
                .config
                .gateway
                .trusted_proxies
                .trusts(client_addr.ip()),
            key_token: None,
        };
        // If the client goes away before its answer, hyper drops this future mid-phase: the
        // guard then logs `handshake_abandoned` and counts it, so the handshake leaves a trace.
        let mut abandoned = AbandonGuard {
            metrics: self.metrics.clone(),
            conn,
            client_addr,
            scheme,
            uri: req.uri().clone(),
            started: ctx.started,
            answered: false,
        };
        // Time spent in the policy chain (fresh instances, guest code, host calls): logged so an
        // operator can tell a slow policy from a slow backend.
        let mut policies_ms = 0.0f64;
        let result: Result<_, Reject> = async {
            handshake::route(&served.routes, &mut ctx, &req)?;
            handshake::validate_upgrade(&mut ctx, &req)?;
            let api = ctx
                .api
                .clone()
                .ok_or_else(|| Reject::new(http::StatusCode::INTERNAL_SERVER_ERROR, "no route"))?;
            handshake::subscribe(&served.keys, &mut ctx, &api, &req)?;
            let permit = handshake::admit(
                &self.active,
                served.config.gateway.limits.max_connections,
                &api,
                ctx.subscription.as_ref(),
            )
            .map_err(|(r, full)| {
                self.metrics.limit_hit(&api.config.name, full.into());
                r
            })?;
            let mut breq = handshake::backend_request(&ctx, &api, &req);
            let mut effects = if api.chain.is_empty() {
                crate::policy::chain::Effects::default()
            } else {
                let view = handshake::policy_request(&ctx, &api, &req);
                let t = Instant::now();
                let outcome = crate::policy::chain::run(
                    &api.chain,
                    view,
                    &mut breq.headers,
                    &mut breq.target,
                )
                .await;
                policies_ms = t.elapsed().as_secs_f64() * 1000.0;
                handshake::policy_outcome(outcome)?
            };
            let extra = std::mem::take(&mut effects.response_headers);
            let upgraded = api
                .connector
                .handshake(&breq.target, breq.headers, &ctx.protocols, &ctx.extensions)
                .await
                .map_err(|e| {
                    self.metrics.backend_error(&api.config.name, e.kind());
                    handshake::backend_reject(e)
                })?;
            let resp = handshake::switching_protocols(&ctx, &upgraded, extra);
            let on_upgrade = hyper::upgrade::on(&mut req);
            if let Ok(mut s) = slot.lock() {
                *s = Some(Accepted {
                    on_upgrade,
                    backend: upgraded,
                    permit,
                    api,
                    client_addr,
                    target: breq.target,
                    conn,
                    product: ctx.product.clone(),
                    policy_deadline: effects.close_at.map(deadline),
                    end: ctx
                        .key_token
                        .clone()
                        .unwrap_or_else(|| self.shutdown.clone()),
                });
            }
            Ok(resp)
        }
        .await;
        abandoned.answered = true;

        let api_name = ctx.api.as_ref().map_or("", |a| a.config.name.as_str());
        let backend = loggable(
            ctx.api
                .as_ref()
                .map_or("", |a| a.config.backend.original.as_str()),
            served.config.gateway.log_query_values,
        );
        let elapsed = ctx.started.elapsed();
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let status = match &result {
            Ok(_) => 101,
            Err(r) => r.status.as_u16(),
        };
        let product = ctx.product.as_deref().unwrap_or("");
        let subscription = ctx.subscription.as_ref().map_or("", |s| s.name.as_str());
        // The normalised path once routing got that far, else the path as the client wrote it
        // (a refused path is worth seeing as it was sent).
        let path = if ctx.path.is_empty() {
            req.uri().path()
        } else {
            ctx.path.as_str()
        };
        self.metrics
            .handshake(api_name, product, subscription, status);
        if let Some(api) = &ctx.api {
            api.metrics
                .handshake_duration
                .observe(elapsed.as_secs_f64());
        }
        match result {
            Ok(resp) => {
                tracing::info!(
                    event = "handshake",
                    conn,
                    api = api_name,
                    product,
                    subscription,
                    operation = "onHandshake",
                    status = 101u16,
                    client = %client_addr,
                    scheme = scheme.as_str(),
                    path,
                    backend = %backend,
                    duration_ms,
                    policies_ms,
                    "handshake accepted"
                );
                resp
            }
            Err(r) => {
                tracing::info!(
                    event = "handshake",
                    conn,
                    api = api_name,
                    product,
                    subscription,
                    operation = "onHandshake",
                    status = r.status.as_u16(),
                    client = %client_addr,
                    scheme = scheme.as_str(),
                    path,
                    backend = %backend,
                    duration_ms,
                    policies_ms,
                    reason = %r.reason,
                    "handshake rejected"
                );
                r.into_response()
            }
        }
    }

    async fn relay(&self, a: Accepted) {
        let Accepted {
            on_upgrade,
            backend,
            permit,
            api,
            client_addr,
            target,
            conn,
            product,
            end,
            policy_deadline,
        } = a;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::info!(event = "connection_closed", conn, api = %api.config.name, client = %client_addr,
                    closed_by = "client_dropped", error = %e, "client left before the upgrade completed");
                return;
            }
        };
        let parts = match upgraded.downcast::<TokioIo<Stream>>() {
            Ok(p) => p,
            Err(_) => {
                tracing::error!(event = "connection_closed", api = %api.config.name, "unexpected upgraded stream type");
                return;
            }
        };
        let backend::Upgraded {
            stream: backend_stream,
            prefix: backend_prefix,
            headers: backend_headers,
        } = backend;
        let extensions_agreed =
            backend_headers.contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS);
        // The 101's header values are slices of hyper's read buffer: holding them would pin
        // 8 KiB per connection for its whole life.
        drop(backend_headers);
        // Moved, not borrowed: a Parts kept alive would pin hyper's 8 KiB read buffer for the
        // connection's whole life.
        let hyper::upgrade::Parts {
            io: client_io,
            read_buf: client_prefix,
            ..
        } = parts;
        let outcome = relay::relay(
            client_io.into_inner(),
            client_prefix,
            backend_stream,
            backend_prefix,
            RelayParams {
                limits: api.config.limits.clone(),
                shutdown: self.shutdown.clone(),
                end,
                metrics: api.metrics.clone(),
                extensions_agreed,
                policy_deadline: policy_deadline.map(tokio::time::Instant::from_std),
            },
        )
        .await;
        let subscription = permit.subscription().map(|s| s.name.clone());
        drop(permit);
        let product = product.as_deref().unwrap_or("");
        let subscription = subscription.as_deref().unwrap_or("");
        let name = &api.config.name;
        self.metrics
            .connection_closed(name, outcome.closed_by.as_str(), outcome.close_code);
        match outcome.closed_by {
            relay::ClosedBy::IdleTimeout => self.metrics.limit_hit(name, Limit::IdleTimeout),
            relay::ClosedBy::Lifetime => self.metrics.limit_hit(name, Limit::MaxConnectionLifetime),
            _ => {
                if let Some(limit) = outcome.limit {
                    self.metrics.limit_hit(name, limit.into());
                }
            }
        }
        let c = &outcome.client_to_backend;
        let b = &outcome.backend_to_client;
        let log_values = self.served.load().config.gateway.log_query_values;
        let target = loggable(&target, log_values);
        let backend_url = loggable(&api.config.backend.original, log_values);
        tracing::info!(
            event = "connection_closed",
            conn,
            api = %api.config.name,
            product,
            subscription,
            client = %client_addr,
            backend = %backend_url,
            backend_target = %target,
            duration_ms = outcome.duration.as_secs_f64() * 1000.0,
            closed_by = outcome.closed_by.as_str(),
            close_code = outcome.close_code,
            close_reason = %outcome.close_reason,
            client_frames = c.frames,
            client_messages = c.messages,
            client_bytes = c.bytes,
            backend_frames = b.frames,
            backend_messages = b.messages,
            backend_bytes = b.bytes,
            "connection closed"
        );
    }
}

/// `close-at` (seconds since the Unix epoch) as a point on the monotonic clock.
fn deadline(unix_seconds: u64) -> Instant {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(unix_seconds);
    let now = Instant::now();
    match at.duration_since(std::time::SystemTime::now()) {
        Ok(left) => now
            .checked_add(left)
            .unwrap_or(now + Duration::from_secs(86400 * 365)),
        Err(_) => now,
    }
}

/// A handshake that got its 101: what the connection task needs to start the relay.
struct Accepted {
    on_upgrade: hyper::upgrade::OnUpgrade,
    backend: backend::Upgraded,
    permit: Permit,
    api: Arc<Api>,
    client_addr: SocketAddr,
    target: String,
    conn: u64,
    /// The product the handshake came in through (for the close record).
    product: Option<String>,
    /// Ends the relay (see [`RelayParams::end`]).
    end: CancellationToken,
    /// A policy's `close-at`, on the monotonic clock.
    policy_deadline: Option<Instant>,
}

/// A URL or request target as log records show it: browsers pass credentials in the query
/// (`?access_token=`), so values are redacted unless the manifest says `log_query_values = true`.
fn loggable(target: &str, log_values: bool) -> std::borrow::Cow<'_, str> {
    if log_values {
        target.into()
    } else {
        tollgate_edge::query::redact_target(target)
    }
}

/// One of `max_pending_handshakes`, held from accept until the handshake is over.
struct PendingSlot(Arc<AtomicUsize>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Logs a handshake whose client went away before the gateway answered it (hyper then drops
/// the handshake's future, wherever it was: policies, the backend handshake). The path is
/// logged without its query, which may hold a key or token.
struct AbandonGuard {
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
        if self.answered {
            return;
        }
        self.metrics.handshake_abandoned();
        tracing::info!(
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

/// The accept queue of a client listener: as deep as the handshakes the gateway is willing to
/// have in progress (`max_pending_handshakes`, read at start), at least 128 and at most 65535.
/// tokio's `TcpListener::bind` asks for 128, and in a reconnect storm (thousands of clients
/// coming back after a restart) the kernel then drops most SYNs silently, with no counter on
/// our side, and clients wait out a 1 s retransmission or more. The kernel still caps the
/// queue at `net.core.somaxconn` (4096 by default since Linux 5.4).
fn client_backlog(max_pending_handshakes: usize) -> u32 {
    u32::try_from(max_pending_handshakes.clamp(128, 65535)).unwrap_or(65535)
}

fn bind(addr: SocketAddr, backlog: u32, what: &'static str) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { addr, what, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    // What `TcpListener::bind` does too: a restarted gateway can bind while connections of
    // the previous process are still in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(backlog).map_err(err)
}

fn server_tls(t: &ListenerTls) -> Result<TlsAcceptor, StartError> {
    use rustls_pki_types::pem::PemObject;
    let err = |file: &std::path::Path, message: String| StartError::Tls {
        file: file.display().to_string(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&t.cert)
        .and_then(|it| it.collect())
        .map_err(|e| err(&t.cert, format!("cannot read certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(err(&t.cert, "no certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&t.key)
        .map_err(|e| err(&t.key, format!("cannot read private key: {e}")))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(backend::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&t.cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            err(
                &t.cert,
                format!("certificate and key do not work together: {e}"),
            )
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
