//! `calwatch-gateway demo`: the whole chain on embedded defaults, nothing to install.
//!
//! An embedded MQTT broker, simulated instruments (a scale, an energy meter, a dispenser)
//! served over real Modbus TCP, one agent per site polling them, and the gateway with a
//! registry of those instruments, writing line protocol to standard output and its alerts,
//! one readable line each, to standard error.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use calwatch_agent::config::AgentConfig;
use calwatch_agent::profile::Profile;
use calwatch_agent::simulate::{self, Simulator};
use tokio::sync::watch;

use calwatch_protocol::{AlertEvent, AlertState};

use crate::config::GatewayConfig;
use crate::registry::Registry;
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
const DEVICES_CSV: &str = include_str!("../../config/registry/devices.csv");
const VERIFICATIONS_CSV: &str = include_str!("../../config/registry/verifications.csv");

/// (agent, device, profile file) of the demo sites; matches config/registry/devices.csv.
const SITES: [(&str, &str, &str); 3] = [
    ("market-3-agent", "HS-SCL-0001", "ft112.toml"),
    ("works-2-agent", "HS-MTR-0007", "sdm630.toml"),
    ("station-17", "HS-DSP-0042", "dispenser-fcc.toml"),
];

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    #[error("{0}")]
    Setup(String),
}

fn free_port() -> Result<SocketAddr, DemoError> {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| DemoError::Setup(format!("no free port: {e}")))
}

/// Runs the demo in `dir` until `shutdown` turns true.
pub async fn run(dir: &Path, shutdown: watch::Receiver<bool>) -> Result<(), DemoError> {
    let io = |e| DemoError::Dir(dir.to_path_buf(), e);
    std::fs::create_dir_all(dir.join("profiles")).map_err(io)?;
    for (name, text) in PROFILES {
        std::fs::write(dir.join("profiles").join(name), text).map_err(io)?;
    }
    let registry_path = dir.join("registry.db");
    {
        let mut reg =
            Registry::open(&registry_path).map_err(|e| DemoError::Setup(e.to_string()))?;
        reg.import_devices(Path::new("devices.csv"), DEVICES_CSV, "demo")
            .map_err(|e| DemoError::Setup(e.to_string()))?;
        reg.import_verifications(Path::new("verifications.csv"), VERIFICATIONS_CSV, "demo")
            .map_err(|e| DemoError::Setup(e.to_string()))?;
    }

    let broker_addr = free_port()?;
    crate::broker::start(broker_addr).map_err(|e| DemoError::Setup(e.to_string()))?;
    wait_for_port(broker_addr).await?;
    eprintln!("demo: embedded MQTT broker on {broker_addr}");

    let mut agents = Vec::new();
    for (agent, device, profile_file) in SITES {
        let profile_path = dir.join("profiles").join(profile_file);
        let profile = Profile::load(&profile_path).map_err(|e| DemoError::Setup(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| DemoError::Setup(format!("simulator: {e}")))?;
        let sim_addr = listener
            .local_addr()
            .map_err(|e| DemoError::Setup(e.to_string()))?;
        eprintln!(
            "demo: simulated {} ({}) on Modbus TCP {sim_addr}",
            device, profile.model
        );
        tokio::spawn(simulate::serve(listener, Simulator::new(profile, 1)));
        let agent_toml = dir.join(format!("{agent}.toml"));
        let text = format!(
            "agent = \"{agent}\"\n[mqtt]\nurl = \"mqtt://{broker_addr}\"\n[spool]\ndir = \"spool-{agent}\"\n\
             [batch]\nlinger_ms = 1000\n\
             [[device]]\nid = \"{device}\"\nprofile = \"profiles/{profile_file}\"\naddress = \"{sim_addr}\"\ninterval_ms = 1000\n"
        );
        std::fs::write(&agent_toml, text).map_err(io)?;
        let cfg = AgentConfig::load(&agent_toml).map_err(|e| DemoError::Setup(e.to_string()))?;
        let stop = shutdown.clone();
        agents.push(tokio::spawn(async move {
            let (_reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
            if let Err(e) = calwatch_agent::run(cfg, stop, reload_rx, Arc::default()).await {
                tracing::error!(error = %e, "demo agent stopped");
            }
        }));
    }

    let gateway_toml = dir.join("gateway.toml");
    std::fs::write(
        &gateway_toml,
        format!(
            "[mqtt]\nurl = \"mqtt://{broker_addr}\"\n[registry]\npath = \"registry.db\"\n[http]\nlisten = \"127.0.0.1:0\"\n[sweep]\ninterval_s = 10\n\
             [[sink]]\nkind = \"stdout\"\n"
        ),
    )
    .map_err(io)?;
    let cfg = GatewayConfig::load(&gateway_toml).map_err(|e| DemoError::Setup(e.to_string()))?;
    eprintln!("demo: gateway ingesting; readings follow as InfluxDB line protocol, alerts as ALERT lines (Ctrl-C stops)");
    let gateway = Gateway::start(cfg, shutdown.clone())
        .await
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let mut alerts = gateway.subscribe_alerts();
    let printer = tokio::spawn(async move {
        loop {
            match alerts.recv().await {
                Ok(e) => eprintln!("{}", alert_line(&e.event)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("demo: {n} alert events not shown (too many at once)")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    let report = {
        let metrics = gateway.metrics();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => eprintln!(
                        "demo: {} readings checked in {} batches, {} duplicates",
                        metrics.readings_checked.load(Ordering::Relaxed),
                        metrics.batches.load(Ordering::Relaxed),
                        metrics.duplicates.load(Ordering::Relaxed)
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
    result.map_err(|e| DemoError::Setup(e.to_string()))
}

/// `ALERT a-000003 critical seal_broken HS-SCL-0001 (market-3/stall-12): message`; the state
/// follows the kind when it is not `active`.
pub fn alert_line(e: &AlertEvent) -> String {
    let state = match e.state {
        AlertState::Active => String::new(),
        other => format!(" {}", other.as_str()),
    };
    format!(
        "ALERT {} {} {}{state} {} ({}/{}): {}",
        e.id,
        e.severity.as_str(),
        e.kind.as_str(),
        e.device,
        e.owner,
        e.site,
        e.message
    )
}

async fn wait_for_port(addr: SocketAddr) -> Result<(), DemoError> {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(DemoError::Setup(format!(
        "embedded broker did not listen on {addr}"
    )))
}
