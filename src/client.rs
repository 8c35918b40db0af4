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

use serde_json::Value;

use crate::config::{Environment, SYSTEM_SOCKET};
use crate::protocol::{
    ADD_BATCH, AddRequest, ErrorBody, EventsRequest, ListRequest, RemoveRequest, Request,
    ShowRequest, StatusRequest,
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
    /// Connects to the daemon's socket.
    pub fn open(path: &Path) -> Result<Connection, ClientError> {
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

    /// Reads one response line; `None` at end of stream. `timeout` bounds the wait.
    pub fn receive(&mut self, timeout: Option<Duration>) -> Result<Option<Value>, ClientError> {
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
        Ok(Some(value))
    }

    /// One request, one answer.
    pub fn call(&mut self, request: &Request) -> Result<Value, ClientError> {
        self.send(request)?;
        self.receive(Some(ANSWER_TIMEOUT))?.ok_or_else(|| {
            ClientError::Protocol("the daemon closed the connection without answering".to_owned())
        })
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
        other => Connection::open(socket)
            .and_then(|mut c| c.call(&other))
            .map(|v| {
                print_answer(&other, &v, out);
                0
            }),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("sunopoll: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn add(socket: &Path, req: AddRequest, out: Output) -> Result<u8, ClientError> {
    let mut conn = Connection::open(socket)?;
    let (mut added, mut existing) = (0u64, 0u64);
    let mut all = Vec::new();
    for chunk in req.task_ids.chunks(ADD_BATCH) {
        let answer = conn.call(&Request::Add(AddRequest {
            task_ids: chunk.to_vec(),
            callback_url: req.callback_url.clone(),
            label: req.label.clone(),
        }))?;
        added += answer["added"].as_u64().unwrap_or(0);
        existing += answer["existing"].as_u64().unwrap_or(0);
        if let Some(tasks) = answer["tasks"].as_array() {
            all.extend(tasks.iter().cloned());
        }
    }
    if out.json {
        out!(
            "{}",
            serde_json::json!({"ok": true, "added": added, "existing": existing, "tasks": all})
        );
        return Ok(0);
    }
    for t in &all {
        let id = t["task_id"].as_str().unwrap_or("?");
        match t["result"].as_str() {
            Some("added") => out!("added     {id}"),
            Some("readded") => out!("re-added  {id}"),
            _ => out!(
                "known     {id}  ({}{})",
                t["state"].as_str().unwrap_or("?"),
                t["stage"]
                    .as_str()
                    .map(|s| format!(", last event {s}"))
                    .unwrap_or_default()
            ),
        }
    }
    if all.len() > 1 {
        out!("{added} added, {existing} already known");
    }
    Ok(0)
}

fn events(socket: &Path, mut req: EventsRequest, out: Output) -> Result<u8, ClientError> {
    let mut conn = Connection::open(socket)?;
    loop {
        let answer = conn.call(&Request::Events(req.clone()))?;
        let list = answer["events"].as_array().cloned().unwrap_or_default();
        for ev in &list {
            print_event(ev, out);
            req.since = ev["seq"].as_i64().or(req.since);
        }
        if answer["more"] != Value::Bool(true) || list.is_empty() {
            return Ok(0);
        }
    }
}

fn follow(socket: &Path, req: EventsRequest, out: Output) -> Result<u8, ClientError> {
    let mut conn = Connection::open(socket)?;
    conn.send(&Request::Events(req))?;
    while let Some(line) = conn.receive(None)? {
        print_event(&line["event"], out);
        let _ = std::io::stdout().flush();
    }
    Err(ClientError::Unreachable(
        "the daemon closed the event stream (it is stopping)".to_owned(),
    ))
}

fn status(socket: &Path, req: StatusRequest, out: Output) -> Result<u8, ClientError> {
    let v = Connection::open(socket)?.call(&Request::Status(req))?;
    let healthy = v["healthy"] == Value::Bool(true);
    if out.json {
        out!("{v}");
    } else {
        print_status(&v);
    }
    Ok(if healthy { 0 } else { EXIT_REFUSED })
}

fn print_event(ev: &Value, out: Output) {
    if out.json {
        out!("{ev}");
        return;
    }
    let tracks = ev["body"]["data"]["data"].as_array().map_or(0, Vec::len);
    let msg = ev["body"]["msg"].as_str().unwrap_or("");
    out!(
        "#{:<6} {}  {}  {:<8} {}  {}",
        ev["seq"],
        ev["created_at"].as_str().unwrap_or("?"),
        ev["task_id"].as_str().unwrap_or("?"),
        ev["stage"].as_str().unwrap_or("?"),
        ev["code"],
        if ev["stage"] == "error" {
            crate::api::clip(msg, 120)
        } else {
            format!("{tracks} track{}", if tracks == 1 { "" } else { "s" })
        }
    );
}

fn field<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

fn print_answer(request: &Request, v: &Value, out: Output) {
    if out.json {
        out!("{v}");
        return;
    }
    match request {
        Request::List(req) => {
            let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
            let shown = tasks.len();
            if tasks.is_empty() {
                out!("no tasks");
                return;
            }
            out!(
                "{:<34} {:<8} {:<9} {:<22} {:<21} LABEL",
                "TASK ID",
                "STATE",
                "STAGE",
                "LAST STATUS",
                "NEXT POLL"
            );
            for t in tasks {
                out!(
                    "{:<34} {:<8} {:<9} {:<22} {:<21} {}",
                    field(&t, "task_id"),
                    field(&t, "state"),
                    field(&t, "stage"),
                    field(&t, "last_status"),
                    field(&t, "next_poll_at"),
                    t["label"].as_str().unwrap_or("")
                );
            }
            if let Some(limit) = req.limit
                && shown >= limit as usize
            {
                out!("(the newest {limit} shown; --limit 0 shows all)");
            }
        }
        Request::Show(_) => {
            let t = &v["task"];
            for (name, key) in [
                ("task", "task_id"),
                ("state", "state"),
                ("last event", "stage"),
                ("last status", "last_status"),
                ("polls", "polls"),
                ("added", "added_at"),
                ("next poll", "next_poll_at"),
                ("deadline", "deadline_at"),
                ("finished", "finished_at"),
                ("callback url", "callback_url"),
                ("label", "label"),
                ("last error", "last_error"),
            ] {
                let value = match &t[key] {
                    Value::Null => continue,
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out!("{name:<13} {value}");
            }
            let events = v["events"].as_array().cloned().unwrap_or_default();
            out!("events        {}", events.len());
            for ev in events {
                out!("");
                print_event(&ev, Output { json: false });
                for d in ev["deliveries"].as_array().into_iter().flatten() {
                    print_delivery(d);
                }
                out!(
                    "{}",
                    serde_json::to_string_pretty(&ev["body"]).unwrap_or_default()
                );
            }
        }
        Request::Redeliver(_) => {
            let n = v["deliveries"].as_u64().unwrap_or(0);
            if n == 0 {
                out!("nothing to redeliver (no matching deliveries, or no forward targets)");
            } else {
                out!(
                    "{n} deliver{} queued again",
                    if n == 1 { "y" } else { "ies" }
                );
            }
        }
        Request::Remove(_) => {
            let id = field(v, "task_id");
            if v["removed"] == Value::Bool(true) {
                out!("removed {id}; it is no longer polled (its events are kept)");
            } else {
                out!("{id} was already {}; nothing to do", field(v, "was"));
            }
        }
        _ => out!("{v}"),
    }
}

fn print_status(v: &Value) {
    let healthy = v["healthy"] == Value::Bool(true);
    out!(
        "sunopoll {} — {}",
        field(v, "version"),
        if healthy { "healthy" } else { "UNHEALTHY" }
    );
    for p in v["problems"].as_array().into_iter().flatten() {
        out!("  problem: {}", p.as_str().unwrap_or(""));
    }
    let poll = &v["poll"];
    let state = field(poll, "state");
    match state {
        "polling" => out!(
            "polling:      yes ({} in flight, {} requests since start)",
            poll["in_flight"],
            poll["requests"]
        ),
        _ => out!(
            "polling:      {state} — {} (pause #{}, until {}): {}",
            field(poll, "pause_kind"),
            poll["pause_attempt"],
            field(poll, "paused_until"),
            field(poll, "pause_cause")
        ),
    }
    out!(
        "last answer:  {} at {}",
        field(poll, "last_answer"),
        field(poll, "last_answer_at")
    );
    let t = &v["tasks"];
    if t.is_null() {
        out!("tasks:        unknown (the store is not answering)");
    } else {
        out!(
            "tasks:        {} active, {} done, {} failed, {} removed",
            t["active"],
            t["done"],
            t["failed"],
            t["removed"]
        );
        out!(
            "events:       {} stored, last #{}",
            t["events"],
            t["last_seq"]
        );
    }
    out!("started:      {}", field(v, "started_at"));
    out!("store:        {}", field(v, "store"));
    out!("socket:       {}", field(v, "socket"));
    out!(
        "config:       {}",
        v["config"].as_str().unwrap_or("built-in defaults")
    );
    let targets = v["targets"].as_array().cloned().unwrap_or_default();
    if targets.is_empty() {
        out!("forwarding:   no targets");
    }
    for t in targets {
        out!(
            "target {}: {} pending, {} failed, {} delivered; last success {}{}",
            field(&t, "target"),
            t["pending"],
            t["failed"],
            t["delivered"],
            field(&t, "last_success_at"),
            t["last_error"]
                .as_str()
                .map(|e| format!(
                    "; last error {} at {}",
                    crate::api::clip(e, 120),
                    field(&t, "last_error_at")
                ))
                .unwrap_or_default()
        );
    }
}

fn print_delivery(d: &Value) {
    let status = d["last_status"]
        .as_u64()
        .map(|s| format!(" HTTP {s}"))
        .unwrap_or_default();
    let when = match d["state"].as_str() {
        Some("pending") => format!(", next attempt {}", field(d, "next_attempt_at")),
        Some("delivered") => format!(" at {}", field(d, "delivered_at")),
        _ => String::new(),
    };
    out!(
        "  → {} {}{status}{when} after {} attempt{} ({}, {})",
        field(d, "target"),
        field(d, "state"),
        d["attempts"],
        if d["attempts"] == 1 { "" } else { "s" },
        field(d, "url"),
        field(d, "webhook_id")
    );
    for a in d["attempt_log"].as_array().into_iter().flatten() {
        out!(
            "      #{} {} {}ms {}{}",
            a["attempt"],
            field(a, "at"),
            a["duration_ms"],
            field(a, "outcome"),
            a["error"]
                .as_str()
                .map(|e| format!(": {}", crate::api::clip(e, 160)))
                .unwrap_or_default()
        );
    }
}

/// Reads task IDs from standard input (for `sunopoll add -`): separated by whitespace or commas.
pub fn read_ids(input: impl Read) -> std::io::Result<Vec<String>> {
    let mut text = String::new();
    BufReader::new(input).read_to_string(&mut text)?;
    Ok(text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect())
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

    #[test]
    fn ids_from_stdin_split_on_whitespace_and_commas() {
        let ids = read_ids(&b"a1 b2\nc3,d4\n\n"[..]).expect("read");
        assert_eq!(ids, ["a1", "b2", "c3", "d4"]);
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
