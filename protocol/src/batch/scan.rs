//! The fast path of batch decoding: one pass over the bytes of a payload as agents write it,
//! recording where the ids and names are (spans into the payload) instead of copying them.
//!
//! It answers only for payloads it fully understands, and then exactly as the serde decoder
//! would (the differential tests in `view.rs` hold it to that). Anything else — a string with
//! an escape, a field it does not know, a number it cannot read exactly, a duplicate, an error
//! of any kind — makes it give up (`None`), and the caller decodes with serde, which either
//! accepts the payload or says precisely why not. Giving up is always correct, only slower.

use std::ops::Range;

use super::Value;
use crate::MAX_READINGS;

/// Where an id or name lies in the payload.
pub(super) type Span = Range<u32>;

/// A reading as found in the payload: the device's span, and its values as a range of the
/// decoder's value list.
#[derive(Clone, Debug)]
pub(super) struct RawReading {
    pub(super) device: Span,
    pub(super) seq: u64,
    pub(super) ts: i64,
    pub(super) values: Range<u32>,
}

/// A value as found in the payload: where its name is, where its text is (a number in plain
/// decimals; empty otherwise), and the value.
#[derive(Clone, Debug)]
pub(super) struct RawValue {
    pub(super) name: Span,
    pub(super) text: Span,
    pub(super) value: Value,
}

/// Longest number text kept for copying (a writer formats longer ones itself).
const MAX_TEXT: usize = 24;

/// What the fast path found at the top level.
pub(super) struct RawBatch {
    pub(super) agent: Span,
    pub(super) sent: i64,
}

/// Longest id or value name (CONTRACT §1).
const MAX_ID_LEN: usize = 64;

/// The bytes of an id: `[A-Za-z0-9._-]`.
const ID_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-';
        b += 1;
    }
    t
};

/// Powers of ten that are exact in an `f64`.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Readings with more values than this go to the slow path, which checks duplicates by
/// sorting; pairwise is faster for the handful real readings carry.
const MAX_FAST_VALUES: usize = 32;

/// Integers of up to this many digits fit in an `i64`/`u64` without overflow checks.
const MAX_INT_DIGITS: usize = 18;

/// Decimal integers of up to this many digits are exact in an `f64`.
const MAX_EXACT_DIGITS: usize = 15;

/// Exponents with more digits than this are left to the slow path (overflow, underflow).
const MAX_EXP_DIGITS: usize = 4;

