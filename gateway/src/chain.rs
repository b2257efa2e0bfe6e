//! An API's onHandshake policy chain: built at load from the manifest's attachments (global,
//! then the API's products, then the API's own onHandshake), applied per handshake to the
//! backend request.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;

use crate::capabilities::{self, Scope, Verdict};
use crate::handshake::{BackendRequest, Reject};
use crate::manifest::{ApiConfig, Attachment, Config, Grants, Instances};
use crate::metrics::{Metrics, PolicyMetrics};
use crate::policy::{wit, Budget, InstancePool, Plugin, PolicyError, PolicyHost};

/// Headers a policy may not touch: they belong to the WebSocket handshake itself.
pub const PROTECTED: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-accept",
    "content-length",
    "transfer-encoding",
];

/// Headers a policy may not put on the client's 101 besides [`PROTECTED`]: the two the backend
/// negotiates with the client (a second `Sec-WebSocket-Protocol` or `-Extensions` would
/// contradict what the relay speaks); the hop-by-hop ones
/// (`tollgate_edge::headers::HOP_BY_HOP`) describe a connection, not the response, and are
/// refused too.
pub const PROTECTED_RESPONSE: &[&str] = &["sec-websocket-protocol", "sec-websocket-extensions"];

/// A backend request header a policy may not set, append or remove: [`PROTECTED`] and every
/// `Sec-WebSocket-*` (the gateway negotiates subprotocols and extensions with the backend on
/// the client's behalf and checks the answer against the client's offer).
fn protected_request_header(lower: &str) -> bool {
    PROTECTED.contains(&lower) || lower.starts_with("sec-websocket-")
}

fn protected_response_header(lower: &str) -> bool {
    PROTECTED.contains(&lower)
        || PROTECTED_RESPONSE.contains(&lower)
        || tollgate_edge::headers::HOP_BY_HOP.contains(&lower)
}

/// Largest decision a policy may return (all header, query and context strings plus a
/// rejection body, each entry counted with [`DECISION_ENTRY_BYTES`] on top). A bigger one is
/// treated as a policy failure: it would otherwise end up in the backend request or the
/// client's response.
pub const MAX_DECISION_BYTES: usize = 256 * 1024;
/// What each entry of a decision (header change, query change, response header, context value,
/// rejection header) counts towards [`MAX_DECISION_BYTES`] besides its strings: an entry costs
/// the gateway memory and work even when its strings are empty.
pub const DECISION_ENTRY_BYTES: usize = 32;
/// Most entries a decision may have, all lists together.
pub const MAX_DECISION_ENTRIES: usize = 1024;

/// (entries, bytes) of a decision, each entry's bytes including [`DECISION_ENTRY_BYTES`].
fn decision_size(d: &wit::Decision) -> (usize, usize) {
    let pair = |p: &wit::Pair| DECISION_ENTRY_BYTES + p.name.len() + p.value.len();
    let name = |n: &String| DECISION_ENTRY_BYTES + n.len();
    match d {
        wit::Decision::Reject(r) => (
            r.headers.len(),
            r.body.len() + r.headers.iter().map(pair).sum::<usize>(),
        ),
        wit::Decision::Proceed(p) => (
            p.header_changes.len()
                + p.query_changes.len()
                + p.response_headers.len()
                + p.context.len(),
            p.header_changes
                .iter()
                .map(|c| match c {
                    wit::HeaderChange::Set(h) | wit::HeaderChange::Append(h) => pair(h),
                    wit::HeaderChange::Remove(n) => name(n),
                })
                .sum::<usize>()
                + p.query_changes
                    .iter()
                    .map(|c| match c {
                        wit::QueryChange::Set(q) => pair(q),
                        wit::QueryChange::Remove(n) => name(n),
                    })
                    .sum::<usize>()
                + p.response_headers.iter().map(pair).sum::<usize>()
                + p.context.iter().map(pair).sum::<usize>(),
        ),
    }
}

