//! The Grafana dashboard (`deploy/grafana/tollgate.json`) and the Prometheus alerting rules
//! (`deploy/prometheus/alerts.yml`): promtool accepts the rules and their unit tests
//! (`alerts.test.yml`) pass; every metric and label their PromQL uses is one a running gateway
//! really exposes (scraped after driving traffic through it, clustered on a real
//! `redis-server`); the dashboard is an importable model whose panels all query the templated
//! Prometheus data source.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;

use crate::support::redis::RedisServer;
use crate::support::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs promtool from the repository's root; a missing promtool fails the test with what to do.
fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): run ./scripts/test, which installs Debian's \
                 `prometheus` package (or `apt-get install prometheus`)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// ------------------------------------------------------------------------------------------
// The rules file, read line by line (its layout is ours: one `- alert:` per rule, `expr: |`
// blocks); promtool's own count of the rules checks that nothing was missed.

#[derive(Debug)]
struct Alert {
    name: String,
    expr: String,
    /// Every line of the rule, for its `for:`, labels and annotations.
    text: String,
}

fn alerts(yaml: &str) -> Vec<Alert> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out: Vec<Alert> = Vec::new();
    // Inside a rule (until the next group starts).
    let mut open = false;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        assert!(
            !t.starts_with("- record:"),
            "recording rules are not expected in alerts.yml: {line}"
        );
        if let Some(name) = t.strip_prefix("- alert:") {
            out.push(Alert {
                name: name.trim().to_owned(),
                expr: String::new(),
                text: String::new(),
            });
            open = true;
        } else if t.starts_with("- name:") {
            open = false;
        }
        let Some(alert) = out.last_mut().filter(|_| open) else {
            i += 1;
            continue;
        };
        alert.text.push_str(line);
        alert.text.push('\n');
        if let Some(v) = t.strip_prefix("expr:") {
            let v = v.trim();
            if v.starts_with('|') || v.starts_with('>') {
                let base = indent(line);
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > base)
                {
                    i += 1;
                    alert.expr.push_str(lines[i]);
                    alert.expr.push('\n');
                    alert.text.push_str(lines[i]);
                    alert.text.push('\n');
                }
            } else {
                alert.expr = v.trim_matches(|c| c == '\'' || c == '"').to_owned();
            }
        }
        i += 1;
    }
    out
}

/// `{{ $labels.NAME }}` references in a template text.
fn template_labels(text: &str) -> BTreeSet<String> {
    text.split("$labels.")
        .skip(1)
        .map(|r| {
            r.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

/// `{{NAME}}` references in a Grafana legend.
fn legend_labels(legend: &str) -> BTreeSet<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|r| r.split_once("}}").map(|(l, _)| l.trim().to_owned()))
        .collect()
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests_fire_each_alert() {
    let yaml = read("deploy/prometheus/alerts.yml");
    let rules = alerts(&yaml);
    assert!(rules.len() >= 6, "{rules:#?}");

    let (ok, out) = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(ok, "promtool check rules:\n{out}");
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "promtool counts other rules than the {} read here:\n{out}",
        rules.len()
    );
    let (ok, out) = promtool(&["test", "rules", "deploy/prometheus/alerts.test.yml"]);
    assert!(ok, "promtool test rules:\n{out}");
    let (ok, out) = promtool(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    assert!(ok, "promtool check config:\n{out}");

    // What every rule carries, and what the issue asks the rules to cover.
    for a in &rules {
        assert!(!a.expr.trim().is_empty(), "{} has no expr", a.name);
        for key in ["for:", "severity:", "summary:", "description:"] {
            assert!(
                a.text.lines().any(|l| l.trim_start().starts_with(key)),
                "{} has no `{key}`:\n{}",
                a.name,
                a.text
            );
        }
        let severity = a
            .text
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity:"))
            .unwrap()
            .trim();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{}: severity {severity}",
            a.name
        );
    }
    let exprs: String = rules.iter().map(|a| a.expr.as_str()).collect();
    for (what, needle) in [
        ("handshake 5xx share", "status=~\"5..\""),
        (
            "policy failures",
            "tollgate_policy_calls_total{outcome=\"error\"}",
        ),
        ("limit saturation", "tollgate_limits_hit_total"),
        ("connections near the limit", "tollgate_connections_active"),
        ("reload rejected", "outcome=\"rejected\""),
        ("store fallback", "tollgate_store_fallback"),
        ("store errors", "tollgate_store_errors_total"),
    ] {
        assert!(exprs.contains(needle), "no rule for {what} ({needle})");
    }

    // The unit tests fire each alert at least once and check a quiet case for it too.
    let tests = read("deploy/prometheus/alerts.test.yml");
    let mut fired: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut current: Option<String> = None;
    for l in tests.lines().map(str::trim) {
        if let Some(name) = l.strip_prefix("alertname:") {
            current = Some(name.trim().to_owned());
        } else if let Some(exp) = l.strip_prefix("exp_alerts:") {
            let name = current.take().expect("exp_alerts without alertname");
            let e = fired.entry(name).or_default();
            if exp.trim() == "[]" {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
    }
    for a in &rules {
        let (firing, quiet) = fired.get(&a.name).copied().unwrap_or_default();
        assert!(
            firing >= 1 && quiet >= 1,
            "alerts.test.yml must fire {} at least once and check it quiet at least once \
             (fires {firing}, quiet {quiet})",
            a.name
        );
    }
}

// ------------------------------------------------------------------------------------------
// The dashboard.

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/grafana/tollgate.json"))
        .expect("deploy/grafana/tollgate.json is not JSON")
}

/// Every panel, those inside (collapsed) rows included.
fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("no panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// (where, PromQL, legend) of every panel target.
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                format!("panel `{}` target {}", p["title"], t["refId"]),
                t["expr"].as_str().unwrap_or_default().to_owned(),
                t["legendFormat"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

/// (variable, selector, label) of every `label_values(selector, label)` variable query.
fn variable_queries(d: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        let inner = q
            .trim()
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: not label_values(...): {q}", v["name"]));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        out.push((
            v["name"].as_str().unwrap().to_owned(),
            selector.trim().to_owned(),
            label.trim().to_owned(),
        ));
    }
    out
}

const DS_VAR: &str = "${DS_PROMETHEUS}";

#[test]
fn the_dashboard_is_an_importable_model_whose_panels_query_the_datasource_variable() {
    let d = dashboard();
    assert_eq!(d["title"], "Tollgate");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    // Importable anywhere: no id of the instance it was exported from.
    assert!(d["id"].is_null(), "id: {}", d["id"]);

    let vars = d["templating"]["list"].as_array().expect("no templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    let ds = var("DS_PROMETHEUS");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for name in ["instance", "api"] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        assert_eq!(v["datasource"]["uid"], DS_VAR, "{name}");
        assert_eq!(v["includeAll"], true, "{name}");
        assert_eq!(v["multi"], true, "{name}");
    }

    let all = panels(&d);
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    let mut queried = 0;
    for p in &all {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.trim().is_empty(), "a panel without a title: {p}");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        assert!(
            ["h", "w", "x", "y"].iter().all(|k| g[k].is_u64()),
            "{title}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(titles.insert(title), "two panels named {title}");
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(
            p["datasource"]["uid"], DS_VAR,
            "{title}: datasource must be the templated variable"
        );
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        assert!(!targets.is_empty(), "{title}: no target");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: a target without expr"
            );
            assert_eq!(t["datasource"]["uid"], DS_VAR, "{title}");
            queried += 1;
        }
    }
    assert!(queried >= 20, "{queried} queries");

    // What the issue lists, each on a panel of its own.
    let exprs: String = dashboard_queries(&d)
        .into_iter()
        .map(|(_, e, _)| e + "\n")
        .collect();
    for needle in [
        "sum by (status) (rate(tollgate_handshakes_total",
        "tollgate_connections_active",
        "sum by (direction, type) (rate(tollgate_frames_total",
        "sum by (direction) (rate(tollgate_relayed_bytes_total",
        "sum by (code) (rate(tollgate_connections_closed_total",
        "histogram_quantile(0.99, sum by (le, plugin) (rate(tollgate_policy_duration_seconds_bucket",
        "tollgate_limits_hit_total",
        "tollgate_reloads_total",
        "tollgate_store_call_duration_seconds_bucket",
        "tollgate_store_errors_total",
        "tollgate_store_fallback",
        "tollgate_fleet_live_gateways",
        "tollgate_counter_increments_total",
    ] {
        assert!(exprs.contains(needle), "no panel queries {needle}");
    }
}

