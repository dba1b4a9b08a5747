//! Shared by the gateway tests: a hand-built fleet with one device per fault kind and clean
//! ones, its registry files and its readings (deterministic, event time in the past), the real
//! `calwatch-gateway run`, an MQTT publisher and an alert subscriber.
#![allow(dead_code)] // each test binary uses part of it

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use calwatch_protocol::{
    readings_topic, status_topic, AgentState, AgentStatus, AlertEvent, Id, Reading, ReadingBatch,
    Value,
};
use calwatch_tests::{bin, run_to_end, Proc};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub(crate) const MINUTE: i64 = 60_000;
pub(crate) const DAY: i64 = 86_400_000;

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// `YYYY-MM-DD` (UTC) of a Unix ms instant.
pub(crate) fn iso_date(ms: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = ms.div_euclid(DAY) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// What a device of the fleet does wrong (or not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    Clean,
    Unverified,
    Overdue,
    Failed,
    DueSoon,
    SealBroken,
    ParamChanged,
    CounterRollback,
    OutOfTolerance,
    Drift,
    Cheating,
    TotalizerMismatch,
    /// Stops reporting after the first quarter while its agent goes on.
    Offline,
    /// On the second agent, whose last will arrives after its readings.
    LastWill,
}

impl Fault {
    /// The alert kinds this fault must raise (and nothing else).
    pub(crate) fn expected(self) -> &'static [&'static str] {
        match self {
            Fault::Clean => &[],
            Fault::Unverified => &["unverified"],
            Fault::Overdue => &["overdue"],
            Fault::Failed => &["failed_verification"],
            Fault::DueSoon => &["due_soon"],
            Fault::SealBroken => &["seal_broken"],
            Fault::ParamChanged => &["param_changed"],
            Fault::CounterRollback => &["counter_rollback"],
            Fault::OutOfTolerance => &["out_of_tolerance"],
            Fault::Drift => &["drift"],
            Fault::Cheating => &["cheating_suspected"],
            Fault::TotalizerMismatch => &["totalizer_mismatch"],
            Fault::Offline | Fault::LastWill => &["offline"],
        }
    }
}

/// One instrument of the fleet.
#[derive(Clone, Debug)]
pub(crate) struct Dev {
    pub(crate) id: String,
    pub(crate) kind: &'static str,
    pub(crate) agent: String,
    pub(crate) fault: Fault,
}

/// The fleet: 3 clean instruments and one per fault, on two agents, all names unique to a
/// test run.
#[derive(Clone, Debug)]
pub(crate) struct Fleet {
    pub(crate) tag: String,
    pub(crate) owner: String,
    pub(crate) site: String,
    pub(crate) agent_a: String,
    pub(crate) agent_b: String,
    pub(crate) devices: Vec<Dev>,
    /// Rounds of readings (one a minute of event time per device).
    pub(crate) rounds: u32,
    /// Event time of round 0.
    pub(crate) t0: i64,
    /// Deviating sales of the cheating dispenser (from the fifth, each raises).
    pub(crate) deviating_sales: u32,
}

impl Fleet {
    /// `tag` makes every id unique (tests share one broker and one database).
    pub(crate) fn new(tag: &str, rounds: u32, deviating_sales: u32) -> Fleet {
        Fleet::replicated(tag, rounds, deviating_sales, 1)
    }

