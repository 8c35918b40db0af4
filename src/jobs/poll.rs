//! The polling loop: which task to poll next, when, and what its answer changes.
//!
//! One loop owns the schedule. It asks the store for the earliest tasks by `next_poll_at`,
//! starts polls under three limits (one request per task, `max-in-flight` overall, and
//! `max-requests-per-second` overall), and sleeps until the next task is due, an `add` wakes it,
//! or a poll finishes. Each poll runs as its own tracked task: it asks the API, then commits the
//! task's new state and events in one transaction through [`decide`], a pure function.
//!
//! Answers that concern the API rather than the task (throttled, unavailable, key rejected) never
//! touch the task: they close the [`Gate`], one global pause with exponential backoff and jitter
//! that is persisted so a restart does not hammer the API. When a pause ends, a single probe
//! request goes first; normal polling resumes only once the API answers it properly.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::api::{ApiClient, Outcome, clip};
use crate::clock::{format_duration, format_utc, ms, now_ms};
use crate::config::PollConfig;
use crate::events::{NewEvent, Stage, error_event, map_record};
use crate::forward::Router;
use crate::protocol::TaskState;
use crate::store::{GateRow, Store, TaskRow, TaskUpdate};
use crate::systemd::Notifier;

/// Consecutive global failures (throttled, unavailable) of one task, each while the API was
/// answering others, after which they count against that task alone: it backs off by itself
/// instead of pausing everyone. One task the API always fails for must not stop all polling.
pub const POISON_LIMIT: u32 = 3;

/// What a global answer means for the task that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobalForTask {
    /// Pause everyone (the gate's business); the task only steps aside until after the pause,
    /// with this many consecutive failures.
    Defer {
        /// The task's new failure count.
        failures: u32,
    },
    /// The API has kept failing this task alone: treat it as this task's problem.
    TaskOnly,
}

/// Decides whether a throttled/unavailable/unauthorized answer for `task` is everyone's
/// problem or the task's. Pure. A probe's failure says the API is still failing (nothing
/// about the task); a rejected key is everyone's problem by nature.
pub fn global_for_task(task: &TaskRow, pause: PauseKind, probe: bool) -> GlobalForTask {
    if probe || pause == PauseKind::Unauthorized {
        return GlobalForTask::Defer {
            failures: task.failures,
        };
    }
    let failures = task.failures.saturating_add(1);
    if failures > POISON_LIMIT {
        GlobalForTask::TaskOnly
    } else {
        GlobalForTask::Defer { failures }
    }
}

/// Consecutive rejections of one task ID after which the task ends with an `error` event.
pub const REJECTION_LIMIT: u32 = 3;

/// The callback code of the `error` event sent when a task passes its deadline (the API's own
/// "timeout" code).
pub const DEADLINE_CODE: i64 = 408;

/// The shortest gap between two `STATUS=` lines sent to systemd. A busy queue changes its
/// counts many times a second; `systemctl status` is read by people, so every few seconds is
/// current enough, and it bounds the task counting the line needs.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Delay before the next try after `attempt` consecutive failures (1 for the first): `base`
/// doubled per attempt up to `max`, spread by ±20 % with `jitter` in `[0, 1)`, and never outside
/// `[base, max]`. Pure, so tests can pin `jitter`.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(40);
    let nominal = base.saturating_mul(1u32 << doublings.min(31)).min(max);
    let spread = nominal.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0));
    spread.clamp(base.min(max), max)
}

/// The global pause after the `attempt`-th throttled or unavailable answer in a row, honouring
/// the server's `Retry-After` when it asks for longer.
pub fn pause_delay(
    attempt: u32,
    policy: &PollConfig,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let d = backoff_delay(attempt, policy.interval, policy.backoff_max, jitter);
    retry_after.map_or(d, |ra| d.max(ra))
}

