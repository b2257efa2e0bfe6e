//! The process's file-descriptor limit. Every proxied connection holds two descriptors (client
//! and backend), so the usual soft limit of 1,024 caps a gateway at about 500 connections,
//! whatever `max_connections` says. Container runtimes differ here (containerd 2.x leaves
//! containers at systemd's 1,024 soft / 524,288 hard; Kubernetes has no field for it), so the
//! gateway raises its soft limit to the hard one at start, as the Go runtime and nginx's
//! `worker_rlimit_nofile` do: the hard limit is the operator's ceiling, the soft one only a
//! default for programs that never asked. Written against libc directly: two calls, no crate
//! needed.

/// The `nofile` limits before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise() -> std::io::Result<Nofile> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(Nofile {
        soft_before,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    })
}

/// Raises the limit and logs the outcome (`nofile`): what the gateway can hold is worth a line
/// at start, and a limit still low is worth a warning.
pub fn raise_and_log(max_connections: usize) {
    match raise() {
        Ok(n) => {
            // Two per connection, plus listeners, the admin's, plugins' and logs' own.
            let needed = (max_connections as u64)
                .saturating_mul(2)
                .saturating_add(64);
            if n.soft < needed {
                tracing::warn!(event = "nofile", soft = n.soft, hard = n.hard, soft_before = n.soft_before,
                    needed, "the descriptor limit is below what max_connections needs (two per connection); raise the hard nofile limit");
            } else {
                tracing::info!(
                    event = "nofile",
                    soft = n.soft,
                    hard = n.hard,
                    soft_before = n.soft_before,
                    "descriptor limit (soft raised to hard)"
                );
            }
        }
        Err(e) => {
            tracing::warn!(event = "nofile", error = %e, "cannot raise the descriptor limit")
        }
    }
}
