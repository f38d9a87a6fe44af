//! Times given to and shown by the admin commands: UTC, ISO-8601 as the
//! database stores them (`2026-11-25T17:56:33Z`), held as nanoseconds since
//! the epoch so that file modification times compare exactly.

use crate::worker::db::iso8601;

const NANOS: i128 = 1_000_000_000;

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm, the
/// inverse of the one in [`iso8601`]).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn num(s: &str, len: usize, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
    if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|n| range.contains(n))
}

/// Parse a time: `2026-11-25`, `2026-11-25T17:56`, `2026-11-25T17:56:33`
/// (a space may replace the `T`, a `Z` may follow; always UTC), or `@SECONDS`
/// since the epoch. Returns nanoseconds since the epoch.
pub fn parse_time(s: &str) -> Result<i128, String> {
    let bad = || format!("invalid time {s:?} (use UTC: 2026-11-25, 2026-11-25T17:56:33Z or @SECONDS)");
    let t = s.trim();
    if let Some(secs) = t.strip_prefix('@') {
        return secs.parse::<i64>().map(|n| i128::from(n) * NANOS).map_err(|_| bad());
    }
    let t = t.strip_suffix('Z').unwrap_or(t);
    let (date, clock) = match t.split_once(['T', ' ']) {
        Some((d, c)) => (d, Some(c)),
        None => (t, None),
    };
    let mut d = date.split('-');
    let (Some(y), Some(m), Some(day), None) = (d.next(), d.next(), d.next(), d.next()) else {
        return Err(bad());
    };
    let y = num(y, 4, 0..=9999).ok_or_else(bad)?;
    let m = num(m, 2, 1..=12).ok_or_else(bad)?;
    let day = num(day, 2, 1..=31).ok_or_else(bad)?;
    let mut secs = days_from_civil(y, m, day) * 86_400;
    if let Some(c) = clock {
        let mut p = c.split(':');
        let h = p.next().and_then(|h| num(h, 2, 0..=23)).ok_or_else(bad)?;
        let min = p.next().and_then(|v| num(v, 2, 0..=59)).ok_or_else(bad)?;
        let sec = match p.next() {
            Some(v) => num(v, 2, 0..=60).ok_or_else(bad)?,
            None => 0,
        };
        if p.next().is_some() {
            return Err(bad());
        }
        secs += h * 3600 + min * 60 + sec;
    }
    Ok(i128::from(secs) * NANOS)
}

/// ISO-8601 UTC of nanoseconds since the epoch (whole seconds, rounded down).
pub fn format_nanos(nanos: i128) -> String {
    iso8601(u64::try_from(nanos.div_euclid(NANOS)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_the_database_format() {
        for secs in [0u64, 951_782_400, 1_795_629_393] {
            let iso = iso8601(secs);
            assert_eq!(parse_time(&iso), Ok(i128::from(secs) * NANOS), "{iso}");
            assert_eq!(format_nanos(i128::from(secs) * NANOS + 5), iso);
        }
        assert_eq!(parse_time("2026-11-25"), parse_time("2026-11-25T00:00:00Z"));
        assert_eq!(parse_time("2026-11-25 17:56"), parse_time("2026-11-25T17:56:00"));
        assert_eq!(parse_time("@1795629393"), Ok(1_795_629_393 * NANOS));
        for bad in ["", "yesterday", "2026-13-01", "2026-11-25T25:00", "2026-11-25T10:00:00:00", "@x"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
