//! `sunopoll store copy`: a stopped daemon's SQLite queue moved into a PostgreSQL database, in
//! one transaction, then checked table by table before it commits.
//!
//! Rows go by binary `COPY` (which writes identity columns as given, like `OVERRIDING SYSTEM
//! VALUE`), so every id, seq and task rowid stays what it was: webhook-ids, page cursors and
//! `events --since N` mean the same on the new store. Counts follow by the PostgreSQL triggers.

use std::time::Instant;

use rusqlite::types::ValueRef;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::{PgOptions, StoreError, connect, describe, schema};

/// A column's type on both sides.
#[derive(Clone, Copy)]
enum Ty {
    /// TEXT.
    Text,
    /// INTEGER / BIGINT.
    Int,
    /// REAL / DOUBLE PRECISION.
    Real,
    /// INTEGER 0/1 in SQLite, BOOLEAN in PostgreSQL.
    Bool,
}

impl Ty {
    fn pg(self) -> Type {
        match self {
            Ty::Text => Type::TEXT,
            Ty::Int => Type::INT8,
            Ty::Real => Type::FLOAT8,
            Ty::Bool => Type::BOOL,
        }
    }
}

/// One copied table: its name, the SQLite column it is ordered by, and its columns (the first
/// of a task's is SQLite's `rowid`, PostgreSQL's `rowid` identity).
struct Table {
    name: &'static str,
    order: &'static str,
    columns: &'static [(&'static str, Ty)],
}

use Ty::{Bool, Int, Real, Text};

/// Every table that holds a queue's state, parents before children.
const TABLES: &[Table] = &[
    Table {
        name: "tasks",
        order: "rowid",
        columns: &[
            ("rowid", Int),
            ("id", Text),
            ("state", Text),
            ("stage", Text),
            ("last_status", Text),
            ("last_error", Text),
            ("polls", Int),
            ("failures", Int),
            ("rejections", Int),
            ("added_at", Int),
            ("updated_at", Int),
            ("next_poll_at", Int),
            ("deadline_at", Int),
            ("finished_at", Int),
            ("callback_url", Text),
            ("label", Text),
            ("submitted_callback_url", Text),
            ("asked_ms", Int),
            ("asked_at", Int),
            ("asked_gap", Int),
            ("kind", Text),
            ("account", Text),
        ],
    },
    Table {
        name: "events",
        order: "seq",
        columns: &[
            ("seq", Int),
            ("task_id", Text),
            ("stage", Text),
            ("code", Int),
            ("body", Text),
            ("created_at", Int),
            ("kind", Text),
        ],
    },
    Table {
        name: "deliveries",
        order: "id",
        columns: &[
            ("id", Int),
            ("event_seq", Int),
            ("task_id", Text),
            ("target", Text),
            ("url", Text),
            ("origin", Text),
            ("webhook_id", Text),
            ("state", Text),
            ("attempts", Int),
            ("next_attempt_at", Int),
            ("last_attempt_at", Int),
            ("last_status", Int),
            ("last_error", Text),
            ("created_at", Int),
            ("delivered_at", Int),
            ("updated_at", Int),
            ("replays", Int),
            ("ready", Bool),
        ],
    },
    Table {
        name: "attempts",
        order: "id",
        columns: &[
            ("id", Int),
            ("delivery_id", Int),
            ("attempt", Int),
            ("started_at", Int),
            ("duration_ms", Int),
            ("status", Int),
            ("error", Text),
            ("outcome", Text),
        ],
    },
    Table {
        name: "accounts",
        order: "name",
        columns: &[
            ("name", Text),
            ("pause_kind", Text),
            ("attempt", Int),
            ("paused_until", Int),
            ("since", Int),
            ("cause", Text),
            ("learnt_rate", Real),
        ],
    },
    Table {
        name: "archive_files",
        order: "id",
        columns: &[
            ("id", Int),
            ("task_id", Text),
            ("name", Text),
            ("kind", Text),
            ("audio_id", Text),
            ("url", Text),
            ("inline", Text),
            ("state", Text),
            ("size", Int),
            ("sha256", Text),
            ("validator", Text),
            ("attempts", Int),
            ("next_try_at", Int),
            ("last_error", Text),
            ("created_at", Int),
            ("done_at", Int),
            ("updated_at", Int),
        ],
    },
];

/// The identity columns whose sequences must start past the copied rows.
const IDENTITIES: [(&str, &str); 4] = [
    ("tasks", "rowid"),
    ("deliveries", "id"),
    ("attempts", "id"),
    ("archive_files", "id"),
];

