//! The cover family (cover images, `POST /api/v1/suno/cover/generate`):
//! `GET /api/v1/suno/cover/record-info`, an integer `successFlag` (0 pending, **2 generating**,
//! 1 success, 3 failed), the image URLs under `response.images`, and its one callback
//! (`../shared/api/families.md` §8). The body is the same in both flavours, camelCase `taskId`.

use serde_json::{Value, json};

use super::Family;
use super::common::{
    Class, DEFAULT_FAILURE_CODE, Details, Ending, flag_of, response, terminal_event, url,
};
use crate::events::{NewEvent, Stage};

/// The cover family: cover images for a music task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cover;

/// A cover details answer; the result is the present URLs of `response.images`, in order.
pub type Record = Details<Vec<String>>;

/// The success `msg`.
pub const MSG_SUCCESS: &str = "success";
/// The failure `msg` when the API gives none.
pub const MSG_FAILED: &str = "Cover generation failed";

/// Both flavours list 501 "Cover generation failed" and use it in their failure example.
const GENERATION_FAILED: i64 = 501;

/// The integer flags, their digit strings, and apikley's names. Unlike midi, 2 is still running.
fn class_of(status: &str) -> Class {
    match (flag_of(status), status) {
        (Some(0 | 2), _) | (None, "PENDING") => Class::Pending,
        (Some(1), _) | (None, "SUCCESS") => Class::Success,
        (Some(3), _) | (None, "GENERATE_COVER_FAILED") => Class::Failure(GENERATION_FAILED),
        (None, "CREATE_TASK_FAILED") => Class::Failure(DEFAULT_FAILURE_CODE),
        (None, "CALLBACK_EXCEPTION") => Class::CallbackException,
        _ => Class::Unknown,
    }
}

fn body(task_id: &str, code: i64, msg: &str, images: Value) -> Value {
    json!({"code": code, "msg": msg, "data": {"taskId": task_id, "images": images}})
}

impl Family for Cover {
    type Record = Record;

    fn name(&self) -> &'static str {
        "cover"
    }

    fn endpoint(&self) -> &'static str {
        "api/v1/suno/cover/record-info"
    }

    fn parse(&self, data: &Value) -> Result<Record, String> {
        Details::parse(data, "successFlag", class_of, |obj| {
            match response(obj).and_then(|r| r.get("images")) {
                Some(Value::Array(list)) => list.iter().filter_map(|v| url(Some(v))).collect(),
                _ => Vec::new(),
            }
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
        let images = &record.result;
        match record.ending(reached, !images.is_empty(), MSG_FAILED) {
            None => Vec::new(),
            Some(Ending::Success) => {
                let body = body(task_id, 200, MSG_SUCCESS, json!(images));
                vec![terminal_event(Stage::Complete, 200, &body, images.len())]
            }
            Some(Ending::Failure { code, msg }) => vec![self.error_event(task_id, code, &msg)],
        }
    }

    fn error_event(&self, task_id: &str, code: i64, msg: &str) -> NewEvent {
        terminal_event(
            Stage::Error,
            code,
            &body(task_id, code, msg, Value::Null),
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::families::Flavor;
    use crate::api::families::conformance::{Callback, Conformance, Spec, TASK, classified, json};

    /// The body is the same in both flavours.
    impl Conformance for Cover {
        fn spec(_: Flavor) -> Spec<Cover> {
            Spec {
                dir: "families/cover.",
                endpoint: "api/v1/suno/cover/record-info",
                status_key: "successFlag",
                fixtures: vec![
                    ("record-info.PENDING.json", "pending", "0", 0),
                    ("record-info.GENERATING.json", "pending", "2", 0),
                    ("record-info.SUCCESS.json", "progress", "1", 2),
                    (
                        "record-info.SUCCESS.string-flag.json",
                        "progress",
                        "SUCCESS",
                        2,
                    ),
                    ("record-info.FAILED.json", "progress", "3", 0),
                ],
                results: |r| r.result.len(),
                callbacks: vec![
                    Callback::complete("record-info.SUCCESS.json", "callback.complete.json", 2),
                    Callback::complete(
                        "record-info.SUCCESS.string-flag.json",
                        "callback.complete.json",
                        2,
                    ),
                    Callback::error("record-info.FAILED.json", "callback.error.json", 501),
                ],
                failures: vec![("record-info.FAILED.json", GENERATION_FAILED, MSG_FAILED)],
                defaults: [
                    (
                        r#"{"successFlag":"CREATE_TASK_FAILED","errorCode":null}"#,
                        500,
                        MSG_FAILED,
                    ),
                    // errorCode 200 is no failure code.
                    (
                        r#"{"successFlag":3,"errorCode":200,"errorMessage":""}"#,
                        501,
                        MSG_FAILED,
                    ),
                    (
                        r#"{"successFlag":3,"errorCode":531,"errorMessage":"refunded"}"#,
                        531,
                        "refunded",
                    ),
                    (
                        r#"{"successFlag":"CALLBACK_EXCEPTION","response":{"images":[null,""]}}"#,
                        500,
                        MSG_FAILED,
                    ),
                ]
                .map(|(data, code, msg)| (data.to_owned(), code, msg))
                .to_vec(),
                spellings: Some((
                    |r| r.class,
                    vec![
                        ("0", Class::Pending),
                        ("2", Class::Pending),
                        ("\"2\"", Class::Pending),
                        ("\"PENDING\"", Class::Pending),
                        ("1", Class::Success),
                        ("\"1\"", Class::Success),
                        ("3", Class::Failure(501)),
                        ("\"3\"", Class::Failure(501)),
                        ("\"GENERATE_COVER_FAILED\"", Class::Failure(501)),
                        ("\"CREATE_TASK_FAILED\"", Class::Failure(500)),
                        ("\"CALLBACK_EXCEPTION\"", Class::CallbackException),
                        ("4", Class::Unknown),
                    ],
                )),
                unknown: r#"{"successFlag":4}"#,
                failure_body: Box::new(|task, code, msg| {
                    format!(
                        r#"{{"code":{code},"msg":"{msg}","data":{{"taskId":"{task}","images":null}}}}"#
                    )
                }),
                task_at: "/data/taskId",
                stage_at: None,
                result_at: Some(("/data/images", Value::is_array)),
                one_callback: true,
            }
        }
    }

    #[test]
    fn a_success_says_error_code_200_which_is_no_failure_code() {
        for file in [
            "families/cover.record-info.SUCCESS.json",
            "families/cover.record-info.SUCCESS.string-flag.json",
        ] {
            assert_eq!(classified(&Cover, file).1.error_code, None, "{file}");
        }
    }

    #[test]
    fn only_present_image_urls_are_kept() {
        let r = Cover
            .parse(&json(
                r#"{"successFlag":"CALLBACK_EXCEPTION","response":{"images":["", "https://i/1.png", 5]}}"#,
            ))
            .expect("parses");
        let ev = Cover.events(TASK, None, &r, true);
        assert_eq!(
            ev[0].body,
            format!(
                r#"{{"code":200,"msg":"success","data":{{"taskId":"{TASK}","images":["https://i/1.png"]}}}}"#
            )
        );
    }
}
