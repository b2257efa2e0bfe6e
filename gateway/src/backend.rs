//! The backend connector: opens the backend WebSocket (ws, or wss with rustls), sends the
//! handshake request in one write, and reads and checks the backend's answer before anything
//! is relayed. No HTTP client library: the request is a request line and headers, the answer
//! a head parsed with httparse, both in one buffer (the per-handshake cost of a general HTTP
//! client's state machines, issue 21).
//!
//! Only a correct 101 (right `Sec-WebSocket-Accept`, a subprotocol and extensions the client
//! offered) yields a socket. Any other answer is returned as [`BackendError::Rejected`] with its
//! status and body so the client sees what the backend said, and the backend socket is dropped:
//! no tunnel is ever opened on a failed upgrade, which defeats "WebSocket smuggling" through the
//! gateway. A 2xx answer is such a rejection too (502 to the client), not a tunnel. Interim 1xx
//! heads other than 101 (100 Continue, 103 Early Hints...) are skipped, as hyper did.
//!
//! What a hostile backend can make the gateway do is bounded: the head (interim ones included)
//! by [`MAX_HEAD`] bytes and [`MAX_HEADERS`] lines, the rejection body by [`MAX_REJECT_BODY`]
//! (larger: passed on empty), and the whole exchange by the connector's timeout. Bytes the
//! backend sent behind its 101 are handed to the relay as they came ([`Upgraded::prefix`]).

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::manifest::BackendUrl;
use crate::stream::Stream;
use crate::wskey;

/// Largest backend rejection body passed on to the client.
const MAX_REJECT_BODY: usize = 64 * 1024;

/// Largest response head read from a backend, interim 1xx heads included; more is an `http`
/// error. A real 101 is a few hundred bytes, a few KiB with cookies; 64 KiB leaves room for
/// large cookies and still bounds what a hostile backend makes the gateway hold per handshake
/// (hyper allowed ~400 KiB).
const MAX_HEAD: usize = 64 * 1024;

/// Most header lines in one response head, hyper's default too; more is an `http` error.
const MAX_HEADERS: usize = 100;

/// The head's read buffer to start with: a whole 101 and what follows it in one read.
const READ_BUF: usize = 2048;

/// Longest chunk-size line (with extensions) in a chunked rejection body.
const MAX_CHUNK_LINE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to backend {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with backend {host} failed: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("backend did not complete the handshake within {0:?}")]
    Timeout(Duration),
    /// The answer was not well-formed HTTP/1.1, too large, or the connection broke off.
    #[error("backend HTTP error: {0}")]
    Http(String),
    #[error("backend answered the upgrade incorrectly: {0}")]
    BadUpgrade(String),
    #[error("backend answered {status} instead of 101")]
    Rejected {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
}

impl BackendError {
    /// The status the client gets: the backend's own for a rejection it chose to send (4xx/5xx
    /// and redirects), 504 for a timeout, 502 for everything else (including a 2xx answer to an
    /// upgrade request, which would otherwise be a smuggling vector).
    pub fn client_status(&self) -> StatusCode {
        match self {
            BackendError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            BackendError::Rejected { status, .. } if status.as_u16() >= 300 => *status,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Short machine-friendly kind for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Connect { .. } => "connect",
            BackendError::Tls { .. } => "tls",
            BackendError::Timeout(_) => "timeout",
            BackendError::Http(_) => "http",
            BackendError::BadUpgrade(_) => "bad_upgrade",
            BackendError::Rejected { .. } => "rejected",
        }
    }
}

/// A backend WebSocket that answered 101.
pub struct Upgraded {
    pub stream: Stream,
    /// Frames the backend sent right behind its 101, read with the head.
    pub prefix: Bytes,
    /// The backend's 101 headers (subprotocol, extensions, cookies...).
    pub headers: HeaderMap,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {path} contains no usable certificate")]
    NoCerts { path: String },
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Connects one API's backend.
pub struct Connector {
    url: BackendUrl,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

pub(crate) fn native_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let r = rustls_native_certs::load_native_certs();
        for e in &r.errors {
            tracing::warn!(error = %e, "could not load some system root certificates");
        }
        r.certs
    })
}

