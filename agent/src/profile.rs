//! Device profiles: the register map of an instrument model (`config/profiles/*.toml`).
//!
//! A profile is parsed once into typed [`ValueDef`]s; every later step (planning, decoding,
//! simulating) trusts it. Validation errors name the profile file and line.

use std::path::Path;

use calwatch_protocol::node::tomlfile::{self, ConfigError};
use calwatch_protocol::Id;
use serde::Deserialize;

/// What kind of instrument a profile describes; selects the gateway's checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstrumentKind {
    Scale,
    Dispenser,
    EnergyMeter,
    Other,
}

/// Modbus data table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    Coil,
    Discrete,
    Holding,
    Input,
}

impl Table {
    /// Coils and discrete inputs are bit tables; the others hold 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }
}

/// How the raw registers of a value are interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    Bool,
    Bit,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    String,
}

/// Byte and word order of multi-register values; `ABCD` is big-endian throughout
/// (the Modbus default), `CDAB` swaps words, `BADC` swaps bytes in each word, `DCBA` both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
pub enum WordOrder {
    #[default]
    ABCD,
    DCBA,
    BADC,
    CDAB,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    kind: InstrumentKind,
    model: String,
    #[serde(default)]
    value: Vec<toml::Spanned<RawValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValue {
    name: String,
    table: Table,
    address: u32,
    #[serde(rename = "type")]
    ty: ValueType,
    #[serde(default)]
    order: WordOrder,
    #[serde(default = "one")]
    scale: f64,
    #[serde(default)]
    offset: f64,
    bit: Option<u8>,
    #[serde(default)]
    invert: bool,
    registers: Option<u16>,
    unit: Option<String>,
    omit_when: Option<f64>,
    wrap: Option<f64>,
}

fn one() -> f64 {
    1.0
}

/// One value of a register map, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueDef {
    pub name: Id,
    pub table: Table,
    pub address: u16,
    pub ty: ValueType,
    pub order: WordOrder,
    pub scale: f64,
    pub offset: f64,
    /// Bit index within the register, for `bit`.
    pub bit: u8,
    pub invert: bool,
    /// Registers spanned (bits for bit tables).
    pub len: u16,
    pub unit: Option<String>,
    /// A decoded value equal to this is left out of the reading: registers that hold a
    /// placeholder when there is nothing to report (e.g. no check weight on the pan).
    pub omit_when: Option<f64>,
    /// The modulus at which a cumulative register wraps to zero (a 6-digit kWh display
    /// register: 1000000): going from near it to a small value is no rollback (DESIGN
    /// decision 17).
    pub wrap: Option<f64>,
}

impl ValueDef {
    /// String values are identity data (model, serial), not readings.
    pub fn is_identity(&self) -> bool {
        self.ty == ValueType::String
    }
}

/// The cumulative registers whose `wrap` the agent reports (CONTRACT §1 well-known names).
pub const WRAPPING_REGISTERS: [&str; 2] = ["energy_kwh", "totalizer_l"];

/// A register map of one instrument model.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub kind: InstrumentKind,
    pub model: String,
    pub values: Vec<ValueDef>,
}

impl Profile {
    /// The modulus the device's energy or totalizer register wraps at (its `wrap`), reported
    /// in the agent's status for the gateway's rollback check.
    pub fn wrap(&self) -> Option<f64> {
        WRAPPING_REGISTERS.iter().find_map(|name| {
            self.values
                .iter()
                .find(|v| v.name.as_str() == *name)
                .and_then(|v| v.wrap)
        })
    }

    /// Loads and validates a profile file.
    pub fn load(path: &Path) -> Result<Profile, ConfigError> {
        let (raw, text): (RawProfile, String) = tomlfile::load(path)?;
        Self::from_raw(path, &text, raw)
    }

