//! The policy host: loads handshake policies (WebAssembly components of the
//! `handshake-policy` world in `wit/policy.wit`) and runs them.
//!
//! Shaped like wasmtime's `serve`: one [`Engine`] and [`Linker`] for the process, an
//! [`InstancePre`](wasmtime::component::InstancePre) per plugin built once at load, and a fresh
//! [`Store`] and instance per call, so one client's handshake never sees state another left
//! behind. Each call runs with a fuel budget (CPU) and a memory cap; a trap, running out of
//! fuel or memory, or a bad result fails that handshake only.
//!
//! Before any plugin code runs, its imports are checked: our own interfaces and the standard
//! WASI interfaces language runtimes import anyway (cli, io, clocks, random, filesystem,
//! sockets) are accepted, anything else is refused with the import named. WASI is linked with
//! an empty context: no preopened directories, no environment, no network.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "handshake-policy",
});

pub use self::tollgate::policy::types as wit;

/// Defaults for one policy call. Generous for a header check or a JWT verification, small
/// enough that a runaway plugin costs milliseconds, not the gateway.
pub const DEFAULT_FUEL: u64 = 50_000_000;
pub const DEFAULT_MEMORY_BYTES: usize = 64 * 1024 * 1024;

/// Interfaces of ours a handshake policy may import.
const OUR_IMPORTS: &[&str] = &[
    "tollgate:policy/types",
    "tollgate:policy/log",
    "tollgate:policy/signatures",
];
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
    #[error("{path}: not a loadable WebAssembly component: {message}")]
    NotAComponent { path: String, message: String },
    #[error("{path}: imports `{import}`, which the handshake scope does not offer")]
    ForbiddenImport { path: String, import: String },
    #[error("{path}: does not implement the tollgate:policy handshake-policy world: {message}")]
    WrongWorld { path: String, message: String },
    #[error("plugin `{plugin}`: {message}")]
    Call { plugin: String, message: String },
    #[error("plugin `{plugin}` refused its config: {message}")]
    Config { plugin: String, message: String },
}

/// Per-call host state: the WASI context (empty), the resource table and the limits.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    plugin: Arc<str>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl self::tollgate::policy::types::Host for HostState {}

impl self::tollgate::policy::log::Host for HostState {
    fn log(&mut self, level: self::tollgate::policy::log::Level, message: String) {
        use self::tollgate::policy::log::Level;
        let plugin = &*self.plugin;
        match level {
            Level::Debug => tracing::debug!(event = "policy_log", plugin, "{message}"),
            Level::Info => tracing::info!(event = "policy_log", plugin, "{message}"),
            Level::Warn => tracing::warn!(event = "policy_log", plugin, "{message}"),
            Level::Error => tracing::error!(event = "policy_log", plugin, "{message}"),
        }
    }
}

impl self::tollgate::policy::signatures::Host for HostState {
    fn verify(
        &mut self,
        _alg: self::tollgate::policy::signatures::Algorithm,
        _key: Vec<u8>,
        _message: Vec<u8>,
        _signature: Vec<u8>,
    ) -> Result<bool, String> {
        // Said plainly rather than pretending: a policy that needs this gets an error it can
        // act on (fail closed).
        Err("signature verification is not available in this gateway build yet".into())
    }
}

/// A loaded plugin: what it declared and its pre-linked component.
pub struct Plugin {
    pub name: String,
    pub version: String,
    pub capabilities: Vec<String>,
    pub path: PathBuf,
    pub imports: Vec<String>,
    pre: HandshakePolicyPre<HostState>,
}

/// Limits for one call.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub fuel: u64,
    pub memory_bytes: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            fuel: DEFAULT_FUEL,
            memory_bytes: DEFAULT_MEMORY_BYTES,
        }
    }
}

pub struct PolicyHost {
    engine: Engine,
    linker: Linker<HostState>,
}

fn capability_name(c: wit::Capability) -> &'static str {
    use wit::Capability as C;
    match c {
        C::ReadRequest => "read-request",
        C::ModifyHeaders => "modify-headers",
        C::ModifyQuery => "modify-query",
        C::ModifyResponseHeaders => "modify-response-headers",
        C::UseContext => "use-context",
        C::Reject => "reject",
        C::VerifySignatures => "verify-signatures",
        C::MockResponse => "mock-response",
        C::CacheLookup => "cache-lookup",
        C::CacheStore => "cache-store",
        C::CrossDomain => "cross-domain",
        C::Cors => "cors",
        C::Jsonp => "jsonp",
        C::SetMethod => "set-method",
        C::SetBody => "set-body",
        C::XmlToJson => "xml-to-json",
        C::JsonToXml => "json-to-xml",
        C::Xslt => "xslt",
        C::ValidateContent => "validate-content",
        C::ValidateParameters => "validate-parameters",
        C::ValidateHeaders => "validate-headers",
        C::ValidateStatusCode => "validate-status-code",
    }
}

