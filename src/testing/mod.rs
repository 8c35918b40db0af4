//! Helpers shared by unit tests and integration tests. Compiled only into test builds (`cfg(test)`)
//! and where the `testing` feature is on (the integration tests and benches turn it on through
//! the crate's dev-dependency on itself), never into the daemon.

use std::path::PathBuf;

/// The path of a real external tool a test needs (promtool, pg_ctl, …), searched on `PATH` and
/// in the places Debian installs them. In CI (`CI` set) a missing tool fails the test: a check
/// that needs a real component never passes by skipping. Elsewhere the test says loudly on stderr
/// that it did not run, and returns `None`.
pub fn real_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    // PostgreSQL's server binaries live outside PATH on Debian.
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    if let Some(found) = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()) {
        return Some(found);
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{name} is not installed: .ci/run installs it, and CI never skips this test");
    }
    eprintln!(
        "NOT RUN: {name} is not installed here (.ci/run installs it); this check was skipped"
    );
    None
}

mod postgres;

pub use postgres::{PgCluster, postgres};
