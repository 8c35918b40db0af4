//! Configuration: the TOML file, its defaults, and where the API key comes from.
//!
//! The sections are typed structs with `#[derive(Deserialize)]`; value formats (durations, file
//! modes, URLs, cron expressions, secrets) have their own small deserializers in `de`. A file
//! is read in three steps so that every problem is reported at once, each naming its key path:
//! `strict` deserializes it, collecting every unknown key and every value of the wrong shape,
//! `file`'s `validate` checks what spans several keys, and only then are relative paths
//! anchored and secret files read. The API key never sits in the file: it comes from
//! `$CREDENTIALS_DIRECTORY/api-key`, `api.key-file`, or `SUNO_API_KEY`.
//!
//! Nothing here reads the process environment directly: [`Environment`] is captured once in
//! `main` and passed in, so tests can give any environment they like.

mod de;
mod env;
mod file;
mod proxy;
mod strict;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::{Table, Value};

use crate::api::ApiKey;
use crate::api::families::Flavor;
use crate::clock::format_duration;
use crate::logging::LogFormat;
use crate::store::{DEFAULT_ACCOUNT, TARGET_SUBMITTED_URL, TARGET_TASK_URL};
use de::show;

pub use env::{Environment, check_private_dir, current_uid, judge_private_dir, private_tmp_dir};
pub use proxy::{
    DEFAULT_LABEL_HEADER, DEFAULT_MAX_WAIT, DEFAULT_PROXY_BODY_TIMEOUT, DEFAULT_PROXY_CONNECTIONS,
    DEFAULT_PROXY_HEADER_TIMEOUT, DEFAULT_PROXY_MAX_BODY, DEFAULT_UPSTREAM_TIMEOUT, MIN_TOKEN_LEN,
    ProxyConfig, ProxyToken, TokenEntry,
};

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
    /// `[metrics]`
    pub metrics: MetricsConfig,
    /// `[archive]`
    pub archive: ArchiveConfig,
    /// `[proxy]`
    pub proxy: ProxyConfig,
}

/// Files the archive fetches at once by default: few, so downloads never crowd out polls.
pub const DEFAULT_ARCHIVE_IN_FLIGHT: usize = 2;
/// The largest file kept by default. A WAV of a 8-minute track is ~85 MB and a video a few
/// hundred; anything near this is not a result.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 2 << 30;
/// The free space kept on the archive's file system by default.
pub const DEFAULT_MIN_FREE: u64 = 1 << 30;
/// How long after a task ends the API keeps its files (it says 14–15 days).
pub const DEFAULT_EXPIRE_AFTER: Duration = Duration::from_secs(14 * 86_400);
/// The first wait after a failed try; it doubles up to [`ARCHIVE_RETRY_MAX`].
pub const DEFAULT_ARCHIVE_RETRY: Duration = Duration::from_secs(30);
/// The longest wait between two tries of one file.
pub const ARCHIVE_RETRY_MAX: Duration = Duration::from_secs(3600);

/// `[archive]`: keeping the files a finished task leaves behind. Off until `dir` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct ArchiveConfig {
    /// `dir`: where files are kept, as `<dir>/<task_id>/<name>`. `None`: archiving is off.
    #[serde(deserialize_with = "de::some_path")]
    pub dir: Option<PathBuf>,
    /// `max-in-flight`: files fetched at once.
    #[serde(deserialize_with = "de::count")]
    pub max_in_flight: usize,
    /// `max-bytes-per-second`: over all downloads; `None` is unlimited.
    #[serde(deserialize_with = "de::some_bytes")]
    pub max_bytes_per_second: Option<u64>,
    /// `max-file-size`: a larger file is not kept (state `failed`).
    #[serde(deserialize_with = "de::bytes")]
    pub max_file_size: u64,
    /// `min-free`: below this much free space on `dir`'s file system, downloads pause.
    #[serde(deserialize_with = "de::any_bytes")]
    pub min_free: u64,
    /// `allow-hosts`: loopback, private or link-local hosts asset URLs may point at.
    pub allow_hosts: Vec<String>,
    /// `expire-after`: how long after a task ends its URLs are taken as dead, so a 403/404/410
    /// means `expired` rather than "not ready yet".
    #[serde(deserialize_with = "de::duration")]
    pub expire_after: Duration,
    /// `retry-interval`: the first wait after a failed try (doubling, up to an hour).
    #[serde(deserialize_with = "de::duration")]
    pub retry_interval: Duration,
    /// `url`: an S3-compatible bucket instead of `dir`, as `s3://bucket/prefix`.
    pub url: Option<String>,
    /// `endpoint`: the bucket's server (an S3-compatible one: MinIO, Ceph, R2, …).
    pub endpoint: Option<String>,
    /// `region`.
    pub region: String,
    /// `credentials-file`: `access-key-id = …` and `secret-access-key = …` (or the AWS
    /// spellings). Unset: `$CREDENTIALS_DIRECTORY/archive-s3` if systemd passed it.
    #[serde(deserialize_with = "de::some_path")]
    pub credentials_file: Option<PathBuf>,
    /// `allow-http`: let `endpoint` be plain http (a local test server).
    #[serde(deserialize_with = "de::flag")]
    pub allow_http: bool,
    /// The bucket, once `url` is checked and paths are anchored.
    #[serde(skip)]
    pub s3: Option<S3Config>,
}

