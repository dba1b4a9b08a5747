//! Polling one device: connect, read the plan on every interval, decode, hand readings on.
//!
//! Every call runs under the device's timeout. A timeout or transport error drops the
//! connection and reconnects with backoff; a Modbus exception is counted and skips that
//! poll only. One device never holds up another: each runs on its own task.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use calwatch_protocol::{DeviceHealth, DeviceInfo, Id, Reading, Value};
use tokio::sync::{mpsc, watch};
use tokio_modbus::client::{tcp, Context, Reader};
use tokio_modbus::Slave;

use crate::backoff::Backoff;
use crate::config::{DeviceConfig, Transport};
use crate::plan::{Read, RequestPlan};
use crate::profile::{Decoded, Table, ValueDef};
use crate::seq::SeqCounter;

/// What the agent knows of each device, reported in its status message.
#[derive(Debug, Default)]
pub struct FleetHealth {
    pub health: BTreeMap<Id, DeviceHealth>,
    pub info: BTreeMap<Id, DeviceInfo>,
    /// Modbus exception responses per device.
    pub exceptions: BTreeMap<Id, u64>,
}

/// Shared, cheaply locked health table.
pub type SharedHealth = Arc<Mutex<FleetHealth>>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("transport: {0}")]
    Transport(#[from] tokio_modbus::Error),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("modbus exception {0}")]
    Exception(tokio_modbus::ExceptionCode),
    #[error("short response: {got} of {want}")]
    Short { got: usize, want: usize },
}

/// A device's compiled polling program.
struct Program {
    readings: Vec<ValueDef>,
    plan: RequestPlan,
    identity: Vec<ValueDef>,
    identity_plan: RequestPlan,
}

impl Program {
    fn new(dev: &DeviceConfig) -> Program {
        let (identity, readings): (Vec<ValueDef>, Vec<ValueDef>) = dev
            .profile
            .values
            .iter()
            .cloned()
            .partition(|v| v.is_identity());
        let plan = RequestPlan::new(&readings.iter().collect::<Vec<_>>(), dev.max_gap);
        let identity_plan = RequestPlan::new(&identity.iter().collect::<Vec<_>>(), dev.max_gap);
        Program {
            readings,
            plan,
            identity,
            identity_plan,
        }
    }
}

async fn timed<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = tokio_modbus::Result<T>>,
) -> Result<T, PollError> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(PollError::Timeout(limit)),
        Ok(Err(e)) => Err(PollError::Transport(e)),
        Ok(Ok(Err(code))) => Err(PollError::Exception(code)),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

async fn execute(ctx: &mut Context, read: &Read, limit: Duration) -> Result<Vec<u16>, PollError> {
    let words = match read.table {
        Table::Holding => timed(limit, ctx.read_holding_registers(read.start, read.count)).await?,
        Table::Input => timed(limit, ctx.read_input_registers(read.start, read.count)).await?,
        Table::Coil => bits(timed(limit, ctx.read_coils(read.start, read.count)).await?),
        Table::Discrete => {
            bits(timed(limit, ctx.read_discrete_inputs(read.start, read.count)).await?)
        }
    };
    if words.len() < usize::from(read.count) {
        return Err(PollError::Short {
            got: words.len(),
            want: usize::from(read.count),
        });
    }
    Ok(words)
}

fn bits(b: Vec<bool>) -> Vec<u16> {
    b.into_iter().map(u16::from).collect()
}

async fn run_plan(
    ctx: &mut Context,
    plan: &RequestPlan,
    values: &[ValueDef],
    limit: Duration,
) -> Result<Vec<Decoded>, PollError> {
    let mut results = Vec::with_capacity(plan.reads.len());
    for read in &plan.reads {
        results.push(execute(ctx, read, limit).await?);
    }
    Ok(values
        .iter()
        .zip(&plan.slots)
        .map(|(def, slot)| {
            let start = usize::from(slot.offset);
            def.decode(&results[slot.read][start..start + usize::from(def.len)])
        })
        .collect())
}

