//! Detection on a simulated fleet (issue #16): recall per alert kind, false alarms per 1,000
//! device-days and detection delay, through the real pipeline (decode → dedup → checks →
//! alert lifecycle, and the wall-clock sweep), single thread, no I/O, no sleeping.
//!
//! ```text
//! cargo run -p calwatch-gateway --example detection_bench [-- DAYS [BATCH_S]]
//! ```
//!
//! DAYS of simulated time (default 15) from 2026-01-01T00:00Z. Every agent publishes a batch
//! every BATCH_S seconds (default 300) with one reading per device per poll interval and an
//! online status every minute; the gateway sweeps every minute of the simulated wall clock.
//! Seeded: the same code prints the same table. Only `calwatch_gateway::bench` and
//! `calwatch_protocol` are used and statuses are JSON text, so the file builds on the code
//! before and after issue #16.
//!
//! A scenario's fault begins at its onset (day 2 unless said otherwise). Detection: the first
//! alert event of the expected kind whose event time is at or after the onset, or an alert of
//! that kind already open and repeated on evidence from then on; its delay is the simulated
//! wall-clock time of the detection minus the onset. A false alarm is an alert (a new id) of a
//! kind not right for the device, or of the expected kind before the onset.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark: a failure aborts it

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use calwatch_gateway::bench::{
    device_from_json, AlertBook, Certificate, CheckConfig, Device, Devices, Metrics, Output,
    Pipeline,
};
use calwatch_protocol::{
    readings_topic, status_topic, AlertKind, AlertState, Id, Reading, ReadingBatch, Severity, Value,
};
use serde_json::json;

const SEC: i64 = 1000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
/// 2026-01-01T00:00:00Z, the start of simulated day 1.
const T0: i64 = 1_767_225_600_000;
/// The start of day 2, when most faults begin.
const DAY2: i64 = T0 + DAY;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f64(&mut self) -> f64 {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
    fn normal(&mut self) -> f64 {
        let u = self.f64().max(1e-12);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.f64()).cos()
    }
}

fn round_to(x: f64, step: f64) -> f64 {
    (x / step).round() * step
}

/// A load of 60 ± 40 kW (20-100 kW), a cycle in about an hour (3,667 s, so the 5-minute poll
/// grid does not lock onto it), through a meter and its reference.
#[derive(Clone, Copy)]
struct Load(f64);

impl Load {
    const W: f64 = std::f64::consts::TAU / 3667.0; // rad/s
    fn kw(self, t: i64) -> f64 {
        60.0 + 40.0 * (Self::W * (t - T0) as f64 / 1000.0 + self.0).sin()
    }
    /// Energy since T0 in kWh (the exact integral).
    fn kwh(self, t: i64) -> f64 {
        let s = (t - T0) as f64 / 1000.0;
        let c = (Self::W * s + self.0).cos() - self.0.cos();
        (60.0 * s - 40.0 / Self::W * c) / 3600.0
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Clean,
    CablePulled,
    BlankEncoder,
    AbortedLifts,
    SkippedSales,
    Fast3Pct,
    ZeroMoved,
    Hover,
}

/// A simulated instrument behind its agent: what it is, its fault and what that should raise,
/// and its state.
struct Sim {
    id: String,
    kind: &'static str,
    agent: usize,
    interval: i64,
    next_poll: i64,
    fault: Fault,
    /// When the fault begins (true time).
    onset: i64,
    expect: Option<AlertKind>,
    /// The expected alert counts only when critical.
    critical: bool,
    /// Kinds that are right for the device besides the expected one.
    allowed: Vec<AlertKind>,
    reference: Option<String>,
    valid_until: i64,
    load: Load,
    start_kwh: f64,
    wrap: Option<f64>,
    seq: u64,
    last_ok: Option<i64>,
    failures: u64,
    rng: Rng,
    /// Scale: 0 an empty platform, 1..=4 a customer's load on, weighed twice, taken off.
    step: u8,
    load_kg: f64,
    zero_kg: f64,
    polls: u64,
    /// Dispenser: the last sale seen (display, encoder) and the totalizer.
    sale_id: u64,
    sale: (f64, f64),
    total_l: f64,
}

fn sim(kind: &'static str, interval_s: i64, phase_s: i64) -> Sim {
    Sim {
        id: String::new(),
        kind,
        agent: 0,
        interval: interval_s * SEC,
        next_poll: T0 + phase_s * SEC,
        fault: Fault::Clean,
        onset: DAY2,
        expect: None,
        critical: false,
        allowed: Vec::new(),
        reference: None,
        valid_until: T0 + 335 * DAY,
        load: Load(phase_s as f64 / 10.0),
        start_kwh: 12_345.0,
        wrap: None,
        seq: 0,
        last_ok: None,
        failures: 0,
        rng: Rng(0),
        step: 0,
        load_kg: 0.0,
        zero_kg: 0.0,
        polls: 0,
        sale_id: 1000,
        sale: (20.0, 20.0),
        total_l: 150_000.0,
    }
}

fn n(x: f64) -> Value {
    Value::Number(x)
}

impl Sim {
    /// One poll at true time `t`: the values, or `None` when the poll fails.
    fn poll(&mut self, t: i64) -> Option<Vec<(&'static str, Value)>> {
        let faulty = t >= self.onset;
        let hour = (t - T0).rem_euclid(DAY) / HOUR;
        let mut v = match self.kind {
            "scale" => self.scale(faulty, hour),
            "dispenser" if self.fault == Fault::CablePulled && faulty => {
                self.failures += 1;
                return None;
            }
            "dispenser" => self.dispenser(faulty, hour),
            _ => self.meter(t, faulty),
        };
        v.push(("event_counter", n(7.0)));
        Some(v)
    }

