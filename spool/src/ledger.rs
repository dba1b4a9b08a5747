//! The ledger: which records are acknowledged, the id floor, and the loss counters, in one
//! small checksummed file replaced atomically.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use crate::RecordId;

pub(crate) const FILE_NAME: &str = "ledger";
pub(crate) const TMP_NAME: &str = "ledger.tmp";

const MAGIC: &[u8; 8] = b"CWSPLEDG";
const VERSION: u32 = 1;
/// Magic, version, run count, four u64 fields.
const FIXED_LEN: usize = 8 + 4 + 4 + 4 * 8;
const RUN_LEN: usize = 16;
const CRC_LEN: usize = 4;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ledger {
    /// No id at or above this was ever handed out: the next open starts here, so ids stay
    /// unique even when the records that carried them were lost or deleted.
    pub(crate) next_id: RecordId,
    /// Every record below this id is acknowledged.
    pub(crate) acked_below: RecordId,
    /// Acknowledged ids above `acked_below`, as half-open runs `[start, end)`.
    pub(crate) acked_runs: Vec<(RecordId, RecordId)>,
    /// Records dropped by `drop_oldest` or as damaged, over the spool's life.
    pub(crate) dropped: u64,
    /// Appends refused by `block_polling`, over the spool's life.
    pub(crate) full_rejections: u64,
}

/// Why a ledger file could not be used.
#[derive(Debug)]
pub(crate) enum LedgerError {
    /// Damaged or not a ledger: repairable by treating acks as lost.
    Unreadable(String),
    /// Written by a newer calwatch: not ours to reinterpret.
    UnsupportedVersion(u32),
}

impl Ledger {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let runs = u32::try_from(self.acked_runs.len()).unwrap_or(u32::MAX);
        let mut out = Vec::with_capacity(FIXED_LEN + RUN_LEN * runs as usize + CRC_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&runs.to_le_bytes());
        for field in [
            self.next_id,
            self.acked_below,
            self.dropped,
            self.full_rejections,
        ] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        for &(start, end) in self.acked_runs.iter().take(runs as usize) {
            out.extend_from_slice(&start.to_le_bytes());
            out.extend_from_slice(&end.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Ledger, LedgerError> {
        let unreadable = |what: &str| Err(LedgerError::Unreadable(what.to_owned()));
        if bytes.len() < FIXED_LEN + CRC_LEN {
            return unreadable("shorter than a ledger");
        }
        if &bytes[..8] != MAGIC {
            return unreadable("not a calwatch spool ledger");
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            // A future format may checksum differently, so the version is judged first.
            return Err(LedgerError::UnsupportedVersion(version));
        }
        let (body, crc) = bytes.split_at(bytes.len() - CRC_LEN);
        if crc32c::crc32c(body) != u32_at(crc, 0) {
            return unreadable("checksum mismatch");
        }
        let runs = u32_at(bytes, 12) as usize;
        if body.len() != FIXED_LEN + RUN_LEN * runs {
            return unreadable("length does not match its run count");
        }
        let acked_runs = (0..runs)
            .map(|i| {
                let at = FIXED_LEN + RUN_LEN * i;
                (u64_at(body, at), u64_at(body, at + 8))
            })
            .collect();
        Ok(Ledger {
            next_id: u64_at(body, 16),
            acked_below: u64_at(body, 24),
            dropped: u64_at(body, 32),
            full_rejections: u64_at(body, 40),
            acked_runs,
        })
    }

    /// Reads the ledger in `dir`; `Ok(None)` when there is none.
    pub(crate) fn read(dir: &Path) -> io::Result<Option<Result<Ledger, LedgerError>>> {
        match fs::read(dir.join(FILE_NAME)) {
            Ok(bytes) => Ok(Some(Ledger::decode(&bytes))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the ledger in `dir` so that a crash leaves either the old or the new one, and
    /// the new one is durable when this returns.
    pub(crate) fn write(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(TMP_NAME);
        let mut file = File::create(&tmp)?;
        file.write_all(&self.encode())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, dir.join(FILE_NAME))?;
        sync_dir(dir)
    }
}

/// Compresses a set of ids into half-open runs of consecutive ids.
pub(crate) fn runs(ids: &BTreeSet<RecordId>) -> Vec<(RecordId, RecordId)> {
    let mut out: Vec<(RecordId, RecordId)> = Vec::new();
    for &id in ids {
        match out.last_mut() {
            Some((_, end)) if *end == id => *end += 1,
            _ => out.push((id, id + 1)),
        }
    }
    out
}

/// Makes created, renamed and deleted directory entries durable. Only Unix can fsync a
/// directory; elsewhere the rename is atomic but may be undone by a power cut.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}
