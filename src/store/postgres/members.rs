//! Retiring a member of a shared queue: `sunopoll store forget-member MEMBER`.
//!
//! A member (a host and its control socket) registers the targets its configuration names, and
//! the registration outlives the daemon's stops, so that deliveries to a target whose every
//! daemon is down wait for one to return. A host that is gone for good never returns: its
//! registrations keep routing events to its targets, and deliveries to a target only it named
//! wait forever. Forgetting the member removes its registrations; a pending delivery whose target
//! no other member names is then given up (as at the start of a daemon whose config dropped the
//! target), and the others stay pending for the members that still name their target.

use deadpool_postgres::GenericClient;

use super::connect::{self, PgOptions};
use super::schema::{self, DB_NOW};
use super::{Sql, describe, execute, query, query_opt};
use crate::store::StoreError;
use crate::store::{TARGET_SUBMITTED_URL, TARGET_TASK_URL};

/// One target the member had registered, and what becomes of its pending deliveries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgottenTarget {
    /// The target's name.
    pub name: String,
    /// The other members that still name it (sorted): if any, its deliveries stay pending.
    pub still_named_by: Vec<String>,
    /// Its pending deliveries.
    pub pending: i64,
}

/// What `forget-member` found, and did unless it was a dry run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetReport {
    /// The member asked about.
    pub member: String,
    /// Its registered targets (empty: the member is unknown, and nothing was done).
    pub targets: Vec<ForgottenTarget>,
    /// Every member with a registration on the queue, for an unknown one's message.
    pub members: Vec<String>,
    /// A daemon of this member that is running (its name and last beat, the database's clock):
    /// nothing was done, since it would register its targets again at its next start or reload
    /// while routing around them meanwhile.
    pub running: Option<(String, i64)>,
    /// Pending deliveries given up (0 on a dry run).
    pub given_up: usize,
    /// Whether this was a dry run (nothing written).
    pub dry_run: bool,
}

/// Forgets `member`'s target registrations on the database `options` names (unless `dry_run`),
/// in one transaction, and gives up pending deliveries no other member's target takes. Nothing
/// is done while a daemon of that member is running (it beat within one lease).
pub async fn forget_member(
    options: &PgOptions,
    member: &str,
    dry_run: bool,
) -> Result<ForgetReport, StoreError> {
    let shown = options.shown();
    let open = |what: String| StoreError::Open(format!("store {shown}: {what}"));
    let pool = options.pool().map_err(open)?;
    let mut conn = pool
        .get()
        .await
        .map_err(|e| open(connect::describe_pool(&e)))?;
    schema::migrate(&mut conn).await.map_err(open)?;
    let tx = conn
        .transaction()
        .await
        .map_err(|e| StoreError::Fault(describe(&e)))?;
    let lease = i64::try_from(options.lease.as_millis()).unwrap_or(i64::MAX);
    let report = plan(&tx, member, lease, dry_run)
        .await
        .map_err(super::Error::into_store)?;
    if !dry_run && report.running.is_none() && !report.targets.is_empty() {
        let given_up = forget(&tx, member)
            .await
            .map_err(super::Error::into_store)?;
        tx.commit()
            .await
            .map_err(|e| StoreError::Fault(describe(&e)))?;
        return Ok(ForgetReport { given_up, ..report });
    }
    Ok(report)
}

/// What forgetting `member` would do, with its registrations locked until the commit so a
/// member starting meanwhile waits.
async fn plan(
    c: &impl GenericClient,
    member: &str,
    lease_ms: i64,
    dry_run: bool,
) -> Sql<ForgetReport> {
    let members: Vec<String> = query(
        c,
        "SELECT DISTINCT member FROM targets ORDER BY member",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.try_get(0))
    .collect::<Result<_, _>>()?;
    let running = query_opt(
        c,
        &format!(
            "SELECT id, beat_at FROM daemons WHERE member = $1 AND beat_at >= {DB_NOW} - $2
             ORDER BY beat_at DESC LIMIT 1"
        ),
        &[&member, &lease_ms],
    )
    .await?
    .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
    .transpose()?;
    let rows = query(
        c,
        "SELECT t.name,
                COALESCE((SELECT array_agg(o.member ORDER BY o.member) FROM targets o
                          WHERE o.name = t.name AND o.member <> $1), '{}'),
                (SELECT COUNT(*) FROM deliveries d WHERE d.target = t.name AND d.state = 'pending')
         FROM targets t WHERE t.member = $1 ORDER BY t.name FOR UPDATE OF t",
        &[&member],
    )
    .await?;
    let targets = rows
        .iter()
        .map(|r| {
            Ok(ForgottenTarget {
                name: r.try_get(0)?,
                still_named_by: r.try_get(1)?,
                pending: r.try_get(2)?,
            })
        })
        .collect::<Sql<Vec<_>>>()?;
    Ok(ForgetReport {
        member: member.to_owned(),
        targets,
        members,
        running,
        given_up: 0,
        dry_run,
    })
}

/// Removes `member`'s registrations and gives up the pending deliveries whose target no member
/// names any more. Returns how many were given up.
async fn forget(c: &impl GenericClient, member: &str) -> Sql<usize> {
    execute(c, "DELETE FROM targets WHERE member = $1", &[&member]).await?;
    let now = crate::clock::now_ms();
    execute(
        c,
        "UPDATE deliveries SET state = 'failed', updated_at = $1,
                last_error = 'no member of the queue names the target any more (forget-member)',
                claimed_by = NULL, lease_until = NULL
         WHERE state = 'pending' AND target NOT IN ($2, $3)
           AND target NOT IN (SELECT name FROM targets)",
        &[&now, &TARGET_TASK_URL, &TARGET_SUBMITTED_URL],
    )
    .await
}
