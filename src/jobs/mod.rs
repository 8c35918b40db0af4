//! Durable work on one loop. A job kind — a poll of one task ([`poll`]), a delivery of one event
//! to one handler ([`deliver`]) — is a row in the store with a due time; [`run`] is the only loop
//! that turns rows into running jobs.
//!
//! The loop claims due rows from the store, skips those already in flight, starts the rest
//! under the kind's limits, each as a task tracked by the daemon's `TaskTracker`, and hands each
//! finished job back to the kind, which records its outcome. While outcomes cannot be stored,
//! [`StoreBackoff`] holds back every new job on a doubling schedule: the rows stay due, and
//! starting them again at once would only repeat work whose result is then thrown away. Between
//! rounds the loop sleeps until the next row is due, a limit lifts, a job finishes, or the kind
//! is woken (an `add`, a new event, a `redeliver`); it stops starting jobs when cancelled.
//!
//! A kind supplies only what is its own, through [`JobKind`]: its query, its limits, how a job
//! runs, and what a finished job changes; its pure decisions (`decide`, `after_attempt`) live
//! beside it. The loop itself keeps no schedule of its own: the schedule is the store's.

use std::collections::HashSet;
use std::future::Future;
use std::hash::Hash;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::clock::{Clock, clock_step, format_duration, ms};
use crate::store::{Claim, StoreError};

pub mod archive;
pub mod backoff;
pub mod deliver;
pub mod gate;
pub mod poll;
pub mod rate;

pub use backoff::backoff_delay;

/// The earliest moment the loop must look again, gathered from every reason it has to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WakeAt(Option<Instant>);

impl WakeAt {
    /// Adds a reason to wake at `at`; the earliest one wins.
    pub fn at(&mut self, at: Instant) {
        self.0 = Some(self.0.map_or(at, |t| t.min(at)));
    }

    /// The earliest reason, if any.
    pub fn get(self) -> Option<Instant> {
        self.0
    }
}

/// Waits for a new event (`events` changed) or an outside wake-up (`wake`), for the job kinds
/// that act on stored events (deliveries, the archive). Once `events` is closed (the poll job
/// is gone: shutdown), `open` turns false and only `wake` is waited for.
pub async fn event_or_wake(
    events: &mut tokio::sync::watch::Receiver<i64>,
    open: &mut bool,
    wake: &tokio::sync::Notify,
) {
    let listening = *open;
    let closed = tokio::select! {
        still_open = async {
            if listening {
                events.changed().await.is_ok()
            } else {
                std::future::pending().await
            }
        } => !still_open,
        () = wake.notified() => false,
    };
    if closed {
        *open = false;
    }
}

/// Whether a due row may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Start it (the kind has counted it against its limits).
    Go,
    /// A limit holds every further row back until the given time: stop this round.
    Wait(Instant),
    /// A limit holds this row back but not the next ones (its destination is full): skip it,
    /// and claim again at once instead of sleeping.
    Skip,
}

/// What finishing a job did with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Its outcome was written.
    Written,
    /// Its outcome could not be written: the row stays due, and the loop backs off.
    Failed,
    /// Its outcome says nothing about the store (an answer the job kind keeps in memory).
    Untouched,
}

/// How one kind backs off while the store fails, and what it tells the operator.
#[derive(Debug, Clone, Copy)]
pub struct StoreBackoffPolicy {
    /// The first pause.
    pub min: Duration,
    /// The longest pause.
    pub max: Duration,
    /// Logged at warn when a pause begins or grows.
    pub paused: &'static str,
    /// Logged at info when the store works again.
    pub resumed: &'static str,
}

/// New jobs held back because their outcomes cannot be stored (disk full, store locked). Kept
/// in memory only: there is nowhere to persist it, and a restart simply tries again.
#[derive(Debug, Default)]
pub struct StoreBackoff {
    /// Store failures in a row.
    failures: u32,
    /// No new jobs before this.
    until: Option<Instant>,
}

