//! A message policy for the message-scope tests: each text message says what to do with it.
//!
//! - `drop...`: dropped; `close:CODE:REASON`: the connection is closed with CODE and REASON;
//! - `upper:TEXT`: replaced by `UPPER:TEXT` in capitals; `big:N`: replaced by N bytes of `x`;
//! - `whoami`: replaced by the connection as the policy sees it (api, product, subscription,
//!   context, direction), one `key=value` per line;
//! - `count`: replaced by the number of calls this instance has served;
//! - `bad-utf8`: replaced by a byte that is not UTF-8 (the host must refuse it);
//! - `close:BADCODE:...` with a code a close frame may not carry;
//! - `trap`, `spin` (loops until stopped), `error` (cannot decide);
//! - anything else, and every binary message: forwarded as it came.
//!
//! With config `{"pass": true}` every message is forwarded without a look (a pass-through
//! policy: what the conformance suite and the benchmark run through).
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::sync::atomic::{AtomicU64, Ordering};

wit_bindgen::generate!({
    path: "../../../wit",
    world: "message-policy",
    generate_all,
});

use exports::tollgate::policy::message::Guest;
use tollgate::policy::message_types::{
    Capability, CloseConnection, Connection, Declaration, Direction, Kind, Message, MessageDecision,
};

static CALLS: AtomicU64 = AtomicU64::new(0);

struct MessageTest;

/// Whether the attachment says `"pass": true`; read once per instance (the prepared config
/// never changes for an instance).
fn pass_through() -> bool {
    static PASS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PASS.get_or_init(|| {
        tollgate::policy::config::prepared()
            .replace(' ', "")
            .contains("\"pass\":true")
    })
}

fn replace(text: String) -> MessageDecision {
    MessageDecision::Replace(text.into_bytes())
}

impl Guest for MessageTest {
    fn declare() -> Declaration {
        Declaration {
            name: "message-test".into(),
            version: "0.1.0".into(),
            capabilities: vec![
                Capability::ReplaceMessages,
                Capability::DropMessages,
                Capability::CloseConnections,
                Capability::UseContext,
            ],
        }
    }

    fn configure(config_json: String) -> Result<String, String> {
        Ok(config_json)
    }

    fn on_message(connection: Connection, message: Message) -> Result<MessageDecision, String> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        if message.kind == Kind::Binary || pass_through() {
            return Ok(MessageDecision::Forward);
        }
        let text = String::from_utf8(message.payload).map_err(|_| "text is not UTF-8")?;
        if text.starts_with("drop") {
            return Ok(MessageDecision::Drop);
        }
        if let Some(rest) = text.strip_prefix("close:") {
            let (code, reason) = rest.split_once(':').unwrap_or((rest, ""));
            return Ok(MessageDecision::Close(CloseConnection {
                code: code.parse().map_err(|_| "bad close code")?,
                reason: reason.into(),
            }));
        }
        if let Some(rest) = text.strip_prefix("upper:") {
            return Ok(replace(format!("UPPER:{}", rest.to_uppercase())));
        }
        if let Some(n) = text.strip_prefix("big:") {
            let n: usize = n.parse().map_err(|_| "bad size")?;
            return Ok(MessageDecision::Replace(vec![b'x'; n]));
        }
        match text.as_str() {
            "whoami" => {
                let mut out = format!(
                    "id={}\napi={}\nproduct={}\nsubscription={}\ndirection={}\n",
                    connection.id,
                    connection.api,
                    connection.product.as_deref().unwrap_or("-"),
                    connection.subscription.as_deref().unwrap_or("-"),
                    match message.direction {
                        Direction::Client => "client",
                        Direction::Backend => "backend",
                    }
                );
                for p in &connection.context {
                    out.push_str(&format!("{}={}\n", p.name, p.value));
                }
                Ok(replace(out))
            }
            "count" => Ok(replace(calls.to_string())),
            "bad-utf8" => Ok(MessageDecision::Replace(vec![0xff])),
            "trap" => panic!("asked to trap"),
            "spin" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "error" => Err("asked to fail".into()),
            _ => Ok(MessageDecision::Forward),
        }
    }
}

#[cfg(target_arch = "wasm32")]
export!(MessageTest);
