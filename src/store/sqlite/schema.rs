//! The SQLite schema and everything about the file itself: migrations by `PRAGMA
//! user_version`, the check that a file is a sunopoll store before anything is changed, the
//! pragmas that make a commit durable (WAL, `synchronous=FULL`), the lock on the database file
//! that keeps a second daemon out (and notices the file being deleted or replaced), and open
//! errors explained for people.

use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

/// How long SQLite waits for a lock held by another process before failing.
pub(super) const BUSY_TIMEOUT_MS: u32 = 5000;

/// The schema, one entry per version. `PRAGMA user_version` says how many have been applied.
pub(super) const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE tasks (
    id           TEXT PRIMARY KEY NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('active', 'done', 'failed', 'removed')),
    stage        TEXT CHECK (stage IN ('text', 'first', 'complete', 'error')),
    last_status  TEXT,
    last_error   TEXT,
    polls        INTEGER NOT NULL DEFAULT 0,
    failures     INTEGER NOT NULL DEFAULT 0,
    rejections   INTEGER NOT NULL DEFAULT 0,
    added_at     INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    next_poll_at INTEGER NOT NULL,
    deadline_at  INTEGER NOT NULL,
    finished_at  INTEGER,
    callback_url TEXT,
    label        TEXT
);
CREATE INDEX tasks_due ON tasks (next_poll_at) WHERE state = 'active';
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE state <> 'active';
CREATE TABLE events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    stage      TEXT NOT NULL CHECK (stage IN ('text', 'first', 'complete', 'error')),
    code       INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (task_id, stage)
);
CREATE TABLE gate (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    kind         TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    paused_until INTEGER NOT NULL,
    since        INTEGER NOT NULL,
    cause        TEXT NOT NULL
);
",
    r"
ALTER TABLE tasks ADD COLUMN submitted_callback_url TEXT;
CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,
    event_seq       INTEGER NOT NULL REFERENCES events (seq) ON DELETE CASCADE,
    task_id         TEXT NOT NULL,
    target          TEXT NOT NULL,
    url             TEXT NOT NULL,
    origin          TEXT NOT NULL,
    webhook_id      TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_attempt_at INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    updated_at      INTEGER NOT NULL,
    UNIQUE (event_seq, target)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_order ON deliveries (task_id, target, event_seq);
CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT,
    outcome     TEXT NOT NULL
);
CREATE INDEX attempts_delivery ON attempts (delivery_id);
",
    // How many times a delivery was replayed: an attempt that was in flight when a replay was
    // requested must not record its result over the replay (see `record_attempt`).
    r"
ALTER TABLE deliveries ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;
",
    // The head of each (task, target) queue is marked `ready`, so finding due deliveries is one
    // walk of a small index instead of checking every pending row for an earlier one (76 ms a
    // pass with a dead handler's 60 000-row backlog). Plus indexes for `status` and counts.
    r"
ALTER TABLE deliveries ADD COLUMN ready INTEGER NOT NULL DEFAULT 0;
UPDATE deliveries SET ready = 1 WHERE state = 'pending' AND NOT EXISTS
    (SELECT 1 FROM deliveries p WHERE p.task_id = deliveries.task_id AND p.target = deliveries.target
                                  AND p.state = 'pending' AND p.event_seq < deliveries.event_seq);
DROP INDEX deliveries_due;
CREATE INDEX deliveries_ready ON deliveries (next_attempt_at) WHERE state = 'pending' AND ready = 1;
CREATE INDEX deliveries_target ON deliveries (target, state, delivered_at);
CREATE INDEX deliveries_errors ON deliveries (target, last_attempt_at) WHERE last_error IS NOT NULL;
",
    // Nothing an operator asks may grow with the queue. Counts are kept, not counted: triggers
    // keep them in the same transaction as every change of a task's or delivery's state, so no
    // code path can forget one; the migration fills them by one recount. Tasks are counted per
    // (state, kind) so task families can add their kind; today every task is 'music'. And
    // `list --state X` walks `tasks_state` (its rowid order is newest first) instead of
    // scanning, and the oldest pending delivery of a target is one seek of
    // `deliveries_pending`.
    r"
