//! Every task family end to end with the real binary (issue 11): `add --kind`, the family's
//! own details endpoint on a local fake, the family's exact callback body at a local handler,
//! in both provider flavours; accounts with their own keys, limits and pauses; kind errors; a
//! restart mid-way.
//!
//! The fake API answers every family's endpoint from `tests/fixtures/families/`, each fixture
//! rewritten for the task ID asked about; the handler must receive the matching callback
//! fixture, minified, byte for byte (with the same ID rewrite).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

use crate::binary::*;
use crate::helpers::*;

/// A fixture of `tests/fixtures/families/`.
fn family_fixture(name: &str) -> String {
    String::from_utf8(fixture(&format!("families/{name}"))).expect("utf8")
}

/// The task ID a fixture is about (`data.taskId`, `data.task_id`, or midi's top-level
/// `task_id`).
fn fixture_task_id(text: &str) -> String {
    let v: Value = serde_json::from_str(text).expect("fixture JSON");
    ["taskId", "task_id"]
        .iter()
        .find_map(|k| v["data"][k].as_str().or_else(|| v[k].as_str()))
        .expect("a fixture names its task")
        .to_owned()
}

/// `text` with the fixture's own task ID replaced by `id`.
pub(crate) fn for_task(text: &str, id: &str) -> String {
    text.replace(&fixture_task_id(text), id)
}

/// JSON text without the whitespace outside strings: how the daemon sends a body.
fn minify(text: &str) -> String {
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
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// The details path of each kind, as the API serves it.
fn endpoint(kind: &str) -> &'static str {
    match kind {
        "music" => "/api/v1/generate/record-info",
        "lyrics" => "/api/v1/lyrics/record-info",
        "wav" => "/api/v1/wav/record-info",
        "stems" => "/api/v1/vocal-removal/record-info",
        "midi" => "/api/v1/midi/record-info",
        "mp4" => "/api/v1/mp4/record-info",
        "cover" => "/api/v1/suno/cover/record-info",
        other => panic!("no kind {other}"),
    }
}

#[derive(Default)]
struct FamilyState {
    /// (path, task) → answers, one per poll; the last repeats.
    scripts: HashMap<(String, String), Vec<(u16, String)>>,
    served: HashMap<(String, String), usize>,
    /// Requests per (path, task), answered or not.
    calls: HashMap<(String, String), usize>,
    /// Requests that came with an unscripted path or task.
    strays: Vec<String>,
    /// While set, every request gets this (a throttle, say).
    override_all: Option<(u16, String)>,
    /// Authorization headers seen.
    auth: Vec<String>,
}

/// A fake of every family's details endpoint, on 127.0.0.1.
pub(crate) struct FamilyApi {
    server: MockServer,
    state: Arc<Mutex<FamilyState>>,
}

struct FamilyRouter(Arc<Mutex<FamilyState>>);

impl Respond for FamilyRouter {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let task = request
            .url
            .query_pairs()
            .find(|(k, _)| k == "taskId")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let key = (request.url.path().to_owned(), task);
        let mut s = self.0.lock().expect("state");
        if let Some(a) = request.headers.get("authorization") {
            s.auth.push(a.to_str().unwrap_or("?").to_owned());
        }
        *s.calls.entry(key.clone()).or_insert(0) += 1;
        let (status, body) = if let Some(r) = &s.override_all {
            r.clone()
        } else if let Some(script) = s.scripts.get(&key).cloned() {
            let served = s.served.entry(key.clone()).or_insert(0);
            let n = *served;
            *served += 1;
            script[n.min(script.len() - 1)].clone()
        } else {
            s.strays.push(format!("{} {}", key.0, key.1));
            (404, r#"{"code":404,"msg":"not found"}"#.to_owned())
        };
        ResponseTemplate::new(status).set_body_raw(body, "application/json")
    }
}

