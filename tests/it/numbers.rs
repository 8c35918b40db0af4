//! Every number as the API sent it (issue 22, `design.md` invariant 11): the number tokens a
//! callback carries over from a details answer reach the handler exactly as the answer wrote
//! them, through poll → store → delivery of the real binary (SQLite and PostgreSQL), for every
//! record-info fixture of every family in both flavours; and, as a property, for random floats
//! (shortest, 17-digit and longer spellings, subnormals, exponents) and integers past 2^53, 2^64
//! and below -2^63 embedded in a details answer.
//!
//! Tokens are read from the text itself ([`number_tokens`]), never through a JSON library that
//! could respell them. The one respelling sunopoll makes is serde_json's exponent: `1E5` and
//! `1e5` are passed on as `1e+5` ([`exponent_as_passed`]; `sunopoll::json` says why).

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::Value;
use sunopoll::api::families::midi::Midi;
use sunopoll::api::families::music::Music;
use sunopoll::api::{Family, Outcome, classify};
use sunopoll::events::Stage;

use crate::binary::*;
use crate::families::{FamilyApi, for_task};
use crate::helpers::*;

/// Every number token of the JSON `text`, in document order, each with the JSON pointer of the
/// place it stands at (`/data/instruments/0/notes/1/end`). Panics on text that is not JSON.
pub fn number_tokens(text: &str) -> Vec<(String, String)> {
    let mut scan = Scan {
        text,
        at: 0,
        path: Vec::new(),
        out: Vec::new(),
    };
    scan.value();
    scan.skip_blanks();
    assert_eq!(
        scan.at,
        text.len(),
        "trailing bytes after the JSON in {text:?}"
    );
    scan.out
}

struct Scan<'a> {
    text: &'a str,
    at: usize,
    path: Vec<String>,
    out: Vec<(String, String)>,
}

