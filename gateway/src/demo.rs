//! `calwatch-gateway demo`: a small city on embedded defaults, nothing to install.
//!
//! An embedded MQTT broker (cargo feature `embedded-broker`, on by default), 101 simulated
//! instruments at seven sites (three markets with retail scales, a grain-purchase station,
//! two filling stations, a factory's energy meters: `config/fleet/demo.toml`) served over
//! real Modbus TCP with faults developing over the first minutes (drift, a broken seal, a
//! cheating dispenser, a re-adjusted k-factor, a meter going silent), one in-process agent
//! per site polling them, and the gateway with the city's registry
//! (`config/registry/city-*.csv`, certificate dates moved so that "today" is today: a few
//! overdue, due soon, failed, one never verified). It prints a banner (console URL, a
//! supervisor token), then every alert event as a readable line on standard output, and
//! serves the console. Simulated time runs `speed` times faster (default 10), so the
//! cheating dispenser's fifth short sale comes within a minute.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use calwatch_agent::config::AgentConfig;
use calwatch_agent::simulate::{self, Fleet};
use calwatch_protocol::{AlertEvent, AlertState};
use tokio::sync::watch;

use crate::config::GatewayConfig;
use crate::persist::registry::Registry;
use crate::Gateway;

const PROFILES: [(&str, &str); 3] = [
    (
        "ft112.toml",
        include_str!("../../config/profiles/ft112.toml"),
    ),
    (
        "sdm630.toml",
        include_str!("../../config/profiles/sdm630.toml"),
    ),
    (
        "dispenser-fcc.toml",
        include_str!("../../config/profiles/dispenser-fcc.toml"),
    ),
];
const FLEET: &str = include_str!("../../config/fleet/demo.toml");
const DEVICES_CSV: &str = include_str!("../../config/registry/city-devices.csv");
const VERIFICATIONS_CSV: &str = include_str!("../../config/registry/city-verifications.csv");
/// The day the city's certificate dates were written for; the demo moves them by the days
/// since, so the same instruments are overdue or due soon whenever it runs.
const REGISTRY_TODAY: (i64, u32, u32) = (2026, 11, 29);
const DAY_MS: i64 = 86_400_000;

/// How to run the demo.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Working directory (registry, spools, queues, generated configs).
    pub dir: PathBuf,
    /// Simulated seconds per second.
    pub speed: f64,
    /// Console and API address; when taken, a free port is used instead.
    pub http: String,
    /// An external broker instead of the embedded one.
    pub mqtt_url: Option<String>,
    /// `[[sink]]` tables to add (e.g. a real InfluxDB).
    pub sinks: String,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("{0}")]
    Setup(String),
}

fn setup(e: impl std::fmt::Display) -> DemoError {
    DemoError::Setup(e.to_string())
}

fn free_port() -> Result<SocketAddr, DemoError> {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| DemoError::Setup(format!("no free port: {e}")))
}

/// The city's certificates with every date moved by `days` (calendar days: a date stays a
/// date, whatever zone it is later read in).
pub fn shift_certificates(csv_text: &str, days: i64) -> Result<String, DemoError> {
    let utc = crate::domain::civil::Zone::utc();
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let headers = reader.headers().map_err(setup)?.clone();
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(&headers).map_err(setup)?;
    for record in reader.records() {
        let record = record.map_err(setup)?;
        let mut row: Vec<String> = record.iter().map(str::to_string).collect();
        for (i, name) in headers.iter().enumerate() {
            if (name == "verified_at" || name == "valid_until") && !row[i].is_empty() {
                let at = crate::domain::civil::parse_iso8601(&row[i])
                    .map_err(setup)?
                    .start_ms(&utc);
                row[i] = crate::domain::civil::format_date(at + days * DAY_MS);
            }
        }
        writer.write_record(&row).map_err(setup)?;
    }
    String::from_utf8(writer.into_inner().map_err(setup)?).map_err(setup)
}

/// Days from the registry's "today" to now.
fn days_since_registry() -> i64 {
    let (y, m, d) = REGISTRY_TODAY;
    crate::domain::now_ms().div_euclid(DAY_MS) - crate::domain::civil::days_from_civil(y, m, d)
}

