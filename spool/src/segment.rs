//! Segment files: naming, reading records back, and checking a file after a crash.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::record::{Header, HEADER_LEN};
use crate::RecordId;

const EXTENSION: &str = ".seg";
/// Digits in a segment's name: every `u64` fits, and equal width makes name order id order.
const NAME_DIGITS: usize = 20;

/// The file name of the segment whose first record is `first_id`.
pub(crate) fn file_name(first_id: RecordId) -> String {
    format!("{first_id:0NAME_DIGITS$}{EXTENSION}")
}

/// The first record id a segment file name stands for; `None` for any other file.
pub(crate) fn parse_name(name: &str) -> Option<RecordId> {
    let digits = name.strip_suffix(EXTENSION)?;
    if digits.len() != NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What the spool knows about one segment file, kept in memory so that acks and reads need no
/// index on disk: ids in a segment are consecutive, so a range describes them all.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    pub(crate) first_id: RecordId,
    /// One past the last record id in the file.
    pub(crate) end_id: RecordId,
    /// Bytes of complete records; the file is never longer once the segment is known.
    pub(crate) bytes: u64,
    /// How many of its records are acknowledged (or dropped as damaged).
    pub(crate) acked: u64,
}

impl Segment {
    pub(crate) fn records(&self) -> u64 {
        self.end_id - self.first_id
    }

    pub(crate) fn unacked(&self) -> u64 {
        self.records() - self.acked
    }

    pub(crate) fn contains(&self, id: RecordId) -> bool {
        (self.first_id..self.end_id).contains(&id)
    }

    pub(crate) fn path(&self, dir: &Path) -> PathBuf {
        dir.join(file_name(self.first_id))
    }
}

/// Why the bytes at some offset are not the record expected there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Damage {
    /// Fewer bytes than a record header remain.
    ShortHeader,
    /// The header names another id than the next one: zeroes, garbage or a stale record.
    WrongId { expected: RecordId, found: RecordId },
    /// The length runs past the end of the file.
    ShortPayload { id: RecordId, len: u32 },
    /// The checksum does not match the bytes.
    Checksum { id: RecordId },
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Damage::ShortHeader => f.write_str("incomplete record header"),
            Damage::WrongId { expected, found } => {
                write!(f, "record id {found} where {expected} was expected")
            }
            Damage::ShortPayload { id, len } => {
                write!(f, "record {id} of {len} bytes cut short")
            }
            Damage::Checksum { id } => write!(f, "checksum mismatch in record {id}"),
        }
    }
}

/// Reading a record failed: the device, or the bytes.
#[derive(Debug)]
pub(crate) enum ReadError {
    Io(io::Error),
    Damaged(Damage),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

/// A sequential reader over one segment file. After an error its position is unknown: drop it.
pub(crate) struct SegmentReader {
    pub(crate) first_id: RecordId,
    /// The id of the record at `offset`.
    pub(crate) next_id: RecordId,
    offset: u64,
    file: BufReader<File>,
}

impl SegmentReader {
    pub(crate) fn open(path: &Path, first_id: RecordId) -> io::Result<SegmentReader> {
        Ok(SegmentReader {
            first_id,
            next_id: first_id,
            offset: 0,
            file: BufReader::with_capacity(64 << 10, File::open(path)?),
        })
    }

    /// Reads record `id` (at or after the current one) into a fresh buffer, stepping over the
    /// records before it without reading their payloads. `limit` is where the valid bytes end.
    pub(crate) fn read(&mut self, id: RecordId, limit: u64) -> Result<Vec<u8>, ReadError> {
        while self.next_id < id {
            self.step(limit, None)?;
        }
        let mut payload = Vec::new();
        self.step(limit, Some(&mut payload))?;
        Ok(payload)
    }

