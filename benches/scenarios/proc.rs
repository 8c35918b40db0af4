//! The daemon as a process: start it with a config, talk to its socket, read its resource use
//! from `/proc`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The release binary cargo built for this bench.
pub const BIN: &str = env!("CARGO_BIN_EXE_sunopoll");

/// A running daemon process.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its control socket.
    pub socket: PathBuf,
    /// Time from spawn until the socket answered `status`.
    pub ready_after: Duration,
}

/// Settings that vary between scenarios.
pub struct Setup<'a> {
    /// Fake API URL.
    pub api: &'a str,
    /// Working directory (store, socket, log).
    pub dir: &'a Path,
    /// `[poll]` lines.
    pub poll: &'a str,
    /// Extra config (e.g. a `[[forward.target]]`).
    pub extra: &'a str,
}

impl Daemon {
    /// Writes the config and starts the daemon on a SQLite store in `s.dir`; returns once it
    /// answers on its socket.
    pub fn start(s: &Setup<'_>) -> Daemon {
        let store = format!("path = \"{}\"", s.dir.join("sunopoll.db").display());
        Daemon::start_on(s, &store, "5s")
    }

    /// [`Daemon::start`] with `store` as the `[store]` section's lines (a PostgreSQL `url` and
    /// `lease`, say) and `request_timeout` as `api.request-timeout`.
    pub fn start_on(s: &Setup<'_>, store: &str, request_timeout: &str) -> Daemon {
        let config = s.dir.join("config.toml");
        let socket = s.dir.join("sunopoll.sock");
        std::fs::write(
            &config,
            format!(
                "[api]\nbase-url = \"{}\"\nrequest-timeout = \"{request_timeout}\"\n[poll]\n{}\n[store]\n{store}\n[control]\nsocket = \"{}\"\n[log]\nlevel = \"warn\"\n{}\n",
                s.api,
                s.poll,
                socket.display(),
                s.extra
            ),
        )
        .expect("write config");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("daemon.log"))
            .expect("log");
        let started = Instant::now();
        let child = Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(&config)
            .env("SUNO_API_KEY", "bench-key")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the daemon");
        let mut d = Daemon {
            child,
            socket,
            ready_after: Duration::ZERO,
        };
        loop {
            if UnixStream::connect(&d.socket)
                .is_ok_and(|s| request_on(s, r#"{"cmd":"status"}"#).is_some())
            {
                d.ready_after = started.elapsed();
                return d;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the daemon did not come up; see {}",
                s.dir.join("daemon.log").display()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// One request on a fresh connection.
    pub fn request(&self, line: &str) -> Value {
        let s = UnixStream::connect(&self.socket).expect("connect");
        request_on(s, line).expect("an answer")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Resident memory now and at peak, in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// CPU time used so far (user + system).
    pub fn cpu(&self) -> Duration {
        let (user, system) = self.cpu_user_system();
        user + system
    }

    /// CPU time used so far, user and system apart (utime, stime).
    pub fn cpu_user_system(&self) -> (Duration, Duration) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name (which may contain spaces) start after ") ".
        let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let ticks = clock_ticks();
        let at = |i: usize| Duration::from_millis(f.get(i).copied().unwrap_or(0) * 1000 / ticks);
        (at(11), at(12))
    }

    /// Context switches so far, per thread: each time a thread sleeps after waking counts one,
    /// so the rate of these is the rate of wakeups. Per thread, because threads come and go
    /// (tokio's blocking pool) and a sum would lose their counts.
    pub fn context_switches(&self) -> std::collections::HashMap<String, u64> {
        let mut per_thread = std::collections::HashMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) {
            for t in dir.flatten() {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                let n: u64 = status
                    .lines()
                    .filter(|l| {
                        l.starts_with("voluntary_ctxt_switches:")
                            || l.starts_with("nonvoluntary_ctxt_switches:")
                    })
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum();
                per_thread.insert(t.file_name().to_string_lossy().into_owned(), n);
            }
        }
        per_thread
    }

    /// A thread's name (`comm`), by its id as [`Daemon::context_switches`] keys it.
    pub fn thread_name(&self, tid: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", self.pid()))
            .map_or_else(|_| "gone".to_owned(), |n| n.trim().to_owned())
    }

    /// Threads.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid())).map_or(0, |d| d.count())
    }
}

/// Clock ticks per second, the unit of `/proc/PID/stat`'s CPU times.
pub fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// Sends one line and reads one answer line.
pub fn request_on(mut s: UnixStream, line: &str) -> Option<Value> {
    s.write_all(line.as_bytes()).ok()?;
    s.write_all(b"\n").ok()?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).ok()?;
    serde_json::from_str(&answer).ok()
}

/// A persistent connection for many requests.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    /// Connects.
    pub fn open(socket: &Path) -> Conn {
        let s = UnixStream::connect(socket).expect("connect");
        Conn {
            writer: s.try_clone().expect("clone"),
            reader: BufReader::new(s),
        }
    }

    /// One request, one answer.
    pub fn call(&mut self, line: &str) -> Value {
        self.writer.write_all(line.as_bytes()).expect("write");
        self.writer.write_all(b"\n").expect("write");
        let mut answer = String::new();
        self.reader.read_line(&mut answer).expect("read");
        serde_json::from_str(&answer).expect("json")
    }
}

/// Task IDs shaped like real ones (32 hex characters).
pub fn task_id(prefix: u32, n: u64) -> String {
    format!("{prefix:08x}{n:024x}")
}