    /// `copies` of the fleet, each on two agents of its own (copy 0 on `agent_a` and
    /// `agent_b`, copy `c` on `{tag}-a{c}-{pid}` and `{tag}-b{c}-{pid}`); device ids of copy
    /// `c > 0` end in `-{c}`.
    pub(crate) fn replicated(tag: &str, rounds: u32, deviating_sales: u32, copies: usize) -> Fleet {
        let pid = std::process::id();
        let owner = format!("{tag}-owner-{pid}");
        let site = format!("{tag}-site-{pid}");
        let agent_a = format!("{tag}-a-{pid}");
        let agent_b = format!("{tag}-b-{pid}");
        let spec: [(&str, &str, Fault); 16] = [
            ("CLEAN-SCL", "scale", Fault::Clean),
            ("CLEAN-DSP", "dispenser", Fault::Clean),
            ("CLEAN-MTR", "energy_meter", Fault::Clean),
            ("UNVERIFIED", "scale", Fault::Unverified),
            ("OVERDUE", "scale", Fault::Overdue),
            ("FAILED", "scale", Fault::Failed),
            ("DUESOON", "scale", Fault::DueSoon),
            ("SEAL", "scale", Fault::SealBroken),
            ("PARAM", "dispenser", Fault::ParamChanged),
            ("ROLLBACK", "energy_meter", Fault::CounterRollback),
            ("OOT", "scale", Fault::OutOfTolerance),
            ("DRIFT", "scale", Fault::Drift),
            ("CHEAT", "dispenser", Fault::Cheating),
            ("TOTALIZER", "dispenser", Fault::TotalizerMismatch),
            ("OFFLINE", "energy_meter", Fault::Offline),
            ("LASTWILL", "scale", Fault::LastWill),
        ];
        let devices = (0..copies)
            .flat_map(|c| {
                let (a, b, suffix) = match c {
                    0 => (agent_a.clone(), agent_b.clone(), String::new()),
                    c => (
                        format!("{tag}-a{c}-{pid}"),
                        format!("{tag}-b{c}-{pid}"),
                        format!("-{c}"),
                    ),
                };
                spec.iter().map(move |(name, kind, fault)| Dev {
                    id: format!("{}-{name}-{pid}{suffix}", tag.to_uppercase()),
                    kind,
                    agent: if *fault == Fault::LastWill {
                        b.clone()
                    } else {
                        a.clone()
                    },
                    fault: *fault,
                })
            })
            .collect();
        // Round 0 about 20 h ago, on a whole minute: in the last 24 h (coverage), in the past.
        let t0 = (now_ms() - 20 * 3_600_000) / MINUTE * MINUTE;
        Fleet {
            tag: tag.into(),
            owner,
            site,
            agent_a,
            agent_b,
            devices,
            rounds,
            t0,
            deviating_sales,
        }
    }

    /// Every agent of the fleet, in the order of its devices.
    pub(crate) fn agents(&self) -> Vec<String> {
        let mut agents: Vec<String> = Vec::new();
        for d in &self.devices {
            if !agents.contains(&d.agent) {
                agents.push(d.agent.clone());
            }
        }
        agents
    }

    pub(crate) fn device(&self, fault: Fault) -> &Dev {
        self.devices
            .iter()
            .find(|d| d.fault == fault)
            .expect("fault in fleet")
    }

    /// The (device, kind) pairs that must be raised.
    pub(crate) fn expected_alerts(&self) -> BTreeSet<(String, String)> {
        self.devices
            .iter()
            .flat_map(|d| {
                d.fault
                    .expected()
                    .iter()
                    .map(move |k| (d.id.clone(), (*k).to_string()))
            })
            .collect()
    }

    pub(crate) fn devices_csv(&self) -> String {
        let mut s = String::from(
            "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device\n",
        );
        for d in &self.devices {
            let (class, max, e, mpe) = match d.kind {
                "scale" => ("III", "15", "0.005", ""),
                "dispenser" => ("", "", "", "0.5"),
                _ => ("1", "", "", ""),
            };
            s.push_str(&format!(
                "{},{},{},{},{},test-model,SN-{},{class},{max},{e},{mpe},60,\n",
                d.id, d.kind, self.owner, self.site, d.agent, d.id
            ));
        }
        s
    }

    pub(crate) fn verifications_csv(&self) -> String {
        let today = now_ms();
        let date = |days: i64| iso_date(today + days * DAY);
        let mut s = String::from(
            "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\n",
        );
        for d in &self.devices {
            let k = if d.kind == "dispenser" { "100.12" } else { "" };
            let mut cert = |name: &str, from: i64, until: Option<i64>, pass: bool| {
                s.push_str(&format!(
                    "{},{}-{name},{},{},{},test-verifier,7,{k}\n",
                    d.id,
                    d.id,
                    date(from),
                    until.map(date).unwrap_or_default(),
                    if pass { "pass" } else { "fail" }
                ));
            };
            match d.fault {
                Fault::Unverified => {}
                Fault::Overdue => cert("C1", -500, Some(-30), true),
                Fault::Failed => {
                    cert("C1", -500, Some(100), true);
                    cert("C2", -60, None, false);
                }
                Fault::DueSoon => cert("C1", -300, Some(10), true),
                _ => cert("C1", -200, Some(300), true),
            }
        }
        s
    }

