//! The durable queue: one SQLite database owned by one thread.
//!
//! Every read and write is a job sent to that thread. The thread takes whatever jobs are waiting,
//! runs them in one transaction (each inside its own savepoint, so one failing job undoes only
//! itself), commits once, and only then answers each caller. That is group commit: with
//! `synchronous=FULL` every commit is an fsync, and sharing it between concurrent polls is what
//! lets a small machine write thousands of results a second while an acknowledged `add` is
//! still on disk before the caller hears "ok".
//!
//! The schedule is the `next_poll_at` column, not timers in memory, so 100 000 queued tasks cost
//! disk, not RAM, and a restart resumes exactly where the last commit left off.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use crate::clock::format_utc;
use crate::events::{NewEvent, Stage};
use crate::forward::{origin_of, webhook_id};
use crate::protocol::{
    AddResult, AddedTask, AttemptView, DeliveryView, EventView, TargetStatus, TaskState, TaskView,
};

/// Jobs waiting for the store thread. Bounded so a flood of requests queues in the callers
/// (as backpressure), not in memory here.
const QUEUE: usize = 1024;

/// Most jobs in one transaction. Large enough to share an fsync among a burst of polls, small
/// enough that one commit never holds the thread for long.
const MAX_BATCH: usize = 256;

/// Tasks deleted per housekeeping transaction.
pub const PRUNE_CHUNK: usize = 500;

/// How long SQLite waits for a lock held by another process before failing.
const BUSY_TIMEOUT_MS: u32 = 5000;

/// The schema, one entry per version. `PRAGMA user_version` says how many have been applied.
const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE tasks (
    id           TEXT PRIMARY KEY NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('active', 'done', 'failed', 'removed')),
    stage        TEXT CHECK (stage IN ('text', 'first', 'complete', 'error')),
    last_status  TEXT,
    last_error   TEXT,
    polls        INTEGER NOT NULL DEFAULT 0,
    failures     INTEGER NOT NULL DEFAULT 0,
    rejections   INTEGER NOT NULL DEFAULT 0,
    added_at     INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    next_poll_at INTEGER NOT NULL,
    deadline_at  INTEGER NOT NULL,
    finished_at  INTEGER,
    callback_url TEXT,
    label        TEXT
);
CREATE INDEX tasks_due ON tasks (next_poll_at) WHERE state = 'active';
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE state <> 'active';
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    stage      TEXT NOT NULL CHECK (stage IN ('text', 'first', 'complete', 'error')),
    code       INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (task_id, stage)
);
CREATE TABLE gate (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    kind         TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    paused_until INTEGER NOT NULL,
    since        INTEGER NOT NULL,
    cause        TEXT NOT NULL
);
",
    r"
ALTER TABLE tasks ADD COLUMN submitted_callback_url TEXT;
CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,
    event_seq       INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    task_id         TEXT NOT NULL,
    target          TEXT NOT NULL,
    url             TEXT NOT NULL,
    origin          TEXT NOT NULL,
    webhook_id      TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_attempt_at INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    updated_at      INTEGER NOT NULL,
    UNIQUE (event_seq, target)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_order ON deliveries (task_id, target, event_seq);
CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT,
    outcome     TEXT NOT NULL
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
",
    // How many times a delivery was replayed: an attempt that was in flight when a replay was
    // requested must not record its result over the replay (see `record_attempt`).
    r"
ALTER TABLE deliveries ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;
",
    // The head of each (task, target) queue is marked `ready`, so finding due deliveries is one
    // walk of a small index instead of checking every pending row for an earlier one (76 ms a
    // pass with a dead handler's 60 000-row backlog). Plus indexes for `status` and counts.
    r"
ALTER TABLE deliveries ADD COLUMN ready INTEGER NOT NULL DEFAULT 0;
UPDATE deliveries SET ready = 1 WHERE state = 'pending' AND NOT EXISTS
    (SELECT 1 FROM deliveries p WHERE p.task_id = deliveries.task_id AND p.target = deliveries.target
                                  AND p.state = 'pending' AND p.event_seq < deliveries.event_seq);
DROP INDEX deliveries_due;
CREATE INDEX deliveries_ready ON deliveries (next_attempt_at) WHERE state = 'pending' AND ready = 1;
CREATE INDEX deliveries_target ON deliveries (target, state, delivered_at);
CREATE INDEX deliveries_errors ON deliveries (target, last_attempt_at) WHERE last_error IS NOT NULL;
",
];

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
    /// The store thread has stopped (the daemon is shutting down).
    #[error("the store has shut down")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code() {
            Some(
                C::DiskFull
                | C::SystemIoFailure
                | C::DatabaseCorrupt
                | C::NotADatabase
                | C::ReadOnly
                | C::CannotOpen
                | C::DatabaseBusy
                | C::DatabaseLocked
                | C::PermissionDenied
                | C::OutOfMemory,
            ) => StoreError::Fault(e.to_string()),
            _ => StoreError::Sqlite(e.to_string()),
        }
    }
}

/// The last store failure, for `status` and health checks.
#[derive(Debug, Default)]
pub struct StoreHealth {
    last_error: Mutex<Option<(i64, String)>>,
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

    fn set(&self, e: Option<&StoreError>) {
        let mut slot = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *slot = e.map(|e| (crate::clock::now_ms(), e.to_string()));
    }
}

type Completion = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;
/// A job runs against the connection inside the batch's transaction and says whether it
/// succeeded (and if not, whether the store itself failed), returning what to do once the
/// transaction has ended. Given `None`, it must not run: there is no transaction to run in.
type Job =
    Box<dyn FnOnce(Option<&Connection>) -> (Result<(), Option<StoreError>>, Completion) + Send>;

/// What the store thread receives.
enum Message {
    Job(Job),
    /// Finish, close the database, release the lock, then answer.
    Close(oneshot::Sender<()>),
}

/// A handle on the store thread. Cheap to clone; the thread stops when the last handle is gone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Message>,
    path: Arc<PathBuf>,
    health: Arc<StoreHealth>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// A task as the scheduler needs it to decide what a poll means.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    /// The task ID.
    pub id: String,
    /// Lifecycle state.
    pub state: TaskState,
    /// Last stage emitted.
    pub stage: Option<Stage>,
    /// Last status seen.
    pub last_status: Option<String>,
    /// Consecutive broken answers.
    pub failures: u32,
    /// Consecutive rejections.
    pub rejections: u32,
    /// When it was added (Unix ms).
    pub added_at: i64,
    /// When it gives up (Unix ms).
    pub deadline_at: i64,
    /// Per-task callback URL (`add --callback-url`).
    pub callback_url: Option<String>,
    /// The `callBackUrl` the task was submitted with, as last seen in record-info.
    pub submitted_callback_url: Option<String>,
}

