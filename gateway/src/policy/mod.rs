//! The policy host: loads handshake policies (WebAssembly components of the
//! `handshake-policy` world in `wit/policy.wit`) and runs them.
//!
//! Shaped like wasmtime's `serve`: one [`Engine`] and [`Linker`] for the process, an
//! [`InstancePre`](wasmtime::component::InstancePre) per plugin built once at load, and a fresh
//! [`Store`] and instance per call, so one client's handshake never sees state another left
//! behind. Each call runs with a CPU-time budget and a memory cap; a trap, running out of
//! CPU time or memory, or a bad result fails that handshake only.
//!
//! CPU time is counted with wasmtime's epoch interruption, not fuel: a timer thread advances
//! the engine's epoch every [`EPOCH_TICK`], and each tick boundary a running call crosses uses
//! one tick of its `cpu_time`. Fuel counted instructions exactly but cost every guest loop and
//! call a counter update (measured: 18 % of the Rust jwt-validate + set-header chain); an epoch
//! check is one load and compare, and a gateway's natural budget is time anyway.
//!
//! Before any plugin code runs, its imports are checked: our own interfaces and the standard
//! WASI interfaces language runtimes import anyway (cli, io, clocks, random, filesystem,
//! sockets) are accepted, anything else is refused with the import named. WASI is linked with
//! an empty context: no preopened directories, no environment, no network, clocks that read
//! zero; an attachment's `grants` open up directories (read-only), named environment variables
//! and the real clocks, nothing else.
//!
//! Beyond CPU time and memory, a call is bounded in three more ways: sockets and name lookups
//! are refused outright (a refused socket never opens a descriptor on the host, so a pooled
//! plugin cannot hoard the gateway's descriptors); every call has a wall-clock deadline
//! (waiting on a host pollable, e.g. a sleep, uses no CPU time); and the host calls are
//! bounded (their work counts against the call's CPU time like the guest's own, their inputs
//! are capped, `log` truncates and rate-limits, reads of the request share a per-call byte
//! budget with a flat fee per read). A host call that needs a capability the plugin did not
//! declare is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub mod capabilities;
pub mod chain;
mod imports;
pub mod key_sets;
pub mod message;
pub mod plugin_cache;
mod request;
pub mod verify_cache;

use imports::{add_host_interfaces, truncated, HostState, StoppedClock};

pub use capabilities::{Capability, Scope};
pub use message::MessageCapability;
pub use request::{Request, TlsInfo};

use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::StoreContextMut;
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::metrics::{PluginSignatureMetrics, SignatureMetrics, VerifyResult};
pub use chain::{AttachmentSpec, Instances};
use key_sets::{KeySet, KeySets};
use verify_cache::{CacheCounters, VerifyCache};

/// The generated bindings of `wit/policy.wit`. Private: the rest of the gateway sees the
/// host's own types ([`Request`], [`Capability`], [`chain::Outcome`]), so a WIT change stops
/// here.
mod bindings {
    // Exports are called asynchronously: a guest runs on a fiber inside the connection's task,
    // so no worker thread is handed off per handshake, and WASI's own async implementations
    // (streams, files) never block a worker. Our imports are quick and stay synchronous; they
    // may trap (a read the plugin did not declare).
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handshake-policy",
        exports: { default: async },
        imports: { default: trappable },
        with: {
            "tollgate:policy/handshake-types.request": super::request::RequestHandle,
        },
    });
}

use bindings::tollgate::policy::handshake_types as wit;
use bindings::tollgate::policy::types as wit_types;
use bindings::{HandshakePolicy, HandshakePolicyPre};

/// The WIT package version this host implements; components built against another are
/// refused at load with that version named.
pub const WIT_VERSION: &str = "0.2.0";

/// Defaults for one policy call. Generous for a header check or a JWT verification, small
/// enough that a runaway plugin costs milliseconds, not the gateway.
/// CPU time of one call when the attachment sets no `cpu_time`: some 2,000 times what the
/// Rust jwt-validate takes, 400 times a JavaScript policy's warm call.
pub const DEFAULT_CPU_TIME: Duration = Duration::from_millis(50);
/// How often the engine's epoch advances: the unit CPU time is counted in. Ten milliseconds
/// keeps the timer thread's own cost negligible (100 wake-ups a second) while a runaway call
/// still ends within one tick of its budget.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
pub const DEFAULT_MEMORY_BYTES: usize = 64 * 1024 * 1024;
/// Wall-clock deadline of one `on-handshake` call when the attachment sets no `timeout`: far
/// above what a header check or a JWT verification takes, far below the handshake timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Wall-clock deadline of a load-time call (`declare`, `configure`): long enough for a plugin
/// to read its granted files, short enough that a stuck plugin cannot hang a start or reload.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `message` `signatures.verify` accepts (a JWT's signing input is far smaller).
pub const MAX_VERIFY_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest key (all its parts together) and signature `signatures.verify` accepts: an RSA-8192
/// key or signature is about 1 KiB, a DER SPKI slightly more.
pub const MAX_VERIFY_KEY_BYTES: usize = 16 * 1024;
pub const MAX_VERIFY_SIGNATURE_BYTES: usize = 2 * 1024;
/// Most bytes one `wasi:random` call may ask for.
pub const MAX_RANDOM_BYTES: u64 = 64 * 1024;
/// A `log` message is cut to this many bytes (on a character boundary).
pub const MAX_LOG_MESSAGE_BYTES: usize = 1024;
/// Records one call may log; further ones are dropped, with one note saying so.
pub const MAX_LOGS_PER_CALL: u32 = 16;

/// How a call that used all of its `cpu_time` ends (the error the epoch callback returns).
#[derive(Debug, thiserror::Error)]
#[error("ran out of CPU time")]
struct CpuTimeExceeded;

/// Gives the store's next call all of `cpu_time`, counted from the next tick.
fn arm_cpu_time(store: &mut Store<HostState>, cpu_time: Duration) {
    let state = store.data_mut();
    state.cpu_ticks_budget = cpu_ticks(cpu_time);
    state.cpu_ticks_used = 0;
    store.set_epoch_deadline(1);
}

