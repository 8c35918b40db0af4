//! The `tasks` table: adding, the due window, applying a poll (with its events and deliveries
//! in the same transaction), listing, removing, counting and pruning.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{Sql, archive, deliveries, events};
use crate::events::Stage;
use crate::store::Kind;
use crate::store::{
    AddResult, AddedTask, Applied, Asked, Counts, DueRow, Pruned, Schedule, StoreError, TaskCount,
    TaskRecord, TaskRow, TaskSpec, TaskState, TaskUpdate,
};

/// The IDs among `ids` tracked under a kind other than `kind`, with theirs.
fn other_kinds(conn: &Connection, ids: &[String], kind: Kind) -> Sql<Vec<AddedTask>> {
    let mut known = conn.prepare_cached("SELECT kind, state, stage FROM tasks WHERE id = ?1")?;
    let mut out = Vec::new();
    for id in ids {
        let row: Option<(Kind, TaskState, Option<Stage>)> = known
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if let Some((stored, state, stage)) = row
            && stored != kind
        {
            out.push(AddedTask {
                task_id: id.clone(),
                result: AddResult::OtherKind,
                kind: stored,
                state,
                stage,
            });
        }
    }
    Ok(out)
}

pub(super) fn add(
    conn: &Connection,
    ids: Vec<String>,
    spec: &TaskSpec,
    now: i64,
    deadline_after: i64,
) -> Sql<Vec<AddedTask>> {
    // One task is one (kind, ID): an ID known under another kind refuses the whole add before
    // anything is written, so a mistyped `--kind` never half-applies.
    let conflicts = other_kinds(conn, &ids, spec.kind)?;
    if !conflicts.is_empty() {
        return Ok(conflicts);
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO tasks (id, kind, account, state, added_at, updated_at, next_poll_at, deadline_at,
                            callback_url, label)
         VALUES (?1, ?6, ?7, 'active', ?2, ?2, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
    )?;
    let mut readd = conn.prepare_cached(
        "UPDATE tasks SET state = 'active', added_at = ?2, updated_at = ?2, next_poll_at = ?2,
                deadline_at = ?3, finished_at = NULL, failures = 0, rejections = 0, last_error = NULL,
                asked_ms = 0, asked_at = NULL, asked_gap = 0, account = ?6,
                callback_url = COALESCE(?4, callback_url), label = COALESCE(?5, label)
         WHERE id = ?1 AND state = 'removed'",
    )?;
    let mut known = conn.prepare_cached("SELECT state, stage FROM tasks WHERE id = ?1")?;
    let deadline = now.saturating_add(deadline_after);
    let (callback_url, label) = (&spec.callback_url, &spec.label);
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let (result, state, stage) = if insert.execute(params![
            id,
            now,
            deadline,
            callback_url,
            label,
            spec.kind,
            spec.account
        ])? == 1
        {
            (AddResult::Added, TaskState::Active, None)
        } else {
            let (state, stage): (TaskState, Option<Stage>) =
                known.query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))?;
            if readd.execute(params![
                id,
                now,
                deadline,
                callback_url,
                label,
                spec.account
            ])? == 1
            {
                (AddResult::Readded, TaskState::Active, stage)
            } else {
                (AddResult::Exists, state, stage)
            }
        };
        out.push(AddedTask {
            task_id: id,
            result,
            kind: spec.kind,
            state,
            stage,
        });
    }
    Ok(out)
}

