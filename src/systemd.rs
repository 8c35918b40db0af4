//! The service manager's side of the daemon: what systemd hands it, and what it tells systemd.
//!
//! systemd passes three things through the environment: a notification socket
//! (`NOTIFY_SOCKET`), a watchdog interval (`WATCHDOG_USEC`), and a listening socket
//! (`LISTEN_FDS`, socket activation). They are read once, in `cli`, by the functions here and
//! passed down as values: a [`Supervision`] and an optional [`PassedSocket`]. Nothing deeper
//! reads the environment.
//!
//! The daemon answers with `READY=1` once [`crate::daemon::Daemon::start`] has returned (config,
//! store, socket and HTTP client all up), a `STATUS=` line the scheduler keeps current,
//! `WATCHDOG=1` pings sent from the scheduler's own loop (so a wedged loop gets the service
//! restarted), and `STOPPING=1` when shutdown begins. Without `NOTIFY_SOCKET` all of that is
//! silently skipped, so development and tests need no special case.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// A listening socket handed over by the caller (systemd socket activation), with its path.
/// The daemon never deletes it: the socket unit owns the file and keeps it across restarts.
#[derive(Debug)]
pub struct PassedSocket {
    /// The listener.
    pub listener: std::os::unix::net::UnixListener,
    /// Its path, for logs and `status`.
    pub path: PathBuf,
}

/// The shortest watchdog ping period we accept. A tiny `WATCHDOG_USEC` would otherwise make the
/// scheduler loop spin; systemd's own minimum useful setting is far above this.
pub const MIN_WATCHDOG_PERIOD: Duration = Duration::from_millis(10);

/// How the service manager supervises the daemon: where notifications go, and how often the
/// watchdog wants a ping. The default is no supervision at all.
#[derive(Clone, Debug, Default)]
pub struct Supervision {
    /// Where `READY=1`, `STATUS=`, `WATCHDOG=1` and `STOPPING=1` go.
    pub notifier: Notifier,
    /// How often the scheduler loop pings the watchdog (half of `WATCHDOG_USEC`), if enabled.
    pub watchdog: Option<Duration>,
}

impl Supervision {
    /// What systemd asked for, from the process environment. Called once, in `cli`.
    pub fn from_env() -> Supervision {
        Supervision {
            notifier: Notifier::from_env(),
            watchdog: watchdog_period(sd_notify::watchdog_enabled()),
        }
    }
}

/// The ping period for a watchdog `timeout`: half of it, as sd_watchdog_enabled(3) recommends,
/// so one late ping does not kill the service. `None` (or zero) means no watchdog.
pub fn watchdog_period(timeout: Option<Duration>) -> Option<Duration> {
    timeout
        .filter(|t| !t.is_zero())
        .map(|t| (t / 2).max(MIN_WATCHDOG_PERIOD))
}

/// Sends state changes to the service manager.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    sink: Sink,
}

#[derive(Clone, Debug, Default)]
enum Sink {
    /// No service manager is listening.
    #[default]
    Off,
    /// systemd's `NOTIFY_SOCKET` (sd-notify reads the variable when it sends).
    Systemd,
    /// Kept in memory, for tests that watch what the daemon would have said.
    Recorded(Arc<Mutex<Vec<String>>>),
}

impl Notifier {
    /// Sends to systemd when `NOTIFY_SOCKET` is set, otherwise nowhere.
    pub fn from_env() -> Notifier {
        let set = std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty());
        Notifier {
            sink: if set { Sink::Systemd } else { Sink::Off },
        }
    }

    /// A notifier that keeps every message (one string per message, lines joined by `\n`),
    /// and the handle to read them.
    pub fn recording() -> (Notifier, Recording) {
        let log = Arc::new(Mutex::new(Vec::new()));
        (
            Notifier {
                sink: Sink::Recorded(log.clone()),
            },
            Recording(log),
        )
    }

    /// True when someone listens: callers skip work (such as counting tasks for `STATUS=`)
    /// that only the listener needs.
    pub fn is_enabled(&self) -> bool {
        !matches!(self.sink, Sink::Off)
    }

    /// `READY=1`: everything is up.
    pub fn ready(&self) {
        if let Err(e) = self.send(&[NotifyState::Ready]) {
            warn!(error = %e, "cannot tell systemd that sunopoll is ready");
        }
    }

    /// `STATUS=…`: one line for `systemctl status`.
    pub fn status(&self, line: &str) {
        if let Err(e) = self.send(&[NotifyState::Status(line)]) {
            debug!(error = %e, "cannot send the status line to systemd");
        }
    }

    /// `WATCHDOG=1`: the scheduler loop is alive.
    pub fn watchdog(&self) {
        if let Err(e) = self.send(&[NotifyState::Watchdog]) {
            warn!(error = %e, "cannot ping systemd's watchdog");
        }
    }

    /// `STOPPING=1` with a last status line: shutdown has begun.
    pub fn stopping(&self, line: &str) {
        if let Err(e) = self.send(&[NotifyState::Stopping, NotifyState::Status(line)]) {
            debug!(error = %e, "cannot tell systemd that sunopoll is stopping");
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) -> std::io::Result<()> {
        match &self.sink {
            Sink::Off => Ok(()),
            Sink::Systemd => sd_notify::notify(states),
            Sink::Recorded(log) => {
                let text = states
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n");
                log.lock().unwrap_or_else(|p| p.into_inner()).push(text);
                Ok(())
            }
        }
    }
}

/// The messages a [`Notifier::recording`] notifier kept.
#[derive(Clone, Debug)]
pub struct Recording(Arc<Mutex<Vec<String>>>);

impl Recording {
    /// Every message so far, oldest first.
    pub fn messages(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Takes the listening socket systemd passed (socket activation), if any: the first of
/// `LISTEN_FDS`, when `LISTEN_PID` is ours or unset. Its path comes from the socket itself.
///
/// Call it once, before any thread starts: it also removes `LISTEN_FDS` and `LISTEN_PID` from the
/// environment (so children do not inherit them), and changing the environment is only sound
/// while the process is single-threaded.
pub fn take_passed_socket() -> Result<Option<PassedSocket>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 1 {
        warn!(
            count = fds.len(),
            "systemd passed more than one socket; using the first as the control socket"
        );
    }
    let listener = match fds.take_unix_listener(0) {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(None),
        Err(e) => {
            return Err(format!(
                "systemd passed a socket that is not a Unix stream socket ({e}); \
                 sunopoll.socket must use ListenStream= with a path"
            ));
        }
    };
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("(unnamed socket passed by systemd)"));
    Ok(Some(PassedSocket { listener, path }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout() {
        assert_eq!(watchdog_period(None), None);
        assert_eq!(watchdog_period(Some(Duration::ZERO)), None);
        assert_eq!(
            watchdog_period(Some(Duration::from_secs(60))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_period(Some(Duration::from_micros(2))),
            Some(MIN_WATCHDOG_PERIOD)
        );
    }

    #[test]
    fn a_recording_notifier_keeps_each_message_whole() {
        let (n, rec) = Notifier::recording();
        assert!(n.is_enabled());
        n.ready();
        n.status("3 tasks active, polling");
        n.watchdog();
        n.stopping("stopping");
        assert_eq!(
            rec.messages(),
            [
                "READY=1",
                "STATUS=3 tasks active, polling",
                "WATCHDOG=1",
                "STOPPING=1\nSTATUS=stopping"
            ]
        );
        assert!(!Notifier::default().is_enabled());
    }
}
