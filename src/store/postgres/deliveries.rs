//! The outbox on PostgreSQL: `deliveries` and `attempts`, as in SQLite (`sqlite::deliveries`),
//! with what several daemons need. A target is shared by name: each daemon registers the
//! targets its configuration names (`targets`, under its member name, kept across its restarts
//! and stops) and claims only deliveries to those (and to per-task URLs, which any daemon can
//! make). Events any daemon stores are routed to every registered target, so a host whose
//! config lacks a target still routes to it, and a delivery waits while every daemon that
//! names its target is down. A delivery is an orphan only when no member has its target
//! registered. Only the head of each (task, target) queue is ready, and a claimed head is
//! leased, so order per task and target holds across daemons.

use std::collections::HashSet;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::codec::{count, limit as as_limit};
use super::schema::DB_NOW;
use super::{Sql, execute, query, query_opt};
use crate::events::Stage;
use crate::store::Kind;
use crate::store::{
    AttemptLog, AttemptRecord, Claim, DeliveryNext, DeliveryRecord, DueDelivery, Replay, Route,
    TargetSpec, TargetSummary, origin_of, webhook_id,
};
use crate::store::{TARGET_SUBMITTED_URL, TARGET_TASK_URL};

/// Writes one pending delivery of event `seq` (`task`'s `stage`) along `route`, due at `due`.
/// Returns 1 if it was new, 0 if that event already had a delivery to that target.
pub(super) async fn insert(
    c: &impl GenericClient,
    seq: i64,
    task: &str,
    stage: Stage,
    route: &Route,
    due: i64,
    now: i64,
) -> Sql<usize> {
    execute(
        c,
        "INSERT INTO deliveries (event_seq, task_id, target, url, origin, webhook_id, state,
                                 next_attempt_at, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $8)
         ON CONFLICT (event_seq, target) DO NOTHING",
        &[
            &seq,
            &task,
            &route.target,
            &route.url,
            &origin_of(&route.url),
            &webhook_id(task, stage, &route.target),
            &due,
            &now,
        ],
    )
    .await
}

/// Marks the first pending delivery of `task` to `target` ready and the others not: only the
/// head of a queue may be sent, so `complete` never overtakes `first`.
pub(super) async fn refresh_ready(c: &impl GenericClient, task: &str, target: &str) -> Sql<()> {
    execute(
        c,
        "UPDATE deliveries
         SET ready = (event_seq = (SELECT MIN(event_seq) FROM deliveries p
                                   WHERE p.task_id = $1 AND p.target = $2 AND p.state = 'pending'))
         WHERE task_id = $1 AND target = $2 AND state = 'pending'",
        &[&task, &target],
    )
    .await?;
    Ok(())
}

/// Ready deliveries in due order to `targets` (those this daemon's configuration names) or to
/// per-task URLs, skipping `busy` ids and `full`
/// origins and those another daemon holds a live lease on; each returned one is leased to
/// `me`. Not only the due ones: as in SQLite, the first not yet due tells the loop when to
/// wake. And when the earliest live lease another daemon holds on a delivery this one could
/// make runs out ([`Claim::foreign_lease_ends_in`]): a daemon that died mid-attempt leaves it.
pub(super) async fn claim(
    c: &impl GenericClient,
    targets: &[String],
    busy: &[i64],
    full: &[String],
    limit: usize,
    me: &str,
    lease_ms: i64,
) -> Sql<Claim<DueDelivery>> {
    // The last row, its `id` NULL, carries the foreign lease's end.
    let sql = format!(
        "WITH due AS (
             SELECT d.id FROM deliveries d
             WHERE d.state = 'pending' AND d.ready
               AND NOT (d.id = ANY($1)) AND NOT (d.origin = ANY($2))
               AND (d.claimed_by IS NULL OR d.claimed_by = $4 OR d.lease_until < {DB_NOW})
               AND (d.target IN ($6, $7)
                    OR d.target = ANY($8))
             ORDER BY d.next_attempt_at, d.id LIMIT $3
             FOR UPDATE OF d SKIP LOCKED
         ), leased AS (
             UPDATE deliveries d SET claimed_by = $4, lease_until = {DB_NOW} + $5
             FROM due, events e
             WHERE d.id = due.id AND e.seq = d.event_seq
             RETURNING d.id, d.event_seq, d.task_id, e.stage, d.target, d.url, d.origin,
                       d.webhook_id, d.attempts, d.next_attempt_at, e.body, d.replays
         ), held AS (
             SELECT MIN(lease_until) - {DB_NOW} AS ends_in FROM deliveries
             WHERE claimed_by IS NOT NULL AND claimed_by <> $4 AND state = 'pending' AND ready
               AND lease_until >= {DB_NOW} AND (target IN ($6, $7) OR target = ANY($8))
         )
         SELECT * FROM leased
         UNION ALL
         SELECT NULL, ends_in, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
         FROM held WHERE ends_in IS NOT NULL"
    );
    let rows = query(
        c,
        &sql,
        &[
            &busy,
            &full,
            &as_limit(limit),
            &me,
            &lease_ms,
            &TARGET_TASK_URL,
            &TARGET_SUBMITTED_URL,
            &targets,
        ],
    )
    .await?;
    let mut claim = Claim::alone(Vec::with_capacity(rows.len()));
    for r in &rows {
        let Some(id) = r.try_get::<_, Option<i64>>(0)? else {
            claim.foreign_lease_ends_in = r.try_get(1)?;
            continue;
        };
        claim.rows.push(DueDelivery {
            id,
            event_seq: r.try_get(1)?,
            task_id: r.try_get(2)?,
            stage: r.try_get(3)?,
            target: r.try_get(4)?,
            url: r.try_get(5)?,
            origin: r.try_get(6)?,
            webhook_id: r.try_get(7)?,
            attempts: count(r.try_get(8)?),
            next_attempt_at: r.try_get(9)?,
            body: r.try_get(10)?,
            replays: r.try_get(11)?,
        });
    }
    // RETURNING keeps no order.
    claim.rows.sort_by_key(|d| (d.next_attempt_at, d.id));
    Ok(claim)
}

