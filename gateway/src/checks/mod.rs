//! The domain checks (DESIGN "Domain rules"): pure functions from a device's record, its
//! per-device [`DeviceState`] and one reading to [`Verdict`]s. No I/O and no clock: a reading
//! is judged as of its own `ts`; only [`sweep`] and [`liveness`] take a time.
//!
//! One file per rule family: [`window`] (verification window), [`seal`] (sealed parameters,
//! registers going backwards), [`mpe`] (maximum permissible errors, `out_of_tolerance`),
//! [`drift`] (EWMA/CUSUM per comparison source), [`dispenser`] (cheating, totalizer),
//! [`liveness`] (`offline`).
//!
//! # Verdicts are transitions
//!
//! The checks remember in [`DeviceState::present`] which kinds they have raised, so the alert
//! lifecycle sees:
//! - `Raise` when a condition starts, when its severity changes (an overdue device that goes
//!   silent, or starts reporting again), when what is observed changes in a way that matters
//!   (another broken counter value, another drift source), for every occurrence of an event
//!   kind (`out_of_tolerance`, `totalizer_mismatch`, `counter_rollback`, each deviating sale from
//!   the fifth on for `cheating_suspected`), and as a heartbeat at most once per
//!   [`CheckConfig::repeat_ms`] of event time while a condition persists;
//! - `Clear` once, when a raised condition is no longer observed. Nothing is emitted for
//!   conditions that were never raised, so the common path (a valid device, a normal reading)
//!   allocates nothing and emits nothing.
//!
//! `counter_rollback` and `cheating_suspected` are latched: only a new passing verification
//! clears them. The lifecycle adds the hold time before resolving (DESIGN decision 10). If the
//! open alerts and the saved states ever disagree (a state lost), seed
//! [`Presence::set`] from the open alerts so their `Clear` still comes.
//!
//! # Per verification
//!
//! Seal baselines, the cheating count, the out-of-tolerance flags, the drift statistics and the
//! `reference_device` anchor belong to the newest *passing* certificate verified at or before
//! the reading's `ts` ([`DeviceState::epoch`]); when that certificate changes they restart
//! (DESIGN decisions 3, 4, 7). A failed verification restarts nothing.

pub(crate) mod dispenser;
pub(crate) mod drift;
pub(crate) mod liveness;
pub(crate) mod mpe;
pub(crate) mod seal;
pub(crate) mod window;

#[cfg(test)]
mod reference_sim;

use std::collections::BTreeMap;

use calwatch_protocol::{AlertKind, ReadingRef, Severity, Value};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value as JsonValue};

use crate::domain::{Certificate, Device, DeviceKind};

pub(crate) use dispenser::CheatingState;
pub use drift::DriftSources;
pub(crate) use drift::{DriftSource, DriftState, DriftSummary};
pub(crate) use mpe::{ReferenceAnchor, ToleranceState};
pub(crate) use seal::SealState;

const DAY_MS: i64 = 86_400_000;

/// Relative slack for comparisons at a boundary: a value a rounding error beyond a limit is at
/// the limit (decimal quantities such as 0.005 kg are not exact in binary).
const TIE: f64 = 1e-9;

/// Parameters of the checks; `Default` gives DESIGN's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckConfig {
    /// How long before `valid_until` a device is `due_soon` (DESIGN: 30 days).
    pub due_soon_lead_ms: i64,
    /// The zone whose days date-only certificate dates are, and in which alerts print them
    /// (`timezone`, an IANA name; DESIGN decision 18: UTC).
    pub timezone: crate::domain::civil::Zone,
    /// Drift statistics.
    pub drift: DriftParams,
    /// A sale counts towards `cheating_suspected` when display and encoder differ by more than
    /// this percentage of the encoder volume (DESIGN decision 7: 0.6).
    pub cheat_deviation_pct: f64,
    /// The counted sale that raises `cheating_suspected` (5).
    pub cheat_sales: u32,
    /// The dispenser's minimum measured quantity, L: a sale whose display and encoder are both
    /// below it (an aborted nozzle lift) is neither counted nor compared (decision 12: 2).
    pub min_sale_l: f64,
    /// A device is offline after this many `interval_s` without a reading (3).
    pub offline_factor: u32,
    /// A stable, untared, not overloaded scale reading within ± this many e of zero is a zero
    /// comparison even without the centre-of-zero flag (1.0: the in-service MPE at zero).
    pub zero_band_e: f64,
    /// The first stable reading after a load above the scale's Min whose |gross| is within
    /// this many e (at most half of Min) is the emptied platform: a zero comparison, flag or
    /// not (10 e; Min is 20 e for class III).
    pub zero_return_band_e: f64,
    /// Smallest |Σ V·I·PF| in W for a physics comparison; near no load the relative error is
    /// noise (100 W).
    pub physics_min_w: f64,
    /// Smallest advance of the reference meter, kWh, over which a `reference_device` comparison
    /// is made (10 kWh); the MPE must also be 10 × the comparison's uncertainty (decision 16).
    pub reference_min_kwh: f64,
    /// A persisting condition is raised again at most this often, ms of event time (1 h).
    pub repeat_ms: i64,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            due_soon_lead_ms: 30 * DAY_MS,
            timezone: crate::domain::civil::Zone::default(),
            drift: DriftParams::default(),
            cheat_deviation_pct: 0.6,
            cheat_sales: 5,
            min_sale_l: 2.0,
            offline_factor: 3,
            zero_band_e: 1.0,
            zero_return_band_e: 10.0,
            physics_min_w: 100.0,
            reference_min_kwh: 10.0,
            repeat_ms: 3_600_000,
        }
    }
}

