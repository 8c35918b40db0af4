//! The asset archive (issue 12) against a local fake file server on 127.0.0.1 that honours
//! `Range` (or, when told, ignores it), counts requests per file, can answer 404 for a while,
//! cut a body short, or stream it slowly: every file kept byte-exact and fetched once, a cut
//! or killed download resumed with a range request, a server that ignores ranges still giving
//! a correct file, "not there yet" retried, "not there any more" expired, a full disk pausing
//! downloads, a restart fetching nothing again, and housekeeping never deleting kept files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::ObjectStoreExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sunopoll::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::binary::{BinConfig, BinDaemon};
use crate::helpers::*;

/// How one file is served.
#[derive(Clone, Default)]
pub(crate) struct Spec {
    pub(crate) body: Vec<u8>,
    /// Answer 404 to this many requests first.
    pub(crate) missing: usize,
    /// Answer 404 always.
    pub(crate) gone: bool,
    /// Answer every request with the whole body (200), whatever its `Range`.
    pub(crate) ignore_range: bool,
    /// On the first request, close the connection after this many body bytes.
    pub(crate) cut_first_at: Option<usize>,
    /// Stream in chunks of this size, this far apart.
    pub(crate) slow: Option<(usize, Duration)>,
    /// Answer `302 Found` to this location instead.
    pub(crate) redirect: Option<String>,
}

/// One request the server saw.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    /// When it arrived.
    pub(crate) at: std::time::Instant,
    range: Option<String>,
    if_range: Option<String>,
}

#[derive(Default)]
struct ServerState {
    files: HashMap<String, Spec>,
    seen: HashMap<String, Vec<Seen>>,
}

/// The fake CDN.
#[derive(Clone)]
pub(crate) struct FileServer {
    pub(crate) addr: std::net::SocketAddr,
    state: Arc<Mutex<ServerState>>,
}

