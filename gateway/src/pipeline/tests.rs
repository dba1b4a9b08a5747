//! The pipeline on its own: messages in, points, events and changed state out.

use std::collections::BTreeMap;

use calwatch_protocol::{
    readings_topic, status_topic, AgentState, AgentStatus, AlertKind, Id, Reading, ReadingBatch,
    Value,
};

use super::*;
use crate::alerts::AlertBook;
use crate::domain::{Certificate, Device, DeviceKind, Devices};

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const DAY: i64 = 86_400_000;

fn id(s: &str) -> Id {
    Id::new(s).unwrap()
}

fn scale(name: &str, agent: &str) -> Device {
    Device {
        id: id(name),
        kind: DeviceKind::Scale,
        owner: id("market-3"),
        site: id("stall-12"),
        agent: id(agent),
        model: "FT-112".into(),
        serial: "FT0001".into(),
        accuracy_class: Some("III".into()),
        max: Some(15.0),
        e: Some(0.005),
        mpe_pct: None,
        interval_s: 60,
        reference_device: None,
        certificates: vec![Certificate {
            certificate: "C-1".into(),
            verified_at: T0 - 100 * DAY,
            valid_until: Some(T0 + 300 * DAY),
            passed: true,
            verifier: "bureau-7".into(),
            event_counter: None,
            k_factor: None,
        }],
    }
}

fn pipeline() -> Pipeline {
    Pipeline::new(
        Devices::from_devices(vec![scale("S-1", "agent-a"), scale("S-2", "agent-b")]),
        Vec::new(),
        AlertBook::new(600_000, 1, Vec::new()),
        CheckConfig::default(),
        Arc::new(Metrics::new(Vec::new())),
    )
}

fn batch(agent: &str, readings: &[(&str, u64)]) -> (String, Vec<u8>) {
    let readings = readings
        .iter()
        .map(|(device, seq)| Reading {
            device: id(device),
            seq: *seq,
            ts: T0 + *seq as i64 * 60_000,
            values: vec![
                (id("gross_kg"), Value::Number(2.5)),
                (id("stable"), Value::Bool(true)),
            ],
        })
        .collect();
    let b = ReadingBatch {
        agent: id(agent),
        sent: T0,
        readings,
    };
    (readings_topic(&id(agent)), b.encode().unwrap())
}

#[test]
fn readings_are_checked_once_and_written_as_points() {
    let mut p = pipeline();
    let mut out = Output::default();
    let (topic, payload) = batch("agent-a", &[("S-1", 1), ("S-1", 2), ("S-1", 4)]);
    p.process(&topic, &payload, T0, &mut out);
    assert_eq!(out.readings, 3);
    assert_eq!(out.lines.lines(), 3);
    assert!(
        out.lines.as_str().starts_with(
            "reading,device=S-1,kind=scale,owner=market-3,site=stall-12,vstate=valid gross_kg=2.5,stable=true,seq=1i "
        ),
        "{}",
        out.lines.as_str()
    );
    let saved = p.device_state("S-1").unwrap();
    assert_eq!(
        (saved.readings, saved.gaps, saved.state.last_seq),
        (3, 1, 4)
    );

    // The same batch again: duplicates, counted and dropped.
    out.clear();
    p.process(&topic, &payload, T0, &mut out);
    assert_eq!((out.readings, out.lines.lines()), (0, 0));
    assert_eq!(p.metrics.duplicates.load(Ordering::Relaxed), 3);
    assert_eq!(p.device_state("S-1").unwrap().readings, 3);
}

#[test]
fn readings_of_unknown_or_unassigned_devices_are_refused() {
    let mut p = pipeline();
    let mut out = Output::default();
    // S-2 belongs to agent-b; X-9 is not registered.
    let (topic, payload) = batch("agent-a", &[("S-2", 1), ("X-9", 1), ("S-1", 1)]);
    p.process(&topic, &payload, T0, &mut out);
    assert_eq!(out.readings, 1);
    assert_eq!(p.metrics.rejected("unassigned"), 1);
    assert_eq!(p.metrics.rejected("unknown_device"), 1);
    assert_eq!(p.device_state("S-2").unwrap().readings, 0);

    // A batch claiming another agent than its topic is refused whole.
    let (_, payload) = batch("agent-b", &[("S-2", 1)]);
    p.process(&topic, &payload, T0, &mut out);
    assert_eq!(p.metrics.rejected("agent_mismatch"), 1);
    assert_eq!(p.device_state("S-2").unwrap().readings, 0);

    // Bytes that are no batch: counted, nothing else.
    p.process(&topic, b"{\"v\":1,", T0, &mut out);
    assert_eq!(out.readings, 1);
}

#[test]
fn changes_list_each_changed_device_once_until_committed() {
    let mut p = pipeline();
    let mut out = Output::default();
    assert!(!p.has_changes());
    let (topic, payload) = batch("agent-a", &[("S-1", 1), ("S-1", 2)]);
    p.process(&topic, &payload, T0, &mut out);
    let changes = p.changes();
    let ids: Vec<&str> = changes
        .devices
        .iter()
        .map(|(id, _, _)| id.as_str())
        .collect();
    assert_eq!(ids, ["S-1"]);
    assert_eq!(changes.next_alert_id, 1, "no alert for a verified scale");
    p.committed(&[42]);
    assert!(!p.has_changes());
    assert_eq!(p.states.get("S-1").unwrap().stored_hash, 42);
}

#[test]
fn an_agents_last_will_takes_its_devices_offline() {
    let mut p = pipeline();
    let mut out = Output::default();
    let (topic, payload) = batch("agent-a", &[("S-1", 1)]);
    p.process(&topic, &payload, T0, &mut out);
    out.clear();
    let will = AgentStatus {
        agent: id("agent-a"),
        state: AgentState::Offline,
        version: "test".into(),
        devices: 1,
        spool_bytes: 0,
        ts: T0,
        device_info: BTreeMap::new(),
        health: BTreeMap::new(),
        spool: None,
    };
    let now = T0 + 120_000;
    p.process(&status_topic(&id("agent-a")), &will.encode(), now, &mut out);
    assert_eq!(out.events.len(), 1, "{:?}", out.events);
    let e = &out.events[0];
    assert_eq!((e.device.as_str(), e.kind), ("S-1", AlertKind::Offline));
    assert_eq!(e.raised, now);
    assert!(out
        .lines
        .as_str()
        .starts_with("alert,device=S-1,kind=offline,"));
    assert!(p.agents.get("agent-a").unwrap().down);
    // The other agent's device is untouched.
    assert!(p.alerts().get(&id("S-2"), AlertKind::Offline).is_none());
}
