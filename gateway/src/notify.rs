//! Telling a service manager and operators which process serves: the pid file
//! (`gateway.pid_file`) and systemd's readiness protocol (`NOTIFY_SOCKET`, `sd_notify(3)`).
//!
//! Both matter for binary upgrades: the new process is the old one's child, and once it
//! serves it says so (`MAINPID=` and `READY=1`; the pid file gets its pid), so a manager that
//! follows the main pid (systemd with `Type=notify` and `NotifyAccess=all`) keeps it when the
//! old process exits, and `tollgate upgrade` sees the new pid.
//!
//! Written by hand (a datagram with a few `KEY=value` lines, and a file rename) rather than
//! with a crate: the protocol is that small, and the crates for it pull in more than it.

use std::path::Path;

/// Sends `state` (newline-separated `KEY=value`) to systemd, if the gateway runs under it
/// (`NOTIFY_SOCKET` set). Best effort: a manager that is not listening changes nothing here.
pub fn systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket (Linux).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
        }
        None => socket.send_to(state.as_bytes(), Path::new(&path)),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "NOTIFY_SOCKET is set but the notification was not sent");
    }
}

/// Writes this process's pid to `file` (a new file renamed over the old one, so a reader never
/// sees it half written). Also called, with the same pid, when an upgrade fails or is ignored:
/// `tollgate upgrade` reads a rewrite that keeps the old pid as "no upgrade".
pub fn write_pid(file: &Path) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let pid = std::process::id();
    let mut name = file.as_os_str().to_owned();
    name.push(format!(".tmp.{pid}"));
    let tmp = std::path::PathBuf::from(name);
    // A file of its own, never one planted under that name (no symlink followed).
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| f.write_all(format!("{pid}\n").as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(event = "pid_file_error", file = %file.display(), error = %e,
            "cannot write the pid file");
    }
}

/// Removes `file` if it still names this process (after an upgrade it names the new one).
pub fn remove_pid(file: &Path) {
    if read_pid(file) == Some(std::process::id()) {
        let _ = std::fs::remove_file(file);
    }
}

/// The pid a pid file names: a process id (1 to `i32::MAX`), nothing else (0 or a negative
/// number would signal process groups, or every process).
pub fn read_pid(file: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    (1..=i32::MAX as u32).contains(&pid).then_some(pid)
}

/// Whether `pid` runs a `tollgate` binary (its command name), so a stale pid file reused by
/// another process is not signalled.
pub fn is_tollgate(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim_end().starts_with("tollgate"))
}
