//! The alert lifecycle (CONTRACT §1, DESIGN decision 10): at most one open alert per
//! (device, kind); a repeat raises `count` and `updated`; an alert resolves only after its
//! condition has been clear for the hold time (event time) so it does not flap; a recurrence
//! after resolution is a new alert with a new id. An event is produced on every state
//! change (active, acknowledged, resolved) and on a severity change.

use std::collections::HashMap;

use calwatch_protocol::{AlertEvent, AlertKind, AlertState, Id};

use crate::checks::Verdict;
use crate::domain::Device;

/// Default hold time before a cleared condition resolves its alert: 10 min.
pub(crate) const DEFAULT_HOLD_MS: i64 = 10 * 60 * 1000;

/// An open alert and when its condition was last seen to clear.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenAlert {
    pub event: AlertEvent,
    /// Event time since which the condition is clear; `None` while present.
    pub clear_since: Option<i64>,
}

/// Why an acknowledgement was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AckError {
    #[error("no open alert {0}")]
    NotOpen(String),
}

/// Open alerts of every device.
#[derive(Debug)]
pub struct AlertBook {
    open: HashMap<(Id, AlertKind), OpenAlert>,
    by_id: HashMap<String, (Id, AlertKind)>,
    next_id: u64,
    hold_ms: i64,
    /// Alerts changed since the last [`AlertBook::take_dirty`] (to persist).
    dirty: Vec<AlertEvent>,
    /// The kinds of each device whose open alert has a `clear_since`: what [`AlertBook::settle`]
    /// looks at, so that settling a device without such alerts costs one lookup.
    clearing: HashMap<Id, Vec<AlertKind>>,
}

impl AlertBook {
    /// A book holding `open` alerts (loaded from disk); new ids continue from `next_id`.
    pub fn new(hold_ms: i64, next_id: u64, open: Vec<OpenAlert>) -> AlertBook {
        let mut book = AlertBook {
            open: HashMap::new(),
            by_id: HashMap::new(),
            next_id: next_id.max(1),
            hold_ms,
            dirty: Vec::new(),
            clearing: HashMap::new(),
        };
        for a in open {
            let key = (a.event.device.clone(), a.event.kind);
            if a.clear_since.is_some() {
                book.clearing.entry(key.0.clone()).or_default().push(key.1);
            }
            book.by_id.insert(a.event.id.clone(), key.clone());
            book.open.insert(key, a);
        }
        book
    }

    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The open alert of `device` and `kind`.
    pub fn get(&self, device: &Id, kind: AlertKind) -> Option<&OpenAlert> {
        self.open.get(&(device.clone(), kind))
    }

    /// The open alert with this id.
    pub fn get_by_id(&self, id: &str) -> Option<&OpenAlert> {
        self.by_id.get(id).and_then(|key| self.open.get(key))
    }

    /// Every open alert.
    pub fn open(&self) -> impl Iterator<Item = &OpenAlert> {
        self.open.values()
    }

    /// Applies a verdict about `device` at event time `at`; pushes the events it causes.
    pub fn apply(
        &mut self,
        device: &Device,
        verdict: &Verdict,
        at: i64,
        events: &mut Vec<AlertEvent>,
    ) {
        let key = (device.id.clone(), verdict.kind());
        match verdict {
            Verdict::Raise {
                kind,
                severity,
                message,
                evidence,
            } => match self.open.get_mut(&key) {
                Some(a) => {
                    if a.clear_since.take().is_some() {
                        unmark_clearing(&mut self.clearing, &key.0, key.1);
                    }
                    a.event.count += 1;
                    a.event.updated = a.event.updated.max(at);
                    a.event.message = message.clone();
                    a.event.evidence = evidence.clone();
                    if a.event.severity != *severity {
                        a.event.severity = *severity;
                        events.push(a.event.clone());
                    }
                    self.dirty.push(a.event.clone());
                }
                None => {
                    let event = AlertEvent {
                        id: format!("a-{:06}", self.next_id),
                        device: device.id.clone(),
                        owner: device.owner.clone(),
                        site: device.site.clone(),
                        kind: *kind,
                        severity: *severity,
                        state: AlertState::Active,
                        raised: at,
                        updated: at,
                        resolved: None,
                        ack_by: None,
                        count: 1,
                        message: message.clone(),
                        evidence: evidence.clone(),
                    };
                    self.next_id += 1;
                    self.by_id.insert(event.id.clone(), key.clone());
                    self.open.insert(
                        key,
                        OpenAlert {
                            event: event.clone(),
                            clear_since: None,
                        },
                    );
                    self.dirty.push(event.clone());
                    events.push(event);
                }
            },
            Verdict::Clear { .. } => {
                if let Some(a) = self.open.get_mut(&key) {
                    if a.clear_since.is_none() {
                        a.clear_since = Some(at);
                        self.clearing.entry(key.0.clone()).or_default().push(key.1);
                        self.dirty.push(a.event.clone());
                    }
                }
                self.settle(&device.id, at, events);
            }
        }
    }