/// Parameters of the drift statistics (REFERENCE "Statistics for drift").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftParams {
    /// EWMA weight λ (0.2).
    pub lambda: f64,
    /// EWMA limits at ± L σ_z (3).
    pub ewma_l: f64,
    /// CUSUM reference value k, in σ (0.5).
    pub cusum_k: f64,
    /// CUSUM decision interval h, in σ (5).
    pub cusum_h: f64,
    /// Comparisons after each verification from which mean and σ are estimated (20).
    pub warmup: usize,
    /// A signal also needs |EWMA − mean| ≥ this, in r (DESIGN decision 4: 0.3).
    pub min_r: f64,
    /// A signalling source stops signalling only when |EWMA − mean| < this, in r (0.15; below
    /// `min_r`; 0: no hysteresis).
    pub release_r: f64,
    /// Comparisons in the least-squares trend (50).
    pub trend_window: usize,
    /// Lower bound of the robust σ, in r (0.05): a warm-up of identical values (a quantised
    /// indication) has MAD 0, which would make every later difference a signal.
    pub sigma_floor: f64,
    /// Continuous sources (`zero`, `physics`) are averaged over this much event time and each
    /// average is one comparison (10 min, i.e. at most 144 a day).
    pub sample_ms: i64,
}

impl Default for DriftParams {
    fn default() -> Self {
        DriftParams {
            lambda: 0.2,
            ewma_l: 3.0,
            cusum_k: 0.5,
            cusum_h: 5.0,
            warmup: 20,
            min_r: 0.3,
            release_r: 0.15,
            trend_window: 50,
            sigma_floor: 0.05,
            sample_ms: 600_000,
        }
    }
}

/// A check configuration that cannot work, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("checks: {0}")]
pub struct InvalidCheckConfig(pub &'static str);

impl CheckConfig {
    /// Refuses values the statistics or rules cannot work with.
    pub fn validate(&self) -> Result<(), InvalidCheckConfig> {
        let d = &self.drift;
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let rules = [
            (
                self.due_soon_lead_ms >= 0,
                "due_soon_lead_ms must not be negative",
            ),
            (
                d.lambda > 0.0 && d.lambda <= 1.0,
                "drift.lambda must be in (0, 1]",
            ),
            (positive(d.ewma_l), "drift.ewma_l must be positive"),
            (
                d.cusum_k.is_finite() && d.cusum_k >= 0.0,
                "drift.cusum_k must not be negative",
            ),
            (positive(d.cusum_h), "drift.cusum_h must be positive"),
            (d.warmup >= 1, "drift.warmup must be at least 1"),
            (
                d.min_r.is_finite() && d.min_r >= 0.0,
                "drift.min_r must not be negative",
            ),
            (
                d.release_r.is_finite()
                    && d.release_r >= 0.0
                    && (d.release_r < d.min_r || d.release_r == 0.0),
                "drift.release_r must not be negative and must be below drift.min_r (0: no hysteresis)",
            ),
            (d.trend_window >= 3, "drift.trend_window must be at least 3"),
            (
                positive(d.sigma_floor),
                "drift.sigma_floor must be positive",
            ),
            (d.sample_ms >= 0, "drift.sample_ms must not be negative"),
            (
                positive(self.cheat_deviation_pct) && self.cheat_sales >= 1,
                "cheat_deviation_pct must be positive and cheat_sales at least 1",
            ),
            (
                self.offline_factor >= 1,
                "offline_factor must be at least 1",
            ),
            (
                self.zero_band_e.is_finite()
                    && self.zero_band_e >= 0.0
                    && positive(self.physics_min_w)
                    && positive(self.reference_min_kwh),
                "zero_band_e must not be negative, physics_min_w and reference_min_kwh positive",
            ),
            (self.repeat_ms > 0, "repeat_ms must be positive"),
            (
                self.min_sale_l.is_finite() && self.min_sale_l >= 0.0,
                "min_sale_l must not be negative",
            ),
            (
                self.zero_return_band_e.is_finite() && self.zero_return_band_e >= 0.0,
                "zero_return_band_e must not be negative",
            ),
        ];
        match rules.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(InvalidCheckConfig(why)),
            None => Ok(()),
        }
    }
}

/// What a check says about one (device, kind): the condition is present (raise or repeat) or
/// clear.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The condition is present.
    Raise {
        kind: AlertKind,
        severity: Severity,
        message: String,
        evidence: Map<String, JsonValue>,
    },
    /// A condition raised before is no longer observed.
    Clear { kind: AlertKind },
}

impl Verdict {
    /// The alert kind the verdict is about.
    pub fn kind(&self) -> AlertKind {
        match self {
            Verdict::Raise { kind, .. } | Verdict::Clear { kind } => *kind,
        }
    }
}

/// When and how a kind was last raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Raised {
    pub severity: Severity,
    /// Time of the last `Raise` (event time; the sweep's wall-clock time for sweep raises).
    pub at: i64,
}

const KINDS: usize = AlertKind::ALL.len();

