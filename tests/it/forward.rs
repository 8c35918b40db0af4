//! Forwarding to local handlers: bodies, headers, signatures, order, retries, replay.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sunopoll::config::{Config, SigningSecret};
use sunopoll::events::Stage;

use crate::helpers::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn short_schedule(c: &mut Config, delays_ms: &[u64]) {
    c.forward.retry_schedule = delays_ms
        .iter()
        .map(|ms| Duration::from_millis(*ms))
        .collect();
}

/// HMAC-SHA256 written out from its definition (RFC 2104), independent of the `hmac` crate
/// the daemon uses.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let inner: Vec<u8> = block
        .iter()
        .map(|b| b ^ 0x36)
        .chain(message.iter().copied())
        .collect();
    let inner = Sha256::digest(&inner);
    let outer: Vec<u8> = block
        .iter()
        .map(|b| b ^ 0x5c)
        .chain(inner.iter().copied())
        .collect();
    Sha256::digest(&outer).to_vec()
}

/// Verifies a request as a Standard Webhooks receiver would.
fn verify(r: &Received, secret: &str) -> bool {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secret");
    let signed = format!(
        "{}.{}.{}",
        r.header("webhook-id"),
        r.header("webhook-timestamp"),
        String::from_utf8_lossy(&r.body)
    );
    let expected = format!("v1,{}", engine.encode(hmac_sha256(&key, signed.as_bytes())));
    r.header("webhook-signature")
        .split(' ')
        .any(|s| s == expected)
}

async fn wait_for(receiver: &Receiver, n: usize) -> Vec<Received> {
    eventually(&format!("{n} deliveries"), || receiver.count() >= n).await;
    receiver.received()
}

