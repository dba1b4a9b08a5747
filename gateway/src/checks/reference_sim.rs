//! Simulation of a meter checked against its `reference_device` (issue #16 item 5, DESIGN
//! decision 16): two class 1 meters on the same feeder, polled independently at offset phases,
//! under a load that steps between 20 and 100 kW every 1 to 10 minutes, with registers of
//! 0.01 kWh resolution (truncating, as a register does). Perfect meters must never be
//! `out_of_tolerance` or drifting; a meter 3 % fast must still be caught.

use calwatch_protocol::{AlertKind, Reading};

use super::fixtures::{cert, device, id, n, DAY};
use super::{check_reading, CheckConfig, DeviceState, DriftSource, Verdict};
use crate::domain::{Device, DeviceKind};

const MINUTE: i64 = 60_000;

/// splitmix64: deterministic, seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The true energy through both meters: a load constant between steps at random instants.
struct Load {
    /// (start ms, kW, kWh at start), by start.
    steps: Vec<(i64, f64, f64)>,
}

impl Load {
    fn new(seed: u64, until: i64) -> Load {
        let mut rng = Rng(seed);
        let (mut t, mut e) = (0i64, 0.0);
        let mut steps = Vec::new();
        while t <= until {
            let kw = rng.uniform(20.0, 100.0);
            steps.push((t, kw, e));
            let dt = rng.uniform(1.0, 10.0) * MINUTE as f64;
            e += kw * dt / 3_600_000.0;
            t += dt as i64;
        }
        Load { steps }
    }

    /// True energy in kWh at `t` ms.
    fn energy(&self, t: i64) -> f64 {
        let i = self.steps.partition_point(|s| s.0 <= t) - 1;
        let (t0, kw, e0) = self.steps[i];
        e0 + kw * (t - t0) as f64 / 3_600_000.0
    }
}

/// A register of 0.01 kWh showing `base` + `gain` × the true energy, truncated.
fn register(base: f64, gain: f64, kwh: f64) -> f64 {
    ((base + gain * kwh) * 100.0).floor() / 100.0
}

struct Setup {
    days: i64,
    interval: i64,
    /// The reference is polled this long after the meter, ms.
    phase: i64,
    /// The meter's error: 1.0 perfect, 1.03 3 % fast.
    gain: f64,
    /// The reference's readings reach the gateway in batches of this much event time, after
    /// the meter's readings of the same span (0: in time order).
    reference_batch: i64,
    seed: u64,
}

#[derive(Debug, Default)]
struct Outcome {
    /// `reference_device` comparisons made.
    comparisons: u64,
    out_of_tolerance: u64,
    /// Drift raises naming the `reference` source.
    drift: u64,
    /// Event time of the first `out_of_tolerance`.
    first_out_of_tolerance: Option<i64>,
    /// Largest |error / MPE| among the last comparisons (drift's trend window).
    max_r: f64,
}

fn meters() -> (Device, Device) {
    let mut meter = device(DeviceKind::EnergyMeter, Some("1"));
    meter
        .certificates
        .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
    let mut reference = meter.clone();
    reference.id = id("REF-1");
    reference.reference_device = None;
    (meter, reference)
}

