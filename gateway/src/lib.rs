//! calwatch gateway: ingest of agents' readings, the registry of instruments and their
//! certificates, and the time-series sinks.
//!
//! The data flows one way: [`ingest`] (decode, assignment, dedup) → [`sink`].
#![forbid(unsafe_code)]

pub mod alerts;
pub mod audit;
pub mod broker;
pub mod checks;
pub mod civil;
pub mod config;
pub mod demo;
pub mod ingest;
pub mod registry;
pub mod sink;
pub mod store;

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::GatewayConfig;
use crate::ingest::{Ingest, IngestError, IngestStats};
use crate::registry::{Registry, RegistryError};
use crate::sink::Sinks;

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

/// Runs the gateway until `shutdown` turns true.
pub async fn run(
    cfg: GatewayConfig,
    shutdown: watch::Receiver<bool>,
    stats: Arc<IngestStats>,
) -> Result<(), GatewayError> {
    let registry = Registry::open(&cfg.registry.path)?;
    tracing::info!(devices = registry.len(), registry = %cfg.registry.path.display(), sinks = cfg.sinks.len(), "gateway starting");
    let sinks = Sinks::start(&cfg.sinks);
    let ingest = Ingest::new(registry, stats);
    ingest::run(&cfg.mqtt, &cfg.client_id, ingest, sinks, shutdown).await?;
    Ok(())
}
