//! The time-series schema of CONTRACT §4, in one place: every point the gateway writes, with
//! its measurement, tags and fields. Callers say what happened (a reading checked, an alert
//! transition, a sweep's status of a device, a coverage group); this module says how it is
//! stored. The line-protocol encoding itself is `crate::sink::line`.

use calwatch_protocol::{AlertEvent, ReadingRef};

use crate::checks::drift::DriftSummary;
use crate::checks::SavedDevice;
use crate::domain::{Device, DeviceKind, VState};
use crate::sink::line::{LineBuffer, Point};

/// A point of `measurement` with a device's series tags: `device`, `kind`, `owner`, `site`,
/// `vstate` (the tags of `reading` and `device_status`).
fn device_point<'a>(
    lines: &'a mut LineBuffer,
    measurement: &str,
    d: &Device,
    vstate: VState,
) -> Point<'a> {
    lines.point(measurement).plain_tags([
        ("device", d.id.as_str()),
        ("kind", d.kind.as_str()),
        ("owner", d.owner.as_str()),
        ("site", d.site.as_str()),
        ("vstate", vstate.as_str()),
    ])
}

/// A `reading` point: every value of the reading (bools as booleans) and `seq`, at its `ts`.
pub(crate) fn reading(lines: &mut LineBuffer, device: &Device, vstate: VState, r: &ReadingRef<'_>) {
    let mut p = device_point(lines, "reading", device, vstate);
    for (name, value, text) in r.values.iter_with_text() {
        // `seq` is the reading's own field; a value of that name would collide with it.
        if name == "seq" {
            continue;
        }
        p = p.value(name, value, text);
    }
    p.int("seq", i64::try_from(r.seq).unwrap_or(i64::MAX))
        .finish(r.ts);
}

/// An `alert` point of `e` at `ts_ms` (its `updated` time for a transition, the sweep time
/// for the periodic point of an open alert).
pub(crate) fn alert(lines: &mut LineBuffer, e: &AlertEvent, ts_ms: i64) {
    lines
        .point("alert")
        .tag("device", e.device.as_str())
        .tag("kind", e.kind.as_str())
        .tag("severity", e.severity.as_str())
        .tag("state", e.state.as_str())
        .tag("owner", e.owner.as_str())
        .tag("site", e.site.as_str())
        .int("count", i64::try_from(e.count).unwrap_or(i64::MAX))
        .string("message", &e.message)
        .finish(ts_ms);
}

/// A `device_status` point at `now_ms`: days to due, the drift statistics, seconds since the
/// last reading and the sequence gaps; a field without a value is left out.
pub(crate) fn device_status(
    lines: &mut LineBuffer,
    device: &Device,
    vstate: VState,
    saved: &SavedDevice,
    days_to_due: Option<f64>,
    drift: &DriftSummary,
    now_ms: i64,
) {
    let mut p = device_point(lines, "device_status", device, vstate);
    if let Some(days) = days_to_due {
        p = p.float("days_to_due", days);
    }
    for (name, value) in [
        ("r_ewma", drift.r_ewma),
        ("cusum_pos", drift.cusum_pos),
        ("cusum_neg", drift.cusum_neg),
    ] {
        if let Some(x) = value {
            p = p.float(name, x);
        }
    }
    if let Some(last) = saved.state.last_ts {
        p = p.float("last_seen_s", (now_ms - last) as f64 / 1000.0);
    }
    p.int("gaps", i64::try_from(saved.gaps).unwrap_or(i64::MAX))
        .finish(now_ms);
}

/// A `coverage` point of one (owner, site, kind) group at `now_ms`; `coverage_pct` only when
/// something is in use (a group that emptied reads `in_use=0i`, not its last value).
pub(crate) fn coverage(
    lines: &mut LineBuffer,
    (owner, site, kind): (&str, &str, DeviceKind),
    in_use: i64,
    verified: i64,
    now_ms: i64,
) {
    let mut p = lines
        .point("coverage")
        .tag("owner", owner)
        .tag("site", site)
        .tag("kind", kind.as_str())
        .int("in_use", in_use)
        .int("verified", verified);
    if in_use > 0 {
        p = p.float("coverage_pct", 100.0 * verified as f64 / in_use as f64);
    }
    p.finish(now_ms);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sink::line::tag_set;

    #[test]
    fn device_tags_are_the_escaped_tag_set() {
        let d = Device {
            id: calwatch_protocol::Id::new("HS-MTR-0007").unwrap(),
            kind: DeviceKind::EnergyMeter,
            owner: calwatch_protocol::Id::new("works.2_a").unwrap(),
            site: calwatch_protocol::Id::new("plant-1").unwrap(),
            agent: calwatch_protocol::Id::new("a").unwrap(),
            model: Default::default(),
            serial: Default::default(),
            accuracy_class: None,
            max: None,
            e: None,
            mpe_pct: None,
            interval_s: 1,
            reference_device: None,
            certificates: Vec::new(),
        };
        let mut a = LineBuffer::new();
        device_point(&mut a, "reading", &d, VState::Valid)
            .int("seq", 1)
            .finish(5);
        let mut b = LineBuffer::new();
        let set = tag_set(&[
            ("device", d.id.as_str()),
            ("kind", d.kind.as_str()),
            ("owner", d.owner.as_str()),
            ("site", d.site.as_str()),
            ("vstate", "valid"),
        ]);
        b.point("reading").tags(&set).int("seq", 1).finish(5);
        assert_eq!(a.as_str(), b.as_str());
        assert_eq!(
            a.as_str(),
            "reading,device=HS-MTR-0007,kind=energy_meter,owner=works.2_a,site=plant-1,vstate=valid seq=1i 5\n"
        );
    }
}
