//! The control protocol, shared by the daemon and the CLI: newline-delimited JSON over a Unix
//! socket, one request object per line and one response object per line.
//!
//! ```text
//! → {"cmd":"add","task_ids":["5c79…"],"callback_url":"http://127.0.0.1:3000/suno","label":"demo"}
//! ← {"ok":true,"tasks":[{"task_id":"5c79…","result":"added","kind":"music","state":"active",…}]}
//! ← {"ok":false,"error":{"code":"invalid_task_id","message":"…"}}
//! ```
//!
//! `events` with `"follow":true` answers with one `{"ok":true,"event":{…}}` line per event, for
//! as long as the client stays connected.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::api::families::Kind;
use crate::clock::format_utc;
use crate::events::Stage;
use crate::jobs::gate::PollStatus;
/// States and add results travel on the wire as the store names them.
pub use crate::store::{AddResult, TaskState};
use crate::store::{AddedTask, ArchiveCounts, Counts, FileRecord, FileState};
use crate::store::{AttemptLog, DeliveryRecord, EventRecord, TargetSummary, TaskRecord};

/// Longest request line accepted. A batch of ~1 800 32-character IDs fits; the CLI splits larger
/// batches. Anything longer is a mistake or an attack, and is refused before it costs memory.
pub const MAX_LINE: usize = 64 * 1024;

/// Task IDs per `add` request that the CLI sends at once (well under [`MAX_LINE`]).
pub const ADD_BATCH: usize = 1000;

/// Longest task ID accepted (real ones are 32 hex characters).
pub const MAX_TASK_ID: usize = 128;

/// Longest label accepted.
pub const MAX_LABEL: usize = 256;

/// Longest per-task callback URL accepted.
pub const MAX_URL: usize = 2048;

/// Every command the daemon understands.
pub const COMMANDS: &[&str] = &[
    "add",
    "list",
    "show",
    "remove",
    "events",
    "status",
    "redeliver",
    "cancel",
    "archive-redo",
];

/// `add`: start tracking one or more task IDs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// The IDs, as the API returned them.
    pub task_ids: Vec<String>,
    /// Also deliver this task's events to this URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// A free-text label shown in `list` and `show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Poll tasks that ended `failed` or were removed again, keeping their events (no stage
    /// is emitted twice). Without it, a known ID is left as it is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub again: bool,
    /// The tasks' family: `music` (the default), `lyrics`, `wav`, `stems`, `midi`, `mp4` or
    /// `cover`. One task is one (kind, ID): an ID tracked under another kind is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The account to poll them on (default: the first configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// `list`: tasks, optionally filtered by state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    /// `active`, `done`, `failed`, `removed` or `all` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// At most this many (the most recently added first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `show`: one task with its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowRequest {
    /// The task.
    pub task_id: String,
}

/// `remove`: stop tracking a task; its events are kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveRequest {
    /// The task.
    pub task_id: String,
}

/// `events`: the event log, optionally followed live.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsRequest {
    /// Only events with a sequence number above this. Without it, `follow` starts at the newest
    /// event and a one-off listing starts at the beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Keep the connection open and stream new events as they happen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
    /// Only this task's events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// At most this many events in a one-off listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `redeliver`: replay deliveries, keeping their `webhook-id`. Exactly one of `seq`, `task_id`,
/// `failed_since`, `sent_since` picks what; `target` limits it to one target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeliverRequest {
    /// One event, by sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Every event of one task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Every delivery given up since this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_since: Option<String>,
    /// Every delivery made since this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_since: Option<String>,
    /// Only to this target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `cancel`: give up the pending deliveries of one event (`seq`) or one task (`task_id`);
/// exactly one of the two.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// One event, by sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Every event of one task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
}

/// `status`: daemon health.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {}

/// `archive-redo`: check one task's kept files against their recorded SHA-256, and fetch again
/// those that are missing, damaged, failed or expired (while the API still has them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveRedoRequest {
    /// The task.
    pub task_id: String,
}

/// A request, as sent on the wire (`{"cmd": "...", ...}`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// See [`AddRequest`].
    Add(AddRequest),
    /// See [`ListRequest`].
    List(ListRequest),
    /// See [`ShowRequest`].
    Show(ShowRequest),
    /// See [`RemoveRequest`].
    Remove(RemoveRequest),
    /// See [`EventsRequest`].
    Events(EventsRequest),
    /// See [`StatusRequest`].
    Status(StatusRequest),
    /// See [`RedeliverRequest`].
    Redeliver(RedeliverRequest),
    /// See [`CancelRequest`].
    Cancel(CancelRequest),
    /// See [`ArchiveRedoRequest`].
    #[serde(rename = "archive-redo")]
    ArchiveRedo(ArchiveRedoRequest),
}

/// Why a request line was refused. `code` is stable for scripts; `message` is for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable identifier, e.g. `invalid_json`, `invalid_task_id`, `not_found`.
    pub code: String,
    /// What went wrong, in words.
    pub message: String,
}

impl ErrorBody {
    /// Builds an error body.
    pub fn new(code: &str, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The response line for this error.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::json!({"ok": false, "error": self}).to_string();
        s.push('\n');
        s
    }
}

