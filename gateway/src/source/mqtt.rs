//! The MQTT source: a persistent-session subscription to every agent's readings and status
//! (`clean_session = false`, manual acks), so the broker redelivers whatever the gateway did
//! not acknowledge, also across a gateway restart.
//!
//! Two halves, and backpressure runs one way. The connection task only ever waits on the
//! broker connection (and, between reconnects, the backoff or the shutdown): it forwards every
//! message into an unbounded channel, bounded in practice by `[ingest] max_pending`, so
//! keep-alives and acks go out while a burst is processed. Acks and alert events are queued
//! into rumqttc's request channel without waiting: it has room for all of them; if it ever has
//! to wait, the wait ends with the shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use calwatch_protocol::node::backoff::Backoff;
use calwatch_protocol::node::mqtt::MqttConfig;
use calwatch_protocol::{READINGS_FILTER, STATUS_FILTER};
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{Ack, Closed, Message, Source};
use crate::domain::now_ms;
use crate::health::IngestHealth;
use crate::metrics::Metrics;

/// Payload bytes received and not yet acknowledged beyond which the source takes no more
/// (besides `[ingest] max_pending` messages, `crate::config::DEFAULT_MAX_PENDING`).
pub(crate) const MAX_PENDING_BYTES: u64 = 256 << 20;

/// Room in the request channel besides the acks of every message that can be waiting: for
/// alert events.
const EVENT_ROOM: usize = 16_384;

/// The MQTT subscription of one gateway.
pub(crate) struct MqttSource {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
    connection: JoinHandle<bool>,
    /// PUBACKs of our alert events received from the broker.
    confirmed: Arc<AtomicU64>,
    shutdown: watch::Receiver<bool>,
}

impl MqttSource {
    /// Connects (in the background, with backoff) and subscribes to every agent's readings
    /// and status as `client_id`, holding at most `max_pending` messages unacknowledged.
    pub(crate) fn start(
        mqtt: &MqttConfig,
        client_id: &str,
        max_pending: u64,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<MqttSource, String> {
        let mut opts = mqtt.options(client_id)?;
        opts.set_manual_acks(true);
        // A persistent session: what we did not acknowledge is redelivered after a reconnect.
        opts.set_clean_session(false);
        // rumqttc's request channel has room for the ack of every message that can be
        // waiting, and alert events besides, so that queuing an ack never waits for the
        // event loop.
        let requests = usize::try_from(max_pending)
            .unwrap_or(usize::MAX)
            .saturating_add(EVENT_ROOM);
        let (client, eventloop) = AsyncClient::new(opts, requests);
        let (tx, rx) = mpsc::unbounded_channel::<Publish>();
        let confirmed = Arc::new(AtomicU64::new(0));
        let connection = tokio::spawn(connection(Connection {
            eventloop,
            client: client.clone(),
            url: mqtt.url.clone(),
            tx,
            metrics,
            confirmed: confirmed.clone(),
            max_pending,
            shutdown: shutdown.clone(),
        }));
        Ok(MqttSource {
            client,
            rx,
            connection,
            confirmed,
            shutdown,
        })
    }
}

/// The ack token of a publish: its packet id and QoS.
fn ack_of(p: &Publish) -> Ack {
    let qos = match p.qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    };
    Ack(u64::from(p.pkid) | (qos << 16))
}

/// The publish header rumqttc needs to acknowledge `ack`.
fn header_of(ack: Ack) -> Publish {
    let qos = match ack.0 >> 16 {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    };
    let mut p = Publish::new("", qos, Vec::new());
    p.pkid = (ack.0 & 0xFFFF) as u16;
    p
}

fn message(p: Publish) -> Message {
    let ack = ack_of(&p);
    Message {
        topic: p.topic,
        payload: p.payload,
        ack,
    }
}

