//! The PostgreSQL backend: one queue shared by any number of daemons on any number of hosts.
//!
//! Each operation is one transaction on a pooled connection (`deadpool-postgres` over
//! `tokio-postgres`); PostgreSQL's MVCC lets operators' reads run beside the writes without
//! waiting. What one daemon alone could take for granted is made explicit here:
//!
//! - **Work is claimed with a lease, never held forever.** `due_window`, `due_deliveries` and
//!   `due_files` take their rows with `FOR UPDATE SKIP LOCKED`, marking each `claimed_by` this
//!   daemon until `lease_until` (the database's clock); rows leased to another daemon are
//!   skipped, rows whose lease ran out are anyone's. The result of the work releases its row.
//!   A daemon that dies simply stops renewing: its rows are free after one lease, with no
//!   rescuer process. So one request per task is in flight across all daemons, and a stage is
//!   stored once (the task's row is locked while its poll is applied, and `UNIQUE (task_id,
//!   stage)` stands behind that).
//! - **Events commit in sequence order** (`store_meta`, see `schema`), so a follower on any
//!   daemon that reads `seq > N` never misses an event committed later.
//! - **Daemons beat.** Each keeps a row in `daemons` current ([`HEARTBEAT_EVERY`]); `status`
//!   lists the live ones and the leases each holds.
//!
//! Nothing of tokio-postgres leaves this module; errors become [`StoreError`]s here, and the
//! password never appears in one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use super::{
    AccountRow, AddedTask, Applied, ArchiveCounts, ArchivedNotice, AttemptRecord, Backend, Claim,
    Counts, DeliveryNext, DeliveryRecord, DueDelivery, DueFile, DueRow, Emitted, EventRecord,
    FileNext, FileRecord, GateRow, Pruned, QueueGauges, Replay, Route, Schedule, StoreError,
    StoreHealth, TargetSpec, TargetSummary, TaskCount, TaskRecord, TaskRow, TaskSpec, TaskState,
    TaskUpdate,
};

mod archive;
mod codec;
mod connect;
pub(super) mod copy;
mod daemons;
mod deliveries;
mod events;
mod gate;
mod gauges;
mod members;
mod notify;
mod schema;
mod tasks;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

pub use connect::PgOptions;
pub use copy::{CopyCheck, CopyReport};
pub use daemons::{DaemonRow, LeaseCount, SilentHolder};
pub use members::{ForgetReport, ForgottenTarget, forget_member};
pub use notify::Note;

/// How often a daemon renews its heartbeat row (and forgets daemons long gone).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Why a statement failed: what PostgreSQL (or the connection) said, or the store's own
/// refusal. Private, so tokio-postgres's error type never appears in the store's interface.
#[derive(Debug)]
enum Error {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Error::Pg(e)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e)
    }
}

impl Error {
    /// Sorts the error into a refused request (a constraint, a bad value: SQLSTATE classes 22
    /// and 23) or a failing store (everything else: the connection, the server, resources).
    fn into_store(self) -> StoreError {
        match self {
            Error::Store(e) => e,
            Error::Pg(e) => {
                let refused = e
                    .code()
                    .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"));
                if refused {
                    StoreError::Sqlite(describe(&e))
                } else {
                    StoreError::Fault(describe(&e))
                }
            }
        }
    }
}

/// One line saying what went wrong: the server's message and SQLSTATE when it sent one, else
/// the client's error and its cause (tokio-postgres's own text is often just "db error"); then,
/// for a refusal the daemon's settings can fix (TLS, pg_hba), what to change.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    let mut s = describe_error(e);
    if let Some(hint) = connect::refusal_hint(e) {
        s.push_str(" — ");
        s.push_str(hint);
    }
    s
}

