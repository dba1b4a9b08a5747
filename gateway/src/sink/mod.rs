//! Time-series sinks: line protocol over HTTP to InfluxDB (v1 `/write`, v2 `/api/v2/write`)
//! and VictoriaMetrics, or to standard output.
//!
//! Each target runs on its own task with its own queue, so a dead target does not stall
//! another. A chunk of points is acknowledged (and with it the MQTT messages it came from)
//! only when every target has accepted it. Connection errors, 5xx and 429 are retried with
//! backoff until they succeed; a 4xx that says the data is bad is logged with the server's
//! message, counted, and not retried (retrying cannot fix it).

pub mod line;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use calwatch_agent::backoff::Backoff;
use tokio::sync::mpsc;

use crate::config::SinkConfig;

/// Something to do once every target has stored a chunk (acknowledge MQTT messages).
pub type OnStored = Box<dyn FnOnce() + Send>;

/// Points for all targets, with what to do when all have them.
pub struct Chunk {
    pub lines: Arc<String>,
    pub points: usize,
    remaining: AtomicUsize,
    on_stored: std::sync::Mutex<Option<OnStored>>,
}

impl Chunk {
    fn stored(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(f) = self.on_stored.lock().ok().and_then(|mut g| g.take()) {
                f();
            }
        }
    }
}

/// Counters per target.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub points_written: AtomicU64,
    pub requests_failed: AtomicU64,
    pub points_rejected: AtomicU64,
}

/// The set of targets.
pub struct Sinks {
    senders: Vec<mpsc::Sender<Arc<Chunk>>>,
    pub stats: Vec<(String, Arc<SinkStats>)>,
}

impl Sinks {
    /// Starts one writer task per configured target.
    pub fn start(configs: &[SinkConfig]) -> Sinks {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let mut senders = Vec::new();
        let mut stats = Vec::new();
        for cfg in configs {
            let (tx, rx) = mpsc::channel::<Arc<Chunk>>(256);
            let s = Arc::new(SinkStats::default());
            let target = Target::new(cfg, client.clone());
            stats.push((target.name.clone(), s.clone()));
            tokio::spawn(target.run(rx, s));
            senders.push(tx);
        }
        Sinks { senders, stats }
    }

    /// Hands `lines` to every target; `on_stored` runs once all have stored them
    /// (at once when no target is configured).
    pub async fn send(&self, lines: String, points: usize, on_stored: OnStored) {
        if self.senders.is_empty() || points == 0 {
            on_stored();
            return;
        }
        let chunk = Arc::new(Chunk {
            lines: Arc::new(lines),
            points,
            remaining: AtomicUsize::new(self.senders.len()),
            on_stored: std::sync::Mutex::new(Some(on_stored)),
        });
        for tx in &self.senders {
            if tx.send(chunk.clone()).await.is_err() {
                tracing::error!("sink task ended; chunk not stored there");
            }
        }
    }
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
    name: String,
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

impl Target {
    fn new(cfg: &SinkConfig, client: reqwest::Client) -> Target {
        let (name, endpoint) = match cfg {
            SinkConfig::InfluxV2 {
                url,
                org,
                bucket,
                token,
            } => (
                format!("influx_v2 {url} {bucket}"),
                Endpoint::Http {
                    url: format!(
                        "{url}/api/v2/write?org={}&bucket={}&precision=ms",
                        query_escape(org),
                        query_escape(bucket)
                    ),
                    auth: token.as_ref().map(|t| format!("Token {t}")),
                    basic: None,
                },
            ),
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
                (
                    format!("influx_v1 {url} {db}"),
                    Endpoint::Http {
                        url: u,
                        auth: None,
                        basic: username.clone().map(|u| (u, password.clone())),
                    },
                )
            }
            SinkConfig::Stdout => ("stdout".into(), Endpoint::Stdout),
        };
        Target {
            name,
            endpoint,
            client,
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Arc<Chunk>>, stats: Arc<SinkStats>) {
        let backoff = Backoff {
            min: Duration::from_millis(200),
            max: Duration::from_secs(30),
        };
        while let Some(chunk) = rx.recv().await {
            let mut attempt = 0u32;
            loop {
                match self.write(&chunk.lines).await {
                    Ok(()) => {
                        stats
                            .points_written
                            .fetch_add(chunk.points as u64, Ordering::Relaxed);
                        break;
                    }
                    Err(WriteError::Rejected(status, body)) => {
                        stats
                            .points_rejected
                            .fetch_add(chunk.points as u64, Ordering::Relaxed);
                        tracing::error!(target = %self.name, %status, server = %body.trim(), points = chunk.points, "store rejected points as bad data; not retried");
                        break;
                    }
                    Err(WriteError::Retry(why)) => {
                        stats.requests_failed.fetch_add(1, Ordering::Relaxed);
                        let wait = backoff.delay(attempt);
                        attempt = attempt.saturating_add(1);
                        tracing::warn!(target = %self.name, error = %why, retry_in = ?wait, "write failed; will retry");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            chunk.stored();
        }
    }

    async fn write(&self, lines: &Arc<String>) -> Result<(), WriteError> {
        match &self.endpoint {
            Endpoint::Stdout => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                out.write_all(lines.as_bytes())
                    .map_err(|e| WriteError::Retry(e.to_string()))?;
                out.flush().map_err(|e| WriteError::Retry(e.to_string()))
            }
            Endpoint::Http { url, auth, basic } => {
                let mut req = self.client.post(url).body(lines.as_ref().clone());
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
                let body = resp.text().await.unwrap_or_default();
                if status.is_server_error()
                    || status.as_u16() == 429
                    || status.as_u16() == 401
                    || status.as_u16() == 403
                    || status.as_u16() == 404
                {
                    // Overload, outage, or a target not (yet) set up: retrying can succeed.
                    Err(WriteError::Retry(format!("{status}: {}", body.trim())))
                } else {
                    Err(WriteError::Rejected(status, body))
                }
            }
        }
    }
}

enum WriteError {
    Retry(String),
    Rejected(reqwest::StatusCode, String),
}
