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

// Liveness and use (issue #16 items 1, 2, 6 and 9; decisions 1, 11, 15).

use calwatch_protocol::{AlertState, DeviceHealth, Severity};

use crate::checks::liveness::AgentLiveness;

/// A batch of one reading of `device` with `ts`, `seq` and an event counter.
fn one(agent: &str, device: &str, seq: u64, ts: i64, counter: f64) -> (String, Vec<u8>) {
    let b = ReadingBatch {
        agent: id(agent),
        sent: ts,
        readings: vec![Reading {
            device: id(device),
            seq,
            ts,
            values: vec![
                (id("gross_kg"), Value::Number(2.5)),
                (id("stable"), Value::Bool(true)),
                (id("event_counter"), Value::Number(counter)),
            ],
        }],
    };
    (readings_topic(&id(agent)), b.encode().unwrap())
}

fn online(agent: &str, ts: i64, failing: &[(&str, Option<i64>)]) -> (String, Vec<u8>) {
    let s = AgentStatus {
        agent: id(agent),
        state: AgentState::Online,
        version: "test".into(),
        devices: 1,
        spool_bytes: 0,
        ts,
        device_info: BTreeMap::new(),
        health: failing
            .iter()
            .map(|(d, last_ok)| {
                (
                    id(d),
                    DeviceHealth {
                        last_ok: *last_ok,
                        consecutive_failures: 5,
                        ..DeviceHealth::default()
                    },
                )
            })
            .collect(),
        spool: None,
    };
    (status_topic(&id(agent)), s.encode())
}

fn offline_events(out: &Output) -> Vec<&calwatch_protocol::AlertEvent> {
    out.events
        .iter()
        .filter(|e| e.kind == AlertKind::Offline)
        .collect()
}

#[test]
fn a_device_the_agent_cannot_poll_goes_offline_though_its_agent_is_live() {
    // One scale behind agent-a; its cable is pulled after the reading at T0 + 60 s. The
    // watermark never moves past the device's last reading (it is the agent's only device),
    // so the watermark rule alone never took it offline.
    let mut p = pipeline();
    let mut out = Output::default();
    let (t, b) = one("agent-a", "S-1", 1, T0 + 60_000, 7.0);
    p.process(&t, &b, T0 + 60_000, &mut out);
    out.clear();
    // Statuses every minute naming S-1 failing since its last good poll.
    for minute in 2..=3 {
        let now = T0 + minute * 60_000;
        let (t, b) = online("agent-a", now, &[("S-1", Some(T0 + 60_000))]);
        p.process(&t, &b, now, &mut out);
        p.sweep(now, &mut out);
    }
    assert!(
        offline_events(&out).is_empty(),
        "2 min < 3 × 60 s: {:?}",
        out.events
    );
    let now = T0 + 4 * 60_000;
    let (t, b) = online("agent-a", now, &[("S-1", Some(T0 + 60_000))]);
    p.process(&t, &b, now, &mut out);
    let raised = offline_events(&out);
    assert_eq!(raised.len(), 1, "{:?}", out.events);
    assert_eq!(raised[0].evidence["cause"], "poll_failing");
    // The sweep after it holds the alert: no rule clears what another holds.
    out.clear();
    p.sweep(now + 30_000, &mut out);
    assert!(offline_events(&out).is_empty(), "{:?}", out.events);
    // A reading of the device clears it.
    let (t, b) = one("agent-a", "S-1", 2, now + 40_000, 7.0);
    p.process(&t, &b, now + 40_000, &mut out);
    assert!(offline_events(&out)
        .iter()
        .all(|e| e.state != AlertState::Active || e.updated < now + 40_000));
}

#[test]
fn silence_on_the_wall_clock_while_the_agent_is_online_is_offline() {
    // Batches every minute, then the agent keeps sending statuses without naming the device
    // (a whole bus gone, say): nothing arrives for S-1 for 3 status periods.
    let mut p = pipeline();
    let mut out = Output::default();
    for k in 0..3 {
        let (t, b) = one("agent-a", "S-1", k as u64 + 1, T0 + k * 60_000, 7.0);
        p.process(&t, &b, T0 + k * 60_000, &mut out);
    }
    out.clear();
    let last = T0 + 120_000;
    for minute in 1..=3 {
        let now = last + minute * 60_000;
        let (t, b) = online("agent-a", now, &[]);
        p.process(&t, &b, now, &mut out);
        p.sweep(now - 1, &mut out);
    }
    assert!(offline_events(&out).is_empty(), "{:?}", out.events);
    p.sweep(last + 180_000, &mut out);
    let raised = offline_events(&out);
    assert_eq!(raised.len(), 1, "{:?}", out.events);
    assert_eq!(raised[0].evidence["cause"], "wall_clock_silence");
    assert_eq!(raised[0].raised, last + 180_000);
}

