//! Where an API's connections go: the backend URL as the manifest writes it, checked once at load
//! so that every handshake only has to join paths and queries.
//!
//! Its own module because it is the part of the manifest the gateway still computes with on every
//! handshake (`request_target`, `host_header`), and because the console's client parses the URL
//! on its command line with the same rules.

/// A parsed `ws://` or `wss://` backend URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path without query; always starts with `/`.
    pub path: String,
    pub query: Option<String>,
    /// The URL as written, for logs.
    pub original: String,
}

impl BackendUrl {
    /// `Host` header value: the port is omitted when it is the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The request target for the backend: the backend path joined with what followed the API's
    /// url_suffix in the client's path, and the backend's query followed by the client's.
    pub fn request_target(&self, remainder: &str, client_query: Option<&str>) -> String {
        let mut path = if remainder.is_empty() {
            self.path.clone()
        } else {
            let base = self.path.trim_end_matches('/');
            format!("{base}{remainder}")
        };
        if path.is_empty() {
            path.push('/');
        }
        let query = match (self.query.as_deref(), client_query) {
            (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => Some(format!("{a}&{b}")),
            (Some(a), _) if !a.is_empty() => Some(a.to_owned()),
            (_, Some(b)) if !b.is_empty() => Some(b.to_owned()),
            _ => None,
        };
        match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }
    }
}

/// Parses a backend URL: `ws://` or `wss://`, a host, optional port, path and query.
pub fn parse_backend(s: &str) -> Result<BackendUrl, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("`{s}` is not a valid URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        Some(other) => {
            return Err(format!(
                "backend scheme must be ws or wss, not `{other}` (in `{s}`)"
            ))
        }
        None => return Err(format!("backend `{s}` needs a ws:// or wss:// scheme")),
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("backend `{s}` has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "backend `{s}` must not carry credentials; use a policy to add an Authorization header"
        ));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = if uri.path().is_empty() {
        "/".to_owned()
    } else {
        uri.path().to_owned()
    };
    Ok(BackendUrl {
        tls,
        host,
        port,
        path,
        query: uri.query().map(str::to_owned),
        original: s.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_target_joins_path_and_query() {
        let b = parse_backend("ws://h:9000/base?x=1").unwrap();
        assert_eq!(
            b.request_target("/room/1", Some("y=2")),
            "/base/room/1?x=1&y=2"
        );
        assert_eq!(b.request_target("", None), "/base?x=1");
        let b = parse_backend("wss://h/").unwrap();
        assert_eq!(b.port, 443);
        assert_eq!(b.host_header(), "h");
        assert_eq!(b.request_target("/a", None), "/a");
        assert!(parse_backend("http://h/").is_err());
        assert!(parse_backend("ws:///x").is_err());
    }
}
