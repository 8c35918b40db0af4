//! The archive job: fetching every file a finished task left behind, before the API deletes it.
//!
//! Files are rows in the store (`archive_files`), written with the task's `complete` event. On
//! the durable job loop ([`crate::jobs::run`]) this kind supplies the query (due files, the
//! oldest task first: closest to deletion), its own limits (`max-in-flight`, a shared byte-rate
//! cap, a per-file size cap, and the `min-free` floor below which it starts nothing and `status`
//! says why) and the pure [`after_try`]. A try downloads one file through
//! [`crate::archive::download`]; it never waits on a poll or a delivery, nor they on it.
//!
//! After a failed try the file waits on the backoff curve from `retry-interval` up to an hour.
//! A 403/404/410 before the file's expiry (the task's end plus `expire-after`, 14 days by
//! default) means "not there yet" and is retried; after it, the file is `expired`, logged at
//! error and kept in `show`. Once every file of a task is kept, its `manifest.json` is written.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::{Admit, JobKind, StoreBackoffPolicy, Stored, WakeAt, backoff_delay};
use crate::archive::assets::sanitize;
use crate::archive::download::{
    Bandwidth, FetchError, Fetched, Limits, already_kept, fetch, write_inline,
};
use crate::archive::sink::Sink;
use crate::archive::{hosts, manifest, notice};
use crate::clock::{Clock, format_duration, ms};
use crate::config::{ARCHIVE_RETRY_MAX, ArchiveConfig};
use crate::forward::Router;
use crate::metrics::Metrics;
use crate::store::{
    ArchivedNotice, Claim, DueFile, FileNext, FileState, Notice, Store, StoreError,
};

/// Tries of one file that fail for other reasons than "not there" before it is given up:
/// with the backoff capped at an hour, more than a day of trying.
pub const MAX_TRIES: u32 = 40;

/// How often free space is checked again while the archive is paused for it.
pub const FREE_SPACE_RECHECK: Duration = Duration::from_secs(2);

/// What `status` shows of the archive.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveStatus {
    /// `fetching`, or `paused` (then `paused_cause` says why).
    pub state: String,
    /// Why downloads are paused, if they are.
    pub paused_cause: Option<String>,
    /// Files being fetched now.
    pub in_flight: usize,
    /// The archive directory.
    pub dir: String,
}

/// The archive status, shared with the control server.
pub type SharedArchiveStatus = Arc<Mutex<ArchiveStatus>>;

/// What one try at file `attempt` (1 for the first) of a task that ended at `created_at` leads
/// to, at `now`. Pure: `jitter` in `[0, 1)` spreads the retry.
pub fn after_try(
    attempt: u32,
    result: &Result<Fetched, FetchError>,
    created_at: i64,
    now: i64,
    config: &ArchiveConfig,
    jitter: f64,
) -> FileNext {
    let retry = |error: String| {
        let delay = backoff_delay(
            attempt,
            config.retry_interval,
            ARCHIVE_RETRY_MAX.max(config.retry_interval),
            jitter,
        );
        FileNext::Retry {
            at: now.saturating_add(ms(delay)),
            error,
        }
    };
    match result {
        Ok(f) => FileNext::Done {
            size: f.size,
            sha256: f.sha256.clone(),
        },
        Err(e @ FetchError::Missing(_)) => {
            if now >= created_at.saturating_add(ms(config.expire_after)) {
                FileNext::Expired {
                    error: format!(
                        "{e}, after the API's retention ({} since the task ended)",
                        format_duration(config.expire_after)
                    ),
                }
            } else {
                retry(format!("{e} (not ready yet)"))
            }
        }
        Err(e @ FetchError::TooBig { .. }) => FileNext::Failed {
            error: e.to_string(),
        },
        Err(e) if attempt >= MAX_TRIES => FileNext::Failed {
            error: format!("{e} (after {attempt} tries)"),
        },
        Err(e) => retry(e.to_string()),
    }
}

/// The directory of one task's files.
pub fn task_dir(dir: &Path, task_id: &str) -> PathBuf {
    dir.join(sanitize(task_id))
}

/// Redirects followed per download: CDNs use one or two.
pub const MAX_REDIRECTS: usize = 5;

