//! Configuration: the TOML file, its defaults, and where the API key comes from.
//!
//! The file is read into a TOML table and walked key by key, so that every problem (an unknown
//! key, a wrong type, a bad value) is collected and reported at once, each naming its key, instead
//! of stopping at the first as `serde`'s `deny_unknown_fields` would. The API key never sits in the
//! file: it comes from `$CREDENTIALS_DIRECTORY/api-key`, `api.key-file`, or `SUNO_API_KEY`.
//!
//! Nothing here reads the process environment directly: [`Environment`] is captured once in
//! `main` and passed in, so tests can give any environment they like.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use toml::{Table, Value};

use crate::api::ApiKey;
use crate::clock::{format_duration, parse_duration};
use crate::logging::LogFormat;

/// The default API host (sunoapi.org). kie.ai and other clones serve the same paths.
pub const DEFAULT_BASE_URL: &str = "https://api.sunoapi.org";
/// The API's documented polling cadence ("we recommend querying every 30 seconds").
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// The account limit the API documents: 20 requests per 10 s.
pub const DEFAULT_MAX_RPS: f64 = 2.0;
/// Slowest request rate accepted: one request per ~17 minutes. Below that the rate is a typo.
pub const MIN_RPS: f64 = 0.001;
/// Fastest request rate accepted (use "unlimited" beyond it).
pub const MAX_RPS: f64 = 1_000_000.0;
/// Parallel requests: enough to keep up with the rate limit over a slow link, few enough to
/// stay polite.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;
/// Ceiling of the global backoff. Ten minutes keeps an outage from costing more than one probe
/// per ten minutes, yet notices recovery soon enough.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(600);
/// Generations take 1–3 minutes; a task unfinished after two hours is not coming back.
pub const DEFAULT_TASK_DEADLINE: Duration = Duration::from_secs(2 * 3600);
/// The callback's own timeout is 15 s; a poll should not wait longer than that.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long finished tasks and their events are kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Prune once a day at 04:17 UTC (off the hour, when little else runs).
pub const DEFAULT_PRUNE_SCHEDULE: &str = "17 4 * * *";
/// How long a control connection may sit without sending a complete request line: long
/// enough for a person typing into `socat`, short enough that forgotten connections do not pile up.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The store's file name inside its directory.
pub const STORE_FILE: &str = "sunopoll.db";
/// The control socket's file name inside its directory.
pub const SOCKET_FILE: &str = "sunopoll.sock";
/// Where the system service's socket lives (see `systemd/sunopoll.socket`). Outside any
/// `RuntimeDirectory=`, which systemd deletes on stop.
pub const SYSTEM_SOCKET: &str = "/run/sunopoll.sock";

/// The parts of the process environment that configuration depends on.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// The effective user id (0 for root).
    pub uid: u32,
    /// `$HOME`.
    pub home: Option<PathBuf>,
    /// `$XDG_STATE_HOME`.
    pub xdg_state_home: Option<PathBuf>,
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$STATE_DIRECTORY` (systemd `StateDirectory=`).
    pub state_directory: Option<PathBuf>,
    /// `$RUNTIME_DIRECTORY` (systemd `RuntimeDirectory=`).
    pub runtime_directory: Option<PathBuf>,
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub credentials_directory: Option<PathBuf>,
    /// `$SUNO_API_KEY`.
    pub suno_api_key: Option<String>,
}

impl Environment {
    /// Reads the real process environment. Called once, in `main`.
    pub fn from_process() -> Environment {
        let path = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        // systemd may pass several directories separated by ':'; the first is ours.
        let first = |p: Option<PathBuf>| {
            p.map(|p| {
                let s = p.to_string_lossy().into_owned();
                PathBuf::from(s.split(':').next().unwrap_or_default())
            })
        };
        Environment {
            uid: current_uid(),
            home: path("HOME"),
            xdg_state_home: path("XDG_STATE_HOME"),
            xdg_runtime_dir: path("XDG_RUNTIME_DIR"),
            state_directory: first(path("STATE_DIRECTORY")),
            runtime_directory: first(path("RUNTIME_DIRECTORY")),
            credentials_directory: path("CREDENTIALS_DIRECTORY"),
            suno_api_key: std::env::var("SUNO_API_KEY").ok().filter(|v| !v.is_empty()),
        }
    }

    /// The store path used when the config names none.
    pub fn default_store_path(&self) -> PathBuf {
        if let Some(dir) = &self.state_directory {
            return dir.join(STORE_FILE);
        }
        if self.uid == 0 {
            return PathBuf::from("/var/lib/sunopoll").join(STORE_FILE);
        }
        let base = self
            .xdg_state_home
            .clone()
            .or_else(|| self.home.as_ref().map(|h| h.join(".local/state")))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/sunopoll-{}", self.uid)));
        base.join("sunopoll").join(STORE_FILE)
    }

    /// The socket path used when the config names none.
    pub fn default_socket_path(&self) -> PathBuf {
        if let Some(dir) = &self.runtime_directory {
            return dir.join(SOCKET_FILE);
        }
        if self.uid == 0 {
            return PathBuf::from(SYSTEM_SOCKET);
        }
        match &self.xdg_runtime_dir {
            Some(dir) => dir.join(SOCKET_FILE),
            None => PathBuf::from(format!("/tmp/sunopoll-{}", self.uid)).join(SOCKET_FILE),
        }
    }
}

/// The effective uid, read without `unsafe`: `/proc/self` is owned by the process's user.
pub fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

/// The whole configuration, with defaults filled in.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    /// `[api]`
    pub api: ApiConfig,
    /// `[poll]`
    pub poll: PollConfig,
    /// `[store]`
    pub store: StoreConfig,
    /// `[control]`
    pub control: ControlConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[housekeeping]`
    pub housekeeping: HousekeepingConfig,
    /// `[forward]`
    pub forward: ForwardConfig,
}

