//! Maximum permissible errors and the tolerance check (DESIGN "Tolerance", decision 5): only a
//! comparison against a reference (`check_ref_*`, `reference_device`) can be
//! `out_of_tolerance`; |error| equal to the MPE is within tolerance.

use calwatch_protocol::{AlertKind, Severity};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::seal::Step;
use super::{
    clear, evidence, flag, num, raise_event, rounded, Ctx, DeviceState, DriftSource,
    ReferenceEnergy, Values, Verdict, TIE,
};
use crate::domain::{Device, DeviceKind};

/// A dispenser without `mpe_pct` (DESIGN decision 3; OIML R 117 / MID class 0.5).
pub(crate) const DEFAULT_DISPENSER_MPE_PCT: f64 = 0.5;

/// Below this volume a dispenser's MPE is that of this volume (DESIGN "Tolerance").
pub(crate) const DISPENSER_MIN_MPE_VOLUME_L: f64 = 2.0;

/// Accuracy classes of non-automatic weighing instruments, named as OIML R 76 writes them.
#[allow(clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ScaleClass {
    I,
    II,
    III,
    IIII,
}

impl ScaleClass {
    /// `I`, `II`, `III` or `IIII` (CONTRACT §2 `accuracy_class`).
    pub(crate) fn parse(s: &str) -> Option<ScaleClass> {
        Some(match s {
            "I" => ScaleClass::I,
            "II" => ScaleClass::II,
            "III" => ScaleClass::III,
            "IIII" => ScaleClass::IIII,
            _ => return None,
        })
    }

    /// Largest loads, in e, of the ±0.5 e and the ±1.0 e rows.
    fn rows(self) -> (f64, f64) {
        match self {
            ScaleClass::I => (50_000.0, 200_000.0),
            ScaleClass::II => (5_000.0, 20_000.0),
            ScaleClass::III => (500.0, 2_000.0),
            ScaleClass::IIII => (50.0, 200.0),
        }
    }
}

/// MPE on verification, in e, for a load of `m` e: OIML R 76-1 3.5.1 table 6 (JJG 539 the
/// same). Loads beyond the table's last row (above the class's largest n) keep ±1.5 e.
pub(crate) fn scale_mpe_verification_e(class: ScaleClass, m: f64) -> f64 {
    let (half, one) = class.rows();
    // A load a rounding error above a boundary (2.5 kg / 0.005 kg) belongs to it.
    let m = m.abs() * (1.0 - TIE);
    if m <= half {
        0.5
    } else if m <= one {
        1.0
    } else {
        1.5
    }
}

/// MPE in kg of a scale with verification interval `e_kg` at `load_kg`; in service twice the
/// MPE on verification (OIML R 76-1 3.5.2).
pub(crate) fn scale_mpe_kg(class: ScaleClass, e_kg: f64, load_kg: f64, in_service: bool) -> f64 {
    let mpe = scale_mpe_verification_e(class, load_kg / e_kg) * e_kg;
    if in_service {
        2.0 * mpe
    } else {
        mpe
    }
}

/// A dispenser's `mpe_pct`, 0.5 when the registry has none.
pub(crate) fn dispenser_mpe_pct(device: &Device) -> f64 {
    device.mpe_pct.unwrap_or(DEFAULT_DISPENSER_MPE_PCT)
}

/// MPE in L of a dispenser at `volume_l`: `mpe_pct` of the volume, below 2 L that of 2 L
/// (OIML R 117-1; JJG 443).
pub(crate) fn dispenser_mpe_l(mpe_pct: f64, volume_l: f64) -> f64 {
    mpe_pct / 100.0 * volume_l.abs().max(DISPENSER_MIN_MPE_VOLUME_L)
}

/// The MPE in percent of an energy meter class: IEC 62053-21/-22 classes (`0.2S` → 0.2, `1` →
/// 1; the class is the percentage at unity power factor) and MID classes A 2, B 1, C 0.5.
pub(crate) fn meter_class_pct(class: &str) -> Option<f64> {
    match class {
        "A" => Some(2.0),
        "B" => Some(1.0),
        "C" => Some(0.5),
        _ => {
            let x: f64 = class.strip_suffix('S').unwrap_or(class).parse().ok()?;
            (x.is_finite() && x > 0.0).then_some(x)
        }
    }
}