/// The HTTP client of the archive (downloads and the bucket): the bundled roots, the ring
/// provider, a connect timeout, and redirects followed only to hosts the archive may fetch
/// from (`allow`), so a redirect cannot lead it to a loopback or private address either.
pub fn http_client(allow: Vec<String>) -> reqwest::Result<reqwest::Client> {
    crate::tls::install_crypto_provider();
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        match hosts::check(attempt.url().as_str(), &allow) {
            Ok(_) => attempt.follow(),
            Err(e) => attempt.error(format!("redirected to a refused host: {e}")),
        }
    });
    crate::api::with_tls_roots(reqwest::Client::builder())
        .user_agent(crate::USER_AGENT)
        .connect_timeout(Duration::from_secs(15))
        .redirect(policy)
        .build()
}

/// Free bytes for unprivileged users on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Everything the archive job needs: the entry point the daemon starts.
pub struct Archiver {
    /// The queue of files.
    pub store: Store,
    /// `[archive]`, on.
    pub config: ArchiveConfig,
    /// Where files are kept.
    pub sink: Arc<Sink>,
    /// The HTTP client downloads use (see [`http_client`]).
    pub http: reqwest::Client,
    /// The newest event sequence number: a change means a task may have completed.
    pub events: watch::Receiver<i64>,
    /// Where a stored `archived` notification is announced (to the forwarder and followers).
    pub published: watch::Sender<i64>,
    /// Which targets take the `archived` notification.
    pub router: Router,
    /// Poked by `archive redo`.
    pub wake: Arc<Notify>,
    /// Where tries are counted.
    pub metrics: Arc<Metrics>,
    /// Shown by `status`.
    pub status: SharedArchiveStatus,
    /// The wall clock stored times are read from.
    pub clock: Clock,
}

impl Archiver {
    /// Runs until `cancel` fires; tries already started finish and are recorded.
    pub async fn run(self, cancel: CancellationToken, tracker: TaskTracker) {
        let dir = self.sink.local_root().to_owned();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            error!(dir = %dir.display(), error = %e, "cannot create the archive directory; files are not archived until it can be created");
        }
        let http = self.http.clone();
        if let Ok(mut s) = self.status.lock() {
            s.state = "fetching".to_owned();
            s.dir = self.config.destination().unwrap_or_default();
        }
        let job = ArchiveJob {
            bandwidth: Arc::new(Bandwidth::new(self.config.max_bytes_per_second)),
            a: self,
            dir,
            http,
            paused: None,
            events_open: true,
        };
        super::run(job, cancel, tracker).await;
    }
}

/// The archive job on the loop.
struct ArchiveJob {
    a: Archiver,
    dir: PathBuf,
    http: reqwest::Client,
    bandwidth: Arc<Bandwidth>,
    /// Why downloads are paused (free space), if they are.
    paused: Option<String>,
    events_open: bool,
}

impl ArchiveJob {
    fn set_paused(&mut self, cause: Option<String>, in_flight: usize) {
        match (&self.paused, &cause) {
            (None, Some(c)) => warn!(cause = %c, "archive downloads paused"),
            (Some(_), None) => info!("enough free space again; archive downloads resume"),
            _ => {}
        }
        if let Ok(mut s) = self.a.status.lock() {
            s.state = if cause.is_some() {
                "paused"
            } else {
                "fetching"
            }
            .to_owned();
            s.paused_cause = cause.clone();
            s.in_flight = in_flight;
        }
        self.paused = cause;
    }
}

impl JobKind for ArchiveJob {
    type Row = DueFile;
    type Key = i64;
    type Done = Stored;

    const QUEUE: &'static str = "the archive queue";
    const STOPPED: &'static str = "archive stopped starting downloads";

    fn key(row: &DueFile) -> i64 {
        row.id
    }

    fn due_at(row: &DueFile) -> i64 {
        row.next_try_at
    }

    fn max_in_flight(&self) -> usize {
        self.a.config.max_in_flight
    }

    fn store_backoff(&self) -> StoreBackoffPolicy {
        StoreBackoffPolicy {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            paused: "cannot record archive downloads; pausing the archive so files are not fetched twice",
            resumed: "the store records archive downloads again; the archive resumes",
        }
    }

