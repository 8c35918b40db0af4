//! The real binary under harnesses that speak systemd's protocols, without systemd as PID 1:
//! a notify socket the test reads (`NOTIFY_SOCKET`, `WATCHDOG_USEC`), socket activation through
//! `systemd-socket-activate`, the API key as a credential (`CREDENTIALS_DIRECTORY`), and the
//! journal detection (`JOURNAL_STREAM`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::UnixDatagram;

use crate::helpers::*;

use crate::binary::BIN;

use crate::binary::{SYSTEMD_VARS, run, sunopoll, terminate, text};

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Reads notify messages; every one is kept, with when it arrived. Waits look at everything
/// seen so far, so a message that came early (a `STATUS=` before `READY=1`) still counts, and
/// each wait has one deadline that the stream of watchdog pings cannot push back.
struct NotifyListener {
    socket: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl NotifyListener {
    fn bind(path: &Path) -> NotifyListener {
        NotifyListener {
            socket: UnixDatagram::bind(path).expect("bind the notify socket"),
            seen: Vec::new(),
        }
    }

    /// Keeps reading until `done` holds for what has been seen, or panics naming `what` once
    /// `PATIENCE` has passed.
    async fn until(&mut self, what: &str, done: impl Fn(&NotifyListener) -> bool) {
        let deadline = Deadline::patience();
        let mut buf = vec![0u8; 4096];
        while !done(self) {
            let Some(received) = deadline.run(self.socket.recv(&mut buf)).await else {
                panic!("no {what} within {PATIENCE:?}; seen: {:#?}", self.seen);
            };
            let n = received.expect("recv");
            let msg = text(&buf[..n]).trim_end().to_owned();
            self.seen.push((Instant::now(), msg));
        }
    }

    /// Waits until some message has exactly this line.
    async fn until_line(&mut self, line: &str) {
        self.until(line, |n| n.count(line) > 0).await;
    }

    fn count(&self, line: &str) -> usize {
        self.seen
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == line))
            .count()
    }

    fn statuses(&self) -> Vec<String> {
        self.seen
            .iter()
            .flat_map(|(_, m)| m.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_status_watchdog_and_stopping_with_the_key_as_a_credential() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/sunopoll.sock");
    let config = write_config(dir.path(), &api.uri(), &socket);
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).expect("mkdir");
    std::fs::write(creds.join("api-key"), format!("{KEY}\n")).expect("write credential");
    let mut notify = NotifyListener::bind(&dir.path().join("notify.sock"));
    let log_path = dir.path().join("daemon.log");

    let started = Instant::now();
    let daemon = sunopoll(&["daemon", "--config", utf8(&config)])
        .env("NOTIFY_SOCKET", dir.path().join("notify.sock"))
        // 400 ms: pings every 200 ms. WATCHDOG_PID is left unset (the child's pid is not known
        // before it starts, and sd-notify ignores the watchdog when it names another process).
        .env("WATCHDOG_USEC", "400000")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn the daemon");

    // READY=1 only once everything is up: by then the socket answers.
    notify.until_line("READY=1").await;
    let status = run(sunopoll(&["status", "--json", "--socket", utf8(&socket)])).await;
    assert_eq!(
        status.status.code(),
        Some(0),
        "the socket answers at READY=1: {}",
        text(&status.stderr)
    );
    let v: Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(v["healthy"], true, "{v}");

    // STATUS= says what is going on, and changes when a task is added (the fake API keeps it
    // PENDING, so it stays active). The scheduler may report before READY=1: its order
    // against READY=1 is no promise.
    notify.until_line("STATUS=0 tasks active, polling").await;
    let add = run(sunopoll(&["add", "--socket", utf8(&socket), TASK])).await;
    assert!(add.status.success(), "{}", text(&add.stderr));
    notify.until_line("STATUS=1 task active, polling").await;
    eventually("a poll with the credential's key", || {
        api.total_calls() >= 1
    })
    .await;
    assert!(
        api.auth_headers()
            .iter()
            .all(|h| h == &format!("Bearer {KEY}")),
        "the key from $CREDENTIALS_DIRECTORY/api-key is the one sent"
    );

    // WATCHDOG=1 keeps coming, from the loop, without spinning.
    let pings_before = notify.count("WATCHDOG=1");
    notify
        .until("three more WATCHDOG=1", |n| {
            n.count("WATCHDOG=1") >= pings_before + 3
        })
        .await;
    assert!(notify.count("WATCHDOG=1") >= pings_before + 3);

    // SIGTERM: STOPPING=1 first, then a clean exit.
    let status = terminate(daemon).await;
    notify.until_line("STOPPING=1").await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    let elapsed = started.elapsed();

    let pings = notify.count("WATCHDOG=1");
    // One ping per 200 ms at most (plus the first): an idle loop must not spin.
    let most = usize::try_from(elapsed.as_millis() / 200).unwrap_or(usize::MAX) + 2;
    assert!(
        pings <= most,
        "{pings} watchdog pings in {elapsed:?}: more than one per half-period"
    );
    let ready_at = notify.seen.iter().position(|(_, m)| m == "READY=1");
    let stopping_at = notify
        .seen
        .iter()
        .position(|(_, m)| m.lines().next() == Some("STOPPING=1"));
    assert!(ready_at < stopping_at, "{:#?}", notify.seen);
    assert_eq!(notify.count("READY=1"), 1);
    let statuses = notify.statuses();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("stopping: waiting for polls and deliveries in flight")
    );

    // The messages, for the record (visible with --nocapture).
    eprintln!("notify messages seen ({pings} watchdog pings in {elapsed:?}):");
    let mut last_was_ping = false;
    for (at, m) in &notify.seen {
        let is_ping = m == "WATCHDOG=1";
        if !(is_ping && last_was_ping) {
            eprintln!(
                "  +{:>5} ms  {}",
                at.duration_since(started).as_millis(),
                m.replace('\n', " | ")
            );
        }
        last_was_ping = is_ping;
    }

    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(log.contains("created control socket"), "{log}");
    assert!(!log.contains(KEY), "the API key leaked into the log");
}