CREATE INDEX tasks_state ON tasks (state);
CREATE TABLE task_counts (
    state TEXT NOT NULL,
    kind  TEXT NOT NULL DEFAULT 'music',
    n     INTEGER NOT NULL,
    PRIMARY KEY (state, kind)
) WITHOUT ROWID;
INSERT INTO task_counts (state, kind, n) SELECT state, 'music', COUNT(*) FROM tasks GROUP BY state;
CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN
    INSERT INTO task_counts (state, kind, n) VALUES (NEW.state, 'music', 1)
        ON CONFLICT (state, kind) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER task_counts_update AFTER UPDATE OF state ON tasks WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE task_counts SET n = n - 1 WHERE state = OLD.state AND kind = 'music';
    INSERT INTO task_counts (state, kind, n) VALUES (NEW.state, 'music', 1)
        ON CONFLICT (state, kind) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN
    UPDATE task_counts SET n = n - 1 WHERE state = OLD.state AND kind = 'music';
END;
CREATE TABLE event_counts (
    stage TEXT PRIMARY KEY NOT NULL,
    n     INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO event_counts (stage, n) SELECT stage, COUNT(*) FROM events GROUP BY stage;
CREATE TRIGGER event_counts_insert AFTER INSERT ON events BEGIN
    INSERT INTO event_counts (stage, n) VALUES (NEW.stage, 1)
        ON CONFLICT (stage) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER event_counts_delete AFTER DELETE ON events BEGIN
    UPDATE event_counts SET n = n - 1 WHERE stage = OLD.stage;
END;
CREATE TABLE delivery_counts (
    target TEXT NOT NULL,
    state  TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (target, state)
) WITHOUT ROWID;
INSERT INTO delivery_counts (target, state, n)
    SELECT target, state, COUNT(*) FROM deliveries GROUP BY target, state;
CREATE TRIGGER delivery_counts_insert AFTER INSERT ON deliveries BEGIN
    INSERT INTO delivery_counts (target, state, n) VALUES (NEW.target, NEW.state, 1)
        ON CONFLICT (target, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER delivery_counts_update AFTER UPDATE OF state ON deliveries
    WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE delivery_counts SET n = n - 1 WHERE target = OLD.target AND state = OLD.state;
    INSERT INTO delivery_counts (target, state, n) VALUES (NEW.target, NEW.state, 1)
        ON CONFLICT (target, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER delivery_counts_delete AFTER DELETE ON deliveries BEGIN
    UPDATE delivery_counts SET n = n - 1 WHERE target = OLD.target AND state = OLD.state;
END;
CREATE INDEX deliveries_pending ON deliveries (target, created_at) WHERE state = 'pending';
",
    // A task's deadline counts only the time in which it was being asked about (issue 10):
    // `asked_ms` is that time so far, `asked_at` when the API last answered about the task
    // (NULL: never) and `asked_gap` the wait planned after that answer, which caps what the next
    // answer adds, so backlog, pauses and clock steps never count.
    r"
ALTER TABLE tasks ADD COLUMN asked_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN asked_at INTEGER;
ALTER TABLE tasks ADD COLUMN asked_gap INTEGER NOT NULL DEFAULT 0;
",
    // Task families and accounts (issue 11). A task is polled through its `kind`'s adapter on
    // its `account`; every task so far is a music task on the one account ('default', the
    // name the single `[api]` section's account has). Events carry their task's kind so a
    // follower and a target's `kinds` filter need no join. Each account polls its own tasks
    // (`tasks_account_due`), counts are kept per (state, kind, account), and each account has
    // its own pause and its learnt request rate (`accounts`, replacing the one-row `gate`).
    r"
ALTER TABLE tasks ADD COLUMN kind TEXT NOT NULL DEFAULT 'music';
ALTER TABLE tasks ADD COLUMN account TEXT NOT NULL DEFAULT 'default';
ALTER TABLE events ADD COLUMN kind TEXT NOT NULL DEFAULT 'music';
CREATE INDEX tasks_account_due ON tasks (account, next_poll_at) WHERE state = 'active';
DROP TRIGGER task_counts_insert;
DROP TRIGGER task_counts_update;
DROP TRIGGER task_counts_delete;
DROP TABLE task_counts;
CREATE TABLE task_counts (
    state   TEXT NOT NULL,
    kind    TEXT NOT NULL,
    account TEXT NOT NULL,
    n       INTEGER NOT NULL,
    PRIMARY KEY (state, kind, account)
) WITHOUT ROWID;
INSERT INTO task_counts (state, kind, account, n)
    SELECT state, kind, account, COUNT(*) FROM tasks GROUP BY state, kind, account;
CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN
    INSERT INTO task_counts (state, kind, account, n) VALUES (NEW.state, NEW.kind, NEW.account, 1)
        ON CONFLICT (state, kind, account) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER task_counts_update AFTER UPDATE OF state, kind, account ON tasks
    WHEN OLD.state IS NOT NEW.state OR OLD.kind IS NOT NEW.kind OR OLD.account IS NOT NEW.account BEGIN
    UPDATE task_counts SET n = n - 1
        WHERE state = OLD.state AND kind = OLD.kind AND account = OLD.account;
    INSERT INTO task_counts (state, kind, account, n) VALUES (NEW.state, NEW.kind, NEW.account, 1)
        ON CONFLICT (state, kind, account) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN
    UPDATE task_counts SET n = n - 1
        WHERE state = OLD.state AND kind = OLD.kind AND account = OLD.account;
END;
CREATE TABLE accounts (
    name         TEXT PRIMARY KEY NOT NULL,
    pause_kind   TEXT,
    attempt      INTEGER NOT NULL DEFAULT 0,
    paused_until INTEGER NOT NULL DEFAULT 0,
    since        INTEGER NOT NULL DEFAULT 0,
    cause        TEXT NOT NULL DEFAULT '',
    learnt_rate  REAL
) WITHOUT ROWID;
INSERT INTO accounts (name, pause_kind, attempt, paused_until, since, cause)
    SELECT 'default', kind, attempt, paused_until, since, cause FROM gate;
DROP TABLE gate;
",
    // Migration 8 (issue 12, the archive): one row per file a finished task leaves behind,
    // written in the same transaction as its `complete` event. Rows are not tied to `tasks` by a
    // foreign key: pruning a task never forgets what was kept of it. `validator` is the first answer's
    // ETag or Last-Modified, for `If-Range` when a `.part` is resumed; `inline` the content of
    // a file written from the result itself (midi, lyrics). Counts and bytes per state are
    // kept by triggers, as the other counts are.
    r"
CREATE TABLE archive_files (
    id          INTEGER PRIMARY KEY,
    task_id     TEXT NOT NULL,
    name        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    audio_id    TEXT,
    url         TEXT,
    inline      TEXT,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'done', 'failed', 'expired')),
    size        INTEGER,
    sha256      TEXT,
    validator   TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try_at INTEGER NOT NULL,
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    done_at     INTEGER,
    updated_at  INTEGER NOT NULL,
    UNIQUE (task_id, name)
);
CREATE INDEX archive_oldest ON archive_files (created_at, id) WHERE state = 'pending';
CREATE INDEX archive_next ON archive_files (next_try_at) WHERE state = 'pending';
CREATE TABLE archive_counts (
    state TEXT PRIMARY KEY NOT NULL,
    n     INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TRIGGER archive_counts_insert AFTER INSERT ON archive_files BEGIN
    INSERT INTO archive_counts (state, n, bytes) VALUES (NEW.state, 1, COALESCE(NEW.size, 0))
        ON CONFLICT (state) DO UPDATE SET n = n + 1, bytes = bytes + COALESCE(NEW.size, 0);
END;
CREATE TRIGGER archive_counts_update AFTER UPDATE OF state, size ON archive_files BEGIN
    UPDATE archive_counts SET n = n - 1, bytes = bytes - COALESCE(OLD.size, 0) WHERE state = OLD.state;
    INSERT INTO archive_counts (state, n, bytes) VALUES (NEW.state, 1, COALESCE(NEW.size, 0))
        ON CONFLICT (state) DO UPDATE SET n = n + 1, bytes = bytes + COALESCE(NEW.size, 0);
END;
CREATE TRIGGER archive_counts_delete AFTER DELETE ON archive_files BEGIN
    UPDATE archive_counts SET n = n - 1, bytes = bytes - COALESCE(OLD.size, 0) WHERE state = OLD.state;
END;
",
    // Migration 9 (issue 12, the `archived` notification): events may have the stage
    // 'archived', sunopoll's own notification once every file of a task is kept. SQLite cannot
    // change a CHECK, so `events` is rebuilt (its 12-step procedure; `migrate` turns foreign
    // keys off around this step, so dropping the old table cascades to no delivery, and checks
    // them before the commit). Dropping the table forgets its AUTOINCREMENT high-water mark,
    // which pruned events may have left above every seq still stored: it is saved and put
    // back, so a seq is never used twice. The event_counts triggers go with the old table and
    // are made again. `tasks.stage` keeps its CHECK: 'archived' is never a task's stage.
    r"
CREATE TEMP TABLE events_high_water AS SELECT seq FROM sqlite_sequence WHERE name = 'events';
CREATE TABLE events_new (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    stage      TEXT NOT NULL CHECK (stage IN ('text', 'first', 'complete', 'error', 'archived')),
    code       INTEGER NOT NULL,
    body       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    kind       TEXT NOT NULL DEFAULT 'music',
    UNIQUE (task_id, stage)
);
INSERT INTO events_new (seq, task_id, stage, code, body, created_at, kind)
    SELECT seq, task_id, stage, code, body, created_at, kind FROM events;
DROP TABLE events;
ALTER TABLE events_new RENAME TO events;
DELETE FROM sqlite_sequence WHERE name IN ('events', 'events_new');
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'events', MAX(seq) FROM (SELECT seq FROM temp.events_high_water
                                    UNION ALL SELECT MAX(seq) AS seq FROM events)
    HAVING MAX(seq) IS NOT NULL;
DROP TABLE temp.events_high_water;
CREATE TRIGGER event_counts_insert AFTER INSERT ON events BEGIN
    INSERT INTO event_counts (stage, n) VALUES (NEW.stage, 1)
        ON CONFLICT (stage) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER event_counts_delete AFTER DELETE ON events BEGIN
    UPDATE event_counts SET n = n - 1 WHERE stage = OLD.stage;
END;
",
];

/// Migrations (by the version they lead to) that rebuild a table others refer to: foreign keys
/// are off while they run, as SQLite's table rebuild requires.
const REBUILDS: [usize; 1] = [9];

/// Why the store's lock was not taken.
pub(super) enum LockError {
    /// Another process holds it.
    Held(String),
    /// The database file could not be opened or locked.
    Failed(String),
}

/// The database file itself, opened and locked by this daemon for as long as it runs.
///
/// The lock is `flock(2)` on the database file (std's `File::try_lock`), not on a second file
/// named after it: a symlink or a hard link to the same database, or a deleted lock file, then
/// cannot let a second daemon share the queue, because the lock belongs to the inode. `flock`
/// locks are per open file description and independent of the POSIX `fcntl` locks SQLite takes
/// on the same file, so neither disturbs the other; and this descriptor stays open until the
/// store thread has closed its connection (closing any descriptor of a file drops the process's
/// POSIX locks on it, so it must not be closed while SQLite holds one).
pub(super) struct StoreFile {
    file: File,
    path: PathBuf,
    /// (device, inode) of the file opened at start.
    id: (u64, u64),
    /// True when the file did not exist (or was empty) before this start: a new store.
    pub(super) created: bool,
}

impl StoreFile {
    /// Opens (creating if needed) and locks the database file at `path`. A kernel lock is
    /// released when the process dies, so a crash never leaves it stale.
    pub(super) fn lock(path: &Path) -> Result<StoreFile, LockError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let shown = path.display();
        let created = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            // SQLite's own default for the files it creates.
            .mode(0o644)
            .open(path)
            .map_err(|e| LockError::Failed(format!("cannot open {shown}: {e}")))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LockError::Held(
                    "it is in use by another sunopoll daemon (the database file is locked); stop that one first"
                        .to_owned(),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(LockError::Failed(format!("cannot lock {shown}: {e}")));
            }
        }
        let meta = file
            .metadata()
            .map_err(|e| LockError::Failed(format!("cannot inspect {shown}: {e}")))?;
        Ok(StoreFile {
            file,
            path: path.to_owned(),
            id: (meta.dev(), meta.ino()),
            created,
        })
    }

    /// Whether the path still names the file this daemon opened. A store deleted or replaced
    /// under a running daemon would go on taking writes that no later start can see (or, for
    /// a replaced one, corrupt the new file's WAL on the next start), so every write checks
    /// first: two `stat`s, next to an fsync per commit.
    pub(super) fn check(&self) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let shown = self.path.display();
        let advice = "nothing more is written; put the file back (or restore a backup) and restart the daemon";
        let open = self
            .file
            .metadata()
            .map_err(|e| format!("cannot inspect the open store file {shown}: {e}"))?;
        if open.nlink() == 0 {
            return Err(format!(
                "the store file {shown} was deleted while the daemon ran; {advice}"
            ));
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => Ok(()),
            Ok(_) => Err(format!(
                "the store file {shown} was replaced by another file while the daemon ran; {advice}"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "the store file {shown} was deleted (or moved) while the daemon ran; {advice}"
            )),
            Err(e) => Err(format!("cannot inspect the store file {shown}: {e}")),
        }
    }
}

