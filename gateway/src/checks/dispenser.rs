//! Dispenser integrity (DESIGN "Dispenser integrity", decisions 6, 7, 12 and 14): the displayed
//! volume of each sale against the independent encoder (JJG 443-2006 on: the dispenser itself
//! locks after 5 cumulative deviations beyond ±0.6 %), and the totalizer against the sales.
//!
//! - A sale is a reading whose `sale_id` differs from the last one seen, the first `sale_id`
//!   ever seen included: display against encoder needs no baseline.
//! - It counts towards `cheating_suspected` when |display − encoder| / encoder > 0.6 %
//!   (decision 7), and when a volume is displayed against an encoder volume of 0 (decision 12:
//!   the deviation is unbounded; its evidence has `last_deviation_pct` null and `encoder_zero`
//!   true, and it is no `encoder` drift comparison). The count restarts at each new passing
//!   verification; the fifth counted sale raises.
//! - A sale whose display and encoder are both below `min_sale_l` (2 L, the minimum measured
//!   quantity) is neither counted nor compared for drift (decision 12): aborted nozzle lifts
//!   of a few centilitres are not measurements.
//! - Totalizer (decision 6): between consecutive readings (no seq gap) its advance must equal
//!   the new sale, or nothing, within max(`mpe_pct` of it, 0.02 L). Skipped across a seq gap,
//!   and when `sale_id` did not move by 0 or 1 (decision 14: a jump, a first `sale_id`, or
//!   one going back leaves the sales in between unknown).

use calwatch_protocol::{AlertKind, Severity};
use serde::{Deserialize, Serialize};
use serde_json::Value as JsonValue;

use super::mpe::{dispenser_mpe_l, dispenser_mpe_pct, within};
use super::seal::Step;
use super::{
    clear, evidence, num, raise_event, Ctx, DeviceState, Register, Touched, Values, Verdict, TIE,
};

/// The totalizer tolerance never goes below this (decision 6): the registers' resolution.
pub(crate) const TOTALIZER_MIN_TOLERANCE_L: f64 = 0.02;

/// Sales with a display/encoder deviation since the current verification.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CheatingState {
    /// Sales counted (decision 7); restarts at each new passing verification.
    pub count: u32,
    /// Deviation of the last counted sale, percent of the encoder volume; `None` for an encoder
    /// volume of 0 (unbounded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_deviation_pct: Option<f64>,
}

/// |display − encoder| / encoder in percent; `None` without a positive encoder volume.
pub(crate) fn deviation_pct(display_l: f64, encoder_l: f64) -> Option<f64> {
    (encoder_l > 0.0).then(|| (display_l - encoder_l).abs() / encoder_l * 100.0)
}

/// The sales a reading's `sale_id` reveals since the previous reading.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NewSales {
    /// The same `sale_id` (or none given): no new sale.
    None,
    /// `sale_id` advanced by one: this reading's sale is the only new one.
    One,
    /// A new sale, with an unknown number of others before it: the first `sale_id` seen, a
    /// jump by more than one, or a `sale_id` going back (decision 14).
    Unknown,
}

/// A dispenser reading. A new sale is a `sale_id` different from the last one seen, or the
/// first one seen; `sale_l` and `encoder_sale_l` describe it.
pub(super) fn check(
    ctx: &Ctx<'_>,
    state: &mut DeviceState,
    v: &Values,
    totalizer: Option<Step>,
    out: &mut Vec<Verdict>,
    touched: &mut Touched,
) {
    let sales = match (v.sale_id, state.sale_id) {
        (None, _) => NewSales::None,
        (Some(id), Some(prev)) if id == prev => NewSales::None,
        (Some(id), Some(prev)) if id == prev + 1.0 => NewSales::One,
        (Some(_), _) => NewSales::Unknown,
    };
    if v.sale_id.is_some() {
        state.sale_id = v.sale_id;
    }
    if let (Some(Step::Forward(prev)), Some(total)) = (totalizer, v.totalizer_l) {
        // Only between consecutive readings; across a seq gap sales may be missing, and
        // across a sale_id jump they are (decision 14).
        if prev.seq + 1 == ctx.seq {
            let sold = match sales {
                NewSales::None => Some(0.0),
                NewSales::One => v.sale_l,
                NewSales::Unknown => None,
            };
            if let Some(sold) = sold {
                totalizer_check(ctx, state, prev, total, sold, out);
            }
        }
    }
    if sales != NewSales::None {
        if let (Some(display), Some(encoder)) = (v.sale_l, v.encoder_sale_l) {
            sale(ctx, state, v.sale_id, display, encoder, out, touched);
        }
    }
}