/// The bucket an `[archive] url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// The key prefix (no leading or trailing `/`).
    pub prefix: String,
    /// The server, if not AWS's own.
    pub endpoint: Option<String>,
    /// The region.
    pub region: String,
    /// Where the keys are read from.
    pub credentials_file: Option<PathBuf>,
    /// Plain http allowed.
    pub allow_http: bool,
    /// Where files are downloaded to before they are uploaded: next to the store.
    pub staging: PathBuf,
}

/// Splits `s3://bucket/prefix` into bucket and prefix. Pure.
pub fn parse_s3_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("`{url}` is not an s3://bucket/prefix URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || bucket.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{url}` names no bucket (s3://bucket/prefix)"));
    }
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

impl Default for ArchiveConfig {
    fn default() -> ArchiveConfig {
        ArchiveConfig {
            dir: None,
            max_in_flight: DEFAULT_ARCHIVE_IN_FLIGHT,
            max_bytes_per_second: None,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            min_free: DEFAULT_MIN_FREE,
            allow_hosts: Vec::new(),
            expire_after: DEFAULT_EXPIRE_AFTER,
            retry_interval: DEFAULT_ARCHIVE_RETRY,
            url: None,
            endpoint: None,
            region: "us-east-1".to_owned(),
            credentials_file: None,
            allow_http: false,
            s3: None,
        }
    }
}

impl ArchiveConfig {
    /// True when archiving is on.
    pub fn enabled(&self) -> bool {
        self.dir.is_some() || self.s3.is_some()
    }

    /// Where files are kept, for logs and `status`: the directory or the bucket's URL.
    pub fn destination(&self) -> Option<String> {
        match (&self.dir, &self.s3) {
            (Some(dir), _) => Some(dir.display().to_string()),
            (None, Some(s3)) => Some(format!("s3://{}/{}", s3.bucket, s3.prefix)),
            (None, None) => None,
        }
    }
}

/// `[metrics]`: the Prometheus endpoint, off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `listen`: where to serve `GET /metrics`, e.g. `127.0.0.1:9464`.
    #[serde(deserialize_with = "de::some_socket_addr")]
    pub listen: Option<std::net::SocketAddr>,
}

/// `[api]`: where the API is and how to talk to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct ApiConfig {
    /// `base-url`.
    #[serde(deserialize_with = "de::base_url")]
    pub base_url: url::Url,
    /// `key-file`: a file holding the API key.
    #[serde(deserialize_with = "de::some_path")]
    pub key_file: Option<PathBuf>,
    /// `request-timeout`: the whole request, connect to last byte.
    #[serde(deserialize_with = "de::duration")]
    pub request_timeout: Duration,
    /// `flavor` of the account `[api]` itself describes (when no `[[api.account]]` is given).
    #[serde(deserialize_with = "de::some_flavor")]
    pub flavor: Option<Flavor>,
    /// `[[api.account]]`: several accounts, each with its own key, host and limits.
    pub account: Vec<AccountEntry>,
}

