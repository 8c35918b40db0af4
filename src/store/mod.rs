//! The durable queue behind one handle, [`Store`], whatever database holds it.
//!
//! What the daemon asks of its queue is named once, by the [`Backend`] trait, in terms of the
//! store's own records (times as Unix milliseconds, URLs as stored); turning them into text for
//! people is the control side's job. Today's one backend is `sqlite`: one SQLite database
//! written by one thread, with group commit, and read by operators' queries on read-only
//! connections that never wait behind it. Counts are kept, not counted, so nothing an
//! operator asks grows with the queue. The schedule is the `next_poll_at` column, not
//! timers in memory, so 100 000 queued tasks cost disk, not RAM, and a restart resumes exactly
//! where the last commit left off.
//!
//! - `tasks`, `events`, `gate`, `deliveries`: the records of each table family (and, for the
//!   outbox, how a delivery is identified: [`webhook_id`], [`origin_of`]).
//! - `archive`: the files each finished task leaves behind ([`AssetFile`], [`DueFile`]).
//! - [`Backend`]: the seam; `conformance` runs one test suite against every backend.

use std::path::Path;
use std::sync::Mutex;

mod archive;
mod backend;
#[cfg(test)]
mod conformance;
mod deliveries;
mod events;
mod gate;
mod gauges;
mod postgres;
mod sqlite;
mod tasks;

pub use archive::{
    ArchiveCounts, ArchivedNotice, AssetFile, AssetSource, DueFile, Emitted, FileNext, FileRecord,
    FileState, Notice,
};
pub use backend::Backend;
pub use deliveries::{
    AttemptLog, AttemptRecord, DeliveryNext, DeliveryRecord, DueDelivery, Replay, Route,
    TARGET_SUBMITTED_URL, TARGET_TASK_URL, TargetSpec, TargetSummary, origin_of, webhook_id,
};
pub use events::EventRecord;
pub use gate::AccountRow;
pub use gate::{GateRow, PauseKind};
pub use gauges::{DUE_COUNT_CAP, QueueGauges};
pub use postgres::{
    CopyCheck, CopyReport, DaemonRow, ForgetReport, ForgottenTarget, LeaseCount, Note, PgOptions,
    SilentHolder, forget_member,
};

/// Tasks deleted per housekeeping transaction.
pub const PRUNE_CHUNK: usize = 500;

/// What one claim of a loop's queue returned: the rows, and when work that other daemons hold
/// may next be free for this loop.
///
/// A lease running out is not an event anyone sends: a daemon that dies simply stops renewing.
/// So the claim says when the earliest live lease another daemon holds on work this loop could
/// take ends, and the loop looks again then, even with nothing else to do. If the holder still
/// runs, it has renewed the lease by then and the loop sleeps again (once per three quarters of
/// a lease at most, and only while other daemons hold work); if it stopped, its work is taken
/// over within its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<T> {
    /// The rows claimed (and, for polls, the ones next due), in the loop's order.
    pub rows: Vec<T>,
    /// In how many ms, on the database's clock, the earliest live lease another daemon holds on
    /// this loop's work runs out. `None`: no other daemon holds any (always so on SQLite, where
    /// one daemon has the queue to itself).
    pub foreign_lease_ends_in: Option<i64>,
}

impl<T> Claim<T> {
    /// Rows with no work held elsewhere: a queue one daemon has to itself.
    pub fn alone(rows: Vec<T>) -> Claim<T> {
        Claim {
            rows,
            foreign_lease_ends_in: None,
        }
    }
}
pub use tasks::{
    AddResult, AddedTask, Applied, Asked, Counts, DEFAULT_ACCOUNT, DueRow, Kind, Pruned, Schedule,
    TaskCount, TaskRecord, TaskRow, TaskSpec, TaskState, TaskUpdate,
};

/// A store failure. Cloneable because one failed commit answers every job in its batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database refused a statement (a constraint, a bad value): a problem with the
    /// request, not with the store.
    #[error("store error: {0}")]
    Sqlite(String),
    /// The database could not do its job: disk full, I/O error, corruption, locked by another
    /// process, read-only. The store is unhealthy until a write succeeds again.
    #[error("store failure: {0}")]
    Fault(String),
    /// The store could not be opened.
    #[error("{0}")]
    Open(String),
    /// The store is in use by another daemon (its lock is held): waiting or restarting cannot
    /// fix that, stopping the other daemon can.
    #[error("{0}")]
    InUse(String),
    /// The store thread has stopped (the daemon is shutting down).
    #[error("the store has shut down")]
    Closed,
}

