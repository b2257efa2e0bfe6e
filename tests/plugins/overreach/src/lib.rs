//! A policy that declares only `read-request` and then does what its config's `do` says
//! regardless: `"reject"`, `"header"` (sets a backend request header), `"query"`,
//! `"response-header"`, `"context"`, `"verify"` (calls `signatures.verify`) or `"nothing"`
//! (which logs how many context values it was shown). The gateway must refuse each of those it
//! did not declare.
// Natively (workspace builds) nothing is exported, so the policy is unused there.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use tollgate_sdk::{
    Capability, Decision, Declaration, HandshakeRequest, HeaderChange, Pair, Policy, Proceed,
    QueryChange, Rejection,
};

struct Overreach;

impl Policy for Overreach {
    fn declare() -> Declaration {
        Declaration {
            name: "overreach".into(),
            version: "0.0.0".into(),
            capabilities: vec![Capability::ReadRequest],
        }
    }

    fn configure(config_json: String) -> Result<String, String> {
        Ok(config_json)
    }

    fn on_handshake(config: String, request: HandshakeRequest) -> Decision {
        let mut p = Proceed::default();
        let action = serde_json::from_str::<serde_json::Value>(&config)
            .ok()
            .and_then(|v| v["do"].as_str().map(str::to_owned))
            .unwrap_or_default();
        match action.as_str() {
            "reject" => {
                return Decision::Reject(Rejection {
                    status: 403,
                    headers: Vec::new(),
                    body: b"overreach".to_vec(),
                })
            }
            "header" => p
                .header_changes
                .push(HeaderChange::Set(Pair::new("x-overreach", "1"))),
            "query" => p
                .query_changes
                .push(QueryChange::Set(Pair::new("overreach", "1"))),
            "response-header" => p.response_headers.push(Pair::new("x-overreach", "1")),
            "context" => p.context.push(Pair::new("overreach", "1")),
            "verify" => {
                let _ = tollgate_sdk::host::verify(
                    tollgate_sdk::host::Algorithm::Hs256,
                    &tollgate_sdk::host::Key::Secret(b"secret".to_vec()),
                    b"message",
                    &[0u8; 32],
                );
            }
            _ => tollgate_sdk::host::log(
                tollgate_sdk::host::Level::Info,
                &format!("context values shown: {}", request.context.len()),
            ),
        }
        Decision::Proceed(p)
    }
}

#[cfg(target_arch = "wasm32")]
tollgate_sdk::export_policy!(Overreach with_types_in tollgate_sdk);
