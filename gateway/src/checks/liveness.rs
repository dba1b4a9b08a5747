//! Liveness (DESIGN "Liveness", decision 1): a device is `offline` (warning) when its agent's
//! event-time watermark (the newest `ts` the agent has sent) is `offline_factor` ×
//! `interval_s` past the device's last reading, so a backlog replayed from a spool judges
//! liveness as it was. An agent whose last will fires, or that is silent on the wall clock for
//! `offline_factor` × its batch interval, makes all its devices offline. A reading of the
//! device clears it ([`super::check_reading`]).

use calwatch_protocol::{AlertKind, Id, Severity};
use serde_json::{Map, Value as JsonValue};

use super::{clear, evidence, raise_condition, raise_event, CheckConfig, DeviceState, Verdict};
use crate::domain::Device;

/// An agent's liveness as saved (decision 11: it survives a restart).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AgentLiveness {
    /// Its last will (or a clean stop) said it is offline, and nothing came since.
    pub(crate) down: bool,
    /// Silent on the wall clock; its devices were taken offline.
    pub(crate) silent: bool,
    /// The newest `ts` of an accepted reading (the event-time watermark).
    pub(crate) watermark: Option<i64>,
    /// When it was last heard from (a batch or a status), by the gateway's clock.
    pub(crate) heard: Option<i64>,
}

/// How long a device may stay without a reading: `offline_factor` × `interval_s`, in ms.
pub(crate) fn offline_after_ms(device: &Device, cfg: &CheckConfig) -> i64 {
    let interval_ms = i64::try_from(device.interval_s)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    interval_ms.saturating_mul(i64::from(cfg.offline_factor))
}

/// Whether the device has had no reading for [`offline_after_ms`] as of `at` (a watermark or
/// the wall clock); a device never heard from is silent.
pub(crate) fn silent(device: &Device, state: &DeviceState, at: i64, cfg: &CheckConfig) -> bool {
    state
        .last_ts
        .is_none_or(|last| at.saturating_sub(last) >= offline_after_ms(device, cfg))
}

/// The watermark rule alone (decision 1): [`judge`] with only the agent's watermark.
#[cfg(test)]
pub(crate) fn check(
    device: &Device,
    state: &mut DeviceState,
    agent_watermark_ms: i64,
    cfg: &CheckConfig,
) -> Option<Verdict> {
    let s = Signals {
        watermark: Some(agent_watermark_ms),
        ..Signals::default()
    };
    judge(device, state, &s, cfg).map(|(v, _)| v)
}

/// Why a whole agent is considered gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AgentDown {
    /// Its MQTT last will (`"state":"offline"`) arrived.
    LastWill,
    /// Nothing from it on the wall clock for `offline_factor` × its batch interval.
    Silent,
}

impl AgentDown {
    /// The name used in evidence.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AgentDown::LastWill => "last_will",
            AgentDown::Silent => "silent",
        }
    }
}

/// Every agent publishes its status at least this often (decision 11); an agent unheard for
/// `offline_factor` of these is silent.
pub(crate) const AGENT_STATUS_EVERY_MS: i64 = 60_000;

/// What says a device of an online agent is offline (decisions 1 and 11), for [`judge`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Signals {
    /// The agent's event-time watermark: offline when it is [`offline_after_ms`] past the
    /// device's last reading.
    pub(crate) watermark: Option<i64>,
    /// The wall clock now, and since when the device has sent nothing by it (when its last
    /// reading arrived, or when this gateway started if that is later: a restart is no
    /// silence): offline after [`offline_after_ms`], also when it is the agent's only device.
    pub(crate) wall: Option<(i64, i64)>,
    /// The least wall-clock silence that counts, whatever the device's interval (readings
    /// arrive in batches; see the sweep).
    pub(crate) wall_min_ms: i64,
    /// The agent's status says it cannot poll the device: the status time and the last good
    /// poll (both by the agent's clock): offline once that is [`offline_after_ms`] ago.
    pub(crate) failing: Option<(i64, Option<i64>)>,
}

