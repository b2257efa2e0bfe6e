//! `jwt-validate`: validates a JSON Web Token on the WebSocket handshake, with API
//! Management's validate-jwt semantics, and puts its claims into the context (`jwt.sub`, ...)
//! for later policies such as set-header.
//!
//! The token comes from a header (`Authorization: Bearer ...` by default) or, because browsers
//! cannot set headers on a WebSocket, from a query parameter, which is then removed before the
//! request goes to the backend. Signatures are checked by the host (`signatures.verify`), so
//! no big-number arithmetic runs inside the sandbox.
//!
//! ```toml
//! [[apis.on_handshake]]
//! plugin = "jwt-validate"
//! [apis.on_handshake.config]
//! algorithms = ["RS256"]
//! issuers = ["https://issuer.example"]
//! audiences = ["chat-api"]
//! jwks = '{"keys": [...]}'
//! ```

pub mod config;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};
use tollgate_sdk::host::{self, Level, Verification};
use tollgate_sdk::{Capability, Decision, Pair, Policy, Proceed, Rejection, Request};

use config::{algorithm, Match, Prepared};

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Most keys one token's signature is checked against. A token without `kid` (or a JWKS
/// without kids) would otherwise cost one host verification per key of its family for every
/// handshake; an RSA check is tens of microseconds, and a JWKS can hold dozens of keys. Keys
/// whose `kid` matches the token's are tried first.
pub const MAX_KEYS_PER_TOKEN: usize = 4;

/// Why a token was refused; logged, never sent to the client (the client gets
/// `failed_validation_message`).
pub type Why = String;

/// The token this request carries, if any: header first, then the query parameter.
pub fn token(p: &Prepared, request: &Request) -> Option<String> {
    if let Some(v) = request.header(&p.header_name) {
        let v = v.trim();
        let t = match v.get(..7) {
            Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => v[7..].trim(),
            _ => v,
        };
        if !t.is_empty() {
            return Some(t.to_owned());
        }
    }
    p.query_parameter_name
        .as_deref()
        .and_then(|q| request.query(q))
        .filter(|t| !t.is_empty())
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, Why> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| format!("{what} is not base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(format!("{what} is not a JSON object")),
    }
}

/// The JOSE header fields this policy reads; the rest is skipped unparsed (a `Map` of every
/// field cost a tree of allocations per handshake).
#[derive(serde::Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<serde::de::IgnoredAny>,
}

fn decode_header(part: &str) -> Result<Header, Why> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| "header is not base64url".to_owned())?;
    // Only a JSON object is a header (serde would also take an array for a struct).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err("header is not a JSON object".into());
    }
    serde_json::from_slice(&bytes).map_err(|_| "header is not a JSON object".to_owned())
}

fn no_key(alg: &str, kid: Option<&str>) -> Why {
    match kid {
        Some(kid) => format!("no {alg} key with kid {kid:?}"),
        None => format!("no key for {alg}"),
    }
}

/// A claim as a set of strings (arrays element-wise, strings split by `separator`).
fn claim_values(v: &Value, separator: Option<&str>) -> Vec<String> {
    match v {
        Value::Array(a) => a.iter().flat_map(|x| claim_values(x, separator)).collect(),
        Value::String(s) => match separator {
            Some(sep) if !sep.is_empty() => s
                .split(sep)
                .filter(|x| !x.is_empty())
                .map(str::to_owned)
                .collect(),
            _ => vec![s.clone()],
        },
        Value::Null => Vec::new(),
        other => vec![other.to_string()],
    }
}

