//! The daemon: wires the store, the API client, the scheduler, the control server and
//! housekeeping together, and takes them down in order.
//!
//! [`Daemon::start`] returns once everything is up (store open and migrated, socket bound, HTTP
//! client built), so "started" means "ready": the caller sends systemd `READY=1` then.
//! [`Daemon::shutdown`] tells systemd `STOPPING=1`, stops accepting work, lets polls already in
//! flight commit, and waits at most a bounded drain time.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::api::{ApiClient, ApiKey};
use crate::archive::sink::Sink;
use crate::clock::{Clock, format_duration, now_ms, parse_utc};
use crate::config::{AccountConfig, Config, Environment, KeySource};
use crate::control::ArchiveControl;
use crate::control::{self, AccountHandle, Control, ControlSocket, DaemonInfo};
use crate::forward::Router;
use crate::jobs::archive::{ArchiveStatus, Archiver, SharedArchiveStatus};
use crate::jobs::deliver::Forwarder;
use crate::jobs::poll::{PollStatus, Scheduler, SharedStatus};
use crate::jobs::rate::SharedLimiter;
use crate::metrics::{AccountGauges, GaugeSource, Gauges, Metrics, TargetGauges};
use crate::store::Store;
use crate::systemd::{Notifier, PassedSocket, Supervision};

/// Longest wait for in-flight polls at shutdown. systemd's default stop timeout is 90 s and our
/// unit sets 30 s; staying well inside it means we are never SIGKILLed mid-commit.
pub const MAX_DRAIN: Duration = Duration::from_secs(20);

/// A start-up failure that starting again cannot fix while nothing else changes (another live
/// daemon holds the socket). [`is_unrecoverable`] tells the binary to exit with the status
/// systemd does not restart on.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unrecoverable(pub String);

/// True when `e`, a failed [`Daemon::start`], would fail the same way on every retry: the
/// store or the socket is held by another live daemon.
pub fn is_unrecoverable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<Unrecoverable>()
            || matches!(
                c.downcast_ref::<crate::store::StoreError>(),
                Some(crate::store::StoreError::InUse(_))
            )
    })
}

/// A running daemon.
pub struct Daemon {
    cancel: CancellationToken,
    tracker: TaskTracker,
    socket: ControlSocket,
    store: Store,
    drain: Duration,
    notifier: Notifier,
    metrics_addr: Option<SocketAddr>,
    live: Live,
}

/// How [`Daemon::start_with`] runs besides its config.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The wall clock of the job loops.
    pub clock: Clock,
    /// Where the accounts' keys come from. With it, every account's key is read from its
    /// source at start (the first account's is the `key` given), and again before each probe
    /// after a rejected key and on a reload. Without it (tests), every account uses `key`.
    pub env: Option<Environment>,
}

/// One account's reloadable parts.
struct LiveAccount {
    config: AccountConfig,
    api: ApiClient,
    rate: watch::Sender<Option<f64>>,
    wake: Arc<Notify>,
    key_source: Option<KeySource>,
}

/// What a reload can change while the daemon runs, and the config it runs by.
struct Live {
    config: Config,
    accounts: Vec<LiveAccount>,
    router: Router,
    redeliver: Arc<Notify>,
    store: Store,
}

/// What a reload did: the settings applied, and those that need a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Settings now in effect (`"poll.max-requests-per-second"`, `"api key"`, …).
    pub applied: Vec<String>,
    /// Settings that changed in the file but only take effect at the next start.
    pub need_restart: Vec<String>,
}

impl Daemon {
    /// Starts everything and returns when the daemon is ready to serve. Fails, with a message
    /// that says what and where, if the store or socket cannot be set up.
    pub async fn start(
        config: Config,
        key: ApiKey,
        passed: Option<PassedSocket>,
    ) -> anyhow::Result<Daemon> {
        Daemon::start_supervised(config, key, passed, Supervision::default()).await
    }

    /// [`Daemon::start`] under a service manager: the scheduler keeps `supervision`'s
    /// `STATUS=` line current and pings its watchdog; [`Daemon::shutdown`] sends `STOPPING=1`.
    /// `READY=1` is the caller's to send, once this returns.
    pub async fn start_supervised(
        config: Config,
        key: ApiKey,
        passed: Option<PassedSocket>,
        supervision: Supervision,
    ) -> anyhow::Result<Daemon> {
        Daemon::start_clocked(config, key, passed, supervision, Clock::system()).await
    }