/// MPE in kWh of a meter of `class_pct` over `energy_kwh`.
pub(crate) fn meter_mpe_kwh(class_pct: f64, energy_kwh: f64) -> f64 {
    class_pct / 100.0 * energy_kwh.abs()
}

/// Whether an error is within the MPE; equal is within.
pub(crate) fn within(error: f64, mpe: f64) -> bool {
    error.abs() <= mpe * (1.0 + TIE)
}

/// Which reference comparisons fail at present.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ToleranceState {
    /// The last check reading (`check_ref_*`) was beyond the MPE.
    pub span_failing: bool,
    /// The last `reference_device` comparison was beyond the MPE.
    pub reference_failing: bool,
}

/// Start of a `reference_device` comparison: both meters' energy at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceAnchor {
    pub ts: i64,
    pub own_kwh: f64,
    /// The reference meter's energy at `ts`, interpolated.
    pub reference_kwh: f64,
}

/// One comparison of a measured quantity with its reference.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Comparison {
    pub(super) source: DriftSource,
    pub(super) what: &'static str,
    pub(super) measured_name: &'static str,
    pub(super) measured: f64,
    pub(super) reference: f64,
    pub(super) mpe: f64,
    pub(super) unit: &'static str,
    /// Start of the interval compared (`reference_device` comparisons).
    pub(super) since: Option<i64>,
}

/// The check reading in `v`, if it is one: scale `check_ref_kg` against the indication (gross,
/// or net while a tare is in use, since the reference mass then sits on a tared container),
/// skipped while not stable; dispenser `check_ref_l` against `sale_l`; meter `check_ref_kwh`
/// against `check_kwh`.
pub(super) fn span_comparison(device: &Device, v: &Values) -> Option<Comparison> {
    let class = device.accuracy_class.as_deref();
    let c = match device.kind {
        DeviceKind::Scale => {
            let reference = v.check_ref_kg?;
            if flag(v.stable) == Some(false) {
                return None;
            }
            let tared = v.tare_kg.is_some_and(|t| t != 0.0);
            let (measured_name, measured) = match (tared, v.gross_kg) {
                (false, Some(g)) => ("gross_kg", g),
                _ => ("net_kg", v.net_kg?),
            };
            Comparison {
                source: DriftSource::Span,
                what: "check weight",
                measured_name,
                measured,
                reference,
                mpe: scale_mpe_kg(ScaleClass::parse(class?)?, device.e?, reference, true),
                unit: "kg",
                since: None,
            }
        }
        DeviceKind::Dispenser => {
            let reference = v.check_ref_l?;
            Comparison {
                source: DriftSource::Span,
                what: "standard measure",
                measured_name: "sale_l",
                measured: v.sale_l?,
                reference,
                mpe: dispenser_mpe_l(dispenser_mpe_pct(device), reference),
                unit: "L",
                since: None,
            }
        }
        DeviceKind::EnergyMeter => {
            let reference = v.check_ref_kwh?;
            Comparison {
                source: DriftSource::Span,
                what: "reference meter check",
                measured_name: "check_kwh",
                measured: v.check_kwh?,
                reference,
                mpe: meter_mpe_kwh(meter_class_pct(class?)?, reference),
                unit: "kWh",
                since: None,
            }
        }
        DeviceKind::Other => return None,
    };
    Some(c)
}

