//! The admin listener: health endpoints now; metrics and the test console slot in here.
//!
//! - `GET /healthz`: 200 while the process is up and serving its event loop.
//! - `GET /readyz`: 200 once every listener is bound and while not draining; 503 otherwise
//!   (a load balancer takes the gateway out of rotation during shutdown).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::server::Gateway;

pub async fn serve(listener: TcpListener, gw: Arc<Gateway>) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(route(&gw, req.uri().path())) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn route(gw: &Gateway, path: &str) -> Response<Full<Bytes>> {
    if path == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(gw.metrics.encode())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        return r;
    }
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n"),
        "/readyz" if gw.ready.load(Ordering::SeqCst) => (StatusCode::OK, "ready\n"),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    };
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}