// ------------------------------------------------------------------------------------------
// What the gateway exposes: a live scrape, with the README's table for families that have no
// series in it.

#[derive(Debug, Default)]
struct Family {
    labels: BTreeSet<String>,
    /// Label values seen, and the words the README quotes for the metric.
    values: BTreeMap<String, BTreeSet<String>>,
    readme_words: BTreeSet<String>,
    /// Known from the README only (registered, but no series in the scrape).
    readme_only: bool,
}

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

struct Schema(BTreeMap<String, Family>);

impl Schema {
    fn labels(&self, name: &str) -> Option<BTreeSet<String>> {
        let f = self.0.get(name)?;
        let mut l = f.labels.clone();
        l.extend(TARGET_LABELS.map(String::from));
        Some(l)
    }
}

/// Parses one exposition sample line: (name, [(label, value)]).
fn parse_sample(line: &str) -> (String, Vec<(String, String)>) {
    let end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..end].to_owned();
    let mut labels = Vec::new();
    if line[end..].starts_with('{') {
        let mut chars = line[end + 1..].chars();
        loop {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            let key = key.trim().trim_start_matches(',').trim().to_owned();
            if key.is_empty() || key.starts_with('}') {
                break;
            }
            assert_eq!(chars.next(), Some('"'), "{line}");
            let mut value = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(o) => value.push(o),
                        None => break,
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.push((key, value));
            match chars.next() {
                Some(',') => continue,
                _ => break,
            }
        }
    }
    (name, labels)
}

/// The README's metrics table: metric name -> (type, labels, words quoted in its row).
fn readme_metrics() -> BTreeMap<String, (String, Vec<String>, BTreeSet<String>)> {
    read("README.md")
        .lines()
        .filter_map(|l| {
            let mut cells = l.strip_prefix("| `tollgate_")?.split('|');
            let name = format!("tollgate_{}", cells.next()?.trim().trim_end_matches('`'));
            let kind = cells.next()?.trim().to_owned();
            let labels = cells
                .next()?
                .split(',')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .filter(|c| !c.is_empty())
                .collect();
            let words = l.split('`').skip(1).step_by(2).map(String::from).collect();
            Some((name, (kind, labels, words)))
        })
        .collect()
}

fn schema_of(exposition: &str) -> Schema {
    let readme = readme_metrics();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut registered: Vec<(String, String)> = Vec::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            registered.push((name.to_owned(), kind.trim().to_owned()));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, labels) = parse_sample(line);
        let f = families.entry(name).or_default();
        for (k, v) in labels {
            f.labels.insert(k.clone());
            f.values.entry(k).or_default().insert(v);
        }
    }
    // The sample names of each registered family; those with no series come from the README.
    for (family, kind) in registered {
        let (names, suffix_labels): (Vec<String>, Vec<Option<&str>>) = match kind.as_str() {
            "counter" => (vec![format!("{family}_total")], vec![None]),
            "histogram" => (
                vec![
                    format!("{family}_bucket"),
                    format!("{family}_sum"),
                    format!("{family}_count"),
                ],
                vec![Some("le"), None, None],
            ),
            _ => (vec![family.clone()], vec![None]),
        };
        let documented = match kind.as_str() {
            "counter" => format!("{family}_total"),
            _ => family.clone(),
        };
        let row = readme.get(&documented);
        for (name, extra) in names.into_iter().zip(suffix_labels) {
            let f = families.entry(name.clone()).or_insert_with(|| {
                let (_, labels, _) = row.unwrap_or_else(|| {
                    panic!("{name} has no series and no row in the README's metrics table")
                });
                Family {
                    labels: labels
                        .iter()
                        .cloned()
                        .chain(extra.map(String::from))
                        .collect(),
                    readme_only: true,
                    ..Family::default()
                }
            });
            if let Some((_, _, words)) = row {
                f.readme_words = words.clone();
            }
        }
    }
    Schema(families)
}

