//! `calwatch-agent simulate`: Modbus TCP instruments for tests, demos and owners trying
//! calwatch without hardware.
//!
//! One listener serves `count` instruments of one profile as unit ids 1..=count. Each
//! instrument's values are a deterministic function of time and unit id (so tests can
//! predict them), encoded into registers through the profile — the same map the agent
//! decodes with, so any profile can be simulated. Unknown value names read as zero.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
use tokio_modbus::server::Service;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::profile::{Decoded, InstrumentKind, Profile, Table};

/// Sealed event counter every simulated instrument reports (matches the sample certificates).
pub const SIM_EVENT_COUNTER: f64 = 7.0;

/// A simulated instrument's values at a moment.
fn model_value(kind: InstrumentKind, unit: u8, name: &str, t: f64, model: &str) -> Decoded {
    match kind {
        InstrumentKind::Scale => scale_value(unit, name, t),
        InstrumentKind::EnergyMeter => meter_value(unit, name, t),
        InstrumentKind::Dispenser => dispenser_value(unit, name, t),
        InstrumentKind::Other => Decoded::Number(0.0),
    }
    .or_identity(unit, name, model)
}

trait OrIdentity {
    fn or_identity(self, unit: u8, name: &str, model: &str) -> Decoded;
}

impl OrIdentity for Decoded {
    fn or_identity(self, unit: u8, name: &str, model: &str) -> Decoded {
        match name {
            "model" => Decoded::Text(model.to_string()),
            "serial" => Decoded::Text(format!("SIM{unit:05}")),
            _ => self,
        }
    }
}

