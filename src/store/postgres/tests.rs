//! What only a shared queue has: leases between daemons, and the news they pass each other.
//! Each test opens two (or three) backends on one fresh database of the test process's real
//! PostgreSQL, as two daemons on two hosts would.

use std::time::Duration;

use super::{Note, PgOptions, Postgres};
use crate::events::{NewEvent, Stage};
use crate::store::Kind;
use crate::store::{Backend, Route, TargetSpec, TaskSpec, TaskState, TaskUpdate};

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
    let mine = a.due_window("default".into(), 2).await.expect("claim").rows;
    assert_eq!(ids(&mine), ["t1", "t2"]);
    // B sees only what A did not claim; claiming again renews A's own.
    let theirs = b
        .due_window("default".into(), 10)
        .await
        .expect("claim")
        .rows;
    assert_eq!(ids(&theirs), ["t3"]);
    assert_eq!(
        ids(&a
            .due_window("default".into(), 10)
            .await
            .expect("claim")
            .rows),
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
        ids(&b
            .due_window("default".into(), 10)
            .await
            .expect("claim")
            .rows),
        ["t2", "t3"]
    );
    // A daemon that stops lets go at once.
    b.close().await;
    assert_eq!(
        ids(&a
            .due_window("default".into(), 10)
            .await
            .expect("claim")
            .rows),
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
                kind: crate::store::Kind::Wav,
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

fn spec(name: &str, port: u16, stages: &[Stage], kinds: Option<Vec<Kind>>) -> TargetSpec {
    TargetSpec {
        route: Route {
            target: name.to_owned(),
            url: format!("http://127.0.0.1:{port}/cb"),
            stages: stages.to_vec(),
        },
        kinds,
    }
}

/// A daemon of member `member` (its control socket, as the daemon names it) on `url`.
async fn member(url: &str, member: &str) -> Postgres {
    let mut options = PgOptions::new(url, None, Duration::from_secs(30), None).expect("options");
    options.member = Some(member.to_owned());
    Postgres::open(&options).await.expect("open")
}

/// A fresh database with two members on it, `a` and `b` (as two hosts' daemons).
async fn two_members() -> Option<(String, Postgres, Postgres)> {
    let url = crate::testing::postgres()?.database();
    let a = member(&url, "/run/a.sock").await;
    let b = member(&url, "/run/b.sock").await;
    Some((url, a, b))
}

async fn targets_of(s: &Postgres, task: &str) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = s
        .deliveries_of(task.to_owned())
        .await
        .expect("deliveries")
        .into_iter()
        .map(|(_, d)| (d.target, d.url, d.state))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn events_one_daemon_stores_are_routed_to_the_targets_another_names() {
    let Some((url, a, b)) = two_members().await else {
        return;
    };
    // A names `app` (every stage, every kind) and `lyrics-only`; B names no target at all.
    let lyrics_only = spec("lyrics-only", 10, &Stage::ALL, Some(vec![Kind::Lyrics]));
    let app = spec("app", 9, &Stage::ALL, None);
    a.fail_orphans(vec![app, lyrics_only], 1000)
        .await
        .expect("register");
    b.fail_orphans(Vec::new(), 1000).await.expect("register");
    add(&a, &["t1", "t2"]).await;
    b.apply_poll("t1".into(), 2000, |_| done("t1"))
        .await
        .expect("apply")
        .expect("applied");
    // B stored t1's event: its delivery goes to A's `app` (not to `lyrics-only`, which takes no
    // music), with the URL A registered.
    assert_eq!(
        targets_of(&b, "t1").await,
        [(
            "app".to_owned(),
            "http://127.0.0.1:9/cb".to_owned(),
            "pending".to_owned()
        )]
    );
    // A's deliveries are claimable by A (it names `app`), never by B.
    let none = b
        .due_deliveries(Vec::new(), Vec::new(), Vec::new(), 10)
        .await
        .expect("due")
        .rows;
    assert!(none.is_empty(), "B does not name app: {none:?}");
    let due = a
        .due_deliveries(vec!["app".into()], Vec::new(), Vec::new(), 10)
        .await
        .expect("due")
        .rows;
    assert_eq!(due.len(), 1);

    // A stops: its registration stays, so events B stores meanwhile still go to `app`, and B's
    // start (or reload) does not give them up as orphans.
    a.close().await;
    b.fail_orphans(Vec::new(), 3000).await.expect("register");
    b.apply_poll("t2".into(), 3000, |_| done("t2"))
        .await
        .expect("apply")
        .expect("applied");
    assert_eq!(targets_of(&b, "t1").await[0].2, "pending");
    assert_eq!(targets_of(&b, "t2").await[0].0, "app");
    assert_eq!(targets_of(&b, "t2").await[0].2, "pending");

    // A comes back (the same member, a new process) without `app` in its config: now no
    // member names it, and its pending deliveries are given up.
    let a = member(&url, "/run/a.sock").await;
    let gave_up = a.fail_orphans(Vec::new(), 4000).await.expect("register");
    assert_eq!(gave_up, 2);
    assert_eq!(targets_of(&a, "t1").await[0].2, "failed");
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn a_target_named_on_one_host_is_given_up_only_when_no_host_names_it() {
    let Some((_, a, b)) = two_members().await else {
        return;
    };
    let app = spec("app", 9, &Stage::ALL, None);
    a.fail_orphans(vec![app.clone()], 1000)
        .await
        .expect("register");
    b.fail_orphans(vec![app], 1000).await.expect("register");
    add(&a, &["t1"]).await;
    a.apply_poll("t1".into(), 2000, |_| {
        let mut u = done("t1");
        u.routes = vec![spec("app", 9, &Stage::ALL, None).route];
        u
    })
    .await
    .expect("apply");
    // A drops `app` from its config: B still names it, so nothing is given up.
    assert_eq!(a.fail_orphans(Vec::new(), 3000).await.expect("register"), 0);
    assert_eq!(targets_of(&a, "t1").await[0].2, "pending");
    // Then B drops it too.
    assert_eq!(b.fail_orphans(Vec::new(), 4000).await.expect("register"), 1);
    assert_eq!(targets_of(&a, "t1").await[0].2, "failed");
    a.close().await;
    b.close().await;
}

/// A poll of `id` that stores its `complete` with a delivery to `app` and one archive file.
fn done_with_work(id: &str) -> TaskUpdate {
    let mut u = done(id);
    u.routes = vec![spec("app", 9, &Stage::ALL, None).route];
    u.archive = vec![crate::store::AssetFile {
        name: "song.mp3".into(),
        kind: "audio".into(),
        audio_id: None,
        source: crate::store::AssetSource::Url("http://127.0.0.1:9/song.mp3".into()),
    }];
    u
}

fn attempt(status: u16) -> crate::store::AttemptRecord {
    crate::store::AttemptRecord {
        started_at: 3000,
        duration_ms: 5,
        status: Some(status),
        error: None,
    }
}

/// A lease running out is not an event: a claim says when the earliest lease another daemon
/// holds on the loop's work ends, for tasks, deliveries and archive files alike, so the loop
/// looks again then; a daemon's own leases are no reason for it to wake.
#[tokio::test]
async fn a_claim_says_when_the_work_another_daemon_holds_is_free() {
    let lease = Duration::from_secs(2);
    let Some(d) = daemons(2, lease).await else {
        return;
    };
    let (a, b) = (&d[0], &d[1]);
    let app = spec("app", 9, &Stage::ALL, None);
    a.fail_orphans(vec![app.clone()], 1000)
        .await
        .expect("register");
    b.fail_orphans(vec![app], 1000).await.expect("register");
    add(a, &["t1", "t2", "t3"]).await;
    let lease_ms = i64::try_from(lease.as_millis()).expect("ms");
    let ends_in = |c: Option<i64>| {
        let ms = c.expect("a foreign lease is reported");
        assert!((0..=lease_ms).contains(&ms), "ends in {ms} ms");
        ms
    };

    // Nothing held by anyone else: no reason to wake.
    let free = b.due_window("default".into(), 1).await.expect("claim");
    assert_eq!(ids(&free.rows), ["t1"]);
    assert_eq!(free.foreign_lease_ends_in, None);
    // A claims the rest; B, claiming again, gets only its own and hears when A's lease ends.
    let mine = a.due_window("default".into(), 10).await.expect("claim");
    assert_eq!(ids(&mine.rows), ["t2", "t3"]);
    assert_eq!(
        mine.foreign_lease_ends_in.map(|_| ()),
        Some(()),
        "B's lease on t1 is foreign to A"
    );
    let theirs = b.due_window("default".into(), 10).await.expect("claim");
    assert_eq!(ids(&theirs.rows), ["t1"]);
    ends_in(theirs.foreign_lease_ends_in);

    // Deliveries and files: A's poll of t2 stores both; A claims them.
    a.apply_poll("t2".into(), 2000, |_| done_with_work("t2"))
        .await
        .expect("apply")
        .expect("applied");
    let held = a
        .due_deliveries(vec!["app".into()], Vec::new(), Vec::new(), 10)
        .await
        .expect("due");
    assert_eq!(held.rows.len(), 1);
    let none = b
        .due_deliveries(vec!["app".into()], Vec::new(), Vec::new(), 10)
        .await
        .expect("due");
    assert!(none.rows.is_empty());
    ends_in(none.foreign_lease_ends_in);
    // B names no target of A's: A's deliveries are no work of B's, and no reason to wake it.
    let other = b
        .due_deliveries(vec!["other".into()], Vec::new(), Vec::new(), 10)
        .await
        .expect("due");
    assert_eq!(other.foreign_lease_ends_in, None);
    let files = a.due_files(Vec::new(), 3000, 10).await.expect("due");
    assert_eq!(files.rows.len(), 1);
    assert_eq!(files.foreign_lease_ends_in, None);
    let no_files = b.due_files(Vec::new(), 3000, 10).await.expect("due");
    assert!(no_files.rows.is_empty());
    ends_in(no_files.foreign_lease_ends_in);

    // A stops beating (as if killed: no `close`, which would let go at once). `status` shows
    // what it still holds, and when that is free.
    assert!(b.silent_holders().await.expect("silent").is_empty());
    a.stop.cancel();
    let conn = b.conn().await.expect("conn");
    conn.execute(
        "UPDATE daemons SET beat_at = beat_at - 60000 WHERE id = $1",
        &[&a.me()],
    )
    .await
    .expect("age A's heartbeat");
    drop(conn);
    let silent = b.silent_holders().await.expect("silent");
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(silent[0].id, a.me());
    assert_eq!(
        (
            silent[0].leases.tasks,
            silent[0].leases.deliveries,
            silent[0].leases.files
        ),
        (1, 1, 1),
        "t3 (t2 was polled), its delivery and its file: {silent:?}"
    );
    assert!((0..=lease_ms).contains(&silent[0].free_in_ms), "{silent:?}");
    // After its lease, B takes every piece of its work.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    assert!(
        b.silent_holders().await.expect("silent").is_empty(),
        "nothing is held once the leases ran out"
    );
    let taken = b.due_window("default".into(), 10).await.expect("claim");
    assert_eq!(ids(&taken.rows), ["t1", "t3"]);
    let taken = b
        .due_deliveries(vec!["app".into()], Vec::new(), Vec::new(), 10)
        .await
        .expect("due");
    assert_eq!(taken.rows.len(), 1);
    let taken = b.due_files(Vec::new(), 3000, 10).await.expect("due");
    assert_eq!(taken.rows.len(), 1);
    a.close().await;
    b.close().await;
}

/// A daemon stopped past its lease (SIGSTOP, a frozen VM) comes back with results of work
/// another daemon has taken over: they must not free that work while its new holder is busy
/// with it, nor undo what it recorded; a download notices at its next renewal and stops.
#[tokio::test]
async fn a_daemon_back_from_a_stall_does_not_undo_the_daemon_that_took_its_work() {
    let lease = Duration::from_secs(2);
    let Some(d) = daemons(3, lease).await else {
        return;
    };
    let (a, b, c) = (&d[0], &d[1], &d[2]);
    let app = spec("app", 9, &Stage::ALL, None);
    for s in [a, b, c] {
        s.fail_orphans(vec![app.clone()], 1000)
            .await
            .expect("register");
    }
    add(a, &["t1", "t2"]).await;
    // t2's work (a delivery and a file) exists; A claims t1, the delivery and the file.
    b.apply_poll("t2".into(), 2000, |_| done_with_work("t2"))
        .await
        .expect("apply")
        .expect("applied");
    assert_eq!(
        ids(&a.due_window("default".into(), 1).await.expect("claim").rows),
        ["t1"]
    );
    let a_delivery = a
        .due_deliveries(vec!["app".into()], Vec::new(), Vec::new(), 10)
        .await
        .expect("due")
        .rows
        .remove(0);
    let a_file = a
        .due_files(Vec::new(), 3000, 10)
        .await
        .expect("due")
        .rows
        .remove(0);
    assert!(
        a.renew_file(a_file.id).await.expect("renew"),
        "A's to renew"
    );

    // A stalls past its lease; B takes everything over.
    tokio::time::sleep(lease + Duration::from_millis(300)).await;
    assert_eq!(
        ids(&b
            .due_window("default".into(), 10)
            .await
            .expect("claim")
            .rows),
        ["t1"]
    );
    let b_delivery = b
        .due_deliveries(vec!["app".into()], Vec::new(), Vec::new(), 10)
        .await
        .expect("due")
        .rows
        .remove(0);
    assert_eq!(b_delivery.id, a_delivery.id);
    let b_file = b
        .due_files(Vec::new(), 3000, 10)
        .await
        .expect("due")
        .rows
        .remove(0);
    assert_eq!(b_file.id, a_file.id);

    // A comes back with an old answer about t1: while B holds t1 it writes nothing (B's own
    // request finds out the same), and t1 stays B's: C cannot claim it while B's request is in
    // flight.
    let late = a
        .apply_poll("t1".into(), 3000, |_| done("t1"))
        .await
        .expect("apply");
    assert!(late.is_none(), "A's late answer was dropped");
    let third = c.due_window("default".into(), 10).await.expect("claim");
    assert!(third.rows.is_empty(), "t1 is still B's: {third:?}");
    assert!(third.foreign_lease_ends_in.is_some());
    // B's answer decides (and releases t1).
    b.apply_poll("t1".into(), 3100, |_| done("t1"))
        .await
        .expect("apply")
        .expect("applied");
    // B delivered; A's late failure must not put the delivery back to pending.
    assert!(
        b.record_attempt(
            &b_delivery,
            attempt(204),
            crate::store::DeliveryNext::Delivered
        )
        .await
        .expect("record")
    );
    assert!(
        !a.record_attempt(
            &a_delivery,
            attempt(503),
            crate::store::DeliveryNext::Retry(9000)
        )
        .await
        .expect("record"),
        "A's attempt was overtaken"
    );
    assert_eq!(targets_of(a, "t2").await[0].2, "delivered");
    // A's download notices at its next renewal that B has the file now; A's result of it is
    // not written while B holds it.
    assert!(!a.renew_file(a_file.id).await.expect("renew"));
    let kept = crate::store::FileNext::Done {
        size: 3,
        sha256: "aaa".into(),
    };
    a.record_file(a_file.id, kept, 3000, None)
        .await
        .expect("record");
    let files = a.files_of("t2".into()).await.expect("files");
    assert_eq!(
        files[0].state,
        crate::store::FileState::Pending,
        "B's try decides"
    );
    for s in [a, b, c] {
        s.close().await;
    }
}

/// A retired host's registrations are forgotten on request: deliveries to a target only it
/// named are given up, those to a target another member names stay pending; nothing is done
/// while a daemon of that member runs, or on a dry run.
#[tokio::test]
async fn forgetting_a_member_gives_up_only_what_no_other_member_takes() {
    let Some((url, a, b)) = two_members().await else {
        return;
    };
    let app = spec("app", 9, &Stage::ALL, None);
    let audit = spec("audit", 10, &Stage::ALL, None);
    a.fail_orphans(vec![app.clone(), audit.clone()], 1000)
        .await
        .expect("register");
    b.fail_orphans(vec![app], 1000).await.expect("register");
    add(&a, &["t1"]).await;
    b.apply_poll("t1".into(), 2000, |_| done("t1"))
        .await
        .expect("apply")
        .expect("applied");
    let a_member = a.member().to_owned();
    let options = PgOptions::new(&url, None, Duration::from_secs(30), None).expect("options");

    // A runs: refused, nothing changed.
    let refused = super::forget_member(&options, &a_member, false)
        .await
        .expect("forget");
    assert!(refused.running.is_some(), "{refused:?}");
    assert_eq!(refused.given_up, 0);
    a.close().await;

    // A dry run says what would happen and changes nothing.
    let plan = super::forget_member(&options, &a_member, true)
        .await
        .expect("forget");
    assert_eq!(plan.running, None);
    let by_name: Vec<(String, Vec<String>, i64)> = plan
        .targets
        .iter()
        .map(|t| (t.name.clone(), t.still_named_by.clone(), t.pending))
        .collect();
    assert_eq!(
        by_name,
        [
            ("app".to_owned(), vec![b.member().to_owned()], 1),
            ("audit".to_owned(), Vec::new(), 1)
        ]
    );
    assert_eq!(plan.given_up, 0);
    assert_eq!(
        targets_of(&b, "t1")
            .await
            .iter()
            .map(|t| t.2.as_str())
            .collect::<Vec<_>>(),
        ["pending", "pending"]
    );

    // Forgotten: audit's delivery is given up, app's stays for B.
    let done_ = super::forget_member(&options, &a_member, false)
        .await
        .expect("forget");
    assert_eq!(done_.given_up, 1);
    let states: Vec<(String, String)> = targets_of(&b, "t1")
        .await
        .into_iter()
        .map(|(target, _, state)| (target, state))
        .collect();
    assert_eq!(
        states,
        [
            ("app".to_owned(), "pending".to_owned()),
            ("audit".to_owned(), "failed".to_owned())
        ]
    );
    let registered = b.shared_targets().await.expect("targets");
    assert_eq!(
        registered,
        [("app".to_owned(), vec![b.member().to_owned()])]
    );
    // An unknown member: nothing to forget, and the known ones are named.
    let unknown = super::forget_member(&options, "nowhere:/x.sock", false)
        .await
        .expect("forget");
    assert!(unknown.targets.is_empty());
    assert_eq!(unknown.members, [b.member().to_owned()]);
    b.close().await;
}

/// A daemon stopped inside a transaction must not stall everyone else behind its row locks:
/// the server ends a session idle in a transaction for half a lease, and the others' writes go
/// through; the stopped one's transaction is gone when it comes back.
#[tokio::test]
async fn a_transaction_left_open_by_a_stopped_daemon_does_not_stall_the_others() {
    let lease = Duration::from_secs(2);
    let Some(d) = daemons(2, lease).await else {
        return;
    };
    let (a, b) = (&d[0], &d[1]);
    add(a, &["t1"]).await;
    let shown: String = b
        .conn()
        .await
        .expect("conn")
        .query_one("SHOW idle_in_transaction_session_timeout", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(shown, "1s", "half the lease");
    // A takes t1's row lock and stops (as if SIGSTOPped) before committing.
    let mut conn = a.conn().await.expect("conn");
    let tx = conn.transaction().await.expect("begin");
    tx.execute("SELECT 1 FROM tasks WHERE id = 't1' FOR UPDATE", &[])
        .await
        .expect("lock");
    // B's poll of t1 waits for the lock only until the server ends A's session.
    let applied = tokio::time::timeout(
        Duration::from_secs(20),
        b.apply_poll("t1".into(), 2000, |_| done("t1")),
    )
    .await
    .expect("B is not stalled behind A's open transaction")
    .expect("apply");
    assert!(applied.is_some());
    assert!(
        tx.commit().await.is_err(),
        "A's transaction was ended by the server"
    );
    drop(conn);
    for s in &d {
        s.close().await;
    }
}
