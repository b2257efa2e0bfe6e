//! The host side of a policy's onHandshake decision: what the gateway accepts from a guest and
//! how it applies it to the backend request, the client's 101 and the request later policies
//! see.
//!
//! A decision comes from untrusted code, so every part of it is checked before it has any
//! effect: its size (entries and bytes, [`check_size`]), the status of a rejection, every header
//! name and value, and that no protected header is touched. The gateway converts the wasm
//! engine's generated `Decision` into the plain types here (the fields move, nothing is copied)
//! so these rules live outside the engine and can be fuzzed on their own.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

/// Headers a policy may not touch: they belong to the WebSocket handshake itself.
pub const PROTECTED: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-accept",
    "content-length",
    "transfer-encoding",
];

/// Headers a policy may not put on the client's 101 besides [`PROTECTED`]: the two the backend
/// negotiates with the client (a second `Sec-WebSocket-Protocol` or `-Extensions` would
/// contradict what the relay speaks); the hop-by-hop ones ([`crate::headers::HOP_BY_HOP`])
/// describe a connection, not the response, and are refused too.
pub const PROTECTED_RESPONSE: &[&str] = &["sec-websocket-protocol", "sec-websocket-extensions"];

/// Whether a policy may not set, append or remove `lower` (a lower-cased name) on the backend
/// request: [`PROTECTED`] and every `Sec-WebSocket-*` (the gateway negotiates subprotocols and
/// extensions with the backend on the client's behalf and checks the answer against the
/// client's offer).
pub fn protected_request_header(lower: &str) -> bool {
    PROTECTED.contains(&lower) || lower.starts_with("sec-websocket-")
}

/// Whether a policy may not put `lower` (a lower-cased name) on the client's 101.
pub fn protected_response_header(lower: &str) -> bool {
    PROTECTED.contains(&lower)
        || PROTECTED_RESPONSE.contains(&lower)
        || crate::headers::HOP_BY_HOP.contains(&lower)
}

/// Largest decision a policy may return (all header, query and context strings plus a
/// rejection body, each entry counted with [`DECISION_ENTRY_BYTES`] on top). A bigger one is
/// treated as a policy failure: it would otherwise end up in the backend request or the
/// client's response.
pub const MAX_DECISION_BYTES: usize = 256 * 1024;
/// What each entry of a decision (header change, query change, response header, context value,
/// rejection header) counts towards [`MAX_DECISION_BYTES`] besides its strings: an entry costs
/// the gateway memory and work even when its strings are empty.
pub const DECISION_ENTRY_BYTES: usize = 32;
/// Most entries a decision may have, all lists together.
pub const MAX_DECISION_ENTRIES: usize = 1024;

/// A name and a value (a header, a query parameter, a context value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub name: String,
    pub value: String,
}

/// A change to the backend request's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderChange {
    Set(Pair),
    Append(Pair),
    Remove(String),
}

/// A change to the backend request's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryChange {
    Set(Pair),
    Remove(String),
}

/// Let the handshake go on, with these changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proceed {
    pub header_changes: Vec<HeaderChange>,
    pub query_changes: Vec<QueryChange>,
    /// Extra headers for the client's 101.
    pub response_headers: Vec<Pair>,
    /// Values later policies can read.
    pub context: Vec<Pair>,
}

/// Refuse the handshake with this response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub headers: Vec<Pair>,
    pub body: Vec<u8>,
}

/// A policy's verdict on one handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Proceed(Proceed),
    Reject(Rejection),
}

/// What a decision does that needs a declared capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Reject,
    ModifyHeaders,
    ModifyQuery,
    ModifyResponseHeaders,
    UseContext,
}

/// Why a decision cannot be applied; the gateway fails the handshake with the attachment's
/// failure status and logs this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("returned a decision of {0} entries (limit {MAX_DECISION_ENTRIES})")]
    TooManyEntries(usize),
    #[error("returned a decision of {0} bytes (limit {MAX_DECISION_BYTES}, each entry counting {DECISION_ENTRY_BYTES})")]
    TooBig(usize),
    #[error("rejected with invalid status {0}")]
    InvalidStatus(u16),
    #[error("invalid header name {0:?}")]
    InvalidHeaderName(String),
    #[error("invalid header value {0:?}")]
    InvalidHeaderValue(String),
    #[error("tried to change protected header `{0}` (Host, Connection, Upgrade, Sec-WebSocket-*, Content-Length and Transfer-Encoding cannot be changed on onHandshake)")]
    ProtectedHeader(String),
    #[error("tried to add protected response header `{0}` (the handshake's own headers, Content-Length, Sec-WebSocket-Protocol, Sec-WebSocket-Extensions and hop-by-hop headers cannot be set on the 101 or on a rejection)")]
    ProtectedResponseHeader(String),
}