/// The crypto provider used everywhere (ring: builds with only a C compiler).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the TLS client configuration for a wss backend: system roots plus `ca_file`, chain and
/// host name verified, unless `insecure_skip_verify` (logged loudly by the caller).
pub fn client_tls_config(
    ca_file: Option<&Path>,
    insecure_skip_verify: bool,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        for c in native_roots() {
            let _ = roots.add(c.clone());
        }
        if let Some(path) = ca_file {
            use rustls_pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsConfigError::CaFile {
                    path: path.display().to_string(),
                    source,
                })?;
            if certs.is_empty() {
                return Err(TlsConfigError::NoCerts {
                    path: path.display().to_string(),
                });
            }
            for c in certs {
                roots.add(c)?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

impl Connector {
    pub fn new(
        url: BackendUrl,
        tls: Option<Arc<ClientConfig>>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let tls = match tls {
            Some(cfg) if url.tls => {
                let name = ServerName::try_from(url.host.clone()).map_err(|e| {
                    format!("backend host `{}` is not a valid TLS name: {e}", url.host)
                })?;
                Some((TlsConnector::from(cfg), name))
            }
            _ => None,
        };
        Ok(Connector { url, tls, timeout })
    }

    pub fn url(&self) -> &BackendUrl {
        &self.url
    }

    /// Opens the backend WebSocket. `target` is the request target (path and query), `headers`
    /// the complete header set to send except the WebSocket key, which is generated here.
    pub async fn handshake(
        &self,
        target: &str,
        headers: HeaderMap,
        offered_protocols: &[String],
        offered_extensions: &[String],
    ) -> Result<Upgraded, BackendError> {
        match tokio::time::timeout(
            self.timeout,
            self.handshake_inner(target, headers, offered_protocols, offered_extensions),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(BackendError::Timeout(self.timeout)),
        }
    }

    async fn connect(&self) -> Result<Stream, BackendError> {
        let addr = format!("{}:{}", self.url.host, self.url.port);
        let tcp = TcpStream::connect((self.url.host.as_str(), self.url.port))
            .await
            .map_err(|source| BackendError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Stream::Tcp(tcp)),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| BackendError::Tls {
                        host: self.url.host.clone(),
                        source,
                    })?;
                Ok(Stream::ClientTls(Box::new(tls)))
            }
        }
    }

    async fn handshake_inner(
        &self,
        target: &str,
        headers: HeaderMap,
        offered_protocols: &[String],
        offered_extensions: &[String],
    ) -> Result<Upgraded, BackendError> {
        let stream = self.connect().await?;
        let (stream, prefix, headers) = handshake_on(
            stream,
            target,
            headers,
            offered_protocols,
            offered_extensions,
        )
        .await?;
        Ok(Upgraded {
            stream,
            prefix,
            headers,
        })
    }
}