/// Judges a device of an online agent by every liveness rule at once: `Raise offline` when
/// any holds (as of the rule's own time), `Clear` only when none does, so one rule never
/// clears what another holds; with the time to apply it at (the rule's, for a clear the
/// watermark, else the wall clock). A device never heard from is not judged.
pub(crate) fn judge(
    device: &Device,
    state: &mut DeviceState,
    s: &Signals,
    cfg: &CheckConfig,
) -> Option<(Verdict, i64)> {
    let last = state.last_ts?;
    let limit = offline_after_ms(device, cfg);
    let agent = JsonValue::from(device.agent.as_str());
    let mut why: Option<(i64, String, Map<String, JsonValue>)> = None;
    if let Some(wm) = s.watermark.filter(|wm| wm.saturating_sub(last) >= limit) {
        why = Some((
            wm,
            format!(
                "no reading for {} s ({} × interval {} s) by the agent's clock",
                (wm - last) / 1000,
                cfg.offline_factor,
                device.interval_s
            ),
            evidence([
                ("last_seen", JsonValue::from(last)),
                ("agent_watermark", JsonValue::from(wm)),
                ("interval_s", JsonValue::from(device.interval_s)),
                ("agent", agent.clone()),
            ]),
        ));
    }
    if let Some((status_ts, last_ok)) = s.failing {
        let failing_for = last_ok.map_or(i64::MAX, |ok| status_ts.saturating_sub(ok));
        if why.is_none() && failing_for >= limit {
            let at = s.wall.map_or(status_ts, |(now, _)| now);
            why = Some((
                at,
                format!("agent {} cannot poll the device", device.agent),
                evidence([
                    ("last_seen", JsonValue::from(last)),
                    ("last_ok", last_ok.map_or(JsonValue::Null, JsonValue::from)),
                    ("cause", JsonValue::from("poll_failing")),
                    ("agent", agent.clone()),
                ]),
            ));
        }
    }
    if let Some((now, since)) = s.wall {
        if why.is_none() && now.saturating_sub(since) >= limit.max(s.wall_min_ms) {
            why = Some((
                now,
                format!(
                    "nothing received for {} s ({} × interval {} s) while its agent is online",
                    (now - since) / 1000,
                    cfg.offline_factor,
                    device.interval_s
                ),
                evidence([
                    ("last_seen", JsonValue::from(last)),
                    ("silent_since", JsonValue::from(since)),
                    ("cause", JsonValue::from("wall_clock_silence")),
                    ("agent", agent),
                ]),
            ));
        }
    }
    let mut out = Vec::with_capacity(1);
    let clear_at = s.watermark.or(s.wall.map(|(now, _)| now)).unwrap_or(last);
    let at = why.as_ref().map_or(clear_at, |(at, _, _)| *at);
    match why {
        Some((at, message, ev)) => raise_condition(
            &mut state.present,
            AlertKind::Offline,
            Severity::Warning,
            at,
            cfg,
            false,
            &mut out,
            || (message, ev),
        ),
        None => clear(&mut state.present, AlertKind::Offline, &mut out),
    }
    out.pop().map(|v| (v, at))
}

/// Whether an agent last heard from at `last_heard_ms` (wall clock) is silent at `now_ms`,
/// given its batch interval: silent for exactly or more than `offline_factor` intervals.
pub(crate) fn agent_silent(
    last_heard_ms: i64,
    batch_interval_ms: i64,
    now_ms: i64,
    cfg: &CheckConfig,
) -> bool {
    now_ms.saturating_sub(last_heard_ms)
        >= batch_interval_ms.saturating_mul(i64::from(cfg.offline_factor))
}

