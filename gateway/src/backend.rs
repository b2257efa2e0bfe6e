//! The backend connector: opens the backend WebSocket (ws, or wss with rustls), sends the
//! handshake with hyper's HTTP/1.1 client, and checks the backend's answer before anything is
//! relayed.
//!
//! Only a correct 101 (right `Sec-WebSocket-Accept`, a subprotocol and extensions the client
//! offered) yields a socket. Any other answer is returned as [`BackendError::Rejected`] with its
//! status and body so the client sees what the backend said, and the backend socket is dropped:
//! no tunnel is ever opened on a failed upgrade, which defeats "WebSocket smuggling" through the
//! gateway.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::manifest::BackendUrl;
use crate::stream::Stream;
use crate::wskey;

/// Largest backend rejection body passed on to the client.
const MAX_REJECT_BODY: usize = 64 * 1024;

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
    #[error("backend HTTP error: {0}")]
    Http(#[from] hyper::Error),
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
    /// Frames the backend sent right behind its 101, already read by hyper.
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
        mut headers: HeaderMap,
        offered_protocols: &[String],
        offered_extensions: &[String],
    ) -> Result<Upgraded, BackendError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await?;
        // The connection future is driven right here, next to the request, rather than spawned
        // as a task of its own: one task and one cross-task wake-up less per handshake.
        let mut conn = std::pin::pin!(conn.with_upgrades());
        let key = wskey::generate_key();
        headers.insert(
            http::header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&key).map_err(|e| BackendError::BadUpgrade(e.to_string()))?,
        );
        let mut req = Request::builder()
            .method(http::Method::GET)
            .uri(target)
            .body(Empty::<Bytes>::new())
            .map_err(|e| BackendError::BadUpgrade(format!("bad backend request: {e}")))?;
        *req.headers_mut() = headers;
        // For a 101 the connection future may finish first (it delivers the response and hands
        // the socket to the upgrade in one poll); it must then not be polled again.
        let mut conn_done = false;
        let mut resp = {
            let mut sent = std::pin::pin!(sender.send_request(req));
            tokio::select! {
                biased;
                r = &mut sent => r?,
                c = &mut conn => {
                    c?;
                    conn_done = true;
                    sent.await?
                }
            }
        };
        // No further requests: once the response is consumed, the connection future finishes
        // (or hands the socket to the upgrade).
        drop(sender);

        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let headers = resp.headers().clone();
            let collect = Limited::new(resp.into_body(), MAX_REJECT_BODY).collect();
            let body = if conn_done {
                collect.await
            } else {
                tokio::join!(conn, collect).1
            };
            return Err(BackendError::Rejected {
                status,
                headers,
                body: body.map(|b| b.to_bytes()).unwrap_or_default(),
            });
        }
        check_101(resp.headers(), &key, offered_protocols, offered_extensions)
            .map_err(BackendError::BadUpgrade)?;
        let headers = resp.headers().clone();
        let upgraded = if conn_done {
            hyper::upgrade::on(&mut resp).await
        } else {
            let (c, u) = tokio::join!(conn, hyper::upgrade::on(&mut resp));
            c?;
            u
        };
        let parts = upgraded?
            .downcast::<TokioIo<Stream>>()
            .map_err(|_| BackendError::BadUpgrade("unexpected upgraded stream type".into()))?;
        let hyper::upgrade::Parts { io, read_buf, .. } = parts;
        Ok(Upgraded {
            stream: io.into_inner(),
            prefix: read_buf,
            headers,
        })
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
