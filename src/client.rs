//! The CLI side of the control socket: find the socket, send one request, print the answer for
//! a person (or as JSON with `--json`), and exit with the documented code.
//!
//! Deliberately synchronous (plain `std` sockets, no async runtime): a CLI call is one round
//! trip, and starting no runtime keeps it fast.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::{Environment, SYSTEM_SOCKET};
use crate::events::Stage;
use crate::protocol::{
    ADD_BATCH, AddRequest, AddResponse, AddResult, ArchiveRedoResponse, CancelResponse,
    DeliveryView, ErrorBody, EventLine, EventView, EventsRequest, EventsResponse, ListRequest,
    ListResponse, RedeliverResponse, RemoveRequest, RemoveResponse, Request, ShowRequest,
    ShowResponse, StatusRequest, StatusResponse, answer_line, parse_answer,
};

/// Prints a line to stdout. A closed stdout (`sunopoll events | head`) ends the process
/// quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// Exit code: the daemon refused or failed the request (or reports itself unhealthy).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: bad usage or configuration.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the daemon could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

/// How long to wait for an answer to an ordinary request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// No daemon answers at the socket.
    Unreachable(String),
    /// The daemon answered with an error.
    Refused(ErrorBody),
    /// The answer made no sense, or the connection broke mid-answer.
    Protocol(String),
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable(_) => EXIT_UNREACHABLE,
            ClientError::Refused(_) | ClientError::Protocol(_) => EXIT_REFUSED,
        }
    }
}

impl ClientError {
    /// The error as the daemon's own error body: its code when the daemon refused, else
    /// `unreachable` or `protocol`.
    pub fn body(&self) -> ErrorBody {
        match self {
            ClientError::Unreachable(m) => ErrorBody::new("unreachable", m.clone()),
            ClientError::Protocol(m) => ErrorBody::new("protocol", m.clone()),
            ClientError::Refused(e) => e.clone(),
        }
    }
}

/// Prints an error on stderr: `sunopoll: message` for people, or with `--json` the same
/// `{"ok":false,"error":{…}}` line the daemon sends, so a script reads one shape either way.
pub fn print_error(out: Output, error: &ErrorBody, human: &str) {
    if out.json {
        eprint!("{}", error.to_line());
    } else {
        eprintln!("sunopoll: {}", esc(human));
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable(m) | ClientError::Protocol(m) => f.write_str(m),
            ClientError::Refused(e) => write!(f, "{} ({})", e.message, e.code),
        }
    }
}

/// A connection to the daemon.
pub struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
}

impl Connection {
    /// Connects to the daemon's socket (after checking its directory, when it is the per-user
    /// one in `/tmp`: see [`check_socket_dir`]).
    pub fn open(path: &Path) -> Result<Connection, ClientError> {
        check_socket_dir(path, crate::config::current_uid()).map_err(ClientError::Unreachable)?;
        let stream = UnixStream::connect(path).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    " (is the daemon running? start it with `sunopoll daemon`, or point --socket at its socket)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    " (permission denied: for the system service, join the sunopoll-admin group)"
                }
                _ => "",
            };
            ClientError::Unreachable(format!(
                "cannot reach the sunopoll daemon at {}: {e}{hint}",
                path.display()
            ))
        })?;
        let writer = stream
            .try_clone()
            .map_err(|e| ClientError::Unreachable(format!("{}: {e}", path.display())))?;
        Ok(Connection {
            reader: BufReader::new(stream),
            writer,
            path: path.to_owned(),
        })
    }

    /// Sends one request line.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        let Err(e) = self.writer.write_all(request.to_line().as_bytes()) else {
            return Ok(());
        };
        // A daemon that turns the connection away (`busy`, `shutting_down`) answers and closes
        // at once, so the write can fail with a broken pipe while its answer waits unread.
        // That answer says what is wrong; the broken pipe does not.
        if let Err(refused @ ClientError::Refused(_)) = self.receive(Some(Duration::from_secs(1))) {
            return Err(refused);
        }
        Err(ClientError::Protocol(format!(
            "cannot send to {}: {e}",
            self.path.display()
        )))
    }

    /// Reads one response line; `None` at end of stream. `timeout` bounds the wait. An error
    /// answer (`"ok": false`) comes back as [`ClientError::Refused`].
    pub fn receive(&mut self, timeout: Option<Duration>) -> Result<Option<String>, ClientError> {
        let _ = self.reader.get_ref().set_read_timeout(timeout);
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Protocol(format!(
                    "the daemon did not answer within {}",
                    crate::clock::format_duration(timeout.unwrap_or_default())
                )));
            }
            Err(e) => return Err(ClientError::Protocol(format!("reading the answer: {e}"))),
        }
        let value: Value = serde_json::from_str(&line).map_err(|e| {
            ClientError::Protocol(format!("the daemon sent something that is not JSON: {e}"))
        })?;
        if value.get("ok") == Some(&Value::Bool(false)) {
            let error: ErrorBody = serde_json::from_value(value["error"].clone())
                .unwrap_or_else(|_| ErrorBody::new("unknown", value["error"].to_string()));
            return Err(ClientError::Refused(error));
        }
        Ok(Some(line))
    }

    /// Reads one successful answer of type `T`; `None` at end of stream.
    pub fn receive_as<T: DeserializeOwned>(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<T>, ClientError> {
        self.receive(timeout)?.map(|line| parse(&line)).transpose()
    }

    /// One request, one answer of type `T`.
    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClientError> {
        self.send(request)?;
        self.receive_as(Some(ANSWER_TIMEOUT))?.ok_or_else(|| {
            ClientError::Protocol("the daemon closed the connection without answering".to_owned())
        })
    }
}