/// Tables every sunopoll store has from schema version 1 on.
const OWN_TABLES: [&str; 2] = ["tasks", "events"];

/// Checks, reading only, that the database is a sunopoll store (or an empty one) before
/// anything is changed: another application's database must not be switched to WAL or
/// migrated before it is refused.
pub(super) fn inspect(conn: &Connection) -> Result<(), String> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| explain_open_error(&e))?;
    let mut stmt = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') \
             AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .map_err(|e| explain_open_error(&e))?;
    let tables: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .and_then(|rows| rows.collect())
        .map_err(|e| explain_open_error(&e))?;
    let foreign = if version == 0 {
        !tables.is_empty()
    } else {
        OWN_TABLES
            .iter()
            .any(|t| !tables.iter().any(|have| have == t))
    };
    if !foreign {
        return Ok(());
    }
    const SHOWN: usize = 5;
    let mut names = tables
        .iter()
        .take(SHOWN)
        .map(|t| clip(&t.escape_debug().to_string(), 40))
        .collect::<Vec<_>>()
        .join(", ");
    if tables.len() > SHOWN {
        names.push_str(&format!(" and {} more", tables.len() - SHOWN));
    }
    if names.is_empty() {
        names = "no tables".to_owned();
    }
    Err(format!(
        "not a sunopoll store (schema version {version}, tables: {names}); it was left untouched — point store.path at sunopoll's own file"
    ))
}

