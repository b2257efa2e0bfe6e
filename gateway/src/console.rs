//! The test consoles: the web page served at `/console` on the admin listener, and what it
//! needs from the gateway.
//!
//! The page (`console.html`, self-contained: no CDN) lists the APIs from `/apis`, opens a
//! browser WebSocket to the gateway's client listener, and sends and shows messages. A browser
//! never learns the HTTP status of a refused WebSocket handshake (the WebSocket API reports
//! only "closed, 1006"), so when a handshake fails the page asks [`probe`] to repeat it from
//! the gateway host and report what the gateway answered.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use serde_json::json;

use crate::backend::{BackendError, Connector};
use crate::server::Gateway;

/// Repeats a handshake against the gateway's own client listener. `query` holds `target`
/// (path and query), `scheme` (`ws` or `wss`) and `protocols` (comma-separated). The browser's
/// `origin` is sent along, so origin-checking policies decide as they did for the browser.
/// Answers `{"status": N, "body": "..."}` or `{"error": "..."}`. An accepted probe is closed at
/// once (it shows in the logs and metrics as a short connection).
pub async fn probe(gw: &Gateway, query: &str, origin: Option<&str>) -> serde_json::Value {
    let mut target = String::from("/");
    let mut scheme = String::from("ws");
    let mut protocols = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "target" => target = v.into_owned(),
            "scheme" => scheme = v.into_owned(),
            "protocols" => {
                protocols = v
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            _ => {}
        }
    }
    if !target.starts_with('/') {
        return json!({"error": "target must start with /"});
    }
    let Some(addr) = gw
        .bound
        .get()
        .and_then(|b| b.iter().find(|(s, _)| *s == scheme).map(|(_, a)| *a))
    else {
        return json!({"error": format!("no {scheme} listener")});
    };
    let host = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new(
            if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            },
            addr.port(),
        )
    } else {
        addr
    };
    let url = match crate::manifest::parse_backend(&format!("{scheme}://{host}/")) {
        Ok(u) => u,
        Err(e) => return json!({"error": e}),
    };
    // The gateway's own certificate, reached by address: nothing to verify it against, and
    // nothing secret travels on this connection.
    let tls = if scheme == "wss" {
        match crate::backend::client_tls_config(None, true) {
            Ok(c) => Some(c),
            Err(e) => return json!({"error": e.to_string()}),
        }
    } else {
        None
    };
    let connector = match Connector::new(url.clone(), tls, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(e) => return json!({"error": e}),
    };
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&url.host_header()) {
        headers.insert(http::header::HOST, v);
    }
    headers.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    headers.insert(
        http::header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    if let Some(o) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        headers.insert(http::header::ORIGIN, o);
    }
    match connector.handshake(&target, headers, &protocols, &[]).await {
        Ok(_upgraded) => json!({"status": 101}),
        Err(BackendError::Rejected { status, body, .. }) => json!({
            "status": status.as_u16(),
            "body": String::from_utf8_lossy(&body[..body.len().min(4096)]),
        }),
        Err(e) => json!({"error": e.to_string()}),
    }
}
