//! Identifiers: agent, owner, site, device and value names.
//!
//! They appear in MQTT topic segments and as time-series tags, so they are restricted to
//! `[A-Za-z0-9._-]{1,64}` (CONTRACT §1) and checked once, when an [`Id`] is made.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest allowed id, in bytes (ids are ASCII).
const MAX_ID_LEN: usize = 64;

/// The rule quoted in every [`IdError`]; the decoder also recognises an invalid id by it.
pub(crate) const ID_RULE: &str = "is not a valid id: must match [A-Za-z0-9._-]{1,64}";

/// How much of a rejected input an [`IdError`] quotes; a hostile payload may carry a huge one.
const QUOTE_CHARS: usize = 64;

/// An agent, owner, site, device or value name: `[A-Za-z0-9._-]{1,64}`.
///
/// Holding an `Id` proves the name is valid, so it can go into a topic or a tag unchecked.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Id(CompactString);

impl Id {
    /// Checks `s` and wraps it; the only way to make an `Id` besides parsing and decoding.
    pub fn new(s: impl Into<String>) -> Result<Id, IdError> {
        let s = s.into();
        if is_valid_id(&s) {
            Ok(Id(CompactString::from(s)))
        } else {
            Err(IdError::new(&s))
        }
    }

    /// The name as text, e.g. for a topic or a tag.
    #[inline]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `s` matches `[A-Za-z0-9._-]{1,64}`, without allocating an [`Id`].
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Id {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Id, IdError> {
        Id::new(s)
    }
}

impl AsRef<str> for Id {
    #[inline]
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Id {
    #[inline]
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Id, D::Error> {
        deserializer.deserialize_str(IdVisitor)
    }
}

struct IdVisitor;

impl Visitor<'_> for IdVisitor {
    type Value = Id;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an id matching [A-Za-z0-9._-]{1,64}")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Id, E> {
        if is_valid_id(s) {
            Ok(Id(CompactString::new(s)))
        } else {
            // Plain message (no decoder tag) so config files parsed with other formats read
            // well; the JSON decoder recognises it by `ID_RULE`.
            Err(E::custom(IdError::new(s)))
        }
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Id, E> {
        if is_valid_id(&s) {
            Ok(Id(CompactString::from(s)))
        } else {
            Err(E::custom(IdError::new(&s)))
        }
    }
}

/// A string that is not a valid [`Id`]; says what was given and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{quoted} {rule}", rule = ID_RULE)]
pub struct IdError {
    /// The input, quoted and escaped, cut short when long.
    quoted: String,
}

impl IdError {
    fn new(input: &str) -> IdError {
        let quoted = match input.char_indices().nth(QUOTE_CHARS) {
            Some((cut, _)) => format!("{:?}… ({} bytes)", &input[..cut], input.len()),
            None => format!("{input:?}"),
        };
        IdError { quoted }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_contract_alphabet() {
        for s in ["station-17", "HS-DSP-0042", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(is_valid_id(s), "{s}");
            assert_eq!(Id::new(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn rejects_everything_else() {
        for s in ["", "foo bar", "a/b", "+", "#", "é", "a\n", &"x".repeat(65)] {
            assert!(!is_valid_id(s), "{s:?}");
            assert!(Id::new(s).is_err(), "{s:?}");
            assert!(s.parse::<Id>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn error_quotes_input_and_rule() {
        let e = Id::new("foo bar").unwrap_err();
        assert_eq!(
            e.to_string(),
            r#""foo bar" is not a valid id: must match [A-Za-z0-9._-]{1,64}"#
        );
    }

    #[test]
    fn error_truncates_long_input() {
        let e = Id::new("y".repeat(10_000)).unwrap_err().to_string();
        assert!(e.len() < 200, "{e}");
        assert!(e.contains("(10000 bytes)"), "{e}");
        assert!(e.ends_with(ID_RULE));
    }

    #[test]
    fn serde_is_a_validated_string() {
        let id: Id = serde_json::from_str(r#""HS-DSP-0042""#).unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""HS-DSP-0042""#);
        let err = serde_json::from_str::<Id>(r#""bad id""#).unwrap_err();
        assert!(err.to_string().contains(ID_RULE), "{err}");
        // An escaped string takes the owned path.
        let id: Id = serde_json::from_str(r#""a\u002db""#).unwrap();
        assert_eq!(id.as_str(), "a-b");
    }

    #[test]
    fn borrow_matches_str_for_map_lookups() {
        let mut m = std::collections::BTreeMap::new();
        m.insert(Id::new("dev-1").unwrap(), 1);
        assert_eq!(m.get("dev-1"), Some(&1));
    }
}
