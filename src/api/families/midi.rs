//! The midi family (`POST /api/v1/midi/generate`): `GET /api/v1/midi/record-info`, an integer
//! `successFlag` (0 pending, 1 success, 2 create failed, 3 generation failed), the notes under
//! `midiData`, and its one callback (`../shared/api/families.md` §6). The body is the same in
//! both flavours, with `task_id` at the top level, and `midiData` passed through as received.

use serde_json::{Map, Value, json};

use super::Family;
use super::common::{Class, DEFAULT_FAILURE_CODE, Details, Ending, flag_of, terminal_event};
use crate::events::{NewEvent, Stage};

/// The midi family: MIDI notes transcribed from a separated stem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Midi;

/// A midi details answer; the result is the `midiData` object, when it is one.
pub type Record = Details<Option<Map<String, Value>>>;

/// The success `msg`.
pub const MSG_SUCCESS: &str = "success";
/// The failure `msg` when the API gives none.
pub const MSG_FAILED: &str = "MIDI generation failed";

/// The integer flags, their digit strings, and the names §1.3 accepts as well.
fn class_of(status: &str) -> Class {
    match (flag_of(status), status) {
        (Some(0), _) | (None, "PENDING") => Class::Pending,
        (Some(1), _) | (None, "SUCCESS") => Class::Success,
        (Some(2 | 3), _) | (None, "CREATE_TASK_FAILED" | "GENERATE_MIDI_FAILED") => {
            Class::Failure(DEFAULT_FAILURE_CODE)
        }
        (None, "CALLBACK_EXCEPTION") => Class::CallbackException,
        _ => Class::Unknown,
    }
}

/// The instruments of `midiData`, when it has a list of them.
fn instruments(midi: Option<&Map<String, Value>>) -> &[Value] {
    match midi.and_then(|m| m.get("instruments")) {
        Some(Value::Array(list)) => list,
        _ => &[],
    }
}

/// The callback's `data`: `midiData` unchanged, except that a missing (or `null`) `state` reads
/// `"complete"` and missing (or non-list) `instruments` read `[]`; those two then lead.
fn callback_data(midi: Option<&Map<String, Value>>) -> Value {
    let has = |key: &str, ok: fn(&Value) -> bool| midi.and_then(|m| m.get(key)).is_some_and(ok);
    if let Some(m) =
        midi.filter(|_| has("state", |v| !v.is_null()) && has("instruments", Value::is_array))
    {
        return Value::Object(m.clone());
    }
    let mut data = Map::new();
    let state = midi
        .and_then(|m| m.get("state"))
        .filter(|v| !v.is_null())
        .cloned()
        .unwrap_or_else(|| "complete".into());
    data.insert("state".into(), state);
    data.insert(
        "instruments".into(),
        Value::Array(instruments(midi).to_vec()),
    );
    for (k, v) in midi.into_iter().flatten() {
        if k != "state" && k != "instruments" {
            data.insert(k.clone(), v.clone());
        }
    }
    Value::Object(data)
}

fn body(task_id: &str, code: i64, msg: &str, data: Value) -> Value {
    json!({"task_id": task_id, "code": code, "msg": msg, "data": data})
}

impl Family for Midi {
    type Record = Record;

