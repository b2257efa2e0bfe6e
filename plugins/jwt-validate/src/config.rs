//! The manifest's config for jwt-validate, checked once at load and turned into a [`Prepared`]
//! config (keys decoded and sorted by family) that every handshake receives.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use tollgate_sdk::host::{self, Algorithm, Key, KeySet, KeySetOptions, KeySetSource, RsaPublicKey};

/// What the manifest may say (names follow API Management's validate-jwt).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default = "default_header")]
    header_name: String,
    query_parameter_name: Option<String>,
    #[serde(default = "default_status")]
    failed_validation_status: u16,
    #[serde(default = "default_message")]
    failed_validation_message: String,
    #[serde(default = "default_algorithms")]
    algorithms: Vec<String>,
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    clock_skew_seconds: u64,
    #[serde(default = "yes")]
    require_expiration_time: bool,
    #[serde(default)]
    required_claims: Vec<RequiredClaim>,
    /// Inline JWKS: a JSON string or a table.
    jwks: Option<serde_json::Value>,
    /// One or more PEM "PUBLIC KEY" blocks.
    pem: Option<String>,
    /// A JWKS file, read at load (needs a `grants.read_dirs` entry for its directory).
    jwks_file: Option<String>,
    /// An OpenID Connect discovery document; the gateway fetches the JWKS its `jwks_uri`
    /// names, and keeps it fresh.
    openid_config_url: Option<String>,
    /// A JWKS URL the gateway fetches and keeps fresh.
    jwks_url: Option<String>,
    /// How often the fetched keys are refreshed ("1h", "15m"; or seconds).
    jwks_refresh: Option<Duration>,
    /// Least time between two fetches: an unknown `kid` refetches at most this often.
    jwks_min_refresh: Option<Duration>,
    /// PEM file of CA certificates trusted for the fetch besides the system's (needs a
    /// `grants.read_dirs` entry for its directory).
    ca_file: Option<String>,
    #[serde(default = "default_prefix")]
    context_prefix: String,
    /// Close the WebSocket (1008) when the token it was opened with expires (its `exp` plus
    /// the clock skew), instead of letting it outlive the token.
    #[serde(default)]
    close_at_expiry: bool,
}

/// A duration as `"90s"`, `"1h 30m"` (humantime) or a number of seconds.
#[derive(Debug, Clone, Copy)]
struct Duration(u64);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(Duration(s)),
            Raw::Text(t) => humantime::parse_duration(&t)
                .map(|d| Duration(d.as_secs()))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`{t}` is not a duration ({e}); write e.g. \"1h\", \"15m\" or \"90s\""
                    ))
                }),
        }
    }
}

fn default_header() -> String {
    "Authorization".into()
}
fn default_status() -> u16 {
    401
}
fn default_message() -> String {
    "Unauthorized".into()
}
fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}
fn yes() -> bool {
    true
}
fn default_prefix() -> String {
    "jwt".into()
}

/// `{ name = "scope", match = "any", values = ["chat"], separator = " " }`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RequiredClaim {
    pub name: String,
    #[serde(rename = "match", default)]
    pub match_: Match,
    #[serde(default)]
    pub values: Vec<String>,
    /// Splits a string claim into values (e.g. " " for OAuth's `scope`).
    pub separator: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Match {
    /// Every listed value must be present (APIM's default).
    #[default]
    All,
    /// At least one listed value must be present.
    Any,
}

/// Key families: a key is only ever tried with algorithms of its own family, which is what
/// keeps an HS256 token from being checked against an RSA public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
    Hmac,
}

/// A decoded key, base64url in the prepared config.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PreparedKey {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<String>,
    pub family: Family,
    /// "spki", "rsa", "raw" or "secret"
    pub form: String,
    pub a: String,
    /// RSA exponent for form "rsa".
    #[serde(default)]
    pub b: String,
    /// The key decoded, on first use: an instance parses its config once, so a warm instance
    /// decodes each key once instead of once per handshake.
    #[serde(skip)]
    pub decoded: std::cell::OnceCell<Key>,
}

impl PreparedKey {
    pub fn key(&self) -> Result<&Key, String> {
        if let Some(k) = self.decoded.get() {
            return Ok(k);
        }
        let d = |s: &str| URL_SAFE_NO_PAD.decode(s).map_err(|e| e.to_string());
        let key = match self.form.as_str() {
            "spki" => Key::Spki(d(&self.a)?),
            "rsa" => Key::Rsa(RsaPublicKey {
                n: d(&self.a)?,
                e: d(&self.b)?,
            }),
            "raw" => Key::Raw(d(&self.a)?),
            _ => Key::Secret(d(&self.a)?),
        };
        Ok(self.decoded.get_or_init(|| key))
    }
}

