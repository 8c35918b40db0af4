//! The request-rate limit of polling: the pure bookkeeping of when the next request may start
//! ([`RateLimiter`]), and of the rate an account learns from being throttled ([`RateLearner`]).

use std::time::Duration;

use tokio::time::Instant;

/// The request-rate limit: sends on a grid of one per `1/rate`, so a timer that wakes a little
/// late does not lower the achieved rate, while never letting more than `k` requests into any
/// window of `k / rate` (k = the rate rounded up, so at most `rate` per second, in any second).
/// The window carries [`RATE_WINDOW_MARGIN`] so that the few milliseconds between deciding to
/// send and the request reaching the API cannot push a second there over the limit.
///
/// And the API counts in windows of [`API_WINDOW`] by when requests *arrive*, which is later
/// than when they were sent by a latency that varies: requests sent evenly can arrive bunched.
/// So no more than `rate × API_WINDOW` requests are sent in any window of `API_WINDOW` plus
/// [`ARRIVAL_JITTER`]: however their latencies vary within that, no window of the API's holds
/// more than the limit. That costs 2.4 % of the rate.
#[derive(Debug)]
pub struct RateLimiter {
    period: Duration,
    /// (requests, window): at most that many sent in any such window.
    windows: [(usize, Duration); 2],
    next: Option<Instant>,
    recent: std::collections::VecDeque<Instant>,
}

/// The window the API counts requests in: sunoapi.org documents 20 per 10 s.
pub const API_WINDOW: Duration = Duration::from_secs(10);

/// How much later than its neighbours a request may arrive at the API, which the limit leaves
/// room for (through a proxy adding 0–150 ms, 20/s against 200 per 10 s once put 201 into one
/// of the API's windows).
pub const ARRIVAL_JITTER: Duration = Duration::from_millis(250);

/// Most requests remembered for the API window. Above 409 requests/s the arrival jitter is a
/// fraction of a percent of the window; only the per-second window is kept there.
const MAX_REMEMBERED: usize = 4096;

impl RateLimiter {
    /// A limiter for `rate` requests per second (> 0).
    pub fn new(rate: f64) -> RateLimiter {
        let period = Duration::from_secs_f64(1.0 / rate);
        let k = (rate.ceil() as usize).max(1);
        let second = (
            k,
            period.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX)) + RATE_WINDOW_MARGIN,
        );
        let in_window = ((rate * API_WINDOW.as_secs_f64()).floor() as usize).max(1);
        let api = if in_window <= MAX_REMEMBERED {
            (in_window, API_WINDOW + ARRIVAL_JITTER)
        } else {
            second
        };
        RateLimiter {
            period,
            windows: [second, api],
            next: None,
            recent: std::collections::VecDeque::with_capacity(k.max(api.0)),
        }
    }

    fn remembered(&self) -> usize {
        self.windows[0].0.max(self.windows[1].0)
    }

    /// Changes the rate, keeping the requests already sent: the next may start one new period
    /// after the last, and the windows still count the recent ones (a fresh limiter would let
    /// one go at once, which next to the last one is a burst the API counts).
    pub fn set_rate(&mut self, rate: f64) {
        let mut fresh = RateLimiter::new(rate);
        let keep = self.recent.len().saturating_sub(fresh.remembered());
        fresh.recent = self.recent.drain(keep..).collect();
        fresh.next = fresh.recent.back().map(|last| *last + fresh.period);
        *self = fresh;
    }

    /// The earliest time the next request may start (`now` if it may start now).
    pub fn ready_at(&self, now: Instant) -> Instant {
        let mut at = self.next.unwrap_or(now);
        let n = self.recent.len();
        for (k, window) in self.windows {
            if n >= k {
                at = at.max(self.recent[n - k] + window);
            }
        }
        at
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
        if self.recent.len() == self.remembered() {
            self.recent.pop_front();
        }
        self.recent.push_back(at);
    }
}

/// One account's [`RateLimiter`], shared by everything that sends requests with the account's
/// key: its poll loop and the API stand-in (`proxy`), so that polls and submissions spend one
/// budget. `None` inside means unlimited. The poll loop keeps setting the rate (learnt from
/// throttling, and on a shared queue split among the daemons), so a submission is held to the
/// same rate the polls are. A `std` mutex, held for the microseconds a decision takes, never
/// across an `.await`.
#[derive(Debug, Clone, Default)]
pub struct SharedLimiter(std::sync::Arc<std::sync::Mutex<Option<RateLimiter>>>);

impl SharedLimiter {
    /// A limiter at `rate` requests per second (`None`: unlimited).
    pub fn new(rate: Option<f64>) -> SharedLimiter {
        SharedLimiter(std::sync::Arc::new(std::sync::Mutex::new(
            rate.map(RateLimiter::new),
        )))
    }

