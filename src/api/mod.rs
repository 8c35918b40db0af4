//! The Suno API as sunopoll sees it: the record-info answer's shape, the pure [`classify`]
//! function that turns one HTTP answer into an [`Outcome`], and the [`ApiClient`] that makes the
//! request.
//!
//! `classify` is the single place that decides what an answer means. Business errors arrive as
//! HTTP 200 with a non-200 JSON `code`, some providers use real HTTP statuses, and nobody agrees on
//! all the codes (see `../shared/api/suno-api.md` §1.4, §2.6), so the rules are written out here
//! once, in order, and unit-tested against every fixture.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Largest record-info body we read. Real answers are a few KiB (two tracks with lyrics); a body
/// this large is a broken proxy or a hostile server, and reading it whole would cost memory.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// Upper bound on an honoured `Retry-After`. A server asking for more than a day is more likely
/// wrong than right, and a day-long pause is already an outage the operator must look at.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What one record-info answer means for polling.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task reached a known status past `PENDING` (a success stage or a failure).
    Progress(Record),
    /// The task is still running: `PENDING`, or a status string nobody knows yet.
    Pending(Record),
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

impl Outcome {
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

/// The task statuses record-info documents, plus whatever else it may say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskStatus {
    /// Waiting or generating.
    Pending,
    /// Lyrics/text done.
    TextSuccess,
    /// First track done.
    FirstSuccess,
    /// All tracks done.
    Success,
    /// The task could not be created.
    CreateTaskFailed,
    /// Audio generation failed.
    GenerateAudioFailed,
    /// The provider's callback failed; audio may still be present.
    CallbackException,
    /// Prompt or lyrics contained prohibited words.
    SensitiveWordError,
    /// A status string we do not know. Treated as still running.
    Other(String),
}

impl TaskStatus {
    /// Parses the API's status string. Never fails: unknown strings become [`TaskStatus::Other`].
    pub fn parse(s: &str) -> TaskStatus {
        match s {
            "PENDING" => TaskStatus::Pending,
            "TEXT_SUCCESS" => TaskStatus::TextSuccess,
            "FIRST_SUCCESS" => TaskStatus::FirstSuccess,
            "SUCCESS" => TaskStatus::Success,
            "CREATE_TASK_FAILED" => TaskStatus::CreateTaskFailed,
            "GENERATE_AUDIO_FAILED" => TaskStatus::GenerateAudioFailed,
            "CALLBACK_EXCEPTION" => TaskStatus::CallbackException,
            "SENSITIVE_WORD_ERROR" => TaskStatus::SensitiveWordError,
            other => TaskStatus::Other(other.to_owned()),
        }
    }

