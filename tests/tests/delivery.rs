//! Delivery faults against a real mosquitto (a private one per test, so it can be stopped)
//! with a counting subscriber: broker down 30 s, agent kill -9, broker port blackholed,
//! spool full, wrong password. In each case every seq the agent produced arrives at least
//! once, in contiguous runs, and duplicates stay within what was in flight.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::time::Duration;

use calwatch_tests::broker::{Counter, Mosquitto, Proxy};
use calwatch_tests::{bin, free_port, workspace, Proc, Services};

const DEVICES: u8 = 5;

struct Site {
    dir: PathBuf,
    agent_toml: PathBuf,
    _sim: Proc,
    agent_id: String,
}

impl Site {
    /// A simulator with DEVICES scales and an agent config polling them every 100 ms.
    fn new(dir: &Path, name: &str, mqtt_port: u16, extra: &str) -> Site {
        Site::with_devices(dir, name, mqtt_port, extra, DEVICES, 100)
    }

    fn with_devices(
        dir: &Path,
        name: &str,
        mqtt_port: u16,
        extra: &str,
        devices: u8,
        interval_ms: u64,
    ) -> Site {
        let sim_port = free_port();
        let profile = workspace().join("config/profiles/ft112.toml");
        let mut sim = Proc::start(
            dir,
            &format!("{name}-sim"),
            &bin("calwatch-agent"),
            &[
                "simulate",
                "--profile",
                profile.to_str().unwrap(),
                "--listen",
                &format!("127.0.0.1:{sim_port}"),
                "--count",
                &devices.to_string(),
            ],
        );
        sim.wait_stdout_line("simulating", Duration::from_secs(10));
        let agent_id = format!("{name}-{}", std::process::id());
        let mut text = format!(
            "agent = \"{agent_id}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\nkeep_alive_s = 5\n{extra}\n[spool]\ndir = \"spool\"\n[batch]\nlinger_ms = 100\nmax_readings = 50\n"
        );
        for u in 1..=devices {
            text.push_str(&format!(
                "[[device]]\nid = \"{name}-D{u}\"\nprofile = \"{}\"\naddress = \"127.0.0.1:{sim_port}\"\nunit = {u}\ninterval_ms = {interval_ms}\n",
                profile.display()
            ));
        }
        let text = text.replace("\n\n[spool]", "\n[spool]");
        let agent_toml = dir.join(format!("{name}-agent.toml"));
        std::fs::write(&agent_toml, text).unwrap();
        Site {
            dir: dir.to_path_buf(),
            agent_toml,
            _sim: sim,
            agent_id,
        }
    }

    fn start_agent(&self, tag: &str) -> Proc {
        Proc::start(
            &self.dir,
            tag,
            &bin("calwatch-agent"),
            &["run", "--config", self.agent_toml.to_str().unwrap()],
        )
    }

    fn topic(&self) -> String {
        format!("calwatch/v1/agents/{}/readings", self.agent_id)
    }

