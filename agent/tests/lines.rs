//! Polling lines against the simulator over real Modbus TCP: one dead device, one that
//! never answers, one answering garbage and one answering exceptions do not slow the
//! 100 healthy ones.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use calwatch_agent::config::{DeviceConfig, Transport};
use calwatch_agent::poll::{run_line, LineCommand, LineContext, SharedHealth};
use calwatch_agent::profile::Profile;
use calwatch_agent::simulate::{self, Simulator};
use calwatch_protocol::{Id, Reading};
use tokio::sync::{mpsc, watch};

fn profile() -> Profile {
    Profile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/profiles/ft112.toml"))
        .unwrap()
}

fn device(id: &str, transport: Transport, unit: u8, interval_ms: u64) -> DeviceConfig {
    DeviceConfig {
        id: Id::new(id).unwrap(),
        profile: profile().into(),
        profile_path: "ft112.toml".into(),
        transport,
        unit,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(300),
        max_gap: 8,
        delay: Duration::ZERO,
        value_intervals: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_devices_do_not_slow_healthy_ones() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(simulate::serve(listener, Simulator::new(profile(), 100)));
    // A device that accepts connections and never answers.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            held.push(s);
        }
    });
    // A device that answers every request with garbage (not a Modbus frame).
    let junk = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let junk_addr = junk.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = junk.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 260];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0
                        || s.write_all(b"\xde\xad\xbe\xef garbage \x00\x01\x02\x03\x04\x05")
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    // A device whose port is closed.
    let dead_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };

    let dir = std::env::temp_dir().join(format!("calwatch-lines-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (tx, mut rx) = mpsc::channel::<Reading>(100_000);
    let health = SharedHealth::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let cx = LineContext {
        seq_dir: dir.clone(),
        out: tx,
        health: health.clone(),
        shutdown: stop_rx,
    };

    let interval = 200;
    let mut healthy: Vec<DeviceConfig> = (1..=100)
        .map(|u| {
            device(
                &format!("S-{u}"),
                Transport::Tcp(sim_addr.clone()),
                u,
                interval,
            )
        })
        .collect();
    // Unit 200 is not served: the simulator answers with an exception.
    healthy.push(device(
        "EXC",
        Transport::Tcp(sim_addr.clone()),
        200,
        interval,
    ));
    let lines = [
        (Transport::Tcp(sim_addr.clone()), healthy),
        (
            Transport::Tcp(mute_addr.clone()),
            vec![device("MUTE", Transport::Tcp(mute_addr), 1, interval)],
        ),
        (
            Transport::Tcp(dead_addr.clone()),
            vec![device("DEAD", Transport::Tcp(dead_addr), 1, interval)],
        ),
        (
            Transport::Tcp(junk_addr.clone()),
            vec![device("JUNK", Transport::Tcp(junk_addr), 1, interval)],
        ),
    ];
    let mut controls = Vec::new();
    let mut tasks = Vec::new();
    for (t, devs) in lines {
        let (ctl, crx) = mpsc::channel::<LineCommand>(1);
        controls.push(ctl);
        tasks.push(tokio::spawn(run_line(t, devs, crx, cx.clone())));
    }
    drop(cx);
    let run_for = Duration::from_secs(4);
    tokio::time::sleep(run_for).await;
    stop_tx.send(true).unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let mut per_device: HashMap<String, Vec<u64>> = HashMap::new();
    while let Ok(r) = rx.try_recv() {
        per_device
            .entry(r.device.to_string())
            .or_default()
            .push(r.seq);
    }
    let expected = run_for.as_millis() as u64 / interval;
    for u in 1..=100 {
        let seqs = per_device
            .get(&format!("S-{u}"))
            .cloned()
            .unwrap_or_default();
        assert!(
            seqs.len() as u64 >= expected * 3 / 4,
            "S-{u}: {} readings, expected about {expected}",
            seqs.len()
        );
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "S-{u}: seq not consecutive: {seqs:?}"
        );
    }
    for bad in ["EXC", "MUTE", "DEAD", "JUNK"] {
        assert!(!per_device.contains_key(bad), "{bad} produced readings");
    }
    let h = health.lock().unwrap();
    assert!(
        h.exceptions.get("EXC").copied().unwrap_or(0) >= 2,
        "{:?}",
        h.exceptions
    );
    assert!(
        h.failures.get("MUTE").copied().unwrap_or(0) >= 1,
        "{:?}",
        h.failures
    );
    assert!(
        h.failures.get("DEAD").copied().unwrap_or(0) >= 1,
        "{:?}",
        h.failures
    );
    assert!(
        h.failures.get("JUNK").copied().unwrap_or(0) >= 1,
        "{:?}",
        h.failures
    );
    assert!(h.health.get("DEAD").unwrap().consecutive_failures >= 1);
    drop(h);
    // The seq of each device was stored on shutdown: a restart continues it.
    let stored: u64 = std::fs::read_to_string(dir.join("S-1.seq"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(stored, *per_device["S-1"].last().unwrap());
    drop(controls);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_unchanged_devices_and_their_seq() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(simulate::serve(listener, Simulator::new(profile(), 3)));
    let dir = std::env::temp_dir().join(format!("calwatch-reload-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (tx, mut rx) = mpsc::channel::<Reading>(10_000);
    let (stop_tx, stop_rx) = watch::channel(false);
    let cx = LineContext {
        seq_dir: dir.clone(),
        out: tx,
        health: SharedHealth::default(),
        shutdown: stop_rx,
    };
    let t = Transport::Tcp(addr.clone());
    let a = device("A", t.clone(), 1, 100);
    let b = device("B", t.clone(), 2, 100);
    let (ctl, crx) = mpsc::channel(1);
    let task = tokio::spawn(run_line(t.clone(), vec![a.clone(), b.clone()], crx, cx));
    tokio::time::sleep(Duration::from_millis(600)).await;
    // B leaves, C joins, A is unchanged.
    ctl.send(LineCommand::Devices(vec![
        a.clone(),
        device("C", t.clone(), 3, 100),
    ]))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
    while let Ok(r) = rx.try_recv() {
        seqs.entry(r.device.to_string()).or_default().push(r.seq);
    }
    let a_seqs = &seqs["A"];
    assert!(a_seqs.len() >= 8, "{a_seqs:?}");
    assert!(
        a_seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "A kept one unbroken sequence: {a_seqs:?}"
    );
    assert!(
        seqs["B"].len() <= 8,
        "B stopped after the reload: {:?}",
        seqs["B"]
    );
    assert!(!seqs["C"].is_empty());
    assert_eq!(seqs["C"][0], 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
