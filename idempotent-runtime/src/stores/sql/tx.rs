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

use super::common::{self, BindExt, CLAIM_RETRIES, SqlDatabase, TableName};
use crate::error::StoreError;
use crate::error::StoreErrorKind;
use crate::store::{ClaimOutcome, ClaimRequest, Completion, DedupTransaction, Fence, TxFuture};
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

/// The statements of each dedup table a transactional handler used, by table name,
/// built on first use; a bad table name is kept as its error message.
type Prepared<S> = RwLock<BTreeMap<Box<str>, Result<Arc<S>, String>>>;

fn prepared<S>(
    cache: &Prepared<S>,
    table: &str,
    build: fn(TableName) -> S,
) -> Result<Arc<S>, StoreError> {
    let known = cache
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(table)
        .cloned();
    let built = match known {
        Some(b) => b,
        None => {
            let built = TableName::parse(table)
                .map(|t| Arc::new(build(t)))
                .map_err(|e| e.to_string());
            cache
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(table.into())
                .or_insert(built)
                .clone()
        }
    };
    built.map_err(|e| StoreError::new(StoreErrorKind::Rejected, e))
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use crate::stores::sql::common::{Plan, RowView};
    use crate::stores::sql::mysql::Statements;
    use crate::store::Token;
    use sqlx::SqlStr;
    use sqlx::mysql::MySql;

    static MYSQL: Prepared<MySqlTx> = RwLock::new(BTreeMap::new());

    /// The MySQL store's statements plus the two locking ones of tx mode.
    struct MySqlTx {
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
                insert_or_lock: common::sql(format!(
                    "{} ON DUPLICATE KEY UPDATE owner_token = owner_token + LAST_INSERT_ID(0)",
                    s.insert.as_str()
                )),
                read_for_update: common::sql(format!("{} FOR UPDATE", s.read.as_str())),
                store: s,
            }
        }
    }

    fn err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        MySql::err(op)
    }

    impl DedupTransaction for sqlx::Transaction<'_, MySql> {
        fn claim_in_tx<'a>(
            &'a mut self,
            table: &'a str,
            req: &'a ClaimRequest<'a>,
        ) -> TxFuture<'a, ClaimOutcome> {
            Box::pin(async move {
                let s = prepared(&MYSQL, table, MySqlTx::new)?;
                let conn = &mut **self;
                for _ in 0..CLAIM_RETRIES {
                    let done = sqlx::query(s.insert_or_lock.clone())
                        .bind_claim(req)
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
                        .bind_key(req.key)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(err("claim in transaction"))?;
                    // deleted between the two statements (forget, purge): insert again
                    let Some(row) = row else { continue };
                    // the row is locked by this transaction: the compare-and-set holds
                    let plan = Plan::of(req, Some(RowView::decode(&row, 0, req.key.scope())?));
                    let written =
                        s.store
                            .write_claim(&mut *conn, req, plan, err("claim in transaction"));
                    if let Some(outcome) = written.await? {
                        return Ok(outcome);
                    }
                }
                Err(common::contended())
            })
        }

        fn complete_in_tx<'a>(
            &'a mut self,
            table: &'a str,
            c: &'a Completion<'a>,
        ) -> TxFuture<'a, Fence> {
            Box::pin(async move {
                let s = prepared(&MYSQL, table, MySqlTx::new)?;
                let q = s.store.complete_query(c);
                let conn = &mut **self;
                let op = "complete in transaction";
                if common::execute(&mut *conn, q, err(op)).await? > 0 {
                    return Ok(Fence::Held);
                }
                let row = sqlx::query(s.store.read.clone())
                    .bind_key(c.key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(err(op))?;
                let seen = row.map(|r| RowView::decode(&r, 0, c.key.scope()));
                Ok(common::unmatched_fence(
                    seen.transpose()?,
                    common::Step::Complete(c.token),
                ))
            })
        }
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use crate::stores::sql::postgres::PostgresStore;
    use crate::stores::sql::common::RowView;
    use crate::stores::sql::postgres::{Statements, storable};
    use sqlx::postgres::Postgres;

    static POSTGRES: Prepared<PostgresTx> = RwLock::new(BTreeMap::new());

    /// The PostgreSQL store's statements: its claim already locks what it writes.
    struct PostgresTx(Statements);

    impl PostgresTx {
        fn new(table: TableName) -> Self {
            PostgresTx(Statements::new(table))
        }
    }

    fn err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        Postgres::err(op)
    }

    impl DedupTransaction for sqlx::Transaction<'_, Postgres> {
        fn claim_in_tx<'a>(
            &'a mut self,
            table: &'a str,
            req: &'a ClaimRequest<'a>,
        ) -> TxFuture<'a, ClaimOutcome> {
            Box::pin(async move {
                let s = prepared(&POSTGRES, table, PostgresTx::new)?;
                storable(req.key)?;
                for _ in 0..CLAIM_RETRIES {
                    let row = sqlx::query(s.0.claim.clone())
                        .bind_claim(req)
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
            table: &'a str,
            c: &'a Completion<'a>,
        ) -> TxFuture<'a, Fence> {
            Box::pin(async move {
                let s = prepared(&POSTGRES, table, PostgresTx::new)?;
                storable(c.key)?;
                let q = sqlx::query(s.0.complete.clone()).bind_completion(c);
                let conn = &mut **self;
                let op = "complete in transaction";
                if common::execute(&mut *conn, q, err(op)).await? > 0 {
                    return Ok(Fence::Held);
                }
                let row = sqlx::query(s.0.inspect.clone())
                    .bind_key(c.key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(err(op))?;
                let seen = row.map(|r| RowView::decode(&r, 0, c.key.scope()));
                Ok(common::unmatched_fence(
                    seen.transpose()?,
                    common::Step::Complete(c.token),
                ))
            })
        }
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use crate::stores::sql::common::{Plan, RowView};
    use crate::stores::sql::sqlite::Statements;
    use sqlx::sqlite::Sqlite;

    static SQLITE: Prepared<SqliteTx> = RwLock::new(BTreeMap::new());

    /// The SQLite store's statements; the transaction holds the database's write lock
    /// from its first write, so reads after the insert see the latest rows.
    struct SqliteTx(Statements);

    impl SqliteTx {
        fn new(table: TableName) -> Self {
            SqliteTx(Statements::new(table))
        }
    }

    fn err(op: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
        Sqlite::err(op)
    }

    impl DedupTransaction for sqlx::Transaction<'_, Sqlite> {
        fn claim_in_tx<'a>(
            &'a mut self,
            table: &'a str,
            req: &'a ClaimRequest<'a>,
        ) -> TxFuture<'a, ClaimOutcome> {
            Box::pin(async move {
                let s = prepared(&SQLITE, table, SqliteTx::new)?;
                let s = &s.0;
                let conn = &mut **self;
                let err = || err("claim in transaction");
                for _ in 0..CLAIM_RETRIES {
                    let inserted = s.write_claim(conn, req, Plan::Insert, None, err());
                    if let Some(outcome) = inserted.await? {
                        return Ok(outcome);
                    }
                    let row = s
                        .read_query(req.key)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(err())?;
                    let Some(row) = row else { continue };
                    let plan = Plan::of(req, Some(RowView::decode(&row, 0, req.key.scope())?));
                    if let Some(outcome) = s.write_claim(conn, req, plan, None, err()).await? {
                        return Ok(outcome);
                    }
                }
                Err(common::contended())
            })
        }

        fn complete_in_tx<'a>(
            &'a mut self,
            table: &'a str,
            c: &'a Completion<'a>,
        ) -> TxFuture<'a, Fence> {
            Box::pin(async move {
                let s = prepared(&SQLITE, table, SqliteTx::new)?;
                let s = &s.0;
                let q = sqlx::query(s.complete.clone()).bind_completion(c);
                let conn = &mut **self;
                let op = "complete in transaction";
                if common::execute(&mut *conn, q, err(op)).await? > 0 {
                    return Ok(Fence::Held);
                }
                let row = s
                    .read_query(c.key)
                    .fetch_optional(&mut *conn)
                    .await
                    .map_err(err(op))?;
                let seen = row.map(|r| RowView::decode(&r, 0, c.key.scope()));
                Ok(common::unmatched_fence(
                    seen.transpose()?,
                    common::Step::Complete(c.token),
                ))
            })
        }
    }
}
