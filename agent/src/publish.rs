//! The agent's delivery path: readings → batches → disk spool → MQTT (QoS 1) → PUBACK →
//! spool ack. Nothing measured is lost: a batch is on disk before it is published, and
//! leaves the spool only when the broker acknowledged it.
//!
//! Mapping PUBACKs to spool records: rumqttc numbers packets itself and reports the number
//! of each publish it writes (`Outgoing::Publish(pkid)`) in the order the requests were
//! queued. Across a reconnect, requests still queued in an old client could be written on
//! the new connection and shift that order, so every connection gets a fresh client and
//! event loop (clean session): nothing crosses from one connection to the next, and the
//! order of `Outgoing::Publish` events matches our queue exactly. After each connect the
//! spool is rewound and everything unacknowledged is sent again, oldest first.
//!
//! Order: the gateway drops a reading whose seq is not above the highest it has seen for
//! the device (CONTRACT §1), so the backlog is sent strictly in spool order, before newer
//! data; `catchup_batches_per_s` can slow it, interleaving live data is not possible
//! without reordering seqs.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use calwatch_protocol::node::backoff::Backoff;
use calwatch_protocol::node::mqtt::MqttConfig;
use calwatch_protocol::{
    readings_topic, status_topic, AgentState, AgentStatus, Id, Reading, ReadingBatch, RejectReason,
    SpoolStatus,
};
use calwatch_spool::{FullPolicy, RecordId, Spool, SpoolError};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, Outgoing, Packet, QoS,
};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::config::{BatchConfig, PublishConfig};
use crate::poll::{now_ms, SharedHealth};

/// How often the retained status is refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(60);

/// Largest status payload: well inside the broker's and our client's packet limit.
pub const STATUS_MAX_BYTES: usize = 128 * 1024;

/// How long a stopping agent waits for the broker to acknowledge its backlog.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why publishing could not start.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("mqtt settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Counters of the delivery path, for status, logs and tests.
#[derive(Debug, Default)]
pub struct PublishStats {
    pub batches_spooled: AtomicU64,
    pub batches_sent: AtomicU64,
    pub batches_acked: AtomicU64,
    pub readings_spooled: AtomicU64,
    /// Batches refused while the spool was full under `block_polling`.
    pub batches_rejected: AtomicU64,
    pub readings_rejected: AtomicU64,
    pub connects: AtomicU64,
}

/// State shared by the batcher and the connection.
struct Shared {
    spool: Mutex<Spool>,
    policy: FullPolicy,
    /// New records in the spool (or the end of input).
    wake: Notify,
    /// No more readings will come.
    done: AtomicBool,
    /// The spool refused the last batch (block_polling at max_bytes).
    full: AtomicBool,
    stats: Arc<PublishStats>,
}

impl Shared {
    fn spool_status(&self) -> (u64, SpoolStatus) {
        let s = self.spool.lock().map(|s| s.stats()).unwrap_or_default();
        (
            s.bytes,
            SpoolStatus {
                unacked: s.unacked,
                dropped: s.dropped,
                rejected: s.full_rejections,
                policy: self.policy.as_str().to_string(),
                full: self.full.load(Ordering::Relaxed),
            },
        )
    }
}

/// Everything the delivery path needs.
pub struct Publisher {
    pub agent: Id,
    pub mqtt: MqttConfig,
    pub batch: BatchConfig,
    pub publish: PublishConfig,
    pub devices: usize,
    pub health: SharedHealth,
    pub stats: Arc<PublishStats>,
}

