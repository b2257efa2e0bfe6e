//! The web console's watch of its own connections: what the gateway did to their messages
//! (a message policy's drop, replacement or close, a message rate's drop), which a browser
//! cannot see on the wire. The console asks the admin listener for a watch token
//! (`/console/watch`), offers it as a subprotocol when it connects, and reads the events
//! (`/console/events`) while the connection is open.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde_json::json;

/// Subprotocol prefix by which the web console marks its own connection as watched:
/// `tollgate-console.<watch token>`. Removed from every handshake before routing, so neither
/// policies nor the backend ever see it (a client that offers one only loses it).
pub const WATCH_PROTOCOL_PREFIX: &str = "tollgate-console.";
/// Watches kept at most: a new one pushes the oldest out.
pub const MAX_WATCHES: usize = 16;
/// Events kept per watch: the oldest go first.
pub const MAX_WATCH_EVENTS: usize = 256;
/// A watch no handshake has claimed is forgotten after this.
const UNCLAIMED_FOR: Duration = Duration::from_secs(60);
/// Longest text of a policy's error or close reason in an event.
const MAX_EVENT_TEXT: usize = 256;

/// What the web console is told about its own connection's messages: what a drop, a
/// replacement or a close by the gateway did, which the browser could not otherwise see (a
/// dropped message leaves no trace on the wire). Only connections the console opened with a
/// watch token the admin listener issued are watched, so the relay of every other connection
/// pays nothing, and a client cannot make the gateway record anything on its own. Events carry
/// sizes, never payloads.
#[derive(Default)]
pub struct Watches {
    inner: std::sync::Mutex<Vec<(String, Arc<Watch>)>>,
}

/// One watched connection's events.
pub struct Watch {
    issued: std::time::Instant,
    claimed: std::sync::atomic::AtomicBool,
    log: std::sync::Mutex<WatchLog>,
}

#[derive(Default)]
struct WatchLog {
    next: u64,
    events: std::collections::VecDeque<Recorded>,
}

/// An event as `/console/events` serves it.
#[derive(serde::Serialize)]
struct Recorded {
    seq: u64,
    /// Milliseconds since 1970.
    at: u64,
    sender: &'static str,
    happened: Happened,
    by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replaced_bytes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
}

/// What happened to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Happened {
    /// A message policy dropped it.
    Dropped,
    /// A message policy replaced its payload.
    Replaced,
    /// A message policy closed the connection on it.
    Closed,
    /// A message policy failed on it (the connection was closed 1011).
    Failed,
    /// Over a message rate with `action = "drop"`: not forwarded.
    OverRate,
}

/// One event of a watched connection.
pub struct WatchEvent<'a> {
    /// `client` or `backend`: whose message.
    pub sender: &'static str,
    pub happened: Happened,
    /// The policy's name, or the limit's key (`max_messages_per_second`).
    pub by: &'a str,
    /// Which message of the sender's the policies judged (1-based), when known.
    pub message: Option<u64>,
    /// The message's size, and the replacement's.
    pub bytes: Option<usize>,
    pub replaced_bytes: Option<usize>,
    /// A close's code and reason, or a failure's error; how many messages, for a rate.
    pub code: Option<u16>,
    pub text: Option<&'a str>,
    pub count: Option<u64>,
}

impl<'a> WatchEvent<'a> {
    /// An event with nothing more to say than who did what.
    pub fn new(sender: &'static str, happened: Happened, by: &'a str) -> WatchEvent<'a> {
        WatchEvent {
            sender,
            happened,
            by,
            message: None,
            bytes: None,
            replaced_bytes: None,
            code: None,
            text: None,
            count: None,
        }
    }
}