    /// A class III 15 kg scale (e = 5 g) at 1 g resolution: customers 07-21 h, the empty
    /// platform at 0 ± 0.5 e; the centre-of-zero flag within ± 0.25 e.
    fn scale(&mut self, faulty: bool, hour: i64) -> Vec<(&'static str, Value)> {
        let e = 0.005;
        let rng = &mut self.rng;
        self.polls += 1;
        let empty = self.zero_kg + round_to(rng.normal() * 1.2, 1.0).clamp(-2.0, 2.0) * 0.001;
        let mut check = false;
        let (gross, stable) = if self.fault == Fault::Hover && self.polls % 10 == 0 {
            // a 10 kg check weight every 10 min (in-service MPE 10 g): r ≈ 0.3 from day 2
            check = true;
            let err_g = if faulty { 3.0 } else { 0.0 } + rng.normal();
            (10.0 + round_to(err_g, 1.0) * 0.001, true)
        } else {
            match self.step {
                0 if (7..21).contains(&hour) && rng.chance(0.2) => {
                    self.load_kg = round_to(0.2 + 3.0 * rng.normal().abs(), 0.001).min(14.5);
                    self.step = 1;
                    (self.load_kg / 2.0, false)
                }
                0 => (empty, true),
                1 | 2 => {
                    self.step += 1;
                    (self.load_kg + round_to(rng.normal(), 1.0) * 0.001, true)
                }
                3 => {
                    self.step = 4;
                    if self.fault == Fault::ZeroMoved && faulty {
                        self.zero_kg = 2.0 * e; // the platform comes back at +2 e
                    }
                    (self.load_kg / 3.0, false)
                }
                _ => {
                    self.step = 0; // the first reading of the emptied platform
                    (empty, true)
                }
            }
        };
        let gross = round_to(gross, 0.001);
        let zero = stable && gross.abs() <= 0.25 * e * (1.0 + 1e-9);
        let mut v = vec![
            ("gross_kg", n(gross)),
            ("net_kg", n(gross)),
            ("tare_kg", n(0.0)),
            ("stable", Value::Bool(stable)),
            ("zero", Value::Bool(zero)),
            ("overload", Value::Bool(false)),
        ];
        if check {
            v.push(("check_ref_kg", n(10.0)));
        }
        v
    }

