//! The fake API of the tests that judge request timing or rates: `tests/timed_api.py`, a small
//! HTTP server in a process of its own, scripted like the in-process [`FakeApi`] (the same
//! [`ScriptedApi`] calls) and recording when each request arrived.
//!
//! Why a process of its own: the in-process fake takes a request's time when this process's
//! runtime gets round to it, and a loaded test runner bunches requests the daemon sent evenly
//! (once 7 in one second at 5/s). The timed fake takes the time in its own process, on
//! `CLOCK_MONOTONIC`, which is the clock [`Instant`] reads and one clock for every process on
//! the machine; this side turns those times into `Instant`s the tests compare with their own.
//! It appends each arrival to a file before answering, so once the daemon has an answer, its
//! request is in the file; this side only reads the file.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::helpers::{Fault, PATIENCE, Reply, ScriptedApi, TASK};

/// One request the timed fake saw.
#[derive(Clone, Debug)]
struct Arrival {
    at: Instant,
    task: String,
    auth: String,
}

/// What has been read of the arrivals file so far.
#[derive(Default)]
struct Seen {
    /// Bytes of the file already parsed (whole lines only).
    offset: usize,
    arrivals: Vec<Arrival>,
}

/// The fake Suno API in its own process (see the module docs).
pub struct TimedApi {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    seen: Mutex<Seen>,
    /// The same moment as an `Instant` and as nanoseconds of `CLOCK_MONOTONIC`.
    anchor: (Instant, i128),
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds.
fn monotonic_ns() -> i128 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec)
}

impl TimedApi {
    /// Starts one on a fresh port of 127.0.0.1; unscripted tasks are answered PENDING.
    pub async fn start() -> TimedApi {
        TimedApi::start_on_port(0).await
    }

    /// The same on `port` (to bring an API that refused connections back up on its port).
    pub async fn start_on_port(port: u16) -> TimedApi {
        tokio::task::spawn_blocking(move || TimedApi::spawn(port))
            .await
            .expect("join the timed fake's start")
    }

