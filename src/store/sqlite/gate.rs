//! The `gate` table: at most one row, the global pause.

use rusqlite::{Connection, OptionalExtension, params};

use super::Sql;
use crate::store::GateRow;

pub(super) fn load(conn: &Connection) -> Sql<Option<GateRow>> {
    Ok(conn
        .query_row(
            "SELECT kind, attempt, paused_until, since, cause FROM gate WHERE id = 1",
            [],
            |r| {
                Ok(GateRow {
                    kind: r.get(0)?,
                    attempt: r.get(1)?,
                    paused_until: r.get(2)?,
                    since: r.get(3)?,
                    cause: r.get(4)?,
                })
            },
        )
        .optional()?)
}

pub(super) fn save(conn: &Connection, gate: Option<GateRow>) -> Sql<()> {
    match gate {
        None => conn.execute("DELETE FROM gate", [])?,
        Some(g) => conn.execute(
            "INSERT INTO gate (id, kind, attempt, paused_until, since, cause) VALUES (1, ?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET kind = ?1, attempt = ?2, paused_until = ?3, since = ?4, cause = ?5",
            params![g.kind, g.attempt, g.paused_until, g.since, g.cause],
        )?,
    };
    Ok(())
}
