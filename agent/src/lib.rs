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

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::AgentConfig;
use crate::poll::SharedHealth;
use crate::publish::{PublishError, PublishStats, Publisher};
use crate::seq::SeqCounter;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("sequence state in {dir}: {source}")]
    SeqState { dir: String, source: std::io::Error },
    #[error(transparent)]
    Publish(#[from] PublishError),
}

/// Runs the agent until `shutdown` turns true; returns after the last batch was handed
/// to the broker and the offline status was published.
pub async fn run(
    cfg: AgentConfig,
    shutdown: watch::Receiver<bool>,
    stats: Arc<PublishStats>,
) -> Result<(), AgentError> {
    let seq_dir = cfg.spool.dir.join("seq");
    let health = SharedHealth::default();
    let (tx, rx) = mpsc::channel(16_384);
    let mut pollers = Vec::with_capacity(cfg.devices.len());
    for dev in cfg.devices.iter().cloned() {
        let seq = SeqCounter::open(&seq_dir, &dev.id).map_err(|source| AgentError::SeqState {
            dir: seq_dir.display().to_string(),
            source,
        })?;
        pollers.push(tokio::spawn(poll::run_device(
            dev,
            seq,
            tx.clone(),
            health.clone(),
            shutdown.clone(),
        )));
    }
    drop(tx);
    tracing::info!(agent = %cfg.agent, devices = cfg.devices.len(), broker = %cfg.mqtt.url, "agent started");
    let publisher = Publisher {
        agent: cfg.agent.clone(),
        mqtt: cfg.mqtt.clone(),
        batch: cfg.batch.clone(),
        devices: cfg.devices.len(),
        health,
        stats,
    };
    publisher.run(rx).await?;
    for p in pollers {
        let _ = p.await;
    }
    Ok(())
}
