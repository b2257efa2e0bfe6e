//! Tollgate: a WebSocket API gateway.
//!
//! A client's opening handshake goes through the [`handshake`] pipeline (route, validate, admit,
//! policies, backend handshake); only when the backend has answered 101 does the client get its
//! 101, and then the [`relay`] moves frames both ways until either side closes. The [`manifest`]
//! describes what is served; [`server`] runs it.

pub mod admin;
pub mod backend;
pub mod console;
pub mod handshake;
pub mod logging;
mod memory;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod reload;
pub mod routes;
pub mod server;
pub mod stream;
pub mod subscriptions;
pub mod wskey;

/// The frame parser lives in `tollgate-edge` (no wasm engine, so it can be fuzzed); the relay
/// and metrics keep using it as `crate::frame`.
pub use tollgate_edge::frame;
/// The manifest's parser and validated types live in `tollgate-manifest` (no wasm engine, so it
/// can be fuzzed).
pub use tollgate_manifest as manifest;
