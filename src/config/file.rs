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

use super::strict::{Problem, fields};
use super::{
    ApiConfig, Config, ControlConfig, DEFAULT_ALLOW_HOSTS, DEFAULT_FORWARD_IN_FLIGHT,
    DEFAULT_FORWARD_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_RETRY_SCHEDULE, Environment,
    ForwardConfig, HousekeepingConfig, LogConfig, PollConfig, SigningSecret, StoreConfig,
    TARGET_SUBMITTED_URL, TARGET_TASK_URL, TargetConfig, de,
};
use crate::clock::format_duration;
use crate::events::Stage;

/// The whole file.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub(super) struct File {
    api: ApiConfig,
    poll: PollConfig,
    store: StoreConfig,
    control: ControlConfig,
    log: LogConfig,
    housekeeping: HousekeepingConfig,
    forward: ForwardFile,
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
        }
    }
}

/// `[store]` before the environment is known: an empty path stands for "not set", which the
/// file cannot say (an empty `path` is refused).
pub(super) fn unset_store() -> StoreConfig {
    StoreConfig {
        path: PathBuf::new(),
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
#[serde(rename_all = "kebab-case", default)]
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
        }
    }
}

/// One `[[forward.target]]` as written.
#[derive(Deserialize, Default)]
#[serde(
    rename_all = "kebab-case",
    default,
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
}

impl TargetFile {
    /// Deliveries are tracked per name; without one, the URL is the name.
    fn name(&self) -> Option<String> {
        self.name
            .clone()
            .or_else(|| self.url.as_ref().map(url::Url::to_string))
    }
}

/// The keys each table of the file knows, for unknown-key messages.
pub(super) fn known_keys(tables: &[&str]) -> &'static [&'static str] {
    match tables {
        [] => fields::<File>(),
        ["api"] => fields::<ApiConfig>(),
        ["poll"] => fields::<PollConfig>(),
        ["store"] => fields::<StoreConfig>(),
        ["control"] => fields::<ControlConfig>(),
        ["log"] => fields::<LogConfig>(),
        ["housekeeping"] => fields::<HousekeepingConfig>(),
        ["forward"] => fields::<ForwardFile>(),
        ["forward", "target"] => fields::<TargetFile>(),
        _ => &[],
    }
}

/// Headers sunopoll sets itself: the signature, and what HTTP framing needs.
fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("webhook-")
        || [
            "content-type",
            "content-length",
            "host",
            "transfer-encoding",
        ]
        .contains(&lower.as_str())
}

fn not_both(section: &str, inline: (&str, bool), file: (&str, bool), problems: &mut Vec<Problem>) {
    if inline.1 && file.1 {
        problems.push((
            format!("{section}.{}", inline.0),
            format!("set either `{}` or `{}`, not both", inline.0, file.0),
        ));
    }
}

impl File {
    /// Every problem that spans keys, or that a single value's format cannot see. `earlier`
    /// are the problems parsing found: a key whose value was refused is not also "required".
    pub(super) fn validate(&self, earlier: &[Problem]) -> Vec<Problem> {
        let mut p = Vec::new();
        if self.poll.backoff_max < self.poll.interval {
            p.push((
                "poll.backoff-max".to_owned(),
                format!(
                    "{} is shorter than poll.interval ({}); backoff starts at the interval",
                    format_duration(self.poll.backoff_max),
                    format_duration(self.poll.interval)
                ),
            ));
        }
        let f = &self.forward;
        if f.retry_schedule.is_empty() {
            p.push((
                "forward.retry-schedule".to_owned(),
                "expected a non-empty list of durations like [\"0s\", \"5s\", \"5m\"], got an empty array".to_owned(),
            ));
        }
        if f.allow_hosts.iter().any(|h| h.trim().is_empty()) {
            p.push((
                "forward.allow-hosts".to_owned(),
                "expected a list of host names or addresses".to_owned(),
            ));
        }
        let inline = ("task-secret", f.task_secret.is_some());
        let file = ("task-secret-file", f.task_secret_file.is_some());
        not_both("forward", inline, file, &mut p);
        let mut names = HashSet::new();
        for (i, t) in f.target.iter().enumerate() {
            let key = format!("forward.target[{i}]");
            let url_key = format!("{key}.url");
            if t.url.is_none() && !earlier.iter().any(|(k, _)| *k == url_key) {
                p.push((url_key, "is required".to_owned()));
            }
            match t.name.as_deref() {
                Some(n) if n.trim().is_empty() || n.chars().any(char::is_control) => p.push((
                    format!("{key}.name"),
                    "must be non-empty text without control characters".to_owned(),
                )),
                Some(n) if n == TARGET_TASK_URL || n == TARGET_SUBMITTED_URL => p.push((
                    format!("{key}.name"),
                    format!("{n:?} is reserved for per-task URLs"),
                )),
                _ => {}
            }
            let inline = ("secret", t.secret.is_some());
            not_both(
                &key,
                inline,
                ("secret-file", t.secret_file.is_some()),
                &mut p,
            );
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
                p.push((format!("{key}.headers.{name}"), what.to_owned()));
            }
            if let Some(name) = t.name()
                && !names.insert(name.clone())
            {
                p.push((
                    "forward.target".to_owned(),
                    format!("two targets are named {name:?}; give each a distinct `name`"),
                ));
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
        let store = StoreConfig {
            path: match self.store.path {
                p if p.as_os_str().is_empty() => env.default_store_path(),
                p => anchor(p),
            },
        };
        let mut control = self.control;
        control.socket_configured = !control.socket.as_os_str().is_empty();
        control.socket = if control.socket_configured {
            anchor(control.socket)
        } else {
            env.default_socket_path()
        };
        let f = self.forward;
        let mut secret =
            |section: &str, key: &str, inline: Option<SigningSecret>, file: Option<PathBuf>| {
                read_secret(
                    inline,
                    file.map(anchor),
                    || format!("{section}.{key}"),
                    problems,
                )
            };
        let task_secret = secret(
            "forward",
            "task-secret-file",
            f.task_secret,
            f.task_secret_file,
        );
        let mut targets = Vec::new();
        for (i, t) in f.target.into_iter().enumerate() {
            let key = format!("forward.target[{i}]");
            let secret = secret(&key, "secret-file", t.secret, t.secret_file);
            let Some(url) = t.url else { continue };
            targets.push(TargetConfig {
                name: t.name.unwrap_or_else(|| url.to_string()),
                url,
                stages: t.stages.unwrap_or_else(|| Stage::ALL.to_vec()),
                secret,
                headers: t.headers.into_iter().collect(),
                timeout: t.timeout.unwrap_or(f.timeout),
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
            forward: ForwardConfig {
                targets,
                retry_schedule: f.retry_schedule.into_iter().map(|d| d.0).collect(),
                use_task_callback_url: f.use_task_callback_url,
                allow_hosts: f.allow_hosts.iter().map(|h| h.trim().to_owned()).collect(),
                task_secret,
                timeout: f.timeout,
                max_in_flight: f.max_in_flight,
            },
        }
    }
}

/// The inline secret if there is one, else the one in `file`; `key` names the file's key.
fn read_secret(
    inline: Option<SigningSecret>,
    file: Option<PathBuf>,
    key: impl Fn() -> String,
    problems: &mut Vec<Problem>,
) -> Option<SigningSecret> {
    let file = match (inline, file) {
        (Some(secret), _) => return Some(secret),
        (None, None) => return None,
        (None, Some(file)) => file,
    };
    let read = std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))
        .and_then(|text| SigningSecret::parse(&text));
    read.map_err(|what| problems.push((key(), what))).ok()
}