impl Request {
    /// Parses one request line (without its newline). Every refusal says what was wrong.
    pub fn parse(line: &[u8]) -> Result<Request, ErrorBody> {
        let text = std::str::from_utf8(line).map_err(|e| {
            ErrorBody::new("invalid_json", format!("the request is not UTF-8 ({e})"))
        })?;
        let mut value: Value = serde_json::from_str(text).map_err(|e| {
            ErrorBody::new(
                "invalid_json",
                format!("the request is not valid JSON: {e}"),
            )
        })?;
        // serde_json refuses such a number by default; with numbers kept as written it parses,
        // and it is still no value any field could take.
        if let Some(n) = crate::json::first_unrepresentable(&value) {
            return Err(ErrorBody::new(
                "invalid_json",
                format!(
                    "the request is not valid JSON: the number {} is out of range",
                    crate::api::clip(n.as_str(), 64)
                ),
            ));
        }
        let Some(obj) = value.as_object_mut() else {
            return Err(ErrorBody::new(
                "bad_request",
                "the request must be a JSON object like {\"cmd\":\"status\"}",
            ));
        };
        let cmd = match obj.remove("cmd") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(ErrorBody::new("bad_request", "`cmd` must be a string")),
            None => {
                return Err(ErrorBody::new(
                    "bad_request",
                    format!(
                        "the request has no `cmd`; commands: {}",
                        COMMANDS.join(", ")
                    ),
                ));
            }
        };
        fn body<T: serde::de::DeserializeOwned>(cmd: &str, v: Value) -> Result<T, ErrorBody> {
            crate::json::typed(&v)
                .map_err(|e| ErrorBody::new("bad_request", format!("bad `{cmd}` request: {e}")))
        }
        Ok(match cmd.as_str() {
            "add" => Request::Add(body(&cmd, value)?),
            "list" => Request::List(body(&cmd, value)?),
            "show" => Request::Show(body(&cmd, value)?),
            "remove" => Request::Remove(body(&cmd, value)?),
            "events" => Request::Events(body(&cmd, value)?),
            "status" => Request::Status(body(&cmd, value)?),
            "redeliver" => Request::Redeliver(body(&cmd, value)?),
            "cancel" => Request::Cancel(body(&cmd, value)?),
            "archive-redo" => Request::ArchiveRedo(body(&cmd, value)?),
            other => {
                return Err(ErrorBody::new(
                    "unknown_command",
                    format!(
                        "unknown command {:?}; commands: {}",
                        crate::api::clip(other, 64),
                        COMMANDS.join(", ")
                    ),
                ));
            }
        })
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("requests always serialise");
        s.push('\n');
        s
    }
}

/// Checks one task ID: non-empty, at most [`MAX_TASK_ID`] characters of `[A-Za-z0-9_-]`.
pub fn check_task_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("\"\" is empty".to_owned());
    }
    let shown = || {
        format!(
            "\"{}\"",
            crate::api::clip(&id.escape_debug().to_string(), 48)
        )
    };
    if id.chars().count() > MAX_TASK_ID {
        return Err(format!(
            "{} is longer than {MAX_TASK_ID} characters",
            shown()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(format!(
            "{} contains {:?} (allowed: letters, digits, '-' and '_')",
            shown(),
            c
        ));
    }
    Ok(())
}

/// Checks every ID and names each bad one in a single error.
pub fn check_task_ids(ids: &[String]) -> Result<(), ErrorBody> {
    if ids.is_empty() {
        return Err(ErrorBody::new("invalid_task_id", "no task IDs given"));
    }
    let bad: Vec<String> = ids
        .iter()
        .filter_map(|id| check_task_id(id).err())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = bad.iter().take(20).map(String::as_str).collect();
    let more = if bad.len() > 20 {
        format!("; and {} more", bad.len() - 20)
    } else {
        String::new()
    };
    Err(ErrorBody::new(
        "invalid_task_id",
        format!(
            "{} bad task ID{}: {}{more}",
            bad.len(),
            if bad.len() == 1 { "" } else { "s" },
            shown.join("; ")
        ),
    ))
}

/// Checks a label: at most [`MAX_LABEL`] characters and no control characters (so it cannot
/// forge lines in logs or in `list`).
pub fn check_label(label: &str) -> Result<(), ErrorBody> {
    if label.chars().count() > MAX_LABEL {
        return Err(ErrorBody::new(
            "invalid_label",
            format!("the label is longer than {MAX_LABEL} characters"),
        ));
    }
    if label.chars().any(char::is_control) {
        return Err(ErrorBody::new(
            "invalid_label",
            "the label contains control characters (newlines, tabs, escapes)",
        ));
    }
    Ok(())
}

/// Checks a per-task callback URL: absolute `http`/`https`, at most [`MAX_URL`] characters.
pub fn check_callback_url(url: &str) -> Result<(), ErrorBody> {
    let bad = |why: String| ErrorBody::new("invalid_callback_url", why);
    if url.len() > MAX_URL {
        return Err(bad(format!(
            "the callback URL is longer than {MAX_URL} characters"
        )));
    }
    // URL parsing silently drops tabs and newlines, but the URL is stored and shown as given:
    // a line break in it would forge lines in `list` and `show`.
    if url.chars().any(char::is_control) {
        return Err(bad(
            "the callback URL contains control characters (newlines, tabs, escapes)".to_owned(),
        ));
    }
    match url::Url::parse(url) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.has_host() => Ok(()),
        Ok(u) => Err(bad(format!(
            "the callback URL must be http:// or https://, not {}:",
            u.scheme()
        ))),
        Err(e) => Err(bad(format!(
            "\"{}\" is not a URL: {e}",
            crate::api::clip(&url.escape_debug().to_string(), 80)
        ))),
    }
}

