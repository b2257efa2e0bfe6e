//! onHandshake policies through the real gateway: plugins built from source for
//! wasm32-wasip2, loaded from plugin_dir, changing the backend request.

use crate::support::*;

fn manifest(backend: &str, attachments: &str) -> String {
    format!(
        "{}{}{attachments}",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("echo", "echo", backend, "")
    )
}

fn set_header(name: &str, value: &str, action: &str) -> String {
    format!(
        "[[apis.on_handshake]]\nplugin = \"set-header\"\nconfig = {{ name = \"{name}\", value = \"{value}\", exists_action = \"{action}\" }}\n"
    )
}

fn start(backend: &RawBackend, attachments: &str) -> Gateway {
    let dir = TempDir::new("policies");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    Gateway::start_in(dir, &manifest(&backend.url(), attachments))
}

#[tokio::test]
async fn set_header_exists_actions_reach_the_backend() {
    let backend = RawBackend::start(echo_frames()).await;
    let attachments = [
        set_header("X-Override", "gw", "override"),
        set_header("X-Skip", "gw", "skip"),
        set_header("X-Skip-Absent", "gw", "skip"),
        set_header("X-Append", "gw", "append"),
        set_header("X-Delete", "", "delete"),
    ]
    .concat();
    let gw = start(&backend, &attachments);
    let (_, mut ws) = ws_connect(
        gw.ws.unwrap(),
        "/echo",
        "X-Override: client\r\nX-Skip: client\r\nX-Append: client\r\nX-Delete: client\r\n",
    )
    .await;
    ws.send(true, 1, b"hi").await.unwrap();
    assert_eq!(ws.read_frame().await.unwrap().payload, b"hi");
    let seen = backend.last_head();
    assert_eq!(headers_all(&seen, "x-override"), vec!["gw"]);
    assert_eq!(headers_all(&seen, "x-skip"), vec!["client"]);
    assert_eq!(headers_all(&seen, "x-skip-absent"), vec!["gw"]);
    assert_eq!(headers_all(&seen, "x-append"), vec!["client", "gw"]);
    assert!(headers_all(&seen, "x-delete").is_empty(), "{seen}");
}

