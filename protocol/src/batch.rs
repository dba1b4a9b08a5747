//! Reading batches, published on `calwatch/v1/agents/{agent}/readings` (CONTRACT §1).
//!
//! ```json
//! {"v":1,"agent":"station-17","sent":1764421200123,
//!  "readings":[{"device":"HS-DSP-0042","seq":184467,"ts":1764421199870,
//!               "values":{"sale_l":35.02,"sale_id":99812}}]}
//! ```
//!
//! A batch is accepted or rejected whole. Decoding rejects: more than [`MAX_BATCH_BYTES`]
//! (checked before parsing), non-JSON, a `v` other than [`VERSION`], missing or mistyped fields
//! (`ts` and `sent` are integer milliseconds; floats are rejected), invalid ids or value names,
//! `seq` below 1, values that are not a finite number or a bool, the same value name twice in a
//! reading, and more than [`MAX_READINGS`] readings (counted while parsing, so a huge array is
//! never built). An empty `readings` array is a valid, empty batch.
//!
//! Forward compatibility within v1: fields this build does not know, at the top level or in a
//! reading, are ignored, so a newer agent can add fields without breaking older gateways.
//!
//! Numbers decode bit-exactly (serde_json's `float_roundtrip`): a `k_factor` compared with the
//! sealed value on a certificate is exactly the value the agent sent. Integers are carried as
//! `f64`, so integers beyond 2^53 lose precision. Encoding writes integral numbers below 2^53
//! without a fraction (`99812`, not `99812.0`), so counters and ids read naturally and decode to
//! the same `f64`.

use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{DecodeError, EncodeError, RejectReason};
use crate::id::Id;
use crate::json::{self, reject, reject_child, Version};
use crate::{MAX_BATCH_BYTES, MAX_READINGS, VERSION};

mod scan;
mod view;

#[doc(hidden)]
pub use view::assert_decoders_agree;
pub use view::{BatchDecoder, BatchView, ReadingRef, TextIter, ValuesRef};

/// Integral values below this magnitude are written as JSON integers; they are exact in `f64`.
const EXACT_INT_LIMIT: f64 = 9_007_199_254_740_992.0; // 2^53

/// One measured value: the wire carries only numbers and bools (CONTRACT §1 `values`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// A finite number; decoding never yields NaN or an infinity.
    Number(f64),
    /// A flag such as `stable` or `overload`.
    Bool(bool),
}

impl Value {
    /// The number, if this is one; checks read measured quantities through this.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Number(x) => Some(x),
            Value::Bool(_) => None,
        }
    }

    /// The flag, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            Value::Number(_) => None,
        }
    }
}

/// One poll of one device.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    /// The device, as named in the registry.
    pub device: Id,
    /// Per-device sequence number, from 1; the gateway dedups and finds gaps by it.
    pub seq: u64,
    /// Event time, Unix epoch milliseconds (UTC).
    pub ts: i64,
    /// Name -> value, in the order sent; names are unique within a reading.
    pub values: Vec<(Id, Value)>,
}

impl Reading {
    /// The value called `name`, if the reading has one.
    pub fn value(&self, name: &str) -> Option<Value> {
        self.values
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|&(_, v)| v)
    }

    /// The value called `name` if it is a number; what the checks read.
    pub fn number(&self, name: &str) -> Option<f64> {
        self.value(name).and_then(|v| v.as_f64())
    }

    /// The value called `name` if it is a bool (`stable`, `zero`, `overload`, ...).
    pub fn flag(&self, name: &str) -> Option<bool> {
        self.value(name).and_then(|v| v.as_bool())
    }
}

/// The payload of `calwatch/v1/agents/{agent}/readings`; `v` is implied and always `1`.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadingBatch {
    /// The sending agent; the gateway checks it against the topic.
    pub agent: Id,
    /// When the agent sent the batch, Unix epoch milliseconds (UTC).
    pub sent: i64,
    /// Readings of any of the agent's devices, oldest first.
    pub readings: Vec<Reading>,
}

impl ReadingBatch {
    /// Parses and validates a payload; any violation rejects the whole batch (CONTRACT §1).
    pub fn decode(bytes: &[u8]) -> Result<ReadingBatch, DecodeError> {
        json::decode(bytes)
    }

