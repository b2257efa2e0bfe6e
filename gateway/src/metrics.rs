//! Prometheus metrics, served at `GET /metrics` on the admin listener (OpenMetrics text).
//!
//! Every metric is named `tollgate_*` and documented in `docs/observability.md`. Label values
//! come only from the manifest (API and plugin names) or from small fixed sets (status codes,
//! directions, frame types, bucketed close codes), never from what a client sends, so a client
//! cannot blow up the number of series.
//!
//! The relay's hot path does not look anything up: each API resolves its per-direction
//! counters once, when the served state is built ([`ApiMetrics`]), and a connection adds to
//! those atomics once per read system call ([`DirCounters::add`]), not per frame.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::frame::{DirStats, Direction};

/// Lookups of the signature cache that found a remembered signature and lookups that did not,
/// exported as `tollgate_signature_cache_hits_total` / `_misses_total` (an operator sizing
/// `signature_cache_entries` needs the hit ratio). Handed to the policy host's cache, which
/// counts; defined here so the metrics depend on nothing of the policy host.
#[derive(Clone, Default)]
pub struct SignatureCacheCounters {
    pub hits: Counter,
    pub misses: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    api: String,
    /// The product the handshake came in through (its subscription's, or the API's open
    /// product); empty when none.
    product: String,
    /// Empty when the handshake carried no (valid) key.
    subscription: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriptionLabels {
    product: String,
    subscription: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabels {
    api: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    api: String,
    direction: &'static str,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    api: String,
    closed_by: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    api: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    api: String,
    /// A named backend (`backends`), or `default` for the API's `backend`.
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    api: String,
    plugin: String,
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyOutcomeLabels {
    api: String,
    plugin: String,
    scope: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    trigger: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpgradeConnectionLabels {
    path: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpgradeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    api: String,
    direction: &'static str,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    api: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignatureLabels {
    plugin: String,
    algorithm: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeySetLabel {
    key_set: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeySetFetchLabels {
    key_set: String,
    trigger: &'static str,
    outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreCallLabel {
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    call: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CounterLabels {
    plugin: String,
    outcome: &'static str,
    counted_by: &'static str,
}

fn store_buckets() -> Histogram {
    // 50 us .. ~0.8 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

fn handshake_buckets() -> Histogram {
    // 0.25 ms .. ~16 s
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

fn connection_buckets() -> Histogram {
    // 0.1 s .. ~7 h
    Histogram::new(exponential_buckets(0.1, 4.0, 10))
}

fn policy_buckets() -> Histogram {
    // 10 us .. ~1.8 s
    Histogram::new(exponential_buckets(0.000_01, 3.0, 12))
}

/// The process's metrics. One per gateway process; reloads keep it, so counters survive them.
pub struct Metrics {
    registry: Registry,
    handshakes: Family<HandshakeLabels, Counter>,
    handshake_duration: HistogramFamily<ApiLabel>,
    connections_active: Family<ApiLabel, Gauge>,
    connection_duration: HistogramFamily<ApiLabel>,
    frames: Family<TypeLabels, Counter>,
    messages: Family<TypeLabels, Counter>,
    messages_dropped: Family<DropLabels, Counter>,
    bytes: Family<DirLabels, Counter>,
    closes: Family<CloseLabels, Counter>,
    backend_errors: Family<KindLabels, Counter>,
    backend_upgrades: Family<BackendLabels, Counter>,
    policy_calls: Family<PolicyOutcomeLabels, Counter>,
    policy_skips: Family<PolicyLabels, Counter>,
    policy_instances_idle: Family<PolicyLabels, Gauge>,
    policy_duration: HistogramFamily<PolicyLabels>,
    reloads: Family<ReloadLabels, Counter>,
    upgrades: Family<UpgradeLabels, Counter>,
    upgrade_connections: Family<UpgradeConnectionLabels, Counter>,
    limits: Family<LimitLabels, Counter>,
    subscriptions_active: Family<SubscriptionLabels, Gauge>,
    accept_errors: Counter,
    handshakes_abandoned: Counter,
    runtime_tasks: Gauge,
    signatures: Family<SignatureLabels, Counter>,
    signature_cache: SignatureCacheCounters,
    key_sets: KeySetMetrics,
    fleet: FleetMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tollgate");
        let m = Metrics {
            handshakes: Family::default(),
            handshake_duration: Family::new_with_constructor(handshake_buckets),
            connections_active: Family::default(),
            connection_duration: Family::new_with_constructor(connection_buckets),
            frames: Family::default(),
            messages: Family::default(),
            messages_dropped: Family::default(),
            bytes: Family::default(),
            closes: Family::default(),
            backend_errors: Family::default(),
            backend_upgrades: Family::default(),
            policy_calls: Family::default(),
            policy_skips: Family::default(),
            policy_instances_idle: Family::default(),
            policy_duration: Family::new_with_constructor(policy_buckets),
            reloads: Family::default(),
            upgrades: Family::default(),
            upgrade_connections: Family::default(),
            limits: Family::default(),
            subscriptions_active: Family::default(),
            accept_errors: Counter::default(),
            handshakes_abandoned: Counter::default(),
            runtime_tasks: Gauge::default(),
            signatures: Family::default(),
            signature_cache: Default::default(),
            key_sets: KeySetMetrics::default(),
            fleet: FleetMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "handshakes",
            "WebSocket opening handshakes answered, by API (empty: no API matched), product and subscription (empty: none) and the HTTP status the client got (101: accepted)",
            m.handshakes.clone(),
        );
        registry.register_with_unit(
            "handshake_duration",
            "Time from the client's request to the gateway's answer (101 or rejection), backend handshake and policies included",
            Unit::Seconds,
            m.handshake_duration.clone(),
        );
        registry.register(
            "connections_active",
            "Relayed WebSocket connections open now (after the 101 pair)",
            m.connections_active.clone(),
        );
        registry.register_with_unit(
            "connection_duration",
            "Life of relayed connections, from the 101 to the end of the relay",
            Unit::Seconds,
            m.connection_duration.clone(),
        );
        registry.register(
            "frames",
            "WebSocket frames relayed, by direction (client_to_backend, backend_to_client) and type (text, binary, continuation, ping, pong, close)",
            m.frames.clone(),
        );
        registry.register(
            "messages",
            "Complete WebSocket data messages relayed, by direction and type (text, binary)",
            m.messages.clone(),
        );
        registry.register(
            "messages_dropped",
            "Data messages not forwarded because they were over an [[apis.message_limits]] rate with action = \"drop\", by direction and limit (max_messages_per_second, max_bytes_per_second)",
            m.messages_dropped.clone(),
        );
        registry.register_with_unit(
            "relayed",
            "Bytes relayed on the wire (frame headers and payloads), by direction",
            Unit::Bytes,
            m.bytes.clone(),
        );
        registry.register(
            "connections_closed",
            "Relayed connections that ended, by who ended them and the close code (bucketed: 1000-2999 exact, 3xxx, 4xxx, none)",
            m.closes.clone(),
        );
        registry.register(
            "backend_handshake_errors",
            "Backend handshakes that failed, by kind (connect, tls, timeout, http, bad_upgrade, rejected)",
            m.backend_errors.clone(),
        );
        registry.register(
            "backend_upgrades",
            "Backend handshakes answered 101, by backend (a named one a policy picked, or default)",
            m.backend_upgrades.clone(),
        );
        registry.register(
            "policy_calls",
            "onHandshake policy calls, by plugin, scope and outcome (allow, reject, error)",
            m.policy_calls.clone(),
        );
        registry.register(
            "policy_skips",
            "Inherited policies skipped on a WebSocket API because they declare a capability onHandshake does not support",
            m.policy_skips.clone(),
        );
        registry.register(
            "policy_instances_idle",
            "Warm instances kept for pooled attachments (instances = \"pooled\"), waiting for a handshake",
            m.policy_instances_idle.clone(),
        );
        registry.register_with_unit(
            "policy_duration",
            "Time one policy call took (instance, guest code, host calls)",
            Unit::Seconds,
            m.policy_duration.clone(),
        );
        registry.register(
            "reloads",
            "Reloads of the manifest and plugin directory, by trigger (sighup, file_change) and outcome (applied, rejected)",
            m.reloads.clone(),
        );
        registry.register(
            "upgrades",
            "Binary upgrades this process started (SIGUSR2), by outcome (handed_over: the new process accepts on the listening sockets; failed: this process kept serving)",
            m.upgrades.clone(),
        );
        registry.register(
            "upgrade_connections",
            "Live connections through binary upgrades, by path: handed_over (paused at a frame boundary and passed to the new process), drained (closed with 1012 by this process: wss, or no pause in time), failed (lost on the way), resumed (taken over by this process from the previous one), closed (taken over but closed at once: its API or key is gone)",
            m.upgrade_connections.clone(),
        );
        registry.register(
            "limits_hit",
            "Times a limit stopped a handshake or a connection, by API and limit",
            m.limits.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accept(2) calls on the client listeners (typically out of file descriptors); the listener backs off and keeps serving",
            m.accept_errors.clone(),
        );
        registry.register(
            "handshakes_abandoned",
            "Handshakes whose client went away before the gateway answered (during the policies or the backend handshake)",
            m.handshakes_abandoned.clone(),
        );
        registry.register(
            "runtime_tasks",
            "Tasks alive in the gateway's async runtime at the time of the scrape (listeners, handshakes, relays, timers' owners): it follows the load and falls back with it; one that only grows is a leak",
            m.runtime_tasks.clone(),
        );
        registry.register(
            "subscription_connections_active",
            "Connections held under each subscription now (counted against its max_connections)",
            m.subscriptions_active.clone(),
        );
        registry.register(
            "signature_cache_hits",
            "Signature checks answered from the cache of signatures already found valid (signature_cache_entries)",
            m.signature_cache.hits.clone(),
        );
        registry.register(
            "signature_cache_misses",
            "Signature checks the cache did not know, so the host verified them (failures included)",
            m.signature_cache.misses.clone(),
        );
        registry.register(
            "signature_verifications",
            "Signature checks policies asked the host for during handshakes (signatures.verify), by plugin, algorithm and result (valid, invalid, error: the key cannot be used with the algorithm)",
            m.signatures.clone(),
        );
        registry.register(
            "key_set_fetches",
            "Fetches of key sets policies registered (key-sets: JWKS, OpenID Connect discovery), by source URL (without query), trigger (load, refresh, unknown_kid) and outcome (ok, error)",
            m.key_sets.fetches.clone(),
        );
        registry.register(
            "key_set_last_success_timestamp_seconds",
            "When each key set was last fetched successfully (Unix seconds); its age is time() minus this, and it keeps growing while the provider is down and the last good keys stay in use",
            m.key_sets.last_success.clone(),
        );
        registry.register(
            "key_set_keys",
            "Usable keys in each key set as last fetched",
            m.key_sets.keys.clone(),
        );
        registry.register_with_unit(
            "store_call_duration",
            "Round trips to the fleet's store ([cluster]), by call (acquire, release, heartbeat, increment, counts, leave, settle), failed ones included",
            Unit::Seconds,
            m.fleet.call_duration.clone(),
        );
        registry.register(
            "store_errors",
            "Store calls that failed, by call and error (timeout: no answer within store_timeout, error, not_registered: this gateway's lease was missing and it registered again)",
            m.fleet.errors.clone(),
        );
        registry.register(
            "store_fallback",
            "1 while the fleet's store does not answer and limits follow on_store_failure, else 0",
            m.fleet.fallback.clone(),
        );
        registry.register(
            "fleet_live_gateways",
            "Gateways with a live lease in the store at this gateway's last heartbeat",
            m.fleet.live_gateways.clone(),
        );
        registry.register(
            "fleet_slots_held",
            "Connection slots this gateway holds in the fleet's store (a connection with a subscription and an API limit holds two)",
            m.fleet.slots_held.clone(),
        );
        registry.register(
            "counter_increments",
            "counters.increment calls of policies (rate-limit-by-key), by plugin, outcome (allowed, refused, error) and who counted (fleet, local, local_share: this gateway's share while the store is away, unlimited: the store is away and on_store_failure = open)",
            m.fleet.counters.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The fleet's series, for the store and the counters.
    pub fn fleet(&self) -> FleetMetrics {
        self.fleet.clone()
    }

    /// The key-set counters, for the policy host.
    pub fn key_sets(&self) -> KeySetMetrics {
        self.key_sets.clone()
    }

    /// The signature cache's hit and miss counters, for the policy host.
    pub fn signature_cache(&self) -> SignatureCacheCounters {
        self.signature_cache.clone()
    }

    /// The signature-check counters, for the policy host to hand out per plugin.
    pub fn signatures(&self) -> SignatureMetrics {
        SignatureMetrics(self.signatures.clone())
    }

    /// The exposition, OpenMetrics text format.
    pub fn encode(&self) -> String {
        // Read when scraped: the runtime keeps the count, so nothing is updated per task.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.runtime_tasks
                .set(i64::try_from(rt.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The handles one API's connections update, resolved once.
    pub fn api(&self, api: &str) -> Arc<ApiMetrics> {
        let a = || ApiLabel {
            api: api.to_owned(),
        };
        let dir = |d: Direction| {
            let direction = direction_label(d);
            let typed = |fam: &Family<TypeLabels, Counter>, t: &'static str| {
                fam.get_or_create_owned(&TypeLabels {
                    api: api.to_owned(),
                    direction,
                    r#type: t,
                })
            };
            DirCounters {
                bytes: self.bytes.get_or_create_owned(&DirLabels {
                    api: api.to_owned(),
                    direction,
                }),
                text_frames: typed(&self.frames, "text"),
                binary_frames: typed(&self.frames, "binary"),
                continuation_frames: typed(&self.frames, "continuation"),
                ping_frames: typed(&self.frames, "ping"),
                pong_frames: typed(&self.frames, "pong"),
                close_frames: typed(&self.frames, "close"),
                text_messages: typed(&self.messages, "text"),
                binary_messages: typed(&self.messages, "binary"),
                dropped: (self.messages_dropped.clone(), api.to_owned(), direction),
            }
        };
        Arc::new(ApiMetrics {
            upgrades_default: self.backend_upgrades.get_or_create_owned(&BackendLabels {
                api: api.to_owned(),
                backend: "default".to_owned(),
            }),
            name: api.to_owned(),
            active: self.connections_active.get_or_create_owned(&a()),
            connection_duration: self.connection_duration.get_or_create_owned(&a()),
            handshake_duration: self.handshake_duration.get_or_create_owned(&a()),
            client_to_backend: dir(Direction::ClientToBackend),
            backend_to_client: dir(Direction::BackendToClient),
        })
    }

    /// The handles one policy attachment updates, resolved once.
    pub fn policy(&self, api: &str, plugin: &str, scope: &str) -> PolicyMetrics {
        let outcome = |o: &'static str| {
            self.policy_calls.get_or_create_owned(&PolicyOutcomeLabels {
                api: api.to_owned(),
                plugin: plugin.to_owned(),
                scope: scope.to_owned(),
                outcome: o,
            })
        };
        let l = PolicyLabels {
            api: api.to_owned(),
            plugin: plugin.to_owned(),
            scope: scope.to_owned(),
        };
        let (duration, idle) = self.policy_timing(api, plugin, scope);
        PolicyMetrics {
            allow: outcome("allow"),
            reject: outcome("reject"),
            error: outcome("error"),
            skips: self.policy_skips.get_or_create_owned(&l),
            idle,
            duration,
        }
    }

    /// The call-time histogram and the idle-instance gauge of one attachment, alone: a message
    /// policy's calls are counted by decision ([`Metrics::policy_outcome`]), so it gets no
    /// `allow`/`reject` series and no skip counter.
    pub fn policy_timing(&self, api: &str, plugin: &str, scope: &str) -> (Histogram, Gauge) {
        let l = PolicyLabels {
            api: api.to_owned(),
            plugin: plugin.to_owned(),
            scope: scope.to_owned(),
        };
        (
            self.policy_duration.get_or_create_owned(&l),
            self.policy_instances_idle.get_or_create_owned(&l),
        )
    }

    /// One outcome's counter of `tollgate_policy_calls_total` (a message policy's decisions:
    /// `forward`, `replace`, `drop`, `close`, `error`).
    pub fn policy_outcome(
        &self,
        api: &str,
        plugin: &str,
        scope: &str,
        outcome: &'static str,
    ) -> Counter {
        self.policy_calls.get_or_create_owned(&PolicyOutcomeLabels {
            api: api.to_owned(),
            plugin: plugin.to_owned(),
            scope: scope.to_owned(),
            outcome,
        })
    }

    /// A handshake answered with `status`; `api` is empty when no API matched, `product` and
    /// `subscription` when the handshake had none.
    pub fn handshake(&self, api: &str, product: &str, subscription: &str, status: u16) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                api: api.to_owned(),
                product: product.to_owned(),
                subscription: subscription.to_owned(),
                status,
            })
            .inc();
    }

    /// The live-connections gauge of one subscription.
    pub fn subscription_active(&self, product: &str, subscription: &str) -> Gauge {
        self.subscriptions_active
            .get_or_create_owned(&SubscriptionLabels {
                product: product.to_owned(),
                subscription: subscription.to_owned(),
            })
    }

    pub fn backend_error(&self, api: &str, kind: &'static str) {
        self.backend_errors
            .get_or_create(&KindLabels {
                api: api.to_owned(),
                kind,
            })
            .inc();
    }

    pub fn connection_closed(&self, api: &str, closed_by: &'static str, code: Option<u16>) {
        self.closes
            .get_or_create(&CloseLabels {
                api: api.to_owned(),
                closed_by,
                code: close_code_label(code),
            })
            .inc();
    }

    pub fn reload(&self, trigger: &'static str, outcome: &'static str) {
        self.reloads
            .get_or_create(&ReloadLabels { trigger, outcome })
            .inc();
    }

    /// A binary upgrade ended: `handed_over` or `failed`.
    pub fn upgrade(&self, outcome: &'static str) {
        self.upgrades
            .get_or_create(&UpgradeLabels { outcome })
            .inc();
    }

    pub fn upgrade_connections(&self, path: crate::handover::Path, n: u64) {
        self.upgrade_connections
            .get_or_create(&UpgradeConnectionLabels {
                path: path.as_str(),
            })
            .inc_by(n);
    }

    pub fn accept_error(&self) {
        self.accept_errors.inc();
    }

    /// A backend answered 101: `backend` is the named one a policy picked, or `default`.
    pub fn backend_upgraded(&self, api: &str, backend: &str) {
        self.backend_upgrades
            .get_or_create(&BackendLabels {
                api: api.to_owned(),
                backend: backend.to_owned(),
            })
            .inc();
    }

    pub fn handshake_abandoned(&self) {
        self.handshakes_abandoned.inc();
    }

    /// A limit stopped something (`api` empty for the gateway-wide ones).
    pub fn limit_hit(&self, api: &str, limit: Limit) {
        self.limits
            .get_or_create(&LimitLabels {
                api: api.to_owned(),
                limit: limit.label(),
            })
            .inc();
    }
}

/// What `tollgate_limits_hit_total` counts: each limit that can stop a handshake or end a
/// connection. Its label is the manifest key (qualified where one key has several scopes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// A subscription's `max_connections` (429).
    SubscriptionMaxConnections,
    /// `gateway.limits.max_connections` (503).
    GatewayMaxConnections,
    /// An API's `max_connections` (503).
    ApiMaxConnections,
    HandshakeTimeout,
    MaxPendingHandshakes,
    MaxFrameSize,
    MaxMessageSize,
    IdleTimeout,
    MaxConnectionLifetime,
    /// `[[apis.message_limits]]` with `action = "close"` (a connection closed, 1008).
    MaxMessagesPerSecond,
    MaxBytesPerSecond,
    /// A message larger than its API's message policies are given (a connection closed, 1009).
    MaxInspectedMessageSize,
    /// A request head over `max_header_bytes` or 100 header lines (431).
    MaxHeaderBytes,
}

impl Limit {
    pub const ALL: [Limit; 13] = [
        Limit::SubscriptionMaxConnections,
        Limit::GatewayMaxConnections,
        Limit::ApiMaxConnections,
        Limit::HandshakeTimeout,
        Limit::MaxPendingHandshakes,
        Limit::MaxFrameSize,
        Limit::MaxMessageSize,
        Limit::IdleTimeout,
        Limit::MaxConnectionLifetime,
        Limit::MaxMessagesPerSecond,
        Limit::MaxBytesPerSecond,
        Limit::MaxInspectedMessageSize,
        Limit::MaxHeaderBytes,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::SubscriptionMaxConnections => "subscription_max_connections",
            Limit::GatewayMaxConnections => "gateway_max_connections",
            Limit::ApiMaxConnections => "api_max_connections",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::MaxPendingHandshakes => "max_pending_handshakes",
            Limit::MaxFrameSize => "max_frame_size",
            Limit::MaxMessageSize => "max_message_size",
            Limit::IdleTimeout => "idle_timeout",
            Limit::MaxConnectionLifetime => "max_connection_lifetime",
            Limit::MaxMessagesPerSecond => "max_messages_per_second",
            Limit::MaxBytesPerSecond => "max_bytes_per_second",
            Limit::MaxInspectedMessageSize => "max_inspected_message_size",
            Limit::MaxHeaderBytes => "max_header_bytes",
        }
    }
}

impl From<tollgate_edge::frame::SizeLimit> for Limit {
    fn from(l: tollgate_edge::frame::SizeLimit) -> Limit {
        match l {
            tollgate_edge::frame::SizeLimit::MaxFrameSize => Limit::MaxFrameSize,
            tollgate_edge::frame::SizeLimit::MaxMessageSize => Limit::MaxMessageSize,
            tollgate_edge::frame::SizeLimit::MaxMessagesPerSecond => Limit::MaxMessagesPerSecond,
            tollgate_edge::frame::SizeLimit::MaxBytesPerSecond => Limit::MaxBytesPerSecond,
            tollgate_edge::frame::SizeLimit::MaxInspectedMessageSize => {
                Limit::MaxInspectedMessageSize
            }
        }
    }
}

fn direction_label(d: Direction) -> &'static str {
    match d {
        Direction::ClientToBackend => "client_to_backend",
        Direction::BackendToClient => "backend_to_client",
    }
}

/// Close codes as a label: the registered range (1000-2999) exactly, since the frame parser
/// refuses codes that are not defined there; application ranges grouped, so a client choosing
/// codes cannot create series at will.
fn close_code_label(code: Option<u16>) -> &'static str {
    const EXACT: [&str; 16] = [
        "1000", "1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010",
        "1011", "1012", "1013", "1014", "1015",
    ];
    match code {
        None => "none",
        Some(c @ 1000..=1015) => EXACT[(c - 1000) as usize],
        Some(3000..=3999) => "3xxx",
        Some(4000..=4999) => "4xxx",
        Some(_) => "other",
    }
}

/// One API's connection metrics.
pub struct ApiMetrics {
    pub name: String,
    /// `tollgate_backend_upgrades_total{backend="default"}`: held, as nearly every handshake
    /// counts here (a named backend is looked up when a policy picks one).
    pub upgrades_default: Counter,
    pub active: Gauge,
    pub connection_duration: Histogram,
    pub handshake_duration: Histogram,
    pub client_to_backend: DirCounters,
    pub backend_to_client: DirCounters,
}

/// One direction's relay counters of one API.
pub struct DirCounters {
    bytes: Counter,
    text_frames: Counter,
    binary_frames: Counter,
    continuation_frames: Counter,
    ping_frames: Counter,
    pong_frames: Counter,
    close_frames: Counter,
    text_messages: Counter,
    binary_messages: Counter,
    /// `tollgate_messages_dropped_total`: its series are made at the first drop, so APIs
    /// without message limits show none.
    dropped: (Family<DropLabels, Counter>, String, &'static str),
}

impl DirCounters {
    /// Publishes what a connection counted since the last call (`published` is brought up to
    /// `now`). Called once per read, so a long-lived connection shows up while it lives.
    pub fn add(&self, now: &DirStats, published: &mut DirStats) {
        if now == published {
            return;
        }
        let pairs: [(&Counter, u64, u64); 9] = [
            (&self.bytes, now.bytes, published.bytes),
            (&self.text_frames, now.text_frames, published.text_frames),
            (
                &self.binary_frames,
                now.binary_frames,
                published.binary_frames,
            ),
            (
                &self.continuation_frames,
                now.continuation_frames,
                published.continuation_frames,
            ),
            (&self.ping_frames, now.ping_frames, published.ping_frames),
            (&self.pong_frames, now.pong_frames, published.pong_frames),
            (&self.close_frames, now.close_frames, published.close_frames),
            (
                &self.text_messages,
                now.text_messages,
                published.text_messages,
            ),
            (
                &self.binary_messages,
                now.binary_messages,
                published.binary_messages,
            ),
        ];
        for (c, n, p) in pairs {
            if n != p {
                c.inc_by(n - p);
            }
        }
        for (limit, n, p) in [
            (
                Limit::MaxMessagesPerSecond,
                now.dropped_over_messages,
                published.dropped_over_messages,
            ),
            (
                Limit::MaxBytesPerSecond,
                now.dropped_over_bytes,
                published.dropped_over_bytes,
            ),
        ] {
            if n != p {
                let (family, api, direction) = &self.dropped;
                family
                    .get_or_create(&DropLabels {
                        api: api.clone(),
                        direction,
                        limit: limit.label(),
                    })
                    .inc_by(n - p);
            }
        }
        *published = *now;
    }
}

/// One policy attachment's metrics.
pub struct PolicyMetrics {
    pub allow: Counter,
    pub reject: Counter,
    pub error: Counter,
    pub skips: Counter,
    pub duration: Histogram,
    /// Idle warm instances of a pooled attachment (summed over the pools of reloads).
    pub idle: Gauge,
}

/// A call to the fleet's store (`tollgate_store_*` series).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreCall {
    Acquire,
    Release,
    Heartbeat,
    Increment,
    Counts,
    Leave,
    Settle,
}

impl StoreCall {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreCall::Acquire => "acquire",
            StoreCall::Release => "release",
            StoreCall::Heartbeat => "heartbeat",
            StoreCall::Increment => "increment",
            StoreCall::Counts => "counts",
            StoreCall::Leave => "leave",
            StoreCall::Settle => "settle",
        }
    }
}

/// Why a store call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    Timeout,
    Error,
    NotRegistered,
}

/// The fleet's series (`tollgate_store_*`, `tollgate_fleet_*`, `tollgate_counter_*`).
#[derive(Clone)]
pub struct FleetMetrics {
    call_duration: HistogramFamily<StoreCallLabel>,
    errors: Family<StoreErrorLabels, Counter>,
    fallback: Gauge,
    live_gateways: Gauge,
    slots_held: Gauge,
    counters: Family<CounterLabels, Counter>,
}

impl Default for FleetMetrics {
    fn default() -> Self {
        FleetMetrics {
            call_duration: Family::new_with_constructor(store_buckets),
            errors: Family::default(),
            fallback: Gauge::default(),
            live_gateways: Gauge::default(),
            slots_held: Gauge::default(),
            counters: Family::default(),
        }
    }
}

impl FleetMetrics {
    /// A store call's round trip (answered or not).
    pub fn call(&self, call: StoreCall, took: std::time::Duration) {
        self.call_duration
            .get_or_create(&StoreCallLabel {
                call: call.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// A store call that failed.
    pub fn failed(&self, call: StoreCall, failure: StoreFailure) {
        self.errors
            .get_or_create(&StoreErrorLabels {
                call: call.as_str(),
                error: match failure {
                    StoreFailure::Timeout => "timeout",
                    StoreFailure::Error => "error",
                    StoreFailure::NotRegistered => "not_registered",
                },
            })
            .inc();
    }

    /// The store stopped (true) or started again (false) answering: limits follow
    /// `on_store_failure` meanwhile.
    pub fn fallback(&self, on: bool) {
        self.fallback.set(i64::from(on));
    }

    pub fn live_gateways(&self, n: u64) {
        self.live_gateways.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// One slot more (true) or fewer held by this gateway in the store.
    /// `n` slots more (`held`) or fewer in this gateway's count.
    pub fn slots_by(&self, held: bool, n: u64) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if held {
            self.slots_held.inc_by(n);
        } else {
            self.slots_held.dec_by(n);
        }
    }

    /// A `counters.increment` of `plugin`: `outcome` allowed, refused or error; `counted_by`
    /// fleet, local, local_share or unlimited.
    pub fn counted(&self, plugin: &str, outcome: &'static str, counted_by: &'static str) {
        self.counters
            .get_or_create(&CounterLabels {
                plugin: plugin.to_owned(),
                outcome,
                counted_by,
            })
            .inc();
    }
}

/// The key-set series (`tollgate_key_set_*`), for the policy host's fetched key sets.
#[derive(Clone, Default)]
pub struct KeySetMetrics {
    fetches: Family<KeySetFetchLabels, Counter>,
    last_success: Family<KeySetLabel, Gauge>,
    keys: Family<KeySetLabel, Gauge>,
}

impl KeySetMetrics {
    /// A fetch of `key_set`; `trigger`: what started it (`load`, `refresh`, `unknown_kid`).
    pub fn fetched(&self, key_set: &str, trigger: &'static str, ok: bool) {
        self.fetches
            .get_or_create(&KeySetFetchLabels {
                key_set: key_set.to_owned(),
                trigger,
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    /// Drops the series of a key set no state holds any more.
    pub fn forget(&self, key_set: &str) {
        let label = KeySetLabel {
            key_set: key_set.to_owned(),
        };
        self.last_success.remove(&label);
        self.keys.remove(&label);
        for trigger in ["load", "refresh", "unknown_kid"] {
            for outcome in ["ok", "error"] {
                self.fetches.remove(&KeySetFetchLabels {
                    key_set: key_set.to_owned(),
                    trigger,
                    outcome,
                });
            }
        }
    }

    /// A successful fetch of `keys` keys, now.
    pub fn succeeded(&self, key_set: &str, keys: usize) {
        let label = KeySetLabel {
            key_set: key_set.to_owned(),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_success
            .get_or_create(&label)
            .set(i64::try_from(now).unwrap_or(i64::MAX));
        self.keys
            .get_or_create(&label)
            .set(i64::try_from(keys).unwrap_or(i64::MAX));
    }
}

/// `tollgate_signature_verifications_total`, for the policy host: a plugin's counters come
/// from [`SignatureMetrics::plugin`] once, when the plugin is loaded.
#[derive(Clone)]
pub struct SignatureMetrics(Family<SignatureLabels, Counter>);

/// How one `signatures.verify` call came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyResult {
    Valid,
    Invalid,
    /// The key cannot be used with the algorithm (wrong family, malformed).
    Error,
}

impl VerifyResult {
    pub fn of(r: &Result<bool, String>) -> VerifyResult {
        match r {
            Ok(true) => VerifyResult::Valid,
            Ok(false) => VerifyResult::Invalid,
            Err(_) => VerifyResult::Error,
        }
    }
}

const ALGORITHMS: usize = tollgate_verify::Algorithm::WIT_ORDER.len();

/// An algorithm's cell index and label: its position in the WIT's enum and its JWS name.
fn algorithm_label(a: tollgate_verify::Algorithm) -> (usize, &'static str) {
    (a as usize, a.jws_name())
}

impl SignatureMetrics {
    /// One plugin's counters. Each series is created on its first use (a plugin that only
    /// ever checks RS256 adds no zero series for the other eleven algorithms) and found
    /// without a lookup after that.
    pub fn plugin(&self, plugin: &str) -> Arc<PluginSignatureMetrics> {
        Arc::new(PluginSignatureMetrics {
            family: self.0.clone(),
            plugin: plugin.to_owned(),
            cells: Default::default(),
        })
    }
}

/// One plugin's `tollgate_signature_verifications_total` series.
pub struct PluginSignatureMetrics {
    family: Family<SignatureLabels, Counter>,
    plugin: String,
    cells: [[std::sync::OnceLock<Counter>; 3]; ALGORITHMS],
}

impl PluginSignatureMetrics {
    pub fn record(&self, algorithm: tollgate_verify::Algorithm, result: VerifyResult) {
        let (i, name) = algorithm_label(algorithm);
        let (j, r) = match result {
            VerifyResult::Valid => (0, "valid"),
            VerifyResult::Invalid => (1, "invalid"),
            VerifyResult::Error => (2, "error"),
        };
        self.cells[i][j]
            .get_or_init(|| {
                self.family.get_or_create_owned(&SignatureLabels {
                    plugin: self.plugin.clone(),
                    algorithm: name,
                    result: r,
                })
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime_tasks(text: &str) -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix("tollgate_runtime_tasks "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    }

    /// The README's metrics table is what operators build dashboards and alerts from: every
    /// family the gateway exposes is in it with its type and label names, and it lists nothing
    /// the gateway does not expose.
    #[test]
    fn the_readme_documents_every_metric_with_its_type_and_labels() {
        type Family = (String, String, Vec<String>);
        let readme = include_str!("../../README.md");
        let mut documented: Vec<Family> = readme
            .lines()
            .filter_map(|l| {
                let mut cells = l.strip_prefix("| `tollgate_")?.split('|');
                let name = cells.next()?.trim().trim_end_matches('`');
                let kind = cells.next()?.trim();
                let mut labels: Vec<String> = cells
                    .next()?
                    .split(',')
                    .map(|c| c.trim().trim_matches('`').to_owned())
                    .filter(|c| !c.is_empty())
                    .collect();
                labels.sort();
                // OpenMetrics names a counter family without its `_total` suffix.
                let family = match kind {
                    "counter" => name.strip_suffix("_total")?,
                    _ => name,
                };
                Some((format!("tollgate_{family}"), kind.to_owned(), labels))
            })
            .collect();
        // One series in every family, through the calls the gateway makes.
        let m = Metrics::new();
        let _api = m.api("a");
        let _policy = m.policy("a", "p", "api");
        m.handshake("a", "", "", 101);
        let _sub = m.subscription_active("p", "s");
        m.backend_error("a", "connect");
        m.backend_upgraded("a", "default");
        m.connection_closed("a", "client", Some(1000));
        m.reload("sighup", "applied");
        m.upgrade("failed");
        m.upgrade_connections(crate::handover::Path::HandedOver, 1);
        m.accept_error();
        m.limit_hit("a", Limit::IdleTimeout);
        // A drop makes the series of `tollgate_messages_dropped_total` (none before).
        m.api("a").client_to_backend.add(
            &DirStats {
                dropped_over_messages: 1,
                ..DirStats::default()
            },
            &mut DirStats::default(),
        );
        m.signatures()
            .plugin("p")
            .record(tollgate_verify::Algorithm::Rs256, VerifyResult::Valid);
        let fleet = m.fleet();
        fleet.call(StoreCall::Acquire, std::time::Duration::ZERO);
        fleet.failed(StoreCall::Acquire, StoreFailure::Timeout);
        fleet.counted("p", "allowed", "fleet");
        m.key_sets().fetched("https://idp/jwks", "load", true);
        m.key_sets().succeeded("https://idp/jwks", 1);
        let text = m.encode();
        let mut exposed: Vec<Family> = text
            .lines()
            .filter_map(|l| {
                let (name, kind) = l.strip_prefix("# TYPE ")?.split_once(' ')?;
                // The label names of the family's first sample (`le` is the histogram's own).
                let sample = text.lines().find(|s| {
                    s.strip_prefix(name)
                        .is_some_and(|r| r.starts_with(['{', ' ', '_']))
                })?;
                let mut labels: Vec<String> = sample
                    .split_once('{')
                    .map(|(_, r)| r.split('}').next().unwrap_or(""))
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.to_owned()))
                    .filter(|k| k != "le")
                    .collect();
                labels.sort();
                Some((name.to_owned(), kind.to_owned(), labels))
            })
            .collect();
        documented.sort();
        exposed.sort();
        assert!(exposed.len() >= 20, "{exposed:?}");
        assert_eq!(documented, exposed);
    }

    /// The README lists the `limit` label's values in the `tollgate_limits_hit_total` row,
    /// exactly those the gateway uses.
    #[test]
    fn the_readme_lists_every_limit_label() {
        let row = include_str!("../../README.md")
            .lines()
            .find(|l| l.starts_with("| `tollgate_limits_hit_total`"))
            .unwrap_or_default();
        let description = row.rsplit('|').nth(1).unwrap_or_default();
        let mut listed: Vec<&str> = description
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|w| *w != "api")
            .collect();
        let mut labels: Vec<&str> = Limit::ALL.iter().map(|l| l.label()).collect();
        listed.sort();
        labels.sort();
        assert_eq!(listed, labels, "{row}");
    }

    #[tokio::test]
    async fn runtime_tasks_follow_the_tasks_alive_at_scrape_time() {
        let m = Metrics::new();
        let idle = runtime_tasks(&m.encode());
        let (tx, rx) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let _ = rx.changed().await;
                })
            })
            .collect();
        assert_eq!(runtime_tasks(&m.encode()), idle + 10);
        let _ = tx.send(true);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(runtime_tasks(&m.encode()), idle);
    }

    #[test]
    fn relay_counters_publish_deltas() {
        let m = Metrics::new();
        let a = m.api("echo");
        let mut published = DirStats::default();
        let mut now = DirStats {
            bytes: 10,
            frames: 2,
            text_frames: 2,
            text_messages: 1,
            ..DirStats::default()
        };
        a.client_to_backend.add(&now, &mut published);
        now.bytes = 25;
        now.frames = 3;
        now.binary_frames = 1;
        now.binary_messages = 1;
        a.client_to_backend.add(&now, &mut published);
        a.client_to_backend.add(&now, &mut published);
        let text = m.encode();
        assert!(text.contains(
            "tollgate_relayed_bytes_total{api=\"echo\",direction=\"client_to_backend\"} 25"
        ));
        assert!(text.contains(
            "tollgate_frames_total{api=\"echo\",direction=\"client_to_backend\",type=\"text\"} 2"
        ));
        assert!(text.contains(
            "tollgate_messages_total{api=\"echo\",direction=\"client_to_backend\",type=\"binary\"} 1"
        ));
    }

    #[test]
    fn close_codes_are_bucketed() {
        assert_eq!(close_code_label(Some(1000)), "1000");
        assert_eq!(close_code_label(Some(1015)), "1015");
        assert_eq!(close_code_label(Some(4321)), "4xxx");
        assert_eq!(close_code_label(Some(3000)), "3xxx");
        assert_eq!(close_code_label(None), "none");
    }

    #[test]
    fn signature_checks_count_per_plugin_algorithm_and_result_without_zero_series() {
        let m = Metrics::new();
        let jwt = m.signatures().plugin("jwt-validate");
        jwt.record(tollgate_verify::Algorithm::Rs256, VerifyResult::Invalid);
        jwt.record(tollgate_verify::Algorithm::Rs256, VerifyResult::Invalid);
        jwt.record(
            tollgate_verify::Algorithm::EdDsa,
            VerifyResult::of(&Ok(true)),
        );
        // A second handle for the same plugin (a reload) adds to the same series.
        m.signatures().plugin("jwt-validate").record(
            tollgate_verify::Algorithm::Rs256,
            VerifyResult::of(&Err("x".into())),
        );
        let text = m.encode();
        for line in [
            "tollgate_signature_verifications_total{plugin=\"jwt-validate\",algorithm=\"RS256\",result=\"invalid\"} 2",
            "tollgate_signature_verifications_total{plugin=\"jwt-validate\",algorithm=\"EdDSA\",result=\"valid\"} 1",
            "tollgate_signature_verifications_total{plugin=\"jwt-validate\",algorithm=\"RS256\",result=\"error\"} 1",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert!(!text.contains("HS512"), "{text}");
    }
}
