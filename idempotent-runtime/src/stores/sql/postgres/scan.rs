//! The PostgreSQL dialect of the SQL stores ([`SqlDialect`]): what differs on
//! PostgreSQL, and nothing else.

use super::statements::with_clock;
use crate::error::{StoreError, StoreErrorKind};
use crate::key::RecordKey;
use crate::stores::sql::common::{self, SqlDialect};
use sqlx::Postgres;
use sqlx::error::DatabaseError;

impl SqlDialect for Postgres {
    /// `clock_timestamp()` rather than `now()`, which is frozen at the start of the
    /// surrounding transaction.
    const NOW_US: &'static str = "floor(extract(epoch FROM clock_timestamp()) * 1000000)::int8";
    const QUOTE: char = '"';
    const GREATEST: &'static str = "GREATEST";
    const ROW_VALUES: bool = true;

    const SCOPE_BYTES: &'static str = "convert_to({}, 'UTF8')";
    const BYTE_LEN: &'static str = "octet_length({})::int8";
    const INT8: &'static str = "({})::int8";

    fn param(n: usize) -> String {
        format!("${n}")
    }

    /// `clock_timestamp()` changes within a statement: every statement reads it once,
    /// as `n.now_us`.
    fn now() -> &'static str {
        "n.now_us"
    }
    fn update(table: &str, set: &str, cond: &str) -> String {
        format!(
            "{} UPDATE {table} SET {set} FROM n WHERE {cond}",
            with_clock()
        )
    }
    fn select(cols: &str, from: &str, cond: &str) -> String {
        format!("{} SELECT {cols} FROM {from}, n WHERE {cond}", with_clock())
    }
    fn purge(t: &str) -> String {
        format!(
            "{} DELETE FROM {t} WHERE (scope, message_id) IN (\
                SELECT scope, message_id FROM {t}, n WHERE expires_at_us <= n.now_us \
                LIMIT $1 FOR UPDATE SKIP LOCKED)",
            with_clock()
        )
    }

    /// PostgreSQL's text columns cannot hold a NUL character, so a scope with one is a
    /// request the database cannot store ([`StoreErrorKind::Rejected`]).
    fn storable(key: &RecordKey) -> Result<(), StoreError> {
        if key.scope().contains('\0') {
            return Err(StoreError::new(
                StoreErrorKind::Rejected,
                format!(
                    "the scope {:?} contains a NUL character, which PostgreSQL cannot store in \
                     a text column; use a scope without NUL",
                    key.scope()
                ),
            ));
        }
        Ok(())
    }

    fn classify(e: &dyn DatabaseError) -> StoreErrorKind {
        match e.code() {
            // transaction rollback (serialization failure, deadlock, …): a retry may succeed
            Some(code) if code.starts_with("40") => StoreErrorKind::Conflict,
            Some(code) => common::classify_sqlstate(&code),
            None => StoreErrorKind::Other,
        }
    }

    fn rows_affected(done: &Self::QueryResult) -> u64 {
        done.rows_affected()
    }

    fn conflict(e: &dyn DatabaseError) -> bool {
        // serialization failure, deadlock, lock not available (lock_timeout, NOWAIT)
        matches!(e.code().as_deref(), Some("40001" | "40P01" | "55P03"))
    }
}