    async fn prepare(&mut self, in_flight: usize, wake: &mut WakeAt) -> usize {
        let min_free = self.a.config.min_free;
        let cause = match free_bytes(&self.dir) {
            Ok(free) if free < min_free => Some(format!(
                "only {free} bytes free on {}, below min-free ({min_free} bytes)",
                self.dir.display()
            )),
            Ok(_) => None,
            Err(e) => Some(format!(
                "cannot read the free space of {}: {e}",
                self.dir.display()
            )),
        };
        let paused = cause.is_some();
        self.set_paused(cause, in_flight);
        if paused {
            wake.at(Instant::now() + FREE_SPACE_RECHECK);
            return 0;
        }
        self.a.config.max_in_flight.saturating_sub(in_flight)
    }

    async fn claim(
        &self,
        slots: usize,
        in_flight: &HashSet<i64>,
    ) -> Result<Claim<DueFile>, StoreError> {
        let busy: Vec<i64> = in_flight.iter().copied().collect();
        self.a
            .store
            .due_files(busy, self.a.clock.now_ms(), slots)
            .await
    }

    fn admit(&mut self, _row: &DueFile) -> Admit {
        Admit::Go
    }

    fn start(&mut self, row: DueFile) -> impl Future<Output = Stored> + Send + 'static {
        let t = Try {
            store: self.a.store.clone(),
            config: self.a.config.clone(),
            sink: Arc::clone(&self.a.sink),
            http: self.http.clone(),
            bandwidth: Arc::clone(&self.bandwidth),
            metrics: Arc::clone(&self.a.metrics),
            clock: self.a.clock.clone(),
            router: self.a.router.clone(),
            published: self.a.published.clone(),
        };
        async move { t.run(row).await }
    }

    async fn finish(&mut self, _id: i64, stored: Stored) -> Stored {
        stored
    }

    async fn woken(&mut self) {
        super::event_or_wake(&mut self.a.events, &mut self.events_open, &self.a.wake).await;
    }

    fn clock(&self) -> &Clock {
        &self.a.clock
    }

    /// Retries are scheduled at most an hour (or `retry-interval`) ahead; a file due later was
    /// scheduled before the clock went back, and is tried now.
    fn max_ahead(&self) -> Option<Duration> {
        Some(ARCHIVE_RETRY_MAX.max(self.a.config.retry_interval))
    }

    async fn clock_stepped(&mut self, _by_ms: i64) {
        // Nothing to move: `max_ahead` takes in retries scheduled before a backward step, and
        // after a forward one they are all due, which the limits pace.
    }
}

/// One try at one file, with its own copies of what it needs.
struct Try {
    store: Store,
    config: ArchiveConfig,
    sink: Arc<Sink>,
    http: reqwest::Client,
    bandwidth: Arc<Bandwidth>,
    metrics: Arc<Metrics>,
    clock: Clock,
    router: Router,
    published: watch::Sender<i64>,
}

