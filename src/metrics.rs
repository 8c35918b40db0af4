//! Prometheus metrics: what the daemon counts, and the endpoint that serves them.
//!
//! Counters and histograms are updated where things happen (a poll answered, an event stored, a
//! delivery attempted, a store commit). Gauges are read at scrape time from values the daemon
//! already keeps ([`Gauges`], filled by a [`GaugeSource`]) — never a `COUNT(*)` per scrape, so a
//! scrape costs the same with 10 or 10 million tasks queued.
//!
//! The recorder is this daemon's own, not the `metrics` crate's process-global one: two daemons
//! in one process (as in the tests) keep separate figures. Labels are bounded: account and target
//! names come from the config, kinds, stages, states and outcomes are fixed sets — never a task ID.
//!
//! Rendered in the Prometheus text exposition format (what `promtool check metrics` reads).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::http::{Body, text};

/// Buckets for request and delivery latencies: a local handler answers in milliseconds, the API
/// in tens to hundreds of them, a timeout at the request timeout (10 s by default).
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets for add-to-terminal: music tasks take one to five minutes, conversions seconds to
/// minutes, and a task may wait out a long outage.
const TASK_BUCKETS: &[f64] = &[
    10.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0, 86400.0,
];

/// Buckets for a store commit (an fsync: sub-millisecond on NVMe, tens of ms on a slow disk).
const COMMIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Buckets for the number of jobs in one commit (group commit batches up to 256).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Scrapes served at once.
const MAX_SCRAPES: usize = 8;

/// A scraper that has not sent its request head within this is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Every metric: its name, type, unit and help text. One table, so the README, the tests and the
/// endpoint cannot disagree about what exists.
pub const METRICS: &[MetricInfo] = &[
    MetricInfo::gauge(
        "sunopoll_build_info",
        "Always 1; the version label says which build runs.",
    ),
    MetricInfo::gauge(
        "sunopoll_tasks",
        "Tasks in the store, by state (active, done, failed, removed) and kind.",
    ),
    MetricInfo::gauge(
        "sunopoll_polls_due",
        "Active tasks whose next poll time has passed (the backlog waiting for a request).",
    ),
    MetricInfo::gauge(
        "sunopoll_poll_oldest_overdue_seconds",
        "How long the most overdue poll has been waiting past its due time (0 when none is due).",
    ),
    MetricInfo::counter(
        "sunopoll_polls_total",
        "Poll answers by account and outcome (progress, pending, throttled, unavailable, unauthorized, rejected, broken).",
    ),
    MetricInfo::counter(
        "sunopoll_api_requests_total",
        "Requests sent to the API, by account; rate() of it is the request rate.",
    ),
    MetricInfo::gauge(
        "sunopoll_api_rate_limit_requests_per_second",
        "The request rate the account is held to now (configured, or learnt after throttling); 0 means unlimited.",
    ),
    MetricInfo::gauge(
        "sunopoll_api_paused",
        "1 while the account's polling is paused, by pause kind (throttled, unavailable, unauthorized); 0 otherwise.",
    ),
    MetricInfo::gauge(
        "sunopoll_api_pause_seconds_left",
        "Seconds until the account's current pause ends and a probe is sent (0 when not paused).",
    ),
    MetricInfo::gauge(
        "sunopoll_api_paused_for_seconds",
        "How long the account's current pause has lasted (0 when not paused).",
    ),
    MetricInfo::gauge(
        "sunopoll_api_backoff_max_seconds",
        "The account's configured backoff-max: a pause longer than this is more than throttling.",
    ),
    MetricInfo::counter("sunopoll_events_total", "Events stored, by kind and stage."),
    MetricInfo::histogram(
        "sunopoll_task_duration_seconds",
        "Time from add to the terminal event (complete or error), by kind.",
    ),
    MetricInfo::counter(
        "sunopoll_deliveries_total",
        "Delivery attempts by target and result (delivered, retry, failed).",
    ),
    MetricInfo::histogram(
        "sunopoll_delivery_attempt_duration_seconds",
        "How long one delivery attempt took, by target.",
    ),
    MetricInfo::gauge(
        "sunopoll_deliveries_pending",
        "Deliveries waiting to be made (or retried), by target.",
    ),
    MetricInfo::gauge(
        "sunopoll_deliveries_failed",
        "Deliveries given up on (until redelivered), by target.",
    ),
    MetricInfo::gauge(
        "sunopoll_delivery_oldest_pending_seconds",
        "Age of the oldest pending delivery, by target (0 when none is pending).",
    ),
    MetricInfo::histogram(
        "sunopoll_store_commit_duration_seconds",
        "How long one store commit (one transaction, fsynced) took.",
    ),
    MetricInfo::histogram(
        "sunopoll_store_commit_batch_size",
        "Jobs carried by one store commit (group commit).",
    ),
    MetricInfo::counter(
        "sunopoll_store_errors_total",
        "Store commits that failed (disk full, locked, I/O error).",
    ),
    MetricInfo::counter(
        "sunopoll_archive_files_total",
        "Tries at archive files by result (done, retry, failed, expired).",
    ),
    MetricInfo::counter(
        "sunopoll_archive_bytes_total",
        "Bytes of archive files kept (each file counted once, when it is kept).",
    ),
    MetricInfo::counter(
        "sunopoll_proxy_requests_total",
        "Requests the API stand-in got, by outcome (tracked, passed, refused, throttled, ambiguous, unreachable, untracked).",
    ),
    MetricInfo::counter(
        "sunopoll_proxy_ambiguous_submissions_total",
        "Requests the API stand-in sent whose answer never came (timeout, reset), by account: the API may or may not have created a paid task.",
    ),
];

