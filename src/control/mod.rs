//! The control server: the socket ([`socket`]: safe creation, permissions, the accept loop,
//! capped line reading) and one handler per command, each turning a typed request of
//! [`crate::protocol`] into that command's typed answer.
//!
//! The handlers build every answer people see: times from the store's Unix milliseconds to
//! RFC 3339, credentials redacted from URLs. The store only hands over its records.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, watch};
use tracing::error;

use crate::config::PollConfig;
use crate::forward::Router;
use crate::jobs::gate::SharedStatus;
use crate::protocol::{ErrorBody, Request, answer_line, check_task_id};
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

/// Connections served at once. Each costs a task and a small buffer; past this, new clients get
/// a "busy" answer instead of queueing without bound.
pub const MAX_CONNECTIONS: usize = 512;

/// Events per answer of a one-off `events` listing when the client sets no limit.
pub const EVENTS_PAGE: u32 = 1000;

/// Most events per one-off answer.
pub const EVENTS_PAGE_MAX: u32 = 10_000;

/// Facts about the running daemon that `status` reports.
#[derive(Debug, Clone)]
pub struct DaemonInfo {
    /// The config file, if any.
    pub config: Option<PathBuf>,
    /// The store file.
    pub store: PathBuf,
    /// The socket.
    pub socket: PathBuf,
    /// Unix ms at start.
    pub started_at: i64,
}

/// What request handlers share.
pub struct Control {
    /// The queue.
    pub store: Store,
    /// Wakes the scheduler after an `add`.
    pub wake: Arc<Notify>,
    /// The newest event sequence number.
    pub events: watch::Receiver<i64>,
    /// The scheduler's status.
    pub status: SharedStatus,
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

/// Runs one request (anything but `events --follow`, which streams) and returns its answer
/// line, success or error.
async fn handle(request: Request, ctx: &Control) -> String {
    match request {
        Request::Add(req) => line(add::run(req, ctx).await),
        Request::List(req) => line(list::run(req, ctx).await),
        Request::Show(req) => line(show::run(req, ctx).await),
        Request::Remove(req) => line(remove::run(req, ctx).await),
        Request::Events(req) => line(events::list(req, ctx).await),
        Request::Status(_) => line(status::run(ctx).await),
        Request::Redeliver(req) => line(redeliver::run(req, ctx).await),
        Request::Cancel(req) => line(cancel::run(req, ctx).await),
        Request::ArchiveRedo(req) => line(archive::redo(req, ctx).await),
    }
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
