//! The opening handshake's pure rules, up to the backend request: path normalisation, the header
//! rules every handshake must meet, taking the subscription key out of the query (and redacting
//! queries for logs), and the forwarding headers.
//!
//! Invariants: nothing panics, and
//! - a normalised path is absolute, has no empty, `.` or `..` segment, no `\`, normalises to
//!   itself without climbing (idempotent), and for paths of plain letters, dots and slashes
//!   agrees with a simple stack-based reference, including refusing a `..` above the root;
//! - `headers::check` accepts exactly the header maps with one Host, each single-valued header
//!   at most once, no Transfer-Encoding and no non-zero Content-Length;
//! - `query::take_param` removes exactly the pairs named the key, keeps every other piece as
//!   written and in order, and refuses a key given twice; `redact` keeps every name, no value;
//! - forwarding headers built from valid header values are valid header values, and an
//!   untrusted peer's carry only its own address.
#![no_main]

use std::net::IpAddr;

use arbitrary::Arbitrary;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tollgate_edge::{forwarded, headers, path, query};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    path: &'a str,
    url_suffix: &'a str,
    query: Option<&'a str>,
    key_name: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
    peer: [u8; 16],
    v4: bool,
    trusted: bool,
    https: bool,
    x_forwarded_for: Option<&'a str>,
    forwarded: Option<&'a str>,
    x_real_ip: Option<&'a str>,
}

/// Segments after dot-segment removal, or `None` for a `..` above the root.
fn simple_segments(raw: &str) -> Option<Vec<&str>> {
    let mut stack = Vec::new();
    for seg in raw.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                stack.pop()?;
            }
            s => stack.push(s),
        }
    }
    Some(stack)
}

fn check_path(raw: &str, url_suffix: &str) {
    let r = path::normalise(raw);
    if let Ok(n) = &r {
        assert!(n.path.starts_with('/'), "{n:?}");
        assert!(!n.path.contains('\\'), "{n:?}");
        let segs: Vec<&str> = n.path[1..].split('/').collect();
        for (i, s) in segs.iter().enumerate() {
            assert!(*s != "." && *s != "..", "dot segment left in {n:?}");
            assert!(
                !s.is_empty() || i == segs.len() - 1,
                "empty segment in {n:?}"
            );
        }
        let again = path::normalise(&n.path);
        assert_eq!(
            again,
            Ok(path::Normalised {
                path: n.path.clone(),
                lowest_after_climb: None
            }),
            "not idempotent"
        );
        let depth = url_suffix.split('/').filter(|s| !s.is_empty()).count();
        assert_eq!(
            n.climbs_out_of(url_suffix),
            n.lowest_after_climb.is_some() && n.climbs_above(depth)
        );
    }
    if raw.starts_with('/')
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'/')
    {
        match (simple_segments(raw), &r) {
            (None, Err(path::PathError::AboveRoot)) => {}
            (Some(want), Ok(n)) => {
                let got: Vec<&str> = n.path.split('/').filter(|s| !s.is_empty()).collect();
                assert_eq!(got, want, "{raw:?}");
            }
            (want, got) => panic!("{raw:?}: reference {want:?}, normalise {got:?}"),
        }
    }
}

fn check_headers(pairs: &[(&str, &[u8])]) {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            h.append(n, v);
        }
    }
    let single_ok = headers::SINGLE_VALUED
        .iter()
        .all(|n| h.get_all(n).iter().count() <= 1);
    let ok = single_ok
        && h.contains_key(http::header::HOST)
        && !h.contains_key(http::header::TRANSFER_ENCODING)
        && h.get_all(http::header::CONTENT_LENGTH)
            .iter()
            .all(|v| v.as_bytes().trim_ascii() == b"0");
    assert_eq!(headers::check(&h).is_ok(), ok, "{h:?}");
}

fn check_query(q: Option<&str>, name: &str) {
    let r = query::take_param(q, name);
    let Some(q) = q else {
        assert_eq!(r, Ok(query::Taken::default()));
        return;
    };
    let named = |piece: &str| form_pair_name(piece).is_some_and(|k| k == name);
    let matching = q.split('&').filter(|p| named(p)).count();
    match r {
        Err(query::Repeated(n)) => {
            assert_eq!(n, name);
            assert!(
                matching >= 2,
                "refused {q:?} with {matching} pairs named {name:?}"
            );
        }
        Ok(t) => {
            assert!(matching <= 1);
            assert_eq!(t.value.is_some(), matching == 1);
            let kept: Vec<&str> = q.split('&').filter(|p| !named(p)).collect();
            assert_eq!(t.rest, (!kept.is_empty()).then(|| kept.join("&")));
        }
    }
    let redacted = query::redact(q);
    assert_eq!(redacted.split('&').count(), q.split('&').count());
    for (orig, red) in q.split('&').zip(redacted.split('&')) {
        match orig.split_once('=') {
            Some((n, _)) => assert_eq!(red, format!("{n}={}", query::REDACTED)),
            None => assert_eq!(red, orig),
        }
    }
}

/// The decoded name of one `&`-separated piece, as application/x-www-form-urlencoded reads it
/// (written here without the form_urlencoded crate: `+` is a space, `%XX` a byte).
fn form_pair_name(piece: &str) -> Option<String> {
    if piece.is_empty() {
        return None;
    }
    let raw = piece.split_once('=').map_or(piece, |(n, _)| n);
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = (b[i + 1] as char).to_digit(16);
                let l = (b[i + 2] as char).to_digit(16);
                match (h, l) {
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
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn check_forwarding(input: &Input<'_>) {
    let peer: IpAddr = if input.v4 {
        IpAddr::from([input.peer[0], input.peer[1], input.peer[2], input.peer[3]])
    } else {
        IpAddr::from(input.peer)
    };
    let proto = if input.https { "https" } else { "http" };
    let sent = forwarded::Sent {
        x_forwarded_for: input.x_forwarded_for,
        forwarded: input.forwarded,
        x_real_ip: input.x_real_ip,
    };
    let f = forwarded::forwarding(peer, proto, input.trusted, &sent);
    let valid = |v: Option<&str>| v.is_none_or(|v| HeaderValue::from_str(v).is_ok());
    if valid(input.x_forwarded_for) && valid(input.forwarded) && valid(input.x_real_ip) {
        for v in [&f.x_forwarded_for, &f.forwarded, &f.x_real_ip] {
            assert!(HeaderValue::from_str(v).is_ok(), "{v:?}");
        }
    }
    if !input.trusted {
        let ip = peer.to_canonical().to_string();
        assert_eq!(f.x_forwarded_for, ip);
        assert_eq!(f.x_real_ip, ip);
        assert!(f.forwarded.contains(&ip));
    }
}

fuzz_target!(|input: Input<'_>| {
    check_path(input.path, input.url_suffix);
    check_headers(&input.headers);
    check_query(input.query, input.key_name);
    check_forwarding(&input);
});
