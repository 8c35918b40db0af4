//! The `archive_files` table: the files each finished task leaves behind, inserted with its
//! terminal event, fetched oldest first by the archive job, and read by `show` and `status`.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{Sql, deliveries};
use crate::events::Stage;
use crate::store::Kind;
use crate::store::{
    ArchiveCounts, ArchivedNotice, AssetFile, AssetSource, DueFile, Emitted, FileNext, FileRecord,
    FileState, StoreError,
};

/// Writes `task`'s files as pending, due at once. A file already known keeps its row.
pub(super) fn insert(conn: &Connection, task: &str, files: &[AssetFile], now: i64) -> Sql<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO archive_files (task_id, name, kind, audio_id, url, inline, state,
                                    next_try_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?7, ?7)
         ON CONFLICT (task_id, name) DO NOTHING",
    )?;
    for f in files {
        let (url, inline) = match &f.source {
            AssetSource::Url(u) => (Some(u.as_str()), None),
            AssetSource::Inline(t) => (None, Some(t.as_str())),
        };
        stmt.execute(params![task, f.name, f.kind, f.audio_id, url, inline, now])?;
    }
    Ok(())
}

const DUE_COLUMNS: &str = "id, task_id, name, kind, audio_id, url, inline, attempts, next_try_at, \
                           created_at, validator";

fn due_from_row(r: &Row<'_>) -> rusqlite::Result<DueFile> {
    Ok(DueFile {
        id: r.get(0)?,
        task_id: r.get(1)?,
        name: r.get(2)?,
        kind: r.get(3)?,
        audio_id: r.get(4)?,
        url: r.get(5)?,
        inline: r.get(6)?,
        attempts: r.get(7)?,
        next_try_at: r.get(8)?,
        created_at: r.get(9)?,
        validator: r.get(10)?,
    })
}

/// Due files, oldest task first (closest to the API deleting them), skipping `busy`; then the
/// one due soonest of those not yet due, so the loop knows when to look again.
pub(super) fn due(conn: &Connection, busy: &[i64], now: i64, limit: usize) -> Sql<Vec<DueFile>> {
    let busy = serde_json::to_string(busy).unwrap_or_else(|_| "[]".to_owned());
    let mut rows = conn
        .prepare_cached(&format!(
            "SELECT {DUE_COLUMNS} FROM archive_files INDEXED BY archive_oldest
             WHERE state = 'pending' AND next_try_at <= ?1
               AND id NOT IN (SELECT value FROM json_each(?2))
             ORDER BY created_at, id LIMIT ?3"
        ))?
        .query_map(
            params![now, busy, i64::try_from(limit).unwrap_or(i64::MAX)],
            due_from_row,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    let next = conn
        .prepare_cached(&format!(
            "SELECT {DUE_COLUMNS} FROM archive_files INDEXED BY archive_next
             WHERE state = 'pending' AND next_try_at > ?1 ORDER BY next_try_at LIMIT 1"
        ))?
        .query_map([now], due_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    rows.extend(next);
    Ok(rows)
}

/// Records one try's consequence.
pub(super) fn record(conn: &Connection, id: i64, next: &FileNext, now: i64) -> Sql<()> {
    match next {
        FileNext::Done { size, sha256 } => conn.execute(
            "UPDATE archive_files SET state = 'done', size = ?2, sha256 = ?3, attempts = attempts + 1,
                    last_error = NULL, done_at = ?4, updated_at = ?4 WHERE id = ?1",
            params![id, i64::try_from(*size).unwrap_or(i64::MAX), sha256, now],
        )?,
        FileNext::Retry { at, error } => conn.execute(
            "UPDATE archive_files SET attempts = attempts + 1, next_try_at = ?2, last_error = ?3,
                    updated_at = ?4 WHERE id = ?1 AND state = 'pending'",
            params![id, at, error, now],
        )?,
        FileNext::Failed { error } | FileNext::Expired { error } => {
            let state = if matches!(next, FileNext::Failed { .. }) {
                FileState::Failed
            } else {
                FileState::Expired
            };
            conn.execute(
                "UPDATE archive_files SET state = ?2, attempts = attempts + 1, last_error = ?3,
                        updated_at = ?4 WHERE id = ?1",
                params![id, state.as_str(), error, now],
            )?
        }
    };
    Ok(())
}

/// After file `id` was recorded kept: if every file of its task is now kept and the task has
/// no `archived` event yet, stores the one `notice` builds, with a delivery per route due at
/// `now`. A task already pruned has no events to join (they went with it): nothing is stored.
/// The event's UNIQUE (task_id, stage) makes it once per task, even after `archive redo`.
pub(super) fn notify(
    conn: &Connection,
    id: i64,
    notice: ArchivedNotice,
    now: i64,
) -> Sql<Option<Emitted>> {
    let Some(task) = conn
        .prepare_cached("SELECT task_id FROM archive_files WHERE id = ?1")?
        .query_row([id], |r| r.get::<_, String>(0))
        .optional()?
    else {
        return Ok(None);
    };
    let waiting: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM archive_files WHERE task_id = ?1 AND state <> 'done'",
        )?
        .query_row([&task], |r| r.get(0))?;
    let emitted: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM events WHERE task_id = ?1 AND stage = 'archived')",
        )?
        .query_row([&task], |r| r.get(0))?;
    if waiting > 0 || emitted {
        return Ok(None);
    }
    let Some(kind) = conn
        .prepare_cached("SELECT kind FROM tasks WHERE id = ?1")?
        .query_row([&task], |r| r.get::<_, Kind>(0))
        .optional()?
    else {
        return Ok(None);
    };
    let files = of_task(conn, &task)?;
    let note = notice(kind, &files);
    if note.routes.is_empty() {
        return Ok(None);
    }
    let inserted = conn
        .prepare_cached(
            "INSERT INTO events (task_id, stage, code, body, created_at, kind)
             VALUES (?1, ?2, 200, ?3, ?4, ?5) ON CONFLICT (task_id, stage) DO NOTHING",
        )?
        .execute(params![
            task,
            Stage::Archived.as_str(),
            note.body,
            now,
            kind
        ])?;
    if inserted != 1 {
        return Ok(None);
    }
    let seq = conn.last_insert_rowid();
    let mut targets = Vec::with_capacity(note.routes.len());
    for route in &note.routes {
        deliveries::insert(conn, seq, &task, Stage::Archived, route, now, now)?;
        deliveries::refresh_ready(conn, &task, &route.target)?;
        targets.push(route.target.clone());
    }
    Ok(Some(Emitted {
        seq,
        task_id: task,
        targets,
    }))
}

