//! What the gateway remembers across restarts besides the registry: per-device check state
//! (with the dedup high-water mark), open and past alerts, the next alert id, and the outbox
//! of alert events not yet known to be published. Kept in the registry's SQLite file; one
//! transaction per ingest commit, together with the audit entries of the alert transitions
//! in it.

use std::path::Path;

use calwatch_protocol::{AlertEvent, AlertState, Id};
use rusqlite::{params, Connection, OptionalExtension};

use crate::alerts::OpenAlert;
use crate::audit::{self, AuditEntry};
use crate::checks::DeviceState;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("state store: {0}")]
    Json(#[from] serde_json::Error),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS device_state (
    device TEXT PRIMARY KEY, state TEXT NOT NULL, gaps INTEGER NOT NULL DEFAULT 0,
    readings INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alert (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    owner TEXT NOT NULL, raised INTEGER NOT NULL, updated INTEGER NOT NULL,
    event TEXT NOT NULL, clear_since INTEGER, seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_open ON alert(state) WHERE state != 'resolved';
CREATE INDEX IF NOT EXISTS alert_seq ON alert(seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS alert_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, event TEXT NOT NULL
);
";

/// Alert transitions kept in `alert_log` for `Last-Event-ID` replays of the SSE stream; a
/// client further behind than this is told to resync (re-read `/api/alerts`).
pub const ALERT_LOG_KEEP: i64 = 100_000;

/// Per-device state as persisted.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SavedDevice {
    pub state: DeviceState,
    /// Sequence numbers skipped so far (CONTRACT §1: counted, reported in device status).
    pub gaps: u64,
    /// Readings checked (after dedup), over the device's life: each reading exactly once.
    pub readings: u64,
}

/// The state store.
pub struct StateStore {
    conn: Connection,
}

/// One ingest commit: what changed since the last one.
#[derive(Default)]
pub struct Commit<'a> {
    pub devices: Vec<(&'a Id, &'a SavedDevice)>,
    /// Alert versions to store, with their clear-since time.
    pub alerts: Vec<(AlertEvent, Option<i64>)>,
    /// Alert transitions to audit (state changes and severity changes); they also go to the
    /// outbox, to be published.
    pub transitions: Vec<AlertEvent>,
    pub next_alert_id: u64,
    /// Outbox entries at or below this were published; deleted in this commit.
    pub published_up_to: Option<i64>,
}