/// Every header of the handshake itself is out of a policy's reach (README, "Policies"):
/// setting or removing one fails the handshake with `failure_status` (500 by default) and a
/// `policy_error` naming it, and the backend is never contacted.
#[tokio::test]
async fn changing_a_protected_header_fails_the_handshake_visibly() {
    let backend = RawBackend::start(echo_frames()).await;
    let cases = [
        ("Host", "override"),
        ("host", "delete"),
        ("Connection", "override"),
        ("Upgrade", "delete"),
        ("Sec-WebSocket-Key", "override"),
        ("Sec-WebSocket-Version", "override"),
        ("Sec-WebSocket-Accept", "append"),
        ("Sec-WebSocket-Protocol", "override"),
        ("Sec-WebSocket-Extensions", "append"),
        ("Content-Length", "override"),
        ("Transfer-Encoding", "append"),
    ];
    let mut text = gateway_section("plugin_dir = \"plugins\"");
    for (i, (name, action)) in cases.iter().enumerate() {
        text.push_str(&api_section(
            &format!("p{i}"),
            &format!("p{i}"),
            &backend.url(),
            &set_header(name, "1", action),
        ));
    }
    let dir = TempDir::new("protected");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let gw = Gateway::start_in(dir, &text);
    for (i, (name, action)) in cases.iter().enumerate() {
        let (head, _) = raw_handshake(gw.ws.unwrap(), &format!("/p{i}"), "").await;
        assert_eq!(status_of(&head), 500, "{name} {action}: {head}");
        let rec = gw
            .wait_record("policy_error", |r| r["api"] == format!("p{i}"))
            .await;
        assert!(
            rec["error"]
                .as_str()
                .unwrap()
                .contains(&format!("protected header `{}`", name.to_ascii_lowercase())),
            "{name} {action}: {rec}"
        );
    }
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

fn check(dir: &TempDir, manifest_text: &str) -> (i32, String) {
    let (code, err, _) = tollgate_check(dir.path(), manifest_text);
    (code, err)
}

#[test]
fn bad_plugin_config_fails_with_the_plugins_own_message() {
    let dir = TempDir::new("badcfg");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let (code, err) = check(
        &dir,
        &manifest("ws://127.0.0.1:1/", &set_header("X-A", "v", "sometimes")),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("plugin `set-header` refused its config") && err.contains("sometimes"),
        "{err}"
    );
}

#[test]
fn unknown_plugin_is_named() {
    let dir = TempDir::new("unknown");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let (code, err) = check(
        &dir,
        &manifest(
            "ws://127.0.0.1:1/",
            "[[apis.on_handshake]]\nplugin = \"jwt-validate\"\n",
        ),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("plugin `jwt-validate` (attached at API `echo` onHandshake) was not found"),
        "{err}"
    );
}

#[test]
fn plugin_importing_an_interface_we_do_not_offer_is_refused_with_the_import_named() {
    let dir = TempDir::new("foreign");
    plugins::install(
        &dir.path().join("plugins"),
        &["set_header.wasm", "foreign_import.wasm"],
    );
    let (code, err) = check(
        &dir,
        &manifest("ws://127.0.0.1:1/", &set_header("X-A", "v", "override")),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("foreign_import.wasm: imports `test:foreign/net`, which the handshake scope does not offer"),
        "{err}"
    );
}

use plugins::FORBIDDEN;

fn install_declaring(dir: &TempDir) {
    // Plus one declaring only allowed capabilities, which must run.
    let all: Vec<&str> = FORBIDDEN.iter().copied().chain(["read-request"]).collect();
    let built = plugins::declaring();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for c in &all {
        let f = format!("declares-{c}.wasm");
        std::fs::copy(built.join(&f), plugins.join(&f)).unwrap();
    }
}

fn attach_all(table: &str) -> String {
    FORBIDDEN
        .iter()
        .map(|c| format!("[[{table}]]\nplugin = \"declares-{c}\"\n"))
        .collect()
}

#[test]
fn each_forbidden_capability_on_an_api_is_refused_naming_plugin_capability_scope_and_rule() {
    let dir = TempDir::new("forbidden");
    install_declaring(&dir);
    let (code, err) = check(
        &dir,
        &manifest("ws://127.0.0.1:1/", &attach_all("apis.on_handshake")),
    );
    assert_eq!(code, 1, "{err}");
    for c in FORBIDDEN {
        let line = err
            .lines()
            .find(|l| l.contains(&format!("plugin `declares-{c}` declares capability `{c}`")))
            .unwrap_or_else(|| panic!("no refusal for {c}:\n{err}"));
        assert!(
            line.contains("refused on API `echo` onHandshake")
                && line.contains("cannot run on a WebSocket handshake")
                && line.contains("family)"),
            "{line}"
        );
    }
}

#[tokio::test]
async fn forbidden_capabilities_inherited_from_global_scope_load_and_are_skipped_and_counted() {
    let backend = RawBackend::start(echo_frames()).await;
    let dir = TempDir::new("skipped");
    install_declaring(&dir);
    // A plugin that does run, to show the chain still runs around the skipped ones.
    let text = format!(
        "{}{}{}[[policies]]\nplugin = \"declares-read-request\"\n",
        gateway_section("plugin_dir = \"plugins\""),
        api_section("echo", "echo", &backend.url(), ""),
        attach_all("policies")
    );
    let (code, err, _) = tollgate_check(dir.path(), &text);
    assert_eq!(code, 0, "{err}");
    // `check` passes, and says what will be skipped.
    for c in FORBIDDEN {
        assert!(
            err.lines().any(|l| l.contains("WARN")
                && l.contains("will be skipped")
                && l.contains(&format!("plugin=declares-{c}"))
                && l.contains(&format!("capability={c}"))),
            "no warning for declares-{c}:\n{err}"
        );
    }
    let gw = Gateway::start_in(dir, &text);
    for c in FORBIDDEN {
        gw.wait_record("policy_skipped_at_load", |r| {
            r["plugin"] == format!("declares-{c}")
        })
        .await;
    }
    for round in 1..=2u64 {
        let (head, mut ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
        assert_eq!(
            headers_all(&head, "x-ran"),
            vec!["declares-read-request"],
            "only the allowed policy may run: {head}"
        );
        ws.send(true, 1, b"x").await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, b"x");
        for c in FORBIDDEN {
            gw.wait_record("policy_skipped", |r| {
                r["plugin"] == format!("declares-{c}") && r["skips_total"] == round
            })
            .await;
        }
    }
}

#[test]
fn plugin_inspect_prints_the_declaration_and_the_imports() {
    let (code, out, err) = inspect(&plugins::built().join("jwt_validate.wasm"));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("plugin:       jwt-validate 0.1.0"), "{out}");
    assert!(out.contains("verify-signatures"), "{out}");
    assert!(out.contains("tollgate:policy/signatures@0.2.0"), "{out}");
    assert!(out.contains("tollgate:policy/config@0.2.0"), "{out}");
    assert!(out.contains("limit-lifetime"), "{out}");
    assert!(out.contains("wasi:cli/environment"), "{out}");
    assert!(out.contains("fresh per handshake"), "{out}");
    assert!(out.contains("instances = \"pooled\""), "{out}");
    // The measured cost of a fresh instance, so the operator can choose the strategy.
    // A median in microseconds, and the advice to pool exactly when it is over 200 us.
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("instantiate:"))
        .unwrap_or_else(|| panic!("no instantiate line: {out}"));
    let (us, rest) = line.trim_start().split_once(' ').unwrap();
    let us: u64 = us
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {line}"));
    assert!((1..1_000_000).contains(&us), "{line}");
    assert!(
        rest.starts_with("us per fresh instance and first call (median of "),
        "{line}"
    );
    if us != 200 {
        // (200 itself may be 200.4 rounded down.)
        assert_eq!(
            rest.ends_with("; consider instances = \"pooled\""),
            us > 200,
            "{line}"
        );
    }

    let (code, out, _) = inspect(&plugins::declaring().join("declares-set-body.wasm"));
    assert_eq!(code, 0);
    assert!(
        out.contains("set-body") && out.contains("not supported on onHandshake (body family"),
        "{out}"
    );

    let (code, _, err) = inspect(&plugins::built().join("foreign_import.wasm"));
    assert_eq!(code, 1);
    assert!(err.contains("imports `test:foreign/net`"), "{err}");
    let dir = TempDir::new("notwasm");
    std::fs::write(dir.path().join("x.wasm"), b"not wasm at all").unwrap();
    let (code, _, err) = inspect(&dir.path().join("x.wasm"));
    assert_eq!(code, 1);
    assert!(
        err.contains("not a loadable WebAssembly component"),
        "{err}"
    );
}

