//! Every table of the gateway's database and the one migration path to them.
//!
//! One SQLite file holds the registry (`device`, `verification`, `registry_generation`,
//! `token`), the audit chain (`audit`) and the check state (`device_state`, `alert`,
//! `alert_log`, `outbox`, `meta`). Its `user_version` is the number of [`MIGRATIONS`] applied;
//! [`migrate`] applies the missing ones in order, each in one transaction, so a gateway, an
//! import and a `token` command opening the same file agree on its shape.

use rusqlite::Connection;

/// The registry: instruments, their certificates, and a generation counter bumped by every
/// write to them, so a running gateway sees that another process (an import) changed them
/// (the state store shares the file, so SQLite's own `data_version`, which moves with any
/// commit, cannot tell).
const REGISTRY: &str = "
CREATE TABLE IF NOT EXISTS device (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL, site TEXT NOT NULL,
    agent TEXT NOT NULL, model TEXT NOT NULL, serial TEXT NOT NULL, accuracy_class TEXT,
    max REAL, e REAL, mpe_pct REAL, interval_s INTEGER NOT NULL, reference_device TEXT
);
CREATE TABLE IF NOT EXISTS verification (
    device TEXT NOT NULL REFERENCES device(id), certificate TEXT NOT NULL,
    verified_at INTEGER NOT NULL, valid_until INTEGER, result TEXT NOT NULL,
    verifier TEXT NOT NULL, event_counter REAL, k_factor REAL,
    PRIMARY KEY (device, certificate)
);
CREATE TABLE IF NOT EXISTS registry_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL
);
INSERT OR IGNORE INTO registry_generation (id, n) VALUES (1, 0);
";

/// API tokens (CONTRACT §3): only a hash of the secret is kept.
const TOKENS: &str = "
CREATE TABLE IF NOT EXISTS token (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL, owner TEXT,
    hash TEXT NOT NULL, created INTEGER NOT NULL, revoked INTEGER
);";

/// The hash-chained audit log (DESIGN "Delivery and state"), append-only by trigger.
const AUDIT: &str = "
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    subject TEXT NOT NULL, old TEXT NOT NULL, new TEXT NOT NULL, why TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;";

/// Check state: per device, the alerts (open and resolved), the log the SSE stream replays,
/// the outbox of events not yet known published, and counters (`next_alert_id`).
const STATE: &str = "
CREATE TABLE IF NOT EXISTS device_state (
    device TEXT PRIMARY KEY, state TEXT NOT NULL, gaps INTEGER NOT NULL DEFAULT 0,
    readings INTEGER NOT NULL DEFAULT 0, last_seq INTEGER, last_ts INTEGER
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

/// A step from one schema version to the next.
type Migration = fn(&Connection) -> rusqlite::Result<()>;

/// The schema's history: version N is reached by applying the first N steps. Append only;
/// never edit a step that has shipped.
const MIGRATIONS: &[Migration] = &[v1_tables, v2_liveness];

/// The version [`migrate`] brings a database to.
pub(crate) const VERSION: i64 = MIGRATIONS.len() as i64;

/// Step 1: every table. Files made before `user_version` was kept (version 0) may have
/// them already, some without the columns added since; those columns are added here.
fn v1_tables(conn: &Connection) -> rusqlite::Result<()> {
    for sql in [REGISTRY, TOKENS, AUDIT, STATE] {
        conn.execute_batch(sql)?;
    }
    for (column, add) in [
        (
            "readings",
            "ALTER TABLE device_state ADD COLUMN readings INTEGER NOT NULL DEFAULT 0",
        ),
        (
            "last_seq",
            "ALTER TABLE device_state ADD COLUMN last_seq INTEGER; ALTER TABLE device_state ADD COLUMN last_ts INTEGER;",
        ),
    ] {
        let has: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('device_state') WHERE name = ?1")?
            .exists([column])?;
        if !has {
            conn.execute_batch(add)?;
        }
    }
    Ok(())
}

/// Step 2: liveness survives a restart (decision 11): when each device's last reading
/// arrived, and per agent whether it is down (last will) or silent, its event-time watermark
/// and when it was last heard from.
fn v2_liveness(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "ALTER TABLE device_state ADD COLUMN arrived INTEGER;
         CREATE TABLE IF NOT EXISTS agent_state (
             agent TEXT PRIMARY KEY, down INTEGER NOT NULL DEFAULT 0,
             silent INTEGER NOT NULL DEFAULT 0, watermark INTEGER, heard INTEGER
         );",
    )
}

/// Brings the database to [`VERSION`], one transaction a step; a database newer than this
/// binary is refused rather than misread.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    let at: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if at > VERSION {
        return Err(MigrateError::Newer { at, known: VERSION });
    }
    for (i, step) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(at).unwrap_or(0))
    {
        let tx = conn.transaction()?;
        step(&tx)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("schema version {at} is newer than this gateway knows ({known}); upgrade the gateway")]
    Newer { at: i64, known: i64 },
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tables(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'trigger') ORDER BY name",
            )
            .unwrap();
        let names = stmt.query_map([], |r| r.get(0)).unwrap();
        names.map(|n| n.unwrap()).collect()
    }

    #[test]
    fn a_new_file_gets_every_table_and_the_version() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, VERSION);
        let names = tables(&conn);
        for t in [
            "alert",
            "alert_log",
            "audit",
            "audit_no_delete",
            "audit_no_update",
            "device",
            "device_state",
            "meta",
            "outbox",
            "registry_generation",
            "token",
            "verification",
        ] {
            assert!(names.iter().any(|n| n == t), "{t} missing from {names:?}");
        }
        // Again: nothing to do, nothing changes.
        migrate(&mut conn).unwrap();
        assert_eq!(tables(&conn), names);
    }

    #[test]
    fn an_old_file_gains_the_columns_added_since() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE device_state (device TEXT PRIMARY KEY, state TEXT NOT NULL, gaps INTEGER NOT NULL DEFAULT 0);
             INSERT INTO device_state (device, state) VALUES ('S-1', '{}');",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let (readings, last_seq): (i64, Option<i64>) = conn
            .query_row(
                "SELECT readings, last_seq FROM device_state WHERE device = 'S-1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((readings, last_seq), (0, None));
    }

    #[test]
    fn a_newer_file_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", VERSION + 1)
            .unwrap();
        let err = migrate(&mut conn).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
