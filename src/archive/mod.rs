//! The asset archive: keeping every file a finished task leaves behind before the API deletes
//! it (14–15 days after the task ends), once, verified, and through any crash.
//!
//! - [`assets`]: which files a `complete` body names, and their local names (pure).
//! - [`download`]: one file into `<dir>/<task_id>/<name>`: streamed to a `.part`, hashed as it
//!   goes, resumed with `Range` + `If-Range` (a 200 to a range restarts from zero, never
//!   appends), fsynced, renamed into place, directory fsynced.
//! - [`hosts`]: which asset hosts may be fetched (no loopback, private or link-local address
//!   unless `allow-hosts` names it).
//! - [`manifest`]: `<dir>/<task_id>/manifest.json`, written atomically once every file is kept.
//! - [`notice`]: the body of the `archived` notification, sent once every file is kept.
//! - [`sink`]: where kept files end up: the directory, or an S3-compatible bucket.
//!
//! The durable part — which files are due, their tries and states — is the store's
//! (`archive_files`), and the job that works through them is [`crate::jobs::archive`].

pub mod assets;
pub mod download;
pub mod hosts;
pub mod manifest;
pub mod notice;
pub mod sink;

pub use assets::{AssetFile, AssetSource, files_for, files_of_events};
