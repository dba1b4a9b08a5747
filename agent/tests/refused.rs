//! Devices that refuse some requests or close the connection, against a Modbus TCP server
//! written out here (MBAP framing, functions 3 and 4) in front of the simulator's registers:
//! a refused request costs only its own values, a failing device is logged at its 1st, 2nd,
//! 4th, 8th … failure and once on recovery, and a closed connection is called that.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use calwatch_agent::config::{DeviceConfig, Transport};
use calwatch_agent::poll::{run_line, LineContext, SharedHealth};
use calwatch_agent::profile::Profile;
use calwatch_agent::simulate::Simulator;
use calwatch_protocol::{Id, Reading};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_modbus::server::Service;
use tokio_modbus::{Request, Response, SlaveRequest};

/// Modbus exception 2, illegal data address.
const ILLEGAL_DATA_ADDRESS: u8 = 2;

/// Which requests the server refuses: (function, start, count) → refuse.
type Refuse = Arc<dyn Fn(u8, u16, u16) -> bool + Send + Sync>;

/// How the hand-written server behaves.
#[derive(Clone)]
struct Server {
    sim: Simulator,
    refuse: Refuse,
    /// Connections still to be closed right after their first request arrived.
    close: Arc<AtomicUsize>,
}

impl Server {
    async fn start(self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(self.clone().connection(s));
            }
        });
        addr
    }

    async fn connection(self, mut s: TcpStream) {
        let mut first = true;
        loop {
            let mut hdr = [0u8; 7];
            if s.read_exact(&mut hdr).await.is_err() {
                return;
            }
            let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
            let mut pdu = vec![0u8; len.saturating_sub(1)];
            if s.read_exact(&mut pdu).await.is_err() {
                return;
            }
            if first
                && self
                    .close
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                return; // the peer closes the connection instead of answering
            }
            first = false;
            let answer = self.answer(hdr[6], &pdu);
            let mut frame = Vec::with_capacity(7 + answer.len());
            frame.extend_from_slice(&hdr[..4]);
            frame.extend_from_slice(&(answer.len() as u16 + 1).to_be_bytes());
            frame.push(hdr[6]);
            frame.extend_from_slice(&answer);
            if s.write_all(&frame).await.is_err() {
                return;
            }
        }
    }

    /// The response PDU to a request PDU.
    fn answer(&self, unit: u8, pdu: &[u8]) -> Vec<u8> {
        let (function, start, count) = (
            pdu[0],
            u16::from_be_bytes([pdu[1], pdu[2]]),
            u16::from_be_bytes([pdu[3], pdu[4]]),
        );
        if (self.refuse)(function, start, count) {
            return vec![function | 0x80, ILLEGAL_DATA_ADDRESS];
        }
        let request = match function {
            3 => Request::ReadHoldingRegisters(start, count),
            4 => Request::ReadInputRegisters(start, count),
            _ => return vec![function | 0x80, 1],
        };
        let answered = self
            .sim
            .call(SlaveRequest {
                slave: unit,
                request,
            })
            .into_inner();
        match answered {
            Ok(Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words)) => {
                let mut out = vec![function, (words.len() * 2) as u8];
                out.extend(words.iter().flat_map(|w| w.to_be_bytes()));
                out
            }
            Ok(_) => vec![function | 0x80, 4],
            Err(code) => vec![function | 0x80, u8::from(code)],
        }
    }
}

fn profiles() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/profiles")
}

/// The shipped SDM630 map plus what the variant in the issue lacks: the serial-number block
/// at holding 0xFC00 (a u32 reading, as the manual has it, and an identity string), and a
/// model string it does answer.
fn sdm630_with_serial_block() -> Profile {
    let path = profiles().join("sdm630.toml");
    let text = std::fs::read_to_string(&path).unwrap()
        + r#"
[[value]]
name = "serial_number"
table = "holding"
address = 0xFC00
type = "u32"

[[value]]
name = "serial"
table = "holding"
address = 0xFC10
type = "string"
registers = 4

[[value]]
name = "model"
table = "holding"
address = 0x0100
type = "string"
registers = 8
"#;
    Profile::parse(&path, &text).unwrap()
}