/// `[api]`: where the API is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `base-url`.
    pub base_url: url::Url,
    /// `key-file`: a file holding the API key.
    pub key_file: Option<PathBuf>,
    /// `request-timeout`: the whole request, connect to last byte.
    pub request_timeout: Duration,
}

/// `[poll]`: how often and how hard to poll.
#[derive(Debug, Clone)]
pub struct PollConfig {
    /// `interval`: between two polls of one task, and the first global backoff step.
    pub interval: Duration,
    /// `max-in-flight`: requests at once, over all tasks.
    pub max_in_flight: usize,
    /// `max-requests-per-second`; `None` is unlimited.
    pub max_requests_per_second: Option<f64>,
    /// `backoff-max`: the longest global pause.
    pub backoff_max: Duration,
    /// `task-deadline`: after this long since `add`, a task ends with an `error` (408).
    pub task_deadline: Duration,
    /// `fill-skipped-stages`: emit `text`/`first` before `complete` when a poll skipped them.
    pub fill_skipped_stages: bool,
}

/// `[store]`
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `path`: the SQLite file.
    pub path: PathBuf,
}

/// `[control]`: the local socket.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// `socket`: its path.
    pub socket: PathBuf,
    /// True when `socket` was set in the file (the CLI then looks nowhere else).
    pub socket_configured: bool,
    /// `mode`: permission bits, `0600` by default.
    pub mode: u32,
    /// `group`: group owner (name or number), for shared access.
    pub group: Option<String>,
    /// `idle-timeout`: how long a connection may wait without sending a complete request.
    pub idle_timeout: Duration,
}

/// `[log]`
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `level`: error, warn, info, debug or trace.
    pub level: String,
    /// `format`: auto, journald, plain or json (see [`crate::logging`]).
    pub format: LogFormat,
}

/// `[housekeeping]`
#[derive(Debug, Clone)]
pub struct HousekeepingConfig {
    /// `retention`: how long finished tasks and their events are kept.
    pub retention: Duration,
    /// `prune-schedule`: a cron expression (5 fields, or 6 with seconds), in UTC.
    pub prune_schedule: croner::Cron,
}

/// The default delivery retry schedule: Svix's (and close to the Standard Webhooks
/// recommendation), eight attempts over about 27.5 hours, so a handler can be down for a day.
pub const DEFAULT_RETRY_SCHEDULE: [Duration; 8] = [
    Duration::from_secs(0),
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];
/// A forward request's timeout: the API's own callback timeout.
pub const DEFAULT_FORWARD_TIMEOUT: Duration = Duration::from_secs(15);
/// Deliveries in flight at once, over all targets.
pub const DEFAULT_FORWARD_IN_FLIGHT: usize = 16;
/// Hosts a task's own `callBackUrl` may point at when `use-task-callback-url` is on: loopback.
pub const DEFAULT_ALLOW_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Target name of the per-task URL given with `add --callback-url`.
pub const TARGET_TASK_URL: &str = "callback-url";
/// Target name of the `callBackUrl` a task was submitted with (`use-task-callback-url`).
pub const TARGET_SUBMITTED_URL: &str = "submitted-callback-url";

