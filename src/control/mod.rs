//! The control server: the socket ([`socket`]: safe creation, permissions, the accept loop,
//! capped line reading) and one handler per command, each turning a typed request of
//! [`crate::protocol`] into that command's typed answer.
//!
//! The handlers build every answer people see: times from the store's Unix milliseconds to
//! RFC 3339, credentials redacted from URLs. The store only hands over its records.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Notify, watch};
use tracing::error;

use crate::config::PollConfig;
use crate::forward::Router;
use crate::jobs::gate::SharedStatus;
use crate::protocol::{
    AddRequest, AddResponse, ErrorBody, ProxyStatusView, Request, answer_line, check_task_id,
};
use crate::store::{Store, StoreError};

mod add;
mod archive;
mod cancel;
mod events;
mod list;
mod redeliver;
mod remove;
mod show;
pub mod socket;
mod status;

pub use socket::{BindError, ControlSocket, LineRead, bind, read_line, serve};

/// How long writing one response may take before the client is considered gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Descriptors kept back from the connection cap for everything else the daemon opens (the
/// store and its WAL, the log socket, files being read).
pub const FD_RESERVE: u64 = 64;

/// Fewest connections served at once, however low the open-files limit: `status` must get
/// through.
pub const MIN_CONNECTIONS: usize = 16;

/// Most connections served at once, however high the open-files limit (systemd's default
/// hard limit is 524 288): each costs a task, a buffer and, while it reads events or a long
/// list, one page, so the cap also bounds that memory.
pub const MAX_CONNECTIONS: usize = 4096;

/// The cap when the open-files limit cannot be read (not Linux, no /proc).
pub const FALLBACK_CONNECTIONS: usize = 512;

/// Connections served at once, from the process's soft open-files limit: half of what is left
/// after [`FD_RESERVE`], since each control connection may meet an outgoing one (a poll, a
/// delivery) and both need a descriptor; within [`MIN_CONNECTIONS`]..=[`MAX_CONNECTIONS`].
/// Past this, new clients get a "busy" (or an idle one is evicted) instead of the accept loop
/// failing with EMFILE. Pure.
pub fn connection_cap(soft_open_files: Option<u64>) -> usize {
    match soft_open_files {
        None => FALLBACK_CONNECTIONS,
        Some(n) => usize::try_from(n.saturating_sub(FD_RESERVE) / 2)
            .unwrap_or(MAX_CONNECTIONS)
            .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS),
    }
}

/// [`connection_cap`] for this process, read from `/proc/self/limits` ("unlimited" counts as
/// more than enough).
pub fn max_connections() -> usize {
    connection_cap(open_files_soft_limit())
}

/// The soft `RLIMIT_NOFILE` as `/proc/self/limits` shows it (no libc call needed).
fn open_files_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    match line.split_whitespace().nth(3)? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

/// Events per answer of a one-off `events` listing when the client sets no limit.
pub const EVENTS_PAGE: u32 = 1000;

/// Most events per one-off answer.
pub const EVENTS_PAGE_MAX: u32 = 10_000;

/// Facts about the running daemon that `status` reports.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    /// The config file, if any.
    pub config: Option<PathBuf>,
    /// The store: the SQLite file, or the PostgreSQL database (never its password).
    pub store: String,
    /// The socket.
    pub socket: PathBuf,
    /// Unix ms at start.
    pub started_at: i64,
}

/// One account's poll loop, as request handlers reach it.
#[derive(Debug, Clone)]
pub struct AccountHandle {
    /// Its name.
    pub name: String,
    /// Wakes its scheduler after an `add` of its tasks.
    pub wake: Arc<Notify>,
    /// Its scheduler's status.
    pub status: SharedStatus,
}

