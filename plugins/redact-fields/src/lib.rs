//! `redact-fields`: a message policy that masks or removes fields of JSON messages before the
//! other side sees them, e.g. a card number a client sends that the backend must never log, or
//! an internal field a backend leaks to browsers.
//!
//! ```toml
//! [[apis.on_message]]
//! plugin = "redact-fields"
//! direction = "client"
//! instances = "pooled"
//! config = { fields = ["/card/number", "/password"], action = "mask", mask = "***" }
//! ```
//!
//! `fields` are JSON pointers (RFC 6901: `/a/b`, `~1` for `/`, `~0` for `~`; `/items/0/x`
//! indexes arrays). A message that is JSON and holds none of them is forwarded as it came (its
//! bytes untouched); one that holds some is forwarded re-serialised with them masked (the value
//! replaced by `mask`, default `"***"`) or removed (`action = "remove"`). A message this policy
//! cannot read as JSON (or a binary one) is handled as `on_invalid` says: `drop` (the default:
//! what cannot be redacted does not pass), `close` (1007, invalid payload, to its sender) or
//! `forward` (as it came: anything serde_json refuses and a lenient receiver accepts, such as
//! nesting deeper than 128 or a lone surrogate escape, then passes unredacted).
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use serde::Deserialize;
use serde_json::Value;

wit_bindgen::generate!({
    path: "../../wit",
    world: "message-policy",
    generate_all,
});

use tollgate::policy::message_types::{
    Capability, CloseConnection, Connection, Declaration, Kind, Message, MessageDecision,
};

/// What to do with a field that is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Mask,
    Remove,
}

/// What to do with a message that is not JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    Forward,
    Drop,
    Close,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub fields: Vec<String>,
    #[serde(default = "mask_action")]
    pub action: Action,
    #[serde(default = "default_mask")]
    pub mask: String,
    #[serde(default = "drop")]
    pub on_invalid: OnInvalid,
}

fn mask_action() -> Action {
    Action::Mask
}
fn default_mask() -> String {
    "***".into()
}
fn drop() -> OnInvalid {
    OnInvalid::Drop
}

/// Parses and checks an attachment's config: at least one field, each a JSON pointer that
/// names something below the root (the whole message is not a field: drop it instead).
pub fn parse_config(json: &str) -> Result<Config, String> {
    let c: Config = serde_json::from_str(json).map_err(|e| format!("config: {e}"))?;
    if c.fields.is_empty() {
        return Err(
            "config: `fields` must list at least one JSON pointer (e.g. \"/password\")".into(),
        );
    }
    for f in &c.fields {
        if !f.starts_with('/') {
            return Err(format!(
                "config: `{f}` is not a JSON pointer below the root; write e.g. \"/card/number\""
            ));
        }
    }
    Ok(c)
}

/// What becomes of one message.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to redact: the message goes on as it came.
    Unchanged,
    /// The message with its fields redacted.
    Redacted(Vec<u8>),
    /// Not JSON.
    Invalid,
}

/// What a removed value is marked with until every pointer has been resolved: removing one
/// array element at once would shift the indexes the later pointers name.
const REMOVED: &str = "\u{0}tollgate:redact-fields:removed\u{0}";

/// Drops every object member and array element marked [`REMOVED`].
fn prune(v: &mut Value) {
    let removed = |v: &Value| v.as_str() == Some(REMOVED);
    match v {
        Value::Object(m) => {
            m.retain(|_, v| !removed(v));
            m.values_mut().for_each(prune);
        }
        Value::Array(a) => {
            a.retain(|v| !removed(v));
            a.iter_mut().for_each(prune);
        }
        _ => {}
    }
}

/// Redacts `payload` as `config` says. Every pointer is resolved against the message as it
/// came (RFC 6901, serde_json's reading of it), whatever the others name.
pub fn redact(config: &Config, payload: &[u8]) -> Outcome {
    let Ok(mut doc) = serde_json::from_slice::<Value>(payload) else {
        return Outcome::Invalid;
    };
    let mark = match config.action {
        Action::Mask => config.mask.as_str(),
        Action::Remove => REMOVED,
    };
    let mut changed = false;
    for f in &config.fields {
        if let Some(v) = doc.pointer_mut(f) {
            *v = Value::String(mark.to_owned());
            changed = true;
        }
    }
    if !changed {
        return Outcome::Unchanged;
    }
    if config.action == Action::Remove {
        prune(&mut doc);
    }
    match serde_json::to_vec(&doc) {
        Ok(v) => Outcome::Redacted(v),
        Err(_) => Outcome::Invalid,
    }
}

