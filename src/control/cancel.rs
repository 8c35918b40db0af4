//! `cancel`: give up the pending deliveries of one event or one task, for a handler that will
//! never take them (a wrong per-task URL, a task nobody wants any more) instead of letting
//! them retry for a day.

use tracing::info;

use super::{Control, check_id, store_error};
use crate::clock::now_ms;
use crate::protocol::{CancelRequest, CancelResponse, ErrorBody};
use crate::store::Replay;

pub(super) async fn run(req: CancelRequest, ctx: &Control) -> Result<CancelResponse, ErrorBody> {
    let what = match (req.seq, req.task_id) {
        (Some(seq), None) => Replay::Event(seq),
        (None, Some(task)) => {
            check_id(&task)?;
            Replay::Task(task)
        }
        _ => {
            return Err(ErrorBody::new(
                "bad_request",
                "give exactly one of `seq`, `task_id`",
            ));
        }
    };
    let shown = match &what {
        Replay::Event(seq) => format!("event #{seq}"),
        Replay::Task(task) => format!("task {task}"),
        Replay::FailedSince(_) | Replay::SentSince(_) => String::new(),
    };
    let cancelled = ctx
        .store
        .cancel_deliveries(what, now_ms())
        .await
        .map_err(|e| store_error(&e))?;
    if cancelled > 0 {
        info!(of = %shown, cancelled, "pending deliveries cancelled");
    }
    Ok(CancelResponse {
        cancelled: cancelled as u64,
    })
}
