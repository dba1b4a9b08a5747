//! Maximum permissible errors and the tolerance check (DESIGN "Tolerance", decision 5): only a
//! comparison against a reference (`check_ref_*`, `reference_device`) can be
//! `out_of_tolerance`; |error| equal to the MPE is within tolerance.

use calwatch_protocol::{AlertKind, Severity};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::seal::Step;
use super::{
    clear, evidence, flag, num, raise_event, rounded, Ctx, DeviceState, DriftSource, EnergySample,
    ReferenceEnergy, Values, Verdict, TIE,
};
use crate::domain::{Device, DeviceKind};

/// A dispenser without `mpe_pct` (DESIGN decision 3; OIML R 117 / MID class 0.5).
pub(crate) const DEFAULT_DISPENSER_MPE_PCT: f64 = 0.5;

/// Below this volume a dispenser's MPE is that of this volume (DESIGN "Tolerance").
pub(crate) const DISPENSER_MIN_MPE_VOLUME_L: f64 = 2.0;

/// A `reference_device` comparison is made only when the MPE is at least this many times the
/// uncertainty of the two advances (DESIGN decision 16: resolution and interpolation under a
/// tenth of the MPE), so a meter within its class is never out of tolerance by arithmetic.
pub(crate) const MPE_OVER_UNCERTAINTY: f64 = 10.0;

/// Decimal places looked for in a register value (the agent's scaled counts have at most 9).
const REGISTER_MAX_DECIMALS: i32 = 9;

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

/// The step of a register showing `x`, at least: that of its last decimal (0.01 for 1234.56;
/// 1234.5 reads as 0.1, so take the finest over several samples, [`register_resolution`]);
/// for an f32 register (`x` the shortest decimal of an f32, as the agent sends it, or no
/// decimal at all) not finer than the f32 step at the value (0.0078 at 100 000).
pub(crate) fn register_step(x: f64) -> f64 {
    let f32_step = {
        let f = (x as f32).abs();
        f64::from(f32::from_bits(f.to_bits() + 1) - f)
    };
    let decimal = (0..=REGISTER_MAX_DECIMALS).find_map(|d| {
        let p = 10f64.powi(d);
        ((x * p).round() / p == x).then(|| 10f64.powi(-d))
    });
    match decimal {
        Some(step) if step >= f32_step => step,
        Some(step) if (x as f32).to_string().parse::<f64>() != Ok(x) => step,
        _ => f32_step,
    }
}

/// The resolution of the register that gave `samples`: the finest [`register_step`] among
/// them (a trailing zero in one sample does not make the register coarser).
pub(crate) fn register_resolution(samples: &[EnergySample]) -> f64 {
    samples
        .iter()
        .map(|s| register_step(s.kwh))
        .fold(f64::INFINITY, f64::min)
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

/// An end of a `reference_device` comparison: both meters' energy at one of this meter's
/// sample instants.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceAnchor {
    pub ts: i64,
    pub own_kwh: f64,
    /// The reference meter's energy at `ts`, interpolated between two of its samples.
    pub reference_kwh: f64,
    /// Uncertainty of this end, kWh: the interpolation bound plus both registers'
    /// resolution. `None` in an anchor saved before decision 16 (possibly extrapolated, no
    /// bound): such an anchor is taken again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncertainty_kwh: Option<f64>,
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
    /// Uncertainty of measured − reference, same unit (`reference_device` comparisons).
    pub(super) uncertainty: Option<f64>,
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
                uncertainty: None,
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
                uncertainty: None,
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
                uncertainty: None,
            }
        }
        DeviceKind::Other => return None,
    };
    Some(c)
}

