//! An API's onHandshake policy chain: built at load from the manifest's attachments (global,
//! then the API's products, then the API's own onHandshake), applied per handshake to the
//! backend request.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use tollgate_edge::decision;

use super::capabilities::{self, Capability, Scope, Verdict};
use super::Grants;
use super::{Budget, Call, InstancePool, Plugin, PolicyError, PolicyHost, Request};
use crate::metrics::{Metrics, PolicyMetrics};

pub use tollgate_edge::decision::{
    DECISION_ENTRY_BYTES, MAX_DECISION_BYTES, MAX_DECISION_ENTRIES, PROTECTED, PROTECTED_RESPONSE,
};

/// The furthest a `close-at` may lie after the handshake's `received-at` (ten years); a later
/// one is taken as this.
pub const MAX_CLOSE_AT_AHEAD_SECS: u64 = 10 * 366 * 24 * 3600;

/// What the chain decided for one handshake.
#[derive(Debug)]
pub enum Outcome {
    /// Every policy let it go on: the backend request carries their changes, and these go on
    /// the client's 101 and the connection.
    Proceed(Effects),
    /// A policy refused it on purpose: the client gets this answer.
    Reject(Rejection),
    /// A policy could not decide (its error, a trap, a timeout, a decision it was not allowed
    /// to make): the client gets the attachment's `failure_status`; `error` is for the log.
    Failed(Failure),
}

/// What the policies asked for beyond the backend request.
#[derive(Debug, Default)]
pub struct Effects {
    /// Extra headers for the client's 101.
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// The earliest `close-at` any policy set (seconds since the Unix epoch).
    pub close_at: Option<u64>,
    /// The named backend the last policy that picked one picked (checked against the API's).
    pub backend: Option<String>,
}

/// A policy's own refusal, checked.
#[derive(Debug)]
pub struct Rejection {
    pub plugin: String,
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// Why a policy failed the handshake.
#[derive(Debug)]
pub struct Failure {
    pub plugin: String,
    pub status: StatusCode,
    pub error: String,
}

/// Context names the gateway sets itself: no policy may set them, so `subscription.name`
/// always means a key the gateway checked.
const GATEWAY_CONTEXT: &[&str] = &["product.", "subscription."];

/// Why a decision may not set these context values, if it may not: a name of the gateway's,
/// or one already set (context values are write-once, so a policy that runs earlier cannot
/// pre-empt `jwt.sub` for the set-header that reads it later, nor a later one overwrite it).
fn context_clash(new: &[decision::Pair], have: &[(String, String)]) -> Option<String> {
    for (i, p) in new.iter().enumerate() {
        let name = p.name.escape_debug();
        if GATEWAY_CONTEXT.iter().any(|g| p.name.starts_with(g)) {
            return Some(format!(
                "set context value `{name}`: names under `product.` and `subscription.` are the gateway's"
            ));
        }
        if have.iter().any(|(k, _)| *k == p.name) || new[..i].iter().any(|o| o.name == p.name) {
            return Some(format!(
                "set context value `{name}`, which is already set (context values are write-once)"
            ));
        }
    }
    None
}

/// The first capability `d` (with its `extras`) uses that `plugin` did not declare, with what
/// it did.
fn undeclared(
    plugin: &Plugin,
    d: &decision::Decision,
    extras: &super::Extras,
) -> Option<(Capability, &'static str)> {
    d.uses()
        .into_iter()
        .map(|(u, what)| {
            let c = match u {
                decision::Use::Reject => Capability::Reject,
                decision::Use::ModifyHeaders => Capability::ModifyHeaders,
                decision::Use::ModifyQuery => Capability::ModifyQuery,
                decision::Use::ModifyResponseHeaders => Capability::ModifyResponseHeaders,
                decision::Use::UseContext => Capability::UseContext,
            };
            (c, what)
        })
        .chain(
            extras
                .close_at
                .is_some()
                .then_some((Capability::LimitLifetime, "set a close-at deadline")),
        )
        .chain(
            extras
                .backend
                .is_some()
                .then_some((Capability::SelectBackend, "picked a backend")),
        )
        .find(|(c, _)| !plugin.declares(*c))
}

/// One attached policy.
pub struct Step {
    pub host: Arc<PolicyHost>,
    pub plugin: Arc<Plugin>,
    /// What the plugin's `configure` returned for this attachment.
    pub prepared: Arc<str>,
    /// The key sets its `configure` registered.
    pub key_sets: Arc<[Arc<super::key_sets::KeySet>]>,
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
    /// This attachment's call: its prepared config, budget, grants and instance strategy.
    fn call(&self) -> Call<'_> {
        Call {
            plugin: &self.plugin,
            prepared: &self.prepared,
            budget: self.budget,
            grants: &self.grants,
            pool: self.pool.as_ref(),
            key_sets: &self.key_sets,
        }
    }
}

