//! The real `sunopoll` binary as a black box, for the fault suites: a config file in a temporary
//! directory, stderr captured to one log file that survives restarts, SIGKILL (`Child::kill`) and
//! SIGTERM (the `kill` command), raw control-socket requests, the CLI, memory figures, and a
//! scan of everything the daemon and the CLI print for secrets.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::UnixStream;

use crate::helpers::*;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_sunopoll");

/// A `[[forward.target]]` signing secret the suites configure (base64 of
/// "sunopoll-forward-secret-1").
pub const FORWARD_SECRET: &str = "whsec_c3Vub3BvbGwtZm9yd2FyZC1zZWNyZXQtMQ==";

/// `[forward] task-secret` (base64 of "sunopoll-task-secret-0002").
pub const TASK_SECRET: &str = "whsec_c3Vub3BvbGwtdGFzay1zZWNyZXQtMDAwMg==";

/// A value sent in a target's extra `Authorization` header.
pub const HEADER_TOKEN: &str = "handler-token-DO-NOT-LEAK-77";

/// Everything that must never appear in anything the daemon or the CLI prints. The signing
/// secrets are also checked without their `whsec_` prefix.
pub const SECRETS: [&str; 6] = [
    KEY,
    FORWARD_SECRET,
    "c3Vub3BvbGwtZm9yd2FyZC1zZWNyZXQtMQ==",
    TASK_SECRET,
    "c3Vub3BvbGwtdGFzay1zZWNyZXQtMDAwMg==",
    HEADER_TOKEN,
];

/// Bytes of daemon and CLI output scanned for secrets in this process so far (for the report).
pub static SCANNED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Fails the test if `text` contains any of [`SECRETS`].
pub fn assert_no_secrets(text: &str, what: &str) {
    SCANNED_BYTES.fetch_add(text.len(), Ordering::Relaxed);
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{what} printed a secret ({}…):\n{}",
            &secret[..8],
            text.lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// One forward target in a [`BinConfig`].
#[derive(Clone, Debug)]
pub struct BinTarget {
    /// `name`.
    pub name: String,
    /// `url`.
    pub url: String,
    /// `timeout`.
    pub timeout: String,
    /// Sign with [`FORWARD_SECRET`] and send [`HEADER_TOKEN`] in an extra header.
    pub with_secrets: bool,
}

impl BinTarget {
    /// A signed target with a 2 s timeout.
    pub fn new(name: &str, url: &str) -> BinTarget {
        BinTarget {
            name: name.to_owned(),
            url: url.to_owned(),
            timeout: "2s".to_owned(),
            with_secrets: true,
        }
    }
}

/// The settings the suites vary; everything else is the binary's default. Paths are relative
/// to the config file, so each daemon lives entirely in its temporary directory.
#[derive(Clone, Debug)]
pub struct BinConfig {
    /// `api.base-url`.
    pub api: String,
    /// `api.request-timeout`.
    pub request_timeout: String,
    /// `poll.interval`.
    pub interval: String,
    /// `poll.max-requests-per-second` (a number, or `"unlimited"`).
    pub rps: String,
    /// `poll.max-in-flight`.
    pub max_in_flight: u32,
    /// `poll.backoff-max`.
    pub backoff_max: String,
    /// `poll.task-deadline`.
    pub task_deadline: String,
    /// `control.idle-timeout`.
    pub idle_timeout: String,
    /// `forward.retry-schedule`.
    pub retry_schedule: Vec<String>,
    /// `[[forward.target]]`s.
    pub targets: Vec<BinTarget>,
    /// Raw TOML appended at the end (more `[forward]` keys go in `forward_extra`).
    pub extra: String,
    /// Raw TOML lines added to `[forward]`.
    pub forward_extra: String,
    /// `log.level`.
    pub log_level: String,
}

impl BinConfig {
    /// Short intervals against `api`, no rate limit, a fast retry schedule, no targets.
    pub fn new(api: &str) -> BinConfig {
        BinConfig {
            api: api.to_owned(),
            request_timeout: "2s".to_owned(),
            interval: "100ms".to_owned(),
            rps: "\"unlimited\"".to_owned(),
            max_in_flight: 4,
            backoff_max: "800ms".to_owned(),
            task_deadline: "10m".to_owned(),
            idle_timeout: "5s".to_owned(),
            retry_schedule: ["0s", "50ms", "100ms", "200ms", "400ms", "400ms", "400ms"]
                .map(str::to_owned)
                .to_vec(),
            targets: Vec::new(),
            extra: String::new(),
            forward_extra: String::new(),
            log_level: "info".to_owned(),
        }
    }

    /// The retry schedule, from milliseconds.
    pub fn schedule_ms(&mut self, delays: &[u64]) {
        self.retry_schedule = delays.iter().map(|d| format!("{d}ms")).collect();
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let quoted: Vec<String> = self
            .retry_schedule
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect();
        let mut s = format!(
            r#"[api]
base-url = "{api}"
request-timeout = "{timeout}"

[poll]
interval = "{interval}"
max-requests-per-second = {rps}
max-in-flight = {mif}
backoff-max = "{backoff}"
task-deadline = "{deadline}"

[store]
path = "state/sunopoll.db"

[control]
socket = "run/sunopoll.sock"
idle-timeout = "{idle}"

[log]
level = "{level}"

[forward]
retry-schedule = [{schedule}]
task-secret = "{task_secret}"
{forward_extra}
"#,
            api = self.api,
            timeout = self.request_timeout,
            interval = self.interval,
            rps = self.rps,
            mif = self.max_in_flight,
            backoff = self.backoff_max,
            deadline = self.task_deadline,
            idle = self.idle_timeout,
            level = self.log_level,
            schedule = quoted.join(", "),
            task_secret = TASK_SECRET,
            forward_extra = self.forward_extra,
        );
        for t in &self.targets {
            let _ = write!(
                s,
                "\n[[forward.target]]\nname = \"{}\"\nurl = \"{}\"\ntimeout = \"{}\"\n",
                t.name, t.url, t.timeout
            );
            if t.with_secrets {
                let _ = write!(
                    s,
                    "secret = \"{FORWARD_SECRET}\"\nheaders = {{ \"Authorization\" = \"Bearer {HEADER_TOKEN}\" }}\n"
                );
            }
        }
        s.push('\n');
        s.push_str(&self.extra);
        s
    }
}

/// Every variable through which systemd talks to a service, so the test's own environment
/// (perhaps a CI job run by systemd) cannot leak in.
pub const SYSTEMD_VARS: [&str; 10] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "JOURNAL_STREAM",
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
];

