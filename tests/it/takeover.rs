//! A dead daemon's work is always taken over (issue 22, design invariant 10): three real
//! daemons on one PostgreSQL queue; one of them holds leased work of every kind — tasks being
//! polled, deliveries being made, archive files being fetched — when it is SIGKILLed and never
//! started again, or SIGSTOPped (silent, not dead) and later continued. The other two have
//! nothing else to do, so nothing but the leases running out can wake them: every piece of the
//! work must be taken over by them within the lease and a few seconds, and done once.
//!
//! Each test returns early (after the NOT RUN line `sunopoll::testing` prints) where PostgreSQL
//! is not installed; in CI that case fails instead.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::archive::{FileServer, Spec, content, music_task, sha256};
use crate::binary::*;
use crate::helpers::*;
use crate::postgres::{
    DOUBLES_SQL, LEASE, PENDING_DELIVERIES_SQL, RUN_PATIENCE, UNFINISHED_SQL, add, all_logs,
    db_name, errors_in, number, prepare_on, psql, shared_config,
};

/// How much later than the lease the survivors may take a piece of work over: the issue's
/// bound ("within lease + 5 s"), from the moment the victim went away.
const TAKEOVER_SLACK: Duration = Duration::from_secs(5);

/// The database's clock in SQL, as the store judges leases by it.
const DB_NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// One piece of leased work, as the victim held it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Work {
    /// A task being polled (its ID).
    Task(String),
    /// A delivery being made (its `webhook-id`).
    Delivery(String),
    /// An archive file being fetched (its path on the file server).
    File(String),
}

/// The fixture of one run: the fake API, handler and file server, and the shared database.
struct Run {
    cluster: &'static sunopoll::testing::PgCluster,
    db: String,
    url: String,
    api: TimedApi,
    handler: Receiver,
    files: FileServer,
    config: BinConfig,
    /// Every file's path, with the bytes it serves.
    served: BTreeMap<String, Vec<u8>>,
    tasks: Vec<String>,
}

impl Run {
    /// Two tasks that finish at their first poll (so their deliveries and files exist from the
    /// start) and two that stay pending for a while; every answer, delivery and file is slow
    /// enough to be in flight when the victim goes.
    async fn start() -> Option<Run> {
        let cluster = sunopoll::testing::postgres()?;
        let url = cluster.database();
        let db = db_name(&url);
        let api = TimedApi::start().await;
        let handler = Receiver::start().await;
        // Answered after 1.5 s, inside the 2 s forward timeout: a delivery is in flight a while.
        handler.always(200, Duration::from_millis(1500));
        let files = FileServer::start().await;
        let mut served = BTreeMap::new();
        let mut tasks = Vec::new();
        let slow_answer = Duration::from_millis(800);
        for (i, kind) in ["done", "done", "pending", "pending"].iter().enumerate() {
            let id = format!("take{kind}{i}");
            let (success, paths) = music_task(&files, &id, 1000 * i as u64);
            for (j, p) in paths.iter().enumerate() {
                // About 1.5 s per file: 48 KB in 4 KB chunks 120 ms apart.
                let body = content(7 + (i * 10 + j) as u64, 48 * 1024);
                files.put(
                    p,
                    Spec {
                        body: body.clone(),
                        slow: Some((4096, Duration::from_millis(120))),
                        ..Spec::default()
                    },
                );
                served.insert(p.clone(), body);
            }
            let success = success.delayed(slow_answer);
            let replies = if *kind == "done" {
                vec![success]
            } else {
                let mut r: Vec<Reply> = (0..6)
                    .map(|_| {
                        Reply::fixture_for("record-info.PENDING.json", &id).delayed(slow_answer)
                    })
                    .collect();
                r.push(success);
                r
            };
            api.script(&id, replies);
            tasks.push(id);
        }
        let mut config = shared_config(&api, &handler, "\"unlimited\"");
        config.extra = "[archive]\ndir = \"archive\"\nallow-hosts = [\"127.0.0.1\"]\n\
                        retry-interval = \"200ms\"\nmin-free = 0\nmax-in-flight = 2\n"
            .to_owned();
        Some(Run {
            cluster,
            db,
            url,
            api,
            handler,
            files,
            config,
            served,
            tasks,
        })
    }

    async fn sql(&self, sql: &str) -> String {
        psql(self.cluster, &self.db, sql).await
    }

    /// The work `pid`'s daemon holds a live lease on now.
    async fn held_by(&self, pid: u32) -> BTreeSet<Work> {
        let rows = self
            .sql(&format!(
                "SELECT 'task|' || id FROM tasks
                  WHERE claimed_by LIKE '%:{pid}:%' AND lease_until >= {DB_NOW}
                 UNION ALL
                 SELECT 'delivery|' || webhook_id FROM deliveries
                  WHERE claimed_by LIKE '%:{pid}:%' AND lease_until >= {DB_NOW}
                 UNION ALL
                 SELECT 'file|' || url FROM archive_files
                  WHERE claimed_by LIKE '%:{pid}:%' AND lease_until >= {DB_NOW}"
            ))
            .await;
        let local = format!("http://{}", self.files.addr);
        rows.lines()
            .filter_map(|l| {
                let (what, key) = l.split_once('|')?;
                Some(match what {
                    "task" => Work::Task(key.to_owned()),
                    "delivery" => Work::Delivery(key.to_owned()),
                    _ => Work::File(key.strip_prefix(&local).unwrap_or(key).to_owned()),
                })
            })
            .collect()
    }

