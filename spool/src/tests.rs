#![allow(clippy::unwrap_used)]

mod model;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::ledger::{self, Ledger};
use crate::record::{self, HEADER_LEN};
use crate::segment;
use crate::{FullPolicy, RecordId, Spool, SpoolConfig, SpoolError, SyncPolicy};

/// A directory under the system temp dir, removed when dropped.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("calwatch-spool-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config(dir: &Path) -> SpoolConfig {
    SpoolConfig::new(dir)
}

fn small(dir: &Path, max_bytes: u64, segment_bytes: u64, full: FullPolicy) -> SpoolConfig {
    SpoolConfig {
        max_bytes,
        segment_bytes,
        full,
        ..SpoolConfig::new(dir)
    }
}

fn open(cfg: &SpoolConfig) -> (Spool, crate::Recovery) {
    Spool::open(cfg.clone()).unwrap()
}

fn payload(id: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (id as usize * 31 + i) as u8).collect()
}

fn read_all(spool: &mut Spool) -> Vec<(RecordId, Vec<u8>)> {
    std::iter::from_fn(|| spool.read_next().unwrap()).collect()
}

fn ids_of(records: &[(RecordId, Vec<u8>)]) -> Vec<RecordId> {
    records.iter().map(|(id, _)| *id).collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

/// Appends `n` records of `len` bytes and crashes, leaving one segment file.
fn spool_with(dir: &Path, n: u64, len: usize) -> Vec<RecordId> {
    let (mut spool, _) = open(&config(dir));
    let ids = (0..n)
        .map(|i| spool.append(&payload(i, len)).unwrap())
        .collect();
    spool.crash();
    ids
}

// ---- format -------------------------------------------------------------------------------

#[test]
fn full_policy_spellings_round_trip() {
    for policy in [FullPolicy::DropOldest, FullPolicy::Block] {
        assert_eq!(FullPolicy::parse(policy.as_str()), Some(policy));
    }
    assert_eq!(
        FullPolicy::parse("drop_oldest"),
        Some(FullPolicy::DropOldest)
    );
    assert_eq!(FullPolicy::parse("block_polling"), Some(FullPolicy::Block));
    assert_eq!(FullPolicy::parse("block"), None);
}

#[test]
fn config_defaults_and_segment_clamp() {
    let cfg = SpoolConfig::new("/x");
    assert_eq!(cfg.max_bytes, 1 << 30);
    assert_eq!(cfg.segment_bytes, 8 << 20);
    assert_eq!(cfg.sync, SyncPolicy::EveryAppend);
    assert_eq!(cfg.full, FullPolicy::DropOldest);
    let tiny = SpoolConfig {
        max_bytes: 1000,
        ..cfg
    };
    assert_eq!(tiny.effective_segment_bytes(), 500);
}

#[test]
fn segment_names_sort_by_id() {
    assert_eq!(segment::file_name(42), "00000000000000000042.seg");
    assert_eq!(segment::parse_name("00000000000000000042.seg"), Some(42));
    assert_eq!(
        segment::parse_name(&segment::file_name(u64::MAX)),
        Some(u64::MAX)
    );
    assert_eq!(segment::parse_name("42.seg"), None);
    assert_eq!(segment::parse_name("ledger"), None);
    assert!(segment::file_name(9) < segment::file_name(10));
}

#[test]
fn zeroed_header_never_passes_the_checksum() {
    assert_ne!(record::checksum(0, 0, &[]), 0);
    let mut encoded = Vec::new();
    record::encode(&mut encoded, 7, b"abc");
    assert_eq!(encoded.len(), HEADER_LEN + 3);
    assert_eq!(&encoded[..4], &3u32.to_le_bytes());
    assert_eq!(&encoded[8..16], &7u64.to_le_bytes());
}

#[test]
fn ledger_round_trips_and_rejects_damage() {
    let ledger = Ledger {
        next_id: 9000,
        acked_below: 17,
        acked_runs: vec![(19, 22), (30, 31)],
        dropped: 5,
        full_rejections: 2,
    };
    let bytes = ledger.encode();
    assert_eq!(bytes.len(), 52 + 2 * 16);
    assert_eq!(Ledger::decode(&bytes).unwrap(), ledger);
    let mut flipped = bytes.clone();
    flipped[30] ^= 1;
    assert!(matches!(
        Ledger::decode(&flipped),
        Err(ledger::LedgerError::Unreadable(_))
    ));
    assert!(Ledger::decode(&bytes[..40]).is_err());
    let set = [1, 2, 3, 5, 8, 9].into_iter().collect();
    assert_eq!(ledger::runs(&set), vec![(1, 4), (5, 6), (8, 10)]);
}

#[test]
fn a_spool_can_move_into_a_mutex_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<std::sync::Mutex<Spool>>();
}