    /// The last seq each device handed out (exact after a clean stop).
    fn stored_seq(&self, device: &str) -> u64 {
        std::fs::read_to_string(self.dir.join("spool/seq").join(format!("{device}.seq")))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Waits (up to 60 s) until the newest reading received is at most `lag_ms` old: the
/// backlog is drained and live data flows.
async fn wait_until_live(counter: &Counter, lag_ms: i64) {
    for _ in 0..240 {
        let newest = *counter.newest_ts.lock().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        if newest > 0 && now - newest < lag_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the subscriber never caught up with live data");
}

/// Asserts every device's seqs arrived as contiguous runs; returns (readings, duplicates).
fn check_runs(counter: &Counter, prefix: &str, allowed_breaks: usize) -> (usize, usize) {
    let summary = counter.summary();
    assert_eq!(
        summary.len(),
        usize::from(DEVICES),
        "devices seen: {:?}",
        summary.keys().collect::<Vec<_>>()
    );
    let (mut total, mut dups) = (0, 0);
    for (device, (seqs, d)) in &summary {
        assert!(device.starts_with(prefix));
        assert_eq!(seqs[0], 1, "{device}: first seq");
        let breaks: Vec<(u64, u64)> = seqs
            .windows(2)
            .filter(|w| w[1] != w[0] + 1)
            .map(|w| (w[0], w[1]))
            .collect();
        assert!(
            breaks.len() <= allowed_breaks,
            "{device}: seqs missing between {breaks:?}"
        );
        total += seqs.len();
        dups += d;
    }
    (total, dups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_broker_down_30s() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("delivery-broker-down");
    let mut broker = Mosquitto::start(&dir, free_port());
    let site = Site::new(&dir, "bd", broker.port, "");
    let counter = Counter::subscribe(broker.port, &site.topic(), "bd-counter").await;
    let mut agent = site.start_agent("bd-agent");
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    broker.restart();
    // The backlog of the outage drains first (in order), then live data flows again.
    wait_until_live(&counter, 2_000).await;
    assert_eq!(
        agent.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        agent.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (total, dups) = check_runs(&counter, "bd-D", 0);
    for u in 1..=DEVICES {
        let d = format!("bd-D{u}");
        let last = counter.summary()[&d].0.last().copied().unwrap();
        assert_eq!(
            last,
            site.stored_seq(&d),
            "{d}: every seq up to the last produced arrived"
        );
    }
    // Outage of 30 s at 10 readings/s/device: the backlog (~1,500 readings) was replayed.
    assert!(total > usize::from(DEVICES) * 300, "{total}");
    // Duplicates only from batches in flight when the broker went away (window of 16).
    assert!(dups <= 16 * 50, "{dups} duplicates");
    assert!(
        agent.log_text().contains("cannot connect to broker"),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_agent_kill_9_with_a_backlog() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("delivery-kill9");
    let mut broker = Mosquitto::start(&dir, free_port());
    let site = Site::new(&dir, "k9", broker.port, "");
    let counter = Counter::subscribe(broker.port, &site.topic(), "k9-counter").await;
    let mut agent = site.start_agent("k9-agent-1");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Build a backlog in the spool, then kill the agent hard.
    broker.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(agent); // SIGKILL
    let reserved: Vec<u64> = (1..=DEVICES)
        .map(|u| site.stored_seq(&format!("k9-D{u}")))
        .collect();
    broker.restart();
    agent = site.start_agent("k9-agent-2");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        agent.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        agent.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = counter.summary();
    for (u, reserved) in (1..=DEVICES).zip(reserved) {
        let d = format!("k9-D{u}");
        let seqs = &summary[&d].0;
        // Before the kill: 1..=x without holes (x: the last reading spooled before the kill);
        // after the restart the device continues above its reserved block.
        let restart_at = seqs
            .iter()
            .position(|&s| s > reserved)
            .unwrap_or(seqs.len());
        let (before, after) = seqs.split_at(restart_at);
        assert_eq!(before.first(), Some(&1));
        assert!(
            before.windows(2).all(|w| w[1] == w[0] + 1),
            "{d}: hole before the kill"
        );
        assert!(
            before.len() > 40,
            "{d}: the backlog spooled while the broker was down arrived: {}",
            before.len()
        );
        assert_eq!(after.first(), Some(&(reserved + 1)), "{d}");
        assert!(
            after.windows(2).all(|w| w[1] == w[0] + 1),
            "{d}: hole after the restart"
        );
    }
    assert!(
        agent
            .log_text()
            .contains("spool holds batches from before the restart"),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_a_blackholed_broker_port() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("delivery-blackhole");
    let broker = Mosquitto::start(&dir, free_port());
    let proxy = Proxy::start(broker.port).await;
    let site = Site::new(&dir, "bh", proxy.port, "");
    let counter = Counter::subscribe(broker.port, &site.topic(), "bh-counter").await;
    let mut agent = site.start_agent("bh-agent");
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy
        .blackhole
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(15)).await;
    proxy
        .blackhole
        .store(false, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    wait_until_live(&counter, 2_000).await;
    assert_eq!(
        agent.terminate(Duration::from_secs(15)),
        Some(0),
        "{}",
        agent.log_text()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, dups) = check_runs(&counter, "bh-D", 0);
    for u in 1..=DEVICES {
        let d = format!("bh-D{u}");
        assert_eq!(
            counter.summary()[&d].0.last().copied().unwrap(),
            site.stored_seq(&d),
            "{d}"
        );
    }
    // Batches written into the black hole were never acknowledged: sent again, and the
    // ones that did get through before the keep-alive noticed are the only duplicates.
    assert!(dups <= 16 * 50, "{dups}");
    assert!(
        agent.log_text().contains("broker connection lost"),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_spool_full_block_policy_keeps_polling() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("delivery-full");
    // No broker at all: everything goes to the spool, which fills up (2 MiB).
    let dead_port = free_port();
    // 100 scales at 20 Hz: ~400 KB/s of batches, so 2 MiB fill in seconds.
    let site = Site::with_devices(&dir, "sf", dead_port, "", 100, 50);
    let text = std::fs::read_to_string(&site.agent_toml).unwrap().replace(
        "[spool]\ndir = \"spool\"\n",
        "[spool]\ndir = \"spool\"\nmax_bytes = 2097152\nsegment_bytes = 524288\nfull_policy = \"block_polling\"\n",
    );
    std::fs::write(&site.agent_toml, text).unwrap();
    let mut agent = site.start_agent("sf-agent");
    let mut full = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if agent
            .log_text()
            .contains("spool full (policy block_polling)")
        {
            full = true;
            break;
        }
    }
    assert!(full, "{}", agent.log_text());
    let before = agent.last_stat("readings_polled");
    tokio::time::sleep(Duration::from_secs(12)).await;
    // Polling goes on while the spool refuses batches (the agent's stats line every 10 s).
    let after = agent.last_stat("readings_polled");
    assert!(after > before, "polling stopped: {before} -> {after}");
    // Now a broker appears on that port: the backlog drains and the status says so.
    let broker = Mosquitto::start(&dir, dead_port);
    let counter = Counter::subscribe(broker.port, &site.topic(), "sf-counter").await;
    let _ = counter;
    // The agent's reconnect backoff may have grown to its 30 s cap by now.
    for _ in 0..180 {
        if agent.log_text().contains("spool has room again") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        agent.log_text().contains("spool has room again"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.terminate(Duration::from_secs(20)), Some(0));
}
