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
    use proptest::prelude::*;

    use super::*;
    use crate::api::families::common::testing::{classified, details, json, minified};

    const TASK: &str = "7c41d2e9a0b34f58a6e1c9d03b27f845";
    const SUNOAPI: Lyrics = Lyrics(Flavor::Sunoapi);
    const KIE: Lyrics = Lyrics(Flavor::Kie);

    fn record(name: &str) -> Record {
        classified(&SUNOAPI, name).1
    }

    fn failure_body(family: Lyrics, code: i64, msg: &str) -> String {
        let key = family.task_id_field();
        format!(
            r#"{{"code":{code},"msg":"{msg}","data":{{"callbackType":"error","{key}":"{TASK}","data":null}}}}"#
        )
    }

    #[test]
    fn every_fixture_classifies_to_its_status() {
        for (file, kind, status, items) in [
            ("lyrics.record-info.PENDING.json", "pending", "PENDING", 0),
            ("lyrics.record-info.SUCCESS.json", "progress", "SUCCESS", 2),
            (
                "lyrics.record-info.SUCCESS.kie.json",
                "progress",
                "SUCCESS",
                2,
            ),
            (
                "lyrics.record-info.CALLBACK_EXCEPTION.json",
                "progress",
                "CALLBACK_EXCEPTION",
                2,
            ),
            (
                "lyrics.record-info.CREATE_TASK_FAILED.json",
                "progress",
                "CREATE_TASK_FAILED",
                0,
            ),
            (
                "lyrics.record-info.GENERATE_LYRICS_FAILED.json",
                "progress",
                "GENERATE_LYRICS_FAILED",
                0,
            ),
            (
                "lyrics.record-info.SENSITIVE_WORD_ERROR.json",
                "progress",
                "SENSITIVE_WORD_ERROR",
                0,
            ),
        ] {
            for family in [SUNOAPI, KIE] {
                let (got, r) = classified(&family, file);
                assert_eq!(got, kind, "{file}");
                assert_eq!(family.status(&r), status, "{file}");
                assert!(family.is_known(&r), "{file}");
                assert_eq!(r.result.len(), items, "{file}");
                // Lyrics records carry no callbackUrl; the request in `param` does.
                assert_eq!(
                    family.submitted_callback_url(&r).as_deref(),
                    Some("https://hooks.example.com/suno/callback")
                );
            }
        }
    }

    #[test]
    fn success_gives_each_flavours_complete_callback_byte_for_byte() {
        // Both item keys (`data` and `lyricsData`) are read in both flavours.
        for file in [
            "lyrics.record-info.SUCCESS.json",
            "lyrics.record-info.SUCCESS.kie.json",
            "lyrics.record-info.CALLBACK_EXCEPTION.json",
        ] {
            for (family, want) in [
                (SUNOAPI, "lyrics.callback.complete.json"),
                (KIE, "lyrics.callback.complete.kie.json"),
            ] {
                let ev = family.events(TASK, None, &record(file), true);
                assert_eq!(ev.len(), 1, "{file}");
                assert_eq!(
                    (ev[0].stage, ev[0].code, ev[0].tracks),
                    (Stage::Complete, 200, 2)
                );
                assert_eq!(ev[0].body, minified(want), "{file} {family:?}");
            }
        }
    }

    #[test]
    fn a_failure_gives_each_flavours_error_callback_byte_for_byte() {
        for (family, want) in [
            (SUNOAPI, "lyrics.callback.error.json"),
            (KIE, "lyrics.callback.error.kie.json"),
        ] {
            let r = record("lyrics.record-info.GENERATE_LYRICS_FAILED.json");
            let ev = family.events(TASK, None, &r, true);
            assert_eq!(ev.len(), 1);
            assert_eq!(
                (ev[0].stage, ev[0].code, ev[0].tracks),
                (Stage::Error, 500, 0)
            );
            assert_eq!(ev[0].body, minified(want));
        }
    }

    #[test]
    fn every_failure_status_has_its_code_and_message() {
        for (file, code, msg) in [
            (
                "lyrics.record-info.CREATE_TASK_FAILED.json",
                500,
                "Failed to create task",
            ),
            (
                "lyrics.record-info.SENSITIVE_WORD_ERROR.json",
                400,
                "Song Description flagged for moderation",
            ),
        ] {
            for family in [SUNOAPI, KIE] {
                let ev = family.events(TASK, None, &record(file), false);
                assert_eq!(ev.len(), 1);
                assert_eq!(ev[0].code, code, "{file}");
                assert_eq!(ev[0].body, failure_body(family, code, msg), "{file}");
            }
        }
        for (status, code) in [
            ("CREATE_TASK_FAILED", 500),
            ("GENERATE_LYRICS_FAILED", 500),
            ("SENSITIVE_WORD_ERROR", 400),
            ("CALLBACK_EXCEPTION", 500),
        ] {
            let r = SUNOAPI
                .parse(&json(&format!(
                    r#"{{"status":"{status}","response":{{"data":[]}},"errorCode":null,"errorMessage":""}}"#
                )))
                .expect("parses");
            let ev = SUNOAPI.events(TASK, None, &r, true);
            assert_eq!(
                ev[0].body,
                failure_body(SUNOAPI, code, MSG_FAILED),
                "{status}"
            );
        }
    }

    #[test]
    fn pending_and_unknown_emit_nothing_and_a_terminal_status_is_final() {
        assert!(
            SUNOAPI
                .events(TASK, None, &record("lyrics.record-info.PENDING.json"), true)
                .is_empty()
        );
        let r = SUNOAPI
            .parse(&json(r#"{"status":"TEXT_SUCCESS"}"#))
            .expect("parses");
        assert!(SUNOAPI.is_running(&r) && !SUNOAPI.is_known(&r));
        assert!(SUNOAPI.events(TASK, None, &r, true).is_empty());
        for reached in [Stage::Complete, Stage::Error] {
            for file in [
                "lyrics.record-info.SUCCESS.json",
                "lyrics.record-info.SENSITIVE_WORD_ERROR.json",
            ] {
                let r = record(file);
                assert!(SUNOAPI.events(TASK, Some(reached), &r, true).is_empty());
                assert!(!SUNOAPI.went_backwards(&r, Some(reached)));
            }
        }
    }

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

    #[test]
    fn the_error_event_is_the_failure_body_of_the_flavour() {
        for family in [SUNOAPI, KIE] {
            let ev = family.error_event(TASK, 408, "timed out");
            assert_eq!((ev.stage, ev.code), (Stage::Error, 408));
            assert_eq!(ev.body, failure_body(family, 408, "timed out"));
            assert_eq!(
                (family.name(), family.endpoint(), family.task_id_key()),
                ("lyrics", "api/v1/lyrics/record-info", "taskId")
            );
        }
    }

    proptest! {
        #[test]
        fn parse_and_events_never_panic(
            data in details("status", ["PENDING", "SUCCESS", "CREATE_TASK_FAILED",
                "GENERATE_LYRICS_FAILED", "SENSITIVE_WORD_ERROR", "CALLBACK_EXCEPTION"]
                .map(Value::from).to_vec()),
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
                prop_assert_eq!(&body["data"]["callbackType"], e.stage.as_str());
                prop_assert_eq!(&body["data"][family.task_id_field()], TASK);
            }
        }
    }
}
