//! The gateway process: builds the served state from a validated [`Config`], binds the
//! listeners, runs one task per client connection (handshake, then relay), and drains on
//! shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend;
use crate::frame::{Direction, SharedRate};
use crate::handshake::{self, Accepted};
use crate::logging::loggable;
use crate::manifest::{Config, ListenerTls, Scheme};
use crate::manifest::{MessageRates, RateSpec};
use crate::metrics::{Limit, Metrics};
use crate::policy::message::Connection;
use crate::relay::{self, RelayParams};
use crate::subscriptions::RateScope;

pub use crate::served::StartError;
use crate::served::{Current, Served};
use crate::stream::Stream;

/// The running gateway's shared state.
pub struct Gateway {
    /// The manifest the process started with: listeners and admin (changing those needs a
    /// restart). Everything else, limits included, is read from [`Gateway::served`].
    config: Config,
    served: Arc<Current>,
    tls_acceptor: Option<TlsAcceptor>,
    /// Connections holding a slot (handshakes past admission, and relays).
    active: Arc<AtomicUsize>,
    /// Accepted sockets whose handshake has not finished (TLS and HTTP), bounded by
    /// `max_pending_handshakes`: a flood of sockets that never get to admission cannot take
    /// unbounded tasks and memory.
    pending: Arc<AtomicUsize>,
    /// Refused client sockets being answered, then read and discarded before their close
    /// (`http1::refuse`, `http1::linger`): outside `pending`, so a refused socket never keeps
    /// a new client out (not even one retrying the moment it reads its refusal), and capped at
    /// `max_pending_handshakes` of their own, at least [`MIN_LINGERING`] (over it, a refused
    /// socket gets its answer only if it can be written at once, then is closed).
    lingering: Arc<AtomicUsize>,
    /// Cancelled to shut the gateway down (SIGTERM/SIGINT). [`Gateway::run`] then stops
    /// accepting, logs `draining` with the connections live at that moment, and only then
    /// cancels `shutdown`: a relay woken by `shutdown` may be gone a moment later, so the count
    /// must be read before.
    stop: CancellationToken,
    /// Cancelled by [`Gateway::run`] once the drain starts: every relay sends its 1001s, the
    /// accept loops and the reload watcher end.
    shutdown: CancellationToken,
    /// Serving (`/readyz`); false again once the drain starts.
    ready: Arc<AtomicBool>,
    tracker: TaskTracker,
    /// The peak of `tracker`'s connection tasks since memory was last given back.
    bursts: Arc<crate::memory::Bursts>,
    /// Counters and histograms for `/metrics`; one set for the process's life.
    metrics: Arc<Metrics>,
    /// The client listeners' bound addresses (`ws`/`wss`), once bound (for `/apis`).
    bound: Arc<std::sync::OnceLock<Vec<(Scheme, SocketAddr)>>>,
    /// Numbers client connections, so a connection's handshake and close records can be
    /// joined (`conn` field).
    next_conn: std::sync::atomic::AtomicU64,
    /// The fleet's shared limits (`[cluster]`), set when [`Gateway::run`] starts.
    fleet: std::sync::OnceLock<Arc<crate::cluster::Fleet>>,
    /// The web console's watches: issued by the admin listener, claimed by handshakes.
    watches: Arc<crate::watch::Watches>,
    /// The listening sockets as a binary upgrade hands them over (duplicates of the accept
    /// loops' own), set when [`Gateway::run`] binds them.
    handable: std::sync::Mutex<Vec<crate::upgrade::Handable>>,
    /// An upgrade is under way (a second SIGUSR2 meanwhile is ignored).
    upgrading: std::sync::atomic::AtomicBool,
    /// Cancelled once a new process accepts on the listening sockets: the admin listener of
    /// this one stops accepting (the client listeners stop with the drain).
    handed_over: CancellationToken,
    /// The accept loops, from the start until the drain waits for them.
    accepts: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Ends an upgrade's wait for the new process when this one stops meanwhile.
    upgrade_abort: std::sync::Mutex<Option<crate::upgrade::Abort>>,
    /// The process an upgrade handed the listening sockets to (watched while this one drains).
    successor: std::sync::Mutex<Option<std::process::Child>>,
    /// Set when an upgrade hands over: relays that can pause at a frame boundary are handed
    /// over on shutdown instead of closed, the others closed with 1012 over a window
    /// ([`crate::handover`]).
    handover: Arc<crate::handover::Signal>,
    /// Where paused connections go, and the thread writing them to the new process.
    outbox: std::sync::Mutex<Option<crate::handover::Outbox>>,
    handover_writer: std::sync::Mutex<Option<std::thread::JoinHandle<crate::handover::Sent>>>,
    /// Connections that paused but could not be queued for the new process.
    handover_lost: std::sync::atomic::AtomicU64,
    /// Connections live when the drain started.
    draining_with: AtomicUsize,
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
            served: Arc::new(Current::new(served)),
            tls_acceptor,
            active: Arc::new(AtomicUsize::new(0)),
            pending: Arc::new(AtomicUsize::new(0)),
            lingering: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
            shutdown,
            ready: Arc::new(AtomicBool::new(false)),
            tracker: TaskTracker::new(),
            bursts: Default::default(),
            metrics,
            bound: Default::default(),
            next_conn: std::sync::atomic::AtomicU64::new(1),
            fleet: std::sync::OnceLock::new(),
            watches: Arc::default(),
            handable: Default::default(),
            upgrading: Default::default(),
            handed_over: CancellationToken::new(),
            accepts: Default::default(),
            upgrade_abort: Default::default(),
            handover: Default::default(),
            outbox: Default::default(),
            handover_writer: Default::default(),
            handover_lost: Default::default(),
            draining_with: Default::default(),
            successor: Default::default(),
        }))
    }

    /// The state new handshakes are served from.
    pub fn served(&self) -> Arc<Served> {
        self.served.get()
    }

    /// Cancel it to stop the gateway (SIGTERM/SIGINT): [`Gateway::run`] then drains and
    /// returns.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// What the admin listener may read: served state, metrics, readiness, listener addresses.
    fn admin_view(&self) -> crate::admin::View {
        crate::admin::View {
            current: self.served.clone(),
            metrics: self.metrics.clone(),
            ready: self.ready.clone(),
            listeners: self.bound.clone(),
            fleet: self.fleet.get().cloned(),
            watches: self.watches.clone(),
        }
    }

    /// What a reload needs: the served state to swap, the manifest the process started with
    /// (to refuse changes that need a restart), the metrics and the shutdown token.
    pub fn reloader(&self) -> crate::reload::Reloader {
        crate::reload::Reloader {
            current: self.served.clone(),
            started_with: Arc::new(self.config.clone()),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Binds every listener, then serves until [`Gateway::shutdown`] is cancelled, then drains:
    /// live connections get close 1001 on both sides and up to `drain_timeout` to finish.
    /// Keeps the key sets policies registered fresh (`policy::key_sets`): once a second, starts
    /// a refresh of each one that is due, in the state served now (so it follows reloads).
    async fn refresh_key_sets(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
                _ = self.stop.cancelled() => return,
            }
            for set in self.served().key_sets_in_use() {
                set.refresh_if_due();
            }
        }
    }

    /// Reads the fleet's counts of every limited subscription and API of the state served now,
    /// once per heartbeat interval, for `/apis`.
    async fn read_fleet_counts(self: Arc<Self>, fleet: Arc<crate::cluster::Fleet>) {
        // The first read one interval after the start, like the heartbeats after the first:
        // nothing to read before connections come in.
        let every = fleet.interval();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let served = self.served();
            let mut things: Vec<String> = served
                .routes
                .apis()
                .iter()
                .filter(|a| a.config.max_connections.is_some())
                .map(|a| crate::cluster::api_thing(&a.config.name))
                .collect();
            things.extend(
                served
                    .keys
                    .all()
                    .iter()
                    .filter(|s| s.max_connections.is_some())
                    .map(|s| crate::cluster::subscription_thing(&s.product, &s.name)),
            );
            if !things.is_empty() {
                fleet.refresh_counts(things).await;
            }
        }
    }

    pub async fn run(self: Arc<Self>) -> Result<(), StartError> {
        self.run_inheriting(None).await
    }

    /// [`Gateway::run`] in a process a binary upgrade started: it serves on the old process's
    /// listening sockets (`inherited`) where its manifest asks for the same addresses, binds
    /// the others, and tells the old process once it accepts (or why it cannot).
    pub async fn run_inheriting(
        self: Arc<Self>,
        mut inherited: Option<crate::upgrade::Inherited>,
    ) -> Result<(), StartError> {
        let started = self.clone().serve(&mut inherited).await;
        match (started, inherited) {
            (Err(e), Some(mut i)) => {
                i.failed(&e.to_string());
                Err(e)
            }
            (Err(e), None) => Err(e),
            (Ok(_), Some(mut i)) if self.stop.is_cancelled() => {
                // Stopped while starting: the old process keeps serving.
                i.failed("the new process was stopped (SIGTERM/SIGINT) while it started");
                self.serve_until_stopped().await
            }
            (Ok(took), Some(i)) => {
                let old_pid = i.old_pid;
                // No upgrade of this process until the previous one's connections are all
                // here (set before anyone can know this process serves).
                self.upgrading.store(true, Ordering::Release);
                // Logged before it is said, so the records read in the order things happen.
                tracing::info!(event = "upgrade_ready", old_pid, pid = std::process::id(),
                    "accepting on the sockets the previous process handed over; telling it to stop accepting and drain");
                match i.ready(took) {
                    Ok(Some(channel)) => {
                        // Announced once the previous process has been told (the pid file,
                        // systemd's main pid); its drain waits for the connections too.
                        self.announce();
                        self.tracker
                            .spawn(self.clone().resume_all(channel, old_pid));
                    }
                    Ok(None) => {
                        self.announce();
                        self.upgrading.store(false, Ordering::Release);
                    }
                    Err(e) => {
                        self.upgrading.store(false, Ordering::Release);
                        tracing::warn!(event = "upgrade_ready_unsent", old_pid, error = %e,
                            "could not tell the previous process this one is ready (it gives up on its own and keeps serving)");
                    }
                }
                self.serve_until_stopped().await
            }
            (Ok(_), None) => {
                self.announce();
                self.serve_until_stopped().await
            }
        }
    }

    /// Says this process serves: its pid in the pid file, `READY=1` and `MAINPID=` to systemd
    /// (after an upgrade, the new process takes the old one's place there).
    fn announce(&self) {
        if let Some(f) = &self.config.gateway.pid_file {
            crate::notify::write_pid(f);
        }
        crate::notify::systemd(&format!(
            "READY=1\nMAINPID={}\nSTATUS=serving",
            std::process::id()
        ));
    }

    /// An upgrade that did not happen rewrites the pid file with the same pid (a new file):
    /// `tollgate upgrade` reads that as "no upgrade" without waiting for its timeout. Only
    /// while the file is this process's: after a handover it names the new process.
    fn no_upgrade(&self) {
        if let Some(f) = &self.config.gateway.pid_file {
            if !self.handed_over.is_cancelled()
                && crate::notify::read_pid(f) == Some(std::process::id())
            {
                crate::notify::write_pid(f);
            }
        }
    }

    /// A listening socket: the one an upgrade handed over for the same role and address, or a
    /// new one. Either way a duplicate is kept for the next upgrade.
    fn listener(
        &self,
        inherited: &mut Option<crate::upgrade::Inherited>,
        role: crate::upgrade::Role,
        configured: SocketAddr,
        backlog: u32,
        what: &'static str,
        took: &mut Vec<crate::upgrade::Role>,
    ) -> Result<TcpListener, StartError> {
        let err = |source| StartError::Bind {
            addr: configured,
            what,
            source,
        };
        let listener = match inherited.as_mut().and_then(|i| i.take(role, configured)) {
            Some(l) => {
                took.push(role);
                // This manifest's backlog (Linux applies a new one to a listening socket).
                rustix::net::listen(&l, i32::try_from(backlog).unwrap_or(i32::MAX))
                    .map_err(|e| err(e.into()))?;
                l.set_nonblocking(true).map_err(err)?;
                TcpListener::from_std(l).map_err(err)?
            }
            None => bind(configured, backlog, what)?,
        };
        if let (Ok(fd), Ok(bound)) = (
            std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned(),
            listener.local_addr(),
        ) {
            if let Ok(mut h) = self.handable.lock() {
                h.push(crate::upgrade::Handable {
                    described: crate::upgrade::Described {
                        role,
                        configured,
                        bound,
                    },
                    fd,
                });
            }
        }
        Ok(listener)
    }

    /// Starts a new process of this binary and hands it the listening sockets (SIGUSR2; see
    /// [`crate::upgrade`]). Once it accepts, this process stops accepting and drains; if it
    /// fails, this one says why and keeps serving.
    pub async fn upgrade(self: &Arc<Self>) {
        if !self.ready.load(Ordering::SeqCst) || self.stop.is_cancelled() {
            tracing::warn!(
                event = "upgrade_ignored",
                "not serving (starting or stopping): no upgrade"
            );
            self.no_upgrade();
            return;
        }
        if self.upgrading.swap(true, Ordering::AcqRel) {
            // The upgrade under way tells its own outcome (pid file, log).
            tracing::warn!(event = "upgrade_ignored", "an upgrade is already under way");
            return;
        }
        let handable: Vec<crate::upgrade::Handable> = self
            .handable
            .lock()
            .map(|h| {
                h.iter()
                    .filter_map(|l| {
                        l.fd.try_clone().ok().map(|fd| crate::upgrade::Handable {
                            described: l.described.clone(),
                            fd,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        tracing::info!(
            event = "upgrade_started",
            pid = std::process::id(),
            listeners = handable.len(),
            "starting the new binary and handing it the listening sockets"
        );
        let started = std::time::Instant::now();
        let gw = self.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            crate::upgrade::hand_over(&handable, |abort| {
                if let Ok(mut a) = gw.upgrade_abort.lock() {
                    *a = Some(abort);
                }
                // Stopped before the abort was in place: end the wait now.
                if gw.stop.is_cancelled() {
                    if let Ok(a) = gw.upgrade_abort.lock() {
                        if let Some(a) = a.as_ref() {
                            a.abort();
                        }
                    }
                }
            })
        })
        .await;
        if let Ok(mut a) = self.upgrade_abort.lock() {
            *a = None;
        }
        let failed = |error: String| {
            tracing::warn!(event = "upgrade_failed", pid = std::process::id(), error = %error,
                "the upgrade did not happen; this process keeps serving");
            self.metrics.upgrade("failed");
            self.upgrading.store(false, Ordering::Release);
            self.no_upgrade();
        };
        match outcome {
            Ok(Ok(mut up)) if self.stop.is_cancelled() => {
                // Asked to stop meanwhile: the service stops, the new process too. It may have
                // said it was the main process already: this one says it is again.
                let _ = up.child.kill();
                let _ = up.child.wait();
                crate::notify::systemd(&format!("MAINPID={}", std::process::id()));
                failed(format!(
                    "this process was stopped (SIGTERM/SIGINT) during the upgrade; the new process (pid {}) was stopped too",
                    up.new_pid
                ));
            }
            Ok(Ok(mut up)) => {
                let live = up.channel.is_some();
                let window = self.served().config.gateway.limits.upgrade_close_window;
                tracing::info!(event = "upgrade", old_pid = std::process::id(), new_pid = up.new_pid,
                    version = %up.version, exe = %up.exe.display(),
                    listeners = ?up.took.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
                    connections = self.active.load(Ordering::SeqCst),
                    connections_handed_over = live,
                    // wss sessions stay here: drained with 1012 over the window. Kernel TLS
                    // (which could carry them over) is not used yet; said so operators know
                    // whether this kernel would offer it.
                    wss = "drained_1012",
                    kernel_tls = crate::handover::kernel_tls(),
                    close_window_ms = window.as_millis() as u64,
                    took_ms = started.elapsed().as_millis() as u64,
                    "the new process accepts on the listening sockets; this one stops accepting, hands over its plain connections and drains the rest");
                self.metrics.upgrade("handed_over");
                self.handover
                    .window_ms
                    .store(window.as_millis() as u64, Ordering::Relaxed);
                self.handover.upgrading.store(true, Ordering::Release);
                if let Some(channel) = up.channel.take() {
                    let (outbox, writer) = crate::handover::start_sending(channel);
                    if let (Ok(mut o), Ok(mut w)) =
                        (self.outbox.lock(), self.handover_writer.lock())
                    {
                        *o = Some(outbox);
                        *w = Some(writer);
                        self.handover.live.store(true, Ordering::Release);
                    }
                }
                if let Ok(mut s) = self.successor.lock() {
                    *s = Some(up.child);
                }
                self.handed_over.cancel();
                self.stop.cancel();
            }
            Ok(Err(e)) => failed(e.to_string()),
            Err(e) => failed(e.to_string()),
        }
    }

    /// Binds (or takes over) the listeners, starts every task and the accept loops, and marks
    /// the gateway ready; returns the roles whose sockets an upgrade handed over.
    async fn serve(
        self: Arc<Self>,
        inherited: &mut Option<crate::upgrade::Inherited>,
    ) -> Result<Vec<crate::upgrade::Role>, StartError> {
        if let Some(c) = &self.config.cluster {
            let gateway_id = c.gateway_id.clone().unwrap_or_else(default_gateway_id);
            let fleet = crate::cluster::Fleet::new(
                crate::cluster::StoreConfig {
                    url: c.store.clone(),
                    gateway_id: gateway_id.clone(),
                    namespace: c.namespace.clone(),
                    lease_ttl: c.lease_ttl,
                    timeout: c.store_timeout,
                },
                c.on_store_failure,
                c.message_sync_interval,
                self.metrics.fleet(),
            )
            .map_err(|e| StartError::Plugin(format!("cluster.store: {e}")))?;
            tracing::info!(event = "cluster", gateway_id = %fleet.store().config().gateway_id, namespace = %c.namespace,
                lease_ttl_ms = c.lease_ttl.as_millis() as u64, store_timeout_ms = c.store_timeout.as_millis() as u64,
                on_store_failure = c.on_store_failure.as_str(),
                "connection limits are counted across the fleet sharing this store");
            tokio::spawn(fleet.clone().heartbeats());
            tokio::spawn(fleet.clone().settle_message_rates());
            tokio::spawn(self.clone().read_fleet_counts(fleet.clone()));
            // Every state shares the process's counters, so this holds across reloads.
            self.served().counters().use_fleet(fleet.clone());
            let _ = self.fleet.set(fleet);
        }
        use crate::upgrade::Role;
        let mut took = Vec::new();
        let mut listeners = Vec::new();
        let backlog = client_backlog(self.config.gateway.limits.max_pending_handshakes);
        if let Some(addr) = self.config.gateway.listen {
            listeners.push((
                self.listener(inherited, Role::Ws, addr, backlog, "ws listener", &mut took)?,
                Scheme::Ws,
            ));
        }
        if let Some(t) = &self.config.gateway.tls {
            listeners.push((
                self.listener(
                    inherited,
                    Role::Wss,
                    t.listen,
                    backlog,
                    "wss listener",
                    &mut took,
                )?,
                Scheme::Wss,
            ));
        }
        let admin = match &self.config.admin {
            // The admin listener serves at most 64 connections at once.
            Some(a) => Some(self.listener(
                inherited,
                Role::Admin,
                a.listen,
                128,
                "admin listener",
                &mut took,
            )?),
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
            if let Some(config) = self.config.admin.clone() {
                tokio::spawn(crate::admin::serve(
                    a,
                    config,
                    self.admin_view(),
                    self.handed_over.clone(),
                ));
            }
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
        tokio::spawn(self.clone().refresh_key_sets());
        self.ready.store(true, Ordering::SeqCst);
        if let Ok(mut a) = self.accepts.lock() {
            *a = accepts;
        }
        Ok(took)
    }

    /// Serves until SIGTERM/SIGINT (or a binary upgrade handed over), then drains.
    async fn serve_until_stopped(self: Arc<Self>) -> Result<(), StartError> {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = self.shutdown.cancelled() => {}
        }
        let accepts = self
            .accepts
            .lock()
            .map(|mut a| std::mem::take(&mut *a))
            .unwrap_or_default();
        // An upgrade still waiting for its new process ends now (the new process is stopped).
        if let Ok(a) = self.upgrade_abort.lock() {
            if let Some(a) = a.as_ref() {
                a.abort();
            }
        }
        // The duplicates kept for an upgrade go first: once the accept loops end, nothing of
        // this process holds the listening sockets, so (unless a new process took them over)
        // they close and new connections are refused, not queued unanswered.
        if let Ok(mut h) = self.handable.lock() {
            h.clear();
        }

        self.ready.store(false, Ordering::SeqCst);
        // After a handover the new process is the service's main process: only a real stop
        // is told to the service manager.
        if !self.handed_over.is_cancelled() {
            crate::notify::systemd("STOPPING=1");
        }
        // Limits follow reloads: the drain uses the current state's.
        let drain = self.served().config.gateway.limits.drain_timeout;
        self.draining_with
            .store(self.active.load(Ordering::SeqCst), Ordering::SeqCst);
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
        self.finish_handover().await;
        if let Some(f) = &self.config.gateway.pid_file {
            crate::notify::remove_pid(f);
        }
        // Whatever is still open ends with the process: the fleet gets every slot back now.
        if let Some(fleet) = self.fleet.get() {
            fleet.leave().await;
        }
        // After a handover: the new process must still be there, or nothing accepts now; a
        // non-zero exit lets a supervisor start the gateway again.
        let lost = self.successor.lock().ok().and_then(|mut s| {
            let child = s.as_mut()?;
            match child.try_wait() {
                Ok(Some(status)) => Some((child.id(), status)),
                _ => None,
            }
        });
        if let Some((pid, status)) = lost {
            tracing::error!(event = "upgrade_lost", new_pid = pid, status = %status,
                "the new process that took over the listening sockets has exited; nothing accepts on them now");
            return Err(StartError::SuccessorLost { pid, status });
        }
        Ok(())
    }

    /// After the drain of a process that handed its connections over: ends the stream of
    /// connections, waits for the new process's summary and says what went where.
    async fn finish_handover(&self) {
        let outbox = self.outbox.lock().ok().and_then(|mut o| o.take());
        let writer = self.handover_writer.lock().ok().and_then(|mut w| w.take());
        let Some(writer) = writer else { return };
        // The last sender goes: the writer sends `done` and reads the answer.
        drop(outbox);
        let sent = tokio::task::spawn_blocking(move || writer.join())
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let lost = self.handover_lost.load(Ordering::Relaxed);
        let failed = sent.failed + lost;
        let live = self.draining_with.load(Ordering::SeqCst) as u64;
        let drained = live.saturating_sub(sent.handed + failed);
        use crate::handover::Path;
        self.metrics
            .upgrade_connections(Path::HandedOver, sent.handed);
        self.metrics.upgrade_connections(Path::Drained, drained);
        self.metrics.upgrade_connections(Path::Failed, failed);
        let new_pid = self
            .successor
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|c| c.id()));
        let summary = sent.summary.unwrap_or_default();
        if let Some(error) = &sent.error {
            tracing::warn!(event = "upgrade_handover_error", new_pid, error = %error,
                "the connection channel to the new process failed; connections not yet passed were closed");
        }
        tracing::info!(
            event = "upgrade_complete",
            old_pid = std::process::id(),
            new_pid,
            handed_over = sent.handed,
            drained,
            failed,
            resumed = summary.resumed,
            closed_by_new = summary.closed,
            "connections handed over to the new process or drained; this process exits"
        );
    }

    /// In a process a binary upgrade started: takes the previous process's connections as
    /// they come and relays them on, then answers what it did with them.
    async fn resume_all(self: Arc<Self>, channel: std::os::unix::net::UnixStream, old_pid: u32) {
        use crate::handover::{Incoming, Path, Summary};
        let mut rx = crate::handover::start_receiving(channel);
        let mut summary = Summary::default();
        // An upgrade of this process is possible again once this is over, however it ends.
        struct Upgradable<'a>(&'a AtomicBool);
        impl Drop for Upgradable<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _upgradable = Upgradable(&self.upgrading);
        while let Some(incoming) = rx.recv().await {
            match incoming {
                Incoming::Connection(c, fds) => {
                    if self.resume(*c, fds, old_pid) {
                        summary.resumed += 1;
                    } else {
                        summary.closed += 1;
                    }
                }
                Incoming::Done { handed, channel } => {
                    self.metrics
                        .upgrade_connections(Path::Resumed, summary.resumed);
                    self.metrics
                        .upgrade_connections(Path::Closed, summary.closed);
                    tracing::info!(
                        event = "upgrade_resumed",
                        old_pid,
                        handed,
                        resumed = summary.resumed,
                        closed = summary.closed,
                        "the previous process's connections are relayed by this one"
                    );
                    let answered = tokio::task::spawn_blocking(move || {
                        crate::handover::answer(channel, summary)
                    })
                    .await;
                    if let Ok(Err(e)) = answered {
                        tracing::warn!(event = "upgrade_summary_unsent", old_pid, error = %e,
                            "could not tell the previous process what became of its connections");
                    }
                    return;
                }
                Incoming::Broken(error) => {
                    self.metrics
                        .upgrade_connections(Path::Resumed, summary.resumed);
                    self.metrics
                        .upgrade_connections(Path::Closed, summary.closed);
                    tracing::warn!(event = "upgrade_handover_error", old_pid, error = %error,
                        resumed = summary.resumed,
                        "the previous process's connection channel ended before it said done");
                    return;
                }
            }
        }
    }

    /// Relays one connection the previous process handed over; `false` if it was closed
    /// at once instead (its API or its subscription key is gone, or its sockets are not
    /// usable).
    fn resume(
        self: &Arc<Self>,
        c: crate::handover::HandedConnection,
        fds: Vec<std::os::fd::OwnedFd>,
        old_pid: u32,
    ) -> bool {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let to_stream = |fd: std::os::fd::OwnedFd| {
            // Only a TCP socket is relayed as one.
            let tcp = matches!(
                rustix::net::sockopt::socket_type(&fd),
                Ok(rustix::net::SocketType::STREAM)
            ) && matches!(
                rustix::net::sockopt::socket_domain(&fd),
                Ok(rustix::net::AddressFamily::INET | rustix::net::AddressFamily::INET6)
            );
            if !tcp {
                return Err(std::io::Error::other("not a TCP socket"));
            }
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            TcpStream::from_std(s)
        };
        let mut fds = fds.into_iter();
        let (client, backend) = match (fds.next(), fds.next(), fds.next()) {
            (Some(cf), Some(bf), None) => match (to_stream(cf), to_stream(bf)) {
                (Ok(c), Ok(b)) => (c, b),
                _ => {
                    tracing::warn!(
                        event = "connection_resume_failed",
                        conn,
                        previous_conn = c.conn,
                        old_pid,
                        "a handed-over connection's sockets are not TCP sockets; closed"
                    );
                    return false;
                }
            },
            _ => {
                tracing::warn!(
                    event = "connection_resume_failed",
                    conn,
                    previous_conn = c.conn,
                    old_pid,
                    "a handed-over connection came without its two sockets; closed"
                );
                return false;
            }
        };
        let served = self.served();
        let api = served
            .routes
            .apis()
            .iter()
            .find(|a| a.config.name == c.api)
            .cloned();
        let Some(api) = api else {
            tracing::info!(event = "connection_resume_failed", conn, previous_conn = c.conn, old_pid, api = %c.api,
                "this manifest has no API of that name; the connection is closed (1001)");
            self.tracker.spawn(close_both(client, backend));
            return false;
        };
        // The subscription by the key it was admitted with; a key this manifest no longer
        // has is revoked as a reload would (the relay closes with 1008).
        let mut revoked = false;
        let (subscription, end) = match c.key {
            None => (None, self.shutdown.clone()),
            Some(digest) => match served.keys.by_digest(&digest) {
                Some((sub, token)) if api.config.products.contains(&sub.product) => {
                    (Some(sub.clone()), token.clone())
                }
                _ => {
                    revoked = true;
                    let token = self.shutdown.child_token();
                    token.cancel();
                    (None, token)
                }
            },
        };
        let permit = crate::routes::Permit::adopt(&self.active, &api, subscription.as_ref());
        let product_messages = c
            .product
            .as_deref()
            .and_then(|n| served.config.products.iter().find(|p| p.name == n))
            .map(|p| [p.client_messages, p.backend_messages])
            .unwrap_or_default();
        let (own_rates, shared_rates) = Self::message_rates(
            &api,
            c.product.as_deref(),
            &product_messages,
            &permit,
            self.fleet.get().map(|f| &**f),
        );
        let mid_message =
            c.client_to_backend.message.is_some() || c.backend_to_client.message.is_some();
        if mid_message && !api.messages.is_empty() {
            tracing::info!(event = "connection_resumed_uninspected", conn, previous_conn = c.conn,
                api = %api.config.name,
                "this API has message policies now, but the connection paused in the middle of a message its previous process did not judge: it relays without them");
        }
        let ms = Duration::from_millis;
        let mut limits = api.config.limits.clone();
        limits.max_frame_size = c.limits.max_frame_size;
        limits.max_message_size = c.limits.max_message_size;
        limits.idle_timeout = c.limits.idle_timeout_ms.map(ms);
        limits.max_connection_lifetime = c.limits.max_connection_lifetime_ms.map(ms);
        tracing::info!(event = "connection_resumed", conn, previous_conn = c.conn, old_pid,
            api = %api.config.name, client = %c.client, age_ms = c.age_ms,
            "relaying a connection the previous process handed over");
        let params = RelayParams {
            limits,
            shutdown: self.shutdown.clone(),
            end,
            metrics: api.metrics.clone(),
            extensions_agreed: c.extensions_agreed,
            policy_deadline: c
                .policy_deadline_ms
                .map(|d| tokio::time::Instant::now() + ms(d)),
            own_rates,
            shared_rates,
            // The API's message policies as this manifest has them, with the handshake's
            // context as the previous process had it; not for a connection that paused in the
            // middle of a message (its previous process did not judge it: a policy would see
            // half a message), which keeps relaying as it did.
            inspection: if mid_message {
                None
            } else {
                Self::inspection(
                    &api,
                    conn,
                    c.product.as_deref(),
                    subscription.as_ref().map(|s| s.name.as_str()),
                    &c.context,
                )
            },
            watch: None,
            upgrade: None,
            handable: false,
            resume: Some(relay::Resume {
                client_to_backend: c.client_to_backend,
                backend_to_client: c.backend_to_client,
                age: ms(c.age_ms),
                quiet: c.quiet_ms.map(ms),
            }),
        };
        let fleet = self
            .fleet
            .get()
            .cloned()
            .filter(|_| !c.fleet.is_empty())
            .map(|f| (f, c.fleet));
        let mut relaying = Relaying {
            conn,
            client_addr: c.client,
            client: Stream::Tcp(client),
            client_prefix: c.client_unforwarded.into(),
            backend: Stream::Tcp(backend),
            backend_prefix: c.backend_unforwarded.into(),
            api,
            permit,
            product: c.product,
            picked_backend: c.picked_backend,
            target: c.target,
            key_digest: c.key,
        };
        let gw = self.clone();
        // Its fleet slots, taken under this gateway's id, held by its permit like any
        // connection's (and handed over again by a later upgrade).
        if let Some((fleet, things)) = fleet {
            relaying.permit.hold(fleet.adopt(things));
        }
        // Boxed, as a new connection's task is (accept_loop).
        self.tracker.spawn(Box::pin(async move {
            gw.relay_until_closed(relaying, params).await
        }));
        // Relayed just long enough for its 1008 when its key is gone.
        !revoked
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
                    // Boxed: the connection's future (relay state included) is ~8 KB, and tokio
                    // moves a task's future by value several times (into its cell, and on each
                    // change of stage): ~75 KB of memcpy per connection, measured with
                    // callgrind, against one move into the box.
                    self.tracker.spawn(Box::pin(async move {
                        gw.connection(tcp, addr, scheme, pending).await
                    }));
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
    /// The handshake half is boxed: its state (the head's read buffer, TLS accept) is several KB
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
        match accepted {
            Handshake::Upgraded(a, client, client_prefix) => {
                self.relay(a, client, client_prefix, conn, client_addr)
                    .await
            }
            Handshake::Refused {
                stream,
                answer,
                linger,
            } => {
                // Answered after the pending slot is given back: a client that retries the
                // moment it reads a refusal finds its place free.
                let cap = self
                    .served
                    .load()
                    .config
                    .gateway
                    .limits
                    .max_pending_handshakes
                    .max(MIN_LINGERING);
                if self.lingering.fetch_add(1, Ordering::AcqRel) < cap {
                    let _slot = PendingSlot(self.lingering.clone());
                    if let Some(stream) = crate::http1::refuse(stream, &answer, linger).await {
                        crate::http1::linger(stream).await;
                    }
                } else {
                    self.lingering.fetch_sub(1, Ordering::AcqRel);
                    // Over the cap (a flood of refusals): the answer if it goes out at once.
                    let _ = futures_util::FutureExt::now_or_never(crate::http1::refuse(
                        stream, &answer, false,
                    ));
                }
            }
            Handshake::Ended => {}
        }
    }

    /// TLS (for wss) and the HTTP exchange; returns the accepted upgrade, if any.
    async fn accept_handshake(
        self: Arc<Self>,
        tcp: TcpStream,
        client_addr: SocketAddr,
        scheme: Scheme,
        conn: u64,
    ) -> Handshake {
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
                        return Handshake::Ended;
                    }
                    Err(_) => {
                        self.metrics.limit_hit("", Limit::HandshakeTimeout);
                        tracing::debug!(client = %client_addr, "client TLS handshake timed out");
                        return Handshake::Ended;
                    }
                }
            }
            _ => Stream::Tcp(tcp),
        };

        let facts = handshake::Conn {
            id: conn,
            client_addr,
            scheme,
            tls: tls_facts,
            deadline: overall_deadline,
        };
        let mut stream = stream;
        let mut buf = bytes::BytesMut::with_capacity(crate::http1::READ_BUF);
        let read = crate::http1::read_request(&mut stream, limits.max_header_bytes, &mut buf);
        let req = match tokio::time::timeout_at(head_deadline, read).await {
            Ok(Ok(req)) => req,
            Ok(Err(crate::http1::ReadError::Head(e))) => {
                if e.status() == http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
                    self.metrics.limit_hit("", Limit::MaxHeaderBytes);
                }
                // Refused before it became a handshake: no API, no record of its own beyond
                // this one (nothing the client sent is logged).
                tracing::info!(event = "request_refused", conn, client = %client_addr,
                    status = e.status().as_u16(), reason = %e, "request head refused");
                let answer = handshake::Reject::new(e.status(), e.to_string()).into_response();
                return Handshake::Refused {
                    stream,
                    answer: crate::http1::encode(&answer, false),
                    linger: true,
                };
            }
            Ok(Err(e)) => {
                tracing::debug!(client = %client_addr, error = %e, "client connection ended before a request");
                return Handshake::Ended;
            }
            // The request head did not arrive within handshake_timeout (a slow client, or one
            // that sent nothing): the same limit as the overall deadline, counted and logged
            // the same way.
            Err(_) => {
                self.metrics.limit_hit("", Limit::HandshakeTimeout);
                tracing::info!(event = "handshake_timeout", conn, client = %client_addr, "request head not received within handshake_timeout; connection closed");
                return Handshake::Ended;
            }
        };
        let head_only = crate::http1::head_only(req.method());
        // The whole handshake, backend included, is bounded: no client holds a task forever.
        let exchange = async {
            // (A fixed chunk, so the early bytes' bound is exact: `read_buf` would grow `buf`.)
            let mut early = [0u8; EARLY_CHUNK];
            let pipeline = handshake::handshake(self.env(), &facts, req);
            tokio::pin!(pipeline);
            // While the pipeline runs, the client is watched: one that goes away (end of
            // stream, reset) drops the pipeline wherever it is (the backend handshake given
            // up, `handshake_abandoned` logged). What it sends meanwhile (frames before the
            // 101) is kept for the relay, up to a bound.
            let answered = loop {
                let room = EARLY_BYTES.saturating_sub(buf.len()).min(EARLY_CHUNK);
                tokio::select! {
                    biased;
                    answered = &mut pipeline => break Some(answered),
                    n = stream.read(&mut early[..room]), if room > 0 => match n {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => buf.extend_from_slice(&early[..n]),
                    },
                }
            };
            let (resp, accepted) = answered?;
            Some((crate::http1::encode(&resp, head_only), accepted))
        };
        let (answer, accepted) = match tokio::time::timeout_at(overall_deadline, exchange).await {
            Ok(Some(done)) => done,
            Ok(None) => return Handshake::Ended,
            Err(_) => {
                self.metrics.limit_hit("", Limit::HandshakeTimeout);
                tracing::info!(event = "handshake_timeout", conn, client = %client_addr, "handshake timed out; connection closed");
                return Handshake::Ended;
            }
        };
        let Some(accepted) = accepted else {
            // Lingering matters when the client sent more than its head: what it sent may
            // already be here (read or not: an answer ready at once never polled the watch).
            let linger = !buf.is_empty()
                || matches!(
                    futures_util::FutureExt::now_or_never(stream.read(&mut [0u8; 1])),
                    Some(Ok(1))
                );
            return Handshake::Refused {
                stream,
                answer,
                linger,
            };
        };
        let written = tokio::time::timeout_at(overall_deadline, async {
            stream.write_all(&answer).await?;
            stream.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::info!(event = "connection_closed", conn, api = %accepted.api.config.name, client = %client_addr,
                closed_by = "client_dropped", "client left before the upgrade completed");
            return Handshake::Ended;
        }
        Handshake::Upgraded(accepted, stream, crate::http1::leftover(buf))
    }

    /// What one handshake may use of the gateway.
    fn env(&self) -> handshake::Env {
        handshake::Env {
            served: self.served(),
            active: self.active.clone(),
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            fleet: self.fleet.get().cloned(),
            watches: self.watches.clone(),
        }
    }

    /// The message rates a connection is held to, for the client's messages and the backend's:
    /// the API's, then its product's (the one the handshake came in through, as the handshake's
    /// configuration had it). Per connection ones as specs (the relay makes the buckets); per
    /// subscription ones as the subscription's shared buckets, or as specs of the connection's
    /// own when it has no subscription (an open product). Nothing is allocated when neither
    /// sets any.
    fn message_rates(
        api: &crate::routes::Api,
        product: Option<&str>,
        product_messages: &[MessageRates; 2],
        permit: &crate::routes::Permit,
        fleet: Option<&crate::cluster::Fleet>,
    ) -> ([Vec<RateSpec>; 2], [Vec<SharedRate>; 2]) {
        let mut own: [Vec<RateSpec>; 2] = Default::default();
        let mut shared: [Vec<SharedRate>; 2] = Default::default();
        let api_rates = [
            &api.config.limits.client_messages,
            &api.config.limits.backend_messages,
        ];
        let scopes = std::iter::once((RateScope::Api, api.config.name.as_str(), api_rates)).chain(
            product.map(|p| {
                (
                    RateScope::Product,
                    p,
                    [&product_messages[0], &product_messages[1]],
                )
            }),
        );
        for (scope, name, rates) in scopes {
            for (i, (dir, r)) in [Direction::ClientToBackend, Direction::BackendToClient]
                .into_iter()
                .zip(rates)
                .enumerate()
            {
                own[i].extend(r.per_connection);
                if let Some(spec) = r.per_subscription {
                    match permit.subscription() {
                        Some(sub) => {
                            shared[i].push(sub.message_rate(scope, name, dir, spec, fleet))
                        }
                        // Nobody to share with: the same rate, on the connection's own.
                        None => own[i].push(spec),
                    }
                }
            }
        }
        (own, shared)
    }

    /// Relays an accepted connection until either side closes, then logs its close record.
    async fn relay(
        &self,
        a: Accepted,
        client: Stream,
        client_prefix: Bytes,
        conn: u64,
        client_addr: SocketAddr,
    ) {
        let Accepted {
            backend,
            picked_backend,
            permit,
            api,
            target,
            product,
            product_messages,
            end,
            key_digest,
            policy_deadline,
            context,
            watch,
        } = a;
        let backend::Upgraded {
            stream: backend_stream,
            prefix: backend_prefix,
            headers: backend_headers,
        } = backend;
        let extensions_agreed =
            backend_headers.contains_key(http::header::SEC_WEBSOCKET_EXTENSIONS);
        // The 101's header values are slices of the buffer its head was read into (backend.rs):
        // holding them would pin that buffer for the connection's whole life.
        drop(backend_headers);
        let (own_rates, shared_rates) = Self::message_rates(
            &api,
            product.as_deref(),
            &product_messages,
            &permit,
            self.fleet.get().map(|f| &**f),
        );
        let inspection = Self::inspection(
            &api,
            conn,
            product.as_deref(),
            permit.subscription().map(|s| s.name.as_str()),
            &context,
        );
        let limits = api.config.limits.clone();
        let metrics = api.metrics.clone();
        self.relay_until_closed(
            Relaying {
                conn,
                client_addr,
                client,
                client_prefix,
                backend: backend_stream,
                backend_prefix,
                api,
                permit,
                product,
                picked_backend,
                target,
                key_digest,
            },
            RelayParams {
                limits,
                shutdown: self.shutdown.clone(),
                end,
                metrics,
                extensions_agreed,
                policy_deadline: policy_deadline.map(tokio::time::Instant::from_std),
                own_rates,
                shared_rates,
                inspection,
                watch,
                upgrade: None,
                handable: false,
                resume: None,
            },
        )
        .await;
    }

    /// What the relay needs to run the API's message policies on a connection, if it has any.
    fn inspection(
        api: &crate::routes::Api,
        conn: u64,
        product: Option<&str>,
        subscription: Option<&str>,
        context: &[(String, String)],
    ) -> Option<relay::Inspection> {
        (!api.messages.is_empty()).then(|| relay::Inspection {
            steps: api.messages.clone(),
            connection: Arc::new(Connection::new(
                conn,
                &api.config.name,
                product,
                subscription,
                context,
            )),
            max_size: usize::try_from(
                api.config
                    .limits
                    .max_message_size
                    .map_or(api.config.limits.max_inspected_message_size, |m| {
                        m.min(api.config.limits.max_inspected_message_size)
                    }),
            )
            .unwrap_or(usize::MAX),
            max_frame: usize::try_from(api.config.limits.max_frame_size).unwrap_or(usize::MAX),
        })
    }

    /// Runs the relay of a connection (accepted here, or handed over by the previous
    /// process) and writes its close record; a relay that paused for a binary upgrade is
    /// handed to the new process instead.
    async fn relay_until_closed(&self, r: Relaying, mut params: RelayParams) {
        let Relaying {
            conn,
            client_addr,
            client,
            client_prefix,
            backend,
            backend_prefix,
            api,
            permit,
            product,
            picked_backend,
            target,
            key_digest,
        } = r;
        // Only what the next process can go on with: both sockets plain TCP (a TLS session's
        // state stays here).
        params.handable = matches!((&client, &backend), (Stream::Tcp(_), Stream::Tcp(_)));
        // The handshake's context goes with a handed-over connection, for its message policies.
        let inspected = params.inspection.as_ref().map(|i| i.connection.clone());
        params.upgrade = Some(self.handover.clone());
        let limits = params.limits.clone();
        let extensions_agreed = params.extensions_agreed;
        let policy_deadline = params.policy_deadline;
        let outcome =
            match relay::relay(client, client_prefix, backend, backend_prefix, params).await {
                relay::Relayed::Ended(outcome) => outcome,
                relay::Relayed::Paused(paused) => {
                    let subscription = permit.subscription().map(|s| s.name.clone());
                    let handed = crate::handover::HandedConnection {
                        conn,
                        api: api.config.name.clone(),
                        product,
                        subscription,
                        key: key_digest,
                        client: client_addr,
                        // Only logged; bounded so the description fits a message.
                        target: target[..target.floor_char_boundary(crate::handover::MAX_TARGET)]
                            .to_owned(),
                        picked_backend,
                        limits: crate::handover::HandedLimits {
                            max_frame_size: limits.max_frame_size,
                            max_message_size: limits.max_message_size,
                            idle_timeout_ms: limits.idle_timeout.map(|d| d.as_millis() as u64),
                            max_connection_lifetime_ms: limits
                                .max_connection_lifetime
                                .map(|d| d.as_millis() as u64),
                        },
                        extensions_agreed,
                        policy_deadline_ms: policy_deadline.map(|d| {
                            d.saturating_duration_since(tokio::time::Instant::now())
                                .as_millis() as u64
                        }),
                        age_ms: paused.resume.age.as_millis() as u64,
                        quiet_ms: paused.resume.quiet.map(|d| d.as_millis() as u64),
                        client_to_backend: paused.resume.client_to_backend.clone(),
                        backend_to_client: paused.resume.backend_to_client.clone(),
                        client_unforwarded: paused.client_unforwarded.clone(),
                        backend_unforwarded: paused.backend_unforwarded.clone(),
                        fleet: permit.fleet_things(),
                        context: inspected.map(|c| c.context()).unwrap_or_default(),
                    };
                    self.hand_over(conn, Box::new(handed), *paused);
                    // Its slot is the new process's now.
                    drop(permit);
                    return;
                }
            };
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
        let backend_url = loggable(api.backend_url(picked_backend.as_deref()), log_values);
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

    /// Passes a paused connection to the new process (its sockets leave this one).
    fn hand_over(
        &self,
        conn: u64,
        handed: Box<crate::handover::HandedConnection>,
        paused: relay::Paused,
    ) {
        let fds = match (paused.client, paused.backend) {
            (Stream::Tcp(c), Stream::Tcp(b)) => match (c.into_std(), b.into_std()) {
                (Ok(c), Ok(b)) => Some([c.into(), b.into()]),
                _ => None,
            },
            _ => None,
        };
        let api = handed.api.clone();
        let outbox = self.outbox.lock().ok().and_then(|o| o.clone());
        let sent = match (fds, outbox) {
            (Some(fds), Some(outbox)) => outbox.send((handed, fds)),
            (Some(fds), None) => {
                crate::handover::close_going_away(fds);
                false
            }
            _ => false,
        };
        if sent {
            tracing::info!(event = "connection_handed_over", conn, api = %api,
                client_bytes = paused.client_to_backend.bytes,
                backend_bytes = paused.backend_to_client.bytes,
                "paused at a frame boundary and passed to the new process");
        } else {
            self.handover_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(event = "connection_handover_failed", conn, api = %api,
                "the connection could not be passed to the new process; it is closed");
        }
    }
}