/// What kind of value a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets of observed values.
    Histogram,
}

/// One row of [`METRICS`].
#[derive(Debug, Clone, Copy)]
pub struct MetricInfo {
    /// The metric's name, `sunopoll_` prefixed, unit in the name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricType,
    /// The `# HELP` text.
    pub help: &'static str,
}

impl MetricInfo {
    const fn counter(name: &'static str, help: &'static str) -> MetricInfo {
        MetricInfo {
            name,
            kind: MetricType::Counter,
            help,
        }
    }
    const fn gauge(name: &'static str, help: &'static str) -> MetricInfo {
        MetricInfo {
            name,
            kind: MetricType::Gauge,
            help,
        }
    }
    const fn histogram(name: &'static str, help: &'static str) -> MetricInfo {
        MetricInfo {
            name,
            kind: MetricType::Histogram,
            help,
        }
    }
}

/// The values a scrape reads from the daemon: kept counts and in-memory state, never a scan.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Tasks by (state, kind).
    pub tasks: Vec<(String, String, u64)>,
    /// Active tasks past their next poll time.
    pub polls_due: u64,
    /// How long the most overdue poll has waited past its due time.
    pub oldest_overdue: Duration,
    /// One row per API account.
    pub accounts: Vec<AccountGauges>,
    /// One row per delivery target.
    pub targets: Vec<TargetGauges>,
}

