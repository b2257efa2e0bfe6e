//! Header rules for an opening handshake.
//!
//! Some headers mean one thing only: two `Host` headers let the gateway route on one and the
//! backend on the other, two `Authorization` headers let a policy check one while the backend
//! trusts the other. A repeat of any of them is refused rather than resolved (RFC 9110 section
//! 5.3 allows combining only headers defined as lists).

use http::header::{self, HeaderMap, HeaderName};

/// Headers a handshake may carry at most once (the subscription-key header, whose name is per
/// API, is checked the same way with [`at_most_once`]).
pub const SINGLE_VALUED: &[HeaderName] = &[
    header::HOST,
    header::AUTHORIZATION,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::ORIGIN,
];

/// Hop-by-hop headers (RFC 9110 section 7.6.1, plus the legacy `Keep-Alive` and
/// `Proxy-Connection`): they describe one connection, so a proxy never passes them on, in a
/// request or in a response.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// What is wrong with a handshake's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// A header of [`SINGLE_VALUED`] (or the API's key header) appears more than once.
    Repeated(HeaderName),
    /// No `Host` header (required in HTTP/1.1, RFC 9112 section 3.2).
    MissingHost,
    /// `Transfer-Encoding`, or a non-zero `Content-Length`: an opening handshake has no body,
    /// and bytes sent as one would end up read as WebSocket frames (or smuggled past the
    /// gateway's view of the request).
    Body,
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Repeated(h) => write!(f, "header `{h}` is repeated"),
            HeaderError::MissingHost => f.write_str("missing `Host` header"),
            HeaderError::Body => f.write_str("a handshake request must not have a body"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// `Err` if `name` appears more than once.
pub fn at_most_once(h: &HeaderMap, name: &HeaderName) -> Result<(), HeaderError> {
    let mut all = h.get_all(name).iter();
    if all.next().is_some() && all.next().is_some() {
        return Err(HeaderError::Repeated(name.clone()));
    }
    Ok(())
}

/// Checks the rules every handshake must meet, whatever API it is for.
pub fn check(h: &HeaderMap) -> Result<(), HeaderError> {
    for name in SINGLE_VALUED {
        at_most_once(h, name)?;
    }
    if !h.contains_key(header::HOST) {
        return Err(HeaderError::MissingHost);
    }
    let no_length = h
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .all(|v| v.as_bytes().trim_ascii() == b"0");
    if h.contains_key(header::TRANSFER_ENCODING) || !no_length {
        return Err(HeaderError::Body);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn single_headers_pass_and_repeats_are_named() {
        assert_eq!(
            check(&map(&[("host", "a"), ("authorization", "x")])),
            Ok(())
        );
        for name in [
            "host",
            "authorization",
            "sec-websocket-key",
            "sec-websocket-version",
            "origin",
        ] {
            let h = map(&[("host", "a"), (name, "1"), (name, "2")]);
            assert_eq!(
                check(&h),
                Err(HeaderError::Repeated(HeaderName::from_static(name))),
                "{name}"
            );
        }
        // List-valued headers may repeat.
        assert_eq!(
            check(&map(&[
                ("host", "a"),
                ("sec-websocket-protocol", "a"),
                ("sec-websocket-protocol", "b")
            ])),
            Ok(())
        );
    }

    #[test]
    fn a_body_is_refused() {
        assert_eq!(
            check(&map(&[("host", "a"), ("content-length", "0")])),
            Ok(())
        );
        assert_eq!(
            check(&map(&[("host", "a"), ("content-length", "5")])),
            Err(HeaderError::Body)
        );
        assert_eq!(
            check(&map(&[("host", "a"), ("transfer-encoding", "chunked")])),
            Err(HeaderError::Body)
        );
    }

    #[test]
    fn host_is_required() {
        assert_eq!(
            check(&map(&[("origin", "o")])),
            Err(HeaderError::MissingHost)
        );
    }
}
