//! From the API's answer to a tracked task: whether a submission created a task (read from the
//! answer's `code` and `data.taskId`, nothing else; the bytes passed back are never re-written),
//! the `callBackUrl` it was submitted with, and the `add` that tracks it, the same call the
//! control socket makes, committed before the answer goes back.

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::{CONTENT_ENCODING, HeaderMap};
use serde_json::Value;

use crate::api::families::Kind;
use crate::control::Control;
use crate::protocol::{AddRequest, AddResponse, ErrorBody, check_callback_url};

/// What a submission's answer says about the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// A task was created (or, for the cover family's repeat, already exists): track it.
    Task(String),
    /// Nothing was created: a refusal, an error, a throttle.
    Nothing,
    /// A 2xx answer that cannot be read (not JSON, compressed); the reason, for the warning.
    Unreadable(String),
}

/// Reads the answer of a submission of `kind`: HTTP 2xx, `code` 200 and a non-empty string
/// `data.taskId` is a created task; for `cover`, `code` 400 with a `taskId` names the task an
/// earlier identical submission created (`../shared/api/submissions.md` §4.1). `code` may be
/// an integer or a digit string. Pure.
pub fn created(kind: Kind, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Created {
    if !status.is_success() {
        return Created::Nothing;
    }
    if let Some(enc) = headers.get(CONTENT_ENCODING)
        && !enc.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Created::Unreadable(format!(
            "the answer is compressed ({})",
            String::from_utf8_lossy(enc.as_bytes())
        ));
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Created::Unreadable(format!("the answer is not JSON: {e}")),
    };
    let code = match &v["code"] {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let task = v["data"]["taskId"].as_str().filter(|t| !t.is_empty());
    match (code, task) {
        (Some(200), Some(t)) => Created::Task(t.to_owned()),
        (Some(400), Some(t)) if kind == Kind::Cover => Created::Task(t.to_owned()),
        _ => Created::Nothing,
    }
}

/// The top-level `callBackUrl` of a submission's JSON body, if it has one.
pub fn submitted_callback_url(body: &[u8]) -> Option<String> {
    // Only the one field is read; the body itself is forwarded as it came.
    #[derive(serde::Deserialize)]
    struct Submitted {
        #[serde(rename = "callBackUrl")]
        callback: Option<Value>,
    }
    let s: Submitted = serde_json::from_slice(body).ok()?;
    s.callback?.as_str().map(str::to_owned)
}

/// Where the task's events go besides the configured targets: the submitted `callBackUrl`
/// when `forward.allow-hosts` allows it (as for `add --callback-url`); otherwise none, and the
/// reason (a placeholder or public URL means "no per-task handler").
pub fn callback_for(ctx: &Control, submitted: Option<String>) -> (Option<String>, Option<String>) {
    let Some(url) = submitted else {
        return (None, None);
    };
    if let Err(e) = check_callback_url(&url) {
        return (None, Some(e.message));
    }
    if !ctx.router.submitted_url_allowed(&url) {
        return (
            None,
            Some(format!(
                "its host is not in forward.allow-hosts ({})",
                ctx.router.config().allow_hosts.join(", ")
            )),
        );
    }
    (Some(url), None)
}

/// Tracks `task_id` of `kind` on `account` through the control socket's own `add`: durable
/// (committed) when this returns `Ok`. An ID already tracked is left as it is (the cover
/// family's repeat names an existing task).
pub async fn track(
    ctx: &Control,
    task_id: String,
    kind: Kind,
    account: &str,
    callback_url: Option<String>,
    label: Option<String>,
) -> Result<AddResponse, ErrorBody> {
    crate::control::add(
        AddRequest {
            task_ids: vec![task_id],
            callback_url,
            label,
            again: false,
            kind: Some(kind.as_str().to_owned()),
            account: Some(account.to_owned()),
        },
        ctx,
    )
    .await
}

/// The body as it came, for the hash an ambiguous submission is logged with.
pub fn body_sha256(body: &Bytes) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn read(kind: Kind, status: u16, body: &str) -> Created {
        created(
            kind,
            StatusCode::from_u16(status).expect("status"),
            &HeaderMap::new(),
            body.as_bytes(),
        )
    }

    #[test]
    fn a_task_is_created_only_by_a_2xx_code_200_answer_with_a_task_id() {
        let ok = r#"{"code":200,"msg":"success","data":{"taskId":"5c79abc"}}"#;
        assert_eq!(read(Kind::Music, 200, ok), Created::Task("5c79abc".into()));
        assert_eq!(
            read(Kind::Wav, 200, r#"{"code":"200","data":{"taskId":"t1"}}"#),
            Created::Task("t1".into())
        );
        assert_eq!(read(Kind::Music, 500, ok), Created::Nothing);
        for refused in [
            r#"{"code":430,"msg":"Your call frequency is too high.","data":null}"#,
            r#"{"code":400,"msg":"Please enter callBackUrl.","data":null}"#,
            r#"{"code":200,"msg":"success","data":{"taskId":""}}"#,
            r#"{"code":200,"msg":"success","data":{"taskId":7}}"#,
            r#"{"code":200,"msg":"success","data":null}"#,
            r#"{"code":409,"msg":"exists","data":{"taskId":"t1"}}"#,
        ] {
            assert_eq!(
                read(Kind::Music, 200, refused),
                Created::Nothing,
                "{refused}"
            );
        }
        assert!(matches!(
            read(Kind::Music, 200, "<html>"),
            Created::Unreadable(_)
        ));
    }

    #[test]
    fn the_cover_repeat_names_the_existing_task_and_no_other_family_does() {
        let repeat = r#"{"code":400,"msg":"already generated","data":{"taskId":"c0ffee"}}"#;
        assert_eq!(
            read(Kind::Cover, 200, repeat),
            Created::Task("c0ffee".into())
        );
        assert_eq!(read(Kind::Music, 200, repeat), Created::Nothing);
    }

    #[test]
    fn a_compressed_answer_is_unreadable_not_a_refusal() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(matches!(
            created(Kind::Music, StatusCode::OK, &h, b"\x1f\x8b"),
            Created::Unreadable(_)
        ));
    }

    #[test]
    fn the_callback_url_is_read_from_the_top_level_only() {
        let body = br#"{"prompt":"x","callBackUrl":"http://127.0.0.1:3000/cb","data":{"callBackUrl":"no"}}"#;
        assert_eq!(
            submitted_callback_url(body).as_deref(),
            Some("http://127.0.0.1:3000/cb")
        );
        assert_eq!(submitted_callback_url(br#"{"callBackUrl":5}"#), None);
        assert_eq!(submitted_callback_url(b"not json"), None);
        assert_eq!(submitted_callback_url(br#"[1]"#), None);
    }

    #[test]
    fn the_body_hash_is_sha256_hex() {
        assert_eq!(
            body_sha256(&Bytes::from_static(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
