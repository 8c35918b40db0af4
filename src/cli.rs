//! The command line: `sunopoll daemon`, the client commands, and `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::client::{self, EXIT_REFUSED, EXIT_USAGE, Output};
use crate::clock::Clock;
use crate::config::{Config, Environment};
use crate::daemon::{Daemon, StartOptions};
use crate::logging;
use crate::protocol::{
    AddRequest, CancelRequest, EventsRequest, RedeliverRequest, Request, StatusRequest,
};
use crate::systemd::{self, Supervision};

/// Stands in for the Suno API's callbacks on hosts that cannot receive them: polls task state and
/// delivers the text / first / complete / error events locally.
#[derive(Debug, Parser)]
#[command(name = "sunopoll", version, about, long_about = None)]
pub struct Cli {
    /// Options accepted before or after the subcommand.
    #[command(flatten)]
    pub opts: GlobalOptions,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes, before or after the subcommand (`sunopoll --socket P add ID`
/// and `sunopoll add ID --socket P` mean the same).
#[derive(Debug, Clone, Args)]
pub struct GlobalOptions {
    /// The daemon's control socket, for client commands (default: $SUNOPOLL_SOCKET, the
    /// config's control.socket, the per-user socket, then /run/sunopoll.sock).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Config file: what `daemon` runs with and `check-config` checks (default: built-in
    /// defaults); client commands read only its control.socket.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print JSON for scripts instead of text (client commands).
    #[arg(long, global = true)]
    pub json: bool,
}

/// Which tasks `list` shows.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateFilter {
    /// Still being polled.
    Active,
    /// Completed.
    Done,
    /// Ended with an error.
    Failed,
    /// Removed with `sunopoll remove`.
    Removed,
    /// Everything.
    All,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (systemd runs it so).
    Daemon,
    /// Start tracking task IDs (`-` reads IDs from standard input).
    Add {
        /// Task IDs as the API returned them.
        #[arg(required = true, value_name = "TASK_ID")]
        task_ids: Vec<String>,
        /// Also deliver this task's events to this URL.
        #[arg(long, value_name = "URL")]
        callback_url: Option<String>,
        /// A label shown in `list` and `show`.
        #[arg(long, value_name = "TEXT")]
        label: Option<String>,
        /// Poll IDs that ended `failed` (or were removed) again, keeping their events; no
        /// stage is emitted twice. Without it, a known ID is left as it is.
        #[arg(long)]
        again: bool,
        /// The tasks' family: music (generate, extend, covers, add-vocals, …), lyrics, wav,
        /// stems (vocal removal and stem separation), midi, mp4 or cover.
        #[arg(long, value_name = "KIND", default_value = "music")]
        kind: String,
        /// The account to poll them on, by its `[[api.account]]` name (default: the first).
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
    },
    /// List tasks, newest first.
    List {
        /// Only tasks in this state.
        #[arg(long, value_enum, default_value = "all")]
        state: StateFilter,
        /// Show at most this many (newest first); 0 shows all.
        #[arg(long, default_value_t = 1000, value_name = "N")]
        limit: u32,
    },
    /// Show one task: its state, last status and events with their bodies.
    Show {
        /// The task.
        task_id: String,
    },
    /// Stop tracking a task (its events are kept).
    Remove {
        /// The task.
        task_id: String,
    },
    /// Print stored events; with --follow, keep printing new ones.
    Events {
        /// Keep the connection open and print events as they happen.
        #[arg(long)]
        follow: bool,
        /// Only events after this sequence number.
        #[arg(long, value_name = "SEQ")]
        since: Option<i64>,
        /// Only this task's events.
        #[arg(long, value_name = "TASK_ID")]
        task: Option<String>,
    },
    /// Daemon health: queue depth, pause state, last API answer. Exits 1 when unhealthy.
    Status,
    /// Deliver events again to their handlers, with their original webhook-id.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["seq", "task", "failed_since", "sent_since"])))]
    Redeliver {
        /// One event, by sequence number (see `sunopoll events`).
        #[arg(long, value_name = "SEQ")]
        seq: Option<i64>,
        /// Every event of one task.
        #[arg(long, value_name = "TASK_ID")]
        task: Option<String>,
        /// Every delivery given up since TIME (RFC 3339, or a duration ago like "2h").
        #[arg(long, value_name = "TIME")]
        failed_since: Option<String>,
        /// Every delivery made since TIME (RFC 3339, or a duration ago like "2h").
        #[arg(long, value_name = "TIME")]
        sent_since: Option<String>,
        /// Only to this target (a [[forward.target]] name, callback-url or submitted-callback-url).
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
    },
    /// Pending deliveries: `sunopoll deliveries cancel --task ID` gives them up.
    Deliveries {
        /// What to do with them.
        #[command(subcommand)]
        action: DeliveriesAction,
    },
    /// The asset archive: `sunopoll archive redo TASK` checks a task's kept files against their
    /// SHA-256 and fetches again those missing or damaged (while the API still has them).
    Archive {
        /// What to do.
        #[command(subcommand)]
        action: ArchiveAction,
    },
    /// The store: `sunopoll store backup PATH` copies the SQLite file safely, even while the
    /// daemon runs; `sunopoll store copy --from sqlite:PATH --to postgres://…` moves a stopped
    /// daemon's queue to PostgreSQL.
    Store {
        /// What to do with it.
        #[command(subcommand)]
        action: StoreAction,
    },
    /// Check a config file (and say where the API key would come from). Exits 2 on problems.
    CheckConfig,
    /// Print the control socket client commands would use (for socat, scripts): the same
    /// search as theirs (--socket, $SUNOPOLL_SOCKET, the config's control.socket, the defaults).
    SocketPath,
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell) to standard output.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output: `sunopoll man | man -l -`.
    Man {
        /// Instead, write it and a page per subcommand (sunopoll-add.1, …), which its
        /// SUBCOMMANDS section refers to, into this folder (the Debian package ships them).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `sunopoll archive …`.
#[derive(Debug, Subcommand)]
pub enum ArchiveAction {
    /// Verify a task's kept files (SHA-256) and fetch again the missing, damaged, failed or
    /// expired ones.
    Redo {
        /// The task.
        task_id: String,
    },
}

/// `sunopoll store …`.
#[derive(Debug, Subcommand)]
pub enum StoreAction {
    /// Copy the store into a new file with SQLite's online backup API: a consistent snapshot
    /// of everything committed, safe while the daemon runs. Never overwrites a file. Restore
    /// by stopping the daemon and putting the copy in the store's place (see the README).
    Backup {
        /// The new file to write.
        #[arg(value_name = "PATH")]
        path: PathBuf,
        /// The store to copy (default: store.path of --config, or the built-in default).
        #[arg(long, value_name = "PATH")]
        store: Option<PathBuf>,
    },
    /// Copy a stopped daemon's queue (tasks, events, deliveries, accounts, archive state) from
    /// its SQLite store into an empty PostgreSQL database, in one transaction, and verify every
    /// table's rows and kept counts before committing. Exits 1 if anything does not match.
    Copy {
        /// The SQLite store: `sqlite:PATH`. Its daemon must be stopped (its lock is taken).
        #[arg(long, value_name = "sqlite:PATH")]
        from: String,
        /// The PostgreSQL database: `postgres://USER@HOST/DB` (or `postgresql://…`). It must
        /// hold no tasks; its schema is created or migrated as a daemon would.
        #[arg(long, value_name = "URL")]
        to: String,
        /// A file holding the target's password on one line (not shown anywhere).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Retire a host from a shared PostgreSQL queue (the store.url of --config): remove the
    /// target registrations of MEMBER (a host and control socket, as `sunopoll status` names
    /// them). Pending deliveries whose target no other member names are given up; the others
    /// stay pending. Refused while a daemon of that member runs.
    ForgetMember {
        /// The member, as `status` shows it: `HOST:CONTROL_SOCKET`.
        member: String,
        /// Say what would change, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `sunopoll deliveries …`.
#[derive(Debug, Subcommand)]
pub enum DeliveriesAction {
    /// Give up pending deliveries (they stop being retried; `redeliver` can queue them again).
    #[command(group(clap::ArgGroup::new("what").required(true).args(["seq", "task"])))]
    Cancel {
        /// One event's, by sequence number (see `sunopoll events`).
        #[arg(long, value_name = "SEQ")]
        seq: Option<i64>,
        /// Every event's of one task.
        #[arg(long, value_name = "TASK_ID")]
        task: Option<String>,
    },
}

/// The binary's entry point.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let env = Environment::from_process();
    let opts = cli.opts;
    match cli.command {
        Command::Daemon => match daemon_only(&opts, "daemon") {
            Ok(()) => run_daemon(opts.config, &env),
            Err(code) => code,
        },
        Command::Store {
            action: StoreAction::Backup { path, store },
        } => match daemon_only(&opts, "store backup") {
            Ok(()) => backup(opts.config, store, &path, &env),
            Err(code) => code,
        },
        Command::Store {
            action:
                StoreAction::Copy {
                    from,
                    to,
                    password_file,
                },
        } => match daemon_only(&opts, "store copy") {
            Ok(()) => copy(&from, &to, password_file.as_deref()),
            Err(code) => code,
        },
        Command::Store {
            action: StoreAction::ForgetMember { member, dry_run },
        } => match daemon_only(&opts, "store forget-member") {
            Ok(()) => forget_member(opts.config, &member, dry_run, &env),
            Err(code) => code,
        },
        Command::CheckConfig => match daemon_only(&opts, "check-config") {
            Ok(()) => check_config(opts.config, &env),
            Err(code) => code,
        },
        Command::SocketPath => match client_socket(&opts, &env) {
            Ok(socket) => {
                println!("{}", socket.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "sunopoll", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { dir: Some(dir) } => match clap_mangen::generate_to(Cli::command(), &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "sunopoll: cannot write the manual pages into {}: {e}",
                    dir.display()
                );
                ExitCode::from(EXIT_REFUSED)
            }
        },
        Command::Man { dir: None } => {
            use std::io::Write;
            let mut page = Vec::new();
            let written = clap_mangen::Man::new(Cli::command())
                .render(&mut page)
                .and_then(|()| std::io::stdout().write_all(&page));
            match written {
                // `sunopoll man | head` closes the pipe early; that is the reader's choice.
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sunopoll: cannot write the manual page: {e}");
                    ExitCode::from(EXIT_REFUSED)
                }
            }
        }
        Command::Add {
            task_ids,
            callback_url,
            label,
            again,
            kind,
            account,
        } => {
            if crate::api::families::Kind::parse(&kind).is_none() {
                let what = format!(
                    "--kind {kind:?} is not a task kind; the kinds are {}",
                    crate::api::families::Kind::names()
                );
                return usage_error(&opts, "invalid_kind", &what);
            }
            let task_ids = if task_ids == ["-"] {
                match client::read_ids(std::io::stdin()) {
                    Ok(ids) if !ids.is_empty() => ids,
                    Ok(_) => {
                        return usage_error(&opts, "usage", "no task IDs on standard input");
                    }
                    Err(e) => {
                        let what = format!("cannot read task IDs from standard input: {e}");
                        return usage_error(&opts, "usage", &what);
                    }
                }
            } else {
                task_ids
            };
            if let Err(e) = crate::protocol::check_task_ids(&task_ids) {
                return usage_error(&opts, &e.code, &e.message);
            }
            run_client(
                &opts,
                &env,
                Request::Add(AddRequest {
                    task_ids,
                    callback_url,
                    label,
                    again,
                    // Music is the default on both sides: an old daemon still understands it.
                    kind: (kind != "music").then_some(kind),
                    account,
                }),
            )
        }
        Command::List { state, limit } => {
            let state = match state {
                StateFilter::All => None,
                s => Some(format!("{s:?}").to_lowercase()),
            };
            run_client(
                &opts,
                &env,
                client::list_request(state, (limit > 0).then_some(limit)),
            )
        }
        Command::Show { task_id } => run_client(&opts, &env, client::show_request(task_id)),
        Command::Remove { task_id } => run_client(&opts, &env, client::remove_request(task_id)),
        Command::Events {
            follow,
            since,
            task,
        } => run_client(
            &opts,
            &env,
            Request::Events(EventsRequest {
                since,
                follow,
                task_id: task,
                limit: None,
            }),
        ),
        Command::Status => run_client(&opts, &env, Request::Status(StatusRequest {})),
        Command::Archive {
            action: ArchiveAction::Redo { task_id },
        } => run_client(
            &opts,
            &env,
            Request::ArchiveRedo(crate::protocol::ArchiveRedoRequest { task_id }),
        ),
        Command::Deliveries {
            action: DeliveriesAction::Cancel { seq, task },
        } => run_client(
            &opts,
            &env,
            Request::Cancel(CancelRequest { seq, task_id: task }),
        ),
        Command::Redeliver {
            seq,
            task,
            failed_since,
            sent_since,
            target,
        } => {
            let when = |s: Option<String>| -> Result<Option<String>, String> {
                s.map(|s| {
                    if let Ok(ago) = crate::clock::parse_duration(&s) {
                        Ok(crate::clock::format_utc(crate::clock::now_ms() - crate::clock::ms(ago)))
                    } else if crate::clock::parse_utc(&s).is_some() {
                        Ok(s)
                    } else {
                        Err(format!("{s:?} is neither an RFC 3339 time (2026-11-26T10:00:00Z) nor a duration ago (\"2h\")"))
                    }
                })
                .transpose()
            };
            let (failed_since, sent_since) = match (when(failed_since), when(sent_since)) {
                (Ok(f), Ok(s)) => (f, s),
                (Err(e), _) | (_, Err(e)) => return usage_error(&opts, "usage", &e),
            };
            run_client(
                &opts,
                &env,
                Request::Redeliver(RedeliverRequest {
                    seq,
                    task_id: task,
                    failed_since,
                    sent_since,
                    target,
                }),
            )
        }
    }
}

/// A usage or config error of a client command, printed as text or (with `--json`) as the
/// daemon's error line; exits [`EXIT_USAGE`].
fn usage_error(opts: &GlobalOptions, code: &str, message: &str) -> ExitCode {
    let body = crate::protocol::ErrorBody::new(code, message);
    client::print_error(Output { json: opts.json }, &body, message);
    ExitCode::from(EXIT_USAGE)
}

/// `--socket` and `--json` belong to client commands; the daemon's socket is `control.socket`
/// in its config. Refusing them beats ignoring them: an operator who typed one meant something.
fn daemon_only(opts: &GlobalOptions, command: &str) -> Result<(), ExitCode> {
    let stray = if opts.socket.is_some() {
        Some("--socket (set control.socket in the config instead)")
    } else if opts.json {
        Some("--json")
    } else {
        None
    };
    match stray {
        Some(flag) => {
            eprintln!("sunopoll: {command} does not take {flag}");
            Err(ExitCode::from(EXIT_USAGE))
        }
        None => Ok(()),
    }
}

fn run_client(opts: &GlobalOptions, env: &Environment, request: Request) -> ExitCode {
    match client_socket(opts, env) {
        Ok(socket) => client::run(&socket, request, Output { json: opts.json }),
        Err(code) => code,
    }
}

/// The socket client commands talk to.
fn client_socket(opts: &GlobalOptions, env: &Environment) -> Result<PathBuf, ExitCode> {
    // Only control.socket is read: a client has no business reading the daemon's secret files
    // (which it usually may not), nor failing on them.
    let configured = match &opts.config {
        Some(path) => match crate::config::control_socket_in(path) {
            Ok(s) => s,
            Err(e) => return Err(usage_error(opts, "config", &e.to_string())),
        },
        None => None,
    };
    let env_socket = std::env::var_os("SUNOPOLL_SOCKET")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    Ok(client::find_socket(
        opts.socket.as_deref(),
        env_socket.as_deref(),
        configured.as_deref(),
        env,
    ))
}

fn check_config(path: Option<PathBuf>, env: &Environment) -> ExitCode {
    match Config::load(path.as_deref(), env) {
        Ok(config) => {
            println!("{}", config.summary());
            let accounts = config.accounts();
            for account in &accounts {
                let whose = if account.implicit {
                    "api key".to_owned()
                } else {
                    format!("api key of account {:?}", account.name)
                };
                match crate::config::KeySource::of(account, env).read() {
                    Ok(_) => println!("{whose}: found"),
                    // A key file the config names but that cannot be read stops the daemon
                    // (exit 2), so it is a problem here too. Without one, the key may well
                    // come from systemd's credential or the service's environment, which only
                    // it sees.
                    Err(e) if account.key_file.is_some() => {
                        eprintln!("sunopoll: {whose}: {e}; the daemon would not start");
                        return ExitCode::from(EXIT_USAGE);
                    }
                    Err(e) => println!("{whose}: not available here ({e})"),
                }
            }
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sunopoll: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `sunopoll store backup`: the store named by `--store`, else by the config, copied to `to`.
fn backup(
    config: Option<PathBuf>,
    store: Option<PathBuf>,
    to: &std::path::Path,
    env: &Environment,
) -> ExitCode {
    let from = match store {
        Some(p) => p,
        None => match Config::load(config.as_deref(), env) {
            Ok(c) => c.store.path,
            Err(e) => {
                eprintln!("sunopoll: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    match crate::store::Store::backup(&from, to) {
        Ok(tasks) => {
            println!(
                "backed up {} to {} ({tasks} task{})",
                from.display(),
                to.display(),
                if tasks == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sunopoll: {e}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

/// The `--from` and `--to` of `store copy`, checked: the SQLite file and the target's options.
/// The error never repeats the URL (it may hold a password).
fn copy_ends(
    from: &str,
    to: &str,
    password_file: Option<&std::path::Path>,
) -> Result<(PathBuf, crate::store::PgOptions), String> {
    let path = match from.strip_prefix("sqlite:") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            return Err("--from must be sqlite:PATH (the stopped daemon's store file)".to_owned());
        }
    };
    if !(to.starts_with("postgres://") || to.starts_with("postgresql://")) {
        return Err("--to must be a postgres:// or postgresql:// URL".to_owned());
    }
    // Only the file named here: the credential a systemd unit passes is the daemon's.
    let password = match password_file {
        Some(file) => crate::config::store_password(&Environment::default(), Some(file))?,
        None => None,
    };
    let options = crate::store::PgOptions::new(to, password, crate::config::DEFAULT_LEASE, None)
        .map_err(|e| e.replacen("store.url", "the --to URL", 1))?;
    Ok((path, options))
}

/// `sunopoll store copy`: the SQLite queue at `--from` copied into the database at `--to`, one
/// line per table checked.
fn copy(from: &str, to: &str, password_file: Option<&std::path::Path>) -> ExitCode {
    let (path, options) = match copy_ends(from, to, password_file) {
        Ok(ends) => ends,
        Err(e) => {
            eprintln!("sunopoll: store copy: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sunopoll: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    match runtime.block_on(crate::store::Store::copy_to_postgres(&path, &options)) {
        Ok(report) => {
            for check in &report.checks {
                println!("{check}");
            }
            let secs = report.elapsed.as_secs_f64();
            println!(
                "copied {} to {}: {} rows in {:.2} s ({:.0} rows/s)",
                path.display(),
                options.shown(),
                report.rows,
                secs,
                if secs > 0.0 {
                    report.rows as f64 / secs
                } else {
                    0.0
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sunopoll: store copy: {e}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

/// `sunopoll store forget-member`: the member's registrations removed from the shared queue of
/// `--config`, one line per target saying what becomes of its pending deliveries.
fn forget_member(
    config: Option<PathBuf>,
    member: &str,
    dry_run: bool,
    env: &Environment,
) -> ExitCode {
    let config = match Config::load(config.as_deref(), env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sunopoll: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let Some(options) = config.store.postgres else {
        eprintln!(
            "sunopoll: store forget-member: the store is the SQLite file {} (one daemon, no members); set store.url to the shared PostgreSQL queue",
            config.store.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sunopoll: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    let report = match runtime.block_on(crate::store::forget_member(&options, member, dry_run)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sunopoll: store forget-member: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    if let Some((daemon, beat_at)) = &report.running {
        eprintln!(
            "sunopoll: store forget-member: {member} is running (daemon {daemon}, last beat {}): stop it first, or take the targets out of its config and reload it",
            crate::clock::format_utc(*beat_at)
        );
        return ExitCode::from(EXIT_REFUSED);
    }
    if report.targets.is_empty() {
        let known = if report.members.is_empty() {
            "no member has registered targets".to_owned()
        } else {
            format!("members with registrations: {}", report.members.join(", "))
        };
        eprintln!(
            "sunopoll: store forget-member: no targets are registered under {member} ({known}; `sunopoll status` names them)"
        );
        return ExitCode::from(EXIT_REFUSED);
    }
    let n = report.targets.len();
    println!(
        "{} {member}: {n} target registration{}{}",
        if dry_run { "would forget" } else { "forgot" },
        if n == 1 { "" } else { "s" },
        if dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
    for t in &report.targets {
        let deliveries = format!(
            "{} pending deliver{}",
            t.pending,
            if t.pending == 1 { "y" } else { "ies" }
        );
        if t.still_named_by.is_empty() {
            println!(
                "  target {}: named by no other member; its {deliveries} {} given up",
                t.name,
                if dry_run { "would be" } else { "were" }
            );
        } else {
            println!(
                "  target {}: still named by {}; its {deliveries} stay pending for them",
                t.name,
                t.still_named_by.join(", ")
            );
        }
    }
    if !dry_run {
        println!(
            "{} pending deliver{} given up",
            report.given_up,
            if report.given_up == 1 { "y" } else { "ies" }
        );
    }
    ExitCode::SUCCESS
}

fn run_daemon(path: Option<PathBuf>, env: &Environment) -> ExitCode {
    let config = match Config::load(path.as_deref(), env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sunopoll: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let key = match config.api_key(env) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("sunopoll: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // systemd hands the daemon everything through the environment; read it here, once.
    let journal = logging::stderr_is_journal(std::env::var("JOURNAL_STREAM").ok().as_deref());
    let output = logging::init(&config.log.level, config.log.format, journal);
    tracing::debug!(?output, stderr_is_journal = journal, "log output chosen");
    // Before the runtime starts any thread: taking the socket also clears LISTEN_FDS/LISTEN_PID
    // from the environment, which is only sound while the process is single-threaded.
    let passed = match systemd::take_passed_socket() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    let supervision = Supervision::from_env();
    let notifier = supervision.notifier.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sunopoll: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_REFUSED);
        }
    };
    runtime.block_on(async move {
        let signals = match Signals::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                return ExitCode::from(EXIT_REFUSED);
            }
        };
        let options = StartOptions {
            clock: Clock::system(),
            env: Some(env.clone()),
        };
        let mut daemon = match Daemon::start_with(config, key, passed, supervision, options).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("cannot start: {e:#}");
                notifier.status(&format!("cannot start: {e:#}"));
                // systemd's unit does not restart on EXIT_USAGE (RestartPreventExitStatus=2):
                // a restart loop cannot get past another daemon holding the store or socket.
                return ExitCode::from(if crate::daemon::is_unrecoverable(&e) {
                    EXIT_USAGE
                } else {
                    EXIT_REFUSED
                });
            }
        };
        // Config, store, socket and HTTP client are all up: only now is the service ready.
        notifier.ready();
        let mut signals = signals;
        let which = loop {
            match signals.next().await {
                "SIGHUP" => reload(&mut daemon, path.as_deref(), env),
                stop => break stop,
            }
        };
        tracing::info!(signal = which, "received {which}");
        tokio::select! {
            () = daemon.shutdown() => ExitCode::SUCCESS,
            again = signals.next() => {
                tracing::warn!(signal = again, "second signal during shutdown; exiting at once");
                ExitCode::from(EXIT_REFUSED)
            }
        }
    })
}

/// SIGHUP: reads the config file again with the same loader as at start, and applies what
/// can change while running. An invalid file changes nothing: the daemon keeps running by the
/// config it has, and says why.
fn reload(daemon: &mut Daemon, path: Option<&std::path::Path>, env: &Environment) {
    tracing::info!(signal = "SIGHUP", "received SIGHUP; reloading the config");
    let new = match Config::load(path, env) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(problems = %e, "the config file is invalid; keeping the running config");
            return;
        }
    };
    match daemon.reload(new) {
        Err(e) => {
            tracing::error!(problem = %e, "cannot read the API key; keeping the running config");
        }
        Ok(r) => {
            let applied = if r.applied.is_empty() {
                "nothing changed".to_owned()
            } else {
                r.applied.join(", ")
            };
            tracing::info!(applied = %applied, "config reloaded");
            if !r.need_restart.is_empty() {
                tracing::warn!(
                    settings = %r.need_restart.join(", "),
                    "these settings changed in the file but take effect only after a restart"
                );
            }
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP, installed before the daemon reports itself ready.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