/// Polls `dev` until `shutdown` turns true, sending each reading to `out`.
pub async fn run_device(
    dev: DeviceConfig,
    mut seq: SeqCounter,
    out: mpsc::Sender<Reading>,
    health: SharedHealth,
    mut shutdown: watch::Receiver<bool>,
) {
    let program = Program::new(&dev);
    let backoff = Backoff {
        min: Duration::from_millis(200),
        max: Duration::from_secs(30),
    };
    let Transport::Tcp(address) = &dev.transport;
    let mut failures: u32 = 0;
    let mut ctx: Option<Context> = None;
    let mut ticker = tokio::time::interval(dev.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        let ts = now_ms();
        let result = async {
            if ctx.is_none() {
                let c = connect(address, dev.unit, dev.timeout).await?;
                ctx = Some(c);
                if let Some(c) = ctx.as_mut() {
                    if !program.identity.is_empty() {
                        let info =
                            run_plan(c, &program.identity_plan, &program.identity, dev.timeout)
                                .await?;
                        record_identity(&health, &dev.id, &program.identity, info);
                    }
                }
            }
            match ctx.as_mut() {
                Some(c) => run_plan(c, &program.plan, &program.readings, dev.timeout).await,
                None => Ok(Vec::new()),
            }
        }
        .await;
        match result {
            Ok(decoded) => {
                failures = 0;
                let values: Vec<(Id, Value)> = program
                    .readings
                    .iter()
                    .zip(decoded)
                    .filter_map(|(def, d)| match d {
                        Decoded::Number(x) if x.is_finite() => {
                            Some((def.name.clone(), Value::Number(x)))
                        }
                        Decoded::Bool(b) => Some((def.name.clone(), Value::Bool(b))),
                        _ => None,
                    })
                    .collect();
                let seq = match seq.take() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(device = %dev.id, error = %e, "cannot persist sequence number; reading held back");
                        continue;
                    }
                };
                set_health(&health, &dev.id, Some(ts), 0);
                let reading = Reading {
                    device: dev.id.clone(),
                    seq,
                    ts,
                    values,
                };
                if out.send(reading).await.is_err() {
                    break;
                }
            }
            Err(PollError::Exception(code)) => {
                // The device answered: the connection is fine, this poll is not.
                tracing::warn!(device = %dev.id, ?code, "modbus exception");
                if let Ok(mut h) = health.lock() {
                    *h.exceptions.entry(dev.id.clone()).or_default() += 1;
                }
                failures = failures.saturating_add(1);
                set_health(&health, &dev.id, None, failures);
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                set_health(&health, &dev.id, None, failures);
                ctx = None;
                let wait = backoff.delay(failures - 1);
                tracing::warn!(device = %dev.id, %address, error = %e, retry_in = ?wait, "device unreachable");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => break,
                }
                ticker.reset();
            }
        }
    }
    if let Err(e) = seq.close() {
        tracing::error!(device = %dev.id, error = %e, "cannot store sequence number");
    }
}

async fn connect(address: &str, unit: u8, limit: Duration) -> Result<Context, PollError> {
    let addr = tokio::time::timeout(limit, tokio::net::lookup_host(address))
        .await
        .map_err(|_| PollError::Timeout(limit))?
        .map_err(PollError::Connect)?
        .next()
        .ok_or_else(|| PollError::Connect(std::io::Error::other("no address")))?;
    let ctx = tokio::time::timeout(limit, tcp::connect_slave(addr, Slave(unit)))
        .await
        .map_err(|_| PollError::Timeout(limit))?
        .map_err(PollError::Connect)?;
    Ok(ctx)
}

fn set_health(health: &SharedHealth, id: &Id, last_ok: Option<i64>, failures: u32) {
    if let Ok(mut h) = health.lock() {
        let entry = h.health.entry(id.clone()).or_insert(DeviceHealth {
            last_ok: None,
            consecutive_failures: 0,
        });
        if last_ok.is_some() {
            entry.last_ok = last_ok;
        }
        entry.consecutive_failures = u64::from(failures);
    }
}

fn record_identity(health: &SharedHealth, id: &Id, defs: &[ValueDef], decoded: Vec<Decoded>) {
    let mut info = DeviceInfo::default();
    for (def, d) in defs.iter().zip(decoded) {
        if let Decoded::Text(t) = d {
            match def.name.as_str() {
                "model" => info.model = Some(t),
                "serial" => info.serial = Some(t),
                _ => {}
            }
        }
    }
    if let Ok(mut h) = health.lock() {
        h.info.insert(id.clone(), info);
    }
}
