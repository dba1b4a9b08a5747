//! The audit log: every registry change and every alert transition, append-only and
//! hash-chained (who, when, what, old, new, why).
//!
//! Each entry carries the SHA-256 of the previous entry's hash and its own content, so
//! removing, reordering or editing an entry breaks the chain from there on; `verify`
//! finds the first broken entry. The log lives in the registry's SQLite file so a registry
//! change and its audit entry commit in one transaction.

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

/// One audit entry before it is chained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// When, Unix ms (wall clock of the change).
    pub ts: i64,
    /// Who: a token's name, `import:<file>`, `gateway` for automatic alert transitions.
    pub actor: String,
    /// What happened, e.g. `device.upsert`, `certificate.record`, `alert.active`.
    pub action: String,
    /// What it happened to: a device id, an alert id.
    pub subject: String,
    /// JSON of the value before (`null` when new).
    pub old: String,
    /// JSON of the value after.
    pub new: String,
    pub why: String,
}

/// Why the chain does not verify.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    #[error("audit entry {seq}: {detail}")]
    Broken { seq: i64, detail: String },
    #[error("audit log: {0}")]
    Db(String),
}

/// Hash of the chain's start.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn hash(seq: i64, prev: &str, e: &AuditEntry) -> String {
    let mut h = Sha256::new();
    // Length-prefixed fields: no two different entries hash the same bytes.
    for part in [
        seq.to_string().as_str(),
        prev,
        e.ts.to_string().as_str(),
        &e.actor,
        &e.action,
        &e.subject,
        &e.old,
        &e.new,
        &e.why,
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Appends `entry` to the chain (inside the caller's transaction, if any); returns its seq.
pub(crate) fn append(conn: &Connection, entry: &AuditEntry) -> rusqlite::Result<i64> {
    let last: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, GENESIS.to_string()),
    };
    let h = hash(seq, &prev, entry);
    conn.execute(
        "INSERT INTO audit (seq, ts, actor, action, subject, old, new, why, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            seq,
            entry.ts,
            entry.actor,
            entry.action,
            entry.subject,
            entry.old,
            entry.new,
            entry.why,
            prev,
            h
        ],
    )?;
    Ok(seq)
}

/// The last `limit` entries, newest first.
pub(crate) fn tail(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<AuditEntry>> {
    let mut stmt = conn.prepare(
        "SELECT ts, actor, action, subject, old, new, why FROM audit ORDER BY seq DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
        Ok(AuditEntry {
            ts: r.get(0)?,
            actor: r.get(1)?,
            action: r.get(2)?,
            subject: r.get(3)?,
            old: r.get(4)?,
            new: r.get(5)?,
            why: r.get(6)?,
        })
    })?;
    rows.collect()
}

/// Checks the whole chain; returns the number of entries.
pub(crate) fn verify(conn: &Connection) -> Result<u64, AuditError> {
    let db = |e: rusqlite::Error| AuditError::Db(e.to_string());
    let mut stmt = conn
        .prepare("SELECT seq, ts, actor, action, subject, old, new, why, prev_hash, hash FROM audit ORDER BY seq")
        .map_err(db)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                AuditEntry {
                    ts: r.get(1)?,
                    actor: r.get(2)?,
                    action: r.get(3)?,
                    subject: r.get(4)?,
                    old: r.get(5)?,
                    new: r.get(6)?,
                    why: r.get(7)?,
                },
                r.get::<_, String>(8)?,
                r.get::<_, String>(9)?,
            ))
        })
        .map_err(db)?;
    let mut expected_prev = GENESIS.to_string();
    let mut expected_seq = 1;
    for row in rows {
        let (seq, entry, prev, stored) = row.map_err(db)?;
        if seq != expected_seq {
            return Err(AuditError::Broken {
                seq,
                detail: format!("expected entry {expected_seq}: entries missing"),
            });
        }
        if prev != expected_prev {
            return Err(AuditError::Broken {
                seq,
                detail: "does not follow the previous entry's hash".into(),
            });
        }
        if hash(seq, &prev, &entry) != stored {
            return Err(AuditError::Broken {
                seq,
                detail: "content does not match its hash (edited)".into(),
            });
        }
        expected_prev = stored;
        expected_seq += 1;
    }
    Ok((expected_seq - 1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: i64) -> AuditEntry {
        AuditEntry {
            ts: 1_000 + i,
            actor: "verifier-1".into(),
            action: "certificate.record".into(),
            subject: format!("S-{i}"),
            old: "null".into(),
            new: format!("{{\"n\":{i}}}"),
            why: "annual verification".into(),
        }
    }

    #[test]
    fn chain_verifies_and_detects_tampering() {
        let conn = crate::persist::open_in_memory().unwrap();
        for i in 0..5 {
            assert_eq!(append(&conn, &entry(i)).unwrap(), i + 1);
        }
        assert_eq!(verify(&conn).unwrap(), 5);
        // The triggers refuse edits through SQL ...
        assert!(conn
            .execute("UPDATE audit SET why = 'x' WHERE seq = 2", [])
            .is_err());
        assert!(conn.execute("DELETE FROM audit WHERE seq = 2", []).is_err());
        // ... and an edit that bypasses them is found by the hash.
        conn.execute_batch(
            "DROP TRIGGER audit_no_update; UPDATE audit SET new = '{\"n\":99}' WHERE seq = 3;",
        )
        .unwrap();
        assert_eq!(
            verify(&conn),
            Err(AuditError::Broken {
                seq: 3,
                detail: "content does not match its hash (edited)".into()
            })
        );
    }

    #[test]
    fn removed_entry_is_found() {
        let conn = crate::persist::open_in_memory().unwrap();
        for i in 0..3 {
            append(&conn, &entry(i)).unwrap();
        }
        conn.execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 2;")
            .unwrap();
        assert!(matches!(
            verify(&conn),
            Err(AuditError::Broken { seq: 3, .. })
        ));
    }
}