impl Decision {
    /// (entries, bytes) of the decision, each entry's bytes including [`DECISION_ENTRY_BYTES`].
    pub fn size(&self) -> (usize, usize) {
        let pair = |p: &Pair| DECISION_ENTRY_BYTES + p.name.len() + p.value.len();
        let name = |n: &String| DECISION_ENTRY_BYTES + n.len();
        match self {
            Decision::Reject(r) => (
                r.headers.len(),
                r.body.len() + r.headers.iter().map(pair).sum::<usize>(),
            ),
            Decision::Proceed(p) => (
                p.header_changes.len()
                    + p.query_changes.len()
                    + p.response_headers.len()
                    + p.context.len(),
                p.header_changes
                    .iter()
                    .map(|c| match c {
                        HeaderChange::Set(h) | HeaderChange::Append(h) => pair(h),
                        HeaderChange::Remove(n) => name(n),
                    })
                    .sum::<usize>()
                    + p.query_changes
                        .iter()
                        .map(|c| match c {
                            QueryChange::Set(q) => pair(q),
                            QueryChange::Remove(n) => name(n),
                        })
                        .sum::<usize>()
                    + p.response_headers.iter().map(pair).sum::<usize>()
                    + p.context.iter().map(pair).sum::<usize>(),
            ),
        }
    }

    /// Fails a decision over [`MAX_DECISION_ENTRIES`] or [`MAX_DECISION_BYTES`]; checked before
    /// anything else, so an oversized decision has no effect at all.
    pub fn check_size(&self) -> Result<(), DecisionError> {
        let (entries, size) = self.size();
        if entries > MAX_DECISION_ENTRIES {
            return Err(DecisionError::TooManyEntries(entries));
        }
        if size > MAX_DECISION_BYTES {
            return Err(DecisionError::TooBig(size));
        }
        Ok(())
    }

    /// What the decision does that needs a capability, with how the log words it, in the order
    /// the gateway checks them.
    pub fn uses(&self) -> Vec<(Use, &'static str)> {
        match self {
            Decision::Reject(_) => vec![(Use::Reject, "rejected the handshake")],
            Decision::Proceed(p) => [
                (
                    !p.header_changes.is_empty(),
                    Use::ModifyHeaders,
                    "changed backend request headers",
                ),
                (
                    !p.query_changes.is_empty(),
                    Use::ModifyQuery,
                    "changed the backend request's query",
                ),
                (
                    !p.response_headers.is_empty(),
                    Use::ModifyResponseHeaders,
                    "added 101 response headers",
                ),
                (!p.context.is_empty(), Use::UseContext, "set context values"),
            ]
            .into_iter()
            .filter(|(used, _, _)| *used)
            .map(|(_, u, what)| (u, what))
            .collect(),
        }
    }
}

fn value(v: &str) -> Result<HeaderValue, DecisionError> {
    HeaderValue::from_str(v).map_err(|_| DecisionError::InvalidHeaderValue(v.to_owned()))
}

/// A rejection, checked: a 4xx or 5xx status and valid header names and values.
#[derive(Debug)]
pub struct Rejected {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Vec<u8>,
}

/// Checks a rejection the client is to get.
pub fn rejection(r: Rejection) -> Result<Rejected, DecisionError> {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .ok_or(DecisionError::InvalidStatus(r.status))?;
    let mut headers = Vec::with_capacity(r.headers.len());
    for h in r.headers {
        let n = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| DecisionError::InvalidHeaderName(h.name.clone()))?;
        // The rejection is the gateway's own answer: its framing (Content-Length,
        // Transfer-Encoding), `Connection: close` and the handshake's headers are not a
        // policy's to set.
        if protected_response_header(n.as_str()) {
            return Err(DecisionError::ProtectedResponseHeader(h.name));
        }
        headers.push((n, value(&h.value)?));
    }
    Ok(Rejected {
        status,
        headers,
        body: r.body,
    })
}

/// The handshake request as the next policy in the chain sees it; updated as each decision is
/// applied, so later policies see the request as it now is.
pub trait PolicyView {
    /// Header `lower` (lower-cased) was set to `value` (replacing every earlier value),
    /// appended to (`append`), or removed (`value` is `None`).
    fn header_changed(&mut self, lower: &str, value: Option<&str>, append: bool);
    /// The query is now exactly `pairs`.
    fn query_replaced(&mut self, pairs: &[(String, String)]);
    /// A policy added context values.
    fn context_added(&mut self, context: Vec<Pair>);
}