/// The kinds raised and not yet cleared; serialized as `{"kind": {"severity":..,"at":..}}`.
/// Boxed, and absent while nothing is raised (most devices, most of the time): 8 bytes a
/// device instead of 192.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Presence(Option<Box<[Option<Raised>; KINDS]>>);

impl Presence {
    /// How `kind` was last raised, if it is present.
    pub fn get(&self, kind: AlertKind) -> Option<Raised> {
        self.0.as_ref().and_then(|a| a[kind as usize])
    }

    /// Marks `kind` present, e.g. to reconcile with open alerts after a state was lost.
    pub fn set(&mut self, kind: AlertKind, raised: Raised) {
        self.0.get_or_insert_with(Box::default)[kind as usize] = Some(raised);
    }

    /// Forgets `kind`, returning how it was raised.
    pub fn remove(&mut self, kind: AlertKind) -> Option<Raised> {
        let a = self.0.as_mut()?;
        let was = a[kind as usize].take();
        if a.iter().all(Option::is_none) {
            self.0 = None;
        }
        was
    }

    /// One word of the boxed part, if any: brings it into the cache (see `ingest::touch`).
    pub fn touch(&self) -> u64 {
        self.0.as_ref().map_or(0, |a| u64::from(a[0].is_some()))
    }

    /// The present kinds.
    pub fn iter(&self) -> impl Iterator<Item = (AlertKind, Raised)> + '_ {
        AlertKind::ALL
            .iter()
            .zip(self.0.iter().flat_map(|a| a.iter()))
            .filter_map(|(k, r)| r.map(|r| (*k, r)))
    }
}

impl Serialize for Presence {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Presence {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Presence, D::Error> {
        let map = BTreeMap::<AlertKind, Raised>::deserialize(deserializer)?;
        let mut p = Presence::default();
        for (kind, raised) in map {
            p.set(kind, raised);
        }
        Ok(p)
    }
}

/// The passing certificate a state's per-verification parts belong to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    pub certificate: crate::domain::Text,
    pub verified_at: i64,
}

/// One sample of a cumulative register (`totalizer_l`, `energy_kwh`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Register {
    pub seq: u64,
    pub ts: i64,
    pub value: f64,
}

/// A device's check state with its counters: what is saved per device.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SavedDevice {
    pub state: DeviceState,
    /// Sequence numbers skipped so far (CONTRACT §1: counted, reported in device status).
    pub gaps: u64,
    /// Readings checked (after dedup), over the device's life: each reading exactly once.
    pub readings: u64,
    /// When the last accepted reading arrived, by the gateway's clock (not its `ts`): what
    /// wall-clock silence and use are judged by (decision 11; a lagging agent clock).
    pub arrived: Option<i64>,
}

/// Everything the checks remember about one device. Persist it with the alerts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceState {
    /// `seq` of the newest reading checked. Stored in a column of its own, not in the JSON
    /// (which then changes only when the checks learned something); read from old JSON.
    #[serde(skip_serializing)]
    pub last_seq: u64,
    /// Newest event time checked (liveness, sweep); `None` before the first reading. Stored
    /// like `last_seq`.
    #[serde(skip_serializing)]
    pub last_ts: Option<i64>,
    /// Kinds raised and not cleared, with severity and time of the last raise.
    pub present: Presence,
    /// The passing certificate the fields from `seal` to `reference_anchor` belong to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    /// Seal baselines learned from the first reading, and the values last reported broken.
    pub seal: SealState,
    /// Sales with display/encoder deviation since the verification.
    pub cheating: CheatingState,
    /// Which reference comparisons currently fail (`out_of_tolerance` clears when none does).
    pub tolerance: ToleranceState,
    /// Drift statistics per comparison source.
    pub drift: DriftSources,
    /// Start of the pending `reference_device` energy comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_anchor: Option<ReferenceAnchor>,
    /// Last `totalizer_l` seen (rollback, totalizer check; not per verification).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub totalizer: Option<Register>,
    /// Last `energy_kwh` seen (rollback; the reference view of this device).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy: Option<Register>,
    /// The modulus at which the `energy_kwh` register wraps, from the agent's `device_info`
    /// ([`seal::apply_device_info`], DESIGN decision 17); `None`: it does not wrap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_wrap: Option<f64>,
    /// The last [`ENERGY_SAMPLES`] `energy_kwh` samples, oldest first, rising in `ts` and
    /// not falling in value (a step back or a clock going back restarts them): what a
    /// `reference_device` comparison interpolates in, this meter's as the reference's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub energy_samples: Vec<EnergySample>,
    /// Last `sale_id` seen; a different one is a new sale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sale_id: Option<f64>,
}

/// Energy samples a meter keeps (DESIGN decision 16): enough that a reference polled at
/// another phase, or a batch or two behind, still brackets the compared meter's readings.
pub(crate) const ENERGY_SAMPLES: usize = 8;

/// One `energy_kwh` sample; saved as `[ts, kwh]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "(i64, f64)", into = "(i64, f64)")]
pub struct EnergySample {
    pub ts: i64,
    pub kwh: f64,
}

impl From<(i64, f64)> for EnergySample {
    fn from((ts, kwh): (i64, f64)) -> EnergySample {
        EnergySample { ts, kwh }
    }
}

impl From<EnergySample> for (i64, f64) {
    fn from(s: EnergySample) -> (i64, f64) {
        (s.ts, s.kwh)
    }
}

