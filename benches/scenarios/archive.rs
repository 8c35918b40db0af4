//! The `archive` scenario: the real daemon keeping one 1 GiB file and then 200 small ones from
//! a local server on 127.0.0.1, measured from outside (the server's clock, `/proc`).
//!
//! One server plays both the API (any request naming a `taskId` gets that task's SUCCESS
//! answer) and the CDN (`/files/…`, with `Content-Length`, an `ETag` and `Range: bytes=N-`).
//! It is plain blocking threads, one per connection, reading the big file from disk in
//! chunks: the bench's own tokio worker stays free and the server is never what is measured.
//! The 1 GiB file is written once into a temp dir in 1 MiB chunks, each a pseudo-random block
//! stamped with its index, so neither side ever holds it whole.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::proc::{Daemon, Setup, task_id};
use crate::{Results, mib};

/// Size of the big file: 1 GiB.
const BIG: u64 = 1 << 30;
/// The chunk the big file is written and served in.
const CHUNK: usize = 1 << 20;
/// Small files: 25 tasks × 2 tracks × 4 files.
const SMALL_TASKS: u64 = 25;
/// Bytes of each small file.
const SMALL_SIZE: usize = 256 * 1024;
/// Files one music task with two tracks leaves.
const FILES_PER_TASK: u64 = 8;
/// Bytes per MB (the figures are MB/s in the SI sense).
const MB: f64 = 1e6;

/// What a path serves.
enum Body {
    /// A file on disk, read in chunks.
    File(PathBuf, u64),
    /// Bytes in memory.
    Bytes(Arc<Vec<u8>>),
}

#[derive(Default)]
struct State {
    /// `/files/…` → what it serves.
    files: HashMap<String, Body>,
    /// Task → its record-info SUCCESS answer.
    tasks: HashMap<String, Arc<Vec<u8>>>,
    /// Task → when its SUCCESS answer was first written: the task's `complete`.
    answered: HashMap<String, Instant>,
    /// Requests per file path, and the `Range` of each.
    seen: HashMap<String, Vec<Option<String>>>,
}

/// The running server.
struct Server {
    url: String,
    state: Arc<Mutex<State>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(stream, &s));
            }
        });
        Server { url, state }
    }

    fn answered(&self, task: &str) -> Option<Instant> {
        self.state
            .lock()
            .expect("state")
            .answered
            .get(task)
            .copied()
    }
}

/// Serves requests on one connection until the client closes it (keep-alive).
fn serve(stream: TcpStream, state: &Mutex<State>) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut out = std::io::BufWriter::with_capacity(CHUNK, write_half);
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" || line == "\n" => break,
                Ok(_) => head.push(line.trim_end().to_owned()),
            }
        }
        let target = head
            .first()
            .and_then(|l| l.split(' ').nth(1))
            .unwrap_or("/")
            .to_owned();
        let header = |name: &str| {
            head.iter().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let ok = if let Some(task) = target
            .split("taskId=")
            .nth(1)
            .map(|t| t.split('&').next().unwrap_or("").to_owned())
        {
            let body = {
                let mut s = state.lock().expect("state");
                let body = s.tasks.get(&task).cloned();
                if body.is_some() {
                    s.answered.entry(task).or_insert_with(Instant::now);
                }
                body
            };
            match body {
                Some(b) => respond(&mut out, "200 OK", "content-type: application/json\r\n", &b),
                None => respond(&mut out, "404 Not Found", "", b""),
            }
        } else {
            serve_file(&mut out, state, &target, header("range"))
        };
        if !ok || out.flush().is_err() {
            return;
        }
    }
}

fn respond(out: &mut impl Write, status: &str, extra: &str, body: &[u8]) -> bool {
    write!(
        out,
        "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\n\r\n",
        body.len()
    )
    .and_then(|()| out.write_all(body))
    .is_ok()
}