impl Try {
    /// Fetches (or writes) the file, records what came of it, and writes the task's manifest
    /// when it was the last one. False if the outcome could not be recorded.
    async fn run(self, row: DueFile) -> Stored {
        let dest = self.sink.local(&row.task_id, &row.name);
        let attempt = row.attempts.saturating_add(1);
        let work = async {
            match self.fetch(&row, &dest).await {
                // Kept locally: now where it belongs (a bucket's upload; nothing for a directory).
                Ok(Ok(f)) => match self.sink.commit(&row.task_id, &row.name, &dest).await {
                    Ok(()) => Ok(Ok(f)),
                    Err(e) => Ok(Err(FetchError::Io(format!("upload: {e}")))),
                },
                other => other,
            }
        };
        let Some(result) = self.holding_lease(&row, work).await else {
            return Stored::Untouched;
        };
        let now = self.clock.now_ms();
        let next = match &result {
            Err(Refusal(why)) => FileNext::Failed { error: why.clone() },
            Ok(r) => after_try(
                attempt,
                r,
                row.created_at,
                now,
                &self.config,
                fastrand::f64(),
            ),
        };
        let (result_name, bytes) = match &next {
            FileNext::Done { size, .. } => ("done", *size),
            FileNext::Retry { .. } => ("retry", 0),
            FileNext::Failed { .. } => ("failed", 0),
            FileNext::Expired { .. } => ("expired", 0),
        };
        let emitted = match self
            .store
            .record_file(row.id, next.clone(), now, Some(self.notice(&row.task_id)))
            .await
        {
            Ok(emitted) => emitted,
            Err(e) => {
                error!(task_id = %row.task_id, file = %row.name, error = %e, "cannot record an archive download; it will be checked again");
                return Stored::Failed;
            }
        };
        self.metrics.archive_try(result_name, bytes);
        match &next {
            FileNext::Done { size, sha256 } => {
                let resumed = match &result {
                    Ok(Ok(f)) => f.resumed_from,
                    _ => 0,
                };
                self.sink.committed(&dest).await;
                let location = self.sink.location(&row.task_id, &row.name);
                info!(task_id = %row.task_id, file = %row.name, size, sha256 = %sha256, resumed_from = resumed, path = %location, "archived");
                self.maybe_manifest(&row.task_id).await;
                if let Some(e) = emitted {
                    info!(task_id = %e.task_id, seq = e.seq, targets = %e.targets.join(","), "archived notification stored");
                    // Announced after the manifest is written, so the forwarder, woken by it,
                    // mostly finds the manifest the notification names already in place.
                    self.published
                        .send_modify(|latest| *latest = (*latest).max(e.seq));
                }
            }
            FileNext::Retry { at, error } => warn!(
                task_id = %row.task_id, file = %row.name, cause = %error, attempt,
                retry_in = %format_duration(Duration::from_millis((at - now).max(0).unsigned_abs())),
                "archive download failed; will retry"
            ),
            FileNext::Failed { error } => error!(
                task_id = %row.task_id, file = %row.name, cause = %error, attempts = attempt,
                "archive download given up"
            ),
            FileNext::Expired { error } => error!(
                task_id = %row.task_id, file = %row.name, cause = %error,
                "archive file expired: the API deleted it before it could be kept"
            ),
        }
        Stored::Written
    }

    /// Runs `work` (a try at `row`'s file) while renewing this daemon's lease on the file every
    /// third of a lease, on a queue several daemons share: a download may take far longer than
    /// a lease, and a lease that is kept only while its daemon works is what lets another take
    /// the file over within one lease when this one dies. `None` when the lease was lost (this
    /// daemon was stopped past it and another took the file over): the try is dropped, its
    /// part file left to resume from, and the other daemon's try decides.
    async fn holding_lease<T>(&self, row: &DueFile, work: impl Future<Output = T>) -> Option<T> {
        let Some(lease) = self.store.lease_ms() else {
            return Some(work.await);
        };
        let every = Duration::from_millis(u64::try_from(lease / 3).unwrap_or(1).max(1));
        tokio::pin!(work);
        let mut renew_at = Instant::now() + every;
        let mut failing = false;
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                () = tokio::time::sleep_until(renew_at) => {}
            }
            renew_at = Instant::now() + every;
            match self.store.renew_file(row.id).await {
                Ok(true) => failing = false,
                Ok(false) => {
                    warn!(task_id = %row.task_id, file = %row.name, "another daemon has taken this download over (this one was held up past its lease); leaving the file to it");
                    return None;
                }
                Err(e) if !failing => {
                    failing = true;
                    warn!(task_id = %row.task_id, file = %row.name, error = %e, "cannot renew the lease on this download; if it runs out, another daemon may fetch the file too");
                }
                Err(_) => {}
            }
        }
    }

    /// How the store builds the task's `archived` notification, if this try keeps its last
    /// file: the targets that take it by the task's kind, and the body with where each file is.
    fn notice(&self, task: &str) -> ArchivedNotice {
        let (task, sink, router) = (task.to_owned(), Arc::clone(&self.sink), self.router.clone());
        Box::new(move |kind, files| Notice {
            routes: router.archived_routes(kind),
            body: notice::body(&task, kind, files, |name| sink.location(&task, name)),
        })
    }

    /// The try itself: a file already in place is taken as kept (its rename was the last step
    /// of a try whose record did not commit), a result is written, a URL fetched.
    async fn fetch(
        &self,
        row: &DueFile,
        dest: &Path,
    ) -> Result<Result<Fetched, FetchError>, Refusal> {
        if let Some(kept) = already_kept(dest).await {
            debug!(task_id = %row.task_id, file = %row.name, "already in place; recording it");
            return Ok(Ok(kept));
        }
        if let Some(text) = &row.inline {
            return Ok(write_inline(dest, text).await);
        }
        let Some(url) = &row.url else {
            return Err(Refusal(
                "the file has neither a URL nor a content".to_owned(),
            ));
        };
        let url =
            hosts::check(url, &self.config.allow_hosts).map_err(|e| Refusal(e.to_string()))?;
        let limits = Limits {
            bandwidth: &self.bandwidth,
            max_file_size: self.config.max_file_size,
        };
        let (store, id) = (self.store.clone(), row.id);
        let save = |v: Option<String>| async move {
            store.save_validator(id, v).await.map_err(|e| e.to_string())
        };
        Ok(fetch(
            &self.http,
            &url,
            dest,
            row.validator.as_deref(),
            &limits,
            save,
        )
        .await)
    }

    /// Writes the task's manifest if every one of its files is kept.
    async fn maybe_manifest(&self, task: &str) {
        let files = match self.store.files_of(task.to_owned()).await {
            Ok(f) => f,
            Err(e) => {
                error!(task_id = %task, error = %e, "cannot read the task's archive files for its manifest");
                return;
            }
        };
        if files.iter().all(|f| f.state == FileState::Done) {
            match self
                .sink
                .manifest(task, &manifest::render(task, &files))
                .await
            {
                Ok(()) => {
                    info!(task_id = %task, files = files.len(), path = %self.sink.location(task, manifest::MANIFEST), "every file of the task is archived; manifest written")
                }
                Err(e) => {
                    error!(task_id = %task, error = %e, "cannot write the task's archive manifest")
                }
            }
        }
    }
}

