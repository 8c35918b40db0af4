//! Test harness: a scriptable fake API (wiremock on 127.0.0.1), the daemon in-process on a
//! temporary directory, a raw client for the control socket, the config file and scripted tasks
//! the suites share, and the waits.
//!
//! Two fakes answer as the API, scripted alike through [`ScriptedApi`]: [`FakeApi`] (wiremock, in
//! this process) for every test that does not judge timing, and [`TimedApi`] (its own process,
//! `timed_api.rs`) for those that do: only it says when requests arrived, so a test that
//! measures gaps, rates or windows cannot be written against the fake whose times a loaded
//! test runner bunches.
//!
//! Every wait has one overall [`Deadline`] (`PATIENCE` unless said otherwise), never a timeout
//! per step that a stream of unrelated messages could keep renewing; and a wait looks for
//! what it needs among everything seen so far rather than assuming an order between
//! independent messages.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use serde_json::Value;
use sunopoll::api::ApiKey;
use sunopoll::config::{Config, Environment};
use sunopoll::daemon::Daemon;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

pub use crate::timed_api::TimedApi;

/// The task ID all fixtures describe.
pub const TASK: &str = "a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10";

/// The key the tests use; it must never appear in any output.
pub const KEY: &str = "sk-test-DO-NOT-LEAK-1234";

/// Longest any test waits for a condition.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The moment by which a whole wait must be over, however many steps it takes: a wait for
/// several messages shares one deadline, so a stream of unrelated messages (watchdog pings,
/// status lines) cannot keep it alive the way a timeout per message would.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Instant);

impl Deadline {
    /// `PATIENCE` from now.
    pub fn patience() -> Deadline {
        Deadline::after(PATIENCE)
    }

    /// `wait` from now.
    pub fn after(wait: Duration) -> Deadline {
        Deadline(Instant::now() + wait)
    }

    /// The time left (zero once passed).
    pub fn left(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// True once the deadline has passed.
    pub fn passed(&self) -> bool {
        Instant::now() >= self.0
    }

    /// `work`'s output, or `None` if the deadline passes first.
    pub async fn run<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        tokio::time::timeout(self.left(), work).await.ok()
    }
}

/// Checks `check` every 10 ms until it holds; panics naming `what` once `deadline` passes.
pub async fn wait_until<F: FnMut() -> bool>(deadline: Deadline, what: &str, mut check: F) {
    while !check() {
        assert!(!deadline.passed(), "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the async `look` every `every` until it gives `Some`, and returns that. Panics once
/// `deadline` passes (also in the middle of a look), naming `what`.
pub async fn poll_until<T, F, Fut>(
    deadline: Deadline,
    what: &str,
    every: Duration,
    mut look: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    loop {
        match deadline.run(look()).await {
            Some(Some(found)) => return found,
            Some(None) if !deadline.passed() => tokio::time::sleep(every).await,
            _ => panic!("timed out waiting for: {what}"),
        }
    }
}

/// A count for a looping suite: `default` (sized for CI), or the value of the environment
/// variable `name` for a longer soak (e.g. `SUNOPOLL_CRASH_RUNS=500`).
pub fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

static LOGS: Once = Once::new();

/// Sends the daemon's logs to the test output (shown only for failing tests).
pub fn init_logs() {
    LOGS.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("sunopoll=debug")),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A fixture file's bytes.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A fixture as JSON.
pub fn fixture_json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).expect("fixture is JSON")
}

/// One scripted answer of the fake API.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
    /// `Retry-After` header.
    pub retry_after: Option<String>,
    /// Delay before answering.
    pub delay: Duration,
    /// An answer cut at the TCP level instead (only the timed fake can cut one).
    pub fault: Option<Fault>,
}

/// An answer cut short at the TCP level: headers promising 4096 bytes and a few of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// …then the connection closes cleanly (FIN): a truncated body.
    Truncate,
    /// …then the connection is reset (RST): a reset in the middle of the body.
    ResetMidBody,
}

impl Reply {
    /// HTTP 200 with a fixture body.
    pub fn fixture(name: &str) -> Reply {
        Reply::raw(200, fixture(name))
    }

