//! The control socket: protocol, bad input, permissions, events streaming.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_while_a_normal_client_keeps_working() {
    let api = FakeApi::start().await;
    let mut d = TestDaemon::start(&api, |c| {
        c.control.idle_timeout = Duration::from_millis(500)
    })
    .await;
    let socket = d.socket();

    // A client that sends half a line and then nothing: it holds a connection open.
    let mut silent = RawClient::connect(&socket).await;
    silent.send_bytes(b"{\"cmd\":\"sta").await.expect("write");

    // Garbage bytes, then a newline.
    let mut garbage = RawClient::connect(&socket).await;
    garbage
        .send_bytes(b"\x00\xff\xfe garbage \x1b[31m\n")
        .await
        .expect("write");
    let v = garbage.read_json().await.expect("answer");
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], "invalid_json");
    // The same connection is still usable after a bad line.
    garbage.send_line(r#"{"cmd":"status"}"#).await;
    assert_eq!(garbage.read_json().await.expect("answer")["ok"], true);

    // Invalid JSON, unknown command, bad IDs, bad label.
    for (line, code) in [
        ("{\"cmd\": ", "invalid_json"),
        (r#"{"cmd":"launch"}"#, "unknown_command"),
        (r#"{"task_ids":["a"]}"#, "bad_request"),
        (
            r#"{"cmd":"add","task_ids":["ok-1","bad id","x\ny"]}"#,
            "invalid_task_id",
        ),
        (r#"{"cmd":"add","task_ids":[]}"#, "invalid_task_id"),
        (
            r#"{"cmd":"add","task_ids":["ok"],"label":"two\nlines"}"#,
            "invalid_label",
        ),
        (
            r#"{"cmd":"add","task_ids":["ok"],"callback_url":"file:///etc/passwd"}"#,
            "invalid_callback_url",
        ),
        (r#"{"cmd":"show","task_id":"nope"}"#, "not_found"),
        (r#"{"cmd":"list","state":"sleeping"}"#, "bad_request"),
    ] {
        let mut c = RawClient::connect(&socket).await;
        c.send_line(line).await;
        let v = c.read_json().await.expect("answer");
        assert_eq!(v["ok"], false, "{line}");
        assert_eq!(v["error"]["code"], code, "{line}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let mut c = RawClient::connect(&socket).await;
    c.send_line(r#"{"cmd":"add","task_ids":["ok-1","bad id","x\ny"]}"#)
        .await;
    let msg = c.read_json().await.expect("answer")["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        msg.contains("\"bad id\"") && msg.contains("x\\ny"),
        "each bad ID is named: {msg}"
    );
    assert!(!msg.contains('\n'));

    // A line over 64 KiB.
    let mut big = RawClient::connect(&socket).await;
    let _ = big.send_bytes(&vec![b'a'; 70 * 1024]).await;
    let v = big.read_json().await.expect("answer");
    assert_eq!(v["error"]["code"], "line_too_long");

    // Through all of that, normal clients are served.
    d.add(&["normal-task"]).await;
    let v = d.request(json!({"cmd": "list"})).await;
    assert_eq!(v["ok"], true);
    assert!(
        v["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .any(|t| t["task_id"] == "normal-task")
    );
    // Nothing bad was added.
    assert_eq!(v["tasks"].as_array().expect("tasks").len(), 1);

    // The silent client is told off and disconnected after the idle timeout.
    let v = silent.read_json().await.expect("timeout answer");
    assert_eq!(v["error"]["code"], "timeout");
    assert!(
        silent.read_json().await.is_none(),
        "closed after the timeout"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_reports_known_ids_and_does_not_reset_them() {
    let api = FakeApi::start().await;
    api.script_statuses(TASK, &["TEXT_SUCCESS"]);
    let mut d = TestDaemon::start(&api, |_| {}).await;
    let v = d.add(&[TASK, TASK, "other"]).await;
    assert_eq!(v["added"], 2, "duplicates in one request count once: {v}");
    eventually("text reached", || api.calls(TASK) >= 2).await;
    let v = d
        .request(json!({"cmd": "add", "task_ids": [TASK], "label": "new label"}))
        .await;
    assert_eq!(v["added"], 0);
    assert_eq!(v["existing"], 1);
    assert_eq!(v["tasks"][0]["result"], "exists");
    assert_eq!(v["tasks"][0]["stage"], "text");
    let (task, _) = d.show(TASK).await;
    assert_eq!(
        task["label"],
        serde_json::Value::Null,
        "a known task is not changed"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_private_by_default_and_follows_control_mode() {
    let api = FakeApi::start().await;
    let mut d = TestDaemon::start(&api, |_| {}).await;
    let mode = std::fs::metadata(d.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    d.stop().await;
    assert!(
        !d.socket().exists(),
        "the socket file is removed at shutdown"
    );

    let mut d = TestDaemon::start(&api, |c| {
        c.control.mode = 0o660;
        c.control.group = Some(format!(
            "{}",
            std::fs::metadata("/proc/self")
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.gid()
                })
                .expect("gid")
        ));
    })
    .await;
    let mode = std::fs::metadata(d.socket())
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_socket_is_refused_and_a_stale_socket_replaced() {
    let api = FakeApi::start().await;
    let mut first = TestDaemon::start(&api, |_| {}).await;
    let mut config = first.config.clone();
    config.store.path = first.dir.path().join("other.db");
    let e = refused_start(&config).await;
    assert!(e.contains("already listening"), "{e}");
    // A refused start has let go of the store it opened (its lock is free at once), so the
    // start below cannot find that store "in use" by a daemon that never started.
    let lock = std::fs::File::open(&config.store.path).expect("store file");
    lock.try_lock()
        .expect("the refused daemon released the store lock before returning");
    drop(lock);
    // The first daemon is unaffected.
    assert_eq!(first.request(json!({"cmd": "status"})).await["ok"], true);

    // A socket file nobody listens on is replaced.
    let dir = first.dir.clone();
    first.stop().await;
    let stale = std::os::unix::net::UnixListener::bind(&config.control.socket).expect("bind");
    drop(stale);
    assert!(config.control.socket.exists());
    let mut second = TestDaemon::start_in(dir, config).await;
    assert_eq!(second.request(json!({"cmd": "status"})).await["ok"], true);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_a_socket_is_never_deleted() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_config(dir.path(), &api.uri());
    std::fs::create_dir_all(config.control.socket.parent().expect("parent")).expect("mkdir");
    std::fs::write(&config.control.socket, "precious").expect("write");
    config.store.path = dir.path().join("q.db");
    let e = refused_start(&config).await;
    assert!(e.contains("is not a socket"), "{e}");
    assert_eq!(
        std::fs::read_to_string(&config.control.socket).expect("read"),
        "precious"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_streams_new_events_and_since_replays() {
    let api = FakeApi::start().await;
    api.script_statuses(
        TASK,
        &[
            "PENDING",
            "PENDING",
            "TEXT_SUCCESS",
            "FIRST_SUCCESS",
            "SUCCESS",
        ],
    );
    let mut d = TestDaemon::start(&api, |_| {}).await;
    let mut follower = RawClient::connect(&d.socket()).await;
    follower
        .send_line(r#"{"cmd":"events","follow":true}"#)
        .await;
    d.add(&[TASK]).await;
    let mut streamed = Vec::new();
    let deadline = Deadline::patience();
    for _ in 0..3 {
        let v = follower.read_json_by(deadline).await.expect("event");
        assert_eq!(v["ok"], true);
        streamed.push(v["event"].clone());
    }
    let stages: Vec<&str> = streamed
        .iter()
        .map(|e| e["stage"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(stages, ["text", "first", "complete"]);
    assert_eq!(streamed[2]["body"], fixture_json("callback.complete.json"));

    // One-off listing with --since.
    let v = d
        .request(json!({"cmd": "events", "since": streamed[0]["seq"]}))
        .await;
    let seqs: Vec<i64> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["seq"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(
        seqs,
        [
            streamed[1]["seq"].as_i64().unwrap_or(0),
            streamed[2]["seq"].as_i64().unwrap_or(0)
        ]
    );
    assert_eq!(v["more"], false);
    // A follower that starts with --since gets the backlog first.
    let mut late = RawClient::connect(&d.socket()).await;
    late.send_line(r#"{"cmd":"events","follow":true,"since":0}"#)
        .await;
    let deadline = Deadline::patience();
    for want in ["text", "first", "complete"] {
        assert_eq!(
            late.read_json_by(deadline).await.expect("event")["event"]["stage"],
            want
        );
    }
    d.stop().await;
    assert!(
        late.read_json()
            .await
            .is_none_or(|v| v["error"]["code"] == "shutting_down")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_at_once_are_all_served() {
    let api = FakeApi::start().await;
    let mut d = TestDaemon::start(&api, |_| {}).await;
    let socket = d.socket();
    let mut joins = Vec::new();
    for i in 0..200 {
        let socket = socket.clone();
        joins.push(tokio::spawn(async move {
            let mut c = RawClient::connect(&socket).await;
            c.send_line(&json!({"cmd": "add", "task_ids": [format!("crowd{i}")]}).to_string())
                .await;
            c.read_json().await.expect("answer")["ok"] == true
        }));
    }
    for j in joins {
        assert!(j.await.expect("join"));
    }
    let v = d.request(json!({"cmd": "status"})).await;
    assert_eq!(
        v["tasks"]["active"].as_i64().unwrap_or(0) + v["tasks"]["done"].as_i64().unwrap_or(0),
        200
    );
    d.stop().await;
}
