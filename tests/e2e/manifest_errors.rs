//! `tollgate check` on broken manifests: exit 1, and every error names file, line and key.

mod support;

use std::process::Command;

use support::*;

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
