//! The gauges a metrics scrape reads of the poll queue: a capped walk of `tasks_due` and one
//! index look-up, so a scrape costs the same at any queue size.

use deadpool_postgres::GenericClient;

use super::{Sql, query_one};
use crate::store::{DUE_COUNT_CAP, QueueGauges};

pub(super) async fn gauges(c: &impl GenericClient, now: i64) -> Sql<QueueGauges> {
    let r = query_one(
        c,
        "SELECT (SELECT COUNT(*) FROM (SELECT 1 FROM tasks
                  WHERE state = 'active' AND next_poll_at <= $1 LIMIT $2) AS due),
                (SELECT MIN(next_poll_at) FROM tasks WHERE state = 'active')",
        &[&now, &(DUE_COUNT_CAP as i64)],
    )
    .await?;
    let polls_due: i64 = r.try_get(0)?;
    Ok(QueueGauges {
        polls_due: u64::try_from(polls_due).unwrap_or(0),
        earliest_due_at: r.try_get(1)?,
    })
}