    /// Parses and validates profile text that came from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Profile, ConfigError> {
        let raw: RawProfile = tomlfile::parse(path, text)?;
        Self::from_raw(path, text, raw)
    }

    fn from_raw(path: &Path, text: &str, raw: RawProfile) -> Result<Profile, ConfigError> {
        let mut values: Vec<(ValueDef, usize)> = Vec::with_capacity(raw.value.len());
        for spanned in raw.value {
            let offset = spanned.span().start;
            let err = |m: String| ConfigError::at_offset(path, text, offset, m);
            let v = spanned.into_inner();
            let name = Id::new(v.name.clone()).map_err(|e| err(format!("value name: {e}")))?;
            let len = match v.ty {
                ValueType::Bool | ValueType::Bit | ValueType::U16 | ValueType::I16 => 1,
                ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
                ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
                ValueType::String => match v.registers {
                    Some(n) if (1..=125).contains(&n) => n,
                    Some(n) => {
                        return Err(err(format!(
                            "value {name}: registers = {n} out of range 1..=125"
                        )))
                    }
                    None => {
                        return Err(err(format!(
                            "value {name}: type string needs registers = N"
                        )))
                    }
                },
            };
            if v.registers.is_some() && v.ty != ValueType::String {
                return Err(err(format!(
                    "value {name}: registers only applies to type string"
                )));
            }
            match (v.ty, v.table.is_bits()) {
                (ValueType::Bool, false) => {
                    return Err(err(format!(
                        "value {name}: type bool reads a coil or discrete input; use type bit with bit = N for a register bit"
                    )))
                }
                (ValueType::Bool, true) => {}
                (_, true) => {
                    return Err(err(format!(
                        "value {name}: table {:?} holds bits; only type bool applies",
                        v.table
                    )))
                }
                _ => {}
            }
            let bit = match (v.ty, v.bit) {
                (ValueType::Bit, Some(b)) if b < 16 => b,
                (ValueType::Bit, Some(b)) => {
                    return Err(err(format!("value {name}: bit = {b} out of range 0..=15")))
                }
                (ValueType::Bit, None) => {
                    return Err(err(format!("value {name}: type bit needs bit = N")))
                }
                (_, Some(_)) => {
                    return Err(err(format!("value {name}: bit only applies to type bit")))
                }
                (_, None) => 0,
            };
            if v.invert && !matches!(v.ty, ValueType::Bit | ValueType::Bool) {
                return Err(err(format!(
                    "value {name}: invert only applies to bit and bool"
                )));
            }
            if !v.scale.is_finite() || !v.offset.is_finite() || v.scale == 0.0 {
                return Err(err(format!(
                    "value {name}: scale must be finite and non-zero, offset finite"
                )));
            }
            if let Some(m) = v.wrap {
                if matches!(v.ty, ValueType::Bool | ValueType::Bit | ValueType::String) {
                    return Err(err(format!(
                        "value {name}: wrap only applies to numeric types"
                    )));
                }
                if !(m.is_finite() && m > 0.0) {
                    return Err(err(format!(
                        "value {name}: wrap must be a positive number (the modulus), not {m}"
                    )));
                }
            }
            if v.address + u32::from(len) > 65_536 {
                return Err(err(format!(
                    "value {name}: address {} + {len} registers is beyond 65535",
                    v.address
                )));
            }
            let def = ValueDef {
                name,
                table: v.table,
                address: v.address as u16,
                ty: v.ty,
                order: v.order,
                scale: v.scale,
                offset: v.offset,
                bit,
                invert: v.invert,
                len,
                unit: v.unit,
                omit_when: v.omit_when,
                wrap: v.wrap,
            };
            if let Some((other, _)) = values.iter().find(|(o, _)| o.name == def.name) {
                return Err(err(format!("value {}: name used twice", other.name)));
            }
            // Two values may share a register only when both are bits of it.
            if let Some((other, _)) = values.iter().find(|(o, _)| overlaps(o, &def)) {
                return Err(err(format!(
                    "value {}: registers {}..{} of table {:?} overlap value {}",
                    def.name,
                    def.address,
                    u32::from(def.address) + u32::from(def.len),
                    def.table,
                    other.name
                )));
            }
            values.push((def, offset));
        }
        Ok(Profile {
            kind: raw.kind,
            model: raw.model,
            values: values.into_iter().map(|(v, _)| v).collect(),
        })
    }
}

