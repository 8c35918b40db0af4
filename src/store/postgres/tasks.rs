//! The `tasks` table on PostgreSQL: adding, claiming the due window, applying a poll (with its
//! events, deliveries and archive files in the same transaction), listing, removing, counting
//! and pruning. The meaning of each statement is the SQLite store's (`sqlite::tasks`); what
//! differs is that several daemons run them at once, so rows are locked, not assumed alone.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::codec::{count, limit as as_limit};
use super::schema::DB_NOW;
use super::{Sql, archive, deliveries, events, execute, query, query_one, query_opt};
use crate::events::Stage;
use crate::store::Kind;
use crate::store::{
    AddResult, AddedTask, Applied, Asked, Claim, Counts, DueRow, Pruned, Schedule, StoreError,
    TaskCount, TaskRecord, TaskRow, TaskSpec, TaskState, TaskUpdate,
};

pub(super) async fn add(
    c: &impl GenericClient,
    mut ids: Vec<String>,
    spec: &TaskSpec,
    now: i64,
    deadline_after: i64,
) -> Sql<Vec<AddedTask>> {
    // Rows are locked in ID order whatever order the request gave, so two adds of
    // overlapping IDs on two daemons wait for each other instead of deadlocking.
    let order: Vec<String> = ids.clone();
    ids.sort();
    ids.dedup();
    // One task is one (kind, ID): an ID known under another kind refuses the whole add before
    // anything is written, so a mistyped `--kind` never half-applies.
    let known = query(
        c,
        "SELECT id, kind, state, stage FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&ids],
    )
    .await?;
    let mut conflicts = Vec::new();
    for r in &known {
        let stored: Kind = r.try_get(1)?;
        if stored != spec.kind {
            conflicts.push(AddedTask {
                task_id: r.try_get(0)?,
                result: AddResult::OtherKind,
                kind: stored,
                state: r.try_get(2)?,
                stage: r.try_get(3)?,
            });
        }
    }
    if !conflicts.is_empty() {
        conflicts.sort_by_key(|t| order.iter().position(|id| *id == t.task_id));
        return Ok(conflicts);
    }
    let deadline = now.saturating_add(deadline_after);
    // New IDs in one statement, in the order the request gave them (their `rowid`s, the listing
    // order, follow it): a batch of a thousand is one round trip, not a thousand.
    let mut fresh: Vec<&String> = Vec::with_capacity(order.len());
    let mut seen = std::collections::HashSet::with_capacity(order.len());
    for id in &order {
        if seen.insert(id) {
            fresh.push(id);
        }
    }
    let inserted: std::collections::HashSet<String> = query(
        c,
        "INSERT INTO tasks (id, kind, account, state, added_at, updated_at, next_poll_at,
                            deadline_at, callback_url, label)
         SELECT id, $2::TEXT, $3::TEXT, 'active', $4::BIGINT, $4, $4, $5::BIGINT, $6::TEXT, $7::TEXT
         FROM unnest($1::TEXT[]) WITH ORDINALITY AS given (id, n) ORDER BY n
         ON CONFLICT (id) DO NOTHING RETURNING id",
        &[
            &fresh,
            &spec.kind,
            &spec.account,
            &now,
            &deadline,
            &spec.callback_url,
            &spec.label,
        ],
    )
    .await?
    .iter()
    .map(|r| r.try_get(0))
    .collect::<Result<_, _>>()?;
    // The others were there already (or were added by another daemon meanwhile): removed ones
    // are tracked again, the rest stay as they are. One statement for all of them; its reading
    // part sees the rows as they were before its update.
    let existing: Vec<&String> = fresh
        .iter()
        .copied()
        .filter(|id| !inserted.contains(id.as_str()))
        .collect();
    let mut before: std::collections::HashMap<String, (TaskState, Option<Stage>, bool)> =
        std::collections::HashMap::with_capacity(existing.len());
    if !existing.is_empty() {
        let rows = query(
            c,
            "WITH readded AS (
                 UPDATE tasks SET state = 'active', added_at = $2, updated_at = $2,
                        next_poll_at = $2, deadline_at = $3, finished_at = NULL, failures = 0,
                        rejections = 0, last_error = NULL, asked_ms = 0, asked_at = NULL,
                        asked_gap = 0, account = $6, claimed_by = NULL, lease_until = NULL,
                        callback_url = COALESCE($4, callback_url), label = COALESCE($5, label)
                 WHERE id = ANY($1) AND state = 'removed'
                 RETURNING id
             )
             SELECT t.id, t.state, t.stage, readded.id IS NOT NULL
             FROM tasks t LEFT JOIN readded ON readded.id = t.id WHERE t.id = ANY($1)",
            &[
                &existing,
                &now,
                &deadline,
                &spec.callback_url,
                &spec.label,
                &spec.account,
            ],
        )
        .await?;
        for r in &rows {
            before.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?));
        }
    }
    // One answer per ID as the request gave them; an ID given twice is `Exists` (and active) the
    // second time, as if added one after the other.
    let mut answered = std::collections::HashSet::with_capacity(order.len());
    let mut out = Vec::with_capacity(order.len());
    for id in &order {
        let first = answered.insert(id);
        let (result, state, stage) = if inserted.contains(id) {
            let result = if first {
                AddResult::Added
            } else {
                AddResult::Exists
            };
            (result, TaskState::Active, None)
        } else {
            let (state, stage, readded) = before.get(id).cloned().ok_or_else(|| {
                StoreError::Fault(format!(
                    "task {id} was neither added nor found: it was removed from the store meanwhile"
                ))
            })?;
            match (readded, first) {
                (true, true) => (AddResult::Readded, TaskState::Active, stage),
                (true, false) => (AddResult::Exists, TaskState::Active, stage),
                (false, _) => (AddResult::Exists, state, stage),
            }
        };
        out.push(AddedTask {
            task_id: id.clone(),
            result,
            kind: spec.kind,
            state,
            stage,
        });
    }
    Ok(out)
}

