//! The gateway end to end against real mosquitto and InfluxDB 1.x: a fleet with one device
//! per fault kind and clean ones, replayed as hand-built batches (event time in the past, a
//! minute a round), through the real `calwatch-gateway run`.
//!
//! - `gateway_faults_raise_exactly_the_expected_alerts`: exactly the expected (device, kind)
//!   alerts are raised (on MQTT and in InfluxDB), none on the clean devices, every reading is
//!   stored once.
//! - `gateway_restart_after_kill_9_loses_nothing_and_checks_nothing_twice`: the gateway is
//!   killed with SIGKILL while batches flow and started again; no alert is raised twice, the
//!   per-device state continues (cheating count, drift comparisons, readings checked equal
//!   readings sent), every reading is in InfluxDB once, the audit chain is intact.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod gateway_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use calwatch_tests::{bin, eventually, influxql, run_to_end, Services};
use gateway_common::*;
use serde_json::Value as Json;

fn influx_sink(svc: &Services) -> String {
    format!(
        "[[sink]]\nkind = \"influx_v1\"\nurl = \"{}\"\ndb = \"{}\"\n",
        svc.influx_v1_url, svc.influx_v1_db
    )
}

/// Waits until the committed state shows every reading of every device checked.
async fn wait_all_checked(fleet: &Fleet, toml: &Path, logs: &str) -> Vec<Json> {
    all_checked(fleet, toml, Duration::from_secs(60), || {})
        .await
        .unwrap_or_else(|| panic!("not every reading was checked within 60 s\n{logs}"))
}

fn device_line<'a>(dump: &'a [Json], id: &str) -> &'a Json {
    dump.iter()
        .find(|l| l["device"] == id)
        .unwrap_or_else(|| panic!("no state for {id}"))
}

async fn assert_readings_in_influx(svc: &Services, fleet: &Fleet) {
    for d in &fleet.devices {
        let q = format!("SELECT count(seq) FROM reading WHERE device = '{}'", d.id);
        let want = fleet.sent(d);
        let got = eventually(Duration::from_secs(20), || {
            let (q, svc) = (q.clone(), svc.clone());
            async move {
                let (_, rows) = influxql(&svc.influx_v1_url, &svc.influx_v1_db, &q).await;
                let n = rows.first().and_then(|r| r.get(1)).and_then(Json::as_u64);
                (n == Some(want)).then_some(n)
            }
        })
        .await;
        if got.is_none() {
            let (_, rows) = influxql(&svc.influx_v1_url, &svc.influx_v1_db, &q).await;
            panic!("{}: {want} readings sent, InfluxDB has {rows:?}", d.id);
        }
    }
}