/// A file, whole or from `bytes=N-`.
fn serve_file(
    out: &mut impl Write,
    state: &Mutex<State>,
    path: &str,
    range: Option<String>,
) -> bool {
    let body = {
        let mut s = state.lock().expect("state");
        s.seen
            .entry(path.to_owned())
            .or_default()
            .push(range.clone());
        match s.files.get(path) {
            Some(Body::File(p, len)) => Some((Some(p.clone()), None, *len)),
            Some(Body::Bytes(b)) => Some((None, Some(b.clone()), b.len() as u64)),
            None => None,
        }
    };
    let Some((file, bytes, len)) = body else {
        return respond(out, "404 Not Found", "", b"");
    };
    // The files never change: one validator each is enough for If-Range.
    let etag = format!("\"bench-{len}\"");
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n < len);
    let (status, extra) = match start {
        Some(n) => (
            "206 Partial Content",
            format!("content-range: bytes {n}-{}/{len}\r\n", len - 1),
        ),
        None => ("200 OK", String::new()),
    };
    let from = start.unwrap_or(0);
    if write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\netag: {etag}\r\naccept-ranges: bytes\r\n{extra}\r\n",
        len - from
    )
    .is_err()
    {
        return false;
    }
    match (file, bytes) {
        (Some(p), _) => {
            let Ok(mut f) = std::fs::File::open(&p) else {
                return false;
            };
            if std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from)).is_err() {
                return false;
            }
            let mut buf = vec![0u8; CHUNK];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => return true,
                    Ok(n) => {
                        if out.write_all(&buf[..n]).is_err() {
                            return false;
                        }
                    }
                    Err(_) => return false,
                }
            }
        }
        (None, Some(b)) => out
            .write_all(&b[usize::try_from(from).unwrap_or(0)..])
            .is_ok(),
        (None, None) => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the 1 GiB file in 1 MiB chunks (a pseudo-random block, each chunk stamped with its
/// index so no two are alike), fsynced so its write-back is not part of the measurement;
/// returns its SHA-256.
fn write_big(path: &Path) -> String {
    let mut rng = fastrand::Rng::with_seed(12);
    let mut chunk: Vec<u8> = (0..CHUNK).map(|_| rng.u8(..)).collect();
    let mut f = std::fs::File::create(path).expect("create the big file");
    let mut hasher = Sha256::new();
    for i in 0..BIG / CHUNK as u64 {
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&chunk).expect("write the big file");
        hasher.update(&chunk);
    }
    f.sync_all().expect("fsync the big file");
    hex(&hasher.finalize())
}

