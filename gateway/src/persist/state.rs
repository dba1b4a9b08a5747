//! What the gateway remembers across restarts besides the registry: per-device check state
//! (with the dedup high-water mark), open and past alerts, the next alert id, and the outbox
//! of alert events not yet known to be published. Kept in the registry's SQLite file; one
//! transaction per ingest commit, together with the audit entries of the alert transitions
//! in it.

use std::path::Path;

use calwatch_protocol::{AlertEvent, AlertState, Id};
use rusqlite::{params, Connection, OptionalExtension};

use super::audit::{self, AuditEntry};
use crate::alerts::OpenAlert;
use crate::checks::liveness::AgentLiveness;
use crate::checks::{DeviceState, SavedDevice};

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("state store: {0}")]
    Json(#[from] serde_json::Error),
    #[error("state store: {0}")]
    Open(#[from] super::OpenError),
}

/// Alert transitions kept in `alert_log` for `Last-Event-ID` replays of the SSE stream; a
/// client further behind than this is told to resync (re-read `/api/alerts`).
pub(crate) const ALERT_LOG_KEEP: i64 = 100_000;

/// The state store.
pub(crate) struct StateStore {
    conn: Connection,
}

/// One ingest commit: what changed since the last one.
#[derive(Default)]
pub(crate) struct Commit<'a> {
    /// Changed devices, with the [`state_hash`] of the state last written for each (0:
    /// unknown): a state whose hash is unchanged has only its counters and `last_seq` /
    /// `last_ts` updated, not its JSON rewritten.
    pub devices: Vec<(&'a Id, &'a SavedDevice, u64)>,
    /// Alert versions to store, with their clear-since time.
    pub alerts: Vec<(AlertEvent, Option<i64>)>,
    /// Alert transitions to audit (state changes and severity changes); they also go to the
    /// outbox, to be published.
    pub transitions: Vec<AlertEvent>,
    pub next_alert_id: u64,
    /// Outbox entries at or below this were published; deleted in this commit.
    pub published_up_to: Option<i64>,
    /// Agents whose liveness changed.
    pub agents: Vec<(&'a Id, AgentLiveness)>,
}

impl StateStore {
    pub(crate) fn open(path: &Path) -> Result<StateStore, StoreError> {
        let conn = super::open(path)?;
        Ok(StateStore { conn })
    }

    /// Alert events committed but not known to be published (a crash came between), oldest
    /// first, with their outbox seq.
    pub(crate) fn load_outbox(&self) -> Result<Vec<(i64, AlertEvent)>, StoreError> {
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
    pub(crate) fn published(&mut self, seq: i64) -> Result<(), StoreError> {
        self.conn
            .execute("DELETE FROM outbox WHERE seq <= ?1", params![seq])?;
        Ok(())
    }

    /// Every device's saved state.
    pub(crate) fn load_devices(&self) -> Result<Vec<(Id, SavedDevice)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT device, state, gaps, readings, last_seq, last_ts, arrived FROM device_state",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (device, state, gaps, readings, last_seq, last_ts, arrived) = row?;
            let Ok(id) = Id::new(device) else { continue };
            let mut state: DeviceState = serde_json::from_str(&state)?;
            // Rows written before the columns existed carry them in `state`.
            if let Some(seq) = last_seq {
                state.last_seq = seq.max(0) as u64;
            }
            if last_ts.is_some() {
                state.last_ts = last_ts;
            }
            out.push((
                id,
                SavedDevice {
                    state,
                    gaps: gaps.max(0) as u64,
                    readings: readings.max(0) as u64,
                    arrived,
                },
            ));
        }
        Ok(out)
    }

    /// Every agent's saved liveness.
    pub(crate) fn load_agents(&self) -> Result<Vec<(Id, AgentLiveness)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT agent, down, silent, watermark, heard FROM agent_state")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                AgentLiveness {
                    down: r.get::<_, i64>(1)? != 0,
                    silent: r.get::<_, i64>(2)? != 0,
                    watermark: r.get(3)?,
                    heard: r.get(4)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (agent, saved) = row?;
            if let Ok(id) = Id::new(agent) {
                out.push((id, saved));
            }
        }
        Ok(out)
    }

    /// Open alerts and the next alert id.
    pub(crate) fn load_alerts(&self) -> Result<(Vec<OpenAlert>, u64), StoreError> {
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
    pub(crate) fn commit(&mut self, c: &Commit<'_>, now_ms: i64) -> Result<Committed, StoreError> {
        let tx = self.conn.transaction()?;
        let mut last_outbox = 0;
        let mut log_seqs = Vec::with_capacity(c.transitions.len());
        let mut hashes = Vec::with_capacity(c.devices.len());
        {
            let mut put_state = tx.prepare_cached(
                "INSERT INTO device_state (device, state, gaps, readings, last_seq, last_ts, arrived)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(device) DO UPDATE SET state = ?2, gaps = ?3, readings = ?4,
                   last_seq = ?5, last_ts = ?6, arrived = ?7",
            )?;
            let mut put_hot = tx.prepare_cached(
                "UPDATE device_state SET gaps = ?2, readings = ?3, last_seq = ?4, last_ts = ?5,
                   arrived = ?6 WHERE device = ?1",
            )?;
            let mut json = Vec::with_capacity(2048);
            for (id, saved, known) in &c.devices {
                json.clear();
                serde_json::to_writer(&mut json, &saved.state)?;
                let h = state_hash(&json);
                let hot = params![
                    id.as_str(),
                    saved.gaps as i64,
                    saved.readings as i64,
                    saved.state.last_seq as i64,
                    saved.state.last_ts,
                    saved.arrived
                ];
                if h != *known || put_hot.execute(hot)? != 1 {
                    put_state.execute(params![
                        id.as_str(),
                        std::str::from_utf8(&json).unwrap_or("{}"),
                        saved.gaps as i64,
                        saved.readings as i64,
                        saved.state.last_seq as i64,
                        saved.state.last_ts,
                        saved.arrived
                    ])?;
                }
                hashes.push(h);
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
            let mut put_agent = tx.prepare_cached(
                "INSERT INTO agent_state (agent, down, silent, watermark, heard) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(agent) DO UPDATE SET down = ?2, silent = ?3, watermark = ?4, heard = ?5",
            )?;
            for (id, a) in &c.agents {
                put_agent.execute(params![
                    id.as_str(),
                    i64::from(a.down),
                    i64::from(a.silent),
                    a.watermark,
                    a.heard
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
            hashes,
        })
    }
}

/// Checkpoints the registry file's WAL off the ingest thread, every second: PASSIVE (never
/// waits for, nor blocks, the writer); when the WAL has grown past [`WAL_RESTART_PAGES`]
/// anyway, a RESTART checkpoint (which waits for readers briefly) so it starts over.
pub(crate) struct Checkpointer;

/// WAL pages (4 KiB) beyond which the checkpointer forces the log to start over.
pub(crate) const WAL_RESTART_PAGES: i64 = 65_536;

impl Checkpointer {
    pub(crate) fn spawn(
        path: &Path,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<std::thread::JoinHandle<()>, StoreError> {
        let conn = super::open(path)?;
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
pub(crate) struct Committed {
    /// Outbox seq of the last transition (0 without any).
    pub outbox: i64,
    /// `alert_log` seq of each transition, in order: the SSE event ids.
    pub log_seqs: Vec<i64>,
    /// [`state_hash`] of each device's state as now stored, in the order of `devices`.
    pub hashes: Vec<u64>,
}

/// A hash of a device state's JSON (which leaves out `last_seq` and `last_ts`): equal when
/// nothing but those changed, so the commit need not rewrite it.
pub(crate) fn state_hash(json: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    json.hash(&mut h);
    h.finish() | 1
}

/// Read-only access to the alerts for the HTTP API (its own connection: reads never wait for
/// ingest, WAL lets them run beside its commits).
pub(crate) struct AlertReader {
    conn: Connection,
}

impl AlertReader {
    pub(crate) fn open(path: &Path) -> Result<AlertReader, StoreError> {
        Ok(AlertReader {
            conn: super::open_reader(path)?,
        })
    }

    /// Alerts, newest first, filtered, with the number matching.
    pub(crate) fn alerts(
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
    pub(crate) fn alert(&self, id: &str) -> Result<Option<AlertEvent>, StoreError> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT event FROM alert WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        Ok(text.and_then(|t| AlertEvent::decode(t.as_bytes()).ok()))
    }

    /// Logged transitions after `after` (of `owner` only, when given), oldest first, at most
    /// `limit`; `None` when `after` is older than what the log keeps (the client must resync).
    pub(crate) fn log_after(
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
}

/// Filters of `GET /api/alerts`.
#[derive(Debug, Default, Clone)]
pub(crate) struct AlertFilter {
    pub state: Option<String>,
    pub kind: Option<String>,
    pub owner: Option<String>,
    pub device: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(store: &mut StateStore, id: &Id, saved: &SavedDevice, known: u64) -> u64 {
        let c = Commit {
            devices: vec![(id, saved, known)],
            next_alert_id: 1,
            ..Commit::default()
        };
        store.commit(&c, 0).unwrap().hashes[0]
    }

    #[test]
    fn unchanged_state_updates_counters_only_and_loads_back_whole() {
        let dir = std::env::temp_dir().join(format!("calwatch-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.db");
        let _ = std::fs::remove_file(&path);
        let mut store = StateStore::open(&path).unwrap();
        let id = Id::new("D1").unwrap();
        let mut saved = SavedDevice::default();
        saved.state.last_seq = 1;
        saved.state.last_ts = Some(1000);
        saved.state.sale_id = Some(5.0);
        let h1 = commit(&mut store, &id, &saved, 0);
        // Only the counters move: same hash, the row's JSON untouched, the counters new.
        saved.state.last_seq = 2;
        saved.state.last_ts = Some(2000);
        saved.readings = 2;
        let h2 = commit(&mut store, &id, &saved, h1);
        assert_eq!(h1, h2);
        let loaded = store.load_devices().unwrap();
        assert_eq!(loaded, vec![(id.clone(), saved.clone())]);
        // The checks learned something: rewritten.
        saved.state.sale_id = Some(6.0);
        saved.state.last_seq = 3;
        let h3 = commit(&mut store, &id, &saved, h2);
        assert_ne!(h3, h2);
        assert_eq!(
            store.load_devices().unwrap(),
            vec![(id.clone(), saved.clone())]
        );
        // A stale hash (another process wrote meanwhile) still writes the whole row.
        saved.state.sale_id = Some(7.0);
        commit(&mut store, &id, &saved, 12345);
        assert_eq!(store.load_devices().unwrap()[0].1, saved);
        // A row from before the columns existed: last_seq and last_ts from its JSON.
        store
            .conn
            .execute(
                "INSERT INTO device_state (device, state, gaps, readings) VALUES ('OLD', '{\"last_seq\":9,\"last_ts\":99}', 0, 9)",
                [],
            )
            .unwrap();
        let old = store.load_devices().unwrap();
        let old = &old.iter().find(|(i, _)| i.as_str() == "OLD").unwrap().1;
        assert_eq!((old.state.last_seq, old.state.last_ts), (9, Some(99)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