    /// The JSON payload, refusing anything the gateway would reject, so a bad batch is caught
    /// at the agent rather than counted and dropped at the gateway.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        if self.readings.len() > MAX_READINGS {
            return Err(EncodeError::new(
                RejectReason::TooManyReadings,
                Some("readings".into()),
                format!(
                    "{} readings, the limit is {MAX_READINGS}",
                    self.readings.len()
                ),
            ));
        }
        for (i, reading) in self.readings.iter().enumerate() {
            if reading.seq == 0 {
                return Err(EncodeError::new(
                    RejectReason::BadSeq,
                    Some(format!("readings[{i}].seq")),
                    "seq must be at least 1",
                ));
            }
            for (name, value) in &reading.values {
                if let Value::Number(x) = value {
                    if !x.is_finite() {
                        return Err(EncodeError::new(
                            RejectReason::NonFinite,
                            Some(format!("readings[{i}].values.{name}")),
                            format!("not a finite number ({x})"),
                        ));
                    }
                }
            }
            if let Some(name) = first_duplicate(&reading.values) {
                return Err(EncodeError::new(
                    RejectReason::DuplicateValue,
                    Some(format!("readings[{i}].values.{name}")),
                    "value name appears twice in one reading",
                ));
            }
        }
        // ~170 bytes a reading on the wire (DESIGN, performance notes); saves regrowing.
        let guess = 64 + self.readings.len().saturating_mul(176);
        let mut out = Vec::with_capacity(guess.min(MAX_BATCH_BYTES));
        serde_json::to_writer(&mut out, self)
            .map_err(|e| EncodeError::new(RejectReason::Malformed, None, e.to_string()))?;
        if out.len() > MAX_BATCH_BYTES {
            return Err(EncodeError::new(
                RejectReason::TooLarge,
                None,
                format!(
                    "batch is {} bytes, the limit is {MAX_BATCH_BYTES}",
                    out.len()
                ),
            ));
        }
        Ok(out)
    }
}

/// The first name that occurs twice, if any.
fn first_duplicate(values: &[(Id, Value)]) -> Option<&str> {
    // Readings carry a handful of values: pairwise is fastest there. A hostile payload may
    // carry thousands, so fall back to sorting.
    if values.len() <= 16 {
        for (i, (name, _)) in values.iter().enumerate() {
            if values[..i].iter().any(|(seen, _)| seen == name) {
                return Some(name.as_str());
            }
        }
        None
    } else {
        let mut names: Vec<&str> = values.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
    }
}

// ---- encoding ----

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Value::Bool(b) => serializer.serialize_bool(b),
            Value::Number(x) if !x.is_finite() => {
                Err(serde::ser::Error::custom("not a finite number"))
            }
            // -0.0 keeps its fraction so that it decodes to -0.0 again.
            Value::Number(x)
                if x.fract() == 0.0
                    && x.abs() < EXACT_INT_LIMIT
                    && !(x == 0.0 && x.is_sign_negative()) =>
            {
                // Exact: integral and below 2^53.
                serializer.serialize_i64(x as i64)
            }
            Value::Number(x) => serializer.serialize_f64(x),
        }
    }
}

impl Serialize for Reading {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Reading", 4)?;
        s.serialize_field("device", &self.device)?;
        s.serialize_field("seq", &self.seq)?;
        s.serialize_field("ts", &self.ts)?;
        s.serialize_field("values", &ValuesOut(&self.values))?;
        s.end()
    }
}

/// `values` as a JSON object, in the order of the `Vec`.
struct ValuesOut<'a>(&'a [(Id, Value)]);

impl Serialize for ValuesOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut m = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            m.serialize_entry(name, value)?;
        }
        m.end()
    }
}

impl Serialize for ReadingBatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("ReadingBatch", 4)?;
        s.serialize_field("v", &VERSION)?;
        s.serialize_field("agent", &self.agent)?;
        s.serialize_field("sent", &self.sent)?;
        s.serialize_field("readings", &self.readings)?;
        s.end()
    }
}

// ---- decoding ----
//
// Hand-written visitors: no buffering (an untagged enum would buffer every value), values go
// straight into the Vec. Errors carry a reason tag for `json::classify`.

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl Visitor<'_> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or a bool")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, x: i64) -> Result<Value, E> {
        Ok(Value::Number(x as f64))
    }

    fn visit_u64<E: de::Error>(self, x: u64) -> Result<Value, E> {
        Ok(Value::Number(x as f64))
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Value, E> {
        if x.is_finite() {
            Ok(Value::Number(x))
        } else {
            Err(reject(RejectReason::NonFinite, "not a finite number"))
        }
    }
}

/// The `values` object of a reading.
struct Values(Vec<(Id, Value)>);

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Values, D::Error> {
        deserializer.deserialize_map(ValuesVisitor)
    }
}

struct ValuesVisitor;

impl<'de> Visitor<'de> for ValuesVisitor {
    type Value = Values;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of value names to numbers or bools")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Values, A::Error> {
        let mut values = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
        while let Some(entry) = map.next_entry::<Id, Value>()? {
            values.push(entry);
        }
        if let Some(name) = first_duplicate(&values) {
            return Err(reject_child(
                RejectReason::DuplicateValue,
                name,
                "value name appears twice in one reading",
            ));
        }
        Ok(Values(values))
    }
}

/// A `seq`: an integer from 1.
struct Seq(u64);

