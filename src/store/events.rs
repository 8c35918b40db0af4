//! The event record: one emitted stage of one task, with its exact callback body.

use crate::events::Stage;

/// One stored event, as every backend returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Sequence number: increasing, never reused.
    pub seq: i64,
    /// The task.
    pub task_id: String,
    /// The task's family.
    pub kind: crate::store::Kind,
    /// The stage.
    pub stage: Stage,
    /// The callback `code`.
    pub code: i64,
    /// When it was stored (Unix ms).
    pub created_at: i64,
    /// The exact callback body, as stored (JSON text).
    pub body: String,
}
