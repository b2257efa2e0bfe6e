//! The Rust SDK for Tollgate handshake policies.
//!
//! A policy is a WebAssembly component built for `wasm32-wasip2` against the
//! `handshake-policy` world in `wit/policy.wit`. This crate holds the generated bindings, so a
//! policy crate only implements [`Policy`] and calls [`export_policy!`]:
//!
//! ```ignore
//! use tollgate_sdk::{export_policy, Decision, Declaration, HandshakeRequest, Policy, Proceed};
//!
//! struct Hello;
//!
//! impl Policy for Hello {
//!     fn declare() -> Declaration {
//!         Declaration { name: "hello".into(), version: "0.1.0".into(), capabilities: vec![] }
//!     }
//!     fn configure(_config_json: String) -> Result<(), String> {
//!         Ok(())
//!     }
//!     fn on_handshake(_request: HandshakeRequest) -> Decision {
//!         Decision::Proceed(Proceed::default())
//!     }
//! }
//!
//! #[cfg(target_arch = "wasm32")]
//! export_policy!(Hello with_types_in tollgate_sdk);
//! ```
//!
//! (The `cfg` keeps native builds, which run the policy's unit tests, from trying to link the
//! component-model export names.)
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and drop the `.wasm` file into
//! the gateway's `plugin_dir`. On a native target the same crate compiles too, so a policy's
//! logic can be unit-tested with plain `cargo test` (calls into the host, such as logging, are
//! not available there).

wit_bindgen::generate!({
    path: "../wit",
    world: "handshake-policy",
    pub_export_macro: true,
    export_macro_name: "export_policy",
    default_bindings_module: "tollgate_sdk",
    generate_all,
});

/// The trait a policy implements (the exported `policy` interface).
pub use exports::tollgate::policy::policy::Guest as Policy;
/// Logging into the gateway's structured log.
pub use tollgate::policy::log;
/// Everything host and policy exchange.
pub use tollgate::policy::types::{
    Capability, Decision, Declaration, HandshakeRequest, HeaderChange, Pair, Proceed, QueryChange,
    Rejection, TlsInfo,
};

impl Default for Proceed {
    /// Continue unchanged.
    fn default() -> Self {
        Proceed {
            header_changes: Vec::new(),
            query_changes: Vec::new(),
            response_headers: Vec::new(),
            context: Vec::new(),
        }
    }
}

impl HandshakeRequest {
    /// The first value of header `name` (case-insensitive).
    ///
    /// ```ignore
    /// let token = request.header("authorization");
    /// ```
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
            .map(|p| p.value.as_str())
    }

    /// The first value of query parameter `name`.
    ///
    /// ```ignore
    /// let token = request.query_param("access_token");
    /// ```
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_str())
    }

    /// A context value set by an earlier policy, e.g. `jwt.sub`.
    ///
    /// ```ignore
    /// let user = request.context_value("jwt.sub");
    /// ```
    pub fn context_value(&self, key: &str) -> Option<&str> {
        self.context
            .iter()
            .find(|p| p.name == key)
            .map(|p| p.value.as_str())
    }
}

impl Pair {
    /// A name/value pair.
    ///
    /// ```ignore
    /// let p = tollgate_sdk::Pair::new("x-user", "ann");
    /// ```
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Pair {
        Pair {
            name: name.into(),
            value: value.into(),
        }
    }
}
