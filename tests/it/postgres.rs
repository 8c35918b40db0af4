//! Several real daemons on one PostgreSQL queue (issue 13): real binaries, one database, a
//! fake API and a fake handler on 127.0.0.1. Daemons are killed with SIGKILL, restarted with
//! SIGTERM, and the database itself is restarted and stopped under a running daemon; afterwards
//! every task must have finished, every stage be stored once across all daemons, and every
//! event be delivered at least once, in order per task, repeats with the same `webhook-id`.
//!
//! Each test returns early (after the NOT RUN line `sunopoll::testing` prints) where PostgreSQL
//! is not installed; in CI that case fails instead.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use sunopoll::testing::PgCluster;

use crate::binary::*;
use crate::crash::{Kind, script};
use crate::figures::{self, Row};
use crate::helpers::*;

/// `store.lease` in these tests: short, so failover fits in a test, and still ≥ 2 × the 2 s
/// request and forward timeouts, as the config demands.
pub(crate) const LEASE: Duration = Duration::from_secs(5);

/// `poll.interval` in these tests.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// How long a whole run may take to finish its tasks before the test gives up (a stall bound,
/// not a timing assertion).
pub(crate) const RUN_PATIENCE: Duration = Duration::from_secs(240);

/// The database name in a URL from `PgCluster::url` (`postgresql://user@/NAME?host=…`).
pub(crate) fn db_name(url: &str) -> String {
    let tail = url.split_once("@/").expect("a cluster URL").1;
    tail.split('?').next().expect("a name").to_owned()
}

/// A daemon config on the shared database `url`: `config`'s settings with `[store]` pointing
/// at PostgreSQL instead of the SQLite file.
pub(crate) fn on_postgres(config: &BinConfig, url: &str) -> String {
    let toml = config.to_toml();
    let sqlite = "[store]\npath = \"state/sunopoll.db\"\n";
    assert!(toml.contains(sqlite), "BinConfig's [store] section changed");
    toml.replace(
        sqlite,
        &format!(
            "[store]\nurl = \"{url}\"\nlease = \"{}s\"\n",
            LEASE.as_secs()
        ),
    )
}

/// A daemon in its own directory on the shared database `url`, not started.
pub(crate) fn prepare_on(config: &BinConfig, url: &str) -> BinDaemon {
    let d = BinDaemon::prepare(config);
    std::fs::write(&d.config, on_postgres(config, url)).expect("write the config");
    d
}

/// The settings every daemon of one run shares: the same API, the same target by name.
pub(crate) fn shared_config(api: &impl ScriptedApi, handler: &Receiver, rps: &str) -> BinConfig {
    let mut config = BinConfig::new(&api.uri());
    config.interval = format!("{}s", INTERVAL.as_secs());
    config.request_timeout = "2s".to_owned();
    config.backoff_max = "2s".to_owned();
    config.rps = rps.to_owned();
    config.max_in_flight = 8;
    config.schedule_ms(&[0, 100, 200, 400, 400, 400, 400, 400, 400, 400, 400, 400]);
    // The lease must hold the longest request twice: `[forward] timeout` too.
    config.forward_extra = "timeout = \"2s\"".to_owned();
    let mut target = BinTarget::new("app", &handler.url());
    target.timeout = "2s".to_owned();
    config.targets.push(target);
    config
}

/// Scripts `n` tasks named `{prefix}{i}`: six in ten go all the way, two fail after `text`,
/// two jump from PENDING to SUCCESS. Returns the expected stages and the failing tasks.
fn script_many(
    api: &impl ScriptedApi,
    rng: &mut fastrand::Rng,
    prefix: &str,
    n: usize,
) -> (BTreeMap<String, Vec<String>>, BTreeSet<String>) {
    let mut expected = BTreeMap::new();
    let mut failing = BTreeSet::new();
    for i in 0..n {
        let id = format!("{prefix}{i:04}");
        let kind = match i % 10 {
            0..=5 => Kind::Full,
            6 | 7 => Kind::Fails,
            _ => Kind::Jumps,
        };
        if let Kind::Fails = kind {
            failing.insert(id.clone());
        }
        let stages = script(api, rng, &id, kind);
        expected.insert(id, stages);
    }
    (expected, failing)
}

