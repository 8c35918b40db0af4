//! API faults, one test each, against the real binary: HTTP 5xx, JSON error codes, throttling
//! with and without `Retry-After`, bodies that are malformed, truncated, empty or 10 MB, answers
//! slower than the request timeout, refused and reset connections, a task that never leaves
//! PENDING, a status nobody knows, and statuses that go backwards.
//!
//! Every scenario checks the same four things: the daemon keeps running (it answers `status`
//! during the fault and exits 0 on SIGTERM afterwards); it polls no faster than its limits while
//! the fault lasts (no 1-second window over `max-requests-per-second` + 1, and the gaps between
//! requests follow the global pause or the per-task backoff schedule); it recovers by itself
//! once the fault ends (every task finishes with every event stored once and delivered); and its
//! log names the cause at warn or error level.
//!
//! The fake API is the timed one ([`TimedApi`], a process of its own): the limits are judged on
//! the times it took, which a loaded test runner cannot bunch. It also cuts the bodies short
//! (truncated, reset), so every fault's requests are seen, with their tasks, by the one clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::binary::*;
use crate::figures::{self, Row};
use crate::helpers::*;

/// `poll.interval`: the first backoff step.
const INTERVAL: Duration = Duration::from_millis(100);
/// `poll.backoff-max`.
const BACKOFF_MAX: Duration = Duration::from_millis(800);
/// `poll.max-requests-per-second`.
const RPS: usize = 5;
/// `poll.max-in-flight`.
const MAX_IN_FLIGHT: usize = 2;
/// How long each fault lasts.
const FAULT: Duration = Duration::from_millis(2500);
/// Timing slack for gaps between the timed fake's arrivals (one clock; the fake's own threads).
const SLACK: Duration = Duration::from_millis(15);

/// How the fault is produced.
#[derive(Clone)]
enum Inject {
    /// The fake API gives this answer to every request while the fault lasts (a body cut short
    /// at the TCP level too: [`Reply::cut`]).
    Override(Reply),
    /// Nothing listens on the API's port; the API comes up on it when the fault ends.
    Refused,
    /// Each task's own script carries the fault (the whole run is the fault).
    Script(fn(&str) -> Vec<Reply>),
    /// Tasks stay PENDING past a one-second deadline.
    Deadline,
}

/// What "no faster than its limits" means for this fault.
#[derive(Clone, Copy)]
enum Limit {
    /// One global pause: after the first wave, single probes spaced by the pause schedule
    /// (at least `Retry-After`, when the API sent one).
    Global(Option<Duration>),
    /// Each task backs off on its own.
    PerTask,
    /// Tasks keep their regular interval.
    Regular,
}

/// The shortest pause or backoff the daemon may choose after the `k`-th failure in a row
/// (`scheduler::backoff_delay` with the lowest jitter).
fn lower_bound(k: usize) -> Duration {
    let doublings = u32::try_from(k.saturating_sub(1).min(20)).unwrap_or(20);
    let nominal = (INTERVAL * 2u32.pow(doublings)).min(BACKOFF_MAX);
    nominal.mul_f64(0.8).clamp(INTERVAL, BACKOFF_MAX)
}

fn full_script(id: &str) -> Vec<Reply> {
    Reply::statuses(id, &["PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS"])
}

fn backwards_script(id: &str) -> Vec<Reply> {
    Reply::statuses(
        id,
        &[
            "TEXT_SUCCESS",
            "FIRST_SUCCESS",
            "PENDING",
            "TEXT_SUCCESS",
            "PENDING",
            "FIRST_SUCCESS",
            "SUCCESS",
        ],
    )
}

/// Checks that `times` (sorted) never has more than `2 × RPS + 1` requests in two seconds.
/// Two, not one, as when the fake ran in this test process (where a loaded machine bunched its
/// arrivals: once 7 in one second at 5/s): the times are now the timed fake's own, but the
/// daemon's requests still leave when a loaded machine lets them, after the limiter admitted
/// them. The limiter's per-second bound itself is proven, deterministically, by the unit tests
/// in `jobs::rate`.
fn assert_rate(times: &[Instant], what: &str) {
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(2))
            .count();
        assert!(
            in_window <= 2 * RPS + 1,
            "{what}: {in_window} requests within two seconds (limit {RPS}/s)"
        );
    }
}

