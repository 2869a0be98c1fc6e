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
//!
//! This file holds what the three share: the statements prepared per table, and the
//! one [`DedupTransaction`](crate::store::DedupTransaction) implementation
//! ([`tx_mode!`]), whose completion is the stores' (the compare-and-set `UPDATE`, then
//! the fence check); each database gives its statements and one attempt of its claim
//! in its own folder (`mysql/tx.rs`, `postgres/tx.rs`, `sqlite/tx.rs`).

use super::base::{SqlDialect, TableName};
use crate::error::StoreError;
use crate::error::StoreErrorKind;
use crate::key::RecordKey;
use crate::store::{ClaimRequest, TxFuture};
use sqlx::Database;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, PoisonError, RwLock};

/// Transactional mode on the database `$db`: the cache of its statements per table
/// (`$sql`, built by `$sql::new` from the table name, holding the store's shared
/// statements as `steps`), and `DedupTransaction` for its `sqlx::Transaction`, whose
/// claim retries `$claim` (one attempt on the caller's connection: `Some` outcome, or
/// `None` when the row changed under it) and whose completion is the stores'.
macro_rules! tx_mode {
    ($db:ty, $sql:ident, $claim:path) => {
        static PREPARED: $crate::stores::sql::common::tx::Prepared<$sql> =
            std::sync::RwLock::new(std::collections::BTreeMap::new());

        impl $crate::store::DedupTransaction for sqlx::Transaction<'_, $db> {
            fn claim_in_tx<'a>(
                &'a mut self,
                table: &'a str,
                req: &'a $crate::store::ClaimRequest<'a>,
            ) -> $crate::store::TxFuture<'a, $crate::store::ClaimOutcome> {
                let run = move |sql: std::sync::Arc<$sql>| async move {
                    $crate::stores::sql::common::row::retrying!({
                        let conn = &mut **self;
                        let attempt = $crate::stores::sql::common::tx::TxClaim {
                            conn,
                            sql: &*sql,
                            req,
                        };
                        $claim(attempt).await?
                    })
                };
                $crate::stores::sql::common::tx::in_tx::<$db, _, _, _, _>(
                    &PREPARED,
                    $sql::new,
                    table,
                    req.key,
                    run,
                )
            }

            fn complete_in_tx<'a>(
                &'a mut self,
                table: &'a str,
                c: &'a $crate::store::Completion<'a>,
            ) -> $crate::store::TxFuture<'a, $crate::store::Fence> {
                let w = $crate::stores::sql::common::row::Owned::Complete(*c);
                let run = move |sql: std::sync::Arc<$sql>| async move {
                    let op = "complete in transaction";
                    $crate::stores::sql::common::steps::Steps::<$db>::apply_in(
                        &mut **self,
                        &sql.steps,
                        op,
                        w,
                    )
                    .await
                };
                $crate::stores::sql::common::tx::in_tx::<$db, _, _, _, _>(
                    &PREPARED,
                    $sql::new,
                    table,
                    c.key,
                    run,
                )
            }
        }
    };
}
pub(crate) use tx_mode;

/// One attempt of a claim in the caller's transaction: its connection, the statements
/// of the table, the request.
pub(crate) struct TxClaim<'a, DB: Database, S> {
    pub(crate) conn: &'a mut DB::Connection,
    pub(crate) sql: &'a S,
    pub(crate) req: &'a ClaimRequest<'a>,
}

impl<DB: SqlDialect, S> TxClaim<'_, DB, S> {
    /// Wraps a driver error of the claim.
    pub(crate) fn err(&self) -> impl Fn(sqlx::Error) -> StoreError + Send + Sync + use<DB, S> {
        DB::err("claim in transaction")
    }
}

/// Runs `run` with the statements of `table` (from `cache`, built by `build` on first
/// use), once the database can store `key`.
pub(crate) fn in_tx<'a, DB, S, T, F, Fut>(
    cache: &'static Prepared<S>,
    build: fn(TableName) -> S,
    table: &'a str,
    key: &'a RecordKey,
    run: F,
) -> TxFuture<'a, T>
where
    DB: SqlDialect,
    S: Send + Sync + 'static,
    F: FnOnce(Arc<S>) -> Fut + Send + 'a,
    Fut: Future<Output = Result<T, StoreError>> + Send + 'a,
{
    Box::pin(async move {
        let sql = prepared(cache, table, build)?;
        DB::storable(key)?;
        run(sql).await
    })
}

/// The statements of each dedup table a transactional handler used, by table name,
/// built on first use; a bad table name is kept as its error message.
pub(crate) type Prepared<S> = RwLock<BTreeMap<Box<str>, Result<Arc<S>, String>>>;

pub(crate) fn prepared<S>(
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
