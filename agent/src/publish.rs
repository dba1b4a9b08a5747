//! The MQTT side of the agent: batches readings, publishes them at QoS 1, and keeps the
//! retained `status` message (with the last will saying `offline`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use calwatch_protocol::{
    readings_topic, status_topic, AgentState, AgentStatus, Id, Reading, ReadingBatch, RejectReason,
};
use rumqttc::{AsyncClient, Event, LastWill, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::BatchConfig;
use crate::mqtt::MqttConfig;
use crate::poll::{now_ms, SharedHealth};

/// How often the retained status is refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(60);

/// Why publishing could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("mqtt settings: {0}")]
    Settings(String),
}

/// Counters of the publisher, for logs and tests.
#[derive(Debug, Default)]
pub struct PublishStats {
    pub batches_sent: AtomicU64,
    pub batches_acked: AtomicU64,
    pub readings_sent: AtomicU64,
}

/// Everything the publisher needs.
pub struct Publisher {
    pub agent: Id,
    pub mqtt: MqttConfig,
    pub batch: BatchConfig,
    pub devices: usize,
    pub health: SharedHealth,
    pub stats: Arc<PublishStats>,
}

impl Publisher {
    fn status(&self, state: AgentState) -> AgentStatus {
        let (device_info, health) = match self.health.lock() {
            Ok(h) => (h.info.clone(), h.health.clone()),
            Err(_) => Default::default(),
        };
        AgentStatus {
            agent: self.agent.clone(),
            state,
            version: env!("CARGO_PKG_VERSION").to_string(),
            devices: self.devices as u64,
            spool_bytes: 0,
            ts: now_ms(),
            device_info,
            health,
        }
    }

    /// Publishes readings from `readings` until the channel closes, then says offline.
    pub async fn run(self, mut readings: mpsc::Receiver<Reading>) -> Result<(), PublishError> {
        let client_id = format!("calwatch-agent-{}", self.agent);
        let mut opts = self
            .mqtt
            .options(&client_id)
            .map_err(PublishError::Settings)?;
        let offline = self.status(AgentState::Offline).encode();
        opts.set_last_will(LastWill::new(
            status_topic(&self.agent),
            offline,
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let topic = readings_topic(&self.agent);
        let status_topic = status_topic(&self.agent);

        let inflight = Arc::new(AtomicU64::new(0));
        let (conn_tx, mut conn_rx) = watch::channel(0u64);
        let events = {
            let inflight = inflight.clone();
            let stats = self.stats.clone();
            let agent = self.agent.clone();
            tokio::spawn(async move {
                let backoff = Backoff {
                    min: Duration::from_millis(250),
                    max: Duration::from_secs(30),
                };
                let mut failures = 0u32;
                let mut connects = 0u64;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            failures = 0;
                            connects += 1;
                            tracing::info!(agent = %agent, "connected to broker");
                            let _ = conn_tx.send(connects);
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            inflight.fetch_sub(1, Ordering::Relaxed);
                            stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(e) => {
                            let wait = backoff.delay(failures);
                            failures = failures.saturating_add(1);
                            tracing::warn!(agent = %agent, error = %e, retry_in = ?wait, "broker connection lost");
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            })
        };

        let linger = Duration::from_millis(self.batch.linger_ms);
        let mut pending: Vec<Reading> = Vec::new();
        let mut deadline: Option<Instant> = None;
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        loop {
            tokio::select! {
                r = readings.recv() => match r {
                    Some(r) => {
                        if pending.is_empty() {
                            deadline = Some(Instant::now() + linger);
                        }
                        pending.push(r);
                        if pending.len() >= self.batch.max_readings {
                            self.flush(&client, &topic, &mut pending, &inflight).await;
                            deadline = None;
                        }
                    }
                    None => break,
                },
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await }, if deadline.is_some() => {
                    self.flush(&client, &topic, &mut pending, &inflight).await;
                    deadline = None;
                }
                _ = status_tick.tick() => self.publish_status(&client, &status_topic, AgentState::Online).await,
                Ok(()) = conn_rx.changed() => self.publish_status(&client, &status_topic, AgentState::Online).await,
            }
        }
        self.flush(&client, &topic, &mut pending, &inflight).await;
        self.publish_status(&client, &status_topic, AgentState::Offline)
            .await;
        // Give the broker a moment to acknowledge what is in flight before we leave.
        let give_up = Instant::now() + Duration::from_secs(5);
        while inflight.load(Ordering::Relaxed) > 0 && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), events).await;
        Ok(())
    }

    async fn publish_status(&self, client: &AsyncClient, topic: &str, state: AgentState) {
        let payload = self.status(state).encode();
        if let Err(e) = client.publish(topic, QoS::AtLeastOnce, true, payload).await {
            tracing::warn!(error = %e, "status not published");
        }
    }

    async fn flush(
        &self,
        client: &AsyncClient,
        topic: &str,
        pending: &mut Vec<Reading>,
        inflight: &AtomicU64,
    ) {
        if pending.is_empty() {
            return;
        }
        let mut queue = vec![std::mem::take(pending)];
        while let Some(readings) = queue.pop() {
            let batch = ReadingBatch {
                agent: self.agent.clone(),
                sent: now_ms(),
                readings,
            };
            match batch.encode() {
                Ok(bytes) => {
                    let n = batch.readings.len() as u64;
                    inflight.fetch_add(1, Ordering::Relaxed);
                    if client
                        .publish(topic, QoS::AtLeastOnce, false, bytes)
                        .await
                        .is_err()
                    {
                        tracing::error!("mqtt client closed; batch of {n} readings not sent");
                        inflight.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    self.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                    self.stats.readings_sent.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) if e.reason == RejectReason::TooLarge && batch.readings.len() > 1 => {
                    // Too many bytes for one message: split and send both halves, in order.
                    let mut first = batch.readings;
                    let second = first.split_off(first.len() / 2);
                    queue.push(second);
                    queue.push(first);
                }
                Err(e) => {
                    tracing::error!(error = %e, "batch cannot be encoded; dropped");
                }
            }
        }
    }
}
