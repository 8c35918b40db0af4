//! The SQLite backend: one database file, written by one thread (`thread`) and read through
//! a small pool of read-only connections (`reader`), its schema, migrations and lock file
//! (`schema`), and the SQL of each table family (`tasks`, `events`, `gate`, `deliveries`).
//! Nothing of rusqlite leaves this module: every write (and every read the daemon's own loops
//! decide on) runs inside a job on the store thread, what operators ask runs on the read path,
//! and errors become [`StoreError`]s here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::{
    AccountRow, AddedTask, Applied, ArchiveCounts, ArchivedNotice, AttemptRecord, Backend, Claim,
    Counts, DeliveryNext, DeliveryRecord, DueDelivery, DueFile, DueRow, Emitted, EventRecord,
    FileNext, FileRecord, GateRow, Pruned, QueueGauges, Replay, Route, Schedule, StoreError,
    StoreHealth, TargetSpec, TargetSummary, TaskCount, TaskRecord, TaskRow, TaskSpec, TaskState,
    TaskUpdate,
};

mod archive;
mod codec;
mod deliveries;
mod events;
mod gate;
mod gauges;
mod reader;
mod schema;
mod tasks;
mod thread;

use super::PRUNE_CHUNK;

/// Why a statement failed: what SQLite said, or the store's own refusal. Private, so rusqlite's
/// error type never appears in the store's interface.
#[derive(Debug)]
enum Error {
    Sqlite(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Sqlite(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl Error {
    /// Sorts SQLite's error into a refused request or a failing store.
    fn into_store(self) -> StoreError {
        use rusqlite::ErrorCode as C;
        match self {
            Error::Store(e) => e,
            Error::Sqlite(e) => match e.sqlite_error_code() {
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
            },
        }
    }
}

/// What every statement function returns.
type Sql<T> = Result<T, Error>;

/// A handle on the store thread. Cheap to clone; the thread stops when the last handle is gone.
#[derive(Clone)]
pub struct Sqlite {
    jobs: mpsc::Sender<thread::Message>,
    readers: Arc<reader::Readers>,
    path: Arc<PathBuf>,
    health: Arc<StoreHealth>,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite").field("path", &self.path).finish()
    }
}

impl Sqlite {
    /// Opens (creating if needed) the database at `path`, takes its lock, migrates the schema
    /// and starts the store thread. Blocking.
    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
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
        let file = schema::StoreFile::lock(path).map_err(|e| match e {
            schema::LockError::Held(what) => {
                StoreError::InUse(format!("store {}: {what}", path.display()))
            }
            schema::LockError::Failed(what) => open_err(what),
        })?;
        let conn = Connection::open(path).map_err(|e| open_err(format!("cannot open: {e}")))?;
        schema::set_busy_timeout(&conn).map_err(|e| open_err(schema::explain_open_error(&e)))?;
        // Before anything writes: another application's database is refused as it was found.
        schema::inspect(&conn).map_err(open_err)?;
        schema::configure(&conn).map_err(|e| open_err(schema::explain_open_error(&e)))?;
        schema::migrate(&conn).map_err(open_err)?;
        if file.created {
            // A queue that vanished (deleted file, wrong path, a new mount) would otherwise
            // start again empty without a word.
            tracing::warn!(
                store = %path.display(),
                "created a new, empty store; if tasks were queued before, this is not their store"
            );
        }
        let health = Arc::new(StoreHealth::default());
        let jobs = thread::spawn(conn, file, health.clone())
            .map_err(|e| open_err(format!("cannot start the store thread: {e}")))?;
        Ok(Sqlite {
            jobs,
            readers: Arc::new(reader::Readers::new(path.to_owned(), health.clone())),
            path: Arc::new(path.to_owned()),
            health,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the store thread inside the next transaction and returns its result once
    /// that transaction has committed. If `f` fails, its own writes are rolled back.
    async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Sql<T> + Send + 'static,
    {
        thread::call(&self.jobs, move |conn| f(conn).map_err(Error::into_store)).await
    }

    /// Runs `f` on the read path: a read-only connection and its own read transaction, never
    /// waiting for the store thread or its commits.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Sql<T> + Send + 'static,
    {
        self.readers.read(f).await
    }
}

/// A stopped daemon's store, opened for reading by `store copy`: its file lock is held (so no
/// daemon can start on it meanwhile) for as long as this lives.
pub(in crate::store) struct Locked {
    /// A connection on the store, at the current schema version. Declared first so it is
    /// closed first: the file below must stay open while SQLite holds locks (see `StoreFile`).
    pub(in crate::store) conn: Connection,
    /// Kept open only for its lock.
    _file: schema::StoreFile,
}

/// Opens the existing store at `path` for `store copy`: takes the daemon's lock on the file
/// (refusing while a daemon holds it), checks that it is a sunopoll store at the schema version
/// this build writes, and changes nothing in it.
pub(in crate::store) fn open_locked(path: &Path) -> Result<Locked, StoreError> {
    let open_err = |what: String| StoreError::Open(format!("store {}: {what}", path.display()));
    // The lock would create a missing file: a wrong path must not leave an empty store behind.
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() > 0 => {}
        Ok(m) if m.is_file() => return Err(open_err("the file is empty, not a store".to_owned())),
        Ok(_) => return Err(open_err("not a regular file".to_owned())),
        Err(e) => return Err(open_err(format!("cannot open it: {e}"))),
    }
    let file = schema::StoreFile::lock(path).map_err(|e| match e {
        schema::LockError::Held(what) => {
            StoreError::InUse(format!("store {}: {what}", path.display()))
        }
        schema::LockError::Failed(what) => open_err(what),
    })?;
    let conn = Connection::open(path).map_err(|e| open_err(format!("cannot open: {e}")))?;
    schema::set_busy_timeout(&conn).map_err(|e| open_err(schema::explain_open_error(&e)))?;
    schema::inspect(&conn).map_err(open_err)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| open_err(schema::explain_open_error(&e)))?;
    let current = i64::try_from(schema::MIGRATIONS.len()).unwrap_or(i64::MAX);
    if version != current {
        return Err(open_err(format!(
            "it has schema version {version}, this sunopoll copies version {current}; \
             start and stop this sunopoll's daemon on it once to migrate it"
        )));
    }
    Ok(Locked { conn, _file: file })
}

/// Pages copied per step of a backup: small steps let the daemon's commits go on between them.
const BACKUP_PAGES_PER_STEP: std::ffi::c_int = 256;

/// Copies the store at `from` into a new file `to` with SQLite's online backup API, safe while
/// a daemon runs on `from`: the copy is read on a read-only connection (WAL lets it read beside
/// the daemon's writer) and is one consistent snapshot, committed work only, restarted by SQLite
/// if a write lands mid-copy. `to` must not exist. Returns the number of tasks in the copy.
pub fn backup(from: &Path, to: &Path) -> Result<i64, StoreError> {
    use rusqlite::OpenFlags;
    let fail = |what: String| StoreError::Open(what);
    let source = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| fail(format!("store {}: cannot open it: {e}", from.display())))?;
    let refuse = |e: String| fail(format!("store {}: {e}", from.display()));
    schema::set_busy_timeout(&source).map_err(|e| refuse(schema::explain_open_error(&e)))?;
    schema::inspect(&source).map_err(refuse)?;
    // Created here, exclusively: an existing file (an older backup, the live store itself) is
    // never overwritten, even one appearing between a check and the copy.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => fail(format!(
                "{} already exists; refusing to overwrite it (choose a new file name)",
                to.display()
            )),
            _ => fail(format!("cannot create {}: {e}", to.display())),
        })?;
    let copied = (|| -> rusqlite::Result<i64> {
        let mut target = Connection::open(to)?;
        {
            let step = rusqlite::backup::Backup::new(&source, &mut target)?;
            step.run_to_completion(
                BACKUP_PAGES_PER_STEP,
                std::time::Duration::from_millis(5),
                None,
            )?;
        }
        let check: String = target.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "the copy failed its integrity check: {check}"
            )));
        }
        target.query_row("SELECT COALESCE(SUM(n), 0) FROM task_counts", [], |r| {
            r.get(0)
        })
    })();
    copied.map_err(|e| {
        // Half a backup is worse than none: it looks like one.
        let _ = std::fs::remove_file(to);
        fail(format!(
            "backing up {} to {} failed: {e}",
            from.display(),
            to.display()
        ))
    })
}

