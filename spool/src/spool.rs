//! The spool itself: append, read, acknowledge, and recovery when it opens.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tracing::{debug, error, info, warn};

use crate::config::{FullPolicy, SpoolConfig, SyncPolicy};
use crate::error::{io_at, Result, SpoolError};
use crate::ledger::{self, sync_dir, Ledger, LedgerError};
use crate::record::{self, HEADER_LEN};
use crate::segment::{self, ReadError, Segment, SegmentReader, Tail};
use crate::{RecordId, LEDGER_ACK_INTERVAL};

/// Ids are reserved in the ledger this many at a time: ids handed out before a crash are never
/// handed out again, for one ledger write per this many appends (and a gap in the ids after a
/// crash, which nothing minds).
const ID_RESERVATION: u64 = 4096;
/// The first id of a new spool; 0 stays free for callers that need a "none".
const FIRST_ID: RecordId = 1;

/// What [`Spool::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Unacknowledged records found on disk: they will be read again.
    pub records: u64,
    /// Bytes cut off segment files: torn writes, zero-filled or garbage tails.
    pub truncated_bytes: u64,
    /// One line per repair, for the operator; also logged with `tracing::warn!`.
    pub warnings: Vec<String>,
}

impl Recovery {
    fn warn(&mut self, message: String) {
        warn!("spool recovery: {message}");
        self.warnings.push(message);
    }
}

/// A snapshot of the spool for the agent's and the gateway's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Bytes of all segment files on disk.
    pub bytes: u64,
    /// Records appended and not yet acknowledged.
    pub unacked: u64,
    /// Unacknowledged records after the read cursor: not yet handed to the consumer.
    pub unread: u64,
    /// Records lost without an acknowledgement, over the spool's life (persisted in the
    /// ledger): deleted by [`FullPolicy::DropOldest`], or found damaged when read.
    pub dropped: u64,
    /// Appends refused by [`FullPolicy::Block`], over the spool's life.
    pub full_rejections: u64,
    /// Segment files on disk.
    pub segments: u64,
}

/// The segment being appended to: always the last in `Spool::segments`.
struct ActiveFile {
    file: File,
    /// Bytes known to be on disk; beyond this a crash may tear.
    synced_len: u64,
}

/// A crash-safe FIFO of byte records on disk, with acknowledgements in any order.
///
/// One writer and one reader in one process; wrap it in a `Mutex` to share it. See the crate
/// documentation for the format and what survives a crash.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    sync: SyncPolicy,
    full: FullPolicy,
    /// In id order, which is name order.
    segments: VecDeque<Segment>,
    active: Option<ActiveFile>,
    total_bytes: u64,
    next_id: RecordId,
    /// Ids below this may have been handed out; the ledger on disk says so.
    reserved_until: RecordId,
    /// Every live record below this is acknowledged.
    acked_below: RecordId,
    /// Acknowledged live records above `acked_below`: out-of-order acks.
    acked_above: BTreeSet<RecordId>,
    /// The ledger on disk lags the acks in memory.
    ledger_dirty: bool,
    acks_unpersisted: u32,
    /// A segment file was created or deleted since the directory was last fsynced.
    dir_dirty: bool,
    /// The next id `read_next` considers.
    read_cursor: RecordId,
    reader: Option<SegmentReader>,
    dropped: u64,
    full_rejections: u64,
    /// The last append was refused: log the next refusal quietly.
    refusing: bool,
    encoded: Vec<u8>,
    /// Cleared only by tests that simulate a crash.
    close_on_drop: bool,
    /// Synced length of each segment when it stopped being written, for crash simulation.
    #[cfg(test)]
    sealed_synced: std::collections::BTreeMap<RecordId, u64>,
}