// ---- basic behaviour ----------------------------------------------------------------------

#[test]
fn appends_are_read_in_order_and_acked_ones_are_not_resent() {
    let dir = TempDir::new();
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery, crate::Recovery::default());
    assert!(spool.is_empty());
    let ids: Vec<_> = (0..5)
        .map(|i| spool.append(&payload(i, 100)).unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let read = read_all(&mut spool);
    assert_eq!(ids_of(&read), ids);
    assert_eq!(read[3].1, payload(3, 100));
    assert_eq!(spool.read_next().unwrap(), None);

    spool.ack(ids[0]).unwrap();
    spool.ack(ids[2]).unwrap();
    let stats = spool.stats();
    assert_eq!((stats.unacked, stats.unread), (3, 0));
    spool.rewind();
    assert_eq!(spool.stats().unread, 3);
    assert_eq!(ids_of(&read_all(&mut spool)), vec![ids[1], ids[3], ids[4]]);

    // A clean restart resends exactly the unacknowledged ones.
    drop(spool);
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery.records, 3);
    assert!(recovery.warnings.is_empty(), "{:?}", recovery.warnings);
    assert_eq!(ids_of(&read_all(&mut spool)), vec![ids[1], ids[3], ids[4]]);
}

#[test]
fn acking_unknown_duplicate_or_future_ids_is_a_no_op() {
    let dir = TempDir::new();
    let (mut spool, _) = open(&config(dir.path()));
    let a = spool.append(b"a").unwrap();
    let b = spool.append(b"b").unwrap();
    spool.ack(a).unwrap();
    spool.ack(a).unwrap();
    spool.ack(0).unwrap();
    spool.ack(b + 100).unwrap();
    assert_eq!(spool.stats().unacked, 1);
    assert_eq!(read_all(&mut spool), vec![(b, b"b".to_vec())]);
}

#[test]
fn empty_payloads_are_records_too() {
    let dir = TempDir::new();
    let (mut spool, _) = open(&config(dir.path()));
    let id = spool.append(&[]).unwrap();
    spool.crash();
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery.records, 1);
    assert_eq!(read_all(&mut spool), vec![(id, Vec::new())]);
}

#[test]
fn a_record_larger_than_a_segment_is_refused() {
    let dir = TempDir::new();
    let cfg = small(dir.path(), 10_000, 1_000, FullPolicy::DropOldest);
    let (mut spool, _) = open(&cfg);
    assert!(matches!(
        spool.append(&[0; 1_000]),
        Err(SpoolError::TooLarge(1_000))
    ));
    spool.append(&[0; 1_000 - HEADER_LEN]).unwrap();
    assert_eq!(spool.stats().unacked, 1);
}

#[test]
fn record_ids_keep_increasing_across_restarts_even_when_empty() {
    let dir = TempDir::new();
    let cfg = config(dir.path());
    let mut last = 0;
    for round in 0..4 {
        let (mut spool, _) = open(&cfg);
        let id = spool.append(b"x").unwrap();
        assert!(id > last, "round {round}: {id} after {last}");
        last = id;
        spool.ack(id).unwrap();
        assert!(spool.is_empty());
        if round % 2 == 0 {
            drop(spool);
        } else {
            spool.sync().unwrap(); // else the ack is lost and the record resent
            spool.crash();
        }
        // Reopening deletes the acknowledged segment: nothing on disk but the ledger.
        let (spool, _) = open(&cfg);
        assert_eq!(spool.stats().segments, 0);
        drop(spool);
        assert!(segment_files(dir.path()).is_empty());
    }
    // A clean close leaves no gap in the ids.
    let (mut spool, _) = open(&cfg);
    let a = spool.append(b"x").unwrap();
    drop(spool);
    let (mut spool, _) = open(&cfg);
    assert_eq!(spool.append(b"y").unwrap(), a + 1);
}