/// Parses `bytes` into `readings` and `values` (both cleared first); `None` means "decode this
/// one with serde".
pub(super) fn parse(
    bytes: &[u8],
    readings: &mut Vec<RawReading>,
    values: &mut Vec<RawValue>,
) -> Option<RawBatch> {
    readings.clear();
    values.clear();
    // Spans are u32; payloads are far smaller (MAX_BATCH_BYTES), but this path is public.
    u32::try_from(bytes.len()).ok()?;
    let mut c = Cursor { b: bytes, i: 0 };
    let (mut version, mut agent, mut sent, mut seen_readings) = (false, None, None, false);
    c.eat(b'{')?;
    loop {
        match c.key()? {
            b"v" if !version => {
                if c.int()? != (false, 1) {
                    return None;
                }
                version = true;
            }
            b"agent" if agent.is_none() => agent = Some(c.id()?),
            b"sent" if sent.is_none() => sent = Some(c.i64()?),
            b"readings" if !seen_readings => {
                c.readings(readings, values)?;
                seen_readings = true;
            }
            _ => return None,
        }
        if !c.next_member(b'}')? {
            break;
        }
    }
    c.ws();
    if c.i != bytes.len() || !version || !seen_readings {
        return None;
    }
    Some(RawBatch {
        agent: agent?,
        sent: sent?,
    })
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        match self.b.get(self.i) {
            Some(b' ' | b'\t' | b'\n' | b'\r') => {
                self.ws();
                self.b.get(self.i).copied()
            }
            b => b.copied(),
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        // Compact JSON first: the byte is there, no whitespace before it.
        if self.b.get(self.i) == Some(&c) || self.peek()? == c {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    /// After an object member or array element: `true` on `,` (another follows), `false` on
    /// `close`.
    fn next_member(&mut self, close: u8) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.i += 1;
                Some(true)
            }
            c if c == close => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// An object key and its colon. Keys are compared with the few this path knows, so any
    /// byte but a quote or an escape may be in one.
    fn key(&mut self) -> Option<&[u8]> {
        self.eat(b'"')?;
        let start = self.i;
        let rest = self.b.get(start..)?;
        let len = rest.iter().position(|&c| c == b'"' || c == b'\\')?;
        if rest[len] != b'"' {
            return None;
        }
        self.i = start + len + 1;
        self.eat(b':')?;
        Some(&rest[..len])
    }

    /// A string that is a valid id, `[A-Za-z0-9._-]{1,64}`.
    fn id(&mut self) -> Option<Span> {
        self.eat(b'"')?;
        let start = self.i;
        let rest = self.b.get(start..)?;
        let len = rest.iter().position(|&c| !ID_BYTE[usize::from(c)])?;
        if len == 0 || len > MAX_ID_LEN || rest[len] != b'"' {
            return None;
        }
        let i = start + len;
        self.i = i + 1;
        // Fits: the payload's length fits a u32 (checked in `parse`).
        Some(start as u32..i as u32)
    }

    /// Digits from here: their count and value (up to [`MAX_INT_DIGITS`]); JSON forbids a
    /// leading zero before another digit.
    #[inline(always)]
    fn digits(&mut self) -> Option<(usize, u64)> {
        let rest = self.b.get(self.i..)?;
        let mut n = 0u64;
        let mut count = 0;
        for &c in rest {
            if !c.is_ascii_digit() {
                break;
            }
            if count == MAX_INT_DIGITS {
                return None;
            }
            n = n * 10 + u64::from(c - b'0');
            count += 1;
        }
        if count == 0 || (count > 1 && rest[0] == b'0') {
            return None;
        }
        self.i += count;
        Some((count, n))
    }

    /// An integer token (no fraction, no exponent): sign and magnitude.
    fn int(&mut self) -> Option<(bool, u64)> {
        self.ws();
        let negative = self.b.get(self.i) == Some(&b'-');
        self.i += usize::from(negative);
        let (_, n) = self.digits()?;
        // A fraction or an exponent makes it a float; `-0` is one too, to serde_json.
        if matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) || (negative && n == 0) {
            return None;
        }
        Some((negative, n))
    }

    fn i64(&mut self) -> Option<i64> {
        let (negative, n) = self.int()?;
        // Below 10^18: fits.
        let n = n as i64;
        Some(if negative { -n } else { n })
    }

    /// A reading value: `true`, `false` or a finite number, exactly as serde_json reads it
    /// (correctly rounded, `-0` is negative zero).
    /// With the value, its text when it is a number in plain decimals (no exponent) of at
    /// most [`MAX_TEXT`] bytes (else an empty span).
    fn value(&mut self) -> Option<(Value, Span)> {
        match self.peek()? {
            b't' => self.literal(b"true", Value::Bool(true)),
            b'f' => self.literal(b"false", Value::Bool(false)),
            _ => {
                let start = self.i;
                let (x, plain) = self.number()?;
                let text = if plain && self.i - start <= MAX_TEXT {
                    start as u32..self.i as u32
                } else {
                    0..0
                };
                Some((Value::Number(x), text))
            }
        }
    }

    fn literal(&mut self, word: &[u8], value: Value) -> Option<(Value, Span)> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Some((value, 0..0))
        } else {
            None
        }
    }

    /// A number, and whether it was written without an exponent.
    fn number(&mut self) -> Option<(f64, bool)> {
        let start = self.i;
        let mut plain = true;
        let negative = self.b.get(self.i) == Some(&b'-');
        self.i += usize::from(negative);
        let (mut count, mut mantissa) = self.digits()?;
        // Decimal exponent of `mantissa`, while every digit read fits in it exactly.
        let mut exp10 = 0i32;
        let mut exact = true;
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            let rest = self.b.get(self.i..)?;
            let mut read = 0;
            for &c in rest {
                if !c.is_ascii_digit() {
                    break;
                }
                if count < MAX_EXACT_DIGITS {
                    mantissa = mantissa * 10 + u64::from(c - b'0');
                    count += 1;
                    exp10 -= 1;
                } else {
                    exact = false;
                }
                read += 1;
            }
            if read == 0 {
                return None;
            }
            self.i += read;
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            plain = false;
            let sign = match self.b.get(self.i) {
                Some(b'-') => -1,
                Some(b'+') => 1,
                _ => 0,
            };
            self.i += usize::from(sign != 0);
            let (n, e) = self.exponent();
            if n == 0 {
                return None;
            }
            if n > MAX_EXP_DIGITS {
                exact = false;
            } else {
                exp10 += if sign < 0 { -e } else { e };
            }
        }
        let x = if exact && count <= MAX_EXACT_DIGITS && exp10.unsigned_abs() <= 22 {
            // Clinger's fast path: the mantissa (< 10^15) and the power of ten are exact
            // in an f64, so one multiplication or division rounds correctly, as serde_json's
            // float_roundtrip does.
            let m = mantissa as f64;
            let x = if exp10 < 0 {
                m / POW10[exp10.unsigned_abs() as usize]
            } else {
                m * POW10[exp10 as usize]
            };
            if negative {
                -x
            } else {
                x
            }
        } else {
            // Validated JSON number syntax; std's parser rounds correctly.
            std::str::from_utf8(&self.b[start..self.i])
                .ok()?
                .parse::<f64>()
                .ok()?
        };
        x.is_finite().then_some((x, plain))
    }

    /// The digits of an exponent: their count and value (saturating).
    fn exponent(&mut self) -> (usize, i32) {
        let start = self.i;
        let mut e = 0i32;
        while let Some(&c) = self.b.get(self.i) {
            if !c.is_ascii_digit() {
                break;
            }
            e = e.saturating_mul(10).saturating_add(i32::from(c - b'0'));
            self.i += 1;
        }
        (self.i - start, e)
    }

    fn readings(
        &mut self,
        readings: &mut Vec<RawReading>,
        values: &mut Vec<RawValue>,
    ) -> Option<()> {
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            if readings.len() == MAX_READINGS {
                return None;
            }
            let reading = self.reading(values)?;
            readings.push(reading);
            if !self.next_member(b']')? {
                return Some(());
            }
        }
    }

    fn reading(&mut self, values: &mut Vec<RawValue>) -> Option<RawReading> {
        self.eat(b'{')?;
        let (mut device, mut seq, mut ts, mut vals) = (None, None, None, None);
        loop {
            match self.key()? {
                b"device" if device.is_none() => device = Some(self.id()?),
                b"seq" if seq.is_none() => match self.int()? {
                    (false, n) if n >= 1 => seq = Some(n),
                    _ => return None,
                },
                b"ts" if ts.is_none() => ts = Some(self.i64()?),
                b"values" if vals.is_none() => vals = Some(self.values(values)?),
                _ => return None,
            }
            if !self.next_member(b'}')? {
                break;
            }
        }
        Some(RawReading {
            device: device?,
            seq: seq?,
            ts: ts?,
            values: vals?,
        })
    }

    /// A `values` object, appended to `values`; its range there.
    fn values(&mut self, values: &mut Vec<RawValue>) -> Option<Range<u32>> {
        let first = values.len();
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
        } else {
            loop {
                let name = self.id()?;
                self.eat(b':')?;
                let (value, text) = self.value()?;
                let mine = &values[first..];
                // A duplicate name is refused; lengths first, most names differ in length.
                if mine.len() == MAX_FAST_VALUES
                    || mine.iter().any(|v| {
                        v.name.end - v.name.start == name.end - name.start
                            && self.b[span(&v.name)] == self.b[span(&name)]
                    })
                {
                    return None;
                }
                values.push(RawValue { name, text, value });
                if !self.next_member(b'}')? {
                    break;
                }
            }
        }
        // Fits: a value takes at least 4 bytes of a payload whose length fits a u32.
        Some(first as u32..values.len() as u32)
    }
}

/// A span as a slice range.
pub(super) fn span(s: &Span) -> Range<usize> {
    s.start as usize..s.end as usize
}
