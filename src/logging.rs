//! Log output: where the daemon's lines go and what they look like (`[log] format`).
//!
//! - `auto` (the default): when stderr is the journal, entries go to journald with structured
//!   fields and priorities; otherwise human lines with timestamps go to stderr (coloured only
//!   on a terminal).
//! - `journald`: always journald (falling back to `plain` if its socket cannot be reached).
//! - `plain`: lines without timestamps, each with a `<N>` priority prefix that journald reads
//!   from the stream (the journal stamps lines itself).
//! - `json`: one JSON object per line, with a timestamp, for log shippers.
//!
//! "stderr is the journal" is decided as systemd.exec(5) says: `$JOURNAL_STREAM` names the
//! device and inode of the stream systemd connected, and it must match stderr's own. Merely
//! being set proves nothing (a child of a service inherits it with stderr redirected), and
//! reaching journald's socket proves nothing either (it exists on every systemd host, also for
//! a CLI run in a terminal), so neither is used as the test.
//!
//! The journald output is our own small writer of journald's native protocol rather than the
//! tracing-journald crate, for two reasons: its `MESSAGE` carries the event's fields as well
//! (`event task_id=… stage=first …`), so `journalctl -u sunopoll` is as readable as the plain
//! lines, while every field is also its own journal field (`TASK_ID`, `STAGE`, …) for
//! `journalctl TASK_ID=…`; and it takes the socket path as an argument, so tests can read what it
//! sends. An entry that cannot be sent as a datagram (too large, journald restarting) is written
//! to stderr instead, which under systemd is the journal too.
//!
//! The journald socket is non-blocking: a log line must never stop a tokio worker or the store
//! thread. When journald stalls (its receive queue full), each entry goes to stderr instead, the
//! first time with a line saying why; every entry tries the socket first, so the journal is used
//! again as soon as it drains.
//!
//! `RUST_LOG`, when set, overrides the configured level (e.g. `RUST_LOG=sunopoll=debug`).

use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{IsTerminal, Write as _};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// journald's native-protocol socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// The `SYSLOG_IDENTIFIER` of every entry (`journalctl -t sunopoll`).
pub const IDENTIFIER: &str = "sunopoll";

/// `[log] format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// The journal when stderr is the journal, otherwise human lines with timestamps.
    #[default]
    Auto,
    /// journald's native protocol, with structured fields.
    Journald,
    /// Lines without timestamps, with a `<N>` priority prefix.
    Plain,
    /// JSON lines.
    Json,
}

impl LogFormat {
    /// Every accepted spelling, for error messages.
    pub const NAMES: [&'static str; 4] = ["auto", "journald", "plain", "json"];

    /// Parses a config value (case-insensitive).
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Some(LogFormat::Auto),
            "journald" => Some(LogFormat::Journald),
            "plain" => Some(LogFormat::Plain),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Auto => "auto",
            LogFormat::Journald => "journald",
            LogFormat::Plain => "plain",
            LogFormat::Json => "json",
        }
    }
}

/// What the log output actually is, once `auto` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// journald's native protocol.
    Journal,
    /// Lines without timestamps, with a priority prefix.
    Plain,
    /// Lines with timestamps.
    Human,
    /// JSON lines.
    Json,
}

/// Resolves `auto`: the journal when stderr is the journal, human lines otherwise.
pub fn choose(format: LogFormat, stderr_is_journal: bool) -> Output {
    match format {
        LogFormat::Auto if stderr_is_journal => Output::Journal,
        LogFormat::Auto => Output::Human,
        LogFormat::Journald => Output::Journal,
        LogFormat::Plain => Output::Plain,
        LogFormat::Json => Output::Json,
    }
}

/// True when this process's stderr is the journal stream named by `journal_stream` (the value of
/// `$JOURNAL_STREAM`). Compares device and inode with stderr's own, through a duplicate of the
/// descriptor, so no `/proc` is needed.
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .is_ok_and(|fd| is_journal_stream(journal_stream, &File::from(fd)))
}

/// True when `stream` is the stream `journal_stream` (`"DEVICE:INODE"`, both decimal, as systemd
/// writes `$JOURNAL_STREAM`) names.
pub fn is_journal_stream(journal_stream: Option<&str>, stream: &File) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(|v| {
        let (dev, ino) = v.trim().split_once(':')?;
        Some((dev.parse::<u64>().ok()?, ino.parse::<u64>().ok()?))
    }) else {
        return false;
    };
    stream
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// Changes the level of the subscriber [`init`] installed, for a reload.
type SetFilter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Set once by [`init`]: the global subscriber is process-wide by nature, and so is its level.
static SET_FILTER: std::sync::OnceLock<SetFilter> = std::sync::OnceLock::new();

