//! A client's request head as the gateway reads it (`tollgate_edge::head::RequestHead`), however
//! the bytes are cut into reads.
//!
//! Input: byte 0 is the number of cuts (up to 15), bytes 1-2 the head's size limit (16 and up),
//! the next that many bytes are cut points (modulo the wire's length, sorted), the rest is what
//! the client sends.
//!
//! Invariants: never panics; whether a request comes out, and if so its method, target,
//! version, headers and the bytes left behind it, are the same read in pieces as read in one
//! piece; an accepted head (leading empty lines included) fits the limit, and the bytes left are
//! exactly the wire's tail after it, the head httparse parses in the whole wire.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tollgate_edge::head::RequestHead;

type Seen = Option<(String, String, String, Vec<(String, Vec<u8>)>, Vec<u8>)>;

/// Feeds `pieces` one read at a time, as the gateway does.
fn read(pieces: &[&[u8]], limit: usize) -> Seen {
    let mut head = RequestHead::new(limit);
    let mut buf = BytesMut::new();
    for (i, piece) in pieces.iter().enumerate() {
        buf.extend_from_slice(piece);
        match head.advance(&mut buf) {
            Ok(None) => {}
            Ok(Some(req)) => {
                // What follows the head: the rest of this read, then the later reads.
                let mut rest = buf.to_vec();
                for later in &pieces[i + 1..] {
                    rest.extend_from_slice(later);
                }
                let headers = req
                    .headers()
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect();
                return Some((
                    req.method().to_string(),
                    req.uri().to_string(),
                    format!("{:?}", req.version()),
                    headers,
                    rest,
                ));
            }
            Err(_) => return None,
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let n = usize::from(data[0] % 16);
    let limit = usize::from(u16::from_le_bytes([data[1], data[2]])).max(16);
    let rest = &data[3..];
    let n = n.min(rest.len());
    let (cuts, wire) = rest.split_at(n);
    let mut cuts: Vec<usize> = cuts
        .iter()
        .map(|&c| if wire.is_empty() { 0 } else { usize::from(c) * wire.len() / 256 })
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut at = 0;
    for c in cuts {
        if c > at {
            pieces.push(&wire[at..c]);
            at = c;
        }
    }
    pieces.push(&wire[at..]);
    let whole = read(&[wire], limit);
    let cut = read(&pieces, limit);
    assert_eq!(
        whole.is_some(),
        cut.is_some(),
        "accepted in one piece but not in {} (or the other way)",
        pieces.len()
    );
    if let (Some(w), Some(c)) = (&whole, &cut) {
        assert_eq!(w, c, "the same head read differently in pieces");
        let head_len = wire.len() - w.4.len();
        assert!(head_len <= limit, "a head of {head_len} bytes over the limit {limit}");
        assert_eq!(&wire[head_len..], &w.4[..]);
        // And it is the head httparse finds in the whole wire (empty lines skipped alike).
        let mut headers = [httparse::EMPTY_HEADER; tollgate_edge::head::MAX_HEADERS];
        let parsed = httparse::Request::new(&mut headers).parse(wire);
        assert!(
            matches!(parsed, Ok(httparse::Status::Complete(n)) if n == head_len),
            "httparse says {parsed:?}, the reader took {head_len} bytes"
        );
    }
});
