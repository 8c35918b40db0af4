//! Forwarding: POSTing each stored event, byte for byte, to the local handlers that would have
//! received the API's callback — durably, in order, signed, and with retries.
//!
//! Deliveries are an outbox in SQLite: one row per event × target, written in the same
//! transaction as the event (see [`Router::routes`]). This loop takes due rows (in order per task
//! and target: a `complete` never goes before that task's `first`), sends them under a global
//! and a per-destination concurrency limit (a dead handler holds back only its own queue), and
//! records every attempt. A failure is retried on `[forward] retry-schedule` with jitter,
//! honouring `Retry-After`; `410 Gone` stops that delivery at once; after the last attempt the
//! delivery is `failed`, logged at error, and kept for `sunopoll redeliver`.
//!
//! Requests follow the Standard Webhooks spec: `webhook-id` (stable per event and target, the
//! same on every retry and replay), `webhook-timestamp`, and with a secret `webhook-signature`
//! (`v1,` + base64 HMAC-SHA256 over `id.timestamp.body`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::api::clip;
use crate::clock::{format_duration, ms, now_ms};
use crate::config::{
    ForwardConfig, SigningSecret, TARGET_SUBMITTED_URL, TARGET_TASK_URL, TargetConfig,
};
use crate::events::Stage;
use crate::store::{AttemptRecord, DeliveryNext, DueDelivery, Route, Store, TaskRow};

/// Requests in flight to one destination (`scheme://host:port`) at once. A handler that hangs
/// can tie up at most this many of the global slots, so other handlers keep getting theirs.
pub const PER_ORIGIN_IN_FLIGHT: usize = 4;

/// How much of a failing handler's answer goes into the log and the attempt record.
const ERROR_BODY_BYTES: usize = 200;

/// The destination part of a URL, `scheme://host:port`, used to limit concurrency per handler.
pub fn origin_of(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}:{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port_or_known_default().unwrap_or(0)
        ),
        Err(_) => url.to_owned(),
    }
}

/// The `webhook-id` of `task`'s `stage` event for `target`: stable across retries, replays and
/// restarts, distinct per target, readable in a handler's log.
pub fn webhook_id(task: &str, stage: Stage, target: &str) -> String {
    let digest = Sha256::digest(target.as_bytes());
    let short: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("msg_{task}_{stage}_{short}")
}

/// The Standard Webhooks `webhook-signature` value for one request.
pub fn sign(secret: &SigningSecret, id: &str, timestamp: i64, body: &[u8]) -> String {
    use base64::Engine as _;
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.key())
        .expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Decides where a task's events go. Built from `[forward]` once at start.
#[derive(Debug, Clone)]
pub struct Router {
    config: Arc<ForwardConfig>,
}

impl Router {
    /// A router for `config`.
    pub fn new(config: ForwardConfig) -> Router {
        Router {
            config: Arc::new(config),
        }
    }

    /// The forward settings.
    pub fn config(&self) -> &ForwardConfig {
        &self.config
    }

    /// The configured targets as routes.
    pub fn configured_routes(&self) -> Vec<Route> {
        self.config
            .targets
            .iter()
            .map(|t| Route {
                target: t.name.clone(),
                url: t.url.to_string(),
                stages: t.stages.clone(),
            })
            .collect()
    }