/// Installs the global subscriber at `level` (error, warn, info, debug or trace) in `format`, and
/// returns what it chose. Safe to call more than once; later calls change nothing. The level can
/// be changed later with [`set_level`].
pub fn init(level: &str, format: LogFormat, stderr_is_journal: bool) -> Output {
    let (filter, handle) = tracing_subscriber::reload::Layer::new(
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
    );
    let plain = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(SyslogPrefix(
                tracing_subscriber::fmt::format()
                    .with_target(false)
                    .with_ansi(false)
                    .without_time(),
            ))
    };
    let registry = tracing_subscriber::registry();
    let (installed, output) = match choose(format, stderr_is_journal) {
        Output::Journal => match JournalLayer::connect(Path::new(JOURNAL_SOCKET)) {
            Ok(layer) => (
                registry.with(filter).with(layer).try_init().is_ok(),
                Output::Journal,
            ),
            Err(e) => {
                let installed = registry.with(filter).with(plain()).try_init().is_ok();
                tracing::warn!(
                    error = %e,
                    socket = JOURNAL_SOCKET,
                    "cannot reach journald; logging plain lines to stderr instead"
                );
                (installed, Output::Plain)
            }
        },
        Output::Plain => (
            registry.with(filter).with(plain()).try_init().is_ok(),
            Output::Plain,
        ),
        Output::Human => (
            registry
                .with(filter)
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_target(false)
                        .with_ansi(std::io::stderr().is_terminal()),
                )
                .try_init()
                .is_ok(),
            Output::Human,
        ),
        Output::Json => (
            registry
                .with(filter)
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_span_list(false)
                        .with_writer(std::io::stderr)
                        .with_target(false),
                )
                .try_init()
                .is_ok(),
            Output::Json,
        ),
    };
    if installed {
        let _ = SET_FILTER.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
    }
    output
}

/// Changes the level of the subscriber [`init`] installed (a reload). Fails when `RUST_LOG`
/// overrides the configured level, when `level` is not one, or when [`init`] did not install
/// the subscriber of this process.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set, and overrides log.level".to_owned());
    }
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level `{level}`: {e}"))?;
    let set = SET_FILTER
        .get()
        .ok_or_else(|| "the log subscriber was not installed by sunopoll".to_owned())?;
    set(filter)
}

/// The syslog priority journald gives a tracing level: error 3, warning 4, info 6, debug and
/// trace 7 (so `journalctl -p warning` shows exactly the warnings and errors).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Prefixes each line with `<N>`, the syslog priority, which journald reads from a stream.
struct SyslogPrefix<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Sends each event to journald as one entry: `MESSAGE` (the message and its fields, as a plain
/// line shows them), `PRIORITY`, `SYSLOG_IDENTIFIER`, and one journal field per event field.
/// Span fields are not included (sunopoll logs no spans).
///
/// An entry journald cannot take at once (its queue is full, it is restarting, the entry is too
/// large) is written as a plain line to the fallback writer, stderr unless
/// [`JournalLayer::with_fallback`] says otherwise.
pub struct JournalLayer<W = fn() -> std::io::Stderr> {
    socket: UnixDatagram,
    path: PathBuf,
    fallback: W,
    /// Set once the stall has been reported, so a journald that stays stalled costs one note.
    stall_reported: AtomicBool,
}

/// The note written to the fallback (with a warning's priority prefix) the first time journald
/// cannot take an entry at once.
pub const STALL_NOTE: &str = "journald is not accepting entries (its socket is full); \
    log lines go to stderr until it drains";

impl JournalLayer {
    /// Connects to journald at `path`, checking that something receives there (journald
    /// discards an empty datagram). The socket is non-blocking from here on.
    pub fn connect(path: &Path) -> std::io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        match socket.send_to(&[], path) {
            Ok(_) => {}
            // Someone is bound there and merely busy: later entries find it drained.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(JournalLayer {
            socket,
            path: path.to_owned(),
            fallback: std::io::stderr,
            stall_reported: AtomicBool::new(false),
        })
    }
}

impl<W> JournalLayer<W> {
    /// The same layer, writing the lines journald cannot take to `fallback` instead of stderr.
    pub fn with_fallback<W2>(self, fallback: W2) -> JournalLayer<W2> {
        JournalLayer {
            socket: self.socket,
            path: self.path,
            fallback,
            stall_reported: self.stall_reported,
        }
    }
}