impl StateStore {
    pub fn open(path: &Path) -> Result<StateStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            // No checkpoints in the commit path: a checkpoint copies the WAL into the database
            // and fsyncs it, a stall of tens to hundreds of ms in the middle of a burst (every
            // ~4 MB of state written). `Checkpointer` runs them on its own thread instead.
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000; PRAGMA wal_autocheckpoint=0;",
        )?;
        conn.execute_batch(SCHEMA)?;
        // Stores made before the `readings` column existed.
        let has_readings: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('device_state') WHERE name = 'readings'")?
            .exists([])?;
        if !has_readings {
            conn.execute_batch(
                "ALTER TABLE device_state ADD COLUMN readings INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        audit::init(&conn)?;
        Ok(StateStore { conn })
    }

    /// Alert events committed but not known to be published (a crash came between), oldest
    /// first, with their outbox seq.
    pub fn load_outbox(&self) -> Result<Vec<(i64, AlertEvent)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, event FROM outbox ORDER BY seq")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, text) = row?;
            match AlertEvent::decode(text.as_bytes()) {
                Ok(e) => out.push((seq, e)),
                Err(e) => tracing::warn!(seq, error = %e, "undecodable outbox entry skipped"),
            }
        }
        Ok(out)
    }

    /// Deletes the outbox entries at or below `seq` (they were published).
    pub fn published(&mut self, seq: i64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM outbox WHERE seq <= ?1", params![seq])?;
        Ok(())
    }

    /// Every device's saved state.
    pub fn load_devices(&self) -> Result<Vec<(Id, SavedDevice)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT device, state, gaps, readings FROM device_state")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device, state, gaps, readings) = row?;
            let Ok(id) = Id::new(device) else { continue };
            out.push((
                id,
                SavedDevice {
                    state: serde_json::from_str(&state)?,
                    gaps: gaps.max(0) as u64,
                    readings: readings.max(0) as u64,
                },
            ));
        }
        Ok(out)
    }

    /// Open alerts and the next alert id.
    pub fn load_alerts(&self) -> Result<(Vec<OpenAlert>, u64), StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT event, clear_since FROM alert WHERE state != 'resolved'")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
        })?;
        let mut open = Vec::new();
        for row in rows {
            let (event, clear_since) = row?;
            let event = AlertEvent::decode(event.as_bytes())
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
            open.push(OpenAlert { event, clear_since });
        }
        let next: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'next_alert_id'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok((open, next.unwrap_or(1).max(1) as u64))
    }

    /// Writes one commit atomically; returns the outbox seq of its last transition (0 when it
    /// has none) and the `alert_log` seq of each transition.
    pub fn commit(&mut self, c: &Commit<'_>, now_ms: i64) -> Result<Committed, StoreError> {
        let tx = self.conn.transaction()?;
        let mut last_outbox = 0;
        let mut log_seqs = Vec::with_capacity(c.transitions.len());
        {
            let mut put_state = tx.prepare_cached(
                "INSERT INTO device_state (device, state, gaps, readings) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(device) DO UPDATE SET state = ?2, gaps = ?3, readings = ?4",
            )?;
            for (id, saved) in &c.devices {
                put_state.execute(params![
                    id.as_str(),
                    serde_json::to_string(&saved.state)?,
                    saved.gaps as i64,
                    saved.readings as i64
                ])?;
            }
            let mut put_alert = tx.prepare_cached(
                "INSERT INTO alert (id, device, kind, state, owner, raised, updated, event, clear_since, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(id) DO UPDATE SET state = ?4, updated = ?7, event = ?8, clear_since = ?9",
            )?;
            for (a, clear_since) in &c.alerts {
                let seq: i64 = a.id.trim_start_matches("a-").parse().unwrap_or(0);
                put_alert.execute(params![
                    a.id,
                    a.device.as_str(),
                    a.kind.as_str(),
                    a.state.as_str(),
                    a.owner.as_str(),
                    a.raised,
                    a.updated,
                    String::from_utf8_lossy(&a.encode()),
                    clear_since,
                    seq
                ])?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('next_alert_id', ?1) ON CONFLICT(key) DO UPDATE SET value = ?1",
                params![c.next_alert_id as i64],
            )?;
        }
        if let Some(seq) = c.published_up_to {
            tx.execute("DELETE FROM outbox WHERE seq <= ?1", params![seq])?;
        }
        {
            let mut put_outbox = tx.prepare_cached("INSERT INTO outbox (event) VALUES (?1)")?;
            let mut put_log =
                tx.prepare_cached("INSERT INTO alert_log (owner, event) VALUES (?1, ?2)")?;
            for t in &c.transitions {
                let text = String::from_utf8_lossy(&t.encode()).into_owned();
                put_outbox.execute(params![text])?;
                last_outbox = tx.last_insert_rowid();
                put_log.execute(params![t.owner.as_str(), text])?;
                log_seqs.push(tx.last_insert_rowid());
            }
            if let Some(&last) = log_seqs.last() {
                if last % 1000 == 0 {
                    tx.execute(
                        "DELETE FROM alert_log WHERE seq <= ?1",
                        params![last - ALERT_LOG_KEEP],
                    )?;
                }
            }
        }
        for t in &c.transitions {
            audit::append(
                &tx,
                &AuditEntry {
                    ts: now_ms,
                    actor: t
                        .ack_by
                        .clone()
                        .filter(|_| t.state == AlertState::Acknowledged)
                        .unwrap_or_else(|| "gateway".into()),
                    action: format!("alert.{}", t.state.as_str()),
                    subject: t.id.clone(),
                    old: "null".into(),
                    new: String::from_utf8_lossy(&t.encode()).into_owned(),
                    why: t.message.clone(),
                },
            )?;
        }
        tx.commit()?;
        Ok(Committed {
            outbox: last_outbox,
            log_seqs,
        })
    }
}

/// Checkpoints the registry file's WAL off the ingest thread, every second: PASSIVE (never
/// waits for, nor blocks, the writer); when the WAL has grown past [`WAL_RESTART_PAGES`]
/// anyway, a RESTART checkpoint (which waits for readers briefly) so it starts over.
pub struct Checkpointer;

/// WAL pages (4 KiB) beyond which the checkpointer forces the log to start over.
pub const WAL_RESTART_PAGES: i64 = 65_536;

