//! `tollgate check` on broken manifests: exit 1, and every error names file, line and key;
//! every documented rule has a row in [`rules`], every documented warning one in
//! `documented_warnings_are_printed_and_do_not_fail`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

fn check(text: &str) -> (i32, String, String) {
    let dir = TempDir::new("check");
    tollgate_check(dir.path(), text)
}

const GW: &str = "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\n";

#[test]
fn duplicate_url_suffix() {
    let (code, err, path) = check(&format!(
        "{GW}[[apis]]\nname = \"a\"\nurl_suffix = \"chat\"\nbackend = \"ws://h/\"\n[[apis]]\nname = \"b\"\nurl_suffix = \"/chat/\"\nbackend = \"ws://h/\"\n"
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("{path}:10:14: key `apis[1].url_suffix`")),
        "{err}"
    );
    assert!(err.contains("duplicate url_suffix `chat`"), "{err}");
}

#[test]
fn bad_backend_scheme() {
    let (code, err, path) = check(&format!(
        "{GW}[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"https://h/\"\n"
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{path}:7:11: key `apis[0].backend`")),
        "{err}"
    );
    assert!(err.contains("must be ws or wss"), "{err}");
}

#[test]
fn unknown_key() {
    let (code, err, path) = check(&format!("{GW}lisen = \"x\"\n"));
    assert_eq!(code, 1);
    assert!(err.contains(&format!("{path}:4:1: key `lisen`")), "{err}");
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn missing_file() {
    let (code, err, _) = check_path("/nonexistent/tollgate.toml");
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent/tollgate.toml") && err.contains("cannot read manifest"),
        "{err}"
    );
}

#[test]
fn missing_referenced_file_and_several_errors_at_once() {
    let (code, err, path) = check(&format!(
        "{GW}[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"nope.pem\"\nkey = \"nope.key\"\n[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"gold\"]\n"
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{path}:6:8: key `gateway.tls.cert`")),
        "{err}"
    );
    assert!(err.contains("key `gateway.tls.key`"), "{err}");
    assert!(
        err.contains("key `apis[0].products`") && err.contains("`gold`"),
        "{err}"
    );
}

#[test]
fn valid_manifest_passes() {
    let (code, err, _) = check(&format!(
        "{GW}[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\n"
    ));
    assert_eq!(code, 0, "{err}");
}

fn check_path(p: &str) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["check", "--manifest", p])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        p.to_owned(),
    )
}

// ------------------------------------------------------------------------------------------
// Every documented rule, one row each.
//
// A row is a manifest (plus any files next to it) that breaks exactly one rule, where the error
// must point (a snippet that occurs once in the file, `^` marking the character), the key it
// must name, and a fragment of its message. The line and column are computed from the snippet,
// so an error that points at the wrong place fails the row. Each row's `fix` edits the
// offending text; the fixed manifest must pass, so a row cannot pass by accident (a manifest
// that fails for another reason, or a rule whose limit is off by one).

/// Environment every row's `tollgate check` runs with (and `TOLLGATE_ROW_UNSET` removed).
const ROW_ENV: &[(&str, &str)] = &[
    ("TOLLGATE_ROW_SHORT", "short-secret"),
    ("TOLLGATE_ROW_SPACES", "has spaces in it 0123"),
    ("TOLLGATE_ROW_LONG", "a-long-enough-secret-0123"),
];

/// SHA-256 of `0123456789abcdef0123` and of `fedcba9876543210fedc`.
const SHA1: &str = "1bd8fd47297046f993e608e398d5905b00a33e163c6b1172dd38887fed05ed6a";
const SHA2: &str = "66ebc374d4ade67915932d22ecab4e69974a050df3ee028181601c5b44c45c81";

const GW_PLUGINS: &str =
    "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nplugin_dir = \"plugins\"\n";
const API: &str = "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\n";
const WSS_API: &str = "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"wss://h/\"\n";
const SET_HEADER: &str =
    "[[apis.on_handshake]]\nplugin = \"set-header\"\nconfig = { name = \"X-A\", value = \"v\" }\n";
const TLS: &str = "[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"gw.pem\"\nkey = \"gw.key\"\n";

