//! What the six single-callback families (lyrics, wav, stems, midi, mp4, cover) share: the
//! [`Details`] record around each family's own result, the status classes a status falls into,
//! and the rules of `../shared/api/families.md` §1 that are the same for all of them — reading
//! a status leniently (§1.3), the failure `code` (§1.5) and `msg` (§1.6), absent URLs (§1.7),
//! and `CALLBACK_EXCEPTION` (§1.4, §1.8). Each family's file keeps only its endpoint, its status
//! table, its result and its bodies.

use serde_json::{Map, Value};

use crate::api::envelope::{failure_code, json_kind, status_text, str_of};
use crate::events::{NewEvent, Stage};

/// What a status means for a single-callback family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Still running: nothing to emit yet.
    Pending,
    /// Finished: the success body.
    Success,
    /// Failed, with the family's default code for this status (used when `errorCode` is unusable).
    Failure(i64),
    /// The provider's own callback failed: success if the result is there, else failure (500).
    CallbackException,
    /// A status the family does not document: not terminal, logged once, polled on.
    Unknown,
}

/// The code of a `CALLBACK_EXCEPTION` without a result, and of most failures (§1.5): the one
/// failure code every family's code list has in both flavours.
pub const DEFAULT_FAILURE_CODE: i64 = 500;

/// One details answer of a single-callback family: the status in the API's spelling and its
/// class, the failure fields, the submitted callback URL, and the family's result `R`.
#[derive(Debug, Clone, PartialEq)]
pub struct Details<R> {
    /// The status as the API spelt it (`"SUCCESS"`, or `"1"` for an integer `successFlag`).
    pub status: String,
    /// What the status means.
    pub class: Class,
    /// `errorCode`, only when it can be a failure code: an integer (or digit string) among
    /// [`crate::api::envelope::FAILURE_CODES`] (never 200: cover records carry it on success).
    pub error_code: Option<i64>,
    /// `errorMessage`, when it is a non-blank string.
    pub error_message: Option<String>,
    /// The callback URL the task was submitted with (`callbackUrl`, else `param`'s `callBackUrl`).
    pub callback_url: Option<String>,
    /// The family's result, read leniently (absent while pending).
    pub result: R,
}

/// How a task ended, once its status is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The success body is due.
    Success,
    /// The failure body is due, with this code and message.
    Failure {
        /// The callback's `code`.
        code: i64,
        /// The callback's `msg`.
        msg: String,
    },
}

/// The `Family` methods every single-callback family answers the same way from its
/// [`Details`] record (the id is `taskId` in every details query; a terminal status is final, so
/// nothing goes backwards). Expanded inside each family's `impl Family`, whose `Record` is a
/// `Details<…>`.
macro_rules! details_methods {
    () => {
        fn task_id_key(&self) -> &'static str {
            "taskId"
        }

        fn status<'r>(&self, record: &'r Record) -> &'r str {
            &record.status
        }

        fn is_running(&self, record: &Record) -> bool {
            record.is_running()
        }

        fn is_known(&self, record: &Record) -> bool {
            record.is_known()
        }

        fn went_backwards(&self, _record: &Record, _reached: Option<Stage>) -> bool {
            false
        }

        fn submitted_callback_url(&self, record: &Record) -> Option<String> {
            record.callback_url.clone()
        }
    };
}
pub(super) use details_methods;

impl<R> Details<R> {
    /// Reads a details `data` object: the status from `status_key`, classified by `class_of`,
    /// and the result by `read_result` from the whole object.
    pub fn parse(
        data: &Value,
        status_key: &str,
        class_of: impl Fn(&str) -> Class,
        read_result: impl Fn(&Map<String, Value>) -> R,
    ) -> Result<Details<R>, String> {
        let obj = data
            .as_object()
            .ok_or_else(|| format!("`data` is {}, not an object", json_kind(data)))?;
        let status = read_status(obj, status_key)?;
        Ok(Details {
            class: class_of(&status),
            status,
            error_code: obj.get("errorCode").and_then(failure_code),
            error_message: str_of(obj.get("errorMessage")),
            callback_url: submitted_callback_url(obj),
            result: read_result(obj),
        })
    }