impl FamilyApi {
    pub(crate) async fn start() -> FamilyApi {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(FamilyState::default()));
        Mock::given(method("GET"))
            .respond_with(FamilyRouter(state.clone()))
            .mount(&server)
            .await;
        FamilyApi { server, state }
    }

    /// `task` of `kind` answers these fixtures in turn (each rewritten for `task`).
    fn script(&self, kind: &str, task: &str, fixtures: &[&str]) {
        let answers = fixtures
            .iter()
            .map(|f| (200, for_task(&family_fixture(f), task)))
            .collect();
        self.script_raw(kind, task, answers);
    }

    pub(crate) fn script_raw(&self, kind: &str, task: &str, answers: Vec<(u16, String)>) {
        self.state
            .lock()
            .expect("state")
            .scripts
            .insert((endpoint(kind).to_owned(), task.to_owned()), answers);
    }

    fn calls(&self, kind: &str, task: &str) -> usize {
        let s = self.state.lock().expect("state");
        s.calls
            .get(&(endpoint(kind).to_owned(), task.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.state.lock().expect("state").calls.values().sum()
    }

    pub(crate) fn strays(&self) -> Vec<String> {
        self.state.lock().expect("state").strays.clone()
    }

    fn set_override(&self, answer: Option<(u16, String)>) {
        self.state.lock().expect("state").override_all = answer;
    }

    fn auth(&self) -> Vec<String> {
        self.state.lock().expect("state").auth.clone()
    }

    pub(crate) fn uri(&self) -> String {
        self.server.uri()
    }
}

/// One family case: the kind, the fixtures the API answers in turn, and the callback fixture
/// the handler must receive.
struct Case {
    kind: &'static str,
    answers: &'static [&'static str],
    callback: &'static str,
    stage: &'static str,
}

/// Every family and outcome in the sunoapi spelling: pending then each final status, an
/// integer flag sent as a string, and each family's failures.
const SUNOAPI_CASES: &[Case] = &[
    Case {
        kind: "lyrics",
        answers: &[
            "lyrics.record-info.PENDING.json",
            "lyrics.record-info.SUCCESS.json",
        ],
        callback: "lyrics.callback.complete.json",
        stage: "complete",
    },
    Case {
        kind: "lyrics",
        answers: &[
            "lyrics.record-info.PENDING.json",
            "lyrics.record-info.GENERATE_LYRICS_FAILED.json",
        ],
        callback: "lyrics.callback.error.json",
        stage: "error",
    },
    Case {
        kind: "wav",
        answers: &[
            "wav.record-info.PENDING.json",
            "wav.record-info.SUCCESS.json",
        ],
        callback: "wav.callback.complete.json",
        stage: "complete",
    },
    Case {
        kind: "wav",
        answers: &[
            "wav.record-info.PENDING.json",
            "wav.record-info.GENERATE_WAV_FAILED.json",
        ],
        callback: "wav.callback.error.json",
        stage: "error",
    },
    Case {
        kind: "stems",
        answers: &[
            "stems.record-info.PENDING.json",
            "stems.record-info.SUCCESS.json",
        ],
        callback: "stems.callback.complete.json",
        stage: "complete",
    },
    Case {
        kind: "stems",
        answers: &[
            "stems.record-info.PENDING.json",
            "stems.record-info.SUCCESS.split_stem.json",
        ],
        callback: "stems.callback.complete.split_stem.json",
        stage: "complete",
    },
    Case {
        kind: "stems",
        answers: &[
            "stems.record-info.PENDING.json",
            "stems.record-info.GENERATE_AUDIO_FAILED.json",
        ],
        callback: "stems.callback.error.json",
        stage: "error",
    },
    Case {
        kind: "midi",
        answers: &[
            "midi.record-info.PENDING.json",
            "midi.record-info.SUCCESS.json",
        ],
        callback: "midi.callback.complete.json",
        stage: "complete",
    },
    Case {
        kind: "midi",
        answers: &[
            "midi.record-info.PENDING.json",
            "midi.record-info.SUCCESS.lenient.json",
        ],
        callback: "midi.callback.complete.lenient.json",
        stage: "complete",
    },
    Case {
        kind: "midi",
        answers: &[
            "midi.record-info.PENDING.json",
            "midi.record-info.GENERATE_MIDI_FAILED.json",
        ],
        callback: "midi.callback.error.json",
        stage: "error",
    },
    Case {
        kind: "mp4",
        answers: &[
            "mp4.record-info.PENDING.json",
            "mp4.record-info.SUCCESS.json",
        ],
        callback: "mp4.callback.complete.json",
        stage: "complete",
    },
    Case {
        kind: "mp4",
        answers: &[
            "mp4.record-info.PENDING.json",
            "mp4.record-info.GENERATE_MP4_FAILED.json",
        ],
        callback: "mp4.callback.error.json",
        stage: "error",
    },
    Case {
        kind: "cover",
        answers: &[
            "cover.record-info.PENDING.json",
            "cover.record-info.GENERATING.json",
            "cover.record-info.SUCCESS.json",
        ],
        callback: "cover.callback.complete.json",
        stage: "complete",
    },
    Case {
        kind: "cover",
        answers: &[
            "cover.record-info.PENDING.json",
            "cover.record-info.SUCCESS.string-flag.json",
        ],
        callback: "cover.callback.complete.json",
        stage: "complete",
    },
    Case {
        kind: "cover",
        answers: &[
            "cover.record-info.PENDING.json",
            "cover.record-info.FAILED.json",
        ],
        callback: "cover.callback.error.json",
        stage: "error",
    },
];

