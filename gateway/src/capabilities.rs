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

/// Capabilities a handshake policy may declare.
pub const ALLOWED: &[&str] = &[
    "read-request",
    "modify-headers",
    "modify-query",
    "modify-response-headers",
    "use-context",
    "reject",
    "verify-signatures",
];

/// Capabilities that cannot be used on onHandshake, with their family and the API Management
/// policy they stand for.
pub const NOT_ON_HANDSHAKE: &[(&str, Family, &str)] = &[
    ("mock-response", Family::Body, "Mock response"),
    ("cache-lookup", Family::Cache, "Get from cache"),
    ("cache-store", Family::Cache, "Store to cache"),
    ("cross-domain", Family::Cors, "Allow cross-domain calls"),
    ("cors", Family::Cors, "CORS"),
    ("jsonp", Family::Cors, "JSONP"),
    ("set-method", Family::Body, "Set request method"),
    ("set-body", Family::Body, "Set body"),
    ("xml-to-json", Family::Body, "Convert XML to JSON"),
    ("json-to-xml", Family::Body, "Convert JSON to XML"),
    ("xslt", Family::Body, "Transform XML using XSLT"),
    ("validate-content", Family::Validation, "Validate content"),
    (
        "validate-parameters",
        Family::Validation,
        "Validate parameters",
    ),
    ("validate-headers", Family::Validation, "Validate headers"),
    (
        "validate-status-code",
        Family::Validation,
        "Validate status code",
    ),
];

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
    pub capability: String,
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

/// A declared capability the host does not know: refused everywhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin `{plugin}` declares unknown capability `{capability}`")]
pub struct UnknownCapability {
    pub plugin: String,
    pub capability: String,
}

/// Applies the rules to a plugin's declared capabilities at one scope.
pub fn check(
    plugin: &str,
    declared: &[String],
    scope: &Scope,
) -> Result<Verdict, UnknownCapability> {
    let mut refused = Vec::new();
    for cap in declared {
        if ALLOWED.contains(&cap.as_str()) {
            continue;
        }
        match NOT_ON_HANDSHAKE.iter().find(|(name, _, _)| name == cap) {
            Some((_, family, _)) => refused.push(Refusal {
                plugin: plugin.to_owned(),
                capability: cap.clone(),
                family: *family,
                scope: scope.clone(),
            }),
            None => {
                return Err(UnknownCapability {
                    plugin: plugin.to_owned(),
                    capability: cap.clone(),
                })
            }
        }
    }
    Ok(match (refused.is_empty(), scope) {
        (true, _) => Verdict::Run,
        (false, Scope::Api(_)) => Verdict::Refuse(refused),
        (false, _) => Verdict::SkipAtRuntime(refused),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_forbidden_capability_is_refused_on_api_and_skipped_when_inherited() {
        for (name, family, _) in NOT_ON_HANDSHAKE {
            let declared = caps(&["read-request", name]);
            let v = check("p", &declared, &Scope::Api("chat".into())).unwrap();
            let Verdict::Refuse(r) = v else {
                panic!("{name} not refused: {v:?}")
            };
            assert_eq!(r.len(), 1);
            let msg = r[0].to_string();
            assert!(
                msg.contains("`p`") && msg.contains(name) && msg.contains("API `chat` onHandshake"),
                "{msg}"
            );
            assert!(msg.contains(family.as_str()), "{msg}");
            for scope in [Scope::Global, Scope::Product("gold".into())] {
                assert!(matches!(
                    check("p", &declared, &scope).unwrap(),
                    Verdict::SkipAtRuntime(_)
                ));
            }
        }
    }

    #[test]
    fn allowed_capabilities_run_and_unknown_ones_are_errors() {
        assert_eq!(
            check("p", &caps(ALLOWED), &Scope::Api("a".into())).unwrap(),
            Verdict::Run
        );
        let e = check("p", &caps(&["teleport"]), &Scope::Global).unwrap_err();
        assert_eq!(e.capability, "teleport");
    }

    /// The WIT's closed capability list and this module's lists must be the same set, or a
    /// plugin could declare something the host has no rule for.
    #[test]
    fn wit_capability_enum_matches_the_rules() {
        let wit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/policy.wit");
        let mut resolve = wit_parser::Resolve::default();
        let pkg = resolve.push_file(&wit).expect("wit/policy.wit parses");
        let iface = resolve.packages[pkg].interfaces["types"];
        let ty = resolve.interfaces[iface].types["capability"];
        let wit_parser::TypeDefKind::Enum(e) = &resolve.types[ty].kind else {
            panic!("capability is not an enum")
        };
        let mut in_wit: Vec<&str> = e.cases.iter().map(|c| c.name.as_str()).collect();
        let mut in_rules: Vec<&str> = ALLOWED
            .iter()
            .copied()
            .chain(NOT_ON_HANDSHAKE.iter().map(|(n, _, _)| *n))
            .collect();
        in_wit.sort_unstable();
        in_rules.sort_unstable();
        assert_eq!(in_wit, in_rules);
        assert!(resolve
            .worlds
            .iter()
            .any(|(_, w)| w.name == "handshake-policy"));
    }
}
