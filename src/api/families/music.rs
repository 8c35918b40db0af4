//! The music family: `GET /api/v1/generate/record-info`, its record (status string, the tracks
//! under `response.sunoData`), and the pure mapping from a record to the `text` / `first` /
//! `complete` / `error` callbacks (`design.md`, "Mapping record-info to callback events").
//!
//! [`map_record`] gets the task's last emitted stage and the new answer and returns the events
//! that are now due, in order, each with its exact callback body. It never moves backwards and,
//! when asked, fills in stages the poll did not see (PENDING → SUCCESS gives `text`, `first`,
//! `complete`). Storing them once is the store's job (unique on task + stage).

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use super::Family;
use crate::api::envelope::{failure_code, json_kind, str_of};
use crate::events::{NewEvent, Stage, error_event};

/// What one record-info answer means for a music task.
pub type Outcome = crate::api::Outcome<Record>;

/// The music family (`/api/v1/generate`, extend, covers, add-instrumental, …): four stages,
/// one details endpoint, one body shape for both provider flavours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Music;

impl Family for Music {
    type Record = Record;

    fn name(&self) -> &'static str {
        "music"
    }

    fn endpoint(&self) -> &'static str {
        "api/v1/generate/record-info"
    }

    fn task_id_key(&self) -> &'static str {
        "taskId"
    }

    fn parse(&self, data: &Value) -> Result<Record, String> {
        parse_record(data)
    }

    fn status<'r>(&self, record: &'r Record) -> &'r str {
        record.status.as_str()
    }

    fn is_running(&self, record: &Record) -> bool {
        matches!(record.status, TaskStatus::Pending | TaskStatus::Other(_))
    }

    fn is_known(&self, record: &Record) -> bool {
        !matches!(record.status, TaskStatus::Other(_))
    }

    fn went_backwards(&self, record: &Record, reached: Option<Stage>) -> bool {
        went_backwards(&record.status, reached)
    }

    fn submitted_callback_url(&self, record: &Record) -> Option<String> {
        record.submitted_callback_url()
    }

    fn events(
        &self,
        task_id: &str,
        reached: Option<Stage>,
        record: &Record,
        fill_skipped: bool,
    ) -> Vec<NewEvent> {
        map_record(task_id, reached, record, fill_skipped)
    }

    fn error_event(&self, task_id: &str, code: i64, msg: &str) -> NewEvent {
        error_event(task_id, code, msg)
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
            other => TaskStatus::Other(crate::api::envelope::status_text(other)),
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
    /// `data.errorCode` (number or numeric string), only when it is a documented failure code
    /// ([`crate::api::envelope::FAILURE_CODES`]): never 200, never a saturated `1e30`.
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
    /// Seconds; `null` until the track is done. The number as the API wrote it (`187.32`
    /// stays `187.32`, never a neighbouring `f64`'s spelling), or the number a numeric string
    /// spells. Read from the item itself ([`parse_record`]): serde's way from one `Value` to
    /// another would make `-0` a `0`.
    #[serde(skip)]
    pub duration: Option<Number>,
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

/// A number field that may also arrive as a numeric string. A number is kept as its token; a
/// string that is a JSON number keeps its digits (`"187.32"` becomes `187.32`), and one only
/// Rust reads as a number (`".5"`) becomes the shortest spelling of its correctly rounded
/// `f64`. Nothing no `f64` holds is a duration (`"inf"`, `"1e400"`).
fn lenient_number(v: &Value) -> Option<Number> {
    match v {
        Value::Number(n) => crate::json::fits_f64(n).then(|| n.clone()),
        Value::String(s) => {
            let s = s.trim();
            match s.parse::<Number>() {
                Ok(n) => crate::json::fits_f64(&n).then_some(n),
                Err(_) => s.parse::<f64>().ok().and_then(Number::from_f64),
            }
        }
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
            .map(|item| Track {
                duration: item.get("duration").and_then(lenient_number),
                ..Track::deserialize(item).unwrap_or_default()
            })
            .collect(),
        _ => Vec::new(),
    };
    let error_code = obj.get("errorCode").and_then(failure_code);
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

/// True when a success status (or PENDING) says the task is behind `reached`, the last stage
/// already emitted. Failure and unknown statuses never count as going backwards.
fn went_backwards(status: &TaskStatus, reached: Option<Stage>) -> bool {
    let says = match status {
        TaskStatus::Pending => 0,
        TaskStatus::TextSuccess => 1,
        TaskStatus::FirstSuccess => 2,
        TaskStatus::Success => 3,
        _ => return false,
    };
    let was = match reached {
        None => 0,
        Some(Stage::Text) => 1,
        Some(Stage::First) => 2,
        // `archived` is never a task's stage; were it one, it would come after `complete`.
        Some(Stage::Complete | Stage::Error | Stage::Archived) => 3,
    };
    says < was
}

/// Default `msg` for each stage, as the API's callbacks word them.
pub const MSG_TEXT: &str = "Text generation completed.";
/// See [`MSG_TEXT`].
pub const MSG_FIRST: &str = "First track generated successfully.";
/// See [`MSG_TEXT`].
pub const MSG_COMPLETE: &str = "All generated successfully.";

/// What a status means once it is read: a success stage, or a failure with code and message.
enum Target {
    Reached(Stage),
    Failed { code: i64, msg: String },
}

fn target_of(record: &Record) -> Option<Target> {
    let failed = |default_code: i64, default_msg: &str| Target::Failed {
        code: record.error_code.unwrap_or(default_code),
        msg: record
            .error_message
            .clone()
            .unwrap_or_else(|| default_msg.to_owned()),
    };
    Some(match &record.status {
        TaskStatus::Pending | TaskStatus::Other(_) => return None,
        TaskStatus::TextSuccess => Target::Reached(Stage::Text),
        TaskStatus::FirstSuccess => Target::Reached(Stage::First),
        TaskStatus::Success => Target::Reached(Stage::Complete),
        TaskStatus::CallbackException if record.tracks.iter().any(Track::has_audio) => {
            Target::Reached(Stage::Complete)
        }
        TaskStatus::CallbackException => failed(
            500,
            "The task ended with CALLBACK_EXCEPTION and no audio was produced.",
        ),
        TaskStatus::GenerateAudioFailed => failed(501, "Audio generation failed."),
        TaskStatus::SensitiveWordError => failed(
            400,
            "The prompt or lyrics contain prohibited or sensitive words.",
        ),
        TaskStatus::CreateTaskFailed => failed(500, "The task could not be created."),
    })
}

/// The events due for `task_id`, whose last emitted stage is `reached`, after record-info
/// answered `record`. Empty when nothing new happened (including a status that went backwards).
///
/// With `fill_skipped`, stages between `reached` and the new one are emitted first, so a handler
/// sees `text` and `first` before `complete` even if no poll caught them. A filled-in `first`
/// carries the first finished track, as a real `first` callback does.
pub fn map_record(
    task_id: &str,
    reached: Option<Stage>,
    record: &Record,
    fill_skipped: bool,
) -> Vec<NewEvent> {
    if reached.is_some_and(Stage::is_terminal) {
        return Vec::new();
    }
    let Some(target) = target_of(record) else {
        return Vec::new();
    };
    let target = match target {
        Target::Failed { code, msg } => return vec![error_event(task_id, code, &msg)],
        Target::Reached(stage) => stage,
    };
    let first_due = match reached {
        Some(r) if r >= target => return Vec::new(),
        Some(r) if fill_skipped => next_stage(r),
        None if fill_skipped => Stage::Text,
        _ => target,
    };
    [Stage::Text, Stage::First, Stage::Complete]
        .into_iter()
        .filter(|s| *s >= first_due && *s <= target)
        .map(|stage| {
            let filled = stage != target;
            let tracks: Vec<&Track> = match stage {
                Stage::Text => Vec::new(),
                Stage::First if filled => record
                    .tracks
                    .iter()
                    .filter(|t| t.has_audio())
                    .take(1)
                    .collect(),
                Stage::First => record.tracks.iter().filter(|t| t.has_audio()).collect(),
                _ => record.tracks.iter().collect(),
            };
            let msg = match stage {
                Stage::Text => MSG_TEXT,
                Stage::First => MSG_FIRST,
                _ => MSG_COMPLETE,
            };
            NewEvent {
                stage,
                code: 200,
                body: callback_body(task_id, stage, 200, msg, &tracks),
                tracks: tracks.len(),
                filled,
            }
        })
        .collect()
}

fn next_stage(s: Stage) -> Stage {
    match s {
        Stage::Text => Stage::First,
        _ => Stage::Complete,
    }
}

#[derive(Serialize)]
struct CallbackBody<'a> {
    code: i64,
    msg: &'a str,
    data: CallbackData<'a>,
}

#[derive(Serialize)]
struct CallbackData<'a> {
    #[serde(rename = "callbackType")]
    callback_type: &'static str,
    task_id: &'a str,
    data: Vec<CallbackTrack<'a>>,
}

