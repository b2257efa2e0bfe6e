//! A policy built against `tollgate:policy@0.1.0` (`wit/policy.wit` beside this crate is that
//! release's WIT, kept as it was): the gateway, which runs 0.2 policies, must refuse it at load
//! with a message naming 0.1.0, not with a confusing import error.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

wit_bindgen::generate!({
    path: "wit",
    world: "handshake-policy",
});

use exports::tollgate::policy::policy::Guest;
use tollgate::policy::types::{Decision, Declaration, HandshakeRequest, Proceed};

struct Old;

impl Guest for Old {
    fn declare() -> Declaration {
        Declaration {
            name: "old-wit".into(),
            version: "0.0.0".into(),
            capabilities: Vec::new(),
        }
    }

    fn configure(config_json: String) -> Result<String, String> {
        Ok(config_json)
    }

    fn on_handshake(_config: String, _request: HandshakeRequest) -> Decision {
        Decision::Proceed(Proceed {
            header_changes: Vec::new(),
            query_changes: Vec::new(),
            response_headers: Vec::new(),
            context: Vec::new(),
        })
    }
}

#[cfg(target_arch = "wasm32")]
export!(Old);
