//! Security checks against the real binary:
//!
//! - the API key and the forward secrets never appear in anything the daemon or the CLI prints,
//!   even when the API and a handler echo them back in their answers (every other suite scans
//!   its daemon's log and CLI output too: see `binary::assert_no_secrets`);
//! - the control socket is not reachable by other users unless configured (mode and group,
//!   checked by connecting as another user);
//! - task IDs, labels and callback URLs with control characters or newlines are refused, and
//!   nothing from the API or a handler can forge a log line;
//! - `use-task-callback-url` refuses hosts outside `allow-hosts`, however the URL is dressed up.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use serde_json::json;

use crate::binary::*;
use crate::figures::Row;
use crate::helpers::*;

/// A handler that refuses every request and echoes the `Authorization` header it got, as some
/// frameworks' error pages do.
struct EchoAuthorization;

impl wiremock::Respond for EchoAuthorization {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let auth = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        wiremock::ResponseTemplate::new(500)
            .set_body_string(format!("rejected: authorization={auth}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_echoed_by_the_api_and_a_handler_never_reach_any_output() {
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    handler.always(500, Duration::ZERO);
    let echo = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(EchoAuthorization)
        .mount(&echo)
        .await;
    // Tasks whose answers echo the API key: in an error message, a broken body, a rejection.
    let key_echo = format!("invalid token Bearer {KEY}");
    api.script_statuses("echo-ok", &["SUCCESS"]);
    api.script(
        "echo-broken",
        vec![Reply::raw(200, format!("<html>{key_echo}</html>"))],
    );
    api.script(
        "echo-rejected",
        vec![Reply::raw(
            200,
            json!({"code": 422, "msg": key_echo, "data": null}).to_string(),
        )],
    );
    api.script(
        "echo-failed",
        vec![Reply::raw(
            200,
            json!({"code": 200, "msg": "success", "data": {"taskId": "echo-failed",
                   "status": "GENERATE_AUDIO_FAILED", "errorCode": 501, "errorMessage": key_echo}})
            .to_string(),
        )],
    );
    let mut config = BinConfig::new(&api.uri());
    config.log_level = "debug".to_owned();
    config.backoff_max = "300ms".to_owned();
    config.schedule_ms(&[0, 50, 50, 50]);
    config.targets.push(BinTarget::new("app", &handler.url()));
    config
        .targets
        .push(BinTarget::new("echo", &format!("{}/cb", echo.uri())));
    let mut d = BinDaemon::start(&config).await;

    let ids = ["echo-ok", "echo-broken", "echo-rejected", "echo-failed"];
    let v = d
        .request(json!({"cmd": "add", "task_ids": ids, "callback_url": handler.url()}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    d.wait_finished(&[
        "echo-ok".into(),
        "echo-rejected".into(),
        "echo-failed".into(),
    ])
    .await;
    // A key rejected outright, with the key echoed back.
    api.set_override(Some(Reply::raw(
        401,
        json!({"code": 401, "msg": key_echo}).to_string(),
    )));
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Everything an operator can look at.
    let mut printed = String::new();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["list"],
        vec!["list", "--json"],
        vec!["events", "--json"],
        vec!["show", "echo-ok"],
        vec!["show", "echo-ok", "--json"],
        vec!["show", "echo-broken", "--json"],
        vec!["show", "echo-rejected", "--json"],
        vec!["show", "echo-failed", "--json"],
    ] {
        let out = d.cli(&args).await;
        printed.push_str(&text(&out.stdout));
        printed.push_str(&text(&out.stderr));
    }
    let mut check = sunopoll(&["check-config", "--config", path_str(&d.config)]);
    check.env("SUNO_API_KEY", KEY);
    let check = run(check).await;
    assert!(check.status.success(), "{}", text(&check.stderr));
    printed.push_str(&text(&check.stdout));
    api.set_override(None);
    let log = d.stop().await;
    assert_no_secrets(&printed, "the CLI");
    assert_no_secrets(&log, "the daemon's log");
    // The handler did receive the per-target token (it is meant for it), signed requests, and
    // never the API key.
    let received = handler.received();
    assert!(!received.is_empty());
    for r in &received {
        assert!(!r.headers.values().any(|v| v.contains(KEY)));
    }
    let echoed = echo.received_requests().await.unwrap_or_default();
    assert!(
        echoed.iter().any(|r| r
            .headers
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap_or("").contains(HEADER_TOKEN))),
        "the echoing handler was called with its token"
    );
    let mut row =
        Row::new("security: API key and forward secrets echoed back by the API and a handler");
    row.runs = 1;
    row.recovered = true;
    row.note = format!(
        "{} KiB of log and CLI output scanned here, {} KiB across every suite run in this process: no secret",
        (printed.len() + log.len()) / 1024,
        SCANNED_BYTES.load(std::sync::atomic::Ordering::Relaxed) / 1024
    );
    row.report_and_check();
}

/// Runs `sunopoll status` against `socket` as another user; returns the exit code.
async fn status_as(socket: &std::path::Path, uid: u32, gid: u32, binary: &std::path::Path) -> i32 {
    let mut cmd = std::process::Command::new(binary);
    cmd.args(["status", "--socket", path_str(socket)])
        .env_clear()
        .uid(uid)
        .gid(gid);
    run(cmd).await.status.code().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_not_reachable_by_other_users_unless_configured() {
    if sunopoll::config::current_uid() != 0 {
        println!("SKIPPED socket access by other users: not running as root, cannot switch user");
        let mut row =
            Row::new("security: socket access by other users (not tested here: not root)");
        row.runs = 0;
        row.recovered = true;
        row.report_and_check();
        return;
    }
    let api = FakeApi::start().await;
    // Other users need to reach the binary and traverse to the socket, so that only the
    // socket's own mode and group decide.
    let public = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let binary = public.path().join("sunopoll");
    std::fs::copy(BIN, &binary).expect("copy the binary");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (nobody, nogroup, stranger) = (65534, 65534, 65533);

    let mut results = Vec::new();
    for (mode, group, who, gid, reachable) in [
        ("0600", None, nobody, nogroup, false),
        ("0660", Some(nogroup), nobody, nogroup, true),
        ("0660", Some(nogroup), stranger, stranger, false),
    ] {
        let mut config = BinConfig::new(&api.uri());
        config.extra = String::new();
        let mut d = BinDaemon::prepare(&config);
        let mut toml = std::fs::read_to_string(&d.config).expect("config");
        toml = toml.replace(
            "idle-timeout",
            &format!(
                "mode = \"{mode}\"\n{}idle-timeout",
                group.map_or(String::new(), |g| format!("group = {g}\n"))
            ),
        );
        std::fs::write(&d.config, toml).expect("config");
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::create_dir_all(d.dir.path().join("run")).expect("mkdir");
        std::fs::set_permissions(
            d.dir.path().join("run"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        d.restart().await;
        let meta = std::fs::metadata(&d.socket).expect("socket");
        assert_eq!(
            format!("{:04o}", meta.permissions().mode() & 0o777),
            mode,
            "the socket has the configured mode"
        );
        let code = status_as(&d.socket, who, gid, &binary).await;
        if reachable {
            assert_eq!(
                code, 0,
                "uid {who} should reach a {mode} socket (group {group:?})"
            );
        } else {
            assert_eq!(
                code, 3,
                "uid {who} must not reach a {mode} socket (group {group:?})"
            );
        }
        results.push(format!(
            "{mode}{}: uid {who} {}",
            group.map_or(String::new(), |g| format!("+group {g}")),
            if reachable {
                "served"
            } else {
                "refused (exit 3)"
            }
        ));
        d.stop().await;
    }
    // A world-writable mode would let every local user in: the daemon refuses to start on it
    // (exit 2, which systemd does not restart), naming the key, and creates no socket.
    for mode in ["0666", "777"] {
        let mut d = BinDaemon::prepare(&BinConfig::new(&api.uri()));
        let toml = std::fs::read_to_string(&d.config).expect("config");
        let toml = toml.replace("idle-timeout", &format!("mode = \"{mode}\"\nidle-timeout"));
        std::fs::write(&d.config, toml).expect("config");
        d.spawn();
        let deadline = Deadline::patience();
        while d.running() {
            assert!(
                !deadline.passed(),
                "started on mode {mode}:\n{}",
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(d.exit_code(), Some(2), "{}", d.log_text());
        assert!(d.log_text().contains("control.mode"), "{}", d.log_text());
        assert!(!d.socket.exists(), "no socket for mode {mode}");
        results.push(format!("{mode}: refused at start (exit 2)"));
    }
    let mut row = Row::new("security: control socket mode and group, other users connecting");
    row.runs = results.len();
    row.recovered = true;
    row.note = results.join("; ");
    row.report_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_refused_and_nothing_forges_a_log_line() {
    let api = FakeApi::start().await;
    // The API and a handler try too: a status, a message and an error body with line breaks.
    let forged = "\n2026-01-01T00:00:00.000000Z ERROR FORGED line";
    api.script(
        "weird-status",
        vec![
            Reply::raw(
                200,
                json!({"code": 200, "msg": "success",
                       "data": {"taskId": "weird-status", "status": format!("MYSTERY{forged}")}})
                .to_string(),
            ),
            Reply::fixture_for("record-info.SUCCESS.json", "weird-status"),
        ],
    );
    api.script(
        "weird-reject",
        vec![Reply::raw(
            200,
            json!({"code": 404, "msg": format!("no such task{forged}")}).to_string(),
        )],
    );
    api.script(
        "weird-body",
        vec![
            Reply::raw(503, format!("busy{forged}")),
            Reply::fixture_for("record-info.SUCCESS.json", "weird-body"),
        ],
    );
    let handler = Receiver::start().await;
    handler.script(&[(500, Duration::ZERO)]);
    let mut config = BinConfig::new(&api.uri());
    config.backoff_max = "300ms".to_owned();
    config.targets.push(BinTarget::new("app", &handler.url()));
    let mut d = BinDaemon::start(&config).await;

    let bad: Vec<serde_json::Value> = vec![
        json!({"cmd": "add", "task_ids": [format!("abc{forged}")]}),
        json!({"cmd": "add", "task_ids": ["abc\r\ndef"]}),
        json!({"cmd": "add", "task_ids": ["tab\there"]}),
        json!({"cmd": "add", "task_ids": ["esc\u{1b}[31mred"]}),
        json!({"cmd": "add", "task_ids": ["nul\u{0}byte"]}),
        json!({"cmd": "add", "task_ids": ["ünïcödé"]}),
        json!({"cmd": "add", "task_ids": ["ok-id"], "label": format!("label{forged}")}),
        json!({"cmd": "add", "task_ids": ["ok-id"], "label": "bell\u{7}"}),
        json!({"cmd": "add", "task_ids": ["ok-id"], "label": "del\u{7f}"}),
        json!({"cmd": "add", "task_ids": ["ok-id"], "label": "next-line\u{85}here"}),
        json!({"cmd": "add", "task_ids": ["ok-id"], "callback_url": format!("http://127.0.0.1:9/cb{forged}")}),
        json!({"cmd": "add", "task_ids": ["ok-id"], "callback_url": "http://127.0.0.1:9/c\tb"}),
        json!({"cmd": "show", "task_id": format!("x{forged}")}),
        json!({"cmd": "remove", "task_id": "x\ny"}),
        json!({"cmd": "events", "task_id": "x\ny"}),
        json!({"cmd": "redeliver", "task_id": "x\ny"}),
        json!({"cmd": format!("status{forged}")}),
    ];
    for req in &bad {
        let v = d.request(req.clone()).await;
        assert_eq!(v["ok"], false, "{req} was accepted: {v}");
        assert!(!v.to_string().contains('\n'), "one-line answer");
    }
    // The CLI refuses the same before it even connects.
    let out = d.cli(&["add", "abc\ndef"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = d.cli(&["add", "ok-id", "--label", "a\nb"]).await;
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(d.states().await.len(), 0, "nothing was added");

    let v = d
        .request(json!({"cmd": "add", "task_ids": ["weird-status", "weird-reject", "weird-body"]}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    d.wait_finished(&[
        "weird-status".into(),
        "weird-reject".into(),
        "weird-body".into(),
    ])
    .await;
    assert!(d.settle(&["weird-status".into()]).await);
    let human = d.cli(&["show", "weird-reject"]).await;
    let log = d.stop().await;
    for (what, out) in [("the log", &log), ("show", &text(&human.stdout))] {
        for line in out.lines() {
            // The text may appear inside a real line (its line break turned into a space);
            // it must never start one.
            assert!(
                !line.trim_start().starts_with("2026-01-01T00:00:00.000000Z")
                    && !line.trim_start().starts_with("ERROR FORGED"),
                "{what} has a forged line: {line:?}"
            );
        }
    }
    assert!(
        log_lines(&log).len() == log.lines().count(),
        "every log line is a real log line"
    );
    let mut row = Row::new(
        "security: control characters in IDs, labels, URLs; forged lines from API and handler",
    );
    row.runs = bad.len() + 2 + 3;
    row.recovered = true;
    row.note = format!(
        "{} bad requests refused, 3 hostile API answers and a handler error logged on one line each",
        bad.len() + 2
    );
    row.report_and_check();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_task_callback_url_refuses_hosts_outside_allow_hosts() {
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    let port = handler.server.address().port();
    // `.invalid` never resolves (RFC 2606): even a wrong decision cannot leave this machine.
    let outside = [
        "http://evil.invalid/cb".to_owned(),
        format!("http://127.0.0.1@evil.invalid:{port}/cb"),
        format!("http://localhost.evil.invalid:{port}/cb"),
        format!("http://127.0.0.1.evil.invalid:{port}/cb"),
        format!("http://evil.invalid:{port}/cb#@127.0.0.1"),
        format!("http://evil.invalid:{port}/cb?host=127.0.0.1"),
        format!("http://[::ffff:7f00:1]:{port}/cb"),
        "file:///etc/passwd".to_owned(),
        format!("ftp://127.0.0.1:{port}/cb"),
        "javascript:alert(1)".to_owned(),
    ];
    let inside = [
        handler.url(),
        format!("http://LOCALHOST:{port}/upper"),
        format!("http://evil.invalid@127.0.0.1:{port}/userinfo"),
    ];
    let mut ids = Vec::new();
    for (i, url) in outside.iter().chain(&inside).enumerate() {
        let id = format!("cb{i:02}");
        let body = String::from_utf8(fixture("record-info.SUCCESS.json"))
            .expect("utf8")
            .replace("https://hooks.example.com/suno/callback", url)
            .replace(TASK, &id);
        api.script(&id, vec![Reply::raw(200, body)]);
        ids.push(id);
    }
    let mut config = BinConfig::new(&api.uri());
    config.forward_extra = "use-task-callback-url = true\n".to_owned();
    let mut d = BinDaemon::start(&config).await;
    d.request(json!({"cmd": "add", "task_ids": ids})).await;
    assert!(d.settle(&ids).await);
    let mut routed = Vec::new();
    for id in &ids {
        let v = d.request(json!({"cmd": "show", "task_id": id})).await;
        routed.push(v["events"][0]["deliveries"].as_array().map_or(0, Vec::len));
    }
    let log = d.stop().await;
    for (i, url) in outside.iter().enumerate() {
        assert_eq!(
            routed[i], 0,
            "{url} is outside allow-hosts but got a delivery"
        );
    }
    for (i, url) in inside.iter().enumerate() {
        assert_eq!(
            routed[outside.len() + i],
            1,
            "{url} is allowed but got no delivery"
        );
    }
    let refused = warnings_naming(&log, "allow-hosts").len();
    assert!(
        refused >= outside.len() - 3,
        "each refusal is logged at warn ({refused})"
    );
    let received = handler.received();
    assert_eq!(
        received.len(),
        inside.len() * 3,
        "only allowed URLs were called"
    );
    let mut row = Row::new("security: use-task-callback-url with hosts outside allow-hosts");
    row.runs = outside.len() + inside.len();
    row.recovered = true;
    row.note = format!(
        "{} disguised outside URLs refused (and logged), {} loopback spellings allowed",
        outside.len(),
        inside.len()
    );
    row.report_and_check();
}
