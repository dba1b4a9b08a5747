//! The systemd service manager protocol (`sd_notify(3)`), for `Type=notify` with
//! `WatchdogSec=`: `READY=1` once the gateway serves, then `WATCHDOG=1` every half watchdog
//! period *while ingest is healthy*. A stalled ingest stops feeding the watchdog, and systemd
//! restarts the service. Without `NOTIFY_SOCKET` (not started by systemd) it does nothing.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::Metrics;

/// The socket systemd gave us, if any.
pub(crate) struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub(crate) fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_str()?.to_owned();
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
        } else {
            std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
        };
        let socket = UnixDatagram::unbound().ok()?;
        // Never block a runtime worker: a manager that does not read its socket (its
        // queue full) loses a notification, it does not stall the gateway.
        socket.set_nonblocking(true).ok()?;
        Some(Notifier { socket, addr })
    }

    pub(crate) fn notify(&self, state: &str) {
        match self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tracing::debug!(state, "service manager's socket full; notification dropped");
            }
            Err(e) => tracing::warn!(error = %e, state, "cannot notify systemd"),
        }
    }
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`, for this process).
fn watchdog_period() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `READY=1`, then feeds the watchdog while ingest is healthy, until `shutdown`.
pub(crate) async fn run(
    metrics: Arc<Metrics>,
    stall_after: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(n) = Notifier::from_env() else {
        return;
    };
    n.notify("READY=1");
    let Some(period) = watchdog_period() else {
        let _ = shutdown.wait_for(|s| *s).await;
        n.notify("STOPPING=1");
        return;
    };
    let mut tick = tokio::time::interval(period / 2);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
        match metrics.health.verdict(crate::domain::now_ms(), stall_after) {
            Ok(()) => {
                if stalled {
                    tracing::info!("ingest healthy again; feeding the systemd watchdog");
                    stalled = false;
                }
                n.notify("WATCHDOG=1");
            }
            Err(stall) => {
                if !stalled {
                    tracing::error!(reason = %stall, "ingest stalled; no longer feeding the systemd watchdog");
                    stalled = true;
                }
                n.notify(&format!("STATUS=stalled: {stall}"));
            }
        }
    }
    n.notify("STOPPING=1");
}
