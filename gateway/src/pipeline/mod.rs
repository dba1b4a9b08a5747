//! Ingest: the MQTT subscription to every agent's readings (and status) → decode → agent
//! assignment → dedup on (device, seq) → checks → alert lifecycle → line protocol → the sinks'
//! durable queues.
//!
//! # Durability order
//!
//! DESIGN: "the gateway acks an MQTT message only after its readings are checked and handed
//! to the sink's durable queue". The subscription is a persistent session (`clean_session =
//! false`) with manual acks, so the broker redelivers whatever the gateway did not ack, also
//! across a gateway restart. Messages are taken in bursts (what is ready, up to
//! [`BURST_MESSAGES`] messages or [`BURST_BYTES`] of payload) and each burst goes through:
//!
//! 1. **process in memory** ([`Pipeline`]): decode, assignment, dedup against the device's
//!    `last_seq`, [`checks::check_reading`], [`AlertBook::apply`] / [`AlertBook::settle`], line
//!    protocol for the readings and the alert events;
//! 2. **queue**: append the burst's line protocol to *every* sink target's spool and `sync()`
//!    it (a full spool blocks here: backpressure, never a drop);
//! 3. **commit**: the changed device states (with `last_seq`, gaps, readings checked), the
//!    changed alerts, the next alert id, the audit entries of the alert transitions and the
//!    transitions themselves (the outbox) in *one* SQLite transaction;
//! 4. **ack** the burst's MQTT messages;
//! 5. **publish** the alert events on `calwatch/v1/alerts/{owner}/{device}` (QoS 1, not
//!    retained) and broadcast them in-process; their outbox rows are deleted by a later
//!    commit, a few seconds after they were handed to the MQTT client.
//!
//! A crash at any point loses nothing acked, and checks nothing twice:
//! - before 2 completes: nothing is durable; the broker redelivers the burst and the restarted
//!   gateway processes it from the committed state, exactly as the first time.
//! - after 2, before 3: the queues hold the burst's points but the state does not know them.
//!   Redelivered, the burst is re-checked from the old committed state and produces the same
//!   points again (the checks are deterministic functions of state and reading, in event
//!   time): same series, timestamp and fields, which InfluxDB stores once (a point overwrites
//!   its equal; VictoriaMetrics keeps both samples unless its deduplication is on). Its alert
//!   events are raised for the first time as far as anyone outside can tell: nothing of the
//!   burst was committed, acked or published. Their ids continue from the persisted next id
//!   (the same ids as in the first attempt, unless a sweep raised something first).
//! - after 3, before 4: redelivered readings have `seq <= last_seq` and are dropped as
//!   duplicates (counted); the burst's events sit in the outbox and are published at
//!   startup.
//! - after 4, before the outbox rows are deleted: the events are published again at startup
//!   (at least once; a receiver sees the same id, state and `updated` twice).
//!
//! Redelivery of anything else is harmless for the same reason: dedup on (device, seq) against
//! the committed `last_seq`. The sink writers read the spools in order and acknowledge records
//! only after the store answered 2xx (or the record went to the dead-letter file), syncing
//! the spool's ledger then, so a restart replays unwritten points in order (and at most the
//! request in flight at a crash is written again: the same points).
//!
//! Liveness, the window sweep of silent devices and the periodic measurements
//! (`device_status`, `coverage`, open alerts) run on the wall clock every `[sweep] interval_s`
//! through the same steps 1–3 and 5 (there is nothing to ack); see [`crate::sweep`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use calwatch_agent::backoff::Backoff;
use calwatch_agent::mqtt::MqttConfig;
use calwatch_protocol::{
    alert_topic, AgentState, AgentStatus, AlertEvent, BatchDecoder, BatchView, Id, Topic, Value,
    READINGS_FILTER, STATUS_FILTER,
};
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use tokio::sync::{broadcast, mpsc, watch};

use crate::alerts::AlertBook;
use crate::checks::{self, liveness, CheckConfig, Verdict};
pub use crate::command::Command;
use crate::metrics::Metrics;
use crate::registry::{Device, Registry};
use crate::sink::line::LineBuffer;
use crate::sink::Queues;
use crate::store::{Commit, Committed, SavedDevice, StateStore, StoreError};
use crate::LoggedAlert;

/// A burst takes at most this many MQTT messages ...
pub const BURST_MESSAGES: usize = 64;
/// ... or this much payload (about 3,000 readings of ~170 bytes): an alert is published when
/// its burst is durable, so the burst bounds the reading → alert latency (about 2 µs to check
/// and 2–3 µs to commit a reading: ~15 ms of work per full burst), while the per-burst cost
/// (two queue fsyncs, one SQLite transaction) stays small against it.
pub const BURST_BYTES: usize = 512 << 10;

