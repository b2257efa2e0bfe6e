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

/// Repeats a handshake against the gateway's own client listener. `query` holds `target`
/// (path and query), `scheme` (`ws` or `wss`) and `protocols` (comma-separated). The browser's
/// `origin` is sent along, so origin-checking policies decide as they did for the browser.
/// Answers `{"status": N, "body": "..."}` or `{"error": "..."}`. An accepted probe is closed at
/// once (it shows in the logs and metrics as a short connection).
pub async fn probe(
    listeners: &[(crate::manifest::Scheme, std::net::SocketAddr)],
    query: &str,
    origin: Option<&str>,
) -> serde_json::Value {
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
    let Some(addr) = listeners
        .iter()
        .find(|(s, _)| s.as_str() == scheme)
        .map(|(_, a)| *a)
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
    let mut headers = opening_headers(&url, &protocols);
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

/// The opening handshake's own headers towards `url`, offering `protocols`.
fn opening_headers(url: &crate::manifest::BackendUrl, protocols: &[String]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    crate::backend::opening_headers(url, &mut headers);
    if !protocols.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&protocols.join(", ")) {
            headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, v);
        }
    }
    headers
}

/// What `tollgate console` is asked to do.
pub struct TermArgs {
    pub url: String,
    /// `Name: value` or `Name:value`.
    pub headers: Vec<String>,
    /// `name=value`, appended to the URL's query.
    pub query: Vec<(String, String)>,
    pub subprotocols: Vec<String>,
    /// Extra CA certificate (PEM) for a wss URL.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The terminal console: opens the WebSocket, prints the handshake's status, sends each typed
/// line as a text message, and prints what arrives with direction marks (`>` sent, `<`
/// received, `*` status). `/binary HEX`, `/ping [TEXT]`, `/close [CODE [REASON]]`; end of input
/// (Ctrl-D) closes with 1000 and exits. Returns the process exit code: 0 after a clean session,
/// 1 when the handshake failed or the connection broke.
///
/// The handshake goes through the gateway's own backend connector (same TLS settings and
/// checks as towards a backend); the frames after it through tungstenite.
pub async fn terminal(args: TermArgs) -> i32 {
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncBufReadExt;
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
    use tokio_tungstenite::tungstenite::Message;

    let say = |s: &str| println!("* {s}");
    let url = match crate::manifest::parse_backend(&args.url) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("{}: {e}", args.url);
            return 2;
        }
    };
    let tls = if url.tls {
        match crate::backend::client_tls_config(args.ca_file.as_deref(), false) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        }
    } else {
        None
    };
    let mut headers = opening_headers(&url, &args.subprotocols);
    for h in &args.headers {
        let parsed = h.split_once(':').and_then(|(k, v)| {
            Some((
                http::HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
                HeaderValue::from_str(v.trim()).ok()?,
            ))
        });
        match parsed {
            Some((k, v)) => {
                headers.append(k, v);
            }
            None => {
                eprintln!("--header {h:?}: expected `Name: value`");
                return 2;
            }
        }
    }
    let mut pairs: Vec<(String, String)> = url
        .query
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    pairs.extend(args.query.iter().cloned());
    let target = if pairs.is_empty() {
        url.path.clone()
    } else {
        let q = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&pairs)
            .finish();
        format!("{}?{q}", url.path)
    };
    let mut url_no_query = url.clone();
    url_no_query.query = None;
    let connector = match Connector::new(url_no_query, tls, Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let upgraded = match connector
        .handshake(&target, headers, &args.subprotocols, &[])
        .await
    {
        Ok(u) => u,
        Err(BackendError::Rejected { status, body, .. }) => {
            say(&format!(
                "handshake refused: {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ));
            let body = String::from_utf8_lossy(&body);
            if !body.trim().is_empty() {
                say(body.trim());
            }
            return 1;
        }
        Err(e) => {
            say(&format!("handshake failed: {e}"));
            return 1;
        }
    };
    let protocol = upgraded
        .headers
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(|p| format!(", subprotocol {p}"))
        .unwrap_or_default();
    say(&format!("connected: 101 Switching Protocols{protocol}"));
    say("type a line to send it as text; /binary HEX, /ping [TEXT], /close [CODE [REASON]]; Ctrl-D closes");
    let mut ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        upgraded.stream,
        upgraded.prefix.to_vec(),
        Role::Client,
        None,
    )
    .await;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut input_open = true;
    let mut closing = false;
    loop {
        tokio::select! {
            line = lines.next_line(), if input_open && !closing => {
                let out = match line {
                    Ok(Some(l)) => match command(&l) {
                        Ok(m) => m,
                        Err(e) => { say(&e); continue; }
                    },
                    // Ctrl-D (or the input's end): close politely.
                    _ => {
                        input_open = false;
                        Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))
                    }
                };
                match &out {
                    Message::Text(t) => println!("> {t}"),
                    Message::Binary(b) => println!("> [binary {} B] {}", b.len(), hex(b)),
                    Message::Ping(p) => println!("> [ping] {}", String::from_utf8_lossy(p)),
                    Message::Close(c) => {
                        closing = true;
                        match c {
                            Some(c) => println!("> [close {} {}]", u16::from(c.code), c.reason),
                            None => println!("> [close]"),
                        }
                    }
                    _ => {}
                }
                if let Err(e) = ws.send(out).await {
                    say(&format!("send failed: {e}"));
                    return 1;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => println!("< {t}"),
                Some(Ok(Message::Binary(b))) => println!("< [binary {} B] {}", b.len(), hex(&b)),
                Some(Ok(Message::Ping(p))) => println!("< [ping] {}", String::from_utf8_lossy(&p)),
                Some(Ok(Message::Pong(p))) => println!("< [pong] {}", String::from_utf8_lossy(&p)),
                Some(Ok(Message::Close(c))) => {
                    match c {
                        Some(c) => println!("< [close {} {}]", u16::from(c.code), c.reason),
                        None => println!("< [close]"),
                    }
                    // tungstenite answers the close; drive it out, then stop.
                    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                    say("closed");
                    return 0;
                }
                Some(Ok(Message::Frame(_))) => {}
                Some(Err(e)) => {
                    if closing {
                        say("closed");
                        return 0;
                    }
                    say(&format!("connection error: {e}"));
                    return 1;
                }
                None => {
                    say("connection ended");
                    return if closing { 0 } else { 1 };
                }
            },
        }
    }
}

