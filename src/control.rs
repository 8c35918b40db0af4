//! The control socket: creating it safely, and serving the protocol of [`crate::protocol`].
//!
//! Creating: a path that exists and is not a socket is never touched; a socket another daemon
//! answers on makes start-up fail; a stale one (nobody answers) is replaced. The new socket is
//! bound under a temporary name, given its mode and group, and only then renamed into place, so
//! it is never reachable with looser permissions than configured.
//!
//! Serving: one task per connection, behind a semaphore. Each line is capped at
//! [`MAX_LINE`](crate::protocol::MAX_LINE) and each wait for a line by `control.idle-timeout`;
//! a bad line gets an error response and never affects other clients.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::{format_duration, format_utc, ms, now_ms};
use crate::config::PollConfig;
use crate::forward::Router;
use crate::protocol::AddResult;
use crate::protocol::{
    AddRequest, ErrorBody, EventsRequest, ListRequest, MAX_LINE, Request, TaskState,
    check_callback_url, check_label, check_task_id, check_task_ids,
};
use crate::scheduler::{PauseKind, SharedStatus};
use crate::store::Store;

/// How long writing one response may take before the client is considered gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once. Each costs a task and a small buffer; past this, new clients get
/// a "busy" answer instead of queueing without bound.
pub const MAX_CONNECTIONS: usize = 512;

/// Events per answer of a one-off `events` listing when the client sets no limit.
pub const EVENTS_PAGE: u32 = 1000;

/// Most events per one-off answer.
pub const EVENTS_PAGE_MAX: u32 = 10_000;

/// The bound control socket. Remove the file with [`ControlSocket::remove`] at shutdown.
#[derive(Debug)]
pub struct ControlSocket {
    /// Where it is.
    pub path: PathBuf,
    /// The file's identity when we created it (`None` when systemd passed it to us): device,
    /// inode and change time, since a new file may reuse a freed inode number.
    created: Option<FileId>,
}

impl ControlSocket {
    /// A socket that was passed in (socket activation): never removed by us.
    pub fn passed(path: PathBuf) -> ControlSocket {
        ControlSocket {
            path,
            created: None,
        }
    }

    /// Removes the socket file, if it is still the one we created.
    pub fn remove(&self) {
        let Some(id) = self.created else { return };
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && FileId::of(&meta) == id
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            warn!(socket = %self.path.display(), error = %e, "cannot remove the control socket");
        }
    }
}

/// Identifies one file over its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64, i64, i64);

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        FileId(meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
    }
}

/// Creates the control socket at `path` with `mode` and optional `group`.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<(UnixListener, ControlSocket), String> {
    let shown = path.display();
    let gid = group.map(resolve_group).transpose()?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create the socket directory {}: {e}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(format!(
                "{shown} exists and is not a socket; refusing to replace it (set [control] socket to another path)"
            ));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "another sunopoll daemon is already listening on {shown}; stop it first or use another [control] socket"
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(socket = %shown, "replacing a stale control socket left by an earlier run");
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot remove the stale socket {shown}: {e}"))?;
            }
            Err(e) => return Err(format!("{shown} exists and cannot be checked: {e}")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {shown}: {e}")),
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sunopoll.sock".to_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|e| format!("cannot create the socket {shown}: {e}"))?;
    let finish = || -> Result<(), String> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot set mode {mode:04o} on {shown}: {e}"))?;
        if let Some(gid) = gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid)).map_err(|e| {
                format!(
                    "cannot give {shown} to group {}: {e}",
                    group.unwrap_or_default()
                )
            })?;
        }
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("cannot move the socket into place at {shown}: {e}"))
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{shown}: {e}"))?;
    let listener = UnixListener::from_std(listener).map_err(|e| format!("{shown}: {e}"))?;
    Ok((
        listener,
        ControlSocket {
            path: path.to_owned(),
            created: Some(FileId::of(&meta)),
        },
    ))
}

/// A group name or number → gid, from `/etc/group` (no NSS lookups: keep it simple and safe).
fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            format!("control.group: no group named {group:?} in /etc/group (a number works too)")
        })
}

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
}