impl Checkpointer {
    pub fn spawn(
        path: &Path,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<std::thread::JoinHandle<()>, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch("PRAGMA busy_timeout=5000;")?;
        let thread = std::thread::Builder::new()
            .name("wal-checkpoint".into())
            .spawn(move || {
                while !*shutdown.borrow() {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    let run = |mode: &str| {
                        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                            Ok((
                                r.get::<_, i64>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, i64>(2)?,
                            ))
                        })
                    };
                    match run("PASSIVE") {
                        Ok((_, log, _)) if log > WAL_RESTART_PAGES => {
                            if let Err(e) = run("RESTART") {
                                tracing::warn!(error = %e, "WAL restart checkpoint failed");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
                    }
                }
                // A last one, so the file is compact when the gateway stopped.
                let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
            })
            .map_err(|e| StoreError::Db(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(thread)
    }
}

/// What [`StateStore::commit`] wrote.
#[derive(Debug, Default)]
pub struct Committed {
    /// Outbox seq of the last transition (0 without any).
    pub outbox: i64,
    /// `alert_log` seq of each transition, in order: the SSE event ids.
    pub log_seqs: Vec<i64>,
}

/// Read-only access to the alerts for the HTTP API (its own connection: reads never wait for
/// ingest, WAL lets them run beside its commits).
pub struct AlertReader {
    conn: Connection,
}

impl AlertReader {
    pub fn open(path: &Path) -> Result<AlertReader, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.execute_batch("PRAGMA busy_timeout=5000;")?;
        Ok(AlertReader { conn })
    }

    /// Alerts, newest first, filtered, with the number matching.
    pub fn alerts(
        &self,
        filter: &AlertFilter,
        limit: usize,
        offset: usize,
    ) -> Result<(Vec<AlertEvent>, u64), StoreError> {
        let mut cond = String::from(" WHERE 1=1");
        let mut args: Vec<String> = Vec::new();
        for (col, v) in [
            ("state", &filter.state),
            ("kind", &filter.kind),
            ("owner", &filter.owner),
            ("device", &filter.device),
        ] {
            if let Some(v) = v {
                args.push(v.clone());
                cond.push_str(&format!(" AND {col} = ?{}", args.len()));
            }
        }
        let total: i64 = self.conn.query_row(
            &format!("SELECT COUNT(*) FROM alert{cond}"),
            rusqlite::params_from_iter(args.iter()),
            |r| r.get(0),
        )?;
        let sql = format!(
            "SELECT event FROM alert{cond} ORDER BY seq DESC LIMIT {limit} OFFSET {offset}"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
            r.get::<_, String>(0)
        })?;
        let mut out = Vec::new();
        for row in rows {
            if let Ok(e) = AlertEvent::decode(row?.as_bytes()) {
                out.push(e);
            }
        }
        Ok((out, u64::try_from(total).unwrap_or(0)))
    }

    /// One alert by id.
    pub fn alert(&self, id: &str) -> Result<Option<AlertEvent>, StoreError> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT event FROM alert WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        Ok(text.and_then(|t| AlertEvent::decode(t.as_bytes()).ok()))
    }

    /// Logged transitions after `after` (of `owner` only, when given), oldest first, at most
    /// `limit`; `None` when `after` is older than what the log keeps (the client must resync).
    pub fn log_after(
        &self,
        after: i64,
        owner: Option<&str>,
        limit: usize,
    ) -> Result<Option<Vec<(i64, AlertEvent)>>, StoreError> {
        let oldest: Option<i64> =
            self.conn
                .query_row("SELECT MIN(seq) FROM alert_log", [], |r| r.get(0))?;
        if let Some(oldest) = oldest {
            if after + 1 < oldest {
                return Ok(None);
            }
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, event FROM alert_log WHERE seq > ?1 AND (?2 IS NULL OR owner = ?2) ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![after, owner, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, text) = row?;
            if let Ok(e) = AlertEvent::decode(text.as_bytes()) {
                out.push((seq, e));
            }
        }
        Ok(Some(out))
    }

    /// The newest logged seq (0 when none).
    pub fn last_log_seq(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM alert_log", [], |r| {
                r.get(0)
            })?)
    }
}

/// Filters of `GET /api/alerts`.
#[derive(Debug, Default, Clone)]
pub struct AlertFilter {
    pub state: Option<String>,
    pub kind: Option<String>,
    pub owner: Option<String>,
    pub device: Option<String>,
}