pub(super) async fn retrack(
    c: &impl GenericClient,
    ids: Vec<String>,
    spec: &TaskSpec,
    now: i64,
    deadline_after: i64,
) -> Sql<Vec<AddedTask>> {
    let mut out = add(c, ids, spec, now, deadline_after).await?;
    if out.iter().any(|t| t.result == AddResult::OtherKind) {
        return Ok(out);
    }
    let deadline = now.saturating_add(deadline_after);
    // Removed tasks `add` has just made active again, and failed ones.
    for task in out.iter_mut().filter(|t| {
        t.result == AddResult::Readded
            || (t.result == AddResult::Exists && t.state == TaskState::Failed)
    }) {
        // An `error` is not a step on the way: a task polled again may still complete.
        let before_error = query(
            c,
            "SELECT stage FROM events WHERE task_id = $1",
            &[&task.task_id],
        )
        .await?
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .filter_map(|s| Stage::parse(s))
        .filter(|s| *s != Stage::Error)
        .max();
        let reopened = execute(
            c,
            "UPDATE tasks SET state = 'active', stage = $2, updated_at = $3, next_poll_at = $3,
                    deadline_at = $4, finished_at = NULL, failures = 0, rejections = 0,
                    last_error = NULL, claimed_by = NULL, lease_until = NULL,
                    callback_url = COALESCE($5, callback_url), label = COALESCE($6, label)
             WHERE id = $1 AND state IN ('failed', 'active')",
            &[
                &task.task_id,
                &before_error.map(Stage::as_str),
                &now,
                &deadline,
                &spec.callback_url,
                &spec.label,
            ],
        )
        .await?;
        if reopened == 1 {
            task.result = AddResult::Readded;
            task.state = TaskState::Active;
            task.stage = before_error;
        }
    }
    Ok(out)
}

