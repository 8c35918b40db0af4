//! The backend conformance suite: checks written against [`Backend`] alone, so every backend
//! (SQLite today, PostgreSQL next) runs the same ones. A backend joins with one
//! `conformance_suite!` line naming how to open a fresh, empty store in a temporary directory.

use std::collections::BTreeMap;

use super::{
    AddResult, ArchiveCounts, ArchivedNotice, AssetFile, AssetSource, AttemptRecord, Backend,
    Counts, DeliveryNext, FileNext, FileState, GateRow, Notice, Pruned, Replay, Route, TargetSpec,
    TaskState, TaskUpdate,
};
use crate::events::{NewEvent, Stage, error_event};

/// One `#[tokio::test]` per check, each on a fresh backend from `$open(dir)`.
macro_rules! conformance_suite {
    ($open:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let dir = tempfile::tempdir().expect("tempdir");
                let backend = ($open)(dir.path());
                super::$check(&backend).await;
            }
        )*
    };
}

/// Every check, for one backend's `conformance_suite!`.
macro_rules! every_check {
    ($suite:ident, $open:expr) => {
        $suite!(
            $open;
            add_is_idempotent_and_reports_state,
            due_window_orders_by_next_poll,
            apply_poll_writes_events_once_and_in_order,
            a_body_is_kept_byte_for_byte,
            a_failing_job_undoes_only_itself,
            remove_and_readd,
            retrack_polls_a_failed_task_again_keeping_its_events,
            gate_round_trips_and_prune_keeps_active_tasks,
            a_redelivery_requested_during_an_attempt_is_not_undone_by_that_attempt,
            only_the_head_of_a_queue_is_due,
            kept_counts_equal_a_recount_after_any_mix_of_changes,
            the_deadline_time_used_is_kept_with_the_task,
            due_times_move_with_a_clock_step,
            archive_files_come_with_the_terminal_event_and_go_oldest_first,
            archive_counts_equal_a_recount_and_redo_starts_over,
            the_archived_notice_is_stored_once_with_the_last_kept_file,
            pages_of_tasks_and_events_add_up_to_the_whole_listing,
        );
    };
}

/// [`conformance_suite!`] for a backend opened asynchronously, on a fresh database of the test
/// process's throwaway PostgreSQL cluster. Without PostgreSQL the checks fail in CI and say
/// loudly that they did not run elsewhere (see [`crate::testing::real_tool`]).
macro_rules! conformance_suite_pg {
    ($open:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let Some(cluster) = crate::testing::postgres() else {
                    return;
                };
                let backend = ($open)(cluster.database()).await;
                super::$check(&backend).await;
                backend.close().await;
            }
        )*
    };
}

mod postgres {
    use super::super::Backend;
    use super::super::postgres::{PgOptions, Postgres};

    async fn open(url: String) -> Postgres {
        let options =
            PgOptions::new(&url, None, std::time::Duration::from_secs(30), None).expect("options");
        Postgres::open(&options).await.expect("open")
    }

    every_check!(conformance_suite_pg, open);
}

mod sqlite {
    use super::super::sqlite::Sqlite;

    every_check!(conformance_suite, |dir: &std::path::Path| Sqlite::open(
        &dir.join("q.db")
    )
    .expect("open"));
}

fn update(state: TaskState, events: Vec<NewEvent>) -> TaskUpdate {
    TaskUpdate {
        state,
        last_status: Some("X".into()),
        last_error: None,
        failures: 0,
        rejections: 0,
        next_poll_at: 5000,
        events,
        routes: Vec::new(),
        submitted_callback_url: None,
        first_delivery_delay: 0,
        timed_out: false,
        asked: crate::store::Asked::default(),
        archive: Vec::new(),
    }
}

fn app_route() -> Route {
    Route {
        target: "app".into(),
        url: "http://127.0.0.1:9/cb".into(),
        stages: Stage::ALL.to_vec(),
    }
}

async fn add_is_idempotent_and_reports_state(s: &impl Backend) {
    let r = s
        .add(
            vec!["a".into(), "b".into()],
            crate::store::TaskSpec::music(None, Some("l".into())),
            1000,
            10,
        )
        .await
        .expect("add");
    assert_eq!(
        r.iter().map(|x| x.result).collect::<Vec<_>>(),
        [AddResult::Added, AddResult::Added]
    );
    let r = s
        .add(
            vec!["a".into()],
            crate::store::TaskSpec::music(None, Some("other".into())),
            2000,
            10,
        )
        .await
        .expect("add");
    assert_eq!(r[0].result, AddResult::Exists);
    assert_eq!(r[0].state, TaskState::Active);
    let (task, _) = s.show("a".into()).await.expect("show").expect("known");
    assert_eq!(task.added_at, 1000);
    assert_eq!(
        task.label.as_deref(),
        Some("l"),
        "a known task is left as it was"
    );
    let c = s.counts().await.expect("counts");
    assert_eq!(c.active, 2);
}

