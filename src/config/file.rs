//! The config file as written, its one `validate` pass over what spans several keys, and the
//! step that turns it into a [`Config`]: relative paths anchored to the file's directory, the
//! environment's default paths filled in, secret files read (after parsing, never during).
//!
//! Sections whose keys map one to one onto the public types are those types; `[forward]` and
//! its targets have file types of their own, because a target's timeout defaults to the
//! section's, a target's name to its URL, and secrets may live in files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::strict::Problem;
use super::{
    ApiConfig, ArchiveConfig, Config, ControlConfig, DEFAULT_ALLOW_HOSTS,
    DEFAULT_FORWARD_IN_FLIGHT, DEFAULT_FORWARD_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_RETRY_SCHEDULE, Environment, ForwardConfig, HousekeepingConfig, LogConfig,
    MetricsConfig, PollConfig, ProxyConfig, SigningSecret, StoreConfig, TARGET_SUBMITTED_URL,
    TARGET_TASK_URL, TargetConfig, de,
};
use crate::clock::format_duration;
use crate::events::Stage;

/// The whole file.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub(super) struct File {
    api: ApiConfig,
    poll: PollConfig,
    store: StoreConfig,
    control: ControlConfig,
    log: LogConfig,
    housekeeping: HousekeepingConfig,
    forward: ForwardFile,
    metrics: MetricsConfig,
    archive: ArchiveConfig,
    proxy: ProxyConfig,
}

impl Default for File {
    fn default() -> File {
        File {
            api: ApiConfig::default(),
            poll: PollConfig::default(),
            store: unset_store(),
            control: unset_control(),
            log: LogConfig::default(),
            housekeeping: HousekeepingConfig::default(),
            forward: ForwardFile::default(),
            metrics: MetricsConfig::default(),
            archive: ArchiveConfig::default(),
            proxy: ProxyConfig::default(),
        }
    }
}

/// `[store]` before the environment is known: an empty path stands for "not set", which the
/// file cannot say (an empty `path` is refused).
pub(super) fn unset_store() -> StoreConfig {
    StoreConfig {
        path: PathBuf::new(),
        url: None,
        password_file: None,
        ca_file: None,
        lease: super::DEFAULT_LEASE,
        postgres: None,
    }
}

/// `[control]` before the environment is known; an empty socket path is "not set".
pub(super) fn unset_control() -> ControlConfig {
    ControlConfig {
        socket: PathBuf::new(),
        socket_configured: false,
        mode: 0o600,
        group: None,
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
    }
}

/// `[forward]` as written.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
struct ForwardFile {
    target: Vec<TargetFile>,
    retry_schedule: Vec<de::Delay>,
    #[serde(deserialize_with = "de::flag")]
    use_task_callback_url: bool,
    allow_hosts: Vec<String>,
    #[serde(deserialize_with = "de::some_secret")]
    task_secret: Option<SigningSecret>,
    #[serde(deserialize_with = "de::some_path")]
    task_secret_file: Option<PathBuf>,
    #[serde(deserialize_with = "de::duration")]
    timeout: Duration,
    #[serde(deserialize_with = "de::count")]
    max_in_flight: usize,
    #[serde(deserialize_with = "de::some_url")]
    proxy: Option<url::Url>,
}

impl Default for ForwardFile {
    fn default() -> ForwardFile {
        ForwardFile {
            target: Vec::new(),
            retry_schedule: DEFAULT_RETRY_SCHEDULE.map(de::Delay).into(),
            use_task_callback_url: false,
            allow_hosts: DEFAULT_ALLOW_HOSTS.map(str::to_owned).into(),
            task_secret: None,
            task_secret_file: None,
            timeout: DEFAULT_FORWARD_TIMEOUT,
            max_in_flight: DEFAULT_FORWARD_IN_FLIGHT,
            proxy: None,
        }
    }
}

/// One `[[forward.target]]` as written.
#[derive(Deserialize, Default)]
#[serde(
    rename_all = "kebab-case",
    default,
    deny_unknown_fields,
    expecting = "a [[forward.target]] table"
)]
struct TargetFile {
    name: Option<String>,
    #[serde(deserialize_with = "de::some_url")]
    url: Option<url::Url>,
    #[serde(deserialize_with = "de::some_stages")]
    stages: Option<Vec<Stage>>,
    #[serde(deserialize_with = "de::some_secret")]
    secret: Option<SigningSecret>,
    #[serde(deserialize_with = "de::some_path")]
    secret_file: Option<PathBuf>,
    headers: BTreeMap<String, String>,
    #[serde(deserialize_with = "de::some_duration")]
    timeout: Option<Duration>,
    #[serde(deserialize_with = "de::some_kinds")]
    kinds: Option<Vec<crate::api::families::Kind>>,
}

