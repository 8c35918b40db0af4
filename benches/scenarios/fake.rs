//! A small, fast HTTP/1.1 server on 127.0.0.1 that plays both the Suno API and a callback
//! handler. wiremock records every request and matches rules on each; at thousands of requests
//! per second that would measure wiremock, not sunopoll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the fake API answers each task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Always PENDING.
    Pending,
    /// PENDING, TEXT_SUCCESS, FIRST_SUCCESS, then SUCCESS: four polls, three events.
    Progress,
    /// TEXT_SUCCESS from the first poll on: one event.
    Text,
}

/// What the fake saw.
#[derive(Default)]
pub struct Log {
    /// Every record-info request: (arrival, task).
    pub polls: Vec<(Instant, String)>,
    /// When each task's first TEXT_SUCCESS answer was written.
    pub text_answered: HashMap<String, Instant>,
    /// Every POST to the handler: (arrival, task, stage).
    pub posts: Vec<(Instant, String, String)>,
    /// Submissions (`POST /api/v1/…`) answered, each with a fresh task ID.
    pub submissions: u64,
    per_task: HashMap<String, u32>,
}

/// A running fake.
pub struct Fake {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// What it saw.
    pub log: Arc<Mutex<Log>>,
}

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

struct Bodies {
    pending: Vec<u8>,
    text: Vec<u8>,
    first: Vec<u8>,
    success: Vec<u8>,
}

impl Fake {
    /// Starts the fake on a fresh port.
    pub async fn start(mode: Mode) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let log = Arc::new(Mutex::new(Log::default()));

        let bodies = Arc::new(Bodies {
            pending: fixture("record-info.PENDING.json"),
            text: fixture("record-info.TEXT_SUCCESS.json"),
            first: fixture("record-info.FIRST_SUCCESS.json"),
            success: fixture("record-info.SUCCESS.json"),
        });
        let l = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, l.clone(), mode, bodies.clone()));
            }
        });
        Fake { url, log }
    }

    /// Requests so far.
    pub fn poll_count(&self) -> usize {
        self.log.lock().expect("log").polls.len()
    }
}

async fn serve(
    mut stream: tokio::net::TcpStream,
    log: Arc<Mutex<Log>>,
    mode: Mode,
    bodies: Arc<Bodies>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        // Read one request head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        let first_line = head.lines().next().unwrap_or("");
        let now = Instant::now();
        let reply: std::borrow::Cow<'_, [u8]> = if first_line.starts_with("GET ") {
            let task = first_line
                .split("taskId=")
                .nth(1)
                .and_then(|s| s.split([' ', '&']).next())
                .unwrap_or("")
                .to_owned();
            let mut l = log.lock().expect("log");
            let n = {
                let c = l.per_task.entry(task.clone()).or_insert(0);
                *c += 1;
                *c - 1
            };
            let body = match (mode, n) {
                (Mode::Pending, _) | (Mode::Progress, 0) => &bodies.pending,
                (Mode::Progress, 1) | (Mode::Text, _) => &bodies.text,
                (Mode::Progress, 2) => &bodies.first,
                (Mode::Progress, _) => &bodies.success,
            };
            if body == &bodies.text {
                l.text_answered
                    .entry(task.clone())
                    .or_insert_with(Instant::now);
            }
            let body = about(body, &task);
            l.polls.push((now, task));
            body
        } else if first_line.starts_with("POST /api/v1/") {
            // A submission (through the API stand-in, or sent directly): a new task each time.
            let mut l = log.lock().expect("log");
            l.submissions += 1;
            let id = format!("{:08x}{:024x}", 0x5b_u32, l.submissions);
            std::borrow::Cow::Owned(
                format!(r#"{{"code":200,"msg":"success","data":{{"taskId":"{id}"}}}}"#)
                    .into_bytes(),
            )
        } else {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let task = v["data"]["task_id"].as_str().unwrap_or("").to_owned();
            let stage = v["data"]["callbackType"].as_str().unwrap_or("").to_owned();
            log.lock().expect("log").posts.push((now, task, stage));
            std::borrow::Cow::Borrowed(b"ok")
        };
        let mut response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        )
        .into_bytes();
        response.extend_from_slice(&reply);
        if stream.write_all(&response).await.is_err() {
            return;
        }
    }
}

/// The task ID the fixtures' answers are about.
const FIXTURE_TASK: &[u8] = b"a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10";

/// `body` made an answer about `task`: the daemon checks that an answer names the task it asked
/// about, and refuses (and backs off) one about another task, as from a cache answering wrongly.
fn about<'a>(body: &'a [u8], task: &str) -> std::borrow::Cow<'a, [u8]> {
    if task.len() != FIXTURE_TASK.len() || find(body, FIXTURE_TASK).is_none() {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut out = body.to_vec();
    let mut at = 0;
    while let Some(i) = find(&out[at..], FIXTURE_TASK) {
        out[at + i..at + i + task.len()].copy_from_slice(task.as_bytes());
        at += i + task.len();
    }
    std::borrow::Cow::Owned(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
