//! The rough edges a new operator hits (issue 15), each seen through the real binary: a host
//! without CA certificates, a second daemon on the same store or socket, re-tracking a finished
//! task, starved control slots, `check-config`'s blind spots, `events --follow` across a
//! restart, JSON errors, `add -` parsing and per-task callback URLs.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::binary::*;
use crate::helpers::*;

/// Starts `d` and waits for it to exit by itself; returns its exit code and log.
async fn start_refused(d: &mut BinDaemon) -> (Option<i32>, String) {
    d.spawn();
    let started = Instant::now();
    while d.running() {
        assert!(
            started.elapsed() < PATIENCE,
            "the daemon started when it should have refused:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (d.exit_code(), d.log_text())
}

/// Rewrites one `key = "…"` line of `d`'s config file.
fn set_config_line(d: &BinDaemon, from: &str, to: &str) {
    let toml = std::fs::read_to_string(&d.config).expect("config");
    assert!(toml.contains(from), "{from} in {toml}");
    std::fs::write(&d.config, toml.replace(from, to)).expect("config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_system_ca_certificates_the_daemon_starts_on_the_bundled_roots_and_says_so_once() {
    let api = FakeApi::start().await;
    let mut config = BinConfig::new(&api.uri());
    // A forward target too, so both HTTP clients (the API's and the forwarder's) are built.
    let receiver = Receiver::start().await;
    config.targets.push(BinTarget::new("app", &receiver.url()));
    let mut d = BinDaemon::prepare(&config);
    let empty = d.dir.path().join("no-certs");
    std::fs::create_dir(&empty).expect("mkdir");
    // rustls-native-certs reads only these when either is set; both point at nothing.
    d.env = vec![
        (
            "SSL_CERT_FILE".to_owned(),
            path_str(&empty.join("none.pem")).to_owned(),
        ),
        ("SSL_CERT_DIR".to_owned(), path_str(&empty).to_owned()),
    ];
    d.restart().await;
    api.script_statuses("ca-1", &["SUCCESS"]);
    let v = d.request(json!({"cmd": "add", "task_ids": ["ca-1"]})).await;
    assert_eq!(v["ok"], true, "{v}");
    assert!(d.wait_finished(&["ca-1".to_owned()]).await, "polled");
    let log = d.stop().await;
    let warned = warnings_naming(&log, "no CA certificates could be loaded");
    assert_eq!(warned.len(), 1, "warned exactly once:\n{log}");
    assert!(
        warned[0].rest.contains("built into sunopoll"),
        "{}",
        warned[0].rest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_store_or_socket_exits_with_the_no_restart_status() {
    let api = FakeApi::start().await;
    let config = BinConfig::new(&api.uri());
    let mut first = BinDaemon::start(&config).await;

    // Same socket, its own store.
    let mut same_socket = BinDaemon::prepare(&config);
    set_config_line(
        &same_socket,
        "socket = \"run/sunopoll.sock\"",
        &format!("socket = \"{}\"", path_str(&first.socket)),
    );
    let (code, log) = start_refused(&mut same_socket).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("already listening"), "{log}");

    // Same store, its own socket.
    let mut same_store = BinDaemon::prepare(&config);
    set_config_line(
        &same_store,
        "path = \"state/sunopoll.db\"",
        &format!("path = \"{}\"", path_str(&first.store)),
    );
    let (code, log) = start_refused(&mut same_store).await;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("in use by another sunopoll daemon"), "{log}");

    // The first daemon is unaffected.
    assert_eq!(first.status().await["ok"], true);
    first.stop().await;
}

/// Waits until `id`'s state (from `list`) is `state`.
async fn wait_state(d: &BinDaemon, id: &str, state: &str) {
    let started = Instant::now();
    while d.states().await.get(id).map(String::as_str) != Some(state) {
        assert!(
            started.elapsed() < PATIENCE,
            "{id} never became {state}: {:?}\n{}",
            d.states().await,
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_again_polls_a_failed_task_once_more_keeping_its_events_and_no_stage_twice() {
    let api = FakeApi::start().await;
    let d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let id = "again-1";
    api.script_statuses(id, &["TEXT_SUCCESS", "GENERATE_AUDIO_FAILED"]);
    let out = d.cli(&["add", id]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_state(&d, id, "failed").await;
    let polls_when_failed = api.calls(id);

    // A plain add of a known ID changes nothing.
    let out = d.cli(&["add", id]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("known"),
        "{}",
        text(&out.stdout)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.calls(id), polls_when_failed, "not polled again");

    // --again: polled once more; the API now says it succeeded.
    api.script_statuses(id, &["SUCCESS"]);
    let out = d.cli(&["add", "--again", id]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("re-added"),
        "{}",
        text(&out.stdout)
    );
    wait_state(&d, id, "done").await;
    let stages: Vec<String> = d
        .events()
        .await
        .into_iter()
        .filter(|e| e.task == id)
        .map(|e| e.stage)
        .collect();
    assert_eq!(
        stages,
        ["text", "error", "first", "complete"],
        "kept, none twice"
    );

    // Failing again after --again: the first error stays the only one, and the task ends.
    let id2 = "again-2";
    api.script_statuses(id2, &["GENERATE_AUDIO_FAILED"]);
    d.request(json!({"cmd": "add", "task_ids": [id2]})).await;
    wait_state(&d, id2, "failed").await;
    // Counted before asking: the daemon may poll and fail the task again before this test,
    // on a loaded machine, gets to count after the answer.
    let polls = api.calls(id2);
    let v = d
        .request(json!({"cmd": "add", "task_ids": [id2], "again": true}))
        .await;
    assert_eq!(v["tasks"][0]["result"], "readded", "{v}");
    let started = Instant::now();
    while api.calls(id2) == polls || d.states().await.get(id2).map(String::as_str) != Some("failed")
    {
        assert!(started.elapsed() < PATIENCE, "{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let errors = d
        .events()
        .await
        .into_iter()
        .filter(|e| e.task == id2 && e.stage == "error")
        .count();
    assert_eq!(errors, 1);
    let mut d = d;
    let log = d.stop().await;
    assert!(!log.contains("already has"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_refuses_what_a_new_operator_gets_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |toml: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).expect("write");
        sunopoll(&["check-config", "--config", path_str(&path)])
    };
    for (toml, key, says) in [
        (
            "[control]\nmode = \"0666\"\n",
            "control.mode",
            "every local user",
        ),
        (
            "[control]\nmode = \"777\"\n",
            "control.mode",
            "every local user",
        ),
        ("[poll]\ninterval = \"1ms\"\n", "poll.interval", "minimum"),
        (
            "[api]\nbase-url = \"https://api.sunoapi.org/api/v1/generate\"\n",
            "api.base-url",
            "\"https://api.sunoapi.org\"",
        ),
    ] {
        let out = run(check(toml)).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{toml}: {err}");
        assert!(err.contains(key) && err.contains(says), "{toml}: {err}");
    }

    // A key file that cannot be read: the daemon would exit 2, so check-config says so.
    let key = dir.path().join("missing-key");
    let toml = format!("[api]\nkey-file = \"{}\"\n", path_str(&key));
    let out = run(check(&toml)).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("api.key-file") && err.contains("missing-key"),
        "{err}"
    );
    assert!(!text(&out.stdout).contains("\nok"), "{}", text(&out.stdout));
    std::fs::write(&key, "sk-a-readable-key-123\n").expect("write");
    let out = run(check(&toml)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("api key: found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_api_path_names_the_url_requested_and_api_base_url() {
    let api = FakeApi::start().await;
    // A base URL with a path the API does not have: wiremock answers 404.
    let mut d = BinDaemon::start(&BinConfig::new(&format!("{}/suno/", api.uri()))).await;
    d.request(json!({"cmd": "add", "task_ids": ["path-1"]}))
        .await;
    let started = Instant::now();
    while warnings_naming(&d.log_text(), "check api.base-url").is_empty() {
        assert!(started.elapsed() < PATIENCE, "{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = d.stop().await;
    let line = &warnings_naming(&log, "check api.base-url")[0];
    assert!(
        line.rest.contains(&format!(
            "GET {}/suno/api/v1/generate/record-info",
            api.uri()
        )),
        "{}",
        line.rest
    );
}

/// Runs `sunopoll args…` against `d` with `input` on standard input.
async fn cli_with_input(d: &BinDaemon, args: &[&str], input: String) -> std::process::Output {
    use std::io::Write as _;
    let mut all = args.to_vec();
    all.extend(["--socket", path_str(&d.socket)]);
    let mut child = sunopoll(&all)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    tokio::task::spawn_blocking(move || stdin.write_all(input.as_bytes()))
        .await
        .expect("join")
        .expect("write");
    output_by(child, Deadline::patience()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_from_stdin_takes_lines_skips_comments_refuses_commas_and_logs_one_line_per_request() {
    let api = FakeApi::start().await;
    let mut d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let out = cli_with_input(
        &d,
        &["add", "-"],
        "in-1\n\n# from the export, with, commas\nin-2 in-3  # trailing\n".to_owned(),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("3 added"),
        "{}",
        text(&out.stdout)
    );

    let out = cli_with_input(&d, &["add", "-"], "in-4\nin-5,in-6\n".to_owned()).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("line 2") && err.contains("comma"), "{err}");
    assert!(!d.states().await.contains_key("in-4"), "nothing was added");

    // 2 500 IDs: three requests (the CLI's batches), one log line each.
    let many: Vec<String> = (0..2500).map(|i| format!("bulk-{i:04}")).collect();
    let out = cli_with_input(&d, &["add", "-"], many.join("\n")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = d.stop().await;
    let lines: Vec<LogLine> = log_lines(&log)
        .into_iter()
        .filter(|l| l.rest.contains("tasks added"))
        .collect();
    assert_eq!(lines.len(), 4, "one line per request:\n{log}");
    assert_eq!(
        lines[0].field("task_ids").as_deref(),
        Some("in-1,in-2,in-3")
    );
    assert_eq!(lines[0].field("count").as_deref(), Some("3"));
    let counts: Vec<String> = lines[1..].iter().filter_map(|l| l.field("count")).collect();
    assert_eq!(counts, ["1000", "1000", "500"]);
    assert!(
        lines[1]
            .field("task_ids")
            .is_some_and(|ids| ids.starts_with("bulk-0000,") && ids.ends_with(",…")),
        "{}",
        lines[1].rest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_errors_are_json_on_stderr_with_the_same_exit_codes() {
    let api = FakeApi::start().await;
    let mut d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let err_json = |out: &std::process::Output| -> serde_json::Value {
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        serde_json::from_str(&err).unwrap_or_else(|e| panic!("not JSON ({e}): {err}"))
    };
    let out = d.cli(&["show", "no-such-task", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let v = err_json(&out);
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["code"], "not_found", "{v}");

    let out = d.cli(&["add", "bad id!", "--json"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(err_json(&out)["error"]["code"], "invalid_task_id");

    let gone = d.dir.path().join("nothing-here.sock");
    let out = run(sunopoll(&["status", "--json", "--socket", path_str(&gone)])).await;
    assert_eq!(out.status.code(), Some(3));
    let v = err_json(&out);
    assert_eq!(v["error"]["code"], "unreachable", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("nothing-here.sock")
    );

    // Without --json, the same errors stay text.
    let out = d.cli(&["show", "no-such-task"]).await;
    assert!(
        text(&out.stderr).starts_with("sunopoll: "),
        "{}",
        text(&out.stderr)
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_task_callback_url_must_be_on_an_allowed_host_and_pending_deliveries_can_be_cancelled()
 {
    let api = FakeApi::start().await;
    let mut d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let out = d
        .cli(&[
            "add",
            "cb-1",
            "--callback-url",
            "http://203.0.113.7:8080/hook",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains("203.0.113.7") && err.contains("forward.allow-hosts"),
        "{err}"
    );
    assert!(!d.states().await.contains_key("cb-1"), "not added");

    // An allowed host whose handler has no such route: retried, logged as a wrong URL, and
    // cancelled on request.
    let receiver = Receiver::start().await;
    receiver.always(404, Duration::ZERO);
    api.script_statuses("cb-2", &["SUCCESS"]);
    let out = d
        .cli(&["add", "cb-2", "--callback-url", &receiver.url()])
        .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let started = Instant::now();
    while receiver.count() < 2 {
        assert!(started.elapsed() < PATIENCE, "{}", d.log_text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let out = d.cli(&["deliveries", "cancel", "--task", "cb-2"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("pending deliver") && text(&out.stdout).contains("cancelled"),
        "{}",
        text(&out.stdout)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = receiver.count();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.count(), after, "no more attempts after the cancel");
    let v = d.request(json!({"cmd": "show", "task_id": "cb-2"})).await;
    let deliveries: Vec<serde_json::Value> = v["events"]
        .as_array()
        .expect("events")
        .iter()
        .flat_map(|e| e["deliveries"].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(!deliveries.is_empty(), "{v}");
    assert!(
        deliveries.iter().all(|d| d["state"] == "failed"),
        "every delivery given up: {v}"
    );
    let v = d.request(json!({"cmd": "cancel", "task_id": "cb-2"})).await;
    assert_eq!(v, json!({"ok": true, "cancelled": 0}));
    let v = d.request(json!({"cmd": "cancel"})).await;
    assert_eq!(v["error"]["code"], "bad_request", "{v}");
    let log = d.stop().await;
    assert!(
        !warnings_naming(&log, "check the target URL").is_empty(),
        "a 404 from the handler says what to check:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_reconnects_across_a_daemon_restart_and_resumes_after_the_last_event() {
    use std::io::BufRead as _;
    let api = FakeApi::start().await;
    let mut d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let mut follower = sunopoll(&[
        "events",
        "--follow",
        "--json",
        "--socket",
        path_str(&d.socket),
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("spawn");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    fn take(rx: &std::sync::mpsc::Receiver<String>, n: usize) -> Vec<serde_json::Value> {
        let mut got = Vec::new();
        while got.len() < n {
            let line = rx.recv_timeout(PATIENCE).expect("an event line in time");
            got.push(serde_json::from_str(&line).expect("JSON"));
        }
        got
    }
    // Let the follower pin "now" before the first event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.script_statuses("follow-1", &["SUCCESS"]);
    d.request(json!({"cmd": "add", "task_ids": ["follow-1"]}))
        .await;
    let (first, rx) = tokio::task::spawn_blocking(move || (take(&rx, 3), rx))
        .await
        .expect("join");
    d.stop().await;
    d.restart().await;
    api.script_statuses("follow-2", &["SUCCESS"]);
    d.request(json!({"cmd": "add", "task_ids": ["follow-2"]}))
        .await;
    let second = tokio::task::spawn_blocking(move || take(&rx, 3))
        .await
        .expect("join");
    let seqs: Vec<i64> = first
        .iter()
        .chain(&second)
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6], "none missed or printed twice");
    assert!(second.iter().all(|e| e["task_id"] == "follow-2"));
    let _ = follower.kill();
    let _ = follower.wait();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_path_prints_the_clients_socket_and_the_readme_one_liners_use_it() {
    let api = FakeApi::start().await;
    let mut d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let out = run(sunopoll(&["socket-path", "--config", path_str(&d.config)])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), path_str(&d.socket));
    let mut with_env = sunopoll(&["socket-path"]);
    with_env.env("SUNOPOLL_SOCKET", "/x/y.sock");
    let out = run(with_env).await;
    assert_eq!(text(&out.stdout).trim(), "/x/y.sock");

    // The README's Python one-liner, run as written, with `sunopoll` on the PATH.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let lines: Vec<&str> = readme.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("python3 -c 'import json,socket"))
        .expect("the Python one-liner");
    let command = format!("{}\n{}", lines[at], lines[at + 1]);
    assert!(command.contains("$(sunopoll socket-path)"), "{command}");
    let bin_dir = std::path::Path::new(BIN).parent().expect("dir");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok()
    {
        let mut bash = std::process::Command::new("bash");
        bash.args(["-c", &command])
            .env("PATH", path)
            .env("SUNOPOLL_SOCKET", &d.socket);
        let out = run(bash).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(&text(&out.stdout)).expect("JSON");
        assert_eq!(v["added"], 1, "{v}");
    }
    d.stop().await;
}