    /// True while the task runs: pending, or a status nobody documents.
    pub fn is_running(&self) -> bool {
        matches!(self.class, Class::Pending | Class::Unknown)
    }

    /// False for a status the family does not document.
    pub fn is_known(&self) -> bool {
        self.class != Class::Unknown
    }

    /// How the task ended, if it did and nothing terminal was emitted yet (`reached`): a terminal
    /// status is final, so nothing is due a second time. `has_result` says whether the family's
    /// result is present (§1.8); `default_msg` is the family's failure message.
    pub fn ending(
        &self,
        reached: Option<Stage>,
        has_result: bool,
        default_msg: &str,
    ) -> Option<Ending> {
        if reached.is_some_and(Stage::is_terminal) {
            return None;
        }
        let failure = |default_code: i64| Ending::Failure {
            code: self.error_code.unwrap_or(default_code),
            msg: self
                .error_message
                .clone()
                .unwrap_or_else(|| default_msg.to_owned()),
        };
        match self.class {
            Class::Pending | Class::Unknown => None,
            Class::Success => Some(Ending::Success),
            Class::CallbackException if has_result => Some(Ending::Success),
            Class::CallbackException => Some(failure(DEFAULT_FAILURE_CODE)),
            Class::Failure(default_code) => Some(failure(default_code)),
        }
    }
}

/// The status field's value in the API's spelling. A string is taken as it is (string families
/// compare exact values), an integer as its digits; anything else cannot be a status.
fn read_status(obj: &Map<String, Value>, key: &str) -> Result<String, String> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(status_text(s)),
        Some(Value::Number(n)) => Ok(status_text(&n.to_string())),
        Some(Value::String(_)) => Err(format!("`data.{key}` is an empty string")),
        Some(other) => Err(format!("`data.{key}` is {}", json_kind(other))),
        None => Err(format!("`data.{key}` is missing")),
    }
}

