//! The backend seam: every operation the daemon asks of its queue, in terms of the store's own
//! records, so a second database (PostgreSQL for several daemons on one queue) is one more
//! implementation of [`Backend`] and the scheduler, forwarder and control server do not change.
//!
//! The contract each implementation keeps (and `conformance` tests): an operation that returns
//! `Ok` is durable; `apply_poll` reads, decides and writes in one transaction; a stage is stored
//! at most once per task and only after the stored one; only the head of each (task, target)
//! delivery queue is due; a replay requested during an attempt is not undone by it; the
//! counts (`counts`, `active_count`, `target_summary`) are kept, not counted, so they cost
//! the same at any queue size, and always equal a recount; the reads operators make (`list`,
//! `show`, `events`, `counts`, `target_summary`, `deliveries_of`) never wait behind writes.

use std::future::Future;

use super::archive::{ArchiveCounts, ArchivedNotice, DueFile, Emitted, FileNext, FileRecord};
use super::deliveries::{
    AttemptRecord, DeliveryNext, DeliveryRecord, DueDelivery, Replay, Route, TargetSpec,
    TargetSummary,
};
use super::events::EventRecord;
use super::gate::{AccountRow, GateRow};
use super::gauges::QueueGauges;
use super::tasks::{
    AddedTask, Applied, Counts, DueRow, Pruned, Schedule, TaskCount, TaskRecord, TaskRow, TaskSpec,
    TaskState, TaskUpdate,
};
use super::{Claim, StoreError, StoreHealth};

/// A store backend. Every method answers only once its writes are committed.
pub trait Backend: Send + Sync {
    /// The last failure, until a write succeeds again.
    fn health(&self) -> &StoreHealth;