/// What every handshake gets: validated settings and decoded keys.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Prepared {
    pub header_name: String,
    pub query_parameter_name: Option<String>,
    pub status: u16,
    pub message: String,
    pub algorithms: Vec<String>,
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub skew: u64,
    pub require_exp: bool,
    pub required_claims: Vec<RequiredClaim>,
    pub prefix: String,
    pub keys: Vec<PreparedKey>,
    #[serde(default)]
    pub close_at_expiry: bool,
    /// Handles of the key sets the gateway fetches (`openid_config_url`, `jwks_url`).
    #[serde(default)]
    pub key_sets: Vec<KeySet>,
}

/// The JWS algorithms this policy accepts in `algorithms`. `none` is never one of them.
pub fn algorithm(name: &str) -> Option<(Algorithm, Family)> {
    Some(match name {
        "RS256" => (Algorithm::Rs256, Family::Rsa),
        "RS384" => (Algorithm::Rs384, Family::Rsa),
        "RS512" => (Algorithm::Rs512, Family::Rsa),
        "PS256" => (Algorithm::Ps256, Family::Rsa),
        "PS384" => (Algorithm::Ps384, Family::Rsa),
        "PS512" => (Algorithm::Ps512, Family::Rsa),
        "ES256" => (Algorithm::Es256, Family::P256),
        "ES384" => (Algorithm::Es384, Family::P384),
        "EdDSA" => (Algorithm::EdDsa, Family::Ed25519),
        "HS256" => (Algorithm::Hs256, Family::Hmac),
        "HS384" => (Algorithm::Hs384, Family::Hmac),
        "HS512" => (Algorithm::Hs512, Family::Hmac),
        _ => return None,
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Parses and checks the manifest's config; every message starts with `jwt-validate:` and
/// names the key at fault.
pub fn prepare(config_json: &str) -> Result<Prepared, String> {
    let raw: Raw =
        serde_json::from_str(config_json).map_err(|e| format!("jwt-validate: config: {e}"))?;
    if !(400..=599).contains(&raw.failed_validation_status) {
        return Err("jwt-validate: failed_validation_status must be between 400 and 599".into());
    }
    if raw.algorithms.is_empty() {
        return Err("jwt-validate: algorithms must list at least one algorithm".into());
    }
    for a in &raw.algorithms {
        if a.eq_ignore_ascii_case("none") {
            return Err(
                "jwt-validate: algorithms: \"none\" can never be allowed (unsigned tokens)".into(),
            );
        }
        if algorithm(a).is_none() {
            return Err(format!(
                "jwt-validate: algorithms: unknown algorithm `{a}` (RS256/384/512, PS256/384/512, ES256, ES384, EdDSA, HS256/384/512)"
            ));
        }
    }
    for c in &raw.required_claims {
        if c.values.is_empty() {
            return Err(format!(
                "jwt-validate: required_claims `{}`: values must not be empty",
                c.name
            ));
        }
    }
    if raw.header_name.trim().is_empty() && raw.query_parameter_name.is_none() {
        return Err("jwt-validate: header_name or query_parameter_name must be set".into());
    }
    let mut keys = Vec::new();
    let sources = [
        raw.jwks.is_some(),
        raw.pem.is_some(),
        raw.jwks_file.is_some(),
        raw.openid_config_url.is_some(),
        raw.jwks_url.is_some(),
    ];
    if !sources.contains(&true) {
        return Err(
            "jwt-validate: no keys: set openid_config_url, jwks_url, jwks, pem or jwks_file".into(),
        );
    }
    let key_sets = fetched_key_sets(&raw)?;
    if let Some(v) = &raw.jwks {
        let v = match v {
            serde_json::Value::String(s) => serde_json::from_str(s)
                .map_err(|e| format!("jwt-validate: jwks is not valid JSON: {e}"))?,
            other => other.clone(),
        };
        keys.extend(jwks_keys(&v).map_err(|e| format!("jwt-validate: jwks: {e}"))?);
    }
    if let Some(path) = &raw.jwks_file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let dir = std::path::Path::new(path)
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!(
                "jwt-validate: cannot read jwks_file `{path}`: {e} (the attachment needs `grants = {{ read_dirs = [\"{dir}\"] }}`)"
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("jwt-validate: jwks_file `{path}` is not valid JSON: {e}"))?;
        keys.extend(jwks_keys(&v).map_err(|e| format!("jwt-validate: jwks_file `{path}`: {e}"))?);
    }
    if let Some(pem) = &raw.pem {
        keys.extend(pem_keys(pem).map_err(|e| format!("jwt-validate: pem: {e}"))?);
    }
    // Every allowed algorithm should have a key it can use; a typo here would otherwise show
    // up as "invalid token" for every client. (Fetched keys change with the provider's
    // rotation, so they are not held to this.)
    for a in raw.algorithms.iter().filter(|_| key_sets.is_empty()) {
        let fam = algorithm(a).map(|(_, f)| f);
        if !keys.iter().any(|k| Some(k.family) == fam) {
            return Err(format!(
                "jwt-validate: algorithm `{a}` is allowed but no configured key can verify it"
            ));
        }
    }
    Ok(Prepared {
        header_name: raw.header_name,
        query_parameter_name: raw.query_parameter_name,
        status: raw.failed_validation_status,
        message: raw.failed_validation_message,
        algorithms: raw.algorithms,
        issuers: raw.issuers,
        audiences: raw.audiences,
        skew: raw.clock_skew_seconds,
        require_exp: raw.require_expiration_time,
        required_claims: raw.required_claims,
        prefix: raw.context_prefix,
        keys,
        close_at_expiry: raw.close_at_expiry,
        key_sets,
    })
}

/// Registers the key set `openid_config_url` or `jwks_url` names with the gateway, which
/// fetches it now (and fails the load, with its reason, when it cannot).
fn fetched_key_sets(raw: &Raw) -> Result<Vec<KeySet>, String> {
    let source = match (&raw.openid_config_url, &raw.jwks_url) {
        (Some(_), Some(_)) => {
            return Err(
                "jwt-validate: set openid_config_url or jwks_url, not both (the discovery document names the JWKS)"
                    .into(),
            )
        }
        (Some(u), None) => ("openid_config_url", KeySetSource::OpenidConfiguration(u.clone())),
        (None, Some(u)) => ("jwks_url", KeySetSource::Jwks(u.clone())),
        (None, None) => {
            for (set, key) in [
                (raw.jwks_refresh.is_some(), "jwks_refresh"),
                (raw.jwks_min_refresh.is_some(), "jwks_min_refresh"),
                (raw.ca_file.is_some(), "ca_file"),
            ] {
                if set {
                    return Err(format!(
                        "jwt-validate: {key} applies to fetched keys only: set openid_config_url or jwks_url"
                    ));
                }
            }
            return Ok(Vec::new());
        }
    };
    let ca_pem = match &raw.ca_file {
        None => None,
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
            let dir = std::path::Path::new(path)
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!(
                "jwt-validate: cannot read ca_file `{path}`: {e} (the attachment needs `grants = {{ read_dirs = [\"{dir}\"] }}`)"
            )
        })?),
    };
    let refresh = raw.jwks_refresh.map_or(0, |d| d.0);
    let min_refresh = raw.jwks_min_refresh.map_or(0, |d| d.0);
    if raw.jwks_refresh.is_some() && refresh == 0
        || raw.jwks_min_refresh.is_some() && min_refresh == 0
    {
        return Err(
            "jwt-validate: jwks_refresh and jwks_min_refresh must be at least one second".into(),
        );
    }
    // 0 is the gateway's default: an hour.
    let effective_refresh = if refresh == 0 { 3600 } else { refresh };
    if min_refresh > effective_refresh {
        return Err("jwt-validate: jwks_min_refresh must not be longer than jwks_refresh".into());
    }
    let options = KeySetOptions {
        refresh_seconds: refresh,
        min_refresh_seconds: min_refresh,
        ca_pem,
    };
    let set = host::register_key_set(&source.1, &options)
        .map_err(|e| format!("jwt-validate: {}: {e}", source.0))?;
    Ok(vec![set])
}