impl Spool {
    /// Opens (or creates) the spool in `cfg.dir` and repairs what a crash left: a torn, garbage
    /// or zero-filled tail is cut off, empty segments are removed, a lost or damaged ledger
    /// means acknowledged records are delivered again. The reader starts at the oldest
    /// unacknowledged record.
    pub fn open(cfg: SpoolConfig) -> Result<(Spool, Recovery)> {
        let segment_bytes = cfg.effective_segment_bytes();
        let dir = cfg.dir;
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let mut recovery = Recovery::default();
        let mut dir_dirty = false;

        // A leftover temporary ledger is a write the crash interrupted; the old one stands.
        let tmp = dir.join(ledger::TMP_NAME);
        match fs::remove_file(&tmp) {
            Ok(()) => dir_dirty = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&tmp)(e)),
        }

        let ledger_path = dir.join(ledger::FILE_NAME);
        let ledger = match Ledger::read(&dir).map_err(io_at(&ledger_path))? {
            Some(Ok(ledger)) => Some(ledger),
            Some(Err(LedgerError::UnsupportedVersion(version))) => {
                return Err(SpoolError::Corrupt {
                    path: ledger_path,
                    detail: format!("ledger version {version} is newer than this build reads"),
                });
            }
            Some(Err(LedgerError::Unreadable(why))) => {
                recovery.warn(format!(
                    "ledger {} unreadable ({why}): acknowledgements are lost, every record \
                     on disk is delivered again",
                    ledger_path.display()
                ));
                None
            }
            None => None,
        };
        let ledger_missing = !ledger_path.exists();

        let segments = load_segments(&dir, &mut recovery, &mut dir_dirty)?;
        let on_disk: u64 = segments.iter().map(Segment::records).sum();
        let mut next_id = FIRST_ID;
        if let Some(ledger) = &ledger {
            next_id = next_id.max(ledger.next_id).max(ledger.acked_below);
        }
        if let Some(end) = segments.back().map(|s| s.end_id) {
            if let Some(ledger) = ledger.as_ref().filter(|l| l.next_id < end) {
                recovery.warn(format!(
                    "ledger is older than the segments (records up to id {} on disk, ids \
                     reserved below {}): its acknowledgements may be stale",
                    end - 1,
                    ledger.next_id
                ));
            }
            next_id = next_id.max(end);
        }
        if ledger_missing && on_disk > 0 {
            recovery.warn(format!(
                "no ledger: acknowledgements are lost, all {on_disk} records on disk are \
                 delivered again"
            ));
        }

        let ledger = ledger.unwrap_or_default();
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let mut spool = Spool {
            dir,
            max_bytes: cfg.max_bytes,
            segment_bytes,
            sync: cfg.sync,
            full: cfg.full,
            segments,
            active: None,
            total_bytes,
            next_id,
            reserved_until: next_id,
            acked_below: FIRST_ID,
            acked_above: BTreeSet::new(),
            ledger_dirty: false,
            acks_unpersisted: 0,
            dir_dirty,
            read_cursor: FIRST_ID,
            reader: None,
            dropped: ledger.dropped,
            full_rejections: ledger.full_rejections,
            refusing: false,
            encoded: Vec::new(),
            close_on_drop: true,
            #[cfg(test)]
            sealed_synced: Default::default(),
        };
        spool.load_acks(ledger.acked_below, &ledger.acked_runs);
        spool.advance_ack_prefix();
        // The acks just read may be in a ledger whose rename the crash left unsynced: write it
        // again before deleting what it covers.
        spool.ledger_dirty = true;
        spool.delete_complete()?;
        spool.ledger_dirty = false;

        // The last segment may hold bytes that reached the page cache but not the disk before
        // the process died; from now on they are treated as durable, so make them so.
        if let Some(last) = spool.segments.back() {
            let path = last.path(&spool.dir);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_at(&path))?;
        }
        if spool.dir_dirty {
            spool.sync_dir()?;
        }
        spool.read_cursor = spool.acked_below;
        recovery.records = spool.unacked();
        info!(
            dir = %spool.dir.display(),
            unacked = recovery.records,
            segments = spool.segments.len(),
            next_id = spool.next_id,
            "spool opened"
        );
        Ok((spool, recovery))
    }

    /// Appends one record and returns its id; durable on return under
    /// [`SyncPolicy::EveryAppend`], after the next [`Spool::sync`] under [`SyncPolicy::Manual`].
    ///
    /// When the record would take the spool past `max_bytes`, [`FullPolicy::DropOldest`]
    /// deletes whole oldest segments (never the one being written), counting their
    /// unacknowledged records as dropped; [`FullPolicy::Block`] returns [`SpoolError::Full`]
    /// and appends nothing.
    pub fn append(&mut self, payload: &[u8]) -> Result<RecordId> {
        let record_len = HEADER_LEN as u64 + payload.len() as u64;
        if u32::try_from(payload.len()).is_err() || record_len > self.segment_bytes {
            return Err(SpoolError::TooLarge(payload.len()));
        }
        if self.active.is_some()
            && self
                .segments
                .back()
                .is_some_and(|s| s.bytes + record_len > self.segment_bytes)
        {
            self.seal_active()?;
        }
        if self.total_bytes + record_len > self.max_bytes {
            self.make_room(record_len)?;
        }
        self.refusing = false;

        let id = self.next_id;
        if id >= self.reserved_until {
            self.reserved_until = id.saturating_add(ID_RESERVATION);
            if let Err(e) = self.persist_ledger() {
                self.reserved_until = id;
                return Err(e);
            }
        }
        if self.active.is_none() {
            self.start_segment(id)?;
        }
        self.encoded.clear();
        record::encode(&mut self.encoded, id, payload);
        // Spent even if the write fails: a partial record with this id may be on disk.
        self.next_id = id + 1;

        let written = match self.active.as_mut() {
            Some(active) => active.file.write_all(&self.encoded),
            None => Ok(()),
        };
        if let Err(e) = written {
            let path = self.active_path();
            self.abandon_active();
            return Err(io_at(&path)(e));
        }
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes += record_len;
            seg.end_id = id + 1;
        }
        self.total_bytes += record_len;

        if self.sync == SyncPolicy::EveryAppend {
            if let Err(e) = self.sync_active() {
                // Not durable, so not appended: take it back and start a fresh file, since the
                // state of this one after a failed fsync is unknown.
                if let Some(seg) = self.segments.back_mut() {
                    seg.bytes -= record_len;
                    seg.end_id = id;
                }
                self.total_bytes -= record_len;
                self.abandon_active();
                return Err(e);
            }
        }
        Ok(id)
    }

    /// Makes every append so far durable (fsyncs the segment being written, and the directory
    /// when segments were created or deleted) and writes pending acknowledgements to the ledger.
    pub fn sync(&mut self) -> Result<()> {
        self.sync_active()?;
        if self.ledger_dirty {
            self.persist_ledger()?;
        }
        self.delete_complete()
    }

    /// The next unacknowledged record after the read cursor, in append order; `None` when the
    /// reader has caught up with the writer. A record found damaged here (bit rot in a sealed
    /// segment) is skipped with the rest of its segment, logged and counted as dropped.
    pub fn read_next(&mut self) -> Result<Option<(RecordId, Vec<u8>)>> {
        loop {
            let cursor = self.read_cursor.max(self.acked_below);
            let idx = self.segments.partition_point(|s| s.end_id <= cursor);
            let Some(seg) = self.segments.get(idx) else {
                self.read_cursor = cursor;
                self.reader = None;
                return Ok(None);
            };
            let (first, end, limit) = (seg.first_id, seg.end_id, seg.bytes);
            let mut cursor = cursor.max(first);
            while cursor < end && self.acked_above.contains(&cursor) {
                cursor += 1;
            }
            self.read_cursor = cursor;
            if cursor == end {
                continue;
            }

            let mut reader = match self.reader.take() {
                Some(r) if r.first_id == first && r.next_id <= cursor => r,
                _ => {
                    let path = self.dir.join(segment::file_name(first));
                    SegmentReader::open(&path, first).map_err(io_at(&path))?
                }
            };
            match reader.read(cursor, limit) {
                Ok(payload) => {
                    self.reader = Some(reader);
                    self.read_cursor = cursor + 1;
                    return Ok(Some((cursor, payload)));
                }
                Err(ReadError::Damaged(damage)) => {
                    self.drop_damaged(idx, reader.next_id, &damage.to_string())?;
                }
                Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.drop_damaged(idx, reader.next_id, "file shorter than written")?;
                }
                Err(ReadError::Io(e)) => {
                    return Err(io_at(&self.dir.join(segment::file_name(first)))(e));
                }
            }
        }
    }

    /// Moves the read cursor back to the oldest unacknowledged record, so that what was sent
    /// but not acknowledged before a reconnect is sent again.
    pub fn rewind(&mut self) {
        self.read_cursor = self.acked_below;
    }

    /// Acknowledges a record, in any order; an unknown, dropped or already acknowledged id is
    /// ignored. A segment whose records are all acknowledged is deleted unless it is still being
    /// written. The ledger is written every [`LEDGER_ACK_INTERVAL`] acks and before a deletion.
    pub fn ack(&mut self, id: RecordId) -> Result<()> {
        if self.is_acked(id) {
            return Ok(());
        }
        let Some(idx) = self.segment_index(id) else {
            return Ok(());
        };
        self.acked_above.insert(id);
        self.segments[idx].acked += 1;
        self.ledger_dirty = true;
        self.acks_unpersisted += 1;
        let complete = self.segments[idx].unacked() == 0 && !self.is_writing(idx);
        self.advance_ack_prefix();
        if complete {
            self.delete_complete()
        } else if self.acks_unpersisted >= LEDGER_ACK_INTERVAL {
            self.persist_ledger()
        } else {
            Ok(())
        }
    }

    /// Counts for the status report; cheap enough to call once a second (it walks the
    /// segment list and the out-of-order acks).
    pub fn stats(&self) -> SpoolStats {
        let from = self.read_cursor.max(self.acked_below);
        let live_from: u64 = self
            .segments
            .iter()
            .map(|s| s.end_id.saturating_sub(s.first_id.max(from)))
            .sum();
        let acked_from = self.acked_above.range(from..).count() as u64;
        SpoolStats {
            bytes: self.total_bytes,
            unacked: self.unacked(),
            unread: live_from - acked_from,
            dropped: self.dropped,
            full_rejections: self.full_rejections,
            segments: self.segments.len() as u64,
        }
    }

    /// Nothing is waiting for an acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.unacked() == 0
    }

    fn unacked(&self) -> u64 {
        self.segments.iter().map(Segment::unacked).sum()
    }

    fn is_acked(&self, id: RecordId) -> bool {
        id < self.acked_below || self.acked_above.contains(&id)
    }

    /// The index of the segment holding `id`, if it is on disk.
    fn segment_index(&self, id: RecordId) -> Option<usize> {
        let idx = self.segments.partition_point(|s| s.end_id <= id);
        self.segments
            .get(idx)
            .filter(|s| s.contains(id))
            .map(|_| idx)
    }

    fn is_writing(&self, idx: usize) -> bool {
        self.active.is_some() && idx + 1 == self.segments.len()
    }

    fn active_path(&self) -> PathBuf {
        self.segments
            .back()
            .map_or_else(|| self.dir.clone(), |s| s.path(&self.dir))
    }

    /// Takes the acks of a ledger, keeping only ids still on disk.
    fn load_acks(&mut self, acked_below: RecordId, runs: &[(RecordId, RecordId)]) {
        self.acked_below = acked_below.max(FIRST_ID);
        for seg in &mut self.segments {
            seg.acked = seg.end_id.min(acked_below).saturating_sub(seg.first_id);
            for &(start, end) in runs {
                let from = start.max(seg.first_id).max(acked_below);
                for id in from..end.min(seg.end_id) {
                    if self.acked_above.insert(id) {
                        seg.acked += 1;
                    }
                }
            }
        }
    }

    /// Moves `acked_below` over acknowledged records and over ids that are not on disk, so
    /// that it always names the oldest unacknowledged record (or the next id).
    fn advance_ack_prefix(&mut self) {
        loop {
            if self.acked_above.first() == Some(&self.acked_below) {
                self.acked_above.pop_first();
                self.acked_below += 1;
                continue;
            }
            let idx = self
                .segments
                .partition_point(|s| s.end_id <= self.acked_below);
            match self.segments.get(idx) {
                Some(seg) if seg.first_id > self.acked_below => self.acked_below = seg.first_id,
                Some(_) => break,
                None => {
                    self.acked_below = self.acked_below.max(self.next_id);
                    break;
                }
            }
        }
        if self
            .acked_above
            .first()
            .is_some_and(|&id| id < self.acked_below)
        {
            self.acked_above = self.acked_above.split_off(&self.acked_below);
        }
    }

    fn start_segment(&mut self, first_id: RecordId) -> Result<()> {
        let path = self.dir.join(segment::file_name(first_id));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_at(&path))?;
        self.segments.push_back(Segment {
            first_id,
            end_id: first_id,
            bytes: 0,
            acked: 0,
        });
        self.active = Some(ActiveFile {
            file,
            synced_len: 0,
        });
        self.dir_dirty = true;
        Ok(())
    }

    /// Stops writing to the current segment, durably: only the segment being written can be
    /// torn by a crash, which is what lets recovery check payloads of the last segment only.
    fn seal_active(&mut self) -> Result<()> {
        self.sync_active()?;
        #[cfg(test)]
        if let (Some(active), Some(seg)) = (&self.active, self.segments.back()) {
            self.sealed_synced.insert(seg.first_id, active.synced_len);
        }
        self.active = None;
        self.delete_complete()
    }

    /// Gives up the segment being written after a failed write or fsync: cuts it back to its
    /// last complete record (best effort: recovery would do it otherwise) and lets the next
    /// append start a fresh file.
    fn abandon_active(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        let len = self.segments.back().map_or(0, |s| s.bytes);
        if let Err(e) = active.file.set_len(len) {
            warn!(file = %self.active_path().display(), error = %e,
                "spool: could not cut a failed append off; the next open will");
        }
        if let Err(e) = self.delete_complete() {
            warn!(error = %e, "spool: could not delete an empty segment");
        }
    }

    fn sync_active(&mut self) -> Result<()> {
        let len = self.segments.back().map_or(0, |s| s.bytes);
        if let Some(active) = self.active.as_mut().filter(|a| a.synced_len < len) {
            match active.file.sync_data() {
                Ok(()) => active.synced_len = len,
                Err(e) => return Err(io_at(&self.active_path())(e)),
            }
        }
        if self.dir_dirty {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn sync_dir(&mut self) -> Result<()> {
        sync_dir(&self.dir).map_err(io_at(&self.dir))?;
        self.dir_dirty = false;
        Ok(())
    }

    fn persist_ledger(&mut self) -> Result<()> {
        let ledger = Ledger {
            next_id: self.reserved_until,
            acked_below: self.acked_below,
            acked_runs: ledger::runs(&self.acked_above),
            dropped: self.dropped,
            full_rejections: self.full_rejections,
        };
        ledger
            .write(&self.dir)
            .map_err(io_at(&self.dir.join(ledger::FILE_NAME)))?;
        self.ledger_dirty = false;
        self.acks_unpersisted = 0;
        // Writing the ledger fsyncs the directory.
        self.dir_dirty = false;
        Ok(())
    }

    /// Deletes every segment whose records are all acknowledged, except the one being written.
    /// The ledger goes first: should a deletion not survive a power cut, the segment comes back
    /// already acknowledged instead of being delivered again.
    fn delete_complete(&mut self) -> Result<()> {
        let deletable = |spool: &Spool, idx: usize| {
            spool.segments[idx].unacked() == 0 && !spool.is_writing(idx)
        };
        if !(0..self.segments.len()).any(|idx| deletable(self, idx)) {
            return Ok(());
        }
        if self.ledger_dirty {
            self.persist_ledger()?;
        }
        let mut idx = 0;
        while idx < self.segments.len() {
            if deletable(self, idx) {
                let seg = self.remove_segment(idx)?;
                debug!(
                    first_id = seg.first_id,
                    records = seg.records(),
                    "spool: deleted acknowledged segment"
                );
            } else {
                idx += 1;
            }
        }
        self.sync_dir()?;
        self.advance_ack_prefix();
        Ok(())
    }

    fn remove_segment(&mut self, idx: usize) -> Result<Segment> {
        let path = self.segments[idx].path(&self.dir);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at(&path)(e)),
        }
        self.dir_dirty = true;
        let Some(seg) = self.segments.remove(idx) else {
            return Err(io_at(&path)(io::ErrorKind::NotFound.into()));
        };
        self.total_bytes -= seg.bytes;
        // Acks of ids that no longer exist mean nothing.
        let mut inside = self.acked_above.split_off(&seg.first_id);
        let mut after = inside.split_off(&seg.end_id);
        self.acked_above.append(&mut after);
        if self
            .reader
            .as_ref()
            .is_some_and(|r| r.first_id == seg.first_id)
        {
            self.reader = None;
        }
        Ok(seg)
    }

    /// Applies the full policy so that `record_len` more bytes fit, or refuses.
    fn make_room(&mut self, record_len: u64) -> Result<()> {
        match self.full {
            FullPolicy::Block => {
                self.full_rejections += 1;
                if self.refusing {
                    debug!(refused = self.full_rejections, "spool full: append refused");
                } else {
                    warn!(
                        bytes = self.total_bytes,
                        max_bytes = self.max_bytes,
                        refused = self.full_rejections,
                        "spool full: refusing appends until acknowledgements free space \
                         (policy block_polling)"
                    );
                    self.refusing = true;
                }
            }
            FullPolicy::DropOldest => {
                let (mut segments, mut records) = (0u64, 0u64);
                while self.total_bytes + record_len > self.max_bytes
                    && !self.segments.is_empty()
                    && !self.is_writing(0)
                {
                    let seg = self.remove_segment(0)?;
                    segments += 1;
                    records += seg.unacked();
                }
                if segments > 0 {
                    self.dropped += records;
                    self.advance_ack_prefix();
                    // Also makes the deletions durable; the counter survives a restart.
                    self.persist_ledger()?;
                    warn!(
                        segments,
                        records,
                        dropped_total = self.dropped,
                        max_bytes = self.max_bytes,
                        "spool full: dropped the oldest unacknowledged records \
                         (policy drop_oldest)"
                    );
                }
            }
        }
        if self.total_bytes + record_len > self.max_bytes {
            return Err(SpoolError::Full {
                bytes: self.total_bytes,
                max_bytes: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Gives up the rest of a segment that cannot be read back: marks its records from `from`
    /// on as acknowledged and dropped, so that delivery goes on with the next segment.
    fn drop_damaged(&mut self, idx: usize, from: RecordId, detail: &str) -> Result<()> {
        let (first, end) = (self.segments[idx].first_id, self.segments[idx].end_id);
        let mut lost = 0;
        for id in from..end {
            if !self.is_acked(id) && self.acked_above.insert(id) {
                lost += 1;
            }
        }
        self.segments[idx].acked += lost;
        self.dropped += lost;
        self.ledger_dirty = true;
        error!(
            segment = %self.dir.join(segment::file_name(first)).display(),
            "spool: {detail} at record {from}: dropping the {lost} unacknowledged records \
             from there to the end of the segment"
        );
        self.reader = None;
        self.read_cursor = end;
        if self.is_writing(idx) {
            // Append no more after bytes that do not read back; keep what came before them.
            self.seal_active()?;
        }
        self.advance_ack_prefix();
        self.delete_complete()
    }
}

impl Drop for Spool {
    /// A clean close: everything fsynced and the ledger current, so that the next open neither
    /// resends acknowledged records nor skips ids.
    fn drop(&mut self) {
        if !self.close_on_drop {
            return;
        }
        let closed = self.sync_active().and_then(|()| {
            self.reserved_until = self.next_id;
            self.persist_ledger()
        });
        if let Err(e) = closed {
            warn!(error = %e, "spool: unclean close; the next open recovers");
        }
    }
}

/// Finds the segment files in `dir`, cuts damaged tails off and removes files without a record.
fn load_segments(
    dir: &Path,
    recovery: &mut Recovery,
    dir_dirty: &mut bool,
) -> Result<VecDeque<Segment>> {
    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let name = entry.map_err(io_at(dir))?.file_name();
        match name.to_str().and_then(segment::parse_name) {
            Some(first) => firsts.push(first),
            None if name == ledger::FILE_NAME => {}
            None => debug!(file = ?name, "spool: ignoring a file that is not a segment"),
        }
    }
    firsts.sort_unstable();
    let last = firsts.last().copied();

    let mut segments: VecDeque<Segment> = VecDeque::with_capacity(firsts.len());
    for first in firsts {
        let path = dir.join(segment::file_name(first));
        let scan = segment::scan(&path, first, Some(first) == last).map_err(io_at(&path))?;
        if let Some((damage, tail)) = scan.damage {
            let cut = scan.file_len - scan.valid_len;
            let what = match tail {
                Tail::Zeroes => "zero-filled tail".to_owned(),
                Tail::TornLast => format!("torn last record ({damage})"),
                Tail::MoreData => format!("{damage}, followed by more data"),
            };
            let lost = if tail == Tail::MoreData {
                ", losing any records in them"
            } else {
                ""
            };
            recovery.warn(format!(
                "segment {}: {what} at byte {}: truncated {cut} bytes{lost}",
                path.display(),
                scan.valid_len
            ));
            recovery.truncated_bytes += cut;
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| {
                    f.set_len(scan.valid_len)?;
                    f.sync_all()
                })
                .map_err(io_at(&path))?;
        }
        if scan.end_id == first {
            // A file created just before a crash, or one with nothing valid in it.
            fs::remove_file(&path).map_err(io_at(&path))?;
            *dir_dirty = true;
            debug!(file = %path.display(), "spool: removed a segment without records");
            continue;
        }
        if let Some(prev) = segments.back().filter(|prev| prev.end_id > first) {
            return Err(SpoolError::Corrupt {
                path,
                detail: format!(
                    "segment starts at record {first} but the one before it runs to {}",
                    prev.end_id - 1
                ),
            });
        }
        segments.push_back(Segment {
            first_id: first,
            end_id: scan.end_id,
            bytes: scan.valid_len,
            acked: 0,
        });
    }
    Ok(segments)
}

#[cfg(test)]
impl Spool {
    /// Drops the spool as a killed process would: no fsync, no ledger write.
    pub(crate) fn crash(mut self) {
        self.close_on_drop = false;
    }

    /// Every segment with bytes not yet fsynced, as (file, synced length, length): what a
    /// power cut may tear. Only the segment being written should ever be listed.
    pub(crate) fn unsynced_tails(&self) -> Vec<(PathBuf, u64, u64)> {
        let last = self.segments.len().saturating_sub(1);
        self.segments
            .iter()
            .enumerate()
            .filter_map(|(idx, seg)| {
                let synced = match &self.active {
                    Some(active) if idx == last => active.synced_len,
                    _ => *self.sealed_synced.get(&seg.first_id).unwrap_or(&seg.bytes),
                };
                (synced < seg.bytes).then(|| (seg.path(&self.dir), synced, seg.bytes))
            })
            .collect()
    }

    /// The segment being written, its synced length and its length.
    pub(crate) fn unsynced_tail(&self) -> Option<(PathBuf, u64, u64)> {
        let active = self.active.as_ref()?;
        let seg = self.segments.back()?;
        Some((seg.path(&self.dir), active.synced_len, seg.bytes))
    }
}
