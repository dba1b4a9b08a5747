//! The registry's import files of CONTRACT §2 (`devices.csv`, `verifications.csv`) and their
//! JSON form in the API: text in, typed [`Device`] and [`Certificate`] values out, each error
//! naming its file, line and field. Pure: what needs the registered devices is
//! [`super::Devices`].

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use calwatch_protocol::Id;

use super::civil::{parse_iso8601, Zone};
use super::{Certificate, Device, DeviceKind, Text};

type Row = HashMap<&'static str, String>;

/// The columns of `devices.csv` (CONTRACT §2), in their order.
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
/// The columns of `verifications.csv`.
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
/// (what needs the registry is [`super::Devices::validate_devices`]). Pure.
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
/// `verifications.csv` but `device`, validated on its own; date-only dates are days in
/// `zone`. Pure.
pub fn certificate_from_json(
    source: &Path,
    device: &str,
    obj: &serde_json::Map<String, serde_json::Value>,
    zone: &Zone,
) -> Result<(Id, Certificate), ImportError> {
    let err = |reason: String| ImportError::whole(source, reason);
    if obj.contains_key("device") {
        return Err(err("device: given by the path, not the body".into()));
    }
    let mut row = json_row(obj, &VERIFICATION_COLUMNS[1..]).map_err(err)?;
    row.insert("device", device.to_string());
    parse_verification(&row, zone).map_err(err)
}

/// The rows of a `devices.csv`, each validated on its own and against the file (no id
/// twice, no device its own reference); what needs the registry is
/// [`super::Devices::validate_devices`]. Pure and linear: the API runs it off the ingest task.
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

/// The rows of a `verifications.csv`, each validated on its own, date-only dates as days in
/// `zone` (DESIGN decision 18); that the devices exist is
/// [`super::Devices::validate_certificates`]. Pure: the API runs it off the ingest task.
pub fn parse_verification_rows(
    file: &Path,
    text: &str,
    zone: &Zone,
) -> Result<Vec<(u64, Id, Certificate)>, ImportError> {
    let rows = parse_csv(file, text, &VERIFICATION_COLUMNS)?;
    let mut parsed = Vec::with_capacity(rows.len());
    for (line, row) in &rows {
        let (device, cert) = parse_verification(row, zone).map_err(|reason| ImportError {
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

/// One certificate row: a date-only `verified_at` starts at the beginning of its day in
/// `zone`, a date-only `valid_until` is valid through the end of its day there.
fn parse_verification(row: &Row, zone: &Zone) -> Result<(Id, Certificate), String> {
    let device = id_field(row, "device")?;
    let certificate = field(row, "certificate").to_string();
    if certificate.is_empty() {
        return Err("certificate: empty".into());
    }
    let verified_at = parse_iso8601(field(row, "verified_at"))
        .map_err(|e| format!("verified_at: {e}"))?
        .start_ms(zone);
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
                .end_exclusive_ms(zone),
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
