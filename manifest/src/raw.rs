//! The manifest as written: serde structs that mirror the TOML one to one, each value that an
//! error may point at kept with its span.
//!
//! Its own module so that the file format is visible in one place, apart from the rules that check
//! it (`validate`) and the types the gateway runs on (`model`). Unknown keys are refused here
//! (`deny_unknown_fields`): a misspelt key must not be silently ignored.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawManifest {
    pub(crate) gateway: Spanned<RawGateway>,
    pub(crate) admin: Option<RawAdmin>,
    pub(crate) cluster: Option<Spanned<RawCluster>>,
    #[serde(default)]
    pub(crate) apis: Vec<RawApi>,
    #[serde(default)]
    pub(crate) products: Vec<RawProduct>,
    #[serde(default)]
    pub(crate) policies: Vec<Spanned<RawAttachment>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    pub(crate) name: Spanned<String>,
    pub(crate) listen: Option<Spanned<String>>,
    pub(crate) plugin_dir: Option<Spanned<String>>,
    /// Where compiled plugins are kept between runs.
    pub(crate) plugin_cache_dir: Option<Spanned<String>>,
    /// Signatures remembered as valid by the host's `signatures.verify` (0: none).
    pub(crate) signature_cache_entries: Option<usize>,
    /// TOML file with subscriptions' plain-text keys, by subscription name.
    pub(crate) subscription_keys_file: Option<Spanned<String>>,
    /// Write query values into log records (default: redacted).
    pub(crate) log_query_values: Option<bool>,
    /// Peers (CIDRs or addresses) whose X-Forwarded-For / Forwarded / X-Real-IP are extended
    /// rather than replaced.
    pub(crate) trusted_proxies: Option<Spanned<Vec<String>>>,
    /// Where the serving process writes its pid (`tollgate upgrade` reads it).
    pub(crate) pid_file: Option<Spanned<String>>,
    pub(crate) tls: Option<RawListenerTls>,
    #[serde(default)]
    pub(crate) limits: RawLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub(crate) listen: Spanned<String>,
    pub(crate) cert: Spanned<String>,
    pub(crate) key: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub(crate) max_connections: Option<Spanned<usize>>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) backend_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) drain_timeout: Option<Duration>,
    pub(crate) max_frame_size: Option<u64>,
    pub(crate) max_message_size: Option<u64>,
    pub(crate) max_header_bytes: Option<Spanned<usize>>,
    pub(crate) max_pending_handshakes: Option<Spanned<usize>>,
    /// A duration (`"10s"`), kept as text with its place so an error can point at it.
    pub(crate) upgrade_close_window: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApiLimits {
    pub(crate) max_connections: Option<Spanned<usize>>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) idle_timeout: Option<Duration>,
    /// Longest a connection may live, however busy (close 1001 to both sides); `0s` = off.
    #[serde(default, with = "humantime_serde")]
    pub(crate) max_connection_lifetime: Option<Duration>,
    pub(crate) max_frame_size: Option<u64>,
    pub(crate) max_message_size: Option<u64>,
    /// Largest message a message policy is given (default 1 MiB); a larger one closes 1009.
    pub(crate) max_inspected_message_size: Option<Spanned<u64>>,
}

/// `[cluster]`: limits shared by every gateway on one store.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    /// `redis://host:port[/db]`.
    pub(crate) store: Option<Spanned<String>>,
    /// Environment variable holding the store URL (when it carries a password).
    pub(crate) store_env: Option<Spanned<String>>,
    pub(crate) gateway_id: Option<Spanned<String>>,
    pub(crate) namespace: Option<Spanned<String>>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) lease_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) store_timeout: Option<Duration>,
    pub(crate) on_store_failure: Option<Spanned<String>>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) message_sync_interval: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Spanned<String>,
    /// Host names the admin listener answers besides its loopback names and own addresses.
    #[serde(default)]
    pub(crate) allowed_hosts: Vec<Spanned<String>>,
    /// Environment variable holding the admin token.
    pub(crate) token_env: Option<Spanned<String>>,
    /// The admin token's SHA-256, hex.
    pub(crate) token_sha256: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawApi {
    pub(crate) name: Spanned<String>,
    pub(crate) display_name: Option<String>,
    pub(crate) url_suffix: Spanned<String>,
    pub(crate) backend: Spanned<String>,
    /// Other backends a policy may pick by name (`backends = { eu = "wss://..." }`).
    #[serde(default)]
    pub(crate) backends: std::collections::BTreeMap<String, Spanned<String>>,
    pub(crate) schemes: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(crate) products: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) gateways: Vec<String>,
    pub(crate) ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) insecure_skip_verify: bool,
    #[serde(default)]
    pub(crate) limits: RawApiLimits,
    /// Header carrying the subscription key (default `Ocp-Apim-Subscription-Key`).
    pub(crate) subscription_key_header: Option<Spanned<String>>,
    /// Query parameter carrying the subscription key (default `subscription-key`).
    pub(crate) subscription_key_query: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) on_handshake: Vec<Spanned<RawAttachment>>,
    /// Message policies (`[[apis.on_message]]`), in the order they run.
    #[serde(default)]
    pub(crate) on_message: Vec<Spanned<RawAttachment>>,
    /// Message rates per direction (`[[apis.message_limits]]`).
    #[serde(default)]
    pub(crate) message_limits: Vec<Spanned<RawMessageLimits>>,
}

