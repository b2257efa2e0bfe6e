//! The subscription keys file (TOML, one table per subscription) fed arbitrary text, read for a
//! fixed manifest whose subscriptions take their keys from it.
//!
//! Invariants: never panics; every error is located (file, and a line inside that file's text
//! when it has one); and no error ever echoes a string the keys file holds (a key is a secret:
//! operators paste `tollgate check` output into tickets).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

const MANIFEST: &str = "[gateway]\nname = \"g\"\nlisten = \"127.0.0.1:0\"\nsubscription_keys_file = \"keys.toml\"\n\
[[products]]\nname = \"gold\"\n\
[[products.subscriptions]]\nname = \"alice\"\n\
[[products.subscriptions]]\nname = \"bob\"\n\
[[apis]]\nname = \"a\"\nurl_suffix = \"a\"\nbackend = \"ws://127.0.0.1:9/\"\nproducts = [\"gold\"]\n";

/// Every string value in a TOML document, at any depth, and every key (names are not secret
/// and are echoed on purpose: "no subscription is named `x`").
fn strings(v: &toml::Value, values: &mut Vec<String>, names: &mut Vec<String>) {
    match v {
        toml::Value::String(s) => values.push(s.clone()),
        toml::Value::Array(a) => a.iter().for_each(|x| strings(x, values, names)),
        toml::Value::Table(t) => {
            for (k, x) in t {
                names.push(k.clone());
                strings(x, values, names);
            }
        }
        _ => {}
    }
}

/// What the errors say with an empty keys file.
fn baseline() -> &'static str {
    static B: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let file = Path::new("/nonexistent-tollgate-fuzz/tollgate.toml");
        match tollgate_manifest::parse_with_keys_file(file, MANIFEST, "") {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(keys) = std::str::from_utf8(data) else {
        return;
    };
    let dir = Path::new("/nonexistent-tollgate-fuzz");
    let Err(errors) =
        tollgate_manifest::parse_with_keys_file(&dir.join("tollgate.toml"), MANIFEST, keys)
    else {
        return;
    };
    let keys_lines = keys.split('\n').count();
    let shown = errors.to_string();
    for e in &errors.0 {
        assert!(!e.message.is_empty(), "{e:?}");
        if e.file == dir.join("keys.toml") && e.line > 0 {
            assert!(e.line <= keys_lines && e.column >= 1, "{e}");
        }
    }
    let (mut secrets, mut names) = (Vec::new(), Vec::new());
    if let Ok(v) = keys.parse::<toml::Table>() {
        strings(&toml::Value::Table(v), &mut secrets, &mut names);
    }
    for s in secrets {
        // Short strings may appear in any message by chance ("a", "key"); a key has 16+.
        // A value that also is a table name, or text the errors hold anyway (key paths such as
        // `products[0].subscriptions[0]`), is not an echo.
        if s.len() >= 16
            && !names.iter().any(|n| n.contains(&s))
            && !MANIFEST.contains(&s)
            && !baseline().contains(&s)
        {
            assert!(!shown.contains(&s), "a keys file value is echoed: {shown}");
        }
    }
});