/// How often the registry is asked whether another process (`calwatch-gateway import`)
/// changed it: one single-row query, so such an import counts within seconds.
const REGISTRY_WATCH: Duration = Duration::from_secs(2);

/// Published alert events stay in the outbox this long, so a crash right after publishing
/// publishes them again rather than never.
const OUTBOX_GRACE: Duration = Duration::from_secs(3);

/// Why ingest could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("mqtt settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("ingest task: {0}")]
    Task(String),
}

/// The gateway was asked to stop while it waited (for a full queue, a failing disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// What processing produced: line protocol for the sinks and alert events to publish.
#[derive(Debug, Default)]
pub struct Output {
    pub lines: LineBuffer,
    pub events: Vec<AlertEvent>,
    /// Readings checked (after dedup).
    pub readings: usize,
}

impl Output {
    pub fn clear(&mut self) {
        self.lines.clear();
        self.events.clear();
        self.readings = 0;
    }

    /// The `alert` point (at its `updated` time) and the counter of every event from index
    /// `first` on: what each alert transition adds besides the event itself.
    pub(crate) fn alert_points(&mut self, first: usize, metrics: &Metrics) {
        for e in &self.events[first..] {
            write_alert(&mut self.lines, e, e.updated);
            metrics.alert(e.kind, e.state);
        }
    }
}

/// Recent readings of a watched device: (event time, values).
pub(crate) type Recent = VecDeque<(i64, Vec<(Id, Value)>)>;

/// A map keyed by id, on the hot path: foldhash (randomly seeded per process, so ids chosen
/// to collide do not degrade it the way they would a fixed hash) instead of SipHash.
pub(crate) type IdMap<V> = HashMap<Id, V, foldhash::fast::RandomState>;

/// A registered device with its check state: what one reading needs, behind one lookup.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) device: Arc<Device>,
    /// [`AgentInfo::index`] of the device's agent: the assignment check without a string
    /// comparison (and the cache miss of reading the agent's id).
    pub(crate) agent: u32,
    pub(crate) saved: SavedDevice,
    /// Changed since the last commit.
    pub(crate) dirty: bool,
    /// Recent readings, kept only while the console watches the device.
    pub(crate) recent: Option<Box<Recent>>,
    /// [`crate::store::state_hash`] of the state last committed (0: not known).
    pub(crate) stored_hash: u64,
}

/// Readings whose state is brought into the cache together, ahead of their checks.
const TOUCH_AHEAD: usize = 32;

/// Loads, for the readings `range` of `batch`, one word of every separately allocated part of
/// their devices' state that the checks are about to read, and returns them folded together
/// (the caller hands the result to `black_box`, so the loads stay).
///
/// With 100,000 devices the states do not fit in the cache, and each reading's are a chain of
/// dependent misses (map, slot, device, certificates, drift sources). Checked one by one, a
/// reading waits for each link in turn. Here the chains are walked level by level across the
/// readings: the loads of one level are independent, so the CPU overlaps their misses. Safe
/// code has no prefetch instruction; plain loads serve.
fn touch(states: &IdMap<Box<Slot>>, batch: &BatchView<'_>, range: std::ops::Range<usize>) -> u64 {
    let mut slots: [Option<&Slot>; TOUCH_AHEAD] = [None; TOUCH_AHEAD];
    for (slot, i) in slots.iter_mut().zip(range) {
        *slot = batch
            .get(i)
            .and_then(|r| states.get(r.device))
            .map(|s| &**s);
    }
    let mut x = 0u64;
    // The slot's first lines, and the device record.
    for slot in slots.iter().flatten() {
        x ^= slot.saved.state.last_seq ^ slot.saved.readings ^ slot.device.interval_s;
    }
    // What hangs off them: the certificates, the drift sources, the raised kinds.
    for slot in slots.iter().flatten() {
        let state = &slot.saved.state;
        if let Some(c) = slot.device.certificates.last() {
            x ^= c.verified_at as u64;
        }
        x ^= state.drift.touch() ^ state.present.touch();
    }
    x
}

impl Slot {
    pub(crate) fn new(device: Arc<Device>, agent: u32, saved: SavedDevice) -> Box<Slot> {
        Box::new(Slot {
            device,
            agent,
            saved,
            dirty: false,
            recent: None,
            stored_hash: 0,
        })
    }
}