fn overlaps(a: &ValueDef, b: &ValueDef) -> bool {
    if a.table != b.table {
        return false;
    }
    let (a0, a1) = (
        u32::from(a.address),
        u32::from(a.address) + u32::from(a.len),
    );
    let (b0, b1) = (
        u32::from(b.address),
        u32::from(b.address) + u32::from(b.len),
    );
    if a1 <= b0 || b1 <= a0 {
        return false;
    }
    let both_bits = a.ty == ValueType::Bit && b.ty == ValueType::Bit;
    !(both_bits && a.bit != b.bit)
}

/// A decoded register value: a reading value or identity text.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Number(f64),
    Bool(bool),
    Text(String),
}

/// Puts the registers of a multi-register value into big-endian (ABCD) byte order.
fn ordered_bytes(regs: &[u16], order: WordOrder) -> Vec<u8> {
    let mut bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
    match order {
        WordOrder::ABCD => {}
        WordOrder::DCBA => bytes.reverse(),
        WordOrder::BADC => bytes.chunks_exact_mut(2).for_each(|c| c.swap(0, 1)),
        WordOrder::CDAB => {
            let words: Vec<[u8; 2]> = bytes.chunks_exact(2).rev().map(|c| [c[0], c[1]]).collect();
            bytes = words.concat();
        }
    }
    bytes
}

/// A 16-bit register in the value's byte order: `BADC` and `DCBA` mean the low byte comes
/// first (as pymodbus's little byte order writes it); `ABCD` and `CDAB` are the same for
/// one register. Its own inverse.
fn word16(w: u16, order: WordOrder) -> u16 {
    match order {
        WordOrder::BADC | WordOrder::DCBA => w.swap_bytes(),
        WordOrder::ABCD | WordOrder::CDAB => w,
    }
}

