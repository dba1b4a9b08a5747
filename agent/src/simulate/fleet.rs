//! Fleet files (`calwatch-agent simulate --fleet FILE`): which instruments to simulate,
//! where they listen, how they behave and which faults they develop.
//!
//! ```toml
//! speed = 1.0                        # simulated seconds per wall-clock second (default 1)
//! seed = 0                           # varies loads and sales between fleets (default 0)
//!
//! [[group]]
//! name = "market-1"                  # optional; shown in the banner
//! profile = "../profiles/ft112.toml" # relative to this file
//! listen = "127.0.0.1:5021"          # groups with the same address share the port
//!                                    # (port 0: a free port, printed in the banner)
//! count = 20                         # instruments, unit ids first_unit.. (default 1)
//! first_unit = 1                     # default 1; at most 247 in all
//! transport = "tcp"                  # tcp | rtu_over_tcp (RTU frames with CRC over TCP)
//! # model options (each applies to the kinds named; elsewhere they are errors):
//! event_counter = 7                  # all: the sealed audit counter at start
//! cycle_s = 20                       # scale: s between customers; dispenser: between sales
//! max_kg = 15.0                      # scale: capacity (Max)
//! e_kg = 0.005                       # scale: verification interval e (display step)
//! check_refs_kg = [2.0, 5.0, 10.0]   # scale: reference masses of the check-weight test
//! check_every_s = 86400              # scale, meter: period of the check test
//! check_for_s = 60                   # scale, meter: how long a check reading is shown
//! check_offset_s = 0                 # scale, meter: first test of the first unit
//! k_factor = 100.12                  # dispenser: pulses per litre
//! sale_min_l = 10.0                  # dispenser: smallest and largest sale
//! sale_max_l = 60.0
//! current_a = 6.0                    # meter: mean current per phase
//!
//! [[group.fault]]                    # a fault of one instrument of the group above
//! unit = 3
//! kind = "drift"                     # see FaultKind
//! at = 120                           # simulated seconds after start (default 0)
//! per_hour_e = 2.0                   # kind-specific keys, see below
//! ```
//!
//! Every problem is a [`ConfigError`] naming the file and line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use calwatch_protocol::node::tomlfile::{self, ConfigError};
use serde::Deserialize;
use toml::Spanned;

use crate::profile::{InstrumentKind, Profile};

/// The framing a simulated port speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimTransport {
    /// Modbus TCP (MBAP header).
    #[default]
    Tcp,
    /// Modbus RTU frames (unit, PDU, CRC-16) carried over a TCP stream, as serial-to-
    /// Ethernet converters in transparent mode do.
    RtuOverTcp,
}

/// Options of an instrument model, defaults filled in for its kind.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelOptions {
    pub event_counter: f64,
    /// Scale: seconds between customers; dispenser: seconds between sales.
    pub cycle_s: f64,
    pub max_kg: f64,
    pub e_kg: f64,
    pub check_refs_kg: Vec<f64>,
    pub check_every_s: f64,
    pub check_for_s: f64,
    pub check_offset_s: f64,
    pub k_factor: f64,
    pub sale_min_l: f64,
    pub sale_max_l: f64,
    pub current_a: f64,
}

/// Sealed audit counter of every simulated instrument unless a fleet says otherwise
/// (matches the sample certificates).
pub const SIM_EVENT_COUNTER: f64 = 7.0;
/// k-factor of every simulated dispenser unless a fleet says otherwise.
pub const SIM_K_FACTOR: f64 = 100.12;

impl ModelOptions {
    /// The defaults for `kind`.
    pub fn for_kind(kind: InstrumentKind) -> ModelOptions {
        ModelOptions {
            event_counter: SIM_EVENT_COUNTER,
            cycle_s: if kind == InstrumentKind::Dispenser {
                30.0
            } else {
                20.0
            },
            max_kg: 15.0,
            e_kg: 0.005,
            check_refs_kg: vec![2.0, 5.0, 10.0],
            check_every_s: 86_400.0,
            check_for_s: 60.0,
            check_offset_s: 0.0,
            k_factor: SIM_K_FACTOR,
            sale_min_l: 10.0,
            sale_max_l: 60.0,
            current_a: 6.0,
        }
    }
}

