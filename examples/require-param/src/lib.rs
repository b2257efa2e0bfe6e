use tollgate_sdk::{Capability, Decision, Policy, Request};

#[derive(serde::Deserialize)]
pub struct Config {
    param: String,
}

pub struct RequireParam;

impl Policy for RequireParam {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] = &[Capability::ReadRequest, Capability::Reject];

    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        Ok(match request.query(&config.param) {
            Some(_) => Decision::proceed(),
            None => Decision::reject(400, format!("{} required", config.param)),
        })
    }
}

tollgate_sdk::export!(RequireParam);
