//! The store's enums in and out of SQL. A value this build does not know (written by a newer
//! sunopoll, or damaged) is an error that names the value and the column's meaning — never a
//! silent default: reading an unknown state as `failed`, or an unknown stage as `error`, would
//! turn a damaged row into a false outcome.

use std::fmt;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

use crate::events::Stage;
use crate::store::Kind;
use crate::store::{PauseKind, TaskState};

/// A stored spelling this build does not know.
#[derive(Debug)]
struct Unknown {
    what: &'static str,
    value: String,
}

impl fmt::Display for Unknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown {} {:?} in the store (written by a newer sunopoll, or damaged)",
            self.what, self.value
        )
    }
}

impl std::error::Error for Unknown {}

macro_rules! stored_enum {
    ($ty:ty, $what:literal) => {
        impl ToSql for $ty {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $ty {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                <$ty>::parse(text).ok_or_else(|| {
                    FromSqlError::Other(Box::new(Unknown {
                        what: $what,
                        value: text.to_owned(),
                    }))
                })
            }
        }
    };
}

stored_enum!(Stage, "stage");
stored_enum!(TaskState, "task state");
stored_enum!(PauseKind, "pause kind");
stored_enum!(Kind, "task kind");

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    fn read<T: FromSql>(conn: &Connection, value: &str) -> rusqlite::Result<T> {
        conn.query_row("SELECT ?1", [value], |r| r.get(0))
    }

    #[test]
    fn every_known_value_round_trips() {
        let conn = Connection::open_in_memory().expect("sqlite");
        for stage in Stage::EVERY {
            let back: Stage = conn
                .query_row("SELECT ?1", [stage], |r| r.get(0))
                .expect("round trip");
            assert_eq!(back, stage);
        }
        for state in [
            TaskState::Active,
            TaskState::Done,
            TaskState::Failed,
            TaskState::Removed,
        ] {
            assert_eq!(
                read::<TaskState>(&conn, state.as_str()).expect("state"),
                state
            );
        }
        for kind in [
            PauseKind::Throttled,
            PauseKind::Unavailable,
            PauseKind::Unauthorized,
        ] {
            assert_eq!(read::<PauseKind>(&conn, kind.as_str()).expect("kind"), kind);
        }
    }

    #[test]
    fn an_unknown_value_is_an_error_that_names_it() {
        let conn = Connection::open_in_memory().expect("sqlite");
        let e = read::<Stage>(&conn, "half-done").expect_err("unknown stage");
        assert!(e.to_string().contains("unknown stage \"half-done\""), "{e}");
        let e = read::<TaskState>(&conn, "sleeping").expect_err("unknown state");
        assert!(
            e.to_string().contains("unknown task state \"sleeping\""),
            "{e}"
        );
        let e = read::<PauseKind>(&conn, "bored").expect_err("unknown pause");
        assert!(
            e.to_string().contains("unknown pause kind \"bored\""),
            "{e}"
        );
        // Not text at all is an error too, not a default.
        let e = conn
            .query_row("SELECT 42", [], |r| r.get::<_, Stage>(0))
            .expect_err("an integer is no stage");
        assert!(matches!(e, rusqlite::Error::InvalidColumnType(..)), "{e}");
    }
}
