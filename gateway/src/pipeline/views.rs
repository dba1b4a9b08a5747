//! What the API reads of the pipeline's state (devices with their verification state and
//! drift statistics, coverage, a watched device's recent readings) and how a registry
//! change reaches it ([`Pipeline::sync_registry`]). Views are read where the state lives,
//! on the ingest task, so they are never behind the checks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use calwatch_protocol::{AlertKind, Id, Value};
use serde::Serialize;

use super::{AgentInfo, Output, Pipeline, Slot, RECENT_READINGS, WATCHED_MAX, WATCH_FOR};
use crate::checks::{self, liveness};
use crate::domain::{
    days_to_due, in_use_verified, Certificate, Device, Devices, COVERAGE_TARGET_PCT,
};

/// Filters and page of `GET /api/devices`.
#[derive(Clone, Debug, Default)]
pub struct DeviceQuery {
    pub owner: Option<Id>,
    pub site: Option<String>,
    pub kind: Option<String>,
    pub vstate: Option<String>,
    pub agent: Option<String>,
    pub limit: usize,
    pub offset: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct DevicePage {
    pub items: Vec<DeviceView>,
    pub total: usize,
    pub limit: usize,
    pub offset: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CertificateView {
    pub certificate: String,
    pub verified_at: i64,
    pub valid_until: Option<i64>,
    pub result: &'static str,
    pub verifier: String,
    pub event_counter: Option<f64>,
    pub k_factor: Option<f64>,
}

impl From<&Certificate> for CertificateView {
    fn from(c: &Certificate) -> Self {
        CertificateView {
            certificate: c.certificate.to_string(),
            verified_at: c.verified_at,
            valid_until: c.valid_until,
            result: if c.passed { "pass" } else { "fail" },
            verifier: c.verifier.to_string(),
            event_counter: c.event_counter,
            k_factor: c.k_factor,
        }
    }
}

/// A device as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceView {
    pub id: String,
    pub kind: &'static str,
    pub owner: String,
    pub site: String,
    pub agent: String,
    pub model: String,
    pub serial: String,
    pub accuracy_class: Option<String>,
    pub max: Option<f64>,
    pub e: Option<f64>,
    pub mpe_pct: Option<f64>,
    pub interval_s: u64,
    pub reference_device: Option<String>,
    pub vstate: &'static str,
    pub days_to_due: Option<f64>,
    /// The certificate in force now.
    pub certificate: Option<CertificateView>,
    /// Every certificate, oldest first.
    pub certificates: Vec<CertificateView>,
    pub last_seen: Option<i64>,
    pub readings: u64,
    pub gaps: u64,
    pub drift: checks::drift::DriftSummary,
    pub open_alerts: Vec<&'static str>,
}

/// A device's recent readings and normalised errors, for the console's chart.
#[derive(Clone, Debug, Serialize)]
pub struct RecentView {
    pub device: String,
    /// Readings seen since the device was first asked for (at most [`RECENT_READINGS`]).
    pub readings: Vec<RecentReading>,
    /// `[ts, r]`: the normalised error (error / MPE, ±1 is the MPE band) of the most drifted
    /// comparison source, averaged per bucket as the trend sees it.
    pub r: Vec<(i64, f64)>,
    pub r_source: Option<checks::drift::DriftSource>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecentReading {
    pub ts: i64,
    pub values: BTreeMap<String, serde_json::Value>,
}

/// Grouping of `GET /api/coverage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoverageBy {
    Owner,
    Site,
    Kind,
}

impl CoverageBy {
    pub fn parse(s: &str) -> Option<CoverageBy> {
        match s {
            "owner" => Some(CoverageBy::Owner),
            "site" => Some(CoverageBy::Site),
            "kind" => Some(CoverageBy::Kind),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CoverageRow {
    /// The owner, site or kind.
    pub key: String,
    pub registered: u64,
    /// Reported within the last day.
    pub in_use: u64,
    /// In use with a valid (or due-soon) certificate.
    pub verified: u64,
    /// `None` when nothing is in use.
    pub coverage_pct: Option<f64>,
    pub target_pct: f64,
}

impl Pipeline {
    fn view(&self, slot: &Slot, now: i64) -> DeviceView {
        let d = &slot.device;
        let state = &slot.saved.state;
        DeviceView {
            id: d.id.to_string(),
            kind: d.kind.as_str(),
            owner: d.owner.to_string(),
            site: d.site.to_string(),
            agent: d.agent.to_string(),
            model: d.model.to_string(),
            serial: d.serial.to_string(),
            accuracy_class: d.accuracy_class.as_ref().map(|c| c.to_string()),
            max: d.max,
            e: d.e,
            mpe_pct: d.mpe_pct,
            interval_s: d.interval_s,
            reference_device: d.reference_device.as_ref().map(Id::to_string),
            vstate: d.vstate(now, self.cfg.due_soon_lead_ms).as_str(),
            days_to_due: days_to_due(d, now),
            certificate: d.certificate_at(now).map(CertificateView::from),
            certificates: d.certificates.iter().map(CertificateView::from).collect(),
            last_seen: state.last_ts,
            readings: slot.saved.readings,
            gaps: slot.saved.gaps,
            drift: checks::status(state),
            open_alerts: AlertKind::ALL
                .iter()
                .filter(|k| self.book.get(&d.id, **k).is_some())
                .map(|k| k.as_str())
                .collect(),
        }
    }

    /// Devices matching `q`, sorted by id, one page.
    pub fn devices_page(&self, q: &DeviceQuery, now: i64) -> DevicePage {
        let lead = self.cfg.due_soon_lead_ms;
        let mut matching: Vec<&Slot> = self
            .states
            .values()
            .map(|s| &**s)
            .filter(|s| {
                let d = &s.device;
                q.owner.as_ref().is_none_or(|o| &d.owner == o)
                    && q.site.as_deref().is_none_or(|x| d.site.as_str() == x)
                    && q.kind.as_deref().is_none_or(|x| d.kind.as_str() == x)
                    && q.agent.as_deref().is_none_or(|x| d.agent.as_str() == x)
                    && q.vstate
                        .as_deref()
                        .is_none_or(|x| d.vstate(now, lead).as_str() == x)
            })
            .collect();
        matching.sort_unstable_by(|a, b| a.device.id.cmp(&b.device.id));
        let total = matching.len();
        let items = matching
            .into_iter()
            .skip(q.offset)
            .take(q.limit)
            .map(|s| self.view(s, now))
            .collect();
        DevicePage {
            items,
            total,
            limit: q.limit,
            offset: q.offset,
        }
    }

    pub fn device_view(&self, id: &str, now: i64) -> Option<DeviceView> {
        self.states.get(id).map(|s| self.view(s, now))
    }

    /// Coverage grouped `by`, of `owner`'s devices only when given.
    pub fn coverage(&self, by: CoverageBy, owner: Option<&Id>, now: i64) -> Vec<CoverageRow> {
        let lead = self.cfg.due_soon_lead_ms;
        let mut groups: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
        for slot in self.states.values() {
            let d = &slot.device;
            if owner.is_some_and(|o| &d.owner != o) {
                continue;
            }
            let key = match by {
                CoverageBy::Owner => d.owner.as_str(),
                CoverageBy::Site => d.site.as_str(),
                CoverageBy::Kind => d.kind.as_str(),
            };
            let last_seen = slot.saved.state.last_ts.max(slot.saved.arrived);
            let (in_use, verified) =
                in_use_verified(d, last_seen, checks::intact(&slot.saved.state), now, lead);
            let g = groups.entry(key).or_default();
            g.0 += 1;
            g.1 += u64::from(in_use);
            g.2 += u64::from(verified);
        }
        groups
            .into_iter()
            .map(|(key, (registered, in_use, verified))| CoverageRow {
                key: key.to_string(),
                registered,
                in_use,
                verified,
                coverage_pct: (in_use > 0).then(|| 100.0 * verified as f64 / in_use as f64),
                target_pct: COVERAGE_TARGET_PCT,
            })
            .collect()
    }

    /// The recent readings of `id`, starting to keep them if it was not watched.
    pub fn recent(&mut self, id: &str) -> Option<RecentView> {
        let now = Instant::now();
        self.watched
            .retain(|(_, at)| now.duration_since(*at) < WATCH_FOR);
        if let Some(pos) = self.watched.iter().position(|(w, _)| w.as_str() == id) {
            self.watched.remove(pos);
        } else if self.states.contains_key(id) {
            while self.watched.len() >= WATCHED_MAX {
                self.watched.pop_front();
            }
        }
        let slot = self.states.get_mut(id)?;
        self.watched.push_back((slot.device.id.clone(), now));
        let keep: std::collections::HashSet<&Id> = self.watched.iter().map(|(w, _)| w).collect();
        let ring = slot
            .recent
            .get_or_insert_with(|| Box::new(VecDeque::with_capacity(RECENT_READINGS)));
        let readings = ring
            .iter()
            .map(|(ts, values)| RecentReading {
                ts: *ts,
                values: values
                    .iter()
                    .map(|(n, v)| {
                        let v = match v {
                            Value::Number(x) => serde_json::json!(x),
                            Value::Bool(b) => serde_json::json!(b),
                        };
                        (n.to_string(), v)
                    })
                    .collect(),
            })
            .collect();
        let summary = checks::status(&slot.saved.state);
        let r = summary
            .source
            .map(|s| {
                slot.saved
                    .state
                    .drift
                    .get(s)
                    .trend
                    .iter()
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        let view = RecentView {
            device: id.to_string(),
            readings,
            r,
            r_source: summary.source,
        };
        // Stop keeping readings of devices no longer watched.
        let dropped: Vec<Id> = self
            .states
            .iter()
            .filter(|(k, s)| s.recent.is_some() && !keep.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        for k in dropped {
            if let Some(s) = self.states.get_mut(k.as_str()) {
                s.recent = None;
            }
        }
        Some(view)
    }

    /// The devices whose records in `fresh` (a registry read again) differ from the ones
    /// judged now, or are new.
    pub(crate) fn changed_devices(&self, fresh: &Devices) -> Vec<Id> {
        fresh
            .devices()
            .filter(|d| self.devices.device(d.id.as_str()).is_none_or(|b| b != *d))
            .map(|d| d.id.clone())
            .collect()
    }

    /// Takes `devices` (the registry after a change of `changed`) as the devices judged:
    /// new slots for new devices, the new record (tags, agent) for changed ones, and the
    /// verification window judged again at `now` for those whose certificates changed, so a
    /// new certificate shows at once (an `overdue` alert starts its hold to resolve).
    pub(crate) fn sync_registry(
        &mut self,
        devices: Devices,
        changed: &[Id],
        now: i64,
        out: &mut Output,
    ) {
        self.devices = devices;
        // A reload made new records of every device: point every slot at its new one.
        let ids: Vec<Id> = self.devices.devices().map(|d| d.id.clone()).collect();
        for id in ids {
            let Some(fresh) = self.devices.device_arc(id.as_str()).cloned() else {
                continue;
            };
            let next = u32::try_from(self.agents.len()).unwrap_or(u32::MAX);
            let agent = self
                .agents
                .entry(fresh.agent.clone())
                .or_insert_with(|| AgentInfo {
                    index: next,
                    ..AgentInfo::default()
                });
            let agent_index = agent.index;
            match self.states.get_mut(id.as_str()) {
                Some(slot) => {
                    if slot.device.agent != fresh.agent {
                        if let Some(old) = self.agents.get_mut(&slot.device.agent) {
                            old.devices.retain(|d| d != &id);
                        }
                        if let Some(new) = self.agents.get_mut(&fresh.agent) {
                            new.devices.push(id.clone());
                        }
                    }
                    let certs_changed = slot.device.certificates != fresh.certificates;
                    slot.replace_device(fresh, agent_index);
                    if certs_changed || changed.contains(&id) {
                        let device = slot.device.clone();
                        let state = &mut slot.saved.state;
                        self.verdicts.clear();
                        let in_use = !liveness::silent(&device, state, now, &self.cfg);
                        checks::judge_window(
                            &device,
                            state,
                            now,
                            in_use,
                            &self.cfg,
                            &mut self.verdicts,
                        );
                        let first = out.events.len();
                        for v in &self.verdicts {
                            self.book.apply(&device, v, now, &mut out.events);
                        }
                        out.alert_points(first, &self.metrics);
                        if !slot.dirty {
                            slot.dirty = true;
                            self.dirty.push(id.clone());
                        }
                    }
                }
                None => {
                    agent.devices.push(id.clone());
                    let slot = Slot::new(fresh, agent_index, Default::default());
                    self.states.insert(id.clone(), slot);
                }
            }
        }
    }
}

impl Slot {
    /// Points the slot at a new record of its device (after a registry reload).
    pub(crate) fn replace_device(&mut self, fresh: Arc<Device>, agent: u32) {
        self.device = fresh;
        self.agent = agent;
    }
}
