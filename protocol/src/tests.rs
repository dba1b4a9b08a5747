//! Property tests across payload types: decoders never panic, valid batches round-trip exactly.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::{
    AgentState, AgentStatus, AlertEvent, AlertKind, AlertState, DeviceHealth, DeviceInfo, Id,
    Reading, ReadingBatch, Severity, SpoolStatus, Value,
};

/// Runs every decoder; the property is only that none panics.
fn decode_all(bytes: &[u8]) {
    let _ = ReadingBatch::decode(bytes);
    let _ = AgentStatus::decode(bytes);
    let _ = AlertEvent::decode(bytes);
}

fn id() -> impl Strategy<Value = Id> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| Id::new(s).unwrap())
}

fn finite_f64() -> impl Strategy<Value = f64> {
    use proptest::num::f64;
    prop_oneof![
        (f64::NORMAL | f64::SUBNORMAL | f64::ZERO | f64::POSITIVE | f64::NEGATIVE),
        // Readings are mostly short decimals and counters.
        (-1_000_000_000i64..1_000_000_000, 0u32..6)
            .prop_map(|(m, e)| m as f64 / 10f64.powi(e as i32)),
        any::<i64>().prop_map(|i| i as f64),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => finite_f64().prop_map(Value::Number),
        1 => any::<bool>().prop_map(Value::Bool),
    ]
}

fn reading() -> impl Strategy<Value = Reading> {
    (
        id(),
        1..=u64::MAX,
        any::<i64>(),
        proptest::collection::btree_map(id(), value(), 0..12),
    )
        .prop_map(|(device, seq, ts, values)| Reading {
            device,
            seq,
            ts,
            values: values.into_iter().collect(),
        })
}

fn batch() -> impl Strategy<Value = ReadingBatch> {
    (
        id(),
        any::<i64>(),
        proptest::collection::vec(reading(), 0..16),
    )
        .prop_map(|(agent, sent, readings)| ReadingBatch {
            agent,
            sent,
            readings,
        })
}

