//! Transactional mode (`#[idempotent(tx = "…")]`): the claim and the completion are
//! written through the caller's `sqlx::Transaction`, so the dedup row commits or rolls
//! back with the handler's own writes.
//!
//! Each database reuses its store's statements (same table, same columns, same
//! database clock), so `inspect` and `forget` of the stores see tx-mode rows:
//!
//! | step | MySQL / MariaDB | PostgreSQL | SQLite |
//! | --- | --- | --- | --- |
//! | claim | `INSERT … ON DUPLICATE KEY UPDATE` (inserts, or takes the row's exclusive lock); on a duplicate `SELECT … FOR UPDATE`, then the store's take-over `UPDATE` if the row is claimable | the store's claim statement (`INSERT … ON CONFLICT DO UPDATE … WHERE <claimable>` in a CTE; the insert waits on a concurrent claimant's row lock) | the store's `INSERT … ON CONFLICT DO NOTHING RETURNING`; on a duplicate the store's read, then its take-over `UPDATE … RETURNING` |
//! | complete | the store's `UPDATE … SET status = 1, output = ?` (compare-and-set on the token) | the same | the same |
//!
//! The claim is written with a lease that ends at once: the transaction's row lock is
//! what keeps a concurrent duplicate out, and a claim that is committed without a
//! completion (the caller committed after a handler error) is claimable again at once.

use super::common::{self, CLAIM_RETRIES, TableName, keep_micros, micros};
use crate::__private::{TxFuture, TxTable};
use crate::StoreError;
use crate::StoreErrorKind;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, Fence};
use sqlx::error::DatabaseError;
use std::sync::OnceLock;

/// The statements of one table, built on first use by a handler and kept in its
/// [`TxTable`]; a bad table name is kept as its error message.
pub(crate) type Prepared<S> = OnceLock<Result<S, String>>;

fn prepared<'t, S>(
    cell: &'t Prepared<S>,
    table: &TxTable,
    build: fn(TableName) -> S,
) -> Result<&'t S, StoreError> {
    cell.get_or_init(|| {
        TableName::parse(table.name())
            .map(build)
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| StoreError::new(StoreErrorKind::Rejected, e.clone()))
}

/// Wraps a driver error: conflicts with a concurrent transaction are
/// [`StoreErrorKind::Conflict`], everything else is classified as the store does.
fn tx_error(
    op: &'static str,
    conflict: fn(&dyn DatabaseError) -> bool,
    store: fn(&dyn DatabaseError) -> StoreErrorKind,
) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| {
        let conflicted = matches!(&e, sqlx::Error::Database(d) if conflict(d.as_ref()));
        if conflicted {
            common::sql_error(op, e, |_| StoreErrorKind::Conflict)
        } else {
            common::sql_error(op, e, store)
        }
    }
}