    /// Any status and body.
    pub fn raw(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            body: body.into(),
            retry_after: None,
            delay: Duration::ZERO,
            fault: None,
        }
    }

    /// An answer cut short by `fault`.
    pub fn cut(fault: Fault) -> Reply {
        Reply {
            fault: Some(fault),
            ..Reply::raw(200, "")
        }
    }

    /// The same, answered after `delay`.
    pub fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    /// The same, with a `Retry-After` header.
    pub fn retry_after(mut self, value: &str) -> Reply {
        self.retry_after = Some(value.to_owned());
        self
    }

    /// A record-info fixture rewritten for another task ID.
    pub fn fixture_for(name: &str, task: &str) -> Reply {
        let text = String::from_utf8(fixture(name))
            .expect("utf8")
            .replace(TASK, task);
        Reply::raw(200, text)
    }

    /// One answer per status, in order: `record-info.<STATUS>.json` rewritten for `task`.
    pub fn statuses(task: &str, statuses: &[&str]) -> Vec<Reply> {
        statuses
            .iter()
            .map(|s| Reply::fixture_for(&format!("record-info.{s}.json"), task))
            .collect()
    }
}

/// A task that goes through every stage, one per poll.
pub const EVERY_STAGE: [&str; 3] = ["TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS"];

/// A task that gets its lyrics, then fails.
pub const TEXT_THEN_FAILURE: [&str; 2] = ["TEXT_SUCCESS", "GENERATE_AUDIO_FAILED"];

#[derive(Default)]
struct ApiState {
    scripts: HashMap<String, Vec<Reply>>,
    calls: HashMap<String, usize>,
    /// Scripted answers given per task: a script advances only when it answers, not while an
    /// override (storm, outage) answers instead, so a task resumes where it was.
    served: HashMap<String, usize>,
    override_all: Option<Reply>,
    /// Requests, all tasks (no times: see [`TimedApi`]).
    total: usize,
    auth: Vec<String>,
}

struct Router(Arc<Mutex<ApiState>>);

impl Respond for Router {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let task = request
            .url
            .query_pairs()
            .find(|(k, _)| k == "taskId")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let mut s = self.0.lock().expect("state");
        s.total += 1;
        if let Some(a) = request.headers.get("authorization") {
            s.auth.push(a.to_str().unwrap_or("?").to_owned());
        }
        *s.calls.entry(task.clone()).or_insert(0) += 1;
        let reply = if let Some(r) = &s.override_all {
            r.clone()
        } else if s.scripts.contains_key(&task) {
            let served = s.served.entry(task.clone()).or_insert(0);
            let n = *served;
            *served += 1;
            let script = &s.scripts[&task];
            script[n.min(script.len() - 1)].clone()
        } else {
            Reply::fixture_for("record-info.PENDING.json", &task)
        };
        assert!(
            reply.fault.is_none(),
            "wiremock cannot cut an answer short: that test belongs on TimedApi"
        );
        let mut t = ResponseTemplate::new(reply.status)
            .set_body_raw(reply.body, "application/json")
            .set_delay(reply.delay);
        if let Some(ra) = reply.retry_after {
            t = t.insert_header("retry-after", ra.as_str());
        }
        t
    }
}

/// The fake Suno API.
pub struct FakeApi {
    /// The wiremock server.
    pub server: MockServer,
    state: Arc<Mutex<ApiState>>,
}

impl FakeApi {
    /// Starts a fake API on 127.0.0.1 that answers PENDING to every unscripted task.
    pub async fn start() -> FakeApi {
        FakeApi::start_on(std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).await
    }

    /// The same on a given listener (to bring an API that refused connections back up).
    pub async fn start_on(listener: std::net::TcpListener) -> FakeApi {
        let server = MockServer::builder().listener(listener).start().await;
        let state = Arc::new(Mutex::new(ApiState::default()));
        Mock::given(method("GET"))
            .and(path("/api/v1/generate/record-info"))
            .respond_with(Router(state.clone()))
            .mount(&server)
            .await;
        FakeApi { server, state }
    }
}

/// What both fake APIs do: answer from scripts and overrides, and count what they were asked.
pub trait ScriptedApi {
    /// Answers for `task`, one per poll; the last repeats.
    fn script(&self, task: &str, replies: Vec<Reply>);

    /// Answers for `task` from fixtures, one status per poll; the last repeats.
    fn script_statuses(&self, task: &str, statuses: &[&str]) {
        self.script(task, Reply::statuses(task, statuses));
    }