/// Checks the spacing of requests during a global pause: after the first wave (at most
/// `max-in-flight` requests, sent before the pause began), each gap is at least the pause
/// the daemon may choose for that attempt. Returns how many requests went out in the window.
fn assert_global_pause(times: &[Instant], retry_after: Option<Duration>, what: &str) -> usize {
    for i in MAX_IN_FLIGHT..times.len().saturating_sub(1) {
        let gap = times[i + 1].duration_since(times[i]);
        let mut want = lower_bound(i - MAX_IN_FLIGHT + 2);
        if let Some(ra) = retry_after {
            want = want.max(ra);
        }
        assert!(
            gap + SLACK >= want,
            "{what}: requests {i} and {} only {gap:?} apart during a pause (at least {want:?})",
            i + 1
        );
    }
    // Generous upper bound: the wave, then at most one probe per shortest possible pause.
    let most = MAX_IN_FLIGHT + 1 + (FAULT.as_millis() / INTERVAL.as_millis()) as usize;
    assert!(
        times.len() <= most,
        "{what}: {} requests in the pause",
        times.len()
    );
    times.len()
}

/// Checks each task's own spacing: after its `k`-th broken answer in a row, its next request
/// waits at least the backoff for `k` (per-task faults), or the interval (regular polling).
fn assert_per_task(arrivals: &[(Instant, String)], limit: Limit, what: &str, exempt_last: bool) {
    let mut by_task: BTreeMap<&str, Vec<Instant>> = BTreeMap::new();
    for (t, id) in arrivals {
        by_task.entry(id).or_default().push(*t);
    }
    for (id, times) in by_task {
        let gaps = times.len().saturating_sub(1 + usize::from(exempt_last));
        for k in 0..gaps {
            let gap = times[k + 1].duration_since(times[k]);
            let want = match limit {
                Limit::PerTask => lower_bound(k + 1),
                _ => INTERVAL,
            };
            assert!(
                gap + SLACK >= want,
                "{what}: task {id} polled again after {gap:?} (at least {want:?})"
            );
        }
    }
}

/// Runs one fault scenario `SUNOPOLL_FAULT_RUNS` times (default once) and reports its figures.
async fn scenario(name: &str, inject: Inject, limit: Limit, cause: &str) {
    let mut total = Row::new(&format!("API fault: {name}"));
    total.runs = 0;
    for run in 0..count_from_env("SUNOPOLL_FAULT_RUNS", 1) {
        total.absorb(one_run(name, run, inject.clone(), limit, cause).await);
    }
    total.report_and_check();
}

