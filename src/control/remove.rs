//! `remove`: stop polling a task; its events are kept.

use tracing::info;

use super::{Control, check_id, not_found, store_error};
use crate::clock::now_ms;
use crate::protocol::{ErrorBody, RemoveRequest, RemoveResponse};
use crate::store::TaskState;

pub(super) async fn run(req: RemoveRequest, ctx: &Control) -> Result<RemoveResponse, ErrorBody> {
    check_id(&req.task_id)?;
    let Some(was) = ctx
        .store
        .remove(req.task_id.clone(), now_ms())
        .await
        .map_err(|e| store_error(&e))?
    else {
        return Err(not_found(&req.task_id));
    };
    let removed = was == TaskState::Active;
    if removed {
        info!(task_id = %req.task_id, "task removed; it is no longer polled (its events are kept)");
    }
    Ok(RemoveResponse {
        task_id: req.task_id,
        was,
        removed,
    })
}