/// One `[[api.account]]` as written; [`AccountConfig`] is what it means.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    default,
    deny_unknown_fields,
    expecting = "an [[api.account]] table"
)]
pub struct AccountEntry {
    /// `name`: how `add --account`, `status`, logs and metrics call it.
    pub name: Option<String>,
    /// `base-url` (default: sunoapi.org).
    #[serde(deserialize_with = "de::some_base_url")]
    pub base_url: Option<url::Url>,
    /// `flavor`: "sunoapi" (default) or "kie".
    #[serde(deserialize_with = "de::some_flavor")]
    pub flavor: Option<Flavor>,
    /// `key-file`: a file holding its key.
    #[serde(deserialize_with = "de::some_path")]
    pub key_file: Option<PathBuf>,
    /// `max-requests-per-second` (default: `[poll]`'s).
    #[serde(deserialize_with = "de::some_rate")]
    pub max_requests_per_second: Option<Option<f64>>,
    /// `max-in-flight` (default: `[poll]`'s).
    #[serde(deserialize_with = "de::some_count")]
    pub max_in_flight: Option<usize>,
}

/// One API account as the daemon polls it: where, in which provider's spelling, with which
/// key, and how hard. A throttled or rejected account pauses only its own tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountConfig {
    /// Its name (`default` for the account a lone `[api]` section describes).
    pub name: String,
    /// The API's root URL.
    pub base_url: url::Url,
    /// Its provider flavour.
    pub flavor: Flavor,
    /// A file holding its key, if configured.
    pub key_file: Option<PathBuf>,
    /// Its requests per second ceiling; `None`: unlimited.
    pub max_requests_per_second: Option<f64>,
    /// Its requests at once.
    pub max_in_flight: usize,
    /// True for the account a lone `[api]` section describes: its key is found where a
    /// single-account sunopoll has always found it (`api-key`, `SUNO_API_KEY`).
    pub implicit: bool,
}

impl AccountConfig {
    /// The systemd credential holding its key (`api-key`, or `api-key-NAME`).
    pub fn credential(&self) -> String {
        if self.implicit {
            "api-key".to_owned()
        } else {
            format!("api-key-{}", self.name)
        }
    }

    /// The environment variable holding its key (`SUNO_API_KEY`, or `SUNO_API_KEY_NAME` with
    /// the name upper-cased and `-` as `_`).
    pub fn env_var(&self) -> String {
        if self.implicit {
            "SUNO_API_KEY".to_owned()
        } else {
            format!(
                "SUNO_API_KEY_{}",
                self.name.to_ascii_uppercase().replace('-', "_")
            )
        }
    }
}

/// `[poll]`: how often and how hard to poll.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct PollConfig {
    /// `interval`: between two polls of one task, and the first global backoff step.
    #[serde(deserialize_with = "de::duration")]
    pub interval: Duration,
    /// `max-in-flight`: requests at once, over all tasks.
    #[serde(deserialize_with = "de::count")]
    pub max_in_flight: usize,
    /// `max-requests-per-second`; `None` is unlimited.
    #[serde(deserialize_with = "de::rate")]
    pub max_requests_per_second: Option<f64>,
    /// `backoff-max`: the longest global pause.
    #[serde(deserialize_with = "de::duration")]
    pub backoff_max: Duration,
    /// `task-deadline`: after this much time being asked about (never time paused, throttled,
    /// unreachable or in the backlog), a task the API still reports unfinished ends with an
    /// `error` (408).
    #[serde(deserialize_with = "de::duration")]
    pub task_deadline: Duration,
    /// `fill-skipped-stages`: emit `text`/`first` before `complete` when a poll skipped them.
    #[serde(deserialize_with = "de::flag")]
    pub fill_skipped_stages: bool,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    default = "file::unset_store",
    deny_unknown_fields
)]
pub struct StoreConfig {
    /// `path`: the SQLite file.
    #[serde(deserialize_with = "de::path")]
    pub path: PathBuf,
    /// `url`: a PostgreSQL database shared by several daemons, instead of the SQLite file.
    #[serde(deserialize_with = "de::some_string")]
    pub url: Option<String>,
    /// `password-file`: the database password, when `$CREDENTIALS_DIRECTORY/store-password`
    /// is not there.
    #[serde(deserialize_with = "de::some_path")]
    pub password_file: Option<PathBuf>,
    /// `ca-file`: extra CA certificates (PEM) to trust for the database's TLS.
    #[serde(deserialize_with = "de::some_path")]
    pub ca_file: Option<PathBuf>,
    /// `lease`: how long work a daemon claimed stays its own without word from it.
    #[serde(deserialize_with = "de::duration")]
    pub lease: Duration,
    /// The PostgreSQL connection `url` and the password make (`None`: the SQLite store).
    #[serde(skip)]
    pub postgres: Option<crate::store::PgOptions>,
}

