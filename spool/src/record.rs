//! One record in a segment: `len: u32 | crc: u32 | id: u64 | payload`, little-endian.

use crate::RecordId;

/// Bytes before the payload.
pub(crate) const HEADER_LEN: usize = 16;

/// A record's fixed-size prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) len: u32,
    pub(crate) crc: u32,
    pub(crate) id: RecordId,
}

impl Header {
    pub(crate) fn decode(bytes: &[u8; HEADER_LEN]) -> Header {
        let [l0, l1, l2, l3, c0, c1, c2, c3, i0, i1, i2, i3, i4, i5, i6, i7] = *bytes;
        Header {
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            crc: u32::from_le_bytes([c0, c1, c2, c3]),
            id: u64::from_le_bytes([i0, i1, i2, i3, i4, i5, i6, i7]),
        }
    }

    /// Bytes of the whole record.
    pub(crate) fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.len)
    }

    /// Whether `payload` is what this header was written with.
    pub(crate) fn matches(&self, payload: &[u8]) -> bool {
        checksum(self.len, self.id, payload) == self.crc
    }
}

/// CRC32C over length, id and payload: covering the id means a stale or zeroed record at the
/// expected position fails, not only a damaged payload.
pub(crate) fn checksum(len: u32, id: RecordId, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &id.to_le_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// Appends the encoded record to `out`. The caller has checked that `payload` fits a `u32`.
pub(crate) fn encode(out: &mut Vec<u8>, id: RecordId, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(len, id, payload).to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(payload);
}
