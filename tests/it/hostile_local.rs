//! Hostile neighbours and careless operators, against the real binary (issue 16): another local
//! user who creates the per-user socket directory first, a loose umask while the socket is
//! created, `HTTP_PROXY` set for the API, credentials in target URLs, a second daemon reaching
//! the queue through a link, the store file deleted under a running daemon, a backup taken while
//! it runs, and another application's database given as the store.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::binary::*;
use crate::helpers::*;

/// Starts `d` expecting it to refuse: waits (bounded) for it to exit and returns its exit code
/// and everything it logged.
async fn refused(d: &mut BinDaemon) -> (Option<i32>, String) {
    d.spawn();
    let deadline = Deadline::patience();
    while d.running() {
        assert!(
            !deadline.passed(),
            "the daemon started despite the fault:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = d.log_text();
    assert_no_secrets(&log, "a refused start");
    (d.exit_code(), log)
}

/// The last line of `log`.
fn last_line(log: &str) -> String {
    log.lines().last().unwrap_or_default().to_owned()
}

// ----- 1. the per-user socket directory in /tmp -----

/// A uid no account uses here, so that `/tmp/sunopoll-UID` belongs to this test alone.
fn unused_uid() -> u32 {
    61_000 + std::process::id() % 3_000
}

/// A `sunopoll` command run as `uid` with nothing of the caller's environment: no
/// `$XDG_RUNTIME_DIR`, no `$HOME`, so the socket defaults to `/tmp/sunopoll-UID/`.
fn as_user(binary: &Path, uid: u32, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(binary);
    c.args(args)
        .env_clear()
        .env("SUNO_API_KEY", KEY)
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_socket_directory_cannot_be_taken_over() {
    if sunopoll::config::current_uid() != 0 {
        println!("SKIPPED socket directory takeover: not running as root, cannot switch user");
        return;
    }
    let api = FakeApi::start().await;
    let uid = unused_uid();
    let private = PathBuf::from(format!("/tmp/sunopoll-{uid}"));
    let socket = private.join("sunopoll.sock");
    let _ = std::fs::remove_dir_all(&private);

    // What the victim can reach: the binary, a config, a store directory of its own.
    let public = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let binary = public.path().join("sunopoll");
    std::fs::copy(BIN, &binary).expect("copy the binary");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = public.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nbase-url = \"{}\"\n\n[poll]\ninterval = \"100ms\"\n\n[store]\npath = \"state/sunopoll.db\"\n",
            api.uri()
        ),
    )
    .expect("config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let state = public.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    std::os::unix::fs::chown(&state, Some(uid), Some(uid)).expect("chown");
    let config_arg = path_str(&config).to_owned();
    let daemon_args = ["daemon", "--config", config_arg.as_str()];

    // The attacker was first: a world-writable directory (theirs, then one of the victim's
    // own made writable), with the attacker's socket in it, ready to answer `added`.
    for owner in [0, uid] {
        let _ = std::fs::remove_dir_all(&private);
        std::fs::create_dir(&private).expect("mkdir");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        std::os::unix::fs::chown(&private, Some(owner), Some(owner)).expect("chown");
        let impostor = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        impostor.set_nonblocking(true).expect("nonblocking");
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");

        let out = run(as_user(&binary, uid, &daemon_args)).await;
        let err = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "the daemon must refuse:\n{err}");
        let expected_owner = format!("owner uid {owner}");
        let line = last_line(&err);
        for part in [
            "refusing the socket directory",
            path_str(&private),
            expected_owner.as_str(),
            "mode 0777",
        ] {
            assert!(line.contains(part), "{part:?} missing from: {line}");
        }

        let out = run(as_user(&binary, uid, &["add", "victim-task"])).await;
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "the CLI must refuse:\n{err}");
        assert!(
            err.contains("refusing the socket directory") && err.contains(path_str(&private)),
            "{err}"
        );
        assert!(
            matches!(impostor.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the CLI connected to the impostor's socket"
        );
    }

    // No directory yet: the daemon creates it 0700, and the CLI uses it.
    std::fs::remove_dir_all(&private).expect("rm");
    let log = public.path().join("daemon.log");
    let mut daemon = as_user(&binary, uid, &daemon_args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let deadline = Deadline::patience();
    loop {
        let out = run(as_user(&binary, uid, &["status"])).await;
        if out.status.code() == Some(0) {
            break;
        }
        assert!(
            daemon.try_wait().expect("try_wait").is_none(),
            "the daemon exited:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(!deadline.passed(), "never answered: {}", text(&out.stderr));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let meta = std::fs::symlink_metadata(&private).expect("created");
    assert!(meta.is_dir());
    assert_eq!(meta.uid(), uid);
    assert_eq!(meta.mode() & 0o7777, 0o700, "created private");
    let status = terminate(daemon).await;
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&private);
}

// ----- 2. the socket under umask 000 -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_umask_000_the_socket_is_never_wider_than_configured() {
    let api = FakeApi::start().await;
    let d = BinDaemon::prepare(&BinConfig::new(&api.uri()));
    let run_dir = d.dir.path().join("run");
    std::fs::create_dir(&run_dir).expect("mkdir");
    // A shared directory, as a group's socket directory would be.
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");

    // Watches the directory as fast as it can while the daemon starts again and again: every
    // socket seen must have the configured 0600, every directory (the private one the socket
    // is bound in) 0700.
    let stop = Arc::new(AtomicBool::new(false));
    let wider: Arc<Mutex<std::collections::BTreeMap<String, usize>>> = Arc::default();
    let looks = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, wider, looks, run_dir) =
            (stop.clone(), wider.clone(), looks.clone(), run_dir.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                looks.fetch_add(1, Ordering::Relaxed);
                let Ok(entries) = std::fs::read_dir(&run_dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                        continue;
                    };
                    let mode = meta.mode() & 0o7777;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let kind = meta.file_type();
                    use std::os::unix::fs::FileTypeExt;
                    if (kind.is_socket() && mode != 0o600) || (kind.is_dir() && mode != 0o700) {
                        *wider
                            .lock()
                            .expect("lock")
                            .entry(format!("{name} {mode:04o}"))
                            .or_insert(0) += 1;
                    }
                }
            }
        })
    };

    let starts = count_from_env("SUNOPOLL_UMASK_STARTS", 20);
    let log = d.log.clone();
    for _ in 0..starts {
        let mut sh = std::process::Command::new("sh");
        for v in SYSTEMD_VARS {
            sh.env_remove(v);
        }
        let mut child = sh
            .args([
                "-c",
                "umask 000; exec \"$0\" daemon --config \"$1\"",
                BIN,
                path_str(&d.config),
            ])
            .env("SUNO_API_KEY", KEY)
            .env_remove("RUST_LOG")
            .env_remove("SUNOPOLL_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log"),
            )
            .spawn()
            .expect("spawn");
        let deadline = Deadline::patience();
        while d.try_request(&json!({"cmd": "status"})).await.is_none() {
            assert!(
                child.try_wait().expect("try_wait").is_none(),
                "the daemon exited:\n{}",
                d.log_text()
            );
            assert!(!deadline.passed(), "never answered:\n{}", d.log_text());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(terminate(child).await.code(), Some(0), "{}", d.log_text());
    }
    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("watcher");
    let wider = wider.lock().expect("lock").clone();
    println!(
        "umask 000: {starts} starts, directory looked at {} times",
        looks.load(Ordering::Relaxed)
    );
    assert!(
        wider.is_empty(),
        "seen with wider permissions (entry and mode: times seen): {wider:?}"
    );
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