async fn due_window_orders_by_next_poll(s: &impl Backend) {
    s.add(
        vec!["late".into()],
        crate::store::TaskSpec::music(None, None),
        3000,
        10,
    )
    .await
    .expect("add");
    s.add(
        vec!["early".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10,
    )
    .await
    .expect("add");
    let w = s
        .due_window(crate::store::DEFAULT_ACCOUNT.to_owned(), 10)
        .await
        .expect("due")
        .rows;
    assert_eq!(
        w.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["early", "late"]
    );
}

async fn apply_poll_writes_events_once_and_in_order(s: &impl Backend) {
    s.add(
        vec!["t".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10_000,
    )
    .await
    .expect("add");
    let ev = error_event("t", 501, "failed");
    let applied = s
        .apply_poll("t".into(), 2000, move |row| {
            assert_eq!(row.state, TaskState::Active);
            update(TaskState::Failed, vec![ev])
        })
        .await
        .expect("apply")
        .expect("active");
    assert_eq!(applied.seqs, [1]);
    // A finished task is not touched again.
    let again = s
        .apply_poll("t".into(), 3000, |_| {
            update(TaskState::Failed, vec![error_event("t", 1, "x")])
        })
        .await
        .expect("apply");
    assert!(again.is_none());
    let (task, events) = s.show("t".into()).await.expect("show").expect("known");
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.stage, Some(Stage::Error));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].body, error_event("t", 501, "failed").body);
    assert_eq!(events[0].created_at, 2000);
}

/// A body as the families write it could be any JSON text: every read gives back its bytes,
/// numbers spelt as the API spelt them (`design.md` invariant 11), whitespace, escapes and
/// characters outside ASCII included.
async fn a_body_is_kept_byte_for_byte(s: &impl Backend) {
    // JSON escapes and raw characters in a string, and layout outside strings.
    let body = concat!(
        r#"{"task_id":"t","code":200,"msg":"ok \u00e9 \" \n é 🎵","data":{"#,
        r#""end":0.18229166666666666,"v":[0.10000000000000001,1.50,-0.0,-0,0.0,1e-7,5e-324,"#,
        r#"2.2250738585072011e-308,9007199254740993,18446744073709551616,"#,
        r#"-123456789012345678901234567890],"#,
        "\n  \"pretty\" : [ 1 ,\t2 ]}}"
    )
    .to_owned();
    let parsed: serde_json::Value = serde_json::from_str(&body).expect("the body is JSON");
    assert!(parsed.is_object());
    let music = crate::store::TaskSpec::music(None, None);
    s.add(vec!["t".into()], music, 1000, 10_000)
        .await
        .expect("add");
    let mut event = error_event("t", 200, "");
    (event.stage, event.body) = (Stage::Complete, body.clone());
    s.apply_poll("t".into(), 2000, move |_| TaskUpdate {
        routes: vec![app_route()],
        ..update(TaskState::Done, vec![event])
    })
    .await
    .expect("apply")
    .expect("active");
    let (_, shown) = s.show("t".into()).await.expect("show").expect("known");
    assert_eq!(shown[0].body, body, "show");
    let listed = s.events(0, None, None).await.expect("events");
    assert_eq!(listed[0].body, body, "events");
    let page = s
        .events_page(0, Some("t".into()), 10, 1 << 20)
        .await
        .expect("page");
    assert_eq!(page[0].body, body, "a page of events");
    let due = s
        .due_deliveries(vec!["app".into()], Vec::new(), Vec::new(), 10)
        .await
        .expect("due")
        .rows;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].body, body, "the delivery sends the stored bytes");
}