/// The plain view [`apply`] updates in tests and the fuzz targets (the gateway implements
/// [`PolicyView`] on the engine's own request type).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub headers: Vec<Pair>,
    pub query: Vec<Pair>,
    pub context: Vec<Pair>,
}

impl PolicyView for View {
    fn header_changed(&mut self, lower: &str, value: Option<&str>, append: bool) {
        self.headers
            .retain(|h| append || !h.name.eq_ignore_ascii_case(lower));
        if let Some(v) = value {
            self.headers.push(Pair {
                name: lower.to_owned(),
                value: v.to_owned(),
            });
        }
    }

    fn query_replaced(&mut self, pairs: &[(String, String)]) {
        self.query = pairs
            .iter()
            .map(|(k, v)| Pair {
                name: k.clone(),
                value: v.clone(),
            })
            .collect();
    }

    fn context_added(&mut self, context: Vec<Pair>) {
        self.context.extend(context);
    }
}

/// Applies a `proceed` decision: its header changes to `headers`, its query changes to
/// `target` (path and query of the backend request), its context to `view`. Returns the
/// headers for the client's 101.
///
/// The first invalid or protected entry fails the whole decision (the handshake is then
/// refused, so changes already made to `headers` never reach a backend).
pub fn apply(
    p: Proceed,
    headers: &mut HeaderMap,
    target: &mut String,
    view: &mut impl PolicyView,
) -> Result<Vec<(HeaderName, HeaderValue)>, DecisionError> {
    for change in &p.header_changes {
        let (target_name, append) = match change {
            HeaderChange::Set(h) => (h.name.as_str(), false),
            HeaderChange::Append(h) => (h.name.as_str(), true),
            HeaderChange::Remove(n) => (n.as_str(), false),
        };
        let lower = target_name.to_ascii_lowercase();
        if protected_request_header(&lower) {
            return Err(DecisionError::ProtectedHeader(target_name.to_owned()));
        }
        let hn = HeaderName::from_bytes(lower.as_bytes())
            .map_err(|_| DecisionError::InvalidHeaderName(target_name.to_owned()))?;
        match change {
            HeaderChange::Set(h) => {
                headers.insert(hn, value(&h.value)?);
            }
            HeaderChange::Append(h) => {
                headers.append(hn, value(&h.value)?);
            }
            HeaderChange::Remove(_) => {
                headers.remove(&hn);
            }
        }
        let new = match change {
            HeaderChange::Set(h) | HeaderChange::Append(h) => Some(h.value.as_str()),
            HeaderChange::Remove(_) => None,
        };
        view.header_changed(&lower, new, append);
    }
    if !p.query_changes.is_empty() {
        apply_query(target, &p.query_changes, view);
    }
    let mut response_headers = Vec::with_capacity(p.response_headers.len());
    for h in p.response_headers {
        let lower = h.name.to_ascii_lowercase();
        if protected_response_header(&lower) {
            return Err(DecisionError::ProtectedResponseHeader(h.name));
        }
        let n = HeaderName::from_bytes(lower.as_bytes())
            .map_err(|_| DecisionError::InvalidHeaderName(h.name.clone()))?;
        response_headers.push((n, value(&h.value)?));
    }
    view.context_added(p.context);
    Ok(response_headers)
}

