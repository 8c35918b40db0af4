//! sunopoll stands in for the Suno API's HTTP callbacks on hosts that cannot receive them.
//!
//! Applications hand it task IDs over a local Unix socket; it keeps them in a durable SQLite
//! queue, polls the API's record-info endpoint, and turns what it sees into exactly the
//! `text` / `first` / `complete` / `error` events a callback would have delivered.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, defaults, and where the API key comes from.
//! - [`api`]: the details client, the pure [`api::classify`] of its answers, and the task
//!   families behind one [`api::Family`] seam ([`api::families`]: music, and the
//!   single-callback lyrics, wav, stems, midi, mp4 and cover adapters).
//! - [`archive`]: keeping the files finished tasks leave behind, before the API deletes them.
//! - [`events`]: what one event is (its stage and stored body), shared with the store.
//! - [`json`]: JSON numbers as they were written (every token the API sent is passed on).
//! - [`store`]: the durable queue behind the [`store::Backend`] seam; SQLite (one thread,
//!   group commit) is its backend.
//! - [`metrics`]: Prometheus metrics and their endpoint.
//! - [`http`]: what the daemon's HTTP faces share: the server loop and its limits, one body
//!   type (whole or streamed), capped request bodies, and the loopback checks ([`http::guard`]).
//! - [`jobs`]: the one durable job loop; polls ([`jobs::poll`], with the global pause and the
//!   pure [`jobs::poll::decide`]) and deliveries ([`jobs::deliver`]) run on it.
//! - [`control`]: the Unix socket server; [`protocol`]: its requests and answers.
//! - [`client`]: the CLI side of the socket; [`cli`]: the command line.
//! - [`forward`]: routing events to local handlers, signing, one HTTP attempt.
//! - [`housekeeping`]: pruning on a cron schedule.
//! - [`daemon`]: wiring it all together, start-up and shutdown.
//! - [`systemd`]: what systemd passes in (notify socket, watchdog, listening socket) and the
//!   readiness, status and watchdog messages sent back; [`logging`]: stderr or the journal.
//! - [`tls`]: the one rustls crypto provider every TLS client shares.

#![forbid(unsafe_code)]

pub mod api;
pub mod archive;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod events;
pub mod forward;
pub mod housekeeping;
pub mod http;
pub mod jobs;
pub mod json;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod store;
pub mod systemd;
/// Test helpers, left out of the daemon (the `testing` feature; see `Cargo.toml`).
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod testing;
pub mod tls;

/// This build's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `User-Agent` of every request sunopoll makes.
pub const USER_AGENT: &str = concat!("sunopoll/", env!("CARGO_PKG_VERSION"));
