//! `calwatch-agent simulate`: Modbus instruments for tests, demos and owners trying
//! calwatch without hardware.
//!
//! A [`Fleet`] (one `--profile`, or a fleet file with `--fleet`, see [`fleet`]) lists groups
//! of instruments; each group listens on an address (groups may share one, with distinct
//! unit ids) and speaks Modbus TCP or RTU over TCP. An instrument's values come from its
//! [`model`] — a deterministic function of simulated time, unit id and seed, so tests can
//! predict them — encoded into registers through its profile, the same map the agent
//! decodes with, so any profile can be simulated. Faults from the fleet file change the
//! values (drift, broken seal, cheating …) or the wire (silence, delay, garbage,
//! exceptions) from a moment on. The server itself is in [`wire`].

pub mod fleet;
pub mod model;
mod wire;

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::profile::{Profile, Table};

pub use fleet::{Fleet, SimTransport, SIM_EVENT_COUNTER, SIM_K_FACTOR};
pub use model::{pattern, test_pattern};

use model::Instrument;
use wire::Port;

/// Simulated time: seconds since the simulator started, times the fleet's speed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SimClock {
    start: Instant,
    speed: f64,
}

impl SimClock {
    fn new(speed: f64) -> SimClock {
        SimClock {
            start: Instant::now(),
            speed,
        }
    }

    pub(crate) fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * self.speed
    }
}

/// One listening port of a fleet, bound and ready to serve.
#[derive(Debug)]
pub struct BoundPort {
    listener: TcpListener,
    port: Arc<Port>,
    /// The address actually bound (the port filled in when the fleet said 0).
    pub addr: SocketAddr,
    banner: String,
}

impl BoundPort {
    /// `simulating N x MODEL on ADDR (unit ids a..=b)`, with `+ M x MODEL` for more
    /// groups on the address and their names in brackets: the line tests wait for.
    pub fn banner(&self) -> &str {
        &self.banner
    }

    /// Serves until the future is dropped (or the listener fails).
    pub async fn serve(self) -> io::Result<()> {
        wire::serve(self.listener, self.port).await
    }
}

fn banner(groups: &[&fleet::Group], addr: SocketAddr) -> String {
    let what: Vec<String> = groups
        .iter()
        .map(|g| format!("{} x {}", g.count, g.profile.model))
        .collect();
    let units: Vec<String> = groups
        .iter()
        .map(|g| format!("{}..={}", g.first_unit, g.last_unit()))
        .collect();
    let names: Vec<&str> = groups.iter().filter_map(|g| g.name.as_deref()).collect();
    let transport = match groups.first().map(|g| g.transport) {
        Some(SimTransport::RtuOverTcp) => " RTU over TCP",
        _ => "",
    };
    let mut line = format!(
        "simulating {} on {addr}{transport} (unit ids {})",
        what.join(" + "),
        units.join(", ")
    );
    if !names.is_empty() {
        line.push_str(&format!(" [{}]", names.join(", ")));
    }
    line
}

/// Binds every listener of `fleet`; simulated time starts now, one clock for all.
pub async fn bind(fleet: &Fleet) -> io::Result<Vec<BoundPort>> {
    let clock = SimClock::new(fleet.speed);
    let mut ports = Vec::new();
    for groups in fleet::by_listener(fleet) {
        let Some(first) = groups.first() else {
            continue;
        };
        let listen = first.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
        let addr = listener.local_addr()?;
        let mut units = HashMap::new();
        for g in &groups {
            for (index, unit) in g.units().enumerate() {
                let faults = g
                    .faults
                    .iter()
                    .filter(|f| f.unit == unit)
                    .copied()
                    .collect();
                let inst = Instrument::new(
                    &g.profile,
                    unit,
                    index as u32,
                    fleet.seed,
                    g.options.clone(),
                    faults,
                );
                units.insert(unit, Arc::new(inst));
            }
        }
        ports.push(BoundPort {
            banner: banner(&groups, addr),
            listener,
            port: Arc::new(Port {
                transport: first.transport,
                units,
                clock,
            }),
            addr,
        });
    }
    Ok(ports)
}

/// Serves all `ports` until one fails or the future is dropped.
pub async fn serve_all(ports: Vec<BoundPort>) -> io::Result<()> {
    let mut tasks = JoinSet::new();
    for p in ports {
        tasks.spawn(p.serve());
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(io::Error::other(e)),
        }
    }
    Ok(())
}

/// `count` instruments of one profile as unit ids 1..=count on one listener, no faults:
/// what `simulate --profile` serves, and what the gateway's demo embeds.
#[derive(Clone, Debug)]
pub struct Simulator {
    port: Arc<Port>,
}

impl Simulator {
    /// `count` instruments (unit ids 1..=count, at most 247) of `profile`.
    pub fn new(profile: Profile, count: u8) -> Simulator {
        let fleet = Fleet::single(profile, SocketAddr::from(([127, 0, 0, 1], 0)), count);
        let mut units = HashMap::new();
        for g in &fleet.groups {
            for (index, unit) in g.units().enumerate() {
                let inst = Instrument::new(
                    &g.profile,
                    unit,
                    index as u32,
                    0,
                    g.options.clone(),
                    Vec::new(),
                );
                units.insert(unit, Arc::new(inst));
            }
        }
        Simulator {
            port: Arc::new(Port {
                transport: SimTransport::Tcp,
                units,
                clock: SimClock::new(1.0),
            }),
        }
    }
}

/// Serves `sim` on `listener` until the future is dropped.
pub async fn serve(listener: TcpListener, sim: Simulator) -> io::Result<()> {
    wire::serve(listener, sim.port).await
}

