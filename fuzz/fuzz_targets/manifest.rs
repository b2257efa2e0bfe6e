//! The manifest parser and validator fed arbitrary text.
//!
//! Invariants: never panics; returns a config or at least one error, and every error names the
//! manifest, carries a non-empty message and, when it has a line, a line and column inside the
//! text (so an operator can jump to it).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A directory that does not exist: relative paths (plugin_dir, certificates, the keys file)
    // resolve under it and are reported missing, never read.
    let file = Path::new("/nonexistent-tollgate-fuzz/tollgate.toml");
    if let Err(errors) = tollgate_manifest::parse(file, text) {
        assert!(!errors.0.is_empty(), "an error without errors");
        let lines = text.split('\n').count();
        for e in &errors.0 {
            assert!(!e.message.is_empty(), "{e:?}");
            if e.file == file && e.line > 0 {
                assert!(
                    e.line <= lines,
                    "line {} of a {lines}-line text: {e}",
                    e.line
                );
                assert!(e.column >= 1, "{e}");
            }
        }
        let _ = errors.to_string();
    }
});
