//! The store thread and group commit.
//!
//! Every read and write is a job sent to this thread. It takes whatever jobs are waiting, runs
//! them in one transaction (each inside its own savepoint, so one failing job undoes only
//! itself), commits once, and only then answers each caller. With `synchronous=FULL` every
//! commit is an fsync, and sharing it between concurrent polls is what lets a small machine
//! write thousands of results a second while an acknowledged `add` is still on disk before the
//! caller hears "ok". Before each batch, and every few seconds when idle, it checks that the
//! store's path still names the file it opened: a deleted or replaced store fails every job (and
//! the health probe) instead of acknowledging writes into a file no later start will see.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::schema::StoreFile;
use crate::store::{StoreError, StoreHealth};

/// Jobs waiting for the store thread. Bounded so a flood of requests queues in the callers
/// (as backpressure), not in memory here.
const QUEUE: usize = 1024;

/// Most jobs in one transaction. Large enough to share an fsync among a burst of polls, small
/// enough that one commit never holds the thread for long.
const MAX_BATCH: usize = 256;

/// How long a probe waits for the write lock. Short, because `status` waits for the probe and
/// must answer within a second while another process holds the lock; a commit of our own
/// holds it for milliseconds.
const PROBE_WAIT: Duration = Duration::from_millis(300);

type Completion = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;
/// A job runs against the connection inside the batch's transaction and says whether it
/// succeeded (and if not, whether the store itself failed), returning what to do once the
/// transaction has ended. Given `None`, it must not run: there is no transaction to run in.
type Job =
    Box<dyn FnOnce(Option<&Connection>) -> (Result<(), Option<StoreError>>, Completion) + Send>;

/// What the store thread receives.
pub(super) enum Message {
    Job(Job),
    /// Prove the write path works now: take the write lock (waiting at most [`PROBE_WAIT`])
    /// and release it without writing. Run after the jobs already waiting.
    Probe(oneshot::Sender<Result<(), StoreError>>),
    /// Finish, close the database, release the lock, then answer.
    Close(oneshot::Sender<()>),
    /// Check that the store file is still in place, even with nothing to write (sent every
    /// [`FILE_CHECK_INTERVAL`]).
    Check,
}

/// How often an idle store checks that its file is still in place: a deleted store shows in
/// `status` and the log within this, not only at the next write.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the thread that owns `conn` (and `file`, whose lock is released when the thread
/// ends, after the connection has closed).
pub(super) fn spawn(
    conn: Connection,
    file: StoreFile,
    health: Arc<StoreHealth>,
) -> std::io::Result<mpsc::Sender<Message>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    std::thread::Builder::new()
        .name("sunopoll-store".to_owned())
        .spawn(move || {
            let mut watch = Watch {
                file: &file,
                reported: false,
            };
            let closed = run_jobs(&conn, rx, &health, &mut watch);
            drop(conn);
            drop(file);
            if let Some(ack) = closed {
                let _ = ack.send(());
            }
        })?;
    // The ticker holds only a weak handle: it never keeps the store open, and ends once the
    // store thread is gone.
    let weak = tx.downgrade();
    std::thread::Builder::new()
        .name("sunopoll-store-check".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(FILE_CHECK_INTERVAL);
                let Some(tx) = weak.upgrade() else { return };
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Message::Check) {
                    return;
                }
            }
        })?;
    Ok(tx)
}

/// Runs `f` inside the next transaction; answers once that transaction has committed.
pub(super) async fn call<T, F>(jobs: &mpsc::Sender<Message>, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move |conn| {
        let Some(conn) = conn else {
            // Not run: the completion carries the batch's error.
            let done: Completion = Box::new(move |commit| {
                let e = commit
                    .err()
                    .cloned()
                    .unwrap_or_else(|| StoreError::Fault("the transaction was lost".to_owned()));
                let _ = tx.send(Err(e));
            });
            return (Err(None), done);
        };
        let result = f(conn);
        let ok = match &result {
            Ok(_) => Ok(()),
            Err(e @ StoreError::Fault(_)) => Err(Some(e.clone())),
            Err(_) => Err(None),
        };
        let done: Completion = Box::new(move |commit| {
            let _ = tx.send(match commit {
                Ok(()) => result,
                Err(e) => Err(e.clone()),
            });
        });
        (ok, done)
    });
    jobs.send(Message::Job(job))
        .await
        .map_err(|_| StoreError::Closed)?;
    rx.await.map_err(|_| StoreError::Closed)?
}

/// Asks the thread whether it can write now (see [`Message::Probe`]).
pub(super) async fn probe(jobs: &mpsc::Sender<Message>) -> Result<(), StoreError> {
    let (tx, rx) = oneshot::channel();
    jobs.send(Message::Probe(tx))
        .await
        .map_err(|_| StoreError::Closed)?;
    rx.await.map_err(|_| StoreError::Closed)?
}

/// Asks the thread to finish its queue and close; returns once it has.
pub(super) async fn close(jobs: &mpsc::Sender<Message>) {
    let (tx, rx) = oneshot::channel();
    if jobs.send(Message::Close(tx)).await.is_ok() {
        let _ = rx.await;
    }
}

fn sqlite_error(e: rusqlite::Error) -> StoreError {
    super::Error::from(e).into_store()
}