/// How an attachment's plugin is instantiated for handshakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// A new instance per handshake.
    Fresh,
    /// Warm instances, each dropped after `max_uses` handshakes or a failed call.
    Pooled { max_uses: u64 },
}

/// One attachment as the policy host takes it: which plugin, with what config, budgets and
/// grants, where. The gateway makes these from its manifest; the host never sees the manifest.
#[derive(Debug, Clone)]
pub struct AttachmentSpec {
    pub scope: Scope,
    /// The plugin's declared name.
    pub plugin: String,
    /// The attachment's config, as JSON (what `configure` gets).
    pub config_json: String,
    pub budget: Budget,
    pub grants: Grants,
    pub instances: Instances,
    pub failure_status: StatusCode,
    /// Where the attachment is written, prefixed to errors about its plugin
    /// (``file:line:column: key `...` ``).
    pub location: String,
    /// The same for its config, prefixed to the plugin's refusal of it.
    pub config_location: String,
}

/// Why an attachment cannot be part of a chain; each names where it is written.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("{location}: plugin `{plugin}` (attached at {scope}) was not found in plugin_dir")]
    NotFound {
        location: String,
        plugin: String,
        scope: Scope,
    },
    #[error("{location}: {refusal}")]
    Refused {
        location: String,
        refusal: capabilities::Refusal,
    },
    #[error("{location}: plugin `{plugin}` (attached at {scope}) is a message policy (world message-policy); onHandshake takes handshake policies: attach it under [[apis.on_message]] instead")]
    WrongKind {
        location: String,
        plugin: String,
        scope: Scope,
    },
    /// The plugin refused its config, or its `configure` failed.
    #[error("{location}: {error}")]
    Config {
        location: String,
        error: PolicyError,
    },
}

