use super::de::parse_mode;
use super::*;

fn env() -> Environment {
    Environment {
        uid: 1000,
        home: Some("/home/u".into()),
        ..Environment::default()
    }
}

fn problems(text: &str) -> Vec<String> {
    Config::parse(text, Some(Path::new("/etc/sunopoll/config.toml")), &env())
        .expect_err("should fail")
        .problems
}

#[test]
fn empty_file_gives_the_documented_defaults() {
    let c = Config::parse("", None, &env()).expect("ok");
    assert_eq!(c.api.base_url.as_str(), "https://api.sunoapi.org/");
    assert_eq!(c.poll.interval, Duration::from_secs(30));
    assert_eq!(c.poll.max_in_flight, 4);
    assert_eq!(c.poll.max_requests_per_second, Some(2.0));
    assert_eq!(c.poll.backoff_max, Duration::from_secs(600));
    assert_eq!(c.poll.task_deadline, Duration::from_secs(7200));
    assert!(c.poll.fill_skipped_stages);
    assert_eq!(c.control.mode, 0o600);
    assert_eq!(c.log.format, LogFormat::Auto);
    assert_eq!(c.housekeeping.retention, Duration::from_secs(30 * 86400));
    assert_eq!(
        c.store.path,
        PathBuf::from("/home/u/.local/state/sunopoll/sunopoll.db")
    );
    assert_eq!(
        c.control.socket,
        PathBuf::from("/tmp/sunopoll-1000/sunopoll.sock")
    );
}

#[test]
fn every_key_is_read() {
    let c = Config::parse(
        r#"
        [api]
        base-url = "http://127.0.0.1:9000/suno"
        key-file = "key.txt"
        request-timeout = "5s"
        [poll]
        interval = "250ms"
        max-in-flight = 8
        max-requests-per-second = 0.5
        backoff-max = "1m"
        task-deadline = "15m"
        fill-skipped-stages = false
        [store]
        path = "/var/tmp/q.db"
        [control]
        socket = "/run/x.sock"
        mode = "0660"
        group = "sunopoll-admin"
        [log]
        level = "DEBUG"
        format = "journald"
        [housekeeping]
        retention = "7d"
        prune-schedule = "0 3 * * *"
        "#,
        Some(Path::new("/etc/sunopoll/config.toml")),
        &env(),
    )
    .expect("ok");
    assert_eq!(c.api.base_url.as_str(), "http://127.0.0.1:9000/suno/");
    assert_eq!(c.api.key_file, Some(PathBuf::from("/etc/sunopoll/key.txt")));
    assert_eq!(c.api.request_timeout, Duration::from_secs(5));
    assert_eq!(c.poll.interval, Duration::from_millis(250));
    assert_eq!(c.poll.max_in_flight, 8);
    assert_eq!(c.poll.max_requests_per_second, Some(0.5));
    assert_eq!(c.poll.backoff_max, Duration::from_secs(60));
    assert_eq!(c.poll.task_deadline, Duration::from_secs(900));
    assert!(!c.poll.fill_skipped_stages);
    assert_eq!(c.store.path, PathBuf::from("/var/tmp/q.db"));
    assert_eq!(c.control.socket, PathBuf::from("/run/x.sock"));
    assert!(c.control.socket_configured);
    assert_eq!(c.control.mode, 0o660);
    assert_eq!(c.control.group.as_deref(), Some("sunopoll-admin"));
    assert_eq!(c.log.level, "debug");
    assert_eq!(c.log.format, LogFormat::Journald);
    assert_eq!(c.housekeeping.retention, Duration::from_secs(7 * 86400));
    assert_eq!(
        c.housekeeping.prune_schedule.pattern.to_string(),
        "0 3 * * *"
    );
}

#[test]
fn integer_rate_and_unlimited_are_accepted() {
    let c = Config::parse("[poll]\nmax-requests-per-second = 2", None, &env()).expect("ok");
    assert_eq!(c.poll.max_requests_per_second, Some(2.0));
    let c = Config::parse(
        "[poll]\nmax-requests-per-second = \"unlimited\"",
        None,
        &env(),
    )
    .expect("ok");
    assert_eq!(c.poll.max_requests_per_second, None);
}