    /// Event time of `round` for the `i`-th device.
    pub(crate) fn ts(&self, round: u32, i: usize) -> i64 {
        self.t0 + i64::from(round) * MINUTE + i as i64 * 100
    }

    /// Whether `dev` reports in `round`.
    pub(crate) fn reports(&self, dev: &Dev, round: u32) -> bool {
        dev.fault != Fault::Offline || round < self.rounds / 4
    }

    /// Readings each device gets over the whole run.
    pub(crate) fn sent(&self, dev: &Dev) -> u64 {
        (0..self.rounds).filter(|r| self.reports(dev, *r)).count() as u64
    }

    /// The batches of `agent` for rounds `from..to`, in order; each reading's seq is its
    /// device's count so far.
    pub(crate) fn batch(
        &self,
        sims: &mut Sims,
        agent: &str,
        from: u32,
        to: u32,
    ) -> Option<Vec<u8>> {
        let mut readings = Vec::new();
        for round in from..to.min(self.rounds) {
            for (i, d) in self.devices.iter().enumerate() {
                if d.agent != agent || !self.reports(d, round) {
                    continue;
                }
                readings.push(sims.next(self, i, round));
            }
        }
        if readings.is_empty() {
            return None;
        }
        let batch = ReadingBatch {
            agent: Id::new(agent).expect("agent id"),
            sent: self.ts(to, 0),
            readings,
        };
        Some(batch.encode().expect("valid batch"))
    }
}

/// Per-device simulation state (seq, registers, sales).
#[derive(Default)]
pub(crate) struct Sims {
    seq: BTreeMap<usize, u64>,
    totalizer: BTreeMap<usize, f64>,
    energy: BTreeMap<usize, f64>,
}

impl Sims {
    fn next(&mut self, fleet: &Fleet, i: usize, round: u32) -> Reading {
        let d = &fleet.devices[i];
        let seq = self.seq.entry(i).or_insert(0);
        *seq += 1;
        let seq = *seq;
        let ts = fleet.ts(round, i);
        let r = f64::from(round);
        let n = |x: f64| Value::Number(x);
        let mut values: Vec<(&str, Value)> = Vec::new();
        match d.kind {
            "scale" => {
                let counter = if d.fault == Fault::SealBroken && round >= 40 {
                    8.0
                } else {
                    7.0
                };
                // A check reading: the reference mass on the pan.
                let check = match d.fault {
                    Fault::Drift => {
                        // Zero error for 30 rounds, then a slow ramp to 0.7 MPE (7 g of 10 g).
                        let slope = 0.007 / f64::from(fleet.rounds.saturating_sub(31).max(1));
                        Some(10.0 + slope * (r - 30.0).max(0.0))
                    }
                    // 50 g off at 10 kg: the in-service MPE is 10 g (2 000 e, class III).
                    Fault::OutOfTolerance if round == 50 => Some(10.05),
                    Fault::Clean if round % 10 == 5 => Some(10.0),
                    _ => None,
                };
                let gross = check.unwrap_or(1.0 + f64::from(round % 9) * 0.25);
                values.extend([
                    ("gross_kg", n(gross)),
                    ("net_kg", n(gross)),
                    ("tare_kg", n(0.0)),
                    ("stable", Value::Bool(true)),
                    ("zero", Value::Bool(false)),
                    ("overload", Value::Bool(false)),
                    ("event_counter", n(counter)),
                ]);
                if check.is_some() {
                    values.push(("check_ref_kg", n(10.0)));
                }
            }
            "dispenser" => {
                let encoder = 20.0 + f64::from(round % 13);
                let deviating = d.fault == Fault::Cheating
                    && round % 2 == 0
                    && round >= 2
                    && round / 2 <= fleet.deviating_sales;
                // The displayed sale: 1 % more than the encoder measured.
                let display = if deviating { encoder * 1.01 } else { encoder };
                let total = self.totalizer.entry(i).or_insert(100_000.0);
                *total += display;
                if d.fault == Fault::TotalizerMismatch && round == 60 {
                    *total += 5.0;
                }
                let k = if d.fault == Fault::ParamChanged && round >= 40 {
                    101.0
                } else {
                    100.12
                };
                values.extend([
                    ("sale_id", n(r + 1.0)),
                    ("sale_l", n(display)),
                    ("encoder_sale_l", n(encoder)),
                    ("totalizer_l", n((*total * 1000.0).round() / 1000.0)),
                    ("k_factor", n(k)),
                    ("event_counter", n(7.0)),
                ]);
            }
            _ => {
                let energy = self.energy.entry(i).or_insert(5_000.0);
                *energy += 0.0345; // 2 070 W for a minute
                if d.fault == Fault::CounterRollback && round == 50 {
                    *energy -= 5.0;
                }
                values.extend([
                    ("energy_kwh", n((*energy * 10_000.0).round() / 10_000.0)),
                    ("power_w", n(2070.0)),
                    ("voltage_v", n(230.0)),
                    ("current_a", n(10.0)),
                    ("power_factor", n(0.9)),
                    ("event_counter", n(7.0)),
                ]);
            }
        }
        Reading {
            device: Id::new(d.id.as_str()).expect("device id"),
            seq,
            ts,
            values: values
                .into_iter()
                .map(|(k, v)| (Id::new(k).expect("value name"), v))
                .collect(),
        }
    }
}