    /// [`Daemon::start_supervised`] with the job loops reading the wall clock from `clock`
    /// (tests step it; waiting is on the monotonic clock either way).
    pub async fn start_clocked(
        config: Config,
        key: ApiKey,
        passed: Option<PassedSocket>,
        supervision: Supervision,
        clock: Clock,
    ) -> anyhow::Result<Daemon> {
        let options = StartOptions { clock, env: None };
        Daemon::start_with(config, key, passed, supervision, options).await
    }

    /// [`Daemon::start_supervised`] with every option.
    pub async fn start_with(
        config: Config,
        key: ApiKey,
        passed: Option<PassedSocket>,
        supervision: Supervision,
        options: StartOptions,
    ) -> anyhow::Result<Daemon> {
        let started_at = options.clock.now_ms();
        let store = match &config.store.postgres {
            Some(options) => {
                // The control socket names this daemon among the queue's members: stable
                // across its restarts, and no two daemons on a host share one.
                let mut options = options.clone();
                options.member = Some(config.control.socket.display().to_string());
                Store::open_postgres(&options).await?
            }
            None => {
                let store_path = config.store.path.clone();
                tokio::task::spawn_blocking(move || Store::open(&store_path))
                    .await
                    .context("the store thread panicked while opening")??
            }
        };
        let started = Daemon::start_on(
            config,
            key,
            passed,
            supervision,
            store.clone(),
            started_at,
            options,
        )
        .await;
        if started.is_err() {
            // A failed start holds nothing: left to itself the store thread would release the
            // queue's lock only once it noticed the dropped handle, and a start retried at once
            // in this process could find its own queue "in use by another sunopoll daemon".
            store.close().await;
        }
        started
    }

