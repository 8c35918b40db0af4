//! The task records every backend stores and returns: what a task is (`TaskRow`), how a poll
//! changes it (`TaskUpdate`), and what `add`, `list`, `show`, counts and pruning report.
//!
//! Times here are raw Unix milliseconds and URLs are as stored: turning them into text for
//! people is the control side's job.

use serde::{Deserialize, Serialize};

use super::archive::AssetFile;
use super::deliveries::Route;
use crate::events::{NewEvent, Stage};

/// The account a task is on when none is named: the one account a lone `[api]` table
/// describes, and the account every row from before accounts existed was given (the schemas'
/// `DEFAULT 'default'`).
pub const DEFAULT_ACCOUNT: &str = "default";

/// A task's family as the store records it and `add --kind` names it. Which adapter a task is
/// polled through follows from its kind and its account's flavour (`with_family!` in
/// [`crate::api::families`]).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Every music-shaped task (generate, extend, covers, add-vocals, …): `text`, `first`,
    /// `complete` or `error`.
    #[default]
    Music,
    /// Lyrics generation.
    Lyrics,
    /// WAV conversion.
    Wav,
    /// Vocal removal and stem separation.
    Stems,
    /// MIDI generation.
    Midi,
    /// Music videos.
    Mp4,
    /// Cover images.
    Cover,
}

impl Kind {
    /// Every kind, in the order the README lists them.
    pub const ALL: [Kind; 7] = [
        Kind::Music,
        Kind::Lyrics,
        Kind::Wav,
        Kind::Stems,
        Kind::Midi,
        Kind::Mp4,
        Kind::Cover,
    ];

    /// The kind's name, as stored, shown and given to `add --kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Music => "music",
            Kind::Lyrics => "lyrics",
            Kind::Wav => "wav",
            Kind::Stems => "stems",
            Kind::Midi => "midi",
            Kind::Mp4 => "mp4",
            Kind::Cover => "cover",
        }
    }

    /// Reads a kind's name.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The names of every kind, for error messages.
    pub fn names() -> String {
        Kind::ALL.map(Kind::as_str).join(", ")
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Being polled.
    Active,
    /// Reached `complete`.
    Done,
    /// Ended with `error`.
    Failed,
    /// Removed by `sunopoll remove`; its events are kept.
    Removed,
}

impl TaskState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Active => "active",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Removed => "removed",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<TaskState> {
        [
            TaskState::Active,
            TaskState::Done,
            TaskState::Failed,
            TaskState::Removed,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }
}

/// What `add` did with one ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddResult {
    /// New: it will be polled now.
    Added,
    /// It was removed earlier (or, with `add --again`, had failed) and is tracked again.
    Readded,
    /// Already known; nothing changed.
    Exists,
    /// Already tracked under another kind: one task is one (kind, ID), so the whole `add` was
    /// refused and nothing changed. `kind` says the kind it has.
    OtherKind,
}

/// What `add` records with each new ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// The task's family.
    pub kind: Kind,
    /// The account it is polled on.
    pub account: String,
    /// Per-task callback URL (`add --callback-url`).
    pub callback_url: Option<String>,
    /// Free-text label.
    pub label: Option<String>,
}

impl TaskSpec {
    /// A music task on the default account (what a lone `[api]` section polls).
    pub fn music(callback_url: Option<String>, label: Option<String>) -> TaskSpec {
        TaskSpec {
            kind: Kind::Music,
            account: DEFAULT_ACCOUNT.to_owned(),
            callback_url,
            label,
        }
    }
}

/// One ID as `add` left it. It carries no times or URLs, so the protocol answers with it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddedTask {
    /// The ID.
    pub task_id: String,
    /// What `add` did with it.
    pub result: AddResult,
    /// Its kind as stored (for [`AddResult::OtherKind`], the kind that refused the add).
    #[serde(default)]
    pub kind: Kind,
    /// Its state now.
    pub state: TaskState,
    /// Its last stage, if any.
    pub stage: Option<Stage>,
}

