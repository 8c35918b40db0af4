//! The `events` table: reading the event log, and its sequence high-water mark.

use rusqlite::{Connection, OptionalExtension, params};

use super::Sql;
use crate::events::Stage;
use crate::store::EventRecord;

/// Events with a sequence number above `since`, oldest first, optionally of one task.
pub(super) fn since(
    conn: &Connection,
    since: i64,
    task: Option<&str>,
    limit: Option<u32>,
) -> Sql<Vec<EventRecord>> {
    since_capped(conn, since, task, limit, usize::MAX)
}

/// [`since`], stopping once the bodies read hold `max_bytes` (at least one event is read).
/// Rows are read one by one, so the rest are never loaded.
pub(super) fn since_capped(
    conn: &Connection,
    since: i64,
    task: Option<&str>,
    limit: Option<u32>,
    max_bytes: usize,
) -> Sql<Vec<EventRecord>> {
    // Two statements, not `(?2 IS NULL OR task_id = ?2)`: SQLite plans a statement once, and
    // that form cannot use the (task_id, stage) index, so one task's events meant a scan of
    // every event.
    let mut stmt = match task {
        Some(_) => conn.prepare_cached(
            "SELECT seq, task_id, stage, code, created_at, body, kind FROM events
             WHERE task_id = ?2 AND seq > ?1 ORDER BY seq LIMIT ?3",
        )?,
        None => conn.prepare_cached(
            "SELECT seq, task_id, stage, code, created_at, body, kind FROM events
             WHERE seq > ?1 AND ?2 IS NULL ORDER BY seq LIMIT ?3",
        )?,
    };
    let mut rows = stmt.query(params![since, task, limit.map_or(-1, i64::from)])?;
    let (mut out, mut bytes) = (Vec::new(), 0usize);
    while bytes < max_bytes
        && let Some(r) = rows.next()?
    {
        let body: String = r.get(5)?;
        bytes = bytes.saturating_add(body.len());
        out.push(EventRecord {
            seq: r.get(0)?,
            task_id: r.get(1)?,
            stage: r.get(2)?,
            code: r.get(3)?,
            created_at: r.get(4)?,
            kind: r.get(6)?,
            body,
        });
    }
    Ok(out)
}

/// `(seq, task, stage)` of the events matching `filter`, oldest first.
pub(super) fn keys(
    conn: &Connection,
    filter: &str,
    p: impl rusqlite::Params,
) -> Sql<Vec<(i64, String, Stage)>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT seq, task_id, stage FROM events WHERE {filter} ORDER BY seq"
    ))?;
    let rows = stmt
        .query_map(p, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub(super) fn last_seq(conn: &Connection) -> Sql<i64> {
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