#[test]
fn all_problems_are_reported_at_once_each_naming_its_key() {
    let p = problems(
        r#"
        [api]
        base-url = "ftp://x"
        [poll]
        intervall = "30s"
        max-in-flight = 0
        max-requests-per-second = -1
        backoff-max = 600
        task-deadline = "2 hours"
        fill-skipped-stages = "yes"
        [control]
        mode = "0777x"
        [log]
        level = "loud"
        format = "syslog"
        [housekeeping]
        prune-schedule = "every day"
        [extra]
        "#,
    );
    let all = p.join("\n");
    for needle in [
        "api.base-url",
        "poll.intervall: unknown key (did you mean `interval`?)",
        "poll.max-in-flight: 0 is outside 1..=1024",
        "poll.max-requests-per-second",
        "poll.backoff-max: expected a duration string",
        "poll.task-deadline",
        "poll.fill-skipped-stages: expected true or false",
        "control.mode",
        "log.level",
        "log.format: `syslog` is not one of auto, journald, plain, json",
        "housekeeping.prune-schedule",
        "[extra]: unknown section",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(p.len(), 12, "{all}");
}

#[test]
fn syntax_errors_name_the_file() {
    let e = Config::parse("[poll\n", Some(Path::new("/x/c.toml")), &env()).expect_err("bad");
    let text = e.to_string();
    assert!(text.starts_with("/x/c.toml: 1 problem"), "{text}");
    assert!(text.contains("not valid TOML"), "{text}");
}

#[test]
fn forward_targets_are_read_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("app.secret");
    std::fs::write(&secret_file, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").expect("write");
    let text = format!(
        r#"
        [forward]
        retry-schedule = ["0s", "1s", "1m"]
        use-task-callback-url = true
        allow-hosts = ["127.0.0.1", "handler.internal"]
        timeout = "5s"
        [[forward.target]]
        url = "http://127.0.0.1:3000/suno"
        [[forward.target]]
        name = "audit"
        url = "https://audit.internal/hook"
        stages = ["complete", "error"]
        secret-file = "{}"
        headers = {{ "X-Team" = "music" }}
        timeout = "2s"
        "#,
        secret_file.display()
    );
    let c = Config::parse(&text, None, &env()).expect("ok");
    let f = &c.forward;
    assert_eq!(
        f.retry_schedule,
        [
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(60)
        ]
    );
    assert!(f.use_task_callback_url);
    assert!(f.allows_host(&url::Url::parse("http://handler.internal:8080/x").expect("url")));
    assert!(!f.allows_host(&url::Url::parse("http://evil.example/x").expect("url")));
    assert_eq!(f.targets.len(), 2);
    assert_eq!(f.targets[0].name, "http://127.0.0.1:3000/suno");
    assert_eq!(f.targets[0].stages.len(), 4);
    assert_eq!(
        f.targets[0].timeout,
        Duration::from_secs(5),
        "inherits [forward] timeout"
    );
    assert_eq!(f.targets[1].name, "audit");
    assert_eq!(
        f.targets[1].stages,
        [crate::events::Stage::Complete, crate::events::Stage::Error]
    );
    assert!(f.targets[1].secret.is_some());
    assert_eq!(
        f.targets[1].headers,
        [("X-Team".to_owned(), "music".to_owned())]
    );
    assert!(
        !format!("{c:?}").contains("MfKQ9r8G"),
        "secrets never print"
    );
    assert!(c.summary().contains("target \"audit\""));

    let d = Config::parse("", None, &env()).expect("ok").forward;
    assert_eq!(d.retry_schedule.len(), 8);
    assert!(!d.use_task_callback_url);
    assert!(d.allows_host(&url::Url::parse("http://[::1]:9/x").expect("url")));
}

#[test]
fn archived_is_taken_only_when_a_target_lists_it() {
    use crate::events::Stage;
    let c = Config::parse(
        r#"
        [[forward.target]]
        url = "http://127.0.0.1:3000/suno"
        [[forward.target]]
        name = "files"
        url = "http://127.0.0.1:3000/files"
        stages = ["complete", "archived"]
        "#,
        None,
        &env(),
    )
    .expect("ok");
    let t = &c.forward.targets;
    assert_eq!(
        t[0].stages,
        Stage::ALL,
        "the default stages are the callback stages"
    );
    assert!(!t[0].stages.contains(&Stage::Archived));
    assert_eq!(t[1].stages, [Stage::Complete, Stage::Archived]);
}

#[test]
fn bad_forward_targets_are_all_reported() {
    let p = problems(
        r#"
        [forward]
        retry-schedule = []
        [[forward.target]]
        name = "callback-url"
        stages = ["done"]
        secret = "not base64 !!"
        headers = { "webhook-id" = "x" }
        colour = "blue"
        [[forward.target]]
        url = "ftp://x"
        "#,
    );
    let all = p.join("\n");
    for needle in [
        "forward.retry-schedule",
        "forward.target[0].url: is required",
        "forward.target[0].name",
        "forward.target[0].stages",
        "forward.target[0].secret",
        "forward.target[0].headers.webhook-id",
        "forward.target[0].colour: unknown key",
        "forward.target[1].url",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
}

#[test]
fn modes_are_checked() {
    assert_eq!(parse_mode(&Value::String("0660".into())), Ok(0o660));
    assert_eq!(parse_mode(&Value::Integer(0o640)), Ok(0o640));
    assert!(parse_mode(&Value::String("0400".into())).is_err());
    assert!(parse_mode(&Value::Integer(0o7777)).is_err());
}

#[test]
fn systemd_and_xdg_paths() {
    let mut e = env();
    e.xdg_state_home = Some("/xdg/state".into());
    e.xdg_runtime_dir = Some("/run/user/1000".into());
    assert_eq!(
        e.default_store_path(),
        PathBuf::from("/xdg/state/sunopoll/sunopoll.db")
    );
    assert_eq!(
        e.default_socket_path(),
        PathBuf::from("/run/user/1000/sunopoll.sock")
    );
    e.state_directory = Some("/var/lib/sunopoll".into());
    e.runtime_directory = Some("/run/sunopoll".into());
    assert_eq!(
        e.default_store_path(),
        PathBuf::from("/var/lib/sunopoll/sunopoll.db")
    );
    assert_eq!(
        e.default_socket_path(),
        PathBuf::from("/run/sunopoll/sunopoll.sock")
    );
    let root = Environment::default();
    assert_eq!(
        root.default_store_path(),
        PathBuf::from("/var/lib/sunopoll/sunopoll.db")
    );
    assert_eq!(
        root.default_socket_path(),
        PathBuf::from("/run/sunopoll.sock")
    );
}

#[test]
fn api_key_sources_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).expect("mkdir");
    std::fs::write(creds.join("api-key"), "from-credentials\n").expect("write");
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, "from-file\n").expect("write");

    let mut e = env();
    e.suno_api_key = Some("from-env".into());
    let mut c = Config::defaults(&e);
    assert_eq!(c.api_key(&e).expect("env").expose(), "from-env");
    c.api.key_file = Some(key_file);
    assert_eq!(c.api_key(&e).expect("file").expose(), "from-file");
    e.credentials_directory = Some(creds);
    assert_eq!(c.api_key(&e).expect("creds").expose(), "from-credentials");

    let none = Config::defaults(&env())
        .api_key(&env())
        .expect_err("no key");
    for place in ["CREDENTIALS_DIRECTORY", "key-file", "SUNO_API_KEY"] {
        assert!(none.contains(place), "{none}");
    }
    let mut c = Config::defaults(&env());
    c.api.key_file = Some(dir.path().join("missing"));
    assert!(
        c.api_key(&env())
            .expect_err("missing")
            .contains("api.key-file")
    );
}