#[test]
fn an_agent_batching_every_five_minutes_is_not_silence() {
    // Readings every minute, batched every 5 minutes (found by the detection bench: every
    // device of such an agent went offline between batches).
    let mut p = pipeline();
    let mut out = Output::default();
    let mut seq = 0;
    for batch in 0..12 {
        let at = T0 + batch * 300_000;
        let readings: Vec<(&str, u64)> = (0..5)
            .map(|_| {
                seq += 1;
                ("S-1", seq)
            })
            .collect();
        let (t, b) = batch_of("agent-a", &readings, at);
        p.process(&t, &b, at, &mut out);
        for minute in 1..5 {
            let now = at + minute * 60_000;
            let (t, b) = online("agent-a", now, &[]);
            p.process(&t, &b, now, &mut out);
            p.sweep(now, &mut out);
        }
    }
    assert!(offline_events(&out).is_empty(), "{:?}", out.events);
    // Three batch gaps without S-1: offline.
    let last = T0 + 11 * 300_000;
    p.sweep(last + 900_000, &mut out);
    assert_eq!(offline_events(&out).len(), 1, "{:?}", out.events);
}

/// A batch of `readings` (device, seq) stamped a minute apart, ending at `at`.
fn batch_of(agent: &str, readings: &[(&str, u64)], at: i64) -> (String, Vec<u8>) {
    let n = readings.len() as i64;
    let b = ReadingBatch {
        agent: id(agent),
        sent: at,
        readings: readings
            .iter()
            .enumerate()
            .map(|(i, (device, seq))| Reading {
                device: id(device),
                seq: *seq,
                ts: at - (n - 1 - i as i64) * 60_000,
                values: vec![
                    (id("gross_kg"), Value::Number(2.5)),
                    (id("stable"), Value::Bool(true)),
                    (id("event_counter"), Value::Number(7.0)),
                ],
            })
            .collect(),
    };
    (readings_topic(&id(agent)), b.encode().unwrap())
}

#[test]
fn an_agent_silent_on_the_wall_clock_takes_its_devices_offline_once() {
    let mut p = pipeline();
    let mut out = Output::default();
    let (t, b) = one("agent-a", "S-1", 1, T0, 7.0);
    p.process(&t, &b, T0, &mut out);
    out.clear();
    p.sweep(T0 + 179_999, &mut out);
    assert!(offline_events(&out).is_empty());
    p.sweep(T0 + 180_000, &mut out);
    p.sweep(T0 + 240_000, &mut out);
    let raised = offline_events(&out);
    assert_eq!(raised.len(), 1, "{:?}", out.events);
    assert_eq!(raised[0].evidence["cause"], "silent");
    assert!(p.agents.get("agent-a").unwrap().silent);
    // agent-b was never heard from: not judged.
    assert!(p.alerts().get(&id("S-2"), AlertKind::Offline).is_none());
}

#[test]
fn a_restart_keeps_an_agents_last_will_and_resolves_nothing() {
    let mut p = pipeline();
    let mut out = Output::default();
    let (t, b) = one("agent-a", "S-1", 1, T0, 7.0);
    p.process(&t, &b, T0, &mut out);
    let will = AgentStatus {
        agent: id("agent-a"),
        state: AgentState::Offline,
        version: "test".into(),
        devices: 1,
        spool_bytes: 0,
        ts: T0 + 1_000,
        device_info: BTreeMap::new(),
        health: BTreeMap::new(),
        spool: None,
    };
    p.process(
        &status_topic(&id("agent-a")),
        &will.encode(),
        T0 + 1_000,
        &mut out,
    );
    assert!(p.alerts().get(&id("S-1"), AlertKind::Offline).is_some());
    // What a commit saves, then a new pipeline from it, as at a gateway start.
    let changes = p.changes();
    let agents: Vec<(Id, AgentLiveness)> = changes
        .agents
        .iter()
        .map(|(id, a)| ((*id).clone(), *a))
        .collect();
    assert!(agents
        .iter()
        .any(|(a, l)| a.as_str() == "agent-a" && l.down));
    let saved: Vec<(Id, SavedDevice)> = changes
        .devices
        .iter()
        .map(|(id, s, _)| ((*id).clone(), (*s).clone()))
        .collect();
    let open: Vec<_> = p.alerts().open().cloned().collect();
    let mut q = Pipeline::new(
        p.devices().clone(),
        saved,
        AlertBook::new(600_000, p.alerts().next_id(), open),
        CheckConfig::default(),
        Arc::new(Metrics::new(Vec::new())),
    );
    let restart = T0 + 3_600_000;
    q.restore_agents(agents, restart);
    let mut out = Output::default();
    // Sweeps well past the hold time: the alert stays.
    for k in 0..30 {
        q.sweep(restart + k * 60_000, &mut out);
    }
    assert!(
        out.events
            .iter()
            .all(|e| !(e.kind == AlertKind::Offline && e.state == AlertState::Resolved)),
        "{:?}",
        out.events
    );
    assert!(q.alerts().get(&id("S-1"), AlertKind::Offline).is_some());
}

