//! The handshake as policies see it: the host's own type, filled by the gateway once per
//! handshake and read by plugins on demand through the WIT `request` resource (each read copies
//! only what it returns). The chain updates it as decisions are applied, so a later policy sees
//! the headers and context earlier ones left.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use tollgate_edge::decision;

/// What the generated bindings call the `request` resource on the host side. A store holds one
/// request at a time ([`super::HostState`]), so the handle carries nothing.
pub struct RequestHandle;

/// TLS facts of a wss client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// e.g. "TLSv1.3"
    pub version: String,
    pub cipher_suite: String,
    /// Server name the client asked for.
    pub server_name: Option<String>,
}

/// One handshake, as the policy chain sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: http::Method,
    /// The normalised path, without the query.
    pub path: String,
    /// The client's headers without the subscription key header; policies' changes applied.
    pub headers: HeaderMap,
    /// Query parameters, percent-decoded, without the subscription key parameter.
    pub query: Vec<(String, String)>,
    pub client: SocketAddr,
    /// The client's IP by the trusted-proxies rule (`tollgate_edge::forwarded::client_ip`);
    /// `None`: unknown (a trusted proxy's `X-Forwarded-For` could not be read).
    pub client_ip: Option<std::net::IpAddr>,
    pub tls: Option<Arc<TlsInfo>>,
    pub api: Arc<str>,
    pub product: Option<String>,
    /// Set by the gateway (`product.name`, `subscription.name`), then by policies.
    pub context: Vec<(String, String)>,
    /// Seconds since the Unix epoch.
    pub received_at: u64,
}

/// A header value as a policy reads it (header values may carry any byte but controls).
fn text(v: &HeaderValue) -> String {
    match v.to_str() {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
    }
}

/// `name` as a header name, if it can be one (a name that cannot be is never present).
fn header_name(name: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).ok()
}

impl Request {
    /// The first value of header `name`, case-insensitive.
    pub fn header(&self, name: &str) -> Option<String> {
        header_name(name).and_then(|n| self.headers.get(n).map(text))
    }

    /// Every value of header `name`, in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        header_name(name)
            .map(|n| self.headers.get_all(n).iter().map(text).collect())
            .unwrap_or_default()
    }

    /// Every header, in order, names lower-case.
    pub fn header_pairs(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), text(v)))
    }
}

/// Later policies see the request as the earlier ones left it. The edge code has already
/// checked names and values before it reports a change.
impl decision::PolicyView for Request {
    fn header_changed(&mut self, lower: &str, value: Option<&str>, append: bool) {
        let Some(name) = header_name(lower) else {
            return;
        };
        match value.map(HeaderValue::from_str) {
            Some(Ok(v)) if append => {
                self.headers.append(name, v);
            }
            Some(Ok(v)) => {
                self.headers.insert(name, v);
            }
            Some(Err(_)) => {}
            None => {
                self.headers.remove(name);
            }
        }
    }

    fn query_replaced(&mut self, pairs: &[(String, String)]) {
        self.query = pairs.to_vec();
    }

    fn context_added(&mut self, context: Vec<decision::Pair>) {
        self.context
            .extend(context.into_iter().map(|p| (p.name, p.value)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use decision::PolicyView;

    fn request() -> Request {
        let mut headers = HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        Request {
            method: http::Method::GET,
            path: "/p".into(),
            headers,
            query: vec![("a".into(), "1".into())],
            client: "127.0.0.1:1".parse().unwrap(),
            client_ip: "127.0.0.1".parse().ok(),
            tls: None,
            api: Arc::from("api"),
            product: None,
            context: Vec::new(),
            received_at: 1,
        }
    }

    #[test]
    fn reads_fold_header_case_and_keep_every_value() {
        let r = request();
        assert_eq!(r.header("Authorization").as_deref(), Some("Bearer t"));
        assert_eq!(r.header_values("X-A"), ["1", "2"]);
        assert_eq!(r.header("not a header name"), None);
        assert_eq!(r.header_pairs().count(), 3);
    }

    #[test]
    fn changes_are_visible_to_later_policies() {
        let mut r = request();
        r.header_changed("x-a", Some("3"), false);
        assert_eq!(r.header_values("x-a"), ["3"]);
        r.header_changed("x-a", Some("4"), true);
        assert_eq!(r.header_values("x-a"), ["3", "4"]);
        r.header_changed("authorization", None, false);
        assert_eq!(r.header("authorization"), None);
        r.query_replaced(&[("b".into(), "2".into())]);
        assert_eq!(r.query, [("b".to_owned(), "2".to_owned())]);
        r.context_added(vec![decision::Pair {
            name: "jwt.sub".into(),
            value: "ann".into(),
        }]);
        assert_eq!(r.context, [("jwt.sub".to_owned(), "ann".to_owned())]);
    }
}