#[test]
fn an_unknown_key_in_every_table_is_named_with_its_full_path() {
    let p = problems(
        r#"
        [api]
        key_file = "k"
        [poll]
        intervall = "30s"
        [store]
        pth = "q.db"
        [control]
        sockett = "s"
        [log]
        lvl = "info"
        [housekeeping]
        retension = "1d"
        [forward]
        tmeout = "1s"
        [[forward.target]]
        url = "http://127.0.0.1:1/"
        [[forward.target]]
        url = "http://127.0.0.1:2/"
        urll = "x"
        [extra.deeper]
        "#,
    );
    for needle in [
        "api.key_file: unknown key (did you mean `key-file`?); known keys: base-url, key-file, request-timeout",
        "poll.intervall: unknown key (did you mean `interval`?)",
        "store.pth: unknown key (did you mean `path`?); known keys: path",
        "control.sockett: unknown key (did you mean `socket`?)",
        "log.lvl: unknown key (did you mean `level`?)",
        "housekeeping.retension: unknown key (did you mean `retention`?)",
        "forward.tmeout: unknown key (did you mean `timeout`?)",
        "forward.target[1].urll: unknown key (did you mean `url`?); known keys: name, url, stages, secret, secret-file, headers, timeout",
        "[extra]: unknown section; known sections: api, poll, store, control, log, housekeeping, forward",
    ] {
        assert!(
            p.iter().any(|x| x.starts_with(needle)),
            "missing {needle:?} in:\n{}",
            p.join("\n")
        );
    }
    assert_eq!(p.len(), 9, "{}", p.join("\n"));
}

