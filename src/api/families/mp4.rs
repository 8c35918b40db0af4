//! The mp4 family (`POST /api/v1/mp4/generate`): `GET /api/v1/mp4/record-info`, a string
//! `successFlag`, `response.videoUrl`, and its one callback (`../shared/api/families.md` §7).
//! The flavours word the success `msg` differently ("MP4 generated successfully." / "success").

use serde_json::{Value, json};

use super::common::{Class, DEFAULT_FAILURE_CODE, Details, Ending, response, terminal_event, url};
use super::{Family, Flavor};
use crate::events::{NewEvent, Stage};

/// The mp4 family (a music video of a track), in one provider flavour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mp4(pub Flavor);

/// An mp4 details answer; the result is `response.videoUrl`, when present.
pub type Record = Details<Option<String>>;

/// The failure `msg` when the API gives none.
pub const MSG_FAILED: &str = "Music video generation failed";

fn class_of(status: &str) -> Class {
    match status {
        "PENDING" => Class::Pending,
        "SUCCESS" => Class::Success,
        "CREATE_TASK_FAILED" | "GENERATE_MP4_FAILED" => Class::Failure(DEFAULT_FAILURE_CODE),
        // kie's page omits it; read alike in both flavours, as every string family does.
        "CALLBACK_EXCEPTION" => Class::CallbackException,
        _ => Class::Unknown,
    }
}

fn body(task_id: &str, code: i64, msg: &str, video: Option<&str>) -> Value {
    json!({"code": code, "msg": msg, "data": {"task_id": task_id, "video_url": video}})
}

impl Mp4 {
    /// The success `msg` of the flavour.
    pub fn success_msg(self) -> &'static str {
        match self.0 {
            Flavor::Sunoapi => "MP4 generated successfully.",
            Flavor::Kie => "success",
        }
    }
}

impl Family for Mp4 {
    type Record = Record;

