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
    let v = d
        .request(json!({"cmd": "add", "task_ids": [id2], "again": true}))
        .await;
    assert_eq!(v["tasks"][0]["result"], "readded", "{v}");
    let polls = api.calls(id2);
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
