//! Calendar arithmetic for certificate dates. A date-only date is a day in the gateway's
//! [`Zone`] (`[checks] timezone`, DESIGN decision 18; default UTC); a full timestamp is an
//! instant whatever the zone.

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

/// The time zone whose days the date-only certificate dates are (`[checks] timezone`, DESIGN
/// decision 18): an IANA name such as `Asia/Shanghai`, with its rules bundled in the binary;
/// UTC by default. A day in it may be 23 or 25 hours long (daylight saving time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone(jiff::tz::TimeZone);

impl Default for Zone {
    fn default() -> Self {
        Zone::utc()
    }
}

impl Zone {
    pub fn utc() -> Zone {
        Zone(jiff::tz::TimeZone::UTC)
    }

    /// The zone of an IANA name (case-insensitive, e.g. `Asia/Shanghai`, `Europe/Berlin`, `UTC`).
    pub fn named(name: &str) -> Result<Zone, String> {
        match jiff::tz::db().get(name) {
            Ok(tz) if !tz.is_unknown() => Ok(Zone(tz)),
            _ => Err(format!(
                "unknown time zone {name:?} (expected an IANA name such as \"UTC\", \"Asia/Shanghai\" or \"Europe/Berlin\")"
            )),
        }
    }

    /// Its IANA name (`UTC` for the default).
    pub fn name(&self) -> &str {
        self.0.iana_name().unwrap_or("UTC")
    }

    fn is_utc(&self) -> bool {
        self.0 == jiff::tz::TimeZone::UTC
    }

    /// The first millisecond of day `day` (days since 1970-01-01) in this zone: local
    /// midnight, or the first instant after it when a clock change skips midnight. Outside
    /// the years the zone rules cover (around ±9999) the day is taken as a UTC day.
    fn day_start_ms(&self, day: i64) -> i64 {
        let utc = day.saturating_mul(DAY_MS);
        if self.is_utc() {
            return utc;
        }
        let (y, m, d) = civil_from_days(day);
        i16::try_from(y)
            .ok()
            .and_then(|y| jiff::civil::Date::new(y, m as i8, d as i8).ok())
            .and_then(|date| date.to_zoned_datetime(self.0.clone()).ok())
            .map_or(utc, |z| z.timestamp().as_millisecond())
    }

    /// `YYYY-MM-DD` of the day in this zone that holds a Unix ms instant.
    pub fn format_date(&self, ms: i64) -> String {
        if self.is_utc() {
            return format_date(ms);
        }
        match jiff::Timestamp::from_millisecond(ms) {
            Ok(ts) => {
                let d = self.0.to_datetime(ts).date();
                format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day())
            }
            Err(_) => format_date(ms),
        }
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Zone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Zone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Zone, D::Error> {
        let name = String::deserialize(d)?;
        Zone::named(&name).map_err(serde::de::Error::custom)
    }
}

/// A parsed ISO 8601 date or timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DateOrTime {
    /// A calendar day, as days since 1970-01-01: which instants it covers depends on the
    /// [`Zone`].
    Date(i64),
    /// An instant, in Unix ms.
    Instant(i64),
}

impl DateOrTime {
    /// The first millisecond it covers: a date-only `verified_at` starts at the beginning of
    /// that day in `zone`.
    pub(crate) fn start_ms(self, zone: &Zone) -> i64 {
        match self {
            DateOrTime::Date(day) => zone.day_start_ms(day),
            DateOrTime::Instant(ms) => ms,
        }
    }

