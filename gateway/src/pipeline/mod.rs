//! The pipeline: what ingest does to a message, without I/O. Bytes of an agent's message in
//! (a reading batch or a status) → decode → agent assignment → dedup on (device, seq) →
//! [`checks::check_reading`] → [`AlertBook::apply`] / [`AlertBook::settle`] → points of
//! CONTRACT §4 ([`crate::series`]) and alert events out; the device states changed in memory,
//! to be made durable by the caller ([`Pipeline::changes`], then [`Pipeline::committed`]).
//!
//! The checks are deterministic functions of state and reading, in event time, so a message
//! processed again from the same committed state produces the same points and events: what
//! makes redelivery after a crash harmless (see `crate::ingest` for the durability order).
//! The wall-clock part is [`sweep`]; what the API reads and changes is [`views`].

mod sweep;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
pub(crate) mod views;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use calwatch_protocol::{
    AgentState, AgentStatus, AlertEvent, BatchDecoder, BatchView, Id, Topic, Value,
};

use crate::alerts::AlertBook;
use crate::checks::liveness::AgentLiveness;
use crate::checks::{self, liveness, CheckConfig, SavedDevice, Verdict};
use crate::domain::{Device, DeviceKind, Devices};
use crate::metrics::Metrics;
use crate::series;
use crate::sink::line::LineBuffer;

/// Readings kept per watched device for the console's chart.
pub(crate) const RECENT_READINGS: usize = 300;
/// Devices watched at once (their recent readings kept in memory).
pub(crate) const WATCHED_MAX: usize = 32;
/// A device not asked for this long is no longer watched.
pub(crate) const WATCH_FOR: Duration = Duration::from_secs(600);

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
            series::alert(&mut self.lines, e, e.updated);
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
    /// [`crate::persist::state::state_hash`] of the state last committed (0: not known).
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
    /// Unheard on the wall clock for `offline_factor` status periods: its devices were taken
    /// offline (decision 1); a batch or a status clears it.
    pub(crate) silent: bool,
    /// When it was last heard from (a batch or a status), by the gateway's clock.
    pub(crate) heard: Option<i64>,
    /// When its last batch arrived, and the gap its batches arrive at (the larger of the
    /// last gap and a slowly decaying past one; 0 until two have arrived): readings come
    /// in batches, so wall-clock silence is only silence beyond `offline_factor` gaps.
    pub(crate) last_batch: Option<i64>,
    pub(crate) batch_gap: i64,
    /// The devices its last status said it cannot poll, with their last good poll, and that
    /// status's time (both by the agent's clock; decision 11).
    pub(crate) failing: Vec<(Id, Option<i64>)>,
    pub(crate) status_ts: i64,
    /// Its liveness changed since the last commit.
    pub(crate) dirty: bool,
}

impl AgentInfo {
    /// Its liveness as saved.
    pub(crate) fn liveness(&self) -> AgentLiveness {
        AgentLiveness {
            down: self.down,
            silent: self.silent,
            watermark: self.watermark,
            heard: self.heard,
        }
    }

    /// Online: heard from, and neither its last will nor its silence took its devices offline.
    pub(crate) fn online(&self) -> bool {
        self.heard.is_some() && !self.down && !self.silent
    }
}

/// The pipeline over the registered devices and their check state (see the module
/// documentation).
pub struct Pipeline {
    pub(crate) devices: Devices,
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
    /// Agents whose liveness changed since the last commit, in that order.
    pub(crate) dirty_agents: Vec<Id>,
    /// When this pipeline started (wall clock): silence on the wall clock counts from here at
    /// the earliest, so a restart is not mistaken for silence.
    pub(crate) started: i64,
    /// Decodes batches without copying names; its buffers are reused batch after batch.
    decoder: BatchDecoder,
}