fn stages_for(received: &[Received], task: &str) -> Vec<String> {
    received
        .iter()
        .filter(|r| r.task() == task)
        .map(Received::stage)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_gets_each_event_byte_for_byte_signed_with_stable_ids() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &EVERY_STAGE);
    api.script(
        "failing",
        vec![Reply::fixture_for(
            "record-info.GENERATE_AUDIO_FAILED.531.json",
            "failing",
        )],
    );
    let handler = Receiver::start().await;
    let url = handler.url();
    let mut d = TestDaemon::start(&api, |c| {
        let mut t = target("app", &url);
        t.secret = Some(SigningSecret::parse(SECRET).expect("secret"));
        t.headers = vec![("X-Team".into(), "music".into())];
        c.forward.targets.push(t);
    })
    .await;
    d.add(&[TASK, "failing"]).await;
    let received = wait_for(&handler, 4).await;
    assert_eq!(stages_for(&received, TASK), ["text", "first", "complete"]);
    assert_eq!(stages_for(&received, "failing"), ["error"]);

    // A handler has a request before the daemon has its answer recorded: wait for the record.
    let all_delivered = |_: &Value, events: &[Value]| {
        events
            .iter()
            .all(|e| e["deliveries"][0]["state"] != "pending")
    };
    d.show_until("failing", "its delivery recorded", all_delivered)
        .await;
    let (_, events) = d
        .show_until(TASK, "its deliveries recorded", all_delivered)
        .await;
    for (r, ev) in received.iter().filter(|r| r.task() == TASK).zip(&events) {
        // Byte-identical to the stored event, and a valid callback body.
        assert_eq!(r.body, compact(&ev["body"]).into_bytes());
        assert_eq!(r.header("content-type"), "application/json");
        assert!(
            r.header("user-agent").starts_with("sunopoll/"),
            "{}",
            r.header("user-agent")
        );
        assert_eq!(r.header("x-team"), "music");
        assert!(verify(r, SECRET), "signature of {}", r.stage());
        let ts: i64 = r.header("webhook-timestamp").parse().expect("unix seconds");
        assert!((ts - sunopoll::clock::now_ms() / 1000).abs() < 60);
        let delivery = &ev["deliveries"][0];
        assert_eq!(delivery["state"], "delivered");
        assert_eq!(
            r.header("webhook-id"),
            delivery["webhook_id"].as_str().unwrap_or("-")
        );
    }
    let bodies: Vec<Value> = received
        .iter()
        .filter(|r| r.task() == TASK)
        .map(Received::json)
        .collect();
    assert_eq!(bodies[0], fixture_json("callback.text.json"));
    assert_eq!(bodies[1], fixture_json("callback.first.json"));
    assert_eq!(bodies[2], fixture_json("callback.complete.json"));
    let error = received
        .iter()
        .find(|r| r.task() == "failing")
        .expect("error delivery");
    let mut want = fixture_json("callback.error.531.json");
    want["data"]["task_id"] = json!("failing");
    assert_eq!(error.json(), want);
    // A forged signature would not verify.
    let mut forged = error.clone();
    forged.body = b"{\"code\":200}".to_vec();
    assert!(!verify(&forged, SECRET));

    let status = d.request(json!({"cmd": "status"})).await;
    let app = &status["targets"][0];
    assert_eq!(
        (
            app["target"].as_str(),
            app["delivered"].as_i64(),
            app["pending"].as_i64()
        ),
        (Some("app"), Some(4), Some(0))
    );
    assert!(app["last_success_at"].is_string());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_down_for_several_attempts_then_up_gets_everything_once_in_order() {
    let api = FakeApi::start().await;
    let ids = ["down1", "down2"];
    for id in ids {
        api.script_statuses(id, &EVERY_STAGE);
    }
    let (port, bring_up) = dead_port();
    let url = format!("http://127.0.0.1:{port}/suno/callback");
    let mut d = TestDaemon::start(&api, |c| {
        c.forward.targets.push(target("app", &url));
        short_schedule(c, &[0, 150, 150, 150, 150, 150, 150, 150, 150, 150]);
    })
    .await;
    d.add(&ids).await;
    for id in ids {
        d.wait_state(id, "done").await;
    }
    // Wait until the first event has failed at least three times.
    let (_, events) = d
        .show_until("down1", "its first event retried", |_, events| {
            events[0]["deliveries"][0]["attempts"].as_u64().unwrap_or(0) >= 3
        })
        .await;
    let log = &events[0]["deliveries"][0]["attempt_log"][0];
    assert!(
        log["error"].as_str().unwrap_or("").contains("refused"),
        "{log}"
    );
    let handler = Receiver::start_on(bring_up()).await;
    let received = wait_for(&handler, 6).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let received_later = handler.received();
    assert_eq!(received_later.len(), 6, "each event exactly once");
    for id in ids {
        assert_eq!(
            stages_for(&received, id),
            ["text", "first", "complete"],
            "{id}"
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_never_overtakes_a_first_that_is_still_being_retried() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["FIRST_SUCCESS", "SUCCESS"]);
    let handler = Receiver::start().await;
    // text and first each fail twice; complete would be ready long before.
    handler.script(&[(500, Duration::ZERO), (500, Duration::ZERO)]);
    let url = handler.url();
    let mut d = TestDaemon::start(&api, |c| {
        c.forward.targets.push(target("app", &url));
        short_schedule(c, &[0, 300, 300, 300]);
    })
    .await;
    d.add(&[TASK]).await;
    let received = wait_for(&handler, 5).await;
    let stages: Vec<String> = received.iter().map(Received::stage).collect();
    assert_eq!(stages, ["text", "text", "text", "first", "complete"]);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_counts_as_failed_and_is_retried_with_the_same_id() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["TEXT_SUCCESS"]);
    let handler = Receiver::start().await;
    handler.script(&[(200, Duration::from_millis(1500))]);
    let url = handler.url();
    let mut d = TestDaemon::start(&api, |c| {
        let mut t = target("app", &url);
        t.timeout = Duration::from_millis(300);
        c.forward.targets.push(t);
        short_schedule(c, &[0, 200, 200]);
    })
    .await;
    d.add(&[TASK]).await;
    let received = wait_for(&handler, 2).await;
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id")
    );
    let (_, events) = d
        .show_until(TASK, "its event delivered", |_, events| {
            events[0]["deliveries"][0]["state"] == "delivered"
        })
        .await;
    let delivery = &events[0]["deliveries"][0];
    assert_eq!(delivery["attempts"], 2);
    let first = &delivery["attempt_log"][0];
    assert_eq!(first["outcome"], "retry");
    assert!(
        first["error"].as_str().unwrap_or("").contains("timeout"),
        "{first}"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_stops_that_event_for_that_target_at_once() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["TEXT_SUCCESS"]);
    let handler = Receiver::start().await;
    handler.always(410, Duration::ZERO);
    let url = handler.url();
    let mut d = TestDaemon::start(&api, |c| {
        c.forward.targets.push(target("app", &url));
        short_schedule(c, &[0, 100, 100, 100]);
    })
    .await;
    d.add(&[TASK]).await;
    wait_for(&handler, 1).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(handler.count(), 1, "410 is not retried");
    let (_, events) = d.show(TASK).await;
    let delivery = &events[0]["deliveries"][0];
    assert_eq!(delivery["state"], "failed");
    assert_eq!(delivery["last_status"], 410);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_does_not_hold_back_another() {
    let api = FakeApi::start().await;
    let ids: Vec<String> = (0..6).map(|i| format!("pair{i}")).collect();
    for id in &ids {
        api.script_statuses(id, &EVERY_STAGE);
    }
    let live = Receiver::start().await;
    // The dead one never answers within its timeout: it ties up its own slots only.
    let dead = Receiver::start().await;
    dead.always(200, Duration::from_secs(30));
    let (live_url, dead_url) = (live.url(), dead.url());
    let mut d = TestDaemon::start(&api, |c| {
        c.forward.targets.push(target("live", &live_url));
        let mut t = target("dead", &dead_url);
        t.timeout = Duration::from_secs(3);
        c.forward.targets.push(t);
        c.forward.max_in_flight = 6;
    })
    .await;
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    d.add(&refs).await;
    let started = Instant::now();
    let received = wait_for(&live, 18).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the live target waited for the dead one ({:?})",
        started.elapsed()
    );
    for id in &ids {
        assert_eq!(stages_for(&received, id), ["text", "first", "complete"]);
    }
    assert!(
        dead.count() <= sunopoll::jobs::deliver::PER_ORIGIN_IN_FLIGHT,
        "at most 4 at once to one handler"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_retry_schedule_resumes_it() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["TEXT_SUCCESS"]);
    let handler = Receiver::start().await;
    handler.script(&[(503, Duration::ZERO), (503, Duration::ZERO)]);
    let url = handler.url();
    let mut d = TestDaemon::start(&api, |c| {
        c.forward.targets.push(target("app", &url));
        short_schedule(c, &[0, 1500, 300, 300]);
    })
    .await;
    d.add(&[TASK]).await;
    wait_for(&handler, 1).await;
    let (dir, config) = (d.dir.clone(), d.config.clone());
    d.stop().await;
    let mut d = TestDaemon::start_in(dir, config).await;
    let received = wait_for(&handler, 3).await;
    assert!(
        received
            .iter()
            .all(|r| r.header("webhook-id") == received[0].header("webhook-id"))
    );
    assert!(
        received[1].at.duration_since(received[0].at) >= Duration::from_millis(1300),
        "the schedule was kept"
    );
    let (_, events) = d
        .show_until(TASK, "its event delivered", |_, events| {
            events[0]["deliveries"][0]["state"] == "delivered"
        })
        .await;
    let attempts: Vec<u64> = events[0]["deliveries"][0]["attempt_log"]
        .as_array()
        .expect("log")
        .iter()
        .map(|a| a["attempt"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        attempts,
        [1, 2, 3],
        "numbering continues across the restart"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliver_a_task_and_everything_failed_since_a_time() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &EVERY_STAGE);
    api.script_statuses("other", &["TEXT_SUCCESS"]);
    let handler = Receiver::start().await;
    let url = handler.url();
    let mut d = TestDaemon::start(&api, |c| {
        c.forward.targets.push(target("app", &url));
        short_schedule(c, &[0, 100]);
    })
    .await;
    d.add(&[TASK]).await;
    let first_round = wait_for(&handler, 3).await;

    // Replay one task: same bodies, same webhook-ids.
    let v = d
        .request(json!({"cmd": "redeliver", "task_id": TASK}))
        .await;
    assert_eq!(v["deliveries"], 3, "{v}");
    let all = wait_for(&handler, 6).await;
    for (a, b) in first_round.iter().zip(&all[3..]) {
        assert_eq!(a.header("webhook-id"), b.header("webhook-id"));
        assert_eq!(a.body, b.body);
    }

    // A handler that fails everything: the deliveries are given up...
    handler.always(500, Duration::ZERO);
    let since = sunopoll::clock::format_utc(sunopoll::clock::now_ms() - 1000);
    d.add(&["other"]).await;
    d.show_until("other", "its delivery given up", |_, events| {
        events
            .first()
            .is_some_and(|e| e["deliveries"][0]["state"] == "failed")
    })
    .await;
    let before = handler.count();
    // ...and replayed once the handler is fixed.
    handler.always(200, Duration::ZERO);
    let v = d
        .request(json!({"cmd": "redeliver", "failed_since": since, "target": "app"}))
        .await;
    assert_eq!(v["deliveries"], 1, "{v}");
    let all = wait_for(&handler, before + 1).await;
    assert_eq!(all.last().map(Received::task).as_deref(), Some("other"));
    let (_, events) = d
        .show_until("other", "the replay recorded", |_, events| {
            events[0]["deliveries"][0]["state"] != "pending"
        })
        .await;
    assert_eq!(events[0]["deliveries"][0]["state"], "delivered");

    // Bad replays are refused clearly.
    for (req, code) in [
        (json!({"cmd": "redeliver"}), "bad_request"),
        (
            json!({"cmd": "redeliver", "seq": 1, "task_id": TASK}),
            "bad_request",
        ),
        (json!({"cmd": "redeliver", "seq": 999}), "not_found"),
        (
            json!({"cmd": "redeliver", "task_id": TASK, "target": "nope"}),
            "not_found",
        ),
        (
            json!({"cmd": "redeliver", "failed_since": "yesterday"}),
            "bad_request",
        ),
    ] {
        let v = d.request(req.clone()).await;
        assert_eq!(v["error"]["code"], code, "{req}: {v}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_filter_and_a_per_task_callback_url() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &EVERY_STAGE);
    let finals = Receiver::start().await;
    let per_task = Receiver::start().await;
    let url = finals.url();
    let mut d = TestDaemon::start(&api, |c| {
        let mut t = target("finals", &url);
        t.stages = vec![Stage::Complete, Stage::Error];
        c.forward.targets.push(t);
    })
    .await;
    let v = d
        .request(json!({"cmd": "add", "task_ids": [TASK], "callback_url": per_task.url()}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let all = wait_for(&per_task, 3).await;
    assert_eq!(stages_for(&all, TASK), ["text", "first", "complete"]);
    let finals_got = wait_for(&finals, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(finals.count(), 1);
    assert_eq!(finals_got[0].stage(), "complete");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_task_callback_url_follows_allow_hosts() {
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    let allowed = String::from_utf8(fixture("record-info.SUCCESS.json"))
        .expect("utf8")
        .replace("https://hooks.example.com/suno/callback", &handler.url())
        .replace(TASK, "allowed");
    api.script("allowed", vec![Reply::raw(200, allowed)]);
    // The fixture's own callBackUrl (hooks.example.com) is not an allowed host.
    api.script_statuses("outside", &["SUCCESS"]);
    let mut d = TestDaemon::start(&api, |c| c.forward.use_task_callback_url = true).await;
    d.add(&["allowed", "outside"]).await;
    let received = wait_for(&handler, 3).await;
    assert_eq!(
        stages_for(&received, "allowed"),
        ["text", "first", "complete"]
    );
    let (_, events) = d.wait_state("outside", "done").await;
    assert!(
        events
            .iter()
            .all(|e| e["deliveries"].as_array().is_some_and(Vec::is_empty)),
        "nothing is forwarded to a host outside allow-hosts: {events:?}"
    );
    let (_, events) = d.show("allowed").await;
    assert_eq!(
        events[0]["deliveries"][0]["target"],
        "submitted-callback-url"
    );
    d.stop().await;
}