#[test]
fn ids_handed_out_before_a_crash_are_not_reused() {
    let dir = TempDir::new();
    let cfg = SpoolConfig {
        sync: SyncPolicy::Manual,
        ..config(dir.path())
    };
    let (mut spool, _) = open(&cfg);
    spool.append(b"synced").unwrap();
    spool.sync().unwrap();
    let lost = spool.append(b"never synced").unwrap();
    let (path, synced, _) = spool.unsynced_tail().unwrap();
    spool.crash();
    // The power cut takes the unsynced record.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(synced)
        .unwrap();
    let (mut spool, recovery) = open(&cfg);
    assert_eq!(recovery.records, 1);
    assert!(spool.append(b"next").unwrap() > lost);
}

// ---- recovery -----------------------------------------------------------------------------

#[test]
fn torn_last_record_is_truncated_with_a_warning() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 3, 100);
    let seg = &segment_files(dir.path())[0];
    let len = file_len(seg);
    // The third record lost its last 10 bytes.
    OpenOptions::new()
        .write(true)
        .open(seg)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery.records, 2);
    assert_eq!(recovery.truncated_bytes, (HEADER_LEN + 100 - 10) as u64);
    assert_eq!(recovery.warnings.len(), 1);
    assert!(
        recovery.warnings[0].contains("torn last record"),
        "{:?}",
        recovery.warnings
    );
    assert_eq!(file_len(seg), 2 * (HEADER_LEN + 100) as u64);
    let read = read_all(&mut spool);
    assert_eq!(ids_of(&read), ids[..2]);
    assert_eq!(read[1].1, payload(1, 100));
    assert!(spool.append(b"more").unwrap() > ids[2]);
}

#[test]
fn torn_header_is_truncated() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 2, 50);
    let seg = &segment_files(dir.path())[0];
    append_bytes(seg, &[7, 0, 0, 0, 1, 2]);
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery.truncated_bytes, 6);
    assert!(recovery.warnings[0].contains("incomplete record header"));
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
}

#[test]
fn zero_filled_tail_is_truncated() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 4, 64);
    let seg = &segment_files(dir.path())[0];
    append_bytes(seg, &[0; 4096]);
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery.records, 4);
    assert_eq!(recovery.truncated_bytes, 4096);
    assert!(
        recovery.warnings[0].contains("zero-filled tail"),
        "{:?}",
        recovery.warnings
    );
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
}

#[test]
fn garbage_tail_is_truncated() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 2, 64);
    let seg = &segment_files(dir.path())[0];
    let garbage: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
    append_bytes(seg, &garbage);
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery.truncated_bytes, 300);
    assert_eq!(recovery.warnings.len(), 1);
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
}

#[test]
fn corruption_mid_segment_truncates_there_and_says_what_is_lost() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 5, 100);
    let seg = &segment_files(dir.path())[0];
    let mut bytes = fs::read(seg).unwrap();
    let record = HEADER_LEN + 100;
    bytes[record + HEADER_LEN + 50] ^= 0xff; // a payload byte of the second record
    fs::write(seg, &bytes).unwrap();
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery.records, 1);
    assert_eq!(recovery.truncated_bytes, 4 * record as u64);
    let warning = &recovery.warnings[0];
    assert!(warning.contains("checksum mismatch in record"), "{warning}");
    assert!(warning.contains("followed by more data"), "{warning}");
    assert!(
        warning.contains(&format!("truncated {} bytes", 4 * record)),
        "{warning}"
    );
    assert_eq!(ids_of(&read_all(&mut spool)), ids[..1]);
}

#[test]
fn an_empty_segment_file_is_removed() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 2, 10);
    let empty = dir.path().join(segment::file_name(ids[1] + 1));
    fs::File::create(&empty).unwrap();
    let (mut spool, recovery) = open(&config(dir.path()));
    assert!(!empty.exists());
    assert_eq!(recovery.truncated_bytes, 0);
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
    assert!(spool.append(b"x").unwrap() > ids[1]);
}

#[test]
fn a_segment_of_garbage_only_is_removed() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 1, 10);
    let junk = dir.path().join(segment::file_name(ids[0] + 1));
    fs::write(&junk, [0xab; 40]).unwrap();
    let (mut spool, recovery) = open(&config(dir.path()));
    assert!(!junk.exists());
    assert_eq!(recovery.truncated_bytes, 40);
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
}

