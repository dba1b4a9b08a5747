//! The registry of instruments and their verification certificates (SQLite), loaded into
//! memory for the hot path, and the CSV import of CONTRACT §2.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use calwatch_protocol::Id;
use rusqlite::{params, Connection, OptionalExtension};

use crate::audit::AuditEntry;
use crate::civil::parse_iso8601;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Audits an imported row when it changes something: `kind.update` for a known subject,
/// `kind.<created>` for a new one; an unchanged row adds no entry.
#[allow(clippy::too_many_arguments)]
fn audit_change(
    tx: &rusqlite::Transaction<'_>,
    now: i64,
    actor: &str,
    (kind, created): (&str, &str),
    subject: String,
    old: Option<serde_json::Value>,
    new: serde_json::Value,
    file: &Path,
) -> rusqlite::Result<()> {
    if old.as_ref() == Some(&new) {
        return Ok(());
    }
    crate::audit::append(
        tx,
        &AuditEntry {
            ts: now,
            actor: actor.to_string(),
            action: format!("{kind}.{}", if old.is_some() { "update" } else { created }),
            subject,
            old: old.map(|v| v.to_string()).unwrap_or_else(|| "null".into()),
            new: new.to_string(),
            why: format!("import {}", file.display()),
        },
    )
    .map(|_| ())
}

/// A device as JSON for the audit log.
fn device_json(d: &Device) -> serde_json::Value {
    serde_json::json!({
        "id": d.id.as_str(), "kind": d.kind.as_str(), "owner": d.owner.as_str(), "site": d.site.as_str(),
        "agent": d.agent.as_str(), "model": d.model, "serial": d.serial, "accuracy_class": d.accuracy_class,
        "max": d.max, "e": d.e, "mpe_pct": d.mpe_pct, "interval_s": d.interval_s,
        "reference_device": d.reference_device.as_ref().map(|r| r.as_str()),
    })
}

/// A certificate as JSON for the audit log.
fn certificate_json(c: &Certificate) -> serde_json::Value {
    serde_json::json!({
        "certificate": c.certificate, "verified_at": c.verified_at, "valid_until": c.valid_until,
        "result": if c.passed { "pass" } else { "fail" }, "verifier": c.verifier,
        "event_counter": c.event_counter, "k_factor": c.k_factor,
    })
}

/// Short text of a device record (model, serial, class, certificate number, verifier):
/// inline up to 24 bytes, so most take no heap block of their own (100,000 devices).
pub type Text = compact_str::CompactString;

/// Instrument families with their own checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    Scale,
    Dispenser,
    EnergyMeter,
    Other,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Scale => "scale",
            DeviceKind::Dispenser => "dispenser",
            DeviceKind::EnergyMeter => "energy_meter",
            DeviceKind::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceKind> {
        Some(match s {
            "scale" => DeviceKind::Scale,
            "dispenser" => DeviceKind::Dispenser,
            "energy_meter" => DeviceKind::EnergyMeter,
            "other" => DeviceKind::Other,
            _ => return None,
        })
    }
}

/// Verification state of a device at a moment (the `vstate` tag of CONTRACT §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VState {
    Valid,
    DueSoon,
    Overdue,
    Unverified,
    Failed,
}

impl VState {
    pub fn as_str(self) -> &'static str {
        match self {
            VState::Valid => "valid",
            VState::DueSoon => "due_soon",
            VState::Overdue => "overdue",
            VState::Unverified => "unverified",
            VState::Failed => "failed",
        }
    }
}

/// A verification certificate.
#[derive(Clone, Debug, PartialEq)]
pub struct Certificate {
    pub certificate: Text,
    /// First millisecond of validity.
    pub verified_at: i64,
    /// First millisecond no longer valid (a date-only valid_until covers its whole day).
    pub valid_until: Option<i64>,
    pub passed: bool,
    pub verifier: Text,
    pub event_counter: Option<f64>,
    pub k_factor: Option<f64>,
}

/// A registered instrument.
#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    pub id: Id,
    pub kind: DeviceKind,
    pub owner: Id,
    pub site: Id,
    pub agent: Id,
    pub model: Text,
    pub serial: Text,
    pub accuracy_class: Option<Text>,
    pub max: Option<f64>,
    pub e: Option<f64>,
    pub mpe_pct: Option<f64>,
    pub interval_s: u64,
    pub reference_device: Option<Id>,
    /// Oldest first by `verified_at`.
    pub certificates: Vec<Certificate>,
}

impl Device {
    /// The certificate in force at `at`: the newest verified at or before it (DESIGN decision 2).
    pub fn certificate_at(&self, at: i64) -> Option<&Certificate> {
        self.certificates.iter().rev().find(|c| c.verified_at <= at)
    }

