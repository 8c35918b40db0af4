//! The body of the `archived` notification: sunopoll's own, sent (to targets that list
//! `archived` in their `stages`) once every file of a task is kept, so a handler can read the
//! files where they are instead of downloading them. Its `type` says it is no callback body.

use serde::Serialize;

use crate::api::families::Kind;
use crate::store::FileRecord;

/// The body's `type`: never a callback's `callbackType`, so no handler mistakes one for the
/// other.
pub const TYPE: &str = "sunopoll.archived";

/// One kept file in the body.
#[derive(Debug, Serialize)]
struct File<'a> {
    name: &'a str,
    kind: &'a str,
    audio_id: Option<&'a str>,
    url: Option<&'a str>,
    path: String,
    size: Option<u64>,
    sha256: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    kind_of_body: &'static str,
    task_id: &'a str,
    kind: &'a str,
    files: Vec<File<'a>>,
    manifest: String,
}

/// The body for `task` (of `kind`) and its kept `files`; `location` says where a file of the
/// task, by name, is kept (a local path, or an `s3://` URL). Pure.
pub fn body(
    task: &str,
    kind: Kind,
    files: &[FileRecord],
    location: impl Fn(&str) -> String,
) -> String {
    let body = Body {
        kind_of_body: TYPE,
        task_id: task,
        kind: kind.as_str(),
        files: files
            .iter()
            .map(|f| File {
                name: &f.name,
                kind: &f.kind,
                audio_id: f.audio_id.as_deref(),
                url: f.url.as_deref(),
                path: location(&f.name),
                size: f.size,
                sha256: f.sha256.as_deref(),
            })
            .collect(),
        manifest: location(super::manifest::MANIFEST),
    };
    serde_json::to_string(&body).expect("an archived body always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FileState;

    fn kept(name: &str, kind: &str, url: Option<&str>) -> FileRecord {
        FileRecord {
            name: name.into(),
            kind: kind.into(),
            audio_id: url.map(|_| "a1".into()),
            url: url.map(Into::into),
            state: FileState::Done,
            size: Some(3),
            sha256: Some(format!("{name}-hash")),
            attempts: 1,
            last_error: None,
            created_at: 0,
            done_at: Some(10),
        }
    }

    #[test]
    fn the_body_is_sunopolls_own_and_lists_every_file() {
        let files = [
            kept("a1.mp3", "audio", Some("https://h/a1.mp3")),
            kept("lyrics.txt", "result", None),
        ];
        let b = body("t1", Kind::Music, &files, |n| format!("/arch/t1/{n}"));
        assert_eq!(
            b,
            concat!(
                r#"{"type":"sunopoll.archived","task_id":"t1","kind":"music","files":["#,
                r#"{"name":"a1.mp3","kind":"audio","audio_id":"a1","url":"https://h/a1.mp3","#,
                r#""path":"/arch/t1/a1.mp3","size":3,"sha256":"a1.mp3-hash"},"#,
                r#"{"name":"lyrics.txt","kind":"result","audio_id":null,"url":null,"#,
                r#""path":"/arch/t1/lyrics.txt","size":3,"sha256":"lyrics.txt-hash"}],"#,
                r#""manifest":"/arch/t1/manifest.json"}"#
            )
        );
        let v: serde_json::Value = serde_json::from_str(&b).expect("json");
        assert!(
            v.get("data").is_none() && v.get("code").is_none(),
            "no callback shape"
        );
    }
}
