//! `status`: daemon health. Never an error: a store that does not answer is reported as a
//! problem in the answer, which is where monitoring reads it.

use std::time::Duration;

use super::Control;
use crate::clock::{format_duration, format_utc, ms, now_ms};
use crate::jobs::gate::PauseKind;
use crate::protocol::{ErrorBody, StatusResponse, TargetStatus};

pub(super) async fn run(ctx: &Control) -> Result<StatusResponse, ErrorBody> {
    // A store that cannot commit (disk full, locked) must not turn `status` into an error: the
    // report is exactly where an operator or a monitoring check should read that the store is
    // failing. Whatever the store cannot say is left out (`tasks` is null) and listed as a
    // problem.
    let mut problems = Vec::new();
    let counts = match ctx.store.counts().await {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(format!(
                "the store is not answering ({e}): check the store's disk and directory; adds are refused until it answers"
            ));
            None
        }
    };
    let mut targets: Vec<TargetStatus> = match ctx.store.target_summary().await {
        Ok(t) => t.into_iter().map(TargetStatus::from_summary).collect(),
        Err(e) => {
            if counts.is_some() {
                problems.push(format!(
                    "the store is not answering ({e}): check the store's disk and directory"
                ));
            }
            Vec::new()
        }
    };
    for t in &ctx.router.config().targets {
        if !targets.iter().any(|s| s.target == t.name) {
            targets.push(TargetStatus::idle(t.name.clone()));
        }
    }
    let mut poll = ctx.status.lock().map(|s| s.clone()).unwrap_or_default();
    // The loop refreshes its status when it wakes, which during a long pause may be rarely:
    // measure the pause now.
    if let Some(since) = poll
        .paused_since
        .as_deref()
        .and_then(crate::clock::parse_utc)
    {
        poll.paused_for_ms = (now_ms() - since).max(0);
    }
    if poll.pause_kind == Some(PauseKind::Unauthorized) {
        problems.push(format!(
            "the API rejected the API key ({}): check the key ($CREDENTIALS_DIRECTORY/api-key, \
             api.key-file or SUNO_API_KEY) and the account's credits; polling resumes by itself \
             once a probe is accepted",
            poll.pause_cause.as_deref().unwrap_or("401")
        ));
    } else if poll.pause_kind.is_some() && poll.paused_for_ms > ms(ctx.policy.backoff_max) {
        problems.push(format!(
            "polling has been paused for {} (longer than backoff-max {}): {}; the API is down or \
             refusing — nothing is lost, and polling resumes with one probe when it answers",
            format_duration(Duration::from_millis(poll.paused_for_ms.unsigned_abs())),
            format_duration(ctx.policy.backoff_max),
            poll.pause_cause.as_deref().unwrap_or("no cause given")
        ));
    }
    if let Some((at, e)) = ctx.store.health().last_error()
        && counts.is_some()
    {
        problems.push(format!(
            "store error at {}: {e}; check free space and the store's directory — adds are \
             refused and polling waits until a write succeeds",
            format_utc(at)
        ));
    }
    Ok(StatusResponse {
        version: crate::VERSION.to_owned(),
        healthy: problems.is_empty(),
        problems,
        started_at: format_utc(ctx.info.started_at),
        uptime_ms: now_ms() - ctx.info.started_at,
        config: ctx.info.config.clone(),
        store: ctx.info.store.clone(),
        socket: ctx.info.socket.clone(),
        tasks: counts,
        poll,
        targets,
    })
}