impl<S, W> Layer<S> for JournalLayer<W>
where
    S: Subscriber,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = EventFields::default();
        event.record(&mut fields);
        let priority = priority(event.metadata().level());
        let entry = journal_entry(priority, &fields);
        let Err(e) = self.socket.send_to(&entry, &self.path) else {
            return;
        };
        // Under systemd stderr is the journal as well; keep the priority with the prefix.
        let mut out = self.fallback.make_writer();
        if e.kind() == std::io::ErrorKind::WouldBlock
            && !self.stall_reported.swap(true, Ordering::Relaxed)
        {
            let _ = writeln!(out, "<4>{STALL_NOTE}");
        }
        let _ = writeln!(out, "<{priority}>{}", fields.line());
    }
}

/// An event's message and fields, as recorded.
#[derive(Debug, Default)]
pub struct EventFields {
    message: String,
    /// (name, the value itself, the value as a plain log line shows it)
    fields: Vec<(&'static str, String, String)>,
}

impl EventFields {
    /// The message followed by `name=value` for each field, as the plain log line shows it.
    pub fn line(&self) -> String {
        let mut line = self.message.clone();
        for (name, _, shown) in &self.fields {
            if !line.is_empty() {
                line.push(' ');
            }
            let _ = write!(line, "{name}={shown}");
        }
        line
    }
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.fields
                .push((field.name(), value.to_owned(), format!("{value:?}")));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else {
            self.fields.push((field.name(), text.clone(), text));
        }
    }
}

/// The fields this layer sets itself; an event field with the same name gets an `F_` prefix
/// instead of overwriting them.
const OWN_FIELDS: [&str; 3] = ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"];

/// One journal entry in journald's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL).
pub fn journal_entry(priority: u8, fields: &EventFields) -> Vec<u8> {
    let mut entry = Vec::with_capacity(256);
    put_field(&mut entry, "MESSAGE", fields.line().as_bytes());
    put_field(&mut entry, "PRIORITY", priority.to_string().as_bytes());
    put_field(&mut entry, "SYSLOG_IDENTIFIER", IDENTIFIER.as_bytes());
    for (name, value, _) in &fields.fields {
        let Some(mut name) = journal_field_name(name) else {
            continue;
        };
        if OWN_FIELDS.contains(&name.as_str()) {
            name.insert_str(0, "F_");
        }
        put_field(&mut entry, &name, value.as_bytes());
    }
    entry
}

/// A journal field name for a tracing field: upper case, `[A-Z0-9_]` only, not starting with a
/// digit or `_` (leading `_` marks fields only journald itself may set), at most 64 characters.
/// `None` when nothing usable is left.
pub fn journal_field_name(name: &str) -> Option<String> {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .skip_while(|c| *c == '_' || c.is_ascii_digit())
        .take(64)
        .collect();
    (!mapped.is_empty()).then_some(mapped)
}

/// `NAME=value\n`, or for a value with a newline the binary form `NAME\n<u64 LE length>value\n`.
fn put_field(entry: &mut Vec<u8>, name: &str, value: &[u8]) {
    entry.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        entry.push(b'\n');
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        entry.push(b'=');
    }
    entry.extend_from_slice(value);
    entry.push(b'\n');
}

/// `s` safe to print on a terminal or in a log line: every control character (C0, DEL and
/// C1: newline, carriage return, ESC, CSI …) and every character that reorders or breaks
/// displayed text (the bidirectional overrides and isolates, the line and paragraph
/// separators) is written as an escape (`\n`, `\r`, `\t`, else `\u{1b}`). Text from the
/// API or a handler (a status, an error message) then cannot start a new line, move the
/// cursor or recolour the terminal. Everything else, backslashes included, is kept. Borrows
/// when there is nothing to escape, which is almost always.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
    }
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `s` shortened to at most `max` characters (on a character boundary, with `…` when cut) and
/// made [`printable`]: for API strings in log lines and messages, so a 1 MB status string is
/// not a 1 MB log line and an API message cannot forge lines.
pub fn clip(s: &str, max: usize) -> String {
    printable(&truncated(s, max)).into_owned()
}

/// `s` shortened to at most `max` characters, on a character boundary, with `…` when cut;
/// otherwise unchanged. For API strings that are kept (a status string), where escaping is
/// left to whoever shows them.
pub fn truncated(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(s),
        Some((i, _)) => std::borrow::Cow::Owned(format!("{}…", &s[..i])),
    }
}

#[cfg(test)]
mod tests {
    use super::{clip, printable};

