//! The stems family (`POST /api/v1/vocal-removal/generate`, `separate_vocal` or `split_stem`):
//! `GET /api/v1/vocal-removal/record-info`, a string `successFlag`, one URL per stem under
//! `response`, and its one callback (`../shared/api/families.md` §5). The flavours name the
//! stems object (`vocal_removal_info` / `vocal_separation_info`) and word the success `msg`
//! differently.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::common::{Class, DEFAULT_FAILURE_CODE, Details, Ending, response, terminal_event, url};
use super::{Family, Flavor};
use crate::events::{NewEvent, Stage};

/// The stems family (vocal separation), in one provider flavour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stems(pub Flavor);

/// The stem URLs of a separation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StemUrls {
    /// `originUrl`, the source audio, when present.
    pub origin_url: Option<String>,
    /// Every other present `…Url` of `response`, by its callback name (`vocal_url`,
    /// `backing_vocals_url`, …); sorted, as the documented callbacks list them.
    pub stems: BTreeMap<String, String>,
}

/// A stems details answer; the result is its URLs.
pub type Record = Details<StemUrls>;

/// The failure `msg` when the API gives none.
pub const MSG_FAILED: &str = "Vocal separation failed";

fn class_of(status: &str) -> Class {
    match status {
        "PENDING" => Class::Pending,
        "SUCCESS" => Class::Success,
        "CREATE_TASK_FAILED" | "GENERATE_AUDIO_FAILED" => Class::Failure(DEFAULT_FAILURE_CODE),
        "CALLBACK_EXCEPTION" => Class::CallbackException,
        _ => Class::Unknown,
    }
}

/// `backingVocalsUrl` → `backing_vocals_url`.
fn snake_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    for (i, c) in key.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Every `response` key ending in `Url` with a present value, so that stems the docs do not
/// list yet (kie's `pianoUrl`) come through too.
fn stem_urls(obj: &Map<String, Value>) -> StemUrls {
    let Some(response) = response(obj) else {
        return StemUrls::default();
    };
    let stems = response
        .iter()
        .filter(|(key, _)| key.len() > "Url".len() && key.ends_with("Url") && *key != "originUrl")
        .filter_map(|(key, v)| Some((snake_case(key), url(Some(v))?)))
        .collect();
    StemUrls {
        origin_url: url(response.get("originUrl")),
        stems,
    }
}

impl Stems {
    fn info_key(self) -> &'static str {
        match self.0 {
            Flavor::Sunoapi => "vocal_removal_info",
            Flavor::Kie => "vocal_separation_info",
        }
    }

    /// The success `msg` of the flavour.
    pub fn success_msg(self) -> &'static str {
        match self.0 {
            Flavor::Sunoapi => "vocal Removal generated successfully.",
            Flavor::Kie => "vocal separation generated successfully.",
        }
    }

    fn body(self, task_id: &str, code: i64, msg: &str, info: Value) -> Value {
        let mut data = Map::new();
        data.insert("task_id".into(), task_id.into());
        data.insert(self.info_key().into(), info);
        json!({"code": code, "msg": msg, "data": data})
    }
}

/// The stems object of a success: `origin_url` always (`""` when absent, as the callbacks show
/// it), the present stems beside it, in name order; absent stems are left out.
fn info(urls: &StemUrls) -> Value {
    let mut all: BTreeMap<&str, &str> = urls
        .stems
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    all.insert("origin_url", urls.origin_url.as_deref().unwrap_or(""));
    Value::Object(
        all.into_iter()
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect(),
    )
}

impl Family for Stems {
    type Record = Record;

