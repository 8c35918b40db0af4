//! The control socket: creating it safely, accepting connections and reading request lines;
//! each request then goes to its command's handler (see [`super`]).
//!
//! Creating: a path that exists and is not a socket is never touched; a socket another daemon
//! answers on makes start-up fail; a stale one (nobody answers) is replaced. The new socket is
//! bound inside a private (0700) directory next to its path, given its mode and group there,
//! and only then renamed into place, so under any umask it is never reachable with looser
//! permissions than configured. The per-user default directory in `/tmp` is created 0700 and
//! refused when another user owns it or can write it.
//!
//! Serving: one task per connection, behind a semaphore. Each line is capped at
//! [`MAX_LINE`] and each wait for a line by `control.idle-timeout`;
//! a bad line gets an error response and never affects other clients. When every slot is
//! taken, the connection idle longest (waiting for its client's next request) is closed with an
//! `evicted` answer so the new client is served; only when none is idle (all are answering or
//! following events) does the new client hear `busy`.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::{Control, WRITE_TIMEOUT, max_connections};
use crate::clock::format_duration;
use crate::protocol::{ErrorBody, MAX_LINE, Request};

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

/// Why the control socket could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// Another daemon answers on the path: starting again cannot help until it stops.
    #[error("{0}")]
    Taken(String),
    /// Anything else (a directory, permissions, a file in the way).
    #[error("{0}")]
    Failed(String),
}

/// Creates the control socket at `path` with `mode` and optional `group`.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&str>,
) -> Result<(UnixListener, ControlSocket), BindError> {
    bind_inner(path, mode, group, crate::config::current_uid(), |_| {}).map_err(|e| match e {
        Bound::Taken(m) => BindError::Taken(m),
        Bound::Failed(m) => BindError::Failed(m),
    })
}

/// [`BindError`] while the `?`s below still convert from the plain `String`s they produce.
enum Bound {
    Taken(String),
    Failed(String),
}

impl From<String> for Bound {
    fn from(m: String) -> Bound {
        Bound::Failed(m)
    }
}

/// [`bind`] for user `uid`; `bound` sees the new socket's path while it is still in its private
/// directory (tests check that nobody else could reach it there).
fn bind_inner(
    path: &Path,
    mode: u32,
    group: Option<&str>,
    uid: u32,
    bound: impl FnOnce(&Path),
) -> Result<(UnixListener, ControlSocket), Bound> {
    let shown = path.display();
    let gid = group.map(resolve_group).transpose()?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if dir == crate::config::private_tmp_dir(uid) {
        // The default directory in the shared /tmp: created private, and refused if someone
        // else made it (or made it writable) first.
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(Bound::Failed(format!(
                    "cannot create the socket directory {}: {e}",
                    dir.display()
                )));
            }
        }
        crate::config::check_private_dir(dir, uid)?;
    } else if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create the socket directory {}: {e}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Bound::Failed(format!(
                "{shown} exists and is not a socket; refusing to replace it (set [control] socket to another path)"
            )));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(Bound::Taken(format!(
                    "another sunopoll daemon is already listening on {shown}; stop it first or use another [control] socket"
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(socket = %shown, "replacing a stale control socket left by an earlier run");
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot remove the stale socket {shown}: {e}"))?;
            }
            Err(e) => {
                return Err(Bound::Failed(format!(
                    "{shown} exists and cannot be checked: {e}"
                )));
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Bound::Failed(format!("cannot inspect {shown}: {e}"))),
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sunopoll.sock".to_owned());
    // Bound inside a directory only we can enter, given its mode and group there, and only then
    // renamed into place: under any umask (even 000) nobody can connect before the socket has
    // the permissions it was configured with.
    let private = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let (listener, tmp) = bind_privately(&private, &shown)?;
    bound(&tmp);
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
    let finished = finish();
    if finished.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::fs::remove_dir(&private);
    finished.map_err(Bound::Failed)?;
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

/// Creates the directory `private` (mode 0700; a leftover of an earlier process with our pid is
/// cleared first) and binds a socket inside it. Returns the listener and the socket's path.
fn bind_privately(
    private: &Path,
    shown: &std::path::Display<'_>,
) -> Result<(std::os::unix::net::UnixListener, PathBuf), String> {
    use std::os::unix::fs::DirBuilderExt;
    let tmp = private.join("s");
    let create = || std::fs::DirBuilder::new().mode(0o700).create(private);
    if let Err(e) = create() {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(format!(
                "cannot create {} to bind the socket {shown} in: {e}",
                private.display()
            ));
        }
        let _ = std::fs::remove_file(&tmp);
        std::fs::remove_dir(private)
            .and_then(|()| create())
            .map_err(|e| format!("cannot replace the leftover {}: {e}", private.display()))?;
    }
    match std::os::unix::net::UnixListener::bind(&tmp) {
        Ok(listener) => Ok((listener, tmp)),
        Err(e) => {
            let _ = std::fs::remove_dir(private);
            Err(format!("cannot create the socket {shown}: {e}"))
        }
    }
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

/// How long a new client waits for the slot of the idle connection closed for it. Closing
/// takes one short write; past this, something else took the slot and the client hears `busy`.
const EVICTION_WAIT: Duration = Duration::from_secs(2);

/// Every open connection, and since when each has been waiting for its client's next request
/// (`None` while a request is being answered or events are followed). When every slot is taken,
/// the one idle longest is closed so a new client is served: silent connections cannot starve
/// an active one.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: std::collections::HashMap<u64, (Option<Instant>, CancellationToken)>,
}

type SharedConnections = Arc<std::sync::Mutex<Connections>>;

fn lock(c: &SharedConnections) -> std::sync::MutexGuard<'_, Connections> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Connections {
    /// Closes the connection idle longest; false if none is idle.
    fn evict_longest_idle(&mut self) -> bool {
        let oldest = self
            .open
            .iter()
            .filter_map(|(id, (since, _))| since.map(|s| (s, *id)))
            .min();
        let Some((_, id)) = oldest else { return false };
        if let Some((_, token)) = self.open.remove(&id) {
            token.cancel();
        }
        true
    }
}