fn describe_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!(
            "PostgreSQL: {} (SQLSTATE {})",
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            s.push_str(": ");
            s.push_str(detail);
        }
        return s;
    }
    let mut s = format!("PostgreSQL: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// What every statement function returns.
type Sql<T> = Result<T, Error>;

/// Runs `$body` (an expression that may `.await`, using `$c`) in one transaction on a pooled
/// connection and commits it; the outcome is recorded in the store's health and heard by the
/// commit observer, as the SQLite store thread does for its commits.
macro_rules! write_tx {
    ($pg:expr, |$c:ident| $body:expr) => {{
        let pg = $pg;
        let started = std::time::Instant::now();
        let result: Result<_, StoreError> = async {
            let mut conn = pg.conn().await?;
            let $c = conn
                .transaction()
                .await
                .map_err(|e| Error::from(e).into_store())?;
            let value = async { $body }.await.map_err(Error::into_store)?;
            $c.commit().await.map_err(|e| Error::from(e).into_store())?;
            Ok(value)
        }
        .await;
        pg.wrote(started, &result);
        result
    }};
}

/// Runs `$body`, which must be ONE statement, on a pooled connection outside an explicit
/// transaction (a statement is atomic on its own): two round trips fewer than [`write_tx`]
/// (no `BEGIN`, no `COMMIT`), for the claims every loop round makes. Recorded as `write_tx`
/// records its commits.
macro_rules! write_one {
    ($pg:expr, |$c:ident| $body:expr) => {{
        let pg = $pg;
        let started = std::time::Instant::now();
        let result: Result<_, StoreError> = async {
            let conn = pg.conn().await?;
            let $c = &conn;
            async { $body }.await.map_err(Error::into_store)
        }
        .await;
        pg.wrote(started, &result);
        result
    }};
}

/// Runs `$body` on a pooled connection outside any explicit transaction: an operator's read.
macro_rules! read {
    ($pg:expr, |$c:ident| $body:expr) => {{
        let pg = $pg;
        async {
            let conn = pg.conn().await?;
            let $c = &conn;
            async { $body }.await.map_err(Error::into_store)
        }
        .await
    }};
}

/// Prepares (once per connection) and runs a query.
async fn query(c: &impl GenericClient, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Sql<Vec<Row>> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query(&stmt, p).await?)
}

/// [`query`] for at most one row.
async fn query_opt(
    c: &impl GenericClient,
    sql: &str,
    p: &[&(dyn ToSql + Sync)],
) -> Sql<Option<Row>> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query_opt(&stmt, p).await?)
}

/// [`query`] for exactly one row.
async fn query_one(c: &impl GenericClient, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Sql<Row> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(c.query_one(&stmt, p).await?)
}