/// Accepts connections until `cancel` fires. Every connection is a task in `tracker`.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<Control>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut accept_errors = 0u32;
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                accept_errors = 0;
                stream
            }
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin; the listener stays up.
                accept_errors = accept_errors.saturating_add(1);
                let pause = Duration::from_millis(10u64 << accept_errors.min(6));
                warn!(error = %e, retry_in = %format_duration(pause), "cannot accept a control connection");
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let ctx = ctx.clone();
                let cancel = cancel.clone();
                tracker.spawn(async move {
                    if let Err(e) = handle_connection(stream, &ctx, &cancel).await {
                        debug!(error = %e, "control connection ended with an error");
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                tracker.spawn(async move {
                    let mut stream = stream;
                    let line =
                        ErrorBody::new("busy", "too many control connections; try again shortly")
                            .to_line();
                    let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(line.as_bytes()))
                        .await;
                });
            }
        }
    }
}

/// How reading one line ended.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// A line is in the buffer (without its newline). At end of input, a final unterminated
    /// line counts.
    Line,
    /// The peer closed the connection.
    Eof,
    /// The line passed the cap before its newline.
    TooLong,
}

/// Reads one `\n`-terminated line into `buf`, never holding more than `max` bytes of it.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        if let Some(i) = available.iter().position(|b| *b == b'\n') {
            if buf.len() + i > max {
                return Ok(LineRead::TooLong);
            }
            buf.extend_from_slice(&available[..i]);
            r.consume(i + 1);
            return Ok(LineRead::Line);
        }
        let n = available.len();
        if buf.len() + n > max {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(available);
        r.consume(n);
    }
}

async fn write_line(w: &mut (impl AsyncWriteExt + Unpin), line: &str) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, w.write_all(line.as_bytes()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))?
}