    #[test]
    fn printable_escapes_every_control_character_and_keeps_the_rest() {
        assert_eq!(printable("PENDING"), "PENDING");
        assert!(matches!(
            printable("plain ü ✓ \\n"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(printable("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(
            printable("\u{1b}[31mred\u{1b}[0m"),
            "\\u{1b}[31mred\\u{1b}[0m"
        );
        assert_eq!(
            printable("\u{0}\u{7f}\u{9b}\u{85}"),
            "\\u{0}\\u{7f}\\u{9b}\\u{85}"
        );
        assert_eq!(printable("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        for c in (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let shown = printable(&c.to_string()).into_owned();
            assert!(!shown.chars().any(char::is_control), "{c:?} → {shown:?}");
        }
    }

    #[test]
    fn clip_cuts_long_strings_with_a_marker_and_escapes() {
        assert_eq!(clip("a\nb\rc", 10), "a\\nb\\rc");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("ééééé", 2), "éé…");
        let long = "x".repeat(1_000_000);
        assert_eq!(clip(&long, 200).chars().count(), 201);
    }

    use super::*;

    #[test]
    fn auto_means_the_journal_only_when_stderr_is_the_journal() {
        assert_eq!(choose(LogFormat::Auto, true), Output::Journal);
        assert_eq!(choose(LogFormat::Auto, false), Output::Human);
        assert_eq!(choose(LogFormat::Plain, true), Output::Plain);
        assert_eq!(choose(LogFormat::Json, true), Output::Json);
        assert_eq!(choose(LogFormat::Journald, false), Output::Journal);
        for name in LogFormat::NAMES {
            assert_eq!(LogFormat::parse(name).map(LogFormat::as_str), Some(name));
        }
        assert_eq!(LogFormat::parse("JSON"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("syslog"), None);
    }

    #[test]
    fn journal_stream_must_match_the_streams_device_and_inode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = File::create(dir.path().join("stderr")).expect("file");
        let meta = file.metadata().expect("stat");
        let matching = format!("{}:{}", meta.dev(), meta.ino());
        assert!(is_journal_stream(Some(&matching), &file));

        // Set but naming another stream (inherited by a child whose stderr was redirected).
        let other = format!("{}:{}", meta.dev(), meta.ino() + 1);
        assert!(!is_journal_stream(Some(&other), &file));
        assert!(!is_journal_stream(None, &file));
        for junk in ["", "8:", ":123", "x:y", "12"] {
            assert!(!is_journal_stream(Some(junk), &file), "{junk:?}");
        }

        // A pipe is not the journal either, even with JOURNAL_STREAM set to something.
        let (reader, _writer) = std::io::pipe().expect("pipe");
        let pipe = File::from(std::os::fd::OwnedFd::from(reader));
        assert!(!is_journal_stream(Some(&matching), &pipe));
        let pm = pipe.metadata().expect("stat");
        assert!(is_journal_stream(
            Some(&format!("{}:{}", pm.dev(), pm.ino())),
            &pipe
        ));
    }

    #[test]
    fn field_names_follow_journald_rules() {
        assert_eq!(journal_field_name("task_id").as_deref(), Some("TASK_ID"));
        assert_eq!(journal_field_name("retry_in").as_deref(), Some("RETRY_IN"));
        assert_eq!(journal_field_name("_hidden").as_deref(), Some("HIDDEN"));
        assert_eq!(journal_field_name("9lives").as_deref(), Some("LIVES"));
        assert_eq!(journal_field_name("a.b-c").as_deref(), Some("A_B_C"));
        assert_eq!(journal_field_name("__"), None);
        assert_eq!(
            journal_field_name(&"x".repeat(100)).map(|n| n.len()),
            Some(64)
        );
    }

    fn decode(entry: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut rest = entry;
        while !rest.is_empty() {
            let nl = rest.iter().position(|b| *b == b'\n').expect("newline");
            let line = &rest[..nl];
            if let Some(eq) = line.iter().position(|b| *b == b'=') {
                out.push((
                    String::from_utf8_lossy(&line[..eq]).into_owned(),
                    String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
                ));
                rest = &rest[nl + 1..];
            } else {
                let name = String::from_utf8_lossy(line).into_owned();
                let len_bytes: [u8; 8] = rest[nl + 1..nl + 9].try_into().expect("length");
                let len = usize::try_from(u64::from_le_bytes(len_bytes)).expect("len");
                let value = &rest[nl + 9..nl + 9 + len];
                out.push((name, String::from_utf8_lossy(value).into_owned()));
                assert_eq!(rest[nl + 9 + len], b'\n');
                rest = &rest[nl + 10 + len..];
            }
        }
        out
    }

    #[test]
    fn events_reach_a_journal_socket_with_their_fields_and_priority() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.sock");
        let journal = UnixDatagram::bind(&path).expect("bind");
        // Bounded: a lost entry fails the test instead of hanging it.
        journal
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("read timeout");
        let layer = JournalLayer::connect(&path).expect("connect");
        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).expect("the empty probe");
        assert_eq!(n, 0);

        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(task_id = "abc123", stage = %"first", code = 200, cause = "two\nlines", "event");
            tracing::info!(priority = 1, "clash");
        });

        let n = journal.recv(&mut buf).expect("an entry");
        let fields = decode(&buf[..n]);
        let get = |k: &str| {
            fields
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("no {k} in {fields:?}"))
        };
        assert_eq!(get("PRIORITY"), "4");
        assert_eq!(get("SYSLOG_IDENTIFIER"), "sunopoll");
        assert_eq!(get("TASK_ID"), "abc123");
        assert_eq!(get("STAGE"), "first");
        assert_eq!(get("CODE"), "200");
        assert_eq!(get("CAUSE"), "two\nlines");
        let message = get("MESSAGE");
        assert!(
            message.contains("task_id=\"abc123\" stage=first code=200"),
            "{message}"
        );

