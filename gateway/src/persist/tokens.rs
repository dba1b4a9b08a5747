//! Bearer tokens and roles (CONTRACT §3).
//!
//! A token reads `cw_<id>_<secret>`: `id` finds its row, `secret` (32 random bytes, hex) is
//! checked against the stored SHA-256 with a constant-time comparison. Only the hash is kept;
//! the token is printed once by `calwatch-gateway token`. Tokens live in the registry file
//! (`token` table); creating and revoking one is audited like any registry change.

use std::path::Path;
use std::sync::Mutex;

use calwatch_protocol::Id;
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use super::registry::{Registry, RegistryError};
use crate::domain::now_ms;
pub(crate) use crate::domain::role::{Principal, Role};

/// Why a token could not be made or revoked.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("token store: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("no random bytes from the operating system")]
    Random,
}

fn secret_hash(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Equal without a timing difference that depends on where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Makes a token; returns it (the only time it exists in clear).
pub fn create(
    registry: &mut Registry,
    name: &str,
    role: Role,
    owner: Option<&str>,
    actor: &str,
) -> Result<String, TokenError> {
    let owner = match (role, owner) {
        (Role::Owner, Some(o)) => {
            Some(Id::new(o).map_err(|e| TokenError::Invalid(format!("--owner: {e}")))?)
        }
        (Role::Owner, None) => {
            return Err(TokenError::Invalid(
                "--owner is required for an owner token".into(),
            ))
        }
        (_, Some(_)) => {
            return Err(TokenError::Invalid(format!(
                "--owner applies to owner tokens only, not {}",
                role.as_str()
            )))
        }
        (_, None) => None,
    };
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(TokenError::Invalid(
            "--name: 1 to 128 printable characters".into(),
        ));
    }
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| TokenError::Random)?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tx = registry.conn().unchecked_transaction()?;
    let exists: bool = tx
        .prepare("SELECT 1 FROM token WHERE name = ?1")?
        .exists([name])?;
    if exists {
        return Err(TokenError::Invalid(format!(
            "a token named {name:?} exists (revoke it first)"
        )));
    }
    tx.execute(
        "INSERT INTO token (name, role, owner, hash, created) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            name,
            role.as_str(),
            owner.as_ref().map(Id::as_str),
            secret_hash(&secret),
            now_ms()
        ],
    )?;
    let id = tx.last_insert_rowid();
    super::audit::append(
        &tx,
        &super::audit::AuditEntry {
            ts: now_ms(),
            actor: actor.into(),
            action: "token.create".into(),
            subject: name.into(),
            old: "null".into(),
            new: serde_json::json!({"name": name, "role": role.as_str(), "owner": owner.as_ref().map(Id::as_str), "id": id}).to_string(),
            why: String::new(),
        },
    )?;
    tx.commit()?;
    Ok(format!("cw_{id}_{secret}"))
}

/// Revokes the token called `name`; false when there is none (or it was revoked already).
pub fn revoke(registry: &mut Registry, name: &str, actor: &str) -> Result<bool, TokenError> {
    let tx = registry.conn().unchecked_transaction()?;
    let n = tx.execute(
        "UPDATE token SET revoked = ?2 WHERE name = ?1 AND revoked IS NULL",
        params![name, now_ms()],
    )?;
    if n > 0 {
        super::audit::append(
            &tx,
            &super::audit::AuditEntry {
                ts: now_ms(),
                actor: actor.into(),
                action: "token.revoke".into(),
                subject: name.into(),
                old: "null".into(),
                new: "null".into(),
                why: String::new(),
            },
        )?;
    }
    tx.commit()?;
    Ok(n > 0)
}

/// Checks bearer tokens against the registry file (read at every request, so a token made
/// or revoked while the gateway runs counts at once).
pub(crate) struct Authenticator {
    conn: Mutex<Connection>,
}

impl Authenticator {
    pub(crate) fn open(path: &Path) -> Result<Authenticator, rusqlite::Error> {
        let conn = super::open(path)?;
        Ok(Authenticator {
            conn: Mutex::new(conn),
        })
    }