/// The families whose bodies differ on kie, in kie's spelling.
const KIE_CASES: &[Case] = &[
    Case {
        kind: "lyrics",
        answers: &[
            "lyrics.record-info.PENDING.json",
            "lyrics.record-info.SUCCESS.kie.json",
        ],
        callback: "lyrics.callback.complete.kie.json",
        stage: "complete",
    },
    Case {
        kind: "lyrics",
        answers: &["lyrics.record-info.GENERATE_LYRICS_FAILED.json"],
        callback: "lyrics.callback.error.kie.json",
        stage: "error",
    },
    Case {
        kind: "stems",
        answers: &[
            "stems.record-info.PENDING.json",
            "stems.record-info.SUCCESS.kie.json",
        ],
        callback: "stems.callback.complete.kie.json",
        stage: "complete",
    },
    Case {
        kind: "stems",
        answers: &["stems.record-info.GENERATE_AUDIO_FAILED.json"],
        callback: "stems.callback.error.kie.json",
        stage: "error",
    },
    Case {
        kind: "mp4",
        answers: &[
            "mp4.record-info.PENDING.json",
            "mp4.record-info.SUCCESS.kie.json",
        ],
        callback: "mp4.callback.complete.kie.json",
        stage: "complete",
    },
];

/// A task ID for case `i` of a run: 32 hex characters, like real ones.
fn case_id(prefix: char, i: usize) -> String {
    format!("{prefix}{i:031x}")
}

/// Adds each case's task with the real CLI and returns (id, case) pairs.
async fn add_cases<'c>(
    d: &BinDaemon,
    api: &FamilyApi,
    cases: &'c [Case],
    prefix: char,
    account: Option<&str>,
) -> Vec<(String, &'c Case)> {
    let mut out = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let id = case_id(prefix, i);
        api.script(case.kind, &id, case.answers);
        let mut args = vec!["add", "--kind", case.kind, id.as_str()];
        if let Some(a) = account {
            args.extend(["--account", a]);
        }
        let out_ = d.cli(&args).await;
        assert!(out_.status.success(), "add: {}", text(&out_.stderr));
        out.push((id, case));
    }
    out
}

/// Checks that the handler got exactly one body per case, each the case's callback fixture
/// byte for byte, and that `show` and `events --json` name the kind.
async fn check_bodies(d: &BinDaemon, handler: &Receiver, added: &[(String, &Case)]) {
    let ids: Vec<String> = added.iter().map(|(id, _)| id.clone()).collect();
    assert!(d.wait_finished(&ids).await, "{}", d.log_text());
    let deadline = Deadline::patience();
    wait_until(deadline, "every callback delivered", || {
        handler.received().len() >= added.len()
    })
    .await;
    let received = handler.received();
    for (id, case) in added {
        let bodies: Vec<String> = received
            .iter()
            .filter(|r| String::from_utf8_lossy(&r.body).contains(id.as_str()))
            .map(|r| String::from_utf8(r.body.clone()).expect("utf8"))
            .collect();
        let expected = minify(&for_task(&family_fixture(case.callback), id));
        assert_eq!(
            bodies,
            vec![expected],
            "{} task {id} ({:?}): the handler must get {} once, byte for byte",
            case.kind,
            case.answers,
            case.callback
        );
        let show = d
            .request(serde_json::json!({"cmd": "show", "task_id": id}))
            .await;
        assert_eq!(show["task"]["kind"], case.kind, "{show}");
        assert_eq!(show["events"][0]["stage"], case.stage, "{show}");
        assert_eq!(show["events"][0]["kind"], case.kind, "{show}");
    }
}

