//! The Suno API as sunopoll sees it: the envelope every details endpoint shares and the pure
//! [`classify`] of one answer into an [`Outcome`] ([`envelope`]), the HTTP [`ApiClient`] and
//! the key it never prints ([`client`]), and the task [`families`] behind one [`Family`] seam.
//!
//! Arrows point down: `envelope` reads the JSON and hands `data` to the family; `client` does the
//! I/O and calls `envelope`; nothing here knows about tasks, the store or the schedule.

pub mod client;
pub mod envelope;
pub mod families;

pub use client::{
    ApiClient, ApiKey, MAX_BODY_BYTES, MIN_REDACTED, REDACTED, RootsSource, parse_retry_after,
    redact, redact_url, tls_roots, transport_cause, with_tls_roots,
};
pub use envelope::{
    Answer, FAILURE_CODES, MAX_RETRY_AFTER, Notes, Outcome, classify, failure_code, passable_url,
    read_answer,
};
pub use families::Family;

/// Shortens `s` for a log line and makes it printable: see [`crate::logging::clip`].
pub use crate::logging::clip;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_escapes_control_characters() {
        assert_eq!(clip("a\nb\rc", 10), "a\\nb\\rc");
        assert_eq!(clip("abcdef", 3), "abc…");
    }
}