/// The `reference_device` comparison (DESIGN decision 3): this meter's energy advance against
/// the reference's over the same interval, once the reference has advanced by
/// `reference_min_kwh`. The interval starts at an anchor taken at one of this meter's readings
/// with the reference's energy interpolated to that instant; a register going back restarts it.
pub(super) fn reference_comparison(
    ctx: &Ctx<'_>,
    state: &mut DeviceState,
    v: &Values,
    energy: Option<Step>,
    reference: Option<ReferenceEnergy>,
) -> Option<Comparison> {
    let own = v.energy_kwh?;
    if matches!(energy, Some(Step::Backward(_))) {
        state.reference_anchor = None;
        return None;
    }
    let ref_now = reference?.at(ctx.ts)?;
    let pct = meter_class_pct(ctx.device.accuracy_class.as_deref()?)?;
    let here = ReferenceAnchor {
        ts: ctx.ts,
        own_kwh: own,
        reference_kwh: ref_now,
    };
    let Some(from) = state.reference_anchor else {
        state.reference_anchor = Some(here);
        return None;
    };
    let (own_adv, ref_adv) = (own - from.own_kwh, ref_now - from.reference_kwh);
    if own_adv < 0.0 || ref_adv < 0.0 {
        state.reference_anchor = Some(here);
        return None;
    }
    if ref_adv < ctx.cfg.reference_min_kwh {
        return None;
    }
    state.reference_anchor = Some(here);
    Some(Comparison {
        source: DriftSource::Reference,
        what: "energy advance against the reference meter",
        measured_name: "energy_kwh",
        measured: own_adv,
        reference: ref_adv,
        mpe: meter_mpe_kwh(pct, ref_adv),
        unit: "kWh",
        since: Some(from.ts),
    })
}