/// Decision 6: a reading's `totalizer_l` includes its own sale, so the advance since the
/// previous reading must equal the new sale (or nothing) within max(`mpe_pct` of it, 0.02 L).
fn totalizer_check(
    ctx: &Ctx<'_>,
    state: &mut DeviceState,
    prev: Register,
    total: f64,
    sold: f64,
    out: &mut Vec<Verdict>,
) {
    let advance = total - prev.value;
    let tolerance =
        (dispenser_mpe_pct(ctx.device) / 100.0 * sold.abs()).max(TOTALIZER_MIN_TOLERANCE_L);
    if within(advance - sold, tolerance) {
        clear(&mut state.present, AlertKind::TotalizerMismatch, out);
        return;
    }
    let r3 = |x: f64| super::rounded(x, 3);
    raise_event(
        &mut state.present,
        AlertKind::TotalizerMismatch,
        Severity::Warning,
        ctx.ts,
        out,
        format!(
            "totalizer advanced {} L between readings {} and {}, sales {} L (tolerance ±{} L)",
            r3(advance),
            prev.seq,
            ctx.seq,
            r3(sold),
            r3(tolerance)
        ),
        evidence([
            ("advance_l", num(advance, 3)),
            ("sales_l", num(sold, 3)),
            ("difference_l", num(advance - sold, 3)),
            ("tolerance_l", num(tolerance, 3)),
            ("from_seq", JsonValue::from(prev.seq)),
            ("seq", JsonValue::from(ctx.seq)),
        ]),
    );
}

