//! Interop: our Modbus code against Modbus code we did not write.
//!
//! - `mbpoll` (libmodbus) reads `calwatch-agent simulate` serving the test-all-types
//!   profile: every value of every type, word order and table, decoded from mbpoll's raw
//!   words, must be the test pattern; where mbpoll has a typed view of its own (32-bit
//!   int and float, ABCD with `-B`, CDAB without) it must agree too.
//! - The agent polls a pymodbus server (tests/interop/pymodbus_server.py) that encodes the
//!   same pattern with pymodbus's payload builder, and publishes to the real mosquitto;
//!   every value in the batch must be the pattern.
//! - The fault fleet (config/fleet/faults.toml) serves what it says, to a tokio-modbus
//!   client: silence, exceptions, garbage, delays and the value faults.
//!
//! The test pattern is stated here again, literally, not taken from the simulator.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use calwatch_agent::profile::{Decoded, Profile, Table, ValueDef, ValueType};
use calwatch_protocol::{AgentStatus, ReadingBatch, Value};
use calwatch_tests::{bin, tool, workspace, Proc, Services};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_modbus::client::{tcp, Context, Reader};
use tokio_modbus::Slave;

fn test_profile_path() -> PathBuf {
    workspace().join("config/profiles/test-all-types.toml")
}

/// The value the test pattern gives `def` (see config/profiles/test-all-types.toml).
fn expected(def: &ValueDef, serial: &str) -> Decoded {
    let name = def.name.as_str();
    match name {
        "model" => return Decoded::Text("calwatch test-all-types".into()),
        "serial" => return Decoded::Text(serial.into()),
        // raw 0xA1B2C3D4 = 2712847316, scale 0.001
        "h_u32_cdab_milli" | "i_u32_cdab_milli" => return Decoded::Number(2_712_847.316),
        // raw -12345, scale 0.1, offset -40
        "h_i16_deci_offset" | "i_i16_deci_offset" => return Decoded::Number(-1_274.5),
        _ => {}
    }
    if matches!(def.ty, ValueType::Bool | ValueType::Bit) {
        return Decoded::Bool(!name.ends_with("_off"));
    }
    Decoded::Number(match def.ty {
        ValueType::U16 => 51_234.0,
        ValueType::I16 => -12_345.0,
        ValueType::U32 => 2_712_847_316.0,
        ValueType::I32 => -439_041_101.0,
        ValueType::U64 => 5_124_095_576_030_430.0,
        ValueType::I64 => -5_124_095_576_030_430.0,
        ValueType::F32 => 12_345.678,
        ValueType::F64 => -299_792.458,
        other => panic!("{name}: no pattern for {other:?}"),
    })
}

