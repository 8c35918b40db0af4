//! The family conformance suite: checks written against [`Family`] alone, run for every
//! [`Kind`] in every [`Flavor`] (through [`crate::with_family!`], so a family without a
//! [`Conformance`] table does not compile), like `store::conformance` does for backends. Each
//! family supplies its table ([`Spec`]): its fixtures and what each must give, its status
//! spellings, its failure bodies; its own file keeps only the tests that are its own.
//!
//! The helpers every family's tests share (fixtures, the way we minify them, arbitrary JSON)
//! are here too.

use proptest::prelude::*;
use serde_json::Value;

use super::common::Class;
use super::{Family, Flavor, Kind};
use crate::api::{Outcome, classify};
use crate::events::{NewEvent, Stage};

/// The callback URL every fixture's task was submitted with.
const HOOK: &str = "https://hooks.example.com/suno/callback";

/// The task id of synthetic answers.
pub const TASK: &str = "0123456789abcdef0123456789abcdef";

/// One callback fixture and the answer it is made from: `events(task, reached, answer)` must
/// be exactly one event, `(stage, code, tracks)`, whose body is `callback` minified.
#[derive(Debug, Clone, Copy)]
pub struct Callback {
    /// The details answer (a record-info fixture).
    pub answer: &'static str,
    /// The stage emitted before it.
    pub reached: Option<Stage>,
    /// The callback fixture the body must equal, byte for byte once minified.
    pub callback: &'static str,
    /// The event's stage, code and result count.
    pub event: (Stage, i64, usize),
}