/// `[forward]`: where events go besides the log and the event stream.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// `[[forward.target]]` entries.
    pub targets: Vec<TargetConfig>,
    /// `retry-schedule`: N delays, N attempts; the first counts from when the event is stored.
    pub retry_schedule: Vec<Duration>,
    /// `use-task-callback-url`: also deliver to the `callBackUrl` in record-info's `data.param`.
    pub use_task_callback_url: bool,
    /// `allow-hosts`: hosts such a URL may point at.
    pub allow_hosts: Vec<String>,
    /// `task-secret` / `task-secret-file`: signs deliveries to per-task URLs.
    pub task_secret: Option<SigningSecret>,
    /// `timeout`: per request to per-task URLs.
    pub timeout: Duration,
    /// `max-in-flight`: deliveries at once over all targets.
    pub max_in_flight: usize,
}

impl ForwardConfig {
    fn defaults() -> ForwardConfig {
        ForwardConfig {
            targets: Vec::new(),
            retry_schedule: DEFAULT_RETRY_SCHEDULE.to_vec(),
            use_task_callback_url: false,
            allow_hosts: DEFAULT_ALLOW_HOSTS
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
            task_secret: None,
            timeout: DEFAULT_FORWARD_TIMEOUT,
            max_in_flight: DEFAULT_FORWARD_IN_FLIGHT,
        }
    }

    /// True when `url`'s host is in `allow-hosts` (exact, case-insensitive).
    pub fn allows_host(&self, url: &url::Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allow_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// One `[[forward.target]]`.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// `name` (default: the URL). Deliveries are tracked per name.
    pub name: String,
    /// `url`: where to POST.
    pub url: url::Url,
    /// `stages`: which events go there (default all).
    pub stages: Vec<crate::events::Stage>,
    /// `secret` / `secret-file`: Standard Webhooks signing secret.
    pub secret: Option<SigningSecret>,
    /// `headers`: extra request headers.
    pub headers: Vec<(String, String)>,
    /// `timeout`: per request.
    pub timeout: Duration,
}

/// A Standard Webhooks signing secret (`whsec_` + base64 of the key). Never printed.
#[derive(Clone)]
pub struct SigningSecret(Vec<u8>);

impl SigningSecret {
    /// Parses `whsec_<base64>` (the prefix is optional).
    pub fn parse(text: &str) -> Result<SigningSecret, String> {
        use base64::Engine as _;
        let b64 = text.trim();
        let b64 = b64.strip_prefix("whsec_").unwrap_or(b64);
        let key = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "a signing secret must be `whsec_` followed by base64".to_owned())?;
        if key.len() < 16 {
            return Err(format!(
                "the signing secret is only {} bytes; use at least 16 (24–64 recommended)",
                key.len()
            ));
        }
        Ok(SigningSecret(key))
    }

    /// The key bytes, for the HMAC only.
    pub fn key(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(***)")
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, if there was one.
    pub file: Option<PathBuf>,
    /// One line per problem, each naming its key.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        match &self.file {
            Some(file) => write!(
                f,
                "{}: {n} problem{}",
                file.display(),
                if n == 1 { "" } else { "s" }
            )?,
            None => write!(
                f,
                "configuration: {n} problem{}",
                if n == 1 { "" } else { "s" }
            )?,
        }
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The built-in defaults for `env`, as used with no `--config`.
    pub fn defaults(env: &Environment) -> Config {
        Config {
            source: None,
            api: ApiConfig {
                base_url: url::Url::parse(DEFAULT_BASE_URL).expect("the default URL parses"),
                key_file: None,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
            },
            poll: PollConfig {
                interval: DEFAULT_INTERVAL,
                max_in_flight: DEFAULT_MAX_IN_FLIGHT,
                max_requests_per_second: Some(DEFAULT_MAX_RPS),
                backoff_max: DEFAULT_BACKOFF_MAX,
                task_deadline: DEFAULT_TASK_DEADLINE,
                fill_skipped_stages: true,
            },
            store: StoreConfig {
                path: env.default_store_path(),
            },
            control: ControlConfig {
                socket: env.default_socket_path(),
                socket_configured: false,
                mode: 0o600,
                group: None,
                idle_timeout: DEFAULT_IDLE_TIMEOUT,
            },
            log: LogConfig {
                level: "info".to_owned(),
                format: LogFormat::Auto,
            },
            housekeeping: HousekeepingConfig {
                retention: DEFAULT_RETENTION,
                prune_schedule: croner::Cron::from_str(DEFAULT_PRUNE_SCHEDULE)
                    .expect("the default schedule parses"),
            },
            forward: ForwardConfig::defaults(),
        }
    }

