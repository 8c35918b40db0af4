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
use crate::events::Stage;

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

/// Reads an integer that may be a JSON number or a numeric string. A float counts only when it
/// is a whole number an `i64` holds exactly (`1e30` is no code, not `i64::MAX`).
pub(crate) fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            let f = n.as_f64()?;
            // 2^63 is the first float past i64::MAX; `as` would saturate to it.
            (f.fract() == 0.0 && f.abs() < 9.223_372_036_854_775e18).then_some(f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The failure codes a task's callback may carry: the union of every callback code list of
/// every family in both flavours (`../shared/api/suno-api.md` §3.4, `families.md` §3–§8). A
/// handler reads the callback's `code`, so an `error` event with a 2xx code (the API's
/// `errorCode: 200` on a failed task) would read as success, and an invented one as nothing
/// it knows.
pub const FAILURE_CODES: [i64; 7] = [400, 408, 413, 451, 500, 501, 531];

/// `errorCode` as a failure code: an integer or a digit string among [`FAILURE_CODES`]. Anything
/// else (200, 1e30, -500, 7) is unusable and the family's default code is used instead.
pub fn failure_code(v: &Value) -> Option<i64> {
    let code = match v {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()?
        }
        _ => return None,
    };
    FAILURE_CODES.contains(&code).then_some(code)
}

/// Longest status string kept. Every documented status is under 30 characters; a longer one
/// is unknown anyway, and keeping it whole would put a 1 MB string into the store, every log
/// line about the task and `list`.
pub const MAX_STATUS: usize = 200;

/// A status string as kept: at most [`MAX_STATUS`] characters.
pub(crate) fn status_text(s: &str) -> String {
    crate::logging::truncated(s, MAX_STATUS).into_owned()
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
/// record from one that moved on. [`read_answer`] does the same and also checks the answer is
/// about the task asked for and says what it removed.
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
    read_answer(family, None, http_status, retry_after, body).outcome
}

/// What [`read_answer`] changed in an answer before the family read it, for the log: the
/// answer itself is taken as it should have been, so the operator hears what the API said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// URL values removed because they are not safe to pass on ([`passable_url`]), clipped.
    pub dropped_urls: Vec<String>,
    /// The API's `errorCode`, when it is no failure code ([`FAILURE_CODES`]) and the answer
    /// ends the task with an `error`, which then carries the family's default code instead.
    pub ignored_error_code: Option<String>,
}

/// A classified answer and what was removed from it on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer<R> {
    /// What the answer means.
    pub outcome: Outcome<R>,
    /// What the log should hear about.
    pub notes: Notes,
}