/// What one poll's answer does to its task. Pure: the stored task, the answer, the time, the
/// policy and a jitter value in `[0, 1)` decide everything.
///
/// Global outcomes (throttled, unavailable, unauthorized) are the gate's business and must not
/// be passed here; they leave the task untouched.
pub fn decide(
    task: &TaskRow,
    outcome: &Outcome,
    now: i64,
    policy: &PollConfig,
    jitter: f64,
) -> TaskUpdate {
    let next_regular = now
        .saturating_add(ms(policy.interval))
        .min(task.deadline_at.max(now));
    let past_deadline = now >= task.deadline_at;
    let deadline_event = || {
        let after = format_duration(Duration::from_millis(
            u64::try_from(task.deadline_at.saturating_sub(task.added_at)).unwrap_or(0),
        ));
        error_event(
            &task.id,
            DEADLINE_CODE,
            &format!("Timed out: the task did not finish within {after} (sunopoll task-deadline)."),
        )
    };
    let mut update = TaskUpdate {
        state: TaskState::Active,
        last_status: None,
        last_error: None,
        failures: task.failures,
        rejections: task.rejections,
        next_poll_at: next_regular,
        events: Vec::new(),
        routes: Vec::new(),
        submitted_callback_url: None,
        first_delivery_delay: 0,
        timed_out: false,
    };
    match outcome {
        Outcome::Progress(record) | Outcome::Pending(record) => {
            update.last_status = Some(record.status.to_string());
            update.failures = 0;
            update.rejections = 0;
            update.events = map_record(&task.id, task.stage, record, policy.fill_skipped_stages);
        }
        Outcome::Rejected { code, message } => {
            update.rejections = task.rejections.saturating_add(1);
            update.last_error = Some(format!(
                "rejected by the API: code {code}: {}",
                clip(message, 200)
            ));
            if update.rejections >= REJECTION_LIMIT {
                update.events = vec![error_event(&task.id, *code, message)];
            } else {
                let delay = backoff_delay(
                    update.rejections,
                    policy.interval,
                    policy.backoff_max,
                    jitter,
                );
                update.next_poll_at = now.saturating_add(ms(delay));
            }
        }
        Outcome::Broken { cause } => {
            update.failures = task.failures.saturating_add(1);
            update.last_error = Some(cause.clone());
            let delay = backoff_delay(update.failures, policy.interval, policy.backoff_max, jitter);
            update.next_poll_at = now.saturating_add(ms(delay));
        }
        Outcome::Throttled { .. } | Outcome::Unavailable { .. } | Outcome::Unauthorized { .. } => {
            debug_assert!(false, "global outcomes are handled by the gate");
        }
    }
    let reached = update.events.last().map(|e| e.stage).or(task.stage);
    if !reached.is_some_and(Stage::is_terminal) && past_deadline {
        update.events.push(deadline_event());
        update.timed_out = true;
    }
    update.state = match update.events.last().map(|e| e.stage) {
        Some(Stage::Complete) => TaskState::Done,
        Some(Stage::Error) => TaskState::Failed,
        _ => TaskState::Active,
    };
    update
}

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

/// Why polling is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseKind {
    /// The API asked us to slow down.
    Throttled,
    /// The API is down or failing.
    Unavailable,
    /// The API key was rejected.
    Unauthorized,
}

impl PauseKind {
    fn as_str(self) -> &'static str {
        match self {
            PauseKind::Throttled => "throttled",
            PauseKind::Unavailable => "unavailable",
            PauseKind::Unauthorized => "unauthorized",
        }
    }

    fn parse(s: &str) -> PauseKind {
        match s {
            "throttled" => PauseKind::Throttled,
            "unauthorized" => PauseKind::Unauthorized,
            _ => PauseKind::Unavailable,
        }
    }
}

/// The global gate in front of every request.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// Polling normally.
    Open,
    /// Paused until `until`; then one probe.
    Paused {
        /// Why.
        kind: PauseKind,
        /// Consecutive pauses.
        attempt: u32,
        /// Unix ms when the probe may go.
        until: i64,
        /// Unix ms when this run of pauses began.
        since: i64,
        /// What the API said.
        cause: String,
    },
}

impl Gate {
    fn from_row(row: Option<GateRow>) -> Gate {
        match row {
            None => Gate::Open,
            Some(r) => {
                let kind = PauseKind::parse(&r.kind);
                Gate::Paused {
                    kind,
                    attempt: r.attempt.max(1),
                    // A rejected key is usually fixed by changing it and restarting: try the
                    // (possibly new) key at once, with one probe, instead of waiting out the
                    // old pause. Throttling and outages are the API's, and keep their pause.
                    until: if kind == PauseKind::Unauthorized {
                        0
                    } else {
                        r.paused_until
                    },
                    since: r.since,
                    cause: r.cause,
                }
            }
        }
    }

    fn to_row(&self) -> Option<GateRow> {
        match self {
            Gate::Open => None,
            Gate::Paused {
                kind,
                attempt,
                until,
                since,
                cause,
            } => Some(GateRow {
                kind: kind.as_str().to_owned(),
                attempt: *attempt,
                paused_until: *until,
                since: *since,
                cause: cause.clone(),
            }),
        }
    }
}

/// What `status` shows about polling. Updated by the loop, read by the control server.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PollStatus {
    /// `polling`, `paused` or `probing`.
    pub state: String,
    /// Why polling is paused, if it is.
    pub pause_kind: Option<PauseKind>,
    /// Consecutive pauses.
    pub pause_attempt: u32,
    /// When the pause ends (RFC 3339), if paused.
    pub paused_until: Option<String>,
    /// When the current run of pauses began (RFC 3339).
    pub paused_since: Option<String>,
    /// Milliseconds the API has been paused for, continuously.
    pub paused_for_ms: i64,
    /// What the API said to cause the pause.
    pub pause_cause: Option<String>,
    /// Requests in flight now.
    pub in_flight: usize,
    /// Requests made since start.
    pub requests: u64,
    /// When the API last answered (RFC 3339).
    pub last_answer_at: Option<String>,
    /// What that answer was (`pending`, `progress`, `throttled`, …).
    pub last_answer: Option<String>,
}

/// Shared, cheaply readable poll status.
pub type SharedStatus = Arc<Mutex<PollStatus>>;

/// Polling held back because poll results cannot be stored (disk full, store locked). Kept in
/// memory only: there is nowhere to persist it, and a restart simply tries again.
#[derive(Debug, Default)]
struct StoreBackoff {
    /// Store failures in a row.
    failures: u32,
    /// No new polls before this.
    until: Option<Instant>,
}