    /// The rest of [`Daemon::start_supervised`], once the store is open.
    async fn start_on(
        config: Config,
        key: ApiKey,
        passed: Option<PassedSocket>,
        supervision: Supervision,
        store: Store,
        started_at: i64,
        options: StartOptions,
    ) -> anyhow::Result<Daemon> {
        let StartOptions { clock, env } = options;
        // Each account's client, with its own key. Built from the config alone (and the
        // bundled roots when the system has none), so a failure here repeats on every start.
        let accounts = config.accounts();
        let mut clients = Vec::with_capacity(accounts.len());
        for (i, account) in accounts.iter().enumerate() {
            let source = env.as_ref().map(|env| KeySource::of(account, env));
            let key = match (&source, i) {
                (Some(source), 1..) => source.read().map_err(Unrecoverable)?,
                _ => key.clone(),
            };
            let api = ApiClient::new(&account.base_url, key, config.api.request_timeout).map_err(
                |e| {
                    Unrecoverable(format!(
                        "building the HTTP client of account {:?}: {e:#}",
                        account.name
                    ))
                },
            )?;
            clients.push((api, source));
        }

        let (listener, socket) = match passed {
            Some(p) => {
                p.listener
                    .set_nonblocking(true)
                    .context("preparing the passed control socket")?;
                let l = tokio::net::UnixListener::from_std(p.listener)
                    .context("using the passed control socket")?;
                info!(socket = %p.path.display(), "using the control socket passed by systemd");
                if config.control.socket_configured && config.control.socket != p.path {
                    warn!(
                        socket = %p.path.display(),
                        configured = %config.control.socket.display(),
                        "control.socket in the config differs from the socket systemd passed; \
                         clients that read the config will look in the wrong place"
                    );
                }
                (l, ControlSocket::passed(p.path))
            }
            None => {
                let bound = control::bind(
                    &config.control.socket,
                    config.control.mode,
                    config.control.group.as_deref(),
                )
                .map_err(|e| match e {
                    control::BindError::Taken(m) => anyhow::Error::new(Unrecoverable(m)),
                    control::BindError::Failed(m) => anyhow::Error::msg(m),
                })?;
                info!(
                    socket = %bound.1.path.display(),
                    mode = %format!("{:04o}", config.control.mode),
                    "created control socket"
                );
                bound
            }
        };

        // Bound first, counted after: clients can connect from here on (they wait for their
        // answer rather than finding no socket), and what is read here are kept figures, not
        // counts over the queue, so start-up costs the same at any queue size.
        let (last_seq, resumed) = match tokio::join!(store.last_seq(), store.active_count()) {
            (Ok(seq), Ok(active)) => (seq, active),
            (Err(e), _) | (_, Err(e)) => {
                socket.remove();
                return Err(anyhow::Error::new(e).context("reading the queue"));
            }
        };

        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (events_tx, events_rx) = watch::channel(last_seq);

        let metrics = Arc::new(Metrics::new());
        {
            let m = Arc::clone(&metrics);
            store
                .health()
                .observe_commits(Box::new(move |took, jobs, ok| {
                    m.store_commit(took, jobs, ok)
                }));
        }
        metrics.proxy_series(&accounts.iter().map(|a| a.name.clone()).collect::<Vec<_>>());
        let router = Router::new(config.forward.clone());
        let redeliver = Arc::new(Notify::new());
        let forwarder = Forwarder {
            store: store.clone(),
            router: router.clone(),
            events: events_rx.clone(),
            wake: redeliver.clone(),
            metrics: Arc::clone(&metrics),
            clock: clock.clone(),
        };
        // One poll loop per account. Only the first reports to systemd: one STATUS= line,
        // one watchdog (a wedged first loop stops the pings; the loops share every part a
        // wedge could come from: the store, the runtime).
        let mut schedulers = Vec::with_capacity(accounts.len());
        let mut live_accounts = Vec::with_capacity(accounts.len());
        let mut handles = Vec::with_capacity(accounts.len());
        let mut proxy_accounts = Vec::with_capacity(accounts.len());
        for (i, (account, (api, key_source))) in accounts.iter().zip(clients).enumerate() {
            // The account's request budget, for its polls and (with [proxy]) its submissions;
            // the poll loop sets the rate it learns.
            let limiter = SharedLimiter::new(account.max_requests_per_second);
            let (rate_tx, rate_rx) = watch::channel(account.max_requests_per_second);
            let wake = Arc::new(Notify::new());
            let status: SharedStatus = Arc::new(Mutex::new(PollStatus::default()));
            let mut policy = config.poll.clone();
            policy.max_in_flight = account.max_in_flight;
            policy.max_requests_per_second = account.max_requests_per_second;
            schedulers.push(Scheduler {
                store: store.clone(),
                api: api.clone(),
                account: account.name.clone(),
                flavor: account.flavor,
                policy,
                wake: wake.clone(),
                events: events_tx.clone(),
                status: status.clone(),
                router: router.clone(),
                notifier: if i == 0 {
                    supervision.notifier.clone()
                } else {
                    Notifier::default()
                },
                watchdog: if i == 0 { supervision.watchdog } else { None },
                metrics: Arc::clone(&metrics),
                clock: clock.clone(),
                rate: rate_rx,
                key_source: key_source.clone(),
                archive: config.archive.enabled(),
                limiter: limiter.clone(),
            });
            proxy_accounts.push(crate::proxy::ProxyAccount {
                name: account.name.clone(),
                flavor: account.flavor,
                base_url: account.base_url.clone(),
                api: api.clone(),
                limiter,
                status: status.clone(),
            });
            handles.push(AccountHandle {
                name: account.name.clone(),
                wake: wake.clone(),
                status,
            });
            live_accounts.push(LiveAccount {
                config: account.clone(),
                api,
                rate: rate_tx,
                wake,
                key_source,
            });
        }
        let archive_status: SharedArchiveStatus = Arc::new(Mutex::new(ArchiveStatus::default()));
        let archive_wake = Arc::new(Notify::new());
        if let Some(notes) = store.notes() {
            // On a shared queue, what the other daemons commit wakes the loops here too.
            tracker.spawn(hear_other_daemons(
                notes,
                store.clone(),
                events_tx.clone(),
                handles
                    .iter()
                    .map(|h: &AccountHandle| (h.name.clone(), h.wake.clone()))
                    .collect(),
                vec![redeliver.clone(), archive_wake.clone()],
                cancel.clone(),
            ));
        }
        // Built now so that a bucket that cannot be set up (unreadable keys) stops the start.
        let archive_http = crate::jobs::archive::http_client(config.archive.allow_hosts.clone())
            .map_err(|e| Unrecoverable(format!("building the archive's HTTP client: {e}")))?;
        let archive_sink = match config.archive.enabled() {
            false => None,
            true => Some(Arc::new(
                Sink::from_config(&config.archive, archive_http.clone()).map_err(Unrecoverable)?,
            )),
        };
        let mut metrics_addr = None;
        if let Some(wanted) = config.metrics.listen {
            let listener = tokio::net::TcpListener::bind(wanted)
                .await
                .with_context(|| {
                    format!("binding the metrics endpoint (metrics.listen = {wanted})")
                })?;
            // Port 0 picks a free port: log the one it got.
            let addr = listener.local_addr().unwrap_or(wanted);
            metrics_addr = Some(addr);
            if crate::http::guard::is_loopback(&addr) {
                info!(listen = %addr, "serving metrics at http://{addr}/metrics");
            } else {
                warn!(listen = %addr, "serving metrics at http://{addr}/metrics on an address other machines may reach (metrics.listen)");
            }
            let accounts = handles
                .iter()
                .zip(&live_accounts)
                .map(|(h, l)| (h.status.clone(), l.rate.subscribe()))
                .collect();
            let source = gauge_source(store.clone(), accounts, &config);
            tracker.spawn(crate::metrics::serve(
                listener,
                Arc::clone(&metrics),
                source,
                cancel.clone(),
                tracker.clone(),
            ));
        }
        // Bound before the control server is built, so that `status` can say where it is.
        let mut proxy = None;
        if let Some(wanted) = config.proxy.listen {
            let listener = tokio::net::TcpListener::bind(wanted)
                .await
                .with_context(|| format!("binding the API stand-in (proxy.listen = {wanted})"))?;
            let addr = listener.local_addr().unwrap_or(wanted);
            let counts = Arc::new(crate::proxy::Counts::default());
            proxy = Some((listener, addr, counts));
        }
        for scheduler in schedulers {
            let loaded = scheduler.load_gate().await;
            tracker.spawn(scheduler.run(loaded, cancel.clone(), tracker.clone()));
        }
        tracker.spawn(forwarder.run(cancel.clone(), tracker.clone()));
        if let Some(sink) = &archive_sink {
            let archiver = Archiver {
                store: store.clone(),
                config: config.archive.clone(),
                sink: Arc::clone(sink),
                http: archive_http.clone(),
                events: events_rx.clone(),
                published: events_tx.clone(),
                router: router.clone(),
                wake: archive_wake.clone(),
                metrics: Arc::clone(&metrics),
                status: archive_status.clone(),
                clock: clock.clone(),
            };
            tracker.spawn(archiver.run(cancel.clone(), tracker.clone()));
        }

        let ctx = Arc::new(Control {
            store: store.clone(),
            accounts: handles,
            events: events_rx,
            policy: config.poll.clone(),
            info: DaemonInfo {
                config: config.source.clone(),
                store: store.shown(),
                socket: socket.path.clone(),
                started_at,
            },
            idle_timeout: config.control.idle_timeout,
            router: router.clone(),
            redeliver: redeliver.clone(),
            archive: archive_sink.clone().map(|sink| ArchiveControl {
                sink,
                status: archive_status.clone(),
                wake: archive_wake.clone(),
            }),
            proxy: proxy.as_ref().map(|(_, addr, counts)| {
                let (addr, counts) = (*addr, Arc::clone(counts));
                Arc::new(move || counts.view(addr)) as control::ProxyStatusSource
            }),
        });
        if let Some((listener, addr, counts)) = proxy {
            let stand_in = crate::proxy::Proxy::new(
                &config.proxy,
                proxy_accounts,
                Arc::clone(&ctx),
                Arc::clone(&metrics),
                counts,
                tracker.clone(),
            )
            .map_err(|e| {
                Unrecoverable(format!("building the API stand-in's HTTP client: {e:#}"))
            })?;
            if crate::http::guard::is_loopback(&addr) {
                info!(listen = %addr, "{}", crate::proxy::started_line(addr, &config.proxy));
            } else {
                warn!(listen = %addr, "{} — on an address other machines may reach (proxy.allow-remote)", crate::proxy::started_line(addr, &config.proxy));
            }
            tracker.spawn(crate::proxy::serve(
                Arc::new(stand_in),
                listener,
                cancel.clone(),
                tracker.clone(),
            ));
        }
        tracker.spawn(control::serve(
            listener,
            ctx,
            cancel.clone(),
            tracker.clone(),
        ));
        tracker.spawn(crate::housekeeping::run(
            store.clone(),
            config.housekeeping.prune_schedule.clone(),
            config.housekeeping.retention,
            cancel.clone(),
        ));

        info!(
            version = crate::VERSION,
            config = %config.source.as_ref().map_or_else(|| "built-in defaults".to_owned(), |p| p.display().to_string()),
            store = %store.shown(),
            socket = %socket.path.display(),
            api = %accounts.iter().map(|a| if accounts.len() == 1 {
                a.base_url.to_string()
            } else {
                format!("{} {} ({})", a.name, a.base_url, a.flavor.as_str())
            }).collect::<Vec<_>>().join(", "),
            interval = %format_duration(config.poll.interval),
            watchdog = %supervision.watchdog.map_or_else(
                || "off".to_owned(),
                |p| format!("ping every {}", format_duration(p))
            ),
            resumed,
            forward_targets = config.forward.targets.len(),
            "sunopoll started; {} unfinished task{} resumed",
            resumed,
            if resumed == 1 { "" } else { "s" }
        );
        // A submission in flight through the stand-in is waited for like a poll.
        let longest = match config.proxy.listen {
            Some(_) => config
                .api
                .request_timeout
                .max(config.proxy.upstream_timeout),
            None => config.api.request_timeout,
        };
        let drain = (longest + Duration::from_secs(2)).min(MAX_DRAIN);
        Ok(Daemon {
            cancel,
            tracker,
            socket,
            store: store.clone(),
            drain,
            notifier: supervision.notifier,
            metrics_addr,
            live: Live {
                config,
                accounts: live_accounts,
                router,
                redeliver,
                store,
            },
        })
    }

