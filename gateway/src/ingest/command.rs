//! Requests of the HTTP API to the ingest task, which owns the registry, the check state and
//! the alert book: views are read where the state lives ([`crate::pipeline::views`]), and
//! changes (devices, certificates, acknowledgements) go through the same commit as readings,
//! so they are durable, audited and published before the API answers.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use calwatch_protocol::{AlertEvent, Id};
use tokio::sync::oneshot;

use super::{Core, Durable};
use crate::alerts::AckError;
use crate::domain::{Certificate, Device, ImportError};
use crate::persist::registry::Registry;
use crate::pipeline::views::{
    CoverageBy, CoverageRow, DevicePage, DeviceQuery, DeviceView, RecentView,
};
use crate::pipeline::{Output, Pipeline};
use crate::sink::Stopped;

/// What the API sends.
pub(crate) enum Command {
    Devices {
        query: DeviceQuery,
        reply: oneshot::Sender<DevicePage>,
    },
    Device {
        id: String,
        reply: oneshot::Sender<Option<DeviceView>>,
    },
    /// Recent readings and normalised errors of a device; starts watching it.
    Readings {
        id: String,
        reply: oneshot::Sender<Option<RecentView>>,
    },
    Coverage {
        by: CoverageBy,
        owner: Option<Id>,
        reply: oneshot::Sender<Vec<CoverageRow>>,
    },
    /// Register or update devices (JSON object or `devices.csv` text).
    Register {
        input: Input,
        /// An owner's token may only touch devices of this owner.
        scope: Option<Id>,
        actor: String,
        reply: oneshot::Sender<Result<Vec<Id>, Refusal>>,
    },
    /// Record certificates (JSON object for one device, or `verifications.csv` text).
    Record {
        input: Input,
        /// The verifier's name; a JSON certificate must carry it (or none).
        verifier: String,
        actor: String,
        reply: oneshot::Sender<Result<Vec<Id>, Refusal>>,
    },
    Ack {
        id: String,
        actor: String,
        reply: oneshot::Sender<Result<AlertEvent, AckError>>,
    },
    /// A refused change, for the audit log.
    Denied {
        actor: String,
        action: String,
        subject: String,
        attempted: String,
        why: String,
        reply: oneshot::Sender<()>,
    },
}

/// A registry change as it arrived.
pub(crate) enum Input {
    Json {
        /// The device id from the path (certificates), if any.
        device: Option<String>,
        object: serde_json::Map<String, serde_json::Value>,
    },
    /// A devices.csv, parsed and checked row by row off the ingest task
    /// ([`crate::domain::input::parse_device_rows`]).
    DeviceRows {
        /// Name used in errors (`devices.csv:3: …`).
        file: String,
        rows: Vec<(u64, Device)>,
    },
    /// A verifications.csv, likewise ([`crate::domain::input::parse_verification_rows`]).
    CertificateRows {
        file: String,
        rows: Vec<(u64, Id, Certificate)>,
    },
}

/// Why a registry change was refused.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The data is bad (`file:line: reason`).
    Invalid(ImportError),
    /// Not the caller's to change.
    Forbidden(String),
    /// The registry could not be written.
    Failed(String),
}

impl Core {
    /// Runs one API command; changes are made durable (and their events published by the
    /// caller) before the reply is sent.
    pub(crate) fn command(
        &mut self,
        cmd: Command,
        confirmed: u64,
        stop: &AtomicBool,
    ) -> Result<Durable, Stopped> {
        let now = crate::domain::now_ms();
        self.out.clear();
        let p = &mut self.pipeline;
        match cmd {
            Command::Devices { query, reply } => {
                let _ = reply.send(p.devices_page(&query, now));
            }
            Command::Device { id, reply } => {
                let _ = reply.send(p.device_view(&id, now));
            }
            Command::Readings { id, reply } => {
                let _ = reply.send(p.recent(&id));
            }
            Command::Coverage { by, owner, reply } => {
                let _ = reply.send(p.coverage(by, owner.as_ref(), now));
            }
            Command::Register {
                input,
                scope,
                actor,
                reply,
            } => {
                let result = register(
                    p,
                    &mut self.registry,
                    input,
                    scope.as_ref(),
                    &actor,
                    now,
                    &mut self.out,
                );
                let durable = self.make_durable(now, confirmed, stop)?;
                let _ = reply.send(result);
                return Ok(durable);
            }
            Command::Record {
                input,
                verifier,
                actor,
                reply,
            } => {
                let result = record(
                    p,
                    &mut self.registry,
                    input,
                    &verifier,
                    &actor,
                    now,
                    &mut self.out,
                );
                let durable = self.make_durable(now, confirmed, stop)?;
                let _ = reply.send(result);
                return Ok(durable);
            }
            Command::Ack { id, actor, reply } => {
                let result = p.book.ack(&id, &actor, now);
                let event = match result {
                    Ok(Some(e)) => {
                        self.out.events.push(e.clone());
                        self.out.alert_points(self.out.events.len() - 1, &p.metrics);
                        Ok(e)
                    }
                    // Acknowledged before: the alert as it is.
                    Ok(None) => p
                        .book
                        .get_by_id(&id)
                        .map(|a| a.event.clone())
                        .ok_or(AckError::NotOpen(id)),
                    Err(e) => Err(e),
                };
                let durable = self.make_durable(now, confirmed, stop)?;
                let _ = reply.send(event);
                return Ok(durable);
            }
            Command::Denied {
                actor,
                action,
                subject,
                attempted,
                why,
                reply,
            } => {
                if let Err(e) = self
                    .registry
                    .audit_denied(&actor, &action, &subject, &attempted, &why)
                {
                    tracing::error!(error = %e, %actor, %action, "refusal not audited");
                }
                let _ = reply.send(());
            }
        }
        Ok(Durable::default())
    }
}

