//! Which files a finished task leaves behind, read from its `complete` callback body. Pure: a
//! family name and a body in, a list of [`AssetFile`]s out, each with the predictable local
//! name it is kept under in the task's directory.
//!
//! Per family (see `../shared/api/families.md` for where each body keeps its URLs): music —
//! `audio_url`, `source_audio_url`, `image_url` and `source_image_url` of every track (stream
//! URLs are not files); wav — `audioWavUrl`; stems — every `*_url` that is set; mp4 —
//! `video_url`; cover — every image; midi and lyrics — the body itself, as JSON, since there
//! is no file to fetch.

use serde_json::Value;

use crate::events::{NewEvent, Stage};

pub use crate::store::{AssetFile, AssetSource};

/// The files to keep for a task of family `kind` that ended with the `complete` body `body`.
/// An unknown family keeps nothing (it is logged by the caller, not guessed at).
pub fn files_for(kind: &str, body: &Value) -> Vec<AssetFile> {
    let data = &body["data"];
    let mut out = Files::default();
    match kind {
        "music" => {
            for track in data["data"].as_array().into_iter().flatten() {
                let id = track["id"].as_str().map(sanitize).filter(|s| !s.is_empty());
                let stem = id.clone().unwrap_or_else(|| "track".to_owned());
                for (field, kind, prefix, fallback) in [
                    ("audio_url", "audio", "", "mp3"),
                    ("source_audio_url", "source_audio", "source_", "mp3"),
                    ("image_url", "image", "", "jpeg"),
                    ("source_image_url", "source_image", "source_", "jpeg"),
                ] {
                    if let Some(url) = present(&track[field]) {
                        let name = format!("{prefix}{stem}.{}", extension(url, fallback));
                        out.push(name, kind, id.clone(), url);
                    }
                }
            }
        }
        "wav" => {
            if let Some(url) = present(&data["audioWavUrl"]) {
                out.push(format!("audio.{}", extension(url, "wav")), "wav", None, url);
            }
        }
        "stems" => {
            let info = data
                .get("vocal_removal_info")
                .or_else(|| data.get("vocal_separation_info"));
            for (key, value) in info.and_then(Value::as_object).into_iter().flatten() {
                let Some(stem) = key.strip_suffix("_url") else {
                    continue;
                };
                if let Some(url) = present(value) {
                    let name = format!("{}.{}", sanitize(stem), extension(url, "mp3"));
                    out.push(name, "stem", None, url);
                }
            }
        }
        "mp4" => {
            if let Some(url) = present(&data["video_url"]) {
                out.push(
                    format!("video.{}", extension(url, "mp4")),
                    "video",
                    None,
                    url,
                );
            }
        }
        "cover" => {
            let images = data["images"].as_array().into_iter().flatten();
            for (i, url) in images.filter_map(present).enumerate() {
                let name = format!("cover_{}.{}", i + 1, extension(url, "png"));
                out.push(name, "cover", None, url);
            }
        }
        "midi" | "lyrics" => {
            let text = serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string());
            out.0.push(AssetFile {
                name: format!("{kind}.json"),
                kind: "result".to_owned(),
                audio_id: None,
                source: AssetSource::Inline(text),
            });
        }
        _ => {}
    }
    out.0
}

/// The files named by the `complete` event among `events` (none without one), for a task of
/// family `kind`. A body that is not JSON names none.
pub fn files_of_events(kind: &str, events: &[NewEvent]) -> Vec<AssetFile> {
    events
        .iter()
        .filter(|e| e.stage == Stage::Complete)
        .filter_map(|e| serde_json::from_str::<Value>(&e.body).ok())
        .flat_map(|body| files_for(kind, &body))
        .collect()
}

/// The list being built; names stay unique per task.
#[derive(Default)]
struct Files(Vec<AssetFile>);

impl Files {
    fn push(&mut self, name: String, kind: &str, audio_id: Option<String>, url: &str) {
        // Two URLs of one task with the same local name (an image and a cover without
        // extensions, a track listed twice): the later one gets its kind in front.
        let mut name = name;
        while self.0.iter().any(|f| f.name == name) {
            name = format!("{kind}_{name}");
        }
        if self.0.iter().any(|f| f.url() == Some(url)) {
            return; // the same file listed twice is kept once
        }
        self.0.push(AssetFile {
            name,
            kind: kind.to_owned(),
            audio_id,
            source: AssetSource::Url(url.to_owned()),
        });
    }
}

/// A URL that is set: missing, `null`, `""` and blank are all absent.
fn present(v: &Value) -> Option<&str> {
    v.as_str().map(str::trim).filter(|s| !s.is_empty())
}

/// Only `[A-Za-z0-9._-]`, no leading dot (so never `..` or a hidden file), at most 100 chars.
pub fn sanitize(s: &str) -> String {
    let kept: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let kept = kept.replace("..", "_");
    kept.trim_start_matches('.').chars().take(100).collect()
}

