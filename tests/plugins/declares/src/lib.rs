//! A policy that declares one capability, chosen when it is built:
//! `TOLLGATE_TEST_CAPABILITY=set-body cargo build --target wasm32-wasip2 -p declares-capability`
//! gives a plugin named `declares-set-body` that declares `read-request` and `set-body`. The
//! tests build one per forbidden capability, to check each is refused on onHandshake and
//! skipped when inherited. When it does run, it adds `x-ran: <name>` to the 101.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use tollgate_sdk::{Capability, Decision, Declaration, HandshakeRequest, Pair, Policy, Proceed};

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
        _ => C::ReadRequest,
    }
}

struct Declares;

impl Policy for Declares {
    fn declare() -> Declaration {
        Declaration {
            name: format!("declares-{CAPABILITY}"),
            version: "0.0.0".into(),
            capabilities: vec![
                Capability::ReadRequest,
                Capability::ModifyResponseHeaders,
                capability(CAPABILITY),
            ],
        }
    }

    fn configure(config_json: String) -> Result<String, String> {
        Ok(config_json)
    }

    fn on_handshake(_config: String, _request: HandshakeRequest) -> Decision {
        Decision::Proceed(Proceed {
            response_headers: vec![Pair::new("x-ran", format!("declares-{CAPABILITY}"))],
            ..Proceed::default()
        })
    }
}

#[cfg(target_arch = "wasm32")]
tollgate_sdk::export_policy!(Declares with_types_in tollgate_sdk);
