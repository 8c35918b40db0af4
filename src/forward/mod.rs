//! Forwarding's parts: the [`Router`] that decides, when events are stored, which local handlers
//! get them; the Standard Webhooks headers and their signature ([`sign()`]); and one HTTP
//! attempt ([`attempt::attempt`]). The delivery loop itself (due rows in order per task and
//! target, limits, retries) is the deliver job, `crate::jobs::deliver`.
//!
//! Requests follow the Standard Webhooks spec: `webhook-id` (stable per event and target, the
//! same on every retry and replay), `webhook-timestamp`, and with a secret `webhook-signature`
//! (`v1,` + base64 HMAC-SHA256 over `id.timestamp.body`).

use sha2::{Digest, Sha256};

use crate::events::Stage;

pub mod attempt;
pub mod router;
pub mod sign;

pub use attempt::{AttemptResult, Attempted};
pub use router::Router;
pub use sign::sign;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_ids_are_stable_and_distinct_per_target() {
        let a = webhook_id("t1", Stage::First, "app");
        assert_eq!(a, webhook_id("t1", Stage::First, "app"));
        assert_ne!(a, webhook_id("t1", Stage::First, "other"));
        assert_ne!(a, webhook_id("t1", Stage::Complete, "app"));
        assert!(a.starts_with("msg_t1_first_"));
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
