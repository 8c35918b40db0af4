//! The `accounts` table: per account, its pause (so a restart resumes a pause instead of
//! hammering an API that asked us to wait) and the request rate it learnt from throttling.

use rusqlite::{Connection, OptionalExtension, params};

use super::Sql;
use crate::store::{AccountRow, GateRow, PauseKind};

pub(super) fn load(conn: &Connection, account: &str) -> Sql<AccountRow> {
    let row = conn
        .prepare_cached(
            "SELECT pause_kind, attempt, paused_until, since, cause, learnt_rate
             FROM accounts WHERE name = ?1",
        )?
        .query_row([account], |r| {
            let kind: Option<PauseKind> = r.get(0)?;
            Ok(AccountRow {
                gate: match kind {
                    None => None,
                    Some(kind) => Some(GateRow {
                        kind,
                        attempt: r.get(1)?,
                        paused_until: r.get(2)?,
                        since: r.get(3)?,
                        cause: r.get(4)?,
                    }),
                },
                learnt_rate: r.get(5)?,
            })
        })
        .optional()?;
    Ok(row.unwrap_or_default())
}

pub(super) fn save(conn: &Connection, account: &str, gate: Option<GateRow>) -> Sql<()> {
    match gate {
        None => conn
            .prepare_cached(
                "UPDATE accounts SET pause_kind = NULL, attempt = 0, paused_until = 0, since = 0,
                        cause = '' WHERE name = ?1",
            )?
            .execute([account])?,
        Some(g) => conn
            .prepare_cached(
                "INSERT INTO accounts (name, pause_kind, attempt, paused_until, since, cause)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (name) DO UPDATE SET pause_kind = ?2, attempt = ?3, paused_until = ?4,
                        since = ?5, cause = ?6",
            )?
            .execute(params![
                account,
                g.kind,
                g.attempt,
                g.paused_until,
                g.since,
                g.cause
            ])?,
    };
    Ok(())
}

pub(super) fn save_rate(conn: &Connection, account: &str, rate: Option<f64>) -> Sql<()> {
    conn.prepare_cached(
        "INSERT INTO accounts (name, learnt_rate) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET learnt_rate = ?2",
    )?
    .execute(params![account, rate])?;
    Ok(())
}