/// The database password: `$CREDENTIALS_DIRECTORY/store-password` (systemd
/// `LoadCredential=`), else `store.password-file`, else none (the URL's own, if it has one).
/// One line; a trailing newline is not part of it. The error names the file, never the
/// content.
pub fn store_password(env: &Environment, file: Option<&Path>) -> Result<Option<String>, String> {
    let passed = env
        .credentials_directory
        .as_ref()
        .map(|d| d.join("store-password"))
        .filter(|p| p.exists());
    let Some(path) = passed.as_deref().or(file) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the password file {}: {e}", path.display()))?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() || password.contains('\n') {
        return Err(format!(
            "the password file {} must hold the password on one line",
            path.display()
        ));
    }
    Ok(Some(password.to_owned()))
}

/// `store.lease` unless set: a daemon that dies is replaced within half a minute, and a
/// request (at most [`DEFAULT_REQUEST_TIMEOUT`] by default) fits in it twice.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// `[control]`: the local socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    rename_all = "kebab-case",
    default = "file::unset_control",
    deny_unknown_fields
)]
pub struct ControlConfig {
    /// `socket`: its path.
    #[serde(deserialize_with = "de::path")]
    pub socket: PathBuf,
    /// True when `socket` was set in the file (the CLI then looks nowhere else).
    #[serde(skip)]
    pub socket_configured: bool,
    /// `mode`: permission bits, `0600` by default.
    #[serde(deserialize_with = "de::mode")]
    pub mode: u32,
    /// `group`: group owner (name or number), for shared access.
    #[serde(deserialize_with = "de::group")]
    pub group: Option<String>,
    /// `idle-timeout`: how long a connection may wait without sending a complete request.
    #[serde(deserialize_with = "de::idle_timeout")]
    pub idle_timeout: Duration,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct LogConfig {
    /// `level`: error, warn, info, debug or trace.
    #[serde(deserialize_with = "de::level")]
    pub level: String,
    /// `format`: auto, journald, plain or json (see [`crate::logging`]).
    #[serde(deserialize_with = "de::log_format")]
    pub format: LogFormat,
}

/// `[housekeeping]`
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct HousekeepingConfig {
    /// `retention`: how long finished tasks and their events are kept.
    #[serde(deserialize_with = "de::any_duration")]
    pub retention: Duration,
    /// `prune-schedule`: a cron expression (5 fields, or 6 with seconds), in UTC.
    #[serde(deserialize_with = "de::cron")]
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
    /// `proxy`: the HTTP proxy deliveries go through. Unset, they go direct whatever
    /// `HTTP_PROXY` says: handlers are local, and a proxy would see their `Authorization`.
    pub proxy: Option<url::Url>,
}

impl ForwardConfig {
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
    /// `kinds`: which task families' events go there (`None`: all).
    pub kinds: Option<Vec<crate::api::families::Kind>>,
}

impl TargetConfig {
    /// True when events of a task of `kind` go to this target.
    pub fn takes_kind(&self, kind: crate::api::families::Kind) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(&kind))
    }
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
        let s = if n == 1 { "" } else { "s" };
        match &self.file {
            Some(file) => write!(f, "{}: {n} problem{s}", file.display())?,
            None => write!(f, "configuration: {n} problem{s}")?,
        }
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// The documented defaults (config.toml.example); serde fills them in for keys a file leaves out.
impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            base_url: url::Url::parse(DEFAULT_BASE_URL).expect("the default URL parses"),
            key_file: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            flavor: None,
            account: Vec::new(),
        }
    }
}

impl Default for PollConfig {
    fn default() -> PollConfig {
        PollConfig {
            interval: DEFAULT_INTERVAL,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            max_requests_per_second: Some(DEFAULT_MAX_RPS),
            backoff_max: DEFAULT_BACKOFF_MAX,
            task_deadline: DEFAULT_TASK_DEADLINE,
            fill_skipped_stages: true,
        }
    }
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Auto,
        }
    }
}

impl Default for HousekeepingConfig {
    fn default() -> HousekeepingConfig {
        HousekeepingConfig {
            retention: DEFAULT_RETENTION,
            prune_schedule: DEFAULT_PRUNE_SCHEDULE
                .parse()
                .expect("the default schedule parses"),
        }
    }
}

