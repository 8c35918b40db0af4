//! The HTTP side of the API: the [`ApiClient`] that asks a family's details endpoint about one
//! task, the [`ApiKey`] that never prints, and the redaction that keeps it (and any URL
//! credentials) out of every answer, log line and stored event.

use std::fmt;
use std::time::Duration;

use super::clip;
use super::envelope::{Answer, Outcome, read_answer};
use super::families::Family;

/// Largest details body we read. Most answers are a few KiB (two tracks with lyrics), but a
/// MIDI record carries every note of every instrument (about 60 bytes a note: a long, dense
/// song with many instruments reaches the high hundreds of KiB) and a lyrics record may hold
/// long texts; 8 MiB leaves ten times that, so no real answer is refused as "too large",
/// while one poll still cannot make the daemon hold more than this per request in flight. A
/// bigger body is a broken proxy or a hostile server.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// A URL for logs and output: any `user:password@` part is replaced, so credentials embedded
/// in a handler or API URL are never printed.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("***");
            let _ = u.set_password(None);
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// Parses a `Retry-After` header: delay-seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Shortest secret [`redact`] removes: anything shorter would match ordinary words.
pub const MIN_REDACTED: usize = 8;

/// What a redacted secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// `bytes` with every occurrence of `secret` replaced by [`REDACTED`]. A server, proxy or
/// handler that echoes a request's credentials in its answer ("invalid token Bearer sk-…")
/// must not get them into the log, `status`, or stored events. Secrets shorter than
/// [`MIN_REDACTED`] are left alone.
pub fn redact<'a>(bytes: &'a [u8], secret: &str) -> std::borrow::Cow<'a, [u8]> {
    let s = secret.as_bytes();
    if s.len() < MIN_REDACTED || !bytes.windows(s.len()).any(|w| w == s) {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.starts_with(s) {
            out.extend_from_slice(REDACTED.as_bytes());
            rest = &rest[s.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The API key. Its `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key, trimming surrounding whitespace (key files usually end in a newline).
    pub fn new(key: &str) -> Option<ApiKey> {
        ApiKey::parse(key).ok()
    }

    /// Reads a key from the text of a key file or variable: its first line, trimmed. A key
    /// with spaces or control characters inside could not be sent in a header; it is refused
    /// here, where the error can say so, rather than failing every request later.
    pub fn parse(text: &str) -> Result<ApiKey, &'static str> {
        let key = text.lines().next().unwrap_or("").trim();
        if key.is_empty() {
            return Err("is empty");
        }
        if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err("contains spaces or control characters on its first line");
        }
        Ok(ApiKey(key.to_owned()))
    }

    /// The key itself, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// The details-endpoint HTTP client, one for every task family. Cheap to clone; clones share
/// the key, so [`ApiClient::set_key`] (a reload, a re-read after a rejection) reaches them all.
#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base_url: url::Url,
    key: std::sync::Arc<std::sync::RwLock<ApiKey>>,
}

impl ApiClient {
    /// Builds a client for `base_url` (e.g. `https://api.sunoapi.org`).
    pub fn new(base_url: &url::Url, key: ApiKey, timeout: Duration) -> anyhow::Result<ApiClient> {
        crate::tls::install_crypto_provider();
        if base_url.cannot_be_a_base() {
            anyhow::bail!("cannot build the API's URLs from {base_url}: it cannot be a base URL");
        }
        let http = with_tls_roots(reqwest::Client::builder())
            .user_agent(crate::USER_AGENT)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()?;
        Ok(ApiClient {
            http,
            base_url: base_url.clone(),
            key: std::sync::Arc::new(std::sync::RwLock::new(key)),
        })
    }

    /// Uses `key` for every request from now on. Returns whether it differs from the old one.
    pub fn set_key(&self, key: ApiKey) -> bool {
        match self.key.write() {
            Ok(mut k) => {
                let changed = k.expose() != key.expose();
                *k = key;
                changed
            }
            Err(_) => false,
        }
    }

    fn current_key(&self) -> Option<ApiKey> {
        self.key.read().ok().map(|k| k.clone())
    }

    /// The key in use now (as reloaded), for the API stand-in, which sends the account's
    /// requests with it; `None` if it cannot be read.
    pub fn key(&self) -> Option<ApiKey> {
        self.current_key()
    }

    /// Asks `family`'s details endpoint about one task and classifies the answer. Transport
    /// failures (refused, reset, timeout) come back as [`Outcome::Unavailable`]; this never
    /// errors.
    pub async fn details<F: Family>(&self, family: &F, task_id: &str) -> Outcome<F::Record> {
        let mut url = match self.base_url.join(family.endpoint()) {
            Ok(url) => url,
            // `new` checked that the base takes relative paths; this is the same failure.
            Err(e) => {
                return Outcome::Unavailable {
                    retry_after: None,
                    cause: format!("cannot build the details URL from {}: {e}", self.base_url),
                };
            }
        };
        url.query_pairs_mut()
            .append_pair(family.task_id_key(), task_id);
        let requested = format!("{}{}", url.origin().ascii_serialization(), url.path());
        let Some(key) = self.current_key() else {
            return Outcome::Unauthorized {
                cause: "the API key is unreadable (a reload panicked)".to_owned(),
            };
        };
        let response = match self
            .http
            .get(url)
            .bearer_auth(key.expose())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Unavailable {
                    retry_after: None,
                    cause: transport_cause(&e),
                };
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, std::time::SystemTime::now()));
        match read_capped(response, MAX_BODY_BYTES).await {
            // Redacted before anything reads it, so no cause, message or event can carry the
            // key even if the API echoes it back.
            Ok(body) => match self.read(
                family,
                task_id,
                status,
                retry_after,
                &redact(&body, key.expose()),
            ) {
                // A wrong path, not a wrong task: almost always api.base-url with a path in it.
                Outcome::Unavailable { retry_after, cause }
                    if status == 404 || cause.contains("404") =>
                {
                    let cause = cause.trim_end_matches(" (is api.base-url right?)");
                    Outcome::Unavailable {
                        retry_after,
                        cause: format!(
                            "{cause} (GET {requested}: check api.base-url, which should be the API's root like https://api.sunoapi.org)"
                        ),
                    }
                }
                outcome => outcome,
            },
            Err(BodyError::TooLarge) => Outcome::Broken {
                cause: format!("HTTP {status} with a body over {MAX_BODY_BYTES} bytes"),
            },
            Err(BodyError::Transport(e)) => Outcome::Unavailable {
                retry_after,
                cause: format!("HTTP {status}, then {}", transport_cause(&e)),
            },
        }
    }
}

