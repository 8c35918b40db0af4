//! The `archive_files` table on PostgreSQL, as in SQLite (`sqlite::archive`): the files each
//! finished task leaves behind, claimed oldest first (with a lease, so two daemons never fetch
//! one file at once), and the `archived` notice stored once, with the last kept file.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::codec::{count, limit as as_limit};
use super::schema::DB_NOW;
use super::{Sql, deliveries, events, execute, query, query_one, query_opt};
use crate::events::Stage;
use crate::store::Kind;
use crate::store::{
    ArchiveCounts, ArchivedNotice, AssetFile, AssetSource, Claim, DueFile, Emitted, FileNext,
    FileRecord, FileState,
};

/// Writes `task`'s files as pending, due at once. A file already known keeps its row.
pub(super) async fn insert(
    c: &impl GenericClient,
    task: &str,
    files: &[AssetFile],
    now: i64,
) -> Sql<()> {
    for f in files {
        let (url, inline) = match &f.source {
            AssetSource::Url(u) => (Some(u.as_str()), None),
            AssetSource::Inline(t) => (None, Some(t.as_str())),
        };
        execute(
            c,
            "INSERT INTO archive_files (task_id, name, kind, audio_id, url, inline, state,
                                        next_try_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7, $7)
             ON CONFLICT (task_id, name) DO NOTHING",
            &[&task, &f.name, &f.kind, &f.audio_id, &url, &inline, &now],
        )
        .await?;
    }
    Ok(())
}

const DUE_COLUMNS: &str = "id, task_id, name, kind, audio_id, url, inline, attempts, next_try_at, \
                           created_at, validator";

fn due_from_row(r: &Row) -> Sql<DueFile> {
    Ok(DueFile {
        id: r.try_get(0)?,
        task_id: r.try_get(1)?,
        name: r.try_get(2)?,
        kind: r.try_get(3)?,
        audio_id: r.try_get(4)?,
        url: r.try_get(5)?,
        inline: r.try_get(6)?,
        attempts: count(r.try_get(7)?),
        next_try_at: r.try_get(8)?,
        created_at: r.try_get(9)?,
        validator: r.try_get(10)?,
    })
}

