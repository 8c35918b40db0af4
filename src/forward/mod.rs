//! Forwarding's parts: the [`Router`] that decides, when events are stored, which local handlers
//! get them; the Standard Webhooks headers and their signature ([`sign()`]); and one HTTP
//! attempt ([`attempt::attempt`]). The delivery loop itself (due rows in order per task and
//! target, limits, retries) is the deliver job, `crate::jobs::deliver`.
//!
//! Requests follow the Standard Webhooks spec: `webhook-id` (stable per event and target, the
//! same on every retry and replay), `webhook-timestamp`, and with a secret `webhook-signature`
//! (`v1,` + base64 HMAC-SHA256 over `id.timestamp.body`). The id itself is the store's
//! ([`crate::store::webhook_id`]): it names an outbox row.

pub mod attempt;
pub mod router;
pub mod sign;

pub use attempt::{AttemptResult, Attempted};
pub use router::Router;
pub use sign::sign;
