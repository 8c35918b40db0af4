//! Handler faults, one test each, against the real binary: the handler down for a long stretch
//! (hours of the default retry schedule, compressed), answering 500, hanging, answering 2xx
//! only after the timeout, redirecting, closing or resetting the connection.
//!
//! Every scenario checks: nothing lost (every event stored once and in the end delivered),
//! order kept (per task, a handler never sees a stage before the previous one), retries within
//! the schedule (each retry no earlier than its delay minus the 10 % jitter, and not much later
//! than the delay plus the attempt itself, with 3 s to spare on a busy machine), and recovery
//! (nothing pending or failed once the handler behaves again).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::binary::*;
use crate::chaos::{Chaos, Mode};
use crate::figures::{self, Row};
use crate::helpers::*;

/// The schedule most scenarios use: ten attempts over 2.75 s.
const SCHEDULE: [u64; 10] = [0, 50, 100, 200, 400, 400, 400, 400, 400, 400];

/// The built-in schedule (0 s, 5 s, 5 m, 30 m, 2 h, 5 h, 10 h, 10 h) compressed 20 000 times.
const COMPRESSION: u64 = 20_000;

/// The handler's `timeout` in the config.
const TIMEOUT: Duration = Duration::from_millis(300);

/// Timing slack for gaps measured across processes on a busy machine.
const SLACK: Duration = Duration::from_millis(15);

/// The same for gaps read off the daemon's log (refused connections reach no handler, so the
/// log is the only clock): each line is written after its attempt's commit, and on a loaded
/// machine one commit can take a few hundred ms longer than the next, which shortens the gap
/// between two lines by as much without the retry having come early.
const LOG_SLACK: Duration = Duration::from_millis(300);

/// How the handler misbehaves while the fault lasts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Nothing listens on its port (connection refused); it comes up when the fault ends.
    Down,
    /// Every request gets 500.
    Status500,
    /// No answer at all (the daemon's timeout ends each attempt).
    Hang,
    /// 200, but only after the timeout: the handler did the work, the daemon cannot know.
    LateSuccess,
    /// 307 to another handler (redirects are not followed).
    Redirect,
    /// The connection is closed without an answer.
    Close,
    /// The connection is reset without an answer.
    Reset,
}

fn script(api: &FakeApi, id: &str, fails: bool) -> Vec<String> {
    if fails {
        api.script_statuses(id, &TEXT_THEN_FAILURE);
        figures::text_then_error()
    } else {
        api.script_statuses(id, &EVERY_STAGE);
        figures::full()
    }
}

/// Checks the spacing of one delivery's attempts (their start times, or for refused
/// connections their failure times) against `schedule`.
fn assert_within_schedule(
    id: &str,
    times: &[Instant],
    schedule: &[u64],
    attempt_takes: Duration,
    slack: Duration,
) {
    for (k, w) in times.windows(2).enumerate() {
        let gap = w[1].duration_since(w[0]);
        let delay = Duration::from_millis(schedule[(k + 1).min(schedule.len() - 1)]);
        let earliest = delay.mul_f64(0.9);
        // Early would be the broken promise (hammering a handler); late only matters as a
        // stall, a retry forgotten until something else wakes the forwarder. So the upper
        // bound is loose: on a machine loaded by other builds, retries were seen 4.3 s late.
        let latest = delay.mul_f64(1.1) + attempt_takes + Duration::from_secs(15);
        assert!(
            gap + slack >= earliest,
            "{id}: retry {} came {gap:?} after the previous attempt (schedule: {delay:?})",
            k + 2
        );
        assert!(
            gap <= latest,
            "{id}: retry {} came {gap:?} after the previous attempt (schedule: {delay:?})",
            k + 2
        );
    }
}

/// Runs one handler fault `SUNOPOLL_FAULT_RUNS` times (default once) and reports its figures.
async fn scenario(fault: Fault, fault_for: Duration) {
    let mut total = Row::new("");
    total.runs = 0;
    for run in 0..count_from_env("SUNOPOLL_FAULT_RUNS", 1) {
        total.absorb(one_run(fault, fault_for, run).await);
    }
    total.report_and_check();
}

