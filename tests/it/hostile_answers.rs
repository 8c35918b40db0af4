//! A hostile or broken API against the real binary (issue 16, items 3–8): answers about another
//! task, failures that read as success, one bad value in a good answer, dangerous URLs, text
//! that forges terminal output, and answers too large to build whole.

use serde_json::{Value, json};

use crate::binary::*;
use crate::helpers::*;

/// The events `show` reports for `task`.
async fn shown_events(d: &BinDaemon, task: &str) -> Vec<Value> {
    let v = d.request(json!({"cmd": "show", "task_id": task})).await;
    assert_eq!(v["ok"], true, "{v}");
    v["events"].as_array().cloned().unwrap_or_default()
}

/// A SUCCESS answer for `task` with `edit` applied to its text.
fn success_with(task: &str, edit: impl FnOnce(String) -> String) -> Reply {
    let text = String::from_utf8(fixture("record-info.SUCCESS.json"))
        .expect("utf8")
        .replace(TASK, task);
    let edited = edit(text.clone());
    assert_ne!(edited, text, "the edit changed the answer");
    Reply::raw(200, edited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_about_another_task_is_never_taken_for_this_one() {
    let api = FakeApi::start().await;
    // A caching proxy that ignores the query string: task-a is first told task-b's result.
    let mut script = vec![Reply::fixture_for("record-info.SUCCESS.json", "task-b"); 2];
    script.extend(Reply::statuses("task-a", &["PENDING", "SUCCESS"]));
    api.script("task-a", script);
    let config = BinConfig::new(&api.uri());
    let mut d = BinDaemon::start(&config).await;
    d.request(json!({"cmd": "add", "task_ids": ["task-a"]}))
        .await;
    assert!(d.wait_finished(&["task-a".into()]).await);
    assert!(
        api.calls("task-a") >= 4,
        "task-b's answers were taken as task-a's: done after {} polls",
        api.calls("task-a")
    );
    let events = shown_events(&d, "task-a").await;
    assert_eq!(
        events.last().map(|e| e["stage"].clone()),
        Some(json!("complete"))
    );
    let log = d.stop().await;
    let named = warnings_naming(&log, "task-b");
    assert!(
        named.iter().any(|l| l.rest.contains("task-a")),
        "a warning names both tasks:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_never_reads_as_success_nor_carries_an_invented_code() {
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    for (task, code) in [
        ("fail-200", "200"),
        ("fail-1e30", "1e30"),
        ("fail-204", "\"204\""),
    ] {
        api.script(
            task,
            vec![Reply::raw(
                200,
                format!(
                    r#"{{"code":200,"msg":"success","data":{{"taskId":"{task}","status":"GENERATE_AUDIO_FAILED","errorCode":{code},"errorMessage":"it failed"}}}}"#
                ),
            )],
        );
    }
    let mut config = BinConfig::new(&api.uri());
    config.targets.push(BinTarget::new("app", &handler.url()));
    let mut d = BinDaemon::start(&config).await;
    let ids = ["fail-200", "fail-1e30", "fail-204"];
    d.request(json!({"cmd": "add", "task_ids": ids})).await;
    let owned: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    assert!(d.wait_finished(&owned).await);
    assert!(d.settle(&owned).await);
    for id in ids {
        let events = shown_events(&d, id).await;
        assert_eq!(events.len(), 1, "{id}: {events:?}");
        assert_eq!(events[0]["stage"], "error", "{id}");
        assert_eq!(events[0]["code"], 501, "{id}: the family's default code");
        assert_eq!(events[0]["body"]["code"], 501, "{id}");
    }
    for r in handler.received() {
        assert_eq!(
            r.json()["code"],
            501,
            "the handler never sees a 2xx failure"
        );
    }
    let log = d.stop().await;
    // serde_json spells 1e30 back as 1e+30: the value, as read.
    for (task, raw) in [
        ("fail-200", "200"),
        ("fail-1e30", "1e+30"),
        ("fail-204", "204"),
    ] {
        assert!(
            warnings_naming(&log, "errorCode").iter().any(|l| {
                l.field("task_id").as_deref() == Some(task)
                    && l.field("error_code").is_some_and(|c| c.contains(raw))
            }),
            "the API's value {raw} is in a warning:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_value_does_not_lose_a_good_result_and_unreadable_answers_say_so() {
    let api = FakeApi::start().await;
    let mut bad_utf8 = String::from_utf8(fixture("record-info.SUCCESS.json"))
        .expect("utf8")
        .replace(TASK, "bad-utf8")
        .into_bytes();
    let at = bad_utf8
        .windows(9)
        .position(|w| w == b"\"title\": ")
        .expect("a title")
        + 10;
    bad_utf8.insert(at, 0xff);
    api.script("bad-utf8", vec![Reply::raw(200, bad_utf8)]);
    api.script(
        "huge-number",
        vec![success_with("huge-number", |t| {
            t.replacen("\"duration\": 187.32", "\"duration\": 1e400", 1)
        })],
    );
    // Over the old 2 MiB cap: a long prompt, as a long lyrics or MIDI answer would be.
    let long = "la ".repeat(1_000_000);
    api.script(
        "big-body",
        vec![success_with("big-body", |t| {
            t.replacen("\"prompt\": \"", &format!("\"prompt\": \"{long}"), 1)
        })],
    );
    // Never legible: a code-200 answer without a status.
    api.script(
        "unreadable",
        vec![Reply::raw(
            200,
            r#"{"code":200,"msg":"success","data":{"taskId":"unreadable"}}"#,
        )],
    );
    let mut config = BinConfig::new(&api.uri());
    config.task_deadline = "2s".to_owned();
    config.backoff_max = "300ms".to_owned();
    let mut d = BinDaemon::start(&config).await;
    let ids = ["bad-utf8", "huge-number", "big-body", "unreadable"];
    d.request(json!({"cmd": "add", "task_ids": ids})).await;
    let owned: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
    assert!(d.wait_finished(&owned).await);
    for id in ["bad-utf8", "huge-number", "big-body"] {
        let events = shown_events(&d, id).await;
        assert_eq!(
            events.last().map(|e| e["stage"].clone()),
            Some(json!("complete")),
            "{id}: {events:?}"
        );
        let tracks = &events.last().expect("an event")["body"]["data"]["data"];
        assert_eq!(tracks.as_array().map(Vec::len), Some(2), "{id}");
    }
    let events = shown_events(&d, "huge-number").await;
    let tracks = &events.last().expect("an event")["body"]["data"]["data"];
    assert_eq!(tracks[0]["duration"], Value::Null, "1e400 reads as absent");
    let events = shown_events(&d, "bad-utf8").await;
    let title = events.last().expect("an event")["body"]["data"]["data"][0]["title"].clone();
    assert!(
        title.as_str().is_some_and(|t| t.contains('\u{fffd}')),
        "{title}"
    );
    let events = shown_events(&d, "unreadable").await;
    let last = events.last().expect("the unreadable task ended");
    assert_eq!(last["stage"], "error");
    assert_ne!(last["code"], 408, "no timeout happened: {last}");
    let msg = last["body"]["msg"].as_str().unwrap_or("");
    assert!(
        msg.starts_with("Unreadable:") && msg.contains("data.status"),
        "{msg}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangerous_urls_never_reach_a_handler() {
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    let dangerous = [
        (
            "https://files.example.com/r/0c4e2b7f9a1d4c3e8b6f5a2d1e0c9b8a.mp3",
            "javascript:alert(document.cookie)",
        ),
        (
            "https://files.example.com/r/7e1a9c3b5d2f4e6a8c0b1d3f5a7c9e2b.jpeg",
            "http://169.254.169.254/latest/meta-data/iam/",
        ),
        (
            "https://files.example.com/r/3b8d1f6a2c4e9b0d7f5a3c1e8b6d4f2a.mp3",
            "file:///etc/passwd",
        ),
    ];
    api.script(
        "bad-urls",
        vec![success_with("bad-urls", |mut t| {
            for (good, bad) in dangerous {
                t = t.replacen(good, bad, 1);
            }
            t
        })],
    );
    let mut config = BinConfig::new(&api.uri());
    config.targets.push(BinTarget::new("app", &handler.url()));
    let mut d = BinDaemon::start(&config).await;
    d.request(json!({"cmd": "add", "task_ids": ["bad-urls"]}))
        .await;
    assert!(d.wait_finished(&["bad-urls".into()]).await);
    assert!(d.settle(&["bad-urls".into()]).await);
    let received = handler.received();
    assert!(!received.is_empty(), "the handler got the events");
    for r in &received {
        let body = String::from_utf8_lossy(&r.body);
        for (_, bad) in dangerous {
            assert!(!body.contains(bad), "{bad} reached the handler: {body}");
        }
    }
    let complete = received
        .iter()
        .find(|r| r.stage() == "complete")
        .expect("a complete callback");
    let tracks = &complete.json()["data"]["data"];
    assert_eq!(
        tracks[0]["audio_url"],
        Value::Null,
        "the key stays, as null"
    );
    assert_eq!(tracks[0]["image_url"], Value::Null);
    assert_eq!(tracks[1]["audio_url"], Value::Null);
    assert!(tracks[0]["source_audio_url"].is_string(), "good URLs pass");
    let log = d.stop().await;
    for (_, bad) in dangerous {
        assert!(
            warnings_naming(&log, bad)
                .iter()
                .any(|l| l.field("task_id").as_deref() == Some("bad-urls")),
            "{bad} is logged at warn with the task id:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_from_the_api_cannot_forge_terminal_output_or_flood_the_log() {
    let api = FakeApi::start().await;
    let forged = "MYSTERY\n\u{1b}[2K\u{1b}[1Gtask-zzz  done  complete\u{9b}31m";
    api.script(
        "esc-status",
        vec![Reply::raw(
            200,
            json!({"code": 200, "msg": "success",
                   "data": {"taskId": "esc-status", "status": forged}})
            .to_string(),
        )],
    );
    let huge = "X".repeat(1_000_000);
    api.script(
        "long-status",
        vec![Reply::raw(
            200,
            json!({"code": 200, "msg": "success",
                   "data": {"taskId": "long-status", "status": huge}})
            .to_string(),
        )],
    );
    let mut config = BinConfig::new(&api.uri());
    config.log_level = "debug".to_owned();
    let mut d = BinDaemon::start(&config).await;
    d.request(json!({"cmd": "add", "task_ids": ["esc-status", "long-status"]}))
        .await;
    poll_until(
        Deadline::patience(),
        "both statuses are stored",
        std::time::Duration::from_millis(50),
        || async {
            let v = d.request(json!({"cmd": "list"})).await;
            let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
            (tasks.len() == 2 && tasks.iter().all(|t| t["last_status"].is_string())).then_some(())
        },
    )
    .await;
    let mut human = String::new();
    for args in [
        vec!["list"],
        vec!["show", "esc-status"],
        vec!["show", "long-status"],
        vec!["status"],
        vec!["events"],
    ] {
        let out = d.cli(&args).await;
        human.push_str(&text(&out.stdout));
    }
    assert!(
        !human.contains('\u{1b}') && !human.contains('\u{9b}'),
        "{human:?}"
    );
    for line in human.lines() {
        assert!(!line.starts_with("task-zzz"), "a forged line: {line:?}");
        assert!(
            line.chars().count() < 1_000,
            "a line of {} chars",
            line.len()
        );
    }
    assert!(
        human.contains("MYSTERY\\n\\u{1b}[2K"),
        "escaped, not dropped: {human}"
    );
    // JSON output stays exact (of what is kept: a status is at most 200 characters).
    let out = d.cli(&["list", "--json"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let statuses: Vec<&str> = v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["last_status"].as_str())
        .collect();
    assert!(statuses.contains(&forged), "{statuses:?}");
    assert!(statuses.iter().all(|s| s.chars().count() <= 201));
    let log = d.stop().await;
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
}

/// Sends one request on a fresh connection and reads its whole answer line, however long.
async fn answer_bytes(socket: &std::path::Path, request: &Value) -> String {
    let mut c = RawClient::connect(socket).await;
    c.send_line(&request.to_string()).await;
    let v = c.read_json().await.expect("an answer");
    assert_eq!(v["ok"], true, "{}", crate::helpers::compact(&v["error"]));
    serde_json::to_string(&v).expect("json")
}

/// KiB to MiB, for messages.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_list_is_streamed_not_built_whole() {
    let api = FakeApi::start().await;
    let mut config = BinConfig::new(&api.uri());
    // The tasks only need to be there; polling them all would only load the machine.
    config.rps = "1".to_owned();
    let d = BinDaemon::start(&config).await;
    let n = count_from_env("SUNOPOLL_LIST_TASKS", 30_000);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|i| format!("list-task-{i:07}")).collect();
        let v = d
            .request(json!({"cmd": "add", "task_ids": ids, "label": "a label to make rows longer"}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
    }
    // A short one first, so the connection and the allocator's arenas are warm. Not a long
    // one: a whole answer built once leaves its memory to the next.
    let warm = answer_bytes(&d.socket, &json!({"cmd": "list", "limit": 1000})).await;
    assert!(warm.len() > 100_000);
    let (_, peak_before) = d.memory_kib();
    let answer = answer_bytes(&d.socket, &json!({"cmd": "list"})).await;
    let (_, peak_after) = d.memory_kib();
    let v: Value = serde_json::from_str(&answer).expect("json");
    assert_eq!(
        v["tasks"].as_array().map(Vec::len),
        Some(n),
        "every task is listed"
    );
    let answer_kib = answer.len() as u64 / 1024;
    let grew = peak_after.saturating_sub(peak_before);
    // Built whole, the answer costs the daemon several times its size (the records, the views,
    // the line); streamed, one page of 256 rows, plus SQLite's page cache (2 MiB) warming up.
    assert!(
        grew < answer_kib / 3,
        "the daemon's peak grew by {:.1} MiB for a {:.1} MiB answer",
        mib(grew),
        mib(answer_kib)
    );
}

/// Adds `n` tasks whose SUCCESS answers carry `prompt_bytes` of prompt per track, and waits
/// until every one is done: about three events each, two of them large.
async fn large_events(api: &FakeApi, d: &BinDaemon, n: usize, prompt_bytes: usize) {
    let long = "x".repeat(prompt_bytes);
    let ids: Vec<String> = (0..n).map(|i| format!("big-{i:03}")).collect();
    for id in &ids {
        api.script(
            id,
            vec![success_with(id, |t| {
                t.replace("\"prompt\": \"", &format!("\"prompt\": \"{long}"))
            })],
        );
    }
    let v = d.request(json!({"cmd": "add", "task_ids": ids})).await;
    assert_eq!(v["ok"], true, "{v}");
    assert!(d.wait_finished(&ids).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_events_page_is_streamed_and_stalled_followers_hold_one_page() {
    let api = FakeApi::start().await;
    let config = BinConfig::new(&api.uri());
    let mut d = BinDaemon::start(&config).await;
    large_events(&api, &d, 40, 150_000).await;
    let (rss_start, _) = d.memory_kib();

    // One `events` request with limit 10000 over ~40 MB of bodies.
    let warm = answer_bytes(&d.socket, &json!({"cmd": "events", "limit": 2})).await;
    assert!(warm.len() > 100_000);
    let (_, peak_before) = d.memory_kib();
    let answer = answer_bytes(
        &d.socket,
        &json!({"cmd": "events", "since": 0, "limit": 10000}),
    )
    .await;
    let (_, peak_after) = d.memory_kib();
    let v: Value = serde_json::from_str(&answer).expect("json");
    assert_eq!(v["more"], false);
    assert!(v["events"].as_array().map_or(0, Vec::len) >= 80);
    let answer_kib = answer.len() as u64 / 1024;
    let grew = peak_after.saturating_sub(peak_before);
    // Whole, several times the answer; streamed, one page and SQLite's page cache (2 MiB).
    assert!(
        grew < answer_kib / 3,
        "the daemon's peak grew by {:.1} MiB for a {:.1} MiB answer",
        mib(grew),
        mib(answer_kib)
    );

    // Followers from the first event that never read: each holds one page (at most 256 KiB
    // of bodies and one more), not the whole log, and the memory comes back when they go.
    let followers = 40;
    let mut stalled = Vec::new();
    for _ in 0..followers {
        let mut c = RawClient::connect(&d.socket).await;
        c.send_line(&json!({"cmd": "events", "follow": true, "since": 0}).to_string())
            .await;
        stalled.push(c);
    }
    // Each has been served from its first page (a follower reads its page before it writes
    // the first line); then none reads any more, and their writes block.
    for c in &mut stalled {
        let line = c.read_json().await.expect("the first event");
        assert!(line["event"]["seq"].is_i64(), "{line}");
    }
    let status = d.status().await;
    assert_eq!(status["ok"], true);
    let (_, peak_followed) = d.memory_kib();
    let per_follower = peak_followed.saturating_sub(peak_after) / followers;
    assert!(
        per_follower < 4 * 1024,
        "a stalled follower costs {:.1} MiB (the log is {:.1} MiB)",
        mib(per_follower),
        mib(answer_kib)
    );
    drop(stalled);
    poll_until(
        Deadline::patience(),
        "the daemon to drop the followers",
        std::time::Duration::from_millis(50),
        || async {
            let v = d.request(json!({"cmd": "status"})).await;
            (v["ok"] == true).then_some(())
        },
    )
    .await;
    let (rss_end, _) = d.memory_kib();
    assert!(
        rss_end < rss_start + 64 * 1024,
        "RSS {:.1} MiB after the clients left, {:.1} MiB before",
        mib(rss_end),
        mib(rss_start)
    );
    d.stop().await;
}

/// Issue 16 item 11: through a network whose latency jitters by 0–150 ms, 20 requests/s
/// against a limit of 200 per 10 s once put 201 into one of the API's windows. The limiter
/// leaves room for that jitter: the busiest 10 s window of arrivals stays within the limit.
/// The timed fake (its own process) holds each request 0–150 ms before it arrives, and keeps the
/// times: the jitter is the one asked for, not whatever a loaded test runner adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jittered_latency_never_puts_more_than_the_limit_into_an_api_window() {
    let api = TimedApi::start().await;
    api.set_jitter(std::time::Duration::from_millis(150));
    let mut config = BinConfig::new(&api.uri());
    config.rps = "20".to_owned();
    config.max_in_flight = 8;
    let d = BinDaemon::start(&config).await;
    let ids: Vec<String> = (0..60).map(|i| format!("jitter{i:026}")).collect();
    let mut args = vec!["add"];
    args.extend(ids.iter().map(String::as_str));
    assert!(d.cli(&args).await.status.success());
    // 22 s of polling at the full rate: every task stays pending, so demand never runs out.
    let run = std::time::Duration::from_secs(22);
    tokio::time::sleep(run).await;
    let times: Vec<std::time::Instant> = api.arrivals().into_iter().map(|a| a.0).collect();
    assert!(
        times.len() > 300,
        "only {} requests in {run:?}",
        times.len()
    );
    let mut busiest = 0;
    let mut j = 0;
    for i in 0..times.len() {
        while times[j] + std::time::Duration::from_secs(10) <= times[i] {
            j += 1;
        }
        busiest = busiest.max(i - j + 1);
    }
    assert!(
        busiest <= 200,
        "{busiest} requests arrived within one 10 s window (limit 200)"
    );
    // What the headroom costs (2.4 % of the rate) is measured by the unit test in `jobs::rate`,
    // not here: a rate achieved on a shared machine is no test.
}
