//! Alert events, published on `calwatch/v1/alerts/{owner}/{device}` on every state change
//! of an alert (CONTRACT §1).
//!
//! ```json
//! {"v":1,"id":"a-000173","device":"HS-DSP-0042","owner":"sinopec-hs-17","site":"station-17",
//!  "kind":"cheating_suspected","severity":"critical","state":"active",
//!  "raised":1764421199870,"updated":1764421199870,"resolved":null,"ack_by":null,
//!  "count":5,"message":"5 sales with display/encoder deviation beyond 0.6%",
//!  "evidence":{"last_deviation_pct":0.91}}
//! ```
//!
//! Encoding always writes every field (`resolved` and `ack_by` as `null` when unset). Decoding
//! follows the rules and reasons of reading batches; unknown fields are ignored (forward
//! compatibility within v1), missing `resolved`/`ack_by` mean `null`, missing `evidence` means
//! `{}`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value as JsonValue};

use crate::error::DecodeError;
use crate::id::Id;
use crate::json::{self, Version};

/// What an alert is about; one open alert per (device, kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// Verification expires within the lead time.
    DueSoon,
    /// Verification has expired.
    Overdue,
    /// No verification certificate on record.
    Unverified,
    /// The newest certificate is a failed verification.
    FailedVerification,
    /// The sealed event counter changed.
    SealBroken,
    /// A sealed parameter (e.g. `k_factor`) changed.
    ParamChanged,
    /// A check against a reference exceeded the maximum permissible error.
    OutOfTolerance,
    /// Slow deviation from the reference (EWMA/CUSUM).
    Drift,
    /// Display and independent measurement disagree beyond tolerance.
    CheatingSuspected,
    /// Totalizer advance does not match the sum of sales.
    TotalizerMismatch,
    /// A monotonic counter went backwards.
    CounterRollback,
    /// Device or agent stopped reporting.
    Offline,
}

impl AlertKind {
    /// Every kind, in contract order.
    pub const ALL: [AlertKind; 12] = [
        AlertKind::DueSoon,
        AlertKind::Overdue,
        AlertKind::Unverified,
        AlertKind::FailedVerification,
        AlertKind::SealBroken,
        AlertKind::ParamChanged,
        AlertKind::OutOfTolerance,
        AlertKind::Drift,
        AlertKind::CheatingSuspected,
        AlertKind::TotalizerMismatch,
        AlertKind::CounterRollback,
        AlertKind::Offline,
    ];

    /// The wire name, e.g. `cheating_suspected`; also used in the HTTP API and tags.
    pub fn as_str(&self) -> &'static str {
        match self {
            AlertKind::DueSoon => "due_soon",
            AlertKind::Overdue => "overdue",
            AlertKind::Unverified => "unverified",
            AlertKind::FailedVerification => "failed_verification",
            AlertKind::SealBroken => "seal_broken",
            AlertKind::ParamChanged => "param_changed",
            AlertKind::OutOfTolerance => "out_of_tolerance",
            AlertKind::Drift => "drift",
            AlertKind::CheatingSuspected => "cheating_suspected",
            AlertKind::TotalizerMismatch => "totalizer_mismatch",
            AlertKind::CounterRollback => "counter_rollback",
            AlertKind::Offline => "offline",
        }
    }
}

/// How urgent an alert is; ordered `Info < Warning < Critical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A reminder, e.g. verification due soon.
    Info,
    /// Needs attention.
    Warning,
    /// An instrument in use that must not be, or suspected fraud.
    Critical,
}

const SEVERITIES: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

impl Severity {
    /// The wire name: `info`, `warning` or `critical`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Where an alert is in its lifecycle; `active` and `acknowledged` are both open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// Raised, nobody has taken it yet.
    Active,
    /// A supervisor has taken it; still open.
    Acknowledged,
    /// The condition is gone or was dealt with.
    Resolved,
}

const ALERT_STATES: [AlertState; 3] = [
    AlertState::Active,
    AlertState::Acknowledged,
    AlertState::Resolved,
];

impl AlertState {
    /// The wire name: `active`, `acknowledged` or `resolved`.
    pub fn as_str(&self) -> &'static str {
        match self {
            AlertState::Active => "active",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Resolved => "resolved",
        }
    }
}

/// A name that is not one of an enum's wire names (e.g. `?kind=` in the HTTP API).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{quoted} is not {what}; expected one of {expected}")]
pub struct UnknownVariantError {
    what: &'static str,
    quoted: String,
    expected: String,
}