/// What the gateway knows about an agent.
#[derive(Debug, Default)]
pub(crate) struct AgentInfo {
    /// Its number in this pipeline.
    pub(crate) index: u32,
    /// Its devices in the registry.
    pub(crate) devices: Vec<Id>,
    /// Event-time watermark: the newest `ts` the agent sent (DESIGN decision 1).
    pub(crate) watermark: Option<i64>,
    /// Its last will (or a clean stop) said it is offline, and no batch came since: its
    /// watermark is frozen, so the sweep does not judge its devices by it (which would clear
    /// the `offline` the last will raised); a reading clears it.
    pub(crate) down: bool,
}

/// The ingest pipeline without I/O: bytes of MQTT messages in, line protocol and alert events
/// out, state changed in memory (committed by the caller).
pub struct Pipeline {
    pub(crate) registry: Registry,
    /// Every registered device (boxed: the map's spare capacity stays small).
    pub(crate) states: IdMap<Box<Slot>>,
    /// Devices whose slot is dirty, in the order they became so.
    pub(crate) dirty: Vec<Id>,
    pub(crate) book: AlertBook,
    pub(crate) cfg: CheckConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) agents: IdMap<AgentInfo>,
    pub(crate) verdicts: Vec<Verdict>,
    /// Devices the console watches, with when they were last asked for.
    pub(crate) watched: VecDeque<(Id, Instant)>,
    /// Decodes batches without copying names; its buffers are reused batch after batch.
    decoder: BatchDecoder,
}

