//! The API stand-in (`[proxy]`, issue 23) with the real binary: a fake API of its own that
//! serves every submission path of `../shared/api/submissions.md` §2, every call of §3 and
//! every family's details endpoint; an application that only changes its base URL; and what
//! must never happen (a second paid task, a key in the log, a task lost to a kill).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

use crate::binary::*;
use crate::families::{family_fixture, for_task, minify};
use crate::helpers::*;

/// A local token mapped to the default account.
const TOKEN: &str = "local-proxy-token-0123456789";

/// Every submission path, the family it creates, and the fixtures its task answers with on its
/// details endpoint (pending, then success) and the callback the handler must get.
const PATHS: &[(&str, &str)] = &[
    ("/api/v1/generate", "music"),
    ("/api/v1/generate/extend", "music"),
    ("/api/v1/generate/upload-cover", "music"),
    ("/api/v1/generate/upload-extend", "music"),
    ("/api/v1/generate/add-instrumental", "music"),
    ("/api/v1/generate/add-vocals", "music"),
    ("/api/v1/generate/replace-section", "music"),
    ("/api/v1/generate/mashup", "music"),
    ("/api/v1/generate/sounds", "music"),
    ("/api/v1/lyrics", "lyrics"),
    ("/api/v1/wav/generate", "wav"),
    ("/api/v1/vocal-removal/generate", "stems"),
    ("/api/v1/midi/generate", "midi"),
    ("/api/v1/mp4/generate", "mp4"),
    ("/api/v1/suno/cover/generate", "cover"),
];

/// (pending record, success record, success callback) of a kind.
fn fixtures(kind: &str) -> (String, String, String) {
    let fam = |name: &str| family_fixture(&format!("{kind}.{name}"));
    match kind {
        "music" => (
            text(&fixture("record-info.PENDING.json")),
            text(&fixture("record-info.SUCCESS.json")),
            text(&fixture("callback.complete.json")),
        ),
        _ => (
            fam("record-info.PENDING.json"),
            fam("record-info.SUCCESS.json"),
            fam("callback.complete.json"),
        ),
    }
}

/// The details path of a kind.
fn details(kind: &str) -> &'static str {
    crate::families::endpoint(kind)
}

/// One request the fake API received.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// A scripted answer to the next request on a path.
#[derive(Clone, Debug)]
struct Scripted {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    delay: Duration,
    /// The task this answer creates (its details are then served), if any.
    creates: Option<(String, String)>,
}

#[derive(Default)]
struct FakeState {
    seen: Vec<Seen>,
    created: usize,
    scripted: HashMap<String, VecDeque<Scripted>>,
    /// (details path, task) → answers, the last repeating.
    details: HashMap<(String, String), (Vec<String>, usize)>,
    /// Sent with every details answer while set (a throttle's `Retry-After`).
    details_retry_after: Option<String>,
}

/// The fake API: submissions create tasks (with fresh 32-character IDs) whose details go
/// pending then successful; the calls that create nothing answer as the API does.
struct SubmitApi {
    server: MockServer,
    state: Arc<Mutex<FakeState>>,
    prefix: char,
}

struct FakeRouter(Arc<Mutex<FakeState>>, char);