/// Reads a successful answer's fields; an answer of the wrong shape is a protocol error.
fn parse<T: DeserializeOwned>(line: &str) -> Result<T, ClientError> {
    parse_answer(line).map_err(|e| {
        ClientError::Protocol(format!("the daemon's answer has an unexpected shape: {e}"))
    })
}

/// Refuses a socket in `uid`'s per-user directory in `/tmp` when that directory is not private
/// (another user made it, or can write it): whoever answers there may not be our daemon, and
/// would hear every request. A directory that does not exist is left to `connect` to report.
pub fn check_socket_dir(socket: &Path, uid: u32) -> Result<(), String> {
    let dir = crate::config::private_tmp_dir(uid);
    if socket.parent() != Some(dir.as_path()) {
        return Ok(());
    }
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => crate::config::check_private_dir(&dir, uid),
    }
}

/// Where the CLI looks for the daemon: `--socket`, then `$SUNOPOLL_SOCKET`, then the config
/// file's `control.socket`, then the built-in default for this user, then the system service's
/// socket. The first existing candidate among the defaults wins.
pub fn find_socket(
    explicit: Option<&Path>,
    env_socket: Option<&Path>,
    configured: Option<&Path>,
    env: &Environment,
) -> PathBuf {
    if let Some(p) = explicit.or(env_socket).or(configured) {
        return p.to_owned();
    }
    let candidates = [env.default_socket_path(), PathBuf::from(SYSTEM_SOCKET)];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

/// How a client command prints.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// Print JSON instead of text.
    pub json: bool,
}

/// Runs one client command and returns the exit code.
pub fn run(socket: &Path, request: Request, out: Output) -> ExitCode {
    let result = match request {
        Request::Add(req) => add(socket, req, out),
        Request::Events(req) if req.follow => follow(socket, req, out),
        Request::Events(req) => events(socket, req, out),
        Request::Status(req) => status(socket, req, out),
        Request::List(req) => one_call(socket, Request::List(req.clone()), out, |a| {
            print_list(&req, a)
        }),
        Request::Show(req) => one_call(socket, Request::Show(req), out, print_show),
        Request::Remove(req) => one_call(socket, Request::Remove(req), out, print_remove),
        Request::Redeliver(req) => one_call(socket, Request::Redeliver(req), out, print_redeliver),
        Request::Cancel(req) => one_call(socket, Request::Cancel(req), out, print_cancel),
        Request::ArchiveRedo(req) => {
            one_call(socket, Request::ArchiveRedo(req), out, print_archive_redo)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            print_error(out, &e.body(), &e.to_string());
            ExitCode::from(e.exit_code())
        }
    }
}

/// One round trip answered by a `T`, printed as JSON or by `human`.
fn one_call<T: DeserializeOwned + Serialize>(
    socket: &Path,
    request: Request,
    out: Output,
    human: impl FnOnce(&T),
) -> Result<u8, ClientError> {
    let answer: T = Connection::open(socket)?.call(&request)?;
    if out.json {
        print_json(&answer)?;
    } else {
        human(&answer);
    }
    Ok(0)
}

/// Prints a whole answer as the daemon sent it: `{"ok":true, ...}`.
fn print_json<T: Serialize>(answer: &T) -> Result<(), ClientError> {
    let line = answer_line(answer)
        .map_err(|e| ClientError::Protocol(format!("cannot print the answer: {e}")))?;
    out!("{}", line.trim_end());
    Ok(())
}

