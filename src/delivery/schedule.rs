//! When to try again: the configured schedule with ±10 % jitter, or what the receiver asked for in
//! `Retry-After` (seconds or an HTTP date), capped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The delay before the next attempt after `failed` failed attempts in this round (1 = the first
/// attempt failed), or `None` when the round is over (the event is dead-lettered).
pub fn next_delay(
    schedule: &[Duration],
    failed: u32,
    retry_after: Option<Duration>,
    retry_after_max: Duration,
    random: u64,
) -> Option<Duration> {
    let base = *schedule.get(failed.checked_sub(1)? as usize)?;
    if let Some(asked) = retry_after {
        return Some(asked.min(retry_after_max));
    }
    Some(jitter(base, random))
}

/// `base` moved by up to ±10 %, from a random number.
pub fn jitter(base: Duration, random: u64) -> Duration {
    let micros = base.as_micros() as i64;
    let span = micros / 10;
    if span == 0 {
        return base;
    }
    let offset = (random % (2 * span as u64 + 1)) as i64 - span;
    Duration::from_micros((micros + offset).max(0) as u64)
}

/// Attempts in one round: the first plus one per scheduled retry.
pub fn attempts_per_round(schedule: &[Duration]) -> u32 {
    schedule.len() as u32 + 1
}

/// Parse a `Retry-After` value: delta-seconds or an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(value)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Unix seconds of an IMF-fixdate.
fn parse_http_date(s: &str) -> Option<u64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let b = s.as_bytes();
    if b.len() != 29 || &b[3..5] != b", " || &b[25..] != b" GMT" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let day = num(5..7)?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| Some(*m) == s.get(8..11))? as u64
        + 1;
    let year = num(12..16)?;
    let (h, m, sec) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 || year < 1970 {
        return None;
    }
    // Days from civil (Howard Hinnant), inverse of the formatter in ids.rs.
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn follows_the_schedule_then_stops() {
        let schedule = [1, 2, 4, 8, 16].map(s);
        for (failed, base) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16)] {
            let d = next_delay(&schedule, failed, None, s(60), 12345).unwrap();
            let b = s(base).as_secs_f64();
            assert!(
                (b * 0.9..=b * 1.1).contains(&d.as_secs_f64()),
                "{failed}: {d:?}"
            );
        }
        assert_eq!(
            next_delay(&schedule, 6, None, s(60), 0),
            None,
            "six failed attempts: dead"
        );
        assert_eq!(next_delay(&schedule, 0, None, s(60), 0), None);
        assert_eq!(attempts_per_round(&schedule), 6);
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let schedule = [1, 2].map(s);
        assert_eq!(next_delay(&schedule, 1, Some(s(30)), s(60), 0), Some(s(30)));
        assert_eq!(
            next_delay(&schedule, 1, Some(s(600)), s(60), 0),
            Some(s(60))
        );
        assert_eq!(
            next_delay(&schedule, 3, Some(s(5)), s(60), 0),
            None,
            "no retries left"
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for r in 0..1000u64 {
            let d = jitter(s(10), r.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert!((s(9)..=s(11)).contains(&d), "{d:?}");
        }
    }

    #[test]
    fn parses_both_retry_after_forms() {
        let now = UNIX_EPOCH + s(784_111_777);
        assert_eq!(parse_retry_after(" 120 ", now), Some(s(120)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(s(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(s(0)),
            "past dates: now"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        // The formatter's output parses back.
        let text = crate::ids::http_date(1_795_000_000);
        assert_eq!(
            parse_http_date(std::str::from_utf8(&text).unwrap()),
            Some(1_795_000_000)
        );
    }
}
