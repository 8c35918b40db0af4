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
    use proptest::prelude::*;

    use super::*;
    use crate::api::families::common::testing::{classified, details, json, minified};

    const TASK: &str = "b52e8f1c3d6a4e9b8f07a1c2d3e4f5a6";

    fn record(name: &str) -> Record {
        classified(&Wav, name).1
    }

    fn events(name: &str) -> Vec<NewEvent> {
        Wav.events(TASK, None, &record(name), true)
    }

    #[test]
    fn every_fixture_classifies_to_its_status() {
        for (file, kind, status, known) in [
            ("wav.record-info.PENDING.json", "pending", "PENDING", true),
            ("wav.record-info.SUCCESS.json", "progress", "SUCCESS", true),
            (
                "wav.record-info.SUCCESS.kie.json",
                "progress",
                "SUCCESS",
                true,
            ),
            (
                "wav.record-info.CALLBACK_EXCEPTION.json",
                "progress",
                "CALLBACK_EXCEPTION",
                true,
            ),
            (
                "wav.record-info.CREATE_TASK_FAILED.json",
                "progress",
                "CREATE_TASK_FAILED",
                true,
            ),
            (
                "wav.record-info.GENERATE_WAV_FAILED.json",
                "progress",
                "GENERATE_WAV_FAILED",
                true,
            ),
        ] {
            let (got, r) = classified(&Wav, file);
            assert_eq!(got, kind, "{file}");
            assert_eq!(Wav.status(&r), status, "{file}");
            assert_eq!(Wav.is_known(&r), known, "{file}");
            assert_eq!(
                Wav.submitted_callback_url(&r).as_deref(),
                Some("https://hooks.example.com/suno/callback")
            );
        }
    }

    #[test]
    fn success_gives_the_complete_callback_byte_for_byte_in_both_flavours() {
        for file in [
            "wav.record-info.SUCCESS.json",
            "wav.record-info.SUCCESS.kie.json",
        ] {
            let ev = events(file);
            assert_eq!(ev.len(), 1, "{file}");
            assert_eq!(
                (ev[0].stage, ev[0].code, ev[0].tracks),
                (Stage::Complete, 200, 1)
            );
            assert_eq!(ev[0].body, minified("wav.callback.complete.json"), "{file}");
        }
    }

    #[test]
    fn a_failure_gives_the_error_callback_byte_for_byte() {
        let ev = events("wav.record-info.GENERATE_WAV_FAILED.json");
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].stage, ev[0].code), (Stage::Error, 451));
        assert_eq!(ev[0].body, minified("wav.callback.error.json"));
    }

    #[test]
    fn every_failure_status_takes_its_message_or_the_default_500() {
        let ev = events("wav.record-info.CREATE_TASK_FAILED.json");
        assert_eq!(
            ev[0].body,
            format!(
                r#"{{"code":500,"msg":"Failed to create the conversion task","data":{{"audioWavUrl":null,"task_id":"{TASK}"}}}}"#
            )
        );
        for status in [
            "CREATE_TASK_FAILED",
            "GENERATE_WAV_FAILED",
            "CALLBACK_EXCEPTION",
        ] {
            let r = Wav
                .parse(&json(&format!(
                    r#"{{"successFlag":"{status}","response":null}}"#
                )))
                .expect("parses");
            let ev = Wav.events(TASK, None, &r, false);
            assert_eq!(
                (ev.len(), ev[0].stage, ev[0].code),
                (1, Stage::Error, 500),
                "{status}"
            );
            assert_eq!(json(&ev[0].body)["msg"], MSG_FAILED, "{status}");
            assert_eq!(json(&ev[0].body)["data"]["audioWavUrl"], Value::Null);
        }
    }

    #[test]
    fn callback_exception_with_the_wav_is_a_success() {
        let ev = events("wav.record-info.CALLBACK_EXCEPTION.json");
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].body, minified("wav.callback.complete.json"));
    }

    #[test]
    fn pending_and_unknown_emit_nothing_and_a_terminal_status_is_final() {
        assert!(events("wav.record-info.PENDING.json").is_empty());
        let r = Wav
            .parse(&json(r#"{"successFlag":"CONVERTING"}"#))
            .expect("parses");
        assert!(Wav.is_running(&r) && !Wav.is_known(&r));
        assert!(Wav.events(TASK, None, &r, true).is_empty());
        for reached in [Stage::Complete, Stage::Error] {
            for file in [
                "wav.record-info.SUCCESS.json",
                "wav.record-info.GENERATE_WAV_FAILED.json",
            ] {
                let r = record(file);
                assert!(Wav.events(TASK, Some(reached), &r, true).is_empty());
                assert!(!Wav.went_backwards(&r, Some(reached)));
                assert!(!Wav.is_running(&r));
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

    #[test]
    fn the_error_event_is_the_failure_body() {
        let ev = Wav.error_event(TASK, 408, "timed out");
        assert_eq!((ev.stage, ev.code, ev.tracks), (Stage::Error, 408, 0));
        assert_eq!(
            ev.body,
            format!(
                r#"{{"code":408,"msg":"timed out","data":{{"audioWavUrl":null,"task_id":"{TASK}"}}}}"#
            )
        );
        assert_eq!(
            (Wav.name(), Wav.endpoint(), Wav.task_id_key()),
            ("wav", "api/v1/wav/record-info", "taskId")
        );
    }

    proptest! {
        #[test]
        fn parse_and_events_never_panic(
            data in details("successFlag", ["PENDING", "SUCCESS", "CREATE_TASK_FAILED",
                "GENERATE_WAV_FAILED", "CALLBACK_EXCEPTION"].map(Value::from).to_vec()),
            reached in prop::option::of(prop::sample::select(Stage::ALL.to_vec())),
        ) {
            let Ok(r) = Wav.parse(&data) else { return Ok(()) };
            let ev = Wav.events(TASK, reached, &r, true);
            prop_assert!(ev.len() <= 1);
            if reached.is_some_and(Stage::is_terminal) || Wav.is_running(&r) {
                prop_assert!(ev.is_empty());
            } else {
                prop_assert_eq!(ev.len(), 1);
            }
            for e in ev {
                let body: Value = serde_json::from_str(&e.body).expect("the body is JSON");
                prop_assert_eq!(&body["code"], &Value::from(e.code));
                prop_assert_eq!(&body["data"]["task_id"], TASK);
            }
        }
    }
}