impl Respond for FakeRouter {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let path = request.url.path().to_owned();
        let mut s = self.0.lock().expect("state");
        s.seen.push(Seen {
            method: request.method.to_string(),
            path: path.clone(),
            headers: request
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("?").to_owned()))
                .collect(),
            body: request.body.clone(),
        });
        if let Some(next) = s.scripted.get_mut(&path).and_then(VecDeque::pop_front) {
            if let Some((id, kind)) = &next.creates {
                let (pending, success, _) = fixtures(kind);
                s.details.insert(
                    (details(kind).to_owned(), id.clone()),
                    (vec![for_task(&pending, id), for_task(&success, id)], 0),
                );
            }
            let mut t = ResponseTemplate::new(next.status)
                .set_body_raw(next.body, "application/json")
                .set_delay(next.delay);
            for (k, v) in &next.headers {
                t = t.insert_header(k.as_str(), v.as_str());
            }
            return t;
        }
        let json = |body: &str| {
            ResponseTemplate::new(200).set_body_raw(body.as_bytes().to_vec(), "application/json")
        };
        let post = request.method.as_str() == "POST";
        if let Some((_, kind)) = PATHS.iter().find(|(p, _)| *p == path)
            && post
        {
            s.created += 1;
            let id = format!("{}{:031x}", self.1, s.created);
            let (pending, success, _) = fixtures(kind);
            s.details.insert(
                (details(kind).to_owned(), id.clone()),
                (vec![for_task(&pending, &id), for_task(&success, &id)], 0),
            );
            return json(&format!(
                r#"{{"code":200,"msg":"success","data":{{"taskId":"{id}"}}}}"#
            ));
        }
        let task = request
            .url
            .query_pairs()
            .find(|(k, _)| k == "taskId")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let retry_after = s.details_retry_after.clone();
        if let Some((answers, served)) = s.details.get_mut(&(path.clone(), task)) {
            let a = answers[(*served).min(answers.len() - 1)].clone();
            *served += 1;
            let mut t = json(&a);
            if let Some(ra) = retry_after {
                t = t.insert_header("retry-after", ra.as_str());
            }
            return t;
        }
        match path.as_str() {
            p if p.ends_with("/record-info") => json(r#"{"code":200,"msg":"success","data":null}"#),
            "/api/v1/generate/credit" | "/api/v1/chat/credit" => {
                json(r#"{"code":200,"msg":"success","data":42}"#)
            }
            "/api/v1/generate/generate-persona" => json(
                r#"{"code":200,"msg":"success","data":{"personaId":"p-1","name":"N","description":"D"}}"#,
            ),
            "/api/v1/generate/get-timestamped-lyrics" => json(
                r#"{"code":200,"msg":"success","data":{"alignedWords":[{"word":"la","startS":0.18229166666666666,"endS":1e-7}]}}"#,
            ),
            // Synchronous, though it answers a taskId: never to be tracked.
            "/api/v1/style/generate" => json(
                r#"{"code":200,"msg":"success","data":{"taskId":"boost00000000000000000000000001","result":"pop, upbeat"}}"#,
            ),
            p if p.starts_with("/api/v1/voice/") => json(
                r#"{"code":200,"msg":"success","data":{"taskId":"voice00000000000000000000000001"}}"#,
            ),
            "/api/v1/jobs/createTask" => json(
                r#"{"code":200,"msg":"success","data":{"taskId":"job000000000000000000000000001"}}"#,
            ),
            _ => ResponseTemplate::new(404).set_body_raw(
                br#"{"code":404,"msg":"not found","data":null}"#.to_vec(),
                "application/json",
            ),
        }
    }
}

impl SubmitApi {
    async fn start(prefix: char) -> SubmitApi {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(FakeState::default()));
        Mock::given(wiremock::matchers::any())
            .respond_with(FakeRouter(state.clone(), prefix))
            .mount(&server)
            .await;
        SubmitApi {
            server,
            state,
            prefix,
        }
    }

    fn uri(&self) -> String {
        self.server.uri()
    }

    /// The next request on `path` gets this answer.
    fn script(&self, path: &str, answer: Scripted) {
        self.state
            .lock()
            .expect("state")
            .scripted
            .entry(path.to_owned())
            .or_default()
            .push_back(answer);
    }

    /// A task ID of this fake's own, for scripted answers.
    fn id(&self, n: usize) -> String {
        format!("{}{:031x}", self.prefix, 0xf000 + n)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("state").seen.clone()
    }

    /// Requests other than polls of details endpoints.
    fn seen_not_polls(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| !s.path.ends_with("/record-info") || s.headers.contains_key("x-from-app"))
            .collect()
    }

    fn count(&self, path: &str) -> usize {
        self.seen().iter().filter(|s| s.path == path).count()
    }
}

/// An answer's body as JSON.
async fn json_of(r: reqwest::Response) -> Value {
    let bytes = r.bytes().await.expect("body");
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&bytes)))
}

