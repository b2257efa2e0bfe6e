//! JWKS documents as the host reads them for a fetched key set (`tollgate:policy/key-sets`).
//!
//! Lenient where a provider's document is legitimately richer than what we verify with (key
//! types we do not support, encryption keys), strict about what we keep: every key kept is
//! probed with [`crate::verify`] so that a malformed one is left out here instead of failing
//! handshakes later. Shared secrets (`kty` = `oct`) are never taken from a fetched document: a
//! JWKS published over HTTPS is public, and a secret in it would let anyone forge tokens.
//!
//! ```
//! let doc = br#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "a",
//!     "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}, {"kty": "oct", "k": "c2VjcmV0"}]}"#;
//! let set = tollgate_verify::jwks::parse(doc).unwrap();
//! assert_eq!(set.keys.len(), 1);
//! assert_eq!(set.keys[0].kid.as_deref(), Some("a"));
//! assert_eq!(set.skipped.len(), 1); // the shared secret
//! ```

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::{Algorithm, Key};

/// Most keys kept from one document; providers publish a handful (current, next, previous).
pub const MAX_KEYS: usize = 64;
/// Longest `kid` kept; a key with a longer one is left out (a cut kid would never match).
pub const MAX_KID_BYTES: usize = 256;
/// Notes about keys left out that [`KeySet::skipped`] keeps (then one that says how many more).
pub const MAX_SKIPPED_NOTES: usize = 8;

/// Which algorithms a key can serve: a key is only ever tried with its own family's, which is
/// what keeps an HS256 token from being checked against an RSA public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
    Hmac,
}

impl Algorithm {
    /// The key family this algorithm verifies with.
    ///
    /// ```
    /// use tollgate_verify::{jwks::Family, Algorithm};
    /// assert_eq!(Algorithm::Ps256.family(), Family::Rsa);
    /// ```
    pub fn family(self) -> Family {
        use Algorithm as A;
        match self {
            A::Rs256 | A::Rs384 | A::Rs512 | A::Ps256 | A::Ps384 | A::Ps512 => Family::Rsa,
            A::Es256 => Family::P256,
            A::Es384 => Family::P384,
            A::EdDsa => Family::Ed25519,
            A::Hs256 | A::Hs384 | A::Hs512 => Family::Hmac,
        }
    }
}

/// A verification key of a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins the key to one algorithm.
    pub alg: Option<String>,
    pub family: Family,
    pub key: Key,
}

impl Jwk {
    /// Whether a token signed with `alg` (naming `kid`, if it names one) may be checked with
    /// this key: same family, not pinned to another algorithm, and the same kid when both
    /// have one (a key without a kid fits any token of its family, as in a one-key JWKS).
    pub fn fits(&self, alg: Algorithm, kid: Option<&str>) -> bool {
        self.family == alg.family()
            && self.alg.as_deref().is_none_or(|a| a == alg.jws_name())
            && (kid.is_none() || self.kid.is_none() || self.kid.as_deref() == kid)
    }
}

/// The usable keys of a document, and a note for each key left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    pub keys: Vec<Jwk>,
    /// `keys[i]: why`, for the log: at most [`MAX_SKIPPED_NOTES`], then a count of the rest.
    pub skipped: Vec<String>,
}

/// Reads a JWKS document. An error means the document as a whole is unusable (not JSON, no
/// `keys` array, no usable key at all); single keys that cannot be used are skipped and noted.
pub fn parse(doc: &[u8]) -> Result<KeySet, String> {
    let v: serde_json::Value =
        serde_json::from_slice(doc).map_err(|e| format!("not valid JSON: {e}"))?;
    let list = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("not a JWKS: expected an object with a `keys` array")?;
    let mut set = KeySet::default();
    let mut left_out = 0usize;
    for (i, jwk) in list.iter().enumerate() {
        if set.keys.len() == MAX_KEYS {
            set.skipped.push(format!(
                "keys[{i}..]: more than {MAX_KEYS} keys; the rest are left out"
            ));
            break;
        }
        match key(jwk) {
            Ok(k) => set.keys.push(k),
            Err(_) if set.skipped.len() >= MAX_SKIPPED_NOTES => left_out += 1,
            Err(why) => set.skipped.push(format!("keys[{i}]: {why}")),
        }
    }
    if left_out > 0 {
        set.skipped.push(format!("{left_out} more keys left out"));
    }
    if set.keys.is_empty() {
        return Err(match set.skipped.first() {
            Some(first) => format!("no usable key ({first})"),
            None => "no keys".into(),
        });
    }
    Ok(set)
}

fn field<'a>(jwk: &'a serde_json::Value, name: &str) -> Result<&'a str, String> {
    jwk.get(name)
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("missing `{name}`"))
}

fn b64url(jwk: &serde_json::Value, name: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(field(jwk, name)?.trim_end_matches('='))
        .map_err(|_| format!("`{name}` is not base64url"))
}

/// A big-endian integer (RSA `n`, `e`) without leading zero bytes, which some providers send
/// and ring refuses (as "does not verify", not as an unusable key).
fn unsigned(jwk: &serde_json::Value, name: &str) -> Result<Vec<u8>, String> {
    let mut v = b64url(jwk, name)?;
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros);
    Ok(v)
}

