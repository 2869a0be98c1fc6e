//! The MySQL (and MariaDB) dialect of the SQL stores ([`SqlDialect`]): what differs on
//! MySQL, and nothing else.

use crate::error::StoreErrorKind;
use crate::stores::sql::common::{self, SqlDialect};
use sqlx::MySql;
use sqlx::error::DatabaseError;
use sqlx::mysql::MySqlDatabaseError;

impl SqlDialect for MySql {
    /// `UTC_TIMESTAMP(6)` is read once per statement, so every use within one
    /// statement sees the same instant, and it does not depend on the session time
    /// zone.
    const NOW_US: &'static str =
        "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))";
    const QUOTE: char = '`';
    const GREATEST: &'static str = "GREATEST";
    const ROW_VALUES: bool = false;
    const NUMBERED: bool = false;
    const SCOPE_AS_BYTES: bool = true;

    const SCOPE_BYTES: &'static str = "CAST({} AS BINARY)";
    const BYTE_LEN: &'static str = "CAST(LENGTH({}) AS SIGNED)";
    const INT8: &'static str = "CAST({} AS SIGNED)";

    fn param(_: usize) -> String {
        "?".to_owned()
    }
    fn purge(t: &str) -> String {
        format!(
            "DELETE FROM {t} WHERE expires_at_us <= {} ORDER BY expires_at_us LIMIT ?",
            Self::NOW_US
        )
    }

    fn classify(e: &dyn DatabaseError) -> StoreErrorKind {
        if let Some(my) = e.try_downcast_ref::<MySqlDatabaseError>() {
            match my.number() {
                // no such table / column, access denied, syntax, unknown database
                1044 | 1045 | 1049 | 1054 | 1064 | 1142 | 1143 | 1146 => {
                    return StoreErrorKind::Rejected;
                }
                // too many connections, shutdown, killed, interrupted, read-only during failover
                1040 | 1053 | 1317 | 1290 | 1792 | 1836 | 1927 | 2006 | 2013 => {
                    return StoreErrorKind::Unavailable;
                }
                // value too long, out of range, incorrect value
                1264 | 1366 | 1406 => return StoreErrorKind::Corrupt,
                _ => {}
            }
        }
        match e.code() {
            Some(code) => common::classify_sqlstate(&code),
            None => StoreErrorKind::Other,
        }
    }

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        // the connection sets CLIENT_FOUND_ROWS: rows matched, not rows changed
        done.rows_affected()
    }

    fn conflict(e: &dyn DatabaseError) -> bool {
        // 1213 deadlock, 1205 lock wait timeout, 1020 record changed since the
        // snapshot (MariaDB's snapshot isolation), 3572 NOWAIT lock not granted
        e.try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|my| matches!(my.number(), 1213 | 1205 | 1020 | 3572))
            || e.code().as_deref() == Some("40001")
    }
}