/// One fault window, end to end: the checks, and the figures.
async fn one_run(name: &str, run: usize, inject: Inject, limit: Limit, cause: &str) -> Row {
    let ids: Vec<String> = (0..3).map(|i| format!("{name}-r{run}-{i}")).collect();
    let handler = Receiver::start().await;
    let (refused_port, _) = dead_port();
    let mut api = match inject {
        Inject::Refused => None,
        _ => Some(TimedApi::start().await),
    };
    let api_uri = match &api {
        None => format!("http://127.0.0.1:{refused_port}"),
        Some(a) => a.uri(),
    };
    let mut config = BinConfig::new(&api_uri);
    config.request_timeout = "500ms".to_owned();
    config.rps = RPS.to_string();
    config.max_in_flight = MAX_IN_FLIGHT as u32;
    config.backoff_max = "800ms".to_owned();
    if let Inject::Deadline = inject {
        config.task_deadline = "1s".to_owned();
    }
    config.targets.push(BinTarget::new("app", &handler.url()));

    let mut expected = BTreeMap::new();
    for id in &ids {
        let (script, stages) = match &inject {
            Inject::Script(f) => (f(id), figures::full()),
            Inject::Deadline => (
                vec![Reply::fixture_for("record-info.PENDING.json", id)],
                vec!["error".to_owned()],
            ),
            _ => (full_script(id), figures::full()),
        };
        if let Some(a) = &api {
            a.script(id, script);
        }
        expected.insert(id.clone(), stages);
    }
    if let (Inject::Override(reply), Some(a)) = (&inject, &api) {
        a.set_override(Some(reply.clone()));
    }

    let mut d = BinDaemon::start(&config).await;
    let v = d.request(json!({"cmd": "add", "task_ids": ids})).await;
    assert_eq!(v["ok"], true, "{v}");
    let fault_start = Instant::now();
    tokio::time::sleep(FAULT / 2).await;
    let during = d.status().await;
    assert_eq!(during["ok"], true, "the daemon answers during the fault");
    if let Limit::Global(_) = limit {
        assert!(
            during["poll"]["pause_kind"].is_string(),
            "polling is paused during a global fault: {during}"
        );
    }
    tokio::time::sleep(FAULT / 2).await;

    // The fault ends.
    match (&inject, &api) {
        (Inject::Override(_), Some(a)) => a.set_override(None),
        (Inject::Refused, None) => {
            let a = TimedApi::start_on_port(refused_port).await;
            for id in &ids {
                a.script(id, full_script(id));
            }
            api = Some(a);
        }
        _ => {}
    }
    let fault_end = Instant::now();
    let recovered = d.settle(&ids).await;
    let api = api.expect("the API is up");
    let calls_at_end = api.total_calls();
    if let Inject::Deadline = inject {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            api.total_calls(),
            calls_at_end,
            "no polls after the deadline"
        );
    }
    let stored = d.events().await;
    let log = d.stop().await;

    // The requests, as the API side saw them (cut answers included).
    let mut arrivals: Vec<(Instant, String)> = api.arrivals();
    arrivals.sort_by_key(|a| a.0);
    let times: Vec<Instant> = arrivals.iter().map(|a| a.0).collect();
    assert_rate(&times, name);
    let in_fault: Vec<(Instant, String)> = arrivals
        .iter()
        .filter(|a| a.0 >= fault_start && a.0 <= fault_end)
        .cloned()
        .collect();
    let requests_in_fault = match limit {
        Limit::Global(retry_after) => {
            let mut probes: Vec<Instant> = in_fault.iter().map(|a| a.0).collect();
            if let Inject::Refused = inject {
                // Refused connections are not seen by anyone: the daemon's own log says when
                // each probe went out.
                let base = log_lines(&log);
                let first = base.first().map(|l| l.at).expect("log lines");
                probes = base
                    .iter()
                    .filter(|l| l.rest.contains("pause over; probing"))
                    .map(|l| {
                        let since = (l.at - first).to_std().unwrap_or_default();
                        fault_start + since
                    })
                    .collect();
            }
            assert_global_pause(&probes, retry_after, name)
        }
        Limit::PerTask | Limit::Regular => {
            assert_per_task(&in_fault, limit, name, matches!(inject, Inject::Deadline));
            in_fault.len()
        }
    };
    let named = warnings_naming(&log, cause);
    assert!(
        !named.is_empty(),
        "{name}: no warn/error line names the cause {cause:?}:\n{log}"
    );

    let mut row = Row::new(&format!("API fault: {name}"));
    figures::tally(&mut row, &expected, &stored, Some(&handler.received()));
    row.recovered = recovered;
    row.note = format!(
        "{requests_in_fault} requests in the {:.1} s fault, {} in all; log: {:?}",
        FAULT.as_secs_f64(),
        calls_at_end.max(times.len()),
        named[0].rest.trim().chars().take(140).collect::<String>()
    );
    row
}

