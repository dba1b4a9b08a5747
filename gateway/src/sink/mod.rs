//! Time-series sinks: line protocol over HTTP to InfluxDB (v1 `/write`, v2 `/api/v2/write`)
//! and VictoriaMetrics, or to standard output, each behind its own durable queue.
//!
//! Ingest appends every burst's line protocol to every target's queue (a `calwatch-spool`
//! spool in `<queue dir>/<target name>`, synced before the burst is committed and acked; see
//! [`crate::ingest`]). One writer task per target reads its queue in order, sends up to
//! [`MAX_REQUEST_LINES`] lines or [`MAX_REQUEST_BYTES`] per request, gzipped, and
//! acknowledges the records once the store answered 2xx, so a restart replays what was not
//! written, in order.
//!
//! - Connection errors, timeouts, 5xx, 429 (and 401/403/404: a store not set up yet) are
//!   retried with backoff until they succeed; the records stay queued meanwhile.
//! - Any other 4xx says the data is bad. The request is split in halves until the bad lines
//!   are alone; each goes to `<queue dir>/<target name>.dead-letter.lp` after a header line
//!   `# <time> <status> <server message>`, is counted and logged, and is acknowledged, so it
//!   never blocks the rest. (InfluxDB 1.x writes the good points of a rejected request
//!   anyway; sending them again in a half is harmless, a point overwrites its equal.)
//!
//! The targets share nothing but the producer: a dead target does not stall another while
//! its queue has room. When a queue is full (`[queue] max_bytes`), ingest blocks — it stops
//! acknowledging MQTT messages, the broker stops delivering, and the agents' spools hold the
//! backlog — rather than drop anything; then every target waits for the slowest.

pub(crate) mod line;

use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use calwatch_protocol::node::backoff::Backoff;
use calwatch_spool::{FullPolicy, RecordId, Spool, SpoolConfig, SpoolError, SyncPolicy};
use tokio::sync::{watch, Notify};

use crate::config::{QueueConfig, Sink, SinkConfig};
use crate::metrics::SinkMetrics;

/// The gateway was asked to stop while it waited (for a full queue, a failing disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// Lines per HTTP request (and per queue record), at most.
pub(crate) const MAX_REQUEST_LINES: usize = 5_000;
/// Bytes of line protocol per HTTP request (and per queue record), at most (before gzip).
pub(crate) const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Segment files of a queue.
const SEGMENT_BYTES: u64 = 8 << 20;

/// Why the queues could not open.
#[derive(Debug, thiserror::Error)]
#[error("sink {name}: queue: {source}")]
pub struct QueueError {
    pub name: String,
    pub source: SpoolError,
}

/// One target's durable queue.
pub struct TargetQueue {
    pub name: String,
    spool: Mutex<Spool>,
    /// Woken after an append.
    appended: Notify,
    pub metrics: Arc<SinkMetrics>,
    /// `<queue dir>/<name>.dead-letter.lp`
    pub dead_letter: PathBuf,
}

impl TargetQueue {
    fn lock(&self) -> MutexGuard<'_, Spool> {
        // A writer that panicked holding the lock left the spool consistent: every spool
        // operation either completes or leaves the files as a crash would.
        self.spool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_metrics(&self, spool: &Spool) {
        let s = spool.stats();
        self.metrics
            .queue_records
            .store(s.unacked, Ordering::Relaxed);
        self.metrics.queue_bytes.store(s.bytes, Ordering::Relaxed);
    }

    /// Records waiting to be written.
    pub fn unacked(&self) -> u64 {
        self.lock().stats().unacked
    }
}

/// The queues of every target, in configuration order.
pub struct Queues {
    pub targets: Vec<Arc<TargetQueue>>,
}

impl Queues {
    /// Opens (creating) one spool per sink in `cfg.dir`; what a previous run left unwritten is
    /// replayed first.
    pub fn open(sinks: &[Sink], cfg: &QueueConfig) -> Result<Queues, QueueError> {
        let mut targets = Vec::with_capacity(sinks.len());
        for sink in sinks {
            let spool_cfg = SpoolConfig {
                dir: cfg.dir.join(&sink.name),
                max_bytes: cfg.max_bytes,
                segment_bytes: SEGMENT_BYTES,
                sync: SyncPolicy::Manual,
                full: FullPolicy::Block,
            };
            let (spool, recovery) = Spool::open(spool_cfg).map_err(|source| QueueError {
                name: sink.name.clone(),
                source,
            })?;
            if recovery.records > 0 {
                tracing::info!(sink = %sink.name, records = recovery.records, "queue replays what the last run did not write");
            }
            let q = TargetQueue {
                name: sink.name.clone(),
                spool: Mutex::new(spool),
                appended: Notify::new(),
                metrics: Arc::new(SinkMetrics::new(&sink.name)),
                dead_letter: cfg.dir.join(format!("{}.dead-letter.lp", sink.name)),
            };
            q.update_metrics(&q.lock());
            targets.push(Arc::new(q));
        }
        Ok(Queues { targets })
    }

