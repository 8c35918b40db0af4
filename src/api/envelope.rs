//! The JSON envelope every details endpoint shares, and the pure [`classify`] that turns one HTTP
//! answer into an [`Outcome`].
//!
//! `classify` is the single place that decides what an answer means. Business errors arrive as
//! HTTP 200 with a non-200 JSON `code`, some providers use real HTTP statuses, and nobody agrees on
//! all the codes (see `../shared/api/suno-api.md` §1.4, §2.6), so the rules are written out here
//! once, in order, and unit-tested against every fixture. Only the envelope's `data` differs per
//! task family: it goes to [`Family::parse`], so the same rules hold for every family.

use std::time::Duration;

use serde_json::Value;

use super::clip;
use super::families::Family;

/// Upper bound on an honoured `Retry-After`. A server asking for more than a day is more likely
/// wrong than right, and a day-long pause is already an outage the operator must look at.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What one details answer means for polling; `R` is the task family's record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<R> {
    /// The task reached a known status past pending (a success stage or a failure).
    Progress(R),
    /// The task is still running: pending, or a status nobody knows yet.
    Pending(R),
    /// The API asked us to slow down (HTTP 429, JSON code 405/408/429/430, HTTP 503 with
    /// `Retry-After`). Pauses all polling.
    Throttled {
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// What the API said, for the log.
        cause: String,
    },
    /// The API is down or failing (JSON 455, 5xx, timeouts, connection errors). Pauses all polling.
    Unavailable {
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// What went wrong, for the log.
        cause: String,
    },
    /// The API key was rejected (401/403). Pauses all polling until the key works again.
    Unauthorized {
        /// What the API said, for the log (never the key).
        cause: String,
    },
    /// The API refused this task ID (400/404/422). Three in a row end the task with an `error`.
    Rejected {
        /// The JSON `code` (or the HTTP status when there was no JSON).
        code: i64,
        /// The API's message.
        message: String,
    },
    /// The answer could not be understood (bad JSON, missing `data`, oversize body…). Backs off
    /// this one task.
    Broken {
        /// What was wrong with it.
        cause: String,
    },
}

impl<R> Outcome<R> {
    /// A short name for logs and `status`.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Progress(_) => "progress",
            Outcome::Pending(_) => "pending",
            Outcome::Throttled { .. } => "throttled",
            Outcome::Unavailable { .. } => "unavailable",
            Outcome::Unauthorized { .. } => "unauthorized",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Broken { .. } => "broken",
        }
    }
}

