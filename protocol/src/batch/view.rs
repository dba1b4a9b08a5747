//! Decoding without copying: a [`BatchDecoder`] turns a payload into a [`BatchView`] whose
//! readings borrow their device ids and value names from the payload itself. The gateway
//! decodes every batch this way; it allocates nothing per reading, and the decoder's buffers
//! are reused from one batch to the next.
//!
//! Payloads as agents write them take the fast path ([`scan`](super::scan)); any other payload
//! is decoded by serde into a [`ReadingBatch`] (accepted or rejected exactly as
//! [`ReadingBatch::decode`] does) and viewed from there, so callers see one type either way.

use std::fmt;

use super::scan::{self, span, RawReading, RawValue};
use super::{Reading, ReadingBatch, Value};
use crate::error::DecodeError;
use crate::id::Id;

/// A reading borrowed from a decoded batch or from a [`Reading`].
#[derive(Clone, Copy, Debug)]
pub struct ReadingRef<'a> {
    /// The device, as named in the registry.
    pub device: &'a str,
    /// Per-device sequence number, from 1.
    pub seq: u64,
    /// Event time, Unix epoch milliseconds (UTC).
    pub ts: i64,
    /// Name -> value, in the order sent; names are unique.
    pub values: ValuesRef<'a>,
}

/// The values of a [`ReadingRef`].
#[derive(Clone, Copy)]
pub struct ValuesRef<'a>(Values<'a>);

#[derive(Clone, Copy)]
enum Values<'a> {
    /// Names are spans of `text` (the payload).
    Spans {
        text: &'a str,
        items: &'a [RawValue],
    },
    Owned(&'a [(Id, Value)]),
}

impl<'a> ValuesRef<'a> {
    /// The values, in the order sent.
    #[inline]
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&'a str, Value)> + 'a {
        self.parts()
    }

    /// Both forms as one iterator: either side is empty, so no boxing is needed.
    #[inline]
    fn parts(&self) -> Iter<'a> {
        let (spans, owned, text) = match self.0 {
            Values::Spans { text, items } => (items, &[][..], text),
            Values::Owned(items) => (&[][..], items, ""),
        };
        Iter {
            spans: spans.iter(),
            owned: owned.iter(),
            text,
        }
    }

    /// How many values.
    #[inline]
    pub fn len(&self) -> usize {
        match self.0 {
            Values::Spans { items, .. } => items.len(),
            Values::Owned(items) => items.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values with, for a number, the text it had in the payload when that is plain
    /// decimals (`35.02`, `-7`, not `1e3`): a writer of text formats can copy it rather than
    /// format the number again. `None` for bools, other numbers, and values not decoded
    /// from a payload.
    #[inline]
    pub fn iter_with_text(&self) -> TextIter<'a> {
        TextIter(self.parts())
    }

    /// The value called `name`, if there is one.
    #[inline]
    pub fn get(&self, name: &str) -> Option<Value> {
        self.iter().find(|&(n, _)| n == name).map(|(_, v)| v)
    }

    /// The values as an owned list, e.g. to keep them after the payload is gone.
    pub fn to_vec(&self) -> Vec<(Id, Value)> {
        match self.0 {
            Values::Owned(items) => items.to_vec(),
            Values::Spans { .. } => self
                .iter()
                // The scanner admitted only valid names.
                .filter_map(|(n, v)| Id::new(n).ok().map(|n| (n, v)))
                .collect(),
        }
    }
}

impl fmt::Debug for ValuesRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

struct Iter<'a> {
    spans: std::slice::Iter<'a, RawValue>,
    owned: std::slice::Iter<'a, (Id, Value)>,
    text: &'a str,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, Value);

    #[inline]
    fn next(&mut self) -> Option<(&'a str, Value)> {
        if let Some(v) = self.spans.next() {
            // The scanner recorded spans of ASCII ids, inside `text`.
            return Some((self.text.get(span(&v.name)).unwrap_or_default(), v.value));
        }
        self.owned.next().map(|(n, v)| (n.as_str(), *v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.spans.len() + self.owned.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// The iterator of [`ValuesRef::iter_with_text`]: name, value, and a number's text.
pub struct TextIter<'a>(Iter<'a>);

impl<'a> Iterator for TextIter<'a> {
    type Item = (&'a str, Value, Option<&'a str>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let it = &mut self.0;
        if let Some(v) = it.spans.next() {
            let number = if v.text.end > v.text.start {
                it.text.get(span(&v.text))
            } else {
                None
            };
            return Some((
                it.text.get(span(&v.name)).unwrap_or_default(),
                v.value,
                number,
            ));
        }
        it.owned.next().map(|(n, v)| (n.as_str(), *v, None))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl Reading {
    /// This reading as a [`ReadingRef`], the form the gateway's checks take.
    #[inline]
    pub fn view(&self) -> ReadingRef<'_> {
        ReadingRef {
            device: self.device.as_str(),
            seq: self.seq,
            ts: self.ts,
            values: ValuesRef(Values::Owned(&self.values)),
        }
    }
}

impl ReadingRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Option<Reading> {
        Some(Reading {
            device: Id::new(self.device).ok()?,
            seq: self.seq,
            ts: self.ts,
            values: self.values.to_vec(),
        })
    }
}

/// Decodes reading batches, reusing its buffers from one to the next.
#[derive(Default)]
pub struct BatchDecoder {
    readings: Vec<RawReading>,
    values: Vec<RawValue>,
    /// The last batch that needed the slow path.
    owned: Option<ReadingBatch>,
    fast: u64,
    slow: u64,
}

impl fmt::Debug for BatchDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchDecoder")
            .field("fast", &self.fast)
            .field("slow", &self.slow)
            .finish_non_exhaustive()
    }
}