fn ok_answer(id: &str) -> Vec<u8> {
    format!(r#"{{"code":200,"msg":"success","data":{{"taskId":"{id}"}}}}"#).into_bytes()
}

fn scripted(status: u16, body: Vec<u8>) -> Scripted {
    Scripted {
        status,
        body,
        headers: Vec::new(),
        delay: Duration::ZERO,
        creates: None,
    }
}

/// A daemon with the stand-in on a free loopback port, polling `api`; `extra` is more TOML
/// for `[proxy]` (after `listen`).
async fn daemon(api: &SubmitApi, proxy_extra: &str, more: &str) -> (BinDaemon, String) {
    let mut config = BinConfig::new(&api.uri());
    config.extra = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{proxy_extra}\n[[proxy.token]]\ntoken = \"{TOKEN}\"\n{more}"
    );
    let d = BinDaemon::start(&config).await;
    let base = proxy_base(&d).await;
    (d, base)
}

async fn proxy_base(d: &BinDaemon) -> String {
    let s = d.status().await;
    s["proxy"]["listen"]
        .as_str()
        .unwrap_or_else(|| panic!("status shows the proxy: {s}"))
        .to_owned()
}

fn http() -> reqwest::Client {
    sunopoll::tls::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(PATIENCE)
        .build()
        .expect("client")
}

/// A submission body with the handler as its `callBackUrl`.
fn submission(handler: &str, prompt: &str) -> String {
    format!(
        r#"{{"prompt":"{prompt}","customMode":false,"model":"V4_5ALL","callBackUrl":"{handler}"}}"#
    )
}

async fn post(base: &str, path: &str, auth: &str, body: String) -> reqwest::Response {
    http()
        .post(format!("{base}{path}"))
        .header("authorization", format!("Bearer {auth}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the proxy answers")
}

/// The tracked tasks, id → (kind, state).
async fn tasks(d: &BinDaemon) -> HashMap<String, (String, String)> {
    let v = d.request(serde_json::json!({"cmd": "list"})).await;
    v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            (
                t["task_id"].as_str().unwrap_or("?").to_owned(),
                (
                    t["kind"].as_str().unwrap_or("?").to_owned(),
                    t["state"].as_str().unwrap_or("?").to_owned(),
                ),
            )
        })
        .collect()
}