    /// While set, every request gets this answer (a storm or an outage).
    fn set_override(&self, reply: Option<Reply>);

    /// Requests for `task` so far.
    fn calls(&self, task: &str) -> usize;

    /// Requests so far, all tasks.
    fn total_calls(&self) -> usize;

    /// Every `Authorization` header seen.
    fn auth_headers(&self) -> Vec<String>;

    /// The base URL to configure.
    fn uri(&self) -> String;
}

impl ScriptedApi for FakeApi {
    fn script(&self, task: &str, replies: Vec<Reply>) {
        assert!(!replies.is_empty());
        self.state
            .lock()
            .expect("state")
            .scripts
            .insert(task.to_owned(), replies);
    }

    fn set_override(&self, reply: Option<Reply>) {
        self.state.lock().expect("state").override_all = reply;
    }

    fn calls(&self, task: &str) -> usize {
        self.state
            .lock()
            .expect("state")
            .calls
            .get(task)
            .copied()
            .unwrap_or(0)
    }

    fn total_calls(&self) -> usize {
        self.state.lock().expect("state").total
    }

    fn auth_headers(&self) -> Vec<String> {
        self.state.lock().expect("state").auth.clone()
    }

    fn uri(&self) -> String {
        self.server.uri()
    }
}

/// Writes `dir/config.toml` for the real binary: short interval, no rate limit, the store
/// under `dir/state`, the control socket at `socket`. Returns its path.
pub fn write_config(dir: &Path, api: &str, socket: &Path) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[api]
base-url = "{api}"
request-timeout = "5s"

[poll]
interval = "100ms"
max-requests-per-second = "unlimited"
backoff-max = "1s"

[store]
path = "state/sunopoll.db"

[control]
socket = "{}"
"#,
            socket.to_str().expect("utf-8 path")
        ),
    )
    .expect("write config");
    path
}