/// The `reference_device` comparison (DESIGN decisions 3, 16): this meter's energy advance
/// against the reference's over the same interval. Both ends are instants of this meter's own
/// samples that the reference's samples bracket, with the reference's energy interpolated
/// there, never extrapolated. When the reference is behind (polled later, its batch not in
/// yet) the end is the newest of this meter's samples it does bracket, so the interval closes
/// a little later and nothing but the samples is remembered; a reference more than
/// [`super::ENERGY_SAMPLES`] of this meter's samples behind closes it at a later reading.
/// Each end carries its uncertainty (the interpolation bound plus both registers'
/// resolution); the comparison is made once the reference advanced `reference_min_kwh` and
/// the MPE is [`MPE_OVER_UNCERTAINTY`] times the two ends' uncertainty, and its end starts the
/// next. A register going back restarts the interval.
pub(super) fn reference_comparison(
    ctx: &Ctx<'_>,
    state: &mut DeviceState,
    v: &Values,
    energy: Option<Step>,
    reference: Option<ReferenceEnergy>,
) -> Option<Comparison> {
    v.energy_kwh?;
    if matches!(energy, Some(Step::Backward(_))) {
        state.reference_anchor = None;
        return None;
    }
    let reference = reference?;
    let pct = meter_class_pct(ctx.device.accuracy_class.as_deref()?)?;
    let end = bracketed_end(&state.energy_samples, &reference)?;
    let (from, from_uncertainty) = match state.reference_anchor {
        Some(
            a @ ReferenceAnchor {
                uncertainty_kwh: Some(u),
                ..
            },
        ) if a.ts <= end.ts => (a, u),
        _ => {
            state.reference_anchor = Some(end);
            return None;
        }
    };
    let (own_adv, ref_adv) = (
        end.own_kwh - from.own_kwh,
        end.reference_kwh - from.reference_kwh,
    );
    if own_adv < 0.0 || ref_adv < 0.0 {
        state.reference_anchor = Some(end);
        return None;
    }
    let uncertainty = from_uncertainty + end.uncertainty_kwh.unwrap_or(f64::NAN);
    let mpe = meter_mpe_kwh(pct, ref_adv);
    // false too for an uncertainty that is not a number
    let resolved = mpe >= MPE_OVER_UNCERTAINTY * uncertainty;
    if ref_adv < ctx.cfg.reference_min_kwh || !resolved {
        return None;
    }
    state.reference_anchor = Some(end);
    Some(Comparison {
        source: DriftSource::Reference,
        what: "energy advance against the reference meter",
        measured_name: "energy_kwh",
        measured: own_adv,
        reference: ref_adv,
        mpe,
        unit: "kWh",
        since: Some(from.ts),
        uncertainty: Some(uncertainty),
    })
}

