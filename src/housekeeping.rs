//! Housekeeping: on the `prune-schedule` cron expression, delete finished tasks and their
//! events older than `retention`, and log a one-line summary.
//!
//! The next run time comes from `croner` and the loop sleeps until then, so an idle daemon
//! wakes for housekeeping once per scheduled run, not on a polling timer.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::{format_duration, format_utc, ms, now_ms};
use crate::store::{Pruned, Store};

/// Longest single sleep: after it the next run time is recomputed, which keeps the schedule
/// right across wall-clock jumps (NTP steps, suspend) at the cost of one wakeup an hour.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// The next run strictly after `after`, or `None` if the expression never fires again.
pub fn next_run(schedule: &croner::Cron, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule.find_next_occurrence(&after, false).ok()
}

/// Prunes once: tasks that finished more than `retention` before `now`.
pub async fn prune_once(
    store: &Store,
    retention: Duration,
    now: i64,
) -> Result<Pruned, crate::store::StoreError> {
    let before = now.saturating_sub(ms(retention));
    let pruned = store.prune(before).await?;
    info!(
        tasks = pruned.tasks,
        events = pruned.events,
        finished_before = %format_utc(before),
        retention = %format_duration(retention),
        "housekeeping: pruned finished tasks and their events"
    );
    Ok(pruned)
}

/// Runs the schedule until `cancel` fires.
pub async fn run(
    store: Store,
    schedule: croner::Cron,
    retention: Duration,
    cancel: CancellationToken,
) {
    loop {
        let now = Utc::now();
        let Some(next) = next_run(&schedule, now) else {
            warn!(schedule = %schedule.pattern, "housekeeping: the prune schedule never fires again; pruning is off");
            return;
        };
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        let nap = wait.min(MAX_SLEEP);
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(nap) => {}
        }
        if nap < wait {
            continue;
        }
        if let Err(e) = prune_once(&store, retention, now_ms()).await {
            error!(error = %e, "housekeeping: pruning failed; will try again at the next scheduled time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn next_run_follows_the_cron_expression_in_utc() {
        let cron = croner::Cron::from_str("17 4 * * *").expect("cron");
        let at = DateTime::parse_from_rfc3339("2026-11-26T19:30:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let next = next_run(&cron, at).expect("next");
        assert_eq!(next.to_rfc3339(), "2026-11-27T04:17:00+00:00");
        let six = croner::Cron::from_str("*/10 * * * * *").expect("seconds cron");
        let next = next_run(&six, at).expect("next");
        assert_eq!(next.to_rfc3339(), "2026-11-26T19:30:10+00:00");
    }
}
