//! calwatch gateway: ingest of agents' readings, the registry of instruments and their
//! certificates, the checks and the alert lifecycle, and the time-series sinks.
//!
//! The data flows one way (the README's "Architecture of the gateway" names each module's
//! job): [`source`] (agents' messages with ack handles) → [`pipeline`] (pure: decode,
//! assignment, dedup, [`checks`], [`alerts`], [`series`] points) → durable ([`sink`] queues,
//! the state commit in [`persist`]) → ack and publish, all ordered by [`ingest`]. The domain
//! model the checks judge by is [`domain`]; [`api`] serves the HTTP API and the console.
#![forbid(unsafe_code)]

pub mod admin;
mod alerts;
mod api;
#[doc(hidden)]
pub mod bench;
#[cfg(feature = "embedded-broker")]
mod broker;
mod checks;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
mod domain;
mod health;
mod ingest;
mod metrics;
mod persist;
mod pipeline;
mod series;
mod sink;
mod source;
mod systemd;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use calwatch_protocol::AlertEvent;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::alerts::AlertBook;
use crate::config::GatewayConfig;
use crate::ingest::{Core, IngestError, IngestTask};
use crate::metrics::Metrics;
use crate::persist::registry::{Registry, RegistryError};
use crate::persist::state::{AlertReader, StateStore, StoreError};
use crate::pipeline::Pipeline;
use crate::sink::{QueueError, Queues};
use crate::source::mqtt::MqttSource;

/// How long a stopping gateway waits for its queues to be written.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Alert events buffered for slow in-process subscribers (they see `Lagged` beyond).
const ALERT_BROADCAST: usize = 4096;

/// API requests waiting for the ingest task.
const COMMANDS: usize = 256;

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Http(#[from] api::ServeError),
}

/// An alert event as published, with its `alert_log` seq (the SSE event id; 0 for events
/// republished from the outbox after a crash, which a reconnecting client replays from the log).
#[derive(Clone, Debug)]
pub(crate) struct LoggedAlert {
    pub(crate) seq: i64,
    pub(crate) event: AlertEvent,
}

/// A running gateway: its counters and its alert stream, for the HTTP API and the console.
pub struct Gateway {
    #[cfg(feature = "demo")]
    metrics: Arc<Metrics>,
    #[cfg(feature = "demo")]
    alerts: broadcast::Sender<LoggedAlert>,
    http: SocketAddr,
    https: bool,
    task: JoinHandle<Result<(), GatewayError>>,
}