/// A task as the scheduler needs it to decide what a poll means.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    /// The task ID.
    pub id: String,
    /// Its family.
    pub kind: Kind,
    /// The account it is polled on.
    pub account: String,
    /// Lifecycle state.
    pub state: TaskState,
    /// Last stage emitted.
    pub stage: Option<Stage>,
    /// Last status seen.
    pub last_status: Option<String>,
    /// Consecutive broken answers.
    pub failures: u32,
    /// Consecutive rejections.
    pub rejections: u32,
    /// When it was added (Unix ms).
    pub added_at: i64,
    /// When it gives up (Unix ms).
    pub deadline_at: i64,
    /// Per-task callback URL (`add --callback-url`).
    pub callback_url: Option<String>,
    /// The `callBackUrl` the task was submitted with, as last seen in record-info.
    pub submitted_callback_url: Option<String>,
    /// How much of its deadline the task has used.
    pub asked: Asked,
}

/// The part of a task's deadline it has used: only time in which it was being asked about
/// counts (never time in the backlog, paused, throttled or unreachable), so the deadline
/// survives restarts, outages and wall-clock steps. Advanced by each answer about the task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Asked {
    /// Milliseconds counted so far.
    pub total_ms: i64,
    /// When the API last answered about this task (Unix ms; `None`: never).
    pub at: Option<i64>,
    /// The wait planned after that answer (ms): the most the next answer may add.
    pub gap_ms: i64,
}

/// The new state of a task after a poll, decided by the scheduler from a [`TaskRow`].
#[derive(Debug, Clone, PartialEq)]
pub struct TaskUpdate {
    /// New lifecycle state.
    pub state: TaskState,
    /// Status to record as last seen (`None` keeps the old one).
    pub last_status: Option<String>,
    /// Problem to record (`None` clears it).
    pub last_error: Option<String>,
    /// Consecutive broken answers.
    pub failures: u32,
    /// Consecutive rejections.
    pub rejections: u32,
    /// Next poll (ignored unless active).
    pub next_poll_at: i64,
    /// Events to store, in order.
    pub events: Vec<NewEvent>,
    /// Where the new events are delivered (each route takes the stages it wants).
    pub routes: Vec<Route>,
    /// The submitted `callBackUrl` to remember (`None` keeps the old one).
    pub submitted_callback_url: Option<String>,
    /// Milliseconds from storing an event to its first delivery attempt (the retry schedule's
    /// first entry).
    pub first_delivery_delay: i64,
    /// True when the task ends because it passed its deadline (for the log).
    pub timed_out: bool,
    /// The deadline time used, to store.
    pub asked: Asked,
    /// Files the task leaves behind, to archive: written with its terminal event (empty
    /// unless archiving is on and the task completed).
    pub archive: Vec<AssetFile>,
}

/// What a committed poll stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// The update that was written.
    pub update: TaskUpdate,
    /// The task as it was before.
    pub before: TaskRow,
    /// Sequence numbers of the stored events, in the order of `update.events`.
    pub seqs: Vec<i64>,
}

/// A schedule kept in the store as wall-clock due times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    /// One account's active tasks' `next_poll_at` (each account's loop moves its own).
    Polls(String),
    /// Pending deliveries' `next_attempt_at`.
    Deliveries,
}

/// The earliest active tasks by `next_poll_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRow {
    /// The task ID.
    pub id: String,
    /// Its family: which adapter polls it.
    pub kind: Kind,
    /// When it is due (Unix ms).
    pub next_poll_at: i64,
}

/// A task as `list` and `show` read it: every column people see, times as Unix ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// The API's task ID.
    pub task_id: String,
    /// Its family.
    pub kind: Kind,
    /// The account it is polled on.
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
    pub added_at: i64,
    /// When its row last changed.
    pub updated_at: i64,
    /// When it is due (meaningful for active tasks only).
    pub next_poll_at: i64,
    /// When it will be given up with a 408 `error`.
    pub deadline_at: i64,
    /// When it ended (done, failed or removed).
    pub finished_at: Option<i64>,
    /// Per-task callback URL.
    pub callback_url: Option<String>,
    /// Free-text label.
    pub label: Option<String>,
}

/// Task counts by state, for `status` and start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Being polled.
    pub active: i64,
    /// Completed.
    pub done: i64,
    /// Failed.
    pub failed: i64,
    /// Removed.
    pub removed: i64,
    /// Events stored.
    pub events: i64,
    /// Highest event sequence number ever assigned.
    pub last_seq: i64,
}

/// How many tasks of one kind on one account are in one state (a kept count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCount {
    /// The family.
    pub kind: Kind,
    /// The account.
    pub account: String,
    /// The state.
    pub state: TaskState,
    /// How many.
    pub n: i64,
}

/// What housekeeping removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Tasks deleted.
    pub tasks: usize,
    /// Events deleted with them.
    pub events: usize,
}