/// One device of the city: its agent, profile file, simulator port (of the fleet file)
/// and unit id, from the registry row (serials end in port and unit: `FT5021007`).
struct CityDevice {
    id: String,
    agent: String,
    profile: &'static str,
    port: u16,
    unit: u8,
}

fn city_devices() -> Result<Vec<CityDevice>, DemoError> {
    let mut reader = csv::Reader::from_reader(DEVICES_CSV.as_bytes());
    let mut out = Vec::new();
    for record in reader.deserialize::<BTreeMap<String, String>>() {
        let row = record.map_err(setup)?;
        let get = |k: &str| row.get(k).cloned().unwrap_or_default();
        let serial = get("serial");
        let digits: String = serial.chars().filter(char::is_ascii_digit).collect();
        let (port, unit) = digits.split_at(digits.len().saturating_sub(3));
        let profile = match get("kind").as_str() {
            "scale" => "ft112.toml",
            "dispenser" => "dispenser-fcc.toml",
            "energy_meter" => "sdm630.toml",
            other => return Err(setup(format!("demo registry: kind {other}"))),
        };
        out.push(CityDevice {
            id: get("id"),
            agent: get("agent"),
            profile,
            port: port
                .parse()
                .map_err(|_| setup(format!("serial {serial}")))?,
            unit: unit
                .parse()
                .map_err(|_| setup(format!("serial {serial}")))?,
        });
    }
    Ok(out)
}

