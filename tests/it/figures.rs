//! The figures every fault suite reports: what was expected, what the store holds, what the
//! handler received. One line per scenario goes to stdout (see it with `--nocapture`) and, when
//! `SUNOPOLL_FIGURES` names a file, is appended there too; `RELIABILITY.md` is built from them.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;

use crate::binary::StoredEvent;
use crate::helpers::Received;

/// One row of the table in `RELIABILITY.md`.
#[derive(Clone, Debug, Default)]
pub struct Row {
    /// What was tried.
    pub scenario: String,
    /// How many times (kills, fault windows, hostile clients…).
    pub runs: usize,
    /// Tasks acknowledged.
    pub tasks: usize,
    /// Events in the store at the end.
    pub events: usize,
    /// Expected (task, stage) pairs missing from the store or never received by the handler.
    pub lost: usize,
    /// Events stored more than once for one (task, stage).
    pub dup_store: usize,
    /// Events the handler accepted (answered 2xx) more than once, always with the same
    /// `webhook-id`. Requests it refused (5xx, 3xx…) are retries, counted in `retries`.
    pub dup_receiver: usize,
    /// Requests the handler received and refused (answered non-2xx).
    pub retries: usize,
    /// Did the daemon recover by itself (every task finished, polling resumed)?
    pub recovered: bool,
    /// Anything else worth a figure (requests, pauses, memory…).
    pub note: String,
    /// What was lost, for the failure message: `task/stage (not stored | not delivered)`.
    pub missing: Vec<String>,
}

impl Row {
    /// A row for `scenario`.
    pub fn new(scenario: &str) -> Row {
        Row {
            scenario: scenario.to_owned(),
            runs: 1,
            ..Row::default()
        }
    }

    /// Adds another run of the same scenario to this row (counts add up; recovered only if
    /// every run recovered; the first run's note is kept).
    pub fn absorb(&mut self, other: Row) {
        if self.runs == 0 || self.scenario.is_empty() {
            *self = other;
            return;
        }
        self.runs += other.runs;
        self.tasks += other.tasks;
        self.events += other.events;
        self.lost += other.lost;
        self.dup_store += other.dup_store;
        self.dup_receiver += other.dup_receiver;
        self.retries += other.retries;
        self.recovered &= other.recovered;
        self.missing.extend(other.missing);
    }

    /// Prints the row (and appends it to `$SUNOPOLL_FIGURES`), then checks the promise: nothing
    /// lost, nothing stored twice, recovered.
    pub fn report_and_check(&self) {
        let line = format!(
            "FIGURES | {} | {} | {} | {} | {} | {} | {} | {} | {}{}",
            self.scenario,
            self.runs,
            self.tasks,
            self.events,
            self.lost,
            self.dup_store,
            self.dup_receiver,
            if self.recovered { "yes" } else { "NO" },
            if self.retries > 0 {
                format!("{} refused requests retried; ", self.retries)
            } else {
                String::new()
            },
            self.note
        );
        println!("{line}");
        if let Ok(path) = std::env::var("SUNOPOLL_FIGURES")
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
        assert_eq!(self.lost, 0, "{line}\nlost: {:?}", self.missing);
        assert_eq!(self.dup_store, 0, "{line}");
        assert!(self.recovered, "{line}");
    }
}

/// Compares what should have happened with what the store and the handler hold.
///
/// `expected` maps each task to its stages in order. Checks, and fails the test on, any stage
/// stored out of order, any stage received before an earlier one of the same task was first
/// received, and any repeat delivery carrying a different `webhook-id`. Returns the figures.
pub fn tally(
    row: &mut Row,
    expected: &BTreeMap<String, Vec<String>>,
    stored: &[StoredEvent],
    received: Option<&[Received]>,
) {
    row.tasks = expected.len();
    row.events = stored
        .iter()
        .filter(|e| expected.contains_key(&e.task))
        .count();

    let mut in_store: HashMap<(&str, &str), usize> = HashMap::new();
    let mut stored_order: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in stored {
        *in_store.entry((&e.task, &e.stage)).or_default() += 1;
        stored_order.entry(&e.task).or_default().push(&e.stage);
    }
    row.dup_store = in_store.values().map(|n| n - 1).sum();

    // Every request per (task, stage): its webhook-id and whether the handler accepted it.
    let mut at_receiver: HashMap<(String, String), Vec<(String, bool)>> = HashMap::new();
    let mut first_seen: HashMap<String, Vec<String>> = HashMap::new();
    for r in received.unwrap_or(&[]) {
        let (task, stage) = (r.task(), r.stage());
        let ids = at_receiver
            .entry((task.clone(), stage.clone()))
            .or_default();
        if ids.is_empty() {
            first_seen.entry(task).or_default().push(stage);
        }
        ids.push((
            r.header("webhook-id").to_owned(),
            (200..300).contains(&r.status),
        ));
    }
    row.dup_receiver = at_receiver
        .values()
        .map(|ids| ids.iter().filter(|i| i.1).count().saturating_sub(1))
        .sum();
    row.retries = at_receiver
        .values()
        .map(|ids| ids.iter().filter(|i| !i.1).count())
        .sum();
    let accepted: std::collections::HashSet<&(String, String)> = at_receiver
        .iter()
        .filter(|(_, ids)| ids.iter().any(|i| i.1))
        .map(|(k, _)| k)
        .collect();
    for ((task, stage), ids) in &at_receiver {
        assert!(
            ids.iter().all(|id| id.0 == ids[0].0 && !id.0.is_empty()),
            "repeats of {task}/{stage} carry different webhook-ids: {ids:?}"
        );
    }

    let mut lost = 0;
    for (task, stages) in expected {
        let order: Vec<&str> = stored_order.get(task.as_str()).cloned().unwrap_or_default();
        assert!(
            order.iter().all(|s| stages.iter().any(|want| want == s)),
            "{task}: stored stages {order:?}, expected {stages:?}"
        );
        let want: Vec<&str> = stages.iter().map(String::as_str).collect();
        let kept: Vec<&str> = order.iter().copied().filter(|s| want.contains(s)).collect();
        let in_order: Vec<&str> = want.iter().copied().filter(|s| kept.contains(s)).collect();
        assert_eq!(kept, in_order, "{task}: stored out of order");
        for stage in stages {
            let stored_once = in_store.contains_key(&(task.as_str(), stage.as_str()));
            let delivered = received.is_none() || accepted.contains(&(task.clone(), stage.clone()));
            if !stored_once || !delivered {
                lost += 1;
                row.missing.push(format!(
                    "{task}/{stage} ({})",
                    if stored_once {
                        "not delivered"
                    } else {
                        "not stored"
                    }
                ));
            }
        }
        if received.is_some() {
            let got = first_seen.get(task).cloned().unwrap_or_default();
            let want_order: Vec<String> =
                stages.iter().filter(|s| got.contains(s)).cloned().collect();
            assert_eq!(
                got, want_order,
                "{task}: the handler got stages out of order"
            );
        }
    }
    row.lost = lost;
}

/// `text, first, complete`.
pub fn full() -> Vec<String> {
    ["text", "first", "complete"].map(str::to_owned).to_vec()
}

/// `text, error`.
pub fn text_then_error() -> Vec<String> {
    ["text", "error"].map(str::to_owned).to_vec()
}
