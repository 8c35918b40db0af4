//! Black-box tests of the real binary.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

use crate::binary::{run, sunopoll, terminate, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_the_example_and_reports_every_problem_with_exit_2() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    let out = run(sunopoll(&["check-config", "--config", example])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok"));

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[poll]\nintervall = \"30s\"\nmax-in-flight = \"four\"\n[nope]\n",
    )
    .expect("write");
    let out = run(sunopoll(&[
        "check-config",
        "--config",
        bad.to_str().expect("utf8"),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(bad.to_str().expect("utf8")),
        "names the file: {err}"
    );
    assert!(err.contains("3 problems"), "{err}");
    assert!(
        err.contains("poll.intervall")
            && err.contains("poll.max-in-flight")
            && err.contains("[nope]"),
        "{err}"
    );

    let out = run(sunopoll(&[
        "check-config",
        "--config",
        "/nonexistent/sunopoll.toml",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_without_an_api_key_names_all_three_sources_and_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &dir.path().join("run/sunopoll.sock"),
    );
    let out = run(sunopoll(&[
        "daemon",
        "--config",
        config.to_str().expect("utf8"),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    for place in ["CREDENTIALS_DIRECTORY", "key-file", "SUNO_API_KEY"] {
        assert!(err.contains(place), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_without_a_daemon_exit_3_and_bad_ids_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("none.sock");
    let out = run(sunopoll(&[
        "status",
        "--socket",
        socket.to_str().expect("utf8"),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains("cannot reach the sunopoll daemon"));
    let out = run(sunopoll(&[
        "add",
        "--socket",
        socket.to_str().expect("utf8"),
        "bad id",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("\"bad id\""));
    let out = run(sunopoll(&["list", "--state", "sleeping"])).await;
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_add_show_against_the_fake_api() {
    let api = FakeApi::start().await;
    api.script_statuses(
        TASK,
        &["PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS"],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/sunopoll.sock");
    let config = write_config(dir.path(), &api.uri(), &socket);
    let socket_arg = socket.to_str().expect("utf8").to_owned();
    let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log");
    let mut daemon = sunopoll(&["daemon", "--config", config.to_str().expect("utf8")])
        .env("SUNO_API_KEY", KEY)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn the daemon");
    wait_for_socket(&mut daemon, &socket, &dir.path().join("daemon.log")).await;

    let out = run(sunopoll(&[
        "add",
        "--socket",
        &socket_arg,
        TASK,
        "--label",
        "demo",
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("added     {TASK}"));

    let show = poll_until(
        Deadline::patience(),
        "the task done, as `show` tells",
        Duration::from_millis(50),
        || async {
            let out = run(sunopoll(&["show", "--socket", &socket_arg, "--json", TASK])).await;
            assert!(out.status.success(), "{}", text(&out.stderr));
            let v: Value = serde_json::from_slice(&out.stdout).expect("json");
            (v["task"]["state"] == "done").then_some(v)
        },
    )
    .await;
    assert_eq!(show["task"]["label"], "demo");
    let events = show["events"].as_array().expect("events");
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["body"], fixture_json("callback.complete.json"));

    // `--json` prints exactly the line the daemon answers with: the CLI reads typed answers
    // and writes them back unchanged.
    for (args, request) in [
        (
            vec!["show", "--json", TASK],
            format!(r#"{{"cmd":"show","task_id":"{TASK}"}}"#),
        ),
        (vec!["list", "--json"], r#"{"cmd":"list"}"#.to_owned()),
        (vec!["events", "--json"], r#"{"cmd":"events"}"#.to_owned()),
    ] {
        let mut cmd_args = args.clone();
        cmd_args.extend(["--socket", socket_arg.as_str()]);
        let out = run(sunopoll(&cmd_args)).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
        let wire = raw_answer(&socket, &request).await;
        if args[0] == "events" {
            // One line per event, each the event object of the daemon's answer.
            let answer: Value = serde_json::from_str(&wire).expect("json");
            let events: Vec<String> = answer["events"]
                .as_array()
                .expect("events")
                .iter()
                .map(Value::to_string)
                .collect();
            assert_eq!(text(&out.stdout).lines().collect::<Vec<_>>(), events);
        } else {
            assert_eq!(text(&out.stdout).trim_end(), wire.trim_end(), "{args:?}");
        }
    }

    // Human output, JSON lists, the event log and health, through the binary.
    let out = run(sunopoll(&["list", "--socket", &socket_arg])).await;
    assert!(text(&out.stdout).contains(TASK) && text(&out.stdout).contains("done"));
    let out = run(sunopoll(&["events", "--socket", &socket_arg, "--json"])).await;
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        compact(&lines[0]["body"]),
        compact(&fixture_json("callback.text.json"))
    );
    // Global flags go before the subcommand as well as after it.
    let out = run(sunopoll(&["--socket", &socket_arg, "--json", "show", TASK])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json before the subcommand");
    assert_eq!(v["task"]["state"], "done");
    let out = run(sunopoll(&["status", "--socket", &socket_arg])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("healthy"));
    let out = run(sunopoll(&["show", "--socket", &socket_arg, "unknown-task"])).await;
    assert_eq!(out.status.code(), Some(1), "a refused request exits 1");

    // SIGTERM: exit 0, socket removed, the key never printed.
    let status = terminate(daemon).await;
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "the socket is removed at shutdown");
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).expect("log");
    assert!(
        log.contains("sunopoll started") && log.contains("stopped"),
        "{log}"
    );
    assert!(!log.contains(KEY), "the API key leaked into the log");
    assert!(
        !log.contains("\x1b["),
        "no colour codes when stderr is not a terminal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_the_man_page_come_from_the_command_line_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(sunopoll(&["completions", shell])).await;
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["sunopoll", "add", "redeliver", "check-config", "socket"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = run(sunopoll(&["man"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH sunopoll 1"), "{page}");
    assert!(
        page.contains("redeliver") && page.contains("\\-\\-socket"),
        "{page}"
    );
    let out = run(sunopoll(&["completions", "tcsh"])).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refuses_client_flags_instead_of_ignoring_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        "http://127.0.0.1:9",
        &dir.path().join("run/sunopoll.sock"),
    );
    let config = config.to_str().expect("utf8");
    for args in [
        vec!["--socket", "/tmp/x.sock", "daemon", "--config", config],
        vec!["check-config", "--json", "--config", config],
    ] {
        let out = run(sunopoll(&args)).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains("does not take"), "{args:?}");
    }
    // --config before the subcommand reaches check-config.
    let out = run(sunopoll(&["--config", config, "check-config"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// One request on the control socket; the answer line exactly as the daemon wrote it.
async fn raw_answer(socket: &Path, request: &str) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect to the control socket");
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .expect("send");
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, BufReader::new(read).read_line(&mut line))
        .await
        .expect("an answer in time")
        .expect("read");
    line
}
