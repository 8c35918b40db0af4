//! `redeliver`: replay deliveries of one event, one task, or everything given up or delivered
//! since a time, keeping each delivery's `webhook-id`; then wake the forwarder.

use tracing::info;

use super::{Control, check_id, not_found, store_error};
use crate::clock::now_ms;
use crate::protocol::{ErrorBody, RedeliverRequest, RedeliverResponse};
use crate::store::Replay;

pub(super) async fn run(
    req: RedeliverRequest,
    ctx: &Control,
) -> Result<RedeliverResponse, ErrorBody> {
    let bad = |m: String| ErrorBody::new("bad_request", m);
    let time = |field: &str, s: &str| {
        crate::clock::parse_utc(s).ok_or_else(|| {
            bad(format!(
                "`{field}` must be an RFC 3339 time like 2026-11-26T10:00:00Z, not {s:?}"
            ))
        })
    };
    let chosen = [
        req.seq.is_some(),
        req.task_id.is_some(),
        req.failed_since.is_some(),
        req.sent_since.is_some(),
    ]
    .into_iter()
    .filter(|b| *b)
    .count();
    if chosen != 1 {
        return Err(bad(
            "give exactly one of `seq`, `task_id`, `failed_since`, `sent_since`".to_owned(),
        ));
    }
    let what = if let Some(seq) = req.seq {
        Replay::Event(seq)
    } else if let Some(task) = &req.task_id {
        check_id(task)?;
        Replay::Task(task.clone())
    } else if let Some(t) = &req.failed_since {
        Replay::FailedSince(time("failed_since", t)?)
    } else {
        Replay::SentSince(time(
            "sent_since",
            req.sent_since.as_deref().unwrap_or_default(),
        )?)
    };
    if let Some(target) = &req.target {
        let known = ctx
            .router
            .config()
            .targets
            .iter()
            .any(|t| &t.name == target)
            || target == crate::store::TARGET_TASK_URL
            || target == crate::store::TARGET_SUBMITTED_URL;
        if !known {
            let forward = ctx.router.config();
            let mut names: Vec<&str> = forward.targets.iter().map(|t| t.name.as_str()).collect();
            names.extend([
                crate::store::TARGET_TASK_URL,
                crate::store::TARGET_SUBMITTED_URL,
            ]);
            return Err(ErrorBody::new(
                "not_found",
                format!("no target named {target:?}; targets: {}", names.join(", ")),
            ));
        }
    }
    // The kind of the task replayed: a target that takes only other kinds gets no new
    // delivery of it (replays of the failed or delivered span only repeat existing ones).
    let mut kind = None;
    if let Replay::Event(seq) = what {
        let found = ctx
            .store
            .events(seq - 1, None, Some(1))
            .await
            .map_err(|e| store_error(&e))?;
        match found.first() {
            Some(e) if e.seq == seq => kind = Some(e.kind),
            _ => return Err(ErrorBody::new("not_found", format!("no event #{seq}"))),
        }
    }
    if let Replay::Task(task) = &what {
        match ctx
            .store
            .show(task.clone())
            .await
            .map_err(|e| store_error(&e))?
        {
            Some((t, _)) => kind = Some(t.kind),
            None => return Err(not_found(task)),
        }
    }
    let config = ctx.router.config();
    let routes = ctx
        .router
        .configured_routes()
        .into_iter()
        .filter(|r| {
            kind.is_none_or(|k| {
                config
                    .targets
                    .iter()
                    .find(|t| t.name == r.target)
                    .is_none_or(|t| t.takes_kind(k))
            })
        })
        .collect();
    let count = ctx
        .store
        .redeliver(what.clone(), req.target.clone(), routes, now_ms())
        .await
        .map_err(|e| store_error(&e))?;
    if count > 0 {
        ctx.redeliver.notify_one();
    }
    info!(what = ?what, target = req.target.as_deref().unwrap_or("all"), deliveries = count, "redelivery requested");
    Ok(RedeliverResponse {
        deliveries: count as u64,
    })
}