async fn a_failing_job_undoes_only_itself(s: &impl Backend) {
    s.add(
        vec!["t".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10_000,
    )
    .await
    .expect("add");
    let text = || NewEvent {
        stage: Stage::Text,
        code: 200,
        body: "{}".into(),
        tracks: 0,
        filled: false,
    };
    let t1 = text();
    s.apply_poll("t".into(), 2000, move |_| {
        update(TaskState::Active, vec![t1])
    })
    .await
    .expect("first text")
    .expect("active");
    // Storing `text` again must fail and leave the task as it was.
    let t2 = text();
    let e = s
        .apply_poll("t".into(), 3000, move |_| {
            update(TaskState::Active, vec![t2])
        })
        .await
        .expect_err("duplicate stage");
    assert!(e.to_string().contains("refusing"), "{e}");
    let (task, events) = s.show("t".into()).await.expect("show").expect("known");
    assert_eq!(task.polls, 1);
    assert_eq!(events.len(), 1);
}

async fn remove_and_readd(s: &impl Backend) {
    s.add(
        vec!["t".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10,
    )
    .await
    .expect("add");
    assert_eq!(
        s.remove("t".into(), 2000).await.expect("rm"),
        Some(TaskState::Active)
    );
    assert_eq!(s.remove("nope".into(), 2000).await.expect("rm"), None);
    assert!(
        s.due_window(crate::store::DEFAULT_ACCOUNT.to_owned(), 10)
            .await
            .expect("due")
            .rows
            .is_empty()
    );
    let r = s
        .add(
            vec!["t".into()],
            crate::store::TaskSpec::music(None, None),
            3000,
            10,
        )
        .await
        .expect("add");
    assert_eq!(r[0].result, AddResult::Readded);
    assert_eq!(
        s.due_window(crate::store::DEFAULT_ACCOUNT.to_owned(), 10)
            .await
            .expect("due")
            .rows
            .len(),
        1
    );
}

async fn retrack_polls_a_failed_task_again_keeping_its_events(s: &impl Backend) {
    s.add(
        vec!["t".into(), "ok".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10_000,
    )
    .await
    .expect("add");
    let text_ev = NewEvent {
        stage: Stage::Text,
        code: 200,
        body: "{}".into(),
        tracks: 0,
        filled: false,
    };
    let err = error_event("t", 501, "failed");
    s.apply_poll("t".into(), 2000, move |_| {
        update(TaskState::Failed, vec![text_ev, err])
    })
    .await
    .expect("apply")
    .expect("active");
    let r = s
        .retrack(
            vec!["t".into(), "ok".into(), "new".into()],
            crate::store::TaskSpec::music(None, None),
            3000,
            10_000,
        )
        .await
        .expect("retrack");
    let results: Vec<_> = r.iter().map(|t| (t.result, t.state, t.stage)).collect();
    assert_eq!(
        results,
        [
            (AddResult::Readded, TaskState::Active, Some(Stage::Text)),
            (AddResult::Exists, TaskState::Active, None),
            (AddResult::Added, TaskState::Active, None),
        ]
    );
    // Failing again stores no second `error`, yet the task ends.
    let again = s
        .apply_poll("t".into(), 4000, |row| {
            assert_eq!(row.stage, Some(Stage::Text));
            update(TaskState::Failed, vec![error_event("t", 501, "again")])
        })
        .await
        .expect("apply")
        .expect("active");
    assert!(again.seqs.is_empty(), "{:?}", again.seqs);
    let (task, events) = s.show("t".into()).await.expect("show").expect("known");
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.stage, Some(Stage::Error));
    assert_eq!(events.len(), 2, "text and the first error, kept");
    assert_eq!(events[1].body, error_event("t", 501, "failed").body);
}

async fn gate_round_trips_and_prune_keeps_active_tasks(s: &impl Backend) {
    let g = GateRow {
        kind: crate::store::PauseKind::Throttled,
        attempt: 3,
        paused_until: 99,
        since: 1,
        cause: "HTTP 200, code 430".into(),
    };
    let (a, b) = (|| "a".to_owned(), || "b".to_owned());
    assert_eq!(s.load_account(a()).await.expect("load"), Default::default());
    s.save_gate(a(), Some(g.clone())).await.expect("save");
    s.save_learnt_rate(a(), Some(0.45))
        .await
        .expect("save rate");
    let row = s.load_account(a()).await.expect("load");
    assert_eq!((row.gate, row.learnt_rate), (Some(g.clone()), Some(0.45)));
    // Each account has its own: b is neither paused nor learnt.
    assert_eq!(
        s.load_account(b()).await.expect("load b"),
        Default::default()
    );
    // Clearing the pause keeps what was learnt.
    s.save_gate(a(), None).await.expect("clear");
    let row = s.load_account(a()).await.expect("load");
    assert_eq!((row.gate, row.learnt_rate), (None, Some(0.45)));
    s.save_learnt_rate(a(), None).await.expect("forget rate");
    assert_eq!(s.load_account(a()).await.expect("load"), Default::default());

    s.add(
        vec!["old".into(), "live".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10_000,
    )
    .await
    .expect("add");
    s.apply_poll("old".into(), 1500, |_| {
        update(TaskState::Failed, vec![error_event("old", 500, "x")])
    })
    .await
    .expect("apply");
    let p = s.prune(2000).await.expect("prune");
    assert_eq!(
        p,
        Pruned {
            tasks: 1,
            events: 1
        }
    );
    let c = s.counts().await.expect("counts");
    assert_eq!((c.active, c.failed, c.events, c.last_seq), (1, 0, 0, 1));
    assert_eq!(
        s.last_seq().await.expect("last seq"),
        1,
        "kept after pruning"
    );
}

async fn a_redelivery_requested_during_an_attempt_is_not_undone_by_that_attempt(s: &impl Backend) {
    s.add(
        vec!["t".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10_000,
    )
    .await
    .expect("add");
    s.apply_poll("t".into(), 1000, |_| {
        let mut u = update(TaskState::Done, vec![error_event("t", 500, "x")]);
        u.routes = vec![app_route()];
        u
    })
    .await
    .expect("apply");
    // The forwarder takes the delivery and starts an attempt...
    let due = s
        .due_deliveries(
            vec!["app".into(), "files".into()],
            Vec::new(),
            Vec::new(),
            10,
        )
        .await
        .expect("due")
        .rows;
    assert_eq!(due.len(), 1);
    // ...the operator asks for a replay while it is in flight...
    let n = s
        .redeliver(Replay::Task("t".into()), None, Vec::new(), 2000)
        .await
        .expect("redeliver");
    assert_eq!(n, 1);
    // ...and the attempt then ends. The replay must still happen.
    let attempt = AttemptRecord {
        started_at: 1500,
        duration_ms: 600,
        status: Some(200),
        error: None,
    };
    let applied = s
        .record_attempt(&due[0], attempt, DeliveryNext::Delivered)
        .await
        .expect("record");
    assert!(!applied, "the attempt is reported as superseded");
    let due = s
        .due_deliveries(
            vec!["app".into(), "files".into()],
            Vec::new(),
            Vec::new(),
            10,
        )
        .await
        .expect("due")
        .rows;
    assert_eq!(due.len(), 1, "the requested replay was lost");
    let log = s.deliveries_of("t".into()).await.expect("deliveries");
    assert_eq!(log[0].1.state, "pending");
    assert_eq!(
        log[0].1.attempt_log.len(),
        1,
        "the attempt is still on record"
    );
}

async fn only_the_head_of_a_queue_is_due(s: &impl Backend) {
    s.add(
        vec!["t".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10_000,
    )
    .await
    .expect("add");
    let text = NewEvent {
        stage: Stage::Text,
        code: 200,
        body: "{}".into(),
        tracks: 0,
        filled: false,
    };
    s.apply_poll("t".into(), 1000, move |_| {
        let mut u = update(TaskState::Failed, vec![text, error_event("t", 500, "x")]);
        u.routes = vec![app_route()];
        u
    })
    .await
    .expect("apply")
    .expect("active");
    let due = s
        .due_deliveries(
            vec!["app".into(), "files".into()],
            Vec::new(),
            Vec::new(),
            10,
        )
        .await
        .expect("due")
        .rows;
    assert_eq!(due.len(), 1, "error waits behind text");
    assert_eq!(due[0].stage, Stage::Text);
    assert_eq!(due[0].origin, "http://127.0.0.1:9");
    assert_eq!(
        due[0].webhook_id,
        super::webhook_id("t", Stage::Text, "app")
    );
    let attempt = AttemptRecord {
        started_at: 1100,
        duration_ms: 5,
        status: Some(204),
        error: None,
    };
    assert!(
        s.record_attempt(&due[0], attempt, DeliveryNext::Delivered)
            .await
            .expect("record")
    );
    let due = s
        .due_deliveries(
            vec!["app".into(), "files".into()],
            Vec::new(),
            Vec::new(),
            10,
        )
        .await
        .expect("due")
        .rows;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].stage, Stage::Error, "the next in line is now due");
    let summary = s.target_summary().await.expect("summary");
    assert_eq!(summary.len(), 1);
    assert_eq!((summary[0].pending, summary[0].delivered), (1, 1));
    assert_eq!(summary[0].last_success_at, Some(1105));
}

/// What the kept counts must say, recounted from the records themselves.
async fn recount(s: &impl Backend) -> (Counts, BTreeMap<(String, String), i64>) {
    let mut c = Counts::default();
    let tasks = s.list(None, None).await.expect("list");
    let mut deliveries = BTreeMap::new();
    for t in &tasks {
        *match t.state {
            TaskState::Active => &mut c.active,
            TaskState::Done => &mut c.done,
            TaskState::Failed => &mut c.failed,
            TaskState::Removed => &mut c.removed,
        } += 1;
        for (_, d) in s
            .deliveries_of(t.task_id.clone())
            .await
            .expect("deliveries")
        {
            *deliveries.entry((d.target, d.state)).or_insert(0) += 1;
        }
    }
    c.events = i64::try_from(s.events(0, None, None).await.expect("events").len())
        .expect("a small number");
    c.last_seq = s.last_seq().await.expect("last seq");
    (c, deliveries)
}

async fn assert_counts_match(s: &impl Backend, seed: u64, step: usize) {
    let (want, want_deliveries) = recount(s).await;
    let kept = s.counts().await.expect("counts");
    assert_eq!(
        kept, want,
        "seed {seed}, step {step}: task and event counts"
    );
    assert_eq!(
        s.active_count().await.expect("active"),
        want.active,
        "seed {seed}, step {step}: active count"
    );
    let mut kept_deliveries = BTreeMap::new();
    for t in s.target_summary().await.expect("summary") {
        for (state, n) in [
            ("pending", t.pending),
            ("delivered", t.delivered),
            ("failed", t.failed),
        ] {
            if n > 0 {
                kept_deliveries.insert((t.target.clone(), state.to_owned()), n);
            }
        }
        assert_eq!(
            t.oldest_pending_at.is_some(),
            t.pending > 0,
            "seed {seed}, step {step}: oldest pending of {}",
            t.target
        );
    }
    assert_eq!(
        kept_deliveries, want_deliveries,
        "seed {seed}, step {step}: delivery counts per target and state"
    );
}

/// One poll's result for a task at `stage`, chosen by `pick`: nothing new, or the next stages
/// up to a terminal one, delivered along both routes.
fn random_update(stage: Option<Stage>, pick: u8, id: &str) -> TaskUpdate {
    let later: Vec<Stage> = Stage::ALL
        .into_iter()
        .filter(|s| stage.is_none_or(|now| *s > now))
        .collect();
    let events: Vec<NewEvent> = match pick % 4 {
        0 => Vec::new(),
        _ if later.is_empty() => Vec::new(),
        n => {
            let last = later[usize::from(n) % later.len()];
            later
                .iter()
                .filter(|s| **s <= last && !(**s == Stage::Complete && last == Stage::Error))
                .map(|s| match s {
                    Stage::Error => error_event(id, 500, "x"),
                    s => NewEvent {
                        stage: *s,
                        code: 200,
                        body: "{}".into(),
                        tracks: 0,
                        filled: false,
                    },
                })
                .collect()
        }
    };
    let state = match events.last().map(|e| e.stage) {
        Some(Stage::Complete) => TaskState::Done,
        Some(Stage::Error) => TaskState::Failed,
        _ => TaskState::Active,
    };
    let mut u = update(state, events);
    let mut other = app_route();
    other.target = "other".into();
    other.stages = vec![Stage::Complete, Stage::Error];
    u.routes = vec![app_route(), other];
    u
}

/// The counts `status` and the metrics read are kept, not counted: after any mix of adds,
/// polls, removals, prunes, attempts, replays and orphaned targets they equal a recount.
async fn kept_counts_equal_a_recount_after_any_mix_of_changes(s: &impl Backend) {
    let seed = 0x5eed_u64;
    let mut rng = fastrand::Rng::with_seed(seed);
    let id = |n: u32| format!("t{n}");
    let mut now = 1000;
    for step in 0..400 {
        now += 100;
        match rng.u8(0..10) {
            0 | 1 => {
                let ids = (0..rng.u32(1..4)).map(|_| id(rng.u32(0..30))).collect();
                s.add(ids, crate::store::TaskSpec::music(None, None), now, 50_000)
                    .await
                    .expect("add");
            }
            2..=4 => {
                let (task, pick) = (id(rng.u32(0..30)), rng.u8(..));
                let name = task.clone();
                s.apply_poll(task, now, move |row| random_update(row.stage, pick, &name))
                    .await
                    .expect("apply");
            }
            5 => {
                s.remove(id(rng.u32(0..30)), now).await.expect("remove");
            }
            6 => {
                s.prune(now - i64::from(rng.u32(0..3000)))
                    .await
                    .expect("prune");
            }
            7 => {
                let due = s
                    .due_deliveries(
                        vec!["app".into(), "files".into()],
                        Vec::new(),
                        Vec::new(),
                        5,
                    )
                    .await
                    .expect("due")
                    .rows;
                for d in &due {
                    let next = match rng.u8(0..3) {
                        0 => DeliveryNext::Delivered,
                        1 => DeliveryNext::Retry(now),
                        _ => DeliveryNext::Failed,
                    };
                    let attempt = AttemptRecord {
                        started_at: now,
                        duration_ms: 5,
                        status: Some(500),
                        error: Some("boom".into()),
                    };
                    s.record_attempt(d, attempt, next).await.expect("record");
                }
            }
            8 => {
                let what = if rng.bool() {
                    Replay::Task(id(rng.u32(0..30)))
                } else {
                    Replay::FailedSince(0)
                };
                s.redeliver(what, None, vec![app_route()], now)
                    .await
                    .expect("redeliver");
            }
            _ => {
                let app = TargetSpec {
                    route: app_route(),
                    kinds: None,
                };
                s.fail_orphans(vec![app], now).await.expect("fail orphans");
            }
        }
        if step % 20 == 19 {
            assert_counts_match(s, seed, step).await;
        }
    }
    assert_counts_match(s, seed, 400).await;
}
async fn the_deadline_time_used_is_kept_with_the_task(s: &impl Backend) {
    s.add(
        vec!["t".into()],
        crate::store::TaskSpec::music(None, None),
        1000,
        10_000,
    )
    .await
    .expect("add");
    let used = crate::store::Asked {
        total_ms: 4000,
        at: Some(2000),
        gap_ms: 500,
    };
    s.apply_poll("t".into(), 2000, move |row| {
        assert_eq!(
            row.asked,
            crate::store::Asked::default(),
            "a new task used none"
        );
        let mut u = update(TaskState::Active, Vec::new());
        u.asked = used;
        u
    })
    .await
    .expect("apply")
    .expect("active");
    s.apply_poll("t".into(), 3000, move |row| {
        assert_eq!(row.asked, used, "what the last answer stored is read back");
        let mut u = update(TaskState::Active, Vec::new());
        u.asked = used;
        u
    })
    .await
    .expect("apply")
    .expect("active");
    // A task removed and added again starts its deadline afresh.
    s.remove("t".into(), 4000).await.expect("remove");
    s.add(
        vec!["t".into()],
        crate::store::TaskSpec::music(None, None),
        5000,
        10_000,
    )
    .await
    .expect("readd");
    s.apply_poll("t".into(), 6000, |row| {
        assert_eq!(row.asked, crate::store::Asked::default());
        update(TaskState::Active, Vec::new())
    })
    .await
    .expect("apply")
    .expect("active");
}

async fn due_times_move_with_a_clock_step(s: &impl Backend) {
    s.add(
        vec!["a".into(), "b".into()],
        crate::store::TaskSpec::music(None, None),
        10_000,
        10_000,
    )
    .await
    .expect("add");
    s.add(
        vec!["done".into()],
        crate::store::TaskSpec::music(None, None),
        10_000,
        10_000,
    )
    .await
    .expect("add");
    s.apply_poll("done".into(), 10_000, |_| {
        update(TaskState::Failed, vec![error_event("done", 1, "x")])
    })
    .await
    .expect("apply")
    .expect("active");
    let moved = s
        .shift_due(
            crate::store::Schedule::Polls(crate::store::DEFAULT_ACCOUNT.to_owned()),
            -3000,
        )
        .await
        .expect("shift");
    assert_eq!(moved, 2, "only active tasks move");
    let w = s
        .due_window(crate::store::DEFAULT_ACCOUNT.to_owned(), 10)
        .await
        .expect("due")
        .rows;
    assert!(w.iter().all(|r| r.next_poll_at == 7000), "{w:?}");
    assert_eq!(
        s.shift_due(crate::store::Schedule::Deliveries, -3000)
            .await
            .expect("shift"),
        0,
        "nothing pending to deliver"
    );
}

fn asset(name: &str) -> AssetFile {
    AssetFile {
        name: name.into(),
        kind: "audio".into(),
        audio_id: Some("a1".into()),
        source: AssetSource::Url(format!("https://files.example.com/{name}")),
    }
}

fn complete(id: &str) -> NewEvent {
    NewEvent {
        stage: Stage::Complete,
        code: 200,
        body: format!("{{\"task\":\"{id}\"}}"),
        tracks: 2,
        filled: false,
    }
}

/// Completes task `id` at `now` with `files` to archive.
async fn complete_with(s: &impl Backend, id: &str, now: i64, files: Vec<AssetFile>) {
    s.add(
        vec![id.into()],
        crate::store::TaskSpec::music(None, None),
        now - 10,
        1_000_000,
    )
    .await
    .expect("add");
    let ev = complete(id);
    s.apply_poll(id.into(), now, move |_| {
        let mut u = update(TaskState::Done, vec![ev]);
        u.archive = files;
        u
    })
    .await
    .expect("apply")
    .expect("active");
}

async fn archive_files_come_with_the_terminal_event_and_go_oldest_first(s: &impl Backend) {
    // A poll whose write is refused (a stage out of order) leaves no files behind either.
    s.add(
        vec!["bad".into()],
        crate::store::TaskSpec::music(None, None),
        100,
        1_000_000,
    )
    .await
    .expect("add");
    let refused = s
        .apply_poll("bad".into(), 200, |_| {
            let mut u = update(TaskState::Done, vec![complete("bad"), complete("bad")]);
            u.archive = vec![asset("x.mp3")];
            u
        })
        .await;
    assert!(refused.is_err());
    assert!(s.files_of("bad".into()).await.expect("files").is_empty());

    complete_with(s, "newer", 5000, vec![asset("n.mp3")]).await;
    complete_with(s, "older", 1000, vec![asset("o1.mp3"), asset("o2.jpeg")]).await;
    let due = s.due_files(Vec::new(), 6000, 10).await.expect("due").rows;
    let names: Vec<&str> = due.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["o1.mp3", "o2.jpeg", "n.mp3"], "oldest task first");
    assert_eq!(
        due[0].url.as_deref(),
        Some("https://files.example.com/o1.mp3")
    );
    assert_eq!((due[0].created_at, due[0].attempts), (1000, 0));
    let busy = vec![due[0].id];
    let due2 = s.due_files(busy, 6000, 1).await.expect("due").rows;
    assert_eq!(due2[0].name, "o2.jpeg", "files in flight are skipped");

    let (o1, o2) = (due[0].id, due[1].id);
    s.save_validator(o1, Some("\"etag-1\"".into()))
        .await
        .expect("validator");
    s.record_file(
        o2,
        FileNext::Retry {
            at: 9000,
            error: "HTTP 404".into(),
        },
        6000,
        None,
    )
    .await
    .expect("retry");
    let due = s.due_files(Vec::new(), 6000, 10).await.expect("due").rows;
    let names: Vec<(&str, i64)> = due
        .iter()
        .map(|f| (f.name.as_str(), f.next_try_at))
        .collect();
    assert_eq!(
        names,
        [("o1.mp3", 1000), ("n.mp3", 5000), ("o2.jpeg", 9000)],
        "the retried file comes last, as the next one due"
    );
    assert_eq!(due[0].validator.as_deref(), Some("\"etag-1\""));
    assert_eq!(due[2].attempts, 1);
    s.record_file(
        o1,
        FileNext::Done {
            size: 10,
            sha256: "ab".into(),
        },
        7000,
        None,
    )
    .await
    .expect("done");
    let files = s.files_of("older".into()).await.expect("files");
    assert_eq!(files[0].state, FileState::Done);
    assert_eq!(
        (files[0].size, files[0].sha256.as_deref()),
        (Some(10), Some("ab"))
    );
    assert_eq!(files[0].done_at, Some(7000));
    assert_eq!(files[1].state, FileState::Pending);
    assert_eq!(files[1].last_error.as_deref(), Some("HTTP 404"));
    // Pruning the task forgets nothing that was kept.
    s.prune(i64::MAX).await.expect("prune");
    assert_eq!(s.files_of("older".into()).await.expect("files").len(), 2);
}

async fn archive_counts_equal_a_recount_and_redo_starts_over(s: &impl Backend) {
    complete_with(
        s,
        "t",
        1000,
        vec![asset("a"), asset("b"), asset("c"), asset("d")],
    )
    .await;
    // The same task's files listed again (a retracked task completing twice) stay one each.
    assert_eq!(s.counts().await.expect("counts").done, 1);
    let due = s.due_files(Vec::new(), 2000, 10).await.expect("due").rows;
    let id = |n: &str| due.iter().find(|f| f.name == n).expect("file").id;
    s.record_file(
        id("a"),
        FileNext::Done {
            size: 100,
            sha256: "1".into(),
        },
        2000,
        None,
    )
    .await
    .expect("record");
    s.record_file(
        id("b"),
        FileNext::Done {
            size: 23,
            sha256: "2".into(),
        },
        2000,
        None,
    )
    .await
    .expect("record");
    s.record_file(
        id("c"),
        FileNext::Expired {
            error: "HTTP 404".into(),
        },
        2000,
        None,
    )
    .await
    .expect("record");
    s.record_file(
        id("d"),
        FileNext::Failed {
            error: "too big".into(),
        },
        2000,
        None,
    )
    .await
    .expect("record");
    let recount = |files: &[crate::store::FileRecord]| {
        let mut c = ArchiveCounts::default();
        for f in files {
            match f.state {
                FileState::Pending => c.pending += 1,
                FileState::Done => {
                    c.done += 1;
                    c.bytes += i64::try_from(f.size.unwrap_or(0)).expect("size");
                }
                FileState::Failed => c.failed += 1,
                FileState::Expired => c.expired += 1,
            }
        }
        c
    };
    let files = s.files_of("t".into()).await.expect("files");
    let kept = s.archive_counts().await.expect("counts");
    assert_eq!(kept, recount(&files));
    assert_eq!(
        (kept.done, kept.bytes, kept.expired, kept.failed),
        (2, 123, 1, 1)
    );
    let n = s
        .redo_files(
            "t".into(),
            vec!["a".into(), "c".into(), "nope".into()],
            3000,
        )
        .await
        .expect("redo");
    assert_eq!(n, 2);
    let files = s.files_of("t".into()).await.expect("files");
    assert_eq!(s.archive_counts().await.expect("counts"), recount(&files));
    assert_eq!(files[0].state, FileState::Pending);
    assert_eq!((files[0].size, files[0].attempts), (None, 0));
    let due = s.due_files(Vec::new(), 3000, 10).await.expect("due").rows;
    assert_eq!(
        due.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["a", "c"]
    );
}

async fn pages_of_tasks_and_events_add_up_to_the_whole_listing(s: &impl Backend) {
    let ids: Vec<String> = (0..23).map(|i| format!("t{i:02}")).collect();
    s.add(
        ids.clone(),
        crate::store::TaskSpec::music(None, None),
        1000,
        10_000,
    )
    .await
    .expect("add");
    for id in ids.iter().step_by(3) {
        let ev = error_event(id, 501, &"x".repeat(100));
        s.apply_poll(id.clone(), 2000, move |_| {
            update(TaskState::Failed, vec![ev])
        })
        .await
        .expect("apply")
        .expect("active");
    }
    for state in [None, Some(TaskState::Failed), Some(TaskState::Active)] {
        let whole: Vec<String> = s
            .list(state, None)
            .await
            .expect("list")
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        let (mut paged, mut before, mut pages) = (Vec::new(), None, 0);
        loop {
            let (page, next) = s.list_page(state, before, 5).await.expect("page");
            assert!(page.len() <= 5);
            paged.extend(page.into_iter().map(|t| t.task_id));
            pages += 1;
            match next {
                Some(n) => before = Some(n),
                None => break,
            }
            assert!(pages < 100, "the pages end");
        }
        assert_eq!(paged, whole, "{state:?}");
    }
    // Event pages stop at their byte budget, but always hold one event.
    let all = s.events(0, None, None).await.expect("events");
    assert_eq!(all.len(), 8);
    let one = all[0].body.len();
    let page = s.events_page(0, None, 100, one * 3).await.expect("page");
    assert_eq!(page.len(), 3);
    assert_eq!(page[0].seq, all[0].seq);
    let page = s.events_page(all[6].seq, None, 100, 1).await.expect("page");
    assert_eq!(page.len(), 1, "one event even over the budget");
    assert_eq!(page[0].seq, all[7].seq);
    let page = s.events_page(0, None, 2, usize::MAX).await.expect("page");
    assert_eq!(page.len(), 2, "and never more than the limit");
}

/// A notice whose body names the task's kind and each file's name and hash, routed to `to`.
fn notice(to: Vec<Route>) -> Option<ArchivedNotice> {
    Some(Box::new(move |kind, files| Notice {
        body: format!(
            "{}:{}",
            kind.as_str(),
            files
                .iter()
                .map(|f| format!("{}={}", f.name, f.sha256.as_deref().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(",")
        ),
        routes: to,
    }))
}

fn kept(sha256: &str) -> FileNext {
    FileNext::Done {
        size: 1,
        sha256: sha256.into(),
    }
}

async fn the_archived_notice_is_stored_once_with_the_last_kept_file(s: &impl Backend) {
    let files = Route {
        target: "files".into(),
        url: "http://127.0.0.1:9/files".into(),
        stages: vec![Stage::Complete, Stage::Archived],
    };
    s.add(
        vec!["t".into()],
        crate::store::TaskSpec::music(None, None),
        990,
        1_000_000,
    )
    .await
    .expect("add");
    let (ev, route) = (complete("t"), files.clone());
    s.apply_poll("t".into(), 1000, move |_| {
        let mut u = update(TaskState::Done, vec![ev]);
        u.archive = vec![asset("a"), asset("b")];
        u.routes = vec![route];
        u
    })
    .await
    .expect("apply")
    .expect("active");
    let due = s.due_files(Vec::new(), 2000, 10).await.expect("due").rows;
    let id = |n: &str| due.iter().find(|f| f.name == n).expect("file").id;
    let to = || notice(vec![files.clone()]);
    let first = s.record_file(id("a"), kept("h-a"), 2000, to()).await;
    assert_eq!(first.expect("record"), None, "b is not kept yet");
    let retry = FileNext::Retry {
        at: 3000,
        error: "HTTP 503".into(),
    };
    let retried = s.record_file(id("b"), retry, 2000, to()).await;
    assert_eq!(retried.expect("record"), None);
    let emitted = s
        .record_file(id("b"), kept("h-b"), 3000, to())
        .await
        .expect("record")
        .expect("the last kept file brings the notice");
    assert_eq!(
        (emitted.task_id.as_str(), &emitted.targets[..]),
        ("t", &["files".to_owned()][..])
    );

    let events = s.events(0, Some("t".into()), None).await.expect("events");
    let stages: Vec<Stage> = events.iter().map(|e| e.stage).collect();
    assert_eq!(stages, [Stage::Complete, Stage::Archived]);
    assert_eq!(events[1].seq, emitted.seq);
    assert_eq!(
        events[1].body, "music:a=h-a,b=h-b",
        "built from every kept file"
    );
    assert_eq!(events[1].created_at, 3000);
    let deliveries = s.deliveries_of("t".into()).await.expect("deliveries");
    let archived: Vec<_> = deliveries
        .iter()
        .filter(|(seq, _)| *seq == emitted.seq)
        .map(|(_, d)| (d.target.as_str(), d.state.as_str(), d.next_attempt_at))
        .collect();
    assert_eq!(archived, [("files", "pending", 3000)], "due at once");
    // Behind the complete callback in the target's queue, as every later stage is.
    let due = s
        .due_deliveries(
            vec!["app".into(), "files".into()],
            Vec::new(),
            Vec::new(),
            10,
        )
        .await
        .expect("due")
        .rows;
    assert_eq!(
        due.iter().map(|d| d.stage).collect::<Vec<_>>(),
        [Stage::Complete]
    );

    // Kept again after `archive redo`: still the one notice.
    assert_eq!(
        s.redo_files("t".into(), vec!["b".into()], 4000)
            .await
            .expect("redo"),
        1
    );
    let again = s.record_file(id("b"), kept("h-b"), 5000, to()).await;
    assert_eq!(again.expect("record"), None, "once per task");
    let events = s.events(0, Some("t".into()), None).await.expect("events");
    assert_eq!(events.len(), 2);

    // No target takes it: nothing is stored. A pruned task: nothing either.
    complete_with(s, "quiet", 1000, vec![asset("q")]).await;
    complete_with(s, "gone", 1000, vec![asset("g")]).await;
    let due = s.due_files(Vec::new(), 6000, 10).await.expect("due").rows;
    let id = |n: &str| due.iter().find(|f| f.name == n).expect("file").id;
    let quiet = s
        .record_file(id("q"), kept("h"), 6000, notice(Vec::new()))
        .await;
    assert_eq!(quiet.expect("record"), None);
    let (gone, q) = (id("g"), id("q"));
    assert_ne!(gone, q);
    s.prune(i64::MAX).await.expect("prune");
    let pruned = s.record_file(gone, kept("h"), 7000, to()).await;
    assert_eq!(
        pruned.expect("record"),
        None,
        "a pruned task's events are gone"
    );
    let all = s.events(0, None, None).await.expect("events");
    assert_eq!(all.iter().filter(|e| e.stage == Stage::Archived).count(), 1);
}
