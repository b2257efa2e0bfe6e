//! Signature verification behind the `tollgate:policy/signatures` host interface.
//!
//! One implementation for two callers: the gateway (policies call it through the WIT import)
//! and the SDK's native test harness (a policy's `cargo test` gets the same answers the gateway
//! would give). Built on `ring`, which the gateway already links for TLS; `spki` reads the DER
//! SubjectPublicKeyInfo that PEM "PUBLIC KEY" blocks hold.
//!
//! ```
//! use tollgate_verify::{verify, Algorithm, Key};
//! let key = Key::Secret(b"secret".to_vec());
//! assert_eq!(verify(Algorithm::Hs256, &key, b"msg", b"not a tag"), Ok(false));
//! ```

pub mod jwks;

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey, VerificationAlgorithm};
use spki::der::Decode;

/// JWS algorithms the host verifies. `none` is deliberately not one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
    Hs256,
    Hs384,
    Hs512,
}

impl Algorithm {
    /// Every algorithm in the order of the WIT's `signatures.algorithm` enum, so a binding's
    /// generated enum maps by position (`Algorithm::WIT_ORDER[generated as usize]`) in one
    /// place instead of a twelve-arm match per binding; the gateway's tests check the order
    /// against `wit/policy.wit`.
    pub const WIT_ORDER: [Algorithm; 12] = [
        Algorithm::Rs256,
        Algorithm::Rs384,
        Algorithm::Rs512,
        Algorithm::Ps256,
        Algorithm::Ps384,
        Algorithm::Ps512,
        Algorithm::Es256,
        Algorithm::Es384,
        Algorithm::EdDsa,
        Algorithm::Hs256,
        Algorithm::Hs384,
        Algorithm::Hs512,
    ];

    /// The algorithm at `position` in the WIT's enum.
    ///
    /// ```
    /// use tollgate_verify::Algorithm;
    /// assert_eq!(Algorithm::from_wit_position(0), Some(Algorithm::Rs256));
    /// assert_eq!(Algorithm::from_wit_position(12), None);
    /// ```
    pub fn from_wit_position(position: usize) -> Option<Algorithm> {
        Self::WIT_ORDER.get(position).copied()
    }

    /// The JWS name (`RS256`), which is also the WIT case name, lower-cased and with `EdDSA`
    /// as `ed-dsa`.
    ///
    /// ```
    /// assert_eq!(tollgate_verify::Algorithm::EdDsa.jws_name(), "EdDSA");
    /// ```
    pub fn jws_name(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::EdDsa => "EdDSA",
            Algorithm::Hs256 => "HS256",
            Algorithm::Hs384 => "HS384",
            Algorithm::Hs512 => "HS512",
        }
    }
}

/// A verification key, in the forms JWKS and PEM give them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// DER SubjectPublicKeyInfo (the body of a PEM "PUBLIC KEY" block): RSA, EC P-256/P-384 or
    /// Ed25519.
    Spki(Vec<u8>),
    /// RSA modulus and public exponent, big-endian (JWK `n` and `e`).
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Uncompressed SEC1 point `04 || x || y` for ES*, or the 32 bytes of an Ed25519 key.
    Raw(Vec<u8>),
    /// The shared secret of HS*.
    Secret(Vec<u8>),
}