impl Backend for Sqlite {
    fn health(&self) -> &StoreHealth {
        &self.health
    }

    async fn close(&self) {
        // Readers first: the store thread's connection, closing last, checkpoints the WAL and
        // removes it, which it cannot while another connection is open.
        self.readers.close();
        thread::close(&self.jobs).await;
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        thread::probe(&self.jobs).await
    }

    async fn add(
        &self,
        ids: Vec<String>,
        spec: TaskSpec,
        now: i64,
        deadline_after: i64,
    ) -> Result<Vec<AddedTask>, StoreError> {
        self.call(move |c| tasks::add(c, ids, &spec, now, deadline_after))
            .await
    }

    async fn retrack(
        &self,
        ids: Vec<String>,
        spec: TaskSpec,
        now: i64,
        deadline_after: i64,
    ) -> Result<Vec<AddedTask>, StoreError> {
        self.call(move |c| tasks::retrack(c, ids, &spec, now, deadline_after))
            .await
    }

    async fn due_window(&self, account: String, limit: usize) -> Result<Claim<DueRow>, StoreError> {
        self.call(move |c| tasks::due_window(c, &account, limit))
            .await
            .map(Claim::alone)
    }

    async fn apply_poll<F>(
        &self,
        id: String,
        now: i64,
        decide: F,
    ) -> Result<Option<Applied>, StoreError>
    where
        F: FnOnce(&TaskRow) -> TaskUpdate + Send + 'static,
    {
        self.call(move |c| tasks::apply_poll(c, &id, now, decide))
            .await
    }

