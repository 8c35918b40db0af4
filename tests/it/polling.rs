//! A task's path through polling: events, failures, pauses, limits, deadline. The tests that
//! judge when requests arrived or how many came in a while (pauses, backoff, `max-in-flight`,
//! the request rate) ask the timed fake API, in its own process; the others ask wiremock.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

fn stages(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["stage"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_through_every_stage_gives_text_first_complete_with_the_callback_bodies() {
    let api = FakeApi::start().await;
    api.script_statuses(
        TASK,
        &["PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS"],
    );
    let mut d = TestDaemon::start(&api, |_| {}).await;
    d.add(&[TASK]).await;
    let (task, events) = d.wait_state(TASK, "done").await;
    assert_eq!(stages(&events), ["text", "first", "complete"]);
    assert_eq!(events[0]["body"], fixture_json("callback.text.json"));
    assert_eq!(events[1]["body"], fixture_json("callback.first.json"));
    assert_eq!(events[2]["body"], fixture_json("callback.complete.json"));
    // Same bytes too (key order preserved end to end).
    assert_eq!(
        compact(&events[2]["body"]),
        compact(&fixture_json("callback.complete.json"))
    );
    assert_eq!(task["stage"], "complete");
    assert_eq!(task["last_status"], "SUCCESS");
    assert_eq!(api.calls(TASK), 4, "no polls after the task completed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        api.calls(TASK),
        4,
        "still no polls after the task completed"
    );
    assert!(
        api.auth_headers()
            .iter()
            .all(|h| h == &format!("Bearer {KEY}"))
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jump_from_pending_to_success_fills_in_text_and_first() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["PENDING", "SUCCESS"]);
    let mut d = TestDaemon::start(&api, |_| {}).await;
    d.add(&[TASK]).await;
    let (_, events) = d.wait_state(TASK, "done").await;
    assert_eq!(stages(&events), ["text", "first", "complete"]);
    assert_eq!(events[1]["body"], fixture_json("callback.first.json"));
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fill_skipped_stages_only_complete_is_emitted() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["SUCCESS"]);
    let mut d = TestDaemon::start(&api, |c| c.poll.fill_skipped_stages = false).await;
    d.add(&[TASK]).await;
    let (_, events) = d.wait_state(TASK, "done").await;
    assert_eq!(stages(&events), ["complete"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_status_gives_one_error_with_its_code() {
    let cases = [
        ("record-info.GENERATE_AUDIO_FAILED.json", 501),
        ("record-info.GENERATE_AUDIO_FAILED.531.json", 531),
        ("record-info.SENSITIVE_WORD_ERROR.json", 400),
        ("record-info.CREATE_TASK_FAILED.json", 500),
        ("record-info.CALLBACK_EXCEPTION.no-audio.json", 500),
    ];
    let api = FakeApi::start().await;
    let ids: Vec<String> = (0..cases.len()).map(|i| format!("fail{i}")).collect();
    for (id, (file, _)) in ids.iter().zip(cases) {
        api.script(
            id,
            vec![
                Reply::fixture_for("record-info.TEXT_SUCCESS.json", id),
                Reply::fixture_for(file, id),
            ],
        );
    }
    let mut d = TestDaemon::start(&api, |_| {}).await;
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    d.add(&refs).await;
    for (id, (file, code)) in ids.iter().zip(cases) {
        let (task, events) = d.wait_state(id, "failed").await;
        assert_eq!(stages(&events), ["text", "error"], "{file}");
        assert_eq!(events[1]["code"], code, "{file}");
        assert_eq!(events[1]["body"]["code"], code, "{file}");
        assert_eq!(events[1]["body"]["data"]["callbackType"], "error");
        assert_eq!(events[1]["body"]["data"]["task_id"], id.as_str());
        assert_eq!(task["stage"], "error");
    }
    // The 531 error matches its callback fixture exactly.
    let (_, events) = d.show("fail1").await;
    let mut want = fixture_json("callback.error.531.json");
    want["data"]["task_id"] = Value::from("fail1");
    assert_eq!(events[1]["body"], want);
    let calls: Vec<usize> = ids.iter().map(|id| api.calls(id)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        calls,
        ids.iter().map(|id| api.calls(id)).collect::<Vec<_>>(),
        "failed tasks are not polled"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_exception_with_audio_completes() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["CALLBACK_EXCEPTION"]);
    let mut d = TestDaemon::start(&api, |_| {}).await;
    d.add(&[TASK]).await;
    let (_, events) = d.wait_state(TASK, "done").await;
    assert_eq!(stages(&events), ["text", "first", "complete"]);
    assert_eq!(events[2]["body"], fixture_json("callback.complete.json"));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_pending_after_first_changes_nothing() {
    let api = FakeApi::start().await;
    api.script_statuses(
        TASK,
        &["FIRST_SUCCESS", "PENDING", "TEXT_SUCCESS", "SUCCESS"],
    );
    let mut d = TestDaemon::start(&api, |_| {}).await;
    d.add(&[TASK]).await;
    let (_, events) = d.wait_state(TASK, "done").await;
    assert_eq!(stages(&events), ["text", "first", "complete"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_storm_pauses_all_polling_backs_off_and_recovers() {
    let api = TimedApi::start().await;
    let ids: Vec<String> = (0..6).map(|i| format!("storm{i}")).collect();
    for id in &ids {
        api.script_statuses(id, &["PENDING", "SUCCESS"]);
    }
    // Backoff: 100 ms doubling to 800 ms.
    let mut d = TestDaemon::start(&api, |c| c.poll.backoff_max = Duration::from_millis(800)).await;
    api.set_override(Some(Reply::fixture(
        "error.430.call-frequency-too-high.json",
    )));
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    d.add(&refs).await;
    let storm = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Asked while the storm lasts: once it is over, the next probe may reopen the gate before
    // the answer to a later `status` is made.
    let status = d.request(serde_json::json!({"cmd": "status"})).await;
    let during = api.total_calls();
    api.set_override(None);
    let storm_len = storm.elapsed();

    // Unthrottled, 6 tasks at a 100 ms interval would make ~150 requests in 2.5 s. With one
    // global pause (100, 200, 400, 800, 800 ms…) it is the first wave (at most max-in-flight)
    // plus one probe per pause.
    assert!(during >= 2, "the storm was seen ({during} requests)");
    assert!(
        during <= 4 + 8,
        "{during} requests in {storm_len:?}: polling did not pause"
    );
    // After the first wave, requests are single probes spaced by a growing backoff.
    let arrivals = api.arrivals();
    let probes: Vec<Instant> = arrivals
        .iter()
        .skip(4)
        .map(|a| a.0)
        .filter(|t| *t < storm + storm_len)
        .collect();
    for w in probes.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(80),
            "probes too close: {:?}",
            w[1] - w[0]
        );
    }
    assert_eq!(status["poll"]["pause_kind"], "throttled", "{status}");

    // Recovery: every task completes once the storm is over.
    for id in &ids {
        let (_, events) = d.wait_state(id, "done").await;
        assert_eq!(stages(&events), ["text", "first", "complete"]);
    }
    let status = d.request(serde_json::json!({"cmd": "status"})).await;
    assert_eq!(status["poll"]["state"], "polling", "{status}");
    assert_eq!(status["healthy"], true);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_429_with_retry_after_is_honoured() {
    let api = TimedApi::start().await;
    api.script_statuses(TASK, &["SUCCESS"]);
    let mut d = TestDaemon::start(&api, |_| {}).await;
    api.set_override(Some(Reply::raw(429, "").retry_after("2")));
    d.add(&[TASK]).await;
    eventually("the first request", || api.total_calls() >= 1).await;
    let first = Instant::now();
    api.set_override(None);
    let (_, events) = d.wait_state(TASK, "done").await;
    assert_eq!(events.len(), 3);
    let arrivals = api.arrivals();
    assert_eq!(arrivals.len(), 2, "one throttled request, then one probe");
    assert!(
        arrivals[1].0.duration_since(arrivals[0].0) >= Duration::from_millis(1900),
        "Retry-After: 2 was not honoured: {:?}",
        arrivals[1].0.duration_since(arrivals[0].0)
    );
    assert!(first.elapsed() < PATIENCE);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_pauses_like_a_throttle_and_recovers() {
    let api = TimedApi::start().await;
    api.script_statuses(TASK, &["SUCCESS"]);
    let mut d = TestDaemon::start(&api, |c| c.poll.backoff_max = Duration::from_millis(400)).await;
    api.set_override(Some(Reply::raw(502, "<html>Bad Gateway</html>")));
    d.add(&[TASK]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = api.total_calls();
    assert!(
        (2..=8).contains(&during),
        "{during} requests during a 1.5 s outage"
    );
    let status = d.request(serde_json::json!({"cmd": "status"})).await;
    assert_eq!(status["poll"]["pause_kind"], "unavailable", "{status}");
    api.set_override(None);
    d.wait_state(TASK, "done").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_pauses_polling_for_backoff_max_and_reports_unhealthy() {
    let api = TimedApi::start().await;
    api.script_statuses(TASK, &["SUCCESS"]);
    let mut d = TestDaemon::start(&api, |c| c.poll.backoff_max = Duration::from_millis(1500)).await;
    api.set_override(Some(Reply::raw(
        401,
        fixture("error.401.unauthorized.json"),
    )));
    d.add(&[TASK]).await;
    eventually("the first request", || api.total_calls() >= 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        api.total_calls(),
        1,
        "no requests while the key is rejected"
    );
    let status = d.request(serde_json::json!({"cmd": "status"})).await;
    assert_eq!(status["healthy"], false, "{status}");
    assert_eq!(status["poll"]["pause_kind"], "unauthorized");
    assert!(
        status["problems"][0]
            .as_str()
            .unwrap_or("")
            .contains("API key"),
        "{status}"
    );
    assert!(!status.to_string().contains(KEY));
    // The key works again: the probe after backoff-max succeeds and polling resumes.
    api.set_override(None);
    d.wait_state(TASK, "done").await;
    let arrivals = api.arrivals();
    assert!(arrivals[1].0.duration_since(arrivals[0].0) >= Duration::from_millis(1400));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_task_id_ends_after_three_answers_with_that_code() {
    let api = FakeApi::start().await;
    api.script(
        "gone",
        vec![Reply::fixture("error.422.missing-callback-url.kie.json")],
    );
    api.script_statuses(TASK, &["SUCCESS"]);
    let mut d = TestDaemon::start(&api, |c| c.poll.backoff_max = Duration::from_millis(300)).await;
    d.add(&["gone", TASK]).await;
    let (task, events) = d.wait_state("gone", "failed").await;
    assert_eq!(api.calls("gone"), 3);
    assert_eq!(stages(&events), ["error"]);
    assert_eq!(events[0]["code"], 422);
    assert_eq!(events[0]["body"]["msg"], "Please enter callBackUrl.");
    assert!(task["last_error"].as_str().unwrap_or("").contains("422"));
    // Other tasks were not held back by the rejections.
    d.wait_state(TASK, "done").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_body_backs_off_that_task_only() {
    let api = TimedApi::start().await;
    api.script(
        "bad",
        vec![Reply::raw(
            200,
            "{\"code\":200,\"msg\":\"success\",\"data\":null}",
        )],
    );
    api.script_statuses(TASK, &["PENDING", "PENDING", "SUCCESS"]);
    let mut d = TestDaemon::start(&api, |c| c.poll.backoff_max = Duration::from_secs(5)).await;
    d.add(&["bad", TASK]).await;
    d.wait_state(TASK, "done").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 100, 200, 400 ms… backoff: a handful of requests in ~0.8 s, not one per 100 ms.
    assert!(
        api.calls("bad") <= 5,
        "{} requests for the broken task",
        api.calls("bad")
    );
    let (task, _) = d.show("bad").await;
    assert_eq!(task["state"], "active");
    assert!(
        task["last_error"].as_str().unwrap_or("").contains("data"),
        "{task}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_deadline_ends_with_408() {
    let api = FakeApi::start().await;
    let mut d =
        TestDaemon::start(&api, |c| c.poll.task_deadline = Duration::from_millis(600)).await;
    d.add(&[TASK]).await;
    let started = Instant::now();
    let (task, events) = d.wait_state(TASK, "failed").await;
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(stages(&events), ["error"]);
    assert_eq!(events[0]["code"], 408);
    assert!(
        events[0]["body"]["msg"]
            .as_str()
            .unwrap_or("")
            .contains("600ms"),
        "{}",
        events[0]
    );
    assert_eq!(task["state"], "failed");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_tasks_at_once_respect_max_in_flight() {
    let api = TimedApi::start().await;
    let answer = Duration::from_millis(250);
    let ids: Vec<String> = (0..20).map(|i| format!("many{i:02}")).collect();
    for id in &ids {
        api.script(
            id,
            vec![Reply::fixture_for("record-info.SUCCESS.json", id).delayed(answer)],
        );
    }
    let mut d = TestDaemon::start(&api, |c| c.poll.max_in_flight = 4).await;
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    d.add(&refs).await;
    for id in &ids {
        d.wait_state(id, "done").await;
    }
    let mut times: Vec<Instant> = api.arrivals().into_iter().map(|a| a.0).collect();
    times.sort();
    assert_eq!(times.len(), 20);
    // With at most 4 in flight, the 5th request can only start once the 1st has been answered.
    for w in times.windows(5) {
        assert!(
            w[4].duration_since(w[0]) >= answer - Duration::from_millis(20),
            "5 requests within {:?}: more than 4 in flight",
            w[4].duration_since(w[0])
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_rate_limit_spaces_requests() {
    let api = TimedApi::start().await;
    let ids: Vec<String> = (0..25).map(|i| format!("rate{i}")).collect();
    for id in &ids {
        api.script_statuses(id, &["SUCCESS"]);
    }
    let mut d = TestDaemon::start(&api, |c| c.poll.max_requests_per_second = Some(10.0)).await;
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    d.add(&refs).await;
    for id in &ids {
        d.wait_state(id, "done").await;
    }
    let times: Vec<Instant> = api.arrivals().into_iter().map(|a| a.0).collect();
    assert_eq!(times.len(), 25);
    // At most 10 requests in any one-second window (less 50 ms for arrival jitter on a busy
    // test machine), and no faster on average.
    let mut j = 0;
    for i in 0..times.len() {
        while times[j] + Duration::from_millis(950) <= times[i] {
            j += 1;
        }
        assert!(i - j < 10, "{} requests within one second", i - j + 1);
    }
    let span = times[24].duration_since(times[0]);
    assert!(
        span >= Duration::from_millis(2350),
        "25 requests in {span:?} at 10/s"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_tasks_are_no_longer_polled_and_keep_their_events() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["TEXT_SUCCESS"]);
    let mut d = TestDaemon::start(&api, |_| {}).await;
    d.add(&[TASK]).await;
    eventually("a few polls", || api.calls(TASK) >= 2).await;
    let v = d
        .request(serde_json::json!({"cmd": "remove", "task_id": TASK}))
        .await;
    assert_eq!(v["removed"], true, "{v}");
    let after = api.calls(TASK);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        api.calls(TASK) <= after + 1,
        "polling stopped (one poll may have been in flight)"
    );
    let (task, events) = d.show(TASK).await;
    assert_eq!(task["state"], "removed");
    assert_eq!(stages(&events), ["text"]);
    let v = d
        .request(serde_json::json!({"cmd": "remove", "task_id": "unknown1"}))
        .await;
    assert_eq!(v["error"]["code"], "not_found");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_statuses_are_treated_as_running() {
    let api = FakeApi::start().await;
    let odd = String::from_utf8(fixture("record-info.PENDING.json"))
        .expect("utf8")
        .replace("\"PENDING\"", "\"QUEUED_FOR_MASTERING\"");
    api.script(
        TASK,
        vec![
            Reply::raw(200, odd.clone()),
            Reply::raw(200, odd),
            Reply::fixture("record-info.SUCCESS.json"),
        ],
    );
    let mut d = TestDaemon::start(&api, |_| {}).await;
    d.add(&[TASK]).await;
    let (_, events) = d.wait_state(TASK, "done").await;
    assert_eq!(stages(&events), ["text", "first", "complete"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_the_api_always_fails_does_not_stop_polling_for_the_others() {
    let api = TimedApi::start().await;
    // For P alone the API answers like an outage (JSON code 500); A and B are fine.
    api.script(
        "poison",
        vec![Reply::fixture("error.500.server-error.json")],
    );
    // A and B stay PENDING (unscripted tasks answer PENDING) with a long deadline.
    let mut d = TestDaemon::start(&api, |c| {
        c.poll.backoff_max = Duration::from_millis(800);
        c.poll.task_deadline = Duration::from_secs(4);
    })
    .await;
    d.add(&["poison"]).await;
    eventually("the first failure", || api.calls("poison") >= 1).await;
    d.add(&["ok-a", "ok-b"]).await;
    // After a few strikes the poisoned task backs off alone, then meets its deadline; meanwhile
    // the others keep being polled although every probe could have gone to the poisoned task.
    let (task, events) = d.wait_state("poison", "failed").await;
    assert!(
        api.calls("ok-a") >= 5 && api.calls("ok-b") >= 5,
        "A {} B {}",
        api.calls("ok-a"),
        api.calls("ok-b")
    );
    assert_eq!(events.len(), 1);
    // Its answers were fresh but unusable: it ends saying so, not with a 408 "timed out".
    assert_eq!(events[0]["code"], 500, "{events:?}");
    assert!(
        events[0]["body"]["msg"]
            .as_str()
            .is_some_and(|m| m.starts_with("Unreadable:") && m.contains("code 500")),
        "{events:?}"
    );
    assert!(
        task["last_error"].as_str().unwrap_or("").contains("500"),
        "{task}"
    );
    // Bounded: backoff, not a request per interval.
    assert!(
        api.calls("poison") <= 12,
        "{} requests for the poisoned task",
        api.calls("poison")
    );
    let status = d.request(serde_json::json!({"cmd": "status"})).await;
    assert_eq!(status["poll"]["state"], "polling", "{status}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_base_url_pauses_polling_instead_of_failing_every_task() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["SUCCESS"]);
    let mut d = TestDaemon::start(&api, |c| c.poll.backoff_max = Duration::from_millis(400)).await;
    // What a proxy or a wrong path answers: HTML, or the API's own "wrong path" envelope.
    api.set_override(Some(Reply::raw(404, "<html><body>Not Found</body></html>")));
    d.add(&[TASK]).await;
    eventually("a few tries", || api.total_calls() >= 4).await;
    api.set_override(Some(Reply::raw(200, fixture("error.404.wrong-path.json"))));
    let before = api.total_calls();
    eventually("more tries", || api.total_calls() >= before + 3).await;
    let (task, events) = d.show(TASK).await;
    assert_eq!(
        task["state"], "active",
        "the task is not failed for a configuration problem: {task}"
    );
    assert!(events.is_empty());
    let status = d.request(serde_json::json!({"cmd": "status"})).await;
    assert!(
        status["poll"]["pause_cause"]
            .as_str()
            .unwrap_or("")
            .contains("404"),
        "{status}"
    );
    // Once the URL is right (here: the fake answers again), the task completes.
    api.set_override(None);
    d.wait_state(TASK, "done").await;
    d.stop().await;
}