/// What a valid config may still get wrong, worded for the operator: each is logged at warn
/// level when the config is loaded.
pub fn warnings(p: &Prepared) -> Vec<String> {
    let mut out = Vec::new();
    if p.issuers.is_empty() && p.audiences.is_empty() {
        out.push("jwt-validate: neither issuers nor audiences is set: any unexpired token the configured keys signed is accepted, including tokens the identity provider issued for other applications; set audiences (and issuers)".to_owned());
    }
    for family in [
        Family::Rsa,
        Family::P256,
        Family::P384,
        Family::Ed25519,
        Family::Hmac,
    ] {
        let n = p.keys.iter().filter(|k| k.family == family).count();
        if n > crate::MAX_KEYS_PER_TOKEN {
            out.push(format!(
                "jwt-validate: {n} {family:?} keys: a token is checked against at most {} of them (those whose kid matches first); tokens signed with another are refused",
                crate::MAX_KEYS_PER_TOKEN
            ));
        }
    }
    out
}

fn field<'a>(jwk: &'a serde_json::Value, name: &str) -> Result<&'a str, String> {
    jwk.get(name)
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("key is missing `{name}`"))
}

fn b64url(jwk: &serde_json::Value, name: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(field(jwk, name)?.trim_end_matches('='))
        .map_err(|e| format!("`{name}` is not base64url: {e}"))
}

