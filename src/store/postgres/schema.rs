//! The PostgreSQL schema: the same tables, columns and meaning as the SQLite store's (see
//! `sqlite::schema`, whose migrations explain each column), as a first migration for the shape
//! the SQLite store had when this backend was added and later ones for what changed since,
//! plus what several daemons on one queue need: leases on the work each has claimed
//! (`claimed_by`, `lease_until`), the daemons' heartbeat rows (`daemons`), the event sequence
//! counter (`store_meta`), and each account's shared request budget (`accounts.next_slot`).
//!
//! Migrations are applied by the first daemon to start, under an advisory lock so daemons
//! starting together do not race, and recorded in `sunopoll_schema`. Times are Unix
//! milliseconds, as in SQLite. Two clocks meet here, and each has one use: the daemons' clocks
//! (passed in as `now`) for everything a task's schedule says, as in SQLite, so a store copied
//! between the backends means the same; the database's clock ([`DB_NOW`]) for leases,
//! heartbeats and the request budget, which several hosts must agree on whatever their clocks
//! say.

use tokio_postgres::Client;

/// The database's clock, in Unix milliseconds: what leases, heartbeats and the budget are
/// judged by. `clock_timestamp()`, not `now()`: the latter is the transaction's start.
pub(super) const DB_NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// The advisory lock key migrations run under ("sunopoll" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x73756e6f706f6c6c;