impl Simulator {
    fn answer(&self, req: SlaveRequest<'static>) -> Result<Response, ExceptionCode> {
        let Some(inst) = self.port.units.get(&req.slave) else {
            return Err(ExceptionCode::GatewayTargetDevice);
        };
        let (table, start, count) = match req.request {
            Request::ReadHoldingRegisters(a, n) => (Table::Holding, a, n),
            Request::ReadInputRegisters(a, n) => (Table::Input, a, n),
            Request::ReadCoils(a, n) => (Table::Coil, a, n),
            Request::ReadDiscreteInputs(a, n) => (Table::Discrete, a, n),
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        let limit = if table.is_bits() { 2000 } else { 125 };
        if count == 0 || count > limit {
            return Err(ExceptionCode::IllegalDataValue);
        }
        if u32::from(start) + u32::from(count) > 65_536 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let words = inst.read(table, start, count, self.port.clock.now());
        let bits = || words.iter().map(|w| *w != 0).collect();
        Ok(match table {
            Table::Holding => Response::ReadHoldingRegisters(words.clone()),
            Table::Input => Response::ReadInputRegisters(words.clone()),
            Table::Coil => Response::ReadCoils(bits()),
            Table::Discrete => Response::ReadDiscreteInputs(bits()),
        })
    }
}

/// The simulator as a tokio-modbus service, for the library's servers (RTU on a serial
/// port, RTU over TCP); transport faults do not apply there.
impl Service for Simulator {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        ready(self.answer(req))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;
    use tokio_modbus::client::{tcp, Reader};
    use tokio_modbus::Slave;

    fn config(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../config")
            .join(rel)
    }

    async fn start(fleet_text: &str) -> Vec<SocketAddr> {
        let dir = std::env::temp_dir().join(format!(
            "calwatch-sim-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let text = fleet_text.replace("PROFILES", &config("profiles").display().to_string());
        let fleet = Fleet::parse(&dir.join("fleet.toml"), &text).unwrap();
        let ports = bind(&fleet).await.unwrap();
        let addrs = ports.iter().map(|p| p.addr).collect();
        tokio::spawn(serve_all(ports));
        addrs
    }

    #[tokio::test]
    async fn serves_the_profile_through_tokio_modbus() {
        let addrs = start(
            "[[group]]\nprofile = \"PROFILES/dispenser-fcc.toml\"\nlisten = \"127.0.0.1:0\"\ncount = 3\nfirst_unit = 5\n",
        )
        .await;
        let mut ctx = tcp::connect_slave(addrs[0], Slave(7)).await.unwrap();
        let regs = ctx.read_holding_registers(0x0A, 3).await.unwrap().unwrap();
        // k_factor 100.12 as u32 centi-units, then event counter 7.
        assert_eq!(regs, vec![0, 10_012, 7]);
        let mut other = tcp::connect_slave(addrs[0], Slave(9)).await.unwrap();
        let err = other.read_holding_registers(0, 1).await.unwrap();
        assert_eq!(err, Err(tokio_modbus::ExceptionCode::GatewayTargetDevice));
    }

    #[tokio::test]
    async fn transport_faults_on_a_shared_port() {
        let addrs = start(
            "[[group]]\nprofile = \"PROFILES/ft112.toml\"\nlisten = \"127.0.0.1:0\"\ncount = 4\n\
             [[group.fault]]\nunit = 1\nkind = \"silent\"\n\
             [[group.fault]]\nunit = 2\nkind = \"exception\"\ncode = 6\n\
             [[group.fault]]\nunit = 3\nkind = \"garbage\"\n\
             [[group.fault]]\nunit = 4\nkind = \"slow\"\ndelay_ms = 300\n",
        )
        .await;
        let limit = Duration::from_millis(150);
        let addr = addrs[0];
        let read = move |unit: u8| async move {
            let mut ctx = tcp::connect_slave(addr, Slave(unit)).await.unwrap();
            tokio::time::timeout(limit, ctx.read_holding_registers(0, 14)).await
        };
        assert!(read(1).await.is_err(), "silent unit answered");
        assert_eq!(
            read(2).await.unwrap().unwrap(),
            Err(tokio_modbus::ExceptionCode::ServerDeviceBusy)
        );
        assert!(read(3).await.unwrap().is_err(), "garbage decoded");
        assert!(read(4).await.is_err(), "slow unit was quick");
        let mut ctx = tcp::connect_slave(addrs[0], Slave(4)).await.unwrap();
        let regs = ctx.read_holding_registers(0x0C, 1).await.unwrap().unwrap();
        assert_eq!(regs, vec![7]);
    }

    #[tokio::test]
    async fn rtu_over_tcp_frames_with_crc() {
        let addrs = start(
            "[[group]]\nprofile = \"PROFILES/ft112.toml\"\nlisten = \"127.0.0.1:0\"\ntransport = \"rtu_over_tcp\"\nfirst_unit = 3\n",
        )
        .await;
        let stream = tokio::net::TcpStream::connect(addrs[0]).await.unwrap();
        let mut ctx = tokio_modbus::client::rtu::attach_slave(stream, Slave(3));
        let regs = ctx.read_holding_registers(0x0C, 1).await.unwrap().unwrap();
        assert_eq!(regs, vec![7]);
    }

    #[test]
    fn banner_names_models_units_and_groups() {
        let p = Profile::load(&config("profiles/ft112.toml")).unwrap();
        let mut fleet = Fleet::single(p, "127.0.0.1:5020".parse().unwrap(), 3);
        fleet.groups[0].name = Some("market-1".into());
        let groups: Vec<&fleet::Group> = fleet.groups.iter().collect();
        assert_eq!(
            banner(&groups, "127.0.0.1:5020".parse().unwrap()),
            "simulating 3 x FT-112 on 127.0.0.1:5020 (unit ids 1..=3) [market-1]"
        );
    }
}
