//! The domain model the checks judge by: registered instruments ([`Device`]) with their
//! verification certificates ([`Certificate`]), the verification window state ([`VState`]),
//! the one coverage rule, and the in-memory set of devices ([`Devices`]). No I/O: the
//! registry's persistence is `crate::persist`, its import files `input`.

pub(crate) mod civil;
pub(crate) mod input;
pub(crate) mod role;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use calwatch_protocol::Id;

pub use input::ImportError;

/// Unix epoch milliseconds of the wall clock (the one clock of the gateway: the sweep,
/// liveness, audit entries).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

const DAY_MS: i64 = 86_400_000;

/// A device is in use (coverage) when it reported within this long.
pub(crate) const IN_USE_WITHIN_MS: i64 = DAY_MS;

/// The coverage target of the bureau (DESIGN): 92 %.
pub(crate) const COVERAGE_TARGET_PCT: f64 = 92.0;

/// Short text of a device record (model, serial, class, certificate number, verifier):
/// inline up to 24 bytes, so most take no heap block of their own (100,000 devices).
pub(crate) type Text = compact_str::CompactString;

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

/// The coverage rule (DESIGN "Coverage"), the one both the `coverage` measurement and the
/// API apply: whether a device reported recently enough at `now` to count as in use
/// (`last_seen`: its last reading's `ts`, or its arrival if later, so a lagging agent clock
/// cannot hide an instrument in use), and whether it is verified then: valid or due soon, and
/// `intact` (decision 15: no broken seal or changed parameter open).
pub(crate) fn in_use_verified(
    device: &Device,
    last_seen: Option<i64>,
    intact: bool,
    now: i64,
    lead: i64,
) -> (bool, bool) {
    let in_use = last_seen.is_some_and(|last| now - last <= IN_USE_WITHIN_MS);
    let verified =
        in_use && intact && matches!(device.vstate(now, lead), VState::Valid | VState::DueSoon);
    (in_use, verified)
}

/// Days until the certificate in force at `now_ms` expires (negative when overdue); `None`
/// without a certificate, or when it failed (a failed certificate's `valid_until` is ignored,
/// DESIGN decision 2).
pub(crate) fn days_to_due(device: &Device, now_ms: i64) -> Option<f64> {
    let cert = device.certificate_at(now_ms)?;
    if !cert.passed {
        return None;
    }
    cert.valid_until
        .map(|until| (until - now_ms) as f64 / DAY_MS as f64)
}

/// The registered devices in memory, found by id: what the pipeline judges readings by.
/// Records are shared (`Arc`), so a copy of the set is cheap.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    /// A set found by id, so the id is not kept a second time as a key (24 bytes a device).
    set: HashSet<Entry>,
}

/// A registered device in the registry's set: equal, hashed and borrowed as its id.
#[derive(Clone, Debug)]
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

impl Devices {
    /// `devices` as given, certificates sorted oldest first (benchmarks, tests).
    pub fn from_devices(devices: Vec<Device>) -> Devices {
        let set = devices
            .into_iter()
            .map(|mut d| {
                d.certificates.sort_by_key(|c| c.verified_at);
                Entry(Arc::new(d))
            })
            .collect();
        Devices { set }
    }

    pub fn device(&self, id: &str) -> Option<&Device> {
        self.set.get(id).map(|e| &*e.0)
    }

    /// The shared record of a device.
    pub fn device_arc(&self, id: &str) -> Option<&Arc<Device>> {
        self.set.get(id).map(|e| &e.0)
    }

    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.set.iter().map(|e| &*e.0)
    }

    /// The shared records of all devices.
    pub fn device_arcs(&self) -> impl Iterator<Item = &Arc<Device>> {
        self.set.iter().map(|e| &e.0)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Parses and validates `devices.csv` text against these devices (references must
    /// exist); nothing is written. Each device comes with its line.
    pub fn parse_devices(
        &self,
        file: &Path,
        text: &str,
    ) -> Result<Vec<(u64, Device)>, ImportError> {
        let parsed = input::parse_device_rows(file, text)?;
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
        let parsed = [(1, input::device_from_json(source, obj)?)];
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
                if !self.set.contains(r.as_str()) && !in_file.contains(r.as_str()) {
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

    /// Parses and validates `verifications.csv` text (devices must be registered); date-only
    /// dates are days in `zone`.
    pub fn parse_verifications(
        &self,
        file: &Path,
        text: &str,
        zone: &civil::Zone,
    ) -> Result<Vec<(u64, Id, Certificate)>, ImportError> {
        let parsed = input::parse_verification_rows(file, text, zone)?;
        self.validate_certificates(file, &parsed)?;
        Ok(parsed)
    }

    /// What a certificate file needs of the registry: every device registered.
    pub fn validate_certificates(
        &self,
        file: &Path,
        parsed: &[(u64, Id, Certificate)],
    ) -> Result<(), ImportError> {
        for (line, device, _) in parsed {
            if !self.set.contains(device.as_str()) {
                return Err(ImportError {
                    file: file.into(),
                    line: Some(*line),
                    reason: format!("device: unknown device {device} (import devices.csv first)"),
                });
            }
        }
        Ok(())
    }

    /// A certificate given as a JSON object with the columns of `verifications.csv` but
    /// `device` (which comes from the path); date-only dates are days in `zone`.
    pub fn parse_certificate_json(
        &self,
        source: &Path,
        device: &str,
        obj: &serde_json::Map<String, serde_json::Value>,
        zone: &civil::Zone,
    ) -> Result<Certificate, ImportError> {
        let (id, cert) = input::certificate_from_json(source, device, obj, zone)?;
        if !self.set.contains(id.as_str()) {
            return Err(ImportError::whole(
                source,
                format!("device: unknown device {id}"),
            ));
        }
        Ok(cert)
    }
}