    /// Where `task`'s new events go: the configured targets, its `--callback-url`, and, with
    /// `use-task-callback-url`, the URL it was submitted with if that URL's host is allowed.
    /// A URL already routed to (a configured target, or the `--callback-url`) is not added a
    /// second time: the handler would get every event twice under two `webhook-id`s.
    pub fn routes(&self, task: &TaskRow, submitted: Option<&str>) -> Vec<Route> {
        let mut routes = self.configured_routes();
        let same = |a: &str, b: &str| match (url::Url::parse(a), url::Url::parse(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        let mut add = |target: &str, url: &str| {
            if !routes.iter().any(|r| same(&r.url, url)) {
                routes.push(Route {
                    target: target.to_owned(),
                    url: url.to_owned(),
                    stages: Stage::ALL.to_vec(),
                });
            }
        };
        if let Some(url) = &task.callback_url {
            add(TARGET_TASK_URL, url);
        }
        if self.config.use_task_callback_url
            && let Some(url) = submitted.or(task.submitted_callback_url.as_deref())
            && self.submitted_url_allowed(url)
        {
            add(TARGET_SUBMITTED_URL, url);
        }
        routes
    }

    /// True when a submitted `callBackUrl` may be used: http(s) and a host in `allow-hosts`.
    pub fn submitted_url_allowed(&self, url: &str) -> bool {
        url::Url::parse(url).is_ok_and(|u| {
            (u.scheme() == "http" || u.scheme() == "https") && self.config.allows_host(&u)
        })
    }

    fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.config.targets.iter().find(|t| t.name == name)
    }
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// A 2xx answer.
    Delivered(u16),
    /// `410 Gone`: the handler says never again.
    Gone,
    /// Anything else.
    Failed {
        /// HTTP status, if an answer came.
        status: Option<u16>,
        /// What went wrong, in words.
        cause: String,
        /// The handler's `Retry-After` (429/503).
        retry_after: Option<Duration>,
    },
}

/// What happens after attempt number `attempts` (1 for the first) ended with `result`. Pure.
///
/// A schedule of N delays means N attempts; delay k (k ≥ 1) follows failure k, spread by up to
/// ±10 % with `jitter` in `[0, 1)`, and stretched to a `Retry-After` that asks for longer.
pub fn after_attempt(
    attempts: u32,
    result: &AttemptResult,
    schedule: &[Duration],
    now: i64,
    jitter: f64,
) -> DeliveryNext {
    match result {
        AttemptResult::Delivered(_) => DeliveryNext::Delivered,
        AttemptResult::Gone => DeliveryNext::Failed,
        AttemptResult::Failed { retry_after, .. } => {
            let Some(delay) = schedule.get(attempts as usize) else {
                return DeliveryNext::Failed;
            };
            let spread = delay.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0));
            let delay =
                retry_after.map_or(spread, |ra| spread.max(ra.min(crate::api::MAX_RETRY_AFTER)));
            DeliveryNext::Retry(now.saturating_add(ms(delay)))
        }
    }
}

struct Finished {
    id: i64,
    origin: String,
    /// False when the attempt could not be recorded (the store is failing): the delivery is
    /// still due, and sending it again at once would hammer the handler with repeats.
    recorded: bool,
}

/// A pause of all deliveries while the store cannot record attempts.
#[derive(Default)]
struct StorePause {
    failures: u32,
    until: Option<tokio::time::Instant>,
}

/// First pause after a failed record, doubling to [`STORE_PAUSE_MAX`].
const STORE_PAUSE_MIN: Duration = Duration::from_secs(1);
/// Longest pause while the store keeps failing.
const STORE_PAUSE_MAX: Duration = Duration::from_secs(60);

/// The delivery loop.
pub struct Forwarder {
    /// The outbox.
    pub store: Store,
    /// Targets and policy.
    pub router: Router,
    /// The newest event sequence number: a change means new deliveries may be due.
    pub events: watch::Receiver<i64>,
    /// Poked by `redeliver`.
    pub wake: Arc<Notify>,
}