/// Fault kinds of a fleet file (`kind = "..."` of a `[[group.fault]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Drift,
    Step,
    SealChange,
    KFactorChange,
    Cheating,
    TotalizerMismatch,
    Rollback,
    Silent,
    Slow,
    Garbage,
    Exception,
}

/// How a `garbage` fault mangles a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GarbageMode {
    /// A well-framed response whose byte count disagrees with its data.
    #[default]
    ByteCount,
    /// A well-framed response carrying random bytes under an unassigned function code.
    RandomPdu,
    /// Random bytes with no valid framing at all.
    Noise,
}

/// The size of an error: in verification intervals e (scales) or percent of the reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ErrorSize {
    E(f64),
    Pct(f64),
}

/// What a fault does once active.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FaultEffect {
    /// Measurement error growing by this much per hour.
    Drift(ErrorSize),
    /// A sudden measurement error of this size.
    Step(ErrorSize),
    /// The audit event counter goes up by this much.
    SealChange { by: f64 },
    /// The dispenser's k-factor becomes this value.
    KFactorChange { value: f64 },
    /// Every sale's display exceeds the encoder by this percentage.
    Cheating { pct: f64 },
    /// The totalizer advances by this many litres more than the sale, once.
    TotalizerMismatch { litres: f64 },
    /// The totalizer (L) or energy register (kWh) drops by this much.
    Rollback { amount: f64 },
    /// Requests get no answer at all.
    Silent,
    /// Answers come after this delay.
    Slow { delay: Duration },
    /// Answers are malformed.
    Garbage { mode: GarbageMode },
    /// Answers are this Modbus exception code.
    Exception { code: u8 },
}

impl FaultEffect {
    /// Transport faults act on the wire and may end (`until`); the others change values.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            FaultEffect::Silent
                | FaultEffect::Slow { .. }
                | FaultEffect::Garbage { .. }
                | FaultEffect::Exception { .. }
        )
    }
}

/// A fault of one instrument, active from `at` (until `until`, transport faults only),
/// both in simulated seconds since the simulator started.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    pub unit: u8,
    pub at: f64,
    pub until: Option<f64>,
    pub effect: FaultEffect,
}

impl Fault {
    /// Whether the fault is in force at simulated time `t`.
    pub fn active(&self, t: f64) -> bool {
        t >= self.at && self.until.is_none_or(|u| t < u)
    }
}

/// Instruments of one profile on one address.
#[derive(Clone, Debug)]
pub struct Group {
    pub name: Option<String>,
    pub profile: Arc<Profile>,
    pub listen: SocketAddr,
    pub transport: SimTransport,
    pub first_unit: u8,
    pub count: u8,
    pub options: ModelOptions,
    pub faults: Vec<Fault>,
}

impl Group {
    /// The unit ids of this group.
    pub fn units(&self) -> std::ops::RangeInclusive<u8> {
        self.first_unit..=self.last_unit()
    }

    pub fn last_unit(&self) -> u8 {
        self.first_unit + (self.count - 1)
    }

    /// Groups with the same address share a listener (port 0 too: one ephemeral port).
    fn shares_with(&self, other: &Group) -> bool {
        self.listen == other.listen
    }
}