/// A track in the callback's spelling: snake_case, except `createTime`.
#[derive(Serialize)]
struct CallbackTrack<'a> {
    id: Option<&'a str>,
    audio_url: Option<&'a str>,
    source_audio_url: Option<&'a str>,
    stream_audio_url: Option<&'a str>,
    source_stream_audio_url: Option<&'a str>,
    image_url: Option<&'a str>,
    source_image_url: Option<&'a str>,
    prompt: Option<&'a str>,
    model_name: Option<&'a str>,
    title: Option<&'a str>,
    tags: Option<&'a str>,
    #[serde(rename = "createTime")]
    create_time: Option<String>,
    duration: Option<&'a Number>,
}

impl<'a> From<&'a Track> for CallbackTrack<'a> {
    fn from(t: &'a Track) -> Self {
        CallbackTrack {
            id: t.id.as_deref(),
            audio_url: t.audio_url.as_deref(),
            source_audio_url: t.source_audio_url.as_deref(),
            stream_audio_url: t.stream_audio_url.as_deref(),
            source_stream_audio_url: t.source_stream_audio_url.as_deref(),
            image_url: t.image_url.as_deref(),
            source_image_url: t.source_image_url.as_deref(),
            prompt: t.prompt.as_deref(),
            model_name: t.model_name.as_deref(),
            title: t.title.as_deref(),
            tags: t.tags.as_deref(),
            create_time: t.create_time.as_ref().and_then(callback_create_time),
            duration: t.duration.as_ref(),
        }
    }
}

