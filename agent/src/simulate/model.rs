//! Instrument models: what a simulated scale, dispenser or energy meter shows at a moment.
//!
//! Every value is a deterministic function of simulated time, unit id, the fleet's seed,
//! the group's [`ModelOptions`] and the unit's faults, so a test can predict it. The only
//! state is a cache of the dispenser's running totalizer, which is a pure function too.
//!
//! - **Scale**: a customer every `cycle_s` (empty 30%, load settling 10%, stable 40%,
//!   unloading 10%, empty 10%), loads from 20 e to 80% of Max, display rounded to e.
//!   Daily check-weight test: every `check_every_s`, for `check_for_s`, a reference mass
//!   from `check_refs_kg` is on the pan: `gross = reference + error`, `check_ref_kg` holds
//!   the reference (0 outside the window). The first unit of a group tests at
//!   `check_offset_s`, each next one `check_for_s` later.
//! - **Dispenser**: a sale completes every `cycle_s` (`sale_min_l`..`sale_max_l`, to the
//!   centilitre); `encoder_sale_l` is the true volume, `sale_l` the displayed one and the
//!   totalizer sums what was displayed (a pulser manipulation moves both).
//! - **Energy meter**: 230 V ± 2%, a current swinging around `current_a`, power factor
//!   near 0.95; `power_w` is the total Σ V·I·PF (times the meter's error), three-phase when
//!   the profile maps `*_l2`/`*_l3` names. Energy integrates the mean power. During a
//!   check window `check_ref_kwh` is the true energy of the preceding `check_every_s` and
//!   `check_kwh` this meter's reading of the same interval.
//! - **Other**: a test pattern (see [`test_pattern`]) so interop tests know every value.

use std::sync::{Arc, Mutex};

use crate::profile::{Decoded, InstrumentKind, Profile, Table, ValueDef, ValueType};

use super::fleet::{ErrorSize, Fault, FaultEffect, GarbageMode, ModelOptions};

/// Raw register contents of the test pattern served for profiles of kind `other`:
/// each value holds its type's constant (then `scale` and `offset` apply as usual).
/// The bytes of each constant differ, so a swapped word or byte shows.
pub mod pattern {
    /// 0xC822: above i16::MAX, so a signed decode shows.
    pub const U16: u16 = 51_234;
    pub const I16: i16 = -12_345;
    /// 0xA1B2_C3D4: above i32::MAX.
    pub const U32: u32 = 0xA1B2_C3D4;
    /// -0x1A2B_3C4D.
    pub const I32: i32 = -0x1A2B_3C4D;
    /// 0x0012_3456_789A_BCDE: below 2^53, so it survives the f64 of a reading.
    pub const U64: u64 = 0x0012_3456_789A_BCDE;
    pub const I64: i64 = -0x0012_3456_789A_BCDE;
    /// 0x4640_E6B6.
    pub const F32: f32 = 12_345.678;
    pub const F64: f64 = -299_792.458;
    /// Strings other than `model` and `serial`.
    pub const TEXT: &str = "CALWATCH";
}

/// The value of `def` in the test pattern: the type's constant of [`pattern`] as raw
/// register content; a bool or bit is on unless its name ends in `_off`. Strings named
/// `model` and `serial` are the instrument's identity; other strings are [`pattern::TEXT`].
pub fn test_pattern(def: &ValueDef) -> Decoded {
    let scaled = |raw: f64| Decoded::Number(raw * def.scale + def.offset);
    match def.ty {
        ValueType::Bool | ValueType::Bit => Decoded::Bool(!def.name.as_str().ends_with("_off")),
        ValueType::String => Decoded::Text(pattern::TEXT.to_string()),
        ValueType::U16 => scaled(f64::from(pattern::U16)),
        ValueType::I16 => scaled(f64::from(pattern::I16)),
        ValueType::U32 => scaled(f64::from(pattern::U32)),
        ValueType::I32 => scaled(f64::from(pattern::I32)),
        ValueType::U64 => scaled(pattern::U64 as f64),
        ValueType::I64 => scaled(pattern::I64 as f64),
        ValueType::F32 => scaled(f64::from(pattern::F32)),
        ValueType::F64 => scaled(pattern::F64),
    }
}