/// Waits (within `PATIENCE`) until `socket` exists; panics with the daemon's log at `log` if
/// `child` exits first or the deadline passes.
pub async fn wait_for_socket(child: &mut std::process::Child, socket: &Path, log: &Path) {
    let deadline = Deadline::patience();
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    while !socket.exists() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the daemon exited early: {status}: {}", log_text());
        }
        assert!(
            !deadline.passed(),
            "{} never appeared: {}",
            socket.display(),
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A config for tests: short interval, no rate limit, everything under `dir`.
pub fn test_config(dir: &Path, api: &str) -> Config {
    let env = Environment {
        uid: 1000,
        home: Some(dir.to_owned()),
        ..Environment::default()
    };
    let mut c = Config::defaults(&env);
    c.api.base_url = url::Url::parse(&format!("{api}/")).expect("url");
    c.api.request_timeout = Duration::from_secs(5);
    c.poll.interval = Duration::from_millis(100);
    c.poll.backoff_max = Duration::from_secs(1);
    c.poll.max_requests_per_second = None;
    c.poll.max_in_flight = 4;
    c.store.path = dir.join("store/sunopoll.db");
    c.control.socket = dir.join("run/sunopoll.sock");
    c.control.socket_configured = true;
    c
}

/// The daemon, in-process, on a temporary directory.
pub struct TestDaemon {
    /// Running daemon (None once stopped).
    pub daemon: Option<Daemon>,
    /// Its config.
    pub config: Config,
    /// The temporary directory (kept alive).
    pub dir: Arc<tempfile::TempDir>,
}

impl TestDaemon {
    /// Starts a daemon against `api` with `tweak` applied to the test config.
    pub async fn start(api: &impl ScriptedApi, tweak: impl FnOnce(&mut Config)) -> TestDaemon {
        init_logs();
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let mut config = test_config(dir.path(), &api.uri());
        tweak(&mut config);
        TestDaemon::start_in(dir, config).await
    }

    /// Starts a daemon with this exact config in `dir` (for restarts).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, config: Config) -> TestDaemon {
        init_logs();
        let daemon = Deadline::patience()
            .run(Daemon::start(
                config.clone(),
                ApiKey::new(KEY).expect("key"),
                None,
            ))
            .await
            .expect("the daemon starts in time")
            .expect("daemon starts");
        TestDaemon {
            daemon: Some(daemon),
            config,
            dir,
        }
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.config.control.socket.clone()
    }

    /// One request, one answer, over a fresh connection.
    pub async fn request(&self, request: Value) -> Value {
        let mut c = RawClient::connect(&self.socket()).await;
        c.send_line(&request.to_string()).await;
        c.read_json().await.expect("an answer")
    }

    /// `show` for one task: (task, events).
    pub async fn show(&self, task: &str) -> (Value, Vec<Value>) {
        let v = self
            .request(serde_json::json!({"cmd": "show", "task_id": task}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
        (
            v["task"].clone(),
            v["events"].as_array().cloned().unwrap_or_default(),
        )
    }

    /// Adds task IDs.
    pub async fn add(&self, ids: &[&str]) -> Value {
        let v = self
            .request(serde_json::json!({"cmd": "add", "task_ids": ids}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
        v
    }

    /// Waits until `task` is in `state` (active, done, failed).
    pub async fn wait_state(&self, task: &str, state: &str) -> (Value, Vec<Value>) {
        self.show_until(task, &format!("task {task} to reach {state}"), |t, _| {
            t["state"] == state
        })
        .await
    }

    /// `show`s `task` every 20 ms until `done(task, events)` holds, within `PATIENCE`
    /// overall; returns that answer, or panics with `what` and the last one.
    pub async fn show_until(
        &self,
        task: &str,
        what: &str,
        mut done: impl FnMut(&Value, &[Value]) -> bool,
    ) -> (Value, Vec<Value>) {
        let deadline = Deadline::patience();
        let mut last = None;
        loop {
            let Some((t, events)) = deadline.run(self.show(task)).await else {
                break;
            };
            if done(&t, &events) {
                return (t, events);
            }
            last = Some((t, events));
            if deadline.passed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}; last seen: {last:?}")
    }

    /// Stops the daemon gracefully (within `PATIENCE`).
    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            Deadline::patience()
                .run(d.shutdown())
                .await
                .expect("the daemon shuts down in time");
        }
    }
}

/// Starts a daemon on `config` whose start must fail, and returns why (within `PATIENCE`).
pub async fn refused_start(config: &Config) -> String {
    init_logs();
    let started = Deadline::patience()
        .run(Daemon::start(
            config.clone(),
            ApiKey::new(KEY).expect("key"),
            None,
        ))
        .await
        .expect("the start ends in time");
    match started {
        Ok(_) => panic!("the daemon started on {config:?}"),
        Err(e) => e.to_string(),
    }
}

/// Starts a daemon on `config` under a recording notifier with a watchdog pinged every
/// `watchdog`; returns it with the recording.
pub async fn start_supervised(
    config: &Config,
    watchdog: Duration,
) -> (Daemon, sunopoll::systemd::Recording) {
    use sunopoll::systemd::{Notifier, Supervision};
    init_logs();
    let (notifier, recording) = Notifier::recording();
    let supervision = Supervision {
        notifier,
        watchdog: Some(watchdog),
    };
    let key = ApiKey::new(KEY).expect("key");
    let daemon = Deadline::patience()
        .run(Daemon::start_supervised(
            config.clone(),
            key,
            None,
            supervision,
        ))
        .await
        .expect("the daemon starts in time")
        .expect("daemon starts");
    (daemon, recording)
}

/// How many `WATCHDOG=1` pings `recording` has seen.
pub fn watchdog_pings(recording: &sunopoll::systemd::Recording) -> usize {
    recording
        .messages()
        .iter()
        .filter(|m| *m == "WATCHDOG=1")
        .count()
}

/// Polls `check` until it is true or `PATIENCE` runs out.
pub async fn eventually<F: FnMut() -> bool>(what: &str, check: F) {
    wait_until(Deadline::patience(), what, check).await;
}

/// A raw control-socket client that can send anything.
pub struct RawClient {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl RawClient {
    /// Connects.
    pub async fn connect(path: &Path) -> RawClient {
        let stream = UnixStream::connect(path)
            .await
            .expect("connect to the control socket");
        let (r, w) = stream.into_split();
        RawClient {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Writes bytes as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes).await
    }

    /// Writes a line.
    pub async fn send_line(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).await.expect("write");
        self.writer.write_all(b"\n").await.expect("write");
    }

    /// Reads one line as JSON (within `PATIENCE`); `None` at end of stream.
    pub async fn read_json(&mut self) -> Option<Value> {
        self.read_json_by(Deadline::patience()).await
    }

    /// Reads one line as JSON; `None` at end of stream; panics once `deadline` passes. Several
    /// reads that make up one wait share a deadline.
    pub async fn read_json_by(&mut self, deadline: Deadline) -> Option<Value> {
        let mut line = String::new();
        let n = deadline
            .run(self.reader.read_line(&mut line))
            .await
            .expect("an answer in time")
            .ok()?;
        if n == 0 {
            return None;
        }
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}")))
    }
}

/// Minified JSON of a value, preserving key order.
pub fn compact(v: &Value) -> String {
    serde_json::to_string(v).expect("json")
}

/// One request a fake handler received.
#[derive(Clone, Debug)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    /// Its headers (lower-case names).
    pub headers: HashMap<String, String>,
    /// Its body bytes.
    pub body: Vec<u8>,
    /// The status the handler answered (it may have answered too late for the daemon).
    pub status: u16,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    /// The body's `data.callbackType`.
    pub fn stage(&self) -> String {
        self.json()["data"]["callbackType"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    }

    /// The body's `data.task_id`.
    pub fn task(&self) -> String {
        self.json()["data"]["task_id"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    }
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Scripted answers, used in order; then `fallback`.
    script: std::collections::VecDeque<(u16, Duration)>,
    fallback: Option<(u16, Duration)>,
    /// `Location` sent with 3xx answers.
    location: Option<String>,
}

struct Recorder(Arc<Mutex<ReceiverState>>);

impl Respond for Recorder {
    fn respond(&self, request: &wiremock::Request) -> ResponseTemplate {
        let mut s = self.0.lock().expect("state");
        let (status, delay) = s
            .script
            .pop_front()
            .or(s.fallback)
            .unwrap_or((200, Duration::ZERO));
        s.received.push(Received {
            at: Instant::now(),
            headers: request
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: request.body.clone(),
            status,
        });
        let mut t = ResponseTemplate::new(status)
            .set_body_string(if status >= 300 {
                "handler says no"
            } else {
                "ok"
            })
            .set_delay(delay);
        if let (300..=399, Some(location)) = (status, &s.location) {
            t = t.insert_header("location", location.as_str());
        }
        t
    }
}

/// A fake callback handler on 127.0.0.1: records every request; answers 200 unless scripted.
pub struct Receiver {
    /// The wiremock server.
    pub server: MockServer,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    /// Starts one on a fresh port.
    pub async fn start() -> Receiver {
        Receiver::start_on(std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).await
    }

    /// Starts one on a given listener (to bring a "down" handler up on its old port).
    pub async fn start_on(listener: std::net::TcpListener) -> Receiver {
        let server = MockServer::builder().listener(listener).start().await;
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        Mock::given(method("POST"))
            .respond_with(Recorder(state.clone()))
            .mount(&server)
            .await;
        Receiver { server, state }
    }

    /// The handler URL.
    pub fn url(&self) -> String {
        format!("{}/suno/callback", self.server.uri())
    }

    /// The next answers, in order (status, delay).
    pub fn script(&self, answers: &[(u16, Duration)]) {
        self.state
            .lock()
            .expect("state")
            .script
            .extend(answers.iter().copied());
    }

    /// The answer once the script is used up.
    pub fn always(&self, status: u16, delay: Duration) {
        self.state.lock().expect("state").fallback = Some((status, delay));
    }

    /// Answers 3xx with this `Location` (set the status with `script`/`always`).
    pub fn redirect_to(&self, location: &str) {
        self.state.lock().expect("state").location = Some(location.to_owned());
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().expect("state").received.clone()
    }

    /// How many requests so far.
    pub fn count(&self) -> usize {
        self.state.lock().expect("state").received.len()
    }
}

/// A local port with nothing listening on it (connections are refused), and a listener that
/// can later be bound to it.
pub fn dead_port() -> (u16, impl FnOnce() -> std::net::TcpListener) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    (port, move || {
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("rebind the dead port")
    })
}

/// A forward target for tests.
pub fn target(name: &str, url: &str) -> sunopoll::config::TargetConfig {
    sunopoll::config::TargetConfig {
        name: name.to_owned(),
        url: url::Url::parse(url).expect("url"),
        stages: sunopoll::events::Stage::ALL.to_vec(),
        secret: None,
        headers: Vec::new(),
        timeout: Duration::from_secs(2),
        kinds: None,
    }
}