    /// Appends line protocol `text` (whole lines) to every queue and makes it durable. Blocks
    /// (the calling thread) while a queue is full or its disk fails, until it works or `stop`
    /// is set.
    pub fn append(&self, text: &str, stop: &AtomicBool) -> Result<(), Stopped> {
        let records = split_records(text);
        let backoff = Backoff {
            min: Duration::from_millis(20),
            max: Duration::from_secs(1),
        };
        for q in &self.targets {
            let mut next = 0;
            let mut attempt = 0u32;
            let mut reported_full = false;
            loop {
                let mut full = false;
                {
                    let mut spool = q.lock();
                    while next < records.len() {
                        match spool.append(records[next].as_bytes()) {
                            Ok(_) => next += 1,
                            Err(SpoolError::Full { bytes, max_bytes }) => {
                                full = true;
                                if !reported_full {
                                    reported_full = true;
                                    q.metrics.full_waits.fetch_add(1, Ordering::Relaxed);
                                    tracing::warn!(sink = %q.name, bytes, max_bytes, "sink queue full: ingest waits (no MQTT acks) until the store catches up");
                                }
                                break;
                            }
                            Err(e) => {
                                tracing::error!(sink = %q.name, error = %e, "cannot append to the sink queue; ingest waits");
                                break;
                            }
                        }
                    }
                    if next == records.len() {
                        match spool.sync() {
                            Ok(()) => {
                                q.update_metrics(&spool);
                                break;
                            }
                            Err(e) => {
                                tracing::error!(sink = %q.name, error = %e, "cannot sync the sink queue; ingest waits");
                            }
                        }
                    }
                    q.update_metrics(&spool);
                }
                q.appended.notify_one();
                if stop.load(Ordering::Relaxed) {
                    return Err(Stopped);
                }
                let wait = if full {
                    Duration::from_millis(20)
                } else {
                    let w = backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    w
                };
                std::thread::sleep(wait);
            }
            q.appended.notify_one();
        }
        Ok(())
    }

    /// Whether every queue is empty (everything written).
    pub fn drained(&self) -> bool {
        self.targets.iter().all(|q| q.unacked() == 0)
    }
}

/// Splits line protocol into records of at most [`MAX_REQUEST_LINES`] lines and
/// [`MAX_REQUEST_BYTES`] bytes (a longer single line is a record of its own).
fn split_records(text: &str) -> Vec<&str> {
    let mut records = Vec::new();
    let mut start = 0;
    let mut lines = 0;
    let mut last_end = 0; // end of the last whole line in the current record
    for (i, b) in text.bytes().enumerate() {
        if b != b'\n' {
            continue;
        }
        let end = i + 1;
        if lines > 0 && (lines >= MAX_REQUEST_LINES || end - start > MAX_REQUEST_BYTES) {
            records.push(&text[start..last_end]);
            start = last_end;
            lines = 0;
        }
        lines += 1;
        last_end = end;
    }
    if last_end > start {
        records.push(&text[start..last_end]);
    }
    if last_end < text.len() {
        // Not expected (points end with a newline): keep the rest rather than lose it.
        records.push(&text[last_end..]);
    }
    records
}

/// Starts one writer task per target; they run until `stop` turns true.
pub fn start_writers(
    sinks: &[Sink],
    queues: &Queues,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new());
    sinks
        .iter()
        .zip(&queues.targets)
        .map(|(sink, q)| {
            let target = Target::new(&sink.target, client.clone());
            tokio::spawn(target.run(q.clone(), stop.clone()))
        })
        .collect()
}

enum Endpoint {
    Http {
        url: String,
        auth: Option<String>,
        basic: Option<(String, Option<String>)>,
    },
    Stdout,
}

struct Target {
    endpoint: Endpoint,
    client: reqwest::Client,
}

/// Percent-encodes a query parameter value.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Records read from the queue and sent together.
struct Batch {
    ids: Vec<RecordId>,
    body: Vec<u8>,
    lines: usize,
}

enum WriteError {
    Retry(String),
    Rejected(u16, String),
}

impl Target {
    fn new(cfg: &SinkConfig, client: reqwest::Client) -> Target {
        let endpoint = match cfg {
            SinkConfig::InfluxV2 {
                url,
                org,
                bucket,
                token,
            } => Endpoint::Http {
                url: format!(
                    "{url}/api/v2/write?org={}&bucket={}&precision=ms",
                    query_escape(org),
                    query_escape(bucket)
                ),
                auth: token.as_ref().map(|t| format!("Token {t}")),
                basic: None,
            },
            SinkConfig::InfluxV1 {
                url,
                db,
                rp,
                username,
                password,
            } => {
                let mut u = format!("{url}/write?db={}&precision=ms", query_escape(db));
                if let Some(rp) = rp {
                    u.push_str(&format!("&rp={}", query_escape(rp)));
                }
                Endpoint::Http {
                    url: u,
                    auth: None,
                    basic: username.clone().map(|u| (u, password.clone())),
                }
            }
            SinkConfig::Stdout => Endpoint::Stdout,
        };
        Target { endpoint, client }
    }