    fn with<R>(&self, f: impl FnOnce(&mut Option<RateLimiter>) -> R) -> R {
        // A panic while the lock was held cannot leave the bookkeeping half-changed in a way
        // that matters more than losing it: carry on with what is there.
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Changes the rate (`None`: unlimited), keeping the requests already sent
    /// ([`RateLimiter::set_rate`]).
    pub fn set_rate(&self, rate: Option<f64>) {
        self.with(|l| match (l.as_mut(), rate) {
            (Some(limiter), Some(rate)) => limiter.set_rate(rate),
            (None, Some(rate)) => *l = Some(RateLimiter::new(rate)),
            (_, None) => *l = None,
        });
    }

    /// True when a rate is set.
    pub fn is_limited(&self) -> bool {
        self.with(|l| l.is_some())
    }

    /// The poll loop's admission: `Ok(true)` when a request may start at `now` (and is
    /// counted), `Ok(false)` when there is no limit, `Err(at)` when it must wait until `at`.
    pub fn admit(&self, now: Instant) -> Result<bool, Instant> {
        self.with(|l| {
            let Some(limiter) = l.as_mut() else {
                return Ok(false);
            };
            let ready = limiter.ready_at(now);
            if now < ready {
                return Err(ready);
            }
            limiter.record(now);
            Ok(true)
        })
    }

    /// A submission's turn: the time it may be sent (`now` or later, and counted from then
    /// on, so polls wait behind it), or, when that is more than `max_wait` away, `Err` with
    /// the wait, and nothing counted.
    pub fn reserve(&self, now: Instant, max_wait: Duration) -> Result<Instant, Duration> {
        self.with(|l| {
            let Some(limiter) = l.as_mut() else {
                return Ok(now);
            };
            let at = limiter.ready_at(now).max(now);
            let wait = at - now;
            if wait > max_wait {
                return Err(wait);
            }
            limiter.record(at);
            Ok(at)
        })
    }
}

/// Extra spacing per rate window; costs at most 1 % of the rate at 500 requests/s.
pub const RATE_WINDOW_MARGIN: Duration = Duration::from_millis(10);

/// The window the API counts requests in (sunoapi.org documents "20 requests per 10 seconds";
/// kie.ai the same): what a throttle says was too much is measured over it.
pub const LEARN_WINDOW: Duration = API_WINDOW;

/// Time without a throttle, spent busy at the learnt rate, before it is raised one step.
/// Three API windows: a rate is tried long enough to tell before the next is.
pub const CLIMB_EVERY: Duration = Duration::from_secs(30);

/// Each step up: 5 % of the learnt rate. Small, because a step too far costs a throttle, a
/// pause and a probe: from 85 % of a limit back up to it takes about 3.5 steps (~100 s).
pub const CLIMB_FACTOR: f64 = 1.05;

/// After a throttle the rate drops to at most this share of what it was...
pub const DECREASE_FACTOR: f64 = 0.85;

/// ...or to this share of the rate measured over the last [`LEARN_WINDOW`], if lower: the
/// API refused that much, so a little under it is the best estimate of the limit.
pub const MEASURED_FACTOR: f64 = 0.9;

/// A measured rate needs this many requests in the window to be trusted over the plain decrease
/// (one lone request throttled says the key is shared, not how fast we may go).
const MEASURE_MIN_SENDS: usize = 3;

/// The slowest rate learnt: one request per 100 s. Lower would make a key shared with a busy
/// application unusable; the pause and probe already keep sunopoll from adding to its throttling.
pub const LEARN_FLOOR: f64 = 0.01;

/// The request rate an account learns: additive-increase, multiplicative-decrease under its
/// configured ceiling. Without it, a ceiling above the account's real limit polls in a
/// sawtooth: every probe that succeeds resumes at the full rate and is throttled again within
/// a second. With it, a throttle lowers the rate to a little under what the API refused, and
/// the rate climbs back only slowly, and only while polling is actually held back by it, so
/// the share of throttled requests stays small while the achieved rate stays near the limit.
/// Pure: time is passed in.
#[derive(Debug, Clone)]
pub struct RateLearner {
    ceiling: f64,
    rate: f64,
    changed_at: Instant,
    started: Instant,
    sent: std::collections::VecDeque<Instant>,
}

impl RateLearner {
    /// A learner under `ceiling` (> 0), starting from a rate learnt before (persisted), if any.
    pub fn new(ceiling: f64, learnt: Option<f64>, now: Instant) -> RateLearner {
        RateLearner {
            ceiling,
            rate: learnt.map_or(ceiling, |r| r.clamp(LEARN_FLOOR.min(ceiling), ceiling)),
            changed_at: now,
            started: now,
            sent: std::collections::VecDeque::new(),
        }
    }

