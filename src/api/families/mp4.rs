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
    use super::*;
    use crate::api::families::conformance::{Callback, Conformance, Spec};

    impl Conformance for Mp4 {
        fn spec(flavor: Flavor) -> Spec<Mp4> {
            let complete = match flavor {
                Flavor::Sunoapi => "callback.complete.json",
                Flavor::Kie => "callback.complete.kie.json",
            };
            Spec {
                dir: "families/mp4.",
                endpoint: "api/v1/mp4/record-info",
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
                        "record-info.GENERATE_MP4_FAILED.json",
                        "progress",
                        "GENERATE_MP4_FAILED",
                        0,
                    ),
                ],
                results: |r| usize::from(r.result.is_some()),
                callbacks: vec![
                    Callback::complete("record-info.SUCCESS.json", complete, 1),
                    Callback::complete("record-info.SUCCESS.kie.json", complete, 1),
                    Callback::complete("record-info.CALLBACK_EXCEPTION.json", complete, 1),
                    // GENERATE_MP4_FAILED without errorCode or errorMessage: the defaults, 500,
                    // the same body in both flavours.
                    Callback::error("record-info.GENERATE_MP4_FAILED.json", "callback.error.json", 500),
                ],
                failures: vec![(
                    "record-info.CREATE_TASK_FAILED.json",
                    500,
                    "Failed to create the video task",
                )],
                defaults: vec![
                    // A digit-string errorCode is a code.
                    (
                        r#"{"successFlag":"CALLBACK_EXCEPTION","response":{"videoUrl":null},"errorCode":"451"}"#.to_owned(),
                        451,
                        MSG_FAILED,
                    ),
                    (r#"{"successFlag":"GENERATE_MP4_FAILED"}"#.to_owned(), 500, MSG_FAILED),
                ],
                spellings: None,
                unknown: r#"{"successFlag":"RENDERING"}"#,
                failure_body: Box::new(|task, code, msg| {
                    format!(
                        r#"{{"code":{code},"msg":"{msg}","data":{{"task_id":"{task}","video_url":null}}}}"#
                    )
                }),
                task_at: "/data/task_id",
                stage_at: None,
                result_at: None,
                one_callback: true,
            }
        }
    }
}
