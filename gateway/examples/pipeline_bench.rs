//! The ingest pipeline in isolation: decode → assignment → dedup → checks → line protocol,
//! single thread, no I/O. 100,000 registered devices (a third each scales, dispensers and
//! energy meters, all verified and sealed) on 100 agents; batches of 1,000 readings, one per
//! device of an agent, round-robin over the agents; every reading a normal one (the common
//! path: nothing raised).
//!
//! ```text
//! cargo run --release -p calwatch-gateway --example pipeline_bench [-- ROUNDS [DEVICES]]
//! ```
//!
//! (DEVICES, a multiple of 1,000, defaults to 100,000; fewer show what the cache does.)
//!
//! Reports readings/s on one core (and decode alone, for comparison), and memory per
//! registered device: the growth of VmRSS while the registry and the states are built, and
//! after every device's first reading (its check state in use).

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark: a failure aborts it

use std::sync::Arc;
use std::time::Instant;

use calwatch_gateway::bench::{
    AlertBook, Certificate, CheckConfig, Device, DeviceKind, Devices, Metrics, Output, Pipeline,
};
use calwatch_protocol::{readings_topic, Id, Reading, ReadingBatch, Value};

const PER_AGENT: usize = 1_000;
const DAY: i64 = 86_400_000;
/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000;

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time of this thread (user + system), from /proc (clock ticks of 10 ms): the time the
/// core spent, whatever else the machine runs.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the command (which may contain spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / 100.0
}

fn id(s: String) -> Id {
    Id::new(s).unwrap()
}

fn kind_of(n: usize) -> DeviceKind {
    match n % 3 {
        0 => DeviceKind::Scale,
        1 => DeviceKind::Dispenser,
        _ => DeviceKind::EnergyMeter,
    }
}

fn device_id(n: usize) -> String {
    let tag = match kind_of(n) {
        DeviceKind::Scale => "SCL",
        DeviceKind::Dispenser => "DSP",
        _ => "MTR",
    };
    format!("BN-{tag}-{n:06}")
}

fn agent_id(a: usize) -> String {
    format!("bench-agent-{a:03}")
}

fn device(n: usize) -> Device {
    let kind = kind_of(n);
    Device {
        id: id(device_id(n)),
        kind,
        owner: id(format!("owner-{}", n / 500)),
        site: id(format!("site-{}", n / 50)),
        agent: id(agent_id(n / PER_AGENT)),
        model: "bench".into(),
        serial: format!("S{n:06}").into(),
        accuracy_class: match kind {
            DeviceKind::Scale => Some("III".into()),
            DeviceKind::EnergyMeter => Some("1".into()),
            _ => None,
        },
        max: (kind == DeviceKind::Scale).then_some(15.0),
        e: (kind == DeviceKind::Scale).then_some(0.005),
        mpe_pct: (kind == DeviceKind::Dispenser).then_some(0.5),
        interval_s: 1,
        reference_device: None,
        certificates: vec![Certificate {
            certificate: format!("C-{n:06}").into(),
            verified_at: T0 - 30 * DAY,
            valid_until: Some(T0 + 700 * DAY),
            passed: true,
            verifier: "bureau-7".into(),
            event_counter: Some(7.0),
            k_factor: (kind == DeviceKind::Dispenser).then_some(100.0),
        }],
    }
}