/// The handshake proper on an open `stream`: one write of the request, then the response head
/// read into one buffer and parsed with httparse. Returns the stream itself (nothing wraps it),
/// the bytes the backend sent behind its 101 and the 101's headers.
async fn handshake_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    target: &str,
    mut headers: HeaderMap,
    offered_protocols: &[String],
    offered_extensions: &[String],
) -> Result<(S, Bytes, HeaderMap), BackendError> {
    let key = wskey::generate_key();
    headers.insert(
        http::header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&key).map_err(|e| BackendError::BadUpgrade(e.to_string()))?,
    );
    let req = encode_request(target, &headers).map_err(BackendError::BadUpgrade)?;
    stream.write_all(&req).await.map_err(io_error)?;
    stream.flush().await.map_err(io_error)?;
    drop(req);

    let mut buf = BytesMut::with_capacity(READ_BUF);
    let (status, headers) = read_head(&mut stream, &mut buf).await?;
    if status != StatusCode::SWITCHING_PROTOCOLS {
        // A body the gateway cannot frame is a broken answer, as it was for hyper; a body that
        // breaks off, is malformed or is too large is passed on as empty, as before.
        let framing = framing(status, &headers).map_err(BackendError::Http)?;
        let body = read_body(&mut stream, buf, framing)
            .await
            .unwrap_or_default();
        return Err(BackendError::Rejected {
            status,
            headers,
            body,
        });
    }
    check_101(&headers, &key, offered_protocols, offered_extensions)
        .map_err(BackendError::BadUpgrade)?;
    Ok((stream, buf.freeze(), headers))
}

fn io_error(e: std::io::Error) -> BackendError {
    BackendError::Http(e.to_string())
}

/// `GET <target> HTTP/1.1` and `headers`, serialised into one buffer for one write.
fn encode_request(target: &str, headers: &HeaderMap) -> Result<Vec<u8>, String> {
    // No whitespace, control or non-ASCII byte: nothing that could end the request line early
    // or split the request.
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err(format!("bad backend request: invalid target {target:?}"));
    }
    let len = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + target.len()
        + 16;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Names and values are valid by construction (`HeaderName`, `HeaderValue`: no CR, LF or
    // NUL), so no header can inject another. Transfer-Encoding is dropped as hyper did: the
    // request has no body.
    for (name, value) in headers {
        if name == http::header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// Reads the backend's final response head into `buf` and returns its status and headers; what
/// follows the head stays in `buf`. Interim 1xx heads other than 101 (100 Continue, 102, 103
/// Early Hints) are skipped, as hyper did; they count towards [`MAX_HEAD`] with the final head.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(StatusCode, HeaderMap), BackendError> {
    // Bytes of interim heads already skipped.
    let mut skipped = 0;
    // `buf[..scanned]` holds no empty line: each byte is searched once, so a head dribbled in
    // one byte per read costs linear, not quadratic, time.
    let mut scanned: usize = 0;
    loop {
        // Empty lines before a status line (which HTTP/1.1 lets a recipient skip) are dropped
        // here, counted against the cap: httparse skips them too, but re-walks all of them on
        // every parse, so a backend dribbling line ends would make each read cost the whole
        // buffer again.
        let blank = buf
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(buf.len());
        // A lone trailing `\r` may be the start of a status line's error or of `\r\n`: kept
        // until the next read says which.
        let blank = if blank == buf.len() && buf.last() == Some(&b'\r') {
            blank - 1
        } else {
            blank
        };
        if blank > 0 {
            buf.advance(blank);
            skipped += blank;
            scanned = 0;
        }
        if tollgate_edge::head::has_blank_line(&buf[scanned.saturating_sub(2)..]) {
            if let Some((len, status, headers)) = parse_head(buf).map_err(BackendError::Http)? {
                // A read may have brought more than the limit: the head itself must fit.
                if skipped + len > MAX_HEAD {
                    return Err(head_too_large());
                }
                if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                    // (`parse_head` has split the head off `buf` already.)
                    skipped += len;
                    scanned = 0;
                    continue;
                }
                return Ok((status, headers));
            }
        }
        scanned = buf.len();
        let limit = MAX_HEAD - skipped.min(MAX_HEAD);
        if buf.len() >= limit {
            return Err(head_too_large());
        }
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().max(READ_BUF).min(limit - buf.len()));
        }
        if stream.read_buf(buf).await.map_err(io_error)? == 0 {
            return Err(BackendError::Http(
                "backend closed the connection before a complete response head".into(),
            ));
        }
    }
}

fn head_too_large() -> BackendError {
    BackendError::Http(format!("response head larger than {} KiB", MAX_HEAD / 1024))
}

