//! The host side of the WIT boundary: a policy's decision of any size and content, through the
//! checks and effects the gateway applies (`tollgate_edge::decision`, which the gateway runs on
//! every decision after converting the engine's type).
//!
//! Invariants: never panics; a decision over the entry or byte caps is refused before any
//! effect; an accepted rejection has a 4xx/5xx status; an applied `proceed` leaves every
//! protected header of the backend request as it was, puts no protected or hop-by-hop header on
//! the 101, keeps the request's path, adds at most one header per set/append, and leaves the
//! view later policies get (headers, query, context) equal to the backend request.
#![no_main]

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate_edge::decision::{self as d, Decision, Pair, View};

#[derive(Arbitrary, Debug)]
enum Change {
    Set(String, String),
    Append(String, String),
    Remove(String),
}

#[derive(Arbitrary, Debug)]
enum Query {
    Set(String, String),
    Remove(String),
}

#[derive(Arbitrary, Debug)]
enum Fuzzed {
    Proceed {
        header_changes: Vec<Change>,
        query_changes: Vec<Query>,
        response_headers: Vec<(String, String)>,
        context: Vec<(String, String)>,
    },
    Reject {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    decision: Fuzzed,
    /// The backend request before the decision.
    headers: Vec<(String, String)>,
    path: String,
    query: Option<String>,
    /// Repeat the decision's lists this many times (bounded), to reach the caps cheaply.
    repeat: u8,
}

fn pair((name, value): (String, String)) -> Pair {
    Pair { name, value }
}

/// `v` repeated `times` times over.
fn cycle<T: Clone>(v: Vec<T>, times: usize) -> Vec<T> {
    let n = v.len().saturating_mul(times);
    v.into_iter().cycle().take(n).collect()
}

fn plain(f: Fuzzed, repeat: usize) -> Decision {
    match f {
        Fuzzed::Proceed {
            header_changes,
            query_changes,
            response_headers,
            context,
        } => {
            let hc: Vec<_> = header_changes
                .into_iter()
                .map(|c| match c {
                    Change::Set(n, v) => d::HeaderChange::Set(pair((n, v))),
                    Change::Append(n, v) => d::HeaderChange::Append(pair((n, v))),
                    Change::Remove(n) => d::HeaderChange::Remove(n),
                })
                .collect();
            let qc: Vec<_> = query_changes
                .into_iter()
                .map(|c| match c {
                    Query::Set(n, v) => d::QueryChange::Set(pair((n, v))),
                    Query::Remove(n) => d::QueryChange::Remove(n),
                })
                .collect();
            let rh: Vec<_> = response_headers.into_iter().map(pair).collect();
            let cx: Vec<_> = context.into_iter().map(pair).collect();
            Decision::Proceed(d::Proceed {
                header_changes: cycle(hc, repeat),
                query_changes: cycle(qc, repeat),
                response_headers: cycle(rh, repeat),
                context: cycle(cx, repeat),
            })
        }
        Fuzzed::Reject {
            status,
            headers,
            body,
        } => Decision::Reject(d::Rejection {
            status,
            headers: headers.into_iter().map(pair).collect(),
            body,
        }),
    }
}

fn values(h: &HeaderMap, name: &str) -> Vec<Vec<u8>> {
    h.get_all(name)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect()
}

fuzz_target!(|input: Input| {
    let repeat = usize::from(input.repeat % 8) + 1;
    let decision = plain(input.decision, repeat);
    let (entries, size) = decision.size();
    match decision.check_size() {
        Ok(()) => assert!(entries <= d::MAX_DECISION_ENTRIES && size <= d::MAX_DECISION_BYTES),
        Err(_) => {
            assert!(entries > d::MAX_DECISION_ENTRIES || size > d::MAX_DECISION_BYTES);
            return;
        }
    }
    match decision {
        Decision::Reject(r) => {
            let n = r.headers.len();
            if let Ok(rej) = d::rejection(r) {
                assert!((400..=599).contains(&rej.status.as_u16()));
                assert_eq!(rej.headers.len(), n);
            }
        }
        Decision::Proceed(p) => {
            let mut headers = HeaderMap::new();
            let mut view = View::default();
            for (n, v) in &input.headers {
                if let (Ok(hn), Ok(hv)) = (
                    HeaderName::from_bytes(n.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    view.headers.push(Pair {
                        name: hn.as_str().to_owned(),
                        value: v.clone(),
                    });
                    headers.append(hn, hv);
                }
            }
            let path = format!("/{}", input.path.replace('?', ""));
            let mut target = match &input.query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            let protected_before: Vec<_> =
                d::PROTECTED.iter().map(|n| values(&headers, n)).collect();
            let grows = p
                .header_changes
                .iter()
                .filter(|c| !matches!(c, d::HeaderChange::Remove(_)))
                .count();
            let (before_len, contexts, query_changed) =
                (headers.len(), p.context.len(), !p.query_changes.is_empty());
            let Ok(added) = d::apply(p, &mut headers, &mut target, &mut view) else {
                return;
            };
            for (n, before) in d::PROTECTED.iter().zip(&protected_before) {
                assert_eq!(&values(&headers, n), before, "protected header {n} changed");
            }
            for (n, _) in &added {
                assert!(
                    !d::protected_response_header(n.as_str()),
                    "{n} put on the 101"
                );
            }
            assert!(headers.len() <= before_len + grows);
            assert_eq!(
                target.split('?').next(),
                Some(path.as_str()),
                "path changed"
            );
            assert_eq!(view.context.len(), contexts);
            // Later policies see the backend request as it now is.
            let mut names: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
            names.extend(view.headers.iter().map(|h| h.name.as_str()));
            for n in names {
                let seen: Vec<&[u8]> = view
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(n))
                    .map(|h| h.value.as_bytes())
                    .collect();
                let sent: Vec<&[u8]> = headers.get_all(n).iter().map(|v| v.as_bytes()).collect();
                assert_eq!(
                    seen, sent,
                    "header {n}: the view and the backend request differ"
                );
            }
            if query_changed {
                let q = target.split_once('?').map_or("", |(_, q)| q);
                let parsed: Vec<(String, String)> = q
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once('=').unwrap_or((p, ""));
                        (decode(k), decode(v))
                    })
                    .collect();
                let seen: Vec<(String, String)> = view
                    .query
                    .iter()
                    .map(|p| (p.name.clone(), p.value.clone()))
                    .collect();
                assert_eq!(
                    seen, parsed,
                    "the view's query differs from the backend request's"
                );
            }
        }
    }
});

/// application/x-www-form-urlencoded decoding, written out (`+` a space, `%XX` a byte).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match (
                    (b[i + 1] as char).to_digit(16),
                    (b[i + 2] as char).to_digit(16),
                ) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
