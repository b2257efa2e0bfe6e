//! HTTP/1.1 heads as they arrive on a socket: where one ends, and a client's request head
//! parsed into an [`http::Request`].
//!
//! The gateway answers exactly one request per client connection (an opening handshake, or a
//! refusal followed by a close), so it needs no HTTP server's state machine: a head, parsed with
//! httparse, is all. That saves a general server's per-connection state and timers on every
//! handshake (issue 21), and keeps the parsing here, without I/O, where it is fuzzed
//! (`fuzz/fuzz_targets/request_head.rs`).
//!
//! What is refused and how a client is told: a head over the configured size or with more than
//! [`MAX_HEADERS`] lines is [`HeadError::TooLarge`] / [`HeadError::TooManyHeaders`] (431), and
//! anything httparse or `http` will not take (a bad request line, a header name that is not a
//! token, a control character in a value, a target that is not a URI) is
//! [`HeadError::Malformed`] (400), and another version than HTTP/1.x [`HeadError::Version`]
//! (505, as hyper answered). Rules about what a well-formed handshake may contain (one
//! Host, no body...) are [`crate::headers`]'s.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

/// Most header lines in one request head: hyper's default, which the gateway used before.
pub const MAX_HEADERS: usize = 100;

/// Why a request head is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// More than the gateway's `max_header_bytes` before the head's end.
    #[error("request head larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    /// A request line of another HTTP version than 1.0 or 1.1 (an HTTP/2 preface, say).
    #[error("unsupported HTTP version")]
    Version,
}

impl HeadError {
    /// The status a client is answered with (RFC 6585 section 5 for the size limits).
    pub fn status(&self) -> http::StatusCode {
        match self {
            HeadError::TooLarge { .. } | HeadError::TooManyHeaders => {
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::Malformed(_) => http::StatusCode::BAD_REQUEST,
            HeadError::Version => http::StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        }
    }
}

/// Whether `b` holds an empty line (`\n\n` or `\n\r\n`): the end of a head. Searching only for
/// that before parsing keeps a head dribbled in one byte per read linear in cost (a caller
/// searches each byte once, from two bytes before the new ones).
pub fn has_blank_line(b: &[u8]) -> bool {
    let mut i = 0;
    while let Some(p) = b[i..].iter().position(|&c| c == b'\n') {
        let j = i + p + 1;
        match b.get(j) {
            Some(b'\n') => return true,
            Some(b'\r') if b.get(j + 1) == Some(&b'\n') => return true,
            _ => {}
        }
        i = j;
    }
    false
}

/// Reads one request head as it arrives: call [`RequestHead::advance`] after each read into the
/// buffer. Empty lines before the request line (which RFC 9112 section 2.2 lets a server skip)
/// are dropped as they come, counted against the limit, and each byte is searched for the
/// head's end once, so a head dribbled in one byte per read costs linear time, not quadratic.
#[derive(Debug)]
pub struct RequestHead {
    limit: usize,
    /// Empty-line bytes dropped before the request line.
    skipped: usize,
    /// `buf[..scanned]` holds no empty line.
    scanned: usize,
}

impl RequestHead {
    /// A head of at most `limit` bytes, leading empty lines included.
    pub fn new(limit: usize) -> Self {
        RequestHead {
            limit,
            skipped: 0,
            scanned: 0,
        }
    }

