//! The poll job: which task to poll next, when, and what its answer changes.
//!
//! Polls run on the durable job loop ([`crate::jobs::run`]). This kind supplies the query (the
//! earliest tasks by `next_poll_at`), the limits (one request per task, `max-in-flight`
//! overall, `max-requests-per-second` overall through the [`RateLimiter`], and the [`Gate`]),
//! and the pure [`decide`] that turns one answer into the task's new state. Each poll asks the
//! API through the task's [`Family`], then commits the task's new state and events in one
//! transaction.
//!
//! Answers that concern the API rather than the task (throttled, unavailable, key rejected) never
//! touch the task: they close the [`Gate`], one global pause with exponential backoff and jitter
//! that is persisted so a restart does not hammer the API. When a pause ends, a single probe
//! request goes first; normal polling resumes only once the API answers it properly. This loop
//! also keeps systemd's `STATUS=` line current and pings its watchdog: a wedged loop stops the
//! pings.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::{Admit, JobKind, StoreBackoffPolicy, Stored, WakeAt, backoff_delay, instant_at};
use crate::api::families::Flavor;
use crate::api::{ApiClient, Family, Outcome, clip};
use crate::clock::{Clock, format_duration, format_utc, ms};
use crate::config::{KeySource, PollConfig};
use crate::events::{NewEvent, Stage};
use crate::forward::Router;
use crate::metrics::Metrics;
use crate::store::TaskState;
use crate::store::{Asked, Claim, DueRow, Schedule, Store, StoreError, TaskRow, TaskUpdate};
use crate::systemd::Notifier;

pub use super::gate::{Gate, PauseKind, PollStatus, SharedStatus, pause_delay, status_line};
use super::rate::{RateLearner, SharedLimiter};

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

/// The callback code of the `error` event sent when the answers about a task could not be read
/// until its deadline: 500, the one failure code in every family's list (`families.md` §1.5).
pub const UNREADABLE_CODE: i64 = 500;

/// The shortest gap between two `STATUS=` lines sent to systemd. A busy queue changes its
/// counts many times a second; `systemctl status` is read by people, so every few seconds is
/// current enough, and it bounds the task counting the line needs.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The time `asked` says the task has been asked about once the API answers about it at `now`:
/// the time since its previous answer, but never more than the wait planned after that answer.
/// So waiting in the backlog, a global pause, an outage or a wall-clock step (either way) add
/// at most one planned wait, and the first answer adds nothing. Pure.
pub fn asked_until(asked: Asked, now: i64) -> i64 {
    match asked.at {
        None => asked.total_ms,
        Some(at) => asked
            .total_ms
            .saturating_add(now.saturating_sub(at).clamp(0, asked.gap_ms.max(0))),
    }
}

/// How long `task` may be asked about before it is given up: its `task-deadline` when added.
pub fn deadline_budget(task: &TaskRow) -> i64 {
    task.deadline_at.saturating_sub(task.added_at).max(0)
}