/// The store thread: batches waiting jobs into one transaction each. Returns the
/// acknowledgement to send once the database is closed, if asked to close.
fn run_jobs(
    conn: &Connection,
    mut rx: mpsc::Receiver<Message>,
    health: &StoreHealth,
    watch: &mut Watch<'_>,
) -> Option<oneshot::Sender<()>> {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut probes = Vec::new();
    let mut closing = None;
    while closing.is_none() {
        match rx.blocking_recv() {
            None => break,
            Some(Message::Close(ack)) => closing = Some(ack),
            Some(Message::Job(job)) => batch.push(job),
            Some(Message::Probe(tx)) => probes.push(tx),
            Some(Message::Check) => {}
        }
        while batch.len() < MAX_BATCH && closing.is_none() && probes.is_empty() {
            match rx.try_recv() {
                Ok(Message::Job(job)) => batch.push(job),
                Ok(Message::Close(ack)) => closing = Some(ack),
                Ok(Message::Probe(tx)) => probes.push(tx),
                Ok(Message::Check) => {}
                Err(_) => break,
            }
        }
        let gone = watch.check(health);
        match &gone {
            Ok(()) => run_batch(conn, &mut batch, health),
            Err(e) => fail_batch(&mut batch, e, health),
        }
        if !probes.is_empty() {
            let answer = match gone {
                Ok(()) => probe_write(conn, health),
                Err(e) => Err(e),
            };
            for tx in probes.drain(..) {
                let _ = tx.send(answer.clone());
            }
        }
    }
    closing
}

/// Whether the store file is still the one opened at start (see [`StoreFile::check`]).
struct Watch<'a> {
    file: &'a StoreFile,
    /// True once the loss was logged: one error line, not one per refused write.
    reported: bool,
}

impl Watch<'_> {
    fn check(&mut self, health: &StoreHealth) -> Result<(), StoreError> {
        match self.file.check() {
            Ok(()) => {
                if self.reported {
                    tracing::info!("the store file is back in place; writing again");
                    self.reported = false;
                }
                Ok(())
            }
            Err(what) => {
                let e = StoreError::Fault(what);
                if !self.reported {
                    tracing::error!(error = %e, "store: refusing every write");
                    self.reported = true;
                }
                health.set(Some(&e));
                Err(e)
            }
        }
    }
}

/// Answers every job of `batch` with `e` without running any.
fn fail_batch(batch: &mut Vec<Job>, e: &StoreError, health: &StoreHealth) {
    let jobs = batch.len();
    for job in batch.drain(..) {
        let (_, done) = job(None);
        done(Err(e));
    }
    if jobs > 0 {
        health.committed(std::time::Duration::ZERO, jobs, false);
    }
}

/// Takes the write lock and releases it without writing; a failure (locked, read-only) is
/// recorded like a failed commit, so `status` keeps reporting it until a write succeeds.
fn probe_write(conn: &Connection, health: &StoreHealth) -> Result<(), StoreError> {
    let answer = conn
        .busy_timeout(PROBE_WAIT)
        .and_then(|()| conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;"))
        .map_err(sqlite_error);
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    if let Err(e) = conn.busy_timeout(Duration::from_millis(u64::from(
        super::schema::BUSY_TIMEOUT_MS,
    ))) {
        tracing::error!(error = %e, "store: cannot restore the busy timeout");
    }
    if let Err(e) = &answer {
        tracing::error!(error = %e, "store: cannot take the write lock");
        health.set(Some(e));
    }
    answer
}

/// Runs the waiting jobs in one transaction and answers each once it has ended.
fn run_batch(conn: &Connection, batch: &mut Vec<Job>, health: &StoreHealth) {
    if batch.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let jobs = batch.len();
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        // No transaction: no job may run (in autocommit mode its writes would land one by
        // one, half of an apply_poll say, while its caller hears it failed).
        let e = sqlite_error(e);
        health.set(Some(&e));
        tracing::error!(error = %e, "store: cannot begin a transaction");
        for job in batch.drain(..) {
            let (_, done) = job(None);
            done(Err(&e));
        }
        health.committed(started.elapsed(), jobs, false);
        return;
    }
    let mut completions = Vec::with_capacity(batch.len());
    let changes_before = conn.total_changes();
    let mut fault = None;
    let mut lost = None;
    for job in batch.drain(..) {
        if lost.is_some() {
            let (_, done) = job(None);
            completions.push(done);
            continue;
        }
        let savepoint = conn.execute_batch("SAVEPOINT job");
        let (ok, done) = job(Some(conn));
        if let Err(Some(e)) = &ok {
            fault = Some(e.clone());
        }
        if conn.is_autocommit() {
            // SQLite rolled the whole transaction back by itself (it does after some I/O,
            // full-disk and out-of-memory errors): every job of the batch is undone, and
            // the rest must not run outside a transaction.
            let e = fault
                .clone()
                .unwrap_or_else(|| StoreError::Fault("the transaction was rolled back".to_owned()));
            tracing::error!(error = %e, "store: the transaction was rolled back; failing the whole batch");
            lost = Some(e);
            completions.push(done);
            continue;
        }
        if savepoint.is_ok() {
            let end = if ok.is_ok() {
                "RELEASE job"
            } else {
                "ROLLBACK TO job; RELEASE job"
            };
            if let Err(e) = conn.execute_batch(end) {
                tracing::error!(error = %e, "store: cannot close a savepoint");
            }
        }
        completions.push(done);
    }
    let commit = match lost {
        Some(e) => Err(e),
        None => conn.execute_batch("COMMIT").map_err(sqlite_error),
    };
    if let Err(e) = &commit {
        tracing::error!(error = %e, "store: the batch failed and was rolled back");
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    match (&commit, fault) {
        (Err(e), _) => health.set(Some(e)),
        (Ok(()), Some(e)) => {
            tracing::error!(error = %e, "store: a request failed");
            health.set(Some(&e));
        }
        // Only a committed write proves the store works again.
        (Ok(()), None) if conn.total_changes() > changes_before => health.set(None),
        (Ok(()), None) => {}
    }
    health.committed(started.elapsed(), jobs, commit.is_ok());
    for done in completions {
        done(commit.as_ref().map(|_| ()));
    }
}