    /// The rate to poll at now.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// True when the rate is below the ceiling (something was learnt).
    pub fn is_learnt(&self) -> bool {
        self.rate < self.ceiling
    }

    /// Notes a request sent at `at`.
    pub fn sent(&mut self, at: Instant) {
        self.forget_before(at);
        self.sent.push_back(at);
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > LEARN_WINDOW)
        {
            self.sent.pop_front();
        }
    }

    /// The API throttled a request at `now`: lowers the rate. Returns the new rate.
    pub fn throttled(&mut self, now: Instant) -> f64 {
        self.forget_before(now);
        let mut rate = self.rate * DECREASE_FACTOR;
        // A measure needs a whole window watched: right after a start, the few requests seen
        // say nothing of the limit.
        let watched = now.saturating_duration_since(self.started) >= LEARN_WINDOW;
        if watched && self.sent.len() >= MEASURE_MIN_SENDS {
            let measured = self.sent.len() as f64 / LEARN_WINDOW.as_secs_f64();
            rate = rate.min(measured * MEASURED_FACTOR);
        }
        self.rate = rate.clamp(LEARN_FLOOR.min(self.ceiling), self.ceiling);
        self.changed_at = now;
        self.rate
    }

    /// The API answered at `now` without throttling: after [`CLIMB_EVERY`] without a throttle,
    /// while the rate was what held polling back (the last window was nearly full), raises
    /// the rate one step. Returns the new rate when it changed.
    pub fn answered(&mut self, now: Instant) -> Option<f64> {
        if self.rate >= self.ceiling || now.saturating_duration_since(self.changed_at) < CLIMB_EVERY
        {
            return None;
        }
        self.forget_before(now);
        let busy = self.sent.len() as f64 >= 0.8 * self.rate * LEARN_WINDOW.as_secs_f64();
        if !busy {
            return None;
        }
        self.rate = (self.rate * CLIMB_FACTOR).min(self.ceiling);
        self.changed_at = now;
        Some(self.rate)
    }