/// `createTime` as callbacks document it: `"YYYY-MM-DD HH:MM:SS"` (UTC when converted from the
/// epoch milliseconds record-info sends); a string is passed through unchanged.
fn callback_create_time(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .and_then(crate::clock::format_callback_time),
        _ => None,
    }
}

/// Serialises one callback body. Key order and spelling follow the API's callbacks exactly.
pub fn callback_body(
    task_id: &str,
    stage: Stage,
    code: i64,
    msg: &str,
    tracks: &[&Track],
) -> String {
    let body = CallbackBody {
        code,
        msg,
        data: CallbackData {
            callback_type: stage.as_str(),
            task_id,
            data: tracks.iter().map(|t| CallbackTrack::from(*t)).collect(),
        },
    };
    serde_json::to_string(&body).expect("a callback body always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::families::Flavor;
    use crate::api::families::conformance::{
        Callback, Conformance, Spec, classified, fixture, json,
    };
    use crate::api::{Outcome, classify};

    const TASK: &str = "a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10";

    /// The body is the same in both flavours; music's fixtures are the ones at the top of
    /// `tests/fixtures/`.
    impl Conformance for Music {
        fn spec(_: Flavor) -> Spec<Music> {
            Spec {
                dir: "",
                endpoint: "api/v1/generate/record-info",
                status_key: "status",
                fixtures: vec![
                    ("record-info.PENDING.json", "pending", "PENDING", 0),
                    ("record-info.PENDING.empty-sunoData.json", "pending", "PENDING", 0),
                    ("record-info.TEXT_SUCCESS.json", "progress", "TEXT_SUCCESS", 2),
                    ("record-info.FIRST_SUCCESS.json", "progress", "FIRST_SUCCESS", 2),
                    ("record-info.SUCCESS.json", "progress", "SUCCESS", 2),
                    ("record-info.SUCCESS.numbers.json", "progress", "SUCCESS", 2),
                    (
                        "record-info.CALLBACK_EXCEPTION.json",
                        "progress",
                        "CALLBACK_EXCEPTION",
                        2,
                    ),
                    (
                        "record-info.CALLBACK_EXCEPTION.no-audio.json",
                        "progress",
                        "CALLBACK_EXCEPTION",
                        0,
                    ),
                    (
                        "record-info.CREATE_TASK_FAILED.json",
                        "progress",
                        "CREATE_TASK_FAILED",
                        0,
                    ),
                    (
                        "record-info.GENERATE_AUDIO_FAILED.json",
                        "progress",
                        "GENERATE_AUDIO_FAILED",
                        0,
                    ),
                    (
                        "record-info.GENERATE_AUDIO_FAILED.531.json",
                        "progress",
                        "GENERATE_AUDIO_FAILED",
                        0,
                    ),
                    (
                        "record-info.SENSITIVE_WORD_ERROR.json",
                        "progress",
                        "SENSITIVE_WORD_ERROR",
                        0,
                    ),
                ],
                results: |r| r.tracks.len(),
                // The same bytes as each fixture once its whitespace is gone: key order,
                // casing, number and createTime formats all match.
                callbacks: vec![
                    Callback {
                        answer: "record-info.TEXT_SUCCESS.json",
                        reached: None,
                        callback: "callback.text.json",
                        event: (Stage::Text, 200, 0),
                    },
                    // `first` carries the finished track.
                    Callback {
                        answer: "record-info.FIRST_SUCCESS.json",
                        reached: Some(Stage::Text),
                        callback: "callback.first.json",
                        event: (Stage::First, 200, 1),
                    },
                    Callback::complete("record-info.SUCCESS.json", "callback.complete.json", 2).after(Stage::First),
                    // Durations as the API wrote them (design.md invariant 11).
                    Callback::complete("record-info.SUCCESS.numbers.json", "callback.complete.numbers.json", 2).after(Stage::First),
                    // CALLBACK_EXCEPTION with audio completes.
                    Callback::complete("record-info.CALLBACK_EXCEPTION.json", "callback.complete.json", 2).after(Stage::First),
                    Callback::error("record-info.GENERATE_AUDIO_FAILED.531.json", "callback.error.531.json", 531),
                    Callback::error("record-info.SENSITIVE_WORD_ERROR.json", "callback.error.sensitive-word.json", 400),
                ],
                failures: vec![
                    (
                        "record-info.GENERATE_AUDIO_FAILED.json",
                        501,
                        "Generation failed, please try again or contact support",
                    ),
                    (
                        "record-info.GENERATE_AUDIO_FAILED.531.json",
                        531,
                        "Sorry, generation failed due to an issue. Your credits have been refunded. Please try again.",
                    ),
                    (
                        "record-info.SENSITIVE_WORD_ERROR.json",
                        400,
                        "Your lyrics contain words that are not allowed. Please revise and try again.",
                    ),
                    (
                        "record-info.CREATE_TASK_FAILED.json",
                        500,
                        "Failed to create task: upstream rejected the request",
                    ),
                    (
                        "record-info.CALLBACK_EXCEPTION.no-audio.json",
                        500,
                        "Callback request to https://hooks.example.com/suno/callback failed",
                    ),
                ],
                defaults: [
                    ("GENERATE_AUDIO_FAILED", 501, "Audio generation failed."),
                    (
                        "SENSITIVE_WORD_ERROR",
                        400,
                        "The prompt or lyrics contain prohibited or sensitive words.",
                    ),
                    ("CREATE_TASK_FAILED", 500, "The task could not be created."),
                    (
                        "CALLBACK_EXCEPTION",
                        500,
                        "The task ended with CALLBACK_EXCEPTION and no audio was produced.",
                    ),
                ]
                .map(|(status, code, msg)| {
                    let data = format!(
                        r#"{{"status":"{status}","response":{{"sunoData":[]}},"errorCode":200,"errorMessage":" "}}"#
                    );
                    (data, code, msg)
                })
                .to_vec(),
                spellings: None,
                unknown: r#"{"status":"RENDERING_VIDEO","response":{"sunoData":[{"audioUrl":"https://a"}]}}"#,
                failure_body: Box::new(|task, code, msg| {
                    format!(
                        r#"{{"code":{code},"msg":"{msg}","data":{{"callbackType":"error","task_id":"{task}","data":[]}}}}"#
                    )
                }),
                task_at: "/data/task_id",
                stage_at: Some("/data/callbackType"),
                result_at: None,
                one_callback: false,
            }
        }
    }

    fn record(name: &str) -> Record {
        classified(&Music, name).1
    }

    /// The fixture's callback body, as JSON.
    fn expected(name: &str) -> Value {
        json(std::str::from_utf8(&fixture(name)).expect("utf8"))
    }

    fn stages(events: &[NewEvent]) -> Vec<Stage> {
        events.iter().map(|e| e.stage).collect()
    }

    #[test]
    fn a_duration_is_the_number_the_api_wrote() {
        for (given, want) in [
            ("187.32000000000001", Some("187.32000000000001")),
            ("-0", Some("-0")),
            ("1E2", Some("1e+2")),
            (
                "123456789012345678901234567890",
                Some("123456789012345678901234567890"),
            ),
            (r#""187.32""#, Some("187.32")),
            (r#"" 203.640 ""#, Some("203.640")),
            (r#"".5""#, Some("0.5")),
            (r#""inf""#, None),
            (r#""1e400""#, None),
            (r#""abc""#, None),
            ("null", None),
            ("true", None),
        ] {
            let data = json(&format!(
                r#"{{"status":"SUCCESS","response":{{"sunoData":[{{"audioUrl":"https://a","duration":{given}}}]}}}}"#
            ));
            let r = parse_record(&data).expect("parses");
            let got = r.tracks[0].duration.as_ref().map(ToString::to_string);
            assert_eq!(got.as_deref(), want, "{given}");
            let ev = map_record(TASK, Some(Stage::First), &r, true);
            let written = format!(r#""duration":{}}}"#, want.unwrap_or("null"));
            assert!(
                ev[0].body.ends_with(&format!("{written}]}}}}")),
                "{given}: {}",
                ev[0].body
            );
        }
    }

    #[test]
    fn a_jump_from_pending_to_success_fills_text_and_first() {
        let ev = map_record(TASK, None, &record("record-info.SUCCESS.json"), true);
        assert_eq!(stages(&ev), [Stage::Text, Stage::First, Stage::Complete]);
        assert_eq!(json(&ev[0].body), expected("callback.text.json"));
        assert_eq!(json(&ev[1].body), expected("callback.first.json"));
        assert_eq!(json(&ev[2].body), expected("callback.complete.json"));
        assert!(ev[0].filled && ev[1].filled && !ev[2].filled);
    }

    #[test]
    fn without_filling_only_the_new_stage_is_emitted() {
        let ev = map_record(TASK, None, &record("record-info.SUCCESS.json"), false);
        assert_eq!(stages(&ev), [Stage::Complete]);
        let ev = map_record(TASK, None, &record("record-info.FIRST_SUCCESS.json"), false);
        assert_eq!(stages(&ev), [Stage::First]);
    }

    #[test]
    fn text_to_success_fills_only_first() {
        let ev = map_record(
            TASK,
            Some(Stage::Text),
            &record("record-info.SUCCESS.json"),
            true,
        );
        assert_eq!(stages(&ev), [Stage::First, Stage::Complete]);
    }

    #[test]
    fn status_never_moves_backwards_or_repeats() {
        for (reached, file) in [
            (Stage::First, "record-info.PENDING.json"),
            (Stage::First, "record-info.TEXT_SUCCESS.json"),
            (Stage::First, "record-info.FIRST_SUCCESS.json"),
            (Stage::Text, "record-info.TEXT_SUCCESS.json"),
            (Stage::Complete, "record-info.SUCCESS.json"),
            (Stage::Complete, "record-info.GENERATE_AUDIO_FAILED.json"),
            (Stage::Error, "record-info.SUCCESS.json"),
        ] {
            assert!(
                map_record(TASK, Some(reached), &record(file), true).is_empty(),
                "{reached} then {file}"
            );
        }
    }

    #[test]
    fn the_api_s_failure_message_is_passed_on() {
        // callback.error.json shows kie.ai's generic message for code 501; record-info carries
        // its own errorMessage, which we pass through (design: `errorMessage` or default). Only
        // the message differs.
        let ev = map_record(
            TASK,
            None,
            &record("record-info.GENERATE_AUDIO_FAILED.json"),
            true,
        );
        let mut want = expected("callback.error.json");
        want["msg"] = json(r#""Generation failed, please try again or contact support""#);
        assert_eq!(json(&ev[0].body), want);
    }

    #[test]
    fn create_time_strings_pass_through_and_missing_fields_are_null() {
        let mut r = record("record-info.SUCCESS.json");
        r.tracks[0].create_time = Some(json(r#""2025-01-01 00:00:00""#));
        r.tracks[1] = Track::default();
        let ev = map_record(TASK, Some(Stage::First), &r, true);
        let body = json(&ev[0].body);
        assert_eq!(body["data"]["data"][0]["createTime"], "2025-01-01 00:00:00");
        assert_eq!(body["data"]["data"][1]["audio_url"], Value::Null);
        assert_eq!(body["data"]["data"][1]["createTime"], Value::Null);
    }

    #[test]
    fn record_fields_are_read_leniently() {
        let Outcome::Progress(r) = classify(
            &Music,
            200,
            None,
            &fixture("record-info.FIRST_SUCCESS.json"),
        ) else {
            panic!("not progress")
        };
        assert_eq!(r.tracks.len(), 2);
        assert!(r.tracks[0].has_audio());
        assert!(!r.tracks[1].has_audio(), "\"\" audioUrl is absent");
        assert_eq!(r.tracks[1].source_audio_url, None, "null is absent");
        assert_eq!(r.tracks[1].duration, None);
        assert_eq!(
            r.tracks[0].duration,
            Some(Number::from_f64(187.32).expect("finite"))
        );
        assert_eq!(
            r.submitted_callback_url().as_deref(),
            Some("https://hooks.example.com/suno/callback")
        );

        let Outcome::Progress(r) = classify(
            &Music,
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
        let Outcome::Pending(r) = classify(&Music, 200, None, &fixture("record-info.PENDING.json"))
        else {
            panic!("not pending")
        };
        assert!(r.tracks.is_empty(), "response: null means no tracks");
    }

    #[test]
    fn the_error_event_is_the_standard_body() {
        // A music failure's body is the one `events::error_event` builds: the same bytes as a
        // callback body with no tracks.
        assert_eq!(
            error_event(TASK, 501, "x").body,
            callback_body(TASK, Stage::Error, 501, "x", &[])
        );
    }

    #[test]
    fn only_success_statuses_behind_the_stored_stage_go_backwards() {
        assert!(went_backwards(&TaskStatus::Pending, Some(Stage::Text)));
        assert!(went_backwards(&TaskStatus::TextSuccess, Some(Stage::First)));
        assert!(!went_backwards(&TaskStatus::TextSuccess, Some(Stage::Text)));
        assert!(!went_backwards(&TaskStatus::Pending, None));
        assert!(!went_backwards(&TaskStatus::Success, Some(Stage::First)));
        assert!(!went_backwards(
            &TaskStatus::GenerateAudioFailed,
            Some(Stage::First)
        ));
        assert!(!went_backwards(
            &TaskStatus::Other("NEW".into()),
            Some(Stage::First)
        ));
    }
}
