//! The deliver job: POSTing each stored event, byte for byte, to the local handlers that would
//! have received the API's callback — durably, in order, signed, and with retries.
//!
//! Deliveries are an outbox in SQLite: one row per event × target, written in the same
//! transaction as the event (see [`Router::routes`]). On the durable job loop
//! ([`crate::jobs::run`]) this kind supplies the query (due rows, in order per task and target:
//! a `complete` never goes before that task's `first`), the limits (a global one and
//! [`PER_ORIGIN_IN_FLIGHT`] per destination, so a dead handler holds back only its own queue),
//! and the pure [`after_attempt`] retry decision. A failure is retried on
//! `[forward] retry-schedule` with jitter, honouring `Retry-After`; `410 Gone` stops that
//! delivery at once; after the last attempt the delivery is `failed`, logged at error, and kept
//! for `sunopoll redeliver`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::{Admit, JobKind, StoreBackoffPolicy, Stored, WakeAt};
use crate::clock::{Clock, format_duration, ms};
use crate::forward::Router;
use crate::forward::attempt::{AttemptResult, Attempted, attempt, http_client};
use crate::metrics::Metrics;
use crate::store::{AttemptRecord, Claim, DeliveryNext, DueDelivery, Schedule, Store, StoreError};

/// Requests in flight to one destination (`scheme://host:port`) at once. A handler that hangs
/// can tie up at most this many of the global slots, so other handlers keep getting theirs.
pub const PER_ORIGIN_IN_FLIGHT: usize = 4;

/// What happens after attempt number `attempts` (1 for the first) ended with `result`. Pure.
///
/// A schedule of N delays means N attempts; delay k (k ≥ 1) follows failure k, spread by up to
/// ±10 % with `jitter` in `[0, 1)`, and stretched to a `Retry-After` that asks for longer.
pub fn after_attempt(
    attempts: u32,
    result: &AttemptResult,
    schedule: &[Duration],
    now: i64,
    jitter: f64,
) -> DeliveryNext {
    match result {
        AttemptResult::Delivered(_) => DeliveryNext::Delivered,
        AttemptResult::Gone => DeliveryNext::Failed,
        AttemptResult::Failed { retry_after, .. } => {
            let Some(delay) = schedule.get(attempts as usize) else {
                return DeliveryNext::Failed;
            };
            let spread = delay.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0));
            let delay =
                retry_after.map_or(spread, |ra| spread.max(ra.min(crate::api::MAX_RETRY_AFTER)));
            DeliveryNext::Retry(now.saturating_add(ms(delay)))
        }
    }
}

/// First pause after a failed record, doubling to [`STORE_PAUSE_MAX`].
const STORE_PAUSE_MIN: Duration = Duration::from_secs(1);
/// Longest pause while the store keeps failing.
const STORE_PAUSE_MAX: Duration = Duration::from_secs(60);

/// Everything the deliver job needs: the entry point the daemon starts.
pub struct Forwarder {
    /// The outbox.
    pub store: Store,
    /// Targets and policy.
    pub router: Router,
    /// The newest event sequence number: a change means new deliveries may be due.
    pub events: watch::Receiver<i64>,
    /// Poked by `redeliver`.
    pub wake: Arc<Notify>,
    /// Where attempts are counted and timed.
    pub metrics: Arc<Metrics>,
    /// The wall clock stored times are read from.
    pub clock: Clock,
}

impl Forwarder {
    /// Runs until `cancel` fires. Attempts already started finish (bounded by their timeout)
    /// and are recorded; the caller waits for `tracker`.
    pub async fn run(self, cancel: CancellationToken, tracker: TaskTracker) {
        let proxy = self.router.config().proxy.clone();
        let http = match http_client(proxy.as_ref()) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "cannot build the HTTP client for forwarding; events are stored but not forwarded");
                return;
            }
        };
        let known = self.router.target_specs();
        match self.store.fail_orphans(known, self.clock.now_ms()).await {
            Ok(0) => {}
            Ok(n) => warn!(
                deliveries = n,
                "gave up pending deliveries to targets no longer in the configuration (replay them with `sunopoll redeliver --target NAME` if the target comes back)"
            ),
            Err(e) => error!(error = %e, "cannot check for deliveries to removed targets"),
        }
        let job = DeliverJob {
            f: self,
            http,
            proxy,
            per_origin: HashMap::new(),
            events_open: true,
        };
        super::run(job, cancel, tracker).await;
    }
}

/// The deliver job on the loop: the forwarder's settings and the per-destination counts.
struct DeliverJob {
    f: Forwarder,
    http: reqwest::Client,
    /// The `[forward] proxy` `http` was built with; a reload that changes it rebuilds `http`.
    proxy: Option<url::Url>,
    /// Attempts in flight per destination (`scheme://host:port`).
    per_origin: HashMap<String, usize>,
    /// False once the event channel closed (the poll job is gone at shutdown): nothing new
    /// will be stored, so there is nothing to wait for there.
    events_open: bool,
}

