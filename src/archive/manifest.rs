//! `<dir>/<task_id>/manifest.json`: every kept file of one task — its kind, track id, original
//! URL, size, SHA-256 and when it was kept — written once all of them are kept, atomically
//! (part, fsync, rename, fsync dir), so a reader sees no manifest or a whole one.

use std::path::Path;

use serde::Serialize;

use crate::clock::format_utc;
use crate::store::FileRecord;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// One file in the manifest.
#[derive(Debug, Serialize)]
struct Entry<'a> {
    name: &'a str,
    kind: &'a str,
    audio_id: Option<&'a str>,
    url: Option<&'a str>,
    size: Option<u64>,
    sha256: Option<&'a str>,
    kept_at: Option<String>,
}

/// The manifest's text for `task`'s `files`. Pure.
pub fn render(task: &str, files: &[FileRecord]) -> String {
    let entries: Vec<Entry<'_>> = files
        .iter()
        .map(|f| Entry {
            name: &f.name,
            kind: &f.kind,
            audio_id: f.audio_id.as_deref(),
            url: f.url.as_deref(),
            size: f.size,
            sha256: f.sha256.as_deref(),
            kept_at: f.done_at.map(format_utc),
        })
        .collect();
    let doc = serde_json::json!({ "task_id": task, "files": entries });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Writes the manifest of `task` into `task_dir`.
pub async fn write(task_dir: &Path, task: &str, files: &[FileRecord]) -> std::io::Result<()> {
    let dest = task_dir.join(MANIFEST);
    super::download::write_inline(&dest, &render(task, files))
        .await
        .map(|_| ())
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileState;

    #[test]
    fn the_manifest_lists_every_file_with_its_hash() {
        let files = vec![FileRecord {
            name: "a.mp3".into(),
            kind: "audio".into(),
            audio_id: Some("a".into()),
            url: Some("https://h/a.mp3".into()),
            state: FileState::Done,
            size: Some(3),
            sha256: Some("abc".into()),
            attempts: 1,
            last_error: None,
            created_at: 0,
            done_at: Some(0),
        }];
        let v: serde_json::Value = serde_json::from_str(&render("t1", &files)).expect("json");
        assert_eq!(v["task_id"], "t1");
        assert_eq!(v["files"][0]["name"], "a.mp3");
        assert_eq!(v["files"][0]["sha256"], "abc");
        assert_eq!(v["files"][0]["size"], 3);
        assert_eq!(v["files"][0]["url"], "https://h/a.mp3");
        assert_eq!(v["files"][0]["kept_at"], "1970-01-01T00:00:00Z");
    }
}