/// Sets how long SQLite waits for another process's lock (changes nothing in the file).
pub(super) fn set_busy_timeout(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_millis(u64::from(BUSY_TIMEOUT_MS)))
}

/// Switches the file to WAL and sets the durability pragmas. Only for a file [`inspect`]
/// accepted: the WAL switch rewrites the file's header.
pub(super) fn configure(conn: &Connection) -> rusqlite::Result<()> {
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode stayed {mode}; WAL is required"
        )));
    }
    // FULL: an acknowledged add survives a power cut (WAL + NORMAL may lose the last commits).
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;",
    )?;
    Ok(())
}

/// The first line of `text`, clipped: error text that goes on one log line.
/// Fails if any row breaks a foreign key: a rebuild ran with them off, and must leave none.
fn foreign_key_violations(conn: &Connection) -> Result<(), String> {
    let broken: i64 = conn
        .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })
        .map_err(|e| explain_open_error(&e))?;
    if broken > 0 {
        return Err(format!("{broken} rows break a foreign key"));
    }
    Ok(())
}

fn one_line(text: &str) -> String {
    clip(text.lines().next().unwrap_or_default(), 200)
}

/// At most `max` characters of `text`, control characters as spaces, `…` if cut. (The store
/// keeps its own: it depends on no other part for formatting.)
fn clip(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

pub(super) fn explain_open_error(e: &rusqlite::Error) -> String {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            "the file is not a SQLite database (corrupted, or the wrong file); it was left untouched".to_owned()
        }
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            "the database is locked by another process".to_owned()
        }
        Some(rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::PermissionDenied) => {
            format!("cannot write it ({e}); check the permissions of the file and its directory")
        }
        _ => e.to_string(),
    }
}