/// Where `systemd-socket-activate` is, if installed (Debian's `systemd` package; `.ci/run`
/// installs it).
fn socket_activate() -> Option<PathBuf> {
    [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_uses_the_passed_socket_and_leaves_it_in_place() {
    let Some(activate) = socket_activate() else {
        eprintln!(
            "SKIPPED: systemd-socket-activate is not installed (apt-get install systemd; .ci/run does)"
        );
        return;
    };
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("activated.sock");
    let config = write_config(dir.path(), &api.uri(), &socket);
    let log_path = dir.path().join("daemon.log");
    // systemd-socket-activate gives the daemon a fresh environment: -E passes the key through
    // by name (never on a command line). It execs the daemon, so the pid stays the same.
    let mut cmd = Command::new(activate);
    cmd.args(["-l", utf8(&socket), "-E", "SUNO_API_KEY", "--", BIN])
        .args(["daemon", "--config", utf8(&config)])
        .env("SUNO_API_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"));
    for v in SYSTEMD_VARS {
        cmd.env_remove(v);
    }
    let mut daemon = cmd.spawn().expect("spawn systemd-socket-activate");

    // The socket exists before the daemon runs: systemd-socket-activate starts it on the first
    // connection, as systemd does. That first connection is the CLI's, queued until it accepts.
    wait_for_socket(&mut daemon, &socket, &log_path).await;
    let status = run(sunopoll(&["status", "--json", "--socket", utf8(&socket)])).await;
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    let v: Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(
        v["socket"],
        utf8(&socket),
        "its path comes from the passed socket"
    );

    let add = run(sunopoll(&["add", "--socket", utf8(&socket), TASK])).await;
    assert!(add.status.success(), "{}", text(&add.stderr));
    eventually("the task is polled", || api.calls(TASK) >= 1).await;

    let status = terminate(daemon).await;
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(&log_path).expect("log");
    assert!(
        log.contains("using the control socket passed by systemd"),
        "{log}"
    );
    assert!(!log.contains("created control socket"), "{log}");
    assert!(
        socket.exists(),
        "a passed socket belongs to systemd and must survive the daemon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_stream_that_is_not_stderr_gives_human_lines_with_timestamps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &dir.path().join("run/s.sock"),
    );
    let log_path = dir.path().join("stderr.log");
    // A JOURNAL_STREAM inherited from some service, while stderr is a file: not the journal.
    let mut daemon = sunopoll(&["daemon", "--config", utf8(&config)])
        .env("SUNO_API_KEY", KEY)
        .env("JOURNAL_STREAM", "8:12345")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log"))
        .spawn()
        .expect("spawn");
    let socket = dir.path().join("run/s.sock");
    wait_for_socket(&mut daemon, &socket, &log_path).await;
    assert_eq!(terminate(daemon).await.code(), Some(0));
    let log = std::fs::read_to_string(&log_path).expect("log");
    let first = log.lines().next().unwrap_or_default();
    // "2026-11-26T19:41:26.123456Z  INFO created control socket …"
    assert!(
        first.len() > 20 && first.as_bytes()[4] == b'-' && first.as_bytes()[10] == b'T',
        "lines start with a timestamp: {log}"
    );
    assert!(
        log.contains("INFO") && log.contains("sunopoll started"),
        "{log}"
    );
    assert!(!log.contains("<6>"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_stream_that_is_stderr_is_detected() {
    if Path::new(sunopoll::logging::JOURNAL_SOCKET).exists() {
        // A real journald is here; the daemon's entries would go into the host's journal.
        eprintln!("SKIPPED: journald runs on this host; not writing test entries into it");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &dir.path().join("run/s.sock"),
    );
    let log_path = dir.path().join("stderr.log");
    let log_file = std::fs::File::create(&log_path).expect("log");
    let meta = log_file.metadata().expect("stat");
    // stderr is this file, and JOURNAL_STREAM names this very file.
    let mut daemon = sunopoll(&["daemon", "--config", utf8(&config)])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("SUNO_API_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn");
    let socket = dir.path().join("run/s.sock");
    wait_for_socket(&mut daemon, &socket, &log_path).await;
    assert_eq!(terminate(daemon).await.code(), Some(0));
    let log = std::fs::read_to_string(&log_path).expect("log");
    // Detected as the journal; with no journald to send to, it falls back to plain lines:
    // no timestamps, a <N> priority prefix the journal would read.
    assert!(log.contains("cannot reach journald"), "{log}");
    for line in log.lines() {
        assert!(
            line.starts_with('<'),
            "plain journal line expected: {line:?}"
        );
    }
    assert!(log.contains("<6> INFO sunopoll started"), "{log}");
}

/// `sunopoll status` backs a monitoring check. The key-rejected and paused-too-long causes are
/// tested in `polling.rs`; this is the store cause: while the database cannot be written (here
/// another process holds its write lock, as an admin's `sqlite3` shell inside a transaction
/// would), status fails and the CLI exits non-zero; once the lock is gone it is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exits_non_zero_while_the_store_cannot_be_written_and_until_a_write_succeeds() {
    let api = FakeApi::start().await;
    let mut d = TestDaemon::start(&api, |_| {}).await;
    let socket = d.socket();
    let healthy = run(sunopoll(&["status", "--socket", utf8(&socket)])).await;
    assert_eq!(healthy.status.code(), Some(0), "{}", text(&healthy.stdout));

    let holder = rusqlite::Connection::open(&d.config.store.path).expect("open the store");
    holder
        .busy_timeout(PATIENCE)
        .expect("busy timeout for the holder");
    holder
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    // The daemon waits out its busy timeout (5 s), then answers with a store error.
    let locked = run(sunopoll(&["status", "--socket", utf8(&socket)])).await;
    assert_eq!(
        locked.status.code(),
        Some(1),
        "status while the store is locked: {}{}",
        text(&locked.stdout),
        text(&locked.stderr)
    );
    // Under load the probe's own short wait may run out first; both name the lock.
    assert!(
        text(&locked.stdout).contains("database is locked")
            || text(&locked.stdout).contains("its lock is held"),
        "the report names the store failure: {}",
        text(&locked.stdout)
    );

    drop(holder);
    // A read succeeding proves little (with a full disk, reads work and writes fail): the
    // failure stays reported until a write goes through.
    let remembered = run(sunopoll(&["status", "--socket", utf8(&socket)])).await;
    assert_eq!(
        remembered.status.code(),
        Some(1),
        "{}",
        text(&remembered.stdout)
    );
    assert!(
        text(&remembered.stdout).contains("database is locked"),
        "{}",
        text(&remembered.stdout)
    );
    let add = run(sunopoll(&[
        "add",
        "--socket",
        utf8(&socket),
        "after-the-lock",
    ]))
    .await;
    assert!(add.status.success(), "{}", text(&add.stderr));
    let again = run(sunopoll(&["status", "--socket", utf8(&socket)])).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stdout));
    d.stop().await;
}

/// The watchdog pings come from the scheduler loop itself: while the loop is stuck (here on a
/// store another process has locked), the pings stop, which is what lets systemd restart a
/// wedged daemon. A ping from a timer of its own would have gone on regardless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_scheduler_loop_stops_pinging_the_watchdog() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = test_config(dir.path(), &api.uri());
    let (daemon, recording) = start_supervised(&config, Duration::from_millis(100)).await;
    let pings = || watchdog_pings(&recording);
    eventually("three pings", || pings() >= 3).await;

    let holder = rusqlite::Connection::open(&config.store.path).expect("open the store");
    holder.busy_timeout(PATIENCE).expect("busy timeout");
    holder.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    // Within one period the loop reaches the store and blocks there (for its 5 s busy timeout).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck_at = pings();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let while_stuck = pings() - stuck_at;
    drop(holder);
    assert!(
        while_stuck <= 1,
        "{while_stuck} pings in 1.5 s while the loop was stuck"
    );
    let resumed_at = pings();
    eventually("pings again once the loop runs", || {
        pings() >= resumed_at + 3
    })
    .await;
    Deadline::patience()
        .run(daemon.shutdown())
        .await
        .expect("the daemon shuts down in time");
    assert!(
        recording
            .messages()
            .iter()
            .any(|m| m.starts_with("STOPPING=1")),
        "{:?}",
        recording.messages()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_keeps_being_pinged_through_a_long_pause() {
    let api = TimedApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path(), &api.uri());
    config.poll.backoff_max = Duration::from_secs(60);
    let (daemon, recording) = start_supervised(&config, Duration::from_millis(100)).await;
    // A throttle answer asking for 30 s: the loop sleeps far longer than a watchdog period.
    api.set_override(Some(Reply::raw(429, "").retry_after("30")));
    let mut c = RawClient::connect(&config.control.socket).await;
    c.send_line(r#"{"cmd":"add","task_ids":["paused"]}"#).await;
    assert_eq!(c.read_json().await.expect("answer")["ok"], true);
    eventually("the throttled request", || api.total_calls() == 1).await;
    let pings = || watchdog_pings(&recording);
    let before = pings();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        pings() >= before + 5,
        "only {} pings in 1 s of pause",
        pings() - before
    );
    assert_eq!(api.total_calls(), 1, "still paused");
    Deadline::patience()
        .run(daemon.shutdown())
        .await
        .expect("the daemon shuts down in time");
}