    fn spawn(port: u16) -> TimedApi {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = tempfile::tempdir().expect("tempdir");
        let arrivals = dir.path().join("arrivals.jsonl");
        std::fs::write(&arrivals, "").expect("create the arrivals file");
        let log = std::fs::File::create(dir.path().join("fake.log")).expect("the fake's log");
        let mut child = Command::new("python3")
            .arg(root.join("tests/timed_api.py"))
            .arg("--port")
            .arg(port.to_string())
            .arg("--arrivals")
            .arg(&arrivals)
            .arg("--pending")
            .arg(root.join("tests/fixtures/record-info.PENDING.json"))
            .arg("--placeholder")
            .arg(TASK)
            // Its stdin is a pipe only this process holds: the fake exits when this process
            // is gone, however it ends.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "python3 runs the timed fake API (tests/timed_api.py) and could not be \
                     started: {e}; .ci/run installs it"
                )
            });
        let mut line = String::new();
        let stdout = child.stdout.take().expect("the fake's stdout");
        // `read_line` returns at the first line or when the fake exits (end of file).
        let _ = BufReader::new(stdout).read_line(&mut line);
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the timed fake did not start ({line:?}): {}",
                    std::fs::read_to_string(dir.path().join("fake.log")).unwrap_or_default()
                )
            });
        let anchor = (Instant::now(), monotonic_ns());
        let api = TimedApi {
            child,
            port,
            dir,
            seen: Mutex::new(Seen::default()),
            anchor,
        };
        api.check_clock();
        api
    }

    /// The fake's clock must be this process's `Instant` clock: its "now" falls between two
    /// readings here.
    fn check_clock(&self) {
        let before = monotonic_ns();
        let answer = self.control("GET", "clock", &Value::Null);
        let after = monotonic_ns();
        let theirs = answer["ns"]
            .as_i64()
            .map(i128::from)
            .expect("the fake's clock");
        assert!(
            before <= theirs && theirs <= after,
            "the timed fake's CLOCK_MONOTONIC ({theirs}) is not this process's ({before}..{after})"
        );
    }

    /// One control request, answered once it is in force; panics with the fake's log if the
    /// fake does not answer.
    fn control(&self, method: &str, what: &str, body: &Value) -> Value {
        let body = body.to_string();
        let answer = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
            s.set_read_timeout(Some(PATIENCE))?;
            s.set_write_timeout(Some(PATIENCE))?;
            write!(
                s,
                "{method} /_fake/{what} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: \
                 application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            Ok(answer)
        })();
        let answer = answer.unwrap_or_else(|e| panic!("the timed fake: {e}: {}", self.log()));
        let (head, json) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "the timed fake refused {what}: {answer}"
        );
        serde_json::from_str(json).unwrap_or_else(|e| panic!("the timed fake said {json:?}: {e}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("fake.log")).unwrap_or_default()
    }

    fn arrivals_file(&self) -> PathBuf {
        self.dir.path().join("arrivals.jsonl")
    }

    /// `look` at every arrival so far, in the order (and so the time) the fake took them in.
    fn seen<T>(&self, look: impl FnOnce(&[Arrival]) -> T) -> T {
        let mut seen = self.seen.lock().expect("arrivals");
        let mut file = std::fs::File::open(self.arrivals_file()).expect("open the arrivals file");
        file.seek(SeekFrom::Start(seen.offset as u64))
            .expect("seek the arrivals file");
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .expect("read the arrivals file");
        // Whole lines only: the fake may be writing the next one.
        let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let (instant, anchor_ns) = self.anchor;
        for line in bytes[..whole]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            let (ns, task, auth): (i128, String, String) = serde_json::from_slice(line)
                .unwrap_or_else(|e| {
                    panic!("arrivals line {:?}: {e}", String::from_utf8_lossy(line))
                });
            let at = if ns >= anchor_ns {
                instant + Duration::from_nanos((ns - anchor_ns) as u64)
            } else {
                instant - Duration::from_nanos((anchor_ns - ns) as u64)
            };
            seen.arrivals.push(Arrival { at, task, auth });
        }
        seen.offset += whole;
        look(&seen.arrivals)
    }

    /// When each request arrived, and for which task, in order of arrival.
    pub fn arrivals(&self) -> Vec<(Instant, String)> {
        self.seen(|all| all.iter().map(|a| (a.at, a.task.clone())).collect())
    }

    /// Holds each request a uniform 0–`max` before it arrives: a network whose latency
    /// jitters, so that requests sent evenly arrive bunched.
    pub fn set_jitter(&self, max: Duration) {
        self.control(
            "POST",
            "jitter",
            &json!({ "max_ms": max.as_millis() as u64 }),
        );
    }
}

/// A reply as the timed fake reads it.
fn wire(reply: &Reply) -> Value {
    json!({
        "status": reply.status,
        "body": base64::engine::general_purpose::STANDARD.encode(&reply.body),
        "retry_after": reply.retry_after,
        "delay_ms": reply.delay.as_millis() as u64,
        "fault": reply.fault.map(|f| match f {
            Fault::Truncate => "truncate",
            Fault::ResetMidBody => "reset",
        }),
    })
}

impl ScriptedApi for TimedApi {
    fn script(&self, task: &str, replies: Vec<Reply>) {
        assert!(!replies.is_empty());
        let replies: Vec<Value> = replies.iter().map(wire).collect();
        self.control(
            "POST",
            "script",
            &json!({ "task": task, "replies": replies }),
        );
    }

    fn set_override(&self, reply: Option<Reply>) {
        self.control(
            "POST",
            "override",
            &json!({ "reply": reply.as_ref().map(wire) }),
        );
    }

    fn calls(&self, task: &str) -> usize {
        self.seen(|all| all.iter().filter(|a| a.task == task).count())
    }

    fn total_calls(&self) -> usize {
        self.seen(<[Arrival]>::len)
    }

    fn auth_headers(&self) -> Vec<String> {
        self.seen(|all| {
            all.iter()
                .filter(|a| !a.auth.is_empty())
                .map(|a| a.auth.clone())
                .collect()
        })
    }

    fn uri(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for TimedApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