/// Whether a read of `count` registers from `start` touches the missing block 0xFC00..0xFCFF.
fn in_serial_block(function: u8, start: u16, count: u16) -> bool {
    let end = u32::from(start) + u32::from(count);
    function == 3 && u32::from(start) <= 0xFCFF && end > 0xFC00
}

fn device(id: &str, profile: Profile, addr: &str, interval_ms: u64) -> DeviceConfig {
    DeviceConfig {
        id: Id::new(id).unwrap(),
        profile: profile.into(),
        profile_path: "profile.toml".into(),
        transport: Transport::Tcp(addr.to_string()),
        unit: 1,
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(500),
        max_gap: 8,
        delay: Duration::ZERO,
        value_intervals: Default::default(),
    }
}

/// Polls `dev` on its own line; `during` runs meanwhile, then the line stops. Returns the
/// readings and the health table.
async fn poll(
    dev: DeviceConfig,
    during: impl std::future::Future<Output = ()>,
) -> (Vec<Reading>, SharedHealth) {
    let dir = std::env::temp_dir().join(format!(
        "calwatch-refused-{}-{}",
        dev.id,
        std::process::id()
    ));
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
    let (_ctl, crx) = mpsc::channel(1);
    let task = tokio::spawn(run_line(dev.transport.clone(), vec![dev], crx, cx));
    during.await;
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    (out, health)
}

/// Log lines written while `f` runs on this thread (the tests use tokio's current-thread
/// runtime, so every task of the line logs here).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || me.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn lines(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test]
async fn a_refused_request_costs_only_its_own_values() {
    let profile = sdm630_with_serial_block();
    let addr = Server {
        sim: Simulator::new(profile.clone(), 1),
        refuse: Arc::new(in_serial_block),
        close: Arc::default(),
    }
    .start()
    .await;
    let (readings, health) = poll(
        device("SDM-NOSERIAL", profile.clone(), &addr, 100),
        tokio::time::sleep(Duration::from_millis(1000)),
    )
    .await;
    // Before: no reading at all. Now: about one per 100 ms, each with the 13 values the
    // meter does answer.
    assert!(readings.len() >= 5, "{} readings", readings.len());
    let answered: Vec<&str> = profile
        .values
        .iter()
        .filter(|v| !v.is_identity() && v.name.as_str() != "serial_number")
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(answered.len(), 13);
    for r in &readings {
        let names: Vec<&str> = r.values.iter().map(|(n, _)| n.as_str()).collect();
        for name in &answered {
            assert!(names.contains(name), "{name} missing from {names:?}");
        }
        assert!(!names.contains(&"serial_number"), "{names:?}");
        let v = r.number("voltage_v_l1").unwrap();
        assert!((200.0..260.0).contains(&v), "{v}");
    }
    let h = health.lock().unwrap();
    let id = Id::new("SDM-NOSERIAL").unwrap();
    // The identity string that was refused is simply absent; the one answered is there.
    let info = &h.info[&id];
    assert_eq!(info.model.as_deref(), Some("Eastron SDM630"));
    assert_eq!(info.serial, None);
    // The status says which values fail; the device itself is healthy.
    let dh = &h.health[&id];
    assert_eq!(dh.consecutive_failures, 0);
    assert!(dh.last_ok.is_some());
    assert_eq!(
        dh.failing_values,
        vec![
            Id::new("serial").unwrap(),
            Id::new("serial_number").unwrap()
        ]
    );
    assert!(h.exceptions[&id] >= readings.len() as u64);
}