/// Told about every commit: how long it took, how many jobs it carried, whether it worked.
/// The daemon points it at its metrics; the store knows nothing of them.
pub type CommitObserver = Box<dyn Fn(std::time::Duration, usize, bool) + Send + Sync>;

/// The last store failure, for `status` and health checks, and who hears about each commit.
#[derive(Default)]
pub struct StoreHealth {
    last_error: Mutex<Option<(i64, String)>>,
    observer: std::sync::OnceLock<CommitObserver>,
}

impl std::fmt::Debug for StoreHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHealth")
            .field("last_error", &self.last_error())
            .finish_non_exhaustive()
    }
}

impl StoreHealth {
    /// The last store failure and when it happened, until a write succeeds again. (A read
    /// succeeding proves little: with a full disk, reads work and writes fail.)
    pub fn last_error(&self) -> Option<(i64, String)> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a failure, or with `None` clears it. Backends call it: only they know when a
    /// write has committed.
    fn set(&self, e: Option<&StoreError>) {
        let mut slot = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *slot = e.map(|e| (crate::clock::now_ms(), e.to_string()));
    }

    /// Sets who hears about every commit from now on (once; later calls are ignored).
    pub fn observe_commits(&self, observer: CommitObserver) {
        let _ = self.observer.set(observer);
    }

    /// A commit of `jobs` jobs ended after `took`; backends call it.
    fn committed(&self, took: std::time::Duration, jobs: usize, ok: bool) {
        if let Some(observe) = self.observer.get() {
            observe(took, jobs, ok);
        }
    }
}