/// Applies query changes to `target`: the path is kept as it is, the query re-encoded.
fn apply_query(target: &mut String, changes: &[QueryChange], view: &mut impl PolicyView) {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.clone(), String::new()),
    };
    let mut pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    for c in changes {
        match c {
            QueryChange::Set(p) => {
                pairs.retain(|(k, _)| k != &p.name);
                pairs.push((p.name.clone(), p.value.clone()));
            }
            QueryChange::Remove(n) => pairs.retain(|(k, _)| k != n),
        }
    }
    view.query_replaced(&pairs);
    *target = if pairs.is_empty() {
        path
    } else {
        let q = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        format!("{path}?{q}")
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(n: &str, v: &str) -> Pair {
        Pair {
            name: n.into(),
            value: v.into(),
        }
    }

    #[test]
    fn changes_reach_the_request_and_the_view_in_order() {
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert("host", HeaderValue::from_static("h"));
        let mut target = "/p?a=1&b=2".to_owned();
        let mut view = View {
            headers: vec![pair("x-a", "1"), pair("host", "h")],
            ..View::default()
        };
        let out = apply(
            Proceed {
                header_changes: vec![
                    HeaderChange::Set(pair("X-A", "2")),
                    HeaderChange::Append(pair("x-a", "3")),
                    HeaderChange::Set(pair("x-b", "b")),
                    HeaderChange::Remove("x-b".into()),
                ],
                query_changes: vec![
                    QueryChange::Remove("a".into()),
                    QueryChange::Set(pair("c", "x y")),
                ],
                response_headers: vec![pair("X-R", "r")],
                context: vec![pair("k", "v")],
            },
            &mut headers,
            &mut target,
            &mut view,
        )
        .unwrap();
        let xa: Vec<_> = headers.get_all("x-a").iter().collect();
        assert_eq!(xa, ["2", "3"]);
        assert!(headers.get("x-b").is_none());
        assert_eq!(target, "/p?b=2&c=x+y");
        assert_eq!(
            view.headers,
            [pair("host", "h"), pair("x-a", "2"), pair("x-a", "3")]
        );
        assert_eq!(view.query, [pair("b", "2"), pair("c", "x y")]);
        assert_eq!(view.context, [pair("k", "v")]);
        assert_eq!(out[0].0.as_str(), "x-r");
    }

    #[test]
    fn protected_invalid_and_oversized_decisions_fail() {
        let proceed = |c: HeaderChange| {
            apply(
                Proceed {
                    header_changes: vec![c],
                    ..Proceed::default()
                },
                &mut HeaderMap::new(),
                &mut "/".to_owned(),
                &mut View::default(),
            )
            .unwrap_err()
        };
        assert!(matches!(
            proceed(HeaderChange::Remove("Host".into())),
            DecisionError::ProtectedHeader(_)
        ));
        assert!(matches!(
            proceed(HeaderChange::Set(pair("a b", "x"))),
            DecisionError::InvalidHeaderName(_)
        ));
        assert!(matches!(
            proceed(HeaderChange::Set(pair("a", "x\ny"))),
            DecisionError::InvalidHeaderValue(_)
        ));
        let r = apply(
            Proceed {
                response_headers: vec![pair("Keep-Alive", "x")],
                ..Proceed::default()
            },
            &mut HeaderMap::new(),
            &mut "/".to_owned(),
            &mut View::default(),
        );
        assert!(matches!(r, Err(DecisionError::ProtectedResponseHeader(_))));
        for status in [0, 200, 399, 600, 1000] {
            let r = rejection(Rejection {
                status,
                headers: vec![],
                body: vec![],
            });
            assert!(matches!(r, Err(DecisionError::InvalidStatus(s)) if s == status));
        }
        let big = Decision::Reject(Rejection {
            status: 403,
            headers: vec![],
            body: vec![0; MAX_DECISION_BYTES + 1],
        });
        assert_eq!(
            big.check_size(),
            Err(DecisionError::TooBig(MAX_DECISION_BYTES + 1))
        );
        let many = Decision::Proceed(Proceed {
            context: vec![pair("", ""); MAX_DECISION_ENTRIES + 1],
            ..Proceed::default()
        });
        assert_eq!(
            many.check_size(),
            Err(DecisionError::TooManyEntries(MAX_DECISION_ENTRIES + 1))
        );
    }

    // ---- Found by `cargo mutants` (tests/README.md). ----

    #[test]
    fn size_counts_every_string_and_every_entry() {
        let e = DECISION_ENTRY_BYTES;
        let d = Decision::Proceed(Proceed {
            header_changes: vec![
                HeaderChange::Set(pair("ab", "cde")), // e + 5
                HeaderChange::Append(pair("f", "")),  // e + 1
                HeaderChange::Remove("ghij".into()),  // e + 4
            ],
            query_changes: vec![
                QueryChange::Set(pair("k", "lm")),   // e + 3
                QueryChange::Remove("nopqr".into()), // e + 5
            ],
            response_headers: vec![pair("s", "tuvwxy")], // e + 7
            context: vec![pair("", ""), pair("z", "1")], // e + 0, e + 2
        });
        assert_eq!(d.size(), (8, 8 * e + 5 + 1 + 4 + 3 + 5 + 7 + 2));
        let r = Decision::Reject(Rejection {
            status: 401,
            headers: vec![pair("www-authenticate", "Bearer"), pair("x", "")],
            body: b"nope".to_vec(),
        });
        assert_eq!(r.size(), (2, 2 * e + 16 + 6 + 1 + 4));
    }

    #[test]
    fn the_size_limits_hold_exactly_at_their_value() {
        let entries = |n: usize| {
            Decision::Proceed(Proceed {
                context: vec![pair("", ""); n],
                ..Proceed::default()
            })
        };
        assert_eq!(entries(MAX_DECISION_ENTRIES).check_size(), Ok(()));
        assert_eq!(
            entries(MAX_DECISION_ENTRIES + 1).check_size(),
            Err(DecisionError::TooManyEntries(MAX_DECISION_ENTRIES + 1))
        );
        let body = |n: usize| {
            Decision::Reject(Rejection {
                status: 403,
                headers: Vec::new(),
                body: vec![b'x'; n],
            })
        };
        assert_eq!(body(MAX_DECISION_BYTES).check_size(), Ok(()));
        assert_eq!(
            body(MAX_DECISION_BYTES + 1).check_size(),
            Err(DecisionError::TooBig(MAX_DECISION_BYTES + 1))
        );
        assert_eq!(MAX_DECISION_BYTES, 262_144);
    }

    #[test]
    fn uses_name_exactly_what_a_decision_does() {
        assert_eq!(
            Decision::Proceed(Proceed::default()).uses(),
            Vec::<(Use, &str)>::new()
        );
        let all = Decision::Proceed(Proceed {
            header_changes: vec![HeaderChange::Remove("x".into())],
            query_changes: vec![QueryChange::Remove("q".into())],
            response_headers: vec![pair("r", "1")],
            context: vec![pair("c", "1")],
        });
        let uses: Vec<Use> = all.uses().into_iter().map(|(u, _)| u).collect();
        assert_eq!(
            uses,
            vec![
                Use::ModifyHeaders,
                Use::ModifyQuery,
                Use::ModifyResponseHeaders,
                Use::UseContext
            ]
        );
        let only_context = Decision::Proceed(Proceed {
            context: vec![pair("c", "1")],
            ..Proceed::default()
        });
        assert_eq!(
            only_context.uses(),
            vec![(Use::UseContext, "set context values")]
        );
        let reject = Decision::Reject(Rejection {
            status: 401,
            headers: Vec::new(),
            body: Vec::new(),
        });
        assert_eq!(reject.uses(), vec![(Use::Reject, "rejected the handshake")]);
    }

    #[test]
    fn a_rejection_is_a_4xx_or_5xx_with_valid_headers() {
        let r = |status: u16, headers: Vec<Pair>| Rejection {
            status,
            headers,
            body: Vec::new(),
        };
        for ok in [400u16, 401, 499, 500, 599] {
            assert!(rejection(r(ok, Vec::new())).is_ok(), "{ok}");
        }
        for bad in [0u16, 101, 200, 302, 399, 600, 1000] {
            assert_eq!(
                rejection(r(bad, Vec::new())).err(),
                Some(DecisionError::InvalidStatus(bad))
            );
        }
        assert_eq!(
            rejection(r(403, vec![pair("bad name", "v")])).err(),
            Some(DecisionError::InvalidHeaderName("bad name".into()))
        );
        assert_eq!(
            rejection(r(403, vec![pair("x", "a\r\nb")])).err(),
            Some(DecisionError::InvalidHeaderValue("a\r\nb".into()))
        );
        // The response's framing and connection headers stay the gateway's.
        for name in [
            "Content-Length",
            "transfer-encoding",
            "Connection",
            "keep-alive",
            "upgrade",
            "sec-websocket-accept",
            "sec-websocket-protocol",
        ] {
            assert_eq!(
                rejection(r(403, vec![pair(name, "1")])).err(),
                Some(DecisionError::ProtectedResponseHeader(name.into())),
                "{name}"
            );
        }
        let ok = rejection(r(
            401,
            vec![pair("WWW-Authenticate", "Bearer"), pair("Retry-After", "5")],
        ));
        assert_eq!(ok.map(|r| r.headers.len()).ok(), Some(2));
    }

    #[test]
    fn protected_headers_each_way() {
        for h in [
            "host",
            "sec-websocket-key",
            "sec-websocket-protocol",
            "sec-websocket-anything",
        ] {
            assert!(protected_request_header(h), "{h}");
        }
        assert!(!protected_request_header("x-user"));
        for h in [
            "host",
            "sec-websocket-accept",
            "sec-websocket-protocol",
            "sec-websocket-extensions",
            "keep-alive",
            "te",
            "proxy-authenticate",
        ] {
            assert!(protected_response_header(h), "{h}");
        }
        assert!(!protected_response_header("x-served-by"));
    }
}
