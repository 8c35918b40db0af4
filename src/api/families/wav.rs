//! The wav family (`POST /api/v1/wav/generate`): `GET /api/v1/wav/record-info`, a string
//! `successFlag`, `response.audioWavUrl`, and its one callback (`../shared/api/families.md` §4).
//! The body is the same in both flavours, `audioWavUrl` camelCase beside snake_case `task_id`.

use serde_json::{Value, json};

use super::Family;
use super::common::{Class, DEFAULT_FAILURE_CODE, Details, Ending, response, terminal_event, url};
use crate::events::{NewEvent, Stage};

/// The wav family: one MP3 converted to WAV.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wav;

/// A wav details answer; the result is `response.audioWavUrl`, when present.
pub type Record = Details<Option<String>>;

/// The success `msg`.
pub const MSG_SUCCESS: &str = "success";
/// The failure `msg` when the API gives none.
pub const MSG_FAILED: &str = "WAV format conversion failed";

fn class_of(status: &str) -> Class {
    match status {
        "PENDING" => Class::Pending,
        "SUCCESS" => Class::Success,
        "CREATE_TASK_FAILED" | "GENERATE_WAV_FAILED" => Class::Failure(DEFAULT_FAILURE_CODE),
        "CALLBACK_EXCEPTION" => Class::CallbackException,
        _ => Class::Unknown,
    }
}

fn body(task_id: &str, code: i64, msg: &str, wav: Option<&str>) -> Value {
    json!({"code": code, "msg": msg, "data": {"audioWavUrl": wav, "task_id": task_id}})
}

impl Family for Wav {
    type Record = Record;

    fn name(&self) -> &'static str {
        "wav"
    }

    fn endpoint(&self) -> &'static str {
        "api/v1/wav/record-info"
    }

    fn parse(&self, data: &Value) -> Result<Record, String> {
        Details::parse(data, "successFlag", class_of, |obj| {
            url(response(obj).and_then(|r| r.get("audioWavUrl")))
        })
    }

    super::common::details_methods!();

    fn events(
        &self,
        task_id: &str,
        reached: Option<Stage>,
        record: &Record,
        _fill_skipped: bool,
    ) -> Vec<NewEvent> {
        let wav = record.result.as_deref();
        match record.ending(reached, wav.is_some(), MSG_FAILED) {
            None => Vec::new(),
            Some(Ending::Success) => vec![terminal_event(
                Stage::Complete,
                200,
                &body(task_id, 200, MSG_SUCCESS, wav),
                usize::from(wav.is_some()),
            )],
            Some(Ending::Failure { code, msg }) => vec![self.error_event(task_id, code, &msg)],
        }
    }

    fn error_event(&self, task_id: &str, code: i64, msg: &str) -> NewEvent {
        terminal_event(Stage::Error, code, &body(task_id, code, msg, None), 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::families::Flavor;
    use crate::api::families::conformance::{Callback, Conformance, Spec, TASK, json};

    /// The body is the same in both flavours.
    impl Conformance for Wav {
        fn spec(_: Flavor) -> Spec<Wav> {
            Spec {
                dir: "families/wav.",
                endpoint: "api/v1/wav/record-info",
                status_key: "successFlag",
                fixtures: vec![
                    ("record-info.PENDING.json", "pending", "PENDING", 0),
                    ("record-info.SUCCESS.json", "progress", "SUCCESS", 1),
                    ("record-info.SUCCESS.kie.json", "progress", "SUCCESS", 1),
                    (
                        "record-info.CALLBACK_EXCEPTION.json",
                        "progress",
                        "CALLBACK_EXCEPTION",
                        1,
                    ),
                    (
                        "record-info.CREATE_TASK_FAILED.json",
                        "progress",
                        "CREATE_TASK_FAILED",
                        0,
                    ),
                    (
                        "record-info.GENERATE_WAV_FAILED.json",
                        "progress",
                        "GENERATE_WAV_FAILED",
                        0,
                    ),
                ],
                results: |r| usize::from(r.result.is_some()),
                callbacks: vec![
                    Callback::complete("record-info.SUCCESS.json", "callback.complete.json", 1),
                    Callback::complete("record-info.SUCCESS.kie.json", "callback.complete.json", 1),
                    // CALLBACK_EXCEPTION with the wav is a success.
                    Callback::complete(
                        "record-info.CALLBACK_EXCEPTION.json",
                        "callback.complete.json",
                        1,
                    ),
                    // errorCode 451 (a documented WAV code) is passed through.
                    Callback::error(
                        "record-info.GENERATE_WAV_FAILED.json",
                        "callback.error.json",
                        451,
                    ),
                ],
                failures: vec![(
                    "record-info.CREATE_TASK_FAILED.json",
                    500,
                    "Failed to create the conversion task",
                )],
                defaults: [
                    "CREATE_TASK_FAILED",
                    "GENERATE_WAV_FAILED",
                    "CALLBACK_EXCEPTION",
                ]
                .map(|status| {
                    let data = format!(r#"{{"successFlag":"{status}","response":null}}"#);
                    (data, 500, MSG_FAILED)
                })
                .to_vec(),
                spellings: None,
                unknown: r#"{"successFlag":"CONVERTING"}"#,
                failure_body: Box::new(|task, code, msg| {
                    format!(
                        r#"{{"code":{code},"msg":"{msg}","data":{{"audioWavUrl":null,"task_id":"{task}"}}}}"#
                    )
                }),
                task_at: "/data/task_id",
                stage_at: None,
                result_at: None,
                one_callback: true,
            }
        }
    }

    #[test]
    fn a_success_without_its_url_still_completes_with_null() {
        let r = Wav
            .parse(&json(
                r#"{"successFlag":"SUCCESS","response":{"audioWavUrl":" "}}"#,
            ))
            .expect("parses");
        let ev = Wav.events(TASK, None, &r, true);
        assert_eq!((ev[0].stage, ev[0].tracks), (Stage::Complete, 0));
        assert_eq!(
            ev[0].body,
            format!(
                r#"{{"code":200,"msg":"success","data":{{"audioWavUrl":null,"task_id":"{TASK}"}}}}"#
            )
        );
    }
}