impl<'de> Deserialize<'de> for Seq {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Seq, D::Error> {
        deserializer.deserialize_u64(SeqVisitor)
    }
}

struct SeqVisitor;

impl Visitor<'_> for SeqVisitor {
    type Value = Seq;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer from 1")
    }

    fn visit_u64<E: de::Error>(self, seq: u64) -> Result<Seq, E> {
        if seq == 0 {
            Err(reject(
                RejectReason::BadSeq,
                "seq must be at least 1, got 0",
            ))
        } else {
            Ok(Seq(seq))
        }
    }

    fn visit_i64<E: de::Error>(self, seq: i64) -> Result<Seq, E> {
        match u64::try_from(seq) {
            Ok(seq) => self.visit_u64(seq),
            Err(_) => Err(reject(
                RejectReason::BadSeq,
                format_args!("seq must be at least 1, got {seq}"),
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum ReadingField {
    Device,
    Seq,
    Ts,
    Values,
    #[serde(other)]
    Unknown,
}

impl<'de> Deserialize<'de> for Reading {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Reading, D::Error> {
        deserializer.deserialize_map(ReadingVisitor)
    }
}

struct ReadingVisitor;

impl<'de> Visitor<'de> for ReadingVisitor {
    type Value = Reading;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a reading object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Reading, A::Error> {
        let mut device = None;
        let mut seq = None;
        let mut ts = None;
        let mut values = None;
        while let Some(field) = map.next_key::<ReadingField>()? {
            match field {
                ReadingField::Device => set(&mut device, "device", map.next_value::<Id>()?)?,
                ReadingField::Seq => set(&mut seq, "seq", map.next_value::<Seq>()?.0)?,
                ReadingField::Ts => set(&mut ts, "ts", map.next_value::<i64>()?)?,
                ReadingField::Values => set(&mut values, "values", map.next_value::<Values>()?.0)?,
                ReadingField::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Reading {
            device: device.ok_or_else(|| de::Error::missing_field("device"))?,
            seq: seq.ok_or_else(|| de::Error::missing_field("seq"))?,
            ts: ts.ok_or_else(|| de::Error::missing_field("ts"))?,
            values: values.ok_or_else(|| de::Error::missing_field("values"))?,
        })
    }
}

/// Stores a field's value, refusing a second one: which of two would win is not obvious.
fn set<T, E: de::Error>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::duplicate_field(name));
    }
    *slot = Some(value);
    Ok(())
}

/// The `readings` array, bounded by [`MAX_READINGS`].
struct Readings(Vec<Reading>);

impl<'de> Deserialize<'de> for Readings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Readings, D::Error> {
        deserializer.deserialize_seq(ReadingsVisitor)
    }
}

struct ReadingsVisitor;

impl<'de> Visitor<'de> for ReadingsVisitor {
    type Value = Readings;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of readings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Readings, A::Error> {
        let mut readings = Vec::with_capacity(seq.size_hint().unwrap_or(16).min(MAX_READINGS));
        while let Some(reading) = seq.next_element::<Reading>()? {
            readings.push(reading);
            if readings.len() == MAX_READINGS {
                // Look at, but do not build, anything past the limit.
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(reject(
                        RejectReason::TooManyReadings,
                        format_args!("more than {MAX_READINGS} readings"),
                    ));
                }
                break;
            }
        }
        Ok(Readings(readings))
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum BatchField {
    V,
    Agent,
    Sent,
    Readings,
    #[serde(other)]
    Unknown,
}

impl<'de> Deserialize<'de> for ReadingBatch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ReadingBatch, D::Error> {
        deserializer.deserialize_map(BatchVisitor)
    }
}

struct BatchVisitor;

impl<'de> Visitor<'de> for BatchVisitor {
    type Value = ReadingBatch;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a reading batch object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ReadingBatch, A::Error> {
        let mut version = None;
        let mut agent = None;
        let mut sent = None;
        let mut readings = None;
        while let Some(field) = map.next_key::<BatchField>()? {
            match field {
                BatchField::V => set(&mut version, "v", map.next_value::<Version>()?)?,
                BatchField::Agent => set(&mut agent, "agent", map.next_value::<Id>()?)?,
                BatchField::Sent => set(&mut sent, "sent", map.next_value::<i64>()?)?,
                BatchField::Readings => {
                    set(&mut readings, "readings", map.next_value::<Readings>()?.0)?
                }
                BatchField::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if version.is_none() {
            return Err(reject_child(
                RejectReason::UnknownVersion,
                "v",
                format_args!("missing; this build speaks v{VERSION}"),
            ));
        }
        Ok(ReadingBatch {
            agent: agent.ok_or_else(|| de::Error::missing_field("agent"))?,
            sent: sent.ok_or_else(|| de::Error::missing_field("sent"))?,
            readings: readings.ok_or_else(|| de::Error::missing_field("readings"))?,
        })
    }
}

#[cfg(test)]
mod tests;
