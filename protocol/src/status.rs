//! Agent status, published retained on `calwatch/v1/agents/{agent}/status` and set as the
//! agent's last will with `"state":"offline"` (CONTRACT §1).
//!
//! ```json
//! {"v":1,"agent":"station-17","state":"online","version":"0.1.0","devices":4,
//!  "spool_bytes":0,"ts":1764421200123,
//!  "device_info":{"HS-DSP-0042":{"model":"Tokheim Quantium","serial":"Q-1234"}},
//!  "health":{"HS-DSP-0042":{"last_ok":1764421199870,"consecutive_failures":0}}}
//! ```
//!
//! `device_info` (identity strings read from the device, CONTRACT §5, and the `wrap` modulus
//! of its energy or totalizer register) and `health` (polling health per device, with the
//! `failing_values` the device refuses) are omitted when empty and default to empty; so are
//! `wrap` and `failing_values`. Decoding follows the same
//! rules and reasons as reading batches; unknown fields are ignored (forward compatibility
//! within v1).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::DecodeError;
use crate::id::Id;
use crate::json::{self, Version};

/// Whether the agent is connected; `offline` is the last will the broker publishes for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Connected and polling.
    Online,
    /// Disconnected (last will) or shut down cleanly.
    Offline,
}

/// Identity data a device reports about itself; shown next to the registry's record so a
/// swapped instrument stands out.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Model string read from the device, if its profile has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Serial number read from the device, if its profile has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The modulus at which the device's energy (or totalizer) register wraps to zero, as its
    /// profile declares (`wrap`, DESIGN decision 17): going from near it to a small value is
    /// not a rollback. Additive within v1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wrap: Option<f64>,
}

/// How polling a device is going, so a broken link is told apart from a silent device.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct DeviceHealth {
    /// Last successful poll, Unix epoch milliseconds; `null` if none since the agent started.
    #[serde(default)]
    pub last_ok: Option<i64>,
    /// Failed polls since the last successful one.
    pub consecutive_failures: u64,
    /// Values the device refused at their last poll (a Modbus exception answer), by name,
    /// sorted: they are missing from its readings (or identity data) while the rest is
    /// published. Omitted when empty (additive within v1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failing_values: Vec<Id>,
}

/// The state of the agent's disk spool: what is waiting and what its full-policy did.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct SpoolStatus {
    /// Batches spooled and not yet acknowledged by the broker.
    pub unacked: u64,
    /// Batches the `drop_oldest` policy discarded (lifetime).
    pub dropped: u64,
    /// Batches refused by the `block_polling` policy while the spool was full (lifetime).
    pub rejected: u64,
    /// `drop_oldest` or `block_polling`.
    pub policy: String,
    /// Whether the spool is at its `max_bytes` now.
    pub full: bool,
}

/// The payload of `calwatch/v1/agents/{agent}/status`.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentStatus {
    /// The reporting agent.
    pub agent: Id,
    /// Online, or offline as the last will says.
    pub state: AgentState,
    /// The agent's software version.
    pub version: String,
    /// How many devices the agent polls.
    pub devices: u64,
    /// Bytes waiting in the agent's spool: a backlog the gateway has not seen yet.
    pub spool_bytes: u64,
    /// When the status was made, Unix epoch milliseconds (UTC).
    pub ts: i64,
    /// Identity data per device; omitted from the JSON when empty.
    pub device_info: BTreeMap<Id, DeviceInfo>,
    /// Polling health per device; omitted from the JSON when empty.
    pub health: BTreeMap<Id, DeviceHealth>,
    /// Spool details (additive within v1; omitted when unknown).
    pub spool: Option<SpoolStatus>,
}

impl AgentStatus {
    /// Parses and validates a status payload (same rules and reasons as reading batches).
    pub fn decode(bytes: &[u8]) -> Result<AgentStatus, DecodeError> {
        json::decode(bytes)
    }

    /// The JSON payload, with `"v":1` first.
    pub fn encode(&self) -> Vec<u8> {
        // Cannot fail: string keys, writing to memory (a non-finite `wrap` would be `null`).
        serde_json::to_vec(self).expect("an AgentStatus always serializes")
    }
}