/// Checks one PromQL expression against what the gateway exposes: its metrics exist, every
/// label a matcher, `by`, `on` or template uses is on the series at that point, and every
/// plain matcher value is one the gateway produces (seen or quoted in the README).
fn check_query(
    schema: &Schema,
    what: &str,
    expr: &str,
    uses: &BTreeSet<String>,
    errors: &mut Vec<String>,
    used: &mut BTreeSet<String>,
) -> Option<promql::Expr> {
    let parsed = match promql::parse(expr) {
        Ok(e) => e,
        Err(e) => {
            errors.push(format!("{what}: {e}\n  {expr}"));
            return None;
        }
    };
    match promql::check(&parsed, &|m| schema.labels(m)) {
        Ok(ty) => {
            let out = ty.labels();
            for l in uses {
                if !out.contains(l) {
                    errors.push(format!(
                        "{what}: uses label `{l}`, but the expression's series carry only \
                         {out:?}\n  {expr}"
                    ));
                }
            }
        }
        Err(e) => errors.push(format!("{what}: {e}\n  {expr}")),
    }
    for (metric, matchers) in promql::selectors(&parsed) {
        used.insert(metric.to_owned());
        let Some(f) = schema.0.get(metric) else {
            continue;
        };
        for m in matchers {
            if TARGET_LABELS.contains(&m.label.as_str()) || m.value.contains('$') {
                continue;
            }
            let plain = |s: &str| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|')
            };
            let values: Vec<&str> = match m.op {
                "=" | "!=" if plain(&m.value) => vec![m.value.as_str()],
                "=~" | "!~" if plain(&m.value) => m.value.split('|').collect(),
                _ => continue,
            };
            for v in values {
                let seen = f.values.get(&m.label).is_some_and(|s| s.contains(v));
                if !seen && !f.readme_words.contains(v) {
                    errors.push(format!(
                        "{what}: {metric}{{{}{}\"{}\"}}: the gateway never sets {}=\"{v}\" \
                         (seen: {:?})\n  {expr}",
                        m.label,
                        m.op,
                        m.value,
                        m.label,
                        f.values.get(&m.label)
                    ));
                }
            }
        }
    }
    Some(parsed)
}

fn bogus_hs256_token() -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT","kid":"k"}"#),
        b64(format!(r#"{{"sub":"dashboard","exp":{exp}}}"#).as_bytes()),
        b64(&[0u8; 32])
    )
}

const KEY: &str = "dashboard-subscription-key-0123456789";