/// What a finished poll tells the loop.
struct Finished {
    id: String,
    probe: bool,
    /// The gate epoch when the request was sent: a throttle answer only escalates the pause if
    /// no pause began since (otherwise four parallel 430s would count as four failures).
    epoch: u64,
    outcome: OutcomeSummary,
}

enum OutcomeSummary {
    Global {
        kind: PauseKind,
        retry_after: Option<Duration>,
        cause: String,
    },
    /// The API answered about the task (whatever it said).
    Answered(&'static str),
    /// The result could not be stored; the task stays due and is retried.
    StoreFailed,
}

/// Everything the loop needs.
pub struct Scheduler {
    /// The queue.
    pub store: Store,
    /// The API.
    pub api: ApiClient,
    /// `[poll]` settings.
    pub policy: PollConfig,
    /// Poked by `add`.
    pub wake: Arc<Notify>,
    /// The newest event sequence number, for followers and forwarders.
    pub events: watch::Sender<i64>,
    /// Published status.
    pub status: SharedStatus,
    /// Where new events are delivered.
    pub router: Router,
    /// Where `STATUS=` lines and watchdog pings go (systemd's notify socket, or nowhere).
    pub notifier: Notifier,
    /// How often to ping the watchdog, if systemd runs one. The pings come from the loop
    /// itself, so a wedged loop stops them and systemd restarts the service.
    pub watchdog: Option<Duration>,
}

impl Scheduler {
    /// Loads the persisted pause (if any) and publishes the initial status. Call before
    /// [`Scheduler::run`] so `status` is right from the first request.
    pub async fn load_gate(&self) -> Gate {
        let gate = match self.store.load_gate().await {
            Ok(row) => Gate::from_row(row),
            Err(e) => {
                error!(error = %e, "cannot read the saved pause state; starting unpaused");
                Gate::Open
            }
        };
        if let Gate::Paused {
            kind, until, cause, ..
        } = &gate
        {
            let wait = (*until - now_ms()).max(0);
            warn!(
                pause = kind.as_str(),
                cause = %cause,
                resume_in = %format_duration(Duration::from_millis(wait.unsigned_abs())),
                "polling was paused before the restart; honouring the pause, then probing with one request"
            );
        }
        self.publish(&gate, 0, now_ms());
        gate
    }