/// Writes the registry files and `gateway.toml` in `dir` and imports the fleet.
pub(crate) fn setup_gateway(dir: &Path, fleet: &Fleet, mqtt_addr: &str, sinks: &str) -> PathBuf {
    std::fs::write(dir.join("devices.csv"), fleet.devices_csv()).expect("devices.csv");
    std::fs::write(dir.join("verifications.csv"), fleet.verifications_csv())
        .expect("verifications.csv");
    let toml = dir.join("gateway.toml");
    std::fs::write(
        &toml,
        format!(
            "client_id = \"{tag}-gateway-{pid}\"\n[mqtt]\nurl = \"mqtt://{mqtt_addr}\"\n[registry]\npath = \"registry.db\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[sweep]\ninterval_s = 1\n{sinks}",
            tag = fleet.tag,
            pid = std::process::id(),
        ),
    )
    .expect("gateway.toml");
    let (code, out, err) = run_to_end(
        &bin("calwatch-gateway"),
        &[
            "import",
            "--config",
            toml.to_str().expect("utf-8 path"),
            dir.join("devices.csv").to_str().expect("utf-8 path"),
            dir.join("verifications.csv").to_str().expect("utf-8 path"),
        ],
    );
    assert_eq!(code, 0, "import failed: {out}{err}");
    toml
}

/// Starts `calwatch-gateway run` and waits until it subscribed.
pub(crate) fn start_gateway(dir: &Path, name: &str, toml: &Path) -> Proc {
    start_gateway_env(dir, name, toml, &[])
}

