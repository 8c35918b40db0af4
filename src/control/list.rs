//! `list`: tasks, newest first, optionally of one state.

use super::{Control, store_error};
use crate::protocol::{ErrorBody, ListRequest, ListResponse, TaskView};
use crate::store::TaskState;

pub(super) async fn run(req: ListRequest, ctx: &Control) -> Result<ListResponse, ErrorBody> {
    let state = match req.state.as_deref() {
        None | Some("all") => None,
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            ErrorBody::new(
                "bad_request",
                format!("unknown state {s:?}; use active, done, failed, removed or all"),
            )
        })?),
    };
    let tasks = ctx
        .store
        .list(state, req.limit)
        .await
        .map_err(|e| store_error(&e))?;
    Ok(ListResponse {
        tasks: tasks.into_iter().map(TaskView::from_record).collect(),
    })
}