impl Scan<'_> {
    fn byte(&self) -> u8 {
        *self
            .text
            .as_bytes()
            .get(self.at)
            .unwrap_or_else(|| panic!("the JSON ends early: {:?}", self.text))
    }

    fn skip_blanks(&mut self) {
        while self
            .text
            .as_bytes()
            .get(self.at)
            .is_some_and(u8::is_ascii_whitespace)
        {
            self.at += 1;
        }
    }

    /// A string at the cursor, decoded (keys are compared decoded).
    fn string(&mut self) -> String {
        let start = self.at;
        self.at += 1;
        loop {
            match self.byte() {
                b'\\' => self.at += 2,
                b'"' => break,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        serde_json::from_str(&self.text[start..self.at]).expect("a JSON string")
    }

    fn expect(&mut self, b: u8) {
        self.skip_blanks();
        assert_eq!(
            self.byte() as char,
            b as char,
            "at {} of {:?}",
            self.at,
            self.text
        );
        self.at += 1;
    }

    fn value(&mut self) {
        self.skip_blanks();
        match self.byte() {
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.at += 1;
                self.skip_blanks();
                if self.byte() == close {
                    self.at += 1;
                    return;
                }
                for index in 0.. {
                    self.skip_blanks();
                    let step = if open == b'{' {
                        let key = self.string();
                        self.expect(b':');
                        key.replace('~', "~0").replace('/', "~1")
                    } else {
                        index.to_string()
                    };
                    self.path.push(step);
                    self.value();
                    self.path.pop();
                    self.skip_blanks();
                    let next = self.byte();
                    self.at += 1;
                    if next == close {
                        return;
                    }
                    assert_eq!(next, b',', "at {} of {:?}", self.at, self.text);
                }
            }
            b'"' => {
                self.string();
            }
            b'-' | b'0'..=b'9' => {
                let start = self.at;
                while self
                    .text
                    .as_bytes()
                    .get(self.at)
                    .is_some_and(|b| matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
                {
                    self.at += 1;
                }
                let pointer: String = self.path.iter().map(|s| format!("/{s}")).collect();
                self.out
                    .push((pointer, self.text[start..self.at].to_owned()));
            }
            _ => {
                // true, false, null
                while self
                    .text
                    .as_bytes()
                    .get(self.at)
                    .is_some_and(u8::is_ascii_alphabetic)
                {
                    self.at += 1;
                }
            }
        }
    }
}

/// A number token as sunopoll passes it on: itself, except that an exponent is written `e`
/// with its sign (serde_json's reader writes it so; the digits are the sender's).
pub fn exponent_as_passed(token: &str) -> String {
    let Some(at) = token.find(['e', 'E']) else {
        return token.to_owned();
    };
    let (mantissa, rest) = (&token[..at], &token[at + 1..]);
    if rest.starts_with(['+', '-']) {
        format!("{mantissa}e{rest}")
    } else {
        format!("{mantissa}e+{rest}")
    }
}

/// The number tokens a callback body of family `kind` must carry over from the details
/// `answer` it was made from, by the pointer each must stand at in `body`. `code` is not among
/// them: it is sunopoll's to decide (and checked against the callback fixtures elsewhere).
///
/// midi passes `midiData` through as the body's `data`; music passes each track's `duration`
/// (a track is found in the answer by its `id`); every other family's bodies carry strings
/// only.
fn carried_over(kind: &str, answer: &str, body: &Value) -> Vec<(String, String)> {
    let tokens = number_tokens(answer);
    match kind {
        "midi" if body["data"].is_object() => tokens
            .into_iter()
            .filter_map(|(at, token)| {
                let rest = at.strip_prefix("/data/midiData/")?;
                Some((format!("/data/{rest}"), token))
            })
            .collect(),
        "music" => {
            let answer: Value = serde_json::from_str(answer).expect("an answer is JSON");
            let sent = answer["data"]["response"]["sunoData"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let by_pointer: BTreeMap<String, String> = tokens.into_iter().collect();
            let mut out = Vec::new();
            for (i, track) in body["data"]["data"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let j = sent
                    .iter()
                    .position(|t| t["id"] == track["id"])
                    .expect("every track of a body is a track of the answer");
                if let Some(token) =
                    by_pointer.get(&format!("/data/response/sunoData/{j}/duration"))
                {
                    out.push((format!("/data/data/{i}/duration"), token.clone()));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

/// The number tokens of a callback body, `code` left out (see [`carried_over`]), sorted.
fn carried(body: &str) -> Vec<(String, String)> {
    let mut tokens: Vec<_> = number_tokens(body)
        .into_iter()
        .filter(|(at, _)| at != "/code")
        .collect();
    tokens.sort();
    tokens
}

/// What [`carried_over`] says `body` must carry, as sunopoll passes it on
/// ([`exponent_as_passed`]), sorted like [`carried`].
fn passed_on(kind: &str, answer: &str, body: &str) -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(body).expect("a body is JSON");
    let mut want: Vec<_> = carried_over(kind, answer, &v)
        .into_iter()
        .map(|(at, token)| (at, exponent_as_passed(&token)))
        .collect();
    want.sort();
    want
}

/// The one body `family` makes of the success `answer` after stage `reached`.
fn only_body<F: Family>(family: &F, reached: Option<Stage>, answer: &str) -> String {
    let Outcome::Progress(record) = classify(family, 200, None, answer.as_bytes()) else {
        panic!("not a success: {answer}")
    };
    let mut events = family.events("t1", reached, &record, true);
    assert_eq!(events.len(), 1, "{answer}");
    events.remove(0).body
}

/// Every record-info fixture: `(kind, path under tests/fixtures)`.
fn record_info_fixtures() -> Vec<(String, String)> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut out = Vec::new();
    for dir in ["", "families/"] {
        let mut names: Vec<String> = std::fs::read_dir(format!("{root}/{dir}"))
            .expect("the fixtures are there")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|n| n.contains("record-info.") && n.ends_with(".json"))
            .collect();
        names.sort();
        for name in names {
            let kind = match name.split_once(".record-info.") {
                Some((kind, _)) => kind.to_owned(),
                None => "music".to_owned(),
            };
            out.push((kind, format!("{dir}{name}")));
        }
    }
    out
}

/// A fixture whose status keeps its task running: the answer that follows it ends the task.
fn keeps_running(file: &str) -> bool {
    ["PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS", "GENERATING"]
        .iter()
        .any(|s| file.contains(&format!(".{s}.")))
}

/// The answer that ends a task of `kind` after a running one: a failure with no number in its
/// body but the code.
fn ending(kind: &str) -> &'static str {
    match kind {
        "music" => "record-info.CREATE_TASK_FAILED.json",
        "lyrics" => "families/lyrics.record-info.CREATE_TASK_FAILED.json",
        "wav" => "families/wav.record-info.CREATE_TASK_FAILED.json",
        "stems" => "families/stems.record-info.CREATE_TASK_FAILED.json",
        "midi" => "families/midi.record-info.CREATE_TASK_FAILED.json",
        "mp4" => "families/mp4.record-info.CREATE_TASK_FAILED.json",
        "cover" => "families/cover.record-info.FAILED.json",
        other => panic!("no kind {other}"),
    }
}

fn fixture_text(name: &str) -> String {
    String::from_utf8(fixture(name)).expect("utf8")
}

/// One task of the run: its id, kind, and the answers it was given.
struct Task {
    id: String,
    kind: String,
    file: String,
    answers: Vec<String>,
}

/// Every record-info fixture in both flavours through the real binary, on SQLite or (with
/// `pg`, a database URL) PostgreSQL: each delivered body carries exactly the number tokens its
/// answer wrote, and the stored body is the delivered one, byte for byte.
async fn every_fixture_reaches_the_handler_with_its_numbers(pg: Option<String>) {
    let sunoapi = FamilyApi::start().await;
    let kie = FamilyApi::start().await;
    let handler = Receiver::start().await;
    let mut config = BinConfig::new(&sunoapi.uri());
    let mut target = BinTarget::new("app", &handler.url());
    target.with_secrets = false;
    // A PostgreSQL lease must hold the longest request twice.
    target.timeout = "2s".to_owned();
    config.forward_extra = "timeout = \"2s\"".to_owned();
    config.targets.push(target);
    config.extra = format!(
        "\n[[api.account]]\nname = \"main\"\nbase-url = \"{}\"\n\n\
         [[api.account]]\nname = \"kie\"\nbase-url = \"{}\"\nflavor = \"kie\"\n",
        sunoapi.uri(),
        kie.uri()
    );
    let mut d = BinDaemon::prepare(&config);
    if let Some(url) = &pg {
        std::fs::write(&d.config, crate::postgres::on_postgres(&config, url))
            .expect("write the config");
    }
    d.env.push(("SUNO_API_KEY_MAIN".into(), "main-key".into()));
    d.env.push(("SUNO_API_KEY_KIE".into(), "kie-key".into()));
    d.restart().await;

    let fixtures = record_info_fixtures();
    assert!(fixtures.len() >= 49, "only {} fixtures", fixtures.len());
    let mut tasks = Vec::new();
    for (prefix, api, account) in [('a', &sunoapi, "main"), ('b', &kie, "kie")] {
        let mut by_kind: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (i, (kind, file)) in fixtures.iter().enumerate() {
            let id = format!("{prefix}{i:031x}");
            let mut answers = vec![for_task(&fixture_text(file), &id)];
            if keeps_running(file) {
                answers.push(for_task(&fixture_text(ending(kind)), &id));
            }
            api.script_raw(
                kind,
                &id,
                answers.iter().map(|a| (200, a.clone())).collect(),
            );
            by_kind.entry(kind).or_default().push(id.clone());
            tasks.push(Task {
                id,
                kind: kind.clone(),
                file: file.clone(),
                answers,
            });
        }
        for (kind, ids) in by_kind {
            let added = d
                .request(
                    serde_json::json!({"cmd": "add", "task_ids": ids, "kind": kind,
                    "account": account}),
                )
                .await;
            assert_eq!(added["ok"], true, "{added}");
        }
    }
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone()).collect();
    assert!(d.settle(&ids).await, "{}", d.log_text());
    assert!(sunoapi.strays().is_empty() && kie.strays().is_empty());

    // What the store holds, as `events --json` prints it (bodies as stored, not re-encoded).
    let out = d.cli(&["events", "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut stored: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text(&out.stdout).lines() {
        #[derive(serde::Deserialize)]
        struct Line<'a> {
            task_id: String,
            #[serde(borrow)]
            body: &'a serde_json::value::RawValue,
        }
        let ev: Line = serde_json::from_str(line).expect("an event line");
        stored
            .entry(ev.task_id)
            .or_default()
            .push(ev.body.get().to_owned());
    }
    let received = handler.received();
    let mut checked = 0;
    let mut carried_by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for task in &tasks {
        let delivered: Vec<String> = received
            .iter()
            .map(|r| String::from_utf8(r.body.clone()).expect("utf8"))
            .filter(|b| b.contains(&task.id))
            .collect();
        let kept = stored.remove(&task.id).unwrap_or_default();
        assert_eq!(
            delivered, kept,
            "{} ({}): the handler gets the stored bodies, byte for byte",
            task.id, task.file
        );
        for body in &delivered {
            // The first answer made every event but a running task's closing failure, which
            // carries nothing over either.
            let want = passed_on(&task.kind, &task.answers[0], body);
            assert_eq!(
                carried(body),
                want,
                "{} task {} ({}): every number the body carries, as the answer wrote it\n{body}",
                task.kind,
                task.id,
                task.file
            );
            *carried_by_kind.entry(task.kind.as_str()).or_default() += want.len();
            checked += 1;
        }
    }
    assert!(stored.is_empty(), "events of no task: {:?}", stored.keys());
    assert!(checked >= 100, "only {checked} bodies delivered");
    // Only midi and music bodies carry numbers over; a change that dropped them all would pass
    // the comparison above.
    assert!(
        carried_by_kind.get("midi").is_some_and(|n| *n > 0)
            && carried_by_kind.get("music").is_some_and(|n| *n > 0)
            && carried_by_kind.values().sum::<usize>()
                == carried_by_kind["midi"] + carried_by_kind["music"],
        "numbers carried over, by kind: {carried_by_kind:?}"
    );
    let midi = tasks
        .iter()
        .find(|t| t.file.ends_with("midi.record-info.SUCCESS.numbers.json"))
        .expect("the midi numbers fixture");
    let body = received
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .find(|b| b.contains(&midi.id))
        .expect("the midi numbers callback");
    assert!(
        body.contains(r#""end":0.18229166666666666,"#) && body.contains("0.19270833333333334"),
        "the issue's numbers reach the handler as the API wrote them: {body}"
    );
    // `show` prints the body for people, pretty; its numbers are the API's all the same.
    let shown = d.cli(&["show", &midi.id]).await;
    let shown = text(&shown.stdout);
    for (_, token) in number_tokens(&body).iter().filter(|(at, _)| at != "/code") {
        assert!(
            shown.contains(&format!(": {token}")) || shown.contains(&format!("  {token}")),
            "`show` prints {token} as the API wrote it:\n{shown}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_reaches_the_handler_with_its_numbers_on_sqlite() {
    every_fixture_reaches_the_handler_with_its_numbers(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_reaches_the_handler_with_its_numbers_on_postgresql() {
    let Some(cluster) = sunopoll::testing::postgres() else {
        return;
    };
    every_fixture_reaches_the_handler_with_its_numbers(Some(cluster.database())).await;
}

#[test]
fn the_token_reader_reads_tokens_as_written() {
    assert_eq!(
        number_tokens(r#" {"a": [1, -0.0, {"b~/": 2E+5}], "s": "3", "t": true, "n": null} "#),
        [
            ("/a/0".to_owned(), "1".to_owned()),
            ("/a/1".to_owned(), "-0.0".to_owned()),
            ("/a/2/b~0~1".to_owned(), "2E+5".to_owned()),
        ]
    );
    assert_eq!(exponent_as_passed("1E5"), "1e+5");
    assert_eq!(exponent_as_passed("2.5E-3"), "2.5e-3");
    assert_eq!(exponent_as_passed("1e+21"), "1e+21");
    assert_eq!(exponent_as_passed("0.1"), "0.1");
}

/// A finite `f64`: normal, subnormal or zero, of either sign.
fn float() -> impl Strategy<Value = f64> {
    use prop::num::f64::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    prop_oneof![
        (POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO),
        // Ratios like a note's time in a 96-per-beat grid at 120 bpm (0.18229166666666666),
        // which serde_json's default reader rounds wrongly.
        (1u32..100_000, 1u32..10_000).prop_map(|(n, d)| f64::from(n) / f64::from(d) / 64.0),
    ]
}

/// A spelling of `f` as a JSON number: the shortest, 17 significant digits, many fixed digits,
/// an upper-case exponent, trailing zeros.
fn spelling(f: f64) -> impl Strategy<Value = String> {
    let fixed = if f.abs() < 1e15 {
        (0usize..25).prop_map(move |p| format!("{f:.p$}")).boxed()
    } else {
        Just(format!("{f:e}")).boxed()
    };
    prop_oneof![
        Just(format!("{f:?}")),
        Just(format!("{f:.16e}")),
        Just(format!("{f:e}")),
        (0usize..12).prop_map(move |p| format!("{f:.p$E}")),
        fixed,
        Just(format!("{f:?}")).prop_map(|s| if s.contains(['.']) && !s.contains(['e', 'E']) {
            s + "000"
        } else {
            s
        }),
    ]
}

/// An integer token: any `i64`/`u64`, past 2^53, past 2^64, below -2^63, or up to 60 digits.
fn integer() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..1_000_000).prop_map(|n| ((1u64 << 53) + n).to_string()),
        any::<u128>().prop_map(|n| (n | (1u128 << 64)).to_string()),
        any::<u128>().prop_map(|n| format!("-{}", n | (1u128 << 63))),
        "-?[1-9][0-9]{19,59}",
        prop::sample::select(vec!["0", "-0", "0.0", "-0.0", "1.50", "9007199254740993"])
            .prop_map(str::to_owned),
    ]
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![float().prop_flat_map(spelling), integer()]
}

proptest! {
    /// Random numbers in a midi details answer (note times, velocities, extra fields) and a
    /// music one (durations): each reaches the callback body as it was written (exponent
    /// aside), at the place the family puts it.
    #[test]
    fn every_number_in_an_answer_reaches_the_callback_as_written(
        tokens in prop::collection::vec(token(), 1..24),
    ) {
        let notes: Vec<String> = tokens
            .chunks(3)
            .map(|c| {
                let t = |i: usize| c.get(i).map_or("null", String::as_str);
                format!(r#"{{"pitch":60,"start":{},"end":{},"velocity":{}}}"#, t(0), t(1), t(2))
            })
            .collect();
        let answer = format!(
            r#"{{"code":200,"msg":"success","data":{{"taskId":"t1","successFlag":1,"midiData":
               {{"state":"complete","instruments":[{{"name":"x","notes":[{}]}}],"extra":[{}]}}}}}}"#,
            notes.join(","),
            tokens.join(", ")
        );
        let body = only_body(&Midi, None, &answer);
        let want = passed_on("midi", &answer, &body);
        // Each token stands in a note and in `extra`; each note has its pitch.
        prop_assert_eq!(want.len(), tokens.len() * 2 + notes.len());
        prop_assert_eq!(carried(&body), want);

        // Music: each token as a track's duration.
        let tracks: Vec<String> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| format!(r#"{{"id":"id{i}","audioUrl":"https://files.example.com/{i}.mp3","duration":{t}}}"#))
            .collect();
        let answer = format!(
            r#"{{"code":200,"msg":"success","data":{{"taskId":"t1","status":"SUCCESS",
               "response":{{"sunoData":[{}]}}}}}}"#,
            tracks.join(",")
        );
        let body = only_body(&Music, Some(Stage::First), &answer);
        let want = passed_on("music", &answer, &body);
        prop_assert_eq!(want.len(), tokens.len());
        prop_assert_eq!(carried(&body), want);
    }
}