    /// A dispenser: at most one sale per poll (35 % of polls 06-23 h, 3 % at night), 5-60 L,
    /// display and encoder each within ± 0.05 % (σ), 0.01 L resolution; the totalizer adds
    /// every sale, also those the agent does not see.
    fn dispenser(&mut self, faulty: bool, hour: i64) -> Vec<(&'static str, Value)> {
        let rng = &mut self.rng;
        let p = if (6..23).contains(&hour) { 0.35 } else { 0.03 };
        let mut sales = u64::from(rng.chance(p));
        if self.fault == Fault::SkippedSales && sales == 1 && rng.chance(0.15) {
            sales = 2 + u64::from(rng.chance(0.5)); // sales the agent did not see
        }
        for _ in 0..sales {
            self.sale = if self.fault == Fault::AbortedLifts && rng.chance(0.3) {
                (0.02, if rng.chance(0.5) { 0.03 } else { 0.01 })
            } else {
                let vol = 5.0 + 55.0 * rng.f64();
                let display = round_to(vol * (1.0 + 0.0005 * rng.normal()), 0.01);
                let encoder = round_to(vol * (1.0 + 0.0005 * rng.normal()), 0.01);
                let blank = self.fault == Fault::BlankEncoder && faulty;
                (display, if blank { 0.0 } else { encoder })
            };
            self.sale_id += 1;
            self.total_l += self.sale.0;
        }
        vec![
            ("totalizer_l", n(round_to(self.total_l, 0.01))),
            ("sale_id", n(self.sale_id as f64)),
            ("sale_l", n(self.sale.0)),
            ("encoder_sale_l", n(self.sale.1)),
            ("k_factor", n(100.0)),
        ]
    }

    /// A three-phase class 1 meter, 0.01 kWh register; a 3 % fast one reads current (so power
    /// and energy) 3 % high from its onset.
    fn meter(&mut self, t: i64, faulty: bool) -> Vec<(&'static str, Value)> {
        let fast = self.fault == Fault::Fast3Pct && faulty;
        let gain = if fast { 1.03 } else { 1.0 };
        let mut kwh = self.start_kwh + self.load.kwh(t);
        if fast {
            kwh += 0.03 * (self.load.kwh(t) - self.load.kwh(self.onset));
        }
        if let Some(m) = self.wrap {
            kwh = kwh.rem_euclid(m);
        }
        let p_w = gain * self.load.kw(t) * 1000.0;
        let mut v = vec![
            ("energy_kwh", n((kwh * 100.0).floor() / 100.0)),
            ("power_w", n(round_to(p_w, 1.0))),
        ];
        const PHASES: [[&str; 3]; 3] = [
            ["voltage_v_l1", "current_a_l1", "power_factor_l1"],
            ["voltage_v_l2", "current_a_l2", "power_factor_l2"],
            ["voltage_v_l3", "current_a_l3", "power_factor_l3"],
        ];
        for [u, i, pf] in PHASES {
            let volts = 230.0 * (1.0 + 0.0005 * self.rng.normal());
            let amps = p_w / 3.0 / (230.0 * 0.92) * (1.0 + 0.0005 * self.rng.normal());
            v.extend([
                (u, n(round_to(volts, 0.1))),
                (i, n(round_to(amps, 0.01))),
                (pf, n(0.92)),
            ]);
        }
        v
    }
}

struct Agent {
    id: Id,
    /// The agent's clock minus the true time.
    skew: i64,
    devices: Vec<usize>,
    pending: Vec<Reading>,
}

struct Scenario {
    no: &'static str,
    name: &'static str,
    devices: Vec<usize>,
    /// Report the number of alerts of this kind (flapping) rather than recall.
    count: Option<AlertKind>,
}

#[derive(Default)]
struct Fleet {
    sims: Vec<Sim>,
    agents: Vec<Agent>,
    registry: Vec<Device>,
    scenarios: Vec<Scenario>,
}

/// Devices as (agent, agent clock skew, device id, simulation).
type Group = Vec<(String, i64, String, Sim)>;

fn two(agent: &str, skew: i64, tag: &str, mk: impl Fn(i64) -> Sim) -> Group {
    (1..=2)
        .map(|k| (agent.to_string(), skew, format!("{tag}-{k}"), mk(k)))
        .collect()
}

impl Fleet {
    /// The onset of device `d`'s fault by its agent's clock.
    fn onset_by_agent(&self, d: usize) -> i64 {
        let s = &self.sims[d];
        s.onset.saturating_add(self.agents[s.agent].skew)
    }