    /// Runs from `gate` until `cancel` fires, then stops starting polls. Polls already started
    /// keep running in `tracker` and commit their results; the caller waits for them.
    pub async fn run(self, mut gate: Gate, cancel: CancellationToken, tracker: TaskTracker) {
        let capacity = self.policy.max_in_flight;
        let (done_tx, mut done_rx) = mpsc::channel::<Finished>(capacity * 2 + 1);
        let mut in_flight: HashSet<String> = HashSet::new();
        let mut probe_in_flight = false;
        let mut store_backoff = StoreBackoff::default();
        let mut epoch: u64 = 0;
        let mut limiter = self.policy.max_requests_per_second.map(RateLimiter::new);
        let mut next_ping = Instant::now();
        let mut report = StatusReport::new();

        loop {
            // Take in every finished poll first: they free slots and may move the gate.
            while let Ok(f) = done_rx.try_recv() {
                self.finish(
                    f,
                    &mut gate,
                    &mut epoch,
                    &mut in_flight,
                    &mut probe_in_flight,
                    &mut store_backoff,
                )
                .await;
                report.counts_changed = true;
            }
            if cancel.is_cancelled() {
                break;
            }
            let now = now_ms();
            self.publish(&gate, in_flight.len(), now);

            // How many requests may start now, and what to wait for otherwise.
            let mut wake_at: Option<Instant> = None;

            // The watchdog is pinged here, in the loop that does the work, never from a timer
            // of its own: if this loop hangs (a stuck store, a deadlock), the pings stop and
            // systemd restarts the service. An idle loop wakes only for this, once a period.
            if let Some(period) = self.watchdog {
                let t = Instant::now();
                if t >= next_ping {
                    self.notifier.watchdog();
                    next_ping = t + period;
                }
                wake_at = earliest(wake_at, next_ping);
            }
            if self.notifier.is_enabled()
                && let Some(at) = self.report_status(&mut report, &gate, now).await
            {
                wake_at = earliest(wake_at, at);
            }
            let (slots, probing) = match &gate {
                Gate::Open => (capacity.saturating_sub(in_flight.len()), false),
                Gate::Paused { until, .. } if now < *until => {
                    wake_at = earliest(wake_at, instant_at(*until, now));
                    (0, false)
                }
                Gate::Paused { .. } => {
                    (usize::from(!probe_in_flight && in_flight.is_empty()), true)
                }
            };
            // While results cannot be stored, polling waits: every answer would be thrown away
            // and the task, still due, asked for again at once.
            let slots = match store_backoff.until {
                Some(until) if Instant::now() < until => {
                    wake_at = earliest(wake_at, until);
                    0
                }
                _ => slots,
            };
            if slots > 0 {
                match self.store.due_window(slots + in_flight.len() + 1).await {
                    Ok(rows) => {
                        let now = now_ms();
                        let mut started = 0;
                        for row in rows {
                            if in_flight.contains(&row.id) {
                                continue;
                            }
                            if row.next_poll_at > now {
                                // The earliest task not yet due: the next reason to wake.
                                wake_at = earliest(wake_at, instant_at(row.next_poll_at, now));
                                break;
                            }
                            if started == slots {
                                break; // a finishing poll wakes the loop
                            }
                            if let Some(limiter) = limiter.as_mut() {
                                let t = Instant::now();
                                let ready = limiter.ready_at(t);
                                if t < ready {
                                    wake_at = earliest(wake_at, ready);
                                    break;
                                }
                                limiter.record(t);
                            }
                            if probing {
                                probe_in_flight = true;
                                info!(task_id = %row.id, "pause over; probing the API with one request");
                            }
                            in_flight.insert(row.id.clone());
                            self.spawn_poll(&tracker, row.id, probing, epoch, done_tx.clone());
                            started += 1;
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "cannot read the queue; retrying in 1s");
                        wake_at = earliest(wake_at, Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = cancel.cancelled() => {}
                () = self.wake.notified() => report.counts_changed = true,
                Some(f) = done_rx.recv() => {
                    self.finish(f, &mut gate, &mut epoch, &mut in_flight, &mut probe_in_flight, &mut store_backoff).await;
                    report.counts_changed = true;
                }
                () = sleep => {}
            }
        }
        debug!(
            in_flight = in_flight.len(),
            "scheduler stopped starting polls"
        );
    }

    /// Sends systemd a new `STATUS=` line if it changed, at most once per [`STATUS_EVERY`].
    /// Returns when to come back if a change is waiting for that gap to pass.
    async fn report_status(
        &self,
        report: &mut StatusReport,
        gate: &Gate,
        now: i64,
    ) -> Option<Instant> {
        let line = status_line(report.active, gate, now);
        if !report.counts_changed && line == report.sent {
            return None;
        }
        let t = Instant::now();
        if t < report.next_at {
            return Some(report.next_at);
        }
        report.next_at = t + STATUS_EVERY;
        let mut retry = None;
        let line = if report.counts_changed {
            match self.store.active_count().await {
                Ok(n) => {
                    report.active = Some(n);
                    report.counts_changed = false;
                    status_line(report.active, gate, now)
                }
                // The store logs its own errors; keep the old count and count again later.
                Err(_) => {
                    retry = Some(report.next_at);
                    line
                }
            }
        } else {
            line
        };
        if line != report.sent {
            self.notifier.status(&line);
            report.sent = line;
        }
        retry
    }

    fn spawn_poll(
        &self,
        tracker: &TaskTracker,
        id: String,
        probe: bool,
        epoch: u64,
        done: mpsc::Sender<Finished>,
    ) {
        let api = self.api.clone();
        let store = self.store.clone();
        let policy = self.policy.clone();
        let events = self.events.clone();
        let router = self.router.clone();
        if let Ok(mut s) = self.status.lock() {
            s.requests += 1;
        }
        tracker.spawn(async move {
            let outcome = api.record_info(&id).await;
            let summary =
                apply_outcome(&store, &policy, &router, &events, &id, outcome, probe).await;
            let _ = done
                .send(Finished {
                    id,
                    probe,
                    epoch,
                    outcome: summary,
                })
                .await;
        });
    }

    async fn finish(
        &self,
        f: Finished,
        gate: &mut Gate,
        epoch: &mut u64,
        in_flight: &mut HashSet<String>,
        probe_in_flight: &mut bool,
        store_backoff: &mut StoreBackoff,
    ) {
        in_flight.remove(&f.id);
        if f.probe {
            *probe_in_flight = false;
        }
        let now = now_ms();
        match f.outcome {
            OutcomeSummary::Global {
                kind,
                retry_after,
                cause,
            } => {
                self.record_answer(kind.as_str(), now);
                let counts = f.probe || (*gate == Gate::Open && f.epoch == *epoch);
                if !counts {
                    debug!(task_id = %f.id, cause = %cause, "another failure from a request sent before the pause");
                    return;
                }
                let (attempt, since) = match gate {
                    Gate::Paused { attempt, since, .. } => (*attempt + 1, *since),
                    Gate::Open => (1, now),
                };
                let delay = match kind {
                    PauseKind::Unauthorized => self.policy.backoff_max,
                    _ => pause_delay(attempt, &self.policy, retry_after, fastrand::f64()),
                };
                let retry_in = format_duration(delay);
                match kind {
                    PauseKind::Unauthorized => error!(
                        cause = %cause,
                        attempt,
                        retry_in = %retry_in,
                        "the API rejected the API key; all polling is paused. Check the key \
                         ($CREDENTIALS_DIRECTORY/api-key, api.key-file or SUNO_API_KEY)"
                    ),
                    _ => warn!(
                        pause = kind.as_str(),
                        cause = %cause,
                        attempt,
                        retry_in = %retry_in,
                        retry_after = retry_after.map_or_else(|| "none".to_owned(), format_duration),
                        "API {}; pausing all polling", kind.as_str()
                    ),
                }
                *gate = Gate::Paused {
                    kind,
                    attempt,
                    until: now.saturating_add(ms(delay)),
                    since,
                    cause,
                };
                *epoch += 1;
                if let Err(e) = self.store.save_gate(gate.to_row()).await {
                    error!(error = %e, "cannot save the pause state; a restart would not honour it");
                }
            }
            OutcomeSummary::Answered(kind) => {
                self.record_answer(kind, now);
                if store_backoff.failures > 0 {
                    info!(
                        failures = store_backoff.failures,
                        "poll results are stored again; polling resumes"
                    );
                    *store_backoff = StoreBackoff::default();
                }
                if f.probe
                    && let Gate::Paused { since, attempt, .. } = gate
                {
                    info!(
                        paused_for = %format_duration(Duration::from_millis((now - *since).max(0).unsigned_abs())),
                        pauses = *attempt,
                        "the API answers again; polling resumes"
                    );
                    *gate = Gate::Open;
                    *epoch += 1;
                    if let Err(e) = self.store.save_gate(None).await {
                        error!(error = %e, "cannot clear the saved pause state");
                    }
                }
            }
            OutcomeSummary::StoreFailed => {
                store_backoff.failures = store_backoff.failures.saturating_add(1);
                let delay = backoff_delay(
                    store_backoff.failures,
                    self.policy.interval,
                    self.policy.backoff_max,
                    fastrand::f64(),
                );
                store_backoff.until = Some(Instant::now() + delay);
                warn!(
                    failures = store_backoff.failures,
                    retry_in = %format_duration(delay),
                    "poll results cannot be stored; pausing all polling until the store works again"
                );
            }
        }
    }

    fn record_answer(&self, kind: &str, now: i64) {
        if let Ok(mut s) = self.status.lock() {
            s.last_answer = Some(kind.to_owned());
            s.last_answer_at = Some(format_utc(now));
        }
    }

    fn publish(&self, gate: &Gate, in_flight: usize, now: i64) {
        let Ok(mut s) = self.status.lock() else {
            return;
        };
        s.in_flight = in_flight;
        match gate {
            Gate::Open => {
                s.state = "polling".to_owned();
                s.pause_kind = None;
                s.pause_attempt = 0;
                s.paused_until = None;
                s.paused_since = None;
                s.paused_for_ms = 0;
                s.pause_cause = None;
            }
            Gate::Paused {
                kind,
                attempt,
                until,
                since,
                cause,
            } => {
                s.state = if now < *until { "paused" } else { "probing" }.to_owned();
                s.pause_kind = Some(*kind);
                s.pause_attempt = *attempt;
                s.paused_until = Some(crate::clock::format_utc(*until));
                s.paused_since = Some(crate::clock::format_utc(*since));
                s.paused_for_ms = (now - *since).max(0);
                s.pause_cause = Some(cause.clone());
            }
        }
    }
}

/// What the loop last told systemd in `STATUS=`, and when it may say more.
struct StatusReport {
    /// The line last sent.
    sent: String,
    /// Active tasks at the last count; `None` before the first.
    active: Option<i64>,
    /// An add or a finished poll may have changed the count since.
    counts_changed: bool,
    /// No new line before this.
    next_at: Instant,
}

impl StatusReport {
    fn new() -> StatusReport {
        StatusReport {
            sent: String::new(),
            active: None,
            counts_changed: true,
            next_at: Instant::now(),
        }
    }
}

/// The one-line summary systemd shows in `systemctl status`: how many tasks are being polled,
/// and whether polling is paused and until when. Pure: `active` is the last count (`None` before
/// the first), `now` the current Unix ms. The time of the next try is absolute, so the line stays
/// true between updates.
pub fn status_line(active: Option<i64>, gate: &Gate, now: i64) -> String {
    let tasks = match active {
        None => "starting".to_owned(),
        Some(1) => "1 task active".to_owned(),
        Some(n) => format!("{n} tasks active"),
    };
    match gate {
        Gate::Open => format!("{tasks}, polling"),
        Gate::Paused { kind, until, .. } => {
            let why = match kind {
                PauseKind::Throttled => "the API is throttling",
                PauseKind::Unavailable => "the API is unavailable",
                PauseKind::Unauthorized => "the API key was rejected",
            };
            if now < *until {
                format!("{tasks}; paused: {why}, next try at {}", format_utc(*until))
            } else {
                format!("{tasks}; probing the API after a pause ({why})")
            }
        }
    }
}

/// Applies one answer: global ones go back to the loop; per-task ones are decided and committed
/// with their events, which are then logged and announced.
async fn apply_outcome(
    store: &Store,
    policy: &PollConfig,
    router: &Router,
    events: &watch::Sender<i64>,
    id: &str,
    outcome: Outcome,
    probe: bool,
) -> OutcomeSummary {
    let kind = outcome.kind();
    let global = match &outcome {
        Outcome::Throttled { retry_after, cause } => {
            Some((PauseKind::Throttled, *retry_after, cause.clone()))
        }
        Outcome::Unavailable { retry_after, cause } => {
            Some((PauseKind::Unavailable, *retry_after, cause.clone()))
        }
        Outcome::Unauthorized { cause } => Some((PauseKind::Unauthorized, None, cause.clone())),
        _ => None,
    };
    let now = now_ms();
    let jitter = fastrand::f64();
    let decide_policy = policy.clone();
    let routing = router.clone();
    let logged = outcome.clone();
    let global_in = global.clone();
    let applied = store
        .apply_poll(id.to_owned(), now, move |row| {
            let effective = match global_in {
                None => outcome,
                Some((pause, _, cause)) => match global_for_task(row, pause, probe) {
                    // The usual case: the gate pauses everyone; this task only steps aside so
                    // the probe after the pause goes to another task.
                    GlobalForTask::Defer { failures } => {
                        let delay = backoff_delay(
                            failures.max(1),
                            decide_policy.interval,
                            decide_policy.backoff_max,
                            jitter,
                        );
                        return TaskUpdate {
                            state: TaskState::Active,
                            last_status: None,
                            last_error: Some(cause),
                            failures,
                            rejections: row.rejections,
                            next_poll_at: now.saturating_add(ms(delay)),
                            events: Vec::new(),
                            routes: Vec::new(),
                            submitted_callback_url: None,
                            first_delivery_delay: 0,
                            timed_out: false,
                        };
                    }
                    GlobalForTask::TaskOnly => Outcome::Broken {
                        cause: format!("{cause} (for this task only: the API answers the others)"),
                    },
                },
            };
            let mut update = decide(row, &effective, now, &decide_policy, jitter);
            let submitted = match &effective {
                Outcome::Progress(r) | Outcome::Pending(r) => r.submitted_callback_url(),
                _ => None,
            };
            if !update.events.is_empty() {
                update.routes = routing.routes(row, submitted.as_deref());
                update.first_delivery_delay = routing
                    .config()
                    .retry_schedule
                    .first()
                    .map_or(0, |d| ms(*d));
            }
            if submitted.is_some() && submitted != row.submitted_callback_url {
                update.submitted_callback_url = submitted;
            }
            update
        })
        .await;
    if let Some((pause, retry_after, cause)) = global {
        let task_only = matches!(&applied, Ok(Some(a)) if a.update.failures > POISON_LIMIT && !probe && pause != PauseKind::Unauthorized);
        if !task_only {
            if let Err(e) = &applied {
                error!(task_id = %id, error = %e, "cannot record the failed poll for this task");
            }
            return OutcomeSummary::Global {
                kind: pause,
                retry_after,
                cause,
            };
        }
        if let Ok(Some(a)) = &applied {
            warn!(task_id = %id, cause = %cause, attempt = a.update.failures,
                  retry_in = %format_duration(Duration::from_millis((a.update.next_poll_at - now).max(0).unsigned_abs())),
                  "the API keeps failing this task while answering others; backing off this task alone instead of pausing everyone");
            if a.update.timed_out {
                warn!(task_id = %id, "Timed out: the task did not finish before its task-deadline; giving it up with an error event (code 408)");
            }
            for (ev, seq) in a.update.events.iter().zip(&a.seqs) {
                log_event(id, ev, *seq);
            }
            if let Some(max) = a.seqs.iter().max() {
                events.send_modify(|latest| *latest = (*latest).max(*max));
            }
        }
        return OutcomeSummary::Answered("broken");
    }
    let applied = match applied {
        Ok(Some(a)) => a,
        Ok(None) => {
            debug!(task_id = %id, "task was removed while its poll was in flight; answer dropped");
            return OutcomeSummary::Answered(kind);
        }
        Err(e) => {
            error!(task_id = %id, error = %e, "cannot store the poll result; the task will be polled again");
            return OutcomeSummary::StoreFailed;
        }
    };
    log_poll(id, &logged, &applied.before, &applied.update, now);
    if let Some(url) = &applied.update.submitted_callback_url
        && router.config().use_task_callback_url
        && !router.submitted_url_allowed(url)
    {
        warn!(task_id = %id, url = %clip(&crate::api::redact_url(url), 200),
              "the task was submitted with a callBackUrl whose host is not in [forward] allow-hosts; not forwarding there");
    }
    for (ev, seq) in applied.update.events.iter().zip(&applied.seqs) {
        log_event(id, ev, *seq);
    }
    if let Some(max) = applied.seqs.iter().max() {
        events.send_modify(|latest| *latest = (*latest).max(*max));
    }
    OutcomeSummary::Answered(kind)
}

fn log_poll(id: &str, outcome: &Outcome, before: &TaskRow, update: &TaskUpdate, now: i64) {
    let retry_in = || {
        format_duration(Duration::from_millis(
            (update.next_poll_at - now).max(0).unsigned_abs(),
        ))
    };
    match outcome {
        Outcome::Pending(record) | Outcome::Progress(record) => {
            let status = record.status.as_str();
            let changed = before.last_status.as_deref() != Some(status);
            if matches!(record.status, crate::api::TaskStatus::Other(_)) && changed {
                warn!(task_id = %id, status = %clip(status, 64), "the API reports a status sunopoll does not know; treating it as still running");
            } else if changed && went_backwards(&record.status, before.stage) {
                // Invariant 4 keeps the task where it is; the operator should still hear that
                // the API contradicted itself (once per change, not on every poll).
                warn!(task_id = %id, status, stage = before.stage.map_or("none", Stage::as_str),
                      "the API reports a status behind the stage already emitted (status went backwards); ignoring it");
            } else {
                debug!(task_id = %id, status, "polled");
            }
        }
        Outcome::Rejected { code, message } => {
            if update.state == TaskState::Active {
                warn!(task_id = %id, code, message = %clip(message, 200), attempt = update.rejections,
                      of = REJECTION_LIMIT, retry_in = %retry_in(), "the API rejected this task ID");
            } else {
                error!(task_id = %id, code, message = %clip(message, 200),
                       "the API rejected this task ID {REJECTION_LIMIT} times in a row; giving it up");
            }
        }
        Outcome::Broken { cause } => {
            warn!(task_id = %id, cause = %cause, attempt = update.failures, retry_in = %retry_in(),
                  "the API's answer for this task could not be understood; backing off this task");
        }
        _ => {}
    }
    if update.timed_out {
        warn!(task_id = %id, last_status = before.last_status.as_deref().unwrap_or("none"),
              "Timed out: the task did not finish before its task-deadline; giving it up with an error event (code 408)");
    }
}

/// True when a success status (or PENDING) says the task is behind `reached`, the last stage
/// already emitted. Failure and unknown statuses never count as going backwards.
fn went_backwards(status: &crate::api::TaskStatus, reached: Option<Stage>) -> bool {
    use crate::api::TaskStatus;
    let says = match status {
        TaskStatus::Pending => 0,
        TaskStatus::TextSuccess => 1,
        TaskStatus::FirstSuccess => 2,
        TaskStatus::Success => 3,
        _ => return false,
    };
    let was = match reached {
        None => 0,
        Some(Stage::Text) => 1,
        Some(Stage::First) => 2,
        Some(Stage::Complete | Stage::Error) => 3,
    };
    says < was
}

/// Every event is one info line: it is the task's news, not a problem of sunopoll's (a task
/// that failed upstream is reported as its `error` event, with the API's message).
fn log_event(id: &str, ev: &NewEvent, seq: i64) {
    if ev.stage == Stage::Error {
        let msg = serde_json::from_str::<serde_json::Value>(&ev.body)
            .ok()
            .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(|m| clip(m, 200)))
            .unwrap_or_default();
        info!(task_id = %id, stage = %ev.stage, code = ev.code, tracks = 0, seq, msg = %msg, "event");
    } else {
        info!(task_id = %id, stage = %ev.stage, code = ev.code, tracks = ev.tracks, seq,
              filled = ev.filled, "event");
    }
}

fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// The monotonic instant matching wall-clock `at_ms`, given that it is `now_ms` now.
fn instant_at(at_ms: i64, now_ms: i64) -> Instant {
    let ahead = Duration::from_millis(u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0));
    Instant::now() + ahead
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Record, TaskStatus};

