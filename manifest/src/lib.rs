//! The TOML manifest: parsing, validation, and the validated [`Config`] the rest of the gateway
//! runs on.
//!
//! Parsing is strict (unknown keys are errors) and every error carries the manifest's path, the
//! line and column, and the dotted key it is about, so an operator can jump straight to it.
//! Validation collects *all* errors rather than stopping at the first, because `tollgate check`
//! promises to report every problem in one run.
//!
//! A crate of its own, without the wasm engine or any I/O besides reading the manifest and
//! keys file, so the parsers can be fuzzed (`fuzz/`) and the gateway re-exports it as
//! `tollgate::manifest`.

mod backend_url;
mod error;
mod load;
mod model;
mod raw;
#[cfg(test)]
mod test_util;
mod validate;

pub use backend_url::{parse_backend, BackendUrl};
pub use error::{ManifestError, ManifestErrors};
pub use load::{load, parse, parse_with_keys_file};
pub use model::{
    AdminConfig, ApiConfig, Attachment, Config, ConnLimits, GatewayConfig, Grants, Instances,
    KeyLocation, Limits, ListenerTls, ProductConfig, Scheme, Schemes, SubscriptionConfig,
    DEFAULT_POOL_MAX_USES, DEFAULT_SIGNATURE_CACHE_ENTRIES, MIN_HEADER_BYTES,
};

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 16;

/// SHA-256 of a subscription key.
pub type KeyDigest = [u8; 32];

/// The digest a key is stored and looked up by.
pub fn key_digest(key: &str) -> KeyDigest {
    use sha2::Digest;
    sha2::Sha256::digest(key.as_bytes()).into()
}

/// Shortest plain-text subscription key accepted (APIM's generated keys have 32 characters).
pub const MIN_KEY_CHARS: usize = 16;