fn config_with_handler(api: &FamilyApi, handler: &Receiver) -> BinConfig {
    let mut config = BinConfig::new(&api.uri());
    let mut target = BinTarget::new("app", &handler.url());
    target.with_secrets = false;
    config.targets.push(target);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_reaches_the_handler_byte_for_byte_in_the_sunoapi_spelling() {
    let api = FamilyApi::start().await;
    let handler = Receiver::start().await;
    let d = BinDaemon::start(&config_with_handler(&api, &handler)).await;
    let added = add_cases(&d, &api, SUNOAPI_CASES, 'a', None).await;
    check_bodies(&d, &handler, &added).await;
    // Each task was asked about on its own family's endpoint only, and no poll followed its end.
    assert!(
        api.strays().is_empty(),
        "requests to unscripted endpoints: {:?}",
        api.strays()
    );
    for (id, case) in &added {
        assert_eq!(
            api.calls(case.kind, id),
            case.answers.len(),
            "{} {id}",
            case.kind
        );
    }
    // `list` and `events --json` show the kind; the human list too.
    let list = d.cli(&["list", "--json"]).await;
    let list: Value = serde_json::from_slice(&list.stdout).expect("list json");
    for t in list["tasks"].as_array().expect("tasks") {
        assert_ne!(t["kind"], "music", "{t}");
    }
    let events = d.cli(&["events", "--json"]).await;
    let first: Value = serde_json::from_str(text(&events.stdout).lines().next().expect("an event"))
        .expect("event json");
    assert!(
        first["kind"].is_string() && first["kind"] != "music",
        "{first}"
    );
    let human = text(&d.cli(&["list"]).await.stdout);
    assert!(human.contains("wav") && human.contains("stems"), "{human}");
    let log = d.log_text();
    assert!(
        log.contains("kind=wav") || log.contains("kind=\"wav\""),
        "the add is logged with its kind:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kie_account_and_a_sunoapi_account_in_one_daemon_each_get_their_own_spelling() {
    let sunoapi = FamilyApi::start().await;
    let kie = FamilyApi::start().await;
    let handler = Receiver::start().await;
    let mut config = config_with_handler(&sunoapi, &handler);
    config.extra = format!(
        r#"
[[api.account]]
name = "main"
base-url = "{}"

[[api.account]]
name = "kie"
base-url = "{}"
flavor = "kie"
"#,
        sunoapi.uri(),
        kie.uri()
    );
    let mut d = BinDaemon::prepare(&config);
    d.env.push(("SUNO_API_KEY_MAIN".into(), "main-key".into()));
    d.env.push(("SUNO_API_KEY_KIE".into(), "kie-key".into()));
    d.restart().await;
    // The sunoapi spelling on the first (default) account, kie's on the kie account.
    let mut added = add_cases(&d, &sunoapi, &SUNOAPI_CASES[..6], 'b', None).await;
    added.extend(add_cases(&d, &kie, KIE_CASES, 'c', Some("kie")).await);
    check_bodies(&d, &handler, &added).await;
    assert!(sunoapi.strays().is_empty() && kie.strays().is_empty());
    // Each account asked with its own key.
    assert!(
        sunoapi.auth().iter().all(|a| a == "Bearer main-key"),
        "{:?}",
        sunoapi.auth()
    );
    assert!(
        kie.auth().iter().all(|a| a == "Bearer kie-key"),
        "{:?}",
        kie.auth()
    );
    let status = d.status().await;
    let names: Vec<&str> = status["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .map(|a| a["account"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(names, ["main", "kie"], "{status}");
    assert_eq!(status["accounts"][1]["flavor"], "kie", "{status}");
    let shown = d
        .request(serde_json::json!({"cmd": "show", "task_id": case_id('c', 0)}))
        .await;
    assert_eq!(shown["task"]["account"], "kie", "{shown}");
}

/// A kind a task does not have, an unknown kind, an unknown account: each a clear error that
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_and_account_mistakes_are_refused_and_change_nothing() {
    let api = FamilyApi::start().await;
    let d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let wav = case_id('d', 1);
    let fresh = case_id('d', 2);
    api.script("wav", &wav, &["wav.record-info.PENDING.json"]);
    assert!(
        d.cli(&["add", "--kind", "wav", &wav])
            .await
            .status
            .success()
    );

    let out = d.cli(&["add", &fresh, &wav]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{wav} is a wav task")) && err.contains("nothing was added"),
        "{err}"
    );
    let states = d.states().await;
    assert!(
        !states.contains_key(&fresh),
        "a refused add added {fresh}: {states:?}"
    );
    let shown = d
        .request(serde_json::json!({"cmd": "show", "task_id": wav}))
        .await;
    assert_eq!(
        shown["task"]["kind"], "wav",
        "the task was not re-kinded: {shown}"
    );

    // The same over the socket, with its error code.
    let v = d
        .request(serde_json::json!({"cmd": "add", "task_ids": [wav], "kind": "stems"}))
        .await;
    assert_eq!(v["error"]["code"], "kind_conflict", "{v}");
    let v = d
        .request(serde_json::json!({"cmd": "add", "task_ids": [fresh], "kind": "video"}))
        .await;
    assert_eq!(v["error"]["code"], "invalid_kind", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("music, lyrics, wav"),
        "{v}"
    );
    let v = d
        .request(serde_json::json!({"cmd": "add", "task_ids": [fresh], "account": "nope"}))
        .await;
    assert_eq!(v["error"]["code"], "unknown_account", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("default"),
        "{v}"
    );

    // The CLI refuses an unknown kind before asking the daemon (a usage error, exit 2).
    let out = d.cli(&["add", "--kind", "video", &fresh]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the kinds are music, lyrics, wav, stems, midi, mp4, cover")
    );
    assert!(!d.states().await.contains_key(&fresh));
    // Adding it again under its own kind is fine and changes nothing.
    let out = d.cli(&["add", "--kind", "wav", &wav]).await;
    assert!(
        out.status.success() && text(&out.stdout).contains("known"),
        "{}",
        text(&out.stdout)
    );
}

/// A non-music task survives a restart mid-way: it resumes on its own endpoint, its body is
/// delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stems_task_resumes_after_a_restart_on_its_own_endpoint() {
    let api = FamilyApi::start().await;
    let handler = Receiver::start().await;
    let mut d = BinDaemon::start(&config_with_handler(&api, &handler)).await;
    let id = case_id('e', 0);
    api.script("stems", &id, &["stems.record-info.PENDING.json"]);
    assert!(
        d.cli(&["add", "--kind", "stems", &id])
            .await
            .status
            .success()
    );
    wait_until(Deadline::patience(), "two polls before the restart", || {
        api.calls("stems", &id) >= 2
    })
    .await;
    d.terminate().await;
    api.script(
        "stems",
        &id,
        &[
            "stems.record-info.PENDING.json",
            "stems.record-info.SUCCESS.json",
        ],
    );
    d.restart().await;
    let case = &SUNOAPI_CASES[4];
    assert_eq!(case.callback, "stems.callback.complete.json");
    check_bodies(&d, &handler, &[(id.clone(), case)]).await;
    assert!(api.strays().is_empty(), "{:?}", api.strays());
}

/// A body that cannot be parsed is a broken answer for that task alone: it is asked again and
/// completes from the next good answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_family_answer_is_retried_not_fatal() {
    let api = FamilyApi::start().await;
    let handler = Receiver::start().await;
    let d = BinDaemon::start(&config_with_handler(&api, &handler)).await;
    let id = case_id('f', 0);
    let good = for_task(&family_fixture("midi.record-info.SUCCESS.json"), &id);
    api.script_raw(
        "midi",
        &id,
        vec![
            (
                200,
                r#"{"code":200,"msg":"success","data":{"taskId":"#.to_owned(),
            ),
            (200, good),
        ],
    );
    assert!(
        d.cli(&["add", "--kind", "midi", &id])
            .await
            .status
            .success()
    );
    let case = &SUNOAPI_CASES[7];
    assert_eq!(case.callback, "midi.callback.complete.json");
    check_bodies(&d, &handler, &[(id.clone(), case)]).await;
    assert_eq!(api.calls("midi", &id), 2);
}

/// Two accounts: one throttled (and rate-limited low), one not. The throttled key pauses only
/// its own tasks; the other account keeps polling at its own rate meanwhile; both finish; each
/// account is labelled in `status` and in the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_account_holds_back_only_its_own_tasks() {
    let fast = FamilyApi::start().await;
    let slow = FamilyApi::start().await;
    let handler = Receiver::start().await;
    let mut config = config_with_handler(&fast, &handler);
    config.extra = format!(
        r#"
[[api.account]]
name = "fast"
base-url = "{}"
max-requests-per-second = 20

[[api.account]]
name = "slow"
base-url = "{}"
max-requests-per-second = 5
max-in-flight = 1

[metrics]
listen = "127.0.0.1:0"
"#,
        fast.uri(),
        slow.uri()
    );
    let mut d = BinDaemon::prepare(&config);
    d.env.push(("SUNO_API_KEY_FAST".into(), "fast-key".into()));
    d.env.push(("SUNO_API_KEY_SLOW".into(), "slow-key".into()));
    d.restart().await;

    // The slow account's API throttles everything for now.
    slow.set_override(Some((
        200,
        String::from_utf8(fixture("error.429.rate-limited.kie.json")).expect("utf8"),
    )));
    let pending = |n| vec!["wav.record-info.PENDING.json"; n];
    let mut slow_ids = Vec::new();
    for i in 0..3 {
        let id = case_id('s', i);
        let mut answers = pending(2);
        answers.push("wav.record-info.SUCCESS.json");
        slow.script("wav", &id, &answers);
        assert!(
            d.cli(&["add", "--kind", "wav", "--account", "slow", &id])
                .await
                .status
                .success()
        );
        slow_ids.push(id);
    }
    wait_until(Deadline::patience(), "the slow account paused", || {
        slow.total() >= 1
    })
    .await;
    let paused = poll_until(
        Deadline::patience(),
        "status shows the slow account paused",
        Duration::from_millis(20),
        || async {
            let s = d.status().await;
            (s["accounts"][1]["state"] != "polling").then_some(s)
        },
    )
    .await;
    assert_eq!(paused["accounts"][1]["pause_kind"], "throttled", "{paused}");
    assert_eq!(
        paused["accounts"][0]["state"], "polling",
        "the other account is not paused: {paused}"
    );

    // Meanwhile the fast account's tasks are polled and finish, at its own rate.
    let fast_started = std::time::Instant::now();
    let slow_before = slow.total();
    let mut fast_ids = Vec::new();
    for i in 0..4 {
        let id = case_id('t', i);
        let mut answers = pending(5);
        answers.push("wav.record-info.SUCCESS.json");
        fast.script("wav", &id, &answers);
        fast_ids.push(id);
    }
    let mut args = vec!["add", "--kind", "wav"];
    args.extend(fast_ids.iter().map(String::as_str));
    assert!(d.cli(&args).await.status.success());
    assert!(d.wait_finished(&fast_ids).await, "{}", d.log_text());
    let fast_secs = fast_started.elapsed().as_secs_f64();
    let fast_requests = fast.total();
    assert_eq!(fast_requests, 24, "6 answers for each of 4 tasks");
    // Its own ceiling (20/s) bounds it, not the slow account's 5/s: 24 requests at 5/s would
    // take at least 4.6 s.
    assert!(
        fast_requests as f64 / fast_secs <= 20.0 * 1.1 + 1.0,
        "{fast_requests} in {fast_secs:.2}s"
    );
    // While paused, the slow account sent at most its probes: one at a time, backing off.
    let slow_during = slow.total() - slow_before;
    assert!(
        slow_during as f64 <= fast_secs / 0.1 + 1.0,
        "{slow_during} slow requests in {fast_secs:.2}s"
    );
    let states = d.states().await;
    assert!(
        slow_ids.iter().all(|id| states[id] == "active"),
        "{states:?}"
    );

    // The throttle lifts; the slow account's tasks finish too.
    slow.set_override(None);
    assert!(d.wait_finished(&slow_ids).await, "{}", d.log_text());
    assert!(fast.auth().iter().all(|a| a == "Bearer fast-key"));
    assert!(slow.auth().iter().all(|a| a == "Bearer slow-key"));

    // Metrics: requests and tasks labelled per account and kind.
    let addr = d.log_text();
    let listen = addr
        .lines()
        .find_map(|l| l.split("serving metrics at http://").nth(1))
        .and_then(|rest| rest.split('/').next())
        .expect("the metrics address in the log")
        .to_owned();
    let body = crate::metrics::scrape(listen.parse().expect("an address")).await;
    for want in [r#"account="fast""#, r#"account="slow""#, r#"kind="wav""#] {
        assert!(body.contains(want), "{want} missing from:\n{body}");
    }
    let status = d.status().await;
    assert_eq!(status["accounts"][1]["account"], "slow", "{status}");
    assert!(
        status["accounts"][1]["rate_limit"].as_f64() == Some(5.0),
        "{status}"
    );
}