    /// The API's spelling.
    pub fn as_str(&self) -> &str {
        match self {
            TaskStatus::Pending => "PENDING",
            TaskStatus::TextSuccess => "TEXT_SUCCESS",
            TaskStatus::FirstSuccess => "FIRST_SUCCESS",
            TaskStatus::Success => "SUCCESS",
            TaskStatus::CreateTaskFailed => "CREATE_TASK_FAILED",
            TaskStatus::GenerateAudioFailed => "GENERATE_AUDIO_FAILED",
            TaskStatus::CallbackException => "CALLBACK_EXCEPTION",
            TaskStatus::SensitiveWordError => "SENSITIVE_WORD_ERROR",
            TaskStatus::Other(s) => s,
        }
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parts of record-info's `data` that sunopoll uses. Parsed leniently: unknown fields are
/// ignored, and every field may be missing or `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// `data.status`.
    pub status: TaskStatus,
    /// `data.response.sunoData`, in the API's order.
    pub tracks: Vec<Track>,
    /// `data.errorCode` (number or numeric string).
    pub error_code: Option<i64>,
    /// `data.errorMessage`, else `data.response.errorMessage`.
    pub error_message: Option<String>,
    /// `data.param`, the JSON string of the original request (it holds `callBackUrl`).
    pub param: Option<String>,
}

impl Record {
    /// The `callBackUrl` the task was submitted with, read from `data.param`.
    pub fn submitted_callback_url(&self) -> Option<String> {
        let param: Value = serde_json::from_str(self.param.as_deref()?).ok()?;
        param
            .get("callBackUrl")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }
}

/// One generated track as record-info reports it (camelCase on the wire).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Track {
    /// Audio id (a UUID).
    #[serde(deserialize_with = "lenient_string")]
    pub id: Option<String>,
    /// Final MP3; empty until the track is done.
    #[serde(deserialize_with = "lenient_url")]
    pub audio_url: Option<String>,
    /// Upstream MP3.
    #[serde(deserialize_with = "lenient_url")]
    pub source_audio_url: Option<String>,
    /// Provider streaming URL.
    #[serde(deserialize_with = "lenient_url")]
    pub stream_audio_url: Option<String>,
    /// Upstream streaming URL.
    #[serde(deserialize_with = "lenient_url")]
    pub source_stream_audio_url: Option<String>,
    /// Cover art.
    #[serde(deserialize_with = "lenient_url")]
    pub image_url: Option<String>,
    /// Upstream cover art.
    #[serde(deserialize_with = "lenient_url")]
    pub source_image_url: Option<String>,
    /// Lyrics or description.
    #[serde(deserialize_with = "lenient_string")]
    pub prompt: Option<String>,
    /// Model tag.
    #[serde(deserialize_with = "lenient_string")]
    pub model_name: Option<String>,
    /// Title.
    #[serde(deserialize_with = "lenient_string")]
    pub title: Option<String>,
    /// Style tags.
    #[serde(deserialize_with = "lenient_string")]
    pub tags: Option<String>,
    /// Creation time: epoch milliseconds (observed) or a `"YYYY-MM-DD HH:MM:SS"` string (documented).
    pub create_time: Option<Value>,
    /// Seconds; `null` until the track is done.
    #[serde(deserialize_with = "lenient_f64")]
    pub duration: Option<f64>,
}

impl Track {
    /// True when the track's final audio is available.
    pub fn has_audio(&self) -> bool {
        self.audio_url.is_some()
    }
}

/// A string field: anything that is not a string becomes `None`.
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// A URL field: missing, `null` and `""` are all "absent".
fn lenient_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) if !s.trim().is_empty() => Some(s),
        _ => None,
    })
}

/// A number field that may also arrive as a numeric string.
fn lenient_f64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

