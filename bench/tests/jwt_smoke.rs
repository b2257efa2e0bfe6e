//! `tollgate-bench run` with the issue 21 targets (HAProxy's `jwt_verify`, and Tollgate's
//! jwt-validate + set-header with the signature cache off), for a second each against the debug
//! gateway, so they keep starting and answering: each is checked at start-up to let the run's
//! token through and refuse a forged one with 401 (the run fails otherwise), measured without
//! errors, and compared in the JWT section. The figures of such a short run mean nothing.
//! Needs `haproxy` (Debian's package; `scripts/test` installs it).

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_jwt_targets_start_verify_and_are_compared() {
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_tollgate-bench"))
        .parent()
        .expect("bench binary directory")
        .to_owned();
    let tollgate = profile_dir.join("tollgate");
    assert!(
        tollgate.exists(),
        "{} not built: run `cargo build -p tollgate` (the workspace's test run builds it)",
        tollgate.display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate-bench"))
        .args(["run", "--tollgate"])
        .arg(&tollgate)
        .arg("--plugins")
        .arg(common::plugins())
        .args([
            "--only",
            "haproxy-jwt,tollgate-policies-nocache,tollgate-pooled-nocache",
            "--handshakes-only",
            "--rounds",
            "1",
            "--duration",
            "1",
            "--connections",
            "5",
            "--idle-connections",
            "0",
            "--pending-handshakes",
            "0",
        ])
        .output()
        .expect("run tollgate-bench run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run failed:\n{stdout}\n{stderr}");
    assert!(
        !stderr.contains("skipped"),
        "install haproxy (Debian's package; scripts/test does):\n{stderr}"
    );
    for target in [
        "haproxy-jwt",
        "tollgate-policies-nocache",
        "tollgate-pooled-nocache",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {target} |")))
            .unwrap_or_else(|| panic!("no clean row for {target}:\n{stdout}"));
        assert!(row.contains(" us |"), "no CPU per handshake: {row}");
    }
    for ratio in ["pooled", "fresh"] {
        assert!(
            stdout.contains(&format!(
                "| tollgate jwt (no cache) / haproxy-jwt, {ratio} | "
            )),
            "no {ratio} ratio:\n{stdout}"
        );
    }
}
