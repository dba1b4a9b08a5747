//! Calendar arithmetic for certificate dates (UTC), without a date-time dependency.

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Year, month, day of a day number since 1970-01-01.
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

const DAY_MS: i64 = 86_400_000;

/// A parsed ISO 8601 date or timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DateOrTime {
    /// A calendar day: the day's first millisecond (UTC).
    Date(i64),
    /// An instant, in Unix ms.
    Instant(i64),
}

impl DateOrTime {
    /// The first millisecond it covers.
    pub(crate) fn start_ms(self) -> i64 {
        match self {
            DateOrTime::Date(ms) | DateOrTime::Instant(ms) => ms,
        }
    }

    /// The first millisecond after it: a date-only `valid_until` is valid through the end of
    /// that day (DESIGN decision 2).
    pub(crate) fn end_exclusive_ms(self) -> i64 {
        match self {
            DateOrTime::Date(ms) => ms + DAY_MS,
            DateOrTime::Instant(ms) => ms,
        }
    }
}

fn num(s: &str, what: &str) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad {what} {s:?}"));
    }
    s.parse().map_err(|_| format!("bad {what} {s:?}"))
}

/// Parses `YYYY-MM-DD`, or `YYYY-MM-DDTHH:MM[:SS[.fff]]` followed by `Z` or `±HH:MM`
/// (a timestamp without an offset is UTC).
pub(crate) fn parse_iso8601(s: &str) -> Result<DateOrTime, String> {
    let bad = |why: &str| format!("{s:?} is not an ISO 8601 date or timestamp: {why}");
    let (date, time) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let parts: Vec<&str> = date.split('-').collect();
    if parts.len() != 3 || parts[0].len() != 4 || parts[1].len() != 2 || parts[2].len() != 2 {
        return Err(bad("expected YYYY-MM-DD"));
    }
    let y = num(parts[0], "year").map_err(|e| bad(&e))?;
    let m = num(parts[1], "month").map_err(|e| bad(&e))?;
    let d = num(parts[2], "day").map_err(|e| bad(&e))?;
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(i64::from(y), m) {
        return Err(bad("no such day"));
    }
    let day_ms = days_from_civil(i64::from(y), m, d) * DAY_MS;
    let Some(time) = time else {
        return Ok(DateOrTime::Date(day_ms));
    };
    let (clock, offset_ms) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else if let Some(i) = time.rfind(['+', '-']) {
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let hm: Vec<&str> = off[1..].split(':').collect();
        if hm.len() != 2 {
            return Err(bad("offset must be ±HH:MM"));
        }
        let h = num(hm[0], "offset hour").map_err(|e| bad(&e))?;
        let mi = num(hm[1], "offset minute").map_err(|e| bad(&e))?;
        if h > 23 || mi > 59 {
            return Err(bad("offset out of range"));
        }
        (
            c,
            sign * (i64::from(h) * 3_600_000 + i64::from(mi) * 60_000),
        )
    } else {
        (time, 0)
    };
    let hms: Vec<&str> = clock.split(':').collect();
    if hms.len() < 2 || hms.len() > 3 {
        return Err(bad("expected HH:MM[:SS]"));
    }
    let h = num(hms[0], "hour").map_err(|e| bad(&e))?;
    let mi = num(hms[1], "minute").map_err(|e| bad(&e))?;
    let (sec, ms) = match hms.get(2) {
        None => (0, 0),
        Some(sf) => {
            let (sec, frac) = sf.split_once('.').unwrap_or((sf, ""));
            let ms = if frac.is_empty() {
                0
            } else {
                let digits: String = frac.chars().chain("000".chars()).take(3).collect();
                num(&digits, "fraction").map_err(|e| bad(&e))?
            };
            if !frac.is_empty() && !frac.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("bad fraction"));
            }
            (num(sec, "second").map_err(|e| bad(&e))?, ms)
        }
    };
    if h > 23 || mi > 59 || sec > 60 {
        return Err(bad("time out of range"));
    }
    let ms = day_ms
        + i64::from(h) * 3_600_000
        + i64::from(mi) * 60_000
        + i64::from(sec) * 1000
        + i64::from(ms)
        - offset_ms;
    Ok(DateOrTime::Instant(ms))
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `YYYY-MM-DD` of a Unix ms instant (UTC).
pub fn format_date(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` of a Unix ms instant (RFC 3339, UTC).
pub(crate) fn format_timestamp(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    let t = ms.rem_euclid(DAY_MS);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        t / 3_600_000,
        t / 60_000 % 60,
        t / 1000 % 60,
        t % 1000
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_instants() {
        assert_eq!(parse_iso8601("1970-01-01").unwrap(), DateOrTime::Date(0));
        assert_eq!(
            parse_iso8601("2026-03-01").unwrap().start_ms(),
            1_772_323_200_000
        );
        assert_eq!(
            parse_iso8601("2026-03-01").unwrap().end_exclusive_ms(),
            1_772_409_600_000
        );
        assert_eq!(
            parse_iso8601("2025-11-29T13:00:00.123Z").unwrap(),
            DateOrTime::Instant(1_764_421_200_123)
        );
        assert_eq!(
            parse_iso8601("2025-11-29T15:00:00+02:00").unwrap(),
            DateOrTime::Instant(1_764_421_200_000)
        );
        assert_eq!(
            parse_iso8601("2024-02-29").unwrap().start_ms(),
            1_709_164_800_000
        );
        for bad in [
            "2025-02-29",
            "2026-13-01",
            "26-03-01",
            "2026-03-01T25:00",
            "yesterday",
            "",
            "2026-03-01T10:00+5",
        ] {
            assert!(parse_iso8601(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn civil_round_trip() {
        for z in [-800_000, -1, 0, 1, 19_000, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(format_date(1_772_323_200_000), "2026-03-01");
        assert_eq!(
            format_timestamp(1_764_421_200_123),
            "2025-11-29T13:00:00.123Z"
        );
    }
}