async fn handle_connection(
    stream: UnixStream,
    ctx: &Control,
    cancel: &CancellationToken,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(8 * 1024, read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = tokio::select! {
            () = cancel.cancelled() => {
                let _ = write_line(&mut write, &ErrorBody::new("shutting_down", "the daemon is stopping").to_line()).await;
                return Ok(());
            }
            r = tokio::time::timeout(ctx.idle_timeout, read_line(&mut reader, &mut buf, MAX_LINE)) => r,
        };
        match read {
            Err(_) => {
                let msg = format!(
                    "no complete request within {}; closing",
                    format_duration(ctx.idle_timeout)
                );
                write_line(&mut write, &ErrorBody::new("timeout", msg).to_line()).await?;
                return Ok(());
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(LineRead::Eof)) => return Ok(()),
            Ok(Ok(LineRead::TooLong)) => {
                let msg = format!(
                    "request line longer than {MAX_LINE} bytes; split large adds into batches"
                );
                write_line(&mut write, &ErrorBody::new("line_too_long", msg).to_line()).await?;
                return Ok(());
            }
            Ok(Ok(LineRead::Line)) => {}
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request = match Request::parse(&buf) {
            Ok(r) => r,
            Err(e) => {
                debug!(code = %e.code, "bad control request");
                write_line(&mut write, &e.to_line()).await?;
                continue;
            }
        };
        if let Request::Events(req) = &request
            && req.follow
        {
            return follow_events(req, ctx, &mut reader, &mut write, cancel).await;
        }
        let response = match handle(request, ctx).await {
            Ok(v) => ok_line(v),
            Err(e) => e.to_line(),
        };
        write_line(&mut write, &response).await?;
    }
}

/// `{"ok":true, ...fields of v}` as one line, `ok` first.
fn ok_line(v: serde_json::Value) -> String {
    let mut out = serde_json::Map::new();
    out.insert("ok".to_owned(), json!(true));
    if let serde_json::Value::Object(fields) = v {
        out.extend(fields);
    }
    let mut s = serde_json::Value::Object(out).to_string();
    s.push('\n');
    s
}

fn store_error(e: &crate::store::StoreError) -> ErrorBody {
    ErrorBody::new("store_error", e.to_string())
}

async fn handle(request: Request, ctx: &Control) -> Result<serde_json::Value, ErrorBody> {
    match request {
        Request::Add(req) => add(req, ctx).await,
        Request::List(req) => list(req, ctx).await,
        Request::Show(req) => {
            check_task_id(&req.task_id).map_err(|e| ErrorBody::new("invalid_task_id", e))?;
            let Some((task, events)) = ctx
                .store
                .show(req.task_id.clone())
                .await
                .map_err(|e| store_error(&e))?
            else {
                return Err(not_found(&req.task_id));
            };
            let deliveries = ctx
                .store
                .deliveries_of(req.task_id.clone())
                .await
                .map_err(|e| store_error(&e))?;
            let events: Vec<serde_json::Value> = events
                .into_iter()
                .map(|ev| {
                    let mine: Vec<_> = deliveries
                        .iter()
                        .filter(|(seq, _)| *seq == ev.seq)
                        .map(|(_, d)| d)
                        .collect();
                    let mut v = json!(ev);
                    v["deliveries"] = json!(mine);
                    v
                })
                .collect();
            Ok(json!({"task": task, "events": events}))
        }
        Request::Remove(req) => {
            check_task_id(&req.task_id).map_err(|e| ErrorBody::new("invalid_task_id", e))?;
            match ctx
                .store
                .remove(req.task_id.clone(), now_ms())
                .await
                .map_err(|e| store_error(&e))?
            {
                Some(was) => {
                    let removed = was == TaskState::Active;
                    if removed {
                        info!(task_id = %req.task_id, "task removed; it is no longer polled (its events are kept)");
                    }
                    Ok(json!({"task_id": req.task_id, "was": was, "removed": removed}))
                }
                None => Err(not_found(&req.task_id)),
            }
        }
        Request::Events(req) => {
            if let Some(t) = &req.task_id {
                check_task_id(t).map_err(|e| ErrorBody::new("invalid_task_id", e))?;
            }
            let limit = req.limit.unwrap_or(EVENTS_PAGE).clamp(1, EVENTS_PAGE_MAX);
            let events = ctx
                .store
                .events(req.since.unwrap_or(0), req.task_id, Some(limit + 1))
                .await
                .map_err(|e| store_error(&e))?;
            let more = events.len() > limit as usize;
            let events: Vec<_> = events.into_iter().take(limit as usize).collect();
            Ok(json!({"events": events, "more": more}))
        }
        Request::Status(_) => status(ctx).await,
        Request::Redeliver(req) => redeliver(req, ctx).await,
    }
}

fn not_found(id: &str) -> ErrorBody {
    ErrorBody::new(
        "not_found",
        format!("no task {id} (add it with `sunopoll add {id}`)"),
    )
}

async fn add(req: AddRequest, ctx: &Control) -> Result<serde_json::Value, ErrorBody> {
    check_task_ids(&req.task_ids)?;
    if let Some(label) = &req.label {
        check_label(label)?;
    }
    if let Some(url) = &req.callback_url {
        check_callback_url(url)?;
    }
    let mut seen = std::collections::HashSet::with_capacity(req.task_ids.len());
    let ids: Vec<String> = req
        .task_ids
        .into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect();
    let results = ctx
        .store
        .add(
            ids,
            req.callback_url,
            req.label,
            now_ms(),
            ms(ctx.policy.task_deadline),
        )
        .await
        .map_err(|e| store_error(&e))?;
    let added: Vec<&str> = results
        .iter()
        .filter(|t| t.result != AddResult::Exists)
        .map(|t| t.task_id.as_str())
        .collect();
    if !added.is_empty() {
        ctx.wake.notify_one();
        if added.len() <= 10 {
            info!(task_ids = %added.join(","), "tasks added");
        } else {
            info!(count = added.len(), "tasks added");
        }
    }
    let (added, existing) = (added.len(), results.len() - added.len());
    Ok(json!({"added": added, "existing": existing, "tasks": results}))
}

async fn list(req: ListRequest, ctx: &Control) -> Result<serde_json::Value, ErrorBody> {
    let state = match req.state.as_deref() {
        None | Some("all") => None,
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            ErrorBody::new(
                "bad_request",
                format!("unknown state {s:?}; use active, done, failed, removed or all"),
            )
        })?),
    };
    let tasks = ctx
        .store
        .list(state, req.limit)
        .await
        .map_err(|e| store_error(&e))?;
    Ok(json!({"tasks": tasks}))
}