    /// A new ceiling (a reload): a learnt rate stays, under it; a rate that was the ceiling
    /// follows it.
    pub fn set_ceiling(&mut self, ceiling: f64) {
        self.rate = if self.is_learnt() {
            self.rate.min(ceiling)
        } else {
            ceiling
        };
        self.ceiling = ceiling;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_and_submissions_spend_one_shared_budget() {
        let start = Instant::now();
        let poll_side = SharedLimiter::new(Some(2.0));
        let proxy_side = poll_side.clone();
        assert_eq!(
            poll_side.admit(start),
            Ok(true),
            "the first poll goes at once"
        );
        // A submission takes the next turn, half a second on, and the poll after it waits
        // for the turn after that (one second's window, with its margin, holds two).
        let turn = proxy_side
            .reserve(start, Duration::from_secs(1))
            .expect("within the wait");
        assert_eq!(turn, start + Duration::from_millis(500));
        let third = start + Duration::from_secs(1) + RATE_WINDOW_MARGIN;
        assert_eq!(
            poll_side.admit(start + Duration::from_millis(600)),
            Err(third)
        );
        // A turn further away than the wait is refused and not counted.
        let far = proxy_side.reserve(start, Duration::from_millis(100));
        assert_eq!(far, Err(third - start));
        assert_eq!(poll_side.admit(third), Ok(true));
        // A rate the poll loop sets (learnt, or split among daemons) holds submissions too.
        poll_side.set_rate(Some(0.5));
        assert!(proxy_side.reserve(third, Duration::from_secs(1)).is_err());
        poll_side.set_rate(None);
        assert!(!proxy_side.is_limited());
        assert_eq!(
            proxy_side.reserve(third, Duration::ZERO),
            Ok(third),
            "unlimited"
        );
        assert_eq!(poll_side.admit(third), Ok(false));
    }

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
            // The headroom for arrival jitter costs up to 2.5 % (see RateLimiter).
            assert!(
                achieved <= rate * 1.001 && achieved >= rate * 0.96,
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
    fn requests_arriving_with_jittered_latency_never_exceed_the_limit_in_any_api_window() {
        // Sent as fast as the limiter allows, each request then takes 0–150 ms to arrive
        // (deterministic, varied): the API must never count more than rate × 10 s in any 10 s
        // window of arrivals, and the rate must still be nearly reached.
        for rate in [2.0, 20.0, 0.5] {
            let mut l = RateLimiter::new(rate);
            let start = Instant::now();
            let mut arrivals = Vec::new();
            let mut t = start;
            let n = (rate * 120.0) as u64;
            for i in 0..n {
                let late = Duration::from_micros((i * 7919) % 1500);
                t = l.ready_at(t).max(t) + late;
                l.record(t);
                let latency = Duration::from_micros((i * 104_729 + i * i * 31) % 150_000);
                arrivals.push(t + latency);
            }
            arrivals.sort();
            let limit = (rate * API_WINDOW.as_secs_f64()) as usize;
            let mut j = 0;
            for i in 0..arrivals.len() {
                while arrivals[j] + API_WINDOW <= arrivals[i] {
                    j += 1;
                }
                assert!(
                    i - j < limit,
                    "rate {rate}: {} arrivals within 10 s (limit {limit})",
                    i - j + 1
                );
            }
            let span = (*arrivals.last().expect("arrivals") - arrivals[0]).as_secs_f64();
            let achieved = (arrivals.len() - 1) as f64 / span;
            assert!(achieved >= rate * 0.95, "rate {rate}: achieved {achieved}");
        }
    }

    /// An API that allows `limit` requests in any [`LEARN_WINDOW`] (counting refused ones),
    /// polled as the poll job does: at the limiter's rate, pausing for `pause` after a
    /// throttle, then one probe. Returns (requests, throttled, seconds) for the second half
    /// of `run`, once learnt.
    fn simulate(ceiling: f64, limit: usize, pause: Duration, run: Duration) -> (usize, usize, f64) {
        let t0 = Instant::now();
        let mut learner = RateLearner::new(ceiling, None, t0);
        let mut limiter = RateLimiter::new(learner.rate());
        let mut api: std::collections::VecDeque<Instant> = Default::default();
        let mut t = t0;
        let half = t0 + run / 2;
        let (mut sent, mut refused) = (0, 0);
        while t < t0 + run {
            t = limiter.ready_at(t).max(t);
            limiter.record(t);
            learner.sent(t);
            while api
                .front()
                .is_some_and(|s| t.duration_since(*s) >= LEARN_WINDOW)
            {
                api.pop_front();
            }
            let throttled = api.len() >= limit;
            api.push_back(t);
            if t >= half {
                sent += 1;
                refused += usize::from(throttled);
            }
            if throttled {
                limiter.set_rate(learner.throttled(t));
                t += pause;
            } else if let Some(rate) = learner.answered(t) {
                limiter.set_rate(rate);
            }
        }
        (sent, refused, (run / 2).as_secs_f64())
    }

    #[test]
    fn a_learnt_rate_is_rarely_throttled_and_stays_near_the_limit() {
        // The case: 5 per 10 s with the rate set higher; and the documented limit
        // (20 per 10 s) with a ceiling five times above it; each throttle pausing for one
        // API window, as the poll job does with the default 30 s interval.
        for (ceiling, limit) in [(2.0, 5), (10.0, 20), (2.0, 20)] {
            let (sent, refused, secs) =
                simulate(ceiling, limit, LEARN_WINDOW, Duration::from_secs(4 * 3600));
            let share = refused as f64 / sent as f64;
            let achieved = sent as f64 / secs;
            let allowed = (limit as f64 / LEARN_WINDOW.as_secs_f64()).min(ceiling);
            eprintln!(
                "ceiling {ceiling}, limit {limit}: {share:.4} throttled, {achieved:.3}/s of {allowed}/s"
            );
            assert!(
                share < 0.05,
                "ceiling {ceiling}, limit {limit}: {share:.3} throttled"
            );
            assert!(
                achieved >= 0.8 * allowed && achieved <= allowed * 1.001,
                "ceiling {ceiling}, limit {limit}: {achieved:.3}/s against {allowed}/s"
            );
        }
    }

    #[test]
    fn the_learner_never_climbs_above_its_ceiling_nor_while_idle() {
        let t0 = Instant::now();
        let mut l = RateLearner::new(2.0, Some(5.0), t0);
        assert_eq!(
            l.rate(),
            2.0,
            "a persisted rate above the ceiling is capped"
        );
        let r = l.throttled(t0);
        assert!(
            (r - 1.7).abs() < 1e-9,
            "too few sends to measure: plain decrease, got {r}"
        );
        // Idle: answers come, but the rate never held anything back.
        assert_eq!(l.answered(t0 + Duration::from_secs(600)), None);
        // Busy at the rate: it climbs, by one step, never above the ceiling.
        let mut t = t0 + Duration::from_secs(600);
        for _ in 0..200 {
            t += Duration::from_secs_f64(1.0 / l.rate());
            l.sent(t);
            l.answered(t);
        }
        assert_eq!(l.rate(), 2.0);
        assert!(!l.is_learnt());
        l.set_ceiling(1.0);
        assert_eq!(l.rate(), 1.0);
        l.set_ceiling(4.0);
        assert_eq!(l.rate(), 4.0, "an unlearnt rate follows a raised ceiling");
        let learnt = l.throttled(t);
        assert!(learnt < 4.0);
        l.set_ceiling(8.0);
        assert_eq!(
            l.rate(),
            learnt,
            "a learnt rate stays under a raised ceiling"
        );
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
