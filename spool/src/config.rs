//! How a spool is sized and how it behaves when the disk or the consumer cannot keep up.

use std::fmt;
use std::path::PathBuf;

/// What [`crate::Spool::append`] does when the record would take the spool past `max_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullPolicy {
    /// Delete whole oldest segments, acknowledged or not, to make room: the newest readings
    /// matter most to an operator, and the loss is counted in [`crate::SpoolStats::dropped`].
    DropOldest,
    /// Refuse the record with [`crate::SpoolError::Full`]; the agent then stops polling, so the
    /// instruments' own memory (or nothing) holds the gap instead of the spool.
    Block,
}

impl FullPolicy {
    /// Parses the configuration spelling: `drop_oldest` or `block_polling`.
    pub fn parse(s: &str) -> Option<FullPolicy> {
        match s {
            "drop_oldest" => Some(FullPolicy::DropOldest),
            "block_polling" => Some(FullPolicy::Block),
            _ => None,
        }
    }

    /// The configuration spelling, for logs and status.
    pub fn as_str(&self) -> &'static str {
        match self {
            FullPolicy::DropOldest => "drop_oldest",
            FullPolicy::Block => "block_polling",
        }
    }
}

impl fmt::Display for FullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When appended records are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// `append` returns only once the record is on disk: nothing acknowledged to the caller is
    /// ever lost, at the cost of one fsync per record.
    EveryAppend,
    /// The caller calls [`crate::Spool::sync`] (group commit: once per N appends or every few
    /// milliseconds); a crash may lose what was appended since the last sync.
    Manual,
}

/// Where a spool lives and how big it may grow.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// The spool's own directory, created if missing; nothing else may write in it.
    pub dir: PathBuf,
    /// Upper bound on the bytes of all segment files together.
    pub max_bytes: u64,
    /// Upper bound on one segment file. Space is reclaimed a whole segment at a time, so smaller
    /// segments free space sooner; a record must fit in one. Clamped to `max_bytes / 2` when the
    /// spool opens, so that the segment being written never has to be dropped to make room.
    pub segment_bytes: u64,
    /// When appends are made durable.
    pub sync: SyncPolicy,
    /// What happens when the spool is full.
    pub full: FullPolicy,
}

impl SpoolConfig {
    /// 1 GiB in 8 MiB segments, fsync on every append, drop the oldest data when full.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        const MAX_BYTES: u64 = 1 << 30;
        SpoolConfig {
            dir: dir.into(),
            max_bytes: MAX_BYTES,
            segment_bytes: (8 << 20u64).min(MAX_BYTES / 2),
            sync: SyncPolicy::EveryAppend,
            full: FullPolicy::DropOldest,
        }
    }

    /// The segment size in force: at least two segments fit in `max_bytes`.
    pub(crate) fn effective_segment_bytes(&self) -> u64 {
        self.segment_bytes.min(self.max_bytes / 2)
    }
}