impl Publisher {
    /// Runs until `readings` closes and everything was delivered (or the broker is
    /// unreachable at that moment: the spool keeps it for the next start).
    pub async fn run(
        self,
        spool: Spool,
        policy: FullPolicy,
        fsync_every: Option<Duration>,
        readings: mpsc::Receiver<Reading>,
    ) -> Result<(), PublishError> {
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            policy,
            wake: Notify::new(),
            done: AtomicBool::new(false),
            full: AtomicBool::new(false),
            stats: self.stats.clone(),
        });
        let batcher = tokio::spawn(batcher(
            shared.clone(),
            self.agent.clone(),
            self.batch.clone(),
            fsync_every,
            readings,
        ));
        let result = self.connection_loop(&shared).await;
        let _ = batcher.await;
        if let Ok(mut s) = shared.spool.lock() {
            s.sync()?;
        }
        result
    }

    /// The status payload, at most [`STATUS_MAX_BYTES`]: an agent with thousands of devices
    /// cannot list them all, so per-device health lists failing devices (and those refusing
    /// some values) first, then the rest, and identity data fills what room is left. The
    /// last will carries no lists.
    fn status(&self, shared: &Shared, state: AgentState) -> Vec<u8> {
        self.status_with(shared, state, true)
    }

    /// The last will: registered at connect, so it carries no per-device lists (they
    /// would be stale when it fires, and they make CONNECT large).
    fn last_will(&self, shared: &Shared) -> Vec<u8> {
        self.status_with(shared, AgentState::Offline, false)
    }

    fn status_with(&self, shared: &Shared, state: AgentState, lists: bool) -> Vec<u8> {
        let (spool_bytes, spool) = shared.spool_status();
        let mut status = AgentStatus {
            agent: self.agent.clone(),
            state,
            version: env!("CARGO_PKG_VERSION").to_string(),
            devices: self.devices as u64,
            spool_bytes,
            ts: now_ms(),
            device_info: Default::default(),
            health: Default::default(),
            spool: Some(spool),
        };
        if !lists {
            return status.encode();
        }
        let Ok(h) = self.health.lock() else {
            return status.encode();
        };
        // Rough sizes of one entry in JSON; the final encode is checked below.
        let mut budget = STATUS_MAX_BYTES.saturating_sub(1024);
        let (failing, healthy): (Vec<_>, Vec<_>) = h
            .health
            .iter()
            .partition(|(_, d)| d.consecutive_failures > 0 || !d.failing_values.is_empty());
        for (id, d) in failing.into_iter().chain(healthy) {
            let cost = id.as_str().len()
                + 60
                + d.failing_values
                    .iter()
                    .map(|v| v.as_str().len() + 3)
                    .sum::<usize>();
            if cost > budget {
                break;
            }
            budget -= cost;
            status.health.insert(id.clone(), d.clone());
        }
        for (id, info) in &h.info {
            let cost = id.as_str().len()
                + 30
                + info.model.as_ref().map_or(0, |m| m.len() + 10)
                + info.serial.as_ref().map_or(0, |s| s.len() + 11)
                + info.wrap.map_or(0, |_| 32);
            if cost > budget {
                break;
            }
            budget -= cost;
            status.device_info.insert(id.clone(), info.clone());
        }
        drop(h);
        let mut bytes = status.encode();
        while bytes.len() > STATUS_MAX_BYTES
            && !(status.device_info.is_empty() && status.health.is_empty())
        {
            // Estimates were off (long strings): halve the lists until it fits.
            let keep_info = status.device_info.len() / 2;
            let keep_health = status.health.len() / 2;
            status.device_info = status.device_info.into_iter().take(keep_info).collect();
            status.health = status.health.into_iter().take(keep_health).collect();
            bytes = status.encode();
        }
        bytes
    }

    async fn connection_loop(&self, shared: &Shared) -> Result<(), PublishError> {
        let backoff = Backoff {
            min: Duration::from_millis(250),
            max: Duration::from_secs(30),
        };
        let client_id = format!("calwatch-agent-{}", self.agent);
        let data_topic = readings_topic(&self.agent);
        let status_topic = status_topic(&self.agent);
        let mut failures = 0u32;
        loop {
            if shared.done.load(Ordering::Acquire) && failures > 0 {
                // Shutting down without a broker: the spool keeps the rest for the next start.
                tracing::warn!(agent = %self.agent, "stopping while the broker is unreachable; undelivered batches stay in the spool");
                return Ok(());
            }
            let mut opts = self
                .mqtt
                .options(&client_id)
                .map_err(PublishError::Settings)?;
            opts.set_last_will(LastWill::new(
                &status_topic,
                self.last_will(shared),
                QoS::AtLeastOnce,
                true,
            ));
            opts.set_clean_session(true);
            opts.set_inflight(self.publish.inflight.max(1) + 2);
            let (client, mut eventloop) =
                AsyncClient::new(opts, usize::from(self.publish.inflight) + 16);
            // A small batch (one reading of a slow device) goes out at once, not after Nagle.
            eventloop.network_options.set_tcp_nodelay(true);
            let (ev_tx, mut events) = mpsc::channel(1024);
            let pump = tokio::spawn(async move {
                loop {
                    let ev = eventloop.poll().await;
                    let stop = ev.is_err();
                    if ev_tx.send(ev).await.is_err() || stop {
                        break;
                    }
                }
            });
            // Wait for the broker's answer to CONNECT.
            let connected = loop {
                match events.recv().await {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => break Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Err(e),
                    None => break Err(ConnectionError::RequestsDone),
                }
            };
            if let Err(e) = connected {
                pump.abort();
                let wait = backoff.delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(agent = %self.agent, broker = %self.mqtt.url, error = %explain(&e), retry_in = ?wait, "cannot connect to broker; readings keep going to the spool");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wait_done(shared) => {}
                }
                continue;
            }
            shared.stats.connects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(agent = %self.agent, broker = %self.mqtt.url, "connected to broker");
            let outcome = self
                .session(shared, &client, &mut events, &data_topic, &status_topic)
                .await;
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
            match outcome {
                Session::Finished => return Ok(()),
                Session::Lost(e) => {
                    let wait = backoff.delay(0);
                    failures = 1;
                    tracing::warn!(agent = %self.agent, error = %e, retry_in = ?wait, "broker connection lost; unacknowledged batches will be sent again");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = wait_done(shared) => {}
                    }
                }
            }
        }
    }

    /// One connection: send the spool in order within the in-flight window, ack on PUBACK.
    async fn session(
        &self,
        shared: &Shared,
        client: &AsyncClient,
        events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
        data_topic: &str,
        status_topic: &str,
    ) -> Session {
        if let Ok(mut s) = shared.spool.lock() {
            s.rewind();
        }
        // What each queued publish is, in queue order: a spool record or a status message.
        let mut queued: VecDeque<Option<RecordId>> = VecDeque::new();
        let mut sent: HashMap<u16, Option<RecordId>> = HashMap::new();
        let mut outstanding: usize = 0;
        let mut status_tick = tokio::time::interval(STATUS_EVERY);
        let mut last_full = shared.full.load(Ordering::Relaxed);
        let mut last_identity = self.health.lock().map(|h| h.identity_changes).unwrap_or(0);
        let mut finishing: Option<Instant> = None;
        let mut done_at: Option<Instant> = None;
        let rate = self.publish.catchup_batches_per_s;
        let mut rate_window = (Instant::now(), 0u32);
        loop {
            // Fill the window, oldest first.
            while outstanding < usize::from(self.publish.inflight) && finishing.is_none() {
                if rate > 0 {
                    if rate_window.0.elapsed() >= Duration::from_secs(1) {
                        rate_window = (Instant::now(), 0);
                    }
                    if rate_window.1 >= rate {
                        break;
                    }
                }
                let next = match shared.spool.lock() {
                    Ok(mut s) => s.read_next(),
                    Err(_) => return Session::Lost("spool lock poisoned".into()),
                };
                match next {
                    Ok(Some((id, bytes))) => {
                        if client
                            .publish(data_topic, QoS::AtLeastOnce, false, bytes)
                            .await
                            .is_err()
                        {
                            return Session::Lost("mqtt client closed".into());
                        }
                        rate_window.1 += 1;
                        queued.push_back(Some(id));
                        outstanding += 1;
                        shared.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "spool read failed");
                        break;
                    }
                }
            }
            let full = shared.full.load(Ordering::Relaxed);
            if shared.done.load(Ordering::Acquire) && finishing.is_none() {
                let since = *done_at.get_or_insert_with(Instant::now);
                let drained = shared.spool.lock().map(|s| s.is_empty()).unwrap_or(true);
                if drained || since.elapsed() >= SHUTDOWN_GRACE {
                    // Everything spooled was acknowledged (or the grace is over; the spool
                    // keeps the rest): say goodbye with a retained offline status.
                    let _ = client
                        .publish(
                            status_topic,
                            QoS::AtLeastOnce,
                            true,
                            self.status(shared, AgentState::Offline),
                        )
                        .await;
                    queued.push_back(None);
                    finishing = Some(Instant::now() + Duration::from_secs(2));
                }
            }
            if finishing
                .is_some_and(|t| Instant::now() >= t || (queued.is_empty() && sent.is_empty()))
            {
                return Session::Finished;
            }
            let identity = self.health.lock().map(|h| h.identity_changes).unwrap_or(0);
            if full != last_full || identity != last_identity {
                last_full = full;
                last_identity = identity;
                let _ = client
                    .publish(
                        status_topic,
                        QoS::AtLeastOnce,
                        true,
                        self.status(shared, AgentState::Online),
                    )
                    .await;
                queued.push_back(None);
            }
            let refill_rate = async {
                if rate > 0 && outstanding < usize::from(self.publish.inflight) {
                    tokio::time::sleep_until(rate_window.0 + Duration::from_secs(1)).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if let Some(what) = queued.pop_front() {
                            sent.insert(pkid, what);
                        }
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(Some(id)) = sent.remove(&ack.pkid) {
                            outstanding = outstanding.saturating_sub(1);
                            shared.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut s) = shared.spool.lock() {
                                if let Err(e) = s.ack(id) {
                                    tracing::error!(error = %e, "spool ack failed");
                                }
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Session::Lost(explain(&e)),
                    None => return Session::Lost("event loop ended".into()),
                },
                _ = shared.wake.notified() => {}
                _ = status_tick.tick() => {
                    let _ = client.publish(status_topic, QoS::AtLeastOnce, true, self.status(shared, AgentState::Online)).await;
                    queued.push_back(None);
                }
                _ = refill_rate => {}
                _ = async { tokio::time::sleep_until(finishing.unwrap_or_else(Instant::now)).await }, if finishing.is_some() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)), if done_at.is_some() && finishing.is_none() => {}
            }
        }
    }
}

