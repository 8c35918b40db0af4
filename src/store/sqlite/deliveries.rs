//! The `deliveries` and `attempts` tables: the outbox. Only the head of each (task, target)
//! queue is marked `ready`, so finding due deliveries is one walk of a small index.

use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{Sql, events};
use crate::events::Stage;
use crate::store::{
    AttemptLog, AttemptRecord, DeliveryNext, DeliveryRecord, DueDelivery, Replay, Route,
    TargetSummary, origin_of, webhook_id,
};

/// Writes one pending delivery of event `seq` (`task`'s `stage`) along `route`, due at `due`.
/// Returns 1 if it was new, 0 if that event already had a delivery to that target.
pub(super) fn insert(
    conn: &Connection,
    seq: i64,
    task: &str,
    stage: Stage,
    route: &Route,
    due: i64,
    now: i64,
) -> Sql<usize> {
    Ok(conn
        .prepare_cached(
            "INSERT INTO deliveries (event_seq, task_id, target, url, origin, webhook_id, state,
                                     next_attempt_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8, ?8) ON CONFLICT (event_seq, target) DO NOTHING",
        )?
        .execute(params![
            seq,
            task,
            route.target,
            route.url,
            origin_of(&route.url),
            webhook_id(task, stage, &route.target),
            due,
            now,
        ])?)
}

/// Marks the first pending delivery of `task` to `target` ready and the others not: only the
/// head of a queue may be sent, so `complete` never overtakes `first`.
pub(super) fn refresh_ready(conn: &Connection, task: &str, target: &str) -> Sql<()> {
    conn.prepare_cached(REFRESH_READY)?
        .execute(params![task, target])?;
    Ok(())
}

/// Marks the head of one (task, target) queue ready. INDEXED BY pins the plan to that queue:
/// left to itself the planner may take `deliveries_target` (target, state) and walk every
/// pending delivery of the target, which with a dead handler's backlog is all of them.
pub(super) const REFRESH_READY: &str = "UPDATE deliveries INDEXED BY deliveries_order
     SET ready = (event_seq = (SELECT MIN(event_seq) FROM deliveries p
                               WHERE p.task_id = ?1 AND p.target = ?2 AND p.state = 'pending'))
     WHERE task_id = ?1 AND target = ?2 AND state = 'pending'";