/// `cpu_time` in whole [`EPOCH_TICK`]s, rounded up (at least one).
fn cpu_ticks(cpu_time: Duration) -> u32 {
    let tick = EPOCH_TICK.as_nanos();
    let ticks = cpu_time.as_nanos().div_ceil(tick).max(1);
    u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// Advances `engine`'s epoch every [`EPOCH_TICK`] on a thread of its own, for as long as the
/// engine lives (the thread holds only a weak reference, and ends with the engine).
fn start_epoch_timer(engine: &Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("tollgate-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .map(drop)
}

/// Runs a load-time guest call (declare, configure, inspect) to completion on the calling
/// thread. Load happens before the gateway's runtime starts (and in `tollgate check`), so
/// there is no runtime to borrow; WASI's file access needs one, hence a tokio runtime rather
/// than a bare executor.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    wasmtime_wasi::runtime::in_tokio(f)
}

/// [`block_on`] within [`LOAD_TIMEOUT`]. The timer is made inside the runtime `block_on`
/// provides (a tokio timer cannot be made outside one).
fn block_on_within_load_timeout<F: std::future::Future>(
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    block_on(async { tokio::time::timeout(LOAD_TIMEOUT, f).await })
}

/// Interfaces of ours a handshake policy may import (at [`WIT_VERSION`]).
const OUR_IMPORTS: &[&str] = &[
    "tollgate:policy/types@0.2.0",
    "tollgate:policy/handshake-types@0.2.0",
    "tollgate:policy/config@0.2.0",
    "tollgate:policy/log@0.2.0",
    "tollgate:policy/signatures@0.2.0",
    "tollgate:policy/key-sets@0.2.0",
    "tollgate:policy/counters@0.2.0",
];
/// Interfaces of ours a message policy may import.
const OUR_MESSAGE_IMPORTS: &[&str] = &[
    "tollgate:policy/types@0.2.0",
    "tollgate:policy/message-types@0.2.0",
    "tollgate:policy/config@0.2.0",
    "tollgate:policy/log@0.2.0",
];
/// Most bytes one `on-handshake` call may read from the request (all its reads together):
/// far above any real policy (a request head is at most `max_header_bytes`), low enough that
/// a guest looping over `headers()` is stopped long before it costs the gateway real time.
pub const MAX_READ_BYTES_PER_CALL: usize = 4 * 1024 * 1024;
/// What each request read (and `config.prepared`) costs of that budget besides the bytes it
/// returns: at most 16,384 reads per call, so a loop of tiny reads (an absent header, `api()`)
/// is bounded too.
pub const READ_FLAT_BYTES: usize = 256;
/// Largest prepared config (`configure`'s result) an attachment may have: refused at load, so
/// a config that passes `tollgate check` never fails handshakes for its size.
pub const MAX_PREPARED_BYTES: usize = 16 * 1024 * 1024;
/// WASI packages linked deny-by-default.
const WASI_IMPORTS: &[&str] = &[
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    "wasi:sockets/",
];

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy host itself could not be set up (no plugin involved).
    #[error("policy host: {what}: {message}")]
    Engine { what: &'static str, message: String },
    #[error("{path}: not a loadable WebAssembly component: {message}")]
    NotAComponent { path: String, message: String },
    #[error("{path}: imports `{import}`, which the {scope} scope does not offer")]
    ForbiddenImport {
        path: String,
        import: String,
        scope: &'static str,
    },
    #[error("{path}: does not implement the tollgate:policy handshake-policy or message-policy world: {message}")]
    WrongWorld { path: String, message: String },
    #[error("{path}: built against tollgate:policy@{version}; this gateway runs policies built against tollgate:policy@{WIT_VERSION} (rebuild it with tollgate-sdk 0.2, or against wit/policy.wit of this release)")]
    OtherWitVersion { path: String, version: String },
    #[error("{path}: declares the plugin name `{name}`, already declared by {other}; names in plugin_dir are unique (attachments refer to plugins by them)")]
    DuplicateName {
        path: String,
        name: String,
        other: String,
    },
    #[error("{path}: cannot read plugin_dir: {message}")]
    UnreadableDir { path: String, message: String },
    #[error("plugin `{plugin}`: {message}")]
    Call { plugin: String, message: String },
    #[error("plugin `{plugin}` refused its config: {message}")]
    Config { plugin: String, message: String },
    #[error("plugin `{plugin}`: timed out after {after:?} (the wall-clock deadline of one call)")]
    Timeout { plugin: String, after: Duration },
    #[error("plugin `{plugin}` {action} without declaring the capability `{capability}`")]
    Undeclared {
        plugin: String,
        capability: Capability,
        action: &'static str,
    },
    #[error("plugin `{plugin}` {action} without declaring the capability `{capability}`")]
    UndeclaredMessage {
        plugin: String,
        capability: MessageCapability,
        action: &'static str,
    },
}

/// A loaded plugin: what it declared and its pre-linked component.
pub struct Plugin {
    pub name: String,
    pub version: String,
    /// What it declared: what the host lets it do (see [`Plugin::declares`]).
    pub capabilities: Arc<[Capability]>,
    pub path: PathBuf,
    pub imports: Vec<String>,
    /// Loaded from the compiled-plugin cache rather than compiled.
    pub from_cache: bool,
    /// Compiling (or loading the compiled artifact) took this long.
    pub compile_time: std::time::Duration,
    /// Median time to create a fresh instance, when measured (`tollgate plugin inspect`).
    pub instantiate_time: Option<std::time::Duration>,
    /// For a message policy, what it declared (empty for a handshake policy).
    pub message_capabilities: Arc<[MessageCapability]>,
    pre: Pre,
    /// Its signature-check counters, when the host has metrics.
    signature_metrics: Option<Arc<PluginSignatureMetrics>>,
}

/// The plugins in `dir`: its `*.wasm` files, sorted by name. What the host loads and what the
/// reload watcher watches, so the two never disagree about which files count.
pub fn plugin_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    files.sort();
    Ok(files)
}

/// Instantiations `PolicyHost::measure_instantiation` times.
pub const INSTANTIATE_SAMPLES: usize = 21;