enum Session {
    Finished,
    Lost(String),
}

async fn wait_done(shared: &Shared) {
    while !shared.done.load(Ordering::Acquire) {
        shared.wake.notified().await;
    }
}

/// A connection error in words an operator can act on.
fn explain(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            "broker refused the user name or password (check mqtt.username and password_file / CALWATCH_MQTT_PASSWORD)".into()
        }
        // mosquitto 2 answers a wrong password with "not authorized" too.
        ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => {
            "broker refused the credentials: not authorized (check mqtt.username, password_file / CALWATCH_MQTT_PASSWORD and the broker's ACL)".into()
        }
        ConnectionError::Tls(t) => format!("TLS: {t} (check mqtt.ca_file, the broker certificate's name and validity, and cert_file/key_file)"),
        other => other.to_string(),
    }
}

/// Groups readings into batches and appends them to the spool.
async fn batcher(
    shared: Arc<Shared>,
    agent: Id,
    cfg: BatchConfig,
    fsync_every: Option<Duration>,
    mut readings: mpsc::Receiver<Reading>,
) {
    let linger = Duration::from_millis(cfg.linger_ms);
    let mut fsync_tick = tokio::time::interval(fsync_every.unwrap_or(Duration::from_secs(3600)));
    let mut pending: Vec<Reading> = Vec::new();
    let mut deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            r = readings.recv() => match r {
                Some(r) => {
                    if pending.is_empty() {
                        deadline = Some(Instant::now() + linger);
                    }
                    pending.push(r);
                    if pending.len() >= cfg.max_readings {
                        spool_batch(&shared, &agent, &mut pending);
                        deadline = None;
                    }
                }
                None => break,
            },
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await }, if deadline.is_some() => {
                spool_batch(&shared, &agent, &mut pending);
                deadline = None;
            }
            _ = fsync_tick.tick(), if fsync_every.is_some() => {
                if let Ok(mut s) = shared.spool.lock() {
                    if let Err(e) = s.sync() {
                        tracing::error!(error = %e, "spool sync failed");
                    }
                }
            }
        }
    }
    spool_batch(&shared, &agent, &mut pending);
    shared.done.store(true, Ordering::Release);
    shared.wake.notify_one();
}