impl DeviceState {
    /// This device seen as another's `reference_device`: its recent energy samples.
    pub fn reference_energy(&self) -> Option<ReferenceEnergy> {
        ReferenceEnergy::new(&self.energy_samples)
    }

    /// Appends an `energy_kwh` sample; `forward`: the register did not go back.
    fn record_energy(&mut self, ts: i64, kwh: f64, forward: bool) {
        let s = &mut self.energy_samples;
        if !(forward && s.last().is_some_and(|l| l.ts < ts && l.kwh <= kwh)) {
            s.clear();
        } else if s.len() >= ENERGY_SAMPLES {
            s.remove(0);
        }
        s.push(EnergySample { ts, kwh });
    }
}

/// What a `reference_device` contributes to a comparison (DESIGN decisions 3, 16): its recent
/// energy samples, so its energy at another meter's reading time can be interpolated — never
/// extrapolated. Copied out of the reference's state (no allocation) before the checked
/// device's state is borrowed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReferenceEnergy {
    samples: [EnergySample; ENERGY_SAMPLES],
    len: usize,
}

/// An energy interpolated between two samples of a register.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interpolated {
    pub kwh: f64,
    /// Bound of the interpolation error, kWh: the energy of the sample interval (the true
    /// energy lies between its two samples whatever the load did in between); 0 on a sample.
    pub bound_kwh: f64,
}

