//! The config file's value formats: durations, file modes, URLs, cron expressions, secrets, and
//! the other keys whose TOML type alone does not say whether a value is good. Each function is a
//! serde `deserialize_with` that reads the raw TOML value and fails with a message saying what
//! was expected and what was found; [`super::strict`] puts the key's path in front of it.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, Error as _};
use toml::Value;

use super::{MAX_RPS, MIN_RPS, SigningSecret};
use crate::clock::{format_duration, parse_duration};
use crate::events::Stage;
use crate::logging::LogFormat;

/// A value's check: the value, or what is wrong with it.
type Check<T> = Result<T, String>;

/// Reads the raw value and hands it to `check`, whose complaint becomes the key's problem.
fn read<'de, D: Deserializer<'de>, T>(
    d: D,
    check: impl FnOnce(&Value) -> Check<T>,
) -> Result<T, D::Error> {
    check(&Value::deserialize(d)?).map_err(D::Error::custom)
}

/// What a value is, in words, for "expected …, got …" messages.
pub(super) fn show(v: &Value) -> String {
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

fn string(v: &Value) -> Check<&str> {
    v.as_str()
        .ok_or_else(|| format!("expected a string, got {}", show(v)))
}

fn at_least(v: &Value, min: Duration) -> Check<Duration> {
    let text = v.as_str().ok_or_else(|| {
        format!(
            "expected a duration string like \"30s\" or \"2h\", got {}",
            show(v)
        )
    })?;
    let d = parse_duration(text)?;
    if d < min {
        return Err(format!(
            "{} is too short (at least {})",
            format_duration(d),
            format_duration(min)
        ));
    }
    Ok(d)
}

/// A duration of at least 1 ms: timeouts, intervals, deadlines.
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    read(d, |v| at_least(v, Duration::from_millis(1)))
}

/// An optional [`duration`] (a target's own timeout).
pub(super) fn some_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// `control.idle-timeout`: at least 10 ms, so that a client has a chance to send anything.
pub(super) fn idle_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    read(d, |v| at_least(v, Duration::from_millis(10)))
}

/// A duration that may be zero (`housekeeping.retention`).
pub(super) fn any_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    read(d, |v| at_least(v, Duration::ZERO))
}

/// One delay of `forward.retry-schedule`; `"0s"` means at once. A type of its own so that a bad
/// delay is named by its index.
pub(super) struct Delay(pub(super) Duration);

impl<'de> Deserialize<'de> for Delay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Delay, D::Error> {
        any_duration(d).map(Delay)
    }
}

/// A non-empty path, as written (anchored to the file's directory later).
pub(super) fn path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    read(d, |v| match string(v)? {
        s if s.trim().is_empty() => Err("is empty".to_owned()),
        s => Ok(PathBuf::from(s)),
    })
}

/// An optional [`path`].
pub(super) fn some_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    path(d).map(Some)
}

fn is_http(u: &url::Url) -> bool {
    (u.scheme() == "http" || u.scheme() == "https") && u.has_host()
}

/// `api.base-url`: http(s), with a trailing slash so that `join` keeps any path it has.
pub(super) fn base_url<'de, D: Deserializer<'de>>(d: D) -> Result<url::Url, D::Error> {
    read(d, |v| {
        let s = string(v)?;
        match url::Url::parse(s) {
            Ok(mut u) if is_http(&u) => {
                if !u.path().ends_with('/') {
                    let p = format!("{}/", u.path());
                    u.set_path(&p);
                }
                Ok(u)
            }
            Ok(_) => Err(format!("`{s}` must be an http:// or https:// URL")),
            Err(e) => Err(format!("`{s}` is not a URL: {e}")),
        }
    })
}

/// A target's `url`: http(s), kept as written.
pub(super) fn some_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<url::Url>, D::Error> {
    read(d, |v| {
        let s = string(v)?;
        match url::Url::parse(s) {
            Ok(u) if is_http(&u) => Ok(Some(u)),
            _ => Err(format!("`{s}` is not an http:// or https:// URL")),
        }
    })
}

