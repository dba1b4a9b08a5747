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

/// How long a stop waits for the broker to confirm the alert events (and then for the
/// disconnect); what is unconfirmed by then stays in the outbox for the next start.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The MQTT subscription of one gateway.
pub(crate) struct MqttSource {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
    connection: JoinHandle<()>,
    /// PUBACKs of our alert events received from the broker.
    confirmed: Arc<AtomicU64>,
    /// Alert events handed to the connection.
    published: u64,
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
            published: 0,
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
        match sent {
            Ok(()) => self.published += 1,
            Err(err) => tracing::warn!(error = %err, "alert event not published"),
        }
        Ok(())
    }

    fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Relaxed)
    }

    async fn close(self) -> u64 {
        // Only a PUBACK says an event is out: written to the socket is not delivered (closing
        // a socket with unread data resets it, and the broker drops what it had not read).
        // Wait a moment for the confirmations, then disconnect.
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        while self.confirmed.load(Ordering::Relaxed) < self.published
            && tokio::time::Instant::now() < deadline
            && !self.connection.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(CLOSE_WAIT, self.connection).await;
        self.confirmed.load(Ordering::Relaxed)
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
/// reconnects, the backoff or the shutdown); it ends once the disconnect went out.
async fn connection(c: Connection) {
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
    // The disconnect went out: read until the broker closes the connection, so the socket is
    // not closed with unread data (which resets it).
    let mut disconnecting = false;
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
            Ok(Event::Incoming(Packet::Publish(_))) if disconnecting => {}
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
                        return;
                    }
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => disconnecting = true,
            Ok(_) => {}
            Err(_) if disconnecting => return,
            Err(e) => {
                health.disconnected(now_ms());
                let wait = backoff.delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(broker = %url, error = %e, retry_in = ?wait, "broker connection lost");
                if unless_stopping(tokio::time::sleep(wait), &shutdown)
                    .await
                    .is_none()
                {
                    return;
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A broker that accepts the connection and the subscription and takes every publish
    /// without ever confirming it (no PUBACK); it counts the publishes it read.
    async fn broker_that_never_confirms() -> (u16, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let publishes = Arc::new(AtomicU64::new(0));
        let seen = publishes.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            loop {
                let mut head = [0u8; 1];
                if s.read_exact(&mut head).await.is_err() {
                    return;
                }
                let (mut len, mut shift) = (0usize, 0);
                loop {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    len |= usize::from(b[0] & 0x7f) << shift;
                    shift += 7;
                    if b[0] & 0x80 == 0 {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let reply: Vec<u8> = match head[0] >> 4 {
                    1 => vec![0x20, 2, 0, 0],                   // CONNACK
                    8 => vec![0x90, 4, body[0], body[1], 1, 1], // SUBACK, two filters
                    12 => vec![0xd0, 0],                        // PINGRESP
                    14 => return,                               // DISCONNECT
                    3 => {
                        seen.fetch_add(1, Ordering::SeqCst);
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                if !reply.is_empty() && s.write_all(&reply).await.is_err() {
                    return;
                }
            }
        });
        (port, publishes)
    }

    /// Handed to the connection and even written to the socket is not delivered: an event
    /// leaves the outbox only on the broker's PUBACK, also at a clean stop (a socket closed
    /// with unread data is reset, and the broker may drop what it had not read yet).
    #[tokio::test]
    async fn close_counts_only_what_the_broker_confirmed() {
        let (port, publishes) = broker_that_never_confirms().await;
        let cfg: MqttConfig =
            toml::from_str(&format!("url = \"mqtt://127.0.0.1:{port}\"")).unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let metrics = Arc::new(Metrics::new(Vec::new()));
        let mut source = MqttSource::start(&cfg, "gw-close", 100, metrics, shutdown).unwrap();
        for i in 0..3 {
            source
                .publish(format!("calwatch/v1/alerts/o/d{i}"), b"{}".to_vec())
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while publishes.load(Ordering::SeqCst) < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "publishes never reached the broker"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(source.close().await, 0, "unconfirmed events counted as out");
    }

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