/// Cheap deterministic noise in [0, 1) from two integers (splitmix64).
pub(crate) fn noise(a: u64, b: u64) -> f64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_add(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn hours_since(t: f64, at: f64) -> f64 {
    (t - at).max(0.0) / 3600.0
}

/// What the transport faults of a unit do to a request at a moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct WireFaults {
    pub(crate) silent: bool,
    pub(crate) delay: Option<std::time::Duration>,
    pub(crate) garbage: Option<GarbageMode>,
    pub(crate) exception: Option<u8>,
}

/// Running totalizer of a dispenser: `sum_cl` is the display total of sales 1..=`sales`.
#[derive(Debug, Default)]
struct SaleLedger {
    sales: u64,
    sum_cl: i64,
}

/// One simulated instrument.
#[derive(Debug)]
pub(crate) struct Instrument {
    pub(crate) unit: u8,
    /// Position in its group: staggers the check tests.
    index: u32,
    key: u64,
    kind: InstrumentKind,
    model: String,
    options: ModelOptions,
    faults: Vec<Fault>,
    phases: usize,
    /// The profile's values of each table (coil, discrete, holding, input).
    tables: [Vec<ValueDef>; 4],
    ledger: Mutex<SaleLedger>,
}

fn table_index(t: Table) -> usize {
    match t {
        Table::Coil => 0,
        Table::Discrete => 1,
        Table::Holding => 2,
        Table::Input => 3,
    }
}

/// Values of an instrument at a moment, by well-known name.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    values: Vec<(&'static str, Decoded)>,
}

