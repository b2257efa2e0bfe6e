//! Tollgate: a WebSocket API gateway.
//!
//! A client's opening handshake goes through the [`handshake`] pipeline (route, validate, admit,
//! policies, backend handshake); only when the backend has answered 101 does the client get its
//! 101, and then the [`relay`] moves frames both ways until either side closes. The [`manifest`]
//! describes what is served; [`server`] runs it.

pub mod admin;
pub mod backend;
pub mod capabilities;
pub mod chain;
pub mod console;
pub mod frame;
pub mod handshake;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod plugin_cache;
pub mod policy;
pub mod relay;
pub mod reload;
pub mod routes;
pub mod server;
pub mod stream;
pub mod subscriptions;
pub mod verify_cache;
pub mod wskey;