/// What request handlers share.
pub struct Control {
    /// The queue.
    pub store: Store,
    /// The accounts, in configured order: the first is the default for `add`. Never empty.
    pub accounts: Vec<AccountHandle>,
    /// The newest event sequence number.
    pub events: watch::Receiver<i64>,
    /// `[poll]` settings (deadline, backoff cap for health).
    pub policy: PollConfig,
    /// Facts for `status`.
    pub info: DaemonInfo,
    /// How long a connection may wait without sending a complete request.
    pub idle_timeout: Duration,
    /// Forward targets (for `redeliver` and `status`).
    pub router: Router,
    /// Wakes the forwarder after a `redeliver`.
    pub redeliver: Arc<Notify>,
    /// The archive, when `[archive]` is on.
    pub archive: Option<ArchiveControl>,
    /// What the API stand-in reports to `status`, when `[proxy] listen` is set.
    pub proxy: Option<ProxyStatusSource>,
}

/// Reads the API stand-in's figures for `status` (a closure, so the socket's side does not
/// depend on the stand-in's).
pub type ProxyStatusSource = Arc<dyn Fn() -> ProxyStatusView + Send + Sync>;

/// `add`, exactly as the socket runs it: the HTTP faces act through the socket's own calls,
/// never on the store directly.
pub async fn add(req: AddRequest, ctx: &Control) -> Result<AddResponse, ErrorBody> {
    add::run(req, ctx).await
}

/// What handlers need of the archive.
pub struct ArchiveControl {
    /// Where files are kept.
    pub sink: Arc<crate::archive::sink::Sink>,
    /// What the archive job reports.
    pub status: crate::jobs::archive::SharedArchiveStatus,
    /// Wakes the archive job after an `archive redo`.
    pub wake: Arc<Notify>,
}

/// Answers one request (anything but `events --follow`, which streams until the client goes)
/// on `write`, success or error. `list` and `events` write their answer a page at a time as
/// they read it (one answer line all the same); every other command's answer is small and
/// written whole.
async fn answer(request: Request, ctx: &Control, write: &mut OwnedWriteHalf) -> io::Result<()> {
    let line = match request {
        Request::List(req) => return list::stream(req, ctx, write).await,
        Request::Events(req) => return events::stream(req, ctx, write).await,
        Request::Add(req) => line(add::run(req, ctx).await),
        Request::Show(req) => line(show::run(req, ctx).await),
        Request::Remove(req) => line(remove::run(req, ctx).await),
        Request::Status(_) => line(status::run(ctx).await),
        Request::Redeliver(req) => line(redeliver::run(req, ctx).await),
        Request::Cancel(req) => line(cancel::run(req, ctx).await),
        Request::ArchiveRedo(req) => line(archive::redo(req, ctx).await),
    };
    socket::write_line(write, &line).await
}

/// The answer line for a handler's result.
fn line<T: Serialize>(answer: Result<T, ErrorBody>) -> String {
    match answer.map(|a| answer_line(&a)) {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => {
            // Only a value JSON cannot hold (a path that is not UTF-8) gets here.
            error!(error = %e, "cannot write a control answer");
            ErrorBody::new(
                "internal",
                format!("the answer cannot be written as JSON: {e}"),
            )
            .to_line()
        }
        Err(e) => e.to_line(),
    }
}

fn store_error(e: &StoreError) -> ErrorBody {
    ErrorBody::new("store_error", e.to_string())
}

/// A stored event whose body is not JSON: reported as the store error it is.
fn bad_record(message: String) -> ErrorBody {
    store_error(&StoreError::Sqlite(message))
}

fn not_found(id: &str) -> ErrorBody {
    ErrorBody::new(
        "not_found",
        format!("no task {id} (add it with `sunopoll add {id}`)"),
    )
}

fn check_id(id: &str) -> Result<(), ErrorBody> {
    check_task_id(id).map_err(|e| ErrorBody::new("invalid_task_id", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_follows_the_open_files_limit() {
        assert_eq!(connection_cap(None), FALLBACK_CONNECTIONS);
        assert_eq!(connection_cap(Some(1024)), 480);
        assert_eq!(connection_cap(Some(20_000)), MAX_CONNECTIONS);
        assert_eq!(connection_cap(Some(u64::MAX)), MAX_CONNECTIONS);
        assert_eq!(connection_cap(Some(64)), MIN_CONNECTIONS);
        assert_eq!(connection_cap(Some(0)), MIN_CONNECTIONS);
        let own = max_connections();
        assert!((MIN_CONNECTIONS..=MAX_CONNECTIONS).contains(&own));
    }
}