/// The due window of `account`, claimed: the first `limit` active tasks by `next_poll_at`
/// that no other daemon holds a live lease on, each leased to `me` for `lease_ms` (the
/// database's clock). The poll loop claims its window every round, in-flight tasks included,
/// and so renews its own leases; a lease of this daemon's is only written again once a quarter
/// of it has passed ([`RENEW_AFTER`]), so that a round (one per finished poll) does not rewrite
/// every row of the window: a poll starts with at least three quarters of its lease left, more
/// than the request may take (the lease is at least twice the longest request). `SKIP LOCKED`
/// passes over rows another daemon is claiming or applying right now instead of waiting.
///
/// The same statement says when the earliest live lease another daemon holds on one of the
/// account's tasks runs out ([`Claim::foreign_lease_ends_in`]): tasks a daemon held when it
/// died are free then, and nothing else would wake this loop for them.
pub(super) async fn claim(
    c: &impl GenericClient,
    account: &str,
    limit: usize,
    me: &str,
    lease_ms: i64,
) -> Sql<Claim<DueRow>> {
    // The data-modifying part runs whether or not the query reads it. The last row, its `id`
    // NULL, carries the foreign lease's end (it reads the rows as they were before this claim,
    // which only takes rows whose lease has already ended).
    let sql = format!(
        "WITH due AS (
             SELECT id, next_poll_at, kind, claimed_by, lease_until FROM tasks
             WHERE state = 'active' AND account = $1
               AND (claimed_by IS NULL OR claimed_by = $3 OR lease_until < {DB_NOW})
             ORDER BY next_poll_at LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), leased AS (
             UPDATE tasks t SET claimed_by = $3, lease_until = {DB_NOW} + $4
             FROM due
             WHERE t.id = due.id
               AND (due.claimed_by IS DISTINCT FROM $3
                    OR due.lease_until < {DB_NOW} + $4 - $4 / {RENEW_AFTER})
         ), held AS (
             SELECT MIN(lease_until) - {DB_NOW} AS ends_in FROM tasks
             WHERE claimed_by IS NOT NULL AND claimed_by <> $3 AND state = 'active'
               AND account = $1 AND lease_until >= {DB_NOW}
         )
         SELECT id, next_poll_at, kind FROM due
         UNION ALL
         SELECT NULL, ends_in, NULL FROM held WHERE ends_in IS NOT NULL"
    );
    let rows = query(c, &sql, &[&account, &as_limit(limit), &me, &lease_ms]).await?;
    let mut claim = Claim::alone(Vec::with_capacity(rows.len()));
    for r in &rows {
        match r.try_get::<_, Option<String>>(0)? {
            Some(id) => claim.rows.push(DueRow {
                id,
                next_poll_at: r.try_get(1)?,
                kind: r.try_get(2)?,
            }),
            None => claim.foreign_lease_ends_in = r.try_get(1)?,
        }
    }
    // The locking subquery's rows come back in no promised order.
    claim
        .rows
        .sort_by(|a, b| (a.next_poll_at, &a.id).cmp(&(b.next_poll_at, &b.id)));
    Ok(claim)
}

/// A claim of this daemon's is renewed once this fraction (1/N) of its lease has passed.
const RENEW_AFTER: i64 = 4;

