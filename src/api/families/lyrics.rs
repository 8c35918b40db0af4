//! The lyrics family (`POST /api/v1/lyrics`): `GET /api/v1/lyrics/record-info`, a `status`
//! string, the lyrics under `response.lyricsData` (or `response.data`), and its one callback
//! (`../shared/api/families.md` §3). The flavours spell the task id (`taskId` / `task_id`) and
//! each item's message (`errorMessage` / `error_message`) differently.

use serde_json::{Map, Value, json};

use super::common::{Class, DEFAULT_FAILURE_CODE, Details, Ending, response, terminal_event};
use super::{Family, Flavor};
use crate::events::{NewEvent, Stage};

/// The lyrics family, in one provider flavour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lyrics(pub Flavor);

/// One generated lyrics text, as the callback carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The lyrics (`""` when missing).
    pub text: String,
    /// The title (`""` when missing).
    pub title: String,
    /// `complete` or `failed` (`"complete"` when missing).
    pub status: String,
    /// The item's `errorMessage` (`""` when missing).
    pub error_message: String,
}

/// A lyrics details answer; the result is its items, in order.
pub type Record = Details<Vec<Item>>;

/// The success `msg`.
pub const MSG_SUCCESS: &str = "All generated successfully.";
/// The failure `msg` when the API gives none.
pub const MSG_FAILED: &str = "Lyrics generation failed";

fn class_of(status: &str) -> Class {
    match status {
        "PENDING" => Class::Pending,
        "SUCCESS" => Class::Success,
        "CREATE_TASK_FAILED" | "GENERATE_LYRICS_FAILED" => Class::Failure(DEFAULT_FAILURE_CODE),
        // 400 is the content-violation code in every lyrics code list.
        "SENSITIVE_WORD_ERROR" => Class::Failure(400),
        "CALLBACK_EXCEPTION" => Class::CallbackException,
        _ => Class::Unknown,
    }
}

/// The items: `response.lyricsData` when it is a list (current docs), else `response.data`
/// (older docs), in both flavours. Items that are not objects are skipped.
fn items(obj: &Map<String, Value>) -> Vec<Item> {
    let Some(response) = response(obj) else {
        return Vec::new();
    };
    let list = match response.get("lyricsData") {
        Some(Value::Array(list)) => list,
        _ => match response.get("data") {
            Some(Value::Array(list)) => list,
            _ => return Vec::new(),
        },
    };
    let text = |item: &Map<String, Value>, key: &str, default: &str| {
        item.get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_owned()
    };
    list.iter()
        .filter_map(Value::as_object)
        .map(|item| Item {
            text: text(item, "text", ""),
            title: text(item, "title", ""),
            status: text(item, "status", "complete"),
            error_message: text(item, "errorMessage", ""),
        })
        .collect()
}

impl Lyrics {
    /// The key of the task id in the callback's `data`.
    fn task_id_field(self) -> &'static str {
        match self.0 {
            Flavor::Sunoapi => "taskId",
            Flavor::Kie => "task_id",
        }
    }

    fn body(self, task_id: &str, code: i64, msg: &str, stage: Stage, items: Value) -> Value {
        let mut data = Map::new();
        data.insert("callbackType".into(), stage.as_str().into());
        data.insert(self.task_id_field().into(), task_id.into());
        data.insert("data".into(), items);
        json!({"code": code, "msg": msg, "data": data})
    }

    fn item(self, item: &Item) -> Value {
        let message = match self.0 {
            Flavor::Sunoapi => "errorMessage",
            Flavor::Kie => "error_message",
        };
        let mut m = Map::new();
        m.insert("text".into(), item.text.as_str().into());
        m.insert("title".into(), item.title.as_str().into());
        m.insert("status".into(), item.status.as_str().into());
        m.insert(message.into(), item.error_message.as_str().into());
        Value::Object(m)
    }
}

impl Family for Lyrics {
    type Record = Record;

