//! Model-based test: random appends, reads, acks, rewinds, syncs, crashes (with torn tails) and
//! restarts, checked against a few sets that say what must, may and must not come back.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};

use proptest::prelude::*;
use proptest::sample::Index;

use super::TempDir;
use crate::ledger;
use crate::{FullPolicy, RecordId, Spool, SpoolConfig, SyncPolicy, LEDGER_ACK_INTERVAL};

#[derive(Clone, Debug)]
enum Op {
    Append(usize),
    ReadNext,
    /// Acks one of the ids read since the spool was opened (maybe acked already).
    Ack(Index),
    /// Acks an id not handed out yet: must not affect the record that later gets it.
    AckFuture(u8),
    Rewind,
    Sync,
    /// Kills the process; a power cut tears up to this many unsynced bytes off the segment
    /// being written, and (when odd) leaves a half-written ledger.tmp.
    Crash(u16),
    /// A clean shutdown and reopen.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..120).prop_map(Op::Append),
        5 => Just(Op::ReadNext),
        4 => any::<Index>().prop_map(Op::Ack),
        1 => any::<u8>().prop_map(Op::AckFuture),
        1 => Just(Op::Rewind),
        2 => Just(Op::Sync),
        1 => any::<u16>().prop_map(Op::Crash),
        1 => Just(Op::Restart),
    ]
}

/// What the spool must hold.
#[derive(Default)]
struct Model {
    /// Every record ever appended, by id.
    payloads: BTreeMap<RecordId, Vec<u8>>,
    /// Appended, not acked, not lost.
    unacked: BTreeSet<RecordId>,
    /// Appended since the last sync under `Manual`: a crash may lose a suffix of these.
    unsynced: BTreeSet<RecordId>,
    /// Acked since the last sync or clean close: a crash may bring these back.
    acked_unsynced: BTreeSet<RecordId>,
    max_issued: RecordId,
    appends: u64,
    /// The reader: the next id it may yield, what it yielded since the last rewind, and what
    /// it yielded since the spool was opened (what the consumer may ack).
    cursor: RecordId,
    yielded: BTreeSet<RecordId>,
    read_this_open: Vec<RecordId>,
}

fn reopen(cfg: &SpoolConfig, model: &mut Model) -> Result<Spool, TestCaseError> {
    let (mut spool, recovery) = Spool::open(cfg.clone()).map_err(|e| fail(e.to_string()))?;
    let mut got = Vec::new();
    while let Some(record) = spool.read_next().map_err(|e| fail(e.to_string()))? {
        got.push(record);
    }
    prop_assert_eq!(recovery.records, got.len() as u64);
    let got_ids: BTreeSet<RecordId> = got.iter().map(|(id, _)| *id).collect();
    prop_assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "out of order");
    for (id, payload) in &got {
        prop_assert_eq!(model.payloads.get(id), Some(payload), "payload of {}", id);
        prop_assert!(
            model.unacked.contains(id) || model.acked_unsynced.contains(id),
            "record {} was acked and synced, yet came back",
            id
        );
    }
    let resent = got_ids.intersection(&model.acked_unsynced).count();
    prop_assert!(resent < LEDGER_ACK_INTERVAL as usize);
    for id in model.unacked.difference(&model.unsynced) {
        prop_assert!(got_ids.contains(id), "durable record {} lost", id);
    }
    // A torn tail takes a suffix: once an unsynced record is lost, so is everything after it.
    let lost = model
        .unacked
        .intersection(&model.unsynced)
        .find(|id| !got_ids.contains(id));
    if let Some(&lost) = lost {
        prop_assert!(
            got_ids.range(lost..).next().is_none(),
            "record {} lost but a later one kept",
            lost
        );
    }

    model.unacked = got_ids;
    model.unsynced.clear();
    model.acked_unsynced.clear();
    model.read_this_open = got.iter().map(|(id, _)| *id).collect();
    spool.rewind();
    model.cursor = 0;
    model.yielded.clear();
    Ok(spool)
}

fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

