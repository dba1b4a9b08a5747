//! End-to-end benchmark (run by hand, not in CI): simulator → agent → mosquitto → gateway →
//! InfluxDB 1.x and VictoriaMetrics, all real processes on this machine, with 100,000
//! registered devices, at stepped loads until something saturates.
//!
//!     tests/run --with-services cargo run --release -p calwatch-tests --bin bench_e2e [-- STEP_S]
//!
//! Steps: 1k and 10k readings/s come from `calwatch-agent simulate` (FT-112 indicators over
//! Modbus TCP) polled by a real `calwatch-agent` at 1 Hz; from 20k readings/s on, one agent
//! cannot poll fast enough on this machine, so synthetic agents (this process, publishing
//! the agent's batches over QoS 1 like the agent does) offer the load, doubling until the
//! delivered rate falls below 90 % of the offered one, or the offered rate cannot be
//! published (the broker's limit). During every step five "fault" readings a second (a
//! device in use without a certificate) are published at known times and the alert events
//! are timed on MQTT: reading → alert latency.
//!
//! Per step: offered and delivered readings/s (delivered = checked by the gateway), CPU
//! seconds per 1,000 readings of each process (simulator, agent, publisher, mosquitto,
//! gateway, influxd, victoria-metrics), RSS of agent and gateway, latency p50/p99/max, sink
//! queue at the end of the step and the time it took to drain (sink lag).
//!
//! Then the second mode, the gateway alone (decode → check → line protocol on one core):
//! `cargo run --release -p calwatch-gateway --example pipeline_bench`.
//!
//! Results replace the section between `<!-- bench_e2e:start -->` and `<!-- bench_e2e:end -->`
//! of BENCHMARKS.md; the plot goes to `docs/bench-e2e.png`.

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use calwatch_protocol::{readings_topic, AlertEvent, Id, Reading, ReadingBatch, Value};
use calwatch_tests::{bin, proc_cpu_s as cpu_s, proc_kb as kb, run_to_end_within, workspace, Proc};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const REGISTERED: usize = 100_000;
/// Devices polled by the real agent (A-*), synthetic (S-*) and fault devices (F-*).
const AGENT_DEVICES: usize = 10_000;
const FAULT_DEVICES: usize = 10_000;
const SYN_DEVICES: usize = REGISTERED - AGENT_DEVICES - FAULT_DEVICES;
const PER_AGENT: usize = 1_000;
const FAULTS_PER_S: u64 = 5;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn env_pid(name: &str) -> Option<u32> {
    std::env::var(name).ok()?.parse().ok()
}