/// What a finished attempt tells the loop.
struct Finished {
    origin: String,
    /// False when the attempt could not be recorded (the store is failing): the delivery is
    /// still due, and sending it again at once would hammer the handler with repeats.
    recorded: bool,
}

impl JobKind for DeliverJob {
    type Row = DueDelivery;
    type Key = i64;
    type Done = Finished;

    const QUEUE: &'static str = "the delivery queue";
    const STOPPED: &'static str = "forwarder stopped starting deliveries";

    fn key(row: &DueDelivery) -> i64 {
        row.id
    }

    fn due_at(row: &DueDelivery) -> i64 {
        row.next_attempt_at
    }

    fn max_in_flight(&self) -> usize {
        self.f.router.config().max_in_flight
    }

    fn store_backoff(&self) -> StoreBackoffPolicy {
        StoreBackoffPolicy {
            min: STORE_PAUSE_MIN,
            max: STORE_PAUSE_MAX,
            paused: "cannot record delivery attempts; pausing all forwarding so handlers are not sent repeats",
            resumed: "the store records deliveries again; forwarding resumes",
        }
    }

    async fn prepare(&mut self, in_flight: usize, _wake: &mut WakeAt) -> usize {
        self.max_in_flight().saturating_sub(in_flight)
    }

    async fn claim(
        &self,
        slots: usize,
        in_flight: &HashSet<i64>,
    ) -> Result<Claim<DueDelivery>, StoreError> {
        let full: Vec<String> = self
            .per_origin
            .iter()
            .filter(|(_, n)| **n >= PER_ORIGIN_IN_FLIGHT)
            .map(|(o, _)| o.clone())
            .collect();
        let busy: Vec<i64> = in_flight.iter().copied().collect();
        // Only targets this daemon is configured for: on a queue several daemons share, a
        // target another daemon's configuration names is that daemon's to deliver.
        let targets: Vec<String> = (self.f.router.config().targets.iter())
            .map(|t| t.name.clone())
            .collect();
        self.f
            .store
            .due_deliveries(targets, busy, full, slots + 1)
            .await
    }

    fn admit(&mut self, row: &DueDelivery) -> Admit {
        let count = self.per_origin.entry(row.origin.clone()).or_insert(0);
        if *count >= PER_ORIGIN_IN_FLIGHT {
            return Admit::Skip; // this destination filled up in this batch
        }
        *count += 1;
        Admit::Go
    }

    fn start(&mut self, row: DueDelivery) -> impl Future<Output = Finished> + Send + 'static {
        let proxy = self.f.router.config().proxy.clone();
        if proxy != self.proxy {
            match http_client(proxy.as_ref()) {
                Ok(http) => {
                    info!(proxy = %proxy.as_ref().map_or_else(|| "none".to_owned(), |p| crate::api::redact_url(p.as_str())),
                          "forwarding proxy changed");
                    self.http = http;
                    self.proxy = proxy;
                }
                // Keep the client that works; the next delivery tries again.
                Err(e) => {
                    error!(error = %e, "cannot build the HTTP client for the new forward.proxy; keeping the old one")
                }
            }
        }
        let store = self.f.store.clone();
        let router = self.f.router.clone();
        let http = self.http.clone();
        let metrics = Arc::clone(&self.f.metrics);
        let clock = self.f.clock.clone();
        async move {
            let attempted = attempt(&router, &http, &row).await;
            let recorded = record(&store, &router, &metrics, &clock, &row, attempted).await;
            Finished {
                origin: row.origin,
                recorded,
            }
        }
    }

    async fn finish(&mut self, _id: i64, f: Finished) -> Stored {
        if let Some(n) = self.per_origin.get_mut(&f.origin) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_origin.remove(&f.origin);
            }
        }
        if f.recorded {
            Stored::Written
        } else {
            Stored::Failed
        }
    }

    async fn woken(&mut self) {
        super::event_or_wake(&mut self.f.events, &mut self.events_open, &self.f.wake).await;
    }

    fn clock(&self) -> &Clock {
        &self.f.clock
    }

    async fn clock_stepped(&mut self, by_ms: i64) {
        // As for polls: back, the retries move back with the clock (one stored after the step
        // only comes early); ahead, they are all due and go under the per-destination limits.
        if by_ms < 0 {
            match self.f.store.shift_due(Schedule::Deliveries, by_ms).await {
                Ok(n) => info!(
                    deliveries = n,
                    "moved the pending deliveries back with the clock"
                ),
                Err(e) => {
                    error!(error = %e, "cannot move the pending deliveries back with the clock")
                }
            }
        }
    }
}