    async fn list(
        &self,
        state: Option<TaskState>,
        limit: Option<u32>,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        self.read(move |c| tasks::list(c, state, limit)).await
    }

    async fn list_page(
        &self,
        state: Option<TaskState>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<TaskRecord>, Option<i64>), StoreError> {
        self.read(move |c| tasks::list_page(c, state, before, limit))
            .await
    }

    async fn show(&self, id: String) -> Result<Option<(TaskRecord, Vec<EventRecord>)>, StoreError> {
        self.read(move |c| {
            let Some(task) = tasks::record(c, &id)? else {
                return Ok(None);
            };
            Ok(Some((task, events::since(c, 0, Some(&id), None)?)))
        })
        .await
    }

    async fn shift_due(&self, schedule: Schedule, by_ms: i64) -> Result<usize, StoreError> {
        self.call(move |c| tasks::shift_due(c, schedule, by_ms))
            .await
    }

    async fn remove(&self, id: String, now: i64) -> Result<Option<TaskState>, StoreError> {
        self.call(move |c| tasks::remove(c, &id, now)).await
    }

    async fn events(
        &self,
        since: i64,
        task: Option<String>,
        limit: Option<u32>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.read(move |c| events::since(c, since, task.as_deref(), limit))
            .await
    }

    async fn events_page(
        &self,
        since: i64,
        task: Option<String>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.read(move |c| events::since_capped(c, since, task.as_deref(), Some(limit), max_bytes))
            .await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.read(tasks::counts).await
    }

    async fn active_count(&self) -> Result<i64, StoreError> {
        self.read(tasks::active_count).await
    }

    async fn last_seq(&self) -> Result<i64, StoreError> {
        self.read(events::last_seq).await
    }

    async fn load_account(&self, account: String) -> Result<AccountRow, StoreError> {
        self.call(move |c| gate::load(c, &account)).await
    }

    async fn save_gate(&self, account: String, row: Option<GateRow>) -> Result<(), StoreError> {
        self.call(move |c| gate::save(c, &account, row)).await
    }

    async fn save_learnt_rate(&self, account: String, rate: Option<f64>) -> Result<(), StoreError> {
        self.call(move |c| gate::save_rate(c, &account, rate)).await
    }

    async fn claim_probe(&self, _account: String) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn task_breakdown(&self) -> Result<Vec<TaskCount>, StoreError> {
        self.read(tasks::breakdown).await
    }

    async fn prune(&self, before: i64) -> Result<Pruned, StoreError> {
        let mut total = Pruned::default();
        loop {
            let chunk = self
                .call(move |c| tasks::prune_chunk(c, before, PRUNE_CHUNK))
                .await?;
            total.tasks += chunk.tasks;
            total.events += chunk.events;
            if chunk.tasks < PRUNE_CHUNK {
                return Ok(total);
            }
        }
    }

    async fn due_deliveries(
        &self,
        targets: Vec<String>,
        busy: Vec<i64>,
        full: Vec<String>,
        limit: usize,
    ) -> Result<Claim<DueDelivery>, StoreError> {
        self.call(move |c| deliveries::due(c, &targets, &busy, &full, limit))
            .await
            .map(Claim::alone)
    }