/// How each status spelling reads: the class of a record, and `(spelling, class)` pairs.
pub type Spellings<R> = (fn(&R) -> Class, Vec<(&'static str, Class)>);

/// A failure body for `(task, code, msg)`.
pub type FailureBody = Box<dyn Fn(&str, i64, &str) -> String>;

/// A place in a body (a JSON pointer) and what the value there must be.
pub type Place = (&'static str, fn(&Value) -> bool);

impl Callback {
    /// `answer` gives the `complete` callback `callback`, with `tracks` results.
    pub fn complete(answer: &'static str, callback: &'static str, tracks: usize) -> Callback {
        Callback {
            answer,
            reached: None,
            callback,
            event: (Stage::Complete, 200, tracks),
        }
    }

    /// `answer` gives the `error` callback `callback`, with `code`.
    pub fn error(answer: &'static str, callback: &'static str, code: i64) -> Callback {
        Callback {
            answer,
            reached: None,
            callback,
            event: (Stage::Error, code, 0),
        }
    }

    /// The same, once `stage` was emitted.
    pub fn after(self, stage: Stage) -> Callback {
        Callback {
            reached: Some(stage),
            ..self
        }
    }
}

/// What one family (in one flavour) tells the suite about itself.
pub struct Spec<F: Family> {
    /// What its fixtures' names start with, under `tests/fixtures/` (`"families/midi."`; music's
    /// are the ones at the top, `""`): every name below is relative to it.
    pub dir: &'static str,
    /// Its details endpoint.
    pub endpoint: &'static str,
    /// The status key of its details `data`.
    pub status_key: &'static str,
    /// Every record-info fixture: `(file, outcome kind, status as stored, result count)`.
    pub fixtures: Vec<(&'static str, &'static str, &'static str, usize)>,
    /// How many results (tracks, items, stems, files…) a record holds.
    pub results: fn(&F::Record) -> usize,
    /// Every callback fixture made from a record-info fixture.
    pub callbacks: Vec<Callback>,
    /// Failure fixtures: `(file, code, msg)` of the one error event each gives.
    pub failures: Vec<(&'static str, i64, &'static str)>,
    /// Failures without a usable code or message: `(data, code, msg)` of the error event.
    pub defaults: Vec<(String, i64, &'static str)>,
    /// The status class of a record, and how each status spelling reads: for the families
    /// whose integer `successFlag` is also spelt as digits or names (midi, cover). A family
    /// of plain status names says what each means through its fixtures, failures and defaults.
    pub spellings: Option<Spellings<F::Record>>,
    /// A details `data` whose status the family does not document.
    pub unknown: &'static str,
    /// The failure body for `(task, code, msg)`, written out as the callbacks document it.
    pub failure_body: FailureBody,
    /// Where a body names its task (a JSON pointer).
    pub task_at: &'static str,
    /// Where a body says its stage (a JSON pointer), if it does.
    pub stage_at: Option<&'static str>,
    /// Where a body holds its result and what it is there, exactly on `complete` (a JSON
    /// pointer), if the family's bodies have such a place.
    pub result_at: Option<Place>,
    /// True for the families with one callback per task.
    pub one_callback: bool,
}

/// A family that runs the suite: its table for `flavor`.
pub trait Conformance: Family<Record: std::fmt::Debug> + Sized {
    /// The family's [`Spec`] in `flavor`.
    fn spec(flavor: Flavor) -> Spec<Self>;
}

/// One module per family and flavour, each with one `#[test]` per check (and the property),
/// run on that family's adapter through [`crate::with_family!`].
macro_rules! family_suite {
    ($($module:ident: $kind:expr, $flavor:expr;)*) => {
        /// Every (kind, flavour) the suite runs for.
        const SUITES: &[(Kind, Flavor)] = &[$(($kind, $flavor)),*];
        $(
            mod $module {
                use super::*;

                every_check!(
                    $kind,
                    $flavor;
                    every_fixture_classifies_to_its_status,
                    every_callback_fixture_is_made_byte_for_byte,
                    every_failure_fixture_gives_one_error_with_its_code_and_message,
                    a_failure_without_a_usable_code_or_message_gets_the_defaults,
                    every_status_spelling_reads_as_documented,
                    pending_and_unknown_statuses_emit_nothing,
                    a_terminal_status_is_final,
                    the_error_event_and_the_endpoint_are_the_familys,
                );

                proptest! {
                    #[test]
                    fn parse_and_events_never_panic_and_stay_sound(
                        (data, reached) in any_answer($kind),
                    ) {
                        crate::with_family!($kind, $flavor, |f| {
                            events_are_sound(&f, $flavor, &data, reached)
                        })?;
                    }
                }
            }
        )*
    };
}

/// One `#[test]` per check, on the adapter of `$kind` in `$flavor`.
macro_rules! every_check {
    ($kind:expr, $flavor:expr; $($check:ident),* $(,)?) => {
        $(
            #[test]
            fn $check() {
                crate::with_family!($kind, $flavor, |f| {
                    super::$check(&f, $flavor, &spec_of(&f, $flavor))
                });
            }
        )*
    };
}

family_suite! {
    music_sunoapi: Kind::Music, Flavor::Sunoapi;
    music_kie: Kind::Music, Flavor::Kie;
    lyrics_sunoapi: Kind::Lyrics, Flavor::Sunoapi;
    lyrics_kie: Kind::Lyrics, Flavor::Kie;
    wav_sunoapi: Kind::Wav, Flavor::Sunoapi;
    wav_kie: Kind::Wav, Flavor::Kie;
    stems_sunoapi: Kind::Stems, Flavor::Sunoapi;
    stems_kie: Kind::Stems, Flavor::Kie;
    midi_sunoapi: Kind::Midi, Flavor::Sunoapi;
    midi_kie: Kind::Midi, Flavor::Kie;
    mp4_sunoapi: Kind::Mp4, Flavor::Sunoapi;
    mp4_kie: Kind::Mp4, Flavor::Kie;
    cover_sunoapi: Kind::Cover, Flavor::Sunoapi;
    cover_kie: Kind::Cover, Flavor::Kie;
}

#[test]
fn the_suite_runs_for_every_kind_in_every_flavour() {
    let every: Vec<(Kind, Flavor)> = Kind::ALL
        .into_iter()
        .flat_map(|k| Flavor::ALL.map(|f| (k, f)))
        .collect();
    assert_eq!(SUITES, every.as_slice());
}

/// `F`'s table in `flavor`.
fn spec_of<F: Conformance>(_: &F, flavor: Flavor) -> Spec<F> {
    F::spec(flavor)
}

/// The family and flavour, for messages.
fn who<F: Family>(f: &F, flavor: Flavor) -> String {
    format!("{} ({})", f.name(), flavor.as_str())
}

/// The task a fixture is about (`data.taskId`).
fn task_of(path: &str) -> String {
    json(std::str::from_utf8(&fixture(path)).expect("utf8"))["data"]["taskId"]
        .as_str()
        .expect("a fixture names its task")
        .to_owned()
}

/// Each record-info fixture reads as its outcome and status, with its results and the callback
/// URL it was submitted with.
fn every_fixture_classifies_to_its_status<F: Conformance>(f: &F, flavor: Flavor, spec: &Spec<F>) {
    assert!(!spec.fixtures.is_empty(), "{}", who(f, flavor));
    for &(file, outcome, status, results) in &spec.fixtures {
        let at = format!("{} {file}", who(f, flavor));
        let (got, r) = classified(f, &format!("{}{file}", spec.dir));
        assert_eq!(got, outcome, "{at}");
        assert_eq!(f.status(&r), status, "{at}");
        assert!(f.is_known(&r), "{at}");
        assert_eq!(f.is_running(&r), outcome == "pending", "{at}");
        assert_eq!((spec.results)(&r), results, "{at}: results");
        // Lyrics records carry no callbackUrl; the request in `param` does.
        assert_eq!(f.submitted_callback_url(&r).as_deref(), Some(HOOK), "{at}");
    }
}

/// Each callback fixture is the body its answer gives, byte for byte.
fn every_callback_fixture_is_made_byte_for_byte<F: Conformance>(
    f: &F,
    flavor: Flavor,
    spec: &Spec<F>,
) {
    assert!(!spec.callbacks.is_empty(), "{}", who(f, flavor));
    for c in &spec.callbacks {
        let at = format!("{} {} → {}", who(f, flavor), c.answer, c.callback);
        let answer = format!("{}{}", spec.dir, c.answer);
        let (_, r) = classified(f, &answer);
        let ev = f.events(&task_of(&answer), c.reached, &r, true);
        assert_eq!(ev.len(), 1, "{at}");
        assert_eq!((ev[0].stage, ev[0].code, ev[0].tracks), c.event, "{at}");
        assert_eq!(
            ev[0].body,
            minified(&format!("{}{}", spec.dir, c.callback)),
            "{at}"
        );
    }
}

/// Each failure fixture gives one `error`, with the API's code and message, whatever came
/// before and whether or not skipped stages are filled.
fn every_failure_fixture_gives_one_error_with_its_code_and_message<F: Conformance>(
    f: &F,
    flavor: Flavor,
    spec: &Spec<F>,
) {
    assert!(!spec.failures.is_empty(), "{}", who(f, flavor));
    for &(file, code, msg) in &spec.failures {
        let path = format!("{}{file}", spec.dir);
        let (task, (_, r)) = (task_of(&path), classified(f, &path));
        // After any stage that is not the last, with and without filling.
        for reached in [None, Some(Stage::Text), Some(Stage::First)] {
            for fill in [false, true] {
                let at = format!("{} {file} after {reached:?}", who(f, flavor));
                let ev = f.events(&task, reached, &r, fill);
                assert_eq!(ev.len(), 1, "{at}");
                assert_eq!(
                    (ev[0].stage, ev[0].code, ev[0].tracks),
                    (Stage::Error, code, 0),
                    "{at}"
                );
                assert_eq!(ev[0].body, (spec.failure_body)(&task, code, msg), "{at}");
            }
        }
    }
}

/// A failure whose `errorCode` is no failure code and whose message is blank gets the family's
/// defaults for its status.
fn a_failure_without_a_usable_code_or_message_gets_the_defaults<F: Conformance>(
    f: &F,
    flavor: Flavor,
    spec: &Spec<F>,
) {
    assert!(!spec.defaults.is_empty(), "{}", who(f, flavor));
    for (data, code, msg) in &spec.defaults {
        let (code, msg) = (*code, *msg);
        let r = f.parse(&json(data)).expect("parses");
        let ev = f.events(TASK, None, &r, true);
        assert_eq!(ev.len(), 1, "{} {data}", who(f, flavor));
        assert_eq!((ev[0].stage, ev[0].code), (Stage::Error, code), "{data}");
        assert_eq!(ev[0].body, (spec.failure_body)(TASK, code, msg), "{data}");
    }
}

/// Each spelling of a status reads as the family documents it.
fn every_status_spelling_reads_as_documented<F: Conformance>(
    f: &F,
    flavor: Flavor,
    spec: &Spec<F>,
) {
    let read = |status: &str| f.parse(&json(&format!(r#"{{"{}":{status}}}"#, spec.status_key)));
    let parse = |status: &str| read(status).expect("parses");
    let Some((class_of, spellings)) = &spec.spellings else {
        // Plain names: each documented one (its fixtures') is known as it is spelt, and in no
        // other case; a number is no name (refused, or a status nobody knows).
        for (_, _, status, _) in &spec.fixtures {
            let r = parse(&format!("{status:?}"));
            assert!(f.is_known(&r) && f.status(&r) == *status, "{status}");
            let r = parse(&format!("{:?}", status.to_lowercase()));
            assert!(
                !f.is_known(&r) && f.is_running(&r),
                "{} {status}",
                who(f, flavor)
            );
        }
        let number = read("1");
        assert!(
            number.is_err() || number.is_ok_and(|r| !f.is_known(&r)),
            "{}",
            who(f, flavor)
        );
        return;
    };
    assert!(!spellings.is_empty(), "{}", who(f, flavor));
    for &(spelling, class) in spellings {
        assert_eq!(
            class_of(&parse(spelling)),
            class,
            "{} {spelling}",
            who(f, flavor)
        );
    }
}

/// Nothing is due while a task runs, whether its status says so or is one nobody knows.
fn pending_and_unknown_statuses_emit_nothing<F: Conformance>(
    f: &F,
    flavor: Flavor,
    spec: &Spec<F>,
) {
    let pending: Vec<_> = spec
        .fixtures
        .iter()
        .filter(|(_, outcome, _, _)| *outcome == "pending")
        .collect();
    assert!(!pending.is_empty(), "{}", who(f, flavor));
    for (file, ..) in pending {
        let (_, r) = classified(f, &format!("{}{file}", spec.dir));
        assert!(f.events(TASK, None, &r, true).is_empty(), "{file}");
    }
    let r = f.parse(&json(spec.unknown)).expect("parses");
    assert!(f.is_running(&r) && !f.is_known(&r), "{}", spec.unknown);
    assert!(
        f.events(TASK, None, &r, true).is_empty(),
        "{}",
        spec.unknown
    );
}

/// After `complete` or `error`, no answer gives anything again, nor counts as going backwards.
fn a_terminal_status_is_final<F: Conformance>(f: &F, flavor: Flavor, spec: &Spec<F>) {
    let mut terminal = 0;
    for (file, ..) in &spec.fixtures {
        let (_, r) = classified(f, &format!("{}{file}", spec.dir));
        let ev = f.events(TASK, None, &r, true);
        if !ev.last().is_some_and(|e| e.stage.is_terminal()) {
            continue;
        }
        terminal += 1;
        assert!(!f.is_running(&r), "{file}");
        for reached in [Stage::Complete, Stage::Error] {
            let at = format!("{} {file} after {reached}", who(f, flavor));
            assert!(f.events(TASK, Some(reached), &r, true).is_empty(), "{at}");
            assert!(!f.went_backwards(&r, Some(reached)), "{at}");
        }
    }
    assert!(terminal >= 2, "{}: a success and a failure", who(f, flavor));
}

/// The failures sunopoll decides itself (deadline, rejections) have the family's failure body.
fn the_error_event_and_the_endpoint_are_the_familys<F: Conformance>(
    f: &F,
    flavor: Flavor,
    spec: &Spec<F>,
) {
    let ev: NewEvent = f.error_event(TASK, 408, "timed out");
    assert_eq!(
        (ev.stage, ev.code, ev.tracks, ev.filled),
        (Stage::Error, 408, 0, false)
    );
    assert_eq!(ev.body, (spec.failure_body)(TASK, 408, "timed out"));
    assert_eq!(
        (f.endpoint(), f.task_id_key()),
        (spec.endpoint, "taskId"),
        "{}",
        who(f, flavor)
    );
}

#[test]
fn every_fixture_is_in_a_familys_table() {
    fn named<F: Conformance>(_: &F, flavor: Flavor, names: &mut Vec<String>) {
        let spec = F::spec(flavor);
        let files = spec.fixtures.iter().map(|f| f.0);
        let files = files.chain(spec.callbacks.iter().flat_map(|c| [c.answer, c.callback]));
        let files = files.chain(spec.failures.iter().map(|f| f.0));
        names.extend(files.map(|f| format!("{}{f}", spec.dir)));
    }
    let mut names = Vec::new();
    for kind in Kind::ALL {
        for flavor in Flavor::ALL {
            crate::with_family!(kind, flavor, |f| named(&f, flavor, &mut names));
        }
    }
    let own = [
        include_str!("music.rs"),
        include_str!("lyrics.rs"),
        include_str!("wav.rs"),
        include_str!("stems.rs"),
        include_str!("midi.rs"),
        include_str!("mp4.rs"),
        include_str!("cover.rs"),
    ]
    .concat();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut seen = 0;
    for dir in ["families/", ""] {
        for entry in std::fs::read_dir(format!("{root}/{dir}")).expect("the fixtures are there") {
            let name = entry.expect("a directory entry").file_name();
            let name = format!("{dir}{}", name.to_string_lossy());
            // At the top, the error envelopes are the envelope's (`api::classify`). A fixture a
            // family's own test reads (music's `callback.error.json`, whose message differs) is
            // named there.
            let bare = name.rsplit('/').next().unwrap_or_default();
            if name.ends_with(".json") && !name.starts_with("error.") {
                assert!(
                    names.contains(&name) || own.contains(&format!("\"{bare}\"")),
                    "{name} is in no family's table"
                );
                seen += 1;
            }
        }
    }
    assert!(seen >= 57 + 19, "only {seen} fixtures");
}

/// The status key of `kind`'s family, and the statuses its table names: every fixture's and
/// every spelling's.
fn statuses(kind: Kind) -> (&'static str, Vec<Value>) {
    fn of<F: Conformance>(_: &F) -> (&'static str, Vec<Value>) {
        let spec = F::spec(Flavor::Sunoapi);
        let fixtures = spec
            .fixtures
            .iter()
            .map(|(_, _, status, _)| Value::from(*status));
        let spellings = spec
            .spellings
            .iter()
            .flat_map(|(_, s)| s.iter().map(|(v, _)| json(v)));
        (spec.status_key, fixtures.chain(spellings).collect())
    }
    crate::with_family!(kind, Flavor::Sunoapi, |f| of(&f))
}

/// A details `data` shaped like `kind`'s family's, and a stage reached before it.
fn any_answer(kind: Kind) -> impl Strategy<Value = (Value, Option<Stage>)> {
    let (key, values) = statuses(kind);
    (
        details(key, values),
        prop::option::of(prop::sample::select(Stage::ALL.to_vec())),
    )
}

/// What the property checks of one family's events: never after a terminal stage or while
/// running, always after `reached` and in order, one callback for a single-callback family,
/// every body JSON naming its task and carrying its code, the result exactly on `complete`.
fn events_are_sound<F: Conformance>(
    f: &F,
    flavor: Flavor,
    data: &Value,
    reached: Option<Stage>,
) -> Result<(), TestCaseError> {
    let spec = F::spec(flavor);
    let Ok(r) = f.parse(data) else {
        return Ok(());
    };
    let ev = f.events(TASK, reached, &r, true);
    if reached.is_some_and(Stage::is_terminal) || f.is_running(&r) {
        prop_assert!(ev.is_empty());
    } else if spec.one_callback {
        prop_assert_eq!(ev.len(), 1);
    }
    let mut last = reached;
    for e in ev {
        prop_assert!(
            last.is_none_or(|l| e.stage > l),
            "{:?} after {:?}",
            e.stage,
            last
        );
        last = Some(e.stage);
        let body: Value = serde_json::from_str(&e.body).expect("the body is JSON");
        prop_assert_eq!(&body["code"], &Value::from(e.code));
        prop_assert_eq!(body.pointer(spec.task_at), Some(&Value::from(TASK)));
        if let Some((at, is)) = spec.result_at {
            let present = body.pointer(at).is_some_and(is);
            prop_assert_eq!(e.stage == Stage::Complete, present, "{} {}", at, e.body);
        }
        if let Some(at) = spec.stage_at {
            prop_assert_eq!(body.pointer(at), Some(&Value::from(e.stage.as_str())));
        }
    }
    Ok(())
}

/// The bytes of `tests/fixtures/PATH`.
pub fn fixture(path: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A record-info fixture (`tests/fixtures/PATH`) through the real envelope rules, with its
/// outcome's kind.
pub fn classified<F: Family>(family: &F, path: &str) -> (&'static str, F::Record)
where
    F::Record: std::fmt::Debug,
{
    match classify(family, 200, None, &fixture(path)) {
        Outcome::Progress(r) => ("progress", r),
        Outcome::Pending(r) => ("pending", r),
        other => panic!("{path}: {other:?}"),
    }
}

/// The fixture `tests/fixtures/PATH` with whitespace outside strings removed: the bytes we
/// must produce.
pub fn minified(path: &str) -> String {
    let text = String::from_utf8(fixture(path)).expect("utf8");
    let (mut out, mut in_string, mut escaped) = (String::new(), false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !c.is_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// Parses a JSON literal of a test.
pub fn json(s: &str) -> Value {
    serde_json::from_str(s).expect("valid json")
}

/// Any JSON value, a few levels deep.
pub fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        any::<String>().prop_map(Value::String),
        "[A-Z_0-9]{0,24}".prop_map(Value::String),
        Just(Value::String("https://files.example.com/a.mp3".into())),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner.clone()), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            prop::collection::vec(
                (
                    prop::sample::select(vec![
                        "response",
                        "midiData",
                        "images",
                        "data",
                        "lyricsData",
                        "sunoData",
                        "audioWavUrl",
                        "audioUrl",
                        "videoUrl",
                        "originUrl",
                        "vocalUrl",
                        "Url",
                        "instruments",
                        "state",
                        "text",
                        "status",
                    ]),
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

/// A details `data` object shaped like the family's: its status field with a documented or
/// arbitrary value, the fields the families read, each plausible or arbitrary.
pub fn details(status_key: &'static str, statuses: Vec<Value>) -> impl Strategy<Value = Value> {
    (
        prop_oneof![prop::sample::select(statuses), json_value()],
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(prop_oneof![
            prop::sample::select(vec![Value::from(200), Value::from(500), "451".into()]),
            json_value()
        ]),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
    )
        .prop_map(
            move |(status, response, midi, code, message, callback, param)| {
                let mut m = serde_json::Map::new();
                m.insert(status_key.to_owned(), status);
                for (k, v) in [
                    ("response", response),
                    ("midiData", midi),
                    ("errorCode", code),
                    ("errorMessage", message),
                    ("callbackUrl", callback),
                    ("param", param),
                ] {
                    if let Some(v) = v {
                        m.insert(k.to_owned(), v);
                    }
                }
                Value::Object(m)
            },
        )
}