impl ReferenceEnergy {
    /// The newest [`ENERGY_SAMPLES`] of `samples` (rising in `ts`, not falling in value), if
    /// there are two.
    pub fn new(samples: &[EnergySample]) -> Option<ReferenceEnergy> {
        let recent = &samples[samples.len().saturating_sub(ENERGY_SAMPLES)..];
        if recent.len() < 2 {
            return None;
        }
        let mut r = ReferenceEnergy {
            samples: [EnergySample::default(); ENERGY_SAMPLES],
            len: recent.len(),
        };
        r.samples[..recent.len()].copy_from_slice(recent);
        Some(r)
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> &[EnergySample] {
        &self.samples[..self.len]
    }

    /// The reference's energy at `ts`, interpolated between the two samples around it;
    /// `None` unless its samples bracket `ts` (oldest ≤ `ts` ≤ newest).
    pub fn at(&self, ts: i64) -> Option<Interpolated> {
        let s = self.samples();
        let i = s.partition_point(|x| x.ts < ts);
        let hi = s.get(i)?;
        if hi.ts == ts {
            return Some(Interpolated {
                kwh: hi.kwh,
                bound_kwh: 0.0,
            });
        }
        let lo = s.get(i.checked_sub(1)?)?;
        let f = (ts - lo.ts) as f64 / (hi.ts - lo.ts) as f64;
        Some(Interpolated {
            kwh: lo.kwh + (hi.kwh - lo.kwh) * f,
            bound_kwh: hi.kwh - lo.kwh,
        })
    }
}

/// Checks one reading (deduplicated, in seq order) of `device`. `reference` is
/// [`DeviceState::reference_energy`] of the device's `reference_device`, if it has one.
pub(crate) fn check_reading(
    device: &Device,
    state: &mut DeviceState,
    reading: &ReadingRef<'_>,
    reference: Option<ReferenceEnergy>,
    cfg: &CheckConfig,
    out: &mut Vec<Verdict>,
) {
    let ctx = Ctx {
        device,
        cfg,
        seq: reading.seq,
        ts: reading.ts,
    };
    let v = Values::scan(reading);
    let passing = passing_certificate_at(device, ctx.ts);
    enter_epoch(state, passing, out);
    clear(&mut state.present, AlertKind::Offline, out);
    window::judge(device, &mut state.present, ctx.ts, true, cfg, out);
    seal::check(&ctx, passing, state, &v, out);

    let totalizer = v.totalizer_l.map(|x| {
        seal::advance(
            &ctx,
            &mut state.totalizer,
            "totalizer_l",
            x,
            None,
            &mut state.present,
            out,
        )
    });
    let energy = v.energy_kwh.map(|x| {
        let step = seal::advance(
            &ctx,
            &mut state.energy,
            "energy_kwh",
            x,
            state.energy_wrap,
            &mut state.present,
            out,
        );
        state.record_energy(ctx.ts, x, matches!(step, seal::Step::Forward(_)));
        step
    });

    let mut touched = Touched::default();
    if let Some(c) = mpe::span_comparison(device, &v) {
        if let Some(r) = mpe::judge(&ctx, state, &c, out) {
            touched.feed(
                state.drift.get_mut(drift::DriftSource::Span),
                ctx.ts,
                r,
                &cfg.drift,
            );
        }
    }
    match device.kind {
        DeviceKind::Scale => {
            if let Some(r) = drift::zero_r(device, &mut state.drift, &v, cfg) {
                touched.sample(
                    state.drift.get_mut(drift::DriftSource::Zero),
                    ctx.ts,
                    r,
                    &cfg.drift,
                );
            }
        }
        DeviceKind::Dispenser => dispenser::check(&ctx, state, &v, totalizer, out, &mut touched),
        DeviceKind::EnergyMeter => {
            if let Some(r) = drift::physics_r(device, &v, cfg) {
                touched.sample(
                    state.drift.get_mut(drift::DriftSource::Physics),
                    ctx.ts,
                    r,
                    &cfg.drift,
                );
            }
            if let Some(c) = mpe::reference_comparison(&ctx, state, &v, energy, reference) {
                if let Some(r) = mpe::judge(&ctx, state, &c, out) {
                    touched.feed(
                        state.drift.get_mut(drift::DriftSource::Reference),
                        ctx.ts,
                        r,
                        &cfg.drift,
                    );
                }
            }
        }
        DeviceKind::Other => {}
    }
    if touched.any {
        drift::verdict(&ctx, state, touched.started, out);
    }

    state.last_seq = reading.seq;
    state.last_ts = Some(state.last_ts.map_or(ctx.ts, |t| t.max(ctx.ts)));
}

/// The wall-clock sweep of the verification window (DESIGN decisions 1 and 9): for a device
/// silent for `offline_factor × interval_s` (or never heard from) it raises `due_soon` (info)
/// and `overdue`, `unverified`, `failed_verification` as warnings (not an instrument in use),
/// clearing what no longer applies. A device that reports is judged by its readings, so the
/// sweep leaves it alone. Verdicts are as of `now_ms`.
pub(crate) fn sweep(
    device: &Device,
    state: &mut DeviceState,
    now_ms: i64,
    arriving: bool,
    cfg: &CheckConfig,
    out: &mut Vec<Verdict>,
) {
    // Silent by its own timestamps: judged as of the sweep. Still `arriving` on the wall
    // clock, it is in use all the same (its agent's clock lags by more than the offline
    // limit), so an overdue instrument in use is critical however far behind the clock is.
    if liveness::silent(device, state, now_ms, cfg) {
        window::judge(device, &mut state.present, now_ms, arriving, cfg, out);
    }
}

/// Whether the device's verification still holds: no `seal_broken` or `param_changed` open
/// (decision 15: a broken seal voids the verification; `identity_mismatch` joins them when
/// the instrument's identity is checked).
pub(crate) fn intact(state: &DeviceState) -> bool {
    [AlertKind::SealBroken, AlertKind::ParamChanged]
        .into_iter()
        .all(|k| state.present.get(k).is_none())
}

/// The verification window of `device` judged at `now_ms` (after its certificates changed):
/// `in_use` as for a reading.
pub(crate) fn judge_window(
    device: &Device,
    state: &mut DeviceState,
    now_ms: i64,
    in_use: bool,
    cfg: &CheckConfig,
    out: &mut Vec<Verdict>,
) {
    window::judge(device, &mut state.present, now_ms, in_use, cfg, out);
}

/// Drift statistics for the `device_status` measurement: those of the source furthest from its
/// in-control mean (|EWMA − mean|, in r) among sources past warm-up, ties in the order span,
/// reference, encoder, physics, zero; before any warm-up ends, the source with most
/// comparisons, without statistics.
pub(crate) fn status(state: &DeviceState) -> DriftSummary {
    drift::summary(&state.drift)
}

/// The newest passing certificate verified at or before `at`: what seal values, the cheating
/// count and the drift warm-up belong to.
fn passing_certificate_at(device: &Device, at: i64) -> Option<&Certificate> {
    device
        .certificates
        .iter()
        .rev()
        .find(|c| c.passed && c.verified_at <= at)
}

/// Restarts the per-verification state when the passing certificate in force changed.
fn enter_epoch(state: &mut DeviceState, passing: Option<&Certificate>, out: &mut Vec<Verdict>) {
    let same = match (&state.epoch, passing) {
        (None, None) => true,
        (Some(e), Some(c)) => e.verified_at == c.verified_at && e.certificate == c.certificate,
        _ => false,
    };
    if same {
        return;
    }
    state.epoch = passing.map(|c| Epoch {
        certificate: c.certificate.clone(),
        verified_at: c.verified_at,
    });
    state.seal = SealState::default();
    state.cheating = CheatingState::default();
    state.tolerance = ToleranceState::default();
    state.drift = DriftSources::default();
    state.reference_anchor = None;
    for kind in [
        AlertKind::SealBroken,
        AlertKind::ParamChanged,
        AlertKind::CounterRollback,
        AlertKind::OutOfTolerance,
        AlertKind::Drift,
        AlertKind::CheatingSuspected,
    ] {
        clear(&mut state.present, kind, out);
    }
}

/// What every rule of one reading needs to know.
struct Ctx<'a> {
    device: &'a Device,
    cfg: &'a CheckConfig,
    seq: u64,
    ts: i64,
}

/// Whether any drift source took a comparison in this reading, and whether one started
/// signalling.
#[derive(Default)]
struct Touched {
    any: bool,
    started: bool,
}

impl Touched {
    fn feed(&mut self, d: &mut DriftState, ts: i64, r: f64, p: &DriftParams) {
        self.any = true;
        self.started |= d.update(ts, r, p);
    }

    fn sample(&mut self, d: &mut DriftState, ts: i64, r: f64, p: &DriftParams) {
        if let Some(started) = d.sample(ts, r, p) {
            self.any = true;
            self.started |= started;
        }
    }
}

