//! Requests of the HTTP API to the ingest task, which owns the registry in memory, the check
//! state and the alert book: views are read where the state lives, and changes (devices,
//! certificates, acknowledgements) go through the same commit as readings, so they are
//! durable, audited and published before the API answers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use calwatch_protocol::{AlertEvent, AlertKind, Id, Value};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::alerts::AckError;
use crate::checks::{self, liveness};
use crate::ingest::{AgentInfo, Core, Durable, Pipeline, Slot, Stopped};
use crate::registry::{Certificate, Device, ImportError, VState};
use crate::sweep::{days_to_due, IN_USE_WITHIN_MS};

/// Readings kept per watched device for the console's chart.
pub const RECENT_READINGS: usize = 300;
/// Devices watched at once (their recent readings kept in memory).
pub const WATCHED_MAX: usize = 32;
/// A device not asked for this long is no longer watched.
pub const WATCH_FOR: Duration = Duration::from_secs(600);
/// The coverage target of the bureau (DESIGN): 92 %.
pub const COVERAGE_TARGET_PCT: f64 = 92.0;

/// What the API sends.
pub enum Command {
    Devices {
        query: DeviceQuery,
        reply: oneshot::Sender<DevicePage>,
    },
    Device {
        id: String,
        reply: oneshot::Sender<Option<DeviceView>>,
    },
    /// Recent readings and normalised errors of a device; starts watching it.
    Readings {
        id: String,
        reply: oneshot::Sender<Option<RecentView>>,
    },
    Coverage {
        by: CoverageBy,
        owner: Option<Id>,
        reply: oneshot::Sender<Vec<CoverageRow>>,
    },
    /// Register or update devices (JSON object or `devices.csv` text).
    Register {
        input: Input,
        /// An owner's token may only touch devices of this owner.
        scope: Option<Id>,
        actor: String,
        reply: oneshot::Sender<Result<Vec<Id>, Refusal>>,
    },
    /// Record certificates (JSON object for one device, or `verifications.csv` text).
    Record {
        input: Input,
        /// The verifier's name; a JSON certificate must carry it (or none).
        verifier: String,
        actor: String,
        reply: oneshot::Sender<Result<Vec<Id>, Refusal>>,
    },
    Ack {
        id: String,
        actor: String,
        reply: oneshot::Sender<Result<AlertEvent, AckError>>,
    },
    /// A refused change, for the audit log.
    Denied {
        actor: String,
        action: String,
        subject: String,
        attempted: String,
        why: String,
        reply: oneshot::Sender<()>,
    },
}

/// A registry change as it arrived.
pub enum Input {
    Json {
        /// The device id from the path (certificates), if any.
        device: Option<String>,
        object: serde_json::Map<String, serde_json::Value>,
    },
    /// A devices.csv, parsed and checked row by row off the ingest task
    /// ([`crate::registry::parse_device_rows`]).
    DeviceRows {
        /// Name used in errors (`devices.csv:3: …`).
        file: String,
        rows: Vec<(u64, crate::registry::Device)>,
    },
    /// A verifications.csv, likewise ([`crate::registry::parse_verification_rows`]).
    CertificateRows {
        file: String,
        rows: Vec<(u64, Id, crate::registry::Certificate)>,
    },
}

/// Why a registry change was refused.
#[derive(Debug)]
pub enum Refusal {
    /// The data is bad (`file:line: reason`).
    Invalid(ImportError),
    /// Not the caller's to change.
    Forbidden(String),
    /// The registry could not be written.
    Failed(String),
}

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

