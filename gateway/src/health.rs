//! Ingest progress for `/healthz` and the service manager's watchdog (DESIGN "The gateway
//! never stalls"): a stalled ingest must be visible, so systemd or compose restarts it.
//!
//! Ingest stamps what it does here with relaxed atomics (a few per burst); [`IngestHealth::
//! verdict`] turns the stamps into "healthy" or "stalled, because …". Ingest is stalled when,
//! for longer than `[ingest] stall_after_s`,
//! - messages are waiting (received from the broker, not yet acknowledged) and no job (burst,
//!   sweep, registry check, API command) has completed, or
//! - one job has been running (a burst waiting on a full sink queue, a disk that does not
//!   answer), or
//! - the broker connection is down.
//!
//! An idle gateway (nothing waiting, connected) is healthy however long it has been idle.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Shared between the source (the broker's event loop), the burst loop and the API.
#[derive(Debug)]
pub struct IngestHealth {
    connected: AtomicBool,
    /// When the connection went down (or the gateway started, before the first connect).
    down_since_ms: AtomicI64,
    /// Messages received and not yet acknowledged, and their payload bytes.
    pending: AtomicU64,
    pending_bytes: AtomicU64,
    /// The most messages and bytes ever waiting at once.
    peak_pending: AtomicU64,
    peak_pending_bytes: AtomicU64,
    /// Messages dropped unacknowledged because too much was waiting (the broker redelivers
    /// them after the reconnect that follows).
    shed: AtomicU64,
    /// When the last job completed (or ingest started).
    progress_ms: AtomicI64,
    /// When the running job started; 0 when none runs.
    busy_since_ms: AtomicI64,
}

/// Why ingest is not healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall(pub String);

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl IngestHealth {
    pub fn new(now_ms: i64) -> IngestHealth {
        IngestHealth {
            connected: AtomicBool::new(false),
            down_since_ms: AtomicI64::new(now_ms),
            pending: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            peak_pending: AtomicU64::new(0),
            peak_pending_bytes: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            progress_ms: AtomicI64::new(now_ms),
            busy_since_ms: AtomicI64::new(0),
        }
    }

    pub fn connected(&self) {
        self.connected.store(true, Ordering::Relaxed);
    }

    pub fn disconnected(&self, now_ms: i64) {
        if self.connected.swap(false, Ordering::Relaxed) {
            self.down_since_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// A message arrived.
    pub fn received(&self, bytes: usize) {
        let n = self.pending.fetch_add(1, Ordering::Relaxed) + 1;
        let b = self
            .pending_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed)
            + bytes as u64;
        self.peak_pending.fetch_max(n, Ordering::Relaxed);
        self.peak_pending_bytes.fetch_max(b, Ordering::Relaxed);
    }

    /// `n` messages of `bytes` were acknowledged (or dropped to be redelivered).
    pub fn done(&self, n: usize, bytes: usize) {
        self.pending.fetch_sub(n as u64, Ordering::Relaxed);
        self.pending_bytes
            .fetch_sub(bytes as u64, Ordering::Relaxed);
    }

    pub fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    /// A job starts.
    pub fn busy(&self, now_ms: i64) {
        self.busy_since_ms.store(now_ms, Ordering::Relaxed);
    }

    /// A job completed.
    pub fn progress(&self, now_ms: i64) {
        self.busy_since_ms.store(0, Ordering::Relaxed);
        self.progress_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Messages and bytes waiting now.
    pub fn pending(&self) -> (u64, u64) {
        (
            self.pending.load(Ordering::Relaxed),
            self.pending_bytes.load(Ordering::Relaxed),
        )
    }

    /// The most messages and bytes waiting at once so far.
    pub fn peak_pending(&self) -> (u64, u64) {
        (
            self.peak_pending.load(Ordering::Relaxed),
            self.peak_pending_bytes.load(Ordering::Relaxed),
        )
    }

    pub fn shed_count(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// Healthy, or why not, at `now_ms` with the given bound.
    pub fn verdict(&self, now_ms: i64, stall_after: Duration) -> Result<(), Stall> {
        let limit = i64::try_from(stall_after.as_millis()).unwrap_or(i64::MAX);
        let secs = |since: i64| (now_ms - since) / 1000;
        if !self.is_connected() {
            let since = self.down_since_ms.load(Ordering::Relaxed);
            if now_ms - since > limit {
                return Err(Stall(format!(
                    "broker connection down for {} s",
                    secs(since)
                )));
            }
        }
        let busy = self.busy_since_ms.load(Ordering::Relaxed);
        if busy != 0 && now_ms - busy > limit {
            return Err(Stall(format!(
                "one ingest job has been running for {} s (a full sink queue or a disk that does not answer)",
                secs(busy)
            )));
        }
        let (waiting, _) = self.pending();
        let last = self.progress_ms.load(Ordering::Relaxed);
        if waiting > 0 && now_ms - last > limit {
            return Err(Stall(format!(
                "no ingest progress for {} s with {waiting} messages waiting",
                secs(last)
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(60);

    #[test]
    fn idle_and_connected_is_healthy_forever() {
        let h = IngestHealth::new(0);
        h.connected();
        assert_eq!(h.verdict(10_000_000, LIMIT), Ok(()));
    }

    #[test]
    fn waiting_messages_without_progress_is_a_stall() {
        let h = IngestHealth::new(0);
        h.connected();
        h.received(100);
        assert_eq!(h.verdict(60_000, LIMIT), Ok(()));
        let e = h.verdict(61_000, LIMIT).unwrap_err();
        assert!(
            e.0.contains("no ingest progress for 61 s with 1 messages waiting"),
            "{e}"
        );
        h.progress(61_000);
        assert_eq!(h.verdict(62_000, LIMIT), Ok(()));
        h.done(1, 100);
        assert_eq!(h.pending(), (0, 0));
        assert_eq!(h.peak_pending(), (1, 100));
        assert_eq!(h.verdict(1_000_000, LIMIT), Ok(()));
    }

    #[test]
    fn a_job_that_never_ends_is_a_stall_even_with_nothing_waiting() {
        let h = IngestHealth::new(0);
        h.connected();
        h.busy(1_000);
        assert_eq!(h.verdict(61_000, LIMIT), Ok(()));
        let e = h.verdict(61_001, LIMIT).unwrap_err();
        assert!(e.0.contains("running for 60 s"), "{e}");
    }

    #[test]
    fn a_connection_down_too_long_is_a_stall_and_heals_on_connect() {
        let h = IngestHealth::new(0);
        assert!(h
            .verdict(61_000, LIMIT)
            .unwrap_err()
            .0
            .contains("down for 61 s"));
        h.connected();
        assert_eq!(h.verdict(61_000, LIMIT), Ok(()));
        h.disconnected(100_000);
        assert_eq!(h.verdict(160_000, LIMIT), Ok(()));
        assert!(h.verdict(160_001, LIMIT).is_err());
        // A second "disconnected" does not move the start of the outage.
        h.disconnected(150_000);
        assert!(h.verdict(160_001, LIMIT).is_err());
    }
}