    /// The first millisecond after it: a date-only `valid_until` is valid through the end of
    /// that day in `zone` (DESIGN decisions 2, 18), so this is the next local midnight.
    pub(crate) fn end_exclusive_ms(self, zone: &Zone) -> i64 {
        match self {
            DateOrTime::Date(day) => zone.day_start_ms(day + 1),
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
    let day = days_from_civil(i64::from(y), m, d);
    let day_ms = day * DAY_MS;
    let Some(time) = time else {
        return Ok(DateOrTime::Date(day));
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
        let utc = Zone::default();
        assert_eq!(
            parse_iso8601("2026-03-01").unwrap().start_ms(&utc),
            1_772_323_200_000
        );
        assert_eq!(
            parse_iso8601("2026-03-01").unwrap().end_exclusive_ms(&utc),
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
            parse_iso8601("2024-02-29").unwrap().start_ms(&utc),
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

    /// Unix ms of an RFC 3339 timestamp, for readable expectations.
    fn at(s: &str) -> i64 {
        match parse_iso8601(s).unwrap() {
            DateOrTime::Instant(ms) => ms,
            DateOrTime::Date(_) => panic!("{s} is a date"),
        }
    }

    #[test]
    fn date_only_dates_are_days_in_the_zone() {
        let shanghai = Zone::named("Asia/Shanghai").unwrap();
        let feb28 = parse_iso8601("2026-02-28").unwrap();
        // UTC+8 all year: the day runs from 16:00Z the day before to 16:00Z.
        assert_eq!(feb28.start_ms(&shanghai), at("2026-02-27T16:00:00Z"));
        assert_eq!(
            feb28.end_exclusive_ms(&shanghai),
            at("2026-02-28T16:00:00Z")
        );
        assert_eq!(
            feb28.end_exclusive_ms(&Zone::utc()),
            at("2026-03-01T00:00:00Z")
        );
        // a full timestamp keeps its own meaning whatever the zone
        let t = parse_iso8601("2026-02-28T10:00:00+02:00").unwrap();
        assert_eq!(t.start_ms(&shanghai), at("2026-02-28T08:00:00Z"));
        assert_eq!(t.end_exclusive_ms(&shanghai), at("2026-02-28T08:00:00Z"));
        assert_eq!(
            shanghai.format_date(at("2026-02-28T15:59:59.999Z")),
            "2026-02-28"
        );
        assert_eq!(
            shanghai.format_date(at("2026-02-28T16:00:00Z")),
            "2026-03-01"
        );
        assert_eq!(
            Zone::utc().format_date(at("2026-02-28T16:00:00Z")),
            "2026-02-28"
        );
        assert_eq!(shanghai.name(), "Asia/Shanghai");
        assert_eq!(Zone::default().name(), "UTC");
    }

    #[test]
    fn days_of_23_and_25_hours_under_daylight_saving_time() {
        let berlin = Zone::named("Europe/Berlin").unwrap();
        let spring = parse_iso8601("2026-03-29").unwrap();
        assert_eq!(spring.start_ms(&berlin), at("2026-03-28T23:00:00Z"));
        assert_eq!(spring.end_exclusive_ms(&berlin), at("2026-03-29T22:00:00Z"));
        assert_eq!(
            spring.end_exclusive_ms(&berlin) - spring.start_ms(&berlin),
            23 * 3_600_000
        );
        let autumn = parse_iso8601("2026-10-25").unwrap();
        assert_eq!(
            autumn.end_exclusive_ms(&berlin) - autumn.start_ms(&berlin),
            25 * 3_600_000
        );
        assert_eq!(
            berlin.format_date(at("2026-03-29T21:59:59.999Z")),
            "2026-03-29"
        );
        assert_eq!(berlin.format_date(at("2026-03-29T22:00:00Z")), "2026-03-30");
        // São Paulo 2018-11-04: clocks went from 00:00 to 01:00, so the day began at 01:00
        // local (03:00Z), the first instant it had.
        let sao_paulo = Zone::named("America/Sao_Paulo").unwrap();
        let skipped = parse_iso8601("2018-11-04").unwrap();
        assert_eq!(skipped.start_ms(&sao_paulo), at("2018-11-04T03:00:00Z"));
    }

    #[test]
    fn zone_names() {
        assert_eq!(Zone::named("utc").unwrap(), Zone::utc());
        assert_eq!(
            Zone::named("asia/shanghai").unwrap().name(),
            "Asia/Shanghai"
        );
        for bad in ["Asia/Shanghia", "Mars/Olympus", "", "+08:00", "Etc/Unknown"] {
            let err = Zone::named(bad).unwrap_err();
            assert!(err.contains("unknown time zone"), "{bad}: {err}");
        }
        // the years at the edge of what zone rules cover are taken as UTC days, never a panic
        let last = parse_iso8601("9999-12-31").unwrap();
        let shanghai = Zone::named("Asia/Shanghai").unwrap();
        assert!(last.end_exclusive_ms(&shanghai) > last.start_ms(&shanghai));
        assert_eq!(
            shanghai.format_date(i64::MAX - 1),
            format_date(i64::MAX - 1)
        );
        let first = parse_iso8601("0000-01-01").unwrap();
        assert!(first.end_exclusive_ms(&shanghai) > first.start_ms(&shanghai));
    }
}
