//! The gauges a metrics scrape reads of the poll queue: an index look-up and a capped index
//! walk of `tasks_due`, so a scrape costs the same at any queue size. (Delivery gauges come from
//! the kept counts of `target_summary`.)

use rusqlite::{Connection, params};

use super::Sql;
use crate::store::{DUE_COUNT_CAP, QueueGauges};

pub(super) fn gauges(conn: &Connection, now: i64) -> Sql<QueueGauges> {
    // Pinned: `tasks_state` would also serve `state = 'active'`, and walk every active task.
    let polls_due: i64 = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_due
              WHERE state = 'active' AND next_poll_at <= ?1 LIMIT ?2)",
        )?
        .query_row(params![now, DUE_COUNT_CAP as i64], |r| r.get(0))?;
    let earliest_due_at: Option<i64> = conn
        .prepare_cached(
            "SELECT MIN(next_poll_at) FROM tasks INDEXED BY tasks_due WHERE state = 'active'",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(QueueGauges {
        polls_due: u64::try_from(polls_due).unwrap_or(0),
        earliest_due_at,
    })
}
