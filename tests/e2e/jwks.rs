//! jwt-validate with keys the gateway fetches (`openid_config_url`, `jwks_url`) from a local
//! HTTPS identity provider with a certificate made here: rotation picked up at once through the
//! unknown-kid refetch, one fetch for a burst of unknown kids, the last good keys kept while
//! the provider is down (and `/apis` saying how old they are), and a first fetch that fails
//! stopping the load with the reason.
//!
//! They run on a multi-thread runtime: the provider must keep answering while the test thread
//! waits for a gateway to start (a load fetches the keys).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::oidc::{jwks_of, OidcProvider, RsaSigner};
use crate::support::tls::TestCa;
use crate::support::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({"sub": sub, "aud": "chat", "exp": now() + 600})
}

/// A gateway (its directory's `ca/ca.pem` is the provider's CA) validating tokens with keys
/// from `key_source` (`openid_config_url = "..."` or `jwks_url = "..."` plus any options),
/// then setting `X-User` from the subject.
fn manifest(backend: &str, key_source: &str) -> String {
    format!(
        r#"{}[admin]
listen = "127.0.0.1:0"
{}[[apis.on_handshake]]
plugin = "jwt-validate"
grants = {{ read_dirs = ["ca"] }}
[apis.on_handshake.config]
audiences = ["chat"]
ca_file = "ca/ca.pem"
{key_source}

[[apis.on_handshake]]
plugin = "set-header"
config = {{ name = "X-User", value = "{{jwt.sub}}", exists_action = "override" }}
"#,
        gateway_section("plugin_dir = \"plugins\""),
        api_section("chat", "chat", backend, ""),
    )
}

fn setup(ca: &TestCa) -> TempDir {
    let dir = TempDir::new("jwks");
    plugins::install(
        &dir.path().join("plugins"),
        &["jwt_validate.wasm", "set_header.wasm"],
    );
    std::fs::create_dir_all(dir.path().join("ca")).unwrap();
    ca.write(&dir.path().join("ca"), "ca.pem");
    dir
}