async fn redeliver(
    req: crate::protocol::RedeliverRequest,
    ctx: &Control,
) -> Result<serde_json::Value, ErrorBody> {
    use crate::store::Replay;
    let bad = |m: String| ErrorBody::new("bad_request", m);
    let time = |field: &str, s: &str| {
        crate::clock::parse_utc(s).ok_or_else(|| {
            bad(format!(
                "`{field}` must be an RFC 3339 time like 2026-11-26T10:00:00Z, not {s:?}"
            ))
        })
    };
    let chosen = [
        req.seq.is_some(),
        req.task_id.is_some(),
        req.failed_since.is_some(),
        req.sent_since.is_some(),
    ]
    .into_iter()
    .filter(|b| *b)
    .count();
    if chosen != 1 {
        return Err(bad(
            "give exactly one of `seq`, `task_id`, `failed_since`, `sent_since`".to_owned(),
        ));
    }
    let what = if let Some(seq) = req.seq {
        Replay::Event(seq)
    } else if let Some(task) = &req.task_id {
        check_task_id(task).map_err(|e| ErrorBody::new("invalid_task_id", e))?;
        Replay::Task(task.clone())
    } else if let Some(t) = &req.failed_since {
        Replay::FailedSince(time("failed_since", t)?)
    } else {
        Replay::SentSince(time(
            "sent_since",
            req.sent_since.as_deref().unwrap_or_default(),
        )?)
    };
    if let Some(target) = &req.target {
        let known = ctx
            .router
            .config()
            .targets
            .iter()
            .any(|t| &t.name == target)
            || target == crate::config::TARGET_TASK_URL
            || target == crate::config::TARGET_SUBMITTED_URL;
        if !known {
            let mut names: Vec<&str> = ctx
                .router
                .config()
                .targets
                .iter()
                .map(|t| t.name.as_str())
                .collect();
            names.extend([
                crate::config::TARGET_TASK_URL,
                crate::config::TARGET_SUBMITTED_URL,
            ]);
            return Err(ErrorBody::new(
                "not_found",
                format!("no target named {target:?}; targets: {}", names.join(", ")),
            ));
        }
    }
    if let Replay::Event(seq) = what {
        let found = ctx
            .store
            .events(seq - 1, None, Some(1))
            .await
            .map_err(|e| store_error(&e))?;
        if found.first().is_none_or(|e| e.seq != seq) {
            return Err(ErrorBody::new("not_found", format!("no event #{seq}")));
        }
    }
    if let Replay::Task(task) = &what
        && ctx
            .store
            .show(task.clone())
            .await
            .map_err(|e| store_error(&e))?
            .is_none()
    {
        return Err(not_found(task));
    }
    let count = ctx
        .store
        .redeliver(
            what.clone(),
            req.target.clone(),
            ctx.router.configured_routes(),
            now_ms(),
        )
        .await
        .map_err(|e| store_error(&e))?;
    if count > 0 {
        ctx.redeliver.notify_one();
    }
    info!(what = ?what, target = req.target.as_deref().unwrap_or("all"), deliveries = count, "redelivery requested");
    Ok(json!({"deliveries": count}))
}

async fn status(ctx: &Control) -> Result<serde_json::Value, ErrorBody> {
    // A store that cannot commit (disk full, locked) must not turn `status` into an error: the
    // report is exactly where an operator or a monitoring check should read that the store is
    // failing. Whatever the store cannot say is left out (`tasks` is null) and listed as a
    // problem.
    let mut problems = Vec::new();
    let counts = match ctx.store.counts().await {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(format!("the store is not answering: {e}"));
            None
        }
    };
    let mut targets = match ctx.store.target_summary().await {
        Ok(t) => t,
        Err(e) => {
            if counts.is_some() {
                problems.push(format!("the store is not answering: {e}"));
            }
            Vec::new()
        }
    };
    for t in &ctx.router.config().targets {
        if !targets.iter().any(|s| s.target == t.name) {
            targets.push(crate::protocol::TargetStatus {
                target: t.name.clone(),
                pending: 0,
                failed: 0,
                delivered: 0,
                last_success_at: None,
                last_error: None,
                last_error_at: None,
            });
        }
    }
    let mut poll = ctx.status.lock().map(|s| s.clone()).unwrap_or_default();
    // The loop refreshes its status when it wakes, which during a long pause may be rarely:
    // measure the pause now.
    if let Some(since) = poll
        .paused_since
        .as_deref()
        .and_then(crate::clock::parse_utc)
    {
        poll.paused_for_ms = (now_ms() - since).max(0);
    }
    if poll.pause_kind == Some(PauseKind::Unauthorized) {
        problems.push(format!(
            "the API rejected the API key ({})",
            poll.pause_cause.as_deref().unwrap_or("401")
        ));
    } else if poll.pause_kind.is_some() && poll.paused_for_ms > ms(ctx.policy.backoff_max) {
        problems.push(format!(
            "polling has been paused for {} (longer than backoff-max {}): {}",
            format_duration(Duration::from_millis(poll.paused_for_ms.unsigned_abs())),
            format_duration(ctx.policy.backoff_max),
            poll.pause_cause.as_deref().unwrap_or("")
        ));
    }
    if let Some((at, e)) = ctx.store.health().last_error()
        && counts.is_some()
    {
        problems.push(format!("store error at {}: {e}", format_utc(at)));
    }
    Ok(json!({
        "version": crate::VERSION,
        "healthy": problems.is_empty(),
        "problems": problems,
        "started_at": format_utc(ctx.info.started_at),
        "uptime_ms": now_ms() - ctx.info.started_at,
        "config": ctx.info.config,
        "store": ctx.info.store,
        "socket": ctx.info.socket,
        "tasks": counts,
        "poll": poll,
        "targets": targets,
    }))
}