fn add(socket: &Path, req: AddRequest, out: Output) -> Result<u8, ClientError> {
    let mut conn = Connection::open(socket)?;
    let mut all = AddResponse {
        added: 0,
        existing: 0,
        tasks: Vec::new(),
    };
    for chunk in req.task_ids.chunks(ADD_BATCH) {
        let answer: AddResponse = conn
            .call(&Request::Add(AddRequest {
                task_ids: chunk.to_vec(),
                callback_url: req.callback_url.clone(),
                label: req.label.clone(),
                again: req.again,
                kind: req.kind.clone(),
                account: req.account.clone(),
            }))
            .map_err(|e| match e {
                // Each batch is its own request: say what earlier ones did.
                ClientError::Refused(mut body) if !all.tasks.is_empty() => {
                    body.message = format!(
                        "{} (in a later batch: the {} IDs before it were sent and stored, {} of them new)",
                        body.message,
                        all.tasks.len(),
                        all.added
                    );
                    ClientError::Refused(body)
                }
                e => e,
            })?;
        all.added += answer.added;
        all.existing += answer.existing;
        all.tasks.extend(answer.tasks);
    }
    if out.json {
        print_json(&all)?;
        return Ok(0);
    }
    for t in &all.tasks {
        let id = esc(&t.task_id);
        match t.result {
            AddResult::Added => out!("added     {id}"),
            AddResult::Readded => out!("re-added  {id}"),
            AddResult::Exists => out!(
                "known     {id}  ({}{})",
                t.state.as_str(),
                t.stage
                    .map(|s| format!(", last event {s}"))
                    .unwrap_or_default()
            ),
            // The daemon refuses the whole request instead; an old or foreign daemon's answer
            // is shown as it is.
            AddResult::OtherKind => out!("refused   {id}  (a {} task)", t.kind),
        }
    }
    if all.tasks.len() > 1 {
        out!("{} added, {} already known", all.added, all.existing);
    }
    Ok(0)
}

fn events(socket: &Path, mut req: EventsRequest, out: Output) -> Result<u8, ClientError> {
    let mut conn = Connection::open(socket)?;
    loop {
        let answer: EventsResponse = conn.call(&Request::Events(req.clone()))?;
        for ev in &answer.events {
            print_event(ev, out)?;
            req.since = Some(ev.seq);
        }
        if !answer.more || answer.events.is_empty() {
            return Ok(0);
        }
    }
}

/// Longest wait between two tries to reach a restarting daemon while following.
const FOLLOW_RETRY_MAX: Duration = Duration::from_secs(2);

/// Follows the event stream like `tail -F`: when the daemon stops or restarts, reconnects and
/// resumes after the last event printed, so none is missed or printed twice.
fn follow(socket: &Path, mut req: EventsRequest, out: Output) -> Result<u8, ClientError> {
    let mut conn = Connection::open(socket)?;
    if req.since.is_none() {
        // "From now on" must mean the same after a reconnect: pin now to a sequence number.
        let status: StatusResponse = conn.call(&Request::Status(StatusRequest {}))?;
        req.since = status.tasks.map(|t| t.last_seq);
    }
    let mut first = true;
    loop {
        if !first {
            conn = reconnect(socket, out);
        }
        first = false;
        if let Err(e) = conn.send(&Request::Events(req.clone())) {
            if stream_broke(&e) {
                continue;
            }
            return Err(e);
        }
        loop {
            match conn.receive_as::<EventLine>(None) {
                Ok(Some(line)) => {
                    print_event(&line.event, out)?;
                    let _ = std::io::stdout().flush();
                    req.since = Some(line.event.seq);
                }
                Ok(None) => break,
                Err(e) if stream_broke(&e) => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// True for a follow stream that ended because the daemon went away or turned the connection
/// away for now, as opposed to refusing the request itself.
fn stream_broke(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable(_) | ClientError::Protocol(_) => true,
        ClientError::Refused(body) => {
            matches!(body.code.as_str(), "shutting_down" | "busy" | "evicted")
        }
    }
}

/// Connects again, waiting as long as it takes (with a growing pause, at most
/// [`FOLLOW_RETRY_MAX`]); says once on stderr that it is waiting.
fn reconnect(socket: &Path, out: Output) -> Connection {
    if !out.json {
        eprintln!("sunopoll: the daemon closed the event stream; reconnecting…");
    }
    let mut pause = Duration::from_millis(100);
    loop {
        if let Ok(conn) = Connection::open(socket) {
            return conn;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(FOLLOW_RETRY_MAX);
    }
}

fn status(socket: &Path, req: StatusRequest, out: Output) -> Result<u8, ClientError> {
    let v: StatusResponse = Connection::open(socket)?.call(&Request::Status(req))?;
    if out.json {
        print_json(&v)?;
    } else {
        print_status(&v);
    }
    Ok(if v.healthy { 0 } else { EXIT_REFUSED })
}

/// A string from the daemon (and so perhaps from the API or a handler) as human output shows
/// it: control characters escaped ([`crate::logging::printable`]), so a status string with a
/// newline and an ESC byte cannot forge lines or recolour the terminal. `--json` output is
/// never passed through this: it stays exact.
fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    crate::logging::printable(s)
}

/// An optional value as shown in tables: `-` when absent, escaped ([`esc`]).
fn shown(v: Option<&str>) -> std::borrow::Cow<'_, str> {
    esc(v.unwrap_or("-"))
}

/// How an enum is spelt on the wire (its serde name), for showing it.
fn spelling<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "-".to_owned(),
    }
}