    fn group(&mut self, no: &'static str, name: &'static str, count: Option<AlertKind>, g: Group) {
        let mut devices = Vec::new();
        for (agent, skew, id, mut s) in g {
            let a = match self.agents.iter().position(|a| a.id.as_str() == agent) {
                Some(a) => a,
                None => {
                    let (id, devices, pending) = (Id::new(agent).unwrap(), Vec::new(), Vec::new());
                    self.agents.push(Agent {
                        id,
                        skew,
                        devices,
                        pending,
                    });
                    self.agents.len() - 1
                }
            };
            let (class, max, e, mpe) = match s.kind {
                "scale" => (json!("III"), json!(15), json!(0.005), json!(null)),
                "dispenser" => (json!(null), json!(null), json!(null), json!(0.5)),
                _ => (json!("1"), json!(null), json!(null), json!(null)),
            };
            let site = self.agents[a].id.as_str();
            let obj = json!({
                "id": id, "kind": s.kind, "owner": "owner-bench", "site": site, "agent": site,
                "model": format!("bench-{}", s.kind), "serial": format!("SN-{id}"),
                "accuracy_class": class, "max": max, "e": e, "mpe_pct": mpe,
                "interval_s": s.interval / SEC, "reference_device": s.reference,
            });
            let mut d = device_from_json(Path::new("detection_bench"), obj.as_object().unwrap())
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            d.certificates.push(Certificate {
                certificate: format!("C-{id}").into(),
                verified_at: s.valid_until - 365 * DAY,
                valid_until: Some(s.valid_until),
                passed: true,
                verifier: "bureau-7".into(),
                event_counter: Some(7.0),
                k_factor: (s.kind == "dispenser").then_some(100.0),
            });
            self.registry.push(d);
            let i = self.sims.len();
            (s.id, s.agent, s.rng) = (id, a, Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1) << 17));
            self.sims.push(s);
            self.agents[a].devices.push(i);
            devices.push(i);
        }
        self.scenarios.push(Scenario {
            no,
            name,
            devices,
            count,
        });
    }
}

