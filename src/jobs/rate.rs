//! The request-rate limit of polling: the pure bookkeeping of when the next request may start.

use std::time::Duration;

use tokio::time::Instant;

/// The request-rate limit: sends on a grid of one per `1/rate`, so a timer that wakes a little
/// late does not lower the achieved rate, while never letting more than `k` requests into any
/// window of `k / rate` (k = the rate rounded up, so at most `rate` per second, in any second).
/// The window carries [`RATE_WINDOW_MARGIN`] so that the few milliseconds between deciding to
/// send and the request reaching the API cannot push a second there over the limit.
#[derive(Debug)]
pub struct RateLimiter {
    period: Duration,
    window: Duration,
    next: Option<Instant>,
    recent: std::collections::VecDeque<Instant>,
    k: usize,
}

impl RateLimiter {
    /// A limiter for `rate` requests per second (> 0).
    pub fn new(rate: f64) -> RateLimiter {
        let period = Duration::from_secs_f64(1.0 / rate);
        let k = (rate.ceil() as usize).max(1);
        RateLimiter {
            period,
            window: period.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX))
                + RATE_WINDOW_MARGIN,
            next: None,
            recent: std::collections::VecDeque::with_capacity(k),
            k,
        }
    }

    /// The earliest time the next request may start (`now` if it may start now).
    pub fn ready_at(&self, now: Instant) -> Instant {
        let grid = self.next.unwrap_or(now);
        match self.recent.front() {
            Some(oldest) if self.recent.len() == self.k => grid.max(*oldest + self.window),
            _ => grid,
        }
    }

    /// Notes a request started at `at` (no earlier than [`RateLimiter::ready_at`]).
    pub fn record(&mut self, at: Instant) {
        // Keep to the grid when a little late; after an idle spell, restart the grid from now
        // (allowing at most one request of catch-up, never a burst).
        let base = match self.next {
            Some(next) => next.max(at.checked_sub(self.period).unwrap_or(at)),
            None => at,
        };
        self.next = Some(base + self.period);
        if self.recent.len() == self.k {
            self.recent.pop_front();
        }
        self.recent.push_back(at);
    }
}

/// Extra spacing per rate window; costs at most 1 % of the rate at 500 requests/s.
pub const RATE_WINDOW_MARGIN: Duration = Duration::from_millis(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_keeps_the_rate_despite_late_wakeups_and_never_exceeds_it() {
        for rate in [0.5, 2.0, 50.0, 500.0] {
            let mut l = RateLimiter::new(rate);
            let start = Instant::now();
            let mut sends = Vec::new();
            // Every wakeup is up to 1.5 ms late (coarse timers), deterministically varied.
            for i in 0..(rate * 20.0) as u64 {
                let late = Duration::from_micros((i * 7919) % 1500);
                let t = l.ready_at(start).max(start) + late;
                l.record(t);
                sends.push(t);
            }
            let span = (*sends.last().expect("sends") - sends[0]).as_secs_f64();
            let achieved = (sends.len() - 1) as f64 / span;
            assert!(
                (achieved - rate).abs() / rate < 0.02,
                "rate {rate}: achieved {achieved}"
            );
            // No window of one second (or one period, below 1/s) holds more than allowed.
            let window = Duration::from_secs_f64((1.0f64).max(1.0 / rate));
            let allowed = (rate.max(1.0)) as usize;
            let mut j = 0;
            for i in 0..sends.len() {
                while sends[j] + window <= sends[i] {
                    j += 1;
                }
                assert!(
                    i - j < allowed,
                    "rate {rate}: {} sends within {window:?}",
                    i - j + 1
                );
            }
        }
    }

    #[test]
    fn after_an_idle_spell_the_limiter_does_not_burst() {
        let mut l = RateLimiter::new(10.0);
        let t0 = Instant::now();
        l.record(t0);
        let later = t0 + Duration::from_secs(60);
        assert!(l.ready_at(later) <= later);
        l.record(later);
        // At most one catch-up request, then the grid again.
        let second = l.ready_at(later).max(later);
        l.record(second);
        assert!(l.ready_at(second) >= later + Duration::from_millis(99));
    }
}
