//! Restarts: unfinished tasks resume where they left off, nothing is emitted twice, and a
//! global pause survives.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_way_resumes_every_task_and_emits_nothing_twice() {
    let api = FakeApi::start().await;
    let ids = ["r1", "r2", "r3"];
    for id in ids {
        api.script_statuses(
            id,
            &[
                "TEXT_SUCCESS",
                "TEXT_SUCCESS",
                "TEXT_SUCCESS",
                "FIRST_SUCCESS",
                "SUCCESS",
            ],
        );
    }
    let mut d = TestDaemon::start(&api, |_| {}).await;
    d.add(&ids).await;
    for id in ids {
        eventually("text reached", || api.calls(id) >= 2).await;
    }
    let dir = d.dir.clone();
    let config = d.config.clone();
    d.stop().await;
    let before: Vec<usize> = ids.iter().map(|id| api.calls(id)).collect();
    assert!(before.iter().all(|n| *n < 5), "stopped mid-way: {before:?}");

    let mut d = TestDaemon::start_in(dir, config).await;
    let status = d.request(json!({"cmd": "status"})).await;
    assert_eq!(status["tasks"]["active"], 3, "{status}");
    for id in ids {
        let (_, events) = d.wait_state(id, "done").await;
        let stages: Vec<&str> = events
            .iter()
            .map(|e| e["stage"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(stages, ["text", "first", "complete"], "{id}");
    }
    let all = d.request(json!({"cmd": "events", "limit": 100})).await;
    assert_eq!(
        all["events"].as_array().expect("events").len(),
        9,
        "each stage once per task"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_an_overdue_task_is_polled_at_once_not_a_full_interval_later() {
    let api = TimedApi::start().await;
    let mut d = TestDaemon::start(&api, |c| c.poll.interval = Duration::from_secs(3)).await;
    d.add(&[TASK]).await;
    eventually("first poll", || api.calls(TASK) == 1).await;
    let dir = d.dir.clone();
    let config = d.config.clone();
    d.stop().await;
    // The next poll was due 3 s after the first; restart after it is overdue.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let restarted = Instant::now();
    let mut d = TestDaemon::start_in(dir, config).await;
    eventually("second poll", || api.calls(TASK) == 2).await;
    assert!(
        restarted.elapsed() < Duration::from_millis(2500),
        "waited {:?} after the restart; the overdue poll should go at once",
        restarted.elapsed()
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_pause_survives_a_restart() {
    let api = TimedApi::start().await;
    api.script_statuses(TASK, &["SUCCESS"]);
    let mut d = TestDaemon::start(&api, |c| c.poll.backoff_max = Duration::from_secs(10)).await;
    api.set_override(Some(Reply::raw(429, "").retry_after("3")));
    d.add(&[TASK]).await;
    eventually("throttled once", || api.total_calls() == 1).await;
    // The request reaching the API is not the daemon having taken in its answer: stop only
    // once the pause is in place (and so stored).
    poll_until(
        Deadline::patience(),
        "the daemon to pause",
        Duration::from_millis(10),
        || async {
            let status = d.request(json!({"cmd": "status"})).await;
            (status["poll"]["state"] == "paused").then_some(())
        },
    )
    .await;
    let throttled_at = api.arrivals()[0].0;
    let dir = d.dir.clone();
    let config = d.config.clone();
    d.stop().await;
    api.set_override(None);

    let mut d = TestDaemon::start_in(dir, config).await;
    let status = d.request(json!({"cmd": "status"})).await;
    assert_eq!(status["poll"]["state"], "paused", "{status}");
    d.wait_state(TASK, "done").await;
    let arrivals = api.arrivals();
    assert_eq!(
        arrivals.len(),
        2,
        "one probe after the pause, which succeeded"
    );
    assert!(
        arrivals[1].0.duration_since(throttled_at) >= Duration::from_millis(2900),
        "the restart did not honour the 3 s pause: {:?}",
        arrivals[1].0.duration_since(throttled_at)
    );
    d.stop().await;
}
