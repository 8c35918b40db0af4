//! SIGHUP reloads the config of the real binary (issue 10): the request rate, the API key
//! and the forward targets change while it runs; an invalid file keeps the running config; and
//! after the API rejects the key, each probe re-reads the key file without any signal.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::binary::{BinConfig, BinTarget, kill_pid, sunopoll, terminate};
use crate::helpers::*;

/// The config file: `config` with `key-file` pointing at `key`.
fn write(path: &Path, config: &BinConfig, key: &Path) {
    let text = config.to_toml().replacen(
        "[api]\n",
        &format!("[api]\nkey-file = \"{}\"\n", key.display()),
        1,
    );
    std::fs::write(path, text).expect("write config");
}

/// Requests that arrived within the last `window`.
fn recent(api: &TimedApi, window: Duration) -> usize {
    let now = Instant::now();
    api.arrivals()
        .iter()
        .filter(|(at, _)| now.duration_since(*at) <= window)
        .count()
}

fn bearer(api: &impl ScriptedApi, key: &str) -> bool {
    api.auth_headers()
        .iter()
        .any(|h| h == &format!("Bearer {key}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rate_key_and_targets_and_keeps_running_on_a_bad_file() {
    let api = TimedApi::start().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("api-key");
    std::fs::write(&key, "sk-old-key-1\n").expect("key");
    let config_path = dir.path().join("config.toml");
    let mut config = BinConfig::new(&api.uri());
    config.rps = "2".to_owned();
    write(&config_path, &config, &key);
    let log = dir.path().join("daemon.log");
    let socket = dir.path().join("run/sunopoll.sock");
    let mut child = sunopoll(&["daemon", "--config", config_path.to_str().expect("utf-8")])
        .current_dir(dir.path())
        .env("SUNO_API_KEY", KEY)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn sunopoll");
    wait_for_socket(&mut child, &socket, &log).await;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let request = |v: Value| {
        let socket = socket.clone();
        async move {
            let mut c = RawClient::connect(&socket).await;
            c.send_line(&v.to_string()).await;
            c.read_json().await.expect("an answer")
        }
    };
    let ids = ["hup-a", "hup-b", "hup-c", "hup-d"];
    let added = request(json!({"cmd": "add", "task_ids": ids})).await;
    assert_eq!(added["ok"], true, "{added}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        recent(&api, Duration::from_millis(950)) <= 2,
        "2 requests/s before the reload"
    );
    assert!(bearer(&api, "sk-old-key-1"));

    // A faster rate, a new key and a forward target.
    config.rps = "20".to_owned();
    config.targets.push(BinTarget::new("app", &receiver.url()));
    std::fs::write(&key, "sk-new-key-2\n").expect("key");
    write(&config_path, &config, &key);
    kill_pid("-HUP", child.id()).await;
    wait_until(Deadline::patience(), "the new key in use", || {
        bearer(&api, "sk-new-key-2")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let fast = recent(&api, Duration::from_secs(1));
    assert!(
        fast >= 8,
        "{fast} requests in a second after raising the rate to 20/s"
    );
    api.script_statuses("hup-fwd", &["SUCCESS"]);
    request(json!({"cmd": "add", "task_ids": ["hup-fwd"]})).await;
    wait_until(
        Deadline::patience(),
        "the new target receives events",
        || receiver.received().iter().any(|r| r.task() == "hup-fwd"),
    )
    .await;
    assert!(log_text().contains("config reloaded"), "{}", log_text());

    // A broken file: the daemon says why and goes on by the running config.
    std::fs::write(&config_path, "[poll]\ninterval = \"soon\"\n").expect("write");
    kill_pid("-HUP", child.id()).await;
    wait_until(Deadline::patience(), "the bad file reported", || {
        log_text().contains("the config file is invalid; keeping the running config")
    })
    .await;
    let status = request(json!({"cmd": "status"})).await;
    assert_eq!(status["ok"], true, "still running: {status}");
    let before = api.total_calls();
    wait_until(Deadline::patience(), "polling goes on", || {
        api.total_calls() >= before + 8
    })
    .await;

    // The key is rejected; the operator fixes the file; the next probe uses it, no signal.
    api.set_override(Some(Reply::fixture("error.401.unauthorized.json")));
    wait_until(Deadline::patience(), "the key rejected", || {
        log_text().contains("rejected the API key")
    })
    .await;
    std::fs::write(&key, "sk-fixed-key-3\n").expect("key");
    api.set_override(None);
    wait_until(Deadline::patience(), "the fixed key in use", || {
        bearer(&api, "sk-fixed-key-3")
    })
    .await;

    let exit = terminate(child).await;
    assert!(exit.success(), "{exit}: {}", log_text());
    assert!(
        !log_text().contains("sk-"),
        "no key in the log: {}",
        log_text()
    );
}