/// One answer for every task (an override), so it names none: an answer naming another task
/// is refused as not about this one.
fn envelope(status: &str) -> Reply {
    Reply::raw(
        200,
        format!(r#"{{"code":200,"msg":"success","data":{{"status":"{status}","response":null}}}}"#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_500() {
    let reply = Reply::raw(500, "<html><body>Internal Server Error</body></html>");
    scenario(
        "http-500",
        Inject::Override(reply),
        Limit::Global(None),
        "HTTP 500",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_502() {
    let reply = Reply::raw(502, "<html><body>Bad Gateway</body></html>");
    scenario(
        "http-502",
        Inject::Override(reply),
        Limit::Global(None),
        "HTTP 502",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503() {
    let reply = Reply::raw(503, "Service Unavailable");
    scenario(
        "http-503",
        Inject::Override(reply),
        Limit::Global(None),
        "HTTP 503",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503_with_retry_after() {
    let reply = Reply::raw(503, "").retry_after("2");
    let limit = Limit::Global(Some(Duration::from_secs(2)));
    scenario(
        "http-503-retry-after",
        Inject::Override(reply),
        limit,
        "HTTP 503",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_code_455_maintenance() {
    let reply = Reply::fixture("error.455.maintenance.json");
    scenario(
        "json-455",
        Inject::Override(reply),
        Limit::Global(None),
        "code 455",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_code_500() {
    let reply = Reply::fixture("error.500.server-error.json");
    scenario(
        "json-500",
        Inject::Override(reply),
        Limit::Global(None),
        "code 500",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_code_405_rate_limit() {
    let reply = Reply::fixture("error.405.rate-limit-exceeded.json");
    scenario(
        "json-405",
        Inject::Override(reply),
        Limit::Global(None),
        "code 405",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_code_408_upstream_timeout() {
    let reply = Reply::fixture("error.408.upstream-timeout.kie.json");
    scenario(
        "json-408",
        Inject::Override(reply),
        Limit::Global(None),
        "code 408",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_code_429() {
    let reply = Reply::fixture("error.429.rate-limited.kie.json");
    scenario(
        "json-429",
        Inject::Override(reply),
        Limit::Global(None),
        "code 429",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_code_430_call_frequency() {
    let reply = Reply::fixture("error.430.call-frequency-too-high.json");
    scenario(
        "json-430",
        Inject::Override(reply),
        Limit::Global(None),
        "code 430",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_429_bare() {
    let reply = Reply::raw(429, "");
    scenario(
        "http-429",
        Inject::Override(reply),
        Limit::Global(None),
        "HTTP 429",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_429_with_retry_after() {
    let reply = Reply::raw(429, "").retry_after("2");
    let limit = Limit::Global(Some(Duration::from_secs(2)));
    scenario(
        "http-429-retry-after",
        Inject::Override(reply),
        limit,
        "HTTP 429",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json() {
    let reply = Reply::raw(200, r#"{"code":200,"msg":"success","data":{"taskId":"#);
    scenario(
        "malformed-json",
        Inject::Override(reply),
        Limit::PerTask,
        "not JSON",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_body() {
    let reply = Reply::raw(200, "");
    scenario(
        "empty-body",
        Inject::Override(reply),
        Limit::PerTask,
        "empty body",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_of_10_mb() {
    let mut body = br#"{"code":200,"msg":""#.to_vec();
    body.resize(10 * 1024 * 1024, b'a');
    body.extend_from_slice(br#""}"#);
    let reply = Reply::raw(200, body);
    scenario(
        "body-10MB",
        Inject::Override(reply),
        Limit::PerTask,
        "bytes",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body() {
    let inject = Inject::Override(Reply::cut(Fault::Truncate));
    scenario(
        "truncated-body",
        inject,
        Limit::Global(None),
        "while reading the body",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_mid_body() {
    let inject = Inject::Override(Reply::cut(Fault::ResetMidBody));
    scenario(
        "reset-mid-body",
        inject,
        Limit::Global(None),
        "while reading the body",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_slower_than_the_request_timeout() {
    let reply = Reply::fixture("record-info.PENDING.json").delayed(Duration::from_secs(2));
    scenario(
        "slower-than-timeout",
        Inject::Override(reply),
        Limit::Global(None),
        "timed out",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused() {
    scenario(
        "connection-refused",
        Inject::Refused,
        Limit::Global(None),
        "could not connect",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_pending_past_its_deadline() {
    scenario(
        "pending-past-deadline",
        Inject::Deadline,
        Limit::Regular,
        "Timed out",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_nobody_knows() {
    let reply = envelope("QUANTUM_MASTERING");
    let cause = "status sunopoll does not know";
    scenario(
        "unknown-status",
        Inject::Override(reply),
        Limit::Regular,
        cause,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_going_backwards() {
    let inject = Inject::Script(backwards_script);
    scenario("status-backwards", inject, Limit::Regular, "backwards").await;
}