pub(super) fn migrate(conn: &Connection) -> Result<(), String> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| explain_open_error(&e))?
        .try_into()
        .unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(format!(
            "it has schema version {version}, newer than this sunopoll knows ({}); upgrade sunopoll",
            MIGRATIONS.len()
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let to = i + 1;
        let rebuild = REBUILDS.contains(&to);
        // `PRAGMA foreign_keys` does nothing inside a transaction: it is set around one.
        let foreign_keys: bool = if rebuild {
            let on = conn
                .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
                .map_err(|e| explain_open_error(&e))?;
            conn.execute_batch("PRAGMA foreign_keys = OFF")
                .map_err(|e| explain_open_error(&e))?;
            on
        } else {
            false
        };
        let step = format!("BEGIN IMMEDIATE; {sql} PRAGMA user_version = {to};");
        let result = conn
            .execute_batch(&step)
            .map_err(|e| explain_open_error(&e))
            .and_then(|()| {
                if rebuild {
                    foreign_key_violations(conn)?;
                }
                conn.execute_batch("COMMIT")
                    .map_err(|e| explain_open_error(&e))
            });
        if result.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        if rebuild && foreign_keys {
            // After the transaction, where the pragma takes effect again.
            let _ = conn.execute_batch("PRAGMA foreign_keys = ON");
        }
        if let Err(e) = result {
            // SQLite's message alone: the statement's text (dozens of lines of SQL) is of no
            // use to an operator.
            return Err(format!("migration to schema {to} failed: {}", one_line(&e)));
        }
    }
    Ok(())
}
