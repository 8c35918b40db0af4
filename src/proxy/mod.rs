//! The loopback stand-in for the API (`[proxy] listen`): an application changes only its API
//! base URL, and every task its submissions create is tracked as if it had called `add`, with
//! its family, account, `callBackUrl` and label, before the application gets its `taskId`.
//!
//! Every request is forwarded to the account its credential names, bytes unchanged both ways,
//! never retried, no redirect followed ([`forward`]). Which paths create which family is the
//! path table ([`paths`], `../shared/api/submissions.md` §2–§3); reading the answer and
//! tracking the task is [`track`], through the control socket's own `add`; the keys and the
//! loopback checks are [`guard`]; the account's request budget, shared with its polls, is
//! [`budget`]. The upstream call and the tracking run in a task of their own on the daemon's
//! tracker, so an application that hangs up mid-call cancels neither: its task is tracked and
//! its events reach the handler all the same.

mod budget;
mod forward;
mod guard;
mod paths;
mod track;

pub use paths::{Route, SUBMISSIONS, route};

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::api::ApiClient;
use crate::api::families::{Flavor, Kind};
use crate::clock::{format_duration, format_utc, now_ms};
use crate::config::ProxyConfig;
use crate::control::Control;
use crate::http::{Body, Limits, Refusal, read_body, text};
use crate::jobs::gate::SharedStatus;
use crate::jobs::rate::SharedLimiter;
use crate::metrics::Metrics;
use crate::protocol::{ProxyStatusView, check_label};
use forward::Failure;
use track::Created;

/// Paths not understood that are logged (once each) before the log stops naming new ones: a
/// client walking random paths must not fill the log or the memory.
const MAX_UNKNOWN_LOGGED: usize = 256;

/// One account as the stand-in sends for it.
#[derive(Debug, Clone)]
pub struct ProxyAccount {
    /// Its name.
    pub name: String,
    /// Its provider flavour: which throttle signal it gives.
    pub flavor: Flavor,
    /// The API's root.
    pub base_url: url::Url,
    /// Its poll client, whose key (as reloaded) the stand-in sends and compares with.
    pub api: ApiClient,
    /// Its request budget, shared with its poll loop.
    pub limiter: SharedLimiter,
    /// Its poll loop's status (the pause).
    pub status: SharedStatus,
}

/// What became of a request; each is counted once, under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Tracked,
    Passed,
    Refused,
    Throttled,
    Ambiguous,
    Unreachable,
    Untracked,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Tracked => "tracked",
            Outcome::Passed => "passed",
            Outcome::Refused => "refused",
            Outcome::Throttled => "throttled",
            Outcome::Ambiguous => "ambiguous",
            Outcome::Unreachable => "unreachable",
            Outcome::Untracked => "untracked",
        }
    }
}

/// The stand-in's figures since start, for `status`.
#[derive(Debug, Default)]
pub struct Counts {
    requests: AtomicU64,
    tracked: AtomicU64,
    passed: AtomicU64,
    refused: AtomicU64,
    throttled: AtomicU64,
    ambiguous: AtomicU64,
    unreachable: AtomicU64,
    untracked: AtomicU64,
}

