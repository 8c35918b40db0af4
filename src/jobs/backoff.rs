//! The one backoff curve every retry in sunopoll follows: per-task polls, the store backoff of
//! the job loop, and the global pause. Pure, so tests can pin the jitter.

use std::time::Duration;

/// Delay before the next try after `attempt` consecutive failures (1 for the first): `base`
/// doubled per attempt up to `max`, spread by ±20 % with `jitter` in `[0, 1)`, and never outside
/// `[base, max]`. Pure, so tests can pin `jitter`.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(40);
    let nominal = base.saturating_mul(1u32 << doublings.min(31)).min(max);
    let spread = nominal.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0));
    spread.clamp(base.min(max), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_the_interval_and_doubles_to_the_cap() {
        let (base, max) = (Duration::from_secs(30), Duration::from_secs(600));
        for jitter in [0.0, 0.25, 0.5, 0.999] {
            let mut prev = Duration::ZERO;
            for attempt in 1..=12 {
                let d = backoff_delay(attempt, base, max, jitter);
                assert!(d >= base && d <= max, "attempt {attempt}: {d:?}");
                assert!(d >= prev || d == max, "never shrinks before the cap");
                prev = d;
            }
            assert!(backoff_delay(1, base, max, jitter) <= Duration::from_secs(36));
            assert!(backoff_delay(20, base, max, jitter) >= Duration::from_secs(480));
        }
        assert_eq!(backoff_delay(1, base, max, 0.5), Duration::from_secs(30));
        assert_eq!(backoff_delay(2, base, max, 0.5), Duration::from_secs(60));
        assert_eq!(backoff_delay(3, base, max, 0.5), Duration::from_secs(120));
        assert_eq!(backoff_delay(6, base, max, 0.5), Duration::from_secs(600));
        assert_eq!(
            backoff_delay(u32::MAX, base, max, 0.5),
            Duration::from_secs(600)
        );
    }
}