/// Prepares (once per connection) and runs a statement; the rows it changed.
async fn execute(c: &impl GenericClient, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Sql<usize> {
    let stmt = c.prepare_cached(sql).await?;
    Ok(usize::try_from(c.execute(&stmt, p).await?).unwrap_or(usize::MAX))
}

/// A handle on the shared queue. Cheap to clone.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    health: Arc<StoreHealth>,
    /// This daemon's name in `claimed_by` and `daemons`: host, process and a random part.
    me: Arc<str>,
    /// Who this daemon is among the queue's members across restarts: host and control socket
    /// (see [`PgOptions::member`]). The targets it registers are kept under this name.
    member: Arc<str>,
    /// How long a claim keeps other daemons off a row.
    lease_ms: i64,
    /// The database as people may see it (no password).
    shown: Arc<str>,
    closed: Arc<AtomicBool>,
    /// Stops the heartbeat and the listener.
    stop: CancellationToken,
    /// What the daemons sharing the queue say they committed (this one included).
    notes: tokio::sync::broadcast::Sender<Note>,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("database", &self.shown)
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Postgres {
    /// Connects to the database `options` names, migrates its schema (under an advisory lock,
    /// so daemons starting together do not race), registers this daemon in `daemons` and
    /// starts its heartbeat. Must run inside the tokio runtime.
    pub async fn open(options: &PgOptions) -> Result<Postgres, StoreError> {
        let shown: Arc<str> = options.shown().into();
        let open_err = {
            let shown = shown.clone();
            move |what: String| StoreError::Open(format!("store {shown}: {what}"))
        };
        let pool = options.pool().map_err(&open_err)?;
        {
            let mut conn = pool
                .get()
                .await
                .map_err(|e| open_err(connect::describe_pool(&e)))?;
            schema::migrate(&mut conn).await.map_err(&open_err)?;
        }
        let me: Arc<str> = daemons::my_name().into();
        let member: Arc<str> = match &options.member {
            Some(m) => format!("{}:{m}", daemons::host()).into(),
            None => me.clone(),
        };
        let pg = Postgres {
            pool,
            health: Arc::new(StoreHealth::default()),
            me,
            member,
            lease_ms: i64::try_from(options.lease.as_millis()).unwrap_or(i64::MAX),
            shown,
            closed: Arc::new(AtomicBool::new(false)),
            stop: CancellationToken::new(),
            notes: tokio::sync::broadcast::channel(256).0,
        };
        pg.beat()
            .await
            .map_err(|e| open_err(format!("cannot register this daemon: {e}")))?;
        tokio::spawn(daemons::heartbeat(pg.clone()));
        tokio::spawn(notify::listen(
            options.clone(),
            pg.notes.clone(),
            pg.stop.clone(),
        ));
        Ok(pg)
    }

    /// The database as people may see it: host and database name, never the password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// What the daemons sharing the queue commit from now on, as they say it.
    pub fn notes(&self) -> tokio::sync::broadcast::Receiver<Note> {
        self.notes.subscribe()
    }

    /// How long a claim keeps other daemons off a row, in ms.
    pub fn lease_ms(&self) -> i64 {
        self.lease_ms
    }

    /// This daemon's name, as `claimed_by` and `status` show it.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// A pooled connection, or why there is none.
    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Fault(connect::describe_pool(&e)))
    }

    /// Records a write's outcome in the health and tells the commit observer.
    fn wrote<T>(&self, started: std::time::Instant, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => self.health.set(None),
            Err(e @ StoreError::Fault(_)) => self.health.set(Some(e)),
            Err(_) => {}
        }
        self.health.committed(started.elapsed(), 1, result.is_ok());
    }

    /// Renews this daemon's heartbeat row: one statement, outside an explicit transaction.
    async fn beat(&self) -> Result<(), StoreError> {
        let (me, member, lease) = (self.me.clone(), self.member.clone(), self.lease_ms);
        write_one!(self, |c| daemons::beat(c, &me, &member, lease).await)
    }

    /// The daemons that beat within the last lease, with the leases each holds now.
    pub async fn daemons(&self) -> Result<Vec<DaemonRow>, StoreError> {
        let lease = self.lease_ms;
        read!(self, |c| daemons::live(c, lease).await)
    }

    /// The daemons that stopped beating while holding live leases, with what they hold and when
    /// it is free for the others.
    pub async fn silent_holders(&self) -> Result<Vec<SilentHolder>, StoreError> {
        let lease = self.lease_ms;
        read!(self, |c| daemons::silent(c, lease).await)
    }

    /// This daemon's member name (host and control socket), under which its targets are
    /// registered.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// Renews this daemon's lease on archive file `id` while its download runs; false if the
    /// file is no longer this daemon's (another took it over after this one stalled).
    pub async fn renew_file(&self, id: i64) -> Result<bool, StoreError> {
        let (me, lease) = (self.me.clone(), self.lease_ms);
        write_one!(self, |c| archive::renew(c, id, &me, lease).await)
    }

    /// Every registered target, by name, with the members that name it (sorted).
    pub async fn shared_targets(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        read!(self, |c| deliveries::registered(c).await)
    }
}

/// Tells every daemon that `account` has tasks to poll now, if `added` holds any.
async fn say_added(c: &impl GenericClient, added: &[AddedTask], account: &str) -> Sql<()> {
    use super::AddResult;
    if added
        .iter()
        .any(|t| matches!(t.result, AddResult::Added | AddResult::Readded))
    {
        notify::say(c, &Note::Tasks(account.to_owned())).await?;
    }
    Ok(())
}

impl Backend for Postgres {
    fn health(&self) -> &StoreHealth {
        &self.health
    }

    async fn close(&self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.stop.cancel();
        // Leave nothing leased to a daemon that is going: another daemon (or this one, when it
        // starts again) takes the work at once instead of after the lease.
        let me = self.me.clone();
        if let Err(e) = write_tx!(self, |c| daemons::leave(&c, &me).await) {
            tracing::warn!(problem = %e, "could not release this daemon's leases; other daemons take its work after the lease");
        }
        self.closed.store(true, Ordering::Release);
        self.pool.close();
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        let result = write_tx!(self, |c| daemons::probe(&c).await);
        if let Err(e) = &result {
            self.health.set(Some(e));
        }
        result
    }