/// The first capability `d` uses that `plugin` did not declare, with what it did.
fn undeclared(plugin: &Plugin, d: &wit::Decision) -> Option<(wit::Capability, &'static str)> {
    use wit::Capability as C;
    let used: &[(bool, C, &'static str)] = match d {
        wit::Decision::Reject(_) => &[(true, C::Reject, "rejected the handshake")],
        wit::Decision::Proceed(p) => &[
            (
                !p.header_changes.is_empty(),
                C::ModifyHeaders,
                "changed backend request headers",
            ),
            (
                !p.query_changes.is_empty(),
                C::ModifyQuery,
                "changed the backend request's query",
            ),
            (
                !p.response_headers.is_empty(),
                C::ModifyResponseHeaders,
                "added 101 response headers",
            ),
            (!p.context.is_empty(), C::UseContext, "set context values"),
        ],
    };
    used.iter()
        .find(|(uses, c, _)| *uses && !plugin.declares(*c))
        .map(|(_, c, what)| (*c, *what))
}

/// One attached policy.
pub struct Step {
    pub host: Arc<PolicyHost>,
    pub plugin: Arc<Plugin>,
    /// What the plugin's `configure` returned for this attachment.
    pub prepared: String,
    pub budget: Budget,
    pub grants: Grants,
    /// Warm instances, when the attachment asks for `instances = "pooled"`.
    pub pool: Option<InstancePool>,
    pub failure_status: StatusCode,
    pub scope: Scope,
    /// Inherited plugin with a capability onHandshake does not support: loaded, never run.
    pub skip: bool,
    /// Calls by outcome, skips and call durations (`tollgate_policy_*`).
    pub metrics: PolicyMetrics,
}

impl Step {
    /// Runs this attachment's plugin on one handshake, with its prepared config, budget,
    /// grants and instance strategy.
    pub async fn decide(
        &self,
        request: &wit::HandshakeRequest,
    ) -> Result<wit::Decision, PolicyError> {
        self.host
            .handshake(
                &self.plugin,
                &self.prepared,
                request,
                self.budget,
                &self.grants,
                self.pool.as_ref(),
            )
            .await
    }
}

/// Builds the chain for `api`; every problem is returned, worded for the operator.
pub fn build(
    host: &Arc<PolicyHost>,
    plugins: &HashMap<String, Arc<Plugin>>,
    config: &Config,
    api: &ApiConfig,
    metrics: &Metrics,
) -> Result<Vec<Step>, Vec<String>> {
    let mut scoped: Vec<(Scope, &Attachment)> = Vec::new();
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

    let mut steps = Vec::new();
    let mut errors = Vec::new();
    for (scope, att) in scoped {
        let Some(plugin) = plugins.get(&att.plugin) else {
            errors.push(format!(
                "{}: plugin `{}` (attached at {scope}) was not found in plugin_dir",
                att.location, att.plugin
            ));
            continue;
        };
        let skip = match capabilities::check(&plugin.name, &plugin.capabilities, &scope) {
            Err(e) => {
                errors.push(format!("{}: {e}", att.location));
                continue;
            }
            Ok(Verdict::Refuse(refusals)) => {
                errors.extend(refusals.iter().map(|r| format!("{}: {r}", att.location)));
                continue;
            }
            Ok(Verdict::SkipAtRuntime(refusals)) => {
                for r in &refusals {
                    tracing::warn!(event = "policy_skipped_at_load", api = %api.name, plugin = %plugin.name,
                        capability = %r.capability, scope = %scope,
                        "inherited policy declares a capability onHandshake does not support; it will be skipped for this WebSocket API");
                }
                true
            }
            Ok(Verdict::Run) => false,
        };
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
        let budget = Budget {
            fuel: att.fuel.unwrap_or(crate::policy::DEFAULT_FUEL),
            memory_bytes: att
                .memory_limit_bytes
                .unwrap_or(crate::policy::DEFAULT_MEMORY_BYTES),
            timeout: att.timeout.unwrap_or(crate::policy::DEFAULT_TIMEOUT),
        };
        let prepared = if skip {
            String::new()
        } else {
            // The plugin validates its config now, so bad config stops the start.
            match host.configure(plugin, &config_json, budget, &att.grants) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(format!("{}: {e}", att.config_location));
                    continue;
                }
            }
        };
        steps.push(Step {
            host: host.clone(),
            plugin: plugin.clone(),
            prepared,
            budget,
            grants: att.grants.clone(),
            pool: match att.instances {
                Instances::Fresh => None,
                Instances::Pooled { max_uses } => Some(InstancePool::new(max_uses)),
            },
            failure_status: StatusCode::from_u16(att.failure_status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            metrics: metrics.policy(
                &api.name,
                &plugin.name,
                match scope {
                    Scope::Global => "global",
                    Scope::Product(_) => "product",
                    Scope::Api(_) => "api",
                },
            ),
            scope,
            skip,
        });
    }
    if errors.is_empty() {
        Ok(steps)
    } else {
        Err(errors)
    }
}

