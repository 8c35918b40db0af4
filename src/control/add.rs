//! `add`: validate the IDs, label and URL, store the new tasks, wake the scheduler.

use tracing::info;

use super::{Control, store_error};
use crate::api::families::Kind;
use crate::clock::{ms, now_ms};
use crate::protocol::{
    AddRequest, AddResponse, ErrorBody, check_callback_url, check_label, check_task_ids,
};
use crate::store::{AddResult, TaskSpec};

/// IDs named in the log line of one `add`; the rest are counted.
const ADD_LOG_IDS: usize = 5;

pub(super) async fn run(req: AddRequest, ctx: &Control) -> Result<AddResponse, ErrorBody> {
    check_task_ids(&req.task_ids)?;
    let kind = match req.kind.as_deref() {
        None => Kind::Music,
        Some(k) => Kind::parse(k).ok_or_else(|| {
            ErrorBody::new(
                "invalid_kind",
                format!(
                    "{:?} is not a task kind; the kinds are {}",
                    crate::api::clip(k, 40),
                    Kind::names()
                ),
            )
        })?,
    };
    let account = match req.account.as_deref() {
        None => &ctx.accounts[0],
        Some(name) => ctx
            .accounts
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = ctx.accounts.iter().map(|a| a.name.as_str()).collect();
                ErrorBody::new(
                    "unknown_account",
                    format!(
                        "no account is named {:?}; the configured accounts are {}",
                        crate::api::clip(name, 40),
                        names.join(", ")
                    ),
                )
            })?,
    };
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
    let spec = TaskSpec {
        kind,
        account: account.name.clone(),
        callback_url: req.callback_url,
        label: req.label,
    };
    let tasks = if req.again {
        ctx.store.retrack(ids, spec, now, deadline).await
    } else {
        ctx.store.add(ids, spec, now, deadline).await
    }
    .map_err(|e| {
        // Said outright: the client must know that it has to try again.
        let mut body = store_error(&e);
        body.message = format!("nothing was added: {}", body.message);
        body
    })?;
    let conflicts: Vec<String> = tasks
        .iter()
        .filter(|t| t.result == AddResult::OtherKind)
        .map(|t| format!("{} is a {} task", t.task_id, t.kind))
        .collect();
    if !conflicts.is_empty() {
        let shown = if conflicts.len() <= ADD_LOG_IDS {
            conflicts.join(", ")
        } else {
            format!(
                "{}, and {} more",
                conflicts[..ADD_LOG_IDS].join(", "),
                conflicts.len() - ADD_LOG_IDS
            )
        };
        return Err(ErrorBody::new(
            "kind_conflict",
            format!(
                "nothing was added: {shown}, not {kind}; one task is one (kind, ID). Add it with \
                 its own --kind, or remove it first"
            ),
        ));
    }
    let added: Vec<&str> = tasks
        .iter()
        .filter(|t| t.result != AddResult::Exists)
        .map(|t| t.task_id.as_str())
        .collect();
    if !added.is_empty() {
        account.wake.notify_one();
        // One line per request, whatever its size: the count, and enough IDs to find it again.
        let shown = if added.len() <= ADD_LOG_IDS {
            added.join(",")
        } else {
            format!("{},…", added[..ADD_LOG_IDS].join(","))
        };
        info!(task_ids = %shown, count = added.len(), kind = %kind, account = %account.name, "tasks added");
    }
    let added = added.len();
    let existing = tasks.len() - added;
    Ok(AddResponse {
        added: added as u64,
        existing: existing as u64,
        tasks,
    })
}