    async fn add(
        &self,
        ids: Vec<String>,
        spec: TaskSpec,
        now: i64,
        deadline_after: i64,
    ) -> Result<Vec<AddedTask>, StoreError> {
        write_tx!(self, |c| {
            let added = tasks::add(&c, ids, &spec, now, deadline_after).await?;
            say_added(&c, &added, &spec.account).await?;
            Ok(added)
        })
    }

    async fn retrack(
        &self,
        ids: Vec<String>,
        spec: TaskSpec,
        now: i64,
        deadline_after: i64,
    ) -> Result<Vec<AddedTask>, StoreError> {
        write_tx!(self, |c| {
            let added = tasks::retrack(&c, ids, &spec, now, deadline_after).await?;
            say_added(&c, &added, &spec.account).await?;
            Ok(added)
        })
    }

    async fn due_window(&self, account: String, limit: usize) -> Result<Claim<DueRow>, StoreError> {
        let (me, lease) = (self.me.clone(), self.lease_ms);
        write_one!(self, |c| tasks::claim(c, &account, limit, &me, lease).await)
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
        // Each stored event has told the other daemons so (`events::insert`).
        let me = self.me.clone();
        write_tx!(self, |c| tasks::apply_poll(&c, &id, now, &me, decide).await)
    }

    async fn shift_due(&self, schedule: Schedule, by_ms: i64) -> Result<usize, StoreError> {
        write_tx!(self, |c| tasks::shift_due(&c, &schedule, by_ms).await)
    }

    async fn list(
        &self,
        state: Option<TaskState>,
        limit: Option<u32>,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        read!(self, |c| tasks::list(c, state, limit).await)
    }