/// A minimal meter map: one request per poll.
fn one_register_meter() -> Profile {
    let text = "kind = \"energy_meter\"\nmodel = \"m\"\n[[value]]\nname = \"energy_kwh\"\ntable = \"input\"\naddress = 0x0156\ntype = \"f32\"\n";
    Profile::parse(Path::new("meter.toml"), text).unwrap()
}

#[tokio::test]
async fn a_failing_device_is_logged_at_powers_of_two_and_once_on_recovery() {
    let logs = Captured::default();
    let _guard = logs.install();
    let profile = one_register_meter();
    let refusing = Arc::new(AtomicBool::new(true));
    let addr = Server {
        sim: Simulator::new(profile.clone(), 1),
        refuse: {
            let refusing = refusing.clone();
            Arc::new(move |_, _, _| refusing.load(Ordering::SeqCst))
        },
        close: Arc::default(),
    }
    .start()
    .await;
    let id = Id::new("M-1").unwrap();
    let (readings, health) = poll(device("M-1", profile, &addr, 10), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        refusing.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await;
    assert!(!readings.is_empty(), "recovered");
    let failed_polls = health.lock().unwrap().exceptions[&id];
    assert!(failed_polls >= 40, "{failed_polls} polls refused");
    let lines = logs.lines();
    let warnings = lines
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("M-1"))
        .count() as u64;
    // The 1st, 2nd, 4th … failure: log2(n) + 1 lines, not one per poll.
    let expected = u64::from(failed_polls.ilog2()) + 1;
    assert_eq!(warnings, expected, "{failed_polls} failures: {lines:#?}");
    let recovered = lines
        .iter()
        .filter(|l| l.contains("INFO") && l.contains("M-1") && l.contains("again"))
        .count();
    assert_eq!(recovered, 1, "{lines:#?}");
}

#[tokio::test]
async fn a_connection_closed_by_the_device_is_called_that() {
    let logs = Captured::default();
    let _guard = logs.install();
    let profile = one_register_meter();
    let addr = Server {
        sim: Simulator::new(profile.clone(), 1),
        refuse: Arc::new(|_, _, _| false),
        close: Arc::new(AtomicUsize::new(2)),
    }
    .start()
    .await;
    let (readings, _) = poll(
        device("M-2", profile, &addr, 50),
        tokio::time::sleep(Duration::from_millis(2500)),
    )
    .await;
    let lines = logs.lines();
    let unreachable: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("M-2"))
        .collect();
    assert_eq!(unreachable.len(), 2, "{lines:#?}");
    for l in &unreachable {
        assert!(l.contains("connection closed by the device"), "{l}");
        assert!(!l.contains("os error"), "{l}");
    }
    assert!(!readings.is_empty(), "reconnected: {lines:#?}");
}

#[tokio::test]
async fn the_declared_wrap_of_the_energy_register_is_in_device_info() {
    let path = Path::new("meter.toml");
    let text = "kind = \"energy_meter\"\nmodel = \"m\"\n[[value]]\nname = \"energy_kwh\"\ntable = \"input\"\naddress = 0x0156\ntype = \"f32\"\nwrap = 1000000\n";
    let profile = Profile::parse(path, text).unwrap();
    let addr = Server {
        sim: Simulator::new(profile.clone(), 1),
        refuse: Arc::new(|_, _, _| false),
        close: Arc::default(),
    }
    .start()
    .await;
    let (readings, health) = poll(
        device("M-3", profile, &addr, 50),
        tokio::time::sleep(Duration::from_millis(300)),
    )
    .await;
    assert!(!readings.is_empty());
    let h = health.lock().unwrap();
    // No identity strings in this profile: the entry carries the modulus alone.
    let info = &h.info[&Id::new("M-3").unwrap()];
    assert_eq!(info.wrap, Some(1_000_000.0));
    assert_eq!(
        (info.model.as_deref(), info.serial.as_deref()),
        (None, None)
    );
    assert!(h.identity_changes >= 1, "the status is republished");
}
