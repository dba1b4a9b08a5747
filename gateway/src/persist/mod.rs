//! Persistence: the one SQLite file of a gateway and everything kept in it. This module
//! opens it (one set of pragmas, [`schema`] brought up to date); the registry of devices and
//! certificates ([`registry`]), the check state, alerts and outbox ([`state`]), the audit
//! chain ([`audit`]) and the API tokens ([`tokens`]) each read and write their own tables.
//! The domain model they load and store is `crate::domain`; nothing here judges a reading.

pub(crate) mod audit;
pub(crate) mod registry;
pub(crate) mod schema;
pub(crate) mod state;
pub(crate) mod tokens;

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

/// The pragmas of every writing connection:
/// - `busy_timeout`: an import or `token` beside a running gateway waits for the gateway's
///   commit instead of failing with "database is locked";
/// - WAL with `synchronous=NORMAL`: a commit is one append to the log, durable at the
///   log's sync; readers (the API) never wait for the writer;
/// - `wal_autocheckpoint=0`: no checkpoint in the commit path (it copies the log into the
///   database and fsyncs it, a stall of tens to hundreds of ms in the middle of a burst);
///   [`state::Checkpointer`] runs them on its own thread.
const PRAGMAS: &str = "PRAGMA busy_timeout=5000; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint=0;";

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
    #[error(transparent)]
    Schema(#[from] schema::MigrateError),
}

impl From<OpenError> for rusqlite::Error {
    fn from(e: OpenError) -> rusqlite::Error {
        match e {
            OpenError::Db(e) => e,
            OpenError::Schema(schema::MigrateError::Db(e)) => e,
            OpenError::Schema(e) => rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                Some(e.to_string()),
            ),
        }
    }
}

/// Opens (creating it and its folder if needed) the database at `path` for writing, with
/// [`PRAGMAS`] and the schema up to date.
pub(crate) fn open(path: &Path) -> Result<Connection, OpenError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let mut conn = Connection::open(path)?;
    conn.execute_batch(PRAGMAS)?;
    schema::migrate(&mut conn)?;
    Ok(conn)
}

/// A database in memory with the full schema (benchmarks, tests).
pub(crate) fn open_in_memory() -> Result<Connection, OpenError> {
    let mut conn = Connection::open_in_memory()?;
    schema::migrate(&mut conn)?;
    Ok(conn)
}

/// A read-only connection (the API's alert queries): never writes, never waits on the
/// writer; the schema is the writer's to keep.
pub(crate) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.execute_batch("PRAGMA busy_timeout=5000;")?;
    Ok(conn)
}
