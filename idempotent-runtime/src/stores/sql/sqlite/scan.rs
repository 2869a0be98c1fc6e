//! The SQLite dialect of the SQL stores ([`SqlDialect`]): what differs on SQLite, and
//! nothing else.

use super::primary_code;
use crate::error::StoreErrorKind;
use crate::stores::sql::common::SqlDialect;
use sqlx::Sqlite;
use sqlx::error::DatabaseError;

impl SqlDialect for Sqlite {
    /// SQLite reads the clock once per statement step, so every use in one statement
    /// sees the same instant.
    const NOW_US: &'static str = "CAST(unixepoch('subsec') * 1000000 AS INTEGER)";
    const QUOTE: char = '"';
    const GREATEST: &'static str = "max";
    const ROW_VALUES: bool = true;
    const ANY_TYPE: bool = true;

    const SCOPE_BYTES: &'static str = "CAST({} AS BLOB)";
    const BYTE_LEN: &'static str = "length(CAST({} AS BLOB))";
    const INT8: &'static str = "{}";

    fn param(n: usize) -> String {
        format!("?{n}")
    }
    fn purge(t: &str) -> String {
        format!(
            "DELETE FROM {t} WHERE rowid IN (\
                SELECT rowid FROM {t} WHERE expires_at_us <= {} LIMIT ?1)",
            Self::NOW_US
        )
    }

    fn classify(e: &dyn DatabaseError) -> StoreErrorKind {
        match primary_code(e) {
            // SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN
            5 | 6 | 10 | 13 | 14 => StoreErrorKind::Unavailable,
            // SQLITE_ERROR (no such table, …), SQLITE_PERM, SQLITE_READONLY, SQLITE_AUTH
            1 | 3 | 8 | 23 => StoreErrorKind::Rejected,
            // SQLITE_CORRUPT, SQLITE_NOTADB, SQLITE_CONSTRAINT, SQLITE_MISMATCH
            11 | 26 | 19 | 20 => StoreErrorKind::Corrupt,
            _ => StoreErrorKind::Other,
        }
    }

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn conflict(e: &dyn DatabaseError) -> bool {
        // SQLITE_BUSY and its extended codes (BUSY_SNAPSHOT: a deferred transaction that
        // read first cannot take the write lock after another writer committed)
        primary_code(e) == 5
    }
}
