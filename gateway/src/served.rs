//! The served state: what handshakes are served from (the manifest's APIs with their backend
//! connectors and policy chains, the products' subscriptions), built as a whole from a
//! validated [`Config`] at start and by every reload, and swapped in as a whole
//! ([`Current::swap_in`]). The listener, the admin listener and the reload watcher all read it
//! through [`Current`]; none of them needs the rest of the gateway.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::backend::{self, Connector};
use crate::manifest::Config;
use crate::metrics::Metrics;
use crate::policy::message::{MessageAttachmentSpec, Watches};
use crate::policy::{AttachmentSpec, Budget, Grants, Instances, Scope};
use crate::routes::{Api, Routes};

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
    /// An attachment that cannot join its API's chain (names its manifest location).
    #[error(transparent)]
    Chain(#[from] crate::policy::chain::ChainError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    /// The process a binary upgrade handed the listening sockets to exited while this one
    /// drained: nothing accepts on them any more.
    #[error("the new process (pid {pid}) that took over the listening sockets exited ({status}); nothing accepts on them now")]
    SuccessorLost {
        pid: u32,
        status: std::process::ExitStatus,
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
    pub routes_have_policies: bool,
    /// The policy host the chains run in, when any policy is attached.
    host: Option<Arc<crate::policy::PolicyHost>>,
    /// Products' subscriptions, by key digest.
    pub keys: crate::subscriptions::Keys,
    /// The process's counters (`counters`): one set for the process's life, handed from state
    /// to state, so a reload keeps the counts.
    counters: Arc<crate::counters::Counters>,
}

impl Served {
    /// The key sets this state's policy chains use (each once).
    pub fn key_sets_in_use(&self) -> Vec<Arc<crate::policy::key_sets::KeySet>> {
        let mut sets: Vec<Arc<crate::policy::key_sets::KeySet>> = Vec::new();
        for api in self.routes.apis() {
            for step in &api.chain {
                for k in step.key_sets.iter() {
                    if !sets.iter().any(|s| Arc::ptr_eq(s, k)) {
                        sets.push(k.clone());
                    }
                }
            }
        }
        sets
    }

    /// The process's counters.
    pub fn counters(&self) -> &Arc<crate::counters::Counters> {
        &self.counters
    }

    /// The key sets policies registered (`key-sets`), when any policy runs.
    pub fn key_sets(&self) -> Option<Arc<crate::policy::key_sets::KeySets>> {
        self.host.as_ref().map(|h| h.key_sets())
    }

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
            || config
                .apis
                .iter()
                .any(|a| !a.on_handshake.is_empty() || !a.on_message.is_empty());
        let mut plugins = std::collections::HashMap::new();
        let mut host = None;
        let counters = previous.map_or_else(
            || Arc::new(crate::counters::Counters::new(metrics.fleet())),
            |p| p.counters.clone(),
        );
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
                        h.set_counters(counters.clone());
                        // Keys fetched under the state being replaced stay held.
                        if let Some(sets) = previous.and_then(Served::key_sets) {
                            h.adopt_key_sets(sets);
                        }
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
                            capabilities = ?p.capabilities.iter().map(|c| c.name())
                                .chain(p.message_capabilities.iter().map(|c| c.name())).collect::<Vec<_>>(),
                            path = %p.path.display(),
                            from_cache = p.from_cache, compile_ms = p.compile_time.as_millis() as u64,
                            "plugin loaded");
                        plugins.insert(p.name.clone(), Arc::new(p));
                    }
                    host = Some(h);
                }
                Err(e) => errors.push(StartError::Plugin(e.to_string())),
            }
        }
        let mut apis = Vec::new();
        for a in &config.apis {
            let chain = match &host {
                Some(h) => {
                    let specs = match attachments(&config, a) {
                        Ok(s) => s,
                        Err(errs) => {
                            errors.extend(errs.into_iter().map(StartError::Located));
                            continue;
                        }
                    };
                    match crate::policy::chain::build(h, &plugins, &a.name, specs, metrics) {
                        Ok(c) => Some(c),
                        Err(errs) => {
                            errors.extend(errs.into_iter().map(StartError::Chain));
                            None
                        }
                    }
                }
                None => Some(Vec::new()),
            };
            // Built even when the chain failed, so every error of the API is reported at once.
            let messages = match &host {
                Some(h) if !a.on_message.is_empty() => {
                    let specs = message_attachments(a);
                    match crate::policy::message::build(h, &plugins, &a.name, specs, metrics) {
                        Ok(steps) => Some(Arc::from(steps)),
                        Err(errs) => {
                            errors.extend(errs.into_iter().map(StartError::Located));
                            None
                        }
                    }
                }
                _ => Some(Arc::from([])),
            };
            let (Some(chain), Some(messages)) = (chain, messages) else {
                continue;
            };
            let any_tls = a.backend.tls || a.backends.values().any(|b| b.tls);
            let tls = if any_tls {
                if a.insecure_skip_verify {
                    tracing::warn!(
                        event = "insecure_skip_verify",
                        api = %a.name,
                        backend = %crate::logging::loggable(&a.backend.original, config.gateway.log_query_values),
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
            let timeout = config.gateway.limits.backend_timeout;
            let named: Result<std::collections::BTreeMap<String, Connector>, String> = a
                .backends
                .iter()
                .map(|(name, url)| {
                    Connector::new(url.clone(), tls.clone(), timeout)
                        .map(|c| (name.clone(), c))
                        .map_err(|e| format!("backends.{name}: {e}"))
                })
                .collect();
            match Connector::new(a.backend.clone(), tls, timeout).and_then(|c| Ok((c, named?))) {
                Ok((connector, backends)) => apis.push(Arc::new(Api {
                    config: a.clone(),
                    connector,
                    backends,
                    // Same API as before a reload: keep counting its connections.
                    active: previous
                        .and_then(|p| p.routes.apis().iter().find(|o| o.config.name == a.name))
                        .map(|o| o.active.clone())
                        .unwrap_or_default(),
                    chain,
                    messages,
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
            counters,
        })
    }
}

/// API `api`'s attachments as the policy host takes them, in the order they run: global, then
/// its products', then its own onHandshake.
pub fn attachments(
    config: &Config,
    api: &crate::manifest::ApiConfig,
) -> Result<Vec<AttachmentSpec>, Vec<String>> {
    let mut scoped: Vec<(Scope, &crate::manifest::Attachment)> = Vec::new();
    scoped.extend(config.policies.iter().map(|a| (Scope::Global, a)));
    for pname in &api.products {
        if let Some(p) = config.products.iter().find(|p| &p.name == pname) {
            scoped.extend(
                p.policies
                    .iter()
                    .map(|a| (Scope::Product(p.name.clone()), a)),
            );
        }
    }
    scoped.extend(
        api.on_handshake
            .iter()
            .map(|a| (Scope::Api(api.name.clone()), a)),
    );
    let mut specs = Vec::new();
    let mut errors = Vec::new();
    for (scope, att) in scoped {
        let config_json = match serde_json::to_string(&att.config) {
            Ok(j) => j,
            Err(e) => {
                errors.push(format!(
                    "{}: config of `{}` cannot be passed on: {e}",
                    att.location, att.plugin
                ));
                continue;
            }
        };
        specs.push(AttachmentSpec {
            scope,
            plugin: att.plugin.clone(),
            config_json,
            budget: budget(att),
            grants: grants(att),
            instances: instances(att),
            failure_status: http::StatusCode::from_u16(att.failure_status)
                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
            location: att.location.clone(),
            config_location: att.config_location.clone(),
        });
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(errors)
    }
}

/// API `api`'s message policies as the policy host takes them, in the manifest's order.
fn message_attachments(api: &crate::manifest::ApiConfig) -> Vec<MessageAttachmentSpec> {
    api.on_message
        .iter()
        .map(|m| {
            let att = &m.attachment;
            MessageAttachmentSpec {
                plugin: att.plugin.clone(),
                // A TOML table always has a JSON form (no NaN keys, no cycles).
                config_json: serde_json::to_string(&att.config).unwrap_or_else(|_| "{}".into()),
                budget: budget(att),
                grants: grants(att),
                instances: instances(att),
                watches: Watches {
                    client: m.client,
                    backend: m.backend,
                },
                location: att.location.clone(),
                config_location: att.config_location.clone(),
            }
        })
        .collect()
}

fn budget(att: &crate::manifest::Attachment) -> Budget {
    Budget {
        cpu_time: att.cpu_time.unwrap_or(crate::policy::DEFAULT_CPU_TIME),
        memory_bytes: att
            .memory_limit_bytes
            .unwrap_or(crate::policy::DEFAULT_MEMORY_BYTES),
        timeout: att.timeout.unwrap_or(crate::policy::DEFAULT_TIMEOUT),
    }
}

fn grants(att: &crate::manifest::Attachment) -> Grants {
    let g = &att.grants;
    Grants {
        read_dirs: g.read_dirs.clone(),
        env: g.env.clone(),
        clock: g.clock,
    }
}

fn instances(att: &crate::manifest::Attachment) -> Instances {
    match att.instances {
        crate::manifest::Instances::Fresh => Instances::Fresh,
        crate::manifest::Instances::Pooled { max_uses } => Instances::Pooled { max_uses },
    }
}

/// The state new handshakes are served from, replaced as a whole by a reload. A handshake
/// takes the current one when it starts ([`Current::get`]) and keeps it to the end.
pub struct Current(arc_swap::ArcSwap<Served>);

impl Current {
    pub fn new(s: Served) -> Current {
        Current(arc_swap::ArcSwap::from_pointee(s))
    }

    /// The state new handshakes are served from now.
    pub fn get(&self) -> Arc<Served> {
        self.0.load_full()
    }

    /// The current state for a quick look (no reference count taken): what the accept loop
    /// and a closing connection read.
    pub fn load(&self) -> arc_swap::Guard<Arc<Served>> {
        self.0.load()
    }

    /// Makes `s` the state new handshakes are served from, then ends the connections of
    /// subscription keys it no longer has.
    pub fn swap_in(&self, s: Served) {
        let new = Arc::new(s);
        let old = self.0.swap(new.clone());
        new.keys.revoke_missing(&old.keys);
        // The old chains serve no new handshake: their warm instances go now, not when the
        // last connection admitted under them closes. The connections admitted under the old
        // state keep calling its message policies: one warm instance per attachment is kept
        // for them (all of them would pin instance slots for as long as such a connection
        // lives; none would make each of their messages instantiate, and compile its config).
        for api in old.routes.apis() {
            for pool in api.chain.iter().filter_map(|s| s.pool.as_ref()) {
                pool.retire(0);
            }
            for pool in api.messages.iter().filter_map(|s| s.pool.as_ref()) {
                pool.retire(1);
            }
        }
    }
}