/// A task as `list`, `show` and `add` report it. Times are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    /// The API's task ID.
    pub task_id: String,
    /// Its family (`music`, `wav`, …).
    #[serde(default)]
    pub kind: Kind,
    /// The account it is polled on.
    #[serde(default)]
    pub account: String,
    /// Lifecycle state.
    pub state: TaskState,
    /// The last stage emitted, if any.
    pub stage: Option<Stage>,
    /// The status record-info last reported.
    pub last_status: Option<String>,
    /// The last problem polling this task, if the last poll had one.
    pub last_error: Option<String>,
    /// Polls made for this task.
    pub polls: i64,
    /// When it was added.
    pub added_at: String,
    /// When its row last changed.
    pub updated_at: String,
    /// When it will next be polled (active tasks only).
    pub next_poll_at: Option<String>,
    /// When it will be given up with a 408 `error`.
    pub deadline_at: String,
    /// When it ended (done, failed or removed).
    pub finished_at: Option<String>,
    /// Per-task callback URL.
    pub callback_url: Option<String>,
    /// Free-text label.
    pub label: Option<String>,
}

/// One delivery of an event to one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryView {
    /// Target name.
    pub target: String,
    /// Where it goes.
    pub url: String,
    /// The `webhook-id` header, the same on every attempt and replay.
    pub webhook_id: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// Next attempt (pending only).
    pub next_attempt_at: Option<String>,
    /// Last attempt.
    pub last_attempt_at: Option<String>,
    /// HTTP status of the last attempt, if it got one.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it was delivered.
    pub delivered_at: Option<String>,
    /// Every attempt.
    pub attempt_log: Vec<AttemptView>,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptView {
    /// 1 for the first.
    pub attempt: u32,
    /// When it started.
    pub at: String,
    /// How long it took.
    pub duration_ms: i64,
    /// HTTP status, if an answer came.
    pub status: Option<u16>,
    /// What went wrong.
    pub error: Option<String>,
    /// `delivered`, `retry`, `failed`, or `superseded` (a replay was requested while it was in
    /// flight, so its result did not count and the delivery was made again).
    pub outcome: String,
}

/// Delivery health of one target, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Target name.
    pub target: String,
    /// Deliveries waiting.
    pub pending: i64,
    /// Deliveries given up.
    pub failed: i64,
    /// Deliveries made.
    pub delivered: i64,
    /// Last success.
    pub last_success_at: Option<String>,
    /// Last failure's cause.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<String>,
}

/// One stored event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventView {
    /// Sequence number: increasing, never reused.
    pub seq: i64,
    /// The task.
    pub task_id: String,
    /// The task's family.
    #[serde(default)]
    pub kind: Kind,
    /// The stage.
    pub stage: Stage,
    /// The callback `code`.
    pub code: i64,
    /// When it was stored (RFC 3339 UTC).
    pub created_at: String,
    /// The exact callback body, as JSON.
    pub body: Box<RawValue>,
}

impl TaskView {
    /// Presents a stored task: times as RFC 3339 UTC, `next_poll_at` only while it is active.
    pub fn from_record(t: TaskRecord) -> TaskView {
        TaskView {
            next_poll_at: (t.state == TaskState::Active).then(|| format_utc(t.next_poll_at)),
            task_id: t.task_id,
            kind: t.kind,
            account: t.account,
            state: t.state,
            stage: t.stage,
            last_status: t.last_status,
            last_error: t.last_error,
            polls: t.polls,
            added_at: format_utc(t.added_at),
            updated_at: format_utc(t.updated_at),
            deadline_at: format_utc(t.deadline_at),
            finished_at: t.finished_at.map(format_utc),
            callback_url: t.callback_url.as_deref().map(crate::api::redact_url),
            label: t.label,
        }
    }
}

impl DeliveryView {
    /// Presents a stored delivery: credentials in its URL redacted, times as RFC 3339 UTC,
    /// `next_attempt_at` only while it is pending.
    pub fn from_record(d: DeliveryRecord) -> DeliveryView {
        DeliveryView {
            next_attempt_at: (d.state == "pending").then(|| format_utc(d.next_attempt_at)),
            target: crate::api::redact_url(&d.target),
            url: crate::api::redact_url(&d.url),
            webhook_id: d.webhook_id,
            state: d.state,
            attempts: d.attempts,
            last_attempt_at: d.last_attempt_at.map(format_utc),
            last_status: d.last_status,
            last_error: d.last_error,
            delivered_at: d.delivered_at.map(format_utc),
            attempt_log: d
                .attempt_log
                .into_iter()
                .map(AttemptView::from_log)
                .collect(),
        }
    }
}

impl AttemptView {
    /// Presents one recorded attempt.
    pub fn from_log(a: AttemptLog) -> AttemptView {
        AttemptView {
            attempt: a.attempt,
            at: format_utc(a.started_at),
            duration_ms: a.duration_ms,
            status: a.status,
            error: a.error,
            outcome: a.outcome,
        }
    }
}

impl TargetStatus {
    /// Presents a target's stored delivery summary.
    pub fn from_summary(t: TargetSummary) -> TargetStatus {
        TargetStatus {
            // A target named by its URL before names were redacted keeps that name in the
            // store: it is shown without its credentials all the same.
            target: crate::api::redact_url(&t.target),
            pending: t.pending,
            failed: t.failed,
            delivered: t.delivered,
            last_success_at: t.last_success_at.map(format_utc),
            last_error: t.last_error,
            last_error_at: t.last_error_at.map(format_utc),
        }
    }

    /// A configured target nothing was delivered to yet.
    pub fn idle(target: String) -> TargetStatus {
        TargetStatus {
            target,
            pending: 0,
            failed: 0,
            delivered: 0,
            last_success_at: None,
            last_error: None,
            last_error_at: None,
        }
    }
}

impl EventView {
    /// Presents a stored event. Fails (saying which event) if its stored body is not JSON.
    pub fn from_record(e: EventRecord) -> Result<EventView, String> {
        let seq = e.seq;
        Ok(EventView {
            seq,
            task_id: e.task_id,
            kind: e.kind,
            stage: e.stage,
            code: e.code,
            created_at: format_utc(e.created_at),
            body: RawValue::from_string(e.body)
                .map_err(|err| format!("event {seq} body: {err}"))?,
        })
    }
}

