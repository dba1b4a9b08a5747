//! Polling: one task per line (a TCP endpoint, a serial device server, a serial port), each
//! polling its devices one request at a time on their schedules.
//!
//! Every call runs under the device's timeout. A timeout or transport error drops the line's
//! connection (a late answer would desynchronise the framing) and backs that device off with
//! jitter; the other devices of the line reconnect at once. A Modbus exception is an answer:
//! the values of the refused request are left out, the rest of the poll is published, and
//! the device's health names the values it refuses (`failing_values`); only a poll whose every
//! request was refused yields no reading. A failing device is logged at its 1st, 2nd, 4th,
//! 8th … consecutive failure ([`is_logged`]) and once when it recovers, not at every poll.
//! Lines never wait for each other.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use calwatch_protocol::node::backoff::Backoff;
use calwatch_protocol::{DeviceHealth, DeviceInfo, Id, Reading, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_modbus::client::{rtu, tcp, Context, Reader};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use crate::config::{DeviceConfig, SerialLine, Transport};
use crate::plan::{Read, RequestPlan, Slot};
use crate::profile::{Decoded, Table, ValueDef};
use crate::seq::SeqCounter;

/// What the agent knows of each device, reported in its status message.
#[derive(Debug, Default)]
pub struct FleetHealth {
    pub health: BTreeMap<Id, DeviceHealth>,
    pub info: BTreeMap<Id, DeviceInfo>,
    /// Modbus exception responses (refused requests) per device.
    pub exceptions: BTreeMap<Id, u64>,
    /// Polls that failed on timeout or transport errors, per device.
    pub failures: BTreeMap<Id, u64>,
    /// Readings produced, per device.
    pub readings: BTreeMap<Id, u64>,
    /// Bumped whenever identity data changes, so the status is republished promptly.
    pub identity_changes: u64,
}

/// Shared, briefly locked health table.
pub type SharedHealth = Arc<Mutex<FleetHealth>>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("transport: {0}")]
    Transport(tokio_modbus::Error),
    /// The device (or its gateway) closed the connection instead of answering.
    #[error("connection closed by the device")]
    Closed,
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("modbus exception {0}")]
    Exception(tokio_modbus::ExceptionCode),
    #[error("short response: {got} of {want}")]
    Short { got: usize, want: usize },
}

impl From<tokio_modbus::Error> for PollError {
    /// A peer that closed the connection is called that: tokio-modbus reports the end of a
    /// TCP stream as `io::Error::last_os_error()`, a stale errno ("Operation now in progress
    /// (os error 115)", 0, or 11 EAGAIN), and the end of an RTU stream as a broken pipe.
    fn from(e: tokio_modbus::Error) -> PollError {
        match &e {
            tokio_modbus::Error::Transport(io) if closed_by_peer(io) => PollError::Closed,
            _ => PollError::Transport(e),
        }
    }
}

/// `EINPROGRESS` on Linux: no transport error of a read on an established connection.
const STALE_EINPROGRESS: i32 = 115;

/// Whether a transport error of an established connection means the peer closed it.
fn closed_by_peer(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(e.raw_os_error(), Some(0 | STALE_EINPROGRESS))
        // EAGAIN (11 on Linux): tokio never returns it from a read, only a stale errno does.
        || matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
        )
}

/// Whether the `n`th consecutive failure of a device is logged: the 1st, 2nd, 4th, 8th …,
/// so a device failing for days writes a few dozen lines, not one per poll.
pub fn is_logged(n: u32) -> bool {
    n.is_power_of_two()
}

/// Values of a device polled together on one interval.
struct Group {
    interval: Duration,
    values: Vec<ValueDef>,
    plan: RequestPlan,
}