    fn name(&self) -> &'static str {
        "lyrics"
    }

    fn endpoint(&self) -> &'static str {
        "api/v1/lyrics/record-info"
    }

    fn parse(&self, data: &Value) -> Result<Record, String> {
        Details::parse(data, "status", class_of, items)
    }

    super::common::details_methods!();

    fn events(
        &self,
        task_id: &str,
        reached: Option<Stage>,
        record: &Record,
        _fill_skipped: bool,
    ) -> Vec<NewEvent> {
        let items = &record.result;
        match record.ending(reached, !items.is_empty(), MSG_FAILED) {
            None => Vec::new(),
            Some(Ending::Success) => {
                let list = items.iter().map(|i| self.item(i)).collect();
                let body = self.body(task_id, 200, MSG_SUCCESS, Stage::Complete, list);
                vec![terminal_event(Stage::Complete, 200, &body, items.len())]
            }
            Some(Ending::Failure { code, msg }) => vec![self.error_event(task_id, code, &msg)],
        }
    }

    fn error_event(&self, task_id: &str, code: i64, msg: &str) -> NewEvent {
        let body = self.body(task_id, code, msg, Stage::Error, Value::Null);
        terminal_event(Stage::Error, code, &body, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::families::conformance::{Callback, Conformance, Spec, TASK, json};

    impl Conformance for Lyrics {
        fn spec(flavor: Flavor) -> Spec<Lyrics> {
            let family = Lyrics(flavor);
            let (complete, error) = match flavor {
                Flavor::Sunoapi => ("callback.complete.json", "callback.error.json"),
                Flavor::Kie => ("callback.complete.kie.json", "callback.error.kie.json"),
            };
            Spec {
                dir: "families/lyrics.",
                endpoint: "api/v1/lyrics/record-info",
                status_key: "status",
                fixtures: vec![
                    ("record-info.PENDING.json", "pending", "PENDING", 0),
                    ("record-info.SUCCESS.json", "progress", "SUCCESS", 2),
                    ("record-info.SUCCESS.kie.json", "progress", "SUCCESS", 2),
                    (
                        "record-info.CALLBACK_EXCEPTION.json",
                        "progress",
                        "CALLBACK_EXCEPTION",
                        2,
                    ),
                    (
                        "record-info.CREATE_TASK_FAILED.json",
                        "progress",
                        "CREATE_TASK_FAILED",
                        0,
                    ),
                    (
                        "record-info.GENERATE_LYRICS_FAILED.json",
                        "progress",
                        "GENERATE_LYRICS_FAILED",
                        0,
                    ),
                    (
                        "record-info.SENSITIVE_WORD_ERROR.json",
                        "progress",
                        "SENSITIVE_WORD_ERROR",
                        0,
                    ),
                ],
                results: |r| r.result.len(),
                // Both item keys (`data` and `lyricsData`) are read in both flavours.
                callbacks: vec![
                    Callback::complete("record-info.SUCCESS.json", complete, 2),
                    Callback::complete("record-info.SUCCESS.kie.json", complete, 2),
                    Callback::complete("record-info.CALLBACK_EXCEPTION.json", complete, 2),
                    Callback::error("record-info.GENERATE_LYRICS_FAILED.json", error, 500),
                ],
                failures: vec![
                    (
                        "record-info.CREATE_TASK_FAILED.json",
                        500,
                        "Failed to create task",
                    ),
                    (
                        "record-info.SENSITIVE_WORD_ERROR.json",
                        400,
                        "Song Description flagged for moderation",
                    ),
                ],
                defaults: [
                    ("CREATE_TASK_FAILED", 500),
                    ("GENERATE_LYRICS_FAILED", 500),
                    ("SENSITIVE_WORD_ERROR", 400),
                    ("CALLBACK_EXCEPTION", 500),
                ]
                .map(|(status, code)| {
                    let data = format!(
                        r#"{{"status":"{status}","response":{{"data":[]}},"errorCode":null,"errorMessage":""}}"#
                    );
                    (data, code, MSG_FAILED)
                })
                .to_vec(),
                spellings: None,
                unknown: r#"{"status":"TEXT_SUCCESS"}"#,
                failure_body: Box::new(move |task, code, msg| {
                    let key = family.task_id_field();
                    format!(
                        r#"{{"code":{code},"msg":"{msg}","data":{{"callbackType":"error","{key}":"{task}","data":null}}}}"#
                    )
                }),
                task_at: match flavor {
                    Flavor::Sunoapi => "/data/taskId",
                    Flavor::Kie => "/data/task_id",
                },
                stage_at: Some("/data/callbackType"),
                result_at: Some(("/data/data", Value::is_array)),
                one_callback: true,
            }
        }
    }

    const KIE: Lyrics = Lyrics(Flavor::Kie);
    const SUNOAPI: Lyrics = Lyrics(Flavor::Sunoapi);

    #[test]
    fn missing_item_fields_get_their_defaults() {
        let r = KIE
            .parse(&json(
                r#"{"status":"SUCCESS","response":{"lyricsData":[{"text":null,"errorMessage":null},
                    7,{"title":"T","status":"failed","errorMessage":"no"}],"data":[{}]}}"#,
            ))
            .expect("parses");
        let ev = KIE.events(TASK, None, &r, true);
        assert_eq!(
            ev[0].body,
            format!(
                r#"{{"code":200,"msg":"All generated successfully.","data":{{"callbackType":"complete","task_id":"{TASK}","data":[{{"text":"","title":"","status":"complete","error_message":""}},{{"text":"","title":"T","status":"failed","error_message":"no"}}]}}}}"#
            )
        );
        // A success without items still completes, with an empty list.
        let r = SUNOAPI
            .parse(&json(r#"{"status":"SUCCESS","response":null}"#))
            .expect("parses");
        let ev = SUNOAPI.events(TASK, None, &r, true);
        assert_eq!(json(&ev[0].body)["data"]["data"], json("[]"));
    }
}