/// The well-known values of a reading (CONTRACT §1), found in one pass. Flags are 1.0 / 0.0.
#[derive(Default)]
struct Values {
    gross_kg: Option<f64>,
    net_kg: Option<f64>,
    tare_kg: Option<f64>,
    stable: Option<f64>,
    zero: Option<f64>,
    overload: Option<f64>,
    event_counter: Option<f64>,
    check_ref_kg: Option<f64>,
    totalizer_l: Option<f64>,
    sale_id: Option<f64>,
    sale_l: Option<f64>,
    encoder_sale_l: Option<f64>,
    k_factor: Option<f64>,
    check_ref_l: Option<f64>,
    energy_kwh: Option<f64>,
    power_w: Option<f64>,
    voltage_v: Option<f64>,
    current_a: Option<f64>,
    power_factor: Option<f64>,
    check_kwh: Option<f64>,
    check_ref_kwh: Option<f64>,
    voltage_v_l: [Option<f64>; 3],
    current_a_l: [Option<f64>; 3],
    power_factor_l: [Option<f64>; 3],
}

impl Values {
    fn scan(reading: &ReadingRef<'_>) -> Values {
        let mut v = Values::default();
        for (name, value) in reading.values.iter() {
            let x = match value {
                Value::Number(x) => x,
                Value::Bool(b) => f64::from(u8::from(b)),
            };
            let slot = match name {
                "gross_kg" => &mut v.gross_kg,
                "net_kg" => &mut v.net_kg,
                "tare_kg" => &mut v.tare_kg,
                "stable" => &mut v.stable,
                "zero" => &mut v.zero,
                "overload" => &mut v.overload,
                "event_counter" => &mut v.event_counter,
                "check_ref_kg" => &mut v.check_ref_kg,
                "totalizer_l" => &mut v.totalizer_l,
                "sale_id" => &mut v.sale_id,
                "sale_l" => &mut v.sale_l,
                "encoder_sale_l" => &mut v.encoder_sale_l,
                "k_factor" => &mut v.k_factor,
                "check_ref_l" => &mut v.check_ref_l,
                "energy_kwh" => &mut v.energy_kwh,
                "power_w" => &mut v.power_w,
                "voltage_v" => &mut v.voltage_v,
                "current_a" => &mut v.current_a,
                "power_factor" => &mut v.power_factor,
                "check_kwh" => &mut v.check_kwh,
                "check_ref_kwh" => &mut v.check_ref_kwh,
                "voltage_v_l1" => &mut v.voltage_v_l[0],
                "voltage_v_l2" => &mut v.voltage_v_l[1],
                "voltage_v_l3" => &mut v.voltage_v_l[2],
                "current_a_l1" => &mut v.current_a_l[0],
                "current_a_l2" => &mut v.current_a_l[1],
                "current_a_l3" => &mut v.current_a_l[2],
                "power_factor_l1" => &mut v.power_factor_l[0],
                "power_factor_l2" => &mut v.power_factor_l[1],
                "power_factor_l3" => &mut v.power_factor_l[2],
                _ => continue,
            };
            *slot = Some(x);
        }
        v
    }
}

fn flag(x: Option<f64>) -> Option<bool> {
    x.map(|x| x != 0.0)
}

/// Raises a persisting condition on onset, on a severity change, when `changed`, or as a
/// heartbeat after `repeat_ms`; `describe` runs only then.
#[allow(clippy::too_many_arguments)]
fn raise_condition(
    present: &mut Presence,
    kind: AlertKind,
    severity: Severity,
    at: i64,
    cfg: &CheckConfig,
    changed: bool,
    out: &mut Vec<Verdict>,
    describe: impl FnOnce() -> (String, Map<String, JsonValue>),
) {
    let due = match present.get(kind) {
        None => true,
        Some(r) => changed || r.severity != severity || at.saturating_sub(r.at) >= cfg.repeat_ms,
    };
    if due {
        let (message, evidence) = describe();
        raise_event(present, kind, severity, at, out, message, evidence);
    }
}

/// Raises an occurrence (every call is a `Raise`).
fn raise_event(
    present: &mut Presence,
    kind: AlertKind,
    severity: Severity,
    at: i64,
    out: &mut Vec<Verdict>,
    message: String,
    evidence: Map<String, JsonValue>,
) {
    present.set(kind, Raised { severity, at });
    out.push(Verdict::Raise {
        kind,
        severity,
        message,
        evidence,
    });
}

/// Clears `kind` if it was raised.
fn clear(present: &mut Presence, kind: AlertKind, out: &mut Vec<Verdict>) {
    if present.remove(kind).is_some() {
        out.push(Verdict::Clear { kind });
    }
}

fn evidence<const N: usize>(pairs: [(&str, JsonValue); N]) -> Map<String, JsonValue> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `x` rounded to `decimals`, for messages and evidence.
fn rounded(x: f64, decimals: i32) -> f64 {
    let p = 10f64.powi(decimals);
    let y = (x * p).round() / p;
    if y.is_finite() {
        y
    } else {
        x
    }
}

fn num(x: f64, decimals: i32) -> JsonValue {
    JsonValue::from(rounded(x, decimals))
}

fn opt_num(x: Option<f64>, decimals: i32) -> JsonValue {
    x.map_or(JsonValue::Null, |x| num(x, decimals))
}