/// Each kept count and the recount it must equal (rows with nothing counted are left out: a
/// count may fall to zero and stay).
const KEPT_COUNTS: [(&str, &str, &str); 4] = [
    (
        "task_counts",
        "SELECT state, kind, account, n FROM task_counts WHERE n <> 0",
        "SELECT state, kind, account, COUNT(*) FROM tasks GROUP BY state, kind, account",
    ),
    (
        "event_counts",
        "SELECT stage, n FROM event_counts WHERE n <> 0",
        "SELECT stage, COUNT(*) FROM events GROUP BY stage",
    ),
    (
        "delivery_counts",
        "SELECT target, state, n FROM delivery_counts WHERE n <> 0",
        "SELECT target, state, COUNT(*) FROM deliveries GROUP BY target, state",
    ),
    (
        "archive_counts",
        "SELECT state, n, bytes FROM archive_counts WHERE n <> 0 OR bytes <> 0",
        "SELECT state, COUNT(*), COALESCE(SUM(size), 0)::BIGINT FROM archive_files GROUP BY state",
    ),
];

/// What one check of a copy found: a table's rows (or a kept value) on each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyCheck {
    /// The table (or `store_meta.last_seq`, or a kept count table checked against a recount).
    pub what: String,
    /// On the SQLite side (for a kept count: the number of rows the recount gives).
    pub sqlite: i64,
    /// On the PostgreSQL side (for a kept count: the number of its rows the recount agrees with).
    pub postgres: i64,
}

impl std::fmt::Display for CopyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} = {}", self.what, self.sqlite, self.postgres)
    }
}

/// A finished copy: every check (all equal) and how fast the rows went.
#[derive(Debug, Clone)]
pub struct CopyReport {
    /// One per table, then `store_meta.last_seq`, then the kept counts.
    pub checks: Vec<CopyCheck>,
    /// Rows copied, all tables together.
    pub rows: u64,
    /// Wall time from the first row read to the commit.
    pub elapsed: std::time::Duration,
}

/// Why a copy failed, with any mismatch found (the transaction was rolled back).
fn fail(what: String) -> StoreError {
    StoreError::Fault(what)
}