    /// Finishes the work already queued, then releases the database. Later calls fail with
    /// [`StoreError::Closed`].
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Proves the write path works now, without writing: takes the write lock after the work
    /// already queued, waiting for it only briefly, and releases it. A failure is recorded in
    /// [`Backend::health`] (until a write succeeds), as a failed commit is.
    fn probe_write(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Adds task IDs with `spec`'s kind and account. Known IDs are left as they are (and
    /// reported); removed ones are tracked again (on `spec`'s account). New tasks are due at
    /// once. If any ID is tracked under another kind, nothing is written and only those IDs
    /// come back, as [`AddResult::OtherKind`](super::AddResult::OtherKind).
    fn add(
        &self,
        ids: Vec<String>,
        spec: TaskSpec,
        now: i64,
        deadline_after: i64,
    ) -> impl Future<Output = Result<Vec<AddedTask>, StoreError>> + Send;

    /// Like [`Backend::add`], and a `failed` or `removed` task is polled again as well: active,
    /// due at once, a fresh deadline, its events kept and its stage the last stored one before
    /// any `error`, so no stage it already has is stored again (`apply_poll` skips one that
    /// is). `done` and `active` tasks are left as they are.
    fn retrack(
        &self,
        ids: Vec<String>,
        spec: TaskSpec,
        now: i64,
        deadline_after: i64,
    ) -> impl Future<Output = Result<Vec<AddedTask>, StoreError>> + Send;

    /// The first `limit` active tasks of `account` by `next_poll_at` (due or not), and when a
    /// lease another daemon holds on one of the account's tasks ends.
    fn due_window(
        &self,
        account: String,
        limit: usize,
    ) -> impl Future<Output = Result<Claim<DueRow>, StoreError>> + Send;

    /// Applies one poll's result to an active task in one transaction: `decide` sees the task
    /// as stored now; its events, deliveries and new state are written together. `None` (and
    /// nothing written) if the task is no longer active.
    fn apply_poll<F>(
        &self,
        id: String,
        now: i64,
        decide: F,
    ) -> impl Future<Output = Result<Option<Applied>, StoreError>> + Send
    where
        F: FnOnce(&TaskRow) -> TaskUpdate + Send + 'static;

    /// Moves every due time of `schedule` (active tasks, pending deliveries) by `by_ms`.
    fn shift_due(
        &self,
        schedule: Schedule,
        by_ms: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Tasks, newest first, optionally only those in `state`.
    fn list(
        &self,
        state: Option<TaskState>,
        limit: Option<u32>,
    ) -> impl Future<Output = Result<Vec<TaskRecord>, StoreError>> + Send;

    /// One page of [`Backend::list`] for an answer streamed page by page: at most `limit`
    /// tasks, newest first, older than the page `before` ended at (`None`: from the newest),
    /// and the cursor of the page after this one (`None` when this is the last). Pages of one
    /// listing never repeat or skip a task that stays in the store.
    fn list_page(
        &self,
        state: Option<TaskState>,
        before: Option<i64>,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<TaskRecord>, Option<i64>), StoreError>> + Send;

    /// One task and its events, or `None` if it is unknown.
    fn show(
        &self,
        id: String,
    ) -> impl Future<Output = Result<Option<(TaskRecord, Vec<EventRecord>)>, StoreError>> + Send;

    /// Stops tracking a task. Returns its state before, or `None` if it is unknown.
    fn remove(
        &self,
        id: String,
        now: i64,
    ) -> impl Future<Output = Result<Option<TaskState>, StoreError>> + Send;

    /// Events with a sequence number above `since`, oldest first.
    fn events(
        &self,
        since: i64,
        task: Option<String>,
        limit: Option<u32>,
    ) -> impl Future<Output = Result<Vec<EventRecord>, StoreError>> + Send;

    /// Like [`Backend::events`], and the page stops once its bodies hold `max_bytes` (always
    /// at least one event): a page of large bodies costs a bounded amount of memory.
    fn events_page(
        &self,
        since: i64,
        task: Option<String>,
        limit: u32,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<EventRecord>, StoreError>> + Send;

    /// Task counts and the event sequence high-water mark.
    fn counts(&self) -> impl Future<Output = Result<Counts, StoreError>> + Send;

    /// Tasks still being polled; cheap at any queue size.
    fn active_count(&self) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// The highest event sequence number ever assigned (0 if none), even after pruning.
    fn last_seq(&self) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// An account's persisted pause and learnt rate (an account never saved: open, none).
    fn load_account(
        &self,
        account: String,
    ) -> impl Future<Output = Result<AccountRow, StoreError>> + Send;

    /// Persists the request rate an account has learnt (`None`: forget it).
    fn save_learnt_rate(
        &self,
        account: String,
        rate: Option<f64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether this daemon may send the one probe after `account`'s pause: always on a store
    /// one daemon has to itself; on a shared one, unless another daemon claimed the probe and
    /// its claim has not run out. Saving the gate releases the claim.
    fn claim_probe(&self, account: String)
    -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Task counts per (kind, account, state), kept, not counted; zero counts left out.
    fn task_breakdown(&self) -> impl Future<Output = Result<Vec<TaskCount>, StoreError>> + Send;

    /// Persists (or, with `None`, clears) an account's pause; its learnt rate stays.
    fn save_gate(
        &self,
        account: String,
        gate: Option<GateRow>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes tasks that finished before `before`, with their events, keeping any task whose
    /// deliveries are still pending. Works in bounded chunks.
    fn prune(&self, before: i64) -> impl Future<Output = Result<Pruned, StoreError>> + Send;

    /// Ready deliveries in due order to `targets` (the configured ones this daemon can make)
    /// or to per-task URLs, skipping `busy` ids and `full` origins.
    fn due_deliveries(
        &self,
        targets: Vec<String>,
        busy: Vec<i64>,
        full: Vec<String>,
        limit: usize,
    ) -> impl Future<Output = Result<Claim<DueDelivery>, StoreError>> + Send;

    /// Records one attempt and its consequence; `false` when a replay superseded it.
    fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: AttemptRecord,
        next: DeliveryNext,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Gives up pending deliveries to configured targets no longer in `known`.
    fn fail_orphans(
        &self,
        known: Vec<TargetSpec>,
        now: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Gives up the pending deliveries of one event (`seq`) or of one task's events, marking
    /// each `failed` as cancelled; an attempt in flight meanwhile does not undo it. Returns how
    /// many.
    fn cancel_deliveries(
        &self,
        what: Replay,
        now: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Replays deliveries (see [`super::Store::redeliver`]). Returns how many are now pending.
    fn redeliver(
        &self,
        what: Replay,
        target: Option<String>,
        routes: Vec<Route>,
        now: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Every delivery of one task's events, with its attempts, keyed by event sequence number.
    fn deliveries_of(
        &self,
        task: String,
    ) -> impl Future<Output = Result<Vec<(i64, DeliveryRecord)>, StoreError>> + Send;

    /// Per-target delivery counts and last success/error.
    fn target_summary(&self)
    -> impl Future<Output = Result<Vec<TargetSummary>, StoreError>> + Send;

    /// The queue's gauges at `now` (see [`QueueGauges`]); its cost must not grow with the queue.
    fn gauges(&self, now: i64) -> impl Future<Output = Result<QueueGauges, StoreError>> + Send;

    /// Archive files due at `now`, oldest task first, skipping `busy`, at most `limit`; then
    /// the pending one due soonest after `now`, if any.
    fn due_files(
        &self,
        busy: Vec<i64>,
        now: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Claim<DueFile>, StoreError>> + Send;

    /// Records one try at a file and its consequence; when that makes every file of its task
    /// kept and the task has no `archived` event yet, stores the one `notice` builds (if it
    /// has routes) with its deliveries, due at `now`, in the same transaction.
    fn record_file(
        &self,
        id: i64,
        next: FileNext,
        now: i64,
        notice: Option<ArchivedNotice>,
    ) -> impl Future<Output = Result<Option<Emitted>, StoreError>> + Send;

    /// Stores (or with `None` forgets) a file's resume validator.
    fn save_validator(
        &self,
        id: i64,
        validator: Option<String>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every archive file of one task, in listing order.
    fn files_of(
        &self,
        task: String,
    ) -> impl Future<Output = Result<Vec<FileRecord>, StoreError>> + Send;

    /// Archive files per state and bytes kept; kept counts, equal to a recount.
    fn archive_counts(&self) -> impl Future<Output = Result<ArchiveCounts, StoreError>> + Send;

    /// Puts the named files of a task back to pending, due at `now`, with fresh tries.
    fn redo_files(
        &self,
        task: String,
        names: Vec<String>,
        now: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}