/// Records one attempt and releases the delivery's lease; `false` when a replay was requested
/// while it was in flight (the attempt is kept in the history, the delivery stays pending for
/// the replay), or when the attempt was overtaken: this daemon was stopped past its lease and
/// another took the delivery over meanwhile (it holds it now, or has ended it), so this late
/// result must neither undo that one's nor free the delivery while its attempt is in flight.
pub(super) async fn record_attempt(
    c: &impl GenericClient,
    delivery: &DueDelivery,
    attempt: &AttemptRecord,
    next: &DeliveryNext,
    me: &str,
) -> Sql<bool> {
    let (id, replays, number) = (delivery.id, delivery.replays, delivery.attempts + 1);
    let now = attempt.started_at.saturating_add(attempt.duration_ms);
    let (state, next_at, delivered_at, outcome) = match next {
        DeliveryNext::Delivered => ("delivered", now, Some(now), "delivered"),
        DeliveryNext::Retry(at) => ("pending", *at, None, "retry"),
        DeliveryNext::Failed => ("failed", now, None, "failed"),
    };
    let status = attempt.status.map(i64::from);
    let n: Option<i64> = query_opt(
        c,
        &format!(
            "UPDATE deliveries SET state = $2, attempts = attempts + 1, next_attempt_at = $3,
                last_attempt_at = $4, last_status = $5, last_error = $6,
                delivered_at = COALESCE($7, delivered_at), updated_at = $8,
                claimed_by = NULL, lease_until = NULL
         WHERE id = $1 AND replays = $9 AND state = 'pending'
           AND (claimed_by IS NULL OR claimed_by = $10 OR lease_until < {DB_NOW})
         RETURNING attempts"
        ),
        &[
            &id,
            &state,
            &next_at,
            &attempt.started_at,
            &status,
            &attempt.error,
            &delivered_at,
            &now,
            &replays,
            &me,
        ],
    )
    .await?
    .map(|r| r.try_get(0))
    .transpose()?;
    let (n, outcome) = match n {
        Some(n) => (n, outcome),
        None => (i64::from(number), "superseded"),
    };
    if outcome == "delivered" || outcome == "failed" {
        refresh_ready(c, &delivery.task_id, &delivery.target).await?;
    }
    execute(
        c,
        "INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, status, error, outcome)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &id,
            &n,
            &attempt.started_at,
            &attempt.duration_ms,
            &status,
            &attempt.error,
            &outcome,
        ],
    )
    .await?;
    Ok(outcome != "superseded")
}

/// Registers `known` as the targets `member` names (replacing what it registered before, so a
/// target it no longer names is forgotten for it), then gives up pending deliveries whose
/// target no member has registered. A member that is down keeps its registration: its
/// deliveries wait for it rather than being given up.
pub(super) async fn fail_orphans(
    c: &impl GenericClient,
    known: &[TargetSpec],
    member: &str,
    now: i64,
) -> Sql<usize> {
    execute(c, "DELETE FROM targets WHERE member = $1", &[&member]).await?;
    for t in known {
        let stages: Vec<&str> = t.route.stages.iter().map(|s| s.as_str()).collect();
        let kinds: Option<Vec<&str>> = t
            .kinds
            .as_ref()
            .map(|k| k.iter().map(|k| k.as_str()).collect());
        execute(
            c,
            "INSERT INTO targets (name, member, url, stages, kinds, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &t.route.target,
                &member,
                &t.route.url,
                &stages,
                &kinds,
                &now,
            ],
        )
        .await?;
    }
    let rows = query(
        c,
        "UPDATE deliveries SET state = 'failed', updated_at = $1,
                last_error = 'the target is no longer in the configuration'
         WHERE state = 'pending' AND target NOT IN ($2, $3)
           AND target NOT IN (SELECT name FROM targets)
         RETURNING task_id, target",
        &[&now, &TARGET_TASK_URL, &TARGET_SUBMITTED_URL],
    )
    .await?;
    Ok(rows.len())
}