impl Counts {
    fn add(&self, o: Outcome) {
        let n = match o {
            Outcome::Tracked => &self.tracked,
            Outcome::Passed => &self.passed,
            Outcome::Refused => &self.refused,
            Outcome::Throttled => &self.throttled,
            Outcome::Ambiguous => &self.ambiguous,
            Outcome::Unreachable => &self.unreachable,
            Outcome::Untracked => &self.untracked,
        };
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// The figures as `status` shows them, for a stand-in at `listen`.
    pub fn view(&self, listen: SocketAddr) -> ProxyStatusView {
        let get = |n: &AtomicU64| n.load(Ordering::Relaxed);
        ProxyStatusView {
            listen: format!("http://{listen}"),
            requests: get(&self.requests),
            tracked: get(&self.tracked),
            passed: get(&self.passed),
            refused: get(&self.refused),
            throttled: get(&self.throttled),
            ambiguous: get(&self.ambiguous),
            unreachable: get(&self.unreachable),
            untracked: get(&self.untracked),
        }
    }
}

/// Everything the stand-in needs, built once at start.
pub struct Proxy {
    accounts: Vec<ProxyAccount>,
    /// (token, account index).
    tokens: Vec<(String, usize)>,
    config: ProxyConfig,
    label: Option<HeaderName>,
    control: Arc<Control>,
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    counts: Arc<Counts>,
    tracker: TaskTracker,
    unknown_logged: Mutex<HashSet<String>>,
}

impl Proxy {
    /// The stand-in for `accounts` (in configured order), tracking through `control`, counting
    /// in `counts`, running upstream calls on `tracker`. Fails only if its HTTP client cannot
    /// be built.
    pub fn new(
        config: &ProxyConfig,
        accounts: Vec<ProxyAccount>,
        control: Arc<Control>,
        metrics: Arc<Metrics>,
        counts: Arc<Counts>,
        tracker: TaskTracker,
    ) -> anyhow::Result<Proxy> {
        let tokens = config
            .tokens
            .iter()
            .filter_map(|t| {
                let i = accounts.iter().position(|a| a.name == t.account)?;
                Some((t.expose().to_owned(), i))
            })
            .collect();
        let keys: Vec<Option<String>> = accounts
            .iter()
            .map(|a| a.api.key().map(|k| k.expose().to_owned()))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            if let Some(j) = keys[..i].iter().position(|o| o.is_some() && o == k) {
                warn!(
                    first = %accounts[j].name,
                    second = %accounts[i].name,
                    "two accounts have the same API key; the API stand-in sends requests made with it as account {:?}",
                    accounts[j].name
                );
            }
        }
        Ok(Proxy {
            label: config
                .label_header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            http: forward::client(config.upstream_timeout)?,
            accounts,
            tokens,
            config: config.clone(),
            control,
            metrics,
            counts,
            tracker,
            unknown_logged: Mutex::new(HashSet::new()),
        })
    }

    fn count(&self, o: Outcome) {
        self.counts.add(o);
        self.metrics.proxy_request(o.as_str());
    }

    fn refuse(&self, r: &Refusal, peer: SocketAddr) -> Response<Body> {
        r.log("proxy", peer);
        self.count(Outcome::Refused);
        r.response()
    }

    /// The account the request's credential stands for.
    fn account_for(&self, headers: &HeaderMap) -> Option<usize> {
        let presented = guard::bearer(headers)?;
        let keys: Vec<Option<String>> = self
            .accounts
            .iter()
            .map(|a| a.api.key().map(|k| k.expose().to_owned()))
            .collect();
        guard::account_for(
            presented,
            self.tokens.iter().map(|(t, i)| (t.as_str(), *i)),
            keys.iter().map(Option::as_deref),
        )
    }

    /// The label the request carries in the configured header, if any; a bad one is refused
    /// before anything is sent (the task could not be tracked as asked).
    fn label(&self, headers: &HeaderMap) -> Result<Option<String>, Refusal> {
        let Some(name) = &self.label else {
            return Ok(None);
        };
        let mut values = headers.get_all(name).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        let bad = |why: String| Refusal::new(StatusCode::BAD_REQUEST, format!("{name}: {why}"));
        if values.next().is_some() {
            return Err(bad("given twice".to_owned()));
        }
        let label = value
            .to_str()
            .map_err(|_| bad("is not visible ASCII text".to_owned()))?;
        check_label(label).map_err(|e| bad(e.message))?;
        Ok(Some(label.to_owned()))
    }

    /// Logs a path nobody here understands, once per path (and at most
    /// [`MAX_UNKNOWN_LOGGED`] paths).
    fn log_unknown(&self, method: &Method, path: &str) {
        let path = crate::api::clip(path, 200);
        let mut seen = self
            .unknown_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.len() >= MAX_UNKNOWN_LOGGED || !seen.insert(path.clone()) {
            return;
        }
        drop(seen);
        if path == "/api/v1/jobs/createTask" {
            info!(%method, %path, "proxy: passing through kie's createTask route, whose family is in the body: not understood, so its tasks are not tracked (use the family's own path, or `sunopoll add --kind`)");
        } else {
            info!(%method, %path, "proxy: passing through a path sunopoll does not know; nothing is tracked from it (said once per path)");
        }
    }

    /// A submission's turn in the account's budget: `None` once it may go (after waiting for
    /// its slot), or the throttle answer to give instead.
    async fn hold(&self, index: usize, path: &str) -> Option<Response<Body>> {
        let account = &self.accounts[index];
        let paused = account
            .status
            .lock()
            .ok()
            .and_then(|s| budget::throttled_for(&s, now_ms()));
        if let Some(wait) = paused {
            return Some(self.throttle(
                account,
                path,
                wait,
                "the API throttled this account and its polling is paused",
            ));
        }
        match account.limiter.reserve(Instant::now(), self.config.max_wait) {
            Ok(at) => {
                // A turn that is now goes at once: a timer, even one already due, waits for
                // the timer wheel's next tick (up to a millisecond).
                if at > Instant::now() {
                    tokio::time::sleep_until(at).await;
                }
                None
            }
            Err(wait) => Some(self.throttle(
                account,
                path,
                wait,
                "the account's request budget (shared with its polls) is spent for longer than proxy.max-wait",
            )),
        }
    }