/// The newest of this meter's samples `own` that the reference's samples bracket, as an end
/// of a comparison.
fn bracketed_end(own: &[EnergySample], reference: &ReferenceEnergy) -> Option<ReferenceAnchor> {
    let (s, r) = own
        .iter()
        .rev()
        .find_map(|s| reference.at(s.ts).map(|r| (s, r)))?;
    let resolution = register_resolution(own) + register_resolution(reference.samples());
    Some(ReferenceAnchor {
        ts: s.ts,
        own_kwh: s.kwh,
        reference_kwh: r.kwh,
        uncertainty_kwh: Some(r.bound_kwh + resolution),
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
        if let Some(u) = c.uncertainty {
            ev.insert("uncertainty".into(), num(u, 9));
        }
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
    use super::super::{CheckConfig, DeviceState, Verdict};
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
    fn register_steps() {
        // a 2-decimal register; a trailing zero reads coarser, the finest sample decides
        assert!(close(register_step(1234.56), 0.01));
        assert!(close(register_step(1234.5), 0.1));
        assert!(close(register_step(1234.0), 1.0));
        let samples = |xs: &[f64]| -> Vec<EnergySample> {
            xs.iter()
                .enumerate()
                .map(|(i, &kwh)| EnergySample { ts: i as i64, kwh })
                .collect()
        };
        assert!(close(
            register_resolution(&samples(&[1234.5, 1234.56])),
            0.01
        ));
        // an f32 register as the agent sends it (its shortest decimal): not finer than the
        // f32 step, 1/128 at 100 000 ("100000.016")
        let f32_value: f64 = (100_000.0f32 + 1.0 / 64.0).to_string().parse().unwrap();
        assert_eq!(f32_value, 100_000.016);
        assert!(close(register_step(f32_value), 1.0 / 128.0), "{f32_value}");
        assert!(close(register_step(100_000.01), 0.01));
        let f32_value: f64 = (2_000_000.0f32 + 0.25).to_string().parse().unwrap();
        assert!(close(register_step(f32_value), 0.125), "{f32_value}");
        // a scaled count of 0.01 kWh far above f32 precision keeps its 0.01
        assert!(close(register_step(1_000_000.01), 0.01));
        // no decimal pattern (a scaled float): the f32 step at the value
        assert!(close(register_step(1_234.567_890_123_4), 1.0 / 8192.0));
    }

    /// DESIGN decision 16: ends bracketed by the reference's samples, never extrapolated; a
    /// comparison only once the MPE is ten times the uncertainty. (Until issue #16 this test
    /// passed two-sample references extrapolated one interval ahead, compared after 10 kWh.)
    #[test]
    fn reference_device_energy_advance() {
        let cfg = CheckConfig::default();
        let mut d = device(DeviceKind::EnergyMeter, Some("1"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let mut st = DeviceState::default();
        let reference = |samples: &[(i64, f64)]| {
            let s: Vec<EnergySample> = samples.iter().map(|&x| x.into()).collect();
            ReferenceEnergy::new(&s)
        };
        let e = |x: f64| [("energy_kwh", n(x))];
        let comparisons = |st: &DeviceState| {
            st.drift
                .get(crate::checks::DriftSource::Reference)
                .comparisons
        };
        // the anchor at 30 s: the reference 1000.515 kWh, halfway between its samples; the
        // interpolation bound is that minute's 1.01 kWh, plus 0.01 kWh for each register
        let r0 = reference(&[(0, 1000.01), (60_000, 1001.02)]);
        assert_eq!(r0.unwrap().at(90_000), None, "never extrapolated");
        assert!(run_ref(&d, &mut st, &cfg, 1, 30_000, &e(500.03), r0).is_empty());
        let a = st.reference_anchor.unwrap();
        assert_eq!((a.ts, a.own_kwh), (30_000, 500.03));
        assert!(close(a.reference_kwh, 1000.515));
        assert!(close(a.uncertainty_kwh.unwrap(), 1.03));
        // the reference behind (no sample at or after 90 s yet): the interval waits
        assert!(run_ref(&d, &mut st, &cfg, 2, 90_000, &e(501.04), r0).is_empty());
        assert_eq!(st.reference_anchor, Some(a));
        // an hour on, +59.5 kWh: MPE 0.59 kWh is under 10 × 1.05 kWh of uncertainty: not
        // compared (the old rule compared from 10 kWh)
        let r1 = reference(&[(3_540_000, 1059.01), (3_600_000, 1060.01)]);
        assert!(run_ref(&d, &mut st, &cfg, 3, 3_600_000, &e(560.03), r1).is_empty());
        assert_eq!(comparisons(&st), 0);
        // 40 h on: the reference's samples end a minute before this reading: nothing
        let r2 = reference(&[(143_880_000, 2998.52), (143_940_000, 2999.52)]);
        let t2 = 144_000_000;
        assert!(run_ref(&d, &mut st, &cfg, 4, t2, &e(2520.03), r2).is_empty());
        // a minute later the reference has caught up to 30 s before this reading: the end is
        // the previous reading, on a reference sample: +2000.005 kWh against +2020 kWh,
        // error 19.995 within the MPE 20.00005 (≥ 10 × 1.05 uncertainty)
        let r3 = reference(&[
            (143_940_000, 2999.52),
            (t2, 3000.52),
            (t2 + 30_000, 3001.02),
        ]);
        let v = run_ref(&d, &mut st, &cfg, 5, t2 + 60_000, &e(2521.04), r3);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(comparisons(&st), 1);
        let a = st.reference_anchor.unwrap();
        assert_eq!((a.ts, a.own_kwh, a.reference_kwh), (t2, 2520.03, 3000.52));
        // 10 h on, +600 kWh against +612.01: error 12.01 beyond the MPE 6: out of tolerance
        let t3 = t2 + 36_000_000;
        let r4 = reference(&[(t3 - 60_000, 3599.52), (t3, 3600.52)]);
        let v = run_ref(&d, &mut st, &cfg, 6, t3, &e(3132.04), r4);
        assert_eq!(
            raised(&v),
            [(AlertKind::OutOfTolerance, Severity::Critical)]
        );
        let Verdict::Raise { evidence, .. } = &v[0] else {
            panic!()
        };
        assert_eq!(evidence["source"], "reference");
        assert_eq!(evidence["reference"], 600.0);
        assert_eq!(evidence["error"], 12.01);
        assert_eq!(evidence["mpe"], 6.0);
        assert_eq!(evidence["uncertainty"], 0.04);
        assert_eq!(evidence["since"], t2);
        assert_eq!(evidence["reference_device"], "REF-1");
        assert_eq!(comparisons(&st), 2);
        // the register going back restarts the interval
        let r5 = reference(&[(t3, 3600.52), (t3 + 60_000, 3601.52)]);
        run_ref(&d, &mut st, &cfg, 7, t3 + 60_000, &e(3000.01), r5);
        assert_eq!(st.reference_anchor, None);
    }
}
