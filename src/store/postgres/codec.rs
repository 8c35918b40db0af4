//! The store's enums in and out of PostgreSQL `TEXT` columns, and whole numbers between the
//! database's `BIGINT` and the records' narrower types. As in SQLite, a value this build does
//! not know (written by a newer sunopoll, or damaged) is an error naming the value — never a
//! silent default.

use std::error::Error as StdError;
use std::fmt;

use bytes::BytesMut;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use crate::events::Stage;
use crate::store::Kind;
use crate::store::{FileState, PauseKind, TaskState};

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

impl StdError for Unknown {}

macro_rules! stored_enum {
    ($ty:ty, $what:literal) => {
        impl ToSql for $ty {
            fn to_sql(
                &self,
                ty: &Type,
                out: &mut BytesMut,
            ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
                self.as_str().to_sql(ty, out)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as ToSql>::accepts(ty)
            }

            to_sql_checked!();
        }

        impl<'a> FromSql<'a> for $ty {
            fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
                let text = <&str as FromSql>::from_sql(ty, raw)?;
                <$ty>::parse(text).ok_or_else(|| {
                    Box::new(Unknown {
                        what: $what,
                        value: text.to_owned(),
                    }) as Box<dyn StdError + Sync + Send>
                })
            }

            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty)
            }
        }
    };
}

stored_enum!(Stage, "stage");
stored_enum!(TaskState, "task state");
stored_enum!(PauseKind, "pause kind");
stored_enum!(Kind, "task kind");
stored_enum!(FileState, "archive file state");

/// A stored count (`BIGINT`) as the records' `u32`. Counts are only ever written from `u32`s,
/// so anything out of range is damage; it saturates rather than wraps.
pub(super) fn count(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// A `usize` limit as a `BIGINT` parameter.
pub(super) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