    /// Reads and checks `path`, or returns the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>, env: &Environment) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::defaults(env));
        };
        let fail = |problem: String| ConfigError {
            file: Some(path.to_owned()),
            problems: vec![problem],
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        Config::parse(&text, Some(path), env)
    }

    /// Parses config text. `path` names the file in errors and anchors relative paths.
    pub fn parse(
        text: &str,
        path: Option<&Path>,
        env: &Environment,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::defaults(env);
        config.source = path.map(Path::to_owned);
        let root: Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigError {
                    file: path.map(Path::to_owned),
                    problems: vec![format!("not valid TOML: {}", e.to_string().trim())],
                });
            }
        };
        let base_dir = path
            .and_then(Path::parent)
            .map(Path::to_owned)
            .unwrap_or_default();
        let mut r = Reader {
            problems: Vec::new(),
            base_dir,
        };
        r.check_keys(
            "",
            &root,
            &[
                "api",
                "poll",
                "store",
                "control",
                "log",
                "housekeeping",
                "forward",
            ],
        );

        if let Some(t) = r.section(&root, "api", &["base-url", "key-file", "request-timeout"]) {
            if let Some(s) = r.string(t, "api", "base-url") {
                match url::Url::parse(&s) {
                    Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.has_host() => {
                        // `join` treats a base without a trailing slash as a file; keep any path.
                        let mut u = u;
                        if !u.path().ends_with('/') {
                            let p = format!("{}/", u.path());
                            u.set_path(&p);
                        }
                        config.api.base_url = u;
                    }
                    Ok(_) => r.problem(
                        "api.base-url",
                        format!("`{s}` must be an http:// or https:// URL"),
                    ),
                    Err(e) => r.problem("api.base-url", format!("`{s}` is not a URL: {e}")),
                }
            }
            config.api.key_file = r.path(t, "api", "key-file");
            if let Some(d) = r.duration(t, "api", "request-timeout", Duration::from_millis(1)) {
                config.api.request_timeout = d;
            }
        }

        if let Some(t) = r.section(
            &root,
            "poll",
            &[
                "interval",
                "max-in-flight",
                "max-requests-per-second",
                "backoff-max",
                "task-deadline",
                "fill-skipped-stages",
            ],
        ) {
            if let Some(d) = r.duration(t, "poll", "interval", Duration::from_millis(1)) {
                config.poll.interval = d;
            }
            if let Some(n) = r.integer(t, "poll", "max-in-flight", 1, 1024) {
                config.poll.max_in_flight = usize::try_from(n).unwrap_or(1);
            }
            match t.get("max-requests-per-second") {
                None => {}
                Some(Value::String(s)) if s == "unlimited" => {
                    config.poll.max_requests_per_second = None
                }
                Some(v) => match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
                    Some(x) if (MIN_RPS..=MAX_RPS).contains(&x) => {
                        config.poll.max_requests_per_second = Some(x);
                    }
                    _ => r.problem(
                        "poll.max-requests-per-second",
                        format!(
                            "expected a number from {MIN_RPS} to {MAX_RPS} (like 2 or 0.5) or \"unlimited\", got {}",
                            show(v)
                        ),
                    ),
                },
            }
            if let Some(d) = r.duration(t, "poll", "backoff-max", Duration::from_millis(1)) {
                config.poll.backoff_max = d;
            }
            if let Some(d) = r.duration(t, "poll", "task-deadline", Duration::from_millis(1)) {
                config.poll.task_deadline = d;
            }
            if let Some(b) = r.boolean(t, "poll", "fill-skipped-stages") {
                config.poll.fill_skipped_stages = b;
            }
            if config.poll.backoff_max < config.poll.interval {
                r.problem(
                    "poll.backoff-max",
                    format!(
                        "{} is shorter than poll.interval ({}); backoff starts at the interval",
                        format_duration(config.poll.backoff_max),
                        format_duration(config.poll.interval)
                    ),
                );
            }
        }

        if let Some(t) = r.section(&root, "store", &["path"])
            && let Some(p) = r.path(t, "store", "path")
        {
            config.store.path = p;
        }

        if let Some(t) = r.section(
            &root,
            "control",
            &["socket", "mode", "group", "idle-timeout"],
        ) {
            if let Some(p) = r.path(t, "control", "socket") {
                config.control.socket = p;
                config.control.socket_configured = true;
            }
            match t.get("mode") {
                None => {}
                Some(v) => match parse_mode(v) {
                    Ok(m) => config.control.mode = m,
                    Err(why) => r.problem("control.mode", why),
                },
            }
            match t.get("group") {
                None => {}
                Some(Value::String(s)) if !s.trim().is_empty() => {
                    config.control.group = Some(s.trim().to_owned())
                }
                Some(Value::Integer(i)) if *i >= 0 => config.control.group = Some(i.to_string()),
                Some(v) => r.problem(
                    "control.group",
                    format!("expected a group name or number, got {}", show(v)),
                ),
            }
            if let Some(d) = r.duration(t, "control", "idle-timeout", Duration::from_millis(10)) {
                config.control.idle_timeout = d;
            }
        }

        if let Some(t) = r.section(&root, "log", &["level", "format"]) {
            if let Some(s) = r.string(t, "log", "level") {
                let level = s.to_ascii_lowercase();
                if ["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
                    config.log.level = level;
                } else {
                    r.problem(
                        "log.level",
                        format!("`{s}` is not one of error, warn, info, debug, trace"),
                    );
                }
            }
            if let Some(s) = r.string(t, "log", "format") {
                match LogFormat::parse(&s) {
                    Some(f) => config.log.format = f,
                    None => r.problem(
                        "log.format",
                        format!("`{s}` is not one of {}", LogFormat::NAMES.join(", ")),
                    ),
                }
            }
        }

        if let Some(t) = r.section(&root, "housekeeping", &["retention", "prune-schedule"]) {
            if let Some(d) = r.duration(t, "housekeeping", "retention", Duration::ZERO) {
                config.housekeeping.retention = d;
            }
            if let Some(s) = r.string(t, "housekeeping", "prune-schedule") {
                match croner::Cron::from_str(&s) {
                    Ok(c) => config.housekeeping.prune_schedule = c,
                    Err(e) => r.problem(
                        "housekeeping.prune-schedule",
                        format!("`{s}` is not a cron expression: {e}"),
                    ),
                }
            }
        }

        if let Some(t) = r.section(
            &root,
            "forward",
            &[
                "target",
                "retry-schedule",
                "use-task-callback-url",
                "allow-hosts",
                "task-secret",
                "task-secret-file",
                "timeout",
                "max-in-flight",
            ],
        ) {
            r.forward(t, &mut config.forward);
        }

        if r.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: path.map(Path::to_owned),
                problems: r.problems,
            })
        }
    }

    /// Finds the API key: `$CREDENTIALS_DIRECTORY/api-key`, else `api.key-file`, else
    /// `SUNO_API_KEY`. The error names all three places.
    pub fn api_key(&self, env: &Environment) -> Result<ApiKey, String> {
        if let Some(dir) = &env.credentials_directory {
            let file = dir.join("api-key");
            match std::fs::read_to_string(&file) {
                Ok(text) => {
                    return ApiKey::parse(&text)
                        .map_err(|why| format!("the API key credential {} {why}", file.display()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(format!(
                        "cannot read the API key credential {}: {e}",
                        file.display()
                    ));
                }
            }
        }
        if let Some(file) = &self.api.key_file {
            return match std::fs::read_to_string(file) {
                Ok(text) => ApiKey::parse(&text).map_err(|why| {
                    format!("the API key file {} (api.key-file) {why}", file.display())
                }),
                Err(e) => Err(format!(
                    "cannot read the API key file {} (api.key-file): {e}",
                    file.display()
                )),
            };
        }
        if let Some(text) = env.suno_api_key.as_deref() {
            return ApiKey::parse(text).map_err(|why| format!("SUNO_API_KEY {why}"));
        }
        Err(
            "no API key found: sunopoll looks in $CREDENTIALS_DIRECTORY/api-key (systemd \
             LoadCredential=api-key:…), then in the file named by `key-file` in [api], then in the \
             SUNO_API_KEY environment variable"
                .to_owned(),
        )
    }

    /// A short human summary, for `check-config` and the startup log.
    pub fn summary(&self) -> String {
        let mut s = self.base_summary();
        let f = &self.forward;
        let schedule: Vec<String> = f
            .retry_schedule
            .iter()
            .map(|d| format_duration(*d))
            .collect();
        s.push_str(&format!(
            "\nforward: {} target{}, retry schedule [{}], use-task-callback-url {} (allow-hosts: {}), task-secret {}",
            f.targets.len(),
            if f.targets.len() == 1 { "" } else { "s" },
            schedule.join(", "),
            f.use_task_callback_url,
            f.allow_hosts.join(", "),
            if f.task_secret.is_some() { "set" } else { "not set" },
        ));
        for t in &f.targets {
            let stages: Vec<&str> = t.stages.iter().map(|s| s.as_str()).collect();
            s.push_str(&format!(
                "\n  target {:?}: {} (stages {}, timeout {}, {}signed, {} extra header{})",
                t.name,
                crate::api::redact_url(t.url.as_str()),
                stages.join("/"),
                format_duration(t.timeout),
                if t.secret.is_some() { "" } else { "not " },
                t.headers.len(),
                if t.headers.len() == 1 { "" } else { "s" },
            ));
        }
        s
    }

    fn base_summary(&self) -> String {
        format!(
            "config: {}\napi: {} (timeout {})\npoll: every {}, at most {} in flight, {}, backoff up to {}, deadline {}, fill skipped stages: {}\nstore: {}\nsocket: {} (mode {:04o}{})\nlog: level {}, format {}\nhousekeeping: keep {}, prune on \"{}\" (UTC)",
            self.source.as_ref().map_or_else(
                || "built-in defaults".to_owned(),
                |p| p.display().to_string()
            ),
            crate::api::redact_url(self.api.base_url.as_str()),
            format_duration(self.api.request_timeout),
            format_duration(self.poll.interval),
            self.poll.max_in_flight,
            self.poll.max_requests_per_second.map_or_else(
                || "no request rate limit".to_owned(),
                |r| format!("at most {r} requests/s")
            ),
            format_duration(self.poll.backoff_max),
            format_duration(self.poll.task_deadline),
            self.poll.fill_skipped_stages,
            self.store.path.display(),
            self.control.socket.display(),
            self.control.mode,
            self.control
                .group
                .as_ref()
                .map_or_else(String::new, |g| format!(", group {g}")),
            self.log.level,
            self.log.format.as_str(),
            format_duration(self.housekeeping.retention),
            self.housekeeping.prune_schedule.pattern,
        )
    }
}

/// The `control.socket` a config file names, if any, for the CLI: only that key is read, so a
/// client needs neither the daemon's secret files nor a config that would pass every check.
pub fn control_socket_in(path: &Path) -> Result<Option<PathBuf>, ConfigError> {
    let fail = |problem: String| ConfigError {
        file: Some(path.to_owned()),
        problems: vec![problem],
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let root: Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(format!("not valid TOML: {}", e.to_string().trim())))?;
    match root.get("control").and_then(|c| c.get("socket")) {
        None => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => {
            let p = PathBuf::from(s);
            Ok(Some(if p.is_absolute() {
                p
            } else {
                path.parent().unwrap_or(Path::new("")).join(p)
            }))
        }
        Some(other) => Err(fail(format!(
            "control.socket: expected a path, got {}",
            show(other)
        ))),
    }
}

/// `mode = "0660"` or `mode = 0o660`.
fn parse_mode(v: &Value) -> Result<u32, String> {
    let mode = match v {
        Value::String(s) => u32::from_str_radix(s.trim().trim_start_matches("0o"), 8)
            .map_err(|_| format!("`{s}` is not an octal mode like \"0660\""))?,
        Value::Integer(i) => u32::try_from(*i).map_err(|_| format!("{i} is not a file mode"))?,
        other => {
            return Err(format!(
                "expected an octal mode like \"0660\", got {}",
                show(other)
            ));
        }
    };
    if mode & !0o777 != 0 {
        return Err(format!("{mode:o} has bits outside 0777"));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "{mode:04o} does not let the daemon's own user read and write the socket"
        ));
    }
    Ok(mode)
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string \"{s}\""),
        Value::Integer(i) => format!("the integer {i}"),
        Value::Float(f) => format!("the number {f}"),
        Value::Boolean(b) => format!("the boolean {b}"),
        Value::Datetime(d) => format!("the date {d}"),
        Value::Array(_) => "an array".to_owned(),
        Value::Table(_) => "a table".to_owned(),
    }
}