impl Watches {
    /// A new watch token (128 random bits, hex) for the console's next connection.
    pub fn issue(&self) -> String {
        let token: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|(_, watch)| {
            watch.claimed.load(std::sync::atomic::Ordering::Acquire)
                || watch.issued.elapsed() < UNCLAIMED_FOR
        });
        if w.len() >= MAX_WATCHES {
            // The oldest whose connection has ended (only this list holds it), else the oldest.
            let ended = w.iter().position(|(_, watch)| {
                watch.claimed.load(std::sync::atomic::Ordering::Acquire)
                    && Arc::strong_count(watch) == 1
            });
            w.remove(ended.unwrap_or(0));
        }
        w.push((
            token.clone(),
            Arc::new(Watch {
                issued: std::time::Instant::now(),
                claimed: Default::default(),
                log: Default::default(),
            }),
        ));
        token
    }

    /// The watch of `token` for the handshake that presents it, once: a second handshake with
    /// the same token is not watched.
    pub fn claim(&self, token: &str) -> Option<Arc<Watch>> {
        let w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (_, watch) = w.iter().find(|(t, _)| t == token)?;
        if watch.issued.elapsed() >= UNCLAIMED_FOR {
            return None;
        }
        (!watch
            .claimed
            .swap(true, std::sync::atomic::Ordering::AcqRel))
        .then(|| watch.clone())
    }

    /// The events of `token`'s watch after sequence number `after` (`/console/events`).
    pub fn events(&self, token: &str, after: u64) -> Option<serde_json::Value> {
        let watch = {
            let w = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            w.iter().find(|(t, _)| t == token)?.1.clone()
        };
        if !watch.claimed.load(std::sync::atomic::Ordering::Acquire)
            && watch.issued.elapsed() >= UNCLAIMED_FOR
        {
            return None;
        }
        let log = watch.log.lock().unwrap_or_else(|e| e.into_inner());
        let events: Vec<&Recorded> = log.events.iter().filter(|e| e.seq > after).collect();
        Some(json!({
            "watched": watch.claimed.load(std::sync::atomic::Ordering::Acquire),
            "events": events,
        }))
    }

    /// Takes the console's watch token out of a handshake's `Sec-WebSocket-Protocol` (every
    /// `tollgate-console.` token goes, whoever offered it) and claims its watch when the token
    /// is one this gateway issued. The header is rewritten only when such a token was there.
    pub fn take_from(&self, headers: &mut http::HeaderMap) -> Taken {
        let name = http::header::SEC_WEBSOCKET_PROTOCOL;
        // Bytes, not text: a line with bytes that are not visible ASCII must lose its console
        // tokens too (every other piece of it is put back as it was).
        let marked = |t: &[u8]| {
            t.len() >= WATCH_PROTOCOL_PREFIX.len()
                && t[..WATCH_PROTOCOL_PREFIX.len()]
                    .eq_ignore_ascii_case(WATCH_PROTOCOL_PREFIX.as_bytes())
        };
        let pieces = |v: &HeaderValue| -> Vec<Vec<u8>> {
            v.as_bytes()
                .split(|&b| b == b',')
                .map(|t| t.trim_ascii().to_vec())
                .filter(|t| !t.is_empty())
                .collect()
        };
        // The common case costs a scan and no allocation.
        if !headers.get_all(&name).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| marked(t.trim_ascii()))
        }) {
            return Taken::default();
        }
        let lines: Vec<Vec<Vec<u8>>> = headers.get_all(&name).iter().map(pieces).collect();
        headers.remove(&name);
        let mut console: Vec<Vec<u8>> = Vec::new();
        let mut others = 0;
        for line in lines {
            let (mine, kept): (Vec<Vec<u8>>, Vec<Vec<u8>>) =
                line.into_iter().partition(|t| marked(t));
            console.extend(mine);
            others += kept.len();
            if !kept.is_empty() {
                if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b", "[..])) {
                    headers.append(&name, v);
                }
            }
        }
        match console.as_slice() {
            [one] => Taken {
                watch: std::str::from_utf8(&one[WATCH_PROTOCOL_PREFIX.len()..])
                    .ok()
                    .and_then(|token| self.claim(token)),
                // A browser that offered subprotocols fails a 101 that names none: when the
                // console's was the only one, the client is answered with it (the backend was
                // offered none). With others offered, the client gets what the backend chose,
                // as any client would.
                echo: if others == 0 {
                    HeaderValue::from_bytes(one).ok()
                } else {
                    None
                },
            },
            _ => Taken::default(),
        }
    }
}

/// What [`Watches::take_from`] found in a handshake.
#[derive(Default)]
pub struct Taken {
    /// The console's watch, when it presented a token this gateway issued.
    pub watch: Option<Arc<Watch>>,
    /// The subprotocol the client is answered with when the console's was the only one it
    /// offered.
    pub echo: Option<HeaderValue>,
}