#[test]
fn a_type_error_names_its_path_and_what_was_found() {
    let p = problems(
        r#"
        [[api]]
        base-url = "http://127.0.0.1/"
        [poll]
        interval = 30
        [forward]
        retry-schedule = ["0s", 5, "1s", true]
        allow-hosts = "localhost"
        [[forward.target]]
        name = 7
        url = "http://127.0.0.1:1/"
        headers = { "X-Team" = 1 }
        "#,
    );
    let all = p.join("\n");
    for needle in [
        "api: expected a [api] table, got an array",
        "poll.interval: expected a duration string like \"30s\" or \"2h\", got the integer 30",
        "forward.retry-schedule[1]: expected a duration string like \"30s\" or \"2h\", got the integer 5",
        // After [1] is taken out, the last element is still named by its index in the file.
        "forward.retry-schedule[3]: expected a duration string like \"30s\" or \"2h\", got the boolean true",
        "forward.allow-hosts: expected a list, got the string \"localhost\"",
        "forward.target[0].name: expected a string, got the integer 7",
        "forward.target[0].headers.X-Team: expected a string, got the integer 1",
    ] {
        assert!(
            p.iter().any(|x| x == needle),
            "missing {needle:?} in:\n{all}"
        );
    }
    assert_eq!(p.len(), 7, "{all}");
}

#[test]
fn unknown_keys_bad_values_cross_checks_and_unreadable_secrets_come_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    let p = Config::parse(
        r#"
        [poll]
        interval = "1h"
        max-in-flight = "four"
        colour = "blue"
        [forward]
        task-secret-file = "missing.secret"
        [[forward.target]]
        url = 5
        [[forward.target]]
        secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        secret-file = "/etc/also.secret"
        "#,
        Some(&config),
        &env(),
    )
    .expect_err("bad")
    .problems;
    let all = p.join("\n");
    for needle in [
        "poll.colour: unknown key",
        "poll.max-in-flight: expected an integer, got the string \"four\"",
        "poll.backoff-max: 10m is shorter than poll.interval (1h)",
        "forward.target[0].url: expected a string, got the integer 5",
        "forward.target[1].url: is required",
        "forward.target[1].secret: set either `secret` or `secret-file`, not both",
        // Read after parsing, relative to the file's directory.
        &format!(
            "forward.task-secret-file: cannot read {}",
            dir.path().join("missing.secret").display()
        ),
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert!(
        !all.contains("forward.target[0].url: is required"),
        "a refused url is not also missing:\n{all}"
    );
    assert_eq!(p.len(), 7, "{all}");
}

#[test]
fn the_example_file_shows_the_defaults() {
    let example = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example"));
    let from_example = Config::load(Some(example), &env()).expect("the example parses");
    let defaults = Config::defaults(&env());
    let body = |c: &Config| {
        c.summary()
            .split_once('\n')
            .map(|(_, rest)| rest.to_owned())
    };
    assert_eq!(body(&from_example), body(&defaults));
    assert_eq!(
        defaults.forward.retry_schedule,
        DEFAULT_RETRY_SCHEDULE.to_vec()
    );
    assert_eq!(defaults.forward.max_in_flight, DEFAULT_FORWARD_IN_FLIGHT);
    assert_eq!(defaults.forward.timeout, DEFAULT_FORWARD_TIMEOUT);
    assert!(!defaults.control.socket_configured);
    assert_eq!(defaults.control.idle_timeout, DEFAULT_IDLE_TIMEOUT);
}

