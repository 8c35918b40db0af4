//! The SQLite backend: one database file, owned by one thread (`thread`), its schema,
//! migrations and lock file (`schema`), and the SQL of each table family (`tasks`, `events`,
//! `gate`, `deliveries`). Nothing of rusqlite leaves this module: every statement runs inside
//! a job on the store thread, and its errors become [`StoreError`]s here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::Connection;
use tokio::sync::mpsc;

use super::{
    AddedTask, Applied, AttemptRecord, Backend, Counts, DeliveryNext, DeliveryRecord, DueDelivery,
    DueRow, EventRecord, GateRow, Pruned, Replay, Route, Schedule, StoreError, StoreHealth,
    TargetSummary, TaskRecord, TaskRow, TaskState, TaskUpdate,
};

mod deliveries;
mod events;
mod gate;
mod schema;
mod tasks;
mod thread;

/// Tasks deleted per housekeeping transaction.
pub const PRUNE_CHUNK: usize = 500;

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
        let lock = schema::lock_store(path).map_err(open_err)?;
        let conn = Connection::open(path).map_err(|e| open_err(format!("cannot open: {e}")))?;
        schema::configure(&conn).map_err(|e| open_err(schema::explain_open_error(&e)))?;
        schema::migrate(&conn).map_err(open_err)?;
        let health = Arc::new(StoreHealth::default());
        let jobs = thread::spawn(conn, lock, health.clone())
            .map_err(|e| open_err(format!("cannot start the store thread: {e}")))?;
        Ok(Sqlite {
            jobs,
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
}

impl Backend for Sqlite {
    fn health(&self) -> &StoreHealth {
        &self.health
    }

    async fn close(&self) {
        thread::close(&self.jobs).await;
    }

    async fn add(
        &self,
        ids: Vec<String>,
        callback_url: Option<String>,
        label: Option<String>,
        now: i64,
        deadline_after: i64,
    ) -> Result<Vec<AddedTask>, StoreError> {
        self.call(move |c| tasks::add(c, ids, callback_url, label, now, deadline_after))
            .await
    }

    async fn due_window(&self, limit: usize) -> Result<Vec<DueRow>, StoreError> {
        self.call(move |c| tasks::due_window(c, limit)).await
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
        self.call(move |c| tasks::list(c, state, limit)).await
    }

    async fn show(&self, id: String) -> Result<Option<(TaskRecord, Vec<EventRecord>)>, StoreError> {
        self.call(move |c| {
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
        self.call(move |c| events::since(c, since, task.as_deref(), limit))
            .await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.call(tasks::counts).await
    }

    async fn active_count(&self) -> Result<i64, StoreError> {
        self.call(tasks::active_count).await
    }

    async fn last_seq(&self) -> Result<i64, StoreError> {
        self.call(events::last_seq).await
    }

    async fn load_gate(&self) -> Result<Option<GateRow>, StoreError> {
        self.call(gate::load).await
    }

    async fn save_gate(&self, row: Option<GateRow>) -> Result<(), StoreError> {
        self.call(move |c| gate::save(c, row)).await
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
        busy: Vec<i64>,
        full: Vec<String>,
        limit: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        self.call(move |c| deliveries::due(c, &busy, &full, limit))
            .await
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

    async fn fail_orphans(&self, known: Vec<String>, now: i64) -> Result<usize, StoreError> {
        self.call(move |c| deliveries::fail_orphans(c, &known, now))
            .await
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
        self.call(move |c| deliveries::of_task(c, &task)).await
    }

    async fn target_summary(&self) -> Result<Vec<TargetSummary>, StoreError> {
        self.call(deliveries::target_summary).await
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
}
