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
    use super::*;
    use crate::api::families::conformance::{Callback, Conformance, Spec, TASK, json};

    impl Conformance for Stems {
        fn spec(flavor: Flavor) -> Spec<Stems> {
            let family = Stems(flavor);
            let (complete, error) = match flavor {
                Flavor::Sunoapi => ("callback.complete.json", "callback.error.json"),
                Flavor::Kie => ("callback.complete.kie.json", "callback.error.kie.json"),
            };
            // A split_stem success lists every present stem (in the sunoapi spelling).
            let split_stem = (flavor == Flavor::Sunoapi).then_some(Callback::complete(
                "record-info.SUCCESS.split_stem.json",
                "callback.complete.split_stem.json",
                12,
            ));
            Spec {
                dir: "families/stems.",
                endpoint: "api/v1/vocal-removal/record-info",
                status_key: "successFlag",
                fixtures: vec![
                    ("record-info.PENDING.json", "pending", "PENDING", 0),
                    ("record-info.SUCCESS.json", "progress", "SUCCESS", 2),
                    ("record-info.SUCCESS.kie.json", "progress", "SUCCESS", 2),
                    (
                        "record-info.SUCCESS.split_stem.json",
                        "progress",
                        "SUCCESS",
                        12,
                    ),
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
                        "record-info.GENERATE_AUDIO_FAILED.json",
                        "progress",
                        "GENERATE_AUDIO_FAILED",
                        0,
                    ),
                ],
                results: |r| r.result.stems.len(),
                callbacks: [
                    Callback::complete("record-info.SUCCESS.json", complete, 2),
                    Callback::complete("record-info.SUCCESS.kie.json", complete, 2),
                    Callback::complete("record-info.CALLBACK_EXCEPTION.json", complete, 2),
                    Callback::error("record-info.GENERATE_AUDIO_FAILED.json", error, 500),
                ]
                .into_iter()
                .chain(split_stem)
                .collect(),
                failures: vec![(
                    "record-info.CREATE_TASK_FAILED.json",
                    500,
                    "Failed to create the separation task",
                )],
                // Only the source audio is not a result: with it alone, a CALLBACK_EXCEPTION
                // fails.
                defaults: [
                    "CREATE_TASK_FAILED",
                    "GENERATE_AUDIO_FAILED",
                    "CALLBACK_EXCEPTION",
                ]
                .map(|status| {
                    let data = format!(
                        r#"{{"successFlag":"{status}","response":{{"originUrl":"https://o","vocalUrl":""}}}}"#
                    );
                    (data, 500, MSG_FAILED)
                })
                .to_vec(),
                spellings: None,
                unknown: r#"{"successFlag":"SEPARATING"}"#,
                failure_body: Box::new(move |task, code, msg| {
                    let key = family.info_key();
                    format!(
                        r#"{{"code":{code},"msg":"{msg}","data":{{"task_id":"{task}","{key}":null}}}}"#
                    )
                }),
                task_at: "/data/task_id",
                stage_at: None,
                result_at: Some((
                    match flavor {
                        Flavor::Sunoapi => "/data/vocal_removal_info",
                        Flavor::Kie => "/data/vocal_separation_info",
                    },
                    Value::is_object,
                )),
                one_callback: true,
            }
        }
    }

    #[test]
    fn an_origin_url_is_kept_and_unknown_stems_are_renamed() {
        let sunoapi = Stems(Flavor::Sunoapi);
        let r = sunoapi
            .parse(&json(
                r#"{"successFlag":"SUCCESS","response":{"originUrl":"https://o","pianoUrl":"https://p",
                    "fxUrl":"https://f","Url":"https://x","id":"https://i","originData":[]}}"#,
            ))
            .expect("parses");
        let ev = sunoapi.events(TASK, None, &r, true);
        assert_eq!(
            json(&ev[0].body)["data"]["vocal_removal_info"],
            json(r#"{"fx_url":"https://f","origin_url":"https://o","piano_url":"https://p"}"#)
        );
        assert_eq!(snake_case("backingVocalsUrl"), "backing_vocals_url");
    }
}
