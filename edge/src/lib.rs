//! The gateway's rules for what arrives from the open internet, as pure functions: how a
//! request path is normalised before routing ([`path`]), which headers may appear only once
//! ([`headers`]), how query strings are read and redacted for logs ([`query`]), and whose
//! forwarding headers are believed ([`forwarded`]), and how WebSocket frames relayed both ways
//! are checked as they stream by ([`frame`]) and held whole for message policies ([`assemble`]), at what rate messages may pass ([`rate`]); what a policy's decision may do to the backend
//! request and the client's 101 ([`decision`]); host names ([`host`]); and a client's request head as it arrives ([`head`]).
//!
//! A crate of its own, without I/O or the wasm engine, so each rule can be unit-tested and
//! fuzzed in isolation and reviewed in one place.

pub mod assemble;
pub mod decision;
pub mod forwarded;
pub mod frame;
pub mod head;
pub mod headers;
pub mod host;
pub mod path;
pub mod query;
pub mod rate;