impl Pipeline {
    /// A pipeline over `registry`, with the saved states and alerts of the last run. Every
    /// registered device gets a state (a default one if it has none saved); the open alerts
    /// are reconciled into the states (a kind with an open alert is present, so its `Clear`
    /// still comes).
    pub fn new(
        registry: Registry,
        saved: Vec<(Id, SavedDevice)>,
        book: AlertBook,
        cfg: CheckConfig,
        metrics: Arc<Metrics>,
    ) -> Pipeline {
        let mut saved: HashMap<Id, SavedDevice> = saved.into_iter().collect();
        let mut states: IdMap<Box<Slot>> =
            IdMap::with_capacity_and_hasher(registry.len(), Default::default());
        let mut agents: IdMap<AgentInfo> = IdMap::default();
        // Slots are allocated in the order agents' batches name devices (by agent, then id,
        // as most agents poll them), so the states of one batch lie close together in
        // memory rather than scattered in the registry's hash order.
        let mut order: Vec<&Arc<Device>> = registry.device_arcs().collect();
        order.sort_unstable_by(|a, b| (&a.agent, &a.id).cmp(&(&b.agent, &b.id)));
        for device in order {
            let d: &Device = device;
            let next = u32::try_from(agents.len()).unwrap_or(u32::MAX);
            let info = agents.entry(d.agent.clone()).or_insert_with(|| AgentInfo {
                index: next,
                ..AgentInfo::default()
            });
            let slot = Slot::new(
                device.clone(),
                info.index,
                saved.remove(d.id.as_str()).unwrap_or_default(),
            );
            info.devices.push(d.id.clone());
            if let Some(ts) = slot.saved.state.last_ts {
                info.watermark = Some(info.watermark.map_or(ts, |w| w.max(ts)));
            }
            states.insert(d.id.clone(), slot);
        }
        if !saved.is_empty() {
            tracing::info!(
                devices = saved.len(),
                "saved states of devices no longer registered are kept on disk, not loaded"
            );
        }
        for a in book.open() {
            if let Some(slot) = states.get_mut(a.event.device.as_str()) {
                let present = &mut slot.saved.state.present;
                if present.get(a.event.kind).is_none() {
                    present.set(
                        a.event.kind,
                        checks::Raised {
                            severity: a.event.severity,
                            at: a.event.updated,
                        },
                    );
                }
            }
        }
        Pipeline {
            registry,
            states,
            dirty: Vec::new(),
            book,
            cfg,
            metrics,
            agents,
            verdicts: Vec::new(),
            watched: VecDeque::new(),
            decoder: BatchDecoder::new(),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn alerts(&self) -> &AlertBook {
        &self.book
    }

    /// The saved state of a device.
    pub fn device_state(&self, id: &str) -> Option<&SavedDevice> {
        self.states.get(id).map(|s| &s.saved)
    }

    /// Whether anything changed since the last commit.
    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Processes one MQTT message: a reading batch or an agent status. `now_ms` (wall clock)
    /// is the time of a last will.
    pub fn process(&mut self, topic: &str, payload: &[u8], now_ms: i64, out: &mut Output) {
        match Topic::parse(topic) {
            Ok(Topic::Readings { agent }) => self.readings(&agent, payload, out),
            Ok(Topic::Status { agent }) => self.status(&agent, payload, now_ms, out),
            _ => {
                self.metrics.reject("bad_topic", 1);
                tracing::warn!(%topic, "message on an unexpected topic ignored");
            }
        }
    }

    fn readings(&mut self, agent: &Id, payload: &[u8], out: &mut Output) {
        let m = &self.metrics;
        m.messages.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let batch = match self.decoder.decode(payload) {
            Ok(b) => b,
            Err(e) => {
                m.reject(e.reason.as_str(), 1);
                tracing::warn!(%agent, error = %e, "batch rejected");
                return;
            }
        };
        m.decode_latency.record(started.elapsed());
        if batch.agent != agent.as_str() {
            m.reject("agent_mismatch", 1);
            tracing::warn!(%agent, claimed = %batch.agent, "batch names another agent than its topic; rejected");
            return;
        }
        let started = Instant::now();
        m.batches.fetch_add(1, Ordering::Relaxed);
        m.readings_in
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let (mut duplicates, mut gaps, mut unknown, mut unassigned) = (0u64, 0u64, 0u64, 0u64);
        let mut kinds = [0u64; 4];
        let mut newest: Option<i64> = None;
        let agent_index = self.agents.get(agent).map(|a| a.index);
        let mut touched = 0u64;
        for (i, r) in batch.readings().enumerate() {
            if i % TOUCH_AHEAD == 0 {
                touched ^= touch(&self.states, &batch, i..i + TOUCH_AHEAD);
            }
            newest = Some(newest.map_or(r.ts, |n| n.max(r.ts)));
            let mut slot = match self.states.get_mut(r.device) {
                Some(slot) => slot,
                None => {
                    unknown += 1;
                    if unknown == 1 {
                        tracing::warn!(%agent, device = %r.device, "reading for an unregistered device refused");
                    }
                    continue;
                }
            };
            if Some(slot.agent) != agent_index {
                unassigned += 1;
                if unassigned == 1 {
                    tracing::warn!(%agent, device = %r.device, assigned = %slot.device.agent, "reading from an agent the device is not assigned to refused");
                }
                continue;
            }
            let mut reference = None;
            if let Some(ref_id) = slot.device.reference_device.clone() {
                // The reference meter's state, then this device's again (one lookup otherwise).
                reference = self
                    .states
                    .get(ref_id.as_str())
                    .and_then(|s| s.saved.state.reference_energy());
                slot = match self.states.get_mut(r.device) {
                    Some(slot) => slot,
                    None => continue,
                };
            }
            let Slot {
                device,
                saved,
                dirty,
                recent,
                ..
            } = &mut **slot;
            let device: &Device = device;
            let last = saved.state.last_seq;
            if r.seq <= last {
                duplicates += 1;
                continue;
            }
            if last > 0 && r.seq > last + 1 {
                let skipped = r.seq - last - 1;
                saved.gaps += skipped;
                gaps += skipped;
            }
            self.verdicts.clear();
            checks::check_reading(
                device,
                &mut saved.state,
                &r,
                reference,
                &self.cfg,
                &mut self.verdicts,
            );
            saved.readings += 1;
            if let Some(ring) = recent {
                if ring.len() >= crate::command::RECENT_READINGS {
                    ring.pop_front();
                }
                ring.push_back((r.ts, r.values.to_vec()));
            }
            if !*dirty {
                *dirty = true;
                self.dirty.push(device.id.clone());
            }
            let first_event = out.events.len();
            for v in &self.verdicts {
                self.book.apply(device, v, r.ts, &mut out.events);
            }
            self.book.settle(&device.id, r.ts, &mut out.events);

            let vstate = device.vstate(r.ts, self.cfg.due_soon_lead_ms);
            let mut p = out.lines.point("reading").device_tags(device, vstate);
            for (name, value, text) in r.values.iter_with_text() {
                if name == "seq" {
                    continue;
                }
                p = p.value(name, value, text);
            }
            p.int("seq", i64::try_from(r.seq).unwrap_or(i64::MAX))
                .finish(r.ts);
            out.alert_points(first_event, m);
            kinds[kind_slot(device)] += 1;
            out.readings += 1;
        }
        std::hint::black_box(touched);
        if let Some(info) = self.agents.get_mut(agent) {
            info.down = false;
            if let Some(ts) = newest {
                info.watermark = Some(info.watermark.map_or(ts, |w| w.max(ts)));
            }
        }
        let checked: u64 = kinds.iter().sum();
        m.readings_checked.fetch_add(checked, Ordering::Relaxed);
        for (kind, n) in [
            crate::registry::DeviceKind::Scale,
            crate::registry::DeviceKind::Dispenser,
            crate::registry::DeviceKind::EnergyMeter,
            crate::registry::DeviceKind::Other,
        ]
        .into_iter()
        .zip(kinds)
        {
            if n > 0 {
                m.checked(kind, n);
            }
        }
        if duplicates > 0 {
            m.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        }
        if gaps > 0 {
            m.gaps.fetch_add(gaps, Ordering::Relaxed);
        }
        if unknown > 0 {
            m.reject("unknown_device", unknown);
        }
        if unassigned > 0 {
            m.reject("unassigned", unassigned);
        }
        m.check_latency.record(started.elapsed());
    }

    /// An agent's status: `offline` (its last will, or a clean stop) takes all its devices
    /// offline at `now_ms` (DESIGN decision 1, the evidence names the agent).
    fn status(&mut self, agent: &Id, payload: &[u8], now_ms: i64, out: &mut Output) {
        let status = match AgentStatus::decode(payload) {
            Ok(s) => s,
            Err(e) => {
                self.metrics.reject("bad_status", 1);
                tracing::warn!(%agent, error = %e, "agent status not understood");
                return;
            }
        };
        if status.agent != *agent {
            self.metrics.reject("agent_mismatch", 1);
            return;
        }
        if status.state != AgentState::Offline {
            return;
        }
        let Some(info) = self.agents.get_mut(agent) else {
            return;
        };
        info.down = true;
        let mut verdicts = Vec::with_capacity(1);
        let mut marked = 0;
        for id in &info.devices {
            let Some(slot) = self.states.get_mut(id.as_str()) else {
                continue;
            };
            let device: &Device = &slot.device;
            verdicts.clear();
            liveness::agent_offline(
                agent,
                liveness::AgentDown::LastWill,
                now_ms,
                [(device, &mut slot.saved.state)],
                &mut verdicts,
            );
            if !slot.dirty {
                slot.dirty = true;
                self.dirty.push(id.clone());
            }
            let first_event = out.events.len();
            for (_, v) in &verdicts {
                self.book.apply(device, v, now_ms, &mut out.events);
            }
            out.alert_points(first_event, &self.metrics);
            marked += 1;
        }
        tracing::info!(%agent, devices = marked, "agent offline (last will or stop): its devices are offline");
    }

    /// Commits the changes since the last commit, with the burst's alert `transitions`,
    /// retrying a failing store until it works or `stop` is set; returns the outbox seq of the
    /// last transition (0 without any).
    pub fn commit(
        &mut self,
        store: &mut StateStore,
        transitions: &[AlertEvent],
        published_up_to: Option<i64>,
        now_ms: i64,
        stop: &AtomicBool,
    ) -> Result<Committed, Stopped> {
        let mut seen = HashSet::new();
        let mut alerts = Vec::new();
        for ev in self.book.take_dirty().into_iter().rev() {
            if !seen.insert(ev.id.clone()) {
                continue;
            }
            match self.book.get(&ev.device, ev.kind) {
                Some(open) if open.event.id == ev.id => {
                    alerts.push((open.event.clone(), open.clear_since));
                }
                _ => alerts.push((ev, None)),
            }
        }
        alerts.reverse();
        let devices = self
            .dirty
            .iter()
            .filter_map(|id| self.states.get_key_value(id.as_str()))
            .map(|(id, slot)| (id, &slot.saved, slot.stored_hash))
            .collect();
        let commit = Commit {
            devices,
            alerts,
            transitions: transitions.to_vec(),
            next_alert_id: self.book.next_id(),
            published_up_to,
        };
        let backoff = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
        };
        let mut attempt = 0;
        let last = loop {
            match store.commit(&commit, now_ms) {
                Ok(last) => break last,
                Err(e) => {
                    let wait = backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::error!(error = %e, retry_in = ?wait, "state commit failed; ingest waits (nothing acked)");
                    if stop.load(Ordering::Relaxed) {
                        return Err(Stopped);
                    }
                    std::thread::sleep(wait);
                }
            }
        };
        // The hashes follow `devices`: the dirty ids that have a slot, in order.
        let mut hashes = last.hashes.iter();
        for id in self.dirty.drain(..) {
            if let Some(slot) = self.states.get_mut(id.as_str()) {
                slot.dirty = false;
                slot.stored_hash = hashes.next().copied().unwrap_or(0);
            }
        }
        Ok(last)
    }
}

fn kind_slot(device: &Device) -> usize {
    match device.kind {
        crate::registry::DeviceKind::Scale => 0,
        crate::registry::DeviceKind::Dispenser => 1,
        crate::registry::DeviceKind::EnergyMeter => 2,
        crate::registry::DeviceKind::Other => 3,
    }
}

/// An `alert` point (CONTRACT §4) of `e` at `ts_ms`.
pub(crate) fn write_alert(lines: &mut LineBuffer, e: &AlertEvent, ts_ms: i64) {
    lines
        .point("alert")
        .tag("device", e.device.as_str())
        .tag("kind", e.kind.as_str())
        .tag("severity", e.severity.as_str())
        .tag("state", e.state.as_str())
        .tag("owner", e.owner.as_str())
        .tag("site", e.site.as_str())
        .int("count", i64::try_from(e.count).unwrap_or(i64::MAX))
        .string("message", &e.message)
        .finish(ts_ms);
}

/// The pipeline with what makes its output durable: the state store and the sink queues.
pub(crate) struct Core {
    pub(crate) pipeline: Pipeline,
    pub(crate) store: StateStore,
    pub(crate) queues: Arc<Queues>,
    pub(crate) out: Output,
    /// Outbox seqs of published events, with when they were handed to the MQTT client.
    published: VecDeque<(i64, Instant)>,
}

/// The result of one burst or sweep made durable: its events and their last outbox seq.
#[derive(Default)]
pub(crate) struct Durable {
    pub(crate) events: Vec<AlertEvent>,
    pub(crate) committed: Committed,
}

impl Core {
    pub(crate) fn new(pipeline: Pipeline, store: StateStore, queues: Arc<Queues>) -> Core {
        Core {
            pipeline,
            store,
            queues,
            out: Output::default(),
            published: VecDeque::new(),
        }
    }

