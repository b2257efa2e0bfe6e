//! Gives memory back to the system after a burst of connections has ended.
//!
//! glibc's malloc keeps what it freed in its arenas (one per worker thread) for reuse: after
//! 5,000 connections open and close, the gateway's resident memory stays near its peak (+35 to
//! +55 MiB measured in `tests/e2e/misbehaving_clients.rs`) although nothing is leaked. Users
//! read RSS as the gateway's size, and a container's memory limit counts it. `malloc_trim(0)`
//! returns the free pages of every arena; it costs a walk of the free lists, so it runs only
//! when the connection count has fallen well below its last peak, at most every few seconds,
//! on a blocking thread. Other allocators (musl's, or jemalloc/mimalloc) return memory by
//! themselves; there this task does nothing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the connection count is compared with its peak.
const EVERY: Duration = Duration::from_secs(5);
/// A peak below this many connections is not worth a trim.
const MIN_PEAK: usize = 256;

/// Whether a trim is due: the connections alive now are at most half of the peak seen since
/// the last trim, and that peak was large.
fn due(peak: usize, now: usize) -> bool {
    peak >= MIN_PEAK && now <= peak / 2
}

/// The peak number of connections since the last trim. The accept loop reports to it after
/// every accepted socket (one atomic max), so a burst shorter than the check interval is seen.
#[derive(Default)]
pub(crate) struct Bursts {
    peak: AtomicUsize,
}

impl Bursts {
    /// `live`: connection tasks alive now (handshakes in progress and relays).
    pub(crate) fn saw(&self, live: usize) {
        self.peak.fetch_max(live, Ordering::Relaxed);
    }
}

/// Runs until `shutdown`: trims once the live connections (the tracker's tasks, one per
/// accepted socket) have fallen to half of their peak.
pub(crate) async fn trim_after_bursts(
    bursts: Arc<Bursts>,
    connections: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = connections.len();
        if due(bursts.peak.load(Ordering::Relaxed), now) {
            let _ = tokio::task::spawn_blocking(trim).await;
            // A peak reported meanwhile is lost; that only delays the next trim.
            bursts.peak.store(now, Ordering::Relaxed);
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no
    // pointer from us and is safe to call from any thread at any time.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(
        released = released != 0,
        "malloc_trim after a fall in connections"
    );
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::due;

    #[test]
    fn a_trim_follows_a_large_fall_only() {
        assert!(due(5000, 0));
        assert!(due(5000, 2500));
        assert!(!due(5000, 2501));
        assert!(due(256, 128));
        assert!(!due(255, 0), "a small peak is not worth it");
        assert!(!due(0, 0));
    }
}
