//! The gateway's counters, for `GET /metrics` (CONTRACT §3) and the periodic log line:
//! plain atomics and fixed-bucket histograms, cheap enough for the hot path (one relaxed add
//! per batch or per reading).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use calwatch_protocol::{AlertKind, AlertState, RejectReason};

use crate::domain::DeviceKind;
use crate::health::IngestHealth;

/// Why a message or a reading was refused, besides the decoder's [`RejectReason`]s.
pub(crate) const INGEST_REJECT_REASONS: [&str; 5] = [
    "bad_topic",
    "agent_mismatch",
    "unknown_device",
    "unassigned",
    "bad_status",
];

const DEVICE_KINDS: [DeviceKind; 4] = [
    DeviceKind::Scale,
    DeviceKind::Dispenser,
    DeviceKind::EnergyMeter,
    DeviceKind::Other,
];

const ALERT_STATES: [AlertState; 3] = [
    AlertState::Active,
    AlertState::Acknowledged,
    AlertState::Resolved,
];

/// Upper bounds of the latency buckets, seconds (a batch takes µs to ms).
pub(crate) const LATENCY_BOUNDS_S: [f64; 9] =
    [1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1];

/// A latency histogram with fixed buckets ([`LATENCY_BOUNDS_S`]) and an overflow bucket.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_S.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS_S
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BOUNDS_S.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Observations per bucket (not cumulative; the last is beyond the largest bound).
    pub fn counts(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }

    pub fn count(&self) -> u64 {
        self.counts().iter().sum()
    }

    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        let counts = self.counts();
        for (bound, n) in LATENCY_BOUNDS_S.iter().zip(&counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += counts.last().copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum().as_secs_f64());
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Counters of one sink target.
#[derive(Debug, Default)]
pub struct SinkMetrics {
    /// The target's name (its queue directory).
    pub name: String,
    /// Records (chunks of line protocol) in its queue, not yet acknowledged by the store.
    pub queue_records: AtomicU64,
    /// Bytes of its queue's segment files.
    pub queue_bytes: AtomicU64,
    /// Lines the store accepted.
    pub lines_written: AtomicU64,
    /// HTTP requests that succeeded.
    pub requests: AtomicU64,
    /// Requests that failed and were retried (connection errors, 5xx, 429, ...).
    pub retries: AtomicU64,
    /// Lines the store refused as bad data, written to the dead-letter file.
    pub dead_lettered: AtomicU64,
    /// Times ingest waited because this target's queue was full (backpressure).
    pub full_waits: AtomicU64,
}

impl SinkMetrics {
    pub fn new(name: &str) -> SinkMetrics {
        SinkMetrics {
            name: name.to_owned(),
            ..SinkMetrics::default()
        }
    }
}

/// Every counter of a running gateway.
#[derive(Debug)]
pub struct Metrics {
    /// MQTT messages on the readings topics, accepted or not.
    pub messages: AtomicU64,
    /// Batches decoded and accepted.
    pub batches: AtomicU64,
    /// Readings in accepted batches, before assignment and dedup.
    pub readings_in: AtomicU64,
    /// Readings checked and written (after dedup).
    pub readings_checked: AtomicU64,
    /// Readings dropped as duplicates (seq at or below the device's last).
    pub duplicates: AtomicU64,
    /// Sequence numbers skipped.
    pub gaps: AtomicU64,
    /// Bursts (groups of MQTT messages) made durable and acknowledged.
    pub bursts: AtomicU64,
    /// Sweeps run.
    pub sweeps: AtomicU64,
    rejected: Vec<(&'static str, AtomicU64)>,
    checks: [AtomicU64; DEVICE_KINDS.len()],
    alerts: [[AtomicU64; ALERT_STATES.len()]; AlertKind::ALL.len()],
    /// Decoding one batch.
    pub decode_latency: Histogram,
    /// Dedup, checks and line protocol of one batch.
    pub check_latency: Histogram,
    /// Spool append + sync and the state commit of one burst.
    pub commit_latency: Histogram,
    /// Per target, in configuration order.
    pub sinks: Vec<Arc<SinkMetrics>>,
    /// Ingest progress, for `/healthz` and the watchdog.
    pub health: IngestHealth,
}

impl Metrics {
    pub fn new(sinks: Vec<Arc<SinkMetrics>>) -> Metrics {
        let rejected = RejectReason::ALL
            .iter()
            .map(|r| r.as_str())
            .chain(INGEST_REJECT_REASONS)
            .map(|r| (r, AtomicU64::new(0)))
            .collect();
        Metrics {
            messages: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            readings_in: AtomicU64::new(0),
            readings_checked: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            bursts: AtomicU64::new(0),
            sweeps: AtomicU64::new(0),
            rejected,
            checks: Default::default(),
            alerts: Default::default(),
            decode_latency: Histogram::default(),
            check_latency: Histogram::default(),
            commit_latency: Histogram::default(),
            sinks,
            health: IngestHealth::new(crate::domain::now_ms()),
        }
    }

