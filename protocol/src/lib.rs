//! The calwatch wire contract (CONTRACT.md §1): MQTT topics, reading batches, agent status
//! and alert events, with their limits.
//!
//! Both ends of the wire use these types, so a payload the agent encodes is exactly what the
//! gateway decodes. Decoding is the gateway's hottest path: [`BatchDecoder`] reads batches as
//! agents write them in one pass, borrowing names from the payload; anything else it hands to
//! the serde decoder ([`ReadingBatch::decode`]: one `serde_json` pass into hand-written
//! visitors), which is also the reference the fast path is tested against. Only a rejected
//! payload pays for a further pass that finds the offending field and its [`RejectReason`].
//!
//! With the `node` feature, [`node`] also holds the code both binaries share beyond the wire
//! format: backoff, MQTT connection settings, TOML config files and process setup.
#![forbid(unsafe_code)]

pub mod alert;
pub mod batch;
pub mod error;
pub mod id;
mod json;
#[cfg(feature = "node")]
pub mod node;
pub mod status;
pub mod topic;

pub use alert::{AlertEvent, AlertKind, AlertState, Severity, UnknownVariantError};
#[doc(hidden)]
pub use batch::assert_decoders_agree;
pub use batch::{BatchDecoder, BatchView, Reading, ReadingBatch, ReadingRef, Value, ValuesRef};
pub use error::{DecodeError, EncodeError, RejectReason};
pub use id::{is_valid_id, Id, IdError};
pub use status::{AgentState, AgentStatus, DeviceHealth, DeviceInfo, SpoolStatus};
pub use topic::{
    alert_topic, readings_topic, status_topic, Topic, TopicError, ALERTS_FILTER, READINGS_FILTER,
    STATUS_FILTER,
};

/// The payload version this build speaks; every payload carries it as `"v":1`, and any other
/// value is rejected so an incompatible sender is counted rather than misread.
pub const VERSION: u64 = 1;

/// Largest payload accepted or produced (256 KiB), checked before parsing so an oversized
/// message costs nothing.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Most readings in one batch; bounds memory per message on the gateway.
pub const MAX_READINGS: usize = 10_000;

#[cfg(test)]
#[cfg(test)]
mod tests;