/// The (device, kind) of the `active` alert points of the fleet's owner in InfluxDB.
async fn active_alerts_in_influx(svc: &Services, fleet: &Fleet) -> BTreeSet<(String, String)> {
    let q = format!(
        "SELECT \"count\", \"device\", \"kind\" FROM alert WHERE owner = '{}' AND state = 'active'",
        fleet.owner
    );
    let (cols, rows) = influxql(&svc.influx_v1_url, &svc.influx_v1_db, &q).await;
    let col = |n: &str| cols.iter().position(|c| c == n).unwrap();
    rows.iter()
        .map(|r| {
            (
                r[col("device")].as_str().unwrap().to_string(),
                r[col("kind")].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_faults_raise_exactly_the_expected_alerts() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-faults");
    let fleet = Fleet::new("gwf", 120, 5);
    let toml = setup_gateway(&dir, &fleet, &svc.mqtt_addr, &influx_sink(&svc));
    // Subscribed before the gateway starts: its first sweep already raises (due_soon of a
    // device not heard from yet).
    let mqtt = Mqtt::connect(&svc.mqtt_addr, &format!("gwf-test-{}", std::process::id())).await;
    mqtt.subscribe_alerts(&fleet.owner).await;
    let gw = {
        let (dir, toml) = (dir.clone(), toml.clone());
        tokio::task::spawn_blocking(move || start_gateway(&dir, "gateway", &toml))
            .await
            .unwrap()
    };

    let mut sims = Sims::default();
    let mut published = 0;
    for from in (0..fleet.rounds).step_by(10) {
        for agent in [&fleet.agent_a, &fleet.agent_b] {
            if let Some(p) = fleet.batch(&mut sims, agent, from, from + 10) {
                mqtt.publish_batch(agent, p).await;
                published += 1;
            }
        }
    }
    mqtt.wait_acked(published, Duration::from_secs(20)).await;
    // The last will must come after the agent's readings were checked (a reading clears
    // `offline`, as it should).
    let dump = wait_all_checked(&fleet, &toml, &gw.log_text()).await;
    mqtt.publish_offline(&fleet.agent_b).await;

    let expected = fleet.expected_alerts();
    let all_raised = eventually(Duration::from_secs(30), || {
        let keys: BTreeSet<_> = mqtt.raised().into_keys().collect();
        let ok = expected.is_subset(&keys);
        async move { ok.then_some(()) }
    })
    .await;
    // A few more sweeps, so that an alert that should not be would show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let raised = mqtt.raised();
    let keys: BTreeSet<_> = raised.keys().cloned().collect();
    assert!(
        all_raised.is_some() && keys == expected,
        "alerts raised:\n  missing {:?}\n  unexpected {:?}\ngateway log:\n{}",
        expected.difference(&keys).collect::<Vec<_>>(),
        keys.difference(&expected).collect::<Vec<_>>(),
        gw.log_text()
    );
    for (key, ids) in &raised {
        assert_eq!(ids.len(), 1, "{key:?} raised as {ids:?}");
    }
    for d in fleet.devices.iter().filter(|d| d.fault == Fault::Clean) {
        assert!(
            !keys.iter().any(|(id, _)| *id == d.id),
            "clean {} alerted",
            d.id
        );
    }
    let events = mqtt.alerts.lock().unwrap().clone();
    let cheat = fleet.device(Fault::Cheating);
    let lastwill = fleet.device(Fault::LastWill);
    let offline = fleet.device(Fault::Offline);
    for e in &events {
        assert_eq!(e.owner.as_str(), fleet.owner);
        if e.device.as_str() == lastwill.id {
            assert_eq!(e.evidence["cause"], "last_will", "{e:?}");
        }
        if e.device.as_str() == offline.id && e.kind.as_str() == "offline" {
            assert_eq!(e.severity.as_str(), "warning");
            // Raised as of the agent's watermark (event time), not the wall clock.
            assert!(e.raised < now_ms() - 3_600_000, "{e:?}");
        }
        if e.device.as_str() == cheat.id {
            assert_eq!(e.severity.as_str(), "critical");
            assert_eq!(e.evidence["count"], 5, "{e:?}");
        }
    }
    assert_eq!(
        device_line(&dump, &cheat.id)["state"]["cheating"]["count"],
        5
    );

    // InfluxDB: every reading once, the alerts, the periodic measurements.
    assert_readings_in_influx(&svc, &fleet).await;
    let in_influx = eventually(Duration::from_secs(20), || {
        let (svc, fleet, expected) = (svc.clone(), fleet.clone(), expected.clone());
        async move {
            let got = active_alerts_in_influx(&svc, &fleet).await;
            (got == expected).then_some(got)
        }
    })
    .await;
    assert!(
        in_influx.is_some(),
        "alert points: {:?}",
        active_alerts_in_influx(&svc, &fleet).await
    );
    for d in &fleet.devices {
        let q = format!(
            "SELECT last(\"gaps\") AS gaps, \"vstate\" FROM device_status WHERE device = '{}'",
            d.id
        );
        let (cols, rows) = influxql(&svc.influx_v1_url, &svc.influx_v1_db, &q).await;
        assert_eq!(rows.len(), 1, "{}: device_status {cols:?} {rows:?}", d.id);
        assert_eq!(rows[0][1], Json::from(0), "{}: gaps", d.id);
        let vstate = match d.fault {
            Fault::Unverified => "unverified",
            Fault::Overdue => "overdue",
            Fault::Failed => "failed",
            Fault::DueSoon => "due_soon",
            _ => "valid",
        };
        assert_eq!(rows[0][2], Json::from(vstate), "{}: vstate", d.id);
    }
    let q = format!(
        "SELECT last(\"in_use\") AS in_use, last(\"verified\") AS verified FROM coverage WHERE owner = '{}'",
        fleet.owner
    );
    let (_, rows) = influxql(&svc.influx_v1_url, &svc.influx_v1_db, &q).await;
    // 16 devices reported within the last 24 h; unverified, overdue and failed are not verified.
    assert!(!rows.is_empty(), "no coverage points");

    mqtt.clear_retained(&fleet.agent_b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_after_kill_9_loses_nothing_and_checks_nothing_twice() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-restart");
    let fleet = Fleet::new("gwr", 240, 7);
    let toml = setup_gateway(&dir, &fleet, &svc.mqtt_addr, &influx_sink(&svc));
    let start = |name: &'static str| {
        let (dir, toml) = (dir.clone(), toml.clone());
        tokio::task::spawn_blocking(move || start_gateway(&dir, name, &toml))
    };
    let mqtt = Mqtt::connect(&svc.mqtt_addr, &format!("gwr-test-{}", std::process::id())).await;
    mqtt.subscribe_alerts(&fleet.owner).await;
    let mut gw1 = Some(start("gateway-1").await.unwrap());

    let mut sims = Sims::default();
    let mut published = 0;
    let mut gw2 = None;
    for (chunk, from) in (0..fleet.rounds).step_by(4).enumerate() {
        for agent in [&fleet.agent_a, &fleet.agent_b] {
            if let Some(p) = fleet.batch(&mut sims, agent, from, from + 4) {
                mqtt.publish_batch(agent, p).await;
                published += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        if chunk == 20 {
            // SIGKILL while batches flow (Proc's drop kills and reaps).
            drop(gw1.take());
        }
        if chunk == 30 {
            gw2 = Some(start("gateway-2").await.unwrap());
        }
    }
    let mut gw2 = gw2.unwrap();
    mqtt.wait_acked(published, Duration::from_secs(20)).await;
    let gw2_log = gw2.log.clone();
    let logs = || {
        format!(
            "gateway-1 log:\n{}\ngateway-2 log:\n{}",
            std::fs::read_to_string(dir.join("gateway-1.log")).unwrap_or_default(),
            std::fs::read_to_string(&gw2_log).unwrap_or_default()
        )
    };
    let dump = wait_all_checked(&fleet, &toml, &logs()).await;
    mqtt.publish_offline(&fleet.agent_b).await;

    // The state continued across the kill: each reading checked exactly once.
    for d in &fleet.devices {
        let l = device_line(&dump, &d.id);
        assert_eq!(l["readings"], fleet.sent(d), "{}: readings checked", d.id);
        assert_eq!(l["state"]["last_seq"], fleet.sent(d), "{}: last seq", d.id);
        assert_eq!(l["gaps"], 0, "{}: gaps", d.id);
    }
    let cheat = fleet.device(Fault::Cheating);
    assert_eq!(
        device_line(&dump, &cheat.id)["state"]["cheating"]["count"],
        7,
        "deviating sales counted once each"
    );
    let drift = fleet.device(Fault::Drift);
    assert_eq!(
        device_line(&dump, &drift.id)["state"]["drift"]["span"]["comparisons"],
        240,
        "every check reading compared once"
    );

    let expected = fleet.expected_alerts();
    let all_raised = eventually(Duration::from_secs(30), || {
        let keys: BTreeSet<_> = mqtt.raised().into_keys().collect();
        let ok = expected.is_subset(&keys);
        async move { ok.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // On MQTT: the expected alerts, each under one id (a republished outbox event has the
    // same id).
    let raised = mqtt.raised();
    let keys: BTreeSet<_> = raised.keys().cloned().collect();
    assert!(
        all_raised.is_some() && keys == expected,
        "missing {:?}, unexpected {:?}\n{}",
        expected.difference(&keys).collect::<Vec<_>>(),
        keys.difference(&expected).collect::<Vec<_>>(),
        logs()
    );
    for (key, ids) in &raised {
        assert_eq!(ids.len(), 1, "{key:?} raised twice: {ids:?}\n{}", logs());
    }
    // In the store: one alert per (device, kind), the cheating one counted 3 times (sales 5-7).
    let dump = state_dump(&toml);
    let mut stored: BTreeMap<(String, String), Vec<&Json>> = BTreeMap::new();
    for l in dump.iter().filter_map(|l| l.get("alert")) {
        stored
            .entry((
                l["device"].as_str().unwrap().into(),
                l["kind"].as_str().unwrap().into(),
            ))
            .or_default()
            .push(l);
    }
    assert_eq!(stored.keys().cloned().collect::<BTreeSet<_>>(), expected);
    for (key, alerts) in &stored {
        assert_eq!(alerts.len(), 1, "{key:?}: {alerts:?}");
    }
    assert_eq!(
        stored[&(cheat.id.clone(), "cheating_suspected".into())][0]["count"],
        3
    );

    assert_readings_in_influx(&svc, &fleet).await;

    // The restarted gateway's own counters add up: every reading of ours it got was checked
    // or a duplicate of one the first run had committed (the state above says which).
    assert_eq!(
        gw2.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        logs()
    );
    let log = gw2.log_text();
    let summary = log
        .lines()
        .rfind(|l| l.contains("ingest stopped"))
        .unwrap_or_else(|| panic!("no summary in\n{log}"));
    let counter = |name: &str| -> u64 {
        let Some(at) = summary.find(&format!(" {name}=")) else {
            return 0;
        };
        summary[at + name.len() + 2..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // Other tests' agents publish on the same broker: their readings are refused as readings
    // of devices this registry does not know.
    assert_eq!(
        counter("readings_in"),
        counter("readings_checked")
            + counter("duplicates")
            + counter("rejected[unknown_device]")
            + counter("rejected[unassigned]"),
        "{summary}"
    );
    // Both runs did part of the work: the second went on from what the first committed.
    let total: u64 = fleet.devices.iter().map(|d| fleet.sent(d)).sum();
    assert!(
        (1..total).contains(&counter("readings_checked")),
        "{total} sent; {summary}"
    );
    let (code, out, err) = run_to_end(
        &bin("calwatch-gateway"),
        &["verify", "--config", toml.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("chain intact"), "{out}");
    mqtt.clear_retained(&fleet.agent_b).await;
}