fn check_stats(spool: &Spool, model: &Model) -> Result<(), TestCaseError> {
    let stats = spool.stats();
    prop_assert_eq!(stats.unacked, model.unacked.len() as u64);
    prop_assert_eq!(
        stats.unread,
        model.unacked.range(model.cursor..).count() as u64
    );
    prop_assert_eq!(spool.is_empty(), model.unacked.is_empty());
    prop_assert_eq!(stats.dropped, 0);
    Ok(())
}

fn run(ops: Vec<Op>, sync: SyncPolicy, segment_bytes: u64) -> Result<(), TestCaseError> {
    let dir = TempDir::new();
    let cfg = SpoolConfig {
        max_bytes: 1 << 30,
        segment_bytes,
        sync,
        full: FullPolicy::DropOldest,
        ..SpoolConfig::new(dir.path())
    };
    let mut model = Model::default();
    let mut spool = reopen(&cfg, &mut model)?;
    for op in ops {
        match op {
            Op::Append(len) => {
                model.appends += 1;
                let payload: Vec<u8> = (0..len)
                    .map(|i| (model.appends * 7 + i as u64) as u8)
                    .collect();
                let id = spool.append(&payload).map_err(|e| fail(e.to_string()))?;
                prop_assert!(
                    id > model.max_issued,
                    "id {} after {}",
                    id,
                    model.max_issued
                );
                model.max_issued = id;
                model.payloads.insert(id, payload);
                model.unacked.insert(id);
                if sync == SyncPolicy::Manual {
                    model.unsynced.insert(id);
                }
            }
            Op::ReadNext => {
                let got = spool.read_next().map_err(|e| fail(e.to_string()))?;
                let expected = model.unacked.range(model.cursor..).next().copied();
                prop_assert_eq!(got.as_ref().map(|(id, _)| *id), expected);
                if let Some((id, payload)) = got {
                    prop_assert_eq!(model.payloads.get(&id), Some(&payload));
                    prop_assert!(model.yielded.insert(id), "{} yielded twice", id);
                    model.cursor = id + 1;
                    model.read_this_open.push(id);
                }
            }
            Op::Ack(index) => {
                if !model.read_this_open.is_empty() {
                    let id = *index.get(&model.read_this_open);
                    spool.ack(id).map_err(|e| fail(e.to_string()))?;
                    if model.unacked.remove(&id) {
                        model.acked_unsynced.insert(id);
                    }
                }
            }
            Op::AckFuture(ahead) => {
                let id = model.max_issued + 1 + u64::from(ahead);
                spool.ack(id).map_err(|e| fail(e.to_string()))?;
            }
            Op::Rewind => {
                spool.rewind();
                model.cursor = 0;
                model.yielded.clear();
            }
            Op::Sync => {
                spool.sync().map_err(|e| fail(e.to_string()))?;
                model.unsynced.clear();
                model.acked_unsynced.clear();
            }
            Op::Crash(tear) => {
                let tails = spool.unsynced_tails();
                spool.crash();
                for (path, synced, len) in tails {
                    prop_assert!(
                        sync == SyncPolicy::Manual,
                        "unsynced bytes under EveryAppend"
                    );
                    let cut = u64::from(tear) % (len - synced + 1);
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(len - cut))
                        .map_err(|e| fail(e.to_string()))?;
                }
                if tear % 2 == 1 {
                    fs::write(dir.path().join(ledger::TMP_NAME), b"CWSPLEDG\x01")
                        .map_err(|e| fail(e.to_string()))?;
                }
                spool = reopen(&cfg, &mut model)?;
            }
            Op::Restart => {
                drop(spool);
                model.unsynced.clear();
                model.acked_unsynced.clear();
                spool = reopen(&cfg, &mut model)?;
            }
        }
        check_stats(&spool, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn no_acked_record_resent_forever_and_no_unacked_record_lost(
        ops in prop::collection::vec(op(), 1..120),
        manual in any::<bool>(),
        segment_bytes in 140u64..700,
    ) {
        let sync = if manual { SyncPolicy::Manual } else { SyncPolicy::EveryAppend };
        run(ops, sync, segment_bytes)?;
    }
}