/// Warm instances of one attachment whose strategy is `instances = "pooled"`. An instance is
/// taken for one handshake and put back afterwards, so it never serves two at once; it is
/// dropped after `max_uses` handshakes or when its call fails (trap, exhausted CPU time or
/// memory: a trapped instance is never reused). At most `max_idle` are kept; the rest are dropped when
/// returned.
pub struct InstancePool {
    idle: std::sync::Mutex<Vec<Warm>>,
    max_uses: u64,
    /// Idle instances kept at most. Lowered by [`InstancePool::retire`] when the state this
    /// pool belongs to was replaced by a reload: connections admitted under the old state keep
    /// it (and so this pool) alive for as long as they last, and without that every reload left
    /// up to 2 warm instances per CPU and pooled attachment pinned in the engine's instance
    /// slots until those connections closed. Read and lowered under the `idle` lock.
    max_idle: std::sync::atomic::AtomicUsize,
    /// `tollgate_policy_instances_idle` of this attachment.
    gauge: prometheus_client::metrics::gauge::Gauge,
}

struct Warm {
    store: Store<HostState>,
    instance: Instance,
    uses: u64,
}

/// Which world a plugin implements, with its pre-linked component.
enum Pre {
    Handshake(HandshakePolicyPre<HostState>),
    Message(message::MessagePolicyPre<HostState>),
}

/// An instance of either world.
enum Instance {
    Handshake(HandshakePolicy),
    Message(message::MessagePolicy),
}

/// What a plugin is: which scope's world its component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// `handshake-policy`: attached to onHandshake (`[[policies]]`, `[[products.policies]]`,
    /// `[[apis.on_handshake]]`).
    Handshake,
    /// `message-policy`: attached to an API's messages (`[[apis.on_message]]`).
    Message,
}

impl PluginKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Handshake => "handshake policy",
            PluginKind::Message => "message policy",
        }
    }
}

/// The host's own capability for the generated one.
fn capability(c: wit::Capability) -> Capability {
    use wit::Capability as W;
    use Capability as C;
    match c {
        W::ReadRequest => C::ReadRequest,
        W::ModifyHeaders => C::ModifyHeaders,
        W::ModifyQuery => C::ModifyQuery,
        W::ModifyResponseHeaders => C::ModifyResponseHeaders,
        W::UseContext => C::UseContext,
        W::Reject => C::Reject,
        W::VerifySignatures => C::VerifySignatures,
        W::LimitLifetime => C::LimitLifetime,
        W::SelectBackend => C::SelectBackend,
        W::FetchKeys => C::FetchKeys,
        W::UseCounters => C::UseCounters,
        W::MockResponse => C::MockResponse,
        W::CacheLookup => C::CacheLookup,
        W::CacheStore => C::CacheStore,
        W::CrossDomain => C::CrossDomain,
        W::Cors => C::Cors,
        W::Jsonp => C::Jsonp,
        W::SetMethod => C::SetMethod,
        W::SetBody => C::SetBody,
        W::XmlToJson => C::XmlToJson,
        W::JsonToXml => C::JsonToXml,
        W::Xslt => C::Xslt,
        W::ValidateContent => C::ValidateContent,
        W::ValidateParameters => C::ValidateParameters,
        W::ValidateHeaders => C::ValidateHeaders,
        W::ValidateStatusCode => C::ValidateStatusCode,
    }
}

impl InstancePool {
    /// `max_idle`: one per thread that may call at once is enough; more only holds memory.
    pub fn new(max_uses: u64, gauge: prometheus_client::metrics::gauge::Gauge) -> InstancePool {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        InstancePool {
            idle: std::sync::Mutex::new(Vec::new()),
            max_uses,
            max_idle: std::sync::atomic::AtomicUsize::new(threads * 2),
            gauge,
        }
    }

    fn take(&self) -> Option<Warm> {
        let w = self.idle.lock().ok()?.pop();
        if w.is_some() {
            self.gauge.dec();
        }
        w
    }

    fn give_back(&self, w: Warm) {
        if w.uses >= self.max_uses {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle.load(std::sync::atomic::Ordering::Relaxed) {
                idle.push(w);
                self.gauge.inc();
            }
        }
    }

