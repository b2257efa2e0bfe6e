//! `set-header`: sets, appends or deletes one header of the backend request, with API
//! Management's exists-action semantics. The value may reference context values set by earlier
//! policies: `"{jwt.sub}"` becomes the token's subject.
//!
//! ```toml
//! [[apis.on_handshake]]
//! plugin = "set-header"
//! config = { name = "X-User", value = "{jwt.sub}", exists_action = "override" }
//! ```

use serde::Deserialize;
use tollgate_sdk::{Capability, Decision, HeaderChange, Pair, Policy, Proceed, Request};

/// APIM's `exists-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExistsAction {
    /// Replace any existing value (the default).
    #[default]
    Override,
    /// Leave an existing header alone; set it only when absent.
    Skip,
    /// Add another value.
    Append,
    /// Remove the header.
    Delete,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub exists_action: ExistsAction,
}

impl Config {
    pub fn parse(json: &str) -> Result<Config, String> {
        let c: Config = serde_json::from_str(json).map_err(|e| format!("set-header: {e}"))?;
        if c.name.trim().is_empty() || c.name.bytes().any(|b| !b.is_ascii_graphic() || b == b':') {
            return Err(format!(
                "set-header: `{}` is not a valid header name",
                c.name
            ));
        }
        if c.exists_action != ExistsAction::Delete && c.value.contains(['\r', '\n']) {
            return Err("set-header: value must not contain line breaks".into());
        }
        Ok(c)
    }
}

/// The header change this config makes for this request, if any.
pub fn decide(config: &Config, request: &Request) -> Option<HeaderChange> {
    let pair = || {
        Pair::new(
            config.name.to_ascii_lowercase(),
            request.expand(&config.value),
        )
    };
    match config.exists_action {
        ExistsAction::Override => Some(HeaderChange::Set(pair())),
        // Only `skip` needs to know whether the header is there: the others never read it.
        ExistsAction::Skip if request.header(&config.name).is_some() => None,
        ExistsAction::Skip => Some(HeaderChange::Set(pair())),
        ExistsAction::Append => Some(HeaderChange::Append(pair())),
        ExistsAction::Delete => Some(HeaderChange::Remove(config.name.to_ascii_lowercase())),
    }
}

/// The exported policy. Natively it is only reached from the unit tests.
pub struct SetHeader;

impl Policy for SetHeader {
    type Config = Config;
    // `read-request` for `exists_action = "skip"`, `use-context` for templates.
    const CAPABILITIES: &'static [Capability] = &[
        Capability::ReadRequest,
        Capability::ModifyHeaders,
        Capability::UseContext,
    ];

    fn configure(config_json: &str) -> Result<String, String> {
        Config::parse(config_json)?;
        Ok(config_json.to_owned())
    }

    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        let mut proceed = Proceed::new();
        proceed.header_changes.extend(decide(config, request));
        Ok(proceed.into())
    }
}

tollgate_sdk::export!(SetHeader);

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], context: &[(&str, &str)]) -> Request<'static> {
        let mut r = tollgate_sdk::testing::request().path("/chat").api("chat");
        for (k, v) in headers {
            r = r.header(k, v);
        }
        for (k, v) in context {
            r = r.context(k, v);
        }
        r.build()
    }

    fn cfg(json: &str) -> Config {
        Config::parse(json).unwrap()
    }

    #[test]
    fn exists_actions() {
        let with = request(&[("x-user", "old")], &[("jwt.sub", "ann")]);
        let without = request(&[], &[("jwt.sub", "ann")]);
        let c = cfg(r#"{"name":"X-User","value":"{jwt.sub}","exists_action":"override"}"#);
        assert!(matches!(decide(&c, &with), Some(HeaderChange::Set(p)) if p.value == "ann"));
        let c = cfg(r#"{"name":"X-User","value":"v","exists_action":"skip"}"#);
        assert!(decide(&c, &with).is_none());
        assert!(matches!(decide(&c, &without), Some(HeaderChange::Set(_))));
        let c = cfg(r#"{"name":"X-User","value":"v","exists_action":"append"}"#);
        assert!(matches!(decide(&c, &with), Some(HeaderChange::Append(_))));
        let c = cfg(r#"{"name":"X-User","exists_action":"delete"}"#);
        assert!(matches!(decide(&c, &with), Some(HeaderChange::Remove(n)) if n == "x-user"));
    }

    #[test]
    fn policy_trait_round_trip() {
        let d = tollgate_sdk::testing::handshake::<SetHeader>(
            r#"{"name":"X-A","value":"{jwt.sub}"}"#,
            &request(&[], &[("jwt.sub", "bob")]),
        )
        .unwrap();
        let p = d.proceeding().expect("proceeds");
        assert!(
            matches!(&p.header_changes[..], [HeaderChange::Set(h)] if h.name == "x-a" && h.value == "bob")
        );
        assert!(SetHeader::configure(r#"{"name":"","value":"v"}"#).is_err());
    }

    #[test]
    fn templates_and_bad_config() {
        let r = request(&[], &[("jwt.sub", "ann"), ("tenant", "t1")]);
        assert_eq!(r.expand("{tenant}/{jwt.sub}/{missing}!"), "t1/ann/!");
        assert!(Config::parse(r#"{"name":"","value":"v"}"#).is_err());
        assert!(Config::parse(r#"{"name":"X","value":"v","exists_action":"sometimes"}"#).is_err());
        assert!(Config::parse(r#"{"name":"X","colour":"v"}"#).is_err());
    }
}