    async fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: AttemptRecord,
        next: DeliveryNext,
    ) -> Result<bool, StoreError> {
        let delivery = deliveries::Attempted::of(delivery);
        self.call(move |c| deliveries::record_attempt(c, &delivery, &attempt, &next))
            .await
    }

    async fn fail_orphans(&self, known: Vec<TargetSpec>, now: i64) -> Result<usize, StoreError> {
        let names: Vec<String> = known.into_iter().map(|t| t.route.target).collect();
        self.call(move |c| deliveries::fail_orphans(c, &names, now))
            .await
    }

    async fn cancel_deliveries(&self, what: Replay, now: i64) -> Result<usize, StoreError> {
        self.call(move |c| deliveries::cancel(c, &what, now)).await
    }

    async fn redeliver(
        &self,
        what: Replay,
        target: Option<String>,
        routes: Vec<Route>,
        now: i64,
    ) -> Result<usize, StoreError> {
        self.call(move |c| deliveries::redeliver(c, &what, target.as_deref(), &routes, now))
            .await
    }

    async fn deliveries_of(&self, task: String) -> Result<Vec<(i64, DeliveryRecord)>, StoreError> {
        self.read(move |c| deliveries::of_task(c, &task)).await
    }

    async fn target_summary(&self) -> Result<Vec<TargetSummary>, StoreError> {
        self.read(deliveries::target_summary).await
    }

    async fn gauges(&self, now: i64) -> Result<QueueGauges, StoreError> {
        self.read(move |c| gauges::gauges(c, now)).await
    }

    async fn due_files(
        &self,
        busy: Vec<i64>,
        now: i64,
        limit: usize,
    ) -> Result<Claim<DueFile>, StoreError> {
        self.call(move |c| archive::due(c, &busy, now, limit))
            .await
            .map(Claim::alone)
    }

    async fn record_file(
        &self,
        id: i64,
        next: FileNext,
        now: i64,
        notice: Option<ArchivedNotice>,
    ) -> Result<Option<Emitted>, StoreError> {
        self.call(move |c| {
            archive::record(c, id, &next, now)?;
            match (notice, &next) {
                (Some(notice), FileNext::Done { .. }) => archive::notify(c, id, notice, now),
                _ => Ok(None),
            }
        })
        .await
    }

    async fn save_validator(&self, id: i64, validator: Option<String>) -> Result<(), StoreError> {
        self.call(move |c| archive::save_validator(c, id, validator.as_deref()))
            .await
    }

    async fn files_of(&self, task: String) -> Result<Vec<FileRecord>, StoreError> {
        self.read(move |c| archive::of_task(c, &task)).await
    }

    async fn archive_counts(&self) -> Result<ArchiveCounts, StoreError> {
        self.read(archive::counts).await
    }

    async fn redo_files(
        &self,
        task: String,
        names: Vec<String>,
        now: i64,
    ) -> Result<usize, StoreError> {
        self.call(move |c| archive::redo(c, &task, &names, now))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Sqlite) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Sqlite::open(&dir.path().join("q.db")).expect("open");
        (dir, store)
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
    async fn nothing_runs_when_the_transaction_cannot_begin() {
        let (dir, s) = open();
        let holder = Connection::open(dir.path().join("q.db")).expect("open");
        holder.execute_batch("BEGIN EXCLUSIVE").expect("lock");
        // The store waits out its busy timeout, then must fail the add without running it:
        // in autocommit mode its INSERT would have landed while the caller heard "failed".
        let e = s
            .add(
                vec!["ghost".into()],
                crate::store::TaskSpec::music(None, None),
                1000,
                10,
            )
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

    /// A store with tasks in every state and deliveries to two targets, for the plans.
    async fn filled() -> (tempfile::TempDir, Sqlite) {
        let (dir, s) = open();
        let ids: Vec<String> = (0..300).map(|i| format!("t{i}")).collect();
        s.add(
            ids,
            crate::store::TaskSpec::music(None, None),
            1000,
            1_000_000,
        )
        .await
        .expect("add");
        for i in 0..200 {
            let id = format!("t{i}");
            let name = id.clone();
            s.apply_poll(id, 2000, move |row| {
                let (state, ev) = if i % 2 == 0 {
                    (TaskState::Done, crate::events::error_event(&name, 500, "x"))
                } else {
                    (
                        TaskState::Failed,
                        crate::events::error_event(&name, 501, "y"),
                    )
                };
                TaskUpdate {
                    state,
                    last_status: Some("X".into()),
                    last_error: None,
                    failures: row.failures,
                    rejections: 0,
                    next_poll_at: 5000,
                    events: vec![ev],
                    routes: ["app", "other"]
                        .into_iter()
                        .map(|t| Route {
                            target: t.into(),
                            url: "http://127.0.0.1:9/cb".into(),
                            stages: crate::events::Stage::ALL.to_vec(),
                        })
                        .collect(),
                    submitted_callback_url: None,
                    first_delivery_delay: 0,
                    timed_out: false,
                    asked: crate::store::Asked::default(),
                    archive: Vec::new(),
                }
            })
            .await
            .expect("apply");
        }
        for i in 200..220 {
            s.remove(format!("t{i}"), 3000).await.expect("remove");
        }
        (dir, s)
    }

    /// What `EXPLAIN QUERY PLAN` says of `sql` (parameters unbound), one detail per line.
    async fn plan(s: &Sqlite, sql: String) -> String {
        s.read(move |c| {
            let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
            let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
            let details = stmt
                .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(details.join("\n"))
        })
        .await
        .expect("plan")
    }

    /// Nothing an operator asks grows with the queue: `status`'s counts and target summary and
    /// `list --state X` read kept counts and walk indexes, never scanning a big table or
    /// sorting it (a TEMP B-TREE). Checked without ANALYZE, as a daemon's store is.
    #[tokio::test]
    async fn operator_reads_never_scan_or_sort_the_queue() {
        let (_dir, s) = filled().await;
        let mut bounded = vec![
            ("list --state", tasks::list_sql(true)),
            ("task counts", tasks::TASK_COUNTS.to_owned()),
            ("event count", tasks::EVENT_COUNT.to_owned()),
            ("active count", tasks::ACTIVE_COUNT.to_owned()),
            ("delivery counts", deliveries::SUMMARY_COUNTS.to_owned()),
            ("last success", deliveries::LAST_SUCCESS.to_owned()),
            ("oldest pending", deliveries::OLDEST_PENDING.to_owned()),
            ("last error", deliveries::LAST_ERROR.to_owned()),
        ];
        for (what, sql) in bounded.drain(..) {
            let p = plan(&s, sql).await;
            for table in ["tasks", "events", "deliveries", "attempts"] {
                assert!(
                    !p.lines().any(|l| l.starts_with(&format!("SCAN {table}"))),
                    "{what} scans {table}:\n{p}"
                );
            }
            assert!(!p.contains("TEMP B-TREE"), "{what} sorts:\n{p}");
        }
        let p = plan(&s, tasks::list_sql(true)).await;
        assert!(p.contains("USING INDEX tasks_state (state=?)"), "{p}");
        // Not an operator read, but on every delivery's path: one queue, not one target's.
        let p = plan(&s, deliveries::REFRESH_READY.to_owned()).await;
        assert!(
            p.lines()
                .next()
                .is_some_and(|l| l.contains("deliveries_order (task_id=? AND target=?)")),
            "{p}"
        );
        // All tasks newest first: a walk from the end of the table that stops at the limit.
        let p = plan(&s, tasks::list_sql(false)).await;
        assert!(!p.contains("TEMP B-TREE"), "list sorts:\n{p}");
    }

    /// While another process holds the write lock, reads answer at once from the last commit,
    /// and the write probe fails quickly, naming the lock, and is remembered as unhealthy
    /// until a write succeeds.
    #[tokio::test]
    async fn reads_do_not_wait_behind_a_held_write_lock_and_the_probe_reports_it() {
        let (dir, s) = filled().await;
        let holder = Connection::open(dir.path().join("q.db")).expect("open");
        holder
            .execute_batch(
                "BEGIN IMMEDIATE;
                 INSERT INTO tasks (id, state, added_at, updated_at, next_poll_at, deadline_at)
                 VALUES ('uncommitted', 'active', 1, 1, 1, 1);",
            )
            .expect("take the write lock");
        let t = std::time::Instant::now();
        let counts = s.counts().await.expect("counts");
        assert_eq!(
            (counts.active, counts.done, counts.failed, counts.removed),
            (80, 100, 100, 20)
        );
        assert_eq!(counts.events, 200);
        let done = s
            .list(Some(TaskState::Done), Some(1000))
            .await
            .expect("list");
        assert_eq!(done.len(), 100);
        assert!(
            s.list(None, None)
                .await
                .expect("list")
                .iter()
                .all(|t| t.task_id != "uncommitted"),
            "reads see only what was committed"
        );
        assert!(s.show("t0".into()).await.expect("show").is_some());
        assert_eq!(s.events(0, None, Some(5)).await.expect("events").len(), 5);
        let summary = s.target_summary().await.expect("summary");
        assert_eq!(summary.len(), 2);
        assert!(
            summary
                .iter()
                .all(|t| t.pending == 200 && t.oldest_pending_at == Some(2000))
        );
        assert!(
            !s.deliveries_of("t0".into())
                .await
                .expect("deliveries")
                .is_empty()
        );
        let reads = t.elapsed();
        assert!(
            reads < std::time::Duration::from_secs(1),
            "reads waited {reads:?} behind the lock (the writer's busy timeout is 5 s)"
        );
        assert!(
            s.health().last_error().is_none(),
            "reads alone are no failure"
        );

        let t = std::time::Instant::now();
        let e = s.probe_write().await.expect_err("locked");
        let probed = t.elapsed();
        assert!(matches!(e, StoreError::Fault(_)), "{e}");
        assert!(e.to_string().contains("locked"), "{e}");
        assert!(
            probed < std::time::Duration::from_secs(1),
            "the probe waited {probed:?}"
        );
        assert!(
            s.health().last_error().is_some(),
            "the failure is remembered"
        );

        holder.execute_batch("ROLLBACK").expect("release");
        s.probe_write().await.expect("writable again");
        assert!(
            s.health().last_error().is_some(),
            "a probe writes nothing, so it proves too little to clear the failure"
        );
        s.add(
            vec!["after".into()],
            crate::store::TaskSpec::music(None, None),
            4000,
            10,
        )
        .await
        .expect("add");
        assert!(
            s.health().last_error().is_none(),
            "a committed write clears it"
        );
    }

    /// Closing releases the readers too: later reads fail as closed, and the last connection
    /// to close (the store thread's) takes the WAL with it.
    #[tokio::test]
    async fn close_ends_the_read_path() {
        let (dir, s) = filled().await;
        s.counts().await.expect("a reader is open");
        s.close().await;
        assert!(matches!(s.counts().await, Err(StoreError::Closed)));
        assert!(
            !dir.path().join("q.db-wal").exists(),
            "the WAL was checkpointed and removed"
        );
    }

    #[tokio::test]
    async fn a_second_daemon_cannot_open_the_same_store() {
        let (dir, _s) = open();
        let e = Sqlite::open(&dir.path().join("q.db")).expect_err("locked");
        assert!(e.to_string().contains("in use by another sunopoll"), "{e}");
    }

    #[test]
    fn garbage_files_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.db");
        let garbage = vec![0x5a_u8; 8192];
        std::fs::write(&path, &garbage).expect("write");
        let e = Sqlite::open(&path).expect_err("garbage");
        assert!(e.to_string().contains("not a SQLite database"), "{e}");
        assert_eq!(std::fs::read(&path).expect("read"), garbage);
    }

    #[tokio::test]
    async fn a_stored_value_this_build_does_not_know_fails_loudly() {
        let (dir, s) = open();
        s.add(
            vec!["t1".into()],
            crate::store::TaskSpec::music(None, None),
            1000,
            10,
        )
        .await
        .expect("add");
        s.save_gate(
            "default".into(),
            Some(GateRow {
                kind: crate::store::PauseKind::Throttled,
                attempt: 1,
                paused_until: 2000,
                since: 1000,
                cause: "HTTP 429".into(),
            }),
        )
        .await
        .expect("gate");
        // Another writer (a newer sunopoll, or damage) leaves spellings this build lacks.
        let other = Connection::open(dir.path().join("q.db")).expect("open");
        other
            .execute_batch(
                "PRAGMA ignore_check_constraints = ON;
                 UPDATE tasks SET state = 'sleeping' WHERE id = 't1';
                 UPDATE accounts SET pause_kind = 'bored';",
            )
            .expect("poke");
        drop(other);
        let e = s.show("t1".into()).await.expect_err("an unknown state");
        assert!(
            e.to_string().contains("unknown task state \"sleeping\""),
            "{e}"
        );
        let e = s
            .load_account("default".into())
            .await
            .expect_err("an unknown pause kind");
        assert!(
            e.to_string().contains("unknown pause kind \"bored\""),
            "{e}"
        );
        let e = s
            .add(
                vec!["t1".into()],
                crate::store::TaskSpec::music(None, None),
                1000,
                10,
            )
            .await
            .expect_err("add reads the known state back");
        assert!(e.to_string().contains("sleeping"), "{e}");
    }

    /// The second open must be refused as "in use", naming the store.
    fn assert_in_use(path: &Path) {
        match Sqlite::open(path) {
            Err(StoreError::InUse(m)) => {
                assert!(m.contains("in use by another sunopoll daemon"), "{m}");
                assert!(m.contains(&path.display().to_string()), "{m}");
            }
            Err(e) => panic!("expected InUse, got {e}"),
            Ok(_) => panic!("a second store on the same database file opened"),
        }
    }

    #[tokio::test]
    async fn the_lock_belongs_to_the_database_file_not_to_a_name() {
        let (dir, s) = open();
        let db = dir.path().join("q.db");
        // The same file under another name: a symlink, and a hard link.
        let symlink = dir.path().join("via-symlink.db");
        std::os::unix::fs::symlink(&db, &symlink).expect("symlink");
        assert_in_use(&symlink);
        let hard = dir.path().join("via-hard-link.db");
        std::fs::hard_link(&db, &hard).expect("hard link");
        assert_in_use(&hard);
        // An old-style lock file deleted, or never there: nothing a name can undo.
        let _ = std::fs::remove_file(dir.path().join("q.db.lock"));
        assert_in_use(&db);
        // The refused opens changed nothing for the daemon that holds it.
        s.add(
            vec!["still-mine".into()],
            crate::store::TaskSpec::music(None, None),
            1000,
            10,
        )
        .await
        .expect("the first store still writes");
        s.close().await;
        let again = Sqlite::open(&hard).expect("free once the first one closed");
        assert!(
            again
                .show("still-mine".into())
                .await
                .expect("show")
                .is_some(),
            "the same queue, through the hard link"
        );
    }

    #[tokio::test]
    async fn a_deleted_or_replaced_store_file_refuses_every_write() {
        let (dir, s) = open();
        let db = dir.path().join("q.db");
        s.add(
            vec!["before".into()],
            crate::store::TaskSpec::music(None, None),
            1000,
            10,
        )
        .await
        .expect("add");
        // Replaced: another file now has the store's name.
        std::fs::rename(&db, dir.path().join("moved.db")).expect("move away");
        std::fs::write(&db, b"").expect("a new file in its place");
        let e = s
            .add(
                vec!["lost".into()],
                crate::store::TaskSpec::music(None, None),
                1000,
                10,
            )
            .await
            .expect_err("refused");
        assert!(
            matches!(&e, StoreError::Fault(m) if m.contains("was replaced")),
            "{e}"
        );
        assert!(s.probe_write().await.is_err(), "the probe says so too");
        assert!(s.health().last_error().is_some());
        // Deleted.
        std::fs::remove_file(&db).expect("rm");
        std::fs::remove_file(dir.path().join("moved.db")).expect("rm");
        let e = s
            .add(
                vec!["lost".into()],
                crate::store::TaskSpec::music(None, None),
                1000,
                10,
            )
            .await
            .expect_err("refused");
        assert!(
            matches!(&e, StoreError::Fault(m) if m.contains("was deleted")),
            "{e}"
        );
        assert!(s.health().last_error().is_some());
    }

    #[tokio::test]
    async fn an_idle_store_notices_its_file_deleted_without_a_write() {
        let (dir, s) = open();
        assert!(s.health().last_error().is_none());
        std::fs::remove_file(dir.path().join("q.db")).expect("rm");
        // Nothing is asked of the store: its periodic check alone must find it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while s.health().last_error().is_none() {
            assert!(std::time::Instant::now() < deadline, "never noticed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let (_, e) = s.health().last_error().expect("set");
        assert!(e.contains("was deleted"), "{e}");
    }

    #[test]
    fn a_foreign_database_is_refused_in_one_line_before_anything_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("other-app.db");
        {
            let c = Connection::open(&path).expect("create");
            c.execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL); INSERT INTO invoices (total) VALUES (9.5);")
                .expect("fill");
        }
        let before = std::fs::read(&path).expect("read");
        let e = Sqlite::open(&path).expect_err("refused");
        let m = e.to_string();
        assert!(
            m.contains("not a sunopoll store") && m.contains("invoices"),
            "{m}"
        );
        assert!(m.contains(&path.display().to_string()), "{m}");
        assert_eq!(m.lines().count(), 1, "{m}");
        assert_eq!(std::fs::read(&path).expect("read"), before, "byte for byte");
        let c = Connection::open(&path).expect("open");
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, "delete", "never switched to WAL");
    }

    #[test]
    fn a_failing_migration_is_reported_in_one_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("half.db");
        {
            let c = Connection::open(&path).expect("create");
            // Schema 1, plus a table that migration 2 wants to create.
            c.execute_batch(schema::MIGRATIONS[0]).expect("schema 1");
            c.execute_batch("CREATE TABLE deliveries (x); PRAGMA user_version = 1;")
                .expect("in the way");
        }
        let m = Sqlite::open(&path).expect_err("refused").to_string();
        assert!(m.contains("migration to schema 2 failed"), "{m}");
        assert_eq!(m.lines().count(), 1, "{m}");
        assert!(!m.contains("CREATE"), "no SQL: {m}");
    }

    #[tokio::test]
    async fn migration_9_keeps_events_deliveries_and_the_seq_high_water_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("eight.db");
        {
            let c = Connection::open(&path).expect("create");
            c.execute_batch("PRAGMA foreign_keys = ON;").expect("fk");
            for sql in &schema::MIGRATIONS[..8] {
                c.execute_batch(sql).expect("schema 1..8");
            }
            // Two tasks with events and deliveries; the newest event (seq 3) pruned with its
            // task, so the high-water mark (3) is above every seq left (2).
            c.execute_batch(
                "PRAGMA user_version = 8;
                 INSERT INTO tasks (id, state, stage, added_at, updated_at, next_poll_at, deadline_at)
                   VALUES ('a', 'done', 'complete', 1, 1, 1, 9), ('b', 'done', 'error', 1, 1, 1, 9);
                 INSERT INTO events (task_id, stage, code, body, created_at, kind)
                   VALUES ('a', 'first', 200, '{\"x\":1}', 5, 'music'),
                          ('a', 'complete', 200, '{\"x\":2}', 6, 'wav'),
                          ('b', 'error', 500, '{\"x\":3}', 7, 'music');
                 INSERT INTO deliveries (event_seq, task_id, target, url, origin, webhook_id, state,
                                         next_attempt_at, created_at, updated_at, ready)
                   VALUES (1, 'a', 'app', 'http://h/', 'http://h:80', 'w1', 'delivered', 0, 5, 5, 0),
                          (2, 'a', 'app', 'http://h/', 'http://h:80', 'w2', 'pending', 0, 6, 6, 1),
                          (3, 'b', 'app', 'http://h/', 'http://h:80', 'w3', 'pending', 0, 7, 7, 1);
                 DELETE FROM tasks WHERE id = 'b';",
            )
            .expect("fill schema 8");
            let left: i64 = c
                .query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0))
                .expect("count");
            assert_eq!(left, 2, "pruning cascaded to the event and its delivery");
        }
        let s = Sqlite::open(&path).expect("migrates");
        let c = Connection::open(&path).expect("read");
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 9);
        let events: Vec<(i64, String, String, String)> = c
            .prepare("SELECT seq, stage, body, kind FROM events ORDER BY seq")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(
            events,
            [
                (1, "first".into(), r#"{"x":1}"#.into(), "music".into()),
                (2, "complete".into(), r#"{"x":2}"#.into(), "wav".into()),
            ]
        );
        let deliveries: Vec<(i64, String)> = c
            .prepare("SELECT event_seq, state FROM deliveries ORDER BY id")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(deliveries, [(1, "delivered".into()), (2, "pending".into())]);
        assert_eq!(s.last_seq().await.expect("seq"), 3, "the high-water mark");
        let stray: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_sequence WHERE name = 'events_new'",
                [],
                |r| r.get(0),
            )
            .expect("seq rows");
        assert_eq!(stray, 0, "no row left for the rebuilt table's old name");
        drop(c);
        // The rebuilt table takes 'archived', never reuses a pruned seq, keeps its counts, and
        // its foreign keys are on again: deleting a task still cascades.
        s.call(|c| {
            c.execute_batch(
                "INSERT INTO events (task_id, stage, code, body, created_at, kind)
                   VALUES ('a', 'archived', 0, '{}', 8, 'music');",
            )?;
            assert_eq!(c.last_insert_rowid(), 4, "seq 3 is never used again");
            let archived: i64 = c.query_row(
                "SELECT n FROM event_counts WHERE stage = 'archived'",
                [],
                |r| r.get(0),
            )?;
            assert_eq!(archived, 1, "the event_counts triggers were made again");
            let fk: i64 = c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
            assert_eq!(fk, 1, "foreign keys are on again after the rebuild");
            c.execute_batch("DELETE FROM tasks WHERE id = 'a'")?;
            let left: i64 = c.query_row("SELECT COUNT(*) FROM deliveries", [], |r| r.get(0))?;
            assert_eq!(left, 0, "the deliveries still refer to the rebuilt events");
            Ok(())
        })
        .await
        .expect("writes after the migration");
    }

    #[tokio::test]
    async fn a_backup_is_a_complete_store_and_never_overwrites() {
        let (dir, s) = open();
        s.add(
            vec!["a".into(), "b".into()],
            crate::store::TaskSpec::music(None, None),
            1000,
            10,
        )
        .await
        .expect("add");
        let to = dir.path().join("copy.db");
        // While the store is open and writing (WAL, nothing checkpointed yet).
        assert_eq!(backup(s.path(), &to).expect("backup"), 2);
        let e = backup(s.path(), &to).expect_err("exists");
        assert!(e.to_string().contains("already exists"), "{e}");
        let e = backup(s.path(), s.path()).expect_err("the store itself");
        assert!(e.to_string().contains("already exists"), "{e}");
        let copy = Sqlite::open(&to).expect("the copy opens as a store");
        assert!(copy.show("b".into()).await.expect("show").is_some());
    }
}