impl StoreBackoff {
    /// Takes in what one finished job did with the store.
    pub fn note(&mut self, stored: Stored, policy: &StoreBackoffPolicy) {
        match stored {
            Stored::Written => {
                if self.failures > 0 {
                    info!(failures = self.failures, "{}", policy.resumed);
                    *self = StoreBackoff::default();
                }
            }
            Stored::Failed => {
                self.failures = self.failures.saturating_add(1);
                let delay = backoff_delay(self.failures, policy.min, policy.max, fastrand::f64());
                self.until = Some(Instant::now() + delay);
                warn!(failures = self.failures, retry_in = %format_duration(delay), "{}", policy.paused);
            }
            Stored::Untouched => {}
        }
    }

    /// When new jobs may start again, if they may not start now.
    pub fn holds_until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|until| now < *until)
    }
}

/// One kind of durable job: what the loop in [`run`] asks of it.
pub trait JobKind {
    /// A due row as the store returns it.
    type Row: Send + 'static;
    /// What identifies a job while it runs (one per task, one per delivery).
    type Key: Eq + Hash + Clone + Send + 'static;
    /// What a finished job reports back to the loop.
    type Done: Send + 'static;

    /// Named in the loop's log lines ("cannot read {QUEUE}").
    const QUEUE: &'static str;
    /// Logged at debug when the loop stops starting jobs.
    const STOPPED: &'static str;

    /// The row's job key.
    fn key(row: &Self::Row) -> Self::Key;

    /// When the row is due (Unix ms).
    fn due_at(row: &Self::Row) -> i64;

    /// The most jobs in flight at once.
    fn max_in_flight(&self) -> usize;

    /// How this kind backs off while the store fails.
    fn store_backoff(&self) -> StoreBackoffPolicy;

    /// Called once per round before claiming: how many jobs may start now with `in_flight`
    /// running, adding to `wake` what to wait for otherwise.
    fn prepare(
        &mut self,
        in_flight: usize,
        wake: &mut WakeAt,
    ) -> impl Future<Output = usize> + Send;

    /// The earliest due rows, enough to start `slots` jobs besides those `in_flight`, and when
    /// work other daemons hold may be free for this loop.
    fn claim(
        &self,
        slots: usize,
        in_flight: &HashSet<Self::Key>,
    ) -> impl Future<Output = Result<Claim<Self::Row>, StoreError>> + Send;

    /// Whether `row`, due now, may start under the kind's limits (which count it on [`Admit::Go`]).
    fn admit(&mut self, row: &Self::Row) -> Admit;

    /// The job for `row`, to run on its own tracked task.
    fn start(&mut self, row: Self::Row) -> impl Future<Output = Self::Done> + Send + 'static;

    /// Takes in a finished job (`key` is already out of the in-flight set).
    fn finish(&mut self, key: Self::Key, done: Self::Done) -> impl Future<Output = Stored> + Send;

    /// Resolves when something outside may have made new rows due (an `add`, a new event).
    fn woken(&mut self) -> impl Future<Output = ()> + Send;

    /// The wall clock due times are stored by.
    fn clock(&self) -> &Clock;

    /// The furthest ahead this kind ever schedules a row. A row due later than that was
    /// scheduled before the wall clock was stepped back, and is taken as due now rather than
    /// left to stall. `None`: no such bound.
    fn max_ahead(&self) -> Option<Duration> {
        None
    }

    /// The wall clock was stepped by `by_ms` since the last round (the monotonic clock says
    /// how long really passed): the kind corrects its stored and in-memory due times.
    fn clock_stepped(&mut self, by_ms: i64) -> impl Future<Output = ()> + Send;
}

/// Notices steps of the wall clock between rounds of one loop, by comparing how much time
/// passed on it with how much passed on the monotonic clock.
#[derive(Debug, Default)]
pub struct StepWatch {
    last: Option<(i64, Instant)>,
}

impl StepWatch {
    /// Takes in the time now on both clocks; returns the step since the last call, if any.
    pub fn observe(&mut self, wall_ms: i64, mono: Instant) -> Option<i64> {
        let step = self.last.and_then(|(wall0, mono0)| {
            clock_step(
                wall_ms.saturating_sub(wall0),
                mono.saturating_duration_since(mono0),
            )
        });
        self.last = Some((wall_ms, mono));
        step
    }
}