/// Builds the chain of API `api` from its attachments in the order they run (global, then its
/// products', then its own); every problem is returned, worded for the operator.
pub fn build(
    host: &Arc<PolicyHost>,
    plugins: &HashMap<String, Arc<Plugin>>,
    api: &str,
    attachments: Vec<AttachmentSpec>,
    metrics: &Metrics,
) -> Result<Vec<Step>, Vec<ChainError>> {
    let mut steps = Vec::new();
    let mut errors = Vec::new();
    for att in attachments {
        let scope = att.scope.clone();
        let Some(plugin) = plugins.get(&att.plugin) else {
            errors.push(ChainError::NotFound {
                location: att.location,
                plugin: att.plugin,
                scope,
            });
            continue;
        };
        if plugin.kind() != super::PluginKind::Handshake {
            errors.push(ChainError::WrongKind {
                location: att.location,
                plugin: att.plugin,
                scope,
            });
            continue;
        }
        let skip = match capabilities::check(&plugin.name, &plugin.capabilities, &scope) {
            Verdict::Refuse(refusals) => {
                errors.extend(refusals.into_iter().map(|refusal| ChainError::Refused {
                    location: att.location.clone(),
                    refusal,
                }));
                continue;
            }
            Verdict::SkipAtRuntime(refusals) => {
                for r in &refusals {
                    tracing::warn!(event = "policy_skipped_at_load", api = %api, plugin = %plugin.name,
                        capability = %r.capability, scope = %scope,
                        "inherited policy declares a capability onHandshake does not support; it will be skipped for this WebSocket API");
                }
                true
            }
            Verdict::Run => false,
        };
        let budget = att.budget;
        let (prepared, key_sets): (Arc<str>, _) = if skip {
            (Arc::from(""), Arc::from([]))
        } else {
            // The plugin validates its config now, so bad config stops the start.
            match host.configure(plugin, &att.config_json, budget, &att.grants) {
                Ok(c) => (Arc::from(c.prepared), c.key_sets),
                Err(e) => {
                    errors.push(ChainError::Config {
                        location: att.config_location,
                        error: e,
                    });
                    continue;
                }
            }
        };
        let step_metrics = metrics.policy(
            api,
            &plugin.name,
            match scope {
                Scope::Global => "global",
                Scope::Product(_) => "product",
                Scope::Api(_) => "api",
            },
        );
        steps.push(Step {
            host: host.clone(),
            plugin: plugin.clone(),
            prepared,
            key_sets,
            budget,
            grants: att.grants,
            pool: match att.instances {
                Instances::Fresh => None,
                Instances::Pooled { max_uses } => {
                    Some(InstancePool::new(max_uses, step_metrics.idle.clone()))
                }
            },
            failure_status: att.failure_status,
            metrics: step_metrics,
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

/// Runs the chain on `request`. Each proceeding policy's changes are applied to the backend
/// request's `headers` and `target` (path and query) as it decides, and to `request`, so the
/// next policy sees them. `has_backend` says whether the API has a named backend of that name
/// (a policy may pick only those).
///
/// Each guest runs on a fiber inside the caller's task and yields to the runtime at every epoch
/// tick it runs across (10 ms), so a slow policy delays its own handshake, not the worker.
pub async fn run(
    steps: &[Step],
    request: Request,
    headers: &mut HeaderMap,
    target: &mut String,
    has_backend: &(dyn Fn(&str) -> bool + Sync),
) -> Outcome {
    run_keeping_request(steps, request, headers, target, has_backend)
        .await
        .0
}

/// [`run`], also returning the request as the last policy left it when the chain proceeded
/// (the bench feeds it to a step timed alone).
pub async fn run_keeping_request(
    steps: &[Step],
    mut request: Request,
    headers: &mut HeaderMap,
    target: &mut String,
    has_backend: &(dyn Fn(&str) -> bool + Sync),
) -> (Outcome, Option<Request>) {
    let mut effects = Effects::default();
    let api = request.api.clone();
    let received_at = request.received_at;
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
        let started = std::time::Instant::now();
        let called = step.host.handshake(step.call(), request).await;
        step.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        // Counted and logged as an error unless the decision turns out to be usable.
        let fail = |why: String| {
            step.metrics.error.inc();
            tracing::warn!(event = "policy_error", plugin = %name, api = %api, error = %why, "policy failed; handshake rejected");
            Outcome::Failed(Failure {
                plugin: name.clone(),
                status: step.failure_status,
                error: why,
            })
        };
        let (decided, back) = match called {
            Ok(r) => r,
            Err(e) => return (fail(e.to_string()), None),
        };
        request = back;
        let (decision, extras) = match decided {
            Ok(d) => d,
            Err(own) => {
                let why = format!(
                    "could not decide: {}",
                    super::truncated(own, super::MAX_LOG_MESSAGE_BYTES)
                );
                return (fail(why), None);
            }
        };
        if let Err(e) = decision.check_size() {
            return (fail(e.to_string()), None);
        }
        if let Some((capability, action)) = undeclared(&step.plugin, &decision, &extras) {
            let why = PolicyError::Undeclared {
                plugin: name.clone(),
                capability,
                action,
            };
            return (fail(why.to_string()), None);
        }
        match decision {
            decision::Decision::Reject(r) => {
                let r = match decision::rejection(r) {
                    Ok(r) => r,
                    Err(e) => return (fail(e.to_string()), None),
                };
                step.metrics.reject.inc();
                let rejection = Rejection {
                    plugin: name.clone(),
                    status: r.status,
                    headers: r.headers,
                    body: Bytes::from(r.body),
                };
                return (Outcome::Reject(rejection), None);
            }
            decision::Decision::Proceed(p) => {
                if let Some(name) = extras.backend {
                    if !has_backend(&name) {
                        let why = format!(
                            "picked backend `{}`, which this API does not have (its manifest `backends` lists the names a policy may pick)",
                            name.escape_debug()
                        );
                        return (fail(why), None);
                    }
                    effects.backend = Some(name);
                }
                if let Some(at) = extras.close_at {
                    if at <= received_at {
                        let why = format!(
                            "close-at {at} is not after the handshake's received-at {received_at}"
                        );
                        return (fail(why), None);
                    }
                    // Further than that is no deadline at all (a token that "never expires"):
                    // capped, so no clock arithmetic downstream can overflow.
                    let at = at.min(received_at.saturating_add(MAX_CLOSE_AT_AHEAD_SECS));
                    effects.close_at = Some(effects.close_at.map_or(at, |e| e.min(at)));
                }
                if let Some(why) = context_clash(&p.context, &request.context) {
                    return (fail(why), None);
                }
                match decision::apply(p, headers, target, &mut request) {
                    Ok(added) => effects.response_headers.extend(added),
                    Err(e) => return (fail(e.to_string()), None),
                }
                step.metrics.allow.inc();
            }
        }
    }
    (Outcome::Proceed(effects), Some(request))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(n: &str) -> decision::Pair {
        decision::Pair {
            name: n.into(),
            value: "v".into(),
        }
    }

    #[test]
    fn context_values_are_write_once_and_the_gateways_names_are_its_own() {
        let have = vec![
            ("product.name".to_owned(), "gold".to_owned()),
            ("jwt.sub".to_owned(), "ann".to_owned()),
        ];
        assert_eq!(context_clash(&[pair("tenant")], &have), None);
        for (new, says) in [
            (vec![pair("jwt.sub")], "already set"),
            (vec![pair("subscription.name")], "are the gateway's"),
            (vec![pair("product.tier")], "are the gateway's"),
            (vec![pair("a"), pair("a")], "already set"),
        ] {
            let why = context_clash(&new, &have).expect("refused");
            assert!(why.contains(says), "{why}");
        }
    }
}
