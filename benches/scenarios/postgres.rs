//! The PostgreSQL store's scenarios (`bench/run postgres`, or some of `pg-add pg-idle
//! pg-throughput pg-failover`; only when named): the real daemons on one throwaway cluster with
//! PostgreSQL's default durability (`fsync`, `synchronous_commit` and `full_page_writes` on, so
//! every acknowledged commit waits for the disk, as on the servers users run), each daemon
//! connecting over the cluster's Unix socket.
//!
//! The database's own CPU time is read from `/proc` too: the postmaster and its children (the
//! backends serving the daemons' pooled connections, the WAL writer, the checkpointer).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use sunopoll::testing::PgCluster;

use crate::fake::{Fake, Mode};
use crate::proc::{Daemon, Setup};
use crate::{Results, add_figures, add_tasks, idle_figures, mib};

/// The scenarios of this module, in the order they run.
pub const SCENARIOS: [&str; 4] = ["pg-add", "pg-idle", "pg-throughput", "pg-failover"];

/// Tasks in the throughput scenario (four polls and three events each). A quarter of the SQLite
/// scenario's: at a few hundred durable commits a second, 20 000 would take many minutes.
const THROUGHPUT_TASKS: u64 = 5_000;
/// How long the throughput scenario waits for every task to be done before it reports how far
/// it got.
const THROUGHPUT_LIMIT: Duration = Duration::from_secs(300);
/// The lease in the failover scenario: the longest a dead daemon's claims keep its tasks.
const FAILOVER_LEASE: &str = "5s";

/// Runs the named PostgreSQL scenarios (`wanted` holds `postgres` for all of them).
pub fn run(rt: &tokio::runtime::Runtime, wanted: &[String], results: &mut Results) {
    let named = |name: &str| wanted.iter().any(|w| w == name || w == "postgres");
    if !SCENARIOS.iter().any(|s| named(s)) {
        return;
    }
    let cluster = PgCluster::spawn_durable()
        .expect("the PostgreSQL scenarios need PostgreSQL's server programs (initdb, pg_ctl)");
    eprintln!(
        "  postgres    cluster in {} (fsync, synchronous_commit, full_page_writes on)",
        cluster.socket_dir().display()
    );
    if named("pg-add") || named("pg-idle") {
        let dir = tempfile::tempdir().expect("tempdir");
        add_idle(rt, &cluster, dir.path(), named("pg-idle"), results);
    }
    if named("pg-throughput") {
        for daemons in [1, 3] {
            let dir = tempfile::tempdir().expect("tempdir");
            throughput(rt, &cluster, dir.path(), daemons, results);
        }
    }
    if named("pg-failover") {
        let dir = tempfile::tempdir().expect("tempdir");
        failover(rt, &cluster, dir.path(), results);
    }
}

/// The database name in a URL [`PgCluster::database`] made (`postgresql://postgres@/NAME?…`).
fn db_name(url: &str) -> &str {
    let after = url.split_once("@/").map_or(url, |(_, rest)| rest);
    after.split_once('?').map_or(after, |(name, _)| name)
}

/// The `[store]` lines for the database at `url`.
fn store_lines(url: &str, lease: Option<&str>) -> String {
    match lease {
        Some(lease) => format!("url = \"{url}\"\nlease = \"{lease}\""),
        None => format!("url = \"{url}\""),
    }
}