/// One new sale of at least `min_sale_l` (on display or encoder): feeds the `encoder` drift
/// source and counts a deviation beyond `cheat_deviation_pct` or a displayed volume against an
/// encoder volume of 0; from the `cheat_sales`-th counted sale on each one raises
/// `cheating_suspected` (critical), latched until the next passing verification.
fn sale(
    ctx: &Ctx<'_>,
    state: &mut DeviceState,
    sale_id: Option<f64>,
    display: f64,
    encoder: f64,
    out: &mut Vec<Verdict>,
    touched: &mut Touched,
) {
    let cfg = ctx.cfg;
    // Below the minimum measured quantity (an aborted nozzle lift), or nothing at all.
    let volume = display.max(encoder);
    if volume <= 0.0 || volume < cfg.min_sale_l * (1.0 - TIE) {
        return;
    }
    // `None`: a displayed volume against an encoder volume of 0, an unbounded deviation that
    // always counts and is no drift comparison (there is no measured volume to compare to).
    let dev = deviation_pct(display, encoder);
    if let Some(dev) = dev {
        let mpe = dispenser_mpe_l(dispenser_mpe_pct(ctx.device), encoder);
        touched.feed(
            state.drift.get_mut(super::drift::DriftSource::Encoder),
            ctx.ts,
            (display - encoder) / mpe,
            &cfg.drift,
        );
        // Exactly at the threshold does not count ("more than 0.6 %").
        if dev <= cfg.cheat_deviation_pct * (1.0 + TIE) {
            return;
        }
    }
    let c = &mut state.cheating;
    c.count = c.count.saturating_add(1);
    c.last_deviation_pct = dev;
    if c.count < cfg.cheat_sales {
        return;
    }
    let count = c.count;
    raise_event(
        &mut state.present,
        AlertKind::CheatingSuspected,
        Severity::Critical,
        ctx.ts,
        out,
        format!(
            "{count} sales with display/encoder deviation beyond {}%",
            cfg.cheat_deviation_pct
        ),
        evidence([
            ("count", JsonValue::from(count)),
            (
                "last_deviation_pct",
                dev.map_or(JsonValue::Null, |d| num(d, 3)),
            ),
            ("encoder_zero", JsonValue::from(dev.is_none())),
            ("threshold_pct", JsonValue::from(cfg.cheat_deviation_pct)),
            ("sale_id", sale_id.map_or(JsonValue::Null, JsonValue::from)),
            ("sale_l", JsonValue::from(display)),
            ("encoder_sale_l", JsonValue::from(encoder)),
        ]),
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use calwatch_protocol::{AlertKind, Severity};

    use super::super::fixtures::*;
    use super::super::{CheckConfig, DeviceState, DriftSource, Verdict};
    use super::*;
    use crate::domain::DeviceKind;

    #[test]
    fn deviation() {
        assert_eq!(
            deviation_pct(20.2, 20.0).map(|d| (d * 1e9).round() / 1e9),
            Some(1.0)
        );
        assert_eq!(deviation_pct(1.0, 0.0), None);
    }

    #[test]
    fn fifth_deviating_sale_raises_and_a_new_certificate_restarts_the_count() {
        let mut d = device(DeviceKind::Dispenser, None);
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let mut seq = 0;
        let mut sale = |d: &crate::domain::Device,
                        st: &mut DeviceState,
                        id: f64,
                        display: f64,
                        encoder: f64| {
            seq += 1;
            run(
                d,
                st,
                &cfg,
                seq,
                seq as i64 * 60_000,
                &[
                    ("sale_id", n(id)),
                    ("sale_l", n(display)),
                    ("encoder_sale_l", n(encoder)),
                ],
            )
        };
        // the first sale seen is judged like any other (here a clean one)
        assert!(sale(&d, &mut st, 100.0, 20.0, 20.0).is_empty());
        assert_eq!(st.cheating.count, 0);
        for id in 101..=104 {
            assert!(
                sale(&d, &mut st, id as f64, 20.2, 20.0).is_empty(),
                "sale {id}"
            );
            // the same sale polled again is not another sale
            assert!(sale(&d, &mut st, id as f64, 20.2, 20.0).is_empty());
        }
        assert_eq!(st.cheating.count, 4);
        // exactly 0.6 % and a clean sale do not count
        assert!(sale(&d, &mut st, 105.0, 50.3, 50.0).is_empty());
        assert!(sale(&d, &mut st, 106.0, 35.02, 35.02).is_empty());
        assert_eq!(st.cheating.count, 4);
        let v = sale(&d, &mut st, 107.0, 40.0, 40.364);
        assert_eq!(
            raised(&v),
            [(AlertKind::CheatingSuspected, Severity::Critical)]
        );
        let Verdict::Raise {
            message, evidence, ..
        } = &v[0]
        else {
            panic!()
        };
        assert_eq!(
            message,
            "5 sales with display/encoder deviation beyond 0.6%"
        );
        assert_eq!(evidence["last_deviation_pct"], 0.902);
        assert_eq!(evidence["count"], 5);
        // each further deviating sale repeats it
        assert_eq!(raised(&sale(&d, &mut st, 108.0, 20.2, 20.0)).len(), 1);
        // re-verified: cleared, the count restarts
        d.certificates
            .push(cert("C-2", 14 * 60_000, Some(400 * DAY), true, None, None));
        let v = sale(&d, &mut st, 109.0, 20.2, 20.0);
        assert_eq!(v, [clear_of(AlertKind::CheatingSuspected)]);
        assert_eq!(st.cheating.count, 1);
    }

    #[test]
    fn totalizer_match_mismatch_and_gap() {
        let mut d = device(DeviceKind::Dispenser, None);
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        let cfg = CheckConfig::default();
        let mut st = DeviceState::default();
        let r = |st: &mut DeviceState, seq, total, id, sale| {
            totalizer_at(&d, &cfg, st, seq, total, id, sale)
        };
        assert!(r(&mut st, 1, 1000.0, 1.0, 10.0).is_empty());
        // a new 20 L sale, included in the totalizer
        assert!(r(&mut st, 2, 1020.0, 2.0, 20.0).is_empty());
        // no new sale, no advance; then an advance within the 0.02 L floor
        assert!(r(&mut st, 3, 1020.0, 2.0, 20.0).is_empty());
        assert!(r(&mut st, 4, 1020.02, 2.0, 20.0).is_empty());
        // advance without a sale
        let v = r(&mut st, 5, 1020.05, 2.0, 20.0);
        assert_eq!(
            raised(&v),
            [(AlertKind::TotalizerMismatch, Severity::Warning)]
        );
        let Verdict::Raise {
            message, evidence, ..
        } = &v[0]
        else {
            panic!()
        };
        assert_eq!(
            message,
            "totalizer advanced 0.03 L between readings 4 and 5, sales 0 L (tolerance ±0.02 L)"
        );
        assert_eq!(evidence["difference_l"], 0.03);
        // a 30 L sale, totalizer +30.15: exactly 0.5 %, within; clears
        assert_eq!(
            r(&mut st, 6, 1050.2, 3.0, 30.0),
            [clear_of(AlertKind::TotalizerMismatch)]
        );
        // +30.16 is not
        assert_eq!(raised(&r(&mut st, 7, 1080.36, 4.0, 30.0)).len(), 1);
        // across a seq gap: skipped
        assert!(r(&mut st, 9, 2000.0, 5.0, 1.0).is_empty());
        // and between consecutive readings again
        assert_eq!(
            r(&mut st, 10, 2001.0, 6.0, 1.0),
            [clear_of(AlertKind::TotalizerMismatch)]
        );
    }

    /// A dispenser under C-1 and a sale function: (sale_id, display, encoder) → verdicts, one
    /// reading a minute.
    /// One reading of a dispenser's totalizer with the last sale (display = encoder), a
    /// minute of event time per seq.
    fn totalizer_at(
        d: &crate::domain::Device,
        cfg: &CheckConfig,
        st: &mut DeviceState,
        seq: u64,
        total: f64,
        id: f64,
        sale: f64,
    ) -> Vec<Verdict> {
        dispenser_reading(d, cfg, st, seq, Some(total), id, sale, sale)
    }

    fn dispenser() -> (crate::domain::Device, CheckConfig, DeviceState) {
        let mut d = device(DeviceKind::Dispenser, None);
        d.certificates
            .push(cert("C-1", 0, Some(400 * DAY), true, None, None));
        (d, CheckConfig::default(), DeviceState::default())
    }

    fn sale_at(
        d: &crate::domain::Device,
        cfg: &CheckConfig,
        st: &mut DeviceState,
        seq: u64,
        id: f64,
        display: f64,
        encoder: f64,
    ) -> Vec<Verdict> {
        dispenser_reading(d, cfg, st, seq, None, id, display, encoder)
    }

    /// A dispenser reading at minute `seq`: the last sale, with the totalizer if given.
    #[allow(clippy::too_many_arguments)]
    fn dispenser_reading(
        d: &crate::domain::Device,
        cfg: &CheckConfig,
        st: &mut DeviceState,
        seq: u64,
        totalizer: Option<f64>,
        id: f64,
        display: f64,
        encoder: f64,
    ) -> Vec<Verdict> {
        let mut values = vec![
            ("sale_id", n(id)),
            ("sale_l", n(display)),
            ("encoder_sale_l", n(encoder)),
        ];
        if let Some(total) = totalizer {
            values.insert(0, ("totalizer_l", n(total)));
        }
        run(d, st, cfg, seq, seq as i64 * 60_000, &values)
    }

    /// Issue #16 item 3, decision 12: a board that blanks the encoder (35.02 L displayed,
    /// 0 L measured) was never counted; five such sales now raise `cheating_suspected`, with
    /// evidence that is finite JSON (the unbounded deviation is `null`, `encoder_zero` says
    /// why).
    #[test]
    fn a_blanked_encoder_counts_with_finite_evidence() {
        let (d, cfg, mut st) = dispenser();
        assert!(sale_at(&d, &cfg, &mut st, 1, 100.0, 20.0, 20.0).is_empty());
        for id in 101..=104u64 {
            let v = sale_at(&d, &cfg, &mut st, id - 99, id as f64, 35.02, 0.0);
            assert!(v.is_empty(), "sale {id}: {v:?}");
        }
        assert_eq!(st.cheating.count, 4);
        let v = sale_at(&d, &cfg, &mut st, 6, 105.0, 35.02, 0.0);
        assert_eq!(
            raised(&v),
            [(AlertKind::CheatingSuspected, Severity::Critical)]
        );
        let Verdict::Raise { evidence, .. } = &v[0] else {
            panic!()
        };
        assert_eq!(evidence["count"], 5);
        assert_eq!(evidence["last_deviation_pct"], JsonValue::Null);
        assert_eq!(evidence["encoder_zero"], true);
        assert_eq!(evidence["encoder_sale_l"], 0.0);
        let text = serde_json::to_string(evidence).unwrap();
        assert!(!text.contains("inf") && !text.contains("NaN"), "{text}");
        // the state stays finite too, and a blanked encoder is no drift comparison
        assert_eq!(st.cheating.last_deviation_pct, None);
        assert_eq!(st.drift.get(DriftSource::Encoder).comparisons, 1);
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(
            serde_json::from_str::<DeviceState>(&json).unwrap().cheating,
            st.cheating
        );
        // nothing displayed, nothing measured: not a sale
        assert_eq!(raised(&sale_at(&d, &cfg, &mut st, 7, 106.0, 0.0, 0.0)), []);
        assert_eq!(st.cheating.count, 5);
    }

    /// Issue #16 item 3, decision 12: aborted nozzle lifts of 0.02 L against 0.015 L are
    /// 33 % deviations; below `min_sale_l` (2 L) they are not counted (before: the fifth
    /// raised `cheating_suspected` against an honest station) and feed no drift either.
    /// 2 L itself is a measured quantity.
    #[test]
    fn sales_below_the_minimum_measured_quantity_do_not_count() {
        let (d, cfg, mut st) = dispenser();
        for seq in 1..=10u64 {
            let v = sale_at(&d, &cfg, &mut st, seq, seq as f64, 0.02, 0.015);
            assert!(v.is_empty(), "lift {seq}: {v:?}");
        }
        assert_eq!(st.cheating.count, 0);
        assert_eq!(st.drift.get(DriftSource::Encoder).comparisons, 0);
        // 1.99 L displayed, 1.9 L measured: below 2 L on both sides, not counted
        assert!(sale_at(&d, &cfg, &mut st, 11, 11.0, 1.99, 1.9).is_empty());
        assert_eq!(st.cheating.count, 0);
        // 2.02 L against 2.0 L (1 %): counted
        assert!(sale_at(&d, &cfg, &mut st, 12, 12.0, 2.02, 2.0).is_empty());
        assert_eq!(st.cheating.count, 1);
    }

    /// Issue #16 item 3: the first sale ever seen was a baseline and never judged; display
    /// against encoder needs no baseline, so it counts (and the fifth deviating sale is the
    /// fifth, not the sixth, sale seen).
    #[test]
    fn the_first_sale_seen_is_judged() {
        let (d, cfg, mut st) = dispenser();
        assert!(sale_at(&d, &cfg, &mut st, 1, 100.0, 20.2, 20.0).is_empty());
        assert_eq!(st.cheating.count, 1);
        assert_eq!(st.drift.get(DriftSource::Encoder).comparisons, 1);
        for id in 101..=103u64 {
            assert!(sale_at(&d, &cfg, &mut st, id - 99, id as f64, 20.2, 20.0).is_empty());
        }
        let v = sale_at(&d, &cfg, &mut st, 5, 104.0, 20.2, 20.0);
        assert_eq!(
            raised(&v),
            [(AlertKind::CheatingSuspected, Severity::Critical)]
        );
    }

    /// Issue #16 item 4, decision 14: sale_id 1 → 3 between consecutive readings: sale 2
    /// (30 L) was never seen, so the totalizer's 50 L advance against the 20 L of sale 3 is
    /// no mismatch (before: `totalizer_mismatch` on 30 L); the check resumes afterwards.
    #[test]
    fn totalizer_is_not_judged_across_skipped_sales() {
        let (d, cfg, mut st) = dispenser();
        let r = |st: &mut DeviceState, seq, total, id, sale| {
            totalizer_at(&d, &cfg, st, seq, total, id, sale)
        };
        assert!(r(&mut st, 1, 1000.0, 1.0, 10.0).is_empty());
        assert!(r(&mut st, 2, 1050.0, 3.0, 20.0).is_empty());
        // a sale_id going backwards (a reset controller) leaves the sales unknown too
        assert!(r(&mut st, 3, 1090.0, 1.0, 25.0).is_empty());
        // consecutive sale ids again: judged
        assert!(r(&mut st, 4, 1110.0, 2.0, 20.0).is_empty());
        let v = r(&mut st, 5, 1140.0, 3.0, 20.0);
        assert_eq!(
            raised(&v),
            [(AlertKind::TotalizerMismatch, Severity::Warning)]
        );
    }
}
