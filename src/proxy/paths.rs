//! The path table (`../shared/api/submissions.md` §2 and §3): which calls create a task of which
//! family, which are known to create nothing to poll, and which are not understood. Pure.

use hyper::Method;

use crate::api::families::Kind;

/// What one request is, by its method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A submission that creates one task of this family when the API accepts it.
    Creates(Kind),
    /// A call the API answers without creating anything to poll; the reason, for logs.
    Known(&'static str),
    /// A path nobody here knows: passed through, tracked nothing, logged once.
    Unknown,
}

impl Route {
    /// True for a submission.
    pub fn creates(self) -> bool {
        matches!(self, Route::Creates(_))
    }
}

/// The submissions (`POST`), each with the family its task belongs to.
pub const SUBMISSIONS: &[(&str, Kind)] = &[
    ("/api/v1/generate", Kind::Music),
    ("/api/v1/generate/extend", Kind::Music),
    ("/api/v1/generate/upload-cover", Kind::Music),
    ("/api/v1/generate/upload-extend", Kind::Music),
    ("/api/v1/generate/add-instrumental", Kind::Music),
    ("/api/v1/generate/add-vocals", Kind::Music),
    ("/api/v1/generate/replace-section", Kind::Music),
    ("/api/v1/generate/mashup", Kind::Music),
    ("/api/v1/generate/sounds", Kind::Music),
    ("/api/v1/lyrics", Kind::Lyrics),
    ("/api/v1/wav/generate", Kind::Wav),
    ("/api/v1/vocal-removal/generate", Kind::Stems),
    ("/api/v1/midi/generate", Kind::Midi),
    ("/api/v1/mp4/generate", Kind::Mp4),
    ("/api/v1/suno/cover/generate", Kind::Cover),
];

/// Calls known to create nothing to poll, by exact path (any method).
const KNOWN: &[(&str, &str)] = &[
    ("/api/v1/generate/credit", "read-only"),
    ("/api/v1/chat/credit", "read-only"),
    ("/api/v1/generate/generate-persona", "synchronous, no task"),
    (
        "/api/v1/generate/get-timestamped-lyrics",
        "synchronous, no task",
    ),
    (
        "/api/v1/style/generate",
        "synchronous: its taskId comes with the result",
    ),
];

/// The route of `method` on `path` (the request target's path, without its query).
pub fn route(method: &Method, path: &str) -> Route {
    let path = merge_slashes(path);
    let path = path.as_str();
    if method == Method::POST
        && let Some((_, kind)) = SUBMISSIONS.iter().find(|(p, _)| *p == path)
    {
        return Route::Creates(*kind);
    }
    if let Some((_, why)) = KNOWN.iter().find(|(p, _)| *p == path) {
        return Route::Known(why);
    }
    if path.ends_with("/record-info") || path.ends_with("/validate-info") {
        return Route::Known("read-only");
    }
    if path.starts_with("/api/v1/voice/") {
        return Route::Known("voice family: not tracked");
    }
    if path.starts_with("/api/file-") {
        return Route::Known("an upload, which belongs on the upload host");
    }
    if SUBMISSIONS.iter().any(|(p, _)| *p == path) {
        return Route::Known("not a POST, so not a submission");
    }
    Route::Unknown
}

/// `path` with runs of `/` made one: a client whose base URL ends in `/` asks for
/// `//api/v1/generate`, which servers commonly take as the same endpoint, so it must be
/// recognised as the same submission.
fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_submission_path_gives_its_family_and_only_on_post() {
        for (path, kind) in SUBMISSIONS {
            assert_eq!(route(&Method::POST, path), Route::Creates(*kind), "{path}");
            assert!(
                !route(&Method::GET, path).creates(),
                "GET {path} creates nothing"
            );
        }
        assert_eq!(
            route(&Method::POST, "/api/v1/suno/cover/generate"),
            Route::Creates(Kind::Cover)
        );
        assert_eq!(
            route(&Method::POST, "/api/v1/vocal-removal/generate"),
            Route::Creates(Kind::Stems)
        );
    }

    #[test]
    fn read_only_synchronous_voice_and_upload_calls_create_nothing() {
        for (method, path) in [
            (Method::GET, "/api/v1/generate/credit"),
            (Method::GET, "/api/v1/chat/credit"),
            (Method::GET, "/api/v1/generate/record-info"),
            (Method::GET, "/api/v1/suno/cover/record-info"),
            (Method::GET, "/api/v1/voice/validate-info"),
            (Method::POST, "/api/v1/generate/generate-persona"),
            (Method::POST, "/api/v1/generate/get-timestamped-lyrics"),
            (Method::POST, "/api/v1/style/generate"),
            (Method::POST, "/api/v1/voice/generate"),
            (Method::POST, "/api/v1/voice/regenerate"),
            (Method::POST, "/api/file-stream-upload"),
        ] {
            assert!(
                matches!(route(&method, path), Route::Known(_)),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn other_paths_are_not_understood_and_slashes_are_merged() {
        for path in [
            "/api/v1/jobs/createTask",
            "/",
            "/api/v1/generate/",
            "/api/v2/generate",
        ] {
            assert_eq!(route(&Method::POST, path), Route::Unknown, "{path}");
        }
        assert_eq!(
            route(&Method::POST, "//api/v1//generate"),
            Route::Creates(Kind::Music)
        );
    }
}