/// Parses a complete head at the start of `buf`: `None` if it is not complete yet. On success
/// the head is split off `buf`, and the header values are slices of it (no copy).
fn parse_head(buf: &mut BytesMut) -> Result<Option<(usize, StatusCode, HeaderMap)>, String> {
    // Where each header's name and value lie in `buf`.
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let (len, code, count) = {
        let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut parsed);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(format!("malformed response head: {e}")),
        };
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let (n, v) = (offset(h.name.as_bytes()), offset(h.value));
            *span = (n, n + h.name.len() as u32, v, v + h.value.len() as u32);
        }
        (len, resp.code.unwrap_or(0), resp.headers.len())
    };
    let status = StatusCode::from_u16(code).map_err(|_| format!("invalid status code {code}"))?;
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(ns, ne, vs, ve) in &spans[..count] {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|e| format!("invalid header name: {e}"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|e| format!("invalid header value: {e}"))?;
        headers.append(name, value);
    }
    Ok(Some((len, status, headers)))
}

/// How a rejection's body is delimited (RFC 9112 section 6.3).
#[derive(Debug, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

fn framing(status: StatusCode, headers: &HeaderMap) -> Result<Framing, String> {
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    let te = headers.get_all(http::header::TRANSFER_ENCODING);
    if te.iter().next().is_some() {
        // Transfer-Encoding overrides Content-Length; unless chunked comes last, the body
        // runs to the close.
        let last = te
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim);
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Framing::Chunked,
            _ => Framing::Close,
        });
    }
    let mut length = None;
    for v in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u64>().ok())
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting Content-Length".into());
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::Close, Framing::Length))
}

/// Reads more of the backend's answer into `buf`, with room for at least `want` more bytes
/// (capped). `None` on end of stream or an I/O error.
async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    want: usize,
) -> Option<()> {
    buf.reserve(want.clamp(1, MAX_REJECT_BODY));
    match stream.read_buf(buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(()),
    }
}

/// Reads a rejection's body (at most [`MAX_REJECT_BODY`]) behind its head, already partly in
/// `buf`. `None` when it breaks off, is malformed or is larger than that.
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
    framing: Framing,
) -> Option<Bytes> {
    match framing {
        Framing::Empty => Some(Bytes::new()),
        Framing::Length(n) => {
            let n = usize::try_from(n).ok().filter(|&n| n <= MAX_REJECT_BODY)?;
            while buf.len() < n {
                let want = n - buf.len();
                read_more(stream, &mut buf, want).await?;
            }
            buf.truncate(n);
            Some(buf.freeze())
        }
        Framing::Close => loop {
            if buf.len() > MAX_REJECT_BODY {
                return None;
            }
            buf.reserve((MAX_REJECT_BODY + 1 - buf.len()).min(READ_BUF * 4));
            // Only a clean end of stream ends the body; a reset loses it, as it did with hyper.
            if stream.read_buf(&mut buf).await.ok()? == 0 {
                return Some(buf.freeze());
            }
        },
        Framing::Chunked => {
            let mut body = BytesMut::new();
            loop {
                let (used, size) = loop {
                    match httparse::parse_chunk_size(&buf) {
                        Ok(httparse::Status::Complete(c)) => break c,
                        Ok(httparse::Status::Partial) if buf.len() <= MAX_CHUNK_LINE => {
                            read_more(stream, &mut buf, READ_BUF).await?
                        }
                        _ => return None,
                    }
                };
                buf.advance(used);
                if size == 0 {
                    // Trailers are not read: the connection is dropped anyway.
                    return Some(body.freeze());
                }
                let size = usize::try_from(size)
                    .ok()
                    .filter(|&s| s <= MAX_REJECT_BODY - body.len())?;
                while buf.len() < size + 2 {
                    let want = size + 2 - buf.len();
                    read_more(stream, &mut buf, want).await?;
                }
                if &buf[size..size + 2] != b"\r\n" {
                    return None;
                }
                body.extend_from_slice(&buf[..size]);
                buf.advance(size + 2);
            }
        }
    }
}