impl Forwarder {
    /// Runs until `cancel` fires. Attempts already started finish (bounded by their timeout)
    /// and are recorded; the caller waits for `tracker`.
    pub async fn run(mut self, cancel: CancellationToken, tracker: TaskTracker) {
        crate::api::install_crypto_provider();
        let http = match reqwest::Client::builder()
            .user_agent(crate::USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "cannot build the HTTP client for forwarding; events are stored but not forwarded");
                return;
            }
        };
        let known: Vec<String> = self
            .router
            .config()
            .targets
            .iter()
            .map(|t| t.name.clone())
            .collect();
        match self.store.fail_orphans(known, now_ms()).await {
            Ok(0) => {}
            Ok(n) => warn!(
                deliveries = n,
                "gave up pending deliveries to targets no longer in the configuration (replay them with `sunopoll redeliver --target NAME` if the target comes back)"
            ),
            Err(e) => error!(error = %e, "cannot check for deliveries to removed targets"),
        }
        let capacity = self.router.config().max_in_flight;
        let (done_tx, mut done_rx) = mpsc::channel::<Finished>(capacity + 1);
        let mut in_flight: HashSet<i64> = HashSet::new();
        let mut per_origin: HashMap<String, usize> = HashMap::new();
        let mut events_open = true;
        let mut store_pause = StorePause::default();
        loop {
            while let Ok(f) = done_rx.try_recv() {
                finish(f, &mut in_flight, &mut per_origin, &mut store_pause);
            }
            if cancel.is_cancelled() {
                break;
            }
            let mut wake_at: Option<tokio::time::Instant> = None;
            let mut again = false;
            let slots = match store_pause.until {
                Some(until) if tokio::time::Instant::now() < until => {
                    wake_at = Some(until);
                    0
                }
                _ => capacity.saturating_sub(in_flight.len()),
            };
            if slots > 0 {
                let full: Vec<String> = per_origin
                    .iter()
                    .filter(|(_, n)| **n >= PER_ORIGIN_IN_FLIGHT)
                    .map(|(o, _)| o.clone())
                    .collect();
                let busy: Vec<i64> = in_flight.iter().copied().collect();
                match self.store.due_deliveries(busy, full, slots + 1).await {
                    Ok(rows) => {
                        let now = now_ms();
                        let mut started = 0;
                        for row in rows {
                            if row.next_attempt_at > now {
                                let ahead = Duration::from_millis(
                                    (row.next_attempt_at - now).unsigned_abs(),
                                );
                                wake_at = Some(tokio::time::Instant::now() + ahead);
                                break;
                            }
                            if started == slots {
                                break;
                            }
                            let count = per_origin.entry(row.origin.clone()).or_insert(0);
                            if *count >= PER_ORIGIN_IN_FLIGHT {
                                again = true; // this destination filled up in this batch
                                continue;
                            }
                            *count += 1;
                            in_flight.insert(row.id);
                            started += 1;
                            self.spawn_attempt(&tracker, &http, row, done_tx.clone());
                        }
                    }
                    Err(e) => {
                        error!(error = %e, "cannot read the delivery queue; retrying in 1s");
                        wake_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            if again {
                continue;
            }
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let new_events = async {
                if events_open {
                    self.events.changed().await.is_ok()
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                () = cancel.cancelled() => {}
                open = new_events => {
                    // Closed means the scheduler is gone (shutdown): nothing new will be stored.
                    events_open = open;
                }
                () = self.wake.notified() => {}
                Some(f) = done_rx.recv() => finish(f, &mut in_flight, &mut per_origin, &mut store_pause),
                () = sleep => {}
            }
        }
        debug!(
            in_flight = in_flight.len(),
            "forwarder stopped starting deliveries"
        );
    }

    fn spawn_attempt(
        &self,
        tracker: &TaskTracker,
        http: &reqwest::Client,
        row: DueDelivery,
        done: mpsc::Sender<Finished>,
    ) {
        let store = self.store.clone();
        let router = self.router.clone();
        let http = http.clone();
        tracker.spawn(async move {
            let origin = row.origin.clone();
            let id = row.id;
            let recorded = attempt(&store, &router, &http, row).await;
            let _ = done
                .send(Finished {
                    id,
                    origin,
                    recorded,
                })
                .await;
        });
    }
}

fn finish(
    f: Finished,
    in_flight: &mut HashSet<i64>,
    per_origin: &mut HashMap<String, usize>,
    pause: &mut StorePause,
) {
    if f.recorded {
        if pause.failures > 0 {
            info!(
                failures = pause.failures,
                "the store records deliveries again; forwarding resumes"
            );
        }
        *pause = StorePause::default();
    } else {
        pause.failures = pause.failures.saturating_add(1);
        let delay = crate::scheduler::backoff_delay(
            pause.failures,
            STORE_PAUSE_MIN,
            STORE_PAUSE_MAX,
            fastrand::f64(),
        );
        pause.until = Some(tokio::time::Instant::now() + delay);
        warn!(failures = pause.failures, retry_in = %format_duration(delay),
              "cannot record delivery attempts; pausing all forwarding so handlers are not sent repeats");
    }
    in_flight.remove(&f.id);
    if let Some(n) = per_origin.get_mut(&f.origin) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            per_origin.remove(&f.origin);
        }
    }
}

