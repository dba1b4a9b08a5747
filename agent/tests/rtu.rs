//! RTU transports: RTU frames over TCP (serial device servers) and RTU on a serial port,
//! the latter through a virtual serial pair made by socat. Two devices share the serial
//! line and are polled one request at a time.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use calwatch_agent::config::{DeviceConfig, SerialLine, Transport};
use calwatch_agent::poll::{run_line, LineContext, SharedHealth};
use calwatch_agent::profile::Profile;
use calwatch_agent::simulate::Simulator;
use calwatch_protocol::{Id, Reading};
use tokio::sync::{mpsc, watch};

fn profile() -> Profile {
    Profile::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/profiles/sdm630.toml"))
        .unwrap()
}

fn device(id: &str, transport: Transport, unit: u8) -> DeviceConfig {
    DeviceConfig {
        id: Id::new(id).unwrap(),
        profile: profile().into(),
        profile_path: "sdm630.toml".into(),
        transport,
        unit,
        interval: Duration::from_millis(200),
        timeout: Duration::from_millis(500),
        max_gap: 8,
        delay: Duration::from_millis(5),
        value_intervals: Default::default(),
    }
}

/// Polls `devices` on one line for `run_for`; returns the readings.
async fn poll(
    transport: Transport,
    devices: Vec<DeviceConfig>,
    run_for: Duration,
    tag: &str,
) -> Vec<Reading> {
    let dir = std::env::temp_dir().join(format!("calwatch-rtu-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (tx, mut rx) = mpsc::channel::<Reading>(10_000);
    let (stop_tx, stop_rx) = watch::channel(false);
    let cx = LineContext {
        seq_dir: dir.clone(),
        out: tx,
        health: SharedHealth::default(),
        shutdown: stop_rx,
    };
    let (_ctl, crx) = mpsc::channel(1);
    let task = tokio::spawn(run_line(transport, devices, crx, cx));
    tokio::time::sleep(run_for).await;
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn assert_meter_readings(readings: &[Reading], device: &str) {
    let mine: Vec<&Reading> = readings
        .iter()
        .filter(|r| r.device.as_str() == device)
        .collect();
    assert!(mine.len() >= 3, "{device}: {} readings", mine.len());
    for r in mine {
        let mut expect = 0.0;
        for l in 1..=3 {
            let v = r.number(&format!("voltage_v_l{l}")).unwrap();
            assert!((200.0..260.0).contains(&v), "{v}");
            expect += v
                * r.number(&format!("current_a_l{l}")).unwrap()
                * r.number(&format!("power_factor_l{l}")).unwrap();
        }
        let p = r.number("power_w").unwrap();
        assert!(
            (p - expect).abs() / expect < 1e-3,
            "P = Σ V·I·PF: {p} vs {expect}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_over_tcp() {
    use tokio_modbus::server::rtu_over_tcp::{accept_tcp_connection, Server};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sim = Simulator::new(profile(), 2);
    tokio::spawn(async move {
        let server = Server::new(listener);
        let on_connected = |stream, a| {
            let sim = sim.clone();
            async move { accept_tcp_connection(stream, a, move |_| Ok(Some(sim.clone()))) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    });
    let t = Transport::RtuOverTcp(addr);
    let readings = poll(
        t.clone(),
        vec![device("M-1", t.clone(), 1), device("M-2", t, 2)],
        Duration::from_millis(1500),
        "tcp",
    )
    .await;
    assert_meter_readings(&readings, "M-1");
    assert_meter_readings(&readings, "M-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_on_a_virtual_serial_pair() {
    if Command::new("socat")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        assert!(
            std::env::var("CALWATCH_SERVICES").is_err(),
            "tests/run installs socat; it is missing"
        );
        eprintln!("SKIPPED: socat not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("calwatch-pty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("server"), dir.join("agent"));
    let mut socat = Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", a.display()))
        .arg(format!("pty,raw,echo=0,link={}", b.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if a.exists() && b.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server = tokio_modbus::server::rtu::Server::new_from_path(&a, 38_400).unwrap();
    tokio::spawn(server.serve_forever(Simulator::new(profile(), 2)));
    let t = Transport::Serial(SerialLine {
        path: b.display().to_string(),
        baud: 38_400,
        parity: 'N',
        data_bits: 8,
        stop_bits: 1,
    });
    let readings = poll(
        t.clone(),
        vec![device("M-1", t.clone(), 1), device("M-2", t, 2)],
        Duration::from_millis(2000),
        "serial",
    )
    .await;
    let _ = socat.kill();
    let _ = socat.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_meter_readings(&readings, "M-1");
    assert_meter_readings(&readings, "M-2");
}