/// [`start_gateway`] with extra environment variables.
pub(crate) fn start_gateway_env(dir: &Path, name: &str, toml: &Path, env: &[(&str, &str)]) -> Proc {
    let before = count_in_log(&dir.join(format!("{name}.log")), "gateway subscribed");
    let gw = Proc::start_env(
        dir,
        name,
        &bin("calwatch-gateway"),
        &["run", "--config", toml.to_str().expect("utf-8 path")],
        env,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while count_in_log(&gw.log, "gateway subscribed") <= before {
        assert!(
            Instant::now() < deadline,
            "gateway did not subscribe:\n{}",
            gw.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    gw
}

pub(crate) fn count_in_log(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// An MQTT client with its event loop on a task; counts PUBACKs and collects alert events.
pub(crate) struct Mqtt {
    pub(crate) client: AsyncClient,
    pub(crate) acked: Arc<AtomicU64>,
    pub(crate) alerts: Arc<Mutex<Vec<AlertEvent>>>,
    subacks: Arc<AtomicU64>,
}

impl Mqtt {
    pub(crate) async fn connect(addr: &str, client_id: &str) -> Mqtt {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let mut opts = MqttOptions::new(client_id, host, port.parse().expect("port"));
        opts.set_max_packet_size(300 * 1024, 300 * 1024);
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let acked = Arc::new(AtomicU64::new(0));
        let alerts = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(AtomicU64::new(0));
        let (a, al, sa) = (acked.clone(), alerts.clone(), subacks.clone());
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        sa.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Ok(e) = AlertEvent::decode(&p.payload) {
                            al.lock().expect("alerts lock").push(e);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        Mqtt {
            client,
            acked,
            alerts,
            subacks,
        }
    }

    /// Subscribes to the alerts of `owner` and waits for the broker's SUBACK: from then on
    /// no alert event can pass unseen.
    pub(crate) async fn subscribe_alerts(&self, owner: &str) {
        let before = self.subacks.load(Ordering::SeqCst);
        self.client
            .subscribe(format!("calwatch/v1/alerts/{owner}/#"), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.subacks.load(Ordering::SeqCst) <= before {
            assert!(
                Instant::now() < deadline,
                "no SUBACK for the alerts of {owner}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) async fn publish_batch(&self, agent: &str, payload: Vec<u8>) {
        let topic = readings_topic(&Id::new(agent).expect("agent"));
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
    }

    /// The agent's last will as the broker would publish it (retained).
    pub(crate) async fn publish_offline(&self, agent: &str) {
        let id = Id::new(agent).expect("agent");
        let status = AgentStatus {
            agent: id.clone(),
            state: AgentState::Offline,
            version: "test".into(),
            devices: 1,
            spool_bytes: 0,
            ts: now_ms(),
            device_info: BTreeMap::new(),
            health: BTreeMap::new(),
            spool: None,
        };
        self.client
            .publish(status_topic(&id), QoS::AtLeastOnce, true, status.encode())
            .await
            .expect("publish status");
    }

    /// Clears a retained status.
    pub(crate) async fn clear_retained(&self, agent: &str) {
        let id = Id::new(agent).expect("agent");
        let _ = self
            .client
            .publish(status_topic(&id), QoS::AtLeastOnce, true, Vec::new())
            .await;
    }

    /// Waits until `n` publishes were acknowledged by the broker.
    pub(crate) async fn wait_acked(&self, n: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.acked.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "broker acked only {} of {n}",
                self.acked.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// (device, kind) of every `active` event received, with the ids seen for each.
    pub(crate) fn raised(&self) -> BTreeMap<(String, String), BTreeSet<String>> {
        let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for e in self.alerts.lock().expect("alerts lock").iter() {
            if e.state.as_str() == "active" {
                out.entry((e.device.to_string(), e.kind.as_str().to_string()))
                    .or_default()
                    .insert(e.id.clone());
            }
        }
        out
    }
}

/// One line of `calwatch-gateway state`.
pub(crate) fn state_dump(toml: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = run_to_end(
        &bin("calwatch-gateway"),
        &["state", "--config", toml.to_str().expect("utf-8 path")],
    );
    assert_eq!(code, 0, "state failed: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("state line is JSON"))
        .collect()
}

/// Waits until the committed state counts every reading the fleet sent, for every device;
/// `each` runs at every look (to sample the gateway's memory, say). The dump, or None.
pub(crate) async fn all_checked(
    fleet: &Fleet,
    toml: &Path,
    limit: Duration,
    mut each: impl FnMut(),
) -> Option<Vec<serde_json::Value>> {
    let want: BTreeMap<String, u64> = fleet
        .devices
        .iter()
        .map(|d| (d.id.clone(), fleet.sent(d)))
        .collect();
    let toml = toml.to_path_buf();
    calwatch_tests::eventually(limit, || {
        each();
        let (toml, want) = (toml.clone(), want.clone());
        async move {
            let dump = tokio::task::spawn_blocking(move || state_dump(&toml))
                .await
                .expect("state dump task");
            let done = want.iter().all(|(id, n)| {
                dump.iter()
                    .any(|l| l["device"] == id.as_str() && l["readings"] == *n)
            });
            done.then_some(dump)
        }
    })
    .await
}