/// The new state of a task after a poll, decided by the scheduler from a [`TaskRow`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskUpdate {
    /// New lifecycle state.
    pub state: TaskState,
    /// Status to record as last seen (`None` keeps the old one).
    pub last_status: Option<String>,
    /// Problem to record (`None` clears it).
    pub last_error: Option<String>,
    /// Consecutive broken answers.
    pub failures: u32,
    /// Consecutive rejections.
    pub rejections: u32,
    /// Next poll (ignored unless active).
    pub next_poll_at: i64,
    /// Events to store, in order.
    pub events: Vec<NewEvent>,
    /// Where the new events are delivered (each route takes the stages it wants).
    pub routes: Vec<Route>,
    /// The submitted `callBackUrl` to remember (`None` keeps the old one).
    pub submitted_callback_url: Option<String>,
    /// Milliseconds from storing an event to its first delivery attempt (the retry schedule's
    /// first entry).
    pub first_delivery_delay: i64,
    /// True when the task ends because it passed its deadline (for the log).
    pub timed_out: bool,
}

/// A place events are delivered to, decided when the events are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Target name: a `[[forward.target]]` name, `callback-url` or `submitted-callback-url`.
    pub target: String,
    /// Where to POST.
    pub url: String,
    /// Which stages go there.
    pub stages: Vec<Stage>,
}

/// What a committed poll stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The update that was written.
    pub update: TaskUpdate,
    /// The task as it was before.
    pub before: TaskRow,
    /// Sequence numbers of the stored events, in the order of `update.events`.
    pub seqs: Vec<i64>,
}

/// The earliest active tasks by `next_poll_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRow {
    /// The task ID.
    pub id: String,
    /// When it is due (Unix ms).
    pub next_poll_at: i64,
}

/// Task counts by state, for `status` and start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Being polled.
    pub active: i64,
    /// Completed.
    pub done: i64,
    /// Failed.
    pub failed: i64,
    /// Removed.
    pub removed: i64,
    /// Events stored.
    pub events: i64,
    /// Highest event sequence number ever assigned.
    pub last_seq: i64,
}

/// The persisted global pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRow {
    /// `throttled`, `unavailable` or `unauthorized`.
    pub kind: String,
    /// Consecutive pauses.
    pub attempt: u32,
    /// Polling may resume (with one probe) at this time (Unix ms).
    pub paused_until: i64,
    /// When the first of these pauses began.
    pub since: i64,
    /// What the API said.
    pub cause: String,
}

/// What housekeeping removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Tasks deleted.
    pub tasks: usize,
    /// Events deleted with them.
    pub events: usize,
}