fn spool_batch(shared: &Shared, agent: &Id, pending: &mut Vec<Reading>) {
    if pending.is_empty() {
        return;
    }
    let mut queue = vec![std::mem::take(pending)];
    while let Some(readings) = queue.pop() {
        let batch = ReadingBatch {
            agent: agent.clone(),
            sent: now_ms(),
            readings,
        };
        match batch.encode() {
            Ok(bytes) => {
                let n = batch.readings.len() as u64;
                let appended = match shared.spool.lock() {
                    Ok(mut s) => s.append(&bytes).map(|_| ()),
                    Err(_) => return,
                };
                match appended {
                    Ok(()) => {
                        if shared.full.swap(false, Ordering::Relaxed) {
                            tracing::info!("spool has room again; batches are spooled");
                        }
                        shared.stats.batches_spooled.fetch_add(1, Ordering::Relaxed);
                        shared
                            .stats
                            .readings_spooled
                            .fetch_add(n, Ordering::Relaxed);
                        shared.wake.notify_one();
                    }
                    Err(SpoolError::Full { bytes, max_bytes }) => {
                        let rejected = shared
                            .stats
                            .batches_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        shared
                            .stats
                            .readings_rejected
                            .fetch_add(n, Ordering::Relaxed);
                        if !shared.full.swap(true, Ordering::Relaxed) || rejected % 100 == 0 {
                            tracing::error!(bytes, max_bytes, rejected = rejected + 1, "spool full (policy block_polling): new batches are refused until the broker acknowledges the backlog; polling continues");
                        }
                        shared.wake.notify_one();
                    }
                    Err(e) => tracing::error!(error = %e, "batch not spooled"),
                }
            }
            Err(e) if e.reason == RejectReason::TooLarge && batch.readings.len() > 1 => {
                // Too many bytes for one message: split and spool both halves, in order.
                let mut first = batch.readings;
                let second = first.split_off(first.len() / 2);
                queue.push(second);
                queue.push(first);
            }
            Err(e) => tracing::error!(error = %e, "batch cannot be encoded; dropped"),
        }
    }
}
