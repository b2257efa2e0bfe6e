//! The capability rules for handshake policies (BRIEF section 1, "Unsupported policies" and
//! "Inherited policies").
//!
//! A plugin declares what it does as a list of capabilities (the closed `capability` enum in
//! `wit/policy.wit`). Some capabilities name API Management policies that have no meaning on a
//! WebSocket handshake. Attached to an API's onHandshake such a plugin is refused at load;
//! inherited from the global or a product scope it is loaded but skipped at runtime for
//! WebSocket APIs. The policy host applies these rules before it runs any of the plugin's code.

use std::fmt;

/// The groups the refused capabilities fall into; each name stays visible in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Body,
    Cache,
    Cors,
    Validation,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Body => "body",
            Family::Cache => "cache",
            Family::Cors => "CORS",
            Family::Validation => "validation",
        }
    }
}

/// What a plugin may declare it does: the WIT's closed `capability` enum, as the host's own
/// type (the generated one stays inside the policy host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    ReadRequest,
    ModifyHeaders,
    ModifyQuery,
    ModifyResponseHeaders,
    UseContext,
    Reject,
    VerifySignatures,
    LimitLifetime,
    SelectBackend,
    FetchKeys,
    UseCounters,
    MockResponse,
    CacheLookup,
    CacheStore,
    CrossDomain,
    Cors,
    Jsonp,
    SetMethod,
    SetBody,
    XmlToJson,
    JsonToXml,
    Xslt,
    ValidateContent,
    ValidateParameters,
    ValidateHeaders,
    ValidateStatusCode,
}

impl Capability {
    /// Every capability, in the WIT's order.
    pub const ALL: [Capability; 26] = {
        use Capability as C;
        [
            C::ReadRequest,
            C::ModifyHeaders,
            C::ModifyQuery,
            C::ModifyResponseHeaders,
            C::UseContext,
            C::Reject,
            C::VerifySignatures,
            C::LimitLifetime,
            C::SelectBackend,
            C::FetchKeys,
            C::UseCounters,
            C::MockResponse,
            C::CacheLookup,
            C::CacheStore,
            C::CrossDomain,
            C::Cors,
            C::Jsonp,
            C::SetMethod,
            C::SetBody,
            C::XmlToJson,
            C::JsonToXml,
            C::Xslt,
            C::ValidateContent,
            C::ValidateParameters,
            C::ValidateHeaders,
            C::ValidateStatusCode,
        ]
    };

    /// The name as the WIT spells it (`modify-headers`).
    pub fn name(self) -> &'static str {
        use Capability as C;
        match self {
            C::ReadRequest => "read-request",
            C::ModifyHeaders => "modify-headers",
            C::ModifyQuery => "modify-query",
            C::ModifyResponseHeaders => "modify-response-headers",
            C::UseContext => "use-context",
            C::Reject => "reject",
            C::VerifySignatures => "verify-signatures",
            C::LimitLifetime => "limit-lifetime",
            C::SelectBackend => "select-backend",
            C::FetchKeys => "fetch-keys",
            C::UseCounters => "use-counters",
            C::MockResponse => "mock-response",
            C::CacheLookup => "cache-lookup",
            C::CacheStore => "cache-store",
            C::CrossDomain => "cross-domain",
            C::Cors => "cors",
            C::Jsonp => "jsonp",
            C::SetMethod => "set-method",
            C::SetBody => "set-body",
            C::XmlToJson => "xml-to-json",
            C::JsonToXml => "json-to-xml",
            C::Xslt => "xslt",
            C::ValidateContent => "validate-content",
            C::ValidateParameters => "validate-parameters",
            C::ValidateHeaders => "validate-headers",
            C::ValidateStatusCode => "validate-status-code",
        }
    }

    /// For the API Management policies that cannot run on onHandshake: their family and the
    /// APIM policy they stand for. `None`: allowed on onHandshake.
    pub fn not_on_handshake(self) -> Option<(Family, &'static str)> {
        use Capability as C;
        Some(match self {
            C::ReadRequest
            | C::ModifyHeaders
            | C::ModifyQuery
            | C::ModifyResponseHeaders
            | C::UseContext
            | C::Reject
            | C::VerifySignatures
            | C::LimitLifetime
            | C::SelectBackend
            | C::FetchKeys
            | C::UseCounters => return None,
            C::MockResponse => (Family::Body, "Mock response"),
            C::CacheLookup => (Family::Cache, "Get from cache"),
            C::CacheStore => (Family::Cache, "Store to cache"),
            C::CrossDomain => (Family::Cors, "Allow cross-domain calls"),
            C::Cors => (Family::Cors, "CORS"),
            C::Jsonp => (Family::Cors, "JSONP"),
            C::SetMethod => (Family::Body, "Set request method"),
            C::SetBody => (Family::Body, "Set body"),
            C::XmlToJson => (Family::Body, "Convert XML to JSON"),
            C::JsonToXml => (Family::Body, "Convert JSON to XML"),
            C::Xslt => (Family::Body, "Transform XML using XSLT"),
            C::ValidateContent => (Family::Validation, "Validate content"),
            C::ValidateParameters => (Family::Validation, "Validate parameters"),
            C::ValidateHeaders => (Family::Validation, "Validate headers"),
            C::ValidateStatusCode => (Family::Validation, "Validate status code"),
        })
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a policy is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Product(String),
    /// An API's onHandshake operation.
    Api(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => write!(f, "global scope"),
            Scope::Product(p) => write!(f, "product `{p}`"),
            Scope::Api(a) => write!(f, "API `{a}` onHandshake"),
        }
    }
}

