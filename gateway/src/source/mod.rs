//! Where agents' messages come from: the seam between a transport and ingest.
//!
//! A [`Source`] hands over [`Message`]s — a CONTRACT §1 topic, the payload as sent and an
//! [`Ack`] handle — in the order the transport delivered them, takes back the acks of those
//! whose effects are durable (in that order), and carries the gateway's alert events out. It
//! redelivers whatever was not acked after a reconnect or a restart. One node subscribes
//! over MQTT ([`mqtt`]); nothing downstream of this module knows which transport it is.

pub(crate) mod mqtt;

use std::future::Future;

/// One message from an agent.
#[derive(Debug)]
pub(crate) struct Message {
    /// Its topic as CONTRACT §1 names it (`calwatch/v1/agents/{agent}/readings`, …).
    pub(crate) topic: String,
    pub(crate) payload: bytes::Bytes,
    pub(crate) ack: Ack,
}

/// What the source needs to acknowledge a message: a token only it interprets (for MQTT the
/// packet id and QoS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ack(pub(crate) u64);

/// The source gave up because the gateway is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// A stream of agents' messages with acknowledgement (see the module documentation).
///
/// Every wait of a source ends with the shutdown it was made with, so a caller never waits
/// on a source that waits on it (DESIGN "The gateway never stalls").
pub(crate) trait Source: Send + 'static {
    /// The next message, waiting for one; `None` once the source has ended.
    fn recv(&mut self) -> impl Future<Output = Option<Message>> + Send;

    /// The next message if one is ready.
    fn try_recv(&mut self) -> Option<Message>;

    /// Whether no message is ready.
    fn is_empty(&self) -> bool;

    /// Acknowledges a message whose effects are durable; the transport will not redeliver
    /// it. Acks come in the order the messages were received.
    fn ack(&mut self, ack: Ack) -> impl Future<Output = Result<(), Closed>> + Send;

    /// Sends an event (an alert event on its CONTRACT §1 topic) at least once.
    fn publish(
        &mut self,
        topic: String,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<(), Closed>> + Send;

    /// How many of the events published so far the transport has confirmed (they may leave
    /// the outbox): a count over the source's life, in publishing order.
    fn confirmed(&self) -> u64;

    /// Ends, after waiting a bounded moment for the transport to confirm the events
    /// published; returns [`Source::confirmed`] as of the end (what is not confirmed stays
    /// in the outbox and is published again at the next start).
    fn close(self) -> impl Future<Output = u64> + Send;
}
