//! The global gate in front of every poll: one pause for everyone when the API throttles, fails
//! or rejects the key, with its persisted form, its delay ([`pause_delay`]), and what `status`
//! and systemd's `STATUS=` line show about it. Pure: the poll job owns the gate and moves it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::backoff::backoff_delay;
use crate::clock::format_utc;
use crate::config::PollConfig;
use crate::store::GateRow;
pub use crate::store::PauseKind;

/// The global pause after the `attempt`-th throttled or unavailable answer in a row, honouring
/// the server's `Retry-After` when it asks for longer.
pub fn pause_delay(
    attempt: u32,
    policy: &PollConfig,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let d = backoff_delay(attempt, policy.interval, policy.backoff_max, jitter);
    retry_after.map_or(d, |ra| d.max(ra))
}

/// The global gate in front of every request.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// Polling normally.
    Open,
    /// Paused until `until`; then one probe.
    Paused {
        /// Why.
        kind: PauseKind,
        /// Consecutive pauses.
        attempt: u32,
        /// Unix ms when the probe may go.
        until: i64,
        /// Unix ms when this run of pauses began.
        since: i64,
        /// What the API said.
        cause: String,
    },
}

impl Gate {
    /// The gate as saved before a restart (no row: open).
    pub fn from_row(row: Option<GateRow>) -> Gate {
        match row {
            None => Gate::Open,
            Some(r) => {
                let kind = r.kind;
                Gate::Paused {
                    kind,
                    attempt: r.attempt.max(1),
                    // A rejected key is usually fixed by changing it and restarting: try the
                    // (possibly new) key at once, with one probe, instead of waiting out the
                    // old pause. Throttling and outages are the API's, and keep their pause.
                    until: if kind == PauseKind::Unauthorized {
                        0
                    } else {
                        r.paused_until
                    },
                    since: r.since,
                    cause: r.cause,
                }
            }
        }
    }

    /// The row that saves this gate (open: none).
    pub fn to_row(&self) -> Option<GateRow> {
        match self {
            Gate::Open => None,
            Gate::Paused {
                kind,
                attempt,
                until,
                since,
                cause,
            } => Some(GateRow {
                kind: *kind,
                attempt: *attempt,
                paused_until: *until,
                since: *since,
                cause: cause.clone(),
            }),
        }
    }
}

/// What `status` shows about polling. Updated by the loop, read by the control server.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PollStatus {
    /// The account polled.
    #[serde(default)]
    pub account: String,
    /// Its provider flavour (`sunoapi`, `kie`).
    #[serde(default)]
    pub flavor: String,
    /// Its configured ceiling, requests per second (`None`: unlimited).
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// The rate learnt from throttling, if below the ceiling (requests per second).
    #[serde(default)]
    pub learnt_rate: Option<f64>,
    /// `polling`, `paused` or `probing`.
    pub state: String,
    /// Why polling is paused, if it is.
    pub pause_kind: Option<PauseKind>,
    /// Consecutive pauses.
    pub pause_attempt: u32,
    /// When the pause ends (RFC 3339), if paused.
    pub paused_until: Option<String>,
    /// When the current run of pauses began (RFC 3339).
    pub paused_since: Option<String>,
    /// Milliseconds the API has been paused for, continuously.
    pub paused_for_ms: i64,
    /// What the API said to cause the pause.
    pub pause_cause: Option<String>,
    /// Requests in flight now.
    pub in_flight: usize,
    /// Requests made since start.
    pub requests: u64,
    /// When the API last answered (RFC 3339).
    pub last_answer_at: Option<String>,
    /// What that answer was (`pending`, `progress`, `throttled`, …).
    pub last_answer: Option<String>,
}

/// Shared, cheaply readable poll status.
pub type SharedStatus = Arc<Mutex<PollStatus>>;

/// The one-line summary systemd shows in `systemctl status`: how many tasks are being polled,
/// and whether polling is paused and until when. Pure: `active` is the last count (`None` before
/// the first), `now` the current Unix ms. The time of the next try is absolute, so the line stays
/// true between updates.
pub fn status_line(active: Option<i64>, gate: &Gate, now: i64) -> String {
    let tasks = match active {
        None => "starting".to_owned(),
        Some(1) => "1 task active".to_owned(),
        Some(n) => format!("{n} tasks active"),
    };
    match gate {
        Gate::Open => format!("{tasks}, polling"),
        Gate::Paused { kind, until, .. } => {
            let why = match kind {
                PauseKind::Throttled => "the API is throttling",
                PauseKind::Unavailable => "the API is unavailable",
                PauseKind::Unauthorized => "the API key was rejected",
            };
            if now < *until {
                format!("{tasks}; paused: {why}, next try at {}", format_utc(*until))
            } else {
                format!("{tasks}; probing the API after a pause ({why})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PollConfig {
        PollConfig {
            interval: Duration::from_secs(30),
            max_in_flight: 4,
            max_requests_per_second: Some(2.0),
            backoff_max: Duration::from_secs(600),
            task_deadline: Duration::from_secs(7200),
            fill_skipped_stages: true,
        }
    }

    #[test]
    fn retry_after_lengthens_a_pause_but_never_shortens_it() {
        let p = policy();
        assert_eq!(
            pause_delay(1, &p, Some(Duration::from_secs(90)), 0.5),
            Duration::from_secs(90)
        );
        assert_eq!(
            pause_delay(1, &p, Some(Duration::from_secs(1)), 0.5),
            Duration::from_secs(30)
        );
        assert_eq!(
            pause_delay(9, &p, Some(Duration::from_secs(3600)), 0.5),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn the_status_line_says_how_many_tasks_and_whether_polling_is_paused() {
        assert_eq!(status_line(None, &Gate::Open, 0), "starting, polling");
        assert_eq!(
            status_line(Some(1), &Gate::Open, 0),
            "1 task active, polling"
        );
        assert_eq!(
            status_line(Some(12), &Gate::Open, 0),
            "12 tasks active, polling"
        );
        let paused = |kind| Gate::Paused {
            kind,
            attempt: 2,
            until: 1_800_000_060_000,
            since: 1_800_000_000_000,
            cause: "HTTP 430".into(),
        };
        assert_eq!(
            status_line(Some(3), &paused(PauseKind::Throttled), 1_800_000_000_000),
            "3 tasks active; paused: the API is throttling, next try at 2027-01-15T08:01:00Z"
        );
        assert_eq!(
            status_line(Some(3), &paused(PauseKind::Unauthorized), 1_800_000_000_000),
            "3 tasks active; paused: the API key was rejected, next try at 2027-01-15T08:01:00Z"
        );
        assert_eq!(
            status_line(Some(0), &paused(PauseKind::Unavailable), 1_800_000_060_000),
            "0 tasks active; probing the API after a pause (the API is unavailable)"
        );
    }

    #[test]
    fn gate_rows_round_trip() {
        let g = Gate::Paused {
            kind: PauseKind::Unauthorized,
            attempt: 2,
            until: 10,
            since: 5,
            cause: "HTTP 401".into(),
        };
        let restored = Gate::from_row(g.to_row());
        assert!(
            matches!(
                restored,
                Gate::Paused {
                    until: 0,
                    attempt: 2,
                    ..
                }
            ),
            "a saved key rejection probes at once: {restored:?}"
        );
        let t = Gate::Paused {
            kind: PauseKind::Throttled,
            attempt: 2,
            until: 10,
            since: 5,
            cause: "HTTP 430".into(),
        };
        assert_eq!(Gate::from_row(t.to_row()), t);
        assert_eq!(Gate::from_row(None), Gate::Open);
    }
}