/// Makes one attempt, records it, and logs it. Returns false if it could not be recorded.
async fn attempt(store: &Store, router: &Router, http: &reqwest::Client, row: DueDelivery) -> bool {
    let target = router.target(&row.target);
    let config = router.config();
    let (url, secret, headers, timeout) = match target {
        Some(t) => (
            t.url.to_string(),
            t.secret.as_ref(),
            t.headers.as_slice(),
            t.timeout,
        ),
        None => (
            row.url.clone(),
            config.task_secret.as_ref(),
            &[][..],
            config.timeout,
        ),
    };
    let started_at = now_ms();
    let started = Instant::now();
    let timestamp = started_at / 1000;
    let mut request = http
        .post(&url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &row.webhook_id)
        .header("webhook-timestamp", timestamp.to_string());
    if let Some(secret) = secret {
        request = request.header(
            "webhook-signature",
            sign(secret, &row.webhook_id, timestamp, row.body.as_bytes()),
        );
    }
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let result = match request.body(row.body.clone()).send().await {
        Ok(response) => judge(response).await,
        Err(e) => AttemptResult::Failed {
            status: None,
            cause: describe_send_error(&e, timeout),
            retry_after: None,
        },
    };
    // A handler may echo the credentials it was sent (an `Authorization` header) in its error
    // page; its answer goes to the log and the attempt history, so they are cut out first.
    let result = match result {
        AttemptResult::Failed {
            status,
            cause,
            retry_after,
        } => AttemptResult::Failed {
            status,
            cause: headers.iter().fold(cause, |c, (_, v)| {
                String::from_utf8_lossy(&crate::api::redact(c.as_bytes(), v)).into_owned()
            }),
            retry_after,
        },
        other => other,
    };
    let took = started.elapsed();
    let attempt_no = row.attempts + 1;
    let next = after_attempt(
        attempt_no,
        &result,
        &config.retry_schedule,
        now_ms(),
        fastrand::f64(),
    );
    let (status, error_text) = match &result {
        AttemptResult::Delivered(s) => (Some(*s), None),
        AttemptResult::Gone => (
            Some(410),
            Some("HTTP 410 Gone: the handler asked not to receive this event again".to_owned()),
        ),
        AttemptResult::Failed { status, cause, .. } => (*status, Some(cause.clone())),
    };
    let record = AttemptRecord {
        started_at,
        duration_ms: i64::try_from(took.as_millis()).unwrap_or(i64::MAX),
        status,
        error: error_text.clone(),
    };
    match store.record_attempt(&row, record, next.clone()).await {
        Ok(true) => {}
        Ok(false) => {
            info!(task_id = %row.task_id, stage = %row.stage, target = %row.target, seq = row.event_seq,
                  "a redelivery was requested while this attempt was in flight; sending it again");
            return true;
        }
        Err(e) => {
            error!(task_id = %row.task_id, stage = %row.stage, target = %row.target, error = %e,
                   "cannot record a delivery attempt; it will be made again");
            return false;
        }
    }
    let latency_ms = took.as_millis();
    match next {
        DeliveryNext::Delivered => info!(
            task_id = %row.task_id, stage = %row.stage, target = %row.target,
            status = status.unwrap_or(0), latency_ms, attempt = attempt_no, seq = row.event_seq,
            "delivered"
        ),
        DeliveryNext::Retry(at) => warn!(
            task_id = %row.task_id, stage = %row.stage, target = %row.target,
            cause = %error_text.unwrap_or_default(), attempt = attempt_no,
            of = config.retry_schedule.len(),
            retry_in = %format_duration(Duration::from_millis((at - now_ms()).max(0).unsigned_abs())),
            "delivery failed; will retry"
        ),
        DeliveryNext::Failed => error!(
            task_id = %row.task_id, stage = %row.stage, target = %row.target,
            cause = %error_text.unwrap_or_default(), attempts = attempt_no, seq = row.event_seq,
            "delivery given up; replay it with `sunopoll redeliver`"
        ),
    }
    true
}

/// Reads the handler's answer: 2xx delivered, 410 gone, anything else failed with the status
/// and the first bytes of the body.
async fn judge(mut response: reqwest::Response) -> AttemptResult {
    let status = response.status().as_u16();
    if response.status().is_success() {
        return AttemptResult::Delivered(status);
    }
    if status == 410 {
        return AttemptResult::Gone;
    }
    let retry_after = matches!(status, 429 | 503)
        .then(|| response.headers().get(reqwest::header::RETRY_AFTER))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::api::parse_retry_after(v, std::time::SystemTime::now()));
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_BYTES);
    let text = String::from_utf8_lossy(&body);
    let mut cause = format!("HTTP {status}");
    if (300..400).contains(&status) {
        cause.push_str(" (redirects are not followed: a callback goes to one URL)");
    }
    if !text.trim().is_empty() {
        cause.push_str(&format!(": {}", clip(text.trim(), ERROR_BODY_BYTES)));
    }
    AttemptResult::Failed {
        status: Some(status),
        cause,
        retry_after,
    }
}