/// Keys of a JWKS document (`{"keys": [...]}`); encryption keys are left out.
pub fn jwks_keys(v: &serde_json::Value) -> Result<Vec<PreparedKey>, String> {
    let list = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("expected an object with a `keys` array")?;
    let mut out = Vec::new();
    for (i, jwk) in list.iter().enumerate() {
        if jwk.get("use").and_then(|u| u.as_str()) == Some("enc") {
            continue;
        }
        let kid = jwk.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        let alg = jwk.get("alg").and_then(|k| k.as_str()).map(str::to_owned);
        let at = |e: String| format!("keys[{i}]: {e}");
        let kty = field(jwk, "kty").map_err(at)?;
        let (family, form, a, b) = match kty {
            "RSA" => (
                Family::Rsa,
                "rsa",
                b64(&b64url(jwk, "n").map_err(at)?),
                b64(&b64url(jwk, "e").map_err(at)?),
            ),
            "EC" => {
                let (family, len) = match field(jwk, "crv").map_err(at)? {
                    "P-256" => (Family::P256, 32),
                    "P-384" => (Family::P384, 48),
                    other => return Err(at(format!("unsupported curve `{other}`"))),
                };
                let x = b64url(jwk, "x").map_err(at)?;
                let y = b64url(jwk, "y").map_err(at)?;
                if x.len() != len || y.len() != len {
                    return Err(at("x and y do not match the curve's size".into()));
                }
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                (family, "raw", b64(&point), String::new())
            }
            "OKP" => {
                if field(jwk, "crv").map_err(at)? != "Ed25519" {
                    return Err(at("only the Ed25519 OKP curve is supported".into()));
                }
                (
                    Family::Ed25519,
                    "raw",
                    b64(&b64url(jwk, "x").map_err(at)?),
                    String::new(),
                )
            }
            "oct" => {
                let k = b64url(jwk, "k").map_err(at)?;
                if k.is_empty() {
                    return Err(at("empty secret".into()));
                }
                (Family::Hmac, "secret", b64(&k), String::new())
            }
            other => return Err(at(format!("unsupported kty `{other}`"))),
        };
        let key = PreparedKey {
            kid,
            alg,
            family,
            form: form.into(),
            a,
            b,
            decoded: Default::default(),
        };
        check_usable(&key).map_err(at)?;
        out.push(key);
    }
    Ok(out)
}

/// An algorithm of `family`, to probe a key with.
fn probe_alg(family: Family) -> Algorithm {
    match family {
        Family::Rsa => Algorithm::Rs256,
        Family::P256 => Algorithm::Es256,
        Family::P384 => Algorithm::Es384,
        Family::Ed25519 => Algorithm::EdDsa,
        Family::Hmac => Algorithm::Hs256,
    }
}

/// Asks the host whether it can use the key at all (an error means malformed), so a broken
/// key fails the load instead of every handshake.
fn check_usable(key: &PreparedKey) -> Result<(), String> {
    host::verify(probe_alg(key.family), key.key()?, b"", b"").map(|_| ())
}

/// Keys of one or more PEM "PUBLIC KEY" blocks. The family is learnt from the host, which
/// reads the SubjectPublicKeyInfo.
pub fn pem_keys(pem: &str) -> Result<Vec<PreparedKey>, String> {
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let label_end = after.find("-----").ok_or("unterminated BEGIN line")?;
        let label = &after[..label_end];
        if label != "PUBLIC KEY" {
            return Err(format!(
                "`{label}` blocks are not supported; give the public key (`-----BEGIN PUBLIC KEY-----`)"
            ));
        }
        let body_start = &after[label_end + 5..];
        let end = body_start
            .find("-----END PUBLIC KEY-----")
            .ok_or("missing -----END PUBLIC KEY-----")?;
        let b64body: String = body_start[..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let der = STANDARD
            .decode(b64body)
            .map_err(|e| format!("PUBLIC KEY block is not base64: {e}"))?;
        let family = [Family::Rsa, Family::P256, Family::P384, Family::Ed25519]
            .into_iter()
            .find(|f| host::verify(probe_alg(*f), &Key::Spki(der.clone()), b"", b"").is_ok())
            .ok_or("PUBLIC KEY block is not an RSA, P-256, P-384 or Ed25519 key")?;
        out.push(PreparedKey {
            kid: None,
            alg: None,
            family,
            form: "spki".into(),
            a: b64(&der),
            b: String::new(),
            decoded: Default::default(),
        });
        rest = &body_start[end + 24..];
    }
    if out.is_empty() {
        return Err("no `-----BEGIN PUBLIC KEY-----` block found".into());
    }
    Ok(out)
}