impl Store {
    /// Opens (creating if needed) the store at `path`, takes its lock so no second daemon can
    /// use it, migrates the schema, and starts the store thread. Blocking: call it from
    /// `spawn_blocking` or before the runtime is busy.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |what: String| StoreError::Open(format!("store {}: {what}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_err(format!("cannot create directory {}: {e}", dir.display())))?;
        }
        let lock = lock_store(path).map_err(open_err)?;
        let conn = Connection::open(path).map_err(|e| open_err(format!("cannot open: {e}")))?;
        configure(&conn).map_err(|e| open_err(explain_open_error(&e)))?;
        migrate(&conn).map_err(open_err)?;

        let (tx, rx) = mpsc::channel(QUEUE);
        let health = Arc::new(StoreHealth::default());
        let thread_health = health.clone();
        std::thread::Builder::new()
            .name("sunopoll-store".to_owned())
            .spawn(move || {
                let closed = run_jobs(&conn, rx, &thread_health);
                drop(conn);
                drop(lock);
                if let Some(ack) = closed {
                    let _ = ack.send(());
                }
            })
            .map_err(|e| open_err(format!("cannot start the store thread: {e}")))?;
        Ok(Store {
            jobs: tx,
            path: Arc::new(path.to_owned()),
            health,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The last store error, if the last commit failed.
    pub fn health(&self) -> &StoreHealth {
        &self.health
    }

    /// Runs `f` on the store thread inside the next transaction and returns its result once
    /// that transaction has committed. If `f` fails, its own writes are rolled back.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let Some(conn) = conn else {
                // Not run: the completion carries the batch's error.
                let done: Completion = Box::new(move |commit| {
                    let e = commit.err().cloned().unwrap_or_else(|| {
                        StoreError::Fault("the transaction was lost".to_owned())
                    });
                    let _ = tx.send(Err(e));
                });
                return (Err(None), done);
            };
            let result = f(conn);
            let ok = match &result {
                Ok(_) => Ok(()),
                Err(e @ StoreError::Fault(_)) => Err(Some(e.clone())),
                Err(_) => Err(None),
            };
            let done: Completion = Box::new(move |commit| {
                let _ = tx.send(match commit {
                    Ok(()) => result,
                    Err(e) => Err(e.clone()),
                });
            });
            (ok, done)
        });
        self.jobs
            .send(Message::Job(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Closes the database and releases its lock once the jobs already queued are done. Later
    /// calls on any handle fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Message::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Adds task IDs. Known IDs are left as they are (and reported); removed ones are tracked
    /// again. New tasks are due at once.
    pub async fn add(
        &self,
        ids: Vec<String>,
        callback_url: Option<String>,
        label: Option<String>,
        now: i64,
        deadline_after: i64,
    ) -> Result<Vec<AddedTask>, StoreError> {
        self.call(move |conn| {
            let mut insert = conn.prepare_cached(
                "INSERT INTO tasks (id, state, added_at, updated_at, next_poll_at, deadline_at, callback_url, label)
                 VALUES (?1, 'active', ?2, ?2, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
            )?;
            let mut readd = conn.prepare_cached(
                "UPDATE tasks SET state = 'active', added_at = ?2, updated_at = ?2, next_poll_at = ?2,
                        deadline_at = ?3, finished_at = NULL, failures = 0, rejections = 0, last_error = NULL,
                        callback_url = COALESCE(?4, callback_url), label = COALESCE(?5, label)
                 WHERE id = ?1 AND state = 'removed'",
            )?;
            let mut known = conn.prepare_cached("SELECT state, stage FROM tasks WHERE id = ?1")?;
            let deadline = now.saturating_add(deadline_after);
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let (result, state, stage) = if insert.execute(params![id, now, deadline, callback_url, label])? == 1 {
                    (AddResult::Added, TaskState::Active, None)
                } else {
                    let (state, stage): (String, Option<String>) =
                        known.query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))?;
                    let stage = stage.as_deref().and_then(Stage::parse);
                    if readd.execute(params![id, now, deadline, callback_url, label])? == 1 {
                        (AddResult::Readded, TaskState::Active, stage)
                    } else {
                        (AddResult::Exists, TaskState::parse(&state).unwrap_or(TaskState::Failed), stage)
                    }
                };
                out.push(AddedTask {
                    task_id: id,
                    result,
                    state,
                    stage,
                });
            }
            Ok(out)
        })
        .await
    }

    /// The first `limit` active tasks by `next_poll_at` (due or not), for the scheduler.
    pub async fn due_window(&self, limit: usize) -> Result<Vec<DueRow>, StoreError> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(
                // INDEXED BY pins the plan: walking tasks_due in order stops after `limit` rows,
                // where any other index would sort every active task first (14 ms at 100 000).
                "SELECT id, next_poll_at FROM tasks INDEXED BY tasks_due WHERE state = 'active'
                 ORDER BY next_poll_at, id LIMIT ?1",
            )?;
            let rows = stmt
                .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    Ok(DueRow {
                        id: r.get(0)?,
                        next_poll_at: r.get(1)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
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
        self.call(move |conn| {
            let Some(before) = task_row(conn, &id)? else {
                return Ok(None);
            };
            if before.state != TaskState::Active {
                return Ok(None);
            }
            let update = decide(&before);
            let mut stage = before.stage;
            let mut seqs = Vec::with_capacity(update.events.len());
            let mut insert = conn.prepare_cached(
                "INSERT INTO events (task_id, stage, code, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (task_id, stage) DO NOTHING",
            )?;
            let mut deliver = conn.prepare_cached(
                "INSERT INTO deliveries (event_seq, task_id, target, url, origin, webhook_id, state,
                                         next_attempt_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8, ?8) ON CONFLICT (event_seq, target) DO NOTHING",
            )?;
            for ev in &update.events {
                if stage.is_some_and(|s| s >= ev.stage) {
                    return Err(StoreError::Sqlite(format!(
                        "refusing to store {} after {} for task {id}",
                        ev.stage,
                        stage.map_or("nothing", Stage::as_str)
                    )));
                }
                if insert.execute(params![id, ev.stage.as_str(), ev.code, ev.body, now])? != 1 {
                    return Err(StoreError::Sqlite(format!("task {id} already has a {} event", ev.stage)));
                }
                let seq = conn.last_insert_rowid();
                seqs.push(seq);
                stage = Some(ev.stage);
                for route in update.routes.iter().filter(|r| r.stages.contains(&ev.stage)) {
                    deliver.execute(params![
                        seq,
                        id,
                        route.target,
                        route.url,
                        origin_of(&route.url),
                        webhook_id(&id, ev.stage, &route.target),
                        now.saturating_add(update.first_delivery_delay),
                        now,
                    ])?;
                }
            }
            for route in &update.routes {
                refresh_ready(conn, &id, &route.target)?;
            }
            let finished = (update.state != TaskState::Active).then_some(now);
            conn.prepare_cached(
                "UPDATE tasks SET state = ?2, stage = ?3, last_status = COALESCE(?4, last_status), last_error = ?5,
                        polls = polls + 1, failures = ?6, rejections = ?7, updated_at = ?8, next_poll_at = ?9,
                        finished_at = ?10, submitted_callback_url = COALESCE(?11, submitted_callback_url)
                 WHERE id = ?1",
            )?
            .execute(params![
                id,
                update.state.as_str(),
                stage.map(Stage::as_str),
                update.last_status,
                update.last_error,
                update.failures,
                update.rejections,
                now,
                update.next_poll_at,
                finished,
                update.submitted_callback_url,
            ])?;
            Ok(Some(Applied { update, before, seqs }))
        })
        .await
    }

    /// Tasks, newest first, optionally only those in `state`.
    pub async fn list(
        &self,
        state: Option<TaskState>,
        limit: Option<u32>,
    ) -> Result<Vec<TaskView>, StoreError> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {TASK_COLUMNS} FROM tasks WHERE (?1 IS NULL OR state = ?1) ORDER BY rowid DESC LIMIT ?2"
            ))?;
            let limit = limit.map_or(-1, i64::from);
            let rows = stmt
                .query_map(params![state.map(TaskState::as_str), limit], view_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// One task and its events, or `None` if it is unknown.
    pub async fn show(&self, id: String) -> Result<Option<(TaskView, Vec<EventView>)>, StoreError> {
        self.call(move |conn| {
            let Some(view) = task_view(conn, &id)? else {
                return Ok(None);
            };
            let events = events_query(conn, 0, Some(&id), None)?;
            Ok(Some((view, events)))
        })
        .await
    }

    /// Stops tracking a task. Returns its state before, or `None` if it is unknown.
    pub async fn remove(&self, id: String, now: i64) -> Result<Option<TaskState>, StoreError> {
        self.call(move |conn| {
            let Some(row) = task_row(conn, &id)? else {
                return Ok(None);
            };
            if row.state == TaskState::Active {
                conn.execute(
                    "UPDATE tasks SET state = 'removed', updated_at = ?2, finished_at = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
            }
            Ok(Some(row.state))
        })
        .await
    }

    /// Events with a sequence number above `since`, oldest first.
    pub async fn events(
        &self,
        since: i64,
        task: Option<String>,
        limit: Option<u32>,
    ) -> Result<Vec<EventView>, StoreError> {
        self.call(move |conn| events_query(conn, since, task.as_deref(), limit))
            .await
    }

    /// Task counts and the event sequence high-water mark.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        self.call(|conn| {
            let mut c = Counts::default();
            let mut stmt =
                conn.prepare_cached("SELECT state, COUNT(*) FROM tasks GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                match TaskState::parse(&state) {
                    Some(TaskState::Active) => c.active = n,
                    Some(TaskState::Done) => c.done = n,
                    Some(TaskState::Failed) => c.failed = n,
                    Some(TaskState::Removed) => c.removed = n,
                    None => {}
                }
            }
            c.events = conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?;
            c.last_seq = last_seq(conn)?;
            Ok(c)
        })
        .await
    }

    /// Tasks still being polled. Cheap at any queue size: it reads only the partial index of
    /// active tasks, so the scheduler can keep systemd's `STATUS=` line current.
    pub async fn active_count(&self) -> Result<i64, StoreError> {
        self.call(|conn| {
            Ok(conn.query_row(
                "SELECT COUNT(*) FROM tasks WHERE state = 'active'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// The highest event sequence number ever assigned (0 if none).
    pub async fn last_seq(&self) -> Result<i64, StoreError> {
        self.call(last_seq).await
    }

    /// The persisted global pause, if any.
    pub async fn load_gate(&self) -> Result<Option<GateRow>, StoreError> {
        self.call(|conn| {
            Ok(conn
                .query_row(
                    "SELECT kind, attempt, paused_until, since, cause FROM gate WHERE id = 1",
                    [],
                    |r| {
                        Ok(GateRow {
                            kind: r.get(0)?,
                            attempt: r.get(1)?,
                            paused_until: r.get(2)?,
                            since: r.get(3)?,
                            cause: r.get(4)?,
                        })
                    },
                )
                .optional()?)
        })
        .await
    }

    /// Persists (or, with `None`, clears) the global pause.
    pub async fn save_gate(&self, gate: Option<GateRow>) -> Result<(), StoreError> {
        self.call(move |conn| {
            match gate {
                None => conn.execute("DELETE FROM gate", [])?,
                Some(g) => conn.execute(
                    "INSERT INTO gate (id, kind, attempt, paused_until, since, cause) VALUES (1, ?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (id) DO UPDATE SET kind = ?1, attempt = ?2, paused_until = ?3, since = ?4, cause = ?5",
                    params![g.kind, g.attempt, g.paused_until, g.since, g.cause],
                )?,
            };
            Ok(())
        })
        .await
    }

    /// Deletes tasks that finished (done, failed or removed) before `before`, with their events.
    ///
    /// Works in chunks of [`PRUNE_CHUNK`] tasks, one transaction each, so a first prune of a
    /// large history never holds the store thread (and every poll behind it) for seconds.
    pub async fn prune(&self, before: i64) -> Result<Pruned, StoreError> {
        let mut total = Pruned::default();
        loop {
            let chunk = self
                .call(move |conn| {
                    // A task whose events still wait for delivery is kept until they are
                    // delivered or given up, whatever its age.
                    let old = format!(
                        "SELECT id FROM tasks WHERE state <> 'active' AND finished_at < ?1
                         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.task_id = tasks.id AND d.state = 'pending')
                         LIMIT {PRUNE_CHUNK}"
                    );
                    let ids: Vec<String> = conn
                        .prepare_cached(&old)?
                        .query_map([before], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                    let mut pruned = Pruned::default();
                    let mut events = conn.prepare_cached("DELETE FROM events WHERE task_id = ?1")?;
                    let mut tasks = conn.prepare_cached("DELETE FROM tasks WHERE id = ?1")?;
                    for id in &ids {
                        pruned.events += events.execute([id])?;
                        pruned.tasks += tasks.execute([id])?;
                    }
                    Ok(pruned)
                })
                .await?;
            total.tasks += chunk.tasks;
            total.events += chunk.events;
            if chunk.tasks < PRUNE_CHUNK {
                return Ok(total);
            }
        }
    }
}

/// A delivery ready to be attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    /// Row id.
    pub id: i64,
    /// The event.
    pub event_seq: i64,
    /// Its task.
    pub task_id: String,
    /// Its stage.
    pub stage: Stage,
    /// Target name.
    pub target: String,
    /// URL stored with the delivery (per-task targets use it; configured targets use the
    /// configured URL).
    pub url: String,
    /// `scheme://host:port`, for per-destination concurrency limits.
    pub origin: String,
    /// The Standard Webhooks `webhook-id`, the same on every attempt.
    pub webhook_id: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Replays requested so far; an attempt records its result only if this has not changed.
    pub replays: i64,
    /// When it is due (Unix ms).
    pub next_attempt_at: i64,
    /// The exact callback body.
    pub body: String,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryNext {
    /// Delivered (2xx).
    Delivered,
    /// Failed; try again at this time (Unix ms).
    Retry(i64),
    /// Given up (schedule exhausted, or 410 Gone).
    Failed,
}

/// One attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// When it started (Unix ms).
    pub started_at: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// HTTP status, if an answer came.
    pub status: Option<u16>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// Which deliveries `redeliver` replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Every delivery of one event.
    Event(i64),
    /// Every delivery of one task's events.
    Task(String),
    /// Deliveries given up at or after this time (Unix ms).
    FailedSince(i64),
    /// Deliveries delivered at or after this time (Unix ms).
    SentSince(i64),
}

const DELIVERY_VIEW_COLUMNS: &str = "id, event_seq, target, url, webhook_id, state, attempts, next_attempt_at, \
                                     last_attempt_at, last_status, last_error, delivered_at";

impl Store {
    /// Pending deliveries in due order, skipping those in flight (`busy` ids), those to
    /// destinations already at their limit (`full` origins), and those waiting behind an earlier
    /// pending event of the same task for the same target (order per task and target).
    pub async fn due_deliveries(
        &self,
        busy: Vec<i64>,
        full: Vec<String>,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        self.call(move |conn| {
            let busy = serde_json::to_string(&busy).unwrap_or_else(|_| "[]".to_owned());
            let full = serde_json::to_string(&full).unwrap_or_else(|_| "[]".to_owned());
            let mut stmt = conn.prepare_cached(
                "SELECT d.id, d.event_seq, d.task_id, e.stage, d.target, d.url, d.origin, d.webhook_id,
                        d.attempts, d.next_attempt_at, e.body, d.replays
                 FROM deliveries d INDEXED BY deliveries_ready JOIN events e ON e.seq = d.event_seq
                 WHERE d.state = 'pending' AND d.ready = 1
                   AND d.id NOT IN (SELECT value FROM json_each(?1))
                   AND d.origin NOT IN (SELECT value FROM json_each(?2))
                 ORDER BY d.next_attempt_at, d.id LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(params![busy, full, i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    let stage: String = r.get(3)?;
                    Ok(DueDelivery {
                        id: r.get(0)?,
                        event_seq: r.get(1)?,
                        task_id: r.get(2)?,
                        stage: Stage::parse(&stage).unwrap_or(Stage::Error),
                        target: r.get(4)?,
                        url: r.get(5)?,
                        origin: r.get(6)?,
                        webhook_id: r.get(7)?,
                        attempts: r.get(8)?,
                        next_attempt_at: r.get(9)?,
                        body: r.get(10)?,
                        replays: r.get(11)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
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
        let (id, replays, number) = (delivery.id, delivery.replays, delivery.attempts + 1);
        let (task, target) = (delivery.task_id.clone(), delivery.target.clone());
        self.call(move |conn| {
            let now = attempt.started_at.saturating_add(attempt.duration_ms);
            let (state, next_at, delivered_at, outcome) = match next {
                DeliveryNext::Delivered => ("delivered", now, Some(now), "delivered"),
                DeliveryNext::Retry(at) => ("pending", at, None, "retry"),
                DeliveryNext::Failed => ("failed", now, None, "failed"),
            };
            let n: Option<i64> = conn
                .prepare_cached(
                    "UPDATE deliveries SET state = ?2, attempts = attempts + 1, next_attempt_at = ?3,
                            last_attempt_at = ?4, last_status = ?5, last_error = ?6,
                            delivered_at = COALESCE(?7, delivered_at), updated_at = ?8
                     WHERE id = ?1 AND replays = ?9 RETURNING attempts",
                )?
                .query_row(
                    params![id, state, next_at, attempt.started_at, attempt.status, attempt.error, delivered_at, now, replays],
                    |r| r.get(0),
                )
                .optional()?;
            let (n, outcome) = match n {
                Some(n) => (n, outcome),
                None => (i64::from(number), "superseded"),
            };
            if outcome == "delivered" || outcome == "failed" {
                refresh_ready(conn, &task, &target)?;
            }
            conn.prepare_cached(
                "INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, status, error, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![id, n, attempt.started_at, attempt.duration_ms, attempt.status, attempt.error, outcome])?;
            Ok(outcome != "superseded")
        })
        .await
    }

    /// Gives up pending deliveries to configured targets that are no longer configured.
    /// Returns how many.
    pub async fn fail_orphans(&self, known: Vec<String>, now: i64) -> Result<usize, StoreError> {
        self.call(move |conn| {
            let known = serde_json::to_string(&known).unwrap_or_else(|_| "[]".to_owned());
            Ok(conn.execute(
                "UPDATE deliveries SET state = 'failed', updated_at = ?2,
                        last_error = 'the target is no longer in the configuration'
                 WHERE state = 'pending' AND target NOT IN (?3, ?4)
                   AND target NOT IN (SELECT value FROM json_each(?1))",
                params![
                    known,
                    now,
                    crate::config::TARGET_TASK_URL,
                    crate::config::TARGET_SUBMITTED_URL
                ],
            )?)
        })
        .await
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
        self.call(move |conn| {
            let seqs: Vec<(i64, String, Stage)> = match &what {
                Replay::Event(seq) => events_query_seq(conn, "seq = ?1", params![seq])?,
                Replay::Task(task) => events_query_seq(conn, "task_id = ?1", params![task])?,
                Replay::FailedSince(_) | Replay::SentSince(_) => Vec::new(),
            };
            let mut count = 0;
            let mut reset = conn.prepare_cached(
                "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, updated_at = ?2,
                        replays = replays + 1
                 WHERE id = ?1",
            )?;
            let ids: Vec<i64> = match &what {
                Replay::Event(_) | Replay::Task(_) => {
                    let mut ids = Vec::new();
                    let mut stmt = conn.prepare_cached(
                        "SELECT id FROM deliveries WHERE event_seq = ?1 AND (?2 IS NULL OR target = ?2)",
                    )?;
                    for (seq, _, _) in &seqs {
                        for id in stmt.query_map(params![seq, target], |r| r.get(0))? {
                            ids.push(id?);
                        }
                    }
                    ids
                }
                Replay::FailedSince(t) => conn
                    .prepare_cached(
                        "SELECT id FROM deliveries WHERE state = 'failed' AND updated_at >= ?1 AND (?2 IS NULL OR target = ?2)",
                    )?
                    .query_map(params![t, target], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
                Replay::SentSince(t) => conn
                    .prepare_cached(
                        "SELECT id FROM deliveries WHERE state = 'delivered' AND delivered_at >= ?1 AND (?2 IS NULL OR target = ?2)",
                    )?
                    .query_map(params![t, target], |r| r.get(0))?
                    .collect::<Result<_, _>>()?,
            };
            let mut touched = std::collections::HashSet::new();
            let mut pair = conn.prepare_cached("SELECT task_id, target FROM deliveries WHERE id = ?1")?;
            for id in ids {
                count += reset.execute(params![id, now])?;
                touched.insert(pair.query_row([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?);
            }
            let mut insert = conn.prepare_cached(
                "INSERT INTO deliveries (event_seq, task_id, target, url, origin, webhook_id, state,
                                         next_attempt_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7, ?7) ON CONFLICT (event_seq, target) DO NOTHING",
            )?;
            for (seq, task, stage) in &seqs {
                for route in routes
                    .iter()
                    .filter(|r| r.stages.contains(stage) && target.as_ref().is_none_or(|t| *t == r.target))
                {
                    count += insert.execute(params![
                        seq,
                        task,
                        route.target,
                        route.url,
                        origin_of(&route.url),
                        webhook_id(task, *stage, &route.target),
                        now
                    ])?;
                    touched.insert((task.clone(), route.target.clone()));
                }
            }
            for (task, target) in &touched {
                refresh_ready(conn, task, target)?;
            }
            Ok(count)
        })
        .await
    }

    /// Every delivery of one task's events, with its attempts, keyed by event sequence number.
    pub async fn deliveries_of(
        &self,
        task: String,
    ) -> Result<Vec<(i64, DeliveryView)>, StoreError> {
        self.call(move |conn| {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {DELIVERY_VIEW_COLUMNS} FROM deliveries WHERE task_id = ?1 ORDER BY event_seq, target"
            ))?;
            let mut attempts = conn.prepare_cached(
                "SELECT attempt, started_at, duration_ms, status, error, outcome FROM attempts
                 WHERE delivery_id = ?1 ORDER BY id",
            )?;
            let rows = stmt
                .query_map([task], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, delivery_from_row(r)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut out = Vec::with_capacity(rows.len());
            for (id, seq, mut view) in rows {
                view.attempt_log = attempts
                    .query_map([id], |r| {
                        Ok(AttemptView {
                            attempt: r.get(0)?,
                            at: format_utc(r.get(1)?),
                            duration_ms: r.get(2)?,
                            status: r.get(3)?,
                            error: r.get(4)?,
                            outcome: r.get(5)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                out.push((seq, view));
            }
            Ok(out)
        })
        .await
    }

    /// Per-target delivery counts and last success/error, for `status`.
    pub async fn target_summary(&self) -> Result<Vec<TargetStatus>, StoreError> {
        self.call(|conn| {
            // Both queries are answered from indexes (deliveries_target covers the counts and
            // the last success; deliveries_errors finds the last error), not by scanning rows.
            let mut counts = conn.prepare_cached(
                "SELECT target, state, COUNT(*), MAX(delivered_at) FROM deliveries
                 GROUP BY target, state ORDER BY target",
            )?;
            let mut out: Vec<TargetStatus> = Vec::new();
            let rows = counts.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, Option<i64>>(3)?))
            })?;
            for row in rows {
                let (target, state, n, delivered_at) = row?;
                if out.last().is_none_or(|t| t.target != target) {
                    out.push(TargetStatus {
                        target,
                        pending: 0,
                        failed: 0,
                        delivered: 0,
                        last_success_at: None,
                        last_error: None,
                        last_error_at: None,
                    });
                }
                let t = out.last_mut().expect("pushed above");
                match state.as_str() {
                    "pending" => t.pending = n,
                    "failed" => t.failed = n,
                    "delivered" => {
                        t.delivered = n;
                        t.last_success_at = delivered_at.map(format_utc);
                    }
                    _ => {}
                }
            }
            let mut last_error = conn.prepare_cached(
                "SELECT last_error, last_attempt_at FROM deliveries
                 WHERE target = ?1 AND last_error IS NOT NULL ORDER BY last_attempt_at DESC LIMIT 1",
            )?;
            for t in &mut out {
                if let Some((e, at)) = last_error
                    .query_row([&t.target], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?)))
                    .optional()?
                {
                    t.last_error = Some(e);
                    t.last_error_at = at.map(format_utc);
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Marks the first pending delivery of `task` to `target` ready and the others not: only the
/// head of a queue may be sent, so `complete` never overtakes `first`.
fn refresh_ready(conn: &Connection, task: &str, target: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE deliveries SET ready = (event_seq = (SELECT MIN(event_seq) FROM deliveries p
                                         WHERE p.task_id = ?1 AND p.target = ?2 AND p.state = 'pending'))
         WHERE task_id = ?1 AND target = ?2 AND state = 'pending'",
    )?
    .execute(params![task, target])?;
    Ok(())
}

fn events_query_seq(
    conn: &Connection,
    filter: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<(i64, String, Stage)>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT seq, task_id, stage FROM events WHERE {filter} ORDER BY seq"
    ))?;
    let rows = stmt
        .query_map(p, |r| {
            let stage: String = r.get(2)?;
            Ok((
                r.get(0)?,
                r.get(1)?,
                Stage::parse(&stage).unwrap_or(Stage::Error),
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn delivery_from_row(r: &Row<'_>) -> rusqlite::Result<DeliveryView> {
    let state: String = r.get(5)?;
    Ok(DeliveryView {
        target: r.get(2)?,
        url: crate::api::redact_url(&r.get::<_, String>(3)?),
        webhook_id: r.get(4)?,
        next_attempt_at: (state == "pending")
            .then(|| r.get::<_, i64>(7).map(format_utc))
            .transpose()?,
        state,
        attempts: r.get(6)?,
        last_attempt_at: r.get::<_, Option<i64>>(8)?.map(format_utc),
        last_status: r.get(9)?,
        last_error: r.get(10)?,
        delivered_at: r.get::<_, Option<i64>>(11)?.map(format_utc),
        attempt_log: Vec::new(),
    })
}

const TASK_COLUMNS: &str = "id, state, stage, last_status, last_error, polls, added_at, updated_at, next_poll_at, \
                            deadline_at, finished_at, callback_url, label";

fn view_from_row(r: &Row<'_>) -> rusqlite::Result<TaskView> {
    let state: String = r.get(1)?;
    let state = TaskState::parse(&state).unwrap_or(TaskState::Failed);
    let stage: Option<String> = r.get(2)?;
    Ok(TaskView {
        task_id: r.get(0)?,
        state,
        stage: stage.as_deref().and_then(Stage::parse),
        last_status: r.get(3)?,
        last_error: r.get(4)?,
        polls: r.get(5)?,
        added_at: format_utc(r.get(6)?),
        updated_at: format_utc(r.get(7)?),
        next_poll_at: (state == TaskState::Active)
            .then(|| r.get::<_, i64>(8).map(format_utc))
            .transpose()?,
        deadline_at: format_utc(r.get(9)?),
        finished_at: r.get::<_, Option<i64>>(10)?.map(format_utc),
        callback_url: r.get(11)?,
        label: r.get(12)?,
    })
}

fn task_view(conn: &Connection, id: &str) -> Result<Option<TaskView>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))?
        .query_row([id], view_from_row)
        .optional()?)
}

fn task_row(conn: &Connection, id: &str) -> Result<Option<TaskRow>, StoreError> {
    Ok(conn
        .prepare_cached(
            "SELECT id, state, stage, last_status, failures, rejections, added_at, deadline_at,
                    callback_url, submitted_callback_url
             FROM tasks WHERE id = ?1",
        )?
        .query_row([id], |r| {
            let state: String = r.get(1)?;
            let stage: Option<String> = r.get(2)?;
            Ok(TaskRow {
                id: r.get(0)?,
                state: TaskState::parse(&state).unwrap_or(TaskState::Failed),
                stage: stage.as_deref().and_then(Stage::parse),
                last_status: r.get(3)?,
                failures: r.get(4)?,
                rejections: r.get(5)?,
                added_at: r.get(6)?,
                deadline_at: r.get(7)?,
                callback_url: r.get(8)?,
                submitted_callback_url: r.get(9)?,
            })
        })
        .optional()?)
}

fn events_query(
    conn: &Connection,
    since: i64,
    task: Option<&str>,
    limit: Option<u32>,
) -> Result<Vec<EventView>, StoreError> {
    // Two statements, not `(?2 IS NULL OR task_id = ?2)`: SQLite plans a statement once, and
    // that form cannot use the (task_id, stage) index, so one task's events meant a scan of
    // every event.
    let mut stmt = match task {
        Some(_) => conn.prepare_cached(
            "SELECT seq, task_id, stage, code, created_at, body FROM events
             WHERE task_id = ?2 AND seq > ?1 ORDER BY seq LIMIT ?3",
        )?,
        None => conn.prepare_cached(
            "SELECT seq, task_id, stage, code, created_at, body FROM events
             WHERE seq > ?1 AND ?2 IS NULL ORDER BY seq LIMIT ?3",
        )?,
    };
    let rows = stmt
        .query_map(params![since, task, limit.map_or(-1, i64::from)], |r| {
            let stage: String = r.get(2)?;
            let body: String = r.get(5)?;
            Ok((r.get(0)?, r.get(1)?, stage, r.get(3)?, r.get(4)?, body))
        })?
        .collect::<Result<Vec<(i64, String, String, i64, i64, String)>, _>>()?;
    rows.into_iter()
        .map(|(seq, task_id, stage, code, created_at, body)| {
            Ok(EventView {
                seq,
                task_id,
                stage: Stage::parse(&stage).ok_or_else(|| {
                    StoreError::Sqlite(format!("event {seq} has stage {stage:?}"))
                })?,
                code,
                created_at: format_utc(created_at),
                body: RawValue::from_string(body)
                    .map_err(|e| StoreError::Sqlite(format!("event {seq} body: {e}")))?,
            })
        })
        .collect()
}

fn last_seq(conn: &Connection) -> Result<i64, StoreError> {
    // AUTOINCREMENT keeps the high-water mark in sqlite_sequence even after events are pruned.
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// Takes an exclusive lock on `<store>.lock`, so two daemons never poll from one queue. The
/// lock is released by the kernel when the process dies, so a crash never leaves it stale.
fn lock_store(path: &Path) -> Result<File, String> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open lock file {}: {e}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "it is in use by another sunopoll daemon (lock {} is held); stop that one first",
            lock_path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(format!("cannot lock {}: {e}", lock_path.display()))
        }
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode stayed {mode}; WAL is required"
        )));
    }
    // FULL: an acknowledged add survives a power cut (WAL + NORMAL may lose the last commits).
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;",
    )?;
    Ok(())
}

fn explain_open_error(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            "the file is not a SQLite database (corrupted, or the wrong file); it was left untouched".to_owned()
        }
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            "the database is locked by another process".to_owned()
        }
        Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::PermissionDenied) => {
            format!("cannot write it ({e}); check the permissions of the file and its directory")
        }
        _ => e.to_string(),
    }
}

fn migrate(conn: &Connection) -> Result<(), String> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| explain_open_error(&e))?
        .try_into()
        .unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(format!(
            "it has schema version {version}, newer than this sunopoll knows ({}); upgrade sunopoll",
            MIGRATIONS.len()
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let step = format!(
            "BEGIN IMMEDIATE; {sql} PRAGMA user_version = {}; COMMIT;",
            i + 1
        );
        if let Err(e) = conn.execute_batch(&step) {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(format!(
                "migration to schema {} failed: {}",
                i + 1,
                explain_open_error(&e)
            ));
        }
    }
    Ok(())
}

/// The store thread: batches waiting jobs into one transaction each. Returns the
/// acknowledgement to send once the database is closed, if asked to close.
fn run_jobs(
    conn: &Connection,
    mut rx: mpsc::Receiver<Message>,
    health: &StoreHealth,
) -> Option<oneshot::Sender<()>> {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut closing = None;
    while closing.is_none() {
        match rx.blocking_recv() {
            None => break,
            Some(Message::Close(ack)) => closing = Some(ack),
            Some(Message::Job(job)) => batch.push(job),
        }
        while batch.len() < MAX_BATCH && closing.is_none() {
            match rx.try_recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Close(ack)) => closing = Some(ack),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            // No transaction: no job may run (in autocommit mode its writes would land one by
            // one, half of an apply_poll say, while its caller hears it failed).
            let e = StoreError::from(e);
            health.set(Some(&e));
            tracing::error!(error = %e, "store: cannot begin a transaction");
            for job in batch.drain(..) {
                let (_, done) = job(None);
                done(Err(&e));
            }
            continue;
        }
        let mut completions = Vec::with_capacity(batch.len());
        let changes_before = conn.total_changes();
        let mut fault = None;
        let mut lost = None;
        for job in batch.drain(..) {
            if lost.is_some() {
                let (_, done) = job(None);
                completions.push(done);
                continue;
            }
            let savepoint = conn.execute_batch("SAVEPOINT job");
            let (ok, done) = job(Some(conn));
            if let Err(Some(e)) = &ok {
                fault = Some(e.clone());
            }
            if conn.is_autocommit() {
                // SQLite rolled the whole transaction back by itself (it does after some I/O,
                // full-disk and out-of-memory errors): every job of the batch is undone, and
                // the rest must not run outside a transaction.
                let e = fault.clone().unwrap_or_else(|| {
                    StoreError::Fault("the transaction was rolled back".to_owned())
                });
                tracing::error!(error = %e, "store: the transaction was rolled back; failing the whole batch");
                lost = Some(e);
                completions.push(done);
                continue;
            }
            if savepoint.is_ok() {
                let end = if ok.is_ok() {
                    "RELEASE job"
                } else {
                    "ROLLBACK TO job; RELEASE job"
                };
                if let Err(e) = conn.execute_batch(end) {
                    tracing::error!(error = %e, "store: cannot close a savepoint");
                }
            }
            completions.push(done);
        }
        let commit = match lost {
            Some(e) => Err(e),
            None => conn.execute_batch("COMMIT").map_err(StoreError::from),
        };
        if let Err(e) = &commit {
            tracing::error!(error = %e, "store: the batch failed and was rolled back");
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
        match (&commit, fault) {
            (Err(e), _) => health.set(Some(e)),
            (Ok(()), Some(e)) => {
                tracing::error!(error = %e, "store: a request failed");
                health.set(Some(&e));
            }
            // Only a committed write proves the store works again.
            (Ok(()), None) if conn.total_changes() > changes_before => health.set(None),
            (Ok(()), None) => {}
        }
        for done in completions {
            done(commit.as_ref().map(|_| ()));
        }
    }
    closing
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::error_event;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("q.db")).expect("open");
        (dir, store)
    }

    fn update(state: TaskState, events: Vec<NewEvent>) -> TaskUpdate {
        TaskUpdate {
            state,
            last_status: Some("X".into()),
            last_error: None,
            failures: 0,
            rejections: 0,
            next_poll_at: 5000,
            events,
            routes: Vec::new(),
            submitted_callback_url: None,
            first_delivery_delay: 0,
            timed_out: false,
        }
    }

    #[tokio::test]
    async fn add_is_idempotent_and_reports_state() {
        let (_d, s) = open();
        let r = s
            .add(
                vec!["a".into(), "b".into()],
                None,
                Some("l".into()),
                1000,
                10,
            )
            .await
            .expect("add");
        assert_eq!(
            r.iter().map(|x| x.result).collect::<Vec<_>>(),
            [AddResult::Added, AddResult::Added]
        );
        let r = s
            .add(vec!["a".into()], None, Some("other".into()), 2000, 10)
            .await
            .expect("add");
        assert_eq!(r[0].result, AddResult::Exists);
        assert_eq!(r[0].state, TaskState::Active);
        let (view, _) = s.show("a".into()).await.expect("show").expect("known");
        assert_eq!(view.added_at, format_utc(1000));
        assert_eq!(
            view.label.as_deref(),
            Some("l"),
            "a known task is left as it was"
        );
        let c = s.counts().await.expect("counts");
        assert_eq!(c.active, 2);
    }

    #[tokio::test]
    async fn synchronous_full_and_wal_are_set() {
        let (dir, s) = open();
        let (sync, mode): (i64, String) = s
            .call(|c| {
                Ok((
                    c.query_row("PRAGMA synchronous", [], |r| r.get(0))?,
                    c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?,
                ))
            })
            .await
            .expect("pragmas");
        assert_eq!(sync, 2, "synchronous=FULL");
        assert_eq!(mode, "wal");
        drop(s);
        drop(dir);
    }

    #[tokio::test]
    async fn due_window_orders_by_next_poll() {
        let (_d, s) = open();
        s.add(vec!["late".into()], None, None, 3000, 10)
            .await
            .expect("add");
        s.add(vec!["early".into()], None, None, 1000, 10)
            .await
            .expect("add");
        let w = s.due_window(10).await.expect("due");
        assert_eq!(
            w.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["early", "late"]
        );
    }

    #[tokio::test]
    async fn apply_poll_writes_events_once_and_in_order() {
        let (_d, s) = open();
        s.add(vec!["t".into()], None, None, 1000, 10_000)
            .await
            .expect("add");
        let ev = error_event("t", 501, "failed");
        let applied = s
            .apply_poll("t".into(), 2000, move |row| {
                assert_eq!(row.state, TaskState::Active);
                update(TaskState::Failed, vec![ev])
            })
            .await
            .expect("apply")
            .expect("active");
        assert_eq!(applied.seqs, [1]);
        // A finished task is not touched again.
        let again = s
            .apply_poll("t".into(), 3000, |_| {
                update(TaskState::Failed, vec![error_event("t", 1, "x")])
            })
            .await
            .expect("apply");
        assert!(again.is_none());
        let (view, events) = s.show("t".into()).await.expect("show").expect("known");
        assert_eq!(view.state, TaskState::Failed);
        assert_eq!(view.stage, Some(Stage::Error));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].body.get(), error_event("t", 501, "failed").body);
    }

    #[tokio::test]
    async fn a_failing_job_undoes_only_itself() {
        let (_d, s) = open();
        s.add(vec!["t".into()], None, None, 1000, 10_000)
            .await
            .expect("add");
        let text = || NewEvent {
            stage: Stage::Text,
            code: 200,
            body: "{}".into(),
            tracks: 0,
            filled: false,
        };
        let t1 = text();
        s.apply_poll("t".into(), 2000, move |_| {
            update(TaskState::Active, vec![t1])
        })
        .await
        .expect("first text")
        .expect("active");
        // Storing `text` again must fail and leave the task as it was.
        let t2 = text();
        let e = s
            .apply_poll("t".into(), 3000, move |_| {
                update(TaskState::Active, vec![t2])
            })
            .await
            .expect_err("duplicate stage");
        assert!(e.to_string().contains("refusing"), "{e}");
        let (view, events) = s.show("t".into()).await.expect("show").expect("known");
        assert_eq!(view.polls, 1);
        assert_eq!(events.len(), 1);
    }

    #[tokio::test]
    async fn remove_and_readd() {
        let (_d, s) = open();
        s.add(vec!["t".into()], None, None, 1000, 10)
            .await
            .expect("add");
        assert_eq!(
            s.remove("t".into(), 2000).await.expect("rm"),
            Some(TaskState::Active)
        );
        assert_eq!(s.remove("nope".into(), 2000).await.expect("rm"), None);
        assert!(s.due_window(10).await.expect("due").is_empty());
        let r = s
            .add(vec!["t".into()], None, None, 3000, 10)
            .await
            .expect("add");
        assert_eq!(r[0].result, AddResult::Readded);
        assert_eq!(s.due_window(10).await.expect("due").len(), 1);
    }

    #[tokio::test]
    async fn gate_round_trips_and_prune_keeps_active_tasks() {
        let (_d, s) = open();
        let g = GateRow {
            kind: "throttled".into(),
            attempt: 3,
            paused_until: 99,
            since: 1,
            cause: "HTTP 200, code 430".into(),
        };
        s.save_gate(Some(g.clone())).await.expect("save");
        assert_eq!(s.load_gate().await.expect("load"), Some(g));
        s.save_gate(None).await.expect("clear");
        assert_eq!(s.load_gate().await.expect("load"), None);

        s.add(vec!["old".into(), "live".into()], None, None, 1000, 10_000)
            .await
            .expect("add");
        s.apply_poll("old".into(), 1500, |_| {
            update(TaskState::Failed, vec![error_event("old", 500, "x")])
        })
        .await
        .expect("apply");
        let p = s.prune(2000).await.expect("prune");
        assert_eq!(
            p,
            Pruned {
                tasks: 1,
                events: 1
            }
        );
        let c = s.counts().await.expect("counts");
        assert_eq!((c.active, c.failed, c.events, c.last_seq), (1, 0, 0, 1));
    }

    #[tokio::test]
    async fn nothing_runs_when_the_transaction_cannot_begin() {
        let (dir, s) = open();
        let holder = Connection::open(dir.path().join("q.db")).expect("open");
        holder.execute_batch("BEGIN EXCLUSIVE").expect("lock");
        // The store waits out its busy timeout, then must fail the add without running it:
        // in autocommit mode its INSERT would have landed while the caller heard "failed".
        let e = s
            .add(vec!["ghost".into()], None, None, 1000, 10)
            .await
            .expect_err("locked");
        assert!(matches!(e, StoreError::Fault(_)), "{e}");
        drop(holder);
        assert!(
            s.show("ghost".into()).await.expect("show").is_none(),
            "the failed add left nothing behind"
        );
        assert!(s.health().last_error().is_some());
    }

    #[tokio::test]
    async fn a_second_daemon_cannot_open_the_same_store() {
        let (dir, _s) = open();
        let e = Store::open(&dir.path().join("q.db")).expect_err("locked");
        assert!(e.to_string().contains("in use by another sunopoll"), "{e}");
    }

    #[tokio::test]
    async fn a_redelivery_requested_during_an_attempt_is_not_undone_by_that_attempt() {
        let (_d, s) = open();
        s.add(vec!["t".into()], None, None, 1000, 10_000)
            .await
            .expect("add");
        s.apply_poll("t".into(), 1000, |_| {
            let mut u = update(TaskState::Done, vec![error_event("t", 500, "x")]);
            u.routes = vec![Route {
                target: "app".into(),
                url: "http://127.0.0.1:9/cb".into(),
                stages: Stage::ALL.to_vec(),
            }];
            u
        })
        .await
        .expect("apply");
        // The forwarder takes the delivery and starts an attempt...
        let due = s
            .due_deliveries(Vec::new(), Vec::new(), 10)
            .await
            .expect("due");
        assert_eq!(due.len(), 1);
        // ...the operator asks for a replay while it is in flight...
        let n = s
            .redeliver(Replay::Task("t".into()), None, Vec::new(), 2000)
            .await
            .expect("redeliver");
        assert_eq!(n, 1);
        // ...and the attempt then ends. The replay must still happen.
        let attempt = AttemptRecord {
            started_at: 1500,
            duration_ms: 600,
            status: Some(200),
            error: None,
        };
        let applied = s
            .record_attempt(&due[0], attempt, DeliveryNext::Delivered)
            .await
            .expect("record");
        assert!(!applied, "the attempt is reported as superseded");
        let due = s
            .due_deliveries(Vec::new(), Vec::new(), 10)
            .await
            .expect("due");
        assert_eq!(due.len(), 1, "the requested replay was lost");
        let log = s.deliveries_of("t".into()).await.expect("deliveries");
        assert_eq!(log[0].1.state, "pending");
        assert_eq!(
            log[0].1.attempt_log.len(),
            1,
            "the attempt is still on record"
        );
    }

    #[test]
    fn garbage_files_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.db");
        let garbage = vec![0x5a_u8; 8192];
        std::fs::write(&path, &garbage).expect("write");
        let e = Store::open(&path).expect_err("garbage");
        assert!(e.to_string().contains("not a SQLite database"), "{e}");
        assert_eq!(std::fs::read(&path).expect("read"), garbage);
    }
}