// ----- 9. deliveries and HTTP_PROXY -----

/// A proxy on 127.0.0.1 that counts requests, remembers their first lines, and answers 502.
struct FakeProxy {
    url: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl FakeProxy {
    async fn start() -> FakeProxy {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = lines.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut first = String::new();
                    let mut r = tokio::io::BufReader::new(r);
                    let _ = r.read_line(&mut first).await;
                    seen.lock().expect("lock").push(first.trim().to_owned());
                    let _ = w
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        FakeProxy { url, lines }
    }

    fn requests(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_ignore_http_proxy_unless_forward_proxy_is_set() {
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    let proxy = FakeProxy::start().await;
    // The API by name, excluded from the proxy by NO_PROXY as an operator would; the handler
    // on 127.0.0.1, which NO_PROXY does not name.
    let api_url = api.uri().replace("127.0.0.1", "localhost");
    let mut config = BinConfig::new(&api_url);
    config.targets.push(BinTarget::new("app", &handler.url()));
    let mut d = BinDaemon::prepare(&config);
    for (k, v) in [
        ("HTTP_PROXY", proxy.url.as_str()),
        ("http_proxy", proxy.url.as_str()),
        ("HTTPS_PROXY", proxy.url.as_str()),
        ("ALL_PROXY", proxy.url.as_str()),
        ("NO_PROXY", "localhost"),
        ("no_proxy", "localhost"),
    ] {
        d.env.push((k.to_owned(), v.to_owned()));
    }
    d.restart().await;
    api.script_statuses("direct", &["SUCCESS"]);
    let v = d
        .request(json!({"cmd": "add", "task_ids": ["direct"]}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    wait_until(
        Deadline::patience(),
        "three deliveries at the handler",
        || handler.count() >= 3,
    )
    .await;
    assert!(
        proxy.requests().is_empty(),
        "deliveries went through HTTP_PROXY: {:?}",
        proxy.requests()
    );
    d.stop().await;

    // `[forward] proxy` is the one way to send them through a proxy.
    let chosen = FakeProxy::start().await;
    let mut config = config.clone();
    config.forward_extra = format!("proxy = \"{}\"", chosen.url);
    std::fs::write(&d.config, config.to_toml()).expect("config");
    d.restart().await;
    api.script_statuses("proxied", &["SUCCESS"]);
    let v = d
        .request(json!({"cmd": "add", "task_ids": ["proxied"]}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let target = format!("POST {}", handler.url());
    wait_until(
        Deadline::patience(),
        "a delivery through forward.proxy",
        || chosen.requests().iter().any(|l| l.starts_with(&target)),
    )
    .await;
    assert!(proxy.requests().is_empty(), "{:?}", proxy.requests());
    let out = run(sunopoll(&["check-config", "--config", path_str(&d.config)])).await;
    assert!(
        text(&out.stdout).contains(&format!("proxy {}", chosen.url)),
        "{}",
        text(&out.stdout)
    );
    d.stop().await;
}

// ----- 10. credentials in target URLs -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_target_urls_never_reach_any_output() {
    const PASSWORDS: [&str; 3] = ["hunter2-target-pw", "hunter2-dead-pw", "hunter2-task-pw"];
    let api = FakeApi::start().await;
    let handler = Receiver::start().await;
    let (dead, _keep) = dead_port();
    let with_creds = |user: &str, pw: &str, url: &str| {
        url.replacen("http://", &format!("http://{user}:{pw}@"), 1)
    };
    let target_url = with_creds("hook", PASSWORDS[0], &handler.url());
    let dead_url = with_creds("dead", PASSWORDS[1], &format!("http://127.0.0.1:{dead}/cb"));
    let task_url = with_creds("task", PASSWORDS[2], &handler.url());
    let mut config = BinConfig::new(&api.uri());
    // No `name`: each target is named by its URL.
    config.extra = format!(
        "[[forward.target]]\nurl = \"{target_url}\"\n\n[[forward.target]]\nurl = \"{dead_url}\"\ntimeout = \"200ms\"\n"
    );
    config.schedule_ms(&[0, 20, 20]);
    let mut d = BinDaemon::start(&config).await;
    api.script_statuses("creds", &["SUCCESS"]);
    let out = d.cli(&["add", "creds", "--callback-url", &task_url]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Three events to the target, three to the task's URL; the dead target gives up.
    wait_until(Deadline::patience(), "six deliveries", || {
        handler.count() >= 6
    })
    .await;
    let s = poll_until(
        Deadline::patience(),
        "the dead target's deliveries given up",
        Duration::from_millis(25),
        || async {
            let s = d.status().await;
            let failed: i64 = s["targets"]
                .as_array()
                .map(|ts| ts.iter().map(|t| t["failed"].as_i64().unwrap_or(0)).sum())
                .unwrap_or(0);
            (failed >= 3).then_some(s)
        },
    )
    .await;
    let mut shown = vec![s.to_string()];
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["show", "creds"],
        &["show", "creds", "--json"],
        &["list"],
        &["list", "--json"],
    ] {
        let out = d.cli(args).await;
        shown.push(format!(
            "{args:?}\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        ));
    }
    let out = run(sunopoll(&["check-config", "--config", path_str(&d.config)])).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    shown.push(text(&out.stdout));
    let log = d.stop().await;
    assert!(
        log.contains("delivered") && log.contains("target=http://***@127.0.0.1"),
        "the log names the targets, redacted:\n{log}"
    );
    shown.push(log);
    for text in &shown {
        for pw in PASSWORDS {
            assert!(!text.contains(pw), "a password was shown:\n{text}");
        }
    }
    // The credentials still reach the handler: only their display is redacted.
    let auth: Vec<String> = handler
        .received()
        .iter()
        .map(|r| r.header("authorization").to_owned())
        .collect();
    assert!(auth.iter().all(|a| a.starts_with("Basic ")), "{auth:?}");
}

// ----- 12. one daemon per queue, whatever the path -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_cannot_reach_the_queue_through_a_link() {
    let api = FakeApi::start().await;
    let mut first = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let v = first
        .request(json!({"cmd": "add", "task_ids": ["only-once"]}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let mut second = BinDaemon::prepare(&BinConfig::new(&api.uri()));
    std::fs::create_dir(second.dir.path().join("state")).expect("mkdir");
    for how in ["symlink", "hard link"] {
        let _ = std::fs::remove_file(&second.store);
        match how {
            "symlink" => std::os::unix::fs::symlink(&first.store, &second.store),
            _ => std::fs::hard_link(&first.store, &second.store),
        }
        .expect("link");
        let (code, log) = refused(&mut second).await;
        assert_eq!(code, Some(2), "{how}: {log}");
        let line = last_line(&log);
        assert!(
            line.contains("in use by another sunopoll daemon") && line.contains("sunopoll.db"),
            "{how}: {line}"
        );
    }
    assert_eq!(first.status().await["healthy"], true);
    first.stop().await;
}

// ----- 13. the store file deleted while running -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_store_file_makes_status_unhealthy_and_adds_refused() {
    let api = FakeApi::start().await;
    let mut d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    let created = warnings_naming(&d.log_text(), "created a new, empty store");
    assert_eq!(created.len(), 1, "{}", d.log_text());
    assert!(
        created[0].rest.contains(path_str(&d.store)),
        "{:?}",
        created[0]
    );
    let v = d
        .request(json!({"cmd": "add", "task_ids": ["queued"]}))
        .await;
    assert_eq!(v["ok"], true, "{v}");

    std::fs::remove_file(&d.store).expect("rm the store");
    let s = poll_until(
        Deadline::patience(),
        "status unhealthy",
        Duration::from_millis(25),
        || async {
            let s = d.status().await;
            (s["healthy"] == false).then_some(s)
        },
    )
    .await;
    assert!(s["problems"].to_string().contains("was deleted"), "{s}");
    let out = d.cli(&["status"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    for id in ["after-1", "after-2"] {
        let v = d.request(json!({"cmd": "add", "task_ids": [id]})).await;
        assert_eq!(v["ok"], false, "{v}");
        assert_eq!(v["error"]["code"], "store_error", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("was deleted"),
            "{v}"
        );
    }
    let log = d.stop().await;
    let errors: Vec<_> = log_lines(&log)
        .into_iter()
        .filter(|l| l.level == "ERROR" && l.rest.contains("refusing every write"))
        .collect();
    assert_eq!(errors.len(), 1, "logged at error once:\n{log}");
    assert!(errors[0].rest.contains("was deleted"), "{:?}", errors[0]);
}

// ----- 14. backups -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_running_holds_every_task() {
    let api = FakeApi::start().await;
    let mut d = BinDaemon::start(&BinConfig::new(&api.uri())).await;
    api.script_statuses("finished", &["SUCCESS"]);
    let ids = ["finished", "waiting-1", "waiting-2", "waiting-3"];
    let v = d.request(json!({"cmd": "add", "task_ids": ids})).await;
    assert_eq!(v["ok"], true, "{v}");
    d.wait_finished(&["finished".to_owned()]).await;

    let restored = BinDaemon::prepare(&BinConfig::new(&api.uri()));
    std::fs::create_dir(restored.dir.path().join("state")).expect("mkdir");
    let out = run(sunopoll(&[
        "store",
        "backup",
        path_str(&restored.store),
        "--config",
        path_str(&d.config),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(4 tasks)"),
        "{}",
        text(&out.stdout)
    );
    // Never over an existing file.
    let before = std::fs::read(&restored.store).expect("backup");
    let out = run(sunopoll(&[
        "store",
        "backup",
        path_str(&restored.store),
        "--store",
        path_str(&d.store),
    ]))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&restored.store).expect("backup"), before);
    assert_eq!(
        d.status().await["healthy"],
        true,
        "the daemon did not notice"
    );
    let original = d.states().await;
    d.stop().await;

    let mut restored = restored;
    restored.restart().await;
    let states = restored.states().await;
    assert_eq!(states, original, "the restored store holds the same tasks");
    assert_eq!(states.get("finished").map(String::as_str), Some("done"));
    let events = restored.events().await;
    assert_eq!(events.len(), 3, "{events:?}");
    let log = restored.stop().await;
    assert!(
        warnings_naming(&log, "created a new, empty store").is_empty(),
        "{log}"
    );
}

// ----- 15. another application's database -----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_database_is_refused_before_anything_changes() {
    let api = FakeApi::start().await;
    let mut d = BinDaemon::prepare(&BinConfig::new(&api.uri()));
    std::fs::create_dir(d.dir.path().join("state")).expect("mkdir");
    {
        let c = rusqlite::Connection::open(&d.store).expect("create");
        c.execute_batch(
            "CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT);
             INSERT INTO accounts (owner) VALUES ('someone else');",
        )
        .expect("fill");
    }
    let before = std::fs::read(&d.store).expect("read");
    let (code, log) = refused(&mut d).await;
    assert_eq!(code, Some(1), "{log}");
    let line = last_line(&log);
    assert!(
        line.contains(path_str(&d.store))
            && line.contains("not a sunopoll store")
            && line.contains("accounts"),
        "{line}"
    );
    assert!(!log.contains("CREATE"), "no SQL in the refusal:\n{log}");
    assert_eq!(
        std::fs::read(&d.store).expect("read"),
        before,
        "byte for byte"
    );
    let wal: PathBuf = format!("{}-wal", d.store.display()).into();
    assert!(!wal.exists(), "never switched to WAL");
    let c = rusqlite::Connection::open(&d.store).expect("open");
    let mode: String = c
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "delete");
}