fn print_event(ev: &EventView, out: Output) -> Result<(), ClientError> {
    if out.json {
        let line = serde_json::to_string(ev)
            .map_err(|e| ClientError::Protocol(format!("cannot print the event: {e}")))?;
        out!("{line}");
        return Ok(());
    }
    let body: Value = serde_json::from_str(ev.body.get()).unwrap_or(Value::Null);
    let tracks = body["data"]["data"].as_array().map_or(0, Vec::len);
    let msg = body["msg"].as_str().unwrap_or("");
    out!(
        "#{:<6} {}  {}  {:<8} {}  {}",
        ev.seq,
        esc(&ev.created_at),
        esc(&ev.task_id),
        ev.stage.as_str(),
        ev.code,
        if ev.stage == Stage::Error {
            crate::api::clip(msg, 120)
        } else if ev.stage == Stage::Archived {
            let files = body["files"].as_array().map_or(0, Vec::len);
            format!("{files} file{} kept", if files == 1 { "" } else { "s" })
        } else {
            format!("{tracks} track{}", if tracks == 1 { "" } else { "s" })
        }
    );
    Ok(())
}

fn print_list(req: &ListRequest, answer: &ListResponse) {
    let tasks = &answer.tasks;
    if tasks.is_empty() {
        out!("no tasks");
        return;
    }
    out!(
        "{:<34} {:<6} {:<8} {:<9} {:<22} {:<21} LABEL",
        "TASK ID",
        "KIND",
        "STATE",
        "STAGE",
        "LAST STATUS",
        "NEXT POLL"
    );
    for t in tasks {
        out!(
            "{:<34} {:<6} {:<8} {:<9} {:<22} {:<21} {}",
            esc(&t.task_id),
            t.kind.as_str(),
            t.state.as_str(),
            shown(t.stage.map(Stage::as_str)),
            shown(t.last_status.as_deref()),
            shown(t.next_poll_at.as_deref()),
            esc(t.label.as_deref().unwrap_or(""))
        );
    }
    if let Some(limit) = req.limit
        && tasks.len() >= limit as usize
    {
        out!("(the newest {limit} shown; --limit 0 shows all)");
    }
}

fn print_show(answer: &ShowResponse) {
    let t = &answer.task;
    let polls = t.polls.to_string();
    for (name, value) in [
        ("task", Some(t.task_id.as_str())),
        ("kind", Some(t.kind.as_str())),
        ("account", Some(t.account.as_str())),
        ("state", Some(t.state.as_str())),
        ("last event", t.stage.map(Stage::as_str)),
        ("last status", t.last_status.as_deref()),
        ("polls", Some(polls.as_str())),
        ("added", Some(t.added_at.as_str())),
        ("next poll", t.next_poll_at.as_deref()),
        ("deadline", Some(t.deadline_at.as_str())),
        ("finished", t.finished_at.as_deref()),
        ("callback url", t.callback_url.as_deref()),
        ("label", t.label.as_deref()),
        ("last error", t.last_error.as_deref()),
    ] {
        if let Some(value) = value {
            out!("{name:<13} {}", esc(value));
        }
    }
    if !answer.files.is_empty() {
        out!("files         {}", answer.files.len());
        for f in &answer.files {
            let detail = match (f.state, f.size, f.last_error.as_deref()) {
                (crate::store::FileState::Done, Some(size), _) => format!(
                    "{size} bytes, sha256 {}",
                    f.sha256.as_deref().unwrap_or("?")
                ),
                (_, _, Some(e)) => format!("{} tries; {}", f.attempts, crate::api::clip(e, 120)),
                _ => format!("{} tries", f.attempts),
            };
            out!("  {} {} ({detail})", f.state.as_str(), f.path);
        }
    }
    out!("events        {}", answer.events.len());
    for ev in &answer.events {
        out!("");
        let view = EventView {
            seq: ev.seq,
            task_id: ev.task_id.clone(),
            kind: ev.kind,
            stage: ev.stage,
            code: ev.code,
            created_at: ev.created_at.clone(),
            body: ev.body.clone(),
        };
        // Printing as text cannot fail.
        let _ = print_event(&view, Output { json: false });
        for d in &ev.deliveries {
            print_delivery(d);
        }
        let body: Value = serde_json::from_str(ev.body.get()).unwrap_or(Value::Null);
        // JSON escapes C0 inside strings but not DEL, C1 or the bidi controls; its own
        // newlines are layout, so each line is escaped on its own.
        for line in serde_json::to_string_pretty(&body)
            .unwrap_or_default()
            .lines()
        {
            out!("{}", esc(line));
        }
    }
}