/// Judges a reference comparison: `out_of_tolerance` (critical) when |error| > MPE, cleared
/// when the comparisons of every source are back within. Returns r = error / MPE for drift.
pub(super) fn judge(
    ctx: &Ctx<'_>,
    state: &mut DeviceState,
    c: &Comparison,
    out: &mut Vec<Verdict>,
) -> Option<f64> {
    if !(c.mpe.is_finite() && c.mpe > 0.0) {
        return None;
    }
    let error = c.measured - c.reference;
    let ok = within(error, c.mpe);
    let t = &mut state.tolerance;
    match c.source {
        DriftSource::Reference => t.reference_failing = !ok,
        _ => t.span_failing = !ok,
    }
    if !ok {
        let unit = c.unit;
        let (e, m, r) = (
            rounded(error, 9),
            rounded(c.mpe, 9),
            rounded(c.reference, 9),
        );
        let mut ev = evidence([
            ("source", JsonValue::from(c.source.as_str())),
            ("value", JsonValue::from(c.measured_name)),
            ("measured", num(c.measured, 9)),
            ("reference", num(c.reference, 9)),
            ("error", num(error, 9)),
            ("mpe", num(c.mpe, 9)),
            ("r", num(error / c.mpe, 4)),
            ("unit", JsonValue::from(unit)),
        ]);
        if let Some(since) = c.since {
            ev.insert("since".into(), JsonValue::from(since));
            if let Some(id) = &ctx.device.reference_device {
                ev.insert("reference_device".into(), JsonValue::from(id.as_str()));
            }
        }
        raise_event(
            &mut state.present,
            AlertKind::OutOfTolerance,
            Severity::Critical,
            ctx.ts,
            out,
            format!(
                "{}: error {e:+} {unit} beyond the MPE ±{m} {unit} at {r} {unit}",
                c.what
            ),
            ev,
        );
    } else if !t.span_failing && !t.reference_failing {
        clear(&mut state.present, AlertKind::OutOfTolerance, out);
    }
    Some(error / c.mpe)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use calwatch_protocol::{AlertKind, Severity};

    use super::super::fixtures::*;
    use super::super::{CheckConfig, DeviceState, Register, Verdict};
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn r76_rows_at_their_boundaries() {
        use ScaleClass::*;
        let cases = [
            (I, 50_000.0, 0.5),
            (I, 50_001.0, 1.0),
            (I, 200_000.0, 1.0),
            (I, 200_001.0, 1.5),
            (I, 5_000_000.0, 1.5),
            (II, 5_000.0, 0.5),
            (II, 5_001.0, 1.0),
            (II, 20_000.0, 1.0),
            (II, 20_001.0, 1.5),
            (II, 100_000.0, 1.5),
            (III, 0.0, 0.5),
            (III, 500.0, 0.5),
            (III, 501.0, 1.0),
            (III, 2_000.0, 1.0),
            (III, 2_001.0, 1.5),
            (III, 10_000.0, 1.5),
            (IIII, 50.0, 0.5),
            (IIII, 51.0, 1.0),
            (IIII, 200.0, 1.0),
            (IIII, 201.0, 1.5),
            (IIII, 1_000.0, 1.5),
        ];
        for (class, m, mpe) in cases {
            assert_eq!(scale_mpe_verification_e(class, m), mpe, "{class:?} m = {m}");
        }
        assert_eq!(ScaleClass::parse("IIII"), Some(IIII));
        assert_eq!(ScaleClass::parse("IV"), None);
    }

    #[test]
    fn retail_scale_15_kg_e_5_g() {
        let e = 0.005;
        // (load kg, MPE on verification g): ±2.5 g to 2.5 kg, ±5 g to 10 kg, ±7.5 g to 15 kg
        let cases = [
            (0.1, 2.5),
            (2.5, 2.5),
            (2.505, 5.0),
            (10.0, 5.0),
            (10.005, 7.5),
            (12.0, 7.5),
            (15.0, 7.5),
        ];
        for (load, g) in cases {
            let at_verification = scale_mpe_kg(ScaleClass::III, e, load, false);
            assert!(
                close(at_verification, g / 1000.0),
                "{load} kg: {at_verification}"
            );
            let in_service = scale_mpe_kg(ScaleClass::III, e, load, true);
            assert!(
                close(in_service, 2.0 * g / 1000.0),
                "{load} kg: {in_service}"
            );
        }
    }

    #[test]
    fn dispenser_and_meter_mpe() {
        // the 2 L floor
        assert!(close(dispenser_mpe_l(0.5, 0.5), 0.01));
        assert!(close(dispenser_mpe_l(0.5, 1.99), 0.01));
        assert!(close(dispenser_mpe_l(0.5, 2.0), 0.01));
        assert!(close(dispenser_mpe_l(0.5, 20.0), 0.1));
        assert!(close(dispenser_mpe_l(0.3, 50.0), 0.15)); // JJG 443
        let classes = [
            ("0.2S", 0.2),
            ("0.5S", 0.5),
            ("1", 1.0),
            ("2", 2.0),
            ("A", 2.0),
            ("B", 1.0),
            ("C", 0.5),
        ];
        for (class, pct) in classes {
            assert_eq!(meter_class_pct(class), Some(pct), "{class}");
        }
        assert_eq!(meter_class_pct("X"), None);
        assert_eq!(meter_class_pct("-1"), None);
        assert!(close(meter_mpe_kwh(0.5, 200.0), 1.0));
        assert!(within(0.015, 0.015));
        assert!(!within(0.0151, 0.015));
    }

    #[test]
    fn scale_check_weight_class_iii() {
        let mut d = device(DeviceKind::Scale, Some("III"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        // 12 kg = 2400 e: 1.5 e on verification, ±15 g in service
        let check = |gross: f64| {
            [
                ("gross_kg", n(gross)),
                ("stable", b(true)),
                ("check_ref_kg", n(12.0)),
            ]
        };
        assert!(run(&d, &mut st, &cfg, 1, 1000, &check(12.015)).is_empty());
        assert!(run(&d, &mut st, &cfg, 2, 2000, &check(11.985)).is_empty());
        let v = run(&d, &mut st, &cfg, 3, 3000, &check(12.02));
        assert_eq!(
            raised(&v),
            [(AlertKind::OutOfTolerance, Severity::Critical)]
        );
        let Verdict::Raise {
            message, evidence, ..
        } = &v[0]
        else {
            panic!()
        };
        assert_eq!(
            message,
            "check weight: error +0.02 kg beyond the MPE ±0.015 kg at 12 kg"
        );
        assert_eq!(evidence["mpe"], 0.015);
        assert_eq!(evidence["source"], "span");
        // not stable: no comparison
        let unstable = [
            ("gross_kg", n(12.0)),
            ("stable", b(false)),
            ("check_ref_kg", n(12.0)),
        ];
        assert!(run(&d, &mut st, &cfg, 4, 4000, &unstable).is_empty());
        assert_eq!(
            run(&d, &mut st, &cfg, 5, 5000, &check(12.0)),
            [clear_of(AlertKind::OutOfTolerance)]
        );
        // with a tare in use the net indication is compared
        let tared = [
            ("gross_kg", n(12.5)),
            ("tare_kg", n(0.5)),
            ("net_kg", n(12.01)),
            ("stable", b(true)),
            ("check_ref_kg", n(12.0)),
        ];
        assert!(run(&d, &mut st, &cfg, 6, 6000, &tared).is_empty());
    }

    #[test]
    fn dispenser_and_meter_checks() {
        let cfg = CheckConfig::default();
        let mut d = device(DeviceKind::Dispenser, None);
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let mut st = DeviceState::default();
        // 1 L into a standard measure: MPE that of 2 L, 0.01 L
        let m = |sale: f64| [("sale_l", n(sale)), ("check_ref_l", n(1.0))];
        assert!(run(&d, &mut st, &cfg, 1, 1000, &m(1.01)).is_empty());
        let v = run(&d, &mut st, &cfg, 2, 2000, &m(1.011));
        assert_eq!(
            raised(&v),
            [(AlertKind::OutOfTolerance, Severity::Critical)]
        );

        let mut d = device(DeviceKind::EnergyMeter, Some("0.5S"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let mut st = DeviceState::default();
        let c = |kwh: f64| [("check_kwh", n(kwh)), ("check_ref_kwh", n(200.0))];
        assert!(run(&d, &mut st, &cfg, 1, 1000, &c(201.0)).is_empty());
        assert!(run(&d, &mut st, &cfg, 2, 2000, &c(199.0)).is_empty());
        let v = run(&d, &mut st, &cfg, 3, 3000, &c(201.5));
        assert_eq!(
            raised(&v),
            [(AlertKind::OutOfTolerance, Severity::Critical)]
        );
    }

    #[test]
    fn reference_device_energy_advance() {
        let cfg = CheckConfig::default();
        let mut d = device(DeviceKind::EnergyMeter, Some("1"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let mut st = DeviceState::default();
        let reference = |t0: i64, e0: f64, t1: i64, e1: f64| ReferenceEnergy {
            prev: Register {
                seq: 1,
                ts: t0,
                value: e0,
            },
            last: Register {
                seq: 2,
                ts: t1,
                value: e1,
            },
        };
        let e = |x: f64| [("energy_kwh", n(x))];
        // the anchor: reference 1000 kWh at t = 30 s (interpolated halfway)
        let r0 = reference(0, 990.0, 60_000, 1010.0);
        assert_eq!(r0.at(30_000), Some(1000.0));
        assert_eq!(r0.at(120_000), Some(1030.0));
        assert_eq!(r0.at(120_001), None);
        assert!(run_ref(&d, &mut st, &cfg, 1, 30_000, &e(500.0), Some(r0)).is_empty());
        // reference advanced 5 kWh only: not yet compared
        let r1 = reference(0, 1000.0, 60_000, 1005.0);
        assert!(run_ref(&d, &mut st, &cfg, 2, 60_000, &e(505.0 + 1.0), Some(r1)).is_empty());
        assert!(st.reference_anchor.is_some_and(|a| a.ts == 30_000));
        // reference +100 kWh, this meter +101 kWh: error 1 kWh = MPE (1 %): within
        let r2 = reference(3_000_000, 1090.0, 3_600_000, 1100.0);
        assert!(run_ref(&d, &mut st, &cfg, 3, 3_600_000, &e(601.0), Some(r2)).is_empty());
        // next: reference +100, this meter +102: out of tolerance
        let r3 = reference(7_000_000, 1190.0, 7_200_000, 1200.0);
        let v = run_ref(&d, &mut st, &cfg, 4, 7_200_000, &e(703.0), Some(r3));
        assert_eq!(
            raised(&v),
            [(AlertKind::OutOfTolerance, Severity::Critical)]
        );
        let Verdict::Raise { evidence, .. } = &v[0] else {
            panic!()
        };
        assert_eq!(evidence["source"], "reference");
        assert_eq!(evidence["reference"], 100.0);
        assert_eq!(evidence["error"], 2.0);
        assert_eq!(evidence["since"], 3_600_000);
        assert_eq!(evidence["reference_device"], "REF-1");
        // the reference's readings too old for this instant: no comparison
        let v = run_ref(&d, &mut st, &cfg, 5, 9_000_000, &e(800.0), Some(r3));
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(
            st.drift
                .get(crate::checks::DriftSource::Reference)
                .comparisons,
            2
        );
    }
}