/// Applies one poll's result (see `Backend::apply_poll`). A daemon that was stopped (SIGSTOP, a
/// frozen VM) past its lease may come back with an old answer after another daemon took the task
/// over: while that one holds a live lease, the task is its to decide, and the old answer writes
/// nothing (`None`, as for a task no longer active) — it must neither free the task while the new
/// holder's request is in flight (a third daemon could send a second one) nor move its schedule.
/// Whatever the old answer said, the new holder's request finds out too. Otherwise the lease is
/// released only if it is `me`'s.
pub(super) async fn apply_poll<F>(
    c: &impl GenericClient,
    id: &str,
    now: i64,
    me: &str,
    decide: F,
) -> Sql<Option<Applied>>
where
    F: FnOnce(&TaskRow) -> TaskUpdate,
{
    // The row stays locked until the commit: a poll applied by another daemon meanwhile (after
    // its lease ran out) waits, then sees this one's stage.
    let Some((before, taken)) = task_row_for_poll(c, id, me).await? else {
        return Ok(None);
    };
    if before.state != TaskState::Active || taken {
        return Ok(None);
    }
    let mut update = decide(&before);
    if !update.events.is_empty() {
        // Targets other daemons registered are routed to as well: which daemon polled the task
        // must not decide where its events go.
        let shared = deliveries::shared_routes(c, before.kind, None, &update.routes).await?;
        update.routes.extend(shared);
    }
    let mut stage = before.stage;
    let mut seqs = Vec::with_capacity(update.events.len());
    for ev in &update.events {
        if stage.is_some_and(|s| s >= ev.stage) {
            return Err(StoreError::Sqlite(format!(
                "refusing to store {} after {} for task {id}",
                ev.stage,
                stage.map_or("nothing", Stage::as_str)
            ))
            .into());
        }
        let Some(seq) =
            events::insert(c, id, ev.stage, ev.code, &ev.body, now, before.kind).await?
        else {
            // Only a task polled again (`retrack`) can reach a stage it has stored already:
            // its first `error`. That event stays the only one; the task's state still moves.
            stage = Some(ev.stage);
            continue;
        };
        seqs.push(seq);
        stage = Some(ev.stage);
        let due = now.saturating_add(update.first_delivery_delay);
        for route in update
            .routes
            .iter()
            .filter(|r| r.stages.contains(&ev.stage))
        {
            deliveries::insert(c, seq, id, ev.stage, route, due, now).await?;
        }
    }
    for route in &update.routes {
        deliveries::refresh_ready(c, id, &route.target).await?;
    }
    if !update.archive.is_empty() {
        archive::insert(c, id, &update.archive, now).await?;
    }
    let finished = (update.state != TaskState::Active).then_some(now);
    execute(
        c,
        "UPDATE tasks SET state = $2, stage = $3, last_status = COALESCE($4, last_status),
                last_error = $5, polls = polls + 1, failures = $6, rejections = $7,
                updated_at = $8, next_poll_at = $9, finished_at = $10,
                submitted_callback_url = COALESCE($11, submitted_callback_url),
                asked_ms = $12, asked_at = $13, asked_gap = $14,
                lease_until = CASE WHEN claimed_by = $15 THEN NULL ELSE lease_until END,
                claimed_by = CASE WHEN claimed_by = $15 THEN NULL ELSE claimed_by END
         WHERE id = $1",
        &[
            &id,
            &update.state,
            &stage.map(Stage::as_str),
            &update.last_status,
            &update.last_error,
            &i64::from(update.failures),
            &i64::from(update.rejections),
            &now,
            &update.next_poll_at,
            &finished,
            &update.submitted_callback_url,
            &update.asked.total_ms,
            &update.asked.at,
            &update.asked.gap_ms,
            &me,
        ],
    )
    .await?;
    Ok(Some(Applied {
        update,
        before,
        seqs,
    }))
}

const RECORD_COLUMNS: &str = "id, state, stage, last_status, last_error, polls, added_at, updated_at, next_poll_at, \
                              deadline_at, finished_at, callback_url, label, kind, account";

fn record_from_row(r: &Row) -> Sql<TaskRecord> {
    Ok(TaskRecord {
        task_id: r.try_get(0)?,
        state: r.try_get(1)?,
        stage: r.try_get(2)?,
        last_status: r.try_get(3)?,
        last_error: r.try_get(4)?,
        polls: r.try_get(5)?,
        added_at: r.try_get(6)?,
        updated_at: r.try_get(7)?,
        next_poll_at: r.try_get(8)?,
        deadline_at: r.try_get(9)?,
        finished_at: r.try_get(10)?,
        callback_url: r.try_get(11)?,
        label: r.try_get(12)?,
        kind: r.try_get(13)?,
        account: r.try_get(14)?,
    })
}

