//! The policy chain's own time per handshake, measured in process with the gateway's own code
//! (`tollgate::policy::chain::run` on the chain `tollgate::policy::chain::build` makes from a manifest): no
//! sockets, no HTTP, so the figure is what the plugin host adds to a handshake. Each step is
//! also timed alone, and the host's native signature check once more without any wasm, so the
//! report can say where the time goes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tollgate::policy::chain::{self, Outcome, Step};
use tollgate::policy::Request;

#[derive(clap::Args, Clone)]
pub struct ChainArgs {
    /// Manifest whose API's chain is measured (plugins from its `plugin_dir`).
    #[arg(long)]
    pub manifest: PathBuf,
    /// API name (default: the manifest's first API).
    #[arg(long)]
    pub api: Option<String>,
    /// Request header `Name: value` (repeatable), e.g. the `Authorization` header.
    #[arg(long)]
    pub header: Vec<String>,
    /// Context value `name=value` the request starts with (repeatable), as an earlier policy
    /// would have set it.
    #[arg(long)]
    pub context: Vec<String>,
    /// Handshakes to time per measurement.
    #[arg(long, default_value_t = 20_000)]
    pub iterations: usize,
}

/// p50 and p99 of one measurement, in microseconds.
#[derive(serde::Serialize)]
pub struct Timing {
    pub what: String,
    pub p50_us: f64,
    pub p99_us: f64,
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v.get(((v.len().max(1) - 1) as f64 * p) as usize).copied();
    (at(0.5).unwrap_or(0.0), at(0.99).unwrap_or(0.0))
}

fn request(api: &str, headers: &[String], context: &[String]) -> anyhow::Result<Request> {
    let mut h = http::HeaderMap::new();
    for (n, v) in [
        ("host", "127.0.0.1:8080"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ] {
        h.append(n, http::HeaderValue::from_static(v));
    }
    for line in headers {
        if let Some((n, v)) = line.split_once(':') {
            h.append(
                http::HeaderName::from_bytes(n.trim().to_ascii_lowercase().as_bytes())?,
                http::HeaderValue::from_str(v.trim())?,
            );
        }
    }
    Ok(Request {
        method: http::Method::GET,
        path: format!("/{api}"),
        query: Vec::new(),
        headers: h,
        client: "127.0.0.1:40000".parse()?,
        client_ip: "127.0.0.1".parse().ok(),
        tls: None,
        api: Arc::from(api),
        product: None,
        context: context
            .iter()
            .filter_map(|c| c.split_once('='))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect(),
        received_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// Times `steps` over `n` handshakes; fails on the first rejection (the measurement would be
/// of the wrong path).
async fn time_steps(steps: &[Step], req: &Request, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let mut target = String::from("/");
        let mut headers = http::HeaderMap::new();
        let t = Instant::now();
        let r = chain::run(steps, req.clone(), &mut headers, &mut target, &|_| false).await;
        let el = t.elapsed();
        match r {
            Outcome::Proceed(_) => {}
            Outcome::Reject(r) => anyhow::bail!("the chain rejected the request: {}", r.status),
            Outcome::Failed(f) => anyhow::bail!("policy `{}` failed: {}", f.plugin, f.error),
        }
        // The first tenth warms caches and the allocator; not counted.
        if i >= n / 10 {
            v.push(el.as_secs_f64() * 1e6);
        }
    }
    Ok(percentiles(v))
}

/// Runs every measurement; returns them in report order. Loading (and `configure`) happens
/// before the runtime starts, as in the gateway.
pub fn measure(args: &ChainArgs) -> anyhow::Result<Vec<Timing>> {
    let config = tollgate::manifest::load(&args.manifest).map_err(|e| anyhow::anyhow!("{e}"))?;
    let api = match &args.api {
        Some(n) => config.apis.iter().find(|a| &a.name == n),
        None => config.apis.first(),
    }
    .context("no such API in the manifest")?;
    let dir = config
        .gateway
        .plugin_dir
        .clone()
        .context("the manifest has no plugin_dir")?;
    let mut host = tollgate::policy::PolicyHost::new(config.gateway.plugin_cache_dir.clone())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    host.set_signature_cache(config.gateway.signature_cache_entries);
    let host = Arc::new(host);
    let (loaded, errors) = host.load_dir(&dir);
    if let Some(e) = errors.first() {
        anyhow::bail!("{e}");
    }
    let plugins: HashMap<String, Arc<tollgate::policy::Plugin>> = loaded
        .into_iter()
        .map(|p| (p.name.clone(), Arc::new(p)))
        .collect();
    let specs =
        tollgate::attachments(&config, api).map_err(|e| anyhow::anyhow!("{}", e.join("; ")))?;
    let steps = chain::build(
        &host,
        &plugins,
        &api.name,
        specs,
        &tollgate::metrics::Metrics::new(),
    )
    .map_err(|e| {
        let all: Vec<String> = e.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", all.join("; "))
    })?;
    let req = request(&api.name, &args.header, &args.context)?;
    // One worker, as a connection's task sees it: the guest runs on a fiber in this task.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(timed(&steps, req, args.iterations))
}

async fn timed(steps: &[Step], req: Request, iterations: usize) -> anyhow::Result<Vec<Timing>> {
    let mut out = Vec::new();
    let (p50, p99) = time_steps(steps, &req, iterations).await?;
    out.push(Timing {
        what: "whole chain".into(),
        p50_us: p50,
        p99_us: p99,
    });
    // Each step alone, fed the context the steps before it produced (so set-header finds the
    // claims jwt-validate would have put there).
    let mut ctx_req = req.clone();
    for (i, step) in steps.iter().enumerate() {
        let one = std::slice::from_ref(step);
        let (p50, p99) = time_steps(one, &ctx_req, iterations).await?;
        out.push(Timing {
            what: format!("step {}: {}", i + 1, step.plugin.name),
            p50_us: p50,
            p99_us: p99,
        });
        let mut target = String::from("/");
        let mut headers = http::HeaderMap::new();
        if let (_, Some(after)) =
            chain::run_keeping_request(one, ctx_req.clone(), &mut headers, &mut target, &|_| false)
                .await
        {
            ctx_req = after;
        }
    }
    Ok(out)
}

/// The `chain` sub-command: prints one JSON line per measurement.
pub fn run(args: ChainArgs) -> anyhow::Result<()> {
    for t in measure(&args)? {
        println!("{}", serde_json::to_string(&t)?);
    }
    Ok(())
}
