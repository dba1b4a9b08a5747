//! Request planning: the fewest Modbus reads that cover a device's register map.
//!
//! Values of one table are sorted by address and merged into one read while the merged
//! span stays within the protocol limit (125 registers, 2000 bits) and the hole between
//! two values is at most `max_gap` (reading a few unused registers is cheaper than a
//! round trip; some devices reject reads of unmapped registers, hence configurable).
//! Registers shared by several values (status bits) are read once.

use crate::profile::{Table, ValueDef};

/// Registers per read (Modbus application protocol, function 3/4 limit).
pub const MAX_REGISTERS: u16 = 125;
/// Bits per read (function 1/2 limit).
pub const MAX_BITS: u16 = 2000;

/// One read request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    pub table: Table,
    pub start: u16,
    pub count: u16,
}

/// Where a value's registers are in the results of the plan's reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Index into [`RequestPlan::reads`].
    pub read: usize,
    /// Offset of the value's first register (or bit) in that read's result.
    pub offset: u16,
}

/// The reads for one device and where each value lands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestPlan {
    pub reads: Vec<Read>,
    /// One slot per value, in the order of the values planned.
    pub slots: Vec<Slot>,
}

impl RequestPlan {
    /// Plans reads for `values` (which must be valid profile values).
    pub fn new(values: &[&ValueDef], max_gap: u16) -> RequestPlan {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by_key(|&i| (values[i].table, values[i].address, values[i].len));
        let mut reads: Vec<Read> = Vec::new();
        let mut slots = vec![Slot { read: 0, offset: 0 }; values.len()];
        for i in order {
            let v = values[i];
            let limit = if v.table.is_bits() {
                MAX_BITS
            } else {
                MAX_REGISTERS
            };
            let end = u32::from(v.address) + u32::from(v.len);
            let merged = reads.last_mut().and_then(|r| {
                let r_end = u32::from(r.start) + u32::from(r.count);
                let fits = r.table == v.table
                    && u32::from(v.address) <= r_end + u32::from(max_gap)
                    && end.max(r_end) - u32::from(r.start) <= u32::from(limit);
                fits.then(|| {
                    r.count = (end.max(r_end) - u32::from(r.start)) as u16;
                    v.address - r.start
                })
            });
            match merged {
                Some(offset) => {
                    slots[i] = Slot {
                        read: reads.len() - 1,
                        offset,
                    };
                }
                None => {
                    reads.push(Read {
                        table: v.table,
                        start: v.address,
                        count: v.len,
                    });
                    slots[i] = Slot {
                        read: reads.len() - 1,
                        offset: 0,
                    };
                }
            }
        }
        RequestPlan { reads, slots }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::profile::{ValueType, WordOrder};
    use calwatch_protocol::Id;

    fn v(name: &str, table: Table, address: u16, ty: ValueType, len: u16, bit: u8) -> ValueDef {
        ValueDef {
            name: Id::new(name).unwrap(),
            table,
            address,
            ty,
            order: WordOrder::ABCD,
            scale: 1.0,
            offset: 0.0,
            bit,
            invert: false,
            len,
            unit: None,
            omit_when: None,
            wrap: None,
        }
    }

    #[test]
    fn sdm630_style_map_merges_within_gap() {
        // voltage 0x00, current 0x06, power 0x0C, frequency 0x46, import 0x48, total 0x156
        let defs = [
            v("voltage_v", Table::Input, 0x00, ValueType::F32, 2, 0),
            v("current_a", Table::Input, 0x06, ValueType::F32, 2, 0),
            v("power_w", Table::Input, 0x0C, ValueType::F32, 2, 0),
            v("frequency_hz", Table::Input, 0x46, ValueType::F32, 2, 0),
            v("import_kwh", Table::Input, 0x48, ValueType::F32, 2, 0),
            v("energy_kwh", Table::Input, 0x156, ValueType::F32, 2, 0),
        ];
        let refs: Vec<&ValueDef> = defs.iter().collect();
        let plan = RequestPlan::new(&refs, 10);
        assert_eq!(
            plan.reads,
            vec![
                Read {
                    table: Table::Input,
                    start: 0x00,
                    count: 0x0E
                },
                Read {
                    table: Table::Input,
                    start: 0x46,
                    count: 4
                },
                Read {
                    table: Table::Input,
                    start: 0x156,
                    count: 2
                },
            ]
        );
        assert_eq!(
            plan.slots[2],
            Slot {
                read: 0,
                offset: 0x0C
            }
        );
        assert_eq!(plan.slots[4], Slot { read: 1, offset: 2 });
        // With a large gap the first two groups merge (0x00..0x4A = 74 registers).
        let plan = RequestPlan::new(&refs, 100);
        assert_eq!(plan.reads.len(), 2);
        assert_eq!(
            plan.reads[0],
            Read {
                table: Table::Input,
                start: 0,
                count: 0x4A
            }
        );
    }

    #[test]
    fn shared_register_read_once_and_tables_split() {
        let defs = [
            v("stable", Table::Holding, 4, ValueType::Bit, 1, 0),
            v("gross_kg", Table::Holding, 0, ValueType::I32, 2, 0),
            v("zero", Table::Holding, 4, ValueType::Bit, 1, 1),
            v("relay", Table::Coil, 4, ValueType::Bool, 1, 0),
        ];
        let refs: Vec<&ValueDef> = defs.iter().collect();
        let plan = RequestPlan::new(&refs, 2);
        assert_eq!(
            plan.reads,
            vec![
                Read {
                    table: Table::Coil,
                    start: 4,
                    count: 1
                },
                Read {
                    table: Table::Holding,
                    start: 0,
                    count: 5
                },
            ]
        );
        assert_eq!(plan.slots[0], Slot { read: 1, offset: 4 });
        assert_eq!(plan.slots[2], Slot { read: 1, offset: 4 });
    }

    #[test]
    fn respects_protocol_limit() {
        let defs: Vec<ValueDef> = (0..100)
            .map(|i| {
                v(
                    &format!("r{i}"),
                    Table::Holding,
                    i * 2,
                    ValueType::U32,
                    2,
                    0,
                )
            })
            .collect();
        let refs: Vec<&ValueDef> = defs.iter().collect();
        let plan = RequestPlan::new(&refs, 0);
        assert_eq!(plan.reads.len(), 2);
        assert!(plan.reads.iter().all(|r| r.count <= MAX_REGISTERS));
        assert_eq!(plan.reads[0].count, 124);
        assert_eq!(
            plan.reads[1],
            Read {
                table: Table::Holding,
                start: 124,
                count: 76
            }
        );
        let bits: Vec<ValueDef> = (0..2500)
            .map(|i| v(&format!("b{i}"), Table::Discrete, i, ValueType::Bool, 1, 0))
            .collect();
        let refs: Vec<&ValueDef> = bits.iter().collect();
        let plan = RequestPlan::new(&refs, 0);
        assert_eq!(
            plan.reads.iter().map(|r| r.count).collect::<Vec<_>>(),
            vec![2000, 500]
        );
    }
}
