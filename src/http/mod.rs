//! The daemon's HTTP faces share this: one server loop, one response body type, capped and
//! timed request bodies, and the loopback checks ([`guard`]).
//!
//! `metrics` serves `/metrics` on it; the API stand-in and the web page are meant to be built on
//! the same pieces rather than on copies. A face supplies only its handler, a function of the
//! request and the peer's address, and its [`Limits`]; the loop ([`serve`]) owns accepting,
//! the connection cap, the header timeout, keep-alive and shutdown.
//!
//! Refusals are values ([`Refusal`]): an HTTP status and a one-line reason, answered and logged
//! the same way by every face.

mod body;
pub mod guard;
mod server;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

pub use body::{Body, event, event_stream, read_body};
pub use server::{Limits, serve};

/// A plain-text answer: `status`, `text` as the body, `text/plain; charset=utf-8`.
pub fn text(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Body::full(text.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // A browser must not guess that an error message is HTML.
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// A request a face will not serve: the status to answer with and a one-line reason, which is
/// both the answer's body and what the log says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 403, 408, 413, …
    pub status: StatusCode,
    /// One line, no trailing newline; quotes whatever the client sent with `{:?}`.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `status` and `reason`.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    /// The answer: the reason as plain text, and `Connection: close` (the rest of a refused
    /// request, a body included, is not read, so the connection cannot carry another).
    pub fn response(&self) -> Response<Body> {
        let mut r = text(self.status, format!("{}\n", self.reason));
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }

    /// Logs the refusal for `face` (`"metrics"`, `"proxy"`, `"web"`): at warn for a 403 (a
    /// foreign `Host` or a cross-site request is someone trying something), at info otherwise
    /// (a body too large or too slow is a client's mistake).
    pub fn log(&self, face: &'static str, peer: SocketAddr) {
        let status = self.status.as_u16();
        if self.status == StatusCode::FORBIDDEN {
            tracing::warn!(face, %peer, status, reason = %self.reason, "{face}: request refused");
        } else {
            tracing::info!(face, %peer, status, reason = %self.reason, "{face}: request refused");
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.reason)
    }
}