    fn throttle(
        &self,
        account: &ProxyAccount,
        path: &str,
        wait: Duration,
        why: &str,
    ) -> Response<Body> {
        let (status, body, retry_after) = budget::throttle_answer(account.flavor, wait, why);
        info!(account = %account.name, path = %crate::api::clip(path, 200), retry_after, "proxy: submission not sent: {why}; answered with the provider's throttle signal");
        self.count(Outcome::Throttled);
        let mut r = json(status, body);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        r
    }

    /// Answers one request.
    async fn answer(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        if let Err(r) = guard::check_request(&req) {
            return self.refuse(&r, peer);
        }
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let route = paths::route(&method, &path);
        let Some(index) = self.account_for(req.headers()) else {
            let r = Refusal::new(
                StatusCode::UNAUTHORIZED,
                "the Authorization header is neither a configured account's API key nor a \
                 [[proxy.token]]; nothing was sent to the API",
            );
            r.log("proxy", peer);
            self.count(Outcome::Refused);
            let body = serde_json::json!({"code": 401, "msg": format!("sunopoll: {}", r.reason), "data": null});
            return json(StatusCode::UNAUTHORIZED, body.to_string());
        };
        let (parts, body) = req.into_parts();
        let cap = usize::try_from(self.config.max_body_size).unwrap_or(usize::MAX);
        let body = match read_body(body, cap, self.config.body_timeout).await {
            Ok(b) => b,
            Err(r) => return self.refuse(&r, peer),
        };
        let label = match self.label(&parts.headers) {
            Ok(l) => l,
            Err(r) => return self.refuse(&r, peer),
        };
        match route {
            Route::Unknown => self.log_unknown(&method, &path),
            Route::Known(why) => {
                debug!(%method, path = %crate::api::clip(&path, 200), why, "proxy: passing through")
            }
            Route::Creates(_) => {
                if let Some(throttled) = self.hold(index, &path).await {
                    return throttled;
                }
            }
        }
        // From here on the request is sent, and what follows must happen even if the client
        // goes away (the server drops this future then): the call and the tracking are a task
        // of their own, and this future only waits for its answer.
        let target = parts
            .uri
            .path_and_query()
            .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
        let (tx, rx) = oneshot::channel();
        let me = Arc::clone(&self);
        let call = Call {
            index,
            route,
            method,
            path,
            target,
            headers: parts.headers,
            body,
            label,
        };
        self.tracker.spawn(async move {
            let answer = me.exchange(call).await;
            // The client may be gone; the work is done either way.
            let _ = tx.send(answer);
        });
        rx.await.unwrap_or_else(|_| {
            text(
                StatusCode::BAD_GATEWAY,
                "sunopoll: the forwarded request ended without an answer\n",
            )
        })
    }