/// The schema, one entry per version; `sunopoll_schema` says which have been applied.
pub(super) const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE tasks (
    id           TEXT PRIMARY KEY NOT NULL,
    -- The listing order and page cursor (SQLite's rowid): newest last.
    rowid        BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    state        TEXT NOT NULL CHECK (state IN ('active', 'done', 'failed', 'removed')),
    stage        TEXT CHECK (stage IN ('text', 'first', 'complete', 'error')),
    last_status  TEXT,
    last_error   TEXT,
    polls        BIGINT NOT NULL DEFAULT 0,
    failures     BIGINT NOT NULL DEFAULT 0,
    rejections   BIGINT NOT NULL DEFAULT 0,
    added_at     BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    next_poll_at BIGINT NOT NULL,
    deadline_at  BIGINT NOT NULL,
    finished_at  BIGINT,
    callback_url TEXT,
    label        TEXT,
    submitted_callback_url TEXT,
    asked_ms     BIGINT NOT NULL DEFAULT 0,
    asked_at     BIGINT,
    asked_gap    BIGINT NOT NULL DEFAULT 0,
    kind         TEXT NOT NULL DEFAULT 'music',
    account      TEXT NOT NULL DEFAULT 'default',
    -- The daemon polling this task now, and until when (the database's clock) no other may.
    claimed_by   TEXT,
    lease_until  BIGINT
);
CREATE INDEX tasks_account_due ON tasks (account, next_poll_at) WHERE state = 'active';
CREATE INDEX tasks_due ON tasks (next_poll_at) WHERE state = 'active';
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE state <> 'active';
CREATE INDEX tasks_state ON tasks (state, rowid);
CREATE INDEX tasks_claimed ON tasks (claimed_by) WHERE claimed_by IS NOT NULL;

-- The event sequence: assigned from this one row, locked until the transaction storing the
-- event commits, so events commit in sequence order and a follower reading `seq > N` never
-- misses one that commits later with a lower number (a SEQUENCE would hand numbers out in
-- the order transactions start, not commit). It is also the high-water mark pruning keeps.
CREATE TABLE store_meta (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    last_seq BIGINT NOT NULL
);
INSERT INTO store_meta (id, last_seq) VALUES (1, 0);

CREATE TABLE events (
    seq        BIGINT PRIMARY KEY,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    stage      TEXT NOT NULL CHECK (stage IN ('text', 'first', 'complete', 'error', 'archived')),
    code       BIGINT NOT NULL,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    kind       TEXT NOT NULL DEFAULT 'music',
    UNIQUE (task_id, stage)
);
CREATE INDEX events_task ON events (task_id, seq);

CREATE TABLE deliveries (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_seq       BIGINT NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    task_id         TEXT NOT NULL,
    target          TEXT NOT NULL,
    url             TEXT NOT NULL,
    origin          TEXT NOT NULL,
    webhook_id      TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_attempt_at BIGINT,
    last_status     BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT,
    updated_at      BIGINT NOT NULL,
    replays         BIGINT NOT NULL DEFAULT 0,
    ready           BOOLEAN NOT NULL DEFAULT FALSE,
    claimed_by      TEXT,
    lease_until     BIGINT,
    UNIQUE (event_seq, target)
);
CREATE INDEX deliveries_ready ON deliveries (next_attempt_at) WHERE state = 'pending' AND ready;
CREATE INDEX deliveries_order ON deliveries (task_id, target, event_seq);
CREATE INDEX deliveries_target ON deliveries (target, state, delivered_at);
CREATE INDEX deliveries_errors ON deliveries (target, last_attempt_at) WHERE last_error IS NOT NULL;
CREATE INDEX deliveries_pending ON deliveries (target, created_at) WHERE state = 'pending';
CREATE INDEX deliveries_claimed ON deliveries (claimed_by) WHERE claimed_by IS NOT NULL;

CREATE TABLE attempts (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id BIGINT NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt     BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    status      BIGINT,
    error       TEXT,
    outcome     TEXT NOT NULL
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);

CREATE TABLE accounts (
    name         TEXT PRIMARY KEY NOT NULL,
    pause_kind   TEXT,
    attempt      BIGINT NOT NULL DEFAULT 0,
    paused_until BIGINT NOT NULL DEFAULT 0,
    since        BIGINT NOT NULL DEFAULT 0,
    cause        TEXT NOT NULL DEFAULT '',
    learnt_rate  DOUBLE PRECISION,
    -- The shared request budget: the earliest moment (the database's clock) the next request
    -- of this account may be sent by any daemon.
    next_slot    BIGINT NOT NULL DEFAULT 0,
    -- The one daemon sending the probe after a pause, and until when (the database's clock).
    probe_by     TEXT,
    probe_until  BIGINT
);

CREATE TABLE archive_files (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id     TEXT NOT NULL,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    audio_id    TEXT,
    url         TEXT,
    inline      TEXT,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed', 'expired')),
    size        BIGINT,
    sha256      TEXT,
    validator   TEXT,
    attempts    BIGINT NOT NULL DEFAULT 0,
    next_try_at BIGINT NOT NULL,
    last_error  TEXT,
    created_at  BIGINT NOT NULL,
    done_at     BIGINT,
    updated_at  BIGINT NOT NULL,
    claimed_by  TEXT,
    lease_until BIGINT,
    UNIQUE (task_id, name)
);
CREATE INDEX archive_oldest ON archive_files (created_at, id) WHERE state = 'pending';
CREATE INDEX archive_next ON archive_files (next_try_at) WHERE state = 'pending';

-- The daemons sharing this queue: each beats while it runs.
CREATE TABLE daemons (
    id         TEXT PRIMARY KEY NOT NULL,
    host       TEXT NOT NULL,
    pid        BIGINT NOT NULL,
    version    TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    beat_at    BIGINT NOT NULL,
    -- The targets its configuration named (until migration 2 moved them to `targets`).
    targets    TEXT[] NOT NULL DEFAULT '{}'
);

-- Counts are kept, not counted, as in SQLite: triggers keep them in the transaction of every
-- change. Each trigger changes its count rows in one statement, in key order, so two
-- transactions moving rows between the same counts lock them in the same order.
CREATE TABLE task_counts (
    state   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    account TEXT NOT NULL,
    n       BIGINT NOT NULL,
    PRIMARY KEY (state, kind, account)
);
CREATE FUNCTION task_counts_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.state = NEW.state AND OLD.kind = NEW.kind
       AND OLD.account = NEW.account THEN
        RETURN NULL;
    END IF;
    INSERT INTO task_counts AS c (state, kind, account, n)
        SELECT state, kind, account, SUM(d) FROM (
            SELECT OLD.state AS state, OLD.kind AS kind, OLD.account AS account, -1 AS d
                WHERE TG_OP <> 'INSERT'
            UNION ALL
            SELECT NEW.state, NEW.kind, NEW.account, 1 WHERE TG_OP <> 'DELETE'
        ) AS change GROUP BY state, kind, account ORDER BY state, kind, account
        ON CONFLICT (state, kind, account) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END $$;
CREATE TRIGGER task_counts_keep AFTER INSERT OR UPDATE OF state, kind, account OR DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION task_counts_keep();

CREATE TABLE event_counts (
    stage TEXT PRIMARY KEY NOT NULL,
    n     BIGINT NOT NULL
);
CREATE FUNCTION event_counts_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO event_counts AS c (stage, n) VALUES (NEW.stage, 1)
            ON CONFLICT (stage) DO UPDATE SET n = c.n + 1;
    ELSE
        UPDATE event_counts SET n = n - 1 WHERE stage = OLD.stage;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER event_counts_keep AFTER INSERT OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION event_counts_keep();

CREATE TABLE delivery_counts (
    target TEXT NOT NULL,
    state  TEXT NOT NULL,
    n      BIGINT NOT NULL,
    PRIMARY KEY (target, state)
);
CREATE FUNCTION delivery_counts_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.state = NEW.state AND OLD.target = NEW.target THEN
        RETURN NULL;
    END IF;
    INSERT INTO delivery_counts AS c (target, state, n)
        SELECT target, state, SUM(d) FROM (
            SELECT OLD.target AS target, OLD.state AS state, -1 AS d WHERE TG_OP <> 'INSERT'
            UNION ALL
            SELECT NEW.target, NEW.state, 1 WHERE TG_OP <> 'DELETE'
        ) AS change GROUP BY target, state ORDER BY target, state
        ON CONFLICT (target, state) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END $$;
CREATE TRIGGER delivery_counts_keep AFTER INSERT OR UPDATE OF state, target OR DELETE ON deliveries
    FOR EACH ROW EXECUTE FUNCTION delivery_counts_keep();

CREATE TABLE archive_counts (
    state TEXT PRIMARY KEY NOT NULL,
    n     BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
CREATE FUNCTION archive_counts_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.state = NEW.state
       AND OLD.size IS NOT DISTINCT FROM NEW.size THEN
        RETURN NULL;
    END IF;
    INSERT INTO archive_counts AS c (state, n, bytes)
        SELECT state, SUM(d), SUM(b) FROM (
            SELECT OLD.state AS state, -1 AS d, -COALESCE(OLD.size, 0) AS b
                WHERE TG_OP <> 'INSERT'
            UNION ALL
            SELECT NEW.state, 1, COALESCE(NEW.size, 0) WHERE TG_OP <> 'DELETE'
        ) AS change GROUP BY state ORDER BY state
        ON CONFLICT (state) DO UPDATE SET n = c.n + EXCLUDED.n, bytes = c.bytes + EXCLUDED.bytes;
    RETURN NULL;
END $$;
CREATE TRIGGER archive_counts_keep AFTER INSERT OR UPDATE OF state, size OR DELETE ON archive_files
    FOR EACH ROW EXECUTE FUNCTION archive_counts_keep();
",
    r"
-- Targets are shared by name, and routing must not depend on which daemon stores an event: each
-- daemon registers the targets its configuration names under its member name (host and control
-- socket, the same across its restarts), and events are routed to every registered target. A
-- registration outlives its daemon's stops, so deliveries to a target whose every daemon is down
-- wait for one to return instead of never being made. It changes only when that member starts
-- or reloads with other targets.
CREATE TABLE targets (
    name       TEXT NOT NULL,
    member     TEXT NOT NULL,
    url        TEXT NOT NULL,
    stages     TEXT[] NOT NULL,
    -- The task families it takes; NULL: all.
    kinds      TEXT[],
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (name, member)
);
-- Replaced by `targets`, which outlive a daemon's heartbeat row.
ALTER TABLE daemons DROP COLUMN targets;
",
    r"
-- Which member (host and control socket) each running daemon is, so that retiring a member's
-- registrations (`sunopoll store forget-member`) can refuse while that member still runs.
ALTER TABLE daemons ADD COLUMN member TEXT;
",
];

/// Applies the migrations this database lacks, in one transaction under an advisory lock
/// (a second daemon starting at the same moment waits, then finds nothing to do). A database
/// migrated by a newer sunopoll is refused: this build would misread it.
pub(super) async fn migrate(client: &mut Client) -> Result<(), String> {
    let explain = |e: tokio_postgres::Error| super::describe(&e);
    let tx = client.transaction().await.map_err(explain)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(explain)?;
    // `IF NOT EXISTS` would otherwise send a NOTICE at every start after the first.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS sunopoll_schema (
             version    INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(explain)?;
    let applied: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM sunopoll_schema", &[])
        .await
        .map_err(explain)?
        .get(0);
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if applied > known {
        return Err(format!(
            "the database has schema version {applied}, newer than this sunopoll knows ({known}); \
             run the newer sunopoll, or restore a matching backup"
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let version = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.batch_execute(sql)
            .await
            .map_err(|e| format!("migration {version} failed: {}", super::describe(&e)))?;
        tx.execute(
            "INSERT INTO sunopoll_schema (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(explain)?;
    }
    tx.commit().await.map_err(explain)
}