fn status() -> impl Strategy<Value = AgentStatus> {
    (
        id(),
        any::<bool>(),
        ".{0,12}",
        any::<u64>(),
        any::<i64>(),
        proptest::collection::btree_map(
            id(),
            (
                proptest::option::of(".{0,8}"),
                proptest::option::of(".{0,8}"),
                proptest::option::of(finite_f64()),
            ),
            0..3,
        ),
        proptest::collection::btree_map(
            id(),
            (
                proptest::option::of(any::<i64>()),
                any::<u64>(),
                proptest::collection::vec(id(), 0..3),
            ),
            0..3,
        ),
    )
        .prop_map(
            |(agent, online, version, n, ts, info, health)| AgentStatus {
                agent,
                state: if online {
                    AgentState::Online
                } else {
                    AgentState::Offline
                },
                version,
                devices: n % 1000,
                spool_bytes: n,
                ts,
                device_info: info
                    .into_iter()
                    .map(|(k, (model, serial, wrap))| {
                        (
                            k,
                            DeviceInfo {
                                model,
                                serial,
                                wrap,
                            },
                        )
                    })
                    .collect(),
                health: health
                    .into_iter()
                    .map(|(k, (last_ok, consecutive_failures, failing_values))| {
                        (
                            k,
                            DeviceHealth {
                                last_ok,
                                consecutive_failures,
                                failing_values,
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>(),
                spool: (n % 3 == 0).then(|| SpoolStatus {
                    unacked: n / 7,
                    dropped: n % 5,
                    rejected: n % 11,
                    policy: "block_polling".into(),
                    full: n % 2 == 0,
                }),
            },
        )
}

fn alert() -> impl Strategy<Value = AlertEvent> {
    (
        (
            id(),
            id(),
            id(),
            0..AlertKind::ALL.len(),
            0..3usize,
            0..3usize,
        ),
        (
            any::<i64>(),
            proptest::option::of(any::<i64>()),
            proptest::option::of(".{0,8}"),
            any::<u64>(),
            ".{0,30}",
            proptest::collection::btree_map("[a-z_]{1,8}", finite_f64(), 0..3),
        ),
    )
        .prop_map(
            |(
                (device, owner, site, kind, sev, state),
                (t, resolved, ack_by, count, message, ev),
            )| {
                AlertEvent {
                    id: format!("a-{count:06}"),
                    device,
                    owner,
                    site,
                    kind: AlertKind::ALL[kind],
                    severity: [Severity::Info, Severity::Warning, Severity::Critical][sev],
                    state: [
                        AlertState::Active,
                        AlertState::Acknowledged,
                        AlertState::Resolved,
                    ][state],
                    raised: t,
                    updated: t,
                    resolved,
                    ack_by,
                    count,
                    message,
                    evidence: ev
                        .into_iter()
                        .map(|(k, x)| (k, serde_json::Value::from(x)))
                        .collect(),
                }
            },
        )
}

/// An edit to a valid payload: flip a byte, insert one, or delete one.
#[derive(Clone, Debug)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    // Bytes that matter to JSON, plus anything.
    let byte = prop_oneof![
        proptest::sample::select(b"{}[]\":,-.0123456789eE+ tfnul\\x".to_vec()),
        any::<u8>(),
    ];
    let edit = prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
    ];
    proptest::collection::vec(edit, 1..8)
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        match *edit {
            Edit::Flip(i, b) if !bytes.is_empty() => {
                let i = i % bytes.len();
                bytes[i] = b;
            }
            Edit::Insert(i, b) => {
                let i = i % (bytes.len() + 1);
                bytes.insert(i, b);
            }
            Edit::Delete(i) if !bytes.is_empty() => {
                let i = i % bytes.len();
                bytes.remove(i);
            }
            _ => {}
        }
    }
    bytes
}

/// Numbers must come back bit for bit (e.g. -0.0, 17-digit decimals), not just `==`.
fn same_bits(a: &ReadingBatch, b: &ReadingBatch) -> bool {
    a.readings.iter().zip(&b.readings).all(|(ra, rb)| {
        ra.values
            .iter()
            .zip(&rb.values)
            .all(|((_, va), (_, vb))| match (va, vb) {
                (Value::Number(x), Value::Number(y)) => x.to_bits() == y.to_bits(),
                _ => va == vb,
            })
    })
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn json_ish_text_never_panics(text in r#"[\[\]{}":,0-9a-z. \-+]{0,300}"#) {
        decode_all(text.as_bytes());
        // The same with a v1 header, to get past the version probe.
        decode_all(format!(r#"{{"v":1,"readings":[{text}"#).as_bytes());
    }

    #[test]
    fn valid_batches_round_trip(batch in batch()) {
        let bytes = batch.encode().unwrap();
        let back = ReadingBatch::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &batch);
        prop_assert!(same_bits(&back, &batch));
        // And encoding is deterministic.
        prop_assert_eq!(back.encode().unwrap(), bytes);
    }

    #[test]
    fn valid_statuses_round_trip(status in status()) {
        let back = AgentStatus::decode(&status.encode()).unwrap();
        prop_assert_eq!(back, status);
    }

    #[test]
    fn valid_alerts_round_trip(alert in alert()) {
        let back = AlertEvent::decode(&alert.encode()).unwrap();
        prop_assert_eq!(back, alert);
    }

    #[test]
    fn mutated_batches_never_panic(batch in batch(), edits in edits()) {
        let bytes = apply(batch.encode().unwrap(), &edits);
        decode_all(&bytes);
        // A mutation that still decodes must yield a batch that encodes.
        if let Ok(b) = ReadingBatch::decode(&bytes) {
            let _ = b.encode();
        }
    }

    #[test]
    fn mutated_statuses_and_alerts_never_panic(
        status in status(),
        alert in alert(),
        edits in edits(),
    ) {
        decode_all(&apply(status.encode(), &edits));
        decode_all(&apply(alert.encode(), &edits));
    }
}

proptest! {
    #[test]
    fn the_fast_decoder_takes_every_encoded_batch_and_agrees(batch in batch()) {
        let bytes = batch.encode().unwrap();
        // u64 seqs beyond 18 digits go to serde; everything else is read by the scanner.
        let long_seq = batch.readings.iter().any(|r| r.seq >= 1_000_000_000_000_000_000)
            || batch.sent.unsigned_abs() >= 1_000_000_000_000_000_000
            || batch.readings.iter().any(|r| r.ts.unsigned_abs() >= 1_000_000_000_000_000_000);
        let fast = crate::batch::assert_decoders_agree(&bytes);
        prop_assert!(fast || long_seq);
    }

    #[test]
    fn the_fast_decoder_agrees_on_mutated_batches(batch in batch(), edits in edits()) {
        crate::batch::assert_decoders_agree(&apply(batch.encode().unwrap(), &edits));
    }

    #[test]
    fn the_fast_decoder_agrees_on_json_ish_text(text in r#"[\[\]{}":,0-9a-z. \-+eE]{0,200}"#) {
        crate::batch::assert_decoders_agree(
            format!(r#"{{"v":1,"agent":"a","sent":0,"readings":[{text}"#).as_bytes(),
        );
        crate::batch::assert_decoders_agree(
            format!(r#"{{"v":1,"agent":"a","sent":0,"readings":[{{"device":"d","seq":1,"ts":0,"values":{{{text}"#).as_bytes(),
        );
    }
}