/// Copies everything `sqlite` holds into the (empty) database `options` names and verifies it;
/// see the module. Nothing is left in PostgreSQL unless every check passed.
pub(in crate::store) async fn from_sqlite(
    sqlite: &rusqlite::Connection,
    options: &PgOptions,
) -> Result<CopyReport, StoreError> {
    let shown = options.shown();
    let at = |what: String| fail(format!("store {shown}: {what}"));
    let pg = |e: tokio_postgres::Error| at(describe(&e));
    let lite = |e: rusqlite::Error| fail(format!("reading the SQLite store: {e}"));
    let pool = options
        .pool()
        .map_err(|e| StoreError::Open(format!("store {shown}: {e}")))?;
    let mut conn = pool
        .get()
        .await
        .map_err(|e| StoreError::Open(format!("store {shown}: {}", connect::describe_pool(&e))))?;
    schema::migrate(&mut conn)
        .await
        .map_err(|e| StoreError::Open(format!("store {shown}: {e}")))?;

    let started = Instant::now();
    let tx = conn.transaction().await.map_err(pg)?;
    // A daemon that starts on the target meanwhile waits for the commit instead of adding
    // tasks between the check below and the copy.
    tx.batch_execute(
        "SET LOCAL lock_timeout = '10s';
         LOCK TABLE tasks, events, deliveries, attempts, accounts, archive_files, store_meta
             IN SHARE ROW EXCLUSIVE MODE",
    )
    .await
    .map_err(pg)?;
    for table in ["tasks", "events", "deliveries", "archive_files"] {
        let held: bool = tx
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])
            .await
            .map_err(pg)?
            .get(0);
        if held {
            return Err(StoreError::Open(format!(
                "store {shown}: the target already holds {table}; store copy only fills an empty database (it never merges into a queue)"
            )));
        }
    }
    // An empty queue's accounts carry nothing worth keeping: the copied pause and rate win.
    tx.execute("DELETE FROM accounts", &[]).await.map_err(pg)?;

    let mut rows = 0u64;
    for table in TABLES {
        rows += copy_table(sqlite, &tx, table).await.map_err(|e| match e {
            CopyError::Sqlite(e) => lite(e),
            CopyError::Pg(e) => at(format!("copying {}: {}", table.name, describe(&e))),
            CopyError::Value(what) => fail(format!("reading the SQLite store: {what}")),
        })?;
    }

    let high_water: i64 = sqlite
        .query_row(
            "SELECT MAX(seq) FROM (SELECT seq FROM sqlite_sequence WHERE name = 'events' \
             UNION ALL SELECT MAX(seq) AS seq FROM events)",
            [],
            |r| r.get::<_, Option<i64>>(0),
        )
        .map_err(lite)?
        .unwrap_or(0);
    tx.execute(
        "UPDATE store_meta SET last_seq = $1 WHERE id = 1",
        &[&high_water],
    )
    .await
    .map_err(pg)?;
    for (table, column) in IDENTITIES {
        tx.batch_execute(&format!(
            "SELECT setval(pg_get_serial_sequence('{table}', '{column}'), \
             COALESCE(MAX({column}), 0) + 1, false) FROM {table}"
        ))
        .await
        .map_err(pg)?;
    }

    // The checks, inside the transaction: a mismatch rolls everything back.
    let mut checks = Vec::new();
    for table in TABLES {
        let count = format!("SELECT COUNT(*) FROM {}", table.name);
        let on_sqlite: i64 = sqlite.query_row(&count, [], |r| r.get(0)).map_err(lite)?;
        let on_pg: i64 = tx.query_one(&count, &[]).await.map_err(pg)?.get(0);
        checks.push(CopyCheck {
            what: table.name.to_owned(),
            sqlite: on_sqlite,
            postgres: on_pg,
        });
    }
    let last_seq: i64 = tx
        .query_one("SELECT last_seq FROM store_meta WHERE id = 1", &[])
        .await
        .map_err(pg)?
        .get(0);
    checks.push(CopyCheck {
        what: "store_meta.last_seq".to_owned(),
        sqlite: high_water,
        postgres: last_seq,
    });
    for (name, kept, recount) in KEPT_COUNTS {
        let row = tx
            .query_one(
                &format!(
                    "SELECT (SELECT COUNT(*) FROM ({recount}) r), \
                            (SELECT COUNT(*) FROM (({kept}) INTERSECT ({recount})) both_sides), \
                            (SELECT COUNT(*) FROM ({kept}) k)"
                ),
                &[],
            )
            .await
            .map_err(pg)?;
        let (recounted, agreed, kept_rows): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        // Every kept row agrees with the recount and none is missing: agreed = both sizes.
        checks.push(CopyCheck {
            what: format!("{name} (recount)"),
            sqlite: recounted,
            postgres: if kept_rows == recounted {
                agreed
            } else {
                kept_rows
            },
        });
    }
    if let Some(bad) = checks.iter().find(|c| c.sqlite != c.postgres) {
        let summary: Vec<String> = checks.iter().map(ToString::to_string).collect();
        return Err(fail(format!(
            "store {shown}: the copy does not match in {} ({bad}); nothing was committed [{}]",
            bad.what,
            summary.join("; ")
        )));
    }
    tx.commit().await.map_err(pg)?;
    Ok(CopyReport {
        checks,
        rows,
        elapsed: started.elapsed(),
    })
}

/// Why one table's copy stopped.
enum CopyError {
    Sqlite(rusqlite::Error),
    Pg(tokio_postgres::Error),
    Value(String),
}

/// Streams one table from SQLite into PostgreSQL with binary `COPY`, in SQLite's order; the
/// rows written.
async fn copy_table(
    sqlite: &rusqlite::Connection,
    tx: &tokio_postgres::Transaction<'_>,
    table: &Table,
) -> Result<u64, CopyError> {
    let names: Vec<&str> = table.columns.iter().map(|(n, _)| *n).collect();
    let types: Vec<Type> = table.columns.iter().map(|(_, t)| t.pg()).collect();
    let list = names.join(", ");
    let sink = tx
        .copy_in(&format!("COPY {} ({list}) FROM STDIN BINARY", table.name))
        .await
        .map_err(CopyError::Pg)?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    tokio::pin!(writer);
    let mut stmt = sqlite
        .prepare(&format!(
            "SELECT {list} FROM {} ORDER BY {}",
            table.name, table.order
        ))
        .map_err(CopyError::Sqlite)?;
    let mut found = stmt.query([]).map_err(CopyError::Sqlite)?;
    while let Some(row) = found.next().map_err(CopyError::Sqlite)? {
        let mut cells: Vec<Box<dyn ToSql + Sync + Send>> = Vec::with_capacity(names.len());
        for (i, (column, ty)) in table.columns.iter().enumerate() {
            let value = row.get_ref(i).map_err(CopyError::Sqlite)?;
            cells.push(cell(value, *ty).ok_or_else(|| {
                CopyError::Value(format!(
                    "{}.{column} holds {} where {} was expected",
                    table.name,
                    value.data_type(),
                    match ty {
                        Text => "text",
                        Int => "an integer",
                        Real => "a number",
                        Bool => "0 or 1",
                    }
                ))
            })?);
        }
        let refs: Vec<&(dyn ToSql + Sync)> = cells
            .iter()
            .map(|c| c.as_ref() as &(dyn ToSql + Sync))
            .collect();
        writer.as_mut().write(&refs).await.map_err(CopyError::Pg)?;
    }
    writer.finish().await.map_err(CopyError::Pg)
}