    /// The state this pool served was replaced: keeps at most `keep` idle instances from now
    /// on (0 for a handshake chain, which serves no new handshake; 1 for a message policy,
    /// which the connections admitted before still call).
    pub fn retire(&self, keep: usize) {
        if let Ok(mut idle) = self.idle.lock() {
            self.max_idle
                .store(keep, std::sync::atomic::Ordering::Relaxed);
            let n = idle.len().saturating_sub(keep);
            idle.truncate(keep);
            self.gauge.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// What an attachment opens of the sandbox. The default grants nothing: no files, no
/// environment, clocks that read zero; there is no network grant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// (directory on the host, name the plugin opens it by), read-only.
    pub read_dirs: Vec<(PathBuf, String)>,
    /// Environment variables passed through by name.
    pub env: Vec<String>,
    /// The real wall and monotonic clocks.
    pub clock: bool,
}

/// Limits for one call.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Time one call may spend running (guest code and the host calls it makes), counted in
    /// [`EPOCH_TICK`]s and rounded up to whole ones.
    pub cpu_time: Duration,
    pub memory_bytes: usize,
    /// Wall-clock deadline of one `on-handshake` call. CPU time only counts while the call
    /// runs: a guest waiting on a host pollable (a sleep) uses none, so without a deadline it
    /// could hold the handshake until the handshake timeout.
    pub timeout: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            cpu_time: DEFAULT_CPU_TIME,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

pub struct PolicyHost {
    engine: Engine,
    linker: Linker<HostState>,
    /// Compiled components by content hash; `None` when no directory could be used.
    cache_dir: Option<PathBuf>,
    verified: Arc<VerifyCache>,
    /// The metrics the signature cache counts its hits and misses in.
    cache_counters: CacheCounters,
    signature_metrics: Option<SignatureMetrics>,
    /// Key sets policies registered (`key-sets`); handed on to a host that replaces this one,
    /// so a reload keeps the keys it holds.
    key_sets: Arc<KeySets>,
    /// The process's counters (`counters`).
    counters: Arc<crate::counters::Counters>,
    /// Message policy calls in flight, at most [`MAX_MESSAGE_CALLS`].
    message_calls: Arc<tokio::sync::Semaphore>,
}

/// Most message policy calls in flight at once, across the gateway: half of the pooling
/// allocator's 1,000 component instance slots, so that however many connections have
/// messages being judged (each call holds an instance for up to its `timeout`), handshake
/// policies keep room. A rough share, not a reservation: idle pooled instances hold slots too,
/// and the allocator's limits on core instances and memories (1,000 each) fill faster for a
/// component made of several core modules (an interpreter). A call over it waits for one to
/// finish (its direction waits; nothing fails).
pub const MAX_MESSAGE_CALLS: usize = 500;

/// The compiled-plugin cache when the manifest names none: `$XDG_CACHE_HOME/tollgate/compiled`,
/// else `$HOME/.cache/tollgate/compiled`, else none (never the temporary directory: see
/// [`plugin_cache`]).
pub fn default_cache_dir() -> Option<PathBuf> {
    plugin_cache::default_dir()
}

/// The cache directory to use, if any: `dir` (or the default), created 0700 when missing and
/// used only if nobody but the gateway's user can write to it. Every refusal is logged.
fn trusted_cache_dir(dir: Option<PathBuf>) -> Option<PathBuf> {
    use plugin_cache::{prepare_dir, Untrusted};
    use std::os::unix::fs::PermissionsExt;
    let Some(dir) = dir.or_else(default_cache_dir) else {
        tracing::info!(
            event = "plugin_cache_disabled",
            "no compiled-plugin cache: neither XDG_CACHE_HOME nor HOME is set, and the temporary directory is never used (others can write there); plugins are compiled at every start (set gateway.plugin_cache_dir to keep them)"
        );
        return None;
    };
    match prepare_dir(&dir) {
        Ok(()) => Some(dir),
        Err(Untrusted::Io { error, .. }) => {
            tracing::warn!(event = "plugin_cache_unavailable", dir = %dir.display(), error = %error,
                "compiled-plugin cache unavailable; plugins are compiled at every start");
            None
        }
        Err(e) => {
            let mode = std::fs::metadata(&dir)
                .map(|m| format!("{:04o}", m.permissions().mode() & 0o7777))
                .unwrap_or_default();
            tracing::warn!(event = "plugin_cache_untrusted", dir = %dir.display(), mode = %mode, error = %e,
                "compiled-plugin cache not used: its directory must belong to the gateway's user and not be writable by group or others (cached plugins are native code); plugins are compiled in memory");
            None
        }
    }
}

impl PolicyHost {
    /// Replaces the verified-signature cache with one of `entries` (0 disables it).
    pub fn set_signature_cache(&mut self, entries: usize) {
        self.verified = Arc::new(VerifyCache::new(entries, self.cache_counters.clone()));
    }

    /// Counts the signature checks of plugins loaded from now on, and the signature cache's
    /// hits and misses, in `metrics`.
    pub fn set_metrics(&mut self, metrics: &crate::metrics::Metrics) {
        self.signature_metrics = Some(metrics.signatures());
        self.cache_counters = metrics.signature_cache();
        self.set_signature_cache(self.verified.capacity());
        self.key_sets = Arc::new(KeySets::new(Some(metrics.key_sets())));
    }

    /// The key sets policies registered with this host.
    pub fn key_sets(&self) -> Arc<KeySets> {
        self.key_sets.clone()
    }

    /// Counts `counters.increment` calls in `counters` (the process's, shared by every state).
    pub fn set_counters(&mut self, counters: Arc<crate::counters::Counters>) {
        self.counters = counters;
    }

    /// Takes over the key sets of the host this one replaces.
    pub fn adopt_key_sets(&mut self, key_sets: Arc<KeySets>) {
        self.key_sets = key_sets;
    }

    /// `cache_dir`: where compiled plugins are kept between runs (`None`: the default, see
    /// [`default_cache_dir`]); created 0700 if missing. If it cannot be used or others could
    /// write to it, plugins are compiled in memory at every start and a log record says why.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<PolicyHost, PolicyError> {
        let engine_error = |what: &'static str| {
            move |e: wasmtime::Error| PolicyError::Engine {
                what,
                message: format!("{e:#}"),
            }
        };
        let mut config = Config::new();
        config.epoch_interruption(true);
        // A fresh instance per handshake is only affordable with pre-reserved instance slots:
        // the pooling allocator makes instantiation a few microseconds. Defaults: up to 1000
        // instances alive at once (policy calls in flight), memories capped per call by
        // StoreLimits. Memory is reserved (virtual), not committed, until used.
        let (pooling, reset) = pooling_config();
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        tracing::info!(
            event = "policy_memory_reset",
            method = reset.as_str(),
            "{}",
            reset.explain()
        );
        let engine = Engine::new(&config).map_err(engine_error("creating the wasm engine"))?;
        start_epoch_timer(&engine).map_err(|e| PolicyError::Engine {
            what: "starting the epoch timer thread",
            message: e.to_string(),
        })?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(engine_error("linking WASI"))?;
        add_host_interfaces(&mut linker).map_err(engine_error("linking the policy interfaces"))?;
        let cache_dir = trusted_cache_dir(cache_dir);
        Ok(PolicyHost {
            engine,
            linker,
            cache_dir,
            verified: Arc::new(VerifyCache::new(
                verify_cache::DEFAULT_ENTRIES,
                CacheCounters::default(),
            )),
            cache_counters: CacheCounters::default(),
            signature_metrics: None,
            key_sets: Arc::new(KeySets::new(None)),
            counters: Default::default(),
            message_calls: Arc::new(tokio::sync::Semaphore::new(MAX_MESSAGE_CALLS)),
        })
    }

