//! The pure mapping from a record-info answer to the callback events the API would have POSTed
//! (`design.md`, "Mapping record-info to callback events").
//!
//! [`map_record`] gets the task's last emitted stage and the new answer and returns the events
//! that are now due, in order, each with its exact callback body. It never moves backwards and,
//! when asked, fills in stages the poll did not see (PENDING → SUCCESS gives `text`, `first`,
//! `complete`). Storing them once is the store's job (unique on task + stage).

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::api::{Record, TaskStatus, Track};

/// A callback stage. The order of the variants is the order a task goes through them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Text (lyrics) generated.
    Text,
    /// First track generated.
    First,
    /// All tracks generated. Terminal.
    Complete,
    /// The task failed. Terminal.
    Error,
}

impl Stage {
    /// All stages, in order.
    pub const ALL: [Stage; 4] = [Stage::Text, Stage::First, Stage::Complete, Stage::Error];

    /// The callback's `callbackType` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Text => "text",
            Stage::First => "first",
            Stage::Complete => "complete",
            Stage::Error => "error",
        }
    }

    /// Parses a `callbackType` spelling.
    pub fn parse(s: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True for the stages after which a task is never polled again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Complete | Stage::Error)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event ready to be stored: its stage, callback `code`, and exact JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Which stage.
    pub stage: Stage,
    /// The callback's `code`.
    pub code: i64,
    /// The callback body, serialised once; these bytes are stored and forwarded as they are.
    pub body: String,
    /// How many tracks `data.data` carries.
    pub tracks: usize,
    /// True when this stage was not seen by a poll but filled in before a later one.
    pub filled: bool,
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

/// An `error` event with the given callback code and message and no tracks. Used for failure
/// statuses, for a task the API keeps rejecting, and for a task past its deadline.
pub fn error_event(task_id: &str, code: i64, msg: &str) -> NewEvent {
    NewEvent {
        stage: Stage::Error,
        code,
        body: callback_body(task_id, Stage::Error, code, msg, &[]),
        tracks: 0,
        filled: false,
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
    duration: Option<f64>,
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
            duration: t.duration,
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
    use crate::api::{Outcome, classify};

    const TASK: &str = "a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10";

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn record(name: &str) -> Record {
        match classify(200, None, &fixture(name)) {
            Outcome::Progress(r) | Outcome::Pending(r) => r,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn json(s: &str) -> Value {
        serde_json::from_str(s).expect("valid json")
    }

    /// The fixture's callback body, minified the way we serialise.
    fn expected(name: &str) -> Value {
        json(&String::from_utf8(fixture(name)).expect("utf8"))
    }

    /// The fixture with whitespace outside strings removed.
    fn minified(name: &str) -> String {
        let text = String::from_utf8(fixture(name)).expect("utf8");
        let (mut out, mut in_string, mut escaped) = (String::new(), false, false);
        for c in text.chars() {
            if in_string {
                out.push(c);
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_string = false,
                    _ => {}
                }
            } else if !c.is_whitespace() {
                in_string = c == '"';
                out.push(c);
            }
        }
        out
    }

    fn stages(events: &[NewEvent]) -> Vec<Stage> {
        events.iter().map(|e| e.stage).collect()
    }

    #[test]
    fn text_success_gives_the_text_callback() {
        let ev = map_record(TASK, None, &record("record-info.TEXT_SUCCESS.json"), true);
        assert_eq!(stages(&ev), [Stage::Text]);
        assert_eq!(ev[0].body, minified("callback.text.json"));
        assert_eq!(ev[0].tracks, 0);
    }

    #[test]
    fn first_success_gives_the_first_callback_with_the_finished_track() {
        let ev = map_record(
            TASK,
            Some(Stage::Text),
            &record("record-info.FIRST_SUCCESS.json"),
            true,
        );
        assert_eq!(stages(&ev), [Stage::First]);
        assert_eq!(ev[0].body, minified("callback.first.json"));
        assert_eq!(ev[0].tracks, 1);
    }

    #[test]
    fn success_gives_the_complete_callback_byte_for_byte() {
        let ev = map_record(
            TASK,
            Some(Stage::First),
            &record("record-info.SUCCESS.json"),
            true,
        );
        assert_eq!(stages(&ev), [Stage::Complete]);
        // The same bytes as the fixture once its whitespace is gone: key order, casing, number
        // and createTime formats all match.
        assert_eq!(ev[0].body, minified("callback.complete.json"));
        assert_eq!(ev[0].tracks, 2);
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
    fn pending_and_unknown_statuses_emit_nothing() {
        assert!(map_record(TASK, None, &record("record-info.PENDING.json"), true).is_empty());
        assert!(
            map_record(
                TASK,
                None,
                &record("record-info.PENDING.empty-sunoData.json"),
                true
            )
            .is_empty()
        );
        let mut r = record("record-info.SUCCESS.json");
        r.status = TaskStatus::Other("RENDERING_VIDEO".to_owned());
        assert!(map_record(TASK, None, &r, true).is_empty());
    }

    #[test]
    fn failures_give_one_error_with_the_right_code() {
        let cases = [
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
        ];
        for (file, code, msg) in cases {
            for reached in [None, Some(Stage::Text), Some(Stage::First)] {
                let ev = map_record(TASK, reached, &record(file), true);
                assert_eq!(stages(&ev), [Stage::Error], "{file}");
                assert_eq!(ev[0].code, code, "{file}");
                let body = json(&ev[0].body);
                assert_eq!(body["msg"], msg, "{file}");
                assert_eq!(body["data"]["callbackType"], "error");
                assert_eq!(body["data"]["task_id"], TASK);
                assert_eq!(body["data"]["data"], json("[]"));
            }
        }
    }

    #[test]
    fn error_fixtures_match_where_the_message_agrees() {
        let ev = map_record(
            TASK,
            None,
            &record("record-info.GENERATE_AUDIO_FAILED.531.json"),
            true,
        );
        assert_eq!(json(&ev[0].body), expected("callback.error.531.json"));
        let ev = map_record(
            TASK,
            None,
            &record("record-info.SENSITIVE_WORD_ERROR.json"),
            true,
        );
        assert_eq!(
            json(&ev[0].body),
            expected("callback.error.sensitive-word.json")
        );
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
    fn default_codes_and_messages_when_the_api_gives_none() {
        let mut r = record("record-info.GENERATE_AUDIO_FAILED.json");
        r.error_code = None;
        r.error_message = None;
        let ev = map_record(TASK, None, &r, true);
        assert_eq!(ev[0].code, 501);
        assert_eq!(json(&ev[0].body)["msg"], "Audio generation failed.");
        r.status = TaskStatus::SensitiveWordError;
        assert_eq!(map_record(TASK, None, &r, true)[0].code, 400);
        r.status = TaskStatus::CreateTaskFailed;
        assert_eq!(map_record(TASK, None, &r, true)[0].code, 500);
        r.status = TaskStatus::CallbackException;
        assert_eq!(map_record(TASK, None, &r, true)[0].code, 500);
    }

    #[test]
    fn callback_exception_with_audio_completes() {
        let ev = map_record(
            TASK,
            Some(Stage::First),
            &record("record-info.CALLBACK_EXCEPTION.json"),
            true,
        );
        assert_eq!(stages(&ev), [Stage::Complete]);
        assert_eq!(json(&ev[0].body), expected("callback.complete.json"));
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
    fn stage_names_round_trip() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
        }
        assert_eq!(Stage::parse("done"), None);
        assert!(Stage::Text < Stage::First && Stage::First < Stage::Complete);
    }
}
