//! `set-backend-service`: sends the WebSocket handshake to one of the API's **named** backends
//! (the manifest's `backends`), picked per handshake from the context: API Management's
//! set-backend-service with `backend-id`, never with a URL. The policy names a backend; the
//! gateway checks the name against the manifest and refuses any other, so neither a client nor
//! a token can point the gateway at an address of its choice.
//!
//! ```toml
//! [[apis]]
//! name = "chat"
//! url_suffix = "chat"
//! backend = "wss://chat.example/"                 # used when no policy picks
//! backends = { eu = "wss://eu.chat.example/", us = "wss://us.chat.example/" }
//!
//! [[apis.on_handshake]]
//! plugin = "jwt-validate"                         # puts jwt.region into the context
//! # ...
//!
//! [[apis.on_handshake]]
//! plugin = "set-backend-service"
//! config = { backend_id = "{jwt.region}", default = "eu" }
//! ```

use serde::Deserialize;
use tollgate_sdk::{Capability, Decision, Policy, Proceed, Request};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The backend's name, or a template of context values (`"{jwt.region}"`,
    /// `"{subscription.name}"`).
    pub backend_id: String,
    /// The name to use when `backend_id` comes out empty (the context value is missing);
    /// without it, such a handshake goes to the API's own `backend`.
    #[serde(default)]
    pub default: Option<String>,
}

/// What a backend name may be (the manifest's rule): 1 to 64 letters, digits, `-` or `_`.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The backend this handshake goes to: `None` for the API's own.
pub fn pick(config: &Config, request: &Request) -> Option<String> {
    let name = request.expand(&config.backend_id);
    let name = name.trim();
    if name.is_empty() {
        config.default.clone()
    } else {
        Some(name.to_owned())
    }
}

/// The exported policy.
pub struct SetBackendService;

impl Policy for SetBackendService {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] =
        &[Capability::UseContext, Capability::SelectBackend];

    fn check(c: &Config) -> Result<(), String> {
        if c.backend_id.trim().is_empty() {
            return Err("set-backend-service: `backend_id` must name a backend or hold a template such as \"{jwt.region}\"".into());
        }
        let literal = !c.backend_id.contains('{');
        if literal && !valid_name(c.backend_id.trim()) {
            return Err(format!(
                "set-backend-service: `{}` is not a backend name (1 to 64 letters, digits, `-` or `_`)",
                c.backend_id
            ));
        }
        if let Some(d) = &c.default {
            if !valid_name(d) {
                return Err(format!(
                    "set-backend-service: default `{d}` is not a backend name (1 to 64 letters, digits, `-` or `_`)"
                ));
            }
        }
        Ok(())
    }

    /// A name the API does not have is refused by the gateway (the attachment's
    /// `failure_status`, a `policy_error` record naming it), not here: the policy does not
    /// know the manifest.
    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        Ok(match pick(config, request) {
            Some(name) => Proceed::new().backend(name).into(),
            None => Decision::proceed(),
        })
    }
}

tollgate_sdk::export!(SetBackendService);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_sdk::testing::{handshake, request};

    fn picked(config: &str, region: Option<&str>) -> Option<String> {
        let mut r = request();
        if let Some(v) = region {
            r = r.context("jwt.region", v);
        }
        let d = handshake::<SetBackendService>(config, &r.build()).unwrap();
        d.proceeding().expect("proceeds").backend.clone()
    }

    #[test]
    fn the_template_picks_and_the_default_fills_in() {
        let c = r#"{"backend_id": "{jwt.region}", "default": "eu"}"#;
        assert_eq!(picked(c, Some("us")).as_deref(), Some("us"));
        assert_eq!(picked(c, None).as_deref(), Some("eu"));
        let no_default = r#"{"backend_id": "{jwt.region}"}"#;
        assert_eq!(picked(no_default, None), None, "the API's own backend");
        assert_eq!(
            picked(r#"{"backend_id": "asia"}"#, None).as_deref(),
            Some("asia")
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let err = |c: &str| SetBackendService::configure(c).unwrap_err();
        assert!(err(r#"{"backend_id": ""}"#).contains("backend_id"));
        assert!(err(r#"{"backend_id": "wss://evil.example/"}"#).contains("not a backend name"));
        assert!(err(r#"{"backend_id": "{jwt.region}", "default": "a b"}"#).contains("default"));
        assert!(err(r#"{"backend_id": "eu", "url": "x"}"#).contains("url"));
    }
}