/// An account's limits and pause, as a scrape sees them.
#[derive(Debug, Clone, Default)]
pub struct AccountGauges {
    /// The account's name (`default` for the single `[api]` table).
    pub account: String,
    /// Requests per second it is held to now; 0 for unlimited.
    pub rate_limit: f64,
    /// The current pause's kind and time left, if paused.
    pub pause: Option<(&'static str, Duration)>,
    /// How long the current pause has lasted (zero when not paused).
    pub paused_for: Duration,
    /// The configured `backoff-max`.
    pub backoff_max: Duration,
}

/// A delivery target's queue, as a scrape sees it.
#[derive(Debug, Clone, Default)]
pub struct TargetGauges {
    /// The target's name.
    pub target: String,
    /// Deliveries waiting.
    pub pending: u64,
    /// Deliveries given up on.
    pub failed: u64,
    /// Age of the oldest waiting delivery.
    pub oldest_pending: Duration,
}

/// The pause kinds the `sunopoll_api_paused` gauge always reports (0 or 1), so a pause that ends
/// reads 0 rather than vanishing or keeping a stale 1.
pub const PAUSE_KINDS: &[&str] = &["throttled", "unavailable", "unauthorized"];

/// Where a scrape gets its [`Gauges`]: the daemon supplies a closure over its own state.
pub type GaugeSource = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Gauges> + Send>> + Send + Sync>;

/// This daemon's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, every one described, `sunopoll_build_info` set.
    pub fn new() -> Metrics {
        let buckets: [(&str, &[f64]); 4] = [
            ("sunopoll_task_duration_seconds", TASK_BUCKETS),
            (
                "sunopoll_delivery_attempt_duration_seconds",
                LATENCY_BUCKETS,
            ),
            ("sunopoll_store_commit_duration_seconds", COMMIT_BUCKETS),
            ("sunopoll_store_commit_batch_size", BATCH_BUCKETS),
        ];
        let mut builder = PrometheusBuilder::new();
        for (name, values) in buckets {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_owned()), values)
                .expect("the bucket lists above are not empty");
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        for m in METRICS {
            let name = KeyName::from_const_str(m.name);
            let unit = m.name.ends_with("_seconds").then_some(Unit::Seconds);
            match m.kind {
                MetricType::Counter => recorder.describe_counter(name, unit, m.help.into()),
                MetricType::Gauge => recorder.describe_gauge(name, unit, m.help.into()),
                MetricType::Histogram => recorder.describe_histogram(name, unit, m.help.into()),
            }
        }
        let metrics = Metrics { recorder, handle };
        metrics
            .gauge("sunopoll_build_info", &[("version", crate::VERSION)])
            .set(1.0);
        // Present from the first scrape, so rate() and alerts see a zero before the first one.
        metrics
            .counter("sunopoll_store_errors_total", &[])
            .increment(0);
        metrics
            .counter("sunopoll_archive_files_total", &[("result", "done")])
            .increment(0);
        metrics
            .counter("sunopoll_archive_bytes_total", &[])
            .increment(0);
        metrics
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, (*v).to_owned()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn metadata() -> Metadata<'static> {
        Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&Self::key(name, labels), &Self::metadata())
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder
            .register_gauge(&Self::key(name, labels), &Self::metadata())
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, labels), &Self::metadata())
    }

    /// One try at an archive file ended with `result` (done, retry, failed, expired); `bytes`
    /// kept when done.
    pub fn archive_try(&self, result: &'static str, bytes: u64) {
        self.counter("sunopoll_archive_files_total", &[("result", result)])
            .increment(1);
        if bytes > 0 {
            self.counter("sunopoll_archive_bytes_total", &[])
                .increment(bytes);
        }
    }

    /// Registers the API stand-in's series for `accounts` at zero, whether or not it runs (as
    /// the archive's are): present from the first scrape, so an alert on an increase sees the
    /// first ambiguous submission.
    pub fn proxy_series(&self, accounts: &[String]) {
        self.counter("sunopoll_proxy_requests_total", &[("outcome", "tracked")])
            .increment(0);
        for a in accounts {
            self.counter(
                "sunopoll_proxy_ambiguous_submissions_total",
                &[("account", a)],
            )
            .increment(0);
        }
    }

    /// One request of the API stand-in ended with `outcome`.
    pub fn proxy_request(&self, outcome: &'static str) {
        self.counter("sunopoll_proxy_requests_total", &[("outcome", outcome)])
            .increment(1);
    }

    /// One request the API stand-in sent for `account` got no answer.
    pub fn ambiguous_submission(&self, account: &str) {
        self.counter(
            "sunopoll_proxy_ambiguous_submissions_total",
            &[("account", account)],
        )
        .increment(1);
    }

    /// One request sent to the API for `account`.
    pub fn api_request(&self, account: &str) {
        self.counter("sunopoll_api_requests_total", &[("account", account)])
            .increment(1);
    }

    /// One poll answered for `account`, with its outcome (`Outcome::kind`'s vocabulary).
    pub fn poll(&self, account: &str, outcome: &'static str) {
        self.counter(
            "sunopoll_polls_total",
            &[("account", account), ("outcome", outcome)],
        )
        .increment(1);
    }

    /// One event stored.
    pub fn event(&self, kind: &str, stage: &str) {
        self.counter("sunopoll_events_total", &[("kind", kind), ("stage", stage)])
            .increment(1);
    }

    /// A task reached its terminal event `after` its add.
    pub fn task_ended(&self, kind: &str, after: Duration) {
        self.histogram("sunopoll_task_duration_seconds", &[("kind", kind)])
            .record(after.as_secs_f64());
    }

    /// One delivery attempt to `target` ended with `result` (delivered, retry, failed).
    pub fn delivery_attempt(&self, target: &str, result: &'static str, took: Duration) {
        let target = &target_label(target);
        self.counter(
            "sunopoll_deliveries_total",
            &[("target", target), ("result", result)],
        )
        .increment(1);
        self.histogram(
            "sunopoll_delivery_attempt_duration_seconds",
            &[("target", target)],
        )
        .record(took.as_secs_f64());
    }

    /// One store commit of `batch` jobs that took `took`; `ok` false when it failed.
    pub fn store_commit(&self, took: Duration, batch: usize, ok: bool) {
        self.histogram("sunopoll_store_commit_duration_seconds", &[])
            .record(took.as_secs_f64());
        self.histogram("sunopoll_store_commit_batch_size", &[])
            .record(batch as f64);
        if !ok {
            self.counter("sunopoll_store_errors_total", &[])
                .increment(1);
        }
    }

    /// The text exposition of every metric, with the gauges set from `gauges` first.
    pub fn render(&self, gauges: &Gauges) -> String {
        for (state, kind, n) in &gauges.tasks {
            self.gauge("sunopoll_tasks", &[("state", state), ("kind", kind)])
                .set(*n as f64);
        }
        self.gauge("sunopoll_polls_due", &[])
            .set(gauges.polls_due as f64);
        self.gauge("sunopoll_poll_oldest_overdue_seconds", &[])
            .set(gauges.oldest_overdue.as_secs_f64());
        for a in &gauges.accounts {
            let account = a.account.as_str();
            self.gauge(
                "sunopoll_api_rate_limit_requests_per_second",
                &[("account", account)],
            )
            .set(a.rate_limit);
            for kind in PAUSE_KINDS {
                let on = a.pause.is_some_and(|(k, _)| k == *kind);
                self.gauge(
                    "sunopoll_api_paused",
                    &[("account", account), ("kind", kind)],
                )
                .set(if on { 1.0 } else { 0.0 });
            }
            let left = a.pause.map_or(0.0, |(_, left)| left.as_secs_f64());
            self.gauge("sunopoll_api_pause_seconds_left", &[("account", account)])
                .set(left);
            self.gauge("sunopoll_api_paused_for_seconds", &[("account", account)])
                .set(a.paused_for.as_secs_f64());
            self.gauge("sunopoll_api_backoff_max_seconds", &[("account", account)])
                .set(a.backoff_max.as_secs_f64());
        }
        for t in &gauges.targets {
            let target = &target_label(&t.target);
            self.gauge("sunopoll_deliveries_pending", &[("target", target)])
                .set(t.pending as f64);
            self.gauge("sunopoll_deliveries_failed", &[("target", target)])
                .set(t.failed as f64);
            self.gauge(
                "sunopoll_delivery_oldest_pending_seconds",
                &[("target", target)],
            )
            .set(t.oldest_pending.as_secs_f64());
        }
        self.handle.render()
    }
}