/// The fleet of the issue's scenarios, two devices per fault, and clean controls.
fn fleet() -> Fleet {
    use AlertKind::*;
    use Fault::*;
    let mut f = Fleet::default();
    let dsp = |fault, expect: Option<AlertKind>, allowed: Vec<AlertKind>, k: i64| Sim {
        fault,
        expect,
        allowed,
        ..sim("dispenser", 60, 11 * k)
    };
    let mut g = two("cable-1", 0, "DSP-CABLE", |k| {
        dsp(CablePulled, Some(Offline), vec![], k)
    });
    g[1].0 = "cable-2".into(); // each its agent's only device
    f.group("1", "cable pulled (agent's only dispenser)", None, g);
    let g = two("station-blank", 0, "DSP-BLANK", |k| {
        dsp(BlankEncoder, Some(CheatingSuspected), vec![Drift], k)
    });
    f.group("2", "blanked encoder (0 L on every sale)", None, g);
    let g = two("station-lift", 0, "DSP-LIFT", |k| {
        dsp(AbortedLifts, None, vec![], k)
    });
    f.group("3", "aborted nozzle lifts (0.02 L vs 0.03/0.01 L)", None, g);
    let g = two("station-skip", 0, "DSP-SKIP", |k| {
        dsp(SkippedSales, None, vec![], k)
    });
    f.group("4", "skipped sales (sale_id +2/+3)", None, g);
    // meters polled 30 s after their reference meter, the same 20-100 kW load through both
    for (no, name, fault, tag) in [
        ("5a", "perfect meter vs perfect reference", Clean, "MTR-OK"),
        (
            "5b",
            "meter 3 % fast vs perfect reference",
            Fast3Pct,
            "MTR-FAST",
        ),
    ] {
        let mut g = Group::new();
        for k in 1..=2 {
            let load = Load(k as f64 * 1.3 + if fault == Clean { 0.0 } else { 0.6 });
            let agent = format!("factory-{}", tag[4..].to_lowercase());
            let reference = format!("{tag}-REF-{k}");
            let s = Sim {
                load,
                ..sim("energy_meter", 300, k * 40)
            };
            g.push((agent.clone(), 0, reference.clone(), s));
            let (expect, allowed) = match fault {
                Fast3Pct => (Some(OutOfTolerance), vec![Drift]),
                _ => (None, vec![]),
            };
            let s = Sim {
                fault,
                expect,
                allowed,
                load,
                reference: Some(reference),
                start_kwh: 54_321.0,
                ..sim("energy_meter", 300, k * 40 + 30)
            };
            g.push((agent, 0, format!("{tag}-{k}"), s));
        }
        f.group(no, name, None, g);
    }
    let lag = |kind, id: &str| {
        let s = Sim {
            onset: T0 + 2 * DAY,
            valid_until: T0 + 2 * DAY,
            expect: Some(Overdue),
            critical: true,
            allowed: vec![DueSoon],
            ..sim(kind, 60, 5)
        };
        ("lagging-clock".to_string(), -2 * HOUR, id.to_string(), s)
    };
    let g = vec![lag("scale", "SCL-LAG"), lag("dispenser", "DSP-LAG")];
    f.group("6", "clock 2 h behind, certificate expires day 3", None, g);
    let g = two("market-zero", 0, "SCL-ZERO", |k| Sim {
        fault: ZeroMoved,
        expect: Some(Drift),
        ..sim("scale", 60, 13 * k)
    });
    f.group("7", "scale zero at +2 e after each load", None, g);
    let g = two("market-hover", 0, "SCL-HOVER", |k| Sim {
        fault: Hover,
        ..sim("scale", 60, 17 * k)
    });
    f.group("8", "check error hovering at r ≈ 0.3", Some(Drift), g);
    let g = two("factory-wrap", 0, "MTR-WRAP", |k| Sim {
        start_kwh: 99_990.0 - k as f64,
        wrap: Some(100_000.0),
        ..sim("energy_meter", 300, 23 * k)
    });
    f.group("9", "register wrap at 100000 kWh", None, g);
    let mut g = Group::new();
    for (kind, tag) in [
        ("scale", "SCL"),
        ("dispenser", "DSP"),
        ("energy_meter", "MTR"),
    ] {
        for (k, interval_s) in [60, 120, 300].into_iter().enumerate() {
            let interval_s = if kind == "energy_meter" {
                300
            } else {
                interval_s
            };
            let s = sim(kind, interval_s, k as i64 * 19 + 3);
            g.push(("controls".into(), 0, format!("{tag}-CTRL-{}", k + 1), s));
        }
    }
    f.group("10", "controls: 3 scales, 3 dispensers, 3 meters", None, g);
    f
}

fn status_payload(f: &Fleet, a: &Agent, ts: i64) -> Vec<u8> {
    let (mut health, mut info) = (serde_json::Map::new(), serde_json::Map::new());
    for &i in &a.devices {
        let (s, d) = (&f.sims[i], &f.registry[i]);
        let h = json!({"last_ok": s.last_ok, "consecutive_failures": s.failures});
        health.insert(s.id.clone(), h);
        let mut di = json!({"model": d.model.as_str(), "serial": d.serial.as_str()});
        if let Some(w) = s.wrap {
            di["wrap"] = json!(w);
        }
        info.insert(s.id.clone(), di);
    }
    let status = json!({
        "v": 1, "agent": a.id.as_str(), "state": "online", "version": "bench",
        "devices": a.devices.len(), "spool_bytes": 0, "ts": ts,
        "health": health, "device_info": info,
    });
    serde_json::to_vec(&status).unwrap()
}

/// What the alert events said.
#[derive(Default)]
struct Record {
    /// Every alert id: its device, kind, and whether its event time was at or after the
    /// device's onset (by the agent's clock).
    alerts: BTreeMap<String, (usize, AlertKind, bool)>,
    /// Per device: the wall-clock time of its detection.
    detected: BTreeMap<usize, i64>,
    events: usize,
}