impl Config {
    /// The built-in defaults for `env`, as used with no `--config`.
    pub fn defaults(env: &Environment) -> Config {
        file::File::default().into_config(None, env, &mut Vec::new())
    }

    /// Reads and checks `path`, or returns the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>, env: &Environment) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::defaults(env));
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_owned()),
            problems: vec![format!("cannot read it: {e}")],
        })?;
        Config::parse(&text, Some(path), env)
    }

    /// Parses config text. `path` names the file in errors and anchors relative paths.
    pub fn parse(
        text: &str,
        path: Option<&Path>,
        env: &Environment,
    ) -> Result<Config, ConfigError> {
        let fail = |problems: Vec<String>| ConfigError {
            file: path.map(Path::to_owned),
            problems,
        };
        let root: Table = text.parse().map_err(|e: toml::de::Error| {
            fail(vec![format!("not valid TOML: {}", e.to_string().trim())])
        })?;
        let (file, mut problems) = strict::deserialize::<file::File>(Value::Table(root));
        let config = file.map(|file| {
            let semantic = file.validate(&problems);
            problems.extend(semantic);
            file.into_config(path, env, &mut problems)
        });
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(fail(
                problems
                    .into_iter()
                    .map(|(key, what)| format!("{key}: {what}"))
                    .collect(),
            )),
        }
    }

    /// The accounts polled: the `[[api.account]]` entries in order, or the one `[api]` and
    /// `[poll]` describe. Never empty; the first is the default for `add`. Computed from
    /// `api` and `poll` each time, so there is one source of truth to change.
    pub fn accounts(&self) -> Vec<AccountConfig> {
        let (api, poll) = (&self.api, &self.poll);
        if api.account.is_empty() {
            return vec![AccountConfig {
                name: DEFAULT_ACCOUNT.to_owned(),
                base_url: api.base_url.clone(),
                flavor: api.flavor.unwrap_or_default(),
                key_file: api.key_file.clone(),
                max_requests_per_second: poll.max_requests_per_second,
                max_in_flight: poll.max_in_flight,
                implicit: true,
            }];
        }
        api.account
            .iter()
            .map(|a| AccountConfig {
                name: a.name.clone().unwrap_or_default(),
                base_url: a.base_url.clone().unwrap_or_else(|| api.base_url.clone()),
                flavor: a.flavor.unwrap_or_default(),
                key_file: a.key_file.clone(),
                max_requests_per_second: a
                    .max_requests_per_second
                    .unwrap_or(poll.max_requests_per_second),
                max_in_flight: a.max_in_flight.unwrap_or(poll.max_in_flight),
                implicit: false,
            })
            .collect()
    }

    /// Where the default (first) account takes its key from (see [`KeySource`]).
    pub fn key_source(&self, env: &Environment) -> KeySource {
        KeySource::of(&self.accounts()[0], env)
    }

    /// Finds the default account's API key (see [`KeySource::read`]).
    pub fn api_key(&self, env: &Environment) -> Result<ApiKey, String> {
        self.key_source(env).read()
    }

    /// The account named `name`.
    pub fn account(&self, name: &str) -> Option<AccountConfig> {
        self.accounts().into_iter().find(|a| a.name == name)
    }
}

/// Where the API key comes from: `$CREDENTIALS_DIRECTORY/api-key`, else `api.key-file`, else
/// `SUNO_API_KEY`, as the environment was captured at start. Read again whenever the key may
/// have changed: on a reload, and before every probe after the API rejected the key, so a
/// fixed key file is picked up without a restart.
#[derive(Debug, Clone)]
pub struct KeySource {
    /// The account's name, for errors about a named account.
    account: Option<String>,
    credential: String,
    key_file: Option<PathBuf>,
    env_var: String,
    env_value: Option<String>,
    credentials_directory: Option<PathBuf>,
}

impl KeySource {
    /// Where `account`'s key is in `env`: `$CREDENTIALS_DIRECTORY/api-key[-NAME]`, its
    /// `key-file`, `$SUNO_API_KEY[_NAME]`.
    pub fn of(account: &AccountConfig, env: &Environment) -> KeySource {
        let env_var = account.env_var();
        KeySource {
            account: (!account.implicit).then(|| account.name.clone()),
            credential: account.credential(),
            key_file: account.key_file.clone(),
            env_value: env.api_key_var(&env_var),
            env_var,
            credentials_directory: env.credentials_directory.clone(),
        }
    }