/// An integer `successFlag` read from its spelling: digits, possibly around blanks (`1`, `"1"`).
pub fn flag_of(status: &str) -> Option<u64> {
    let s = status.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `callbackUrl` (wav, stems, midi, mp4, cover), else the `callBackUrl` inside `param`, the
/// JSON string of the request (lyrics).
fn submitted_callback_url(obj: &Map<String, Value>) -> Option<String> {
    url(obj.get("callbackUrl")).or_else(|| {
        let param: Value = serde_json::from_str(obj.get("param")?.as_str()?).ok()?;
        url(param.get("callBackUrl"))
    })
}

/// A URL field (§1.7): missing, `null`, `""`, blank and non-strings are all absent.
pub fn url(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// The object under `response`, if there is one.
pub fn response(obj: &Map<String, Value>) -> Option<&Map<String, Value>> {
    obj.get("response").and_then(Value::as_object)
}

/// A terminal event with its body. `count` is how many result items the body carries (files,
/// lyrics, instruments), for the log line.
pub fn terminal_event(stage: Stage, code: i64, body: &Value, count: usize) -> NewEvent {
    NewEvent {
        stage,
        code,
        body: serde_json::to_string(body).expect("a JSON value always serialises"),
        tracks: count,
        filled: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn details(data: Value) -> Result<Details<()>, String> {
        Details::parse(
            &data,
            "successFlag",
            |s| match flag_of(s) {
                Some(1) => Class::Success,
                Some(0) => Class::Pending,
                Some(3) => Class::Failure(501),
                _ => Class::Unknown,
            },
            |_| (),
        )
    }

    #[test]
    fn a_status_is_a_non_empty_string_or_a_number() {
        assert_eq!(
            details(json!({"successFlag": 1})).map(|d| d.status),
            Ok("1".into())
        );
        assert_eq!(
            details(json!({"successFlag": "1"})).map(|d| d.class),
            Ok(Class::Success)
        );
        assert_eq!(
            details(json!({"successFlag": " 0 "})).map(|d| d.class),
            Ok(Class::Pending)
        );
        assert_eq!(
            details(json!({"successFlag": 7})).map(|d| d.class),
            Ok(Class::Unknown)
        );
        assert_eq!(
            details(json!({"successFlag": -1})).map(|d| d.class),
            Ok(Class::Unknown)
        );
        assert_eq!(
            details(json!({"successFlag": 1.5})).map(|d| d.class),
            Ok(Class::Unknown)
        );
        for bad in [
            json!({}),
            json!({"successFlag": null}),
            json!({"successFlag": ""}),
        ] {
            assert!(details(bad.clone()).is_err(), "{bad}");
        }
        assert!(details(json!([])).is_err());
        assert!(details(json!({"successFlag": true})).is_err());
    }

    #[test]
    fn the_failure_code_is_error_code_only_when_it_is_a_documented_failure_code() {
        for (given, want) in [
            (json!(451), Some(451)),
            (json!("451"), Some(451)),
            (json!(" 531 "), Some(531)),
            (json!(400), Some(400)),
            (json!(501), Some(501)),
            (json!(200), None),
            (json!("200"), None),
            (json!(204), None),
            (json!(100), None),
            (json!(599), None),
            (json!(99), None),
            (json!(600), None),
            (json!(-500), None),
            (json!("-500"), None),
            (json!("5x0"), None),
            (json!(500.5), None),
            (json!(1e30), None),
            (json!(null), None),
            (json!(""), None),
            (json!([500]), None),
        ] {
            assert_eq!(failure_code(&given), want, "{given}");
        }
    }

    #[test]
    fn a_failure_takes_error_code_and_message_or_the_defaults() {
        let d = details(json!({"successFlag": 3, "errorCode": 200, "errorMessage": " "}))
            .expect("parses");
        assert_eq!(
            d.ending(None, false, "Cover generation failed"),
            Some(Ending::Failure {
                code: 501,
                msg: "Cover generation failed".into()
            })
        );
        let d = details(json!({"successFlag": 3, "errorCode": "400", "errorMessage": "bad"}))
            .expect("parses");
        assert_eq!(
            d.ending(None, false, "x"),
            Some(Ending::Failure {
                code: 400,
                msg: "bad".into()
            })
        );
    }

    #[test]
    fn nothing_is_due_after_a_terminal_stage() {
        let d = details(json!({"successFlag": 1})).expect("parses");
        assert_eq!(d.ending(None, true, "x"), Some(Ending::Success));
        assert_eq!(d.ending(Some(Stage::Complete), true, "x"), None);
        assert_eq!(d.ending(Some(Stage::Error), true, "x"), None);
        let d = details(json!({"successFlag": 0})).expect("parses");
        assert_eq!(d.ending(None, true, "x"), None);
        assert!(d.is_running() && d.is_known());
        let d = details(json!({"successFlag": 9})).expect("parses");
        assert_eq!(d.ending(None, true, "x"), None);
        assert!(d.is_running() && !d.is_known());
    }

    #[test]
    fn the_callback_url_is_callback_url_else_param() {
        let d = details(json!({"successFlag": 0, "callbackUrl": "https://a.example.com/cb"}))
            .expect("parses");
        assert_eq!(d.callback_url.as_deref(), Some("https://a.example.com/cb"));
        let d = details(json!({"successFlag": 0, "callbackUrl": "",
            "param": "{\"callBackUrl\":\"https://b.example.com/cb\"}"}))
        .expect("parses");
        assert_eq!(d.callback_url.as_deref(), Some("https://b.example.com/cb"));
        let d = details(json!({"successFlag": 0, "param": "not json"})).expect("parses");
        assert_eq!(d.callback_url, None);
    }

    #[test]
    fn urls_that_are_missing_null_or_blank_are_absent() {
        assert_eq!(url(None), None);
        assert_eq!(url(Some(&json!(null))), None);
        assert_eq!(url(Some(&json!(""))), None);
        assert_eq!(url(Some(&json!("  "))), None);
        assert_eq!(url(Some(&json!(5))), None);
        assert_eq!(url(Some(&json!("https://x"))), Some("https://x".into()));
    }
}