/// Whether a device reported recently enough to count as in use, and whether it is verified
/// then (the rule of the `coverage` measurement).
pub(crate) fn in_use_verified(
    device: &Device,
    last_ts: Option<i64>,
    now: i64,
    lead: i64,
) -> (bool, bool) {
    let in_use = last_ts.is_some_and(|last| now - last <= IN_USE_WITHIN_MS);
    let verified = in_use && matches!(device.vstate(now, lead), VState::Valid | VState::DueSoon);
    (in_use, verified)
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
            let (in_use, verified) = in_use_verified(d, slot.saved.state.last_ts, now, lead);
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

    /// Picks up what another process committed to the registry (`calwatch-gateway import`
    /// beside the running gateway): re-reads it and brings in line the devices whose records
    /// changed, as an API change would. Returns how many changed.
    pub(crate) fn pick_up_registry_changes(
        &mut self,
        now: i64,
        out: &mut crate::ingest::Output,
    ) -> Result<usize, crate::registry::RegistryError> {
        if !self.registry.changed_on_disk()? {
            return Ok(0);
        }
        let before: HashMap<Id, Arc<Device>> = self
            .registry
            .device_arcs()
            .map(|d| (d.id.clone(), d.clone()))
            .collect();
        self.registry.reload()?;
        let changed: Vec<Id> = self
            .registry
            .devices()
            .filter(|d| before.get(d.id.as_str()).is_none_or(|b| **b != **d))
            .map(|d| d.id.clone())
            .collect();
        if !changed.is_empty() {
            self.sync_registry(&changed, now, out);
        }
        Ok(changed.len())
    }

    /// Brings the in-memory devices in line with the registry after a change of `changed`:
    /// new slots for new devices, the new record (tags, agent) for changed ones, and the
    /// verification window judged again at `now` for those whose certificates changed, so a
    /// new certificate shows at once (an `overdue` alert starts its hold to resolve).
    pub(crate) fn sync_registry(
        &mut self,
        changed: &[Id],
        now: i64,
        out: &mut crate::ingest::Output,
    ) {
        // A reload made new records of every device: point every slot at its new one.
        let ids: Vec<Id> = self.registry.devices().map(|d| d.id.clone()).collect();
        for id in ids {
            let Some(fresh) = self.registry.device_arc(id.as_str()).cloned() else {
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

impl Core {
    /// Runs one API command; changes are made durable (and their events published by the
    /// caller) before the reply is sent.
    pub(crate) fn command(&mut self, cmd: Command, stop: &AtomicBool) -> Result<Durable, Stopped> {
        let now = crate::now_ms();
        self.out.clear();
        let p = &mut self.pipeline;
        match cmd {
            Command::Devices { query, reply } => {
                let _ = reply.send(p.devices_page(&query, now));
            }
            Command::Device { id, reply } => {
                let _ = reply.send(p.device_view(&id, now));
            }
            Command::Readings { id, reply } => {
                let _ = reply.send(p.recent(&id));
            }
            Command::Coverage { by, owner, reply } => {
                let _ = reply.send(p.coverage(by, owner.as_ref(), now));
            }
            Command::Register {
                input,
                scope,
                actor,
                reply,
            } => {
                let result = register(p, input, scope.as_ref(), &actor, now, &mut self.out);
                let durable = self.make_durable(now, stop)?;
                let _ = reply.send(result);
                return Ok(durable);
            }
            Command::Record {
                input,
                verifier,
                actor,
                reply,
            } => {
                let result = record(p, input, &verifier, &actor, now, &mut self.out);
                let durable = self.make_durable(now, stop)?;
                let _ = reply.send(result);
                return Ok(durable);
            }
            Command::Ack { id, actor, reply } => {
                let result = p.book.ack(&id, &actor, now);
                let event = match result {
                    Ok(Some(e)) => {
                        self.out.events.push(e.clone());
                        self.out.alert_points(self.out.events.len() - 1, &p.metrics);
                        Ok(e)
                    }
                    // Acknowledged before: the alert as it is.
                    Ok(None) => p
                        .book
                        .get_by_id(&id)
                        .map(|a| a.event.clone())
                        .ok_or(AckError::NotOpen(id)),
                    Err(e) => Err(e),
                };
                let durable = self.make_durable(now, stop)?;
                let _ = reply.send(event);
                return Ok(durable);
            }
            Command::Denied {
                actor,
                action,
                subject,
                attempted,
                why,
                reply,
            } => {
                if let Err(e) = p
                    .registry
                    .audit_denied(&actor, &action, &subject, &attempted, &why)
                {
                    tracing::error!(error = %e, %actor, %action, "refusal not audited");
                }
                let _ = reply.send(());
            }
        }
        Ok(Durable::default())
    }
}

fn register(
    p: &mut Pipeline,
    input: Input,
    scope: Option<&Id>,
    actor: &str,
    now: i64,
    out: &mut crate::ingest::Output,
) -> Result<Vec<Id>, Refusal> {
    // A file's rows are parsed (off this task) but not yet checked against the registry:
    // that comes after the owner's rights, so a refused file costs nothing more.
    let (file, parsed, from_file) = match input {
        Input::Json { object, .. } => {
            let file = PathBuf::from("request body");
            let mut object = object;
            if let Some(o) = scope {
                object
                    .entry("owner")
                    .or_insert_with(|| serde_json::Value::String(o.to_string()));
            }
            let d = p
                .registry
                .parse_device_json(&file, &object)
                .map_err(Refusal::Invalid)?;
            (file, vec![(1, d)], false)
        }
        Input::DeviceRows { file, rows } => (PathBuf::from(file), rows, true),
        Input::CertificateRows { file, .. } => {
            return Err(Refusal::Invalid(ImportError::whole(
                Path::new(&file),
                "certificates given where devices are expected".into(),
            )))
        }
    };
    if let Some(owner) = scope {
        for (line, d) in &parsed {
            let at = if from_file {
                format!("{}:{line}: ", file.display())
            } else {
                String::new()
            };
            if &d.owner != owner {
                return Err(Refusal::Forbidden(format!(
                    "{at}owner: an owner token registers devices of its own owner id only ({owner})"
                )));
            }
            if let Some(existing) = p.registry.device(d.id.as_str()) {
                if &existing.owner != owner {
                    return Err(Refusal::Forbidden(format!(
                        "{at}device {}: the id is taken",
                        d.id
                    )));
                }
            }
        }
    }
    if from_file {
        p.registry
            .validate_devices(&file, &parsed)
            .map_err(Refusal::Invalid)?;
    }
    let ids: Vec<Id> = parsed.iter().map(|(_, d)| d.id.clone()).collect();
    p.registry
        .write_devices(&file, &parsed, actor)
        .map_err(|e| Refusal::Failed(e.to_string()))?;
    p.sync_registry(&ids, now, out);
    Ok(ids)
}

fn record(
    p: &mut Pipeline,
    input: Input,
    verifier: &str,
    actor: &str,
    now: i64,
    out: &mut crate::ingest::Output,
) -> Result<Vec<Id>, Refusal> {
    let (file, parsed) = match input {
        Input::Json { device, object } => {
            let file = PathBuf::from("request body");
            let device = device.unwrap_or_default();
            let mut object = object;
            match object.get("verifier") {
                None | Some(serde_json::Value::Null) => {
                    object.insert("verifier".into(), serde_json::Value::String(verifier.into()));
                }
                Some(serde_json::Value::String(v)) if v == verifier => {}
                Some(other) => {
                    return Err(Refusal::Invalid(ImportError {
                        file,
                        line: None,
                        reason: format!(
                            "verifier: {other} is not you ({verifier:?}); a certificate is recorded under its verifier's own token"
                        ),
                    }))
                }
            }
            let id = Id::new(device.clone()).map_err(|e| {
                Refusal::Invalid(ImportError {
                    file: file.clone(),
                    line: None,
                    reason: format!("device: {e}"),
                })
            })?;
            let cert = p
                .registry
                .parse_certificate_json(&file, &device, &object)
                .map_err(Refusal::Invalid)?;
            (file, vec![(1, id, cert)])
        }
        Input::CertificateRows { file, rows } => {
            let file = PathBuf::from(file);
            p.registry
                .validate_certificates(&file, &rows)
                .map_err(Refusal::Invalid)?;
            (file, rows)
        }
        Input::DeviceRows { file, .. } => {
            return Err(Refusal::Invalid(ImportError::whole(
                Path::new(&file),
                "devices given where certificates are expected".into(),
            )))
        }
    };
    let ids: Vec<Id> = parsed.iter().map(|(_, id, _)| id.clone()).collect();
    p.registry
        .write_verifications(&file, &parsed, actor)
        .map_err(|e| Refusal::Failed(e.to_string()))?;
    p.sync_registry(&ids, now, out);
    Ok(ids)
}

impl Slot {
    /// Points the slot at a new record of its device (after a registry reload).
    pub(crate) fn replace_device(&mut self, fresh: Arc<Device>, agent: u32) {
        self.device = fresh;
        self.agent = agent;
    }
}