/// RFC 6455 section 4.1: what a client must check in the server's 101.
fn check_101(
    h: &HeaderMap,
    key: &str,
    offered_protocols: &[String],
    offered_extensions: &[String],
) -> Result<(), String> {
    let has_token = |name: http::header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(http::header::UPGRADE, "websocket") {
        return Err("missing `Upgrade: websocket`".into());
    }
    if !has_token(http::header::CONNECTION, "upgrade") {
        return Err("missing `Connection: upgrade`".into());
    }
    // One value each: with two, the client would be told one thing and this check another.
    for name in [
        http::header::SEC_WEBSOCKET_ACCEPT,
        http::header::SEC_WEBSOCKET_PROTOCOL,
    ] {
        if h.get_all(&name).iter().count() > 1 {
            return Err(format!("more than one {name} header"));
        }
    }
    let accept = h
        .get(http::header::SEC_WEBSOCKET_ACCEPT)
        .and_then(|v| v.to_str().ok())
        .ok_or("missing Sec-WebSocket-Accept")?;
    if accept != wskey::accept_for(key) {
        return Err("wrong Sec-WebSocket-Accept".into());
    }
    if let Some(p) = h.get(http::header::SEC_WEBSOCKET_PROTOCOL) {
        let p = p
            .to_str()
            .map_err(|_| "unreadable Sec-WebSocket-Protocol")?
            .trim();
        if !offered_protocols.iter().any(|o| o == p) {
            return Err(format!("subprotocol `{p}` was not offered by the client"));
        }
    }
    for v in h.get_all(http::header::SEC_WEBSOCKET_EXTENSIONS) {
        let v = v
            .to_str()
            .map_err(|_| "unreadable Sec-WebSocket-Extensions")?;
        for ext in v.split(',') {
            let name = ext.split(';').next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            if !offered_extensions
                .iter()
                .any(|o| o.eq_ignore_ascii_case(name))
            {
                return Err(format!("extension `{name}` was not offered by the client"));
            }
        }
    }
    Ok(())
}