#[tokio::test]
async fn compiled_plugins_are_cached_by_content_hash_and_a_bad_cache_file_is_replaced() {
    let backend = RawBackend::start(echo_frames()).await;
    let cache = TempDir::new("cache");
    let text = manifest(&backend.url(), &set_header("X-A", "v", "override")).replace(
        "plugin_dir = \"plugins\"",
        &format!(
            "plugin_dir = \"plugins\"\nplugin_cache_dir = {}",
            serde_json::to_string(&cache.path().display().to_string()).unwrap()
        ),
    );
    let start = || {
        let dir = TempDir::new("cached");
        plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
        Gateway::start_in(dir, &text)
    };
    let loaded = |gw: &Gateway| {
        let r = gw
            .records("plugin_loaded")
            .into_iter()
            .find(|r| r["plugin"] == "set-header")
            .expect("plugin_loaded record");
        r["from_cache"].as_bool().unwrap()
    };
    let cached_files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect()
    };
    let gw = start();
    assert!(!loaded(&gw), "first start must compile");
    drop(gw);
    let files = cached_files();
    assert_eq!(files.len(), 1, "{files:?}");

    let gw = start();
    assert!(loaded(&gw), "second start must use the cache");
    let (_, _ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    assert_eq!(headers_all(&backend.last_head(), "x-a"), vec!["v"]);
    drop(gw);

    std::fs::write(&files[0], b"truncated").unwrap();
    let gw = start();
    assert!(!loaded(&gw), "an unusable cache file is recompiled");
    assert!(!gw.records("plugin_cache_stale").is_empty());
    let (_, _ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    drop(gw);
    assert!(
        std::fs::metadata(&files[0]).unwrap().len() > 1000,
        "cache file replaced"
    );
}

/// Cached plugins are native code, so the cache is only used where nobody but the gateway's
/// user can write: a 0777 directory is refused with a warning naming it and its mode (and an
/// artifact planted there is not loaded), a cache file others can write to or a symbolic link
/// is not loaded (recompiled and replaced by a 0600 file), and a new directory is made 0700.
#[tokio::test]
async fn a_compiled_plugin_cache_others_can_write_to_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    let backend = RawBackend::start(echo_frames()).await;
    let scratch = TempDir::new("cache-trust");
    let start_with = |cache: &std::path::Path| {
        let text = manifest(&backend.url(), &set_header("X-A", "v", "override")).replace(
            "plugin_dir = \"plugins\"",
            &format!(
                "plugin_dir = \"plugins\"\nplugin_cache_dir = {}",
                serde_json::to_string(&cache.display().to_string()).unwrap()
            ),
        );
        let dir = TempDir::new("cache-trust-gw");
        plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
        Gateway::start_in(dir, &text)
    };
    let from_cache = |gw: &Gateway| {
        gw.records("plugin_loaded")
            .into_iter()
            .find(|r| r["plugin"] == "set-header")
            .expect("plugin_loaded record")["from_cache"]
            .as_bool()
            .unwrap()
    };
    let cwasm = |dir: &std::path::Path| -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };

    // A directory that does not exist yet is created 0700; the artifact is written 0600.
    let trusted = scratch.path().join("new").join("compiled");
    drop(start_with(&trusted));
    assert_eq!(mode(&trusted), 0o700);
    assert_eq!(mode(&scratch.path().join("new")), 0o700);
    let files = cwasm(&trusted);
    assert_eq!(files.len(), 1, "{files:?}");
    let artifact = files[0].clone();
    assert_eq!(mode(&artifact), 0o600);
    let gw = start_with(&trusted);
    assert!(from_cache(&gw), "a trusted cache is used");
    drop(gw);

    // A world-writable directory holding a (valid) artifact someone planted: not used.
    let open = scratch.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let planted = open.join(artifact.file_name().unwrap());
    std::fs::copy(&artifact, &planted).unwrap();
    let gw = start_with(&open);
    assert!(!from_cache(&gw), "a 0777 cache directory must not be used");
    let warn = gw
        .wait_record("plugin_cache_untrusted", |r| {
            r["dir"] == open.display().to_string()
        })
        .await;
    assert_eq!(warn["mode"], "0777", "{warn}");
    assert_eq!(warn["level"], "WARN", "{warn}");
    let (_, _ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    assert_eq!(headers_all(&backend.last_head(), "x-a"), vec!["v"]);
    drop(gw);
    assert_eq!(cwasm(&open), vec![planted], "nothing written to it either");

    // A cache file group or others can write to: not loaded, replaced by one of ours.
    std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o666)).unwrap();
    let gw = start_with(&trusted);
    assert!(!from_cache(&gw), "a 0666 cache file must not be loaded");
    gw.wait_record("plugin_cache_file_untrusted", |_| true)
        .await;
    drop(gw);
    assert_eq!(mode(&artifact), 0o600, "replaced by a file of mode 0600");

    // A symbolic link in place of the file (to a valid artifact): not followed.
    let elsewhere = scratch.path().join("elsewhere.cwasm");
    std::fs::rename(&artifact, &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &artifact).unwrap();
    let gw = start_with(&trusted);
    assert!(
        !from_cache(&gw),
        "a symlinked cache file must not be loaded"
    );
    drop(gw);
    assert!(std::fs::symlink_metadata(&artifact).unwrap().is_file());
    assert_eq!(mode(&artifact), 0o600);
}

