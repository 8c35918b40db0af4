//! The config file's value formats: durations, file modes, URLs, cron expressions, secrets, and
//! the other keys whose TOML type alone does not say whether a value is good. Each is a serde
//! `deserialize_with` function that checks the raw TOML value and fails with a message saying
//! what was expected and what was found; [`super::strict`] puts the key's path in front of it.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, Error as _};
use toml::Value;

use super::{MAX_RPS, MIN_RPS, SigningSecret};
use crate::api::families::{Flavor, Kind};
use crate::clock::{format_duration, parse_duration};
use crate::events::Stage;
use crate::logging::LogFormat;

/// A value's check: the value, or what is wrong with it.
type Check<T> = Result<T, String>;

/// Declares `deserialize_with` functions, each a check of the raw TOML value whose complaint
/// becomes the key's problem.
macro_rules! formats {
    ($($(#[doc = $doc:literal])* $name:ident -> $out:ty = $check:expr;)+) => {$(
        $(#[doc = $doc])*
        pub(super) fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$out, D::Error> {
            let check: fn(&Value) -> Check<$out> = $check;
            check(&Value::deserialize(d)?).map_err(D::Error::custom)
        }
    )+};
}

const MS: Duration = Duration::from_millis(1);

formats! {
    /// A duration of at least 1 ms: timeouts, intervals, deadlines.
    duration -> Duration = |v| at_least(v, MS);
    /// A target's own timeout.
    some_duration -> Option<Duration> = |v| at_least(v, MS).map(Some);
    /// `control.idle-timeout`: at least 10 ms, so that a client can send anything at all.
    idle_timeout -> Duration = |v| at_least(v, 10 * MS);
    /// A duration that may be zero: `housekeeping.retention`, a retry delay ("0s" = at once).
    any_duration -> Duration = |v| at_least(v, Duration::ZERO);
    /// A non-empty path, as written (anchored to the file's directory after parsing).
    path -> PathBuf = non_empty_path;
    /// An optional [`path`].
    some_path -> Option<PathBuf> = |v| non_empty_path(v).map(Some);
    /// A `listen` of an HTTP face (`metrics.listen`): an IP address and port, written out (no
    /// host names: the endpoint must not land on an address a resolver picks). Whether it may
    /// be other than loopback is `http::guard::check_listen`'s question.
    some_socket_addr -> Option<std::net::SocketAddr> = |v| {
        let s = string(v)?;
        s.parse().map(Some).map_err(|_| {
            format!("`{s}` is not an address and port like \"127.0.0.1:9464\" or \"[::1]:9464\"")
        })
    };
    /// `api.base-url`: http(s), with a trailing slash so that `join` keeps any path it has.
    base_url -> url::Url = base_url_of;
    /// An account's `base-url`, as [`base_url`].
    some_base_url -> Option<url::Url> = |v| base_url_of(v).map(Some);
    /// An account's `flavor`: which provider's callback spellings it uses.
    some_flavor -> Option<Flavor> = |v| {
        let s = string(v)?;
        Flavor::parse(s).map(Some).ok_or_else(|| format!("`{s}` is not one of \"sunoapi\", \"kie\""))
    };
    /// An account's own `max-requests-per-second` ([`rate`]; unset: `[poll]`'s).
    some_rate -> Option<Option<f64>> = |v| rate_of(v).map(Some);
    /// An account's own `max-in-flight` ([`count`]; unset: `[poll]`'s).
    some_count -> Option<usize> = |v| count_of(v).map(Some);
    /// A target's `kinds`: a non-empty list of task kinds.
    some_kinds -> Option<Vec<Kind>> = |v| {
        let list = "a list like [\"music\", \"wav\"]";
        let items = v.as_array().ok_or_else(|| expected(list, v))?;
        if items.is_empty() {
            return Err("is empty: the target would get nothing".to_owned());
        }
        let kind = |item: &Value| {
            item.as_str().and_then(Kind::parse).ok_or_else(|| {
                format!("{} is not one of {}", show(item), Kind::names())
            })
        };
        items.iter().map(kind).collect::<Check<_>>().map(Some)
    };
    /// A target's `url`: http(s), kept as written.
    some_url -> Option<url::Url> = |v| {
        let s = string(v)?;
        let url = url::Url::parse(s).ok().filter(is_http);
        url.map(Some).ok_or_else(|| format!("`{s}` is not an http:// or https:// URL"))
    };
    /// A non-empty string (`store.url`).
    some_string -> Option<String> = |v| match string(v)?.trim() {
        "" => Err("is empty".to_owned()),
        s => Ok(Some(s.to_owned())),
    };
    /// An inline signing secret (`whsec_…`). Secret files are read after parsing, not here.
    some_secret -> Option<SigningSecret> = |v| SigningSecret::parse(string(v)?).map(Some);
    /// In-flight limits: 1 to 1024.
    count -> usize = count_of;
    /// `poll.max-requests-per-second`: a number in range (an integer too), or `"unlimited"`.
    rate -> Option<f64> = rate_of;
    /// A size in bytes: an integer, or a string like "512MiB", "2GiB", "10MB" (at least 1).
    bytes -> u64 = |v| byte_size(v).and_then(|n| if n == 0 {
        Err("must be at least 1 byte".to_owned())
    } else {
        Ok(n)
    });
    /// A size in bytes that may be zero (`archive.min-free`).
    any_bytes -> u64 = byte_size;
    /// A byte rate, or `"unlimited"`.
    some_bytes -> Option<u64> = |v| match v {
        Value::String(s) if s == "unlimited" => Ok(None),
        _ => byte_size(v).and_then(|n| if n == 0 {
            Err("must be at least 1 byte per second (or \"unlimited\")".to_owned())
        } else {
            Ok(Some(n))
        }),
    };
    /// A boolean, named the way TOML spells it.
    flag -> bool = |v| v.as_bool().ok_or_else(|| expected("true or false", v));
    /// `control.mode`.
    mode -> u32 = parse_mode;
    /// `control.group`: a group name or number.
    group -> Option<String> = |v| match v {
        Value::String(s) if !s.trim().is_empty() => Ok(Some(s.trim().to_owned())),
        Value::Integer(i) if *i >= 0 => Ok(Some(i.to_string())),
        _ => Err(expected("a group name or number", v)),
    };
    /// `log.level`, lower-cased.
    level -> String = |v| {
        let s = string(v)?;
        let level = s.to_ascii_lowercase();
        match level.as_str() {
            "error" | "warn" | "info" | "debug" | "trace" => Ok(level),
            _ => Err(format!("`{s}` is not one of error, warn, info, debug, trace")),
        }
    };
    /// `log.format`.
    log_format -> LogFormat = |v| {
        let s = string(v)?;
        let names = LogFormat::NAMES.join(", ");
        LogFormat::parse(s).ok_or_else(|| format!("`{s}` is not one of {names}"))
    };
    /// `housekeeping.prune-schedule`: 5 cron fields, or 6 with seconds first.
    cron -> croner::Cron = |v| {
        let s = string(v)?;
        s.parse().map_err(|e| format!("`{s}` is not a cron expression: {e}"))
    };
    /// A target's `stages`: a non-empty list of stage names.
    some_stages -> Option<Vec<Stage>> = |v| {
        let list = "a list like [\"complete\", \"error\"]";
        let items = v.as_array().ok_or_else(|| expected(list, v))?;
        if items.is_empty() {
            return Err("is empty: the target would get nothing".to_owned());
        }
        let stage = |item: &Value| {
            let known = "is not one of \"text\", \"first\", \"complete\", \"error\", \"archived\"";
            item.as_str().and_then(Stage::parse).ok_or_else(|| format!("{} {known}", show(item)))
        };
        items.iter().map(stage).collect::<Check<_>>().map(Some)
    };
}

fn base_url_of(v: &Value) -> Check<url::Url> {
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
}

fn count_of(v: &Value) -> Check<usize> {
    match v {
        Value::Integer(i) => usize::try_from(*i)
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| format!("{i} is outside 1..=1024")),
        _ => Err(expected("an integer", v)),
    }
}

fn rate_of(v: &Value) -> Check<Option<f64>> {
    match (v, v.as_float().or_else(|| v.as_integer().map(|i| i as f64))) {
        (Value::String(s), _) if s == "unlimited" => Ok(None),
        (_, Some(x)) if (MIN_RPS..=MAX_RPS).contains(&x) => Ok(Some(x)),
        _ => Err(expected(
            &format!("a number from {MIN_RPS} to {MAX_RPS} (like 2 or 0.5) or \"unlimited\""),
            v,
        )),
    }
}

/// One delay of `forward.retry-schedule`: a type of its own, so a bad delay is named by its
/// index.
pub(super) struct Delay(pub(super) Duration);

impl<'de> Deserialize<'de> for Delay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Delay, D::Error> {
        any_duration(d).map(Delay)
    }
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

fn expected(what: &str, v: &Value) -> String {
    format!("expected {what}, got {}", show(v))
}

fn string(v: &Value) -> Check<&str> {
    v.as_str().ok_or_else(|| expected("a string", v))
}

fn at_least(v: &Value, min: Duration) -> Check<Duration> {
    let text = v
        .as_str()
        .ok_or_else(|| expected("a duration string like \"30s\" or \"2h\"", v))?;
    match parse_duration(text)? {
        d if d < min => Err(format!(
            "{} is too short (at least {})",
            format_duration(d),
            format_duration(min)
        )),
        d => Ok(d),
    }
}

/// `1048576`, `"1MiB"`, `"1 MB"`, `"512KiB"`, `"2G"`: binary and decimal suffixes, any case.
fn byte_size(v: &Value) -> Check<u64> {
    let text = match v {
        Value::Integer(i) => {
            return u64::try_from(*i).map_err(|_| format!("{i} is not a size in bytes"));
        }
        Value::String(s) => s.trim(),
        _ => return Err(expected("a size like 1048576 or \"512MiB\"", v)),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size like \"512MiB\" or \"2GB\""))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{text}` is too large"))
}

fn non_empty_path(v: &Value) -> Check<PathBuf> {
    match string(v)? {
        s if s.trim().is_empty() => Err("is empty".to_owned()),
        s => Ok(PathBuf::from(s)),
    }
}

fn is_http(u: &url::Url) -> bool {
    (u.scheme() == "http" || u.scheme() == "https") && u.has_host()
}

/// `mode = "0660"` or `mode = 0o660`; the daemon's own user must keep read and write.
pub(super) fn parse_mode(v: &Value) -> Check<u32> {
    let mode = match v {
        Value::String(s) => u32::from_str_radix(s.trim().trim_start_matches("0o"), 8)
            .map_err(|_| format!("`{s}` is not an octal mode like \"0660\""))?,
        Value::Integer(i) => u32::try_from(*i).map_err(|_| format!("{i} is not a file mode"))?,
        other => return Err(expected("an octal mode like \"0660\"", other)),
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
