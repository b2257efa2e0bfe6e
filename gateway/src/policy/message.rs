//! Message policies: components of the `message-policy` world (`wit/policy.wit`), attached to an
//! API's messages with `[[apis.on_message]]`, called by the relay with every whole data message
//! of the directions they watch.
//!
//! They share the handshake policies' host: the same engine, linker, pooling allocator, CPU
//! time by epochs, memory cap, wall-clock deadline and deny-by-default WASI. What differs is
//! the call: the connection (its API, product, subscription and the handshake's context) and
//! the message go in by value, a [`Judged`] comes out. A chain of message policies runs in the
//! manifest's order; a replaced payload is what the next policy sees.

use std::sync::Arc;
use std::time::Instant;

use super::{Budget, Grants, InstancePool, Plugin, PluginKind, PolicyError, PolicyHost};
use super::{Call, Instance};
use crate::metrics::Metrics;

mod bindings {
    // As the handshake bindings: exports called asynchronously (the guest runs on a fiber
    // inside the connection's task), imports trappable. The interfaces both worlds import are
    // the handshake bindings' own, so one linker serves both.
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "message-policy",
        exports: { default: async },
        imports: { default: trappable },
        with: {
            "tollgate:policy/types": crate::policy::bindings::tollgate::policy::types,
            "tollgate:policy/config": crate::policy::bindings::tollgate::policy::config,
            "tollgate:policy/log": crate::policy::bindings::tollgate::policy::log,
        },
    });
}

use bindings::tollgate::policy::message_types as wit;
pub(super) use bindings::{MessagePolicy, MessagePolicyPre};

/// The export that makes a component a message policy.
pub(super) const EXPORT: &str = "tollgate:policy/message@0.2.0";

/// What a message policy may declare: the WIT's `message-types.capability`, as the host's own
/// type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageCapability {
    ReplaceMessages,
    DropMessages,
    CloseConnections,
    UseContext,
}

impl MessageCapability {
    /// Every capability, in the WIT's order.
    pub const ALL: [MessageCapability; 4] = [
        MessageCapability::ReplaceMessages,
        MessageCapability::DropMessages,
        MessageCapability::CloseConnections,
        MessageCapability::UseContext,
    ];

    /// The name as the WIT spells it.
    pub fn name(self) -> &'static str {
        match self {
            MessageCapability::ReplaceMessages => "replace-messages",
            MessageCapability::DropMessages => "drop-messages",
            MessageCapability::CloseConnections => "close-connections",
            MessageCapability::UseContext => "use-context",
        }
    }
}

impl std::fmt::Display for MessageCapability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

pub(super) fn capability(c: wit::Capability) -> MessageCapability {
    match c {
        wit::Capability::ReplaceMessages => MessageCapability::ReplaceMessages,
        wit::Capability::DropMessages => MessageCapability::DropMessages,
        wit::Capability::CloseConnections => MessageCapability::CloseConnections,
        wit::Capability::UseContext => MessageCapability::UseContext,
    }
}

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Backend,
}

impl Sender {
    pub fn as_str(self) -> &'static str {
        match self {
            Sender::Client => "client",
            Sender::Backend => "backend",
        }
    }
}

/// Which senders' messages an attachment sees (`direction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watches {
    pub client: bool,
    pub backend: bool,
}

impl Watches {
    pub fn sees(self, s: Sender) -> bool {
        match s {
            Sender::Client => self.client,
            Sender::Backend => self.backend,
        }
    }
}

/// The connection as every message policy call sees it: built once per connection, with its
/// context values (for policies that declare `use-context`) and without.
pub struct Connection {
    full: wit::Connection,
    bare: wit::Connection,
}