#[test]
fn a_lagging_agent_clock_cannot_hide_an_overdue_instrument_in_use() {
    // S-1's certificate ends at T0 + 300 days; the agent's clock is 2 h behind.
    let until = T0 + 300 * DAY;
    let lag = 2 * 3_600_000;
    let mut p = pipeline();
    let mut out = Output::default();
    let mut seq = 0;
    let mut critical = 0;
    let mut cleared = 0;
    for minute in 0..240 {
        let now = until - 3_600_000 + minute * 60_000;
        seq += 1;
        let (t, b) = one("agent-a", "S-1", seq, now - lag, 7.0);
        p.process(&t, &b, now, &mut out);
        if minute % 5 == 0 {
            p.sweep(now, &mut out);
        }
        for e in out.events.drain(..) {
            if e.kind == AlertKind::Overdue {
                if e.severity == Severity::Critical && e.state == AlertState::Active {
                    critical += 1;
                }
                if e.state == AlertState::Resolved {
                    cleared += 1;
                }
            }
        }
        out.lines.clear();
    }
    assert!(critical >= 1, "overdue in use never became critical");
    assert_eq!(cleared, 0, "readings stamped earlier cleared it");
    let open = p.alerts().get(&id("S-1"), AlertKind::Overdue).unwrap();
    assert_eq!(open.event.severity, Severity::Critical);
    // ... and it counts as in use (coverage), though its last `ts` is behind.
    let rows = p.coverage(super::views::CoverageBy::Owner, None, until + 3 * 3_600_000);
    assert_eq!((rows[0].in_use, rows[0].verified), (1, 0));
}

#[test]
fn a_broken_seal_voids_the_verification_in_coverage() {
    let mut p = pipeline();
    let mut out = Output::default();
    for (seq, counter) in [(1, 7.0), (2, 8.0)] {
        let (t, b) = one("agent-a", "S-1", seq, T0 + seq as i64 * 60_000, counter);
        p.process(&t, &b, T0, &mut out);
    }
    assert!(p.alerts().get(&id("S-1"), AlertKind::SealBroken).is_some());
    let rows = p.coverage(super::views::CoverageBy::Owner, None, T0 + 600_000);
    assert_eq!((rows[0].in_use, rows[0].verified), (1, 0), "{rows:?}");
    out.clear();
    p.sweep(T0 + 600_000, &mut out);
    assert!(
        out.lines
            .as_str()
            .contains("coverage,owner=market-3,site=stall-12,kind=scale in_use=1i,verified=0i"),
        "{}",
        out.lines.as_str()
    );
}

#[test]
fn a_reading_stamped_before_the_sweeps_reminder_still_escalates_it() {
    // S-1 without a certificate, silent: the sweep reminds (warning) as of T0 + 10 min; then a
    // reading stamped a second before arrives (a backlog): in use, so critical.
    let mut bare = scale("S-1", "agent-a");
    bare.certificates.clear();
    let mut p = Pipeline::new(
        Devices::from_devices(vec![bare]),
        Vec::new(),
        AlertBook::new(600_000, 1, Vec::new()),
        CheckConfig::default(),
        Arc::new(Metrics::new(Vec::new())),
    );
    let mut out = Output::default();
    let sweep_at = T0 + 600_000;
    p.sweep(sweep_at, &mut out);
    let warned = p.alerts().get(&id("S-1"), AlertKind::Unverified).unwrap();
    assert_eq!(warned.event.severity, Severity::Warning);
    let (t, b) = one("agent-a", "S-1", 1, sweep_at - 1_000, 7.0);
    p.process(&t, &b, sweep_at + 5_000, &mut out);
    let open = p.alerts().get(&id("S-1"), AlertKind::Unverified).unwrap();
    assert_eq!(open.event.severity, Severity::Critical, "{:?}", out.events);
}
