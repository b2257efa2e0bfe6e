//! A policy that declares one capability, chosen when it is built:
//! `TOLLGATE_TEST_CAPABILITY=set-body cargo build --target wasm32-wasip2 -p declares-capability`
//! gives a plugin named `declares-set-body` that declares `modify-response-headers` and
//! `set-body` (by default it declares `read-request`). The tests build one per forbidden
//! capability, to check each is refused on onHandshake and skipped when inherited. When it does
//! run, it adds `x-ran: <name>` to the 101, and with `config = { read_path = true }` reads the
//! request's path into `x-path` (refused unless it declared `read-request`).
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use tollgate_sdk::{Capability, Decision, Policy, Proceed, Request};

const CAPABILITY: &str = match option_env!("TOLLGATE_TEST_CAPABILITY") {
    Some(c) => c,
    None => "read-request",
};

fn capability(name: &str) -> Capability {
    use Capability as C;
    match name {
        "mock-response" => C::MockResponse,
        "cache-lookup" => C::CacheLookup,
        "cache-store" => C::CacheStore,
        "cross-domain" => C::CrossDomain,
        "cors" => C::Cors,
        "jsonp" => C::Jsonp,
        "set-method" => C::SetMethod,
        "set-body" => C::SetBody,
        "xml-to-json" => C::XmlToJson,
        "json-to-xml" => C::JsonToXml,
        "xslt" => C::Xslt,
        "validate-content" => C::ValidateContent,
        "validate-parameters" => C::ValidateParameters,
        "validate-headers" => C::ValidateHeaders,
        "validate-status-code" => C::ValidateStatusCode,
        "use-context" => C::UseContext,
        _ => C::ReadRequest,
    }
}

struct Declares;

#[derive(serde::Deserialize)]
struct Config {
    /// Read the request's path and report it in `x-path` (needs `read-request`).
    #[serde(default)]
    read_path: bool,
}

impl Policy for Declares {
    type Config = Config;
    const CAPABILITIES: &'static [Capability] = &[];

    fn capabilities() -> Vec<Capability> {
        vec![Capability::ModifyResponseHeaders, capability(CAPABILITY)]
    }

    fn on_handshake(config: &Config, request: &Request) -> Result<Decision, String> {
        let mut p = Proceed::new().response_header("x-ran", format!("declares-{CAPABILITY}"));
        if config.read_path {
            p = p.response_header("x-path", request.path());
        }
        Ok(p.into())
    }
}

tollgate_sdk::export!(Declares, name = format!("declares-{CAPABILITY}"));