/// What one poll's answer does to its task. Pure: the task's family, the stored task, the
/// answer, the time, the policy and a jitter value in `[0, 1)` decide everything.
///
/// The deadline counts only the time the task was asked about ([`asked_until`]), and fires
/// only on an answer, obtained now, that does not say the task finished: sunopoll never sends
/// a 408 for a task the API would report done, nor for one it could not ask about.
///
/// Global outcomes (throttled, unavailable, unauthorized) are the gate's business and must not
/// be passed here; they leave the task untouched.
pub fn decide<F: Family>(
    family: &F,
    task: &TaskRow,
    outcome: &Outcome<F::Record>,
    now: i64,
    policy: &PollConfig,
    jitter: f64,
) -> TaskUpdate {
    let budget = deadline_budget(task);
    let asked_ms = asked_until(task.asked, now);
    // The regular next poll comes no later than the moment the budget runs out, so the answer
    // that decides the deadline is asked for on time.
    let next_regular =
        now.saturating_add(ms(policy.interval).min(budget.saturating_sub(asked_ms).max(0)));
    let past_deadline = asked_ms >= budget;
    let deadline_event = || {
        let after = format_duration(Duration::from_millis(u64::try_from(budget).unwrap_or(0)));
        family.error_event(
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
        asked: task.asked,
        archive: Vec::new(),
    };
    match outcome {
        Outcome::Progress(record) | Outcome::Pending(record) => {
            update.last_status = Some(family.status(record).to_owned());
            update.failures = 0;
            update.rejections = 0;
            update.events = family.events(&task.id, task.stage, record, policy.fill_skipped_stages);
        }
        Outcome::Rejected { code, message } => {
            update.rejections = task.rejections.saturating_add(1);
            update.last_error = Some(format!(
                "rejected by the API: code {code}: {}",
                clip(message, 200)
            ));
            if update.rejections >= REJECTION_LIMIT {
                update.events = vec![family.error_event(&task.id, *code, message)];
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
        if let Outcome::Broken { cause } = outcome {
            // The API answered, but not legibly (or, for a task it alone keeps failing, not
            // usably): the task may well have finished, so a 408 "timed out" would be false.
            // Say what happened.
            update.events.push(family.error_event(
                &task.id,
                UNREADABLE_CODE,
                &format!(
                    "Unreadable: the task-deadline ({}) passed and the API's answers about \
                     this task could not be read or used: {}",
                    format_duration(Duration::from_millis(u64::try_from(budget).unwrap_or(0))),
                    clip(cause, 200)
                ),
            ));
        } else {
            update.events.push(deadline_event());
            update.timed_out = true;
        }
    }
    update.state = match update.events.last().map(|e| e.stage) {
        Some(Stage::Complete) => TaskState::Done,
        Some(Stage::Error) => TaskState::Failed,
        _ => TaskState::Active,
    };
    update.asked = Asked {
        total_ms: asked_ms,
        at: Some(now),
        gap_ms: update.next_poll_at.saturating_sub(now).max(0),
    };
    update
}

/// What a finished poll tells the loop.
struct Finished {
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

/// Everything the poll job of one account needs: the entry point the daemon starts, once per
/// account. Each account's loop polls only its own tasks, with its own key, limits and pause,
/// so a throttled or rejected key holds back only its own tasks.
pub struct Scheduler {
    /// The queue.
    pub store: Store,
    /// The account's API.
    pub api: ApiClient,
    /// The account's name (tasks, pause, learnt rate, metrics and logs are keyed by it).
    pub account: String,
    /// Its provider flavour: which spelling the family adapters give callback bodies.
    pub flavor: Flavor,
    /// `[poll]` settings, with the account's own `max-in-flight` and
    /// `max-requests-per-second`.
    pub policy: PollConfig,
    /// Poked by `add`.
    pub wake: Arc<Notify>,
    /// The newest event sequence number, for followers and forwarders.
    pub events: watch::Sender<i64>,
    /// Published status.
    pub status: SharedStatus,
    /// Where new events are delivered.
    pub router: Router,
    /// Where `STATUS=` lines and watchdog pings go (systemd's notify socket, or nowhere: only
    /// the first account's loop reports, so systemd gets one line and one watchdog).
    pub notifier: Notifier,
    /// How often to ping the watchdog, if systemd runs one. The pings come from the loop
    /// itself, so a wedged loop stops them and systemd restarts the service.
    pub watchdog: Option<Duration>,
    /// Where polls, requests and events are counted.
    pub metrics: Arc<Metrics>,
    /// The wall clock stored times are read from.
    pub clock: Clock,
    /// `max-requests-per-second` as reloaded (`None`: unlimited); read at every round.
    pub rate: watch::Receiver<Option<f64>>,
    /// Where the API key comes from: read again before every probe after the key was
    /// rejected, so a fixed key is used without a restart. `None`: keep the key given.
    pub key_source: Option<KeySource>,
    /// True when `[archive]` is on: a `complete` event's files are stored with it.
    pub archive: bool,
    /// The account's request budget: this loop sets its rate and counts its polls in it; the
    /// API stand-in counts submissions in the same one.
    pub limiter: SharedLimiter,
}

impl Scheduler {
    /// Loads the persisted pause (if any) and publishes the initial status. Call before
    /// [`Scheduler::run`] so `status` is right from the first request.
    pub async fn load_gate(&self) -> Loaded {
        let (gate, learnt_rate) = match self.store.load_account(self.account.clone()).await {
            Ok(row) => (Gate::from_row(row.gate), row.learnt_rate),
            Err(e) => {
                error!(account = %self.account, error = %e, "cannot read the saved pause state; starting unpaused");
                (Gate::Open, None)
            }
        };
        if let Gate::Paused {
            kind, until, cause, ..
        } = &gate
        {
            let wait = (*until - self.clock.now_ms()).max(0);
            warn!(
                account = %self.account,
                pause = kind.as_str(),
                cause = %cause,
                resume_in = %format_duration(Duration::from_millis(wait.unsigned_abs())),
                "polling was paused before the restart; honouring the pause, then probing with one request"
            );
        }
        if let (Some(rate), Some(ceiling)) = (learnt_rate, self.policy.max_requests_per_second)
            && rate < ceiling
        {
            info!(
                account = %self.account,
                learnt_rate = rate,
                ceiling,
                "resuming at the request rate learnt from the API's throttling"
            );
        }
        if let Ok(mut s) = self.status.lock() {
            s.account = self.account.clone();
            s.flavor = self.flavor.as_str().to_owned();
            s.rate_limit = self.policy.max_requests_per_second;
            s.learnt_rate =
                learnt_rate.filter(|r| self.policy.max_requests_per_second.is_some_and(|c| *r < c));
        }
        publish(&self.status, &gate, 0, self.clock.now_ms());
        Loaded { gate, learnt_rate }
    }

    /// Runs from `gate` until `cancel` fires, then stops starting polls. Polls already started
    /// keep running in `tracker` and commit their results, and a pause their answers call for is
    /// still saved; the caller bounds the wait.
    pub async fn run(self, loaded: Loaded, cancel: CancellationToken, tracker: TaskTracker) {
        let learner = self
            .policy
            .max_requests_per_second
            .map(|ceiling| RateLearner::new(ceiling, loaded.learnt_rate, Instant::now()));
        // On a queue several daemons share, the first round waits until they have counted this
        // one in ([`Sharing`]); until then it polls nothing.
        let share = self.store.daemon_name().map(|_| Sharing {
            daemons: 1,
            next_check: Instant::now(),
            hold_until: None,
        });
        let limiter = self.limiter.clone();
        limiter.set_rate(learner.as_ref().map(RateLearner::rate));
        let job = PollJob {
            share,
            s: self,
            gate: loaded.gate,
            epoch: 0,
            probe_in_flight: false,
            probing: false,
            limiter,
            learner,
            next_ping: Instant::now(),
            report: StatusReport::new(),
        };
        super::run(job, cancel, tracker).await;
    }
}

/// What the store kept for an account: its pause and learnt rate ([`Scheduler::load_gate`]).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The pause.
    pub gate: Gate,
    /// The learnt rate, if any.
    pub learnt_rate: Option<f64>,
}

/// How often a daemon on a shared queue counts the daemons polling it and reads the account's
/// shared pause. A daemon that joins waits this long (and a little) before its first poll, so
/// the others have lowered their share of the rate first.
pub const SHARE_CHECK: Duration = Duration::from_secs(2);

/// One account's budget on a queue several daemons share (PostgreSQL): the request rate and the
/// in-flight cap are split evenly among the live daemons, so together they never exceed the
/// configured ones; a pause one daemon saves is honoured by all.
struct Sharing {
    /// Live daemons on the queue, this one included, at the last count.
    daemons: usize,
    /// When to count again.
    next_check: Instant,
    /// No poll before this: the other daemons have not yet counted this one.
    hold_until: Option<Instant>,
}

/// The poll job on the loop: the scheduler's settings and the limits' state.
struct PollJob {
    s: Scheduler,
    /// Set on a shared queue.
    share: Option<Sharing>,
    gate: Gate,
    /// Bumped whenever the gate moves: a failure from a request sent in an older epoch does not
    /// escalate the pause (otherwise four parallel 430s would count as four failures).
    epoch: u64,
    probe_in_flight: bool,
    /// This round's polls are the probe after a pause.
    probing: bool,
    limiter: SharedLimiter,
    /// The rate learnt from throttling, under the ceiling (none when unlimited).
    learner: Option<RateLearner>,
    next_ping: Instant,
    report: StatusReport,
}

impl JobKind for PollJob {
    type Row = DueRow;
    type Key = String;
    type Done = Finished;

    const QUEUE: &'static str = "the queue";
    const STOPPED: &'static str = "scheduler stopped starting polls";

    fn key(row: &DueRow) -> String {
        row.id.clone()
    }

    fn due_at(row: &DueRow) -> i64 {
        row.next_poll_at
    }

    fn max_in_flight(&self) -> usize {
        // Split among the daemons sharing the queue (at least one each).
        let daemons = self.share.as_ref().map_or(1, |s| s.daemons);
        (self.s.policy.max_in_flight / daemons).max(1)
    }

    fn store_backoff(&self) -> StoreBackoffPolicy {
        StoreBackoffPolicy {
            min: self.s.policy.interval,
            max: self.s.policy.backoff_max,
            paused: "poll results cannot be stored; pausing all polling until the store works again",
            resumed: "poll results are stored again; polling resumes",
        }
    }

    async fn prepare(&mut self, in_flight: usize, wake: &mut WakeAt) -> usize {
        if self.s.rate.has_changed().unwrap_or(false) {
            let rate = *self.s.rate.borrow_and_update();
            self.learner = match (self.learner.take(), rate) {
                (Some(mut l), Some(ceiling)) => {
                    l.set_ceiling(ceiling);
                    Some(l)
                }
                (None, Some(ceiling)) => Some(RateLearner::new(ceiling, None, Instant::now())),
                (_, None) => None,
            };
            let split = self.learner.as_ref().map(|l| self.split(l.rate()));
            self.limiter.set_rate(split);
            self.s.policy.max_requests_per_second = rate;
            self.publish_rate();
        }
        if let Some(hold) = self.sync_shared(in_flight, wake).await {
            return hold;
        }
        let now = self.s.clock.now_ms();
        publish(&self.s.status, &self.gate, in_flight, now);

        // The watchdog is pinged here, in the loop that does the work, never from a timer
        // of its own: if this loop hangs (a stuck store, a deadlock), the pings stop and
        // systemd restarts the service. An idle loop wakes only for this, once a period.
        if let Some(period) = self.s.watchdog {
            let t = Instant::now();
            if t >= self.next_ping {
                self.s.notifier.watchdog();
                self.next_ping = t + period;
            }
            wake.at(self.next_ping);
        }
        if self.s.notifier.is_enabled()
            && let Some(at) = self.report_status(now).await
        {
            wake.at(at);
        }
        let (slots, probing) = match &self.gate {
            Gate::Open => (self.max_in_flight().saturating_sub(in_flight), false),
            Gate::Paused { until, .. } if now < *until => {
                wake.at(instant_at(*until, now));
                (0, false)
            }
            Gate::Paused { .. } => (usize::from(!self.probe_in_flight && in_flight == 0), true),
        };
        // On a shared queue one daemon probes for all; the others take up its outcome (the
        // pause it saves, or its end) at their next look at the shared pause.
        if probing && slots > 0 && self.share.is_some() {
            match self.s.store.claim_probe(self.s.account.clone()).await {
                Ok(true) => {}
                Ok(false) => {
                    wake.at(Instant::now() + SHARE_CHECK);
                    self.probing = false;
                    return 0;
                }
                Err(e) => {
                    debug!(error = %e, "cannot claim the probe; trying again shortly");
                    wake.at(Instant::now() + SHARE_CHECK);
                    self.probing = false;
                    return 0;
                }
            }
        }
        self.probing = probing;
        slots
    }

    async fn claim(
        &self,
        slots: usize,
        in_flight: &HashSet<String>,
    ) -> Result<Claim<DueRow>, StoreError> {
        self.s
            .store
            .due_window(self.s.account.clone(), slots + in_flight.len() + 1)
            .await
    }

    fn admit(&mut self, row: &DueRow) -> Admit {
        let t = Instant::now();
        match self.limiter.admit(t) {
            Err(ready) => return Admit::Wait(ready),
            Ok(true) => {
                if let Some(learner) = self.learner.as_mut() {
                    learner.sent(t);
                }
            }
            Ok(false) => {}
        }
        if self.probing {
            self.probe_in_flight = true;
            info!(account = %self.s.account, task_id = %row.id, "pause over; probing the API with one request");
            if let (
                Gate::Paused {
                    kind: PauseKind::Unauthorized,
                    ..
                },
                Some(source),
            ) = (&self.gate, &self.s.key_source)
            {
                // The operator may have fixed the key since: each probe asks with the key as
                // its source holds it now.
                match source.read() {
                    Ok(key) => {
                        if self.s.api.set_key(key) {
                            info!("the API key changed at its source; probing with the new key");
                        }
                    }
                    Err(e) => {
                        warn!(problem = %e, "cannot read the API key again; probing with the old one")
                    }
                }
            }
        }
        Admit::Go
    }

    fn start(&mut self, row: DueRow) -> impl Future<Output = Finished> + Send + 'static {
        let api = self.s.api.clone();
        let commit = Commit {
            store: self.s.store.clone(),
            policy: self.s.policy.clone(),
            router: self.s.router.clone(),
            events: self.s.events.clone(),
            metrics: Arc::clone(&self.s.metrics),
            clock: self.s.clock.clone(),
            archive: self.s.archive,
            account: self.s.account.clone(),
        };
        self.s.metrics.api_request(&self.s.account);
        let flavor = self.s.flavor;
        let (probe, epoch) = (self.probing, self.epoch);
        if let Ok(mut s) = self.s.status.lock() {
            s.requests += 1;
        }
        async move {
            // The task's own family, in its account's flavour: one generic path per family.
            let summary = crate::with_family!(row.kind, flavor, |family| {
                let outcome = api.details(&family, &row.id).await;
                apply_outcome(&commit, &family, &row.id, outcome, probe).await
            });
            Finished {
                probe,
                epoch,
                outcome: summary,
            }
        }
    }

    async fn finish(&mut self, id: String, f: Finished) -> Stored {
        self.report.counts_changed = true;
        if f.probe {
            self.probe_in_flight = false;
        }
        let now = self.s.clock.now_ms();
        match f.outcome {
            OutcomeSummary::Global {
                kind,
                retry_after,
                cause,
            } => {
                self.record_answer(kind.as_str(), now);
                let counts = f.probe || (self.gate == Gate::Open && f.epoch == self.epoch);
                if !counts {
                    debug!(task_id = %id, cause = %cause, "another failure from a request sent before the pause");
                    return Stored::Untouched;
                }
                if kind == PauseKind::Throttled {
                    self.learn(|l, t| Some(l.throttled(t))).await;
                }
                let (attempt, since) = match &self.gate {
                    Gate::Paused { attempt, since, .. } => (*attempt + 1, *since),
                    Gate::Open => (1, now),
                };
                let delay = match kind {
                    PauseKind::Unauthorized => self.s.policy.backoff_max,
                    // With a learnt rate the pause need only let the API's window pass: the
                    // rate that follows it is already lowered. (Retry-After still wins, and
                    // throttles in a row still double it.)
                    PauseKind::Throttled if self.learner.is_some() => {
                        let mut p = self.s.policy.clone();
                        p.interval = p.interval.min(super::rate::LEARN_WINDOW);
                        pause_delay(attempt, &p, retry_after, fastrand::f64())
                    }
                    _ => pause_delay(attempt, &self.s.policy, retry_after, fastrand::f64()),
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
                self.gate = Gate::Paused {
                    kind,
                    attempt,
                    until: now.saturating_add(ms(delay)),
                    since,
                    cause,
                };
                self.epoch += 1;
                if let Err(e) = self
                    .s
                    .store
                    .save_gate(self.s.account.clone(), self.gate.to_row())
                    .await
                {
                    error!(error = %e, "cannot save the pause state; a restart would not honour it");
                }
                Stored::Untouched
            }
            OutcomeSummary::Answered(kind) => {
                self.record_answer(kind, now);
                self.learn(RateLearner::answered).await;
                if f.probe
                    && let Gate::Paused { since, attempt, .. } = &self.gate
                {
                    info!(
                        paused_for = %format_duration(Duration::from_millis((now - *since).max(0).unsigned_abs())),
                        pauses = *attempt,
                        "the API answers again; polling resumes"
                    );
                    self.gate = Gate::Open;
                    self.epoch += 1;
                    if let Err(e) = self.s.store.save_gate(self.s.account.clone(), None).await {
                        error!(error = %e, "cannot clear the saved pause state");
                    }
                }
                Stored::Written
            }
            OutcomeSummary::StoreFailed => Stored::Failed,
        }
    }

    async fn woken(&mut self) {
        self.s.wake.notified().await;
        self.report.counts_changed = true;
    }

    fn clock(&self) -> &Clock {
        &self.s.clock
    }

    /// Every poll is scheduled within one interval or the backoff cap of its answer.
    fn max_ahead(&self) -> Option<Duration> {
        Some(self.s.policy.interval.max(self.s.policy.backoff_max))
    }

    async fn clock_stepped(&mut self, by_ms: i64) {
        // The pause is the loop's own: it keeps its length whichever way the clock went.
        if let Gate::Paused { until, since, .. } = &mut self.gate {
            *until = until.saturating_add(by_ms);
            *since = since.saturating_add(by_ms);
            if let Err(e) = self
                .s
                .store
                .save_gate(self.s.account.clone(), self.gate.to_row())
                .await
            {
                error!(error = %e, "cannot save the pause state after the clock step");
            }
        }
        // Back: every task looks due later by the step, and would stall that long; moving them
        // back too restores the schedule, and a poll committed after the step that gets moved
        // as well only comes early. Ahead: every task looks overdue; it is polled in its old
        // order under the rate limit, so there is nothing to move (moving a poll committed
        // after the step would stall it by the step).
        if by_ms < 0 {
            match self
                .s
                .store
                .shift_due(Schedule::Polls(self.s.account.clone()), by_ms)
                .await
            {
                Ok(n) => info!(tasks = n, "moved the tasks' next polls back with the clock"),
                Err(e) => {
                    error!(error = %e, "cannot move the next polls back with the clock; tasks due far ahead are polled now instead")
                }
            }
        }
    }
}

impl PollJob {
    /// This daemon's part of an account-wide `rate`.
    fn split(&self, rate: f64) -> f64 {
        rate / self.share.as_ref().map_or(1, |s| s.daemons) as f64
    }

    /// On a shared queue, every [`SHARE_CHECK`]: counts the live daemons and splits the rate
    /// anew, and takes up a pause another daemon saved for this account (or its end, once that
    /// daemon's probe was answered). Returns `Some(0)` while this daemon must not poll yet.
    ///
    /// The loop wakes for the check only while polls are in flight (or it is still waiting to
    /// be counted in). An idle loop checks when it next wakes for work, before it claims any:
    /// the rate and the pause only matter to polls it sends, so sleeping through the checks
    /// changes nothing it does, and an idle daemon does not wake every two seconds.
    async fn sync_shared(&mut self, in_flight: usize, wake: &mut WakeAt) -> Option<usize> {
        let t = Instant::now();
        let share = self.share.as_mut()?;
        if t >= share.next_check {
            share.next_check = t + SHARE_CHECK;
            let first = share.hold_until.is_none();
            match self.s.store.daemons().await {
                Some(Ok(live)) => {
                    let n = live.len().max(1);
                    if first && n > 1 {
                        // The others count this daemon in within one check: only then is
                        // its share of the rate free.
                        share.hold_until = Some(t + SHARE_CHECK + SHARE_CHECK / 2);
                    } else if first {
                        share.hold_until = Some(t);
                    }
                    if n != share.daemons {
                        share.daemons = n;
                        let rate = self.learner.as_ref().map(RateLearner::rate);
                        info!(
                            account = %self.s.account,
                            daemons = n,
                            rate = rate.map_or_else(|| "unlimited".to_owned(), |r| format!("{:.3}", r / n as f64)),
                            "daemons sharing the queue changed; this one takes its share of the account's request rate"
                        );
                        if let Some(rate) = rate {
                            self.limiter.set_rate(Some(rate / n as f64));
                        }
                    }
                }
                Some(Err(e)) => {
                    debug!(error = %e, "cannot count the daemons sharing the queue; keeping the last count")
                }
                None => {}
            }
            self.adopt_shared_pause().await;
        }
        let share = self.share.as_ref()?;
        match share.hold_until {
            Some(hold) if t < hold => {
                wake.at(hold);
                wake.at(share.next_check);
                Some(0)
            }
            None => {
                wake.at(share.next_check);
                Some(0)
            }
            Some(_) => {
                if in_flight > 0 {
                    wake.at(share.next_check);
                }
                None
            }
        }
    }

    /// Reads the account's pause as the daemons sharing it saved it last.
    async fn adopt_shared_pause(&mut self) {
        if self.probe_in_flight {
            return;
        }
        let Ok(row) = self.s.store.load_account(self.s.account.clone()).await else {
            return;
        };
        let stored = Gate::from_row(row.gate);
        match (&self.gate, &stored) {
            (_, Gate::Paused { until: theirs, .. }) if !matches!(&self.gate, Gate::Paused { until: ours, .. } if ours >= theirs) =>
            {
                if let Gate::Paused { kind, cause, .. } = &stored {
                    warn!(
                        account = %self.s.account,
                        pause = kind.as_str(),
                        cause = %cause,
                        "another daemon on this queue paused polling of this account; pausing too"
                    );
                }
                self.gate = stored;
                self.epoch += 1;
            }
            (Gate::Paused { .. }, Gate::Open) => {
                info!(account = %self.s.account, "another daemon's probe was answered; polling resumes");
                self.gate = Gate::Open;
                self.epoch += 1;
            }
            _ => {}
        }
    }

    /// Lets the rate learner see an answer; a changed rate is used from now on, shown in
    /// `status` and persisted, so a restart does not relearn it by being throttled again.
    async fn learn(&mut self, step: impl FnOnce(&mut RateLearner, Instant) -> Option<f64>) {
        let Some(learner) = self.learner.as_mut() else {
            return;
        };
        let before = learner.rate();
        let Some(rate) = step(learner, Instant::now()) else {
            return;
        };
        if rate == before {
            return;
        }
        let learnt = learner.is_learnt();
        let split = self.split(rate);
        self.limiter.set_rate(Some(split));
        if rate < before {
            info!(
                account = %self.s.account,
                rate = format!("{rate:.3}"),
                was = format!("{before:.3}"),
                "throttled: lowering this account's request rate, then raising it slowly"
            );
        } else {
            debug!(account = %self.s.account, rate = format!("{rate:.3}"), "raising the request rate one step");
        }
        self.publish_rate();
        let saved = learnt.then_some(rate);
        if let Err(e) = self
            .s
            .store
            .save_learnt_rate(self.s.account.clone(), saved)
            .await
        {
            warn!(account = %self.s.account, error = %e, "cannot save the learnt request rate; a restart would learn it again");
        }
    }

    fn publish_rate(&self) {
        if let Ok(mut s) = self.s.status.lock() {
            s.rate_limit = self.s.policy.max_requests_per_second;
            s.learnt_rate = self
                .learner
                .as_ref()
                .filter(|l| l.is_learnt())
                .map(RateLearner::rate);
        }
    }

    /// Sends systemd a new `STATUS=` line if it changed, at most once per [`STATUS_EVERY`].
    /// Returns when to come back if a change is waiting for that gap to pass.
    async fn report_status(&mut self, now: i64) -> Option<Instant> {
        let report = &mut self.report;
        let gate = &self.gate;
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
            match self.s.store.active_count().await {
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
            self.s.notifier.status(&line);
            report.sent = line;
        }
        retry
    }

    fn record_answer(&self, kind: &str, now: i64) {
        if let Ok(mut s) = self.s.status.lock() {
            s.last_answer = Some(kind.to_owned());
            s.last_answer_at = Some(format_utc(now));
        }
    }
}

/// Shows `gate` and the requests in flight in `status`.
fn publish(status: &SharedStatus, gate: &Gate, in_flight: usize, now: i64) {
    let Ok(mut s) = status.lock() else {
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
            s.paused_until = Some(format_utc(*until));
            s.paused_since = Some(format_utc(*since));
            s.paused_for_ms = (now - *since).max(0);
            s.pause_cause = Some(cause.clone());
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

/// What a poll commits its answer with: its own copy of the scheduler's parts.
#[derive(Clone)]
struct Commit {
    store: Store,
    policy: PollConfig,
    router: Router,
    events: watch::Sender<i64>,
    metrics: Arc<Metrics>,
    clock: Clock,
    archive: bool,
    account: String,
}

/// Applies one answer: global ones go back to the loop; per-task ones are decided and committed
/// with their events, which are then logged and announced.
async fn apply_outcome<F>(
    commit: &Commit,
    family: &F,
    id: &str,
    outcome: Outcome<F::Record>,
    probe: bool,
) -> OutcomeSummary
where
    F: Family + Clone + Send + 'static,
    F::Record: Clone + Send + 'static,
{
    let Commit {
        store,
        policy,
        router,
        events,
        metrics,
        clock,
        archive,
        account,
    } = commit;
    let archive = *archive;
    let kind = outcome.kind();
    metrics.poll(account, kind);
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
    let now = clock.now_ms();
    let jitter = fastrand::f64();
    let decide_policy = policy.clone();
    let routing = router.clone();
    let logged = outcome.clone();
    let global_in = global.clone();
    let fam = family.clone();
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
                            // Not an answer about the task: its deadline does not move.
                            asked: row.asked,
                            archive: Vec::new(),
                        };
                    }
                    GlobalForTask::TaskOnly => Outcome::Broken {
                        cause: format!("{cause} (for this task only: the API answers the others)"),
                    },
                },
            };
            let mut update = decide(&fam, row, &effective, now, &decide_policy, jitter);
            if archive {
                update.archive = crate::archive::files_of_events(fam.name(), &update.events);
            }
            let submitted = match &effective {
                Outcome::Progress(r) | Outcome::Pending(r) => fam.submitted_callback_url(r),
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
                log_event(id, family.name(), ev, *seq);
            }
            count_events(metrics, family.name(), &a.before, &a.update.events, now);
            if let Some(max) = a.seqs.iter().max() {
                events.send_modify(|latest| *latest = (*latest).max(*max));
            }
        }
        return OutcomeSummary::Answered("broken");
    }
    let applied = match applied {
        Ok(Some(a)) => a,
        Ok(None) => {
            debug!(task_id = %id, "task was removed, or (on a shared queue) taken over by another daemon after this one stalled past its lease, while its poll was in flight; answer dropped");
            return OutcomeSummary::Answered(kind);
        }
        Err(e) => {
            error!(task_id = %id, error = %e, "cannot store the poll result; the task will be polled again");
            return OutcomeSummary::StoreFailed;
        }
    };
    log_poll(family, id, &logged, &applied.before, &applied.update, now);
    if let Some(url) = &applied.update.submitted_callback_url
        && router.config().use_task_callback_url
        && !router.submitted_url_allowed(url)
    {
        warn!(task_id = %id, url = %clip(&crate::api::redact_url(url), 200),
              "the task was submitted with a callBackUrl whose host is not in [forward] allow-hosts; not forwarding there");
    }
    for (ev, seq) in applied.update.events.iter().zip(&applied.seqs) {
        log_event(id, family.name(), ev, *seq);
    }
    count_events(
        metrics,
        family.name(),
        &applied.before,
        &applied.update.events,
        now,
    );
    if let Some(max) = applied.seqs.iter().max() {
        events.send_modify(|latest| *latest = (*latest).max(*max));
    }
    OutcomeSummary::Answered(kind)
}