/// A target's `kinds` filter: a wav task's event goes to the target that takes wav, never to
/// one that takes only music, not even when the task is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_filtered_by_kinds_gets_only_those_kinds_even_on_redelivery() {
    let api = FamilyApi::start().await;
    let music_only = Receiver::start().await;
    let wav_only = Receiver::start().await;
    let mut config = BinConfig::new(&api.uri());
    config.extra = format!(
        r#"
[[forward.target]]
name = "music-app"
url = "{}"
kinds = ["music"]

[[forward.target]]
name = "wav-app"
url = "{}"
kinds = ["wav"]
"#,
        music_only.url(),
        wav_only.url()
    );
    let d = BinDaemon::start(&config).await;
    let id = case_id('k', 0);
    api.script("wav", &id, &["wav.record-info.SUCCESS.json"]);
    assert!(d.cli(&["add", "--kind", "wav", &id]).await.status.success());
    assert!(d.wait_finished(std::slice::from_ref(&id)).await);
    wait_until(Deadline::patience(), "the wav target got its event", || {
        wav_only.count() == 1
    })
    .await;
    let out = d.cli(&["redeliver", "--task", &id, "--json"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["deliveries"], 1,
        "only the wav target's delivery is replayed: {v}"
    );
    wait_until(
        Deadline::patience(),
        "the replay reached the wav target",
        || wav_only.count() == 2,
    )
    .await;
    assert_eq!(music_only.count(), 0, "a music-only target got a wav event");
    let expected = minify(&for_task(
        &family_fixture("wav.callback.complete.json"),
        &id,
    ));
    assert!(
        wav_only
            .received()
            .iter()
            .all(|r| r.body == expected.as_bytes())
    );
}