    /// The request, once `buf` holds its whole head (split off `buf`, as [`parse_request`]);
    /// `Ok(None)` while more is needed and allowed. After an error or a request, do not call it
    /// again.
    pub fn advance(&mut self, buf: &mut BytesMut) -> Result<Option<Request<()>>, HeadError> {
        // Only whole empty lines (`\r\n` or `\n`), as httparse skips them: a `\r` followed by
        // anything else is left for httparse to refuse, and a trailing `\r` waits for the next
        // read to say which it is.
        let mut blank = 0;
        loop {
            match buf.get(blank..blank + 2) {
                Some(b"\r\n") => blank += 2,
                _ if buf.get(blank) == Some(&b'\n') => blank += 1,
                _ => break,
            }
        }
        if blank > 0 {
            let _ = buf.split_to(blank);
            self.skipped += blank;
            self.scanned = 0;
        }
        let limit = self.limit.saturating_sub(self.skipped);
        if self.skipped >= self.limit {
            return Err(HeadError::TooLarge { limit: self.limit });
        }
        if has_blank_line(&buf[self.scanned.saturating_sub(2)..]) {
            return parse_request(buf, limit).map_err(|e| match e {
                HeadError::TooLarge { .. } => HeadError::TooLarge { limit: self.limit },
                e => e,
            });
        }
        self.scanned = buf.len();
        if buf.len() >= limit {
            return Err(HeadError::TooLarge { limit: self.limit });
        }
        Ok(None)
    }
}

/// Parses the request head at the start of `buf`, which is at most `limit` bytes long when
/// complete. `Ok(None)`: not complete yet, and `buf` may grow (it is under `limit`). On success
/// the head is split off `buf` (what follows it stays there: bytes the client sent behind its
/// request) and the header values are slices of it, not copies.
pub fn parse_request(buf: &mut BytesMut, limit: usize) -> Result<Option<Request<()>>, HeadError> {
    // Where each header's name and value lie in `buf`.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, method, target, version, count) = {
        let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut parsed);
        let len = match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                return if buf.len() >= limit {
                    Err(HeadError::TooLarge { limit })
                } else {
                    Ok(None)
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(httparse::Error::Version) => return Err(HeadError::Version),
            Err(e) => return Err(HeadError::Malformed(malformed(e))),
        };
        if len > limit {
            return Err(HeadError::TooLarge { limit });
        }
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        for (span, h) in spans.iter_mut().zip(req.headers.iter()) {
            let (n, v) = (offset(h.name.as_bytes()), offset(h.value));
            *span = (n, n + h.name.len() as u32, v, v + h.value.len() as u32);
        }
        // (httparse only completes with all three: a request line is all or nothing.)
        let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
            .map_err(|_| HeadError::Malformed("invalid method"))?;
        let target = req.path.unwrap_or("");
        let target = (offset(target.as_bytes()), target.len() as u32);
        let version = match req.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        (len, method, target, version, req.headers.len())
    };
    let head = buf.split_to(len).freeze();
    let (start, tlen) = (target.0 as usize, target.1 as usize);
    let uri = Uri::from_maybe_shared(head.slice(start..start + tlen))
        .map_err(|_| HeadError::Malformed("invalid request target"))?;
    let mut headers = HeaderMap::with_capacity(count);
    for &(ns, ne, vs, ve) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value = header_value(&head, vs as usize, ve as usize)?;
        headers.append(name, value);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = headers;
    Ok(Some(req))
}

fn header_value(head: &Bytes, start: usize, end: usize) -> Result<HeaderValue, HeadError> {
    HeaderValue::from_maybe_shared(head.slice(start..end))
        .map_err(|_| HeadError::Malformed("invalid header value"))
}

