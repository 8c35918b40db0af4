//! `status`: daemon health. Never an error: a store that does not answer is reported as a
//! problem in the answer, which is where monitoring reads it.

use std::time::Duration;

use super::Control;
use crate::clock::{format_duration, format_utc, ms, now_ms};
use crate::jobs::gate::PauseKind;
use crate::protocol::{ErrorBody, StatusResponse, TargetStatus};

/// Longest `status` waits for the store thread to prove it can write. Its probe waits 300 ms
/// for the write lock itself; the rest is for the jobs queued before it. `status` answers
/// within a second either way, which is what a health check needs.
const WRITE_PROBE_WAIT: Duration = Duration::from_millis(800);

pub(super) async fn run(ctx: &Control) -> Result<StatusResponse, ErrorBody> {
    // A store that cannot commit (disk full, locked) must not turn `status` into an error: the
    // report is exactly where an operator or a monitoring check should read that the store is
    // failing. Counts and target summaries come from the read path, so they answer at once
    // even while the write lock is held; whether the store can be written is asked of the
    // store thread itself, with a bound. Whatever the store cannot say is left out (`tasks` is
    // null) and listed as a problem.
    let (counts, breakdown, summary, writable) = tokio::join!(
        ctx.store.counts(),
        ctx.store.task_breakdown(),
        ctx.store.target_summary(),
        tokio::time::timeout(WRITE_PROBE_WAIT, ctx.store.probe_write()),
    );
    let mut problems = Vec::new();
    let mut answering = true;
    match writable {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            problems.push(format!("the store is not answering: {e}"));
            answering = false;
        }
        Err(_) => {
            problems.push(format!(
                "the store is not answering: no write could begin within {} (its lock is \
                 held, or the disk is very slow)",
                format_duration(WRITE_PROBE_WAIT)
            ));
            answering = false;
        }
    }
    let counts = match counts {
        Ok(c) => Some(c),
        Err(e) => {
            if answering {
                problems.push(format!(
                    "the store is not answering ({e}): check the store's disk and directory; adds are refused until it answers"
                ));
            }
            answering = false;
            None
        }
    };
    let mut targets: Vec<TargetStatus> = match summary {
        Ok(t) => t.into_iter().map(TargetStatus::from_summary).collect(),
        Err(e) => {
            if answering {
                problems.push(format!(
                    "the store is not answering ({e}): check the store's disk and directory; adds are refused until it answers"
                ));
            }
            answering = false;
            Vec::new()
        }
    };
    for t in &ctx.router.config().targets {
        if !targets.iter().any(|s| s.target == t.name) {
            targets.push(TargetStatus::idle(t.name.clone()));
        }
    }
    let several = ctx.accounts.len() > 1;
    let mut accounts = Vec::with_capacity(ctx.accounts.len());
    for account in &ctx.accounts {
        let mut poll = account.status.lock().map(|s| s.clone()).unwrap_or_default();
        // The loop refreshes its status when it wakes, which during a long pause may be
        // rarely: measure the pause now.
        if let Some(since) = poll
            .paused_since
            .as_deref()
            .and_then(crate::clock::parse_utc)
        {
            poll.paused_for_ms = (now_ms() - since).max(0);
        }
        // With one account, the problems read as they always have; with several, each says
        // whose it is.
        let whose = if several {
            format!("account {:?}: ", account.name)
        } else {
            String::new()
        };
        if poll.pause_kind == Some(PauseKind::Unauthorized) {
            problems.push(format!(
                "{whose}the API rejected the API key ({}): check the key ($CREDENTIALS_DIRECTORY/api-key, \
                 api.key-file or SUNO_API_KEY; api-key-NAME, key-file or SUNO_API_KEY_NAME for a \
                 named account) and the account's credits; polling resumes by itself once a probe \
                 is accepted",
                poll.pause_cause.as_deref().unwrap_or("401")
            ));
        } else if poll.pause_kind.is_some() && poll.paused_for_ms > ms(ctx.policy.backoff_max) {
            problems.push(format!(
                "{whose}polling has been paused for {} (longer than backoff-max {}): {}; the API is down or \
                 refusing — nothing is lost, and polling resumes with one probe when it answers",
                format_duration(Duration::from_millis(poll.paused_for_ms.unsigned_abs())),
                format_duration(ctx.policy.backoff_max),
                poll.pause_cause.as_deref().unwrap_or("no cause given")
            ));
        }
        accounts.push(poll);
    }
    let breakdown = breakdown.unwrap_or_default();
    for c in &breakdown {
        if c.state == crate::store::TaskState::Active
            && !ctx.accounts.iter().any(|a| a.name == c.account)
        {
            problems.push(format!(
                "{} active {} task{} belong to account {:?}, which is not configured: they are not \
                 polled until an [[api.account]] of that name is configured again (nothing is lost)",
                c.n,
                c.kind,
                if c.n == 1 { "" } else { "s" },
                c.account
            ));
        }
    }
    let poll = accounts.first().cloned().unwrap_or_default();
    if let Some((at, e)) = ctx.store.health().last_error()
        && answering
    {
        problems.push(format!(
            "store error at {}: {e}; check free space and the store's directory — adds are \
             refused and polling waits until a write succeeds",
            format_utc(at)
        ));
    }
    let (archive, archive_problem) = super::archive::status(ctx).await;
    problems.extend(archive_problem);
    let registered = match ctx.store.shared_targets().await {
        Some(Err(e)) => {
            problems.push(format!(
                "cannot list the targets registered on the queue: {e}"
            ));
            None
        }
        Some(Ok(r)) => Some(r),
        None => None,
    };
    let stalled = match ctx.store.silent_holders().await {
        Some(Err(e)) => {
            problems.push(format!(
                "cannot list the work of daemons that stopped beating: {e}"
            ));
            Vec::new()
        }
        Some(Ok(rows)) => rows
            .into_iter()
            .map(|h| crate::protocol::StalledView {
                id: h.id,
                beat_at: h.beat_at.map(format_utc),
                leased_tasks: h.leases.tasks,
                leased_deliveries: h.leases.deliveries,
                leased_files: h.leases.files,
                free_in_ms: h.free_in_ms,
            })
            .collect(),
        None => Vec::new(),
    };
    let shared = match ctx.store.daemons().await {
        None => None,
        Some(Err(e)) => {
            problems.push(format!("cannot list the daemons sharing the queue: {e}"));
            None
        }
        Some(Ok(rows)) => Some(crate::protocol::SharedQueueView {
            member: registered.as_ref().map(|r| r.0.clone()).unwrap_or_default(),
            targets: registered
                .map(|r| r.1)
                .unwrap_or_default()
                .into_iter()
                .map(|(name, members)| crate::protocol::SharedTargetView { name, members })
                .collect(),
            stalled,
            me: ctx.store.daemon_name().unwrap_or_default().to_owned(),
            lease_ms: ctx.store.lease_ms().unwrap_or_default(),
            daemons: rows
                .into_iter()
                .map(|d| crate::protocol::DaemonView {
                    id: d.id,
                    host: d.host,
                    pid: d.pid,
                    version: d.version,
                    started_at: format_utc(d.started_at),
                    beat_at: format_utc(d.beat_at),
                    leased_tasks: d.leases.tasks,
                    leased_deliveries: d.leases.deliveries,
                    leased_files: d.leases.files,
                })
                .collect(),
        }),
    };
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
        accounts,
        breakdown,
        targets,
        archive,
        shared,
        proxy: ctx.proxy.as_ref().map(|source| source()),
    })
}