/// With neither `XDG_CACHE_HOME` nor `HOME` there is no default cache: nothing is written to
/// the temporary directory (where anyone could have created the path first), and a log record
/// says so.
#[tokio::test]
async fn without_a_home_there_is_no_compiled_plugin_cache_in_the_temp_dir() {
    let backend = RawBackend::start(echo_frames()).await;
    let tmp = TempDir::new("no-home-tmp");
    let dir = TempDir::new("no-home");
    plugins::install(&dir.path().join("plugins"), &["set_header.wasm"]);
    let tmp_s = tmp.path().display().to_string();
    let gw = Gateway::start_with_env(
        dir,
        &manifest(&backend.url(), &set_header("X-A", "v", "override")),
        &[("HOME", ""), ("XDG_CACHE_HOME", ""), ("TMPDIR", &tmp_s)],
    );
    gw.wait_record("plugin_cache_disabled", |_| true).await;
    let loaded = gw.wait_record("plugin_loaded", |_| true).await;
    assert_eq!(loaded["from_cache"], false, "{loaded}");
    let (_, _ws) = ws_connect(gw.ws.unwrap(), "/echo", "").await;
    assert_eq!(headers_all(&backend.last_head(), "x-a"), vec!["v"]);
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "something was written to the temporary directory"
    );
}

