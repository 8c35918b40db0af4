//! What a metrics scrape reads of the poll queue: a handful of index look-ups whose cost does not
//! grow with the number of tasks or deliveries stored.

/// The queue's gauges at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueGauges {
    /// Active tasks whose next poll time has passed, counted up to [`DUE_COUNT_CAP`].
    pub polls_due: u64,
    /// The earliest next poll time of any active task (Unix ms), if there is one.
    pub earliest_due_at: Option<i64>,
}

/// `polls_due` counts at most this many: past it the figure says "at least", and counting
/// further would make a scrape cost grow with the backlog.
pub const DUE_COUNT_CAP: u64 = 10_000;
