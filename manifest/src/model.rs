//! The validated manifest: what the gateway serves by, with every default applied and every path
//! resolved relative to the manifest's directory.
//!
//! Its own module because these types are the crate's contract with the gateway (routing, the
//! handshake, the relay, the admin API and reloads read them), while the TOML they come from and
//! the rules that check it stay private and free to change.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{BackendUrl, KeyDigest};
pub use tollgate_edge::rate::{Rate, RateAction, RateSpec};

/// Signatures the host's `signatures.verify` remembers as valid when the manifest does not say
/// (`gateway.signature_cache_entries`).
pub const DEFAULT_SIGNATURE_CACHE_ENTRIES: usize = 10_000;

/// The validated manifest: everything the gateway needs to serve, with defaults applied and
/// paths resolved relative to the manifest's directory.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: PathBuf,
    pub gateway: GatewayConfig,
    pub admin: Option<AdminConfig>,
    /// `[cluster]`: connection limits counted across every gateway sharing the store.
    pub cluster: Option<ClusterConfig>,
    /// APIs served by this gateway (those whose `gateways` list is empty or names it).
    pub apis: Vec<ApiConfig>,
    /// Names of APIs in the manifest that this gateway does not serve, for the startup log.
    pub unserved_apis: Vec<String>,
    pub products: Vec<ProductConfig>,
    /// Global-scope policies (run first, for every API).
    pub policies: Vec<Attachment>,
}

/// `[cluster]`.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The store's URL (`redis://`); may hold a password, so never printed.
    pub store: String,
    /// This gateway's id in the fleet; `None`: host name and process id, chosen at start.
    pub gateway_id: Option<String>,
    /// Gateways with the same namespace share limits.
    pub namespace: String,
    /// A gateway that stops renewing its lease loses its slots after this.
    pub lease_ttl: std::time::Duration,
    /// Longest a handshake waits on the store.
    pub store_timeout: std::time::Duration,
    pub on_store_failure: OnStoreFailure,
    /// How often a gateway settles its subscriptions' message rates with the fleet's store
    /// (`per = "subscription"` message limits): what the fleet may overshoot a rate by is what
    /// the gateways admit in about one interval, so short; it costs one store call per gateway
    /// per interval, whatever the number of connections and messages.
    pub message_sync_interval: std::time::Duration,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("store", &"(redacted)")
            .field("gateway_id", &self.gateway_id)
            .field("namespace", &self.namespace)
            .field("lease_ttl", &self.lease_ttl)
            .field("store_timeout", &self.store_timeout)
            .field("on_store_failure", &self.on_store_failure)
            .field("message_sync_interval", &self.message_sync_interval)
            .finish()
    }
}

/// What a handshake gets when the store does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreFailure {
    /// Each gateway enforces its share of the limit: the limit divided by the gateways alive at
    /// the last heartbeat, rounded up.
    Local,
    /// Admit (the limit is not enforced while the store is away).
    Open,
    /// Refuse (503).
    Closed,
}

impl OnStoreFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnStoreFailure::Local => "local",
            OnStoreFailure::Open => "open",
            OnStoreFailure::Closed => "closed",
        }
    }
}

/// `[cluster]` defaults.
pub const DEFAULT_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(30);
pub const DEFAULT_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(50);
/// `cluster.message_sync_interval`'s default.
pub const DEFAULT_MESSAGE_SYNC_INTERVAL: std::time::Duration =
    std::time::Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub name: String,
    /// Plain `ws` listener.
    pub listen: Option<SocketAddr>,
    /// `wss` listener.
    pub tls: Option<ListenerTls>,
    pub plugin_dir: Option<PathBuf>,
    /// Where `plugin_dir` is written, in the manifest's error form, for errors about the
    /// directory's contents (two plugins declaring one name).
    pub plugin_dir_location: Option<String>,
    /// Compiled-plugin cache; `None`: the user's cache directory (see `policy::default_cache_dir`).
    pub plugin_cache_dir: Option<PathBuf>,
    /// See `verify_cache`; default `verify_cache::DEFAULT_ENTRIES`, 0 disables it.
    pub signature_cache_entries: usize,
    /// Subscriptions' plain-text keys (read, hashed and checked at every load and reload).
    pub subscription_keys_file: Option<PathBuf>,
    /// Where the process that serves writes its pid once it is ready (a binary upgrade's new
    /// process too): `tollgate upgrade` and service managers find the gateway by it.
    pub pid_file: Option<PathBuf>,
    /// Query values appear in log records as written (`log_query_values = true`, an opt-out
    /// logged at start); otherwise every value is `REDACTED` (names kept).
    pub log_query_values: bool,
    /// Peers whose forwarding headers are extended (see `tollgate_edge::forwarded`).
    pub trusted_proxies: tollgate_edge::forwarded::TrustedProxies,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub struct ListenerTls {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The admin listener. Compared as a whole by a reload: any change needs a restart.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Names (besides the loopback names and the listener's own addresses) a request's `Host`
    /// may carry: a page on another site that rebinds its DNS name to this address still sends
    /// its own name, and is refused.
    pub allowed_hosts: Vec<tollgate_edge::host::HostName>,
    /// SHA-256 of the token every request but the health checks (and the console's static
    /// page) must carry as `Authorization: Bearer`; `None`: no token required. Only the digest
    /// is kept, as for subscription keys.
    pub token: Option<KeyDigest>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("token", &self.token.is_some())
            .finish()
    }
}