/// One event in a `show` answer: the event's fields, then its deliveries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShownEvent {
    /// Sequence number.
    pub seq: i64,
    /// The task.
    pub task_id: String,
    /// The task's family.
    #[serde(default)]
    pub kind: Kind,
    /// The stage.
    pub stage: Stage,
    /// The callback `code`.
    pub code: i64,
    /// When it was stored (RFC 3339 UTC).
    pub created_at: String,
    /// The exact callback body, as JSON.
    pub body: Box<RawValue>,
    /// Every delivery of this event, one per target.
    pub deliveries: Vec<DeliveryView>,
}

impl ShownEvent {
    /// An event with its deliveries.
    pub fn new(ev: EventView, deliveries: Vec<DeliveryView>) -> ShownEvent {
        ShownEvent {
            seq: ev.seq,
            task_id: ev.task_id,
            kind: ev.kind,
            stage: ev.stage,
            code: ev.code,
            created_at: ev.created_at,
            body: ev.body,
            deliveries,
        }
    }
}

/// The answer to `add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddResponse {
    /// IDs now tracked that were not before (new or re-added).
    pub added: u64,
    /// IDs that were already tracked.
    pub existing: u64,
    /// Every distinct ID, in request order.
    pub tasks: Vec<AddedTask>,
}

/// The answer to `list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListResponse {
    /// Newest first.
    pub tasks: Vec<TaskView>,
}

/// The answer to `show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShowResponse {
    /// The task.
    pub task: TaskView,
    /// Its events, oldest first, each with its deliveries.
    pub events: Vec<ShownEvent>,
    /// Its archived files (none unless `[archive]` is on and the task completed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileView>,
}

/// One archive file of a task, as `show` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileView {
    /// Local name inside the task's directory.
    pub name: String,
    /// What the file is (`audio`, `source_audio`, `image`, `wav`, `stem`, `video`, …).
    pub kind: String,
    /// The track it belongs to, if any.
    pub audio_id: Option<String>,
    /// `pending`, `done`, `failed` or `expired`.
    pub state: FileState,
    /// Where it is (or will be) kept: a path, or an `s3://` URL.
    pub path: String,
    /// Where it came from (credentials redacted); `null`: written from the result itself.
    pub url: Option<String>,
    /// Bytes, once kept.
    pub size: Option<u64>,
    /// Lowercase hex SHA-256, once kept.
    pub sha256: Option<String>,
    /// Tries so far.
    pub attempts: u32,
    /// The last problem, if the last try had one.
    pub last_error: Option<String>,
    /// When it was kept.
    pub kept_at: Option<String>,
}

impl FileView {
    /// The view of `f`, kept at `path`.
    pub fn from_record(f: FileRecord, path: String) -> FileView {
        FileView {
            name: f.name,
            kind: f.kind,
            audio_id: f.audio_id,
            state: f.state,
            path,
            url: f.url.map(|u| crate::api::redact_url(&u)),
            size: f.size,
            sha256: f.sha256,
            attempts: f.attempts,
            last_error: f.last_error,
            kept_at: f.done_at.map(format_utc),
        }
    }
}

/// The answer to `archive-redo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRedoResponse {
    /// Kept files whose bytes still match their SHA-256.
    pub verified: u64,
    /// Files to be fetched again: missing, damaged, failed or expired.
    pub refetching: Vec<String>,
}

/// The archive's part of `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveStatusView {
    /// `fetching`, or `paused` (then `paused_cause` says why).
    pub state: String,
    /// Why downloads are paused.
    pub paused_cause: Option<String>,
    /// Files being fetched now.
    pub in_flight: usize,
    /// The archive directory.
    pub dir: String,
    /// Files per state and bytes kept; `null` when the store is not answering.
    pub files: Option<ArchiveCounts>,
}

/// The answer to `remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveResponse {
    /// The task.
    pub task_id: String,
    /// Its state before.
    pub was: TaskState,
    /// True if it was active and is now removed.
    pub removed: bool,
}

/// The answer to a one-off `events` listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventsResponse {
    /// Oldest first.
    pub events: Vec<EventView>,
    /// True when more events follow the last one (ask again with `since` = its `seq`).
    pub more: bool,
}

/// One line of an `events --follow` stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventLine {
    /// The event.
    pub event: EventView,
}

/// The answer to `cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResponse {
    /// Pending deliveries given up.
    pub cancelled: u64,
}

/// The answer to `redeliver`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedeliverResponse {
    /// Deliveries now pending because of the request.
    pub deliveries: u64,
}

/// The answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResponse {
    /// The daemon's version.
    pub version: String,
    /// No problems.
    pub healthy: bool,
    /// What is wrong, in words.
    pub problems: Vec<String>,
    /// When the daemon started (RFC 3339 UTC).
    pub started_at: String,
    /// Milliseconds since then.
    pub uptime_ms: i64,
    /// The config file, if any.
    pub config: Option<PathBuf>,
    /// The store: the SQLite file, or the PostgreSQL database (never its password).
    pub store: String,
    /// The control socket.
    pub socket: PathBuf,
    /// Task counts; `null` when the store is not answering.
    pub tasks: Option<Counts>,
    /// The first (default) account's polling loop.
    pub poll: PollStatus,
    /// Every account's polling loop, the first as in `poll`.
    #[serde(default)]
    pub accounts: Vec<PollStatus>,
    /// Task counts per kind, account and state (kept counts; zeros left out).
    #[serde(default)]
    pub breakdown: Vec<crate::store::TaskCount>,
    /// Delivery health per target.
    pub targets: Vec<TargetStatus>,
    /// The archive, when `[archive]` is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveStatusView>,
    /// On a PostgreSQL queue: the daemons sharing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<SharedQueueView>,
}