#[test]
fn the_archive_is_off_until_a_dir_is_set_and_reads_sizes() {
    let c = Config::parse("", None, &env()).expect("ok");
    assert!(!c.archive.enabled());
    assert_eq!(c.archive.max_in_flight, DEFAULT_ARCHIVE_IN_FLIGHT);
    assert_eq!(c.archive.expire_after, DEFAULT_EXPIRE_AFTER);
    let c = Config::parse(
        r#"
        [archive]
        dir = "files"
        max-in-flight = 3
        max-bytes-per-second = "10MiB"
        max-file-size = "1GB"
        min-free = 0
        allow-hosts = ["127.0.0.1", " ::1 "]
        expire-after = "3d"
        retry-interval = "100ms"
        "#,
        Some(Path::new("/etc/sunopoll/config.toml")),
        &env(),
    )
    .expect("ok");
    let a = &c.archive;
    assert_eq!(
        a.dir.as_deref(),
        Some(Path::new("/etc/sunopoll/files")),
        "anchored"
    );
    assert_eq!(a.max_in_flight, 3);
    assert_eq!(a.max_bytes_per_second, Some(10 << 20));
    assert_eq!(a.max_file_size, 1_000_000_000);
    assert_eq!(a.min_free, 0);
    assert_eq!(a.allow_hosts, ["127.0.0.1", "::1"]);
    assert_eq!(a.expire_after, Duration::from_secs(3 * 86_400));
    assert_eq!(a.retry_interval, Duration::from_millis(100));
    assert!(
        c.summary().contains("archive: /etc/sunopoll/files"),
        "{}",
        c.summary()
    );
    let p = problems(
        r#"
        [archive]
        dir = ""
        max-file-size = "12 parsecs"
        max-bytes-per-second = 0
        size = 1
        "#,
    );
    assert_eq!(p.len(), 4, "{p:?}");
    assert!(
        p.iter().any(|l| l.starts_with("archive.dir: is empty")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|l| l.contains("archive.max-file-size") && l.contains("unknown unit")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|l| l.contains("archive.max-bytes-per-second")),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.contains("archive.size")), "{p:?}");
}

#[test]
fn an_s3_archive_is_checked_and_stages_next_to_the_store() {
    let c = Config::parse(
        r#"
        [store]
        path = "/var/lib/sunopoll/sunopoll.db"
        [archive]
        url = "s3://kept/suno/files/"
        endpoint = "http://127.0.0.1:9000"
        allow-http = true
        credentials-file = "s3.keys"
        "#,
        Some(Path::new("/etc/sunopoll/config.toml")),
        &env(),
    )
    .expect("ok");
    let s3 = c.archive.s3.as_ref().expect("a bucket");
    assert!(c.archive.enabled());
    assert_eq!(
        (s3.bucket.as_str(), s3.prefix.as_str()),
        ("kept", "suno/files")
    );
    assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert_eq!(s3.region, "us-east-1");
    assert_eq!(
        s3.credentials_file.as_deref(),
        Some(Path::new("/etc/sunopoll/s3.keys"))
    );
    assert_eq!(
        s3.staging,
        PathBuf::from("/var/lib/sunopoll/archive-staging")
    );
    assert_eq!(
        c.archive.destination().as_deref(),
        Some("s3://kept/suno/files")
    );
    let p = problems(
        r#"
        [archive]
        dir = "/x"
        url = "https://kept"
        endpoint = "ftp://x"
        "#,
    );
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(
        p.iter().any(|l| l.contains("either `dir` or `url`")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|l| l.contains("not an s3://bucket/prefix")),
        "{p:?}"
    );
    assert!(p.iter().any(|l| l.starts_with("archive.endpoint")), "{p:?}");
    assert_eq!(
        parse_s3_url("s3://b").expect("bucket only"),
        ("b".to_owned(), String::new())
    );
    assert!(parse_s3_url("s3:///x").is_err());
}

#[test]
fn forward_proxy_is_off_by_default_and_must_be_an_http_url() {
    assert!(
        Config::parse("", None, &env())
            .expect("ok")
            .forward
            .proxy
            .is_none()
    );
    let c = Config::parse(
        "[forward]\nproxy = \"http://proxy.internal:3128\"\n",
        None,
        &env(),
    )
    .expect("ok");
    assert_eq!(
        c.forward.proxy.as_ref().map(url::Url::as_str),
        Some("http://proxy.internal:3128/")
    );
    for bad in ["socks5://127.0.0.1:1080", "not a url", ""] {
        let p = problems(&format!("[forward]\nproxy = \"{bad}\"\n"));
        assert!(
            p.iter().any(|p| p.contains("forward.proxy")),
            "{bad}: {p:?}"
        );
    }
}

