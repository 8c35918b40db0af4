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
    // --dir: the pages the Debian package ships, one per subcommand, so that every page the
    // main one's SUBCOMMANDS section names (sunopoll-add(1), …) exists.
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(sunopoll(&["man", "--dir", dir.path().to_str().unwrap()])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let main = std::fs::read_to_string(dir.path().join("sunopoll.1")).expect("sunopoll.1");
    let named: Vec<&str> = main
        .lines()
        .filter_map(|l| l.strip_suffix("(1)"))
        .filter(|l| l.starts_with("sunopoll\\-"))
        .collect();
    assert!(named.len() >= 10, "SUBCOMMANDS names few pages: {named:?}");
    for name in named {
        let file = format!("{}.1", name.replace("\\-", "-"));
        let sub = std::fs::read_to_string(dir.path().join(&file))
            .unwrap_or_else(|e| panic!("{file}, named in sunopoll.1, was not written: {e}"));
        assert!(sub.contains(".TH "), "{file}: {sub}");
    }
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

/// A SQLite store at `path` with `n` tasks, each failed with its `error` event.
async fn small_store(path: &Path, n: u32) {
    use sunopoll::store::{Store, TaskSpec};
    let store = Store::open(path).expect("open");
    let ids: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    store
        .add(ids.clone(), TaskSpec::music(None, None), 1000, 60_000)
        .await
        .expect("add");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_checks_its_ends_with_exit_2_and_never_shows_the_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("q.db");
    let db_s = db.to_str().expect("utf8");
    let from = format!("sqlite:{db_s}");
    for (args, says) in [
        (
            vec!["--from", db_s, "--to", "postgres://u@h/db"],
            "--from must be sqlite:PATH",
        ),
        (
            vec!["--from", "sqlite:", "--to", "postgres://u@h/db"],
            "--from must be sqlite:PATH",
        ),
        (
            vec!["--from", &from, "--to", "mysql://u@h/db"],
            "--to must be a postgres://",
        ),
        (
            vec!["--from", &from, "--to", "postgres://u:hunter2@h"],
            "names no database",
        ),
    ] {
        let mut all = vec!["store", "copy"];
        all.extend(args.iter().copied());
        let out = run(sunopoll(&all)).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(says), "{all:?}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    assert!(!db.exists(), "no store was created by a refused copy");

    // A real store and an unreachable database: refused (exit 1), the password unshown.
    small_store(&db, 3).await;
    let password = dir.path().join("pw");
    std::fs::write(&password, "s3cret-pw\n").expect("write");
    let out = run(sunopoll(&[
        "store",
        "copy",
        "--from",
        &from,
        "--to",
        "postgresql://u:hunter2@127.0.0.1:9/db?connect_timeout=2",
        "--password-file",
        password.to_str().expect("utf8"),
    ]))
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("postgres://u@127.0.0.1:9/db"), "{stderr}");
    for secret in ["hunter2", "s3cret-pw"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_a_queue_and_prints_each_table_checked() {
    let Some(cluster) = sunopoll::testing::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("q.db");
    small_store(&db, 5).await;
    let url = cluster.database();
    let from = format!("sqlite:{}", db.to_str().expect("utf8"));
    let out = run(sunopoll(&["store", "copy", "--from", &from, "--to", &url])).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for line in [
        "tasks 5 = 5",
        "events 0 = 0",
        "store_meta.last_seq 0 = 0",
        "task_counts (recount) 1 = 1",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in {stdout}");
    }
    // Again: the target now holds tasks, so it is refused.
    let out = run(sunopoll(&["store", "copy", "--from", &from, "--to", &url])).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already holds tasks"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_forget_member_needs_a_shared_queue_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[store]\npath = \"q.db\"\n").expect("write");
    let out = run(sunopoll(&[
        "--config",
        config.to_str().expect("utf8"),
        "store",
        "forget-member",
        "host:/run/sunopoll/control.sock",
    ]))
    .await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the store is the SQLite file") && err.contains("set store.url"),
        "{err}"
    );
    assert!(!dir.path().join("q.db").exists(), "no store was created");
    // An unreachable database is a refusal (exit 1) that names it, without its password.
    std::fs::write(
        &config,
        "[store]\nurl = \"postgresql://u:hunter2@127.0.0.1:9/db?connect_timeout=2\"\n",
    )
    .expect("write");
    let out = run(sunopoll(&[
        "--config",
        config.to_str().expect("utf8"),
        "store",
        "forget-member",
        "host:/x.sock",
        "--dry-run",
    ]))
    .await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("postgres://u@127.0.0.1:9/db"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