/// Gateway-wide limits. Defaults are chosen for a public-facing gateway: generous enough for
/// real chat/streaming traffic, tight enough that one client cannot pin resources forever.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub backend_timeout: Duration,
    /// `None` disables the idle timeout (written as `0s`).
    pub idle_timeout: Option<Duration>,
    pub drain_timeout: Duration,
    pub max_frame_size: u64,
    /// `None`: unlimited (messages stream, so size costs no memory).
    pub max_message_size: Option<u64>,
    pub max_header_bytes: usize,
    /// Accepted sockets that have not finished their handshake (TLS included); over it, new
    /// sockets are closed at once.
    pub max_pending_handshakes: usize,
    /// In a binary upgrade, connections that cannot be handed over (wss) are closed with 1012
    /// (service restart) each at a random moment within this window, so their clients do not
    /// all reconnect at once. Default: 10 s, or a third of `drain_timeout` if that is less (and
    /// never more than `drain_timeout` minus 5 s, the last close's handshake).
    pub upgrade_close_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            backend_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(300)),
            drain_timeout: Duration::from_secs(30),
            max_frame_size: 64 * 1024 * 1024,
            max_message_size: None,
            max_header_bytes: 16 * 1024,
            max_pending_handshakes: 4096,
            upgrade_close_window: Duration::from_secs(10),
        }
    }
}

/// The smallest header cap: a handshake with a large token and cookies fits, and a manifest
/// cannot make every real client's head too large (hyper's smallest read buffer, kept when the
/// gateway stopped using hyper for clients).
pub const MIN_HEADER_BYTES: usize = 8192;

/// The largest header cap: far above any real handshake (a few KiB), and what a client may make
/// the gateway hold per pending handshake stays bounded by a sane figure.
pub const MAX_HEADER_BYTES: usize = 1024 * 1024;

/// Per-connection limits in force for one API (global limits with the API's overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnLimits {
    pub idle_timeout: Option<Duration>,
    /// `None`: a connection may live as long as it is used.
    pub max_connection_lifetime: Option<Duration>,
    pub max_frame_size: u64,
    pub max_message_size: Option<u64>,
    /// `[[apis.message_limits]]` for the client's messages (towards the backend).
    pub client_messages: MessageRates,
    /// The same for the backend's messages (towards the client).
    pub backend_messages: MessageRates,
    /// Largest message the API's message policies are given, whole; a larger one ends the
    /// connection (1009). Only used when the API has message policies.
    pub max_inspected_message_size: u64,
}

/// Default `max_inspected_message_size`: 1 MiB.
pub const DEFAULT_MAX_INSPECTED_MESSAGE_SIZE: u64 = 1 << 20;

/// Most `max_inspected_message_size` may be: a message being inspected is held in memory
/// whole (its frames and its payload, so about twice this per connection and direction, and
/// copied into the policy's sandbox).
pub const MAX_INSPECTED_MESSAGE_SIZE: u64 = 64 << 20;

/// The message rates of one direction of an API's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MessageRates {
    /// Each connection on its own.
    pub per_connection: Option<RateSpec>,
    /// The connections of one subscription together (a connection without a subscription, in
    /// an open product, on its own).
    pub per_subscription: Option<RateSpec>,
}

impl MessageRates {
    pub fn is_empty(&self) -> bool {
        self.per_connection.is_none() && self.per_subscription.is_none()
    }
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub name: String,
    pub display_name: String,
    /// Without leading or trailing `/`; empty means the API is served at the root.
    pub url_suffix: String,
    pub backend: BackendUrl,
    /// Other backends of this API, by name: a policy may send a handshake to one of them
    /// (`proceed.backend`), never to a URL of its own. Ordered by name.
    pub backends: std::collections::BTreeMap<String, BackendUrl>,
    pub schemes: Schemes,
    pub products: Vec<String>,
    /// Where handshakes carry a subscription key; used only when `products` is not empty.
    pub subscription_key: KeyLocation,
    pub max_connections: Option<usize>,
    pub limits: ConnLimits,
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub on_handshake: Vec<Attachment>,
    /// Message policies (`[[apis.on_message]]`), in the order they run.
    pub on_message: Vec<MessageAttachment>,
}

/// A message policy attached to an API: the attachment, and whose messages it sees.
#[derive(Debug, Clone)]
pub struct MessageAttachment {
    pub attachment: Attachment,
    /// It sees the client's messages.
    pub client: bool,
    /// It sees the backend's messages.
    pub backend: bool,
}

