//! calwatch edge agent: polls Modbus instruments and publishes their readings over MQTT.
//!
//! The data flows one way: [`poll`] (with [`plan`] and [`profile`] decoding) → [`publish`].
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod mqtt;
pub mod plan;
pub mod poll;
pub mod profile;
pub mod publish;
pub mod seq;
pub mod simulate;
pub mod tomlfile;

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
}

/// Groups devices by line (shared transport).
fn lines(devices: &[config::DeviceConfig]) -> BTreeMap<Transport, Vec<config::DeviceConfig>> {
    let mut lines: BTreeMap<Transport, Vec<config::DeviceConfig>> = BTreeMap::new();
    for d in devices {
        lines.entry(d.transport.clone()).or_default().push(d.clone());
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
    let seq_dir = cfg.spool.dir.join("seq");
    std::fs::create_dir_all(&seq_dir).map_err(|source| AgentError::SeqState { dir: seq_dir.display().to_string(), source })?;
    let health = SharedHealth::default();
    let (tx, rx) = mpsc::channel(16_384);
    let cx = LineContext { seq_dir, out: tx, health: health.clone(), shutdown: shutdown.clone() };
    let mut running: HashMap<Transport, mpsc::Sender<LineCommand>> = HashMap::new();
    let mut tasks = Vec::new();
    let mut start_line = |transport: Transport, devs: Vec<config::DeviceConfig>, running: &mut HashMap<Transport, mpsc::Sender<LineCommand>>| {
        let (ctx, crx) = mpsc::channel(4);
        running.insert(transport.clone(), ctx);
        tasks.push(tokio::spawn(poll::run_line(transport, devs, crx, cx.clone())));
    };
    for (transport, devs) in lines(&cfg.devices) {
        start_line(transport, devs, &mut running);
    }
    tracing::info!(agent = %cfg.agent, devices = cfg.devices.len(), lines = running.len(), broker = %cfg.mqtt.url, "agent started");
    let publisher = Publisher {
        agent: cfg.agent.clone(),
        mqtt: cfg.mqtt.clone(),
        batch: cfg.batch.clone(),
        devices: cfg.devices.len(),
        health,
        stats,
    };
    let publishing = tokio::spawn(publisher.run(rx));
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