pub(super) async fn list(
    c: &impl GenericClient,
    state: Option<TaskState>,
    limit: Option<u32>,
) -> Sql<Vec<TaskRecord>> {
    let limit = limit.map(i64::from);
    let rows = match state {
        Some(state) => query(
            c,
            &format!(
                "SELECT {RECORD_COLUMNS} FROM tasks WHERE state = $1 ORDER BY rowid DESC LIMIT $2"
            ),
            &[&state, &limit],
        )
        .await?,
        None => {
            query(
                c,
                &format!("SELECT {RECORD_COLUMNS} FROM tasks ORDER BY rowid DESC LIMIT $1"),
                &[&limit],
            )
            .await?
        }
    };
    rows.iter().map(record_from_row).collect()
}

pub(super) async fn list_page(
    c: &impl GenericClient,
    state: Option<TaskState>,
    before: Option<i64>,
    limit: u32,
) -> Sql<(Vec<TaskRecord>, Option<i64>)> {
    let before = before.unwrap_or(i64::MAX);
    let limit_n = i64::from(limit);
    let rows = match state {
        Some(state) => {
            query(
                c,
                &format!(
                    "SELECT {RECORD_COLUMNS}, rowid FROM tasks WHERE state = $1 AND rowid < $2
                     ORDER BY rowid DESC LIMIT $3"
                ),
                &[&state, &before, &limit_n],
            )
            .await?
        }
        None => {
            query(
                c,
                &format!(
                    "SELECT {RECORD_COLUMNS}, rowid FROM tasks WHERE rowid < $1
                     ORDER BY rowid DESC LIMIT $2"
                ),
                &[&before, &limit_n],
            )
            .await?
        }
    };
    let next = if rows.len() == limit as usize {
        rows.last().map(|r| r.try_get::<_, i64>(15)).transpose()?
    } else {
        None
    };
    let records = rows.iter().map(record_from_row).collect::<Sql<Vec<_>>>()?;
    Ok((records, next))
}

pub(super) async fn record(c: &impl GenericClient, id: &str) -> Sql<Option<TaskRecord>> {
    query_opt(
        c,
        &format!("SELECT {RECORD_COLUMNS} FROM tasks WHERE id = $1"),
        &[&id],
    )
    .await?
    .as_ref()
    .map(record_from_row)
    .transpose()
}

/// The columns of a [`TaskRow`], as [`task_from_row`] reads them.
const TASK_ROW_COLUMNS: &str = "id, state, stage, last_status, failures, rejections, added_at, \
                                deadline_at, callback_url, submitted_callback_url, asked_ms, \
                                asked_at, asked_gap, kind, account";

fn task_from_row(r: &Row) -> Sql<TaskRow> {
    Ok(TaskRow {
        id: r.try_get(0)?,
        kind: r.try_get(13)?,
        account: r.try_get(14)?,
        state: r.try_get(1)?,
        stage: r.try_get(2)?,
        last_status: r.try_get(3)?,
        failures: count(r.try_get(4)?),
        rejections: count(r.try_get(5)?),
        added_at: r.try_get(6)?,
        deadline_at: r.try_get(7)?,
        callback_url: r.try_get(8)?,
        submitted_callback_url: r.try_get(9)?,
        asked: Asked {
            total_ms: r.try_get(10)?,
            at: r.try_get(11)?,
            gap_ms: r.try_get(12)?,
        },
    })
}

