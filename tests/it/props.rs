//! Property tests: the parsers that read untrusted input never panic, whatever they are given,
//! and what they let through is safe to log. `PROPTEST_CASES` raises the case count (default
//! 256 per property).
//!
//! - `api::classify` on arbitrary bytes, and on arbitrary JSON shaped like record-info answers;
//! - `api::families::music::parse_record` on arbitrary JSON values;
//! - `api::families::music::map_record` on arbitrary records: never backwards, never a stage twice;
//! - `protocol::Request::parse` on arbitrary bytes and arbitrary JSON requests;
//! - `protocol::check_task_id` / `check_label`: nothing with a control character gets through.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Map, Value};
use sunopoll::api::classify;
use sunopoll::api::families::music::{Music, Outcome, map_record, parse_record};
use sunopoll::events::Stage;
use sunopoll::protocol::{COMMANDS, Request, check_label, check_task_id};

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
        "[A-Z_]{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A status string: a documented one, or anything.
fn status() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![
            "PENDING",
            "TEXT_SUCCESS",
            "FIRST_SUCCESS",
            "SUCCESS",
            "CREATE_TASK_FAILED",
            "GENERATE_AUDIO_FAILED",
            "CALLBACK_EXCEPTION",
            "SENSITIVE_WORD_ERROR",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
        json_value(),
    ]
}

/// A record-info `data` object: the fields sunopoll reads, each with a plausible or arbitrary
/// value, plus arbitrary extra fields.
fn record_data() -> impl Strategy<Value = Value> {
    let track = (
        prop::option::of(prop_oneof![
            Just(Value::String("https://files.example.com/a.mp3".into())),
            Just(Value::String(String::new())),
            json_value()
        ]),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
    )
        .prop_map(|(audio, duration, create, title)| {
            let mut m = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.to_owned(), v);
                }
            };
            put("audioUrl", audio);
            put("duration", duration);
            put("createTime", create);
            put("title", title);
            Value::Object(m)
        });
    (
        status(),
        prop::option::of(prop_oneof![
            prop::collection::vec(prop_oneof![track, json_value()], 0..4)
                .prop_map(|items| serde_json::json!({ "sunoData": items })),
            json_value(),
        ]),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
    )
        .prop_map(|(status, response, code, message, param)| {
            let mut m = Map::new();
            m.insert("status".into(), status);
            for (k, v) in [
                ("response", response),
                ("errorCode", code),
                ("errorMessage", message),
                ("param", param),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

/// A record-info envelope: any code, any message, a record or anything as `data`.
fn envelope() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            prop::sample::select(vec![
                200i64, 400, 401, 404, 405, 408, 422, 429, 430, 455, 500
            ])
            .prop_map(Value::from),
            json_value()
        ],
        json_value(),
        prop_oneof![record_data(), json_value()],
    )
        .prop_map(|(code, msg, data)| serde_json::json!({"code": code, "msg": msg, "data": data}))
}

fn no_control_chars(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// Log-bound causes never carry control characters (no forged log lines from the API).
fn cause_is_clean(o: &Outcome) -> bool {
    match o {
        Outcome::Throttled { cause, .. }
        | Outcome::Unavailable { cause, .. }
        | Outcome::Unauthorized { cause }
        | Outcome::Broken { cause } => no_control_chars(cause),
        _ => true,
    }
}

proptest! {
    #[test]
    fn classify_never_panics_on_arbitrary_bytes(
        status in 0u16..1000,
        retry_after in prop::option::of(any::<u64>()),
        body in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let o = classify(&Music, status, retry_after.map(Duration::from_secs), &body);
        prop_assert!(cause_is_clean(&o), "{o:?}");
    }

    #[test]
    fn classify_never_panics_on_record_info_shaped_json(
        status in prop::sample::select(vec![200u16, 201, 400, 404, 429, 500, 502, 503]),
        body in envelope(),
    ) {
        let bytes = serde_json::to_vec(&body).expect("serialise");
        let o = classify(&Music, status, None, &bytes);
        prop_assert!(cause_is_clean(&o), "{o:?}");
        if !(200..300).contains(&status) {
            prop_assert!(!matches!(o, Outcome::Progress(_) | Outcome::Pending(_)),
                "a non-2xx answer never counts as the task's status: {o:?}");
        }
    }

    #[test]
    fn parse_record_never_panics(data in prop_oneof![record_data(), json_value()]) {
        let _ = parse_record(&data);
    }

    #[test]
    fn map_record_never_goes_backwards_or_repeats_a_stage(
        data in record_data(),
        reached in prop::option::of(prop::sample::select(Stage::ALL.to_vec())),
        fill in any::<bool>(),
    ) {
        let Ok(record) = parse_record(&data) else { return Ok(()) };
        let events = map_record("t1", reached, &record, fill);
        if reached.is_some_and(Stage::is_terminal) {
            prop_assert!(events.is_empty());
        }
        let mut last = reached;
        for (i, ev) in events.iter().enumerate() {
            if ev.stage != Stage::Error {
                prop_assert!(last.is_none_or(|l| ev.stage > l), "{:?} after {last:?}", ev.stage);
            }
            prop_assert!(!ev.stage.is_terminal() || i == events.len() - 1, "a terminal stage is last");
            let body: Value = serde_json::from_str(&ev.body).expect("the body is JSON");
            prop_assert_eq!(&body["data"]["callbackType"], ev.stage.as_str());
            last = Some(ev.stage);
        }
    }

    #[test]
    fn request_parse_never_panics_on_arbitrary_bytes(
        line in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        if let Err(e) = Request::parse(&line) {
            prop_assert!(!e.code.is_empty() && !e.message.is_empty());
            prop_assert!(!e.to_line().trim_end().contains('\n'), "one line per answer");
        }
    }

    #[test]
    fn request_parse_never_panics_on_arbitrary_requests(
        cmd in prop_oneof![prop::sample::select(COMMANDS.to_vec()).prop_map(str::to_owned), any::<String>()],
        fields in prop::collection::vec(
            (prop::sample::select(vec![
                "task_ids", "task_id", "callback_url", "label", "state", "limit", "since",
                "follow", "seq", "failed_since", "sent_since", "target", "again", "extra",
            ]), json_value()),
            0..5,
        ),
    ) {
        let mut m = Map::new();
        m.insert("cmd".into(), Value::String(cmd));
        for (k, v) in fields {
            m.insert(k.to_owned(), v);
        }
        let line = serde_json::to_vec(&Value::Object(m)).expect("serialise");
        if let Err(e) = Request::parse(&line) {
            prop_assert!(!e.to_line().trim_end().contains('\n'), "one line per answer");
        }
    }

    #[test]
    fn task_ids_and_labels_that_pass_cannot_forge_log_lines(s in any::<String>()) {
        if check_task_id(&s).is_ok() {
            prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
            prop_assert!(!s.is_empty() && s.len() <= 128);
        }
        if check_label(&s).is_ok() {
            prop_assert!(no_control_chars(&s));
        }
    }
}
