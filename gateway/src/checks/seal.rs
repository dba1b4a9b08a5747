//! Seal (DESIGN "Seal", decision 3): the sealed `event_counter` (an audit counter: per
//! Measurement Canada non-resettable, +1 per entry into adjustment mode; REFERENCE "Audit
//! counters") and `k_factor` recorded at verification must not change; cumulative registers
//! must not go backwards.

use calwatch_protocol::{AlertKind, Severity};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::{
    clear, evidence, raise_condition, raise_event, Ctx, DeviceState, Presence, Register, Values,
    Verdict, TIE,
};
use crate::domain::Certificate;

/// Seal baselines of the current verification.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SealState {
    /// `event_counter` of the first reading after a verification whose certificate records
    /// none (decision 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_counter: Option<f64>,
    /// `k_factor` likewise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k_factor: Option<f64>,
    /// The reading value `seal_broken` was last raised for; another value raises again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_counter: Option<f64>,
    /// The reading value `param_changed` was last raised for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed_k_factor: Option<f64>,
}

/// Whether two k-factors are the same: the protocol decodes floats bit-exactly, the slack
/// only forgives a value that went through a decimal round trip somewhere.
pub(crate) fn same_k_factor(a: f64, b: f64) -> bool {
    (a - b).abs() <= TIE * a.abs().max(b.abs())
}

/// Compares `event_counter` and `k_factor` with the sealed values of the passing certificate in
/// force. Without a passing certificate nothing is sealed.
pub(super) fn check(
    ctx: &Ctx<'_>,
    cert: Option<&Certificate>,
    state: &mut DeviceState,
    v: &Values,
    out: &mut Vec<Verdict>,
) {
    let Some(cert) = cert else { return };
    let (seal, present) = (&mut state.seal, &mut state.present);
    if let Some(x) = v.event_counter {
        match cert.event_counter.or(seal.event_counter) {
            None => seal.event_counter = Some(x),
            // Counters are integers: exact.
            Some(sealed) if x == sealed => clear(present, AlertKind::SealBroken, out),
            Some(sealed) => {
                let changed = seal.broken_counter != Some(x);
                seal.broken_counter = Some(x);
                let from_cert = cert.event_counter.is_some();
                raise_condition(
                    present,
                    AlertKind::SealBroken,
                    Severity::Critical,
                    ctx.ts,
                    ctx.cfg,
                    changed,
                    out,
                    || describe("event counter", "event_counter", x, sealed, cert, from_cert),
                );
            }
        }
    }
    if let Some(x) = v.k_factor {
        match cert.k_factor.or(seal.k_factor) {
            None => seal.k_factor = Some(x),
            Some(sealed) if same_k_factor(x, sealed) => {
                clear(present, AlertKind::ParamChanged, out)
            }
            Some(sealed) => {
                let changed = seal.changed_k_factor != Some(x);
                seal.changed_k_factor = Some(x);
                let from_cert = cert.k_factor.is_some();
                raise_condition(
                    present,
                    AlertKind::ParamChanged,
                    Severity::Critical,
                    ctx.ts,
                    ctx.cfg,
                    changed,
                    out,
                    || describe("k-factor", "k_factor", x, sealed, cert, from_cert),
                );
            }
        }
    }
}

fn describe(
    what: &str,
    name: &str,
    reading: f64,
    sealed: f64,
    cert: &Certificate,
    from_cert: bool,
) -> (String, serde_json::Map<String, JsonValue>) {
    (
        format!(
            "{what} {reading} differs from the sealed {sealed} (certificate {})",
            cert.certificate
        ),
        evidence([
            ("value", JsonValue::from(name)),
            ("reading", JsonValue::from(reading)),
            ("sealed", JsonValue::from(sealed)),
            ("certificate", JsonValue::from(cert.certificate.as_str())),
            (
                "sealed_from",
                JsonValue::from(if from_cert {
                    "certificate"
                } else {
                    "first_reading"
                }),
            ),
        ]),
    )
}

/// Takes what the checks need from the identity data an agent reports for a device: the
/// modulus its energy register wraps at (DESIGN decision 17). A modulus that is not a
/// positive number is none. Returns whether the state changed (so it is saved).
pub(crate) fn apply_device_info(
    state: &mut DeviceState,
    info: &calwatch_protocol::DeviceInfo,
) -> bool {
    let wrap = info.wrap.filter(|m| m.is_finite() && *m > 0.0);
    let changed = state.energy_wrap != wrap;
    state.energy_wrap = wrap;
    changed
}