/// Two policies, a subscription, an API limit of one connection, a JWT-protected API, one
/// whose backend is down; clustered on `redis`.
fn exercised_manifest(redis: &RedisServer, backend: &str, down: &str) -> String {
    format!(
        r#"{}
[admin]
listen = "127.0.0.1:0"

[cluster]
store = "{}"
lease_ttl = "2s"
store_timeout = "300ms"
on_store_failure = "local"

[[products]]
name = "gold"

[[products.subscriptions]]
name = "acme"
primary_key_env = "TG_DASHBOARD_KEY"
max_connections = 5

{}
[[apis.on_handshake]]
plugin = "set-header"
instances = "pooled"
config = {{ name = "X-Seen", value = "yes" }}

[[apis.on_handshake]]
plugin = "rate-limit-by-key"
config = {{ calls = 1000, renewal_period = "10s", counter_key = "{{subscription.name}}" }}

{}
[[apis.on_handshake]]
plugin = "jwt-validate"
[apis.on_handshake.config]
algorithms = ["HS256"]
jwks = '{{"keys": [{{"kty": "oct", "kid": "k", "k": "dGhpcyBpcyBhIHRlc3Qgc2VjcmV0IG9mIGVub3VnaCBsZW5ndGg"}}]}}'

{}"#,
        gateway_section("plugin_dir = \"plugins\""),
        redis.url(),
        api_section(
            "echo",
            "echo",
            backend,
            "products = [\"gold\"]\n[apis.limits]\nmax_connections = 1"
        ),
        api_section("locked", "locked", backend, ""),
        api_section("down", "down", down, ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_metrics_and_labels_the_gateway_exposes() {
    let mut redis = RedisServer::start();
    let backend = ws_echo_backend().await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        format!("ws://{a}")
    };
    let dir = TempDir::new("dashboard");
    plugins::install(
        &dir.path().join("plugins"),
        &[
            "set_header.wasm",
            "rate_limit_by_key.wasm",
            "jwt_validate.wasm",
        ],
    );
    let manifest = exercised_manifest(&redis, &format!("ws://{backend}"), &down);
    let gw = Gateway::start_with_env(dir, &manifest, &[("TG_DASHBOARD_KEY", KEY)]);
    let (addr, admin) = (gw.ws.unwrap(), gw.admin.unwrap());
    let key = format!("Ocp-Apim-Subscription-Key: {KEY}\r\n");

    // A 101 through both policies; data both ways; a second connection over the API's limit.
    let (_, mut ws) = ws_connect(addr, "/echo", &key).await;
    for (opcode, payload) in [(1u8, &b"hello"[..]), (2, &[1u8, 2, 3][..])] {
        ws.send(true, opcode, payload).await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, payload);
    }
    let (head, _) = raw_handshake(addr, "/echo", &key).await;
    assert_eq!(status_of(&head), 503, "{head}");
    ws.close(1000, "bye").await.unwrap();
    assert_eq!(
        ws.read_until_close().await.unwrap().close_code(),
        Some(1000)
    );
    gw.wait_record("connection_closed", |r| r["api"] == "echo")
        .await;
    // Refusals: a forged token (a signature check), a dead backend, no API.
    let bearer = format!("Authorization: Bearer {}\r\n", bogus_hs256_token());
    for (path, extra, status) in [
        ("/locked", bearer.as_str(), 401),
        ("/down", "", 502),
        ("/nowhere", "", 404),
    ] {
        let (head, _) = raw_handshake(addr, path, extra).await;
        assert_eq!(status_of(&head), status, "{path}: {head}");
    }
    // A reload applied, then one rejected.
    gw.signal("HUP");
    gw.wait_record("reload", |r| r["outcome"] == "applied")
        .await;
    std::fs::write(
        gw.dir.path().join("tollgate.toml"),
        format!("{manifest}\n[gateway.limits]\nno_such_key = 1\n"),
    )
    .unwrap();
    gw.signal("HUP");
    gw.wait_record("reload", |r| r["outcome"] == "rejected")
        .await;
    // The store goes away: store errors and the fallback.
    redis.stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exposition = loop {
        let _ = raw_handshake(addr, "/echo", &key).await;
        let (status, _, body) = http_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        if body.contains("tollgate_store_errors_total{")
            && body.contains("tollgate_store_fallback 1")
        {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no store errors after Redis stopped:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let schema = schema_of(&exposition);
    let mut errors = Vec::new();
    let mut used = BTreeSet::new();

    let d = dashboard();
    for (what, expr, legend) in dashboard_queries(&d) {
        let parsed = check_query(
            &schema,
            &what,
            &expr,
            &legend_labels(&legend),
            &mut errors,
            &mut used,
        );
        // Every query follows the `instance` and `api` variables.
        for (metric, matchers) in parsed.iter().flat_map(promql::selectors) {
            let has = |label: &str, var: &str| {
                matchers
                    .iter()
                    .any(|m| m.label == label && m.op == "=~" && m.value == var)
            };
            if !has("instance", "$instance") {
                errors.push(format!("{what}: {metric} without instance=~\"$instance\""));
            }
            let has_api = schema
                .0
                .get(metric)
                .is_some_and(|f| f.labels.contains("api"));
            if has_api && !has("api", "$api") {
                errors.push(format!("{what}: {metric} without api=~\"$api\""));
            }
        }
    }
    for (var, selector, label) in variable_queries(&d) {
        let uses = BTreeSet::from([label]);
        check_query(
            &schema,
            &format!("variable `{var}`"),
            &selector,
            &uses,
            &mut errors,
            &mut used,
        );
    }
    for a in alerts(&read("deploy/prometheus/alerts.yml")) {
        check_query(
            &schema,
            &format!("alert {}", a.name),
            &a.expr,
            &template_labels(&a.text),
            &mut errors,
            &mut used,
        );
    }
    assert!(
        errors.is_empty(),
        "{} problem(s):\n{}",
        errors.len(),
        errors.join("\n")
    );
    assert!(used.len() >= 20, "{used:?}");
    let readme_only: Vec<&String> = used
        .iter()
        .filter(|m| schema.0.get(*m).is_some_and(|f| f.readme_only))
        .collect();
    if !readme_only.is_empty() {
        eprintln!(
            "checked against the README's table only (no series in the scrape): {readme_only:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// A small PromQL parser: enough of the language for dashboards and rules, refusing what it
// does not know (a function, a subquery, `group_left`) rather than guessing.

mod promql {
    use std::collections::BTreeSet;

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Ident(String),
        Str(String),
        Num,
        Dur,
        /// The text between `[` and `]`.
        Range(String),
        LParen,
        RParen,
        LBrace,
        RBrace,
        Comma,
        Op(&'static str),
    }

    fn is_duration(s: &str) -> bool {
        let mut rest = s;
        if rest.is_empty() {
            return false;
        }
        while !rest.is_empty() {
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            if digits == 0 {
                return false;
            }
            rest = &rest[digits..];
            let Some(unit) = ["ms", "s", "m", "h", "d", "w", "y"]
                .into_iter()
                .find(|u| rest.starts_with(u))
            else {
                return false;
            };
            rest = &rest[unit.len()..];
        }
        true
    }

    /// A range: a duration or a Grafana interval variable.
    fn valid_range(s: &str) -> bool {
        is_duration(s)
            || ["$__rate_interval", "$__interval", "$__range"].contains(&s)
            || (s.starts_with("${") && s.ends_with('}'))
    }

    fn lex(src: &str) -> Result<Vec<Tok>, String> {
        let b: Vec<char> = src.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c.is_whitespace() {
                i += 1;
            } else if c == '#' {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
            } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
                let s = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '_' || b[i] == ':') {
                    i += 1;
                }
                out.push(Tok::Ident(b[s..i].iter().collect()));
            } else if c.is_ascii_digit()
                || (c == '.' && b.get(i + 1).is_some_and(char::is_ascii_digit))
            {
                let s = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.') {
                    i += 1;
                    if matches!(b[i - 1], 'e' | 'E')
                        && b[s..i - 1].iter().all(|c| c.is_ascii_digit() || *c == '.')
                        && matches!(b.get(i), Some('+' | '-'))
                    {
                        i += 1;
                    }
                }
                let t: String = b[s..i].iter().collect();
                if t.parse::<f64>().is_ok() {
                    out.push(Tok::Num);
                } else if is_duration(&t) {
                    out.push(Tok::Dur);
                } else {
                    return Err(format!("bad number `{t}`"));
                }
            } else if c == '"' || c == '\'' || c == '`' {
                let mut s = String::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err("unterminated string".into()),
                        Some('\\') if c != '`' => {
                            s.push(*b.get(i + 1).ok_or("unterminated string")?);
                            i += 2;
                        }
                        Some(q) if *q == c => {
                            i += 1;
                            break;
                        }
                        Some(o) => {
                            s.push(*o);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(s));
            } else if c == '[' {
                let end = b[i..]
                    .iter()
                    .position(|c| *c == ']')
                    .ok_or("unterminated [")?;
                let r: String = b[i + 1..i + end].iter().collect();
                let r = r.trim().to_owned();
                if r.contains(':') {
                    return Err(format!("subqueries are not supported: [{r}]"));
                }
                if !valid_range(&r) {
                    return Err(format!("bad range [{r}]"));
                }
                out.push(Tok::Range(r));
                i += end + 1;
            } else {
                let two: String = b[i..(i + 2).min(b.len())].iter().collect();
                let op = ["==", "!=", "=~", "!~", ">=", "<="]
                    .into_iter()
                    .find(|o| *o == two);
                if let Some(op) = op {
                    out.push(Tok::Op(op));
                    i += 2;
                    continue;
                }
                out.push(match c {
                    '(' => Tok::LParen,
                    ')' => Tok::RParen,
                    '{' => Tok::LBrace,
                    '}' => Tok::RBrace,
                    ',' => Tok::Comma,
                    '=' => Tok::Op("="),
                    '>' => Tok::Op(">"),
                    '<' => Tok::Op("<"),
                    '+' => Tok::Op("+"),
                    '-' => Tok::Op("-"),
                    '*' => Tok::Op("*"),
                    '/' => Tok::Op("/"),
                    '%' => Tok::Op("%"),
                    '^' => Tok::Op("^"),
                    o => return Err(format!("unexpected `{o}`")),
                });
                i += 1;
            }
        }
        Ok(out)
    }

    #[derive(Debug, Clone)]
    pub struct Matcher {
        pub label: String,
        pub op: &'static str,
        pub value: String,
    }

    #[derive(Debug, Clone)]
    pub enum Grouping {
        None,
        By(Vec<String>),
        Without(Vec<String>),
    }

    #[derive(Debug, Clone)]
    pub enum Matching {
        None,
        On(Vec<String>),
        Ignoring(Vec<String>),
    }

    #[derive(Debug, Clone)]
    pub enum Expr {
        Num,
        Str,
        Selector {
            name: String,
            matchers: Vec<Matcher>,
            range: bool,
        },
        Call {
            func: String,
            args: Vec<Expr>,
        },
        Agg {
            op: String,
            grouping: Grouping,
            param: Option<Box<Expr>>,
            arg: Box<Expr>,
        },
        Binary {
            op: String,
            lhs: Box<Expr>,
            rhs: Box<Expr>,
            matching: Matching,
        },
        Neg(Box<Expr>),
    }

    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const KEYWORDS: [&str; 11] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
    ];

    struct Parser {
        t: Vec<Tok>,
        i: usize,
    }

    impl Parser {
        fn peek(&self) -> Option<&Tok> {
            self.t.get(self.i)
        }
        fn next(&mut self) -> Option<Tok> {
            let t = self.t.get(self.i).cloned();
            self.i += 1;
            t
        }
        fn expect(&mut self, want: Tok) -> Result<(), String> {
            match self.next() {
                Some(t) if t == want => Ok(()),
                other => Err(format!("expected {want:?}, found {other:?}")),
            }
        }
        fn eat_ident(&mut self, word: &str) -> bool {
            if matches!(self.peek(), Some(Tok::Ident(w)) if w == word) {
                self.i += 1;
                true
            } else {
                false
            }
        }
        fn label_list(&mut self) -> Result<Vec<String>, String> {
            self.expect(Tok::LParen)?;
            let mut out = Vec::new();
            loop {
                match self.next() {
                    Some(Tok::RParen) => return Ok(out),
                    Some(Tok::Ident(l)) => {
                        out.push(l);
                        match self.next() {
                            Some(Tok::Comma) => {}
                            Some(Tok::RParen) => return Ok(out),
                            o => return Err(format!("in a label list: {o:?}")),
                        }
                    }
                    o => return Err(format!("in a label list: {o:?}")),
                }
            }
        }

        /// (operator, precedence, right-associative) of the token ahead, if a binary operator.
        fn binop(&self) -> Option<(String, u8, bool)> {
            let (op, prec) = match self.peek()? {
                Tok::Ident(w) if w == "or" => ("or", 1),
                Tok::Ident(w) if w == "and" || w == "unless" => (w.as_str(), 2),
                Tok::Ident(w) if w == "atan2" => ("atan2", 5),
                Tok::Op(o @ ("==" | "!=" | ">" | "<" | ">=" | "<=")) => (*o, 3),
                Tok::Op(o @ ("+" | "-")) => (*o, 4),
                Tok::Op(o @ ("*" | "/" | "%")) => (*o, 5),
                Tok::Op("^") => ("^", 6),
                _ => return None,
            };
            Some((op.to_owned(), prec, op == "^"))
        }

        fn expr(&mut self, min: u8) -> Result<Expr, String> {
            let mut lhs = self.unary()?;
            while let Some((op, prec, right)) = self.binop() {
                if prec < min {
                    break;
                }
                self.i += 1;
                self.eat_ident("bool");
                let matching = if self.eat_ident("on") {
                    Matching::On(self.label_list()?)
                } else if self.eat_ident("ignoring") {
                    Matching::Ignoring(self.label_list()?)
                } else {
                    Matching::None
                };
                if let Some(Tok::Ident(w)) = self.peek() {
                    if w == "group_left" || w == "group_right" {
                        return Err(format!("`{w}` is not supported here"));
                    }
                }
                let rhs = self.expr(if right { prec } else { prec + 1 })?;
                lhs = Expr::Binary {
                    op,
                    lhs: Box::new(lhs),
                    rhs: Box::new(rhs),
                    matching,
                };
            }
            Ok(lhs)
        }

        fn unary(&mut self) -> Result<Expr, String> {
            match self.peek() {
                Some(Tok::Op("-")) => {
                    self.i += 1;
                    Ok(Expr::Neg(Box::new(self.unary()?)))
                }
                Some(Tok::Op("+")) => {
                    self.i += 1;
                    self.unary()
                }
                _ => self.primary(),
            }
        }

        fn args(&mut self) -> Result<Vec<Expr>, String> {
            self.expect(Tok::LParen)?;
            let mut args = Vec::new();
            if self.peek() == Some(&Tok::RParen) {
                self.i += 1;
                return Ok(args);
            }
            loop {
                args.push(self.expr(0)?);
                match self.next() {
                    Some(Tok::Comma) => {}
                    Some(Tok::RParen) => return Ok(args),
                    o => return Err(format!("in arguments: {o:?}")),
                }
            }
        }

        fn grouping(&mut self) -> Result<Grouping, String> {
            Ok(if self.eat_ident("by") {
                Grouping::By(self.label_list()?)
            } else if self.eat_ident("without") {
                Grouping::Without(self.label_list()?)
            } else {
                Grouping::None
            })
        }

        fn primary(&mut self) -> Result<Expr, String> {
            match self.next() {
                Some(Tok::Num) => Ok(Expr::Num),
                Some(Tok::Str(_)) => Ok(Expr::Str),
                Some(Tok::LParen) => {
                    let e = self.expr(0)?;
                    self.expect(Tok::RParen)?;
                    if let Some(Tok::Range(r)) = self.peek() {
                        return Err(format!("subqueries are not supported: [{r}]"));
                    }
                    Ok(e)
                }
                Some(Tok::LBrace) => Err("a selector without a metric name".into()),
                Some(Tok::Ident(name)) if KEYWORDS.contains(&name.as_str()) => {
                    Err(format!("unexpected keyword `{name}`"))
                }
                Some(Tok::Ident(op)) if AGGREGATIONS.contains(&op.as_str()) => {
                    let mut grouping = self.grouping()?;
                    let mut args = self.args()?;
                    if matches!(grouping, Grouping::None) {
                        grouping = self.grouping()?;
                    }
                    let param = match (op.as_str(), args.len()) {
                        ("topk" | "bottomk" | "quantile" | "count_values", 2) => {
                            Some(Box::new(args.remove(0)))
                        }
                        (_, 1) => None,
                        (_, n) => return Err(format!("{op} with {n} arguments")),
                    };
                    Ok(Expr::Agg {
                        op,
                        grouping,
                        param,
                        arg: Box::new(args.remove(0)),
                    })
                }
                Some(Tok::Ident(func)) if self.peek() == Some(&Tok::LParen) => Ok(Expr::Call {
                    func,
                    args: self.args()?,
                }),
                Some(Tok::Ident(name)) => {
                    let mut matchers = Vec::new();
                    if self.peek() == Some(&Tok::LBrace) {
                        self.i += 1;
                        loop {
                            match self.next() {
                                Some(Tok::RBrace) => break,
                                Some(Tok::Ident(label)) => {
                                    let op = match self.next() {
                                        Some(Tok::Op(o @ ("=" | "!=" | "=~" | "!~"))) => o,
                                        o => return Err(format!("matcher {label}: {o:?}")),
                                    };
                                    let Some(Tok::Str(value)) = self.next() else {
                                        return Err(format!("matcher {label}: no string"));
                                    };
                                    matchers.push(Matcher { label, op, value });
                                    match self.next() {
                                        Some(Tok::Comma) => {}
                                        Some(Tok::RBrace) => break,
                                        o => return Err(format!("in matchers: {o:?}")),
                                    }
                                }
                                o => return Err(format!("in matchers: {o:?}")),
                            }
                        }
                    }
                    let range = matches!(self.peek(), Some(Tok::Range(_)));
                    if range {
                        self.i += 1;
                    }
                    if self.eat_ident("offset") {
                        if self.peek() == Some(&Tok::Op("-")) {
                            self.i += 1;
                        }
                        if self.next() != Some(Tok::Dur) {
                            return Err("offset without a duration".into());
                        }
                    }
                    Ok(Expr::Selector {
                        name,
                        matchers,
                        range,
                    })
                }
                other => Err(format!("unexpected {other:?}")),
            }
        }
    }

    pub fn parse(src: &str) -> Result<Expr, String> {
        let mut p = Parser { t: lex(src)?, i: 0 };
        let e = p.expr(0)?;
        match p.peek() {
            None => Ok(e),
            Some(t) => Err(format!("unexpected {t:?} after the expression")),
        }
    }

    /// Every series selector: (metric name, matchers).
    pub fn selectors(e: &Expr) -> Vec<(&str, &[Matcher])> {
        let mut out = Vec::new();
        fn walk<'a>(e: &'a Expr, out: &mut Vec<(&'a str, &'a [Matcher])>) {
            match e {
                Expr::Num | Expr::Str => {}
                Expr::Selector { name, matchers, .. } => out.push((name, matchers)),
                Expr::Call { args, .. } => args.iter().for_each(|a| walk(a, out)),
                Expr::Agg { param, arg, .. } => {
                    if let Some(p) = param {
                        walk(p, out);
                    }
                    walk(arg, out);
                }
                Expr::Binary { lhs, rhs, .. } => {
                    walk(lhs, out);
                    walk(rhs, out);
                }
                Expr::Neg(e) => walk(e, out),
            }
        }
        walk(e, &mut out);
        out
    }

    type Labels = BTreeSet<String>;

    /// What an expression evaluates to, with the label names its series are sure to carry.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Ty {
        Scalar,
        Str,
        Vector(Labels),
        Range(Labels),
    }

    impl Ty {
        pub fn labels(&self) -> Labels {
            match self {
                Ty::Vector(l) | Ty::Range(l) => l.clone(),
                _ => Labels::new(),
            }
        }
    }

    fn vector(t: Ty, what: &str) -> Result<Labels, String> {
        match t {
            Ty::Vector(l) => Ok(l),
            other => Err(format!("{what} needs an instant vector, got {other:?}")),
        }
    }

    fn subset(want: &[String], have: &Labels, what: &str) -> Result<(), String> {
        for l in want {
            if !have.contains(l) {
                return Err(format!(
                    "{what}: label `{l}` is not on the series here (they carry {have:?})"
                ));
            }
        }
        Ok(())
    }

    /// Types `e`, checking every metric against `schema` (metric -> its label names) and every
    /// label a matcher, a grouping or a vector match names against the series at that point.
    pub fn check(e: &Expr, schema: &dyn Fn(&str) -> Option<Labels>) -> Result<Ty, String> {
        match e {
            Expr::Num => Ok(Ty::Scalar),
            Expr::Str => Ok(Ty::Str),
            Expr::Neg(e) => check(e, schema),
            Expr::Selector {
                name,
                matchers,
                range,
            } => {
                let labels = schema(name)
                    .ok_or_else(|| format!("`{name}` is not a metric the gateway exposes"))?;
                for m in matchers {
                    if m.label != "__name__" && !labels.contains(&m.label) {
                        return Err(format!(
                            "{name} has no label `{}` (it has {labels:?})",
                            m.label
                        ));
                    }
                }
                Ok(if *range {
                    Ty::Range(labels)
                } else {
                    Ty::Vector(labels)
                })
            }
            Expr::Call { func, args } => {
                let tys = args
                    .iter()
                    .map(|a| check(a, schema))
                    .collect::<Result<Vec<_>, _>>()?;
                let f = func.as_str();
                match (f, tys.as_slice()) {
                    (
                        "rate" | "irate" | "increase" | "delta" | "idelta" | "deriv" | "changes"
                        | "resets" | "avg_over_time" | "min_over_time" | "max_over_time"
                        | "sum_over_time" | "count_over_time" | "last_over_time"
                        | "present_over_time",
                        [Ty::Range(l)],
                    ) => Ok(Ty::Vector(l.clone())),
                    (
                        "abs" | "ceil" | "floor" | "exp" | "ln" | "log2" | "log10" | "sqrt"
                        | "timestamp" | "sort" | "sort_desc",
                        [Ty::Vector(l)],
                    ) => Ok(Ty::Vector(l.clone())),
                    ("clamp_min" | "clamp_max" | "round", [Ty::Vector(l), Ty::Scalar]) => {
                        Ok(Ty::Vector(l.clone()))
                    }
                    ("histogram_quantile", [Ty::Scalar, Ty::Vector(l)]) => {
                        if !l.contains("le") {
                            return Err(format!(
                                "histogram_quantile over series without `le` ({l:?}): keep \
                                 `le` in the aggregation and use a _bucket series"
                            ));
                        }
                        let mut l = l.clone();
                        l.remove("le");
                        Ok(Ty::Vector(l))
                    }
                    ("time", []) => Ok(Ty::Scalar),
                    ("vector", [Ty::Scalar]) => Ok(Ty::Vector(Labels::new())),
                    ("scalar", [Ty::Vector(_)]) => Ok(Ty::Scalar),
                    _ => Err(format!("unknown function or arguments: {f}({tys:?})")),
                }
            }
            Expr::Agg {
                op,
                grouping,
                param,
                arg,
            } => {
                if let Some(p) = param {
                    if check(p, schema)? != Ty::Scalar {
                        return Err(format!("{op}: the parameter must be a scalar"));
                    }
                }
                if op == "count_values" {
                    return Err("count_values is not supported".into());
                }
                let l = vector(check(arg, schema)?, op)?;
                let keeps = op == "topk" || op == "bottomk";
                Ok(Ty::Vector(match grouping {
                    Grouping::By(by) => {
                        subset(by, &l, &format!("{op} by"))?;
                        if keeps {
                            l
                        } else {
                            by.iter().cloned().collect()
                        }
                    }
                    Grouping::Without(w) => {
                        if keeps {
                            l
                        } else {
                            l.into_iter().filter(|x| !w.contains(x)).collect()
                        }
                    }
                    Grouping::None if keeps => l,
                    Grouping::None => Labels::new(),
                }))
            }
            Expr::Binary {
                op,
                lhs,
                rhs,
                matching,
            } => {
                let (a, b) = (check(lhs, schema)?, check(rhs, schema)?);
                let set_op = ["and", "or", "unless"].contains(&op.as_str());
                let (l, r) = match (a, b) {
                    (Ty::Scalar, Ty::Scalar) if !set_op => return Ok(Ty::Scalar),
                    (Ty::Vector(l), Ty::Scalar) if !set_op => return Ok(Ty::Vector(l)),
                    (Ty::Scalar, Ty::Vector(r)) if !set_op => return Ok(Ty::Vector(r)),
                    (Ty::Vector(l), Ty::Vector(r)) => (l, r),
                    (a, b) => return Err(format!("`{op}` between {a:?} and {b:?}")),
                };
                // Series match on their label sets: sets that differ never match.
                let matched = |what: &str| -> Result<(), String> {
                    match matching {
                        Matching::On(on) => {
                            subset(on, &l, &format!("left of {what} on"))?;
                            subset(on, &r, &format!("right of {what} on"))
                        }
                        Matching::Ignoring(ign) => {
                            let keep = |s: &Labels| -> Labels {
                                s.iter().filter(|x| !ign.contains(x)).cloned().collect()
                            };
                            if keep(&l) == keep(&r) {
                                Ok(())
                            } else {
                                Err(format!(
                                    "`{what}` ignoring({ign:?}) never matches: {l:?} vs {r:?}"
                                ))
                            }
                        }
                        Matching::None if l == r => Ok(()),
                        Matching::None => Err(format!(
                            "`{what}` never matches: the sides carry {l:?} and {r:?} (use \
                             on/ignoring or aggregate both the same way)"
                        )),
                    }
                };
                match op.as_str() {
                    "or" => Ok(Ty::Vector(l.intersection(&r).cloned().collect())),
                    "and" | "unless" => {
                        matched(op)?;
                        Ok(Ty::Vector(l))
                    }
                    _ => {
                        matched(op)?;
                        Ok(Ty::Vector(match matching {
                            Matching::On(on) => on.iter().cloned().collect(),
                            Matching::Ignoring(ign) => {
                                l.into_iter().filter(|x| !ign.contains(x)).collect()
                            }
                            Matching::None => l,
                        }))
                    }
                }
            }
        }
    }
}