/// The schemes an API is served on (`ws` unless the manifest says otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Schemes {
    pub ws: bool,
    pub wss: bool,
}

impl Schemes {
    pub fn serves(&self, s: Scheme) -> bool {
        match s {
            Scheme::Ws => self.ws,
            Scheme::Wss => self.wss,
        }
    }
}

/// What a client listener speaks: WebSocket, or WebSocket over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Ws,
    Wss,
}

impl Scheme {
    /// `ws` / `wss`, as in URLs, logs and `/apis`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
        }
    }

    /// The HTTP scheme of the same transport, what `X-Forwarded-Proto` says (backends check
    /// `http`/`https`, not `ws`/`wss`).
    pub fn http(self) -> &'static str {
        match self {
            Scheme::Ws => "http",
            Scheme::Wss => "https",
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct ProductConfig {
    pub name: String,
    pub display_name: String,
    /// `true` (the default, as in APIM): a handshake on this product's APIs needs a key of one
    /// of its subscriptions. `false` ("open"): no key needed, though a key sent is still checked.
    pub subscription_required: bool,
    pub policies: Vec<Attachment>,
    pub subscriptions: Vec<SubscriptionConfig>,
    /// `[[products.message_limits]]`: on every connection that comes in through the product,
    /// besides its API's own; `per = "subscription"` shares them across the product's APIs.
    pub client_messages: MessageRates,
    pub backend_messages: MessageRates,
}

/// Header and query parameter names a subscription key is read from (header first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLocation {
    /// Lower-case header name.
    pub header: String,
    pub query: String,
}

impl Default for KeyLocation {
    fn default() -> Self {
        KeyLocation {
            header: "ocp-apim-subscription-key".into(),
            query: "subscription-key".into(),
        }
    }
}

/// A subscription to a product. Only SHA-256 digests of its keys are kept in memory: a key
/// read from the environment or the keys file is hashed as soon as it is read.
#[derive(Clone)]
pub struct SubscriptionConfig {
    /// Unique across the manifest (the keys file and logs name subscriptions by it).
    pub name: String,
    pub max_connections: Option<usize>,
    /// Primary first, then secondary; one or both.
    pub keys: Vec<KeyDigest>,
}

impl fmt::Debug for SubscriptionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionConfig")
            .field("name", &self.name)
            .field("max_connections", &self.max_connections)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// A policy attached to a scope: the plugin's declared name and its config table.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub plugin: String,
    pub config: toml::Table,
    /// CPU time one call may use; `None`: `policy::DEFAULT_CPU_TIME`.
    pub cpu_time: Option<Duration>,
    pub memory_limit_bytes: Option<usize>,
    /// Wall-clock deadline of one call; `None`: `policy::DEFAULT_TIMEOUT`.
    pub timeout: Option<Duration>,
    pub failure_status: u16,
    pub grants: Grants,
    pub instances: Instances,
    /// Where it is written, for error messages about the plugin it names, in the manifest's
    /// own error form: ``file:line:column: key `apis[0].on_handshake[0].plugin` ``.
    pub location: String,
    /// The same for its `config` (where a plugin's refusal of its config points), or the
    /// plugin's location when there is no config table.
    pub config_location: String,
}

/// How an attachment's plugin is instantiated for handshakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Instances {
    /// A new instance for every handshake: nothing a handshake leaves in the plugin's memory
    /// can be seen by another. Costs an instantiation per handshake (tens of microseconds for
    /// a small Rust plugin, about a millisecond for an interpreter-based one).
    #[default]
    Fresh,
    /// Warm instances kept per attachment and reused: one instance serves handshakes one at a
    /// time, up to `max_uses` of them, and is discarded after that or when its call fails (trap,
    /// exhausted CPU time or memory). What a plugin keeps in its globals between calls is visible to the
    /// next handshakes the same instance serves; use it for plugins that keep no per-request
    /// state (the first-party ones keep none).
    Pooled { max_uses: u64 },
}

/// Default `pool_max_uses`.
pub const DEFAULT_POOL_MAX_USES: u64 = 10_000;

/// Sandbox grants of one attachment. The default grants nothing: no files, no environment,
/// clocks that read zero, no network (there is no network grant).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// (directory on the host, name the plugin opens it by)
    pub read_dirs: Vec<(PathBuf, String)>,
    pub env: Vec<String>,
    pub clock: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_name_their_transport_and_what_forwarding_headers_say() {
        assert_eq!((Scheme::Ws.as_str(), Scheme::Ws.http()), ("ws", "http"));
        assert_eq!((Scheme::Wss.as_str(), Scheme::Wss.http()), ("wss", "https"));
        assert_eq!(Scheme::Wss.to_string(), "wss");
        let only_wss = Schemes {
            ws: false,
            wss: true,
        };
        assert!(only_wss.serves(Scheme::Wss) && !only_wss.serves(Scheme::Ws));
        assert!(Schemes {
            ws: true,
            wss: false
        }
        .serves(Scheme::Ws));
    }
}