#[test]
fn lost_acks_mean_resending_never_losing() {
    let dir = TempDir::new();
    let (mut spool, _) = open(&config(dir.path()));
    let ids: Vec<_> = (0..10)
        .map(|i| spool.append(&payload(i, 20)).unwrap())
        .collect();
    read_all(&mut spool);
    spool.ack(ids[0]).unwrap();
    spool.sync().unwrap(); // this ack reaches the ledger
    spool.ack(ids[1]).unwrap();
    spool.ack(ids[5]).unwrap();
    spool.crash(); // these two did not
    let (mut spool, recovery) = open(&config(dir.path()));
    assert_eq!(recovery.records, 9);
    assert_eq!(ids_of(&read_all(&mut spool)), ids[1..]);
}

#[test]
fn ledger_behind_the_segments_resends() {
    let dir = TempDir::new();
    let cfg = config(dir.path());
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..6)
        .map(|i| spool.append(&payload(i, 20)).unwrap())
        .collect();
    spool.sync().unwrap();
    let old_ledger = fs::read(dir.path().join(ledger::FILE_NAME)).unwrap();
    for &id in &ids[..4] {
        spool.ack(id).unwrap();
    }
    drop(spool);
    fs::write(dir.path().join(ledger::FILE_NAME), old_ledger).unwrap();
    let (mut spool, recovery) = open(&cfg);
    assert_eq!(recovery.records, 6);
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
}

#[test]
fn ledger_ahead_of_the_segments_is_fine() {
    let dir = TempDir::new();
    let cfg = small(dir.path(), 1 << 20, 200, FullPolicy::DropOldest);
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..10)
        .map(|i| spool.append(&payload(i, 50)).unwrap())
        .collect();
    // Segments of 3 records; acking the first deletes it, the ledger first.
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 4);
    let first = fs::read(&files[0]).unwrap();
    for &id in &ids[..3] {
        spool.ack(id).unwrap();
    }
    assert!(!files[0].exists());
    spool.crash();

    // A deletion the power cut undid: the ledger says it is acknowledged.
    fs::write(&files[0], first).unwrap();
    let (mut spool, recovery) = open(&cfg);
    assert!(!files[0].exists());
    assert_eq!(recovery.records, 7);
    assert!(recovery.warnings.is_empty(), "{:?}", recovery.warnings);
    assert_eq!(ids_of(&read_all(&mut spool)), ids[3..]);
    spool.crash();

    // Segments deleted behind the spool's back: what is left is delivered.
    for f in &files[1..3] {
        fs::remove_file(f).unwrap();
    }
    let (mut spool, recovery) = open(&cfg);
    assert!(recovery.warnings.is_empty(), "{:?}", recovery.warnings);
    assert_eq!(ids_of(&read_all(&mut spool)), ids[9..]);
    assert!(spool.append(b"x").unwrap() > ids[9]);
}

#[test]
fn a_missing_ledger_means_every_record_is_resent() {
    let dir = TempDir::new();
    let cfg = config(dir.path());
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..4)
        .map(|i| spool.append(&payload(i, 20)).unwrap())
        .collect();
    spool.ack(ids[1]).unwrap();
    drop(spool);
    fs::remove_file(dir.path().join(ledger::FILE_NAME)).unwrap();
    let (mut spool, recovery) = open(&cfg);
    assert_eq!(recovery.records, 4);
    assert!(
        recovery.warnings[0].contains("no ledger"),
        "{:?}",
        recovery.warnings
    );
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
    assert!(spool.append(b"x").unwrap() > ids[3]);
}

#[test]
fn a_damaged_ledger_is_repaired_and_a_newer_one_refused() {
    let dir = TempDir::new();
    let cfg = config(dir.path());
    let ids = spool_with(dir.path(), 3, 20);
    let path = dir.path().join(ledger::FILE_NAME);
    let mut bytes = fs::read(&path).unwrap();
    bytes[20] ^= 0x55;
    fs::write(&path, &bytes).unwrap();
    let (mut spool, recovery) = open(&cfg);
    assert!(
        recovery.warnings[0].contains("unreadable"),
        "{:?}",
        recovery.warnings
    );
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
    drop(spool);

    let mut bytes = fs::read(&path).unwrap();
    bytes[8] = 2; // version
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(Spool::open(cfg), Err(SpoolError::Corrupt { .. })));
}

