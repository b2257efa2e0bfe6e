//! A policy that declares only `read-request` and then does what its config's `do` says
//! regardless: `"reject"`, `"header"` (sets a backend request header), `"query"`,
//! `"response-header"`, `"context"`, `"close-at"`, `"backend"`, `"read-context"` (reads the context values),
//! `"verify"` (calls `signatures.verify`), `"count"` (calls `counters.increment`), `"fetch-keys"` (registers a key set in `configure`)
//! or `"nothing"` (which reads the request's path, as it declared it would, and logs it). The gateway must refuse each of those it did not declare.
// Natively (workspace builds) nothing is exported, so the policy is unused there.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use tollgate_sdk::{
    Capability, Decision, HeaderChange, Pair, Policy, Proceed, QueryChange, Request,
};

struct Overreach;

#[derive(serde::Deserialize)]
struct Config {
    #[serde(default, rename = "do")]
    action: String,
}

impl Policy for Overreach {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] = &[Capability::ReadRequest];

    fn check(config: &Config) -> Result<(), String> {
        if config.action == "fetch-keys" {
            use tollgate_sdk::host::{register_key_set, KeySetOptions, KeySetSource};
            let options = KeySetOptions {
                refresh_seconds: 0,
                min_refresh_seconds: 0,
                ca_pem: None,
            };
            register_key_set(
                &KeySetSource::Jwks("https://127.0.0.1:9/jwks".into()),
                &options,
            )?;
        }
        Ok(())
    }

    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        let mut p = Proceed::default();
        match config.action.as_str() {
            "reject" => return Ok(Decision::reject(403, "overreach")),
            "header" => p
                .header_changes
                .push(HeaderChange::Set(Pair::new("x-overreach", "1"))),
            "query" => p
                .query_changes
                .push(QueryChange::Set(Pair::new("overreach", "1"))),
            "response-header" => p.response_headers.push(Pair::new("x-overreach", "1")),
            "context" => p.context.push(Pair::new("overreach", "1")),
            "close-at" => p.close_at = Some(request.received_at() + 60),
            "backend" => p.backend = Some("eu".into()),
            "read-context" => {
                let _ = request.context_values();
            }
            "count" => {
                let rate = tollgate_sdk::counters::Rate {
                    limit: 10,
                    window_seconds: 1,
                };
                let _ = tollgate_sdk::counters::increment("k", rate, 1);
            }
            "verify" => {
                let _ = tollgate_sdk::host::verify(
                    tollgate_sdk::host::Algorithm::Hs256,
                    &tollgate_sdk::host::Key::Secret(b"secret".to_vec()),
                    b"message",
                    &[0u8; 32],
                );
            }
            // What it did declare works: reading the request.
            _ => tollgate_sdk::host::log(
                tollgate_sdk::host::Level::Info,
                &format!("read path {}", request.path()),
            ),
        }
        Ok(Decision::Proceed(p))
    }
}

tollgate_sdk::export!(Overreach);
