//! Store and config faults, against the real binary: a store directory that cannot be written,
//! a corrupted store file, a store locked by another process (its lock file, and SQLite's own
//! write lock), a full disk, and config files with unknown keys, wrong types, bad syntax or no
//! key source.
//!
//! A fault at start-up must give a clear message naming the file and the problem, a non-zero
//! exit, and leave the existing data untouched. A fault while running must refuse what it
//! cannot store (so nothing is acknowledged that is not on disk), say so in `status` and the
//! log, keep polling politely, and recover by itself when the fault ends.
//!
//! Read-only and full file systems need a small tmpfs, so those tests run only as root where
//! `mount` works; elsewhere they print why they were skipped.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::binary::*;
use crate::figures::{self, Row};
use crate::helpers::*;

/// A small tmpfs mounted for one test; unmounted (lazily, so a still-open file cannot block it)
/// when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "3m") at `dir`, or says why it cannot.
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        if sunopoll::config::current_uid() != 0 {
            return Err("not running as root, so no tmpfs can be mounted".to_owned());
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (no CAP_SYS_ADMIN in this container?): {}",
                text(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_owned()))
    }

    fn remount_read_only(&self) {
        let out = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .output()
            .expect("mount");
        assert!(out.status.success(), "remount ro: {}", text(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

fn skipped(test: &str, why: &str) {
    println!("SKIPPED {test}: {why}");
    let mut row = Row::new(&format!("{test} (not tested here: {why})"));
    row.runs = 0;
    row.recovered = true;
    row.report_and_check();
}

/// Starts the daemon expecting it to fail; returns its exit code and everything it printed.
async fn failed_start(d: &mut BinDaemon) -> (Option<i32>, String) {
    d.spawn();
    let started = Instant::now();
    loop {
        if !d.running() {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the daemon started despite the fault:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = d.log_text();
    assert_no_secrets(&log, "a failed start");
    (d.exit_code(), log)
}

/// Every file under `dir` (recursively) with its bytes, for "left untouched" checks.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// A daemon that has stored two finished tasks, stopped cleanly: the "existing data".
async fn daemon_with_data(api: &FakeApi) -> BinDaemon {
    for id in ["kept-1", "kept-2"] {
        api.script_statuses(id, &["SUCCESS"]);
    }
    let mut d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    d.request(json!({"cmd": "add", "task_ids": ["kept-1", "kept-2"]}))
        .await;
    assert!(d.wait_finished(&["kept-1".into(), "kept-2".into()]).await);
    d.stop().await;
    d
}

/// The existing data is all there, unchanged, once the fault is gone.
async fn assert_data_intact(d: &mut BinDaemon) {
    d.restart().await;
    let events = d.events().await;
    assert_eq!(
        events.len(),
        6,
        "both tasks and their 6 events are still there"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_directory_that_cannot_be_written() {
    let api = FakeApi::start().await;

    // Any user: the store's directory would have to be created under a regular file.
    let mut config = BinConfig::new(&api.uri());
    config.extra = String::new();
    let mut d = BinDaemon::prepare(&config);
    std::fs::write(
        d.dir.path().join("state"),
        "a file where a directory should be",
    )
    .expect("write");
    let (code, log) = failed_start(&mut d).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("state/sunopoll.db") && log.contains("Not a directory"),
        "names the store and the problem: {log}"
    );
    assert!(!d.socket.exists(), "no socket is left behind");

    // An existing store whose directory cannot be written. For an ordinary user, chmod does
    // that; root ignores permissions, so as root the store moves to a tmpfs remounted
    // read-only (and where no tmpfs can be mounted, that case is skipped).
    let mut d = daemon_with_data(&api).await;
    let (dir, how, _fs) = if sunopoll::config::current_uid() != 0 {
        let dir = d.store.parent().expect("dir").to_owned();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        (dir, "Permission denied", None)
    } else {
        let fs = match Tmpfs::mount(&d.dir.path().join("ro"), "4m") {
            Ok(fs) => fs,
            Err(why) => return skipped("store directory read-only", &why),
        };
        if d.store.exists() {
            std::fs::copy(&d.store, fs.0.join("sunopoll.db")).expect("copy");
        }
        let toml = std::fs::read_to_string(&d.config)
            .expect("config")
            .replace("path = \"state/sunopoll.db\"", "path = \"ro/sunopoll.db\"");
        std::fs::write(&d.config, toml).expect("config");
        fs.remount_read_only();
        (fs.0.clone(), "Read-only file system", Some(fs))
    };
    let before = snapshot(&dir);
    let (code, log) = failed_start(&mut d).await;
    assert_eq!(code, Some(1), "{log}");
    let last = log.lines().last().unwrap_or("").to_owned();
    assert!(
        last.contains("sunopoll.db") && (last.contains(how) || last.contains("readonly")),
        "names the store and the problem: {last}"
    );
    assert_eq!(snapshot(&dir), before, "the store was left untouched");
    if sunopoll::config::current_uid() != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
    let mut row = Row::new(&format!(
        "store: directory not writable (under a file; {})",
        if how == "Permission denied" {
            "chmod 0500"
        } else {
            "read-only fs"
        }
    ));
    row.runs = 2;
    row.recovered = true;
    row.note = format!(
        "refused with exit 1: {:?}",
        last.split("ERROR").last().unwrap_or("").trim()
    );
    row.report_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_store_file() {
    let api = FakeApi::start().await;
    // Garbage where the store should be.
    let mut d = BinDaemon::prepare(&BinConfig::new(&api.uri()));
    std::fs::create_dir_all(d.store.parent().expect("dir")).expect("mkdir");
    let garbage: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&d.store, &garbage).expect("write");
    let (code, log) = failed_start(&mut d).await;
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("state/sunopoll.db") && log.contains("not a SQLite database"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(&d.store).expect("read"),
        garbage,
        "left untouched"
    );

    // A real store whose pages were overwritten with garbage (the header survives).
    let mut d = daemon_with_data(&api).await;
    let mut bytes = std::fs::read(&d.store).expect("read");
    assert!(bytes.len() >= 3 * 4096, "a store of a few pages");
    for b in &mut bytes[4096..] {
        *b = 0xa5;
    }
    std::fs::write(&d.store, &bytes).expect("write");
    let before = snapshot(d.store.parent().expect("dir"));
    let (code, log) = failed_start(&mut d).await;
    assert_ne!(code, Some(0), "{log}");
    let last = log.lines().last().unwrap_or("").to_owned();
    assert!(
        last.contains("malformed") || last.contains("not a SQLite database"),
        "says the store is damaged: {last}"
    );
    assert_eq!(
        snapshot(d.store.parent().expect("dir")),
        before,
        "the damaged store was left untouched"
    );
    let mut row = Row::new("store: file corrupted (garbage file; garbage pages in a real store)");
    row.runs = 2;
    row.recovered = true;
    row.note = format!(
        "refused with exit 1: {:?}",
        last.split("ERROR").last().unwrap_or("").trim()
    );
    row.report_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_locked_by_another_process() {
    let api = FakeApi::start().await;
    let mut d = daemon_with_data(&api).await;

    // Another process holds the lock on the database file (as a second daemon would).
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(&d.store)
        .expect("open the store file");
    lock.try_lock().expect("lock");
    let before = snapshot(d.store.parent().expect("dir"));
    let (code, log) = failed_start(&mut d).await;
    // The no-restart status (RestartPreventExitStatus=2): restarting cannot take the lock.
    assert_eq!(code, Some(2), "{log}");
    let last = log.lines().last().unwrap_or("").to_owned();
    assert!(
        last.contains("state/sunopoll.db") && last.contains("in use by another sunopoll daemon"),
        "{last}"
    );
    assert_eq!(
        snapshot(d.store.parent().expect("dir")),
        before,
        "untouched"
    );
    drop(lock);
    assert_data_intact(&mut d).await;

    // Another process holds SQLite's write lock while the daemon runs: what cannot be stored
    // is refused (after the 5 s busy timeout), never acknowledged; it recovers on release.
    for id in ["late-1", "late-2"] {
        api.script_statuses(id, &["SUCCESS"]);
    }
    d.restart().await;
    let other = rusqlite::Connection::open(&d.store).expect("open");
    other
        .busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    other
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    let v = d
        .request(json!({"cmd": "add", "task_ids": ["late-1"]}))
        .await;
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error"]["code"], "store_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("locked"),
        "{v}"
    );
    other.execute_batch("ROLLBACK").expect("release");
    drop(other);
    let v = d
        .request(json!({"cmd": "add", "task_ids": ["late-2"]}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let recovered = d.settle(&["late-2".into()]).await;
    let stored = d.events().await;
    let states = d.states().await;
    let log = d.stop().await;
    assert!(
        !states.contains_key("late-1"),
        "a refused add left nothing behind"
    );
    assert!(
        !warnings_naming(&log, "locked").is_empty(),
        "the log says why"
    );
    let mut expected = std::collections::BTreeMap::new();
    for id in ["kept-1", "kept-2", "late-2"] {
        expected.insert(id.to_owned(), figures::full());
    }
    let mut row = Row::new(
        "store: locked by another process (lock file at start; SQLite write lock while running)",
    );
    row.runs = 2;
    figures::tally(&mut row, &expected, &stored, None);
    row.recovered = recovered;
    row.note = "start refused with exit 2 (no restart); while locked, add answers store_error (not acknowledged); recovers on release".to_owned();
    row.report_and_check();
}

/// A health check must not hang on a locked store: while another process holds SQLite's write
/// lock, `status` answers within a second (not after the 5 s busy timeout, twice), still
/// reports the queue from the last commit, and says the store is unhealthy, naming the lock;
/// `list`, `show` and `events` answer too. Once the lock is gone, a write makes it healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_within_a_second_while_the_write_lock_is_held() {
    let api = FakeApi::start().await;
    let mut d = daemon_with_data(&api).await;
    d.restart().await;
    let other = rusqlite::Connection::open(&d.store).expect("open");
    other
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");

    let t = Instant::now();
    let status = d.status().await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "status took {took:?} while the write lock was held"
    );
    assert_eq!(status["healthy"], false, "{status}");
    assert!(
        // "database is locked" from the probe, or, when the store thread itself is slow to
        // start the probe on a loaded machine, "no write could begin … (its lock is held …)".
        status["problems"].to_string().contains("lock"),
        "the problem names the lock: {status}"
    );
    assert_eq!(
        status["tasks"]["done"], 2,
        "the last commit's counts: {status}"
    );
    assert_eq!(status["tasks"]["events"], 6, "{status}");

    let t = Instant::now();
    let list = d
        .request(json!({"cmd": "list", "state": "done", "limit": 10}))
        .await;
    let show = d.request(json!({"cmd": "show", "task_id": "kept-1"})).await;
    let events = d.request(json!({"cmd": "events", "since": 0})).await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "reads took {took:?}");
    assert_eq!(list["tasks"].as_array().map(Vec::len), Some(2), "{list}");
    assert_eq!(show["ok"], true, "{show}");
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(6),
        "{events}"
    );

    other.execute_batch("ROLLBACK").expect("release");
    drop(other);
    api.script_statuses("after", &["SUCCESS"]);
    let v = d
        .request(json!({"cmd": "add", "task_ids": ["after"]}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let status = d.status().await;
    assert_eq!(status["healthy"], true, "a write went through: {status}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk() {
    let api = TimedApi::start().await;
    let mut config = BinConfig::new(&api.uri());
    config.interval = "200ms".to_owned();
    config.backoff_max = "1s".to_owned();
    let mut d = BinDaemon::prepare(&config);
    let fs = match Tmpfs::mount(&d.dir.path().join("state"), "3m") {
        Ok(fs) => fs,
        Err(why) => return skipped("store: disk full", &why),
    };
    d.restart().await;
    let early: Vec<String> = (0..3).map(|i| format!("full-{i}")).collect();
    let v = d.request(json!({"cmd": "add", "task_ids": early})).await;
    assert_eq!(v["ok"], true, "{v}");
    eventually("a few polls", || api.total_calls() >= 6).await;

    // Fill the file system to the last byte.
    let filler = fs.0.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&[0]).is_ok() {}
    }
    let full_from = Instant::now();
    let calls_before: Vec<usize> = early.iter().map(|id| api.calls(id)).collect();
    let mut refused = 0;
    let mut acknowledged_while_full = Vec::new();
    for i in 0..10 {
        let id = format!("during-{i}");
        let v = d.request(json!({"cmd": "add", "task_ids": [id]})).await;
        if v["ok"] == true {
            acknowledged_while_full.push(id);
        } else {
            assert_eq!(v["error"]["code"], "store_error", "{v}");
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = d.status().await;
    let human = d.cli(&["status"]).await;
    let polls_during: Vec<usize> = early
        .iter()
        .zip(&calls_before)
        .map(|(id, before)| api.calls(id) - before)
        .collect();
    let full_for = full_from.elapsed();
    assert!(refused > 0, "a full disk refuses adds");
    assert_eq!(
        status["healthy"], false,
        "status says the store is failing: {status}"
    );
    assert!(
        status["problems"].to_string().contains("disk is full"),
        "{status}"
    );
    assert_eq!(human.status.code(), Some(1), "an unhealthy status exits 1");
    assert!(
        text(&human.stdout).contains("UNHEALTHY") && text(&human.stdout).contains("disk is full"),
        "{}",
        text(&human.stdout)
    );

    // Space returns.
    std::fs::remove_file(&filler).expect("free space");
    for id in &early {
        api.script_statuses(id, &["SUCCESS"]);
    }
    let v = d
        .request(json!({"cmd": "add", "task_ids": ["after-1"]}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    api.script_statuses("after-1", &["SUCCESS"]);
    let mut all = early.clone();
    all.extend(acknowledged_while_full.iter().cloned());
    all.push("after-1".into());
    for id in &acknowledged_while_full {
        api.script_statuses(id, &["SUCCESS"]);
    }
    let recovered = d.settle(&all).await;
    let stored = d.events().await;
    let log = d.stop().await;
    assert!(
        !warnings_naming(&log, "disk is full").is_empty(),
        "the log names the cause"
    );
    // Polite while the disk was full: each task at most once per interval (plus one).
    let most = (full_for.as_millis() / 200) as usize + 1;
    drop(fs);
    let mut expected = std::collections::BTreeMap::new();
    for id in &all {
        expected.insert(id.clone(), figures::full());
    }
    let mut row = Row::new("store: disk full (3 MiB tmpfs filled to the last byte)");
    figures::tally(&mut row, &expected, &stored, None);
    row.recovered = recovered;
    row.note = format!(
        "{refused} of 10 adds refused with store_error while full (not acknowledged); status UNHEALTHY naming the disk; polls per task during the {:.1} s fault: {polls_during:?} (interval allows {most})",
        full_for.as_secs_f64()
    );
    for (id, n) in early.iter().zip(&polls_during) {
        assert!(
            *n <= most,
            "{id} was polled {n} times by the end of a {full_for:?} disk-full fault: faster than its interval"
        );
    }
    row.report_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_files_are_refused_with_the_file_named_and_the_data_untouched() {
    let api = FakeApi::start().await;
    let mut d = daemon_with_data(&api).await;
    let good = std::fs::read_to_string(&d.config).expect("config");
    let before = snapshot(d.store.parent().expect("dir"));
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown keys",
            format!("{good}\n[poll2]\nx = 1\n").replace("[poll]\n", "[poll]\nintervall = \"1s\"\n"),
            vec!["poll.intervall", "[poll2]"],
        ),
        (
            "wrong types",
            good.replace("max-in-flight = 4", "max-in-flight = \"four\"")
                .replace("request-timeout = \"2s\"", "request-timeout = 15"),
            vec!["poll.max-in-flight", "api.request-timeout"],
        ),
        (
            "not TOML",
            format!("{good}\n[api\n"),
            vec!["not valid TOML"],
        ),
        (
            "a missing key file",
            good.replace("[api]\n", "[api]\nkey-file = \"/nonexistent/suno.key\"\n"),
            vec!["/nonexistent/suno.key", "api.key-file"],
        ),
    ];
    for (what, text_, wants) in &cases {
        std::fs::write(&d.config, text_).expect("write config");
        let (code, log) = failed_start(&mut d).await;
        std::fs::write(&d.log, "").expect("clear log");
        assert_eq!(code, Some(2), "{what}: {log}");
        for want in wants {
            assert!(log.contains(want), "{what}: does not name {want:?}: {log}");
        }
        if *what != "a missing key file" {
            assert!(
                log.contains(path_str(&d.config)),
                "{what}: names the file: {log}"
            );
        }
        assert!(!d.socket.exists(), "{what}: no socket");
        assert_eq!(
            snapshot(d.store.parent().expect("dir")),
            before,
            "{what}: the store was touched"
        );
    }
    // No key anywhere: exit 2, naming all three places.
    std::fs::write(&d.config, &good).expect("write config");
    let out = run(sunopoll(&["daemon", "--config", path_str(&d.config)])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("SUNO_API_KEY"));
    assert_eq!(snapshot(d.store.parent().expect("dir")), before);
    assert_data_intact(&mut d).await;
    let mut row = Row::new("config: unknown keys, wrong types, bad TOML, missing key file, no key");
    row.runs = cases.len() + 1;
    row.recovered = true;
    row.note = "each refused with exit 2 naming the file and every problem; store bytes unchanged"
        .to_owned();
    row.report_and_check();
}
