//! `tollgate-bench run --fleet` is how the "Fleet limits (issue 19)" figures in BENCHMARKS.md
//! are made; this runs it for a second per target against the debug gateway so the command
//! keeps working, and checks what it counts: every handshake through the clustered target is
//! one acquire in Redis, closes are given back in batches (at most one release call per close)
//! until no slot is held, and no handshake is refused. The CPU
//! figures of such a short run mean nothing. Needs `redis-server` (Debian's package, which
//! brings `redis-cli`; `scripts/test` installs it), like the fleet tests of `tests/e2e`.

use std::path::Path;
use std::process::Command;

#[test]
fn a_short_fleet_run_counts_one_acquire_per_handshake_and_gives_every_slot_back() {
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
        .args(["run", "--fleet", "--tollgate"])
        .arg(&tollgate)
        .args([
            "--only",
            "tollgate-limits,tollgate-fleet",
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
        .expect("run tollgate-bench run --fleet");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run failed:\n{stdout}\n{stderr}");
    assert!(
        !stderr.contains("not found; skipped"),
        "install redis-server (Debian's package; scripts/test does):\n{stderr}"
    );
    // Both targets measured, no refused handshake.
    for target in ["tollgate-limits", "tollgate-fleet"] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {target} |")))
            .unwrap_or_else(|| panic!("no clean row for {target}:\n{stdout}"));
        assert!(!row.contains("errors"), "{row}");
    }
    let per_handshake = |what: &str| -> f64 {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {what}")))
            .unwrap_or_else(|| panic!("no row {what}:\n{stdout}"));
        row.trim_end_matches('|')
            .rsplit('|')
            .next()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or_else(|| panic!("no figure in {row}"))
    };
    assert_eq!(per_handshake("acquire"), 1.0, "{stdout}");
    let releases = per_handshake("release");
    assert!(releases > 0.0 && releases <= 1.0, "{stdout}");
    assert!(
        stdout.contains("| every slot given back after each round | yes |"),
        "{stdout}"
    );
    assert!(!stdout.contains("does not add up"), "{stdout}");
}
