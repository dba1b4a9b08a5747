//! The registry of instruments and their verification certificates on disk (the `device`,
//! `verification` and `registry_generation` tables), loaded into a [`Devices`] set for the
//! hot path; every write is audited in the same transaction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use calwatch_protocol::Id;
use rusqlite::{params, Connection, OptionalExtension};

use super::audit::AuditEntry;
use crate::domain::civil::Zone;
use crate::domain::{now_ms, Certificate, Device, DeviceKind, Devices, ImportError, Text};

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
    super::audit::append(
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

/// Marks a write to devices or certificates (inside its transaction).
const BUMP_GENERATION: &str = "UPDATE registry_generation SET n = n + 1 WHERE id = 1";

/// The registry: SQLite on disk, a map in memory.
pub struct Registry {
    conn: Connection,
    path: PathBuf,
    /// What is on disk, in memory: the old values of an audited change, and what ingest
    /// takes a copy of (records shared, so the copy is cheap).
    devices: Devices,
    /// The `registry_generation` the devices in memory were read at.
    generation: i64,
}

impl Registry {
    /// Opens (creating if needed) the registry at `path` and loads it.
    pub fn open(path: &Path) -> Result<Registry, RegistryError> {
        let conn = super::open(path).map_err(|e| RegistryError::Db {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        let mut reg = Registry {
            conn,
            path: path.to_path_buf(),
            devices: Devices::default(),
            generation: 0,
        };
        reg.reload()?;
        Ok(reg)
    }

    /// A registry held in memory only (benchmarks, tests): `devices` as given, certificates
    /// sorted oldest first. Not backed by a file: an import replaces them with what it
    /// imported.
    pub fn from_devices(devices: Vec<Device>) -> Result<Registry, RegistryError> {
        let conn = super::open_in_memory().map_err(|e| RegistryError::Db {
            path: ":memory:".into(),
            source: e.into(),
        })?;
        Ok(Registry {
            conn,
            path: PathBuf::from(":memory:"),
            devices: Devices::from_devices(devices),
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
        self.devices = Devices::from_devices(devices.into_values().collect());
        self.generation = generation;
        Ok(())
    }

    /// The devices and their certificates as last read (or written) here.
    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    pub fn device(&self, id: &str) -> Option<&Device> {
        self.devices.device(id)
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
        let parsed = self.devices.parse_devices(file, text)?;
        self.write_devices(file, &parsed, actor)
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
            let old = self.devices.device(d.id.as_str()).map(device_json);
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

    /// Imports `verifications.csv` text, date-only dates as days in `zone` (`[checks]
    /// timezone`). Every device must be registered. All or nothing.
    pub fn import_verifications(
        &mut self,
        file: &Path,
        text: &str,
        actor: &str,
        zone: &Zone,
    ) -> Result<usize, ImportError> {
        let parsed = self.devices.parse_verifications(file, text, zone)?;
        self.write_verifications(file, &parsed, actor)
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
                .device(device.as_str())
                .and_then(|d| {
                    d.certificates
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
        super::audit::append(
            &tx,
            &super::audit::AuditEntry {
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
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<super::audit::AuditEntry>, RegistryError> {
        super::audit::tail(&self.conn, limit).map_err(|source| RegistryError::Db {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// The registry's connection, for the token table (same file, same audit chain).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Checks the audit chain; returns its length.
    pub fn verify_audit(&self) -> Result<u64, super::audit::AuditError> {
        super::audit::verify(&self.conn)
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::domain::VState;

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
            r.import_verifications(Path::new("v.csv"), v, "test", &Zone::utc())
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
        let feb28 = crate::domain::civil::parse_iso8601("2026-02-28")
            .unwrap()
            .start_ms(&Zone::utc());
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
        let mut store = crate::persist::state::StateStore::open(&r.path).unwrap();
        let (id, saved) = (
            Id::new("S-1").unwrap(),
            crate::checks::SavedDevice::default(),
        );
        let mut commit = crate::persist::state::Commit::default();
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
            .import_verifications(Path::new("v.csv"), v, "cli", &Zone::utc())
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
            .import_verifications(Path::new("v.csv"), "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\nS-1,C,2026-01-01,2027-01-01,pass,v,,\nX-9,C,2026-01-01,2027-01-01,pass,v,,\n", "test", &Zone::utc())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "v.csv:3: device: unknown device X-9 (import devices.csv first)"
        );
        assert_eq!(r.certificate_count("S-1").unwrap(), 0);
        let err = r
            .import_verifications(Path::new("v.csv"), "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\nS-1,C,2026-01-01,2025-01-01,pass,v,,\n", "test", &Zone::utc())
            .unwrap_err();
        assert!(err.reason.contains("not after"), "{err}");
    }

    /// Unix ms of an RFC 3339 timestamp.
    fn at(s: &str) -> i64 {
        crate::domain::civil::parse_iso8601(s)
            .unwrap()
            .start_ms(&Zone::utc())
    }

    const HEADER: &str =
        "device,certificate,verified_at,valid_until,result,verifier,event_counter,k_factor\n";

    /// Issue #16, item 9c (DESIGN decision 18): a date-only `valid_until = 2026-02-28` of a
    /// Chinese bureau is valid through the end of that day in Shanghai, so overdue from
    /// 2026-02-28T16:00:00Z, not from 2026-03-01T00:00:00Z as a UTC day would have it.
    #[test]
    fn date_only_dates_are_days_in_the_configured_time_zone() {
        let day = 86_400_000;
        let lead = 30 * day;
        let shanghai = Zone::named("Asia/Shanghai").unwrap();
        let mut r = registry("zone");
        r.import_devices(Path::new("devices.csv"), DEVICES, "test")
            .unwrap();
        let v = format!(
            "{HEADER}S-1,C-1,2025-03-01,2026-02-28,pass,bureau-7,7,\n\
             D-1,C-2,2025-03-01T00:00:00Z,2026-02-28T12:00:00+02:00,pass,bureau-7,,\n"
        );
        r.import_verifications(Path::new("v.csv"), &v, "test", &shanghai)
            .unwrap();
        let s = r.device("S-1").unwrap();
        let c = &s.certificates[0];
        assert_eq!(c.verified_at, at("2025-02-28T16:00:00Z"));
        assert_eq!(c.valid_until, Some(at("2026-02-28T16:00:00Z")));
        assert_eq!(
            s.vstate(at("2025-02-28T15:59:59.999Z"), lead),
            VState::Unverified
        );
        assert_eq!(s.vstate(at("2025-02-28T16:00:00Z"), lead), VState::Valid);
        assert_eq!(
            s.vstate(at("2026-02-28T15:59:59.999Z"), lead),
            VState::DueSoon
        );
        assert_eq!(s.vstate(at("2026-02-28T16:00:00Z"), lead), VState::Overdue);
        // full timestamps keep their own meaning
        let c = &r.device("D-1").unwrap().certificates[0];
        assert_eq!(c.verified_at, at("2025-03-01T00:00:00Z"));
        assert_eq!(c.valid_until, Some(at("2026-02-28T10:00:00Z")));
        // the default zone is UTC: the same file, read as before
        let mut utc = registry("zone-utc");
        utc.import_devices(Path::new("devices.csv"), DEVICES, "test")
            .unwrap();
        utc.import_verifications(Path::new("v.csv"), &v, "test", &Zone::default())
            .unwrap();
        let s = utc.device("S-1").unwrap();
        assert_eq!(
            s.vstate(at("2026-02-28T23:59:59.999Z"), lead),
            VState::DueSoon
        );
        assert_eq!(s.vstate(at("2026-03-01T00:00:00Z"), lead), VState::Overdue);
    }

    /// A zone with daylight saving time: in Berlin 2026-03-29 has 23 hours (CET to CEST), so a
    /// certificate valid until then is overdue from 22:00Z, and one verified that day starts
    /// at 23:00Z the day before.
    #[test]
    fn a_day_of_23_hours_in_berlin() {
        let berlin = Zone::named("Europe/Berlin").unwrap();
        let mut r = registry("zone-dst");
        r.import_devices(Path::new("devices.csv"), DEVICES, "test")
            .unwrap();
        let v = format!(
            "{HEADER}S-1,C-1,2025-03-29,2026-03-29,pass,bureau-7,7,\n\
             S-1,C-2,2026-03-29,2027-10-25,pass,bureau-7,7,\n"
        );
        r.import_verifications(Path::new("v.csv"), &v, "test", &berlin)
            .unwrap();
        let s = r.device("S-1").unwrap();
        let (c1, c2) = (&s.certificates[0], &s.certificates[1]);
        assert_eq!(c1.verified_at, at("2025-03-28T23:00:00Z"));
        assert_eq!(c1.valid_until, Some(at("2026-03-29T22:00:00Z")));
        assert_eq!(c2.verified_at, at("2026-03-28T23:00:00Z"));
        assert_eq!(c1.valid_until.unwrap() - c2.verified_at, 23 * 3_600_000);
        // 2027-10-31 is the day of 25 hours; 2027-10-25 is still summer time (UTC+2)
        assert_eq!(c2.valid_until, Some(at("2027-10-25T22:00:00Z")));
    }
}