impl Watch {
    /// Records an event (the oldest goes when full); texts cut to [`MAX_EVENT_TEXT`] bytes.
    pub fn record(&self, e: WatchEvent<'_>) {
        let clip = |t: &str| t[..t.floor_char_boundary(MAX_EVENT_TEXT)].to_owned();
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.next += 1;
        let recorded = Recorded {
            seq: log.next,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            sender: e.sender,
            happened: e.happened,
            by: clip(e.by),
            message: e.message,
            bytes: e.bytes,
            replaced_bytes: e.replaced_bytes,
            code: e.code,
            text: e.text.map(clip),
            count: e.count,
        };
        if log.events.len() >= MAX_WATCH_EVENTS {
            log.events.pop_front();
        }
        log.events.push_back(recorded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protocols(h: &http::HeaderMap) -> Vec<&str> {
        h.get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }

    fn offered(values: &[&str]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for v in values {
            h.append(
                http::header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_console_token_is_taken_out_and_claimed_once() {
        let w = Watches::default();
        let token = w.issue();
        let marker = format!("{WATCH_PROTOCOL_PREFIX}{token}");
        // Alone: taken out, the client is answered with it.
        let mut h = offered(&[&marker]);
        let t = w.take_from(&mut h);
        assert!(t.watch.is_some());
        assert_eq!(t.echo.unwrap().to_str().unwrap(), marker);
        assert!(protocols(&h).is_empty());
        // A second handshake with the same token is not watched.
        let mut h = offered(&[&marker]);
        assert!(w.take_from(&mut h).watch.is_none());
        // Among others, over two header lines, any case: the others stay, nothing is echoed.
        let token = w.issue();
        let mut h = offered(&[
            "chat, TOLLGATE-CONSOLE.nope",
            &format!("{WATCH_PROTOCOL_PREFIX}{token}, v2"),
        ]);
        let t = w.take_from(&mut h);
        assert!(t.watch.is_none(), "two console tokens: neither is trusted");
        assert!(t.echo.is_none());
        assert_eq!(protocols(&h), ["chat", "v2"], "each line keeps what it had");
        // A token this gateway never issued is taken out and watches nothing.
        let mut h = offered(&["tollgate-console.0123", "chat"]);
        let t = w.take_from(&mut h);
        assert!(t.watch.is_none() && t.echo.is_none());
        assert_eq!(protocols(&h), ["chat"]);
        // A line with bytes that are not visible ASCII loses its console token too; the rest
        // of it stays as it was.
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_bytes(b"caf\xc3\xa9, tollgate-console.x").unwrap(),
        );
        assert!(w.take_from(&mut h).watch.is_none());
        let left: Vec<&[u8]> = h
            .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        assert_eq!(left, [&b"caf\xc3\xa9"[..]]);
        // Without one, the header is left exactly as it was.
        let mut h = offered(&["a,b", "c"]);
        assert!(w.take_from(&mut h).watch.is_none());
        assert_eq!(protocols(&h), ["a,b", "c"]);
    }

    #[test]
    fn watches_and_their_events_are_bounded() {
        let w = Watches::default();
        let first = w.issue();
        for _ in 0..MAX_WATCHES {
            w.issue();
        }
        assert!(w.events(&first, 0).is_none(), "the oldest watch made room");
        let token = w.issue();
        let watch = w.claim(&token).unwrap();
        for i in 0..MAX_WATCH_EVENTS + 10 {
            watch.record(WatchEvent {
                message: Some(i as u64 + 1),
                text: Some(&"x".repeat(1000)),
                ..WatchEvent::new("client", Happened::Dropped, "p")
            });
        }
        let all = w.events(&token, 0).unwrap();
        let events = all["events"].as_array().unwrap();
        assert_eq!(events.len(), MAX_WATCH_EVENTS);
        assert_eq!(events[0]["seq"], 11);
        assert_eq!(events[0]["text"].as_str().unwrap().len(), MAX_EVENT_TEXT);
        assert_eq!(all["watched"], true);
        let later = w.events(&token, 260).unwrap();
        assert_eq!(later["events"].as_array().unwrap().len(), 6);
        assert!(w.events("not-a-token", 0).is_none());
    }
}
