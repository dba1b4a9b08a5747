//! Verification window (DESIGN "Verification window", decisions 2 and 9): the state of the
//! certificate in force (Metrology Law art. 9: instruments for trade settlement are under
//! mandatory periodic verification). A device that reports while overdue, unverified or failed
//! is an instrument in use without valid verification: critical; the sweep's reminders for a
//! silent device are warnings (`due_soon` is always info).

use calwatch_protocol::{AlertKind, Severity};
use serde_json::{Map, Value as JsonValue};

use super::{clear, evidence, num, raise_condition, CheckConfig, Presence, Verdict, DAY_MS};
use crate::domain::civil::Zone;
use crate::domain::{Device, VState};

/// The kinds of the window family; at most one of them is present.
pub(crate) const WINDOW_KINDS: [AlertKind; 4] = [
    AlertKind::DueSoon,
    AlertKind::Overdue,
    AlertKind::Unverified,
    AlertKind::FailedVerification,
];

/// The alert kind and severity of a verification state, `None` for `valid`.
pub(crate) fn condition(vstate: VState, in_use: bool) -> Option<(AlertKind, Severity)> {
    let severity = if in_use {
        Severity::Critical
    } else {
        Severity::Warning
    };
    match vstate {
        VState::Valid => None,
        VState::DueSoon => Some((AlertKind::DueSoon, Severity::Info)),
        VState::Overdue => Some((AlertKind::Overdue, severity)),
        VState::Unverified => Some((AlertKind::Unverified, severity)),
        VState::Failed => Some((AlertKind::FailedVerification, severity)),
    }
}

/// Judges the window at `at` (a reading's `ts` when `in_use`, the sweep time otherwise):
/// clears the window kinds that no longer apply, then raises the one that does. A judgement
/// at an earlier time than the window alert present may only escalate it (the same kind, in
/// use), never clear or replace it: a reading stamped by a lagging clock cannot clear what the
/// sweep saw as of now.
pub(super) fn judge(
    device: &Device,
    present: &mut Presence,
    at: i64,
    in_use: bool,
    cfg: &CheckConfig,
    out: &mut Vec<Verdict>,
) {
    let vstate = device.vstate(at, cfg.due_soon_lead_ms);
    let cond = condition(vstate, in_use);
    let later = WINDOW_KINDS.into_iter().find_map(|k| {
        present
            .get(k)
            .filter(|r| r.at > at)
            .map(|r| (k, r.severity))
    });
    if let Some((kind, severity)) = later {
        // Judged as of a later time already: an earlier reading may only show the same
        // condition in use (escalate: a backlog stamped before the sweep's reminder), never
        // clear or replace it.
        match cond {
            Some((k, s)) if k == kind && s > severity => {}
            _ => return,
        }
    }
    for kind in WINDOW_KINDS {
        if cond.map(|(k, _)| k) != Some(kind) {
            clear(present, kind, out);
        }
    }
    if let Some((kind, severity)) = cond {
        raise_condition(present, kind, severity, at, cfg, false, out, || {
            describe(device, vstate, at, in_use, &cfg.timezone)
        });
    }
}