/// Records one finished attempt with what comes next, and logs it. Returns false if it could
/// not be recorded.
async fn record(
    store: &Store,
    router: &Router,
    metrics: &Metrics,
    clock: &Clock,
    row: &DueDelivery,
    attempted: Attempted,
) -> bool {
    let config = router.config();
    let Attempted {
        result,
        started_at,
        took,
    } = attempted;
    let attempt_no = row.attempts + 1;
    let next = after_attempt(
        attempt_no,
        &result,
        &config.retry_schedule,
        clock.now_ms(),
        fastrand::f64(),
    );
    let (status, error_text) = match &result {
        AttemptResult::Delivered(s) => (Some(*s), None),
        AttemptResult::Gone => (
            Some(410),
            Some("HTTP 410 Gone: the handler asked not to receive this event again".to_owned()),
        ),
        AttemptResult::Failed { status, cause, .. } => (*status, Some(cause.clone())),
    };
    let record = AttemptRecord {
        started_at,
        duration_ms: i64::try_from(took.as_millis()).unwrap_or(i64::MAX),
        status,
        error: error_text.clone(),
    };
    match store.record_attempt(row, record, next.clone()).await {
        Ok(true) => {}
        Ok(false) => {
            info!(task_id = %row.task_id, stage = %row.stage, target = %row.target, seq = row.event_seq,
                  "a redelivery was requested while this attempt was in flight; sending it again");
            return true;
        }
        Err(e) => {
            error!(task_id = %row.task_id, stage = %row.stage, target = %row.target, error = %e,
                   "cannot record a delivery attempt; it will be made again");
            return false;
        }
    }
    let latency_ms = took.as_millis();
    let result = match next {
        DeliveryNext::Delivered => "delivered",
        DeliveryNext::Retry(_) => "retry",
        DeliveryNext::Failed => "failed",
    };
    metrics.delivery_attempt(&row.target, result, took);
    match next {
        DeliveryNext::Delivered => info!(
            task_id = %row.task_id, stage = %row.stage, target = %row.target,
            status = status.unwrap_or(0), latency_ms, attempt = attempt_no, seq = row.event_seq,
            "delivered"
        ),
        DeliveryNext::Retry(at) => warn!(
            task_id = %row.task_id, stage = %row.stage, target = %row.target,
            cause = %error_text.unwrap_or_default(), attempt = attempt_no,
            of = config.retry_schedule.len(),
            retry_in = %format_duration(Duration::from_millis((at - clock.now_ms()).max(0).unsigned_abs())),
            "delivery failed; will retry"
        ),
        DeliveryNext::Failed => error!(
            task_id = %row.task_id, stage = %row.stage, target = %row.target,
            cause = %error_text.unwrap_or_default(), attempts = attempt_no, seq = row.event_seq,
            "delivery given up; replay it with `sunopoll redeliver`"
        ),
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Vec<Duration> {
        crate::config::DEFAULT_RETRY_SCHEDULE.to_vec()
    }

    fn failed() -> AttemptResult {
        AttemptResult::Failed {
            status: Some(500),
            cause: "HTTP 500".into(),
            retry_after: None,
        }
    }

    #[test]
    fn a_schedule_of_n_delays_gives_n_attempts() {
        let s = schedule();
        for attempt in 1..s.len() as u32 {
            match after_attempt(attempt, &failed(), &s, 0, 0.5) {
                DeliveryNext::Retry(at) => {
                    assert_eq!(at, ms(s[attempt as usize]), "attempt {attempt}")
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        assert_eq!(
            after_attempt(8, &failed(), &s, 0, 0.5),
            DeliveryNext::Failed
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let s = vec![Duration::ZERO, Duration::from_secs(100)];
        for j in [0.0, 0.3, 0.999] {
            let DeliveryNext::Retry(at) = after_attempt(1, &failed(), &s, 0, j) else {
                panic!()
            };
            assert!((90_000..=110_000).contains(&at), "{at}");
        }
    }

    #[test]
    fn gone_stops_and_success_delivers_and_retry_after_stretches() {
        let s = schedule();
        assert_eq!(
            after_attempt(1, &AttemptResult::Gone, &s, 0, 0.5),
            DeliveryNext::Failed
        );
        assert_eq!(
            after_attempt(1, &AttemptResult::Delivered(204), &s, 0, 0.5),
            DeliveryNext::Delivered
        );
        let slow = AttemptResult::Failed {
            status: Some(429),
            cause: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(60)),
        };
        assert_eq!(
            after_attempt(1, &slow, &s, 0, 0.5),
            DeliveryNext::Retry(60_000)
        );
    }
}