    /// Applies what can change safely while running from `new` (already validated by the same
    /// loader as at start): the API key (read again from the key source given at start), the
    /// request rate, `[forward]` (targets, their secrets and headers, the retry schedule) and
    /// the log level. Everything else keeps its old value until a restart, and is reported so.
    /// Fails, changing nothing, when the key cannot be read.
    pub fn reload(&mut self, new: Config) -> Result<Reloaded, String> {
        let live = &mut self.live;
        let old = &live.config;
        let mut r = Reloaded::default();
        // Every key is read before any is set: a reload that fails changes nothing.
        let keys = live
            .accounts
            .iter()
            .map(|a| a.key_source.as_ref().map(KeySource::read).transpose())
            .collect::<Result<Vec<_>, String>>()?;
        let single = live.accounts.len() == 1;
        let new_accounts = new.accounts();
        let same_accounts = new_accounts.len() == live.accounts.len()
            && new_accounts.iter().zip(&live.accounts).all(|(n, l)| {
                n.name == l.config.name
                    && n.base_url == l.config.base_url
                    && n.flavor == l.config.flavor
                    && n.key_file == l.config.key_file
                    && n.max_in_flight == l.config.max_in_flight
            });
        for (account, key) in live.accounts.iter().zip(keys) {
            if let Some(key) = key
                && account.api.set_key(key)
            {
                r.applied.push(if single {
                    "api key".to_owned()
                } else {
                    format!("api key of account {:?}", account.config.name)
                });
            }
        }
        if same_accounts {
            for (account, new) in live.accounts.iter_mut().zip(&new_accounts) {
                if new.max_requests_per_second != account.config.max_requests_per_second {
                    account.rate.send_replace(new.max_requests_per_second);
                    account.wake.notify_one();
                    account.config.max_requests_per_second = new.max_requests_per_second;
                    r.applied.push(if single {
                        "poll.max-requests-per-second".to_owned()
                    } else {
                        format!("max-requests-per-second of account {:?}", new.name)
                    });
                }
            }
        } else {
            r.need_restart.push("api.account".to_owned());
        }
        if format!("{:?}", new.forward) != format!("{:?}", old.forward) {
            live.router.replace(new.forward.clone());
            // A target removed now has its pending deliveries given up as at a start (they
            // are never sent to a URL the config no longer names; `redeliver --target` brings
            // them back), and on a shared queue this daemon's targets are registered anew.
            let known = live.router.target_specs();
            let store = live.store.clone();
            tokio::spawn(async move {
                match store.fail_orphans(known, crate::clock::now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => warn!(
                        deliveries = n,
                        "gave up pending deliveries to targets no longer in the configuration (replay them with `sunopoll redeliver --target NAME` if the target comes back)"
                    ),
                    Err(e) => error!(error = %e, "cannot check for deliveries to removed targets"),
                }
            });
            live.redeliver.notify_one();
            r.applied.push("forward".to_owned());
        }
        if new.log.level != old.log.level {
            match crate::logging::set_level(&new.log.level) {
                Ok(()) => r.applied.push("log.level".to_owned()),
                Err(e) => {
                    warn!(error = %e, "cannot change the log level while running");
                    r.need_restart.push("log.level".to_owned());
                }
            }
        }
        let restart_only = [
            (
                "api.base-url",
                differs(&new.api.base_url, &old.api.base_url),
            ),
            (
                "api.request-timeout",
                differs(&new.api.request_timeout, &old.api.request_timeout),
            ),
            (
                "api.key-file",
                differs(&new.api.key_file, &old.api.key_file),
            ),
            (
                "poll.interval",
                differs(&new.poll.interval, &old.poll.interval),
            ),
            (
                "poll.max-in-flight",
                differs(&new.poll.max_in_flight, &old.poll.max_in_flight),
            ),
            (
                "poll.backoff-max",
                differs(&new.poll.backoff_max, &old.poll.backoff_max),
            ),
            (
                "poll.task-deadline",
                differs(&new.poll.task_deadline, &old.poll.task_deadline),
            ),
            (
                "poll.fill-skipped-stages",
                differs(&new.poll.fill_skipped_stages, &old.poll.fill_skipped_stages),
            ),
            ("store", differs(&new.store, &old.store)),
            ("archive", differs(&new.archive, &old.archive)),
            ("proxy", differs(&new.proxy, &old.proxy)),
            ("control", differs(&new.control, &old.control)),
            ("log.format", differs(&new.log.format, &old.log.format)),
            (
                "housekeeping",
                differs(&new.housekeeping, &old.housekeeping),
            ),
        ];
        r.need_restart.extend(
            restart_only
                .into_iter()
                .filter(|(_, changed)| *changed)
                .map(|(name, _)| name.to_owned()),
        );
        // What was applied is now the running config; what needs a restart keeps its old
        // value, so a second reload reports it again.
        live.config.poll.max_requests_per_second = new.poll.max_requests_per_second;
        live.config.forward = new.forward;
        if r.applied.iter().any(|a| a == "log.level") {
            live.config.log.level = new.log.level;
        }
        Ok(r)
    }

