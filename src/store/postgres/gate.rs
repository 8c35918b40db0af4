//! The `accounts` table on PostgreSQL: each account's pause and learnt rate, shared by every
//! daemon polling the account.

use deadpool_postgres::GenericClient;

use super::codec::count;
use super::schema::DB_NOW;
use super::{Sql, execute, query_opt};
use crate::store::{AccountRow, GateRow, PauseKind};

pub(super) async fn load(c: &impl GenericClient, account: &str) -> Sql<AccountRow> {
    let Some(r) = query_opt(
        c,
        "SELECT pause_kind, attempt, paused_until, since, cause, learnt_rate
         FROM accounts WHERE name = $1",
        &[&account],
    )
    .await?
    else {
        return Ok(AccountRow::default());
    };
    let kind: Option<PauseKind> = r.try_get(0)?;
    Ok(AccountRow {
        gate: match kind {
            None => None,
            Some(kind) => Some(GateRow {
                kind,
                attempt: count(r.try_get(1)?),
                paused_until: r.try_get(2)?,
                since: r.try_get(3)?,
                cause: r.try_get(4)?,
            }),
        },
        learnt_rate: r.try_get(5)?,
    })
}

pub(super) async fn save(c: &impl GenericClient, account: &str, gate: Option<GateRow>) -> Sql<()> {
    match gate {
        None => {
            execute(
                c,
                "UPDATE accounts SET pause_kind = NULL, attempt = 0, paused_until = 0, since = 0,
                        cause = '', probe_by = NULL, probe_until = NULL WHERE name = $1",
                &[&account],
            )
            .await?
        }
        Some(g) => {
            execute(
                c,
                "INSERT INTO accounts (name, pause_kind, attempt, paused_until, since, cause)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET pause_kind = $2, attempt = $3,
                        paused_until = $4, since = $5, cause = $6, probe_by = NULL,
                        probe_until = NULL",
                &[
                    &account,
                    &g.kind,
                    &i64::from(g.attempt),
                    &g.paused_until,
                    &g.since,
                    &g.cause,
                ],
            )
            .await?
        }
    };
    Ok(())
}

/// Claims the probe after `account`'s pause for `me`, until the lease runs out (the database's
/// clock): `false` while another daemon holds it. An account with no row has no pause to
/// share: the probe is `me`'s.
pub(super) async fn claim_probe(
    c: &impl GenericClient,
    account: &str,
    me: &str,
    lease_ms: i64,
) -> Sql<bool> {
    let row = query_opt(
        c,
        &format!(
            "UPDATE accounts SET probe_by = $2, probe_until = {DB_NOW} + $3
             WHERE name = $1
               AND (probe_by IS NULL OR probe_by = $2 OR probe_until < {DB_NOW})
             RETURNING 1"
        ),
        &[&account, &me, &lease_ms],
    )
    .await?;
    if row.is_some() {
        return Ok(true);
    }
    Ok(
        query_opt(c, "SELECT 1 FROM accounts WHERE name = $1", &[&account])
            .await?
            .is_none(),
    )
}

pub(super) async fn save_rate(c: &impl GenericClient, account: &str, rate: Option<f64>) -> Sql<()> {
    execute(
        c,
        "INSERT INTO accounts (name, learnt_rate) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET learnt_rate = $2",
        &[&account, &rate],
    )
    .await?;
    Ok(())
}