    /// Compiles `bytes`, or loads the artifact a previous run compiled from the same bytes
    /// with a compatible engine. Returns whether it came from the cache.
    fn compile(&self, path: &Path, bytes: &[u8]) -> Result<(Component, bool), PolicyError> {
        let not_component = |e: wasmtime::Error| PolicyError::NotAComponent {
            path: path.display().to_string(),
            message: format!("{e:#}"),
        };
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes)
                .map(|c| (c, false))
                .map_err(not_component);
        };
        // Key: the file's content and everything about the engine that makes an artifact
        // loadable (wasmtime version, target, compiler settings).
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(bytes);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&self.engine.precompile_compatibility_hash(), &mut h);
        ctx.update(&std::hash::Hasher::finish(&h).to_le_bytes());
        let key: String = ctx
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let name = format!("{key}.cwasm");
        let file = dir.join(&name);
        match plugin_cache::read_trusted(&file) {
            Ok(None) => {}
            Ok(Some(art)) => {
                // SAFETY: deserialising runs no checks on the machine code inside, so the bytes
                // must be ones this user wrote: the directory and the file (checked on the
                // descriptor they were read from) belong to the gateway's user and nobody else
                // can write to them, and the name is the hash of the source and the engine. An
                // artifact that fails to load (truncated, other version) is recompiled and
                // replaced.
                match unsafe { Component::deserialize(&self.engine, &art) } {
                    Ok(c) => return Ok((c, true)),
                    Err(e) => {
                        tracing::warn!(event = "plugin_cache_stale", file = %file.display(), error = %format!("{e:#}"),
                            "cached compiled plugin unusable; recompiling");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(event = "plugin_cache_file_untrusted", file = %file.display(), error = %e,
                    "cached compiled plugin not trusted (must be a regular file of the gateway's user, not writable by group or others); recompiling and replacing it");
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(not_component)?;
        match component.serialize() {
            Ok(art) => {
                if let Err(e) = plugin_cache::write(dir, &name, &art) {
                    tracing::warn!(event = "plugin_cache_write_failed", file = %file.display(), error = %e,
                        "could not store compiled plugin");
                }
            }
            Err(e) => {
                tracing::warn!(event = "plugin_cache_write_failed", error = %format!("{e:#}"),
                    "could not serialise compiled plugin");
            }
        }
        Ok((component, false))
    }

    /// A store for calls of `plugin`; `may_verify`: it declared `verify-signatures`.
    fn store(
        &self,
        plugin: &str,
        budget: Budget,
        grants: &Grants,
        declared: Arc<[Capability]>,
        prepared: Option<Arc<str>>,
        key_sets: Arc<[Arc<KeySet>]>,
    ) -> Result<Store<HostState>, String> {
        let mut wasi = WasiCtx::builder();
        // No network, and no socket at all: with TCP/UDP merely "allowed but every address
        // denied", creating a socket still opens a descriptor on the host, which a pooled
        // instance could keep until the gateway runs out. Name lookups are refused too.
        // wasmtime-wasi 48 refuses all three by default; said explicitly so that neither a
        // changed default nor a later edit here turns them on unnoticed.
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        if !grants.clock {
            wasi.wall_clock(StoppedClock).monotonic_clock(StoppedClock);
        }
        // Random bytes are made on the host in one call, which an epoch check cannot
        // interrupt: capped (wasmtime-wasi's default is 64 MiB), as language runtimes ask for
        // a few bytes to seed their hashes.
        wasi.max_random_size(MAX_RANDOM_BYTES);
        for name in &grants.env {
            if let Ok(v) = std::env::var(name) {
                wasi.env(name, v);
            }
        }
        for (host, guest) in &grants.read_dirs {
            wasi.preopened_dir(host, guest, wasmtime_wasi::FsPerms::ReadOnly)
                .map_err(|e| format!("granted directory {}: {e:#}", host.display()))?;
        }
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(budget.memory_bytes)
                .build(),
            plugin: Arc::from(plugin),
            verified: self.verified.clone(),
            signature_metrics: None,
            declared,
            prepared,
            request: None,
            read_bytes: 0,
            logs: 0,
            refused: None,
            key_set_registry: self.key_sets.clone(),
            registering: None,
            deadline: None,
            cpu_ticks_budget: 0,
            cpu_ticks_used: 0,
            key_sets,
            counters: self.counters.clone(),
            counter_calls: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        arm_cpu_time(&mut store, budget.cpu_time);
        // Each tick boundary a running call crosses costs one tick of its budget, and gives the
        // worker back (a yield), so other connections on the same worker keep moving; with
        // none left the call ends with `CpuTimeExceeded`.
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            state.cpu_ticks_used = state.cpu_ticks_used.saturating_add(1);
            if state.cpu_ticks_used > state.cpu_ticks_budget {
                return Err(CpuTimeExceeded.into());
            }
            // The first tick a call runs across does not yield: an ordinary call that merely
            // straddles a tick boundary finishes without giving its worker away (a pooled call
            // that yields lets other handshakes take more instances meanwhile; BENCHMARKS.md
            // measured that churn when fuel yields came too often).
            Ok(if state.cpu_ticks_used == 1 {
                wasmtime::UpdateDeadline::Continue(1)
            } else {
                wasmtime::UpdateDeadline::Yield(1)
            })
        });
        Ok(store)
    }

    /// Loads one `.wasm` file: checks it is a component, checks its imports, links it, and asks
    /// it for its declaration.
    pub fn load(&self, path: &Path) -> Result<Plugin, PolicyError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| PolicyError::NotAComponent {
            path: p.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let started = std::time::Instant::now();
        let (component, cached) = self.compile(path, &bytes)?;
        let compile_time = started.elapsed();
        let ty = component.component_type();
        // A component of another tollgate:policy version would fail the import check below
        // with a confusing message; name the version instead.
        let ours = ty
            .imports(&self.engine)
            .chain(ty.exports(&self.engine))
            .filter_map(|(name, _)| name.strip_prefix("tollgate:policy/"))
            .filter_map(|rest| rest.split_once('@').map(|(_, v)| v.to_owned()))
            .find(|v| v != WIT_VERSION);
        if let Some(version) = ours {
            return Err(PolicyError::OtherWitVersion { path: p, version });
        }
        let exports_message = ty
            .exports(&self.engine)
            .any(|(name, _)| name == message::EXPORT);
        let (ours, scope) = if exports_message {
            (OUR_MESSAGE_IMPORTS, "message")
        } else {
            (OUR_IMPORTS, "handshake")
        };
        let mut imports = Vec::new();
        for (name, _) in ty.imports(&self.engine) {
            let ok = ours.contains(&name) || WASI_IMPORTS.iter().any(|w| name.starts_with(w));
            if !ok {
                return Err(PolicyError::ForbiddenImport {
                    path: p,
                    import: name.to_owned(),
                    scope,
                });
            }
            imports.push(name.to_owned());
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(|pre| {
                if exports_message {
                    message::MessagePolicyPre::new(pre).map(Pre::Message)
                } else {
                    HandshakePolicyPre::new(pre).map(Pre::Handshake)
                }
            })
            .map_err(|e| PolicyError::WrongWorld {
                path: p.clone(),
                message: format!("{e:#}"),
            })?;
        let mut store = self
            .store(
                "(loading)",
                Budget::default(),
                &Grants::default(),
                Arc::from([]),
                None,
                Arc::from([]),
            )
            .map_err(|message| PolicyError::Call {
                plugin: p.clone(),
                message,
            })?;
        let decl = block_on_within_load_timeout(async {
            match &pre {
                Pre::Handshake(pre) => {
                    let i = pre.instantiate_async(&mut store).await?;
                    let d = i
                        .tollgate_policy_handshake()
                        .call_declare(&mut store)
                        .await?;
                    let caps: Vec<Capability> =
                        d.capabilities.into_iter().map(capability).collect();
                    Ok((d.name, d.version, caps, Vec::new()))
                }
                Pre::Message(pre) => {
                    let i = pre.instantiate_async(&mut store).await?;
                    let d = i.tollgate_policy_message().call_declare(&mut store).await?;
                    let caps: Vec<MessageCapability> = d
                        .capabilities
                        .into_iter()
                        .map(message::capability)
                        .collect();
                    Ok::<_, wasmtime::Error>((d.name, d.version, Vec::new(), caps))
                }
            }
        })
        .map_err(|_| PolicyError::Timeout {
            plugin: p.clone(),
            after: LOAD_TIMEOUT,
        })?
        .map_err(|e| PolicyError::Call {
            plugin: p.clone(),
            message: format!("declare failed: {e:#}"),
        })?;
        let (name, version, capabilities, message_capabilities) = decl;
        let signature_metrics = self.signature_metrics.as_ref().map(|m| m.plugin(&name));
        Ok(Plugin {
            name,
            version,
            capabilities: capabilities.into(),
            message_capabilities: message_capabilities.into(),
            path: path.to_owned(),
            imports,
            from_cache: cached,
            compile_time,
            instantiate_time: None,
            pre,
            signature_metrics,
        })
    }

    /// Times [`INSTANTIATE_SAMPLES`] fresh instances of `plugin` up to the end of a first call
    /// (`declare`: interpreter-based guests start their engine on the first call, so
    /// instantiation alone would flatter them) and records the median, so `inspect` can say
    /// what `fresh` costs for this plugin.
    pub fn measure_instantiation(&self, plugin: &mut Plugin) -> Result<(), PolicyError> {
        let mut times = Vec::with_capacity(INSTANTIATE_SAMPLES);
        for _ in 0..INSTANTIATE_SAMPLES {
            let t = std::time::Instant::now();
            block_on_within_load_timeout(async {
                let (mut store, instance) = self
                    .fresh(
                        plugin,
                        Budget::default(),
                        &Grants::default(),
                        None,
                        Arc::from([]),
                    )
                    .await?;
                match &instance {
                    Instance::Handshake(i) => i
                        .tollgate_policy_handshake()
                        .call_declare(&mut store)
                        .await
                        .map(drop),
                    Instance::Message(i) => i
                        .tollgate_policy_message()
                        .call_declare(&mut store)
                        .await
                        .map(drop),
                }
                .map_err(|e| plugin.call_error(format!("declare failed: {e:#}")))
            })
            .map_err(|_| plugin.timeout(LOAD_TIMEOUT))??;
            times.push(t.elapsed());
        }
        times.sort();
        plugin.instantiate_time = times.get(times.len() / 2).copied();
        Ok(())
    }

    /// Loads every `*.wasm` in `dir`, collecting every error.
    pub fn load_dir(&self, dir: &Path) -> (Vec<Plugin>, Vec<PolicyError>) {
        let mut plugins = Vec::new();
        let mut errors = Vec::new();
        let files = match plugin_files(dir) {
            Ok(f) => f,
            Err(e) => {
                errors.push(PolicyError::UnreadableDir {
                    path: dir.display().to_string(),
                    message: e.to_string(),
                });
                return (plugins, errors);
            }
        };
        for f in files {
            match self.load(&f) {
                Ok(p) => {
                    if let Some(other) = plugins.iter().find(|o: &&Plugin| o.name == p.name) {
                        errors.push(PolicyError::DuplicateName {
                            path: f.display().to_string(),
                            name: p.name.clone(),
                            other: other.path.display().to_string(),
                        });
                    } else {
                        plugins.push(p);
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        (plugins, errors)
    }

    /// A fresh Store (with this call's limits and grants) and instance of `plugin`.
    async fn fresh(
        &self,
        plugin: &Plugin,
        budget: Budget,
        grants: &Grants,
        prepared: Option<Arc<str>>,
        key_sets: Arc<[Arc<KeySet>]>,
    ) -> Result<(Store<HostState>, Instance), PolicyError> {
        let mut store = self
            .store(
                &plugin.name,
                budget,
                grants,
                plugin.capabilities.clone(),
                prepared,
                key_sets,
            )
            .map_err(|m| plugin.call_error(m))?;
        let instance = match &plugin.pre {
            Pre::Handshake(pre) => pre
                .instantiate_async(&mut store)
                .await
                .map(Instance::Handshake),
            Pre::Message(pre) => pre
                .instantiate_async(&mut store)
                .await
                .map(Instance::Message),
        }
        .map_err(|e| plugin.call_failed(&store, "instantiation", e))?;
        Ok((store, instance))
    }

    /// Runs `configure` for one attachment (at load, blocking, within [`LOAD_TIMEOUT`]) and
    /// returns the prepared config and the key sets it registered (fetched by now).
    pub fn configure(
        &self,
        plugin: &Plugin,
        config_json: &str,
        budget: Budget,
        grants: &Grants,
    ) -> Result<Configured, PolicyError> {
        let (prepared, key_sets) = block_on_within_load_timeout(async {
            let (mut store, instance) = self
                .fresh(plugin, budget, grants, None, Arc::from([]))
                .await?;
            store.data_mut().registering = Some(imports::Registering::new(config_json));
            let r = match &instance {
                Instance::Handshake(i) => {
                    i.tollgate_policy_handshake()
                        .call_configure(&mut store, config_json)
                        .await
                }
                Instance::Message(i) => {
                    i.tollgate_policy_message()
                        .call_configure(&mut store, config_json)
                        .await
                }
            };
            let key_sets = store
                .data_mut()
                .registering
                .take()
                .map(|r| r.sets)
                .unwrap_or_default();
            r.map(|r| (r, key_sets))
                .map_err(|e| plugin.call_failed(&store, "configure", e))
        })
        .map_err(|_| plugin.timeout(LOAD_TIMEOUT))??;
        prepared
        .map_err(|message| PolicyError::Config {
            plugin: plugin.name.clone(),
            message,
        })
        .and_then(|prepared| {
            if prepared.len() > MAX_PREPARED_BYTES {
                return Err(PolicyError::Config {
                    plugin: plugin.name.clone(),
                    message: format!(
                        "its prepared config is {} bytes, more than the {MAX_PREPARED_BYTES} an instance may read",
                        prepared.len()
                    ),
                });
            }
            Ok(Configured {
                prepared,
                key_sets: key_sets.into(),
            })
        })
    }

    /// Runs `on-handshake` in a fresh instance, or, given a pool, in a warm one (a new one
    /// when none is idle). The CPU budget and the wall-clock deadline are per call either way
    /// (the deadline covers a fresh instance's instantiation too); the memory cap is per
    /// instance, so a pooled plugin that leaks hits it and is replaced. The request goes into
    /// the call's store and comes back with the decision, as the plugin left it unread.
    pub(crate) async fn handshake(
        &self,
        call: Call<'_>,
        request: Request,
    ) -> Result<(Decided, Request), PolicyError> {
        // On a timeout the call's future is dropped mid-call, and with it the instance: a
        // stopped instance is never returned to the pool.
        tokio::time::timeout(call.budget.timeout, self.handshake_call(call, request))
            .await
            .map_err(|_| call.plugin.timeout(call.budget.timeout))?
    }

    /// An instance for one call: a warm one from the attachment's pool, else a fresh one.
    async fn warm(&self, call: Call<'_>) -> Result<Warm, PolicyError> {
        let plugin = call.plugin;
        Ok(match call.pool.and_then(InstancePool::take) {
            Some(mut w) => {
                // The budget is per call: a warm instance starts each one with all of it.
                arm_cpu_time(&mut w.store, call.budget.cpu_time);
                w
            }
            None => {
                let (mut store, instance) = self
                    .fresh(
                        plugin,
                        call.budget,
                        call.grants,
                        Some(call.prepared.clone()),
                        call.key_sets.clone(),
                    )
                    .await?;
                store.data_mut().signature_metrics = plugin.signature_metrics.clone();
                Warm {
                    store,
                    instance,
                    uses: 0,
                }
            }
        })
    }

    async fn handshake_call(
        &self,
        call: Call<'_>,
        request: Request,
    ) -> Result<(Decided, Request), PolicyError> {
        let plugin = call.plugin;
        let mut w = self.warm(call).await?;
        w.uses += 1;
        let state = w.store.data_mut();
        state.start_call();
        state.deadline = Some(std::time::Instant::now() + call.budget.timeout);
        state.request = Some(request);
        // The guest gets a borrow of the one request its store holds; the handle's number is
        // never looked at (the store has exactly one request at a time).
        let handle = Resource::new_borrow(0);
        let Instance::Handshake(instance) = &w.instance else {
            return Err(plugin.call_error("is not a handshake policy".into()));
        };
        // On a trap `w` is dropped here, never returned to the pool.
        let decided = instance
            .tollgate_policy_handshake()
            .call_on_handshake(&mut w.store, handle)
            .await
            .map_err(|e| plugin.call_failed(&w.store, "on-handshake", e))?;
        let request = w
            .store
            .data_mut()
            .request
            .take()
            .ok_or_else(|| plugin.call_error("the request left the store".into()))?;
        if let Some(pool) = call.pool {
            pool.give_back(w);
        }
        Ok((decided.map(from_wit), request))
    }
}

/// One `on-handshake` call: which plugin, with what, how bounded.
#[derive(Clone, Copy)]
pub(crate) struct Call<'a> {
    pub plugin: &'a Plugin,
    pub prepared: &'a Arc<str>,
    pub budget: Budget,
    pub grants: &'a Grants,
    pub pool: Option<&'a InstancePool>,
    /// The attachment's key sets (`key-sets` handles index it).
    pub key_sets: &'a Arc<[Arc<KeySet>]>,
}

/// What `configure` made of an attachment's config.
pub struct Configured {
    /// What every instance reads with `config.prepared`.
    pub prepared: String,
    /// The key sets it registered, by handle.
    pub key_sets: Arc<[Arc<KeySet>]>,
}

/// A policy's answer, in the host's own terms: a decision the edge code checks and applies,
/// plus the deadline it asks for; `Err` is the policy's own "could not decide".
pub(crate) type Decided = Result<(tollgate_edge::decision::Decision, Extras), String>;

/// What a `proceed` asks for beyond what `tollgate_edge::decision` checks and applies.
#[derive(Debug, Default)]
pub(crate) struct Extras {
    /// `close-at`, seconds since the Unix epoch.
    pub close_at: Option<u64>,
    /// The named backend it picks.
    pub backend: Option<String>,
}

/// The generated decision as the host's own: the strings move; nothing is copied.
fn from_wit(d: wit::Decision) -> (tollgate_edge::decision::Decision, Extras) {
    use tollgate_edge::decision as plain;
    let pair = |p: wit_types::Pair| plain::Pair {
        name: p.name,
        value: p.value,
    };
    match d {
        wit::Decision::Reject(r) => (
            plain::Decision::Reject(plain::Rejection {
                status: r.status,
                headers: r.headers.into_iter().map(pair).collect(),
                body: r.body,
            }),
            Extras::default(),
        ),
        wit::Decision::Proceed(p) => (
            plain::Decision::Proceed(plain::Proceed {
                header_changes: p
                    .header_changes
                    .into_iter()
                    .map(|c| match c {
                        wit::HeaderChange::Set(h) => plain::HeaderChange::Set(pair(h)),
                        wit::HeaderChange::Append(h) => plain::HeaderChange::Append(pair(h)),
                        wit::HeaderChange::Remove(n) => plain::HeaderChange::Remove(n),
                    })
                    .collect(),
                query_changes: p
                    .query_changes
                    .into_iter()
                    .map(|c| match c {
                        wit::QueryChange::Set(q) => plain::QueryChange::Set(pair(q)),
                        wit::QueryChange::Remove(n) => plain::QueryChange::Remove(n),
                    })
                    .collect(),
                response_headers: p.response_headers.into_iter().map(pair).collect(),
                context: p.context.into_iter().map(pair).collect(),
            }),
            Extras {
                close_at: p.close_at,
                backend: p.backend,
            },
        ),
    }
}

impl Plugin {
    /// Whether the plugin declared capability `c`: what it did not declare, the host does not
    /// let it do.
    pub fn declares(&self, c: Capability) -> bool {
        self.capabilities.contains(&c)
    }

    /// Which scope's world the plugin implements.
    pub fn kind(&self) -> PluginKind {
        match self.pre {
            Pre::Handshake(_) => PluginKind::Handshake,
            Pre::Message(_) => PluginKind::Message,
        }
    }

    fn call_error(&self, message: String) -> PolicyError {
        PolicyError::Call {
            plugin: self.name.clone(),
            message,
        }
    }

    fn timeout(&self, after: Duration) -> PolicyError {
        PolicyError::Timeout {
            plugin: self.name.clone(),
            after,
        }
    }

    /// A call into the plugin failed: a host call it was refused (undeclared capability), or
    /// else a trap (including exhausted CPU time or memory).
    fn call_failed(
        &self,
        store: &Store<HostState>,
        during: &str,
        e: wasmtime::Error,
    ) -> PolicyError {
        match store.data().refused {
            Some(r) => PolicyError::Undeclared {
                plugin: self.name.clone(),
                capability: r.capability,
                action: r.action,
            },
            None if e.chain().any(|c| c.is::<CpuTimeExceeded>()) => {
                self.call_error(format!("ran out of CPU time in {during} (its `cpu_time`)"))
            }
            None => self.call_error(format!("trapped in {during}: {e:#}")),
        }
    }

    /// What `tollgate plugin inspect` prints: the declaration, what each capability means on
    /// onHandshake, the imports and how each is served, and how the plugin is run.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "plugin:       {} {}", self.name, self.version);
        let _ = writeln!(out, "file:         {}", self.path.display());
        let _ = writeln!(out, "kind:         {}", self.kind().as_str());
        let _ = writeln!(out, "capabilities:");
        for c in self.message_capabilities.iter() {
            let _ = writeln!(out, "  {:<24} on an API's messages", c.name());
        }
        for c in self.capabilities.iter() {
            let note = match c.not_on_handshake() {
                Some((family, apim)) => format!(
                    "not supported on onHandshake ({} family, APIM \"{apim}\"): refused on an API, skipped when inherited",
                    family.as_str()
                ),
                None => "allowed on onHandshake".into(),
            };
            let _ = writeln!(out, "  {:<24} {note}", c.name());
        }
        let _ = writeln!(out, "imports:");
        for i in &self.imports {
            let how = if i.starts_with("tollgate:policy/") {
                "Tollgate host interface"
            } else {
                "WASI, deny-by-default (opened only by the attachment's grants)"
            };
            let _ = writeln!(out, "  {i:<40} {how}");
        }
        let (unit, units) = match self.kind() {
            PluginKind::Handshake => ("handshake", "handshakes"),
            PluginKind::Message => ("message", "messages (of any connection)"),
        };
        let _ = writeln!(
            out,
            "instances:    fresh per {unit} by default (nothing survives between calls); an attachment\n              with instances = \"pooled\" reuses warm instances (globals survive between the\n              {units} one instance serves)"
        );
        if let Some(t) = self.instantiate_time {
            let _ = writeln!(
                out,
                "instantiate:  {:.0} us per fresh instance and first call (median of {INSTANTIATE_SAMPLES}){}",
                t.as_secs_f64() * 1e6,
                if t > std::time::Duration::from_micros(200) {
                    "; consider instances = \"pooled\""
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            out,
            "compiled:     {} in {} ms",
            if self.from_cache {
                "loaded from cache"
            } else {
                "compiled"
            },
            self.compile_time.as_millis()
        );
        out
    }
}

/// How a slot of the pooling allocator is made like new for the next fresh instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryReset {
    /// Linux 6.7+: the kernel reports which pages of the slot the call touched
    /// (`PAGEMAP_SCAN`) and only those are restored in place; they stay mapped, so the next
    /// instance takes no page faults on them.
    PagemapScan,
    /// Elsewhere: the slot's pages are given back to the kernel (`madvise`) and fault in again
    /// on the next call.
    Madvise,
}

impl MemoryReset {
    /// The `method` of the `policy_memory_reset` log record.
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryReset::PagemapScan => "pagemap_scan",
            MemoryReset::Madvise => "madvise",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            MemoryReset::PagemapScan => {
                "fresh policy instances: the pages a call touched are restored in place (PAGEMAP_SCAN)"
            }
            MemoryReset::Madvise => {
                "fresh policy instances: PAGEMAP_SCAN is not available (Linux 6.7+), so a used slot's memory is released with madvise and faults in again; fresh instances cost ~3x more than with it (BENCHMARKS.md)"
            }
        }
    }
}

/// Up to this much of a linear memory is kept mapped between fresh instances when the kernel
/// can say which pages were touched: only those pages are copied back from the module's image
/// or zeroed, and a slot holds at most this much resident while unused. 2 MiB covers what the
/// first-party Rust plugins touch (a 1 MiB stack at the bottom of memory, then their data and
/// heap); a larger guest (an interpreter) has the rest of its memory released as before. With
/// set-header in fresh instances (`tollgate-bench chain`), 1, 2 and 16 MiB measured the same
/// (BENCHMARKS.md, "Handshake cost").
const KEEP_RESIDENT_MEMORY: usize = 2 << 20;
/// The same for a component's tables (indirect calls, the canonical ABI's adapters): small, and
/// without it each fresh instance faulted its table pages in again (half of the gain).
const KEEP_RESIDENT_TABLE: usize = 64 << 10;

/// The pooling allocator's settings, and how a slot is reset between fresh instances. Without
/// `PAGEMAP_SCAN`, keeping memory resident would mean `memset`ting the whole kept range on
/// every reset (slower than the page faults it saves, measured), so nothing is kept.
fn pooling_config() -> (PoolingAllocationConfig, MemoryReset) {
    let mut pooling = PoolingAllocationConfig::default();
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        pooling
            .pagemap_scan(wasmtime::Enabled::Yes)
            .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
            .table_keep_resident(KEEP_RESIDENT_TABLE);
        (pooling, MemoryReset::PagemapScan)
    } else {
        (pooling, MemoryReset::Madvise)
    }
}