pub(super) fn retrack(
    conn: &Connection,
    ids: Vec<String>,
    spec: &TaskSpec,
    now: i64,
    deadline_after: i64,
) -> Sql<Vec<AddedTask>> {
    let (callback_url, label) = (spec.callback_url.clone(), spec.label.clone());
    let mut out = add(conn, ids, spec, now, deadline_after)?;
    if out.iter().any(|t| t.result == AddResult::OtherKind) {
        return Ok(out);
    }
    let mut stages = conn.prepare_cached("SELECT stage FROM events WHERE task_id = ?1")?;
    let mut reopen = conn.prepare_cached(
        "UPDATE tasks SET state = 'active', stage = ?2, updated_at = ?3, next_poll_at = ?3,
                deadline_at = ?4, finished_at = NULL, failures = 0, rejections = 0, last_error = NULL,
                callback_url = COALESCE(?5, callback_url), label = COALESCE(?6, label)
         WHERE id = ?1 AND state IN ('failed', 'active')",
    )?;
    let deadline = now.saturating_add(deadline_after);
    // Removed tasks `add` has just made active again, and failed ones.
    for task in out.iter_mut().filter(|t| {
        t.result == AddResult::Readded
            || (t.result == AddResult::Exists && t.state == TaskState::Failed)
    }) {
        // An `error` is not a step on the way: a task polled again may still complete.
        let before_error = stages
            .query_map([&task.task_id], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .filter_map(|s| Stage::parse(s))
            .filter(|s| *s != Stage::Error)
            .max();
        if reopen.execute(params![
            task.task_id,
            before_error.map(Stage::as_str),
            now,
            deadline,
            callback_url,
            label
        ])? == 1
        {
            task.result = AddResult::Readded;
            task.state = TaskState::Active;
            task.stage = before_error;
        }
    }
    Ok(out)
}

pub(super) fn due_window(conn: &Connection, account: &str, limit: usize) -> Sql<Vec<DueRow>> {
    let mut stmt = conn.prepare_cached(
        // INDEXED BY pins the plan: walking tasks_account_due in order stops after `limit`
        // rows, where any other index would sort every active task first (14 ms at 100 000).
        "SELECT id, next_poll_at, kind FROM tasks INDEXED BY tasks_account_due
         WHERE state = 'active' AND account = ?2 ORDER BY next_poll_at LIMIT ?1",
    )?;
    let rows = stmt
        .query_map(
            params![i64::try_from(limit).unwrap_or(i64::MAX), account],
            |r| {
                Ok(DueRow {
                    id: r.get(0)?,
                    next_poll_at: r.get(1)?,
                    kind: r.get(2)?,
                })
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub(super) fn apply_poll<F>(
    conn: &Connection,
    id: &str,
    now: i64,
    decide: F,
) -> Sql<Option<Applied>>
where
    F: FnOnce(&TaskRow) -> TaskUpdate,
{
    let Some(before) = task_row(conn, id)? else {
        return Ok(None);
    };
    if before.state != TaskState::Active {
        return Ok(None);
    }
    let update = decide(&before);
    let mut stage = before.stage;
    let mut seqs = Vec::with_capacity(update.events.len());
    let mut insert = conn.prepare_cached(
        "INSERT INTO events (task_id, stage, code, body, created_at, kind)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (task_id, stage) DO NOTHING",
    )?;
    for ev in &update.events {
        if stage.is_some_and(|s| s >= ev.stage) {
            return Err(StoreError::Sqlite(format!(
                "refusing to store {} after {} for task {id}",
                ev.stage,
                stage.map_or("nothing", Stage::as_str)
            ))
            .into());
        }
        if insert.execute(params![
            id,
            ev.stage.as_str(),
            ev.code,
            ev.body,
            now,
            before.kind
        ])? != 1
        {
            // Only a task polled again (`retrack`) can reach a stage it has stored already:
            // its first `error`. That event stays the only one; the task's state still moves.
            stage = Some(ev.stage);
            continue;
        }
        let seq = conn.last_insert_rowid();
        seqs.push(seq);
        stage = Some(ev.stage);
        let due = now.saturating_add(update.first_delivery_delay);
        for route in update
            .routes
            .iter()
            .filter(|r| r.stages.contains(&ev.stage))
        {
            deliveries::insert(conn, seq, id, ev.stage, route, due, now)?;
        }
    }
    for route in &update.routes {
        deliveries::refresh_ready(conn, id, &route.target)?;
    }
    if !update.archive.is_empty() {
        archive::insert(conn, id, &update.archive, now)?;
    }
    let finished = (update.state != TaskState::Active).then_some(now);
    conn.prepare_cached(
        "UPDATE tasks SET state = ?2, stage = ?3, last_status = COALESCE(?4, last_status), last_error = ?5,
                polls = polls + 1, failures = ?6, rejections = ?7, updated_at = ?8, next_poll_at = ?9,
                finished_at = ?10, submitted_callback_url = COALESCE(?11, submitted_callback_url),
                asked_ms = ?12, asked_at = ?13, asked_gap = ?14
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
        update.asked.total_ms,
        update.asked.at,
        update.asked.gap_ms,
    ])?;
    Ok(Some(Applied {
        update,
        before,
        seqs,
    }))
}

const RECORD_COLUMNS: &str = "id, state, stage, last_status, last_error, polls, added_at, updated_at, next_poll_at, \
                              deadline_at, finished_at, callback_url, label, kind, account";

fn record_from_row(r: &Row<'_>) -> rusqlite::Result<TaskRecord> {
    Ok(TaskRecord {
        task_id: r.get(0)?,
        state: r.get(1)?,
        stage: r.get(2)?,
        last_status: r.get(3)?,
        last_error: r.get(4)?,
        polls: r.get(5)?,
        added_at: r.get(6)?,
        updated_at: r.get(7)?,
        next_poll_at: r.get(8)?,
        deadline_at: r.get(9)?,
        finished_at: r.get(10)?,
        callback_url: r.get(11)?,
        label: r.get(12)?,
        kind: r.get(13)?,
        account: r.get(14)?,
    })
}

/// The statement of `list`, for tasks in one state or all. Two statements, not `(?1 IS NULL
/// OR state = ?1)`: that form cannot use an index, so one state's newest tasks meant a scan of
/// every task. INDEXED BY pins the plan: `tasks_state` holds each state's rowids in order, so
/// the newest come first without a sort, where the planner might pick `tasks_due` for active
/// tasks and sort them all.
pub(super) fn list_sql(by_state: bool) -> String {
    if by_state {
        format!(
            "SELECT {RECORD_COLUMNS} FROM tasks INDEXED BY tasks_state WHERE state = ?1
             ORDER BY rowid DESC LIMIT ?2"
        )
    } else {
        format!("SELECT {RECORD_COLUMNS} FROM tasks ORDER BY rowid DESC LIMIT ?1")
    }
}

pub(super) fn list(
    conn: &Connection,
    state: Option<TaskState>,
    limit: Option<u32>,
) -> Sql<Vec<TaskRecord>> {
    let limit = limit.map_or(-1, i64::from);
    let mut stmt = conn.prepare_cached(&list_sql(state.is_some()))?;
    let rows = match state {
        Some(state) => stmt.query_map(params![state.as_str(), limit], record_from_row)?,
        None => stmt.query_map(params![limit], record_from_row)?,
    }
    .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The statement of `list_page`: as [`list_sql`], below a rowid. The rowid is the cursor:
/// it orders the listing already, and every index holds it.
fn list_page_sql(by_state: bool) -> String {
    if by_state {
        format!(
            "SELECT {RECORD_COLUMNS}, rowid AS page_cursor FROM tasks INDEXED BY tasks_state
             WHERE state = ?1 AND rowid < ?2 ORDER BY rowid DESC LIMIT ?3"
        )
    } else {
        format!(
            "SELECT {RECORD_COLUMNS}, rowid AS page_cursor FROM tasks WHERE rowid < ?1
             ORDER BY rowid DESC LIMIT ?2"
        )
    }
}

pub(super) fn list_page(
    conn: &Connection,
    state: Option<TaskState>,
    before: Option<i64>,
    limit: u32,
) -> Sql<(Vec<TaskRecord>, Option<i64>)> {
    let before = before.unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(&list_page_sql(state.is_some()))?;
    let with_cursor = |r: &Row<'_>| Ok((record_from_row(r)?, r.get::<_, i64>("page_cursor")?));
    let rows = match state {
        Some(state) => stmt.query_map(params![state.as_str(), before, limit], with_cursor)?,
        None => stmt.query_map(params![before, limit], with_cursor)?,
    }
    .collect::<Result<Vec<_>, _>>()?;
    let next = (rows.len() == limit as usize)
        .then(|| rows.last().map(|(_, cursor)| *cursor))
        .flatten();
    Ok((rows.into_iter().map(|(r, _)| r).collect(), next))
}

pub(super) fn record(conn: &Connection, id: &str) -> Sql<Option<TaskRecord>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {RECORD_COLUMNS} FROM tasks WHERE id = ?1"))?
        .query_row([id], record_from_row)
        .optional()?)
}

pub(super) fn task_row(conn: &Connection, id: &str) -> Sql<Option<TaskRow>> {
    Ok(conn
        .prepare_cached(
            "SELECT id, state, stage, last_status, failures, rejections, added_at, deadline_at,
                    callback_url, submitted_callback_url, asked_ms, asked_at, asked_gap, kind, account
             FROM tasks WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok(TaskRow {
                id: r.get(0)?,
                kind: r.get(13)?,
                account: r.get(14)?,
                state: r.get(1)?,
                stage: r.get(2)?,
                last_status: r.get(3)?,
                failures: r.get(4)?,
                rejections: r.get(5)?,
                added_at: r.get(6)?,
                deadline_at: r.get(7)?,
                callback_url: r.get(8)?,
                submitted_callback_url: r.get(9)?,
                asked: Asked {
                    total_ms: r.get(10)?,
                    at: r.get(11)?,
                    gap_ms: r.get(12)?,
                },
            })
        })
        .optional()?)
}

/// Both schedules live here so a step of the wall clock is corrected in one place; each is
/// one walk of its partial index.
pub(super) fn shift_due(conn: &Connection, schedule: Schedule, by_ms: i64) -> Sql<usize> {
    Ok(match schedule {
        Schedule::Polls(account) => conn
            .prepare_cached(
                "UPDATE tasks SET next_poll_at = next_poll_at + ?1
                 WHERE state = 'active' AND account = ?2",
            )?
            .execute(params![by_ms, account])?,
        Schedule::Deliveries => conn
            .prepare_cached(
                "UPDATE deliveries SET next_attempt_at = next_attempt_at + ?1 WHERE state = 'pending'",
            )?
            .execute([by_ms])?,
    })
}

pub(super) fn remove(conn: &Connection, id: &str, now: i64) -> Sql<Option<TaskState>> {
    let Some(row) = task_row(conn, id)? else {
        return Ok(None);
    };
    if row.state == TaskState::Active {
        conn.execute(
            "UPDATE tasks SET state = 'removed', updated_at = ?2, finished_at = ?2 WHERE id = ?1",
            params![id, now],
        )?;
    }
    Ok(Some(row.state))
}

pub(super) fn breakdown(conn: &Connection) -> Sql<Vec<TaskCount>> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, account, state, n FROM task_counts WHERE n <> 0 ORDER BY account, kind, state",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok(TaskCount {
                kind: r.get(0)?,
                account: r.get(1)?,
                state: r.get(2)?,
                n: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Tasks per state, summed over kinds and accounts.
pub(super) const TASK_COUNTS: &str = "SELECT state, SUM(n) FROM task_counts GROUP BY state";
/// Events stored.
pub(super) const EVENT_COUNT: &str = "SELECT COALESCE(SUM(n), 0) FROM event_counts";
/// Tasks being polled.
pub(super) const ACTIVE_COUNT: &str =
    "SELECT COALESCE(SUM(n), 0) FROM task_counts WHERE state = 'active'";

/// Read from the counts the schema's triggers keep, never by counting rows: `status` costs the
/// same with ten tasks or ten million.
pub(super) fn counts(conn: &Connection) -> Sql<Counts> {
    let mut c = Counts::default();
    let mut stmt = conn.prepare_cached(TASK_COUNTS)?;
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
    c.events = conn.query_row(EVENT_COUNT, [], |r| r.get(0))?;
    c.last_seq = events::last_seq(conn)?;
    Ok(c)
}

/// Tasks still being polled, from the kept counts.
pub(super) fn active_count(conn: &Connection) -> Sql<i64> {
    Ok(conn.query_row(ACTIVE_COUNT, [], |r| r.get(0))?)
}

/// Deletes up to `chunk` finished tasks older than `before`, with their events.
pub(super) fn prune_chunk(conn: &Connection, before: i64, chunk: usize) -> Sql<Pruned> {
    // A task whose events still wait for delivery is kept until they are delivered or given
    // up, whatever its age.
    let old = format!(
        "SELECT id FROM tasks WHERE state <> 'active' AND finished_at < ?1
         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.task_id = tasks.id AND d.state = 'pending')
         LIMIT {chunk}"
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
}