/// One typed line as the message to send.
fn command(line: &str) -> Result<tokio_tungstenite::tungstenite::Message, String> {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Message::text(line));
    };
    let (cmd, arg) = rest.split_once(' ').unwrap_or((rest, ""));
    match cmd {
        "binary" => parse_hex(arg).map(Message::binary),
        "ping" => Ok(Message::Ping(arg.as_bytes().to_vec().into())),
        "close" => {
            let (code, reason) = arg.trim().split_once(' ').unwrap_or((arg.trim(), ""));
            let code: u16 = if code.is_empty() {
                1000
            } else {
                code.parse()
                    .map_err(|_| format!("/close: {code:?} is not a close code"))?
            };
            Ok(Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            })))
        }
        // `//text` sends `/text`.
        _ if rest.starts_with('/') => Ok(Message::text(rest)),
        _ => Err(format!(
            "unknown command /{cmd}: /binary HEX, /ping [TEXT], /close [CODE [REASON]] (start a text message with // to send a leading /)"
        )),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let clean: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':' && *c != ',')
        .collect();
    if !clean.len().is_multiple_of(2) {
        return Err("/binary: an even number of hex digits is needed".into());
    }
    (0..clean.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&clean[i..i + 2], 16)
                .map_err(|_| format!("/binary: {:?} is not hex", &clean[i..i + 2]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::Message;

    #[test]
    fn typed_lines_become_messages() {
        assert_eq!(command("hi").unwrap(), Message::text("hi"));
        assert_eq!(
            command("/binary 01 ff7e").unwrap(),
            Message::binary(vec![1u8, 0xff, 0x7e])
        );
        assert!(command("/binary 0").is_err());
        assert!(command("/binary zz").is_err());
        assert_eq!(command("//x").unwrap(), Message::text("/x"));
        assert!(command("/nope").is_err());
        match command("/close 4000 bye now").unwrap() {
            Message::Close(Some(c)) => {
                assert_eq!(u16::from(c.code), 4000);
                assert_eq!(c.reason.as_str(), "bye now");
            }
            m => panic!("{m:?}"),
        }
    }
}
