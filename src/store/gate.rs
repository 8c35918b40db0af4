//! The persisted global pause: one row, so a restart resumes a pause instead of hammering an
//! API that asked us to wait.

/// Why polling is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseKind {
    /// The API asked us to slow down.
    Throttled,
    /// The API is down or failing.
    Unavailable,
    /// The API key was rejected.
    Unauthorized,
}

impl PauseKind {
    /// The spelling stored in the `gate` table and shown in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseKind::Throttled => "throttled",
            PauseKind::Unavailable => "unavailable",
            PauseKind::Unauthorized => "unauthorized",
        }
    }

    /// The kind stored as `s`, or `None` for a spelling this build does not know.
    pub fn parse(s: &str) -> Option<PauseKind> {
        [
            PauseKind::Throttled,
            PauseKind::Unavailable,
            PauseKind::Unauthorized,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// What the store keeps per account: its pause and the request rate it has learnt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccountRow {
    /// The pause, if the account is paused.
    pub gate: Option<GateRow>,
    /// The rate (requests per second) learnt from the API's throttling, if any.
    pub learnt_rate: Option<f64>,
}

/// An account's persisted pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRow {
    /// Why polling is paused.
    pub kind: PauseKind,
    /// Consecutive pauses.
    pub attempt: u32,
    /// Polling may resume (with one probe) at this time (Unix ms).
    pub paused_until: i64,
    /// When the first of these pauses began.
    pub since: i64,
    /// What the API said.
    pub cause: String,
}