#[test]
fn the_promql_checker_finds_metrics_and_label_scopes() {
    use promql::{check, parse, selectors, Ty};
    let set = |v: &[&str]| {
        v.iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<String>>()
    };
    let schema = |m: &str| -> Option<BTreeSet<String>> {
        Some(match m {
            "a_total" => set(&["instance", "api", "status"]),
            "h_bucket" => set(&["instance", "api", "plugin", "le"]),
            "h_count" => set(&["instance", "api", "plugin"]),
            "g" => set(&["instance"]),
            _ => return None,
        })
    };
    let names = |src: &str| -> Vec<String> {
        let e = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        selectors(&e)
            .into_iter()
            .map(|(n, _)| n.to_owned())
            .collect()
    };
    let ty = |src: &str| check(&parse(src).unwrap(), &schema);

    // Metric names, and none of the functions, keywords, labels, variables or durations.
    let q = r#"histogram_quantile(0.99, sum by (le, plugin) (rate(h_bucket{instance=~"$instance", api=~"$api"}[$__rate_interval])))"#;
    assert_eq!(names(q), ["h_bucket"]);
    assert_eq!(ty(q), Ok(Ty::Vector(set(&["plugin"]))));
    let q = "sum(rate(a_total{status=~\"5..\"}[5m])) by (api) / on (api) sum by (api) (rate(a_total[5m])) > bool 0.05 and on (api) sum by (api) (g unless g offset 15m)";
    assert_eq!(names(q), ["a_total", "a_total", "g", "g"]);
    let q = "sum by (instance) (increase(a_total{api=\"x\"}[15m])) > 0\nor\nsum by (instance) (g) > 1e3 # a comment\n";
    assert_eq!(names(q), ["a_total", "g"]);
    assert_eq!(ty(q), Ok(Ty::Vector(set(&["instance"]))));
    assert_eq!(ty("count(g) - 1"), Ok(Ty::Vector(set(&[]))));
    assert_eq!(ty("time() - 2 * 3"), Ok(Ty::Scalar));

    // What the checker refuses.
    for (bad, why) in [
        ("sum by (api) (g)", "label `api`"),
        ("g{api=\"x\"}", "no label `api`"),
        ("rate(no_such_metric[5m])", "no_such_metric"),
        ("rate(a_total)", "unknown function"),
        (
            "sum(rate(a_total[5m])) by (status) / sum by (api) (rate(a_total[5m]))",
            "never matches",
        ),
        (
            "histogram_quantile(0.9, sum by (api) (rate(h_bucket[5m])))",
            "without `le`",
        ),
        ("histogram_quantile(0.9, rate(h_count[5m]))", "without `le`"),
        ("sum by (le) (h_count)", "label `le`"),
        ("a_total / on (plugin) h_count", "label `plugin`"),
        ("g and sum by (api) (a_total)", "never matches"),
    ] {
        let got = ty(bad);
        assert!(
            got.as_ref().is_err_and(|e| e.contains(why)),
            "{bad}: expected an error about {why}, got {got:?}"
        );
    }
    for unparsable in [
        "rate(g[5m:1m])",
        "{api=\"x\"}",
        "sum(g) by api",
        "a_total * on (api) group_left (plugin) h_count",
        "rate(g[five])",
    ] {
        assert!(parse(unparsable).is_err(), "{unparsable} parsed");
    }

    // Template and legend label references.
    assert_eq!(
        template_labels("{{ $labels.instance }}: {{ $value }} on {{$labels.api}}"),
        set(&["instance", "api"])
    );
    assert_eq!(
        legend_labels("{{api}} {{ status }} p99"),
        set(&["api", "status"])
    );
    // Exposition lines, escapes included.
    assert_eq!(
        parse_sample(r#"tollgate_x_total{api="a\"b,c",code="1000"} 3"#),
        (
            "tollgate_x_total".to_owned(),
            vec![
                ("api".to_owned(), "a\"b,c".to_owned()),
                ("code".to_owned(), "1000".to_owned())
            ]
        )
    );
    assert_eq!(
        parse_sample("tollgate_runtime_tasks 7"),
        ("tollgate_runtime_tasks".to_owned(), vec![])
    );
}

/// A family the gateway registers but has no series of yet (its `# TYPE` line only) takes its
/// labels from the README's table; one with series takes them (and their values) from those.
#[test]
fn families_without_series_fall_back_to_the_readme_table() {
    let schema = schema_of(
        "# HELP tollgate_handshakes WebSocket opening handshakes answered.\n\
         # TYPE tollgate_handshakes counter\n\
         tollgate_handshakes_total{api=\"a\",product=\"\",subscription=\"\",status=\"101\"} 1\n\
         # TYPE tollgate_key_set_keys gauge\n\
         # TYPE tollgate_store_call_duration_seconds histogram\n\
         # UNIT tollgate_store_call_duration_seconds seconds\n\
         # EOF\n",
    );
    let set = |v: &[&str]| {
        v.iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<String>>()
    };
    let live = &schema.0["tollgate_handshakes_total"];
    assert!(!live.readme_only);
    assert_eq!(
        live.labels,
        set(&["api", "product", "subscription", "status"])
    );
    assert_eq!(live.values["status"], set(&["101"]));
    let keys = &schema.0["tollgate_key_set_keys"];
    assert!(keys.readme_only);
    assert_eq!(keys.labels, set(&["key_set"]));
    assert_eq!(
        schema.labels("tollgate_store_call_duration_seconds_bucket"),
        Some(set(&["call", "le", "instance", "job"]))
    );
    assert_eq!(
        schema.0["tollgate_store_call_duration_seconds_count"].labels,
        set(&["call"])
    );
    assert!(schema.0["tollgate_store_call_duration_seconds_count"]
        .readme_words
        .contains("acquire"));
    // Not registered: not exposed, whatever the README says.
    assert_eq!(schema.labels("tollgate_fleet_live_gateways"), None);
    assert_eq!(schema.labels("tollgate_store_call_duration_seconds"), None);
}