    /// Reads the key now. The error names all three places.
    pub fn read(&self) -> Result<ApiKey, String> {
        match &self.account {
            None => self.read_key(),
            Some(a) => self.read_key().map_err(|e| format!("account {a:?}: {e}")),
        }
    }

    fn read_key(&self) -> Result<ApiKey, String> {
        if let Some(dir) = &self.credentials_directory {
            let file = dir.join(&self.credential);
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
        if let Some(file) = &self.key_file {
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
        if let Some(text) = self.env_value.as_deref() {
            return ApiKey::parse(text).map_err(|why| format!("{} {why}", self.env_var));
        }
        let section = if self.account.is_some() {
            "its [[api.account]] entry"
        } else {
            "[api]"
        };
        Err(format!(
            "no API key found: sunopoll looks in $CREDENTIALS_DIRECTORY/{cred} (systemd \
             LoadCredential={cred}:…), then in the file named by `key-file` in {section}, then in the \
             {var} environment variable",
            cred = self.credential,
            var = self.env_var
        ))
    }
}

impl Config {
    /// A short human summary, for `check-config` and the startup log.
    pub fn summary(&self) -> String {
        let mut s = self.base_summary();
        if !self.api.account.is_empty() {
            for a in self.accounts() {
                s.push_str(&format!(
                    "\naccount {:?}: {} ({}), {}, at most {} in flight, key from {}{} or ${}",
                    a.name,
                    crate::api::redact_url(a.base_url.as_str()),
                    a.flavor.as_str(),
                    a.max_requests_per_second.map_or_else(
                        || "no request rate limit".to_owned(),
                        |r| format!("at most {r} requests/s")
                    ),
                    a.max_in_flight,
                    format_args!("$CREDENTIALS_DIRECTORY/{}", a.credential()),
                    a.key_file
                        .as_ref()
                        .map_or_else(String::new, |f| format!(", {}", f.display())),
                    a.env_var(),
                ));
            }
        } else if let Some(flavor) = self.api.flavor {
            s.push_str(&format!("\nflavor: {}", flavor.as_str()));
        }
        let f = &self.forward;
        let schedule: Vec<String> = f
            .retry_schedule
            .iter()
            .map(|d| format_duration(*d))
            .collect();
        s.push_str(&format!(
            "\nforward: {} target{}, retry schedule [{}], use-task-callback-url {} (allow-hosts: {}), task-secret {}, {}",
            f.targets.len(),
            if f.targets.len() == 1 { "" } else { "s" },
            schedule.join(", "),
            f.use_task_callback_url,
            f.allow_hosts.join(", "),
            if f.task_secret.is_some() { "set" } else { "not set" },
            f.proxy.as_ref().map_or_else(
                || "no proxy".to_owned(),
                |p| format!("proxy {}", crate::api::redact_url(p.as_str()))
            ),
        ));
        let a = &self.archive;
        match a.destination() {
            None => s.push_str("\narchive: off"),
            Some(dest) => s.push_str(&format!(
                "\narchive: {} ({} in flight, {}, files up to {} bytes, min-free {} bytes, expire after {}, allow-hosts: {})",
                dest,
                a.max_in_flight,
                a.max_bytes_per_second
                    .map_or_else(|| "no bandwidth cap".to_owned(), |r| format!("at most {r} bytes/s")),
                a.max_file_size,
                a.min_free,
                format_duration(a.expire_after),
                if a.allow_hosts.is_empty() { "none".to_owned() } else { a.allow_hosts.join(", ") },
            )),
        }
        s.push('\n');
        s.push_str(&self.proxy.summary());
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
            "config: {}\napi: {} (timeout {})\npoll: every {}, at most {} in flight, {}, backoff up to {}, deadline {}, fill skipped stages: {}\nstore: {}\nsocket: {} (mode {:04o}{})\nlog: level {}, format {}\nhousekeeping: keep {}, prune on \"{}\" (UTC)\nmetrics: {}",
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
            match &self.store.postgres {
                Some(pg) => format!(
                    "{} (PostgreSQL, shared; lease {})",
                    pg.shown(),
                    format_duration(self.store.lease)
                ),
                None => self.store.path.display().to_string(),
            },
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
            self.metrics
                .listen
                .map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics")),
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