impl ApiClient {
    /// [`read_answer`] for `task_id`, logging at warn what it had to remove from the answer,
    /// with the task id: the answer is used as it should have been, the operator still hears
    /// what the API said.
    fn read<F: Family>(
        &self,
        family: &F,
        task_id: &str,
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
    ) -> Outcome<F::Record> {
        let Answer { outcome, notes } =
            read_answer(family, Some(task_id), status, retry_after, body);
        for url in &notes.dropped_urls {
            tracing::warn!(task_id = %task_id, family = family.name(), url = %url,
                "the API's answer holds a URL that is not a plain http(s) URL or points at a \
                 link-local/metadata address; it is passed on as absent");
        }
        if let Some(code) = &notes.ignored_error_code {
            tracing::warn!(task_id = %task_id, family = family.name(), error_code = %code,
                "the API's errorCode for this failed task is not a documented failure code; the \
                 error event carries the family's default code instead");
        }
        outcome
    }
}

/// Where the TLS trust anchors came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootsSource {
    /// The system's CA certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR`, else the usual bundle).
    System,
    /// None could be loaded from the system; the Mozilla roots built into sunopoll are used.
    Bundled,
}

/// The CA roots every HTTPS client trusts: the system's, or the bundled Mozilla set when the
/// system has none (a minimal container, a host without `ca-certificates`). Without the
/// fallback, building the client fails at every start and systemd restarts a daemon that
/// can never come up. Loaded once per process, so the fallback is logged at warn once.
pub fn tls_roots() -> (&'static [reqwest::Certificate], RootsSource) {
    static ROOTS: std::sync::OnceLock<(Vec<reqwest::Certificate>, RootsSource)> =
        std::sync::OnceLock::new();
    let (certs, source) = ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        let system: Vec<reqwest::Certificate> = loaded
            .certs
            .iter()
            .filter_map(|c| reqwest::Certificate::from_der(c).ok())
            .collect();
        if !system.is_empty() {
            tracing::debug!(roots = system.len(), "loaded the system's CA certificates");
            return (system, RootsSource::System);
        }
        let why = loaded
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), |e| clip(&e.to_string(), 200));
        let bundled: Vec<reqwest::Certificate> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .filter_map(|c| reqwest::Certificate::from_der(c).ok())
            .collect();
        tracing::warn!(
            cause = %why,
            roots = bundled.len(),
            "no CA certificates could be loaded from the system (install ca-certificates, or \
             set SSL_CERT_FILE/SSL_CERT_DIR); using the Mozilla roots built into sunopoll"
        );
        (bundled, RootsSource::Bundled)
    });
    (certs.as_slice(), *source)
}