/// Inverse of [`ordered_bytes`]: big-endian bytes into registers in the device's order.
fn registers_from_bytes(mut bytes: Vec<u8>, order: WordOrder) -> Vec<u16> {
    match order {
        WordOrder::ABCD => {}
        WordOrder::DCBA => bytes.reverse(),
        WordOrder::BADC => bytes.chunks_exact_mut(2).for_each(|c| c.swap(0, 1)),
        WordOrder::CDAB => {
            let words: Vec<[u8; 2]> = bytes.chunks_exact(2).rev().map(|c| [c[0], c[1]]).collect();
            bytes = words.concat();
        }
    }
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

/// The f64 nearest to the shortest decimal that reads back as `x`: an f32 register holding
/// 230.1 becomes 230.1, not 230.10000610351562.
fn f32_as_decimal(x: f32) -> f64 {
    if !x.is_finite() {
        return f64::from(x);
    }
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// Decimal places of a scale or offset such as 0.001 (3) or 0.5 (1), at most 9.
fn decimals_of(x: f64) -> i32 {
    (0..=9)
        .find(|&d| {
            let p = 10f64.powi(d);
            ((x * p).round() - x * p).abs() < 1e-9 * p.max(1.0)
        })
        .unwrap_or(9)
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

impl ValueDef {
    /// Decodes this value from its registers (`regs.len() == len`) or, for bit tables,
    /// from one bit per element (non-zero = set).
    pub fn decode(&self, regs: &[u16]) -> Decoded {
        let raw = match self.ty {
            ValueType::Bool => return Decoded::Bool((regs[0] != 0) != self.invert),
            ValueType::Bit => {
                return Decoded::Bool(((regs[0] >> self.bit) & 1 == 1) != self.invert)
            }
            ValueType::String => {
                let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
                let text: String = bytes
                    .iter()
                    .filter(|&&b| b != 0)
                    .map(|&b| if b.is_ascii() { b as char } else { '?' })
                    .collect();
                return Decoded::Text(text.trim().to_string());
            }
            ValueType::U16 => f64::from(word16(regs[0], self.order)),
            ValueType::I16 => f64::from(word16(regs[0], self.order) as i16),
            _ => {
                let b = ordered_bytes(regs, self.order);
                match self.ty {
                    ValueType::U32 => f64::from(u32::from_be_bytes(array(&b))),
                    ValueType::I32 => f64::from(i32::from_be_bytes(array(&b))),
                    ValueType::F32 => f32_as_decimal(f32::from_be_bytes(array(&b))),
                    ValueType::U64 => u64::from_be_bytes(array(&b)) as f64,
                    ValueType::I64 => i64::from_be_bytes(array(&b)) as f64,
                    _ => f64::from_be_bytes(array(&b)),
                }
            }
        };
        let value = raw * self.scale + self.offset;
        // Scaling integer counts by 0.001 gives 12.345000000000001; round to the decimals
        // the scale and offset can produce so readings store and print as the device meant.
        let decimals = decimals_of(self.scale).max(decimals_of(self.offset));
        let value = if self.ty != ValueType::F32 && self.ty != ValueType::F64 && decimals > 0 {
            let p = 10f64.powi(decimals);
            (value * p).round() / p
        } else {
            value
        };
        Decoded::Number(value)
    }

    /// Encodes an engineering value into this value's registers: what a device would hold.
    /// Used by the simulator; integers round to the nearest raw step and saturate.
    pub fn encode(&self, value: &Decoded) -> Vec<u16> {
        match (self.ty, value) {
            (ValueType::Bool, Decoded::Bool(b)) => vec![u16::from(*b != self.invert)],
            (ValueType::Bit, Decoded::Bool(b)) => vec![u16::from(*b != self.invert) << self.bit],
            (ValueType::String, Decoded::Text(t)) => {
                let mut bytes: Vec<u8> = t.bytes().take(usize::from(self.len) * 2).collect();
                bytes.resize(usize::from(self.len) * 2, 0);
                registers_from_bytes(bytes, WordOrder::ABCD)
            }
            (_, Decoded::Number(x)) => {
                let raw = (x - self.offset) / self.scale;
                match self.ty {
                    ValueType::U16 => {
                        vec![word16(raw.round().clamp(0.0, 65_535.0) as u16, self.order)]
                    }
                    ValueType::I16 => vec![word16(
                        raw.round().clamp(-32_768.0, 32_767.0) as i16 as u16,
                        self.order,
                    )],
                    ValueType::U32 => registers_from_bytes(
                        (raw.round() as u32).to_be_bytes().to_vec(),
                        self.order,
                    ),
                    ValueType::I32 => registers_from_bytes(
                        (raw.round() as i32).to_be_bytes().to_vec(),
                        self.order,
                    ),
                    ValueType::F32 => {
                        registers_from_bytes((raw as f32).to_be_bytes().to_vec(), self.order)
                    }
                    ValueType::U64 => registers_from_bytes(
                        (raw.round() as u64).to_be_bytes().to_vec(),
                        self.order,
                    ),
                    ValueType::I64 => registers_from_bytes(
                        (raw.round() as i64).to_be_bytes().to_vec(),
                        self.order,
                    ),
                    ValueType::F64 => registers_from_bytes(raw.to_be_bytes().to_vec(), self.order),
                    _ => vec![0; usize::from(self.len)],
                }
            }
            _ => vec![0; usize::from(self.len)],
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn def(ty: ValueType, order: WordOrder) -> ValueDef {
        let len = match ty {
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
            _ => 1,
        };
        ValueDef {
            name: Id::new("x").unwrap(),
            table: Table::Holding,
            address: 0,
            ty,
            order,
            scale: 1.0,
            offset: 0.0,
            bit: 0,
            invert: false,
            len,
            unit: None,
            omit_when: None,
            wrap: None,
        }
    }

    #[test]
    fn f32_in_every_order() {
        // 230.5 as f32 is 0x43668000: A=43 B=66 C=80 D=00.
        let cases = [
            (WordOrder::ABCD, [0x4366, 0x8000]),
            (WordOrder::CDAB, [0x8000, 0x4366]),
            (WordOrder::BADC, [0x6643, 0x0080]),
            (WordOrder::DCBA, [0x0080, 0x6643]),
        ];
        for (order, regs) in cases {
            let d = def(ValueType::F32, order);
            assert_eq!(d.decode(&regs), Decoded::Number(230.5), "{order:?}");
            assert_eq!(
                d.encode(&Decoded::Number(230.5)),
                regs.to_vec(),
                "{order:?}"
            );
        }
    }

    #[test]
    fn floats_and_scaled_counts_read_as_decimals() {
        let d = def(ValueType::F32, WordOrder::ABCD);
        let regs = d.encode(&Decoded::Number(230.1));
        assert_eq!(d.decode(&regs), Decoded::Number(230.1));
        let mut d = def(ValueType::U32, WordOrder::ABCD);
        d.scale = 0.001;
        assert_eq!(d.decode(&[0, 12_345]), Decoded::Number(12.345));
        d.scale = 0.01;
        assert_eq!(d.decode(&[0, 10_012]), Decoded::Number(100.12));
        assert_eq!(decimals_of(1.0), 0);
        assert_eq!(decimals_of(0.5), 1);
        assert_eq!(decimals_of(0.001), 3);
    }

    #[test]
    fn sixteen_bit_byte_order() {
        let mut d = def(ValueType::U16, WordOrder::BADC);
        assert_eq!(d.decode(&[0x3412]), Decoded::Number(f64::from(0x1234u16)));
        assert_eq!(
            d.encode(&Decoded::Number(f64::from(0x1234u16))),
            vec![0x3412]
        );
        d.ty = ValueType::I16;
        d.order = WordOrder::DCBA;
        assert_eq!(d.decode(&[0xFEFF]), Decoded::Number(-2.0));
        d.order = WordOrder::CDAB;
        assert_eq!(d.decode(&[0xFFFE]), Decoded::Number(-2.0));
    }

    #[test]
    fn signed_and_scaled() {
        let mut d = def(ValueType::I32, WordOrder::ABCD);
        d.scale = 0.001;
        // -12345 = 0xFFFFCFC7
        assert_eq!(d.decode(&[0xFFFF, 0xCFC7]), Decoded::Number(-12.345));
        assert_eq!(d.encode(&Decoded::Number(-12.345)), vec![0xFFFF, 0xCFC7]);
        let d = def(ValueType::I16, WordOrder::ABCD);
        assert_eq!(d.decode(&[0xFFFE]), Decoded::Number(-2.0));
    }

    #[test]
    fn u64_cdab_round_trip() {
        let d = def(ValueType::U64, WordOrder::CDAB);
        let regs = d.encode(&Decoded::Number(1_834_455.0));
        assert_eq!(regs, vec![0xFDD7, 0x001B, 0, 0]); // 1834455 = 0x001B_FDD7
        assert_eq!(d.decode(&regs), Decoded::Number(1_834_455.0));
    }

    #[test]
    fn bits_and_strings() {
        let mut d = def(ValueType::Bit, WordOrder::ABCD);
        d.bit = 3;
        assert_eq!(d.decode(&[0b1000]), Decoded::Bool(true));
        d.invert = true;
        assert_eq!(d.decode(&[0b1000]), Decoded::Bool(false));
        let mut s = def(ValueType::String, WordOrder::ABCD);
        s.len = 3;
        assert_eq!(
            s.decode(&[0x5344, 0x4D36, 0x3300]),
            Decoded::Text("SDM63".into())
        );
        assert_eq!(
            s.encode(&Decoded::Text("SDM63".into())),
            vec![0x5344, 0x4D36, 0x3300]
        );
    }

    const SCALE: &str = r#"
kind = "scale"
model = "test"

[[value]]
name = "gross_kg"
table = "holding"
address = 0
type = "i32"

[[value]]
name = "stable"
table = "holding"
address = 4
type = "bit"
bit = 0

[[value]]
name = "zero"
table = "holding"
address = 4
type = "bit"
bit = 1
"#;

    #[test]
    fn shared_status_register_is_fine() {
        let p = Profile::parse(Path::new("p.toml"), SCALE).unwrap();
        assert_eq!(p.values.len(), 3);
        assert_eq!(p.kind, InstrumentKind::Scale);
    }

    #[test]
    fn overlap_is_rejected_with_line() {
        let text = format!("{SCALE}\n[[value]]\nname = \"net_kg\"\ntable = \"holding\"\naddress = 1\ntype = \"u16\"\n");
        let err = Profile::parse(Path::new("p.toml"), &text).unwrap_err();
        assert!(err.to_string().contains("overlap value gross_kg"), "{err}");
        assert_eq!(err.line, Some(line_of_str(&text, "name = \"net_kg\"") - 1));
    }

    #[test]
    fn out_of_range_and_bad_types_rejected() {
        for (bad, why) in [
            (
                "name = \"a\"\ntable = \"input\"\naddress = 65535\ntype = \"u32\"",
                "beyond 65535",
            ),
            (
                "name = \"a\"\ntable = \"coil\"\naddress = 1\ntype = \"u16\"",
                "holds bits",
            ),
            (
                "name = \"a\"\ntable = \"input\"\naddress = 1\ntype = \"bit\"",
                "needs bit",
            ),
            (
                "name = \"a b\"\ntable = \"input\"\naddress = 1\ntype = \"u16\"",
                "not a valid id",
            ),
            (
                "name = \"a\"\ntable = \"input\"\naddress = 1\ntype = \"u12\"",
                "u12",
            ),
        ] {
            let text = format!("kind = \"other\"\nmodel = \"m\"\n[[value]]\n{bad}\n");
            let err = Profile::parse(Path::new("p.toml"), &text).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
            assert!(err.line.is_some(), "{err}");
        }
    }

    #[test]
    fn wrap_is_the_modulus_of_a_numeric_register() {
        let meter = |extra: &str| {
            format!(
                "kind = \"energy_meter\"\nmodel = \"m\"\n[[value]]\nname = \"energy_kwh\"\ntable = \"holding\"\naddress = 0\ntype = \"u32\"\nscale = 0.1\n{extra}"
            )
        };
        let p = Profile::parse(Path::new("p.toml"), &meter("wrap = 1000000\n")).unwrap();
        assert_eq!(p.values[0].wrap, Some(1_000_000.0));
        assert_eq!(p.wrap(), Some(1_000_000.0));
        let p = Profile::parse(Path::new("p.toml"), &meter("")).unwrap();
        assert_eq!(p.wrap(), None);
        for (bad, why) in [
            ("wrap = 0", "positive number"),
            ("wrap = -10.0", "positive number"),
            ("wrap = \"big\"", "expected f64"),
        ] {
            let text = meter(&format!("{bad}\n"));
            let err = Profile::parse(Path::new("p.toml"), &text).unwrap_err();
            assert!(err.to_string().contains(why), "{bad}: {err}");
            assert!(err.line.is_some(), "{err}");
        }
        let text = format!("{SCALE}wrap = 2\n");
        let err = Profile::parse(Path::new("p.toml"), &text).unwrap_err();
        assert!(err.to_string().contains("numeric types"), "{err}");
    }

    fn line_of_str(text: &str, needle: &str) -> usize {
        tomlfile::line_of(text, text.find(needle).unwrap())
    }
}