    fn policy() -> PollConfig {
        PollConfig {
            interval: Duration::from_secs(30),
            max_in_flight: 4,
            max_requests_per_second: Some(2.0),
            backoff_max: Duration::from_secs(600),
            task_deadline: Duration::from_secs(7200),
            fill_skipped_stages: true,
        }
    }

    fn task(stage: Option<Stage>) -> TaskRow {
        TaskRow {
            id: "t1".into(),
            state: TaskState::Active,
            stage,
            last_status: None,
            failures: 0,
            rejections: 0,
            added_at: 0,
            deadline_at: 7_200_000,
            callback_url: None,
            submitted_callback_url: None,
        }
    }

    fn record(status: TaskStatus) -> Record {
        Record {
            status,
            tracks: Vec::new(),
            error_code: None,
            error_message: None,
            param: None,
        }
    }

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

    #[test]
    fn retry_after_lengthens_a_pause_but_never_shortens_it() {
        let p = policy();
        assert_eq!(
            pause_delay(1, &p, Some(Duration::from_secs(90)), 0.5),
            Duration::from_secs(90)
        );
        assert_eq!(
            pause_delay(1, &p, Some(Duration::from_secs(1)), 0.5),
            Duration::from_secs(30)
        );
        assert_eq!(
            pause_delay(9, &p, Some(Duration::from_secs(3600)), 0.5),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn progress_resets_counters_and_schedules_the_next_poll() {
        let mut t = task(None);
        t.failures = 2;
        t.rejections = 1;
        let u = decide(
            &t,
            &Outcome::Pending(record(TaskStatus::Pending)),
            1000,
            &policy(),
            0.5,
        );
        assert_eq!((u.failures, u.rejections), (0, 0));
        assert_eq!(u.next_poll_at, 31_000);
        assert_eq!(u.state, TaskState::Active);
        assert_eq!(u.last_status.as_deref(), Some("PENDING"));
        assert!(u.events.is_empty());
    }

    #[test]
    fn the_next_poll_is_never_after_the_deadline() {
        let u = decide(
            &task(None),
            &Outcome::Pending(record(TaskStatus::Pending)),
            7_190_000,
            &policy(),
            0.5,
        );
        assert_eq!(u.next_poll_at, 7_200_000);
    }

    #[test]
    fn past_the_deadline_a_running_task_ends_with_408() {
        let u = decide(
            &task(Some(Stage::Text)),
            &Outcome::Pending(record(TaskStatus::TextSuccess)),
            7_200_000,
            &policy(),
            0.5,
        );
        assert_eq!(u.state, TaskState::Failed);
        assert_eq!(u.events.len(), 1);
        assert_eq!(u.events[0].stage, Stage::Error);
        assert_eq!(u.events[0].code, 408);
        assert!(
            u.events[0].body.contains("within 2h"),
            "{}",
            u.events[0].body
        );
    }

    #[test]
    fn a_final_answer_past_the_deadline_wins_over_the_timeout() {
        let u = decide(
            &task(None),
            &Outcome::Progress(record(TaskStatus::Success)),
            9_000_000,
            &policy(),
            0.5,
        );
        assert_eq!(u.state, TaskState::Done);
        assert_eq!(
            u.events.iter().map(|e| e.stage).collect::<Vec<_>>(),
            [Stage::Text, Stage::First, Stage::Complete]
        );
    }

    #[test]
    fn three_rejections_in_a_row_end_the_task_with_their_code() {
        let p = policy();
        let rejected = Outcome::Rejected {
            code: 404,
            message: "not found".into(),
        };
        let mut t = task(None);
        for n in 1..REJECTION_LIMIT {
            let u = decide(&t, &rejected, 1000, &p, 0.5);
            assert_eq!(u.state, TaskState::Active, "after {n}");
            assert_eq!(u.rejections, n);
            assert!(u.next_poll_at > 1000);
            t.rejections = u.rejections;
        }
        let u = decide(&t, &rejected, 1000, &p, 0.5);
        assert_eq!(u.state, TaskState::Failed);
        assert_eq!(u.events[0].code, 404);
        assert!(u.events[0].body.contains("not found"));
    }

    #[test]
    fn broken_answers_back_off_the_task_only() {
        let mut t = task(None);
        t.failures = 2;
        let u = decide(
            &t,
            &Outcome::Broken {
                cause: "bad".into(),
            },
            1000,
            &policy(),
            0.5,
        );
        assert_eq!(u.failures, 3);
        assert_eq!(u.next_poll_at, 1000 + 120_000);
        assert_eq!(u.state, TaskState::Active);
        assert_eq!(u.last_error.as_deref(), Some("bad"));
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

    #[test]
    fn the_status_line_says_how_many_tasks_and_whether_polling_is_paused() {
        assert_eq!(status_line(None, &Gate::Open, 0), "starting, polling");
        assert_eq!(
            status_line(Some(1), &Gate::Open, 0),
            "1 task active, polling"
        );
        assert_eq!(
            status_line(Some(12), &Gate::Open, 0),
            "12 tasks active, polling"
        );
        let paused = |kind| Gate::Paused {
            kind,
            attempt: 2,
            until: 1_800_000_060_000,
            since: 1_800_000_000_000,
            cause: "HTTP 430".into(),
        };
        assert_eq!(
            status_line(Some(3), &paused(PauseKind::Throttled), 1_800_000_000_000),
            "3 tasks active; paused: the API is throttling, next try at 2027-01-15T08:01:00Z"
        );
        assert_eq!(
            status_line(Some(3), &paused(PauseKind::Unauthorized), 1_800_000_000_000),
            "3 tasks active; paused: the API key was rejected, next try at 2027-01-15T08:01:00Z"
        );
        assert_eq!(
            status_line(Some(0), &paused(PauseKind::Unavailable), 1_800_000_060_000),
            "0 tasks active; probing the API after a pause (the API is unavailable)"
        );
    }

    #[test]
    fn only_success_statuses_behind_the_stored_stage_go_backwards() {
        assert!(went_backwards(&TaskStatus::Pending, Some(Stage::Text)));
        assert!(went_backwards(&TaskStatus::TextSuccess, Some(Stage::First)));
        assert!(!went_backwards(&TaskStatus::TextSuccess, Some(Stage::Text)));
        assert!(!went_backwards(&TaskStatus::Pending, None));
        assert!(!went_backwards(&TaskStatus::Success, Some(Stage::First)));
        assert!(!went_backwards(
            &TaskStatus::GenerateAudioFailed,
            Some(Stage::First)
        ));
        assert!(!went_backwards(
            &TaskStatus::Other("NEW".into()),
            Some(Stage::First)
        ));
    }

    #[test]
    fn a_task_the_api_keeps_failing_alone_becomes_its_own_problem() {
        let mut t = task(None);
        for n in 1..=POISON_LIMIT {
            assert_eq!(
                global_for_task(&t, PauseKind::Unavailable, false),
                GlobalForTask::Defer { failures: n }
            );
            t.failures = n;
        }
        assert_eq!(
            global_for_task(&t, PauseKind::Throttled, false),
            GlobalForTask::TaskOnly
        );
        // A failing probe says nothing about the task; a rejected key is never one task's.
        assert_eq!(
            global_for_task(&t, PauseKind::Unavailable, true),
            GlobalForTask::Defer {
                failures: POISON_LIMIT
            }
        );
        assert_eq!(
            global_for_task(&t, PauseKind::Unauthorized, false),
            GlobalForTask::Defer {
                failures: POISON_LIMIT
            }
        );
    }

    #[test]
    fn gate_rows_round_trip() {
        let g = Gate::Paused {
            kind: PauseKind::Unauthorized,
            attempt: 2,
            until: 10,
            since: 5,
            cause: "HTTP 401".into(),
        };
        let restored = Gate::from_row(g.to_row());
        assert!(
            matches!(
                restored,
                Gate::Paused {
                    until: 0,
                    attempt: 2,
                    ..
                }
            ),
            "a saved key rejection probes at once: {restored:?}"
        );
        let t = Gate::Paused {
            kind: PauseKind::Throttled,
            attempt: 2,
            until: 10,
            since: 5,
            cause: "HTTP 430".into(),
        };
        assert_eq!(Gate::from_row(t.to_row()), t);
        assert_eq!(Gate::from_row(None), Gate::Open);
    }
}