impl TargetFile {
    /// Deliveries are tracked per name; without one, the URL is the name, without its
    /// credentials (the name is shown in logs, `status`, `show` and metrics).
    fn name(&self) -> Option<String> {
        self.name.clone().or_else(|| {
            self.url
                .as_ref()
                .map(|u| crate::api::redact_url(u.as_str()))
        })
    }
}

/// Headers sunopoll sets itself: the signature, and what HTTP framing needs.
fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("webhook-")
        || matches!(
            lower.as_str(),
            "content-type" | "content-length" | "host" | "transfer-encoding"
        )
}

/// Shortest `poll.interval` accepted: a round trip to the API takes longer, so anything
/// shorter only spends the request budget (the tests' fast configs use 50 ms).
pub(super) const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Values that parse but that nobody means, each of which a new operator has hit.
fn check_operator_slips(file: &File, bad: &mut impl FnMut(&str, String)) {
    if file.control.mode & 0o002 != 0 {
        bad(
            "control.mode",
            format!(
                "{:04o} lets every local user control the daemon; use \"0600\" (only its user) or \"0660\" with control.group",
                file.control.mode
            ),
        );
    }
    if file.poll.interval < MIN_INTERVAL {
        bad(
            "poll.interval",
            format!(
                "{} is shorter than the {} minimum (the default is 30s)",
                format_duration(file.poll.interval),
                format_duration(MIN_INTERVAL)
            ),
        );
    }
    let accounts = file.api.account.iter().enumerate();
    let urls = std::iter::once(("api.base-url".to_owned(), Some(&file.api.base_url)))
        .chain(accounts.map(|(i, a)| (format!("api.account[{i}].base-url"), a.base_url.as_ref())));
    for (key, url) in urls {
        let Some(url) = url else { continue };
        let path = url.path();
        if let Some(at) = path.find("/api/v1") {
            let root = url.as_str();
            let root = root.split(&path[at..]).next().unwrap_or(root);
            bad(
                &key,
                format!(
                    "give the API's root (like \"{root}\"): sunopoll adds /api/v1/…/record-info itself"
                ),
            );
        }
    }
}

/// An account name: it becomes part of a credential file name and an environment variable.
fn valid_account_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn not_both(key: &str) -> String {
    format!("set either `{key}` or `{key}-file`, not both")
}

impl File {
    /// The names of the accounts the file configures, the default first.
    fn account_names(&self) -> Vec<String> {
        if self.api.account.is_empty() {
            return vec![super::DEFAULT_ACCOUNT.to_owned()];
        }
        self.api
            .account
            .iter()
            .filter_map(|a| a.name.clone())
            .collect()
    }

