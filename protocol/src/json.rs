//! Decode machinery shared by every payload type.
//!
//! The fast path is one `serde_json::from_slice` into the payload type. Only when it fails do we
//! look again, in [`explain`]: a cheap probe settles "is it JSON?" and "is it v1?" (so a future
//! `v` is reported as such even when the rest no longer fits v1), then a `serde_path_to_error`
//! pass finds the failing field. Errors our visitors raise carry a tag naming the
//! [`RejectReason`]; [`classify`] strips it again. Rejections are rare, so the happy path pays
//! nothing for the diagnosis.

use std::fmt::{self, Display, Write as _};

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::error::Category;
use serde_path_to_error::{Path, Segment};

use crate::error::{DecodeError, RejectReason};
use crate::id::{is_valid_id, ID_RULE};
use crate::{MAX_BATCH_BYTES, VERSION};

/// Opens the tag our visitors put in front of an error message: `[calwatch:bad_seq] ...`, or
/// `[calwatch:duplicate_value@sale_l] ...` when the error is about a child of the current field.
/// Readable if it ever leaks through another format.
const TAG: &str = "[calwatch:";

/// Longest `detail` or `field` kept in a [`DecodeError`]: serde quotes offending input, and
/// nesting makes long paths; both come from the sender and may be huge.
const MAX_DETAIL: usize = 200;

/// Longest path segment kept; a hostile payload may use a huge key.
const MAX_SEGMENT: usize = 64;

/// A deserialize error that [`classify`] maps to `reason`.
pub(crate) fn reject<E: de::Error>(reason: RejectReason, detail: impl Display) -> E {
    E::custom(format_args!("{TAG}{}] {detail}", reason.as_str()))
}

/// Like [`reject`], but blames `child` (a valid id) of the field being deserialized.
pub(crate) fn reject_child<E: de::Error>(
    reason: RejectReason,
    child: &str,
    detail: impl Display,
) -> E {
    E::custom(format_args!("{TAG}{}@{child}] {detail}", reason.as_str()))
}

/// Decodes one payload per the rules of CONTRACT §1 (see the crate docs).
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_BATCH_BYTES {
        return Err(DecodeError::new(
            RejectReason::TooLarge,
            None,
            format!(
                "payload is {} bytes, the limit is {MAX_BATCH_BYTES}",
                bytes.len()
            ),
        ));
    }
    decode_unbounded(bytes)
}

/// [`decode`] without the size limit; lets tests reach limits that lie beyond it.
pub(crate) fn decode_unbounded<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match serde_json::from_slice(bytes) {
        Ok(value) => Ok(value),
        Err(_) => explain(bytes),
    }
}

/// The slow path: decode again, slowly, to say why and where the payload is wrong.
#[cold]
#[inline(never)]
fn explain<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe::NotObject) => {
            return Err(DecodeError::new(
                RejectReason::Malformed,
                None,
                "expected a JSON object",
            ))
        }
        Ok(Probe::Object(VersionSeen::Missing)) => {
            return Err(DecodeError::new(
                RejectReason::UnknownVersion,
                Some("v".into()),
                format!("missing; this build speaks v{VERSION}"),
            ))
        }
        Ok(Probe::Object(VersionSeen::Other(found))) => {
            return Err(DecodeError::new(
                RejectReason::UnknownVersion,
                Some("v".into()),
                format!("unsupported version {found}; this build speaks v{VERSION}"),
            ))
        }
        Ok(Probe::Object(VersionSeen::One)) => {}
        // Out-of-range numbers are JSON; the full pass below says which field holds one.
        Err(e) if is_out_of_range(&e) => {}
        Err(e) => {
            return Err(DecodeError::new(
                RejectReason::Syntax,
                None,
                truncate(e.to_string()),
            ))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(value) => match de.end() {
            Ok(()) => Ok(value),
            Err(e) => Err(classify(None, &e)),
        },
        Err(e) => Err(classify(Some(e.path()), e.inner())),
    }
}

/// serde_json reports `1e400` as a syntax error; for us it is a number that is not finite.
fn is_out_of_range(e: &serde_json::Error) -> bool {
    e.classify() == Category::Syntax && e.to_string().starts_with("number out of range")
}

