//! Ingest: the MQTT subscription to every agent's readings → decode → assignment check →
//! dedup on (device, seq) → line protocol → sinks. A message is acknowledged only after
//! its readings were stored by every sink (or rejected for good), so nothing acked is lost;
//! redelivery is harmless because of the dedup.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use calwatch_agent::backoff::Backoff;
use calwatch_agent::mqtt::MqttConfig;
use calwatch_protocol::{Id, ReadingBatch, Topic, Value, READINGS_FILTER};
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};

use crate::registry::Registry;
use crate::sink::line::LineBuffer;
use crate::sink::Sinks;

/// Lead time of the `due_soon` state (DESIGN: 30 days).
pub const DUE_SOON_LEAD_MS: i64 = 30 * 86_400_000;

/// Ingest counters.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub batches: AtomicU64,
    pub readings: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    /// Rejected batches or readings by reason.
    pub rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl IngestStats {
    fn reject(&self, reason: &'static str, n: u64) {
        if let Ok(mut r) = self.rejected.lock() {
            *r.entry(reason).or_default() += n;
        }
    }

    /// Count rejected for `reason`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected
            .lock()
            .ok()
            .and_then(|r| r.get(reason).copied())
            .unwrap_or(0)
    }
}

/// Why ingest could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("mqtt settings: {0}")]
    Settings(String),
}

/// Turns batches into stored points. Pure with respect to I/O: the caller moves bytes.
pub struct Ingest {
    registry: Registry,
    high_water: HashMap<Id, u64>,
    pub stats: Arc<IngestStats>,
}

impl Ingest {
    pub fn new(registry: Registry, stats: Arc<IngestStats>) -> Ingest {
        Ingest {
            registry,
            high_water: HashMap::new(),
            stats,
        }
    }

    /// Processes one message; returns the line protocol of its accepted readings.
    pub fn process(&mut self, topic: &str, payload: &[u8], out: &mut LineBuffer) -> usize {
        let stats = &self.stats;
        let agent = match Topic::parse(topic) {
            Ok(Topic::Readings { agent }) => agent,
            _ => {
                stats.reject("bad_topic", 1);
                tracing::warn!(%topic, "message on an unexpected topic ignored");
                return 0;
            }
        };
        let batch = match ReadingBatch::decode(payload) {
            Ok(b) => b,
            Err(e) => {
                stats.reject(e.reason.as_str(), 1);
                tracing::warn!(%topic, error = %e, "batch rejected");
                return 0;
            }
        };
        if batch.agent != agent {
            stats.reject("agent_mismatch", 1);
            tracing::warn!(%topic, claimed = %batch.agent, "batch names another agent than its topic; rejected");
            return 0;
        }
        stats.batches.fetch_add(1, Ordering::Relaxed);
        let mut accepted = 0;
        for r in &batch.readings {
            let Some(dev) = self.registry.device(r.device.as_str()) else {
                stats.reject("unknown_device", 1);
                tracing::warn!(agent = %agent, device = %r.device, "reading for an unregistered device refused");
                continue;
            };
            if dev.agent != agent {
                stats.reject("unassigned", 1);
                tracing::warn!(agent = %agent, device = %r.device, assigned = %dev.agent, "reading from an agent the device is not assigned to refused");
                continue;
            }
            let hw = self.high_water.entry(r.device.clone()).or_insert(0);
            if r.seq <= *hw {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if *hw > 0 && r.seq > *hw + 1 {
                stats.gaps.fetch_add(r.seq - *hw - 1, Ordering::Relaxed);
            }
            *hw = r.seq;
            let vstate = dev.vstate(r.ts, DUE_SOON_LEAD_MS);
            let mut p = out
                .point("reading")
                .tag("device", dev.id.as_str())
                .tag("kind", dev.kind.as_str())
                .tag("owner", dev.owner.as_str())
                .tag("site", dev.site.as_str())
                .tag("vstate", vstate.as_str());
            for (name, value) in &r.values {
                if name.as_str() == "seq" {
                    continue;
                }
                p = match value {
                    Value::Number(x) => p.float(name.as_str(), *x),
                    Value::Bool(b) => p.bool(name.as_str(), *b),
                };
            }
            p.int("seq", r.seq as i64).finish(r.ts);
            accepted += 1;
        }
        stats.readings.fetch_add(accepted as u64, Ordering::Relaxed);
        accepted
    }
}

/// Subscribes to readings and runs ingest until `shutdown` turns true.
pub async fn run(
    mqtt: &MqttConfig,
    client_id: &str,
    mut ingest: Ingest,
    sinks: Sinks,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), IngestError> {
    let mut opts = mqtt.options(client_id).map_err(IngestError::Settings)?;
    opts.set_manual_acks(true);
    // A persistent session: what we did not acknowledge is redelivered after a reconnect.
    opts.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let (tx, mut rx) = mpsc::channel::<Publish>(4096);
    let sub_client = client.clone();
    let url = mqtt.url.clone();
    let events = tokio::spawn(async move {
        let backoff = Backoff {
            min: Duration::from_millis(250),
            max: Duration::from_secs(30),
        };
        let mut failures = 0u32;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    tracing::info!(broker = %url, "gateway connected to broker");
                    if let Err(e) = sub_client.try_subscribe(READINGS_FILTER, QoS::AtLeastOnce) {
                        tracing::error!(error = %e, "cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(e) => {
                    let wait = backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(broker = %url, error = %e, retry_in = ?wait, "broker connection lost");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    });
    let mut lines = LineBuffer::new();
    loop {
        let publish = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => break },
            _ = shutdown.changed() => break,
        };
        let n = ingest.process(&publish.topic, &publish.payload, &mut lines);
        let ack_client = client.clone();
        let ack = Box::new(move || {
            if let Err(e) = ack_client.try_ack(&publish) {
                tracing::warn!(error = %e, "ack not sent; the broker will redeliver (dedup drops it)");
            }
        });
        sinks.send(lines.take(), n, ack).await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), events).await;
    Ok(())
}
