//! The read path: a small pool of read-only connections for what operators and monitoring ask
//! (`status`, `list`, `show`, `events`, target summaries), so a query never waits behind the
//! store thread's commits, and the store thread never waits behind a query.
//!
//! WAL lets readers and the one writer work at once: each read runs in its own read
//! transaction on a snapshot of the last commit, so it sees everything that was acknowledged
//! before it began, and nothing half-written. Reads run in `spawn_blocking`, at most
//! [`READERS`] at a time; connections are opened when first needed and kept for the next read.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use super::{Error, Sql};
use crate::store::{StoreError, StoreHealth};

/// Reads at once. The machine this runs on may have two cores, and each read is short (every
/// query the read path makes is answered from an index or a kept count).
const READERS: usize = 2;

/// How long a read waits for a lock. In WAL mode a reader needs none that a writer holds, so
/// only exceptional states (WAL recovery after a crash, another process using an exclusive
/// locking mode) make it wait; an operator's query should then fail fast rather than hang.
const BUSY_TIMEOUT: Duration = Duration::from_millis(200);

/// The read-only connections of one store.
pub(super) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    health: Arc<StoreHealth>,
}

impl Readers {
    pub(super) fn new(path: PathBuf, health: Arc<StoreHealth>) -> Readers {
        Readers {
            path,
            idle: Mutex::new(Vec::with_capacity(READERS)),
            permits: Arc::new(Semaphore::new(READERS)),
            health,
        }
    }

    /// Runs `f` in one read transaction on a read-only connection. A store failure (I/O error,
    /// corruption) is recorded in the store's health like a failed commit; only a write
    /// clears it.
    pub(super) async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Sql<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let this = Arc::clone(self);
        let result = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            this.run(f)
        })
        .await
        .map_err(|e| StoreError::Fault(format!("a store read failed: {e}")))?;
        if let Err(e @ StoreError::Fault(_)) = &result {
            self.health.set(Some(e));
        }
        result
    }

    fn run<T>(&self, f: impl FnOnce(&Connection) -> Sql<T>) -> Result<T, StoreError> {
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match taken {
            Some(c) => c,
            None => self.open().map_err(Error::into_store)?,
        };
        let result = in_read_transaction(&conn, f);
        // A connection is kept only while the store is open (`close` takes the permits away
        // first, so nothing is put back after it).
        if !self.permits.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
        result.map_err(Error::into_store)
    }

    fn open(&self) -> Sql<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Temporary results go to a file, not memory: the read path has no sorts to hold, and
        // one that appeared (an operator's `--limit 0` of a million tasks, say) must not stay
        // in the process's resident memory.
        conn.execute_batch("PRAGMA temp_store = FILE;")?;
        Ok(conn)
    }

    /// Refuses new reads and closes the idle connections. A read already running finishes and
    /// its connection is closed with it.
    pub(super) fn close(&self) {
        self.permits.close();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

fn in_read_transaction<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Sql<T>) -> Sql<T> {
    // One snapshot for every statement of the read (a task and its events agree).
    conn.execute_batch("BEGIN DEFERRED")?;
    let result = f(conn);
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        return result.and(Err(e.into()));
    }
    result
}