/// Runs psql off the async threads (it blocks).
pub(crate) async fn psql(cluster: &'static PgCluster, db: &str, sql: &str) -> String {
    let (db, sql) = (db.to_owned(), sql.to_owned());
    tokio::task::spawn_blocking(move || cluster.psql(&db, &sql))
        .await
        .expect("join psql")
}

/// The same for a cluster the test owns.
async fn psql_own(cluster: &std::sync::Arc<PgCluster>, db: &str, sql: &str) -> String {
    let (cluster, db, sql) = (cluster.clone(), db.to_owned(), sql.to_owned());
    tokio::task::spawn_blocking(move || cluster.psql(&db, &sql))
        .await
        .expect("join psql")
}

/// A single number psql printed.
pub(crate) fn number(out: &str) -> i64 {
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("not a number ({e}): {out:?}"))
}

/// psql's `seq|task|stage` lines as events.
fn parse_events(out: &str) -> Vec<StoredEvent> {
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut parts = l.split('|');
            let mut next = || parts.next().unwrap_or_else(|| panic!("short row {l:?}"));
            StoredEvent {
                seq: next().parse().expect("seq"),
                task: next().to_owned(),
                stage: next().to_owned(),
            }
        })
        .collect()
}

const EVENTS_SQL: &str = "SELECT seq, task_id, stage FROM events ORDER BY seq";
pub(crate) const DOUBLES_SQL: &str =
    "SELECT task_id, stage, COUNT(*) FROM events GROUP BY 1, 2 HAVING COUNT(*) > 1";
pub(crate) const UNFINISHED_SQL: &str = "SELECT id || '|' || state FROM tasks \
                              WHERE state NOT IN ('done', 'failed') ORDER BY id";
pub(crate) const PENDING_DELIVERIES_SQL: &str =
    "SELECT COUNT(*) FROM deliveries WHERE state = 'pending'";