    /// Every problem that spans keys, or that a single value's format cannot see. `earlier`
    /// are the problems parsing found: a key whose value was refused is not also "required".
    pub(super) fn validate(&self, earlier: &[Problem]) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, what: String| p.push((key.to_owned(), what));
        let (poll, f) = (&self.poll, &self.forward);
        check_operator_slips(self, &mut bad);
        if poll.backoff_max < poll.interval {
            let (max, interval) = (
                format_duration(poll.backoff_max),
                format_duration(poll.interval),
            );
            let what = format!(
                "{max} is shorter than poll.interval ({interval}); backoff starts at the interval"
            );
            bad("poll.backoff-max", what);
        }
        if f.retry_schedule.is_empty() {
            let what = "expected a non-empty list of durations like [\"0s\", \"5s\", \"5m\"]";
            bad(
                "forward.retry-schedule",
                format!("{what}, got an empty array"),
            );
        }
        let a = &self.archive;
        if a.dir.is_some() && a.url.is_some() {
            bad(
                "archive.url",
                "set either `dir` or `url`, not both".to_owned(),
            );
        }
        if let Some(Err(what)) = a.url.as_deref().map(super::parse_s3_url) {
            bad("archive.url", what);
        }
        if let Some(e) = &a.endpoint
            && url::Url::parse(e).map_or(true, |u| !matches!(u.scheme(), "http" | "https"))
        {
            bad(
                "archive.endpoint",
                format!("`{e}` is not an http:// or https:// URL"),
            );
        }
        if self.archive.allow_hosts.iter().any(|h| h.trim().is_empty()) {
            let what = "expected a list of host names or addresses";
            bad("archive.allow-hosts", what.to_owned());
        }
        if f.allow_hosts.iter().any(|h| h.trim().is_empty()) {
            let what = "expected a list of host names or addresses";
            bad("forward.allow-hosts", what.to_owned());
        }
        if f.task_secret.is_some() && f.task_secret_file.is_some() {
            bad("forward.task-secret", not_both("task-secret"));
        }
        let api = &self.api;
        let mut accounts = HashSet::new();
        for (i, a) in api.account.iter().enumerate() {
            let key = |k: &str| format!("api.account[{i}].{k}");
            match a.name.as_deref() {
                None if !earlier.iter().any(|(k, _)| *k == key("name")) => {
                    bad(&key("name"), "is required".to_owned());
                }
                None => {}
                Some(n) if !valid_account_name(n) => {
                    let what = format!(
                        "{n:?} must be 1-64 characters of a-z A-Z 0-9 _ - (it names the \
                         credential api-key-NAME and the variable SUNO_API_KEY_NAME)"
                    );
                    bad(&key("name"), what);
                }
                Some(n) if !accounts.insert(n.to_owned()) => {
                    let what = format!("two accounts are named {n:?}; give each a distinct `name`");
                    bad("api.account", what);
                }
                Some(_) => {}
            }
        }
        if !api.account.is_empty() {
            // With several accounts, what the lone [api] section would say about its one
            // account belongs in each entry: refuse it rather than guess which it meant.
            if api.key_file.is_some() {
                bad(
                    "api.key-file",
                    "with [[api.account]] entries, set `key-file` in each entry".to_owned(),
                );
            }
            if api.flavor.is_some() {
                bad(
                    "api.flavor",
                    "with [[api.account]] entries, set `flavor` in each entry".to_owned(),
                );
            }
        }
        self.proxy.validate(&self.account_names(), &mut bad);
        let mut names = HashSet::new();
        for (i, t) in f.target.iter().enumerate() {
            let key = |k: &str| format!("forward.target[{i}].{k}");
            if t.url.is_none() && !earlier.iter().any(|(k, _)| *k == key("url")) {
                bad(&key("url"), "is required".to_owned());
            }
            match t.name.as_deref() {
                Some(n) if n.trim().is_empty() || n.chars().any(char::is_control) => {
                    let what = "must be non-empty text without control characters";
                    bad(&key("name"), what.to_owned());
                }
                Some(n) if n == TARGET_TASK_URL || n == TARGET_SUBMITTED_URL => {
                    bad(&key("name"), format!("{n:?} is reserved for per-task URLs"));
                }
                _ => {}
            }
            if t.secret.is_some() && t.secret_file.is_some() {
                bad(&key("secret"), not_both("secret"));
            }
            for (name, value) in &t.headers {
                let valid = reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
                    && reqwest::header::HeaderValue::from_str(value).is_ok();
                let what = if reserved_header(name) {
                    "is set by sunopoll itself and cannot be overridden"
                } else if !valid {
                    "is not a valid HTTP header name and string value"
                } else {
                    continue;
                };
                bad(&key(&format!("headers.{name}")), what.to_owned());
            }
            if let Some(name) = t.name()
                && !names.insert(name.clone())
            {
                let what = format!("two targets are named {name:?}; give each a distinct `name`");
                bad("forward.target", what);
            }
        }
        p
    }

    /// The configuration this file gives, for a file at `source` (relative paths are relative
    /// to its directory) in `env`. Secret files are read here; what fails is added to
    /// `problems`.
    pub(super) fn into_config(
        self,
        source: Option<&Path>,
        env: &Environment,
        problems: &mut Vec<Problem>,
    ) -> Config {
        let base = source.and_then(Path::parent).unwrap_or(Path::new(""));
        let anchor = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let mut api = self.api;
        api.key_file = api.key_file.map(anchor);
        for a in &mut api.account {
            a.key_file = a.key_file.take().map(anchor);
        }
        let path_set = !self.store.path.as_os_str().is_empty();
        let mut store = StoreConfig {
            path: match self.store.path {
                p if p.as_os_str().is_empty() => env.default_store_path(),
                p => anchor(p),
            },
            url: self.store.url,
            password_file: self.store.password_file.map(anchor),
            ca_file: self.store.ca_file.map(anchor),
            lease: self.store.lease,
            postgres: None,
        };
        if let Some(url) = &store.url {
            if path_set {
                problems.push((
                    "store".to_owned(),
                    "set `path` (SQLite) or `url` (PostgreSQL), not both".to_owned(),
                ));
            }
            let longest = api.request_timeout.max(self.forward.timeout).max(
                self.forward
                    .target
                    .iter()
                    .filter_map(|t| t.timeout)
                    .max()
                    .unwrap_or_default(),
            );
            if store.lease < longest * 2 {
                problems.push((
                    "store.lease".to_owned(),
                    format!(
                        "{} is too short: it must hold the longest request twice ({} here), or \
                         another daemon could take work still in flight",
                        crate::clock::format_duration(store.lease),
                        crate::clock::format_duration(longest)
                    ),
                ));
            }
            match super::store_password(env, store.password_file.as_deref()).and_then(|password| {
                crate::store::PgOptions::new(url, password, store.lease, store.ca_file.clone())
            }) {
                Ok(options) => store.postgres = Some(options),
                Err(what) => problems.push(("store.url".to_owned(), what)),
            }
        }
        let mut control = self.control;
        control.socket_configured = !control.socket.as_os_str().is_empty();
        control.socket = if control.socket_configured {
            anchor(control.socket)
        } else {
            env.default_socket_path()
        };
        let mut archive = self.archive;
        archive.dir = archive.dir.map(anchor);
        archive.credentials_file = archive.credentials_file.map(anchor).or_else(|| {
            let passed = env.credentials_directory.as_ref()?.join("archive-s3");
            passed.exists().then_some(passed)
        });
        if let Some(Ok((bucket, prefix))) = archive.url.as_deref().map(super::parse_s3_url) {
            archive.s3 = Some(super::S3Config {
                bucket,
                prefix,
                endpoint: archive.endpoint.clone(),
                region: archive.region.clone(),
                credentials_file: archive.credentials_file.clone(),
                allow_http: archive.allow_http,
                staging: store
                    .path
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join("archive-staging"),
            });
        }
        archive.allow_hosts = archive
            .allow_hosts
            .iter()
            .map(|h| h.trim().to_owned())
            .collect();
        let mut proxy = self.proxy;
        let default_account = match api.account.first() {
            Some(a) => a.name.clone().unwrap_or_default(),
            None => super::DEFAULT_ACCOUNT.to_owned(),
        };
        proxy.resolve(base, &default_account, problems);
        let f = self.forward;
        // Secret files are read only now, after parsing: an inline secret wins (both set is
        // already a problem), and what cannot be read or parsed is named by its key.
        let mut secret = |key: String, inline: Option<SigningSecret>, file: Option<PathBuf>| {
            let file = match (inline, file) {
                (Some(secret), _) => return Some(secret),
                (None, file) => anchor(file?),
            };
            let read = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))
                .and_then(|text| SigningSecret::parse(&text));
            read.map_err(|what| problems.push((key, what))).ok()
        };
        let task_file = "forward.task-secret-file".to_owned();
        let task_secret = secret(task_file, f.task_secret, f.task_secret_file);
        let mut targets = Vec::new();
        for (i, t) in f.target.into_iter().enumerate() {
            let name = t.name();
            let key = format!("forward.target[{i}].secret-file");
            let secret = secret(key, t.secret, t.secret_file);
            let Some(url) = t.url else { continue };
            targets.push(TargetConfig {
                name: name.unwrap_or_else(|| crate::api::redact_url(url.as_str())),
                url,
                stages: t.stages.unwrap_or_else(|| Stage::ALL.to_vec()),
                secret,
                headers: t.headers.into_iter().collect(),
                timeout: t.timeout.unwrap_or(f.timeout),
                kinds: t.kinds,
            });
        }
        Config {
            source: source.map(Path::to_owned),
            api,
            poll: self.poll,
            store,
            control,
            log: self.log,
            housekeeping: self.housekeeping,
            metrics: self.metrics,
            archive,
            proxy,
            forward: ForwardConfig {
                targets,
                retry_schedule: f.retry_schedule.into_iter().map(|d| d.0).collect(),
                use_task_callback_url: f.use_task_callback_url,
                allow_hosts: f.allow_hosts.iter().map(|h| h.trim().to_owned()).collect(),
                task_secret,
                timeout: f.timeout,
                max_in_flight: f.max_in_flight,
                proxy: f.proxy,
            },
        }
    }
}