/// [`classify`] for the answer about `task_id` (when given), with the rules every family shares
/// for an answer that is there but cannot be taken as it is:
///
/// - the body is read leniently: invalid UTF-8 is replaced (U+FFFD) and a number no `f64`
///   holds (`1e400`) reads as `null`, so one bad value cannot lose a good result;
/// - an answer whose `data.taskId` (or `task_id`) names another task is [`Outcome::Broken`]:
///   a caching proxy that ignores the query string would otherwise give every task the same
///   result. A record without a task id is taken as it is (no family's details omit it, but
///   an absent field is no evidence of a mix-up);
/// - every URL value ([`passable_url`]) that is not a plain `http`/`https` URL to a
///   non-link-local host becomes `null`, so the family treats it as absent (§1.7) and no
///   handler is handed `javascript:`, `file:` or the cloud metadata address;
/// - an `errorCode` that is no failure code ([`failure_code`]) becomes `null`, so a failure
///   carries the family's default code, never 200 or `i64::MAX`.
pub fn read_answer<F: Family>(
    family: &F,
    task_id: Option<&str>,
    http_status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Answer<F::Record> {
    let mut notes = Notes::default();
    let outcome = classify_inner(family, task_id, http_status, retry_after, body, &mut notes);
    Answer { outcome, notes }
}

fn classify_inner<F: Family>(
    family: &F,
    task_id: Option<&str>,
    http_status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
    notes: &mut Notes,
) -> Outcome<F::Record> {
    let retry_after = retry_after.map(|d| d.min(MAX_RETRY_AFTER));
    let mut envelope: Option<Value> = parse_lenient(body);
    let code = envelope
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(int_of);
    let msg = envelope
        .as_ref()
        .and_then(|v| str_of(v.get("msg")))
        .unwrap_or_default();
    let is_2xx = (200..300).contains(&http_status);

    if let (Some(code), Some(envelope)) = (code, envelope.as_mut()) {
        if code == 200 && is_2xx {
            let data = match envelope.get_mut("data") {
                None | Some(Value::Null) => {
                    return Outcome::Broken {
                        cause: "answer has code 200 but no `data`".to_owned(),
                    };
                }
                Some(data) => data,
            };
            if let (Some(asked), Some(said)) = (task_id, answered_task_id(data))
                && said != asked
            {
                return Outcome::Broken {
                    cause: format!(
                        "the answer is about task {}, not about {asked} (a proxy or cache \
                         answering for another task?); not taken",
                        clip(&said, MAX_TASK_ID_SHOWN)
                    ),
                };
            }
            scrub_urls(data, false, &mut notes.dropped_urls);
            let ignored = scrub_error_code(data);
            return match family.parse(data) {
                Ok(record) if family.is_running(&record) => Outcome::Pending(record),
                Ok(record) => {
                    if let Some(raw) = ignored
                        && family
                            .events(task_id.unwrap_or(""), None, &record, false)
                            .iter()
                            .any(|e| e.stage == Stage::Error)
                    {
                        notes.ignored_error_code = Some(raw);
                    }
                    Outcome::Progress(record)
                }
                Err(why) => Outcome::Broken { cause: why },
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

/// How much of a foreign task id a cause shows (real ones are 32 characters).
const MAX_TASK_ID_SHOWN: usize = 128;

/// The body as JSON, read leniently: as it is if it parses, else with invalid UTF-8 replaced;
/// then every number no `f64` can hold (`1e400`) reads as `null` ([`crate::json`]: numbers
/// keep their tokens, and such a token would make a handler's own parser refuse the whole
/// callback). The slow path runs only for a body that failed the fast one.
fn parse_lenient(body: &[u8]) -> Option<Value> {
    let mut v: Value = serde_json::from_slice(body).ok().or_else(|| {
        let text = String::from_utf8_lossy(body);
        match text {
            std::borrow::Cow::Owned(text) => serde_json::from_str(&text).ok(),
            std::borrow::Cow::Borrowed(_) => None,
        }
    })?;
    crate::json::null_unrepresentable(&mut v);
    Some(v)
}

/// The task id a details `data` names (`taskId`, or kie's `task_id`), if it names one.
fn answered_task_id(data: &Value) -> Option<String> {
    let obj = data.as_object()?;
    match obj.get("taskId").or_else(|| obj.get("task_id"))? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// True for a URL sunopoll passes on to handlers: `http` or `https`, a host, no whitespace or
/// control characters, and not a link-local or cloud-metadata address (169.254.0.0/16,
/// fe80::/10, `metadata.google.internal`), which a handler that downloads `audio_url` would
/// fetch from inside its own network.
pub fn passable_url(s: &str) -> bool {
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Ok(u) = url::Url::parse(s) else {
        return false;
    };
    if !matches!(u.scheme(), "http" | "https") {
        return false;
    }
    match u.host() {
        None => false,
        Some(url::Host::Ipv4(a)) => !a.is_link_local(),
        Some(url::Host::Ipv6(a)) => {
            let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
            !link_local && !a.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
        Some(url::Host::Domain(d)) => !d
            .trim_end_matches('.')
            .eq_ignore_ascii_case("metadata.google.internal"),
    }
}

/// True for a key whose value is a URL (or a list of them) in some family's details: `audioUrl`,
/// `audio_url`, `images`, … A new field named like one is covered without a change here.
fn is_url_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.ends_with("url") || k.ends_with("urls") || k == "images"
}

/// Replaces, anywhere in `v`, each URL value that is not [`passable_url`] with `null` and
/// records it (clipped) in `dropped`. `under_url_key` says `v` is the value of a URL key.
/// Blank strings are left alone: they are "absent" already.
fn scrub_urls(v: &mut Value, under_url_key: bool, dropped: &mut Vec<String>) {
    match v {
        Value::String(s) if under_url_key && !s.trim().is_empty() && !passable_url(s) => {
            dropped.push(clip(s, 200));
            *v = Value::Null;
        }
        Value::Array(items) => {
            for item in items {
                scrub_urls(item, under_url_key, dropped);
            }
        }
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                scrub_urls(child, is_url_key(key), dropped);
            }
        }
        _ => {}
    }
}

/// Sets `data.errorCode` to `null` when it is present but no failure code, and returns what it
/// was (clipped, for the log). `null`, `""` and real failure codes are left alone.
fn scrub_error_code(data: &mut Value) -> Option<String> {
    let code = data.as_object_mut()?.get_mut("errorCode")?;
    let unusable = match &*code {
        Value::Null => false,
        Value::String(s) if s.trim().is_empty() => false,
        other => failure_code(other).is_none(),
    };
    if !unusable {
        return None;
    }
    let raw = clip(&code.to_string(), 64);
    *code = Value::Null;
    Some(raw)
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

    fn success_for(task: &str) -> Vec<u8> {
        String::from_utf8(fixture("record-info.SUCCESS.json"))
            .expect("utf8")
            .replace("a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10", task)
            .into_bytes()
    }

    #[test]
    fn an_answer_about_another_task_is_broken_for_this_one() {
        let asked = "5c79be8e1f8b4b1f9c2a3d4e5f6a7b8c";
        let Answer { outcome, .. } =
            read_answer(&Music, Some(asked), 200, None, &success_for("b0b"));
        match outcome {
            Outcome::Broken { cause } => {
                assert!(cause.contains("b0b") && cause.contains(asked), "{cause}")
            }
            other => panic!("{other:?}"),
        }
        // The same answer about the task asked for is taken; kie's `task_id` is read too.
        let ok = read_answer(&Music, Some(asked), 200, None, &success_for(asked));
        assert_eq!(ok.outcome.kind(), "progress");
        let kie = br#"{"code":200,"data":{"task_id":"other","status":"PENDING"}}"#;
        assert_eq!(
            read_answer(&Music, Some(asked), 200, None, kie)
                .outcome
                .kind(),
            "broken"
        );
        // No task id in the record: nothing to compare, taken.
        let bare = br#"{"code":200,"data":{"status":"PENDING"}}"#;
        assert_eq!(
            read_answer(&Music, Some(asked), 200, None, bare)
                .outcome
                .kind(),
            "pending"
        );
    }

    #[test]
    fn the_task_id_is_checked_for_every_family() {
        use crate::api::families::{
            Flavor, cover::Cover, lyrics::Lyrics, midi::Midi, mp4::Mp4, stems::Stems, wav::Wav,
        };
        fn check<F: Family>(f: &F, fixture_name: &str) {
            let path = format!(
                "{}/tests/fixtures/families/{fixture_name}",
                env!("CARGO_MANIFEST_DIR")
            );
            let body = std::fs::read(&path).expect("fixture");
            let v: Value = serde_json::from_slice(&body).expect("json");
            let id = v["data"]["taskId"]
                .as_str()
                .expect("the fixture names its task")
                .to_owned();
            assert_ne!(
                read_answer(f, Some(&id), 200, None, &body).outcome.kind(),
                "broken",
                "{fixture_name}"
            );
            assert_eq!(
                read_answer(f, Some("another"), 200, None, &body)
                    .outcome
                    .kind(),
                "broken",
                "{fixture_name}"
            );
        }
        check(&Lyrics(Flavor::Sunoapi), "lyrics.record-info.SUCCESS.json");
        check(&Wav, "wav.record-info.SUCCESS.json");
        check(&Stems(Flavor::Sunoapi), "stems.record-info.SUCCESS.json");
        check(&Midi, "midi.record-info.SUCCESS.json");
        check(&Mp4(Flavor::Sunoapi), "mp4.record-info.SUCCESS.json");
        check(&Cover, "cover.record-info.SUCCESS.json");
    }

    #[test]
    fn a_failure_never_carries_a_success_or_undocumented_code() {
        for (code, want) in [
            ("200", 501),
            ("\"200\"", 501),
            ("1e30", 501),
            ("204", 501),
            ("-1", 501),
            ("9223372036854775807", 501),
            ("531", 531),
            ("\"451\"", 451),
        ] {
            let body = format!(
                r#"{{"code":200,"data":{{"status":"GENERATE_AUDIO_FAILED","errorCode":{code},"errorMessage":"x"}}}}"#
            );
            let Answer { outcome, notes } = read_answer(&Music, None, 200, None, body.as_bytes());
            let Outcome::Progress(r) = outcome else {
                panic!("{code}")
            };
            let ev = Music.events("t", None, &r, true);
            assert_eq!(ev.len(), 1, "{code}");
            assert_eq!(ev[0].code, want, "{code}");
            assert_eq!(
                notes.ignored_error_code.is_some(),
                want == 501,
                "the API's value is kept for the log: {code}"
            );
        }
        // A cover success says errorCode 200: not a failure, nothing to note.
        let body = br#"{"code":200,"data":{"taskId":"t","successFlag":1,"errorCode":200,"response":{"images":["https://i/1.png"]}}}"#;
        let a = read_answer(
            &crate::api::families::cover::Cover,
            Some("t"),
            200,
            None,
            body,
        );
        assert_eq!(a.outcome.kind(), "progress");
        assert_eq!(a.notes, Notes::default());
    }

    #[test]
    fn one_bad_value_does_not_lose_a_good_result() {
        let good = String::from_utf8(fixture("record-info.SUCCESS.json")).expect("utf8");
        // An invalid UTF-8 byte inside a title.
        let mut bad_utf8 = good.clone().into_bytes();
        let at = good.find("\"title\": \"").expect("a title") + 10;
        bad_utf8.insert(at, 0xff);
        let Outcome::Progress(r) = classify(&Music, 200, None, &bad_utf8) else {
            panic!("invalid UTF-8 lost the answer")
        };
        assert!(
            r.tracks[0]
                .title
                .as_deref()
                .is_some_and(|t| t.starts_with('\u{fffd}'))
        );
        assert_eq!(r.status.as_str(), "SUCCESS");
        // A number no f64 holds reads as absent; the rest of the track is kept.
        let huge = good.replacen("\"duration\": 187.32", "\"duration\": 1e400", 1);
        assert_ne!(huge, good, "the fixture has that duration");
        let Outcome::Progress(r) = classify(&Music, 200, None, huge.as_bytes()) else {
            panic!("1e400 lost the answer")
        };
        assert_eq!(r.tracks[0].duration, None);
        assert!(r.tracks[0].has_audio());
        let neg = good.replacen("\"duration\": 187.32", "\"duration\": -1E+999", 1);
        assert_eq!(
            classify(&Music, 200, None, neg.as_bytes()).kind(),
            "progress"
        );
        // A number an f64 holds, however long, is kept as it was written.
        let long = good.replacen(
            "\"duration\": 187.32",
            "\"duration\": 187.32000000000000000000001",
            1,
        );
        let Outcome::Progress(r) = classify(&Music, 200, None, long.as_bytes()) else {
            panic!("a long number lost the answer")
        };
        assert_eq!(
            r.tracks[0].duration.as_ref().map(ToString::to_string),
            Some("187.32000000000000000000001".to_owned())
        );
        // A malformed body stays malformed.
        assert_eq!(
            classify(&Music, 200, None, b"{\"code\":200,1e400").kind(),
            "broken"
        );
    }

    #[test]
    fn only_http_urls_to_ordinary_hosts_pass() {
        for ok in [
            "https://cdn1.suno.ai/a.mp3",
            "http://files.example.com:8080/x?y=1",
            "https://[2001:db8::1]/a",
            "http://10.0.0.5/private-but-not-link-local",
        ] {
            assert!(passable_url(ok), "{ok}");
        }
        for bad in [
            "javascript:alert(1)",
            "file:///etc/passwd",
            "data:audio/mp3;base64,AAAA",
            "ftp://files.example.com/a.mp3",
            "http://169.254.169.254/latest/meta-data/",
            "http://2852039166/latest/meta-data/",
            "http://[fe80::1]/a",
            "http://[febf::1]/a",
            "http://[::ffff:169.254.169.254]/",
            "http://metadata.google.internal./computeMetadata/v1/",
            "https://a.example.com/x\ny",
            " https://a.example.com/",
            "not a url",
            "https://",
        ] {
            assert!(!passable_url(bad), "{bad}");
        }
    }

    #[test]
    fn dangerous_urls_become_absent_in_every_url_field() {
        let body = br#"{"code":200,"data":{"taskId":"t","status":"SUCCESS","response":{"sunoData":[
            {"id":"a","audioUrl":"javascript:alert(1)","sourceAudioUrl":"file:///etc/passwd",
             "streamAudioUrl":"http://169.254.169.254/x","sourceStreamAudioUrl":"https://ok.example.com/s",
             "imageUrl":"data:image/png;base64,AAAA","sourceImageUrl":"https://ok.example.com/i","title":"javascript:t"}]}}}"#;
        let Answer { outcome, notes } = read_answer(&Music, Some("t"), 200, None, body);
        let Outcome::Progress(r) = outcome else {
            panic!("not progress")
        };
        let t = &r.tracks[0];
        assert_eq!(t.audio_url, None);
        assert_eq!(t.source_audio_url, None);
        assert_eq!(t.stream_audio_url, None);
        assert_eq!(t.image_url, None);
        assert_eq!(
            t.source_stream_audio_url.as_deref(),
            Some("https://ok.example.com/s")
        );
        assert_eq!(
            t.source_image_url.as_deref(),
            Some("https://ok.example.com/i")
        );
        assert_eq!(
            t.title.as_deref(),
            Some("javascript:t"),
            "only URL fields are URLs"
        );
        assert_eq!(notes.dropped_urls.len(), 4, "{notes:?}");
        // The body keeps its shape: the fields are there, as null.
        let ev = Music.events("t", Some(Stage::First), &r, true);
        let body: Value = serde_json::from_str(&ev[0].body).expect("json");
        assert_eq!(body["data"]["data"][0]["audio_url"], Value::Null);
        assert_eq!(body["data"]["data"][0]["image_url"], Value::Null);
        assert!(!ev[0].body.contains("javascript:alert") && !ev[0].body.contains("169.254"));
    }

    #[test]
    fn every_familys_url_fields_are_scrubbed() {
        use crate::api::families::{Flavor, cover::Cover, mp4::Mp4, stems::Stems, wav::Wav};
        fn body_of<F: Family>(f: &F, data: &str) -> String {
            let body = format!(r#"{{"code":200,"data":{data}}}"#);
            let Outcome::Progress(r) =
                read_answer(f, Some("t"), 200, None, body.as_bytes()).outcome
            else {
                panic!("{data}")
            };
            f.events("t", None, &r, false).remove(0).body
        }
        let bad = "file:///etc/passwd";
        let wav = body_of(
            &Wav,
            &format!(
                r#"{{"taskId":"t","successFlag":"SUCCESS","response":{{"audioWavUrl":"{bad}"}}}}"#
            ),
        );
        assert!(wav.contains(r#""audioWavUrl":null"#), "{wav}");
        let mp4 = body_of(
            &Mp4(Flavor::Sunoapi),
            &format!(
                r#"{{"taskId":"t","successFlag":"SUCCESS","response":{{"videoUrl":"{bad}"}}}}"#
            ),
        );
        assert!(mp4.contains(r#""video_url":null"#), "{mp4}");
        let stems = body_of(
            &Stems(Flavor::Sunoapi),
            &format!(
                r#"{{"taskId":"t","successFlag":"SUCCESS","response":{{"originUrl":"{bad}","vocalUrl":"https://v.example.com/v","drumsUrl":"{bad}"}}}}"#
            ),
        );
        assert!(
            !stems.contains(bad) && stems.contains("https://v.example.com/v"),
            "{stems}"
        );
        let cover = body_of(
            &Cover,
            &format!(
                r#"{{"taskId":"t","successFlag":1,"response":{{"images":["{bad}","https://i.example.com/1.png"]}}}}"#
            ),
        );
        assert!(
            cover.contains(r#""images":["https://i.example.com/1.png"]"#),
            "{cover}"
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
