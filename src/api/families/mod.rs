//! Task families behind one seam. Each family (music, lyrics, wav, stems, midi, mp4 and cover,
//! see `../shared/api/families.md`) has its own details endpoint, its own record
//! inside the shared envelope, and its own callback bodies. A [`Family`] says exactly those
//! things and nothing else: the envelope rules ([`crate::api::classify`]), the HTTP client and
//! the polling policy are the same for all of them.
//!
//! A family is a value, not only a type, so one that differs by provider flavour (sunoapi or
//! kie key spellings) carries its flavour, and a dispatching enum can stand for "the task's
//! family" once tasks record theirs. The six families that send one callback per task share
//! their record and status rules in [`common`].

use serde_json::Value;

use crate::events::{NewEvent, Stage};

pub mod common;
#[cfg(test)]
pub(crate) mod conformance;
pub mod cover;
pub mod lyrics;
pub mod midi;
pub mod mp4;
pub mod music;
pub mod stems;
pub mod wav;

/// The provider flavour of an account: which key spellings its callback bodies use where the
/// providers disagree (`../shared/api/families.md`: lyrics, stems, mp4). The paths are the
/// same on every provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// api.sunoapi.org's spellings.
    #[default]
    Sunoapi,
    /// api.kie.ai's (and its clone api.apikley.ru's) spellings.
    Kie,
}

impl Flavor {
    /// Both flavours.
    pub const ALL: [Flavor; 2] = [Flavor::Sunoapi, Flavor::Kie];

    /// The flavour's name as configuration spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Sunoapi => "sunoapi",
            Flavor::Kie => "kie",
        }
    }

    /// Reads a flavour's name.
    pub fn parse(s: &str) -> Option<Flavor> {
        Flavor::ALL.into_iter().find(|f| f.as_str() == s)
    }
}

/// A task's family as the store records it (the name lives in the store, which keeps it for
/// every task); the families are its adapters.
pub use crate::store::Kind;

/// Runs `$body` with `$f` bound to the adapter of kind `$kind` for flavour `$flavor`: one
/// monomorphised copy of `$body` per family, so the poll path stays generic over [`Family`]
/// and a new family is one more arm here.
#[macro_export]
macro_rules! with_family {
    ($kind:expr, $flavor:expr, |$f:ident| $body:expr) => {{
        use $crate::api::families as fam;
        let flavor: fam::Flavor = $flavor;
        let _ = flavor;
        match $kind {
            fam::Kind::Music => {
                let $f = fam::music::Music;
                $body
            }
            fam::Kind::Lyrics => {
                let $f = fam::lyrics::Lyrics(flavor);
                $body
            }
            fam::Kind::Wav => {
                let $f = fam::wav::Wav;
                $body
            }
            fam::Kind::Stems => {
                let $f = fam::stems::Stems(flavor);
                $body
            }
            fam::Kind::Midi => {
                let $f = fam::midi::Midi;
                $body
            }
            fam::Kind::Mp4 => {
                let $f = fam::mp4::Mp4(flavor);
                $body
            }
            fam::Kind::Cover => {
                let $f = fam::cover::Cover;
                $body
            }
        }
    }};
}

/// One task family: where its details are, how its record reads, and which events a record
/// means. Every method is pure.
pub trait Family {
    /// The parts of the details answer's `data` that the family uses.
    type Record;

    /// The family's name, as `add --kind` spells it and the metrics label it (`music`).
    fn name(&self) -> &'static str;

    /// The details endpoint, relative to the API's base URL (`api/v1/generate/record-info`).
    fn endpoint(&self) -> &'static str;

    /// The query key that carries the task id (`taskId`).
    fn task_id_key(&self) -> &'static str;

    /// Reads the envelope's `data`, leniently, or says why it cannot.
    fn parse(&self, data: &Value) -> Result<Self::Record, String>;

    /// The record's status in the API's spelling, as stored in the task's `last_status`.
    fn status<'r>(&self, record: &'r Self::Record) -> &'r str;

    /// True while the task is still running (pending, or a status nobody knows yet).
    fn is_running(&self, record: &Self::Record) -> bool;

    /// False for a status the family does not know (logged once, treated as running).
    fn is_known(&self, record: &Self::Record) -> bool;

    /// True when the record's status is behind `reached`, the last stage already emitted (the
    /// API contradicted itself; nothing is emitted, the operator hears of it).
    fn went_backwards(&self, record: &Self::Record, reached: Option<Stage>) -> bool;

    /// The callback URL the task was submitted with, if the record carries it.
    fn submitted_callback_url(&self, record: &Self::Record) -> Option<String>;

    /// The events due for `task_id`, whose last emitted stage is `reached`, now that the API
    /// answered `record`, in order, each with its exact callback body; with `fill_skipped`,
    /// stages the polls did not see come first. Empty when nothing new happened.
    fn events(
        &self,
        task_id: &str,
        reached: Option<Stage>,
        record: &Self::Record,
        fill_skipped: bool,
    ) -> Vec<NewEvent>;

    /// The family's failure event with `code` and `msg`, for the failures sunopoll itself
    /// decides (a task the API keeps rejecting, a task past its deadline).
    fn error_event(&self, task_id: &str, code: i64, msg: &str) -> NewEvent;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_names_round_trip() {
        for f in Flavor::ALL {
            assert_eq!(Flavor::parse(f.as_str()), Some(f));
        }
        assert_eq!(Flavor::parse("apikley"), None);
        assert_eq!(Flavor::default(), Flavor::Sunoapi);
    }

    #[test]
    fn kind_names_round_trip_and_each_kind_polls_its_own_family() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            for flavor in Flavor::ALL {
                let name = crate::with_family!(k, flavor, |f| f.name());
                assert_eq!(name, k.as_str(), "{k} dispatches to the {name} adapter");
            }
        }
        assert_eq!(Kind::parse("Music"), None);
        assert_eq!(Kind::default(), Kind::Music);
    }
}
