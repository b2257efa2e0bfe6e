//! `json-schema-validate`: a message policy under which every message must be JSON matching a
//! JSON Schema (draft 2020-12 unless the schema's `$schema` names another draft). A message
//! that is not JSON, or does not match, closes the connection with 1007 (invalid payload) to
//! its sender, or, with `action = "drop"`, is not forwarded.
//!
//! ```toml
//! [[apis.on_message]]
//! plugin = "json-schema-validate"
//! direction = "client"
//! instances = "pooled"
//! [apis.on_message.config]
//! action = "close"
//! schema = { type = "object", required = ["type"], properties = { type = { enum = ["chat", "typing"] } } }
//! ```
//!
//! The schema is compiled once per instance (and once at load, so a bad schema stops the
//! start with the validator's message). Remote `$ref`s are not fetched: a schema refers only
//! to itself.
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

/// What happens to a message that does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Close 1007 to the sender (the default).
    Close,
    /// Not forwarded; the connection goes on.
    Drop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    schema: Value,
    #[serde(default = "close")]
    action: Action,
}

fn close() -> Action {
    Action::Close
}

/// An attachment's config, its schema compiled.
pub struct Config {
    validator: jsonschema::Validator,
    action: Action,
}

/// Parses an attachment's config and compiles its schema (draft 2020-12 by default).
pub fn parse_config(json: &str) -> Result<Config, String> {
    let raw: RawConfig = serde_json::from_str(json).map_err(|e| format!("config: {e}"))?;
    let validator = if raw.schema.get("$schema").is_some() {
        jsonschema::validator_for(&raw.schema)
    } else {
        jsonschema::draft202012::new(&raw.schema)
    }
    .map_err(|e| format!("config: schema: {e}"))?;
    Ok(Config {
        validator,
        action: raw.action,
    })
}

/// Why a message is refused (for the close reason: at most 123 bytes), or `None` when it
/// matches.
pub fn check(config: &Config, kind: Kind, payload: &[u8]) -> Option<String> {
    if kind == Kind::Binary {
        return Some("binary message where JSON is expected".into());
    }
    let Ok(doc) = serde_json::from_slice::<Value>(payload) else {
        return Some("message is not JSON".into());
    };
    // The quick yes/no first: `iter_errors` gathers every error before the first is read,
    // which a hostile array of many bad items would make costly.
    if config.validator.is_valid(&doc) {
        return None;
    }
    let error = config.validator.validate(&doc).err()?;
    let path = error.instance_path().to_string();
    let mut reason = format!(
        "message does not match the schema at {}",
        if path.is_empty() { "/" } else { &path }
    );
    if reason.len() > 123 {
        let mut cut = 120;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
        reason.push_str("...");
    }
    Some(reason)
}

/// The attachment's config, parsed and compiled once per instance.
fn config() -> Result<&'static Config, String> {
    static CONFIG: std::sync::OnceLock<Result<Config, String>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| parse_config(&tollgate::policy::config::prepared()))
        .as_ref()
        .map_err(Clone::clone)
}

struct JsonSchemaValidate;

impl exports::tollgate::policy::message::Guest for JsonSchemaValidate {
    fn declare() -> Declaration {
        Declaration {
            name: "json-schema-validate".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            capabilities: vec![Capability::DropMessages, Capability::CloseConnections],
        }
    }

    fn configure(config_json: String) -> Result<String, String> {
        parse_config(&config_json).map(|_| config_json)
    }

    fn on_message(_: Connection, message: Message) -> Result<MessageDecision, String> {
        let config = config()?;
        Ok(match check(config, message.kind, &message.payload) {
            None => MessageDecision::Forward,
            Some(_) if config.action == Action::Drop => MessageDecision::Drop,
            Some(reason) => MessageDecision::Close(CloseConnection { code: 1007, reason }),
        })
    }
}

#[cfg(target_arch = "wasm32")]
export!(JsonSchemaValidate);

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"schema": {"type": "object", "required": ["type"],
        "properties": {"type": {"enum": ["chat", "typing"]}, "n": {"type": "integer"}}}}"#;

    #[test]
    fn matching_messages_pass_and_others_say_where() {
        let c = parse_config(SCHEMA).unwrap();
        assert_eq!(check(&c, Kind::Text, br#"{"type":"chat","n":1}"#), None);
        assert_eq!(
            check(&c, Kind::Text, br#"{"type":"chat","n":"one"}"#).as_deref(),
            Some("message does not match the schema at /n")
        );
        assert_eq!(
            check(&c, Kind::Text, br#"{"n":1}"#).as_deref(),
            Some("message does not match the schema at /")
        );
        assert_eq!(
            check(&c, Kind::Text, b"{").as_deref(),
            Some("message is not JSON")
        );
        assert!(check(&c, Kind::Binary, b"{}").is_some());
    }

    #[test]
    fn the_close_reason_fits_a_close_frame() {
        let c = parse_config(r#"{"schema": {"properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "string"}}}"#).unwrap();
        let long = format!(r#"{{"{}": 1}}"#, "k".repeat(300));
        let r = check(&c, Kind::Text, long.as_bytes()).unwrap();
        assert!(r.len() <= 123, "{}", r.len());
    }

    #[test]
    fn a_bad_schema_or_config_is_refused_with_a_reason() {
        for (bad, says) in [
            (r#"{"schema": {"type": 5}}"#, "schema"),
            (r#"{"schema": {}, "action": "ignore"}"#, "unknown variant"),
            (r#"{"action": "drop"}"#, "missing field `schema`"),
        ] {
            let e = parse_config(bad).err().unwrap();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