/// The daemons sharing one PostgreSQL queue, as `status` lists them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedQueueView {
    /// The answering daemon's name.
    pub me: String,
    /// How long a claim keeps other daemons off a row (ms).
    pub lease_ms: i64,
    /// Every daemon that beat within the last lease, oldest first.
    pub daemons: Vec<DaemonView>,
    /// The answering daemon's member name (host and control socket), under which its targets
    /// are registered.
    #[serde(default)]
    pub member: String,
    /// Every registered target, by name: events any daemon stores are routed to each of them.
    #[serde(default)]
    pub targets: Vec<SharedTargetView>,
    /// Daemons that stopped beating while holding live leases: their work, and when the live
    /// daemons take it over.
    #[serde(default)]
    pub stalled: Vec<StalledView>,
}

/// Work a daemon that stopped beating still holds, until its leases run out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StalledView {
    /// The daemon's name: `host:pid:random`.
    pub id: String,
    /// Its last heartbeat (RFC 3339 UTC, the database's clock), while its row is kept.
    pub beat_at: Option<String>,
    /// Tasks it holds a live lease on.
    pub leased_tasks: i64,
    /// Deliveries it holds a live lease on.
    pub leased_deliveries: i64,
    /// Archive files it holds a live lease on.
    pub leased_files: i64,
    /// In how many ms all of it is free for the live daemons (who take it over then).
    pub free_in_ms: i64,
}

/// A target registered on a shared queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SharedTargetView {
    /// Its name.
    pub name: String,
    /// The members (host and control socket) whose configs name it, running or not.
    pub members: Vec<String>,
}

/// One live daemon on a shared queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonView {
    /// Its name: `host:pid:random`.
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process ID there.
    pub pid: i64,
    /// Its sunopoll version.
    pub version: String,
    /// When it started (RFC 3339 UTC, the database's clock).
    pub started_at: String,
    /// Its last heartbeat (RFC 3339 UTC, the database's clock).
    pub beat_at: String,
    /// Tasks it holds a live lease on.
    pub leased_tasks: i64,
    /// Deliveries it holds a live lease on.
    pub leased_deliveries: i64,
    /// Archive files it holds a live lease on.
    pub leased_files: i64,
}

/// The `{"ok": true, ...}` envelope: `ok` first, then the answer's own fields.
#[derive(Serialize)]
struct Answer<'a, T> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

/// The line answering a request that succeeded, newline included.
pub fn answer_line<T: Serialize>(body: &T) -> Result<String, serde_json::Error> {
    let mut s = serde_json::to_string(&Answer { ok: true, body })?;
    s.push('\n');
    Ok(s)
}

/// A successful answer whose one list field is written row by row, for answers too long to
/// build whole (`list` over a million tasks, `events` over large bodies): the bytes are the
/// ones [`answer_line`] writes for the whole answer, so the client reads one line either way,
/// but the daemon only ever holds the rows not yet taken. Only for answers whose list field
/// comes first and whose other fields are known once the rows are ([`ListResponse`],
/// [`EventsResponse`]).
#[derive(Debug)]
pub struct RowStream {
    buf: String,
    rows: usize,
}

impl RowStream {
    /// Starts the answer: `{"ok":true,"<field>":[`.
    pub fn open(field: &str) -> RowStream {
        RowStream {
            buf: format!("{{\"ok\":true,\"{field}\":["),
            rows: 0,
        }
    }

    /// Adds one row.
    pub fn push<T: Serialize>(&mut self, row: &T) -> Result<(), serde_json::Error> {
        if self.rows > 0 {
            self.buf.push(',');
        }
        self.rows += 1;
        let json = serde_json::to_string(row)?;
        self.buf.push_str(&json);
        Ok(())
    }

    /// Bytes written so far and not yet taken.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the bytes written so far, to send them.
    pub fn take(&mut self) -> String {
        std::mem::take(&mut self.buf)
    }

    /// Ends the list and the answer; `fields` are the answer's other fields, in order
    /// (`[("more", false)]`). Returns the last bytes, newline included.
    pub fn close(mut self, fields: &[(&str, &Value)]) -> String {
        self.buf.push(']');
        for (name, value) in fields {
            self.buf.push_str(&format!(",\"{name}\":{value}"));
        }
        self.buf.push_str("}\n");
        self.buf
    }
}