/// A whole simulated fleet.
#[derive(Clone, Debug)]
pub struct Fleet {
    /// The fleet file, when the fleet came from one.
    pub file: Option<PathBuf>,
    /// Simulated seconds per wall-clock second.
    pub speed: f64,
    pub seed: u64,
    pub groups: Vec<Group>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    speed: Option<f64>,
    seed: Option<u64>,
    #[serde(default)]
    group: Vec<Spanned<RawGroup>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: Option<String>,
    profile: PathBuf,
    listen: String,
    count: Option<u32>,
    first_unit: Option<u32>,
    #[serde(default)]
    transport: SimTransport,
    event_counter: Option<u32>,
    cycle_s: Option<f64>,
    max_kg: Option<f64>,
    e_kg: Option<f64>,
    check_refs_kg: Option<Vec<f64>>,
    check_every_s: Option<f64>,
    check_for_s: Option<f64>,
    check_offset_s: Option<f64>,
    k_factor: Option<f64>,
    sale_min_l: Option<f64>,
    sale_max_l: Option<f64>,
    current_a: Option<f64>,
    #[serde(default)]
    fault: Vec<Spanned<RawFault>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    unit: u32,
    kind: FaultKind,
    at: Option<f64>,
    until: Option<f64>,
    per_hour_e: Option<f64>,
    per_hour_pct: Option<f64>,
    error_e: Option<f64>,
    error_pct: Option<f64>,
    by: Option<u32>,
    value: Option<f64>,
    pct: Option<f64>,
    litres: Option<f64>,
    amount: Option<f64>,
    delay_ms: Option<u64>,
    mode: Option<GarbageMode>,
    code: Option<u8>,
}

impl RawFault {
    /// The kind-specific keys that are set, by name.
    fn keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut note = |set: bool, name: &'static str| {
            if set {
                keys.push(name);
            }
        };
        note(self.per_hour_e.is_some(), "per_hour_e");
        note(self.per_hour_pct.is_some(), "per_hour_pct");
        note(self.error_e.is_some(), "error_e");
        note(self.error_pct.is_some(), "error_pct");
        note(self.by.is_some(), "by");
        note(self.value.is_some(), "value");
        note(self.pct.is_some(), "pct");
        note(self.litres.is_some(), "litres");
        note(self.amount.is_some(), "amount");
        note(self.delay_ms.is_some(), "delay_ms");
        note(self.mode.is_some(), "mode");
        note(self.code.is_some(), "code");
        note(self.until.is_some(), "until");
        keys
    }
}

fn kind_name(kind: InstrumentKind) -> &'static str {
    match kind {
        InstrumentKind::Scale => "scale",
        InstrumentKind::Dispenser => "dispenser",
        InstrumentKind::EnergyMeter => "energy_meter",
        InstrumentKind::Other => "other",
    }
}

fn fault_name(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Drift => "drift",
        FaultKind::Step => "step",
        FaultKind::SealChange => "seal_change",
        FaultKind::KFactorChange => "k_factor_change",
        FaultKind::Cheating => "cheating",
        FaultKind::TotalizerMismatch => "totalizer_mismatch",
        FaultKind::Rollback => "rollback",
        FaultKind::Silent => "silent",
        FaultKind::Slow => "slow",
        FaultKind::Garbage => "garbage",
        FaultKind::Exception => "exception",
    }
}

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

impl Fleet {
    /// One group: `count` instruments of `profile` on `listen`, unit ids 1..=count, no
    /// faults (what `simulate --profile` serves).
    pub fn single(profile: Profile, listen: SocketAddr, count: u8) -> Fleet {
        let options = ModelOptions::for_kind(profile.kind);
        Fleet {
            file: None,
            speed: 1.0,
            seed: 0,
            groups: vec![Group {
                name: None,
                profile: Arc::new(profile),
                listen,
                transport: SimTransport::Tcp,
                first_unit: 1,
                count: count.clamp(1, 247),
                options,
                faults: Vec::new(),
            }],
        }
    }

    /// Loads and validates a fleet file and the profiles it names.
    pub fn load(path: &Path) -> Result<Fleet, ConfigError> {
        let (raw, text): (RawFleet, String) = tomlfile::load(path)?;
        Self::from_raw(path, &text, raw)
    }

