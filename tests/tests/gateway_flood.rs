//! The gateway never stalls under a backlog (DESIGN "The gateway never stalls").
//!
//! `gateway_drains_a_backlog_through_a_kill_9_and_a_live_flood`: a city's backlog — 208
//! instruments (13 copies of the fault fleet on 26 agents), ≥ 500,000 readings of history —
//! is published QoS 1 into the gateway's persistent session while the gateway is stopped,
//! as fast as a client can, into a mosquitto configured as deploy/ configures it (no message
//! cap on the session's queue, 100 in flight). The gateway is started, killed with SIGKILL
//! halfway through the drain, started again, and while it drains the rest a second flood of
//! live history arrives. Then: every reading is checked exactly once (the committed state
//! counts each device's readings) and stored once (InfluxDB), every expected alert is raised
//! exactly once under one id, the gateway stops on SIGTERM within the configured bound, and
//! its peak memory stays bounded. The drain rate and peak RSS are printed (BENCHMARKS.md
//! "Backlog drain").

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod gateway_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use calwatch_tests::broker::{stay_root, Mosquitto};
use calwatch_tests::{eventually, free_port, proc_kb, Proc, Services};
use gateway_common::*;
use serde_json::Value as Json;

/// Copies of the 16-device fault fleet: 208 instruments on 26 agents.
const COPIES: usize = 13;
/// Rounds (a minute of event time each) published while the gateway is stopped ...
const BACKLOG_ROUNDS: u32 = 2_600;
/// ... and published as fast as possible while it runs.
const LIVE_ROUNDS: u32 = 400;
/// Rounds per batch: 15 readings a batch on the `a` agents, 1 on the `b` agents, about
/// the 8.8 readings a batch of a real backlog.
const ROUNDS_PER_BATCH: u32 = 1;

/// `[ingest] max_pending`: below the ~65,000 messages mosquitto hands over at once, so the
/// drain goes through shedding and redelivery.
const MAX_PENDING: u64 = 20_000;

/// A gateway that drains a 500,000-reading backlog must not need more than this.
const RSS_BOUND_KB: u64 = 1 << 20;

fn conf(dir: &Path, port: u16) -> std::path::PathBuf {
    // As deploy/mosquitto/calwatch.conf: no cap on the number of queued messages (the
    // default of 1000 would drop most of the backlog), 100 in flight to a subscriber.
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "{}set_tcp_nodelay true\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_packet_size 300000\nmax_queued_messages 0\nmax_queued_bytes 4294967296\n\
             max_inflight_messages 100\nlog_dest stderr\nconnection_messages true\nlog_timestamp_format %H:%M:%S\n",
            stay_root()
        ),
    )
    .unwrap();
    conf
}