    /// Moves past the next record. With `payload`, reads it there and verifies the checksum;
    /// without, seeks over it having checked only the header (id and length).
    fn step(&mut self, limit: u64, payload: Option<&mut Vec<u8>>) -> Result<Header, ReadError> {
        if limit.saturating_sub(self.offset) < HEADER_LEN as u64 {
            return Err(ReadError::Damaged(Damage::ShortHeader));
        }
        let mut raw = [0; HEADER_LEN];
        self.file.read_exact(&mut raw)?;
        let header = Header::decode(&raw);
        if header.id != self.next_id {
            return Err(ReadError::Damaged(Damage::WrongId {
                expected: self.next_id,
                found: header.id,
            }));
        }
        if self.offset + header.record_len() > limit {
            return Err(ReadError::Damaged(Damage::ShortPayload {
                id: header.id,
                len: header.len,
            }));
        }
        match payload {
            Some(buf) => {
                buf.clear();
                buf.resize(header.len as usize, 0);
                self.file.read_exact(buf)?;
                if !header.matches(buf) {
                    return Err(ReadError::Damaged(Damage::Checksum { id: header.id }));
                }
            }
            None => self.file.seek_relative(i64::from(header.len))?,
        }
        self.offset += header.record_len();
        self.next_id += 1;
        Ok(header)
    }
}

/// How the bytes after the last valid record look, for the operator's warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tail {
    /// All zeroes: space preallocated by the file system, or blocks allocated but never
    /// written before the power went.
    Zeroes,
    /// One record whose end is the end of the file: the write was cut by the crash.
    TornLast,
    /// The damaged record is followed by more data, which is lost with it.
    MoreData,
}

/// A segment file as found when the spool opens.
#[derive(Debug)]
pub(crate) struct Scan {
    /// One past the id of the last valid record.
    pub(crate) end_id: RecordId,
    /// Bytes of valid records from the start of the file.
    pub(crate) valid_len: u64,
    pub(crate) file_len: u64,
    pub(crate) damage: Option<(Damage, Tail)>,
}

/// Walks a segment's records from the start to find where the valid ones end. With
/// `verify_payloads` every checksum is checked (the segment that was being written at a crash);
/// without, only headers are (sealed segments were fsynced whole before the next one began,
/// and a damaged payload there is still caught when it is read).
pub(crate) fn scan(path: &Path, first_id: RecordId, verify_payloads: bool) -> io::Result<Scan> {
    let file_len = std::fs::metadata(path)?.len();
    let mut reader = SegmentReader::open(path, first_id)?;
    let mut buf = Vec::new();
    let damage = loop {
        if reader.offset == file_len {
            break None;
        }
        let payload = if verify_payloads {
            Some(&mut buf)
        } else {
            None
        };
        match reader.step(file_len, payload) {
            Ok(_) => {}
            Err(ReadError::Io(e)) => return Err(e),
            Err(ReadError::Damaged(damage)) => break Some(damage),
        }
    };
    let valid_len = reader.offset;
    let damage = match damage {
        None => None,
        Some(damage) => Some((damage, classify_tail(path, valid_len, file_len, damage)?)),
    };
    Ok(Scan {
        end_id: reader.next_id,
        valid_len,
        file_len,
        damage,
    })
}

fn classify_tail(path: &Path, from: u64, file_len: u64, damage: Damage) -> io::Result<Tail> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(from))?;
    let mut tail = Vec::new();
    file.take(file_len - from).read_to_end(&mut tail)?;
    if tail.iter().all(|&b| b == 0) {
        return Ok(Tail::Zeroes);
    }
    let torn = match damage {
        Damage::ShortHeader | Damage::ShortPayload { .. } => true,
        Damage::WrongId { .. } | Damage::Checksum { .. } => {
            let mut raw = [0; HEADER_LEN];
            raw.copy_from_slice(&tail[..HEADER_LEN]);
            Header::decode(&raw).record_len() == file_len - from
        }
    };
    Ok(if torn { Tail::TornLast } else { Tail::MoreData })
}