/// Marks every device of `agent` offline at `at_ms` (the last will's or the sweep's time),
/// with the agent and the cause in the evidence. Every device gets a `Raise`, also one already
/// offline (the evidence now names the agent); readings clear them when the agent is back.
pub(crate) fn agent_offline<'a>(
    agent: &Id,
    cause: AgentDown,
    at_ms: i64,
    devices: impl IntoIterator<Item = (&'a Device, &'a mut DeviceState)>,
    out: &mut Vec<(Id, Verdict)>,
) {
    for (device, state) in devices {
        let mut one = Vec::with_capacity(1);
        let message = match cause {
            AgentDown::LastWill => format!("agent {agent} went offline (last will)"),
            AgentDown::Silent => format!("agent {agent} silent"),
        };
        raise_event(
            &mut state.present,
            AlertKind::Offline,
            Severity::Warning,
            at_ms,
            &mut one,
            message,
            evidence([
                ("agent", JsonValue::from(agent.as_str())),
                ("cause", JsonValue::from(cause.as_str())),
                (
                    "last_seen",
                    state.last_ts.map_or(JsonValue::Null, JsonValue::from),
                ),
            ]),
        );
        out.extend(one.into_iter().map(|v| (device.id.clone(), v)));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use calwatch_protocol::{AlertKind, Severity};

    use super::super::fixtures::*;
    use super::super::{CheckConfig, DeviceState, Verdict};
    use super::*;
    use crate::domain::DeviceKind;

    #[test]
    fn offline_at_exactly_three_intervals() {
        let mut d = device(DeviceKind::EnergyMeter, Some("1"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        assert_eq!(check(&d, &mut st, 10_000_000, &cfg), None, "never seen");
        let t0 = 1_000_000;
        run(&d, &mut st, &cfg, 1, t0, &[("energy_kwh", n(1.0))]);
        assert_eq!(d.interval_s, 60);
        assert_eq!(check(&d, &mut st, t0 + 180_000 - 1, &cfg), None);
        let v = check(&d, &mut st, t0 + 180_000, &cfg).unwrap();
        let Verdict::Raise {
            kind,
            severity,
            message,
            evidence,
        } = &v
        else {
            panic!()
        };
        assert_eq!((*kind, *severity), (AlertKind::Offline, Severity::Warning));
        assert_eq!(
            message,
            "no reading for 180 s (3 × interval 60 s) by the agent's clock"
        );
        assert_eq!(evidence["last_seen"], t0);
        // no repeat until the heartbeat
        assert_eq!(check(&d, &mut st, t0 + 200_000, &cfg), None);
        assert!(check(&d, &mut st, t0 + 180_000 + cfg.repeat_ms, &cfg).is_some());
        // the device is back: its reading clears it
        let v = run(
            &d,
            &mut st,
            &cfg,
            2,
            t0 + 200_000 + cfg.repeat_ms,
            &[("energy_kwh", n(1.0))],
        );
        assert_eq!(v, [clear_of(AlertKind::Offline)]);
        assert_eq!(check(&d, &mut st, t0 + 200_000 + cfg.repeat_ms, &cfg), None);
        // or the watermark check does, if the state was marked offline meanwhile
        agent_offline(
            &d.agent,
            AgentDown::LastWill,
            0,
            [(&d, &mut st)],
            &mut Vec::new(),
        );
        assert_eq!(
            check(&d, &mut st, t0 + 200_000 + cfg.repeat_ms, &cfg),
            Some(clear_of(AlertKind::Offline))
        );
    }

    #[test]
    fn an_agent_takes_its_devices_offline() {
        let cfg = CheckConfig::default();
        assert!(!agent_silent(0, 10_000, 29_999, &cfg));
        assert!(agent_silent(0, 10_000, 30_000, &cfg));
        let a = device(DeviceKind::Scale, Some("III"));
        let mut b = device(DeviceKind::Dispenser, None);
        b.id = id("D-2");
        let (mut sa, mut sb) = (DeviceState::default(), DeviceState::default());
        sa.last_ts = Some(5);
        let mut out = Vec::new();
        agent_offline(
            &id("agent-a"),
            AgentDown::LastWill,
            99,
            [(&a, &mut sa), (&b, &mut sb)],
            &mut out,
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].0, b.id);
        let Verdict::Raise {
            kind,
            message,
            evidence,
            ..
        } = &out[0].1
        else {
            panic!()
        };
        assert_eq!(*kind, AlertKind::Offline);
        assert_eq!(message, "agent agent-a went offline (last will)");
        assert_eq!(evidence["cause"], "last_will");
        assert_eq!(evidence["last_seen"], 5);
        assert!(sb.present.get(AlertKind::Offline).is_some());
    }
}