/// One refused capability, worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub plugin: String,
    pub capability: Capability,
    pub family: Family,
    pub scope: Scope,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin `{}` declares capability `{}` ({} family), refused on {}: \
             policies that need a message body, a cache, CORS or content validation cannot run \
             on a WebSocket handshake (onHandshake)",
            self.plugin,
            self.capability,
            self.family.as_str(),
            self.scope
        )
    }
}

/// What the host does with a plugin at a scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Load and run it.
    Run,
    /// Load it, warn, and skip it at runtime for WebSocket APIs (inherited scopes).
    SkipAtRuntime(Vec<Refusal>),
    /// Refuse the plugin: the gateway does not start, a reload is rejected.
    Refuse(Vec<Refusal>),
}

/// Applies the rules to a plugin's declared capabilities at one scope.
pub fn check(plugin: &str, declared: &[Capability], scope: &Scope) -> Verdict {
    let refused: Vec<Refusal> = declared
        .iter()
        .filter_map(|c| {
            c.not_on_handshake().map(|(family, _)| Refusal {
                plugin: plugin.to_owned(),
                capability: *c,
                family,
                scope: scope.clone(),
            })
        })
        .collect();
    match (refused.is_empty(), scope) {
        (true, _) => Verdict::Run,
        (false, Scope::Api(_)) => Verdict::Refuse(refused),
        (false, _) => Verdict::SkipAtRuntime(refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_forbidden_capability_is_refused_on_api_and_skipped_when_inherited() {
        let forbidden: Vec<Capability> = Capability::ALL
            .into_iter()
            .filter(|c| c.not_on_handshake().is_some())
            .collect();
        assert_eq!(forbidden.len(), 15, "the seed's list");
        for c in forbidden {
            let declared = [Capability::ReadRequest, c];
            let v = check("p", &declared, &Scope::Api("chat".into()));
            let Verdict::Refuse(r) = v else {
                panic!("{c} not refused: {v:?}")
            };
            assert_eq!(r.len(), 1);
            let msg = r[0].to_string();
            assert!(
                msg.contains("`p`")
                    && msg.contains(c.name())
                    && msg.contains("API `chat` onHandshake"),
                "{msg}"
            );
            let family = c
                .not_on_handshake()
                .map(|(f, _)| f.as_str())
                .unwrap_or_default();
            assert!(msg.contains(family), "{msg}");
            for scope in [Scope::Global, Scope::Product("gold".into())] {
                assert!(matches!(
                    check("p", &declared, &scope),
                    Verdict::SkipAtRuntime(_)
                ));
            }
        }
    }

    #[test]
    fn allowed_capabilities_run() {
        let allowed: Vec<Capability> = Capability::ALL
            .into_iter()
            .filter(|c| c.not_on_handshake().is_none())
            .collect();
        assert_eq!(allowed.len(), 11);
        assert_eq!(check("p", &allowed, &Scope::Api("a".into())), Verdict::Run);
    }

    /// The WIT's closed capability list and this module's enum must be the same list, in the
    /// same order, or a plugin could declare something the host has no rule for.
    #[test]
    fn wit_capability_enum_matches_the_rules() {
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/policy.wit");
        let mut resolve = wit_parser::Resolve::default();
        let pkg = resolve.push_file(&wit).expect("wit/policy.wit parses");
        let iface = resolve.packages[pkg].interfaces["handshake-types"];
        let ty = resolve.interfaces[iface].types["capability"];
        let wit_parser::TypeDefKind::Enum(e) = &resolve.types[ty].kind else {
            panic!("capability is not an enum")
        };
        let in_wit: Vec<&str> = e.cases.iter().map(|c| c.name.as_str()).collect();
        let in_rules: Vec<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(in_wit, in_rules);
        assert!(resolve
            .worlds
            .iter()
            .any(|(_, w)| w.name == "handshake-policy"));
    }

    /// Signature algorithms map by position (`Algorithm::WIT_ORDER`): the WIT's enum must list
    /// them in that order, under the JWS names.
    #[test]
    fn wit_algorithm_enum_is_in_wit_order() {
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/policy.wit");
        let mut resolve = wit_parser::Resolve::default();
        let pkg = resolve.push_file(&wit).expect("wit/policy.wit parses");
        let iface = resolve.packages[pkg].interfaces["signatures"];
        let ty = resolve.interfaces[iface].types["algorithm"];
        let wit_parser::TypeDefKind::Enum(e) = &resolve.types[ty].kind else {
            panic!("algorithm is not an enum")
        };
        let in_wit: Vec<String> = e.cases.iter().map(|c| c.name.replace('-', "")).collect();
        let ours: Vec<String> = tollgate_verify::Algorithm::WIT_ORDER
            .iter()
            .map(|a| a.jws_name().to_ascii_lowercase())
            .collect();
        assert_eq!(in_wit, ours);
    }
}