pub(super) fn due(
    conn: &Connection,
    targets: &[String],
    busy: &[i64],
    full: &[String],
    limit: usize,
) -> Sql<Vec<DueDelivery>> {
    let busy = serde_json::to_string(busy).unwrap_or_else(|_| "[]".to_owned());
    let full = serde_json::to_string(full).unwrap_or_else(|_| "[]".to_owned());
    let targets = serde_json::to_string(targets).unwrap_or_else(|_| "[]".to_owned());
    let mut stmt = conn.prepare_cached(
        "SELECT d.id, d.event_seq, d.task_id, e.stage, d.target, d.url, d.origin, d.webhook_id,
                d.attempts, d.next_attempt_at, e.body, d.replays
         FROM deliveries d INDEXED BY deliveries_ready JOIN events e ON e.seq = d.event_seq
         WHERE d.state = 'pending' AND d.ready = 1
           AND d.id NOT IN (SELECT value FROM json_each(?1))
           AND d.origin NOT IN (SELECT value FROM json_each(?2))
           AND (d.target IN (?5, ?6) OR d.target IN (SELECT value FROM json_each(?4)))
         ORDER BY d.next_attempt_at, d.id LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(
            params![
                busy,
                full,
                i64::try_from(limit).unwrap_or(i64::MAX),
                targets,
                crate::store::TARGET_TASK_URL,
                crate::store::TARGET_SUBMITTED_URL
            ],
            |r| {
                Ok(DueDelivery {
                    id: r.get(0)?,
                    event_seq: r.get(1)?,
                    task_id: r.get(2)?,
                    stage: r.get(3)?,
                    target: r.get(4)?,
                    url: r.get(5)?,
                    origin: r.get(6)?,
                    webhook_id: r.get(7)?,
                    attempts: r.get(8)?,
                    next_attempt_at: r.get(9)?,
                    body: r.get(10)?,
                    replays: r.get(11)?,
                })
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Which delivery an attempt was made at, as it was when the attempt began: all of a
/// [`DueDelivery`] that recording needs, without copying its body to the store thread.
pub(super) struct Attempted {
    id: i64,
    replays: i64,
    number: u32,
    task: String,
    target: String,
}

impl Attempted {
    pub(super) fn of(d: &DueDelivery) -> Attempted {
        Attempted {
            id: d.id,
            replays: d.replays,
            number: d.attempts + 1,
            task: d.task_id.clone(),
            target: d.target.clone(),
        }
    }
}

/// Records one attempt; `false` when a replay was requested while it was in flight (the
/// attempt is kept in the history, the delivery stays pending for the replay).
pub(super) fn record_attempt(
    conn: &Connection,
    delivery: &Attempted,
    attempt: &AttemptRecord,
    next: &DeliveryNext,
) -> Sql<bool> {
    let (id, replays, number) = (delivery.id, delivery.replays, delivery.number);
    let now = attempt.started_at.saturating_add(attempt.duration_ms);
    let (state, next_at, delivered_at, outcome) = match next {
        DeliveryNext::Delivered => ("delivered", now, Some(now), "delivered"),
        DeliveryNext::Retry(at) => ("pending", *at, None, "retry"),
        DeliveryNext::Failed => ("failed", now, None, "failed"),
    };
    let n: Option<i64> = conn
        .prepare_cached(
            "UPDATE deliveries SET state = ?2, attempts = attempts + 1, next_attempt_at = ?3,
                    last_attempt_at = ?4, last_status = ?5, last_error = ?6,
                    delivered_at = COALESCE(?7, delivered_at), updated_at = ?8
             WHERE id = ?1 AND replays = ?9 RETURNING attempts",
        )?
        .query_row(
            params![
                id,
                state,
                next_at,
                attempt.started_at,
                attempt.status,
                attempt.error,
                delivered_at,
                now,
                replays
            ],
            |r| r.get(0),
        )
        .optional()?;
    let (n, outcome) = match n {
        Some(n) => (n, outcome),
        None => (i64::from(number), "superseded"),
    };
    if outcome == "delivered" || outcome == "failed" {
        refresh_ready(conn, &delivery.task, &delivery.target)?;
    }
    conn.prepare_cached(
        "INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, status, error, outcome)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        id,
        n,
        attempt.started_at,
        attempt.duration_ms,
        attempt.status,
        attempt.error,
        outcome
    ])?;
    Ok(outcome != "superseded")
}

pub(super) fn fail_orphans(conn: &Connection, known: &[String], now: i64) -> Sql<usize> {
    let known = serde_json::to_string(known).unwrap_or_else(|_| "[]".to_owned());
    Ok(conn.execute(
        "UPDATE deliveries SET state = 'failed', updated_at = ?2,
                last_error = 'the target is no longer in the configuration'
         WHERE state = 'pending' AND target NOT IN (?3, ?4)
           AND target NOT IN (SELECT value FROM json_each(?1))",
        params![
            known,
            now,
            crate::store::TARGET_TASK_URL,
            crate::store::TARGET_SUBMITTED_URL
        ],
    )?)
}

pub(super) fn cancel(conn: &Connection, what: &Replay, now: i64) -> Sql<usize> {
    let (task, seq) = match what {
        Replay::Event(seq) => (None, Some(*seq)),
        Replay::Task(task) => (Some(task.as_str()), None),
        Replay::FailedSince(_) | Replay::SentSince(_) => return Ok(0),
    };
    // `replays + 1`: an attempt in flight now records its result only if the count is
    // unchanged, so it cannot put a cancelled delivery back.
    let queues: Vec<(String, String)> = conn
        .prepare_cached(
            "UPDATE deliveries SET state = 'failed', updated_at = ?3, replays = replays + 1,
                    last_error = 'cancelled (sunopoll deliveries cancel)'
             WHERE state = 'pending' AND (task_id = ?1 OR event_seq = ?2)
             RETURNING task_id, target",
        )?
        .query_map(params![task, seq, now], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut refreshed = std::collections::HashSet::new();
    for (task, target) in &queues {
        if refreshed.insert((task, target)) {
            refresh_ready(conn, task, target)?;
        }
    }
    Ok(queues.len())
}

pub(super) fn redeliver(
    conn: &Connection,
    what: &Replay,
    target: Option<&str>,
    routes: &[Route],
    now: i64,
) -> Sql<usize> {
    let seqs: Vec<(i64, String, Stage)> = match what {
        Replay::Event(seq) => events::keys(conn, "seq = ?1", params![seq])?,
        Replay::Task(task) => events::keys(conn, "task_id = ?1", params![task])?,
        Replay::FailedSince(_) | Replay::SentSince(_) => Vec::new(),
    };
    let mut count = 0;
    let mut reset = conn.prepare_cached(
        "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2, updated_at = ?2,
                replays = replays + 1
         WHERE id = ?1",
    )?;
    let ids: Vec<i64> = match what {
        Replay::Event(_) | Replay::Task(_) => {
            let mut ids = Vec::new();
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM deliveries WHERE event_seq = ?1 AND (?2 IS NULL OR target = ?2)",
            )?;
            for (seq, _, _) in &seqs {
                for id in stmt.query_map(params![seq, target], |r| r.get(0))? {
                    ids.push(id?);
                }
            }
            ids
        }
        Replay::FailedSince(t) => conn
            .prepare_cached(
                "SELECT id FROM deliveries WHERE state = 'failed' AND updated_at >= ?1 AND (?2 IS NULL OR target = ?2)",
            )?
            .query_map(params![t, target], |r| r.get(0))?
            .collect::<Result<_, _>>()?,
        Replay::SentSince(t) => conn
            .prepare_cached(
                "SELECT id FROM deliveries WHERE state = 'delivered' AND delivered_at >= ?1 AND (?2 IS NULL OR target = ?2)",
            )?
            .query_map(params![t, target], |r| r.get(0))?
            .collect::<Result<_, _>>()?,
    };
    let mut touched = HashSet::new();
    let mut pair = conn.prepare_cached("SELECT task_id, target FROM deliveries WHERE id = ?1")?;
    for id in ids {
        count += reset.execute(params![id, now])?;
        touched.insert(pair.query_row([id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?);
    }
    for (seq, task, stage) in &seqs {
        for route in routes
            .iter()
            .filter(|r| r.stages.contains(stage) && target.is_none_or(|t| t == r.target))
        {
            count += insert(conn, *seq, task, *stage, route, now, now)?;
            touched.insert((task.clone(), route.target.clone()));
        }
    }
    for (task, target) in &touched {
        refresh_ready(conn, task, target)?;
    }
    Ok(count)
}

const RECORD_COLUMNS: &str = "id, event_seq, target, url, webhook_id, state, attempts, next_attempt_at, \
                              last_attempt_at, last_status, last_error, delivered_at";

fn record_from_row(r: &Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    Ok(DeliveryRecord {
        target: r.get(2)?,
        url: r.get(3)?,
        webhook_id: r.get(4)?,
        state: r.get(5)?,
        attempts: r.get(6)?,
        next_attempt_at: r.get(7)?,
        last_attempt_at: r.get(8)?,
        last_status: r.get(9)?,
        last_error: r.get(10)?,
        delivered_at: r.get(11)?,
        attempt_log: Vec::new(),
    })
}

/// Every delivery of one task's events with its attempts, keyed by event sequence number.
pub(super) fn of_task(conn: &Connection, task: &str) -> Sql<Vec<(i64, DeliveryRecord)>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RECORD_COLUMNS} FROM deliveries WHERE task_id = ?1 ORDER BY event_seq, target"
    ))?;
    let mut attempts = conn.prepare_cached(
        "SELECT attempt, started_at, duration_ms, status, error, outcome FROM attempts
         WHERE delivery_id = ?1 ORDER BY id",
    )?;
    let rows = stmt
        .query_map([task], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                record_from_row(r)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, seq, mut record) in rows {
        record.attempt_log = attempts
            .query_map([id], |r| {
                Ok(AttemptLog {
                    attempt: r.get(0)?,
                    started_at: r.get(1)?,
                    duration_ms: r.get(2)?,
                    status: r.get(3)?,
                    error: r.get(4)?,
                    outcome: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        out.push((seq, record));
    }
    Ok(out)
}

/// Deliveries per target and state, from the kept counts.
pub(super) const SUMMARY_COUNTS: &str =
    "SELECT target, state, n FROM delivery_counts WHERE n > 0 ORDER BY target";
/// A target's last success: one seek at the end of its delivered rows.
pub(super) const LAST_SUCCESS: &str =
    "SELECT MAX(delivered_at) FROM deliveries INDEXED BY deliveries_target
     WHERE target = ?1 AND state = 'delivered'";
/// A target's oldest waiting delivery: the first entry of its part of a partial index.
pub(super) const OLDEST_PENDING: &str =
    "SELECT created_at FROM deliveries INDEXED BY deliveries_pending
     WHERE target = ?1 AND state = 'pending' ORDER BY created_at LIMIT 1";
/// A target's last failure.
pub(super) const LAST_ERROR: &str =
    "SELECT last_error, last_attempt_at FROM deliveries INDEXED BY deliveries_errors
     WHERE target = ?1 AND last_error IS NOT NULL ORDER BY last_attempt_at DESC LIMIT 1";

/// Per-target counts, last success/error and oldest pending delivery.
pub(super) fn target_summary(conn: &Connection) -> Sql<Vec<TargetSummary>> {
    // The counts are the ones the schema's triggers keep (a handful of rows, whatever the size
    // of the outbox); every other figure is one seek of an index per target.
    let mut counts = conn.prepare_cached(SUMMARY_COUNTS)?;
    let rows = counts
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = TargetSummary::from_counts(rows);
    let mut last_success = conn.prepare_cached(LAST_SUCCESS)?;
    let mut oldest_pending = conn.prepare_cached(OLDEST_PENDING)?;
    let mut last_error = conn.prepare_cached(LAST_ERROR)?;
    for t in &mut out {
        if t.delivered > 0 {
            t.last_success_at = last_success.query_row([&t.target], |r| r.get(0))?;
        }
        if t.pending > 0 {
            t.oldest_pending_at = oldest_pending
                .query_row([&t.target], |r| r.get(0))
                .optional()?;
        }
        if let Some((e, at)) = last_error
            .query_row([&t.target], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
            })
            .optional()?
        {
            t.last_error = Some(e);
            t.last_error_at = at;
        }
    }
    Ok(out)
}