impl UnknownVariantError {
    fn new(what: &'static str, input: &str, names: impl Iterator<Item = &'static str>) -> Self {
        let head: String = input.chars().take(64).collect();
        UnknownVariantError {
            what,
            quoted: format!("{head:?}"),
            expected: names.collect::<Vec<_>>().join(", "),
        }
    }
}

macro_rules! wire_name_traits {
    ($ty:ty, $all:expr, $what:literal) => {
        impl FromStr for $ty {
            type Err = UnknownVariantError;

            fn from_str(s: &str) -> Result<Self, UnknownVariantError> {
                $all.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
                    UnknownVariantError::new($what, s, $all.iter().map(|v| v.as_str()))
                })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_name_traits!(AlertKind, AlertKind::ALL, "an alert kind");
wire_name_traits!(Severity, SEVERITIES, "a severity");
wire_name_traits!(AlertState, ALERT_STATES, "an alert state");

/// The payload of `calwatch/v1/alerts/{owner}/{device}`: one alert, as of its latest change.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertEvent {
    /// The gateway's alert id, e.g. `a-000173`; stable over the alert's life.
    pub id: String,
    /// The device the alert is about.
    pub device: Id,
    /// The device's owner; also in the topic, so supervisors can subscribe per owner.
    pub owner: Id,
    /// The site the device stands at.
    pub site: Id,
    /// What the alert is about.
    pub kind: AlertKind,
    /// How urgent it is.
    pub severity: Severity,
    /// Where it is in its lifecycle.
    pub state: AlertState,
    /// When it was first raised, Unix epoch milliseconds.
    pub raised: i64,
    /// When it last changed (repeat, acknowledgement, resolution).
    pub updated: i64,
    /// When it was resolved, if it has been.
    pub resolved: Option<i64>,
    /// Who acknowledged it, if anyone.
    pub ack_by: Option<String>,
    /// How many times the condition was seen while the alert was open.
    pub count: u64,
    /// One line for humans.
    pub message: String,
    /// The numbers behind the alert, free-form per kind.
    pub evidence: Map<String, JsonValue>,
}

impl AlertEvent {
    /// Parses and validates an alert event (same rules and reasons as reading batches).
    pub fn decode(bytes: &[u8]) -> Result<AlertEvent, DecodeError> {
        json::decode(bytes)
    }

    /// The JSON payload, every field present, `"v":1` first.
    pub fn encode(&self) -> Vec<u8> {
        // Cannot fail: string keys, and `serde_json::Value` holds no non-finite numbers.
        serde_json::to_vec(self).expect("an AlertEvent always serializes")
    }
}

#[derive(Serialize)]
struct AlertOut<'a> {
    v: Version,
    id: &'a str,
    device: &'a Id,
    owner: &'a Id,
    site: &'a Id,
    kind: AlertKind,
    severity: Severity,
    state: AlertState,
    raised: i64,
    updated: i64,
    resolved: Option<i64>,
    ack_by: Option<&'a str>,
    count: u64,
    message: &'a str,
    evidence: &'a Map<String, JsonValue>,
}

#[derive(Deserialize)]
struct AlertIn {
    #[serde(rename = "v")]
    _version: Version,
    id: String,
    device: Id,
    owner: Id,
    site: Id,
    kind: AlertKind,
    severity: Severity,
    state: AlertState,
    raised: i64,
    updated: i64,
    #[serde(default)]
    resolved: Option<i64>,
    #[serde(default)]
    ack_by: Option<String>,
    count: u64,
    message: String,
    #[serde(default)]
    evidence: Map<String, JsonValue>,
}

impl Serialize for AlertEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        AlertOut {
            v: Version,
            id: &self.id,
            device: &self.device,
            owner: &self.owner,
            site: &self.site,
            kind: self.kind,
            severity: self.severity,
            state: self.state,
            raised: self.raised,
            updated: self.updated,
            resolved: self.resolved,
            ack_by: self.ack_by.as_deref(),
            count: self.count,
            message: &self.message,
            evidence: &self.evidence,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for AlertEvent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<AlertEvent, D::Error> {
        let a = AlertIn::deserialize(deserializer)?;
        Ok(AlertEvent {
            id: a.id,
            device: a.device,
            owner: a.owner,
            site: a.site,
            kind: a.kind,
            severity: a.severity,
            state: a.state,
            raised: a.raised,
            updated: a.updated,
            resolved: a.resolved,
            ack_by: a.ack_by,
            count: a.count,
            message: a.message,
            evidence: a.evidence,
        })
    }
}

#[cfg(test)]
mod tests;
