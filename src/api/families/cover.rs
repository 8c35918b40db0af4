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
    use proptest::prelude::*;

    use super::*;
    use crate::api::families::common::testing::{classified, details, json, minified};

    const TASK: &str = "21d0b7e35c9a4f1e8b6a2c4d6e8f0a13";

    fn record(name: &str) -> Record {
        classified(&Cover, name).1
    }

    fn events(name: &str) -> Vec<NewEvent> {
        Cover.events(TASK, None, &record(name), true)
    }

    fn parsed(data: &str) -> Record {
        Cover.parse(&json(data)).expect("parses")
    }

    fn failure_body(code: i64, msg: &str) -> String {
        format!(r#"{{"code":{code},"msg":"{msg}","data":{{"taskId":"{TASK}","images":null}}}}"#)
    }

    #[test]
    fn every_fixture_classifies_to_its_status() {
        for (file, kind, status) in [
            ("cover.record-info.PENDING.json", "pending", "0"),
            ("cover.record-info.GENERATING.json", "pending", "2"),
            ("cover.record-info.SUCCESS.json", "progress", "1"),
            (
                "cover.record-info.SUCCESS.string-flag.json",
                "progress",
                "SUCCESS",
            ),
            ("cover.record-info.FAILED.json", "progress", "3"),
        ] {
            let (got, r) = classified(&Cover, file);
            assert_eq!(got, kind, "{file}");
            assert_eq!(Cover.status(&r), status, "{file}");
            assert!(Cover.is_known(&r), "{file}");
            assert_eq!(
                Cover.submitted_callback_url(&r).as_deref(),
                Some("https://hooks.example.com/suno/callback")
            );
        }
    }

    #[test]
    fn success_gives_the_complete_callback_byte_for_byte() {
        // Both carry `errorCode: 200`, which is not a failure code.
        for file in [
            "cover.record-info.SUCCESS.json",
            "cover.record-info.SUCCESS.string-flag.json",
        ] {
            let r = record(file);
            assert_eq!(r.error_code, None, "{file}");
            let ev = Cover.events(TASK, None, &r, true);
            assert_eq!(ev.len(), 1, "{file}");
            assert_eq!(
                (ev[0].stage, ev[0].code, ev[0].tracks),
                (Stage::Complete, 200, 2)
            );
            assert_eq!(
                ev[0].body,
                minified("cover.callback.complete.json"),
                "{file}"
            );
        }
    }

    #[test]
    fn a_failure_gives_the_error_callback_byte_for_byte() {
        let ev = events("cover.record-info.FAILED.json");
        assert_eq!((ev.len(), ev[0].stage, ev[0].code), (1, Stage::Error, 501));
        assert_eq!(ev[0].body, minified("cover.callback.error.json"));
    }

    #[test]
    fn every_flag_spelling_reads_as_documented() {
        for (flag, class) in [
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
        ] {
            assert_eq!(
                parsed(&format!(r#"{{"successFlag":{flag}}}"#)).class,
                class,
                "{flag}"
            );
        }
        let r = parsed(r#"{"successFlag":4}"#);
        assert!(Cover.is_running(&r) && !Cover.is_known(&r));
        assert!(Cover.events(TASK, None, &r, true).is_empty());
        assert!(events("cover.record-info.PENDING.json").is_empty());
        assert!(events("cover.record-info.GENERATING.json").is_empty());
    }

    #[test]
    fn failure_codes_and_messages() {
        for (data, want) in [
            (
                r#"{"successFlag":"CREATE_TASK_FAILED","errorCode":null}"#,
                failure_body(500, MSG_FAILED),
            ),
            (
                r#"{"successFlag":3,"errorCode":200,"errorMessage":""}"#,
                failure_body(501, MSG_FAILED),
            ),
            (
                r#"{"successFlag":3,"errorCode":531,"errorMessage":"refunded"}"#,
                failure_body(531, "refunded"),
            ),
            (
                r#"{"successFlag":"CALLBACK_EXCEPTION","response":{"images":[null,""]}}"#,
                failure_body(500, MSG_FAILED),
            ),
        ] {
            let ev = Cover.events(TASK, None, &parsed(data), true);
            assert_eq!(ev[0].body, want, "{data}");
        }
        let ev = Cover.events(
            TASK,
            None,
            &parsed(r#"{"successFlag":"CALLBACK_EXCEPTION","response":{"images":["", "https://i/1.png", 5]}}"#),
            true,
        );
        assert_eq!(
            ev[0].body,
            format!(
                r#"{{"code":200,"msg":"success","data":{{"taskId":"{TASK}","images":["https://i/1.png"]}}}}"#
            )
        );
    }

    #[test]
    fn a_terminal_status_is_final() {
        for reached in [Stage::Complete, Stage::Error] {
            for file in [
                "cover.record-info.SUCCESS.json",
                "cover.record-info.FAILED.json",
            ] {
                let r = record(file);
                assert!(Cover.events(TASK, Some(reached), &r, true).is_empty());
                assert!(!Cover.went_backwards(&r, Some(reached)));
            }
        }
    }

    #[test]
    fn the_error_event_is_the_failure_body() {
        let ev = Cover.error_event(TASK, 408, "timed out");
        assert_eq!((ev.stage, ev.code), (Stage::Error, 408));
        assert_eq!(ev.body, failure_body(408, "timed out"));
        assert_eq!(
            (Cover.name(), Cover.endpoint(), Cover.task_id_key()),
            ("cover", "api/v1/suno/cover/record-info", "taskId")
        );
    }

    proptest! {
        #[test]
        fn parse_and_events_never_panic(
            data in details("successFlag", vec![Value::from(0), Value::from(1), Value::from(2),
                Value::from(3), "3".into(), "SUCCESS".into(), "CALLBACK_EXCEPTION".into()]),
            reached in prop::option::of(prop::sample::select(Stage::ALL.to_vec())),
        ) {
            let Ok(r) = Cover.parse(&data) else { return Ok(()) };
            let ev = Cover.events(TASK, reached, &r, true);
            if reached.is_some_and(Stage::is_terminal) || Cover.is_running(&r) {
                prop_assert!(ev.is_empty());
            } else {
                prop_assert_eq!(ev.len(), 1);
            }
            for e in ev {
                let body: Value = serde_json::from_str(&e.body).expect("the body is JSON");
                prop_assert_eq!(&body["data"]["taskId"], TASK);
                prop_assert_eq!(e.stage == Stage::Complete, body["data"]["images"].is_array());
            }
        }
    }
}
