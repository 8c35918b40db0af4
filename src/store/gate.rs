//! The persisted global pause: one row, so a restart resumes a pause instead of hammering an
//! API that asked us to wait.

/// The persisted global pause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRow {
    /// `throttled`, `unavailable` or `unauthorized`.
    pub kind: String,
    /// Consecutive pauses.
    pub attempt: u32,
    /// Polling may resume (with one probe) at this time (Unix ms).
    pub paused_until: i64,
    /// When the first of these pauses began.
    pub since: i64,
    /// What the API said.
    pub cause: String,
}