/// `[[apis.message_limits]]`: how many messages and payload bytes per second one connection may
/// send in a direction, and what happens to a message over that.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMessageLimits {
    /// `client` (default), `backend` or `both`: whose messages are limited.
    pub(crate) direction: Option<Spanned<String>>,
    /// `connection` (default): each connection on its own; `subscription`: a subscription's
    /// connections to the API together.
    pub(crate) per: Option<Spanned<String>>,
    pub(crate) max_messages_per_second: Option<Spanned<u64>>,
    /// Messages that may come at once (default: `max_messages_per_second`).
    pub(crate) burst_messages: Option<Spanned<u64>>,
    pub(crate) max_bytes_per_second: Option<Spanned<u64>>,
    /// Bytes that may come at once (default: `max_bytes_per_second`).
    pub(crate) burst_bytes: Option<Spanned<u64>>,
    /// `close` (default) or `drop`.
    pub(crate) action: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProduct {
    pub(crate) name: Spanned<String>,
    pub(crate) display_name: Option<String>,
    pub(crate) subscription_required: Option<Spanned<bool>>,
    /// Not accepted: APIs list their products (one source of truth). Parsed only to say so.
    pub(crate) apis: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) policies: Vec<Spanned<RawAttachment>>,
    #[serde(default)]
    pub(crate) subscriptions: Vec<Spanned<RawSubscription>>,
    /// Message rates on every connection through the product (`[[products.message_limits]]`).
    #[serde(default)]
    pub(crate) message_limits: Vec<Spanned<RawMessageLimits>>,
}

/// A subscription as written. Each key comes from exactly one place: an environment variable
/// (`*_key_env`), its SHA-256 (`*_key_sha256`, hex), or the gateway's `subscription_keys_file`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSubscription {
    pub(crate) name: Spanned<String>,
    pub(crate) max_connections: Option<Spanned<usize>>,
    pub(crate) primary_key_env: Option<Spanned<String>>,
    pub(crate) secondary_key_env: Option<Spanned<String>>,
    pub(crate) primary_key_sha256: Option<Spanned<String>>,
    pub(crate) secondary_key_sha256: Option<Spanned<String>>,
}

/// One subscription's entry in the keys file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKeyPair {
    pub(crate) primary: Option<Spanned<String>>,
    pub(crate) secondary: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAttachment {
    pub(crate) plugin: Spanned<String>,
    #[serde(default)]
    pub(crate) config: Option<Spanned<toml::Table>>,
    /// CPU time per call, e.g. "50ms" (humantime).
    pub(crate) cpu_time: Option<Spanned<String>>,
    /// The CPU budget before it was counted in time: refused with a pointer to `cpu_time`.
    pub(crate) fuel: Option<Spanned<toml::Value>>,
    /// Memory cap per call.
    pub(crate) memory_limit_bytes: Option<usize>,
    /// Wall-clock deadline per call, e.g. "500ms" (humantime).
    pub(crate) timeout: Option<Spanned<String>>,
    /// Status the client gets when the plugin fails (trap, budget, bad result).
    pub(crate) failure_status: Option<Spanned<u16>>,
    #[serde(default)]
    pub(crate) grants: RawGrants,
    /// `fresh` (default) or `pooled`: see [`crate::Instances`].
    pub(crate) instances: Option<Spanned<String>>,
    /// With `pooled`: handshakes one warm instance serves before it is discarded.
    pub(crate) pool_max_uses: Option<Spanned<u64>>,
    /// `[[apis.on_message]]` only: whose messages the policy sees, `client`, `backend` or
    /// `both` (the default).
    pub(crate) direction: Option<Spanned<String>>,
}

/// What an attachment opens up in the sandbox; everything is denied unless listed here.
#[derive(Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGrants {
    /// Directories (relative to the manifest) the plugin may read, under the same relative name.
    #[serde(default)]
    pub(crate) read_dirs: Vec<Spanned<String>>,
    /// Environment variables of the gateway's process the plugin may read.
    #[serde(default)]
    pub(crate) env: Vec<String>,
    /// The real wall and monotonic clocks (otherwise both read as zero).
    #[serde(default)]
    pub(crate) clock: bool,
}