    fn name(&self) -> &'static str {
        "midi"
    }

    fn endpoint(&self) -> &'static str {
        "api/v1/midi/record-info"
    }

    fn parse(&self, data: &Value) -> Result<Record, String> {
        Details::parse(data, "successFlag", class_of, |obj| {
            obj.get("midiData").and_then(Value::as_object).cloned()
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
        let midi = record.result.as_ref();
        let count = instruments(midi).len();
        match record.ending(reached, count > 0, MSG_FAILED) {
            None => Vec::new(),
            Some(Ending::Success) => {
                let body = body(task_id, 200, MSG_SUCCESS, callback_data(midi));
                vec![terminal_event(Stage::Complete, 200, &body, count)]
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
    use super::*;
    use crate::api::families::Flavor;
    use crate::api::families::conformance::{Callback, Conformance, Spec, TASK, json};

    /// The body is the same in both flavours.
    impl Conformance for Midi {
        fn spec(_: Flavor) -> Spec<Midi> {
            Spec {
                dir: "families/midi.",
                endpoint: "api/v1/midi/record-info",
                status_key: "successFlag",
                fixtures: vec![
                    ("record-info.PENDING.json", "pending", "0", 0),
                    ("record-info.SUCCESS.json", "progress", "1", 2),
                    ("record-info.SUCCESS.lenient.json", "progress", "1", 2),
                    ("record-info.SUCCESS.numbers.json", "progress", "1", 2),
                    ("record-info.CREATE_TASK_FAILED.json", "progress", "2", 0),
                    (
                        "record-info.GENERATE_MIDI_FAILED.json",
                        "progress",
                        "3",
                        0,
                    ),
                ],
                results: |r| instruments(r.result.as_ref()).len(),
                // The notes pass through byte for byte.
                callbacks: vec![
                    Callback::complete(
                        "record-info.SUCCESS.json",
                        "callback.complete.json",
                        2,
                    ),
                    // A string flag ("1"), and notes as numeric strings, passed through as
                    // they came.
                    Callback::complete(
                        "record-info.SUCCESS.lenient.json",
                        "callback.complete.lenient.json",
                        2,
                    ),
                    // Every number token as the API wrote it (design.md invariant 11).
                    Callback::complete(
                        "record-info.SUCCESS.numbers.json",
                        "callback.complete.numbers.json",
                        2,
                    ),
                    // errorCode "500" as a digit string; flag 3.
                    Callback::error("record-info.GENERATE_MIDI_FAILED.json", "callback.error.json", 500),
                ],
                failures: vec![(
                    "record-info.CREATE_TASK_FAILED.json",
                    500,
                    "Failed to create task",
                )],
                defaults: vec![
                    // CALLBACK_EXCEPTION needs instruments.
                    (
                        r#"{"successFlag":"CALLBACK_EXCEPTION","midiData":{"state":"complete","instruments":[]},"errorCode":200}"#.to_owned(),
                        500,
                        MSG_FAILED,
                    ),
                    (r#"{"successFlag":3}"#.to_owned(), 500, MSG_FAILED),
                ],
                spellings: Some((
                    |r| r.class,
                    vec![
                        ("0", Class::Pending),
                        ("\"0\"", Class::Pending),
                        ("\"PENDING\"", Class::Pending),
                        ("1", Class::Success),
                        ("\"1\"", Class::Success),
                        ("\"SUCCESS\"", Class::Success),
                        ("2", Class::Failure(500)),
                        ("\"2\"", Class::Failure(500)),
                        ("\"CREATE_TASK_FAILED\"", Class::Failure(500)),
                        ("3", Class::Failure(500)),
                        ("\"GENERATE_MIDI_FAILED\"", Class::Failure(500)),
                        ("\"CALLBACK_EXCEPTION\"", Class::CallbackException),
                        ("4", Class::Unknown),
                        ("\"success\"", Class::Unknown),
                    ],
                )),
                unknown: r#"{"successFlag":4}"#,
                failure_body: Box::new(|task, code, msg| {
                    format!(r#"{{"task_id":"{task}","code":{code},"msg":"{msg}","data":null}}"#)
                }),
                task_at: "/task_id",
                stage_at: None,
                result_at: Some(("/data/instruments", Value::is_array)),
                one_callback: true,
            }
        }
    }

    fn parsed(data: &str) -> Record {
        Midi.parse(&json(data)).expect("parses")
    }

    #[test]
    fn defaults_fill_a_success_without_notes() {
        for data in [
            r#"{"successFlag":1,"midiData":null}"#,
            r#"{"successFlag":1}"#,
            r#"{"successFlag":1,"midiData":{"instruments":null}}"#,
        ] {
            let ev = Midi.events(TASK, None, &parsed(data), true);
            assert_eq!(
                ev[0].body,
                format!(
                    r#"{{"task_id":"{TASK}","code":200,"msg":"success","data":{{"state":"complete","instruments":[]}}}}"#
                ),
                "{data}"
            );
        }
        let ev = Midi.events(
            TASK,
            None,
            &parsed(r#"{"successFlag":1,"midiData":{"extra":1,"instruments":[{"name":"x"}]}}"#),
            true,
        );
        assert_eq!(
            json(&ev[0].body)["data"],
            json(r#"{"state":"complete","instruments":[{"name":"x"}],"extra":1}"#)
        );
    }

    #[test]
    fn callback_exception_with_instruments_completes() {
        let with = parsed(
            r#"{"successFlag":"CALLBACK_EXCEPTION","midiData":{"state":"complete","instruments":[{"name":"Drums","notes":[]}]}}"#,
        );
        assert_eq!(
            Midi.events(TASK, None, &with, true)[0].stage,
            Stage::Complete
        );
    }
}