#[test]
fn an_unnamed_target_is_named_by_its_url_without_credentials() {
    let c = Config::parse(
        "[[forward.target]]\nurl = \"http://hook:s3cret-pw@127.0.0.1:3000/cb\"\n",
        None,
        &env(),
    )
    .expect("ok");
    let t = &c.forward.targets[0];
    assert_eq!(t.name, "http://***@127.0.0.1:3000/cb");
    assert_eq!(
        t.url.password(),
        Some("s3cret-pw"),
        "the URL itself keeps them"
    );
    assert!(!c.summary().contains("s3cret-pw"), "{}", c.summary());
}

#[test]
fn a_base_url_with_the_api_path_in_it_is_refused_for_every_account() {
    let p = problems(
        r#"
[api]
base-url = "https://api.sunoapi.org/api/v1/generate"

[[api.account]]
name = "main"

[[api.account]]
name = "kie"
base-url = "https://api.kie.ai/api/v1"
"#,
    );
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("api.base-url: give the API's root (like \"https://api.sunoapi.org"),
        "{p:?}"
    );
    assert!(
        p[1].starts_with("api.account[1].base-url: give the API's root (like \"https://api.kie.ai"),
        "{p:?}"
    );
}

#[test]
fn a_postgres_store_takes_its_password_from_the_credential_then_the_file_and_never_shows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("db-password");
    std::fs::write(&file, "from-the-file\n").expect("write");
    let text = format!(
        "[store]\nurl = \"postgres://sunopoll@db.internal:5432/queue\"\npassword-file = \"{}\"\nlease = \"45s\"\n",
        file.display()
    );
    let c = Config::parse(&text, None, &env()).expect("ok");
    assert_eq!(c.store.lease, Duration::from_secs(45));
    let pg = c.store.postgres.as_ref().expect("a PostgreSQL store");
    assert_eq!(pg.shown(), "postgres://sunopoll@db.internal:5432/queue");
    assert!(!format!("{pg:?}").contains("from-the-file"));
    let summary = c.summary();
    assert!(
        !summary.contains("from-the-file") && summary.contains("PostgreSQL, shared; lease 45s"),
        "{summary}"
    );
    assert_eq!(
        store_password(&env(), Some(&file)).expect("read"),
        Some("from-the-file".to_owned())
    );
    // systemd's credential wins over the file.
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).expect("mkdir");
    std::fs::write(creds.join("store-password"), "from-systemd").expect("write");
    let with_creds = Environment {
        credentials_directory: Some(creds),
        ..env()
    };
    assert_eq!(
        store_password(&with_creds, Some(&file)).expect("read"),
        Some("from-systemd".to_owned())
    );
    assert_eq!(store_password(&env(), None).expect("none"), None);
    // An unreadable file and a file of two lines are problems of store.url, named by path.
    let missing = dir.path().join("nope");
    let e = store_password(&env(), Some(&missing)).expect_err("missing");
    assert!(e.contains("nope"), "{e}");
    std::fs::write(&file, "one\ntwo\n").expect("write");
    let e = store_password(&env(), Some(&file)).expect_err("two lines");
    assert!(e.contains("one line") && !e.contains("two"), "{e}");
}

#[test]
fn a_postgres_store_refuses_a_path_too_a_bad_url_and_a_lease_shorter_than_two_requests() {
    let both = problems("[store]\npath = \"/var/tmp/q.db\"\nurl = \"postgres://u@h/db\"\n");
    assert!(both.iter().any(|p| p.contains("not both")), "{both:?}");
    let bad = problems("[store]\nurl = \"postgres://u:secret@h:notaport/db\"\n");
    assert!(
        bad.iter().any(|p| p.starts_with("store.url")) && bad.iter().all(|p| !p.contains("secret")),
        "{bad:?}"
    );
    let no_db = problems("[store]\nurl = \"postgres://u@h\"\n");
    assert!(no_db.iter().any(|p| p.contains("no database")), "{no_db:?}");
    let short = problems("[store]\nurl = \"postgres://u@h/db\"\nlease = \"20s\"\n");
    assert!(
        short
            .iter()
            .any(|p| p.starts_with("store.lease") && p.contains("15s")),
        "{short:?}"
    );
}

