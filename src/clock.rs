//! Wall-clock time as sunopoll stores it (Unix milliseconds), the [`Clock`] the job loops read
//! it from (a seam tests can step), how a step of the wall clock is told from the monotonic
//! clock's steady count ([`clock_step`]), and the human forms of times and durations: `"30s"`,
//! `"1h30m"`, `"2026-01-01 00:00:41"`.
//!
//! Waiting is always measured on the monotonic clock (tokio's `Instant`); the wall clock only
//! says what to store and show. When an administrator or NTP steps the wall clock, stored due
//! times shift relative to now, and the job loops correct for it (see `jobs::run`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wall clock of the job loops: the system's, plus an offset that only tests move (to step
/// the wall clock in-process while tokio's monotonic time goes on as before). Clones share the
/// offset.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// Milliseconds since the Unix epoch, now, by this clock.
    pub fn now_ms(&self) -> i64 {
        now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Steps this clock's wall time by `by_ms` (negative: back), as `date -s` or an NTP step
    /// does to the system clock; the monotonic clock is not touched. For tests.
    pub fn step(&self, by_ms: i64) {
        self.offset_ms.fetch_add(by_ms, Ordering::Relaxed);
    }
}

/// Smallest difference between wall-clock and monotonic elapsed time taken for a step. Below
/// it, differences are timer and scheduling noise.
pub const STEP_TOLERANCE: Duration = Duration::from_secs(1);

/// How far the wall clock was stepped while `mono_elapsed` passed on the monotonic clock and
/// `wall_elapsed_ms` on the wall clock, if it was. NTP slews the wall clock by at most 500 ppm,
/// so differences within a thousandth of the elapsed time (or [`STEP_TOLERANCE`]) are not
/// steps. Pure.
pub fn clock_step(wall_elapsed_ms: i64, mono_elapsed: Duration) -> Option<i64> {
    let mono_ms = ms(mono_elapsed);
    let step = wall_elapsed_ms.saturating_sub(mono_ms);
    let tolerance = ms(STEP_TOLERANCE).max(mono_ms / 1000);
    (step.abs() > tolerance).then_some(step)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// A duration as whole milliseconds, saturating.
pub fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// `"YYYY-MM-DD HH:MM:SS"` in UTC, the callback's `createTime` form.
pub fn format_callback_time(epoch_ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(epoch_ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// An RFC 3339 UTC timestamp with seconds, for CLI output and JSON.
pub fn format_utc(epoch_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(epoch_ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| epoch_ms.to_string())
}

/// Parses an RFC 3339 time (`2026-11-26T10:00:00Z`) into Unix milliseconds.
pub fn parse_utc(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Parses a duration written like `"30s"`, `"10m"`, `"2h"`, `"30d"`, `"250ms"` or `"1h30m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{s}` is not a duration (write it like \"30s\", \"10m\" or \"2h\")"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let one = match unit {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            "" => {
                return Err(format!(
                    "`{s}` needs a unit: ms, s, m, h or d (e.g. \"30s\")"
                ));
            }
            other => {
                return Err(format!(
                    "`{s}`: unknown unit `{other}` (use ms, s, m, h or d)"
                ));
            }
        };
        let part = one
            .checked_mul(u32::try_from(value).map_err(|_| format!("`{s}`: number too large"))?)
            .ok_or_else(|| format!("`{s}`: too long"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("`{s}`: too long"))?;
    }
    Ok(total)
}

/// Formats a duration the way it is written in the config: `"30s"`, `"1h30m"`, `"250ms"`.
pub fn format_duration(d: Duration) -> String {
    let total_ms = d.as_millis();
    if total_ms == 0 {
        return "0s".to_owned();
    }
    if !total_ms.is_multiple_of(1000) && total_ms < 60_000 {
        return if total_ms < 1000 {
            format!("{total_ms}ms")
        } else {
            format!("{:.1}s", d.as_secs_f64())
        };
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
        for bad in [
            "",
            "30",
            "s",
            "3x",
            "1.5h",
            "-1s",
            "30 s",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_format_as_written() {
        for s in ["30s", "10m", "2h", "30d", "1h30m", "250ms", "0s"] {
            assert_eq!(format_duration(parse_duration(s).expect(s)), s);
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn steps_of_the_wall_clock_are_told_from_noise_and_slewing() {
        let minute = Duration::from_secs(60);
        assert_eq!(clock_step(60_000, minute), None);
        assert_eq!(clock_step(60_900, minute), None, "timer noise");
        assert_eq!(clock_step(60_000 + 10_800_000, minute), Some(10_800_000));
        assert_eq!(clock_step(60_000 - 3_600_000, minute), Some(-3_600_000));
        // A day of sleep slewed by 500 ppm (43 s) is not a step; a 2-minute jump is.
        let day = Duration::from_secs(86_400);
        assert_eq!(clock_step(86_400_000 + 43_000, day), None);
        assert_eq!(clock_step(86_400_000 - 120_000, day), Some(-120_000));
    }

    #[test]
    fn a_stepped_clock_moves_every_clone() {
        let c = Clock::system();
        let twin = c.clone();
        let before = c.now_ms();
        twin.step(3 * 3_600_000);
        let after = c.now_ms();
        assert!(after - before >= 3 * 3_600_000 && after - before < 3 * 3_600_000 + 5_000);
    }

    #[test]
    fn callback_time_is_utc() {
        assert_eq!(
            format_callback_time(1_767_225_641_234).as_deref(),
            Some("2026-01-01 00:00:41")
        );
        assert_eq!(format_utc(1_767_225_641_234), "2026-01-01T00:00:41Z");
        assert_eq!(parse_utc("2026-01-01T00:00:41Z"), Some(1_767_225_641_000));
        assert_eq!(parse_utc("yesterday"), None);
    }
}
