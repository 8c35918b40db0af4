//! The store over TLS against a real PostgreSQL ([`PgCluster::spawn_tls`]: `ssl = on`, a
//! certificate from a throwaway CA, TCP clients let in only over TLS). Each test opens the store
//! as the daemon does (`PgOptions::new`, then `Store::open_postgres`) and checks that what should
//! connect does, over TLS, and that what should not is refused with an error that says why.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use super::PgOptions;
use crate::store::{Store, StoreError, TaskSpec, TaskState};
use crate::testing::PgCluster;

/// The TLS cluster the tests that do not need a certificate of their own share. `None` (after a
/// NOT RUN line) where PostgreSQL or openssl is missing; a failure in CI.
fn cluster() -> Option<&'static PgCluster> {
    static CLUSTER: OnceLock<Option<PgCluster>> = OnceLock::new();
    let cluster = CLUSTER.get_or_init(PgCluster::spawn_tls).as_ref();
    if cluster.is_none() {
        // The first test to look said which tool is missing; every test that skips says so.
        eprintln!(
            "NOT RUN: no TLS cluster (PostgreSQL or openssl missing); this check was skipped"
        );
    }
    cluster
}

/// Creates the empty database `name` on `cluster` (over its Unix socket).
fn create_db(cluster: &PgCluster, name: &str) {
    cluster.psql("postgres", &format!("CREATE DATABASE {name}"));
}

/// Opens the store as the daemon does, with `ca_file` as `[store] ca-file`.
async fn open(url: &str, ca_file: Option<PathBuf>) -> Result<Store, StoreError> {
    let options =
        PgOptions::new(url, None, Duration::from_secs(30), ca_file).map_err(StoreError::Open)?;
    Store::open_postgres(&options).await
}

/// How many of database `db`'s sessions came in over TLS, and how many did not (the cluster's own
/// view, `pg_stat_ssl`).
fn sessions(cluster: &PgCluster, db: &str) -> (u32, u32) {
    let out = cluster.psql(
        "postgres",
        &format!(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = '{db}'"
        ),
    );
    let (tls, plain) = out.trim().split_once('|').expect("two counts");
    (
        tls.parse().expect("a count"),
        plain.parse().expect("a count"),
    )
}

/// Adds a task and reads it back.
async fn round_trip(store: &Store, id: &str) {
    let added = store
        .add(
            vec![id.to_owned()],
            TaskSpec::music(None, None),
            1000,
            60_000,
        )
        .await
        .expect("add over TLS");
    assert_eq!(added.len(), 1);
    let (task, events) = store
        .show(id.to_owned())
        .await
        .expect("show over TLS")
        .expect("the task just added");
    assert_eq!(task.task_id, id);
    assert_eq!(task.state, TaskState::Active);
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn require_with_the_ca_file_opens_over_tls() {
    let Some(cluster) = cluster() else { return };
    for (db, sslmode) in [("tls_require", "require"), ("tls_prefer", "prefer")] {
        create_db(cluster, db);
        let url = cluster.tls_url(db, sslmode);
        let store = open(&url, Some(cluster.ca_file().to_path_buf()))
            .await
            .unwrap_or_else(|e| panic!("sslmode={sslmode} with the CA: {e}"));
        let mut heard = store.notes().expect("a PostgreSQL store has notes");
        round_trip(&store, &format!("task-{sslmode}")).await;
        // The listener (a connection of its own, not from the pool) connects in the background:
        // add (bounded) until it hears one, which proves it came up over TLS too.
        let mut listening = false;
        for i in 0..50 {
            let id = format!("warmup-{sslmode}-{i}");
            store
                .add(vec![id], TaskSpec::music(None, None), 1000, 60_000)
                .await
                .expect("add over TLS");
            let note = tokio::time::timeout(Duration::from_millis(200), heard.recv()).await;
            if let Ok(Ok(note)) = note {
                assert_eq!(note, super::Note::Tasks("default".into()));
                listening = true;
                break;
            }
        }
        assert!(
            listening,
            "sslmode={sslmode}: the listener never heard an add"
        );
        let (tls, plain) = sessions(cluster, db);
        assert!(
            tls >= 2,
            "sslmode={sslmode}: pool and listener over TLS, got {tls}"
        );
        assert_eq!(plain, 0, "sslmode={sslmode}: a session without TLS");
        store.close().await;
    }
}

#[tokio::test]
async fn require_without_the_ca_file_is_refused_for_an_unknown_issuer() {
    let Some(cluster) = cluster() else { return };
    create_db(cluster, "tls_no_ca");
    let err = open(&cluster.tls_url("tls_no_ca", "require"), None)
        .await
        .expect_err("a server certificate from a CA nobody trusts");
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(
        text.contains("not signed by a CA this host trusts"),
        "{text}"
    );
    assert!(text.contains("set store.ca-file"), "{text}");
    assert!(
        text.contains("127.0.0.1"),
        "the error names the server: {text}"
    );
    assert!(
        !text.contains("is it running"),
        "the server answered: {text}"
    );
}

#[tokio::test]
async fn disable_is_refused_by_the_servers_pg_hba() {
    let Some(cluster) = cluster() else { return };
    create_db(cluster, "tls_disable");
    let err = open(
        &cluster.tls_url("tls_disable", "disable"),
        Some(cluster.ca_file().to_path_buf()),
    )
    .await
    .expect_err("pg_hba lets TCP clients in only over TLS");
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("pg_hba.conf rejects connection"), "{text}");
    assert!(text.contains("no encryption"), "{text}");
    assert!(
        text.contains("does not let this connection in without TLS"),
        "{text}"
    );
    assert!(text.contains("set sslmode=require"), "{text}");
    assert!(
        !text.contains("is it running"),
        "the server answered: {text}"
    );
}

#[tokio::test]
async fn a_ca_file_that_is_not_pem_is_refused_by_name() {
    let Some(cluster) = cluster() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = cluster.tls_url("postgres", "require");
    // Text with no certificate in it, and a certificate block whose body is not base64.
    let cases = [
        (
            "notes.pem",
            "this is not a certificate\n",
            "holds no certificate",
        ),
        (
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n",
            "not PEM certificates",
        ),
    ];
    for (name, text, says) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let err = open(&url, Some(path.clone()))
            .await
            .expect_err("a ca-file with no usable certificate");
        let shown = err.to_string();
        assert!(shown.contains("store.ca-file"), "{shown}");
        assert!(shown.contains(&path.display().to_string()), "{shown}");
        assert!(shown.contains(says), "{name}: {shown}");
    }
    let missing = dir.path().join("missing.pem");
    let err = open(&url, Some(missing.clone()))
        .await
        .expect_err("a ca-file that is not there");
    let shown = err.to_string();
    assert!(shown.contains(&missing.display().to_string()), "{shown}");
    assert!(shown.contains("cannot read it"), "{shown}");
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused_for_its_name() {
    // Its own cluster: its certificate names only db.invalid, not the 127.0.0.1 we connect to.
    let Some(cluster) = PgCluster::spawn_tls_for("DNS:db.invalid") else {
        return;
    };
    create_db(&cluster, "tls_other_name");
    let err = open(
        &cluster.tls_url("tls_other_name", "require"),
        Some(cluster.ca_file().to_path_buf()),
    )
    .await
    .expect_err("the certificate is not for 127.0.0.1");
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("not valid for name \"127.0.0.1\""), "{text}");
    assert!(text.contains("db.invalid"), "what it is for: {text}");
    assert!(
        text.contains("not made for the host store.url names"),
        "{text}"
    );
    assert!(
        !text.contains("is it running"),
        "the server answered: {text}"
    );
}
