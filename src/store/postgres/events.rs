//! The `events` table on PostgreSQL: storing an event under the next sequence number, reading
//! the log, and its high-water mark.

use deadpool_postgres::GenericClient;

use super::{Sql, notify, query, query_one, query_opt};
use crate::events::Stage;
use crate::store::EventRecord;
use crate::store::Kind;

/// Stores one event under the next sequence number, unless the task has one of that stage
/// already (`None` then, and nothing changes), and tells every daemon (`Note::Events`, heard
/// once this transaction commits) in the same statement. The number comes from `store_meta`'s one row,
/// which stays locked until this transaction ends: events commit in the order of their
/// numbers across all daemons, and a number given to an event that is rolled back is given
/// again to the next, so the log has no holes either.
pub(super) async fn insert(
    c: &impl GenericClient,
    task: &str,
    stage: Stage,
    code: i64,
    body: &str,
    now: i64,
    kind: Kind,
) -> Sql<Option<i64>> {
    // One statement (one round trip): the counter is only taken, and its row only locked, when
    // the task has no event of that stage yet; the notification is only sent for a stored event.
    let row = query_opt(
        c,
        "WITH next AS (
             UPDATE store_meta SET last_seq = last_seq + 1
             WHERE id = 1
               AND NOT EXISTS (SELECT 1 FROM events WHERE task_id = $1 AND stage = $2)
             RETURNING last_seq
         )
         INSERT INTO events (seq, task_id, stage, code, body, created_at, kind)
         SELECT last_seq, $1, $2, $3::BIGINT, $4::TEXT, $5::BIGINT, $6::TEXT FROM next
         RETURNING seq, pg_notify($7, $8 || seq)",
        &[
            &task,
            &stage,
            &code,
            &body,
            &now,
            &kind,
            &notify::CHANNEL,
            &notify::EVENTS,
        ],
    )
    .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Events with a sequence number above `since`, oldest first, optionally of one task, at most
/// `limit`, stopping once the bodies read hold `max_bytes` (at least one event is read).
pub(super) async fn since(
    c: &impl GenericClient,
    since: i64,
    task: Option<&str>,
    limit: Option<u32>,
    max_bytes: usize,
) -> Sql<Vec<EventRecord>> {
    // A page of large bodies is read in small batches, so the rest are never loaded.
    const BATCH: u32 = 64;
    let (mut out, mut bytes, mut after) = (Vec::new(), 0usize, since);
    loop {
        let want = match limit {
            Some(l) => l.saturating_sub(u32::try_from(out.len()).unwrap_or(u32::MAX)),
            None => BATCH,
        }
        .min(BATCH);
        if want == 0 {
            return Ok(out);
        }
        let rows = match task {
            Some(task) => {
                query(
                    c,
                    "SELECT seq, task_id, stage, code, created_at, body, kind FROM events
                     WHERE task_id = $2 AND seq > $1 ORDER BY seq LIMIT $3",
                    &[&after, &task, &i64::from(want)],
                )
                .await?
            }
            None => {
                query(
                    c,
                    "SELECT seq, task_id, stage, code, created_at, body, kind FROM events
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&after, &i64::from(want)],
                )
                .await?
            }
        };
        let got = rows.len();
        for r in rows {
            if bytes >= max_bytes {
                return Ok(out);
            }
            let body: String = r.try_get(5)?;
            bytes = bytes.saturating_add(body.len());
            let ev = EventRecord {
                seq: r.try_get(0)?,
                task_id: r.try_get(1)?,
                stage: r.try_get(2)?,
                code: r.try_get(3)?,
                created_at: r.try_get(4)?,
                kind: r.try_get(6)?,
                body,
            };
            after = ev.seq;
            out.push(ev);
        }
        if got < want as usize {
            return Ok(out);
        }
    }
}

/// The highest event sequence number ever assigned (0 if none), even after pruning.
pub(super) async fn last_seq(c: &impl GenericClient) -> Sql<i64> {
    Ok(
        query_one(c, "SELECT last_seq FROM store_meta WHERE id = 1", &[])
            .await?
            .try_get(0)?,
    )
}