fn describe(
    device: &Device,
    vstate: VState,
    at: i64,
    in_use: bool,
    zone: &Zone,
) -> (String, Map<String, JsonValue>) {
    let use_prefix = if in_use { "in use " } else { "" };
    let Some(cert) = device.certificate_at(at) else {
        return (
            if in_use {
                "in use without a verification certificate".to_owned()
            } else {
                "no verification certificate on record".to_owned()
            },
            evidence([("in_use", JsonValue::from(in_use))]),
        );
    };
    let name = cert.certificate.as_str();
    // `valid_until` is the first instant no longer valid: the last valid day is the one before,
    // a day in the configured zone (decision 18) like the dates of the certificate.
    let until = cert.valid_until.unwrap_or(i64::MAX);
    let last_day = zone.format_date(until.saturating_sub(1));
    let days = (until.saturating_sub(at)) as f64 / DAY_MS as f64;
    let cert_evidence = |extra: (&str, JsonValue)| {
        evidence([
            ("certificate", JsonValue::from(name)),
            ("verified_at", JsonValue::from(cert.verified_at)),
            ("valid_until", JsonValue::from(last_day.as_str())),
            ("valid_until_ms", JsonValue::from(until)),
            ("in_use", JsonValue::from(in_use)),
            extra,
        ])
    };
    match vstate {
        VState::DueSoon => (
            format!("verification {name} valid until {last_day}: due in {days:.0} days"),
            cert_evidence(("days_to_due", num(days, 1))),
        ),
        VState::Overdue => (
            format!("{use_prefix}with verification overdue: {name} valid until {last_day}"),
            cert_evidence(("days_overdue", num(-days, 1))),
        ),
        // Failed (a failed certificate's valid_until is ignored, decision 2).
        _ => (
            format!(
                "{use_prefix}after failed verification {name} of {}",
                zone.format_date(cert.verified_at)
            ),
            evidence([
                ("certificate", JsonValue::from(name)),
                ("verified_at", JsonValue::from(cert.verified_at)),
                ("verifier", JsonValue::from(cert.verifier.as_str())),
                ("in_use", JsonValue::from(in_use)),
            ]),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use calwatch_protocol::{AlertKind, Severity};

    use super::super::fixtures::*;
    use super::super::{sweep, CheckConfig, DeviceState, Verdict};
    use crate::domain::civil::{parse_iso8601, Zone};
    use crate::domain::DeviceKind;

    /// A scale verified 2025-03-01, valid until 2026-02-28 (through the end of that day).
    fn scale() -> (crate::domain::Device, i64) {
        let mut d = device(DeviceKind::Scale, Some("III"));
        let from = parse_iso8601("2025-03-01").unwrap().start_ms(&Zone::utc());
        let until = parse_iso8601("2026-02-28")
            .unwrap()
            .end_exclusive_ms(&Zone::utc());
        d.certificates
            .push(cert("C-1", from, Some(until), true, None, None));
        (d, until)
    }

    #[test]
    fn states_at_the_boundaries() {
        let (d, until) = scale();
        let cfg = CheckConfig::default();
        let lead = cfg.due_soon_lead_ms;
        let mut st = DeviceState::default();
        let w: [(&str, calwatch_protocol::Value); 0] = [];
        assert!(run(&d, &mut st, &cfg, 1, until - lead - 1, &w).is_empty());
        let v = run(&d, &mut st, &cfg, 2, until - lead, &w);
        assert_eq!(raised(&v), [(AlertKind::DueSoon, Severity::Info)]);
        let Verdict::Raise {
            message, evidence, ..
        } = &v[0]
        else {
            panic!()
        };
        assert_eq!(
            message,
            "verification C-1 valid until 2026-02-28: due in 30 days"
        );
        assert_eq!(evidence["days_to_due"], 30.0);
        // the last millisecond of 2026-02-28 is still valid (a heartbeat of due_soon: the
        // first raise is more than repeat_ms ago)
        assert_eq!(
            raised(&run(&d, &mut st, &cfg, 3, until - 1, &w)),
            [(AlertKind::DueSoon, Severity::Info)]
        );
        let v = run(&d, &mut st, &cfg, 4, until, &w);
        assert_eq!(v[0], clear_of(AlertKind::DueSoon));
        assert_eq!(raised(&v), [(AlertKind::Overdue, Severity::Critical)]);
        let Verdict::Raise { message, .. } = &v[1] else {
            panic!()
        };
        assert_eq!(
            message,
            "in use with verification overdue: C-1 valid until 2026-02-28"
        );
        // a new passing certificate resolves it
        let mut d = d;
        d.certificates.push(cert(
            "C-2",
            until + DAY,
            Some(until + 400 * DAY),
            true,
            None,
            None,
        ));
        assert_eq!(
            run(&d, &mut st, &cfg, 5, until + DAY, &w),
            [clear_of(AlertKind::Overdue)]
        );
    }

    #[test]
    fn unverified_and_failed_in_use_are_critical() {
        let mut d = device(DeviceKind::Dispenser, None);
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let w: [(&str, calwatch_protocol::Value); 0] = [];
        let v = run(&d, &mut st, &cfg, 1, DAY, &w);
        assert_eq!(raised(&v), [(AlertKind::Unverified, Severity::Critical)]);
        d.certificates
            .push(cert("C-1", 2 * DAY, None, false, None, None));
        let v = run(&d, &mut st, &cfg, 2, 3 * DAY, &w);
        assert_eq!(v[0], clear_of(AlertKind::Unverified));
        assert_eq!(
            raised(&v),
            [(AlertKind::FailedVerification, Severity::Critical)]
        );
        // readings judged by the certificate in force at their ts (late data)
        d.certificates
            .push(cert("C-2", 5 * DAY, Some(100 * DAY), true, None, None));
        assert_eq!(
            raised(&run(&d, &mut st, &cfg, 3, 4 * DAY, &w)),
            [(AlertKind::FailedVerification, Severity::Critical)]
        );
        assert_eq!(
            run(&d, &mut st, &cfg, 4, 5 * DAY, &w),
            [clear_of(AlertKind::FailedVerification)]
        );
    }

    #[test]
    fn sweep_of_a_silent_device() {
        let (d, until) = scale();
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let mut out = Vec::new();
        // never heard from: silent; reminders are info, overdue a warning
        sweep(&d, &mut st, until - DAY, false, &cfg, &mut out);
        assert_eq!(raised(&out), [(AlertKind::DueSoon, Severity::Info)]);
        out.clear();
        sweep(&d, &mut st, until - DAY + 60_000, false, &cfg, &mut out);
        assert!(out.is_empty(), "no repeat within repeat_ms: {out:?}");
        sweep(&d, &mut st, until, false, &cfg, &mut out);
        assert_eq!(out[0], clear_of(AlertKind::DueSoon));
        assert_eq!(raised(&out), [(AlertKind::Overdue, Severity::Warning)]);
        // it starts reporting while overdue: the same alert becomes critical
        let w: [(&str, calwatch_protocol::Value); 0] = [];
        let v = run(&d, &mut st, &cfg, 1, until + 1000, &w);
        assert_eq!(raised(&v), [(AlertKind::Overdue, Severity::Critical)]);
        // a sweep while it reports leaves it to its readings
        out.clear();
        let interval = d.interval_s as i64 * 1000;
        sweep(
            &d,
            &mut st,
            until + 1000 + 3 * interval - 1,
            false,
            &cfg,
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        // silent again for 3 × interval_s: back to a warning
        sweep(
            &d,
            &mut st,
            until + 1000 + 3 * interval,
            false,
            &cfg,
            &mut out,
        );
        assert_eq!(raised(&out), [(AlertKind::Overdue, Severity::Warning)]);
        // a device without any certificate
        let bare = device(DeviceKind::EnergyMeter, Some("1"));
        let mut st = DeviceState::default();
        out.clear();
        sweep(&bare, &mut st, until, false, &cfg, &mut out);
        assert_eq!(raised(&out), [(AlertKind::Unverified, Severity::Warning)]);
    }

    fn instant(s: &str) -> i64 {
        parse_iso8601(s).unwrap().start_ms(&Zone::utc())
    }

    /// The message of the first raise among `v`.
    fn message(v: &[Verdict]) -> &str {
        v.iter()
            .find_map(|v| match v {
                Verdict::Raise { message, .. } => Some(message.as_str()),
                Verdict::Clear { .. } => None,
            })
            .unwrap()
    }

    #[test]
    fn dates_print_as_days_of_the_configured_zone() {
        let w: [(&str, calwatch_protocol::Value); 0] = [];
        // New York (UTC-5 in winter): the last valid instant of 2026-02-28 there is
        // 2026-03-01T04:59:59.999Z, a UTC day later.
        let new_york = Zone::named("America/New_York").unwrap();
        let cfg = CheckConfig {
            timezone: new_york,
            ..CheckConfig::default()
        };
        let mut d = device(DeviceKind::Scale, Some("III"));
        let from = instant("2025-03-01T05:00:00Z");
        let until = instant("2026-03-01T05:00:00Z");
        d.certificates
            .push(cert("C-1", from, Some(until), true, None, None));
        let mut st = DeviceState::default();
        let v = run(&d, &mut st, &cfg, 1, until, &w);
        assert_eq!(raised(&v), [(AlertKind::Overdue, Severity::Critical)]);
        assert_eq!(
            message(&v),
            "in use with verification overdue: C-1 valid until 2026-02-28"
        );
        let Verdict::Raise { evidence, .. } = &v[0] else {
            panic!()
        };
        assert_eq!(evidence["valid_until"], "2026-02-28");
        // Shanghai (UTC+8): a failed verification of 2026-03-01 there began at
        // 2026-02-28T16:00Z, still 2026-02-28 in UTC.
        let shanghai = Zone::named("Asia/Shanghai").unwrap();
        let cfg = CheckConfig {
            timezone: shanghai,
            ..CheckConfig::default()
        };
        let failed_at = instant("2026-02-28T16:00:00Z");
        d.certificates
            .push(cert("C-2", failed_at, None, false, None, None));
        let mut st = DeviceState::default();
        let v = run(&d, &mut st, &cfg, 1, failed_at, &w);
        assert_eq!(
            raised(&v),
            [(AlertKind::FailedVerification, Severity::Critical)]
        );
        assert_eq!(
            message(&v),
            "in use after failed verification C-2 of 2026-03-01"
        );
    }
}