impl Connection {
    pub fn new(
        id: u64,
        api: &str,
        product: Option<&str>,
        subscription: Option<&str>,
        context: &[(String, String)],
    ) -> Connection {
        let bare = wit::Connection {
            id,
            api: api.to_owned(),
            product: product.map(str::to_owned),
            subscription: subscription.map(str::to_owned),
            context: Vec::new(),
        };
        let full = wit::Connection {
            context: context
                .iter()
                .map(|(name, value)| super::wit_types::Pair {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            ..bare.clone()
        };
        Connection { full, bare }
    }

    /// The gateway's number for the connection (`conn` of its log records).
    pub fn id(&self) -> u64 {
        self.bare.id
    }

    pub fn api(&self) -> &str {
        &self.bare.api
    }

    /// The handshake's context values (a binary upgrade hands them over with the connection).
    pub fn context(&self) -> Vec<(String, String)> {
        self.full
            .context
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect()
    }

    /// The connection as a policy that declared `declared` may see it: the context values
    /// only with `use-context`.
    fn seen_by(&self, declared: &[MessageCapability]) -> &wit::Connection {
        if declared.contains(&MessageCapability::UseContext) {
            &self.full
        } else {
            &self.bare
        }
    }
}

/// What the chain of message policies made of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Judged {
    /// Every policy forwarded it unchanged: its original frames go on.
    Forward,
    /// A policy replaced the payload (the last replacement is sent, in frames of at most the
    /// API's `max_frame_size`); `plugin` made the last replacement (the console names it).
    Replace { plugin: Arc<str>, payload: Vec<u8> },
    /// A policy dropped it (the console names it).
    Drop { plugin: Arc<str> },
    /// A policy closed the connection: the sender gets `code` and `reason`.
    Close {
        plugin: Arc<str>,
        code: u16,
        reason: String,
    },
    /// A policy could not decide, or decided what it may not: the connection is closed 1011.
    Failed { plugin: Arc<str>, error: String },
}

/// One attached message policy.
pub struct MessageStep {
    pub host: Arc<PolicyHost>,
    pub plugin: Arc<Plugin>,
    /// Its name, shared with the verdicts that name it.
    name: Arc<str>,
    pub prepared: Arc<str>,
    pub budget: Budget,
    pub grants: Grants,
    pub pool: Option<InstancePool>,
    pub watches: Watches,
    /// Calls by decision (`outcome` = forward, replace, drop, close, error) and durations,
    /// `scope` = `message`.
    pub metrics: MessagePolicyMetrics,
}

/// The `tollgate_policy_*` series of one message policy attachment.
pub struct MessagePolicyMetrics {
    pub forward: prometheus_client::metrics::counter::Counter,
    pub replace: prometheus_client::metrics::counter::Counter,
    pub drop: prometheus_client::metrics::counter::Counter,
    pub close: prometheus_client::metrics::counter::Counter,
    pub error: prometheus_client::metrics::counter::Counter,
    pub duration: prometheus_client::metrics::histogram::Histogram,
    pub idle: prometheus_client::metrics::gauge::Gauge,
}

impl MessagePolicyMetrics {
    fn new(m: &Metrics, api: &str, plugin: &str) -> MessagePolicyMetrics {
        let (duration, idle) = m.policy_timing(api, plugin, "message");
        MessagePolicyMetrics {
            forward: m.policy_outcome(api, plugin, "message", "forward"),
            replace: m.policy_outcome(api, plugin, "message", "replace"),
            drop: m.policy_outcome(api, plugin, "message", "drop"),
            close: m.policy_outcome(api, plugin, "message", "close"),
            error: m.policy_outcome(api, plugin, "message", "error"),
            duration,
            idle,
        }
    }
}

/// One `[[apis.on_message]]` attachment as the host takes it.
#[derive(Debug, Clone)]
pub struct MessageAttachmentSpec {
    pub plugin: String,
    pub config_json: String,
    pub budget: Budget,
    pub grants: Grants,
    pub instances: super::Instances,
    pub watches: Watches,
    pub location: String,
    pub config_location: String,
}

/// Builds an API's message policies, in the manifest's order; every problem is returned,
/// worded for the operator.
pub fn build(
    host: &Arc<PolicyHost>,
    plugins: &std::collections::HashMap<String, Arc<Plugin>>,
    api: &str,
    attachments: Vec<MessageAttachmentSpec>,
    metrics: &Metrics,
) -> Result<Vec<MessageStep>, Vec<String>> {
    let mut steps = Vec::new();
    let mut errors = Vec::new();
    for att in attachments {
        let Some(plugin) = plugins.get(&att.plugin) else {
            errors.push(format!(
                "{}: plugin `{}` (attached to API `{api}`'s messages) was not found in plugin_dir",
                att.location, att.plugin
            ));
            continue;
        };
        if plugin.kind() != PluginKind::Message {
            errors.push(format!(
                "{}: plugin `{}` is a handshake policy (world handshake-policy); [[apis.on_message]] takes message policies (world message-policy): attach it under [[apis.on_handshake]] instead",
                att.location, plugin.name
            ));
            continue;
        }
        let prepared = match host.configure(plugin, &att.config_json, att.budget, &att.grants) {
            Ok(c) => Arc::<str>::from(c.prepared),
            Err(e) => {
                errors.push(format!("{}: {e}", att.config_location));
                continue;
            }
        };
        let metrics = MessagePolicyMetrics::new(metrics, api, &plugin.name);
        steps.push(MessageStep {
            host: host.clone(),
            name: Arc::from(plugin.name.as_str()),
            plugin: plugin.clone(),
            prepared,
            budget: att.budget,
            grants: att.grants,
            pool: match att.instances {
                super::Instances::Fresh => None,
                super::Instances::Pooled { max_uses } => {
                    Some(InstancePool::new(max_uses, metrics.idle.clone()))
                }
            },
            watches: att.watches,
            metrics,
        });
    }
    if errors.is_empty() {
        Ok(steps)
    } else {
        Err(errors)
    }
}

/// Whether a message policy's close frame may carry `code`: what RFC 6455 lets a server send
/// for a reason a policy can have (not 1002, which only the protocol's own checks send, nor
/// 1010, a client's).
pub fn policy_close_code(code: u16) -> bool {
    matches!(
        code,
        1000 | 1001 | 1003 | 1007 | 1008 | 1009 | 1011 | 3000..=4999
    )
}

/// Longest close reason a close frame can carry.
const MAX_CLOSE_REASON: usize = 123;

/// Runs the API's message policies that watch `sender` on one message. `max_size` bounds a
/// replacement (the API's `max_inspected_message_size`).
pub async fn judge(
    steps: &[MessageStep],
    connection: &Connection,
    sender: Sender,
    text: bool,
    payload: Vec<u8>,
    max_size: usize,
) -> Judged {
    let mut message = wit::Message {
        direction: match sender {
            Sender::Client => wit::Direction::Client,
            Sender::Backend => wit::Direction::Backend,
        },
        kind: if text {
            wit::Kind::Text
        } else {
            wit::Kind::Binary
        },
        payload,
    };
    let mut replaced: Option<Arc<str>> = None;
    for step in steps.iter().filter(|s| s.watches.sees(sender)) {
        let seen = connection.seen_by(&step.plugin.message_capabilities);
        // Waiting for a call slot is not the policy's time.
        let Ok(_slot) = step.host.message_calls.acquire().await else {
            return Judged::Failed {
                plugin: step.name.clone(),
                error: "the gateway is shutting down".into(),
            };
        };
        let started = Instant::now();
        let called = step.host.message(step.call(), seen, &message).await;
        step.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let fail = |error: String| {
            step.metrics.error.inc();
            Judged::Failed {
                plugin: step.name.clone(),
                error,
            }
        };
        let decision = match called {
            Ok(Ok(d)) => d,
            Ok(Err(own)) => {
                return fail(format!(
                    "could not decide: {}",
                    super::truncated(own, super::MAX_LOG_MESSAGE_BYTES)
                ))
            }
            Err(e) => return fail(e.to_string()),
        };
        let need = |c: MessageCapability, what: &'static str| {
            if step.plugin.message_capabilities.contains(&c) {
                Ok(())
            } else {
                Err(PolicyError::UndeclaredMessage {
                    plugin: step.plugin.name.clone(),
                    capability: c,
                    action: what,
                }
                .to_string())
            }
        };
        match decision {
            wit::MessageDecision::Forward => {
                step.metrics.forward.inc();
            }
            wit::MessageDecision::Replace(p) => {
                if let Err(e) = need(MessageCapability::ReplaceMessages, "replaced a message") {
                    return fail(e);
                }
                if p.len() > max_size {
                    return fail(format!(
                        "replaced a message with {} bytes, more than the API's max_inspected_message_size ({max_size})",
                        p.len()
                    ));
                }
                if text && std::str::from_utf8(&p).is_err() {
                    return fail("replaced a text message with bytes that are not UTF-8".into());
                }
                step.metrics.replace.inc();
                message.payload = p;
                replaced = Some(step.name.clone());
            }
            wit::MessageDecision::Drop => {
                if let Err(e) = need(MessageCapability::DropMessages, "dropped a message") {
                    return fail(e);
                }
                step.metrics.drop.inc();
                return Judged::Drop {
                    plugin: step.name.clone(),
                };
            }
            wit::MessageDecision::Close(c) => {
                if let Err(e) = need(MessageCapability::CloseConnections, "closed a connection") {
                    return fail(e);
                }
                if !policy_close_code(c.code) {
                    return fail(format!(
                        "closed a connection with code {}, which a gateway may not send (1000, 1001, 1003, 1007-1009, 1011, 3000-4999)",
                        c.code
                    ));
                }
                if c.reason.len() > MAX_CLOSE_REASON {
                    return fail(format!(
                        "closed a connection with a reason of {} bytes (at most {MAX_CLOSE_REASON})",
                        c.reason.len()
                    ));
                }
                step.metrics.close.inc();
                return Judged::Close {
                    plugin: step.name.clone(),
                    code: c.code,
                    reason: c.reason,
                };
            }
        }
    }
    match replaced {
        Some(plugin) => Judged::Replace {
            plugin,
            payload: message.payload,
        },
        None => Judged::Forward,
    }
}

