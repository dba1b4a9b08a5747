//! Ingest: a [`Source`] of agents' messages → the [`Pipeline`] (decode, assignment, dedup,
//! checks, alert lifecycle, points) → durable (the sinks' queues, the state commit) → ack and
//! publish. This module owns the order of those steps and every wait between them.
//!
//! # Durability order
//!
//! DESIGN: "the gateway acks an MQTT message only after its readings are checked and handed
//! to the sink's durable queue". The source redelivers whatever the gateway did not ack, also
//! across a gateway restart (for MQTT a persistent session with manual acks). Messages are taken in bursts (what is ready, up to
//! [`BURST_MESSAGES`] messages or [`BURST_BYTES`] of payload) and each burst goes through:
//!
//! 1. **process in memory** ([`Pipeline`]): decode, assignment, dedup against the device's
//!    `last_seq`, the checks, the alert lifecycle, line protocol for the readings and the
//!    alert events;
//! 2. **queue**: append the burst's line protocol to *every* sink target's spool and `sync()`
//!    it (a full spool blocks here: backpressure, never a drop);
//! 3. **commit**: the changed device states (with `last_seq`, gaps, readings checked), the
//!    changed alerts, the next alert id, the audit entries of the alert transitions and the
//!    transitions themselves (the outbox) in *one* SQLite transaction;
//! 4. **ack** the burst's messages;
//! 5. **publish** the alert events on `calwatch/v1/alerts/{owner}/{device}` through the
//!    source and broadcast them in-process; their outbox rows are deleted by a later commit,
//!    once the transport confirmed them ([`Source::confirmed`]).
//!
//! A crash at any point loses nothing acked, and checks nothing twice:
//! - before 2 completes: nothing is durable; the broker redelivers the burst and the restarted
//!   gateway processes it from the committed state, exactly as the first time.
//! - after 2, before 3: the queues hold the burst's points but the state does not know them.
//!   Redelivered, the burst is re-checked from the old committed state and produces the same
//!   points again (the checks are deterministic functions of state and reading, in event
//!   time): same series, timestamp and fields, which InfluxDB stores once (a point overwrites
//!   its equal; VictoriaMetrics keeps both samples unless its deduplication is on). Its alert
//!   events are raised for the first time as far as anyone outside can tell: nothing of the
//!   burst was committed, acked or published. Their ids continue from the persisted next id
//!   (the same ids as in the first attempt, unless a sweep raised something first).
//! - after 3, before 4: redelivered readings have `seq <= last_seq` and are dropped as
//!   duplicates (counted); the burst's events sit in the outbox and are published at
//!   startup.
//! - after 4, before the outbox rows are deleted: the events are published again at startup
//!   (at least once; a receiver sees the same id, state and `updated` twice).
//!
//! Redelivery of anything else is harmless for the same reason: dedup on (device, seq) against
//! the committed `last_seq`. The sink writers read the spools in order and acknowledge records
//! only after the store answered 2xx (or the record went to the dead-letter file), syncing
//! the spool's ledger then, so a restart replays unwritten points in order (and at most the
//! request in flight at a crash is written again: the same points).
//!
//! Liveness, the window sweep of silent devices and the periodic measurements
//! (`device_status`, `coverage`, open alerts) run on the wall clock every `[sweep] interval_s`
//! through the same steps 1–3 and 5 (there is nothing to ack); see `crate::pipeline::sweep`.

mod command;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use calwatch_protocol::node::backoff::Backoff;
use calwatch_protocol::{alert_topic, AlertEvent};
use tokio::sync::{broadcast, mpsc, watch};

pub(crate) use command::{Command, Input, Refusal};

use crate::domain::now_ms;
use crate::persist::registry::{Registry, RegistryError};
use crate::persist::state::{Commit, Committed, StateStore, StoreError};
use crate::pipeline::{Output, Pipeline};
use crate::sink::{Queues, Stopped};
use crate::source::{Message, Source};
use crate::LoggedAlert;

