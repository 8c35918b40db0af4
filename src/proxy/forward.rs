//! One request forwarded to the account's API: bytes unchanged both ways, hop-by-hop headers
//! dropped, `Host` the API's, the account's key instead of the application's credential, no
//! retry and no redirect followed. What comes back is the API's answer as it came, or why
//! there is none, split by whether the request may have reached the API.

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

use crate::api::ApiKey;

/// Largest answer passed back: the API's largest (a MIDI record of a long song) is a few
/// hundred KiB; the poller's own cap.
pub const MAX_ANSWER_BYTES: usize = crate::api::MAX_BODY_BYTES;

/// Connecting may take at most this long (or the whole upstream timeout, if shorter): a
/// connection that cannot be made sent nothing, so it is a clean failure to report fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP client for forwarded requests: no redirect is followed (a 307 or 308 would re-send
/// a submission, a second paid task; it goes back to the application as it came), nothing is
/// retried, bodies are not decoded (`Content-Encoding` passes through with the bytes), and the
/// whole exchange is bounded by `timeout`.
pub fn client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    crate::tls::install_crypto_provider();
    Ok(crate::api::with_tls_roots(reqwest::Client::builder())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(CONNECT_TIMEOUT))
        .build()?)
}

/// The API's answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers, hop-by-hop ones already dropped.
    pub headers: HeaderMap,
    /// Its body, byte for byte.
    pub body: Bytes,
}

/// Why there is no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made: nothing was sent, so nothing was created.
    Unreachable(String),
    /// The request was (or may have been) sent and no whole answer came: a timeout, a reset,
    /// a broken or oversized body. Whether the API acted on it cannot be known.
    Ambiguous(String),
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus `Proxy-*`:
/// never forwarded in either direction, and neither are the headers a `Connection` header
/// names.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || n.starts_with("proxy-")
}

/// `headers` without the hop-by-hop ones (those `Connection` names included), nor
/// `Content-Length` (the body's own length is sent), nor any in `also`.
pub fn end_to_end(headers: &HeaderMap, also: &[HeaderName]) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if is_hop_by_hop(name)
            || name == header::CONTENT_LENGTH
            || also.contains(name)
            || named.iter().any(|n| n == name.as_str())
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The headers sent to the API for an application's request: its own end-to-end headers,
/// without its `Host` (the client sets the API's), its credential (replaced by the account's
/// key), `Expect` (the body is already read) and `label` (sunopoll's own, not the API's). A
/// submission asks for an uncompressed answer, which has to be read to find the task.
pub fn upstream_headers(
    headers: &HeaderMap,
    key: &ApiKey,
    label: Option<&HeaderName>,
    submission: bool,
) -> HeaderMap {
    let mut also = vec![header::HOST, header::AUTHORIZATION, header::EXPECT];
    also.extend(label.cloned());
    let mut out = end_to_end(headers, &also);
    if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", key.expose())) {
        v.set_sensitive(true);
        out.insert(header::AUTHORIZATION, v);
    }
    if submission {
        out.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    out
}

/// `base` (the account's root, ending in `/`) with `path_and_query` (the application's request
/// target, `/api/v1/…?…`) under it.
pub fn upstream_url(base: &url::Url, path_and_query: &str) -> Result<url::Url, String> {
    let root = base.as_str().trim_end_matches('/');
    url::Url::parse(&format!("{root}{path_and_query}"))
        .map_err(|e| format!("cannot build the API's URL from {root} and the request: {e}"))
}

/// Sends one request and reads its whole answer. Never retried.
pub async fn send(
    http: &reqwest::Client,
    method: Method,
    url: url::Url,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer, Failure> {
    let sent = http.request(method, url).headers(headers).body(body).send();
    let mut response = match sent.await {
        Ok(r) => r,
        Err(e) if e.is_connect() => {
            return Err(Failure::Unreachable(crate::api::transport_cause(&e)));
        }
        Err(e) => return Err(Failure::Ambiguous(crate::api::transport_cause(&e))),
    };
    let status = response.status();
    let headers = end_to_end(response.headers(), &[]);
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(Failure::Ambiguous(format!(
            "HTTP {} with a body over {MAX_ANSWER_BYTES} bytes",
            status.as_u16()
        )));
    }
    let mut body = bytes::BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(Failure::Ambiguous(format!(
                        "HTTP {} with a body over {MAX_ANSWER_BYTES} bytes",
                        status.as_u16()
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                return Err(Failure::Ambiguous(format!(
                    "HTTP {}, then {}",
                    status.as_u16(),
                    crate::api::transport_cause(&e)
                )));
            }
        }
    }
    Ok(Answer {
        status,
        headers,
        body: body.freeze(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let h = map(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("x-secret-hop", "1"),
            ("content-length", "12"),
            ("content-type", "application/json"),
            ("x-request-id", "r1"),
            ("x-request-id", "r2"),
        ]);
        let out = end_to_end(&h, &[]);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "x-request-id"]);
        assert_eq!(out.get_all("x-request-id").iter().count(), 2);
    }

    #[test]
    fn upstream_gets_the_accounts_key_and_never_the_local_credential_host_or_label() {
        let h = map(&[
            ("host", "127.0.0.1:8787"),
            ("authorization", "Bearer local-token-aaaaaaaa"),
            ("x-sunopoll-label", "album 3"),
            ("expect", "100-continue"),
            ("accept-encoding", "gzip"),
            ("user-agent", "suno-easy"),
        ]);
        let key = ApiKey::new("sk-real-key").expect("key");
        let label = HeaderName::from_static("x-sunopoll-label");
        let out = upstream_headers(&h, &key, Some(&label), true);
        assert_eq!(out["authorization"], "Bearer sk-real-key");
        assert!(out["authorization"].is_sensitive());
        assert_eq!(out["accept-encoding"], "identity");
        assert_eq!(out["user-agent"], "suno-easy");
        for gone in ["host", "x-sunopoll-label", "expect"] {
            assert!(out.get(gone).is_none(), "{gone}");
        }
        let passed = upstream_headers(&h, &key, Some(&label), false);
        assert_eq!(passed["accept-encoding"], "gzip");
    }

    #[test]
    fn the_request_target_goes_under_the_accounts_root() {
        let base = url::Url::parse("https://api.sunoapi.org/").expect("url");
        assert_eq!(
            upstream_url(&base, "/api/v1/generate/record-info?taskId=abc")
                .expect("url")
                .as_str(),
            "https://api.sunoapi.org/api/v1/generate/record-info?taskId=abc"
        );
        let prefixed = url::Url::parse("http://127.0.0.1:9/prefix/").expect("url");
        assert_eq!(
            upstream_url(&prefixed, "/api/v1/generate")
                .expect("url")
                .as_str(),
            "http://127.0.0.1:9/prefix/api/v1/generate"
        );
    }
}