/// The attachment's config, parsed once per instance (it never changes for an instance).
fn config() -> Result<&'static Config, String> {
    static CONFIG: std::sync::OnceLock<Result<Config, String>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| parse_config(&tollgate::policy::config::prepared()))
        .as_ref()
        .map_err(Clone::clone)
}

struct RedactFields;

impl exports::tollgate::policy::message::Guest for RedactFields {
    fn declare() -> Declaration {
        Declaration {
            name: "redact-fields".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![
                Capability::ReplaceMessages,
                Capability::DropMessages,
                Capability::CloseConnections,
            ],
        }
    }

    fn configure(config_json: String) -> Result<String, String> {
        parse_config(&config_json).map(|_| config_json)
    }

    fn on_message(_: Connection, message: Message) -> Result<MessageDecision, String> {
        let config = config()?;
        let outcome = match message.kind {
            Kind::Binary => Outcome::Invalid,
            Kind::Text => redact(config, &message.payload),
        };
        Ok(match outcome {
            Outcome::Unchanged => MessageDecision::Forward,
            Outcome::Redacted(p) => MessageDecision::Replace(p),
            Outcome::Invalid => match config.on_invalid {
                OnInvalid::Forward => MessageDecision::Forward,
                OnInvalid::Drop => MessageDecision::Drop,
                OnInvalid::Close => MessageDecision::Close(CloseConnection {
                    code: 1007,
                    reason: "message is not JSON".into(),
                }),
            },
        })
    }
}

#[cfg(target_arch = "wasm32")]
export!(RedactFields);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> Config {
        parse_config(json).unwrap()
    }

    #[test]
    fn masks_what_is_there_and_leaves_the_rest_alone() {
        let c = cfg(r#"{"fields": ["/card/number", "/password", "/items/1/secret"]}"#);
        let out = redact(
            &c,
            br#"{"card":{"number":"4111","exp":"12/30"},"items":[{"secret":1},{"secret":2}],"n":1}"#,
        );
        let Outcome::Redacted(v) = out else {
            panic!("{out:?}")
        };
        let v: Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(v["card"]["number"], "***");
        assert_eq!(v["card"]["exp"], "12/30");
        assert_eq!(v["items"][0]["secret"], 1);
        assert_eq!(v["items"][1]["secret"], "***");
        assert_eq!(v["n"], 1);
        assert_eq!(redact(&c, br#"{"other": true}"#), Outcome::Unchanged);
        assert_eq!(redact(&c, b"not json"), Outcome::Invalid);
    }

    #[test]
    fn removes_object_members_and_array_elements_with_escaped_names() {
        let c = cfg(r#"{"fields": ["/a~1b", "/list/0", "/t~0x"], "action": "remove"}"#);
        let Outcome::Redacted(v) = redact(&c, br#"{"a/b":1,"list":[1,2],"t~x":3,"keep":4}"#) else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(v, serde_json::json!({"list": [2], "keep": 4}));
    }

    /// Removing `/items/0` must not shift `/items/1/secret` onto another element.
    #[test]
    fn removals_resolve_every_pointer_against_the_message_as_it_came() {
        let c = cfg(r#"{"fields": ["/items/0", "/items/1/secret"], "action": "remove"}"#);
        let Outcome::Redacted(v) = redact(
            &c,
            br#"{"items":[{"a":0},{"secret":1,"b":1},{"secret":2}]}"#,
        ) else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&v).unwrap();
        assert_eq!(v, serde_json::json!({"items": [{"b": 1}, {"secret": 2}]}));
        assert_eq!(cfg(r#"{"fields": ["/a"]}"#).on_invalid, OnInvalid::Drop);
    }

    #[test]
    fn a_config_without_pointers_is_refused_with_a_reason() {
        for (bad, says) in [
            (r#"{"fields": []}"#, "at least one"),
            (r#"{"fields": ["password"]}"#, "not a JSON pointer"),
            (r#"{"fields": ["/a"], "action": "hide"}"#, "unknown variant"),
            (r#"{"fields": ["/a"], "extra": 1}"#, "unknown field"),
        ] {
            let e = parse_config(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