/// Streams events to a `--follow` client until it disconnects or the daemon stops.
async fn follow_events(
    req: &EventsRequest,
    ctx: &Control,
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    write: &mut tokio::net::unix::OwnedWriteHalf,
    cancel: &CancellationToken,
) -> io::Result<()> {
    if let Some(t) = &req.task_id
        && let Err(e) = check_task_id(t)
    {
        return write_line(write, &ErrorBody::new("invalid_task_id", e).to_line()).await;
    }
    let mut latest = ctx.events.clone();
    let mut since = match req.since {
        Some(s) => s,
        None => match ctx.store.last_seq().await {
            Ok(s) => s,
            Err(e) => return write_line(write, &store_error(&e).to_line()).await,
        },
    };
    let mut scratch = [0u8; 256];
    loop {
        latest.mark_unchanged();
        let batch = match ctx
            .store
            .events(since, req.task_id.clone(), Some(EVENTS_PAGE))
            .await
        {
            Ok(b) => b,
            Err(e) => return write_line(write, &store_error(&e).to_line()).await,
        };
        let full = batch.len() == EVENTS_PAGE as usize;
        for ev in batch {
            since = ev.seq;
            let mut line = json!({"ok": true, "event": ev}).to_string();
            line.push('\n');
            write_line(write, &line).await?;
        }
        if full {
            continue;
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = latest.changed() => if changed.is_err() { return Ok(()) },
            // Anything the client sends, or its hanging up, ends the stream.
            n = reader.read(&mut scratch) => { let _ = n?; return Ok(()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_capped() {
        let mut buf = Vec::new();
        let mut r = BufReader::with_capacity(4, &b"abc\ndefghij\nxyz"[..]);
        assert_eq!(
            read_line(&mut r, &mut buf, 5).await.expect("io"),
            LineRead::Line
        );
        assert_eq!(buf, b"abc");
        buf.clear();
        assert_eq!(
            read_line(&mut r, &mut buf, 5).await.expect("io"),
            LineRead::TooLong
        );
        let mut r = BufReader::new(&b"tail"[..]);
        buf.clear();
        assert_eq!(
            read_line(&mut r, &mut buf, 5).await.expect("io"),
            LineRead::Line
        );
        assert_eq!(buf, b"tail");
        buf.clear();
        assert_eq!(
            read_line(&mut r, &mut buf, 5).await.expect("io"),
            LineRead::Eof
        );
    }

    #[tokio::test]
    async fn binding_refuses_non_sockets_and_live_sockets_and_replaces_stale_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain");
        std::fs::write(&file, "keep me").expect("write");
        let e = bind(&file, 0o600, None).expect_err("not a socket");
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");

        let path = dir.path().join("s.sock");
        let (live, sock) = bind(&path, 0o600, None).expect("bind");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let e = bind(&path, 0o600, None).expect_err("live");
        assert!(e.contains("already listening"), "{e}");
        drop(live);
        let (_again, sock2) = bind(&path, 0o660, None).expect("stale replaced");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o660
        );
        // The first daemon's cleanup must not remove the second daemon's socket.
        sock.remove();
        assert!(path.exists());
        sock2.remove();
        assert!(!path.exists());
    }

    #[test]
    fn groups_resolve_by_number_and_name() {
        assert_eq!(resolve_group("1234"), Ok(1234));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here").is_err());
    }
}
