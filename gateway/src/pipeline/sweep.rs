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

use super::{Output, Pipeline};
use crate::checks::{self, liveness};
use crate::domain::{days_to_due, in_use_verified, Device, DeviceKind};
use crate::series;

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

            let vstate = device.vstate(now_ms, lead);
            let drift = checks::status(&slot.saved.state);
            series::device_status(
                &mut out.lines,
                device,
                vstate,
                &slot.saved,
                days_to_due(device, now_ms),
                &drift,
                now_ms,
            );

            let group = coverage
                .entry((device.owner.as_str(), device.site.as_str(), device.kind))
                .or_default();
            let (in_use, verified) =
                in_use_verified(device, slot.saved.state.last_ts, now_ms, lead);
            group.0 += i64::from(in_use);
            group.1 += i64::from(verified);
        }
        for (group, (in_use, verified)) in coverage {
            series::coverage(&mut out.lines, group, in_use, verified, now_ms);
        }
        let open: Vec<&AlertEvent> = self.book.open().map(|a| &a.event).collect();
        for e in open {
            series::alert(&mut out.lines, e, now_ms);
        }
    }
}