fn print_archive_redo(answer: &ArchiveRedoResponse) {
    out!(
        "{} kept file(s) verified against their SHA-256",
        answer.verified
    );
    if answer.refetching.is_empty() {
        out!("nothing to fetch again");
    }
    for name in &answer.refetching {
        out!("fetching again: {name}");
    }
}

fn print_cancel(answer: &CancelResponse) {
    match answer.cancelled {
        0 => out!("nothing to cancel (no pending deliveries match)"),
        1 => out!("1 pending delivery cancelled"),
        n => out!("{n} pending deliveries cancelled"),
    }
}

fn print_redeliver(answer: &RedeliverResponse) {
    let n = answer.deliveries;
    if n == 0 {
        out!("nothing to redeliver (no matching deliveries, or no forward targets)");
    } else {
        out!(
            "{n} deliver{} queued again",
            if n == 1 { "y" } else { "ies" }
        );
    }
}

fn print_remove(answer: &RemoveResponse) {
    let id = esc(&answer.task_id);
    if answer.removed {
        out!("removed {id}; it is no longer polled (its events are kept)");
    } else {
        out!("{id} was already {}; nothing to do", answer.was.as_str());
    }
}

/// The first line of `status`: healthy or not, and if something needs the operator, what and
/// what to do. Pure, so every case is tested.
pub fn headline(v: &StatusResponse) -> String {
    if let Some(first) = v.problems.first() {
        let more = match v.problems.len() {
            1 => String::new(),
            n => format!(" (and {} more below)", n - 1),
        };
        return format!("UNHEALTHY: {first}{more}");
    }
    if let Some(t) = v.targets.iter().find(|t| t.failed > 0) {
        return format!(
            "healthy, but {} deliver{} to {} {} given up: fix the handler, then `sunopoll redeliver --failed-since 1d --target {}`",
            t.failed,
            if t.failed == 1 { "y" } else { "ies" },
            t.target,
            if t.failed == 1 { "was" } else { "were" },
            t.target
        );
    }
    let poll = &v.poll;
    if let Some(kind) = poll.pause_kind {
        let next = poll
            .paused_until
            .as_deref()
            .map(|t| format!(", next try at {t}"))
            .unwrap_or_default();
        return format!(
            "healthy — polling paused ({}{next}); nothing to do unless it lasts",
            spelling(&kind)
        );
    }
    let active = v
        .tasks
        .as_ref()
        .map_or_else(|| "?".to_owned(), |t| t.active.to_string());
    let pending: i64 = v.targets.iter().map(|t| t.pending).sum();
    let deliveries = if pending > 0 {
        format!(", {pending} deliveries pending")
    } else {
        String::new()
    };
    format!(
        "healthy — polling, {active} active task{}{deliveries}",
        if active == "1" { "" } else { "s" }
    )
}

/// An account's polling state in words: polling, or paused with why and until when.
fn polling_state(poll: &crate::jobs::gate::PollStatus) -> String {
    match poll.state.as_str() {
        "polling" => format!(
            "yes ({} in flight, {} requests since start)",
            poll.in_flight, poll.requests
        ),
        state => {
            let kind = poll
                .pause_kind
                .map_or_else(|| "paused".to_owned(), |k| spelling(&k));
            let until = poll
                .paused_until
                .as_deref()
                .map(|t| format!(", until {t}"))
                .unwrap_or_default();
            let cause = poll
                .pause_cause
                .as_deref()
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            esc(&format!(
                "{state} — {kind} (pause #{}{until}){cause}",
                poll.pause_attempt
            ))
            .into_owned()
        }
    }
}