/// The most arrivals in any window of length `width` (arrivals sorted by time).
fn busiest(arrivals: &[Instant], width: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (end, t) in arrivals.iter().enumerate() {
        while t.duration_since(arrivals[start]) >= width {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

/// A failing task whose TEXT answer died with a kill (fetched, never committed) moves on to
/// the failure: stages are filled in on the way to `complete`, never before an `error`. Such
/// a task is expected to have exactly `error`. Returns how many were adjusted.
fn adjust_failing(
    expected: &mut BTreeMap<String, Vec<String>>,
    failing: &BTreeSet<String>,
    stored: &[StoredEvent],
) -> usize {
    let mut adjusted = 0;
    for (id, stages) in expected.iter_mut() {
        if failing.contains(id) && !stored.iter().any(|e| &e.task == id && e.stage == "text") {
            *stages = vec!["error".to_owned()];
            adjusted += 1;
        }
    }
    adjusted
}

/// Adds `ids` on `d`'s socket; the answer must be ok.
pub(crate) async fn add(d: &BinDaemon, ids: &[String]) {
    let v = d.request(json!({"cmd": "add", "task_ids": ids})).await;
    assert_eq!(v["ok"], true, "add refused: {v}\n{}", d.log_text());
}

/// Waits (at most `patience`) until `count` reaches `at_least`; returns the last value.
async fn wait_count<F, Fut>(patience: Duration, at_least: i64, mut count: F) -> i64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let deadline = Deadline::after(patience);
    loop {
        let n = count().await;
        if n >= at_least || deadline.passed() {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every daemon's log so far, each under its number, for a stall's failure message.
pub(crate) fn all_logs(daemons: &[BinDaemon]) -> String {
    daemons
        .iter()
        .enumerate()
        .map(|(i, d)| format!("--- daemon {i} ---\n{}", d.log_text()))
        .collect()
}

/// The ERROR lines of a log, for the failure message.
pub(crate) fn errors_in(log: &str) -> Vec<String> {
    log_lines(log)
        .into_iter()
        .filter(|l| l.level == "ERROR")
        .map(|l| l.rest)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_share_one_queue_and_lose_nothing_when_one_is_killed() {
    let Some(cluster) = sunopoll::testing::postgres() else {
        return;
    };
    let url = cluster.database();
    let db = db_name(&url);
    let seed = fastrand::u64(..);
    println!("three daemons: seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let rate = 20;
    let tasks = 300;

    let api = TimedApi::start().await;
    let handler = Receiver::start().await;
    handler.always(200, Duration::from_millis(5));
    let config = shared_config(&api, &handler, &rate.to_string());
    let mut daemons: Vec<BinDaemon> = (0..3).map(|_| prepare_on(&config, &url)).collect();
    for d in &mut daemons {
        d.restart().await;
    }
    // `status` on any of them lists all three, each once, and marks itself.
    let out = daemons[2].cli(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let listed = v["shared"]["daemons"].as_array().expect("shared.daemons");
    assert_eq!(listed.len(), 3, "{v}");
    let me = v["shared"]["me"].as_str().expect("shared.me");
    assert_eq!(listed.iter().filter(|d| d["id"] == me).count(), 1, "{v}");
    let human = text(&daemons[0].cli(&["status"]).await.stdout);
    assert!(
        human.contains("daemons:      3 sharing the queue") && human.contains("(this one)"),
        "{human}"
    );
    let started = Instant::now();

    let (mut expected, failing) = script_many(&api, &mut rng, "pg3x", tasks);
    let ids: Vec<String> = expected.keys().cloned().collect();
    for (n, batch) in ids.chunks(10).enumerate() {
        add(&daemons[n % 3], batch).await;
    }
    let wanted: i64 = expected.values().map(|s| s.len() as i64).sum();
    let events = || async { number(&psql(cluster, &db, "SELECT COUNT(*) FROM events").await) };

    // A third of the way: SIGKILL daemon 0 (its leases must pass to the others).
    let at_kill = wait_count(RUN_PATIENCE, wanted / 3, events).await;
    assert!(
        at_kill >= wanted / 3,
        "stalled before the kill at {at_kill} events\n{}",
        all_logs(&daemons)
    );
    let killed_after = started.elapsed();
    daemons[0].kill();
    // Two thirds of the way: SIGTERM daemon 1 and start it again on the same config.
    let at_restart = wait_count(RUN_PATIENCE, 2 * wanted / 3, events).await;
    assert!(
        at_restart >= 2 * wanted / 3,
        "stalled after the kill at {at_restart} events\n{}",
        all_logs(&daemons)
    );
    let restarted_after = started.elapsed();
    let status = daemons[1].terminate().await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exit:\n{}",
        daemons[1].log_text()
    );
    daemons[1].restart().await;

    // Every task finishes and every delivery is made, within a stall bound.
    let deadline = Deadline::after(RUN_PATIENCE);
    let (unfinished, pending) = loop {
        let unfinished = psql(cluster, &db, UNFINISHED_SQL).await;
        let pending = number(&psql(cluster, &db, PENDING_DELIVERIES_SQL).await);
        if (unfinished.trim().is_empty() && pending == 0) || deadline.passed() {
            break (unfinished, pending);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let took = started.elapsed();
    let doubles = psql(cluster, &db, DOUBLES_SQL).await;
    let stored = parse_events(&psql(cluster, &db, EVENTS_SQL).await);
    let received = handler.received();
    let text_missed = adjust_failing(&mut expected, &failing, &stored);

    let mut logs = String::new();
    for (i, d) in daemons.iter_mut().enumerate().skip(1) {
        let log = d.stop().await;
        logs.push_str(&format!("--- daemon {i} ---\n{log}"));
    }
    logs.push_str(&format!(
        "--- daemon 0 (killed) ---\n{}",
        daemons[0].log_text()
    ));

    let mut arrivals: Vec<Instant> = api.arrivals().into_iter().map(|a| a.0).collect();
    arrivals.sort();
    let (w1, w2, w10) = (
        busiest(&arrivals, Duration::from_secs(1)),
        busiest(&arrivals, Duration::from_secs(2)),
        busiest(&arrivals, Duration::from_secs(10)),
    );
    let mut row =
        Row::new("PostgreSQL: three daemons, one SIGKILLed, one restarted (real binaries)");
    figures::tally(&mut row, &expected, &stored, Some(&received));
    row.recovered = unfinished.trim().is_empty() && pending == 0;
    row.note = format!(
        "seed {seed}; {tasks} tasks, {} events stored (wanted {wanted}), kill at {at_kill} events \
         ({:.1} s), restart at {at_restart} ({:.1} s), all done in {:.1} s; API requests {}, \
         busiest 1 s / 2 s / 10 s: {w1} / {w2} / {w10} (rate {rate}/s configured for the account, shared by the three); \
         deliveries received {}, accepted twice {}; failing tasks with `error` only: {text_missed}",
        stored.len(),
        killed_after.as_secs_f64(),
        restarted_after.as_secs_f64(),
        took.as_secs_f64(),
        arrivals.len(),
        received.len(),
        row.dup_receiver,
    );
    eprintln!("{}", row.note);
    let errors = errors_in(&logs);
    assert!(
        doubles.trim().is_empty(),
        "stages stored twice:\n{doubles}\n{logs}"
    );
    assert!(
        unfinished.trim().is_empty(),
        "tasks never finished:\n{unfinished}\n{logs}"
    );
    assert_eq!(pending, 0, "deliveries still pending\n{logs}");
    assert!(errors.is_empty(), "errors logged: {errors:#?}");
    row.report_and_check();
    // Three daemons together stay within the configured rate: a 2 s window holds at most two
    // seconds' worth, and a little slack for a window's edges.
    let slack = 4;
    assert!(
        w2 <= 2 * rate + slack,
        "the three daemons together sent {w2} requests in 2 s, over 2 × {rate}/s + {slack}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_leases_pass_to_another_within_the_lease() {
    let Some(cluster) = sunopoll::testing::postgres() else {
        return;
    };
    let url = cluster.database();
    let db = db_name(&url);
    let api = TimedApi::start().await;
    let handler = Receiver::start().await;
    let config = shared_config(&api, &handler, "\"unlimited\"");
    let mut victim = prepare_on(&config, &url);
    let mut survivor = prepare_on(&config, &url);
    victim.restart().await;
    survivor.restart().await;
    // Unscripted tasks stay PENDING forever.
    let ids: Vec<String> = (0..40).map(|i| format!("pglease{i:04}")).collect();
    add(&victim, &ids[..20]).await;
    add(&survivor, &ids[20..]).await;

    let victim_pid = victim.pid();
    let survivor_pid = survivor.pid();
    let held_by = |pid: u32| {
        format!(
            "SELECT id FROM tasks WHERE claimed_by LIKE '%:{pid}:%' \
             AND lease_until >= (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
             ORDER BY id"
        )
    };
    // Wait until the victim holds leases, so that the kill leaves work behind.
    let deadline = Deadline::patience();
    let leased: Vec<String> = loop {
        let rows = psql(cluster, &db, &held_by(victim_pid)).await;
        let rows: Vec<String> = rows.lines().map(str::to_owned).collect();
        if !rows.is_empty() || deadline.passed() {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !leased.is_empty(),
        "the victim never held a lease:\n{}",
        victim.log_text()
    );
    victim.kill();
    let killed = Instant::now();

    // Each of its tasks must be polled again after the kill (the victim is gone, so by the
    // survivor), and the victim must hold no live lease any more. A poll releases its claim
    // when it is recorded, so claims are only seen now and then: they are counted, not
    // required all at once.
    let bound = LEASE + INTERVAL + Duration::from_secs(6);
    let deadline = Deadline::after(bound + Duration::from_secs(20));
    let mut polled_again: BTreeMap<String, Duration> = BTreeMap::new();
    let mut seen_claimed: BTreeSet<String> = BTreeSet::new();
    let still_held = loop {
        for (at, task) in api.arrivals() {
            if at > killed && leased.contains(&task) && !polled_again.contains_key(&task) {
                polled_again.insert(task, at.duration_since(killed));
            }
        }
        for task in psql(cluster, &db, &held_by(survivor_pid)).await.lines() {
            if leased.iter().any(|t| t == task) {
                seen_claimed.insert(task.to_owned());
            }
        }
        let still_held = psql(cluster, &db, &held_by(victim_pid)).await;
        if (polled_again.len() == leased.len() && still_held.trim().is_empty()) || deadline.passed()
        {
            break still_held;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failover = polled_again.values().max().copied().unwrap_or_default();
    let first = polled_again.values().min().copied().unwrap_or_default();
    eprintln!(
        "failover: {} tasks leased by the killed daemon; first polled again by the survivor after \
         {:.2} s, the last after {:.2} s (lease {} s, interval {} s); {} of them seen claimed \
         by the survivor in the database",
        leased.len(),
        first.as_secs_f64(),
        failover.as_secs_f64(),
        LEASE.as_secs(),
        INTERVAL.as_secs(),
        seen_claimed.len()
    );
    let log = survivor.stop().await;
    assert_eq!(
        polled_again.len(),
        leased.len(),
        "some of the killed daemon's tasks were never polled again: leased {leased:?}, polled \
         {polled_again:?}\n{log}"
    );
    assert!(
        still_held.trim().is_empty(),
        "the killed daemon still holds live leases on:\n{still_held}"
    );
    assert!(
        failover <= bound,
        "failover took {failover:?}, over lease + interval + slack ({bound:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_mid_run_pauses_polling_and_loses_nothing() {
    let Some(cluster) = PgCluster::spawn() else {
        return;
    };
    let cluster = std::sync::Arc::new(cluster);
    let url = cluster.database();
    let db = db_name(&url);
    let seed = fastrand::u64(..);
    println!("PostgreSQL restart: seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    handler.always(200, Duration::from_millis(5));
    let config = shared_config(&api, &handler, "\"unlimited\"");
    let mut d = prepare_on(&config, &url);
    d.restart().await;
    let started = Instant::now();

    let (mut expected, failing) = script_many(&api, &mut rng, "pgrs", 60);
    let ids: Vec<String> = expected.keys().cloned().collect();
    add(&d, &ids).await;
    let wanted: i64 = expected.values().map(|s| s.len() as i64).sum();
    let events = || async { number(&psql_own(&cluster, &db, "SELECT COUNT(*) FROM events").await) };

    let before_restart = wait_count(RUN_PATIENCE, wanted / 4, events).await;
    assert!(before_restart >= wanted / 4, "stalled at {before_restart}");
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart())
        .await
        .expect("join restart");

    let before_stop = wait_count(RUN_PATIENCE, wanted / 2, events).await;
    assert!(
        before_stop >= wanted / 2,
        "no progress after the restart: {before_stop} events\n{}",
        d.log_text()
    );
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop())
        .await
        .expect("join stop");
    let stopped = Instant::now();
    let calls_at_stop = api.total_calls();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // While the database is down: an add is refused, and says why.
    let refused = d.cli(&["add", "pgrsrefused0001"]).await;
    let said = format!("{}{}", text(&refused.stdout), text(&refused.stderr));
    let calls_while_down = api.total_calls() - calls_at_stop;
    assert!(
        d.running(),
        "the daemon exited with the database:\n{}",
        d.log_text()
    );
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.start())
        .await
        .expect("join start");
    let down_for = stopped.elapsed();

    let deadline = Deadline::after(RUN_PATIENCE);
    let (unfinished, pending) = loop {
        let unfinished = psql_own(&cluster, &db, UNFINISHED_SQL).await;
        let pending = number(&psql_own(&cluster, &db, PENDING_DELIVERIES_SQL).await);
        if (unfinished.trim().is_empty() && pending == 0) || deadline.passed() {
            break (unfinished, pending);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let took = started.elapsed();
    let doubles = psql_own(&cluster, &db, DOUBLES_SQL).await;
    let stored = parse_events(&psql_own(&cluster, &db, EVENTS_SQL).await);
    let refused_stored = psql_own(
        &cluster,
        &db,
        "SELECT COUNT(*) FROM tasks WHERE id = 'pgrsrefused0001'",
    )
    .await;
    let received = handler.received();
    let text_missed = adjust_failing(&mut expected, &failing, &stored);
    let log = d.stop().await;

    let mut row = Row::new("PostgreSQL restarted, then stopped for 3 s, under a running daemon");
    figures::tally(&mut row, &expected, &stored, Some(&received));
    row.recovered = unfinished.trim().is_empty() && pending == 0;
    row.note = format!(
        "seed {seed}; 60 tasks, {} events; restart at {before_restart} events, stop at \
         {before_stop}, down {:.1} s, API requests while down {calls_while_down}; all done in \
         {:.1} s; the refused add said: {:?} (exit {:?}); failing tasks with `error` only: \
         {text_missed}",
        stored.len(),
        down_for.as_secs_f64(),
        took.as_secs_f64(),
        said.trim(),
        refused.status.code(),
    );
    eprintln!("{}", row.note);
    assert!(
        !refused.status.success(),
        "an add was accepted while the database was down: {said}"
    );
    let lower = said.to_lowercase();
    assert!(
        lower.contains("store") || lower.contains("postgres") || lower.contains("database"),
        "the refused add does not name the store: {said:?}"
    );
    assert!(
        !lower.contains("panick"),
        "the CLI or daemon panicked: {said}"
    );
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
    // Polling pauses with the database: at most the requests already under way when it went.
    assert!(
        calls_while_down <= config.max_in_flight as usize,
        "{calls_while_down} API requests while the database was down\n{log}"
    );
    assert_eq!(
        number(&refused_stored),
        0,
        "the refused task is in the store"
    );
    assert!(
        doubles.trim().is_empty(),
        "stages stored twice:\n{doubles}\n{log}"
    );
    assert!(
        unfinished.trim().is_empty(),
        "tasks never finished:\n{unfinished}\n{log}"
    );
    assert_eq!(pending, 0, "deliveries still pending\n{log}");
    row.report_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_one_host_names_gets_the_events_a_host_without_it_stores() {
    let Some(cluster) = sunopoll::testing::postgres() else {
        return;
    };
    let url = cluster.database();
    let db = db_name(&url);
    let mut rng = fastrand::Rng::with_seed(fastrand::u64(..));
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    // A names the target `app`; B, on the same queue, names no target at all.
    let with_target = shared_config(&api, &handler, "\"unlimited\"");
    let mut without = with_target.clone();
    without.targets.clear();
    let mut a = prepare_on(&with_target, &url);
    let mut b = prepare_on(&without, &url);
    a.restart().await;
    b.restart().await;
    let registered = "SELECT COUNT(*) FROM targets WHERE name = 'app'";
    let n = wait_count(Duration::from_secs(30), 1, || async {
        number(&psql(cluster, &db, registered).await)
    })
    .await;
    assert_eq!(n, 1, "A never registered `app`:\n{}", a.log_text());
    // `status` on B shows the target and who names it: A, by host and control socket.
    let out = b.cli(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let targets = v["shared"]["targets"].as_array().expect("shared.targets");
    assert_eq!(targets.len(), 1, "{v}");
    assert_eq!(targets[0]["name"], "app", "{v}");
    let named_by = targets[0]["members"][0].as_str().expect("a member");
    assert!(
        named_by.ends_with(&format!(":{}", a.socket.display())),
        "{named_by} is not A's socket {}",
        a.socket.display()
    );
    let human = text(&b.cli(&["status"]).await.stdout);
    assert!(
        human.contains("target app: named by")
            && human.contains("no targets of its own (its events still go to the 1 registered"),
        "{human}"
    );

    // A stops cleanly. B alone polls ten tasks to their end: their events are stored for
    // `app` and wait, since no running daemon delivers to it; none is given up.
    let log_a = a.stop().await;
    let (mut expected, failing) = script_many(&api, &mut rng, "pgname", 10);
    let ids: Vec<String> = expected.keys().cloned().collect();
    add(&b, &ids).await;
    let finished = b.wait_finished(&ids).await;
    assert!(finished, "B did not finish the tasks:\n{}", b.log_text());
    let wanted: i64 = expected.values().map(|s| s.len() as i64).sum();
    let pending_app = "SELECT COUNT(*) FROM deliveries WHERE target = 'app' AND state = 'pending'";
    assert_eq!(
        number(&psql(cluster, &db, pending_app).await),
        wanted,
        "every event B stored waits for `app`:\n{}",
        b.log_text()
    );
    assert_eq!(handler.count(), 0, "nothing was delivered with A down");

    // A starts again: it delivers them all, in order per task, each with one webhook-id.
    a.restart().await;
    let delivered = "SELECT COUNT(*) FROM deliveries WHERE target = 'app' AND state = 'delivered'";
    let n = wait_count(RUN_PATIENCE, wanted, || async {
        number(&psql(cluster, &db, delivered).await)
    })
    .await;
    let stored = parse_events(&psql(cluster, &db, EVENTS_SQL).await);
    let received = handler.received();
    adjust_failing(&mut expected, &failing, &stored);
    let logs = format!(
        "--- A (first run) ---\n{log_a}\n--- A ---\n{}\n--- B ---\n{}",
        a.stop().await,
        b.stop().await
    );
    assert_eq!(n, wanted, "not every event reached `app`\n{logs}");
    let mut row = Row::new("PostgreSQL: a target named on one host only (real binaries)");
    figures::tally(&mut row, &expected, &stored, Some(&received));
    row.recovered = true;
    row.note = format!(
        "{} events stored by the host without the target, {} deliveries received after the \
         other came back",
        stored.len(),
        received.len()
    );
    assert!(errors_in(&logs).is_empty(), "errors logged:\n{logs}");
    row.report_and_check();
}

/// `sunopoll store forget-member` retires a host: refused while it runs, a dry run changes
/// nothing, and then the deliveries waiting for the target only it named are given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_host_is_forgotten_and_what_waited_for_it_is_given_up() {
    let Some(cluster) = sunopoll::testing::postgres() else {
        return;
    };
    let url = cluster.database();
    let db = db_name(&url);
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    let with_target = shared_config(&api, &handler, "\"unlimited\"");
    let mut without = with_target.clone();
    without.targets.clear();
    let mut a = prepare_on(&with_target, &url);
    let mut b = prepare_on(&without, &url);
    a.restart().await;
    b.restart().await;
    let v = a.status().await;
    let member = v["shared"]["member"]
        .as_str()
        .expect("A's member")
        .to_owned();
    let forget = |d: &BinDaemon, dry: bool| {
        let mut args = vec![
            "--config".to_owned(),
            d.config.display().to_string(),
            "store".to_owned(),
            "forget-member".to_owned(),
            member.clone(),
        ];
        if dry {
            args.push("--dry-run".to_owned());
        }
        args
    };
    let run_forget = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(sunopoll(&refs)).await
    };

    // While A runs: refused, and it says why.
    let out = run_forget(forget(&b, false)).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("is running") && text(&out.stderr).contains("stop it first"),
        "{}",
        text(&out.stderr)
    );
    // A stops for good; B stores events for `app` that now wait forever.
    a.stop().await;
    let ids = vec!["forget0001".to_owned(), "forget0002".to_owned()];
    for id in &ids {
        api.script_statuses(id, &["SUCCESS"]);
    }
    add(&b, &ids).await;
    assert!(b.wait_finished(&ids).await, "{}", b.log_text());
    let pending = "SELECT COUNT(*) FROM deliveries WHERE target = 'app' AND state = 'pending'";
    let waiting = number(&psql(cluster, &db, pending).await);
    assert!(waiting >= 2, "deliveries wait for app: {waiting}");

    // A dry run says what would happen and changes nothing.
    let out = run_forget(forget(&b, true)).await;
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        said.contains(&format!("would forget {member}: 1 target registration (dry run"))
            && said.contains(&format!(
                "target app: named by no other member; its {waiting} pending deliveries would be given up"
            )),
        "{said}"
    );
    assert_eq!(number(&psql(cluster, &db, pending).await), waiting);

    // Forgotten: they are given up, and no registration is left.
    let out = run_forget(forget(&b, false)).await;
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        said.contains(&format!("{waiting} pending deliveries given up")),
        "{said}"
    );
    assert_eq!(number(&psql(cluster, &db, pending).await), 0);
    assert_eq!(
        number(&psql(cluster, &db, "SELECT COUNT(*) FROM targets").await),
        0
    );
    // Asked again: nothing is registered under it any more.
    let out = run_forget(forget(&b, false)).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("no targets are registered under"),
        "{}",
        text(&out.stderr)
    );
    b.stop().await;
}