/// Whether a row due at `due_at` is to wait, at `now`: not if it is due, nor if it is further
/// ahead than the kind ever schedules (see [`JobKind::max_ahead`]).
pub fn waits(due_at: i64, now: i64, max_ahead: Option<Duration>) -> bool {
    due_at > now && max_ahead.is_none_or(|ahead| due_at <= now.saturating_add(ms(ahead)))
}

/// Why the loop woke.
enum Woke<K: JobKind> {
    Cancelled,
    Outside,
    Finished(K::Key, K::Done),
    Timer,
}

/// The longest wait before reading the queue again after reads failed in a row.
pub const READ_RETRY_MAX: Duration = Duration::from_secs(30);

/// Runs `kind`'s jobs until `cancel` fires, then stops starting them. Jobs already started keep
/// running in `tracker`, and this returns once they have all reported back; the caller bounds
/// the wait (the daemon's drain time).
pub async fn run<K: JobKind>(mut kind: K, cancel: CancellationToken, tracker: TaskTracker) {
    let (done_tx, mut done_rx) = mpsc::channel::<(K::Key, K::Done)>(kind.max_in_flight() * 2 + 1);
    let mut in_flight: HashSet<K::Key> = HashSet::new();
    let mut store_backoff = StoreBackoff::default();
    let backoff_policy = kind.store_backoff();
    let mut steps = StepWatch::default();
    // Reads of the queue that failed in a row: the retry backs off (1 s doubling to
    // READ_RETRY_MAX) and is logged only while it grows, so an outage of the database is a
    // few lines, not one a second.
    let mut read_failures: u32 = 0;

    loop {
        // Take in every finished job first: they free slots and may change the limits.
        while let Ok((key, done)) = done_rx.try_recv() {
            in_flight.remove(&key);
            let stored = kind.finish(key, done).await;
            store_backoff.note(stored, &backoff_policy);
        }
        if cancel.is_cancelled() {
            break;
        }
        if let Some(by) = steps.observe(kind.clock().now_ms(), Instant::now()) {
            let by_text = format_duration(Duration::from_millis(by.unsigned_abs()));
            warn!(
                step = %format!("{}{by_text}", if by < 0 { "-" } else { "+" }),
                "the wall clock was stepped; {} keeps to the monotonic clock (due times corrected, no deadline counts the step)",
                K::QUEUE
            );
            kind.clock_stepped(by).await;
        }
        let mut wake = WakeAt::default();
        let slots = kind.prepare(in_flight.len(), &mut wake).await;
        // While outcomes cannot be stored, jobs wait: every outcome would be thrown away and
        // the row, still due, started again at once.
        let slots = match store_backoff.holds_until(Instant::now()) {
            Some(until) => {
                wake.at(until);
                0
            }
            None => slots,
        };
        let mut again = false;
        if slots > 0 {
            match kind.claim(slots, &in_flight).await {
                Ok(Claim {
                    rows,
                    foreign_lease_ends_in,
                }) => {
                    if read_failures > 0 {
                        info!(failures = read_failures, "{} can be read again", K::QUEUE);
                        read_failures = 0;
                    }
                    // Work another daemon holds is free once its lease runs out; if that
                    // daemon stopped, nothing else would wake this loop for it.
                    if let Some(ends_in) = foreign_lease_ends_in {
                        wake.at(Instant::now() + lease_wake_delay(ends_in));
                    }
                    let now = kind.clock().now_ms();
                    let max_ahead = kind.max_ahead();
                    let mut started = 0;
                    for row in rows {
                        let key = K::key(&row);
                        if in_flight.contains(&key) {
                            continue;
                        }
                        let due_at = K::due_at(&row);
                        if waits(due_at, now, max_ahead) {
                            // The earliest row not yet due: the next reason to wake.
                            wake.at(instant_at(due_at, now));
                            break;
                        }
                        if started == slots {
                            break; // a finishing job wakes the loop
                        }
                        match kind.admit(&row) {
                            Admit::Go => {}
                            Admit::Wait(until) => {
                                wake.at(until);
                                break;
                            }
                            Admit::Skip => {
                                again = true;
                                continue;
                            }
                        }
                        in_flight.insert(key.clone());
                        let job = kind.start(row);
                        let done = done_tx.clone();
                        tracker.spawn(async move {
                            let result = job.await;
                            let _ = done.send((key, result)).await;
                        });
                        started += 1;
                    }
                }
                Err(e) => {
                    read_failures = read_failures.saturating_add(1);
                    let delay = Duration::from_secs(1)
                        .saturating_mul(1 << (read_failures - 1).min(5))
                        .min(READ_RETRY_MAX);
                    if read_failures == 1 || delay < READ_RETRY_MAX {
                        error!(error = %e, failures = read_failures, retry_in = %format_duration(delay), "cannot read {}", K::QUEUE);
                    } else if read_failures.is_multiple_of(20) {
                        error!(error = %e, failures = read_failures, retry_in = %format_duration(delay), "still cannot read {}", K::QUEUE);
                    }
                    wake.at(Instant::now() + delay);
                }
            }
        }
        if again {
            continue;
        }
        let sleep = async {
            match wake.get() {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let woke: Woke<K> = tokio::select! {
            () = cancel.cancelled() => Woke::Cancelled,
            () = kind.woken() => Woke::Outside,
            Some((key, done)) = done_rx.recv() => Woke::Finished(key, done),
            () = sleep => Woke::Timer,
        };
        match woke {
            Woke::Finished(key, done) => {
                in_flight.remove(&key);
                let stored = kind.finish(key, done).await;
                store_backoff.note(stored, &backoff_policy);
            }
            Woke::Cancelled | Woke::Outside | Woke::Timer => {}
        }
    }
    debug!(in_flight = in_flight.len(), "{}", K::STOPPED);
    // No new jobs; those in flight still finish (the tracker keeps them, the daemon bounds the
    // wait), and what they report is still taken in: a pause that a late throttle answer calls
    // for must be saved, or the restart would not honour it. A job that never reports (it
    // panicked) drops its sender, so this ends when the last one is gone.
    drop(done_tx);
    while let Some((key, done)) = done_rx.recv().await {
        in_flight.remove(&key);
        let stored = kind.finish(key, done).await;
        store_backoff.note(stored, &backoff_policy);
    }
}

/// A little past the moment a lease is free (`lease_until < now` on the database's clock), so
/// the claim that follows the wake-up finds it free rather than just not yet.
pub const LEASE_WAKE_MARGIN: Duration = Duration::from_millis(50);

/// How long to sleep for a lease that ends in `ends_in_ms` (the database's clock, measured by
/// the claim that saw it), so that it has ended when the loop looks again.
pub fn lease_wake_delay(ends_in_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ends_in_ms).unwrap_or(0)) + LEASE_WAKE_MARGIN
}