    /// Parses and validates fleet text that came from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Fleet, ConfigError> {
        let raw: RawFleet = tomlfile::parse(path, text)?;
        Self::from_raw(path, text, raw)
    }

    /// Serves every group on `listen` instead of its own address (their unit ids must
    /// not overlap): lets a test run a fixed fleet file on a port it picked.
    pub fn listen_all_on(&mut self, listen: SocketAddr) -> Result<(), ConfigError> {
        for g in &mut self.groups {
            g.listen = listen;
        }
        let file = self.file.clone().unwrap_or_default();
        check_shared_ports(&self.groups, |i, m| {
            ConfigError::whole(&file, format!("--listen {listen}: group {}: {m}", i + 1))
        })
    }

    fn from_raw(path: &Path, text: &str, raw: RawFleet) -> Result<Fleet, ConfigError> {
        let speed = raw.speed.unwrap_or(1.0);
        if !positive(speed) {
            return Err(ConfigError::whole(
                path,
                format!("speed = {speed}: must be a positive number"),
            ));
        }
        if raw.group.is_empty() {
            return Err(ConfigError::whole(
                path,
                "no [[group]]: a fleet needs at least one group of instruments",
            ));
        }
        let mut groups = Vec::with_capacity(raw.group.len());
        let mut group_lines = Vec::with_capacity(raw.group.len());
        for spanned in raw.group {
            let offset = spanned.span().start;
            group_lines.push(offset);
            groups.push(parse_group(path, text, offset, spanned.into_inner())?);
        }
        check_shared_ports(&groups, |i, m| {
            ConfigError::at_offset(path, text, group_lines[i], m)
        })?;
        Ok(Fleet {
            file: Some(path.to_path_buf()),
            speed,
            seed: raw.seed.unwrap_or(0),
            groups,
        })
    }
}

