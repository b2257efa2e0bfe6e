//! The end-to-end tests: the real `tollgate` binary, real backends and clients on loopback.
//! One test binary, one module per area (tests/README.md maps the README's sections to them):
//! the support code and the gateway library are compiled and linked once, not once per file.
//! Run one area with e.g. `cargo test -p tollgate --test e2e closes::`.

mod support;

mod admin;
mod backends;
mod check_header;
mod closes;
mod cluster;
mod conformance;
mod console;
mod dashboard;
mod deploy;
mod edge;
mod faults;
mod fleet_example;
mod image;
mod ip_filter;
mod jwks;
mod jwt;
mod languages;
mod lifecycle;
mod limits;
mod manifest_errors;
mod message_limits;
mod message_policies;
mod misbehaving_backends;
mod misbehaving_clients;
mod observability;
mod passthrough;
mod policies;
mod rate_limit;
mod reload;
mod sandbox;
mod subscriptions;
mod tls;
mod upgrade;
mod wit_v2;