    /// Steps 1–3 for a burst of MQTT messages.
    fn burst(&mut self, msgs: &[Publish], stop: &AtomicBool) -> Result<Durable, Stopped> {
        let now = crate::now_ms();
        self.out.clear();
        for m in msgs {
            self.pipeline
                .process(&m.topic, &m.payload, now, &mut self.out);
        }
        self.make_durable(now, stop)
    }

    /// Steps 1–3 for registry changes made by another process (see
    /// [`Pipeline::pick_up_registry_changes`]).
    fn registry_check(&mut self, stop: &AtomicBool) -> Result<Durable, Stopped> {
        let now = crate::now_ms();
        self.out.clear();
        match self.pipeline.pick_up_registry_changes(now, &mut self.out) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                devices = n,
                "registry changed by another process; picked up"
            ),
            Err(e) => tracing::warn!(error = %e, "registry not re-read; will try again"),
        }
        self.make_durable(now, stop)
    }

    /// Steps 1–3 for the wall-clock sweep.
    fn sweep(&mut self, stop: &AtomicBool) -> Result<Durable, Stopped> {
        let now = crate::now_ms();
        self.out.clear();
        self.pipeline.sweep(now, &mut self.out);
        self.make_durable(now, stop)
    }

    pub(crate) fn make_durable(&mut self, now: i64, stop: &AtomicBool) -> Result<Durable, Stopped> {
        let started = Instant::now();
        if !self.out.lines.is_empty() {
            self.queues.append(self.out.lines.as_str(), stop)?;
        }
        let events = std::mem::take(&mut self.out.events);
        let mut published_up_to = None;
        while let Some(&(seq, at)) = self.published.front() {
            if at.elapsed() < OUTBOX_GRACE {
                break;
            }
            published_up_to = Some(seq);
            self.published.pop_front();
        }
        let mut committed = Committed::default();
        if self.pipeline.has_changes() || !events.is_empty() || published_up_to.is_some() {
            committed =
                self.pipeline
                    .commit(&mut self.store, &events, published_up_to, now, stop)?;
        }
        self.pipeline
            .metrics
            .commit_latency
            .record(started.elapsed());
        Ok(Durable { events, committed })
    }
}