/// The newest `name=N` of the gateway's stats lines.
fn stat(log: &str, name: &str) -> u64 {
    let needle = format!(" {name}=");
    log.lines()
        .rev()
        .filter_map(|l| l.split(needle.as_str()).nth(1))
        .find_map(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or(0)
}

/// Publishes rounds `from..to` of every agent, one batch per agent and `ROUNDS_PER_BATCH`
/// rounds, round-robin over the agents as their spools would; returns the batches sent.
async fn publish_rounds(mqtt: &Mqtt, fleet: &Fleet, sims: &mut Sims, from: u32, to: u32) -> u64 {
    let agents = fleet.agents();
    let mut published = 0;
    for start in (from..to).step_by(ROUNDS_PER_BATCH as usize) {
        for agent in &agents {
            if let Some(p) = fleet.batch(sims, agent, start, (start + ROUNDS_PER_BATCH).min(to)) {
                mqtt.publish_batch(agent, p).await;
                published += 1;
            }
        }
    }
    published
}

/// Peak RSS (kB) of a running process.
fn peak_kb(p: &Proc) -> u64 {
    proc_kb(p.pid(), "VmHWM:")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn gateway_drains_a_backlog_through_a_kill_9_and_a_live_flood() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("gateway-flood");
    let port = free_port();
    let mut broker = Mosquitto::with_conf(conf(&dir, port), port, dir.join("mosquitto.log"));
    let addr = format!("127.0.0.1:{port}");

    let mut fleet = Fleet::replicated("fld", BACKLOG_ROUNDS + LIVE_ROUNDS, 5, COPIES);
    // The whole history in the past, its last round a few minutes ago.
    fleet.t0 = (now_ms() - i64::from(fleet.rounds + 5) * MINUTE) / MINUTE * MINUTE;
    // At most MAX_PENDING messages waiting: mosquitto hands the whole backlog over at
    // once, so the gateway sheds what is beyond and has it redelivered.
    let sinks = format!(
        "[[sink]]\nkind = \"influx_v1\"\nurl = \"{}\"\ndb = \"{}\"\n[ingest]\nmax_pending = {MAX_PENDING}\n",
        svc.influx_v1_url, svc.influx_v1_db
    );
    let toml = setup_gateway(&dir, &fleet, &addr, &sinks);
    let total: u64 = fleet.devices.iter().map(|d| fleet.sent(d)).sum();
    let backlog: u64 = fleet
        .devices
        .iter()
        .map(|d| (0..BACKLOG_ROUNDS).filter(|r| fleet.reports(d, *r)).count() as u64)
        .sum();
    assert!(backlog >= 500_000, "backlog of {backlog} readings");
    let start = |name: &'static str| {
        let (dir, toml) = (dir.clone(), toml.clone());
        tokio::task::spawn_blocking(move || start_gateway(&dir, name, &toml))
    };
    let log_of =
        |name: &str| std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let logs = || {
        format!(
            "gateway-1 log (tail):\n{}\ngateway-2 log (tail):\n{}\nmosquitto log (tail):\n{}",
            tail(&log_of("gateway-1"), 30),
            tail(&log_of("gateway-2"), 30),
            tail(
                &std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default(),
                30
            ),
        )
    };

    let mqtt = Mqtt::connect(&addr, &format!("fld-test-{}", std::process::id())).await;
    mqtt.subscribe_alerts(&fleet.owner).await;

    // The gateway's persistent session exists: it subscribed once, then stopped.
    let mut gw0 = start("gateway-0").await.unwrap();
    assert_eq!(
        gw0.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        gw0.log_text()
    );

    // 1. The backlog, published while the gateway is down.
    let mut sims = Sims::default();
    let t = Instant::now();
    let batches = publish_rounds(&mqtt, &fleet, &mut sims, 0, BACKLOG_ROUNDS).await;
    mqtt.wait_acked(batches, Duration::from_secs(240)).await;
    eprintln!(
        "flood: {backlog} readings in {batches} batches published in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // 2. Started, it drains; killed with SIGKILL halfway.
    let t = Instant::now();
    let gw1 = start("gateway-1").await.unwrap();
    let mut peak = 0;
    let half = backlog / 2;
    let reached = eventually(Duration::from_secs(240), || {
        peak = peak.max(peak_kb(&gw1));
        let n = stat(&gw1.log_text(), "readings_checked");
        async move { (n >= half).then_some(n) }
    })
    .await;
    let first =
        reached.unwrap_or_else(|| panic!("the drain stalled before half the backlog\n{}", logs()));
    let first_s = t.elapsed().as_secs_f64();
    peak = peak.max(peak_kb(&gw1));
    drop(gw1); // SIGKILL
    eprintln!(
        "flood: gateway-1 checked {first} readings in {first_s:.1} s ({:.0}/s) before SIGKILL",
        first as f64 / first_s
    );

    // 3. Restarted, it drains the rest while a live flood arrives.
    let t = Instant::now();
    let mut gw2 = start("gateway-2").await.unwrap();
    let live = publish_rounds(&mqtt, &fleet, &mut sims, BACKLOG_ROUNDS, fleet.rounds).await;
    mqtt.wait_acked(batches + live, Duration::from_secs(240))
        .await;
    let want: BTreeMap<String, u64> = fleet
        .devices
        .iter()
        .map(|d| (d.id.clone(), fleet.sent(d)))
        .collect();
    let dump = all_checked(&fleet, &toml, Duration::from_secs(300), || {
        peak = peak.max(peak_kb(&gw2));
    })
    .await
    .unwrap_or_else(|| panic!("the drain did not finish\n{}", logs()));
    let rest_s = t.elapsed().as_secs_f64();
    peak = peak.max(peak_kb(&gw2));
    eprintln!(
        "flood: gateway-2 checked the remaining {} readings (with {} live) in {rest_s:.1} s ({:.0}/s); peak RSS {} MiB",
        total - first.min(total),
        total - backlog,
        (total - first.min(total)) as f64 / rest_s,
        peak / 1024
    );

    // Memory was held by the bound on waiting messages, and the bound was reached: what was
    // shed came back by redelivery (the counts below include it).
    let (log1, log2) = (log_of("gateway-1"), log_of("gateway-2"));
    let peak_pending = stat(&log1, "peak_pending").max(stat(&log2, "peak_pending"));
    let shed = stat(&log1, "shed") + stat(&log2, "shed");
    eprintln!(
        "flood: at most {peak_pending} messages waiting (max_pending {MAX_PENDING}); {shed} shed and redelivered"
    );
    assert!(
        peak_pending <= MAX_PENDING,
        "{peak_pending} messages waiting"
    );
    // Keep-alives went out while bursts were processed: the broker never timed it out.
    let broker_log = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
    assert!(
        !broker_log.contains("exceeded timeout"),
        "the broker timed the gateway out:\n{}",
        logs()
    );
    assert!(
        shed > 0,
        "the bound was never reached: the test does not test it\n{}",
        logs()
    );

    // Every reading checked exactly once: the committed state continued across the kill.
    for d in &fleet.devices {
        let l = dump.iter().find(|l| l["device"] == d.id.as_str()).unwrap();
        assert_eq!(l["readings"], fleet.sent(d), "{}: readings checked", d.id);
        assert_eq!(l["state"]["last_seq"], fleet.sent(d), "{}: last seq", d.id);
        assert_eq!(l["gaps"], 0, "{}: gaps", d.id);
    }
    for agent in fleet.agents().iter().filter(|a| a.contains("-b")) {
        mqtt.publish_offline(agent).await;
    }

    // Every expected alert, each under one id.
    let expected = fleet.expected_alerts();
    let all = eventually(Duration::from_secs(60), || {
        let keys: BTreeSet<_> = mqtt.raised().into_keys().collect();
        let ok = expected.is_subset(&keys);
        async move { ok.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let raised = mqtt.raised();
    let keys: BTreeSet<_> = raised.keys().cloned().collect();
    if all.is_none() || keys != expected {
        // Raised by the gateway (its alert log) but not seen, or never raised?
        let (code, out, _) = calwatch_tests::run_to_end(
            &calwatch_tests::bin("calwatch-gateway"),
            &["state", "--config", toml.to_str().unwrap()],
        );
        let missing: Vec<_> = expected.difference(&keys).collect();
        let logged: Vec<&str> = out
            .lines()
            .filter(|l| missing.iter().any(|(d, _)| l.contains(&format!("\"{d}\""))))
            .collect();
        panic!(
            "missing {missing:?}, unexpected {:?}\nthe gateway's state of those (exit {code}):\n{}\n{}",
            keys.difference(&expected).collect::<Vec<_>>(),
            logged.join("\n"),
            logs()
        );
    }
    for (key, ids) in &raised {
        assert_eq!(ids.len(), 1, "{key:?} raised twice: {ids:?}");
    }

    // Stored once: InfluxDB counts every device's readings.
    let q = format!(
        "SELECT count(seq) FROM reading WHERE owner = '{}' GROUP BY device",
        fleet.owner
    );
    let counted = eventually(Duration::from_secs(120), || {
        let (q, svc) = (q.clone(), svc.clone());
        let want = want.clone();
        async move {
            let got = count_by_device(&svc, &q).await;
            (got == want).then_some(got)
        }
    })
    .await;
    if counted.is_none() {
        let got = count_by_device(&svc, &q).await;
        let wrong: Vec<_> = want
            .iter()
            .filter(|(id, n)| got.get(*id) != Some(n))
            .map(|(id, n)| (id, n, got.get(id)))
            .take(10)
            .collect();
        panic!("InfluxDB (device, sent, stored): {wrong:?}");
    }

    // Shutdown is bounded and clean.
    assert_eq!(
        gw2.terminate(Duration::from_secs(20)),
        Some(0),
        "{}",
        logs()
    );
    assert!(
        peak < RSS_BOUND_KB,
        "peak RSS {} MiB while draining {total} readings",
        peak / 1024
    );
    for agent in fleet.agents().iter().filter(|a| a.contains("-b")) {
        mqtt.clear_retained(agent).await;
    }
    broker.stop();
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `SELECT count(seq) ... GROUP BY device` as device → count.
async fn count_by_device(svc: &Services, q: &str) -> BTreeMap<String, u64> {
    let client = reqwest::Client::new();
    let body: Json = match client
        .get(format!("{}/query", svc.influx_v1_url))
        .query(&[("db", svc.influx_v1_db.as_str()), ("q", q)])
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Json::Null),
        Err(_) => return BTreeMap::new(),
    };
    body["results"][0]["series"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|s| {
                    Some((
                        s["tags"]["device"].as_str()?.to_string(),
                        s["values"][0][1].as_u64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}