impl Pipeline {
    /// A pipeline over `devices`, with the saved states and alerts of the last run. Every
    /// registered device gets a state (a default one if it has none saved); the open alerts
    /// are reconciled into the states (a kind with an open alert is present, so its `Clear`
    /// still comes).
    pub fn new(
        devices: Devices,
        saved: Vec<(Id, SavedDevice)>,
        book: AlertBook,
        cfg: CheckConfig,
        metrics: Arc<Metrics>,
    ) -> Pipeline {
        let mut saved: HashMap<Id, SavedDevice> = saved.into_iter().collect();
        let mut states: IdMap<Box<Slot>> =
            IdMap::with_capacity_and_hasher(devices.len(), Default::default());
        let mut agents: IdMap<AgentInfo> = IdMap::default();
        // Slots are allocated in the order agents' batches name devices (by agent, then id,
        // as most agents poll them), so the states of one batch lie close together in
        // memory rather than scattered in the registry's hash order.
        let mut order: Vec<&Arc<Device>> = devices.device_arcs().collect();
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
            devices,
            states,
            dirty: Vec::new(),
            book,
            cfg,
            metrics,
            agents,
            verdicts: Vec::new(),
            watched: VecDeque::new(),
            dirty_agents: Vec::new(),
            started: 0,
            decoder: BatchDecoder::new(),
        }
    }

    /// Takes up the agents' liveness of the last run (decision 11: it survives a restart, so
    /// the first sweep does not clear what a last will raised), and `started_ms` as the start
    /// of wall-clock silence.
    pub(crate) fn restore_agents(&mut self, saved: Vec<(Id, AgentLiveness)>, started_ms: i64) {
        self.started = started_ms;
        for (id, live) in saved {
            if let Some(info) = self.agents.get_mut(&id) {
                info.down = live.down;
                info.silent = live.silent;
                info.heard = live.heard;
                if let Some(wm) = live.watermark {
                    info.watermark = Some(info.watermark.map_or(wm, |w| w.max(wm)));
                }
            }
        }
    }

    /// Marks an agent's liveness changed.
    fn agent_changed(dirty_agents: &mut Vec<Id>, id: &Id, info: &mut AgentInfo) {
        if !info.dirty {
            info.dirty = true;
            dirty_agents.push(id.clone());
        }
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
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
        !self.dirty.is_empty() || !self.dirty_agents.is_empty()
    }

    /// Processes one MQTT message: a reading batch or an agent status. `now_ms` (wall clock)
    /// is the time of a last will.
    pub fn process(&mut self, topic: &str, payload: &[u8], now_ms: i64, out: &mut Output) {
        match Topic::parse(topic) {
            Ok(Topic::Readings { agent }) => self.readings(&agent, payload, now_ms, out),
            Ok(Topic::Status { agent }) => self.status(&agent, payload, now_ms, out),
            _ => {
                self.metrics.reject("bad_topic", 1);
                tracing::warn!(%topic, "message on an unexpected topic ignored");
            }
        }
    }

    fn readings(&mut self, agent: &Id, payload: &[u8], now_ms: i64, out: &mut Output) {
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
            saved.arrived = Some(now_ms);
            // The watermark moves on accepted readings only: an unknown device's, another
            // agent's or a duplicate's `ts` says nothing about this agent's devices.
            newest = Some(newest.map_or(r.ts, |n| n.max(r.ts)));
            if let Some(ring) = recent {
                if ring.len() >= RECENT_READINGS {
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
            series::reading(&mut out.lines, device, vstate, &r);
            out.alert_points(first_event, m);
            kinds[kind_slot(device)] += 1;
            out.readings += 1;
        }
        std::hint::black_box(touched);
        if let Some(info) = self.agents.get_mut(agent) {
            info.down = false;
            info.silent = false;
            info.heard = Some(now_ms);
            if let Some(gap) = info.last_batch.map(|last| now_ms - last).filter(|g| *g > 0) {
                info.batch_gap = if gap >= info.batch_gap {
                    gap
                } else {
                    info.batch_gap - (info.batch_gap - gap) / 8
                };
            }
            info.last_batch = Some(now_ms);
            if let Some(ts) = newest {
                info.watermark = Some(info.watermark.map_or(ts, |w| w.max(ts)));
            }
            Self::agent_changed(&mut self.dirty_agents, agent, info);
        }
        let checked: u64 = kinds.iter().sum();
        m.readings_checked.fetch_add(checked, Ordering::Relaxed);
        for (kind, n) in [
            DeviceKind::Scale,
            DeviceKind::Dispenser,
            DeviceKind::EnergyMeter,
            DeviceKind::Other,
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
        let Some(info) = self.agents.get_mut(agent) else {
            return;
        };
        Self::agent_changed(&mut self.dirty_agents, agent, info);
        if status.state != AgentState::Offline {
            self.online_status(agent, &status, now_ms, out);
            return;
        }
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

    /// An online status (at least once a minute, decision 11): the agent is heard from, and
    /// the devices it says it cannot poll are judged at once.
    fn online_status(&mut self, agent: &Id, status: &AgentStatus, now_ms: i64, out: &mut Output) {
        let Some(info) = self.agents.get_mut(agent) else {
            return;
        };
        info.down = false;
        info.silent = false;
        info.heard = Some(now_ms);
        info.status_ts = status.ts;
        info.failing = status
            .health
            .iter()
            .filter(|(_, h)| h.consecutive_failures > 0)
            .map(|(id, h)| (id.clone(), h.last_ok))
            .collect();
        let failing: Vec<Id> = info.failing.iter().map(|(id, _)| id.clone()).collect();
        // What the checks take from the identity data (the energy register's wrap, decision
        // 17), for this agent's own devices only.
        for (id, data) in &status.device_info {
            let Some(slot) = self.states.get_mut(id.as_str()) else {
                continue;
            };
            if slot.device.agent != *agent {
                continue;
            }
            if checks::seal::apply_device_info(&mut slot.saved.state, data) && !slot.dirty {
                slot.dirty = true;
                self.dirty.push(id.clone());
            }
        }
        for id in failing {
            self.judge_liveness(&id, now_ms, out);
        }
    }

    /// Judges the liveness of a device whose agent is online (see [`liveness::judge`]);
    /// returns whether its state changed. Devices of an agent that is down or silent keep the
    /// `offline` that took them down until a reading of theirs comes.
    pub(crate) fn judge_liveness(&mut self, id: &Id, now_ms: i64, out: &mut Output) -> bool {
        let Some(slot) = self.states.get_mut(id.as_str()) else {
            return false;
        };
        let Some(agent) = self.agents.get(&slot.device.agent).filter(|a| a.online()) else {
            return false;
        };
        let signals = sweep::signals(
            agent,
            &slot.device,
            &self.cfg,
            slot.saved.arrived,
            now_ms,
            self.started,
        );
        let device: &Device = &slot.device;
        let Some((v, at)) = liveness::judge(device, &mut slot.saved.state, &signals, &self.cfg)
        else {
            return false;
        };
        let first = out.events.len();
        self.book.apply(device, &v, at, &mut out.events);
        out.alert_points(first, &self.metrics);
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(id.clone());
        }
        true
    }

    /// What changed since the last commit, for the caller to make durable: the changed
    /// devices (with the hash of the state last stored for each) and the changed alerts
    /// (the newest version of each, with its clear-since time).
    pub fn changes(&mut self) -> Changes<'_> {
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
        let agents = self
            .dirty_agents
            .iter()
            .filter_map(|id| self.agents.get_key_value(id))
            .map(|(id, a)| (id, a.liveness()))
            .collect();
        Changes {
            devices,
            alerts,
            agents,
            next_alert_id: self.book.next_id(),
        }
    }

    /// The last [`Pipeline::changes`] are durable; `hashes` are the stored states' hashes, in
    /// the order of their devices.
    pub fn committed(&mut self, hashes: &[u64]) {
        for id in self.dirty_agents.drain(..) {
            if let Some(a) = self.agents.get_mut(&id) {
                a.dirty = false;
            }
        }
        let mut hashes = hashes.iter();
        for id in self.dirty.drain(..) {
            if let Some(slot) = self.states.get_mut(id.as_str()) {
                slot.dirty = false;
                slot.stored_hash = hashes.next().copied().unwrap_or(0);
            }
        }
    }
}

/// What changed since the last commit (see [`Pipeline::changes`]).
pub struct Changes<'a> {
    /// Changed devices, with the hash of the state last stored for each (0: unknown).
    pub devices: Vec<(&'a Id, &'a SavedDevice, u64)>,
    /// Alert versions to store, with their clear-since time.
    pub alerts: Vec<(AlertEvent, Option<i64>)>,
    /// Agents whose liveness changed.
    pub(crate) agents: Vec<(&'a Id, AgentLiveness)>,
    pub next_alert_id: u64,
}

fn kind_slot(device: &Device) -> usize {
    match device.kind {
        DeviceKind::Scale => 0,
        DeviceKind::Dispenser => 1,
        DeviceKind::EnergyMeter => 2,
        DeviceKind::Other => 3,
    }
}