/// Which backend a [`Store`] talks to. Adding a database is one more variant here and one more
/// arm in [`on_backend`].
#[derive(Debug, Clone)]
enum Engine {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

/// Runs `$body` with `$b` bound to the store's backend, whichever it is.
macro_rules! on_backend {
    ($store:expr, $b:ident => $body:expr) => {
        match &$store.engine {
            Engine::Sqlite($b) => $body,
            Engine::Postgres($b) => $body,
        }
    };
}

/// A handle on the queue. Cheap to clone; the backend stops when the last handle is gone.
#[derive(Debug, Clone)]
pub struct Store {
    engine: Engine,
}

impl Store {
    /// Opens (creating if needed) the SQLite store at `path`, takes its lock so no second
    /// daemon can use it, migrates the schema, and starts the store thread. Blocking: call it
    /// from `spawn_blocking` or before the runtime is busy.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            engine: Engine::Sqlite(sqlite::Sqlite::open(path)?),
        })
    }

    /// Copies the store file at `from` into the new file `to`, safely while a daemon runs on
    /// it (SQLite's online backup API, on a read-only connection). Refuses an existing `to`.
    /// Returns how many tasks the copy holds. Blocking.
    pub fn backup(from: &Path, to: &Path) -> Result<i64, StoreError> {
        sqlite::backup(from, to)
    }

    /// Copies the queue of a stopped daemon's SQLite store at `from` into the empty PostgreSQL
    /// database `to` names (`sunopoll store copy`): the file's lock is held throughout, so no
    /// daemon starts on it meanwhile; everything goes in one transaction that commits only if
    /// every table's rows and every kept count check out. Must run inside the tokio runtime.
    pub async fn copy_to_postgres(from: &Path, to: &PgOptions) -> Result<CopyReport, StoreError> {
        let locked = sqlite::open_locked(from)?;
        postgres::copy::from_sqlite(&locked.conn, to).await
    }

    /// Connects to the PostgreSQL database `options` names (shared by any number of daemons),
    /// migrates its schema, registers this daemon and starts its heartbeat.
    pub async fn open_postgres(options: &PgOptions) -> Result<Store, StoreError> {
        Ok(Store {
            engine: Engine::Postgres(postgres::Postgres::open(options).await?),
        })
    }

    /// The store as people may see it: the SQLite file's path, or the PostgreSQL database
    /// (never its password).
    pub fn shown(&self) -> String {
        match &self.engine {
            Engine::Sqlite(b) => b.path().display().to_string(),
            Engine::Postgres(b) => b.shown().to_owned(),
        }
    }

    /// The daemons sharing this queue and the leases each holds (`None`: a SQLite store, which
    /// one daemon has to itself).
    pub async fn daemons(&self) -> Option<Result<Vec<DaemonRow>, StoreError>> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            Engine::Postgres(b) => Some(b.daemons().await),
        }
    }

    /// On a shared queue: the daemons that stopped beating while holding live leases (`None` for
    /// SQLite, where nothing is leased).
    pub async fn silent_holders(&self) -> Option<Result<Vec<SilentHolder>, StoreError>> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            Engine::Postgres(b) => Some(b.silent_holders().await),
        }
    }

    /// Whether this daemon may send the one probe after `account`'s pause (see
    /// [`Backend::claim_probe`]).
    pub async fn claim_probe(&self, account: String) -> Result<bool, StoreError> {
        on_backend!(self, b => b.claim_probe(account).await)
    }

    /// What the daemons sharing the queue commit, as they say it (`None` for SQLite: one
    /// daemon hears its own commits directly).
    pub fn notes(&self) -> Option<tokio::sync::broadcast::Receiver<Note>> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            Engine::Postgres(b) => Some(b.notes()),
        }
    }

    /// Renews this daemon's lease on archive file `id` while its download runs, on a queue
    /// several daemons share; false when another daemon has taken the file over (this one was
    /// stopped past its lease). On SQLite, where nothing is leased, always true.
    pub async fn renew_file(&self, id: i64) -> Result<bool, StoreError> {
        match &self.engine {
            Engine::Sqlite(_) => Ok(true),
            Engine::Postgres(b) => b.renew_file(id).await,
        }
    }

    /// How long a claim keeps other daemons off a row (`None` for SQLite).
    pub fn lease_ms(&self) -> Option<i64> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            Engine::Postgres(b) => Some(b.lease_ms()),
        }
    }

    /// On a shared queue, every registered target with the members (host and control socket)
    /// whose configs name it, and this daemon's own member name. `None` for SQLite.
    pub async fn shared_targets(
        &self,
    ) -> Option<Result<(String, Vec<(String, Vec<String>)>), StoreError>> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            Engine::Postgres(b) => {
                Some(b.shared_targets().await.map(|t| (b.member().to_owned(), t)))
            }
        }
    }

    /// This daemon's name among those sharing the queue (`None` for SQLite).
    pub fn daemon_name(&self) -> Option<&str> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            Engine::Postgres(b) => Some(b.me()),
        }
    }

    /// The last store error, if the last commit failed.
    pub fn health(&self) -> &StoreHealth {
        on_backend!(self, b => b.health())
    }

    /// Closes the database and releases its lock once the jobs already queued are done. Later
    /// calls on any handle fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        on_backend!(self, b => b.close().await)
    }

    /// Proves the store can be written now, without writing anything: the write lock is taken
    /// (after the work already queued, waiting for it only briefly) and released. A failure
    /// (another process holds the lock, a read-only file) is recorded in [`Store::health`]
    /// until a write succeeds, as a failed commit is.
    pub async fn probe_write(&self) -> Result<(), StoreError> {
        on_backend!(self, b => b.probe_write().await)
    }

    /// Adds task IDs. Known IDs are left as they are (and reported); removed ones are tracked
    /// again. New tasks are due at once.
    pub async fn add(
        &self,
        ids: Vec<String>,
        spec: TaskSpec,
        now: i64,
        deadline_after: i64,
    ) -> Result<Vec<AddedTask>, StoreError> {
        on_backend!(self, b => b.add(ids, spec, now, deadline_after).await)
    }

    /// Adds task IDs and polls `failed` or `removed` ones again, keeping their events (see
    /// [`Backend::retrack`]).
    pub async fn retrack(
        &self,
        ids: Vec<String>,
        spec: TaskSpec,
        now: i64,
        deadline_after: i64,
    ) -> Result<Vec<AddedTask>, StoreError> {
        on_backend!(self, b => b.retrack(ids, spec, now, deadline_after).await)
    }

    /// The first `limit` active tasks of `account` by `next_poll_at` (due or not), for its
    /// scheduler.
    pub async fn due_window(
        &self,
        account: String,
        limit: usize,
    ) -> Result<Claim<DueRow>, StoreError> {
        on_backend!(self, b => b.due_window(account, limit).await)
    }

    /// Applies one poll's result to an active task: `decide` sees the task as stored now and
    /// returns its new state and events, which are written in the same transaction. Returns
    /// `None` (and writes nothing) if the task is no longer active, e.g. removed meanwhile.
    pub async fn apply_poll<F>(
        &self,
        id: String,
        now: i64,
        decide: F,
    ) -> Result<Option<Applied>, StoreError>
    where
        F: FnOnce(&TaskRow) -> TaskUpdate + Send + 'static,
    {
        on_backend!(self, b => b.apply_poll(id, now, decide).await)
    }

    /// Moves every due time of `schedule` by `by_ms`, after the wall clock was stepped (the
    /// job loops notice it). Returns how many rows moved.
    pub async fn shift_due(&self, schedule: Schedule, by_ms: i64) -> Result<usize, StoreError> {
        on_backend!(self, b => b.shift_due(schedule, by_ms).await)
    }

    /// Tasks, newest first, optionally only those in `state`.
    pub async fn list(
        &self,
        state: Option<TaskState>,
        limit: Option<u32>,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        on_backend!(self, b => b.list(state, limit).await)
    }

    /// One page of [`Store::list`], for streamed answers: see [`Backend::list_page`].
    pub async fn list_page(
        &self,
        state: Option<TaskState>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<TaskRecord>, Option<i64>), StoreError> {
        on_backend!(self, b => b.list_page(state, before, limit).await)
    }

    /// One task and its events, or `None` if it is unknown.
    pub async fn show(
        &self,
        id: String,
    ) -> Result<Option<(TaskRecord, Vec<EventRecord>)>, StoreError> {
        on_backend!(self, b => b.show(id).await)
    }

    /// Stops tracking a task. Returns its state before, or `None` if it is unknown.
    pub async fn remove(&self, id: String, now: i64) -> Result<Option<TaskState>, StoreError> {
        on_backend!(self, b => b.remove(id, now).await)
    }

    /// Events with a sequence number above `since`, oldest first.
    pub async fn events(
        &self,
        since: i64,
        task: Option<String>,
        limit: Option<u32>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        on_backend!(self, b => b.events(since, task, limit).await)
    }

    /// Events above `since`, at most `limit` and about `max_bytes` of bodies: see
    /// [`Backend::events_page`].
    pub async fn events_page(
        &self,
        since: i64,
        task: Option<String>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        on_backend!(self, b => b.events_page(since, task, limit, max_bytes).await)
    }

    /// Task counts and the event sequence high-water mark.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        on_backend!(self, b => b.counts().await)
    }

    /// Tasks still being polled. Cheap at any queue size, so the scheduler can keep systemd's
    /// `STATUS=` line current.
    pub async fn active_count(&self) -> Result<i64, StoreError> {
        on_backend!(self, b => b.active_count().await)
    }

    /// The highest event sequence number ever assigned (0 if none).
    pub async fn last_seq(&self) -> Result<i64, StoreError> {
        on_backend!(self, b => b.last_seq().await)
    }

    /// An account's persisted pause and learnt rate (nothing saved: open, none learnt).
    pub async fn load_account(&self, account: String) -> Result<AccountRow, StoreError> {
        on_backend!(self, b => b.load_account(account).await)
    }

    /// Persists (or, with `None`, clears) an account's pause.
    pub async fn save_gate(
        &self,
        account: String,
        gate: Option<GateRow>,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.save_gate(account, gate).await)
    }

    /// Persists the request rate an account has learnt (`None`: none learnt, use the ceiling).
    pub async fn save_learnt_rate(
        &self,
        account: String,
        rate: Option<f64>,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.save_learnt_rate(account, rate).await)
    }

    /// Task counts per (kind, account, state), kept like [`Store::counts`].
    pub async fn task_breakdown(&self) -> Result<Vec<TaskCount>, StoreError> {
        on_backend!(self, b => b.task_breakdown().await)
    }

    /// Deletes tasks that finished (done, failed or removed) before `before`, with their events.
    ///
    /// Works in chunks of [`PRUNE_CHUNK`] tasks, one transaction each, so a first prune of a
    /// large history never holds the store (and every poll behind it) for seconds.
    pub async fn prune(&self, before: i64) -> Result<Pruned, StoreError> {
        on_backend!(self, b => b.prune(before).await)
    }

    /// Pending deliveries in due order, skipping those in flight (`busy` ids), those to
    /// destinations already at their limit (`full` origins), and those waiting behind an earlier
    /// pending event of the same task for the same target (order per task and target).
    pub async fn due_deliveries(
        &self,
        targets: Vec<String>,
        busy: Vec<i64>,
        full: Vec<String>,
        limit: usize,
    ) -> Result<Claim<DueDelivery>, StoreError> {
        on_backend!(self, b => b.due_deliveries(targets, busy, full, limit).await)
    }

    /// Records one attempt at `delivery` and its consequence. Returns `false` when a replay was
    /// requested while the attempt was in flight: the attempt is kept in the history, but the
    /// delivery stays pending for the replay instead of taking this attempt's result (a replay
    /// the operator was told about must happen).
    pub async fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: AttemptRecord,
        next: DeliveryNext,
    ) -> Result<bool, StoreError> {
        on_backend!(self, b => b.record_attempt(delivery, attempt, next).await)
    }

    /// Gives up pending deliveries to configured targets that are no longer configured.
    /// Returns how many. `known` is this daemon's configured targets; on a shared queue they are
    /// registered first (as this daemon's, replacing what it registered before), and a target
    /// is an orphan only when no daemon of the queue has it registered.
    pub async fn fail_orphans(
        &self,
        known: Vec<TargetSpec>,
        now: i64,
    ) -> Result<usize, StoreError> {
        on_backend!(self, b => b.fail_orphans(known, now).await)
    }

    /// Gives up the pending deliveries of one event or one task (`Replay::Event` or
    /// `Replay::Task`; the time-based kinds match nothing). Returns how many.
    pub async fn cancel_deliveries(&self, what: Replay, now: i64) -> Result<usize, StoreError> {
        on_backend!(self, b => b.cancel_deliveries(what, now).await)
    }

    /// Replays deliveries: matching ones go back to pending with a fresh schedule (keeping their
    /// `webhook-id`). For `Event` and `Task`, `routes` (the configured targets) also get a
    /// delivery for events they never had one for. `target` limits it all to one target.
    /// Returns how many deliveries are now pending because of this.
    pub async fn redeliver(
        &self,
        what: Replay,
        target: Option<String>,
        routes: Vec<Route>,
        now: i64,
    ) -> Result<usize, StoreError> {
        on_backend!(self, b => b.redeliver(what, target, routes, now).await)
    }

    /// Every delivery of one task's events, with its attempts, keyed by event sequence number.
    pub async fn deliveries_of(
        &self,
        task: String,
    ) -> Result<Vec<(i64, DeliveryRecord)>, StoreError> {
        on_backend!(self, b => b.deliveries_of(task).await)
    }

    /// Per-target delivery counts and last success/error, for `status`.
    pub async fn target_summary(&self) -> Result<Vec<TargetSummary>, StoreError> {
        on_backend!(self, b => b.target_summary().await)
    }

    /// The queue's gauges at `now`, for a metrics scrape: bounded index look-ups only.
    pub async fn gauges(&self, now: i64) -> Result<QueueGauges, StoreError> {
        on_backend!(self, b => b.gauges(now).await)
    }

    /// Archive files due at `now`, oldest task first, skipping `busy` ones; then the one due
    /// soonest after `now`, if any, so the archive job knows when to look again.
    pub async fn due_files(
        &self,
        busy: Vec<i64>,
        now: i64,
        limit: usize,
    ) -> Result<Claim<DueFile>, StoreError> {
        on_backend!(self, b => b.due_files(busy, now, limit).await)
    }

    /// Records what one try at archive file `id` led to. When it was the last file of its
    /// task to be kept, `notice` (if given) is asked for the task's `archived` notification,
    /// which is stored in the same transaction, with its deliveries due at `now`: once per
    /// task, whatever crashes or `archive redo`s follow. Returns it if it was stored.
    pub async fn record_file(
        &self,
        id: i64,
        next: FileNext,
        now: i64,
        notice: Option<ArchivedNotice>,
    ) -> Result<Option<Emitted>, StoreError> {
        on_backend!(self, b => b.record_file(id, next, now, notice).await)
    }

    /// Remembers the validator (`ETag` or `Last-Modified`) of a file's first answer, for
    /// `If-Range` when its `.part` is resumed; `None` forgets it.
    pub async fn save_validator(
        &self,
        id: i64,
        validator: Option<String>,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.save_validator(id, validator).await)
    }

    /// Every archive file of one task, in listing order.
    pub async fn files_of(&self, task: String) -> Result<Vec<FileRecord>, StoreError> {
        on_backend!(self, b => b.files_of(task).await)
    }

    /// Archive files per state and bytes kept (kept counts, cheap at any size).
    pub async fn archive_counts(&self) -> Result<ArchiveCounts, StoreError> {
        on_backend!(self, b => b.archive_counts().await)
    }

    /// Puts the named files of `task` back to pending, due at `now`. Returns how many.
    pub async fn redo_files(
        &self,
        task: String,
        names: Vec<String>,
        now: i64,
    ) -> Result<usize, StoreError> {
        on_backend!(self, b => b.redo_files(task, names, now).await)
    }
}