    /// When `work` was first begun again after `since` (a poll arriving at the API, a delivery
    /// at the handler, a request for the file at the file server), if it was.
    fn begun_after(&self, work: &Work, since: Instant) -> Option<Instant> {
        match work {
            Work::Task(id) => self
                .api
                .arrivals()
                .into_iter()
                .filter(|(at, task)| task == id && *at > since)
                .map(|(at, _)| at)
                .min(),
            Work::Delivery(webhook_id) => self
                .handler
                .received()
                .into_iter()
                .filter(|r| r.header("webhook-id") == webhook_id && r.at > since)
                .map(|r| r.at)
                .min(),
            Work::File(path) => self
                .files
                .seen(path)
                .into_iter()
                .filter(|s| s.at > since)
                .map(|s| s.at)
                .min(),
        }
    }

    /// Waits until every piece of `held` has been begun again after `since`; returns how long
    /// after `since` each was, and the pieces never begun within the bound.
    async fn taken_over(
        &self,
        held: &BTreeSet<Work>,
        since: Instant,
    ) -> (BTreeMap<Work, Duration>, BTreeSet<Work>) {
        let deadline = Deadline::after(LEASE + TAKEOVER_SLACK + Duration::from_secs(20));
        loop {
            let mut taken = BTreeMap::new();
            let mut waiting = BTreeSet::new();
            for w in held {
                match self.begun_after(w, since) {
                    Some(at) => {
                        taken.insert(w.clone(), at.duration_since(since));
                    }
                    None => {
                        waiting.insert(w.clone());
                    }
                }
            }
            if waiting.is_empty() || deadline.passed() {
                return (taken, waiting);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every task is finished, every delivery made and every file kept.
    async fn finished(&self) -> (String, i64, i64) {
        let deadline = Deadline::after(RUN_PATIENCE);
        loop {
            let unfinished = self.sql(UNFINISHED_SQL).await;
            let pending = number(&self.sql(PENDING_DELIVERIES_SQL).await);
            let files = number(
                &self
                    .sql("SELECT COUNT(*) FROM archive_files WHERE state <> 'done'")
                    .await,
            );
            if (unfinished.trim().is_empty() && pending == 0 && files == 0) || deadline.passed() {
                return (unfinished, pending, files);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The daemons: the victim started alone and holding work of every kind, then the two
    /// others, idle. Returns them (victim first) and what the victim holds once they run.
    async fn victim_holding_everything(&self) -> Vec<BinDaemon> {
        let mut victim = prepare_on(&self.config, &self.url);
        victim.restart().await;
        add(&victim, &self.tasks).await;
        let pid = victim.pid();
        let deadline = Deadline::patience();
        loop {
            let held = self.held_by(pid).await;
            let kinds: BTreeSet<u8> = held
                .iter()
                .map(|w| match w {
                    Work::Task(_) => 0,
                    Work::Delivery(_) => 1,
                    Work::File(_) => 2,
                })
                .collect();
            if kinds.len() == 3 {
                break;
            }
            assert!(
                !deadline.passed(),
                "the victim never held work of every kind (it held {held:?})\n{}",
                victim.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut daemons = vec![victim];
        for _ in 0..2 {
            let mut d = prepare_on(&self.config, &self.url);
            d.restart().await;
            daemons.push(d);
        }
        daemons
    }

    /// The checks every run ends with: each stage stored once, every task finished, every
    /// delivery delivered once (repeats at the handler only for what the victim had in flight),
    /// every file kept.
    async fn check_done_once(&self, daemons: &[BinDaemon], held: &BTreeSet<Work>) {
        let (unfinished, pending, files_left) = self.finished().await;
        let logs = all_logs(daemons);
        assert!(
            unfinished.trim().is_empty() && pending == 0 && files_left == 0,
            "unfinished tasks {unfinished:?}, {pending} deliveries pending, {files_left} files not kept\n{logs}"
        );
        let doubles = self.sql(DOUBLES_SQL).await;
        assert!(
            doubles.trim().is_empty(),
            "stages stored twice:\n{doubles}\n{logs}"
        );
        let twice = self
            .sql(
                "SELECT delivery_id FROM attempts WHERE outcome = 'delivered'
                 GROUP BY delivery_id HAVING COUNT(*) > 1",
            )
            .await;
        assert!(
            twice.trim().is_empty(),
            "deliveries recorded delivered twice: {twice}\n{logs}"
        );
        let webhook_ids: Vec<String> = self
            .sql("SELECT webhook_id FROM deliveries ORDER BY id")
            .await
            .lines()
            .map(str::to_owned)
            .collect();
        let mut received: BTreeMap<String, usize> = BTreeMap::new();
        for r in self.handler.received() {
            *received
                .entry(r.header("webhook-id").to_owned())
                .or_insert(0) += 1;
        }
        for id in &webhook_ids {
            let n = received.get(id).copied().unwrap_or(0);
            assert!(n >= 1, "delivery {id} never reached the handler\n{logs}");
            assert!(
                n == 1 || held.contains(&Work::Delivery(id.clone())),
                "delivery {id} reached the handler {n} times, though it was not in flight when the victim went\n{logs}"
            );
        }
        let kept = self
            .sql("SELECT url || '|' || sha256 FROM archive_files ORDER BY id")
            .await;
        let local = format!("http://{}", self.files.addr);
        for line in kept.lines() {
            let (url, hash) = line.split_once('|').expect("url|sha256");
            let path = url.strip_prefix(&local).expect("a file of the file server");
            assert_eq!(
                hash,
                sha256(&self.served[path]),
                "{path} kept with the wrong hash"
            );
        }
        let errors = errors_in(&logs);
        assert!(errors.is_empty(), "errors logged: {errors:#?}");
    }
}

/// The files kept under `daemon`'s archive directory, by their path on the file server
/// (`/task/f/name` is kept as `archive/task/name`), with their bytes.
fn kept_files(d: &BinDaemon) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let root = d.dir.path().join("archive");
    let Ok(tasks) = std::fs::read_dir(&root) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(files) = std::fs::read_dir(task.path()) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name().to_string_lossy().to_string();
            if name.ends_with(".part") || name == "manifest.json" {
                continue;
            }
            if let Ok(bytes) = std::fs::read(f.path()) {
                out.insert(
                    f.path().strip_prefix(&root).expect("under root").into(),
                    bytes,
                );
            }
        }
    }
    out
}

/// The timings of one takeover, for the test's output (and the closing note).
fn report(what: &str, taken: &BTreeMap<Work, Duration>) {
    let mut by_kind: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (w, d) in taken {
        let kind = match w {
            Work::Task(_) => "tasks",
            Work::Delivery(_) => "deliveries",
            Work::File(_) => "files",
        };
        by_kind.entry(kind).or_default().push(d.as_secs_f64());
    }
    let parts: Vec<String> = by_kind
        .iter()
        .map(|(k, v)| {
            let max = v.iter().copied().fold(0.0, f64::max);
            let min = v.iter().copied().fold(f64::MAX, f64::min);
            format!("{} {k} taken over {min:.2}–{max:.2} s after", v.len())
        })
        .collect();
    eprintln!(
        "takeover ({what}; lease {} s): {}",
        LEASE.as_secs(),
        parts.join(", ")
    );
}

fn assert_taken_in_time(taken: &BTreeMap<Work, Duration>, waiting: &BTreeSet<Work>, logs: &str) {
    assert!(
        waiting.is_empty(),
        "never taken over: {waiting:?} (taken: {taken:?})\n{logs}"
    );
    let bound = LEASE + TAKEOVER_SLACK;
    let late: Vec<_> = taken.iter().filter(|(_, d)| **d > bound).collect();
    assert!(
        late.is_empty(),
        "taken over later than lease + {} s: {late:?}\n{logs}",
        TAKEOVER_SLACK.as_secs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_tasks_deliveries_and_files_are_taken_over_by_idle_daemons() {
    let Some(run) = Run::start().await else {
        return;
    };
    let mut daemons = run.victim_holding_everything().await;
    let pid = daemons[0].pid();
    daemons[0].kill();
    let killed = Instant::now();
    // What it held when it died: its rows still name it, leased until a moment in the future.
    let held = run.held_by(pid).await;
    assert!(!held.is_empty(), "the victim held nothing at its death");
    let (taken, waiting) = run.taken_over(&held, killed).await;
    report("SIGKILL", &taken);
    assert_taken_in_time(&taken, &waiting, &all_logs(&daemons));
    run.check_done_once(&daemons, &held).await;
    // Each file is kept once, by one survivor (the victim's part files are its own).
    let mut kept: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for d in &daemons[1..] {
        for (path, _) in kept_files(d) {
            *kept.entry(path).or_insert(0) += 1;
        }
    }
    let twice: Vec<_> = kept.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "files kept by both survivors: {twice:?}");
    for d in daemons.iter_mut().skip(1) {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_daemons_work_is_taken_over_and_its_return_stores_nothing_twice() {
    let Some(run) = Run::start().await else {
        return;
    };
    let mut daemons = run.victim_holding_everything().await;
    let pid = daemons[0].pid();
    kill_pid("-STOP", pid).await;
    let stopped = Instant::now();
    let held = run.held_by(pid).await;
    assert!(!held.is_empty(), "the victim held nothing when it stopped");
    let (taken, waiting) = run.taken_over(&held, stopped).await;
    report("SIGSTOP", &taken);
    assert_taken_in_time(&taken, &waiting, &all_logs(&daemons));
    // Silent, not dead: it comes back with answers, deliveries and downloads begun before the
    // stop, for work the others have taken over.
    kill_pid("-CONT", pid).await;
    run.check_done_once(&daemons, &held).await;
    for d in &mut daemons {
        d.stop().await;
    }
}