/// Groups on one port must agree on the framing and not share unit ids.
fn check_shared_ports(
    groups: &[Group],
    err: impl Fn(usize, String) -> ConfigError,
) -> Result<(), ConfigError> {
    for (i, g) in groups.iter().enumerate() {
        for other in groups[..i].iter().filter(|o| o.shares_with(g)) {
            if other.transport != g.transport {
                return Err(err(
                    i,
                    format!(
                        "listen {}: another group on this address uses transport {:?}",
                        g.listen, other.transport
                    ),
                ));
            }
            if g.first_unit <= other.last_unit() && other.first_unit <= g.last_unit() {
                return Err(err(
                    i,
                    format!(
                        "listen {}: unit ids {}..={} overlap {}..={} of another group on this address",
                        g.listen,
                        g.first_unit,
                        g.last_unit(),
                        other.first_unit,
                        other.last_unit()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn parse_group(
    path: &Path,
    text: &str,
    offset: usize,
    raw: RawGroup,
) -> Result<Group, ConfigError> {
    let err = |m: String| ConfigError::at_offset(path, text, offset, m);
    let profile_path = tomlfile::resolve(path, &raw.profile);
    // A profile that cannot be read is this line's fault; one that is wrong, its own.
    let profile = Profile::load(&profile_path).map_err(|e| match e.line {
        None => err(format!("profile {}: {}", e.file.display(), e.message)),
        Some(_) => e,
    })?;
    let kind = profile.kind;
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        err(format!(
            "listen {:?}: expected an IP address and port such as 127.0.0.1:5020",
            raw.listen
        ))
    })?;
    let first_unit = raw.first_unit.unwrap_or(1);
    let count = raw.count.unwrap_or(1);
    if !(1..=247).contains(&first_unit) || count == 0 || first_unit.saturating_add(count) - 1 > 247
    {
        return Err(err(format!(
            "first_unit = {first_unit}, count = {count}: unit ids must lie in 1..=247"
        )));
    }

    let mut options = ModelOptions::for_kind(kind);
    let is = |kinds: &[InstrumentKind]| kinds.contains(&kind);
    let scale = [InstrumentKind::Scale];
    let dispenser = [InstrumentKind::Dispenser];
    let meter = [InstrumentKind::EnergyMeter];
    let scale_or_dispenser = [InstrumentKind::Scale, InstrumentKind::Dispenser];
    let checked = [InstrumentKind::Scale, InstrumentKind::EnergyMeter];
    if let Some(c) = raw.event_counter {
        options.event_counter = f64::from(c);
    }
    let option = |name: &str, value: Option<f64>, kinds: &[InstrumentKind], slot: &mut f64| {
        let Some(v) = value else { return Ok(()) };
        if !is(kinds) {
            return Err(err(format!(
                "{name} does not apply to a {} profile ({})",
                kind_name(kind),
                profile_path.display()
            )));
        }
        let ok = if name == "check_offset_s" {
            v.is_finite() && v >= 0.0
        } else {
            positive(v)
        };
        if !ok {
            return Err(err(format!("{name} = {v}: must be a positive number")));
        }
        *slot = v;
        Ok(())
    };
    option(
        "cycle_s",
        raw.cycle_s,
        &scale_or_dispenser,
        &mut options.cycle_s,
    )?;
    option("max_kg", raw.max_kg, &scale, &mut options.max_kg)?;
    option("e_kg", raw.e_kg, &scale, &mut options.e_kg)?;
    option(
        "check_every_s",
        raw.check_every_s,
        &checked,
        &mut options.check_every_s,
    )?;
    option(
        "check_for_s",
        raw.check_for_s,
        &checked,
        &mut options.check_for_s,
    )?;
    option(
        "check_offset_s",
        raw.check_offset_s,
        &checked,
        &mut options.check_offset_s,
    )?;
    option("k_factor", raw.k_factor, &dispenser, &mut options.k_factor)?;
    option(
        "sale_min_l",
        raw.sale_min_l,
        &dispenser,
        &mut options.sale_min_l,
    )?;
    option(
        "sale_max_l",
        raw.sale_max_l,
        &dispenser,
        &mut options.sale_max_l,
    )?;
    option("current_a", raw.current_a, &meter, &mut options.current_a)?;

    if kind == InstrumentKind::Scale {
        let e = options.e_kg;
        if options.max_kg < 20.0 * e {
            return Err(err(format!(
                "max_kg = {} is less than 20 e ({} kg): no scale of a trade class is that small",
                options.max_kg,
                20.0 * e
            )));
        }
        match raw.check_refs_kg {
            Some(refs) => {
                if refs.is_empty() || refs.iter().any(|&r| !positive(r) || r > options.max_kg) {
                    return Err(err(format!(
                        "check_refs_kg = {refs:?}: give one or more masses in (0, max_kg]"
                    )));
                }
                options.check_refs_kg = refs;
            }
            // The retail set {2, 5, 10} kg of a 15 kg scale, scaled to this capacity.
            None => {
                options.check_refs_kg = [2.0, 5.0, 10.0]
                    .iter()
                    .map(|r| (r * options.max_kg / 15.0 / e).round() * e)
                    .collect();
            }
        }
    } else if raw.check_refs_kg.is_some() {
        return Err(err(format!(
            "check_refs_kg does not apply to a {} profile ({})",
            kind_name(kind),
            profile_path.display()
        )));
    }
    if options.check_for_s >= options.check_every_s {
        return Err(err(format!(
            "check_for_s = {} must be shorter than check_every_s = {}",
            options.check_for_s, options.check_every_s
        )));
    }
    if options.sale_min_l > options.sale_max_l {
        return Err(err(format!(
            "sale_min_l = {} is more than sale_max_l = {}",
            options.sale_min_l, options.sale_max_l
        )));
    }

    let units = first_unit as u8..=(first_unit + count - 1) as u8;
    let mut faults = Vec::with_capacity(raw.fault.len());
    for spanned in raw.fault {
        let offset = spanned.span().start;
        let f = spanned.into_inner();
        let ferr = |m: String| ConfigError::at_offset(path, text, offset, m);
        let fault = parse_fault(&profile, f, &units)
            .map_err(|m| ferr(format!("{m} ({})", profile_path.display())))?;
        faults.push(fault);
    }
    Ok(Group {
        name: raw.name,
        profile: Arc::new(profile),
        listen,
        transport: raw.transport,
        first_unit: first_unit as u8,
        count: count as u8,
        options,
        faults,
    })
}

/// The value names a fault acts on, by kind: the profile must map one of them.
fn needs(kind: InstrumentKind, fault: FaultKind) -> Option<&'static [&'static str]> {
    use FaultKind as F;
    use InstrumentKind as K;
    Some(match (kind, fault) {
        (_, F::Silent | F::Slow | F::Garbage | F::Exception) => &[],
        (_, F::SealChange) => &["event_counter"],
        (K::Scale, F::Drift | F::Step) => &["gross_kg", "net_kg"],
        (K::EnergyMeter, F::Drift | F::Step) => &["power_w", "energy_kwh", "check_kwh"],
        (K::Dispenser, F::Drift | F::Step | F::Cheating) => &["sale_l"],
        (K::Dispenser, F::KFactorChange) => &["k_factor"],
        (K::Dispenser, F::TotalizerMismatch | F::Rollback) => &["totalizer_l"],
        (K::EnergyMeter, F::Rollback) => &["energy_kwh", "import_kwh", "total_kwh"],
        _ => return None,
    })
}

fn parse_fault(
    profile: &Profile,
    f: RawFault,
    units: &std::ops::RangeInclusive<u8>,
) -> Result<Fault, String> {
    let kind = profile.kind;
    let name = fault_name(f.kind);
    if f.unit > 247 || !units.contains(&(f.unit as u8)) {
        return Err(format!(
            "fault {name}: unit {} is not in this group (unit ids {}..={})",
            f.unit,
            units.start(),
            units.end()
        ));
    }
    let Some(names) = needs(kind, f.kind) else {
        return Err(format!(
            "fault {name} makes no sense for a {} profile",
            kind_name(kind)
        ));
    };
    if !names.is_empty()
        && !profile
            .values
            .iter()
            .any(|v| names.contains(&v.name.as_str()))
    {
        return Err(format!(
            "fault {name}: the profile has no value {}",
            names.join(" or ")
        ));
    }
    let at = f.at.unwrap_or(0.0);
    if !(at.is_finite() && at >= 0.0) {
        return Err(format!(
            "fault {name}: at = {at}: must be seconds after start, 0 or more"
        ));
    }
    let allowed: &[&str] = match f.kind {
        FaultKind::Drift => &["per_hour_e", "per_hour_pct"],
        FaultKind::Step => &["error_e", "error_pct"],
        FaultKind::SealChange => &["by"],
        FaultKind::KFactorChange => &["value"],
        FaultKind::Cheating => &["pct"],
        FaultKind::TotalizerMismatch => &["litres"],
        FaultKind::Rollback => &["amount"],
        FaultKind::Silent => &["until"],
        FaultKind::Slow => &["delay_ms", "until"],
        FaultKind::Garbage => &["mode", "until"],
        FaultKind::Exception => &["code", "until"],
    };
    if let Some(extra) = f.keys().into_iter().find(|k| !allowed.contains(k)) {
        return Err(format!(
            "fault {name}: key {extra} does not apply (it takes {})",
            if allowed.is_empty() {
                "no other keys".to_string()
            } else {
                allowed.join(", ")
            }
        ));
    }
    let finite_nonzero = |key: &str, v: f64| {
        if v.is_finite() && v != 0.0 {
            Ok(v)
        } else {
            Err(format!(
                "fault {name}: {key} = {v}: must be a non-zero number"
            ))
        }
    };
    let size = |e_key: &str, e: Option<f64>, pct_key: &str, pct: Option<f64>| match (e, pct) {
        (Some(_), Some(_)) => Err(format!("fault {name}: give {e_key} or {pct_key}, not both")),
        (Some(x), None) => {
            if kind != InstrumentKind::Scale {
                return Err(format!(
                    "fault {name}: {e_key} is in scale intervals e; for {} use {pct_key}",
                    kind_name(kind)
                ));
            }
            finite_nonzero(e_key, x).map(ErrorSize::E)
        }
        (None, Some(x)) => finite_nonzero(pct_key, x).map(ErrorSize::Pct),
        (None, None) => Err(format!("fault {name}: needs {e_key} or {pct_key}")),
    };
    let effect = match f.kind {
        FaultKind::Drift => FaultEffect::Drift(size(
            "per_hour_e",
            f.per_hour_e,
            "per_hour_pct",
            f.per_hour_pct,
        )?),
        FaultKind::Step => FaultEffect::Step(size("error_e", f.error_e, "error_pct", f.error_pct)?),
        FaultKind::SealChange => {
            let by = f.by.unwrap_or(1);
            if by == 0 {
                return Err(format!("fault {name}: by = 0 changes nothing"));
            }
            FaultEffect::SealChange { by: f64::from(by) }
        }
        FaultKind::KFactorChange => match f.value {
            Some(v) if positive(v) => FaultEffect::KFactorChange { value: v },
            Some(v) => return Err(format!("fault {name}: value = {v}: must be positive")),
            None => return Err(format!("fault {name}: needs value = NEW_K_FACTOR")),
        },
        FaultKind::Cheating => match f.pct {
            Some(p) if positive(p) => FaultEffect::Cheating { pct: p },
            Some(p) => return Err(format!("fault {name}: pct = {p}: must be positive")),
            None => {
                return Err(format!(
                    "fault {name}: needs pct = PERCENT (display over encoder per sale)"
                ))
            }
        },
        FaultKind::TotalizerMismatch => FaultEffect::TotalizerMismatch {
            litres: finite_nonzero("litres", f.litres.unwrap_or(5.0))?,
        },
        FaultKind::Rollback => match f.amount.unwrap_or(100.0) {
            a if positive(a) => FaultEffect::Rollback { amount: a },
            a => return Err(format!("fault {name}: amount = {a}: must be positive")),
        },
        FaultKind::Silent => FaultEffect::Silent,
        FaultKind::Slow => match f.delay_ms {
            Some(ms) if ms > 0 => FaultEffect::Slow {
                delay: Duration::from_millis(ms),
            },
            _ => return Err(format!("fault {name}: needs delay_ms = N (N > 0)")),
        },
        FaultKind::Garbage => FaultEffect::Garbage {
            mode: f.mode.unwrap_or_default(),
        },
        FaultKind::Exception => match f.code.unwrap_or(4) {
            c @ 1..=0x7F => FaultEffect::Exception { code: c },
            c => return Err(format!("fault {name}: code = {c}: must be 1..=127")),
        },
    };
    if let Some(until) = f.until {
        if !(until.is_finite() && until > at) {
            return Err(format!(
                "fault {name}: until = {until} must be after at = {at}"
            ));
        }
    }
    Ok(Fault {
        unit: f.unit as u8,
        at,
        until: f.until,
        effect,
    })
}

/// The groups of `fleet` by listener: groups sharing an address come together.
pub(crate) fn by_listener(fleet: &Fleet) -> Vec<Vec<&Group>> {
    let mut shared: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    let mut ports: Vec<Vec<&Group>> = Vec::new();
    for g in &fleet.groups {
        if let Some(&i) = shared.get(&g.listen) {
            ports[i].push(g);
            continue;
        }
        shared.insert(g.listen, ports.len());
        ports.push(vec![g]);
    }
    ports
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Fleet, ConfigError> {
        // Not written: only its directory matters, for the profile paths.
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/fleet/test.toml");
        Fleet::parse(&file, &text.replace("profiles/", "../profiles/"))
    }

    const BASE: &str =
        "[[group]]\nprofile = \"profiles/ft112.toml\"\nlisten = \"127.0.0.1:5020\"\ncount = 4\n";

    #[test]
    fn defaults_and_faults() {
        let text = format!(
            "speed = 60\n{BASE}max_kg = 30\ne_kg = 0.01\n[[group.fault]]\nunit = 2\nkind = \"drift\"\nat = 60\nper_hour_e = 1.5\n\
             [[group.fault]]\nunit = 4\nkind = \"silent\"\nat = 10\nuntil = 20\n"
        );
        let f = parse(&text).unwrap();
        assert_eq!(f.speed, 60.0);
        let g = &f.groups[0];
        assert_eq!(g.units(), 1..=4);
        assert_eq!(g.options.check_refs_kg, vec![4.0, 10.0, 20.0]);
        assert_eq!(g.faults[0].effect, FaultEffect::Drift(ErrorSize::E(1.5)));
        assert!(g.faults[1].active(10.0) && !g.faults[1].active(20.0));
    }

    #[test]
    fn nonsense_is_a_config_error_with_line() {
        for (extra, want, line) in [
            (
                "[[group.fault]]\nunit = 1\nkind = \"cheating\"\npct = 2\n",
                "cheating makes no sense for a scale",
                5,
            ),
            (
                "[[group.fault]]\nunit = 9\nkind = \"silent\"\n",
                "unit 9 is not in this group",
                5,
            ),
            (
                "[[group.fault]]\nunit = 1\nkind = \"drift\"\n",
                "needs per_hour_e or per_hour_pct",
                5,
            ),
            (
                "[[group.fault]]\nunit = 1\nkind = \"silent\"\ndelay_ms = 5\n",
                "key delay_ms does not apply",
                5,
            ),
            (
                "[[group.fault]]\nunit = 1\nkind = \"rollback\"\n",
                "rollback makes no sense for a scale",
                5,
            ),
            ("k_factor = 100\n", "k_factor does not apply to a scale", 1),
            ("[[group.fault]]\nunit = 1\nkind = \"melt\"\n", "melt", 7),
        ] {
            let text = format!("{BASE}{extra}");
            let err = parse(&text).unwrap_err();
            assert!(err.to_string().contains(want), "{extra}: {err}");
            assert_eq!(err.line, Some(line), "{extra}: {err}");
        }
    }

    #[test]
    fn dispenser_and_meter_faults() {
        let text = "[[group]]\nprofile = \"profiles/dispenser-fcc.toml\"\nlisten = \"127.0.0.1:5020\"\ncount = 2\n\
             [[group.fault]]\nunit = 1\nkind = \"cheating\"\npct = 3\n\
             [[group.fault]]\nunit = 2\nkind = \"k_factor_change\"\nvalue = 100.5\nat = 30\n\
             [[group]]\nprofile = \"profiles/sdm630.toml\"\nlisten = \"127.0.0.1:5020\"\nfirst_unit = 3\n\
             [[group.fault]]\nunit = 3\nkind = \"step\"\nerror_pct = 2\n";
        let f = parse(text).unwrap();
        assert_eq!(by_listener(&f).len(), 1);
        let err = parse(&text.replace("first_unit = 3", "first_unit = 2\ncount = 2")).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        assert_eq!(err.line, Some(14));
        let err = parse(&text.replace("error_pct", "error_e")).unwrap_err();
        assert!(
            err.to_string().contains("for energy_meter use error_pct"),
            "{err}"
        );
    }

    #[test]
    fn port_zero_is_shared_too() {
        let text = BASE.replace("5020", "0") + &BASE.replace("5020", "0");
        let err = parse(&text).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
        let text = BASE.replace("5020", "0") + &BASE.replace("5020", "0") + "first_unit = 5\n";
        let mut f = parse(&text).unwrap();
        assert_eq!(by_listener(&f).len(), 1);
        f.groups[1].first_unit = 2;
        let err = f.listen_all_on("127.0.0.1:7".parse().unwrap()).unwrap_err();
        assert!(
            err.to_string().contains(
                "--listen 127.0.0.1:7: group 2: listen 127.0.0.1:7: unit ids 2..=5 overlap 1..=4"
            ),
            "{err}"
        );
    }
}