/// Devices, certificates, readings and deterministic noise for the checks' tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod fixtures {
    use calwatch_protocol::{AlertKind, Id, Reading, Severity, Value};

    use super::{check_reading, CheckConfig, DeviceState, ReferenceEnergy, Verdict};
    use crate::domain::{Certificate, Device, DeviceKind};

    pub(super) const DAY: i64 = super::DAY_MS;

    pub(super) fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    /// A device with interval_s 60: a 15 kg class III scale with e = 5 g, a dispenser with
    /// mpe_pct 0.5, a meter whose reference_device is REF-1.
    pub(super) fn device(kind: DeviceKind, class: Option<&str>) -> Device {
        let scale = kind == DeviceKind::Scale;
        Device {
            id: id("DEV-1"),
            kind,
            owner: id("owner-1"),
            site: id("site-1"),
            agent: id("agent-1"),
            model: "m".into(),
            serial: "s".into(),
            accuracy_class: class.map(Into::into),
            max: scale.then_some(15.0),
            e: scale.then_some(0.005),
            mpe_pct: (kind == DeviceKind::Dispenser).then_some(0.5),
            interval_s: 60,
            reference_device: (kind == DeviceKind::EnergyMeter).then(|| id("REF-1")),
            certificates: Vec::new(),
        }
    }

    pub(super) fn cert(
        name: &str,
        verified_at: i64,
        valid_until: Option<i64>,
        passed: bool,
        event_counter: Option<f64>,
        k_factor: Option<f64>,
    ) -> Certificate {
        Certificate {
            certificate: name.into(),
            verified_at,
            valid_until,
            passed,
            verifier: "bureau-7".into(),
            event_counter,
            k_factor,
        }
    }

    pub(super) fn n(x: f64) -> Value {
        Value::Number(x)
    }

    pub(super) fn b(x: bool) -> Value {
        Value::Bool(x)
    }

    pub(super) fn reading(seq: u64, ts: i64, values: &[(&str, Value)]) -> Reading {
        Reading {
            device: id("DEV-1"),
            seq,
            ts,
            values: values.iter().map(|(k, v)| (id(k), *v)).collect(),
        }
    }

    pub(super) fn run(
        d: &Device,
        st: &mut DeviceState,
        cfg: &CheckConfig,
        seq: u64,
        ts: i64,
        values: &[(&str, Value)],
    ) -> Vec<Verdict> {
        run_ref(d, st, cfg, seq, ts, values, None)
    }

    pub(super) fn run_ref(
        d: &Device,
        st: &mut DeviceState,
        cfg: &CheckConfig,
        seq: u64,
        ts: i64,
        values: &[(&str, Value)],
        reference: Option<ReferenceEnergy>,
    ) -> Vec<Verdict> {
        let mut out = Vec::new();
        check_reading(
            d,
            st,
            &reading(seq, ts, values).view(),
            reference,
            cfg,
            &mut out,
        );
        out
    }

    /// The raises among `v`, as (kind, severity).
    pub(super) fn raised(v: &[Verdict]) -> Vec<(AlertKind, Severity)> {
        v.iter()
            .filter_map(|v| match v {
                Verdict::Raise { kind, severity, .. } => Some((*kind, *severity)),
                Verdict::Clear { .. } => None,
            })
            .collect()
    }

    pub(super) fn clear_of(kind: AlertKind) -> Verdict {
        Verdict::Clear { kind }
    }

    /// splitmix64 with Box–Muller: seeded, deterministic noise without a dependency.
    pub(super) struct Rng(u64);

    impl Rng {
        pub(super) fn new(seed: u64) -> Rng {
            Rng(seed)
        }

        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in (0, 1].
        fn uniform(&mut self) -> f64 {
            ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
        }

        /// Standard normal.
        pub(super) fn normal(&mut self) -> f64 {
            let (u1, u2) = (self.uniform(), self.uniform());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use calwatch_protocol::{AlertKind, Severity};

    use super::fixtures::*;
    use super::*;

    #[test]
    fn presence_is_indexed_in_contract_order() {
        for (i, kind) in AlertKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "{kind}");
        }
        let mut p = Presence::default();
        let raised = Raised {
            severity: Severity::Critical,
            at: 7,
        };
        p.set(AlertKind::Offline, raised);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"offline":{"severity":"critical","at":7}}"#
        );
        let back: Presence =
            serde_json::from_str(r#"{"offline":{"severity":"critical","at":7}}"#).unwrap();
        assert_eq!(back, p);
        assert_eq!(p.iter().collect::<Vec<_>>(), [(AlertKind::Offline, raised)]);
    }

    #[test]
    fn defaults_are_design_defaults_and_validated() {
        let cfg = CheckConfig::default();
        assert_eq!(cfg.due_soon_lead_ms, 30 * DAY);
        assert_eq!((cfg.drift.lambda, cfg.drift.ewma_l), (0.2, 3.0));
        assert_eq!((cfg.drift.cusum_k, cfg.drift.cusum_h), (0.5, 5.0));
        assert_eq!(cfg.drift.min_r, 0.3);
        assert_eq!((cfg.cheat_deviation_pct, cfg.cheat_sales), (0.6, 5));
        assert_eq!(cfg.offline_factor, 3);
        assert_eq!(cfg.validate(), Ok(()));
        let mut bad = cfg.clone();
        bad.drift.lambda = 0.0;
        assert_eq!(
            bad.validate(),
            Err(InvalidCheckConfig("drift.lambda must be in (0, 1]"))
        );
        let parsed: CheckConfig =
            serde_json::from_str(r#"{"cheat_sales": 3, "drift": {"min_r": 0.25}}"#).unwrap();
        assert_eq!(parsed.cheat_sales, 3);
        assert_eq!(parsed.drift.min_r, 0.25);
        assert_eq!(parsed.drift.lambda, 0.2);
        assert!(serde_json::from_str::<CheckConfig>(r#"{"cheat_sale": 3}"#).is_err());
    }

    #[test]
    fn state_survives_a_round_trip() {
        let mut d = device(DeviceKind::Dispenser, None);
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, Some(100.0)));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        for seq in 1..40u64 {
            run(
                &d,
                &mut st,
                &cfg,
                seq,
                seq as i64 * 60_000,
                &[
                    ("sale_id", n(seq as f64)),
                    ("sale_l", n(20.2)),
                    ("encoder_sale_l", n(20.0)),
                    ("totalizer_l", n(1000.0 + 20.2 * seq as f64)),
                    ("k_factor", n(if seq < 30 { 100.0 } else { 101.0 })),
                    ("event_counter", n(4.0)),
                ],
            );
        }
        assert!(st.present.get(AlertKind::CheatingSuspected).is_some());
        assert!(st.present.get(AlertKind::ParamChanged).is_some());
        assert!(st.drift.get(drift::DriftSource::Encoder).baseline.is_some());
        let json = serde_json::to_string(&st).unwrap();
        let mut back: DeviceState = serde_json::from_str(&json).unwrap();
        // last_seq and last_ts live in columns of their own (the store puts them back)...
        assert!(
            !json.contains("last_seq") && !json.contains("last_ts"),
            "{json}"
        );
        assert_eq!((back.last_seq, back.last_ts), (0, None));
        (back.last_seq, back.last_ts) = (st.last_seq, st.last_ts);
        assert_eq!(back, st);
        // ... and are still read from JSON written before they moved.
        let old: DeviceState = serde_json::from_str(r#"{"last_seq":7,"last_ts":42}"#).unwrap();
        assert_eq!((old.last_seq, old.last_ts), (7, Some(42)));
        // an empty object is a fresh state (fields added later default too)
        let fresh: DeviceState = serde_json::from_str("{}").unwrap();
        assert_eq!(fresh, DeviceState::default());
    }

    #[test]
    fn a_meter_as_reference_of_another() {
        let d = device(DeviceKind::EnergyMeter, Some("1"));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        assert_eq!(st.reference_energy(), None);
        run(&d, &mut st, &cfg, 1, 0, &[("energy_kwh", n(10.0))]);
        assert_eq!(st.reference_energy(), None, "one sample brackets nothing");
        run(&d, &mut st, &cfg, 2, 60_000, &[("energy_kwh", n(11.0))]);
        let r = st.reference_energy().unwrap();
        let at = |kwh, bound_kwh| Some(Interpolated { kwh, bound_kwh });
        assert_eq!(r.at(30_000), at(10.5, 1.0));
        assert_eq!(r.at(60_000), at(11.0, 0.0));
        // never extrapolated (until issue #16: 11.5 at 90 s)
        assert_eq!((r.at(90_000), r.at(-1)), (None, None));
        // the newest ENERGY_SAMPLES are kept, and saved as [ts, kWh]
        for k in 3..=20u64 {
            let kwh = 9.0 + k as f64;
            let ts = (k as i64 - 1) * 60_000;
            run(&d, &mut st, &cfg, k, ts, &[("energy_kwh", n(kwh))]);
        }
        let r = st.reference_energy().unwrap();
        assert_eq!(r.samples().len(), ENERGY_SAMPLES);
        assert_eq!(r.samples()[0], (720_000, 22.0).into());
        assert_eq!(r.at(1_110_000), at(28.5, 1.0));
        let json = serde_json::to_string(&st).unwrap();
        let saved = r#""energy_samples":[[720000,22.0],[780000,23.0],"#;
        assert!(json.contains(saved), "{json}");
        let back: DeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.energy_samples, st.energy_samples);
        // a register going back restarts them
        run(&d, &mut st, &cfg, 21, 1_200_000, &[("energy_kwh", n(5.0))]);
        assert_eq!(st.reference_energy(), None);
        assert_eq!(st.energy_samples.len(), 1);
        assert_eq!(status(&st), DriftSummary::default());
    }

    /// The common path: a valid device, normal readings: nothing emitted. Also prints the
    /// time a reading takes (`cargo test --release -- --nocapture common_path`).
    #[test]
    fn common_path_is_quiet_and_cheap() {
        let mut d = device(DeviceKind::EnergyMeter, Some("1"));
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, Some(3.0), None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let readings: Vec<_> = (1..=20_000u64)
            .map(|seq| {
                reading(
                    seq,
                    seq as i64 * 1000,
                    &[
                        ("energy_kwh", n(1000.0 + seq as f64 * 0.001)),
                        ("power_w", n(2070.0)),
                        ("voltage_v", n(230.0)),
                        ("current_a", n(10.0)),
                        ("power_factor", n(0.9)),
                        ("event_counter", n(3.0)),
                    ],
                )
            })
            .collect();
        let mut out = Vec::new();
        let start = Instant::now();
        for r in &readings {
            check_reading(&d, &mut st, &r.view(), None, &cfg, &mut out);
        }
        let per = start.elapsed() / readings.len() as u32;
        println!("check_reading: {per:?} per reading");
        assert!(out.is_empty(), "{out:?}");
        assert!(st.drift.get(drift::DriftSource::Physics).baseline.is_some());
    }
}