    /// Resolves the alerts of `device` whose condition has been clear for the hold time
    /// as of `at`.
    pub fn settle(&mut self, device: &Id, at: i64, events: &mut Vec<AlertEvent>) {
        if self.clearing.is_empty() {
            return;
        }
        let Some(kinds) = self.clearing.get(device) else {
            return;
        };
        let due: Vec<AlertKind> = kinds
            .iter()
            .copied()
            .filter(|&kind| {
                self.open
                    .get(&(device.clone(), kind))
                    .and_then(|a| a.clear_since)
                    .is_some_and(|since| at - since >= self.hold_ms)
            })
            .collect();
        for kind in due {
            unmark_clearing(&mut self.clearing, device, kind);
            if let Some(mut a) = self.open.remove(&(device.clone(), kind)) {
                self.by_id.remove(&a.event.id);
                a.event.state = AlertState::Resolved;
                a.event.resolved = Some(at);
                a.event.updated = a.event.updated.max(at);
                self.dirty.push(a.event.clone());
                events.push(a.event);
            }
        }
    }

    /// A supervisor acknowledges alert `id`. Acknowledging twice is harmless (no event).
    pub fn ack(&mut self, id: &str, by: &str, at: i64) -> Result<Option<AlertEvent>, AckError> {
        let key = self
            .by_id
            .get(id)
            .cloned()
            .ok_or_else(|| AckError::NotOpen(id.to_string()))?;
        let a = self
            .open
            .get_mut(&key)
            .ok_or_else(|| AckError::NotOpen(id.to_string()))?;
        if a.event.state == AlertState::Acknowledged {
            return Ok(None);
        }
        a.event.state = AlertState::Acknowledged;
        a.event.ack_by = Some(by.to_string());
        a.event.updated = a.event.updated.max(at);
        self.dirty.push(a.event.clone());
        Ok(Some(a.event.clone()))
    }

    /// Alerts changed since the last call, latest version of each last.
    pub fn take_dirty(&mut self) -> Vec<AlertEvent> {
        std::mem::take(&mut self.dirty)
    }

    /// The clear-since time of an open alert (persisted with it).
    pub fn clear_since(&self, device: &Id, kind: AlertKind) -> Option<i64> {
        self.open
            .get(&(device.clone(), kind))
            .and_then(|a| a.clear_since)
    }

    /// Number of open alerts.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// The hold time in force, ms.
    pub fn hold_ms(&self) -> i64 {
        self.hold_ms
    }
}

fn unmark_clearing(clearing: &mut HashMap<Id, Vec<AlertKind>>, device: &Id, kind: AlertKind) {
    if let Some(kinds) = clearing.get_mut(device) {
        kinds.retain(|&k| k != kind);
        if kinds.is_empty() {
            clearing.remove(device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeviceKind;
    use calwatch_protocol::Severity;

    fn device() -> Device {
        Device {
            id: Id::new("D-1").unwrap(),
            kind: DeviceKind::Dispenser,
            owner: Id::new("o").unwrap(),
            site: Id::new("s").unwrap(),
            agent: Id::new("a").unwrap(),
            model: Default::default(),
            serial: Default::default(),
            accuracy_class: None,
            max: None,
            e: None,
            mpe_pct: Some(0.5),
            interval_s: 1,
            reference_device: None,
            certificates: Vec::new(),
        }
    }

    fn raise(severity: Severity) -> Verdict {
        Verdict::Raise {
            kind: AlertKind::SealBroken,
            severity,
            message: "m".into(),
            evidence: Default::default(),
        }
    }

    #[test]
    fn lifecycle_with_hold_time() {
        let d = device();
        let mut book = AlertBook::new(600_000, 1, Vec::new());
        let mut ev = Vec::new();
        book.apply(&d, &raise(Severity::Critical), 1_000, &mut ev);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].id.as_str(), ev[0].state, ev[0].count),
            ("a-000001", AlertState::Active, 1)
        );
        // A repeat counts, publishes nothing.
        book.apply(&d, &raise(Severity::Critical), 2_000, &mut ev);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            book.get(&d.id, AlertKind::SealBroken).unwrap().event.count,
            2
        );
        // A severity change publishes.
        book.apply(&d, &raise(Severity::Warning), 3_000, &mut ev);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1].severity, Severity::Warning);
        // Acknowledge.
        let acked = book.ack("a-000001", "sup-1", 3_500).unwrap().unwrap();
        assert_eq!(
            (acked.state, acked.ack_by.as_deref()),
            (AlertState::Acknowledged, Some("sup-1"))
        );
        assert_eq!(book.ack("a-000001", "sup-1", 3_600).unwrap(), None);
        // Clear, then back within the hold: still open, the clock restarts.
        let clear = Verdict::Clear {
            kind: AlertKind::SealBroken,
        };
        book.apply(&d, &clear, 4_000, &mut ev);
        book.settle(&d.id, 600_000, &mut ev);
        assert_eq!(ev.len(), 2);
        book.apply(&d, &raise(Severity::Warning), 600_001, &mut ev);
        book.apply(&d, &clear, 700_000, &mut ev);
        book.settle(&d.id, 1_299_999, &mut ev);
        assert_eq!(ev.len(), 2, "one ms short of the hold");
        book.settle(&d.id, 1_300_000, &mut ev);
        assert_eq!(ev.len(), 3);
        assert_eq!(
            (ev[2].state, ev[2].resolved),
            (AlertState::Resolved, Some(1_300_000))
        );
        assert!(book.get(&d.id, AlertKind::SealBroken).is_none());
        assert_eq!(
            book.ack("a-000001", "x", 1),
            Err(AckError::NotOpen("a-000001".into()))
        );
        // A recurrence is a new alert.
        book.apply(&d, &raise(Severity::Critical), 1_400_000, &mut ev);
        assert_eq!(ev[3].id, "a-000002");
    }
}