/// A device's compiled polling program.
struct Program {
    groups: Vec<Group>,
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
        let mut by_interval: BTreeMap<Duration, Vec<ValueDef>> = BTreeMap::new();
        for v in readings {
            let every = dev
                .value_intervals
                .get(&v.name)
                .copied()
                .unwrap_or(dev.interval);
            by_interval.entry(every).or_default().push(v);
        }
        let groups = by_interval
            .into_iter()
            .map(|(interval, values)| {
                let plan = RequestPlan::new(&values.iter().collect::<Vec<_>>(), dev.max_gap);
                Group {
                    interval,
                    values,
                    plan,
                }
            })
            .collect();
        let identity_plan = RequestPlan::new(&identity.iter().collect::<Vec<_>>(), dev.max_gap);
        Program {
            groups,
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
        Ok(Err(e)) => Err(PollError::from(e)),
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

/// What the device answered to a plan's reads.
struct Answer {
    /// Per value: decoded, or `None` when the device refused the read holding it.
    values: Vec<Option<Decoded>>,
    /// The exception of each refused read.
    refusals: Vec<ExceptionCode>,
}

impl Answer {
    /// Every read of the plan was refused: nothing was read.
    fn nothing(&self, plan: &RequestPlan) -> bool {
        self.refusals.len() >= plan.reads.len()
    }
}

/// Runs a plan's reads; a refused read (a Modbus exception) costs its own values only,
/// any other error ends the poll.
async fn run_plan(
    ctx: &mut Context,
    plan: &RequestPlan,
    values: &[ValueDef],
    limit: Duration,
    delay: Duration,
) -> Result<Answer, PollError> {
    let mut results = Vec::with_capacity(plan.reads.len());
    let mut refusals = Vec::new();
    for read in &plan.reads {
        let r = execute(ctx, read, limit).await;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match r {
            Ok(words) => results.push(Some(words)),
            Err(PollError::Exception(code)) => {
                refusals.push(code);
                results.push(None);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Answer {
        values: decode_answered(plan, values, &results)?,
        refusals,
    })
}

/// The values of `plan` from its reads' results (one per read, registers or one word per
/// bit): what a device answered, so a result shorter than its read, or a missing one, is
/// an error, never a panic.
pub fn decode_results(
    plan: &RequestPlan,
    values: &[ValueDef],
    results: &[Vec<u16>],
) -> Result<Vec<Decoded>, PollError> {
    values
        .iter()
        .zip(&plan.slots)
        .map(|(def, slot)| decode_slot(def, slot, results.get(slot.read).map(Vec::as_slice)))
        .collect()
}

/// Like [`decode_results`] where some reads were refused (`None`): their values are `None`.
pub fn decode_answered(
    plan: &RequestPlan,
    values: &[ValueDef],
    results: &[Option<Vec<u16>>],
) -> Result<Vec<Option<Decoded>>, PollError> {
    values
        .iter()
        .zip(&plan.slots)
        .map(|(def, slot)| match results.get(slot.read) {
            Some(None) => Ok(None),
            Some(Some(words)) => decode_slot(def, slot, Some(words)).map(Some),
            None => decode_slot(def, slot, None).map(Some),
        })
        .collect()
}

/// One value from the result of its read (`None`: no result for that read).
fn decode_slot(def: &ValueDef, slot: &Slot, words: Option<&[u16]>) -> Result<Decoded, PollError> {
    let start = usize::from(slot.offset);
    let end = start + usize::from(def.len);
    let words = words.ok_or(PollError::Short { got: 0, want: end })?;
    words
        .get(start..end)
        .map(|regs| def.decode(regs))
        .ok_or(PollError::Short {
            got: words.len(),
            want: end,
        })
}

async fn connect(transport: &Transport, limit: Duration) -> Result<Context, PollError> {
    let resolve = |address: &str| {
        let address = address.to_string();
        async move {
            tokio::net::lookup_host(&address)
                .await
                .map_err(PollError::Connect)?
                .next()
                .ok_or_else(|| {
                    PollError::Connect(std::io::Error::other(format!("{address}: no address")))
                })
        }
    };
    let attempt = async {
        match transport {
            Transport::Tcp(a) => tcp::connect_slave(resolve(a).await?, Slave(1))
                .await
                .map_err(PollError::Connect),
            Transport::RtuOverTcp(a) => {
                let stream = tokio::net::TcpStream::connect(resolve(a).await?)
                    .await
                    .map_err(PollError::Connect)?;
                let _ = stream.set_nodelay(true);
                Ok(rtu::attach_slave(stream, Slave(1)))
            }
            Transport::Serial(line) => Ok(rtu::attach_slave(open_serial(line)?, Slave(1))),
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .map_err(|_| PollError::Timeout(limit))?
}

fn open_serial(line: &SerialLine) -> Result<tokio_serial::SerialStream, PollError> {
    use tokio_serial::{DataBits, Parity, SerialPortBuilderExt, StopBits};
    tokio_serial::new(&line.path, line.baud)
        .parity(match line.parity {
            'E' => Parity::Even,
            'O' => Parity::Odd,
            _ => Parity::None,
        })
        .data_bits(match line.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            _ => DataBits::Eight,
        })
        .stop_bits(if line.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        })
        .open_native_async()
        .map_err(|e| PollError::Connect(std::io::Error::other(format!("{}: {e}", line.path))))
}

/// A device on a line, with what survives between polls.
struct DeviceRun {
    cfg: DeviceConfig,
    /// Shared by the devices of a line with the same profile and intervals.
    program: Arc<Program>,
    seq: SeqCounter,
    /// Failed polls in a row (unreachable, or every request refused): the health's
    /// `consecutive_failures` and the reconnect backoff.
    failures: u32,
    /// Polls in a row that failed on the transport (logged by [`is_logged`]).
    unreachable: u32,
    /// Values the device refused at their last poll (identity values included).
    refused: BTreeSet<Id>,
    /// Polls in a row with values refused (logged by [`is_logged`]).
    refusing: u32,
    /// Identity strings read on this connection already.
    identified: bool,
}

impl DeviceRun {
    /// Takes in which of the values `asked` were `refused` in a poll; logs a change, the
    /// 1st, 2nd, 4th … poll with refused values, and once when all are answered again.
    fn note_refusals(
        &mut self,
        asked: &[Id],
        refused: &[Id],
        codes: &[ExceptionCode],
        nothing: bool,
    ) {
        let id = &self.cfg.id;
        let before = self.refused.len();
        let mut changed = false;
        self.refused.retain(|n| {
            let keep = !asked.contains(n) || refused.contains(n);
            changed |= !keep;
            keep
        });
        for n in refused {
            changed |= self.refused.insert(n.clone());
        }
        if self.refused.is_empty() {
            if before > 0 {
                tracing::info!(device = %id, "device answers every value again");
            }
            self.refusing = 0;
            return;
        }
        self.refusing = if changed {
            1
        } else {
            self.refusing.saturating_add(1)
        };
        if !is_logged(self.refusing) {
            return;
        }
        let values = self
            .refused
            .iter()
            .map(Id::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let code = codes.first();
        if nothing {
            tracing::warn!(device = %id, %values, ?code, polls = self.refusing, "modbus exception to every request: no reading");
        } else {
            tracing::warn!(device = %id, %values, ?code, polls = self.refusing, "modbus exception: these values are left out of the readings, the rest is published");
        }
    }
}

/// Changes to a line's device set (reload).
#[derive(Debug)]
pub enum LineCommand {
    /// The line's devices from now on; unchanged devices keep their schedule and seq.
    Devices(Vec<DeviceConfig>),
}

/// Everything a line needs from the agent.
#[derive(Clone)]
pub struct LineContext {
    pub seq_dir: std::path::PathBuf,
    pub out: mpsc::Sender<Reading>,
    pub health: SharedHealth,
    pub shutdown: watch::Receiver<bool>,
}

/// Polls the devices of one line until shutdown or until its device set becomes empty.
pub async fn run_line(
    transport: Transport,
    devices: Vec<DeviceConfig>,
    mut commands: mpsc::Receiver<LineCommand>,
    mut cx: LineContext,
) {
    let backoff = Backoff {
        min: Duration::from_millis(200),
        max: Duration::from_secs(30),
    };
    let mut runs: HashMap<Id, DeviceRun> = HashMap::new();
    // (due, generation, device, group): a stale entry (older generation) is skipped.
    let mut schedule: BinaryHeap<Reverse<(Instant, u64, Id, usize)>> = BinaryHeap::new();
    let mut generation: HashMap<Id, u64> = HashMap::new();
    let mut next_gen = 0u64;
    apply(
        &devices,
        &mut runs,
        &mut schedule,
        &mut generation,
        &mut next_gen,
        &cx,
    );
    let mut ctx: Option<Context> = None;
    loop {
        if runs.is_empty() {
            break;
        }
        let Some(Reverse((due, _, _, _))) = schedule.peek().cloned() else {
            break;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            cmd = commands.recv() => {
                match cmd {
                    Some(LineCommand::Devices(devs)) => apply(&devs, &mut runs, &mut schedule, &mut generation, &mut next_gen, &cx),
                    None => break,
                }
                continue;
            }
            _ = cx.shutdown.changed() => break,
        }
        if *cx.shutdown.borrow() {
            break;
        }
        let Some(Reverse((due, gen, id, group))) = schedule.pop() else {
            continue;
        };
        if generation.get(&id) != Some(&gen) {
            continue;
        }
        let Some(run) = runs.get_mut(&id) else {
            continue;
        };
        let interval = run.program.groups[group].interval;
        let ts = now_ms();
        let result = poll_once(&transport, &mut ctx, run, group, &cx.health).await;
        let next = match result {
            Ok(polled) => {
                if run.unreachable > 0 {
                    tracing::info!(device = %id, failed_polls = run.unreachable, "device reachable again");
                    run.unreachable = 0;
                }
                run.note_refusals(
                    &polled.asked,
                    &polled.refused,
                    &polled.refusals,
                    polled.nothing,
                );
                let refusals = polled.refusals.len() as u64;
                let count_refusals = |h: &mut FleetHealth| {
                    if refusals > 0 {
                        *h.exceptions.entry(id.clone()).or_default() += refusals;
                    }
                };
                if polled.nothing {
                    // The device answered, but not one value: a failed poll, on schedule.
                    run.failures = run.failures.saturating_add(1);
                    record(
                        &cx.health,
                        &id,
                        None,
                        run.failures,
                        &run.refused,
                        count_refusals,
                    );
                } else {
                    run.failures = 0;
                    let values = to_values(&run.program.groups[group].values, polled.values);
                    match run.seq.take() {
                        Ok(seq) => {
                            record(&cx.health, &id, Some(ts), 0, &run.refused, |h| {
                                *h.readings.entry(id.clone()).or_default() += 1;
                                count_refusals(h);
                            });
                            let reading = Reading {
                                device: id.clone(),
                                seq,
                                ts,
                                values,
                            };
                            if cx.out.send(reading).await.is_err() {
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::error!(device = %id, error = %e, "cannot persist sequence number; reading held back")
                        }
                    }
                }
                (due + interval).max(Instant::now())
            }
            Err(e) => {
                run.failures = run.failures.saturating_add(1);
                run.unreachable = run.unreachable.saturating_add(1);
                record(&cx.health, &id, None, run.failures, &run.refused, |h| {
                    *h.failures.entry(id.clone()).or_default() += 1
                });
                let (failures, unreachable) = (run.failures, run.unreachable);
                ctx = None;
                for r in runs.values_mut() {
                    r.identified = false;
                }
                let wait = backoff.delay(failures - 1).max(interval);
                if is_logged(unreachable) {
                    tracing::warn!(device = %id, line = %transport, error = %e, retry_in = ?wait, failed_polls = unreachable, "device unreachable");
                }
                Instant::now() + wait
            }
        };
        schedule.push(Reverse((next, gen, id, group)));
    }
    for (id, run) in runs {
        if let Err(e) = run.seq.close() {
            tracing::error!(device = %id, error = %e, "cannot store sequence number");
        }
    }
}

/// One poll of a group of values: what the device answered and what it refused.
struct Polled {
    /// Per value of the group: decoded, or `None` when refused.
    values: Vec<Option<Decoded>>,
    /// The exception of each refused read, identity reads included.
    refusals: Vec<ExceptionCode>,
    /// Every read of the group was refused.
    nothing: bool,
    /// The values this poll read (the group's, and the identity values when read).
    asked: Vec<Id>,
    /// Those of them the device refused.
    refused: Vec<Id>,
}

async fn poll_once(
    transport: &Transport,
    ctx: &mut Option<Context>,
    run: &mut DeviceRun,
    group: usize,
    health: &SharedHealth,
) -> Result<Polled, PollError> {
    let timeout = run.cfg.timeout;
    if ctx.is_none() {
        *ctx = Some(connect(transport, timeout).await?);
    }
    let Some(c) = ctx.as_mut() else {
        return Err(PollError::Connect(std::io::Error::other("not connected")));
    };
    c.set_slave(Slave(run.cfg.unit));
    let mut polled = Polled {
        values: Vec::new(),
        refusals: Vec::new(),
        nothing: false,
        asked: Vec::new(),
        refused: Vec::new(),
    };
    let take = |polled: &mut Polled, defs: &[ValueDef], answer: &Answer| {
        for (def, v) in defs.iter().zip(&answer.values) {
            polled.asked.push(def.name.clone());
            if v.is_none() {
                polled.refused.push(def.name.clone());
            }
        }
        polled.refusals.extend_from_slice(&answer.refusals);
    };
    if !run.identified && !run.program.identity.is_empty() {
        let answer = run_plan(
            c,
            &run.program.identity_plan,
            &run.program.identity,
            timeout,
            run.cfg.delay,
        )
        .await?;
        // Refused identity values are simply absent; they are not asked again until the
        // next connection.
        run.identified = true;
        take(&mut polled, &run.program.identity, &answer);
        record_identity(
            health,
            &run.cfg.id,
            &run.program.identity,
            answer.values,
            run.cfg.profile.wrap(),
        );
    }
    let g = &run.program.groups[group];
    let answer = run_plan(c, &g.plan, &g.values, timeout, run.cfg.delay).await?;
    take(&mut polled, &g.values, &answer);
    polled.nothing = answer.nothing(&g.plan);
    polled.values = answer.values;
    Ok(polled)
}

/// Stores the identity strings (`model`, `serial`) reported in the agent status, with the
/// profile's `wrap`.
fn record_identity(
    health: &SharedHealth,
    id: &Id,
    defs: &[ValueDef],
    decoded: Vec<Option<Decoded>>,
    wrap: Option<f64>,
) {
    let mut info = DeviceInfo {
        wrap,
        ..DeviceInfo::default()
    };
    for (def, d) in defs.iter().zip(decoded) {
        if let Some(Decoded::Text(t)) = d {
            match def.name.as_str() {
                "model" => info.model = Some(t),
                "serial" => info.serial = Some(t),
                _ => {}
            }
        }
    }
    if let Ok(mut h) = health.lock() {
        if h.info.get(id) != Some(&info) {
            h.info.insert(id.clone(), info);
            h.identity_changes += 1;
        }
    }
}

/// Reports the profile's `wrap` for a device (also one without identity strings).
fn record_wrap(health: &SharedHealth, id: &Id, wrap: Option<f64>) {
    if let Ok(mut h) = health.lock() {
        let changed = match h.info.get_mut(id) {
            Some(info) if info.wrap != wrap => {
                info.wrap = wrap;
                true
            }
            Some(_) => false,
            None if wrap.is_some() => {
                h.info.insert(
                    id.clone(),
                    DeviceInfo {
                        wrap,
                        ..DeviceInfo::default()
                    },
                );
                true
            }
            None => false,
        };
        if changed {
            h.identity_changes += 1;
        }
    }
}

fn to_values(defs: &[ValueDef], decoded: Vec<Option<Decoded>>) -> Vec<(Id, Value)> {
    defs.iter()
        .zip(decoded)
        .filter_map(|(def, d)| match d? {
            Decoded::Number(x) if x.is_finite() && def.omit_when != Some(x) => {
                Some((def.name.clone(), Value::Number(x)))
            }
            Decoded::Bool(b) => Some((def.name.clone(), Value::Bool(b))),
            _ => None,
        })
        .collect()
}

/// Applies a device set to a line: keeps unchanged devices as they are.
fn apply(
    devices: &[DeviceConfig],
    runs: &mut HashMap<Id, DeviceRun>,
    schedule: &mut BinaryHeap<Reverse<(Instant, u64, Id, usize)>>,
    generation: &mut HashMap<Id, u64>,
    next_gen: &mut u64,
    cx: &LineContext,
) {
    let wanted: HashMap<&Id, &DeviceConfig> = devices.iter().map(|d| (&d.id, d)).collect();
    let gone: Vec<Id> = runs
        .keys()
        .filter(|id| !wanted.contains_key(id))
        .cloned()
        .collect();
    for id in gone {
        generation.remove(&id);
        if let Some(run) = runs.remove(&id) {
            tracing::info!(device = %id, "device removed");
            if let Err(e) = run.seq.close() {
                tracing::error!(device = %id, error = %e, "cannot store sequence number");
            }
        }
    }
    type ProgramKey = (usize, Duration, u16, BTreeMap<Id, Duration>);
    let mut programs: HashMap<ProgramKey, Arc<Program>> = runs
        .values()
        .map(|r| {
            (
                (
                    Arc::as_ptr(&r.cfg.profile) as usize,
                    r.cfg.interval,
                    r.cfg.max_gap,
                    r.cfg.value_intervals.clone(),
                ),
                Arc::clone(&r.program),
            )
        })
        .collect();
    // Spread first polls over the interval so a thousand devices do not fire at once.
    let spread = |i: usize, n: usize, every: Duration| every.mul_f64(i as f64 / n.max(1) as f64);
    for (i, dev) in devices.iter().enumerate() {
        if runs.get(&dev.id).is_some_and(|r| &r.cfg == dev) {
            continue;
        }
        let seq = match runs.remove(&dev.id) {
            Some(old) => old.seq,
            None => match SeqCounter::open(&cx.seq_dir, &dev.id) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(device = %dev.id, error = %e, "cannot open sequence state; device not polled");
                    continue;
                }
            },
        };
        *next_gen += 1;
        generation.insert(dev.id.clone(), *next_gen);
        let key = (
            Arc::as_ptr(&dev.profile) as usize,
            dev.interval,
            dev.max_gap,
            dev.value_intervals.clone(),
        );
        let program = Arc::clone(
            programs
                .entry(key)
                .or_insert_with(|| Arc::new(Program::new(dev))),
        );
        let start = Instant::now();
        for (g, group) in program.groups.iter().enumerate() {
            schedule.push(Reverse((
                start + spread(i, devices.len(), group.interval.min(dev.interval)),
                *next_gen,
                dev.id.clone(),
                g,
            )));
        }
        record_wrap(&cx.health, &dev.id, dev.profile.wrap());
        runs.insert(
            dev.id.clone(),
            DeviceRun {
                cfg: dev.clone(),
                program,
                seq,
                failures: 0,
                unreachable: 0,
                refused: BTreeSet::new(),
                refusing: 0,
                identified: false,
            },
        );
    }
}

fn record(
    health: &SharedHealth,
    id: &Id,
    last_ok: Option<i64>,
    failures: u32,
    failing: &BTreeSet<Id>,
    extra: impl FnOnce(&mut FleetHealth),
) {
    if let Ok(mut h) = health.lock() {
        let entry = h.health.entry(id.clone()).or_default();
        if last_ok.is_some() {
            entry.last_ok = last_ok;
        }
        entry.consecutive_failures = u64::from(failures);
        if !entry.failing_values.iter().eq(failing) {
            entry.failing_values = failing.iter().cloned().collect();
        }
        extra(&mut h);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_closing_the_connection_is_called_that() {
        // What tokio-modbus's TCP client reports when the stream ends: the errno left over.
        for errno in [115, 0, 11] {
            let e = PollError::from(tokio_modbus::Error::Transport(
                std::io::Error::from_raw_os_error(errno),
            ));
            assert_eq!(e.to_string(), "connection closed by the device", "{errno}");
        }
        // Its RTU client: a broken pipe.
        let e = PollError::from(tokio_modbus::Error::Transport(std::io::Error::from(
            std::io::ErrorKind::BrokenPipe,
        )));
        assert_eq!(e.to_string(), "connection closed by the device");
        // Other errors keep their words.
        let e = PollError::from(tokio_modbus::Error::Transport(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(e.to_string().starts_with("transport: "), "{e}");
    }

    #[test]
    fn failures_are_logged_at_powers_of_two() {
        let logged: Vec<u32> = (1..=300).filter(|&n| is_logged(n)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64, 128, 256]);
        assert!(!is_logged(0));
    }

    #[test]
    fn a_refused_read_leaves_out_its_values_only() {
        let text = "kind = \"other\"\nmodel = \"m\"\n\
            [[value]]\nname = \"a\"\ntable = \"input\"\naddress = 0\ntype = \"u16\"\n\
            [[value]]\nname = \"b\"\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\n";
        let p = crate::profile::Profile::parse(std::path::Path::new("p.toml"), text).unwrap();
        let plan = RequestPlan::new(&p.values.iter().collect::<Vec<_>>(), 8);
        assert_eq!(plan.reads.len(), 2);
        let holding = plan
            .reads
            .iter()
            .position(|r| r.table == Table::Holding)
            .unwrap();
        let mut results = vec![Some(vec![7]), Some(vec![7])];
        results[holding] = None;
        let decoded = decode_answered(&plan, &p.values, &results).unwrap();
        assert_eq!(decoded, [Some(Decoded::Number(7.0)), None]);
        assert_eq!(
            to_values(&p.values, decoded),
            [(Id::new("a").unwrap(), Value::Number(7.0))]
        );
        // A missing result is still an error, never a panic.
        assert!(decode_answered(&plan, &p.values, &results[..1]).is_err());
    }
}