/// A directory for one test: under tests/run's temp dir, else the system's.
fn scratch(name: &str) -> PathBuf {
    let base = std::env::var("CALWATCH_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let d = base.join(format!("interop-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts `calwatch-agent simulate ARGS`; returns it and the port of its first banner.
fn simulate(dir: &Path, args: &[&str]) -> (Proc, u16) {
    let mut all = vec!["simulate"];
    all.extend_from_slice(args);
    let mut sim = Proc::start(dir, "simulator", &bin("calwatch-agent"), &all);
    let line = sim.wait_stdout_line("simulating", Duration::from_secs(20));
    (sim, port_in(&line))
}

/// The port of "... on HOST:PORT ..." in a banner line.
fn port_in(line: &str) -> u16 {
    line.split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// Runs mbpoll once; returns the "[addr]: value" lines as (addr, value text).
fn mbpoll(port: u16, table: &str, address: u16, count: u16, extra: &[&str]) -> Vec<(u16, String)> {
    let out = Command::new("mbpoll")
        .args(["-m", "tcp", "-a", "1", "-0", "-1", "-o", "2"])
        .args(["-t", table])
        .args(["-r", &address.to_string(), "-c", &count.to_string()])
        .args(["-p", &port.to_string()])
        .args(extra)
        .arg("127.0.0.1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<(u16, String)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix('[')?;
            let (addr, value) = rest.split_once("]:")?;
            Some((addr.parse().ok()?, value.trim().to_string()))
        })
        .collect();
    assert_eq!(
        rows.len(),
        usize::from(count),
        "mbpoll -t {table} -r {address} -c {count}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rows
}

#[test]
fn interop_mbpoll_reads_every_type_from_the_simulator() {
    if !tool("mbpoll", &["-V"], "mbpoll") {
        return;
    }
    let dir = scratch("mbpoll");
    let profile = Profile::load(&test_profile_path()).unwrap();
    let (_sim, port) = simulate(
        &dir,
        &[
            "--profile",
            test_profile_path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let mut checked = 0;
    for def in &profile.values {
        let table = match def.table {
            Table::Coil => "0",
            Table::Discrete => "1",
            Table::Input => "3:hex",
            Table::Holding => "4:hex",
        };
        let words: Vec<u16> = mbpoll(port, table, def.address, def.len, &[])
            .into_iter()
            .map(|(_, v)| match v.strip_prefix("0x") {
                Some(hex) => u16::from_str_radix(hex, 16).unwrap(),
                None => v.parse().unwrap(),
            })
            .collect();
        assert_eq!(
            def.decode(&words),
            expected(def, "SIM00001"),
            "{}: raw words {words:04X?}",
            def.name
        );
        checked += 1;

        // mbpoll's own typed decoding: 32-bit values, ABCD with -B, CDAB by default.
        let typed = match def.ty {
            ValueType::F32 => "float",
            ValueType::U32 | ValueType::I32 if def.scale == 1.0 => "int",
            _ => continue,
        };
        let flag: &[&str] = match def.order {
            calwatch_agent::profile::WordOrder::ABCD => &["-B"],
            calwatch_agent::profile::WordOrder::CDAB => &[],
            _ => continue,
        };
        let t = if def.table == Table::Input { "3" } else { "4" };
        let rows = mbpoll(port, &format!("{t}:{typed}"), def.address, 1, flag);
        let shown = &rows[0].1;
        match (typed, expected(def, "")) {
            ("float", Decoded::Number(x)) => {
                let y: f64 = shown.parse().unwrap();
                assert!(
                    (y - x).abs() <= 1e-5 * x.abs(),
                    "{}: mbpoll says {shown}",
                    def.name
                );
            }
            // mbpoll prints 32-bit ints as signed.
            (_, Decoded::Number(x)) => {
                let signed = (x as i64) as u32 as i32;
                assert_eq!(
                    shown.parse::<i64>().unwrap(),
                    i64::from(signed),
                    "{}",
                    def.name
                )
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(checked, profile.values.len());
    assert!(checked >= 60, "the profile lost values: {checked}");
}

/// What tests/interop/pymodbus_server.py imports of pymodbus (pymodbus.server imports
/// `serial` and `serial_asyncio`, which Debian's python3-pymodbus only recommends).
const PYMODBUS_IMPORTS: &str =
    "import pymodbus.constants, pymodbus.datastore, pymodbus.payload, pymodbus.server";

/// Debian's python3 (not pyenv's or a virtualenv's) when it imports what the pymodbus server
/// needs; else why not.
fn pymodbus_python() -> Result<PathBuf, String> {
    let python = PathBuf::from("/usr/bin/python3");
    match Command::new(&python)
        .args(["-c", PYMODBUS_IMPORTS])
        .output()
    {
        Ok(o) if o.status.success() => Ok(python),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
        Err(e) => Err(format!("{}: {e}", python.display())),
    }
}

/// Subscribes to `topics` on the broker; returns the publishes as they arrive.
async fn subscribe(
    addr: &str,
    topics: &[String],
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut opts = MqttOptions::new(
        format!("interop-sub-{}", std::process::id()),
        host,
        port.parse().unwrap(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    for t in topics {
        client.subscribe(t, QoS::AtLeastOnce).await.unwrap();
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (acked_tx, mut acked) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = acked_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("subscriber: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    for _ in topics {
        tokio::time::timeout(Duration::from_secs(10), acked.recv())
            .await
            .expect("suback")
            .unwrap();
    }
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_agent_polls_a_pymodbus_server() {
    let Some(svc) = Services::get() else { return };
    let python = pymodbus_python().unwrap_or_else(|e| {
        panic!(
            "/usr/bin/python3 -c '{PYMODBUS_IMPORTS}' fails: install the Debian packages \
             python3-pymodbus, python3-serial-asyncio and python3-serial (tests/run does; \
             see tests/tools.sh)\n{e}"
        )
    });
    let dir = svc.test_dir("interop-pymodbus");
    let profile_path = test_profile_path();
    let script = workspace().join("tests/interop/pymodbus_server.py");
    let mut server = Proc::start(
        &dir,
        "pymodbus",
        &python,
        &[
            script.to_str().unwrap(),
            "--profile",
            profile_path.to_str().unwrap(),
            "--port",
            "0",
            "--serial",
            "PYM00001",
        ],
    );
    let line = server.wait_stdout_line("pymodbus serving on", Duration::from_secs(30));
    let port = port_in(&line);

    let agent_id = format!("interop-agent-{}", std::process::id());
    let device = format!("INTEROP-PYM-{}", std::process::id());
    let readings_topic = format!("calwatch/v1/agents/{agent_id}/readings");
    let status_topic = format!("calwatch/v1/agents/{agent_id}/status");
    let (_client, mut rx) = subscribe(
        &svc.mqtt_addr,
        &[readings_topic.clone(), status_topic.clone()],
    )
    .await;

    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "agent = \"{agent_id}\"\n[mqtt]\nurl = \"mqtt://{mqtt}\"\n[spool]\ndir = \"spool\"\n[batch]\nlinger_ms = 200\n\
             [[device]]\nid = \"{device}\"\nprofile = \"{profile}\"\naddress = \"127.0.0.1:{port}\"\nunit = 1\ninterval_ms = 250\n",
            mqtt = svc.mqtt_addr,
            profile = profile_path.display()
        ),
    )
    .unwrap();
    let mut agent = Proc::start(
        &dir,
        "agent",
        &bin("calwatch-agent"),
        &["run", "--config", dir.join("agent.toml").to_str().unwrap()],
    );

    let profile = Profile::load(&profile_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let reading = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(p)) = tokio::time::timeout(left, rx.recv()).await else {
            panic!(
                "no reading from the agent in 30 s\nagent log:\n{}\npymodbus log:\n{}",
                agent.log_text(),
                server.log_text()
            );
        };
        if p.topic != readings_topic {
            continue;
        }
        let batch = ReadingBatch::decode(&p.payload).unwrap();
        if let Some(r) = batch
            .readings
            .into_iter()
            .find(|r| r.device.as_str() == device)
        {
            break r;
        }
    };
    let mut checked = 0;
    for def in profile.values.iter().filter(|d| !d.is_identity()) {
        let got = reading
            .value(def.name.as_str())
            .unwrap_or_else(|| panic!("{}: missing from {reading:?}", def.name));
        match (expected(def, ""), got) {
            (Decoded::Bool(want), Value::Bool(b)) => assert_eq!(b, want, "{}", def.name),
            // f64 and integers exactly; f32 as the shortest decimal of the f32.
            (Decoded::Number(want), Value::Number(x)) => {
                if def.ty == ValueType::F32 {
                    assert_eq!(x as f32, want as f32, "{}", def.name);
                }
                assert_eq!(x, want, "{}", def.name)
            }
            (want, got) => panic!("{}: {got:?}, expected {want:?}", def.name),
        }
        checked += 1;
    }
    assert_eq!(reading.values.len(), checked, "{reading:?}");

    // Identity strings go into the agent's status; the offline status on a clean stop
    // carries them for sure.
    assert_eq!(
        agent.terminate(Duration::from_secs(10)),
        Some(0),
        "{}",
        agent.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let info = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(p)) = tokio::time::timeout(left, rx.recv()).await else {
            panic!(
                "no status with device_info; agent log:\n{}",
                agent.log_text()
            );
        };
        if p.topic != status_topic {
            continue;
        }
        let status = AgentStatus::decode(&p.payload).unwrap();
        if let Some(info) = status.device_info.values().next().cloned() {
            break info;
        }
    };
    assert_eq!(info.model.as_deref(), Some("calwatch test-all-types"));
    assert_eq!(info.serial.as_deref(), Some("PYM00001"));
}

async fn connect(port: u16, unit: u8) -> Context {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    tcp::connect_slave(addr, Slave(unit)).await.unwrap()
}

/// Reads a profile's holding or input values from one unit: name → decoded value.
async fn read_values(
    port: u16,
    unit: u8,
    profile: &Profile,
) -> Result<Vec<(String, Decoded)>, String> {
    let mut ctx = connect(port, unit).await;
    let mut out = Vec::new();
    for def in &profile.values {
        let words = match def.table {
            Table::Holding => ctx.read_holding_registers(def.address, def.len).await,
            Table::Input => ctx.read_input_registers(def.address, def.len).await,
            _ => continue,
        };
        match words {
            Ok(Ok(w)) => out.push((def.name.to_string(), def.decode(&w))),
            Ok(Err(code)) => return Err(format!("exception {code:?}")),
            Err(e) => return Err(format!("transport: {e}")),
        }
    }
    Ok(out)
}

fn number(values: &[(String, Decoded)], name: &str) -> f64 {
    match values.iter().find(|(n, _)| n == name) {
        Some((_, Decoded::Number(x))) => *x,
        other => panic!("{name}: {other:?}"),
    }
}

/// `f` within a second: the agent's default timeout.
async fn within<T>(
    f: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_millis(1000), f).await
}

fn profile(name: &str) -> Profile {
    Profile::load(&workspace().join("config/profiles").join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_fault_fleet_serves_what_it_says() {
    let dir = scratch("faults");
    let fleet = workspace().join("config/fleet/faults.toml");
    let (_sim, port) = simulate(
        &dir,
        &[
            "--fleet",
            fleet.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let started = Instant::now();
    let (scale, dispenser, meter) = (
        profile("ft112.toml"),
        profile("dispenser-fcc.toml"),
        profile("sdm630.toml"),
    );

    // From the start: exception, garbage, slow, cheating, clean physics.
    let mut ctx = connect(port, 26).await;
    assert_eq!(
        within(ctx.read_input_registers(0, 2))
            .await
            .unwrap()
            .unwrap(),
        Err(tokio_modbus::ExceptionCode::ServerDeviceFailure)
    );
    let mut ctx = connect(port, 25).await;
    assert!(
        within(ctx.read_input_registers(0, 2))
            .await
            .unwrap()
            .is_err(),
        "garbage decoded as a response"
    );
    let t0 = Instant::now();
    let slow = read_values(port, 24, &meter).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(400 * 7),
        "7 reads, 400 ms each"
    );
    assert_eq!(number(&slow, "energy_kwh").floor(), 24_000.0, "{slow:?}");
    // Values read one request each, microseconds apart: P = V·I·PF to f32 precision.
    let clean = read_values(port, 21, &meter).await.unwrap();
    let vip = sum_vip(&clean);
    assert!(
        (number(&clean, "power_w") / vip - 1.0).abs() < 1e-5,
        "{clean:?}"
    );
    let cheat = read_values(port, 13, &dispenser).await.unwrap();
    if number(&cheat, "sale_id") > 0.0 {
        let ratio = number(&cheat, "sale_l") / number(&cheat, "encoder_sale_l");
        assert!((ratio - 1.02).abs() < 0.001, "{cheat:?}");
    }
    let honest = read_values(port, 11, &dispenser).await.unwrap();
    assert_eq!(number(&honest, "sale_l"), number(&honest, "encoder_sale_l"));
    let seal_before = read_values(port, 4, &scale).await.unwrap();
    assert_eq!(number(&seal_before, "event_counter"), 7.0);
    let k_before = read_values(port, 12, &dispenser).await.unwrap();
    assert_eq!(number(&k_before, "k_factor"), 100.12);
    let total_before = number(
        &read_values(port, 15, &dispenser).await.unwrap(),
        "totalizer_l",
    );
    let energy_before = number(&read_values(port, 28, &meter).await.unwrap(), "energy_kwh");
    // The silent meter answers until 15 s.
    let mut silent = connect(port, 23).await;
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "setup took too long"
    );
    within(silent.read_input_registers(0, 2))
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    tokio::time::sleep(Duration::from_secs(21).saturating_sub(started.elapsed())).await;
    assert!(
        within(silent.read_input_registers(0, 2)).await.is_err(),
        "the silent unit answered after 15 s"
    );
    let mut fresh = connect(port, 23).await;
    assert!(within(fresh.read_input_registers(0, 2)).await.is_err());
    assert_eq!(
        number(
            &read_values(port, 4, &scale).await.unwrap(),
            "event_counter"
        ),
        8.0,
        "seal_change at 20 s"
    );
    assert_eq!(
        number(
            &read_values(port, 12, &dispenser).await.unwrap(),
            "k_factor"
        ),
        100.5
    );
    let total_after = number(
        &read_values(port, 15, &dispenser).await.unwrap(),
        "totalizer_l",
    );
    assert!(
        total_after < total_before - 800.0,
        "rollback of 1000 L: {total_before} -> {total_after}"
    );
    let energy_after = number(&read_values(port, 28, &meter).await.unwrap(), "energy_kwh");
    assert!(
        energy_after < energy_before - 99.0,
        "rollback of 100 kWh: {energy_before} -> {energy_after}"
    );
    let stepped = read_values(port, 27, &meter).await.unwrap();
    let vip = sum_vip(&stepped);
    assert!(
        (number(&stepped, "power_w") / vip - 1.03).abs() < 1e-4,
        "{stepped:?}"
    );
}

/// Σ V·I·PF over the three phases the SDM630 profile maps (DESIGN decision 8).
fn sum_vip(values: &[(String, Decoded)]) -> f64 {
    (1..=3)
        .map(|l| {
            number(values, &format!("voltage_v_l{l}"))
                * number(values, &format!("current_a_l{l}"))
                * number(values, &format!("power_factor_l{l}"))
        })
        .sum()
}