    fn name(&self) -> &'static str {
        "mp4"
    }

    fn endpoint(&self) -> &'static str {
        "api/v1/mp4/record-info"
    }

    fn parse(&self, data: &Value) -> Result<Record, String> {
        Details::parse(data, "successFlag", class_of, |obj| {
            url(response(obj).and_then(|r| r.get("videoUrl")))
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
        let video = record.result.as_deref();
        match record.ending(reached, video.is_some(), MSG_FAILED) {
            None => Vec::new(),
            Some(Ending::Success) => vec![terminal_event(
                Stage::Complete,
                200,
                &body(task_id, 200, self.success_msg(), video),
                usize::from(video.is_some()),
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

    const TASK: &str = "c0ffee12d34e4f56a789b0c1d2e3f405";
    const SUNOAPI: Mp4 = Mp4(Flavor::Sunoapi);
    const KIE: Mp4 = Mp4(Flavor::Kie);

    fn record(name: &str) -> Record {
        classified(&SUNOAPI, name).1
    }

    fn failure_body(code: i64, msg: &str) -> String {
        format!(r#"{{"code":{code},"msg":"{msg}","data":{{"task_id":"{TASK}","video_url":null}}}}"#)
    }

    #[test]
    fn every_fixture_classifies_to_its_status() {
        for (file, kind, status) in [
            ("mp4.record-info.PENDING.json", "pending", "PENDING"),
            ("mp4.record-info.SUCCESS.json", "progress", "SUCCESS"),
            ("mp4.record-info.SUCCESS.kie.json", "progress", "SUCCESS"),
            (
                "mp4.record-info.CALLBACK_EXCEPTION.json",
                "progress",
                "CALLBACK_EXCEPTION",
            ),
            (
                "mp4.record-info.CREATE_TASK_FAILED.json",
                "progress",
                "CREATE_TASK_FAILED",
            ),
            (
                "mp4.record-info.GENERATE_MP4_FAILED.json",
                "progress",
                "GENERATE_MP4_FAILED",
            ),
        ] {
            for family in [SUNOAPI, KIE] {
                let (got, r) = classified(&family, file);
                assert_eq!(got, kind, "{file}");
                assert_eq!(family.status(&r), status, "{file}");
                assert!(family.is_known(&r), "{file}");
                assert_eq!(
                    family.submitted_callback_url(&r).as_deref(),
                    Some("https://hooks.example.com/suno/callback")
                );
            }
        }
    }

    #[test]
    fn success_gives_each_flavours_complete_callback_byte_for_byte() {
        for file in [
            "mp4.record-info.SUCCESS.json",
            "mp4.record-info.SUCCESS.kie.json",
            "mp4.record-info.CALLBACK_EXCEPTION.json",
        ] {
            for (family, want) in [
                (SUNOAPI, "mp4.callback.complete.json"),
                (KIE, "mp4.callback.complete.kie.json"),
            ] {
                let ev = family.events(TASK, None, &record(file), true);
                assert_eq!(ev.len(), 1, "{file}");
                assert_eq!(
                    (ev[0].stage, ev[0].code, ev[0].tracks),
                    (Stage::Complete, 200, 1)
                );
                assert_eq!(ev[0].body, minified(want), "{file} {family:?}");
            }
        }
    }

    #[test]
    fn a_failure_gives_the_error_callback_byte_for_byte() {
        // GENERATE_MP4_FAILED without errorCode or errorMessage: the defaults, 500.
        for family in [SUNOAPI, KIE] {
            let ev = family.events(
                TASK,
                None,
                &record("mp4.record-info.GENERATE_MP4_FAILED.json"),
                true,
            );
            assert_eq!((ev.len(), ev[0].stage, ev[0].code), (1, Stage::Error, 500));
            assert_eq!(ev[0].body, minified("mp4.callback.error.json"));
        }
        let ev = SUNOAPI.events(
            TASK,
            None,
            &record("mp4.record-info.CREATE_TASK_FAILED.json"),
            true,
        );
        assert_eq!(
            ev[0].body,
            failure_body(500, "Failed to create the video task")
        );
        let r = SUNOAPI
            .parse(&json(
                r#"{"successFlag":"CALLBACK_EXCEPTION","response":{"videoUrl":null},"errorCode":"451"}"#,
            ))
            .expect("parses");
        let ev = SUNOAPI.events(TASK, None, &r, true);
        assert_eq!(ev[0].body, failure_body(451, MSG_FAILED));
    }

    #[test]
    fn pending_and_unknown_emit_nothing_and_a_terminal_status_is_final() {
        assert!(
            SUNOAPI
                .events(TASK, None, &record("mp4.record-info.PENDING.json"), true)
                .is_empty()
        );
        let r = KIE
            .parse(&json(r#"{"successFlag":"RENDERING"}"#))
            .expect("parses");
        assert!(KIE.is_running(&r) && !KIE.is_known(&r));
        assert!(KIE.events(TASK, None, &r, true).is_empty());
        for reached in [Stage::Complete, Stage::Error] {
            let r = record("mp4.record-info.SUCCESS.json");
            assert!(SUNOAPI.events(TASK, Some(reached), &r, true).is_empty());
            assert!(!SUNOAPI.went_backwards(&r, Some(reached)));
        }
    }

    #[test]
    fn the_error_event_is_the_failure_body() {
        let ev = KIE.error_event(TASK, 408, "timed out");
        assert_eq!((ev.stage, ev.code), (Stage::Error, 408));
        assert_eq!(ev.body, failure_body(408, "timed out"));
        assert_eq!(
            (KIE.name(), KIE.endpoint(), KIE.task_id_key()),
            ("mp4", "api/v1/mp4/record-info", "taskId")
        );
    }

    proptest! {
        #[test]
        fn parse_and_events_never_panic(
            data in details("successFlag", ["PENDING", "SUCCESS", "CREATE_TASK_FAILED",
                "GENERATE_MP4_FAILED", "CALLBACK_EXCEPTION"].map(Value::from).to_vec()),
            reached in prop::option::of(prop::sample::select(Stage::ALL.to_vec())),
            kie in any::<bool>(),
        ) {
            let family = if kie { KIE } else { SUNOAPI };
            let Ok(r) = family.parse(&data) else { return Ok(()) };
            let ev = family.events(TASK, reached, &r, true);
            if reached.is_some_and(Stage::is_terminal) || family.is_running(&r) {
                prop_assert!(ev.is_empty());
            } else {
                prop_assert_eq!(ev.len(), 1);
            }
            for e in ev {
                let body: Value = serde_json::from_str(&e.body).expect("the body is JSON");
                prop_assert_eq!(&body["data"]["task_id"], TASK);
            }
        }
    }
}
