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
    use proptest::prelude::*;

    use super::*;
    use crate::api::families::common::testing::{classified, details, json, minified};

    const TASK: &str = "9f8e7d6c5b4a43928170f6e5d4c3b2a1";

    fn record(name: &str) -> Record {
        classified(&Midi, name).1
    }

    fn events(name: &str) -> Vec<NewEvent> {
        Midi.events(TASK, None, &record(name), true)
    }

    fn parsed(data: &str) -> Record {
        Midi.parse(&json(data)).expect("parses")
    }

    #[test]
    fn every_fixture_classifies_to_its_status() {
        for (file, kind, status) in [
            ("midi.record-info.PENDING.json", "pending", "0"),
            ("midi.record-info.SUCCESS.json", "progress", "1"),
            ("midi.record-info.SUCCESS.lenient.json", "progress", "1"),
            ("midi.record-info.SUCCESS.numbers.json", "progress", "1"),
            ("midi.record-info.CREATE_TASK_FAILED.json", "progress", "2"),
            (
                "midi.record-info.GENERATE_MIDI_FAILED.json",
                "progress",
                "3",
            ),
        ] {
            let (got, r) = classified(&Midi, file);
            assert_eq!(got, kind, "{file}");
            assert_eq!(Midi.status(&r), status, "{file}");
            assert!(Midi.is_known(&r), "{file}");
            assert_eq!(
                Midi.submitted_callback_url(&r).as_deref(),
                Some("https://hooks.example.com/suno/callback")
            );
        }
    }

    #[test]
    fn success_passes_the_notes_through_byte_for_byte() {
        for (file, want) in [
            (
                "midi.record-info.SUCCESS.json",
                "midi.callback.complete.json",
            ),
            // A string flag ("1"), and notes as numeric strings, passed through as they came.
            (
                "midi.record-info.SUCCESS.lenient.json",
                "midi.callback.complete.lenient.json",
            ),
            // Every number token as the API wrote it (design.md invariant 11).
            (
                "midi.record-info.SUCCESS.numbers.json",
                "midi.callback.complete.numbers.json",
            ),
        ] {
            let ev = events(file);
            assert_eq!(ev.len(), 1, "{file}");
            assert_eq!(
                (ev[0].stage, ev[0].code, ev[0].tracks),
                (Stage::Complete, 200, 2)
            );
            assert_eq!(ev[0].body, minified(want), "{file}");
        }
    }

    #[test]
    fn a_failure_gives_the_error_callback_byte_for_byte() {
        // errorCode "500" as a digit string; flag 3.
        let ev = events("midi.record-info.GENERATE_MIDI_FAILED.json");
        assert_eq!((ev.len(), ev[0].stage, ev[0].code), (1, Stage::Error, 500));
        assert_eq!(ev[0].body, minified("midi.callback.error.json"));
        let ev = events("midi.record-info.CREATE_TASK_FAILED.json");
        assert_eq!(
            ev[0].body,
            format!(
                r#"{{"task_id":"{TASK}","code":500,"msg":"Failed to create task","data":null}}"#
            )
        );
    }

    #[test]
    fn every_flag_spelling_reads_the_same() {
        for (flag, class) in [
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
        ] {
            let r = parsed(&format!(r#"{{"successFlag":{flag}}}"#));
            assert_eq!(r.class, class, "{flag}");
        }
        let r = parsed(r#"{"successFlag":4}"#);
        assert!(Midi.is_running(&r) && !Midi.is_known(&r));
        assert!(Midi.events(TASK, None, &r, true).is_empty());
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
    fn callback_exception_needs_instruments() {
        let with = parsed(
            r#"{"successFlag":"CALLBACK_EXCEPTION","midiData":{"state":"complete","instruments":[{"name":"Drums","notes":[]}]}}"#,
        );
        assert_eq!(
            Midi.events(TASK, None, &with, true)[0].stage,
            Stage::Complete
        );
        let without = parsed(
            r#"{"successFlag":"CALLBACK_EXCEPTION","midiData":{"state":"complete","instruments":[]},"errorCode":200}"#,
        );
        let ev = Midi.events(TASK, None, &without, true);
        assert_eq!(
            ev[0].body,
            format!(
                r#"{{"task_id":"{TASK}","code":500,"msg":"MIDI generation failed","data":null}}"#
            )
        );
    }

    #[test]
    fn a_terminal_status_is_final_and_pending_emits_nothing() {
        assert!(events("midi.record-info.PENDING.json").is_empty());
        for reached in [Stage::Complete, Stage::Error] {
            for file in [
                "midi.record-info.SUCCESS.json",
                "midi.record-info.GENERATE_MIDI_FAILED.json",
            ] {
                let r = record(file);
                assert!(Midi.events(TASK, Some(reached), &r, true).is_empty());
                assert!(!Midi.went_backwards(&r, Some(reached)));
            }
        }
    }

    #[test]
    fn the_error_event_is_the_failure_body() {
        let ev = Midi.error_event(TASK, 408, "timed out");
        assert_eq!((ev.stage, ev.code), (Stage::Error, 408));
        assert_eq!(
            ev.body,
            format!(r#"{{"task_id":"{TASK}","code":408,"msg":"timed out","data":null}}"#)
        );
        assert_eq!(
            (Midi.name(), Midi.endpoint(), Midi.task_id_key()),
            ("midi", "api/v1/midi/record-info", "taskId")
        );
    }

    proptest! {
        #[test]
        fn parse_and_events_never_panic(
            data in details("successFlag", vec![Value::from(0), Value::from(1), Value::from(2),
                Value::from(3), "1".into(), "SUCCESS".into(), "CALLBACK_EXCEPTION".into()]),
            reached in prop::option::of(prop::sample::select(Stage::ALL.to_vec())),
        ) {
            let Ok(r) = Midi.parse(&data) else { return Ok(()) };
            let ev = Midi.events(TASK, reached, &r, true);
            if reached.is_some_and(Stage::is_terminal) || Midi.is_running(&r) {
                prop_assert!(ev.is_empty());
            } else {
                prop_assert_eq!(ev.len(), 1);
            }
            for e in ev {
                let body: Value = serde_json::from_str(&e.body).expect("the body is JSON");
                prop_assert_eq!(&body["task_id"], TASK);
                if e.stage == Stage::Complete {
                    prop_assert!(body["data"]["instruments"].is_array());
                }
            }
        }
    }
}