/// Walks the TOML tree, collecting problems.
struct Reader {
    problems: Vec<String>,
    base_dir: PathBuf,
}

impl Reader {
    fn problem(&mut self, key: &str, what: String) {
        self.problems.push(format!("{key}: {what}"));
    }

    fn check_keys(&mut self, section: &str, table: &Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let name = if section.is_empty() {
                    format!("[{key}]")
                } else {
                    format!("{section}.{key}")
                };
                let hint = closest(key, known)
                    .map(|k| format!(" (did you mean `{k}`?)"))
                    .unwrap_or_default();
                let kind = if section.is_empty() {
                    "unknown section"
                } else {
                    "unknown key"
                };
                self.problems.push(format!(
                    "{name}: {kind}{hint}; known {}: {}",
                    if section.is_empty() {
                        "sections"
                    } else {
                        "keys"
                    },
                    known.join(", ")
                ));
            }
        }
    }

    fn section<'a>(&mut self, root: &'a Table, name: &str, known: &[&str]) -> Option<&'a Table> {
        match root.get(name)? {
            Value::Table(t) => {
                self.check_keys(name, t, known);
                Some(t)
            }
            other => {
                self.problem(
                    name,
                    format!("expected a [{name}] table, got {}", show(other)),
                );
                None
            }
        }
    }

    fn string(&mut self, t: &Table, section: &str, key: &str) -> Option<String> {
        match t.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("expected a string, got {}", show(other)),
                );
                None
            }
        }
    }

    fn path(&mut self, t: &Table, section: &str, key: &str) -> Option<PathBuf> {
        let s = self.string(t, section, key)?;
        if s.trim().is_empty() {
            self.problem(&format!("{section}.{key}"), "is empty".to_owned());
            return None;
        }
        let p = PathBuf::from(s);
        Some(if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        })
    }

    fn boolean(&mut self, t: &Table, section: &str, key: &str) -> Option<bool> {
        match t.get(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("expected true or false, got {}", show(other)),
                );
                None
            }
        }
    }

    fn integer(&mut self, t: &Table, section: &str, key: &str, min: i64, max: i64) -> Option<i64> {
        match t.get(key)? {
            Value::Integer(i) if (min..=max).contains(i) => Some(*i),
            Value::Integer(i) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("{i} is outside {min}..={max}"),
                );
                None
            }
            other => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("expected an integer, got {}", show(other)),
                );
                None
            }
        }
    }

    fn duration(&mut self, t: &Table, section: &str, key: &str, min: Duration) -> Option<Duration> {
        let name = format!("{section}.{key}");
        match t.get(key)? {
            Value::String(s) => match parse_duration(s) {
                Ok(d) if d >= min => Some(d),
                Ok(d) => {
                    self.problem(
                        &name,
                        format!(
                            "{} is too short (at least {})",
                            format_duration(d),
                            format_duration(min)
                        ),
                    );
                    None
                }
                Err(e) => {
                    self.problem(&name, e);
                    None
                }
            },
            other => {
                self.problem(
                    &name,
                    format!(
                        "expected a duration string like \"30s\" or \"2h\", got {}",
                        show(other)
                    ),
                );
                None
            }
        }
    }
}