/// A connection the relay takes over: its sockets and what its close record (or its handover)
/// says about it.
struct Relaying {
    conn: u64,
    client_addr: SocketAddr,
    client: Stream,
    client_prefix: bytes::Bytes,
    backend: Stream,
    backend_prefix: bytes::Bytes,
    api: Arc<crate::routes::Api>,
    permit: crate::routes::Permit,
    product: Option<String>,
    picked_backend: Option<String>,
    target: String,
    key_digest: Option<crate::manifest::KeyDigest>,
}

/// Closes a handed-over connection this process cannot relay: 1001 to both sides (both are at
/// a frame boundary), then the sockets, within a second.
async fn close_both(mut client: TcpStream, mut backend: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let reason = "API not served after the upgrade";
    let to_client = crate::frame::close_frame(Direction::BackendToClient, 1001, reason);
    let to_backend = crate::frame::close_frame(Direction::ClientToBackend, 1001, reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tokio::join!(client.write_all(&to_client), backend.write_all(&to_backend));
    })
    .await;
}

/// How a client's handshake ended, for its connection task (which has given its
/// pending-handshake slot back by the time it acts on it).
// Moved out of at once, never stored: boxing the large variant would cost an allocation per
// handshake for nothing.
#[allow(clippy::large_enum_variant)]
enum Handshake {
    /// The 101 was written: relay these (the client's bytes behind its head go first).
    Upgraded(Accepted, Stream, Bytes),
    /// Refused: `answer` is to be written, then the socket closed, after reading and discarding
    /// what the client still sends if `linger` (`http1::refuse`, `http1::linger`).
    Refused {
        stream: Stream,
        answer: Vec<u8>,
        linger: bool,
    },
    /// Nothing more to do with the socket.
    Ended,
}

/// A counted place, given back when dropped: one of `max_pending_handshakes`, held from accept
/// until the handshake is over, or one of the refusals being answered (`Gateway::lingering`).
struct PendingSlot(Arc<AtomicUsize>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The fewest refused sockets that may linger at once, whatever `max_pending_handshakes` says
/// (a tiny pending limit would otherwise make a quick retry close the next one with a reset).
const MIN_LINGERING: usize = 256;

/// Bytes a client may send behind its request head before its answer (frames sent without
/// waiting for the 101), kept for the relay; beyond them the gateway stops reading until it
/// has answered.
const EARLY_BYTES: usize = 64 * 1024;
/// What one read of them takes at most (a buffer in the handshake's future).
const EARLY_CHUNK: usize = 2048;

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

/// A gateway's id in the fleet when `cluster.gateway_id` is not set: the host name and the
/// process id (unique among live processes of one host).
fn default_gateway_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer and its length are ours; gethostname writes at most that much.
    let host = if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end])
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
            .collect()
    } else {
        String::from("host")
    };
    format!("{host}:{}", std::process::id())
}