/// Remembers the validator of a file's first answer (`None` forgets it: a new download).
pub(super) fn save_validator(conn: &Connection, id: i64, validator: Option<&str>) -> Sql<()> {
    conn.prepare_cached("UPDATE archive_files SET validator = ?2 WHERE id = ?1")?
        .execute(params![id, validator])?;
    Ok(())
}

/// Every file of one task, in the order they were listed.
pub(super) fn of_task(conn: &Connection, task: &str) -> Sql<Vec<FileRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, kind, audio_id, url, state, size, sha256, attempts, last_error, created_at,
                done_at
         FROM archive_files WHERE task_id = ?1 ORDER BY id",
    )?;
    let rows = stmt
        .query_map([task], |r| {
            Ok((
                r.get::<_, String>(4)?,
                FileRecord {
                    name: r.get(0)?,
                    kind: r.get(1)?,
                    audio_id: r.get(2)?,
                    url: r.get(3)?,
                    state: FileState::Pending,
                    size: r.get::<_, Option<i64>>(5)?.map(|s| s.max(0).unsigned_abs()),
                    sha256: r.get(6)?,
                    attempts: r.get(7)?,
                    last_error: r.get(8)?,
                    created_at: r.get(9)?,
                    done_at: r.get(10)?,
                },
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(state, mut f)| {
            f.state = FileState::parse(&state).ok_or_else(|| {
                StoreError::Sqlite(format!("unknown archive file state {state:?}"))
            })?;
            Ok(f)
        })
        .collect()
}

/// Files per state and bytes, from the counts the triggers keep.
pub(super) fn counts(conn: &Connection) -> Sql<ArchiveCounts> {
    let mut c = ArchiveCounts::default();
    let mut stmt = conn.prepare_cached("SELECT state, n, bytes FROM archive_counts")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (state, n, bytes) = row?;
        match FileState::parse(&state) {
            Some(FileState::Pending) => c.pending = n,
            Some(FileState::Done) => {
                c.done = n;
                c.bytes = bytes;
            }
            Some(FileState::Failed) => c.failed = n,
            Some(FileState::Expired) => c.expired = n,
            None => {}
        }
    }
    Ok(c)
}

/// Puts `task`'s files named in `names` back to pending, due now, with fresh tries (their
/// `.part`, if any, is resumed). Returns how many.
pub(super) fn redo(conn: &Connection, task: &str, names: &[String], now: i64) -> Sql<usize> {
    let mut stmt = conn.prepare_cached(
        "UPDATE archive_files SET state = 'pending', size = NULL, sha256 = NULL, attempts = 0,
                next_try_at = ?3, last_error = NULL, done_at = NULL, updated_at = ?3
         WHERE task_id = ?1 AND name = ?2",
    )?;
    let mut n = 0;
    for name in names {
        n += stmt.execute(params![task, name, now])?;
    }
    Ok(n)
}