/// One connection's entry in [`Connections`], removed when the connection ends.
struct Slot {
    id: u64,
    all: SharedConnections,
    evicted: CancellationToken,
}

impl Slot {
    fn open(all: &SharedConnections) -> Slot {
        let mut c = lock(all);
        c.next_id += 1;
        let id = c.next_id;
        let evicted = CancellationToken::new();
        c.open.insert(id, (Some(Instant::now()), evicted.clone()));
        Slot {
            id,
            all: all.clone(),
            evicted,
        }
    }

    /// Marks the connection idle (waiting for a request) or busy.
    fn set_idle(&self, idle: bool) {
        if let Some(entry) = lock(&self.all).open.get_mut(&self.id) {
            entry.0 = idle.then(Instant::now);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.all).open.remove(&self.id);
    }
}

/// Accepts connections until `cancel` fires. Every connection is a task in `tracker`.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<Control>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let cap = max_connections();
    debug!(
        connections = cap,
        "control connections served at once (from the open-files limit)"
    );
    let permits = Arc::new(Semaphore::new(cap));
    let connections = SharedConnections::default();
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
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        let all = connections.clone();
        match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(async move {
                    let slot = Slot::open(&all);
                    if let Err(e) = handle_connection(stream, &ctx, &cancel, &slot).await {
                        debug!(error = %e, "control connection ended with an error");
                    }
                    drop(slot);
                    drop(permit);
                });
            }
            Err(_) => {
                let freed = lock(&connections).evict_longest_idle();
                if freed {
                    debug!("every control slot taken: closed the connection idle longest");
                }
                let permits = permits.clone();
                tracker.spawn(async move {
                    if freed
                        && let Ok(Ok(permit)) =
                            tokio::time::timeout(EVICTION_WAIT, permits.acquire_owned()).await
                    {
                        let slot = Slot::open(&all);
                        if let Err(e) = handle_connection(stream, &ctx, &cancel, &slot).await {
                            debug!(error = %e, "control connection ended with an error");
                        }
                        drop(slot);
                        drop(permit);
                        return;
                    }
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

/// Writes one answer line, giving up on a client that stops reading.
pub(super) async fn write_line(w: &mut (impl AsyncWriteExt + Unpin), line: &str) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, w.write_all(line.as_bytes()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))?
}

async fn handle_connection(
    stream: UnixStream,
    ctx: &Control,
    cancel: &CancellationToken,
    slot: &Slot,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::with_capacity(8 * 1024, read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        slot.set_idle(true);
        let read = tokio::select! {
            () = cancel.cancelled() => {
                let _ = write_line(&mut write, &ErrorBody::new("shutting_down", "the daemon is stopping").to_line()).await;
                return Ok(());
            }
            () = slot.evicted.cancelled() => {
                let msg = "closed while idle: every control connection slot was taken and another client needed one; reconnect to send a request";
                let _ = write_line(&mut write, &ErrorBody::new("evicted", msg).to_line()).await;
                return Ok(());
            }
            r = tokio::time::timeout(ctx.idle_timeout, read_line(&mut reader, &mut buf, MAX_LINE)) => r,
        };
        slot.set_idle(false);
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
            return super::events::follow(req, ctx, &mut reader, &mut write, cancel).await;
        }
        super::answer(request, ctx, &mut write).await?;
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
        assert!(
            matches!(&e, BindError::Failed(m) if m.contains("is not a socket")),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");

        let path = dir.path().join("s.sock");
        let (live, sock) = bind(&path, 0o600, None).expect("bind");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let e = bind(&path, 0o600, None).expect_err("live");
        assert!(
            matches!(&e, BindError::Taken(m) if m.contains("already listening")),
            "{e}"
        );
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

    #[tokio::test]
    async fn the_socket_is_bound_where_nobody_else_can_reach_it_and_moved_into_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A shared, world-writable directory (like a group's socket directory under umask 000).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let path = dir.path().join("s.sock");
        let uid = crate::config::current_uid();
        let mut seen = None;
        let (_listener, sock) = bind_inner(&path, 0o600, None, uid, |tmp| {
            let parent = tmp.parent().expect("parent").to_owned();
            let meta = std::fs::symlink_metadata(&parent).expect("private dir");
            seen = Some((
                parent,
                meta.file_type().is_dir(),
                meta.permissions().mode() & 0o7777,
                meta.uid(),
                std::fs::symlink_metadata(tmp)
                    .expect("socket")
                    .file_type()
                    .is_socket(),
            ));
        })
        .unwrap_or_else(|e| {
            panic!(
                "bind: {}",
                match e {
                    Bound::Taken(m) | Bound::Failed(m) => m,
                }
            )
        });
        let (parent, is_dir, mode, owner, is_socket) = seen.expect("the hook ran");
        assert_ne!(
            parent,
            dir.path(),
            "not bound in the shared directory itself"
        );
        assert!(is_dir && is_socket);
        assert_eq!(mode, 0o700, "bound in a directory only its owner can enter");
        assert_eq!(owner, uid);
        let entries: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            entries,
            vec![std::ffi::OsString::from("s.sock")],
            "nothing left behind"
        );
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        sock.remove();
    }

    #[test]
    fn the_per_user_tmp_directory_must_be_private() {
        use crate::config::judge_private_dir;
        let dir = Path::new("/tmp/sunopoll-1000");
        assert!(judge_private_dir(dir, true, 1000, 0o40700, 1000).is_ok());
        assert!(judge_private_dir(dir, true, 1000, 0o40755, 1000).is_ok());
        for (is_dir, owner, mode, why) in [
            (true, 1001, 0o40700, "does not belong to uid 1000"),
            (true, 0, 0o40777, "does not belong to uid 1000"),
            (true, 1000, 0o40777, "other users can write it"),
            (true, 1000, 0o40770, "other users can write it"),
            (true, 1000, 0o41733, "other users can write it"),
            (false, 1000, 0o120777, "not a directory"),
        ] {
            let e = judge_private_dir(dir, is_dir, owner, mode, 1000).expect_err(why);
            assert!(e.contains(why), "{e}");
            assert!(e.contains("/tmp/sunopoll-1000"), "names the directory: {e}");
            assert!(
                e.contains(&format!("owner uid {owner}")),
                "and its owner: {e}"
            );
            assert!(
                e.contains(&format!("mode {:04o}", mode & 0o7777)),
                "and mode: {e}"
            );
            assert_eq!(e.lines().count(), 1);
        }
    }

    #[test]
    fn groups_resolve_by_number_and_name() {
        assert_eq!(resolve_group("1234"), Ok(1234));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-here").is_err());
    }
}
