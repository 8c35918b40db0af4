//! One delivery attempt over HTTP: the signed POST of an event's stored body to its handler,
//! and what the handler's answer (or its silence) came to. Redirects are never followed: a
//! callback goes to one URL. Recording the attempt and deciding what comes next are the
//! deliver job's.

use std::time::{Duration, Instant};

use super::{Router, sign};
use crate::api::clip;
use crate::clock::{format_duration, now_ms};
use crate::store::DueDelivery;

/// How much of a failing handler's answer goes into the log and the attempt record.
const ERROR_BODY_BYTES: usize = 200;

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

/// One attempt, finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted {
    /// What it came to.
    pub result: AttemptResult,
    /// When it started (Unix ms).
    pub started_at: i64,
    /// How long it took.
    pub took: Duration,
}

/// The HTTP client for deliveries: sunopoll's user agent, no redirects, and `proxy` or none.
pub fn http_client(proxy: Option<&url::Url>) -> reqwest::Result<reqwest::Client> {
    crate::tls::install_crypto_provider();
    let builder = crate::api::with_tls_roots(reqwest::Client::builder())
        .user_agent(crate::USER_AGENT)
        .redirect(reqwest::redirect::Policy::none());
    // `HTTP_PROXY` is set for the API (the outside world), not for the local handlers: a proxy
    // there would see every event and the handler's `Authorization` header, or fail the
    // delivery outright. Only `[forward] proxy` sends deliveries through one.
    let builder = match proxy {
        Some(p) => builder.proxy(reqwest::Proxy::all(p.as_str())?),
        None => builder.no_proxy(),
    };
    builder.build()
}

/// POSTs `row`'s body to its target, signed when the target has a secret, and reads the answer.
/// Any credential the request carried in a header is cut out of a failing handler's answer.
pub async fn attempt(router: &Router, http: &reqwest::Client, row: &DueDelivery) -> Attempted {
    let config = router.config();
    let target = config.targets.iter().find(|t| t.name == row.target);
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
    // page, and a transport error may quote the URL with its password; the cause goes to the
    // log and the attempt history, so they are cut out first.
    let password = url::Url::parse(&url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned));
    let secrets = headers
        .iter()
        .map(|(_, v)| v.as_str())
        .chain(password.as_deref());
    let result = match result {
        AttemptResult::Failed {
            status,
            cause,
            retry_after,
        } => AttemptResult::Failed {
            status,
            cause: secrets.fold(cause, |c, v| {
                String::from_utf8_lossy(&crate::api::redact(c.as_bytes(), v)).into_owned()
            }),
            retry_after,
        },
        other => other,
    };
    Attempted {
        result,
        started_at,
        took: started.elapsed(),
    }
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
    if matches!(status, 404 | 405) {
        // A handler that is up but has no such route: retrying for a day will not add one.
        cause.push_str(" (the handler has no such route: check the target URL)");
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
