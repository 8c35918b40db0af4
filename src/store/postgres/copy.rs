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
    let pool = options.pool().map_err(|e| StoreError::Open(format!("store {shown}: {e}")))?;
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
    tx.execute("UPDATE store_meta SET last_seq = $1 WHERE id = 1", &[&high_water])
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
            postgres: if kept_rows == recounted { agreed } else { kept_rows },
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
