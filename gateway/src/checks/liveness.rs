//! Liveness (DESIGN "Liveness", decision 1): a device is `offline` (warning) when its agent's
//! event-time watermark (the newest `ts` the agent has sent) is `offline_factor` ×
//! `interval_s` past the device's last reading, so a backlog replayed from a spool judges
//! liveness as it was. An agent whose last will fires, or that is silent on the wall clock for
//! `offline_factor` × its batch interval, makes all its devices offline. A reading of the
//! device clears it ([`super::check_reading`]).

use calwatch_protocol::{AlertKind, Id, Severity};
use serde_json::Value as JsonValue;

use super::{clear, evidence, raise_condition, raise_event, CheckConfig, DeviceState, Verdict};
use crate::domain::Device;

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

/// Judges one device against its agent's event-time watermark: `Raise offline` when it has
/// had no reading for exactly or more than `offline_factor` × `interval_s` (again as a
/// heartbeat after `repeat_ms`), `Clear` when it is back. A device never heard from is not
/// judged (it has no `last_ts` to be late against; the sweep reminds about its window).
pub(crate) fn check(
    device: &Device,
    state: &mut DeviceState,
    agent_watermark_ms: i64,
    cfg: &CheckConfig,
) -> Option<Verdict> {
    let last = state.last_ts?;
    let mut out = Vec::new();
    if agent_watermark_ms.saturating_sub(last) >= offline_after_ms(device, cfg) {
        raise_condition(
            &mut state.present,
            AlertKind::Offline,
            Severity::Warning,
            agent_watermark_ms,
            cfg,
            false,
            &mut out,
            || {
                let silent_s = (agent_watermark_ms - last) / 1000;
                (
                    format!(
                        "no reading for {silent_s} s ({} × interval {} s) by the agent's clock",
                        cfg.offline_factor, device.interval_s
                    ),
                    evidence([
                        ("last_seen", JsonValue::from(last)),
                        ("agent_watermark", JsonValue::from(agent_watermark_ms)),
                        ("interval_s", JsonValue::from(device.interval_s)),
                        ("agent", JsonValue::from(device.agent.as_str())),
                    ]),
                )
            },
        );
    } else {
        clear(&mut state.present, AlertKind::Offline, &mut out);
    }
    out.pop()
}

/// Why a whole agent is considered gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AgentDown {
    /// Its MQTT last will (`"state":"offline"`) arrived.
    LastWill,
    /// Nothing from it on the wall clock for `offline_factor` × its batch interval.
    // DESIGN decision 1's agent-silent rule, so far only in tests: ingest wires it in with
    // decision 11 (issue #16).
    #[allow(dead_code)]
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

/// Whether an agent last heard from at `last_heard_ms` (wall clock) is silent at `now_ms`,
/// given its batch interval: silent for exactly or more than `offline_factor` intervals.
#[cfg_attr(not(test), allow(dead_code))] // see `AgentDown::Silent`
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