/// A decoded batch, borrowing from the payload and the decoder.
#[derive(Clone, Copy, Debug)]
pub struct BatchView<'a> {
    /// The sending agent.
    pub agent: &'a str,
    /// When the agent sent the batch, Unix epoch milliseconds (UTC).
    pub sent: i64,
    readings: Readings<'a>,
}

#[derive(Clone, Copy, Debug)]
enum Readings<'a> {
    Spans {
        text: &'a str,
        readings: &'a [RawReading],
        values: &'a [RawValue],
    },
    Owned(&'a [Reading]),
}

impl<'a> BatchView<'a> {
    /// How many readings.
    #[inline]
    pub fn len(&self) -> usize {
        match self.readings {
            Readings::Spans { readings, .. } => readings.len(),
            Readings::Owned(readings) => readings.len(),
        }
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The reading at `i` (in the order sent), if there is one.
    #[inline]
    pub fn get(&self, i: usize) -> Option<ReadingRef<'a>> {
        match self.readings {
            Readings::Spans {
                text,
                readings,
                values,
            } => {
                let r = readings.get(i)?;
                Some(ReadingRef {
                    device: text.get(span(&r.device))?,
                    seq: r.seq,
                    ts: r.ts,
                    values: ValuesRef(Values::Spans {
                        text,
                        items: values.get(span(&r.values))?,
                    }),
                })
            }
            Readings::Owned(readings) => readings.get(i).map(Reading::view),
        }
    }

    /// The readings, oldest first.
    #[inline]
    pub fn readings(&self) -> impl ExactSizeIterator<Item = ReadingRef<'a>> + 'a {
        let view = *self;
        (0..self.len()).map(move |i| {
            view.get(i)
                .unwrap_or_else(|| unreachable!("reading {i} of {} is in range", view.len()))
        })
    }

    /// An owned copy of the batch.
    pub fn to_owned(&self) -> Option<ReadingBatch> {
        Some(ReadingBatch {
            agent: Id::new(self.agent).ok()?,
            sent: self.sent,
            readings: self
                .readings()
                .map(|r| r.to_owned())
                .collect::<Option<_>>()?,
        })
    }
}

impl BatchDecoder {
    /// A decoder with empty buffers.
    pub fn new() -> BatchDecoder {
        BatchDecoder::default()
    }

    /// Decodes `payload` as [`ReadingBatch::decode`] would: the same batches accepted, with
    /// the same values, and the same errors.
    pub fn decode<'a>(&'a mut self, payload: &'a [u8]) -> Result<BatchView<'a>, DecodeError> {
        self.owned = None;
        if payload.len() <= crate::MAX_BATCH_BYTES {
            if let Ok(text) = std::str::from_utf8(payload) {
                if let Some(raw) = scan::parse(payload, &mut self.readings, &mut self.values) {
                    if let Some(agent) = text.get(span(&raw.agent)) {
                        self.fast += 1;
                        return Ok(BatchView {
                            agent,
                            sent: raw.sent,
                            readings: Readings::Spans {
                                text,
                                readings: &self.readings,
                                values: &self.values,
                            },
                        });
                    }
                }
            }
        }
        let batch = self.owned.insert(ReadingBatch::decode(payload)?);
        self.slow += 1;
        Ok(BatchView {
            agent: batch.agent.as_str(),
            sent: batch.sent,
            readings: Readings::Owned(&batch.readings),
        })
    }

    /// Batches decoded by the fast path and by serde, so far.
    pub fn paths(&self) -> (u64, u64) {
        (self.fast, self.slow)
    }
}

/// Decodes `bytes` with a [`BatchDecoder`] and with [`ReadingBatch::decode`], asserts that
/// both give the same answer (numbers bit for bit), and says whether the fast path took it.
/// For the tests and the fuzz target `batch_decode` (it panics on a disagreement).
#[doc(hidden)]
pub fn assert_decoders_agree(bytes: &[u8]) -> bool {
    let expected = ReadingBatch::decode(bytes);
    let mut decoder = BatchDecoder::new();
    if let Ok(view) = decoder.decode(bytes) {
        // A number's text, where kept, reads back as the very same number.
        for r in view.readings() {
            for (name, value, text) in r.values.iter_with_text() {
                if let Some(text) = text {
                    let x: f64 = text.parse().unwrap_or(f64::NAN);
                    assert_eq!(
                        Some(x.to_bits()),
                        value.as_f64().map(f64::to_bits),
                        "{name}: {text}"
                    );
                }
            }
        }
    }
    let got = decoder.decode(bytes).map(|v| v.to_owned());
    let fast = decoder.paths().0 >= 1;
    match (&got, &expected) {
        (Ok(Some(got)), Ok(expected)) => {
            assert_eq!(got, expected, "{}", String::from_utf8_lossy(bytes));
            let bits = |b: &ReadingBatch| -> Vec<u64> {
                b.readings
                    .iter()
                    .flat_map(|r| r.values.iter())
                    .filter_map(|(_, v)| v.as_f64().map(f64::to_bits))
                    .collect()
            };
            assert_eq!(
                bits(got),
                bits(expected),
                "{}",
                String::from_utf8_lossy(bytes)
            );
        }
        (Err(got), Err(expected)) => assert_eq!(got, expected),
        _ => panic!(
            "decoders disagree on {}: view {got:?}, serde {expected:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
    fast
}

#[cfg(test)]
mod tests;
