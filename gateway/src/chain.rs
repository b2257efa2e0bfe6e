//! An API's onHandshake policy chain: built at load from the manifest's attachments (global,
//! then the API's products, then the API's own onHandshake), applied per handshake to the
//! backend request.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use tollgate_edge::decision;

use crate::capabilities::{self, Scope, Verdict};
use crate::handshake::{BackendRequest, Reject};
use crate::manifest::{ApiConfig, Attachment, Config, Grants, Instances};
use crate::metrics::{Metrics, PolicyMetrics};
use crate::policy::{wit, Budget, InstancePool, Plugin, PolicyError, PolicyHost};

pub use tollgate_edge::decision::{
    DECISION_ENTRY_BYTES, MAX_DECISION_BYTES, MAX_DECISION_ENTRIES, PROTECTED, PROTECTED_RESPONSE,
};

/// The engine's decision as the plain one `tollgate_edge::decision` checks and applies (the
/// strings move; nothing is copied).
fn plain(d: wit::Decision) -> decision::Decision {
    let pair = |p: wit::Pair| decision::Pair {
        name: p.name,
        value: p.value,
    };
    match d {
        wit::Decision::Reject(r) => decision::Decision::Reject(decision::Rejection {
            status: r.status,
            headers: r.headers.into_iter().map(pair).collect(),
            body: r.body,
        }),
        wit::Decision::Proceed(p) => decision::Decision::Proceed(decision::Proceed {
            header_changes: p
                .header_changes
                .into_iter()
                .map(|c| match c {
                    wit::HeaderChange::Set(h) => decision::HeaderChange::Set(pair(h)),
                    wit::HeaderChange::Append(h) => decision::HeaderChange::Append(pair(h)),
                    wit::HeaderChange::Remove(n) => decision::HeaderChange::Remove(n),
                })
                .collect(),
            query_changes: p
                .query_changes
                .into_iter()
                .map(|c| match c {
                    wit::QueryChange::Set(q) => decision::QueryChange::Set(pair(q)),
                    wit::QueryChange::Remove(n) => decision::QueryChange::Remove(n),
                })
                .collect(),
            response_headers: p.response_headers.into_iter().map(pair).collect(),
            context: p.context.into_iter().map(pair).collect(),
        }),
    }
}

/// Later policies see the request as the earlier ones left it.
impl decision::PolicyView for wit::HandshakeRequest {
    fn header_changed(&mut self, lower: &str, value: Option<&str>, append: bool) {
        self.headers
            .retain(|h| append || !h.name.eq_ignore_ascii_case(lower));
        if let Some(v) = value {
            self.headers.push(wit::Pair {
                name: lower.to_owned(),
                value: v.to_owned(),
            });
        }
    }

    fn query_replaced(&mut self, pairs: &[(String, String)]) {
        self.query = pairs
            .iter()
            .map(|(k, v)| wit::Pair {
                name: k.clone(),
                value: v.clone(),
            })
            .collect();
    }

    fn context_added(&mut self, context: Vec<decision::Pair>) {
        self.context.extend(context.into_iter().map(|p| wit::Pair {
            name: p.name,
            value: p.value,
        }));
    }
}

/// The first capability `d` uses that `plugin` did not declare, with what it did.
fn undeclared(plugin: &Plugin, d: &decision::Decision) -> Option<(wit::Capability, &'static str)> {
    use wit::Capability as C;
    d.uses()
        .into_iter()
        .map(|(u, what)| {
            let c = match u {
                decision::Use::Reject => C::Reject,
                decision::Use::ModifyHeaders => C::ModifyHeaders,
                decision::Use::ModifyQuery => C::ModifyQuery,
                decision::Use::ModifyResponseHeaders => C::ModifyResponseHeaders,
                decision::Use::UseContext => C::UseContext,
            };
            (c, what)
        })
        .find(|(c, _)| !plugin.declares(*c))
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
        let decision = plain(decided.map_err(|e| fail(e.to_string()))?);
        decision.check_size().map_err(|e| fail(e.to_string()))?;
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
            decision::Decision::Reject(r) => {
                let r = decision::rejection(r).map_err(|e| fail(e.to_string()))?;
                let mut rej = Reject::new(r.status, format!("rejected by policy `{name}`"));
                rej.headers = r.headers;
                rej.body = Some(bytes::Bytes::from(r.body));
                step.metrics.reject.inc();
                return Err(rej);
            }
            decision::Decision::Proceed(p) => {
                let added = decision::apply(p, &mut breq.headers, &mut breq.target, &mut request)
                    .map_err(|e| fail(e.to_string()))?;
                response_headers.extend(added);
                step.metrics.allow.inc();
            }
        }
    }
    Ok(response_headers)
}
