//! A local HTTPS OpenID Connect provider (discovery document and JWKS) for the tests, and RSA
//! keys that sign RS256 tokens it can publish.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::tls::Leaf;

/// What the provider serves, and what it has served.
struct State {
    jwks: serde_json::Value,
    cache_control: Option<String>,
    /// Completed GETs per path.
    fetches: HashMap<String, usize>,
}

/// The listener and tasks of one serving period (between start/restart and stop).
struct Serving {
    /// Held here too so `stop` can shut the socket down while it is certainly still open.
    listener: Arc<TcpListener>,
    accept: JoinHandle<()>,
    /// Cancelled by `stop`: ends the accept loop and every connection.
    cancel: CancellationToken,
}

/// An OpenID Connect provider on `https://127.0.0.1:PORT`: `/.well-known/openid-configuration`
/// and `/jwks`, with a JWKS and `Cache-Control` the test can change, per-path fetch counts, and
/// `stop`/`restart` for the "provider down" case.
pub struct OidcProvider {
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<Mutex<State>>,
    serving: Option<Serving>,
}

impl OidcProvider {
    /// Starts serving HTTPS on 127.0.0.1:<free port> with `leaf` (a TestCa leaf for
    /// "127.0.0.1" / "localhost"), publishing `jwks` at `/jwks`.
    pub async fn start(leaf: &Leaf, jwks: serde_json::Value) -> OidcProvider {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut p = OidcProvider {
            addr,
            acceptor: TlsAcceptor::from(leaf.server_config()),
            state: Arc::new(Mutex::new(State {
                jwks,
                cache_control: None,
                fetches: HashMap::new(),
            })),
            serving: None,
        };
        p.serve(listener);
        p
    }

    /// `https://127.0.0.1:PORT`, also the `issuer` of the discovery document.
    pub fn base(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.base())
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.base())
    }

    /// The JWKS served from now on.
    pub fn set_jwks(&self, jwks: serde_json::Value) {
        self.state.lock().unwrap().jwks = jwks;
    }

    /// The `Cache-Control` header of `/jwks` responses from now on (None: no header).
    pub fn set_cache_control(&self, value: Option<&str>) {
        self.state.lock().unwrap().cache_control = value.map(str::to_owned);
    }

    /// Completed GETs of `path` so far (e.g. "/jwks", "/.well-known/openid-configuration"),
    /// across stops and restarts.
    pub fn fetches(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .fetches
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Stops serving: from when this returns, connections to the port are refused, and open
    /// connections are dropped. Does nothing if already stopped.
    pub fn stop(&mut self) {
        let Some(s) = self.serving.take() else {
            return;
        };
        s.cancel.cancel();
        // Aborting the accept task closes the listener only once the runtime gets to drop the
        // task; shutting the listening socket down takes it out of the listen state right now,
        // so a connection attempt from here on is refused (RST) and queued ones are reset.
        // The fd is valid: `s.listener` keeps the socket open until the end of this function.
        unsafe {
            libc::shutdown(s.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
        s.accept.abort();
    }

    /// Serves again on the same port after [`OidcProvider::stop`], with the same JWKS,
    /// `Cache-Control` and counters. Does nothing if serving.
    pub async fn restart(&mut self) {
        if self.serving.is_some() {
            return;
        }
        // The old socket is closed once its aborted task has been dropped: retry briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("rebinding the OIDC provider on {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let listener = Arc::new(listener);
        let cancel = CancellationToken::new();
        let accept = tokio::spawn(accept_loop(
            listener.clone(),
            self.acceptor.clone(),
            self.state.clone(),
            self.base(),
            cancel.clone(),
        ));
        self.serving = Some(Serving {
            listener,
            accept,
            cancel,
        });
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: Arc<TcpListener>,
    acceptor: TlsAcceptor,
    state: Arc<Mutex<State>>,
    base: String,
    cancel: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                // After `stop` shut the socket down accept fails: done. Anything else (e.g. out
                // of descriptors) is retried.
                Err(_) if cancel.is_cancelled() => return,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        let (acceptor, state, base, cancel) = (
            acceptor.clone(),
            state.clone(),
            base.clone(),
            cancel.clone(),
        );
        tokio::spawn(async move {
            let tls = tokio::select! {
                r = acceptor.accept(tcp) => match r {
                    Ok(tls) => tls,
                    Err(_) => return,
                },
                _ = cancel.cancelled() => return,
            };
            let service = hyper::service::service_fn(move |req| {
                let (state, base) = (state.clone(), base.clone());
                async move { Ok::<_, Infallible>(respond(&req, &state, &base)) }
            });
            // Keep-alive is on by default: a client may send several requests on a connection.
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

fn respond(req: &Request<Incoming>, state: &Mutex<State>, base: &str) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let mut st = state.lock().unwrap();
    let (status, body, cache_control) = match (req.method(), path) {
        (&Method::GET, "/.well-known/openid-configuration") => (
            StatusCode::OK,
            serde_json::json!({
                "issuer": base,
                "jwks_uri": format!("{base}/jwks"),
                "id_token_signing_alg_values_supported": ["RS256"],
            })
            .to_string(),
            None,
        ),
        (&Method::GET, "/jwks") => (
            StatusCode::OK,
            st.jwks.to_string(),
            st.cache_control.clone(),
        ),
        _ => (StatusCode::NOT_FOUND, String::new(), None),
    };
    if req.method() == Method::GET {
        *st.fetches.entry(path.to_owned()).or_default() += 1;
    }
    drop(st);
    let mut resp = Response::builder().status(status);
    if status == StatusCode::OK {
        resp = resp.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    if let Some(cc) = cache_control {
        resp = resp.header(hyper::header::CACHE_CONTROL, cc);
    }
    resp.body(Full::new(Bytes::from(body))).unwrap()
}

fn b64(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

/// An RSA-2048 signing key with a kid.
pub struct RsaSigner {
    pub kid: String,
    key: rsa::RsaPrivateKey,
    signing: rsa::pkcs1v15::SigningKey<rsa::sha2::Sha256>,
}

impl RsaSigner {
    pub fn new(kid: &str) -> RsaSigner {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
        RsaSigner {
            kid: kid.to_owned(),
            signing: rsa::pkcs1v15::SigningKey::new(key.clone()),
            key,
        }
    }

    /// The public JWK: {"kty":"RSA","kid":..,"alg":"RS256","use":"sig","n":..,"e":..}.
    pub fn jwk(&self) -> serde_json::Value {
        let pk = self.key.to_public_key();
        serde_json::json!({
            "kty": "RSA",
            "kid": self.kid,
            "alg": "RS256",
            "use": "sig",
            "n": b64(&pk.n().to_bytes_be()),
            "e": b64(&pk.e().to_bytes_be()),
        })
    }

    /// A compact RS256 JWS with header {"alg":"RS256","typ":"JWT","kid":<kid>} over `claims`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_with_kid(&self.kid, claims)
    }

    /// [`RsaSigner::sign`] with `kid` in the header instead of this key's (signed by this key
    /// all the same): tokens that name a kid the JWKS may not have.
    pub fn sign_with_kid(&self, kid: &str, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.signing.sign(input.as_bytes()).to_vec();
        format!("{input}.{}", b64(&sig))
    }
}

/// {"keys": [jwk, ...]} of `signers`, in order.
pub fn jwks_of(signers: &[&RsaSigner]) -> serde_json::Value {
    serde_json::json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()})
}