        let n = journal.recv(&mut buf).expect("an entry");
        let fields = decode(&buf[..n]);
        assert!(fields.contains(&("PRIORITY".to_owned(), "6".to_owned())));
        assert!(fields.contains(&("F_PRIORITY".to_owned(), "1".to_owned())));
    }

    /// The lines a [`JournalLayer`] falls back to, captured.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("captured").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("captured")).into_owned()
        }
    }

    #[test]
    fn a_stalled_journald_never_blocks_and_the_lines_go_to_stderr_until_it_drains() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.sock");
        // A journald stand-in that reads nothing: its queue fills up.
        let journal = UnixDatagram::bind(&path).expect("bind");
        let stderr = Captured::default();
        let layer = JournalLayer::connect(&path)
            .expect("connect")
            .with_fallback({
                let stderr = stderr.clone();
                move || stderr.clone()
            });

        // Far more entries than any datagram queue holds; the logger runs on its own thread so
        // a blocking send fails this test at the deadline instead of hanging it.
        const ENTRIES: usize = 5000;
        let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let logger = std::thread::spawn({
            let dispatch = dispatch.clone();
            move || {
                let started = Instant::now();
                tracing::dispatcher::with_default(&dispatch, || {
                    for n in 0..ENTRIES {
                        tracing::info!(n, padding = %"x".repeat(1024), "entry");
                    }
                });
                let _ = done_tx.send(started.elapsed());
            }
        });
        let took = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the logger returned: a stalled journald must not block it");
        assert!(
            took < Duration::from_secs(10),
            "{ENTRIES} entries took {took:?} against a stalled journald"
        );
        let text = stderr.text();
        assert_eq!(
            text.matches(STALL_NOTE).count(),
            1,
            "the stall is reported once: {}",
            &text[..text.len().min(2000)]
        );
        assert!(
            text.starts_with(&format!("<4>{STALL_NOTE}\n")),
            "{}",
            &text[..200]
        );
        let last = format!("<6>entry n={}", ENTRIES - 1);
        assert!(text.contains(&last), "the last entry went to stderr");
        let on_stderr = text.lines().filter(|l| l.starts_with("<6>entry")).count();
        assert!(on_stderr > 0 && on_stderr < ENTRIES);

        // journald drains its queue: the next entry goes to the journal again, not to stderr.
        journal.set_nonblocking(true).expect("nonblocking");
        let mut buf = vec![0u8; 65536];
        let mut queued = 0;
        while journal.recv(&mut buf).is_ok() {
            queued += 1;
        }
        assert!(
            queued > 1,
            "some entries reached the journal before it stalled"
        );
        logger.join().expect("the logger thread");
        let before = stderr.text().len();
        tracing::dispatcher::with_default(&dispatch, || tracing::warn!("after the drain"));
        journal
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        journal.set_nonblocking(false).expect("blocking");
        let n = journal.recv(&mut buf).expect("the entry after the drain");
        assert!(
            decode(&buf[..n]).contains(&("MESSAGE".to_owned(), "after the drain".to_owned())),
            "the journal is used again once it drains"
        );
        assert_eq!(stderr.text().len(), before, "nothing more on stderr");
    }
}