/// SHA-256 and size of a file on disk, read in chunks.
fn hash_file(path: &Path) -> (u64, String) {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read the kept file");
        if n == 0 {
            return (size, hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
}

/// A record-info SUCCESS answer for `task` with these tracks (camelCase, as the API writes
/// them), built from the fixture so every other field is a real one.
fn success(task: &str, tracks: &[Value]) -> Arc<Vec<u8>> {
    let path = format!(
        "{}/tests/fixtures/record-info.SUCCESS.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut v: Value = serde_json::from_str(&text).expect("fixture json");
    v["data"]["taskId"] = json!(task);
    v["data"]["response"]["taskId"] = json!(task);
    v["data"]["response"]["sunoData"] = json!(tracks);
    Arc::new(serde_json::to_vec(&v).expect("json"))
}

fn show(d: &Daemon, task: &str) -> Vec<Value> {
    d.request(&json!({"cmd": "show", "task_id": task}).to_string())["files"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The scenario: the big file, then the small ones, on one daemon.
pub fn archive(dir: &Path, results: &mut Results) {
    let served = dir.join("served");
    let daemon_dir = dir.join("daemon");
    let archive_dir = dir.join("archive");
    for d in [&served, &daemon_dir] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let t = Instant::now();
    let big_path = served.join("big.mp3");
    let big_sha = write_big(&big_path);
    eprintln!(
        "  archive     wrote the 1 GiB file in {:.1?} (sha256 {}…)",
        t.elapsed(),
        &big_sha[..12]
    );

    let server = Server::start();
    let small_sha = {
        let mut s = server.state.lock().expect("state");
        s.files
            .insert("/files/big.mp3".into(), Body::File(big_path, BIG));
        s.files.insert(
            "/files/big.jpeg".into(),
            Body::Bytes(Arc::new(vec![7u8; 64 * 1024])),
        );
        let mut rng = fastrand::Rng::with_seed(13);
        let mut small_sha = HashMap::new();
        for n in 0..SMALL_TASKS * FILES_PER_TASK {
            let ext = if n % 4 < 2 { "mp3" } else { "jpeg" };
            let path = format!("/files/small/{n}.{ext}");
            let body: Vec<u8> = (0..SMALL_SIZE).map(|_| rng.u8(..)).collect();
            small_sha.insert(path.clone(), hex(&Sha256::digest(&body)));
            s.files.insert(path, Body::Bytes(Arc::new(body)));
        }
        small_sha
    };

    let big_task = task_id(20, 0);
    let big_track = "5d1f0c3a-8e2b-4f6d-9a7c-000000000000";
    let body = success(
        &big_task,
        &[json!({
            "id": big_track,
            "audioUrl": format!("{}/files/big.mp3", server.url),
            "sourceAudioUrl": null,
            "streamAudioUrl": format!("{}/stream/big", server.url),
            "sourceStreamAudioUrl": null,
            "imageUrl": format!("{}/files/big.jpeg", server.url),
            "sourceImageUrl": null,
            "title": "one gibibyte",
            "duration": 187.32
        })],
    );
    server
        .state
        .lock()
        .expect("state")
        .tasks
        .insert(big_task.clone(), body);
    let small_tasks: Vec<String> = (0..SMALL_TASKS).map(|i| task_id(21, i)).collect();
    for (i, task) in small_tasks.iter().enumerate() {
        let url = |k: u64| {
            let n = i as u64 * FILES_PER_TASK + k;
            let ext = if n % 4 < 2 { "mp3" } else { "jpeg" };
            format!("{}/files/small/{n}.{ext}", server.url)
        };
        let tracks: Vec<Value> = (0..2u64)
            .map(|t| {
                json!({
                    "id": format!("9e8d7c6b-5a4f-4e3d-8c2b-{i:06}{t:06}"),
                    "audioUrl": url(t * 4),
                    "sourceAudioUrl": url(t * 4 + 1),
                    "streamAudioUrl": format!("{}/stream/{i}", server.url),
                    "imageUrl": url(t * 4 + 2),
                    "sourceImageUrl": url(t * 4 + 3),
                    "title": "small",
                    "duration": 30.0
                })
            })
            .collect();
        let body = success(task, &tracks);
        server
            .state
            .lock()
            .expect("state")
            .tasks
            .insert(task.clone(), body);
    }

    let extra = format!(
        "[archive]\ndir = \"{}\"\nallow-hosts = [\"127.0.0.1\"]\n",
        archive_dir.display()
    );
    let d = Daemon::start(&Setup {
        api: &server.url,
        dir: &daemon_dir,
        poll: "interval = \"1s\"\nmax-in-flight = 16\nmax-requests-per-second = \"unlimited\"",
        extra: &extra,
    });

    // --- One 1 GiB file. ---
    std::thread::sleep(Duration::from_millis(500));
    let (rss0, hwm0) = d.rss_kib();
    let (user0, system0) = d.cpu_user_system();
    let added = d.request(&json!({"cmd": "add", "task_ids": [big_task]}).to_string());
    assert_eq!(added["ok"], true, "{added}");
    let mut rss_max = rss0;
    let limit = Instant::now();
    let (done_at, files) = loop {
        let files = show(&d, &big_task);
        let audio = files.iter().find(|f| f["kind"] == "audio");
        rss_max = rss_max.max(d.rss_kib().0);
        match audio.map(|f| f["state"].as_str().unwrap_or("")) {
            Some("done") => break (Instant::now(), files),
            Some("failed" | "expired") => panic!("the big file was not kept: {files:?}"),
            _ => {}
        }
        assert!(
            limit.elapsed() < Duration::from_secs(900),
            "timed out waiting for the big file; last show: {files:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (user1, system1) = d.cpu_user_system();
    let (user, system) = (
        (user1 - user0).as_secs_f64(),
        (system1 - system0).as_secs_f64(),
    );
    let cpu = user + system;
    let (rss1, hwm1) = d.rss_kib();
    let complete = server.answered(&big_task).expect("the task was answered");
    let wall = done_at.duration_since(complete).as_secs_f64();
    let audio = files
        .iter()
        .find(|f| f["kind"] == "audio")
        .expect("the audio file");
    assert_eq!(audio["size"], BIG, "{audio}");
    assert_eq!(
        audio["sha256"].as_str(),
        Some(big_sha.as_str()),
        "the store's SHA-256 is the served file's"
    );
    let kept = PathBuf::from(audio["path"].as_str().expect("path"));
    let t = Instant::now();
    let (size, sha) = hash_file(&kept);
    assert_eq!(
        (size, sha.as_str()),
        (BIG, big_sha.as_str()),
        "{}",
        kept.display()
    );
    eprintln!(
        "  archive     the kept file hashes to the served file's SHA-256 (checked in {:.1?})",
        t.elapsed()
    );
    let big_requests = server
        .state
        .lock()
        .expect("state")
        .seen
        .get("/files/big.mp3")
        .map_or(0, Vec::len);
    let mbs = BIG as f64 / MB / wall;
    results.add(
        "archive",
        &format!("1 GiB file: complete → file `done` (s; {big_requests} request(s))"),
        "(info)",
        format!("{wall:.2}"),
        None,
    );
    results.add(
        "archive",
        "1 GiB file: throughput (MB/s), SHA-256 verified",
        "(info)",
        format!("{mbs:.0}"),
        None,
    );
    results.add(
        "archive",
        "1 GiB file: daemon CPU per MB (ms)",
        "(info)",
        format!(
            "{:.2} ({cpu:.2} s: {user:.2} user, {system:.2} system)",
            cpu * 1000.0 / (BIG as f64 / MB)
        ),
        None,
    );
    let growth = hwm1.saturating_sub(hwm0);
    results.add(
        "archive",
        "1 GiB file: peak RSS (VmHWM) before → after",
        "grows ≤ 64 MiB",
        format!("{} → {} (+{})", mib(hwm0), mib(hwm1), mib(growth)),
        Some(growth <= 64 * 1024),
    );
    results.add(
        "archive",
        "1 GiB file: RSS before / highest sample / after",
        "(info)",
        format!("{} / {} / {}", mib(rss0), mib(rss_max), mib(rss1)),
        None,
    );
    // The kept copy is not needed any more: give the disk back before the next part.
    let _ = std::fs::remove_file(&kept);

    // --- 200 files of 256 KiB. ---
    let want = SMALL_TASKS * FILES_PER_TASK;
    let cpu0 = d.cpu();
    let added = d.request(&json!({"cmd": "add", "task_ids": small_tasks}).to_string());
    assert_eq!(added["ok"], true, "{added}");
    let limit = Instant::now();
    let done_at = loop {
        let status = d.request(r#"{"cmd":"status"}"#);
        let files = &status["archive"]["files"];
        let done = files["done"].as_u64().unwrap_or(0);
        let pending = files["pending"].as_u64().unwrap_or(u64::MAX);
        if pending == 0 && done >= want + 2 {
            break Instant::now();
        }
        assert!(
            files["failed"].as_u64().unwrap_or(0) == 0,
            "a small file failed: {status}"
        );
        assert!(
            limit.elapsed() < Duration::from_secs(600),
            "timed out waiting for the small files; last status: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let cpu = (d.cpu() - cpu0).as_secs_f64();
    let first = small_tasks
        .iter()
        .filter_map(|t| server.answered(t))
        .min()
        .expect("the small tasks were answered");
    let wall = done_at.duration_since(first).as_secs_f64();
    let mut checked = 0;
    for task in &small_tasks {
        for f in show(&d, task) {
            let url = f["url"].as_str().expect("url");
            let path = url.strip_prefix(&server.url).expect("a local URL");
            assert_eq!(f["state"], "done", "{f}");
            assert_eq!(
                f["sha256"].as_str(),
                small_sha.get(path).map(String::as_str),
                "{f}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, want, "every small file listed once");
    let (_, hwm2) = d.rss_kib();
    d.stop();
    let bytes = (want as usize * SMALL_SIZE) as f64;
    results.add(
        "archive",
        &format!(
            "{want} files of 256 KiB ({:.0} MB): first complete → all `done` (s)",
            bytes / MB
        ),
        "(info)",
        format!("{wall:.2}"),
        None,
    );
    results.add(
        "archive",
        "small files: files/s / MB/s (default max-in-flight 2, SHA-256 verified)",
        "(info)",
        format!("{:.0} / {:.1}", want as f64 / wall, bytes / MB / wall),
        None,
    );
    results.add(
        "archive",
        "small files: daemon CPU per MB (ms) / peak RSS after",
        "(info)",
        format!("{:.2} / {}", cpu * 1000.0 / (bytes / MB), mib(hwm2)),
        None,
    );
}
