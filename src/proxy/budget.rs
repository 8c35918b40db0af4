//! Submissions spend the account's request budget with its polls: while the account's polling
//! is paused because the API throttled it, or when a submission would wait too long for its
//! turn, the application gets the provider's own throttle signal for the account's flavour,
//! with a `Retry-After`, and nothing is sent. Pure.

use std::time::Duration;

use hyper::StatusCode;

use crate::api::families::Flavor;
use crate::jobs::gate::{PauseKind, PollStatus};

/// How long the account's throttle pause still lasts at `now` (Unix ms), if it is paused for
/// throttling. Other pauses (an outage, a rejected key) do not hold submissions back: the
/// application hears the API's own answer to them.
pub fn throttled_for(status: &PollStatus, now: i64) -> Option<Duration> {
    if status.pause_kind != Some(PauseKind::Throttled) {
        return None;
    }
    let until = crate::clock::parse_utc(status.paused_until.as_deref()?)?;
    (until > now).then(|| Duration::from_millis((until - now).unsigned_abs()))
}

/// The answer a throttled submission gets: the status and JSON body the provider itself sends
/// when an account goes over its rate (sunoapi: HTTP 200 with `code` 430; kie: HTTP 429 with
/// `code` 429), the `msg` saying that sunopoll answered and why, and the `Retry-After`
/// seconds (at least 1).
pub fn throttle_answer(flavor: Flavor, wait: Duration, why: &str) -> (StatusCode, String, u64) {
    let retry_after = wait.as_secs_f64().ceil().max(1.0) as u64;
    let (status, code, text) = match flavor {
        Flavor::Sunoapi => (
            StatusCode::OK,
            430,
            "Your call frequency is too high. Please try again later.",
        ),
        Flavor::Kie => (
            StatusCode::TOO_MANY_REQUESTS,
            429,
            "Rate limited - request limit has been exceeded for this resource",
        ),
    };
    let msg =
        format!("{text} (answered by sunopoll without sending: {why}; retry after {retry_after}s)");
    let body = serde_json::json!({"code": code, "msg": msg, "data": null}).to_string();
    (status, body, retry_after)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::format_utc;

    #[test]
    fn only_a_throttle_pause_that_has_not_ended_holds_submissions() {
        let now = 1_800_000_000_000;
        let mut s = PollStatus {
            pause_kind: Some(PauseKind::Throttled),
            paused_until: Some(format_utc(now + 12_000)),
            ..PollStatus::default()
        };
        assert_eq!(throttled_for(&s, now), Some(Duration::from_secs(12)));
        assert_eq!(throttled_for(&s, now + 12_000), None, "over: probing");
        s.pause_kind = Some(PauseKind::Unavailable);
        assert_eq!(throttled_for(&s, now), None);
        assert_eq!(throttled_for(&PollStatus::default(), now), None);
    }

    #[test]
    fn each_flavour_gets_its_providers_own_throttle_signal() {
        let (status, body, ra) = throttle_answer(Flavor::Sunoapi, Duration::from_millis(1200), "x");
        assert_eq!((status, ra), (StatusCode::OK, 2));
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["code"], 430);
        assert!(v["data"].is_null());
        let (status, body, ra) = throttle_answer(Flavor::Kie, Duration::ZERO, "x");
        assert_eq!((status, ra), (StatusCode::TOO_MANY_REQUESTS, 1));
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["code"], 429);
    }
}