    /// Counts `n` refused for `reason` (a [`RejectReason`] name or one of
    /// [`INGEST_REJECT_REASONS`]).
    pub fn reject(&self, reason: &str, n: u64) {
        if let Some((_, c)) = self.rejected.iter().find(|(r, _)| *r == reason) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Refused so far for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, c)| c.load(Ordering::Relaxed))
    }

    /// Counts `n` readings of devices of `kind` checked.
    pub fn checked(&self, kind: DeviceKind, n: u64) {
        self.checks[kind_index(kind)].fetch_add(n, Ordering::Relaxed);
    }

    /// Readings of devices of `kind` checked so far.
    pub fn checks(&self, kind: DeviceKind) -> u64 {
        self.checks[kind_index(kind)].load(Ordering::Relaxed)
    }

    /// Counts an alert event (a transition).
    pub fn alert(&self, kind: AlertKind, state: AlertState) {
        self.alerts[kind as usize][state_index(state)].fetch_add(1, Ordering::Relaxed);
    }

    /// Alert events of `kind` in `state` so far.
    pub fn alerts(&self, kind: AlertKind, state: AlertState) -> u64 {
        self.alerts[kind as usize][state_index(state)].load(Ordering::Relaxed)
    }

    /// One line for the log.
    pub fn summary(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let rejected: u64 = self.rejected.iter().map(|(_, c)| get(c)).sum();
        let mut s = format!(
            "readings_in={} readings_checked={} duplicates={} gaps={} rejected={rejected} batches={} bursts={}",
            get(&self.readings_in),
            get(&self.readings_checked),
            get(&self.duplicates),
            get(&self.gaps),
            get(&self.batches),
            get(&self.bursts),
        );
        for (reason, c) in &self.rejected {
            let n = get(c);
            if n > 0 {
                let _ = write!(s, " rejected[{reason}]={n}");
            }
        }
        let ((waiting, _), (peak, peak_bytes)) =
            (self.health.pending(), self.health.peak_pending());
        let _ = write!(
            s,
            " pending={waiting} peak_pending={peak}/{peak_bytes}B shed={}",
            self.health.shed_count()
        );
        for sink in &self.sinks {
            let _ = write!(
                s,
                " queue[{}]={}/{}B dead_letter[{}]={}",
                sink.name,
                get(&sink.queue_records),
                get(&sink.queue_bytes),
                sink.name,
                get(&sink.dead_lettered)
            );
        }
        s
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(8192);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "calwatch_messages_total",
            "MQTT messages received on the readings topics",
            get(&self.messages),
        );
        counter(
            "calwatch_batches_total",
            "Reading batches accepted",
            get(&self.batches),
        );
        counter(
            "calwatch_readings_in_total",
            "Readings in accepted batches",
            get(&self.readings_in),
        );
        counter(
            "calwatch_readings_checked_total",
            "Readings checked after dedup",
            get(&self.readings_checked),
        );
        counter(
            "calwatch_duplicates_total",
            "Readings dropped as duplicates",
            get(&self.duplicates),
        );
        counter(
            "calwatch_gaps_total",
            "Sequence numbers skipped",
            get(&self.gaps),
        );
        counter(
            "calwatch_bursts_total",
            "Bursts of MQTT messages made durable and acked",
            get(&self.bursts),
        );
        counter(
            "calwatch_sweeps_total",
            "Wall-clock sweeps run",
            get(&self.sweeps),
        );
        counter(
            "calwatch_shed_total",
            "Messages dropped unacknowledged because too much was waiting (redelivered after a reconnect)",
            self.health.shed_count(),
        );
        let (waiting, waiting_bytes) = self.health.pending();
        let _ = writeln!(
            out,
            "# HELP calwatch_ingest_pending_messages Messages received from the broker, not yet acknowledged\n\
             # TYPE calwatch_ingest_pending_messages gauge\ncalwatch_ingest_pending_messages {waiting}\n\
             # HELP calwatch_ingest_pending_bytes Payload bytes of those messages\n\
             # TYPE calwatch_ingest_pending_bytes gauge\ncalwatch_ingest_pending_bytes {waiting_bytes}\n\
             # HELP calwatch_broker_connected 1 while the broker connection is up\n\
             # TYPE calwatch_broker_connected gauge\ncalwatch_broker_connected {}",
            u8::from(self.health.is_connected())
        );
        let _ = writeln!(out, "# HELP calwatch_rejected_total Batches or readings refused, by reason\n# TYPE calwatch_rejected_total counter");
        for (reason, c) in &self.rejected {
            let _ = writeln!(
                out,
                "calwatch_rejected_total{{reason=\"{reason}\"}} {}",
                get(c)
            );
        }
        let _ = writeln!(out, "# HELP calwatch_checks_total Readings checked, by device kind\n# TYPE calwatch_checks_total counter");
        for kind in DEVICE_KINDS {
            let _ = writeln!(
                out,
                "calwatch_checks_total{{kind=\"{}\"}} {}",
                kind.as_str(),
                self.checks(kind)
            );
        }
        let _ = writeln!(out, "# HELP calwatch_alert_events_total Alert events, by kind and state\n# TYPE calwatch_alert_events_total counter");
        for kind in AlertKind::ALL {
            for state in ALERT_STATES {
                let _ = writeln!(
                    out,
                    "calwatch_alert_events_total{{kind=\"{}\",state=\"{}\"}} {}",
                    kind.as_str(),
                    state.as_str(),
                    self.alerts(kind, state)
                );
            }
        }
        let _ = writeln!(out, "# HELP calwatch_sink_queue_records Records waiting in a sink's queue\n# TYPE calwatch_sink_queue_records gauge");
        for s in &self.sinks {
            let _ = writeln!(
                out,
                "calwatch_sink_queue_records{{sink=\"{}\"}} {}",
                s.name,
                get(&s.queue_records)
            );
        }
        let _ = writeln!(out, "# HELP calwatch_sink_queue_bytes Bytes of a sink's queue on disk\n# TYPE calwatch_sink_queue_bytes gauge");
        for s in &self.sinks {
            let _ = writeln!(
                out,
                "calwatch_sink_queue_bytes{{sink=\"{}\"}} {}",
                s.name,
                get(&s.queue_bytes)
            );
        }
        for (name, help, f) in [
            (
                "calwatch_sink_lines_written_total",
                "Lines a sink's store accepted",
                (|s: &SinkMetrics| &s.lines_written) as fn(&SinkMetrics) -> &AtomicU64,
            ),
            (
                "calwatch_sink_retries_total",
                "Failed sink requests, retried",
                |s| &s.retries,
            ),
            (
                "calwatch_sink_dead_lettered_total",
                "Lines refused as bad data, in the dead-letter file",
                |s| &s.dead_lettered,
            ),
            (
                "calwatch_sink_full_waits_total",
                "Times ingest waited for a full sink queue",
                |s| &s.full_waits,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for s in &self.sinks {
                let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", s.name, get(f(s)));
            }
        }
        self.decode_latency.render(
            &mut out,
            "calwatch_decode_seconds",
            "Time to decode one batch",
        );
        self.check_latency.render(
            &mut out,
            "calwatch_check_seconds",
            "Time to dedup, check and format one batch",
        );
        self.commit_latency.render(
            &mut out,
            "calwatch_commit_seconds",
            "Time to queue and commit one burst durably",
        );
        out
    }
}