impl Gateway {
    /// Opens the registry, the state store and the sink queues, and starts ingest, the sweep
    /// and one writer per sink. It runs until `shutdown` turns true.
    pub async fn start(
        cfg: GatewayConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Gateway, GatewayError> {
        let registry = Registry::open(&cfg.registry.path)?;
        let store = StateStore::open(&cfg.registry.path)?;
        let saved = store.load_devices()?;
        let agents = store.load_agents()?;
        let (open, next_id) = store.load_alerts()?;
        let queues = Arc::new(Queues::open(&cfg.sinks, &cfg.queue)?);
        let metrics = Arc::new(Metrics::new(
            queues.targets.iter().map(|q| q.metrics.clone()).collect(),
        ));
        tracing::info!(
            devices = registry.len(),
            states = saved.len(),
            open_alerts = open.len(),
            next_alert = next_id,
            registry = %cfg.registry.path.display(),
            queue = %cfg.queue.dir.display(),
            sinks = cfg.sinks.len(),
            "gateway starting"
        );
        let book = AlertBook::new(cfg.hold_ms, next_id, open);
        let pipeline = Pipeline::new(
            registry.devices().clone(),
            saved,
            book,
            cfg.checks.clone(),
            metrics.clone(),
        );
        let mut pipeline = pipeline;
        pipeline.restore_agents(agents, domain::now_ms());
        let core = Core::new(pipeline, registry, store, queues.clone());
        let (alerts, _) = broadcast::channel(ALERT_BROADCAST);
        let (commands, commands_rx) = mpsc::channel(COMMANDS);

        let api_state = Arc::new(api::ApiState {
            auth: persist::tokens::Authenticator::open(&cfg.registry.path)
                .map_err(|e| GatewayError::Store(StoreError::Db(e)))?,
            alerts: std::sync::Mutex::new(AlertReader::open(&cfg.registry.path)?),
            registry_path: cfg.registry.path.clone(),
            commands: commands.clone(),
            stream: alerts.clone(),
            metrics: metrics.clone(),
            metrics_public: cfg.http.metrics_public,
            shutdown: shutdown.clone(),
            stall_after: cfg.ingest.stall_after,
            streams: Default::default(),
            refusals: Default::default(),
            zone: cfg.checks.timezone.clone(),
        });
        let server = api::serve(&cfg.http, api_state).await?;
        tracing::info!(
            addr = %server.addr,
            https = server.https,
            "HTTP API and console listening"
        );
        let checkpointer =
            crate::persist::state::Checkpointer::spawn(&cfg.registry.path, shutdown.clone())?;
        let (stop_writers, writers_stop) = watch::channel(false);
        let writers = sink::start_writers(&cfg.sinks, &queues, writers_stop);
        tokio::spawn(systemd::run(
            metrics.clone(),
            cfg.ingest.stall_after,
            shutdown.clone(),
        ));
        let source = MqttSource::start(
            &cfg.mqtt,
            &cfg.client_id,
            cfg.ingest.max_pending,
            metrics.clone(),
            shutdown.clone(),
        )
        .map_err(IngestError::Settings)?;
        let ingest = tokio::spawn(ingest::run(IngestTask {
            source,
            core,
            alerts: alerts.clone(),
            commands: commands_rx,
            sweep_interval: cfg.sweep_interval,
            shutdown,
        }));
        let (http, https) = (server.addr, server.https);
        let task = tokio::spawn(async move {
            let result = match ingest.await {
                Ok(r) => r.map_err(GatewayError::from),
                Err(e) => Err(GatewayError::Ingest(IngestError::Task(e.to_string()))),
            };
            // Give the writers a moment to empty the queues; what is left is written after
            // the next start.
            let deadline = Instant::now() + DRAIN_GRACE;
            while Instant::now() < deadline {
                let q = queues.clone();
                let drained = tokio::task::spawn_blocking(move || q.drained())
                    .await
                    .unwrap_or(true);
                if drained {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = stop_writers.send(true);
            for w in writers {
                let _ = w.await;
            }
            // Open SSE streams end with the shutdown signal; give them a moment.
            let _ = tokio::time::timeout(Duration::from_secs(2), server.task).await;
            let _ = tokio::task::spawn_blocking(move || checkpointer.join()).await;
            result
        });
        Ok(Gateway {
            #[cfg(feature = "demo")]
            metrics,
            #[cfg(feature = "demo")]
            alerts,
            http,
            https,
            task,
        })
    }

    /// Where the HTTP API and console listen.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// The console's URL.
    pub fn console_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/", self.http)
    }

    /// The gateway's counters.
    #[cfg(feature = "demo")]
    pub(crate) fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Alert events as they are published (after they were made durable), for the SSE
    /// stream and the console.
    #[cfg(feature = "demo")]
    pub(crate) fn subscribe_alerts(&self) -> broadcast::Receiver<LoggedAlert> {
        self.alerts.subscribe()
    }

    /// Waits until the gateway stopped.
    pub async fn wait(self) -> Result<(), GatewayError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(GatewayError::Ingest(IngestError::Task(e.to_string()))),
        }
    }
}

/// Runs the gateway until `shutdown` turns true.
pub async fn run(cfg: GatewayConfig, shutdown: watch::Receiver<bool>) -> Result<(), GatewayError> {
    Gateway::start(cfg, shutdown).await?.wait().await
}