/// Validates `token` at time `now` (seconds since the epoch); the claims on success.
pub fn validate(p: &Prepared, token: &str, now: u64) -> Result<Map<String, Value>, Why> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!("token longer than {MAX_TOKEN_BYTES} bytes"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS (three dot-separated parts)".into());
    };
    let header = decode_header(h)?;
    let alg = header.alg.as_deref().ok_or("header has no alg")?;
    if alg.eq_ignore_ascii_case("none") {
        return Err("unsigned token (alg none)".into());
    }
    if !p.algorithms.iter().any(|a| a == alg) {
        return Err(format!("algorithm {alg} is not allowed"));
    }
    if header.crit.is_some() {
        return Err("token has critical header parameters this policy does not understand".into());
    }
    let (walg, family) = algorithm(alg).ok_or_else(|| format!("unknown algorithm {alg}"))?;
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| "signature is not base64url".to_owned())?;
    let kid = header.kid.as_deref();
    let mut candidates: Vec<_> = p
        .keys
        .iter()
        .filter(|k| k.family == family)
        .filter(|k| k.alg.as_deref().is_none_or(|a| a == alg))
        .filter(|k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
        .collect();
    if candidates.is_empty() && p.key_sets.is_empty() {
        return Err(no_key(alg, kid));
    }
    // Exact kid matches first (a stable sort keeps the JWKS order otherwise).
    if kid.is_some() {
        candidates.sort_by_key(|k| k.kid.is_none());
    }
    let eligible = candidates.len();
    let signing_input = &token.as_bytes()[..h.len() + 1 + c.len()];
    let mut verified = false;
    for k in candidates.into_iter().take(MAX_KEYS_PER_TOKEN) {
        let key = k.key()?;
        if host::verify(walg, key, signing_input, &signature)? {
            verified = true;
            break;
        }
    }
    // Then the keys the gateway fetched: it picks those that fit, and refetches once (rate
    // limited) when the kid is one it does not hold.
    let mut fetched_fit = false;
    for set in &p.key_sets {
        if verified {
            break;
        }
        match host::verify_with_key_set(*set, walg, kid, signing_input, &signature)? {
            Verification::Valid => verified = true,
            Verification::Invalid => fetched_fit = true,
            Verification::NoKey => {}
        }
    }
    if !verified {
        return Err(if eligible == 0 && !fetched_fit {
            no_key(alg, kid)
        } else if eligible > MAX_KEYS_PER_TOKEN {
            format!("signature does not verify with the first {MAX_KEYS_PER_TOKEN} of {eligible} {alg} keys (a token is tried against at most {MAX_KEYS_PER_TOKEN}; give tokens and keys a kid)")
        } else {
            "signature does not verify".into()
        });
    }
    let claims = decode_json(c, "payload")?;
    let skew = p.skew;
    match claims.get("exp") {
        Some(v) => {
            let exp = v.as_f64().ok_or("exp is not a number")?;
            if (now as f64) > exp + skew as f64 {
                return Err("token expired".into());
            }
        }
        None if p.require_exp => return Err("token has no exp".into()),
        None => {}
    }
    if let Some(v) = claims.get("nbf") {
        let nbf = v.as_f64().ok_or("nbf is not a number")?;
        if (now as f64) + (skew as f64) < nbf {
            return Err("token not yet valid (nbf)".into());
        }
    }
    if !p.issuers.is_empty() {
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        if !p.issuers.iter().any(|i| i == iss) {
            return Err(format!("issuer {iss:?} is not accepted"));
        }
    }
    if !p.audiences.is_empty() {
        let aud = claims
            .get("aud")
            .map(|a| claim_values(a, None))
            .unwrap_or_default();
        if !aud.iter().any(|a| p.audiences.contains(a)) {
            return Err(format!("audience {aud:?} is not accepted"));
        }
    }
    for rc in &p.required_claims {
        let have = claims
            .get(&rc.name)
            .map(|v| claim_values(v, rc.separator.as_deref()))
            .unwrap_or_default();
        let ok = match rc.match_ {
            Match::All => rc.values.iter().all(|v| have.contains(v)),
            Match::Any => rc.values.iter().any(|v| have.contains(v)),
        };
        if !ok {
            return Err(format!(
                "claim {} does not hold the required values",
                rc.name
            ));
        }
    }
    Ok(claims)
}

/// Context values for the claims: `prefix.name` -> strings as they are, arrays joined with
/// commas, anything else as JSON.
pub fn context(prefix: &str, claims: &Map<String, Value>) -> Vec<Pair> {
    claims
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Array(a) if a.iter().all(Value::is_string) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            Pair::new(format!("{prefix}.{k}"), value)
        })
        .collect()
}

/// The whole decision for one handshake.
pub fn decide(p: &Prepared, request: &Request) -> Decision {
    let reject = |why: &str| {
        host::log(Level::Info, &format!("token refused: {why}"));
        Decision::Reject(Rejection {
            status: p.status,
            headers: vec![Pair::new(
                "www-authenticate",
                "Bearer error=\"invalid_token\"",
            )],
            body: p.message.clone().into_bytes(),
        })
    };
    let Some(token) = token(p, request) else {
        return reject("no token in the request");
    };
    match validate(p, &token, request.received_at()) {
        Err(why) => reject(&why),
        Ok(claims) => {
            let mut proceed = Proceed {
                context: context(&p.prefix, &claims),
                ..Proceed::new()
            };
            // The token in the URL is for the gateway only.
            if let Some(q) = &p.query_parameter_name {
                if request.query(q).is_some() {
                    proceed = proceed.remove_query(q.clone());
                }
            }
            if p.close_at_expiry {
                // The token is valid up to `exp` plus the skew `validate` allowed (a float cast
                // to u64 saturates; the gateway caps a far deadline at ten years).
                if let Some(exp) = claims.get("exp").and_then(Value::as_f64) {
                    let at = (exp.max(0.0) as u64).saturating_add(p.skew);
                    // Valid for less than the second it arrived in: nothing to hold open.
                    if at <= request.received_at() {
                        return reject("token expired");
                    }
                    proceed = proceed.close_at(at);
                }
            }
            Decision::Proceed(proceed)
        }
    }
}

/// The exported policy.
pub struct JwtValidate;

impl Policy for JwtValidate {
    type Config = Prepared;
    const CAPABILITIES: &'static [Capability] = &[
        Capability::ReadRequest,
        Capability::ModifyQuery,
        Capability::UseContext,
        Capability::Reject,
        Capability::VerifySignatures,
        Capability::LimitLifetime,
        Capability::FetchKeys,
    ];

    /// Decodes the keys and reads any JWKS file once, at load: every instance gets the
    /// prepared form.
    fn configure(config_json: &str) -> Result<String, String> {
        let p = config::prepare(config_json)?;
        // Accepted, but worth an operator's look: the host logs these at load (and `tollgate
        // check` prints them).
        for w in config::warnings(&p) {
            host::log(Level::Warn, &w);
        }
        serde_json::to_string(&p).map_err(|e| format!("jwt-validate: {e}"))
    }

    fn on_handshake(config: &Prepared, request: &Request) -> Result<Decision, String> {
        Ok(decide(config, request))
    }
}

tollgate_sdk::export!(JwtValidate);

#[cfg(test)]
mod tests;