/// The outcome of a completion, as the attribute reports it.
fn fence(rows: u64) -> Fence {
    if rows > 0 { Fence::Held } else { Fence::Lost }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use crate::sql::common::{Decision, RowView};
    use crate::sql::mysql::{self as store, Statements};
    use crate::store::Token;
    use sqlx::SqlStr;
    use sqlx::mysql::{MySql, MySqlDatabaseError};

    /// The MySQL store's statements plus the two locking ones of tx mode.
    pub(crate) struct MySqlTx {
        store: Statements,
        /// The store's insert; on a duplicate key it takes the existing row's
        /// exclusive lock (waiting for a concurrent claimant's transaction to end)
        /// and changes nothing. `LAST_INSERT_ID(0)` on that path tells the two apart:
        /// the OK packet carries the new token after an insert, 0 after a duplicate.
        insert_or_lock: SqlStr,
        /// The store's read as a locking read: the latest committed version, whatever
        /// the isolation level's snapshot.
        read_for_update: SqlStr,
    }

    impl MySqlTx {
        fn new(table: TableName) -> Self {
            let s = Statements::new(table);
            MySqlTx {
                insert_or_lock: store::sql(format!(
                    "{} ON DUPLICATE KEY UPDATE owner_token = owner_token + LAST_INSERT_ID(0)",
                    s.insert.as_str()
                )),
                read_for_update: store::sql(format!("{} FOR UPDATE", s.read.as_str())),
                store: s,
            }
        }
    }

    fn conflict(e: &dyn DatabaseError) -> bool {
        // 1213 deadlock, 1205 lock wait timeout, 1020 record changed since the
        // snapshot (MariaDB's snapshot isolation), 3572 NOWAIT lock not granted
        e.try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|my| matches!(my.number(), 1213 | 1205 | 1020 | 3572))
            || e.code().as_deref() == Some("40001")
    }

    fn err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        tx_error(op, conflict, store::classify)
    }

    impl crate::__private::DedupTransaction for sqlx::Transaction<'_, MySql> {
        fn claim_in_tx<'a>(
            &'a mut self,
            table: &'a TxTable,
            req: &'a ClaimRequest<'a>,
        ) -> TxFuture<'a, ClaimOutcome> {
            Box::pin(async move {
                let s = prepared(&table.mysql, table, MySqlTx::new)?;
                let conn = &mut **self;
                for _ in 0..CLAIM_RETRIES {
                    let done = sqlx::query(s.insert_or_lock.clone())
                        .bind(req.key.scope())
                        .bind(req.key.key())
                        .bind(micros(req.lease))
                        .bind(keep_micros(req))
                        .bind(req.fingerprint)
                        .execute(&mut *conn)
                        .await
                        .map_err(err("claim in transaction"))?;
                    if done.last_insert_id() != 0 {
                        return Ok(ClaimOutcome::Acquired {
                            token: Token(done.last_insert_id()),
                            attempt: 1,
                        });
                    }
                    let row = sqlx::query(s.read_for_update.clone())
                        .bind(req.key.scope())
                        .bind(req.key.key())
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(err("claim in transaction"))?;
                    // deleted between the two statements (forget, purge): insert again
                    let Some(row) = row else { continue };
                    let seen = RowView::decode(&row, 0)?;
                    let (token, attempts) = (seen.token, seen.attempts);
                    // the row is locked by this transaction: the compare-and-set holds
                    let (done, attempt) = match seen.decide(req)? {
                        Decision::Answer(outcome) => return Ok(outcome),
                        Decision::Claimable { expired: true } => {
                            let done = sqlx::query(s.store.take_over_expired.clone())
                                .bind(micros(req.lease))
                                .bind(keep_micros(req))
                                .bind(req.fingerprint)
                                .bind(req.key.scope())
                                .bind(req.key.key())
                                .bind(token)
                                .execute(&mut *conn)
                                .await;
                            (done, 1)
                        }
                        Decision::Claimable { expired: false } => {
                            let done = sqlx::query(s.store.take_over.clone())
                                .bind(micros(req.lease))
                                .bind(keep_micros(req))
                                .bind(req.fingerprint)
                                .bind(req.key.scope())
                                .bind(req.key.key())
                                .bind(token)
                                .bind(attempts)
                                .execute(&mut *conn)
                                .await;
                            (done, common::attempts(attempts)?.saturating_add(1))
                        }
                    };
                    let done = done.map_err(err("claim in transaction"))?;
                    if done.rows_affected() > 0 {
                        return Ok(ClaimOutcome::Acquired {
                            token: Token(done.last_insert_id()),
                            attempt,
                        });
                    }
                }
                Err(common::contended())
            })
        }

        fn complete_in_tx<'a>(
            &'a mut self,
            table: &'a TxTable,
            c: &'a Completion<'a>,
        ) -> TxFuture<'a, Fence> {
            Box::pin(async move {
                let s = prepared(&table.mysql, table, MySqlTx::new)?;
                let done = sqlx::query(s.store.complete.clone())
                    .bind(c.output)
                    .bind(micros(c.ttl))
                    .bind(c.key.scope())
                    .bind(c.key.key())
                    .bind(common::token_param(c.token))
                    .execute(&mut **self)
                    .await
                    .map_err(err("complete in transaction"))?;
                Ok(fence(done.rows_affected()))
            })
        }
    }
}
#[cfg(feature = "mysql")]
pub(crate) use mysql::MySqlTx;

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::PostgresStore;
    use crate::sql::postgres::{self as store, Statements};
    use sqlx::postgres::Postgres;

    /// The PostgreSQL store's statements: its claim already locks what it writes.
    pub(crate) struct PostgresTx(Statements);

    impl PostgresTx {
        fn new(table: TableName) -> Self {
            PostgresTx(Statements::new(table))
        }
    }

    fn conflict(e: &dyn DatabaseError) -> bool {
        // serialization failure, deadlock, lock not available (lock_timeout, NOWAIT)
        matches!(e.code().as_deref(), Some("40001" | "40P01" | "55P03"))
    }

    fn err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        tx_error(op, conflict, store::classify)
    }

    impl crate::__private::DedupTransaction for sqlx::Transaction<'_, Postgres> {
        fn claim_in_tx<'a>(
            &'a mut self,
            table: &'a TxTable,
            req: &'a ClaimRequest<'a>,
        ) -> TxFuture<'a, ClaimOutcome> {
            Box::pin(async move {
                let s = prepared(&table.postgres, table, PostgresTx::new)?;
                for _ in 0..CLAIM_RETRIES {
                    let row = sqlx::query(s.0.claim.clone())
                        .bind(req.key.scope())
                        .bind(req.key.key())
                        .bind(micros(req.lease))
                        .bind(keep_micros(req))
                        .bind(req.fingerprint)
                        .bind(None::<i32>)
                        .fetch_optional(&mut **self)
                        .await
                        .map_err(err("claim in transaction"))?;
                    // no row: the statement waited for a concurrent claimant that
                    // committed after its snapshot; the next statement sees that row
                    // (READ COMMITTED). Under REPEATABLE READ and SERIALIZABLE the
                    // insert fails with a serialization failure instead.
                    if let Some(row) = row
                        && let Some(outcome) = PostgresStore::decode_claim(&row, 0, req)?
                    {
                        return Ok(outcome);
                    }
                }
                Err(common::contended())
            })
        }

        fn complete_in_tx<'a>(
            &'a mut self,
            table: &'a TxTable,
            c: &'a Completion<'a>,
        ) -> TxFuture<'a, Fence> {
            Box::pin(async move {
                let s = prepared(&table.postgres, table, PostgresTx::new)?;
                let done = sqlx::query(s.0.complete.clone())
                    .bind(c.key.scope())
                    .bind(c.key.key())
                    .bind(common::token_param(c.token))
                    .bind(c.output)
                    .bind(micros(c.ttl))
                    .execute(&mut **self)
                    .await
                    .map_err(err("complete in transaction"))?;
                Ok(fence(done.rows_affected()))
            })
        }
    }
}
#[cfg(feature = "postgres")]
pub(crate) use postgres::PostgresTx;

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use crate::sql::common::{Decision, RowView};
    use crate::sql::sqlite::{self as store, Statements};
    use sqlx::Row;
    use sqlx::sqlite::Sqlite;

    /// The SQLite store's statements; the transaction holds the database's write lock
    /// from its first write, so reads after the insert see the latest rows.
    pub(crate) struct SqliteTx(Statements);

    impl SqliteTx {
        fn new(table: TableName) -> Self {
            SqliteTx(Statements::new(table))
        }
    }

    fn conflict(e: &dyn DatabaseError) -> bool {
        // SQLITE_BUSY and its extended codes (BUSY_SNAPSHOT: a deferred transaction that
        // read first cannot take the write lock after another writer committed)
        let code: i64 = e.code().and_then(|c| c.parse().ok()).unwrap_or(0);
        code & 0xff == 5
    }

    fn err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        tx_error(op, conflict, store::classify)
    }

    impl crate::__private::DedupTransaction for sqlx::Transaction<'_, Sqlite> {
        fn claim_in_tx<'a>(
            &'a mut self,
            table: &'a TxTable,
            req: &'a ClaimRequest<'a>,
        ) -> TxFuture<'a, ClaimOutcome> {
            Box::pin(async move {
                let s = &prepared(&table.sqlite, table, SqliteTx::new)?.0;
                let conn = &mut **self;
                for _ in 0..CLAIM_RETRIES {
                    let inserted = sqlx::query(s.insert.clone())
                        .bind(req.key.scope())
                        .bind(req.key.key())
                        .bind(micros(req.lease))
                        .bind(keep_micros(req))
                        .bind(req.fingerprint)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(err("claim in transaction"))?;
                    if let Some(row) = inserted {
                        let token: i64 = row.try_get(0).map_err(err("claim in transaction"))?;
                        return Ok(ClaimOutcome::Acquired {
                            token: common::token(token)?,
                            attempt: 1,
                        });
                    }
                    let row = sqlx::query(s.read.clone())
                        .bind(req.key.scope())
                        .bind(req.key.key())
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(err("claim in transaction"))?;
                    let Some(row) = row else { continue };
                    let seen = RowView::decode(&row, 0)?;
                    let (token, attempts) = (seen.token, seen.attempts);
                    let (stmt, counts_attempt) = match seen.decide(req)? {
                        Decision::Answer(outcome) => return Ok(outcome),
                        Decision::Claimable { expired: true } => (&s.take_over_expired, false),
                        Decision::Claimable { expired: false } => (&s.take_over, true),
                    };
                    let mut q = sqlx::query(stmt.clone())
                        .bind(req.key.scope())
                        .bind(req.key.key())
                        .bind(micros(req.lease))
                        .bind(keep_micros(req))
                        .bind(req.fingerprint)
                        .bind(token);
                    if counts_attempt {
                        q = q.bind(attempts);
                    }
                    let taken = q
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(err("claim in transaction"))?;
                    if let Some(row) = taken {
                        let token: i64 = row.try_get(0).map_err(err("claim in transaction"))?;
                        let attempt: i64 = row.try_get(1).map_err(err("claim in transaction"))?;
                        return Ok(ClaimOutcome::Acquired {
                            token: common::token(token)?,
                            attempt: common::attempts(attempt)?,
                        });
                    }
                }
                Err(common::contended())
            })
        }

        fn complete_in_tx<'a>(
            &'a mut self,
            table: &'a TxTable,
            c: &'a Completion<'a>,
        ) -> TxFuture<'a, Fence> {
            Box::pin(async move {
                let s = &prepared(&table.sqlite, table, SqliteTx::new)?.0;
                let done = sqlx::query(s.complete.clone())
                    .bind(c.key.scope())
                    .bind(c.key.key())
                    .bind(common::token_param(c.token))
                    .bind(c.output)
                    .bind(micros(c.ttl))
                    .execute(&mut **self)
                    .await
                    .map_err(err("complete in transaction"))?;
                Ok(fence(done.rows_affected()))
            })
        }
    }
}
#[cfg(feature = "sqlite")]
pub(crate) use sqlite::SqliteTx;