/// One fault window, end to end: the checks, and the figures.
async fn one_run(fault: Fault, fault_for: Duration, run: usize) -> Row {
    let name = format!("{fault:?}").to_lowercase();
    let api = FakeApi::start().await;
    let ids: Vec<String> = (0..4).map(|i| format!("h-{name}-r{run}-{i}")).collect();
    let mut expected = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        expected.insert(id.clone(), script(&api, id, i == 3));
    }

    // The handler, and the URL the daemon is given for it.
    let (port, bring_up) = dead_port();
    let mut handler = match fault {
        Fault::Down => None,
        _ => Some(Receiver::start().await),
    };
    let elsewhere = Receiver::start().await;
    let chaos = match (fault, &handler) {
        (Fault::Close | Fault::Reset, Some(h)) => Some(Chaos::start(*h.server.address()).await),
        _ => None,
    };
    let url = match (&chaos, &handler) {
        (Some(c), _) => format!("{}/suno/callback", c.uri()),
        (None, Some(h)) => h.url(),
        (None, None) => format!("http://127.0.0.1:{port}/suno/callback"),
    };
    let schedule: Vec<u64> = if fault == Fault::Down {
        [0, 5, 300, 1800, 7200, 18_000, 36_000, 36_000]
            .map(|s| s * 1000 / COMPRESSION)
            .to_vec()
    } else {
        SCHEDULE.to_vec()
    };
    let mut config = BinConfig::new(&api.uri());
    config.interval = "50ms".to_owned();
    config.schedule_ms(&schedule);
    let mut target = BinTarget::new("app", &url);
    target.timeout = format!("{}ms", TIMEOUT.as_millis());
    config.targets.push(target);

    match (fault, &handler, &chaos) {
        (Fault::Status500, Some(h), _) => h.always(500, Duration::ZERO),
        (Fault::Hang, Some(h), _) => h.always(200, Duration::from_secs(30)),
        (Fault::LateSuccess, Some(h), _) => h.always(200, TIMEOUT * 2),
        (Fault::Redirect, Some(h), _) => {
            h.always(307, Duration::ZERO);
            h.redirect_to(&elsewhere.url());
        }
        (Fault::Close, _, Some(c)) => c.set(Mode::Close),
        (Fault::Reset, _, Some(c)) => c.set(Mode::Reset),
        _ => {}
    }

    let mut d = BinDaemon::start(&config).await;
    let v = d.request(json!({"cmd": "add", "task_ids": ids})).await;
    assert_eq!(v["ok"], true, "{v}");
    assert!(d.wait_finished(&ids).await, "the tasks finished polling");
    tokio::time::sleep(fault_for.saturating_sub(Duration::from_millis(300))).await;
    let during = d.status().await;
    assert!(
        during["targets"][0]["pending"].as_i64().unwrap_or(0) > 0,
        "deliveries wait while the handler misbehaves: {during}"
    );

    // The fault ends.
    if fault == Fault::Down {
        handler = Some(Receiver::start_on(bring_up()).await);
    } else if let Some(c) = &chaos {
        c.set(Mode::Pass);
    } else if let Some(h) = &handler {
        h.always(200, Duration::ZERO);
    }
    let recovered = d.settle(&ids).await;
    let status = d.status().await;
    let failed = status["targets"][0]["failed"].as_i64().unwrap_or(-1);
    let stored = d.events().await;
    let log = d.stop().await;
    let handler = handler.expect("the handler is up");
    let received = handler.received();

    // Every attempt of every delivery, by webhook-id.
    let mut attempts: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
    let mut attempt_takes = Duration::ZERO;
    match fault {
        Fault::Down => {
            // Refused connections reach no one: the daemon's log has each failure's time.
            let lines = log_lines(&log);
            let first = lines.first().map(|l| l.at).expect("log lines");
            let origin = Instant::now();
            for l in lines
                .iter()
                .filter(|l| l.rest.contains("delivery failed; will retry"))
            {
                let key = format!(
                    "{}/{}",
                    l.field("task_id").unwrap_or_default(),
                    l.field("stage").unwrap_or_default()
                );
                let offset = (l.at - first).to_std().unwrap_or_default();
                attempts.entry(key).or_default().push(origin + offset);
            }
        }
        Fault::Close | Fault::Reset => {
            for (at, id) in chaos.as_ref().expect("chaos").fault_ids() {
                attempts.entry(id).or_default().push(at);
            }
        }
        _ => {
            attempt_takes = match fault {
                Fault::Hang | Fault::LateSuccess => TIMEOUT,
                _ => Duration::ZERO,
            };
            for r in &received {
                attempts
                    .entry(r.header("webhook-id").to_owned())
                    .or_default()
                    .push(r.at);
            }
        }
    }
    let retried = attempts.values().filter(|a| a.len() > 1).count();
    let most = attempts.values().map(Vec::len).max().unwrap_or(0);
    let slack = if fault == Fault::Down {
        LOG_SLACK
    } else {
        SLACK
    };
    for (id, times) in &attempts {
        assert_within_schedule(id, times, &schedule, attempt_takes, slack);
    }
    assert!(retried > 0, "the fault caused retries");
    if fault == Fault::Redirect {
        assert_eq!(elsewhere.count(), 0, "redirects are never followed");
        assert!(
            !warnings_naming(&log, "redirects are not followed").is_empty(),
            "the log says why a redirect failed"
        );
    }

    let mut row = Row::new(&format!("handler fault: {name}"));
    figures::tally(&mut row, &expected, &stored, Some(&received));
    row.recovered = recovered && failed == 0;
    row.note = format!(
        "fault for {:.1} s{}; {retried} deliveries retried, at most {most} attempts each, all within the schedule",
        fault_for.as_secs_f64(),
        if fault == Fault::Down {
            format!(
                " (= {:.0} h of the default schedule, compressed {COMPRESSION}x)",
                fault_for.as_secs_f64() * COMPRESSION as f64 / 3600.0
            )
        } else {
            String::new()
        }
    );
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_down_for_hours_of_the_default_schedule() {
    scenario(Fault::Down, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_answering_500() {
    scenario(Fault::Status500, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hangs() {
    scenario(Fault::Hang, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_answering_2xx_after_the_timeout() {
    scenario(Fault::LateSuccess, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_redirects() {
    scenario(Fault::Redirect, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_closes_the_connection() {
    scenario(Fault::Close, Duration::from_millis(1500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_resets_the_connection() {
    scenario(Fault::Reset, Duration::from_millis(1500)).await;
}