/// An inline signing secret (`whsec_…`). Secret files are read after parsing, not here.
pub(super) fn some_secret<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<SigningSecret>, D::Error> {
    read(d, |v| SigningSecret::parse(string(v)?).map(Some))
}

/// In-flight limits: 1 to 1024.
pub(super) fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    read(d, |v| match v {
        Value::Integer(i) => usize::try_from(*i)
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| format!("{i} is outside 1..=1024")),
        _ => Err(format!("expected an integer, got {}", show(v))),
    })
}

/// `poll.max-requests-per-second`: a number in range, or `"unlimited"` (`None`).
pub(super) fn rate<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    read(d, |v| {
        if v.as_str() == Some("unlimited") {
            return Ok(None);
        }
        // A TOML integer is a rate too: `2` means 2.0.
        match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
            Some(x) if (MIN_RPS..=MAX_RPS).contains(&x) => Ok(Some(x)),
            _ => Err(format!(
                "expected a number from {MIN_RPS} to {MAX_RPS} (like 2 or 0.5) or \"unlimited\", got {}",
                show(v)
            )),
        }
    })
}

/// A boolean, named as TOML spells it.
pub(super) fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    read(d, |v| {
        v.as_bool()
            .ok_or_else(|| format!("expected true or false, got {}", show(v)))
    })
}

/// `control.mode`: `"0660"` or `0o660`.
pub(super) fn mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    read(d, parse_mode)
}

/// `mode = "0660"` or `mode = 0o660`; the daemon's own user must keep read and write.
pub(super) fn parse_mode(v: &Value) -> Check<u32> {
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

/// `control.group`: a group name or number.
pub(super) fn group<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    read(d, |v| match v {
        Value::String(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Value::Integer(i) if *i >= 0 => Ok(Some(i.to_string())),
        _ => Err(format!("expected a group name or number, got {}", show(v))),
    })
}

/// `log.level`, lower-cased.
pub(super) fn level<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    read(d, |v| {
        let s = string(v)?;
        let level = s.to_ascii_lowercase();
        if ["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
            Ok(level)
        } else {
            Err(format!(
                "`{s}` is not one of error, warn, info, debug, trace"
            ))
        }
    })
}

/// `log.format`.
pub(super) fn log_format<'de, D: Deserializer<'de>>(d: D) -> Result<LogFormat, D::Error> {
    read(d, |v| {
        let s = string(v)?;
        LogFormat::parse(s)
            .ok_or_else(|| format!("`{s}` is not one of {}", LogFormat::NAMES.join(", ")))
    })
}

/// `housekeeping.prune-schedule`: 5 cron fields, or 6 with seconds first.
pub(super) fn cron<'de, D: Deserializer<'de>>(d: D) -> Result<croner::Cron, D::Error> {
    read(d, |v| {
        let s = string(v)?;
        s.parse::<croner::Cron>()
            .map_err(|e| format!("`{s}` is not a cron expression: {e}"))
    })
}

/// A target's `stages`: a non-empty list of stage names.
pub(super) fn some_stages<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Stage>>, D::Error> {
    read(d, |v| {
        let items = v.as_array().ok_or_else(|| {
            format!(
                "expected a list like [\"complete\", \"error\"], got {}",
                show(v)
            )
        })?;
        if items.is_empty() {
            return Err("is empty: the target would get nothing".to_owned());
        }
        let stage = |item: &Value| {
            item.as_str().and_then(Stage::parse).ok_or_else(|| {
                format!(
                    "{} is not one of \"text\", \"first\", \"complete\", \"error\"",
                    show(item)
                )
            })
        };
        items.iter().map(stage).collect::<Check<Vec<_>>>().map(Some)
    })
}