/// A string from the document for a message: at most 32 characters, escaped.
fn shown(s: &str) -> String {
    s.chars()
        .take(32)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

/// An algorithm of `family`, to probe a key with.
fn probe(family: Family) -> Algorithm {
    match family {
        Family::Rsa => Algorithm::Rs256,
        Family::P256 => Algorithm::Es256,
        Family::P384 => Algorithm::Es384,
        Family::Ed25519 => Algorithm::EdDsa,
        Family::Hmac => Algorithm::Hs256,
    }
}

fn key(jwk: &serde_json::Value) -> Result<Jwk, String> {
    if jwk.get("use").and_then(|u| u.as_str()) == Some("enc") {
        return Err("an encryption key (`use` = `enc`)".into());
    }
    let text = |name: &str| jwk.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    if text("kid").is_some_and(|k| k.len() > MAX_KID_BYTES) {
        return Err(format!("a kid longer than {MAX_KID_BYTES} bytes"));
    }
    if text("alg").is_some_and(|a| a.len() > 16) {
        return Err("an `alg` that is no JWS algorithm".into());
    }
    let (family, key) = match field(jwk, "kty")? {
        "RSA" => (
            Family::Rsa,
            Key::Rsa {
                n: unsigned(jwk, "n")?,
                e: unsigned(jwk, "e")?,
            },
        ),
        "EC" => {
            let (family, len) = match field(jwk, "crv")? {
                "P-256" => (Family::P256, 32),
                "P-384" => (Family::P384, 48),
                other => return Err(format!("unsupported curve `{}`", shown(other))),
            };
            let x = b64url(jwk, "x")?;
            let y = b64url(jwk, "y")?;
            if x.len() != len || y.len() != len {
                return Err("`x` and `y` do not match the curve's size".into());
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4u8);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (family, Key::Raw(point))
        }
        "OKP" => {
            if field(jwk, "crv")? != "Ed25519" {
                return Err("only the Ed25519 OKP curve is supported".into());
            }
            (Family::Ed25519, Key::Raw(b64url(jwk, "x")?))
        }
        "oct" => return Err("a shared secret (`oct`), never taken from a fetched JWKS".into()),
        other => return Err(format!("unsupported kty `{}`", shown(other))),
    };
    // An error from the probe means the key cannot be used at all (a short RSA modulus, a
    // point of the wrong size); "does not verify" is the expected answer for an empty input.
    crate::verify(probe(family), &key, b"", b"")?;
    Ok(Jwk {
        kid: text("kid"),
        alg: text("alg"),
        family,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_documents_are_errors_and_bad_keys_are_skipped() {
        assert!(parse(b"nope").unwrap_err().contains("JSON"));
        assert!(parse(b"{}").unwrap_err().contains("keys"));
        assert_eq!(parse(br#"{"keys": []}"#).unwrap_err(), "no keys");
        let short_rsa = format!(
            r#"{{"keys": [{{"kty": "RSA", "n": "{}", "e": "AQAB"}}]}}"#,
            URL_SAFE_NO_PAD.encode([0xffu8; 128])
        );
        assert!(parse(short_rsa.as_bytes())
            .unwrap_err()
            .contains("1024 bits"));
        let enc = br#"{"keys": [{"kty": "RSA", "use": "enc", "n": "AA", "e": "AQAB"}]}"#;
        assert!(parse(enc).unwrap_err().contains("encryption"));
    }

    #[test]
    fn fits_checks_family_pinned_alg_and_kid() {
        let k = Jwk {
            kid: Some("a".into()),
            alg: Some("RS256".into()),
            family: Family::Rsa,
            key: Key::Rsa {
                n: vec![1],
                e: vec![1],
            },
        };
        assert!(k.fits(Algorithm::Rs256, Some("a")));
        assert!(k.fits(Algorithm::Rs256, None));
        assert!(!k.fits(Algorithm::Rs256, Some("b")));
        assert!(!k.fits(Algorithm::Ps256, Some("a")), "pinned to RS256");
        assert!(!k.fits(Algorithm::Es256, Some("a")), "another family");
        assert!(
            !k.fits(Algorithm::Hs256, None),
            "never HMAC with a public key"
        );
        let no_kid = Jwk { kid: None, ..k };
        assert!(
            no_kid.fits(Algorithm::Rs256, Some("any")),
            "a key without kid fits any"
        );
    }

    #[test]
    fn leading_zeros_are_stripped_long_kids_skipped_and_notes_bounded() {
        let n = [vec![0u8, 0], vec![0xc5; 256]].concat();
        let doc = format!(
            r#"{{"keys": [{{"kty": "RSA", "n": "{}", "e": "AAEAAQ"}}]}}"#,
            URL_SAFE_NO_PAD.encode(&n)
        );
        let set = parse(doc.as_bytes()).unwrap();
        assert_eq!(
            set.keys[0].key,
            Key::Rsa {
                n: vec![0xc5; 256],
                e: vec![1, 0, 1]
            }
        );
        let long = format!(
            r#"{{"keys": [{{"kty": "OKP", "crv": "Ed25519", "kid": "{}", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}}]}}"#,
            "k".repeat(MAX_KID_BYTES + 1)
        );
        assert!(parse(long.as_bytes()).unwrap_err().contains("kid longer"));
        let junk = format!(r#"{{"keys": [{}]}}"#, vec!["0"; 1000].join(","));
        let err = parse(junk.as_bytes()).unwrap_err();
        assert!(err.len() < 200, "{err}");
        let mixed = format!(
            r#"{{"keys": [{}, {{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}}]}}"#,
            vec!["0"; 1000].join(",")
        );
        let set = parse(mixed.as_bytes()).unwrap();
        assert_eq!(set.skipped.len(), MAX_SKIPPED_NOTES + 1);
        assert_eq!(set.skipped[MAX_SKIPPED_NOTES], "992 more keys left out");
    }

    #[test]
    fn at_most_max_keys_are_kept() {
        let one = r#"{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}"#;
        let doc = format!(r#"{{"keys": [{}]}}"#, vec![one; MAX_KEYS + 3].join(","));
        let set = parse(doc.as_bytes()).unwrap();
        assert_eq!(set.keys.len(), MAX_KEYS);
        assert_eq!(set.skipped.len(), 1);
    }
}