fn register(
    p: &mut Pipeline,
    registry: &mut Registry,
    input: Input,
    scope: Option<&Id>,
    actor: &str,
    now: i64,
    out: &mut Output,
) -> Result<Vec<Id>, Refusal> {
    // A file's rows are parsed (off this task) but not yet checked against the registry:
    // that comes after the owner's rights, so a refused file costs nothing more.
    let (file, parsed, from_file) = match input {
        Input::Json { object, .. } => {
            let file = PathBuf::from("request body");
            let mut object = object;
            if let Some(o) = scope {
                object
                    .entry("owner")
                    .or_insert_with(|| serde_json::Value::String(o.to_string()));
            }
            let d = registry
                .devices()
                .parse_device_json(&file, &object)
                .map_err(Refusal::Invalid)?;
            (file, vec![(1, d)], false)
        }
        Input::DeviceRows { file, rows } => (PathBuf::from(file), rows, true),
        Input::CertificateRows { file, .. } => {
            return Err(Refusal::Invalid(ImportError::whole(
                Path::new(&file),
                "certificates given where devices are expected".into(),
            )))
        }
    };
    if let Some(owner) = scope {
        for (line, d) in &parsed {
            let at = if from_file {
                format!("{}:{line}: ", file.display())
            } else {
                String::new()
            };
            if &d.owner != owner {
                return Err(Refusal::Forbidden(format!(
                    "{at}owner: an owner token registers devices of its own owner id only ({owner})"
                )));
            }
            if let Some(existing) = registry.device(d.id.as_str()) {
                if &existing.owner != owner {
                    return Err(Refusal::Forbidden(format!(
                        "{at}device {}: the id is taken",
                        d.id
                    )));
                }
            }
        }
    }
    if from_file {
        registry
            .devices()
            .validate_devices(&file, &parsed)
            .map_err(Refusal::Invalid)?;
    }
    let ids: Vec<Id> = parsed.iter().map(|(_, d)| d.id.clone()).collect();
    registry
        .write_devices(&file, &parsed, actor)
        .map_err(|e| Refusal::Failed(e.to_string()))?;
    p.sync_registry(registry.devices().clone(), &ids, now, out);
    Ok(ids)
}

fn record(
    p: &mut Pipeline,
    registry: &mut Registry,
    input: Input,
    verifier: &str,
    actor: &str,
    now: i64,
    out: &mut Output,
) -> Result<Vec<Id>, Refusal> {
    let (file, parsed) = match input {
        Input::Json { device, object } => {
            let file = PathBuf::from("request body");
            let device = device.unwrap_or_default();
            let mut object = object;
            match object.get("verifier") {
                None | Some(serde_json::Value::Null) => {
                    object.insert("verifier".into(), serde_json::Value::String(verifier.into()));
                }
                Some(serde_json::Value::String(v)) if v == verifier => {}
                Some(other) => {
                    return Err(Refusal::Invalid(ImportError {
                        file,
                        line: None,
                        reason: format!(
                            "verifier: {other} is not you ({verifier:?}); a certificate is recorded under its verifier's own token"
                        ),
                    }))
                }
            }
            let id = Id::new(device.clone()).map_err(|e| {
                Refusal::Invalid(ImportError {
                    file: file.clone(),
                    line: None,
                    reason: format!("device: {e}"),
                })
            })?;
            let cert = registry
                .devices()
                .parse_certificate_json(&file, &device, &object, &p.cfg.timezone)
                .map_err(Refusal::Invalid)?;
            (file, vec![(1, id, cert)])
        }
        Input::CertificateRows { file, rows } => {
            let file = PathBuf::from(file);
            registry
                .devices()
                .validate_certificates(&file, &rows)
                .map_err(Refusal::Invalid)?;
            (file, rows)
        }
        Input::DeviceRows { file, .. } => {
            return Err(Refusal::Invalid(ImportError::whole(
                Path::new(&file),
                "devices given where certificates are expected".into(),
            )))
        }
    };
    let ids: Vec<Id> = parsed.iter().map(|(_, id, _)| id.clone()).collect();
    registry
        .write_verifications(&file, &parsed, actor)
        .map_err(|e| Refusal::Failed(e.to_string()))?;
    p.sync_registry(registry.devices().clone(), &ids, now, out);
    Ok(ids)
}