impl MessageStep {
    fn call(&self) -> Call<'_> {
        Call {
            plugin: &self.plugin,
            prepared: &self.prepared,
            budget: self.budget,
            grants: &self.grants,
            pool: self.pool.as_ref(),
            key_sets: &NO_KEY_SETS,
        }
    }
}

static NO_KEY_SETS: std::sync::LazyLock<Arc<[Arc<super::key_sets::KeySet>]>> =
    std::sync::LazyLock::new(|| Arc::from([]));

impl PolicyHost {
    /// Runs `on-message`, as [`PolicyHost::handshake`] runs `on-handshake`: in a fresh instance
    /// or a warm one of the pool, within the call's CPU time, memory and deadline.
    async fn message(
        &self,
        call: Call<'_>,
        connection: &wit::Connection,
        message: &wit::Message,
    ) -> Result<Result<wit::MessageDecision, String>, PolicyError> {
        tokio::time::timeout(
            call.budget.timeout,
            self.message_call(call, connection, message),
        )
        .await
        .map_err(|_| call.plugin.timeout(call.budget.timeout))?
    }

    async fn message_call(
        &self,
        call: Call<'_>,
        connection: &wit::Connection,
        message: &wit::Message,
    ) -> Result<Result<wit::MessageDecision, String>, PolicyError> {
        let plugin = call.plugin;
        let mut w = self.warm(call).await?;
        w.uses += 1;
        let state = w.store.data_mut();
        state.start_call();
        state.deadline = Some(std::time::Instant::now() + call.budget.timeout);
        let Instance::Message(instance) = &w.instance else {
            return Err(plugin.call_error("is not a message policy".into()));
        };
        // On a trap `w` is dropped here, never returned to the pool.
        let decided = instance
            .tollgate_policy_message()
            .call_on_message(&mut w.store, connection, message)
            .await
            .map_err(|e| plugin.call_failed(&w.store, "on-message", e))?;
        if let Some(pool) = call.pool {
            pool.give_back(w);
        }
        Ok(decided)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's list of message capabilities is the WIT's, in its order.
    #[test]
    fn wit_message_capability_enum_matches_the_hosts() {
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/policy.wit");
        let mut resolve = wit_parser::Resolve::default();
        let pkg = resolve.push_file(&wit).expect("wit/policy.wit parses");
        let iface = resolve.packages[pkg].interfaces["message-types"];
        let ty = resolve.interfaces[iface].types["capability"];
        let wit_parser::TypeDefKind::Enum(e) = &resolve.types[ty].kind else {
            panic!("capability is not an enum")
        };
        let in_wit: Vec<&str> = e.cases.iter().map(|c| c.name.as_str()).collect();
        let in_host: Vec<&str> = MessageCapability::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(in_wit, in_host);
        assert!(resolve
            .worlds
            .iter()
            .any(|(_, w)| w.name == "message-policy"));
    }

    /// The handshake's context reaches only policies that declared `use-context`.
    #[test]
    fn context_values_only_with_use_context() {
        let ctx = [("jwt.sub".to_owned(), "ann".to_owned())];
        let c = Connection::new(7, "chat", Some("gold"), Some("alice"), &ctx);
        let bare = c.seen_by(&[MessageCapability::ReplaceMessages]);
        assert!(bare.context.is_empty());
        assert_eq!(
            (bare.id, &*bare.api, bare.subscription.as_deref()),
            (7, "chat", Some("alice"))
        );
        let full = c.seen_by(&[MessageCapability::UseContext]);
        assert_eq!(full.context.len(), 1);
        assert_eq!(
            (&*full.context[0].name, &*full.context[0].value),
            ("jwt.sub", "ann")
        );
    }

    /// A policy's close may carry only what a server may send for a reason of its own.
    #[test]
    fn a_policys_close_codes() {
        for ok in [1000, 1001, 1003, 1007, 1008, 1009, 1011, 3000, 4999] {
            assert!(policy_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1002, 1004, 1005, 1006, 1010, 1012, 1015, 2999, 5000] {
            assert!(!policy_close_code(bad), "{bad}");
        }
    }
}
