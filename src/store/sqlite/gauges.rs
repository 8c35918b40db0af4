//! The gauges a metrics scrape reads: each query an index look-up or a capped index walk
//! (`tasks_due`, `deliveries_pending_age`), so a scrape costs the same at any queue size.

use rusqlite::{Connection, params};

use super::Sql;
use crate::store::{DUE_COUNT_CAP, QueueGauges};

pub(super) fn gauges(conn: &Connection, now: i64) -> Sql<QueueGauges> {
    let polls_due: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_due
              WHERE state = 'active' AND next_poll_at <= ?1 LIMIT ?2)",
        )?
        .query_row(params![now, DUE_COUNT_CAP as i64], |r| r.get(0))?;
    let earliest_due_at: Option<i64> = conn
        .prepare_cached("SELECT MIN(next_poll_at) FROM tasks WHERE state = 'active'")?
        .query_row([], |r| r.get(0))?;
    // One look-up per target name: the distinct names come from a walk of the index's
    // prefixes (a skip-scan), each minimum from the same index.
    let mut oldest_pending = Vec::new();
    let mut next = conn.prepare_cached(
        "SELECT target FROM deliveries INDEXED BY deliveries_pending_age
          WHERE state = 'pending' AND target > ?1 ORDER BY target LIMIT 1",
    )?;
    let mut oldest = conn.prepare_cached(
        "SELECT MIN(created_at) FROM deliveries INDEXED BY deliveries_pending_age
          WHERE state = 'pending' AND target = ?1",
    )?;
    let mut after = String::new();
    loop {
        let target: Option<String> =
            next.query_row([&after], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
        let Some(target) = target else { break };
        let at: Option<i64> = oldest.query_row([&target], |r| r.get(0))?;
        if let Some(at) = at {
            oldest_pending.push((target.clone(), at));
        }
        after = target;
    }
    Ok(QueueGauges {
        polls_due: u64::try_from(polls_due).unwrap_or(0),
        earliest_due_at,
        oldest_pending,
    })
}