/// Maps a serde_json error found at `path` to a [`DecodeError`].
fn classify(path: Option<&Path>, e: &serde_json::Error) -> DecodeError {
    let field = path.and_then(render_path);
    let message = e.to_string();
    match e.classify() {
        Category::Data => {}
        _ if is_out_of_range(e) => {
            let reason = if field.as_deref() == Some("v") {
                RejectReason::UnknownVersion
            } else if path.is_some_and(holds_floats) {
                RejectReason::NonFinite
            } else {
                // Where only integers (or no numbers) belong, a huge float is just the wrong type.
                RejectReason::Malformed
            };
            let detail = match reason {
                RejectReason::NonFinite => "not a finite number (beyond the range of f64)",
                _ => "number out of range",
            };
            return DecodeError::new(reason, field, detail);
        }
        // Valid JSON (the probe read it) nested deeper than serde_json's limit of 128.
        _ if message.starts_with("recursion limit exceeded") => {
            return DecodeError::new(RejectReason::Malformed, field, "nested too deeply")
        }
        Category::Syntax | Category::Eof | Category::Io => {
            return DecodeError::new(RejectReason::Syntax, None, truncate(message))
        }
    }
    let message = strip_position(&message);
    if let Some((reason, child, detail)) = parse_tag(message) {
        return DecodeError::new(reason, join(field, child), truncate(detail.to_owned()));
    }
    if message.ends_with(ID_RULE) {
        return DecodeError::new(RejectReason::InvalidId, field, truncate(message.to_owned()));
    }
    // serde's own wording (`de::Error::missing_field` / `duplicate_field`); naming the field
    // in the path reads better than in the text.
    if let Some(name) = quoted_name(message, "missing field `") {
        return DecodeError::new(RejectReason::Malformed, join(field, Some(name)), "missing");
    }
    if let Some(name) = quoted_name(message, "duplicate field `") {
        return DecodeError::new(
            RejectReason::Malformed,
            join(field, Some(name)),
            "given more than once",
        );
    }
    DecodeError::new(RejectReason::Malformed, field, truncate(message.to_owned()))
}

/// Whether `path` points where any number is allowed: `readings[i].values.<name>` of a batch
/// or `evidence.<...>` of an alert.
fn holds_floats(path: &Path) -> bool {
    let segments: Vec<&Segment> = path.iter().collect();
    let key = |s: &Segment, want: &str| matches!(s, Segment::Map { key } if key == want);
    match segments.as_slice() {
        [readings, Segment::Seq { .. }, values, Segment::Map { .. }] => {
            key(readings, "readings") && key(values, "values")
        }
        [evidence, _, ..] => key(evidence, "evidence"),
        _ => false,
    }
}

/// `"[calwatch:reason@child] detail"` -> `(reason, child, detail)`.
fn parse_tag(message: &str) -> Option<(RejectReason, Option<&str>, &str)> {
    let rest = message.strip_prefix(TAG)?;
    let (inside, detail) = rest.split_once("] ")?;
    let (name, child) = match inside.split_once('@') {
        Some((name, child)) => (name, Some(child)),
        None => (inside, None),
    };
    let reason = RejectReason::ALL.into_iter().find(|r| r.as_str() == name)?;
    Some((reason, child, detail))
}

/// The name in `` prefix`name` `` when it is the whole message.
fn quoted_name<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let name = message.strip_prefix(prefix)?.strip_suffix('`')?;
    (!name.contains('`')).then_some(name)
}