impl Record {
    fn take(&mut self, f: &Fleet, index: &BTreeMap<String, usize>, now: i64, out: &mut Output) {
        for e in &out.events {
            self.events += 1;
            let Some(&d) = index.get(e.device.as_str()) else {
                continue;
            };
            if e.state != AlertState::Active {
                continue;
            }
            let after = e.updated >= f.onset_by_agent(d);
            self.alerts
                .entry(e.id.clone())
                .or_insert((d, e.kind, after));
            let s = &f.sims[d];
            if Some(e.kind) == s.expect
                && after
                && (!s.critical || e.severity == Severity::Critical)
            {
                self.detected.entry(d).or_insert(now);
            }
        }
        out.clear();
    }

    /// Detection also when the alert of the expected kind was open before the onset (raised
    /// by mistake) and is repeated on evidence at or after it (repeats publish no event).
    fn detect(&mut self, f: &Fleet, pipeline: &Pipeline, now: i64) {
        for (d, s) in f.sims.iter().enumerate() {
            let Some(kind) = s.expect.filter(|_| !self.detected.contains_key(&d)) else {
                continue;
            };
            if let Some(a) = pipeline.alerts().get(&f.registry[d].id, kind) {
                let severe = !s.critical || a.event.severity == Severity::Critical;
                if a.event.updated >= f.onset_by_agent(d) && severe {
                    self.detected.insert(d, now);
                }
            }
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let days: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(15);
    let batch_s: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(300);
    assert!(
        days >= 3 && batch_s >= 60 && batch_s % 60 == 0,
        "DAYS ≥ 3, BATCH_S n × 60"
    );
    let mut f = fleet();
    let index: BTreeMap<String, usize> = f
        .sims
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    let mut pipeline = Pipeline::new(
        Devices::from_devices(f.registry.clone()),
        Vec::new(),
        AlertBook::new(600_000, 1, Vec::new()),
        CheckConfig::default(),
        Arc::new(Metrics::new(Vec::new())),
    );
    let names: BTreeMap<&str, Id> = "gross_kg net_kg tare_kg stable zero overload check_ref_kg \
        totalizer_l sale_id sale_l encoder_sale_l k_factor event_counter energy_kwh power_w \
        voltage_v_l1 voltage_v_l2 voltage_v_l3 current_a_l1 current_a_l2 current_a_l3 \
        power_factor_l1 power_factor_l2 power_factor_l3"
        .split_whitespace()
        .map(|s| (s, Id::new(s).unwrap()))
        .collect();
    let (mut out, mut rec) = (Output::default(), Record::default());
    let (started, mut readings) = (std::time::Instant::now(), 0usize);
    for minute in 1..=days * 1440 {
        let now = T0 + minute * MIN;
        for s in &mut f.sims {
            while s.next_poll < now {
                let t = s.next_poll;
                s.next_poll += s.interval;
                let skew = f.agents[s.agent].skew;
                let Some(values) = s.poll(t) else { continue };
                (s.seq, s.last_ok, s.failures) = (s.seq + 1, Some(t + skew), 0);
                let values = values
                    .into_iter()
                    .map(|(k, v)| (names[k].clone(), v))
                    .collect();
                let device = Id::new(s.id.as_str()).unwrap();
                let r = Reading {
                    device,
                    seq: s.seq,
                    ts: t + skew,
                    values,
                };
                f.agents[s.agent].pending.push(r);
            }
        }
        if minute % (batch_s / 60) == 0 {
            let mut batches = Vec::new();
            for a in f.agents.iter_mut().filter(|a| !a.pending.is_empty()) {
                let mut readings_ = std::mem::take(&mut a.pending);
                readings_.sort_by_key(|r| r.ts);
                readings += readings_.len();
                let batch = ReadingBatch {
                    agent: a.id.clone(),
                    sent: now + a.skew,
                    readings: readings_,
                };
                batches.push((readings_topic(&a.id), batch.encode().unwrap()));
            }
            for (topic, payload) in batches {
                pipeline.process(&topic, &payload, now, &mut out);
                rec.take(&f, &index, now, &mut out);
            }
        }
        for a in &f.agents {
            let payload = status_payload(&f, a, now + a.skew);
            pipeline.process(&status_topic(&a.id), &payload, now, &mut out);
            rec.take(&f, &index, now, &mut out);
        }
        pipeline.sweep(now, &mut out);
        rec.take(&f, &index, now, &mut out);
        rec.detect(&f, &pipeline, now);
        if minute % 60 == 0 {
            let _ = pipeline.changes(); // as ingest commits (bounds the book's change list)
            pipeline.committed(&[]);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("```text\ncargo run -p calwatch-gateway --example detection_bench -- {days} {batch_s}\n```\n");
    println!(
        "{} devices on {} agents, {days} simulated days, batches every {batch_s} s, statuses and \
         sweeps every 60 s: {readings} readings, {} alert events, {secs:.0} s.\n",
        f.sims.len(),
        f.agents.len(),
        rec.events
    );
    report(&f, &rec, days);
}

fn duration(ms: i64) -> String {
    match ms {
        ..=120_000 => format!("{} s", ms / SEC),
        120_001..=7_200_000 => format!("{:.0} min", ms as f64 / MIN as f64),
        _ => format!("{:.1} h", ms as f64 / HOUR as f64),
    }
}

fn report(f: &Fleet, rec: &Record, days: i64) {
    println!("| # | scenario | devices | expected | detected | delay after onset | false alarms | alerts raised (ids by kind) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut recall: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut false_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for sc in &f.scenarios {
        let (mut kinds, mut false_here, mut counted) = (BTreeMap::<&str, usize>::new(), 0, 0);
        for &(d, kind, after) in rec.alerts.values().filter(|a| sc.devices.contains(&a.0)) {
            *kinds.entry(kind.as_str()).or_insert(0) += 1;
            let s = &f.sims[d];
            if sc.count == Some(kind) {
                counted += 1;
            } else if (Some(kind) == s.expect && !after)
                || (Some(kind) != s.expect && !s.allowed.contains(&kind))
            {
                false_here += 1;
                *false_kinds.entry(kind.as_str()).or_default() += 1;
            }
        }
        let expecting: Vec<usize> = sc
            .devices
            .iter()
            .copied()
            .filter(|&d| f.sims[d].expect.is_some())
            .collect();
        let (expected, detected, delay) = if let Some(k) = sc.count {
            (
                format!("≤ 1 `{k}` a device"),
                format!("{counted} `{k}`"),
                "—".into(),
            )
        } else if let Some(&first) = expecting.first() {
            let s = &f.sims[first];
            let k = s.expect.unwrap();
            let label = if s.critical {
                format!("`{k}` critical")
            } else {
                format!("`{k}`")
            };
            let delays: Vec<String> = expecting
                .iter()
                .map(|d| {
                    rec.detected
                        .get(d)
                        .map_or("missed".into(), |at| duration(at - f.sims[*d].onset))
                })
                .collect();
            let hit = expecting
                .iter()
                .filter(|d| rec.detected.contains_key(d))
                .count();
            let r = recall.entry(label.clone()).or_default();
            (r.0, r.1) = (r.0 + hit, r.1 + expecting.len());
            (
                label,
                format!("{hit}/{}", expecting.len()),
                delays.join(", "),
            )
        } else {
            ("none".into(), "—".into(), "—".into())
        };
        let list = joined(&kinds, "—");
        let per = false_here as f64 / sc.devices.len() as f64;
        println!(
            "| {} | {} | {} | {expected} | {detected} | {delay} | {false_here} ({per:.1}/device) | {list} |",
            sc.no,
            sc.name,
            sc.devices.len(),
        );
    }
    let recall: Vec<String> = recall
        .iter()
        .map(|(k, (h, n))| format!("{k} {h}/{n}"))
        .collect();
    println!("\nRecall per kind: {}.", recall.join(", "));
    let device_days = (f.sims.len() as i64 * days) as f64;
    let total: usize = false_kinds.values().sum();
    println!(
        "False alarms: {total} in {device_days:.0} device-days = {:.1} per 1000 device-days ({}).",
        total as f64 * 1000.0 / device_days,
        joined(&false_kinds, "none")
    );
}

/// `kind n, kind n, …`, or `empty`.
fn joined(counts: &BTreeMap<&str, usize>, empty: &str) -> String {
    let v: Vec<String> = counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
    if v.is_empty() {
        empty.into()
    } else {
        v.join(", ")
    }
}