/// `builder` trusting exactly [`tls_roots`]: every HTTPS client sunopoll builds goes through
/// this, so none of them can fail for want of a system CA bundle.
pub fn with_tls_roots(builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
    builder.tls_certs_only(tls_roots().0.iter().cloned())
}

enum BodyError {
    TooLarge,
    Transport(reqwest::Error),
}

async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Says what went wrong on the wire in words an operator can act on. Never includes headers,
/// so the key cannot leak through it.
pub fn transport_cause(e: &reqwest::Error) -> String {
    let mut what = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "could not connect".to_owned()
    } else if e.is_body() || e.is_decode() {
        "the connection broke while reading the body".to_owned()
    } else if e.is_redirect() {
        "too many redirects".to_owned()
    } else {
        "request failed".to_owned()
    };
    // The innermost source is usually the useful part ("Connection refused (os error 111)").
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(last) = last {
        what.push_str(": ");
        what.push_str(&clip(&last, 200));
    }
    what
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_parsed() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn urls_lose_their_credentials_in_output() {
        assert_eq!(
            redact_url("https://user:pa55@hooks.internal/cb?x=1"),
            "https://***@hooks.internal/cb?x=1"
        );
        assert_eq!(
            redact_url("http://127.0.0.1:3000/cb"),
            "http://127.0.0.1:3000/cb"
        );
    }

    #[test]
    fn echoed_secrets_are_redacted() {
        let key = "sk-secret-1234";
        assert_eq!(
            redact(b"bad key sk-secret-1234, sk-secret-1234!", key).as_ref(),
            b"bad key [redacted], [redacted]!"
        );
        assert!(matches!(
            redact(b"nothing here", key),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(redact(b"a short one", "short").as_ref(), b"a short one");
        assert_eq!(redact(b"sk-secret-12", key).as_ref(), b"sk-secret-12");
    }

    #[test]
    fn api_key_is_never_printed() {
        let key = ApiKey::new("  sk-secret-123\n").expect("key");
        assert_eq!(key.expose(), "sk-secret-123");
        assert!(!format!("{key:?}").contains("secret"));
        assert!(ApiKey::new(" \n").is_none());
        assert_eq!(
            ApiKey::parse("sk-real-key\n# rotated 2026-01-01\n")
                .expect("first line")
                .expose(),
            "sk-real-key"
        );
        assert!(ApiKey::parse("sk real key").is_err());
        assert!(ApiKey::parse("sk-\u{7}key").is_err());
    }
}