/// An account's request rate: its ceiling, and what it learnt from throttling if lower.
fn rate_text(poll: &crate::jobs::gate::PollStatus) -> String {
    let ceiling = poll
        .rate_limit
        .map_or_else(|| "no rate limit".to_owned(), |r| format!("at most {r}/s"));
    match poll.learnt_rate {
        Some(l) => format!("{ceiling}, learnt {l:.3}/s from throttling"),
        None => ceiling,
    }
}

fn print_status(v: &StatusResponse) {
    out!("{}", esc(&headline(v)));
    out!("sunopoll {}", esc(&v.version));
    for p in v.problems.iter().skip(1) {
        out!("  problem: {}", esc(p));
    }
    let poll = &v.poll;
    if v.accounts.len() > 1 {
        out!("accounts:");
        for a in &v.accounts {
            let active: i64 = v
                .breakdown
                .iter()
                .filter(|c| c.account == a.account && c.state == crate::store::TaskState::Active)
                .map(|c| c.n)
                .sum();
            let state = match a.state.as_str() {
                "polling" => format!(
                    "polling ({} in flight, {} requests)",
                    a.in_flight, a.requests
                ),
                _ => polling_state(a),
            };
            let last = match (a.last_answer.as_deref(), a.last_answer_at.as_deref()) {
                (Some(what), Some(at)) => format!("last answer {} at {}", esc(what), esc(at)),
                _ => "no answer yet".to_owned(),
            };
            out!(
                "  {} ({}): {state}; {}; {active} active task{}; {last}",
                esc(&a.account),
                esc(&a.flavor),
                rate_text(a),
                if active == 1 { "" } else { "s" }
            );
        }
    } else {
        out!("polling:      {}", polling_state(poll));
        if poll.learnt_rate.is_some() {
            out!("rate:         {}", rate_text(poll));
        }
    }
    match (poll.last_answer.as_deref(), poll.last_answer_at.as_deref()) {
        // With several accounts, each line above has its own.
        _ if v.accounts.len() > 1 => {}
        (Some(what), Some(at)) => out!("last answer:  {} at {}", esc(what), esc(at)),
        (Some(what), None) => out!("last answer:  {}", esc(what)),
        _ => out!("last answer:  none yet (no poll answered since start)"),
    }
    match &v.tasks {
        None => out!("tasks:        unknown (the store is not answering)"),
        Some(t) => {
            out!(
                "tasks:        {} active, {} done, {} failed, {} removed",
                t.active,
                t.done,
                t.failed,
                t.removed
            );
            if t.last_seq > 0 {
                out!("events:       {} stored, last #{}", t.events, t.last_seq);
            } else {
                out!("events:       none yet");
            }
        }
    }
    out!("started:      {}", esc(&v.started_at));
    out!("store:        {}", esc(&v.store));
    if let Some(q) = &v.shared {
        out!(
            "daemons:      {} sharing the queue (lease {})",
            q.daemons.len(),
            crate::clock::format_duration(std::time::Duration::from_millis(
                q.lease_ms.max(0).unsigned_abs()
            ))
        );
        for d in &q.daemons {
            out!(
                "  {}{}: v{}, up since {}, last beat {}, leases: {} task{}, {} deliver{}, {} file{}",
                esc(&d.id),
                if d.id == q.me { " (this one)" } else { "" },
                esc(&d.version),
                esc(&d.started_at),
                esc(&d.beat_at),
                d.leased_tasks,
                if d.leased_tasks == 1 { "" } else { "s" },
                d.leased_deliveries,
                if d.leased_deliveries == 1 { "y" } else { "ies" },
                d.leased_files,
                if d.leased_files == 1 { "" } else { "s" },
            );
        }
        for h in &q.stalled {
            let free_in = crate::clock::format_duration(std::time::Duration::from_millis(
                h.free_in_ms.max(0).unsigned_abs(),
            ));
            out!(
                "  {} stopped beating ({}) holding {} task{}, {} deliver{}, {} file{}: taken over by the others within {free_in}",
                esc(&h.id),
                h.beat_at.as_deref().map_or_else(
                    || "no heartbeat kept".to_owned(),
                    |at| format!("last beat {}", esc(at))
                ),
                h.leased_tasks,
                if h.leased_tasks == 1 { "" } else { "s" },
                h.leased_deliveries,
                if h.leased_deliveries == 1 { "y" } else { "ies" },
                h.leased_files,
                if h.leased_files == 1 { "" } else { "s" },
            );
        }
        if !q.member.is_empty() {
            out!(
                "member:       {} (this daemon's targets are registered under it)",
                esc(&q.member)
            );
        }
        for t in &q.targets {
            out!(
                "  target {}: named by {}",
                esc(&t.name),
                t.members
                    .iter()
                    .map(|m| esc(m))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    out!("socket:       {}", esc(&v.socket.display().to_string()));
    out!(
        "config:       {}",
        esc(&v.config.as_ref().map_or_else(
            || "built-in defaults".to_owned(),
            |c| c.display().to_string()
        ))
    );
    if let Some(a) = &v.archive {
        let files = a.files.as_ref().map_or_else(
            || "counts unknown (the store is not answering)".to_owned(),
            |c| {
                format!(
                    "{} pending, {} done ({} bytes), {} failed, {} expired",
                    c.pending, c.done, c.bytes, c.failed, c.expired
                )
            },
        );
        let state = match &a.paused_cause {
            Some(cause) => format!("paused: {cause}"),
            None => format!("{} ({} in flight)", a.state, a.in_flight),
        };
        out!("archive:      {} — {state}; {files}", a.dir);
    }
    if let Some(p) = &v.proxy {
        out!(
            "proxy:        {} — {} request{}: {} tracked, {} passed through, {} refused, {} throttled, {} ambiguous, {} unreachable, {} untracked",
            esc(&p.listen),
            p.requests,
            if p.requests == 1 { "" } else { "s" },
            p.tracked,
            p.passed,
            p.refused,
            p.throttled,
            p.ambiguous,
            p.unreachable,
            p.untracked
        );
    }
    if v.targets.is_empty() {
        match &v.shared {
            Some(q) if !q.targets.is_empty() => out!(
                "forwarding:   no targets of its own (its events still go to the {} registered on the queue, above)",
                q.targets.len()
            ),
            _ => out!("forwarding:   no targets"),
        }
    }
    for t in &v.targets {
        let success = t.last_success_at.as_deref().map_or_else(
            || "no success yet".to_owned(),
            |at| format!("last success {at}"),
        );
        let error = t
            .last_error
            .as_deref()
            .map(|e| {
                let at = t
                    .last_error_at
                    .as_deref()
                    .map(|at| format!(" at {at}"))
                    .unwrap_or_default();
                format!("; last error {}{at}", crate::api::clip(e, 120))
            })
            .unwrap_or_default();
        out!(
            "target {}: {} pending, {} failed, {} delivered; {}{}",
            esc(&t.target),
            t.pending,
            t.failed,
            t.delivered,
            esc(&success),
            esc(&error)
        );
    }
}

fn print_delivery(d: &DeliveryView) {
    let status = d
        .last_status
        .map(|s| format!(" HTTP {s}"))
        .unwrap_or_default();
    let when = match d.state.as_str() {
        "pending" => format!(", next attempt {}", shown(d.next_attempt_at.as_deref())),
        "delivered" => format!(" at {}", shown(d.delivered_at.as_deref())),
        _ => String::new(),
    };
    out!(
        "  → {} {}{status}{} after {} attempt{} ({}, {})",
        esc(&d.target),
        esc(&d.state),
        esc(&when),
        d.attempts,
        if d.attempts == 1 { "" } else { "s" },
        esc(&d.url),
        esc(&d.webhook_id)
    );
    for a in &d.attempt_log {
        out!(
            "      #{} {} {}ms {}{}",
            a.attempt,
            esc(&a.at),
            a.duration_ms,
            esc(&a.outcome),
            a.error
                .as_deref()
                .map(|e| format!(": {}", crate::api::clip(e, 160)))
                .unwrap_or_default()
        );
    }
}

/// Reads task IDs from standard input (for `sunopoll add -`): one per line or separated by
/// whitespace; blank lines and `#` comments are skipped. A comma is refused with the line it is
/// on rather than split on: `a,b` is more likely a CSV column pasted whole than two IDs.
pub fn read_ids(input: impl Read) -> std::io::Result<Vec<String>> {
    let mut text = String::new();
    BufReader::new(input).read_to_string(&mut text)?;
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split_once('#').map_or(line, |(before, _)| before);
        if line.contains(',') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "line {}: {:?} has a comma; give one ID per line (or separate them with spaces)",
                    n + 1,
                    crate::api::clip(line.trim(), 80)
                ),
            ));
        }
        ids.extend(line.split_whitespace().map(str::to_owned));
    }
    Ok(ids)
}

