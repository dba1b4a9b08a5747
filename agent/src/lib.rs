//! calwatch edge agent: polls Modbus instruments and publishes their readings over MQTT.
//!
//! The data flows one way: [`poll`] (with [`plan`] and [`profile`] decoding) → [`publish`].
#![forbid(unsafe_code)]

pub mod config;
pub mod plan;
pub mod poll;
pub mod profile;
pub mod publish;
pub mod seq;
pub mod simulate;

/// Shared with the gateway, now in [`calwatch_protocol::node`]; re-exported so the old
/// `calwatch_agent::{backoff, mqtt, process, tomlfile}` paths keep working.
pub use calwatch_protocol::node::{backoff, mqtt, process, tomlfile};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::{AgentConfig, Transport};
use crate::poll::{LineCommand, LineContext, SharedHealth};
use crate::publish::{PublishError, PublishStats, Publisher};

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("sequence state in {dir}: {source}")]
    SeqState { dir: String, source: std::io::Error },
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("{0}")]
    SpoolConfig(String),
    #[error(transparent)]
    Spool(#[from] calwatch_spool::SpoolError),
}

/// Groups devices by line (shared transport).
fn lines(devices: &[config::DeviceConfig]) -> BTreeMap<Transport, Vec<config::DeviceConfig>> {
    let mut lines: BTreeMap<Transport, Vec<config::DeviceConfig>> = BTreeMap::new();
    for d in devices {
        lines
            .entry(d.transport.clone())
            .or_default()
            .push(d.clone());
    }
    lines
}

/// Runs the agent until `shutdown` turns true; returns after the last batch was handed
/// to the broker and the offline status was published. `reload` delivers new configs
/// (SIGHUP, changed file): the device list changes without touching unchanged devices.
pub async fn run(
    cfg: AgentConfig,
    shutdown: watch::Receiver<bool>,
    mut reload: mpsc::Receiver<AgentConfig>,
    stats: Arc<PublishStats>,
) -> Result<(), AgentError> {
    let (spool_cfg, fsync_every) = cfg.spool.spool().map_err(AgentError::SpoolConfig)?;
    let (spool, recovery) = calwatch_spool::Spool::open(spool_cfg.clone())?;
    for w in &recovery.warnings {
        tracing::warn!(spool = %cfg.spool.dir.display(), "{w}");
    }
    if recovery.records > 0 {
        tracing::info!(
            batches = recovery.records,
            "spool holds batches from before the restart; they are sent first"
        );
    }
    let seq_dir = cfg.spool.dir.join("seq");
    std::fs::create_dir_all(&seq_dir).map_err(|source| AgentError::SeqState {
        dir: seq_dir.display().to_string(),
        source,
    })?;
    let health = SharedHealth::default();
    let (tx, rx) = mpsc::channel(16_384);
    let cx = LineContext {
        seq_dir,
        out: tx,
        health: health.clone(),
        shutdown: shutdown.clone(),
    };
    let mut running: HashMap<Transport, mpsc::Sender<LineCommand>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut start_line =
        |transport: Transport,
         devs: Vec<config::DeviceConfig>,
         running: &mut HashMap<Transport, mpsc::Sender<LineCommand>>| {
            let (ctx, crx) = mpsc::channel(4);
            running.insert(transport.clone(), ctx);
            tasks.push(tokio::spawn(poll::run_line(
                transport,
                devs,
                crx,
                cx.clone(),
            )));
        };
    for (transport, devs) in lines(&cfg.devices) {
        start_line(transport, devs, &mut running);
    }
    tracing::info!(agent = %cfg.agent, devices = cfg.devices.len(), lines = running.len(), broker = %cfg.mqtt.url, "agent started");
    let (health_view, stats_view) = (health.clone(), stats.clone());
    let publisher = Publisher {
        agent: cfg.agent.clone(),
        mqtt: cfg.mqtt.clone(),
        batch: cfg.batch.clone(),
        publish: cfg.publish.clone(),
        devices: cfg.devices.len(),
        health,
        stats,
    };
    let publishing = tokio::spawn(publisher.run(spool, spool_cfg.full, fsync_every, rx));
    let stats_log = tokio::spawn(log_stats(health_view, stats_view, shutdown.clone()));
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            new = reload.recv() => {
                let Some(new) = new else { continue_without_reload(&mut stop).await; break };
                if new.agent != cfg.agent || new.mqtt.url != cfg.mqtt.url {
                    tracing::warn!("agent id and broker changes need a restart; applying the device list only");
                }
                let mut wanted = lines(&new.devices);
                for (transport, sender) in &running {
                    let devs = wanted.remove(transport).unwrap_or_default();
                    let _ = sender.send(LineCommand::Devices(devs)).await;
                }
                running.retain(|t, _| new.devices.iter().any(|d| &d.transport == t));
                for (transport, devs) in wanted {
                    start_line(transport, devs, &mut running);
                }
                tracing::info!(devices = new.devices.len(), lines = running.len(), "device list reloaded");
            }
            _ = stop.changed() => break,
        }
    }
    drop(running);
    drop(cx);
    for t in tasks {
        let _ = t.await;
    }
    stats_log.abort();
    match publishing.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "publisher task failed"),
    }
    Ok(())
}

/// Without a reload source, just wait for shutdown.
async fn continue_without_reload(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// How often the agent logs its counters.
pub const STATS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs the agent's counters every [`STATS_EVERY`]: an operator sees at a glance whether
/// polling and delivery are keeping up.
async fn log_stats(
    health: SharedHealth,
    stats: Arc<PublishStats>,
    mut stop: watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tick = tokio::time::interval(STATS_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let (polled, failing) = match health.lock() {
            Ok(h) => (
                h.readings.values().sum::<u64>(),
                h.health
                    .values()
                    .filter(|d| d.consecutive_failures > 0)
                    .count(),
            ),
            Err(_) => (0, 0),
        };
        tracing::info!(
            "agent stats: readings_polled={polled} devices_failing={failing} batches_spooled={} batches_sent={} batches_acked={} batches_rejected={} readings_rejected={}",
            stats.batches_spooled.load(Relaxed),
            stats.batches_sent.load(Relaxed),
            stats.batches_acked.load(Relaxed),
            stats.batches_rejected.load(Relaxed),
            stats.readings_rejected.load(Relaxed),
        );
    }
}