const OID_RSA: &str = "1.2.840.113549.1.1.1";
const OID_EC: &str = "1.2.840.10045.2.1";
const OID_ED25519: &str = "1.3.101.112";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// Verifies `signature` over `message`.
///
/// `Ok(false)`: the signature does not verify (or was made with another key). `Err`: the key
/// cannot be used with this algorithm at all (wrong type, malformed). Using a key with an
/// algorithm of another family is always an error, which is what stops algorithm confusion
/// (an HS256 token "signed" with an RSA public key).
pub fn verify(alg: Algorithm, key: &Key, message: &[u8], signature: &[u8]) -> Result<bool, String> {
    use Algorithm as A;
    let (family, params): (&str, &'static dyn VerificationAlgorithm) = match alg {
        A::Hs256 => return hmac(ring::hmac::HMAC_SHA256, alg, key, message, signature),
        A::Hs384 => return hmac(ring::hmac::HMAC_SHA384, alg, key, message, signature),
        A::Hs512 => return hmac(ring::hmac::HMAC_SHA512, alg, key, message, signature),
        A::Rs256 => ("rsa", &signature::RSA_PKCS1_2048_8192_SHA256),
        A::Rs384 => ("rsa", &signature::RSA_PKCS1_2048_8192_SHA384),
        A::Rs512 => ("rsa", &signature::RSA_PKCS1_2048_8192_SHA512),
        A::Ps256 => ("rsa", &signature::RSA_PSS_2048_8192_SHA256),
        A::Ps384 => ("rsa", &signature::RSA_PSS_2048_8192_SHA384),
        A::Ps512 => ("rsa", &signature::RSA_PSS_2048_8192_SHA512),
        A::Es256 => ("p256", &signature::ECDSA_P256_SHA256_FIXED),
        A::Es384 => ("p384", &signature::ECDSA_P384_SHA384_FIXED),
        A::EdDsa => ("ed25519", &signature::ED25519),
    };
    match key {
        Key::Secret(_) => Err(format!("{alg:?} needs a public key, not a shared secret")),
        Key::Rsa { n, e } => {
            if family != "rsa" {
                return Err(format!("{alg:?} cannot use an RSA key"));
            }
            // ring answers "does not verify" for an unusable key too; say it plainly instead,
            // so a 1024-bit key fails the load rather than every token.
            let bits = n
                .iter()
                .position(|b| *b != 0)
                .map(|i| (n.len() - i) * 8)
                .unwrap_or(0);
            if !(2048..=8192).contains(&bits) || e.iter().all(|b| *b == 0) {
                return Err(format!(
                    "RSA key of about {bits} bits is not usable (2048 to 8192 bits, non-zero exponent)"
                ));
            }
            let rsa = rsa_params(alg);
            Ok(RsaPublicKeyComponents { n, e }
                .verify(rsa, message, signature)
                .is_ok())
        }
        Key::Raw(bytes) => {
            let expected = match family {
                "p256" => 65,
                "p384" => 97,
                "ed25519" => 32,
                _ => return Err(format!("{alg:?} cannot use a raw EC/OKP key")),
            };
            if bytes.len() != expected {
                return Err(format!(
                    "{alg:?} key must be {expected} bytes, got {}",
                    bytes.len()
                ));
            }
            Ok(UnparsedPublicKey::new(params, bytes)
                .verify(message, signature)
                .is_ok())
        }
        Key::Spki(der) => {
            let info = spki::SubjectPublicKeyInfoRef::from_der(der)
                .map_err(|e| format!("not a DER SubjectPublicKeyInfo: {e}"))?;
            let oid = info.algorithm.oid.to_string();
            let curve = info
                .algorithm
                .parameters
                .and_then(|p| p.decode_as::<spki::ObjectIdentifier>().ok())
                .map(|o| o.to_string());
            let key_family = match (oid.as_str(), curve.as_deref()) {
                (OID_RSA, _) => "rsa",
                (OID_EC, Some(OID_P256)) => "p256",
                (OID_EC, Some(OID_P384)) => "p384",
                (OID_ED25519, _) => "ed25519",
                _ => return Err(format!("unsupported public key type {oid}")),
            };
            if key_family != family {
                return Err(format!("{alg:?} cannot use a {key_family} key"));
            }
            let bits = info
                .subject_public_key
                .as_bytes()
                .ok_or("public key bit string has unused bits")?;
            Ok(UnparsedPublicKey::new(params, bits)
                .verify(message, signature)
                .is_ok())
        }
    }
}

fn rsa_params(alg: Algorithm) -> &'static signature::RsaParameters {
    match alg {
        Algorithm::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
        Algorithm::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
        Algorithm::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => &signature::RSA_PKCS1_2048_8192_SHA256,
    }
}

fn hmac(
    h: ring::hmac::Algorithm,
    alg: Algorithm,
    key: &Key,
    message: &[u8],
    tag: &[u8],
) -> Result<bool, String> {
    let Key::Secret(secret) = key else {
        return Err(format!("{alg:?} needs a shared secret, not a public key"));
    };
    if secret.is_empty() {
        return Err("empty HMAC secret".into());
    }
    let k = ring::hmac::Key::new(h, secret);
    Ok(ring::hmac::verify(&k, message, tag).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_order_is_the_declaration_order() {
        for (i, a) in Algorithm::WIT_ORDER.iter().enumerate() {
            assert_eq!(*a as usize, i, "{a:?}");
        }
    }
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    #[test]
    fn ed25519_raw_and_family_checks() {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let sig = kp.sign(b"hello");
        let key = Key::Raw(kp.public_key().as_ref().to_vec());
        assert_eq!(
            verify(Algorithm::EdDsa, &key, b"hello", sig.as_ref()),
            Ok(true)
        );
        assert_eq!(
            verify(Algorithm::EdDsa, &key, b"hellp", sig.as_ref()),
            Ok(false)
        );
        assert!(verify(Algorithm::Es256, &key, b"hello", sig.as_ref()).is_err());
        assert!(verify(Algorithm::Hs256, &key, b"hello", sig.as_ref()).is_err());
    }

    #[test]
    fn hmac_needs_a_secret() {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
        let tag = ring::hmac::sign(&k, b"m");
        let key = Key::Secret(b"s3cret".to_vec());
        assert_eq!(verify(Algorithm::Hs256, &key, b"m", tag.as_ref()), Ok(true));
        assert_eq!(
            verify(Algorithm::Hs384, &key, b"m", tag.as_ref()),
            Ok(false)
        );
        assert!(verify(Algorithm::Rs256, &key, b"m", tag.as_ref()).is_err());
        assert!(verify(Algorithm::Hs256, &Key::Spki(vec![1, 2]), b"m", b"x").is_err());
    }

    #[test]
    fn short_rsa_keys_are_an_error_not_a_failed_signature() {
        let key = Key::Rsa {
            n: vec![0xff; 128],
            e: vec![1, 0, 1],
        };
        assert!(verify(Algorithm::Rs256, &key, b"m", b"s")
            .unwrap_err()
            .contains("1024 bits"));
        let ok_size = Key::Rsa {
            n: vec![0xff; 256],
            e: vec![1, 0, 1],
        };
        assert_eq!(verify(Algorithm::Rs256, &ok_size, b"m", b"s"), Ok(false));
    }

    #[test]
    fn spki_garbage_is_an_error() {
        assert!(verify(
            Algorithm::Rs256,
            &Key::Spki(vec![0x30, 0x03, 1, 2, 3]),
            b"m",
            b"s"
        )
        .is_err());
    }
}
