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

use super::{AgentInfo, Output, Pipeline};
use crate::checks::{self, liveness, CheckConfig};
use crate::domain::{days_to_due, in_use_verified, Device, DeviceKind};
use crate::series;

impl Pipeline {
    /// Runs the sweep as of `now_ms` (wall clock).
    pub fn sweep(&mut self, now_ms: i64, out: &mut Output) {
        self.silent_agents(now_ms, out);
        let lead = self.cfg.due_soon_lead_ms;
        let wall_limit = |device: &Device, cfg: &CheckConfig| {
            liveness::offline_after_ms(device, cfg).max(silent_agent_after_ms(cfg))
        };
        let mut coverage: BTreeMap<(&str, &str, DeviceKind), (i64, i64)> = BTreeMap::new();
        for slot in self.states.values_mut() {
            let device: &Device = &slot.device;
            let arrived = slot.saved.arrived;
            let state = &mut slot.saved.state;
            let first_event = out.events.len();
            self.verdicts.clear();
            // Still arriving on the wall clock though silent by its timestamps: an agent clock
            // behind by more than the offline limit. The device is in use all the same.
            let arriving = arrived.is_some_and(|a| now_ms - a < wall_limit(device, &self.cfg));
            checks::sweep(
                device,
                state,
                now_ms,
                arriving,
                &self.cfg,
                &mut self.verdicts,
            );
            let mut changed = !self.verdicts.is_empty();
            for v in &self.verdicts {
                self.book.apply(device, v, now_ms, &mut out.events);
            }
            if let Some(agent) = self.agents.get(&device.agent).filter(|a| a.online()) {
                let signals = signals(agent, device, &self.cfg, arrived, now_ms, self.started);
                if let Some((v, at)) = liveness::judge(device, state, &signals, &self.cfg) {
                    changed = true;
                    self.book.apply(device, &v, at, &mut out.events);
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
            let last_seen = slot.saved.state.last_ts.max(arrived);
            let (in_use, verified) = in_use_verified(
                device,
                last_seen,
                checks::intact(&slot.saved.state),
                now_ms,
                lead,
            );
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

/// How long an agent, or a device of an online agent, may send nothing on the wall clock, at
/// least: `offline_factor` status periods (decision 11: a status at least once a minute).
/// Longer when the device's own limit (`offline_factor` × `interval_s`) or `offline_factor`
/// gaps between the agent's batches are: readings arrive in batches, so arrival gaps up to
/// the batching are not silence (the watermark and the agent's failing report judge those
/// devices sooner).
pub(super) fn silent_agent_after_ms(cfg: &CheckConfig) -> i64 {
    liveness::AGENT_STATUS_EVERY_MS.saturating_mul(i64::from(cfg.offline_factor))
}

/// The liveness signals of `device` of the online `agent` at `now_ms` (see
/// [`liveness::Signals`]).
pub(super) fn signals(
    agent: &AgentInfo,
    device: &Device,
    cfg: &CheckConfig,
    arrived: Option<i64>,
    now_ms: i64,
    started: i64,
) -> liveness::Signals {
    let since = arrived.unwrap_or(started).max(started);
    liveness::Signals {
        watermark: agent.watermark,
        // Judged once the agent's batch cadence is known (two batches since the start).
        wall: (agent.batch_gap > 0).then_some((now_ms, since)),
        wall_min_ms: silent_agent_after_ms(cfg).max(
            agent
                .batch_gap
                .saturating_mul(i64::from(cfg.offline_factor)),
        ),
        failing: agent
            .failing
            .iter()
            .find(|(d, _)| d == &device.id)
            .map(|(_, last_ok)| (agent.status_ts, *last_ok)),
    }
}

impl Pipeline {
    /// Agents heard from and then silent on the wall clock for `offline_factor` status
    /// periods take all their devices offline (decision 1), as of `now_ms`, once.
    fn silent_agents(&mut self, now_ms: i64, out: &mut Output) {
        let mut silent = Vec::new();
        for (id, info) in self.agents.iter_mut() {
            let Some(heard) = info.heard else { continue };
            let since = heard.max(self.started);
            if info.down
                || info.silent
                || !liveness::agent_silent(
                    since,
                    liveness::AGENT_STATUS_EVERY_MS.max(info.batch_gap),
                    now_ms,
                    &self.cfg,
                )
            {
                continue;
            }
            info.silent = true;
            if !info.dirty {
                info.dirty = true;
                self.dirty_agents.push(id.clone());
            }
            silent.push((id.clone(), info.devices.clone()));
        }
        for (agent, devices) in silent {
            let mut verdicts = Vec::with_capacity(1);
            for id in &devices {
                let Some(slot) = self.states.get_mut(id.as_str()) else {
                    continue;
                };
                let device: &Device = &slot.device;
                verdicts.clear();
                liveness::agent_offline(
                    &agent,
                    liveness::AgentDown::Silent,
                    now_ms,
                    [(device, &mut slot.saved.state)],
                    &mut verdicts,
                );
                let first = out.events.len();
                for (_, v) in &verdicts {
                    self.book.apply(device, v, now_ms, &mut out.events);
                }
                out.alert_points(first, &self.metrics);
                if !slot.dirty {
                    slot.dirty = true;
                    self.dirty.push(id.clone());
                }
            }
            tracing::info!(%agent, devices = devices.len(), "agent silent: its devices are offline");
        }
    }
}
