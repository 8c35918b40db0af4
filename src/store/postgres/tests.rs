//! What only a shared queue has: leases between daemons, and the news they pass each other.
//! Each test opens two (or three) backends on one fresh database of the test process's real
//! PostgreSQL, as two daemons on two hosts would.

use std::time::Duration;

use super::{Note, PgOptions, Postgres};
use crate::events::{NewEvent, Stage};
use crate::store::{Backend, TaskSpec, TaskState, TaskUpdate};

async fn daemons(n: usize, lease: Duration) -> Option<Vec<Postgres>> {
    let url = crate::testing::postgres()?.database();
    let mut out = Vec::new();
    for _ in 0..n {
        let options = PgOptions::new(&url, None, lease, None).expect("options");
        out.push(Postgres::open(&options).await.expect("open"));
    }
    Some(out)
}

async fn add(s: &Postgres, ids: &[&str]) {
    s.add(
        ids.iter().map(|i| (*i).to_owned()).collect(),
        TaskSpec::music(None, None),
        1000,
        60_000,
    )
    .await
    .expect("add");
}

fn done(id: &str) -> TaskUpdate {
    TaskUpdate {
        state: TaskState::Done,
        last_status: Some("SUCCESS".into()),
        last_error: None,
        failures: 0,
        rejections: 0,
        next_poll_at: 5000,
        events: vec![NewEvent {
            stage: Stage::Complete,
            code: 200,
            body: format!("{{\"task\":\"{id}\"}}"),
            tracks: 2,
            filled: false,
        }],
        routes: Vec::new(),
        submitted_callback_url: None,
        first_delivery_delay: 0,
        timed_out: false,
        asked: crate::store::Asked::default(),
        archive: Vec::new(),
    }
}

fn ids(rows: &[crate::store::DueRow]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_claimed_task_is_no_other_daemons_until_released_or_its_lease_ends() {
    let Some(d) = daemons(2, Duration::from_secs(2)).await else {
        return;
    };
    let (a, b) = (&d[0], &d[1]);
    add(a, &["t1", "t2", "t3"]).await;
    let mine = a.due_window("default".into(), 2).await.expect("claim");
    assert_eq!(ids(&mine), ["t1", "t2"]);
    // B sees only what A did not claim; claiming again renews A's own.
    let theirs = b.due_window("default".into(), 10).await.expect("claim");
    assert_eq!(ids(&theirs), ["t3"]);
    assert_eq!(
        ids(&a.due_window("default".into(), 10).await.expect("claim")),
        ["t1", "t2"]
    );
    // A's poll of t1 releases it (and stores its stage once).
    a.apply_poll("t1".into(), 2000, |_| done("t1"))
        .await
        .expect("apply");
    // A poll applied twice (the second daemon after a lease ran out) stores nothing twice.
    let again = b
        .apply_poll("t1".into(), 2100, |_| done("t1"))
        .await
        .expect("apply");
    assert!(again.is_none(), "t1 is no longer active");
    assert_eq!(b.counts().await.expect("counts").events, 1);
    // A stops renewing: after its lease, t2 is B's (and t3 stays B's).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        ids(&b.due_window("default".into(), 10).await.expect("claim")),
        ["t2", "t3"]
    );
    // A daemon that stops lets go at once.
    b.close().await;
    assert_eq!(
        ids(&a.due_window("default".into(), 10).await.expect("claim")),
        ["t2", "t3"]
    );
    let live = a.daemons().await.expect("daemons");
    assert_eq!(live.len(), 1, "the closed daemon left: {live:?}");
    assert_eq!(live[0].id, a.me());
    assert_eq!(live[0].leases.tasks, 2);
    a.close().await;
}

#[tokio::test]
async fn each_daemon_hears_what_another_commits() {
    let Some(d) = daemons(2, Duration::from_secs(30)).await else {
        return;
    };
    let (a, b) = (&d[0], &d[1]);
    let mut heard = b.notes();
    // The listener connects in the background: wait (bounded) until it hears an add.
    let mut tasks = false;
    for i in 0..50 {
        add(a, &[&format!("warmup{i}")]).await;
        if let Ok(Ok(note)) = tokio::time::timeout(Duration::from_millis(200), heard.recv()).await {
            assert_eq!(note, Note::Tasks("default".into()));
            tasks = true;
            break;
        }
    }
    assert!(tasks, "B never heard of A's adds");
    while heard.try_recv().is_ok() {}
    add(a, &["x"]).await;
    let applied = a
        .apply_poll("x".into(), 2000, |_| done("x"))
        .await
        .expect("apply")
        .expect("active");
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), heard.recv()).await {
            Ok(Ok(note)) => got.push(note),
            other => panic!("B heard {got:?}, then {other:?}"),
        }
    }
    assert_eq!(
        got,
        [Note::Tasks("default".into()), Note::Events(applied.seqs[0])]
    );
    // Nothing is said for what a rolled-back transaction would have committed: a refused add
    // (another kind) is silent.
    let refused = a
        .add(
            vec!["x".into()],
            TaskSpec {
                kind: crate::api::families::Kind::Wav,
                ..TaskSpec::music(None, None)
            },
            3000,
            60_000,
        )
        .await
        .expect("add");
    assert_eq!(refused[0].result, crate::store::AddResult::OtherKind);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), heard.recv())
            .await
            .is_err(),
        "nothing was committed, nothing is said"
    );
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn events_stored_by_several_daemons_at_once_come_in_sequence_with_no_gap() {
    let Some(d) = daemons(3, Duration::from_secs(30)).await else {
        return;
    };
    let all: Vec<String> = (0..60).map(|i| format!("e{i}")).collect();
    d[0].add(all.clone(), TaskSpec::music(None, None), 1000, 60_000)
        .await
        .expect("add");
    let mut jobs = Vec::new();
    for (i, id) in all.iter().enumerate() {
        let s = d[i % 3].clone();
        let id = id.clone();
        jobs.push(tokio::spawn(async move {
            let task = id.clone();
            s.apply_poll(id, 2000, move |_| done(&task)).await
        }));
    }
    for j in jobs {
        j.await.expect("join").expect("apply").expect("active");
    }
    let events = d[1].events(0, None, None).await.expect("events");
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=60).collect::<Vec<_>>(),
        "one number each, in order"
    );
    assert_eq!(d[2].last_seq().await.expect("seq"), 60);
    for s in &d {
        s.close().await;
    }
}