#[derive(Serialize)]
struct StatusOut<'a> {
    v: Version,
    agent: &'a Id,
    state: AgentState,
    version: &'a str,
    devices: u64,
    spool_bytes: u64,
    ts: i64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    device_info: &'a BTreeMap<Id, DeviceInfo>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    health: &'a BTreeMap<Id, DeviceHealth>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spool: &'a Option<SpoolStatus>,
}

#[derive(Deserialize)]
struct StatusIn {
    #[serde(rename = "v")]
    _version: Version,
    agent: Id,
    state: AgentState,
    version: String,
    devices: u64,
    spool_bytes: u64,
    ts: i64,
    #[serde(default)]
    device_info: BTreeMap<Id, DeviceInfo>,
    #[serde(default)]
    health: BTreeMap<Id, DeviceHealth>,
    #[serde(default)]
    spool: Option<SpoolStatus>,
}

impl Serialize for AgentStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StatusOut {
            v: Version,
            agent: &self.agent,
            state: self.state,
            version: &self.version,
            devices: self.devices,
            spool_bytes: self.spool_bytes,
            ts: self.ts,
            device_info: &self.device_info,
            health: &self.health,
            spool: &self.spool,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for AgentStatus {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<AgentStatus, D::Error> {
        let s = StatusIn::deserialize(deserializer)?;
        Ok(AgentStatus {
            agent: s.agent,
            state: s.state,
            version: s.version,
            devices: s.devices,
            spool_bytes: s.spool_bytes,
            ts: s.ts,
            device_info: s.device_info,
            health: s.health,
            spool: s.spool,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::error::RejectReason;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    fn minimal() -> AgentStatus {
        AgentStatus {
            agent: id("station-17"),
            state: AgentState::Online,
            version: "0.1.0".into(),
            devices: 4,
            spool_bytes: 0,
            ts: 1_764_421_200_123,
            device_info: BTreeMap::new(),
            health: BTreeMap::new(),
            spool: None,
        }
    }

    #[test]
    fn spool_details_round_trip() {
        let mut s = minimal();
        s.spool = Some(SpoolStatus {
            unacked: 3,
            dropped: 1,
            rejected: 0,
            policy: "drop_oldest".into(),
            full: true,
        });
        let back = AgentStatus::decode(&s.encode()).unwrap();
        assert_eq!(back, s);
        // Older agents omit it.
        assert_eq!(
            AgentStatus::decode(&minimal().encode()).unwrap().spool,
            None
        );
    }

    #[test]
    fn minimal_status_is_the_contract_line() {
        let s = minimal();
        let json = String::from_utf8(s.encode()).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"agent":"station-17","state":"online","version":"0.1.0","devices":4,"spool_bytes":0,"ts":1764421200123}"#
        );
        assert_eq!(AgentStatus::decode(json.as_bytes()).unwrap(), s);
    }

    #[test]
    fn full_status_round_trips() {
        let mut s = minimal();
        s.state = AgentState::Offline;
        s.device_info.insert(
            id("HS-DSP-0042"),
            DeviceInfo {
                model: Some("Tokheim Quantium".into()),
                serial: None,
                wrap: None,
            },
        );
        s.health.insert(
            id("HS-DSP-0042"),
            DeviceHealth {
                last_ok: Some(1_764_421_199_870),
                consecutive_failures: 0,
                failing_values: Vec::new(),
            },
        );
        s.health.insert(
            id("SC-1"),
            DeviceHealth {
                last_ok: None,
                consecutive_failures: 7,
                failing_values: Vec::new(),
            },
        );
        let json = String::from_utf8(s.encode()).unwrap();
        assert!(json.contains(r#""state":"offline""#), "{json}");
        assert!(
            json.contains(r#""device_info":{"HS-DSP-0042":{"model":"Tokheim Quantium"}}"#),
            "{json}"
        );
        assert!(
            json.contains(r#""SC-1":{"last_ok":null,"consecutive_failures":7}"#),
            "{json}"
        );
        assert_eq!(AgentStatus::decode(json.as_bytes()).unwrap(), s);
    }

    #[test]
    fn failing_values_and_wrap_are_additive() {
        let mut s = minimal();
        s.health.insert(
            id("SDM-1"),
            DeviceHealth {
                last_ok: Some(1_764_421_199_870),
                consecutive_failures: 0,
                failing_values: vec![id("serial"), id("serial_number")],
            },
        );
        s.device_info.insert(
            id("SDM-1"),
            DeviceInfo {
                model: Some("Eastron SDM630".into()),
                serial: None,
                wrap: Some(1_000_000.0),
            },
        );
        let json = String::from_utf8(s.encode()).unwrap();
        assert!(
            json.contains(r#""SDM-1":{"last_ok":1764421199870,"consecutive_failures":0,"failing_values":["serial","serial_number"]}"#),
            "{json}"
        );
        assert!(
            json.contains(r#""SDM-1":{"model":"Eastron SDM630","wrap":1000000.0}"#),
            "{json}"
        );
        assert_eq!(AgentStatus::decode(json.as_bytes()).unwrap(), s);
        // What older agents send still decodes: both absent, both empty.
        let old = r#"{"v":1,"agent":"a","state":"online","version":"x","devices":1,
            "spool_bytes":0,"ts":0,"device_info":{"d":{"model":"m","serial":"s"}},
            "health":{"d":{"last_ok":null,"consecutive_failures":3}}}"#;
        let s = AgentStatus::decode(old.as_bytes()).unwrap();
        assert_eq!(s.device_info[&id("d")].wrap, None);
        assert_eq!(s.health[&id("d")].failing_values, Vec::<Id>::new());
        assert_eq!(s.health[&id("d")].consecutive_failures, 3);
        // An entry without failing values is as it was on the wire.
        let json = String::from_utf8(s.encode()).unwrap();
        assert!(
            json.contains(r#""d":{"last_ok":null,"consecutive_failures":3}"#),
            "{json}"
        );
        // A failing value name is an id like every other.
        let bad = r#"{"v":1,"agent":"a","state":"online","version":"x","devices":1,
            "spool_bytes":0,"ts":0,"health":{"d":{"consecutive_failures":0,"failing_values":["a b"]}}}"#;
        let e = AgentStatus::decode(bad.as_bytes()).unwrap_err();
        assert_eq!(e.reason, RejectReason::InvalidId, "{e}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let json = r#"{"v":1,"agent":"a","state":"online","version":"x","devices":0,
            "spool_bytes":0,"ts":0,"uptime_s":12,"device_info":{"d":{"firmware":"2"}}}"#;
        let s = AgentStatus::decode(json.as_bytes()).unwrap();
        assert_eq!(s.device_info[&id("d")], DeviceInfo::default());
    }

    #[test]
    fn rejections_name_the_field() {
        let cases = [
            (
                r#"{"v":1,"agent":"a","state":"asleep","version":"x","devices":0,"spool_bytes":0,"ts":0}"#,
                RejectReason::Malformed,
                Some("state"),
            ),
            (
                r#"{"v":1,"agent":"a","state":"online","version":"x","devices":0,"spool_bytes":0}"#,
                RejectReason::Malformed,
                Some("ts"),
            ),
            (
                r#"{"v":1,"agent":"a","state":"online","version":"x","devices":0,"spool_bytes":0,"ts":1.5}"#,
                RejectReason::Malformed,
                Some("ts"),
            ),
            (
                r#"{"v":1,"agent":"a","state":"online","version":"x","devices":0,"spool_bytes":0,"ts":0,"health":{"bad id":{"consecutive_failures":0}}}"#,
                RejectReason::InvalidId,
                Some("health.\"bad id\""),
            ),
            (
                r#"{"v":2,"agent":"a b","state":"sleeping"}"#,
                RejectReason::UnknownVersion,
                Some("v"),
            ),
            (
                r#"{"agent":"a","state":"online","version":"x","devices":0,"spool_bytes":0,"ts":0}"#,
                RejectReason::UnknownVersion,
                Some("v"),
            ),
            (r#"{"v":1,"#, RejectReason::Syntax, None),
        ];
        for (json, reason, field) in cases {
            let e = AgentStatus::decode(json.as_bytes()).unwrap_err();
            assert_eq!(
                (e.reason, e.field.as_deref()),
                (reason, field),
                "{json}: {e}"
            );
        }
    }
}