impl FileServer {
    pub(crate) async fn start() -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = FileServer {
            addr: listener.local_addr().expect("addr"),
            state: Arc::new(Mutex::new(ServerState::default())),
        };
        let state = server.state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, state.clone()));
            }
        });
        server
    }

    pub(crate) fn put(&self, path: &str, spec: Spec) {
        self.state
            .lock()
            .expect("state")
            .files
            .insert(path.to_owned(), spec);
    }

    pub(crate) fn seen(&self, path: &str) -> Vec<Seen> {
        self.state
            .lock()
            .expect("state")
            .seen
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    fn total(&self) -> usize {
        self.state
            .lock()
            .expect("state")
            .seen
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// The file at `path`'s ETag: its content's hash, so a changed file has another.
fn etag(body: &[u8]) -> String {
    format!("\"{}\"", &sha256(body)[..16])
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    sunopoll::archive::download::hex(&Sha256::digest(bytes))
}

/// Serves one request (HTTP/1.1, `Connection: close`).
async fn serve(mut stream: tokio::net::TcpStream, state: Arc<Mutex<ServerState>>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let seen = Seen {
        at: std::time::Instant::now(),
        range: header("range"),
        if_range: header("if-range"),
    };
    let (spec, first) = {
        let mut s = state.lock().expect("state");
        let list = s.seen.entry(path.clone()).or_default();
        list.push(seen.clone());
        let first = list.len() == 1;
        let spec = s.files.get_mut(&path).map(|spec| {
            let answer = spec.clone();
            if spec.missing > 0 {
                spec.missing -= 1;
            }
            answer
        });
        (spec, first)
    };
    let Some(spec) = spec.filter(|s| !s.gone && s.missing == 0) else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return;
    };
    if let Some(to) = &spec.redirect {
        let _ = stream
            .write_all(
                format!("HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
        return;
    }
    let tag = etag(&spec.body);
    let start = match (&seen.range, &seen.if_range, spec.ignore_range) {
        (Some(r), validator, false) if validator.as_ref().is_none_or(|v| *v == tag) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n < spec.body.len()),
        _ => None,
    };
    let len = spec.body.len();
    let (status, extra, body) = match start {
        Some(n) => (
            "206 Partial Content",
            format!("content-range: bytes {n}-{}/{len}\r\n", len - 1),
            &spec.body[n..],
        ),
        None => ("200 OK", String::new(), &spec.body[..]),
    };
    let response_head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\netag: {tag}\r\naccept-ranges: bytes\r\n{extra}connection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(response_head.as_bytes()).await.is_err() {
        return;
    }
    let cut = if first { spec.cut_first_at } else { None };
    let body = &body[..cut.unwrap_or(body.len()).min(body.len())];
    match spec.slow {
        None => {
            let _ = stream.write_all(body).await;
        }
        Some((chunk, gap)) => {
            for part in body.chunks(chunk) {
                if stream.write_all(part).await.is_err() {
                    return;
                }
                let _ = stream.flush().await;
                tokio::time::sleep(gap).await;
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// Bytes that differ per file and per position.
pub(crate) fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// The record-info SUCCESS fixture for `task`, its file URLs pointing at `server`; and the
/// paths of its eight files (four per track), each registered with its own content.
pub(crate) fn music_task(server: &FileServer, task: &str, seed: u64) -> (Reply, Vec<String>) {
    let local = format!("http://{}", server.addr);
    let text = String::from_utf8(fixture("record-info.SUCCESS.json"))
        .expect("utf8")
        .replace(TASK, task)
        .replace("https://files.example.com", &format!("{local}/{task}/f"))
        .replace("https://cdn1.example.com", &format!("{local}/{task}/c1"))
        .replace("https://cdn2.example.com", &format!("{local}/{task}/c2"));
    let v: Value = serde_json::from_str(&text).expect("json");
    let mut paths = Vec::new();
    for track in v["data"]["response"]["sunoData"]
        .as_array()
        .expect("tracks")
    {
        for key in ["audioUrl", "sourceAudioUrl", "imageUrl", "sourceImageUrl"] {
            let url = track[key].as_str().expect("url");
            paths.push(url.strip_prefix(&local).expect("local").to_owned());
        }
    }
    for (i, p) in paths.iter().enumerate() {
        let len = 20_000 + i * 3_001;
        server.put(
            p,
            Spec {
                body: content(seed + i as u64, len),
                ..Spec::default()
            },
        );
    }
    (Reply::raw(200, text), paths)
}

fn archive_on(c: &mut Config) {
    let dir = c.store.path.parent().expect("store dir").join("archive");
    c.archive.dir = Some(dir);
    c.archive.allow_hosts = vec!["127.0.0.1".into()];
    c.archive.retry_interval = Duration::from_millis(50);
    c.archive.min_free = 0;
}

fn archive_dir(d: &TestDaemon) -> PathBuf {
    d.config.archive.dir.clone().expect("archive on")
}

/// `show`'s files of `task`, once `done(files)` holds (within `PATIENCE`).
async fn files_until(
    d: &TestDaemon,
    task: &str,
    what: &str,
    mut done: impl FnMut(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Deadline::patience();
    let mut last = Value::Null;
    while !deadline.passed() {
        if let Some(v) = deadline
            .run(d.request(json!({"cmd": "show", "task_id": task})))
            .await
        {
            let files = v["files"].as_array().cloned().unwrap_or_default();
            if done(&files) {
                return files;
            }
            last = v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}; last show: {last}")
}

fn all_in(files: &[Value], state: &str) -> bool {
    !files.is_empty() && files.iter().all(|f| f["state"] == state)
}

/// Every file `show` lists is on disk, byte for byte what the server holds, with the hash
/// `show` reports.
fn assert_kept(server: &FileServer, files: &[Value], paths: &[String]) {
    let state = server.state.lock().expect("state");
    for f in files {
        let url = f["url"].as_str().expect("url");
        let path = paths
            .iter()
            .find(|p| url.ends_with(p.as_str()))
            .unwrap_or_else(|| panic!("{url} is not one of the task's files"));
        let want = &state.files[path].body;
        let local = Path::new(f["path"].as_str().expect("path"));
        let got = std::fs::read(local).unwrap_or_else(|e| panic!("{}: {e}", local.display()));
        assert!(
            got == *want,
            "{} differs from the server's {path}",
            local.display()
        );
        assert_eq!(f["sha256"], sha256(want), "{path}");
        assert_eq!(f["size"], want.len(), "{path}");
        assert!(!sunopoll::archive::download::part_path(local).exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_asset_of_a_two_track_task_is_kept_byte_exact_and_fetched_once() {
    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let (reply, paths) = music_task(&server, "arch1", 1);
    api.script("arch1", vec![reply]);
    let mut d = TestDaemon::start(&api, archive_on).await;
    d.add(&["arch1"]).await;
    let files = files_until(&d, "arch1", "every file of arch1 kept", |f| {
        all_in(f, "done")
    })
    .await;
    assert_eq!(files.len(), 8, "four files per track: {files:?}");
    assert_kept(&server, &files, &paths);
    for p in &paths {
        assert_eq!(server.seen(p).len(), 1, "{p} fetched once");
    }
    assert_eq!(
        server.total(),
        8,
        "stream URLs are not files: nothing else was fetched"
    );
    let names: Vec<&str> = files
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    assert!(
        names.contains(&"5d1f0c3a-8e2b-4f6d-9a7c-2b3e4f5a6b7c.mp3"),
        "{names:?}"
    );
    assert!(
        names.contains(&"source_9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b.jpeg"),
        "{names:?}"
    );
    let manifest_path = archive_dir(&d).join("arch1").join("manifest.json");
    let manifest: Value = poll_until(
        Deadline::patience(),
        "the manifest",
        Duration::from_millis(20),
        || async {
            std::fs::read(&manifest_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        },
    )
    .await;
    assert_eq!(manifest["task_id"], "arch1");
    let listed = manifest["files"].as_array().expect("files");
    assert_eq!(listed.len(), 8);
    for f in &files {
        let entry = listed
            .iter()
            .find(|e| e["name"] == f["name"])
            .expect("listed");
        assert_eq!(entry["sha256"], f["sha256"]);
        assert_eq!(entry["size"], f["size"]);
        assert_eq!(entry["url"], f["url"]);
        assert!(
            entry["kind"].is_string() && entry["kept_at"].is_string(),
            "{entry}"
        );
    }
    let status = d.request(json!({"cmd": "status"})).await;
    let counts = &status["archive"]["files"];
    assert_eq!(counts["done"], 8, "{status}");
    let bytes: usize = files
        .iter()
        .map(|f| f["size"].as_u64().expect("size") as usize)
        .sum();
    assert_eq!(counts["bytes"], bytes);

    // A restart fetches nothing again. A second task, completed after the restart, shows the
    // archive has looked at its queue since.
    d.stop().await;
    let dir = d.dir.clone();
    let config = d.config.clone();
    let d = TestDaemon::start_in(dir, config).await;
    let (reply, more) = music_task(&server, "arch2", 100);
    api.script("arch2", vec![reply]);
    d.add(&["arch2"]).await;
    let files2 = files_until(&d, "arch2", "every file of arch2 kept", |f| {
        all_in(f, "done")
    })
    .await;
    assert_kept(&server, &files2, &more);
    for p in &paths {
        assert_eq!(
            server.seen(p).len(),
            1,
            "{p} not fetched again after the restart"
        );
    }
    let status = d.request(json!({"cmd": "status"})).await;
    assert_eq!(status["archive"]["files"]["done"], 16, "{status}");

    // Housekeeping that prunes every finished task at once, every second, deletes the tasks;
    // the files stay.
    let mut d = d;
    d.stop().await;
    let mut config = d.config.clone();
    config.housekeeping.retention = Duration::ZERO;
    config.housekeeping.prune_schedule = "* * * * * *".parse().expect("cron");
    let d = TestDaemon::start_in(d.dir.clone(), config).await;
    for task in ["arch1", "arch2"] {
        poll_until(
            Deadline::patience(),
            "housekeeping to prune the tasks",
            Duration::from_millis(50),
            || async {
                let v = d.request(json!({"cmd": "show", "task_id": task})).await;
                (v["ok"] == false).then_some(())
            },
        )
        .await;
    }
    for f in files.iter().chain(&files2) {
        assert!(Path::new(f["path"].as_str().expect("path")).exists(), "{f}");
    }
    assert!(manifest_path.exists());
    assert_kept(&server, &files, &paths);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_with_a_range_and_a_server_ignoring_it_restarts_from_zero() {
    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let (reply, paths) = music_task(&server, "cut1", 7);
    // The first file honours ranges; the second ignores them (answers 200 to a resume).
    for (i, p) in paths.iter().take(2).enumerate() {
        let mut spec = server.state.lock().expect("state").files[p].clone();
        spec.cut_first_at = Some(5_000);
        spec.ignore_range = i == 1;
        server.put(p, spec);
    }
    api.script("cut1", vec![reply]);
    let d = TestDaemon::start(&api, archive_on).await;
    d.add(&["cut1"]).await;
    let files = files_until(&d, "cut1", "every file of cut1 kept", |f| all_in(f, "done")).await;
    assert_kept(&server, &files, &paths);
    let resumed = server.seen(&paths[0]);
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert_eq!(
        resumed[0].range, None,
        "the first request asks for the whole file"
    );
    assert_eq!(
        resumed[1].range.as_deref(),
        Some("bytes=5000-"),
        "{resumed:?}"
    );
    let body = server.state.lock().expect("state").files[&paths[0]]
        .body
        .clone();
    assert_eq!(resumed[1].if_range.as_deref(), Some(etag(&body).as_str()));
    let ignored = server.seen(&paths[1]);
    assert_eq!(ignored.len(), 2, "{ignored:?}");
    assert_eq!(
        ignored[1].range.as_deref(),
        Some("bytes=5000-"),
        "it asked for the rest"
    );
    // …and got the whole file, which replaced the part instead of being appended to it:
    // assert_kept compared both files byte for byte.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_not_there_yet_is_fetched_once_it_is_and_one_gone_after_expiry_expires() {
    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let (reply, paths) = music_task(&server, "late1", 20);
    let mut spec = server.state.lock().expect("state").files[&paths[0]].clone();
    spec.missing = 2;
    server.put(&paths[0], spec);
    api.script("late1", vec![reply]);
    let d = TestDaemon::start(&api, archive_on).await;
    d.add(&["late1"]).await;
    let files = files_until(&d, "late1", "every file of late1 kept", |f| {
        all_in(f, "done")
    })
    .await;
    assert_kept(&server, &files, &paths);
    assert_eq!(
        server.seen(&paths[0]).len(),
        3,
        "two 404s (not ready yet), then the file"
    );
    let first = files
        .iter()
        .find(|f| f["url"].as_str().is_some_and(|u| u.ends_with(&paths[0])))
        .expect("file");
    assert_eq!(first["attempts"], 3);

    // Past the expiry (a 1 ms `expire-after`), a 404 means the API deleted it.
    let (reply, paths) = music_task(&server, "gone1", 40);
    let mut spec = server.state.lock().expect("state").files[&paths[0]].clone();
    spec.gone = true;
    server.put(&paths[0], spec);
    api.script("gone1", vec![reply]);
    let d2 = TestDaemon::start(&api, |c| {
        archive_on(c);
        c.archive.expire_after = Duration::from_millis(1);
    })
    .await;
    d2.add(&["gone1"]).await;
    let files = files_until(&d2, "gone1", "gone1's files settled", |f| {
        f.len() == 8 && f.iter().all(|f| f["state"] != "pending")
    })
    .await;
    let expired: Vec<&Value> = files.iter().filter(|f| f["state"] == "expired").collect();
    assert_eq!(expired.len(), 1, "{files:?}");
    assert!(
        expired[0]["last_error"]
            .as_str()
            .expect("error")
            .contains("404"),
        "{:?}",
        expired[0]
    );
    assert_eq!(
        server.seen(&paths[0]).len(),
        1,
        "not retried after its expiry"
    );
    let status = d2.request(json!({"cmd": "status"})).await;
    assert_eq!(status["archive"]["files"]["expired"], 1, "{status}");
    assert_eq!(status["archive"]["files"]["done"], 7, "{status}");
    assert!(
        !archive_dir(&d2)
            .join("gone1")
            .join("manifest.json")
            .exists(),
        "no manifest while a file is missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_min_free_downloads_pause_and_status_says_why() {
    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let (reply, _) = music_task(&server, "full1", 60);
    api.script("full1", vec![reply]);
    let d = TestDaemon::start(&api, |c| {
        archive_on(c);
        c.archive.min_free = u64::MAX;
    })
    .await;
    d.add(&["full1"]).await;
    d.wait_state("full1", "done").await;
    let status = poll_until(
        Deadline::patience(),
        "status to say the archive is paused",
        Duration::from_millis(20),
        || async {
            let s = d.request(json!({"cmd": "status"})).await;
            (s["archive"]["state"] == "paused" && s["archive"]["files"]["pending"] == 8)
                .then_some(s)
        },
    )
    .await;
    let cause = status["archive"]["paused_cause"].as_str().expect("cause");
    assert!(cause.contains("min-free"), "{cause}");
    assert_eq!(status["healthy"], false, "{status}");
    assert!(
        status["problems"]
            .as_array()
            .expect("problems")
            .iter()
            .any(|p| p
                .as_str()
                .is_some_and(|p| p.contains("archive downloads are paused"))),
        "{status}"
    );
    let (_, events) = d.show("full1").await;
    assert_eq!(events.len(), 3, "polling went on: text, first, complete");
    assert_eq!(server.total(), 0, "nothing was downloaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_hosts_are_refused_unless_allowed_and_redo_fetches_a_lost_file_again() {
    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let (reply, _) = music_task(&server, "priv1", 80);
    api.script("priv1", vec![reply]);
    let d = TestDaemon::start(&api, |c| {
        archive_on(c);
        c.archive.allow_hosts.clear();
    })
    .await;
    d.add(&["priv1"]).await;
    let files = files_until(&d, "priv1", "priv1's files refused", |f| {
        all_in(f, "failed")
    })
    .await;
    assert!(
        files[0]["last_error"]
            .as_str()
            .expect("error")
            .contains("allow-hosts"),
        "{files:?}"
    );
    assert_eq!(server.total(), 0, "nothing fetched from 127.0.0.1");

    // Nor does a redirect lead there: 127.0.0.1 is allowed, `localhost` is not.
    let (reply, paths) = music_task(&server, "hop1", 85);
    let target = format!("http://localhost:{}/hop1/elsewhere", server.addr.port());
    let mut spec = server.state.lock().expect("state").files[&paths[0]].clone();
    spec.redirect = Some(target);
    server.put(&paths[0], spec);
    api.script("hop1", vec![reply]);
    let hop = TestDaemon::start(&api, archive_on).await;
    hop.add(&["hop1"]).await;
    let files = files_until(&hop, "hop1", "the redirect refused", |f| {
        f.len() == 8
            && f[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused host"))
    })
    .await;
    assert_eq!(
        files[0]["state"], "pending",
        "a transport failure, retried: {files:?}"
    );
    assert!(
        server.seen("/hop1/elsewhere").is_empty(),
        "the redirect was not followed"
    );

    let (reply, paths) = music_task(&server, "redo1", 90);
    api.script("redo1", vec![reply]);
    let d = TestDaemon::start(&api, archive_on).await;
    d.add(&["redo1"]).await;
    let files = files_until(&d, "redo1", "redo1 kept", |f| all_in(f, "done")).await;
    let lost = PathBuf::from(files[0]["path"].as_str().expect("path"));
    let damaged = PathBuf::from(files[1]["path"].as_str().expect("path"));
    std::fs::remove_file(&lost).expect("lose a file");
    std::fs::write(&damaged, b"bit rot").expect("damage a file");
    let v = d
        .request(json!({"cmd": "archive-redo", "task_id": "redo1"}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["verified"], 6, "{v}");
    assert_eq!(v["refetching"].as_array().expect("names").len(), 2, "{v}");
    let files = files_until(&d, "redo1", "redo1 kept again", |f| {
        all_in(f, "done") && Path::new(f[0]["path"].as_str().unwrap_or("")).exists()
    })
    .await;
    assert_kept(&server, &files, &paths);
    let fetched: Vec<usize> = paths.iter().map(|p| server.seen(p).len()).collect();
    assert_eq!(
        fetched,
        [2, 2, 1, 1, 1, 1, 1, 1],
        "only the lost and damaged files again"
    );
    let v = d
        .request(json!({"cmd": "archive-redo", "task_id": "nope"}))
        .await;
    assert_eq!(v["error"]["code"], "not_found", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_mid_file_resumes_with_a_range_request_and_ends_byte_exact() {
    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let (reply, paths) = music_task(&server, "kill1", 200);
    // One big, slow file: 400 KB in 8 KB chunks 20 ms apart, about a second.
    let big = content(999, 400_000);
    server.put(
        &paths[0],
        Spec {
            body: big.clone(),
            slow: Some((8_192, Duration::from_millis(20))),
            ..Spec::default()
        },
    );
    api.script("kill1", vec![reply]);
    let mut config = BinConfig::new(&api.uri());
    config.extra = "[archive]\ndir = \"archive\"\nallow-hosts = [\"127.0.0.1\"]\nretry-interval = \"50ms\"\nmin-free = 0\nmax-in-flight = 1\n".to_owned();
    let mut d = BinDaemon::start(&config).await;
    let added = d
        .try_request(&json!({"cmd": "add", "task_ids": ["kill1"]}))
        .await
        .expect("answer");
    assert_eq!(added["ok"], true, "{added}");
    let name = "5d1f0c3a-8e2b-4f6d-9a7c-2b3e4f5a6b7c.mp3";
    let dest = d.dir.path().join("archive").join("kill1").join(name);
    let part = sunopoll::archive::download::part_path(&dest);
    poll_until(
        Deadline::patience(),
        "the big file to be half way",
        Duration::from_millis(5),
        || async {
            let len = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            (len > 50_000 && len < 300_000).then_some(())
        },
    )
    .await;
    d.kill();
    let kept = std::fs::metadata(&part)
        .expect("a part survives the kill")
        .len();
    assert!(!dest.exists(), "no finished name for an unfinished file");
    d.restart().await;
    poll_until(
        Deadline::patience(),
        "every file of kill1 kept after the restart",
        Duration::from_millis(20),
        || async {
            let v = d
                .try_request(&json!({"cmd": "show", "task_id": "kill1"}))
                .await?;
            let files = v["files"].as_array().cloned().unwrap_or_default();
            all_in(&files, "done").then_some(())
        },
    )
    .await;
    let got = std::fs::read(&dest).expect("the big file");
    assert!(
        got == big,
        "the resumed file is byte-exact ({} of {} bytes)",
        got.len(),
        big.len()
    );
    let seen = server.seen(&paths[0]);
    assert_eq!(seen.len(), 2, "{seen:?}");
    let range = seen[1]
        .range
        .as_deref()
        .expect("the second request is a range request");
    let from: u64 = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .expect("bytes=N-");
    assert!(
        from > 0 && from <= kept,
        "resumed from {from}, {kept} bytes were on disk"
    );
    assert_eq!(seen[1].if_range.as_deref(), Some(etag(&big).as_str()));
    let log = d.stop().await;
    assert!(log.contains("archived"), "{log}");
}

/// moto's S3 server on 127.0.0.1, stopped when dropped.
struct Moto {
    child: std::process::Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts `moto_server` (`None`, said on stderr, where it is not installed and not in CI).
    async fn start() -> Option<Moto> {
        let tool = sunopoll::testing::real_tool("moto_server")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new(tool)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        poll_until(
            Deadline::patience(),
            "moto_server to listen",
            Duration::from_millis(50),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
        Some(moto)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_bucket_keeps_every_file_byte_exact_once_with_its_manifest() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    sunopoll::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let made = http
        .put(format!("{}/kept", moto.url))
        .send()
        .await
        .expect("create the bucket");
    assert!(made.status().is_success(), "{}", made.status());

    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let (reply, paths) = music_task(&server, "s3task", 300);
    api.script("s3task", vec![reply]);
    let keys = tempfile::tempdir().expect("tempdir");
    let credentials = keys.path().join("s3.keys");
    std::fs::write(
        &credentials,
        "access-key-id = testing\nsecret-access-key = testing\n",
    )
    .expect("keys");
    let endpoint = moto.url.clone();
    let d = TestDaemon::start(&api, |c| {
        archive_on(c);
        c.archive.dir = None;
        c.archive.s3 = Some(sunopoll::config::S3Config {
            bucket: "kept".into(),
            prefix: "suno/archive".into(),
            endpoint: Some(endpoint),
            region: "us-east-1".into(),
            credentials_file: Some(credentials),
            allow_http: true,
            staging: c.store.path.parent().expect("dir").join("archive-staging"),
        });
    })
    .await;
    d.add(&["s3task"]).await;
    let files = files_until(
        &d,
        "s3task",
        "every file of s3task kept in the bucket",
        |f| all_in(f, "done"),
    )
    .await;
    assert_eq!(files.len(), 8);
    let bodies: Vec<Vec<u8>> = {
        let state = server.state.lock().expect("state");
        paths.iter().map(|p| state.files[p].body.clone()).collect()
    };
    // Read back with signed requests (moto's buckets are private), as any S3 client would.
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("kept")
        .with_region("us-east-1")
        .with_endpoint(moto.url.as_str())
        .with_allow_http(true)
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_http_connector(object_store::client::ReqwestConnector::default())
        .build()
        .expect("a client of the bucket");
    for (f, want) in files.iter().zip(&bodies) {
        let location = f["path"].as_str().expect("location");
        let key = location
            .strip_prefix("s3://kept/")
            .unwrap_or_else(|| panic!("{location} is in the bucket"));
        assert!(key.starts_with("suno/archive/s3task/"), "{key}");
        let got = bucket
            .get(&object_store::path::Path::from(key))
            .await
            .expect("get the object")
            .bytes()
            .await
            .expect("its bytes");
        assert!(
            got.as_ref() == want.as_slice(),
            "{key} differs from the server's file: {} bytes of {}: {:?}",
            got.len(),
            want.len(),
            String::from_utf8_lossy(&got[..got.len().min(300)])
        );
        assert_eq!(f["sha256"], sha256(want), "{key}");
    }
    for p in &paths {
        assert_eq!(server.seen(p).len(), 1, "{p} fetched once");
    }
    let manifest: Value = poll_until(
        Deadline::patience(),
        "the manifest in the bucket",
        Duration::from_millis(50),
        || async {
            let path = object_store::path::Path::from("suno/archive/s3task/manifest.json");
            let bytes = bucket.get(&path).await.ok()?.bytes().await.ok()?;
            serde_json::from_slice(&bytes).ok()
        },
    )
    .await;
    assert_eq!(manifest["files"].as_array().expect("files").len(), 8);
    let staged = d
        .config
        .archive
        .s3
        .as_ref()
        .expect("s3")
        .staging
        .join("s3task");
    let left: Vec<_> = std::fs::read_dir(&staged)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "staged copies are removed once kept: {left:?}"
    );
    let v = d
        .request(json!({"cmd": "archive-redo", "task_id": "s3task"}))
        .await;
    assert_eq!(v["verified"], 8, "every object matches its SHA-256: {v}");
    let status = d.request(json!({"cmd": "status"})).await;
    assert_eq!(
        status["archive"]["dir"], "s3://kept/suno/archive",
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_keeps_its_own_files() {
    use wiremock::matchers::{method, path, query_param};
    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let local = format!("http://{}", server.addr);
    // kind, details endpoint, the names its files are kept under.
    let families: [(&str, &str, &[&str]); 6] = [
        ("wav", "wav", &["audio.wav"]),
        ("stems", "vocal-removal", &["instrumental.mp3", "vocal.mp3"]),
        ("mp4", "mp4", &["video.mp4"]),
        ("cover", "suno/cover", &["cover_1.png", "cover_2.png"]),
        ("midi", "midi", &["midi.json"]),
        ("lyrics", "lyrics", &["lyrics.json"]),
    ];
    let mut ids = Vec::new();
    for (i, (kind, endpoint, _)) in families.iter().enumerate() {
        let text = String::from_utf8(fixture(&format!(
            "families/{kind}.record-info.SUCCESS.json"
        )))
        .expect("utf8")
        .replace("https://files.example.com", &format!("{local}/{kind}"));
        let v: Value = serde_json::from_str(&text).expect("json");
        let id = v["data"]["taskId"].as_str().expect("taskId").to_owned();
        // Every URL on the file server gets content of its own.
        for (j, url) in text
            .split('"')
            .filter(|s| s.starts_with(&local))
            .enumerate()
        {
            let p = url.strip_prefix(&local).expect("local").to_owned();
            server.put(
                &p,
                Spec {
                    body: content(1000 + (i * 10 + j) as u64, 10_000 + j),
                    ..Spec::default()
                },
            );
        }
        wiremock::Mock::given(method("GET"))
            .and(path(format!("/api/v1/{endpoint}/record-info")))
            .and(query_param("taskId", id.as_str()))
            .respond_with(
                wiremock::ResponseTemplate::new(200).set_body_raw(text, "application/json"),
            )
            .mount(&api.server)
            .await;
        ids.push(id);
    }
    let d = TestDaemon::start(&api, archive_on).await;
    for ((kind, _, names), id) in families.iter().zip(&ids) {
        let v = d
            .request(json!({"cmd": "add", "task_ids": [id], "kind": kind}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
        let files = files_until(&d, id, &format!("the {kind} task's files kept"), |f| {
            all_in(f, "done")
        })
        .await;
        let kept: Vec<&str> = files
            .iter()
            .map(|f| f["name"].as_str().expect("name"))
            .collect();
        assert_eq!(kept, *names, "{kind}");
        for f in &files {
            let local_path = Path::new(f["path"].as_str().expect("path"));
            let got = std::fs::read(local_path).expect("kept");
            assert_eq!(f["sha256"], sha256(&got), "{kind}");
            match f["url"].as_str() {
                Some(url) => {
                    let p = url.strip_prefix(&local).expect("from the file server");
                    let want = server.state.lock().expect("state").files[p].body.clone();
                    assert!(got == want, "{kind}: {p} kept byte-exact");
                    assert_eq!(server.seen(p).len(), 1, "{kind}: {p} fetched once");
                }
                None => {
                    // The result itself: the complete event's body, as JSON.
                    let (_, events) = d.show(id).await;
                    let complete = events
                        .iter()
                        .find(|e| e["stage"] == "complete")
                        .expect("a complete event");
                    let kept: Value = serde_json::from_slice(&got).expect("json");
                    assert_eq!(kept, complete["body"], "{kind}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_lists_archived_gets_one_notification_after_complete_listing_every_file() {
    let server = FileServer::start().await;
    let api = FakeApi::start().await;
    let (reply, paths) = music_task(&server, "arch9", 9);
    api.script("arch9", vec![reply]);
    let files_handler = Receiver::start().await;
    let plain_handler = Receiver::start().await;
    let (files_url, plain_url) = (files_handler.url(), plain_handler.url());
    let d = TestDaemon::start(&api, |c| {
        archive_on(c);
        let mut t = target("files", &files_url);
        t.stages = vec![
            sunopoll::events::Stage::Complete,
            sunopoll::events::Stage::Archived,
        ];
        t.secret = Some(
            sunopoll::config::SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
                .expect("secret"),
        );
        c.forward.targets.push(t);
        c.forward.targets.push(target("plain", &plain_url));
    })
    .await;
    d.add(&["arch9"]).await;
    eventually(
        "the complete callback and the archived notification",
        || files_handler.count() >= 2,
    )
    .await;
    let kept = files_until(&d, "arch9", "every file of arch9 kept", |f| {
        all_in(f, "done")
    })
    .await;
    let (_, events) = d
        .show_until("arch9", "every delivery recorded", |_, events| {
            events.iter().any(|e| e["stage"] == "archived")
                && events.iter().all(|e| {
                    e["deliveries"]
                        .as_array()
                        .is_some_and(|ds| ds.iter().all(|d| d["state"] == "delivered"))
                })
        })
        .await;

    let received = files_handler.received();
    assert_eq!(received.len(), 2, "complete, then exactly one archived");
    assert_eq!(received[0].stage(), "complete");
    let note = received[1].json();
    assert_eq!(note["type"], "sunopoll.archived", "{note}");
    assert_eq!(
        (&note["task_id"], &note["kind"]),
        (&json!("arch9"), &json!("music"))
    );
    assert!(note.get("data").is_none(), "never a callback body: {note}");
    assert!(
        received[1].header("webhook-signature").starts_with("v1,"),
        "signed like the callbacks"
    );
    assert_ne!(
        received[1].header("webhook-id"),
        received[0].header("webhook-id")
    );
    let listed = note["files"].as_array().expect("files");
    assert_eq!(listed.len(), paths.len(), "{note}");
    assert_eq!(listed.len(), kept.len());
    {
        let state = server.state.lock().expect("state");
        for f in listed {
            let url = f["url"].as_str().expect("url");
            let path = paths
                .iter()
                .find(|p| url.ends_with(p.as_str()))
                .unwrap_or_else(|| panic!("{url} is not one of the task's files"));
            let want = &state.files[path].body;
            assert_eq!(f["sha256"], sha256(want), "{path}");
            assert_eq!(f["size"], want.len(), "{path}");
            let local = Path::new(f["path"].as_str().expect("path"));
            assert!(local.starts_with(archive_dir(&d)), "{}", local.display());
            assert_eq!(std::fs::read(local).expect("the listed path exists"), *want);
        }
    }
    let manifest = note["manifest"].as_str().expect("manifest");
    poll_until(
        Deadline::patience(),
        "the manifest the notification names",
        Duration::from_millis(20),
        || async { Path::new(manifest).exists().then_some(()) },
    )
    .await;
    // The stored event goes to the target that asked for it only.
    let archived = events
        .iter()
        .find(|e| e["stage"] == "archived")
        .expect("the archived event");
    let targets: Vec<&str> = archived["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| d["target"].as_str().expect("target"))
        .collect();
    assert_eq!(targets, ["files"]);
    let plain = plain_handler.received();
    assert!(!plain.is_empty(), "the default target got its callbacks");
    assert!(
        plain
            .iter()
            .all(|r| r.json().get("type").is_none() && r.stage() != "?"),
        "the default stages never include archived"
    );
}