impl PolicyHost {
    pub fn new() -> Result<PolicyHost, String> {
        let mut config = Config::new();
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(|e| format!("wasm engine: {e}"))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| format!("linking WASI: {e}"))?;
        HandshakePolicy::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| format!("linking the policy interfaces: {e}"))?;
        Ok(PolicyHost { engine, linker })
    }

    fn store(&self, plugin: &str, budget: Budget) -> Result<Store<HostState>, String> {
        let state = HostState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(budget.memory_bytes)
                .build(),
            plugin: Arc::from(plugin),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(budget.fuel).map_err(|e| e.to_string())?;
        Ok(store)
    }

    /// Loads one `.wasm` file: checks it is a component, checks its imports, links it, and asks
    /// it for its declaration.
    pub fn load(&self, path: &Path) -> Result<Plugin, PolicyError> {
        let p = path.display().to_string();
        let component =
            Component::from_file(&self.engine, path).map_err(|e| PolicyError::NotAComponent {
                path: p.clone(),
                message: format!("{e:#}"),
            })?;
        let mut imports = Vec::new();
        for (name, _) in component.component_type().imports(&self.engine) {
            let ok = OUR_IMPORTS
                .iter()
                .any(|o| name == *o || name.starts_with(&format!("{o}@")))
                || WASI_IMPORTS.iter().any(|w| name.starts_with(w));
            if !ok {
                return Err(PolicyError::ForbiddenImport {
                    path: p,
                    import: name.to_owned(),
                });
            }
            imports.push(name.to_owned());
        }
        let pre = self
            .linker
            .instantiate_pre(&component)
            .and_then(HandshakePolicyPre::new)
            .map_err(|e| PolicyError::WrongWorld {
                path: p.clone(),
                message: format!("{e:#}"),
            })?;
        let mut store = self
            .store("(loading)", Budget::default())
            .map_err(|message| PolicyError::Call {
                plugin: p.clone(),
                message,
            })?;
        let decl = pre
            .instantiate(&mut store)
            .and_then(|i| i.tollgate_policy_policy().call_declare(&mut store))
            .map_err(|e| PolicyError::Call {
                plugin: p.clone(),
                message: format!("declare failed: {e:#}"),
            })?;
        Ok(Plugin {
            name: decl.name,
            version: decl.version,
            capabilities: decl
                .capabilities
                .into_iter()
                .map(|c| capability_name(c).to_owned())
                .collect(),
            path: path.to_owned(),
            imports,
            pre,
        })
    }

    /// Loads every `*.wasm` in `dir`, collecting every error.
    pub fn load_dir(&self, dir: &Path) -> (Vec<Plugin>, Vec<PolicyError>) {
        let mut plugins = Vec::new();
        let mut errors = Vec::new();
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
                .collect(),
            Err(e) => {
                errors.push(PolicyError::NotAComponent {
                    path: dir.display().to_string(),
                    message: format!("cannot read plugin_dir: {e}"),
                });
                return (plugins, errors);
            }
        };
        files.sort();
        for f in files {
            match self.load(&f) {
                Ok(p) => {
                    if let Some(other) = plugins.iter().find(|o: &&Plugin| o.name == p.name) {
                        errors.push(PolicyError::WrongWorld {
                            path: f.display().to_string(),
                            message: format!(
                                "declares the name `{}`, already declared by {}",
                                p.name,
                                other.path.display()
                            ),
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

    /// Runs `configure` and then `on-handshake` in a fresh instance.
    pub fn call(
        &self,
        plugin: &Plugin,
        config_json: &str,
        request: Option<&wit::HandshakeRequest>,
        budget: Budget,
    ) -> Result<Option<wit::Decision>, PolicyError> {
        let err = |message: String| PolicyError::Call {
            plugin: plugin.name.clone(),
            message,
        };
        let mut store = self.store(&plugin.name, budget).map_err(err)?;
        let instance = plugin
            .pre
            .instantiate(&mut store)
            .map_err(|e| err(format!("instantiation failed: {e:#}")))?;
        let guest = instance.tollgate_policy_policy();
        guest
            .call_configure(&mut store, config_json)
            .map_err(|e| err(format!("trapped in configure: {e:#}")))?
            .map_err(|message| PolicyError::Config {
                plugin: plugin.name.clone(),
                message,
            })?;
        match request {
            None => Ok(None),
            Some(r) => guest
                .call_on_handshake(&mut store, r)
                .map(Some)
                .map_err(|e| err(format!("trapped in on-handshake: {e:#}"))),
        }
    }
}