/// Builds the request for a `list`.
pub fn list_request(state: Option<String>, limit: Option<u32>) -> Request {
    Request::List(ListRequest { state, limit })
}

/// Builds the request for a `show`.
pub fn show_request(task_id: String) -> Request {
    Request::Show(ShowRequest { task_id })
}

/// Builds the request for a `remove`.
pub fn remove_request(task_id: String) -> Request {
    Request::Remove(RemoveRequest { task_id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(overrides: serde_json::Value) -> StatusResponse {
        let mut v = serde_json::json!({
            "version": "0.1.0", "healthy": true, "problems": [],
            "started_at": "2026-12-01T10:00:00Z", "uptime_ms": 1000,
            "config": null, "store": "/s.db", "socket": "/s.sock",
            "tasks": {"active": 3, "done": 1, "failed": 0, "removed": 0, "events": 4, "last_seq": 4},
            "poll": {"state": "polling", "pause_kind": null, "pause_attempt": 0, "paused_until": null,
                     "paused_since": null, "paused_for_ms": 0, "pause_cause": null, "in_flight": 0,
                     "requests": 0, "last_answer_at": null, "last_answer": null},
            "targets": []
        });
        for (k, val) in overrides.as_object().expect("object") {
            v[k] = val.clone();
        }
        serde_json::from_value(v).expect("a status answer")
    }

    #[test]
    fn the_headline_says_healthy_or_what_is_wrong_and_what_to_do() {
        assert_eq!(
            headline(&status(serde_json::json!({}))),
            "healthy — polling, 3 active tasks"
        );
        let sick = status(serde_json::json!({
            "healthy": false,
            "problems": ["the API rejected the API key (401): check the key", "store error"]
        }));
        assert_eq!(
            headline(&sick),
            "UNHEALTHY: the API rejected the API key (401): check the key (and 1 more below)"
        );
        let target = |failed: i64, pending: i64| {
            serde_json::json!([{"target": "app", "pending": pending,
            "failed": failed, "delivered": 5, "last_success_at": null, "last_error": null, "last_error_at": null}])
        };
        let given_up = status(serde_json::json!({"targets": target(2, 0)}));
        assert_eq!(
            headline(&given_up),
            "healthy, but 2 deliveries to app were given up: fix the handler, then `sunopoll redeliver --failed-since 1d --target app`"
        );
        let waiting = status(serde_json::json!({"targets": target(0, 4)}));
        assert_eq!(
            headline(&waiting),
            "healthy — polling, 3 active tasks, 4 deliveries pending"
        );
        let mut paused = status(serde_json::json!({}));
        paused.poll.state = "paused".into();
        paused.poll.pause_kind = Some(crate::store::PauseKind::Throttled);
        paused.poll.paused_until = Some("2026-12-01T10:01:00Z".into());
        assert_eq!(
            headline(&paused),
            "healthy — polling paused (throttled, next try at 2026-12-01T10:01:00Z); nothing to do unless it lasts"
        );
    }

    #[test]
    fn ids_from_stdin_split_on_whitespace_and_lines_skipping_comments_never_on_commas() {
        let ids = read_ids(&b"a1 b2\n\tc3\n\n# a comment, with a comma\nd4  # trailing\n"[..])
            .expect("read");
        assert_eq!(ids, ["a1", "b2", "c3", "d4"]);
        let e = read_ids(&b"a1\nc3,d4\n"[..]).expect_err("a comma is refused");
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("c3,d4"),
            "{e}"
        );
    }

    #[test]
    fn socket_search_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = Environment {
            uid: 1000,
            xdg_runtime_dir: Some(dir.path().to_owned()),
            ..Environment::default()
        };
        let explicit = Path::new("/x/explicit.sock");
        let from_env = Path::new("/x/env.sock");
        assert_eq!(
            find_socket(Some(explicit), Some(from_env), None, &env),
            explicit
        );
        assert_eq!(find_socket(None, Some(from_env), None, &env), from_env);
        let configured = Path::new("/x/config.sock");
        assert_eq!(find_socket(None, None, Some(configured), &env), configured);
        // Nothing exists: the per-user default (unless the system socket exists on this host).
        let found = find_socket(None, None, None, &env);
        let user = dir.path().join("sunopoll.sock");
        assert!(found == user || found == Path::new(SYSTEM_SOCKET));
        std::fs::write(&user, "").expect("touch");
        assert_eq!(find_socket(None, None, None, &env), user);
    }
}