/// Cheap deterministic noise in [0, 1) from two integers (splitmix64).
fn noise(a: u64, b: u64) -> f64 {
    let mut z = a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_add(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A retail scale (15 kg, e = 5 g) serving customers: every 20 s a load is placed
/// (2 s settling), weighed for 8 s, and removed (2 s), then the pan is empty at zero.
fn scale_value(unit: u8, name: &str, t: f64) -> Decoded {
    const PERIOD: f64 = 20.0;
    const E: f64 = 0.005;
    let cycle = (t / PERIOD).floor();
    let phase = t - cycle * PERIOD;
    let load = ((0.2 + noise(u64::from(unit), cycle as u64) * 11.8) / E).round() * E;
    let (gross, stable) = match phase {
        p if p < 6.0 => (0.0, true),
        p if p < 8.0 => (load * (p - 6.0) / 2.0, false),
        p if p < 16.0 => (load, true),
        p if p < 18.0 => (load * (18.0 - p) / 2.0, false),
        _ => (0.0, true),
    };
    let gross = (gross / E).round() * E;
    match name {
        "gross_kg" | "net_kg" => Decoded::Number(gross),
        "tare_kg" => Decoded::Number(0.0),
        "stable" => Decoded::Bool(stable),
        "zero" => Decoded::Bool(stable && gross == 0.0),
        "overload" => Decoded::Bool(gross > 15.0 + 9.0 * E),
        "event_counter" => Decoded::Number(SIM_EVENT_COUNTER),
        _ => Decoded::Number(0.0),
    }
}

/// A single-phase household load on an energy meter: 230 V ± 2%, a current that follows
/// a daily-ish pattern, power factor 0.95, energy integrated from a starting register.
fn meter_value(unit: u8, name: &str, t: f64) -> Decoded {
    let voltage = 230.0 + 4.0 * (t / 37.0 + f64::from(unit)).sin();
    let current = 6.0 + 4.0 * (t / 300.0 + f64::from(unit)).sin();
    let pf = 0.95;
    let mean_power = 230.0 * 6.0 * pf;
    let energy = 1000.0 * f64::from(unit) + mean_power * t / 3_600_000.0;
    match name {
        "voltage_v" | "voltage_v_l1" => Decoded::Number(voltage),
        "current_a" | "current_a_l1" => Decoded::Number(current),
        "power_factor" | "power_factor_l1" => Decoded::Number(pf),
        "power_w" => Decoded::Number(voltage * current * pf),
        "frequency_hz" => Decoded::Number(50.0 + 0.02 * (t / 11.0).sin()),
        "energy_kwh" | "import_kwh" | "total_kwh" => Decoded::Number(energy),
        "event_counter" => Decoded::Number(SIM_EVENT_COUNTER),
        _ => Decoded::Number(0.0),
    }
}

/// A fuel dispenser selling every 30 s (10–60 L) with an honest encoder.
fn dispenser_value(unit: u8, name: &str, t: f64) -> Decoded {
    const PERIOD: f64 = 30.0;
    let sales = (t / PERIOD).floor() as u64;
    let sale = |n: u64| ((10.0 + 50.0 * noise(u64::from(unit) + 1000, n)) * 100.0).round() / 100.0;
    let last = if sales == 0 { 0.0 } else { sale(sales) };
    match name {
        "sale_l" | "encoder_sale_l" => Decoded::Number(last),
        "sale_id" => Decoded::Number(sales as f64),
        "totalizer_l" => {
            Decoded::Number(100_000.0 * f64::from(unit) + (1..=sales).map(sale).sum::<f64>())
        }
        "k_factor" => Decoded::Number(100.12),
        "event_counter" => Decoded::Number(SIM_EVENT_COUNTER),
        _ => Decoded::Number(0.0),
    }
}

/// The Modbus service of one simulator listener.
#[derive(Clone)]
pub struct Simulator {
    profile: Arc<Profile>,
    count: u8,
    start: Instant,
}

impl Simulator {
    /// `count` instruments (unit ids 1..=count, at most 247) of `profile`.
    pub fn new(profile: Profile, count: u8) -> Simulator {
        Simulator {
            profile: Arc::new(profile),
            count: count.clamp(1, 247),
            start: Instant::now(),
        }
    }

    /// The register image of one unit now.
    fn image(&self, unit: u8, table: Table) -> HashMap<u16, u16> {
        let t = self.start.elapsed().as_secs_f64();
        let mut image = HashMap::new();
        for def in self.profile.values.iter().filter(|d| d.table == table) {
            let v = model_value(
                self.profile.kind,
                unit,
                def.name.as_str(),
                t,
                &self.profile.model,
            );
            for (i, word) in def.encode(&v).into_iter().enumerate() {
                *image.entry(def.address + i as u16).or_insert(0) |= word;
            }
        }
        image
    }

    fn answer(&self, req: SlaveRequest<'static>) -> Result<Response, ExceptionCode> {
        let unit = req.slave;
        if unit == 0 || unit > self.count {
            return Err(ExceptionCode::GatewayTargetDevice);
        }
        let (table, start, count) = match req.request {
            Request::ReadHoldingRegisters(a, n) => (Table::Holding, a, n),
            Request::ReadInputRegisters(a, n) => (Table::Input, a, n),
            Request::ReadCoils(a, n) => (Table::Coil, a, n),
            Request::ReadDiscreteInputs(a, n) => (Table::Discrete, a, n),
            _ => return Err(ExceptionCode::IllegalFunction),
        };
        let limit = if table.is_bits() { 2000 } else { 125 };
        if count == 0 || count > limit || u32::from(start) + u32::from(count) > 65_536 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        let image = self.image(unit, table);
        let words: Vec<u16> = (start..=start + (count - 1))
            .map(|a| image.get(&a).copied().unwrap_or(0))
            .collect();
        Ok(match table {
            Table::Holding => Response::ReadHoldingRegisters(words),
            Table::Input => Response::ReadInputRegisters(words),
            Table::Coil => Response::ReadCoils(words.into_iter().map(|w| w != 0).collect()),
            Table::Discrete => {
                Response::ReadDiscreteInputs(words.into_iter().map(|w| w != 0).collect())
            }
        })
    }
}

impl Service for Simulator {
    type Request = SlaveRequest<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        ready(self.answer(req))
    }
}

/// Serves `sim` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, sim: Simulator) -> std::io::Result<()> {
    let server = Server::new(listener);
    let on_connected = |stream, addr: SocketAddr| {
        let sim = sim.clone();
        async move { accept_tcp_connection(stream, addr, move |_| Ok(Some(sim.clone()))) }
    };
    server
        .serve(
            &on_connected,
            |e| tracing::debug!(error = %e, "simulator connection ended"),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_cycle_is_plausible() {
        assert_eq!(scale_value(1, "gross_kg", 1.0), Decoded::Number(0.0));
        assert_eq!(scale_value(1, "zero", 1.0), Decoded::Bool(true));
        assert_eq!(scale_value(1, "stable", 7.0), Decoded::Bool(false));
        match scale_value(1, "gross_kg", 10.0) {
            Decoded::Number(x) => assert!((0.2..=12.0).contains(&x), "{x}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(scale_value(1, "zero", 10.0), Decoded::Bool(false));
    }

    #[test]
    fn dispenser_totalizer_advances_by_the_sale() {
        let before = dispenser_value(2, "totalizer_l", 59.0);
        let after = dispenser_value(2, "totalizer_l", 61.0);
        let sale = dispenser_value(2, "sale_l", 61.0);
        match (before, after, sale) {
            (Decoded::Number(b), Decoded::Number(a), Decoded::Number(s)) => {
                assert!((a - b - s).abs() < 1e-6, "{b} {a} {s}")
            }
            other => panic!("{other:?}"),
        }
    }
}
