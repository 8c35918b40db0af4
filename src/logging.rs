//! Log output: human lines with timestamps on stderr. `RUST_LOG`, when set, overrides the
//! configured level (e.g. `RUST_LOG=sunopoll=debug`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber at `level` (error, warn, info, debug or trace). Safe to call
/// more than once; later calls do nothing.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