fn describe_send_error(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("no answer within {} (timeout)", format_duration(timeout));
    }
    let cause = crate::api::transport_cause(e);
    if cause.contains("Connection refused") {
        return "connection refused (is the handler running?)".to_owned();
    }
    cause
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Vec<Duration> {
        crate::config::DEFAULT_RETRY_SCHEDULE.to_vec()
    }

    fn failed() -> AttemptResult {
        AttemptResult::Failed {
            status: Some(500),
            cause: "HTTP 500".into(),
            retry_after: None,
        }
    }

    #[test]
    fn a_schedule_of_n_delays_gives_n_attempts() {
        let s = schedule();
        for attempt in 1..s.len() as u32 {
            match after_attempt(attempt, &failed(), &s, 0, 0.5) {
                DeliveryNext::Retry(at) => {
                    assert_eq!(at, ms(s[attempt as usize]), "attempt {attempt}")
                }
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        assert_eq!(
            after_attempt(8, &failed(), &s, 0, 0.5),
            DeliveryNext::Failed
        );
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let s = vec![Duration::ZERO, Duration::from_secs(100)];
        for j in [0.0, 0.3, 0.999] {
            let DeliveryNext::Retry(at) = after_attempt(1, &failed(), &s, 0, j) else {
                panic!()
            };
            assert!((90_000..=110_000).contains(&at), "{at}");
        }
    }

    #[test]
    fn gone_stops_and_success_delivers_and_retry_after_stretches() {
        let s = schedule();
        assert_eq!(
            after_attempt(1, &AttemptResult::Gone, &s, 0, 0.5),
            DeliveryNext::Failed
        );
        assert_eq!(
            after_attempt(1, &AttemptResult::Delivered(204), &s, 0, 0.5),
            DeliveryNext::Delivered
        );
        let slow = AttemptResult::Failed {
            status: Some(429),
            cause: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(60)),
        };
        assert_eq!(
            after_attempt(1, &slow, &s, 0, 0.5),
            DeliveryNext::Retry(60_000)
        );
    }

    #[test]
    fn webhook_ids_are_stable_and_distinct_per_target() {
        let a = webhook_id("t1", Stage::First, "app");
        assert_eq!(a, webhook_id("t1", Stage::First, "app"));
        assert_ne!(a, webhook_id("t1", Stage::First, "other"));
        assert_ne!(a, webhook_id("t1", Stage::Complete, "app"));
        assert!(a.starts_with("msg_t1_first_"));
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example from the Standard Webhooks reference libraries.
        let secret =
            SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let sig = sign(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn one_url_is_routed_to_once() {
        let mut config =
            crate::config::Config::defaults(&crate::config::Environment::default()).forward;
        config.use_task_callback_url = true;
        config.targets.push(TargetConfig {
            name: "app".into(),
            url: url::Url::parse("http://127.0.0.1:3000/cb").expect("url"),
            stages: vec![Stage::Complete],
            secret: None,
            headers: Vec::new(),
            timeout: Duration::from_secs(1),
        });
        let router = Router::new(config);
        let task = TaskRow {
            id: "t".into(),
            state: crate::protocol::TaskState::Active,
            stage: None,
            last_status: None,
            failures: 0,
            rejections: 0,
            added_at: 0,
            deadline_at: 1,
            callback_url: Some("http://127.0.0.1:3000/cb".into()),
            submitted_callback_url: None,
        };
        let routes = router.routes(&task, Some("http://127.0.0.1:3000/other"));
        let targets: Vec<&str> = routes.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(
            targets,
            ["app", TARGET_SUBMITTED_URL],
            "the --callback-url equals the target's URL"
        );
        let routes = router.routes(&task, Some("http://127.0.0.1:3000/cb"));
        assert_eq!(routes.len(), 1);
    }

    #[test]
    fn origins_group_by_destination() {
        assert_eq!(
            origin_of("http://127.0.0.1:3000/a"),
            "http://127.0.0.1:3000"
        );
        assert_eq!(
            origin_of("https://hooks.example.com/x"),
            "https://hooks.example.com:443"
        );
    }
}