/// A `sunopoll` command with a clean environment (no key, no socket, no `RUST_LOG` from the
/// caller's shell, none of systemd's variables).
pub fn sunopoll(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("SUNO_API_KEY")
        .env_remove("SUNOPOLL_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    for v in SYSTEMD_VARS {
        c.env_remove(v);
    }
    c
}

/// Longest a command run by [`run`] may take: more than the CLI's own 60 s wait for an answer
/// (so that its own error is what a test sees), and more than a daemon may need to answer
/// `status` while its store waits out SQLite's busy timeout several times.
pub const COMMAND_PATIENCE: Duration = Duration::from_secs(90);

/// Runs a command to completion off the async threads, capturing its output; kills it and
/// panics if it has not finished within [`COMMAND_PATIENCE`].
pub async fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sunopoll");
    output_by(child, Deadline::after(COMMAND_PATIENCE)).await
}

/// Waits for `child` and collects what it printed (it must have been spawned with piped
/// stdout and stderr); kills it and panics once `deadline` passes.
pub async fn output_by(child: Child, deadline: Deadline) -> Output {
    let pid = child.id();
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    match deadline.run(waiting).await {
        Some(joined) => joined.expect("join").expect("wait for the command"),
        None => {
            kill_pid("-KILL", pid).await;
            panic!("process {pid} did not finish by its deadline; killed");
        }
    }
}

/// Waits for `child` to exit; once `deadline` passes, kills it and panics with `context()`
/// (what it logged, say).
pub async fn exit_by(
    child: &mut Child,
    deadline: Deadline,
    context: impl FnOnce() -> String,
) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if deadline.passed() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "process {} did not exit by its deadline; killed\n{}",
                child.id(),
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends SIGTERM to `child` and waits (within `PATIENCE`) for it to exit.
pub async fn terminate(mut child: Child) -> ExitStatus {
    kill_pid("-TERM", child.id()).await;
    exit_by(&mut child, Deadline::patience(), String::new).await
}