#[test]
fn the_proxy_is_off_by_default_and_every_key_is_read() {
    let c = Config::parse("", None, &env()).expect("ok");
    assert_eq!(c.proxy.listen, None);
    assert_eq!(c.proxy.label_header.as_deref(), Some(DEFAULT_LABEL_HEADER));
    assert_eq!(c.proxy.max_body_size, DEFAULT_PROXY_MAX_BODY);
    assert_eq!(c.proxy.upstream_timeout, DEFAULT_UPSTREAM_TIMEOUT);
    assert!(c.summary().contains("\nproxy: off"), "{}", c.summary());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("app.token"), "file-token-0123456789abc\n").expect("write");
    let c = Config::parse(
        r#"
        [[api.account]]
        name = "main"
        [[api.account]]
        name = "kie"
        flavor = "kie"
        [proxy]
        listen = "127.0.0.1:8787"
        label-header = "X-Job"
        max-body-size = "64KiB"
        max-connections = 8
        header-timeout = "2s"
        body-timeout = "3s"
        upstream-timeout = "4s"
        max-wait = "0s"
        [[proxy.token]]
        token = "inline-token-0123456789"
        [[proxy.token]]
        token-file = "app.token"
        account = "kie"
        "#,
        Some(&dir.path().join("config.toml")),
        &env(),
    )
    .expect("ok");
    let p = &c.proxy;
    assert_eq!(p.listen, Some("127.0.0.1:8787".parse().expect("addr")));
    assert_eq!(p.label_header.as_deref(), Some("X-Job"));
    assert_eq!(p.max_body_size, 64 << 10);
    assert_eq!(p.max_connections, 8);
    assert_eq!(p.header_timeout, Duration::from_secs(2));
    assert_eq!(p.body_timeout, Duration::from_secs(3));
    assert_eq!(p.upstream_timeout, Duration::from_secs(4));
    assert_eq!(p.max_wait, Duration::ZERO);
    let tokens: Vec<(&str, &str)> = p
        .tokens
        .iter()
        .map(|t| (t.account.as_str(), t.expose()))
        .collect();
    assert_eq!(
        tokens,
        [
            ("main", "inline-token-0123456789"),
            ("kie", "file-token-0123456789abc")
        ],
        "the first account by default; a file's first line"
    );
    let shown = format!("{:?} {}", c.proxy, c.summary());
    assert!(
        !shown.contains("inline-token") && !shown.contains("file-token"),
        "{shown}"
    );
    assert!(
        c.summary()
            .contains("proxy: http://127.0.0.1:8787 (2 tokens"),
        "{shown}"
    );
    let none = Config::parse("[proxy]\nlabel-header = \"\"\n", None, &env()).expect("ok");
    assert_eq!(none.proxy.label_header, None, "\"\" takes no label");
}

#[test]
fn every_proxy_problem_is_reported_at_once() {
    let p = problems(
        r#"
        [proxy]
        listen = "0.0.0.0:8787"
        label-header = "Authorization"
        max-body-size = 0
        [[proxy.token]]
        token = "short"
        [[proxy.token]]
        token = "long-enough-token-0123"
        token-file = "t"
        [[proxy.token]]
        account = "nobody"
        token = "another-long-token-0123"
        [[proxy.token]]
        token-file = "/nonexistent/sunopoll.token"
        "#,
    );
    let all = p.join("\n");
    for needle in [
        "proxy.listen: 0.0.0.0:8787 is not a loopback address",
        "set proxy.allow-remote = true",
        "proxy.label-header: \"Authorization\" means something else",
        "proxy.max-body-size: must be at least 1 byte",
        "proxy.token[0].token: is shorter than 16 characters",
        "proxy.token[1].token: set either `token` or `token-file`, not both",
        "proxy.token[2].account: no account is named \"nobody\"; the configured accounts are default",
        "proxy.token[3].token-file: cannot read /nonexistent/sunopoll.token",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(p.len(), 7, "{all}");
    let c = Config::parse(
        "[proxy]\nlisten = \"0.0.0.0:8787\"\nallow-remote = true\n",
        None,
        &env(),
    )
    .expect("allowed on purpose");
    assert!(c.proxy.allow_remote);
}