/// The extension of the URL's last path segment (lowercase letters and digits, 1–8 of them),
/// or `fallback`.
fn extension(url: &str, fallback: &str) -> String {
    let path = url::Url::parse(url)
        .map(|u| u.path().to_owned())
        .unwrap_or_default();
    let last = path.rsplit('/').next().unwrap_or("");
    last.rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .filter(|e| (1..=8).contains(&e.len()) && e.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or_else(|| fallback.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_slice(&std::fs::read(&path).expect(&path)).expect("json")
    }

    fn names(files: &[AssetFile]) -> Vec<&str> {
        files.iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn music_keeps_four_files_per_track_and_no_stream() {
        let files = files_for("music", &fixture("callback.complete.json"));
        let a = "5d1f0c3a-8e2b-4f6d-9a7c-2b3e4f5a6b7c";
        let b = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b";
        assert_eq!(
            names(&files),
            vec![
                format!("{a}.mp3"),
                format!("source_{a}.mp3"),
                format!("{a}.jpeg"),
                format!("source_{a}.jpeg"),
                format!("{b}.mp3"),
                format!("source_{b}.mp3"),
                format!("{b}.jpeg"),
                format!("source_{b}.jpeg"),
            ]
        );
        assert!(
            files
                .iter()
                .all(|f| !f.url().unwrap_or("").contains("stream"))
        );
        assert_eq!(files[0].audio_id.as_deref(), Some(a));
        assert_eq!(files[0].kind, "audio");
        assert_eq!(
            files[0].url(),
            Some("https://files.example.com/r/0c4e2b7f9a1d4c3e8b6f5a2d1e0c9b8a.mp3")
        );
        assert_eq!(files[3].kind, "source_image");
    }

    #[test]
    fn each_family_names_its_files() {
        let wav = files_for("wav", &fixture("families/wav.callback.complete.json"));
        assert_eq!(names(&wav), ["audio.wav"]);
        let stems = files_for("stems", &fixture("families/stems.callback.complete.json"));
        assert_eq!(
            names(&stems),
            ["instrumental.mp3", "vocal.mp3"],
            "origin_url \"\" is absent"
        );
        let kie = files_for(
            "stems",
            &fixture("families/stems.callback.complete.kie.json"),
        );
        assert_eq!(names(&kie), ["instrumental.mp3", "vocal.mp3"]);
        let split = files_for(
            "stems",
            &fixture("families/stems.callback.complete.split_stem.json"),
        );
        assert_eq!(split.len(), 12);
        assert!(names(&split).contains(&"backing_vocals.mp3"));
        let mp4 = files_for("mp4", &fixture("families/mp4.callback.complete.json"));
        assert_eq!(names(&mp4), ["video.mp4"]);
        let cover = files_for("cover", &fixture("families/cover.callback.complete.json"));
        assert_eq!(names(&cover), ["cover_1.png", "cover_2.png"]);
        for kind in ["midi", "lyrics"] {
            let body = fixture(&format!("families/{kind}.callback.complete.json"));
            let files = files_for(kind, &body);
            assert_eq!(names(&files), [format!("{kind}.json")]);
            let AssetSource::Inline(text) = &files[0].source else {
                panic!("{kind} is written from the body");
            };
            let back: Value = serde_json::from_str(text).expect("json");
            assert_eq!(back, body, "the result itself");
        }
        assert!(files_for("unknown", &fixture("callback.complete.json")).is_empty());
    }

    #[test]
    fn a_kept_result_has_every_number_as_the_body_wrote_it() {
        // The stored body is minified; the kept file is pretty, with the same tokens.
        let text = String::from_utf8(
            std::fs::read(format!(
                "{}/tests/fixtures/families/midi.callback.complete.numbers.json",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("fixture"),
        )
        .expect("utf8");
        let stored = serde_json::from_str::<Value>(&text)
            .expect("json")
            .to_string();
        let events = [NewEvent {
            stage: Stage::Complete,
            code: 200,
            body: stored,
            tracks: 2,
            filled: false,
        }];
        let files = files_of_events("midi", &events);
        let AssetSource::Inline(kept) = &files[0].source else {
            panic!("midi is written from the body");
        };
        for token in [
            "0.18229166666666666",
            "0.19270833333333334",
            "0.10000000000000001",
            "1.50",
            "-0.0",
            "18446744073709551616",
            "-123456789012345678901234567890",
            "2.2250738585072011e-308",
        ] {
            assert!(kept.contains(token), "{token} kept as written:\n{kept}");
        }
        assert_eq!(kept.matches("0.18229166666666666").count(), 2);
    }

    #[test]
    fn names_never_leave_the_task_directory() {
        let body = serde_json::json!({"data": {"data": [
            {"id": "../../etc/passwd", "audio_url": "https://x.example.com/a/b.mp3/..%2f..",
             "image_url": "https://x.example.com/i", "source_audio_url": "",
             "source_image_url": null},
            {"id": "/abs", "audio_url": "https://x.example.com/evil.m/p3?x=.sh"},
        ]}});
        let files = files_for("music", &body);
        assert_eq!(files.len(), 3);
        for f in &files {
            assert!(
                !f.name.contains('/') && !f.name.contains(".."),
                "{}",
                f.name
            );
            assert!(!f.name.starts_with('.'), "{}", f.name);
        }
        assert_eq!(
            files[1].name, "____etc_passwd.jpeg",
            "no extension: the kind's own"
        );
        assert_eq!(sanitize("a/../b"), "a___b");
        assert_eq!(sanitize("..x"), "_x");
        assert_eq!(extension("https://h/x.MP3?q=1", "bin"), "mp3");
        assert_eq!(extension("not a url", "bin"), "bin");
    }

    #[test]
    fn a_repeated_name_or_url_stays_unique() {
        let body = serde_json::json!({"data": {"data": [
            {"id": "t", "audio_url": "https://h/x", "image_url": "https://h/y.mp3"},
            {"id": "t", "audio_url": "https://h/x"},
        ]}});
        let files = files_for("music", &body);
        assert_eq!(names(&files), ["t.mp3", "image_t.mp3"]);
    }
}
