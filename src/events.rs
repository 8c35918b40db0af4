//! What one event is, shared by every task family and by the store: its [`Stage`] and the
//! [`NewEvent`] ready to be stored, byte for byte. The mapping from an API answer to events is
//! each family's own (see `crate::api::families`); only the standard `error` body, which
//! music-shaped tasks send and sunopoll itself sends for a rejected or timed-out music task,
//! is built here by [`error_event`].

use std::fmt;

use serde::Serialize;

/// A stage of an event. The four callback stages come in the order a task goes through them;
/// [`Stage::Archived`] is sunopoll's own notification, after them, and never a task's stage.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Text (lyrics) generated.
    Text,
    /// First track generated.
    First,
    /// All tracks generated. Terminal.
    Complete,
    /// The task failed. Terminal.
    Error,
    /// Every file of the task is kept (sunopoll's own notification, opt-in per target): never
    /// stored as a task's stage, never a callback body.
    Archived,
}

impl Stage {
    /// The callback stages, in order: what a target gets unless its `stages` say otherwise.
    pub const ALL: [Stage; 4] = [Stage::Text, Stage::First, Stage::Complete, Stage::Error];

    /// Every stage an event can have: the callback stages and `archived`.
    pub const EVERY: [Stage; 5] = [
        Stage::Text,
        Stage::First,
        Stage::Complete,
        Stage::Error,
        Stage::Archived,
    ];

    /// The callback's `callbackType` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Text => "text",
            Stage::First => "first",
            Stage::Complete => "complete",
            Stage::Error => "error",
            Stage::Archived => "archived",
        }
    }

    /// Parses a stage's spelling (a `callbackType`, or `archived`).
    pub fn parse(s: &str) -> Option<Stage> {
        Stage::EVERY.into_iter().find(|st| st.as_str() == s)
    }

    /// True for the stages after which a task is never polled again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Stage::Complete | Stage::Error)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event ready to be stored: its stage, callback `code`, and exact JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Which stage.
    pub stage: Stage,
    /// The callback's `code`.
    pub code: i64,
    /// The callback body, serialised once; these bytes are stored and forwarded as they are.
    pub body: String,
    /// How many tracks `data.data` carries.
    pub tracks: usize,
    /// True when this stage was not seen by a poll but filled in before a later one.
    pub filled: bool,
}

/// An `error` event in the standard callback shape (`{code, msg, data: {callbackType:
/// "error", task_id, data: []}}`), with the given code and message and no tracks. Used for
/// failure statuses, for a task the API keeps rejecting, and for a task past its deadline.
pub fn error_event(task_id: &str, code: i64, msg: &str) -> NewEvent {
    #[derive(Serialize)]
    struct Body<'a> {
        code: i64,
        msg: &'a str,
        data: Data<'a>,
    }
    #[derive(Serialize)]
    struct Data<'a> {
        #[serde(rename = "callbackType")]
        callback_type: &'static str,
        task_id: &'a str,
        data: [(); 0],
    }
    let body = Body {
        code,
        msg,
        data: Data {
            callback_type: Stage::Error.as_str(),
            task_id,
            data: [],
        },
    };
    NewEvent {
        stage: Stage::Error,
        code,
        body: serde_json::to_string(&body).expect("an error body always serialises"),
        tracks: 0,
        filled: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_round_trip() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(s));
        }
        assert_eq!(Stage::parse("done"), None);
        assert!(Stage::Text < Stage::First && Stage::First < Stage::Complete);
    }

    #[test]
    fn archived_parses_but_is_no_callback_stage() {
        assert_eq!(Stage::parse("archived"), Some(Stage::Archived));
        assert!(
            !Stage::ALL.contains(&Stage::Archived),
            "not a default stage"
        );
        assert!(Stage::Complete < Stage::Archived && Stage::Error < Stage::Archived);
        assert!(!Stage::Archived.is_terminal());
    }

    #[test]
    fn the_error_body_has_the_callback_shape() {
        let ev = error_event("t1", 408, "Timed out");
        assert_eq!(
            ev.body,
            r#"{"code":408,"msg":"Timed out","data":{"callbackType":"error","task_id":"t1","data":[]}}"#
        );
        assert_eq!(
            (ev.stage, ev.code, ev.tracks, ev.filled),
            (Stage::Error, 408, 0, false)
        );
    }
}