/// What a plugin did not declare it may not do: `overreach` declares only `read-request`, and
/// each thing it then does anyway fails the handshake with `failure_status` and a
/// `policy_error` record naming the plugin and the missing capability (a `signatures.verify`
/// call, a `close-at` and a read of the context are refused by the host); the backend is never
/// contacted. Reading the request, which it declared, works.
#[tokio::test]
async fn capabilities_a_plugin_did_not_declare_are_refused() {
    use std::sync::atomic::Ordering;
    let backend = RawBackend::start(echo_frames()).await;
    let cases = [
        ("reject", "reject"),
        ("header", "modify-headers"),
        ("query", "modify-query"),
        ("response-header", "modify-response-headers"),
        ("context", "use-context"),
        ("verify", "verify-signatures"),
        ("close-at", "limit-lifetime"),
        ("backend", "select-backend"),
        ("read-context", "use-context"),
        ("count", "use-counters"),
    ];
    let mut text = gateway_section("plugin_dir = \"plugins\"");
    for (action, _) in cases.iter().chain(&[("nothing", "")]) {
        text.push_str(&api_section(
            action,
            action,
            &backend.url(),
            &format!(
                "products = [\"free\"]\n[[apis.on_handshake]]\nplugin = \"overreach\"\nfailure_status = 503\nconfig = {{ do = \"{action}\" }}\n"
            ),
        ));
    }
    text.push_str("[[products]]\nname = \"free\"\nsubscription_required = false\n");
    let dir = TempDir::new("overreach");
    plugins::install(&dir.path().join("plugins"), &["overreach.wasm"]);
    let gw = Gateway::start_in(dir, &text);
    let addr = gw.ws.unwrap();
    for (action, capability) in cases {
        let (head, _) = raw_handshake(addr, &format!("/{action}"), "").await;
        assert_eq!(status_of(&head), 503, "{action}: {head}");
        let rec = gw.wait_record("policy_error", |r| r["api"] == action).await;
        assert_eq!(rec["plugin"], "overreach", "{rec}");
        let err = rec["error"].as_str().unwrap();
        assert!(
            err.contains(&format!("without declaring the capability `{capability}`")),
            "{action}: {rec}"
        );
    }
    let (head, _ws) = ws_connect(addr, "/nothing", "").await;
    assert_eq!(status_of(&head), 101, "{head}");
    assert_eq!(
        backend.connections.load(Ordering::SeqCst),
        1,
        "a refused decision reached the backend"
    );
    let shown = gw
        .wait_record("policy_log", |r| r["plugin"] == "overreach")
        .await;
    assert_eq!(shown["message"], "read path /nothing", "{shown}");
}

