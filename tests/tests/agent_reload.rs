//! The agent's device list changes without a restart: a changed config file, and SIGHUP,
//! add and remove devices; the devices that stay keep their unbroken seq.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use calwatch_tests::broker::{Counter, Mosquitto};
use calwatch_tests::{bin, free_port, workspace, Proc, Services};

fn config(agent: &str, mqtt: u16, sim: u16, units: &[u8]) -> String {
    let profile = workspace().join("config/profiles/ft112.toml");
    let mut text = format!("agent = \"{agent}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt}\"\n[spool]\ndir = \"spool\"\n[batch]\nlinger_ms = 100\n");
    for u in units {
        text.push_str(&format!(
            "[[device]]\nid = \"RL-{u}\"\nprofile = \"{}\"\naddress = \"127.0.0.1:{sim}\"\nunit = {u}\ninterval_ms = 100\n",
            profile.display()
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reloads_devices_on_file_change_and_sighup() {
    let Some(svc) = Services::get() else { return };
    let dir = svc.test_dir("agent-reload");
    let broker = Mosquitto::start(&dir, free_port());
    let sim_port = free_port();
    let profile = workspace().join("config/profiles/ft112.toml");
    let mut sim = Proc::start(
        &dir,
        "sim",
        &bin("calwatch-agent"),
        &[
            "simulate",
            "--profile",
            profile.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--count",
            "3",
        ],
    );
    sim.wait_stdout_line("simulating", Duration::from_secs(10));
    let agent_id = format!("reload-{}", std::process::id());
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, config(&agent_id, broker.port, sim_port, &[1])).unwrap();
    let counter = Counter::subscribe(
        broker.port,
        &format!("calwatch/v1/agents/{agent_id}/readings"),
        "reload-counter",
    )
    .await;
    let mut agent = Proc::start(
        &dir,
        "agent",
        &bin("calwatch-agent"),
        &["run", "--config", cfg.to_str().unwrap()],
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(counter.summary().contains_key("RL-1"));
    assert!(!counter.summary().contains_key("RL-2"));

    // The file changes: RL-2 joins (picked up within the 2 s check).
    std::fs::write(&cfg, config(&agent_id, broker.port, sim_port, &[1, 2])).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        counter.summary().contains_key("RL-2"),
        "{:?}\n{}",
        counter.summary().keys().collect::<Vec<_>>(),
        agent.log_text()
    );

    // SIGHUP after rewriting the file with the same timestamp granularity: RL-2 leaves, RL-3 joins.
    std::fs::write(&cfg, config(&agent_id, broker.port, sim_port, &[1, 3])).unwrap();
    let _ = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(agent.pid().to_string())
        .status();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rl2_then = counter.summary()["RL-2"].0.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        counter.summary().contains_key("RL-3"),
        "{}",
        agent.log_text()
    );
    assert_eq!(
        counter.summary()["RL-2"].0.len(),
        rl2_then,
        "RL-2 stopped after the reload"
    );
    assert!(
        agent.log_text().contains("by_signal=true"),
        "{}",
        agent.log_text()
    );

    assert_eq!(agent.terminate(Duration::from_secs(10)), Some(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // RL-1 was never restarted: one unbroken run of seqs from 1.
    let (seqs, _) = &counter.summary()["RL-1"];
    assert_eq!(seqs[0], 1);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "RL-1 seq broke across reloads"
    );
    assert!(seqs.len() > 100, "{}", seqs.len());
}