/// The task as a poll decides on it; with `lock`, the row is locked until the commit.
pub(super) async fn task_row(c: &impl GenericClient, id: &str, lock: bool) -> Sql<Option<TaskRow>> {
    let sql = format!(
        "SELECT {TASK_ROW_COLUMNS} FROM tasks WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    query_opt(c, &sql, &[&id])
        .await?
        .as_ref()
        .map(task_from_row)
        .transpose()
}

/// The task locked for applying `me`'s poll, and whether another daemon holds a live lease on
/// it (it took the task over while `me` was stalled): one round trip.
async fn task_row_for_poll(
    c: &impl GenericClient,
    id: &str,
    me: &str,
) -> Sql<Option<(TaskRow, bool)>> {
    let sql = format!(
        "SELECT {TASK_ROW_COLUMNS},
                claimed_by IS NOT NULL AND claimed_by <> $2 AND lease_until >= {DB_NOW}
         FROM tasks WHERE id = $1 FOR UPDATE"
    );
    let Some(r) = query_opt(c, &sql, &[&id, &me]).await? else {
        return Ok(None);
    };
    Ok(Some((task_from_row(&r)?, r.try_get(15)?)))
}

/// Both schedules move here, so a step of the wall clock is corrected in one place.
pub(super) async fn shift_due(
    c: &impl GenericClient,
    schedule: &Schedule,
    by_ms: i64,
) -> Sql<usize> {
    match schedule {
        Schedule::Polls(account) => {
            execute(
                c,
                "UPDATE tasks SET next_poll_at = next_poll_at + $1
                 WHERE state = 'active' AND account = $2",
                &[&by_ms, account],
            )
            .await
        }
        Schedule::Deliveries => execute(
            c,
            "UPDATE deliveries SET next_attempt_at = next_attempt_at + $1 WHERE state = 'pending'",
            &[&by_ms],
        )
        .await,
    }
}

pub(super) async fn remove(c: &impl GenericClient, id: &str, now: i64) -> Sql<Option<TaskState>> {
    let Some(row) = task_row(c, id, true).await? else {
        return Ok(None);
    };
    if row.state == TaskState::Active {
        execute(
            c,
            "UPDATE tasks SET state = 'removed', updated_at = $2, finished_at = $2,
                    claimed_by = NULL, lease_until = NULL
             WHERE id = $1",
            &[&id, &now],
        )
        .await?;
    }
    Ok(Some(row.state))
}

pub(super) async fn breakdown(c: &impl GenericClient) -> Sql<Vec<TaskCount>> {
    query(
        c,
        "SELECT kind, account, state, n FROM task_counts WHERE n <> 0 ORDER BY account, kind, state",
        &[],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(TaskCount {
            kind: r.try_get(0)?,
            account: r.try_get(1)?,
            state: r.try_get(2)?,
            n: r.try_get(3)?,
        })
    })
    .collect()
}

/// Read from the counts the schema's triggers keep, never by counting rows.
pub(super) async fn counts(c: &impl GenericClient) -> Sql<Counts> {
    let mut out = Counts::default();
    for r in query(
        c,
        "SELECT state, SUM(n)::BIGINT FROM task_counts GROUP BY state",
        &[],
    )
    .await?
    {
        let n: i64 = r.try_get(1)?;
        match r.try_get::<_, TaskState>(0)? {
            TaskState::Active => out.active = n,
            TaskState::Done => out.done = n,
            TaskState::Failed => out.failed = n,
            TaskState::Removed => out.removed = n,
        }
    }
    out.events = query_one(
        c,
        "SELECT COALESCE(SUM(n), 0)::BIGINT FROM event_counts",
        &[],
    )
    .await?
    .try_get(0)?;
    out.last_seq = events::last_seq(c).await?;
    Ok(out)
}

/// Tasks still being polled, from the kept counts.
pub(super) async fn active_count(c: &impl GenericClient) -> Sql<i64> {
    Ok(query_one(
        c,
        "SELECT COALESCE(SUM(n), 0)::BIGINT FROM task_counts WHERE state = 'active'",
        &[],
    )
    .await?
    .try_get(0)?)
}

/// Deletes up to `chunk` finished tasks older than `before`, with their events. A task whose
/// events still wait for delivery is kept until they are delivered or given up.
pub(super) async fn prune_chunk(c: &impl GenericClient, before: i64, chunk: usize) -> Sql<Pruned> {
    let rows = query(
        c,
        "SELECT id FROM tasks WHERE state <> 'active' AND finished_at < $1
         AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.task_id = tasks.id AND d.state = 'pending')
         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        &[&before, &as_limit(chunk)],
    )
    .await?;
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut pruned = Pruned::default();
    if ids.is_empty() {
        return Ok(pruned);
    }
    pruned.events = execute(c, "DELETE FROM events WHERE task_id = ANY($1)", &[&ids]).await?;
    pruned.tasks = execute(c, "DELETE FROM tasks WHERE id = ANY($1)", &[&ids]).await?;
    Ok(pruned)
}