    fn name(&self) -> &'static str {
        "stems"
    }

    fn endpoint(&self) -> &'static str {
        "api/v1/vocal-removal/record-info"
    }

    fn parse(&self, data: &Value) -> Result<Record, String> {
        Details::parse(data, "successFlag", class_of, stem_urls)
    }

    super::common::details_methods!();

    fn events(
        &self,
        task_id: &str,
        reached: Option<Stage>,
        record: &Record,
        _fill_skipped: bool,
    ) -> Vec<NewEvent> {
        let urls = &record.result;
        // The source audio is not a result of the separation.
        match record.ending(reached, !urls.stems.is_empty(), MSG_FAILED) {
            None => Vec::new(),
            Some(Ending::Success) => {
                let body = self.body(task_id, 200, self.success_msg(), info(urls));
                vec![terminal_event(
                    Stage::Complete,
                    200,
                    &body,
                    urls.stems.len(),
                )]
            }
            Some(Ending::Failure { code, msg }) => vec![self.error_event(task_id, code, &msg)],
        }
    }

    fn error_event(&self, task_id: &str, code: i64, msg: &str) -> NewEvent {
        let body = self.body(task_id, code, msg, Value::Null);
        terminal_event(Stage::Error, code, &body, 0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::api::families::common::testing::{classified, details, json, minified};

    const TASK: &str = "e1d2c3b4a5f64e7d8c9b0a1f2e3d4c5b";
    const SPLIT_TASK: &str = "4a7b9c1d2e3f4051a6b7c8d9e0f1a2b3";
    const SUNOAPI: Stems = Stems(Flavor::Sunoapi);
    const KIE: Stems = Stems(Flavor::Kie);

    fn record(name: &str) -> Record {
        classified(&SUNOAPI, name).1
    }

    #[test]
    fn every_fixture_classifies_to_its_status() {
        for (file, kind, status, stems) in [
            ("stems.record-info.PENDING.json", "pending", "PENDING", 0),
            ("stems.record-info.SUCCESS.json", "progress", "SUCCESS", 2),
            (
                "stems.record-info.SUCCESS.kie.json",
                "progress",
                "SUCCESS",
                2,
            ),
            (
                "stems.record-info.SUCCESS.split_stem.json",
                "progress",
                "SUCCESS",
                12,
            ),
            (
                "stems.record-info.CALLBACK_EXCEPTION.json",
                "progress",
                "CALLBACK_EXCEPTION",
                2,
            ),
            (
                "stems.record-info.CREATE_TASK_FAILED.json",
                "progress",
                "CREATE_TASK_FAILED",
                0,
            ),
            (
                "stems.record-info.GENERATE_AUDIO_FAILED.json",
                "progress",
                "GENERATE_AUDIO_FAILED",
                0,
            ),
        ] {
            for family in [SUNOAPI, KIE] {
                let (got, r) = classified(&family, file);
                assert_eq!(got, kind, "{file}");
                assert_eq!(family.status(&r), status, "{file}");
                assert!(family.is_known(&r), "{file}");
                assert_eq!(r.result.stems.len(), stems, "{file}");
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
            "stems.record-info.SUCCESS.json",
            "stems.record-info.SUCCESS.kie.json",
            "stems.record-info.CALLBACK_EXCEPTION.json",
        ] {
            for (family, want) in [
                (SUNOAPI, "stems.callback.complete.json"),
                (KIE, "stems.callback.complete.kie.json"),
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
    fn a_split_stem_success_lists_every_present_stem() {
        let r = record("stems.record-info.SUCCESS.split_stem.json");
        let ev = SUNOAPI.events(SPLIT_TASK, None, &r, true);
        assert_eq!((ev[0].stage, ev[0].tracks), (Stage::Complete, 12));
        assert_eq!(
            ev[0].body,
            minified("stems.callback.complete.split_stem.json")
        );
    }

    #[test]
    fn a_failure_gives_each_flavours_error_callback_byte_for_byte() {
        for (family, want) in [
            (SUNOAPI, "stems.callback.error.json"),
            (KIE, "stems.callback.error.kie.json"),
        ] {
            let r = record("stems.record-info.GENERATE_AUDIO_FAILED.json");
            let ev = family.events(TASK, None, &r, true);
            assert_eq!((ev.len(), ev[0].stage, ev[0].code), (1, Stage::Error, 500));
            assert_eq!(ev[0].body, minified(want));
        }
    }

    #[test]
    fn every_failure_status_takes_its_message_or_the_default_500() {
        let ev = SUNOAPI.events(
            TASK,
            None,
            &record("stems.record-info.CREATE_TASK_FAILED.json"),
            true,
        );
        assert_eq!(
            json(&ev[0].body)["msg"],
            "Failed to create the separation task"
        );
        for status in [
            "CREATE_TASK_FAILED",
            "GENERATE_AUDIO_FAILED",
            "CALLBACK_EXCEPTION",
        ] {
            // Only the source audio is not a result: CALLBACK_EXCEPTION with it alone fails.
            let r = KIE
                .parse(&json(&format!(
                    r#"{{"successFlag":"{status}","response":{{"originUrl":"https://o","vocalUrl":""}}}}"#
                )))
                .expect("parses");
            let ev = KIE.events(TASK, None, &r, true);
            assert_eq!(
                ev[0].body,
                format!(
                    r#"{{"code":500,"msg":"Vocal separation failed","data":{{"task_id":"{TASK}","vocal_separation_info":null}}}}"#
                ),
                "{status}"
            );
        }
    }

    #[test]
    fn pending_and_unknown_emit_nothing_and_a_terminal_status_is_final() {
        assert!(
            SUNOAPI
                .events(TASK, None, &record("stems.record-info.PENDING.json"), true)
                .is_empty()
        );
        let r = SUNOAPI
            .parse(&json(r#"{"successFlag":"SEPARATING"}"#))
            .expect("parses");
        assert!(SUNOAPI.is_running(&r) && !SUNOAPI.is_known(&r));
        assert!(SUNOAPI.events(TASK, None, &r, true).is_empty());
        for reached in [Stage::Complete, Stage::Error] {
            let r = record("stems.record-info.SUCCESS.json");
            assert!(SUNOAPI.events(TASK, Some(reached), &r, true).is_empty());
            assert!(!SUNOAPI.went_backwards(&r, Some(reached)));
        }
    }

    #[test]
    fn an_origin_url_is_kept_and_unknown_stems_are_renamed() {
        let r = SUNOAPI
            .parse(&json(
                r#"{"successFlag":"SUCCESS","response":{"originUrl":"https://o","pianoUrl":"https://p",
                    "fxUrl":"https://f","Url":"https://x","id":"https://i","originData":[]}}"#,
            ))
            .expect("parses");
        let ev = SUNOAPI.events(TASK, None, &r, true);
        assert_eq!(
            json(&ev[0].body)["data"]["vocal_removal_info"],
            json(r#"{"fx_url":"https://f","origin_url":"https://o","piano_url":"https://p"}"#)
        );
        assert_eq!(snake_case("backingVocalsUrl"), "backing_vocals_url");
    }

    #[test]
    fn the_error_event_is_the_failure_body_of_the_flavour() {
        let ev = SUNOAPI.error_event(TASK, 408, "timed out");
        assert_eq!(
            ev.body,
            format!(
                r#"{{"code":408,"msg":"timed out","data":{{"task_id":"{TASK}","vocal_removal_info":null}}}}"#
            )
        );
        assert_eq!((ev.stage, ev.code), (Stage::Error, 408));
        assert_eq!(
            (KIE.name(), KIE.endpoint(), KIE.task_id_key()),
            ("stems", "api/v1/vocal-removal/record-info", "taskId")
        );
    }

    proptest! {
        #[test]
        fn parse_and_events_never_panic(
            data in details("successFlag", ["PENDING", "SUCCESS", "CREATE_TASK_FAILED",
                "GENERATE_AUDIO_FAILED", "CALLBACK_EXCEPTION"].map(Value::from).to_vec()),
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
                let info = &body["data"][family.info_key()];
                prop_assert_eq!(e.stage == Stage::Complete, info.is_object());
            }
        }
    }
}
