//! The daemons sharing one queue: each one's heartbeat row, the leases it holds, and letting
//! go of them when it stops.

use deadpool_postgres::GenericClient;

use super::schema::DB_NOW;
use super::{Postgres, Sql, execute, query, query_one};

/// One live daemon, as `status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DaemonRow {
    /// Its name: `host:pid:random`.
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process ID there.
    pub pid: i64,
    /// Its sunopoll version.
    pub version: String,
    /// When it started (the database's clock, Unix ms).
    pub started_at: i64,
    /// Its last heartbeat (the database's clock, Unix ms).
    pub beat_at: i64,
    /// The leases it holds now.
    pub leases: LeaseCount,
}

/// Live leases one daemon holds, per kind of work.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LeaseCount {
    /// Tasks it is polling (or about to).
    pub tasks: i64,
    /// Deliveries it is making.
    pub deliveries: i64,
    /// Archive files it is fetching.
    pub files: i64,
}

/// Work a daemon that stopped beating still holds a live lease on: `status` shows it, with how
/// long until the other daemons take it over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SilentHolder {
    /// The daemon's name (`host:pid:random`).
    pub id: String,
    /// Its last heartbeat (the database's clock, Unix ms); `None` once its row is gone.
    pub beat_at: Option<i64>,
    /// The live leases it holds, per kind of work.
    pub leases: LeaseCount,
    /// In how many ms the last of those leases runs out: by then all of it is free.
    pub free_in_ms: i64,
}

/// How often a daemon beats on a queue whose lease is `lease_ms`: every
/// [`super::HEARTBEAT_EVERY`], or a third of the lease if that is shorter.
pub(super) fn beat_every(lease_ms: i64) -> std::time::Duration {
    super::HEARTBEAT_EVERY.min(std::time::Duration::from_millis(
        lease_ms.max(3).unsigned_abs() / 3,
    ))
}

/// A daemon is taken to have stopped beating once two beats and a second have passed without
/// one: a beat delayed by a busy database is not a stop.
pub(super) fn silent_after_ms(lease_ms: i64) -> i64 {
    i64::try_from(beat_every(lease_ms).as_millis())
        .unwrap_or(i64::MAX / 4)
        .saturating_mul(2)
        .saturating_add(1000)
}

/// The daemons that stopped beating (their heartbeat older than [`silent_after_ms`], or gone)
/// and still hold live leases, with what they hold and when it is free.
pub(super) async fn silent(c: &impl GenericClient, lease_ms: i64) -> Sql<Vec<SilentHolder>> {
    let rows = query(
        c,
        &format!(
            "WITH held AS (
                 SELECT claimed_by AS id, 1 AS what, lease_until FROM tasks
                 WHERE claimed_by IS NOT NULL AND lease_until >= {DB_NOW}
                 UNION ALL
                 SELECT claimed_by, 2, lease_until FROM deliveries
                 WHERE claimed_by IS NOT NULL AND lease_until >= {DB_NOW}
                 UNION ALL
                 SELECT claimed_by, 3, lease_until FROM archive_files
                 WHERE claimed_by IS NOT NULL AND lease_until >= {DB_NOW}
             )
             SELECT h.id, d.beat_at,
                    COUNT(*) FILTER (WHERE what = 1), COUNT(*) FILTER (WHERE what = 2),
                    COUNT(*) FILTER (WHERE what = 3), MAX(h.lease_until) - {DB_NOW}
             FROM held h LEFT JOIN daemons d ON d.id = h.id
             WHERE d.id IS NULL OR d.beat_at < {DB_NOW} - $1
             GROUP BY h.id, d.beat_at ORDER BY h.id"
        ),
        &[&silent_after_ms(lease_ms)],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(SilentHolder {
                id: r.try_get(0)?,
                beat_at: r.try_get(1)?,
                leases: LeaseCount {
                    tasks: r.try_get(2)?,
                    deliveries: r.try_get(3)?,
                    files: r.try_get(4)?,
                },
                free_in_ms: r.try_get::<_, i64>(5)?.max(0),
            })
        })
        .collect()
}

/// This process's name among the daemons: unique even for two daemons started on one host in
/// the same second, and readable in `status`.
pub(super) fn my_name() -> String {
    format!(
        "{}:{}:{:06x}",
        host(),
        std::process::id(),
        fastrand::u32(..0x100_0000)
    )
}

