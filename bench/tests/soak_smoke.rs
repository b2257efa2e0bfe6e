//! `tollgate-bench soak` is how the "nothing grows" record in BENCHMARKS.md is made; this runs it
//! for half a minute against the debug gateway so the command keeps working: relays, policy
//! handshakes (and their 401s), reloads applied, samples taken, and no unexpected answer (the
//! command fails on any). The figures of such a short run mean nothing; the record's do.

mod common;

use std::path::Path;
use std::process::Command;

use common::plugins;

#[test]
fn a_short_soak_runs_clean() {
    // The gateway binary of this build (cargo builds every package's binaries before running
    // any test of the workspace; alone, `cargo build -p tollgate` first).
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
        .args(["soak", "--tollgate"])
        .arg(&tollgate)
        .arg("--plugins")
        .arg(plugins())
        .args([
            "--duration",
            "20",
            "--interval",
            "8",
            "--warmup",
            "5",
            "--relays",
            "20",
            "--handshake-rate",
            "10",
            "--reload-every",
            "4",
        ])
        .output()
        .expect("run tollgate-bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "soak failed:\n{stdout}\n{stderr}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| minute"))
        .collect();
    assert!(rows.len() >= 2, "{stdout}");
    // The last row: handshakes, 401s, messages, relay sessions and reloads all happened.
    let cells: Vec<u64> = rows[rows.len() - 1]
        .split('|')
        .map(str::trim)
        .filter_map(|c| c.parse().ok())
        .collect();
    // fds, threads, tasks, connections, handshakes, refused, messages, sessions, reloads, errors
    let [.., handshakes, refused, messages, _sessions, reloads, errors] = cells[..] else {
        panic!("unexpected row {:?}", rows[rows.len() - 1]);
    };
    assert!(handshakes > 0 && refused > 0 && messages > 0, "{stdout}");
    assert!(reloads > 0, "{stdout}");
    assert_eq!(errors, 0, "{stdout}");
    assert!(stdout.contains("RSS trend"), "{stdout}");
}