/// What the ingest task needs from the outside.
pub(crate) struct IngestTask {
    pub(crate) mqtt: MqttConfig,
    pub(crate) client_id: String,
    pub(crate) core: Core,
    pub(crate) alerts: broadcast::Sender<LoggedAlert>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) sweep_interval: Duration,
    pub(crate) max_pending: u64,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Messages received and not yet acknowledged beyond which the source takes no more
/// (`[ingest] max_pending`; DESIGN "The gateway never stalls"). A broker's in-flight limit
/// does not bound this: mosquitto 2.0 hands a resumed session's whole queue over at once
/// (65,324 messages, 94 MB, were waiting in the flood test with `max_inflight_messages 100`).
/// What arrives beyond the bound is dropped *unacknowledged*; once everything taken is
/// processed, the source reconnects and the persistent session redelivers it.
pub const DEFAULT_MAX_PENDING: u64 = 65_536;
/// ... or this many payload bytes.
pub const MAX_PENDING_BYTES: u64 = 256 << 20;

/// Runs the MQTT subscription and the burst loop until `shutdown` turns true.
///
/// Two tasks, and backpressure runs one way (broker → source → burst → durable queues →
/// stores). The source task only ever waits on the broker connection: it forwards every
/// message into an unbounded channel (bounded in practice by the broker's in-flight window and
/// by `[ingest] max_pending`), so keep-alives and acks go out while a burst is processed.
/// The burst loop queues acks and alert events without waiting (the request channel has room
/// for all of them); if it ever has to wait, the wait ends with the shutdown.
pub(crate) async fn run(task: IngestTask) -> Result<(), IngestError> {
    let IngestTask {
        mqtt,
        client_id,
        core,
        alerts,
        mut commands,
        sweep_interval,
        max_pending,
        mut shutdown,
    } = task;
    let mut opts = mqtt.options(&client_id).map_err(IngestError::Settings)?;
    opts.set_manual_acks(true);
    // A persistent session: what we did not acknowledge is redelivered after a reconnect.
    opts.set_clean_session(false);
    // rumqttc's request channel has room for the ack of every message that can be waiting,
    // and alert events besides, so that queuing an ack never waits for the event loop.
    let requests = usize::try_from(max_pending)
        .unwrap_or(usize::MAX)
        .saturating_add(16_384);
    let (client, eventloop) = AsyncClient::new(opts, requests);
    let metrics = core.pipeline.metrics.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Publish>();
    let source = tokio::spawn(source(
        eventloop,
        client.clone(),
        mqtt.url.clone(),
        tx,
        metrics.clone(),
        max_pending,
        shutdown.clone(),
    ));

    let stop = Arc::new(AtomicBool::new(false));
    {
        // Set `stop` as soon as shutdown is asked, so a burst waiting for a full queue ends.
        let stop = stop.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            stop.store(true, Ordering::Relaxed);
        });
    }

    let mut core = Some(core);
    // Events a crash kept from being published (or from being known published).
    let leftover = match core.as_ref() {
        Some(c) => c.store.load_outbox()?,
        None => Vec::new(),
    };
    if !leftover.is_empty() {
        tracing::info!(
            events = leftover.len(),
            "publishing alert events left in the outbox"
        );
        let last = leftover.last().map_or(0, |(seq, _)| *seq);
        let events: Vec<AlertEvent> = leftover.into_iter().map(|(_, e)| e).collect();
        publish(&client, &alerts, &events, &[], &shutdown).await;
        if let Some(c) = core.as_mut() {
            c.published.push_back((last, Instant::now()));
        }
    }

    let mut sweep = tokio::time::interval(sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registry_watch = tokio::time::interval(REGISTRY_WATCH);
    registry_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Fair turns between API commands and bursts: after a burst a waiting command goes
    // first, after a command a waiting burst, so neither starves the other (a command waits
    // at most one burst; a stream of API writes takes at most every other turn).
    let mut command_turn = false;
    let mut result = Ok(());
    loop {
        enum Job {
            Burst(Vec<Publish>, usize),
            Sweep,
            Registry,
            Command(Option<Command>),
        }
        let job = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            // Before the messages, so a backlog cannot starve them (each is ready once a period).
            _ = sweep.tick() => Job::Sweep,
            _ = registry_watch.tick() => Job::Registry,
            Some(cmd) = commands.recv(), if command_turn || rx.is_empty() => Job::Command(Some(cmd)),
            p = rx.recv() => match p {
                Some(first) => {
                    let mut bytes = first.payload.len();
                    let mut burst = vec![first];
                    while burst.len() < BURST_MESSAGES && bytes < BURST_BYTES {
                        match rx.try_recv() {
                            Ok(p) => {
                                bytes += p.payload.len();
                                burst.push(p);
                            }
                            Err(_) => break,
                        }
                    }
                    Job::Burst(burst, bytes)
                }
                None => break,
            },
        };
        let Some(mut c) = core.take() else { break };
        let stop_flag = stop.clone();
        let mut job = job;
        metrics.health.busy(crate::now_ms());
        let joined = tokio::task::spawn_blocking(move || {
            let r = match &mut job {
                Job::Burst(msgs, _) => c.burst(msgs, &stop_flag),
                Job::Sweep => c.sweep(&stop_flag),
                Job::Registry => c.registry_check(&stop_flag),
                Job::Command(cmd) => match cmd.take() {
                    Some(cmd) => c.command(cmd, &stop_flag),
                    None => Err(Stopped),
                },
            };
            (c, job, r)
        })
        .await;
        let (c, job, r) = match joined {
            Ok(x) => x,
            Err(e) => {
                result = Err(IngestError::Task(e.to_string()));
                break;
            }
        };
        core = Some(c);
        let Ok(durable) = r else {
            // Asked to stop while waiting: nothing of this burst was committed or acked.
            break;
        };
        match job {
            Job::Burst(msgs, bytes) => {
                command_turn = true;
                for m in &msgs {
                    if !ack(&client, m, &shutdown).await {
                        break;
                    }
                }
                metrics.health.done(msgs.len(), bytes);
                metrics.bursts.fetch_add(1, Ordering::Relaxed);
            }
            Job::Command(_) => command_turn = false,
            Job::Registry => {}
            Job::Sweep => {
                metrics.sweeps.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = core.as_ref() {
                    tracing::info!(
                        open_alerts = c.pipeline.book.open_count(),
                        "{}",
                        metrics.summary()
                    );
                }
            }
        }
        metrics.health.progress(crate::now_ms());
        if !durable.events.is_empty() {
            publish(
                &client,
                &alerts,
                &durable.events,
                &durable.committed.log_seqs,
                &shutdown,
            )
            .await;
            if let Some(c) = core.as_mut() {
                c.published
                    .push_back((durable.committed.outbox, Instant::now()));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    // The source sends what is queued before the disconnect, then ends.
    let _ = client.try_disconnect();
    let flushed = match tokio::time::timeout(Duration::from_secs(2), source).await {
        Ok(Ok(disconnected)) => disconnected,
        _ => false,
    };
    if let Some(mut c) = core {
        // Disconnect sent what was queued before it: the outbox is published.
        if let (true, Some(&(seq, _))) = (flushed, c.published.back()) {
            if let Err(e) = c.store.published(seq) {
                tracing::warn!(error = %e, "outbox not cleared; its events are published again at start");
            }
        }
        tracing::info!("ingest stopped: {}", c.pipeline.metrics.summary());
    }
    result
}

/// The source: the broker connection's event loop. It waits on nothing but the connection
/// (and, between reconnects, the backoff or the shutdown). Returns whether it ended with a
/// clean disconnect (everything queued before it was sent).
async fn source(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    url: String,
    tx: mpsc::UnboundedSender<Publish>,
    metrics: Arc<Metrics>,
    max_pending: u64,
    shutdown: watch::Receiver<bool>,
) -> bool {
    // Alert events and acks are small: no Nagle delay (40 ms with delayed ACKs).
    eventloop.network_options.set_tcp_nodelay(true);
    let health = &metrics.health;
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
                health.disconnected(crate::now_ms());
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
            health.disconnected(crate::now_ms());
            shedding = false;
        }
    }
}