/// A file written next to the manifest before the check.
#[derive(Clone)]
enum Extra {
    Text(&'static str, String, u32),
    Dir(&'static str),
    Copy(&'static str, PathBuf),
    Symlink(&'static str, &'static str),
}

#[derive(Clone)]
struct Rule {
    name: &'static str,
    manifest: String,
    files: Vec<Extra>,
    /// (file the error is in, relative to the manifest's directory; snippet with `^`).
    at: (&'static str, &'static str),
    key: &'static str,
    says: &'static str,
    /// (file, from, to): edits that fix the rule.
    fix: Vec<(&'static str, &'static str, &'static str)>,
}

fn rule(
    name: &'static str,
    manifest: &[&str],
    at: &'static str,
    key: &'static str,
    says: &'static str,
) -> Rule {
    Rule {
        name,
        manifest: manifest.concat(),
        files: Vec::new(),
        at: ("m.toml", at),
        key,
        says,
        fix: Vec::new(),
    }
}

impl Rule {
    fn fix(mut self, from: &'static str, to: &'static str) -> Self {
        self.fix.push(("m.toml", from, to));
        self
    }
    fn fix_in(mut self, file: &'static str, from: &'static str, to: &'static str) -> Self {
        self.fix.push((file, from, to));
        self
    }
    fn file(mut self, e: Extra) -> Self {
        self.files.push(e);
        self
    }
    fn error_in(mut self, file: &'static str) -> Self {
        self.at.0 = file;
        self
    }

    /// The row with its fix applied.
    fn fixed(&self) -> Result<Rule, String> {
        let mut r = self.clone();
        for (file, from, to) in &self.fix {
            let text = if *file == "m.toml" {
                &mut r.manifest
            } else {
                r.files
                    .iter_mut()
                    .find_map(|e| match e {
                        Extra::Text(p, body, _) if p == file => Some(body),
                        _ => None,
                    })
                    .ok_or_else(|| format!("fix names `{file}`, which the row does not write"))?
            };
            if !text.contains(from) {
                return Err(format!("fix: `{from}` is not in {file}"));
            }
            *text = text.replacen(from, to, 1);
        }
        Ok(r)
    }

    fn text_of(&self, file: &str) -> Option<&str> {
        if file == "m.toml" {
            return Some(&self.manifest);
        }
        self.files.iter().find_map(|e| match e {
            Extra::Text(p, body, _) if *p == file => Some(body.as_str()),
            _ => None,
        })
    }

    /// Writes the row's files into a fresh directory and runs `tollgate check` on its
    /// manifest: the directory, exit code, stderr and manifest path.
    fn check(&self) -> (TempDir, i32, String, String) {
        let dir = TempDir::new("rule");
        for e in &self.files {
            let at = |p: &str| {
                let p = dir.path().join(p);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                p
            };
            match e {
                Extra::Text(p, body, mode) => {
                    let p = at(p);
                    std::fs::write(&p, body).unwrap();
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
                }
                Extra::Dir(p) => std::fs::create_dir_all(at(p)).unwrap(),
                Extra::Copy(p, from) => {
                    std::fs::copy(from, at(p)).unwrap();
                }
                Extra::Symlink(p, target) => std::os::unix::fs::symlink(target, at(p)).unwrap(),
            }
        }
        let (code, err, path) =
            tollgate_check_env(dir.path(), &self.manifest, ROW_ENV, &["TOLLGATE_ROW_UNSET"]);
        (dir, code, err, path)
    }
}

/// Line and column (1-based, as `tollgate check` counts them) of the `^` in `snippet`, which
/// must occur exactly once in `text` (without the `^`).
fn position(text: &str, snippet: &str) -> Result<(usize, usize), String> {
    let caret = snippet
        .find('^')
        .ok_or_else(|| format!("snippet {snippet:?} has no ^"))?;
    let needle = snippet.replacen('^', "", 1);
    let found = text.matches(needle.as_str()).count();
    if found != 1 {
        return Err(format!("snippet {needle:?} occurs {found} times"));
    }
    let offset = text.find(needle.as_str()).unwrap() + caret;
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    Ok((line, column))
}

/// `err` has a line `{file}:{line}:{col}: key `{key}`: ...{says}...`.
fn expect_error(
    err: &str,
    dir: &Path,
    file: &str,
    text: &str,
    at: &str,
    key: &str,
    says: &str,
) -> Result<(), String> {
    let (line, col) = position(text, at)?;
    let prefix = format!("{}:{line}:{col}: key `{key}`: ", dir.join(file).display());
    match err.lines().find(|l| l.starts_with(&prefix)) {
        None => Err(format!("no error starting `{prefix}`")),
        Some(l) if !l.contains(says) => Err(format!("`{l}` does not say `{says}`")),
        Some(_) => Ok(()),
    }
}

/// Runs one row: exit 1, the error is the only one and starts with
/// `file:line:column: key `k``, and the fixed manifest passes.
fn run_row(r: &Rule) -> Result<(), String> {
    let (dir, code, err, path) = r.check();
    let shown = |e: String| format!("{e}\n--- stderr:\n{err}");
    if code != 1 {
        return Err(shown(format!("exit code {code}, expected 1")));
    }
    if !err.contains(r.says) {
        return Err(shown(format!("no error says `{}`", r.says)));
    }
    let text = r
        .text_of(r.at.0)
        .ok_or_else(|| format!("the row writes no {}", r.at.0))?;
    expect_error(&err, dir.path(), r.at.0, text, r.at.1, r.key, r.says).map_err(shown)?;
    let one = format!("1 error(s) in {path}");
    if err.lines().last() != Some(one.as_str()) {
        return Err(shown(format!("expected exactly one error (`{one}`)")));
    }
    if !r.fix.is_empty() {
        let (_dir, code, err, _) = r.fixed()?.check();
        if code != 0 {
            return Err(format!(
                "the fixed manifest does not pass (exit {code}):\n{err}"
            ));
        }
    }
    Ok(())
}

/// Certificates for the rows that need real ones.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

impl Pki {
    fn new() -> Pki {
        let ca = crate::support::tls::TestCa::new("manifest-errors CA");
        let leaf = ca.leaf(&["localhost"]);
        Pki {
            ca: ca.pem.clone(),
            cert: leaf.cert_pem,
            key: leaf.key_pem,
        }
    }
    fn gw_files(&self, r: Rule) -> Rule {
        r.file(Extra::Text("gw.pem", self.cert.clone(), 0o644))
            .file(Extra::Text("gw.key", self.key.clone(), 0o600))
    }
}

fn text(path: &'static str, body: &str) -> Extra {
    Extra::Text(path, body.to_owned(), 0o600)
}

fn set_header_plugin() -> Extra {
    Extra::Copy(
        "plugins/set_header.wasm",
        plugins::built().join("set_header.wasm"),
    )
}

/// A plugin declaring `set-body`, which onHandshake does not support.
fn set_body_plugin() -> Extra {
    Extra::Copy(
        "plugins/declares-set-body.wasm",
        plugins::declaring_one("set-body").join("declares-set-body.wasm"),
    )
}

fn rules() -> Vec<Rule> {
    let pki = Pki::new();
    vec![
        // [gateway]
        rule("gateway name not empty", &["[gateway]\nname = \" \"\nlisten = \"127.0.0.1:0\"\n", API],
            "name = ^\" \"", "gateway.name", "must not be empty")
            .fix("name = \" \"", "name = \"g\""),
        rule("at least one listener", &["[gateway]\nname = \"g\"\n", API],
            "^[gateway]", "gateway.listen", "no listener: set `listen` (ws) and/or `[gateway.tls]` (wss)")
            .fix("name = \"g\"\n", "name = \"g\"\nlisten = \"127.0.0.1:0\"\n"),
        rule("listen is IP:PORT", &["[gateway]\nname = \"g\"\nlisten = \"localhost:8080\"\n", API],
            "listen = ^\"localhost:8080\"", "gateway.listen", "`localhost:8080` is not a socket address")
            .fix("\"localhost:8080\"", "\"127.0.0.1:0\""),
        pki.gw_files(rule("tls cert exists", &[GW, "[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"missing.pem\"\nkey = \"gw.key\"\n", API],
            "cert = ^\"missing.pem\"", "gateway.tls.cert", "missing.pem` does not exist"))
            .fix("missing.pem", "gw.pem"),
        pki.gw_files(rule("tls key exists", &[GW, "[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"gw.pem\"\nkey = \"missing.key\"\n", API],
            "key = ^\"missing.key\"", "gateway.tls.key", "missing.key` does not exist"))
            .fix("missing.key", "gw.key"),
        pki.gw_files(rule("tls cert is a PEM certificate", &[GW, "[gateway.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"junk.pem\"\nkey = \"gw.key\"\n", API],
            "cert = ^\"junk.pem\"", "gateway.tls.cert", "no certificate found"))
            .file(text("junk.pem", "not a certificate\n"))
            .fix("junk.pem", "gw.pem"),
        rule("trusted_proxies are CIDRs", &[GW, "trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/99\"]\n", API],
            "trusted_proxies = ^[", "gateway.trusted_proxies", "`10.0.0.0/99` is neither an address nor a CIDR network")
            .fix("/99", "/16"),
        // Parse errors name the bare key, not its dotted path (see `unknown_key`).
        rule("log_query_values is a boolean", &[GW, "log_query_values = \"yes\"\n", API],
            "log_query_values = ^\"yes\"", "log_query_values", "invalid type: a string, expected a boolean")
            .fix("\"yes\"", "false"),
        // [gateway.limits]
        rule("max_header_bytes at least 8192", &[GW, "[gateway.limits]\nmax_header_bytes = 8191\n", API],
            "max_header_bytes = ^8191", "gateway.limits.max_header_bytes", "must be at least 8192")
            .fix("8191", "8192"),
        rule("max_header_bytes at most 1 MiB", &[GW, "[gateway.limits]\nmax_header_bytes = 1048577\n", API],
            "max_header_bytes = ^1048577", "gateway.limits.max_header_bytes", "must be at most 1048576")
            .fix("1048577", "1048576"),
        rule("max_pending_handshakes at least 1", &[GW, "[gateway.limits]\nmax_pending_handshakes = 0\n", API],
            "max_pending_handshakes = ^0", "gateway.limits.max_pending_handshakes", "must be at least 1")
            .fix("= 0", "= 1"),
        rule("gateway limit durations", &[GW, "[gateway.limits]\nhandshake_timeout = \"soon\"\n", API],
            "handshake_timeout = ^\"soon\"", "handshake_timeout", "invalid value: a string, expected a duration")
            .fix("\"soon\"", "\"10s\""),
        rule("API limit durations", &[GW, API, "[apis.limits]\nmax_connection_lifetime = \"forever\"\n"],
            "max_connection_lifetime = ^\"forever\"", "max_connection_lifetime", "expected a duration")
            .fix("\"forever\"", "\"24h\""),
        rule("gateway max_connections = 0", &[GW, "[gateway.limits]\nmax_connections = 0\n", API],
            "max_connections = ^0", "gateway.limits.max_connections", "at least 1")
            .fix("= 0", "= 1"),
        rule("API max_connections = 0", &[GW, API, "[apis.limits]\nmax_connections = 0\n"],
            "max_connections = ^0", "apis[0].limits.max_connections", "at least 1")
            .fix("= 0", "= 1"),
        // [admin]
        rule("admin listen is IP:PORT", &[GW, "[admin]\nlisten = \"127.0.0.1\"\n", API],
            "listen = ^\"127.0.0.1\"", "admin.listen", "`127.0.0.1` is not a socket address")
            .fix("listen = \"127.0.0.1\"\n", "listen = \"127.0.0.1:0\"\n"),
        rule("admin allowed_hosts are host names", &[GW, "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"ok.example\", \"*.example\"]\n", API],
            "^\"*.example\"", "admin.allowed_hosts[1]", "`*.example`: not a host name")
            .fix("*.example", "ops.example"),
        rule("admin token_sha256 is 64 hex digits", &[GW, "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = \"ca8d40e6ce4716b552f1c69863335b502f2afb57ffae171d6675fd56d91ca5bg\"\n", API],
            "token_sha256 = ^\"", "admin.token_sha256", "must be 64 hex digits")
            .fix("5bg\"", "5b2\""),
        rule("admin token from one place", &[GW, "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"TOLLGATE_ROW_LONG\"\ntoken_sha256 = \"ca8d40e6ce4716b552f1c69863335b502f2afb57ffae171d6675fd56d91ca5b2\"\n", API],
            "token_sha256 = ^\"", "admin.token_sha256", "set admin.token_env or admin.token_sha256, not both")
            .fix("token_env = \"TOLLGATE_ROW_LONG\"\n", ""),
        rule("admin token at least 16 characters", &[GW, "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"TOLLGATE_ROW_SHORT\"\n", API],
            "token_env = ^\"TOLLGATE_ROW_SHORT\"", "admin.token_env", "the admin token must have at least 16 characters")
            .fix("TOLLGATE_ROW_SHORT", "TOLLGATE_ROW_LONG"),
        rule("admin token_env is set", &[GW, "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"TOLLGATE_ROW_UNSET\"\n", API],
            "token_env = ^\"TOLLGATE_ROW_UNSET\"", "admin.token_env", "`TOLLGATE_ROW_UNSET` is not set")
            .fix("TOLLGATE_ROW_UNSET", "TOLLGATE_ROW_LONG"),
        // [[apis]]
        rule("API names unique", &[GW, API, "[[apis]]\nname = \"a\"\nurl_suffix = \"b\"\nbackend = \"ws://h/\"\n"],
            "name = ^\"a\"\nurl_suffix = \"b\"", "apis[1].name", "duplicate API name `a` (first used by apis[0])")
            .fix("name = \"a\"\nurl_suffix = \"b\"", "name = \"b\"\nurl_suffix = \"b\""),
        rule("API name not empty", &[GW, "[[apis]]\nname = \" \"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\n"],
            "name = ^\" \"", "apis[0].name", "must not be empty")
            .fix("name = \" \"", "name = \"a\""),
        rule("url_suffix unique after normalising", &[GW, "[[apis]]\nname = \"a\"\nurl_suffix = \"chat\"\nbackend = \"ws://h/\"\n[[apis]]\nname = \"b\"\nurl_suffix = \"/chat/\"\nbackend = \"ws://h/\"\n"],
            "url_suffix = ^\"/chat/\"", "apis[1].url_suffix", "duplicate url_suffix `chat`: already used by API `a` (apis[0])")
            .fix("\"/chat/\"", "\"/chat2/\""),
        rule("url_suffix characters", &[GW, "[[apis]]\nname = \"a\"\nurl_suffix = \"a?b\"\nbackend = \"ws://h/\"\n"],
            "url_suffix = ^\"a?b\"", "apis[0].url_suffix", "character '?' is not allowed in a url_suffix")
            .fix("\"a?b\"", "\"a\""),
        rule("url_suffix segments", &[GW, "[[apis]]\nname = \"a\"\nurl_suffix = \"a/../b\"\nbackend = \"ws://h/\"\n"],
            "url_suffix = ^\"a/../b\"", "apis[0].url_suffix", "empty, `.` or `..` path segments are not allowed")
            .fix("\"a/../b\"", "\"a/b\""),
        rule("backend scheme ws or wss", &[GW, "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"https://h/\"\n"],
            "backend = ^\"https://h/\"", "apis[0].backend", "backend scheme must be ws or wss, not `https`")
            .fix("https://", "ws://"),
        rule("backend has a scheme", &[GW, "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"h:80\"\n"],
            "backend = ^\"h:80\"", "apis[0].backend", "needs a ws:// or wss:// scheme")
            .fix("\"h:80\"", "\"ws://h:80/\""),
        rule("backend without credentials", &[GW, "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://user:pw@h/\"\n"],
            "backend = ^\"ws://user:pw@h/\"", "apis[0].backend", "must not carry credentials")
            .fix("user:pw@", ""),
        rule("known schemes", &[GW, API, "schemes = [\"ws\", \"http\"]\n"],
            "schemes = ^[", "apis[0].schemes", "unknown scheme `http` (expected \"ws\" or \"wss\")")
            .fix(", \"http\"", ""),
        rule("schemes not empty", &[GW, API, "schemes = []\n"],
            "schemes = ^[", "apis[0].schemes", "must list at least one of \"ws\", \"wss\"")
            .fix("[]", "[\"ws\"]"),
        rule("wss needs a TLS listener", &[GW, API, "schemes = [\"wss\"]\n"],
            "schemes = ^[", "apis[0].schemes", "scheme \"wss\" needs a TLS listener")
            .fix("[\"wss\"]", "[\"ws\"]"),
        pki.gw_files(rule("ws needs a plain listener", &["[gateway]\nname = \"g\"\n", TLS, API, "schemes = [\"ws\"]\n"],
            "schemes = ^[", "apis[0].schemes", "scheme \"ws\" needs a plain listener"))
            .fix("[\"ws\"]", "[\"wss\"]"),
        rule("products are defined", &[GW, API, "products = [\"gold\"]\n"],
            "products = [^\"gold\"]", "apis[0].products", "product `gold` is not defined in [[products]]")
            .fix("products = [\"gold\"]\n", ""),
        rule("subscription_key_header is a header name", &[GW, API, "subscription_key_header = \"bad header\"\n"],
            "subscription_key_header = ^\"bad header\"", "apis[0].subscription_key_header", "`bad header` is not a valid header name")
            .fix("bad header", "X-Key"),
        rule("subscription_key_query not empty", &[GW, API, "subscription_key_query = \" \"\n"],
            "subscription_key_query = ^\" \"", "apis[0].subscription_key_query", "must not be empty")
            .fix("\" \"", "\"key\""),
        rule("ca_file only with wss", &[GW, API, "ca_file = \"ca.pem\"\n"],
            "ca_file = ^\"ca.pem\"", "apis[0].ca_file", "ca_file is only used with a wss:// backend")
            .file(Extra::Text("ca.pem", pki.ca.clone(), 0o644))
            .fix("ws://h/", "wss://h/"),
        rule("ca_file exists", &[GW, WSS_API, "ca_file = \"missing.pem\"\n"],
            "ca_file = ^\"missing.pem\"", "apis[0].ca_file", "missing.pem` does not exist")
            .file(Extra::Text("ca.pem", pki.ca.clone(), 0o644))
            .fix("missing.pem", "ca.pem"),
        rule("ca_file holds a certificate", &[GW, WSS_API, "ca_file = \"junk.pem\"\n"],
            "ca_file = ^\"junk.pem\"", "apis[0].ca_file", "no certificate found")
            .file(Extra::Text("ca.pem", pki.ca.clone(), 0o644))
            .file(text("junk.pem", "not a certificate\n"))
            .fix("junk.pem", "ca.pem"),
        // [[products]] and subscriptions
        rule("product names unique", &[GW, "[[products]]\nname = \"p\"\nsubscription_required = false\n[[products]]\nname = \"p\"\n", API, "products = [\"p\"]\n"],
            "name = ^\"p\"\n[[apis]]", "products[1].name", "duplicate product name `p`")
            .fix("name = \"p\"\n[[apis]]", "name = \"q\"\n[[apis]]")
            .fix("products = [\"p\"]", "products = [\"p\", \"q\"]"),
        rule("product publishes an API", &[GW, "[[products]]\nname = \"p\"\nsubscription_required = false\n[[products]]\nname = \"lonely\"\n", API, "products = [\"p\"]\n"],
            "name = ^\"lonely\"", "products[1].name", "product `lonely` publishes no API")
            .fix("products = [\"p\"]", "products = [\"p\", \"lonely\"]"),
        rule("products do not list APIs", &[GW, "[[products]]\nname = \"p\"\nsubscription_required = false\napis = [\"a\"]\n", API, "products = [\"p\"]\n"],
            "apis = ^[\"a\"]", "products[0].apis", "a product does not list its APIs: each API lists its products")
            .fix("apis = [\"a\"]\n", ""),
        rule("at most one open product per API", &[GW, "[[products]]\nname = \"o1\"\nsubscription_required = false\n[[products]]\nname = \"o2\"\nsubscription_required = false\n", API, "products = [\"o1\", \"o2\"]\n"],
            "products = [^\"o1\"", "apis[0].products", "an API can be in at most one open product (subscription_required = false); `a` is in `o1`, `o2`")
            .fix("name = \"o2\"\nsubscription_required = false\n", "name = \"o2\"\n"),
        rule("subscription names unique across products", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_sha256 = \"", SHA1, "\"\n[[products]]\nname = \"q\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_sha256 = \"", SHA2, "\"\n", API, "products = [\"p\", \"q\"]\n"],
            "name = ^\"s\"\nprimary_key_sha256 = \"66eb", "products[1].subscriptions[0].name", "duplicate subscription name `s` (first used by products[0].subscriptions[0])")
            .fix("name = \"s\"\nprimary_key_sha256 = \"66eb", "name = \"t\"\nprimary_key_sha256 = \"66eb"),
        rule("subscription max_connections = 0", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nmax_connections = 0\nprimary_key_sha256 = \"", SHA1, "\"\n", API, "products = [\"p\"]\n"],
            "max_connections = ^0", "products[0].subscriptions[0].max_connections", "must be at least 1")
            .fix("max_connections = 0", "max_connections = 1"),
        rule("a key in one place (env and sha256)", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_env = \"TOLLGATE_ROW_LONG\"\nprimary_key_sha256 = \"", SHA1, "\"\n", API, "products = [\"p\"]\n"],
            "primary_key_env = ^\"TOLLGATE_ROW_LONG\"", "products[0].subscriptions[0].primary_key_env", "subscription `s` has its primary key in more than one place")
            .fix("primary_key_env = \"TOLLGATE_ROW_LONG\"\n", ""),
        rule("a key in one place (sha256 and keys file)", &["[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nsubscription_keys_file = \"keys.toml\"\n[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_sha256 = \"", SHA1, "\"\n", API, "products = [\"p\"]\n"],
            "primary_key_sha256 = ^\"", "products[0].subscriptions[0].primary_key_sha256", "subscription `s` has its primary key in more than one place")
            .file(text("keys.toml", "[s]\nprimary = \"0123456789abcdef0123\"\n"))
            .fix_in("keys.toml", "[s]\nprimary = \"0123456789abcdef0123\"\n", ""),
        rule("a key in at least one place", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\n", API, "products = [\"p\"]\n"],
            "^[[products.subscriptions]]", "products[0].subscriptions[0]", "subscription `s` has no key")
            .fix("name = \"s\"\n", "name = \"s\"\nprimary_key_sha256 = \"1bd8fd47297046f993e608e398d5905b00a33e163c6b1172dd38887fed05ed6a\"\n"),
        rule("key at least 16 characters (env)", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_env = \"TOLLGATE_ROW_SHORT\"\n", API, "products = [\"p\"]\n"],
            "primary_key_env = ^\"TOLLGATE_ROW_SHORT\"", "products[0].subscriptions[0].primary_key_env", "environment variable `TOLLGATE_ROW_SHORT`: a subscription key must have at least 16 characters")
            .fix("TOLLGATE_ROW_SHORT", "TOLLGATE_ROW_LONG"),
        rule("key printable without spaces (env)", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nsecondary_key_env = \"TOLLGATE_ROW_SPACES\"\n", API, "products = [\"p\"]\n"],
            "secondary_key_env = ^\"TOLLGATE_ROW_SPACES\"", "products[0].subscriptions[0].secondary_key_env", "must be printable ASCII without spaces")
            .fix("TOLLGATE_ROW_SPACES", "TOLLGATE_ROW_LONG"),
        rule("key environment variable set", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_env = \"TOLLGATE_ROW_UNSET\"\n", API, "products = [\"p\"]\n"],
            "primary_key_env = ^\"TOLLGATE_ROW_UNSET\"", "products[0].subscriptions[0].primary_key_env", "environment variable `TOLLGATE_ROW_UNSET` is not set")
            .fix("TOLLGATE_ROW_UNSET", "TOLLGATE_ROW_LONG"),
        rule("key sha256 is 64 hex digits", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_sha256 = \"abc\"\n", API, "products = [\"p\"]\n"],
            "primary_key_sha256 = ^\"abc\"", "products[0].subscriptions[0].primary_key_sha256", "must be 64 hex digits")
            .fix("\"abc\"", "\"1bd8fd47297046f993e608e398d5905b00a33e163c6b1172dd38887fed05ed6a\""),
        rule("key at least 16 characters (keys file)", &["[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nsubscription_keys_file = \"keys.toml\"\n[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\n", API, "products = [\"p\"]\n"],
            "primary = ^\"short-secret\"", "s.primary", "a subscription key must have at least 16 characters")
            .file(text("keys.toml", "[s]\nprimary = \"short-secret\"\n"))
            .error_in("keys.toml")
            .fix_in("keys.toml", "short-secret", "0123456789abcdef0123"),
        rule("keys-file entries name a subscription", &["[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nsubscription_keys_file = \"keys.toml\"\n[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\n", API, "products = [\"p\"]\n"],
            "[^nobody]", "nobody", "no subscription is named `nobody` in the manifest")
            .file(text("keys.toml", "[s]\nprimary = \"0123456789abcdef0123\"\n[nobody]\nprimary = \"fedcba9876543210fedc\"\n"))
            .error_in("keys.toml")
            .fix_in("keys.toml", "[nobody]\nprimary = \"fedcba9876543210fedc\"\n", ""),
        rule("a key identifies one subscription", &[GW, "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_sha256 = \"", SHA1, "\"\n[[products.subscriptions]]\nname = \"t\"\nprimary_key_sha256 = \"", SHA1, "\"\n", API, "products = [\"p\"]\n"],
            "^[[products.subscriptions]]\nname = \"t\"", "products[0].subscriptions[1]", "subscriptions `s` and `t` have the same key")
            .fix("name = \"t\"\nprimary_key_sha256 = \"1bd8fd47297046f993e608e398d5905b00a33e163c6b1172dd38887fed05ed6a\"",
                 "name = \"t\"\nprimary_key_sha256 = \"66ebc374d4ade67915932d22ecab4e69974a050df3ee028181601c5b44c45c81\""),
        // Attachments (manifest checks).
        rule("policies need plugin_dir", &[GW, API, SET_HEADER],
            "^[gateway]", "gateway.plugin_dir", "policies are attached but no plugin_dir is set")
            .file(set_header_plugin())
            .fix("listen = \"127.0.0.1:0\"\n", "listen = \"127.0.0.1:0\"\nplugin_dir = \"plugins\"\n"),
        rule("failure_status at least 400", &[GW_PLUGINS, API, SET_HEADER, "failure_status = 399\n"],
            "failure_status = ^399", "apis[0].on_handshake[0].failure_status", "must be between 400 and 599")
            .file(set_header_plugin())
            .fix("= 399", "= 400"),
        rule("failure_status at most 599", &[GW_PLUGINS, API, SET_HEADER, "failure_status = 600\n"],
            "failure_status = ^600", "apis[0].on_handshake[0].failure_status", "must be between 400 and 599")
            .file(set_header_plugin())
            .fix("= 600", "= 599"),
        rule("policy timeout is a duration", &[GW_PLUGINS, API, SET_HEADER, "timeout = \"soon\"\n"],
            "timeout = ^\"soon\"", "apis[0].on_handshake[0].timeout", "`soon` is not a duration")
            .file(set_header_plugin())
            .fix("\"soon\"", "\"1s\""),
        rule("policy timeout more than 0", &[GW_PLUGINS, API, SET_HEADER, "timeout = \"0s\"\n"],
            "timeout = ^\"0s\"", "apis[0].on_handshake[0].timeout", "must be more than 0")
            .file(set_header_plugin())
            .fix("\"0s\"", "\"1s\""),
        rule("policy cpu_time a duration", &[GW_PLUGINS, API, SET_HEADER, "cpu_time = \"lots\"\n"],
            "cpu_time = ^\"lots\"", "apis[0].on_handshake[0].cpu_time", "is not a duration")
            .file(set_header_plugin())
            .fix("\"lots\"", "\"20ms\""),
        rule("fuel replaced by cpu_time", &[GW_PLUGINS, API, SET_HEADER, "fuel = 50000000\n"],
            "fuel = ^50000000", "apis[0].on_handshake[0].fuel", "`cpu_time`")
            .file(set_header_plugin())
            .fix("fuel = 50000000", "cpu_time = \"50ms\""),
        rule("instances fresh or pooled", &[GW_PLUGINS, API, SET_HEADER, "instances = \"warm\"\n"],
            "instances = ^\"warm\"", "apis[0].on_handshake[0].instances", "`warm` is not an instance strategy")
            .file(set_header_plugin())
            .fix("\"warm\"", "\"pooled\""),
        rule("pool_max_uses only when pooled", &[GW_PLUGINS, API, SET_HEADER, "pool_max_uses = 5\n"],
            "pool_max_uses = ^5", "apis[0].on_handshake[0].pool_max_uses", "only applies with instances = \"pooled\"")
            .file(set_header_plugin())
            .fix("pool_max_uses = 5\n", "instances = \"pooled\"\npool_max_uses = 5\n"),
        rule("pool_max_uses at least 1", &[GW_PLUGINS, API, SET_HEADER, "instances = \"pooled\"\npool_max_uses = 0\n"],
            "pool_max_uses = ^0", "apis[0].on_handshake[0].pool_max_uses", "must be at least 1")
            .file(set_header_plugin())
            .fix("pool_max_uses = 0", "pool_max_uses = 1"),
        rule("plugin named", &[GW_PLUGINS, API, "[[apis.on_handshake]]\nplugin = \"\"\n"],
            "plugin = ^\"\"", "apis[0].on_handshake[0].plugin", "must name a plugin")
            .file(set_header_plugin())
            .fix("plugin = \"\"\n", "plugin = \"set-header\"\nconfig = { name = \"X-A\", value = \"v\" }\n"),
        rule("read_dirs not absolute", &[GW_PLUGINS, API, SET_HEADER, "grants = { read_dirs = [\"/etc\"] }\n"],
            "read_dirs = [^\"/etc", "apis[0].on_handshake[0].grants.read_dirs[0]", "`/etc` must be a relative path below the manifest's directory")
            .file(set_header_plugin())
            .file(Extra::Dir("keys"))
            .fix("/etc", "keys"),
        rule("read_dirs not above the manifest", &[GW_PLUGINS, API, SET_HEADER, "grants = { read_dirs = [\"keys/../..\"] }\n"],
            "read_dirs = [^\"keys/../..", "apis[0].on_handshake[0].grants.read_dirs[0]", "`keys/../..` must be a relative path below the manifest's directory")
            .file(set_header_plugin())
            .file(Extra::Dir("keys"))
            .fix("keys/../..", "keys"),
        rule("read_dirs exist", &[GW_PLUGINS, API, SET_HEADER, "grants = { read_dirs = [\"missing\"] }\n"],
            "read_dirs = [^\"missing", "apis[0].on_handshake[0].grants.read_dirs[0]", "missing` is not a directory")
            .file(set_header_plugin())
            .file(Extra::Dir("keys"))
            .fix("missing", "keys"),
        rule("read_dirs not a symlink out of the manifest's directory", &[GW_PLUGINS, API, SET_HEADER, "grants = { read_dirs = [\"etc-link\"] }\n"],
            "read_dirs = [^\"etc-link", "apis[0].on_handshake[0].grants.read_dirs[0]", "`etc-link` leads outside the manifest's directory")
            .file(set_header_plugin())
            .file(Extra::Dir("keys"))
            .file(Extra::Symlink("etc-link", "/etc"))
            .fix("etc-link", "keys"),
        // Plugins (checked after the manifest: load, scope, config).
        rule("attached plugin exists", &[GW_PLUGINS, API, "[[apis.on_handshake]]\nplugin = \"nope\"\n"],
            "plugin = ^\"nope\"", "apis[0].on_handshake[0].plugin", "plugin `nope` (attached at API `a` onHandshake) was not found in plugin_dir")
            .file(set_header_plugin())
            .fix("plugin = \"nope\"\n", "plugin = \"set-header\"\nconfig = { name = \"X-A\", value = \"v\" }\n"),
        rule("plugin names unique in plugin_dir", &[GW_PLUGINS, API, SET_HEADER],
            "plugin_dir = ^\"plugins\"", "gateway.plugin_dir", "already declared by")
            .file(Extra::Copy("plugins/one.wasm", plugins::built().join("set_header.wasm")))
            .file(Extra::Copy("plugins/two.wasm", plugins::built().join("set_header.wasm")))
            .file(Extra::Copy("plugins2/one.wasm", plugins::built().join("set_header.wasm")))
            .fix("\"plugins\"", "\"plugins2\""),
        rule("plugin_dir readable", &[GW_PLUGINS, API, SET_HEADER],
            "plugin_dir = ^\"plugins\"", "gateway.plugin_dir", "cannot read directory")
            .file(Extra::Copy("plugins2/set_header.wasm", plugins::built().join("set_header.wasm")))
            .fix("\"plugins\"", "\"plugins2\""),
        rule("onHandshake refuses unsupported capabilities", &[GW_PLUGINS, API, "[[apis.on_handshake]]\nplugin = \"declares-set-body\"\n"],
            "plugin = ^\"declares-set-body\"", "apis[0].on_handshake[0].plugin", "declares capability `set-body`")
            .file(set_body_plugin())
            // The same plugin inherited from the global scope loads (and is skipped).
            .fix("[[apis.on_handshake]]\nplugin = \"declares-set-body\"", "[[policies]]\nplugin = \"declares-set-body\""),
        rule("plugin validates its config", &[GW_PLUGINS, API, "[[apis.on_handshake]]\nplugin = \"set-header\"\nconfig = { name = \"X-A\", value = \"v\", exists_action = \"sometimes\" }\n"],
            "config = ^{", "apis[0].on_handshake[0].config", "plugin `set-header` refused its config")
            .file(set_header_plugin())
            .fix("\"sometimes\"", "\"override\""),
    ]
}