/// Counts stored events, and for a terminal one how long the task took from its add.
fn count_events(metrics: &Metrics, kind: &str, before: &TaskRow, events: &[NewEvent], now: i64) {
    for ev in events {
        metrics.event(kind, ev.stage.as_str());
        if ev.stage.is_terminal() {
            let took = (now - before.added_at).max(0).unsigned_abs();
            metrics.task_ended(kind, Duration::from_millis(took));
        }
    }
}

fn log_poll<F: Family>(
    family: &F,
    id: &str,
    outcome: &Outcome<F::Record>,
    before: &TaskRow,
    update: &TaskUpdate,
    now: i64,
) {
    let retry_in = || {
        format_duration(Duration::from_millis(
            (update.next_poll_at - now).max(0).unsigned_abs(),
        ))
    };
    match outcome {
        Outcome::Pending(record) | Outcome::Progress(record) => {
            let status = family.status(record);
            let changed = before.last_status.as_deref() != Some(status);
            if !family.is_known(record) && changed {
                warn!(task_id = %id, status = %clip(status, 64), "the API reports a status sunopoll does not know; treating it as still running");
            } else if changed && family.went_backwards(record, before.stage) {
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

/// Every event is one info line: it is the task's news, not a problem of sunopoll's (a task
/// that failed upstream is reported as its `error` event, with the API's message).
fn log_event(id: &str, kind: &str, ev: &NewEvent, seq: i64) {
    if ev.stage == Stage::Error {
        let msg = serde_json::from_str::<serde_json::Value>(&ev.body)
            .ok()
            .and_then(|v| v.get("msg").and_then(|m| m.as_str()).map(|m| clip(m, 200)))
            .unwrap_or_default();
        info!(task_id = %id, kind, stage = %ev.stage, code = ev.code, tracks = 0, seq, msg = %msg, "event");
    } else {
        info!(task_id = %id, kind, stage = %ev.stage, code = ev.code, tracks = ev.tracks, seq,
              filled = ev.filled, "event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::families::music::{Music, Record, TaskStatus};

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
            kind: crate::api::families::Kind::Music,
            account: "default".into(),
            state: TaskState::Active,
            stage,
            last_status: None,
            failures: 0,
            rejections: 0,
            added_at: 0,
            deadline_at: 7_200_000,
            callback_url: None,
            submitted_callback_url: None,
            asked: Asked::default(),
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
    fn progress_resets_counters_and_schedules_the_next_poll() {
        let mut t = task(None);
        t.failures = 2;
        t.rejections = 1;
        let u = decide(
            &Music,
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

    /// A task asked about every interval since it was added, last at `at`.
    fn asked_since_added(mut t: TaskRow, at: i64) -> TaskRow {
        t.asked = Asked {
            total_ms: at,
            at: Some(at),
            gap_ms: 30_000,
        };
        t
    }

    fn pending() -> Outcome<Record> {
        Outcome::Pending(record(TaskStatus::Pending))
    }

    #[test]
    fn the_next_poll_is_never_after_the_deadline() {
        let u = decide(
            &Music,
            &asked_since_added(task(None), 7_160_000),
            &pending(),
            7_190_000,
            &policy(),
            0.5,
        );
        assert_eq!(u.next_poll_at, 7_200_000);
        assert_eq!(u.state, TaskState::Active);
    }

    #[test]
    fn past_the_deadline_a_running_task_ends_with_408() {
        let u = decide(
            &Music,
            &asked_since_added(task(Some(Stage::Text)), 7_170_000),
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
            &Music,
            &asked_since_added(task(None), 8_990_000),
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
            let u = decide(&Music, &t, &rejected, 1000, &p, 0.5);
            assert_eq!(u.state, TaskState::Active, "after {n}");
            assert_eq!(u.rejections, n);
            assert!(u.next_poll_at > 1000);
            t.rejections = u.rejections;
        }
        let u = decide(&Music, &t, &rejected, 1000, &p, 0.5);
        assert_eq!(u.state, TaskState::Failed);
        assert_eq!(u.events[0].code, 404);
        assert!(u.events[0].body.contains("not found"));
    }

    #[test]
    fn broken_answers_back_off_the_task_only() {
        let mut t = task(None);
        t.failures = 2;
        let u = decide(
            &Music,
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
    fn the_first_answer_adds_nothing_and_then_each_adds_at_most_the_planned_wait() {
        let p = policy();
        let mut t = task(None);
        let u = decide(&Music, &t, &pending(), 50_000, &p, 0.5);
        assert_eq!(
            u.asked,
            Asked {
                total_ms: 0,
                at: Some(50_000),
                gap_ms: 30_000
            }
        );
        t.asked = u.asked;
        // A poll a little late counts only the planned 30 s; one a little early, what passed.
        let u = decide(&Music, &t, &pending(), 81_000, &p, 0.5);
        assert_eq!(u.asked.total_ms, 30_000);
        t.asked = u.asked;
        let u = decide(&Music, &t, &pending(), 101_000, &p, 0.5);
        assert_eq!(u.asked.total_ms, 50_000);
    }

    #[test]
    fn tasks_waiting_in_the_backlog_never_fail() {
        // 14 400 tasks at 2 requests/s: a task's first poll comes 2 h after its add, long past
        // the wall-clock deadline; its first answer says PENDING.
        let u = decide(&Music, &task(None), &pending(), 7_300_000, &policy(), 0.5);
        assert_eq!(u.state, TaskState::Active);
        assert!(u.events.is_empty());
        // And a task polled only every 10 minutes (the backlog's pace) counts 30 s per answer.
        let mut t = task(None);
        let mut now = 7_300_000;
        for _ in 0..100 {
            t.asked = decide(&Music, &t, &pending(), now, &policy(), 0.5).asked;
            now += 600_000;
        }
        assert_eq!(t.asked.total_ms, 99 * 30_000);
        assert!(t.asked.total_ms < deadline_budget(&t));
    }

    #[test]
    fn no_408_on_the_first_answer_after_an_outage() {
        // Asked about for one minute, then the API was down for 3 hours (past the wall-clock
        // deadline): the first answer after it counts one planned wait, and the task goes on.
        let t = asked_since_added(task(Some(Stage::Text)), 60_000);
        let after_outage = 60_000 + 3 * 3_600_000;
        let u = decide(
            &Music,
            &t,
            &Outcome::Pending(record(TaskStatus::TextSuccess)),
            after_outage,
            &policy(),
            0.5,
        );
        assert_eq!(u.state, TaskState::Active, "{:?}", u.events);
        assert!(u.events.is_empty());
        assert_eq!(u.asked.total_ms, 90_000);
        assert_eq!(u.next_poll_at, after_outage + 30_000);
    }

    #[test]
    fn at_the_end_of_its_budget_only_an_unfinished_answer_fails_a_task() {
        // 10 s of budget left: the next poll is planned for then, and the outage that follows
        // does not count beyond it.
        let t = asked_since_added(task(Some(Stage::Text)), 7_160_000);
        let u = decide(&Music, &t, &pending(), 7_190_000, &policy(), 0.5);
        assert_eq!(u.asked.gap_ms, 10_000);
        let mut t = t;
        t.asked = u.asked;
        let later = 7_190_000 + 3_600_000;
        let done = decide(
            &Music,
            &t,
            &Outcome::Progress(record(TaskStatus::Success)),
            later,
            &policy(),
            0.5,
        );
        assert_eq!(done.state, TaskState::Done);
        let failed = decide(
            &Music,
            &t,
            &Outcome::Pending(record(TaskStatus::TextSuccess)),
            later,
            &policy(),
            0.5,
        );
        assert_eq!(failed.state, TaskState::Failed);
        assert_eq!(failed.events[0].code, DEADLINE_CODE);
        assert_eq!(failed.asked.total_ms, 7_200_000);
    }

    #[test]
    fn wall_clock_steps_do_not_count_toward_the_deadline() {
        let p = policy();
        let t = asked_since_added(task(None), 3_600_000);
        // The clock jumps 3 h ahead between two polls: one planned wait is counted, no more.
        let ahead = decide(
            &Music,
            &t,
            &pending(),
            3_600_000 + 30_000 + 10_800_000,
            &p,
            0.5,
        );
        assert_eq!(ahead.asked.total_ms, 3_630_000);
        assert_eq!(ahead.state, TaskState::Active);
        // The clock jumps 1 h back: nothing is counted, and nothing goes negative.
        let back = decide(
            &Music,
            &t,
            &pending(),
            3_600_000 + 30_000 - 3_600_000,
            &p,
            0.5,
        );
        assert_eq!(back.asked.total_ms, 3_600_000);
        assert_eq!(back.next_poll_at, 30_000 + 30_000);
    }

    #[test]
    fn global_answers_leave_the_deadline_where_it_was() {
        // What a restart reads back is what the last answer stored: `asked` lives in the task
        // row, and only answers about the task move it (see `apply_outcome`'s deferral).
        let t = asked_since_added(task(None), 60_000);
        assert_eq!(asked_until(t.asked, 60_000), 60_000);
        assert_eq!(asked_until(t.asked, 10_000_000), 90_000);
        assert_eq!(asked_until(Asked::default(), 10_000_000), 0);
    }

    #[test]
    fn broken_and_rejected_answers_past_the_deadline_end_the_task() {
        // Both are fresh answers about the task that do not say it finished.
        let t = asked_since_added(task(None), 7_170_000);
        for outcome in [
            Outcome::Broken {
                cause: "bad".into(),
            },
            Outcome::Rejected {
                code: 404,
                message: "not found".into(),
            },
        ] {
            let u = decide(&Music, &t, &outcome, 7_200_000, &policy(), 0.5);
            assert_eq!(u.state, TaskState::Failed, "{outcome:?}");
            let want = match outcome {
                Outcome::Broken { .. } => UNREADABLE_CODE,
                _ => DEADLINE_CODE,
            };
            assert_eq!(u.events.last().map(|e| e.code), Some(want));
        }
    }

    #[test]
    fn unreadable_answers_past_the_deadline_end_the_task_saying_so_not_with_a_timeout() {
        let t = asked_since_added(task(None), 7_170_000);
        let broken = Outcome::Broken {
            cause: "HTTP 200 with a body over 8388608 bytes".into(),
        };
        let u = decide(&Music, &t, &broken, 7_200_000, &policy(), 0.5);
        assert_eq!(u.state, TaskState::Failed);
        assert!(
            !u.timed_out,
            "nothing timed out: the answers were unreadable"
        );
        let ev = u.events.last().expect("an error event");
        assert_eq!((ev.stage, ev.code), (Stage::Error, UNREADABLE_CODE));
        let body: serde_json::Value = serde_json::from_str(&ev.body).expect("json");
        let msg = body["msg"].as_str().expect("msg");
        assert!(
            msg.starts_with("Unreadable:") && msg.contains("8388608"),
            "{msg}"
        );
        assert!(!msg.contains("Timed out"), "{msg}");
    }
}