#[test]
fn a_leftover_temporary_ledger_is_ignored() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 2, 20);
    let tmp = dir.path().join(ledger::TMP_NAME);
    fs::write(&tmp, b"half a ledg").unwrap();
    let (mut spool, recovery) = open(&config(dir.path()));
    assert!(!tmp.exists());
    assert!(recovery.warnings.is_empty());
    assert_eq!(ids_of(&read_all(&mut spool)), ids);
}

#[test]
fn overlapping_segments_are_refused() {
    let dir = TempDir::new();
    let ids = spool_with(dir.path(), 3, 20);
    // A valid segment starting inside the first one: not something a crash can produce.
    let mut encoded = Vec::new();
    record::encode(&mut encoded, ids[1], b"other");
    fs::write(dir.path().join(segment::file_name(ids[1])), encoded).unwrap();
    assert!(matches!(
        Spool::open(config(dir.path())),
        Err(SpoolError::Corrupt { .. })
    ));
}

#[test]
fn damage_found_when_reading_skips_the_rest_of_that_segment() {
    let dir = TempDir::new();
    let cfg = small(
        dir.path(),
        1 << 20,
        3 * (HEADER_LEN as u64 + 40),
        FullPolicy::DropOldest,
    );
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..6)
        .map(|i| spool.append(&payload(i, 40)).unwrap())
        .collect();
    drop(spool);
    // Bit rot in a sealed segment's payload: not checked at open, caught when read.
    let first = &segment_files(dir.path())[0];
    let mut bytes = fs::read(first).unwrap();
    bytes[56 + HEADER_LEN + 3] ^= 1; // the second record's payload
    fs::write(first, &bytes).unwrap();
    let (mut spool, recovery) = open(&cfg);
    assert_eq!(recovery.records, 6);
    let read = read_all(&mut spool);
    assert_eq!(ids_of(&read), vec![ids[0], ids[3], ids[4], ids[5]]);
    assert_eq!(spool.stats().dropped, 2);
    assert_eq!(spool.stats().unacked, 4);
}

// ---- limits -------------------------------------------------------------------------------

#[test]
fn drop_oldest_deletes_whole_oldest_segments_and_counts_them() {
    let dir = TempDir::new();
    let record = HEADER_LEN as u64 + 84; // 100 bytes
    let cfg = small(dir.path(), 1_000, 300, FullPolicy::DropOldest);
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..25)
        .map(|i| spool.append(&payload(i, 84)).unwrap())
        .collect();
    let stats = spool.stats();
    assert!(stats.bytes <= 1_000, "{stats:?}");
    assert_eq!(stats.dropped + stats.unacked, 25);
    assert!(stats.dropped > 0);
    assert_eq!(
        stats.dropped % 3,
        0,
        "whole segments of 3 records: {stats:?}"
    );
    assert_eq!(stats.bytes, stats.unacked * record);
    let read = read_all(&mut spool);
    assert_eq!(ids_of(&read), ids[stats.dropped as usize..]);

    // The counter is persisted; the survivors come back.
    drop(spool);
    let (mut spool, recovery) = open(&cfg);
    assert_eq!(spool.stats().dropped, stats.dropped);
    assert_eq!(recovery.records, stats.unacked);
    assert_eq!(ids_of(&read_all(&mut spool)), ids[stats.dropped as usize..]);
}

#[test]
fn drop_oldest_moves_a_reader_inside_a_dropped_segment_on() {
    let dir = TempDir::new();
    let cfg = small(dir.path(), 1_000, 300, FullPolicy::DropOldest);
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..9)
        .map(|i| spool.append(&payload(i, 84)).unwrap())
        .collect();
    assert_eq!(spool.read_next().unwrap().unwrap().0, ids[0]);
    for i in 9..12 {
        spool.append(&payload(i, 84)).unwrap();
    }
    let next = spool.read_next().unwrap().unwrap().0;
    assert_eq!(next, ids[3]);
}