/// `insecure_skip_verify`: accepts any certificate but still checks the handshake signature, so
/// the connection is at least encrypted to *someone*. Only ever built on explicit request.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The opening handshake's own headers towards `url` (Host, Upgrade, Connection,
/// Sec-WebSocket-Version), set on `headers` whatever they held: the backend request and the
/// console's client both start from these. The key is added per attempt by [`Connector`].
pub fn opening_headers(url: &BackendUrl, headers: &mut HeaderMap) {
    if let Ok(v) = HeaderValue::from_str(&url.host_header()) {
        headers.insert(http::header::HOST, v);
    }
    headers.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    headers.insert(
        http::header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use tokio::io::{duplex, DuplexStream};

    /// The gateway's request as the backend reads it (one byte at a time), and its key.
    async fn read_request(s: &mut DuplexStream) -> (String, String) {
        let mut req = Vec::new();
        let mut b = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).await.unwrap(), 1, "request cut short");
            req.push(b[0]);
        }
        let text = String::from_utf8(req).unwrap();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-key: "))
            .unwrap()
            .to_owned();
        (text, key)
    }

    fn head_101(key: &str) -> String {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n",
            wskey::accept_for(key)
        )
    }

    fn request_headers() -> HeaderMap {
        let url = BackendUrl {
            tls: false,
            host: "backend.test".into(),
            port: 9000,
            path: "/".into(),
            query: None,
            original: "ws://backend.test:9000/".into(),
        };
        let mut h = HeaderMap::new();
        opening_headers(&url, &mut h);
        h.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h
    }

    /// The gateway side of a handshake against `backend` over an in-memory pipe of `cap` bytes
    /// (1: every read the gateway makes returns a single byte).
    async fn run<F, Fut>(
        cap: usize,
        backend: F,
    ) -> Result<(DuplexStream, Bytes, HeaderMap), BackendError>
    where
        F: FnOnce(DuplexStream, String) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let (gw, mut be) = duplex(cap);
        tokio::spawn(async move {
            let (_, key) = read_request(&mut be).await;
            backend(be, key).await;
        });
        let offered = ["chat".to_owned()];
        let r = handshake_on(gw, "/chat?x=1", request_headers(), &offered, &[]);
        tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("handshake hung")
    }

    /// The backend writes `reply(key)` and closes.
    async fn answer(
        cap: usize,
        reply: impl FnOnce(&str) -> Vec<u8> + Send + 'static,
    ) -> Result<(DuplexStream, Bytes, HeaderMap), BackendError> {
        run(cap, move |mut be, key| async move {
            let _ = be.write_all(&reply(&key)).await;
        })
        .await
    }

    fn rejected(r: Result<(DuplexStream, Bytes, HeaderMap), BackendError>) -> (u16, Bytes) {
        match r {
            Err(BackendError::Rejected { status, body, .. }) => (status.as_u16(), body),
            Err(e) => panic!("expected a rejection, got {e}"),
            Ok(_) => panic!("expected a rejection, got a tunnel"),
        }
    }

    fn kind(r: Result<(DuplexStream, Bytes, HeaderMap), BackendError>) -> &'static str {
        match r {
            Err(e) => e.kind(),
            Ok(_) => "tunnel",
        }
    }

    #[tokio::test]
    async fn the_request_is_one_plain_head() {
        let (gw, mut be) = duplex(64 * 1024);
        let t = tokio::spawn(async move { read_request(&mut be).await });
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            handshake_on(gw, "/chat?x=1", request_headers(), &[], &[]),
        )
        .await;
        let (text, _) = t.await.unwrap();
        assert!(text.starts_with("GET /chat?x=1 HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("\r\nhost: backend.test:9000\r\n"), "{text}");
        assert!(text.contains("\r\nupgrade: websocket\r\n"), "{text}");
        assert!(!text.contains("transfer-encoding"), "{text}");
    }

    #[test]
    fn a_target_that_could_split_the_request_is_refused() {
        for t in ["/a b", "/a\r\nX: y", "", "/\u{e9}"] {
            let e = encode_request(t, &HeaderMap::new()).unwrap_err();
            assert!(e.starts_with("bad backend request"), "{t:?}: {e}");
        }
    }

    #[tokio::test]
    async fn a_head_in_one_byte_reads_then_frames_arrive_byte_exact() {
        let frames = b"\x81\x02hi\x82\x03\x00\r\n\r\n".to_vec();
        let sent = frames.clone();
        let (mut gw, prefix, headers) = answer(1, move |key| {
            let mut v = format!(
                "{}Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
                head_101(key)
            )
            .into_bytes();
            v.extend_from_slice(&sent);
            v
        })
        .await
        .unwrap();
        let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        let mut all = prefix.to_vec();
        gw.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, frames);
    }

    #[tokio::test]
    async fn bytes_behind_the_101_are_the_prefix() {
        let frames: Vec<u8> = (0..=255u8)
            .chain(*b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
            .collect();
        let sent = frames.clone();
        let (mut gw, prefix, _) = answer(64 * 1024, move |key| {
            let mut v = format!("{}\r\n", head_101(key)).into_bytes();
            v.extend_from_slice(&sent);
            v
        })
        .await
        .unwrap();
        let mut rest = Vec::new();
        gw.read_to_end(&mut rest).await.unwrap();
        assert_eq!([&prefix[..], &rest[..]].concat(), frames);
    }

    #[tokio::test]
    async fn duplicate_and_non_utf8_headers_are_kept_as_sent() {
        let (_, _, h) = answer(64 * 1024, |key| {
            let mut v = head_101(key).into_bytes();
            v.extend_from_slice(b"X-Bin: \xff\xfe ok\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n");
            v
        })
        .await
        .unwrap();
        assert_eq!(h.get("x-bin").unwrap().as_bytes(), b"\xff\xfe ok");
        let dups: Vec<_> = h.get_all("x-dup").iter().collect();
        assert_eq!(dups, ["1", "2"]);
        // A non-UTF-8 accept is simply a wrong one.
        let r = answer(64 * 1024, |_| {
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: \xff\r\n\r\n"
                .to_vec()
        })
        .await;
        assert_eq!(kind(r), "bad_upgrade");
    }

    #[tokio::test]
    async fn a_wrong_101_is_no_tunnel() {
        let r = answer(64 * 1024, |_| {
            format!("{}\r\n", head_101("not the key")).into_bytes()
        })
        .await;
        assert_eq!(kind(r), "bad_upgrade");
        let r = answer(64 * 1024, |key| {
            format!("{}Sec-WebSocket-Protocol: other\r\n\r\n", head_101(key)).into_bytes()
        })
        .await;
        assert_eq!(kind(r), "bad_upgrade");
    }

    /// Two `Sec-WebSocket-Accept` or `Sec-WebSocket-Protocol` values: the client would be
    /// passed both while the check saw one, so no tunnel.
    #[tokio::test]
    async fn a_101_with_two_accepts_or_two_subprotocols_is_no_tunnel() {
        let r = answer(64 * 1024, |key| {
            format!(
                "{}Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: evil\r\n\r\n",
                head_101(key)
            )
            .into_bytes()
        })
        .await;
        assert_eq!(kind(r), "bad_upgrade");
        let r = answer(64 * 1024, |key| {
            format!(
                "{}Sec-WebSocket-Accept: {}\r\n\r\n",
                head_101(key),
                wskey::accept_for("another key")
            )
            .into_bytes()
        })
        .await;
        assert_eq!(kind(r), "bad_upgrade");
        // One of each is a tunnel.
        let r = answer(64 * 1024, |key| {
            format!("{}Sec-WebSocket-Protocol: chat\r\n\r\n", head_101(key)).into_bytes()
        })
        .await;
        assert_eq!(kind(r), "tunnel");
    }

    /// Empty lines before the status line are skipped (one byte per read here), count against
    /// the head's cap, and leave the prefix exact.
    #[tokio::test]
    async fn empty_lines_before_the_status_line_are_skipped_within_the_cap() {
        let (mut stream, prefix, _) = answer(1, |key| {
            let mut reply = format!("{}{}\r\n", "\r\n\n".repeat(300), head_101(key)).into_bytes();
            reply.extend_from_slice(b"\x81\x02hi");
            reply
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        // With one byte per read the frame may come after the head: prefix, then the stream.
        let mut rest = vec![0u8; 4 - prefix.len()];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!([&prefix[..], &rest[..]].concat(), b"\x81\x02hi");
        let r = run(16 * 1024, |mut be, _| async move {
            while be.write_all(&[b'\r', b'\n'].repeat(4096)).await.is_ok() {}
        })
        .await;
        let e = r.err().unwrap();
        assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
    }

    #[tokio::test]
    async fn an_endless_head_is_cut_at_the_cap() {
        let r = run(16 * 1024, |mut be, _| async move {
            let _ = be
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nX-Long: ")
                .await;
            let junk = [b'a'; 8192];
            while be.write_all(&junk).await.is_ok() {}
        })
        .await;
        let e = r.err().unwrap();
        assert_eq!(e.kind(), "http");
        assert!(e.to_string().contains("larger than 64 KiB"), "{e}");
    }

    #[tokio::test]
    async fn endless_interim_heads_count_towards_the_cap() {
        let r = run(16 * 1024, |mut be, _| async move {
            while be.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_ok() {}
        })
        .await;
        assert_eq!(kind(r), "http");
    }

    #[tokio::test]
    async fn interim_heads_are_skipped() {
        let (_, prefix, h) = answer(1, |key| {
            format!(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
                 {}X-Final: yes\r\n\r\n",
                head_101(key)
            )
            .into_bytes()
        })
        .await
        .unwrap();
        assert!(prefix.is_empty());
        assert!(!h.contains_key("link"));
        assert_eq!(h.get("x-final").unwrap(), "yes");
    }

    #[tokio::test]
    async fn header_count_is_capped() {
        let with = |n: usize| {
            move |key: &str| {
                let mut s = head_101(key);
                for i in 0..n {
                    s.push_str(&format!("X-{i}: {i}\r\n"));
                }
                s.push_str("\r\n");
                s.into_bytes()
            }
        };
        assert!(answer(64 * 1024, with(MAX_HEADERS - 3)).await.is_ok());
        assert_eq!(kind(answer(64 * 1024, with(MAX_HEADERS - 2)).await), "http");
    }

    #[tokio::test]
    async fn malformed_or_cut_heads_are_http_errors() {
        for reply in [
            &b"HTTP/1.1 101 Switching"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"HTTP/1.1 101 OK\r\nBad Header: x\r\n\r\n",
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 1x\r\n\r\n",
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ] {
            assert_eq!(kind(answer(64 * 1024, |_| reply.to_vec()).await), "http");
        }
    }

    #[tokio::test]
    async fn a_2xx_is_a_rejection_not_a_tunnel() {
        let r = answer(64 * 1024, |key| {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{}\r\nok",
                &head_101(key)[36..]
            )
            .into_bytes()
        })
        .await;
        let e = r.err().unwrap();
        assert_eq!(e.client_status(), StatusCode::BAD_GATEWAY);
        assert_eq!(rejected(Err(e)), (200, Bytes::from_static(b"ok")));
    }

    #[tokio::test]
    async fn rejection_bodies_are_framed_and_capped() {
        let big = "x".repeat(MAX_REJECT_BODY + 1);
        let exact = "y".repeat(MAX_REJECT_BODY);
        let cases: Vec<(String, &[u8])> = vec![
            ("Content-Length: 5\r\n\r\nhello-and-more".into(), b"hello"),
            (
                "Transfer-Encoding: gzip, chunked\r\nContent-Length: 1\r\n\r\n\
                 5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                    .into(),
                b"hello world",
            ),
            ("\r\nto the close".into(), b"to the close"),
            (format!("\r\n{big}"), b""),
            (format!("Content-Length: {}\r\n\r\n{big}", big.len()), b""),
            (
                format!("Content-Length: {}\r\n\r\n{exact}", exact.len()),
                exact.as_bytes(),
            ),
            (
                format!(
                    "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
                    big.len()
                ),
                b"",
            ),
            (
                format!(
                    "Transfer-Encoding: chunked\r\n\r\n1;{}\r\nz\r\n0\r\n\r\n",
                    "e".repeat(2000)
                ),
                b"",
            ),
            (
                "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n".into(),
                b"",
            ),
            ("Content-Length: 10\r\n\r\ncut".into(), b""),
        ];
        for cap in [1, 64 * 1024] {
            for (rest, want) in &cases {
                let reply = format!("HTTP/1.1 403 Forbidden\r\n{rest}").into_bytes();
                let (status, body) = rejected(answer(cap, move |_| reply).await);
                assert_eq!(status, 403);
                assert!(body == want, "{cap} {:.60}: got {} bytes", rest, body.len());
            }
        }
    }

    #[tokio::test]
    async fn a_204_has_no_body_to_wait_for() {
        let r = run(64 * 1024, |mut be, _| async move {
            let _ = be.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            std::future::pending::<()>().await;
        })
        .await;
        assert_eq!(rejected(r), (204, Bytes::new()));
    }
}