    async fn run(self, q: Arc<TargetQueue>, mut stop: watch::Receiver<bool>) {
        let mut carry: Option<(RecordId, Vec<u8>)> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            let reader = q.clone();
            let taken = carry.take();
            let read = tokio::task::spawn_blocking(move || read_batch(&reader, taken)).await;
            let (batch, rest) = match read {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::error!(sink = %q.name, error = %e, "cannot read the sink queue; retrying");
                    if sleep_or_stop(Duration::from_secs(1), &mut stop).await {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!(sink = %q.name, error = %e, "sink queue reader failed");
                    break;
                }
            };
            carry = rest;
            let Some(batch) = batch else {
                tokio::select! {
                    _ = q.appended.notified() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            };
            if self.deliver(&q, &batch, &mut stop).await.is_err() {
                // Stopping: the batch stays queued and is written after the restart.
                break;
            }
            q.metrics
                .lines_written
                .fetch_add(batch.lines as u64, Ordering::Relaxed);
            let acker = q.clone();
            let ids = batch.ids;
            let acked = tokio::task::spawn_blocking(move || {
                let mut spool = acker.lock();
                for id in ids {
                    spool.ack(id)?;
                }
                // Writes the ledger: a crash does not make us write these again.
                spool.sync()?;
                acker.update_metrics(&spool);
                Ok::<(), SpoolError>(())
            })
            .await;
            match acked {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::error!(sink = %q.name, error = %e, "cannot acknowledge in the sink queue (the records may be written again)")
                }
                Err(e) => tracing::error!(sink = %q.name, error = %e, "sink queue ack failed"),
            }
        }
    }

    /// Writes `batch`, retrying what can succeed and splitting what the store refuses until
    /// the refused lines are alone (then dead-lettered). `Err` when asked to stop first.
    async fn deliver(
        &self,
        q: &TargetQueue,
        batch: &Batch,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Stopped> {
        let backoff = Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(30),
        };
        let mut parts: Vec<Range<usize>> = Vec::with_capacity(32);
        parts.push(0..batch.body.len());
        while let Some(range) = parts.pop() {
            let part = &batch.body[range.clone()];
            let mut attempt = 0u32;
            loop {
                match self.write(part).await {
                    Ok(()) => {
                        q.metrics.requests.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(WriteError::Retry(why)) => {
                        q.metrics.retries.fetch_add(1, Ordering::Relaxed);
                        let wait = backoff.delay(attempt);
                        attempt = attempt.saturating_add(1);
                        tracing::warn!(sink = %q.name, error = %why, retry_in = ?wait, "write failed; will retry");
                        if sleep_or_stop(wait, stop).await {
                            return Err(Stopped);
                        }
                    }
                    Err(WriteError::Rejected(status, message)) => {
                        match split_in_half(part) {
                            Some(mid) => {
                                // Left half first, so points keep their order.
                                parts.push(range.start + mid..range.end);
                                parts.push(range.start..range.start + mid);
                            }
                            None => dead_letter(q, part, status, &message),
                        }
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    async fn write(&self, body: &[u8]) -> Result<(), WriteError> {
        match &self.endpoint {
            Endpoint::Stdout => {
                // Off the runtime's workers: a reader that does not keep up (a full pipe)
                // blocks this thread only, and backpressure reaches ingest through the queue.
                let body = body.to_vec();
                tokio::task::spawn_blocking(move || {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&body)?;
                    out.flush()
                })
                .await
                .map_err(|e| WriteError::Retry(e.to_string()))?
                .map_err(|e| WriteError::Retry(e.to_string()))
            }
            Endpoint::Http { url, auth, basic } => {
                let plain = body.to_vec();
                let gz = tokio::task::spawn_blocking(move || gzip(&plain))
                    .await
                    .map_err(|e| WriteError::Retry(e.to_string()))?
                    .map_err(|e| WriteError::Retry(format!("gzip: {e}")))?;
                let mut req = self
                    .client
                    .post(url)
                    .header(reqwest::header::CONTENT_ENCODING, "gzip")
                    .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .body(gz);
                if let Some(a) = auth {
                    req = req.header(reqwest::header::AUTHORIZATION, a);
                }
                if let Some((u, p)) = basic {
                    req = req.basic_auth(u, p.as_ref());
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| WriteError::Retry(e.to_string()))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let text = resp.text().await.unwrap_or_default();
                let code = status.as_u16();
                if status.is_server_error() || matches!(code, 401 | 403 | 404 | 408 | 429) {
                    // Overload, outage, or a target not (yet) set up: retrying can succeed.
                    Err(WriteError::Retry(format!("{status}: {}", text.trim())))
                } else {
                    Err(WriteError::Rejected(code, text))
                }
            }
        }
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(body)?;
    enc.finish()
}

/// Sleeps `d`; true when `stop` turned true meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// Reads records after `carry` until the request limits; a record that would exceed them is
/// returned to be carried into the next batch.
#[allow(clippy::type_complexity)]
fn read_batch(
    q: &TargetQueue,
    carry: Option<(RecordId, Vec<u8>)>,
) -> Result<(Option<Batch>, Option<(RecordId, Vec<u8>)>), SpoolError> {
    let mut batch = Batch {
        ids: Vec::new(),
        body: Vec::new(),
        lines: 0,
    };
    let push = |batch: &mut Batch, id: RecordId, rec: Vec<u8>| -> Option<(RecordId, Vec<u8>)> {
        let lines = rec.iter().filter(|&&b| b == b'\n').count();
        if !batch.ids.is_empty()
            && (batch.lines + lines > MAX_REQUEST_LINES
                || batch.body.len() + rec.len() > MAX_REQUEST_BYTES)
        {
            return Some((id, rec));
        }
        batch.ids.push(id);
        batch.lines += lines;
        if batch.body.is_empty() {
            batch.body = rec;
        } else {
            batch.body.extend_from_slice(&rec);
        }
        None
    };
    let mut rest = None;
    if let Some((id, rec)) = carry {
        rest = push(&mut batch, id, rec);
    }
    if rest.is_none() {
        let mut spool = q.lock();
        loop {
            match spool.read_next() {
                Ok(Some((id, rec))) => {
                    rest = push(&mut batch, id, rec);
                    if rest.is_some() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // What was read is dropped with the error: read it again next time (every
                    // record before it is acknowledged, so nothing is sent twice).
                    spool.rewind();
                    return Err(e);
                }
            }
        }
    }
    Ok(((!batch.ids.is_empty()).then_some(batch), rest))
}

/// The byte offset of the line boundary nearest the middle of `part`; `None` for one line.
fn split_in_half(part: &[u8]) -> Option<usize> {
    let ends: Vec<usize> = part
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .map(|(i, _)| i + 1)
        .filter(|&e| e < part.len())
        .collect();
    if ends.is_empty() {
        return None;
    }
    Some(ends[ends.len() / 2])
}

/// Appends refused lines to the target's dead-letter file after a header line.
fn dead_letter(q: &TargetQueue, part: &[u8], status: u16, message: &str) {
    let lines = part.iter().filter(|&&b| b == b'\n').count().max(1);
    q.metrics
        .dead_lettered
        .fetch_add(lines as u64, Ordering::Relaxed);
    let message: String = message
        .trim()
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    tracing::error!(sink = %q.name, status, server = %message, file = %q.dead_letter.display(), line = %String::from_utf8_lossy(part).trim_end(), "store refused a line as bad data; moved to the dead-letter file");
    let mut text = format!(
        "# {} {status} {message}\n",
        crate::domain::civil::format_timestamp(crate::domain::now_ms())
    )
    .into_bytes();
    text.extend_from_slice(part);
    if !part.ends_with(b"\n") {
        text.push(b'\n');
    }
    if let Err(e) = append_file(&q.dead_letter, &text) {
        tracing::error!(sink = %q.name, error = %e, file = %q.dead_letter.display(), "cannot write the dead-letter file; the refused line is only in this log");
    }
}

fn append_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_data()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_split_at_line_boundaries() {
        assert!(split_records("").is_empty());
        assert_eq!(split_records("a 1\nb 2\n"), ["a 1\nb 2\n"]);
        let many: String = (0..MAX_REQUEST_LINES + 3)
            .map(|i| format!("m v={i} {i}\n"))
            .collect();
        let r = split_records(&many);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].lines().count(), MAX_REQUEST_LINES);
        assert_eq!(r[1].lines().count(), 3);
        assert_eq!(r.concat(), many);
        let long = "x".repeat(MAX_REQUEST_BYTES / 2);
        let big = format!("a {long}\nb {long}\nc {long}\n");
        let r = split_records(&big);
        assert_eq!(r.len(), 3);
        assert_eq!(r.concat(), big);
    }

    #[test]
    fn halves_at_a_line() {
        assert_eq!(split_in_half(b"one line\n"), None);
        assert_eq!(split_in_half(b"a\nb\n"), Some(2));
        assert_eq!(split_in_half(b"a\nb\nc\n"), Some(4));
    }
}
