//! `add`: validate the IDs, label and URL, store the new tasks, wake the scheduler.

use tracing::info;

use super::{Control, store_error};
use crate::clock::{ms, now_ms};
use crate::protocol::{
    AddRequest, AddResponse, ErrorBody, check_callback_url, check_label, check_task_ids,
};
use crate::store::AddResult;

/// IDs named in the log line of one `add`; the rest are counted.
const ADD_LOG_IDS: usize = 5;

pub(super) async fn run(req: AddRequest, ctx: &Control) -> Result<AddResponse, ErrorBody> {
    check_task_ids(&req.task_ids)?;
    if let Some(label) = &req.label {
        check_label(label)?;
    }
    if let Some(url) = &req.callback_url {
        check_callback_url(url)?;
        // The same rule as for a submitted callBackUrl: whoever can reach the socket must not
        // make the daemon POST (signed) events to any host it can reach.
        if !ctx.router.submitted_url_allowed(url) {
            let host = url::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(ErrorBody::new(
                "invalid_callback_url",
                format!(
                    "the callback URL's host {host:?} is not in forward.allow-hosts ({}); add it there to send events to it",
                    ctx.router.config().allow_hosts.join(", ")
                ),
            ));
        }
    }
    let mut seen = std::collections::HashSet::with_capacity(req.task_ids.len());
    let ids: Vec<String> = req
        .task_ids
        .into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect();
    let (now, deadline) = (now_ms(), ms(ctx.policy.task_deadline));
    let tasks = if req.again {
        ctx.store
            .retrack(ids, req.callback_url, req.label, now, deadline)
            .await
    } else {
        ctx.store
            .add(ids, req.callback_url, req.label, now, deadline)
            .await
    }
    .map_err(|e| store_error(&e))?;
    let added: Vec<&str> = tasks
        .iter()
        .filter(|t| t.result != AddResult::Exists)
        .map(|t| t.task_id.as_str())
        .collect();
    if !added.is_empty() {
        ctx.wake.notify_one();
        // One line per request, whatever its size: the count, and enough IDs to find it again.
        let shown = if added.len() <= ADD_LOG_IDS {
            added.join(",")
        } else {
            format!("{},…", added[..ADD_LOG_IDS].join(","))
        };
        info!(task_ids = %shown, count = added.len(), "tasks added");
    }
    let added = added.len();
    let existing = tasks.len() - added;
    Ok(AddResponse {
        added: added as u64,
        existing: existing as u64,
        tasks,
    })
}