fn kind_index(kind: DeviceKind) -> usize {
    match kind {
        DeviceKind::Scale => 0,
        DeviceKind::Dispenser => 1,
        DeviceKind::EnergyMeter => 2,
        DeviceKind::Other => 3,
    }
}

fn state_index(state: AlertState) -> usize {
    match state {
        AlertState::Active => 0,
        AlertState::Acknowledged => 1,
        AlertState::Resolved => 2,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = Metrics::new(vec![Arc::new(SinkMetrics::new("influx_v1"))]);
        m.reject("syntax", 2);
        m.reject("unassigned", 1);
        m.reject("no such reason", 1);
        assert_eq!((m.rejected("syntax"), m.rejected("unassigned")), (2, 1));
        m.checked(DeviceKind::Dispenser, 3);
        m.alert(AlertKind::Drift, AlertState::Resolved);
        m.decode_latency.record(Duration::from_micros(30));
        m.decode_latency.record(Duration::from_secs(1));
        assert_eq!(m.decode_latency.count(), 2);
        let text = m.render();
        assert!(
            text.contains("calwatch_rejected_total{reason=\"syntax\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("calwatch_checks_total{kind=\"dispenser\"} 3\n"));
        assert!(text.contains("calwatch_alert_events_total{kind=\"drift\",state=\"resolved\"} 1\n"));
        assert!(
            text.contains("calwatch_decode_seconds_bucket{le=\"0.00005\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("calwatch_decode_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("calwatch_sink_queue_records{sink=\"influx_v1\"} 0\n"));
    }
}