    /// Sends the request, tracks what it created, and builds the answer.
    async fn exchange(&self, call: Call) -> Response<Body> {
        let account = &self.accounts[call.index];
        let Some(key) = account.api.key() else {
            self.count(Outcome::Unreachable);
            return text(
                StatusCode::BAD_GATEWAY,
                "sunopoll: the account's API key cannot be read\n",
            );
        };
        let url = match forward::upstream_url(&account.base_url, &call.target) {
            Ok(u) => u,
            Err(why) => {
                self.count(Outcome::Unreachable);
                return text(StatusCode::BAD_GATEWAY, format!("sunopoll: {why}\n"));
            }
        };
        let headers = forward::upstream_headers(
            &call.headers,
            &key,
            self.label.as_ref(),
            call.route.creates(),
        );
        let shown_path = crate::api::clip(&call.path, 200);
        self.metrics.api_request(&account.name);
        let at = now_ms();
        let sent = forward::send(
            &self.http,
            call.method.clone(),
            url,
            headers,
            call.body.clone(),
        )
        .await;
        let answer = match sent {
            Ok(a) => a,
            Err(Failure::Unreachable(cause)) => {
                warn!(account = %account.name, path = %shown_path, cause = %cause, "proxy: the API cannot be reached; nothing was sent, answering 502");
                self.count(Outcome::Unreachable);
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("sunopoll: the API cannot be reached ({cause}); nothing was sent\n"),
                );
            }
            Err(Failure::Ambiguous(cause))
                if call.method == Method::GET || call.method == Method::HEAD =>
            {
                info!(account = %account.name, path = %shown_path, cause = %cause, "proxy: the API did not answer a read; answering 504");
                self.count(Outcome::Unreachable);
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("sunopoll: the API did not answer ({cause})\n"),
                );
            }
            Err(Failure::Ambiguous(cause)) => {
                warn!(
                    account = %account.name,
                    path = %shown_path,
                    at = %format_utc(at),
                    body_sha256 = %track::body_sha256(&call.body),
                    body_bytes = call.body.len(),
                    cause = %cause,
                    "ambiguous submission: sent to the API, which did not answer; it may or may \
                     not have created a (paid) task, and sunopoll cannot find out. It was not \
                     retried. Before submitting again, check the provider's dashboard for a task \
                     created at this time; if there is one, track it with `sunopoll add ID --kind KIND`"
                );
                self.metrics.ambiguous_submission(&account.name);
                self.count(Outcome::Ambiguous);
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "sunopoll: the API did not answer ({cause}); the request was sent once and \
                         not retried, so it may or may not have created a task\n"
                    ),
                );
            }
        };
        let outcome = match call.route {
            Route::Creates(kind) => self.track(&call, account, kind, &answer).await,
            _ => Outcome::Passed,
        };
        self.count(outcome);
        let mut r = Response::new(Body::full(answer.body));
        *r.status_mut() = answer.status;
        *r.headers_mut() = answer.headers;
        r
    }

    /// Tracks the task `answer` says `call` created, if any: committed before this returns.
    async fn track(
        &self,
        call: &Call,
        account: &ProxyAccount,
        kind: Kind,
        answer: &forward::Answer,
    ) -> Outcome {
        let path = crate::api::clip(&call.path, 200);
        let id = match track::created(kind, answer.status, &answer.headers, &answer.body) {
            Created::Task(id) => id,
            Created::Nothing => return Outcome::Passed,
            Created::Unreadable(why) => {
                warn!(account = %account.name, path = %path, status = answer.status.as_u16(), why = %why,
                    "proxy: cannot read the API's answer to a submission, so whatever it created is not tracked; if it created a task, track it with `sunopoll add ID --kind {kind}`");
                return Outcome::Untracked;
            }
        };
        let submitted = track::submitted_callback_url(&call.body);
        let (callback, why_not) = track::callback_for(&self.control, submitted);
        if let Some(why) = why_not {
            debug!(task_id = %crate::api::clip(&id, 80), why = %why, "proxy: the submitted callBackUrl is not used for the task's events");
        }
        let has_callback = callback.is_some();
        match track::track(
            &self.control,
            id.clone(),
            kind,
            &account.name,
            callback,
            call.label.clone(),
        )
        .await
        {
            Ok(added) => {
                info!(
                    task_id = %crate::api::clip(&id, 80),
                    kind = %kind,
                    account = %account.name,
                    path = %path,
                    callback_url = has_callback,
                    new = added.added > 0,
                    "proxy: submission tracked"
                );
                Outcome::Tracked
            }
            Err(e) => {
                error!(
                    task_id = %crate::api::clip(&id, 80),
                    kind = %kind,
                    account = %account.name,
                    path = %path,
                    error = %e.message,
                    "proxy: the API created a task that could not be tracked; the application got its answer. Track it with `sunopoll add ID --kind {kind} --account {}` once the cause is fixed",
                    account.name
                );
                Outcome::Untracked
            }
        }
    }
}

/// One request on its way to the API.
struct Call {
    index: usize,
    route: Route,
    method: Method,
    /// The path, for logs (never the query).
    path: String,
    /// Path and query, as the API gets them.
    target: String,
    headers: HeaderMap,
    body: Bytes,
    label: Option<String>,
}

/// A JSON answer of sunopoll's own.
fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves the stand-in on `listener` until `cancel`; connections and upstream calls are
/// tasks on `tracker`.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let limits = Limits {
        max_connections: proxy.config.max_connections,
        header_timeout: proxy.config.header_timeout,
        keep_alive: true,
    };
    let handler = move |req, peer| Arc::clone(&proxy).answer(req, peer);
    crate::http::serve("proxy", listener, limits, handler, cancel, tracker).await;
}

/// The line the daemon logs when the stand-in starts.
pub fn started_line(addr: SocketAddr, config: &ProxyConfig) -> String {
    format!(
        "serving the API stand-in at http://{addr}: point the application's API base URL here \
         (http://{addr} or http://{addr}/api/v1); its submissions are tracked (waits up to {} for the request budget)",
        format_duration(config.max_wait)
    )
}