    /// Where the metrics endpoint listens, if `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The control socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    /// A token that stops the daemon when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops accepting work, lets in-flight polls commit (at most the drain time), removes the
    /// socket file, and returns.
    pub async fn shutdown(self) {
        self.notifier
            .stopping("stopping: waiting for polls and deliveries in flight");
        info!(
            "shutting down: no new polls, deliveries or connections; waiting for polls and deliveries in flight"
        );
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.drain, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                drain = %format_duration(self.drain),
                "some work did not finish within the drain time; unfinished polls and deliveries are repeated at the next start"
            );
        }
        self.socket.remove();
        self.store.close().await;
        info!("stopped");
    }
}

/// What a metrics scrape reads: the store's kept counts and bounded look-ups, and the poll
/// job's published state. A store that does not answer leaves those gauges out of the scrape
/// (the store's own error counter says why) rather than reporting zeros that are not true.
fn gauge_source(
    store: Store,
    accounts: Vec<(SharedStatus, watch::Receiver<Option<f64>>)>,
    config: &Config,
) -> GaugeSource {
    let backoff_max = config.poll.backoff_max;
    let mut configured: Vec<String> = config
        .forward
        .targets
        .iter()
        .map(|t| t.name.clone())
        .collect();
    configured.sort();
    Arc::new(move || {
        let store = store.clone();
        let configured = configured.clone();
        // The rate as reloaded (SIGHUP), not as started; and as learnt, if lower.
        let accounts: Vec<(PollStatus, f64)> = accounts
            .iter()
            .map(|(status, rate)| {
                let poll = status.lock().map(|s| s.clone()).unwrap_or_default();
                let ceiling = *rate.borrow();
                let held_to = match (poll.learnt_rate, ceiling) {
                    (Some(l), Some(c)) => l.min(c),
                    (_, c) => c.unwrap_or(0.0),
                };
                (poll, held_to)
            })
            .collect();
        Box::pin(async move {
            let now = now_ms();
            let mut g = Gauges::default();
            if let Ok(counts) = store.task_breakdown().await {
                // Per (state, kind), summed over accounts; every state of music always, so
                // a fresh daemon's scrape has the series an alert expects.
                let mut by: std::collections::BTreeMap<(String, String), u64> = Default::default();
                for state in ["active", "done", "failed", "removed"] {
                    by.insert((state.to_owned(), "music".to_owned()), 0);
                }
                for c in counts {
                    *by.entry((c.state.as_str().to_owned(), c.kind.as_str().to_owned()))
                        .or_default() += c.n.max(0).unsigned_abs();
                }
                g.tasks = by.into_iter().map(|((s, k), n)| (s, k, n)).collect();
            }
            if let Ok(q) = store.gauges(now).await {
                g.polls_due = q.polls_due;
                g.oldest_overdue = q
                    .earliest_due_at
                    .filter(|at| *at <= now)
                    .map_or(Duration::ZERO, |at| {
                        Duration::from_millis((now - at).unsigned_abs())
                    });
            }
            {
                let mut names: Vec<String> = configured.clone();
                if let Ok(summary) = store.target_summary().await {
                    for t in summary {
                        if !names.contains(&t.target) {
                            names.push(t.target.clone());
                        }
                        g.targets.push(TargetGauges {
                            oldest_pending: t.oldest_pending_at.map_or(Duration::ZERO, |at| {
                                Duration::from_millis((now - at).max(0).unsigned_abs())
                            }),
                            target: t.target,
                            pending: t.pending.max(0).unsigned_abs(),
                            failed: t.failed.max(0).unsigned_abs(),
                        });
                    }
                    for name in names {
                        if !g.targets.iter().any(|t| t.target == name) {
                            g.targets.push(TargetGauges {
                                target: name,
                                ..TargetGauges::default()
                            });
                        }
                    }
                }
            }
            for (poll, rate_limit) in accounts {
                let pause = poll.pause_kind.map(|kind| {
                    let until = poll
                        .paused_until
                        .as_deref()
                        .and_then(parse_utc)
                        .unwrap_or(now);
                    (
                        kind.as_str(),
                        Duration::from_millis((until - now).max(0).unsigned_abs()),
                    )
                });
                g.accounts.push(AccountGauges {
                    account: poll.account.clone(),
                    rate_limit,
                    // From the pause's start, not the figure published with it: the poll job
                    // sleeps through a pause, and a scrape must see it grow.
                    paused_for: match (&pause, poll.paused_since.as_deref().and_then(parse_utc)) {
                        (Some(_), Some(since)) => {
                            Duration::from_millis((now - since).max(0).unsigned_abs())
                        }
                        _ => Duration::ZERO,
                    },
                    pause,
                    backoff_max,
                });
            }
            g
        })
    })
}