/// This host's name, as `daemons` and the member names show it.
pub(super) fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// Renews `me`'s heartbeat row (creating it at the first beat) and forgets daemons that have
/// not beaten for ten leases: a host that died is listed as gone for a while, then dropped. One
/// statement, so it needs no transaction of its own (and is one round trip).
pub(super) async fn beat(c: &impl GenericClient, me: &str, member: &str, lease_ms: i64) -> Sql<()> {
    let pid = i64::from(std::process::id());
    execute(
        c,
        &format!(
            "WITH gone AS (DELETE FROM daemons WHERE beat_at < {DB_NOW} - $5 AND id <> $1)
             INSERT INTO daemons (id, host, pid, version, started_at, beat_at, member)
             VALUES ($1, $2, $3, $4, {DB_NOW}, {DB_NOW}, $6)
             ON CONFLICT (id) DO UPDATE SET beat_at = {DB_NOW}"
        ),
        &[
            &me,
            &host(),
            &pid,
            &env!("CARGO_PKG_VERSION"),
            &lease_ms.saturating_mul(10),
            &member,
        ],
    )
    .await?;
    Ok(())
}

/// The daemons whose last beat is within one lease, oldest first, with their live leases.
pub(super) async fn live(c: &impl GenericClient, lease_ms: i64) -> Sql<Vec<DaemonRow>> {
    let rows = query(
        c,
        &format!(
            "SELECT d.id, d.host, d.pid, d.version, d.started_at, d.beat_at,
                    (SELECT COUNT(*) FROM tasks t
                      WHERE t.claimed_by = d.id AND t.lease_until >= {DB_NOW}),
                    (SELECT COUNT(*) FROM deliveries l
                      WHERE l.claimed_by = d.id AND l.lease_until >= {DB_NOW}),
                    (SELECT COUNT(*) FROM archive_files f
                      WHERE f.claimed_by = d.id AND f.lease_until >= {DB_NOW})
             FROM daemons d WHERE d.beat_at >= {DB_NOW} - $1 ORDER BY d.started_at, d.id"
        ),
        &[&lease_ms],
    )
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DaemonRow {
                id: r.try_get(0)?,
                host: r.try_get(1)?,
                pid: r.try_get(2)?,
                version: r.try_get(3)?,
                started_at: r.try_get(4)?,
                beat_at: r.try_get(5)?,
                leases: LeaseCount {
                    tasks: r.try_get(6)?,
                    deliveries: r.try_get(7)?,
                    files: r.try_get(8)?,
                },
            })
        })
        .collect()
}

/// Releases every lease `me` holds and removes its heartbeat row: it is stopping.
pub(super) async fn leave(c: &impl GenericClient, me: &str) -> Sql<()> {
    for table in ["tasks", "deliveries", "archive_files"] {
        execute(
            c,
            &format!(
                "UPDATE {table} SET claimed_by = NULL, lease_until = NULL WHERE claimed_by = $1"
            ),
            &[&me],
        )
        .await?;
    }
    execute(c, "DELETE FROM daemons WHERE id = $1", &[&me]).await?;
    Ok(())
}

/// Proves writes can be made now without making one: the connection works and the server
/// takes writes (it is not a standby, nor set read-only).
pub(super) async fn probe(c: &impl GenericClient) -> Sql<()> {
    let r = query_one(
        c,
        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')",
        &[],
    )
    .await?;
    let standby: bool = r.try_get(0)?;
    let read_only: String = r.try_get(1)?;
    if standby || read_only == "on" {
        return Err(crate::store::StoreError::Fault(format!(
            "PostgreSQL takes no writes here ({}); point store.url at the primary",
            if standby {
                "the server is a standby"
            } else {
                "transactions are read-only"
            }
        ))
        .into());
    }
    Ok(())
}

/// Beats every [`super::HEARTBEAT_EVERY`] (or a third of the lease, if that is shorter: a
/// daemon is live while it beat within one lease) until the store closes. A failed beat is logged
/// once per outage, not every few seconds: the store's health already says the database is
/// unreachable.
pub(super) async fn heartbeat(pg: Postgres) {
    let mut failing = false;
    let every = beat_every(pg.lease_ms);
    loop {
        tokio::select! {
            () = pg.stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match pg.beat().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(store = %pg.shown(), "heartbeat written again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(store = %pg.shown(), problem = %e, "cannot write this daemon's heartbeat; other daemons may take its work after the lease");
            }
            Err(_) => {}
        }
    }
}