/// One value of the gateway's /metrics (summed over label sets matching `prefix`).
async fn metric(http: &reqwest::Client, base: &str, prefix: &str) -> f64 {
    let text = match http.get(format!("{base}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| l.starts_with(prefix) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A QoS 1 publisher, and alert events with their arrival time.
struct Mqtt {
    client: AsyncClient,
    alerts: Arc<Mutex<Vec<(Instant, AlertEvent)>>>,
}

async fn mqtt(addr: &str, id: &str) -> Mqtt {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let mut o = MqttOptions::new(id, host, port.parse().expect("port"));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(200);
    let (client, mut el) = AsyncClient::new(o, 10_000);
    el.network_options.set_tcp_nodelay(true);
    let alerts = Arc::new(Mutex::new(Vec::new()));
    let al = alerts.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(e) = AlertEvent::decode(&p.payload) {
                        if let Ok(mut v) = al.lock() {
                            v.push((Instant::now(), e));
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Mqtt { client, alerts }
}

fn scale_values(i: usize, seq: u64) -> Vec<(Id, Value)> {
    let gross = 1.0 + ((i as u64 + seq) % 9) as f64 * 0.25;
    [
        ("gross_kg", Value::Number(gross)),
        ("net_kg", Value::Number(gross)),
        ("stable", Value::Bool(true)),
        ("zero", Value::Bool(false)),
        ("event_counter", Value::Number(7.0)),
    ]
    .into_iter()
    .map(|(k, v)| (Id::new(k).expect("name"), v))
    .collect()
}

fn write_registry(dir: &Path) {
    let mut devices = String::from(
        "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device\n",
    );
    let mut certs = String::from(
        "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\n",
    );
    let today = calwatch_gateway::bench::format_date(now_ms() - 30 * 86_400_000);
    let until = calwatch_gateway::bench::format_date(now_ms() + 300 * 86_400_000);
    for i in 0..AGENT_DEVICES {
        let _ = writeln!(
            devices,
            "A-{i},scale,bench-owner,site-a{},bench-agent,FT-112,A{i},III,15,0.005,,60,",
            i / 1000
        );
        let _ = writeln!(certs, "A-{i},C-A-{i},{today},{until},pass,bench,7,");
    }
    for i in 0..SYN_DEVICES {
        let _ = writeln!(
            devices,
            "S-{i},scale,bench-owner,site-s{},syn-{},FT-112,S{i},III,15,0.005,,60,",
            i / 1000,
            i / PER_AGENT
        );
        let _ = writeln!(certs, "S-{i},C-S-{i},{today},{until},pass,bench,7,");
    }
    for i in 0..FAULT_DEVICES {
        // Never verified: the first reading raises `unverified` (critical, in use).
        let _ = writeln!(
            devices,
            "F-{i},scale,bench-faults,site-f,fault-agent,FT-112,F{i},III,15,0.005,,86400,"
        );
    }
    std::fs::write(dir.join("devices.csv"), devices).expect("devices.csv");
    std::fs::write(dir.join("verifications.csv"), certs).expect("verifications.csv");
}

#[derive(Default, Clone)]
struct StepResult {
    label: String,
    source: &'static str,
    target: f64,
    offered: f64,
    delivered: f64,
    /// CPU seconds per 1,000 delivered readings, by process.
    cpu_per_k: BTreeMap<&'static str, f64>,
    /// % of one core, by process.
    cpu_pct: BTreeMap<&'static str, f64>,
    rss_agent_kb: u64,
    rss_gateway_kb: u64,
    lat_ms: Vec<f64>,
    queue_end: f64,
    drain_s: f64,
    alerts_expected: usize,
    /// Gateway seconds in decode, check and commit (queues + state) over the step, and bursts.
    split: [f64; 4],
    /// Length of the step, s.
    wall: f64,
}

/// The gateway's own timers: where its time goes.
const SPLIT: [&str; 4] = [
    "calwatch_decode_seconds_sum",
    "calwatch_check_seconds_sum",
    "calwatch_commit_seconds_sum",
    "calwatch_bursts_total",
];

impl StepResult {
    fn pct(&self, p: f64) -> f64 {
        if self.lat_ms.is_empty() {
            return f64::NAN;
        }
        let mut v = self.lat_ms.clone();
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    }
}

struct Env {
    http: reqwest::Client,
    gw_base: String,
    gw_pid: u32,
    pids: Vec<(&'static str, u32)>,
    mqtt_addr: String,
    step_s: u64,
    next_fault: usize,
}

/// Runs one step of `secs` at whatever source is running; `offer` publishes synthetic load
/// (None: the real agent's). Returns the measurements.
async fn measure(
    env: &mut Env,
    label: String,
    source: &'static str,
    target: f64,
    extra: &[(&'static str, u32)],
    syn: Option<(&Mqtt, f64)>,
    faults: &Mqtt,
) -> StepResult {
    let mut pids = env.pids.clone();
    pids.extend_from_slice(extra);
    let cpu0: Vec<f64> = pids.iter().map(|(_, p)| cpu_s(*p)).collect();
    let checked0 = metric(&env.http, &env.gw_base, "calwatch_readings_checked_total").await;
    let mut split0 = [0.0; 4];
    for (i, m) in SPLIT.iter().enumerate() {
        split0[i] = metric(&env.http, &env.gw_base, m).await;
    }
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(env.step_s);
    let mut seqs: HashMap<usize, u64> = HashMap::new();
    let mut offered = 0u64;
    let mut sent_faults: Vec<(String, Instant)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut syn_cursor = 0usize;
    let mut carry = 0.0f64;
    let mut ticks = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        ticks += 1;
        if let Some((m, rate)) = syn {
            // rate/10 readings per tick, batches of one agent's devices (≤ 1,000).
            carry += rate / 10.0;
            while carry >= 1.0 {
                let n = (carry as usize).min(PER_AGENT);
                let agent = syn_cursor / PER_AGENT % (SYN_DEVICES / PER_AGENT);
                let ts = now_ms();
                let readings: Vec<Reading> = (0..n)
                    .map(|k| {
                        let i = agent * PER_AGENT + (syn_cursor + k) % PER_AGENT;
                        let seq = seqs.entry(i).or_insert(0);
                        *seq += 1;
                        Reading {
                            device: Id::new(format!("S-{i}")).expect("id"),
                            seq: *seq + SEQ_BASE.load(Ordering::Relaxed),
                            ts,
                            values: scale_values(i, *seq),
                        }
                    })
                    .collect();
                syn_cursor += n;
                carry -= n as f64;
                let agent_id = Id::new(format!("syn-{agent}")).expect("agent");
                let batch = ReadingBatch {
                    agent: agent_id.clone(),
                    sent: ts,
                    readings,
                };
                let payload = batch.encode().expect("batch");
                if m.client
                    .try_publish(readings_topic(&agent_id), QoS::AtLeastOnce, false, payload)
                    .is_ok()
                {
                    offered += n as u64;
                } else {
                    // The client's queue is full: the broker is not keeping up.
                    carry = 0.0;
                    break;
                }
            }
        }
        if ticks % (10 / FAULTS_PER_S) == 0 && env.next_fault < FAULT_DEVICES {
            let dev = format!("F-{}", env.next_fault);
            env.next_fault += 1;
            let agent = Id::new("fault-agent").expect("agent");
            let batch = ReadingBatch {
                agent: agent.clone(),
                sent: now_ms(),
                readings: vec![Reading {
                    device: Id::new(dev.clone()).expect("id"),
                    seq: 1,
                    ts: now_ms(),
                    values: scale_values(0, 1),
                }],
            };
            let sent = Instant::now();
            let _ = faults
                .client
                .publish(
                    readings_topic(&agent),
                    QoS::AtLeastOnce,
                    false,
                    batch.encode().expect("batch"),
                )
                .await;
            sent_faults.push((dev, sent));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let checked1 = metric(&env.http, &env.gw_base, "calwatch_readings_checked_total").await;
    let cpu1: Vec<f64> = pids.iter().map(|(_, p)| cpu_s(*p)).collect();
    let queue_end = metric(&env.http, &env.gw_base, "calwatch_sink_queue_records").await;
    let mut split = [0.0; 4];
    for (i, m) in SPLIT.iter().enumerate() {
        split[i] = metric(&env.http, &env.gw_base, m).await - split0[i];
    }
    let delivered = (checked1 - checked0).max(0.0);
    // Offered: readings handed to the MQTT client (whose queue refuses when the broker does
    // not keep up); the agent's own rate is what it delivered.
    let offered_rate = match syn {
        Some(_) => offered as f64 / wall,
        None => delivered / wall,
    };
    // Latencies: the critical event of each fault device.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = faults.alerts.lock().map(|v| v.clone()).unwrap_or_default();
    let mut lat_ms = Vec::new();
    for (dev, sent) in &sent_faults {
        if let Some((at, _)) = alerts.iter().find(|(_, e)| {
            e.device.as_str() == dev && e.severity == calwatch_protocol::Severity::Critical
        }) {
            lat_ms.push(at.duration_since(*sent).as_secs_f64() * 1000.0);
        }
    }
    // Sink lag: how long the queues take to empty after the step.
    let drain0 = Instant::now();
    while metric(&env.http, &env.gw_base, "calwatch_sink_queue_records").await > 0.0
        && drain0.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_s = drain0.elapsed().as_secs_f64();
    let mut cpu_per_k = BTreeMap::new();
    let mut cpu_pct = BTreeMap::new();
    for (i, (name, _)) in pids.iter().enumerate() {
        let d = cpu1[i] - cpu0[i];
        cpu_per_k.insert(
            *name,
            if delivered > 0.0 {
                d / (delivered / 1000.0)
            } else {
                f64::NAN
            },
        );
        cpu_pct.insert(*name, 100.0 * d / wall);
    }
    let agent_pid = extra.iter().find(|(n, _)| *n == "agent").map(|(_, p)| *p);
    StepResult {
        label,
        source,
        target,
        offered: offered_rate,
        delivered: delivered / wall,
        cpu_per_k,
        cpu_pct,
        rss_agent_kb: agent_pid.map(|p| kb(p, "VmRSS:")).unwrap_or(0),
        rss_gateway_kb: kb(env.gw_pid, "VmRSS:"),
        alerts_expected: sent_faults.len(),
        lat_ms,
        queue_end,
        drain_s,
        split,
        wall,
    }
}

/// Synthetic seqs continue above what earlier runs of a step used (one registry per run).
static SEQ_BASE: AtomicU64 = AtomicU64::new(0);

fn start_agent_fleet(dir: &Path, devices: usize, mqtt: &str) -> (Proc, Proc) {
    let profile = workspace().join("config/profiles/ft112.toml");
    let (fleet_file, tables) = calwatch_tests::bench_fleet(dir, &profile, devices, "A-");
    let mut sim = Proc::start(
        dir,
        &format!("sim-{devices}"),
        &bin("calwatch-agent"),
        &["simulate", "--fleet", fleet_file.to_str().unwrap_or("")],
    );
    sim.wait_stdout_line("simulating", Duration::from_secs(30));
    let cfg = format!(
        "agent = \"bench-agent\"\n[mqtt]\nurl = \"mqtt://{mqtt}\"\n[spool]\ndir = \"spool-{devices}\"\nfsync = \"interval\"\n[batch]\nlinger_ms = 500\nmax_readings = 1000\n{tables}"
    );
    let agent_toml = dir.join(format!("agent-{devices}.toml"));
    std::fs::write(&agent_toml, cfg).expect("agent.toml");
    let agent = Proc::start(
        dir,
        &format!("agent-{devices}"),
        &bin("calwatch-agent"),
        &["run", "--config", agent_toml.to_str().unwrap_or("")],
    );
    (sim, agent)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    format!("{cores} cores ({model}), {mem} RAM")
}

fn main() {
    let step_s: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let mqtt_addr =
        std::env::var("CALWATCH_MQTT_ADDR").expect("run under tests/run --with-services");
    let influx = std::env::var("CALWATCH_INFLUX_V1_URL").expect("influx");
    let influx_db = std::env::var("CALWATCH_INFLUX_V1_DB").expect("influx db");
    let vm = std::env::var("CALWATCH_VM_URL").expect("vm");
    let dir: PathBuf =
        std::env::temp_dir().join(format!("calwatch-bench-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    eprintln!("bench_e2e: registering {REGISTERED} devices ...");
    write_registry(&dir);
    let port = calwatch_tests::free_port();
    let toml = dir.join("gateway.toml");
    std::fs::write(
        &toml,
        format!(
            "client_id = \"bench-gateway\"\n[mqtt]\nurl = \"mqtt://{mqtt_addr}\"\n[registry]\npath = \"registry.db\"\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\n[sweep]\ninterval_s = 60\n\
             [[sink]]\nkind = \"influx_v1\"\nurl = \"{influx}\"\ndb = \"{influx_db}\"\n\
             [[sink]]\nkind = \"influx_v2\"\nurl = \"{vm}\"\norg = \"bench\"\nbucket = \"calwatch\"\n"
        ),
    )
    .expect("gateway.toml");
    let t = Instant::now();
    let (code, out, err) = run_to_end_within(
        &bin("calwatch-gateway"),
        &[
            "import",
            "--config",
            toml.to_str().unwrap_or(""),
            dir.join("devices.csv").to_str().unwrap_or(""),
            dir.join("verifications.csv").to_str().unwrap_or(""),
        ],
        Duration::from_secs(600),
    );
    assert_eq!(code, 0, "import: {out}{err}");
    eprintln!("bench_e2e: imported in {:.1} s", t.elapsed().as_secs_f64());
    let mut gw = Proc::start(
        &dir,
        "gateway",
        &bin("calwatch-gateway"),
        &["run", "--config", toml.to_str().unwrap_or("")],
    );
    let gw_base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    rt.block_on(async {
        for _ in 0..600 {
            if http.get(format!("{gw_base}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let gw_base_idle = Instant::now();
    let gw_pid = gw.pid();
    let mut pids = vec![("gateway", gw_pid)];
    for (name, var) in [
        ("mosquitto", "CALWATCH_MOSQUITTO_PID"),
        ("influxd", "CALWATCH_INFLUXD_PID"),
        ("victoria-metrics", "CALWATCH_VM_PID"),
    ] {
        if let Some(p) = env_pid(var) {
            pids.push((name, p));
        }
    }
    pids.push(("driver", std::process::id()));
    let rss_idle = kb(gw_pid, "VmRSS:");
    let mut env = Env {
        http,
        gw_base,
        gw_pid,
        pids,
        mqtt_addr: mqtt_addr.clone(),
        step_s,
        next_fault: 0,
    };
    let faults = rt.block_on(async {
        let m = mqtt(&mqtt_addr, "bench-faults").await;
        m.client
            .subscribe("calwatch/v1/alerts/bench-faults/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        m
    });
    // Let the first sweep (10,000 never-seen fault devices raise `unverified`) pass.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(gw_base_idle.elapsed()));
    let mut results: Vec<StepResult> = Vec::new();

    // Real agent steps.
    for devices in [1_000usize, 10_000] {
        eprintln!("bench_e2e: agent step, {devices} devices at 1 Hz ...");
        let (mut sim, mut agent) = start_agent_fleet(&dir, devices, &env.mqtt_addr);
        std::thread::sleep(Duration::from_secs(12));
        let extra = [("simulator", sim.pid()), ("agent", agent.pid())];
        let r = rt.block_on(measure(
            &mut env,
            format!("{}k", devices / 1000),
            "agent",
            devices as f64,
            &extra,
            None,
            &faults,
        ));
        eprintln!(
            "  delivered {:.0}/s, latency p99 {:.1} ms",
            r.delivered,
            r.pct(0.99)
        );
        results.push(r);
        let _ = agent.terminate(Duration::from_secs(20));
        let _ = sim.terminate(Duration::from_secs(5));
    }
    // Synthetic steps, doubling until saturation.
    let syn = rt.block_on(mqtt(&env.mqtt_addr, "bench-syn"));
    let mut rate = 20_000.0;
    loop {
        eprintln!("bench_e2e: synthetic step, {rate:.0} readings/s offered ...");
        let r = rt.block_on(measure(
            &mut env,
            format!("{}k", rate as u64 / 1000),
            "synthetic",
            rate,
            &[],
            Some((&syn, rate)),
            &faults,
        ));
        SEQ_BASE.fetch_add(1_000_000, Ordering::Relaxed);
        eprintln!(
            "  offered {:.0}/s delivered {:.0}/s, latency p99 {:.1} ms, drain {:.1} s",
            r.offered,
            r.delivered,
            r.pct(0.99),
            r.drain_s
        );
        let saturated =
            r.delivered < 0.9 * r.target || r.offered < 0.9 * r.target || r.drain_s > 10.0;
        results.push(r);
        if saturated || rate >= 1_600_000.0 {
            break;
        }
        rate *= 2.0;
    }
    let rss_end = kb(gw_pid, "VmRSS:");
    let hwm = kb(gw_pid, "VmHWM:");
    let _ = gw.terminate(Duration::from_secs(30));

    // Mode 2: the gateway alone.
    eprintln!("bench_e2e: pipeline alone ...");
    let pipeline = std::process::Command::new("cargo")
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "calwatch-gateway",
            "--example",
            "pipeline_bench",
        ])
        .current_dir(workspace())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("pipeline_bench failed: {e}"));

    let report = report(&results, rss_idle, rss_end, hwm, &pipeline, step_s);
    println!("{report}");
    let bench = workspace().join("BENCHMARKS.md");
    let text = std::fs::read_to_string(&bench).unwrap_or_default();
    let (start, end) = ("<!-- bench_e2e:start -->", "<!-- bench_e2e:end -->");
    let new = match (text.find(start), text.find(end)) {
        (Some(a), Some(b)) if a < b => format!("{}{start}\n{report}\n{}", &text[..a], &text[b..]),
        _ => format!("{text}\n{start}\n{report}\n{end}\n"),
    };
    std::fs::write(&bench, new).expect("write BENCHMARKS.md");
    let png = workspace().join("docs/bench-e2e.png");
    match plot(&results, &png) {
        Ok(()) => eprintln!("bench_e2e: plot in {}", png.display()),
        Err(e) => eprintln!("bench_e2e: no plot: {e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn report(
    results: &[StepResult],
    rss_idle: u64,
    rss_end: u64,
    hwm: u64,
    pipeline: &str,
    step_s: u64,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## End to end (issue 9)\n");
    let _ = writeln!(s, "Machine: {}; everything on it at once (simulator, agent or synthetic publisher, mosquitto, gateway, InfluxDB 1.x, VictoriaMetrics). {REGISTERED} registered devices; {step_s} s per step.\n", machine());
    let _ = writeln!(s, "```sh\ntests/run --with-services cargo run --release -p calwatch-tests --bin bench_e2e -- {step_s}\n```\n");
    let _ = writeln!(s, "| step | source | offered/s | delivered/s | alert p50 / p99 / max ms | alerts seen | sink queue at end | drain s | gateway RSS MB | agent RSS MB |");
    let _ = writeln!(s, "|---|---|---:|---:|---|---:|---:|---:|---:|---:|");
    for r in results {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.0} | {:.1} / {:.1} / {:.1} | {}/{} | {:.0} | {:.1} | {:.0} | {} |",
            r.label, r.source, r.offered, r.delivered, r.pct(0.5), r.pct(0.99), r.pct(1.0),
            r.lat_ms.len(), r.alerts_expected, r.queue_end, r.drain_s, r.rss_gateway_kb as f64 / 1024.0,
            if r.rss_agent_kb > 0 { format!("{:.0}", r.rss_agent_kb as f64 / 1024.0) } else { "—".into() }
        );
    }
    let names: Vec<&str> = [
        "simulator",
        "agent",
        "driver",
        "mosquitto",
        "gateway",
        "influxd",
        "victoria-metrics",
    ]
    .to_vec();
    let _ = writeln!(
        s,
        "\nCPU seconds per 1,000 delivered readings (and % of one core), by process:\n"
    );
    let _ = writeln!(s, "| step | {} |", names.join(" | "));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(names.len()));
    for r in results {
        let cells: Vec<String> = names
            .iter()
            .map(|n| match (r.cpu_per_k.get(n), r.cpu_pct.get(n)) {
                (Some(k), Some(p)) => format!("{:.4} ({:.0} %)", k, p),
                _ => "—".into(),
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", r.label, cells.join(" | "));
    }
    let _ = writeln!(s, "\nWhere the gateway's time goes (its own timers, µs per delivered reading; bursts per second and readings per burst):\n");
    let _ = writeln!(s, "| step | decode | checks + line protocol | durable (queues + state commit) | bursts/s | readings/burst |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
    for r in results {
        let readings = (r.delivered * r.wall).max(1.0);
        let per = |x: f64| 1e6 * x / readings;
        let _ = writeln!(
            s,
            "| {} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} |",
            r.label,
            per(r.split[0]),
            per(r.split[1]),
            per(r.split[2]),
            r.split[3] / r.wall,
            readings / r.split[3].max(1.0)
        );
    }
    if let Some(last) = results.last() {
        let top = last
            .cpu_pct
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(n, p)| format!("{n} at {p:.0} % of a core"))
            .unwrap_or_default();
        let total: f64 = last.cpu_pct.values().sum();
        let _ = writeln!(s, "\nAt the last step ({}): the busiest process is {top}; all together {total:.0} % of the machine's {} % (2 cores).", last.label, 200);
    }
    let _ = writeln!(s, "\nGateway RSS: {:.0} MB idle with the registry loaded, {:.0} MB at the end, {:.0} MB peak.\n", rss_idle as f64 / 1024.0, rss_end as f64 / 1024.0, hwm as f64 / 1024.0);
    let _ = writeln!(s, "![throughput and latency vs load](docs/bench-e2e.png)\n");
    let _ = writeln!(s, "Second mode, the gateway alone (decode → check → line protocol, one core, no I/O):\n\n```text\n{}```", pipeline);
    s
}

fn plot(results: &[StepResult], png: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|e| format!("font (Debian fonts-dejavu-core): {e}"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "font not usable".to_string())?;
    if let Some(d) = png.parent() {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let root = BitMapBackend::new(png, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(600);
    let xs: Vec<f64> = results.iter().map(|r| r.target.max(1.0).log10()).collect();
    let x_range = (xs.iter().cloned().fold(f64::MAX, f64::min) - 0.1)
        ..(xs.iter().cloned().fold(f64::MIN, f64::max) + 0.1);
    let y_max = results
        .iter()
        .map(|r| r.offered.max(r.delivered))
        .fold(1.0, f64::max)
        .log10()
        + 0.2;
    let mut c = ChartBuilder::on(&left)
        .caption("readings/s: offered and delivered", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range.clone(), 2.5f64..y_max)
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .x_desc("offered load (log10 readings/s)")
        .y_desc("log10 readings/s")
        .draw()
        .map_err(|e| e.to_string())?;
    let pts = |f: &dyn Fn(&StepResult) -> f64| -> Vec<(f64, f64)> {
        results
            .iter()
            .zip(&xs)
            .map(|(r, x)| (*x, f(r).max(1.0).log10()))
            .collect()
    };
    c.draw_series(LineSeries::new(pts(&|r| r.offered), &BLUE))
        .map_err(|e| e.to_string())?
        .label("offered")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(pts(&|r| r.delivered), &RED))
        .map_err(|e| e.to_string())?
        .label("delivered")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    c.draw_series(
        pts(&|r| r.delivered)
            .into_iter()
            .map(|p| Circle::new(p, 4, RED.filled())),
    )
    .map_err(|e| e.to_string())?;
    c.configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    let lat_max = results
        .iter()
        .map(|r| r.pct(1.0))
        .filter(|x| x.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let mut c = ChartBuilder::on(&right)
        .caption("reading → alert latency (ms)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_range, 0f64..lat_max)
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .x_desc("offered load (log10 readings/s)")
        .y_desc("ms")
        .draw()
        .map_err(|e| e.to_string())?;
    for (p, color, name) in [(0.5, GREEN, "p50"), (0.99, BLUE, "p99"), (1.0, RED, "max")] {
        let series: Vec<(f64, f64)> = results
            .iter()
            .zip(&xs)
            .filter(|(r, _)| r.pct(p).is_finite())
            .map(|(r, x)| (*x, r.pct(p)))
            .collect();
        c.draw_series(LineSeries::new(series, color))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