    /// Verification state at `at`, with `lead_ms` of warning before expiry.
    pub fn vstate(&self, at: i64, lead_ms: i64) -> VState {
        match self.certificate_at(at) {
            None => VState::Unverified,
            Some(c) if !c.passed => VState::Failed,
            Some(c) => match c.valid_until {
                Some(until) if at >= until => VState::Overdue,
                Some(until) if at >= until - lead_ms => VState::DueSoon,
                _ => VState::Valid,
            },
        }
    }
}

/// Errors of the registry store.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {path}: {source}")]
    Db {
        path: String,
        source: rusqlite::Error,
    },
    #[error("registry {path}: {detail}")]
    Corrupt { path: String, detail: String },
}

/// A rejected import: the first bad row stops it (CONTRACT §2), nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub reason: String,
}

impl fmt::Display for ImportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file.display(), l, self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for ImportError {}

impl ImportError {
    /// An error about the file as a whole (no row to blame).
    pub(crate) fn whole(file: &Path, reason: String) -> ImportError {
        ImportError {
            file: file.into(),
            line: None,
            reason,
        }
    }
}

const SCHEMA: &str = "
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
-- Bumped by every write to the two tables above, so a running gateway sees that another
-- process (an import) changed them; the state store shares the file, so SQLite's own
-- data_version, which moves with any commit, cannot tell.
CREATE TABLE IF NOT EXISTS registry_generation (
    id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL
);
INSERT OR IGNORE INTO registry_generation (id, n) VALUES (1, 0);
";

/// Marks a write to devices or certificates (inside its transaction).
const BUMP_GENERATION: &str = "UPDATE registry_generation SET n = n + 1 WHERE id = 1";

/// The registry: SQLite on disk, a map in memory.
pub struct Registry {
    conn: Connection,
    path: PathBuf,
    /// Shared with ingest, which keeps each device next to its check state. A set found by
    /// id, so the id is not kept a second time as a key (24 bytes a device).
    devices: HashSet<Entry>,
    /// The `registry_generation` the devices in memory were read at.
    generation: i64,
}

/// A registered device in the registry's set: equal, hashed and borrowed as its id.
#[derive(Debug)]
struct Entry(Arc<Device>);

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for Entry {}

impl std::hash::Hash for Entry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so lookups by `&str` find it (the `Borrow` contract).
        self.0.id.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for Entry {
    fn borrow(&self) -> &str {
        self.0.id.as_str()
    }
}

const DEVICE_COLUMNS: [&str; 13] = [
    "id",
    "kind",
    "owner",
    "site",
    "agent",
    "model",
    "serial",
    "accuracy_class",
    "max",
    "e",
    "mpe_pct",
    "interval_s",
    "reference_device",
];
const VERIFICATION_COLUMNS: [&str; 8] = [
    "device",
    "certificate",
    "verified_at",
    "valid_until",
    "result",
    "verifier",
    "event_counter",
    "k_factor",
];