/// Whether a setting changed, by its debug form (config types carry no `PartialEq`; secrets
/// print redacted, which is fine for "changed or not" outside `[forward]`).
fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// Passes on what the daemons sharing a PostgreSQL queue commit: events wake the followers and
/// the forwarder (through `events`), an add wakes that account's poll loop, replays and redone
/// files wake the forwarder and the archive (`others`). After missed news, everything wakes.
async fn hear_other_daemons(
    mut notes: tokio::sync::broadcast::Receiver<crate::store::Note>,
    store: Store,
    events: watch::Sender<i64>,
    accounts: Vec<(String, Arc<Notify>)>,
    others: Vec<Arc<Notify>>,
    cancel: CancellationToken,
) {
    use crate::store::Note;
    use tokio::sync::broadcast::error::RecvError;
    let raise = |seq: i64| {
        events.send_if_modified(|latest| {
            let newer = seq > *latest;
            if newer {
                *latest = seq;
            }
            newer
        });
    };
    loop {
        let note = tokio::select! {
            () = cancel.cancelled() => return,
            n = notes.recv() => n,
        };
        match note {
            Ok(Note::Events(seq)) => raise(seq),
            Ok(Note::Tasks(account)) => accounts
                .iter()
                .filter(|(name, _)| *name == account)
                .for_each(|(_, wake)| wake.notify_one()),
            Ok(Note::Deliveries | Note::Files) => others.iter().for_each(|w| w.notify_one()),
            Ok(Note::Resync) | Err(RecvError::Lagged(_)) => {
                accounts.iter().for_each(|(_, wake)| wake.notify_one());
                others.iter().for_each(|w| w.notify_one());
                if let Ok(seq) = store.last_seq().await {
                    raise(seq);
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}
