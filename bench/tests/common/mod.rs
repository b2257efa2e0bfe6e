//! Helpers shared by the smoke tests.

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// jwt-validate and set-header for wasm32-wasip2, built the way the end-to-end tests build
/// their plugins (same target directory, so one build serves both).
pub fn plugins() -> PathBuf {
    let target = workspace().join("target").join("wasm-plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target)
        .args(["-p", "jwt-validate", "-p", "set-header"])
        .output()
        .expect("run cargo for the plugins");
    assert!(
        out.status.success(),
        "building the plugins failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("wasm32-wasip2").join("release")
}