    /// The principal of `token`, or `None` when it is malformed, unknown, revoked or wrong.
    pub(crate) fn check(&self, token: &str) -> Option<Principal> {
        let rest = token.strip_prefix("cw_")?;
        let (id, secret) = rest.split_once('_')?;
        let id: i64 = id.parse().ok()?;
        if secret.len() != 64 {
            return None;
        }
        let conn = self.conn.lock().ok()?;
        type Row = (String, String, Option<String>, String, Option<i64>);
        let row: Option<Row> = conn
            .prepare_cached("SELECT name, role, owner, hash, revoked FROM token WHERE id = ?1")
            .ok()?
            .query_row([id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
            .ok()?;
        // Hash even when the row is missing, so an unknown id costs the same.
        let presented = secret_hash(secret);
        let (name, role, owner, hash, revoked) = row?;
        if !constant_time_eq(presented.as_bytes(), hash.as_bytes()) || revoked.is_some() {
            return None;
        }
        let role = Role::parse(&role)?;
        // Fail closed: an owner token is confined to its owner id; one whose stored owner is
        // missing or not a valid id is refused, never treated as unscoped.
        let owner = match (role, owner) {
            (Role::Owner, Some(o)) => Some(Id::new(o).ok()?),
            (Role::Owner, None) => return None,
            (_, Some(_)) => return None,
            (_, None) => None,
        };
        Some(Principal { name, role, owner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_by_hash_and_can_be_revoked() {
        let dir = std::env::temp_dir().join(format!("calwatch-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.db");
        let mut reg = Registry::open(&path).unwrap();
        let t = create(&mut reg, "ana", Role::Owner, Some("market-1"), "cli").unwrap();
        assert!(t.starts_with("cw_") && t.len() > 64);
        assert!(create(&mut reg, "ana", Role::Supervisor, None, "cli").is_err());
        assert!(create(&mut reg, "bob", Role::Owner, None, "cli").is_err());
        assert!(create(&mut reg, "bob", Role::Verifier, Some("x"), "cli").is_err());
        let auth = Authenticator::open(&path).unwrap();
        let p = auth.check(&t).unwrap();
        assert_eq!(
            (p.role, p.owner.as_ref().map(Id::as_str)),
            (Role::Owner, Some("market-1"))
        );
        assert!(p.sees("market-1") && !p.sees("market-2"));
        // One changed character, a truncated token, another id: refused.
        let mut bad = t.clone().into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        assert!(auth.check(std::str::from_utf8(&bad).unwrap()).is_none());
        assert!(auth.check(&t[..t.len() - 1]).is_none());
        assert!(auth.check(&t.replacen("cw_1_", "cw_2_", 1)).is_none());
        assert!(auth.check("").is_none() && auth.check("cw__").is_none());
        // Only the hash is stored.
        let stored: String = reg
            .conn()
            .query_row("SELECT hash FROM token", [], |r| r.get(0))
            .unwrap();
        assert!(!t.contains(&stored));
        assert!(revoke(&mut reg, "ana", "cli").unwrap());
        assert!(auth.check(&t).is_none());
        assert!(!revoke(&mut reg, "ana", "cli").unwrap());
        let tail = reg.audit_tail(2).unwrap();
        assert_eq!(tail[0].action, "token.revoke");
        assert_eq!(tail[1].action, "token.create");
        assert!(!tail[1].new.contains(&t[5..]));
        reg.verify_audit().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Issue #19: an owner token whose stored owner does not validate (a row edited by hand,
    /// an id rule tightened since) used to become an *unscoped* owner that saw every device.
    #[test]
    fn an_owner_token_with_a_bad_stored_owner_is_refused_not_unscoped() {
        let dir = std::env::temp_dir().join(format!("calwatch-auth-fc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.db");
        let mut reg = Registry::open(&path).unwrap();
        let owner = create(&mut reg, "ana", Role::Owner, Some("market-1"), "cli").unwrap();
        let sup = create(&mut reg, "sue", Role::Supervisor, None, "cli").unwrap();
        let auth = Authenticator::open(&path).unwrap();
        assert!(auth.check(&owner).is_some());
        for stored in [Some("not an id!"), Some(""), None] {
            reg.conn()
                .execute("UPDATE token SET owner = ?1 WHERE name = 'ana'", [stored])
                .unwrap();
            assert!(auth.check(&owner).is_none(), "owner {stored:?} accepted");
        }
        // A non-owner token that carries an owner is as suspect.
        reg.conn()
            .execute("UPDATE token SET owner = 'market-1' WHERE name = 'sue'", [])
            .unwrap();
        assert!(auth.check(&sup).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