/// Reads an integer that may be a JSON number or a numeric string.
fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Reads a non-empty string.
fn str_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Builds a [`Record`] from record-info's `data` object, or says why it cannot.
pub fn parse_record(data: &Value) -> Result<Record, String> {
    let obj = data
        .as_object()
        .ok_or_else(|| format!("`data` is {}, not an object", json_kind(data)))?;
    let status = match obj.get("status") {
        Some(Value::String(s)) if !s.is_empty() => TaskStatus::parse(s),
        Some(other) => return Err(format!("`data.status` is {}", json_kind(other))),
        None => return Err("`data.status` is missing".to_owned()),
    };
    let response = obj.get("response").filter(|v| v.is_object());
    let tracks = match response.and_then(|r| r.get("sunoData")) {
        Some(Value::Array(items)) => items
            .iter()
            .filter(|item| item.is_object())
            .map(|item| Track::deserialize(item).unwrap_or_default())
            .collect(),
        _ => Vec::new(),
    };
    let error_code = obj.get("errorCode").and_then(int_of);
    let error_message = str_of(obj.get("errorMessage"))
        .or_else(|| str_of(response.and_then(|r| r.get("errorMessage"))));
    let param = str_of(obj.get("param"));
    Ok(Record {
        status,
        tracks,
        error_code,
        error_message,
        param,
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Decides what one HTTP answer from record-info means. Pure: the HTTP status, the
/// `Retry-After` header (already parsed) and the body bytes are all it looks at.
///
/// Rules, in order:
/// 1. If the body is a JSON envelope with a numeric `code`, the code decides (the API sends
///    business errors as HTTP 200 with a non-200 code, and some proxies wrap them in 5xx).
///    `code` 200 only counts on a 2xx answer.
/// 2. Otherwise the HTTP status decides.
pub fn classify(http_status: u16, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
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
                Some(data) => match parse_record(data) {
                    Ok(record) => match record.status {
                        TaskStatus::Pending | TaskStatus::Other(_) => Outcome::Pending(record),
                        _ => Outcome::Progress(record),
                    },
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
fn classify_http(http_status: u16, retry_after: Option<Duration>, cause: String) -> Outcome {
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

/// Shortens `s` to at most `max` characters for a log line, on a character boundary, and
/// replaces control characters so an API message cannot forge log lines.
pub fn clip(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// A URL for logs and output: any `user:password@` part is replaced, so credentials embedded
/// in a handler or API URL are never printed.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("***");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Parses a `Retry-After` header: delay-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Shortest secret [`redact`] removes: anything shorter would match ordinary words.
pub const MIN_REDACTED: usize = 8;

/// What a redacted secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// `bytes` with every occurrence of `secret` replaced by [`REDACTED`]. A server, proxy or
/// handler that echoes a request's credentials in its answer ("invalid token Bearer sk-…")
/// must not get them into the log, `status`, or stored events. Secrets shorter than
/// [`MIN_REDACTED`] are left alone.
pub fn redact<'a>(bytes: &'a [u8], secret: &str) -> std::borrow::Cow<'a, [u8]> {
    let s = secret.as_bytes();
    if s.len() < MIN_REDACTED || !bytes.windows(s.len()).any(|w| w == s) {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.starts_with(s) {
            out.extend_from_slice(REDACTED.as_bytes());
            rest = &rest[s.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The API key. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key, trimming surrounding whitespace (key files usually end in a newline).
    pub fn new(key: &str) -> Option<ApiKey> {
        ApiKey::parse(key).ok()
    }

    /// Reads a key from the text of a key file or variable: its first line, trimmed. A key
    /// with spaces or control characters inside could not be sent in a header; it is refused
    /// here, where the error can say so, rather than failing every request later.
    pub fn parse(text: &str) -> Result<ApiKey, &'static str> {
        let key = text.lines().next().unwrap_or("").trim();
        if key.is_empty() {
            return Err("is empty");
        }
        if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("contains spaces or control characters on its first line");
        }
        Ok(ApiKey(key.to_owned()))
    }

    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// The record-info HTTP client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    endpoint: url::Url,
    key: ApiKey,
}

impl ApiClient {
    /// Builds a client for `base_url` (e.g. `https://api.sunoapi.org`).
    pub fn new(base_url: &url::Url, key: ApiKey, timeout: Duration) -> anyhow::Result<ApiClient> {
        install_crypto_provider();
        let endpoint = base_url.join("api/v1/generate/record-info").map_err(|e| {
            anyhow::anyhow!("cannot build the record-info URL from {base_url}: {e}")
        })?;
        let http = reqwest::Client::builder()
            .user_agent(crate::USER_AGENT)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()?;
        Ok(ApiClient {
            http,
            endpoint,
            key,
        })
    }

    /// Asks record-info about one task and classifies the answer. Transport failures
    /// (refused, reset, timeout) come back as [`Outcome::Unavailable`]; this never errors.
    pub async fn record_info(&self, task_id: &str) -> Outcome {
        let mut url = self.endpoint.clone();
        url.query_pairs_mut().append_pair("taskId", task_id);
        let response = match self
            .http
            .get(url)
            .bearer_auth(self.key.expose())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Unavailable {
                    retry_after: None,
                    cause: transport_cause(&e),
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        match read_capped(response, MAX_BODY_BYTES).await {
            // Redacted before anything reads it, so no cause, message or event can carry the
            // key even if the API echoes it back.
            Ok(body) => classify(status, retry_after, &redact(&body, self.key.expose())),
            Err(BodyError::TooLarge) => Outcome::Broken {
                cause: format!("HTTP {status} with a body over {MAX_BODY_BYTES} bytes"),
            },
            Err(BodyError::Transport(e)) => Outcome::Unavailable {
                retry_after,
                cause: format!("HTTP {status}, then {}", transport_cause(&e)),
            },
        }
    }
}

/// Installs rustls' *ring* provider once per process (reqwest is built without a default one to
/// keep aws-lc's long C build out of the dependency tree).
pub fn install_crypto_provider() {
    // Fails only if a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Says what went wrong on the wire in words an operator can act on. Never includes headers,
/// so the key cannot leak through it.
pub fn transport_cause(e: &reqwest::Error) -> String {
    let mut what = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else if e.is_body() || e.is_decode() {
        "the connection broke while reading the body".to_owned()
    } else if e.is_redirect() {
        "too many redirects".to_owned()
    } else {
        "request failed".to_owned()
    };
    // The innermost source is usually the useful part ("Connection refused (os error 111)").
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(last) = last {
        what.push_str(": ");
        what.push_str(&clip(&last, 200));
    }
    what
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn status_of(o: &Outcome) -> String {
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
            let outcome = classify(200, None, &fixture(file));
            assert_eq!(outcome.kind(), kind, "{file}");
            assert_eq!(status_of(&outcome), status, "{file}");
        }
    }

    #[test]
    fn record_fields_are_read_leniently() {
        let Outcome::Progress(r) = classify(200, None, &fixture("record-info.FIRST_SUCCESS.json"))
        else {
            panic!("not progress")
        };
        assert_eq!(r.tracks.len(), 2);
        assert!(r.tracks[0].has_audio());
        assert!(!r.tracks[1].has_audio(), "\"\" audioUrl is absent");
        assert_eq!(r.tracks[1].source_audio_url, None, "null is absent");
        assert_eq!(r.tracks[1].duration, None);
        assert_eq!(r.tracks[0].duration, Some(187.32));
        assert_eq!(
            r.submitted_callback_url().as_deref(),
            Some("https://hooks.example.com/suno/callback")
        );

        let Outcome::Progress(r) = classify(
            200,
            None,
            &fixture("record-info.GENERATE_AUDIO_FAILED.json"),
        ) else {
            panic!("not progress")
        };
        assert_eq!(r.error_code, Some(501));
        assert_eq!(
            r.error_message.as_deref(),
            Some("Generation failed, please try again or contact support")
        );
        let Outcome::Pending(r) = classify(200, None, &fixture("record-info.PENDING.json")) else {
            panic!("not pending")
        };
        assert!(r.tracks.is_empty(), "response: null means no tracks");
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
            assert_eq!(classify(200, None, &fixture(file)).kind(), kind, "{file}");
        }
    }

    #[test]
    fn error_envelopes_on_matching_http_statuses() {
        assert_eq!(
            classify(429, None, &fixture("error.429.rate-limited.kie.json")).kind(),
            "throttled"
        );
        assert_eq!(
            classify(500, None, &fixture("error.500.server-error.json")).kind(),
            "unavailable"
        );
        assert_eq!(
            classify(401, None, &fixture("error.401.unauthorized.json")).kind(),
            "unauthorized"
        );
        assert_eq!(
            classify(404, None, &fixture("error.404.wrong-path.json")).kind(),
            "unavailable",
            "a wrong path is everyone's problem"
        );
        assert_eq!(
            classify(404, None, br#"{"code":404,"msg":"task not found"}"#).kind(),
            "rejected"
        );
        assert_eq!(
            classify(503, None, &fixture("error.455.maintenance.json")).kind(),
            "unavailable"
        );
        // A 5xx carrying a task-level code is the server failing, not a rejection.
        assert_eq!(
            classify(502, None, &fixture("error.404.wrong-path.json")).kind(),
            "unavailable"
        );
    }

    #[test]
    fn rejection_carries_code_and_message() {
        assert_eq!(
            classify(
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
            classify(429, ra, b""),
            Outcome::Throttled {
                retry_after: ra,
                cause: "HTTP 429 with an empty body".to_owned()
            }
        );
        assert_eq!(classify(503, ra, b"<html>busy</html>").kind(), "throttled");
        assert_eq!(
            classify(503, None, b"<html>busy</html>").kind(),
            "unavailable"
        );
        assert_eq!(classify(500, None, b"").kind(), "unavailable");
        assert_eq!(classify(502, None, b"Bad Gateway").kind(), "unavailable");
        assert_eq!(classify(408, None, b"").kind(), "unavailable");
        assert_eq!(classify(401, None, b"").kind(), "unauthorized");
        assert_eq!(classify(403, None, b"forbidden").kind(), "unauthorized");
        assert_eq!(
            classify(404, None, b"<html>Not Found</html>").kind(),
            "unavailable"
        );
        assert_eq!(classify(400, None, b"").kind(), "unavailable");
        assert_eq!(classify(200, None, b"").kind(), "broken");
        assert_eq!(classify(200, None, b"{\"code\":200,").kind(), "broken");
        assert_eq!(classify(302, None, b"").kind(), "broken");
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
                classify(200, None, body).kind(),
                "broken",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn unknown_status_is_pending_and_unknown_code_is_not_a_task_failure() {
        let o = classify(
            200,
            None,
            br#"{"code":200,"data":{"status":"QUANTUM_SUPERPOSITION"}}"#,
        );
        assert_eq!(status_of(&o), "QUANTUM_SUPERPOSITION");
        assert_eq!(o.kind(), "pending");
        assert_eq!(
            classify(200, None, br#"{"code":999,"msg":"?","data":null}"#).kind(),
            "broken"
        );
    }

    #[test]
    fn retry_after_is_capped_and_parsed() {
        let o = classify(429, Some(Duration::from_secs(10 * 86400)), b"");
        assert_eq!(
            o,
            Outcome::Throttled {
                retry_after: Some(MAX_RETRY_AFTER),
                cause: "HTTP 429 with an empty body".to_owned()
            }
        );
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn urls_lose_their_credentials_in_output() {
        assert_eq!(
            redact_url("https://user:pa55@hooks.internal/cb?x=1"),
            "https://***@hooks.internal/cb?x=1"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:3000/cb"),
            "http://127.0.0.1:3000/cb"
        );
    }

    #[test]
    fn clip_removes_control_characters() {
        assert_eq!(clip("a\nb\rc", 10), "a b c");
        assert_eq!(clip("abcdef", 3), "abc…");
    }

    #[test]
    fn echoed_secrets_are_redacted() {
        let key = "sk-secret-1234";
        assert_eq!(
            redact(b"bad key sk-secret-1234, sk-secret-1234!", key).as_ref(),
            b"bad key [redacted], [redacted]!"
        );
        assert!(matches!(
            redact(b"nothing here", key),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(redact(b"a short one", "short").as_ref(), b"a short one");
        assert_eq!(redact(b"sk-secret-12", key).as_ref(), b"sk-secret-12");
    }

    #[test]
    fn api_key_is_never_printed() {
        let key = ApiKey::new("  sk-secret-123\n").expect("key");
        assert_eq!(key.expose(), "sk-secret-123");
        assert!(!format!("{key:?}").contains("secret"));
        assert!(ApiKey::new(" \n").is_none());
        assert_eq!(
            ApiKey::parse("sk-real-key\n# rotated 2026-01-01\n")
                .expect("first line")
                .expose(),
            "sk-real-key"
        );
        assert!(ApiKey::parse("sk real key").is_err());
        assert!(ApiKey::parse("sk-\u{7}key").is_err());
    }
}
