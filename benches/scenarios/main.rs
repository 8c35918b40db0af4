//! sunopoll's scenario benchmarks: the real release binary against a fast local fake API and
//! handler, measured from outside (the fake's clock, `/proc`).
//!
//! Run all: `bench/run` (or `cargo bench --bench scenarios`). Run some:
//! `cargo bench --bench scenarios -- add idle`. Scenarios: add, startup, idle, throughput,
//! rate, latency, fairness, memory, proxy (the API stand-in, `proxy.rs`), and, only when named (not part of a run of everything),
//! `million` (operator reads with 1 000 000 tasks in the store; it builds a store of a few
//! hundred MB), `archive` (a 1 GiB download and 200 small ones; it writes ~2 GiB to a temp
//! dir) and `postgres` (the PostgreSQL store: `pg-add pg-idle pg-throughput pg-failover`, see
//! `postgres.rs`). Prints a Markdown table for BENCHMARKS.md.

mod archive;
mod fake;
mod postgres;
mod proc;
mod proxy;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use fake::{Fake, Mode};
use proc::{Conn, Daemon, Setup, task_id};

/// One line of the results table.
struct Row {
    scenario: &'static str,
    metric: String,
    target: String,
    measured: String,
    met: Option<bool>,
}

/// The results table, row by row.
pub(crate) struct Results(Vec<Row>);

impl Results {
    /// One row, also printed as it is measured.
    pub(crate) fn add(
        &mut self,
        scenario: &'static str,
        metric: &str,
        target: &str,
        measured: String,
        met: Option<bool>,
    ) {
        let mark = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "",
        };
        eprintln!("  {scenario:<11} {metric:<48} {measured:>16}  (target {target}) {mark}");
        self.0.push(Row {
            scenario,
            metric: metric.to_owned(),
            target: target.to_owned(),
            measured,
            met,
        });
    }
}

