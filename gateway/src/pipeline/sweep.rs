//! The wall-clock sweep (every `[sweep] interval_s`): what readings alone cannot tell, and
//! the periodic measurements of CONTRACT §4 the dashboards read.
//!
//! For every registered device:
//! - [`checks::sweep`]: the verification window of a silent device (its reminder, as of the
//!   sweep time);
//! - liveness (DESIGN decision 1): `offline` when its agent's event-time watermark is
//!   `offline_factor × interval_s` past the device's last reading, raised as of the watermark
//!   (not while the agent is down after its last will: its devices are offline already);
//! - alerts of a silent device settle as of the sweep time (no reading will do it);
//! - a `device_status` point.
//!
//! Then a `coverage` point per (owner, site, kind) of the registry, also for groups with no
//! device in use (`in_use=0i`, so a group that emptied reads 0, not its last value), and an
//! `alert` point for every open alert, so a dashboard's time range shows alerts raised before
//! it. All points carry the sweep time.

use std::collections::BTreeMap;

use calwatch_protocol::AlertEvent;

use crate::checks::{self, liveness};
use crate::ingest::{write_alert, Output, Pipeline};
use crate::registry::{Device, DeviceKind, VState};

const DAY_MS: i64 = 86_400_000;

/// A device is in use (coverage) when it reported within this long of the sweep.
pub const IN_USE_WITHIN_MS: i64 = DAY_MS;

impl Pipeline {
    /// Runs the sweep as of `now_ms` (wall clock).
    pub fn sweep(&mut self, now_ms: i64, out: &mut Output) {
        let lead = self.cfg.due_soon_lead_ms;
        let mut coverage: BTreeMap<(&str, &str, DeviceKind), (i64, i64)> = BTreeMap::new();
        for slot in self.states.values_mut() {
            let device: &Device = &slot.device;
            let state = &mut slot.saved.state;
            let first_event = out.events.len();
            self.verdicts.clear();
            checks::sweep(device, state, now_ms, &self.cfg, &mut self.verdicts);
            let mut changed = !self.verdicts.is_empty();
            for v in &self.verdicts {
                self.book.apply(device, v, now_ms, &mut out.events);
            }
            let watermark = self
                .agents
                .get(&device.agent)
                .filter(|a| !a.down)
                .and_then(|a| a.watermark);
            if let Some(wm) = watermark {
                if let Some(v) = liveness::check(device, state, wm, &self.cfg) {
                    changed = true;
                    self.book.apply(device, &v, wm, &mut out.events);
                }
            }
            if liveness::silent(device, state, now_ms, &self.cfg) {
                self.book.settle(&device.id, now_ms, &mut out.events);
            }
            if changed && !slot.dirty {
                slot.dirty = true;
                self.dirty.push(device.id.clone());
            }
            out.alert_points(first_event, &self.metrics);

            let state = &slot.saved.state;
            let vstate = device.vstate(now_ms, lead);
            let drift = checks::status(state);
            let mut p = out
                .lines
                .point("device_status")
                .device_tags(&slot.device, vstate);
            if let Some(days) = days_to_due(device, now_ms) {
                p = p.float("days_to_due", days);
            }
            for (name, value) in [
                ("r_ewma", drift.r_ewma),
                ("cusum_pos", drift.cusum_pos),
                ("cusum_neg", drift.cusum_neg),
            ] {
                if let Some(x) = value {
                    p = p.float(name, x);
                }
            }
            if let Some(last) = state.last_ts {
                p = p.float("last_seen_s", (now_ms - last) as f64 / 1000.0);
            }
            p.int("gaps", i64::try_from(slot.saved.gaps).unwrap_or(i64::MAX))
                .finish(now_ms);

            let group = coverage
                .entry((device.owner.as_str(), device.site.as_str(), device.kind))
                .or_default();
            if state
                .last_ts
                .is_some_and(|last| now_ms - last <= IN_USE_WITHIN_MS)
            {
                group.0 += 1;
                if matches!(vstate, VState::Valid | VState::DueSoon) {
                    group.1 += 1;
                }
            }
        }
        for ((owner, site, kind), (in_use, verified)) in coverage {
            let mut p = out
                .lines
                .point("coverage")
                .tag("owner", owner)
                .tag("site", site)
                .tag("kind", kind.as_str())
                .int("in_use", in_use)
                .int("verified", verified);
            if in_use > 0 {
                p = p.float("coverage_pct", 100.0 * verified as f64 / in_use as f64);
            }
            p.finish(now_ms);
        }
        let open: Vec<&AlertEvent> = self.book.open().map(|a| &a.event).collect();
        for e in open {
            write_alert(&mut out.lines, e, now_ms);
        }
    }
}

/// Days until the certificate in force at `now_ms` expires (negative when overdue); `None`
/// without a certificate, or when it failed (a failed certificate's `valid_until` is ignored,
/// DESIGN decision 2).
pub fn days_to_due(device: &Device, now_ms: i64) -> Option<f64> {
    let cert = device.certificate_at(now_ms)?;
    if !cert.passed {
        return None;
    }
    cert.valid_until
        .map(|until| (until - now_ms) as f64 / DAY_MS as f64)
}
