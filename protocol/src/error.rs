//! Why a payload was rejected, and where in it.
//!
//! The gateway counts rejections by [`RejectReason`] (one metric label each) and logs the
//! [`DecodeError`]'s field path, so an operator can tell which agent sends what is wrong.

use std::fmt;

/// Why a payload was rejected; each reason is counted separately (CONTRACT §1, "Limits").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Larger than [`crate::MAX_BATCH_BYTES`].
    TooLarge,
    /// Not JSON at all.
    Syntax,
    /// JSON, but a field is missing or has the wrong type or shape.
    Malformed,
    /// `v` missing or not [`crate::VERSION`].
    UnknownVersion,
    /// More than [`crate::MAX_READINGS`] readings.
    TooManyReadings,
    /// An agent, device, owner, site or value name outside `[A-Za-z0-9._-]{1,64}`.
    InvalidId,
    /// A value that is not a finite number (NaN, infinite, or beyond `f64` range).
    NonFinite,
    /// A `seq` below 1.
    BadSeq,
    /// The same value name twice in one reading.
    DuplicateValue,
}

impl RejectReason {
    /// Every reason, e.g. to pre-register one counter each.
    pub const ALL: [RejectReason; 9] = [
        RejectReason::TooLarge,
        RejectReason::Syntax,
        RejectReason::Malformed,
        RejectReason::UnknownVersion,
        RejectReason::TooManyReadings,
        RejectReason::InvalidId,
        RejectReason::NonFinite,
        RejectReason::BadSeq,
        RejectReason::DuplicateValue,
    ];

    /// A stable snake_case name, for metric labels and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::Syntax => "syntax",
            RejectReason::Malformed => "malformed",
            RejectReason::UnknownVersion => "unknown_version",
            RejectReason::TooManyReadings => "too_many_readings",
            RejectReason::InvalidId => "invalid_id",
            RejectReason::NonFinite => "non_finite",
            RejectReason::BadSeq => "bad_seq",
            RejectReason::DuplicateValue => "duplicate_value",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A payload that was rejected whole: the reason to count, and the field to log.
///
/// Displays as `{field}: {detail}`, e.g. `readings[3].values.gross_kg: not a finite number`,
/// or just `{detail}` when no single field is to blame (syntax errors, oversized input).
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{}", Located(.field.as_deref(), .detail))]
pub struct DecodeError {
    /// Which counter this rejection goes to.
    pub reason: RejectReason,
    /// Path of the offending field, e.g. `readings[2].values.sale_l`; `None` for the whole payload.
    pub field: Option<String>,
    /// What is wrong, for humans.
    pub detail: String,
}

/// A value that must not be sent because the receiver would reject it; same shape and
/// display as [`DecodeError`], so the agent finds the bug before the gateway counts it.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{}", Located(.field.as_deref(), .detail))]
pub struct EncodeError {
    /// The reason the gateway would reject this payload with.
    pub reason: RejectReason,
    /// Path of the offending field, e.g. `readings[0].seq`; `None` for the whole payload.
    pub field: Option<String>,
    /// What is wrong, for humans.
    pub detail: String,
}

impl DecodeError {
    pub(crate) fn new(
        reason: RejectReason,
        field: Option<String>,
        detail: impl Into<String>,
    ) -> Self {
        DecodeError {
            reason,
            field,
            detail: detail.into(),
        }
    }
}

impl EncodeError {
    pub(crate) fn new(
        reason: RejectReason,
        field: Option<String>,
        detail: impl Into<String>,
    ) -> Self {
        EncodeError {
            reason,
            field,
            detail: detail.into(),
        }
    }
}

struct Located<'a>(Option<&'a str>, &'a str);

impl fmt::Display for Located<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(field) => write!(f, "{field}: {}", self.1),
            None => f.write_str(self.1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_snake_case() {
        let mut names: Vec<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
        assert!(names
            .iter()
            .all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RejectReason::ALL.len());
    }

    #[test]
    fn display_puts_the_field_first() {
        let e = DecodeError::new(
            RejectReason::NonFinite,
            Some("readings[3].values.gross_kg".into()),
            "not a finite number",
        );
        assert_eq!(
            e.to_string(),
            "readings[3].values.gross_kg: not a finite number"
        );
        let e = EncodeError::new(RejectReason::TooLarge, None, "too big");
        assert_eq!(e.to_string(), "too big");
    }
}
