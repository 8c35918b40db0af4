//! The outbox records: one delivery per event and target, its attempts, and how a delivery is
//! identified (`webhook_id`, `origin_of`), which the store decides when it writes the row.

use sha2::{Digest, Sha256};

use crate::events::Stage;

/// Target name of the per-task URL given with `add --callback-url`.
pub const TARGET_TASK_URL: &str = "callback-url";
/// Target name of the `callBackUrl` a task was submitted with (`use-task-callback-url`).
pub const TARGET_SUBMITTED_URL: &str = "submitted-callback-url";

/// A place events are delivered to, decided when the events are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Target name: a `[[forward.target]]` name, `callback-url` or `submitted-callback-url`.
    pub target: String,
    /// Where to POST.
    pub url: String,
    /// Which stages go there.
    pub stages: Vec<Stage>,
}

/// A configured target as a shared queue learns it: the route plus the task families it takes.
/// Each daemon registers the targets its configuration names, so that events another daemon
/// stores are routed to them too (a target is shared by name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// Its name, URL and stages.
    pub route: Route,
    /// The task families whose events go there (`None`: all).
    pub kinds: Option<Vec<super::Kind>>,
}

/// A delivery ready to be attempted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    /// Row id.
    pub id: i64,
    /// The event.
    pub event_seq: i64,
    /// Its task.
    pub task_id: String,
    /// Its stage.
    pub stage: Stage,
    /// Target name.
    pub target: String,
    /// URL stored with the delivery (per-task targets use it; configured targets use the
    /// configured URL).
    pub url: String,
    /// `scheme://host:port`, for per-destination concurrency limits.
    pub origin: String,
    /// The Standard Webhooks `webhook-id`, the same on every attempt.
    pub webhook_id: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Replays requested so far; an attempt records its result only if this has not changed.
    pub replays: i64,
    /// When it is due (Unix ms).
    pub next_attempt_at: i64,
    /// The exact callback body.
    pub body: String,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryNext {
    /// Delivered (2xx).
    Delivered,
    /// Failed; try again at this time (Unix ms).
    Retry(i64),
    /// Given up (schedule exhausted, or 410 Gone).
    Failed,
}

/// One attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    /// When it started (Unix ms).
    pub started_at: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// HTTP status, if an answer came.
    pub status: Option<u16>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// Which deliveries `redeliver` replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// Every delivery of one event.
    Event(i64),
    /// Every delivery of one task's events.
    Task(String),
    /// Deliveries given up at or after this time (Unix ms).
    FailedSince(i64),
    /// Deliveries delivered at or after this time (Unix ms).
    SentSince(i64),
}

/// One delivery of an event to one target, as stored (raw URL, times as Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// Target name.
    pub target: String,
    /// Where it goes, as stored (credentials included: redact before showing it).
    pub url: String,
    /// The `webhook-id` header, the same on every attempt and replay.
    pub webhook_id: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next attempt is due (meaningful while pending).
    pub next_attempt_at: i64,
    /// Last attempt.
    pub last_attempt_at: Option<i64>,
    /// HTTP status of the last attempt, if it got one.
    pub last_status: Option<u16>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it was delivered.
    pub delivered_at: Option<i64>,
    /// Every attempt, oldest first.
    pub attempt_log: Vec<AttemptLog>,
}

/// One attempt in a delivery's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptLog {
    /// 1 for the first.
    pub attempt: u32,
    /// When it started (Unix ms).
    pub started_at: i64,
    /// How long it took.
    pub duration_ms: i64,
    /// HTTP status, if an answer came.
    pub status: Option<u16>,
    /// What went wrong.
    pub error: Option<String>,
    /// `delivered`, `retry`, `failed` or `superseded`.
    pub outcome: String,
}

/// Delivery counts and last results of one target, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSummary {
    /// Target name.
    pub target: String,
    /// Deliveries waiting.
    pub pending: i64,
    /// Deliveries given up.
    pub failed: i64,
    /// Deliveries made.
    pub delivered: i64,
    /// Last success (Unix ms).
    pub last_success_at: Option<i64>,
    /// Last failure's cause.
    pub last_error: Option<String>,
    /// When it happened (Unix ms).
    pub last_error_at: Option<i64>,
    /// When the oldest delivery still waiting was created (its event stored), if any waits.
    pub oldest_pending_at: Option<i64>,
}

impl TargetSummary {
    /// One summary per target from the kept `(target, state, n)` counts, in the order given
    /// (sorted by target), with only the counts filled in: each backend looks up the rest.
    pub fn from_counts(counts: impl IntoIterator<Item = (String, String, i64)>) -> Vec<Self> {
        let mut out: Vec<TargetSummary> = Vec::new();
        for (target, state, n) in counts {
            if out.last().is_none_or(|t| t.target != target) {
                out.push(TargetSummary {
                    target,
                    pending: 0,
                    failed: 0,
                    delivered: 0,
                    last_success_at: None,
                    last_error: None,
                    last_error_at: None,
                    oldest_pending_at: None,
                });
            }
            let t = out.last_mut().expect("pushed above");
            match state.as_str() {
                "pending" => t.pending = n,
                "failed" => t.failed = n,
                "delivered" => t.delivered = n,
                _ => {}
            }
        }
        out
    }
}

/// `scheme://host:port` of a URL, the key of per-destination concurrency limits.
pub fn origin_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}:{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_owned(),
    }
}

/// The `webhook-id` of `task`'s `stage` event for `target`: stable across retries, replays and
/// restarts, distinct per target, readable in a handler's log.
pub fn webhook_id(task: &str, stage: Stage, target: &str) -> String {
    let digest = Sha256::digest(target.as_bytes());
    let short: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("msg_{task}_{stage}_{short}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct_per_target() {
        let a = webhook_id("t1", Stage::First, "app");
        assert_eq!(a, webhook_id("t1", Stage::First, "app"));
        assert!(a.starts_with("msg_t1_first_"), "{a}");
        assert_ne!(a, webhook_id("t1", Stage::First, "other"));
        assert_ne!(a, webhook_id("t1", Stage::Complete, "app"));
    }

    #[test]
    fn origins_name_scheme_host_and_port() {
        assert_eq!(origin_of("http://127.0.0.1/cb"), "http://127.0.0.1:80");
        assert_eq!(
            origin_of("https://h.internal:8443/x?y"),
            "https://h.internal:8443"
        );
        assert_eq!(origin_of("not a url"), "not a url");
    }
}