/// What a client is not told in detail but the log is (the reason stays a fixed string: nothing
/// the client sent is echoed).
fn malformed(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in the request line",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::TooManyHeaders => "too many headers",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8], limit: usize) -> (Result<Option<Request<()>>, HeadError>, BytesMut) {
        let mut buf = BytesMut::from(s);
        let r = parse_request(&mut buf, limit);
        (r, buf)
    }

    #[test]
    fn a_handshake_head_and_what_follows_it() {
        let (r, rest) = parse(
            b"GET /chat?x=1 HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\nX-Two: 1\r\nx-two: 2\r\n\r\n\x81\x00",
            8192,
        );
        let req = r.unwrap().unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/chat");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()["host"], "a.example");
        let twos: Vec<_> = req.headers().get_all("x-two").iter().collect();
        assert_eq!(twos, ["1", "2"]);
        assert_eq!(&rest[..], b"\x81\x00");
    }

    #[test]
    fn an_incomplete_head_waits_until_it_reaches_the_limit() {
        let (r, rest) = parse(b"GET / HTTP/1.1\r\nHost: a\r\n", 8192);
        assert!(matches!(r, Ok(None)));
        assert_eq!(rest.len(), 25, "nothing consumed");
        let (r, _) = parse(b"GET / HTTP/1.1\r\nHost: aaaaaaaaaa\r\n", 20);
        assert_eq!(r.err(), Some(HeadError::TooLarge { limit: 20 }));
        // Complete, but longer than the limit (one read brought it all).
        let (r, _) = parse(b"GET / HTTP/1.1\r\nHost: aaaaaaaaaa\r\n\r\n", 30);
        assert_eq!(r.err(), Some(HeadError::TooLarge { limit: 30 }));
    }

    #[test]
    fn header_lines_are_capped() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let (r, _) = parse(&head, 1 << 20);
        assert_eq!(r.err(), Some(HeadError::TooManyHeaders));
        assert_eq!(
            HeadError::TooManyHeaders.status(),
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn malformed_heads_are_400_without_echoing_the_input() {
        for head in [
            &b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            b"\r\r\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
            b"G\x00T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
        ] {
            let (r, _) = parse(head, 8192);
            let e = r.expect_err(&String::from_utf8_lossy(head));
            assert!(matches!(e, HeadError::Malformed(_)), "{e:?}");
            assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn other_http_versions_are_505() {
        for head in [
            &b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            let (r, _) = parse(head, 8192);
            assert_eq!(r.err(), Some(HeadError::Version));
        }
        assert_eq!(
            HeadError::Version.status(),
            http::StatusCode::HTTP_VERSION_NOT_SUPPORTED
        );
    }

    #[test]
    fn absolute_form_and_http_1_0_are_parsed_for_the_handshake_to_judge() {
        let (r, _) = parse(
            b"GET ws://a.example/x HTTP/1.0\r\nHost: a.example\r\n\r\n",
            8192,
        );
        let req = r.unwrap().unwrap();
        assert_eq!(req.uri().authority().map(|a| a.as_str()), Some("a.example"));
        assert_eq!(req.version(), Version::HTTP_10);
    }

    #[test]
    fn a_head_read_a_byte_at_a_time_after_empty_lines() {
        let wire = b"\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\nrest";
        let mut head = RequestHead::new(64);
        let mut buf = BytesMut::new();
        let mut got = None;
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            if let Some(req) = head.advance(&mut buf).unwrap() {
                got = Some((i, req));
                break;
            }
        }
        let (i, req) = got.expect("a request");
        assert_eq!(i, wire.len() - 5, "complete at the head's last byte");
        assert_eq!(req.uri().path(), "/x");
        // Empty lines count towards the limit.
        let mut head = RequestHead::new(8);
        let mut buf = BytesMut::from(&b"\r\n\r\n\r\n\r\nGET"[..]);
        assert_eq!(
            head.advance(&mut buf).err(),
            Some(HeadError::TooLarge { limit: 8 })
        );
        let mut head = RequestHead::new(12);
        let mut buf = BytesMut::from(&b"\r\n\r\nGET / HTTP/1.1"[..]);
        assert_eq!(
            head.advance(&mut buf).err(),
            Some(HeadError::TooLarge { limit: 12 })
        );
    }

    #[test]
    fn blank_lines_end_heads() {
        assert!(has_blank_line(b"a\r\n\r\n"));
        assert!(has_blank_line(b"a\n\n"));
        assert!(has_blank_line(b"a\n\r\n"));
        assert!(!has_blank_line(b"a\r\nb\r\n"));
        assert!(!has_blank_line(b"a\r\n\r"));
    }
}