/// A policy's 101 headers go through a protected list too: the handshake's own headers,
/// `Sec-WebSocket-Protocol` and `-Extensions` (negotiated with the backend) and hop-by-hop
/// headers fail the handshake (the backend is never contacted); any other header is added.
#[tokio::test]
async fn protected_response_headers_cannot_be_added_to_the_101() {
    use std::sync::atomic::Ordering;
    let backend = RawBackend::start(echo_frames()).await;
    let protected = [
        "sec-websocket-protocol",
        "Sec-WebSocket-Extensions",
        "sec-websocket-accept",
        "connection",
        "upgrade",
        "keep-alive",
        "transfer-encoding",
        "te",
    ];
    let mut text = gateway_section("plugin_dir = \"plugins\"");
    for (i, name) in protected.iter().chain(&["x-fine"]).enumerate() {
        text.push_str(&api_section(
            &format!("h{i}"),
            &format!("h{i}"),
            &backend.url(),
            &format!(
                "[[apis.on_handshake]]\nplugin = \"faulty\"\nfailure_status = 503\nconfig = {{ mode = \"respond-header\", arg = \"{name}\" }}\n"
            ),
        ));
    }
    let dir = TempDir::new("response-headers");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let gw = Gateway::start_in(dir, &text);
    let addr = gw.ws.unwrap();
    for (i, name) in protected.iter().enumerate() {
        let (head, _) = raw_handshake(addr, &format!("/h{i}"), "").await;
        assert_eq!(status_of(&head), 503, "{name}: {head}");
        let api = format!("h{i}");
        let rec = gw
            .wait_record("policy_error", |r| r["api"] == api.as_str())
            .await;
        assert!(
            rec["error"]
                .as_str()
                .unwrap()
                .contains(&format!("protected response header `{name}`")),
            "{rec}"
        );
    }
    let (head, _ws) = ws_connect(addr, &format!("/h{}", protected.len()), "").await;
    assert_eq!(
        header(&head, "x-fine").as_deref(),
        Some("from-policy"),
        "{head}"
    );
    assert_eq!(backend.connections.load(Ordering::SeqCst), 1);
}

/// The same list holds for the headers of a policy's own rejection: it cannot unframe the
/// gateway's error response (Content-Length, Transfer-Encoding) or keep the connection open
/// (Connection); such a rejection fails the handshake with `failure_status`. Other headers
/// reach the client with the policy's status and body.
#[tokio::test]
async fn a_rejection_cannot_carry_protected_headers() {
    let backend = RawBackend::start(echo_frames()).await;
    let protected = [
        "content-length",
        "Transfer-Encoding",
        "connection",
        "upgrade",
    ];
    let mut text = gateway_section("plugin_dir = \"plugins\"");
    for (i, name) in protected.iter().chain(&["x-fine"]).enumerate() {
        text.push_str(&api_section(
            &format!("r{i}"),
            &format!("r{i}"),
            &backend.url(),
            &format!(
                "[[apis.on_handshake]]\nplugin = \"faulty\"\nfailure_status = 503\nconfig = {{ mode = \"reject-header\", arg = \"{name}\" }}\n"
            ),
        ));
    }
    let dir = TempDir::new("reject-headers");
    plugins::install(&dir.path().join("plugins"), &["faulty_policy.wasm"]);
    let gw = Gateway::start_in(dir, &text);
    let addr = gw.ws.unwrap();
    for (i, name) in protected.iter().enumerate() {
        let (head, _) = raw_handshake(addr, &format!("/r{i}"), "").await;
        assert_eq!(status_of(&head), 503, "{name}: {head}");
        assert_eq!(
            header(&head, "connection").as_deref(),
            Some("close"),
            "{head}"
        );
        let api = format!("r{i}");
        let rec = gw
            .wait_record("policy_error", |r| r["api"] == api.as_str())
            .await;
        assert!(
            rec["error"]
                .as_str()
                .unwrap()
                .contains(&format!("protected response header `{name}`")),
            "{rec}"
        );
    }
    let (head, mut ws) = raw_handshake(addr, &format!("/r{}", protected.len()), "").await;
    assert_eq!(status_of(&head), 403, "{head}");
    assert_eq!(header(&head, "x-fine").as_deref(), Some("0"), "{head}");
    assert_eq!(
        header(&head, "connection").as_deref(),
        Some("close"),
        "{head}"
    );
    let mut body = ws.buf.clone();
    {
        use tokio::io::AsyncReadExt;
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            ws.io.read_to_end(&mut body),
        )
        .await;
    }
    assert_eq!(String::from_utf8_lossy(&body), "refused by policy");
    assert_eq!(
        backend
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}