fn main() {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = [
        "add",
        "startup",
        "idle",
        "throughput",
        "rate",
        "latency",
        "fairness",
        "memory",
        "proxy",
    ];
    let run =
        |name: &str| (wanted.is_empty() || wanted.iter().any(|w| w == name)) && all.contains(&name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let mut results = Results(Vec::new());
    eprintln!("sunopoll scenario benchmarks — binary {}", proc::BIN);
    let started = Instant::now();
    let big = tempfile::tempdir().expect("tempdir");
    if run("add") || run("startup") || run("idle") {
        add_startup_idle(&runtime, big.path(), &run, &mut results);
    }
    if wanted.iter().any(|w| w == "million") {
        let dir = tempfile::tempdir().expect("tempdir");
        million(&runtime, dir.path(), &mut results);
    }
    if wanted.iter().any(|w| w == "archive") {
        let dir = tempfile::tempdir().expect("tempdir");
        archive::archive(dir.path(), &mut results);
    }
    postgres::run(&runtime, &wanted, &mut results);
    for name in &all[3..] {
        if !run(name) {
            continue;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        match *name {
            "throughput" => throughput(&runtime, dir.path(), &mut results),
            "rate" => rate(&runtime, dir.path(), &mut results),
            "latency" => latency(&runtime, dir.path(), &mut results),
            "fairness" => fairness(&runtime, dir.path(), &mut results),
            "memory" => memory(&runtime, dir.path(), &mut results),
            "proxy" => proxy::proxy(&runtime, dir.path(), &mut results),
            _ => {}
        }
    }
    eprintln!("done in {:.0?}\n", started.elapsed());
    println!("| scenario | metric | target | measured | |");
    println!("|---|---|---|---|---|");
    for r in &results.0 {
        let mark = match r.met {
            Some(true) => "✔",
            Some(false) => "✘",
            None => "",
        };
        println!(
            "| {} | {} | {} | {} | {mark} |",
            r.scenario, r.metric, r.target, r.measured
        );
    }
}

/// `GET /metrics` 50 times with `active` tasks queued: what one scrape costs.
fn scrape(port: u16, active: i64, results: &mut Results) {
    use std::io::{Read, Write};
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..50 {
        let t = Instant::now();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        bytes = out.len();
    }
    times.sort_by(f64::total_cmp);
    results.add(
        "scrape",
        &format!("GET /metrics with {active} tasks queued, median (ms)"),
        "(info)",
        format!("{:.2}", percentile(&times, 0.5)),
        None,
    );
    results.add(
        "scrape",
        &format!("GET /metrics, p99 of 50 / size ({bytes} bytes)"),
        "(info)",
        format!("{:.2}", percentile(&times, 0.99)),
        None,
    );
}

/// The `p` quantile of `sorted` (nearest rank).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// KiB as MiB, one decimal.
pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `add` throughput, CLI latency, memory with 100 000 queued, start-up with them, and idle.
fn add_startup_idle(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    run: &dyn Fn(&str) -> bool,
    results: &mut Results,
) {
    let api = rt.block_on(Fake::start(Mode::Pending));
    // The metrics endpoint is on for the scrape figure; idle is measured with it on.
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let metrics = format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"");
    let setup = Setup {
        api: &api.url,
        dir,
        poll: "max-requests-per-second = 2",
        extra: &metrics,
    };
    let d = Daemon::start(&setup);

    add_figures(&d, "add", 10_000, true, results);

    let status = d.request(r#"{"cmd":"status"}"#);
    let active = status["tasks"]["active"].as_i64().unwrap_or(0);
    let (rss, hwm) = d.rss_kib();
    results.add(
        "memory",
        &format!("RSS with {active} active tasks queued"),
        "≤ 30 MiB",
        mib(rss),
        Some(rss <= 30 * 1024),
    );
    results.add(
        "memory",
        "peak RSS during the adds",
        "(info)",
        mib(hwm),
        None,
    );
    scrape(metrics_port, active, results);
    d.stop();

    if run("startup") {
        let mut times = Vec::new();
        let mut rss = 0;
        for _ in 0..5 {
            let d = Daemon::start(&setup);
            times.push(d.ready_after.as_secs_f64() * 1000.0);
            rss = rss.max(d.rss_kib().0);
            d.stop();
        }
        times.sort_by(f64::total_cmp);
        let median = percentile(&times, 0.5);
        results.add(
            "startup",
            &format!("ready with {active} tasks in the store, median of 5 (ms)"),
            "≤ 300",
            format!("{median:.1}"),
            Some(median <= 300.0),
        );
        results.add(
            "startup",
            "RSS right after start-up",
            "(info)",
            mib(rss),
            None,
        );
    }

    if run("idle") {
        // Make every task due in nine minutes (inside the default backoff-max of ten: a due time
        // further ahead than the daemon ever schedules is taken for a wall-clock step back and
        // treated as due now), then watch the daemon do nothing.
        let db = rusqlite::Connection::open(dir.join("sunopoll.db")).expect("open store");
        let later = sunopoll::clock::now_ms() + 9 * 60 * 1000;
        db.execute("UPDATE tasks SET next_poll_at = ?1", [later])
            .expect("update");
        drop(db);
        let d = Daemon::start(&setup);
        idle_figures(&d, "idle", active, true, results);
        let (rss, _) = d.rss_kib();
        results.add(
            "idle",
            "RSS while idle with 100 000+ tasks",
            "≤ 30 MiB",
            mib(rss),
            Some(rss <= 30 * 1024),
        );
        d.stop();
    }
}

/// `add` figures on a running daemon with few tasks queued: 100 batches of 1 000 IDs over one
/// connection, `singles` single-ID adds each on its own connection from 32 client threads, 500
/// from one, and 200 runs of the CLI. With `judge`, the figures are held against the issue's
/// targets (set for SQLite); otherwise they are for information.
fn add_figures(
    d: &Daemon,
    scenario: &'static str,
    singles: usize,
    judge: bool,
    results: &mut Results,
) {
    let target = |t: &'static str| if judge { t } else { "(info)" };
    let met = |ok: bool| judge.then_some(ok);
    let mut conn = Conn::open(&d.socket);
    let t = Instant::now();
    for batch in 0..100u64 {
        let ids: Vec<String> = (0..1000).map(|i| task_id(1, batch * 1000 + i)).collect();
        let v = conn.call(&serde_json::json!({"cmd": "add", "task_ids": ids}).to_string());
        assert_eq!(v["added"], 1000, "{v}");
    }
    let rate = 100_000.0 / t.elapsed().as_secs_f64();
    results.add(
        scenario,
        "100 000 IDs in batches of 1 000 (IDs/s)",
        target("≥ 50 000"),
        format!("{rate:.0}"),
        met(rate >= 50_000.0),
    );

    // One ID per connection, 32 clients at once.
    let clients = 32;
    let per_client = singles / clients;
    let t = Instant::now();
    std::thread::scope(|s| {
        for c in 0..clients {
            let socket = d.socket.clone();
            s.spawn(move || {
                for i in 0..per_client {
                    let line = format!(
                        r#"{{"cmd":"add","task_ids":["{}"]}}"#,
                        task_id(2, (c * per_client + i) as u64)
                    );
                    let s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
                    let v = proc::request_on(s, &line).expect("answer");
                    assert_eq!(v["ok"], true, "{v}");
                }
            });
        }
    });
    let n = (clients * per_client) as f64;
    let rate = n / t.elapsed().as_secs_f64();
    results.add(
        scenario,
        "one ID per connection, 32 clients (IDs/s)",
        target("≥ 3 000"),
        format!("{rate:.0}"),
        met(rate >= 3000.0),
    );
    let t = Instant::now();
    for i in 0..500u64 {
        let line = format!(r#"{{"cmd":"add","task_ids":["{}"]}}"#, task_id(3, i));
        let s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
        proc::request_on(s, &line).expect("answer");
    }
    let rate = 500.0 / t.elapsed().as_secs_f64();
    results.add(
        scenario,
        "one ID per connection, 1 client (IDs/s)",
        "(info)",
        format!("{rate:.0}"),
        None,
    );

    // The CLI as a process.
    let mut times = Vec::new();
    for i in 0..200u64 {
        let t = Instant::now();
        let out = std::process::Command::new(proc::BIN)
            .args(["add", "--socket"])
            .arg(&d.socket)
            .arg(task_id(4, i))
            .output()
            .expect("cli");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(out.status.success());
    }
    times.sort_by(f64::total_cmp);
    let median = percentile(&times, 0.5);
    results.add(
        scenario,
        "`sunopoll add ID` round trip, median (ms)",
        target("≤ 5"),
        format!("{median:.2}"),
        met(median <= 5.0),
    );
    results.add(
        scenario,
        "`sunopoll add ID` round trip, p90 (ms)",
        "(info)",
        format!("{:.2}", percentile(&times, 0.9)),
        None,
    );
}

/// Wakeups and CPU of a daemon with `active` tasks, none due, over 30 s (after 2 s to settle).
/// Each thread's wakeups are printed too, by name, to tell which one wakes.
fn idle_figures(
    d: &Daemon,
    scenario: &'static str,
    active: i64,
    judge: bool,
    results: &mut Results,
) {
    std::thread::sleep(Duration::from_secs(2));
    let (cs0, cpu0, t0) = (d.context_switches(), d.cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs(30));
    let (cs1, cpu1, elapsed) = (d.context_switches(), d.cpu(), t0.elapsed());
    let mut per_thread: Vec<(String, u64)> = cs1
        .iter()
        .map(|(tid, n)| (tid.clone(), n - cs0.get(tid).copied().unwrap_or(0).min(*n)))
        .collect();
    per_thread.sort_by_key(|t| std::cmp::Reverse(t.1));
    for (tid, n) in per_thread.iter().filter(|(_, n)| *n > 0) {
        eprintln!(
            "  {scenario:<11} thread {tid} ({}): {n} wakeups",
            d.thread_name(tid)
        );
    }
    let switches: u64 = per_thread.iter().map(|(_, n)| n).sum();
    let wakeups = switches as f64 / elapsed.as_secs_f64();
    let cpu = (cpu1 - cpu0).as_secs_f64() / elapsed.as_secs_f64() * 100.0;
    results.add(
        scenario,
        &format!(
            "wakeups/s, {active} tasks none due, {} threads",
            d.threads()
        ),
        if judge { "≤ 1" } else { "(info)" },
        format!(
            "{wakeups:.2} ({switches} in {:.0} s)",
            elapsed.as_secs_f64()
        ),
        judge.then_some(wakeups <= 1.0),
    );
    results.add(
        scenario,
        "CPU over 30 s (%)",
        if judge { "< 0.1" } else { "(info)" },
        format!("{cpu:.3}"),
        judge.then_some(cpu < 0.1),
    );
}

/// Adds `n` tasks in batches.
fn add_tasks(d: &Daemon, prefix: u32, n: u64) {
    let mut conn = Conn::open(&d.socket);
    for start in (0..n).step_by(1000) {
        let ids: Vec<String> = (start..(start + 1000).min(n))
            .map(|i| task_id(prefix, i))
            .collect();
        conn.call(&serde_json::json!({"cmd": "add", "task_ids": ids}).to_string());
    }
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls per second with no rate limit, events written, CPU per poll.
fn throughput(rt: &tokio::runtime::Runtime, dir: &Path, results: &mut Results) {
    let api = rt.block_on(Fake::start(Mode::Progress));
    let d = Daemon::start(&Setup {
        api: &api.url,
        dir,
        poll: "interval = \"50ms\"\nmax-in-flight = 64\nmax-requests-per-second = \"unlimited\"",
        extra: "",
    });
    let tasks = 20_000u64;
    let cpu0 = d.cpu();
    let t = Instant::now();
    add_tasks(&d, 5, tasks);
    wait_until("all tasks done", Duration::from_secs(300), || {
        d.request(r#"{"cmd":"status"}"#)["tasks"]["done"].as_u64() == Some(tasks)
    });
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = (d.cpu() - cpu0).as_secs_f64();
    let polls = api.poll_count() as f64;
    let events = d.request(r#"{"cmd":"status"}"#)["tasks"]["events"]
        .as_u64()
        .unwrap_or(0);
    let rate = polls / elapsed;
    results.add(
        "throughput",
        &format!(
            "polls/s, unlimited rate, 64 in flight ({} polls, {events} events)",
            polls as u64
        ),
        "≥ 2 000",
        format!("{rate:.0}"),
        Some(rate >= 2000.0),
    );
    let per_poll = cpu / polls * 1000.0;
    results.add(
        "throughput",
        "daemon CPU per poll (ms)",
        "≤ 0.3",
        format!("{per_poll:.3}"),
        Some(per_poll <= 0.3),
    );
    let (_, hwm) = d.rss_kib();
    results.add("throughput", "peak RSS", "(info)", mib(hwm), None);
    d.stop();
}

/// Achieved request rate against a configured limit.
fn rate(rt: &tokio::runtime::Runtime, dir: &Path, results: &mut Results) {
    for limit in [50.0f64, 500.0] {
        let api = rt.block_on(Fake::start(Mode::Pending));
        let sub = dir.join(format!("rate{limit}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let d = Daemon::start(&Setup {
            api: &api.url,
            dir: &sub,
            poll: &format!(
                "interval = \"10m\"\nmax-in-flight = 16\nmax-requests-per-second = {limit}"
            ),
            extra: "",
        });
        add_tasks(&d, 6, (limit * 20.0) as u64);
        std::thread::sleep(Duration::from_secs(10));
        d.stop();
        let log = api.log.lock().expect("log");
        let times: Vec<Instant> = log.polls.iter().map(|p| p.0).collect();
        let span = times
            .last()
            .expect("polls")
            .duration_since(times[0])
            .as_secs_f64();
        let achieved = (times.len() - 1) as f64 / span;
        let mut max_window = 0;
        let mut j = 0;
        for i in 0..times.len() {
            while times[j] + Duration::from_secs(1) <= times[i] {
                j += 1;
            }
            max_window = max_window.max(i - j + 1);
        }
        let off = (achieved - limit).abs() / limit * 100.0;
        results.add(
            "rate",
            &format!("limit {limit}/s: achieved rate over {span:.1} s"),
            "within 5 %",
            format!("{achieved:.1} ({off:.1} %)"),
            Some(off <= 5.0),
        );
        results.add(
            "rate",
            &format!("limit {limit}/s: most requests in any 1 s window"),
            &format!("≤ {limit}"),
            format!("{max_window}"),
            Some(max_window as f64 <= limit),
        );
    }
}

/// From the API's answer leaving the fake to the forward POST arriving at the handler.
fn latency(rt: &tokio::runtime::Runtime, dir: &Path, results: &mut Results) {
    let api = rt.block_on(Fake::start(Mode::Text));
    let d = Daemon::start(&Setup {
        api: &api.url,
        dir,
        poll: "interval = \"10m\"\nmax-in-flight = 8\nmax-requests-per-second = 200",
        extra: &format!(
            "[[forward.target]]\nname = \"bench\"\nurl = \"{}/hook\"\n",
            api.url
        ),
    });
    let tasks = 2000u64;
    add_tasks(&d, 7, tasks);
    wait_until("all events delivered", Duration::from_secs(120), || {
        api.log.lock().expect("log").posts.len() as u64 >= tasks
    });
    d.stop();
    let log = api.log.lock().expect("log");
    let mut lat: Vec<f64> = log
        .posts
        .iter()
        .filter_map(|(at, task, _)| {
            log.text_answered
                .get(task)
                .map(|a| at.duration_since(*a).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    let p99 = percentile(&lat, 0.99);
    results.add(
        "latency",
        &format!("answer → forward POST, p99 of {} events (ms)", lat.len()),
        "≤ 10",
        format!("{p99:.2}"),
        Some(p99 <= 10.0),
    );
    results.add(
        "latency",
        "answer → forward POST, p50 / max (ms)",
        "(info)",
        format!(
            "{:.2} / {:.2}",
            percentile(&lat, 0.5),
            lat.last().copied().unwrap_or(f64::NAN)
        ),
        None,
    );
}

/// More due tasks than the rate allows: every task waits about one cycle, none much longer.
fn fairness(rt: &tokio::runtime::Runtime, dir: &Path, results: &mut Results) {
    let api = rt.block_on(Fake::start(Mode::Pending));
    let (tasks, limit) = (600u64, 100.0);
    let d = Daemon::start(&Setup {
        api: &api.url,
        dir,
        poll: &format!("interval = \"1s\"\nmax-in-flight = 8\nmax-requests-per-second = {limit}"),
        extra: "",
    });
    add_tasks(&d, 8, tasks);
    std::thread::sleep(Duration::from_secs(40));
    d.stop();
    let cycle = tasks as f64 / limit;
    let log = api.log.lock().expect("log");
    let mut per_task: HashMap<&str, Vec<Instant>> = HashMap::new();
    for (at, task) in &log.polls {
        per_task.entry(task.as_str()).or_default().push(*at);
    }
    let gaps: Vec<f64> = per_task
        .values()
        .flat_map(|t| {
            t.windows(2)
                .map(|w| w[1].duration_since(w[0]).as_secs_f64())
                .collect::<Vec<_>>()
        })
        .collect();
    let max = gaps.iter().copied().fold(0.0, f64::max);
    let min = gaps.iter().copied().fold(f64::INFINITY, f64::min);
    let polls: Vec<usize> = per_task.values().map(Vec::len).collect();
    results.add(
        "fairness",
        &format!("{tasks} tasks at {limit}/s (cycle {cycle:.0} s): longest − shortest wait between polls (s)"),
        &format!("≤ {cycle:.0}"),
        format!("{:.2} ({min:.2}–{max:.2})", max - min),
        Some(max - min <= cycle),
    );
    results.add(
        "fairness",
        "polls per task over 40 s, fewest / most",
        "(info)",
        format!(
            "{} / {}",
            polls.iter().min().unwrap_or(&0),
            polls.iter().max().unwrap_or(&0)
        ),
        None,
    );
}

/// RSS while polling for an hour's worth of polls (compressed).
fn memory(rt: &tokio::runtime::Runtime, dir: &Path, results: &mut Results) {
    let api = rt.block_on(Fake::start(Mode::Pending));
    let d = Daemon::start(&Setup {
        api: &api.url,
        dir,
        poll: "interval = \"100ms\"\nmax-in-flight = 16\nmax-requests-per-second = \"unlimited\"\ntask-deadline = \"30d\"",
        extra: "",
    });
    let tasks = 1000u64;
    add_tasks(&d, 9, tasks);
    // One hour at the 30 s default is 120 polls per task.
    let mut samples = Vec::new();
    let t = Instant::now();
    while (api.poll_count() as u64) < tasks * 120 && t.elapsed() < Duration::from_secs(240) {
        std::thread::sleep(Duration::from_secs(5));
        samples.push((api.poll_count(), d.rss_kib().0));
    }
    d.stop();
    let first = samples.first().copied().unwrap_or_default();
    let last = samples.last().copied().unwrap_or_default();
    let max = samples.iter().map(|s| s.1).max().unwrap_or(0);
    results.add(
        "memory",
        &format!(
            "RSS after {} polls → after {} polls ({tasks} tasks)",
            first.0, last.0
        ),
        "no growth",
        format!("{} → {}", mib(first.1), mib(last.1)),
        Some(last.1 <= first.1 + 1024),
    );
    results.add(
        "memory",
        "highest RSS sample during the run",
        "≤ 30 MiB",
        mib(max),
        Some(max <= 30 * 1024),
    );
}

/// Tasks in the `million` store.
const MILLION: u64 = 1_000_000;

/// Milliseconds of one request on a fresh connection, until its whole answer line has
/// arrived (parsing it is the client's time, not the daemon's: 1 000 tasks are 400 KB).
fn timed(d: &Daemon, line: &str) -> f64 {
    use std::io::{BufRead, Write};
    let t = Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    s.write_all(format!("{line}\n").as_bytes()).expect("send");
    let mut answer = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut answer)
        .expect("answer");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(answer.starts_with(r#"{"ok":true"#), "{answer}");
    ms
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Fills a stopped store with `MILLION` tasks through SQL (the schema's triggers keep the counts
/// as the daemon's own writes do): 5 % active, 80 % done, 10 % failed, 5 % removed, interleaved
/// as a long-running queue's would be, one event per finished task, and one delivery to a
/// target for every tenth (a few still pending).
fn fill_million(db: &Path) {
    let mut c = rusqlite::Connection::open(db).expect("open store");
    c.execute_batch("PRAGMA synchronous = OFF;")
        .expect("pragma");
    let tx = c.transaction().expect("begin");
    {
        let now = sunopoll::clock::now_ms();
        let mut task = tx
            .prepare(
                "INSERT INTO tasks (id, state, stage, added_at, updated_at, next_poll_at, deadline_at, finished_at)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?4, ?5, ?6)",
            )
            .expect("prepare");
        let mut event = tx
            .prepare(
                "INSERT INTO events (task_id, stage, code, body, created_at) VALUES (?1, ?2, 200, ?3, ?4)",
            )
            .expect("prepare");
        let mut delivery = tx
            .prepare(
                "INSERT INTO deliveries (event_seq, task_id, target, url, origin, webhook_id, state,
                                         next_attempt_at, created_at, updated_at, delivered_at, ready)
                 VALUES (?1, ?2, 'app', 'http://127.0.0.1:9/cb', 'http://127.0.0.1:9', ?3, ?4, ?5, ?5, ?5, ?6, ?7)",
            )
            .expect("prepare");
        for i in 0..MILLION {
            let id = task_id(10, i);
            let at = now - i64::try_from(MILLION - i).unwrap_or(0) * 10;
            let (state, stage) = match i % 20 {
                0 => ("active", None),
                1 | 2 => ("failed", Some("error")),
                3 => ("removed", None),
                _ => ("done", Some("complete")),
            };
            let finished = (state != "active").then_some(at);
            task.execute(rusqlite::params![
                id,
                state,
                stage,
                at,
                at + 86_400_000,
                finished
            ])
            .expect("task");
            if let Some(stage) = stage {
                event
                    .execute(rusqlite::params![
                        id,
                        stage,
                        format!(r#"{{"code":200,"msg":"ok","data":{{"task_id":"{id}"}}}}"#),
                        at
                    ])
                    .expect("event");
                if i % 10 == 4 {
                    let seq = tx.last_insert_rowid();
                    let pending = i % 1000 == 4;
                    delivery
                        .execute(rusqlite::params![
                            seq,
                            id,
                            format!("msg_{id}_{stage}_bench"),
                            if pending { "pending" } else { "delivered" },
                            at,
                            (!pending).then_some(at + 5),
                            pending,
                        ])
                        .expect("delivery");
                }
            }
        }
    }
    tx.commit().expect("commit");
    c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("checkpoint");
}

/// Operator reads with a million tasks in the store: `status`, `list --state`, start-up, RSS
/// after a restart, and an `add` while a health check calls `status` in a loop.
fn million(rt: &tokio::runtime::Runtime, dir: &Path, results: &mut Results) {
    let api = rt.block_on(Fake::start(Mode::Pending));
    let setup = Setup {
        api: &api.url,
        dir,
        poll: "max-requests-per-second = 2",
        extra: "",
    };
    // The daemon creates the schema; the tasks are written while it is stopped.
    Daemon::start(&setup).stop();
    let t = Instant::now();
    fill_million(&dir.join("sunopoll.db"));
    eprintln!("  million     filled the store in {:.0?}", t.elapsed());

    let mut starts = Vec::new();
    let mut rss = 0;
    for _ in 0..5 {
        let d = Daemon::start(&setup);
        starts.push(d.ready_after.as_secs_f64() * 1000.0);
        rss = rss.max(d.rss_kib().0);
        d.stop();
    }
    let start = median_of(starts);
    results.add(
        "million",
        "start-up to `status` answering, median of 5 (ms)",
        "≤ 300",
        format!("{start:.1}"),
        Some(start <= 300.0),
    );
    results.add(
        "million",
        "RSS after a restart (highest of 5)",
        "≤ 30 MiB",
        mib(rss),
        Some(rss <= 30 * 1024),
    );

    let d = Daemon::start(&setup);
    let status = d.request(r#"{"cmd":"status"}"#);
    let total: i64 = ["active", "done", "failed", "removed"]
        .iter()
        .map(|s| status["tasks"][s].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(total, MILLION as i64, "{status}");
    let status_ms = median_of((0..200).map(|_| timed(&d, r#"{"cmd":"status"}"#)).collect());
    results.add(
        "million",
        "`status`, median of 200 (ms)",
        "≤ 5",
        format!("{status_ms:.2}"),
        Some(status_ms <= 5.0),
    );
    for state in ["done", "failed", "active"] {
        let line = format!(r#"{{"cmd":"list","state":"{state}","limit":1000}}"#);
        let ms = median_of((0..20).map(|_| timed(&d, &line)).collect());
        results.add(
            "million",
            &format!("`list --state {state}` (newest 1 000), median of 20 (ms)"),
            "≤ 10",
            format!("{ms:.2}"),
            Some(ms <= 10.0),
        );
    }
    let line = r#"{"cmd":"list","state":"failed","limit":100}"#;
    let ms = median_of((0..50).map(|_| timed(&d, line)).collect());
    results.add(
        "million",
        "`list --state failed --limit 100`, median of 50 (ms)",
        "(info)",
        format!("{ms:.2}"),
        None,
    );
    let show = format!(r#"{{"cmd":"show","task_id":"{}"}}"#, task_id(10, 4));
    let ms = median_of((0..50).map(|_| timed(&d, &show)).collect());
    results.add(
        "million",
        "`show` a task with an event and a delivery, median of 50 (ms)",
        "(info)",
        format!("{ms:.2}"),
        None,
    );

    // One `add` at a time, alone and then while a health check asks `status` in a loop.
    let add = |n: u64| {
        let line = format!(r#"{{"cmd":"add","task_ids":["{}"]}}"#, task_id(11, n));
        timed(&d, &line)
    };
    let alone = median_of((0..200).map(add).collect());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (during, statuses) = std::thread::scope(|s| {
        let looping = s.spawn(|| {
            let mut conn = Conn::open(&d.socket);
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                conn.call(r#"{"cmd":"status"}"#);
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_millis(200));
        let during = median_of((200..400).map(add).collect());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (during, looping.join().expect("status loop"))
    });
    results.add(
        "million",
        "one `add`, median of 200, alone (ms)",
        "(info)",
        format!("{alone:.2}"),
        None,
    );
    results.add(
        "million",
        &format!("one `add` while `status` runs in a loop ({statuses} answered), median (ms)"),
        "≤ 2 × alone",
        format!("{during:.2} ({:.1} ×)", during / alone),
        Some(during <= 2.0 * alone),
    );
    d.stop();

    // The one-off cost of the upgrade: the migration that builds the kept counts and indexes.
    // Measured by undoing it, which is only that simple while it is the last migration.
    let c = rusqlite::Connection::open(dir.join("sunopoll.db")).expect("open store");
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    if version != 5 {
        eprintln!(
            "  million     (migration cost not measured: schema {version} has later migrations)"
        );
        return;
    }
    {
        c.execute_batch(
            "DROP TRIGGER task_counts_insert; DROP TRIGGER task_counts_update;
             DROP TRIGGER task_counts_delete; DROP TRIGGER event_counts_insert;
             DROP TRIGGER event_counts_delete; DROP TRIGGER delivery_counts_insert;
             DROP TRIGGER delivery_counts_update; DROP TRIGGER delivery_counts_delete;
             DROP TABLE task_counts; DROP TABLE event_counts; DROP TABLE delivery_counts;
             DROP INDEX tasks_state; DROP INDEX deliveries_pending; PRAGMA user_version = 4;",
        )
        .expect("back to schema 4");
    }
    drop(c);
    let d = Daemon::start(&setup);
    results.add(
        "million",
        "first start after the upgrade (migration: one recount, two indexes) (ms)",
        "(info, once)",
        format!("{:.0}", d.ready_after.as_secs_f64() * 1000.0),
        None,
    );
    d.stop();
}