impl Registry {
    /// Opens (creating if needed) the registry at `path` and loads it.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let db = |source| RegistryError::Db {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(db)?;
        conn.execute_batch(
            // busy_timeout: an import or `token` beside a running gateway waits for its
            // commit instead of failing with "database is locked".
            "PRAGMA busy_timeout=5000; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;",
        )
        .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        crate::audit::init(&conn).map_err(db)?;
        crate::api::auth::init(&conn).map_err(db)?;
        let mut reg = Registry {
            conn,
            path: path.to_path_buf(),
            devices: HashSet::new(),
            generation: 0,
        };
        reg.reload()?;
        Ok(reg)
    }

    /// A registry held in memory only (benchmarks, tests): `devices` as given, certificates
    /// sorted oldest first. Not backed by a file: an import replaces them with what it
    /// imported.
    pub fn from_devices(devices: Vec<Device>) -> Result<Registry, RegistryError> {
        let path = PathBuf::from(":memory:");
        let db = |source| RegistryError::Db {
            path: ":memory:".into(),
            source,
        };
        let conn = Connection::open_in_memory().map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        crate::audit::init(&conn).map_err(db)?;
        crate::api::auth::init(&conn).map_err(db)?;
        let devices = devices
            .into_iter()
            .map(|mut d| {
                d.certificates.sort_by_key(|c| c.verified_at);
                Entry(Arc::new(d))
            })
            .collect();
        Ok(Registry {
            conn,
            path,
            devices,
            generation: 0,
        })
    }

    /// Re-reads every device and certificate from disk.
    /// Whether the devices or certificates on disk changed since they were read into memory,
    /// by another process (an `import` beside the running gateway): then [`Registry::reload`]
    /// catches up. This one's own writes reload as they commit, so they do not count.
    pub fn changed_on_disk(&self) -> Result<bool, RegistryError> {
        Ok(self.generation_on_disk()? != self.generation)
    }

    fn generation_on_disk(&self) -> Result<i64, RegistryError> {
        self.conn
            .query_row("SELECT n FROM registry_generation WHERE id = 1", [], |r| {
                r.get(0)
            })
            .map_err(|source| RegistryError::Db {
                path: self.path.display().to_string(),
                source,
            })
    }

    pub fn reload(&mut self) -> Result<(), RegistryError> {
        let path = self.path.display().to_string();
        let db = |source| RegistryError::Db {
            path: path.clone(),
            source,
        };
        let corrupt = |detail: String| RegistryError::Corrupt {
            path: path.clone(),
            detail,
        };
        // Read first: a write landing during the reload shows as a change next time.
        let generation = self.generation_on_disk()?;
        let mut devices = HashMap::new();
        let mut stmt = self
            .conn
            .prepare("SELECT id, kind, owner, site, agent, model, serial, accuracy_class, max, e, mpe_pct, interval_s, reference_device FROM device")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<f64>>(8)?,
                    r.get::<_, Option<f64>>(9)?,
                    r.get::<_, Option<f64>>(10)?,
                    r.get::<_, i64>(11)?,
                    r.get::<_, Option<String>>(12)?,
                ))
            })
            .map_err(db)?;
        for row in rows {
            let (
                id,
                kind,
                owner,
                site,
                agent,
                model,
                serial,
                class,
                max,
                e,
                mpe,
                interval,
                reference,
            ) = row.map_err(db)?;
            let id_of = |s: String| Id::new(s).map_err(|e| corrupt(e.to_string()));
            let id = id_of(id)?;
            let device = Device {
                kind: DeviceKind::parse(&kind)
                    .ok_or_else(|| corrupt(format!("device {id}: kind {kind:?}")))?,
                owner: id_of(owner)?,
                site: id_of(site)?,
                agent: id_of(agent)?,
                model: model.into(),
                serial: serial.into(),
                accuracy_class: class.map(Text::from),
                max,
                e,
                mpe_pct: mpe,
                interval_s: interval.max(1) as u64,
                reference_device: reference.map(id_of).transpose()?,
                certificates: Vec::new(),
                id: id.clone(),
            };
            devices.insert(id, device);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT device, certificate, verified_at, valid_until, result, verifier, event_counter, k_factor FROM verification ORDER BY verified_at, rowid")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Certificate {
                        certificate: Text::from(r.get::<_, String>(1)?),
                        verified_at: r.get(2)?,
                        valid_until: r.get(3)?,
                        passed: r.get::<_, String>(4)? == "pass",
                        verifier: Text::from(r.get::<_, String>(5)?),
                        event_counter: r.get(6)?,
                        k_factor: r.get(7)?,
                    },
                ))
            })
            .map_err(db)?;
        for row in rows {
            let (device, cert) = row.map_err(db)?;
            if let Some(d) = devices.get_mut(device.as_str()) {
                d.certificates.push(cert);
            }
        }
        self.devices = devices.into_values().map(|d| Entry(Arc::new(d))).collect();
        self.generation = generation;
        Ok(())
    }

    pub fn device(&self, id: &str) -> Option<&Device> {
        self.devices.get(id).map(|e| &*e.0)
    }

    /// The shared record of a device.
    pub fn device_arc(&self, id: &str) -> Option<&Arc<Device>> {
        self.devices.get(id).map(|e| &e.0)
    }

    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().map(|e| &*e.0)
    }

    /// The shared records of all devices.
    pub fn device_arcs(&self) -> impl Iterator<Item = &Arc<Device>> {
        self.devices.iter().map(|e| &e.0)
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Imports `devices.csv` text (new devices are added, known ids updated). All or nothing.
    pub fn import_devices(
        &mut self,
        file: &Path,
        text: &str,
        actor: &str,
    ) -> Result<usize, ImportError> {
        let parsed = self.parse_devices(file, text)?;
        self.write_devices(file, &parsed, actor)
    }

    /// Parses and validates `devices.csv` text against this registry (references must
    /// exist); nothing is written. Each device comes with its line.
    pub fn parse_devices(
        &self,
        file: &Path,
        text: &str,
    ) -> Result<Vec<(u64, Device)>, ImportError> {
        let parsed = parse_device_rows(file, text)?;
        self.validate_devices(file, &parsed)?;
        Ok(parsed)
    }

    /// A device given as a JSON object with the columns of `devices.csv` (numbers or
    /// strings), validated like a CSV row; `source` names it in errors.
    pub fn parse_device_json(
        &self,
        source: &Path,
        obj: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Device, ImportError> {
        let parsed = [(1, device_from_json(source, obj)?)];
        self.validate_devices(source, &parsed)
            .map_err(|e| ImportError::whole(source, e.reason))?;
        let [(_, d)] = parsed;
        Ok(d)
    }

    /// What a device file needs of the registry: every `reference_device` registered or in
    /// the file. Linear: one hash lookup a row (a quadratic scan of 200,000 rows took the
    /// ingest task for minutes, issue #19).
    pub fn validate_devices(
        &self,
        file: &Path,
        parsed: &[(u64, Device)],
    ) -> Result<(), ImportError> {
        let in_file: HashSet<&str> = parsed.iter().map(|(_, d)| d.id.as_str()).collect();
        for (line, d) in parsed {
            if let Some(r) = &d.reference_device {
                if !self.devices.contains(r.as_str()) && !in_file.contains(r.as_str()) {
                    return Err(ImportError {
                        file: file.into(),
                        line: Some(*line),
                        reason: format!("reference_device: unknown device {r}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// What a certificate file needs of the registry: every device registered.
    pub fn validate_certificates(
        &self,
        file: &Path,
        parsed: &[(u64, Id, Certificate)],
    ) -> Result<(), ImportError> {
        for (line, device, _) in parsed {
            if !self.devices.contains(device.as_str()) {
                return Err(ImportError {
                    file: file.into(),
                    line: Some(*line),
                    reason: format!("device: unknown device {device} (import devices.csv first)"),
                });
            }
        }
        Ok(())
    }

    /// Writes parsed devices (audited, one transaction) and reloads.
    pub fn write_devices(
        &mut self,
        file: &Path,
        parsed: &[(u64, Device)],
        actor: &str,
    ) -> Result<usize, ImportError> {
        let db_err = |e: rusqlite::Error| ImportError::whole(file, format!("registry: {e}"));
        let tx = self.conn.transaction().map_err(db_err)?;
        let now = now_ms();
        for (_, d) in parsed {
            let old = self.devices.get(d.id.as_str()).map(|e| device_json(&e.0));
            let new = device_json(d);
            audit_change(
                &tx,
                now,
                actor,
                ("device", "register"),
                d.id.to_string(),
                old,
                new,
                file,
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO device (id, kind, owner, site, agent, model, serial, accuracy_class, max, e, mpe_pct, interval_s, reference_device)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                 ON CONFLICT(id) DO UPDATE SET kind=?2, owner=?3, site=?4, agent=?5, model=?6, serial=?7,
                   accuracy_class=?8, max=?9, e=?10, mpe_pct=?11, interval_s=?12, reference_device=?13",
                params![
                    d.id.as_str(), d.kind.as_str(), d.owner.as_str(), d.site.as_str(), d.agent.as_str(),
                    d.model.as_str(), d.serial.as_str(), d.accuracy_class.as_deref(), d.max, d.e, d.mpe_pct, d.interval_s as i64,
                    d.reference_device.as_ref().map(|r| r.as_str()),
                ],
            )
            .map_err(db_err)?;
        }
        tx.execute(BUMP_GENERATION, []).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        self.reload()
            .map_err(|e| ImportError::whole(file, e.to_string()))?;
        Ok(parsed.len())
    }

    /// Imports `verifications.csv` text. Every device must be registered. All or nothing.
    pub fn import_verifications(
        &mut self,
        file: &Path,
        text: &str,
        actor: &str,
    ) -> Result<usize, ImportError> {
        let parsed = self.parse_verifications(file, text)?;
        self.write_verifications(file, &parsed, actor)
    }

    /// Parses and validates `verifications.csv` text (devices must be registered).
    pub fn parse_verifications(
        &self,
        file: &Path,
        text: &str,
    ) -> Result<Vec<(u64, Id, Certificate)>, ImportError> {
        let parsed = parse_verification_rows(file, text)?;
        self.validate_certificates(file, &parsed)?;
        Ok(parsed)
    }

    /// A certificate given as a JSON object with the columns of `verifications.csv` but
    /// `device` (which comes from the path).
    pub fn parse_certificate_json(
        &self,
        source: &Path,
        device: &str,
        obj: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Certificate, ImportError> {
        let err = |reason: String| ImportError::whole(source, reason);
        let (id, cert) = certificate_from_json(source, device, obj)?;
        if !self.devices.contains(id.as_str()) {
            return Err(err(format!("device: unknown device {id}")));
        }
        Ok(cert)
    }

    /// Writes parsed certificates (audited, one transaction) and reloads.
    pub fn write_verifications(
        &mut self,
        file: &Path,
        parsed: &[(u64, Id, Certificate)],
        actor: &str,
    ) -> Result<usize, ImportError> {
        let db_err = |e: rusqlite::Error| ImportError::whole(file, format!("registry: {e}"));
        let tx = self.conn.transaction().map_err(db_err)?;
        let now = now_ms();
        for (_, device, c) in parsed {
            let old = self
                .devices
                .get(device.as_str())
                .and_then(|e| {
                    e.0.certificates
                        .iter()
                        .find(|o| o.certificate == c.certificate)
                })
                .map(certificate_json);
            let new = certificate_json(c);
            audit_change(
                &tx,
                now,
                actor,
                ("certificate", "record"),
                device.to_string(),
                old,
                new,
                file,
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO verification (device, certificate, verified_at, valid_until, result, verifier, event_counter, k_factor)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(device, certificate) DO UPDATE SET verified_at=?3, valid_until=?4, result=?5,
                   verifier=?6, event_counter=?7, k_factor=?8",
                params![
                    device.as_str(), c.certificate.as_str(), c.verified_at, c.valid_until,
                    if c.passed { "pass" } else { "fail" }, c.verifier.as_str(), c.event_counter, c.k_factor,
                ],
            )
            .map_err(db_err)?;
        }
        tx.execute(BUMP_GENERATION, []).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        self.reload()
            .map_err(|e| ImportError::whole(file, e.to_string()))?;
        Ok(parsed.len())
    }

    /// Records a refused change in the audit log (who tried what, and why it was refused).
    pub fn audit_denied(
        &mut self,
        actor: &str,
        action: &str,
        subject: &str,
        attempted: &str,
        why: &str,
    ) -> Result<(), RegistryError> {
        let db = |source| RegistryError::Db {
            path: self.path.display().to_string(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        crate::audit::append(
            &tx,
            &crate::audit::AuditEntry {
                ts: now_ms(),
                actor: actor.into(),
                action: format!("denied.{action}"),
                subject: subject.into(),
                old: "null".into(),
                new: attempted.into(),
                why: why.into(),
            },
        )
        .map_err(db)?;
        tx.commit().map_err(db)
    }

    /// The audit entries, newest first (for tests and operators).
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<crate::audit::AuditEntry>, RegistryError> {
        crate::audit::tail(&self.conn, limit).map_err(|source| RegistryError::Db {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// The registry's connection, for the token table (same file, same audit chain).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Checks the audit chain; returns its length.
    pub fn verify_audit(&self) -> Result<u64, crate::audit::AuditError> {
        crate::audit::verify(&self.conn)
    }

    /// Number of certificates of a device on disk (for tests and the CLI summary).
    pub fn certificate_count(&self, device: &str) -> Result<u64, RegistryError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM verification WHERE device = ?1",
                [device],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|n| n.unwrap_or(0) as u64)
            .map_err(|source| RegistryError::Db {
                path: self.path.display().to_string(),
                source,
            })
    }
}

type Row = HashMap<&'static str, String>;

/// A JSON object as a row of `columns`: strings as given, numbers in their shortest form,
/// null or absent as empty; any other key is an error naming it.
fn json_row(
    obj: &serde_json::Map<String, serde_json::Value>,
    columns: &[&'static str],
) -> Result<Row, String> {
    let mut row = Row::new();
    for (key, value) in obj {
        let Some(col) = columns.iter().find(|c| **c == key.as_str()) else {
            return Err(format!(
                "{key}: unknown field (expected one of {})",
                columns.join(", ")
            ));
        };
        let text = match value {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => return Err(format!("{key}: expected a string or a number, got {other}")),
        };
        row.insert(col, text);
    }
    for col in columns {
        row.entry(col).or_default();
    }
    Ok(row)
}

/// Reads CSV text with a header naming exactly `columns` (any order), returning each
/// row keyed by column with its 1-based line number.
/// A device given as a JSON object with the columns of `devices.csv`, validated on its own
/// (what needs the registry is [`Registry::validate_devices`]). Pure.
pub fn device_from_json(
    source: &Path,
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<Device, ImportError> {
    let err = |reason: String| ImportError::whole(source, reason);
    let row = json_row(obj, &DEVICE_COLUMNS).map_err(err)?;
    let d = parse_device(&row).map_err(err)?;
    if d.reference_device.as_ref() == Some(&d.id) {
        return Err(err(
            "reference_device: a device cannot be its own reference".into(),
        ));
    }
    Ok(d)
}

/// A certificate of `device` given as a JSON object with the columns of
/// `verifications.csv` but `device`, validated on its own. Pure.
pub fn certificate_from_json(
    source: &Path,
    device: &str,
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<(Id, Certificate), ImportError> {
    let err = |reason: String| ImportError::whole(source, reason);
    if obj.contains_key("device") {
        return Err(err("device: given by the path, not the body".into()));
    }
    let mut row = json_row(obj, &VERIFICATION_COLUMNS[1..]).map_err(err)?;
    row.insert("device", device.to_string());
    parse_verification(&row).map_err(err)
}

/// The rows of a `devices.csv`, each validated on its own and against the file (no id
/// twice, no device its own reference); what needs the registry is
/// [`Registry::validate_devices`]. Pure and linear: the API runs it off the ingest task.
pub fn parse_device_rows(file: &Path, text: &str) -> Result<Vec<(u64, Device)>, ImportError> {
    let rows = parse_csv(file, text, &DEVICE_COLUMNS)?;
    let mut parsed = Vec::with_capacity(rows.len());
    let mut seen: HashSet<Id> = HashSet::with_capacity(rows.len());
    for (line, row) in &rows {
        let err = |reason: String| ImportError {
            file: file.into(),
            line: Some(*line),
            reason,
        };
        let d = parse_device(row).map_err(err)?;
        if !seen.insert(d.id.clone()) {
            return Err(err(format!("id: {} appears twice in this file", d.id)));
        }
        if d.reference_device.as_ref() == Some(&d.id) {
            return Err(err(
                "reference_device: a device cannot be its own reference".into(),
            ));
        }
        parsed.push((*line, d));
    }
    Ok(parsed)
}

/// The rows of a `verifications.csv`, each validated on its own; that the devices exist is
/// [`Registry::validate_certificates`]. Pure: the API runs it off the ingest task.
pub fn parse_verification_rows(
    file: &Path,
    text: &str,
) -> Result<Vec<(u64, Id, Certificate)>, ImportError> {
    let rows = parse_csv(file, text, &VERIFICATION_COLUMNS)?;
    let mut parsed = Vec::with_capacity(rows.len());
    for (line, row) in &rows {
        let (device, cert) = parse_verification(row).map_err(|reason| ImportError {
            file: file.into(),
            line: Some(*line),
            reason,
        })?;
        parsed.push((*line, device, cert));
    }
    Ok(parsed)
}

fn parse_csv(
    file: &Path,
    text: &str,
    columns: &[&'static str],
) -> Result<Vec<(u64, Row)>, ImportError> {
    let err = |line: Option<u64>, reason: String| ImportError {
        file: file.into(),
        line,
        reason,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| err(Some(1), format!("header: {e}")))?
        .clone();
    let mut index = Vec::with_capacity(columns.len());
    for col in columns {
        match header.iter().position(|h| h.trim() == *col) {
            Some(i) => index.push((*col, i)),
            None => {
                return Err(err(
                    Some(1),
                    format!(
                        "header: missing column {col:?} (expected {})",
                        columns.join(",")
                    ),
                ))
            }
        }
    }
    if let Some(extra) = header.iter().find(|h| !columns.contains(&h.trim())) {
        return Err(err(Some(1), format!("header: unknown column {extra:?}")));
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line());
            err(line, format!("{e}"))
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        if record.len() != header.len() {
            return Err(err(
                Some(line),
                format!("{} fields, header has {}", record.len(), header.len()),
            ));
        }
        let row: Row = index
            .iter()
            .map(|(col, i)| (*col, record.get(*i).unwrap_or("").trim().to_string()))
            .collect();
        rows.push((line, row));
    }
    Ok(rows)
}

fn field<'a>(row: &'a Row, col: &str) -> &'a str {
    row.get(col).map(String::as_str).unwrap_or("")
}

fn id_field(row: &Row, col: &str) -> Result<Id, String> {
    Id::new(field(row, col)).map_err(|e| format!("{col}: {e}"))
}

fn opt_number(row: &Row, col: &str) -> Result<Option<f64>, String> {
    let s = field(row, col);
    if s.is_empty() {
        return Ok(None);
    }
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(Some(x)),
        _ => Err(format!("{col}: {s:?} is not a number")),
    }
}

fn positive(row: &Row, col: &str) -> Result<Option<f64>, String> {
    match opt_number(row, col)? {
        Some(x) if x <= 0.0 => Err(format!("{col}: must be positive, got {x}")),
        x => Ok(x),
    }
}

fn parse_device(row: &Row) -> Result<Device, String> {
    let id = id_field(row, "id")?;
    let kind_s = field(row, "kind");
    let kind = DeviceKind::parse(kind_s).ok_or_else(|| {
        format!("kind: {kind_s:?} is not one of scale, dispenser, energy_meter, other")
    })?;
    let class = field(row, "accuracy_class");
    let accuracy_class = match kind {
        DeviceKind::Scale if ["I", "II", "III", "IIII"].contains(&class) => Some(class.to_string()),
        DeviceKind::Scale => {
            return Err(format!(
                "accuracy_class: {class:?} is not a scale class (I, II, III, IIII)"
            ))
        }
        DeviceKind::EnergyMeter if ["0.2S", "0.5S", "1", "2", "A", "B", "C"].contains(&class) => {
            Some(class.to_string())
        }
        DeviceKind::EnergyMeter => {
            return Err(format!(
                "accuracy_class: {class:?} is not a meter class (0.2S, 0.5S, 1, 2, A, B, C)"
            ))
        }
        DeviceKind::Dispenser if !class.is_empty() => {
            return Err(format!(
                "accuracy_class: dispensers leave it empty and give mpe_pct, got {class:?}"
            ))
        }
        _ => (!class.is_empty()).then(|| class.to_string()),
    };
    let max = positive(row, "max")?;
    let e = positive(row, "e")?;
    if kind == DeviceKind::Scale {
        match (max, e) {
            (Some(max), Some(e)) if e <= max => {}
            (Some(_), Some(_)) => return Err("e: verification interval larger than max".into()),
            _ => {
                return Err(
                    "max, e: a scale needs its capacity and verification interval (kg)".into(),
                )
            }
        }
    }
    let mpe_pct = match (kind, positive(row, "mpe_pct")?) {
        (DeviceKind::Dispenser, None) => Some(0.5),
        (_, x) => x,
    };
    let interval = field(row, "interval_s");
    let interval_s = interval
        .parse::<u64>()
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| {
            format!("interval_s: {interval:?} is not a positive whole number of seconds")
        })?;
    let reference = field(row, "reference_device");
    let reference_device = if reference.is_empty() {
        None
    } else {
        Some(id_field(row, "reference_device")?)
    };
    Ok(Device {
        id,
        kind,
        owner: id_field(row, "owner")?,
        site: id_field(row, "site")?,
        agent: id_field(row, "agent")?,
        model: field(row, "model").into(),
        serial: field(row, "serial").into(),
        accuracy_class: accuracy_class.map(Text::from),
        max,
        e,
        mpe_pct,
        interval_s,
        reference_device,
        certificates: Vec::new(),
    })
}

fn parse_verification(row: &Row) -> Result<(Id, Certificate), String> {
    let device = id_field(row, "device")?;
    let certificate = field(row, "certificate").to_string();
    if certificate.is_empty() {
        return Err("certificate: empty".into());
    }
    let verified_at = parse_iso8601(field(row, "verified_at"))
        .map_err(|e| format!("verified_at: {e}"))?
        .start_ms();
    let passed = match field(row, "result") {
        "pass" => true,
        "fail" => false,
        other => return Err(format!("result: {other:?} is not pass or fail")),
    };
    let until = field(row, "valid_until");
    let valid_until = if until.is_empty() {
        if passed {
            return Err("valid_until: a passed verification needs an expiry".into());
        }
        None
    } else {
        Some(
            parse_iso8601(until)
                .map_err(|e| format!("valid_until: {e}"))?
                .end_exclusive_ms(),
        )
    };
    if let Some(u) = valid_until {
        if passed && u <= verified_at {
            return Err("valid_until: not after verified_at".into());
        }
    }
    let verifier = field(row, "verifier").to_string();
    if verifier.is_empty() {
        return Err("verifier: empty".into());
    }
    Ok((
        device,
        Certificate {
            certificate: certificate.into(),
            verified_at,
            valid_until,
            passed,
            verifier: verifier.into(),
            event_counter: opt_number(row, "event_counter")?,
            k_factor: positive(row, "k_factor")?,
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DEVICES: &str = "id,kind,owner,site,agent,model,serial,accuracy_class,max,e,mpe_pct,interval_s,reference_device
S-1,scale,market-3,stall-12,agent-a,FT-112,FT0001,III,15,0.005,,1,
D-1,dispenser,station-17,station-17,agent-b,\"Tatsuno, Sunny\",TS9,,,,,60,
M-1,energy_meter,works-2,plant-1,agent-c,SDM630,E77,1,,,,60,
M-2,energy_meter,works-2,plant-1,agent-c,SDM630,E78,0.5S,,,,60,M-1
";

    fn registry(tag: &str) -> Registry {
        let p = std::env::temp_dir().join(format!("calwatch-reg-{tag}-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Registry::open(&p).unwrap()
    }

    #[test]
    fn import_and_vstate() {
        let mut r = registry("ok");
        assert_eq!(
            r.import_devices(Path::new("devices.csv"), DEVICES, "test")
                .unwrap(),
            4
        );
        assert_eq!(r.device("D-1").unwrap().mpe_pct, Some(0.5));
        assert_eq!(r.device("D-1").unwrap().model, "Tatsuno, Sunny");
        let v = "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor
S-1,C-1,2025-03-01,2026-02-28,pass,bureau-7,7,
S-1,C-2,2026-03-05,,fail,bureau-7,,
";
        assert_eq!(
            r.import_verifications(Path::new("v.csv"), v, "test")
                .unwrap(),
            2
        );
        // 4 devices registered + 2 certificates recorded, chained; a re-import of the same
        // rows changes nothing and adds no entry.
        assert_eq!(r.verify_audit().unwrap(), 6);
        r.import_devices(Path::new("devices.csv"), DEVICES, "test")
            .unwrap();
        assert_eq!(r.verify_audit().unwrap(), 6);
        let s = r.device("S-1").unwrap();
        let day = 86_400_000;
        let feb28 = crate::civil::parse_iso8601("2026-02-28")
            .unwrap()
            .start_ms();
        assert_eq!(s.vstate(feb28 - 40 * day, 30 * day), VState::Valid);
        assert_eq!(s.vstate(feb28 - 10 * day, 30 * day), VState::DueSoon);
        // valid through the end of the day of valid_until
        assert_eq!(s.vstate(feb28 + day - 1, 30 * day), VState::DueSoon);
        assert_eq!(s.vstate(feb28 + day, 30 * day), VState::Overdue);
        assert_eq!(s.vstate(feb28 + 6 * day, 30 * day), VState::Failed);
        assert_eq!(s.vstate(0, 30 * day), VState::Unverified);
        assert_eq!(
            r.device("M-1").unwrap().vstate(feb28, day),
            VState::Unverified
        );
        // survives reopening
        let path = r.path.clone();
        drop(r);
        let r = Registry::open(&path).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r.device("S-1").unwrap().certificates.len(), 2);
    }

    #[test]
    fn changes_by_another_connection_are_noticed_and_own_ones_are_not() {
        let mut r = registry("elsewhere");
        assert!(!r.changed_on_disk().unwrap(), "nothing since opening");
        r.import_devices(Path::new("devices.csv"), DEVICES, "test")
            .unwrap();
        assert!(!r.changed_on_disk().unwrap(), "its own import");
        // The state store shares the file; its commits are not registry changes.
        let mut store = crate::store::StateStore::open(&r.path).unwrap();
        let (id, saved) = (
            Id::new("S-1").unwrap(),
            crate::store::SavedDevice::default(),
        );
        let mut commit = crate::store::Commit::default();
        commit.devices.push((&id, &saved, 0));
        store.commit(&commit, 0).unwrap();
        r.audit_denied("t", "device.import", "x", "{}", "test")
            .unwrap();
        assert!(!r.changed_on_disk().unwrap(), "state and audit commits");
        let mut other = Registry::open(&r.path).unwrap();
        let v = "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor
S-1,C-9,2026-03-01,2027-02-28,pass,bureau-7,7,
";
        other
            .import_verifications(Path::new("v.csv"), v, "cli")
            .unwrap();
        assert!(r.changed_on_disk().unwrap(), "another process's import");
        assert!(r.device("S-1").unwrap().certificates.is_empty());
        r.reload().unwrap();
        assert!(!r.changed_on_disk().unwrap(), "caught up");
        assert_eq!(r.device("S-1").unwrap().certificates.len(), 1);
    }

    #[test]
    fn bad_rows_name_line_and_write_nothing() {
        let mut r = registry("bad");
        let cases = [
            ("S-2,scale,o,s,a,m,x,V,15,0.005,,1,", "accuracy_class"),
            ("S-2,scale,o,s,a,m,x,III,,0.005,,1,", "max, e"),
            ("S-2,crane,o,s,a,m,x,,,,,1,", "kind"),
            ("S 2,scale,o,s,a,m,x,III,15,0.005,,1,", "id:"),
            ("S-2,scale,o,s,a,m,x,III,15,0.005,,0,", "interval_s"),
            (
                "S-2,scale,o,s,a,m,x,III,15,0.005,,1,NOPE",
                "reference_device",
            ),
            ("S-2,scale,o,s,a,m,x,III,15,abc,,1,", "e: \"abc\""),
            ("S-1,scale,o,s,a,m,x,III,15,0.005,,1,", "appears twice"),
        ];
        for (row, why) in cases {
            let text = format!("{}{row}\n", &DEVICES[..DEVICES.find("D-1").unwrap()]);
            let err = r
                .import_devices(Path::new("devices.csv"), &text, "test")
                .unwrap_err();
            assert_eq!(err.line, Some(3), "{row}: {err}");
            assert!(err.to_string().starts_with("devices.csv:3: "), "{err}");
            assert!(err.reason.contains(why), "{row}: {err}");
            assert!(r.is_empty(), "nothing written after {row}");
        }
        let err = r
            .import_devices(Path::new("d.csv"), "id,kind\nS-1,scale\n", "test")
            .unwrap_err();
        assert_eq!(err.line, Some(1));
        assert!(err.reason.contains("missing column"), "{err}");
        r.import_devices(Path::new("devices.csv"), DEVICES, "test")
            .unwrap();
        let err = r
            .import_verifications(Path::new("v.csv"), "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\nS-1,C,2026-01-01,2027-01-01,pass,v,,\nX-9,C,2026-01-01,2027-01-01,pass,v,,\n", "test")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "v.csv:3: device: unknown device X-9 (import devices.csv first)"
        );
        assert_eq!(r.certificate_count("S-1").unwrap(), 0);
        let err = r
            .import_verifications(Path::new("v.csv"), "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\nS-1,C,2026-01-01,2025-01-01,pass,v,,\n", "test")
            .unwrap_err();
        assert!(err.reason.contains("not after"), "{err}");
    }
}
