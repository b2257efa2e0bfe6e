//! The client's side of the HTTP/1.1 exchange before a 101: the request head read off the
//! socket, the answer written back, and the socket closed politely after a refusal.
//!
//! No HTTP server library: a client connection carries exactly one request here (an opening
//! handshake; after anything but a 101 the gateway closes), so a general server's keep-alive
//! state machine, body streams, upgrade channels and timers were per-handshake cost for nothing
//! (issue 21). The head is parsed by [`tollgate_edge::head`] (fuzzed there); this module only
//! moves bytes.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{header, Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tollgate_edge::head::{HeadError, RequestHead};

/// The head's read buffer to start with: a handshake with a token in one read. It grows (up to
/// `max_header_bytes`) only for a larger head.
pub const READ_BUF: usize = 2048;

/// How long a refused client's answer may take to write, and its socket is then read and
/// discarded ([`linger`]), at most, and how much of it.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// Why no request came.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The head broke a rule; the client is answered with [`HeadError::status`].
    #[error(transparent)]
    Head(#[from] HeadError),
    /// The client closed before a complete head.
    #[error("the client closed the connection before a complete request head")]
    Closed,
    #[error("reading the request head: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one request head of at most `limit` bytes into `buf`; on success what the client sent
/// behind the head stays in `buf`.
pub async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
    buf: &mut BytesMut,
) -> Result<Request<()>, ReadError> {
    let mut head = RequestHead::new(limit);
    loop {
        if buf.capacity() == buf.len() {
            // Up to one byte over the limit: enough to tell a head that is too large.
            buf.reserve(READ_BUF.min((limit + 1).saturating_sub(buf.len()).max(1)));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
        if let Some(req) = head.advance(buf)? {
            return Ok(req);
        }
    }
}

/// The bytes of `resp`: status line, headers (a `Date` and, but for a 1xx, 204 or 304, a
/// `Content-Length`), and the body unless `head_only` (the answer to a HEAD request) or the
/// status has none (1xx, 204, 304: RFC 9110 section 6.4.1; a backend's 304 passed on).
pub fn encode(resp: &Response<Bytes>, head_only: bool) -> Vec<u8> {
    let body = resp.body();
    let mut out = Vec::with_capacity(256 + body.len());
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // (`HeaderValue`s cannot hold CR or LF: no header can split the answer.)
    for (name, value) in resp.headers() {
        if name == header::CONTENT_LENGTH || name == header::DATE {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    // (None for a 304 either: its length would have to be the 200's, which the gateway does
    // not know.)
    if !no_body {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    with_date(|d| out.extend_from_slice(d));
    out.extend_from_slice(b"\r\n\r\n");
    if !head_only && !no_body {
        out.extend_from_slice(body);
    }
    out
}

/// Whether the answer to `method` carries no body.
pub fn head_only(method: &Method) -> bool {
    method == Method::HEAD
}

/// The current `Date` value, formatted once per second per thread (RFC 9110 section 6.6.1: a
/// server with a clock sends one).
fn with_date(f: impl FnOnce(&[u8])) {
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    DATE.with(|cell| {
        let mut d = cell.borrow_mut();
        if d.0 != second {
            *d = (second, httpdate::fmt_http_date(now));
        }
        f(d.1.as_bytes());
    });
}

/// Writes a refusal, then closes our side (the client reads the answer and an end of stream),
/// within [`LINGER`]. Returns the socket when `linger` (the client may still be sending: its
/// head was refused before its end, or it sent bytes behind it) and the answer went out: the
/// caller then passes it to [`linger`]. Otherwise the socket is closed at once: a client that
/// sent a whole head and nothing more is waiting for the answer.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    answer: &[u8],
    linger: bool,
) -> Option<S> {
    let sent = tokio::time::timeout(LINGER, async {
        stream.write_all(answer).await?;
        stream.shutdown().await
    })
    .await;
    (linger && matches!(sent, Ok(Ok(())))).then_some(stream)
}

/// Reads and discards what a refused client still sends, for a moment ([`LINGER`], at most
/// [`LINGER_BYTES`]), then closes: closing a socket with unread bytes makes the kernel send a
/// reset, which can destroy the answer before the client has read it (a 431 to a client still
/// sending its head).
pub async fn linger<S: AsyncRead + Unpin>(mut stream: S) {
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

/// The bytes a client sent behind its head, for the relay: copied out when there are any, so
/// the connection does not pin the head's read buffer for its whole life.
pub fn leftover(buf: BytesMut) -> Bytes {
    if buf.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_head_is_read_across_reads_and_what_follows_stays() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for part in [&b"GET /a HTTP/1.1\r\nHo"[..], b"st: x\r\n", b"\r\n\x81\x00"] {
                client.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client
        });
        let mut buf = BytesMut::new();
        let req = read_request(&mut server, 8192, &mut buf).await.unwrap();
        assert_eq!(req.uri().path(), "/a");
        assert_eq!(req.headers()["host"], "x");
        let _client = writer.await.unwrap();
        // The frame bytes came in the head's last read, or come in the next.
        if buf.is_empty() {
            server.read_buf(&mut buf).await.unwrap();
        }
        assert_eq!(&leftover(buf)[..], b"\x81\x00");
    }

    #[tokio::test]
    async fn a_head_that_never_ends_is_too_large_and_a_closed_one_is_closed() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&[b'a'; 9000]).await.unwrap();
        let mut buf = BytesMut::new();
        let e = read_request(&mut server, 8192, &mut buf).await.unwrap_err();
        assert!(
            matches!(e, ReadError::Head(HeadError::TooLarge { limit: 8192 })),
            "{e:?}"
        );
        assert!(buf.len() <= 8193 + READ_BUF, "read {} bytes", buf.len());
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        drop(client);
        let e = read_request(&mut server, 8192, &mut BytesMut::new())
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Closed), "{e:?}");
    }

    #[test]
    fn answers_carry_length_and_date_and_a_101_no_body() {
        let mut resp = Response::new(Bytes::from_static(b"Not Found\n"));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        resp.headers_mut()
            .insert(header::CONNECTION, "close".parse().unwrap());
        let text = String::from_utf8(encode(&resp, false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
        assert!(text.contains("\r\ncontent-length: 10\r\n"), "{text}");
        assert!(
            text.contains("\r\ndate: ") && text.contains(" GMT\r\n"),
            "{text}"
        );
        assert!(text.ends_with("\r\n\r\nNot Found\n"), "{text}");
        let head = String::from_utf8(encode(&resp, true)).unwrap();
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        assert!(head.contains("\r\ncontent-length: 10\r\n"), "{head}");
        let mut up = Response::new(Bytes::new());
        *up.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let text = String::from_utf8(encode(&up, false)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{text}"
        );
        assert!(!text.contains("content-length"), "{text}");
        // A backend's 304 or a 204 passed on: neither a body nor a length.
        let mut not_modified = Response::new(Bytes::from_static(b"ignored"));
        *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
        let text = String::from_utf8(encode(&not_modified, false)).unwrap();
        assert!(
            text.ends_with("\r\n\r\n") && !text.contains("content-length"),
            "{text}"
        );
        *not_modified.status_mut() = StatusCode::NO_CONTENT;
        let text = String::from_utf8(encode(&not_modified, false)).unwrap();
        assert!(
            text.ends_with("\r\n\r\n") && !text.contains("content-length"),
            "{text}"
        );
    }
}
