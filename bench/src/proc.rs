//! Process accounting from /proc: CPU time and resident memory of a process and its children
//! (nginx's master and worker, for instance).

use std::fs;

/// Clock ticks per second for /proc/*/stat times. 100 on every Linux this runs on; read it from
/// `getconf` to be sure.
pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; split after its closing parenthesis.
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some(f) = stat_fields(p) {
                    // After the name: state(0) ppid(1)
                    if let Some(pp) = f.get(1).and_then(|v| v.parse().ok()) {
                        parents.push((p, pp));
                    }
                }
            }
        }
    }
    let mut i = 0;
    while i < all.len() {
        let cur = all[i];
        for (p, pp) in &parents {
            if *pp == cur && !all.contains(p) {
                all.push(*p);
            }
        }
        i += 1;
    }
    all
}

/// utime + stime of the tree, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let tck = clk_tck();
    tree(pid)
        .iter()
        .filter_map(|p| stat_fields(*p))
        .map(|f| {
            // utime is field 14 overall, i.e. index 11 after the name.
            let u: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let s: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
            (u + s) / tck
        })
        .sum()
}

/// Resident memory of the tree, in KiB.
pub fn rss_kb(pid: u32) -> u64 {
    tree(pid)
        .iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}
