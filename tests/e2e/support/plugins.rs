//! Builds the policy plugins the tests use from source, once per test process (cargo's own
//! lock makes concurrent test binaries wait for one build). A separate target directory keeps
//! this nested cargo from waiting on the outer `cargo test`'s lock.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Packages built for wasm32-wasip2 and the file each produces.
pub const PLUGINS: &[(&str, &str)] = &[
    ("set-header", "set_header.wasm"),
    ("jwt-validate", "jwt_validate.wasm"),
    ("tenant-check", "tenant_check.wasm"),
    ("faulty-policy", "faulty_policy.wasm"),
    ("foreign-import", "foreign_import.wasm"),
    ("overreach", "overreach.wasm"),
    ("wit-0-1-policy", "wit_0_1_policy.wasm"),
    ("require-param", "require_param.wasm"),
    ("check-header", "check_header.wasm"),
    ("ip-filter", "ip_filter.wasm"),
    ("set-backend-service", "set_backend_service.wasm"),
    ("rate-limit-by-key", "rate_limit_by_key.wasm"),
    ("message-test", "message_test.wasm"),
    ("redact-fields", "redact_fields.wasm"),
    ("json-schema-validate", "json_schema_validate.wasm"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn target() -> PathBuf {
    workspace().join("target").join("wasm-plugins")
}

fn cargo_build(packages: &[&str], env: Option<(&str, &str)>) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace())
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(target());
    for pkg in packages {
        cmd.args(["-p", pkg]);
    }
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run cargo for the test plugins");
    assert!(
        out.status.success(),
        "building test plugins failed (is the wasm32-wasip2 target installed?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Directory holding every built plugin.
pub fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let packages: Vec<&str> = PLUGINS.iter().map(|(p, _)| *p).collect();
        cargo_build(&packages, None);
        target().join("wasm32-wasip2").join("release")
    })
}

/// The capabilities the seed lists as unsupported on onHandshake.
pub const FORBIDDEN: &[&str] = &[
    "mock-response",
    "cache-lookup",
    "cache-store",
    "cross-domain",
    "cors",
    "jsonp",
    "set-method",
    "set-body",
    "xml-to-json",
    "json-to-xml",
    "xslt",
    "validate-content",
    "validate-parameters",
    "validate-headers",
    "validate-status-code",
];

/// One plugin per forbidden capability, plus one declaring only `read-request`, each built
/// from the `declares-capability` test package with `TOLLGATE_TEST_CAPABILITY`: the file for
/// capability `c` is `<dir>/declares-<c>.wasm`, and the plugin's name is `declares-<c>`.
pub fn declaring() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = target().join("declares");
        std::fs::create_dir_all(&dir).unwrap();
        for c in FORBIDDEN.iter().chain(&["read-request"]) {
            cargo_build(
                &["declares-capability"],
                Some(("TOLLGATE_TEST_CAPABILITY", c)),
            );
            let built = target()
                .join("wasm32-wasip2")
                .join("release")
                .join("declares_capability.wasm");
            std::fs::copy(built, dir.join(format!("declares-{c}.wasm"))).unwrap();
        }
        dir
    })
}

/// One plugin declaring capability `c` (see [`declaring`]), without building the others:
/// `<returned dir>/declares-<c>.wasm`.
pub fn declaring_one(c: &str) -> PathBuf {
    let dir = target().join(format!("declares-only-{c}"));
    std::fs::create_dir_all(&dir).unwrap();
    cargo_build(
        &["declares-capability"],
        Some(("TOLLGATE_TEST_CAPABILITY", c)),
    );
    let built = target()
        .join("wasm32-wasip2")
        .join("release")
        .join("declares_capability.wasm");
    std::fs::copy(built, dir.join(format!("declares-{c}.wasm"))).unwrap();
    dir
}

/// The Python example policy (`examples/origin-check-py`), built once per test process with
/// componentize-py, which `scripts/test` installs from PyPI into `target/py`.
pub fn python_origin_check() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| python_example("origin-check-py", "handshake-policy", "origin_check.wasm"))
}

/// The Python example message policy (`examples/type-filter-py`), built the same way.
pub fn python_type_filter() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| python_example("type-filter-py", "message-policy", "type_filter.wasm"))
}

/// Builds `examples/<example>/app.py` against `world` with componentize-py into `file`.
/// Written aside and renamed, so concurrent test binaries never see half a file.
fn python_example(example: &str, world: &str, file: &str) -> PathBuf {
    let ws = workspace();
    let tool = ws
        .join("target")
        .join("py")
        .join("bin")
        .join("componentize-py");
    assert!(
        tool.exists(),
        "{} is missing: run the suite with ./scripts/test, which installs it",
        tool.display()
    );
    let dir = target();
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(file);
    let tmp = dir.join(format!("{file}.{}.tmp", std::process::id()));
    // Built from a copy: componentize-py's interpreter writes __pycache__ next to the
    // source, which would dirty the checkout.
    let src = dir.join(format!("{example}.{}", std::process::id()));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(
        ws.join("examples").join(example).join("app.py"),
        src.join("app.py"),
    )
    .unwrap();
    let run = Command::new(&tool)
        .arg("-d")
        .arg(ws.join("wit"))
        .args(["-w", world, "componentize", "-p"])
        .arg(&src)
        .arg("app")
        .arg("-o")
        .arg(&tmp)
        .output()
        .expect("run componentize-py");
    let _ = std::fs::remove_dir_all(&src);
    assert!(
        run.status.success(),
        "componentize-py failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::rename(&tmp, &out).unwrap();
    warm_compiled_cache(&out);
    out
}

/// The JavaScript example policy (`examples/tenant-route-js`), built once per test process with
/// componentize-js, which `scripts/test` installs from npm into `target/js`. Its sources are
/// copied next to that `node_modules` so Node's module resolution finds the package.
pub fn js_tenant_route() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let ws = workspace();
        let js = ws.join("target").join("js");
        assert!(
            js.join("node_modules/@bytecodealliance/componentize-js").is_dir(),
            "componentize-js is missing in {}: run the suite with ./scripts/test, which installs it",
            js.display()
        );
        let src = js.join(format!("tenant-route.{}", std::process::id()));
        std::fs::create_dir_all(&src).unwrap();
        for f in ["policy.js", "build.mjs"] {
            std::fs::copy(ws.join("examples/tenant-route-js").join(f), src.join(f)).unwrap();
        }
        let dir = target();
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("tenant_route.wasm");
        let tmp = dir.join(format!("tenant_route.{}.tmp", std::process::id()));
        let run = Command::new("node")
            .arg(src.join("build.mjs"))
            .arg(&tmp)
            .arg(ws.join("wit"))
            .output()
            .expect("run node");
        assert!(
            run.status.success(),
            "componentize-js failed:\n{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        std::fs::rename(&tmp, &out).unwrap();
        let _ = std::fs::remove_dir_all(&src);
        warm_compiled_cache(&out);
        out
    })
}

/// Compiles a big (interpreter-based) component once, into the tests' compiled-plugin cache,
/// so the gateways and checks that load it afterwards start in milliseconds instead of each
/// compiling it for tens of seconds at once.
fn warm_compiled_cache(file: &Path) {
    let (code, _, err) = super::inspect(file);
    assert_eq!(code, 0, "inspect {}: {err}", file.display());
}

/// Copies the named plugin files into `dir`.
pub fn install(dir: &Path, files: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for f in files {
        std::fs::copy(built().join(f), dir.join(f)).unwrap();
    }
}