    async fn list_page(
        &self,
        state: Option<TaskState>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<(Vec<TaskRecord>, Option<i64>), StoreError> {
        read!(self, |c| tasks::list_page(c, state, before, limit).await)
    }

    async fn show(&self, id: String) -> Result<Option<(TaskRecord, Vec<EventRecord>)>, StoreError> {
        read!(self, |c| {
            match tasks::record(c, &id).await? {
                None => Ok(None),
                Some(task) => Ok(Some((
                    task,
                    events::since(c, 0, Some(&id), None, usize::MAX).await?,
                ))),
            }
        })
    }

    async fn remove(&self, id: String, now: i64) -> Result<Option<TaskState>, StoreError> {
        write_tx!(self, |c| tasks::remove(&c, &id, now).await)
    }

    async fn events(
        &self,
        since: i64,
        task: Option<String>,
        limit: Option<u32>,
    ) -> Result<Vec<EventRecord>, StoreError> {
        read!(self, |c| events::since(
            c,
            since,
            task.as_deref(),
            limit,
            usize::MAX
        )
        .await)
    }

    async fn events_page(
        &self,
        since: i64,
        task: Option<String>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<EventRecord>, StoreError> {
        read!(self, |c| {
            events::since(c, since, task.as_deref(), Some(limit), max_bytes).await
        })
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        read!(self, |c| tasks::counts(c).await)
    }

    async fn active_count(&self) -> Result<i64, StoreError> {
        read!(self, |c| tasks::active_count(c).await)
    }

    async fn last_seq(&self) -> Result<i64, StoreError> {
        read!(self, |c| events::last_seq(c).await)
    }

    async fn load_account(&self, account: String) -> Result<AccountRow, StoreError> {
        read!(self, |c| gate::load(c, &account).await)
    }

    async fn save_learnt_rate(&self, account: String, rate: Option<f64>) -> Result<(), StoreError> {
        write_tx!(self, |c| gate::save_rate(&c, &account, rate).await)
    }

    async fn claim_probe(&self, account: String) -> Result<bool, StoreError> {
        let (me, lease) = (self.me.clone(), self.lease_ms);
        write_tx!(self, |c| gate::claim_probe(&c, &account, &me, lease).await)
    }

    async fn task_breakdown(&self) -> Result<Vec<TaskCount>, StoreError> {
        read!(self, |c| tasks::breakdown(c).await)
    }

    async fn save_gate(&self, account: String, gate: Option<GateRow>) -> Result<(), StoreError> {
        write_tx!(self, |c| gate::save(&c, &account, gate).await)
    }

    async fn prune(&self, before: i64) -> Result<Pruned, StoreError> {
        let mut total = Pruned::default();
        loop {
            let chunk = write_tx!(self, |c| tasks::prune_chunk(&c, before, super::PRUNE_CHUNK)
                .await)?;
            total.tasks += chunk.tasks;
            total.events += chunk.events;
            if chunk.tasks < super::PRUNE_CHUNK {
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
        let (me, lease) = (self.me.clone(), self.lease_ms);
        write_one!(self, |c| {
            deliveries::claim(c, &targets, &busy, &full, limit, &me, lease).await
        })
    }

    async fn record_attempt(
        &self,
        delivery: &DueDelivery,
        attempt: AttemptRecord,
        next: DeliveryNext,
    ) -> Result<bool, StoreError> {
        let (delivery, me) = (delivery.clone(), self.me.clone());
        write_tx!(self, |c| {
            deliveries::record_attempt(&c, &delivery, &attempt, &next, &me).await
        })
    }

    async fn fail_orphans(&self, known: Vec<TargetSpec>, now: i64) -> Result<usize, StoreError> {
        let member = self.member.clone();
        write_tx!(self, |c| {
            deliveries::fail_orphans(&c, &known, &member, now).await
        })
    }

    async fn cancel_deliveries(&self, what: Replay, now: i64) -> Result<usize, StoreError> {
        write_tx!(self, |c| deliveries::cancel(&c, &what, now).await)
    }

    async fn redeliver(
        &self,
        what: Replay,
        target: Option<String>,
        routes: Vec<Route>,
        now: i64,
    ) -> Result<usize, StoreError> {
        write_tx!(self, |c| {
            let n = deliveries::redeliver(&c, &what, target.as_deref(), &routes, now).await?;
            if n > 0 {
                notify::say(&c, &Note::Deliveries).await?;
            }
            Ok(n)
        })
    }

    async fn deliveries_of(&self, task: String) -> Result<Vec<(i64, DeliveryRecord)>, StoreError> {
        read!(self, |c| deliveries::of_task(c, &task).await)
    }

    async fn target_summary(&self) -> Result<Vec<TargetSummary>, StoreError> {
        read!(self, |c| deliveries::target_summary(c).await)
    }

    async fn gauges(&self, now: i64) -> Result<QueueGauges, StoreError> {
        read!(self, |c| gauges::gauges(c, now).await)
    }

    async fn due_files(
        &self,
        busy: Vec<i64>,
        now: i64,
        limit: usize,
    ) -> Result<Claim<DueFile>, StoreError> {
        // A download may take far longer than a lease: the daemon fetching a file renews its
        // lease while it does (`renew_file`), so a file is not fetched by two daemons at once,
        // and one a dead daemon held is free after one lease.
        let (me, lease) = (self.me.clone(), self.lease_ms);
        write_tx!(self, |c| archive::claim(&c, &busy, now, limit, &me, lease)
            .await)
    }

    async fn record_file(
        &self,
        id: i64,
        next: FileNext,
        now: i64,
        notice: Option<ArchivedNotice>,
    ) -> Result<Option<Emitted>, StoreError> {
        let me = self.me.clone();
        write_tx!(self, |c| {
            let written = archive::record(&c, id, &next, now, &me).await?;
            let emitted = match (notice, &next) {
                (Some(notice), FileNext::Done { .. }) if written => {
                    archive::notify(&c, id, notice, now).await?
                }
                _ => None,
            };
            // The event stored has told the other daemons so (`events::insert`).
            Ok(emitted)
        })
    }

    async fn save_validator(&self, id: i64, validator: Option<String>) -> Result<(), StoreError> {
        write_tx!(self, |c| archive::save_validator(
            &c,
            id,
            validator.as_deref()
        )
        .await)
    }

    async fn files_of(&self, task: String) -> Result<Vec<FileRecord>, StoreError> {
        read!(self, |c| archive::of_task(c, &task).await)
    }

    async fn archive_counts(&self) -> Result<ArchiveCounts, StoreError> {
        read!(self, |c| archive::counts(c).await)
    }

    async fn redo_files(
        &self,
        task: String,
        names: Vec<String>,
        now: i64,
    ) -> Result<usize, StoreError> {
        write_tx!(self, |c| {
            let n = archive::redo(&c, &task, &names, now).await?;
            if n > 0 {
                notify::say(&c, &Note::Files).await?;
            }
            Ok(n)
        })
    }
}
