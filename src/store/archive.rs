//! The archive's records: one row per file a finished task leaves behind (written with the
//! task's terminal event, in the same transaction), what the archive job is due to fetch, and
//! what it reports after each try.

use serde::{Deserialize, Serialize};

use super::Route;
use crate::store::Kind;

/// Where one kept file stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// Still to fetch (or to fetch again).
    Pending,
    /// Kept, with its size and SHA-256.
    Done,
    /// Given up for a reason that waiting does not fix (refused host, too big, out of tries).
    Failed,
    /// The API deleted it before it could be fetched.
    Expired,
}

impl FileState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FileState::Pending => "pending",
            FileState::Done => "done",
            FileState::Failed => "failed",
            FileState::Expired => "expired",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<FileState> {
        [
            FileState::Pending,
            FileState::Done,
            FileState::Failed,
            FileState::Expired,
        ]
        .into_iter()
        .find(|f| f.as_str() == s)
    }
}

/// Where a kept file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssetSource {
    /// Downloaded from this URL.
    Url(String),
    /// Written from this text (a result with no file of its own).
    Inline(String),
}

/// One file to keep for a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetFile {
    /// The local file name inside the task's directory: no `/`, no `..`, unique per task.
    pub name: String,
    /// What the file is: `audio`, `source_audio`, `image`, `source_image`, `wav`, `stem`,
    /// `video`, `cover` or `result`.
    pub kind: String,
    /// The track (audio) id it belongs to, when the body names one.
    pub audio_id: Option<String>,
    /// Where its bytes come from.
    pub source: AssetSource,
}

impl AssetFile {
    /// The URL to download, if the file is downloaded.
    pub fn url(&self) -> Option<&str> {
        match &self.source {
            AssetSource::Url(u) => Some(u),
            AssetSource::Inline(_) => None,
        }
    }
}

/// A file the archive job is due to fetch (or write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueFile {
    /// Row id: the job key.
    pub id: i64,
    /// The task it belongs to.
    pub task_id: String,
    /// Local name inside the task's directory.
    pub name: String,
    /// What the file is (`audio`, `image`, …).
    pub kind: String,
    /// The track it belongs to, if any.
    pub audio_id: Option<String>,
    /// Where to download it from; `None` for a file written from `inline`.
    pub url: Option<String>,
    /// The content of a file that is written, not downloaded.
    pub inline: Option<String>,
    /// Tries so far.
    pub attempts: u32,
    /// When it is due (Unix ms).
    pub next_try_at: i64,
    /// When the task ended (Unix ms): the API's deletion clock starts there.
    pub created_at: i64,
    /// The `ETag` (or `Last-Modified`) of the first answer, for `If-Range` on a resume.
    pub validator: Option<String>,
}

/// What one try at a file leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileNext {
    /// Kept.
    Done {
        /// Bytes.
        size: u64,
        /// Lowercase hex SHA-256.
        sha256: String,
    },
    /// Try again at this time (Unix ms), after this problem.
    Retry {
        /// When.
        at: i64,
        /// Why the try failed.
        error: String,
    },
    /// Given up for good.
    Failed {
        /// Why.
        error: String,
    },
    /// The API no longer has it.
    Expired {
        /// What the server answered.
        error: String,
    },
}

/// One file as `show` reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Local name inside the task's directory.
    pub name: String,
    /// What the file is.
    pub kind: String,
    /// The track it belongs to, if any.
    pub audio_id: Option<String>,
    /// Where it came from (`None`: written from the result itself).
    pub url: Option<String>,
    /// Where it stands.
    pub state: FileState,
    /// Bytes, once kept.
    pub size: Option<u64>,
    /// Lowercase hex SHA-256, once kept.
    pub sha256: Option<String>,
    /// Tries so far.
    pub attempts: u32,
    /// The last problem, if the last try had one.
    pub last_error: Option<String>,
    /// When the task ended (Unix ms).
    pub created_at: i64,
    /// When it was kept (Unix ms).
    pub done_at: Option<i64>,
}

/// Files per state and the bytes kept, for `status` and metrics. Kept, not counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveCounts {
    /// Still to fetch.
    pub pending: i64,
    /// Kept.
    pub done: i64,
    /// Given up.
    pub failed: i64,
    /// Deleted by the API first.
    pub expired: i64,
    /// Bytes of the kept files.
    pub bytes: i64,
}

/// What the `archived` notification of a task is, decided from its kind and its files (all
/// kept): its body and the targets that take it. The store knows neither where files are kept
/// nor the body's shape, so the archive job says; it is asked only inside the transaction that
/// records the task's last kept file.
pub type ArchivedNotice = Box<dyn FnOnce(Kind, &[FileRecord]) -> Notice + Send>;

/// One `archived` notification, ready to be stored as an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The exact body, sunopoll's own shape (never a callback's).
    pub body: String,
    /// Where it goes: targets whose `stages` include `archived` and whose `kinds` take the
    /// task's. None: nothing is stored.
    pub routes: Vec<Route>,
}

/// An `archived` notification the store just stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// Its event's sequence number.
    pub seq: i64,
    /// Its task.
    pub task_id: String,
    /// The targets it is delivered to.
    pub targets: Vec<String>,
}