/// README ("Commands", "Products and subscriptions", the manifest reference): `tollgate check`
/// exits 1 listing every error as `file:line:column: key `k`: message`, each row at its exact
/// position, and the fixed manifest passes.
#[test]
fn every_documented_rule_names_file_line_and_key() {
    let rows = rules();
    let mut failures = Vec::new();
    for r in &rows {
        if let Err(e) = run_row(r) {
            failures.push(format!("[{}] {e}", r.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rules failed:\n\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n\n")
    );
}

/// One manifest breaking many rules: every error is listed, each at its own key, and counted.
#[test]
fn every_error_of_one_manifest_is_listed() {
    let manifest = [
        "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nsubscription_keys_file = \"keys.toml\"\n",
        "[gateway.limits]\nmax_header_bytes = 100\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = \"abc\"\n",
        "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\nprimary_key_env = \"TOLLGATE_ROW_SHORT\"\n",
        "[[products]]\nname = \"p\"\n",
        "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"http://h/\"\nproducts = [\"p\", \"gold\"]\n",
        "[[apis]]\nname = \"a\"\nurl_suffix = \"/a/\"\nbackend = \"ws://h/\"\nschemes = [\"ws\", \"tcp\"]\n",
    ]
    .concat();
    let keys = "[nobody]\nprimary = \"fedcba9876543210fedc\"\n";
    let r = rule("several", &[manifest.as_str()], "", "", "").file(text("keys.toml", keys));
    let (dir, code, err, path) = r.check();
    assert_eq!(code, 1, "{err}");
    let expected: &[(&str, &str, &str, &str)] = &[
        (
            "m.toml",
            "max_header_bytes = ^100",
            "gateway.limits.max_header_bytes",
            "at least 8192",
        ),
        (
            "m.toml",
            "token_sha256 = ^\"abc\"",
            "admin.token_sha256",
            "64 hex digits",
        ),
        (
            "m.toml",
            "primary_key_env = ^\"TOLLGATE_ROW_SHORT\"",
            "products[0].subscriptions[0].primary_key_env",
            "at least 16 characters",
        ),
        (
            "m.toml",
            "name = ^\"p\"\n[[apis]]",
            "products[1].name",
            "duplicate product name `p`",
        ),
        (
            "m.toml",
            "backend = ^\"http://h/\"",
            "apis[0].backend",
            "must be ws or wss",
        ),
        (
            "m.toml",
            "^\"gold\"",
            "apis[0].products",
            "product `gold` is not defined",
        ),
        (
            "m.toml",
            "name = ^\"a\"\nurl_suffix = \"/a/\"",
            "apis[1].name",
            "duplicate API name `a`",
        ),
        (
            "m.toml",
            "url_suffix = ^\"/a/\"",
            "apis[1].url_suffix",
            "duplicate url_suffix `a`",
        ),
        (
            "m.toml",
            "schemes = ^[",
            "apis[1].schemes",
            "unknown scheme `tcp`",
        ),
        (
            "keys.toml",
            "[^nobody]",
            "nobody",
            "no subscription is named `nobody`",
        ),
    ];
    let mut failures = Vec::new();
    for (file, at, key, says) in expected {
        let text = if *file == "m.toml" {
            manifest.as_str()
        } else {
            keys
        };
        if let Err(e) = expect_error(&err, dir.path(), file, text, at, key, says) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- stderr:\n{err}",
        failures.join("\n")
    );
    assert_eq!(
        err.lines().last(),
        Some(format!("{} error(s) in {path}", expected.len()).as_str()),
        "{err}"
    );
    assert!(
        !err.contains("short-secret") && !err.contains("fedcba9876543210fedc"),
        "a key was echoed:\n{err}"
    );
}

/// README "Commands": "listing every error" holds for the semantic checks, but a parse error
/// (unknown key, wrong type) stops at the first and hides every other error.
#[test]
#[ignore = "known bug: only the first parse error is listed, and it hides the semantic errors"]
fn parse_errors_do_not_hide_the_other_errors() {
    let manifest = [
        GW,
        "lisen = \"x\"\ncolour = 1\n",
        "[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"http://h/\"\n",
    ]
    .concat();
    let (dir, code, err, _) = rule("parse", &[manifest.as_str()], "", "", "").check();
    assert_eq!(code, 1, "{err}");
    let mut failures = Vec::new();
    for (at, key, says) in [
        ("^lisen", "lisen", "unknown field `lisen`"),
        ("^colour", "colour", "unknown field `colour`"),
        (
            "backend = ^\"http://h/\"",
            "apis[0].backend",
            "must be ws or wss",
        ),
    ] {
        if let Err(e) = expect_error(&err, dir.path(), "m.toml", &manifest, at, key, says) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n--- stderr:\n{err}",
        failures.join("\n")
    );
}

/// One documented warning: a manifest that gets it, what the `WARN` line must say, and an edit
/// after which there is no warning at all.
struct Warning {
    name: &'static str,
    manifest: String,
    files: Vec<Extra>,
    says: &'static [&'static str],
    quiet: (&'static str, &'static str),
}

/// README "Commands": warnings that do not stop a start (an inherited policy that will be
/// skipped, `insecure_skip_verify`, a keys file others can read, an admin listener on a
/// non-loopback address without a token, a plugin's own load-time warnings) are printed to
/// stderr as `WARN` lines, and `check` still exits 0.
#[test]
fn documented_warnings_are_printed_and_do_not_fail() {
    let jwt = "[[apis.on_handshake]]\nplugin = \"jwt-validate\"\nconfig = { algorithms = [\"HS256\"], jwks = { keys = [{ kty = \"oct\", k = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY\" }] } }\n";
    let subscribed = "[[products]]\nname = \"p\"\n[[products.subscriptions]]\nname = \"s\"\n[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://h/\"\nproducts = [\"p\"]\n";
    let key = "[s]\nprimary = \"0123456789abcdef0123\"\n";
    let rows = vec![
        Warning {
            name: "inherited policy that will be skipped",
            manifest: [GW_PLUGINS, API, "[[policies]]\nplugin = \"declares-set-body\"\n"].concat(),
            files: vec![set_body_plugin()],
            says: &["will be skipped", "plugin=declares-set-body", "capability=set-body", "scope=global"],
            quiet: ("[[policies]]\nplugin = \"declares-set-body\"\n", ""),
        },
        Warning {
            name: "insecure_skip_verify",
            manifest: [GW, WSS_API, "insecure_skip_verify = true\n"].concat(),
            files: vec![],
            says: &["insecure_skip_verify is set", "NOT verified", "api=a"],
            quiet: ("insecure_skip_verify = true\n", ""),
        },
        Warning {
            name: "keys file others can read",
            manifest: [GW, "subscription_keys_file = \"keys-open.toml\"\n", subscribed].concat(),
            files: vec![
                Extra::Text("keys-open.toml", key.to_owned(), 0o644),
                Extra::Text("keys.toml", key.to_owned(), 0o600),
            ],
            says: &["keys file can be read by other users", "keys-open.toml", "mode=644"],
            quiet: ("keys-open.toml", "keys.toml"),
        },
        Warning {
            name: "admin on a non-loopback address without a token",
            manifest: [GW, "[admin]\nlisten = \"0.0.0.0:0\"\n", API].concat(),
            files: vec![],
            says: &["admin listener on a non-loopback address without a token", "addr=0.0.0.0:0"],
            quiet: ("listen = \"0.0.0.0:0\"\n", "listen = \"0.0.0.0:0\"\ntoken_sha256 = \"ca8d40e6ce4716b552f1c69863335b502f2afb57ffae171d6675fd56d91ca5b2\"\n"),
        },
        Warning {
            name: "plugin load-time warning (jwt-validate without issuers or audiences)",
            manifest: [GW_PLUGINS, API, jwt].concat(),
            files: vec![Extra::Copy("plugins/jwt_validate.wasm", plugins::built().join("jwt_validate.wasm"))],
            says: &["neither issuers nor audiences is set", "plugin=\"jwt-validate\""],
            quiet: ("algorithms = [\"HS256\"],", "algorithms = [\"HS256\"], audiences = [\"chat\"],"),
        },
        Warning {
            name: "log_query_values = true",
            manifest: [GW, "log_query_values = true\n", API].concat(),
            files: vec![],
            says: &["log_query_values = true: query values (tokens, keys) are written to the logs"],
            quiet: ("log_query_values = true", "log_query_values = false"),
        },
    ];
    let mut failures = Vec::new();
    for w in &rows {
        let loud = Rule {
            files: w.files.clone(),
            ..rule(w.name, &[&w.manifest], "", "", "")
        };
        let (_dir, code, err, _) = loud.check();
        let warned = err
            .lines()
            .any(|l| l.contains("WARN") && w.says.iter().all(|s| l.contains(s)));
        if code != 0 || !warned || err.contains("error(s)") {
            failures.push(format!(
                "[{}] expected exit 0 and a WARN line saying {:?}; exit {code}:\n{err}",
                w.name, w.says
            ));
            continue;
        }
        match loud.fix(w.quiet.0, w.quiet.1).fixed() {
            Ok(quiet) => {
                let (_dir, code, err, _) = quiet.check();
                if code != 0 || err.contains("WARN") {
                    failures.push(format!(
                        "[{}] without the cause: expected exit 0 and no WARN; exit {code}:\n{err}",
                        w.name
                    ));
                }
            }
            Err(e) => failures.push(format!("[{}] {e}", w.name)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} warnings failed:\n\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n\n")
    );
}