/// `add` throughput and latency on one daemon, its memory with 100 000+ tasks queued, and (with
/// `idle`) its wakeups and CPU once none of them is due.
fn add_idle(
    rt: &tokio::runtime::Runtime,
    cluster: &PgCluster,
    dir: &Path,
    idle: bool,
    results: &mut Results,
) {
    let api = rt.block_on(Fake::start(Mode::Pending));
    let url = cluster.database();
    let setup = Setup {
        api: &api.url,
        dir,
        poll: "max-requests-per-second = 2",
        extra: "",
    };
    let store = store_lines(&url, None);
    let d = Daemon::start_on(&setup, &store, "5s");
    let db0 = ServerCpu::read(cluster);
    let t = Instant::now();
    add_figures(&d, "pg-add", 3_200, false, results);
    let db_cpu = ServerCpu::read(cluster).since(&db0);
    let daemon_cpu = d.cpu();
    eprintln!(
        "  pg-add      {:.0?}: daemon CPU {daemon_cpu:.1?} (since start), database CPU {db_cpu:.1?}",
        t.elapsed()
    );
    let status = d.request(r#"{"cmd":"status"}"#);
    let active = status["tasks"]["active"].as_i64().unwrap_or(0);
    let (rss, hwm) = d.rss_kib();
    results.add(
        "pg-memory",
        &format!("RSS with {active} active tasks queued"),
        "(info)",
        mib(rss),
        None,
    );
    results.add(
        "pg-memory",
        "peak RSS during the adds",
        "(info)",
        mib(hwm),
        None,
    );
    d.stop();
    if !idle {
        return;
    }
    // Due in nine minutes: inside the default backoff-max, so not taken for a clock step.
    let later = sunopoll::clock::now_ms() + 9 * 60 * 1000;
    cluster.psql(
        db_name(&url),
        &format!("UPDATE tasks SET next_poll_at = {later}"),
    );
    let d = Daemon::start_on(&setup, &store, "5s");
    let db0 = ServerCpu::read(cluster);
    idle_figures(&d, "pg-idle", active, false, results);
    let db_cpu = ServerCpu::read(cluster).since(&db0);
    results.add(
        "pg-idle",
        "database CPU over the same 32 s (ms)",
        "(info)",
        format!("{:.0}", db_cpu.as_secs_f64() * 1000.0),
        None,
    );
    let (rss, _) = d.rss_kib();
    results.add(
        "pg-idle",
        "RSS while idle with 100 000+ tasks",
        "(info)",
        mib(rss),
        None,
    );
    d.stop();
}

/// Polls per second with no rate limit on `daemons` daemons sharing one database, 64 in flight
/// in all (the daemons split `max-in-flight`), until every task is done or
/// [`THROUGHPUT_LIMIT`].
fn throughput(
    rt: &tokio::runtime::Runtime,
    cluster: &PgCluster,
    dir: &Path,
    daemons: usize,
    results: &mut Results,
) {
    let scenario = if daemons == 1 {
        "pg-throughput-1"
    } else {
        "pg-throughput-3"
    };
    let api = rt.block_on(Fake::start(Mode::Progress));
    let url = cluster.database();
    let store = store_lines(&url, None);
    let ds: Vec<Daemon> = (0..daemons)
        .map(|i| {
            let sub = dir.join(format!("daemon{i}"));
            std::fs::create_dir_all(&sub).expect("mkdir");
            Daemon::start_on(
                &Setup {
                    api: &api.url,
                    dir: &sub,
                    poll: "interval = \"50ms\"\nmax-in-flight = 64\nmax-requests-per-second = \"unlimited\"",
                    extra: "",
                },
                &store,
                "5s",
            )
        })
        .collect();
    // Every daemon counts the others in (and a newcomer holds back) within two share checks.
    std::thread::sleep(Duration::from_secs(5));
    let tasks = THROUGHPUT_TASKS;
    let cpu0: Duration = ds.iter().map(Daemon::cpu).sum();
    let db0 = ServerCpu::read(cluster);
    let t = Instant::now();
    add_tasks(&ds[0], 5, tasks);
    let mut done = 0;
    let mut last_report = Instant::now();
    while t.elapsed() < THROUGHPUT_LIMIT {
        done = ds[0].request(r#"{"cmd":"status"}"#)["tasks"]["done"]
            .as_u64()
            .unwrap_or(0);
        if done == tasks {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "  {scenario} {:>4.0?}: {done} of {tasks} tasks done, {} polls",
                t.elapsed(),
                api.poll_count()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = (ds.iter().map(Daemon::cpu).sum::<Duration>() - cpu0).as_secs_f64();
    let db_cpu = ServerCpu::read(cluster).since(&db0).as_secs_f64();
    let polls = api.poll_count() as f64;
    let events = ds[0].request(r#"{"cmd":"status"}"#)["tasks"]["events"]
        .as_u64()
        .unwrap_or(0);
    let finished = done == tasks;
    let rate = polls / elapsed;
    let who = if daemons == 1 {
        "1 daemon".to_owned()
    } else {
        format!("{daemons} daemons on one database")
    };
    results.add(
        scenario,
        &format!(
            "polls/s, {who}, unlimited rate, 64 in flight in all ({} polls, {events} events)",
            polls as u64
        ),
        "(info)",
        if finished {
            format!("{rate:.0}")
        } else {
            format!("{rate:.0} — DID NOT FINISH: {done} of {tasks} tasks done in {elapsed:.0} s")
        },
        None,
    );
    results.add(
        scenario,
        "daemon CPU per poll, all daemons (ms)",
        "(info)",
        format!("{:.3}", cpu / polls * 1000.0),
        None,
    );
    results.add(
        scenario,
        "database CPU per poll (ms)",
        "(info)",
        format!("{:.3}", db_cpu / polls * 1000.0),
        None,
    );
    let hwm = ds.iter().map(|d| d.rss_kib().1).max().unwrap_or(0);
    results.add(
        scenario,
        "peak RSS (highest daemon)",
        "(info)",
        mib(hwm),
        None,
    );
    for d in ds {
        d.stop();
    }
}

/// Two daemons poll always-PENDING tasks with a short lease; one is SIGKILLed; how long until
/// the other polls the tasks the dead one held leases on.
fn failover(rt: &tokio::runtime::Runtime, cluster: &PgCluster, dir: &Path, results: &mut Results) {
    let api = rt.block_on(Fake::start(Mode::Pending));
    let url = cluster.database();
    let store = store_lines(&url, Some(FAILOVER_LEASE));
    let start = |name: &str| {
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).expect("mkdir");
        Daemon::start_on(
            &Setup {
                api: &api.url,
                dir: &sub,
                poll: "interval = \"1s\"\nmax-in-flight = 16\nmax-requests-per-second = 100",
                // The lease must hold the longest request twice.
                extra: "[forward]\ntimeout = \"2s\"",
            },
            &store,
            "2s",
        )
    };
    let mut doomed = start("a");
    let survivor = start("b");
    std::thread::sleep(Duration::from_secs(5));
    add_tasks(&survivor, 7, 200);
    // Both poll for a while: every task is polled about once a second.
    std::thread::sleep(Duration::from_secs(8));
    let pid = doomed.pid();
    doomed.child.kill().expect("SIGKILL");
    let killed = Instant::now();
    let _ = doomed.child.wait();
    let db = db_name(&url);
    let held = cluster.psql(
        db,
        &format!(
            "SELECT id, lease_until - (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT
             FROM tasks WHERE claimed_by LIKE '%:{pid}:%'"
        ),
    );
    let read_after = killed.elapsed();
    let mut lease_left_ms: Vec<f64> = Vec::new();
    let held: HashSet<String> = held
        .lines()
        .filter_map(|l| {
            let (id, left) = l.split_once('|')?;
            lease_left_ms.push(left.parse().ok()?);
            Some(id.to_owned())
        })
        .collect();
    assert!(
        !held.is_empty(),
        "the killed daemon held no lease; nothing to fail over"
    );
    // Until the survivor has polled every one of them (30 s at most).
    let mut first_poll: HashMap<String, Duration> = HashMap::new();
    let wait = Instant::now();
    while first_poll.len() < held.len() && wait.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
        let log = api.log.lock().expect("log");
        for (at, task) in &log.polls {
            if *at > killed && held.contains(task) && !first_poll.contains_key(task) {
                first_poll.insert(task.clone(), at.duration_since(killed));
            }
        }
    }
    let mut times: Vec<f64> = first_poll.values().map(Duration::as_secs_f64).collect();
    times.sort_by(f64::total_cmp);
    lease_left_ms.sort_by(f64::total_cmp);
    let left = |p: f64| crate::percentile(&lease_left_ms, p) / 1000.0 + read_after.as_secs_f64();
    results.add(
        "pg-failover",
        &format!(
            "lease {FAILOVER_LEASE}: tasks the SIGKILLed daemon held a lease on / polled by the other within 30 s"
        ),
        "(info)",
        format!("{} / {}", held.len(), first_poll.len()),
        None,
    );
    results.add(
        "pg-failover",
        "lease left on them at the kill, shortest / longest (s)",
        "(info)",
        format!("{:.2} / {:.2}", left(0.0), left(1.0)),
        None,
    );
    results.add(
        "pg-failover",
        "SIGKILL → first of them polled by the other daemon (s)",
        "(info)",
        format!("{:.2}", crate::percentile(&times, 0.0)),
        None,
    );
    results.add(
        "pg-failover",
        "SIGKILL → all of them polled, median / last (s)",
        "(info)",
        format!(
            "{:.2} / {:.2}",
            crate::percentile(&times, 0.5),
            crate::percentile(&times, 1.0)
        ),
        None,
    );
    survivor.stop();
}

/// CPU time of the cluster's processes (the postmaster and its children), per process.
struct ServerCpu(HashMap<u32, Duration>);

impl ServerCpu {
    fn read(cluster: &PgCluster) -> ServerCpu {
        let mut out = HashMap::new();
        let Some(postmaster) = cluster.postmaster_pid() else {
            return ServerCpu(out);
        };
        let ticks = crate::proc::clock_ticks();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return ServerCpu(out);
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let ppid = f.get(1).copied().unwrap_or(0);
            if pid == postmaster || ppid == u64::from(postmaster) {
                let t = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
                out.insert(pid, Duration::from_millis(t * 1000 / ticks));
            }
        }
        ServerCpu(out)
    }

    /// CPU used since `before` by the processes there now (a process that ended between the
    /// two readings is lost; the backends of pooled connections live as long as the daemons).
    fn since(&self, before: &ServerCpu) -> Duration {
        self.0
            .iter()
            .map(|(pid, t)| t.saturating_sub(before.0.get(pid).copied().unwrap_or_default()))
            .sum()
    }
}