impl Reader {
    fn forward(&mut self, t: &Table, f: &mut ForwardConfig) {
        match t.get("retry-schedule") {
            None => {}
            Some(Value::Array(items)) if !items.is_empty() => {
                let mut schedule = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str().map(parse_duration) {
                        Some(Ok(d)) => schedule.push(d),
                        Some(Err(e)) => self.problem(&format!("forward.retry-schedule[{i}]"), e),
                        None => self.problem(
                            &format!("forward.retry-schedule[{i}]"),
                            format!("expected a duration string like \"5m\", got {}", show(item)),
                        ),
                    }
                }
                f.retry_schedule = schedule;
            }
            Some(v) => self.problem(
                "forward.retry-schedule",
                format!(
                    "expected a non-empty list of durations like [\"0s\", \"5s\", \"5m\"], got {}",
                    show(v)
                ),
            ),
        }
        if let Some(b) = self.boolean(t, "forward", "use-task-callback-url") {
            f.use_task_callback_url = b;
        }
        match t.get("allow-hosts") {
            None => {}
            Some(Value::Array(items)) => {
                let hosts: Vec<String> = items
                    .iter()
                    .filter_map(|v| v.as_str().map(|s| s.trim().to_owned()))
                    .collect();
                if hosts.len() != items.len() || hosts.iter().any(String::is_empty) {
                    self.problem(
                        "forward.allow-hosts",
                        "expected a list of host names or addresses".to_owned(),
                    );
                } else {
                    f.allow_hosts = hosts;
                }
            }
            Some(v) => self.problem(
                "forward.allow-hosts",
                format!("expected a list of hosts, got {}", show(v)),
            ),
        }
        f.task_secret = self.secret(t, "forward", "task-secret", "task-secret-file");
        if let Some(d) = self.duration(t, "forward", "timeout", Duration::from_millis(1)) {
            f.timeout = d;
        }
        if let Some(n) = self.integer(t, "forward", "max-in-flight", 1, 1024) {
            f.max_in_flight = usize::try_from(n).unwrap_or(1);
        }
        match t.get("target") {
            None => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    let key = format!("forward.target[{i}]");
                    match item {
                        Value::Table(tt) => {
                            if let Some(target) = self.target(&key, tt, f.timeout) {
                                f.targets.push(target);
                            }
                        }
                        other => self.problem(
                            &key,
                            format!("expected a [[forward.target]] table, got {}", show(other)),
                        ),
                    }
                }
            }
            Some(v) => self.problem(
                "forward.target",
                format!("expected [[forward.target]] tables, got {}", show(v)),
            ),
        }
        let mut names = std::collections::HashSet::new();
        for target in &f.targets {
            if !names.insert(target.name.clone()) {
                self.problem(
                    "forward.target",
                    format!(
                        "two targets are named {:?}; give each a distinct `name`",
                        target.name
                    ),
                );
            }
        }
    }

    fn target(&mut self, key: &str, t: &Table, default_timeout: Duration) -> Option<TargetConfig> {
        self.check_keys(
            key,
            t,
            &[
                "name",
                "url",
                "stages",
                "secret",
                "secret-file",
                "headers",
                "timeout",
            ],
        );
        let before = self.problems.len();
        let url = match self.string(t, key, "url") {
            None => {
                if !t.contains_key("url") {
                    self.problem(&format!("{key}.url"), "is required".to_owned());
                }
                None
            }
            Some(s) => match url::Url::parse(&s) {
                Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.has_host() => Some(u),
                _ => {
                    self.problem(
                        &format!("{key}.url"),
                        format!("`{s}` is not an http:// or https:// URL"),
                    );
                    None
                }
            },
        };
        let name = match self.string(t, key, "name") {
            Some(n) if n.trim().is_empty() || n.chars().any(char::is_control) => {
                self.problem(
                    &format!("{key}.name"),
                    "must be non-empty text without control characters".to_owned(),
                );
                None
            }
            Some(n) if n == TARGET_TASK_URL || n == TARGET_SUBMITTED_URL => {
                self.problem(
                    &format!("{key}.name"),
                    format!("{n:?} is reserved for per-task URLs"),
                );
                None
            }
            other => other,
        };
        let stages = match t.get("stages") {
            None => crate::events::Stage::ALL.to_vec(),
            Some(Value::Array(items)) => {
                let mut stages = Vec::new();
                for item in items {
                    match item.as_str().and_then(crate::events::Stage::parse) {
                        Some(s) => stages.push(s),
                        None => self.problem(
                            &format!("{key}.stages"),
                            format!(
                                "{} is not one of \"text\", \"first\", \"complete\", \"error\"",
                                show(item)
                            ),
                        ),
                    }
                }
                if items.is_empty() {
                    self.problem(
                        &format!("{key}.stages"),
                        "is empty: the target would get nothing".to_owned(),
                    );
                }
                stages
            }
            Some(v) => {
                self.problem(
                    &format!("{key}.stages"),
                    format!(
                        "expected a list like [\"complete\", \"error\"], got {}",
                        show(v)
                    ),
                );
                Vec::new()
            }
        };
        let secret = self.secret(t, key, "secret", "secret-file");
        let mut headers = Vec::new();
        match t.get("headers") {
            None => {}
            Some(Value::Table(h)) => {
                for (name, value) in h {
                    let lower = name.to_ascii_lowercase();
                    let reserved = lower.starts_with("webhook-")
                        || [
                            "content-type",
                            "content-length",
                            "host",
                            "transfer-encoding",
                        ]
                        .contains(&lower.as_str());
                    match value.as_str() {
                        _ if reserved => self.problem(
                            &format!("{key}.headers.{name}"),
                            "is set by sunopoll itself and cannot be overridden".to_owned(),
                        ),
                        Some(v)
                            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                                && reqwest::header::HeaderValue::from_str(v).is_ok() =>
                        {
                            headers.push((name.clone(), v.to_owned()));
                        }
                        _ => self.problem(
                            &format!("{key}.headers.{name}"),
                            "is not a valid HTTP header name and string value".to_owned(),
                        ),
                    }
                }
            }
            Some(v) => self.problem(
                &format!("{key}.headers"),
                format!("expected a table of strings, got {}", show(v)),
            ),
        }
        let timeout = self
            .duration(t, key, "timeout", Duration::from_millis(1))
            .unwrap_or(default_timeout);
        if self.problems.len() > before {
            return None;
        }
        let url = url?;
        Some(TargetConfig {
            name: name.unwrap_or_else(|| url.to_string()),
            url,
            stages,
            secret,
            headers,
            timeout,
        })
    }

    /// A secret given inline (`secret_key`) or in a file (`file_key`), not both.
    fn secret(
        &mut self,
        t: &Table,
        section: &str,
        secret_key: &str,
        file_key: &str,
    ) -> Option<SigningSecret> {
        let inline = self.string(t, section, secret_key);
        let file = self.path(t, section, file_key);
        let (text, from) = match (inline, file) {
            (Some(_), Some(_)) => {
                self.problem(
                    &format!("{section}.{secret_key}"),
                    format!("set either `{secret_key}` or `{file_key}`, not both"),
                );
                return None;
            }
            (Some(s), None) => (s, format!("{section}.{secret_key}")),
            (None, Some(p)) => match std::fs::read_to_string(&p) {
                Ok(s) => (s, format!("{section}.{file_key}")),
                Err(e) => {
                    self.problem(
                        &format!("{section}.{file_key}"),
                        format!("cannot read {}: {e}", p.display()),
                    );
                    return None;
                }
            },
            (None, None) => return None,
        };
        match SigningSecret::parse(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                self.problem(&from, e);
                None
            }
        }
    }
}

/// The known key closest to a misspelt one, if any is close.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
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
}