/// The advance of a register that wraps at `modulus` (DESIGN decision 17) when it went from
/// `prev` to the lower `value`: `value + modulus - prev`, if that is a wrap — the step back is
/// more than half the modulus (an advance of less than half of it carried the register past
/// the modulus) and both samples are within `0..=modulus`. `None`: not a wrap, a rollback.
pub(super) fn wrapped_advance(prev: f64, value: f64, modulus: f64) -> Option<f64> {
    let wrapped = value < prev && prev - value > modulus / 2.0 && value >= 0.0 && prev <= modulus;
    wrapped.then_some(value + modulus - prev)
}

/// How a cumulative register moved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Step {
    /// No earlier sample.
    First,
    /// Same or higher than the previous sample.
    Forward(Register),
    /// Lower than the previous sample: `counter_rollback` was raised.
    Backward(Register),
    /// Lower than the previous sample, as a register wrapping at its declared modulus goes
    /// ([`wrapped_advance`]): no rollback, and no advance to compare either.
    Wrapped(Register),
}

/// Records a sample of a register that must never decrease; going back raises
/// `counter_rollback` (critical), latched until the next passing verification — unless the
/// register wraps at `wrap` and the step back is a wrap (DESIGN decision 17).
pub(super) fn advance(
    ctx: &Ctx<'_>,
    slot: &mut Option<Register>,
    name: &str,
    value: f64,
    wrap: Option<f64>,
    present: &mut Presence,
    out: &mut Vec<Verdict>,
) -> Step {
    let now = Register {
        seq: ctx.seq,
        ts: ctx.ts,
        value,
    };
    match slot.replace(now) {
        None => Step::First,
        Some(prev)
            if wrap
                .and_then(|m| wrapped_advance(prev.value, value, m))
                .is_some() =>
        {
            Step::Wrapped(prev)
        }
        Some(prev) if value < prev.value => {
            raise_event(
                present,
                AlertKind::CounterRollback,
                Severity::Critical,
                ctx.ts,
                out,
                format!("{name} went back from {} to {value}", prev.value),
                evidence([
                    ("register", JsonValue::from(name)),
                    ("previous", JsonValue::from(prev.value)),
                    ("previous_seq", JsonValue::from(prev.seq)),
                    ("value", JsonValue::from(value)),
                    ("seq", JsonValue::from(ctx.seq)),
                ]),
            );
            Step::Backward(prev)
        }
        Some(prev) => Step::Forward(prev),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use calwatch_protocol::{AlertKind, Severity};

    use super::super::fixtures::*;
    use super::super::{CheckConfig, DeviceState, Verdict};
    use super::{apply_device_info, wrapped_advance};
    use crate::domain::DeviceKind;

    #[test]
    fn sealed_counter_from_certificate() {
        let mut d = device(DeviceKind::Dispenser, None);
        d.certificates.push(cert(
            "C-1",
            0,
            Some(400 * DAY),
            true,
            Some(12.0),
            Some(100.12),
        ));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let mut run = |seq: u64, ec: f64, k: f64| {
            run(
                &d,
                &mut st,
                &cfg,
                seq,
                seq as i64 * 60_000,
                &[("event_counter", n(ec)), ("k_factor", n(k))],
            )
        };
        assert!(run(1, 12.0, 100.12).is_empty());
        let v = run(2, 13.0, 100.12);
        assert_eq!(raised(&v), [(AlertKind::SealBroken, Severity::Critical)]);
        let Verdict::Raise {
            evidence, message, ..
        } = &v[0]
        else {
            panic!()
        };
        assert_eq!(evidence["sealed"], 12.0);
        assert_eq!(evidence["sealed_from"], "certificate");
        assert!(
            message.contains("13") && message.contains("C-1"),
            "{message}"
        );
        // the same broken value again within the repeat time: nothing new
        assert!(run(3, 13.0, 100.12).is_empty());
        // another value: raised again
        assert_eq!(raised(&run(4, 14.0, 100.12)).len(), 1);
        // back to the sealed value (e.g. a misread): cleared
        assert_eq!(run(5, 12.0, 100.12), [clear_of(AlertKind::SealBroken)]);
        // k-factor
        assert_eq!(
            raised(&run(6, 12.0, 100.5)),
            [(AlertKind::ParamChanged, Severity::Critical)]
        );
        // a rounding error is not a change
        assert_eq!(
            run(7, 12.0, 100.12 * (1.0 + 1e-12)),
            [clear_of(AlertKind::ParamChanged)]
        );
    }

    #[test]
    fn heartbeat_repeats_a_persisting_condition() {
        let mut d = device(DeviceKind::Scale, Some("III"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, Some(5.0), None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let ec = |x: f64| [("event_counter", n(x))];
        assert_eq!(raised(&run(&d, &mut st, &cfg, 1, 1000, &ec(6.0))).len(), 1);
        assert!(run(&d, &mut st, &cfg, 2, 1000 + cfg.repeat_ms - 1, &ec(6.0)).is_empty());
        assert_eq!(
            raised(&run(&d, &mut st, &cfg, 3, 1000 + cfg.repeat_ms, &ec(6.0))).len(),
            1
        );
    }

    #[test]
    fn empty_sealed_values_take_the_first_reading_and_a_new_certificate_restarts() {
        let mut d = device(DeviceKind::Dispenser, None);
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let vals = |ec: f64, k: f64| [("event_counter", n(ec)), ("k_factor", n(k))];
        assert!(run(&d, &mut st, &cfg, 1, DAY, &vals(7.0, 99.8)).is_empty());
        assert_eq!(st.seal.event_counter, Some(7.0));
        let v = run(&d, &mut st, &cfg, 2, 2 * DAY, &vals(8.0, 99.9));
        assert_eq!(
            raised(&v),
            [
                (AlertKind::SealBroken, Severity::Critical),
                (AlertKind::ParamChanged, Severity::Critical)
            ]
        );
        let Verdict::Raise { evidence, .. } = &v[0] else {
            panic!()
        };
        assert_eq!(evidence["sealed_from"], "first_reading");
        // re-verified (with adjustment), again without sealed values: the first reading after
        // it is the new baseline, and the old alerts clear
        d.certificates
            .push(cert("C-2", 10 * DAY, Some(400 * DAY), true, None, None));
        let v = run(&d, &mut st, &cfg, 3, 10 * DAY, &vals(8.0, 99.9));
        assert_eq!(
            v,
            [
                clear_of(AlertKind::SealBroken),
                clear_of(AlertKind::ParamChanged)
            ]
        );
        assert_eq!(st.seal.event_counter, Some(8.0));
        assert!(run(&d, &mut st, &cfg, 4, 11 * DAY, &vals(8.0, 99.9)).is_empty());
        // a failed verification restarts nothing
        d.certificates
            .push(cert("C-3", 20 * DAY, None, false, Some(1.0), None));
        let v = run(&d, &mut st, &cfg, 5, 21 * DAY, &vals(8.0, 99.9));
        assert_eq!(
            raised(&v),
            [(AlertKind::FailedVerification, Severity::Critical)]
        );
    }

    #[test]
    fn unverified_device_has_no_seal() {
        let d = device(DeviceKind::Scale, Some("III"));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        run(&d, &mut st, &cfg, 1, 0, &[("event_counter", n(1.0))]);
        let v = run(&d, &mut st, &cfg, 2, 1, &[("event_counter", n(2.0))]);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn counter_rollback_is_latched_until_a_new_verification() {
        let mut d = device(DeviceKind::EnergyMeter, Some("1"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let e = |x: f64| [("energy_kwh", n(x))];
        assert!(run(&d, &mut st, &cfg, 1, 1000, &e(500.0)).is_empty());
        assert!(run(&d, &mut st, &cfg, 2, 2000, &e(500.0)).is_empty());
        let v = run(&d, &mut st, &cfg, 3, 3000, &e(12.5));
        assert_eq!(
            raised(&v),
            [(AlertKind::CounterRollback, Severity::Critical)]
        );
        let Verdict::Raise { evidence, .. } = &v[0] else {
            panic!()
        };
        assert_eq!(evidence["previous"], 500.0);
        assert_eq!(evidence["previous_seq"], 2);
        assert_eq!(evidence["register"], "energy_kwh");
        // advancing again does not clear it
        assert!(run(&d, &mut st, &cfg, 4, 4000, &e(13.0)).is_empty());
        d.certificates
            .push(cert("C-2", 5000, Some(400 * DAY), true, None, None));
        assert_eq!(
            run(&d, &mut st, &cfg, 5, 6000, &e(14.0)),
            [clear_of(AlertKind::CounterRollback)]
        );

        // the totalizer of a dispenser, across a seq gap too
        let mut d = device(DeviceKind::Dispenser, None);
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let mut st = DeviceState::default();
        run(&d, &mut st, &cfg, 1, 1000, &[("totalizer_l", n(1834455.2))]);
        let v = run(&d, &mut st, &cfg, 9, 9000, &[("totalizer_l", n(1834455.1))]);
        assert_eq!(
            raised(&v),
            [(AlertKind::CounterRollback, Severity::Critical)]
        );
    }

    /// A 6-digit kWh register (one decimal) steps from 999999.9 to 0.4 (decision 17).
    fn six_digit_register(wrap: Option<f64>, from: f64, to: f64) -> Vec<Verdict> {
        let mut d = device(DeviceKind::EnergyMeter, Some("1"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let info = calwatch_protocol::DeviceInfo {
            wrap,
            ..Default::default()
        };
        assert_eq!(apply_device_info(&mut st, &info), wrap.is_some());
        let e = |x: f64| [("energy_kwh", n(x))];
        assert!(run(&d, &mut st, &cfg, 1, 1000, &e(from)).is_empty());
        run(&d, &mut st, &cfg, 2, 2000, &e(to))
    }

    #[test]
    fn a_register_wrapping_at_its_declared_modulus_is_no_rollback() {
        assert_eq!(six_digit_register(Some(1e6), 999_999.9, 0.4), []);
        // Without the declared modulus the same step is a rollback.
        assert_eq!(
            raised(&six_digit_register(None, 999_999.9, 0.4)),
            [(AlertKind::CounterRollback, Severity::Critical)]
        );
        // A real step back near the modulus still is one: less than half of it.
        assert_eq!(
            raised(&six_digit_register(Some(1e6), 500_000.0, 400_000.0)),
            [(AlertKind::CounterRollback, Severity::Critical)]
        );
        assert_eq!(
            raised(&six_digit_register(Some(1e6), 999_999.9, 999_999.0)),
            [(AlertKind::CounterRollback, Severity::Critical)]
        );
        // A previous value beyond the modulus cannot come from a register wrapping there.
        assert_eq!(
            raised(&six_digit_register(Some(1e6), 1_500_000.0, 0.4)),
            [(AlertKind::CounterRollback, Severity::Critical)]
        );
        // The advance across the wrap is current + modulus - previous.
        let adv = wrapped_advance(999_999.9, 0.4, 1e6).unwrap();
        assert!((adv - 0.5).abs() < 1e-6, "{adv}");
        assert_eq!(wrapped_advance(500_000.0, 400_000.0, 1e6), None);
    }

    #[test]
    fn device_info_sets_the_wrap_and_says_when_it_changed() {
        let mut st = DeviceState::default();
        let info = |wrap| calwatch_protocol::DeviceInfo {
            wrap,
            ..Default::default()
        };
        assert!(!apply_device_info(&mut st, &info(None)));
        assert!(apply_device_info(&mut st, &info(Some(1e6))));
        assert_eq!(st.energy_wrap, Some(1e6));
        assert!(!apply_device_info(&mut st, &info(Some(1e6))));
        // A modulus that cannot be one is no modulus.
        assert!(apply_device_info(&mut st, &info(Some(-5.0))));
        assert_eq!(st.energy_wrap, None);
        assert!(apply_device_info(&mut st, &info(Some(1e5))));
        // A profile without `wrap` any more: the register no longer wraps.
        assert!(apply_device_info(&mut st, &info(None)));
        assert_eq!(st.energy_wrap, None);
        // Saved with the state, absent from older saved states.
        st.energy_wrap = Some(1e6);
        let json = serde_json::to_string(&st).unwrap();
        let back: DeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.energy_wrap, Some(1e6));
        let old: DeviceState = serde_json::from_str("{}").unwrap();
        assert_eq!(old.energy_wrap, None);
    }
}