/// `kill SIGNAL pid` (the `kill` command: `Child::kill` only sends SIGKILL).
pub async fn kill_pid(signal: &str, pid: u32) {
    let mut k = Command::new("kill");
    k.args([signal, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let status = tokio::task::spawn_blocking(move || k.status())
        .await
        .expect("join")
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// Output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The real daemon in a temporary directory.
pub struct BinDaemon {
    /// Its directory (config, store, socket, log).
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// The store file.
    pub store: PathBuf,
    /// stderr of every run, appended.
    pub log: PathBuf,
    child: Option<Child>,
    /// How the last run ended, once it has.
    exited: Option<ExitStatus>,
    /// How many times it was started.
    pub starts: u32,
    /// Extra environment variables for every start.
    pub env: Vec<(String, String)>,
}

impl BinDaemon {
    /// Writes `config`, starts the daemon with the test key and waits until it answers.
    pub async fn start(config: &BinConfig) -> BinDaemon {
        let mut d = BinDaemon::prepare(config);
        d.restart().await;
        d
    }

    /// Writes `config` in a fresh directory without starting anything.
    pub fn prepare(config: &BinConfig) -> BinDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config.to_toml()).expect("write config");
        BinDaemon {
            config: path,
            socket: dir.path().join("run/sunopoll.sock"),
            store: dir.path().join("state/sunopoll.db"),
            log: dir.path().join("daemon.log"),
            dir,
            child: None,
            exited: None,
            starts: 0,
            env: Vec::new(),
        }
    }

    /// Starts the daemon (again) and waits until it answers `status`. Panics with the log if
    /// it exits instead.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts the daemon without waiting.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the log");
        let child = sunopoll(&["daemon", "--config", path_str(&self.config)])
            .env("SUNO_API_KEY", KEY)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the daemon");
        self.child = Some(child);
        self.starts += 1;
    }

    /// Waits until the daemon answers a `status` request on its socket (a socket file left by
    /// a killed daemon does not count: nobody answers on it).
    pub async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().expect("try_wait")
            {
                self.child = None;
                panic!(
                    "the daemon exited while starting: {status}\n{}",
                    self.log_text()
                );
            }
            if let Some(v) = self
                .try_request(&serde_json::json!({"cmd": "status"}))
                .await
                && v["ok"] == true
            {
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "the daemon never answered on its socket:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        let Some(c) = self.child.as_mut() else {
            return false;
        };
        match c.try_wait().expect("try_wait") {
            None => true,
            Some(status) => {
                self.exited = Some(status);
                self.child = None;
                false
            }
        }
    }

    /// The exit code of the last run, once it has ended.
    pub fn exit_code(&self) -> Option<i32> {
        self.exited.and_then(|s| s.code())
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (at most [`PATIENCE`]).
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        kill_pid("-TERM", child.id()).await;
        exit_by(&mut child, Deadline::patience(), || {
            format!("the daemon ignored SIGTERM:\n{}", self.log_text())
        })
        .await
    }

    /// Stops the daemon with SIGTERM, checks it exited 0 and printed no secret, and returns
    /// everything it logged.
    pub async fn stop(&mut self) -> String {
        let status = self.terminate().await;
        let log = self.log_text();
        assert_eq!(status.code(), Some(0), "exit status after SIGTERM:\n{log}");
        assert_no_secrets(&log, "the daemon's log");
        log
    }

    /// Everything logged so far, over every run.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request on a fresh connection; `None` if the daemon is not answering (down, or
    /// killed mid-request).
    pub async fn try_request(&self, request: &Value) -> Option<Value> {
        try_request_at(&self.socket, request).await
    }

    /// One request that must be answered.
    pub async fn request(&self, request: Value) -> Value {
        let v = self
            .try_request(&request)
            .await
            .unwrap_or_else(|| panic!("no answer to {request}:\n{}", self.log_text()));
        assert_no_secrets(&v.to_string(), "a control-socket answer");
        v
    }

    /// `status`.
    pub async fn status(&self) -> Value {
        self.request(serde_json::json!({"cmd": "status"})).await
    }

    /// Runs a client command against this daemon's socket; checks its output for secrets.
    pub async fn cli(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--socket", path_str(&self.socket)]);
        let out = run(sunopoll(&all)).await;
        assert_no_secrets(&text(&out.stdout), "CLI stdout");
        assert_no_secrets(&text(&out.stderr), "CLI stderr");
        out
    }

    /// Every stored event, oldest first: (seq, task, stage, webhook-ids of its deliveries).
    pub async fn events(&self) -> Vec<StoredEvent> {
        let mut since = 0;
        let mut out = Vec::new();
        loop {
            let v = self
                .request(serde_json::json!({"cmd": "events", "since": since, "limit": 10000}))
                .await;
            assert_eq!(v["ok"], true, "{v}");
            for e in v["events"].as_array().expect("events") {
                since = e["seq"].as_i64().expect("seq");
                out.push(StoredEvent {
                    seq: since,
                    task: e["task_id"].as_str().unwrap_or("?").to_owned(),
                    stage: e["stage"].as_str().unwrap_or("?").to_owned(),
                });
            }
            if v["more"] != true {
                return out;
            }
        }
    }

    /// Task states by ID (`list`, all states).
    pub async fn states(&self) -> std::collections::BTreeMap<String, String> {
        let v = self.request(serde_json::json!({"cmd": "list"})).await;
        v["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|t| {
                (
                    t["task_id"].as_str().unwrap_or("?").to_owned(),
                    t["state"].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect()
    }

    /// Waits until every task in `ids` is in a final state (`done` or `failed`).
    pub async fn wait_finished(&self, ids: &[String]) -> bool {
        let started = Instant::now();
        loop {
            let states = self.states().await;
            if ids
                .iter()
                .all(|id| matches!(states.get(id).map(String::as_str), Some("done" | "failed")))
            {
                return true;
            }
            if started.elapsed() > PATIENCE {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the daemon has recovered: every task in `ids` finished, no delivery pending,
    /// polling not paused, `status` healthy. Returns whether it got there within [`PATIENCE`]
    /// (after the tasks finished).
    pub async fn settle(&self, ids: &[String]) -> bool {
        if !self.wait_finished(ids).await {
            return false;
        }
        let started = Instant::now();
        loop {
            let s = self.status().await;
            let pending: i64 = s["targets"]
                .as_array()
                .map(|ts| ts.iter().map(|t| t["pending"].as_i64().unwrap_or(1)).sum())
                .unwrap_or(0);
            if pending == 0 && s["poll"]["state"] == "polling" && s["healthy"] == true {
                return true;
            }
            if started.elapsed() > PATIENCE {
                eprintln!("never settled: {s}");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Resident and peak memory of the daemon, in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for BinDaemon {
    fn drop(&mut self) {
        // A failed test must not leave a daemon behind.
        self.kill();
    }
}

/// One stored event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// Sequence number.
    pub seq: i64,
    /// Task.
    pub task: String,
    /// Stage.
    pub stage: String,
}

/// One request to the socket at `socket` on a fresh connection; `None` if nobody answers
/// (no daemon, or the daemon died before answering).
pub async fn try_request_at(socket: &Path, request: &Value) -> Option<Value> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let attempt = async {
        let stream = UnixStream::connect(socket).await.ok()?;
        let (r, mut w) = stream.into_split();
        let mut line = request.to_string();
        line.push('\n');
        // A daemon that refuses the connection (`busy`) may close before the request is
        // written; its answer is still there to read.
        let _ = w.write_all(line.as_bytes()).await;
        let mut answer = String::new();
        let n = tokio::io::BufReader::new(r)
            .read_line(&mut answer)
            .await
            .ok()?;
        if n == 0 {
            return None;
        }
        serde_json::from_str(&answer).ok()
    };
    tokio::time::timeout(PATIENCE, attempt).await.ok().flatten()
}

/// A path as `&str` (test paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// One line of the daemon's log: time, level, message and fields.
#[derive(Clone, Debug)]
pub struct LogLine {
    /// When it was written.
    pub at: chrono::DateTime<chrono::FixedOffset>,
    /// `INFO`, `WARN`, `ERROR`…
    pub level: String,
    /// The rest of the line.
    pub rest: String,
}

impl LogLine {
    /// A `key=value` field (quotes removed).
    pub fn field(&self, key: &str) -> Option<String> {
        let needle = format!(" {key}=");
        let start = self.rest.find(&needle)? + needle.len();
        let tail = &self.rest[start..];
        if let Some(quoted) = tail.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            Some(quoted[..end].to_owned())
        } else {
            Some(tail.split_whitespace().next().unwrap_or("").to_owned())
        }
    }
}

/// Parses the daemon's log lines (skips anything that is not one).
pub fn log_lines(log: &str) -> Vec<LogLine> {
    log.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let at = chrono::DateTime::parse_from_rfc3339(parts.next()?).ok()?;
            let level = parts.next()?.to_owned();
            let rest = l.split_once(level.as_str())?.1.to_owned();
            Some(LogLine { at, level, rest })
        })
        .collect()
}

/// The warn/error lines that mention `cause`.
pub fn warnings_naming(log: &str, cause: &str) -> Vec<LogLine> {
    log_lines(log)
        .into_iter()
        .filter(|l| (l.level == "WARN" || l.level == "ERROR") && l.rest.contains(cause))
        .collect()
}