async fn status_with(gw: &Gateway, token: &str) -> (u16, String) {
    let (head, _) = raw_handshake(
        gw.ws.unwrap(),
        "/chat",
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .await;
    (status_of(&head), head)
}

async fn key_set_status(gw: &Gateway) -> serde_json::Value {
    let (status, _, body) = http_get(gw.admin.unwrap(), "/apis").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["apis"][0]["policies"][0]["key_sets"][0].clone()
}

/// The provider rotates from key A to key B: a token with B's kid is accepted at once (the
/// unknown kid makes the gateway refetch), with no restart or reload. Then the provider goes
/// down: B's tokens are still accepted from the last good set (also after a reload), a
/// refetch for yet another kid fails without harm, and `/apis` and the metrics say how old the
/// keys are and why the fetch failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_are_picked_up_at_once_and_kept_while_the_provider_is_down() {
    let ca = TestCa::new("idp-ca");
    let a = RsaSigner::new("a");
    let b = RsaSigner::new("b");
    let mut idp = OidcProvider::start(&ca.leaf(&["127.0.0.1"]), jwks_of(&[&a])).await;
    let backend = RawBackend::start(echo_frames()).await;
    let dir = setup(&ca);
    let text = manifest(
        &backend.url(),
        &format!(
            "openid_config_url = \"{}\"\njwks_min_refresh = \"1s\"",
            idp.discovery_url()
        ),
    );
    let gw = Gateway::start_in(dir, &text);
    assert_eq!(idp.fetches("/.well-known/openid-configuration"), 1);
    assert_eq!(idp.fetches("/jwks"), 1, "fetched once, at load");

    let (status, head) = status_with(&gw, &a.sign(&claims("ann"))).await;
    assert_eq!(status, 101, "{head}");
    assert_eq!(
        header(&backend.last_head(), "x-user").as_deref(),
        Some("ann")
    );

    // Rotation: the provider now publishes only B.
    idp.set_jwks(jwks_of(&[&b]));
    let (status, head) = status_with(&gw, &b.sign(&claims("bob"))).await;
    assert_eq!(status, 101, "B's token right after the rotation: {head}");
    assert_eq!(
        header(&backend.last_head(), "x-user").as_deref(),
        Some("bob")
    );
    assert_eq!(idp.fetches("/jwks"), 2, "one refetch, for B's kid");
    let fetched = gw
        .wait_record("key_set_fetched", |r| r["trigger"] == "unknown_kid")
        .await;
    assert_eq!(fetched["kids"], "b", "{fetched}");
    // A is gone from the provider, so from the gateway too.
    let (status, _) = status_with(&gw, &a.sign(&claims("ann"))).await;
    assert_eq!(status, 401);

    // The provider goes down.
    idp.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = status_with(&gw, &b.sign_with_kid("c", &claims("eve"))).await;
    assert_eq!(status, 401, "a kid nobody knows");
    gw.wait_record("key_set_fetch_failed", |r| r["keeping_last_good"] == true)
        .await;
    for sub in ["bob", "bea"] {
        let (status, head) = status_with(&gw, &b.sign(&claims(sub))).await;
        assert_eq!(status, 101, "last good set, provider down: {head}");
    }
    let st = key_set_status(&gw).await;
    assert_eq!(st["kind"], "openid-configuration", "{st}");
    assert_eq!(st["source"], idp.discovery_url(), "{st}");
    assert_eq!(st["jwks_url"], idp.jwks_url(), "{st}");
    assert_eq!(st["kids"], serde_json::json!(["b"]), "{st}");
    assert!(st["age_seconds"].as_u64().is_some(), "{st}");
    assert!(st["failures"].as_u64().unwrap() >= 1, "{st}");
    let err = st["last_error"].as_str().unwrap();
    assert!(err.contains("cannot connect"), "{err}");

    let m = scrape(gw.admin.unwrap()).await;
    let source = idp.discovery_url();
    let ok = |trigger| {
        sample(
            &m,
            "tollgate_key_set_fetches_total",
            &[
                ("key_set", &source),
                ("trigger", trigger),
                ("outcome", "ok"),
            ],
        )
    };
    assert_eq!(ok("load"), Some(1.0));
    assert_eq!(ok("unknown_kid"), Some(1.0));
    let failed = sample(
        &m,
        "tollgate_key_set_fetches_total",
        &[
            ("key_set", &source),
            ("trigger", "unknown_kid"),
            ("outcome", "error"),
        ],
    );
    assert_eq!(failed, Some(1.0), "the refetch for kid c, provider down");
    let last = sample(
        &m,
        "tollgate_key_set_last_success_timestamp_seconds",
        &[("key_set", &source)],
    )
    .unwrap();
    assert!((now() as f64 - last) < 60.0, "{last}");

    // A reload while the provider is down keeps the keys this process holds.
    gw.signal("HUP");
    gw.wait_record("reload", |r| r["outcome"] == "applied")
        .await;
    let (status, head) = status_with(&gw, &b.sign(&claims("bob"))).await;
    assert_eq!(status, 101, "after a reload, provider down: {head}");

    // The provider comes back: the gateway's retries (every jwks_min_refresh) pick it up.
    idp.restart().await;
    wait_until("a successful refresh after the provider is back", || {
        idp.fetches("/jwks") >= 3
    })
    .await;
}

/// 1,000 tokens naming kids the set does not hold, as fast as clients can send them: every
/// one refused, and the provider sees one refetch, not 1,000 (they share one fetch, and the
/// next is not allowed before `jwks_min_refresh`, one minute by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_unknown_kids_costs_the_provider_one_fetch() {
    let ca = TestCa::new("idp-ca");
    let a = RsaSigner::new("a");
    let idp = OidcProvider::start(&ca.leaf(&["127.0.0.1"]), jwks_of(&[&a])).await;
    let backend = RawBackend::start(echo_frames()).await;
    let dir = setup(&ca);
    let text = manifest(
        &backend.url(),
        &format!("jwks_url = \"{}\"", idp.jwks_url()),
    );
    let gw = Gateway::start_in(dir, &text);
    assert_eq!(idp.fetches("/jwks"), 1);
    assert_eq!(idp.fetches("/.well-known/openid-configuration"), 0);
    let addr = gw.ws.unwrap();
    let mut tasks = Vec::new();
    for worker in 0..20 {
        let tokens: Vec<String> = (0..50)
            .map(|i| a.sign_with_kid(&format!("k{worker}-{i}"), &claims("mal")))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for t in tokens {
                let (head, _) =
                    raw_handshake(addr, "/chat", &format!("Authorization: Bearer {t}\r\n")).await;
                statuses.push(status_of(&head));
            }
            statuses
        }));
    }
    let mut refused = 0;
    for t in tasks {
        let statuses = t.await.unwrap();
        assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
        refused += statuses.len();
    }
    assert_eq!(refused, 1000);
    assert_eq!(idp.fetches("/jwks"), 2, "one refetch for the whole burst");
    let (status, head) = status_with(&gw, &a.sign(&claims("ann"))).await;
    assert_eq!(status, 101, "{head}");
}