/// Every registered target's name with the members that name it, both sorted.
pub(super) async fn registered(c: &impl GenericClient) -> Sql<Vec<(String, Vec<String>)>> {
    query(
        c,
        "SELECT name, array_agg(member ORDER BY member) FROM targets GROUP BY name ORDER BY name",
        &[],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

/// The registered targets that take `kind` and `stage` (any stage when `None`) and are not
/// already in `routes` (by name or URL): where events a daemon stores go besides its own
/// targets. Where members register one name differently, the latest registration is used.
pub(super) async fn shared_routes(
    c: &impl GenericClient,
    kind: Kind,
    stage: Option<Stage>,
    routes: &[Route],
) -> Sql<Vec<Route>> {
    let rows = query(
        c,
        "SELECT DISTINCT ON (name) name, url, stages FROM targets
         WHERE (kinds IS NULL OR $1 = ANY(kinds)) AND ($2::TEXT IS NULL OR $2 = ANY(stages))
         ORDER BY name, updated_at DESC, member",
        &[&kind.as_str(), &stage.map(Stage::as_str)],
    )
    .await?;
    let mut out = Vec::new();
    for r in &rows {
        let target: String = r.try_get(0)?;
        let url: String = r.try_get(1)?;
        if routes.iter().any(|x| x.target == target || x.url == url) {
            continue;
        }
        let stages: Vec<String> = r.try_get(2)?;
        out.push(Route {
            target,
            url,
            stages: stages.iter().filter_map(|s| Stage::parse(s)).collect(),
        });
    }
    Ok(out)
}

pub(super) async fn cancel(c: &impl GenericClient, what: &Replay, now: i64) -> Sql<usize> {
    let (task, seq) = match what {
        Replay::Event(seq) => (None, Some(*seq)),
        Replay::Task(task) => (Some(task.as_str()), None),
        Replay::FailedSince(_) | Replay::SentSince(_) => return Ok(0),
    };
    // `replays + 1`: an attempt in flight now records its result only if the count is
    // unchanged, so it cannot put a cancelled delivery back.
    let rows = query(
        c,
        "UPDATE deliveries SET state = 'failed', updated_at = $3, replays = replays + 1,
                last_error = 'cancelled (sunopoll deliveries cancel)'
         WHERE state = 'pending' AND (task_id = $1 OR event_seq = $2)
         RETURNING task_id, target",
        &[&task, &seq, &now],
    )
    .await?;
    let mut refreshed = HashSet::new();
    for r in &rows {
        let pair: (String, String) = (r.try_get(0)?, r.try_get(1)?);
        if refreshed.insert(pair.clone()) {
            refresh_ready(c, &pair.0, &pair.1).await?;
        }
    }
    Ok(rows.len())
}

pub(super) async fn redeliver(
    c: &impl GenericClient,
    what: &Replay,
    target: Option<&str>,
    routes: &[Route],
    now: i64,
) -> Sql<usize> {
    let keys = |rows: Vec<Row>| -> Sql<Vec<(i64, String, Stage)>> {
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    };
    let seqs = match what {
        Replay::Event(seq) => keys(
            query(
                c,
                "SELECT seq, task_id, stage FROM events WHERE seq = $1 ORDER BY seq",
                &[seq],
            )
            .await?,
        )?,
        Replay::Task(task) => keys(
            query(
                c,
                "SELECT seq, task_id, stage FROM events WHERE task_id = $1 ORDER BY seq",
                &[task],
            )
            .await?,
        )?,
        Replay::FailedSince(_) | Replay::SentSince(_) => Vec::new(),
    };
    let seq_list: Vec<i64> = seqs.iter().map(|(s, _, _)| *s).collect();
    let picked = match what {
        Replay::Event(_) | Replay::Task(_) => {
            query(
                c,
                "SELECT id FROM deliveries WHERE event_seq = ANY($1)
                   AND ($2::TEXT IS NULL OR target = $2) ORDER BY id",
                &[&seq_list, &target],
            )
            .await?
        }
        Replay::FailedSince(t) => {
            query(
                c,
                "SELECT id FROM deliveries WHERE state = 'failed' AND updated_at >= $1
                   AND ($2::TEXT IS NULL OR target = $2) ORDER BY id",
                &[t, &target],
            )
            .await?
        }
        Replay::SentSince(t) => {
            query(
                c,
                "SELECT id FROM deliveries WHERE state = 'delivered' AND delivered_at >= $1
                   AND ($2::TEXT IS NULL OR target = $2) ORDER BY id",
                &[t, &target],
            )
            .await?
        }
    };
    let ids: Vec<i64> = picked
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let mut touched: HashSet<(String, String)> = HashSet::new();
    let reset = query(
        c,
        "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $2,
                updated_at = $2, replays = replays + 1
         WHERE id = ANY($1) RETURNING task_id, target",
        &[&ids, &now],
    )
    .await?;
    let mut n = reset.len();
    for r in &reset {
        touched.insert((r.try_get(0)?, r.try_get(1)?));
    }
    for (seq, task, stage) in &seqs {
        for route in routes
            .iter()
            .filter(|r| r.stages.contains(stage) && target.is_none_or(|t| t == r.target))
        {
            n += insert(c, *seq, task, *stage, route, now, now).await?;
            touched.insert((task.clone(), route.target.clone()));
        }
    }
    let mut touched: Vec<_> = touched.into_iter().collect();
    touched.sort();
    for (task, target) in &touched {
        refresh_ready(c, task, target).await?;
    }
    Ok(n)
}

/// Every delivery of one task's events with its attempts, keyed by event sequence number.
pub(super) async fn of_task(c: &impl GenericClient, task: &str) -> Sql<Vec<(i64, DeliveryRecord)>> {
    let rows = query(
        c,
        "SELECT id, event_seq, target, url, webhook_id, state, attempts, next_attempt_at,
                last_attempt_at, last_status, last_error, delivered_at
         FROM deliveries WHERE task_id = $1 ORDER BY event_seq, target",
        &[&task],
    )
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: i64 = r.try_get(0)?;
        let attempt_log = query(
            c,
            "SELECT attempt, started_at, duration_ms, status, error, outcome FROM attempts
             WHERE delivery_id = $1 ORDER BY id",
            &[&id],
        )
        .await?
        .iter()
        .map(|a| {
            Ok(AttemptLog {
                attempt: count(a.try_get(0)?),
                started_at: a.try_get(1)?,
                duration_ms: a.try_get(2)?,
                status: status_of(a.try_get(3)?),
                error: a.try_get(4)?,
                outcome: a.try_get(5)?,
            })
        })
        .collect::<Sql<Vec<_>>>()?;
        out.push((
            r.try_get(1)?,
            DeliveryRecord {
                target: r.try_get(2)?,
                url: r.try_get(3)?,
                webhook_id: r.try_get(4)?,
                state: r.try_get(5)?,
                attempts: count(r.try_get(6)?),
                next_attempt_at: r.try_get(7)?,
                last_attempt_at: r.try_get(8)?,
                last_status: status_of(r.try_get(9)?),
                last_error: r.try_get(10)?,
                delivered_at: r.try_get(11)?,
                attempt_log,
            },
        ));
    }
    Ok(out)
}

/// A stored HTTP status as the records' `u16`.
fn status_of(v: Option<i64>) -> Option<u16> {
    v.and_then(|s| u16::try_from(s).ok())
}

/// Per-target counts (kept by the schema's triggers), last success/error and oldest pending
/// delivery: each figure one index seek per target.
pub(super) async fn target_summary(c: &impl GenericClient) -> Sql<Vec<TargetSummary>> {
    let counts = query(
        c,
        "SELECT target, state, n FROM delivery_counts WHERE n > 0 ORDER BY target, state",
        &[],
    )
    .await?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
    .collect::<Sql<Vec<_>>>()?;
    let mut out = TargetSummary::from_counts(counts);
    for t in &mut out {
        if t.delivered > 0 {
            t.last_success_at = query_opt(
                c,
                "SELECT delivered_at FROM deliveries WHERE target = $1 AND state = 'delivered'
                 ORDER BY delivered_at DESC NULLS LAST LIMIT 1",
                &[&t.target],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?
            .flatten();
        }
        if t.pending > 0 {
            t.oldest_pending_at = query_opt(
                c,
                "SELECT created_at FROM deliveries WHERE target = $1 AND state = 'pending'
                 ORDER BY created_at LIMIT 1",
                &[&t.target],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        }
        if let Some(r) = query_opt(
            c,
            "SELECT last_error, last_attempt_at FROM deliveries
             WHERE target = $1 AND last_error IS NOT NULL ORDER BY last_attempt_at DESC NULLS LAST
             LIMIT 1",
            &[&t.target],
        )
        .await?
        {
            t.last_error = Some(r.try_get(0)?);
            t.last_error_at = r.try_get(1)?;
        }
    }
    Ok(out)
}