/// A burst takes at most this many messages ...
pub(crate) const BURST_MESSAGES: usize = 64;
/// ... or this much payload (about 3,000 readings of ~170 bytes): an alert is published when
/// its burst is durable, so the burst bounds the reading → alert latency (about 2 µs to check
/// and 2–3 µs to commit a reading: ~15 ms of work per full burst), while the per-burst cost
/// (two queue fsyncs, one SQLite transaction) stays small against it.
pub(crate) const BURST_BYTES: usize = 512 << 10;

/// How often the registry is asked whether another process (`calwatch-gateway import`)
/// changed it: one single-row query, so such an import counts within seconds.
const REGISTRY_WATCH: Duration = Duration::from_secs(2);

/// Why ingest could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("source settings: {0}")]
    Settings(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("ingest task: {0}")]
    Task(String),
}

/// The pipeline with what makes its output durable: the registry, the state store and the
/// sink queues.
pub(crate) struct Core {
    pub(crate) pipeline: Pipeline,
    pub(crate) registry: Registry,
    pub(crate) store: StateStore,
    pub(crate) queues: Arc<Queues>,
    pub(crate) out: Output,
    /// Outbox seqs of published events, with the count of events the source must have
    /// confirmed for them to be out (see [`Source::confirmed`]).
    published: VecDeque<(i64, u64)>,
    /// Events handed to the source so far.
    sent: u64,
}

/// The result of one burst or sweep made durable: its events and their last outbox seq.
#[derive(Default)]
pub(crate) struct Durable {
    pub(crate) events: Vec<AlertEvent>,
    pub(crate) committed: Committed,
}

impl Core {
    pub(crate) fn new(
        pipeline: Pipeline,
        registry: Registry,
        store: StateStore,
        queues: Arc<Queues>,
    ) -> Core {
        Core {
            pipeline,
            registry,
            store,
            queues,
            out: Output::default(),
            published: VecDeque::new(),
            sent: 0,
        }
    }

    /// Steps 1–3 for a burst of messages.
    fn burst(
        &mut self,
        msgs: &[Message],
        confirmed: u64,
        stop: &AtomicBool,
    ) -> Result<Durable, Stopped> {
        let now = now_ms();
        self.out.clear();
        for m in msgs {
            self.pipeline
                .process(&m.topic, &m.payload, now, &mut self.out);
        }
        self.make_durable(now, confirmed, stop)
    }

    /// Steps 1–3 for registry changes made by another process (`calwatch-gateway import`
    /// beside the running gateway): the registry is read again and the devices whose records
    /// changed are brought in line, as an API change would.
    fn registry_check(&mut self, confirmed: u64, stop: &AtomicBool) -> Result<Durable, Stopped> {
        let now = now_ms();
        self.out.clear();
        match self.pick_up_registry_changes(now) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                devices = n,
                "registry changed by another process; picked up"
            ),
            Err(e) => tracing::warn!(error = %e, "registry not re-read; will try again"),
        }
        self.make_durable(now, confirmed, stop)
    }

    fn pick_up_registry_changes(&mut self, now: i64) -> Result<usize, RegistryError> {
        if !self.registry.changed_on_disk()? {
            return Ok(0);
        }
        self.registry.reload()?;
        let changed = self.pipeline.changed_devices(self.registry.devices());
        if !changed.is_empty() {
            self.pipeline.sync_registry(
                self.registry.devices().clone(),
                &changed,
                now,
                &mut self.out,
            );
        }
        Ok(changed.len())
    }

    /// Steps 1–3 for the wall-clock sweep.
    fn sweep(&mut self, confirmed: u64, stop: &AtomicBool) -> Result<Durable, Stopped> {
        let now = now_ms();
        self.out.clear();
        self.pipeline.sweep(now, &mut self.out);
        self.make_durable(now, confirmed, stop)
    }

    /// Steps 2 and 3: the output to every sink queue, then the state commit (with the
    /// outbox rows of events the source has confirmed by now, `confirmed`).
    pub(crate) fn make_durable(
        &mut self,
        now: i64,
        confirmed: u64,
        stop: &AtomicBool,
    ) -> Result<Durable, Stopped> {
        let started = std::time::Instant::now();
        if !self.out.lines.is_empty() {
            self.queues.append(self.out.lines.as_str(), stop)?;
        }
        let events = std::mem::take(&mut self.out.events);
        let mut published_up_to = None;
        while let Some(&(seq, needed)) = self.published.front() {
            if confirmed < needed {
                break;
            }
            published_up_to = Some(seq);
            self.published.pop_front();
        }
        let mut committed = Committed::default();
        if self.pipeline.has_changes() || !events.is_empty() || published_up_to.is_some() {
            committed = self.commit(&events, published_up_to, now, stop)?;
        }
        self.pipeline
            .metrics
            .commit_latency
            .record(started.elapsed());
        Ok(Durable { events, committed })
    }

    /// Commits the pipeline's changes with the alert `transitions`, retrying a failing store
    /// until it works or `stop` is set (nothing is acked meanwhile).
    fn commit(
        &mut self,
        transitions: &[AlertEvent],
        published_up_to: Option<i64>,
        now: i64,
        stop: &AtomicBool,
    ) -> Result<Committed, Stopped> {
        let changes = self.pipeline.changes();
        let commit = Commit {
            devices: changes.devices,
            alerts: changes.alerts,
            transitions: transitions.to_vec(),
            next_alert_id: changes.next_alert_id,
            published_up_to,
            agents: changes.agents,
        };
        let backoff = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
        };
        let mut attempt = 0;
        let committed = loop {
            match self.store.commit(&commit, now) {
                Ok(c) => break c,
                Err(e) => {
                    let wait = backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tracing::error!(error = %e, retry_in = ?wait, "state commit failed; ingest waits (nothing acked)");
                    if stop.load(Ordering::Relaxed) {
                        return Err(Stopped);
                    }
                    std::thread::sleep(wait);
                }
            }
        };
        drop(commit);
        self.pipeline.committed(&committed.hashes);
        Ok(committed)
    }

    /// `events` up to outbox seq `last` were handed to the source: they are out once it has
    /// confirmed them all.
    fn sent(&mut self, events: usize, last: i64) {
        self.sent += events as u64;
        self.published.push_back((last, self.sent));
    }
}