/// Due files, oldest task first (closest to the API deleting them), skipping `busy` and those
/// another daemon holds a live lease on, each now leased to `me`; then the one due soonest of
/// those not yet due, so the loop knows when to look again; and when the earliest live lease
/// another daemon holds on a pending file runs out ([`Claim::foreign_lease_ends_in`]): a
/// daemon fetching a file renews its lease while it does ([`renew`]), so a file whose lease
/// runs out was left by a daemon that stopped.
pub(super) async fn claim(
    c: &impl GenericClient,
    busy: &[i64],
    now: i64,
    limit: usize,
    me: &str,
    lease_ms: i64,
) -> Sql<Claim<DueFile>> {
    let sql = format!(
        "WITH due AS (
             SELECT id FROM archive_files
             WHERE state = 'pending' AND next_try_at <= $1 AND NOT (id = ANY($2))
               AND (claimed_by IS NULL OR claimed_by = $4 OR lease_until < {DB_NOW})
             ORDER BY created_at, id LIMIT $3
             FOR UPDATE SKIP LOCKED
         )
         UPDATE archive_files f SET claimed_by = $4, lease_until = {DB_NOW} + $5
         FROM due WHERE f.id = due.id
         RETURNING {}",
        DUE_COLUMNS
            .split(", ")
            .map(|col| format!("f.{col}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rows = query(c, &sql, &[&now, &busy, &as_limit(limit), &me, &lease_ms]).await?;
    let mut out = rows.iter().map(due_from_row).collect::<Sql<Vec<_>>>()?;
    // RETURNING keeps no order.
    out.sort_by_key(|f| (f.created_at, f.id));
    if let Some(next) = query_opt(
        c,
        &format!(
            "SELECT {DUE_COLUMNS} FROM archive_files
             WHERE state = 'pending' AND next_try_at > $1 ORDER BY next_try_at LIMIT 1"
        ),
        &[&now],
    )
    .await?
    {
        out.push(due_from_row(&next)?);
    }
    let held = query_one(
        c,
        &format!(
            "SELECT MIN(lease_until) - {DB_NOW} FROM archive_files
             WHERE claimed_by IS NOT NULL AND claimed_by <> $1 AND state = 'pending'
               AND lease_until >= {DB_NOW}"
        ),
        &[&me],
    )
    .await?
    .try_get(0)?;
    Ok(Claim {
        rows: out,
        foreign_lease_ends_in: held,
    })
}

/// Renews `me`'s lease on file `id` for another `lease_ms`, while its download runs. False if
/// the file is no longer `me`'s to fetch: this daemon was stopped past its lease and another
/// took the file over (or it was recorded meanwhile).
pub(super) async fn renew(c: &impl GenericClient, id: i64, me: &str, lease_ms: i64) -> Sql<bool> {
    Ok(execute(
        c,
        &format!(
            "UPDATE archive_files SET lease_until = {DB_NOW} + $3
             WHERE id = $1 AND claimed_by = $2 AND state = 'pending'"
        ),
        &[&id, &me, &lease_ms],
    )
    .await?
        == 1)
}

/// Records one try's consequence and releases the file's lease. False (nothing written) when
/// another daemon holds a live lease on the file: this daemon was stopped past its lease and
/// the file was taken over; that daemon's try decides.
pub(super) async fn record(
    c: &impl GenericClient,
    id: i64,
    next: &FileNext,
    now: i64,
    me: &str,
) -> Sql<bool> {
    let ours = format!("(claimed_by IS NULL OR claimed_by = $2 OR lease_until < {DB_NOW})");
    let written = match next {
        FileNext::Done { size, sha256 } => {
            execute(
                c,
                &format!(
                    "UPDATE archive_files SET state = 'done', size = $3, sha256 = $4,
                            attempts = attempts + 1, last_error = NULL, done_at = $5,
                            updated_at = $5, claimed_by = NULL, lease_until = NULL
                     WHERE id = $1 AND {ours}"
                ),
                &[
                    &id,
                    &me,
                    &i64::try_from(*size).unwrap_or(i64::MAX),
                    sha256,
                    &now,
                ],
            )
            .await?
        }
        FileNext::Retry { at, error } => {
            execute(
                c,
                &format!(
                    "UPDATE archive_files SET attempts = attempts + 1, next_try_at = $3,
                            last_error = $4, updated_at = $5, claimed_by = NULL, lease_until = NULL
                     WHERE id = $1 AND state = 'pending' AND {ours}"
                ),
                &[&id, &me, at, error, &now],
            )
            .await?
        }
        FileNext::Failed { error } | FileNext::Expired { error } => {
            let state = if matches!(next, FileNext::Failed { .. }) {
                FileState::Failed
            } else {
                FileState::Expired
            };
            execute(
                c,
                &format!(
                    "UPDATE archive_files SET state = $3, attempts = attempts + 1,
                            last_error = $4, updated_at = $5, claimed_by = NULL, lease_until = NULL
                     WHERE id = $1 AND {ours}"
                ),
                &[&id, &me, &state, error, &now],
            )
            .await?
        }
    };
    Ok(written == 1)
}

/// After file `id` was recorded kept: if every file of its task is now kept and the task has
/// no `archived` event yet, stores the one `notice` builds, with a delivery per route due at
/// `now`. The task's row is locked first, so two daemons keeping a task's last two files at
/// once store one notice between them. A task already pruned stores nothing.
pub(super) async fn notify(
    c: &impl GenericClient,
    id: i64,
    notice: ArchivedNotice,
    now: i64,
) -> Sql<Option<Emitted>> {
    let Some(task) = query_opt(c, "SELECT task_id FROM archive_files WHERE id = $1", &[&id])
        .await?
        .map(|r| r.try_get::<_, String>(0))
        .transpose()?
    else {
        return Ok(None);
    };
    let Some(kind) = query_opt(
        c,
        "SELECT kind FROM tasks WHERE id = $1 FOR UPDATE",
        &[&task],
    )
    .await?
    .map(|r| r.try_get::<_, Kind>(0))
    .transpose()?
    else {
        return Ok(None);
    };
    let waiting = query_opt(
        c,
        "SELECT 1 FROM archive_files WHERE task_id = $1 AND state <> 'done' LIMIT 1",
        &[&task],
    )
    .await?
    .is_some();
    if waiting {
        return Ok(None);
    }
    let files = of_task(c, &task).await?;
    let mut note = notice(kind, &files);
    let shared = deliveries::shared_routes(c, kind, Some(Stage::Archived), &note.routes).await?;
    note.routes.extend(shared);
    if note.routes.is_empty() {
        return Ok(None);
    }
    let Some(seq) = events::insert(c, &task, Stage::Archived, 200, &note.body, now, kind).await?
    else {
        return Ok(None);
    };
    let mut targets = Vec::with_capacity(note.routes.len());
    for route in &note.routes {
        deliveries::insert(c, seq, &task, Stage::Archived, route, now, now).await?;
        deliveries::refresh_ready(c, &task, &route.target).await?;
        targets.push(route.target.clone());
    }
    Ok(Some(Emitted {
        seq,
        task_id: task,
        targets,
    }))
}

/// Remembers the validator of a file's first answer (`None` forgets it: a new download).
pub(super) async fn save_validator(
    c: &impl GenericClient,
    id: i64,
    validator: Option<&str>,
) -> Sql<()> {
    execute(
        c,
        "UPDATE archive_files SET validator = $2 WHERE id = $1",
        &[&id, &validator],
    )
    .await?;
    Ok(())
}

/// Every file of one task, in the order they were listed.
pub(super) async fn of_task(c: &impl GenericClient, task: &str) -> Sql<Vec<FileRecord>> {
    query(
        c,
        "SELECT name, kind, audio_id, url, state, size, sha256, attempts, last_error, created_at,
                done_at
         FROM archive_files WHERE task_id = $1 ORDER BY id",
        &[&task],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(FileRecord {
            name: r.try_get(0)?,
            kind: r.try_get(1)?,
            audio_id: r.try_get(2)?,
            url: r.try_get(3)?,
            state: r.try_get(4)?,
            size: r
                .try_get::<_, Option<i64>>(5)?
                .map(|s| s.max(0).unsigned_abs()),
            sha256: r.try_get(6)?,
            attempts: count(r.try_get(7)?),
            last_error: r.try_get(8)?,
            created_at: r.try_get(9)?,
            done_at: r.try_get(10)?,
        })
    })
    .collect()
}

/// Files per state and bytes, from the counts the triggers keep.
pub(super) async fn counts(c: &impl GenericClient) -> Sql<ArchiveCounts> {
    let mut out = ArchiveCounts::default();
    for r in query(c, "SELECT state, n, bytes FROM archive_counts", &[]).await? {
        let (n, bytes): (i64, i64) = (r.try_get(1)?, r.try_get(2)?);
        match r.try_get::<_, FileState>(0)? {
            FileState::Pending => out.pending = n,
            FileState::Done => {
                out.done = n;
                out.bytes = bytes;
            }
            FileState::Failed => out.failed = n,
            FileState::Expired => out.expired = n,
        }
    }
    Ok(out)
}

/// Puts `task`'s files named in `names` back to pending, due now, with fresh tries. Returns
/// how many.
pub(super) async fn redo(
    c: &impl GenericClient,
    task: &str,
    names: &[String],
    now: i64,
) -> Sql<usize> {
    execute(
        c,
        "UPDATE archive_files SET state = 'pending', size = NULL, sha256 = NULL, attempts = 0,
                next_try_at = $3, last_error = NULL, done_at = NULL, updated_at = $3,
                claimed_by = NULL, lease_until = NULL
         WHERE task_id = $1 AND name = ANY($2)",
        &[&task, &names, &now],
    )
    .await
}
