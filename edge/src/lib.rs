//! The gateway's rules for what arrives from the open internet, as pure functions: how a
//! request path is normalised before routing ([`path`]), which headers may appear only once
//! ([`headers`]), how query strings are read and redacted for logs ([`query`]), and whose
//! forwarding headers are believed ([`forwarded`]).
//!
//! A crate of its own, without I/O or the wasm engine, so each rule can be unit-tested and
//! fuzzed in isolation and reviewed in one place.

pub mod forwarded;
pub mod headers;
pub mod path;
pub mod query;
