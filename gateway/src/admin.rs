//! The admin listener (bind it to localhost or a private network: it is not authenticated).
//!
//! - `GET /healthz`: 200 while the process is up and its event loop answers (liveness).
//! - `GET /readyz`: 200 once the manifest is loaded, every plugin is loaded and checked, and
//!   every listener is bound, and while not draining; 503 otherwise (a load balancer takes the
//!   gateway out of rotation during shutdown).
//! - `GET /metrics`: Prometheus metrics ([`crate::metrics`]).
//! - `GET /apis`: the served APIs as JSON (see [`apis_json`]).
//! - `GET /console`: the web test console ([`crate::console`]).

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
    // Serves until the process exits, drain included: `/readyz` answers 503 while draining
    // instead of refusing connections.
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(route(&gw, &req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn route<B>(gw: &Gateway, req: &http::Request<B>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/console" || path == "/console/" {
        let mut r = Response::new(Full::new(Bytes::from_static(
            include_str!("console.html").as_bytes(),
        )));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/html; charset=utf-8"),
        );
        return r;
    }
    if path == "/console/probe" {
        let origin = req
            .headers()
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        let answer = crate::console::probe(gw, req.uri().query().unwrap_or(""), origin).await;
        let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    if path == "/apis" {
        let mut r = Response::new(Full::new(Bytes::from(apis_json(gw).to_string())));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return r;
    }
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

/// The served APIs, from the state new handshakes use now (so it follows reloads): names,
/// paths, schemes, backend, products, limits, live connection counts and the policy chain
/// (plugin, version, scope, instance strategy), and the products with their subscriptions'
/// names, limits and live counts. Policy *configs* and subscription keys are left out.
pub fn apis_json(gw: &Gateway) -> serde_json::Value {
    use serde_json::json;
    let served = gw.served();
    let listeners: Vec<_> = gw
        .bound
        .get()
        .map(|b| {
            b.iter()
                .map(|(scheme, addr)| json!({"scheme": scheme, "addr": addr.to_string()}))
                .collect()
        })
        .unwrap_or_default();
    let mut apis: Vec<_> = served
        .routes
        .apis()
        .iter()
        .map(|a| {
            let c = &a.config;
            let mut schemes = Vec::new();
            if c.schemes.ws {
                schemes.push("ws");
            }
            if c.schemes.wss {
                schemes.push("wss");
            }
            let policies: Vec<_> = a
                .chain
                .iter()
                .map(|s| {
                    json!({
                        "plugin": s.plugin.name,
                        "version": s.plugin.version,
                        "scope": match &s.scope {
                            crate::capabilities::Scope::Global => "global".to_owned(),
                            crate::capabilities::Scope::Product(p) => format!("product:{p}"),
                            crate::capabilities::Scope::Api(_) => "api".to_owned(),
                        },
                        "instances": if s.pool.is_some() { "pooled" } else { "fresh" },
                        "skipped": s.skip,
                    })
                })
                .collect();
            json!({
                "name": c.name,
                "display_name": c.display_name,
                "url_suffix": c.url_suffix,
                "path": format!("/{}", c.url_suffix),
                "schemes": schemes,
                "backend": c.backend.original,
                "products": c.products,
                // Where a subscription key goes, for APIs in products (the console shows it).
                "subscription_key": (!c.products.is_empty()).then(|| json!({
                    "header": c.subscription_key.header,
                    "query": c.subscription_key.query,
                    "required": a.open_product.is_none(),
                })),
                "max_connections": c.max_connections,
                "active_connections": a.active.load(Ordering::Relaxed),
                "policies": policies,
            })
        })
        .collect();
    apis.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
    // Subscriptions by name with their live counts; never a key or a digest.
    let products: Vec<_> = served
        .config
        .products
        .iter()
        .map(|p| {
            let subscriptions: Vec<_> = served
                .keys
                .all()
                .iter()
                .filter(|s| s.product == p.name)
                .map(|s| {
                    json!({
                        "name": s.name,
                        "max_connections": s.max_connections,
                        "active_connections": s.active.load(Ordering::Relaxed),
                    })
                })
                .collect();
            json!({
                "name": p.name,
                "display_name": p.display_name,
                "subscription_required": p.subscription_required,
                "apis": served
                    .config
                    .apis
                    .iter()
                    .filter(|a| a.products.contains(&p.name))
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>(),
                "policies": p.policies.iter().map(|a| a.plugin.as_str()).collect::<Vec<_>>(),
                "subscriptions": subscriptions,
            })
        })
        .collect();
    json!({
        "gateway": served.config.gateway.name,
        "listeners": listeners,
        "apis": apis,
        "products": products,
    })
}