/// Drops serde_json's ` at line L column C`; the field path says where.
fn strip_position(message: &str) -> &str {
    let Some(at) = message.rfind(" at line ") else {
        return message;
    };
    let rest = &message[at + " at line ".len()..];
    let Some((line, column)) = rest.split_once(" column ") else {
        return message;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(line) && digits(column) {
        &message[..at]
    } else {
        message
    }
}

fn join(field: Option<String>, child: Option<&str>) -> Option<String> {
    match (field, child) {
        (Some(mut field), Some(child)) => {
            field.push('.');
            push_key(&mut field, child);
            Some(field)
        }
        (None, Some(child)) => {
            let mut field = String::new();
            push_key(&mut field, child);
            Some(field)
        }
        (field, None) => field,
    }
}

/// `readings[2].values.sale_l`; `None` for the top level.
fn render_path(path: &Path) -> Option<String> {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                push_key(&mut out, key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    // Only nesting (at most serde_json's 128 levels) makes a path long; keep a log line short.
    (!out.is_empty()).then(|| truncate(out))
}

/// Appends a map key to a path; keys from the input may be anything, so odd ones are escaped
/// and long ones cut, to keep the path one short line in a log.
fn push_key(out: &mut String, key: &str) {
    if is_valid_id(key) {
        out.push_str(key);
        return;
    }
    let mut chars = key.chars();
    let head: String = chars.by_ref().take(MAX_SEGMENT).collect();
    let _ = write!(out, "{:?}", head);
    if chars.next().is_some() {
        out.push('…');
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The `v` field: deserializes from [`VERSION`] only, serializes as it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Version;

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(VERSION)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Version, D::Error> {
        deserializer.deserialize_u64(VersionVisitor)
    }
}

struct VersionVisitor;

impl Visitor<'_> for VersionVisitor {
    type Value = Version;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "version {VERSION}")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Version, E> {
        if v == VERSION {
            Ok(Version)
        } else {
            Err(reject(
                RejectReason::UnknownVersion,
                format_args!("unsupported version {v}; this build speaks v{VERSION}"),
            ))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Version, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(reject(
                RejectReason::UnknownVersion,
                format_args!("unsupported version {v}; this build speaks v{VERSION}"),
            )),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Version, E> {
        Err(reject(
            RejectReason::UnknownVersion,
            format_args!("unsupported version {v}; this build speaks v{VERSION}"),
        ))
    }
}

/// What the slow path first learns about a rejected payload: is it an object, and its `v`.
enum Probe {
    NotObject,
    Object(VersionSeen),
}

enum VersionSeen {
    Missing,
    One,
    /// Rendered for the error message.
    Other(String),
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Probe, D::Error> {
        deserializer.deserialize_any(ProbeVisitor)
    }
}

struct ProbeVisitor;

impl<'de> Visitor<'de> for ProbeVisitor {
    type Value = Probe;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Probe, E> {
        Ok(Probe::NotObject)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Probe, E> {
        Ok(Probe::NotObject)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Probe, E> {
        Ok(Probe::NotObject)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Probe, E> {
        Ok(Probe::NotObject)
    }

    fn visit_str<E>(self, _: &str) -> Result<Probe, E> {
        Ok(Probe::NotObject)
    }

    fn visit_unit<E>(self) -> Result<Probe, E> {
        Ok(Probe::NotObject)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Probe, A::Error> {
        // Read to the end, so a syntax error later on is still reported as one.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Probe::NotObject)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe, A::Error> {
        let mut seen = VersionSeen::Missing;
        while let Some(key) = map.next_key::<ProbeKey>()? {
            match key {
                ProbeKey::V => {
                    let found = map.next_value::<VersionSeen>()?;
                    // With `v` given twice, any value but 1 is what gets reported.
                    if !matches!(seen, VersionSeen::Other(_)) {
                        seen = found;
                    }
                }
                ProbeKey::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Probe::Object(seen))
    }
}

enum ProbeKey {
    V,
    Other,
}

impl<'de> Deserialize<'de> for ProbeKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ProbeKey, D::Error> {
        deserializer.deserialize_str(ProbeKeyVisitor)
    }
}

struct ProbeKeyVisitor;

impl Visitor<'_> for ProbeKeyVisitor {
    type Value = ProbeKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E>(self, key: &str) -> Result<ProbeKey, E> {
        Ok(if key == "v" {
            ProbeKey::V
        } else {
            ProbeKey::Other
        })
    }
}

impl<'de> Deserialize<'de> for VersionSeen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<VersionSeen, D::Error> {
        deserializer.deserialize_any(VersionSeenVisitor)
    }
}

struct VersionSeenVisitor;

impl<'de> Visitor<'de> for VersionSeenVisitor {
    type Value = VersionSeen;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<VersionSeen, E> {
        Ok(VersionSeen::Other(v.to_string()))
    }

    fn visit_i64<E>(self, v: i64) -> Result<VersionSeen, E> {
        Ok(VersionSeen::Other(v.to_string()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<VersionSeen, E> {
        Ok(if v == VERSION {
            VersionSeen::One
        } else {
            VersionSeen::Other(v.to_string())
        })
    }

    fn visit_f64<E>(self, v: f64) -> Result<VersionSeen, E> {
        Ok(VersionSeen::Other(format!("{v:?}")))
    }

    fn visit_str<E>(self, v: &str) -> Result<VersionSeen, E> {
        let head: String = v.chars().take(MAX_SEGMENT).collect();
        Ok(VersionSeen::Other(format!("{head:?}")))
    }

    fn visit_unit<E>(self) -> Result<VersionSeen, E> {
        Ok(VersionSeen::Other("null".into()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<VersionSeen, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(VersionSeen::Other("(an array)".into()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<VersionSeen, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(VersionSeen::Other("(an object)".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_a_real_position_suffix() {
        assert_eq!(strip_position("bad at line 3 column 17"), "bad");
        assert_eq!(
            strip_position("bad at line x column 1"),
            "bad at line x column 1"
        );
        assert_eq!(strip_position("plain"), "plain");
    }

    #[test]
    fn tag_round_trips() {
        let e: serde_json::Error = reject_child(RejectReason::DuplicateValue, "sale_l", "twice");
        assert_eq!(
            parse_tag(&e.to_string()),
            Some((RejectReason::DuplicateValue, Some("sale_l"), "twice"))
        );
        let e: serde_json::Error = reject(RejectReason::BadSeq, "zero] x");
        assert_eq!(
            parse_tag(&e.to_string()),
            Some((RejectReason::BadSeq, None, "zero] x"))
        );
        assert_eq!(parse_tag("[calwatch:nonsense] x"), None);
        assert_eq!(parse_tag("invalid type: [calwatch:bad_seq] x"), None);
    }

    #[test]
    fn odd_keys_are_escaped_and_cut_in_paths() {
        let mut s = String::new();
        push_key(&mut s, "a\nb");
        assert_eq!(s, r#""a\nb""#);
        let mut s = String::new();
        push_key(&mut s, &"é".repeat(1000));
        assert!(s.chars().count() < MAX_SEGMENT + 4, "{s}");
        assert!(s.ends_with('…'));
    }
}