/// A URL the archive will not fetch: given up at once.
struct Refusal(String);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ArchiveConfig {
        ArchiveConfig {
            retry_interval: Duration::from_secs(30),
            expire_after: Duration::from_secs(14 * 86_400),
            ..ArchiveConfig::default()
        }
    }

    fn done() -> Result<Fetched, FetchError> {
        Ok(Fetched {
            size: 5,
            sha256: "ab".into(),
            resumed_from: 0,
        })
    }

    #[test]
    fn a_missing_file_waits_until_its_expiry_then_expires() {
        let c = config();
        let day = 86_400_000;
        let missing = Err(FetchError::Missing(404));
        match after_try(1, &missing, 0, day, &c, 0.5) {
            FileNext::Retry { at, error } => {
                assert_eq!(at, day + 30_000);
                assert!(error.contains("not ready yet"), "{error}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(
                after_try(100, &missing, 0, 13 * day, &c, 0.5),
                FileNext::Retry { .. }
            ),
            "never given up before its expiry"
        );
        assert!(matches!(
            after_try(1, &missing, 0, 14 * day, &c, 0.5),
            FileNext::Expired { .. }
        ));
        assert!(matches!(
            after_try(1, &Err(FetchError::Missing(410)), 0, 15 * day, &c, 0.5),
            FileNext::Expired { .. }
        ));
    }

    #[test]
    fn other_failures_retry_on_the_curve_and_give_up_after_max_tries() {
        let c = config();
        let e = Err(FetchError::Status(503));
        let FileNext::Retry { at, .. } = after_try(3, &e, 0, 0, &c, 0.5) else {
            panic!()
        };
        assert_eq!(at, 120_000, "30 s doubled twice");
        let FileNext::Retry { at, .. } = after_try(30, &e, 0, 0, &c, 0.5) else {
            panic!()
        };
        assert_eq!(at, 3_600_000, "capped at an hour");
        assert!(matches!(
            after_try(MAX_TRIES, &e, 0, 0, &c, 0.5),
            FileNext::Failed { .. }
        ));
        assert!(matches!(
            after_try(1, &Err(FetchError::TooBig { limit: 1 }), 0, 0, &c, 0.5),
            FileNext::Failed { .. }
        ));
        assert_eq!(
            after_try(1, &done(), 0, 0, &c, 0.5),
            FileNext::Done {
                size: 5,
                sha256: "ab".into()
            }
        );
    }

    #[test]
    fn free_space_is_read_and_task_dirs_stay_inside() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).expect("statvfs") > 0);
        assert_eq!(task_dir(Path::new("/a"), "../x"), PathBuf::from("/a/__x"));
    }
}