fn value(v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| format!("invalid header value {v:?}"))
}

/// Runs the chain. On success the backend request carries the policies' changes and the
/// returned headers go on the client's 101.
///
/// Each guest runs on a fiber inside the caller's task and yields to the runtime every ten
/// million units of fuel, so a slow policy delays its own handshake, not the worker.
pub async fn run(
    steps: &[Step],
    mut request: wit::HandshakeRequest,
    breq: &mut BackendRequest,
) -> Result<Vec<(HeaderName, HeaderValue)>, Reject> {
    let mut response_headers = Vec::new();
    let api = request.api.clone();
    for step in steps {
        // A product's policies apply to the handshakes that came in through that product.
        if let Scope::Product(p) = &step.scope {
            if request.product.as_deref() != Some(p.as_str()) {
                continue;
            }
        }
        let name = &step.plugin.name;
        if step.skip {
            let skips_total = step.metrics.skips.inc() + 1;
            tracing::info!(event = "policy_skipped", plugin = %name, scope = %step.scope, api = %api,
                skips_total, "inherited policy skipped for a WebSocket API");
            continue;
        }
        let fail = |why: String| {
            tracing::warn!(event = "policy_error", plugin = %name, api = %api, error = %why, "policy failed; handshake rejected");
            Reject::new(step.failure_status, format!("policy `{name}` failed"))
        };
        let started = std::time::Instant::now();
        // Context values (claims, subscription names) are only shown to a plugin that
        // declared `use-context`.
        let hidden = if step.plugin.declares(wit::Capability::UseContext) {
            Vec::new()
        } else {
            std::mem::take(&mut request.context)
        };
        let decided = step.decide(&request).await;
        if !hidden.is_empty() {
            request.context = hidden;
        }
        step.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        // Counted as an error unless the decision turns out to be usable.
        let fail = |why: String| {
            step.metrics.error.inc();
            fail(why)
        };
        let decision = decided.map_err(|e| fail(e.to_string()))?;
        let (entries, size) = decision_size(&decision);
        if entries > MAX_DECISION_ENTRIES {
            return Err(fail(format!(
                "returned a decision of {entries} entries (limit {MAX_DECISION_ENTRIES})"
            )));
        }
        if size > MAX_DECISION_BYTES {
            return Err(fail(format!(
                "returned a decision of {size} bytes (limit {MAX_DECISION_BYTES}, each entry counting {DECISION_ENTRY_BYTES})"
            )));
        }
        if let Some((capability, what)) = undeclared(&step.plugin, &decision) {
            return Err(fail(
                PolicyError::Undeclared {
                    plugin: name.clone(),
                    capability: crate::policy::capability_name(capability),
                    action: what,
                }
                .to_string(),
            ));
        }
        match decision {
            wit::Decision::Reject(r) => {
                let status = StatusCode::from_u16(r.status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .ok_or_else(|| fail(format!("rejected with invalid status {}", r.status)))?;
                let mut rej = Reject::new(status, format!("rejected by policy `{name}`"));
                for h in r.headers {
                    let n = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| fail(format!("invalid header name {:?}", h.name)))?;
                    rej.headers.push((n, value(&h.value).map_err(fail)?));
                }
                rej.body = Some(bytes::Bytes::from(r.body));
                step.metrics.reject.inc();
                return Err(rej);
            }
            wit::Decision::Proceed(p) => {
                for change in &p.header_changes {
                    let target = match change {
                        wit::HeaderChange::Set(h) | wit::HeaderChange::Append(h) => h.name.as_str(),
                        wit::HeaderChange::Remove(n) => n.as_str(),
                    };
                    let lower = target.to_ascii_lowercase();
                    if protected_request_header(&lower) {
                        return Err(fail(format!(
                            "tried to change protected header `{target}` (Host, Connection, Upgrade, Sec-WebSocket-*, Content-Length and Transfer-Encoding cannot be changed on onHandshake)"
                        )));
                    }
                    let hn = HeaderName::from_bytes(lower.as_bytes())
                        .map_err(|_| fail(format!("invalid header name {target:?}")))?;
                    match change {
                        wit::HeaderChange::Set(h) => {
                            breq.headers
                                .insert(hn.clone(), value(&h.value).map_err(fail)?);
                        }
                        wit::HeaderChange::Append(h) => {
                            breq.headers
                                .append(hn.clone(), value(&h.value).map_err(fail)?);
                        }
                        wit::HeaderChange::Remove(_) => {
                            breq.headers.remove(&hn);
                        }
                    }
                    // Later policies see the request as it now is.
                    request.headers.retain(|h| {
                        !h.name.eq_ignore_ascii_case(&lower)
                            || matches!(change, wit::HeaderChange::Append(_))
                    });
                    match change {
                        wit::HeaderChange::Set(h) | wit::HeaderChange::Append(h) => {
                            request.headers.push(wit::Pair {
                                name: lower.clone(),
                                value: h.value.clone(),
                            })
                        }
                        wit::HeaderChange::Remove(_) => {}
                    }
                }
                if !p.query_changes.is_empty() {
                    apply_query(breq, &p.query_changes, &mut request);
                }
                for h in p.response_headers {
                    let lower = h.name.to_ascii_lowercase();
                    if protected_response_header(&lower) {
                        return Err(fail(format!(
                            "tried to add protected response header `{}` (the handshake's own headers, Sec-WebSocket-Protocol, Sec-WebSocket-Extensions and hop-by-hop headers cannot be set on the 101)",
                            h.name
                        )));
                    }
                    let n = HeaderName::from_bytes(lower.as_bytes())
                        .map_err(|_| fail(format!("invalid header name {:?}", h.name)))?;
                    response_headers.push((n, value(&h.value).map_err(fail)?));
                }
                request.context.extend(p.context);
                step.metrics.allow.inc();
            }
        }
    }
    Ok(response_headers)
}

fn apply_query(
    breq: &mut BackendRequest,
    changes: &[wit::QueryChange],
    request: &mut wit::HandshakeRequest,
) {
    let (path, query) = match breq.target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (breq.target.clone(), String::new()),
    };
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    for c in changes {
        match c {
            wit::QueryChange::Set(p) => {
                pairs.retain(|(k, _)| k != &p.name);
                pairs.push((p.name.clone(), p.value.clone()));
            }
            wit::QueryChange::Remove(n) => pairs.retain(|(k, _)| k != n),
        }
    }
    request.query = pairs
        .iter()
        .map(|(k, v)| wit::Pair {
            name: k.clone(),
            value: v.clone(),
        })
        .collect();
    breq.target = if pairs.is_empty() {
        path
    } else {
        let q = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        format!("{path}?{q}")
    };
}