/// One SQLite value as the PostgreSQL column's type, or `None` if it is not one.
fn cell(value: ValueRef<'_>, ty: Ty) -> Option<Box<dyn ToSql + Sync + Send>> {
    Some(match (value, ty) {
        (ValueRef::Null, Text) => Box::new(None::<String>),
        (ValueRef::Null, Int) => Box::new(None::<i64>),
        (ValueRef::Null, Real) => Box::new(None::<f64>),
        (ValueRef::Null, Bool) => Box::new(None::<bool>),
        (ValueRef::Text(t), Text) => Box::new(String::from_utf8(t.to_vec()).ok()?),
        (ValueRef::Integer(n), Int) => Box::new(n),
        (ValueRef::Integer(n), Real) => Box::new(n as f64),
        (ValueRef::Real(x), Real) => Box::new(x),
        (ValueRef::Integer(n @ (0 | 1)), Bool) => Box::new(n == 1),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use crate::events::{NewEvent, Stage, error_event};
    use crate::store::Kind;
    use crate::store::{
        AssetFile, AssetSource, AttemptRecord, DeliveryNext, FileNext, GateRow, PauseKind,
        PgOptions, Route, Store, StoreError, TaskSpec, TaskState, TaskUpdate,
    };

    fn options(url: &str) -> PgOptions {
        PgOptions::new(url, None, Duration::from_secs(30), None).expect("options")
    }

    fn update(state: TaskState, events: Vec<NewEvent>) -> TaskUpdate {
        TaskUpdate {
            state,
            last_status: Some("X".into()),
            last_error: None,
            failures: 1,
            rejections: 0,
            next_poll_at: 5000,
            events,
            routes: vec![Route {
                target: "app".into(),
                url: "http://127.0.0.1:9/cb".into(),
                stages: Stage::ALL.to_vec(),
            }],
            submitted_callback_url: Some("http://127.0.0.1:9/sub".into()),
            first_delivery_delay: 0,
            timed_out: false,
            asked: crate::store::Asked {
                total_ms: 700,
                at: Some(1500),
                gap_ms: 50,
            },
            archive: Vec::new(),
        }
    }

    /// An event whose body has numbers spelt as no `f64` writer spells them, escapes and
    /// characters outside ASCII: the copy must keep its bytes.
    fn event(stage: Stage, id: &str) -> NewEvent {
        NewEvent {
            stage,
            code: 200,
            body: format!(
                r#"{{"task":"{id}","stage":"{stage:?}","n":[0.18229166666666666,1.50,-0,1e-7,18446744073709551616],"s":"é \u00e9 🎵"}}"#
            ),
            tracks: 2,
            filled: false,
        }
    }

    fn asset(name: &str) -> AssetFile {
        AssetFile {
            name: name.into(),
            kind: "audio".into(),
            audio_id: Some("a1".into()),
            source: AssetSource::Url(format!("https://files.example.com/{name}")),
        }
    }

    /// A SQLite queue with something of everything: tasks of several states, kinds and
    /// accounts, events, deliveries delivered / failed / pending with their attempts, a paused
    /// account with a learnt rate, archive files done and pending.
    async fn fill(store: &Store) {
        let spec = |kind: Kind, account: &str, label: Option<&str>| TaskSpec {
            kind,
            account: account.into(),
            callback_url: Some("http://127.0.0.1:9/task".into()),
            label: label.map(Into::into),
        };
        let ids = |p: &str, n: u32| (0..n).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
        store
            .add(
                ids("m", 6),
                spec(Kind::Music, "default", Some("l")),
                1000,
                60_000,
            )
            .await
            .expect("add");
        store
            .add(
                ids("y", 3),
                spec(Kind::Lyrics, "second", None),
                1100,
                60_000,
            )
            .await
            .expect("add");
        for (i, id) in ["m0", "m1", "m2"].into_iter().enumerate() {
            let name = id.to_owned();
            store
                .apply_poll(id.into(), 2000 + i as i64, move |_| {
                    let mut u = update(
                        TaskState::Done,
                        vec![
                            event(Stage::Text, &name),
                            event(Stage::First, &name),
                            event(Stage::Complete, &name),
                        ],
                    );
                    u.archive = vec![asset("a.mp3"), asset("b.mp3")];
                    u
                })
                .await
                .expect("apply")
                .expect("active");
        }
        store
            .apply_poll("m3".into(), 2100, |_| {
                update(TaskState::Failed, vec![error_event("m3", 501, "bad")])
            })
            .await
            .expect("apply");
        store
            .apply_poll("y0".into(), 2200, |_| {
                update(TaskState::Active, vec![event(Stage::Text, "y0")])
            })
            .await
            .expect("apply");
        store.remove("m4".into(), 2300).await.expect("remove");
        // Deliveries: one round delivered, one failed, the rest left pending.
        let due = store
            .due_deliveries(
                vec!["app".into(), "callback-url".into()],
                Vec::new(),
                Vec::new(),
                100,
            )
            .await
            .expect("due")
            .rows;
        assert!(due.len() >= 3, "deliveries were queued: {}", due.len());
        for (i, d) in due.iter().enumerate().take(4) {
            let attempt = AttemptRecord {
                started_at: 3000,
                duration_ms: 7,
                status: Some(if i % 2 == 0 { 204 } else { 500 }),
                error: (i % 2 == 1).then(|| "HTTP 500".to_owned()),
            };
            let next = if i % 2 == 0 {
                DeliveryNext::Delivered
            } else {
                DeliveryNext::Failed
            };
            store
                .record_attempt(d, attempt, next)
                .await
                .expect("record");
        }
        // Archive: some kept, the rest pending.
        let files = store
            .due_files(Vec::new(), 4000, 100)
            .await
            .expect("files")
            .rows;
        for f in files.iter().take(3) {
            store
                .record_file(
                    f.id,
                    FileNext::Done {
                        size: 1000 + f.id as u64,
                        sha256: format!("{:064}", f.id),
                    },
                    4000,
                    None,
                )
                .await
                .expect("record file");
        }
        store
            .save_gate(
                "second".into(),
                Some(GateRow {
                    kind: PauseKind::Throttled,
                    attempt: 2,
                    paused_until: 9000,
                    since: 3000,
                    cause: "HTTP 429".into(),
                }),
            )
            .await
            .expect("gate");
        store
            .save_learnt_rate("second".into(), Some(1.25))
            .await
            .expect("rate");
        store
            .save_learnt_rate("default".into(), Some(3.5))
            .await
            .expect("rate");
    }

    fn sqlite_store(dir: &Path) -> std::path::PathBuf {
        dir.join("q.db")
    }

    /// Everything an operator (or the daemon) reads of a queue, for comparing two stores.
    async fn everything(store: &Store) -> String {
        let mut out = String::new();
        let tasks = store.list(None, None).await.expect("list");
        out.push_str(&format!("list {tasks:?}\n"));
        for t in &tasks {
            let id = t.task_id.clone();
            out.push_str(&format!(
                "show {:?}\n",
                store.show(id.clone()).await.expect("show")
            ));
            out.push_str(&format!(
                "deliveries {:?}\n",
                store.deliveries_of(id.clone()).await.expect("deliveries")
            ));
            out.push_str(&format!(
                "files {:?}\n",
                store.files_of(id).await.expect("files")
            ));
        }
        out.push_str(&format!(
            "events {:?}\n",
            store.events(0, None, None).await.expect("events")
        ));
        out.push_str(&format!(
            "counts {:?}\n",
            store.counts().await.expect("counts")
        ));
        out.push_str(&format!(
            "breakdown {:?}\n",
            store.task_breakdown().await.expect("breakdown")
        ));
        out.push_str(&format!(
            "archive {:?}\n",
            store.archive_counts().await.expect("archive")
        ));
        out.push_str(&format!(
            "last_seq {:?}\n",
            store.last_seq().await.expect("seq")
        ));
        for account in ["default", "second"] {
            out.push_str(&format!(
                "account {account} {:?}\n",
                store.load_account(account.into()).await.expect("account")
            ));
        }
        out
    }

    #[tokio::test]
    async fn a_copied_queue_reads_the_same_on_postgresql() {
        let Some(cluster) = crate::testing::postgres() else {
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = sqlite_store(dir.path());
        let store = Store::open(&path).expect("open");
        fill(&store).await;
        // An event pruned away leaves the high-water mark above every stored seq.
        store.prune(2101).await.expect("prune");
        let before = everything(&store).await;
        let seq = store.last_seq().await.expect("seq");
        store.close().await;

        let url = cluster.database();
        let report = Store::copy_to_postgres(&path, &options(&url))
            .await
            .expect("copy");
        assert!(report.checks.iter().all(|c| c.sqlite == c.postgres));
        let tasks = report
            .checks
            .iter()
            .find(|c| c.what == "tasks")
            .expect("tasks");
        assert_eq!(tasks.sqlite, 8, "{:?}", report.checks);

        let pg = Store::open_postgres(&options(&url)).await.expect("open pg");
        let after = everything(&pg).await;
        assert_eq!(before, after);
        // Which includes every body, byte for byte.
        let bodies = pg.events(0, None, None).await.expect("events");
        assert!(
            bodies
                .iter()
                .any(|e| e.body.contains(r#""n":[0.18229166666666666,1.50,-0,1e-7,"#)),
            "{bodies:?}"
        );
        assert_eq!(pg.last_seq().await.expect("seq"), seq);
        // New rows continue past the copied ids instead of colliding with them.
        pg.add(
            vec!["new".into()],
            TaskSpec::music(None, None),
            9000,
            60_000,
        )
        .await
        .expect("add after copy");
        pg.apply_poll("new".into(), 9100, |_| {
            update(TaskState::Failed, vec![error_event("new", 500, "x")])
        })
        .await
        .expect("apply after copy");
        let newest = pg.list(None, Some(1)).await.expect("list");
        assert_eq!(newest[0].task_id, "new", "the new task sorts newest");
        let (_, events) = pg.show("new".into()).await.expect("show").expect("known");
        assert_eq!(events[0].seq, seq + 1);
        pg.close().await;
    }

    #[tokio::test]
    async fn a_target_holding_tasks_is_refused_and_left_as_it_was() {
        let Some(cluster) = crate::testing::postgres() else {
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = sqlite_store(dir.path());
        let store = Store::open(&path).expect("open");
        fill(&store).await;
        store.close().await;
        let url = cluster.database();
        let pg = Store::open_postgres(&options(&url)).await.expect("open pg");
        pg.add(vec!["live".into()], TaskSpec::music(None, None), 1, 60_000)
            .await
            .expect("add");
        let err = Store::copy_to_postgres(&path, &options(&url))
            .await
            .expect_err("a non-empty target");
        assert!(err.to_string().contains("already holds tasks"), "{err}");
        let tasks = pg.list(None, None).await.expect("list");
        assert_eq!(tasks.len(), 1, "nothing was merged");
        pg.close().await;
    }

    #[tokio::test]
    async fn a_store_in_use_by_a_daemon_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = sqlite_store(dir.path());
        let store = Store::open(&path).expect("open");
        // The lock is refused before any connection is tried: no database needed.
        let err = Store::copy_to_postgres(&path, &options("postgres://u@127.0.0.1:9/none"))
            .await
            .expect_err("locked");
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
        assert!(err.to_string().contains("stop that one first"), "{err}");
        store.close().await;
    }

    #[tokio::test]
    async fn a_missing_or_foreign_file_is_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("none.db");
        let err = Store::copy_to_postgres(&missing, &options("postgres://u@127.0.0.1:9/none"))
            .await
            .expect_err("missing");
        assert!(err.to_string().contains("cannot open it"), "{err}");
        assert!(!missing.exists(), "no empty store is left behind");
        let foreign = dir.path().join("other.db");
        rusqlite::Connection::open(&foreign)
            .and_then(|c| c.execute_batch("CREATE TABLE mine (x INTEGER)"))
            .expect("foreign db");
        let err = Store::copy_to_postgres(&foreign, &options("postgres://u@127.0.0.1:9/none"))
            .await
            .expect_err("foreign");
        assert!(err.to_string().contains("not a sunopoll store"), "{err}");
    }
}