/// Reads an integer that may be a JSON number or a numeric string.
pub(crate) fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads a non-empty string.
pub(crate) fn str_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// How a JSON value's type reads in a cause ("`data` is null").
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Decides what one HTTP answer from `family`'s details endpoint means. Pure: the HTTP status,
/// the `Retry-After` header (already parsed) and the body bytes are all it looks at; the
/// envelope's `data` is read by [`Family::parse`], and [`Family::is_running`] tells a pending
/// record from one that moved on.
///
/// Rules, in order:
/// 1. If the body is a JSON envelope with a numeric `code`, the code decides (the API sends
///    business errors as HTTP 200 with a non-200 code, and some proxies wrap them in 5xx).
///    `code` 200 only counts on a 2xx answer.
/// 2. Otherwise the HTTP status decides.
pub fn classify<F: Family>(
    family: &F,
    http_status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Outcome<F::Record> {
    let retry_after = retry_after.map(|d| d.min(MAX_RETRY_AFTER));
    let envelope: Option<Value> = serde_json::from_slice(body).ok();
    let code = envelope
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(int_of);
    let msg = envelope
        .as_ref()
        .and_then(|v| str_of(v.get("msg")))
        .unwrap_or_default();
    let is_2xx = (200..300).contains(&http_status);

    if let (Some(code), Some(envelope)) = (code, envelope.as_ref()) {
        if code == 200 && is_2xx {
            return match envelope.get("data") {
                None | Some(Value::Null) => Outcome::Broken {
                    cause: "answer has code 200 but no `data`".to_owned(),
                },
                Some(data) => match family.parse(data) {
                    Ok(record) if family.is_running(&record) => Outcome::Pending(record),
                    Ok(record) => Outcome::Progress(record),
                    Err(why) => Outcome::Broken { cause: why },
                },
            };
        }
        if code != 200 {
            let said = describe(http_status, Some(code), &msg);
            return match code {
                405 | 408 | 429 | 430 => Outcome::Throttled {
                    retry_after,
                    cause: said,
                },
                401 | 403 => Outcome::Unauthorized { cause: said },
                400 | 404 | 422 => {
                    // A 5xx wrapping a 4xx code is the server failing, not a verdict on the task.
                    // "Invalid request method or path" is about the URL we call, so about every
                    // task: a wrong api.base-url must pause polling, not fail every task.
                    if http_status >= 500
                        || (code == 404 && msg.to_ascii_lowercase().contains("path"))
                    {
                        Outcome::Unavailable {
                            retry_after,
                            cause: said,
                        }
                    } else {
                        Outcome::Rejected {
                            code,
                            message: if msg.is_empty() {
                                format!("the API answered code {code}")
                            } else {
                                msg
                            },
                        }
                    }
                }
                455 | 500..=599 => Outcome::Unavailable {
                    retry_after,
                    cause: said,
                },
                _ => classify_http(http_status, retry_after, said),
            };
        }
    }
    let said = if envelope.is_some() {
        describe(http_status, code, &msg)
    } else {
        describe_raw(http_status, body)
    };
    classify_http(http_status, retry_after, said)
}

/// The HTTP-status half of [`classify`], used when the JSON does not decide.
fn classify_http<R>(http_status: u16, retry_after: Option<Duration>, cause: String) -> Outcome<R> {
    match http_status {
        429 => Outcome::Throttled { retry_after, cause },
        503 if retry_after.is_some() => Outcome::Throttled { retry_after, cause },
        408 | 500..=599 => Outcome::Unavailable { retry_after, cause },
        401 | 403 => Outcome::Unauthorized { cause },
        // Without the API's JSON envelope, a 4xx comes from something else on the way (a wrong
        // api.base-url, a proxy): not a verdict on this task. Pausing is safe; a task the API
        // really refuses alone becomes its own problem after a few strikes (scheduler).
        400 | 404 | 405 | 410 | 422 => Outcome::Unavailable {
            retry_after,
            cause: format!("{cause} (is api.base-url right?)"),
        },
        200..=299 => Outcome::Broken {
            cause: format!("unexpected answer: {cause}"),
        },
        _ => Outcome::Broken { cause },
    }
}

fn describe(http_status: u16, code: Option<i64>, msg: &str) -> String {
    let mut s = format!("HTTP {http_status}");
    if let Some(code) = code {
        s.push_str(&format!(", code {code}"));
    }
    if !msg.is_empty() {
        s.push_str(&format!(": {}", clip(msg, 200)));
    }
    s
}

fn describe_raw(http_status: u16, body: &[u8]) -> String {
    if body.is_empty() {
        return format!("HTTP {http_status} with an empty body");
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    format!(
        "HTTP {http_status} with a body that is not JSON ({} bytes, starting {:?})",
        body.len(),
        clip(text.trim(), 80)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::families::music::{Music, Record};

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn status_of(o: &Outcome<Record>) -> String {
        match o {
            Outcome::Progress(r) | Outcome::Pending(r) => r.status.to_string(),
            other => other.kind().to_owned(),
        }
    }

    #[test]
    fn every_record_info_fixture_classifies_to_its_status() {
        let cases = [
            ("record-info.PENDING.json", "pending", "PENDING"),
            (
                "record-info.PENDING.empty-sunoData.json",
                "pending",
                "PENDING",
            ),
            ("record-info.TEXT_SUCCESS.json", "progress", "TEXT_SUCCESS"),
            (
                "record-info.FIRST_SUCCESS.json",
                "progress",
                "FIRST_SUCCESS",
            ),
            ("record-info.SUCCESS.json", "progress", "SUCCESS"),
            (
                "record-info.CALLBACK_EXCEPTION.json",
                "progress",
                "CALLBACK_EXCEPTION",
            ),
            (
                "record-info.CALLBACK_EXCEPTION.no-audio.json",
                "progress",
                "CALLBACK_EXCEPTION",
            ),
            (
                "record-info.CREATE_TASK_FAILED.json",
                "progress",
                "CREATE_TASK_FAILED",
            ),
            (
                "record-info.GENERATE_AUDIO_FAILED.json",
                "progress",
                "GENERATE_AUDIO_FAILED",
            ),
            (
                "record-info.GENERATE_AUDIO_FAILED.531.json",
                "progress",
                "GENERATE_AUDIO_FAILED",
            ),
            (
                "record-info.SENSITIVE_WORD_ERROR.json",
                "progress",
                "SENSITIVE_WORD_ERROR",
            ),
        ];
        for (file, kind, status) in cases {
            let outcome = classify(&Music, 200, None, &fixture(file));
            assert_eq!(outcome.kind(), kind, "{file}");
            assert_eq!(status_of(&outcome), status, "{file}");
        }
    }

    #[test]
    fn error_envelope_fixtures_on_http_200() {
        let cases = [
            ("error.400.missing-callback-url.json", "rejected"),
            ("error.401.unauthorized.json", "unauthorized"),
            ("error.404.wrong-path.json", "unavailable"),
            ("error.405.rate-limit-exceeded.json", "throttled"),
            ("error.408.upstream-timeout.kie.json", "throttled"),
            ("error.422.missing-callback-url.kie.json", "rejected"),
            ("error.429.insufficient-credits.json", "throttled"),
            ("error.429.rate-limited.kie.json", "throttled"),
            ("error.430.call-frequency-too-high.json", "throttled"),
            ("error.455.maintenance.json", "unavailable"),
            ("error.500.server-error.json", "unavailable"),
        ];
        for (file, kind) in cases {
            assert_eq!(
                classify(&Music, 200, None, &fixture(file)).kind(),
                kind,
                "{file}"
            );
        }
    }

    #[test]
    fn error_envelopes_on_matching_http_statuses() {
        assert_eq!(
            classify(
                &Music,
                429,
                None,
                &fixture("error.429.rate-limited.kie.json")
            )
            .kind(),
            "throttled"
        );
        assert_eq!(
            classify(&Music, 500, None, &fixture("error.500.server-error.json")).kind(),
            "unavailable"
        );
        assert_eq!(
            classify(&Music, 401, None, &fixture("error.401.unauthorized.json")).kind(),
            "unauthorized"
        );
        assert_eq!(
            classify(&Music, 404, None, &fixture("error.404.wrong-path.json")).kind(),
            "unavailable",
            "a wrong path is everyone's problem"
        );
        assert_eq!(
            classify(&Music, 404, None, br#"{"code":404,"msg":"task not found"}"#).kind(),
            "rejected"
        );
        assert_eq!(
            classify(&Music, 503, None, &fixture("error.455.maintenance.json")).kind(),
            "unavailable"
        );
        // A 5xx carrying a task-level code is the server failing, not a rejection.
        assert_eq!(
            classify(&Music, 502, None, &fixture("error.404.wrong-path.json")).kind(),
            "unavailable"
        );
    }

    #[test]
    fn rejection_carries_code_and_message() {
        assert_eq!(
            classify(
                &Music,
                200,
                None,
                &fixture("error.422.missing-callback-url.kie.json")
            ),
            Outcome::Rejected {
                code: 422,
                message: "Please enter callBackUrl.".to_owned()
            }
        );
    }

    #[test]
    fn bare_http_statuses() {
        let ra = Some(Duration::from_secs(7));
        assert_eq!(
            classify(&Music, 429, ra, b""),
            Outcome::Throttled {
                retry_after: ra,
                cause: "HTTP 429 with an empty body".to_owned()
            }
        );
        assert_eq!(
            classify(&Music, 503, ra, b"<html>busy</html>").kind(),
            "throttled"
        );
        assert_eq!(
            classify(&Music, 503, None, b"<html>busy</html>").kind(),
            "unavailable"
        );
        assert_eq!(classify(&Music, 500, None, b"").kind(), "unavailable");
        assert_eq!(
            classify(&Music, 502, None, b"Bad Gateway").kind(),
            "unavailable"
        );
        assert_eq!(classify(&Music, 408, None, b"").kind(), "unavailable");
        assert_eq!(classify(&Music, 401, None, b"").kind(), "unauthorized");
        assert_eq!(
            classify(&Music, 403, None, b"forbidden").kind(),
            "unauthorized"
        );
        assert_eq!(
            classify(&Music, 404, None, b"<html>Not Found</html>").kind(),
            "unavailable"
        );
        assert_eq!(classify(&Music, 400, None, b"").kind(), "unavailable");
        assert_eq!(classify(&Music, 200, None, b"").kind(), "broken");
        assert_eq!(
            classify(&Music, 200, None, b"{\"code\":200,").kind(),
            "broken"
        );
        assert_eq!(classify(&Music, 302, None, b"").kind(), "broken");
    }

    #[test]
    fn broken_bodies() {
        for body in [
            &br#"{"code":200,"msg":"success"}"#[..],
            br#"{"code":200,"msg":"success","data":null}"#,
            br#"{"code":200,"msg":"success","data":[]}"#,
            br#"{"code":200,"msg":"success","data":{}}"#,
            br#"{"code":200,"msg":"success","data":{"status":7}}"#,
            b"[1,2,3]",
            b"\xff\xfe\x00",
        ] {
            assert_eq!(
                classify(&Music, 200, None, body).kind(),
                "broken",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn unknown_status_is_pending_and_unknown_code_is_not_a_task_failure() {
        let o = classify(
            &Music,
            200,
            None,
            br#"{"code":200,"data":{"status":"QUANTUM_SUPERPOSITION"}}"#,
        );
        assert_eq!(status_of(&o), "QUANTUM_SUPERPOSITION");
        assert_eq!(o.kind(), "pending");
        assert_eq!(
            classify(&Music, 200, None, br#"{"code":999,"msg":"?","data":null}"#).kind(),
            "broken"
        );
    }

    #[test]
    fn retry_after_is_capped() {
        let o = classify(&Music, 429, Some(Duration::from_secs(10 * 86400)), b"");
        assert_eq!(
            o,
            Outcome::Throttled {
                retry_after: Some(MAX_RETRY_AFTER),
                cause: "HTTP 429 with an empty body".to_owned()
            }
        );
    }
}