/// What an account learnt from being throttled survives a restart: it resumes at the learnt
/// rate instead of being throttled again to relearn it, and `status` shows it from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learnt_rate_is_kept_across_a_restart() {
    let api = FamilyApi::start().await;
    let mut config = BinConfig::new(&api.uri());
    config.rps = "10".to_owned();
    let mut d = BinDaemon::start(&config).await;
    let id = case_id('l', 0);
    api.script("wav", &id, &["wav.record-info.PENDING.json"]);
    api.set_override(Some((
        200,
        String::from_utf8(fixture("error.429.rate-limited.kie.json")).expect("utf8"),
    )));
    assert!(d.cli(&["add", "--kind", "wav", &id]).await.status.success());
    let learnt = poll_until(
        Deadline::patience(),
        "a rate learnt from the throttle",
        Duration::from_millis(20),
        || async {
            let s = d.status().await;
            s["accounts"][0]["learnt_rate"].as_f64()
        },
    )
    .await;
    assert!(learnt < 10.0, "{learnt}");
    // Once the API answers again no throttle can lower it further, and a climb takes 30 s:
    // the rate read now is the one stored.
    api.set_override(None);
    let learnt = poll_until(
        Deadline::patience(),
        "an answer that is not a throttle",
        Duration::from_millis(20),
        || async {
            let s = d.status().await;
            (s["accounts"][0]["last_answer"] == "pending")
                .then(|| s["accounts"][0]["learnt_rate"].as_f64())
                .flatten()
        },
    )
    .await;
    d.terminate().await;
    d.restart().await;
    let s = d.status().await;
    assert_eq!(
        s["accounts"][0]["learnt_rate"].as_f64(),
        Some(learnt),
        "the learnt rate is kept: {s}"
    );
    assert!(
        d.log_text()
            .contains("resuming at the request rate learnt from the API's throttling"),
        "{}",
        d.log_text()
    );
}