impl Source for MqttSource {
    async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await.map(message)
    }

    fn try_recv(&mut self) -> Option<Message> {
        self.rx.try_recv().ok().map(message)
    }

    fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    async fn ack(&mut self, ack: Ack) -> Result<(), Closed> {
        let header = header_of(ack);
        if self.client.try_ack(&header).is_ok() {
            return Ok(());
        }
        match unless_stopping(self.client.ack(&header), &self.shutdown).await {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ack not sent; the broker will redeliver (dedup drops it)");
                Ok(())
            }
            None => Err(Closed),
        }
    }

    async fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), Closed> {
        let sent = match self
            .client
            .try_publish(&topic, QoS::AtLeastOnce, false, payload.clone())
        {
            Ok(()) => Ok(()),
            Err(_) => {
                let publish = self.client.publish(topic, QoS::AtLeastOnce, false, payload);
                match unless_stopping(publish, &self.shutdown).await {
                    Some(r) => r,
                    None => return Err(Closed),
                }
            }
        };
        if let Err(err) = sent {
            tracing::warn!(error = %err, "alert event not published");
        }
        Ok(())
    }

    fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    async fn close(self) -> bool {
        // The connection sends what is queued before the disconnect, then ends.
        let _ = self.client.try_disconnect();
        matches!(
            tokio::time::timeout(Duration::from_secs(2), self.connection).await,
            Ok(Ok(true))
        )
    }
}

/// What the connection task owns.
struct Connection {
    eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    url: String,
    tx: mpsc::UnboundedSender<Publish>,
    metrics: Arc<Metrics>,
    confirmed: Arc<AtomicU64>,
    max_pending: u64,
    shutdown: watch::Receiver<bool>,
}

/// The broker connection's event loop. It waits on nothing but the connection (and, between
/// reconnects, the backoff or the shutdown). Returns whether it ended with a clean disconnect
/// (everything queued before it was sent).
async fn connection(c: Connection) -> bool {
    let Connection {
        mut eventloop,
        client,
        url,
        tx,
        metrics,
        confirmed,
        max_pending,
        shutdown,
    } = c;
    // Alert events and acks are small: no Nagle delay (40 ms with delayed ACKs).
    eventloop.network_options.set_tcp_nodelay(true);
    let health: &IngestHealth = &metrics.health;
    let backoff = Backoff {
        min: Duration::from_millis(250),
        max: Duration::from_secs(30),
    };
    let mut failures = 0u32;
    let mut shedding = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                health.connected();
                tracing::info!(broker = %url, "gateway connected to broker");
                let filters = [READINGS_FILTER, STATUS_FILTER]
                    .map(|f| rumqttc::SubscribeFilter::new(f.to_owned(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(error = %e, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                tracing::info!(
                    filters = %format!("{READINGS_FILTER} {STATUS_FILTER}"),
                    "gateway subscribed"
                );
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                confirmed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let (waiting, bytes) = health.pending();
                if shedding || waiting >= max_pending || bytes >= MAX_PENDING_BYTES {
                    if !shedding {
                        tracing::warn!(
                            waiting,
                            bytes,
                            "too much waiting: dropping messages unacknowledged until it is processed, then reconnecting for their redelivery (lower the broker's in-flight limit)"
                        );
                    }
                    shedding = true;
                    health.shed();
                } else {
                    health.received(p.payload.len());
                    if tx.send(p).is_err() {
                        return false;
                    }
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return true,
            Ok(_) => {}
            Err(e) => {
                health.disconnected(now_ms());
                let wait = backoff.delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(broker = %url, error = %e, retry_in = ?wait, "broker connection lost");
                if unless_stopping(tokio::time::sleep(wait), &shutdown)
                    .await
                    .is_none()
                {
                    return false;
                }
            }
        }
        if shedding && health.pending().0 == 0 {
            // Everything taken is processed and acknowledged: reconnect, and the session
            // redelivers what was dropped.
            tracing::info!(broker = %url, "reconnecting for the redelivery of dropped messages");
            eventloop.clean();
            health.disconnected(now_ms());
            shedding = false;
        }
    }
}

/// `fut`, unless the gateway is asked to stop first (then `None`).
async fn unless_stopping<T>(
    fut: impl std::future::Future<Output = T>,
    shutdown: &watch::Receiver<bool>,
) -> Option<T> {
    let mut shutdown = shutdown.clone();
    tokio::select! {
        r = fut => Some(r),
        _ = shutdown.wait_for(|s| *s) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_token_gives_back_the_packet_id_and_qos() {
        for (qos, pkid) in [
            (QoS::AtLeastOnce, 1),
            (QoS::AtLeastOnce, u16::MAX),
            (QoS::ExactlyOnce, 7),
        ] {
            let mut p = Publish::new("calwatch/v1/agents/a/readings", qos, vec![1, 2]);
            p.pkid = pkid;
            let back = header_of(ack_of(&p));
            assert_eq!((back.pkid, back.qos), (pkid, qos));
        }
    }
}
