//! Builds the policy plugins the tests use from source, once per test process (cargo's own
//! lock makes concurrent test binaries wait for one build). A separate target directory keeps
//! this nested cargo from waiting on the outer `cargo test`'s lock.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Packages built for wasm32-wasip2 and the file each produces.
pub const PLUGINS: &[(&str, &str)] = &[
    ("set-header", "set_header.wasm"),
    ("faulty-policy", "faulty_policy.wasm"),
    ("foreign-import", "foreign_import.wasm"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Directory holding every built plugin.
pub fn built() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = workspace().join("target").join("wasm-plugins");
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
            .arg(&target);
        for (pkg, _) in PLUGINS {
            cmd.args(["-p", pkg]);
        }
        let out = cmd.output().expect("run cargo for the test plugins");
        assert!(
            out.status.success(),
            "building test plugins failed (is the wasm32-wasip2 target installed?):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("wasm32-wasip2").join("release")
    })
}

/// Copies the named plugin files into `dir`.
pub fn install(dir: &Path, files: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    for f in files {
        std::fs::copy(built().join(f), dir.join(f)).unwrap();
    }
}