fn simulate(s: &Setup) -> Outcome {
    let (meter, reference) = meters();
    let until = s.days * DAY;
    let load = Load::new(s.seed, until + s.interval + s.reference_batch);
    let mut rng = Rng(s.seed ^ 0x5EED);
    // (arrival key, is the reference, ts): polls jitter by up to 2 s.
    let mut polls = Vec::new();
    let mut k = 0;
    while k * s.interval < until {
        let t = k * s.interval + (rng.uniform(0.0, 2_000.0) as i64);
        polls.push((t, false, t));
        let r = k * s.interval + s.phase + (rng.uniform(0.0, 2_000.0) as i64);
        let arrives = if s.reference_batch > 0 {
            (r / s.reference_batch + 1) * s.reference_batch + 1
        } else {
            r
        };
        polls.push((arrives, true, r));
        k += 1;
    }
    polls.sort_by_key(|p| (p.0, p.2));

    let cfg = CheckConfig::default();
    let (mut own, mut refst) = (DeviceState::default(), DeviceState::default());
    let (mut own_seq, mut ref_seq) = (0u64, 0u64);
    let mut out = Vec::new();
    let mut o = Outcome::default();
    for (_, is_reference, ts) in polls {
        out.clear();
        let e = load.energy(ts);
        if is_reference {
            ref_seq += 1;
            let r = reading(&reference, ref_seq, ts, register(1000.0, 1.0, e));
            check_reading(&reference, &mut refst, &r.view(), None, &cfg, &mut out);
            assert!(out.is_empty(), "the reference itself: {out:?}");
            continue;
        }
        own_seq += 1;
        let r = reading(&meter, own_seq, ts, register(5000.0, s.gain, e));
        let seen = refst.reference_energy();
        check_reading(&meter, &mut own, &r.view(), seen, &cfg, &mut out);
        for v in &out {
            let Verdict::Raise { kind, evidence, .. } = v else {
                continue;
            };
            match kind {
                AlertKind::OutOfTolerance => {
                    o.out_of_tolerance += 1;
                    o.first_out_of_tolerance.get_or_insert(ts);
                }
                AlertKind::Drift if evidence["source"] == "reference" => o.drift += 1,
                _ => {}
            }
        }
    }
    let drift = own.drift.get(DriftSource::Reference);
    o.comparisons = drift.comparisons;
    o.max_r = drift.trend.iter().map(|(_, r)| r.abs()).fold(0.0, f64::max);
    o
}

fn reading(d: &Device, seq: u64, ts: i64, kwh: f64) -> Reading {
    Reading {
        device: d.id.clone(),
        seq,
        ts,
        values: [(id("energy_kwh"), n(kwh))].into_iter().collect(),
    }
}

#[test]
fn perfect_meters_under_a_varying_load_never_alarm() {
    let mut outcomes = Vec::new();
    for (interval, phase, seed) in [
        (MINUTE, 30_000, 1),
        (30_000, 15_000, 2),
        (MINUTE, 30_000, 3),
    ] {
        let s = Setup {
            days: 5,
            interval,
            phase,
            gain: 1.0,
            reference_batch: 0,
            seed,
        };
        let o = simulate(&s);
        println!("interval {interval} ms, phase {phase} ms, seed {seed}: {o:?}");
        outcomes.push(o);
    }
    for o in &outcomes {
        assert_eq!((o.out_of_tolerance, o.drift), (0, 0), "{outcomes:?}");
        assert!(o.comparisons >= 5, "too few comparisons: {outcomes:?}");
        // the uncertainty is under a tenth of the MPE, so is a perfect meter's error
        assert!(o.max_r <= 0.1, "{outcomes:?}");
    }
}

#[test]
fn perfect_meters_with_the_reference_behind_never_alarm() {
    // The reference's readings arrive in batches after the meter's: at most of the meter's
    // readings the reference has no sample yet at or after that instant. 5 minutes is within
    // the meter's last 8 samples (the interval closes at an earlier one), 15 minutes beyond
    // (it closes once the reference's batch is in).
    for minutes in [5, 15] {
        let s = Setup {
            days: 5,
            interval: MINUTE,
            phase: 30_000,
            gain: 1.0,
            reference_batch: minutes * MINUTE,
            seed: 4,
        };
        let o = simulate(&s);
        println!("reference batches of {minutes} min: {o:?}");
        assert_eq!((o.out_of_tolerance, o.drift), (0, 0), "{o:?}");
        assert!(o.comparisons >= 5, "too few comparisons: {o:?}");
        assert!(o.max_r <= 0.1, "{o:?}");
    }
}

#[test]
fn a_meter_3_pct_fast_is_caught() {
    for reference_batch in [0, 5 * MINUTE] {
        let s = Setup {
            days: 5,
            interval: MINUTE,
            phase: 30_000,
            gain: 1.03,
            reference_batch,
            seed: 5,
        };
        let o = simulate(&s);
        let first = o.first_out_of_tolerance;
        println!(
            "3 % fast, reference batch {reference_batch} ms: first out_of_tolerance after {:?} h: {o:?}",
            first.map(|t| t as f64 / 3_600_000.0)
        );
        assert!(
            first.is_some_and(|t| t <= 2 * DAY),
            "not caught within 2 days: {o:?}"
        );
        assert_eq!(o.out_of_tolerance, o.comparisons, "every comparison fails");
    }
}