/// What the ingest task needs from the outside.
pub(crate) struct IngestTask<S> {
    pub(crate) source: S,
    pub(crate) core: Core,
    pub(crate) alerts: broadcast::Sender<LoggedAlert>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) sweep_interval: Duration,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Runs the burst loop over `source` until `shutdown` turns true.
///
/// Backpressure runs one way (source → burst → durable queues → stores): the processing of
/// a burst runs off the runtime (`spawn_blocking`), and the loop queues acks and alert events
/// without waiting on anything that waits on it; every wait ends with the shutdown.
pub(crate) async fn run<S: Source>(task: IngestTask<S>) -> Result<(), IngestError> {
    let IngestTask {
        mut source,
        core,
        alerts,
        mut commands,
        sweep_interval,
        mut shutdown,
    } = task;
    let metrics = core.pipeline.metrics.clone();
    let stop = Arc::new(AtomicBool::new(false));
    {
        // Set `stop` as soon as shutdown is asked, so a burst waiting for a full queue ends.
        let stop = stop.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            stop.store(true, Ordering::Relaxed);
        });
    }

    let mut core = Some(core);
    // Events a crash kept from being published (or from being known published).
    let leftover = match core.as_ref() {
        Some(c) => c.store.load_outbox()?,
        None => Vec::new(),
    };
    if !leftover.is_empty() {
        tracing::info!(
            events = leftover.len(),
            "publishing alert events left in the outbox"
        );
        let last = leftover.last().map_or(0, |(seq, _)| *seq);
        let events: Vec<AlertEvent> = leftover.into_iter().map(|(_, e)| e).collect();
        publish(&mut source, &alerts, &events, &[]).await;
        if let Some(c) = core.as_mut() {
            c.sent(events.len(), last);
        }
    }

    let mut sweep = tokio::time::interval(sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registry_watch = tokio::time::interval(REGISTRY_WATCH);
    registry_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Fair turns between API commands and bursts: after a burst a waiting command goes
    // first, after a command a waiting burst, so neither starves the other (a command waits
    // at most one burst; a stream of API writes takes at most every other turn).
    let mut command_turn = false;
    let mut result = Ok(());
    loop {
        enum Job {
            Burst(Vec<Message>, usize),
            Sweep,
            Registry,
            Command(Option<Command>),
        }
        let ready = source.is_empty();
        let job = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            // Before the messages, so a backlog cannot starve them (each is ready once a period).
            _ = sweep.tick() => Job::Sweep,
            _ = registry_watch.tick() => Job::Registry,
            Some(cmd) = commands.recv(), if command_turn || ready => Job::Command(Some(cmd)),
            m = source.recv() => match m {
                Some(first) => {
                    let mut bytes = first.payload.len();
                    let mut burst = vec![first];
                    while burst.len() < BURST_MESSAGES && bytes < BURST_BYTES {
                        match source.try_recv() {
                            Some(m) => {
                                bytes += m.payload.len();
                                burst.push(m);
                            }
                            None => break,
                        }
                    }
                    Job::Burst(burst, bytes)
                }
                None => break,
            },
        };
        let Some(mut c) = core.take() else { break };
        let stop_flag = stop.clone();
        let confirmed = source.confirmed();
        let mut job = job;
        metrics.health.busy(now_ms());
        let joined = tokio::task::spawn_blocking(move || {
            let r = match &mut job {
                Job::Burst(msgs, _) => c.burst(msgs, confirmed, &stop_flag),
                Job::Sweep => c.sweep(confirmed, &stop_flag),
                Job::Registry => c.registry_check(confirmed, &stop_flag),
                Job::Command(cmd) => match cmd.take() {
                    Some(cmd) => c.command(cmd, confirmed, &stop_flag),
                    None => Err(Stopped),
                },
            };
            (c, job, r)
        })
        .await;
        let (c, job, r) = match joined {
            Ok(x) => x,
            Err(e) => {
                result = Err(IngestError::Task(e.to_string()));
                break;
            }
        };
        core = Some(c);
        let Ok(durable) = r else {
            // Asked to stop while waiting: nothing of this burst was committed or acked.
            break;
        };
        match job {
            Job::Burst(msgs, bytes) => {
                command_turn = true;
                for m in &msgs {
                    if source.ack(m.ack).await.is_err() {
                        break;
                    }
                }
                metrics.health.done(msgs.len(), bytes);
                metrics.bursts.fetch_add(1, Ordering::Relaxed);
            }
            Job::Command(_) => command_turn = false,
            Job::Registry => {}
            Job::Sweep => {
                metrics.sweeps.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = core.as_ref() {
                    tracing::info!(
                        open_alerts = c.pipeline.alerts().open_count(),
                        "{}",
                        metrics.summary()
                    );
                }
            }
        }
        metrics.health.progress(now_ms());
        if !durable.events.is_empty() {
            publish(
                &mut source,
                &alerts,
                &durable.events,
                &durable.committed.log_seqs,
            )
            .await;
            if let Some(c) = core.as_mut() {
                c.sent(durable.events.len(), durable.committed.outbox);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let confirmed = source.close().await;
    if let Some(mut c) = core {
        // What the transport confirmed leaves the outbox; the rest is published again at
        // the next start.
        let out = c
            .published
            .iter()
            .take_while(|(_, needed)| confirmed >= *needed)
            .last()
            .map(|(seq, _)| *seq);
        if let Some(seq) = out {
            if let Err(e) = c.store.published(seq) {
                tracing::warn!(error = %e, "outbox not cleared; its events are published again at start");
            }
        }
        tracing::info!("ingest stopped: {}", c.pipeline.metrics.summary());
    }
    result
}

/// Step 5: alert events out through the source and to in-process subscribers. An event
/// waits for the source only until the shutdown (it stays in the outbox and is published at
/// the next start).
async fn publish<S: Source>(
    source: &mut S,
    alerts: &broadcast::Sender<LoggedAlert>,
    events: &[AlertEvent],
    log_seqs: &[i64],
) {
    for (i, e) in events.iter().enumerate() {
        let topic = alert_topic(&e.owner, &e.device);
        if source.publish(topic, e.encode()).await.is_err() {
            return;
        }
        // No subscriber is not an error.
        let _ = alerts.send(LoggedAlert {
            seq: log_seqs.get(i).copied().unwrap_or(0),
            event: e.clone(),
        });
    }
}