/// Queues the ack of `m`; waits (until the shutdown) only if the request channel is full.
/// Returns false if the gateway is stopping.
async fn ack(client: &AsyncClient, m: &Publish, shutdown: &watch::Receiver<bool>) -> bool {
    if client.try_ack(m).is_ok() {
        return true;
    }
    match unless_stopping(client.ack(m), shutdown).await {
        Some(Ok(())) => true,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "ack not sent; the broker will redeliver (dedup drops it)");
            true
        }
        None => false,
    }
}

/// `fut`, unless the gateway is asked to stop first (then `None`): every wait of ingest on
/// something other than the broker connection ends with the shutdown.
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

/// Step 5: alert events to MQTT (QoS 1, not retained) and to in-process subscribers. Like
/// the acks, an event waits for room in the request channel only until the shutdown (it
/// stays in the outbox and is published at the next start).
async fn publish(
    client: &AsyncClient,
    alerts: &broadcast::Sender<LoggedAlert>,
    events: &[AlertEvent],
    log_seqs: &[i64],
    shutdown: &watch::Receiver<bool>,
) {
    for (i, e) in events.iter().enumerate() {
        let topic = alert_topic(&e.owner, &e.device);
        let sent = match client.try_publish(&topic, QoS::AtLeastOnce, false, e.encode()) {
            Ok(()) => Ok(()),
            Err(_) => {
                let publish = client.publish(topic, QoS::AtLeastOnce, false, e.encode());
                match unless_stopping(publish, shutdown).await {
                    Some(r) => r,
                    None => return,
                }
            }
        };
        if let Err(err) = sent {
            tracing::warn!(error = %err, id = %e.id, "alert event not published");
        }
        // No subscriber is not an error.
        let _ = alerts.send(LoggedAlert {
            seq: log_seqs.get(i).copied().unwrap_or(0),
            event: e.clone(),
        });
    }
}