/// With the provider unreachable and no copy held, the load fails, naming the attachment's
/// config, the key set and why; `tollgate check` says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_fetch_that_fails_stops_the_load_with_the_reason() {
    let ca = TestCa::new("idp-ca");
    let a = RsaSigner::new("a");
    let mut idp = OidcProvider::start(&ca.leaf(&["127.0.0.1"]), jwks_of(&[&a])).await;
    let url = idp.discovery_url();
    idp.stop();
    let dir = setup(&ca);
    let text = manifest(
        "ws://127.0.0.1:9",
        &format!("openid_config_url = \"{url}\""),
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("jwt-validate: openid_config_url: fetching key set"),
        "{err}"
    );
    assert!(err.contains(&url), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    // A provider certificate the gateway does not trust (no ca_file) fails the same way.
    idp.restart().await;
    let text = manifest(
        "ws://127.0.0.1:9",
        &format!("openid_config_url = \"{url}\""),
    )
    .replace("ca_file", "# ca_file");
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("TLS"), "{err}");
    // And plain http is refused before anything is fetched.
    let text = manifest("ws://127.0.0.1:9", "jwks_url = \"http://127.0.0.1:9/jwks\"");
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("only https"), "{err}");
}

/// Registering a key set needs `fetch-keys`: `overreach` declares only `read-request`, so its
/// `configure` is stopped at the host call (nothing is fetched) and the load fails naming the
/// plugin and the capability.
#[test]
fn registering_a_key_set_without_fetch_keys_fails_the_load() {
    let dir = TempDir::new("jwks-overreach");
    plugins::install(&dir.path().join("plugins"), &["overreach.wasm"]);
    let text = format!(
        "{}{}[[apis.on_handshake]]\nplugin = \"overreach\"\nconfig = {{ do = \"fetch-keys\" }}\n",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("chat", "chat", "ws://127.0.0.1:9", ""),
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains("plugin `overreach` called key-sets.register without declaring the capability `fetch-keys`"),
        "{err}"
    );
}

/// A plugin has the gateway fetch only URLs the operator wrote in its attachment's config, and
/// at most 8 times per attachment, failed attempts included: `faulty` (which declares
/// `fetch-keys`) asks for another URL, then for a refused one twenty times.
#[test]
fn a_plugin_fetches_only_urls_of_its_config_and_only_a_few_times() {
    let dir = TempDir::new("jwks-faulty");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let check = |config: &str| {
        let text = format!(
            "{}{}[[apis.on_handshake]]\nplugin = \"faulty\"\nconfig = {config}\n",
            gateway_section("plugin_dir = \"plugins\""),
            api_section("chat", "chat", "ws://127.0.0.1:9", ""),
        );
        let (code, err, _) = tollgate_check(dir.path(), &text);
        assert_ne!(code, 0, "{err}");
        err
    };
    let err = check(r#"{ mode = "register-elsewhere" }"#);
    assert!(
        err.contains("the URL is not a value of this attachment's config"),
        "{err}"
    );
    assert!(
        !err.contains("elsewhere"),
        "the refused URL is not echoed: {err}"
    );
    let err = check(r#"{ mode = "register-many", arg = "https://127.0.0.1:9/jwks" }"#);
    assert!(err.contains("at most 8 key-sets.register calls"), "{err}");
}