/// The `complete` bodies the handler got for `id`.
fn completes(handler: &Receiver, id: &str) -> Vec<String> {
    handler
        .received()
        .iter()
        .map(|r| text(&r.body))
        .filter(|b| {
            b.contains(id)
                && !b.contains(r#""callbackType":"text""#)
                && !b.contains(r#""callbackType":"first""#)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_submitted_through_the_proxy_is_tracked_and_its_callback_reaches_the_handler()
{
    let api = SubmitApi::start('a').await;
    let handler = Receiver::start().await;
    let (mut d, base) = daemon(&api, "", "").await;
    let mut created = Vec::new();
    for (i, (path, kind)) in PATHS.iter().enumerate() {
        // Both base-URL forms send the same path; the key or the local token both work.
        let auth = if i % 2 == 0 { KEY } else { TOKEN };
        let r = http()
            .post(format!("{base}{path}"))
            .header("authorization", format!("Bearer {auth}"))
            .header("x-sunopoll-label", format!("case {i}"))
            .body(submission(&handler.url(), &format!("song {i}")))
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 200, "{path}");
        let body: Value = json_of(r).await;
        let id = body["data"]["taskId"].as_str().expect("taskId").to_owned();
        created.push((id, *path, *kind, i));
    }
    let tracked = tasks(&d).await;
    for (id, path, kind, _) in &created {
        assert_eq!(
            tracked.get(id).map(|t| t.0.as_str()),
            Some(*kind),
            "{path} tracked as {kind}: {tracked:?}"
        );
    }
    assert_eq!(tracked.len(), PATHS.len(), "{tracked:?}");
    let ids: Vec<String> = created.iter().map(|c| c.0.clone()).collect();
    assert!(d.wait_finished(&ids).await, "{}", d.log_text());
    wait_until(Deadline::patience(), "every complete callback", || {
        created
            .iter()
            .all(|(id, ..)| !completes(&handler, id).is_empty())
    })
    .await;
    for (id, path, kind, i) in &created {
        let expected = minify(&for_task(&fixtures(kind).2, id));
        assert_eq!(
            completes(&handler, id),
            vec![expected],
            "{path}: the handler gets the {kind} family's callback body, once, byte for byte"
        );
        let show = d
            .request(serde_json::json!({"cmd": "show", "task_id": id}))
            .await;
        assert_eq!(show["task"]["label"], format!("case {i}"), "{show}");
    }
    // The fake saw each submission once, with the account's key, never the local token or the
    // label header.
    for (_, path, ..) in &created {
        assert_eq!(api.count(path), 1, "{path}");
    }
    for s in api.seen() {
        assert_eq!(s.headers["authorization"], format!("Bearer {KEY}"), "{s:?}");
        assert!(!s.headers.contains_key("x-sunopoll-label"), "{s:?}");
    }
    let status = d.status().await;
    assert_eq!(status["proxy"]["tracked"], PATHS.len(), "{status}");
    assert_eq!(status["proxy"]["requests"], PATHS.len(), "{status}");
    let human = text(&d.cli(&["status"]).await.stdout);
    assert!(
        human.contains(&format!("proxy:        {base}")) && human.contains("15 tracked"),
        "{human}"
    );
    let log = d.stop().await;
    assert!(!log.contains(TOKEN), "the local token is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_create_nothing_are_passed_through_byte_for_byte_and_track_nothing() {
    let api = SubmitApi::start('b').await;
    let (mut d, base) = daemon(&api, "", "").await;
    let calls: &[(&str, &str)] = &[
        ("GET", "/api/v1/generate/credit"),
        ("GET", "/api/v1/chat/credit"),
        ("GET", "/api/v1/generate/record-info?taskId=bbbb"),
        ("GET", "/api/v1/wav/record-info?taskId=bbbb"),
        ("POST", "/api/v1/generate/generate-persona"),
        ("POST", "/api/v1/generate/get-timestamped-lyrics"),
        ("POST", "/api/v1/style/generate"),
        ("POST", "/api/v1/voice/generate"),
        ("POST", "/api/v1/jobs/createTask"),
        ("POST", "/api/v1/jobs/createTask"),
        ("POST", "/no/such/path"),
        ("GET", "/api/v1/generate"),
    ];
    for (method, target) in calls {
        let direct = http()
            .request(
                method.parse().expect("method"),
                format!("{}{target}", api.uri()),
            )
            .header("x-from-app", "1")
            .send()
            .await
            .expect("fake");
        let (direct_status, direct_body) = (direct.status(), direct.bytes().await.expect("body"));
        let through = http()
            .request(method.parse().expect("method"), format!("{base}{target}"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("x-from-app", "1")
            .body("{}")
            .send()
            .await
            .expect("proxy");
        assert_eq!(through.status(), direct_status, "{method} {target}");
        assert_eq!(
            through.bytes().await.expect("body"),
            direct_body,
            "{method} {target}: the same bytes as from the API itself"
        );
    }
    assert!(tasks(&d).await.is_empty(), "nothing tracked");
    let status = d.status().await;
    assert_eq!(status["proxy"]["passed"], calls.len(), "{status}");
    assert_eq!(status["proxy"]["tracked"], 0, "{status}");
    let log = d.stop().await;
    let create_task = log
        .lines()
        .filter(|l| l.contains("createTask") && l.contains("not understood"))
        .count();
    assert_eq!(create_task, 1, "said once per path:\n{log}");
    assert!(log.contains("/no/such/path"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cover_repeat_is_tracked_once() {
    let api = SubmitApi::start('c').await;
    let handler = Receiver::start().await;
    let (mut d, base) = daemon(&api, "", "").await;
    let id = api.id(1);
    let path = "/api/v1/suno/cover/generate";
    api.script(
        path,
        Scripted {
            creates: Some((id.clone(), "cover".to_owned())),
            ..scripted(200, ok_answer(&id))
        },
    );
    let repeat = format!(
        r#"{{"code":400,"msg":"Images already generated for this task","data":{{"taskId":"{id}"}}}}"#
    );
    api.script(path, scripted(200, repeat.clone().into_bytes()));
    let first = post(&base, path, KEY, submission(&handler.url(), "one")).await;
    assert_eq!(first.bytes().await.expect("body"), ok_answer(&id));
    let second = post(&base, path, KEY, submission(&handler.url(), "one")).await;
    assert_eq!(second.status(), 200);
    assert_eq!(
        second.bytes().await.expect("body"),
        repeat.as_bytes(),
        "passed back as it came"
    );
    let tracked = tasks(&d).await;
    assert_eq!(tracked.len(), 1, "{tracked:?}");
    assert_eq!(tracked[&id].0, "cover");
    assert!(d.wait_finished(std::slice::from_ref(&id)).await);
    wait_until(Deadline::patience(), "the cover callback", || {
        !completes(&handler, &id).is_empty()
    })
    .await;
    // Give a second (wrong) delivery the time to show up; there must be none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(completes(&handler, &id).len(), 1, "one task, one callback");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_after_the_application_hung_up_still_gets_its_task_tracked() {
    let api = SubmitApi::start('d').await;
    let handler = Receiver::start().await;
    let (mut d, base) = daemon(&api, "", "").await;
    let id = api.id(2);
    api.script(
        "/api/v1/lyrics",
        Scripted {
            delay: Duration::from_millis(1500),
            creates: Some((id.clone(), "lyrics".to_owned())),
            ..scripted(200, ok_answer(&id))
        },
    );
    sunopoll::tls::install_crypto_provider();
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let gave_up = impatient
        .post(format!("{base}/api/v1/lyrics"))
        .header("authorization", format!("Bearer {KEY}"))
        .body(submission(&handler.url(), "words"))
        .send()
        .await;
    assert!(
        gave_up.is_err(),
        "the application hung up before the answer"
    );
    assert!(
        d.wait_finished(std::slice::from_ref(&id)).await,
        "{}",
        d.log_text()
    );
    wait_until(Deadline::patience(), "the lyrics callback", || {
        !completes(&handler, &id).is_empty()
    })
    .await;
    assert_eq!(tasks(&d).await[&id].0, "lyrics");
    assert_eq!(api.count("/api/v1/lyrics"), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gives_504_one_warning_and_no_retry() {
    let api = SubmitApi::start('e').await;
    let (mut d, base) = daemon(&api, "upstream-timeout = \"400ms\"", "").await;
    api.script(
        "/api/v1/generate",
        Scripted {
            delay: Duration::from_secs(30),
            ..scripted(200, ok_answer(&api.id(3)))
        },
    );
    let body = submission("https://example.com/suno-callback", "a secret prompt 77");
    let r = post(&base, "/api/v1/generate", TOKEN, body.clone()).await;
    assert_eq!(r.status(), 504);
    // Long enough for a retry to have shown up, had there been one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(api.count("/api/v1/generate"), 1, "sent once, never again");
    assert!(tasks(&d).await.is_empty());
    let status = d.status().await;
    assert_eq!(status["proxy"]["ambiguous"], 1, "{status}");
    let log = d.stop().await;
    let warnings = warnings_naming(&log, "ambiguous submission");
    assert_eq!(warnings.len(), 1, "one warning:\n{log}");
    let w = &warnings[0];
    assert_eq!(w.level, "WARN");
    assert_eq!(w.field("path").as_deref(), Some("/api/v1/generate"));
    use sha2::Digest;
    let sha: String = sha2::Sha256::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(w.field("body_sha256"), Some(sha));
    assert!(
        !log.contains("a secret prompt 77"),
        "the body is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_passed_back_not_followed() {
    let api = SubmitApi::start('f').await;
    let (mut d, base) = daemon(&api, "", "").await;
    let elsewhere = format!("{}/api/v1/elsewhere", api.uri());
    api.script(
        "/api/v1/generate",
        Scripted {
            headers: vec![("location".to_owned(), elsewhere.clone())],
            ..scripted(307, b"moved".to_vec())
        },
    );
    let r = post(
        &base,
        "/api/v1/generate",
        KEY,
        submission("https://example.com/cb", "x"),
    )
    .await;
    assert_eq!(r.status(), 307);
    assert_eq!(r.headers()["location"], elsewhere.as_str());
    assert_eq!(r.bytes().await.expect("body"), "moved");
    assert_eq!(api.count("/api/v1/generate"), 1);
    assert_eq!(api.count("/api/v1/elsewhere"), 0, "not followed");
    assert!(tasks(&d).await.is_empty());
    d.stop().await;
}

/// Writes a raw request and returns the status line and the rest of the answer.
async fn raw(base: &str, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    Deadline::patience()
        .run(s.read_to_end(&mut out))
        .await
        .expect("answered in time")
        .expect("read");
    text(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_foreign_hosts_cross_site_requests_and_big_bodies_never_reach_the_api() {
    let api = SubmitApi::start('g').await;
    let (mut d, base) = daemon(&api, "max-body-size = \"1KiB\"", "").await;
    let host = base.trim_start_matches("http://").to_owned();
    let body = r#"{"prompt":"x","callBackUrl":"https://example.com/cb"}"#;
    let request = |extra: &str, auth: &str| {
        format!(
            "POST /api/v1/generate HTTP/1.1\r\nHost: {host}\r\n{auth}{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let auth = format!("Authorization: Bearer {KEY}\r\n");
    for (what, req, status) in [
        ("no key", request("", ""), "401"),
        (
            "a wrong key",
            request("", "Authorization: Bearer sk-wrong-key-123\r\n"),
            "401",
        ),
        (
            "a key in another scheme",
            request("", &format!("Authorization: Basic {KEY}\r\n")),
            "401",
        ),
        (
            "a cross-site page",
            request("Sec-Fetch-Site: cross-site\r\n", &auth),
            "403",
        ),
        (
            "a foreign origin",
            request("Origin: http://evil.example\r\n", &auth),
            "403",
        ),
        (
            "a rebound name",
            format!(
                "POST /api/v1/generate HTTP/1.1\r\nHost: evil.example\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
            "403",
        ),
    ] {
        let answer = raw(&base, req).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{what}: {answer}"
        );
        assert!(!answer.contains(KEY), "{what}: {answer}");
    }
    let big = post(&base, "/api/v1/generate", KEY, "x".repeat(4096)).await;
    assert_eq!(big.status(), 413);
    assert!(
        api.seen().is_empty(),
        "the API saw nothing: {:?}",
        api.seen()
    );
    let status = d.status().await;
    assert_eq!(status["proxy"]["refused"], 7, "{status}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_numbers_arrive_byte_identical_in_both_directions() {
    let api = SubmitApi::start('h').await;
    let (mut d, base) = daemon(&api, "", "").await;
    let id = api.id(4);
    // Odd spacing, key order, a long float, an exponent, escapes: what a re-serialiser breaks.
    let answer = format!(
        "{{ \"msg\" : \"success\",\"code\":200, \"data\":{{\"weight\":0.18229166666666666,\"taskId\":\"{id}\",\"n\":1E+2,\"s\":\"\\u00e9\\/\"}} }}"
    );
    api.script(
        "/api/v1/generate",
        Scripted {
            creates: Some((id.clone(), "music".to_owned())),
            ..scripted(200, answer.clone().into_bytes())
        },
    );
    let sent = "{\"styleWeight\":0.18229166666666666, \"zeta\":1,\"alpha\":2.50,\"prompt\":\"caf\\u00e9\",\n\"callBackUrl\":\"https://example.com/suno-callback\"}";
    let r = http()
        .post(format!("{base}/api/v1/generate"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "only for the next hop")
        .header("x-app", "kept")
        .body(sent)
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("body"), answer.as_bytes());
    let seen = api.seen_not_polls();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.body, sent.as_bytes(), "the request body byte for byte");
    assert_eq!(s.headers["authorization"], format!("Bearer {KEY}"));
    assert_eq!(s.headers["x-app"], "kept");
    assert!(
        !s.headers.contains_key("x-hop"),
        "hop-by-hop dropped: {s:?}"
    );
    let api_host = api.uri().trim_start_matches("http://").to_owned();
    assert_eq!(s.headers["host"], api_host, "Host is the API's");
    assert_eq!(
        tasks(&d).await[&id].0,
        "music",
        "the odd answer still names its task"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_right_after_the_answer_loses_no_task() {
    let api = SubmitApi::start('k').await;
    let handler = Receiver::start().await;
    // A fixed port, so the restarted daemon serves the same base URL.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut config = BinConfig::new(&api.uri());
    config.extra = format!("[proxy]\nlisten = \"127.0.0.1:{port}\"\n");
    let mut d = BinDaemon::start(&config).await;
    let base = format!("http://127.0.0.1:{port}");
    let runs = count_from_env("SUNOPOLL_PROXY_KILL_RUNS", 3);
    let mut ids = Vec::new();
    for i in 0..runs {
        let r = post(
            &base,
            "/api/v1/wav/generate",
            KEY,
            submission(&handler.url(), &format!("k{i}")),
        )
        .await;
        let body: Value = json_of(r).await;
        d.kill();
        ids.push(body["data"]["taskId"].as_str().expect("taskId").to_owned());
        d.restart().await;
    }
    assert!(d.wait_finished(&ids).await, "{}", d.log_text());
    for id in &ids {
        wait_until(Deadline::patience(), "the wav callback", || {
            !completes(&handler, id).is_empty()
        })
        .await;
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_share_the_accounts_budget_and_a_throttled_account_is_answered_locally() {
    let api = SubmitApi::start('m').await;
    // One request per 100 s and no waiting: the second submission has no budget left.
    let mut config = BinConfig::new(&api.uri());
    config.rps = "0.01".to_owned();
    config.extra = "[proxy]\nlisten = \"127.0.0.1:0\"\nmax-wait = \"0s\"\n".to_owned();
    let mut d = BinDaemon::start(&config).await;
    let base = proxy_base(&d).await;
    let first = post(
        &base,
        "/api/v1/generate",
        KEY,
        submission("https://example.com/cb", "1"),
    )
    .await;
    assert_eq!(first.status(), 200);
    let second = post(
        &base,
        "/api/v1/generate",
        KEY,
        submission("https://example.com/cb", "2"),
    )
    .await;
    assert_eq!(
        second.status(),
        200,
        "sunoapi's throttle is HTTP 200 with code 430"
    );
    let retry_after: u64 = second.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    let v: Value = json_of(second).await;
    assert_eq!(v["code"], 430, "{v}");
    assert_eq!(api.count("/api/v1/generate"), 1, "the second was not sent");
    assert_eq!(tasks(&d).await.len(), 1);
    let status = d.status().await;
    assert_eq!(status["proxy"]["throttled"], 1, "{status}");
    d.stop().await;

    // An account paused by the API's throttle: submissions wait it out locally.
    let api = SubmitApi::start('n').await;
    let (mut d, base) = daemon(&api, "", "").await;
    let id = api.id(5);
    let throttle = fixture("error.430.call-frequency-too-high.json");
    {
        let mut s = api.state.lock().expect("state");
        s.details.insert(
            ("/api/v1/generate/record-info".to_owned(), id.clone()),
            (vec![text(&throttle)], 0),
        );
        // Long enough that the pause cannot end while the test looks at it.
        s.details_retry_after = Some("120".to_owned());
    }
    api.script("/api/v1/generate", scripted(200, ok_answer(&id)));
    let r = post(
        &base,
        "/api/v1/generate",
        KEY,
        submission("https://example.com/cb", "p"),
    )
    .await;
    assert_eq!(r.status(), 200);
    poll_until(
        Deadline::patience(),
        "the account paused",
        Duration::from_millis(20),
        || async {
            let s = d.status().await;
            (s["poll"]["pause_kind"] == "throttled").then_some(())
        },
    )
    .await;
    let held = post(
        &base,
        "/api/v1/generate",
        KEY,
        submission("https://example.com/cb", "q"),
    )
    .await;
    assert_eq!(held.status(), 200);
    assert!(held.headers().contains_key("retry-after"));
    let v: Value = json_of(held).await;
    assert_eq!(v["code"], 430, "{v}");
    assert_eq!(
        api.count("/api/v1/generate"),
        1,
        "nothing sent while paused"
    );
    d.stop().await;
}

/// Where `.ci/run` installs the Python client library (`pip install --target`): under the
/// target directory, not system-wide.
fn python_clients() -> Option<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("pyclients");
    if dir.join("suno_easy").is_dir() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!(
            "suno-easy is not installed in {}: .ci/run installs it, and CI never skips this test",
            dir.display()
        );
    }
    eprintln!(
        "NOT RUN: suno-easy is not installed in {} (.ci/run installs it); this check was skipped",
        dir.display()
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmodified_client_library_pointed_at_the_proxy_gets_its_callback() {
    let Some(site) = python_clients() else {
        return;
    };
    let Some(python) = sunopoll::testing::real_tool("python3") else {
        return;
    };
    let api = SubmitApi::start('p').await;
    let (mut d, base) = daemon(&api, "", "").await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/suno_easy_callback.py"
    );
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script)
        .arg(&base)
        .arg(TOKEN)
        .env("PYTHONPATH", &site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env("NO_PROXY", "*");
    let out = run(cmd).await;
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    eprintln!("client stdout:\n{stdout}\nclient stderr:\n{stderr}");
    assert!(
        out.status.success(),
        "the client run failed:\n{stdout}\n{stderr}"
    );
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("submitted task "))
        .expect("the client printed its task")
        .trim()
        .to_owned();
    assert!(
        stdout.contains(&format!("handler: complete callback for task {id}")),
        "{stdout}"
    );
    assert_eq!(tasks(&d).await[&id].0, "music");
    let seen = api.seen_not_polls();
    assert_eq!(seen.len(), 1, "one submission: {seen:?}");
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {KEY}"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_reset_after_the_request_went_out_is_ambiguous_too() {
    use crate::chaos::{Chaos, Mode};
    let api = SubmitApi::start('r').await;
    let upstream: std::net::SocketAddr = api
        .uri()
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let chaos = Chaos::start(upstream).await;
    let mut config = BinConfig::new(&chaos.uri());
    config.extra = "[proxy]\nlisten = \"127.0.0.1:0\"\n".to_owned();
    let mut d = BinDaemon::start(&config).await;
    let base = proxy_base(&d).await;
    for (i, mode) in [Mode::Reset, Mode::ResetMidBody, Mode::Close]
        .into_iter()
        .enumerate()
    {
        chaos.set(mode);
        let r = post(
            &base,
            "/api/v1/generate",
            KEY,
            submission("https://example.com/cb", &format!("r{i}")),
        )
        .await;
        assert_eq!(r.status(), 504, "{mode:?}");
        assert_eq!(chaos.fault_count(), i + 1, "{mode:?}: sent once, not again");
    }
    let status = d.status().await;
    assert_eq!(status["proxy"]["ambiguous"], 3, "{status}");
    assert!(tasks(&d).await.is_empty());
    let log = d.stop().await;
    assert_eq!(
        warnings_naming(&log, "ambiguous submission").len(),
        3,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_cannot_be_reached_gets_nothing_and_is_not_ambiguous() {
    let (port, _) = dead_port();
    let mut config = BinConfig::new(&format!("http://127.0.0.1:{port}"));
    config.extra = "[proxy]\nlisten = \"127.0.0.1:0\"\n".to_owned();
    let mut d = BinDaemon::start(&config).await;
    let base = proxy_base(&d).await;
    let r = post(
        &base,
        "/api/v1/generate",
        KEY,
        submission("https://example.com/cb", "x"),
    )
    .await;
    assert_eq!(r.status(), 502);
    assert!(text(&r.bytes().await.expect("body")).contains("nothing was sent"));
    let status = d.status().await;
    assert_eq!(status["proxy"]["unreachable"], 1, "{status}");
    assert_eq!(status["proxy"]["ambiguous"], 0, "{status}");
    let log = d.stop().await;
    assert!(
        warnings_naming(&log, "ambiguous submission").is_empty(),
        "{log}"
    );
}