impl Snapshot {
    fn num(&mut self, name: &'static str, x: f64) {
        self.values.push((name, Decoded::Number(x)));
    }
    fn flag(&mut self, name: &'static str, b: bool) {
        self.values.push((name, Decoded::Bool(b)));
    }
    fn get(&self, name: &str) -> Option<&Decoded> {
        self.values.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

const PHASE_NAMES: [[&str; 4]; 3] = [
    [
        "voltage_v_l1",
        "current_a_l1",
        "power_factor_l1",
        "power_w_l1",
    ],
    [
        "voltage_v_l2",
        "current_a_l2",
        "power_factor_l2",
        "power_w_l2",
    ],
    [
        "voltage_v_l3",
        "current_a_l3",
        "power_factor_l3",
        "power_w_l3",
    ],
];
const PHASE_PF: [f64; 3] = [0.95, 0.93, 0.96];

impl Instrument {
    pub(crate) fn new(
        profile: &Arc<Profile>,
        unit: u8,
        index: u32,
        seed: u64,
        options: ModelOptions,
        faults: Vec<Fault>,
    ) -> Instrument {
        let mut tables: [Vec<ValueDef>; 4] = Default::default();
        for def in &profile.values {
            tables[table_index(def.table)].push(def.clone());
        }
        let three_phase = profile.values.iter().any(|v| {
            let n = v.name.as_str();
            n.ends_with("_l2") || n.ends_with("_l3")
        });
        Instrument {
            unit,
            index,
            key: seed
                .wrapping_mul(0x0100_0000_01B3)
                .wrapping_add(u64::from(unit)),
            kind: profile.kind,
            model: profile.model.clone(),
            options,
            faults,
            phases: if three_phase { 3 } else { 1 },
            tables,
            ledger: Mutex::new(SaleLedger::default()),
        }
    }

    fn active(&self, t: f64) -> impl Iterator<Item = &Fault> {
        self.faults.iter().filter(move |f| f.active(t))
    }

    /// The transport faults in force at `t`.
    pub(crate) fn wire_faults(&self, t: f64) -> WireFaults {
        let mut w = WireFaults::default();
        for f in self.active(t) {
            match f.effect {
                FaultEffect::Silent => w.silent = true,
                FaultEffect::Slow { delay } => w.delay = Some(delay),
                FaultEffect::Garbage { mode } => w.garbage = Some(mode),
                FaultEffect::Exception { code } => w.exception = Some(code),
                _ => {}
            }
        }
        w
    }

    /// The registers (or bits, one per element) `start..start + count` of `table` at `t`.
    pub(crate) fn read(&self, table: Table, start: u16, count: u16, t: f64) -> Vec<u16> {
        let end = u32::from(start) + u32::from(count);
        let mut words = vec![0u16; usize::from(count)];
        let defs = &self.tables[table_index(table)];
        let hit = |d: &&ValueDef| {
            u32::from(d.address) < end && u32::from(d.address) + u32::from(d.len) > u32::from(start)
        };
        if !defs.iter().any(|d| hit(&d)) {
            return words;
        }
        let snap = self.snapshot(t);
        for def in defs.iter().filter(hit) {
            let value = self.value(&snap, def);
            for (i, word) in def.encode(&value).into_iter().enumerate() {
                let a = u32::from(def.address) + i as u32;
                if a >= u32::from(start) && a < end {
                    words[(a - u32::from(start)) as usize] |= word;
                }
            }
        }
        words
    }

    /// The value `def` maps, at the moment of `snap`. Names the model does not know read
    /// as zero (as unused registers of a real instrument do).
    pub(crate) fn value(&self, snap: &Snapshot, def: &ValueDef) -> Decoded {
        match def.name.as_str() {
            "model" if def.ty == ValueType::String => return Decoded::Text(self.model.clone()),
            "serial" if def.ty == ValueType::String => {
                return Decoded::Text(format!("SIM{:05}", self.unit))
            }
            _ => {}
        }
        if self.kind == InstrumentKind::Other {
            return test_pattern(def);
        }
        match snap.get(def.name.as_str()) {
            Some(v) => v.clone(),
            None if matches!(def.ty, ValueType::Bool | ValueType::Bit) => Decoded::Bool(false),
            None => Decoded::Number(0.0),
        }
    }

    fn event_counter(&self, t: f64) -> f64 {
        self.options.event_counter
            + self
                .active(t)
                .map(|f| match f.effect {
                    FaultEffect::SealChange { by } => by,
                    _ => 0.0,
                })
                .sum::<f64>()
    }

    /// The check window at `t`: its number and start, when a check test is on.
    fn check_window(&self, t: f64) -> Option<(i64, f64)> {
        let o = &self.options;
        let offset = o.check_offset_s + f64::from(self.index) * o.check_for_s;
        let k = ((t - offset) / o.check_every_s).floor();
        let start = offset + k * o.check_every_s;
        (t - start < o.check_for_s).then_some((k as i64, start))
    }

    /// All well-known values at simulated time `t`.
    pub(crate) fn snapshot(&self, t: f64) -> Snapshot {
        let mut s = Snapshot::default();
        match self.kind {
            InstrumentKind::Scale => self.scale(t, &mut s),
            InstrumentKind::Dispenser => self.dispenser(t, &mut s),
            InstrumentKind::EnergyMeter => self.meter(t, &mut s),
            InstrumentKind::Other => {}
        }
        s.num("event_counter", self.event_counter(t));
        s
    }

    /// Error of the scale at `t` with true load `m`, in kg.
    fn scale_error(&self, t: f64, m: f64) -> f64 {
        let e = self.options.e_kg;
        self.active(t)
            .map(|f| match f.effect {
                FaultEffect::Drift(ErrorSize::E(x)) => x * e * hours_since(t, f.at),
                FaultEffect::Drift(ErrorSize::Pct(x)) => x / 100.0 * m * hours_since(t, f.at),
                FaultEffect::Step(ErrorSize::E(x)) => x * e,
                FaultEffect::Step(ErrorSize::Pct(x)) => x / 100.0 * m,
                _ => 0.0,
            })
            .sum()
    }

    fn scale(&self, t: f64, s: &mut Snapshot) {
        let o = &self.options;
        let e = o.e_kg;
        let shown = |m: f64| ((m + self.scale_error(t, m)) / e).round() * e;
        if let Some((k, _)) = self.check_window(t) {
            let refs = &o.check_refs_kg;
            let i = (noise(self.key ^ 0xC4EC, k as u64) * refs.len() as f64) as usize;
            let reference = refs[i.min(refs.len() - 1)];
            let gross = shown(reference);
            s.num("gross_kg", gross);
            s.num("net_kg", gross);
            s.num("tare_kg", 0.0);
            s.flag("stable", true);
            s.flag("zero", false);
            s.flag("overload", gross > o.max_kg + 9.0 * e);
            s.num("check_ref_kg", reference);
            return;
        }
        let cycle = (t / o.cycle_s).floor();
        let phase = t / o.cycle_s - cycle;
        let lo = 20.0 * e;
        let hi = (0.8 * o.max_kg).max(lo);
        let load = ((lo + noise(self.key, cycle as u64) * (hi - lo)) / e).round() * e;
        let (m, stable) = match phase {
            p if p < 0.3 => (0.0, true),
            p if p < 0.4 => (load * (p - 0.3) / 0.1, false),
            p if p < 0.8 => (load, true),
            p if p < 0.9 => (load * (0.9 - p) / 0.1, false),
            _ => (0.0, true),
        };
        let gross = shown(m);
        let at_zero = m == 0.0 && self.scale_error(t, 0.0).abs() <= 0.25 * e;
        s.num("gross_kg", gross);
        s.num("net_kg", gross);
        s.num("tare_kg", 0.0);
        s.flag("stable", stable);
        s.flag("zero", stable && at_zero);
        s.flag("overload", gross > o.max_kg + 9.0 * e);
        s.num("check_ref_kg", 0.0);
    }

    /// Relative error of the dispenser's display over the encoder for a sale at `t`.
    fn display_error(&self, t: f64) -> f64 {
        self.active(t)
            .map(|f| match f.effect {
                FaultEffect::Cheating { pct } => pct / 100.0,
                FaultEffect::Drift(ErrorSize::Pct(x)) => x / 100.0 * hours_since(t, f.at),
                FaultEffect::Step(ErrorSize::Pct(x)) => x / 100.0,
                _ => 0.0,
            })
            .sum()
    }

    /// Sale `n` (from 1): (encoder, display) volumes in centilitres.
    fn sale_cl(&self, n: u64) -> (i64, i64) {
        let o = &self.options;
        let litres = o.sale_min_l + (o.sale_max_l - o.sale_min_l) * noise(self.key + 1000, n);
        let encoder = (litres * 100.0).round();
        let display = (encoder * (1.0 + self.display_error(n as f64 * o.cycle_s))).round();
        (encoder as i64, display as i64)
    }

    /// Sum of the displayed volumes of sales 1..=n, in centilitres.
    fn displayed_total_cl(&self, n: u64) -> i64 {
        let Ok(mut ledger) = self.ledger.lock() else {
            return (1..=n).map(|i| self.sale_cl(i).1).sum();
        };
        if ledger.sales > n {
            *ledger = SaleLedger::default();
        }
        while ledger.sales < n {
            ledger.sales += 1;
            let sale = ledger.sales;
            ledger.sum_cl += self.sale_cl(sale).1;
        }
        ledger.sum_cl
    }

    fn dispenser(&self, t: f64, s: &mut Snapshot) {
        let o = &self.options;
        let sales = (t / o.cycle_s).floor().max(0.0) as u64;
        let (encoder, display) = if sales == 0 {
            (0, 0)
        } else {
            self.sale_cl(sales)
        };
        let mut total_cl = 100_000 * 100 * i64::from(self.unit) + self.displayed_total_cl(sales);
        let mut k_factor = (o.k_factor, f64::NEG_INFINITY);
        let mut rollback = 0.0;
        for f in &self.faults {
            match f.effect {
                // Once, on the first sale at or after `at`.
                FaultEffect::TotalizerMismatch { litres } => {
                    let first = ((f.at / o.cycle_s).ceil() as u64).max(1);
                    if sales >= first {
                        total_cl += (litres * 100.0).round() as i64;
                    }
                }
                FaultEffect::Rollback { amount } if f.active(t) => rollback += amount,
                FaultEffect::KFactorChange { value } if f.active(t) && f.at >= k_factor.1 => {
                    k_factor = (value, f.at)
                }
                _ => {}
            }
        }
        s.num("sale_id", sales as f64);
        s.num("sale_l", display as f64 / 100.0);
        s.num("encoder_sale_l", encoder as f64 / 100.0);
        s.num("totalizer_l", total_cl as f64 / 100.0 - rollback);
        s.num("k_factor", k_factor.0);
        s.num("check_ref_l", 0.0);
    }

    /// The meter's relative error at `t`.
    fn meter_error(&self, t: f64) -> f64 {
        self.active(t)
            .map(|f| match f.effect {
                FaultEffect::Drift(ErrorSize::Pct(x)) => x / 100.0 * hours_since(t, f.at),
                FaultEffect::Step(ErrorSize::Pct(x)) => x / 100.0,
                _ => 0.0,
            })
            .sum()
    }

    fn mean_power_w(&self) -> f64 {
        PHASE_PF[..self.phases]
            .iter()
            .map(|pf| 230.0 * self.options.current_a * pf)
            .sum()
    }

    /// True energy register at `t`, kWh (integral of the mean power from a start value).
    fn true_energy_kwh(&self, t: f64) -> f64 {
        1000.0 * f64::from(self.unit) + self.mean_power_w() * t / 3_600_000.0
    }

    /// The energy this meter counts at `t`: the true energy plus the integral of its error.
    fn measured_energy_kwh(&self, t: f64) -> f64 {
        let excess_s: f64 = self
            .faults
            .iter()
            .map(|f| {
                let dt = (t - f.at).max(0.0);
                match f.effect {
                    FaultEffect::Step(ErrorSize::Pct(x)) => x / 100.0 * dt,
                    FaultEffect::Drift(ErrorSize::Pct(x)) => x / 100.0 / 3600.0 * dt * dt / 2.0,
                    _ => 0.0,
                }
            })
            .sum();
        self.true_energy_kwh(t) + self.mean_power_w() * excess_s / 3_600_000.0
    }

    fn meter(&self, t: f64, s: &mut Snapshot) {
        let u = f64::from(self.unit);
        let gain = 1.0 + self.meter_error(t);
        let mut total = 0.0;
        for (p, names) in PHASE_NAMES.iter().enumerate().take(self.phases) {
            let shift = p as f64 * 2.1;
            let v = 230.0 + 4.0 * (t / 37.0 + u + shift).sin();
            let i = self.options.current_a * (1.0 + 2.0 / 3.0 * (t / 300.0 + u + shift).sin());
            let pf = PHASE_PF[p];
            let w = v * i * pf * gain;
            total += w;
            s.num(names[0], v);
            s.num(names[1], i);
            s.num(names[2], pf);
            s.num(names[3], w);
            if p == 0 {
                s.num("voltage_v", v);
                s.num("current_a", i);
                s.num("power_factor", pf);
            }
        }
        s.num("power_w", total);
        s.num("frequency_hz", 50.0 + 0.02 * (t / 11.0).sin());
        let rollback: f64 = self
            .active(t)
            .map(|f| match f.effect {
                FaultEffect::Rollback { amount } => amount,
                _ => 0.0,
            })
            .sum();
        let energy = self.measured_energy_kwh(t) - rollback;
        s.num("energy_kwh", energy);
        s.num("import_kwh", energy);
        s.num("total_kwh", energy);
        s.num("export_kwh", 0.0);
        let (check, reference) = match self.check_window(t) {
            Some((_, start)) => {
                let from = start - self.options.check_every_s;
                (
                    self.measured_energy_kwh(start) - self.measured_energy_kwh(from),
                    self.true_energy_kwh(start) - self.true_energy_kwh(from),
                )
            }
            None => (0.0, 0.0),
        };
        s.num("check_kwh", check);
        s.num("check_ref_kwh", reference);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::simulate::fleet::{FaultEffect, ModelOptions};
    use std::path::Path;

    fn profile(name: &str) -> Arc<Profile> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config/profiles")
            .join(name);
        Arc::new(Profile::load(&p).unwrap())
    }

    fn instrument(name: &str, unit: u8, faults: Vec<Fault>) -> Instrument {
        let p = profile(name);
        let options = ModelOptions::for_kind(p.kind);
        Instrument::new(&p, unit, u32::from(unit) - 1, 0, options, faults)
    }

    fn num(i: &Instrument, name: &str, t: f64) -> f64 {
        match i.snapshot(t).get(name) {
            Some(Decoded::Number(x)) => *x,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn flag(i: &Instrument, name: &str, t: f64) -> bool {
        match i.snapshot(t).get(name) {
            Some(Decoded::Bool(b)) => *b,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn fault(unit: u8, at: f64, effect: FaultEffect) -> Fault {
        Fault {
            unit,
            at,
            until: None,
            effect,
        }
    }

    #[test]
    fn scale_cycle_is_plausible() {
        // Unit 2 tests its check weight at 60..120 s; before that it serves customers.
        let s = instrument("ft112.toml", 2, vec![]);
        assert_eq!(num(&s, "gross_kg", 1.0), 0.0);
        assert!(flag(&s, "zero", 1.0));
        assert!(!flag(&s, "stable", 7.0));
        let x = num(&s, "gross_kg", 10.0);
        assert!((0.1..=12.0).contains(&x), "{x}");
        assert!(!flag(&s, "zero", 10.0));
        assert_eq!(num(&s, "check_ref_kg", 10.0), 0.0);
    }

    #[test]
    fn check_weight_window_shows_the_reference() {
        let s = instrument("ft112.toml", 2, vec![]);
        let r = num(&s, "check_ref_kg", 61.0);
        assert!([2.0, 5.0, 10.0].contains(&r), "{r}");
        assert_eq!(num(&s, "gross_kg", 61.0), r);
        assert!(flag(&s, "stable", 61.0));
        assert_eq!(num(&s, "check_ref_kg", 120.5), 0.0);
        // The next day, at the same time.
        assert!(num(&s, "check_ref_kg", 86_400.0 + 90.0) > 0.0);
    }

    #[test]
    fn drift_and_step_move_the_scale_display() {
        let drift = fault(1, 0.0, FaultEffect::Drift(ErrorSize::E(2.0)));
        let s = instrument("ft112.toml", 1, vec![drift]);
        // After 3 h, +6 e = +30 g on the check weight of the next day's window.
        let t = 86_400.0 + 10.0;
        let r = num(&s, "check_ref_kg", t);
        let err = num(&s, "gross_kg", t) - r;
        assert!((err - 24.0 * 2.0 * 0.005).abs() < 0.0051, "{err}");
        let step = fault(1, 100.0, FaultEffect::Step(ErrorSize::Pct(1.0)));
        let s = instrument("ft112.toml", 1, vec![step]);
        assert_eq!(num(&s, "gross_kg", 10.0), num(&s, "check_ref_kg", 10.0));
        let t = 86_400.0 + 10.0;
        let r = num(&s, "check_ref_kg", t);
        assert!((num(&s, "gross_kg", t) - r * 1.01).abs() < 0.0026);
    }

    #[test]
    fn dispenser_totalizer_advances_by_the_sale() {
        let d = instrument("dispenser-fcc.toml", 2, vec![]);
        let before = num(&d, "totalizer_l", 59.0);
        let after = num(&d, "totalizer_l", 61.0);
        let sale = num(&d, "sale_l", 61.0);
        assert!(
            (after - before - sale).abs() < 1e-6,
            "{before} {after} {sale}"
        );
        assert_eq!(sale, num(&d, "encoder_sale_l", 61.0));
        assert_eq!(num(&d, "k_factor", 61.0), 100.12);
    }

    #[test]
    fn cheating_dispenser_displays_more_than_the_encoder() {
        let d = instrument(
            "dispenser-fcc.toml",
            1,
            vec![fault(1, 100.0, FaultEffect::Cheating { pct: 3.0 })],
        );
        assert_eq!(num(&d, "sale_l", 91.0), num(&d, "encoder_sale_l", 91.0));
        let (shown, true_l) = (num(&d, "sale_l", 121.0), num(&d, "encoder_sale_l", 121.0));
        assert!((shown / true_l - 1.03).abs() < 0.001, "{shown} {true_l}");
        // The totalizer follows the display: advance = shown sale.
        let adv = num(&d, "totalizer_l", 121.0) - num(&d, "totalizer_l", 119.0);
        assert!((adv - shown).abs() < 1e-6);
    }

    #[test]
    fn totalizer_mismatch_rollback_seal_and_k_factor() {
        let d = instrument(
            "dispenser-fcc.toml",
            1,
            vec![
                fault(1, 50.0, FaultEffect::TotalizerMismatch { litres: 5.0 }),
                fault(1, 200.0, FaultEffect::Rollback { amount: 1000.0 }),
                fault(1, 10.0, FaultEffect::SealChange { by: 1.0 }),
                fault(1, 20.0, FaultEffect::KFactorChange { value: 100.5 }),
            ],
        );
        let adv = num(&d, "totalizer_l", 61.0) - num(&d, "totalizer_l", 59.0);
        assert!((adv - num(&d, "sale_l", 61.0) - 5.0).abs() < 1e-6, "{adv}");
        let adv = num(&d, "totalizer_l", 91.0) - num(&d, "totalizer_l", 89.0);
        assert!(
            (adv - num(&d, "sale_l", 91.0)).abs() < 1e-6,
            "once only: {adv}"
        );
        assert!(num(&d, "totalizer_l", 201.0) < num(&d, "totalizer_l", 199.0));
        assert_eq!(num(&d, "event_counter", 9.0), 7.0);
        assert_eq!(num(&d, "event_counter", 10.0), 8.0);
        assert_eq!(num(&d, "k_factor", 19.0), 100.12);
        assert_eq!(num(&d, "k_factor", 21.0), 100.5);
    }

    #[test]
    fn meter_physics_and_energy() {
        let m = instrument("sdm630.toml", 1, vec![]);
        for t in [0.0, 13.0, 1000.0] {
            let p = num(&m, "power_w", t);
            // The SDM630 profile maps three phases: P = Σ V·I·PF (DESIGN decision 8).
            let vip: f64 = (1..=3)
                .map(|l| {
                    num(&m, &format!("voltage_v_l{l}"), t)
                        * num(&m, &format!("current_a_l{l}"), t)
                        * num(&m, &format!("power_factor_l{l}"), t)
                })
                .sum();
            assert!((p - vip).abs() < 1e-6, "{p} {vip}");
        }
        assert!(num(&m, "energy_kwh", 3600.0) > num(&m, "energy_kwh", 0.0));
        let stepped = instrument(
            "sdm630.toml",
            1,
            vec![fault(1, 0.0, FaultEffect::Step(ErrorSize::Pct(2.0)))],
        );
        let p = num(&stepped, "power_w", 5.0);
        assert!((p / num(&m, "power_w", 5.0) - 1.02).abs() < 1e-9);
        // The check window at the start of day 2 compares day 1.
        let (c, r) = (
            num(&stepped, "check_kwh", 86_401.0),
            num(&stepped, "check_ref_kwh", 86_401.0),
        );
        assert!(r > 0.0 && (c / r - 1.02).abs() < 1e-9, "{c} {r}");
        assert_eq!(num(&stepped, "check_ref_kwh", 100.0), 0.0);
    }

    #[test]
    fn three_phase_power_is_the_sum() {
        let text = "kind = \"energy_meter\"\nmodel = \"m\"\n\
            [[value]]\nname = \"voltage_v_l2\"\ntable = \"input\"\naddress = 2\ntype = \"f32\"\n";
        let p = Arc::new(Profile::parse(Path::new("m.toml"), text).unwrap());
        let m = Instrument::new(&p, 1, 0, 0, ModelOptions::for_kind(p.kind), vec![]);
        let t = 42.0;
        let sum: f64 = (1..=3)
            .map(|l| {
                num(&m, &format!("voltage_v_l{l}"), t)
                    * num(&m, &format!("current_a_l{l}"), t)
                    * num(&m, &format!("power_factor_l{l}"), t)
            })
            .sum();
        assert!((num(&m, "power_w", t) - sum).abs() < 1e-9);
    }

    #[test]
    fn transport_faults_have_windows() {
        let mut f = fault(1, 10.0, FaultEffect::Silent);
        f.until = Some(20.0);
        let i = instrument("ft112.toml", 1, vec![f]);
        assert!(!i.wire_faults(9.0).silent);
        assert!(i.wire_faults(10.0).silent);
        assert!(!i.wire_faults(20.0).silent);
    }
}