/// The monotonic instant matching wall-clock `at_ms`, given that it is `now_ms` now.
pub fn instant_at(at_ms: i64, now_ms: i64) -> Instant {
    let ahead = Duration::from_millis(u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0));
    Instant::now() + ahead
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A job kind over rows kept in memory: each job takes 10 ms, and finishing it removes its
    /// row (as recording a delivery ends it), unless the "store" is set to fail.
    struct Fake {
        rows: Arc<Mutex<Vec<u32>>>,
        max: usize,
        running: Arc<Mutex<(usize, usize)>>,
        started: Arc<Mutex<Vec<(u32, Instant)>>>,
        failures_left: u32,
        clock: Clock,
        /// Until then, every row is held by "another daemon": the claim returns none, only
        /// when that hold ends (as a lease of a daemon that stopped beating does).
        held_until: Option<Instant>,
    }

    impl JobKind for Fake {
        type Row = u32;
        type Key = u32;
        type Done = ();
        const QUEUE: &'static str = "the fake queue";
        const STOPPED: &'static str = "fake stopped";

        fn key(row: &u32) -> u32 {
            *row
        }
        fn due_at(_: &u32) -> i64 {
            0
        }
        fn max_in_flight(&self) -> usize {
            self.max
        }
        fn store_backoff(&self) -> StoreBackoffPolicy {
            policy()
        }
        async fn prepare(&mut self, in_flight: usize, _wake: &mut WakeAt) -> usize {
            self.max.saturating_sub(in_flight)
        }
        async fn claim(
            &self,
            slots: usize,
            in_flight: &HashSet<u32>,
        ) -> Result<Claim<u32>, StoreError> {
            if let Some(until) = self.held_until {
                let now = Instant::now();
                if now < until {
                    let ms = (until - now).as_millis();
                    return Ok(Claim {
                        rows: Vec::new(),
                        foreign_lease_ends_in: Some(i64::try_from(ms).expect("ms")),
                    });
                }
            }
            let rows = self.rows.lock().expect("rows");
            Ok(Claim::alone(
                rows.iter()
                    .copied()
                    .take(slots + in_flight.len() + 1)
                    .collect(),
            ))
        }
        fn admit(&mut self, _row: &u32) -> Admit {
            Admit::Go
        }
        fn start(&mut self, row: u32) -> impl Future<Output = ()> + Send + 'static {
            self.started
                .lock()
                .expect("started")
                .push((row, Instant::now()));
            let running = self.running.clone();
            async move {
                {
                    let mut r = running.lock().expect("running");
                    r.0 += 1;
                    r.1 = r.1.max(r.0);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                running.lock().expect("running").0 -= 1;
            }
        }
        async fn finish(&mut self, key: u32, (): ()) -> Stored {
            if self.failures_left > 0 {
                self.failures_left -= 1;
                return Stored::Failed;
            }
            self.rows.lock().expect("rows").retain(|r| *r != key);
            Stored::Written
        }
        async fn woken(&mut self) {
            std::future::pending::<()>().await;
        }
        fn clock(&self) -> &Clock {
            &self.clock
        }
        async fn clock_stepped(&mut self, _by_ms: i64) {}
    }

    fn fake(rows: u32, max: usize, failures: u32) -> Fake {
        Fake {
            rows: Arc::new(Mutex::new((0..rows).collect())),
            max,
            running: Arc::new(Mutex::new((0, 0))),
            started: Arc::new(Mutex::new(Vec::new())),
            failures_left: failures,
            clock: Clock::system(),
            held_until: None,
        }
    }

    /// Runs `kind` until its rows are gone (at most `bound`), then cancels and waits.
    async fn drive(kind: Fake, bound: Duration) -> (Vec<(u32, Instant)>, usize, usize) {
        let (rows, running, started) = (
            kind.rows.clone(),
            kind.running.clone(),
            kind.started.clone(),
        );
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = tokio::spawn(run(kind, cancel.clone(), tracker.clone()));
        let drained = tokio::time::timeout(bound, async {
            while !rows.lock().expect("rows").is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "rows left: {:?}",
            rows.lock().expect("rows")
        );
        cancel.cancel();
        handle.await.expect("the loop ends when cancelled");
        tracker.close();
        tracker.wait().await;
        let (now, peak) = *running.lock().expect("running");
        let started = started.lock().expect("started").clone();
        (started, now, peak)
    }

    #[tokio::test(start_paused = true)]
    async fn every_due_row_runs_once_within_the_limit() {
        let (started, running, peak) = drive(fake(10, 3, 0), Duration::from_secs(5)).await;
        let mut keys: Vec<u32> = started.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            (0..10).collect::<Vec<_>>(),
            "each row once: {started:?}"
        );
        assert!(peak <= 3 && peak > 0, "peak {peak}");
        assert_eq!(running, 0);
    }

    /// Work held by a daemon that died is free once its lease ends, and nothing else wakes a
    /// loop with nothing to do: the claim's word on that lease must.
    #[tokio::test(start_paused = true)]
    async fn work_held_elsewhere_is_taken_when_its_lease_ends_with_nothing_else_to_wake_for() {
        let mut kind = fake(3, 3, 0);
        let start = Instant::now();
        kind.held_until = Some(start + Duration::from_secs(30));
        let (started, _, _) = drive(kind, Duration::from_secs(60)).await;
        assert_eq!(started.len(), 3, "{started:?}");
        for (_, at) in &started {
            let after = *at - start;
            assert!(
                after >= Duration::from_secs(30) && after < Duration::from_secs(31),
                "taken {after:?} after the start (the hold ends at 30 s)"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_in_flight_at_cancel_still_reports_back() {
        let kind = fake(1, 3, 0);
        let (rows, started) = (kind.rows.clone(), kind.started.clone());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let handle = tokio::spawn(run(kind, cancel.clone(), tracker.clone()));
        tokio::time::timeout(Duration::from_secs(5), async {
            while started.lock().expect("started").is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the job starts");
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("the loop ends once the job reported")
            .expect("no panic");
        assert!(
            rows.lock().expect("rows").is_empty(),
            "the job's outcome was taken in after the cancel"
        );
        assert_eq!(
            started.lock().expect("started").len(),
            1,
            "no job started after the cancel"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_holds_new_jobs_back_and_the_row_runs_again() {
        let (started, _, _) = drive(fake(1, 3, 1), Duration::from_secs(10)).await;
        assert_eq!(
            started.len(),
            2,
            "the unrecorded job runs again: {started:?}"
        );
        let gap = started[1].1 - started[0].1;
        // The first pause is `min` (1 s) spread by ±20 %, counted from the failure.
        assert!(gap >= Duration::from_millis(800), "retried after {gap:?}");
    }

    fn policy() -> StoreBackoffPolicy {
        StoreBackoffPolicy {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            paused: "paused",
            resumed: "resumed",
        }
    }

    #[test]
    fn a_step_is_noticed_once_between_two_rounds() {
        let mut w = StepWatch::default();
        let t = Instant::now();
        assert_eq!(
            w.observe(1_000_000, t),
            None,
            "the first round has nothing to compare"
        );
        let t2 = t + Duration::from_secs(30);
        assert_eq!(w.observe(1_030_000, t2), None);
        let t3 = t2 + Duration::from_secs(30);
        assert_eq!(w.observe(1_060_000 - 3_600_000, t3), Some(-3_600_000));
        assert_eq!(
            w.observe(1_061_000 - 3_600_000, t3 + Duration::from_secs(1)),
            None,
            "the new time is the new normal"
        );
    }

    #[test]
    fn rows_scheduled_before_a_backward_step_do_not_wait() {
        let ahead = Some(Duration::from_secs(600));
        assert!(!waits(1000, 1000, ahead), "due");
        assert!(waits(1001, 1000, ahead), "a little ahead");
        assert!(waits(601_000, 1000, ahead), "as far as this kind schedules");
        assert!(
            !waits(601_001 + 3_600_000, 1000, ahead),
            "further: scheduled before the clock went back"
        );
        assert!(waits(i64::MAX, 1000, None), "no bound");
    }

    #[test]
    fn the_earliest_reason_to_wake_wins() {
        let t = Instant::now();
        let mut w = WakeAt::default();
        assert_eq!(w.get(), None);
        w.at(t + Duration::from_secs(5));
        w.at(t + Duration::from_secs(2));
        w.at(t + Duration::from_secs(9));
        assert_eq!(w.get(), Some(t + Duration::from_secs(2)));
    }

    #[test]
    fn store_failures_hold_jobs_back_until_a_write_succeeds() {
        let p = policy();
        let mut b = StoreBackoff::default();
        let now = Instant::now();
        assert_eq!(b.holds_until(now), None);
        b.note(Stored::Failed, &p);
        let first = b.holds_until(Instant::now()).expect("held back");
        assert!(first <= Instant::now() + Duration::from_millis(1200));
        b.note(Stored::Untouched, &p);
        assert_eq!(
            b.failures, 1,
            "an answer kept in memory says nothing about the store"
        );
        b.note(Stored::Failed, &p);
        assert_eq!(b.failures, 2);
        assert!(b.holds_until(Instant::now()).is_some());
        b.note(Stored::Written, &p);
        assert_eq!(b.failures, 0);
        assert_eq!(b.holds_until(Instant::now()), None);
    }
}