#[test]
fn block_refuses_without_appending_until_acks_free_space() {
    let dir = TempDir::new();
    let cfg = small(dir.path(), 1_000, 300, FullPolicy::Block);
    let (mut spool, _) = open(&cfg);
    let mut ids = Vec::new();
    let full = loop {
        match spool.append(&payload(ids.len() as u64, 84)) {
            Ok(id) => ids.push(id),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(
            full,
            SpoolError::Full {
                max_bytes: 1_000,
                ..
            }
        ),
        "{full}"
    );
    assert!(full.to_string().contains("block_polling"));
    let before = spool.stats();
    assert!(spool.append(b"x").is_err());
    let after = spool.stats();
    assert_eq!(after.full_rejections, 2);
    assert_eq!((after.unacked, after.bytes), (before.unacked, before.bytes));
    assert_eq!(after.dropped, 0);

    // Acking the first segment frees it.
    for &id in &ids[..3] {
        spool.ack(id).unwrap();
    }
    let id = spool.append(b"fits now").unwrap();
    assert!(id > *ids.last().unwrap());
    assert_eq!(ids_of(&read_all(&mut spool)).len(), ids.len() - 3 + 1);
}

#[test]
fn out_of_order_acks_delete_a_segment_only_when_all_its_records_are_acked() {
    let dir = TempDir::new();
    let cfg = small(dir.path(), 1 << 20, 300, FullPolicy::DropOldest);
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..9)
        .map(|i| spool.append(&payload(i, 84)).unwrap())
        .collect();
    // Segments: [0,1,2] [3,4,5] [6,7,8 (being written)].
    assert_eq!(segment_files(dir.path()).len(), 3);
    spool.ack(ids[4]).unwrap();
    spool.ack(ids[3]).unwrap();
    spool.ack(ids[0]).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 3);
    spool.ack(ids[5]).unwrap(); // completes the middle segment
    assert_eq!(segment_files(dir.path()).len(), 2);
    spool.ack(ids[8]).unwrap();
    spool.ack(ids[7]).unwrap();
    spool.ack(ids[6]).unwrap(); // complete, but still being written
    assert_eq!(segment_files(dir.path()).len(), 2);
    spool.ack(ids[2]).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 2);
    spool.ack(ids[1]).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert!(spool.is_empty());
    assert_eq!(spool.stats().bytes, 3 * 100);
    // The next append starts a new segment and the old one goes.
    spool.append(&payload(9, 84)).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(spool.stats().segments, 1);
    drop(spool);
    let (mut spool, recovery) = open(&cfg);
    assert_eq!(recovery.records, 1);
    assert_eq!(read_all(&mut spool).len(), 1);
}

#[test]
fn out_of_order_acks_survive_a_restart() {
    let dir = TempDir::new();
    let cfg = config(dir.path());
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..6)
        .map(|i| spool.append(&payload(i, 20)).unwrap())
        .collect();
    spool.ack(ids[1]).unwrap();
    spool.ack(ids[2]).unwrap();
    spool.ack(ids[4]).unwrap();
    drop(spool);
    let (mut spool, recovery) = open(&cfg);
    assert_eq!(recovery.records, 3);
    assert_eq!(ids_of(&read_all(&mut spool)), vec![ids[0], ids[3], ids[5]]);
}

#[test]
fn manual_sync_keeps_what_was_synced_through_a_torn_tail() {
    let dir = TempDir::new();
    let cfg = SpoolConfig {
        sync: SyncPolicy::Manual,
        ..config(dir.path())
    };
    let (mut spool, _) = open(&cfg);
    let ids: Vec<_> = (0..4)
        .map(|i| spool.append(&payload(i, 30)).unwrap())
        .collect();
    spool.sync().unwrap();
    for i in 4..8 {
        spool.append(&payload(i, 30)).unwrap();
    }
    let (path, synced, len) = spool.unsynced_tail().unwrap();
    assert_eq!(synced, 4 * (HEADER_LEN as u64 + 30));
    spool.crash();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 20)
        .unwrap();
    let (mut spool, recovery) = open(&cfg);
    assert_eq!(recovery.records, 7);
    let read = read_all(&mut spool);
    assert_eq!(ids_of(&read)[..4], ids[..]);
    assert_eq!(read.len(), 7);
}

#[test]
fn stats_follow_reads_and_acks() {
    let dir = TempDir::new();
    let (mut spool, _) = open(&config(dir.path()));
    let ids: Vec<_> = (0..4)
        .map(|i| spool.append(&payload(i, 10)).unwrap())
        .collect();
    let s = spool.stats();
    assert_eq!(
        (s.unacked, s.unread, s.segments, s.bytes),
        (4, 4, 1, 4 * 26)
    );
    spool.read_next().unwrap();
    spool.ack(ids[3]).unwrap(); // acked before it was read
    let s = spool.stats();
    assert_eq!((s.unacked, s.unread), (3, 2));
    assert_eq!(ids_of(&read_all(&mut spool)), vec![ids[1], ids[2]]);
}
