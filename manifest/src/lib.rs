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
//!
//! The modules follow a manifest's way through the crate: `load` reads it, `raw` mirrors its
//! TOML, `validate` checks it section by section (with `secrets` for subscription keys and the
//! admin token, and `backend_url` for backend URLs) and builds the `model` types; every problem
//! found on the way is a [`ManifestError`] (`error`). The modules are private and what is public
//! is re-exported here, so that each item has one path (`tollgate_manifest::Config`) however
//! the files are cut.

mod backend_url;
mod error;
mod load;
mod model;
mod raw;
mod secrets;
#[cfg(test)]
mod test_util;
mod validate;

pub use backend_url::{parse_backend, BackendUrl};
pub use error::{ManifestError, ManifestErrors};
pub use load::{load, parse, parse_with_keys_file};
pub use model::{
    AdminConfig, ApiConfig, Attachment, ClusterConfig, Config, ConnLimits, GatewayConfig, Grants,
    Instances, KeyLocation, Limits, ListenerTls, MessageAttachment, MessageRates, OnStoreFailure,
    ProductConfig, Rate, RateAction, RateSpec, Scheme, Schemes, SubscriptionConfig,
    DEFAULT_MAX_INSPECTED_MESSAGE_SIZE, DEFAULT_POOL_MAX_USES, DEFAULT_SIGNATURE_CACHE_ENTRIES,
    MAX_HEADER_BYTES, MAX_INSPECTED_MESSAGE_SIZE, MIN_HEADER_BYTES,
};
pub use secrets::{key_digest, KeyDigest, MIN_ADMIN_TOKEN_CHARS, MIN_KEY_CHARS};