/// The reading of device `n` in round `round` (seq = round + 1, one second apart).
fn reading(n: usize, round: usize, name: &[Id; 10]) -> Reading {
    let seq = round as u64 + 1;
    let ts = T0 + round as i64 * 1000 + (n % PER_AGENT) as i64;
    let r = round as f64;
    let num = Value::Number;
    let values = match kind_of(n) {
        DeviceKind::Scale => {
            let gross = 1.0 + ((n + round) % 9) as f64 * 0.25;
            vec![
                (name[0].clone(), num(gross)),
                (name[1].clone(), num(gross)),
                (name[2].clone(), num(0.0)),
                (name[3].clone(), Value::Bool(true)),
                (name[4].clone(), Value::Bool(false)),
                (name[5].clone(), Value::Bool(false)),
                (name[6].clone(), num(7.0)),
            ]
        }
        DeviceKind::Dispenser => {
            let sale = 20.0 + ((n + round) % 37) as f64;
            vec![
                (id("totalizer_l".into()), num(100_000.0 + 20.0 * r + sale)),
                (id("sale_id".into()), num(r)),
                (id("sale_l".into()), num(sale)),
                (id("encoder_sale_l".into()), num(sale)),
                (id("k_factor".into()), num(100.0)),
                (name[6].clone(), num(7.0)),
            ]
        }
        _ => vec![
            (name[7].clone(), num(10_000.0 + r * 0.001)),
            (id("power_w".into()), num(2070.0 + (round % 10) as f64)),
            (id("voltage_v".into()), num(230.0)),
            (id("current_a".into()), num(10.0)),
            (id("power_factor".into()), num(0.9)),
            (name[6].clone(), num(7.0)),
        ],
    };
    Reading {
        device: id(device_id(n)),
        seq,
        ts,
        values,
    }
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(6);
    let devices_n: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    assert!(devices_n >= PER_AGENT && devices_n % PER_AGENT == 0);
    let (devices_n, agents_n) = (devices_n, devices_n / PER_AGENT);
    assert!(
        rounds >= 2,
        "at least 2 rounds: one to warm up, one to measure"
    );
    // Dispenser totalizer: the previous round's total plus this sale; fixed up below so the
    // totalizer check sees consistent advances.
    let names: [Id; 10] = [
        "gross_kg",
        "net_kg",
        "tare_kg",
        "stable",
        "zero",
        "overload",
        "event_counter",
        "energy_kwh",
        "x",
        "y",
    ]
    .map(|s| id(s.into()));

    eprintln!("encoding {rounds} rounds of {agents_n} batches × {PER_AGENT} readings ...");
    let mut payloads: Vec<(String, Vec<u8>)> = Vec::with_capacity(rounds * agents_n);
    let mut totals = vec![100_000.0f64; devices_n];
    let mut bytes = 0usize;
    for round in 0..rounds {
        for a in 0..agents_n {
            let readings = (a * PER_AGENT..(a + 1) * PER_AGENT)
                .map(|n| {
                    let mut r = reading(n, round, &names);
                    if kind_of(n) == DeviceKind::Dispenser {
                        let sale = r.number("sale_l").unwrap();
                        totals[n] += sale;
                        for (k, v) in &mut r.values {
                            if k.as_str() == "totalizer_l" {
                                *v = Value::Number(totals[n]);
                            }
                        }
                    }
                    r
                })
                .collect();
            let batch = ReadingBatch {
                agent: id(agent_id(a)),
                sent: T0 + round as i64 * 1000 + 999,
                readings,
            };
            let payload = batch.encode().unwrap();
            bytes += payload.len();
            payloads.push((readings_topic(&batch.agent), payload));
        }
    }
    eprintln!(
        "{} batches, {:.0} bytes per reading",
        payloads.len(),
        bytes as f64 / (rounds * devices_n) as f64
    );

    let rss0 = vm_rss_kib();
    let devices: Vec<Device> = (0..devices_n).map(device).collect();
    let registry = Devices::from_devices(devices);
    let metrics = Arc::new(Metrics::new(Vec::new()));
    let cfg = CheckConfig::default();
    let mut pipeline = Pipeline::new(
        registry,
        Vec::new(),
        AlertBook::new(600_000, 1, Vec::new()),
        cfg,
        metrics.clone(),
    );
    let rss1 = vm_rss_kib();

    let mut out = Output::default();
    let now = T0 + 400 * DAY;
    // Round 0 warms up: every device's first reading (baselines, buffers).
    for (topic, payload) in &payloads[..agents_n] {
        pipeline.process(topic, payload, now, &mut out);
        out.clear();
    }
    let rss2 = vm_rss_kib();

    // Decode alone, for comparison: the gateway's decoder (borrowed, buffers reused), and
    // serde into an owned batch (its fallback, and what every payload cost before).
    // PIPELINE_ONLY=1 skips these, so a profile of the run shows the pipeline.
    let compare = std::env::var_os("PIPELINE_ONLY").is_none();
    let decode_from = if compare { agents_n } else { payloads.len() };
    let mut decoder = calwatch_protocol::BatchDecoder::new();
    let cpu = cpu_seconds();
    let start = Instant::now();
    let mut n = 0usize;
    for (_, payload) in &payloads[decode_from..] {
        n += decoder.decode(payload).unwrap().len();
    }
    let decode_s = start.elapsed().as_secs_f64();
    let decode_cpu = cpu_seconds() - cpu;
    assert_eq!(decoder.paths().1, 0, "every payload on the fast path");
    let cpu = cpu_seconds();
    let start = Instant::now();
    let mut owned = 0usize;
    for (_, payload) in &payloads[decode_from..] {
        owned += ReadingBatch::decode(payload).unwrap().readings.len();
    }
    let serde_s = start.elapsed().as_secs_f64();
    let serde_cpu = cpu_seconds() - cpu;
    assert_eq!(owned, n);

    let (decode0, check0) = (metrics.decode_latency.sum(), metrics.check_latency.sum());
    let cpu = cpu_seconds();
    let start = Instant::now();
    let mut lines = 0usize;
    let mut line_bytes = 0usize;
    let mut events = 0usize;
    let mut n = 0usize;
    for (topic, payload) in &payloads[agents_n..] {
        pipeline.process(topic, payload, now, &mut out);
        n += out.readings;
        lines += out.lines.lines();
        line_bytes += out.lines.len_bytes();
        events += out.events.len();
        out.clear();
    }
    let pipeline_s = start.elapsed().as_secs_f64();
    let pipeline_cpu = cpu_seconds() - cpu;
    let decode_in = (metrics.decode_latency.sum() - decode0).as_secs_f64();
    let check_in = (metrics.check_latency.sum() - check0).as_secs_f64();
    let checked = metrics
        .readings_checked
        .load(std::sync::atomic::Ordering::Relaxed) as usize;
    assert_eq!(checked, rounds * devices_n, "every reading checked once");
    assert_eq!(lines, n, "one line per reading");

    println!("pipeline_bench: {devices_n} devices, {agents_n} agents, batches of {PER_AGENT} readings, {} measured rounds", rounds - 1);
    println!(
        "  decode only:             {:>10.0} readings/s wall, {:>10.0} per CPU second",
        n as f64 / decode_s,
        n as f64 / decode_cpu
    );
    println!(
        "  decode only, serde owned:{:>10.0} readings/s wall, {:>10.0} per CPU second",
        n as f64 / serde_s,
        n as f64 / serde_cpu
    );
    println!(
        "  decode→dedup→check→line: {:>10.0} readings/s wall, {:>10.0} per CPU second ({:.0} ns/reading of CPU, {:.0} bytes of line protocol/reading, {events} alert events)",
        n as f64 / pipeline_s,
        n as f64 / pipeline_cpu,
        pipeline_cpu * 1e9 / n as f64,
        line_bytes as f64 / n as f64
    );
    println!(
        "    of which (wall, per reading): decode {:.0} ns, dedup→check→line {:.0} ns",
        decode_in * 1e9 / n as f64,
        check_in * 1e9 / n as f64
    );
    println!(
        "  memory per device: {:.0} bytes (registry + states built), {:.0} bytes (after every device's first reading)",
        (rss1.saturating_sub(rss0) * 1024) as f64 / devices_n as f64,
        (rss2.saturating_sub(rss0) * 1024) as f64 / devices_n as f64
    );
    println!(
        "  inline sizes: Device {} B, SavedDevice {} B = checks::DeviceState {} B (of which DriftSources {} B, Presence {} B) + counters",
        std::mem::size_of::<Device>(),
        std::mem::size_of::<calwatch_gateway::bench::SavedDevice>(),
        std::mem::size_of::<calwatch_gateway::bench::DeviceState>(),
        std::mem::size_of::<calwatch_gateway::bench::DriftSources>(),
        std::mem::size_of::<calwatch_gateway::bench::Presence>(),
    );
}