/// Runs the demo until `shutdown` turns true.
pub async fn run(opts: DemoOptions, shutdown: watch::Receiver<bool>) -> Result<(), DemoError> {
    let dir = opts.dir.as_path();
    let io = |e| DemoError::Dir(dir.to_path_buf(), e);
    std::fs::create_dir_all(dir.join("profiles")).map_err(io)?;
    std::fs::create_dir_all(dir.join("fleet")).map_err(io)?;
    for (name, text) in PROFILES {
        std::fs::write(dir.join("profiles").join(name), text).map_err(io)?;
    }
    std::fs::write(dir.join("fleet/demo.toml"), FLEET).map_err(io)?;
    let registry_path = dir.join("registry.db");
    let fresh = !registry_path.exists();
    let token = {
        let mut reg = Registry::open(&registry_path).map_err(setup)?;
        if fresh {
            let certs = shift_certificates(VERIFICATIONS_CSV, days_since_registry())?;
            reg.import_devices(Path::new("city-devices.csv"), DEVICES_CSV, "demo")
                .map_err(setup)?;
            // The demo's gateway.toml (below) sets no `[checks] timezone`: UTC days.
            reg.import_verifications(
                Path::new("city-verifications.csv"),
                &certs,
                "demo",
                &crate::domain::civil::Zone::default(),
            )
            .map_err(setup)?;
        }
        let name = format!("demo-supervisor-{}", crate::domain::now_ms());
        crate::persist::tokens::create(
            &mut reg,
            &name,
            crate::persist::tokens::Role::Supervisor,
            None,
            "demo",
        )
        .map_err(setup)?
    };

    let mqtt_url = match &opts.mqtt_url {
        Some(u) => u.clone(),
        None => start_embedded_broker().await?,
    };

    // The fleet, each site on a free port, `speed` times faster.
    let mut fleet = Fleet::load(&dir.join("fleet/demo.toml")).map_err(setup)?;
    fleet.speed = opts.speed;
    let mut ports: BTreeMap<u16, SocketAddr> = BTreeMap::new();
    for g in &fleet.groups {
        if let std::collections::btree_map::Entry::Vacant(e) = ports.entry(g.listen.port()) {
            e.insert(free_port()?);
        }
    }
    for g in &mut fleet.groups {
        g.listen = ports[&g.listen.port()];
    }
    let bound = simulate::bind(&fleet).await.map_err(setup)?;
    let instruments: usize = fleet.groups.iter().map(|g| usize::from(g.count)).sum();
    tokio::spawn(async move {
        if let Err(e) = simulate::serve_all(bound).await {
            tracing::error!(error = %e, "demo simulator stopped");
        }
    });

    // One agent per site.
    let mut by_agent: BTreeMap<String, Vec<CityDevice>> = BTreeMap::new();
    for d in city_devices()? {
        by_agent.entry(d.agent.clone()).or_default().push(d);
    }
    let sites = by_agent.len();
    let mut agents = Vec::new();
    for (agent, devices) in by_agent {
        let mut text = format!(
            "agent = \"{agent}\"\n[mqtt]\nurl = \"{mqtt_url}\"\n[spool]\ndir = \"spool-{agent}\"\n[batch]\nlinger_ms = 200\n"
        );
        for d in devices {
            let addr = ports
                .get(&d.port)
                .ok_or_else(|| setup(format!("{}: no simulator on port {}", d.id, d.port)))?;
            text.push_str(&format!(
                "\n[[device]]\nid = \"{}\"\nprofile = \"profiles/{}\"\naddress = \"{addr}\"\nunit = {}\ninterval_ms = 1000\n",
                d.id, d.profile, d.unit
            ));
        }
        let agent_toml = dir.join(format!("{agent}.toml"));
        std::fs::write(&agent_toml, text).map_err(io)?;
        let cfg = AgentConfig::load(&agent_toml).map_err(setup)?;
        let stop = shutdown.clone();
        agents.push(tokio::spawn(async move {
            let (_reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
            if let Err(e) = calwatch_agent::run(cfg, stop, reload_rx, Arc::default()).await {
                tracing::error!(error = %e, "demo agent stopped");
            }
        }));
    }

    let http = match StdListener::bind(&opts.http) {
        Ok(l) => {
            drop(l);
            opts.http.clone()
        }
        Err(_) => "127.0.0.1:0".to_string(),
    };
    let gateway_toml = dir.join("gateway.toml");
    std::fs::write(
        &gateway_toml,
        format!(
            "client_id = \"calwatch-demo-gateway\"\n[mqtt]\nurl = \"{mqtt_url}\"\n[registry]\npath = \"registry.db\"\n\
             [http]\nlisten = \"{http}\"\n[sweep]\ninterval_s = 5\n{}",
            opts.sinks
        ),
    )
    .map_err(io)?;
    let cfg = GatewayConfig::load(&gateway_toml).map_err(setup)?;
    let gateway = Gateway::start(cfg, shutdown.clone()).await.map_err(setup)?;
    let mut alerts = gateway.subscribe_alerts();
    let url = gateway.console_url();
    println!(
        "\ncalwatch demo: {instruments} simulated instruments at {sites} sites, time running {}x\n\
         \n  console          {url}#token={token}\n  supervisor token {token}\n  \
         API              curl -H 'Authorization: Bearer {token}' {url}api/alerts\n  \
         MQTT             {mqtt_url}\n  working dir      {}\n\
         \nAlerts follow as they happen (Ctrl-C stops):",
        opts.speed,
        dir.display()
    );
    let printer = tokio::spawn(async move {
        loop {
            match alerts.recv().await {
                Ok(e) => println!("{}", alert_line(&e.event)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    println!("  ... {n} alert events not shown (too many at once; see the console)")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    let report = {
        let metrics = gateway.metrics();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => eprintln!(
                        "demo: {} readings checked in {} batches",
                        metrics.readings_checked.load(Ordering::Relaxed),
                        metrics.batches.load(Ordering::Relaxed),
                    ),
                    _ = stop.changed() => break,
                }
            }
        })
    };
    let result = gateway.wait().await;
    for a in agents {
        let _ = a.await;
    }
    report.abort();
    printer.abort();
    result.map_err(setup)
}

#[cfg(feature = "embedded-broker")]
async fn start_embedded_broker() -> Result<String, DemoError> {
    let addr = free_port()?;
    crate::broker::start(addr).map_err(setup)?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(format!("mqtt://{addr}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(setup(format!("embedded broker did not listen on {addr}")))
}

#[cfg(not(feature = "embedded-broker"))]
async fn start_embedded_broker() -> Result<String, DemoError> {
    Err(setup(
        "this build has no embedded broker (cargo feature embedded-broker); pass --mqtt-url",
    ))
}

/// `12:00:03  critical  overdue             HS-MKE-019  hs-market-east/market-east  message`,
/// with the state when it is not `active`.
pub fn alert_line(e: &AlertEvent) -> String {
    let t = crate::domain::civil::format_timestamp(e.updated);
    let state = match e.state {
        AlertState::Active => String::new(),
        other => format!(" [{}]", other.as_str()),
    };
    format!(
        "{}  {:<8}  {:<19} {:<11} {}/{}  {}{state}  ({})",
        &t[11..19],
        e.severity.as_str(),
        e.kind.as_str(),
        e.device,
        e.owner,
        e.site,
        e.message,
        e.id
    )
}

/// The alerts the demo's registry and fleet must raise, as (device, kind), and the kinds a
/// drifting instrument may add, for the demo's test and anyone checking a run by hand.
pub fn expected_alerts(speed: f64, seconds: f64) -> (BTreeSet<(String, String)>, BTreeSet<String>) {
    let t = |s: &str, k: &str| (s.to_string(), k.to_string());
    let mut must = BTreeSet::from([
        t("HS-MKE-019", "overdue"),
        t("HS-MKN-008", "overdue"),
        t("HS-S17-008", "overdue"),
        t("HS-MKW-025", "failed_verification"),
        t("HS-MKN-020", "unverified"),
        t("HS-MKE-004", "due_soon"),
        t("HS-MKW-011", "due_soon"),
        t("HS-MKN-013", "due_soon"),
        t("HS-S21-005", "due_soon"),
        t("HS-S21-006", "due_soon"),
        t("HS-WK2-010", "due_soon"),
    ]);
    // When each fault is in force (fleet file, simulated s) plus time to be seen: the next
    // poll, the fifth short sale (a car every 90 s), three intervals (5 s) of silence.
    let sim = speed * seconds;
    if sim > 120.0 + 2.0 * speed {
        must.insert(t("HS-MKW-003", "seal_broken"));
    }
    if sim > 240.0 + 2.0 * speed {
        must.insert(t("HS-S21-002", "param_changed"));
    }
    if sim > 180.0 + 20.0 * speed {
        must.insert(t("HS-WK2-006", "offline"));
    }
    if sim > 90.0 + 6.0 * 90.0 {
        must.insert(t("HS-S17-004", "cheating_suspected"));
    }
    // Drifting instruments may be caught (drift, out_of_tolerance) depending on how far
    // they went; nothing else may raise anything.
    let may = BTreeSet::from(["HS-MKE-007".to_string(), "HS-WK2-009".to_string()]);
    (must, may)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_move_with_today_and_devices_map_to_the_fleet() {
        let moved = shift_certificates(VERIFICATIONS_CSV, 3).unwrap();
        assert!(
            moved.contains("HS-MKE-019,JJG539-2025-0019,2025-11-11,2026-11-10,pass"),
            "{moved}"
        );
        assert_eq!(moved.lines().count(), VERIFICATIONS_CSV.lines().count());
        let devices = city_devices().unwrap();
        assert_eq!(devices.len(), 101);
        let d = devices.iter().find(|d| d.id == "HS-MKE-007").unwrap();
        assert_eq!((d.port, d.unit, d.profile), (5021, 7, "ft112.toml"));
        // Every registered device is a unit the fleet serves, with the right profile.
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/fleet/demo.toml");
        let fleet = Fleet::load(&file).unwrap();
        for d in &devices {
            let g = fleet
                .groups
                .iter()
                .find(|g| g.listen.port() == d.port && g.units().contains(&d.unit))
                .unwrap_or_else(|| panic!("{}: no simulated unit {} on {}", d.id, d.unit, d.port));
            use calwatch_agent::profile::InstrumentKind;
            let want = match d.profile {
                "ft112.toml" => InstrumentKind::Scale,
                "dispenser-fcc.toml" => InstrumentKind::Dispenser,
                _ => InstrumentKind::EnergyMeter,
            };
            assert_eq!(g.profile.kind, want, "{}", d.id);
        }
        let served: usize = fleet.groups.iter().map(|g| usize::from(g.count)).sum();
        assert_eq!(served, devices.len());
    }
}
