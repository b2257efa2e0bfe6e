//! Example custom policy: a multi-tenant chat serves `/chat/{tenant}/...`, and a client may only
//! open a WebSocket into its own tenant. jwt-validate runs first and puts the token's claims
//! into the context; this policy compares the claim with the path segment, rejects a mismatch
//! with 403, and tells the backend which tenant it is talking to.
//!
//! ```toml
//! [[apis.on_handshake]]
//! plugin = "tenant-check"
//! config = { claim = "jwt.tenant", segment = 1, header = "X-Tenant" }
//! ```
//!
//! Build: `cargo build --release --target wasm32-wasip2 -p tenant-check`, then copy
//! `target/wasm32-wasip2/release/tenant_check.wasm` into the gateway's `plugin_dir`.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use serde::Deserialize;
use tollgate_sdk::host::{self, Level};
use tollgate_sdk::{Capability, Decision, Policy, Proceed, Rejection, Request};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Context value holding the caller's tenant (set by an earlier policy).
    pub claim: String,
    /// Which path segment names the tenant: `/chat/acme/room` has `chat` at 0, `acme` at 1.
    pub segment: usize,
    /// Header that carries the checked tenant to the backend (optional).
    #[serde(default)]
    pub header: Option<String>,
}

fn forbidden(why: &str) -> Decision {
    host::log(Level::Info, why);
    Rejection::new(403, "Forbidden: not your tenant").into()
}

/// The decision for one handshake.
pub fn decide(c: &Config, request: &Request) -> Decision {
    let path = request.path();
    let Some(wanted) = path.split('/').filter(|s| !s.is_empty()).nth(c.segment) else {
        return forbidden("no tenant segment in the path");
    };
    let Some(own) = request.context(&c.claim) else {
        return forbidden(&format!(
            "no `{}` in the context (is jwt-validate attached first?)",
            c.claim
        ));
    };
    if own != wanted {
        return forbidden(&format!("tenant `{own}` asked for tenant `{wanted}`"));
    }
    match &c.header {
        Some(h) => Proceed::new()
            .set_header(h.to_ascii_lowercase(), own)
            .into(),
        None => Decision::proceed(),
    }
}

struct TenantCheck;

impl Policy for TenantCheck {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] = &[
        Capability::ReadRequest,
        Capability::UseContext,
        Capability::ModifyHeaders,
        Capability::Reject,
    ];

    fn check(c: &Config) -> Result<(), String> {
        if c.claim.is_empty() {
            return Err(
                "tenant-check: `claim` must name a context value, e.g. \"jwt.tenant\"".into(),
            );
        }
        Ok(())
    }

    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        Ok(decide(config, request))
    }
}

tollgate_sdk::export!(TenantCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_sdk::testing::{request, take_logs};
    use tollgate_sdk::HeaderChange;

    fn cfg() -> Config {
        serde_json::from_str(r#"{"claim":"jwt.tenant","segment":1,"header":"X-Tenant"}"#).unwrap()
    }

    #[test]
    fn own_tenant_passes_with_the_header() {
        let r = request()
            .path("/chat/acme/lobby")
            .context("jwt.tenant", "acme")
            .build();
        let Decision::Proceed(p) = decide(&cfg(), &r) else {
            panic!("rejected: {:?}", take_logs())
        };
        assert!(
            matches!(&p.header_changes[..], [HeaderChange::Set(h)] if h.name == "x-tenant" && h.value == "acme")
        );
    }

    #[test]
    fn other_tenant_missing_claim_and_short_path_are_forbidden() {
        for r in [
            request()
                .path("/chat/globex/lobby")
                .context("jwt.tenant", "acme")
                .build(),
            request().path("/chat/acme").build(),
            request()
                .path("/chat")
                .context("jwt.tenant", "acme")
                .build(),
        ] {
            assert!(matches!(decide(&cfg(), &r), Decision::Reject(x) if x.status == 403));
        }
        let logs = take_logs();
        assert!(
            logs[0]
                .1
                .contains("tenant `acme` asked for tenant `globex`"),
            "{logs:?}"
        );
    }

    #[test]
    fn bad_config_is_refused_with_a_message() {
        assert!(TenantCheck::configure(r#"{"claim":"","segment":1}"#)
            .unwrap_err()
            .contains("claim"));
        assert!(TenantCheck::configure(r#"{"claim":"x"}"#)
            .unwrap_err()
            .contains("segment"));
    }
}