/// Reads a successful answer's fields from its line (`ok` itself is not among them).
pub fn parse_answer<T: serde::de::DeserializeOwned>(line: &str) -> Result<T, serde_json::Error> {
    serde_json::from_str(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_answer_is_the_same_line_as_the_whole_answer() {
        let task = |id: &str| TaskView {
            task_id: id.into(),
            kind: Kind::Music,
            account: "default".into(),
            state: TaskState::Active,
            stage: None,
            last_status: Some("PENDING\n\u{1b}".into()),
            last_error: None,
            polls: 1,
            added_at: "2026-01-01T00:00:00Z".into(),
            updated_at: "2026-01-01T00:00:00Z".into(),
            next_poll_at: None,
            deadline_at: "2026-01-01T02:00:00Z".into(),
            finished_at: None,
            callback_url: None,
            label: None,
        };
        for n in [0, 1, 3] {
            let tasks: Vec<TaskView> = (0..n).map(|i| task(&format!("t{i}"))).collect();
            let mut stream = RowStream::open("tasks");
            let mut line = String::new();
            for t in &tasks {
                stream.push(t).expect("row");
                line.push_str(&stream.take());
            }
            line.push_str(&stream.close(&[]));
            let whole = answer_line(&ListResponse { tasks }).expect("line");
            assert_eq!(line, whole);
        }
        let events: Vec<EventView> = vec![];
        let stream = RowStream::open("events");
        let line = stream.close(&[("more", &Value::Bool(true))]);
        let whole = answer_line(&EventsResponse { events, more: true }).expect("line");
        assert_eq!(line, whole);
    }

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Add(AddRequest {
                task_ids: vec!["a".into(), "b".into()],
                callback_url: Some("http://127.0.0.1:1/x".into()),
                label: Some("l".into()),
                again: false,
                kind: Some("wav".into()),
                account: Some("second".into()),
            }),
            Request::Add(AddRequest {
                task_ids: vec!["a".into()],
                again: true,
                ..AddRequest::default()
            }),
            Request::List(ListRequest {
                state: Some("active".into()),
                limit: None,
            }),
            Request::Show(ShowRequest {
                task_id: "a".into(),
            }),
            Request::Remove(RemoveRequest {
                task_id: "a".into(),
            }),
            Request::Events(EventsRequest {
                since: Some(3),
                follow: true,
                task_id: None,
                limit: None,
            }),
            Request::Status(StatusRequest {}),
            Request::Redeliver(RedeliverRequest {
                task_id: Some("a".into()),
                target: Some("app".into()),
                ..RedeliverRequest::default()
            }),
            Request::ArchiveRedo(ArchiveRedoRequest {
                task_id: "t".into(),
            }),
        ];
        for r in reqs {
            let line = r.to_line();
            assert!(line.ends_with('\n'));
            assert_eq!(Request::parse(line.trim_end().as_bytes()), Ok(r));
        }
        assert_eq!(
            Request::Status(StatusRequest {}).to_line(),
            "{\"cmd\":\"status\"}\n"
        );
    }

    #[test]
    fn bad_lines_get_clear_errors() {
        let code = |line: &[u8]| Request::parse(line).expect_err("should fail").code;
        assert_eq!(code(b"\xff\xfe"), "invalid_json");
        assert_eq!(code(b"{not json"), "invalid_json");
        assert_eq!(code(b"[1]"), "bad_request");
        assert_eq!(code(b"{}"), "bad_request");
        assert_eq!(code(br#"{"cmd":7}"#), "bad_request");
        assert_eq!(code(br#"{"cmd":"fly"}"#), "unknown_command");
        assert_eq!(code(br#"{"cmd":"add"}"#), "bad_request");
        assert_eq!(code(br#"{"cmd":"add","task_id":"x"}"#), "bad_request");
        assert_eq!(code(br#"{"cmd":"status","verbose":true}"#), "bad_request");
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(code(deep.as_bytes()), "invalid_json");
    }

    #[test]
    fn task_ids_are_checked_and_each_bad_one_named() {
        assert!(check_task_id("a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10").is_ok());
        assert!(check_task_id("A-b_9").is_ok());
        assert!(check_task_id(&"x".repeat(128)).is_ok());
        assert!(check_task_id(&"x".repeat(129)).is_err());
        assert!(check_task_id("").is_err());
        assert!(check_task_id("a b").is_err());
        assert!(check_task_id("a\nINFO forged").is_err());
        assert!(check_task_id("é").is_err());
        let e = check_task_ids(&["ok1".into(), "bad one".into(), "".into(), "x/y".into()])
            .expect_err("bad");
        assert_eq!(e.code, "invalid_task_id");
        assert!(e.message.starts_with("3 bad task IDs"), "{}", e.message);
        for part in ["\"bad one\"", "\"\" is empty", "\"x/y\""] {
            assert!(e.message.contains(part), "{}", e.message);
        }
        assert!(!e.message.contains('\n'));
        assert!(check_task_ids(&[]).is_err());
    }

    #[test]
    fn labels_and_urls() {
        assert!(check_label("release 2 / take 3").is_ok());
        assert!(check_label("a\nb").is_err());
        assert!(check_label(&"x".repeat(300)).is_err());
        assert!(check_callback_url("http://127.0.0.1:3000/suno").is_ok());
        assert!(check_callback_url("ftp://x/y").is_err());
        assert!(check_callback_url("not a url").is_err());
        // The URL parser would drop these silently; the stored URL would still carry them.
        assert!(check_callback_url("http://127.0.0.1:3000/a\nFORGED").is_err());
        assert!(check_callback_url("http://127.0.0.1:3000/a\tb").is_err());
    }

    /// Serialises `answer` as the daemon does, compares it with the line today's daemon
    /// writes, and reads it back as the CLI does: the same line again.
    fn same_wire<T: Serialize + serde::de::DeserializeOwned>(answer: &T, today: &str) {
        let line = answer_line(answer).expect("serialises");
        assert_eq!(line.trim_end(), today);
        let back: T = parse_answer(&line).expect("reads back");
        assert_eq!(answer_line(&back).expect("serialises"), line);
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("json")
    }

    fn task_view() -> TaskView {
        TaskView {
            task_id: "t1".into(),
            kind: Kind::Music,
            account: "default".into(),
            state: TaskState::Active,
            stage: Some(Stage::Text),
            last_status: Some("TEXT_SUCCESS".into()),
            last_error: None,
            polls: 2,
            added_at: "2026-11-26T10:00:00Z".into(),
            updated_at: "2026-11-26T10:00:30Z".into(),
            next_poll_at: Some("2026-11-26T10:01:00Z".into()),
            deadline_at: "2026-11-26T10:30:00Z".into(),
            finished_at: None,
            callback_url: Some("http://127.0.0.1:3000/cb".into()),
            label: None,
        }
    }

    const TASK_JSON: &str = r#"{"task_id":"t1","kind":"music","account":"default","state":"active","stage":"text","last_status":"TEXT_SUCCESS","last_error":null,"polls":2,"added_at":"2026-11-26T10:00:00Z","updated_at":"2026-11-26T10:00:30Z","next_poll_at":"2026-11-26T10:01:00Z","deadline_at":"2026-11-26T10:30:00Z","finished_at":null,"callback_url":"http://127.0.0.1:3000/cb","label":null}"#;

    fn event_view() -> EventView {
        EventView {
            seq: 7,
            task_id: "t1".into(),
            kind: Kind::Music,
            stage: Stage::Text,
            code: 200,
            created_at: "2026-11-26T10:00:30Z".into(),
            body: raw(
                r#"{"code":200,"msg":"Text generation completed.","data":{"callbackType":"text","task_id":"t1","data":[]}}"#,
            ),
        }
    }

    const EVENT_JSON: &str = r#"{"seq":7,"task_id":"t1","kind":"music","stage":"text","code":200,"created_at":"2026-11-26T10:00:30Z","body":{"code":200,"msg":"Text generation completed.","data":{"callbackType":"text","task_id":"t1","data":[]}}}"#;

    #[test]
    fn add_list_remove_redeliver_answers_keep_their_wire_shape() {
        same_wire(
            &AddResponse {
                added: 1,
                existing: 1,
                tasks: vec![
                    AddedTask {
                        task_id: "a".into(),
                        result: AddResult::Added,
                        kind: crate::api::families::Kind::Music,
                        state: TaskState::Active,
                        stage: None,
                    },
                    AddedTask {
                        task_id: "b".into(),
                        result: AddResult::Exists,
                        kind: crate::api::families::Kind::Music,
                        state: TaskState::Done,
                        stage: Some(Stage::Complete),
                    },
                ],
            },
            r#"{"ok":true,"added":1,"existing":1,"tasks":[{"task_id":"a","result":"added","kind":"music","state":"active","stage":null},{"task_id":"b","result":"exists","kind":"music","state":"done","stage":"complete"}]}"#,
        );
        same_wire(
            &ListResponse {
                tasks: vec![task_view()],
            },
            &format!(r#"{{"ok":true,"tasks":[{TASK_JSON}]}}"#),
        );
        same_wire(
            &ListResponse { tasks: Vec::new() },
            r#"{"ok":true,"tasks":[]}"#,
        );
        same_wire(
            &RemoveResponse {
                task_id: "t1".into(),
                was: TaskState::Active,
                removed: true,
            },
            r#"{"ok":true,"task_id":"t1","was":"active","removed":true}"#,
        );
        same_wire(
            &RedeliverResponse { deliveries: 3 },
            r#"{"ok":true,"deliveries":3}"#,
        );
        same_wire(
            &CancelResponse { cancelled: 2 },
            r#"{"ok":true,"cancelled":2}"#,
        );
    }

    #[test]
    fn show_and_events_answers_keep_their_wire_shape() {
        let delivery = DeliveryView {
            target: "app".into(),
            url: "http://***@127.0.0.1:3000/cb".into(),
            webhook_id: "msg_t1_text_0a1b2c3d".into(),
            state: "delivered".into(),
            attempts: 2,
            next_attempt_at: None,
            last_attempt_at: Some("2026-11-26T10:00:31Z".into()),
            last_status: Some(204),
            last_error: None,
            delivered_at: Some("2026-11-26T10:00:31Z".into()),
            attempt_log: vec![
                AttemptView {
                    attempt: 1,
                    at: "2026-11-26T10:00:30Z".into(),
                    duration_ms: 12,
                    status: Some(503),
                    error: Some("HTTP 503".into()),
                    outcome: "retry".into(),
                },
                AttemptView {
                    attempt: 2,
                    at: "2026-11-26T10:00:31Z".into(),
                    duration_ms: 3,
                    status: Some(204),
                    error: None,
                    outcome: "delivered".into(),
                },
            ],
        };
        const DELIVERY_JSON: &str = r#"{"target":"app","url":"http://***@127.0.0.1:3000/cb","webhook_id":"msg_t1_text_0a1b2c3d","state":"delivered","attempts":2,"next_attempt_at":null,"last_attempt_at":"2026-11-26T10:00:31Z","last_status":204,"last_error":null,"delivered_at":"2026-11-26T10:00:31Z","attempt_log":[{"attempt":1,"at":"2026-11-26T10:00:30Z","duration_ms":12,"status":503,"error":"HTTP 503","outcome":"retry"},{"attempt":2,"at":"2026-11-26T10:00:31Z","duration_ms":3,"status":204,"error":null,"outcome":"delivered"}]}"#;
        // Today's `show` appends `deliveries` after the event's own fields.
        let shown_event = format!(
            r#"{},"deliveries":[{DELIVERY_JSON}]}}"#,
            EVENT_JSON.strip_suffix('}').expect("an object")
        );
        same_wire(
            &ShowResponse {
                task: task_view(),
                events: vec![ShownEvent::new(event_view(), vec![delivery])],
                files: Vec::new(),
            },
            &format!(r#"{{"ok":true,"task":{TASK_JSON},"events":[{shown_event}]}}"#),
        );
        same_wire(
            &EventsResponse {
                events: vec![event_view()],
                more: true,
            },
            &format!(r#"{{"ok":true,"events":[{EVENT_JSON}],"more":true}}"#),
        );
        same_wire(
            &EventLine {
                event: event_view(),
            },
            &format!(r#"{{"ok":true,"event":{EVENT_JSON}}}"#),
        );
    }

    #[test]
    fn the_status_answer_keeps_its_wire_shape() {
        let poll = PollStatus {
            account: "default".into(),
            flavor: "sunoapi".into(),
            rate_limit: Some(2.0),
            learnt_rate: Some(0.45),
            state: "paused".into(),
            pause_kind: Some(crate::jobs::gate::PauseKind::Throttled),
            pause_attempt: 2,
            paused_until: Some("2026-11-26T10:05:00Z".into()),
            paused_since: Some("2026-11-26T10:00:00Z".into()),
            paused_for_ms: 1500,
            pause_cause: Some("HTTP 429".into()),
            in_flight: 0,
            requests: 41,
            last_answer_at: Some("2026-11-26T10:00:00Z".into()),
            last_answer: Some("throttled".into()),
        };
        let status = |tasks: Option<Counts>, config: Option<PathBuf>| StatusResponse {
            version: "0.1.0".into(),
            healthy: false,
            problems: vec!["the store is not answering: x".into()],
            started_at: "2026-11-26T09:00:00Z".into(),
            uptime_ms: 3_600_000,
            config,
            store: "/var/lib/sunopoll/queue.db".into(),
            socket: "/run/sunopoll/sunopoll.sock".into(),
            tasks,
            poll: poll.clone(),
            accounts: vec![poll.clone()],
            breakdown: vec![crate::store::TaskCount {
                kind: Kind::Wav,
                account: "default".into(),
                state: TaskState::Active,
                n: 1,
            }],
            targets: vec![TargetStatus {
                target: "app".into(),
                pending: 1,
                failed: 0,
                delivered: 5,
                last_success_at: Some("2026-11-26T09:59:00Z".into()),
                last_error: Some("HTTP 500".into()),
                last_error_at: Some("2026-11-26T09:58:00Z".into()),
            }],
            archive: None,
            shared: None,
        };
        const POLL: &str = r#"{"account":"default","flavor":"sunoapi","rate_limit":2.0,"learnt_rate":0.45,"state":"paused","pause_kind":"throttled","pause_attempt":2,"paused_until":"2026-11-26T10:05:00Z","paused_since":"2026-11-26T10:00:00Z","paused_for_ms":1500,"pause_cause":"HTTP 429","in_flight":0,"requests":41,"last_answer_at":"2026-11-26T10:00:00Z","last_answer":"throttled"}"#;
        const TARGETS: &str = r#"[{"target":"app","pending":1,"failed":0,"delivered":5,"last_success_at":"2026-11-26T09:59:00Z","last_error":"HTTP 500","last_error_at":"2026-11-26T09:58:00Z"}]"#;
        const HEAD: &str = r#"{"ok":true,"version":"0.1.0","healthy":false,"problems":["the store is not answering: x"],"started_at":"2026-11-26T09:00:00Z","uptime_ms":3600000"#;
        same_wire(
            &status(None, None),
            &format!(
                r#"{HEAD},"config":null,"store":"/var/lib/sunopoll/queue.db","socket":"/run/sunopoll/sunopoll.sock","tasks":null,"poll":{POLL},"accounts":[{POLL}],"breakdown":[{{"kind":"wav","account":"default","state":"active","n":1}}],"targets":{TARGETS}}}"#
            ),
        );
        let counts = Counts {
            active: 1,
            done: 2,
            failed: 3,
            removed: 4,
            events: 9,
            last_seq: 11,
        };
        same_wire(
            &status(Some(counts), Some("/etc/sunopoll.toml".into())),
            &format!(
                r#"{HEAD},"config":"/etc/sunopoll.toml","store":"/var/lib/sunopoll/queue.db","socket":"/run/sunopoll/sunopoll.sock","tasks":{{"active":1,"done":2,"failed":3,"removed":4,"events":9,"last_seq":11}},"poll":{POLL},"accounts":[{POLL}],"breakdown":[{{"kind":"wav","account":"default","state":"active","n":1}}],"targets":{TARGETS}}}"#
            ),
        );
    }

    #[test]
    fn records_are_presented_with_utc_times_and_redacted_urls() {
        let view = DeliveryView::from_record(DeliveryRecord {
            target: "app".into(),
            url: "https://user:pa55@hooks.internal/cb".into(),
            webhook_id: "w".into(),
            state: "pending".into(),
            attempts: 0,
            next_attempt_at: 0,
            last_attempt_at: None,
            last_status: None,
            last_error: None,
            delivered_at: None,
            attempt_log: Vec::new(),
        });
        assert_eq!(view.url, "https://***@hooks.internal/cb");
        assert_eq!(
            view.next_attempt_at.as_deref(),
            Some("1970-01-01T00:00:00Z")
        );
        let record = TaskRecord {
            task_id: "t".into(),
            kind: crate::api::families::Kind::Wav,
            account: "default".into(),
            state: TaskState::Done,
            stage: Some(Stage::Complete),
            last_status: None,
            last_error: None,
            polls: 1,
            added_at: 1_764_151_200_000,
            updated_at: 1_764_151_200_000,
            next_poll_at: 1_764_151_200_000,
            deadline_at: 1_764_151_200_000,
            finished_at: Some(1_764_151_200_000),
            callback_url: None,
            label: None,
        };
        let view = TaskView::from_record(record);
        assert_eq!(
            view.next_poll_at, None,
            "only active tasks show a next poll"
        );
        assert_eq!(view.finished_at.as_deref(), Some("2025-11-26T10:00:00Z"));
        let bad = EventView::from_record(EventRecord {
            seq: 3,
            task_id: "t".into(),
            kind: crate::api::families::Kind::Music,
            stage: Stage::Text,
            code: 200,
            created_at: 0,
            body: "{not json".into(),
        });
        assert!(bad.expect_err("not json").starts_with("event 3 body:"));
    }
}