/// A target's label: its name, with any credentials cut out (a target without a `name` is
/// named by its URL, which may carry a password).
fn target_label(name: &str) -> String {
    crate::api::redact_url(name)
}

/// How the endpoint treats connections: a scraper is one Prometheus, not a crowd, sending one
/// request per scrape, so no keep-alive to hold a slot between scrapes.
const LIMITS: crate::http::Limits = crate::http::Limits {
    max_connections: MAX_SCRAPES,
    header_timeout: HEADER_TIMEOUT,
    keep_alive: false,
};

/// Serves `GET /metrics` on `listener` until `cancel`; every connection is tracked.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    source: GaugeSource,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let handler = move |req, _peer| answer(req, Arc::clone(&metrics), Arc::clone(&source));
    crate::http::serve("metrics", listener, LIMITS, handler, cancel, tracker).await;
}

async fn answer(
    req: Request<Incoming>,
    metrics: Arc<Metrics>,
    source: GaugeSource,
) -> Response<Body> {
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "sunopoll serves its metrics at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n");
    }
    let gauges = source().await;
    let mut r = Response::new(Body::full(metrics.render(&gauges)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            tasks: vec![
                ("active".into(), "music".into(), 3),
                ("done".into(), "music".into(), 7),
            ],
            polls_due: 2,
            oldest_overdue: Duration::from_millis(1500),
            accounts: vec![AccountGauges {
                account: "default".into(),
                rate_limit: 2.0,
                pause: Some(("throttled", Duration::from_secs(30))),
                paused_for: Duration::from_secs(90),
                backoff_max: Duration::from_secs(900),
            }],
            targets: vec![TargetGauges {
                target: "app".into(),
                pending: 4,
                failed: 1,
                oldest_pending: Duration::from_secs(12),
            }],
        }
    }

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_metric_is_rendered_with_its_type_and_help() {
        let m = Metrics::new();
        m.api_request("default");
        m.poll("default", "progress");
        m.event("music", "complete");
        m.task_ended("music", Duration::from_secs(95));
        m.delivery_attempt("app", "delivered", Duration::from_millis(3));
        m.store_commit(Duration::from_millis(2), 5, true);
        m.proxy_request("tracked");
        m.ambiguous_submission("default");
        let text = m.render(&gauges());
        for info in METRICS {
            let kind = match info.kind {
                MetricType::Counter => "counter",
                MetricType::Gauge => "gauge",
                MetricType::Histogram => "histogram",
            };
            assert!(
                text.contains(&format!("# TYPE {} {kind}", info.name)),
                "{} missing or mistyped in:\n{text}",
                info.name
            );
            assert!(
                text.contains(&format!("# HELP {} ", info.name)),
                "{}",
                info.name
            );
            assert!(info.name.starts_with("sunopoll_"));
            if info.kind == MetricType::Counter {
                assert!(info.name.ends_with("_total"), "{}", info.name);
            }
        }
    }

    #[test]
    fn gauges_take_the_scrape_time_values_and_pauses_read_zero_when_over() {
        let m = Metrics::new();
        let text = m.render(&gauges());
        assert_eq!(
            value_of(&text, "sunopoll_tasks{state=\"done\",kind=\"music\"}"),
            Some(7.0)
        );
        assert_eq!(value_of(&text, "sunopoll_polls_due"), Some(2.0));
        assert_eq!(
            value_of(&text, "sunopoll_poll_oldest_overdue_seconds"),
            Some(1.5)
        );
        assert_eq!(
            value_of(
                &text,
                "sunopoll_api_paused{account=\"default\",kind=\"throttled\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value_of(
                &text,
                "sunopoll_api_paused{account=\"default\",kind=\"unauthorized\"}"
            ),
            Some(0.0)
        );
        let mut after = gauges();
        after.accounts[0].pause = None;
        let text = m.render(&after);
        assert_eq!(
            value_of(
                &text,
                "sunopoll_api_paused{account=\"default\",kind=\"throttled\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            value_of(
                &text,
                "sunopoll_api_pause_seconds_left{account=\"default\"}"
            ),
            Some(0.0)
        );
    }

    #[test]
    fn counters_count_and_histograms_use_the_explicit_buckets() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.poll("default", "pending");
        }
        m.poll("other", "throttled");
        m.store_commit(Duration::from_millis(30), 1, false);
        let text = m.render(&Gauges::default());
        assert_eq!(
            value_of(
                &text,
                "sunopoll_polls_total{account=\"default\",outcome=\"pending\"}"
            ),
            Some(3.0)
        );
        assert_eq!(value_of(&text, "sunopoll_store_errors_total"), Some(1.0));
        assert_eq!(
            value_of(
                &text,
                "sunopoll_store_commit_duration_seconds_bucket{le=\"0.05\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value_of(
                &text,
                "sunopoll_store_commit_duration_seconds_bucket{le=\"0.025\"}"
            ),
            Some(0.0)
        );
        assert!(
            !text.contains("quantile="),
            "histograms, not summaries:\n{text}"
        );
    }

    #[test]
    fn a_target_named_by_a_url_with_a_password_is_labelled_without_it() {
        let m = Metrics::new();
        let url = "http://user:s3cret@127.0.0.1:3000/cb";
        m.delivery_attempt(url, "delivered", Duration::from_millis(1));
        let text = m.render(&Gauges {
            targets: vec![TargetGauges {
                target: url.into(),
                ..TargetGauges::default()
            }],
            ..Gauges::default()
        });
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("target=\"http://***@127.0.0.1:3000/cb\""),
            "{text}"
        );
    }

    #[test]
    fn two_daemons_in_one_process_keep_their_own_figures() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.api_request("default");
        let text = b.render(&Gauges::default());
        assert!(!text.contains("sunopoll_api_requests_total{"), "{text}");
    }

    #[test]
    fn promtool_accepts_the_exposition() {
        // The real promtool (Debian's prometheus package; .ci/run installs it). In CI a missing
        // promtool fails the test; elsewhere it says loudly that it did not run.
        let Some(promtool) = crate::testing::real_tool("promtool") else {
            return;
        };
        let m = Metrics::new();
        m.api_request("default");
        m.poll("default", "progress");
        m.event("music", "complete");
        m.task_ended("music", Duration::from_secs(95));
        m.delivery_attempt("app", "delivered", Duration::from_millis(3));
        m.store_commit(Duration::from_millis(2), 5, true);
        m.proxy_series(&["default".to_owned()]);
        m.proxy_request("ambiguous");
        let text = m.render(&gauges());
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(text.as_bytes()).expect("feed promtool");
        }
        let out = child.wait_with_output().expect("promtool ran");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_and_refuses_other_paths() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new());
        let source: GaugeSource = Arc::new(|| Box::pin(async { gauges() }));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let server = tokio::spawn(serve(
            listener,
            metrics,
            source,
            cancel.clone(),
            tracker.clone(),
        ));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
                .await
                .expect("answered in time")
                .expect("read");
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(
            ok.contains("sunopoll_deliveries_pending{target=\"app\"} 4"),
            "{ok}"
        );
        let missing = get("/").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server stops when cancelled")
            .expect("join");
        tracker.close();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("connections end when cancelled");
    }
}
